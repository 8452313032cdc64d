//! The WireGuard UDP socket: binding, kernel buffer sizes and batched I/O.
//!
//! Bulk TCP through the tunnel arrives in bursts (smoltcp emits a whole
//! congestion window per poll, a peer's kernel as fast as it can encrypt).
//! A datagram the kernel drops for want of buffer is a lost TCP segment, and
//! the stack that sent it pays a recovery for it, so the buffers are sized to
//! hold a burst at gigabit rates. The default `rmem_max`/`wmem_max` caps what
//! an unprivileged `SO_RCVBUF` gets; as root (the usual case for a VPN daemon)
//! `SO_RCVBUFFORCE` goes past the cap for this socket only, with no sysctl.
//!
//! One syscall per datagram was most of the data plane's CPU (a profile of
//! bulk tailgate <-> tailgate: `sendto` 42%, `recvfrom` 11%). So datagrams
//! go out in batches: the driver queues everything the core emits in one
//! lock hold ([`SendQueue`]) and flushes it with UDP GSO (`UDP_SEGMENT`: one
//! `sendmsg` carries up to 64 equal-sized datagrams to one address), and
//! reads with `recvmmsg` plus UDP GRO (the kernel hands over coalesced
//! datagrams with their stride). The cmsg encoding and decoding is
//! `quinn-udp`'s (the maintained crate behind the Quinn QUIC stack).
//! Kernels or devices without GSO answer a segmented send with EIO or EINVAL;
//! from then on the socket sends one datagram per call (see [`SendQueue::flush`]).

#![warn(missing_docs)]

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use socket2::{SockRef, Socket};
use tokio::io::Interest;

/// Requested receive and send buffer, per direction.
pub(crate) const BUFFER: usize = 8 * 1024 * 1024;

/// Largest UDP payload the kernel accepts in one send (IPv4: 65535 - 20 - 8).
const MAX_SEND: usize = 65_507;

/// Datagrams held while the socket is not writable; beyond this new ones
/// are dropped (TCP inside recovers), so a stalled socket cannot grow memory.
const MAX_QUEUED: usize = 4096;
/// Openers held per flush: one per candidate of every probing peer.
const MAX_OPENERS: usize = 1024;

/// The node's UDP socket with its batching state.
pub(crate) struct UdpSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// Set once a segmented send failed with EIO/EINVAL: plain sends only.
    gso_off: AtomicBool,
}

/// Bind the node's UDP socket at `addr` with large buffers and batching; a
/// wildcard `addr` binds dual-stack (see [`crate::dataplane::dualstack`]).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let io = crate::dataplane::dualstack::udp(addr, size_buffers)?;
    let state = UdpSocketState::new(UdpSockRef::from(&io))?;
    keep_kernel_defaults(&SockRef::from(&io));
    let offload = offload_wanted(std::env::var("TAILGATE_UDP_OFFLOAD").ok().as_deref());
    if !offload {
        // The escape hatch for a device that mangles offloaded datagrams
        // without an error, and the "batching only" step of bench figures.
        setsockopt(&SockRef::from(&io), libc::SOL_UDP, libc::UDP_GRO, 0);
    }
    tracing::debug!(offload, gso_segments = state.max_gso_segments(), gro_segments = state.gro_segments(), "UDP batching");
    Ok(UdpSocket { io, state, gso_off: AtomicBool::new(!offload) })
}

/// `TAILGATE_UDP_OFFLOAD=off` (or `0`, `false`) turns GSO and GRO off;
/// anything else, or unset, leaves them on where the kernel has them.
fn offload_wanted(setting: Option<&str>) -> bool {
    !matches!(setting.map(str::trim), Some("off" | "0" | "false" | "no"))
}

impl UdpSocket {
    /// The bound address (port chosen by the kernel for port 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Wait until a receive may succeed.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        self.io.readable().await
    }

    /// Wait until a send may succeed.
    pub(crate) async fn writable(&self) -> io::Result<()> {
        self.io.writable().await
    }

    /// Datagrams one send may carry now (1 without GSO, or after it failed).
    pub(crate) fn max_segments(&self) -> usize {
        if self.gso_off.load(Ordering::Relaxed) { 1 } else { self.state.max_gso_segments().max(1) }
    }

    /// Fill `batch` with what is waiting, in one `recvmmsg`; `WouldBlock`
    /// when nothing is.
    pub(crate) fn recv(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.filled = 0;
        let mut slices: Vec<IoSliceMut<'_>> = batch.buf.chunks_mut(batch.slot).map(IoSliceMut::new).collect();
        let n = self.io.try_io(Interest::READABLE, || self.state.recv(UdpSockRef::from(&self.io), &mut slices, &mut batch.meta))?;
        batch.filled = n;
        Ok(())
    }

    fn send(&self, t: &Transmit<'_>) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || self.state.try_send(UdpSockRef::from(&self.io), t))
    }

    /// Send one datagram with its own TTL (IPv4) or hop limit (IPv6), as
    /// ancillary data: the socket's default stays as it is for everything
    /// else sent concurrently. quinn-udp's `Transmit` has no such field.
    pub(crate) fn send_with_hops(&self, to: SocketAddr, data: &[u8], hops: u8) -> io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
        use std::os::fd::AsRawFd;
        let v6_socket = self.io.local_addr()?.is_ipv6();
        // A dual-stack socket reaches IPv4 peers at their IPv4-mapped address
        // and still takes IPv4's TTL option for them.
        let (dest, v4) = match to {
            SocketAddr::V4(a) if v6_socket => (SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()), true),
            SocketAddr::V4(_) => (to, true),
            SocketAddr::V6(a) => (to, a.ip().to_ipv4_mapped().is_some()),
        };
        let addr = SockaddrStorage::from(dest);
        let hops = libc::c_int::from(hops);
        let cmsg = if v4 { ControlMessage::Ipv4Ttl(&hops) } else { ControlMessage::Ipv6HopLimit(&hops) };
        let iov = [io::IoSlice::new(data)];
        self.io.try_io(Interest::WRITABLE, || {
            sendmsg(self.io.as_raw_fd(), &iov, &[cmsg], MsgFlags::empty(), Some(&addr)).map_err(io::Error::from)
        })?;
        Ok(())
    }
}

/// quinn-udp forbids fragmentation (QUIC does its own path MTU discovery).
/// WireGuard does not: a full-sized datagram on a link with a smaller MTU
/// must still be fragmented as before, not fail with EMSGSIZE. Kernel
/// timestamps are not used either. Best effort, like the buffer sizes.
fn keep_kernel_defaults(sock: &SockRef<'_>) {
    let v6 = sock.local_addr().ok().and_then(|a| a.as_socket()).is_some_and(|a| a.is_ipv6());
    setsockopt(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_WANT);
    if v6 {
        setsockopt(sock, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_WANT);
        setsockopt(sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0);
    }
    setsockopt(sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
}

/// Best effort: a smaller buffer only costs speed, never correctness.
fn size_buffers(sock: &Socket) {
    let _ = sock.set_recv_buffer_size(BUFFER);
    let _ = sock.set_send_buffer_size(BUFFER);
    // Linux reports twice the usable size it was given; below BUFFER means
    // the sysctl cap applied, so try the privileged option.
    let sock = SockRef::from(sock);
    if sock.recv_buffer_size().unwrap_or(0) < BUFFER {
        setsockopt(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, BUFFER as libc::c_int);
    }
    if sock.send_buffer_size().unwrap_or(0) < BUFFER {
        setsockopt(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, BUFFER as libc::c_int);
    }
    tracing::debug!(rcvbuf = sock.recv_buffer_size().unwrap_or(0), sndbuf = sock.send_buffer_size().unwrap_or(0), "UDP socket buffers");
}

fn setsockopt(sock: &SockRef<'_>, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor, and a pointer to an int that lives
    // for the duration of the call with its exact size as the length.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        // EPERM without CAP_NET_ADMIN for the *FORCE options: keep the capped size.
        tracing::debug!(level, option, error = %io::Error::last_os_error(), "UDP socket option not applied");
    }
}

/// Receive buffers for one `recvmmsg`: `quinn_udp::BATCH_SIZE` slots, each
/// large enough for a GRO train (64 KiB). Allocated zeroed, so pages the
/// kernel never writes cost no memory.
pub(crate) struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    meta: Vec<RecvMeta>,
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        let slot = 65_536;
        RecvBatch { buf: vec![0; slot * quinn_udp::BATCH_SIZE], slot, meta: vec![RecvMeta::default(); quinn_udp::BATCH_SIZE], filled: 0 }
    }
}

impl RecvBatch {
    /// Slots the last receive filled; each holds one or more datagrams.
    pub(crate) fn slots(&self) -> usize {
        self.filled
    }

    /// Every datagram of the last receive with its source (IPv4-mapped
    /// sources as plain IPv4), GRO trains split at their stride.
    pub(crate) fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta[..self.filled].iter().enumerate().flat_map(move |(i, m)| {
            let data = &self.buf[i * self.slot..][..m.len.min(self.slot)];
            // A stride of 0 would make `chunks` panic; the kernel never sends
            // one, but this must not depend on it.
            let stride = if m.stride == 0 { data.len().max(1) } else { m.stride };
            let from = crate::dataplane::dualstack::normalize(m.addr);
            data.chunks(stride).map(move |d| (from, d))
        })
    }
}

/// Datagrams waiting to be sent, in order, in one contiguous buffer so that
/// a run of equal-sized datagrams to one address is already one GSO payload.
#[derive(Default)]
pub(crate) struct SendQueue {
    buf: Vec<u8>,
    items: Vec<Queued>,
    /// Items before this one have been sent.
    head: usize,
    /// Bytes of `buf` before `items[head]`.
    head_off: usize,
    /// Openers (destination, payload, TTL): few, sent one by one ahead of the rest.
    openers: Vec<(SocketAddr, Vec<u8>, u8)>,
}

struct Queued {
    to: SocketAddr,
    len: usize,
}

impl SendQueue {
    /// Queue one datagram; dropped when empty or when the queue is full.
    pub(crate) fn push(&mut self, to: SocketAddr, data: &[u8]) {
        if data.is_empty() {
            // Nothing we send is empty, and a run of empty ones would be one
            // GSO send with segment size 0 (see
            // `zero_length_datagrams_are_dropped_and_gso_stays_on`).
            tracing::debug!(%to, "empty UDP datagram dropped");
            return;
        }
        if self.items.len() - self.head >= MAX_QUEUED {
            return;
        }
        self.buf.extend_from_slice(data);
        self.items.push(Queued { to, len: data.len() });
    }

    /// Queue one datagram with its own TTL (an opener); dropped when full.
    pub(crate) fn push_with_hops(&mut self, to: SocketAddr, data: &[u8], hops: u8) {
        if self.openers.len() < MAX_OPENERS {
            self.openers.push((to, data.to_vec(), hops));
        }
    }

    /// Datagrams not yet sent.
    pub(crate) fn len(&self) -> usize {
        self.items.len() - self.head
    }

    /// Whether everything queued has been sent.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Send what is queued, as few calls as GSO allows; stops at
    /// `WouldBlock` and keeps the rest for when the socket is writable.
    /// Returns how many send calls were made.
    pub(crate) fn flush(&mut self, sock: &UdpSocket) -> usize {
        let mut calls = 0;
        for (to, data, hops) in self.openers.drain(..) {
            calls += 1;
            // Best effort, like every probe: the next round sends another.
            if let Err(e) = sock.send_with_hops(to, &data, hops) {
                tracing::debug!(%to, error = %e, "opener not sent");
            }
        }
        while self.head < self.items.len() {
            let (count, bytes) = self.run(sock.max_segments());
            let first = &self.items[self.head];
            let contents = &self.buf[self.head_off..][..bytes];
            let t = Transmit { destination: first.to, ecn: None, contents, segment_size: (count > 1).then_some(first.len), src_ip: None };
            calls += 1;
            match sock.send(&t) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if count > 1 && matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL)) => {
                    // The device or kernel cannot segment: resend this run
                    // one datagram per call, and never segment again.
                    if !sock.gso_off.swap(true, Ordering::Relaxed) {
                        tracing::info!(error = %e, "UDP segmentation offload failed; sending one datagram per call from now on");
                    }
                    continue;
                }
                Err(e) => tracing::debug!(to = %t.destination, error = %e, "UDP send failed"),
            }
            self.head += count;
            self.head_off += bytes;
        }
        self.compact();
        calls
    }

    /// The longest run from `head` that one segmented send may carry: same
    /// address, same size (the last one may be shorter), at most `max`.
    fn run(&self, max: usize) -> (usize, usize) {
        let first = &self.items[self.head];
        let mut bytes = first.len;
        let mut count = 1;
        for q in &self.items[self.head + 1..] {
            if count >= max || q.to != first.to || q.len > first.len || bytes + q.len > MAX_SEND {
                break;
            }
            bytes += q.len;
            count += 1;
            if q.len < first.len {
                break;
            }
        }
        (count, bytes)
    }

    fn compact(&mut self) {
        if self.head == self.items.len() {
            self.items.clear();
            self.buf.clear();
        } else if self.head > 0 {
            self.items.drain(..self.head);
            self.buf.drain(..self.head_off);
        } else {
            return;
        }
        self.head = 0;
        self.head_off = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_with_buffers_at_least_the_default() {
        let s = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let sock = socket2::SockRef::from(&s.io);
        // Whatever the privileges, never below what an unprivileged
        // request gets (the kernel's default is ~208 KiB).
        assert!(sock.recv_buffer_size().unwrap() >= 256 * 1024);
        assert!(sock.send_buffer_size().unwrap() >= 256 * 1024);
        assert!(s.local_addr().unwrap().port() != 0);
    }

    fn getsockopt(sock: &UdpSocket, level: libc::c_int, option: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor and an int-sized out buffer with its length.
        let r = unsafe { libc::getsockopt(sock.io.as_raw_fd(), level, option, (&mut v as *mut libc::c_int).cast(), &mut len) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    /// quinn-udp's "never fragment" would make a full-sized WireGuard
    /// datagram fail with EMSGSIZE on a smaller-MTU link; bind undoes it.
    #[tokio::test]
    async fn fragmentation_stays_as_the_kernel_default() {
        let s = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        assert_eq!(getsockopt(&s, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER), libc::IP_PMTUDISC_WANT);
        if s.local_addr().unwrap().is_ipv6() {
            assert_eq!(getsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER), libc::IPV6_PMTUDISC_WANT);
            assert_eq!(getsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG), 0);
        }
    }

    #[test]
    fn offload_is_on_unless_turned_off() {
        assert!(offload_wanted(None));
        assert!(offload_wanted(Some("on")));
        for off in ["off", "0", "false", "no", " off\n"] {
            assert!(!offload_wanted(Some(off)), "{off:?}");
        }
    }

    fn queue(items: &[(&str, usize)]) -> SendQueue {
        let mut q = SendQueue::default();
        for (to, len) in items {
            q.push(to.parse().unwrap(), &vec![0xab; *len]);
        }
        q
    }

    #[test]
    fn runs_are_one_address_and_one_size_with_a_shorter_tail() {
        let a = "10.0.0.1:1";
        let b = "10.0.0.2:1";
        let q = queue(&[(a, 100), (a, 100), (a, 60), (a, 100), (b, 100)]);
        assert_eq!(q.run(64), (3, 260));
        let q = queue(&[(a, 100), (b, 100), (b, 100)]);
        assert_eq!(q.run(64), (1, 100));
        let q = queue(&[(a, 100), (a, 120)]);
        assert_eq!(q.run(64), (1, 100));
        let q = queue(&[(a, 100), (a, 100), (a, 100)]);
        assert_eq!(q.run(2), (2, 200));
        assert_eq!(q.run(1), (1, 100));
        let q = queue(&[(a, 40_000), (a, 40_000)]);
        assert_eq!(q.run(64), (1, 40_000), "two together exceed a UDP payload");
    }

    /// Receive until `n` datagrams arrived, through the batch path.
    async fn recv_n(sock: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut batch = RecvBatch::default();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, sock.readable()).await {
                Ok(r) => r.unwrap(),
                Err(_) => break,
            }
            match sock.recv(&mut batch) {
                Ok(()) => got.extend(batch.datagrams().map(|(a, d)| (a, d.to_vec()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    fn numbered(i: usize, len: usize) -> Vec<u8> {
        let mut d = vec![i as u8; len];
        d[0] = i as u8;
        d
    }

    /// A batch to one peer arrives whole and in order, in fewer calls than
    /// datagrams where GSO exists; the wildcard (dual-stack) socket sends to
    /// plain IPv4 and receives mapped sources as plain IPv4.
    #[tokio::test]
    async fn a_batch_arrives_whole_and_in_order_on_the_dual_stack_socket() {
        let a = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let b = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let to: SocketAddr = format!("127.0.0.1:{}", b.local_addr().unwrap().port()).parse().unwrap();
        let mut q = SendQueue::default();
        for i in 0..100 {
            q.push(to, &numbered(i, if i == 99 { 300 } else { 1200 }));
        }
        // A new socket's readiness is unknown until the reactor has seen it.
        a.writable().await.unwrap();
        let calls = q.flush(&a);
        assert!(q.is_empty());
        if a.max_segments() > 1 {
            assert!(calls <= 4, "{calls} calls for 100 datagrams with GSO");
        }
        let got = recv_n(&b, 100).await;
        assert_eq!(got.len(), 100);
        for (i, (from, d)) in got.iter().enumerate() {
            assert_eq!(from.to_string(), format!("127.0.0.1:{}", a.local_addr().unwrap().port()));
            assert_eq!(d, &numbered(i, if i == 99 { 300 } else { 1200 }));
        }
    }

    /// An empty datagram carries nothing WireGuard or disco would send. A
    /// run of them would be one segmented send with a segment size of 0:
    /// where the kernel refuses that (EINVAL) GSO goes off for good, and
    /// where it does not (Linux 6.18 takes the whole run as one `sendmsg`)
    /// the run is not what was queued either. So `push` drops them.
    #[tokio::test]
    async fn zero_length_datagrams_are_dropped_and_gso_stays_on() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        let segments = a.max_segments();
        let mut q = SendQueue::default();
        for _ in 0..10 {
            q.push(to, &[]);
        }
        a.writable().await.unwrap();
        assert_eq!(q.flush(&a), 0, "nothing to send");
        assert_eq!(a.max_segments(), segments, "GSO must stay on");
        q.push(to, &numbered(1, 100));
        q.push(to, &[]);
        q.push(to, &numbered(2, 100));
        assert_eq!(q.len(), 2, "only the two datagrams with content are queued");
        q.flush(&a);
        let got: Vec<Vec<u8>> = recv_n(&b, 2).await.into_iter().map(|(_, d)| d).collect();
        assert_eq!(got, vec![numbered(1, 100), numbered(2, 100)]);
    }

    /// With `SO_NO_CHECK` the kernel refuses segmented sends (EINVAL), as a
    /// device without UDP GSO would: the same batch still arrives whole,
    /// one datagram per call, and GSO stays off.
    #[tokio::test]
    async fn a_refused_gso_send_falls_back_to_plain_sends() {
        let a = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        if a.max_segments() == 1 {
            eprintln!("this kernel has no UDP GSO; nothing to fall back from");
            return;
        }
        setsockopt(&SockRef::from(&a.io), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1);
        let to = b.local_addr().unwrap();
        let mut q = SendQueue::default();
        for i in 0..20 {
            q.push(to, &numbered(i, 1000));
        }
        a.writable().await.unwrap();
        q.flush(&a);
        assert_eq!(a.max_segments(), 1, "GSO must stay off after EINVAL");
        let got = recv_n(&b, 20).await;
        assert_eq!(got.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>(), (0..20).map(|i| numbered(i, 1000)).collect::<Vec<_>>());
        for i in 20..25 {
            q.push(to, &numbered(i, 1000));
        }
        assert_eq!(q.flush(&a), 5, "one call per datagram once GSO is off");
        assert_eq!(recv_n(&b, 5).await.len(), 5);
    }
}
