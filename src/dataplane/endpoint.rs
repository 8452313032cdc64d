//! Which underlay addresses a node may send to on a peer's behalf.
//!
//! Candidate endpoints reach a node from two places an attacker can touch:
//! the control server's netmap (reported by the peer itself) and the source
//! address of a disco ping. A node that probed or ponged any address it was
//! told about could be made to reflect traffic at its own loopback services,
//! the cloud metadata service or a multicast group. The control server and
//! the node both apply this one rule, so a bad endpoint is refused where it
//! is reported and again where it would be used.
#![warn(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether `addr` is a plausible unicast underlay endpoint of another host:
/// not loopback, link-local (which includes 169.254.169.254, the metadata
/// service), multicast, broadcast, unspecified or reserved, and not port 0. IPv4-mapped IPv6 addresses are judged as the IPv4 address.
pub(crate) fn is_valid_endpoint(addr: &SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match crate::dataplane::dualstack::normalize(*addr).ip() {
        IpAddr::V4(v4) => valid_v4(v4),
        IpAddr::V6(v6) => valid_v6(v6),
    }
}

fn valid_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240)
}

fn valid_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || (first & 0xffc0) == 0xfe80) // link-local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        is_valid_endpoint(&s.parse().unwrap())
    }

    #[test]
    fn refuses_addresses_that_are_not_another_hosts_unicast() {
        for bad in [
            "127.0.0.1:41641",
            "127.9.9.9:1",
            "0.0.0.0:41641",
            "169.254.169.254:80",
            "169.254.1.1:41641",
            "224.0.0.1:41641",
            "239.255.255.250:1900",
            "255.255.255.255:41641",
            "240.0.0.1:1",
            "10.0.0.1:0",
            "[::1]:41641",
            "[::]:41641",
            "[fe80::1]:41641",
            "[ff02::1]:41641",
            "[::ffff:127.0.0.1]:41641",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(!ok(bad), "{bad} must be refused");
        }
    }

    #[test]
    fn accepts_ordinary_unicast() {
        for good in
            ["10.96.0.2:41641", "192.168.1.10:5000", "203.0.113.7:41641", "[2a01:4f8::1]:41641", "[fd00::2]:41641", "[::ffff:10.0.0.1]:9"]
        {
            assert!(ok(good), "{good} must be accepted");
        }
    }
}
