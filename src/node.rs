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

use crate::netstack::{Accepted, Shared, Stack, TcpListener, TcpStream};
use crate::wg::{self, Key, Output, PeerConfig, Wg};

/// Socket buffers large enough to ride out bursts at gigabit rates.
const UDP_BUFFER: usize = 8 * 1024 * 1024;
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
}

impl NodeConfig {
    pub fn new(private_key: Key, addresses: Vec<IpAddr>) -> Self {
        NodeConfig {
            private_key,
            addresses,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            peers: Vec::new(),
        }
    }
}

struct Inner {
    wg: Mutex<Wg>,
    shared: Arc<Shared>,
    listeners: Mutex<HashMap<u16, mpsc::Sender<TcpStream>>>,
    shutdown: Notify,
}

impl Inner {
    fn wg(&self) -> MutexGuard<'_, Wg> {
        self.wg.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running tailnet node (data plane only).
pub struct Node {
    inner: Arc<Inner>,
    addresses: std::sync::RwLock<Vec<IpAddr>>,
    udp_addr: SocketAddr,
    task: JoinHandle<()>,
}

/// One peer as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake_secs_ago: Option<u64>,
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
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: unprivileged processes may be capped by rmem_max.
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    UdpSocket::from_std(sock.into())
}

impl Node {
    /// Bind the UDP socket, configure peers and start the driver task.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let now = Instant::now();
        let mut wg = Wg::new(config.private_key, now);
        for p in config.peers {
            wg.add_peer(p)?;
        }
        let udp = bind_udp(config.listen)?;
        let udp_addr = udp.local_addr()?;
        let stack = Stack::new(&config.addresses, now);
        let inner = Arc::new(Inner {
            wg: Mutex::new(wg),
            shared: Shared::new(stack),
            listeners: Mutex::new(HashMap::new()),
            shutdown: Notify::new(),
        });
        let task = tokio::spawn(drive(inner.clone(), udp));
        Ok(Node { inner, addresses: std::sync::RwLock::new(config.addresses), udp_addr, task })
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
                format!("connecting to {remote} timed out after {}s (is the peer up and its handshake working?)", CONNECT_TIMEOUT.as_secs()),
            )),
        }
    }

    /// Add a peer, or update its AllowedIPs/endpoint keeping its session.
    pub fn upsert_peer(&self, config: PeerConfig) -> anyhow::Result<()> {
        self.inner.wg().upsert_peer(config)?;
        self.inner.shared.wake.notify_one();
        Ok(())
    }

    /// Remove a peer and cut its connections.
    pub fn remove_peer(&self, key: &Key, allowed_ips: &[IpAddr]) {
        self.inner.wg().remove_peer(key);
        let mut st = self.inner.shared.lock();
        for ip in allowed_ips {
            st.abort_from(*ip);
        }
        drop(st);
        self.inner.shared.wake.notify_one();
    }

    pub fn status(&self) -> NodeStatus {
        let wg = self.inner.wg();
        let peers = wg
            .peer_ids()
            .filter_map(|id| {
                let cfg = wg.peer_config(id)?;
                let stats = wg.peer_stats(id)?.clone();
                Some(PeerStatus {
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
            tcp_sockets: self.inner.shared.lock().socket_count(),
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

async fn drive(inner: Arc<Inner>, udp: UdpSocket) {
    let mut sender = Sender { udp: &udp, backlog: VecDeque::new() };
    let mut rx_buf = vec![0u8; 65536];
    let mut accepted = Vec::new();
    let mut outbound = Vec::new();
    {
        let mut wg = inner.wg();
        wg.initiate_all(&mut |o| {
            if let Output::Network(to, b) = o {
                sender.send(to, b)
            }
        });
    }
    loop {
        let now = Instant::now();
        // Inbound: datagrams -> WireGuard -> stack.
        {
            let mut wg = inner.wg();
            let mut stack = inner.shared.lock();
            for _ in 0..RX_BATCH {
                match udp.try_recv_from(&mut rx_buf) {
                    Ok((n, from)) => wg.recv_datagram(from, &rx_buf[..n], &mut |o| match o {
                        Output::Network(to, b) => sender.send(to, b),
                        Output::Tunnel(_, p) => stack.push_inbound(p),
                    }),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here; not fatal.
                        tracing::trace!(error = %e, "UDP receive error");
                        break;
                    }
                }
            }
            wg.poll_timers(now, &mut |o| {
                if let Output::Network(to, b) = o {
                    sender.send(to, b)
                }
            });
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
            for p in &outbound {
                wg.send_ip(p, &mut |o| {
                    if let Output::Network(to, b) = o {
                        sender.send(to, b)
                    }
                });
            }
            drop(wg);
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
            let wg_deadline = inner.wg().next_deadline();
            stack_deadline.map_or(wg_deadline, |d| d.min(wg_deadline))
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
            _ = udp.writable(), if !sender.backlog.is_empty() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
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
