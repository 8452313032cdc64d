//! The node's side of the relay.
//!
//! ```no_run
//! # async fn f(url: &str, server_public: [u8; 32], node_private: tailgate::key::PrivateKey, peer: [u8; 32]) -> anyhow::Result<()> {
//! use tailgate::relay::RelayClient;
//! let (tx, mut rx) = RelayClient::connect(url, &server_public, &node_private).await?;
//! tx.send(&peer, b"an encrypted WireGuard datagram")?; // never blocks; drops when full
//! let (src, datagram) = rx.recv().await?;              // Err: the connection is over
//! # Ok(()) }
//! ```
//!
//! **Reconnection is the caller's job**, as for the control client: when
//! `recv` returns an error the connection is gone ([`RelaySender::send`]
//! then answers [`SendError::Closed`]). Wait with backoff (e.g. 500 ms
//! doubling to 30 s, with jitter; reset after a connection that lasted a
//! while) and connect again. [`RelayError::Refused`] means the relay does
//! not (or no longer) accept this node key: the node is unknown to the
//! control server or its key expired; retrying is fine but slowly (the node
//! may not have finished registering; otherwise it needs a new auth key).
//! A new connection with the same node key replaces the old one on the
//! server (the old one ends with `Closed("replaced ...")`).
//!
//! Two background tasks own the socket (reader, writer); dropping the
//! [`RelayReceiver`] stops them and closes the connection. When the receive
//! queue is full the reader waits a little for room (a busy owner catches
//! up, and TCP pushes back on the relay, whose per-destination fair queue
//! then decides whose datagrams are dropped); if no room comes, datagrams
//! are dropped and counted until there is room again (UDP semantics: an
//! owner that stopped reading does not stall the socket or keepalives).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::RELAY_PATH;
use super::proto::{Frame, MAX_DATAGRAM, MAX_FRAME, push_frame};
use crate::control::UPGRADE_RELAY;
use crate::control::transport::{ControlUrl, DialError, dial};
use crate::control::upgrade::Stream;
use crate::control::wire::frame::WireDecoder;
use crate::control::wire::http;
use crate::control::wire::noise::{Initiator, SecureChannel};
use crate::key::{Key, PrivateKey};

/// Why a relay connection could not be made or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    /// TCP, TLS or the URL failed.
    #[error("cannot reach the relay at {url}: {message}")]
    Connect {
        /// The control URL dialed.
        url: String,
        /// What failed.
        message: String,
    },
    /// The HTTP upgrade was answered with something other than `101`.
    #[error("{0}")]
    Http(String),
    #[error(
        "the relay at {url} did not complete the Noise handshake: its key is not the pinned control server key, \
         or it is not a tailgate relay"
    )]
    /// The server is not the one whose key was pinned.
    WrongServerKey {
        /// The control URL dialed.
        url: String,
    },
    /// The relay refused this node (unknown or expired node key).
    #[error("the relay refused this node: {0}")]
    Refused(String),
    /// The connection ended (the relay's reason, or what happened).
    #[error("relay connection closed: {0}")]
    Closed(String),
    /// The relay sent something this client does not understand.
    #[error("relay protocol error: {0}")]
    Protocol(String),
    /// Connecting, or the relay's keepalives, took too long.
    #[error("relay timed out: {0}")]
    Timeout(String),
}

/// Why [`RelaySender::send`] did not queue a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The send queue is full; the datagram was dropped.
    #[error("relay send queue full; datagram dropped")]
    Full,
    /// The connection has ended.
    #[error("relay connection closed")]
    Closed,
    /// More than [`MAX_DATAGRAM`] bytes.
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    TooLarge,
}

/// What the relay delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// A datagram from node `src` (authenticated by the relay).
    Datagram {
        /// The sending node's key.
        src: Key,
        /// The datagram, as sent.
        data: Vec<u8>,
    },
    /// A datagram we sent to this node was dropped: it is not connected to
    /// the relay (sent at most every few seconds per destination).
    PeerGone(Key),
}

/// Queue sizes, time limit and TLS roots of a relay connection.
#[derive(Clone, Debug)]
pub struct RelayClientOptions {
    /// Datagrams queued for sending before `send` drops.
    pub send_queue: usize,
    /// Events queued for `recv` before arriving datagrams are dropped.
    pub recv_queue: usize,
    /// Limit on TCP connect + upgrade + handshake + the relay's answer.
    pub connect_timeout: Duration,
    /// PEM CA certificate(s) for an `https://` URL instead of the system roots.
    pub ca_pem: Option<String>,
}

impl Default for RelayClientOptions {
    fn default() -> Self {
        RelayClientOptions { send_queue: 1024, recv_queue: 1024, connect_timeout: Duration::from_secs(15), ca_pem: None }
    }
}

/// Client counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayClientStats {
    /// Datagrams written to the relay.
    pub sent_packets: u64,
    /// Bytes of those datagrams.
    pub sent_bytes: u64,
    /// Datagrams dropped because the send queue was full.
    pub dropped_send_full: u64,
    /// Datagrams received from the relay.
    pub received_packets: u64,
    /// Bytes of those datagrams.
    pub received_bytes: u64,
    /// Datagrams dropped because the receive queue was full.
    pub dropped_recv_full: u64,
}

#[derive(Default)]
struct Counters {
    sent_packets: AtomicU64,
    sent_bytes: AtomicU64,
    dropped_send_full: AtomicU64,
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    dropped_recv_full: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RelayClientStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayClientStats {
            sent_packets: l(&self.sent_packets),
            sent_bytes: l(&self.sent_bytes),
            dropped_send_full: l(&self.dropped_send_full),
            received_packets: l(&self.received_packets),
            received_bytes: l(&self.received_bytes),
            dropped_recv_full: l(&self.dropped_recv_full),
        }
    }
}

struct Shared {
    counters: Counters,
    end: Mutex<Option<RelayError>>,
    stop: watch::Sender<bool>,
}

impl Shared {
    /// Records why the connection ended (first reason wins) and stops both tasks.
    fn finish(&self, e: RelayError) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            *end = Some(e);
        }
        drop(end);
        self.stop.send_replace(true);
    }
}

/// The sending half: cheap to clone, usable from sync code (never blocks).
#[derive(Clone)]
pub struct RelaySender {
    tx: mpsc::Sender<(Key, Vec<u8>)>,
    shared: Arc<Shared>,
}

impl RelaySender {
    /// Queues `datagram` for node `dst`. Never blocks: a full queue drops
    /// the datagram (and counts it).
    pub fn send(&self, dst: &Key, datagram: &[u8]) -> Result<(), SendError> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(SendError::TooLarge);
        }
        if *self.shared.stop.borrow() {
            return Err(SendError::Closed);
        }
        match self.tx.try_send((*dst, datagram.to_vec())) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.counters.dropped_send_full.fetch_add(1, Ordering::Relaxed);
                Err(SendError::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Has the connection ended?
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || *self.shared.stop.borrow()
    }

    /// Counters of this connection (shared by both halves).
    pub fn stats(&self) -> RelayClientStats {
        self.shared.counters.snapshot()
    }
}

/// The receiving half; owns the connection (dropping it closes it).
pub struct RelayReceiver {
    rx: mpsc::Receiver<RelayEvent>,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RelayReceiver {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RelayReceiver {
    /// The next datagram: (source node key, bytes). `PeerGone` notices are
    /// skipped (use [`recv_event`](Self::recv_event) to see them). An error
    /// means the connection is over.
    pub async fn recv(&mut self) -> Result<(Key, Vec<u8>), RelayError> {
        loop {
            if let RelayEvent::Datagram { src, data } = self.recv_event().await? {
                return Ok((src, data));
            }
        }
    }

    /// The next datagram or `PeerGone` notice.
    pub async fn recv_event(&mut self) -> Result<RelayEvent, RelayError> {
        match self.rx.recv().await {
            Some(ev) => Ok(ev),
            None => Err(self.end_reason()),
        }
    }

    /// Non-blocking: `Ok(None)` when nothing is queued.
    pub fn try_recv_event(&mut self) -> Result<Option<RelayEvent>, RelayError> {
        match self.rx.try_recv() {
            Ok(ev) => Ok(Some(ev)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(self.end_reason()),
        }
    }

    fn end_reason(&self) -> RelayError {
        self.shared.end.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| RelayError::Closed("connection ended".into()))
    }

    /// Closes the connection now.
    pub fn close(self) {}

    /// Counters of this connection (shared by both halves).
    pub fn stats(&self) -> RelayClientStats {
        self.shared.counters.snapshot()
    }
}

/// Connects nodes to a relay. See the module docs.
pub struct RelayClient;

impl RelayClient {
    /// Dials the control server's URL (`http://host:port`, as in auth keys),
    /// upgrades to the relay, authenticates as `node_private` (the node's
    /// WireGuard key) against the pinned `server_public`, and waits for the
    /// relay to accept the node.
    pub async fn connect(url: &str, server_public: &Key, node_private: &PrivateKey) -> Result<(RelaySender, RelayReceiver), RelayError> {
        Self::connect_with(url, server_public, node_private, RelayClientOptions::default()).await
    }

    /// [`connect`](Self::connect) with explicit queue sizes, time limit and TLS roots.
    pub async fn connect_with(
        url: &str,
        server_public: &Key,
        node_private: &PrivateKey,
        opts: RelayClientOptions,
    ) -> Result<(RelaySender, RelayReceiver), RelayError> {
        let s = dial(url, opts.ca_pem.as_deref(), opts.connect_timeout).await.map_err(|e| match e {
            DialError::Url(m) => RelayError::Http(m.to_string()),
            DialError::Connect { url, message } => RelayError::Connect { url, message },
            e => RelayError::Connect { url: url.into(), message: e.to_string() },
        })?;
        Self::connect_stream(s, url, server_public, node_private, opts).await
    }

    /// [`connect`](Self::connect) over an already-open stream (`url` gives
    /// the `Host` header).
    pub async fn connect_stream<S: Stream>(
        s: S,
        url: &str,
        server_public: &Key,
        node_private: &PrivateKey,
        opts: RelayClientOptions,
    ) -> Result<(RelaySender, RelayReceiver), RelayError> {
        let limit = opts.connect_timeout;
        tokio::time::timeout(limit, handshake(s, url, server_public, node_private, opts))
            .await
            .map_err(|_| RelayError::Timeout(format!("no answer from the relay at {url} within {limit:?}")))?
    }
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, RelayError> {
    match r.read(buf).await {
        Ok(0) => Err(RelayError::Closed("the relay closed the connection".into())),
        Ok(n) => Ok(n),
        Err(e) => Err(RelayError::Closed(e.to_string())),
    }
}

fn proto_err(e: impl std::fmt::Display) -> RelayError {
    RelayError::Protocol(e.to_string())
}

async fn handshake<S: Stream>(
    mut s: S,
    url: &str,
    server_public: &Key,
    node_private: &PrivateKey,
    opts: RelayClientOptions,
) -> Result<(RelaySender, RelayReceiver), RelayError> {
    let hosthdr = ControlUrl::parse(url).map_err(|e| RelayError::Http(e.to_string()))?.host_header();
    s.write_all(&http::upgrade_request(&hosthdr, RELAY_PATH, UPGRADE_RELAY)).await.map_err(|e| RelayError::Closed(e.to_string()))?;
    let mut rbuf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let (code, reason, used) = loop {
        if let Some(x) = http::parse_response(&head).map_err(|e| RelayError::Http(format!("{url}: {e}")))? {
            break x;
        }
        let n = read_more(&mut s, &mut rbuf).await?;
        head.extend_from_slice(&rbuf[..n]);
    };
    if code != 101 {
        return Err(RelayError::Http(format!("{url} answered `{code} {reason}` to the relay upgrade")));
    }
    let mut wire = WireDecoder::new();
    wire.push(&head[used..]);
    let (init, msg1) = Initiator::start(node_private, server_public).map_err(proto_err)?;
    s.write_all(&msg1).await.map_err(|e| RelayError::Closed(e.to_string()))?;
    let msg2 = loop {
        if let Some(m) = wire.next_message().map_err(proto_err)? {
            break m;
        }
        match s.read(&mut rbuf).await {
            Ok(0) | Err(_) => return Err(RelayError::WrongServerKey { url: url.into() }),
            Ok(n) => wire.push(&rbuf[..n]),
        }
    };
    let mut chan = init.finish(&msg2, wire, MAX_FRAME).map_err(|_| RelayError::WrongServerKey { url: url.into() })?;
    // The relay's verdict: Accepted or Closing.
    let keepalive = loop {
        match chan.next_frame().map_err(proto_err)? {
            Some(f) => match Frame::decode(&f).map_err(proto_err)? {
                Frame::Accepted { keepalive_secs } => break Duration::from_secs(keepalive_secs.max(1) as u64),
                Frame::Closing { reason } => return Err(RelayError::Refused(reason.to_string())),
                other => return Err(RelayError::Protocol(format!("unexpected {other:?} before Accepted"))),
            },
            None => {
                let n = read_more(&mut s, &mut rbuf).await?;
                chan.push_wire(&rbuf[..n]).map_err(proto_err)?;
            }
        }
    };

    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared { counters: Counters::default(), end: Mutex::new(None), stop });
    let (out_tx, out_rx) = mpsc::channel(opts.send_queue.max(1));
    let (in_tx, in_rx) = mpsc::channel(opts.recv_queue.max(1));
    let chan = Arc::new(Mutex::new(chan));
    let (r, w) = tokio::io::split(s);
    let reader = tokio::spawn(read_loop(r, chan.clone(), in_tx, shared.clone(), keepalive, rbuf));
    let writer = tokio::spawn(write_loop(w, chan, out_rx, shared.clone(), keepalive));
    Ok((RelaySender { tx: out_tx, shared: shared.clone() }, RelayReceiver { rx: in_rx, shared, tasks: vec![reader, writer] }))
}

/// How long the reader waits for room in a full receive queue before it
/// drops: enough for a busy owner to catch up, little enough that an
/// owner that stopped reading costs one wait, not one per datagram.
const RECV_WAIT: Duration = Duration::from_millis(50);

/// Handles one frame from the relay: a datagram to deliver, or nothing;
/// `Err` ends the connection.
fn on_frame(f: Vec<u8>, in_tx: &mpsc::Sender<RelayEvent>, shared: &Shared) -> Result<Option<RelayEvent>, RelayError> {
    let c = &shared.counters;
    match Frame::decode(&f).map_err(proto_err)? {
        Frame::Recv { src, datagram } => {
            c.received_packets.fetch_add(1, Ordering::Relaxed);
            c.received_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
            // The frame's own buffer becomes the datagram: no allocation.
            let header = f.len() - datagram.len();
            let mut data = f;
            data.drain(..header);
            return Ok(Some(RelayEvent::Datagram { src, data }));
        }
        Frame::PeerGone { key } => {
            let _ = in_tx.try_send(RelayEvent::PeerGone(key));
        }
        Frame::KeepAlive => {}
        Frame::Closing { reason } => return Err(RelayError::Closed(reason.to_string())),
        other => return Err(RelayError::Protocol(format!("unexpected frame from the relay: {other:?}"))),
    }
    Ok(None)
}

/// Queues a datagram for the owner, waiting up to [`RECV_WAIT`] for room
/// unless the last wait already ran out (`stuck`, cleared once there is
/// room); what does not fit is dropped and counted.
async fn deliver(ev: RelayEvent, in_tx: &mpsc::Sender<RelayEvent>, shared: &Shared, stuck: &mut bool) -> Result<(), RelayError> {
    let closed = || RelayError::Closed("receiver dropped".into());
    let ev = match in_tx.try_send(ev) {
        Ok(()) => {
            *stuck = false;
            return Ok(());
        }
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(closed()),
        Err(mpsc::error::TrySendError::Full(ev)) => ev,
    };
    if !*stuck {
        match tokio::time::timeout(RECV_WAIT, in_tx.send(ev)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(closed()),
            Err(_) => *stuck = true,
        }
    }
    shared.counters.dropped_recv_full.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    chan: Arc<Mutex<SecureChannel>>,
    in_tx: mpsc::Sender<RelayEvent>,
    shared: Arc<Shared>,
    keepalive: Duration,
    mut rbuf: Vec<u8>,
) {
    let idle_limit = keepalive * 3 + Duration::from_secs(5);
    let mut stop = shared.stop.subscribe();
    let mut last_rx = Instant::now();
    let mut frames = Vec::new();
    let mut stuck = false;
    let end = 'outer: loop {
        // Frames may already be buffered (they can arrive with Accepted).
        {
            let mut ch = chan.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match ch.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => break 'outer proto_err(e),
                }
            }
        }
        for f in frames.drain(..) {
            let delivered = match on_frame(f, &in_tx, &shared) {
                Ok(Some(ev)) => deliver(ev, &in_tx, &shared, &mut stuck).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = delivered {
                break 'outer e;
            }
        }
        tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break RelayError::Closed("closed".into()),
            n = r.read(&mut rbuf) => {
                let n = match n {
                    Ok(0) => break RelayError::Closed("the relay closed the connection".into()),
                    Ok(n) => n,
                    Err(e) => break RelayError::Closed(e.to_string()),
                };
                last_rx = Instant::now();
                if let Err(e) = chan.lock().unwrap_or_else(|e| e.into_inner()).push_wire(&rbuf[..n]) {
                    break proto_err(e);
                }
            }
            _ = tokio::time::sleep_until(last_rx + idle_limit) => {
                break RelayError::Timeout(format!("the relay has been silent for {:?}", last_rx.elapsed()));
            }
        }
    };
    shared.finish(end);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    chan: Arc<Mutex<SecureChannel>>,
    mut out_rx: mpsc::Receiver<(Key, Vec<u8>)>,
    shared: Arc<Shared>,
    keepalive: Duration,
) {
    const BATCH: usize = 256 * 1024;
    let stall_limit = keepalive * 3 + Duration::from_secs(5);
    let mut stop = shared.stop.subscribe();
    let mut ka = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut plain = Vec::with_capacity(64 * 1024);
    let mut senders_gone = false;
    let c = &shared.counters;
    let end: Option<RelayError> = loop {
        out.clear();
        tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break None,
            m = out_rx.recv(), if !senders_gone => {
                let Some(mut m) = m else { senders_gone = true; continue };
                // Everything queued (up to BATCH) framed back to back and
                // sealed as full-size Noise messages, not one per datagram.
                plain.clear();
                let (mut packets, mut bytes) = (0u64, 0u64);
                loop {
                    push_frame(&Frame::Send { dst: m.0, datagram: &m.1 }, &mut plain);
                    packets += 1;
                    bytes += m.1.len() as u64;
                    if plain.len() >= BATCH {
                        break;
                    }
                    match out_rx.try_recv() {
                        Ok(next) => m = next,
                        Err(_) => break,
                    }
                }
                if let Err(e) = chan.lock().unwrap_or_else(|e| e.into_inner()).seal_raw(&plain, &mut out) {
                    break Some(proto_err(e));
                }
                c.sent_packets.fetch_add(packets, Ordering::Relaxed);
                c.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            _ = ka.tick() => {
                if let Err(e) = chan.lock().unwrap_or_else(|e| e.into_inner()).seal_frame(&Frame::KeepAlive.to_vec(), &mut out) {
                    break Some(proto_err(e));
                }
            }
        }
        if !out.is_empty() {
            match tokio::time::timeout(stall_limit, w.write_all(&out)).await {
                Ok(Ok(())) => ka.reset(),
                Ok(Err(e)) => break Some(RelayError::Closed(format!("write: {e}"))),
                Err(_) => break Some(RelayError::Timeout(format!("writes to the relay stalled for {stall_limit:?}"))),
            }
        }
    };
    if let Some(e) = end {
        shared.finish(e);
    }
    // Dropping `out_rx` makes further sends fail with `Closed`.
    drop(out_rx);
    let _ = tokio::time::timeout(Duration::from_secs(2), w.shutdown()).await;
}
