//! Session channels and their requests before and after the program starts:
//! open, pty, env, window size, signals, stdin data, EOF, close.
#![warn(missing_docs)]

use russh::server::{ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};

use super::{Conn, Judged, MAX_ENV, MAX_SESSIONS, SessionChan, Verdict};
use crate::ssh::account;
use crate::ssh::new_id;
use crate::ssh::process::PtyParams;
use crate::ssh::session;

/// A `pty-req` as the client sent it.
pub(super) struct PtyRequest<'a> {
    pub term: &'a str,
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
    pub modes: &'a [(Pty, u32)],
}

impl Conn {
    pub(super) async fn open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle) {
        if self.login.is_none() || self.sessions.len() >= MAX_SESSIONS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        }
        let id = channel.id();
        // Requests and data reach us through the handler callbacks; the read
        // half would only duplicate them (and block russh once full).
        let (_read, writer) = channel.split();
        self.sessions
            .insert(id, SessionChan { id: new_id(), writer: Some(writer), pty: None, env: Vec::new(), started: false, control: None });
        reply.accept().await;
    }

    pub(super) fn pty(&mut self, channel: ChannelId, req: PtyRequest<'_>, session: &mut Session) -> Result<(), russh::Error> {
        match self.sessions.get_mut(&channel) {
            Some(sc) if !sc.started => {
                let term: String = req.term.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
                let PtyRequest { cols, rows, px_width, px_height, modes, .. } = req;
                sc.pty = Some(PtyParams { term, cols, rows, px_width, px_height, modes: modes.to_vec() });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    /// Keeps a client variable the deciding rule's `accept_env` allows.
    pub(super) fn env(&mut self, channel: ChannelId, name: &str, value: &str, session: &mut Session) -> Result<(), russh::Error> {
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

    pub(super) fn window_change(
        &mut self,
        channel: ChannelId,
        size: (u32, u32, u32, u32),
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (cols, rows, px_width, px_height) = size;
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

    pub(super) fn signal(&self, channel: ChannelId, signal: Sig) {
        if let (Some(c), Some(n)) = (self.sessions.get(&channel).and_then(|s| s.control.as_ref()), session::sig_number(&signal)) {
            c.signal(n);
        }
    }

    /// Client data for the program's stdin; a queue that overflows ends the session.
    pub(super) async fn stdin(&mut self, channel: ChannelId, data: &[u8]) {
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
    }

    pub(super) fn stdin_eof(&self, channel: ChannelId) {
        if let Some(q) = self.sessions.get(&channel).and_then(|s| s.control.as_ref()).and_then(|c| c.stdin.as_ref()) {
            q.eof();
        }
    }
}
