//! The policy in force: loaded at start (a policy file, else the latest
//! stored version, else the built-in default) and replaced by
//! `policy set` or a changed policy file, never by one that fails its tests.

use anyhow::{Result, anyhow};

use super::{Hub, HubError, Now};
use crate::control::server::store::{PolicyRow, Store};
use crate::control::wire::proto::PolicyInfo;
use crate::policy::{DEFAULT_POLICY_TOML, Policy};

/// The policy in force.
pub(super) struct PolicyState {
    pub(super) version: u64,
    pub(super) name: String,
    pub(super) text: String,
    pub(super) source: String,
}

/// Store the built-in default policy as `version` and put it in force.
fn install_builtin_policy(store: &Store, version: u64, now: i64) -> Result<(Policy, PolicyState)> {
    let state = PolicyState { version, name: "default.toml".into(), text: DEFAULT_POLICY_TOML.into(), source: "built-in".into() };
    store.policy_insert(&PolicyRow {
        version,
        name: state.name.clone(),
        text: state.text.clone(),
        source: state.source.clone(),
        set_at: now,
    })?;
    Ok((Policy::default_static(), state))
}

/// The policy to start with. `policy_file` = (text, name) of a policy file
/// that must be valid and is put in force (a new version if it differs).
pub(super) fn load(store: &Store, policy_file: Option<(String, String)>, now: i64) -> Result<(Policy, PolicyState)> {
    let latest = store.policy_latest()?;
    match (policy_file, latest) {
        (Some((text, name)), latest) => {
            let p = Policy::parse_and_test(&text, &name).map_err(|e| anyhow!("policy {name} is not valid, not starting:\n{e}"))?;
            let version = match latest {
                Some(l) if l.text == text => l.version,
                Some(l) => l.version + 1,
                None => 1,
            };
            if store.policy_latest()?.map(|l| l.version) != Some(version) {
                store.policy_insert(&PolicyRow { version, name: name.clone(), text: text.clone(), source: "file".into(), set_at: now })?;
                store.audit(now, "server", "policy.set", &name, &format!("version {version} from file"))?;
            }
            Ok((p, PolicyState { version, name, text, source: "file".into() }))
        }
        (None, Some(l)) => {
            // Stored policies were validated when set; if this build's
            // validator disagrees, fall back to the built-in default.
            match Policy::parse_and_test(&l.text, &l.name) {
                Ok(p) => Ok((p, PolicyState { version: l.version, name: l.name, text: l.text, source: l.source })),
                Err(e) => {
                    tracing::error!("stored policy version {} no longer validates, using the built-in default:\n{e}", l.version);
                    install_builtin_policy(store, l.version + 1, now)
                }
            }
        }
        (None, None) => install_builtin_policy(store, 1, now),
    }
}

impl Hub {
    /// Validates and puts a policy in force. A policy that does not parse or
    /// fails its tests is refused with the diagnostics; the old one stays.
    /// Returns the version in force (unchanged if the text is the same).
    pub(crate) fn set_policy(&mut self, text: &str, name: &str, source: &str, at: Now) -> Result<u64, HubError> {
        let now = at.unix;
        let p = Policy::parse_and_test(text, name).map_err(|e| {
            HubError::invalid(format!("policy refused, the previous one (version {}) stays in force:\n{e}", self.policy.version))
        })?;
        if text == self.policy.text {
            return Ok(self.policy.version);
        }
        let version = self.policy.version + 1;
        self.store
            .tx(|s| {
                s.policy_insert(&PolicyRow { version, name: name.into(), text: text.into(), source: source.into(), set_at: now })?;
                s.audit(now, source, "policy.set", name, &format!("version {version}"))
            })
            .map_err(|e| HubError::store(e.context("cannot store the policy")))?;
        self.policy = PolicyState { version, name: name.into(), text: text.into(), source: source.into() };
        let d = self.engine.set_policy(p, PolicyInfo { version, name: name.into(), text: text.into() });
        self.emit(d);
        tracing::info!("policy version {version} ({name}, from {source}) in force");
        Ok(version)
    }
}
