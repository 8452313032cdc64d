//! STUN (RFC 5389 / RFC 8489) Binding, sans-IO, and the control server's
//! tiny STUN responder.
//!
//! A node learns its public (server-reflexive) endpoint by sending a Binding
//! request from its WireGuard UDP socket to the control server's UDP port
//! (the same port number as the HTTP port); the answer carries the source
//! address the server saw in XOR-MAPPED-ADDRESS. The node demultiplexes the
//! answer from WireGuard with [`is_stun`] (WireGuard messages start with a
//! type byte 1..=4, which never has the STUN magic cookie at bytes 4..8).
//!
//! Message encoding and parsing use the `stun-types` crate (maintained,
//! `no_std`, sans-IO, checks FINGERPRINT, and passes the RFC 5769 test
//! vectors in its own test-suite). `stun_codec` drags in `bytecodec`'s
//! encoder framework and `stun-rs` is far larger than two message types need.
//! This module only adds what Binding needs on top: a strict pre-check (so
//! junk never reaches the parser's logging), XOR-MAPPED-ADDRESS with
//! MAPPED-ADDRESS fallback, and the server's answer.
//!
//! The server answers only well-formed Binding *requests* (class request,
//! method Binding, length consistent, magic cookie present); anything else is
//! ignored. A request with a comprehension-required attribute it does not
//! understand (e.g. RFC 5780's CHANGE-REQUEST) gets a 420 Unknown Attribute
//! error, as RFC 5389 §7.3.1 requires. The success answer holds
//! XOR-MAPPED-ADDRESS, MAPPED-ADDRESS (for old clients that read only that),
//! SOFTWARE, and FINGERPRINT when the request had one: 76 bytes for IPv4, so
//! reflection amplification stays below 4x the smallest (20-byte) request.
#![warn(missing_docs)]

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use stun_types::attribute::{AttributeType, Fingerprint, MappedSocketAddr, RawAttribute, Software, XorMappedAddress};
use stun_types::message::{BINDING, Message, MessageClass, MessageType, MessageWriteVec, TransactionId};
use stun_types::prelude::*;

/// The RFC 5389 magic cookie (bytes 4..8 of every message).
pub(crate) const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Bytes of a STUN header.
pub(crate) const HEADER_LEN: usize = 20;
/// Largest message [`answer_binding_request`] looks at.
pub(crate) const MAX_MESSAGE: usize = 1500;
/// SOFTWARE attribute of the server's answers.
pub(crate) const SOFTWARE: &str = "tailgate";

const MAPPED_ADDRESS: AttributeType = AttributeType::new(0x0001);

/// A 96-bit STUN transaction id.
pub type TxId = [u8; 12];

/// A fresh random transaction id.
pub fn new_txid() -> TxId {
    rand::random()
}

fn tid_to_stun(txid: &TxId) -> TransactionId {
    let mut b = [0u8; 16];
    b[4..].copy_from_slice(txid);
    u128::from_be_bytes(b).into()
}

fn tid_from_stun(t: TransactionId) -> TxId {
    let v: u128 = t.into();
    let b = v.to_be_bytes();
    b[4..].try_into().expect("12 bytes")
}

/// A Binding request (20 bytes, no attributes).
pub fn encode_binding_request(txid: TxId) -> Vec<u8> {
    let mtype = MessageType::from_class_method(MessageClass::Request, BINDING);
    Message::builder(mtype, tid_to_stun(&txid), MessageWriteVec::new()).finish()
}

/// Is this datagram a STUN message (RFC 5389 §6: first two bits zero, magic
/// cookie at bytes 4..8, a length that matches the datagram and is a
/// multiple of 4)? Cheap: a header check only, for demultiplexing.
pub fn is_stun(d: &[u8]) -> bool {
    if d.len() < HEADER_LEN || d[0] & 0xC0 != 0 {
        return false;
    }
    if d[4..8] != MAGIC_COOKIE.to_be_bytes() {
        return false;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    len.is_multiple_of(4) && len + HEADER_LEN == d.len()
}

/// Parses a Binding success response: (transaction id, mapped address).
/// Reads XOR-MAPPED-ADDRESS, falling back to MAPPED-ADDRESS. `None` for
/// anything else (requests, error responses, other methods, malformed or
/// truncated messages, a bad FINGERPRINT). The caller matches the
/// transaction id against the requests it has outstanding.
pub fn parse_binding_response(d: &[u8]) -> Option<(TxId, SocketAddr)> {
    if !is_stun(d) {
        return None;
    }
    let msg = Message::from_bytes(d).ok()?;
    if !msg.has_class(MessageClass::Success) || !msg.has_method(BINDING) {
        return None;
    }
    let tid = msg.transaction_id();
    let addr = match msg.attribute::<XorMappedAddress>() {
        Ok(x) => x.addr(tid),
        Err(_) => MappedSocketAddr::from_raw(&msg.raw_attribute(MAPPED_ADDRESS)?).ok()?.addr(),
    };
    // A dual-stack server that does not unmap reports `::ffff:a.b.c.d`.
    Some((tid_from_stun(tid), crate::dataplane::dualstack::normalize(addr)))
}

/// The server side: the answer to a Binding request received from `from`,
/// or `None` if `req` is not a well-formed Binding request (never answer
/// those: no reflection for junk, no answers to answers).
pub fn answer_binding_request(req: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    if req.len() > MAX_MESSAGE || !is_stun(req) {
        return None;
    }
    // On a dual-stack socket an IPv4 client is `::ffff:a.b.c.d`; it must
    // learn its IPv4 address (family 1), the one its peers can reach.
    let from = crate::dataplane::dualstack::normalize(from);
    let msg = Message::from_bytes(req).ok()?;
    if !msg.has_class(MessageClass::Request) || !msg.has_method(BINDING) {
        return None;
    }
    // Walk the attributes ourselves (the crate's helper logs a warning per
    // message, which a flood would turn into log spam).
    let mut unknown = Vec::new();
    let mut had_fingerprint = false;
    for (_, a) in msg.iter_attributes() {
        let t = a.get_type();
        if t == Fingerprint::TYPE {
            had_fingerprint = true;
        } else if t.comprehension_required() && !unknown.contains(&t) {
            unknown.push(t);
        }
    }
    if !unknown.is_empty() {
        unknown.truncate(16);
        let mut w = Message::unknown_attributes(&msg, &unknown, MessageWriteVec::new());
        w.add_fingerprint().ok()?;
        return Some(w.finish());
    }
    let tid = msg.transaction_id();
    let mut w = Message::builder_success(&msg, MessageWriteVec::new());
    w.add_attribute(&XorMappedAddress::new(from, tid)).ok()?;
    let mapped = MappedSocketAddr::new(from);
    let raw: RawAttribute<'_> = mapped.to_raw(MAPPED_ADDRESS);
    w.push_attribute_unchecked(&raw);
    w.add_attribute(&Software::new(SOFTWARE).ok()?).ok()?;
    if had_fingerprint {
        w.add_fingerprint().ok()?;
    }
    Some(w.finish())
}

/// The control server's STUN responder: one UDP socket, answers Binding
/// requests, ignores everything else.
pub(crate) struct StunServer {
    socket: tokio::net::UdpSocket,
}

impl StunServer {
    /// Binds `addr` (the control server binds the IP and port of its TCP
    /// listener); a wildcard address answers on IPv4 and IPv6.
    pub(crate) async fn bind(addr: SocketAddr) -> io::Result<StunServer> {
        Ok(StunServer { socket: crate::dataplane::dualstack::udp(addr, |_| {})? })
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until the task is aborted.
    pub(crate) async fn run(self) {
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on Linux.
                    tracing::debug!("stun: recv: {e}");
                    continue;
                }
            };
            if let Some(answer) = answer_binding_request(&buf[..n], from) {
                // A full send buffer drops the answer; clients retry.
                let _ = self.socket.try_send_to(&answer, from);
            }
        }
    }
}

/// Client convenience (tools, tests; the node's driver sends requests on its
/// WireGuard socket and matches answers itself): asks `server` for the
/// address it sees `socket` as. Retries (250 ms, doubling) until `timeout`.
/// Datagrams that are not the answer are discarded, so use it only on a
/// socket nothing else is reading.
pub async fn query(socket: &tokio::net::UdpSocket, server: SocketAddr, timeout: Duration) -> io::Result<SocketAddr> {
    let txid = new_txid();
    let req = encode_binding_request(txid);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(250);
    let mut buf = vec![0u8; 2048];
    loop {
        socket.send_to(&req, server).await?;
        let until = (tokio::time::Instant::now() + wait).min(deadline);
        loop {
            match tokio::time::timeout_at(until, socket.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                Ok(Err(e)) => return Err(e),
                // Matched by transaction id only: a multi-homed server may
                // answer from another of its addresses.
                Ok(Ok((n, _))) => {
                    if let Some((t, addr)) = parse_binding_response(&buf[..n])
                        && t == txid
                    {
                        return Ok(addr);
                    }
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no STUN answer from {server} within {timeout:?}")));
        }
        wait *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 5769 §2.2: sample IPv4 response (XOR-MAPPED-ADDRESS 192.0.2.1:32853,
    /// MESSAGE-INTEGRITY, FINGERPRINT).
    const RFC5769_V4: &str = "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae 8022000b 7465737420766563746f7220
        00200008 0001a147 e112a643 00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7 80280004 c07d4c96";
    /// RFC 5769 §2.3: sample IPv6 response (XOR-MAPPED-ADDRESS
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853).
    const RFC5769_V6: &str = "01010048 2112a442 b7e7a701 bc34d686 fa87dfae 8022000b 7465737420766563746f7220
        00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9 00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
        80280004 c8fb0b4c";
    /// RFC 5769 §2.1: sample request (USERNAME, PRIORITY, ICE-CONTROLLED,
    /// MESSAGE-INTEGRITY, FINGERPRINT).
    const RFC5769_REQ: &str = "00010058 2112a442 b7e7a701 bc34d686 fa87dfae 80220010 5354554e 20746573 7420636c 69656e74
        00240004 6e0001ff 80290008 932ff9b1 51263b36 00060009 6576746a 3a683676 59202020 00080014 9aeaa70c bfd8cb56
        781ef2b5 b2d3f249 c1b571a2 80280004 e57a3bcf";

    fn rfc_v4() -> Vec<u8> {
        hex(RFC5769_V4)
    }

    const RFC_TXID: [u8; 12] = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];

    #[test]
    fn rfc5769_ipv4_response() {
        let v = rfc_v4();
        assert_eq!(v.len(), 80);
        assert!(is_stun(&v));
        let (txid, addr) = parse_binding_response(&v).expect("parses");
        assert_eq!(txid, RFC_TXID);
        assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn rfc5769_ipv6_response() {
        let v = hex(RFC5769_V6);
        assert_eq!(v.len(), 92);
        let (txid, addr) = parse_binding_response(&v).expect("parses");
        assert_eq!(txid, RFC_TXID);
        assert_eq!(addr, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap());
    }

    #[test]
    fn rfc5769_vectors_with_a_flipped_bit_are_refused() {
        // FINGERPRINT catches every flipped bit it covers (all but itself).
        let v = rfc_v4();
        for i in 20..v.len() - 8 {
            let mut w = v.clone();
            w[i] ^= 0x10;
            assert_eq!(parse_binding_response(&w), None, "byte {i}");
        }
    }

    #[test]
    fn rfc5769_request_is_a_request_not_a_response() {
        let req = hex(RFC5769_REQ);
        assert_eq!(req.len(), 108);
        assert!(is_stun(&req));
        assert_eq!(parse_binding_response(&req), None);
        // It carries comprehension-required attributes we don't implement
        // (USERNAME, MESSAGE-INTEGRITY; PRIORITY is 0x0024): 420.
        let ans = answer_binding_request(&req, "10.0.0.1:5".parse().unwrap()).expect("answered with an error");
        let m = Message::from_bytes(&ans).unwrap();
        assert!(m.has_class(MessageClass::Error));
        assert_eq!(m.attribute::<stun_types::attribute::ErrorCode>().unwrap().code(), 420);
        assert_eq!(tid_from_stun(m.transaction_id()), RFC_TXID);
        assert_eq!(parse_binding_response(&ans), None);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_socket_learn_their_ipv4_address() {
        let txid = new_txid();
        let ans = answer_binding_request(&encode_binding_request(txid), "[::ffff:198.51.100.9]:4000".parse().unwrap()).unwrap();
        assert_eq!(parse_binding_response(&ans), Some((txid, "198.51.100.9:4000".parse().unwrap())));
        let m = Message::from_bytes(&ans).unwrap();
        let mapped = MappedSocketAddr::from_raw(&m.raw_attribute(MAPPED_ADDRESS).unwrap()).unwrap();
        assert!(mapped.addr().is_ipv4(), "family 1 on the wire, not a mapped IPv6 address");
    }

    #[test]
    fn request_bytes_are_exact() {
        let txid = RFC_TXID;
        let r = encode_binding_request(txid);
        assert_eq!(r, hex("00010000 2112a442 b7e7a701 bc34d686 fa87dfae"));
        assert!(is_stun(&r));
    }

    #[test]
    fn answer_roundtrip_v4_and_v6() {
        for from in ["203.0.113.7:41641", "[2001:db8::42]:7"] {
            let from: SocketAddr = from.parse().unwrap();
            let txid = new_txid();
            let ans = answer_binding_request(&encode_binding_request(txid), from).unwrap();
            assert!(is_stun(&ans));
            assert_eq!(parse_binding_response(&ans), Some((txid, from)));
            let m = Message::from_bytes(&ans).unwrap();
            assert!(m.has_class(MessageClass::Success));
            // Both XOR-MAPPED and plain MAPPED are present.
            let mapped = MappedSocketAddr::from_raw(&m.raw_attribute(MAPPED_ADDRESS).unwrap()).unwrap();
            assert_eq!(mapped.addr(), from);
            assert!(!m.has_attribute(Fingerprint::TYPE), "no FINGERPRINT unless the request had one");
            if from.is_ipv4() {
                assert!(ans.len() <= 4 * 20, "amplification bound: {}", ans.len());
            }
        }
    }

    #[test]
    fn fingerprint_in_request_gets_fingerprint_in_answer() {
        let txid = new_txid();
        let mtype = MessageType::from_class_method(MessageClass::Request, BINDING);
        let mut w = Message::builder(mtype, tid_to_stun(&txid), MessageWriteVec::new());
        w.add_attribute(&Software::new("test client").unwrap()).unwrap();
        w.add_fingerprint().unwrap();
        let req = w.finish();
        let from: SocketAddr = "198.51.100.2:1000".parse().unwrap();
        let ans = answer_binding_request(&req, from).unwrap();
        assert!(Message::from_bytes(&ans).unwrap().has_attribute(Fingerprint::TYPE));
        assert_eq!(parse_binding_response(&ans), Some((txid, from)));
    }

    #[test]
    fn mapped_address_fallback() {
        // A response with only MAPPED-ADDRESS (RFC 3489-style server).
        let txid = RFC_TXID;
        let mtype = MessageType::from_class_method(MessageClass::Success, BINDING);
        let mut w = Message::builder(mtype, tid_to_stun(&txid), MessageWriteVec::new());
        let from: SocketAddr = "192.0.2.9:9".parse().unwrap();
        w.push_attribute_unchecked(&MappedSocketAddr::new(from).to_raw(MAPPED_ADDRESS));
        let r = w.finish();
        assert_eq!(parse_binding_response(&r), Some((txid, from)));
        // Neither attribute: nothing.
        let r = Message::builder(mtype, tid_to_stun(&txid), MessageWriteVec::new()).finish();
        assert_eq!(parse_binding_response(&r), None);
    }

    #[test]
    fn non_requests_and_junk_are_not_answered() {
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let req = encode_binding_request(new_txid());
        let ans = answer_binding_request(&req, from).unwrap();
        assert_eq!(answer_binding_request(&ans, from), None, "no answer to an answer");
        // Indication, other method.
        let ind = Message::builder(
            MessageType::from_class_method(MessageClass::Indication, BINDING),
            tid_to_stun(&[1; 12]),
            MessageWriteVec::new(),
        )
        .finish();
        assert_eq!(answer_binding_request(&ind, from), None);
        let mut other = req.clone();
        other[1] = 0x03; // ALLOCATE
        assert_eq!(answer_binding_request(&other, from), None);
        // Bad cookie, wrong length, top bits, WireGuard handshake initiation.
        let mut bad = req.clone();
        bad[5] ^= 1;
        assert_eq!(answer_binding_request(&bad, from), None);
        let mut long = req.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(answer_binding_request(&long, from), None);
        let mut top = req.clone();
        top[0] |= 0x80;
        assert_eq!(answer_binding_request(&top, from), None);
        let mut wg = vec![1u8, 0, 0, 0];
        wg.resize(148, 7);
        assert!(!is_stun(&wg));
        assert_eq!(answer_binding_request(&wg, from), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let base = answer_binding_request(&encode_binding_request([9; 12]), from).unwrap();
        let mut seed = 0x9E37_79B9u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for round in 0..5000 {
            let mut d = if round % 2 == 0 {
                let len = (rnd() % 120) as usize;
                let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                if d.len() >= 8 {
                    d[0] &= 0x3F;
                    d[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                }
                if d.len() >= 20 {
                    let l = (d.len() - 20) as u16;
                    d[2..4].copy_from_slice(&l.to_be_bytes());
                }
                d
            } else {
                base.clone()
            };
            if round % 2 == 1 {
                for _ in 0..1 + rnd() % 4 {
                    let i = 20 + (rnd() as usize % (d.len() - 20));
                    d[i] = rnd() as u8;
                }
            }
            let _ = is_stun(&d);
            let _ = parse_binding_response(&d);
            let _ = answer_binding_request(&d, from);
        }
    }
}
