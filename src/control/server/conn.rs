//! One node's control connection, from the `101 Switching Protocols` on:
//! the Noise handshake, the first message (register, login, or a sign-in
//! wait), then the message loop that forwards node messages to the hub and
//! writes what the hub sends back, coalescing queued messages into one
//! write.

#![warn(missing_docs)]

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::hub_thread::{ConnTx, HubCmd, Outbound};
use super::preauth::PreAuthPermit;
use super::{Shared, signin};
use crate::control::server::audit::ingest::{IngestCmd, Reply};
use crate::control::server::hub::ConnId;
use crate::control::server::metrics;
use crate::control::upgrade::{HandshakeError, Stream, accept_noise};
use crate::control::wire::chunk::BinChunk;
use crate::control::wire::noise::{ChannelError, SecureChannel};
use crate::control::wire::proto::{ClientMsg, ErrorCode, ServerOut};
use crate::key::ShortKey;

/// Read buffer of a connection that ships in bulk (the others keep 4 KiB).
const BULK_READ: usize = 256 * 1024;

/// Why a control connection ended. The message is what the server logs
/// and, for protocol errors, what it tells the node before closing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("no login within {0:?}")]
    NoLogin(Duration),
    #[error("closed before logging in")]
    ClosedBeforeLogin,
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("malformed message: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("recording chunk: bad base64")]
    BadChunk,
    #[error(transparent)]
    Binary(#[from] crate::control::wire::chunk::ChunkError),
    #[error("sign-in: {0}")]
    SignIn(#[from] signin::SignInError),
    #[error("server shutting down")]
    ShuttingDown,
    #[error("read: {0}")]
    Read(#[source] io::Error),
    #[error("write: {0}")]
    Write(#[source] io::Error),
    #[error("silent for {0:?}")]
    Silent(Duration),
    /// Closed by the hub (replaced, removed, expired…), with its reason.
    #[error("{0}")]
    Closed(String),
    #[error("cannot encode a message: {0}")]
    Encode(#[source] serde_json::Error),
}

pub(super) fn seal(chan: &mut SecureChannel, msg: &ServerOut, out: &mut Vec<u8>) -> Result<(), ConnError> {
    let json = serde_json::to_vec(msg).map_err(ConnError::Encode)?;
    Ok(chan.seal_frame(&json, out)?)
}

/// Tells the node why it is being closed (best effort), then closes.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, chan: &mut SecureChannel, code: ErrorCode, message: String) {
    let mut out = Vec::new();
    let _ = seal(chan, &ServerOut::Error { code, message }, &mut out);
    let _ = w.write_all(&out).await;
    let _ = w.shutdown().await;
}

/// After the 101: handshake, first message, then the message loop, every
/// line logged after the handshake inside a `control_conn{conn, peer}` span.
pub(super) async fn control_session<S: Stream>(mut s: S, leftover: Vec<u8>, addr: &str, shared: &Arc<Shared>, permit: PreAuthPermit) {
    let timeout = shared.opts.handshake_timeout;
    // Nodes send small messages; keep per-connection memory small.
    let mut rbuf = vec![0u8; 4096];
    let (chan, node_key) = match accept_noise(&mut s, &shared.private, &leftover, shared.opts.max_client_frame, &mut rbuf, timeout).await {
        Ok(x) => x,
        Err(e) => {
            tracing::info!("control: {addr}: connection closed: {e}");
            return;
        }
    };
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("control_conn", conn, peer = %ShortKey(node_key));
    let (r, w) = tokio::io::split(s);
    let session = Session { r, w, chan, rbuf, conn, node: None, shared: shared.clone() };
    let who = format!("{addr} (node {})", ShortKey(node_key));
    async move {
        if let Err(e) = session.run(node_key, &who, permit).await {
            tracing::info!("control: {who}: connection closed: {e}");
        }
    }
    .instrument(span)
    .await
}

/// One authenticated control connection: its halves, its channel, and
/// which hub connection and node it is.
struct Session<R, W> {
    r: R,
    w: W,
    chan: SecureChannel,
    rbuf: Vec<u8>,
    conn: ConnId,
    /// The node, once the hub accepted its first message.
    node: Option<i64>,
    shared: Arc<Shared>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Session<R, W> {
    async fn run(mut self, node_key: crate::key::Key, who: &str, permit: PreAuthPermit) -> Result<(), ConnError> {
        let first = match self.first_message().await {
            Ok(m) => m,
            Err(e) => {
                if !matches!(e, ConnError::NoLogin(_)) {
                    refuse(&mut self.w, &mut self.chan, ErrorCode::Protocol, e.to_string()).await;
                }
                return Err(e);
            }
        };
        let conn = self.conn;
        let (tx, mut rx) = mpsc::channel(self.shared.opts.outbound_queue);
        let (rtx, rrx) = oneshot::channel();
        let acks = tx.clone();
        let cmd = match signin::needs_sign_in(&first, &node_key, &self.shared).await {
            Some(hello) => match signin::wait(&mut self.r, &mut self.w, &mut self.chan, &mut self.rbuf, who, &self.shared).await {
                Ok(who) => HubCmd::SignedIn { conn, node_key, hello, who, tx, reply: rtx },
                Err(e) => {
                    refuse(&mut self.w, &mut self.chan, ErrorCode::SignIn, e.to_string()).await;
                    return Err(e.into());
                }
            },
            None => HubCmd::Hello { conn, node_key, msg: first, tx, reply: rtx },
        };
        self.shared.hub.send(cmd).await.map_err(|_| ConnError::ShuttingDown)?;
        self.node = rrx.await.map_err(|_| ConnError::ShuttingDown)?;
        // Authenticated (or refused and about to close): no longer counted.
        drop(permit);
        let result = self.message_loop(&mut rx, &acks).await;
        drop(acks);
        if let Some(node) = self.node {
            let _ = self.shared.hub.send(HubCmd::Disconnected { conn, node }).await;
        }
        result
    }

    /// The first message (register or login), within the handshake time limit.
    async fn first_message(&mut self) -> Result<ClientMsg, ConnError> {
        let timeout = self.shared.opts.handshake_timeout;
        let frame = tokio::time::timeout(timeout, async {
            loop {
                if let Some(f) = self.chan.next_frame()? {
                    return Ok(f);
                }
                match self.r.read(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return Err(ConnError::ClosedBeforeLogin),
                    Ok(n) => self.chan.push_wire(&self.rbuf[..n])?,
                }
            }
        })
        .await
        .map_err(|_| ConnError::NoLogin(timeout))??;
        parse_client(&frame)
    }

    async fn message_loop(&mut self, rx: &mut mpsc::Receiver<Outbound>, acks: &ConnTx) -> Result<(), ConnError> {
        let keepalive = self.shared.opts.keepalive;
        let idle_limit = keepalive * 3 + Duration::from_secs(5);
        let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        let mut last_rx = tokio::time::Instant::now();
        let mut shutdown = self.shared.shutdown.clone();
        let mut out = Vec::new();
        // Frames that came in with the first message.
        let mut bad = self.drain_frames(acks).await.err();
        while bad.is_none() {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Err(ConnError::ShuttingDown),
                m = rx.recv() => self.write_queued(m, rx, &mut out).await?,
                n = self.r.read(&mut self.rbuf) => {
                    let n = match n { Ok(0) => return Ok(()), Ok(n) => n, Err(e) => return Err(ConnError::Read(e)) };
                    last_rx = tokio::time::Instant::now();
                    // A node that fills the buffer is shipping a recording:
                    // 4 KiB reads would cost a syscall and a wakeup per 4 KiB.
                    if n == self.rbuf.len() && n < BULK_READ {
                        self.rbuf.resize(BULK_READ, 0);
                    }
                    bad = match self.chan.push_wire(&self.rbuf[..n]) {
                        Err(e @ ChannelError::Decrypt) => return Err(e.into()),
                        Err(e) => Some(e.into()),
                        Ok(()) => self.drain_frames(acks).await.err(),
                    };
                }
                _ = ka.tick() => {
                    if last_rx.elapsed() > idle_limit {
                        return Err(ConnError::Silent(last_rx.elapsed()));
                    }
                    out.clear();
                    seal(&mut self.chan, &ServerOut::KeepAlive, &mut out)?;
                    self.w.write_all(&out).await.map_err(ConnError::Write)?;
                }
            }
        }
        let e = bad.unwrap_or(ConnError::ShuttingDown);
        if !matches!(e, ConnError::ShuttingDown) {
            refuse(&mut self.w, &mut self.chan, ErrorCode::Protocol, e.to_string()).await;
        }
        Err(e)
    }

    /// Writes `first` and whatever else is queued as one write; `Err` when
    /// the hub closed the connection.
    async fn write_queued(
        &mut self,
        first: Option<Outbound>,
        rx: &mut mpsc::Receiver<Outbound>,
        out: &mut Vec<u8>,
    ) -> Result<(), ConnError> {
        let mut closing = None;
        let mut next = first;
        out.clear();
        loop {
            match next {
                Some(Outbound::Msg(msg)) => {
                    let before = out.len();
                    seal(&mut self.chan, &msg, out)?;
                    let m = &self.shared.metrics;
                    let sends = match *msg {
                        ServerOut::MapFull(_) => Some(&m.map_full_sends),
                        ServerOut::MapDelta(_) => Some(&m.map_delta_sends),
                        _ => None,
                    };
                    if let Some(c) = sends {
                        metrics::inc(c);
                        m.map_bytes.fetch_add((out.len() - before) as u64, Ordering::Relaxed);
                    }
                }
                Some(Outbound::Close(reason)) => {
                    closing = Some(reason);
                    break;
                }
                None => {
                    closing = Some("closed by the server".into());
                    break;
                }
            }
            if out.len() > 1 << 20 {
                break;
            }
            match rx.try_recv() {
                Ok(x) => next = Some(x),
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            self.w.write_all(out).await.map_err(ConnError::Write)?;
        }
        match closing {
            Some(reason) => {
                let _ = self.w.shutdown().await;
                Err(ConnError::Closed(reason))
            }
            None => Ok(()),
        }
    }

    /// Forwards every complete frame to the hub (or, for what nodes ship,
    /// to the ingest thread); `Err` = a bad frame. Waits when the hub's
    /// queue is full, so a node sending faster than the hub works is simply
    /// read more slowly.
    async fn drain_frames(&mut self, acks: &ConnTx) -> Result<(), ConnError> {
        let shared = &self.shared;
        while let Some(f) = self.chan.next_frame()? {
            // JSON starts with `{`; anything else is a binary frame.
            if f.first().is_some_and(|&b| b != b'{') {
                let c = BinChunk::decode(f, shared.opts.max_client_frame)?;
                // Before login there is no node to store it for (as with JSON chunks).
                let Some(node) = self.node else { continue };
                let cmd = IngestCmd::Chunk {
                    node,
                    session: c.session,
                    offset: c.offset,
                    data: c.data,
                    gzip: c.raw_len,
                    fin: c.fin,
                    reply: ack_reply(acks),
                };
                shared.ingest.send(cmd).await.map_err(|_| ConnError::ShuttingDown)?;
                continue;
            }
            let msg = parse_client(&f)?;
            let msg = match (self.node, msg) {
                (Some(node), ClientMsg::AuditEvents { lines }) => {
                    let cmd = IngestCmd::Events { node, lines, reply: ack_reply(acks) };
                    shared.ingest.send(cmd).await.map_err(|_| ConnError::ShuttingDown)?;
                    continue;
                }
                (Some(node), ClientMsg::RecordingChunk { session, offset, data, fin }) => {
                    use base64::Engine;
                    let data = base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| ConnError::BadChunk)?;
                    let cmd = IngestCmd::Chunk { node, session, offset, data, gzip: None, fin, reply: ack_reply(acks) };
                    shared.ingest.send(cmd).await.map_err(|_| ConnError::ShuttingDown)?;
                    continue;
                }
                (_, m) => m,
            };
            // Keepalives only prove liveness (the read already did that).
            if let (Some(node), false) = (self.node, matches!(msg, ClientMsg::KeepAlive)) {
                shared.hub.send(HubCmd::Msg { conn: self.conn, node, msg }).await.map_err(|_| ConnError::ShuttingDown)?;
            }
        }
        Ok(())
    }
}

/// Acks go into the connection's outbound queue; a full queue (a node not
/// reading) drops them: the node resends and the server dedupes.
fn ack_reply(tx: &ConnTx) -> Reply {
    let tx = tx.clone();
    Box::new(move |a| {
        let _ = tx.try_send(Outbound::Msg(Box::new(ServerOut::ShipAck(a))));
    })
}

fn parse_client(frame: &[u8]) -> Result<ClientMsg, ConnError> {
    serde_json::from_slice(frame).map_err(ConnError::Malformed)
}
