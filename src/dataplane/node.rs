//! The data-plane driver: one UDP socket, the relay link, the sans-IO
//! [`Core`] and the netstack, moved by a single tokio task.
//!
//! All protocol logic lives in `core::Core` (WireGuard, paths, disco, STUN)
//! and `netstack::Stack`; this task only reads datagrams, hands them to the
//! cores with the time, writes what they emit and sleeps until the earliest
//! deadline they report. The core and the stack sit behind separate mutexes,
//! never held together, so application tasks reading and writing streams
//! contend only with the (short) stack phase of the loop.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::dataplane::core::{Core, Event, Transmit};
use crate::dataplane::disco;
use crate::dataplane::filter::{Filter, Judge};
use crate::dataplane::netstack::{Accepted, Shared, Stack, TcpListener, TcpStream};
use crate::dataplane::path::Route;
use crate::dataplane::udp::{RecvBatch, SendQueue, UdpSocket};
use crate::dataplane::wg::{self, PeerConfig};
use crate::key::{Key, PrivateKey};
use crate::relay::client::RelayBatch;

/// Datagrams handled per wake before the stack runs; bounds latency.
const RX_BATCH: usize = 128;
const ACCEPT_BACKLOG: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`Node::start`] needs: key, tailnet addresses, UDP address, peers.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub(crate) private_key: PrivateKey,
    /// The node's tailnet addresses.
    pub(crate) addresses: Vec<IpAddr>,
    /// UDP address to bind; port 0 picks one.
    pub listen: SocketAddr,
    /// The WireGuard peers to start with.
    pub peers: Vec<PeerConfig>,
    /// Choose per peer between direct UDP (proven by probes) and the relay.
    pub manage_paths: bool,
    /// The inbound filter from the first packet on (`None`: admit every
    /// connection, for library use). Nodes the CLI starts begin with
    /// [`crate::dataplane::filter::DenyAll`] and switch to the policy once it is wired.
    pub(crate) inbound: Option<Arc<dyn Judge>>,
}

impl NodeConfig {
    /// A node with no peers on a kernel-chosen UDP port, paths unmanaged and
    /// no inbound filter.
    pub fn new(private_key: PrivateKey, addresses: Vec<IpAddr>) -> Self {
        NodeConfig {
            private_key,
            addresses,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            peers: Vec::new(),
            manage_paths: false,
            inbound: None,
        }
    }
}

/// State shared between the driver task, the `Node` handle and application
/// tasks. Two locks, never held together: `engine` (the core and the relay
/// link) and `shared` (the TCP/IP stack, which stream reads and writes also
/// take). Packets cross between them in batches the driver owns, so there is
/// no lock order to get wrong.
struct Inner {
    engine: Mutex<Engine>,
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<u16, mpsc::Sender<TcpStream>>>,
    public_endpoint: tokio::sync::watch::Sender<Option<SocketAddr>>,
    shutdown: Notify,
}

/// The sans-IO core and the one piece of I/O it sends through that the
/// `Node` handle can replace at run time.
struct Engine {
    core: Core,
    relay: Option<Arc<dyn RelayLink>>,
}

impl Inner {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        // A panic elsewhere must not take the data plane down with it; the
        // core's state stays consistent between calls.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running tailnet node (data plane only).
pub struct Node {
    inner: Arc<Inner>,
    addresses: std::sync::RwLock<Vec<IpAddr>>,
    udp_addr: SocketAddr,
    task: JoinHandle<()>,
    relay_tx: mpsc::Sender<RelayBatch>,
}

/// One peer as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PeerStatus {
    pub(crate) public_key: String,
    pub(crate) allowed_ips: Vec<String>,
    pub(crate) endpoint: Option<SocketAddr>,
    pub(crate) last_handshake_secs_ago: Option<u64>,
    /// "direct ADDR" or "relay" under path management.
    pub(crate) path: Option<String>,
    pub(crate) last_probe: Option<String>,
    /// New connections (SYNs, pings) from this peer the inbound filter refused.
    pub(crate) refused_inbound: u64,
    /// Bytes exchanged with this peer through the relay.
    pub(crate) relayed: crate::dataplane::core::Relayed,
    #[serde(flatten)]
    pub(crate) stats: wg::PeerStats,
}

/// What `tailgate status` shows of the data plane.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub(crate) public_key: String,
    pub(crate) addresses: Vec<IpAddr>,
    pub(crate) listen: SocketAddr,
    pub(crate) peers: Vec<PeerStatus>,
    #[serde(flatten)]
    /// Datagrams WireGuard dropped, by reason.
    pub stats: wg::GlobalStats,
    /// TCP sockets in the userspace stack (listening ones included).
    pub tcp_sockets: usize,
    /// Loss recovery of the userspace TCP stack, over all connections so far.
    pub(crate) tcp_retransmits: TcpRetransmits,
}

/// smoltcp's loss recovery counters (see ARCHITECTURE.md, "smoltcp patch").
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct TcpRetransmits {
    /// Retransmission timer expiries: stalls of at least 200 ms each.
    pub(crate) timeouts: u64,
    /// Loss episodes repaired by SACK / fast retransmit.
    pub(crate) recoveries: u64,
    pub(crate) retransmitted_segments: u64,
}

impl Node {
    /// Bind the UDP socket, configure peers and start the driver task.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let now = Instant::now();
        let mut core = Core::new(config.private_key.clone(), config.manage_paths, now, disco::unix_micros());
        for p in config.peers {
            core.add_peer(p)?;
        }
        let udp = crate::dataplane::udp::bind(config.listen)?;
        let udp_addr = udp.local_addr()?;
        let mut stack = Stack::new(&config.addresses, now);
        stack.set_filter(config.inbound.map(Filter::new));
        let (public_endpoint, _) = tokio::sync::watch::channel(None);
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_BATCHES);
        let inner = Arc::new(Inner {
            engine: Mutex::new(Engine { core, relay: None }),
            shared: Shared::new(stack),
            listeners: Mutex::new(HashMap::new()),
            public_endpoint,
            shutdown: Notify::new(),
        });
        let task = tokio::spawn(drive(inner.clone(), udp, relay_rx));
        Ok(Node { inner, addresses: std::sync::RwLock::new(config.addresses), udp_addr, task, relay_tx })
    }

    pub(crate) fn addresses(&self) -> Vec<IpAddr> {
        self.addresses.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the node's tailnet addresses.
    pub(crate) fn set_addresses(&self, addresses: Vec<IpAddr>) {
        self.inner.shared.lock().set_addresses(&addresses);
        *self.addresses.write().unwrap_or_else(|e| e.into_inner()) = addresses;
        self.inner.shared.wake.notify_one();
    }

    /// The bound WireGuard UDP address (with the port the kernel chose).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The node's WireGuard public key.
    pub fn public_key(&self) -> Key {
        self.inner.engine().core.public_key()
    }

    /// Accept TCP connections to `port` on the node's tailnet addresses.
    pub fn listen(&self, port: u16) -> io::Result<TcpListener> {
        self.inner.shared.lock().listen(port)?;
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        self.inner.listeners.lock().unwrap_or_else(|e| e.into_inner()).insert(port, tx);
        self.inner.shared.wake.notify_one();
        Ok(TcpListener { port, rx, shared: self.inner.shared.clone() })
    }

    /// Open a TCP connection through the tunnel.
    pub async fn connect(&self, remote: SocketAddr) -> io::Result<TcpStream> {
        let peer = {
            let engine = self.inner.engine();
            let wg = engine.core.wg();
            wg.route(remote.ip()).and_then(|id| wg.peer_key(id)).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    format!("no peer's AllowedIPs contain {}; check the [Peer] sections", remote.ip()),
                )
            })?
        };
        let local_ip = self
            .addresses()
            .iter()
            .find(|a| a.is_ipv4() == remote.is_ipv4())
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "the node has no address of that IP family"))?;
        let (handle, local) = self.inner.shared.lock().connect(local_ip, remote)?;
        let stream = TcpStream::new(self.inner.shared.clone(), handle, local, remote, peer);
        self.inner.shared.wake.notify_one();
        match tokio::time::timeout(CONNECT_TIMEOUT, stream.established()).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connecting to {remote} timed out after {}s (is the peer up and its handshake working?)",
                    CONNECT_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Judge every new inbound connection with `judge` from now on (see
    /// [`crate::dataplane::filter`]). Without a filter the node admits everything.
    pub(crate) fn set_inbound_filter(&self, judge: Arc<dyn Judge>) {
        self.inner.shared.lock().set_filter(Some(Filter::new(judge)));
    }

    /// Re-judge open inbound connections whenever one of `changes` fires
    /// (policy or identity table replaced), for as long as the node runs.
    pub(crate) fn rejudge_on(&self, changes: Vec<tokio::sync::watch::Receiver<u64>>) {
        let inner = Arc::downgrade(&self.inner);
        for mut rx in changes {
            let inner = inner.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let Some(inner) = inner.upgrade() else { return };
                    rejudge(&inner);
                }
            });
        }
    }

    /// Add a peer, or update its AllowedIPs/endpoint keeping its session.
    pub(crate) fn upsert_peer(&self, config: PeerConfig) -> anyhow::Result<()> {
        self.inner.engine().core.upsert_peer(config)?;
        self.inner.shared.wake.notify_one();
        Ok(())
    }

    /// Handshake with this peer now rather than at the first packet (see
    /// [`Core::greet`]).
    pub(crate) fn greet(&self, key: &Key) {
        self.inner.engine().core.greet(key);
        self.inner.shared.wake.notify_one();
    }

    /// Candidate endpoints for a peer (path management only).
    pub fn set_peer_endpoints(&self, key: &Key, endpoints: &[SocketAddr]) {
        self.inner.engine().core.set_peer_endpoints(key, endpoints, Instant::now());
        self.inner.shared.wake.notify_one();
    }

    /// The candidate endpoints path management holds for a peer (at most
    /// [`crate::dataplane::path::MAX_CANDIDATES`]).
    pub fn peer_candidates(&self, key: &Key) -> Vec<SocketAddr> {
        self.inner.engine().core.peer_candidates(key)
    }

    /// Our own endpoints, offered to peers in call-me-maybe.
    pub(crate) fn set_my_endpoints(&self, endpoints: Vec<SocketAddr>) {
        self.inner.engine().core.set_my_endpoints(endpoints);
    }

    /// Use this relay for peers without a proven direct path (`None`: no relay).
    pub(crate) fn set_relay(&self, link: Option<Arc<dyn RelayLink>>) {
        let mut engine = self.inner.engine();
        engine.core.set_relay_up(link.is_some(), Instant::now());
        engine.relay = link;
        drop(engine);
        self.inner.shared.wake.notify_one();
    }

    /// Where a relay task delivers inbound datagrams, a batch per read of
    /// the relay connection (one wakeup of the driver per batch).
    pub(crate) fn relay_inbound(&self) -> mpsc::Sender<RelayBatch> {
        self.relay_tx.clone()
    }

    /// Ask this STUN server for our public endpoint every so often; results
    /// arrive on [`Node::public_endpoint`].
    pub(crate) fn set_stun_server(&self, server: Option<SocketAddr>) {
        self.inner.engine().core.set_stun_server(server, Instant::now());
        self.inner.shared.wake.notify_one();
    }

    pub(crate) fn public_endpoint(&self) -> tokio::sync::watch::Receiver<Option<SocketAddr>> {
        self.inner.public_endpoint.subscribe()
    }

    /// A network change: distrust every direct path and probe again.
    pub(crate) fn network_changed(&self) {
        self.inner.engine().core.network_changed(Instant::now());
        self.inner.shared.wake.notify_one();
    }

    /// Remove a peer and cut its connections.
    pub(crate) fn remove_peer(&self, key: &Key, allowed_ips: &[IpAddr]) {
        self.inner.engine().core.remove_peer(key);
        let mut st = self.inner.shared.lock();
        for ip in allowed_ips {
            st.abort_from(*ip);
        }
        st.forget_peer(key);
        drop(st);
        self.inner.shared.wake.notify_one();
    }

    /// A snapshot of the node, its peers and their paths.
    pub fn status(&self) -> NodeStatus {
        let now = Instant::now();
        let (public_key, stats, mut peers) = {
            let engine = self.inner.engine();
            let core = &engine.core;
            let wg = core.wg();
            let peers: Vec<PeerStatus> = wg
                .peer_ids()
                .filter_map(|id| {
                    let cfg = wg.peer_config(id)?;
                    let stats = wg.peer_stats(id)?.clone();
                    let path = core.path(&cfg.public_key, now);
                    Some(PeerStatus {
                        path: path.as_ref().map(|p| match p.route {
                            Route::Direct(a) => format!("direct {a}"),
                            Route::Relay if core.relay_up() => "relay".to_string(),
                            Route::Relay => "relay (not connected)".to_string(),
                        }),
                        last_probe: path.and_then(|p| p.last_probe),
                        refused_inbound: 0,
                        relayed: core.relayed(&cfg.public_key),
                        public_key: wg::key_to_base64(&cfg.public_key),
                        allowed_ips: cfg.allowed_ips.iter().map(|n| n.to_string()).collect(),
                        endpoint: wg.peer_endpoint(id),
                        last_handshake_secs_ago: stats.last_handshake.map(|t| now.saturating_duration_since(t).as_secs()),
                        stats,
                    })
                })
                .collect();
            (wg.public_key(), wg.stats().clone(), peers)
        };
        let stack = self.inner.shared.lock();
        for p in &mut peers {
            if let Ok(k) = wg::key_from_base64(&p.public_key) {
                p.refused_inbound = stack.refused(&k);
            }
        }
        NodeStatus {
            public_key: wg::key_to_base64(&public_key),
            addresses: self.addresses(),
            listen: self.udp_addr,
            peers,
            stats,
            tcp_sockets: stack.socket_count(),
            tcp_retransmits: {
                let r = stack.retransmit_stats();
                TcpRetransmits { timeouts: r.timeouts, recoveries: r.recoveries, retransmitted_segments: r.retransmitted_segments }
            },
        }
    }

    /// Stop the driver. Open streams fail from now on.
    pub async fn shutdown(mut self) {
        self.inner.shutdown.notify_one();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relay batches queued for the driver (each holds one read's datagrams,
/// 64 KiB or so).
const RELAY_BATCHES: usize = 64;

/// A connection to the relay as the data plane sees it: fire-and-forget
/// datagrams addressed by node key (inbound ones arrive on the channel from
/// [`Node::relay_inbound`]).
pub(crate) trait RelayLink: Send + Sync {
    /// Queue a datagram for `dst`; false if it was dropped (link down or full).
    fn send(&self, dst: &Key, datagram: &[u8]) -> bool;
}

/// Decrypted packets on their way from the core to the stack. The buffers
/// are reused, so the copy costs no allocation once warm.
#[derive(Default)]
struct Batch {
    packets: Vec<(Key, Vec<u8>)>,
    len: usize,
}

impl Batch {
    fn push(&mut self, peer: &Key, packet: &[u8]) {
        if self.len == self.packets.len() {
            self.packets.push((*peer, Vec::with_capacity(packet.len())));
        }
        let (k, buf) = &mut self.packets[self.len];
        *k = *peer;
        buf.clear();
        buf.extend_from_slice(packet);
        self.len += 1;
    }

    fn drain_into(&mut self, stack: &mut Stack, now: Instant) {
        for (k, p) in &self.packets[..self.len] {
            stack.push_inbound(k, p, now);
        }
        self.len = 0;
    }
}

/// The driver's side of [`Transmit`]: the UDP socket, the relay link and
/// the batch for the stack.
struct Io<'a> {
    udp: &'a mut SendQueue,
    relay: Option<&'a dyn RelayLink>,
    inbound: &'a mut Batch,
}

impl Transmit for Io<'_> {
    fn udp(&mut self, to: SocketAddr, data: &[u8]) {
        self.udp.push(to, data)
    }
    fn udp_hops(&mut self, to: SocketAddr, data: &[u8], hops: u8) {
        self.udp.push_with_hops(to, data, hops)
    }
    fn relay(&mut self, to: &Key, data: &[u8]) -> bool {
        self.relay.is_some_and(|r| r.send(to, data))
    }
    fn tunnel(&mut self, peer: &Key, packet: &[u8]) {
        self.inbound.push(peer, packet)
    }
}

/// Run `f` on the core with the driver's I/O, publish its events, then
/// send the datagrams it queued in as few calls as the socket allows (after
/// the lock is released: the kernel's time is not the core's).
fn with_core<R>(
    inner: &Inner,
    udp: &UdpSocket,
    sendq: &mut SendQueue,
    inbound: &mut Batch,
    f: impl FnOnce(&mut Core, &mut Io<'_>) -> R,
) -> R {
    let r = {
        let mut engine = inner.engine();
        let Engine { core, relay } = &mut *engine;
        let mut io = Io { udp: sendq, relay: relay.as_deref(), inbound };
        let r = f(core, &mut io);
        while let Some(ev) = core.poll_event() {
            match ev {
                Event::PublicEndpoint(a) => {
                    inner.public_endpoint.send_replace(Some(a));
                }
            }
        }
        r
    };
    sendq.flush(udp);
    r
}

async fn drive(inner: Arc<Inner>, udp: UdpSocket, mut relay_rx: mpsc::Receiver<RelayBatch>) {
    let mut sendq = SendQueue::default();
    let mut rx = RecvBatch::default();
    let mut accepted = Vec::new();
    let mut outbound = Vec::new();
    let mut inbound = Batch::default();
    let mut relayed: Vec<RelayBatch> = Vec::new();
    with_core(&inner, &udp, &mut sendq, &mut inbound, |core, io| core.start(Instant::now(), io));
    loop {
        let now = Instant::now();
        // Inbound: datagrams (UDP and relayed) and timers through the core.
        while relayed.iter().map(RelayBatch::len).sum::<usize>() < RX_BATCH {
            match relay_rx.try_recv() {
                Ok(d) => relayed.push(d),
                Err(_) => break,
            }
        }
        with_core(&inner, &udp, &mut sendq, &mut inbound, |core, io| {
            // Whole `recvmmsg` batches (each slot maybe a GRO train) until
            // RX_BATCH datagrams or the socket is empty.
            let mut n = 0;
            while n < RX_BATCH {
                match udp.recv(&mut rx) {
                    Ok(()) => {
                        for (from, d) in rx.datagrams() {
                            core.handle_datagram(now, from, d, io);
                            n += 1;
                        }
                        if rx.slots() < quinn_udp::BATCH_SIZE {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here; not fatal.
                        tracing::trace!(error = %e, "UDP receive error");
                        break;
                    }
                }
            }
            for b in relayed.drain(..) {
                for (src, d) in b.iter() {
                    core.handle_relay(now, src, d, io);
                }
            }
            core.handle_timeout(now, io);
        });
        // The stack: inbound packets, timers, socket I/O, outbound packets.
        let stack_deadline = {
            let mut stack = inner.shared.lock();
            inbound.drain_into(&mut stack, now);
            stack.poll(now, &mut accepted);
            outbound.extend(stack.take_outbound());
            stack.poll_at(now)
        };
        if !outbound.is_empty() {
            with_core(&inner, &udp, &mut sendq, &mut inbound, |core, io| {
                for p in &outbound {
                    core.send_ip(now, p, io);
                }
            });
            let mut stack = inner.shared.lock();
            for p in outbound.drain(..) {
                stack.recycle(p);
            }
        }
        if !accepted.is_empty() {
            deliver_accepted(&inner, &mut accepted);
        }

        let mut deadline = inner.engine().core.poll_timeout();
        if let Some(s) = stack_deadline {
            deadline = deadline.min(s);
        }
        if deadline <= Instant::now() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            biased;
            _ = inner.shutdown.notified() => break,
            _ = inner.shared.wake.notified() => {}
            r = udp.readable() => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "UDP socket failed; the node stops");
                    break;
                }
            }
            Some(d) = relay_rx.recv() => relayed.push(d),
            _ = udp.writable(), if !sendq.is_empty() => { sendq.flush(&udp); }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

fn rejudge(inner: &Inner) -> usize {
    // Inner sources were checked against their peer's AllowedIPs on receipt,
    // so the route of a remote address names the peer that owns it.
    let routes = inner.engine().core.wg().route_table();
    let n = inner.shared.lock().rejudge(|ip| routes.peer_of(ip));
    if n > 0 {
        inner.shared.wake.notify_one();
    }
    n
}

fn deliver_accepted(inner: &Arc<Inner>, accepted: &mut Vec<Accepted>) {
    let mut streams = Vec::new();
    {
        let engine = inner.engine();
        let wg = engine.core.wg();
        for a in accepted.drain(..) {
            // The inner source was checked against this peer's AllowedIPs when it
            // was decrypted, so the route for the remote address names the peer.
            let peer = wg.route(a.remote.ip()).and_then(|id| wg.peer_key(id));
            streams.push((a.port, peer, TcpStream::new(inner.shared.clone(), a.handle, a.local, a.remote, peer.unwrap_or_default())));
        }
    }
    let listeners = inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
    for (port, peer, mut stream) in streams {
        if peer.is_none() {
            stream.abort(); // peer removed while connecting
            continue;
        }
        match listeners.get(&port) {
            Some(tx) => {
                if let Err(e) = tx.try_send(stream) {
                    let mut s = match e {
                        mpsc::error::TrySendError::Full(s) | mpsc::error::TrySendError::Closed(s) => s,
                    };
                    tracing::warn!(port, "accept backlog full; resetting connection");
                    s.abort();
                }
            }
            None => stream.abort(),
        }
    }
}
