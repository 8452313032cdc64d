//! The relay server: an [`UpgradeHandler`] for `Upgrade: tailgate-relay` on
//! the control server's HTTP port. See [`super`] for the protocol.
//!
//! Per connection: one reader (this handler's task) and one writer task,
//! sharing the Noise channel behind a mutex held only to encrypt or decrypt.
//!
//! - **Reader**: decrypts `Send` frames and pushes each one, turned into a
//!   `Recv` in place, into the destination's fair queue (never waits for
//!   it); with a `--relay-rate` cap it then charges the bytes read to the
//!   node's token bucket and, when in debt, stops reading for the debt's
//!   duration (TCP pushes back on that node alone). Its read buffer grows
//!   from 16 KiB to 256 KiB while reads fill it (busy nodes only).
//! - **Writer**: drains its own queue, up to 256 KiB per write, sealed as
//!   few Noise messages (64 KiB each) rather than one per datagram; sends
//!   keepalives, and the final `Closing`.
//! - **Registry**: node key → connection. A new connection of the same key
//!   replaces (closes) the old one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::RELAY_PATH;
use super::auth::NodeAuthorizer;
use super::error::{ProtocolError, RelayConnError};
use super::limits::{FairQueue, TokenBucket};
use super::proto::{Frame, MAX_FRAME, push_frame, recv_from_send};
use crate::control::UPGRADE_RELAY;
use crate::control::server::{PreAuthPermit, UpgradeHandler};
use crate::control::upgrade::{Stream, accept_noise, write_and_close};
use crate::control::wire::frame::{FRAME_HEADER, frame_at};
use crate::control::wire::http::{self, RequestHead};
use crate::control::wire::noise::{ChannelError, Plain, SecureChannel};
use crate::key::{Key, PrivateKey, ShortKey};

/// Relay limits and timers.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Per-node cap on what a node sends, bytes/s (0 = none, the default:
    /// fairness comes from the per-destination fair queues, so a node alone
    /// may use all the relay can carry).
    pub rate_bytes_per_sec: u64,
    /// Token bucket depth, bytes.
    pub burst_bytes: u64,
    /// Per-destination queue: datagrams waiting for one node's socket.
    pub queue_packets: usize,
    /// Per-destination queue: bytes waiting for one node's socket.
    pub queue_bytes: usize,
    /// Keepalive period (told to the node in `Accepted`); a connection
    /// silent for 3 periods + 5 s is closed, as is one whose writes stall
    /// that long.
    pub keepalive: Duration,
    /// Limit on the Noise handshake and the authorization check.
    pub handshake_timeout: Duration,
    /// How often a connected node's authorization is checked again.
    pub reauth_interval: Duration,
    /// Initial read buffer per connection (grows to 256 KiB while reads fill it).
    pub read_buffer: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            rate_bytes_per_sec: 0,
            burst_bytes: 4 * 1024 * 1024,
            queue_packets: 1024,
            queue_bytes: 2 * 1024 * 1024,
            keepalive: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            reauth_interval: Duration::from_secs(30),
            read_buffer: 16 * 1024,
        }
    }
}

/// Counters since the relay started (plus the current connection count).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Nodes connected now.
    pub connections: usize,
    /// Connections authorized.
    pub accepted: u64,
    /// Connections refused (unknown or expired node key).
    pub refused: u64,
    /// Connections closed because the same node connected again.
    pub replaced: u64,
    /// Datagrams queued for their destination.
    pub forwarded_packets: u64,
    /// Bytes of those datagrams.
    pub forwarded_bytes: u64,
    /// Destination's queue full.
    pub dropped_queue_full: u64,
    /// Destination not connected.
    pub dropped_no_peer: u64,
    /// Connections closed for a malformed or unexpected frame.
    pub protocol_errors: u64,
    /// Times a node's reading was paused by its rate limit.
    pub rate_limited: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    replaced: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_no_peer: AtomicU64,
    protocol_errors: AtomicU64,
    rate_limited: AtomicU64,
}

// Lock policy: nothing that can panic runs under these locks (queue pushes
// and pops, map lookups, sealing into a Vec), and what they guard stays
// consistent between statements, so a poisoned lock is recovered rather
// than turning one panic into a relay outage for every node (as node.rs).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Bound on `PeerGone` notices queued for one node.
const MAX_GONE_QUEUED: usize = 64;
/// A `PeerGone` for the same destination at most this often per sender.
const PEER_GONE_EVERY: Duration = Duration::from_secs(5);
/// Bytes coalesced into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// Largest read buffer a busy connection grows to.
const MAX_READ_BUFFER: usize = 256 * 1024;
/// Bytes each sender may have written to one destination per round of its
/// fair queue: a few datagrams, so senders interleave finely.
const FAIR_QUANTUM: usize = 8 * 1024;

struct OutQueue {
    /// Encoded `Recv` frames by sender.
    data: FairQueue,
    gone: Vec<Key>,
}

struct Conn {
    id: u64,
    key: Key,
    out: Mutex<OutQueue>,
    notify: Notify,
    /// `Some(reason)` = close.
    close: watch::Sender<Option<String>>,
}

impl Conn {
    fn push(&self, src: Key, recv_frame: Vec<u8>) -> bool {
        let ok = lock(&self.out).data.push(src, recv_frame);
        if ok {
            self.notify.notify_one();
        }
        ok
    }

    fn push_gone(&self, key: Key) {
        let mut q = lock(&self.out);
        if q.gone.len() < MAX_GONE_QUEUED && !q.gone.contains(&key) {
            q.gone.push(key);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// Asks both tasks to end; the first reason wins.
    fn close(&self, reason: &str) {
        self.close.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason.to_string());
                true
            } else {
                false
            }
        });
    }
}

struct Inner {
    private: PrivateKey,
    cfg: RelayConfig,
    auth: Arc<dyn NodeAuthorizer>,
    conns: RwLock<HashMap<Key, Arc<Conn>>>,
    next_id: AtomicU64,
    counters: Counters,
    stop: watch::Sender<bool>,
    external_stop: OnceLock<watch::Receiver<bool>>,
}

impl Inner {
    /// Completes when the relay is shut down (its own `shutdown` or the
    /// external signal turning true or going away).
    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let mut own = self.stop.subscribe();
        let ext = self.external_stop.get().cloned();
        Box::pin(async move {
            let ext = async move {
                match ext {
                    Some(mut r) => {
                        let _ = r.wait_for(|v| *v).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = own.wait_for(|v| *v) => {}
                _ = ext => {}
            }
        })
    }
}

/// The relay. Cheap to clone (a handle); register it as the
/// `tailgate-relay` upgrade of a control server (done by default by
/// `ControlServer::start`).
#[derive(Clone)]
pub struct RelayServer {
    inner: Arc<Inner>,
}

impl RelayServer {
    /// `server_private`: the control server's Noise key (nodes pin its
    /// public half, exactly as for the control protocol).
    pub fn new(server_private: PrivateKey, cfg: RelayConfig, auth: Arc<dyn NodeAuthorizer>) -> RelayServer {
        let (stop, _) = watch::channel(false);
        RelayServer {
            inner: Arc::new(Inner {
                private: server_private,
                cfg,
                auth,
                conns: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                counters: Counters::default(),
                stop,
                external_stop: OnceLock::new(),
            }),
        }
    }

    /// Also close every connection when `stop` turns true or its sender is
    /// dropped (the control server's shutdown signal). Set once.
    pub fn with_shutdown(self, stop: watch::Receiver<bool>) -> RelayServer {
        let _ = self.inner.external_stop.set(stop);
        self
    }

    /// Closes every connection and refuses new ones.
    pub fn shutdown(&self) {
        self.inner.stop.send_replace(true);
    }

    /// The limits and timers it runs with.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.cfg
    }

    /// Is this node connected?
    pub fn is_connected(&self, node: &Key) -> bool {
        read(&self.inner.conns).contains_key(node)
    }

    /// Counters since start, and the connections now.
    pub fn stats(&self) -> RelayStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            connections: read(&self.inner.conns).len(),
            accepted: l(&c.accepted),
            refused: l(&c.refused),
            replaced: l(&c.replaced),
            forwarded_packets: l(&c.forwarded_packets),
            forwarded_bytes: l(&c.forwarded_bytes),
            dropped_queue_full: l(&c.dropped_queue_full),
            dropped_no_peer: l(&c.dropped_no_peer),
            protocol_errors: l(&c.protocol_errors),
            rate_limited: l(&c.rate_limited),
        }
    }

    /// Serves one connection from just after its request head (what the
    /// control server's upgrade dispatch calls).
    pub async fn serve<S: Stream>(&self, stream: S, head: RequestHead, leftover: Vec<u8>) {
        self.serve_counted(stream, head, leftover, PreAuthPermit::none()).await
    }

    /// [`serve`](Self::serve), holding `permit` (the server's count of
    /// unauthenticated connections) until the node is authorized.
    pub async fn serve_counted<S: Stream>(&self, stream: S, head: RequestHead, leftover: Vec<u8>, permit: PreAuthPermit) {
        if let Err(e) = serve(self.inner.clone(), stream, head, leftover, permit).await {
            tracing::debug!("relay: connection ended before authentication: {e}");
        }
    }
}

impl UpgradeHandler for RelayServer {
    fn handle(&self, stream: Box<dyn Stream>, head: RequestHead, leftover: Vec<u8>, permit: PreAuthPermit) -> BoxFuture<'static, ()> {
        let this = self.clone();
        Box::pin(async move { this.serve_counted(stream, head, leftover, permit).await })
    }
}

fn seal(chan: &Mutex<SecureChannel>, f: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), RelayConnError> {
    lock(chan).seal_frame(&f.to_vec(), out).map_err(RelayConnError::Encrypt)
}

async fn serve<S: Stream>(
    inner: Arc<Inner>,
    mut s: S,
    head: RequestHead,
    leftover: Vec<u8>,
    permit: PreAuthPermit,
) -> Result<(), RelayConnError> {
    if *inner.stop.borrow() || inner.external_stop.get().is_some_and(|r| *r.borrow()) {
        write_and_close(&mut s, &http::simple_response(503, "Service Unavailable", "relay shutting down\n")).await;
        return Err(RelayConnError::ShuttingDown);
    }
    if head.method != "GET" || head.path != RELAY_PATH {
        write_and_close(&mut s, &http::simple_response(404, "Not Found", "not found\n")).await;
        return Err(RelayConnError::NotRelayPath { method: head.method, path: head.path });
    }
    s.write_all(&http::switching_protocols(UPGRADE_RELAY)).await.map_err(RelayConnError::Write)?;
    let timeout = inner.cfg.handshake_timeout;
    let mut rbuf = vec![0u8; inner.cfg.read_buffer.max(1024)];
    let (chan, node_key) = accept_noise(&mut s, &inner.private, &leftover, MAX_FRAME, &mut rbuf, timeout).await?;
    // Every line logged from here on names the node the same way.
    let span = tracing::info_span!("relay_conn", peer = %ShortKey(node_key));
    let result = serve_node(&inner, s, Arc::new(Mutex::new(chan)), node_key, rbuf, permit).instrument(span.clone()).await;
    if let Err(e) = &result {
        span.in_scope(|| tracing::debug!("relay: connection ended: {e}"));
    }
    Ok(())
}

/// An authenticated node: authorize it, register it, run its reader here
/// and its writer in a task until either ends.
async fn serve_node<S: Stream>(
    inner: &Arc<Inner>,
    mut s: S,
    chan: Arc<Mutex<SecureChannel>>,
    node_key: Key,
    rbuf: Vec<u8>,
    permit: PreAuthPermit,
) -> Result<(), RelayConnError> {
    let timeout = inner.cfg.handshake_timeout;
    let allowed = tokio::time::timeout(timeout, inner.auth.allowed(&node_key)).await.unwrap_or(false);
    let mut out = Vec::new();
    if !allowed {
        bump(&inner.counters.refused, 1);
        seal(&chan, &Frame::Closing { reason: "this node is not allowed to use the relay (unknown or expired node key)" }, &mut out)?;
        write_and_close(&mut s, &out).await;
        return Err(RelayConnError::Refused);
    }
    drop(permit);
    let ka_secs = inner.cfg.keepalive.as_secs().clamp(1, u16::MAX as u64) as u16;
    seal(&chan, &Frame::Accepted { keepalive_secs: ka_secs }, &mut out)?;
    s.write_all(&out).await.map_err(RelayConnError::Write)?;

    let (close, _) = watch::channel(None);
    let conn = Arc::new(Conn {
        id: inner.next_id.fetch_add(1, Ordering::Relaxed),
        key: node_key,
        out: Mutex::new(OutQueue { data: FairQueue::new(inner.cfg.queue_packets, inner.cfg.queue_bytes, FAIR_QUANTUM), gone: Vec::new() }),
        notify: Notify::new(),
        close,
    });
    let old = write(&inner.conns).insert(node_key, conn.clone());
    if let Some(old) = old {
        bump(&inner.counters.replaced, 1);
        old.close("replaced by a newer relay connection of the same node");
    }
    bump(&inner.counters.accepted, 1);
    tracing::debug!("relay: node connected");

    let (r, w) = tokio::io::split(s);
    let writer = tokio::spawn(write_loop(inner.clone(), conn.clone(), chan.clone(), w).in_current_span());
    let result = read_loop(inner, &conn, &chan, r, rbuf).await;
    {
        let mut conns = write(&inner.conns);
        if conns.get(&node_key).is_some_and(|c| c.id == conn.id) {
            conns.remove(&node_key);
        }
    }
    match &result {
        Ok(()) => conn.close("connection closed by the node"),
        Err(e) => conn.close(&e.to_string()),
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

async fn read_loop<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    conn: &Arc<Conn>,
    chan: &Mutex<SecureChannel>,
    mut r: R,
    mut rbuf: Vec<u8>,
) -> Result<(), RelayConnError> {
    let cfg = &inner.cfg;
    let idle_limit = cfg.keepalive * 3 + Duration::from_secs(5);
    let mut close = conn.close.subscribe();
    let mut stop = inner.stopped();
    let mut last_rx = Instant::now();
    let mut bucket = TokenBucket::new(cfg.rate_bytes_per_sec, cfg.burst_bytes, std::time::Instant::now());
    let mut reauth = tokio::time::interval_at(Instant::now() + cfg.reauth_interval, cfg.reauth_interval);
    reauth.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gone_sent: HashMap<Key, Instant> = HashMap::new();
    let mut plain = Plain::default();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return Err(RelayConnError::ShuttingDown),
            _ = close.changed() => return Err(RelayConnError::Closed(close.borrow().clone().unwrap_or_default())),
            n = r.read(&mut rbuf) => {
                let n = match n {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) => return Err(RelayConnError::Read(e)),
                };
                last_rx = Instant::now();
                let decoded = lock(chan).open_into(&rbuf[..n], &mut plain);
                let handled = decoded.map_err(ProtocolError::from).and_then(|()| {
                    // Frames are taken where they were decrypted: each
                    // datagram is copied once, into its `Recv`.
                    while let Some(len) = frame_at(plain.data(), MAX_FRAME).map_err(ChannelError::from)? {
                        handle_frame(inner, conn, &plain.data()[FRAME_HEADER..FRAME_HEADER + len], &mut gone_sent)?;
                        plain.consume(FRAME_HEADER + len);
                    }
                    Ok(())
                });
                if let Err(e) = handled {
                    bump(&inner.counters.protocol_errors, 1);
                    return Err(e.into());
                }
                if n == rbuf.len() && rbuf.len() < MAX_READ_BUFFER {
                    // More was waiting: fewer, larger reads for a busy node.
                    rbuf.resize((rbuf.len() * 2).min(MAX_READ_BUFFER), 0);
                }
                let wait = bucket.take(n, std::time::Instant::now());
                if !wait.is_zero() {
                    bump(&inner.counters.rate_limited, 1);
                    tokio::select! {
                        biased;
                        _ = &mut stop => return Err(RelayConnError::ShuttingDown),
                        _ = close.changed() => return Err(RelayConnError::Closed(close.borrow().clone().unwrap_or_default())),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    // Time spent paused is not silence.
                    last_rx = Instant::now();
                }
            }
            _ = tokio::time::sleep_until(last_rx + idle_limit) => {
                return Err(RelayConnError::Silent(last_rx.elapsed()));
            }
            _ = reauth.tick() => {
                // Bounded like the first check: an authorizer that never
                // answers must not stall this node's datagrams for good;
                // no answer is no (deny by default), the node reconnects.
                match tokio::time::timeout(cfg.handshake_timeout, inner.auth.allowed(&conn.key)).await {
                    Ok(true) => {}
                    Ok(false) => return Err(RelayConnError::NoLongerAllowed),
                    Err(_) => return Err(RelayConnError::AuthTimeout(cfg.handshake_timeout)),
                }
                if gone_sent.len() > 1024 {
                    gone_sent.retain(|_, t| t.elapsed() < PEER_GONE_EVERY);
                }
            }
        }
    }
}

fn handle_frame(inner: &Inner, conn: &Conn, f: &[u8], gone_sent: &mut HashMap<Key, Instant>) -> Result<(), ProtocolError> {
    let dst = match Frame::decode(f)? {
        Frame::Send { dst, .. } => dst,
        Frame::KeepAlive => return Ok(()),
        other => return Err(ProtocolError::Unexpected(format!("{other:?}"))),
    };
    let target = read(&inner.conns).get(&dst).cloned();
    let c = &inner.counters;
    match target {
        Some(t) => {
            let len = (f.len() - 33) as u64;
            let Some(recv) = recv_from_send(f, &conn.key) else {
                return Err(ProtocolError::Unexpected("malformed Send".into()));
            };
            if t.push(conn.key, recv) {
                bump(&c.forwarded_packets, 1);
                bump(&c.forwarded_bytes, len);
            } else {
                bump(&c.dropped_queue_full, 1);
            }
        }
        None => {
            bump(&c.dropped_no_peer, 1);
            let now = Instant::now();
            if gone_sent.get(&dst).is_none_or(|t| now.duration_since(*t) >= PEER_GONE_EVERY) {
                gone_sent.insert(dst, now);
                conn.push_gone(dst);
            }
        }
    }
    Ok(())
}

/// Encrypts queued `PeerGone` notices and `Recv` frames into `out`
/// (emptying `gone` and `batch`): framed back to back in `plain`, then
/// sealed as full-size Noise messages.
fn seal_batch(
    chan: &Mutex<SecureChannel>,
    gone: &mut Vec<Key>,
    batch: &mut Vec<(Key, Vec<u8>)>,
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), ChannelError> {
    plain.clear();
    for key in gone.drain(..) {
        push_frame(&Frame::PeerGone { key }, plain);
    }
    for (_, recv) in batch.drain(..) {
        crate::control::wire::frame::append_frame(&recv, plain);
    }
    lock(chan).seal_raw(plain, out)
}

async fn write_loop<W: AsyncWrite + Unpin>(inner: Arc<Inner>, conn: Arc<Conn>, chan: Arc<Mutex<SecureChannel>>, mut w: W) {
    let cfg = &inner.cfg;
    let stall_limit = cfg.keepalive * 3 + Duration::from_secs(5);
    let mut close = conn.close.subscribe();
    let mut stop = inner.stopped();
    let mut ka = tokio::time::interval_at(Instant::now() + cfg.keepalive, cfg.keepalive);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut plain = Vec::new();
    let mut batch: Vec<(Key, Vec<u8>)> = Vec::new();
    let mut gone: Vec<Key> = Vec::new();
    let reason: RelayConnError = 'outer: loop {
        tokio::select! {
            biased;
            _ = &mut stop => break RelayConnError::ShuttingDown,
            _ = close.changed() => break RelayConnError::Closed(close.borrow().clone().unwrap_or_default()),
            _ = conn.notify.notified() => loop {
                {
                    let mut q = lock(&conn.out);
                    gone.append(&mut q.gone);
                    let mut bytes = 0;
                    while bytes < WRITE_BATCH {
                        let Some(it) = q.data.pop() else { break };
                        bytes += it.1.len() + 5;
                        batch.push(it);
                    }
                }
                if batch.is_empty() && gone.is_empty() {
                    break;
                }
                out.clear();
                let sealed = seal_batch(&chan, &mut gone, &mut batch, &mut plain, &mut out);
                if let Err(e) = sealed {
                    break 'outer RelayConnError::Encrypt(e);
                }
                match tokio::time::timeout(stall_limit, w.write_all(&out)).await {
                    Ok(Ok(())) => ka.reset(),
                    Ok(Err(e)) => break 'outer RelayConnError::Write(e),
                    Err(_) => break 'outer RelayConnError::Stalled(stall_limit),
                }
            },
            _ = ka.tick() => {
                out.clear();
                if let Err(e) = seal(&chan, &Frame::KeepAlive, &mut out) {
                    break e;
                }
                match tokio::time::timeout(stall_limit, w.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break RelayConnError::Write(e),
                    Err(_) => break RelayConnError::Stalled(stall_limit),
                }
            }
        }
    };
    // Tell the reader (if it is still running) and the node why.
    let reason = reason.to_string();
    conn.close(&reason);
    out.clear();
    if seal(&chan, &Frame::Closing { reason: &reason }, &mut out).is_ok() {
        write_and_close(&mut w, &out).await;
    } else {
        let _ = w.shutdown().await;
    }
}
