//! The PCP MAP opcode (RFC 6887), sans-IO: the request we send to the
//! default gateway on UDP 5351 and the parser for its answer. PCP is
//! NAT-PMP's successor on the same port; a NAT-PMP-only gateway answers a
//! PCP request with a version 0 "unsupported version", which parses as
//! [`Error::Malformed`] here, and [`crate::dataplane::portmap`] then falls
//! back to NAT-PMP.

#![warn(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// PCP's version number.
const VERSION: u8 = 2;
/// The MAP opcode; answers set the top bit.
const OP_MAP: u8 = 1;
const RESPONSE: u8 = 0x80;
/// IANA protocol number of UDP.
const UDP: u8 = 17;
/// Common header (24) plus MAP data (36), requests and answers alike.
const LEN: usize = 60;

/// A MAP request for UDP `internal_port`; lifetime 0 deletes the mapping
/// made under the same nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapRequest {
    /// Our own address as the gateway sees it (it refuses a mismatch).
    pub client: IpAddr,
    /// Identifies the mapping across renewals and the delete.
    pub nonce: [u8; 12],
    /// Our WireGuard port.
    pub internal_port: u16,
    /// The public port we would like (0: any).
    pub suggested_port: u16,
    /// Seconds; 0 deletes.
    pub lifetime: u32,
}

/// IPv4 addresses travel IPv4-mapped in PCP's 16-byte fields.
fn to_16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn from_16(b: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(b).to_canonical()
}

impl MapRequest {
    /// The 60 bytes RFC 6887 sections 7.1 and 11.1 describe.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(LEN);
        v.extend_from_slice(&[VERSION, OP_MAP, 0, 0]);
        v.extend_from_slice(&self.lifetime.to_be_bytes());
        v.extend_from_slice(&to_16(self.client));
        v.extend_from_slice(&self.nonce);
        v.extend_from_slice(&[UDP, 0, 0, 0]);
        v.extend_from_slice(&self.internal_port.to_be_bytes());
        v.extend_from_slice(&self.suggested_port.to_be_bytes());
        // No preferred public address: the family's all-zeros address.
        let any = if self.client.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
        v.extend_from_slice(&to_16(any));
        v
    }
}

/// A successful MAP answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapResponse {
    /// The nonce of the request this answers.
    pub nonce: [u8; 12],
    /// Our port, as the request named it.
    pub internal_port: u16,
    /// The public address and port the gateway forwards to us.
    pub external: SocketAddr,
    /// Seconds the mapping lasts (0 after a delete).
    pub lifetime: u32,
}

/// Why an answer is not a mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not a PCP MAP answer for UDP (or a NAT-PMP one).
    #[error("not a PCP MAP response")]
    Malformed,
    /// The gateway said no, with this RFC 6887 result code.
    #[error("the gateway refused the request (PCP result code {0})")]
    Refused(u8),
}

/// Parse a gateway's answer to a MAP request. Anything but a version 2
/// MAP answer for UDP of at least 60 bytes (options may follow; they are
/// ignored) is [`Error::Malformed`].
pub fn parse_map_response(b: &[u8]) -> Result<MapResponse, Error> {
    if b.len() < LEN || b[0] != VERSION || b[1] != (RESPONSE | OP_MAP) {
        return Err(Error::Malformed);
    }
    let result = b[3];
    if result != 0 {
        return Err(Error::Refused(result));
    }
    let lifetime = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let d = &b[24..LEN];
    if d[12] != UDP {
        return Err(Error::Malformed);
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&d[..12]);
    let internal_port = u16::from_be_bytes([d[16], d[17]]);
    let port = u16::from_be_bytes([d[18], d[19]]);
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&d[20..36]);
    Ok(MapResponse { nonce, internal_port, external: SocketAddr::new(from_16(ip), port), lifetime })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> MapRequest {
        MapRequest {
            client: IpAddr::V4(Ipv4Addr::new(192, 168, 2, 2)),
            nonce: [7; 12],
            internal_port: 41641,
            suggested_port: 50000,
            lifetime: 7200,
        }
    }

    /// What a gateway answers to `request()`, mapped at 203.0.113.5:50000.
    fn answer() -> Vec<u8> {
        let mut a = vec![2, 0x81, 0, 0, 0, 0, 0x1c, 0x20, 0, 0, 0, 42];
        a.extend_from_slice(&[0; 12]);
        a.extend_from_slice(&[7; 12]);
        a.extend_from_slice(&[17, 0, 0, 0, 0xa2, 0xa9, 0xc3, 0x50]);
        a.extend_from_slice(&Ipv4Addr::new(203, 0, 113, 5).to_ipv6_mapped().octets());
        a
    }

    #[test]
    fn map_request_is_rfc_6887_bytes() {
        let b = request().encode();
        assert_eq!(b.len(), 60);
        assert_eq!(&b[..8], &[2, 1, 0, 0, 0, 0, 0x1c, 0x20]);
        assert_eq!(&b[8..24], &Ipv4Addr::new(192, 168, 2, 2).to_ipv6_mapped().octets());
        assert_eq!(&b[24..36], &[7; 12]);
        assert_eq!(&b[36..44], &[17, 0, 0, 0, 0xa2, 0xa9, 0xc3, 0x50]);
        assert_eq!(&b[44..60], &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
    }

    #[test]
    fn answers_parse_refusals_and_junk_are_errors() {
        let ok = parse_map_response(&answer()).unwrap();
        assert_eq!(ok.nonce, [7; 12]);
        assert_eq!(ok.internal_port, 41641);
        assert_eq!(ok.external, "203.0.113.5:50000".parse().unwrap());
        assert_eq!(ok.lifetime, 7200);
        // Options after the MAP data are allowed and ignored.
        let mut with_option = answer();
        with_option.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(parse_map_response(&with_option), Ok(ok));
        let mut refused = answer();
        refused[3] = 8; // NO_RESOURCES
        assert_eq!(parse_map_response(&refused), Err(Error::Refused(8)));
        // A NAT-PMP gateway's "unsupported version" answer.
        assert_eq!(parse_map_response(&[0, 0x81, 0, 1, 0, 0, 0, 0]), Err(Error::Malformed));
        let mut tcp = answer();
        tcp[36] = 6;
        let mut request_echo = answer();
        request_echo[1] = 1;
        let mut v1 = answer();
        v1[0] = 1;
        for junk in [&[][..], &answer()[..59], &tcp, &request_echo, &v1, &[0xff; 60]] {
            assert!(parse_map_response(junk).is_err(), "{junk:?}");
        }
        // No length or content makes it panic.
        for n in 0..80 {
            let _ = parse_map_response(&vec![0x81; n]);
            let mut a = answer();
            a.resize(n, 2);
            let _ = parse_map_response(&a);
        }
    }
}
