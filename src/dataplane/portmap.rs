//! Port mapping with PCP (RFC 6887, see [`crate::dataplane::pcp`]), NAT-PMP
//! (RFC 6886) where the gateway only knows PCP's predecessor, or UPnP IGD
//! ([`crate::dataplane::upnp`]) where it offers only that: ask the default
//! gateway to forward a public port (a random one we then keep) to our
//! WireGuard socket, so peers can reach us even when hole punching cannot
//! work (both sides behind a NAT that moves our mapping when the peer's
//! probe lands first, or a symmetric NAT). The mapped address is one more
//! candidate endpoint we announce; peers still prove it with sealed pings
//! before using it.
//!
//! PCP goes first: it is what current gateways speak, and a NAT-PMP-only
//! one answers it at once with "unsupported version", so the fallback costs
//! one round trip. UPnP discovery (SSDP) runs alongside them and maps only
//! when they fail ([`map_any`]). Sans-IO NAT-PMP codec ([`Request`],
//! [`parse_response`]) and LAN table ([`Lan`]) plus a small task ([`start`])
//! that maps, renews at half the granted lifetime ([`renew_after`]), and
//! deletes the mapping when its [`PortMapper`] is dropped. Routers with none
//! of the three never answer; the task then stays quiet and tries again
//! after 5 s, doubling up to every [`RETRY`] ([`retry_after`]).
#![warn(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::dataplane::{pcp, upnp};

/// NAT-PMP's port on the gateway.
pub(crate) const SERVER_PORT: u16 = 5351;
/// The lifetime we ask for; RFC 6886 recommends two hours.
pub(crate) const LIFETIME: u32 = 7200;
/// The longest wait before asking again when nothing answered.
pub(crate) const RETRY: Duration = Duration::from_secs(300);
/// The first wait after a round got no mapping; doubles up to [`RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// How often a permanent (UPnP lease 0) mapping is added again.
pub(crate) const PERMANENT_CHECK: Duration = Duration::from_secs(1200);
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

/// The default route's LAN, from `/proc/net/route` (Linux): the IPv4
/// default gateway and the networks directly on the default route's
/// interface. Only devices inside those networks are asked for mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lan {
    pub(crate) gateway: Ipv4Addr,
    /// (network, mask) of each on-link route of the default route's interface.
    nets: Vec<(u32, u32)>,
}

impl Lan {
    /// The running system's, if it has an IPv4 default route.
    pub(crate) fn of_system() -> Option<Lan> {
        Lan::parse(&std::fs::read_to_string("/proc/net/route").ok()?)
    }

    pub(crate) fn parse(table: &str) -> Option<Lan> {
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...; the
        // kernel prints addresses as host-order (little-endian) hex.
        let rows: Vec<(&str, u32, u32, u32, u32)> = table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let hex = |i: usize| f.get(i).and_then(|v| u32::from_str_radix(v, 16).ok()).map(u32::swap_bytes);
                Some((*f.first()?, hex(1)?, hex(2)?, u32::from_str_radix(f.get(3)?, 16).ok()?, hex(7)?))
            })
            .collect();
        // RTF_UP | RTF_GATEWAY
        let (iface, gw) = rows.iter().find(|r| r.1 == 0 && r.3 & 0x3 == 0x3 && r.2 != 0).map(|r| (r.0, Ipv4Addr::from(r.2)))?;
        let nets = rows.iter().filter(|r| r.0 == iface && r.1 != 0 && r.3 & 0x3 == 0x1 && r.4 != 0).map(|r| (r.1 & r.4, r.4)).collect();
        Some(Lan { gateway: gw, nets })
    }

    /// Whether `ip` is a host address on the LAN (or the gateway itself).
    pub(crate) fn contains(&self, ip: std::net::IpAddr) -> bool {
        let std::net::IpAddr::V4(ip) = ip else { return false };
        if ip == self.gateway {
            return true;
        }
        let a = u32::from(ip);
        self.nets.iter().any(|&(net, mask)| a & mask == net && a != net && a != net | !mask)
    }
}

/// Renew a mapping granted for `lifetime` seconds at half of it, as RFC
/// 6886 asks (at least a minute apart); a permanent one (UPnP lease 0)
/// is re-added every [`PERMANENT_CHECK`], in case the router restarted
/// and forgot it.
pub(crate) fn renew_after(lifetime: u32) -> Duration {
    match lifetime {
        0 => PERMANENT_CHECK,
        l => Duration::from_secs(u64::from(l.max(120) / 2)),
    }
}

/// The wait after the `failures`-th round in a row without a mapping:
/// [`FIRST_RETRY`], doubling, at most [`RETRY`]. A gateway still starting
/// (a router after a reboot, the lab's miniupnpd) refuses the first
/// round; one with no mapping service costs one round every 5 min.
pub(crate) fn retry_after(failures: u32) -> Duration {
    FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RETRY)
}

/// How a mapping was made, which says how to renew and delete it.
#[derive(Clone)]
enum How {
    /// PCP or NAT-PMP: `delete` is the datagram that deletes it.
    Datagram { proto: &'static str, delete: Vec<u8> },
    /// UPnP IGD, on this gateway.
    Upnp(Box<upnp::UpnpGateway>),
}

impl How {
    fn proto(&self) -> &'static str {
        match self {
            How::Datagram { proto, .. } => proto,
            How::Upnp(_) => "UPnP",
        }
    }
}

/// A mapping: its public address and lifetime (0: permanent).
struct Mapped {
    addr: SocketAddr,
    lifetime: u32,
    how: How,
}

/// The running mapper: the mapped public address (if any) on [`PortMapper::mapped`];
/// dropping it stops the task and deletes the mapping.
pub(crate) struct PortMapper {
    mapped: watch::Receiver<Option<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
    gateway: Ipv4Addr,
    /// How the current mapping was made, to delete it in the same protocol.
    delete: Arc<Mutex<Option<How>>>,
}

impl PortMapper {
    pub(crate) fn mapped(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.mapped.clone()
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        self.task.abort();
        let Some(addr) = *self.mapped.borrow() else { return };
        let Some(how) = self.delete.lock().ok().and_then(|mut d| d.take()) else { return };
        match how {
            // Best effort, one datagram: a mapping left behind expires on its own.
            How::Datagram { delete, .. } => {
                if let Ok(s) = std::net::UdpSocket::bind("0.0.0.0:0") {
                    let _ = s.send_to(&delete, SocketAddrV4::new(self.gateway, SERVER_PORT));
                    tracing::debug!(gateway = %self.gateway, "port mapping deleted");
                }
            }
            How::Upnp(gw) => upnp::unmap_blocking(*gw, addr.port()),
        }
    }
}

/// Start mapping UDP `internal` (our WireGuard port) on the default gateway.
/// `None` when there is no IPv4 default gateway.
pub(crate) fn start(internal: u16) -> Option<PortMapper> {
    let lan = Lan::of_system()?;
    let gateway = lan.gateway;
    let (tx, rx) = watch::channel(None);
    let delete = Arc::new(Mutex::new(None));
    let task = tokio::spawn(run(lan, internal, tx, delete.clone()));
    Some(PortMapper { mapped: rx, task, gateway, delete })
}

async fn run(lan: Lan, internal: u16, tx: watch::Sender<Option<SocketAddr>>, delete: Arc<Mutex<Option<How>>>) {
    // One PCP mapping across renewals, and its delete.
    let nonce: [u8; 12] = rand::random();
    // Not our own port: peers may already be probing `gateway_ip:internal`
    // (what STUN saw), and the router keeps each such flow with the NAT
    // decision of its first packet, taken before the mapping existed. A
    // port nobody has probed yet gets the mapping from its first packet.
    let mut external = 20_000 + rand::random::<u16>() % 40_000;
    // The UPnP gateway that mapped us: renewals go straight to it.
    let mut upnp_gw: Option<Box<upnp::UpnpGateway>> = None;
    let mut failures = 0;
    loop {
        let mapped = match upnp_gw.take() {
            Some(gw) => match map_upnp(*gw, &lan, internal, external).await {
                Ok(m) => Ok(m),
                Err(e) => {
                    tracing::debug!("UPnP renewal: {e}");
                    map_any(&lan, internal, external, nonce).await
                }
            },
            None => map_any(&lan, internal, external, nonce).await,
        };
        let wait = match mapped {
            Ok(Mapped { addr, lifetime, how }) => {
                failures = 0;
                external = addr.port();
                let proto = how.proto();
                if let How::Upnp(gw) = &how {
                    upnp_gw = Some(gw.clone());
                }
                if let Ok(mut d) = delete.lock() {
                    *d = Some(how);
                }
                tx.send_if_modified(|cur| {
                    let changed = *cur != Some(addr);
                    if changed {
                        tracing::info!(%addr, lifetime, "{proto}: the gateway maps a public port to us");
                        if lifetime == 0 {
                            tracing::info!(
                                "{proto}: the gateway grants only permanent mappings; ours is deleted when tailgate stops \
                                 cleanly, otherwise it stays until the router restarts"
                            );
                        }
                    }
                    *cur = Some(addr);
                    changed
                });
                renew_after(lifetime)
            }
            Err(e) => {
                tracing::debug!(gateway = %lan.gateway, "no port mapping: {e}");
                tx.send_if_modified(|cur| cur.take().is_some());
                failures += 1;
                retry_after(failures)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One round: PCP, then NAT-PMP, with UPnP discovery running alongside
/// (SSDP takes its own time, and a gateway that speaks only UPnP usually
/// drops PCP silently, which costs the full PCP and NAT-PMP back-off,
/// 3.5 s, before UPnP would even start). UPnP maps only when PCP/NAT-PMP
/// failed or have not answered within [`UPNP_GRACE`]: a gateway speaking
/// PCP answers it within milliseconds, so one speaking both keeps PCP.
async fn map_any(lan: &Lan, internal: u16, external: u16, nonce: [u8; 12]) -> Result<Mapped, MapError> {
    let server = SocketAddr::from((lan.gateway, SERVER_PORT));
    let start = tokio::time::Instant::now();
    let chain = async {
        let pcp = map_pcp(server, internal, external, nonce).await;
        match pcp {
            Ok(m) => Ok(m),
            Err(e) => {
                tracing::debug!(%server, "PCP: {e}");
                let (addr, lifetime) = map_once(server, internal, external).await.inspect_err(|e| {
                    tracing::debug!(%server, "NAT-PMP: {e}");
                })?;
                let delete = Request::MapUdp { internal, external: 0, lifetime: 0 }.encode();
                Ok(Mapped { addr, lifetime, how: How::Datagram { proto: "NAT-PMP", delete } })
            }
        }
    };
    let search = async {
        let local = local_addr_toward(lan.gateway).await?;
        let gw = upnp::search(lan, local).await?;
        tokio::time::sleep_until(start + UPNP_GRACE).await;
        Ok::<_, MapError>(gw)
    };
    tokio::pin!(chain, search);
    tokio::select! {
        biased;
        r = &mut chain => match r {
            Ok(m) => Ok(m),
            Err(_) => map_upnp(search.await?, lan, internal, external).await,
        },
        g = &mut search => {
            let up = match g {
                Ok(gw) => map_upnp(gw, lan, internal, external).await,
                Err(e) => Err(e),
            };
            match up {
                Ok(m) => Ok(m),
                Err(e) => {
                    tracing::debug!(gateway = %lan.gateway, "{e}");
                    chain.await
                }
            }
        }
    }
}

/// PCP/NAT-PMP's head start over a UPnP gateway that answered first.
const UPNP_GRACE: Duration = Duration::from_millis(500);

async fn map_upnp(gw: upnp::UpnpGateway, lan: &Lan, internal: u16, external: u16) -> Result<Mapped, MapError> {
    let local = SocketAddrV4::new(local_addr_toward(lan.gateway).await?, internal);
    let (addr, lifetime) = upnp::map(&gw, local, external).await?;
    Ok(Mapped { addr: addr.into(), lifetime, how: How::Upnp(Box::new(gw)) })
}

/// Our address on the default route's LAN (the mapping's internal client,
/// and where SSDP multicast leaves from).
async fn local_addr_toward(gateway: Ipv4Addr) -> Result<Ipv4Addr, MapError> {
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    sock.connect((gateway, SERVER_PORT)).await?;
    match sock.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => Ok(ip),
        std::net::IpAddr::V6(_) => Err(MapError::NoAnswer),
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
    #[error(transparent)]
    Upnp(#[from] upnp::UpnpError),
}

/// A PCP MAP request.
async fn map_pcp(server: SocketAddr, internal: u16, external: u16, nonce: [u8; 12]) -> Result<Mapped, MapError> {
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
        let delete = pcp::MapRequest { lifetime: 0, ..req }.encode();
        Some(Ok(Mapped { addr: m.external, lifetime: m.lifetime, how: How::Datagram { proto: "PCP", delete } }))
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
    fn default_route_lan_from_proc_net_route() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                     eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t0000000A\t0102A8C0\t0003\t0\t0\t0\t000000FF\t0\t0\t0\n\
                     eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let lan = Lan::parse(table).unwrap();
        assert_eq!(lan.gateway, Ipv4Addr::new(192, 168, 2, 1));
        let on = |ip: &str| lan.contains(ip.parse().unwrap());
        assert!(on("192.168.2.1") && on("192.168.2.77"));
        // Not the network or broadcast address; not another interface's
        // network (docker0); not a network reached through a gateway.
        for ip in ["192.168.2.0", "192.168.2.255", "172.17.0.2", "10.0.0.1", "8.8.8.8", "::1"] {
            assert!(!on(ip), "{ip}");
        }
        assert_eq!(Lan::parse("Iface\tDestination\n"), None);
        assert_eq!(Lan::parse("Iface\n eth0 00000000 zz 0003\n\u{0}junk"), None);
        // A gateway with no on-link route (point-to-point): only the gateway.
        let ptp = Lan::parse("h\nppp0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\n").unwrap();
        assert!(ptp.contains("192.168.2.1".parse().unwrap()) && !ptp.contains("192.168.2.2".parse().unwrap()));
    }

    #[test]
    fn renewals_come_at_half_the_lease_and_permanent_ones_are_checked() {
        assert_eq!(renew_after(7200), Duration::from_secs(3600));
        assert_eq!(renew_after(10), Duration::from_secs(60));
        assert_eq!(renew_after(u32::MAX), Duration::from_secs(u64::from(u32::MAX / 2)));
        assert_eq!(renew_after(0), PERMANENT_CHECK);
    }

    #[test]
    fn rounds_without_a_mapping_back_off_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_after(u32::MAX), RETRY);
        assert_eq!(retry_after(0), FIRST_RETRY);
    }
}
