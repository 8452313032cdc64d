//! The data-plane driver: one UDP socket, the WireGuard core and the netstack,
//! moved by a single tokio task.
//!
//! All protocol logic lives in `wg::Wg` and `netstack::Stack`; this task only
//! reads datagrams, hands them to the cores, and writes what they emit. The
//! two cores sit behind separate mutexes so application tasks reading and
//! writing streams contend only with the (short) stack phase of the loop.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::dataplane::disco;
use crate::dataplane::filter::{Filter, Judge};
use crate::dataplane::netstack::{Accepted, Shared, Stack, TcpListener, TcpStream};
use crate::dataplane::path::{Action as PathAction, PathState, Route};
use crate::dataplane::wg::{self, Output, PeerConfig, Wg};
use crate::key::Key;

/// Datagrams handled per wake before the stack runs; bounds latency.
const RX_BATCH: usize = 128;
const ACCEPT_BACKLOG: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub private_key: Key,
    /// The node's tailnet addresses.
    pub addresses: Vec<IpAddr>,
    /// UDP address to bind; port 0 picks one.
    pub listen: SocketAddr,
    pub peers: Vec<PeerConfig>,
    /// Choose per peer between direct UDP (proven by probes) and the relay.
    pub manage_paths: bool,
    /// The inbound filter from the first packet on (`None`: admit every
    /// connection, for library use). Nodes the CLI starts begin with
    /// [`crate::dataplane::filter::DenyAll`] and switch to the policy once it is wired.
    pub inbound: Option<Arc<dyn Judge>>,
}

impl NodeConfig {
    pub fn new(private_key: Key, addresses: Vec<IpAddr>) -> Self {
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

struct Inner {
    wg: Mutex<Wg>,
    paths: Mutex<Paths>,
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<u16, mpsc::Sender<TcpStream>>>,
    shutdown: Notify,
}

impl Inner {
    // Lock order: wg, then stack, then paths.
    fn wg(&self) -> MutexGuard<'_, Wg> {
        self.wg.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn paths(&self) -> MutexGuard<'_, Paths> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running tailnet node (data plane only).
pub struct Node {
    inner: Arc<Inner>,
    addresses: std::sync::RwLock<Vec<IpAddr>>,
    udp_addr: SocketAddr,
    task: JoinHandle<()>,
    relay_tx: mpsc::Sender<(Key, Vec<u8>)>,
}

/// One peer as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs_ago: Option<u64>,
    /// "direct ADDR" or "relay" under path management.
    pub path: Option<String>,
    pub last_probe: Option<String>,
    /// New connections (SYNs, pings) from this peer the inbound filter refused.
    pub refused_inbound: u64,
    #[serde(flatten)]
    pub stats: wg::PeerStats,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub public_key: String,
    pub addresses: Vec<IpAddr>,
    pub listen: SocketAddr,
    pub peers: Vec<PeerStatus>,
    #[serde(flatten)]
    pub stats: wg::GlobalStats,
    pub tcp_sockets: usize,
    /// Loss recovery of the userspace TCP stack, over all connections so far.
    pub tcp_retransmits: TcpRetransmits,
}

/// smoltcp's loss recovery counters (see ARCHITECTURE.md, "smoltcp patch").
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TcpRetransmits {
    /// Retransmission timer expiries: stalls of at least 200 ms each.
    pub timeouts: u64,
    /// Loss episodes repaired by SACK / fast retransmit.
    pub recoveries: u64,
    pub retransmitted_segments: u64,
}

impl Node {
    /// Bind the UDP socket, configure peers and start the driver task.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let now = Instant::now();
        let mut wg = Wg::new(config.private_key, now);
        for p in config.peers {
            wg.add_peer(p)?;
        }
        let udp = crate::dataplane::udp::bind(config.listen)?;
        let udp_addr = udp.local_addr()?;
        let mut stack = Stack::new(&config.addresses, now);
        stack.set_filter(config.inbound.map(Filter::new));
        let (public_endpoint, _) = tokio::sync::watch::channel(None);
        let paths = Paths {
            enabled: config.manage_paths,
            private_key: config.private_key,
            states: HashMap::new(),
            my_endpoints: Vec::new(),
            relay: None,
            stun_server: None,
            stun_tx: None,
            next_stun: now,
            public_endpoint,
            relayed_out: 0,
            relayed_in: 0,
            disco_counter: disco::Counter::default(),
        };
        let (relay_tx, relay_rx) = mpsc::channel(4096);
        let inner = Arc::new(Inner {
            wg: Mutex::new(wg),
            paths: Mutex::new(paths),
            shared: Shared::new(stack),
            listeners: Mutex::new(HashMap::new()),
            shutdown: Notify::new(),
        });
        let task = tokio::spawn(drive(inner.clone(), udp, relay_rx));
        Ok(Node { inner, addresses: std::sync::RwLock::new(config.addresses), udp_addr, task, relay_tx })
    }

    pub fn addresses(&self) -> Vec<IpAddr> {
        self.addresses.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replace the node's tailnet addresses.
    pub fn set_addresses(&self, addresses: Vec<IpAddr>) {
        self.inner.shared.lock().set_addresses(&addresses);
        *self.addresses.write().unwrap_or_else(|e| e.into_inner()) = addresses;
        self.inner.shared.wake.notify_one();
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    pub fn public_key(&self) -> Key {
        self.inner.wg().public_key()
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
            let wg = self.inner.wg();
            let id = wg.route(remote.ip()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    format!("no peer's AllowedIPs contain {}; check the [Peer] sections", remote.ip()),
                )
            })?;
            wg.peer_key(id).expect("routed peer exists")
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
    pub fn set_inbound_filter(&self, judge: Arc<dyn Judge>) {
        self.inner.shared.lock().set_filter(Some(Filter::new(judge)));
    }

    /// Re-judge open inbound connections now; returns how many were reset.
    pub fn rejudge_inbound(&self) -> usize {
        rejudge(&self.inner)
    }

    /// Re-judge open inbound connections whenever one of `changes` fires
    /// (policy or identity table replaced), for as long as the node runs.
    pub fn rejudge_on(&self, changes: Vec<tokio::sync::watch::Receiver<u64>>) {
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
    pub fn upsert_peer(&self, config: PeerConfig) -> anyhow::Result<()> {
        self.inner.wg().upsert_peer(config)?;
        self.inner.shared.wake.notify_one();
        Ok(())
    }

    /// Candidate endpoints for a peer (path management only).
    pub fn set_peer_endpoints(&self, key: &Key, endpoints: &[SocketAddr]) {
        let now = Instant::now();
        let mut p = self.inner.paths();
        if p.enabled {
            p.states.entry(*key).or_insert_with(|| PathState::new(now)).set_candidates(endpoints, now);
        }
        drop(p);
        self.inner.shared.wake.notify_one();
    }

    /// The candidate endpoints path management holds for a peer (at most
    /// [`crate::dataplane::path::MAX_CANDIDATES`]).
    pub fn peer_candidates(&self, key: &Key) -> Vec<SocketAddr> {
        let p = self.inner.paths();
        let mut v: Vec<SocketAddr> = p.states.get(key).map(|s| s.candidates().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Our own endpoints, offered to peers in call-me-maybe.
    pub fn set_my_endpoints(&self, endpoints: Vec<SocketAddr>) {
        self.inner.paths().my_endpoints = endpoints;
    }

    /// Use this relay for peers without a proven direct path (`None`: no relay).
    pub fn set_relay(&self, link: Option<Arc<dyn RelayLink>>) {
        self.inner.paths().relay = link;
        self.inner.shared.wake.notify_one();
    }

    /// Where a relay task delivers inbound datagrams: (source node key, datagram).
    pub fn relay_inbound(&self) -> mpsc::Sender<(Key, Vec<u8>)> {
        self.relay_tx.clone()
    }

    /// Ask this STUN server for our public endpoint every so often; results
    /// arrive on [`Node::public_endpoint`].
    pub fn set_stun_server(&self, server: Option<SocketAddr>) {
        let mut p = self.inner.paths();
        p.stun_server = server;
        p.next_stun = Instant::now();
        drop(p);
        self.inner.shared.wake.notify_one();
    }

    pub fn public_endpoint(&self) -> tokio::sync::watch::Receiver<Option<SocketAddr>> {
        self.inner.paths().public_endpoint.subscribe()
    }

    /// A network change: distrust every direct path and probe again.
    pub fn network_changed(&self) {
        let now = Instant::now();
        for st in self.inner.paths().states.values_mut() {
            st.reset(now);
        }
        self.inner.shared.wake.notify_one();
    }

    /// Remove a peer and cut its connections.
    pub fn remove_peer(&self, key: &Key, allowed_ips: &[IpAddr]) {
        self.inner.wg().remove_peer(key);
        self.inner.paths().states.remove(key);
        let mut st = self.inner.shared.lock();
        for ip in allowed_ips {
            st.abort_from(*ip);
        }
        st.forget_peer(key);
        drop(st);
        self.inner.shared.wake.notify_one();
    }

    pub fn status(&self) -> NodeStatus {
        let now = Instant::now();
        let wg = self.inner.wg();
        let stack = self.inner.shared.lock();
        let paths = self.inner.paths();
        let peers = wg
            .peer_ids()
            .filter_map(|id| {
                let cfg = wg.peer_config(id)?;
                let stats = wg.peer_stats(id)?.clone();
                let st = paths.states.get(&cfg.public_key).filter(|_| paths.enabled);
                Some(PeerStatus {
                    path: st.map(|s| match s.route(now) {
                        Route::Direct(a) => format!("direct {a}"),
                        Route::Relay if paths.relay.is_some() => "relay".to_string(),
                        Route::Relay => "relay (not connected)".to_string(),
                    }),
                    last_probe: st.and_then(|s| s.last_result.clone()),
                    refused_inbound: stack.refused(&cfg.public_key),
                    public_key: wg::key_to_base64(&cfg.public_key),
                    allowed_ips: cfg.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    endpoint: wg.peer_endpoint(id),
                    last_handshake_secs_ago: stats.last_handshake.map(|t| t.elapsed().as_secs()),
                    stats,
                })
            })
            .collect();
        NodeStatus {
            public_key: wg::key_to_base64(&wg.public_key()),
            addresses: self.addresses(),
            listen: self.udp_addr,
            peers,
            stats: wg.stats().clone(),
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

/// A connection to the relay as the data plane sees it: fire-and-forget
/// datagrams addressed by node key (inbound ones arrive on the channel from
/// [`Node::relay_inbound`]).
pub trait RelayLink: Send + Sync {
    /// Queue a datagram for `dst`; false if it was dropped (link down or full).
    fn send(&self, dst: &Key, datagram: &[u8]) -> bool;
}

/// Path management (control mode): per-peer direct/relay choice, probes,
/// the relay link and STUN. Static mode leaves it disabled and sends to
/// WireGuard's endpoint like any WireGuard implementation.
struct Paths {
    enabled: bool,
    private_key: Key,
    states: HashMap<Key, PathState>,
    /// Our own candidate endpoints, offered in call-me-maybe.
    my_endpoints: Vec<SocketAddr>,
    relay: Option<Arc<dyn RelayLink>>,
    stun_server: Option<SocketAddr>,
    stun_tx: Option<[u8; 12]>,
    next_stun: Instant,
    public_endpoint: tokio::sync::watch::Sender<Option<SocketAddr>>,
    relayed_out: u64,
    relayed_in: u64,
    /// Numbers every disco message we send (peers drop replays by it).
    disco_counter: disco::Counter,
}

const STUN_INTERVAL: Duration = Duration::from_secs(20);

/// Where one outgoing datagram goes.
enum Dest {
    Udp(SocketAddr),
    Relay(Key),
    Nowhere,
}

impl Paths {
    fn seal(&mut self, to: &Key, msg: &disco::Message) -> Vec<u8> {
        let counter = self.disco_counter.next(disco::unix_micros());
        disco::seal(&self.private_key, to, counter, msg)
    }

    fn dest(&self, peer: Option<Key>, to: Option<SocketAddr>, now: Instant) -> Dest {
        if self.enabled
            && let Some(k) = peer
        {
            if to == Some(wg::RELAYED) {
                return Dest::Relay(k);
            }
            if let Some(st) = self.states.get(&k) {
                return match st.route(now) {
                    Route::Direct(a) => Dest::Udp(a),
                    Route::Relay if self.relay.is_some() => Dest::Relay(k),
                    // No relay: best effort straight at what WireGuard knows,
                    // under the same address rule as probes.
                    Route::Relay => to.filter(crate::dataplane::endpoint::is_valid_endpoint).map_or(Dest::Nowhere, Dest::Udp),
                };
            }
        }
        match to {
            Some(a) if a != wg::RELAYED => Dest::Udp(a),
            _ => Dest::Nowhere,
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        let d = self.states.values().map(PathState::next_deadline).min();
        let stun = self.stun_server.map(|_| self.next_stun);
        match (d, stun) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Datagrams the kernel would not take yet; sent when the socket is writable.
struct Sender<'a> {
    udp: &'a UdpSocket,
    backlog: VecDeque<(SocketAddr, Vec<u8>)>,
}

impl Sender<'_> {
    fn send(&mut self, to: SocketAddr, data: &[u8]) {
        if self.backlog.is_empty() {
            match self.udp.try_send_to(data, to) {
                Ok(_) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(%to, error = %e, "UDP send failed");
                    return;
                }
            }
        }
        if self.backlog.len() < 4096 {
            self.backlog.push_back((to, data.to_vec()));
        }
    }

    /// Send one WireGuard output along the path chosen for its peer.
    fn output(&mut self, paths: &mut Paths, now: Instant, peer: Option<Key>, to: Option<SocketAddr>, data: &[u8]) {
        match paths.dest(peer, to, now) {
            Dest::Udp(a) => self.send(a, data),
            Dest::Relay(k) => {
                if let Some(r) = &paths.relay
                    && r.send(&k, data)
                {
                    paths.relayed_out += 1;
                }
            }
            Dest::Nowhere => {}
        }
    }

    fn flush(&mut self) {
        while let Some((to, data)) = self.backlog.front() {
            match self.udp.try_send_to(data, *to) {
                Ok(_) => {
                    self.backlog.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.backlog.pop_front();
                }
            }
        }
    }
}

/// Handle an authenticated disco message that arrived from `from` (or via the relay).
fn on_disco(paths: &mut Paths, out: &mut Sender<'_>, opened: disco::Opened, from: SocketAddr, now: Instant) {
    let disco::Opened { sender, counter, msg } = opened;
    tracing::debug!(%from, peer = %wg::key_to_base64(&sender), ?msg, "disco");
    let Some(st) = paths.states.get_mut(&sender) else { return };
    if !st.accept_counter(counter) {
        tracing::debug!(%from, peer = %wg::key_to_base64(&sender), "replayed disco message dropped");
        return;
    }
    match msg {
        disco::Message::Ping { tx_id } => {
            // Pings only mean something on the path they took.
            if from != wg::RELAYED && st.on_ping(from, now) {
                let pong = paths.seal(&sender, &disco::Message::Pong { tx_id, observed: from });
                out.send(from, &pong);
            }
        }
        disco::Message::Pong { tx_id, observed } => {
            if from != wg::RELAYED && st.on_pong(from, tx_id, now) {
                tracing::debug!(%from, %observed, "direct path confirmed");
            }
        }
        disco::Message::CallMeMaybe { endpoints } => {
            if !st.on_call_me_maybe(&endpoints, now) {
                tracing::debug!(peer = %wg::key_to_base64(&sender), "call-me-maybe over the rate limit dropped");
            }
        }
    }
}

/// Classify and handle one datagram from the UDP socket or the relay.
#[allow(clippy::too_many_arguments)]
fn on_datagram(wg: &mut Wg, stack: &mut Stack, paths: &mut Paths, out: &mut Sender<'_>, from: SocketAddr, data: &[u8], now: Instant) {
    match disco::classify(data) {
        disco::DatagramKind::Disco => {
            if !paths.enabled {
                return;
            }
            let known = |k: &Key| wg.peer_id(k).is_some();
            if let Some(opened) = disco::open(&paths.private_key, data, known) {
                on_disco(paths, out, opened, from, now);
            }
        }
        disco::DatagramKind::Stun => {
            if let Some((tx, mapped)) = crate::dataplane::stun::parse_binding_response(data)
                && paths.stun_tx == Some(tx)
                && Some(from) == paths.stun_server
            {
                paths.stun_tx = None;
                paths.public_endpoint.send_if_modified(|cur| {
                    let changed = *cur != Some(mapped);
                    *cur = Some(mapped);
                    changed
                });
            }
        }
        _ => {
            wg.recv_datagram(from, data, &mut |o| match o {
                // An answer to an authenticated handshake that came straight
                // from `from` goes straight back: that path just worked.
                Output::Network { peer: Some(key), to: Some(to), data } if to == from && from != wg::RELAYED => {
                    if paths.enabled
                        && let Some(st) = paths.states.get_mut(&key)
                    {
                        st.on_direct_traffic(from, now);
                    }
                    out.send(from, data)
                }
                Output::Network { peer, to, data } => out.output(paths, now, peer, to, data),
                Output::Tunnel { key, packet, .. } => {
                    if paths.enabled
                        && from != wg::RELAYED
                        && let Some(st) = paths.states.get_mut(&key)
                    {
                        st.on_direct_traffic(from, now);
                    }
                    stack.push_inbound(&key, packet, now)
                }
            });
        }
    }
}

/// Run probes and STUN that are due.
fn poll_paths(paths: &mut Paths, out: &mut Sender<'_>, now: Instant) {
    if !paths.enabled {
        return;
    }
    let mut actions = Vec::new();
    for (k, st) in paths.states.iter_mut() {
        for a in st.poll(now) {
            actions.push((*k, a));
        }
    }
    for (k, a) in actions {
        match a {
            PathAction::Ping { to, tx_id } => {
                tracing::trace!(%to, "ping");
                let d = paths.seal(&k, &disco::Message::Ping { tx_id });
                out.send(to, &d);
            }
            PathAction::CallMeMaybe => {
                tracing::debug!(peer = %wg::key_to_base64(&k), relay = paths.relay.is_some(), "call me maybe");
                if paths.relay.is_some() {
                    let d = paths.seal(&k, &disco::Message::CallMeMaybe { endpoints: paths.my_endpoints.clone() });
                    if let Some(r) = &paths.relay {
                        r.send(&k, &d);
                    }
                }
            }
        }
    }
    if let Some(server) = paths.stun_server
        && now >= paths.next_stun
    {
        let tx = disco::new_tx_id();
        paths.stun_tx = Some(tx);
        out.send(server, &crate::dataplane::stun::encode_binding_request(tx));
        paths.next_stun = now + STUN_INTERVAL;
    }
}

async fn drive(inner: Arc<Inner>, udp: UdpSocket, mut relay_rx: mpsc::Receiver<(Key, Vec<u8>)>) {
    let mut sender = Sender { udp: &udp, backlog: VecDeque::new() };
    let mut rx_buf = vec![0u8; 65536];
    let mut accepted = Vec::new();
    let mut outbound = Vec::new();
    let mut relayed: Vec<(Key, Vec<u8>)> = Vec::new();
    {
        let now = Instant::now();
        let mut wg = inner.wg();
        let mut paths = inner.paths();
        wg.initiate_all(&mut |o| {
            if let Output::Network { peer, to, data } = o {
                sender.output(&mut paths, now, peer, to, data)
            }
        });
    }
    loop {
        let now = Instant::now();
        // Inbound: datagrams (UDP and relayed) -> WireGuard / disco / STUN -> stack.
        {
            let mut wg = inner.wg();
            let mut stack = inner.shared.lock();
            let mut paths = inner.paths();
            for _ in 0..RX_BATCH {
                match udp.try_recv_from(&mut rx_buf) {
                    Ok((n, from)) => on_datagram(&mut wg, &mut stack, &mut paths, &mut sender, from, &rx_buf[..n], now),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here; not fatal.
                        tracing::trace!(error = %e, "UDP receive error");
                        break;
                    }
                }
            }
            while relayed.len() < RX_BATCH {
                match relay_rx.try_recv() {
                    Ok(d) => relayed.push(d),
                    Err(_) => break,
                }
            }
            for (src, d) in relayed.drain(..) {
                // Only datagrams from peers we know; the relay vouches for `src`.
                if wg.peer_id(&src).is_none() {
                    continue;
                }
                paths.relayed_in += 1;
                on_datagram(&mut wg, &mut stack, &mut paths, &mut sender, wg::RELAYED, &d, now);
            }
            wg.poll_timers(now, &mut |o| {
                if let Output::Network { peer, to, data } = o {
                    sender.output(&mut paths, now, peer, to, data)
                }
            });
            poll_paths(&mut paths, &mut sender, now);
        }
        // The stack: timers, socket I/O, outbound packets.
        let stack_deadline = {
            let mut stack = inner.shared.lock();
            stack.poll(now, &mut accepted);
            outbound.extend(stack.take_outbound());
            stack.poll_at(now)
        };
        if !outbound.is_empty() {
            let mut wg = inner.wg();
            let mut paths = inner.paths();
            for p in &outbound {
                wg.send_ip(p, &mut |o| {
                    if let Output::Network { peer, to, data } = o {
                        sender.output(&mut paths, now, peer, to, data)
                    }
                });
            }
            drop((wg, paths));
            let mut stack = inner.shared.lock();
            for p in outbound.drain(..) {
                stack.recycle(p);
            }
        }
        if !accepted.is_empty() {
            deliver_accepted(&inner, &mut accepted);
        }
        sender.flush();

        let deadline = {
            let mut d = inner.wg().next_deadline();
            if let Some(s) = stack_deadline {
                d = d.min(s);
            }
            if let Some(p) = inner.paths().next_deadline() {
                d = d.min(p);
            }
            d
        };
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
            _ = udp.writable(), if !sender.backlog.is_empty() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

fn rejudge(inner: &Inner) -> usize {
    let wg = inner.wg();
    let mut stack = inner.shared.lock();
    // Inner sources were checked against their peer's AllowedIPs on receipt,
    // so the route of a remote address names the peer that owns it.
    let n = stack.rejudge(|ip| wg.route(ip).and_then(|id| wg.peer_key(id)));
    drop((stack, wg));
    if n > 0 {
        inner.shared.wake.notify_one();
    }
    n
}

fn deliver_accepted(inner: &Arc<Inner>, accepted: &mut Vec<Accepted>) {
    let wg = inner.wg();
    let listeners = inner.listeners.lock().unwrap_or_else(|e| e.into_inner());
    let mut streams = Vec::new();
    for a in accepted.drain(..) {
        // The inner source was checked against this peer's AllowedIPs when it
        // was decrypted, so the route for the remote address names the peer.
        let peer = wg.route(a.remote.ip()).and_then(|id| wg.peer_key(id));
        streams.push((a.port, peer, TcpStream::new(inner.shared.clone(), a.handle, a.local, a.remote, peer.unwrap_or_default())));
    }
    drop(wg);
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
