//! Userspace TCP/IP: a smoltcp interface holding the node's tailnet addresses.
//!
//! [`Stack`] is plain state: the driver pushes decrypted IP packets in, calls
//! [`Stack::poll`] with the time, and takes IP packets out to encrypt. Streams
//! ([`TcpStream`], in `stream.rs`) share the stack through a mutex and wake
//! the driver through a `Notify` when they have queued data or closed.
//!
//! smoltcp sockets accept one connection each, so a listener keeps a pool of
//! listening sockets and grows it when SYNs arrive (the accept backlog).
#![warn(missing_docs)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};

use crate::dataplane::filter::{self, Filter, Verdict};
use crate::key::Key;

/// The tunnel MTU (WireGuard's default on a 1500-byte path).
pub(crate) const MTU: usize = 1420;
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
/// Least driver time between two returns of freed heap to the OS.
const TRIM_INTERVAL: Duration = Duration::from_millis(500);
/// Local ports for outbound connections (IANA's dynamic range).
const EPHEMERAL: RangeInclusive<u16> = 49152..=65535;
/// Inbound RSTs remembered per poll to tell a reset from a timeout; more in
/// one batch are only counted as timeouts in error messages.
const MAX_PENDING_RSTS: usize = 256;

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
pub(crate) struct Accepted {
    pub(crate) port: u16,
    pub(crate) handle: SocketHandle,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
}

struct Listener {
    sockets: Vec<SocketHandle>,
    /// SYNs queued in the current batch, each needing a listening socket.
    syns_in_batch: usize,
}

/// Per-connection bookkeeping the stack keeps for streams.
#[derive(Default)]
struct ConnState {
    /// The stream (or its listener) is gone. Set where no clock is at hand
    /// (a `Drop`); the next poll stamps `dropped_at` with the driver's time,
    /// so the linger deadline runs on the same clock as everything else.
    dropped: bool,
    dropped_at: Option<Instant>,
    /// Accepted from a listener (re-judged when the policy changes).
    inbound: bool,
    /// The ephemeral port this outbound connection holds until reaped.
    ephemeral_port: Option<u16>,
    /// Why the connection ended abnormally, when the stack knows.
    ended: Option<Ended>,
}

/// How a connection ended without a FIN. smoltcp only reports "closed", so
/// the stack records the cause it saw; a socket that closed with no recorded
/// cause ran into smoltcp's idle timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The peer sent a RST.
    Reset,
    /// This node aborted it (policy change, peer removed, stream aborted).
    Aborted(&'static str),
}

pub(crate) struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: VirtualDevice,
    listeners: HashMap<u16, Listener>,
    conns: HashMap<SocketHandle, ConnState>,
    epoch: Instant,
    next_port: u16,
    ephemeral: RangeInclusive<u16>,
    /// Ephemeral ports held by outbound connections, so connect does not
    /// have to scan every socket.
    ports_in_use: HashSet<u16>,
    /// (local, remote) of RSTs pushed since the last poll.
    pending_rsts: Vec<(SocketAddr, SocketAddr)>,
    /// Admission of new inbound connections; `None` admits everything
    /// (library use: the CLI always installs one).
    filter: Option<Filter>,
    /// Loss recovery counters of connections already reaped.
    retransmits: tcp::RetransmitStats,
    /// Sockets were freed since the heap was last trimmed; the next reap
    /// at or after `next_trim` returns the memory (see [`trim_heap`]).
    trim_pending: bool,
    next_trim: Instant,
}

fn smol_now(epoch: Instant, now: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

impl Stack {
    pub(crate) fn new(addresses: &[IpAddr], now: Instant) -> Self {
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
            next_port: *EPHEMERAL.start() + rand::random::<u16>() % (EPHEMERAL.len() as u16),
            ephemeral: EPHEMERAL,
            ports_in_use: HashSet::new(),
            pending_rsts: Vec::new(),
            filter: None,
            retransmits: tcp::RetransmitStats::default(),
            trim_pending: false,
            next_trim: now,
        }
    }

    /// Narrow the ephemeral port range (tests exhaust a small one).
    #[doc(hidden)]
    #[cfg(test)]
    pub(crate) fn set_ephemeral_range(&mut self, range: RangeInclusive<u16>) {
        self.next_port = *range.start();
        self.ephemeral = range;
    }

    /// Replace the node's addresses (a netmap assigned or changed them).
    pub(crate) fn set_addresses(&mut self, addresses: &[IpAddr]) {
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
    pub(crate) fn listen(&mut self, port: u16) -> io::Result<()> {
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
    pub(crate) fn unlisten(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.sockets {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.conns.insert(h, ConnState { dropped: true, inbound: true, ..Default::default() });
            }
        }
    }

    /// Open a connection; the returned handle becomes usable once established.
    pub(crate) fn connect(&mut self, local_ip: IpAddr, remote: SocketAddr) -> io::Result<(SocketHandle, SocketAddr)> {
        let mut s = Self::new_socket();
        let port = self.alloc_port()?;
        let local = SocketAddr::new(local_ip, port);
        s.connect(self.iface.context(), IpEndpoint::from(remote), IpEndpoint::from(local))
            .map_err(|e| io::Error::other(format!("connect to {remote}: {e}")))?;
        let h = self.sockets.add(s);
        self.ports_in_use.insert(port);
        self.conns.insert(h, ConnState { ephemeral_port: Some(port), ..Default::default() });
        Ok((h, local))
    }

    /// The next free ephemeral port, trying each port of the range once.
    fn alloc_port(&mut self) -> io::Result<u16> {
        let (first, last) = (*self.ephemeral.start(), *self.ephemeral.end());
        for _ in 0..self.ephemeral.len() {
            self.next_port = if self.next_port >= last || self.next_port < first { first } else { self.next_port + 1 };
            if !self.ports_in_use.contains(&self.next_port) && !self.listeners.contains_key(&self.next_port) {
                return Ok(self.next_port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "all {} local ports of the tailnet stack are held by open connections; close some \
                 (or wait up to {}s for dropped ones to finish closing) and try again",
                self.ephemeral.len(),
                LINGER.as_secs()
            ),
        ))
    }

    /// Install (or remove) the inbound filter.
    pub(crate) fn set_filter(&mut self, filter: Option<Filter>) {
        self.filter = filter;
    }

    /// Connections from `peer` the filter refused so far.
    pub(crate) fn refused(&self, peer: &Key) -> u64 {
        self.filter.as_ref().map_or(0, |f| f.refused(peer))
    }

    /// Forget a removed peer's filter counters.
    pub(crate) fn forget_peer(&mut self, peer: &Key) {
        if let Some(f) = self.filter.as_mut() {
            f.forget(peer);
        }
    }

    /// Queue one decrypted packet from `peer` for the stack, unless the
    /// filter refuses it (a refused SYN is answered with a RST). SYNs to a
    /// listening port get a fresh listening socket so concurrent connects
    /// are not refused.
    pub(crate) fn push_inbound(&mut self, peer: &Key, packet: &[u8], now: Instant) {
        let kind = filter::classify(packet);
        if self.pending_rsts.len() < MAX_PENDING_RSTS
            && let Some(tuple) = rst_tuple(packet)
        {
            self.pending_rsts.push(tuple);
        }
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
    pub(crate) fn poll(&mut self, now: Instant, accepted: &mut Vec<Accepted>) {
        let ts = smol_now(self.epoch, now);
        let resetting = self.open_conns_matching_rsts();
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        for h in resetting {
            if self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Closed
                && let Some(c) = self.conns.get_mut(&h)
            {
                c.ended.get_or_insert(Ended::Reset);
            }
        }
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
                    self.conns.insert(h, ConnState { inbound: true, ..Default::default() });
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

    /// Open connections that an RST pushed since the last poll is aimed at.
    /// smoltcp forgets a socket's endpoints when a RST closes it, so they are
    /// matched before the poll; an RST that smoltcp rejects (bad sequence
    /// number) leaves the socket open and is ignored after the poll.
    fn open_conns_matching_rsts(&mut self) -> Vec<SocketHandle> {
        if self.pending_rsts.is_empty() {
            return Vec::new();
        }
        let rsts: HashSet<(SocketAddr, SocketAddr)> = self.pending_rsts.drain(..).collect();
        let mut hit = Vec::new();
        for h in self.conns.keys() {
            let s = self.sockets.get::<tcp::Socket>(*h);
            if let (Some(l), Some(r)) = (s.local_endpoint(), s.remote_endpoint())
                && rsts.contains(&(endpoint(l), endpoint(r)))
            {
                hit.push(*h);
            }
        }
        hit
    }

    /// Abort a stream's socket, remembering why for its reader and writer.
    fn abort_conn(&mut self, h: SocketHandle, why: &'static str) {
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        if let Some(c) = self.conns.get_mut(&h) {
            c.ended.get_or_insert(Ended::Aborted(why));
        }
    }

    /// The error a read or write on a closed socket `h` should return, or
    /// `None` if it ended cleanly (the peer's FIN was received).
    fn close_error(&mut self, h: SocketHandle, local: SocketAddr, remote: SocketAddr) -> Option<io::Error> {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if s.state() != tcp::State::Closed {
            return None;
        }
        let fin_received = matches!(s.recv(|_| (0, ())), Err(tcp::RecvError::Finished));
        let ended = self.conns.get(&h).and_then(|c| c.ended);
        Some(match ended {
            Some(Ended::Reset) => io::Error::new(io::ErrorKind::ConnectionReset, format!("{remote} reset the connection")),
            Some(Ended::Aborted(why)) => io::Error::new(io::ErrorKind::ConnectionAborted, format!("connection to {remote} aborted: {why}")),
            None if fin_received => return None,
            None if !self.iface.has_ip_addr(local.ip()) => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("connection to {remote} aborted: this node no longer has the address {}", local.ip()),
            ),
            None => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connection to {remote} timed out: nothing heard for {}s (is the peer still up?)", IDLE_TIMEOUT.as_secs()),
            ),
        })
    }

    /// Free sockets whose streams are gone and which have finished closing.
    fn reap(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (h, c) in &mut self.conns {
            if !c.dropped {
                continue;
            }
            let t = *c.dropped_at.get_or_insert(now);
            let s = self.sockets.get_mut::<tcp::Socket>(*h);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                gone.push(*h);
            } else if now.saturating_duration_since(t) > LINGER {
                s.abort();
            }
        }
        for h in gone {
            add_stats(&mut self.retransmits, &self.sockets.get::<tcp::Socket>(h).retransmit_stats());
            if let Some(port) = self.conns.remove(&h).and_then(|c| c.ephemeral_port) {
                self.ports_in_use.remove(&port);
            }
            self.sockets.remove(h);
            self.trim_pending = true;
        }
        if self.trim_pending && now >= self.next_trim {
            self.trim_pending = false;
            self.next_trim = now + TRIM_INTERVAL;
            trim_heap();
        }
    }

    /// Packets the stack wants sent, in order.
    pub(crate) fn take_outbound(&mut self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.device.tx.drain(..)
    }

    /// Return a buffer from `take_outbound` for reuse.
    pub(crate) fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.device.pool.len() < 1024 {
            buf.clear();
            self.device.pool.push(buf);
        }
    }

    /// When the stack next needs polling, if it has anything pending.
    pub(crate) fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let ts = smol_now(self.epoch, now);
        self.iface.poll_delay(ts, &self.sockets).map(|d| now + Duration::from_micros(d.total_micros()))
    }

    /// Abort every connection from `remote_ip` (a peer was removed).
    pub(crate) fn abort_from(&mut self, remote_ip: IpAddr) {
        let mut hit = Vec::new();
        for (h, s) in self.sockets.iter_mut() {
            if let smoltcp::socket::Socket::Tcp(t) = s
                && t.remote_endpoint().map(|e| IpAddr::from(e.addr)) == Some(remote_ip)
            {
                hit.push(h);
            }
        }
        for h in hit {
            self.abort_conn(h, "the peer was removed from the tailnet");
        }
    }

    /// Ask the filter again about every inbound connection (established or
    /// half-open) and reset those it no longer admits. `peer_of` maps a
    /// remote tailnet address to the peer that owns it now. Returns how many
    /// were reset.
    pub(crate) fn rejudge(&mut self, peer_of: impl Fn(IpAddr) -> Option<Key>) -> usize {
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
                self.abort_conn(h, "the policy no longer allows it");
                reset += 1;
            }
        }
        reset
    }

    /// Loss recovery counters over every connection so far.
    pub(crate) fn retransmit_stats(&self) -> tcp::RetransmitStats {
        let mut total = self.retransmits;
        for (_, s) in self.sockets.iter() {
            if let smoltcp::socket::Socket::Tcp(s) = s {
                add_stats(&mut total, &s.retransmit_stats());
            }
        }
        total
    }

    /// Number of TCP sockets, for leak checks.
    pub(crate) fn socket_count(&self) -> usize {
        self.sockets.iter().count()
    }

    fn socket(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

/// Hands freed heap back to the OS. A bulk transfer touches its two
/// `TCP_BUFFER`s plus thousands of segment buffers; freed, glibc keeps all
/// of it in the per-thread arenas, so an idle node sat 1.5-3 MiB of
/// anonymous memory above its pre-transfer RSS (measured: the difference
/// disappears entirely after `malloc_trim`). Called after reaping, at most
/// every `TRIM_INTERVAL`, so a connection storm does not trim per close.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no
    // preconditions and is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn add_stats(total: &mut tcp::RetransmitStats, s: &tcp::RetransmitStats) {
    total.timeouts += s.timeouts;
    total.recoveries += s.recoveries;
    total.retransmitted_segments += s.retransmitted_segments;
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

/// (local, remote) of an inbound TCP RST, or `None` for anything else.
fn rst_tuple(packet: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (src, dst, payload): (IpAddr, IpAddr, &[u8]) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), &packet[ip.header_len() as usize..ip.total_len() as usize])
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (ip.src_addr().into(), ip.dst_addr().into(), &packet[ip.header_len()..ip.total_len()])
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    tcp.rst().then(|| (SocketAddr::new(dst, tcp.dst_port()), SocketAddr::new(src, tcp.src_port())))
}

fn endpoint(e: IpEndpoint) -> SocketAddr {
    SocketAddr::new(e.addr.into(), e.port)
}

mod stream;
pub(crate) use stream::Shared;
pub use stream::{TcpListener, TcpStream};

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    const A: [u8; 4] = [100, 64, 0, 1];
    const B: [u8; 4] = [100, 64, 0, 2];

    /// Two stacks joined by an in-memory wire that can be cut.
    struct Wire {
        a: Arc<Shared>,
        b: Arc<Shared>,
        now: Instant,
        cut: bool,
    }

    impl Wire {
        fn new() -> Self {
            let now = Instant::now();
            let a = Shared::new(Stack::new(&[IpAddr::from(A)], now));
            let b = Shared::new(Stack::new(&[IpAddr::from(B)], now));
            Wire { a, b, now, cut: false }
        }

        /// Move packets both ways until quiet; returns connections accepted by `b`.
        fn pump(&mut self) -> Vec<Accepted> {
            let mut accepted = Vec::new();
            for _ in 0..20 {
                let mut moved = 0;
                for (from, to, key) in [(&self.a, &self.b, [1u8; 32]), (&self.b, &self.a, [2u8; 32])] {
                    let mut out = Vec::new();
                    {
                        let mut st = from.lock();
                        st.poll(self.now, &mut accepted);
                        out.extend(st.take_outbound());
                    }
                    if self.cut {
                        continue;
                    }
                    moved += out.len();
                    let mut st = to.lock();
                    for p in out {
                        st.push_inbound(&key, &p, self.now);
                    }
                    st.poll(self.now, &mut accepted);
                }
                if moved == 0 {
                    break;
                }
            }
            accepted
        }

        /// A connected pair: (client on a, server on b).
        fn connect(&mut self, port: u16) -> (TcpStream, TcpStream) {
            self.b.lock().listen(port).ok();
            let remote = SocketAddr::from((B, port));
            let (h, local) = self.a.lock().connect(IpAddr::from(A), remote).unwrap();
            let client = TcpStream::new(self.a.clone(), h, local, remote, [2; 32]);
            let acc = self.pump().pop().expect("the server accepted");
            let server = TcpStream::new(self.b.clone(), acc.handle, acc.local, acc.remote, [1; 32]);
            (client, server)
        }
    }

    fn read(s: &mut TcpStream) -> Poll<io::Result<Vec<u8>>> {
        let mut buf = [0u8; 256];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(&mut *s).poll_read(&mut cx, &mut rb).map_ok(|()| rb.filled().to_vec())
    }

    fn write(s: &mut TcpStream, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(&mut *s).poll_write(&mut cx, data)
    }

    fn shutdown(s: &mut TcpStream) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut *s).poll_shutdown(&mut cx).is_ready());
    }

    #[test]
    fn fin_reads_as_end_of_stream() {
        let mut w = Wire::new();
        let (mut client, mut server) = w.connect(80);
        assert!(matches!(write(&mut client, b"all of it"), Poll::Ready(Ok(9))));
        shutdown(&mut client);
        w.pump();
        assert_eq!(read(&mut server).map(|r| r.unwrap()), Poll::Ready(b"all of it".to_vec()));
        assert_eq!(read(&mut server).map(|r| r.unwrap()), Poll::Ready(Vec::new()));
    }

    #[test]
    fn rst_reads_and_writes_as_connection_reset_after_the_data() {
        let mut w = Wire::new();
        let (mut client, mut server) = w.connect(80);
        assert!(matches!(write(&mut server, b"partial"), Poll::Ready(Ok(7))));
        w.pump();
        server.abort();
        w.pump();
        // Data that arrived before the reset is still delivered, then the error.
        assert_eq!(read(&mut client).map(|r| r.unwrap()), Poll::Ready(b"partial".to_vec()));
        let Poll::Ready(Err(e)) = read(&mut client) else { panic!("a reset must not read as end of stream") };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        let Poll::Ready(Err(e)) = write(&mut client, b"more") else { panic!("write after reset") };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        // The side that aborted is told so too.
        let Poll::Ready(Err(e)) = read(&mut server) else { panic!("read after own abort") };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    }

    #[test]
    fn silence_past_the_idle_timeout_reads_as_timed_out() {
        let mut w = Wire::new();
        let (mut client, _server) = w.connect(80);
        w.cut = true;
        for _ in 0..(IDLE_TIMEOUT.as_secs() / 10 + 2) {
            w.now += Duration::from_secs(10);
            w.pump();
        }
        let Poll::Ready(Err(e)) = read(&mut client) else { panic!("a timed-out connection must not read as end of stream") };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }

    #[test]
    fn a_quiet_connection_outlives_the_idle_timeout_on_keepalives() {
        let mut w = Wire::new();
        let (mut client, mut server) = w.connect(81);
        for _ in 0..(IDLE_TIMEOUT.as_secs() / 10 + 2) {
            w.now += Duration::from_secs(10);
            w.pump();
        }
        assert!(read(&mut client).is_pending(), "keepalives kept it open");
        assert!(matches!(write(&mut server, b"still here"), Poll::Ready(Ok(10))));
        w.pump();
        assert!(matches!(read(&mut client), Poll::Ready(Ok(d)) if d == b"still here"));
    }

    #[test]
    fn a_dropped_stream_lingers_for_linger_of_driver_time_then_is_freed() {
        let mut w = Wire::new();
        let (client, _server) = w.connect(82);
        assert_eq!(w.a.lock().socket_count(), 1);
        // Long after the stack was created, in the driver's time only (the
        // peer answers keepalives meanwhile): the linger deadline must run
        // from the first poll after the drop.
        for _ in 0..360 {
            w.now += Duration::from_secs(10);
            w.pump();
        }
        w.cut = true;
        drop(client);
        w.pump();
        let dropped = w.now;
        while w.now + Duration::from_secs(5) <= dropped + LINGER {
            w.now += Duration::from_secs(5);
            w.pump();
            assert_eq!(w.a.lock().socket_count(), 1, "still lingering (FIN unacknowledged) at +{:?}", w.now - dropped);
        }
        w.now = dropped + LINGER + Duration::from_secs(1);
        w.pump();
        w.pump();
        assert_eq!(w.a.lock().socket_count(), 0, "aborted and freed once LINGER has passed");
    }

    /// Write as much of `data[*sent..]` as the stream takes now.
    fn write_some(s: &mut TcpStream, data: &[u8], sent: &mut usize) {
        while *sent < data.len() {
            match write(s, &data[*sent..]) {
                Poll::Ready(Ok(n)) if n > 0 => *sent += n,
                _ => break,
            }
        }
    }

    /// Everything readable now; `true` once end of stream was read.
    fn read_all(s: &mut TcpStream, into: &mut Vec<u8>) -> bool {
        loop {
            match read(s) {
                Poll::Ready(Ok(b)) if b.is_empty() => return true,
                Poll::Ready(Ok(b)) => into.extend(b),
                Poll::Ready(Err(e)) => panic!("read failed: {e}"),
                Poll::Pending => return false,
            }
        }
    }

    #[test]
    fn a_transfer_after_the_peers_early_half_close_finishes_without_waiting_for_a_timer() {
        // The client sends its request and half-closes; the server answers with
        // more than the client's window and closes while data is still queued
        // (LAST-ACK). The client's window updates must keep the transfer going:
        // the clock never moves here, so any wait for a timer is a stall.
        let mut w = Wire::new();
        let (mut client, mut server) = w.connect(80);
        assert!(matches!(write(&mut client, b"GET"), Poll::Ready(Ok(3))));
        shutdown(&mut client);
        w.pump();
        assert_eq!(read(&mut server).map(|r| r.unwrap()), Poll::Ready(b"GET".to_vec()));
        let data: Vec<u8> = (0..3 * TCP_BUFFER + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let (mut sent, mut got, mut closed) = (0, Vec::new(), false);
        for _ in 0..10_000 {
            write_some(&mut server, &data, &mut sent);
            if sent == data.len() && !closed {
                shutdown(&mut server);
                closed = true;
            }
            // Let the client's window fill up and close before it reads, so
            // it reopens with an ACK that acknowledges nothing new.
            for _ in 0..5 {
                w.pump();
            }
            if read_all(&mut client, &mut got) {
                break;
            }
        }
        assert_eq!(got.len(), data.len(), "the transfer stalled");
        assert!(got == data);
    }

    #[test]
    fn exhausted_ephemeral_ports_give_an_error_and_free_up_again() {
        let mut w = Wire::new();
        w.a.lock().set_ephemeral_range(50000..=50003);
        w.b.lock().listen(80).unwrap();
        let remote = SocketAddr::from((B, 80));
        let mut held = Vec::new();
        for _ in 0..4 {
            let (h, local) = w.a.lock().connect(IpAddr::from(A), remote).unwrap();
            held.push(TcpStream::new(w.a.clone(), h, local, remote, [2; 32]));
        }
        let ports: HashSet<u16> = held.iter().map(|s| s.local_addr().port()).collect();
        assert_eq!(ports.len(), 4);
        let e = w.a.lock().connect(IpAddr::from(A), remote).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("close some"), "{e}");
        // A closed and reaped connection gives its port back.
        let mut gone = held.pop().unwrap();
        gone.abort();
        drop(gone);
        w.pump();
        w.a.lock().connect(IpAddr::from(A), remote).unwrap();
    }
}
