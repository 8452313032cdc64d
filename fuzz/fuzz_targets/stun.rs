//! STUN (src/stun.rs): the control server's responder (`answer_binding_request`,
//! fed by anyone on the internet) and the node's response parser.
//!
//! Invariants: no panic; only STUN gets an answer, and for an IPv4 source
//! less than 4x the request (reflection amplification, see module docs);
//! every success answer parses back to the request's transaction id and the
//! source address; whatever parses as a response passes `is_stun`.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use tailgate::dataplane::stun;

/// Input layout: `family (u8: odd = IPv6) | source IP (4 or 16) | source
/// port (u16 BE) | datagram`.
fn parse(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let v6 = d.first()? & 1 == 1;
    let n = if v6 { 16 } else { 4 };
    let ip: IpAddr = if v6 { <[u8; 16]>::try_from(d.get(1..17)?).ok()?.into() } else { <[u8; 4]>::try_from(d.get(1..5)?).ok()?.into() };
    let port = u16::from_be_bytes(d.get(1 + n..3 + n)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), &d[3 + n..]))
}

fuzz_target!(|data: &[u8]| {
    let Some((from, d)) = parse(data) else { return };
    if let Some((_txid, _addr)) = stun::parse_binding_response(d) {
        assert!(stun::is_stun(d));
    }
    if let Some(answer) = stun::answer_binding_request(d, from) {
        assert!(stun::is_stun(d), "answered a non-STUN datagram");
        assert!(stun::is_stun(&answer), "answer is not STUN");
        if from.is_ipv4() {
            assert!(answer.len() < 4 * d.len(), "{} -> {} bytes: amplification", d.len(), answer.len());
        }
        if let Some((txid, addr)) = stun::parse_binding_response(&answer) {
            assert_eq!(&txid[..], &d[8..20], "answer for another transaction");
            assert_eq!(addr, tailgate::dataplane::dualstack::normalize(from), "answer maps the wrong address");
        }
        // An answer is never itself answered (no loops between two servers).
        assert_eq!(stun::answer_binding_request(&answer, from), None);
    }
    // The request a node sends, with an id from the input, round-trips.
    let txid: [u8; 12] = core::array::from_fn(|i| d.get(i).copied().unwrap_or(0));
    let req = stun::encode_binding_request(txid);
    let answer = stun::answer_binding_request(&req, from).expect("our own request is not answered");
    // A dual-stack socket sees IPv4 clients as mapped addresses; the answer
    // carries the plain IPv4 address their peers can reach.
    assert_eq!(stun::parse_binding_response(&answer), Some((txid, tailgate::dataplane::dualstack::normalize(from))));
});
