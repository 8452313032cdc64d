//! `check` rules: a second factor asked for in the SSH conversation.
//!
//! When the policy's decision is `check`, the handler asks the control
//! server (over the node's control connection, [`CheckLink`]) whether the
//! caller's user has a recent enough approval from the caller's node; if
//! not, it prompts through keyboard-interactive ("Verification code for
//! alice@example.com: ") and has control verify the answer. Codes, secrets,
//! approvals and lockouts all live on control; this node only relays.
//! Without a control server (static mode) or while it is unreachable, a
//! `check` login is denied with the reason.
#![warn(missing_docs)]

use crate::key::Key;
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use russh::server::Auth;
use russh::{MethodKind, MethodSet};

use super::audit::EventKind;
use super::handler::ConnCtx;
use crate::control::wire::proto::CheckOutcome;
use crate::control::{CheckAnswer, CheckHandle};
use crate::daemon::identity::Identity;
use crate::dataplane::wg;
use crate::policy::{CheckPeriod, SshDecision};

/// How long a login waits for control's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer to the prompt that is passed on (a code is 6 digits).
const MAX_CODE: usize = 64;

enum LinkState {
    /// No control server (wg-quick config): nobody can verify.
    Static,
    /// Control mode, no connection right now; why.
    Down(String),
    Up(CheckHandle),
}

/// Where this node's SSH server sends check requests. The agent points it
/// at each new control connection.
#[derive(Clone)]
pub(crate) struct CheckLink(Arc<RwLock<LinkState>>);

impl Default for CheckLink {
    fn default() -> Self {
        CheckLink(Arc::new(RwLock::new(LinkState::Static)))
    }
}

impl CheckLink {
    pub(crate) fn set_connected(&self, h: CheckHandle) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = LinkState::Up(h);
    }

    pub(crate) fn set_disconnected(&self, why: String) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = LinkState::Down(why);
    }

    fn handle(&self) -> Result<CheckHandle, Option<String>> {
        match &*self.0.read().unwrap_or_else(|e| e.into_inner()) {
            LinkState::Static => Err(None),
            LinkState::Down(why) => Err(Some(why.clone())),
            LinkState::Up(h) => Ok(h.clone()),
        }
    }
}

/// What the audit line calls a check outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Passed,
    Cached,
    Failed,
    Lockout,
    /// Not enrolled, tagged source, no control server, ...
    Refused,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Passed => "passed",
            Kind::Cached => "cached",
            Kind::Failed => "failed",
            Kind::Lockout => "lockout",
            Kind::Refused => "unavailable",
        }
    }
}

pub(crate) enum Pre {
    /// An approval within the check period: admit without a prompt.
    Approved,
    /// Ask for a code; the prompt names this user.
    Prompt(String),
    /// The line shown to the user.
    Deny(String),
}

/// A login waiting for its code.
pub(crate) struct Pending<A> {
    pub user: String,
    pub account: A,
    pub decision: SshDecision,
    pub at: std::time::Instant,
    /// Who the prompt names (the tailnet user).
    pub who: String,
}

fn source_key(caller: &Identity) -> Option<Key> {
    wg::key_from_base64(&caller.node_key).ok()
}

/// Why a `check` login is refused; the text is the line the user sees.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckDenied {
    /// Static mode: no control server to verify a code (the policy's denial).
    #[error("{0}")]
    NoControl(String),
    #[error(
        "tailgate: access denied: {} needs a verification code, but this node cannot reach the control server to check it ({why}); \
         try again when it is back",
        rule.as_deref().map_or("the policy".into(), |r| format!("policy rule {r}"))
    )]
    Unreachable { rule: Option<String>, why: String },
    #[error("tailgate: access denied: your node's key is not valid")]
    BadKey,
    /// Control's answer (wrong code, locked out, ...), control characters removed.
    #[error("tailgate: access denied: {0}")]
    Refused(String),
}

fn unreachable(d: &SshDecision, why: String) -> CheckDenied {
    CheckDenied::Unreachable { rule: d.rule.clone(), why }
}

async fn ask(link: &CheckLink, d: &SshDecision, caller: &Identity, code: Option<String>) -> Result<CheckAnswer, CheckDenied> {
    let h = match link.handle() {
        Ok(h) => h,
        Err(None) => return Err(CheckDenied::NoControl(super::handler::deny_message(d))),
        Err(Some(why)) => return Err(unreachable(d, why)),
    };
    let Some(source) = source_key(caller) else {
        return Err(CheckDenied::BadKey);
    };
    let max_age = match d.check_period {
        CheckPeriod::Always => None,
        CheckPeriod::For(p) => Some(p),
    };
    h.check(source, code, max_age, CHECK_TIMEOUT).await.map_err(|e| unreachable(d, e.to_string()))
}

/// Before prompting: a cached approval (the connection is then checked), a
/// prompt, or a denial with its reason. Audits all but the prompt.
pub(crate) async fn precheck(ctx: &ConnCtx, d: &SshDecision, login: &str) -> Pre {
    let caller = ctx.seen().0;
    let (pre, kind) = match ask(&ctx.server.check, d, &caller, None).await {
        Err(e) => (Pre::Deny(e.to_string()), Kind::Refused),
        Ok(a) => match a.outcome {
            CheckOutcome::Approved => (Pre::Approved, Kind::Cached),
            CheckOutcome::CodeNeeded => return Pre::Prompt(if a.user.is_empty() { caller.who() } else { a.user }),
            other => (Pre::Deny(denial(&a.message).to_string()), kind_of(other)),
        },
    };
    match &pre {
        Pre::Deny(msg) => audit(ctx, login, kind, Some(msg)),
        _ => {
            ctx.checked.store(true, Ordering::Release);
            audit(ctx, login, kind, None);
        }
    }
    pre
}

/// Verifies the code typed at the prompt: `Ok` = passed (the connection is
/// then checked), else the line shown to the user. Audited either way.
pub(crate) async fn verify(ctx: &ConnCtx, d: &SshDecision, login: &str, code: String) -> Result<(), CheckDenied> {
    let caller = ctx.seen().0;
    let (res, kind) = match ask(&ctx.server.check, d, &caller, Some(code)).await {
        Err(msg) => (Err(msg), Kind::Refused),
        Ok(a) if a.outcome == CheckOutcome::Approved => (Ok(()), Kind::Passed),
        Ok(a) => (Err(denial(&a.message)), kind_of(a.outcome)),
    };
    match &res {
        Ok(()) => {
            ctx.checked.store(true, Ordering::Release);
            audit(ctx, login, kind, None);
        }
        Err(e) => audit(ctx, login, kind, Some(&e.to_string())),
    }
    res
}

fn audit(ctx: &ConnCtx, login: &str, kind: Kind, why: Option<&str>) {
    let mut ev = ctx.event(EventKind::Check);
    ev.login = Some(login.to_string());
    ev.kind = Some(kind.as_str().into());
    ev.allowed = Some(matches!(kind, Kind::Passed | Kind::Cached));
    ev.reason = why.map(|m| m.trim_start_matches("tailgate: ").to_string());
    ctx.server.audit.write(&ev);
}

fn kind_of(o: CheckOutcome) -> Kind {
    match o {
        CheckOutcome::WrongCode => Kind::Failed,
        CheckOutcome::LockedOut => Kind::Lockout,
        _ => Kind::Refused,
    }
}

fn denial(message: &str) -> CheckDenied {
    CheckDenied::Refused(message.chars().filter(|c| !c.is_control()).take(300).collect())
}

/// The first answer of a keyboard-interactive response, as text.
pub(crate) fn code_from(mut answers: impl Iterator<Item = bytes::Bytes>) -> String {
    let a = answers.next().unwrap_or_default();
    String::from_utf8_lossy(&a[..a.len().min(MAX_CODE)]).trim().to_string()
}

/// The answer to an authentication attempt while a code is due: the prompt
/// for keyboard-interactive, for any other method "use keyboard-interactive".
pub(crate) fn prompt<A>(p: &Pending<A>, keyboard_interactive: bool) -> Auth {
    if keyboard_interactive {
        Auth::Partial {
            name: Cow::Borrowed("tailgate check"),
            instructions: Cow::Borrowed(""),
            prompts: Cow::Owned(vec![(Cow::Owned(format!("Verification code for {}: ", p.who)), false)]),
        }
    } else {
        Auth::Reject { proceed_with_methods: Some(MethodSet::from(&[MethodKind::KeyboardInteractive][..])), partial_success: false }
    }
}
