//! Disco: authenticated path-discovery messages (ping / pong / call-me-maybe),
//! sans-IO.
//!
//! They travel on the node's WireGuard UDP socket (so they test exactly the
//! path WireGuard will use and open the same NAT mappings) and, for
//! [`Message::CallMeMaybe`], through the relay. [`classify`] tells them apart
//! from WireGuard and STUN on receive:
//!
//! | first bytes | kind |
//! |---|---|
//! | `1..=4, 0, 0, 0` | WireGuard (type byte, three reserved zero bytes) |
//! | `"TGDSC" 0x01` | disco ([`MAGIC`]; `'T'` = 0x54 is no WireGuard type and has a top bit set, so no STUN either) |
//! | top two bits 0, magic cookie at 4..8 | STUN ([`crate::dataplane::stun::is_stun`]) |
//!
//! Wire format (all lengths in bytes):
//!
//! ```text
//! MAGIC (6) | sender public key (32) | nonce (24) | XChaCha20-Poly1305 ciphertext (plaintext + 16)
//! ```
//!
//! The key is `BLAKE2s-256("tailgate-disco/2" | X25519(sender, receiver) |
//! sender public | receiver public)`: one key per *direction*, so a message
//! cannot be reflected back to its sender as if the peer had sent it. The
//! header (magic and sender key) is the AEAD's associated data. Nonces are
//! random; 24 bytes make collisions a non-issue. A low-order public key
//! (all-zero shared secret) is refused.
//!
//! Plaintext: `counter (8, big-endian) | type (1)`, then
//! - `1` Ping: `tx_id (12)`
//! - `2` Pong: `tx_id (12) | addr`
//! - `3` CallMeMaybe: `count (1) | addr * count` (at most [`MAX_ENDPOINTS`])
//!
//! where `addr` = `4 | IPv4 (4) | port (2)` or `6 | IPv6 (16) | port (2)`.
//! Bytes after the known fields are ignored (room for later additions).
//!
//! [`open`] never panics: bad authentication, unknown senders, truncation or
//! an unknown type are all `None`. It checks `is_known_peer` *before* the
//! Diffie-Hellman, so junk from strangers costs no scalar multiplication.
//!
//! **Box keys per peer.** [`seal`] and [`open`] derive the box key (one
//! X25519) per datagram. The node itself goes through [`PeerBoxes`], which
//! derives both directions' keys once when a peer is learned and drops them
//! when the peer goes; only configured peers are held, so strangers cannot
//! grow it.
//!
//! **Replays.** A captured sealed Ping replayed from many source ports would
//! otherwise earn a Pong at each (traffic reflected where the attacker
//! chooses) and a candidate endpoint each. So every message carries a
//! sender counter ([`Counter`]): strictly increasing per sender, and never
//! below the sender's wall clock in microseconds, so it keeps increasing
//! across restarts (the same assumption WireGuard makes of its handshake
//! timestamps: a sender's clock does not jump back past its last message).
//! The receiver keeps a [`ReplayWindow`] per peer and drops any counter it
//! has accepted, or that is older than the last [`REPLAY_WINDOW`] accepted
//! ones. The window counts messages rather than counter values, so
//! reordering between the relay and direct UDP (milliseconds apart, which is
//! thousands of counter values) does not lose messages. What remains: a
//! receiver that restarts forgets its windows, so each message captured
//! before that restart can be replayed once more afterwards.
#![warn(missing_docs)]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::key::{Key, PrivateKey};

/// First six bytes of every disco datagram (version 2: with a counter).
pub const MAGIC: &[u8; 6] = b"TGDSC\x02";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Magic, sender key and nonce.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// Smallest possible disco datagram (an empty plaintext).
pub(crate) const MIN_LEN: usize = HEADER_LEN + TAG_LEN;
/// Most endpoints a CallMeMaybe carries (more are dropped by `seal`).
pub(crate) const MAX_ENDPOINTS: usize = 32;
const KDF_LABEL: &[u8] = b"tailgate-disco/2";
const COUNTER_LEN: usize = 8;
/// How many of a peer's most recent counters a [`ReplayWindow`] remembers.
pub(crate) const REPLAY_WINDOW: usize = 64;

/// Transaction id of a ping, echoed by the pong.
pub(crate) type TxId = [u8; 12];

const T_PING: u8 = 1;
const T_PONG: u8 = 2;
const T_CALL_ME_MAYBE: u8 = 3;

/// A disco message, before sealing or after opening.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// "Can you hear me on this path?" Answer with a Pong to the datagram's
    /// source address.
    Ping {
        /// Echoed by the Pong, so the pinger knows which probe it answers.
        tx_id: TxId,
    },
    /// "Yes": `observed` is the source address the pinged node saw (the
    /// pinger's endpoint as seen from there, a free STUN).
    Pong {
        /// The Ping's transaction id.
        tx_id: TxId,
        /// The Ping's source address as the pinged node saw it.
        observed: SocketAddr,
    },
    /// Sent through the relay: "I am pinging you at these endpoints now;
    /// ping me back at mine" (so both NATs open at once).
    CallMeMaybe {
        /// The sender's candidate endpoints (at most [`MAX_ENDPOINTS`]).
        endpoints: Vec<SocketAddr>,
    },
}

/// What a datagram on the WireGuard socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatagramKind {
    /// A WireGuard message (types 1 to 4), for the `wg` core.
    WireGuard,
    /// Starts with [`MAGIC`]; still has to pass [`open`].
    Disco,
    /// A STUN message (the answer to our binding request, hopefully).
    Stun,
    /// None of these.
    Other,
}

/// Demultiplexes the node's UDP socket (header checks only; `Disco` still
/// has to pass [`open`], `Stun` [`crate::dataplane::stun::parse_binding_response`]).
pub fn classify(d: &[u8]) -> DatagramKind {
    if is_disco(d) {
        DatagramKind::Disco
    } else if d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
        DatagramKind::WireGuard
    } else if crate::dataplane::stun::is_stun(d) {
        DatagramKind::Stun
    } else {
        DatagramKind::Other
    }
}

/// Starts with [`MAGIC`] and is long enough to be one.
pub fn is_disco(d: &[u8]) -> bool {
    d.len() >= MIN_LEN && d.starts_with(MAGIC)
}

fn put_addr(a: &SocketAddr, out: &mut Vec<u8>) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<(SocketAddr, usize)> {
    let (ip, n): (IpAddr, usize) = match *b.first()? {
        4 => (Ipv4Addr::from(<[u8; 4]>::try_from(b.get(1..5)?).ok()?).into(), 5),
        6 => (Ipv6Addr::from(<[u8; 16]>::try_from(b.get(1..17)?).ok()?).into(), 17),
        _ => return None,
    };
    let port = u16::from_be_bytes(b.get(n..n + 2)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), n + 2))
}

impl Message {
    /// The plaintext encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Message::Ping { tx_id } => {
                out.push(T_PING);
                out.extend_from_slice(tx_id);
            }
            Message::Pong { tx_id, observed } => {
                out.push(T_PONG);
                out.extend_from_slice(tx_id);
                put_addr(observed, &mut out);
            }
            Message::CallMeMaybe { endpoints } => {
                out.push(T_CALL_ME_MAYBE);
                let n = endpoints.len().min(MAX_ENDPOINTS);
                out.push(n as u8);
                for e in &endpoints[..n] {
                    put_addr(e, &mut out);
                }
            }
        }
        out
    }

    /// Parses a plaintext; `None` if truncated or of an unknown type.
    pub fn decode(b: &[u8]) -> Option<Message> {
        let (&t, rest) = b.split_first()?;
        match t {
            T_PING => Some(Message::Ping { tx_id: rest.get(..12)?.try_into().ok()? }),
            T_PONG => {
                let tx_id = rest.get(..12)?.try_into().ok()?;
                let (observed, _) = get_addr(&rest[12..])?;
                Some(Message::Pong { tx_id, observed })
            }
            T_CALL_ME_MAYBE => {
                let (&n, mut rest) = rest.split_first()?;
                if n as usize > MAX_ENDPOINTS {
                    return None;
                }
                let mut endpoints = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let (a, used) = get_addr(rest)?;
                    endpoints.push(a);
                    rest = &rest[used..];
                }
                Some(Message::CallMeMaybe { endpoints })
            }
            _ => None,
        }
    }
}

/// Our side of disco: the node's private key and its public key, derived
/// once here. Every datagram names its sender's public key, and deriving it
/// per datagram was an X25519 base-point multiplication each time.
#[derive(Clone)]
pub struct DiscoKey {
    private: PrivateKey,
    public: Key,
}

impl DiscoKey {
    /// The disco key pair for a node's private (WireGuard) key.
    pub fn new(private: PrivateKey) -> Self {
        let public = crate::dataplane::wg::public_key_of(&private);
        DiscoKey { private, public }
    }

    /// Our public key, as it appears in the header of what we seal.
    pub fn public(&self) -> &Key {
        &self.public
    }
}

/// The directional box key, or `None` for a low-order peer key.
fn box_key(our_private: &PrivateKey, their_public: &Key, sender: &Key, receiver: &Key) -> Option<XChaCha20Poly1305> {
    let shared = StaticSecret::from(*our_private.expose_secret()).diffie_hellman(&PublicKey::from(*their_public));
    if !shared.was_contributory() {
        return None;
    }
    let mut h = Blake2s256::new();
    h.update(KDF_LABEL);
    h.update(shared.as_bytes());
    h.update(sender);
    h.update(receiver);
    Some(XChaCha20Poly1305::new(&h.finalize()))
}

/// Seals with an already derived box key and a given nonce, so the cached
/// and uncached paths share every byte of the format.
fn seal_with(key: &XChaCha20Poly1305, our_public: &Key, nonce: &[u8; NONCE_LEN], counter: u64, msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(our_public);
    let aad_len = out.len();
    out.extend_from_slice(nonce);
    let mut plain = counter.to_be_bytes().to_vec();
    plain.extend_from_slice(&msg.encode());
    let ct = key
        .encrypt(XNonce::from_slice(nonce), Payload { msg: &plain, aad: &out[..aad_len] })
        .expect("XChaCha20-Poly1305 encryption of a small message cannot fail");
    out.extend_from_slice(&ct);
    out
}

/// Opens a datagram already checked by [`is_disco`] with the box key of its
/// sender (whose key the caller read from the header).
fn open_with(key: &XChaCha20Poly1305, sender: Key, datagram: &[u8]) -> Option<Opened> {
    let aad = &datagram[..MAGIC.len() + KEY_LEN];
    let nonce = XNonce::from_slice(&datagram[MAGIC.len() + KEY_LEN..HEADER_LEN]);
    let plain = key.decrypt(nonce, Payload { msg: &datagram[HEADER_LEN..], aad }).ok()?;
    let counter = u64::from_be_bytes(plain.get(..COUNTER_LEN)?.try_into().ok()?);
    Some(Opened { sender, counter, msg: Message::decode(&plain[COUNTER_LEN..])? })
}

/// The sender key in a disco datagram's header (`None`: not disco).
fn sender_of(datagram: &[u8]) -> Option<Key> {
    if !is_disco(datagram) {
        return None;
    }
    datagram[MAGIC.len()..MAGIC.len() + KEY_LEN].try_into().ok()
}

/// Seals `msg` from us (`ours`) to the node with `their_public`, numbered
/// `counter` (from our [`Counter`]). The result goes out as one UDP datagram
/// (or through the relay). A low-order `their_public` (never a real node
/// key) yields a datagram no one can open.
///
/// This derives the box key (an X25519) on every call; a node seals to its
/// peers through [`PeerBoxes`], which derives it once per peer.
pub fn seal(ours: &DiscoKey, their_public: &Key, counter: u64, msg: &Message) -> Vec<u8> {
    let key = box_key(&ours.private, their_public, &ours.public, their_public).unwrap_or_else(|| XChaCha20Poly1305::new(&[0; 32].into()));
    seal_with(&key, &ours.public, &rand::random(), counter, msg)
}

/// An authenticated disco message. Its `counter` must still pass the
/// sender's [`ReplayWindow`] before anything acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The sender's node key (authenticated by the AEAD).
    pub sender: Key,
    /// The sender's message counter, for its [`ReplayWindow`].
    pub counter: u64,
    /// The message itself.
    pub msg: Message,
}

/// Opens a disco datagram addressed to us. Returns the sender's node key,
/// counter and message, or `None` (not disco, sender not a known peer, bad
/// authentication, truncated, unknown type).
///
/// Derives the box key per call, like [`seal`]; see [`PeerBoxes`].
pub fn open(ours: &DiscoKey, datagram: &[u8], is_known_peer: impl Fn(&Key) -> bool) -> Option<Opened> {
    let sender = sender_of(datagram)?;
    if !is_known_peer(&sender) || sender == ours.public {
        return None;
    }
    let key = box_key(&ours.private, &sender, &sender, &ours.public)?;
    open_with(&key, sender, datagram)
}

/// Both directional box keys shared with one peer.
struct PeerBox {
    to_them: XChaCha20Poly1305,
    from_them: XChaCha20Poly1305,
}

/// Our disco key and the box keys shared with each known peer, derived once
/// when the peer is learned ([`PeerBoxes::learn`]) rather than with an
/// X25519 per datagram.
///
/// Only peers the node was configured with are ever held (the core learns
/// and forgets them with its WireGuard peers), so a stranger's datagram
/// finds no entry and costs only the map look-up: attacker-chosen sender
/// keys cannot grow it. A peer whose node (= disco) key changes arrives as
/// a new key, and the old key's entry goes with [`PeerBoxes::forget`].
/// The cipher instances zero their keys on drop.
pub(crate) struct PeerBoxes {
    ours: DiscoKey,
    peers: HashMap<Key, PeerBox>,
}

impl PeerBoxes {
    /// No peers yet.
    pub(crate) fn new(ours: DiscoKey) -> Self {
        PeerBoxes { ours, peers: HashMap::new() }
    }

    /// Derive the box keys for `peer` unless already held. A low-order key
    /// (never a real node key) or our own gets none, so its datagrams never
    /// open.
    pub(crate) fn learn(&mut self, peer: &Key) {
        if self.peers.contains_key(peer) || *peer == self.ours.public {
            return;
        }
        let (ours, theirs) = (&self.ours.public, peer);
        let to_them = box_key(&self.ours.private, peer, ours, theirs);
        let from_them = box_key(&self.ours.private, peer, theirs, ours);
        if let (Some(to_them), Some(from_them)) = (to_them, from_them) {
            self.peers.insert(*peer, PeerBox { to_them, from_them });
        }
    }

    /// Drop what we hold for `peer` (removed, or its key replaced).
    pub(crate) fn forget(&mut self, peer: &Key) {
        self.peers.remove(peer);
    }

    /// Like [`seal`]; a peer not learned falls back to [`seal`] itself.
    pub(crate) fn seal(&self, to: &Key, counter: u64, msg: &Message) -> Vec<u8> {
        match self.peers.get(to) {
            Some(b) => seal_with(&b.to_them, &self.ours.public, &rand::random(), counter, msg),
            None => seal(&self.ours, to, counter, msg),
        }
    }

    /// Like [`open`], for senders we learned; anyone else is `None` without
    /// any public-key operation.
    pub(crate) fn open(&self, datagram: &[u8]) -> Option<Opened> {
        let sender = sender_of(datagram)?;
        open_with(&self.peers.get(&sender)?.from_them, sender, datagram)
    }
}

/// Our sending counter, shared by all peers (each sees an increasing
/// subsequence, which is all its [`ReplayWindow`] needs).
#[derive(Clone, Debug, Default)]
pub struct Counter {
    last: u64,
}

impl Counter {
    /// The next counter: above every earlier one, and at least `unix_micros`
    /// (the wall clock, see [`unix_micros`]) so a restarted node starts above
    /// what its peers saw from it before.
    pub fn next(&mut self, unix_micros: u64) -> u64 {
        self.last = self.last.saturating_add(1).max(unix_micros);
        self.last
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Which of one peer's counters were already accepted.
///
/// Remembers the [`REPLAY_WINDOW`] highest accepted counters; anything at or
/// below the lowest of those once the window is full is refused. Only
/// authenticated messages update it, so no one but the peer moves it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReplayWindow {
    floor: u64,
    recent: BTreeSet<u64>,
}

impl ReplayWindow {
    /// True (and remembered) if `counter` was not seen and is recent enough.
    pub(crate) fn accept(&mut self, counter: u64) -> bool {
        // 0 is never sent (`Counter::next` starts at 1).
        if counter <= self.floor {
            return false;
        }
        if !self.recent.insert(counter) {
            return false;
        }
        if self.recent.len() > REPLAY_WINDOW
            && let Some(low) = self.recent.pop_first()
        {
            self.floor = low;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wg::{generate_private_key, public_key_of};
    use proptest::prelude::*;

    fn key() -> DiscoKey {
        DiscoKey::new(generate_private_key())
    }

    #[test]
    fn the_public_key_is_the_private_keys() {
        let private = generate_private_key();
        assert_eq!(*DiscoKey::new(private.clone()).public(), public_key_of(&private));
    }

    fn msgs() -> Vec<Message> {
        vec![
            Message::Ping { tx_id: [7; 12] },
            Message::Pong { tx_id: [1; 12], observed: "203.0.113.9:41641".parse().unwrap() },
            Message::Pong { tx_id: [2; 12], observed: "[2001:db8::1]:65535".parse().unwrap() },
            Message::CallMeMaybe { endpoints: vec![] },
            Message::CallMeMaybe {
                endpoints: vec!["192.168.1.10:41641".parse().unwrap(), "[fd00::2]:1".parse().unwrap(), "1.2.3.4:5".parse().unwrap()],
            },
        ]
    }

    #[test]
    fn roundtrip_each_message() {
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        for m in msgs() {
            let d = seal(&a, &pb, 1, &m);
            assert_eq!(classify(&d), DatagramKind::Disco);
            assert_eq!(open(&b, &d, |k| *k == pa), Some(Opened { sender: pa, counter: 1, msg: m.clone() }));
            // Fresh nonce each time.
            assert_ne!(seal(&a, &pb, 1, &m), d);
        }
    }

    #[test]
    fn replayed_datagram_is_refused_by_the_window() {
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let mut counter = Counter::default();
        let mut window = ReplayWindow::default();
        let now_us = 1_700_000_000_000_000;
        let ping = seal(&a, &pb, counter.next(now_us), &Message::Ping { tx_id: [9; 12] });
        let first = open(&b, &ping, |k| *k == pa).unwrap();
        assert!(window.accept(first.counter));
        // The same bytes again, however often: authentic, but not new.
        for _ in 0..1000 {
            let again = open(&b, &ping, |k| *k == pa).unwrap();
            assert!(!window.accept(again.counter));
        }
        // The sender's next message is still accepted.
        let next = seal(&a, &pb, counter.next(now_us), &Message::Ping { tx_id: [10; 12] });
        assert!(window.accept(open(&b, &next, |k| *k == pa).unwrap().counter));
    }

    #[test]
    fn window_tolerates_reordering_but_not_ancient_counters() {
        let mut w = ReplayWindow::default();
        // Counters thousands apart (microsecond clock), arriving out of order.
        let cs: Vec<u64> = (1..=200u64).map(|i| 1_000_000 + i * 5000).collect();
        for pair in cs.chunks(2) {
            assert!(w.accept(pair[1]));
            assert!(w.accept(pair[0]), "one step out of order is fine");
        }
        assert!(!w.accept(cs[0]), "older than the window");
        assert!(!w.accept(cs[199]), "seen");
        assert!(!w.accept(0));
        assert!(w.accept(cs[199] + 1));
    }

    #[test]
    fn counter_increases_and_follows_the_wall_clock() {
        let mut c = Counter::default();
        let a = c.next(1000);
        let b = c.next(1000);
        let d = c.next(5);
        assert!(a < b && b < d, "{a} {b} {d}");
        assert_eq!(c.next(10_000), 10_000, "a restart at a later time starts above the old run");
        assert!(Counter::default().next(0) > 0);
    }

    #[test]
    fn call_me_maybe_caps_endpoints() {
        let eps: Vec<SocketAddr> = (0..100u16).map(|i| SocketAddr::from(([10, 0, 0, 1], i))).collect();
        let m = Message::decode(&Message::CallMeMaybe { endpoints: eps.clone() }.encode()).unwrap();
        assert_eq!(m, Message::CallMeMaybe { endpoints: eps[..MAX_ENDPOINTS].to_vec() });
        // A count above the cap is refused rather than trusted.
        assert_eq!(Message::decode(&[T_CALL_ME_MAYBE, 33]), None);
    }

    #[test]
    fn unknown_sender_wrong_receiver_and_self_are_refused() {
        let (a, b, c) = (key(), key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let d = seal(&a, &pb, 1, &Message::Ping { tx_id: [3; 12] });
        assert_eq!(open(&b, &d, |_| false), None, "unknown sender");
        assert_eq!(open(&c, &d, |_| true), None, "not for us");
        // The known-peer check runs before any crypto.
        let called = std::cell::Cell::new(0);
        let _ = open(&b, &d, |k| {
            called.set(called.get() + 1);
            *k == pa
        });
        assert_eq!(called.get(), 1);
        // Our own key as sender.
        let own = seal(&b, &pb, 1, &Message::Ping { tx_id: [3; 12] });
        assert_eq!(open(&b, &own, |_| true), None);
    }

    #[test]
    fn reflection_with_a_rewritten_sender_is_refused() {
        // A's ping to B, bounced back to A with the sender field set to B:
        // same DH secret, but the key is directional.
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let mut d = seal(&a, &pb, 1, &Message::Ping { tx_id: [4; 12] });
        d[MAGIC.len()..MAGIC.len() + 32].copy_from_slice(&pb);
        assert_eq!(open(&a, &d, |k| *k == pb), None);
        let _ = pa;
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let d = seal(&a, &pb, 1, &msgs()[4]);
        for i in 0..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x01;
            assert_eq!(open(&b, &t, |_| true), None, "byte {i}");
        }
        for n in 0..d.len() {
            assert_eq!(open(&b, &d[..n], |k| *k == pa), None, "prefix {n}");
        }
        let mut longer = d.clone();
        longer.push(0);
        assert_eq!(open(&b, &longer, |k| *k == pa), None);
    }

    #[test]
    fn low_order_keys_are_refused() {
        let b = key();
        let pb = *b.public();
        // The identity point (all zeros) and another small-order point.
        for bad in [[0u8; 32], {
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        }] {
            let d = seal(&b, &bad, 1, &Message::Ping { tx_id: [0; 12] });
            // Forge: "from" the low-order key, key derived from zero secret.
            let mut forged = d.clone();
            forged[MAGIC.len()..MAGIC.len() + 32].copy_from_slice(&bad);
            assert_eq!(open(&b, &forged, |_| true), None);
        }
        let _ = pb;
    }

    #[test]
    fn cached_boxes_agree_with_the_uncached_path() {
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let mut boxes_a = PeerBoxes::new(a.clone());
        let mut boxes_b = PeerBoxes::new(b.clone());
        boxes_a.learn(&pb);
        boxes_b.learn(&pa);
        for (i, m) in msgs().into_iter().enumerate() {
            let counter = 10 + i as u64;
            // Same nonce: the cached key seals to exactly the uncached bytes.
            let nonce = [i as u8; NONCE_LEN];
            let uncached_key = box_key(&a.private, &pb, &pa, &pb).unwrap();
            let want = seal_with(&uncached_key, &pa, &nonce, counter, &m);
            assert_eq!(seal_with(&boxes_a.peers[&pb].to_them, &pa, &nonce, counter, &m), want);
            let opened = Some(Opened { sender: pa, counter, msg: m.clone() });
            // Each side opens what the other sealed.
            assert_eq!(boxes_b.open(&want), opened);
            assert_eq!(boxes_b.open(&seal(&a, &pb, counter, &m)), opened);
            assert_eq!(open(&b, &boxes_a.seal(&pb, counter, &m), |k| *k == pa), opened);
            assert_eq!(boxes_b.open(&boxes_a.seal(&pb, counter, &m)), opened);
        }
    }

    #[test]
    fn a_changed_peer_key_replaces_its_cached_box() {
        let (a_old, a_new, b) = (key(), key(), key());
        let (old, new, pb) = (*a_old.public(), *a_new.public(), *b.public());
        let mut boxes_b = PeerBoxes::new(b.clone());
        boxes_b.learn(&old);
        let ping = Message::Ping { tx_id: [5; 12] };
        let from_old = seal(&a_old, &pb, 1, &ping);
        assert!(boxes_b.open(&from_old).is_some());
        let to_old = boxes_b.seal(&old, 2, &ping);
        // The peer rotates its key: the old one is forgotten, the new learned.
        boxes_b.forget(&old);
        boxes_b.learn(&new);
        assert_eq!(boxes_b.peers.len(), 1);
        assert_eq!(boxes_b.open(&from_old), None, "the old key's box is gone");
        assert_eq!(boxes_b.open(&seal(&a_new, &pb, 3, &ping)).map(|o| o.sender), Some(new));
        // What we seal now is for the new key only.
        let to_new = boxes_b.seal(&new, 4, &ping);
        assert_eq!(open(&a_new, &to_new, |k| *k == pb).map(|o| o.counter), Some(4));
        assert_eq!(open(&a_old, &to_new, |k| *k == pb), None);
        assert_eq!(open(&a_new, &to_old, |k| *k == pb), None);
    }

    #[test]
    fn strangers_low_order_keys_and_ourselves_are_never_cached() {
        let (b, stranger) = (key(), key());
        let pb = *b.public();
        let mut boxes_b = PeerBoxes::new(b.clone());
        let d = seal(&stranger, &pb, 1, &Message::Ping { tx_id: [6; 12] });
        assert_eq!(boxes_b.open(&d), None);
        let mut one = [0u8; 32];
        one[0] = 1;
        for k in [[0u8; 32], one, pb] {
            boxes_b.learn(&k);
        }
        assert!(boxes_b.peers.is_empty());
        assert_eq!(boxes_b.open(&seal(&b, &pb, 1, &Message::Ping { tx_id: [6; 12] })), None);
        // Learning twice derives nothing new and changes nothing.
        let ps = *stranger.public();
        boxes_b.learn(&ps);
        boxes_b.learn(&ps);
        assert_eq!(boxes_b.peers.len(), 1);
        assert!(boxes_b.open(&d).is_some());
    }

    /// Not a check: prints the cost of seal + open per datagram with and
    /// without cached box keys, for `bench/disco.sh`.
    #[test]
    #[ignore]
    fn seal_open_cost() {
        let (a, b) = (key(), key());
        let (pa, pb) = (*a.public(), *b.public());
        let mut boxes_a = PeerBoxes::new(a.clone());
        let mut boxes_b = PeerBoxes::new(b.clone());
        boxes_a.learn(&pb);
        boxes_b.learn(&pa);
        let n: u32 = std::env::var("DISCO_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let m = Message::Pong { tx_id: [1; 12], observed: "203.0.113.9:41641".parse().unwrap() };
        let t = std::time::Instant::now();
        for i in 0..n {
            let d = seal(&a, &pb, u64::from(i), &m);
            assert!(open(&b, &d, |k| *k == pa).is_some());
        }
        let uncached = t.elapsed() / n;
        let t = std::time::Instant::now();
        for i in 0..n {
            let d = boxes_a.seal(&pb, u64::from(i), &m);
            assert!(boxes_b.open(&d).is_some());
        }
        let cached = t.elapsed() / n;
        println!("disco seal+open per datagram: uncached {} ns, cached {} ns", uncached.as_nanos(), cached.as_nanos());
    }

    #[test]
    fn classify_wireguard_stun_and_others() {
        for t in 1u8..=4 {
            let mut m = vec![t, 0, 0, 0];
            m.resize(32, 0xAB);
            assert_eq!(classify(&m), DatagramKind::WireGuard);
            assert!(!is_disco(&m));
            assert!(!crate::dataplane::stun::is_stun(&m));
        }
        assert_eq!(classify(&[1, 0, 0]), DatagramKind::Other);
        assert_eq!(classify(&[5, 0, 0, 0]), DatagramKind::Other);
        assert_eq!(classify(&crate::dataplane::stun::encode_binding_request([1; 12])), DatagramKind::Stun);
        assert_eq!(classify(MAGIC), DatagramKind::Other, "magic alone is too short");
        assert_eq!(classify(b""), DatagramKind::Other);
        // The magic is neither WireGuard nor STUN by construction.
        assert!(MAGIC[0] > 4 && MAGIC[0] & 0xC0 != 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_datagrams_never_open(body in proptest::collection::vec(any::<u8>(), 0..300), with_magic in any::<bool>()) {
            let b = key();
            let mut d = body;
            if with_magic && d.len() >= MAGIC.len() {
                d[..MAGIC.len()].copy_from_slice(MAGIC);
            }
            let _ = classify(&d);
            prop_assert_eq!(open(&b, &d, |_| true), None);
        }

        #[test]
        fn random_plaintexts_decode_without_panic(p in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(m) = Message::decode(&p) {
                // Whatever decodes re-encodes to a prefix of the input.
                let e = m.encode();
                prop_assert_eq!(&p[..e.len()], &e[..]);
            }
        }

        #[test]
        fn sealed_random_messages_roundtrip(tx in any::<[u8; 12]>(), ip in any::<[u8; 16]>(), port in any::<u16>(), v6 in any::<bool>()) {
            let (a, b) = (key(), key());
            let pa = *a.public();
            let observed = if v6 { SocketAddr::new(Ipv6Addr::from(ip).into(), port) } else {
                SocketAddr::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).into(), port)
            };
            let m = Message::Pong { tx_id: tx, observed };
            let d = seal(&a, b.public(), 1, &m);
            prop_assert_eq!(open(&b, &d, |k| *k == pa), Some(Opened { sender: pa, counter: 1, msg: m }));
        }
    }
}
