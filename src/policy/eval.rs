//! Decisions. Pure functions of (policy, caller, target, login/port).
//!
//! SSH order: a matching `reject` rule decides, wherever it is in the file
//! (the first matching reject names the rule); otherwise the first matching
//! `accept` or `check` rule in file order; otherwise default deny.
#![warn(missing_docs)]

use super::compile::SshRule;
use super::{Action, CheckPeriod, Policy, SSH_PORT, SshDecision};
use crate::daemon::identity::Identity;

impl SshRule {
    /// Does this rule apply to `caller` logging in to `target` as `login`?
    #[cfg(test)]
    pub(crate) fn matches(&self, caller: &Identity, target: &Identity, login: &str) -> bool {
        self.matches_as(caller, target, login, false)
    }

    /// As [`SshRule::matches`], for an account that may have uid 0
    /// (`superuser`). Such an account is root whatever its name, so a rule
    /// admits it only if its `users` admit both the name and `root`, and a
    /// `reject` rule refuses it if its `users` match either: the alias gets
    /// no more than root gets and no more than its name gets.
    pub(crate) fn matches_as(&self, caller: &Identity, target: &Identity, login: &str, superuser: bool) -> bool {
        let users = |l: &str| self.users.iter().any(|u| u.matches(l, caller));
        let users_ok = match (superuser, self.action) {
            (false, _) => users(login),
            (true, Action::Reject) => users(login) || users("root"),
            (true, _) => users(login) && users("root"),
        };
        users_ok && self.matches_nodes(caller, target)
    }

    /// The (caller, target) part of the match, ignoring the login.
    pub(crate) fn matches_nodes(&self, caller: &Identity, target: &Identity) -> bool {
        self.src.iter().any(|p| p.matches(caller, caller)) && self.dst.iter().any(|p| p.matches(target, caller))
    }
}

impl Policy {
    /// The rule that decides an SSH login, if any (see module docs for order).
    #[cfg(test)]
    pub(crate) fn deciding_ssh_rule(&self, caller: &Identity, target: &Identity, login: &str) -> Option<&SshRule> {
        self.deciding_ssh_rule_as(caller, target, login, false)
    }

    fn deciding_ssh_rule_as(&self, caller: &Identity, target: &Identity, login: &str, superuser: bool) -> Option<&SshRule> {
        let mut first_allow = None;
        for r in &self.ssh {
            if r.matches_as(caller, target, login, superuser) {
                if r.action == Action::Reject {
                    return Some(r);
                }
                first_allow.get_or_insert(r);
            }
        }
        first_allow
    }

    /// `superuser`: the login's account has uid 0 (see [`SshRule::matches_as`]).
    pub(crate) fn eval_ssh(&self, caller: &Identity, target: &Identity, login: &str, superuser: bool) -> SshDecision {
        let who = caller.who();
        let host = &target.node_name;
        let rule = self.deciding_ssh_rule_as(caller, target, login, superuser);
        let shown = if superuser && login != "root" { format!("{login} (uid 0, judged as root)") } else { login.to_string() };
        let login = shown.as_str();
        let Some(r) = rule else {
            return SshDecision {
                action: Action::Reject,
                rule: None,
                reason: format!("no ssh rule in the policy allows {who} to log in to {host} as {login}"),
                record: false,
                record_required: false,
                max_duration: None,
                accept_env: Vec::new(),
                check_period: CheckPeriod::default(),
            };
        };
        let reason = match r.action {
            Action::Accept => format!("{} allows {who} to log in to {host} as {login}", r.label),
            Action::Check => {
                format!("{} requires a check before {who} may log in to {host} as {login}", r.label)
            }
            Action::Reject => format!("{} rejects {who} logging in to {host} as {login}", r.label),
        };
        let allowed = r.action != Action::Reject;
        SshDecision {
            action: r.action,
            rule: Some(r.label.clone()),
            reason,
            record: allowed && r.record,
            record_required: allowed && r.record_required,
            max_duration: if allowed { r.max_duration } else { None },
            accept_env: if allowed { r.accept_env.clone() } else { Vec::new() },
            check_period: r.check_period,
        }
    }

    /// The rule that lets `src` reach `dst:port`: the first matching `[[acl]]`
    /// rule, or for the SSH port the first accept/check `[[ssh]]` rule whose
    /// src and dst match.
    pub(crate) fn network_rule(&self, src: &Identity, dst: &Identity, port: u16) -> Option<String> {
        for a in &self.acls {
            if a.src.iter().any(|p| p.matches(src, src)) && a.dst.iter().any(|(p, ports)| ports.contains(port) && p.matches(dst, src)) {
                return Some(a.label.clone());
            }
        }
        if port == SSH_PORT {
            for r in &self.ssh {
                if r.action != Action::Reject && r.matches_nodes(src, dst) {
                    return Some(format!("{} (ssh port)", r.label));
                }
            }
        }
        None
    }
}
