//! Authentication: every method gets the same answer, the policy decision
//! for (caller, this node, login account); `check` rules add a prompt.
#![warn(missing_docs)]

use std::sync::atomic::Ordering;
use std::time::Instant;

use russh::Disconnect;
use russh::server::Auth;
use tracing::Instrument;

use super::{Conn, DENIED_LINGER, Judged, Login, Verdict, deadline, live, one_line};
use crate::policy::{Action, SshDecision};
use crate::ssh::account::{self, Account};
use crate::ssh::audit::EventKind;
use crate::ssh::check;

pub(crate) fn deny_message(d: &SshDecision) -> String {
    let reason = one_line(&d.reason);
    let rule = d.rule.as_deref().map(|r| format!("policy rule {r}"));
    match d.action {
        Action::Check if reason.is_empty() => format!(
            "tailgate: access denied: {} requires a check, which this node cannot perform: it has no control server to verify a code",
            rule.unwrap_or_else(|| "the policy".into())
        ),
        Action::Check => {
            format!("tailgate: access denied: {reason}; this node cannot perform that check: it has no control server to verify a code")
        }
        _ if reason.is_empty() => match rule {
            Some(r) => format!("tailgate: access denied by {r}"),
            None => "tailgate: access denied: no policy rule allows this login (default deny)".into(),
        },
        _ => format!("tailgate: access denied: {reason}"),
    }
}

/// When tailgate is not root it cannot switch users: only its own account
/// can be logged into.
fn unprivileged_denial(euid: u32, acct: &Account, me: &str, node: &str) -> Option<String> {
    (euid != 0 && acct.uid != euid).then(|| {
        format!(
            "tailgate: access denied: tailgate on {node} runs unprivileged as {me:?}, so it can only log you in as {me:?}, not {:?}",
            acct.name
        )
    })
}

impl Conn {
    /// The answer to every authentication method: the identity decides.
    /// `keyboard_interactive`: the method can carry a `check` prompt.
    pub(super) async fn authenticate(&mut self, user: &str, keyboard_interactive: bool) -> Result<Auth, russh::Error> {
        if self.login.as_ref().is_some_and(|l| l.user == user) {
            return Ok(Auth::Accept);
        }
        if let Some(p) = self.pending_check.as_ref().filter(|p| p.user == user) {
            return Ok(check::prompt(p, keyboard_interactive));
        }
        let at = Instant::now();
        let (verdict, decision) = self.admit(user).await;
        if let (Verdict::Admit(acct), Some(d)) = (&verdict, &decision)
            && d.action == Action::Check
            && !self.ctx.checked.load(Ordering::Acquire)
        {
            match check::precheck(&self.ctx, d, user).await {
                check::Pre::Approved => {}
                check::Pre::Deny(msg) => return Ok(self.conclude(user, at, Verdict::Deny(msg), decision)),
                check::Pre::Prompt(who) => {
                    let p = check::Pending { user: user.to_string(), account: acct.clone(), decision: d.clone(), at, who };
                    let auth = check::prompt(&p, keyboard_interactive);
                    self.pending_check = Some(p);
                    return Ok(auth);
                }
            }
        }
        Ok(self.conclude(user, at, verdict, decision))
    }

    /// The code typed at the `check` prompt.
    pub(super) async fn check_answer(&mut self, p: check::Pending<Account>, code: String) -> Auth {
        let verdict = match check::verify(&self.ctx, &p.decision, &p.user, code).await {
            Ok(()) => Verdict::Admit(p.account),
            Err(e) => Verdict::Deny(e.to_string()),
        };
        self.conclude(&p.user, p.at, verdict, Some(p.decision))
    }

    /// Records the login's outcome; a denied login is admitted to the
    /// protocol only (see the module docs).
    fn conclude(&mut self, user: &str, at: Instant, verdict: Verdict, decision: Option<SshDecision>) -> Auth {
        let mut ev = self.ctx.event(EventKind::Auth);
        match &decision {
            Some(d) => ev = ev.decision(user, d),
            // Refused before the policy ran; the name may be anything the client sent.
            None => ev.login = Some(user.chars().take(64).collect()),
        }
        match &verdict {
            Verdict::Admit(_) => ev.allowed = Some(true),
            Verdict::Deny(msg) => {
                ev.allowed = Some(false);
                ev.reason = Some(msg.trim_start_matches("tailgate: ").to_string());
            }
        }
        self.ctx.server.audit.write(&ev);
        // Debug-formatted: a refused name is whatever the client sent.
        self.span.record("login", tracing::field::debug(user.chars().take(64).collect::<String>()));
        match &verdict {
            Verdict::Admit(_) => tracing::debug!(rule = ev.rule.as_deref(), "login admitted"),
            Verdict::Deny(msg) => tracing::debug!("login denied: {msg}"),
        }
        let limit = match (&verdict, &decision) {
            (Verdict::Admit(_), Some(d)) => deadline(at, d.max_duration),
            _ => None,
        };
        self.ctx.live.send_modify(|l| l.deadline = limit);
        self.login = Some(Login { user: user.to_string(), verdict, at });
        Auth::Accept
    }

    /// The login name is resolved to its local account first, so that the
    /// policy judges the account (uid 0 is root under any name).
    async fn admit(&self, user: &str) -> (Verdict, Option<SshDecision>) {
        let node = self.ctx.seen().1.node_name;
        if !account::valid_login_name(user) {
            let shown: String = user.chars().take(64).collect();
            return (
                Verdict::Deny(format!(
                    "tailgate: access denied: {shown:?} is not a valid login name (lower-case letters, digits, '_', '.', '-'; \
                     starting with a letter or '_'; at most 32 characters)"
                )),
                None,
            );
        }
        let name = user.to_string();
        // getpwnam may consult NSS (LDAP, sssd): keep it off the async workers.
        let acct = match tokio::task::spawn_blocking(move || account::lookup(&name)).await {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => return (Verdict::Deny(format!("tailgate: access denied: there is no user {user:?} on {node}")), None),
            Ok(Err(e)) => {
                return (Verdict::Deny(format!("tailgate: access denied: cannot look up user {user:?} on {node}: {e}")), None);
            }
            Err(_) => return (Verdict::Deny("tailgate: access denied: internal error looking up the user".into()), None),
        };
        let decision = match self.ctx.judge(user, &acct) {
            Judged::Yes(d) => d,
            // Admitted here; `authenticate` asks for the second factor.
            Judged::No(_, Some(d)) if d.action == Action::Check => d,
            Judged::No(msg, d) => return (Verdict::Deny(msg), d),
        };
        let euid = nix::unistd::geteuid().as_raw();
        let me = if euid == 0 { String::new() } else { account::current_user_name().unwrap_or_else(|| format!("uid {euid}")) };
        match unprivileged_denial(euid, &acct, &me, &node) {
            Some(msg) => (Verdict::Deny(msg), Some(decision)),
            None => (Verdict::Admit(acct), Some(decision)),
        }
    }

    /// After authentication: a denied login gets a disconnect timer (for
    /// `ssh -N`, which opens no session to print the reason on), an admitted
    /// one the watcher that keeps it true to policy and identity.
    pub(super) fn succeeded(&mut self, handle: russh::server::Handle) {
        let Some(login) = self.login.as_ref() else {
            return;
        };
        if let Verdict::Deny(msg) = &login.verdict {
            // OpenSSH shows a disconnect message.
            let msg = msg.clone();
            self.timers.push(tokio::spawn(async move {
                tokio::time::sleep(DENIED_LINGER).await;
                let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
            }));
        } else if let Verdict::Admit(acct) = &login.verdict {
            let watcher = live::watch_live(self.ctx.clone(), login.user.clone(), acct.clone(), login.at, handle);
            self.timers.push(tokio::spawn(watcher.instrument(self.span.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn decision(action: Action, rule: Option<&str>, reason: &str) -> SshDecision {
        SshDecision {
            action,
            rule: rule.map(String::from),
            reason: reason.into(),
            record: false,
            record_required: false,
            max_duration: None,
            accept_env: vec![],
            check_period: Default::default(),
        }
    }

    #[test]
    fn denial_messages_are_one_line_and_name_the_cause() {
        let m = deny_message(&decision(Action::Reject, None, "no ssh rule allows a to log in to b as c"));
        assert_eq!(m, "tailgate: access denied: no ssh rule allows a to log in to b as c");
        let m = deny_message(&decision(Action::Reject, Some("ssh[2] at p.toml:9"), ""));
        assert_eq!(m, "tailgate: access denied by policy rule ssh[2] at p.toml:9");
        let m = deny_message(&decision(Action::Check, Some("ssh[1]"), "ssh[1] requires a check\nbefore x"));
        assert_eq!(
            m,
            "tailgate: access denied: ssh[1] requires a check before x; this node cannot perform that check: it has no control server to verify a code"
        );
        let m = deny_message(&decision(Action::Check, Some("ssh[1]"), ""));
        assert!(m.contains("policy rule ssh[1] requires a check") && m.contains("cannot perform"));
        let m = deny_message(&decision(Action::Reject, None, "\x1b[31mred\r\n"));
        assert!(!m.chars().any(|c| c.is_control()), "{m:?}");
    }

    #[test]
    fn unprivileged_server_only_logs_in_its_own_user() {
        let acct =
            |name: &str, uid| Account { name: name.into(), uid, gid: uid, home: "/".into(), shell: "/bin/sh".into(), groups: vec![] };
        assert_eq!(unprivileged_denial(0, &acct("bob", 1001), "", "web1"), None);
        assert_eq!(unprivileged_denial(1000, &acct("me", 1000), "me", "web1"), None);
        let m = unprivileged_denial(1000, &acct("root", 0), "me", "web1").unwrap();
        assert_eq!(
            m,
            "tailgate: access denied: tailgate on web1 runs unprivileged as \"me\", so it can only log you in as \"me\", not \"root\""
        );
    }
}
