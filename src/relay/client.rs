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
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;

use super::RELAY_PATH;
use super::proto::{Frame, MAX_DATAGRAM, MAX_FRAME, push_frame};
use crate::control::UPGRADE_RELAY;
use crate::control::transport::{ControlUrl, DialError, dial};
use crate::control::upgrade::Stream;
use crate::control::wire::frame::{FRAME_HEADER, WireDecoder, frame_at};
use crate::control::wire::http;
use crate::control::wire::noise::{Initiator, Plain, SecureChannel};
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

/// Send frames waiting for the writer, framed back to back as they will be
/// sealed: `send` encodes into it directly (no allocation, no channel hop
/// per datagram) and the writer swaps it for its empty spare.
#[derive(Default)]
struct Pending {
    plain: Vec<u8>,
    packets: u64,
    bytes: u64,
}

struct Shared {
    counters: Counters,
    end: Mutex<Option<RelayError>>,
    stop: watch::Sender<bool>,
    pending: Mutex<Pending>,
    /// `send` made `pending` non-empty.
    wake_writer: Notify,
    send_queue: u64,
    /// Room in the receive queue, in datagrams (the owner gives it back as it reads).
    recv_room: Semaphore,
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

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Most bytes queued for sending, whatever the datagram count.
const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// The sending half: cheap to clone, usable from sync code (never blocks).
#[derive(Clone)]
pub struct RelaySender {
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
        let mut p = self.shared.pending();
        if p.packets >= self.shared.send_queue || p.plain.len() + datagram.len() > MAX_PENDING_BYTES {
            drop(p);
            self.shared.counters.dropped_send_full.fetch_add(1, Ordering::Relaxed);
            return Err(SendError::Full);
        }
        push_frame(&Frame::Send { dst: *dst, datagram }, &mut p.plain);
        p.packets += 1;
        p.bytes += datagram.len() as u64;
        let first = p.packets == 1;
        drop(p);
        if first {
            self.shared.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Has the connection ended?
    pub fn is_closed(&self) -> bool {
        *self.shared.stop.borrow()
    }

    /// Counters of this connection (shared by both halves).
    pub fn stats(&self) -> RelayClientStats {
        self.shared.counters.snapshot()
    }
}

/// Datagrams from one read of the relay connection, left where they were
/// decrypted: one buffer per batch instead of one allocation and one task
/// hop per datagram.
pub(crate) struct RelayBatch {
    buf: Vec<u8>,
    datagrams: Vec<(Key, std::ops::Range<usize>)>,
}

impl RelayBatch {
    /// (source node key, datagram) in arrival order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &[u8])> {
        self.datagrams.iter().map(|(k, r)| (k, &self.buf[r.clone()]))
    }

    /// How many datagrams.
    pub(crate) fn len(&self) -> usize {
        self.datagrams.len()
    }

    /// No datagrams?
    pub(crate) fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// A read that brought few bytes would otherwise pin a whole read
    /// buffer (128 KiB or more) in the receive queue, which is bounded in
    /// datagrams, not bytes: a peer trickling single datagrams while we are
    /// slow to read could make 1024 of them hold 128 MiB. Such a batch gets
    /// a buffer of its datagrams' size; a bulk read (mostly datagrams) keeps
    /// its buffer and costs no copy.
    fn compact_if_sparse(&mut self) {
        let used: usize = self.datagrams.iter().map(|(_, r)| r.len()).sum();
        if used.saturating_mul(4) >= self.buf.capacity() {
            return;
        }
        let mut buf = Vec::with_capacity(used);
        for (_, r) in &mut self.datagrams {
            let start = buf.len();
            buf.extend_from_slice(&self.buf[r.clone()]);
            *r = start..buf.len();
        }
        self.buf = buf;
    }
}

/// What the reader hands the owner.
enum Inbound {
    Batch(RelayBatch),
    PeerGone(Key),
}

/// The receiving half; owns the connection (dropping it closes it).
pub struct RelayReceiver {
    rx: mpsc::UnboundedReceiver<Inbound>,
    /// A batch being read datagram by datagram, and how far.
    current: Option<(RelayBatch, usize)>,
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
        if let Some(ev) = self.take_current() {
            return Ok(ev);
        }
        match self.rx.recv().await {
            Some(i) => Ok(self.open(i)),
            None => Err(self.end_reason()),
        }
    }

    /// Non-blocking: `Ok(None)` when nothing is queued.
    pub fn try_recv_event(&mut self) -> Result<Option<RelayEvent>, RelayError> {
        if let Some(ev) = self.take_current() {
            return Ok(Some(ev));
        }
        match self.rx.try_recv() {
            Ok(i) => Ok(Some(self.open(i))),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(self.end_reason()),
        }
    }

    /// The datagrams of the next read from the relay, all at once (what the
    /// data plane takes: one wakeup per batch). `PeerGone` notices are
    /// skipped.
    pub(crate) async fn recv_batch(&mut self) -> Result<RelayBatch, RelayError> {
        if let Some((mut b, i)) = self.current.take() {
            b.datagrams.drain(..i);
            self.shared.recv_room.add_permits(b.len());
            return Ok(b);
        }
        loop {
            match self.rx.recv().await {
                Some(Inbound::Batch(b)) => {
                    self.shared.recv_room.add_permits(b.len());
                    return Ok(b);
                }
                Some(Inbound::PeerGone(_)) => {}
                None => return Err(self.end_reason()),
            }
        }
    }

    fn take_current(&mut self) -> Option<RelayEvent> {
        let (b, i) = self.current.as_mut()?;
        let (src, r) = b.datagrams.get(*i)?.clone();
        *i += 1;
        let ev = RelayEvent::Datagram { src, data: b.buf[r].to_vec() };
        if *i == b.datagrams.len() {
            self.current = None;
        }
        self.shared.recv_room.add_permits(1);
        Some(ev)
    }

    fn open(&mut self, i: Inbound) -> RelayEvent {
        match i {
            Inbound::PeerGone(k) => RelayEvent::PeerGone(k),
            Inbound::Batch(b) => {
                self.current = Some((b, 0));
                // A batch is never empty.
                self.take_current().unwrap_or(RelayEvent::PeerGone([0; 32]))
            }
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
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        end: Mutex::new(None),
        stop,
        pending: Mutex::new(Pending::default()),
        wake_writer: Notify::new(),
        send_queue: opts.send_queue.max(1) as u64,
        recv_room: Semaphore::new(opts.recv_queue.clamp(1, Semaphore::MAX_PERMITS)),
    });
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let chan = Arc::new(Mutex::new(chan));
    let (r, w) = tokio::io::split(s);
    let reader = tokio::spawn(read_loop(r, chan.clone(), in_tx, shared.clone(), keepalive, rbuf));
    let writer = tokio::spawn(write_loop(w, chan, shared.clone(), keepalive));
    Ok((RelaySender { shared: shared.clone() }, RelayReceiver { rx: in_rx, current: None, shared, tasks: vec![reader, writer] }))
}

/// How long the reader waits for room in a full receive queue before it
/// drops: enough for a busy owner to catch up, little enough that an
/// owner that stopped reading costs one wait, not one per datagram.
const RECV_WAIT: Duration = Duration::from_millis(50);

/// Bytes the reader decrypts into before handing a batch over: the size
/// of its largest read plus a frame cut by it.
const PLAIN_BUFFER: usize = 128 * 1024;

/// Takes the frames `plain` holds: datagrams into `batch` (by range),
/// notices to the owner; `Err` ends the connection. Returns how many bytes
/// of `plain` were whole frames.
fn take_frames(
    plain: &[u8],
    batch: &mut Vec<(Key, std::ops::Range<usize>)>,
    in_tx: &mpsc::UnboundedSender<Inbound>,
    shared: &Shared,
) -> Result<usize, RelayError> {
    let mut at = 0;
    while let Some(len) = frame_at(&plain[at..], MAX_FRAME).map_err(proto_err)? {
        let body = at + FRAME_HEADER..at + FRAME_HEADER + len;
        match Frame::decode(&plain[body.clone()]).map_err(proto_err)? {
            Frame::Recv { src, datagram } => {
                batch.push((src, body.end - datagram.len()..body.end));
            }
            Frame::PeerGone { key } => {
                if let Ok(p) = shared.recv_room.try_acquire() {
                    p.forget();
                    let _ = in_tx.send(Inbound::PeerGone(key));
                }
            }
            Frame::KeepAlive => {}
            Frame::Closing { reason } => return Err(RelayError::Closed(reason.to_string())),
            other => return Err(RelayError::Protocol(format!("unexpected frame from the relay: {other:?}"))),
        }
        at = body.end;
    }
    Ok(at)
}

/// Queues a batch for the owner, waiting up to [`RECV_WAIT`] for room
/// unless the last wait already ran out (`stuck`, cleared once there is
/// room); the datagrams that do not fit are dropped and counted.
async fn deliver(mut b: RelayBatch, in_tx: &mpsc::UnboundedSender<Inbound>, shared: &Shared, stuck: &mut bool) -> Result<(), RelayError> {
    let room = &shared.recv_room;
    let c = &shared.counters;
    // Counted once the batch's fate is decided (a reader of the counters
    // sees received = delivered + dropped).
    let bytes: usize = b.datagrams.iter().map(|(_, r)| r.len()).sum();
    let want = b.len().min(u32::MAX as usize) as u32;
    let got = match room.try_acquire_many(want) {
        Ok(p) => {
            *stuck = false;
            p.forget();
            want
        }
        Err(_) => {
            let waited = match *stuck {
                false => tokio::time::timeout(RECV_WAIT, room.acquire_many(want)).await.ok(),
                true => None,
            };
            match waited {
                Some(Ok(p)) => {
                    p.forget();
                    want
                }
                Some(Err(_)) => return Err(RelayError::Closed("receiver dropped".into())),
                None => {
                    *stuck = true;
                    // What fits goes through; the rest is dropped.
                    let n = (room.available_permits() as u32).min(want);
                    if n > 0 {
                        room.try_acquire_many(n).map(|p| p.forget()).ok();
                    }
                    n
                }
            }
        }
    };
    c.dropped_recv_full.fetch_add((want - got) as u64, Ordering::Relaxed);
    c.received_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    c.received_packets.fetch_add(b.len() as u64, Ordering::Relaxed);
    b.datagrams.truncate(got as usize);
    if !b.is_empty() && in_tx.send(Inbound::Batch(b)).is_err() {
        return Err(RelayError::Closed("receiver dropped".into()));
    }
    Ok(())
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    chan: Arc<Mutex<SecureChannel>>,
    in_tx: mpsc::UnboundedSender<Inbound>,
    shared: Arc<Shared>,
    keepalive: Duration,
    mut rbuf: Vec<u8>,
) {
    let idle_limit = keepalive * 3 + Duration::from_secs(5);
    let mut stop = shared.stop.subscribe();
    let mut last_rx = Instant::now();
    let mut stuck = false;
    let mut plain = Plain::default();
    // Frames may already be buffered (they can arrive with Accepted).
    let mut fresh = 0;
    let end = loop {
        if let Err(e) = chan.lock().unwrap_or_else(|e| e.into_inner()).open_into(&rbuf[..fresh], &mut plain) {
            break proto_err(e);
        }
        let mut datagrams = Vec::new();
        let whole = match take_frames(plain.data(), &mut datagrams, &in_tx, &shared) {
            Ok(n) => n,
            Err(e) => break e,
        };
        if datagrams.is_empty() {
            plain.consume(whole);
        } else {
            // The batch takes the buffer as it is; only a frame cut by the
            // read is copied, into the next buffer.
            let (buf, range) = plain.take(whole, PLAIN_BUFFER);
            for (_, r) in &mut datagrams {
                *r = r.start + range.start..r.end + range.start;
            }
            let mut batch = RelayBatch { buf, datagrams };
            batch.compact_if_sparse();
            if let Err(e) = deliver(batch, &in_tx, &shared, &mut stuck).await {
                break e;
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
                fresh = n;
            }
            _ = tokio::time::sleep_until(last_rx + idle_limit) => {
                break RelayError::Timeout(format!("the relay has been silent for {:?}", last_rx.elapsed()));
            }
        }
    };
    shared.finish(end);
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, chan: Arc<Mutex<SecureChannel>>, shared: Arc<Shared>, keepalive: Duration) {
    let stall_limit = keepalive * 3 + Duration::from_secs(5);
    let mut stop = shared.stop.subscribe();
    let mut ka = tokio::time::interval_at(Instant::now() + keepalive, keepalive);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut spare = Vec::with_capacity(64 * 1024);
    let c = &shared.counters;
    let end: Option<RelayError> = loop {
        out.clear();
        tokio::select! {
            biased;
            _ = stop.wait_for(|v| *v) => break None,
            _ = shared.wake_writer.notified() => {
                // Everything queued since the last write, framed back to
                // back by `send` and sealed as full-size Noise messages.
                spare.clear();
                let (packets, bytes) = {
                    let mut p = shared.pending();
                    std::mem::swap(&mut p.plain, &mut spare);
                    (std::mem::take(&mut p.packets), std::mem::take(&mut p.bytes))
                };
                if spare.is_empty() {
                    continue;
                }
                if let Err(e) = chan.lock().unwrap_or_else(|e| e.into_inner()).seal_raw(&spare, &mut out) {
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
    // Sends fail with `Closed` from now on (`stop` is set).
    if let Some(e) = end {
        shared.finish(e);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), w.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_batch_does_not_pin_its_read_buffer() {
        let mut buf = vec![0u8; 128 * 1024];
        buf[1000..1100].fill(7);
        buf[5000..5050].fill(9);
        let mut b = RelayBatch { buf, datagrams: vec![([1; 32], 1000..1100), ([2; 32], 5000..5050)] };
        b.compact_if_sparse();
        assert!(b.buf.capacity() < 1024, "{} bytes kept", b.buf.capacity());
        let got: Vec<(Key, Vec<u8>)> = b.iter().map(|(k, d)| (*k, d.to_vec())).collect();
        assert_eq!(got, vec![([1; 32], vec![7; 100]), ([2; 32], vec![9; 50])]);
        // A full read keeps its buffer: no copy on the bulk path.
        let mut full = RelayBatch { buf: vec![3u8; 4096], datagrams: vec![([1; 32], 0..2000), ([2; 32], 2000..4000)] };
        let ptr = full.buf.as_ptr();
        full.compact_if_sparse();
        assert_eq!(full.buf.as_ptr(), ptr);
    }
}
