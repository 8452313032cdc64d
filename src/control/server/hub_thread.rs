//! The hub's OS thread and how the async side talks to it: one command
//! channel in ([`HubCmd`]), each connection's outbound queue out. The hub
//! is single-threaded, so it needs no locks; SQLite calls block only this
//! thread.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::metrics::{ControlMetrics, inc};
use super::oidc::SignedIn;
use super::signin;
use crate::control::server::hub::{AdminRequest, ConnId, Hub, HubError, Now, Out};
use crate::control::wire::proto::{ClientMsg, ErrorCode, ServerOut};
use crate::key::{Key, ShortKey};

/// What a connection task is told to write.
pub(super) enum Outbound {
    /// A message to seal and send (boxed as the hub made it, see `Out::Send`).
    Msg(Box<ServerOut>),
    /// Close, logging this reason.
    Close(String),
}

/// A connection's outbound queue, as the hub holds it.
pub(super) type ConnTx = mpsc::Sender<Outbound>;

/// Everything the hub thread is asked, in arrival order.
pub(super) enum HubCmd {
    Hello { conn: ConnId, node_key: Key, msg: ClientMsg, tx: ConnTx, reply: oneshot::Sender<Option<i64>> },
    Msg { conn: ConnId, node: i64, msg: ClientMsg },
    Disconnected { conn: ConnId, node: i64 },
    Admin { req: AdminRequest, reply: oneshot::Sender<Result<Value, HubError>> },
    RelayAllowed { key: Key, reply: oneshot::Sender<bool> },
    SignedIn { conn: ConnId, node_key: Key, hello: signin::Hello, who: SignedIn, tx: ConnTx, reply: oneshot::Sender<Option<i64>> },
    PolicyFile { text: String, name: String },
    Tick,
    Shutdown,
}

/// Relay access: a node key the hub knows and whose key has not expired,
/// asked of the hub as one typed lookup per check.
struct HubRelayAuth {
    hub: mpsc::WeakSender<HubCmd>,
}

impl crate::relay::NodeAuthorizer for HubRelayAuth {
    fn allowed<'a>(&'a self, node: &'a Key) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(hub) = self.hub.upgrade() else { return false };
            let (reply, rx) = oneshot::channel();
            if hub.send(HubCmd::RelayAllowed { key: *node, reply }).await.is_err() {
                return false;
            }
            drop(hub);
            rx.await.unwrap_or(false)
        })
    }
}

pub(super) fn relay_auth(hub: &mpsc::Sender<HubCmd>) -> Arc<dyn crate::relay::NodeAuthorizer> {
    Arc::new(HubRelayAuth { hub: hub.downgrade() })
}

// --- hub thread ---------------------------------------------------------------

/// The hub thread's body: runs each command, then routes the hub's outputs.
pub(super) fn hub_loop(mut hub: Hub, mut rx: mpsc::Receiver<HubCmd>, metrics: Arc<ControlMetrics>) {
    let mut conns: HashMap<ConnId, ConnTx> = HashMap::new();
    while let Some(cmd) = rx.blocking_recv() {
        // One clock reading per command: the hub itself never reads a clock.
        let now = Now::read();
        match cmd {
            HubCmd::Hello { conn, node_key, msg, tx, reply } => {
                conns.insert(conn, tx);
                let register = matches!(msg, ClientMsg::Register { .. });
                let r = hub.hello(conn, node_key, msg, now);
                match &r {
                    Err(HubError { message: m, .. }) => {
                        inc(&metrics.hellos_refused);
                        tracing::info!(peer = %ShortKey(node_key), "control: refused node: {m}");
                    }
                    Ok(_) if register => inc(&metrics.registrations),
                    Ok(_) => inc(&metrics.logins),
                }
                let _ = reply.send(r.ok());
            }
            HubCmd::SignedIn { conn, node_key, hello, who, tx, reply } => {
                conns.insert(conn, tx);
                let r = hub.hello_signed_in(conn, node_key, hello, &who, now);
                if let Err(HubError { message: m, .. }) = &r {
                    tracing::info!(peer = %ShortKey(node_key), "control: refused signed-in node: {m}");
                }
                let _ = reply.send(r.ok());
            }
            HubCmd::Msg { conn, node, msg } => hub.client_msg(conn, node, msg, now),
            HubCmd::Disconnected { conn, node } => {
                conns.remove(&conn);
                hub.disconnected(conn, node, now);
            }
            HubCmd::Admin { req, reply } => {
                let _ = reply.send(hub.admin(req, now));
            }
            HubCmd::RelayAllowed { key, reply } => {
                let _ = reply.send(hub.relay_allowed(&key, now));
            }
            HubCmd::PolicyFile { text, name } => match (inc(&metrics.policy_reloads), hub.set_policy(&text, &name, "file", now)).1 {
                Ok(v) => tracing::info!("policy file {name}: version {v} in force"),
                Err(e) => tracing::error!("policy file {name}: {e}"),
            },
            HubCmd::Tick => hub.tick(now),
            HubCmd::Shutdown => break,
        }
        for o in hub.take_outputs() {
            dispatch(&mut conns, o);
        }
    }
    // Dropping every sender ends the connection tasks' loops.
    conns.clear();
}

fn dispatch(conns: &mut HashMap<ConnId, ConnTx>, o: Out) {
    match o {
        Out::Send(c, msg) => {
            let Some(tx) = conns.get(&c) else { return };
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Outbound::Msg(msg)) {
                tracing::warn!("control: connection {c} is not reading its updates; closing it (it will reconnect)");
                conns.remove(&c); // dropping the sender closes it
            }
        }
        Out::Close(c, reason) => {
            if let Some(tx) = conns.remove(&c) {
                let _ = tx.try_send(Outbound::Close(reason));
            }
        }
    }
}

/// One admin operation, answered by the hub thread.
pub(super) async fn admin_call(shared: &Shared, req: AdminRequest) -> Result<Value, HubError> {
    let down = || HubError::new(ErrorCode::Internal, "the control server is shutting down; try again once it is back");
    let (tx, rx) = oneshot::channel();
    shared.hub.send(HubCmd::Admin { req, reply: tx }).await.map_err(|_| down())?;
    rx.await.map_err(|_| down())?
}
