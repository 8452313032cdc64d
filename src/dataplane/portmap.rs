//! Port mapping with PCP (RFC 6887, see [`crate::dataplane::pcp`]) or, where
//! the gateway only knows its predecessor, NAT-PMP (RFC 6886): ask the default gateway to forward
//! a public port (a random one we then keep) to our WireGuard socket, so peers can reach us even when
//! hole punching cannot work (both sides behind a NAT that moves our mapping
//! when the peer's probe lands first, or a symmetric NAT). The mapped address
//! is one more candidate endpoint we announce; peers still prove it with
//! sealed pings before using it.
//!
//! PCP goes first: it is what current gateways speak, and a NAT-PMP-only
//! one answers it at once with "unsupported version", so the fallback costs
//! one round trip. Sans-IO NAT-PMP codec ([`Request`], [`parse_response`]) plus a small task
//! ([`start`]) that maps, renews at half the granted lifetime, and deletes the
//! mapping when its [`PortMapper`] is dropped. Routers without NAT-PMP never
//! answer; the task then stays quiet and tries again every [`RETRY`].
#![warn(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::dataplane::pcp;

/// NAT-PMP's port on the gateway.
pub(crate) const SERVER_PORT: u16 = 5351;
/// The lifetime we ask for; RFC 6886 recommends two hours.
pub(crate) const LIFETIME: u32 = 7200;
/// How long to wait before asking again when nothing answered.
pub(crate) const RETRY: Duration = Duration::from_secs(300);
/// RFC 6886 starts at 250 ms and doubles; three tries are enough on a LAN.
const ATTEMPTS: [Duration; 3] = [Duration::from_millis(250), Duration::from_millis(500), Duration::from_secs(1)];

/// A request to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// "What is your public address?"
    ExternalAddress,
    /// Map UDP `internal` to (preferably) `external` for `lifetime` seconds;
    /// lifetime 0 with external 0 deletes the mapping.
    MapUdp {
        /// Our port.
        internal: u16,
        /// The public port we would like.
        external: u16,
        /// Seconds; 0 deletes.
        lifetime: u32,
    },
}

impl Request {
    /// The request's bytes (RFC 6886 section 3).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Request::ExternalAddress => vec![0, 0],
            Request::MapUdp { internal, external, lifetime } => {
                let mut v = vec![0, 1, 0, 0];
                v.extend_from_slice(&internal.to_be_bytes());
                v.extend_from_slice(&external.to_be_bytes());
                v.extend_from_slice(&lifetime.to_be_bytes());
                v
            }
        }
    }
}

/// A successful answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// The gateway's public address.
    ExternalAddress(Ipv4Addr),
    /// UDP `internal` is mapped to public `external` for `lifetime` seconds.
    MappedUdp {
        /// Our port.
        internal: u16,
        /// The public port.
        external: u16,
        /// Seconds.
        lifetime: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
/// Why an answer is not what was asked.
pub enum Error {
    /// Not a NAT-PMP answer of a known opcode and length.
    #[error("not a NAT-PMP response")]
    Malformed,
    /// The gateway said no, with this result code.
    #[error("the gateway refused the request (NAT-PMP result code {0})")]
    Refused(u16),
}

/// Parse a gateway's answer. Anything but an exact version 0 response of a
/// known opcode and length is [`Error::Malformed`].
pub fn parse_response(b: &[u8]) -> Result<Response, Error> {
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if b.len() < 8 || b[0] != 0 {
        return Err(Error::Malformed);
    }
    let (op, result) = (b[1], be16(2));
    match (op, b.len()) {
        (128, 12) | (129, 16) if result != 0 => Err(Error::Refused(result)),
        (128, 12) => Ok(Response::ExternalAddress(Ipv4Addr::new(b[8], b[9], b[10], b[11]))),
        (129, 16) => Ok(Response::MappedUdp { internal: be16(8), external: be16(10), lifetime: be32(12) }),
        _ => Err(Error::Malformed),
    }
}

/// The IPv4 default gateway from `/proc/net/route` (Linux), if any.
pub(crate) fn default_gateway() -> Option<Ipv4Addr> {
    parse_default_gateway(&std::fs::read_to_string("/proc/net/route").ok()?)
}

fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags ...; the kernel prints addresses
        // as host-order (little-endian) hex.
        if f.len() < 4 || f[1] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        let flags = u32::from_str_radix(f[3], 16).ok()?;
        // RTF_UP | RTF_GATEWAY
        (flags & 0x3 == 0x3 && gw != 0).then(|| Ipv4Addr::from(gw.swap_bytes()))
    })
}

/// The running mapper: the mapped public address (if any) on [`PortMapper::mapped`];
/// dropping it stops the task and deletes the mapping.
pub(crate) struct PortMapper {
    mapped: watch::Receiver<Option<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
    gateway: Ipv4Addr,
    /// The datagram that deletes the current mapping, in the protocol that made it.
    delete: Arc<Mutex<Option<Vec<u8>>>>,
}

impl PortMapper {
    pub(crate) fn mapped(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.mapped.clone()
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        self.task.abort();
        if self.mapped.borrow().is_none() {
            return;
        }
        let Some(del) = self.delete.lock().ok().and_then(|mut d| d.take()) else { return };
        // Best effort, one datagram: a mapping left behind expires on its own.
        if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") {
            let _ = s.send_to(&del, SocketAddrV4::new(self.gateway, SERVER_PORT));
            tracing::debug!(gateway = %self.gateway, "port mapping deleted");
        }
    }
}

/// Start mapping UDP `internal` (our WireGuard port) on the default gateway.
/// `None` when there is no IPv4 default gateway.
pub(crate) fn start(internal: u16) -> Option<PortMapper> {
    let gateway = default_gateway()?;
    let (tx, rx) = watch::channel(None);
    let delete = Arc::new(Mutex::new(None));
    let task = tokio::spawn(run(gateway, internal, tx, delete.clone()));
    Some(PortMapper { mapped: rx, task, gateway, delete })
}

async fn run(gateway: Ipv4Addr, internal: u16, tx: watch::Sender<Option<SocketAddr>>, delete: Arc<Mutex<Option<Vec<u8>>>>) {
    let server = SocketAddr::from((gateway, SERVER_PORT));
    // One PCP mapping across renewals, and its delete.
    let nonce: [u8; 12] = rand::random();
    // Not our own port: peers may already be probing `gateway_ip:internal`
    // (what STUN saw), and the router keeps each such flow with the NAT
    // decision of its first packet, taken before the mapping existed. A
    // port nobody has probed yet gets the mapping from its first packet.
    let mut external = 20_000 + rand::random::<u16>() % 40_000;
    loop {
        let pcp = map_pcp(server, internal, external, nonce).await;
        if let Err(e) = &pcp {
            tracing::debug!(%server, "PCP: {e}");
        }
        let mapped = match pcp {
            Ok(m) => Ok(m),
            Err(_) => map_once(server, internal, external).await.map(|(addr, lifetime)| {
                let del = Request::MapUdp { internal, external: 0, lifetime: 0 }.encode();
                (addr, lifetime, "NAT-PMP", del)
            }),
        };
        let wait = match mapped {
            Ok((addr, lifetime, proto, del)) => {
                external = addr.port();
                if let Ok(mut d) = delete.lock() {
                    *d = Some(del);
                }
                tx.send_if_modified(|cur| {
                    let changed = *cur != Some(addr);
                    if changed {
                        tracing::info!(%addr, lifetime, "{proto}: the gateway maps a public port to us");
                    }
                    *cur = Some(addr);
                    changed
                });
                // Renew at half the lifetime, as RFC 6886 asks.
                Duration::from_secs(u64::from(lifetime.max(120) / 2))
            }
            Err(e) => {
                tracing::debug!(%server, "NAT-PMP: {e}");
                tx.send_if_modified(|cur| cur.take().is_some());
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum MapError {
    #[error("no answer")]
    NoAnswer,
    #[error(transparent)]
    Protocol(#[from] Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A PCP MAP request; returns the mapped address, its lifetime, the
/// protocol's name and the datagram that deletes the mapping.
async fn map_pcp(
    server: SocketAddr,
    internal: u16,
    external: u16,
    nonce: [u8; 12],
) -> Result<(SocketAddr, u32, &'static str, Vec<u8>), MapError> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    sock.connect(server).await?;
    // The gateway checks this against the datagram's source address.
    let client = sock.local_addr()?.ip();
    let req = pcp::MapRequest { client, nonce, internal_port: internal, suggested_port: external, lifetime: LIFETIME };
    exchange(&sock, &req.encode(), |d| {
        // Version 0: a NAT-PMP gateway saying it does not speak PCP.
        if d.first() == Some(&0) {
            return Some(Err(Error::Malformed.into()));
        }
        let m = pcp::parse_map_response(d).ok()?;
        if m.nonce != nonce || m.internal_port != internal {
            return None;
        }
        if m.external.port() == 0 || m.lifetime == 0 {
            return Some(Err(Error::Malformed.into()));
        }
        let del = pcp::MapRequest { lifetime: 0, ..req }.encode();
        Some(Ok((m.external, m.lifetime, "PCP", del)))
    })
    .await
}

/// Ask for the public address and a mapping; returns the mapped address
/// and its lifetime.
async fn map_once(server: SocketAddr, internal: u16, external: u16) -> Result<(SocketAddr, u32), MapError> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    // Connected: the kernel drops datagrams from anyone but the gateway's port.
    sock.connect(server).await?;
    let ip = match ask(&sock, Request::ExternalAddress).await? {
        Response::ExternalAddress(ip) => ip,
        _ => return Err(Error::Malformed.into()),
    };
    let req = Request::MapUdp { internal, external, lifetime: LIFETIME };
    match ask(&sock, req).await? {
        Response::MappedUdp { internal: i, external, lifetime } if i == internal && external != 0 => {
            Ok((SocketAddr::from((ip, external)), lifetime))
        }
        _ => Err(Error::Malformed.into()),
    }
}

async fn ask(sock: &tokio::net::UdpSocket, req: Request) -> Result<Response, MapError> {
    let want = match req {
        Request::ExternalAddress => 128,
        Request::MapUdp { .. } => 129,
    };
    exchange(sock, &req.encode(), |d| (d.get(1) == Some(&want)).then(|| parse_response(d).map_err(MapError::from))).await
}

/// Sends `req` with the [`ATTEMPTS`] back-off until `answer` takes a
/// datagram (`Some`); datagrams it passes over (`None`) are ignored. The
/// one request/answer loop both protocols use.
async fn exchange<T>(
    sock: &tokio::net::UdpSocket,
    req: &[u8],
    mut answer: impl FnMut(&[u8]) -> Option<Result<T, MapError>>,
) -> Result<T, MapError> {
    // PCP's largest message (RFC 6887 section 7).
    let mut buf = [0u8; 1100];
    for wait in ATTEMPTS {
        sock.send(req).await?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            // ICMP port unreachable: no server there.
            let n = r?;
            if let Some(a) = answer(&buf[..n]) {
                return a;
            }
        }
    }
    Err(MapError::NoAnswer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_rfc_6886_bytes() {
        assert_eq!(Request::ExternalAddress.encode(), [0, 0]);
        let m = Request::MapUdp { internal: 41641, external: 41641, lifetime: 7200 }.encode();
        assert_eq!(m, [0, 1, 0, 0, 0xa2, 0xa9, 0xa2, 0xa9, 0, 0, 0x1c, 0x20]);
    }

    #[test]
    fn responses_parse_and_refusals_and_junk_are_errors() {
        let ext = [0, 128, 0, 0, 0, 0, 0, 9, 203, 0, 113, 5];
        assert_eq!(parse_response(&ext), Ok(Response::ExternalAddress(Ipv4Addr::new(203, 0, 113, 5))));
        let map = [0, 129, 0, 0, 0, 0, 0, 9, 0xa2, 0xa9, 0x30, 0x39, 0, 0, 0x0e, 0x10];
        assert_eq!(parse_response(&map), Ok(Response::MappedUdp { internal: 41641, external: 12345, lifetime: 3600 }));
        let mut refused = map;
        refused[3] = 2;
        assert_eq!(parse_response(&refused), Err(Error::Refused(2)));
        for junk in [&[][..], &[0, 128], &ext[..11], &[1; 12], &[0, 129, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 130, 0, 0, 0, 0, 0, 0]] {
            assert_eq!(parse_response(junk), Err(Error::Malformed), "{junk:?}");
        }
    }

    #[test]
    fn default_gateway_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_gateway(table), Some(Ipv4Addr::new(192, 168, 2, 1)));
        assert_eq!(parse_default_gateway("Iface\tDestination\n"), None);
    }
}
