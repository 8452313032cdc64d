//! The WireGuard core (src/wg.rs over boringtun) as the node's UDP socket
//! and relay feed it: node A (the target) with peers B and C, fixed keys.
//! B is a real second `Wg`, so a handshake can complete and B's `send_ip`
//! encrypts arbitrary IP packets for A; datagrams reach A as sent, with a
//! flipped byte, replayed, or entirely made up.
//!
//! Invariants: no panic; A only ever hands the stack a packet that came from
//! B unmodified (a flipped byte is never delivered), attributed to B, with
//! an inner source inside B's AllowedIPs; B's delivered packets are a prefix
//! of what B sent (boringtun strips padding).
#![no_main]

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tailgate::key::{Key, PrivateKey};
use tailgate::dataplane::wg::{Output, PeerConfig, RELAYED, Wg, public_key_of};

const A: Key = [0x0a; 32];
const B: Key = [0x0b; 32];
const C: Key = [0x0c; 32];
const A_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const C_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 3);
// Scalar multiplications dominate an execution; do these once.
static PUB: LazyLock<[Key; 3]> = LazyLock::new(|| [A, B, C].map(|k| public_key_of(&PrivateKey::from_bytes(k))));

/// Input layout: `flags (u8: bit 0 = B handshakes first) | op*`, each op
/// `kind (u8) | len (u16 BE) | body (len bytes, cut at the input's end)`,
/// kind % 6 selecting:
enum Op<'a> {
    /// 0: `relayed (u8: bit 0) | datagram`: any datagram to A, from B's
    /// endpoint or through the relay.
    Raw { datagram: &'a [u8], relayed: bool },
    /// 1: `at (u16 BE) | xor (u8) | packet`: B encrypts an arbitrary "IP
    /// packet"; its output reaches A with byte `at` flipped by `xor` (if
    /// `xor != 0`).
    Send { packet: &'a [u8], at: u16, xor: u8 },
    /// 2: `spoof (u8: bit 0) | source (4) | proto (u8) | payload`: B sends a
    /// well-formed IPv4 packet to A, from its own address or `source`.
    SendIpv4 { spoof: Option<[u8; 4]>, proto: u8, payload: &'a [u8] },
    /// 3: `packet`: A encrypts (toward B, C or nowhere); B answers.
    FromA { packet: &'a [u8] },
    /// 4: the last datagram A received, again.
    Replay,
    /// 5: timers on both sides (keepalives, retries).
    Timers,
}

fn parse_ops(mut d: &[u8]) -> Vec<Op<'_>> {
    let mut ops = Vec::new();
    while let [kind, hi, lo, rest @ ..] = d {
        let len = (u16::from_be_bytes([*hi, *lo]) as usize).min(rest.len());
        let (body, tail) = rest.split_at(len);
        d = tail;
        let byte = |i: usize| body.get(i).copied().unwrap_or(0);
        let from = |i: usize| body.get(i..).unwrap_or(&[]);
        ops.push(match kind % 6 {
            0 => Op::Raw { relayed: byte(0) & 1 == 1, datagram: from(1) },
            1 => Op::Send { at: u16::from_be_bytes([byte(0), byte(1)]), xor: byte(2), packet: from(3) },
            2 => Op::SendIpv4 { spoof: (byte(0) & 1 == 1).then(|| [byte(1), byte(2), byte(3), byte(4)]), proto: byte(5), payload: from(6) },
            3 => Op::FromA { packet: body },
            4 => Op::Replay,
            _ => Op::Timers,
        });
    }
    ops
}

fn peer(public_key: Key, ip: Ipv4Addr, port: u16) -> PeerConfig {
    PeerConfig {
        public_key,
        preshared_key: None,
        allowed_ips: vec![IpAddr::V4(ip).into()],
        endpoint: Some(SocketAddr::from((ip.octets(), port))),
        persistent_keepalive: None,
    }
}

fn ipv4(src: [u8; 4], dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()).min(65535) as u16;
    let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 0, 0, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&payload[..len as usize - 20]);
    p
}

fn src_of(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?)),
        _ => None,
    }
}

struct Net {
    a: Wg,
    b: Wg,
    /// Datagrams in flight: (to A?, bytes, tampered?).
    queue: VecDeque<(bool, Vec<u8>, bool)>,
    last_to_a: Option<Vec<u8>>,
    /// Every packet B was asked to send, so deliveries at A can be checked.
    sent_by_b: Vec<Vec<u8>>,
}

const B_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(B_IP), 41641);
const A_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(A_IP), 41641);

impl Net {
    fn collect(queue: &mut VecDeque<(bool, Vec<u8>, bool)>, to_a: bool) -> impl FnMut(Output<'_>) + '_ {
        move |o| {
            if let Output::Network { data, .. } = o {
                queue.push_back((to_a, data.to_vec(), false));
            }
        }
    }

    fn deliver_to_a(&mut self, from: SocketAddr, d: &[u8], tampered: bool) {
        self.last_to_a = Some(d.to_vec());
        let b_key = PUB[1];
        let sent = &self.sent_by_b;
        let queue = &mut self.queue;
        self.a.recv_datagram(from, d, std::time::Instant::now(), &mut |o| match o {
            Output::Network { data, .. } => queue.push_back((false, data.to_vec(), false)),
            Output::Tunnel { key, packet, .. } => {
                assert!(!tampered, "a tampered datagram was delivered");
                assert_eq!(key, b_key, "packet attributed to a peer that did not send it");
                assert_eq!(src_of(packet), Some(IpAddr::V4(B_IP)), "inner source outside B's AllowedIPs");
                assert!(sent.iter().any(|s| s.starts_with(packet)), "A delivered a packet B never sent");
            }
        });
    }

    fn deliver_to_b(&mut self, d: &[u8]) {
        let a_key = PUB[0];
        let queue = &mut self.queue;
        self.b.recv_datagram(A_ADDR, d, std::time::Instant::now(), &mut |o| match o {
            Output::Network { data, .. } => queue.push_back((true, data.to_vec(), false)),
            Output::Tunnel { key, packet, .. } => {
                assert_eq!(key, a_key);
                assert_eq!(src_of(packet), Some(IpAddr::V4(A_IP)));
            }
        });
    }

    /// Moves datagrams until quiet (bounded: handshakes settle in a few).
    fn pump(&mut self) {
        for _ in 0..16 {
            let Some((to_a, d, tampered)) = self.queue.pop_front() else { return };
            if to_a { self.deliver_to_a(B_ADDR, &d, tampered) } else { self.deliver_to_b(&d) }
        }
        self.queue.clear();
    }

    fn b_send(&mut self, packet: &[u8], at: u16, xor: u8) {
        self.sent_by_b.push(packet.to_vec());
        let start = self.queue.len();
        self.b.send_ip(packet, &mut Self::collect(&mut self.queue, true));
        if xor != 0 {
            for (_, d, tampered) in self.queue.iter_mut().skip(start) {
                let i = at as usize % d.len();
                d[i] ^= xor;
                *tampered = true;
            }
        }
        self.pump();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, ops)) = data.split_first() else { return };
    let now = Instant::now();
    let mut a = Wg::new(&PrivateKey::from_bytes(A), now);
    a.add_peer(peer(PUB[1], B_IP, 41641)).unwrap();
    a.add_peer(peer(PUB[2], C_IP, 41641)).unwrap();
    let mut b = Wg::new(&PrivateKey::from_bytes(B), now);
    b.add_peer(peer(PUB[0], A_IP, 41641)).unwrap();
    let mut net = Net { a, b, queue: VecDeque::new(), last_to_a: None, sent_by_b: Vec::new() };
    if flags & 1 == 1 {
        net.b_send(&ipv4(B_IP.octets(), A_IP, 17, b"hello"), 0, 0);
    }
    for op in parse_ops(ops).into_iter().take(16) {
        match op {
            Op::Raw { datagram, relayed } => {
                // Made-up bytes may still be a valid handshake only if the
                // fuzzer forges X25519; count them as tampered regardless.
                net.deliver_to_a(if relayed { RELAYED } else { B_ADDR }, datagram, true);
                net.pump();
            }
            Op::Send { packet, at, xor } => net.b_send(packet, at, xor),
            Op::SendIpv4 { spoof, proto, payload } => {
                let p = ipv4(spoof.unwrap_or(B_IP.octets()), A_IP, proto, payload);
                net.b_send(&p, 0, 0);
            }
            Op::FromA { packet } => {
                let queue = &mut net.queue;
                net.a.send_ip(packet, &mut Net::collect(queue, false));
                net.pump();
            }
            Op::Replay => {
                if let Some(d) = net.last_to_a.take() {
                    // A replayed data packet must be refused by the counter
                    // window, so a delivery here is a bug too.
                    net.deliver_to_a(B_ADDR, &d, true);
                    net.pump();
                }
            }
            Op::Timers => {
                let later = Instant::now();
                net.a.poll_timers(later, &mut Net::collect(&mut net.queue, false));
                net.b.poll_timers(later, &mut Net::collect(&mut net.queue, true));
                net.pump();
            }
        }
    }
});
