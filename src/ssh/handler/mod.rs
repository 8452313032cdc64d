//! The russh `Handler` for one connection: authentication and channel dispatch.
//!
//! ## How denials are shown
//! SSH has no "why" field in an authentication failure, and russh can only
//! send a USERAUTH_BANNER before the login name is known. So a denied login
//! is *admitted to the protocol* but to nothing else: every session request
//! on it gets the one-line reason on stderr and exit status 1, every forward
//! is refused, and a connection that opens no session (`ssh -N`) is
//! disconnected with the reason. This is the only way the reason reaches
//! both OpenSSH and dropbear users (dbclient ignores disconnect messages).
//! The audit log records the denial at authentication time.
//!
//! ## Live decisions
//! A connection holds the caller's WireGuard key, not a copy of its
//! identity: every new channel is judged on the identity and policy in force
//! now, and a watcher task re-judges the login whenever either changes (see
//! [`watch_live`]). Open sessions and forwards follow the connection's
//! [`Live`] state: a revocation ends them with a message, a new
//! `max_duration` moves their deadline.
//!
//! ## Files
//! - this file: the per-connection state ([`Conn`], [`ConnCtx`], [`Live`]);
//! - `auth`: every authentication method, the policy verdict, `check` prompts;
//! - `channels`: session channel requests (pty, env, window size, signals, data);
//! - `start`: starting a shell, command or subsystem on a session channel;
//! - `forwards`: `direct-tcpip` and the refused forward kinds;
//! - `live`: the watcher that re-judges a login on every change;
//! - `callbacks`: the russh `Handler` impl, which only enters the
//!   connection's span and dispatches to the above.
#![warn(missing_docs)]

mod auth;
mod callbacks;
mod channels;
mod forwards;
mod live;
mod start;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use russh::ChannelId;
use russh::ChannelWriteHalf;
use russh::server::Msg;
use tokio::sync::watch;

use super::account::Account;
use super::audit::{AuditEvent, EventKind};
use super::process::PtyParams;
use super::session::Control;
use super::{SshServer, check, new_id};
use crate::daemon::identity::{Identity, IdentityResolver};
use crate::key::ShortKey;
use crate::policy::{Action, SshDecision};

pub(crate) use auth::deny_message;

/// Session channels one connection may have open at once.
const MAX_SESSIONS: usize = 16;
/// Client `env` requests kept per session.
const MAX_ENV: usize = 64;
/// Forwarded TCP connections one SSH connection may have open at once.
const MAX_FORWARDS: usize = 64;
/// How long a denied login may stay connected without opening a session.
const DENIED_LINGER: Duration = Duration::from_secs(5);

/// How long revoked sessions get to show their message before the
/// connection is dropped.
const REVOKE_GRACE: Duration = Duration::from_secs(1);

/// What every open session and forward of a connection follows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Live {
    /// Set once the login no longer holds: the line shown to the client.
    pub revoked: Option<String>,
    /// The connection's time limit (login time + `max_duration` of the
    /// decision in force), and that duration.
    pub deadline: Option<(Instant, Duration)>,
}

/// Per-connection facts shared with session and forward tasks.
pub(crate) struct ConnCtx {
    pub server: Arc<SshServer>,
    pub conn_id: String,
    peer_key: [u8; 32],
    resolver: Arc<dyn IdentityResolver>,
    /// (caller, target) as last resolved: what audit lines name.
    seen: Mutex<(Identity, Identity)>,
    pub live: watch::Sender<Live>,
    /// The caller passed this connection's `check` (a code or an approval
    /// within the check period): `check` decisions admit it from now on.
    pub(crate) checked: AtomicBool,
}

impl ConnCtx {
    pub(crate) fn event(&self, kind: EventKind) -> AuditEvent {
        let (caller, target) = self.seen();
        AuditEvent::new(kind, &self.conn_id, &caller, &target, SystemTime::now())
    }

    pub(crate) fn seen(&self) -> (Identity, Identity) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The caller and this node as they are now; `None` once the caller's
    /// key has left the tailnet.
    fn refresh(&self) -> Option<(Identity, Identity)> {
        let caller = self.resolver.resolve(&self.peer_key)?;
        let target = (self.server.cfg.self_identity)();
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = (caller.clone(), target.clone());
        Some((caller, target))
    }

    /// Is the login as `acct` accepted by the current identity and policy?
    fn judge(&self, login: &str, acct: &Account) -> Judged {
        if let Some(msg) = self.live.borrow().revoked.clone() {
            return Judged::No(msg, None);
        }
        let Some((caller, target)) = self.refresh() else {
            return Judged::No("tailgate: access denied: your node is no longer on this tailnet".into(), None);
        };
        let policy = self.server.cfg.policy.current();
        let d = if acct.uid == 0 { policy.check_ssh_superuser(&caller, &target, login) } else { policy.check_ssh(&caller, &target, login) };
        let passed = d.action == Action::Check && self.checked.load(Ordering::Acquire);
        if d.action == Action::Accept || passed {
            Judged::Yes(d)
        } else if d.action == Action::Check {
            // A connection admitted before the policy asked for a check: the
            // code is asked at login only.
            Judged::No(format!("tailgate: access denied: {}; log in again to answer it", one_line(&d.reason)), Some(d))
        } else {
            Judged::No(deny_message(&d), Some(d))
        }
    }

    /// May this connection (still) forward to `port` on this node?
    pub(crate) fn forward_allowed(&self, port: u16) -> Result<(), ForwardRefused> {
        if self.live.borrow().revoked.is_some() {
            return Err(ForwardRefused::Revoked);
        }
        let Some((caller, target)) = self.refresh() else {
            return Err(ForwardRefused::CallerGone);
        };
        if self.server.cfg.policy.current().check_network(&caller, &target, port) { Ok(()) } else { Err(ForwardRefused::Port(port)) }
    }
}

/// Why a forward may not (or no longer) run; the text goes to the audit log.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardRefused {
    #[error("login revoked")]
    Revoked,
    #[error("the caller's node is no longer on this tailnet")]
    CallerGone,
    #[error("network policy does not allow port {0}")]
    Port(u16),
}

enum Judged {
    Yes(SshDecision),
    /// The line shown to the user, and the decision if the policy made one.
    No(String, Option<SshDecision>),
}

enum Verdict {
    Admit(Account),
    /// The one line shown to the user.
    Deny(String),
}

struct Login {
    user: String,
    verdict: Verdict,
    at: Instant,
}

/// The connection deadline for a decision's `max_duration`, counted from the login.
fn deadline(at: Instant, max_duration: Option<Duration>) -> Option<(Instant, Duration)> {
    // A limit too large to represent is no limit.
    max_duration.and_then(|d| Some((at.checked_add(d)?, d)))
}

struct SessionChan {
    id: String,
    writer: Option<ChannelWriteHalf<Msg>>,
    pty: Option<PtyParams>,
    env: Vec<(String, String)>,
    started: bool,
    control: Option<Control>,
}

pub(crate) struct Conn {
    ctx: Arc<ConnCtx>,
    login: Option<Login>,
    sessions: HashMap<ChannelId, SessionChan>,
    /// Connection-level timers (time limit, denied-login linger), stopped with the connection.
    timers: Vec<tokio::task::JoinHandle<()>>,
    /// Open forwards (each holds a slot until it ends).
    forwards: Arc<()>,
    /// Set once authentication succeeded (read by the login watchdog in `serve`).
    authenticated: Arc<AtomicBool>,
    /// A `check` login waiting for its verification code.
    pending_check: Option<check::Pending<Account>>,
    /// `ssh_conn{conn, peer, user, login}`: russh runs the callbacks in a task
    /// of its own, so each callback enters this span explicitly.
    span: tracing::Span,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.timers {
            t.abort();
        }
        // Dropping `sessions` ends every session's process group.
    }
}

impl Conn {
    pub(crate) fn new(
        server: Arc<SshServer>,
        peer_key: [u8; 32],
        resolver: Arc<dyn IdentityResolver>,
        caller: Identity,
        target: Identity,
    ) -> Self {
        let conn_id = new_id();
        // Every log line of this connection, and of its sessions and
        // forwards (child spans), carries who is on the other end.
        let span = tracing::info_span!(
            "ssh_conn",
            conn = %conn_id,
            peer = %ShortKey(peer_key),
            user = %caller.who(),
            login = tracing::field::Empty,
        );
        let seen = Mutex::new((caller, target));
        Conn {
            ctx: Arc::new(ConnCtx {
                server,
                conn_id,
                peer_key,
                resolver,
                seen,
                live: watch::Sender::new(Live::default()),
                checked: AtomicBool::new(false),
            }),
            login: None,
            sessions: HashMap::new(),
            timers: Vec::new(),
            forwards: Arc::new(()),
            authenticated: Arc::new(AtomicBool::new(false)),
            pending_check: None,
            span,
        }
    }

    /// The connection's span (`ssh_conn{conn, peer, user}`): `serve` runs the
    /// handshake in it, the russh callbacks enter it.
    pub(crate) fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    pub(crate) fn authenticated_flag(&self) -> Arc<AtomicBool> {
        self.authenticated.clone()
    }
}

/// Keeps a policy-supplied message to one printable line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}
