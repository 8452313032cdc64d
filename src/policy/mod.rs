//! Access policy: groups, tags, network ACLs and SSH rules, with tests.
//!
//! CONTRACT (used by the SSH server and the node; keep these signatures):
//! - `Policy::parse(src, file_name) -> Result<Policy, PolicyErrors>`
//! - `Policy::load(path) -> Result<Policy, PolicyErrors>`
//! - `Policy::check_ssh(&caller, &target, login_user) -> SshDecision`
//! - `Policy::check_ssh_superuser(&caller, &target, login_user) -> SshDecision`
//!   (the login's account has uid 0: judged as root too)
//! - `Policy::check_network(&src, &dst, port) -> bool`
//! - `Policy::run_tests() -> Vec<Diagnostic>`
//! - `Policy::default_static()` the embedded default policy
//! - `cli_check(path) -> i32` is `tailgate policy check FILE`
//!
//! The file format, the evaluation order and worked examples are in
//! `policies/README.md`. In short: deny by default; a matching `reject` ssh
//! rule wins wherever it is; otherwise the first matching `accept`/`check`
//! rule in file order decides. Evaluation is a pure function of (policy,
//! caller, target, login).
//!
//! Layout: `raw` (serde structs with spans) -> `compile` (validation, every
//! problem with line:col) -> `eval` (decisions) and `selftest` (`[[tests]]`);
//! `pattern` holds the pattern language, `duration` the `max_duration` parser.
#![warn(missing_docs)]

mod compile;
mod duration;
mod eval;
mod pattern;
mod raw;
mod selftest;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use crate::daemon::identity::Identity;

pub use duration::CheckPeriod;
pub(crate) use pattern::PROVIDER_GROUP_PREFIX;

/// The port of the embedded SSH server. Every `accept`/`check` ssh rule
/// implies network access to this port from its `src` to its `dst`.
pub const SSH_PORT: u16 = 22;

/// The text of the built-in policy (`policies/default.toml`).
pub const DEFAULT_POLICY_TOML: &str = include_str!("../../policies/default.toml");

/// What an SSH rule says to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Log in.
    Accept,
    /// Log in after a second factor (a code verified by control).
    Check,
    /// Refuse.
    Reject,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Check => "check",
            Action::Reject => "reject",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of evaluating the SSH rules for one login attempt.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SshDecision {
    /// What to do with the login.
    pub action: Action,
    /// Which rule decided (e.g. `ssh[2] at policy.toml:31`); `None` = default deny.
    pub rule: Option<String>,
    /// One line for the user explaining the decision.
    pub reason: String,
    /// `record = true`: record the session (asciicast).
    pub record: bool,
    /// `record = "required"`: refused when the recording cannot reach the
    /// control server (at start), ended when it can neither be shipped nor spooled.
    pub record_required: bool,
    /// The connection's time limit, from login.
    pub max_duration: Option<Duration>,
    /// Environment variable name patterns the client may set (`*` wildcards).
    pub accept_env: Vec<String>,
    /// For `check`: how long a passed check admits the same (user, source node).
    pub check_period: CheckPeriod,
}

impl SshDecision {
    /// May the client set environment variable `name` (per `accept_env`)?
    pub fn allows_env(&self, name: &str) -> bool {
        self.action != Action::Reject && self.accept_env.iter().any(|p| pattern::env_matches(p, name))
    }
}

/// A located problem in a policy file: `file:line:col: message`.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// The policy file's name as given to the parser.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

/// Why a policy was refused: every problem found, one per line when shown.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct PolicyErrors(pub Vec<Diagnostic>);

/// A parsed and validated policy. Cheap to clone; immutable.
#[derive(Clone, Debug)]
pub struct Policy {
    file: String,
    /// Group name -> its users, nested groups expanded.
    groups: BTreeMap<String, BTreeSet<String>>,
    tag_owners: BTreeMap<String, compile::TagOwners>,
    acls: Vec<compile::AclRule>,
    ssh: Vec<compile::SshRule>,
    tests: Vec<compile::PolicyTest>,
}

impl Policy {
    /// Parses and validates a policy (syntax, unknown keys, groups, tags,
    /// patterns, actions, durations, unreachable rules). Does not run the
    /// `[[tests]]`: see [`Policy::run_tests`] and [`Policy::parse_and_test`].
    pub fn parse(src: &str, file_name: &str) -> Result<Policy, PolicyErrors> {
        compile::compile(src, file_name, compile::Options::default())
    }

    /// [`Policy::parse`] of a file; an unreadable file is one diagnostic.
    pub fn load(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let src = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors(vec![Diagnostic {
                file: path.display().to_string(),
                line: 0,
                col: 0,
                message: format!("cannot read policy file: {e}"),
            }])
        })?;
        Self::parse(&src, &path.display().to_string())
    }

    /// [`Policy::parse`], then the policy's own `[[tests]]`: a policy is only
    /// returned if all of them pass. Use this before putting a policy in force.
    pub fn parse_and_test(src: &str, file_name: &str) -> Result<Policy, PolicyErrors> {
        let p = Self::parse(src, file_name)?;
        let failures = p.run_tests();
        if failures.is_empty() { Ok(p) } else { Err(PolicyErrors(failures)) }
    }

    /// [`Policy::load`] + [`Policy::run_tests`], as [`Policy::parse_and_test`].
    pub fn load_and_test(path: &std::path::Path) -> Result<Policy, PolicyErrors> {
        let p = Self::load(path)?;
        let failures = p.run_tests();
        if failures.is_empty() { Ok(p) } else { Err(PolicyErrors(failures)) }
    }

    /// The built-in policy for a node started without one
    /// (`policies/default.toml`): each user may log in to their own nodes as
    /// any non-root login; nothing else.
    pub fn default_static() -> Policy {
        static DEFAULT: OnceLock<Policy> = OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                Policy::parse_and_test(DEFAULT_POLICY_TOML, "default.toml")
                    .unwrap_or_else(|e| panic!("built-in default policy is invalid:\n{e}"))
            })
            .clone()
    }

    /// Judges `login` by its name only (what `[[tests]]` and `policy check`
    /// can do without the target's account database).
    pub fn check_ssh(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision {
        self.eval_ssh(caller, target, login, false)
    }

    /// Judges a login whose local account has uid 0 (`toor`, a second
    /// root): an accept/check rule must admit both the name and `root`; a
    /// reject rule for either refuses it. The SSH server uses this once it
    /// has looked the account up.
    pub fn check_ssh_superuser(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision {
        self.eval_ssh(caller, target, login, true)
    }

    /// May `src` open a TCP connection to `dst` on `port`? True iff an
    /// `[[acl]]` rule allows it, or `port` is [`SSH_PORT`] and an accept/check
    /// `[[ssh]]` rule matches (src, dst) for some login.
    pub fn check_network(&self, src: &Identity, dst: &Identity, port: u16) -> bool {
        self.network_rule(src, dst, port).is_some()
    }

    /// Could some `accept`/`check` `[[ssh]]` rule admit `caller` on `target`
    /// for some login? The node's inbound filter opens its SSH port on this;
    /// reject-only matches open nothing. (Added for the inbound filter.)
    pub fn ssh_reachable(&self, caller: &Identity, target: &Identity) -> bool {
        self.ssh.iter().any(|r| r.action != Action::Reject && r.matches_nodes(caller, target))
    }

    /// Runs the `[[tests]]`; one diagnostic per failed assertion, empty when
    /// all pass.
    pub fn run_tests(&self) -> Vec<Diagnostic> {
        self.run_selftests()
    }

    /// The file name given to `parse`/`load`, as it appears in diagnostics
    /// and rule labels.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// Number of `[[tests]]` entries.
    pub fn test_count(&self) -> usize {
        self.tests.len()
    }

    /// Number of single assertions (logins and ports) across all tests.
    pub(crate) fn assertion_count(&self) -> usize {
        self.tests.iter().map(|t| t.logins.len() + t.ports.len()).sum()
    }

    /// Number of `[[ssh]]` rules.
    pub(crate) fn ssh_rule_count(&self) -> usize {
        self.ssh.len()
    }

    /// The tags declared in `[tag_owners]`.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.tag_owners.keys().map(String::as_str)
    }

    /// The users of a group (nested groups expanded), if it exists.
    pub fn group_members(&self, group: &str) -> Option<&BTreeSet<String>> {
        self.groups.get(group)
    }

    /// May `who` apply `tag` to a node (per `[tag_owners]`)? For the control
    /// server; SSH evaluation takes the node's tags as given.
    pub fn may_apply_tag(&self, who: &Identity, tag: &str) -> bool {
        let Some(o) = self.tag_owners.get(tag) else {
            return false;
        };
        pattern::effective_user(who).is_some_and(|u| o.users.contains(u)) || who.tags.iter().any(|t| o.tags.contains(t))
    }
}

/// `tailgate policy check FILE`: parse, validate, run the tests. Problems go
/// to stderr as `FILE:LINE:COL: message`; on success one summary line goes to
/// stdout. Returns the process exit code (0 ok, 1 any problem).
pub fn cli_check(path: &std::path::Path) -> i32 {
    let name = path.display().to_string();
    let policy = match Policy::load(path) {
        Ok(p) => p,
        Err(PolicyErrors(diags)) => {
            for d in &diags {
                eprintln!("{d}");
            }
            eprintln!("{name}: {} problem{}", diags.len(), if diags.len() == 1 { "" } else { "s" });
            return 1;
        }
    };
    let failures = policy.run_tests();
    if !failures.is_empty() {
        for d in &failures {
            eprintln!("{d}");
        }
        eprintln!("{name}: {} of {} test assertions failed", failures.len(), policy.assertion_count());
        return 1;
    }
    println!(
        "{name}: ok, {} tests passed ({} assertions, {} ssh rules)",
        policy.test_count(),
        policy.assertion_count(),
        policy.ssh_rule_count()
    );
    0
}
