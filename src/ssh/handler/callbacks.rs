//! The russh `Handler` impl: enters the connection's span and dispatches.
//!
//! russh runs these callbacks in a task of its own, which does not inherit
//! the span `serve` runs in, so each callback enters `ssh_conn` itself.
#![warn(missing_docs)]

use std::sync::atomic::Ordering;

use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};
use tracing::Instrument;

use super::Conn;
use super::channels::PtyRequest;
use super::start::Request;
use crate::ssh::check;

/// Runs `$body` (which may use `self` and `.await`) inside the connection's span.
macro_rules! in_span {
    ($self:ident, $body:expr) => {{
        let span = $self.span.clone();
        async { $body }.instrument(span).await
    }};
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        in_span!(self, self.authenticate(user, false).await)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The password is neither checked nor logged: identity comes from the tailnet.
        in_span!(self, self.authenticate(user, false).await)
    }

    async fn auth_publickey_offered(&mut self, _user: &str, _offer: russh::server::PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn auth_publickey(&mut self, user: &str, _key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        in_span!(self, self.authenticate(user, false).await)
    }

    async fn auth_openssh_certificate(&mut self, user: &str, _c: &russh::keys::Certificate) -> Result<Auth, Self::Error> {
        in_span!(self, self.authenticate(user, false).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        in_span!(self, {
            if let Some(answers) = response
                && self.pending_check.as_ref().is_some_and(|p| p.user == user)
                && let Some(p) = self.pending_check.take()
            {
                return Ok(self.check_answer(p, check::code_from(answers)).await);
            }
            self.authenticate(user, true).await
        })
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated.store(true, Ordering::Release);
        let handle = session.handle();
        in_span!(self, self.succeeded(handle));
        Ok(())
    }

    async fn channel_open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle, _s: &mut Session) -> Result<(), Self::Error> {
        in_span!(self, self.open_session(channel, reply).await);
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
        in_span!(self, self.open_direct_tcpip(channel, host, port, reply).await);
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

    #[allow(clippy::too_many_arguments)] // the trait's signature, passed on as one `PtyRequest`
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
        self.pty(channel, PtyRequest { term, cols, rows, px_width, px_height, modes }, session)
    }

    async fn env_request(&mut self, channel: ChannelId, name: &str, value: &str, session: &mut Session) -> Result<(), Self::Error> {
        in_span!(self, self.env(channel, name, value, session))
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        in_span!(self, self.start(channel, Request::Shell, session).await)
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        in_span!(self, self.start(channel, Request::Exec(data), session).await)
    }

    async fn subsystem_request(&mut self, channel: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        in_span!(self, self.start(channel, Request::Subsystem(name), session).await)
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
        self.window_change(channel, (cols, rows, px_width, px_height), session)
    }

    async fn signal(&mut self, channel: ChannelId, signal: Sig, _s: &mut Session) -> Result<(), Self::Error> {
        Conn::signal(self, channel, signal);
        Ok(())
    }

    async fn data(&mut self, channel: ChannelId, data: &[u8], _s: &mut Session) -> Result<(), Self::Error> {
        self.stdin(channel, data).await;
        Ok(())
    }

    async fn channel_eof(&mut self, channel: ChannelId, _s: &mut Session) -> Result<(), Self::Error> {
        self.stdin_eof(channel);
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _s: &mut Session) -> Result<(), Self::Error> {
        // Dropping the session's control ends its process group.
        self.sessions.remove(&channel);
        Ok(())
    }
}
