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

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, Disconnect, Pty, Sig};
use tokio::sync::watch;

use super::account::{self, Account, LoginEnv};
use super::audit::{AuditEvent, EventKind};
use super::process::{self, PtyParams, SpawnSpec};
use super::recording::{CastHeader, Recorder};
use super::session::{self, Control};
use super::{SshServer, check, forward, new_id};
use crate::daemon::identity::{Identity, IdentityResolver};
use crate::policy::{Action, SshDecision};

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
    pub(crate) fn forward_allowed(&self, port: u16) -> Result<(), String> {
        if self.live.borrow().revoked.is_some() {
            return Err("login revoked".into());
        }
        let Some((caller, target)) = self.refresh() else {
            return Err("the caller's node is no longer on this tailnet".into());
        };
        if self.server.cfg.policy.current().check_network(&caller, &target, port) {
            Ok(())
        } else {
            Err(format!("network policy does not allow port {port}"))
        }
    }
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
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.timers {
            t.abort();
        }
        // Dropping `sessions` ends every session's process group.
    }
}

enum Request<'a> {
    Shell,
    Exec(&'a [u8]),
    Subsystem(&'a str),
}

impl Request<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Request::Shell => "shell",
            Request::Exec(_) => "exec",
            Request::Subsystem(_) => "subsystem",
        }
    }
    fn command(&self) -> Option<String> {
        match self {
            Request::Shell => None,
            Request::Exec(c) => Some(String::from_utf8_lossy(c).into_owned()),
            Request::Subsystem(n) => Some(n.to_string()),
        }
    }
}

/// Keeps a policy-supplied message to one printable line.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}

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
    pub(crate) fn new(
        server: Arc<SshServer>,
        peer_key: [u8; 32],
        resolver: Arc<dyn IdentityResolver>,
        caller: Identity,
        target: Identity,
    ) -> Self {
        let seen = Mutex::new((caller, target));
        Conn {
            ctx: Arc::new(ConnCtx {
                server,
                conn_id: new_id(),
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
        }
    }

    pub(crate) fn conn_id(&self) -> &str {
        &self.ctx.conn_id
    }

    pub(crate) fn authenticated_flag(&self) -> Arc<AtomicBool> {
        self.authenticated.clone()
    }

    /// The answer to every authentication method: the identity decides.
    /// `keyboard_interactive`: the method can carry a `check` prompt.
    async fn authenticate(&mut self, user: &str, keyboard_interactive: bool) -> Result<Auth, russh::Error> {
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
    async fn check_answer(&mut self, p: check::Pending<Account>, code: String) -> Auth {
        let verdict = match check::verify(&self.ctx, &p.decision, &p.user, code).await {
            Ok(()) => Verdict::Admit(p.account),
            Err(msg) => Verdict::Deny(msg),
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

    fn refuse_forward(&self, kind: &str, dest: Option<String>, reason: &str) {
        let mut ev = self.ctx.event(EventKind::Forward);
        ev.login = self.login.as_ref().map(|l| l.user.clone());
        ev.kind = Some(kind.into());
        ev.dest = dest;
        ev.allowed = Some(false);
        ev.reason = Some(reason.into());
        self.ctx.server.audit.write(&ev);
    }

    /// Starts a shell, command or subsystem on a session channel.
    async fn start(&mut self, channel: ChannelId, req: Request<'_>, session: &mut Session) -> Result<(), russh::Error> {
        let Some(login) = self.login.as_ref() else {
            return session.channel_failure(channel);
        };
        let ctx = self.ctx.clone();
        let Some(sc) = self.sessions.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if sc.started {
            return session.channel_failure(channel);
        }
        sc.started = true;

        let mut ev = ctx.event(EventKind::SessionDenied);
        ev.session = Some(sc.id.clone());
        ev.login = Some(login.user.clone());
        ev.kind = Some(req.kind().into());
        ev.command = req.command();
        ev.pty = Some(sc.pty.is_some());

        // Judge on the identity and policy in force now, not at login.
        let admitted = match &login.verdict {
            Verdict::Deny(msg) => Err(msg.clone()),
            Verdict::Admit(acct) => {
                let judged = ctx.judge(&login.user, acct);
                let d = match &judged {
                    Judged::Yes(d) | Judged::No(_, Some(d)) => Some(d),
                    Judged::No(_, None) => None,
                };
                ev.rule = d.and_then(|d| d.rule.clone());
                ev.action = d.map(|d| d.action);
                match judged {
                    Judged::Yes(d) => Ok((acct.clone(), d)),
                    Judged::No(msg, _) => Err(msg),
                }
            }
        };
        let (acct, decision) = match admitted {
            Ok(x) => x,
            Err(msg) => {
                ev.reason = Some(msg.trim_start_matches("tailgate: ").to_string());
                ctx.server.audit.write(&ev);
                session.channel_success(channel)?;
                if let Some(w) = sc.writer.take() {
                    tokio::spawn(report_denial(w, msg, sc.pty.is_some()));
                }
                return Ok(());
            }
        };

        let (program, arg0, args) = match &req {
            Request::Shell => (acct.shell.clone(), login_arg0(&acct.shell), vec![]),
            Request::Exec(cmd) => {
                (acct.shell.clone(), base_name(&acct.shell), vec![OsString::from("-c"), OsString::from_vec(cmd.to_vec())])
            }
            // As sshd does: the subsystem command goes through the account's
            // shell, so an account whose shell is nologin or false gets no sftp.
            Request::Subsystem("sftp") => match &ctx.server.sftp_server {
                Some(p) => (acct.shell.clone(), base_name(&acct.shell), vec![OsString::from("-c"), sh_quote(p)]),
                None => {
                    ev.reason = Some("no sftp-server binary on this node".into());
                    ctx.server.audit.write(&ev);
                    return session.channel_failure(channel);
                }
            },
            Request::Subsystem(other) => {
                ev.reason = Some(format!("unknown subsystem {other:?}"));
                ctx.server.audit.write(&ev);
                return session.channel_failure(channel);
            }
        };

        let (caller, target) = ctx.seen();
        let env = account::login_env(&LoginEnv {
            account: &acct,
            caller: &caller,
            target: &target,
            term: sc.pty.as_ref().map(|p| p.term.as_str()),
            tty: None,
            client: &sc.env,
        });

        // Recording is part of the access decision: if it cannot be made, the
        // session does not happen. Subsystems (sftp) speak a binary protocol
        // that a terminal recording cannot represent; the audit log covers them.
        // `record = "required"` fails closed: without a control server to take
        // the recording there is no session (static mode never has one).
        if decision.record_required && !ctx.server.journal().shared.connected.load(std::sync::atomic::Ordering::Acquire) {
            let msg = "tailgate: access denied: this session must be recorded on the control server, which this node cannot \
                       reach now; try again when it is back"
                .to_string();
            ev.reason = Some("recording required but the control server is unreachable".into());
            ctx.server.audit.write(&ev);
            session.channel_success(channel)?;
            if let Some(w) = sc.writer.take() {
                tokio::spawn(report_denial(w, msg, sc.pty.is_some()));
            }
            return Ok(());
        }
        let recorder = if (decision.record || decision.record_required) && !matches!(req, Request::Subsystem(_)) {
            let (w, h) = sc.pty.as_ref().map(|p| (p.cols, p.rows)).unwrap_or((80, 24));
            let mut header = CastHeader::new(w, h, SystemTime::now());
            header.command = Some(req.command().unwrap_or_else(|| acct.shell.display().to_string()));
            header.title = Some(format!("{}@{} as {} on {}", caller.who(), caller.node_name, login.user, target.node_name));
            if let Some(p) = &sc.pty {
                header.env.insert("TERM".into(), p.term.clone());
            }
            header.env.insert("SHELL".into(), acct.shell.display().to_string());
            match Recorder::create(ctx.server.journal(), &sc.id, &header).await {
                Ok(mut r) => {
                    r.required = decision.record_required;
                    Some(Arc::new(Mutex::new(r)))
                }
                Err(e) => {
                    tracing::error!("cannot record session {}: {e}", sc.id);
                    let msg = "tailgate: access denied: this session must be recorded, but recording failed on this node".to_string();
                    ev.reason = Some(format!("recording failed: {e}"));
                    ctx.server.audit.write(&ev);
                    session.channel_success(channel)?;
                    if let Some(w) = sc.writer.take() {
                        tokio::spawn(report_denial(w, msg, sc.pty.is_some()));
                    }
                    return Ok(());
                }
            }
        } else {
            None
        };

        let switch_user = nix::unistd::geteuid().is_root();
        let spawned = process::spawn(SpawnSpec {
            program: program.clone(),
            arg0,
            args,
            env,
            account: acct.clone(),
            pty: sc.pty.clone(),
            switch_user,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("session {}: {e}", sc.id);
                if let Some(r) = &recorder {
                    let _ = std::fs::remove_file(r.lock().unwrap_or_else(|e| e.into_inner()).path());
                }
                ev.reason = Some(e.to_string());
                ctx.server.audit.write(&ev);
                return session.channel_failure(channel);
            }
        };
        let Some(writer) = sc.writer.take() else {
            return session.channel_failure(channel);
        };
        session.channel_success(channel)?;

        let mut start = ctx.event(EventKind::SessionStart);
        start.session = Some(sc.id.clone());
        start.login = Some(login.user.clone());
        start.rule = decision.rule.clone();
        start.action = Some(decision.action);
        start.allowed = Some(true);
        start.kind = Some(req.kind().into());
        start.command = Some(req.command().unwrap_or_else(|| program.display().to_string()));
        start.pty = Some(sc.pty.is_some());
        start.term = sc.pty.as_ref().map(|p| p.term.clone());
        if !sc.env.is_empty() {
            start.env = Some(sc.env.iter().map(|(k, _)| k.clone()).collect());
        }
        start.recording = recorder.as_ref().map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).path().display().to_string());
        ctx.server.audit.write(&start);

        let control = session::start(
            spawned,
            session::Running {
                ctx: ctx.clone(),
                session_id: sc.id.clone(),
                login: login.user.clone(),
                kind: req.kind(),
                command: start.command.clone(),
                pty: sc.pty.is_some(),
                channel,
                writer,
                handle: session.handle(),
                live: ctx.live.subscribe(),
                recorder,
                started: Instant::now(),
            },
        );
        sc.control = Some(control);
        Ok(())
    }
}

fn base_name(p: &Path) -> OsString {
    p.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| p.as_os_str().to_os_string())
}

/// `path` as one single-quoted shell word (the configured sftp-server path
/// may contain spaces).
fn sh_quote(path: &Path) -> OsString {
    let mut out = vec![b'\''];
    for &b in path.as_os_str().as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

/// `-bash`: the leading dash tells the shell it is a login shell.
fn login_arg0(shell: &Path) -> OsString {
    let mut s = OsString::from("-");
    s.push(base_name(shell));
    s
}

/// Keeps an admitted login true to the identity and policy in force: judges
/// it again on every change of either, moves the time limit when the
/// deciding rule's `max_duration` changes, and on revocation tells every
/// session and forward to end (they show the message), writes an audit line
/// and drops the connection. Also ends the connection at its time limit.
async fn watch_live(ctx: Arc<ConnCtx>, user: String, acct: Account, at: Instant, handle: russh::server::Handle) {
    // Subscribed before the first judgement, so no change can slip in between.
    let mut ids = Some(ctx.resolver.changes());
    let mut policy = Some(ctx.server.cfg.policy.changes());
    let mut first = true;
    loop {
        if !first {
            let limit = ctx.live.borrow().deadline;
            let expired = async {
                match limit {
                    Some((t, _)) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = changed(&mut ids) => if r.is_err() { ids = None },
                r = changed(&mut policy) => if r.is_err() { policy = None },
                _ = expired => {
                    // Sessions end themselves at the limit and say so; this also
                    // ends forwards and idle connections.
                    tokio::time::sleep(REVOKE_GRACE).await;
                    let d = limit.map(|(_, d)| d).unwrap_or_default();
                    let msg = format!("tailgate: session time limit ({}) reached", session::human_duration(d));
                    let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
                    return;
                }
            }
        }
        first = false;
        match ctx.judge(&user, &acct) {
            Judged::Yes(d) => {
                let limit = deadline(at, d.max_duration);
                // Always notify: forwards re-check their port on every change.
                ctx.live.send_modify(|l| l.deadline = limit);
            }
            Judged::No(msg, d) => {
                let why = msg.strip_prefix("tailgate: access denied: ").unwrap_or_else(|| msg.trim_start_matches("tailgate: "));
                let msg = format!("tailgate: access revoked (the policy or your identity changed): {why}");
                let mut ev = ctx.event(EventKind::Revoked);
                ev.login = Some(user.clone());
                ev.rule = d.as_ref().and_then(|d| d.rule.clone());
                ev.action = d.as_ref().map(|d| d.action);
                ev.allowed = Some(false);
                ev.reason = Some(msg.trim_start_matches("tailgate: ").to_string());
                ctx.server.audit.write(&ev);
                ctx.live.send_modify(|l| l.revoked = Some(msg.clone()));
                tokio::time::sleep(REVOKE_GRACE).await;
                let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
                return;
            }
        }
    }
}

/// `rx.changed()`, or never once the sender is gone.
async fn changed(rx: &mut Option<watch::Receiver<u64>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

async fn report_denial(w: ChannelWriteHalf<Msg>, msg: String, pty: bool) {
    let line = if pty { format!("{msg}\r\n") } else { format!("{msg}\n") };
    let _ = w.extended_data_bytes(1, Bytes::from(line)).await;
    let _ = w.exit_status(1).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.authenticate(user, false).await
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The password is neither checked nor logged: identity comes from the tailnet.
        self.authenticate(user, false).await
    }

    async fn auth_publickey_offered(&mut self, _user: &str, _offer: russh::server::PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(&mut self, user: &str, _key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        self.authenticate(user, false).await
    }

    async fn auth_openssh_certificate(&mut self, user: &str, _c: &russh::keys::Certificate) -> Result<Auth, Self::Error> {
        self.authenticate(user, false).await
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if let Some(answers) = response
            && self.pending_check.as_ref().is_some_and(|p| p.user == user)
            && let Some(p) = self.pending_check.take()
        {
            return Ok(self.check_answer(p, check::code_from(answers)).await);
        }
        self.authenticate(user, true).await
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::Release);
        let Some(login) = self.login.as_ref() else {
            return Ok(());
        };
        let handle = session.handle();
        if let Verdict::Deny(msg) = &login.verdict {
            // `ssh -N` opens no session to print the reason on; OpenSSH shows a
            // disconnect message instead.
            let msg = msg.clone();
            self.timers.push(tokio::spawn(async move {
                tokio::time::sleep(DENIED_LINGER).await;
                let _ = handle.disconnect(Disconnect::ByApplication, msg, "en".into()).await;
            }));
        } else if let Verdict::Admit(acct) = &login.verdict {
            self.timers.push(tokio::spawn(watch_live(self.ctx.clone(), login.user.clone(), acct.clone(), login.at, handle)));
        }
        Ok(())
    }

    async fn channel_open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle, _s: &mut Session) -> Result<(), Self::Error> {
        if self.login.is_none() || self.sessions.len() >= MAX_SESSIONS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        // Requests and data reach us through the handler callbacks; the read
        // half would only duplicate them (and block russh once full).
        let (_read, writer) = channel.split();
        self.sessions
            .insert(id, SessionChan { id: new_id(), writer: Some(writer), pty: None, env: Vec::new(), started: false, control: None });
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _orig_addr: &str,
        _orig_port: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        let dest_label = format!("{host}:{port}");
        let Some(login) = &self.login else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let acct = match &login.verdict {
            Verdict::Deny(_) => {
                self.refuse_forward("direct-tcpip", Some(dest_label), "login denied");
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                return Ok(());
            }
            Verdict::Admit(acct) => acct,
        };
        if let Judged::No(msg, _) = self.ctx.judge(&login.user, acct) {
            self.refuse_forward("direct-tcpip", Some(dest_label), msg.trim_start_matches("tailgate: "));
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        let Some(dest) = forward::local_destination(host, port, self.ctx.seen().1.ip) else {
            self.refuse_forward("direct-tcpip", Some(dest_label), "only ports on this node can be forwarded");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let allowed = self.ctx.forward_allowed(dest.port());
        let (ctx_clone, user) = (self.ctx.clone(), login.user.clone());
        let mut ev = self.ctx.event(EventKind::Forward);
        ev.login = Some(login.user.clone());
        ev.kind = Some("direct-tcpip".into());
        ev.dest = Some(dest_label);
        ev.allowed = Some(allowed.is_ok());
        if let Err(why) = allowed {
            ev.reason = Some(why);
            self.ctx.server.audit.write(&ev);
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        if Arc::strong_count(&self.forwards) > MAX_FORWARDS {
            ev.allowed = Some(false);
            ev.reason = Some(format!("more than {MAX_FORWARDS} forwards open on this connection"));
            self.ctx.server.audit.write(&ev);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.ctx.server.audit.write(&ev);
        let slot = self.forwards.clone();
        tokio::spawn(async move {
            forward::run(ctx_clone, user, channel, reply, dest).await;
            drop(slot);
        });
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _c: Channel<Msg>,
        _a: &str,
        _p: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forward("x11", None, "X11 forwarding is not supported");
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _c: Channel<Msg>,
        _h: &str,
        _p: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _c: Channel<Msg>,
        path: &str,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forward("direct-streamlocal", Some(path.to_string()), "unix socket forwarding is not supported");
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    async fn tcpip_forward(&mut self, address: &str, port: &mut u32, _s: &mut Session) -> Result<bool, Self::Error> {
        self.refuse_forward("tcpip-forward", Some(format!("{address}:{port}")), "remote forwarding is not supported");
        Ok(false)
    }

    async fn streamlocal_forward(&mut self, path: &str, _s: &mut Session) -> Result<bool, Self::Error> {
        self.refuse_forward("streamlocal-forward", Some(path.to_string()), "remote forwarding is not supported");
        Ok(false)
    }

    async fn agent_request(&mut self, _channel: ChannelId, _s: &mut Session) -> Result<bool, Self::Error> {
        self.refuse_forward("agent", None, "agent forwarding is not supported");
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse_forward("x11", None, "X11 forwarding is not supported");
        session.channel_failure(channel)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        px_width: u32,
        px_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.sessions.get_mut(&channel) {
            Some(sc) if !sc.started => {
                let term: String = term.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
                sc.pty = Some(PtyParams { term, cols, rows, px_width, px_height, modes: modes.to_vec() });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(&mut self, channel: ChannelId, name: &str, value: &str, session: &mut Session) -> Result<(), Self::Error> {
        let Some(login) = &self.login else {
            return session.channel_failure(channel);
        };
        let Verdict::Admit(acct) = &login.verdict else {
            return session.channel_failure(channel);
        };
        let ok = account::env_name_acceptable(name)
            && value.len() <= 4096
            && !value.contains('\0')
            && matches!(self.ctx.judge(&login.user, acct), Judged::Yes(d) if d.allows_env(name));
        match self.sessions.get_mut(&channel) {
            Some(sc) if ok && !sc.started && sc.env.len() < MAX_ENV => {
                sc.env.retain(|(k, _)| k != name);
                sc.env.push((name.to_string(), value.to_string()));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, Request::Shell, session).await
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, Request::Exec(data), session).await
    }

    async fn subsystem_request(&mut self, channel: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, Request::Subsystem(name), session).await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        px_width: u32,
        px_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(sc) = self.sessions.get_mut(&channel) {
            if let Some(p) = sc.pty.as_mut() {
                (p.cols, p.rows, p.px_width, p.px_height) = (cols, rows, px_width, px_height);
            }
            if let Some(c) = &sc.control {
                c.resize(cols, rows, px_width, px_height);
            }
            return session.channel_success(channel);
        }
        session.channel_failure(channel)
    }

    async fn signal(&mut self, channel: ChannelId, signal: Sig, _s: &mut Session) -> Result<(), Self::Error> {
        if let (Some(c), Some(n)) = (self.sessions.get(&channel).and_then(|s| s.control.as_ref()), session::sig_number(&signal)) {
            c.signal(n);
        }
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _s: &mut Session) -> Result<(), Self::Error> {
        if let Some(c) = self.sessions.get_mut(&channel).and_then(|s| s.control.as_mut())
            && let Some(q) = &c.stdin
        {
            match q.push(data).await {
                session::Pushed::Queued => {}
                session::Pushed::Closed => c.stdin = None,
                session::Pushed::Overflow => {
                    c.stdin = None;
                    let _ = c.stop.send(Some(session::Stop::Overflow));
                }
            }
        }
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _s: &mut Session) -> Result<(), Self::Error> {
        if let Some(q) = self.sessions.get(&channel).and_then(|s| s.control.as_ref()).and_then(|c| c.stdin.as_ref()) {
            q.eof();
        }
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _s: &mut Session) -> Result<(), Self::Error> {
        // Dropping the session's control ends its process group.
        self.sessions.remove(&channel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn login_shell_argv0() {
        assert_eq!(login_arg0(Path::new("/bin/bash")), OsString::from("-bash"));
        assert_eq!(base_name(Path::new("/usr/bin/zsh")), OsString::from("zsh"));
        assert_eq!(sh_quote(Path::new("/usr/lib/openssh/sftp-server")), OsString::from("'/usr/lib/openssh/sftp-server'"));
        assert_eq!(sh_quote(Path::new("/opt/it's here/sftp")), OsString::from("'/opt/it'\\''s here/sftp'"));
    }
}
