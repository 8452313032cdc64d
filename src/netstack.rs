//! Userspace TCP/IP: a smoltcp interface holding the node's tailnet addresses.
//!
//! [`Stack`] is plain state: the driver pushes decrypted IP packets in, calls
//! [`Stack::poll`] with the time, and takes IP packets out to encrypt. Streams
//! ([`TcpStream`]) share the stack through a mutex and wake the driver through
//! a [`Notify`] when they have queued data or closed.
//!
//! smoltcp sockets accept one connection each, so a listener keeps a pool of
//! listening sockets and grows it when SYNs arrive (the accept backlog).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};

use crate::filter::{self, Filter, Verdict};
use crate::wg::Key;

/// The tunnel MTU (WireGuard's default on a 1500-byte path).
pub const MTU: usize = 1420;
/// Per-connection buffers: big enough for ~1 Gbit/s at a few ms of RTT; the
/// allocation is lazy, so idle connections do not pay for it in RSS.
const TCP_BUFFER: usize = 2 * 1024 * 1024;
/// Half-open connections allowed per listening port.
const MAX_PENDING_PER_PORT: usize = 1024;
/// A connection that hears nothing from its peer for this long is aborted.
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a stream dropped without a clean close may linger before abort.
const LINGER: Duration = Duration::from_secs(30);

struct VirtualDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    pool: Vec<Vec<u8>>,
}

impl VirtualDevice {
    fn buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| Vec::with_capacity(MTU))
    }
}

struct RxToken(Vec<u8>);
impl smoltcp::phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut VirtualDevice);
impl smoltcp::phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.0.buffer();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.0.tx.push_back(buf);
        r
    }
}

impl Device for VirtualDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let pkt = self.rx.pop_front()?;
        Some((RxToken(pkt), TxToken(self)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // WireGuard already authenticated every byte; verifying checksums
        // again on receive is wasted work. Peers' kernels still need ours.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps.checksum.icmpv6 = Checksum::Tx;
        caps
    }
}

/// A connection handed from the stack to the driver for delivery.
pub struct Accepted {
    pub port: u16,
    pub handle: SocketHandle,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

struct Listener {
    sockets: Vec<SocketHandle>,
    /// SYNs queued in the current batch, each needing a listening socket.
    syns_in_batch: usize,
}

/// Per-connection bookkeeping the stack keeps for streams.
#[derive(Default)]
struct ConnState {
    dropped_at: Option<Instant>,
    /// Accepted from a listener (re-judged when the policy changes).
    inbound: bool,
}

pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: VirtualDevice,
    listeners: HashMap<u16, Listener>,
    conns: HashMap<SocketHandle, ConnState>,
    epoch: Instant,
    next_port: u16,
    /// Admission of new inbound connections; `None` admits everything
    /// (library use: the CLI always installs one).
    filter: Option<Filter>,
}

fn smol_now(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

impl Stack {
    pub fn new(addresses: &[IpAddr], now: Instant) -> Self {
        let mut device = VirtualDevice { rx: VecDeque::new(), tx: VecDeque::new(), pool: Vec::new() };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let epoch = now;
        let mut iface = Interface::new(config, &mut device, smol_now(epoch, now));
        set_addresses(&mut iface, addresses);
        Stack {
            iface,
            sockets: SocketSet::new(vec![]),
            device,
            listeners: HashMap::new(),
            conns: HashMap::new(),
            epoch,
            next_port: 49152 + (rand::random::<u16>() % 16000),
            filter: None,
        }
    }

    /// Replace the node's addresses (a netmap assigned or changed them).
    pub fn set_addresses(&mut self, addresses: &[IpAddr]) {
        set_addresses(&mut self.iface, addresses);
    }

    fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]), tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]));
        s.set_nagle_enabled(false);
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(IDLE_TIMEOUT.as_secs())));
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(KEEPALIVE.as_secs())));
        s.set_congestion_control(tcp::CongestionControl::Reno);
        s
    }

    /// Start accepting connections on `port` (all of the node's addresses).
    pub fn listen(&mut self, port: u16) -> io::Result<()> {
        if self.listeners.contains_key(&port) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("port {port} is already being listened on")));
        }
        let mut l = Listener { sockets: Vec::new(), syns_in_batch: 0 };
        let mut s = Self::new_socket();
        s.listen(port).map_err(|e| io::Error::other(format!("listen on {port}: {e}")))?;
        l.sockets.push(self.sockets.add(s));
        self.listeners.insert(port, l);
        Ok(())
    }

    /// Stop listening; half-open connections on the port are reset.
    pub fn unlisten(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.sockets {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.conns.insert(h, ConnState { dropped_at: Some(Instant::now()), inbound: true });
            }
        }
    }

    /// Open a connection; the returned handle becomes usable once established.
    pub fn connect(&mut self, local_ip: IpAddr, remote: SocketAddr) -> io::Result<(SocketHandle, SocketAddr)> {
        let mut s = Self::new_socket();
        let port = self.alloc_port();
        let local = SocketAddr::new(local_ip, port);
        s.connect(self.iface.context(), IpEndpoint::from(remote), IpEndpoint::from(local))
            .map_err(|e| io::Error::other(format!("connect to {remote}: {e}")))?;
        let h = self.sockets.add(s);
        self.conns.insert(h, ConnState::default());
        Ok((h, local))
    }

    fn alloc_port(&mut self) -> u16 {
        let in_use: std::collections::HashSet<u16> = self
            .sockets
            .iter()
            .filter_map(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => t.local_endpoint().map(|e| e.port),
                #[allow(unreachable_patterns)]
                _ => None,
            })
            .collect();
        loop {
            self.next_port = if self.next_port >= 65000 { 49152 } else { self.next_port + 1 };
            if !in_use.contains(&self.next_port) && !self.listeners.contains_key(&self.next_port) {
                return self.next_port;
            }
        }
    }

    /// Install (or remove) the inbound filter.
    pub fn set_filter(&mut self, filter: Option<Filter>) {
        self.filter = filter;
    }

    /// Connections from `peer` the filter refused so far.
    pub fn refused(&self, peer: &Key) -> u64 {
        self.filter.as_ref().map_or(0, |f| f.refused(peer))
    }

    /// Forget a removed peer's filter counters.
    pub fn forget_peer(&mut self, peer: &Key) {
        if let Some(f) = self.filter.as_mut() {
            f.forget(peer);
        }
    }

    /// Queue one decrypted packet from `peer` for the stack, unless the
    /// filter refuses it (a refused SYN is answered with a RST). SYNs to a
    /// listening port get a fresh listening socket so concurrent connects
    /// are not refused.
    pub fn push_inbound(&mut self, peer: &Key, packet: &[u8], now: Instant) {
        let kind = filter::classify(packet);
        if let Some(f) = self.filter.as_mut() {
            let listeners = &self.listeners;
            match f.check(peer, kind, || listeners.keys().copied().collect(), now) {
                Verdict::Pass => {}
                Verdict::Drop => return,
                Verdict::Reset => {
                    if let Some(rst) = filter::rst_for(packet) {
                        self.device.tx.push_back(rst);
                    }
                    return;
                }
            }
        }
        if let filter::Inbound::Syn { port } = kind
            && let Some(l) = self.listeners.get_mut(&port)
        {
            l.syns_in_batch += 1;
            let listening = l.sockets.iter().filter(|h| self.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Listen).count();
            if listening < l.syns_in_batch && l.sockets.len() < MAX_PENDING_PER_PORT {
                let mut s = Self::new_socket();
                if s.listen(port).is_ok() {
                    l.sockets.push(self.sockets.add(s));
                }
            }
        }
        let mut buf = self.device.buffer();
        buf.clear();
        buf.extend_from_slice(packet);
        self.device.rx.push_back(buf);
    }

    /// Run the stack. Returns newly established inbound connections.
    pub fn poll(&mut self, now: Instant, accepted: &mut Vec<Accepted>) {
        let ts = smol_now(self.epoch, now);
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        for (port, l) in self.listeners.iter_mut() {
            l.syns_in_batch = 0;
            let mut i = 0;
            while i < l.sockets.len() {
                let h = l.sockets[i];
                let s = self.sockets.get::<tcp::Socket>(h);
                if matches!(s.state(), tcp::State::Established | tcp::State::CloseWait) {
                    let (Some(local), Some(remote)) = (s.local_endpoint(), s.remote_endpoint()) else {
                        i += 1;
                        continue;
                    };
                    l.sockets.swap_remove(i);
                    self.conns.insert(h, ConnState { dropped_at: None, inbound: true });
                    accepted.push(Accepted { port: *port, handle: h, local: endpoint(local), remote: endpoint(remote) });
                } else {
                    i += 1;
                }
            }
            // Keep one spare listener; shed extra idle ones left by bursts.
            let mut idle = 0;
            l.sockets.retain(|h| {
                let listening = self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen;
                if listening {
                    idle += 1;
                    if idle > 4 {
                        self.sockets.remove(*h);
                        return false;
                    }
                }
                true
            });
            if idle == 0 {
                let mut s = Self::new_socket();
                if s.listen(*port).is_ok() {
                    l.sockets.push(self.sockets.add(s));
                }
            }
        }
        self.reap(now);
    }

    /// Free sockets whose streams are gone and which have finished closing.
    fn reap(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (h, c) in &self.conns {
            let Some(t) = c.dropped_at else { continue };
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                gone.push(*h);
            } else if now.saturating_duration_since(t) > LINGER {
                s.abort();
            }
        }
        for h in gone {
            self.conns.remove(&h);
            self.sockets.remove(h);
        }
    }

    /// Packets the stack wants sent, in order.
    pub fn take_outbound(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.device.tx.drain(..)
    }

    /// Return a buffer from `take_outbound` for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.device.pool.len() < 1024 {
            buf.clear();
            self.device.pool.push(buf);
        }
    }

    /// When the stack next needs polling, if it has anything pending.
    pub fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let ts = smol_now(self.epoch, now);
        self.iface.poll_delay(ts, &self.sockets).map(|d| now + Duration::from_micros(d.total_micros()))
    }

    /// Abort every connection from `remote_ip` (a peer was removed).
    pub fn abort_from(&mut self, remote_ip: IpAddr) {
        for (_, s) in self.sockets.iter_mut() {
            if let smoltcp::socket::Socket::Tcp(t) = s
                && t.remote_endpoint().map(|e| IpAddr::from(e.addr)) == Some(remote_ip)
            {
                t.abort();
            }
        }
    }

    /// Ask the filter again about every inbound connection (established or
    /// half-open) and reset those it no longer admits. `peer_of` maps a
    /// remote tailnet address to the peer that owns it now. Returns how many
    /// were reset.
    pub fn rejudge(&mut self, peer_of: impl Fn(IpAddr) -> Option<Key>) -> usize {
        let Some(judge) = self.filter.as_ref().map(|f| f.judge().clone()) else { return 0 };
        let half_open = self.listeners.values().flat_map(|l| l.sockets.iter().copied());
        let accepted = self.conns.iter().filter(|(_, c)| c.inbound).map(|(h, _)| *h);
        let handles: Vec<SocketHandle> = half_open.chain(accepted).collect();
        let mut reset = 0;
        for h in handles {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if matches!(s.state(), tcp::State::Listen | tcp::State::Closed | tcp::State::TimeWait) {
                continue;
            }
            let (Some(local), Some(remote)) = (s.local_endpoint(), s.remote_endpoint()) else { continue };
            if !judge.rejudges(local.port) {
                continue;
            }
            let verdict = match peer_of(IpAddr::from(remote.addr)) {
                Some(k) => judge.admit_tcp(&k, local.port),
                None => Err("the peer left the tailnet".into()),
            };
            if let Err(why) = verdict {
                tracing::warn!(remote = %endpoint(remote), port = local.port, "resetting a connection the policy no longer allows: {why}");
                s.abort();
                reset += 1;
            }
        }
        reset
    }

    /// Number of TCP sockets, for leak checks.
    pub fn socket_count(&self) -> usize {
        self.sockets.iter().count()
    }

    fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

fn set_addresses(iface: &mut Interface, addresses: &[IpAddr]) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        for a in addresses {
            let cidr = match a {
                IpAddr::V4(v4) => IpCidr::new(IpAddress::Ipv4(*v4), 32),
                IpAddr::V6(v6) => IpCidr::new(IpAddress::Ipv6(*v6), 128),
            };
            let _ = addrs.push(cidr);
        }
    });
    // With the IP medium there are no neighbours: every destination goes out
    // the one device, the gateway address only has to exist.
    iface.routes_mut().remove_default_ipv4_route();
    iface.routes_mut().remove_default_ipv6_route();
    for a in addresses {
        match a {
            IpAddr::V4(v4) => {
                let _ = iface.routes_mut().add_default_ipv4_route(*v4);
            }
            IpAddr::V6(v6) => {
                let _ = iface.routes_mut().add_default_ipv6_route(*v6);
            }
        }
    }
}

fn endpoint(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

/// The stack plus the handle that wakes its driver; shared with streams.
pub struct Shared {
    stack: Mutex<Stack>,
    pub wake: Notify,
}

impl Shared {
    pub fn new(stack: Stack) -> Arc<Self> {
        Arc::new(Shared { stack: Mutex::new(stack), wake: Notify::new() })
    }

    pub fn lock(&self) -> MutexGuard<'_, Stack> {
        self.stack.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP connection over the tailnet.
pub struct TcpStream {
    shared: Arc<Shared>,
    handle: SocketHandle,
    local: SocketAddr,
    remote: SocketAddr,
    peer: Key,
    closed: bool,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStream").field("local", &self.local).field("remote", &self.remote).finish()
    }
}

impl TcpStream {
    pub(crate) fn new(shared: Arc<Shared>, handle: SocketHandle, local: SocketAddr, remote: SocketAddr, peer: Key) -> Self {
        TcpStream { shared, handle, local, remote, peer, closed: false }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.remote
    }

    /// The WireGuard public key of the peer this connection runs through.
    pub fn peer_key(&self) -> Key {
        self.peer
    }

    /// Wait until an outbound connection is established (or fails).
    pub(crate) async fn established(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            let s = st.socket(self.handle);
            match s.state() {
                tcp::State::Established | tcp::State::CloseWait => Poll::Ready(Ok(())),
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                _ => Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("{} refused the connection", self.remote)))),
            }
        })
        .await
    }

    /// Abort the connection with a RST.
    pub fn abort(&mut self) {
        self.shared.lock().socket(self.handle).abort();
        self.closed = true;
        self.shared.wake.notify_one();
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if s.can_recv() {
            let before = s.recv_queue();
            let cap = s.recv_capacity();
            let n = s.recv_slice(buf.initialize_unfilled()).map_err(|e| io::Error::other(e.to_string()))?;
            buf.advance(n);
            drop(st);
            // The peer may be waiting for window; smoltcp sends the update on
            // the next poll, so wake the driver when the window was tight.
            if before * 4 >= cap {
                self.shared.wake.notify_one();
            }
            return Poll::Ready(Ok(()));
        }
        if !s.may_recv() {
            if s.state() == tcp::State::Closed && !self.closed && s.remote_endpoint().is_none() {
                // Closed without a FIN from the peer: reset or timed out.
                return Poll::Ready(Ok(()));
            }
            return Poll::Ready(Ok(())); // EOF
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if !s.may_send() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")));
        }
        if s.can_send() {
            let n = s.send_slice(data).map_err(|e| io::Error::other(e.to_string()))?;
            drop(st);
            self.shared.wake.notify_one();
            return Poll::Ready(Ok(n));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closed {
            self.shared.lock().socket(self.handle).close();
            self.closed = true;
            self.shared.wake.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let s = st.socket(self.handle);
        if !self.closed {
            s.close();
        }
        // Unread data means the application walked away mid-stream; tell the
        // peer now instead of after a timeout.
        if s.recv_queue() > 0 {
            s.abort();
        }
        st.conns.entry(self.handle).or_default().dropped_at = Some(Instant::now());
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// Accepts connections for one port; dropping it stops listening.
pub struct TcpListener {
    pub(crate) port: u16,
    pub(crate) rx: mpsc::Receiver<TcpStream>,
    pub(crate) shared: Arc<Shared>,
}

impl TcpListener {
    pub async fn accept(&mut self) -> io::Result<TcpStream> {
        self.rx.recv().await.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the node has shut down"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        self.shared.lock().unlisten(self.port);
    }
}
