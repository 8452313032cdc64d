//! Starting a shell, command or subsystem on a session channel: the policy
//! judged again, the command line, the recording, the process, the audit.
#![warn(missing_docs)]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use russh::server::{Msg, Session};
use russh::{ChannelId, ChannelWriteHalf};
use tracing::Instrument;

use super::{Conn, ConnCtx, Judged, Login, SessionChan, Verdict};
use crate::policy::SshDecision;
use crate::ssh::account::{self, Account, LoginEnv};
use crate::ssh::audit::{AuditEvent, EventKind};
use crate::ssh::process::{self, SpawnSpec};
use crate::ssh::recording::{CastHeader, Recorder};
use crate::ssh::session;

/// What a session channel asked to run.
pub(super) enum Request<'a> {
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

/// A session that will not run: the line the user sees, and the audit reason.
struct Refusal {
    shown: String,
    reason: String,
}

/// Program, argv[0] and arguments of a session's process.
type CommandLine = (PathBuf, OsString, Vec<OsString>);

type SharedRecorder = Arc<Mutex<Recorder>>;

impl Conn {
    /// Starts a shell, command or subsystem on a session channel.
    pub(super) async fn start(&mut self, channel: ChannelId, req: Request<'_>, session: &mut Session) -> Result<(), russh::Error> {
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
        let span = tracing::info_span!("session", session = %sc.id, kind = req.kind());

        let mut ev = ctx.event(EventKind::SessionDenied);
        ev.session = Some(sc.id.clone());
        ev.login = Some(login.user.clone());
        ev.kind = Some(req.kind().into());
        ev.command = req.command();
        ev.pty = Some(sc.pty.is_some());

        let (acct, decision) = match judge_session(&ctx, login, &mut ev) {
            Ok(x) => x,
            Err(msg) => {
                let reason = msg.trim_start_matches("tailgate: ").to_string();
                return refuse(&ctx, sc, ev, Refusal { shown: msg, reason }, channel, session);
            }
        };
        let Some((program, arg0, args)) = command_line(&ctx, &acct, &req, &mut ev) else {
            ctx.server.audit.write(&ev);
            return session.channel_failure(channel);
        };
        let recorder = match record(&ctx, sc, login, &acct, &decision, &req).instrument(span.clone()).await {
            Ok(r) => r,
            Err(refusal) => return refuse(&ctx, sc, ev, refusal, channel, session),
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
        let spec = SpawnSpec {
            program: program.clone(),
            arg0,
            args,
            env,
            account: acct.clone(),
            pty: sc.pty.clone(),
            switch_user: nix::unistd::geteuid().is_root(),
        };
        let spawned = match process::spawn(spec) {
            Ok(s) => s,
            Err(e) => {
                span.in_scope(|| tracing::warn!("cannot start the session: {e}"));
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

        let start = started_event(&ctx, sc, login, &decision, &req, &program, recorder.as_ref());
        ctx.server.audit.write(&start);
        span.in_scope(|| tracing::debug!(command = start.command.as_deref(), "session started"));

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
                span,
            },
        );
        sc.control = Some(control);
        Ok(())
    }
}

/// Judges the login on the identity and policy in force now, not at login;
/// notes the deciding rule in `ev`. `Err`: the line shown to the user.
fn judge_session(ctx: &ConnCtx, login: &Login, ev: &mut AuditEvent) -> Result<(Account, SshDecision), String> {
    match &login.verdict {
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
    }
}

/// The process to run for `req`; `None` (with the reason in `ev`) for a
/// subsystem this node cannot serve.
fn command_line(ctx: &ConnCtx, acct: &Account, req: &Request<'_>, ev: &mut AuditEvent) -> Option<CommandLine> {
    let shell = acct.shell.clone();
    match req {
        Request::Shell => Some((shell.clone(), login_arg0(&shell), vec![])),
        Request::Exec(cmd) => Some((shell.clone(), base_name(&shell), vec![OsString::from("-c"), OsString::from_vec(cmd.to_vec())])),
        // As sshd does: the subsystem command goes through the account's
        // shell, so an account whose shell is nologin or false gets no sftp.
        Request::Subsystem("sftp") => match &ctx.server.sftp_server {
            Some(p) => Some((shell.clone(), base_name(&shell), vec![OsString::from("-c"), sh_quote(p)])),
            None => {
                ev.reason = Some("no sftp-server binary on this node".into());
                None
            }
        },
        Request::Subsystem(other) => {
            ev.reason = Some(format!("unknown subsystem {other:?}"));
            None
        }
    }
}

/// The session's recorder, if the decision asks for one.
///
/// Recording is part of the access decision: if it cannot be made, the
/// session does not happen. Subsystems (sftp) speak a binary protocol that a
/// terminal recording cannot represent; the audit log covers them.
/// `record = "required"` fails closed: without a control server to take the
/// recording there is no session (static mode never has one).
async fn record(
    ctx: &ConnCtx,
    sc: &SessionChan,
    login: &Login,
    acct: &Account,
    decision: &SshDecision,
    req: &Request<'_>,
) -> Result<Option<SharedRecorder>, Refusal> {
    if decision.record_required && !ctx.server.journal().shared.connected.load(std::sync::atomic::Ordering::Acquire) {
        return Err(Refusal {
            shown: "tailgate: access denied: this session must be recorded on the control server, which this node cannot \
                    reach now; try again when it is back"
                .into(),
            reason: "recording required but the control server is unreachable".into(),
        });
    }
    if !(decision.record || decision.record_required) || matches!(req, Request::Subsystem(_)) {
        return Ok(None);
    }
    let (caller, target) = ctx.seen();
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
            Ok(Some(Arc::new(Mutex::new(r))))
        }
        Err(e) => {
            tracing::error!("cannot record the session: {e}");
            Err(Refusal {
                shown: "tailgate: access denied: this session must be recorded, but recording failed on this node".into(),
                reason: format!("recording failed: {e}"),
            })
        }
    }
}

/// Audits a refused session and shows the user why on its channel.
fn refuse(
    ctx: &ConnCtx,
    sc: &mut SessionChan,
    mut ev: AuditEvent,
    refusal: Refusal,
    channel: ChannelId,
    session: &mut Session,
) -> Result<(), russh::Error> {
    ev.reason = Some(refusal.reason);
    ctx.server.audit.write(&ev);
    session.channel_success(channel)?;
    if let Some(w) = sc.writer.take() {
        tokio::spawn(report_denial(w, refusal.shown, sc.pty.is_some()));
    }
    Ok(())
}

/// The `session_start` audit event.
fn started_event(
    ctx: &ConnCtx,
    sc: &SessionChan,
    login: &Login,
    decision: &SshDecision,
    req: &Request<'_>,
    program: &Path,
    recorder: Option<&SharedRecorder>,
) -> AuditEvent {
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
    start.recording = recorder.map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).path().display().to_string());
    start
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

pub(super) async fn report_denial(w: ChannelWriteHalf<Msg>, msg: String, pty: bool) {
    let line = if pty { format!("{msg}\r\n") } else { format!("{msg}\n") };
    let _ = w.extended_data_bytes(1, Bytes::from(line)).await;
    let _ = w.exit_status(1).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_shell_argv0() {
        assert_eq!(login_arg0(Path::new("/bin/bash")), OsString::from("-bash"));
        assert_eq!(base_name(Path::new("/usr/bin/zsh")), OsString::from("zsh"));
        assert_eq!(sh_quote(Path::new("/usr/lib/openssh/sftp-server")), OsString::from("'/usr/lib/openssh/sftp-server'"));
        assert_eq!(sh_quote(Path::new("/opt/it's here/sftp")), OsString::from("'/opt/it'\\''s here/sftp'"));
    }
}
