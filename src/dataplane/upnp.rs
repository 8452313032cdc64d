//! UPnP IGD port mapping, for gateways that speak neither PCP nor NAT-PMP
//! (many home routers offer only "UPnP"). SSDP discovery, the device
//! description and the SOAP calls are `igd-next`'s; this module decides whom
//! to believe ([`check_on_lan`]), bounds every step's time and maps, renews
//! and deletes one UDP mapping for the WireGuard socket. The task that uses
//! it is [`crate::dataplane::portmap`]'s.
#![warn(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use igd_next::aio::Gateway;
use igd_next::aio::tokio::Tokio;
use igd_next::{AddAnyPortError, AddPortError, GatewayIpVersion, PortMappingProtocol, SearchOptions};

use crate::dataplane::portmap::{LIFETIME, Lan};

/// How long SSDP discovery (M-SEARCH, then the device description) may take.
/// A gateway on the LAN answers within milliseconds.
pub(crate) const SEARCH_TIME: Duration = Duration::from_secs(2);
/// How long one mapping step (external address plus AddPortMapping, or the
/// delete) may take; igd-next's own HTTP timeout is 10 s.
const STEP_TIME: Duration = Duration::from_secs(3);
/// Shown in the router's UPnP table.
const DESCRIPTION: &str = "tailgate WireGuard";

/// A gateway found by SSDP.
pub(crate) type UpnpGateway = Gateway<Tokio>;

/// Why UPnP gave us no mapping.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpnpError {
    #[error("no UPnP gateway answered: {0}")]
    Search(#[from] igd_next::SearchError),
    #[error("the UPnP device at {0} is not on the default route's LAN; ignored")]
    NotOnLan(String),
    #[error("the UPnP gateway did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the UPnP gateway did not give its public address: {0}")]
    ExternalIp(#[from] igd_next::GetExternalIpError),
    #[error("the UPnP gateway's public address {0} is not usable")]
    BadExternal(IpAddr),
    #[error("the UPnP gateway refused the mapping: {0}")]
    Add(#[from] AddPortError),
    #[error("the UPnP gateway refused the mapping: {0}")]
    AddAny(#[from] AddAnyPortError),
    #[error("the UPnP gateway did not delete the mapping: {0}")]
    Remove(#[from] igd_next::RemovePortError),
}

/// Accept a UPnP device only when both its description's address and its
/// control URL are on the default route's LAN. igd-next already requires
/// the description to be served by the SSDP responder's own address and the
/// control URL to be on that same host; this adds that the host is a
/// neighbour on our LAN, so an SSDP answer from elsewhere (any host that can
/// send a datagram to our search socket) cannot make us talk to it.
pub(crate) fn check_on_lan(lan: &Lan, device: SocketAddr, control_url: &str) -> Result<(), UpnpError> {
    if !lan.contains(device.ip()) {
        return Err(UpnpError::NotOnLan(device.to_string()));
    }
    // A path is relative to the device; anything else must name a LAN IP.
    if control_url.starts_with('/') && !control_url.starts_with("//") {
        return Ok(());
    }
    let host = url::Url::parse(control_url).ok().and_then(|u| match u.host() {
        Some(url::Host::Ipv4(ip)) if u.scheme() == "http" => Some(IpAddr::V4(ip)),
        _ => None,
    });
    match host {
        Some(ip) if lan.contains(ip) => Ok(()),
        _ => Err(UpnpError::NotOnLan(control_url.chars().take(120).collect())),
    }
}

/// Find the UPnP gateway on the default route's LAN, searching from
/// `local` (our address on it, so the multicast leaves by that interface).
pub(crate) async fn search(lan: &Lan, local: Ipv4Addr) -> Result<UpnpGateway, UpnpError> {
    let mut opts = SearchOptions::default();
    opts.bind_addr = SocketAddr::from((local, 0));
    opts.timeout = Some(SEARCH_TIME);
    opts.single_search_timeout = Some(SEARCH_TIME);
    opts.gateway_ip_version = GatewayIpVersion::V4;
    // igd-next bounds the search itself; this also bounds its HTTP fetches.
    let gw = tokio::time::timeout(SEARCH_TIME + Duration::from_secs(1), igd_next::aio::tokio::search_gateway(opts))
        .await
        .map_err(|_| UpnpError::Timeout(SEARCH_TIME))??;
    check_on_lan(lan, gw.addr, &gw.control_url)?;
    Ok(gw)
}

/// Map UDP `local` to public port `external` (or, when that one is taken,
/// any port the gateway picks), asking for [`LIFETIME`] seconds or, on a
/// gateway that only grants permanent mappings, lease 0. Returns the public
/// address and the lease granted (0: permanent).
pub(crate) async fn map(gw: &UpnpGateway, local: SocketAddrV4, external: u16) -> Result<(SocketAddrV4, u32), UpnpError> {
    tokio::time::timeout(STEP_TIME, map_unbounded(gw, local, external)).await.map_err(|_| UpnpError::Timeout(STEP_TIME))?
}

async fn map_unbounded(gw: &UpnpGateway, local: SocketAddrV4, external: u16) -> Result<(SocketAddrV4, u32), UpnpError> {
    let ip = match gw.get_external_ip().await? {
        IpAddr::V4(ip) if usable_public(ip) => ip,
        other => return Err(UpnpError::BadExternal(other)),
    };
    let udp = PortMappingProtocol::UDP;
    let (port, lease) = match gw.add_port(udp, external, local.into(), LIFETIME, DESCRIPTION).await {
        Ok(()) => (external, LIFETIME),
        Err(AddPortError::OnlyPermanentLeasesSupported) => {
            gw.add_port(udp, external, local.into(), 0, DESCRIPTION).await?;
            (external, 0)
        }
        Err(AddPortError::PortInUse) => match gw.add_any_port(udp, local.into(), LIFETIME, DESCRIPTION).await {
            Ok(p) => (p, LIFETIME),
            Err(AddAnyPortError::OnlyPermanentLeasesSupported) => (gw.add_any_port(udp, local.into(), 0, DESCRIPTION).await?, 0),
            Err(e) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    if port == 0 {
        return Err(UpnpError::BadExternal(IpAddr::V4(ip)));
    }
    Ok((SocketAddrV4::new(ip, port), lease))
}

/// An address peers could reach: a router behind another NAT reports a
/// private or empty one, which we still announce like PCP's (peers prove
/// candidates before use), but never these.
fn usable_public(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() || ip.is_link_local())
}

/// Delete our mapping of public port `external`.
pub(crate) async fn unmap(gw: &UpnpGateway, external: u16) -> Result<(), UpnpError> {
    tokio::time::timeout(STEP_TIME, gw.remove_port(PortMappingProtocol::UDP, external))
        .await
        .map_err(|_| UpnpError::Timeout(STEP_TIME))??;
    Ok(())
}

/// [`unmap`] from a synchronous context (a `Drop` while the runtime shuts
/// down): on a thread of its own with its own small runtime, waited for at
/// most [`STEP_TIME`].
pub(crate) fn unmap_blocking(gw: UpnpGateway, external: u16) {
    let worker = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::debug!("UPnP: cannot delete the mapping: {e}"),
        };
        match rt.block_on(unmap(&gw, external)) {
            Ok(()) => tracing::debug!(gateway = %gw.addr, external, "UPnP: port mapping deleted"),
            // It expires on its own (or, if permanent, stays until the router restarts).
            Err(e) => tracing::warn!(gateway = %gw.addr, external, "UPnP: {e}"),
        }
    });
    let _ = worker.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan() -> Lan {
        Lan::parse(
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
             eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n",
        )
        .unwrap()
    }

    #[test]
    fn only_devices_and_control_urls_on_the_lan_are_believed() {
        let lan = lan();
        let dev: SocketAddr = "192.168.2.1:5000".parse().unwrap();
        assert!(check_on_lan(&lan, dev, "/ctl/IPConn").is_ok());
        assert!(check_on_lan(&lan, dev, "http://192.168.2.1:5000/ctl/IPConn").is_ok());
        // Another LAN device may be the IGD (a separate UPnP box).
        assert!(check_on_lan(&lan, "192.168.2.77:80".parse().unwrap(), "/ctl").is_ok());
        for (dev, url) in
            [("203.0.113.9:5000", "/ctl/IPConn"), ("10.0.0.1:5000", "/ctl"), ("127.0.0.1:5000", "/ctl"), ("[fe80::1]:5000", "/ctl")]
        {
            assert!(matches!(check_on_lan(&lan, dev.parse().unwrap(), url), Err(UpnpError::NotOnLan(_))), "{dev}");
        }
        for url in [
            "http://203.0.113.9/ctl",
            "//203.0.113.9/ctl",
            "https://192.168.2.1/ctl",
            "http://router.example/ctl",
            "http://[::1]/ctl",
            "ctl",
            "",
            "http://192.168.3.1/ctl",
        ] {
            assert!(matches!(check_on_lan(&lan, dev, url), Err(UpnpError::NotOnLan(_))), "{url}");
        }
    }

    #[test]
    fn unusable_public_addresses() {
        for ip in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "169.254.1.1"] {
            assert!(!usable_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["45.50.0.3", "100.64.0.1", "192.168.0.2"] {
            assert!(usable_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
