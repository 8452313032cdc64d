//! The dual-stack underlay: one socket for IPv4 and IPv6 peers.
//!
//! A wildcard listen address (`0.0.0.0` or `[::]`) becomes an IPv6 socket on
//! `[::]` with `IPV6_V6ONLY` off, so one UDP port (and one WireGuard
//! endpoint, one disco identity) serves both families. IPv4 peers then
//! arrive as IPv4-mapped addresses (`::ffff:a.b.c.d`); every address that
//! enters from such a socket goes through [`normalize`] first, so the rest
//! of the node (WireGuard roaming, path candidates, disco, STUN, the
//! endpoint rule) only ever sees plain IPv4 for IPv4 peers and one key per
//! peer address. A host without IPv6 (kernel built or booted without it)
//! gets the old IPv4-only socket and a log line saying so.
#![warn(missing_docs)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// `[::ffff:a.b.c.d]:p` -> `a.b.c.d:p`; anything else unchanged.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Errors that mean "this host has no IPv6", as opposed to a real problem
/// with the address (a port in use must not silently fall back).
fn no_ipv6(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EPROTONOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

/// A bound, non-blocking socket of `ty` for `addr`; wildcard addresses get
/// the dual-stack socket described in the module docs. `configure` runs
/// before `bind` (buffer sizes and the like).
pub(crate) fn bind(addr: SocketAddr, ty: Type, configure: impl Fn(&Socket)) -> io::Result<Socket> {
    let proto = if ty == Type::STREAM { Protocol::TCP } else { Protocol::UDP };
    let open = |a: SocketAddr, dual: bool| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(a), ty, Some(proto))?;
        if dual {
            s.set_only_v6(false)?;
        }
        if ty == Type::STREAM {
            s.set_reuse_address(true)?;
        }
        configure(&s);
        s.set_nonblocking(true)?;
        s.bind(&a.into())?;
        Ok(s)
    };
    if !addr.ip().is_unspecified() {
        return open(addr, false);
    }
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port());
    match open(v6, true) {
        Ok(s) => Ok(s),
        Err(e) if no_ipv6(&e) => {
            tracing::info!(error = %e, "no IPv6 on this host: the underlay is IPv4 only (0.0.0.0:{})", addr.port());
            open(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()), false)
        }
        Err(e) => Err(e),
    }
}

/// A tokio UDP socket per [`bind`].
pub(crate) fn udp(addr: SocketAddr, configure: impl Fn(&Socket)) -> io::Result<tokio::net::UdpSocket> {
    let s = bind(addr, Type::DGRAM, configure).map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// A tokio TCP listener per [`bind`].
pub(crate) fn tcp_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let s = bind(addr, Type::STREAM, |_| {}).map_err(|e| io::Error::new(e.kind(), format!("cannot bind TCP {addr}: {e}")))?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let n = |s: &str| normalize(s.parse().unwrap()).to_string();
        assert_eq!(n("[::ffff:10.1.2.3]:41641"), "10.1.2.3:41641");
        assert_eq!(n("10.1.2.3:41641"), "10.1.2.3:41641");
        assert_eq!(n("[2001:db8::1]:51820"), "[2001:db8::1]:51820");
        // IPv4-compatible (deprecated, ::a.b.c.d) is a real IPv6 address, not mapped.
        assert_eq!(n("[::10.1.2.3]:1"), "[::a01:203]:1");
    }

    #[test]
    fn only_missing_ipv6_falls_back() {
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EADDRINUSE)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EACCES)));
    }

    #[tokio::test]
    async fn one_wildcard_socket_serves_both_families() {
        let s = udp("0.0.0.0:0".parse().unwrap(), |_| {}).unwrap();
        let port = s.local_addr().unwrap().port();
        for peer_ip in ["127.0.0.1", "::1"] {
            let peer = tokio::net::UdpSocket::bind((peer_ip, 0)).await.unwrap();
            let to = SocketAddr::new(peer_ip.parse().unwrap(), port);
            peer.send_to(b"ping", to).await.unwrap();
            let mut buf = [0u8; 8];
            let (n, from) = s.recv_from(&mut buf).await.unwrap();
            assert_eq!((&buf[..n], normalize(from)), (&b"ping"[..], peer.local_addr().unwrap()));
            // Answers go to the plain (unmapped) address too.
            s.send_to(b"pong", normalize(from)).await.unwrap();
            let (n, _) = peer.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"pong");
        }
    }
}
