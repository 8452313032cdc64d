//! Forwarding requests: `direct-tcpip` (`ssh -L`) to ports on this node, and
//! the kinds that are always refused (remote, X11, agent, unix sockets).
//! Every request, granted or not, is audited.
#![warn(missing_docs)]

use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tracing::Instrument;

use super::{Conn, Judged, MAX_FORWARDS, Verdict};
use crate::ssh::audit::EventKind;
use crate::ssh::forward;

impl Conn {
    /// Audits a forward refused before any policy question (or by one).
    pub(super) fn refuse_forward(&self, kind: &str, dest: Option<String>, reason: &str) {
        let mut ev = self.ctx.event(EventKind::Forward);
        ev.login = self.login.as_ref().map(|l| l.user.clone());
        ev.kind = Some(kind.into());
        ev.dest = dest;
        ev.allowed = Some(false);
        ev.reason = Some(reason.into());
        self.ctx.server.audit.write(&ev);
    }

    /// `ssh -L`: admitted only for a login that still holds, to a port on
    /// this node the network policy lets the caller reach, within the
    /// connection's forward limit.
    pub(super) async fn open_direct_tcpip(&mut self, channel: Channel<Msg>, host: &str, port: u32, reply: ChannelOpenHandle) {
        let dest_label = format!("{host}:{port}");
        let Some(login) = &self.login else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return;
        };
        let acct = match &login.verdict {
            Verdict::Deny(_) => {
                self.refuse_forward("direct-tcpip", Some(dest_label), "login denied");
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                return;
            }
            Verdict::Admit(acct) => acct,
        };
        if let Judged::No(msg, _) = self.ctx.judge(&login.user, acct) {
            self.refuse_forward("direct-tcpip", Some(dest_label), msg.trim_start_matches("tailgate: "));
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return;
        }
        let Some(dest) = forward::local_destination(host, port, self.ctx.seen().1.ip) else {
            self.refuse_forward("direct-tcpip", Some(dest_label), "only ports on this node can be forwarded");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return;
        };
        let allowed = self.ctx.forward_allowed(dest.port());
        let mut ev = self.ctx.event(EventKind::Forward);
        ev.login = Some(login.user.clone());
        ev.kind = Some("direct-tcpip".into());
        ev.dest = Some(dest_label);
        ev.allowed = Some(allowed.is_ok());
        if let Err(why) = allowed {
            ev.reason = Some(why.to_string());
            self.ctx.server.audit.write(&ev);
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return;
        }
        if Arc::strong_count(&self.forwards) > MAX_FORWARDS {
            ev.allowed = Some(false);
            ev.reason = Some(format!("more than {MAX_FORWARDS} forwards open on this connection"));
            self.ctx.server.audit.write(&ev);
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return;
        }
        self.ctx.server.audit.write(&ev);
        let (ctx, user, slot) = (self.ctx.clone(), login.user.clone(), self.forwards.clone());
        let span = tracing::info_span!("forward", %dest);
        tokio::spawn(
            async move {
                forward::run(ctx, user, channel, reply, dest).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}
