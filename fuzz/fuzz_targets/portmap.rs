//! Port-mapping answers from the default gateway (src/dataplane/pcp.rs and
//! portmap.rs): anyone on the LAN can send them.
//!
//! Invariants: no panic; a PCP answer that parses re-encodes (as the
//! request it answers) to bytes that carry the same nonce, port and
//! lifetime; a NAT-PMP answer never parses as PCP and the other way round.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailgate::dataplane::{pcp, portmap};

fuzz_target!(|data: &[u8]| {
    let p = pcp::parse_map_response(data);
    let n = portmap::parse_response(data);
    assert!(p.is_err() || n.is_err(), "one answer, two protocols");
    if let Ok(m) = p {
        let req = pcp::MapRequest {
            client: m.external.ip(),
            nonce: m.nonce,
            internal_port: m.internal_port,
            suggested_port: m.external.port(),
            lifetime: m.lifetime,
        }
        .encode();
        assert_eq!(req.len(), 60);
        assert_eq!(&req[24..36], &m.nonce);
        assert_eq!(u16::from_be_bytes([req[40], req[41]]), m.internal_port);
        assert_eq!(u32::from_be_bytes([req[4], req[5], req[6], req[7]]), m.lifetime);
    }
});
