//! WireGuard peers: a sans-IO core over boringtun's noise layer.
//!
//! [`Wg`] owns every peer's `Tunn`, the cryptokey routing table and the
//! per-peer endpoint. It is fed datagrams, IP packets and time, and emits what
//! to send through a caller-supplied sink; it never touches a socket. The tokio
//! driver in `node` moves bytes in and out.
//!
//! Two security properties live here and nowhere else:
//! - inbound, a decapsulated packet whose inner source address is not inside
//!   the sending peer's AllowedIPs is dropped and counted (`spoofed`);
//! - a peer's endpoint only moves to the source of a packet that authenticated.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use serde::Serialize;

/// Largest IP packet we carry (WireGuard's usual MTU is 1420; allow jumbo-ish).
pub(crate) const MAX_PACKET: usize = 65535;
/// Room for the WireGuard header and tag around an IP packet.
const OVERHEAD: usize = 32;
/// boringtun's timers have one-second resolution; 250 ms keeps them honest.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake initiations accepted per second before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

use crate::key::{Key, PresharedKey, PrivateKey, ShortKey};

/// Static configuration of one peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// The peer's WireGuard public key (its node key).
    pub public_key: Key,
    /// `PresharedKey =`, mixed into the handshake when set.
    pub preshared_key: Option<PresharedKey>,
    /// Inner source addresses accepted from the peer, and routed to it.
    pub allowed_ips: Vec<IpNet>,
    /// Where to send until the peer is heard from elsewhere.
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives (`PersistentKeepalive =`), if any.
    pub persistent_keepalive: Option<u16>,
}

/// Index of a peer inside a [`Wg`]; stable for the life of the peer.
pub(crate) type PeerId = usize;

/// Something the core wants done.
pub enum Output<'a> {
    /// Send this datagram toward `peer` (`None`: a cookie reply to an
    /// unauthenticated source), at `to`, the endpoint WireGuard knows for it
    /// (`None`: not yet known; a path manager may still reach it by relay).
    Network {
        /// The peer the datagram belongs to, if authenticated.
        peer: Option<Key>,
        /// The peer's endpoint as WireGuard knows it.
        to: Option<SocketAddr>,
        /// The datagram.
        data: &'a [u8],
    },
    /// An authenticated IP packet from this peer, inner source verified.
    Tunnel {
        /// The peer's index in this [`Wg`].
        peer: PeerId,
        /// The peer's public key.
        key: Key,
        /// The decrypted IP packet.
        packet: &'a [u8],
    },
}

/// Per-peer counters, also shown by `status`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct PeerStats {
    pub(crate) rx_bytes: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) rx_packets: u64,
    pub(crate) tx_packets: u64,
    /// Decapsulated packets dropped because their inner source address is
    /// outside this peer's AllowedIPs.
    pub(crate) spoofed: u64,
    pub(crate) handshakes: u64,
    #[serde(skip)]
    pub(crate) last_handshake: Option<Instant>,
}

/// Counters for traffic that could not be tied to a peer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GlobalStats {
    /// Datagrams that failed to parse or authenticate.
    pub invalid: u64,
    /// IP packets to an address no peer routes.
    pub(crate) no_route: u64,
    /// Handshake initiations from keys we do not know.
    pub(crate) unknown_peer: u64,
}

struct Peer {
    config: PeerConfig,
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    stats: PeerStats,
}

/// The WireGuard device core: all peers behind one UDP socket.
pub struct Wg {
    private: StaticSecret,
    public: PublicKey,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<Key, PeerId>,
    routes: Routes,
    limiter: Arc<RateLimiter>,
    next_tick: Instant,
    next_limiter_reset: Instant,
    buf: Box<[u8]>,
    stats: GlobalStats,
}

/// Why a peer configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The public key (base64) of a peer given twice.
    #[error("peer {0} is configured twice; each public key may appear once")]
    DuplicatePeer(String),
    /// An AllowedIPs prefix already routed to another peer.
    #[error("allowed IP {net} of peer {peer} is already routed to peer {other}; give each prefix to one peer only")]
    DuplicateAllowedIp {
        /// The prefix given twice.
        net: IpNet,
        /// The peer being added (base64 key).
        peer: String,
        /// The peer that has the prefix (base64 key).
        other: String,
    },
    /// The peer's key is this node's own.
    #[error("a peer cannot have this node's own public key")]
    SelfPeer,
}

impl Wg {
    /// A device with no peers; `now` starts its timers.
    pub fn new(private_key: &PrivateKey, now: Instant) -> Self {
        let private = StaticSecret::from(*private_key.expose_secret());
        let public = PublicKey::from(&private);
        Wg {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
            peers: Vec::new(),
            by_key: HashMap::new(),
            routes: Routes::default(),
            next_tick: now,
            next_limiter_reset: now + Duration::from_secs(1),
            buf: vec![0u8; MAX_PACKET + OVERHEAD + 148].into_boxed_slice(),
            stats: GlobalStats::default(),
        }
    }

    pub(crate) fn public_key(&self) -> Key {
        *self.public.as_bytes()
    }

    /// Add a peer. Overlapping AllowedIPs resolve by longest prefix as in
    /// WireGuard, but the exact same prefix on two peers is refused: which peer
    /// owns an address (and so who a caller is) must never be ambiguous.
    pub fn add_peer(&mut self, config: PeerConfig) -> Result<PeerId, WgError> {
        if config.public_key == self.public_key() {
            return Err(WgError::SelfPeer);
        }
        if self.by_key.contains_key(&config.public_key) {
            return Err(WgError::DuplicatePeer(key_to_base64(&config.public_key)));
        }
        for net in &config.allowed_ips {
            if let Some(other) = self.routes.exact(net) {
                let other_key = self.peers[other].as_ref().map(|p| p.config.public_key).unwrap_or_default();
                return Err(WgError::DuplicateAllowedIp {
                    net: *net,
                    peer: key_to_base64(&config.public_key),
                    other: key_to_base64(&other_key),
                });
            }
        }
        let id = self.peers.iter().position(Option::is_none).unwrap_or(self.peers.len());
        // boringtun shifts the index left by 8 and uses the low bits per
        // session; 24 bits of peer index is plenty.
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key),
            config.preshared_key.as_ref().map(|k| *k.expose_secret()),
            config.persistent_keepalive,
            id as u32,
            Some(self.limiter.clone()),
        );
        for net in &config.allowed_ips {
            self.routes.insert(*net, id);
        }
        self.by_key.insert(config.public_key, id);
        let peer = Peer { endpoint: config.endpoint, config, tunn, stats: PeerStats::default() };
        if id == self.peers.len() {
            self.peers.push(Some(peer));
        } else {
            self.peers[id] = Some(peer);
        }
        Ok(id)
    }

    /// Add a peer, or update an existing one's AllowedIPs and endpoint in
    /// place. Unlike remove + add this keeps the session (and so open TCP
    /// connections) alive when only the netmap's view of the peer changed.
    pub fn upsert_peer(&mut self, config: PeerConfig) -> Result<PeerId, WgError> {
        let Some(id) = self.peer_id(&config.public_key) else { return self.add_peer(config) };
        let old_routes = self.peers[id].as_ref().map(|p| p.config.allowed_ips.clone()).unwrap_or_default();
        self.routes.remove_peer(id);
        for net in &config.allowed_ips {
            if let Some(other) = self.routes.exact(net) {
                // Put the old routes back: a failed update changes nothing.
                for n in &old_routes {
                    self.routes.insert(*n, id);
                }
                let other_key = self.peers[other].as_ref().map(|p| p.config.public_key).unwrap_or_default();
                return Err(WgError::DuplicateAllowedIp {
                    net: *net,
                    peer: key_to_base64(&config.public_key),
                    other: key_to_base64(&other_key),
                });
            }
        }
        for net in &config.allowed_ips {
            self.routes.insert(*net, id);
        }
        let peer = self.peers[id].as_mut().expect("peer id from by_key");
        // A newly reported endpoint wins; otherwise keep the one learned from
        // authenticated traffic (roaming), which is at least as fresh.
        if config.endpoint.is_some() && config.endpoint != peer.config.endpoint {
            peer.endpoint = config.endpoint;
        }
        peer.config = config;
        Ok(id)
    }

    /// Remove a peer; packets from it are no longer accepted.
    pub(crate) fn remove_peer(&mut self, key: &Key) -> bool {
        let Some(id) = self.by_key.remove(key) else { return false };
        self.routes.remove_peer(id);
        self.peers[id] = None;
        true
    }

    pub(crate) fn peer_id(&self, key: &Key) -> Option<PeerId> {
        self.by_key.get(key).copied()
    }

    pub(crate) fn peer_key(&self, id: PeerId) -> Option<Key> {
        self.peers.get(id)?.as_ref().map(|p| p.config.public_key)
    }

    /// The peer that AllowedIPs route this address to.
    pub(crate) fn route(&self, ip: IpAddr) -> Option<PeerId> {
        self.routes.lookup(ip)
    }

    pub(crate) fn peer_config(&self, id: PeerId) -> Option<&PeerConfig> {
        self.peers.get(id)?.as_ref().map(|p| &p.config)
    }

    pub(crate) fn peer_stats(&self, id: PeerId) -> Option<&PeerStats> {
        self.peers.get(id)?.as_ref().map(|p| &p.stats)
    }

    pub(crate) fn peer_endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        self.peers.get(id)?.as_ref()?.endpoint
    }

    pub(crate) fn stats(&self) -> &GlobalStats {
        &self.stats
    }

    /// A copy of the cryptokey routing table, for callers that must not hold
    /// the core while they use it (the stack re-judging its connections).
    pub(crate) fn route_table(&self) -> RouteTable {
        RouteTable { routes: self.routes.clone(), keys: self.peers.iter().map(|p| p.as_ref().map(|p| p.config.public_key)).collect() }
    }

    pub(crate) fn peer_ids(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.iter().enumerate().filter(|(_, p)| p.is_some()).map(|(i, _)| i)
    }

    /// Encrypt an IP packet from the local stack toward the peer that routes
    /// its destination. Without a session the packet is queued and a handshake
    /// starts.
    pub fn send_ip(&mut self, packet: &[u8], out: &mut impl FnMut(Output<'_>)) {
        let Some(dst) = ip_dst(packet) else {
            self.stats.invalid += 1;
            return;
        };
        let Some(id) = self.routes.lookup(dst) else {
            self.stats.no_route += 1;
            return;
        };
        let Some(peer) = self.peers[id].as_mut() else { return };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => {
                peer.stats.tx_packets += 1;
                peer.stats.tx_bytes += packet.len() as u64;
                out(Output::Network { peer: Some(peer.config.public_key), to: peer.endpoint, data: b });
            }
            TunnResult::Err(e) => tracing::debug!(peer = %ShortKey(peer.config.public_key), error = ?e, "encapsulate failed"),
            _ => {}
        }
    }

    /// Process one UDP datagram from `from`, received at `now`.
    pub fn recv_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: Instant, out: &mut impl FnMut(Output<'_>)) {
        let id = match self.classify(from, datagram, out) {
            Some(id) => id,
            None => return,
        };
        let Some(peer) = self.peers[id].as_mut() else { return };
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            first = false;
            match peer.tunn.decapsulate(Some(from.ip()), input, &mut self.buf) {
                TunnResult::Done => break,
                TunnResult::Err(WireGuardError::DuplicateCounter) => break,
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %ShortKey(peer.config.public_key), %from, error = ?e, "dropping datagram");
                    self.stats.invalid += 1;
                    break;
                }
                TunnResult::WriteToNetwork(b) => {
                    // Handshake traffic authenticated: this is where the peer is now.
                    roam(peer, from);
                    if matches!(Tunn::parse_incoming_packet(datagram), Ok(Packet::HandshakeResponse(_) | Packet::HandshakeInit(_))) {
                        peer.stats.handshakes += 1;
                        peer.stats.last_handshake = Some(now);
                    }
                    out(Output::Network { peer: Some(peer.config.public_key), to: Some(from), data: b });
                    // Queued packets (sent before the handshake finished) follow.
                }
                TunnResult::WriteToTunnelV4(p, src) => {
                    roam(peer, from);
                    Self::deliver(&self.routes, &mut self.stats, peer, id, IpAddr::V4(src), p, out);
                    break;
                }
                TunnResult::WriteToTunnelV6(p, src) => {
                    roam(peer, from);
                    Self::deliver(&self.routes, &mut self.stats, peer, id, IpAddr::V6(src), p, out);
                    break;
                }
            }
        }
    }

    fn deliver(
        routes: &Routes,
        stats: &mut GlobalStats,
        peer: &mut Peer,
        id: PeerId,
        src: IpAddr,
        packet: &[u8],
        out: &mut impl FnMut(Output<'_>),
    ) {
        peer.stats.rx_packets += 1;
        peer.stats.rx_bytes += packet.len() as u64;
        if packet.is_empty() {
            return; // keepalive
        }
        // boringtun cuts the packet at the IPv4 total-length field even when
        // that is shorter than the header it read `src` from: such a stub
        // carries no source at all, so the check below would vouch for bytes
        // the stack never sees (found by fuzz/wg_datagram).
        let min_header = if src.is_ipv4() { 20 } else { 40 };
        if packet.len() < min_header {
            stats.invalid += 1;
            tracing::debug!(peer = %ShortKey(peer.config.public_key), len = packet.len(), "dropping packet shorter than its IP header");
            return;
        }
        if routes.lookup(src) != Some(id) {
            peer.stats.spoofed += 1;
            tracing::debug!(peer = %ShortKey(peer.config.public_key), %src, "dropping packet with inner source outside the peer's AllowedIPs");
            return;
        }
        out(Output::Tunnel { peer: id, key: peer.config.public_key, packet });
    }

    /// Find which peer a datagram belongs to, answering cookie replies for
    /// handshakes when under load.
    fn classify(&mut self, from: SocketAddr, datagram: &[u8], out: &mut impl FnMut(Output<'_>)) -> Option<PeerId> {
        let mut cookie = [0u8; 64];
        let packet = match self.limiter.verify_packet(Some(from.ip()), datagram, &mut cookie) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(c)) => {
                out(Output::Network { peer: None, to: Some(from), data: c });
                return None;
            }
            Err(_) => {
                self.stats.invalid += 1;
                return None;
            }
        };
        let idx = match packet {
            Packet::HandshakeInit(ref init) => match parse_handshake_anon(&self.private, &self.public, init) {
                Ok(half) => match self.by_key.get(&half.peer_static_public) {
                    Some(id) => return Some(*id),
                    None => {
                        self.stats.unknown_peer += 1;
                        return None;
                    }
                },
                Err(_) => {
                    self.stats.invalid += 1;
                    return None;
                }
            },
            Packet::HandshakeResponse(ref r) => r.receiver_idx,
            Packet::PacketCookieReply(ref r) => r.receiver_idx,
            Packet::PacketData(ref d) => d.receiver_idx,
        };
        let id = (idx >> 8) as usize;
        match self.peers.get(id) {
            Some(Some(_)) => Some(id),
            _ => {
                self.stats.invalid += 1;
                None
            }
        }
    }

    /// When the core next needs [`Wg::poll_timers`].
    pub(crate) fn next_deadline(&self) -> Instant {
        self.next_tick.min(self.next_limiter_reset)
    }

    /// Run handshake retries, keepalives, rekeys and session expiry.
    pub fn poll_timers(&mut self, now: Instant, out: &mut impl FnMut(Output<'_>)) {
        if now >= self.next_limiter_reset {
            self.limiter.reset_count();
            self.next_limiter_reset = now + Duration::from_secs(1);
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        for slot in self.peers.iter_mut() {
            let Some(peer) = slot else { continue };
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(b) => {
                    out(Output::Network { peer: Some(peer.config.public_key), to: peer.endpoint, data: b });
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    tracing::debug!(peer = %ShortKey(peer.config.public_key), "session expired");
                }
                TunnResult::Err(e) => tracing::trace!(peer = %ShortKey(peer.config.public_key), error = ?e, "timer"),
                _ => {}
            }
        }
    }

    /// Start a handshake with one peer now, wherever the caller routes it
    /// (with path management the endpoint may be unknown: the relay).
    pub(crate) fn initiate(&mut self, key: &Key, out: &mut impl FnMut(Output<'_>)) {
        let Some(id) = self.peer_id(key) else { return };
        let Some(peer) = self.peers[id].as_mut() else { return };
        if let TunnResult::WriteToNetwork(b) = peer.tunn.format_handshake_initiation(&mut self.buf, false) {
            out(Output::Network { peer: Some(peer.config.public_key), to: peer.endpoint, data: b });
        }
    }

    /// Send a fresh handshake initiation to `key` if no handshake message
    /// from it ever reached us in this process, even while an initiation is
    /// in flight. One sent before any path to the peer existed (a node that
    /// just joined greets peers before its relay link is up, or before the
    /// peer has learnt its key) is lost, and WireGuard would only resend it
    /// after its 5 s rekey timeout, stalling the first connection that long.
    /// A peer that sent us anything holds or is completing a session: a new
    /// initiation would only cross it.
    pub(crate) fn reinitiate(&mut self, key: &Key, out: &mut impl FnMut(Output<'_>)) {
        let Some(id) = self.peer_id(key) else { return };
        let Some(peer) = self.peers[id].as_mut() else { return };
        if peer.stats.handshakes > 0 {
            return;
        }
        if let TunnResult::WriteToNetwork(b) = peer.tunn.format_handshake_initiation(&mut self.buf, true) {
            out(Output::Network { peer: Some(peer.config.public_key), to: peer.endpoint, data: b });
        }
    }

    /// Start a handshake with every peer that has an endpoint, so a static
    /// configuration comes up without waiting for traffic.
    pub(crate) fn initiate_all(&mut self, out: &mut impl FnMut(Output<'_>)) {
        for slot in self.peers.iter_mut() {
            let Some(peer) = slot else { continue };
            if peer.endpoint.is_none() {
                continue;
            }
            if let TunnResult::WriteToNetwork(b) = peer.tunn.format_handshake_initiation(&mut self.buf, false) {
                out(Output::Network { peer: Some(peer.config.public_key), to: peer.endpoint, data: b });
            }
        }
    }
}

/// A snapshot of AllowedIPs routing: which peer owns an address.
pub(crate) struct RouteTable {
    routes: Routes,
    keys: Vec<Option<Key>>,
}

impl RouteTable {
    /// The key of the peer whose AllowedIPs contain `ip`.
    pub(crate) fn peer_of(&self, ip: IpAddr) -> Option<Key> {
        self.keys.get(self.routes.lookup(ip)?).copied().flatten()
    }
}

/// The address relayed datagrams are attributed to. It never becomes a
/// peer's endpoint: the relay is a path, chosen by the path manager.
pub const RELAYED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

fn roam(peer: &mut Peer, from: SocketAddr) {
    if from != RELAYED {
        peer.endpoint = Some(from);
    }
}

/// Destination address of an IPv4/IPv6 packet.
pub(crate) fn ip_dst(packet: &[u8]) -> Option<IpAddr> {
    Tunn::dst_address(packet)
}

/// The standard base64 form of a key (as `wg pubkey` prints it).
pub fn key_to_base64(key: &Key) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

pub(crate) use crate::key::KeyError;

/// Parses the standard base64 form of a key (surrounding whitespace ignored).
pub fn key_from_base64(s: &str) -> Result<Key, KeyError> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| KeyError::Base64(e.to_string()))?;
    bytes.as_slice().try_into().map_err(|_| KeyError::Length(bytes.len()))
}

/// Generate a new private key.
pub fn generate_private_key() -> PrivateKey {
    PrivateKey::generate()
}

/// The public half of a private key.
pub fn public_key_of(private: &PrivateKey) -> Key {
    private.public_key()
}

/// Longest-prefix match from address to peer. Linear per prefix length, which
/// is fine for the hundreds of peers a tailnet node sees; a hash per prefix
/// length keeps lookups O(prefix lengths) regardless of peer count.
#[derive(Clone, Default)]
struct Routes {
    /// (prefix length, is_v6) -> network address -> peer; kept sorted longest first.
    tables: Vec<((u8, bool), HashMap<IpAddr, PeerId>)>,
}

impl Routes {
    fn insert(&mut self, net: IpNet, id: PeerId) {
        let key = (net.prefix_len(), matches!(net, IpNet::V6(_)));
        let net = net.trunc();
        match self.tables.iter_mut().find(|(k, _)| *k == key) {
            Some((_, t)) => {
                t.insert(net.network(), id);
            }
            None => {
                self.tables.push((key, HashMap::from([(net.network(), id)])));
                self.tables.sort_by_key(|t| std::cmp::Reverse(t.0.0));
            }
        }
    }

    fn lookup(&self, ip: IpAddr) -> Option<PeerId> {
        for ((len, v6), table) in &self.tables {
            if *v6 != ip.is_ipv6() {
                continue;
            }
            let net = IpNet::new(ip, *len).ok()?.trunc();
            if let Some(id) = table.get(&net.network()) {
                return Some(*id);
            }
        }
        None
    }

    /// The peer already routing exactly this prefix.
    fn exact(&self, net: &IpNet) -> Option<PeerId> {
        let key = (net.prefix_len(), matches!(net, IpNet::V6(_)));
        let (_, t) = self.tables.iter().find(|(k, _)| *k == key)?;
        t.get(&net.trunc().network()).copied()
    }

    fn remove_peer(&mut self, id: PeerId) {
        for (_, t) in &mut self.tables {
            t.retain(|_, p| *p != id);
        }
        self.tables.retain(|(_, t)| !t.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Wg, Wg, SocketAddr, SocketAddr) {
        let now = Instant::now();
        let ka = generate_private_key();
        let kb = generate_private_key();
        let ea: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let eb: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let mut a = Wg::new(&ka, now);
        let mut b = Wg::new(&kb, now);
        a.add_peer(PeerConfig {
            public_key: public_key_of(&kb),
            preshared_key: None,
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            endpoint: Some(eb),
            persistent_keepalive: None,
        })
        .unwrap();
        b.add_peer(PeerConfig {
            public_key: public_key_of(&ka),
            preshared_key: None,
            allowed_ips: vec!["100.64.0.1/32".parse().unwrap()],
            endpoint: None,
            persistent_keepalive: None,
        })
        .unwrap();
        (a, b, ea, eb)
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let len = 20 + payload.len();
        let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    /// Shuttle datagrams between two cores until quiet; return what reached each tunnel.
    fn run(a: &mut Wg, b: &mut Wg, ea: SocketAddr, eb: SocketAddr, mut to_b: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut got_a, mut got_b) = (vec![], vec![]);
        let mut to_a: Vec<Vec<u8>> = vec![];
        for _ in 0..10 {
            let mut next_a = vec![];
            let mut next_b = vec![];
            for d in to_b.drain(..) {
                b.recv_datagram(ea, &d, std::time::Instant::now(), &mut |o| match o {
                    Output::Network { data, .. } => next_a.push(data.to_vec()),
                    Output::Tunnel { packet, .. } => got_b.push(packet.to_vec()),
                });
            }
            for d in to_a.drain(..) {
                a.recv_datagram(eb, &d, std::time::Instant::now(), &mut |o| match o {
                    Output::Network { data, .. } => next_b.push(data.to_vec()),
                    Output::Tunnel { packet, .. } => got_a.push(packet.to_vec()),
                });
            }
            if next_a.is_empty() && next_b.is_empty() {
                break;
            }
            to_a = next_a;
            to_b = next_b;
        }
        (got_a, got_b)
    }

    #[test]
    fn handshake_then_data_and_queued_packet_delivered() {
        let (mut a, mut b, ea, eb) = pair();
        let pkt = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"hello");
        let mut sent = vec![];
        a.send_ip(&pkt, &mut |o| {
            if let Output::Network { to, data, .. } = o {
                assert_eq!(to, Some(eb));
                sent.push(data.to_vec())
            }
        });
        assert_eq!(sent.len(), 1, "handshake initiation");
        let (_, got_b) = run(&mut a, &mut b, ea, eb, sent);
        assert_eq!(got_b, vec![pkt.clone()], "queued packet arrives after handshake");
        // b learned a's endpoint from the authenticated handshake (roaming).
        assert_eq!(b.peer_endpoint(0), Some(ea));
        assert_eq!(b.peer_stats(0).unwrap().rx_packets, 1);
    }

    #[test]
    fn packet_shorter_than_its_ip_header_is_dropped() {
        let (mut a, mut b, ea, eb) = pair();
        // The crashing input of fuzz/wg_datagram: a valid source, but an
        // IPv4 total length of 1, so boringtun delivered a 1-byte "packet".
        let mut stub = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"");
        stub[2..4].copy_from_slice(&1u16.to_be_bytes());
        let mut sent = vec![];
        a.send_ip(&stub, &mut |o| {
            if let Output::Network { data, .. } = o {
                sent.push(data.to_vec())
            }
        });
        let (_, got_b) = run(&mut a, &mut b, ea, eb, sent);
        assert!(got_b.is_empty(), "delivered {got_b:?}");
        assert_eq!(b.stats().invalid, 1);
    }

    #[test]
    fn spoofed_inner_source_is_dropped_and_counted() {
        let (mut a, mut b, ea, eb) = pair();
        let good = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"x");
        let mut sent = vec![];
        a.send_ip(&good, &mut |o| {
            if let Output::Network { data, .. } = o {
                sent.push(data.to_vec())
            }
        });
        run(&mut a, &mut b, ea, eb, sent);
        let spoof = ipv4([100, 64, 0, 99], [100, 64, 0, 2], b"evil");
        let mut sent = vec![];
        a.send_ip(&spoof, &mut |o| {
            if let Output::Network { data, .. } = o {
                sent.push(data.to_vec())
            }
        });
        let (_, got_b) = run(&mut a, &mut b, ea, eb, sent);
        assert!(got_b.is_empty());
        assert_eq!(b.peer_stats(0).unwrap().spoofed, 1);
    }

    #[test]
    fn garbage_is_counted_not_fatal() {
        let (_, mut b, ea, _) = pair();
        for len in [0usize, 1, 4, 32, 148, 1500] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            b.recv_datagram(ea, &junk, std::time::Instant::now(), &mut |_| panic!("no output for garbage"));
        }
        for t in 1u8..=4 {
            let mut m = vec![t, 0, 0, 0];
            m.resize(200, 0xAA);
            b.recv_datagram(ea, &m, std::time::Instant::now(), &mut |_| panic!("no output for forged message"));
        }
        assert!(b.stats().invalid >= 8);
    }

    #[test]
    fn duplicate_allowed_ip_refused() {
        let (mut a, _, _, _) = pair();
        let err = a
            .add_peer(PeerConfig {
                public_key: public_key_of(&generate_private_key()),
                preshared_key: None,
                allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
                endpoint: None,
                persistent_keepalive: None,
            })
            .unwrap_err();
        assert!(matches!(err, WgError::DuplicateAllowedIp { .. }));
    }

    #[test]
    fn longest_prefix_routes() {
        let mut r = Routes::default();
        r.insert("10.0.0.0/8".parse().unwrap(), 1);
        r.insert("10.1.0.0/16".parse().unwrap(), 2);
        r.insert("fd00::/8".parse().unwrap(), 3);
        assert_eq!(r.lookup("10.1.2.3".parse().unwrap()), Some(2));
        assert_eq!(r.lookup("10.2.2.3".parse().unwrap()), Some(1));
        assert_eq!(r.lookup("fd00::1".parse().unwrap()), Some(3));
        assert_eq!(r.lookup("11.0.0.1".parse().unwrap()), None);
        r.remove_peer(2);
        assert_eq!(r.lookup("10.1.2.3".parse().unwrap()), Some(1));
    }
}
