//! The control side of SSH `check`: verifying TOTP codes for nodes, keeping
//! approvals, replay and lockout state, and the `users totp` admin ops.
//!
//! Who is checked comes from the *source* node key the asking node names:
//! its owner. A node cannot name a user, only one of the tailnet's nodes, so
//! a compromised node can probe codes only for users who own nodes, and only
//! at the lockout rate per (user, source node).

use serde_json::{Value, json};

use super::{AdminRequest, ConnId, Hub, HubError, Out};
use crate::control::fmt_time;
use crate::control::server::store::CheckStateRow;
use crate::control::server::totp;
use crate::control::wire::proto::{CheckOutcome, ClientMsg, ServerOut};
use crate::key::Key;

/// Wrong codes per (user, source node) before a lockout.
pub(crate) const MAX_FAILURES: i64 = 5;
/// How long a lockout lasts; failures older than this are forgotten.
pub(crate) const LOCKOUT_SECS: i64 = 15 * 60;

struct Answer {
    outcome: CheckOutcome,
    user: String,
    message: String,
}

/// Whose check this is: the asking node, the source node and its owner.
struct Checked<'a> {
    asker: &'a str,
    src_name: &'a str,
    user_id: i64,
    user: &'a str,
    source: &'a Key,
}

fn denied(user: &str, message: String) -> Answer {
    Answer { outcome: CheckOutcome::Denied, user: user.to_string(), message }
}

impl Hub {
    /// A [`ClientMsg::Check`] from `node`.
    pub(super) fn check_request(&mut self, conn: ConnId, node: i64, msg: ClientMsg, now: i64) {
        let ClientMsg::Check { id, source, code, max_age_secs } = msg else { return };
        let a = self.check_answer(node, &source, code, max_age_secs, now);
        self.out.push(Out::send(conn, ServerOut::CheckResult { id, outcome: a.outcome, user: a.user, message: a.message }));
    }

    fn check_answer(&mut self, node: i64, source: &Key, code: Option<String>, max_age_secs: Option<u64>, now: i64) -> Answer {
        let asker = self.nodes.get(&node).map(|n| n.name.clone()).unwrap_or_default();
        let Some(src) = self.by_key.get(source).and_then(|id| self.nodes.get(id)).cloned() else {
            return denied("", "your node is not registered with the control server".into());
        };
        if self.expired(src.id, now) {
            return denied("", format!("your node {}'s key has expired; log in again (tailgate up)", src.name));
        }
        let Some((user_id, user)) = src.user_id.filter(|_| src.tags.is_empty()).and_then(|u| Some((u, self.users.get(&u)?.clone()))) else {
            return denied("", format!("{} is a tagged node: a check needs a person, log in from your own node", src.name));
        };
        let store_failed = |e: anyhow::Error| {
            tracing::error!("check for {user}: store: {e:#}");
            denied(&user, "the control server could not read its database; try again, or ask an admin to look at its log".into())
        };
        let secret = match self.store.totp_get(user_id) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return denied(
                    &user,
                    format!("{user} has no verification code set up; ask an admin to enrol you: tailgate control users totp enroll {user}"),
                );
            }
            Err(e) => return store_failed(e),
        };
        let mut st = match self.store.check_state_get(user_id, source) {
            Ok(s) => s,
            Err(e) => return store_failed(e),
        };
        if let Some(until) = st.locked_until.filter(|u| *u > now) {
            let mins = (until - now + 59) / 60;
            return Answer {
                outcome: CheckOutcome::LockedOut,
                user: user.clone(),
                message: format!("too many wrong codes from {}: locked out for {mins} more minute(s)", src.name),
            };
        }
        let Some(code) = code else {
            let fresh = match (max_age_secs, st.approved_at) {
                (Some(age), Some(at)) => now.saturating_sub(at) < i64::try_from(age).unwrap_or(i64::MAX),
                _ => false,
            };
            return if fresh {
                let at = st.approved_at.map(fmt_time).unwrap_or_default();
                Answer { outcome: CheckOutcome::Approved, user, message: format!("verified at {at}") }
            } else {
                Answer { outcome: CheckOutcome::CodeNeeded, user, message: String::new() }
            };
        };
        let step = match totp::verify(&secret.secret, &code, now.max(0) as u64) {
            Ok(s) => s.map(|s| s as i64),
            Err(e) => {
                tracing::error!("check for {user}: {e}");
                return denied(&user, "the stored secret is unusable; ask an admin to reset and re-enrol you".into());
            }
        };
        let why = match step {
            Some(s) if secret.last_step.is_none_or(|l| s > l) => {
                st.approved_at = Some(now);
                st.failures = 0;
                st.last_failure = None;
                let saved = self.store.tx(|db| {
                    db.totp_set_last_step(user_id, s)?;
                    db.check_state_put(user_id, source, &st)
                });
                if let Err(e) = saved {
                    return store_failed(e);
                }
                self.audit(now, &format!("node:{asker}"), "check.passed", &user, &format!("from {}", src.name));
                return Answer { outcome: CheckOutcome::Approved, user, message: "verified".into() };
            }
            Some(_) => "that code was already used; wait for the next one",
            None => "wrong verification code",
        };
        let who = Checked { asker: &asker, src_name: &src.name, user_id, user: &user, source };
        self.check_failed(who, st, why, now)
    }

    /// A wrong or replayed code: counts it, locks out at [`MAX_FAILURES`].
    fn check_failed(&mut self, who: Checked<'_>, mut st: CheckStateRow, why: &str, now: i64) -> Answer {
        let Checked { asker, src_name, user_id, user, source } = who;
        if st.last_failure.is_some_and(|t| now - t >= LOCKOUT_SECS) {
            st.failures = 0;
        }
        st.failures += 1;
        st.last_failure = Some(now);
        let (outcome, action, message) = if st.failures >= MAX_FAILURES {
            st.failures = 0;
            st.locked_until = Some(now + LOCKOUT_SECS);
            (
                CheckOutcome::LockedOut,
                "check.lockout",
                format!("{why}; {MAX_FAILURES} wrong codes: {user} from {src_name} is locked out for 15 minutes"),
            )
        } else {
            let left = MAX_FAILURES - st.failures;
            (CheckOutcome::WrongCode, "check.failed", format!("{why} ({left} more wrong code(s) lock you out for 15 minutes)"))
        };
        if let Err(e) = self.store.check_state_put(user_id, source, &st) {
            tracing::error!("check for {user}: store: {e:#}");
        }
        self.audit(now, &format!("node:{asker}"), action, user, &format!("from {src_name}: {why}"));
        Answer { outcome, user: user.to_string(), message }
    }

    /// `users totp enroll|reset|status`.
    pub(super) fn totp_admin(&mut self, req: AdminRequest, now: i64) -> Result<Value, HubError> {
        let find = |h: &Hub, name: &str| -> Result<i64, HubError> {
            h.store
                .user_by_name(name)
                .map_err(HubError::store)?
                .map(|u| u.id)
                .ok_or_else(|| HubError::not_found(format!("no user {name}; add them first: tailgate control users add {name}")))
        };
        match req {
            AdminRequest::TotpEnroll { user } => {
                let id = find(self, &user)?;
                if self.store.totp_get(id).map_err(HubError::store)?.is_some() {
                    return Err(HubError::invalid(format!(
                        "{user} is already enrolled; to replace the secret: tailgate control users totp reset {user}, then enroll again"
                    )));
                }
                let secret = totp::new_secret();
                let code = totp::code_at(&secret, now.max(0) as u64)
                    .map_err(|e| HubError::new(crate::control::wire::proto::ErrorCode::Internal, e.to_string()))?;
                self.store.totp_set(id, &secret, now).map_err(HubError::store)?;
                self.audit(now, "admin", "totp.enroll", &user, "");
                Ok(json!({"user": user, "secret": secret, "uri": totp::otpauth_uri(&user, &secret), "code": code}))
            }
            AdminRequest::TotpReset { user } => {
                let id = find(self, &user)?;
                let had = self.store.totp_delete(id).map_err(HubError::store)?;
                if !had {
                    return Err(HubError::invalid(format!("{user} has no TOTP enrolled")));
                }
                self.audit(now, "admin", "totp.reset", &user, "");
                Ok(json!({"user": user, "reset": true}))
            }
            AdminRequest::TotpStatus { user } => {
                let users = match user {
                    Some(u) => vec![(find(self, &u)?, u)],
                    None => self.store.users().map_err(HubError::store)?.into_iter().map(|u| (u.id, u.name)).collect(),
                };
                let mut out = Vec::new();
                for (id, name) in users {
                    let t = self.store.totp_get(id).map_err(HubError::store)?;
                    let locked: Vec<Value> = self
                        .store
                        .check_lockouts(id, now)
                        .map_err(HubError::store)?
                        .into_iter()
                        .map(|(key, until)| {
                            let node = crate::dataplane::wg::key_from_base64(&key)
                                .ok()
                                .and_then(|k| self.by_key.get(&k))
                                .and_then(|i| self.nodes.get(i))
                                .map_or(key.clone(), |n| n.name.clone());
                            json!({"node": node, "until": until})
                        })
                        .collect();
                    out.push(json!({
                        "user": name,
                        "enrolled": t.is_some(),
                        "enrolled_at": t.as_ref().map(|t| t.created),
                        "last_used": t.as_ref().and_then(|t| t.last_step).map(|s| s * totp::STEP as i64),
                        "locked_out": locked,
                    }));
                }
                Ok(Value::Array(out))
            }
            _ => Err(HubError::invalid("not a totp request")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::server::hub::{HubConfig, Now};
    use crate::control::server::store::Store;
    use crate::control::wire::proto::ServerMsg;
    use crate::control::wire::token::AuthKeyToken;

    const T0: i64 = 1_700_000_000;

    /// A hub with alice's laptop (key [7; 32]) and a tagged web node (key [8; 32]), connected.
    fn lab() -> (Hub, i64) {
        let mut h = Hub::open(Store::open_memory().unwrap(), HubConfig::new("http://127.0.0.1:1", [1; 32]), None, Now::at(T0)).unwrap();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(T0)).unwrap();
        let key = |h: &mut Hub, user: Option<&str>, tags: Vec<String>| {
            let req = AdminRequest::KeysCreate { user: user.map(Into::into), reusable: false, ephemeral: false, expiry_secs: None, tags };
            let v = h.admin(req, Now::at(T0)).unwrap();
            AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret
        };
        let reg = |secret: String, host: &str| ClientMsg::Register {
            auth_key: secret,
            hostname: host.into(),
            ssh_host_key: None,
            endpoints: vec![],
            previous_node_key: None,
        };
        h.admin(AdminRequest::PolicySet { text: "[tag_owners]\n\"tag:web\" = [\"alice\"]\n".into(), name: "p".into() }, Now::at(T0))
            .unwrap();
        let k = key(&mut h, Some("alice"), vec![]);
        h.hello(1, [7; 32], reg(k, "laptop"), Now::at(T0)).unwrap();
        let k = key(&mut h, None, vec!["tag:web".into()]);
        let web = h.hello(2, [8; 32], reg(k, "web"), Now::at(T0)).unwrap();
        h.take_outputs();
        (h, web)
    }

    fn ask(h: &mut Hub, web: i64, source: Key, code: Option<String>, max_age: Option<u64>, now: i64) -> (CheckOutcome, String) {
        h.client_msg(2, web, ClientMsg::Check { id: 9, source, code, max_age_secs: max_age }, Now::at(now));
        let outs = h.take_outputs();
        let msg = outs
            .into_iter()
            .find_map(|o| match o {
                Out::Send(2, m) => serde_json::from_value::<ServerMsg>(serde_json::to_value(m).unwrap()).ok(),
                _ => None,
            })
            .expect("an answer");
        match msg {
            ServerMsg::CheckResult { id: 9, outcome, message, .. } => (outcome, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn enrolment_codes_replay_lockout_and_approval_age() {
        let (mut h, web) = lab();
        let (o, m) = ask(&mut h, web, [7; 32], None, Some(3600), T0);
        assert_eq!(o, CheckOutcome::Denied);
        assert!(m.contains("tailgate control users totp enroll alice"), "{m}");
        let (o, m) = ask(&mut h, web, [8; 32], None, Some(3600), T0);
        assert!(o == CheckOutcome::Denied && m.contains("tagged"), "{m}");
        let (o, _) = ask(&mut h, web, [3; 32], None, Some(3600), T0);
        assert_eq!(o, CheckOutcome::Denied);

        let v = h.admin(AdminRequest::TotpEnroll { user: "alice".into() }, Now::at(T0)).unwrap();
        let secret = v["secret"].as_str().unwrap().to_string();
        assert!(h.admin(AdminRequest::TotpEnroll { user: "alice".into() }, Now::at(T0)).unwrap_err().message.contains("already enrolled"));
        assert_eq!(ask(&mut h, web, [7; 32], None, Some(3600), T0).0, CheckOutcome::CodeNeeded);

        let code = totp::code_at(&secret, T0 as u64).unwrap();
        assert_eq!(ask(&mut h, web, [7; 32], Some(code.clone()), Some(3600), T0).0, CheckOutcome::Approved);
        // Approved within the period, not beyond it, never for "always".
        assert_eq!(ask(&mut h, web, [7; 32], None, Some(3600), T0 + 3599).0, CheckOutcome::Approved);
        assert_eq!(ask(&mut h, web, [7; 32], None, Some(3600), T0 + 3600).0, CheckOutcome::CodeNeeded);
        assert_eq!(ask(&mut h, web, [7; 32], None, None, T0 + 1).0, CheckOutcome::CodeNeeded);
        // Replays, also of an older step inside the skew window.
        let (o, m) = ask(&mut h, web, [7; 32], Some(code), None, T0 + 5);
        assert!(o == CheckOutcome::WrongCode && m.contains("already used"), "{m}");
        let older = totp::code_at(&secret, T0 as u64 - 30).unwrap();
        assert_eq!(ask(&mut h, web, [7; 32], Some(older), None, T0 + 5).0, CheckOutcome::WrongCode);
        for i in 0..2 {
            assert_eq!(ask(&mut h, web, [7; 32], Some("000000x".into()), None, T0 + 6 + i).0, CheckOutcome::WrongCode);
        }
        let (o, m) = ask(&mut h, web, [7; 32], Some("abc".into()), None, T0 + 9);
        assert!(o == CheckOutcome::LockedOut && m.contains("locked out for 15 minutes"), "{m}");
        // Locked out: even the right code is refused, until 15 minutes pass.
        let next = totp::code_at(&secret, T0 as u64 + 60).unwrap();
        assert_eq!(ask(&mut h, web, [7; 32], Some(next.clone()), None, T0 + 60).0, CheckOutcome::LockedOut);
        let status = h.admin(AdminRequest::TotpStatus { user: Some("alice".into()) }, Now::at(T0 + 60)).unwrap();
        assert_eq!(status[0]["locked_out"][0]["node"], "laptop", "{status}");
        let later = T0 + 9 + LOCKOUT_SECS;
        let code = totp::code_at(&secret, later as u64).unwrap();
        assert_eq!(ask(&mut h, web, [7; 32], Some(code), None, later).0, CheckOutcome::Approved);
        let audit: Vec<String> =
            h.store.audit_recent(100).unwrap().into_iter().filter(|a| a.action.starts_with("check.")).map(|a| a.action).collect();
        assert_eq!(audit.iter().filter(|a| *a == "check.lockout").count(), 1, "{audit:?}");
        assert_eq!(audit.iter().filter(|a| *a == "check.failed").count(), 4, "{audit:?}");
        // Reset forgets the secret; the secret never shows in status.
        h.admin(AdminRequest::TotpReset { user: "alice".into() }, Now::at(later)).unwrap();
        let status = h.admin(AdminRequest::TotpStatus { user: None }, Now::at(later)).unwrap();
        assert_eq!(status[0]["enrolled"], false);
        assert!(!status.to_string().contains(&secret));
    }
}
