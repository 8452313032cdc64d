//! The node's data-plane core, sans-IO: WireGuard, per-peer path choice,
//! disco, STUN transaction matching and relay/direct dispatch.
//!
//! [`Core`] never touches a socket, a channel or the clock. The driver
//! (`node`) feeds it datagrams from the UDP socket ([`Core::handle_datagram`]),
//! frames from the relay ([`Core::handle_relay`]), IP packets from the stack
//! ([`Core::send_ip`]) and the time; asks it when to wake
//! ([`Core::poll_timeout`]) and calls [`Core::handle_timeout`] then. What the
//! core wants sent goes to a caller-supplied [`Transmit`]: datagrams to an
//! address, frames to the relay by node key, and authenticated IP packets for
//! the stack. Other news (our public endpoint from STUN) is queued as
//! [`Event`]s for [`Core::poll_event`].
//!
//! Why a sink and not an internal queue as in quinn-proto: at gigabit rates
//! every datagram would be copied into the queue and out again; the sink lets
//! the driver hand a datagram to the kernel while it still lies in the
//! WireGuard buffer. The simulated network (`sim`) implements the same sink
//! with queues, so both see identical behaviour.
//!
//! Time: every method that needs it takes `now`. The wall clock (which only
//! seeds disco counters, see [`disco::Counter`]) is read once by whoever
//! builds the core and advanced with `now` from then on. The only clock reads
//! left are boringtun's own, inside `Tunn` (handshake timestamps and its
//! timer bookkeeping), which we cannot feed.
#![warn(missing_docs)]

use crate::dataplane::dualstack::normalize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dataplane::disco;
use crate::dataplane::endpoint::is_valid_endpoint;
use crate::dataplane::path::{Action as PathAction, PathState, Route};
use crate::dataplane::stun;
use crate::dataplane::wg::{self, Output, PeerConfig, Wg, WgError};
use crate::key::{Key, PrivateKey, ShortKey};

/// How often we ask the STUN server for our public endpoint.
pub(crate) const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// First retry of an unanswered STUN request; doubles up to [`STUN_INTERVAL`].
/// A lost request must not leave us without a public endpoint for long.
pub(crate) const STUN_RETRY: Duration = Duration::from_secs(1);
/// The TTL (hop limit) of an opener: past our own router (one hop for a
/// node directly behind it), not as far as the peer's. Two routers can only
/// be this close on a LAN, where there is no NAT to open.
pub(crate) const OPENER_HOPS: u8 = 2;
/// How long the higher key waits before re-sending a lost initiation when a
/// direct path opens, so the two ends' initiations do not cross (see
/// `Core::on_disco`). A round trip or two on most paths.
const RESHAKE_DEFER: Duration = Duration::from_millis(500);
/// An opener's payload: nothing any receiver accepts (not WireGuard, disco
/// or STUN), in case one does arrive.
pub(crate) const OPENER: &[u8] = b"\0tailgate-opener";

/// Where the core's output goes. Implemented by the tokio driver (socket,
/// relay link, stack) and by the simulated network.
pub(crate) trait Transmit {
    /// Send `data` as one UDP datagram to `to`.
    fn udp(&mut self, to: SocketAddr, data: &[u8]);
    /// Send `data` as one UDP datagram to `to` with this TTL / hop limit
    /// (an opener: see [`crate::dataplane::path::Action::Open`]).
    fn udp_hops(&mut self, to: SocketAddr, data: &[u8], hops: u8);
    /// Send `data` through the relay to the node `to`; false if the link
    /// dropped it (down or full).
    fn relay(&mut self, to: &Key, data: &[u8]) -> bool;
    /// An authenticated IP packet from `peer` (inner source already checked
    /// against its AllowedIPs), for the TCP/IP stack.
    fn tunnel(&mut self, peer: &Key, packet: &[u8]);
}

/// News from the core that is not a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// STUN reported a (new) public endpoint for our socket.
    PublicEndpoint(SocketAddr),
}

/// Where one outgoing datagram goes.
enum Dest {
    Udp(SocketAddr),
    Relay(Key),
    Nowhere,
}

/// The wall clock, advanced by the monotonic `now` the core is given.
#[derive(Clone, Copy, Debug)]
struct WallClock {
    at: Instant,
    unix_micros: u64,
}

impl WallClock {
    fn micros(&self, now: Instant) -> u64 {
        self.unix_micros.saturating_add(now.saturating_duration_since(self.at).as_micros() as u64)
    }
}

/// The data-plane core of one node. See the module docs.
pub(crate) struct Core {
    wg: Wg,
    /// Choose per peer between proven direct UDP and the relay. Off (static
    /// WireGuard configurations), datagrams go to WireGuard's endpoint.
    manage_paths: bool,
    /// Seals and opens disco with box keys derived once per peer, learned
    /// and forgotten with the WireGuard peers below.
    disco: disco::PeerBoxes,
    paths: HashMap<Key, PathState>,
    /// Our own candidate endpoints, offered in call-me-maybe.
    my_endpoints: Vec<SocketAddr>,
    relay_up: bool,
    stun_server: Option<SocketAddr>,
    stun_tx: Option<stun::TxId>,
    next_stun: Instant,
    stun_retry: Duration,
    public_endpoint: Option<SocketAddr>,
    events: VecDeque<Event>,
    /// Bytes sent to and received from each peer through the relay
    /// (what `status` shows: whether, and how much, a peer relays).
    relayed: HashMap<Key, Relayed>,
    /// Numbers every disco message we send (peers drop replays by it).
    disco_counter: disco::Counter,
    wall: WallClock,
    /// Peers to send a handshake initiation at the next `handle_timeout`
    /// (see [`Core::greet`]).
    greet: Vec<Key>,
    /// When to send a peer a fresh initiation if none of its handshake
    /// messages ever reached us ([`Wg::reinitiate`]): a path to it opened.
    reshake: Vec<(Instant, Key)>,
    /// Peers ever greeted (the agent greets only peers it sees online): the
    /// ones whose greeting a relay link coming up may have to carry again.
    greeted: HashSet<Key>,
}

/// Datagram bytes exchanged with one peer through the relay (WireGuard and
/// disco, as sent: what the relay carried for this peer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Relayed {
    pub(crate) tx_bytes: u64,
    pub(crate) rx_bytes: u64,
}

/// What `status` shows of one peer's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PathView {
    pub(crate) route: Route,
    pub(crate) last_probe: Option<String>,
}

impl Core {
    /// A core with no peers. `unix_micros` is the wall clock at `now`
    /// ([`disco::unix_micros`] in the driver).
    pub(crate) fn new(private_key: PrivateKey, manage_paths: bool, now: Instant, unix_micros: u64) -> Self {
        Core {
            wg: Wg::new(&private_key, now),
            manage_paths,
            disco: disco::PeerBoxes::new(disco::DiscoKey::new(private_key)),
            paths: HashMap::new(),
            my_endpoints: Vec::new(),
            relay_up: false,
            stun_server: None,
            stun_tx: None,
            next_stun: now,
            stun_retry: STUN_RETRY,
            public_endpoint: None,
            events: VecDeque::new(),
            relayed: HashMap::new(),
            disco_counter: disco::Counter::default(),
            wall: WallClock { at: now, unix_micros },
            greet: Vec::new(),
            reshake: Vec::new(),
            greeted: HashSet::new(),
        }
    }

    /// The WireGuard core, for routing look-ups and `status`.
    pub(crate) fn wg(&self) -> &Wg {
        &self.wg
    }

    pub(crate) fn public_key(&self) -> Key {
        self.wg.public_key()
    }

    pub(crate) fn add_peer(&mut self, config: PeerConfig) -> Result<(), WgError> {
        let key = config.public_key;
        self.wg.add_peer(config)?;
        self.disco.learn(&key);
        Ok(())
    }

    /// Add a peer, or update its AllowedIPs/endpoint keeping its session.
    pub(crate) fn upsert_peer(&mut self, config: PeerConfig) -> Result<(), WgError> {
        let key = config.public_key;
        self.wg.upsert_peer(config)?;
        self.disco.learn(&key);
        Ok(())
    }

    /// Start a handshake with `key` at the next [`Core::handle_timeout`],
    /// without waiting for traffic. A node that just (re)started greets the
    /// peers it learns: a peer still holding a session with our previous
    /// process would otherwise send into it for WireGuard's 15 s
    /// (keepalive + rekey timeout) before noticing that nobody answers.
    pub(crate) fn greet(&mut self, key: &Key) {
        if self.wg.peer_id(key).is_some() && !self.greet.contains(key) {
            self.greet.push(*key);
            self.greeted.insert(*key);
        }
    }

    /// Forget a peer and its path state.
    pub(crate) fn remove_peer(&mut self, key: &Key) {
        self.wg.remove_peer(key);
        self.paths.remove(key);
        self.disco.forget(key);
        self.relayed.remove(key);
        self.greeted.remove(key);
    }

    /// Bytes exchanged with `key` through the relay so far.
    pub(crate) fn relayed(&self, key: &Key) -> Relayed {
        self.relayed.get(key).copied().unwrap_or_default()
    }

    /// Candidate endpoints for a peer, from the netmap (path management only).
    pub(crate) fn set_peer_endpoints(&mut self, key: &Key, endpoints: &[SocketAddr], now: Instant) {
        if self.manage_paths {
            let endpoints: Vec<SocketAddr> = endpoints.iter().map(|e| normalize(*e)).collect();
            self.paths.entry(*key).or_insert_with(|| PathState::new(now)).set_candidates(&endpoints, now);
        }
    }

    /// The candidate endpoints held for a peer, sorted.
    pub(crate) fn peer_candidates(&self, key: &Key) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.paths.get(key).map(|s| s.candidates().copied().collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// Our own endpoints, offered to peers in call-me-maybe.
    pub(crate) fn set_my_endpoints(&mut self, endpoints: Vec<SocketAddr>) {
        self.my_endpoints = endpoints;
    }

    /// Whether a relay link exists to send through.
    pub(crate) fn set_relay_up(&mut self, up: bool, now: Instant) {
        if up && !self.relay_up {
            for st in self.paths.values_mut() {
                st.relay_came_up(now);
            }
            // A greeting sent before the link existed went nowhere. Only
            // greeted peers: an initiation to one that is offline would be
            // retried by WireGuard for 90 s.
            self.reshake.extend(self.greeted.iter().map(|k| (now, *k)));
        }
        self.relay_up = up;
    }

    pub(crate) fn relay_up(&self) -> bool {
        self.relay_up
    }

    /// Ask this STUN server for our public endpoint now and every
    /// [`STUN_INTERVAL`] (`None`: stop).
    pub(crate) fn set_stun_server(&mut self, server: Option<SocketAddr>, now: Instant) {
        self.stun_server = server.map(normalize);
        self.stun_tx = None;
        self.next_stun = now;
        self.stun_retry = STUN_RETRY;
    }

    /// A network change: distrust every direct path and probe again.
    pub(crate) fn network_changed(&mut self, now: Instant) {
        for st in self.paths.values_mut() {
            st.reset(now);
        }
    }

    /// The path to a peer under path management (`None`: unmanaged).
    pub(crate) fn path(&self, key: &Key, now: Instant) -> Option<PathView> {
        let st = self.paths.get(key).filter(|_| self.manage_paths)?;
        Some(PathView { route: st.route(now), last_probe: st.last_result.clone() })
    }

    /// Next news for the driver.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Core::handle_timeout`] must run next.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let mut d = self.wg.next_deadline();
        if let Some(at) = self.reshake.iter().map(|(at, _)| *at).min() {
            d = d.min(at);
        }
        if self.manage_paths {
            let due = self.paths.values().filter_map(PathState::next_deadline).min();
            if let Some(p) = due {
                d = d.min(p);
            }
            if self.stun_server.is_some() {
                d = d.min(self.next_stun);
            }
        }
        d
    }

    /// Start handshakes with every peer that has an endpoint, so a static
    /// configuration comes up without waiting for traffic.
    pub(crate) fn start(&mut self, now: Instant, tx: &mut impl Transmit) {
        let Core { wg, .. } = self;
        let mut pending = Vec::new();
        wg.initiate_all(&mut |o| {
            if let Output::Network { peer, to, data } = o {
                pending.push((peer, to, data.to_vec()));
            }
        });
        for (peer, to, data) in pending {
            self.send(now, peer, to, &data, tx);
        }
    }

    /// Run WireGuard timers, probes and STUN that are due at `now`.
    pub(crate) fn handle_timeout(&mut self, now: Instant, tx: &mut impl Transmit) {
        let Core { wg, paths, manage_paths, relay_up, relayed, greet, reshake, .. } = self;
        let mut ctx = Dispatch { paths, manage_paths: *manage_paths, relay_up: *relay_up, relayed };
        let mut out = |o: Output<'_>| {
            if let Output::Network { peer, to, data } = o {
                ctx.send(now, peer, to, data, tx)
            }
        };
        wg.poll_timers(now, &mut out);
        for key in std::mem::take(greet) {
            wg.initiate(&key, &mut out);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(reshake).into_iter().partition(|(at, _)| *at <= now);
        *reshake = later;
        for (_, key) in due {
            wg.reinitiate(&key, &mut out);
        }
        self.poll_paths(now, tx);
    }

    /// Encrypt an IP packet from the stack and send it along its peer's path.
    pub(crate) fn send_ip(&mut self, now: Instant, packet: &[u8], tx: &mut impl Transmit) {
        let Core { wg, paths, manage_paths, relay_up, relayed, .. } = self;
        let mut ctx = Dispatch { paths, manage_paths: *manage_paths, relay_up: *relay_up, relayed };
        wg.send_ip(packet, &mut |o| {
            if let Output::Network { peer, to, data } = o {
                ctx.send(now, peer, to, data, tx)
            }
        });
    }

    /// A datagram from the relay, sent by the node `src` (the relay vouches
    /// for the sender's key; WireGuard and disco authenticate the content).
    pub(crate) fn handle_relay(&mut self, now: Instant, src: &Key, data: &[u8], tx: &mut impl Transmit) {
        if self.wg.peer_id(src).is_none() {
            return;
        }
        self.relayed.entry(*src).or_default().rx_bytes += data.len() as u64;
        self.handle(now, wg::RELAYED, data, tx);
    }

    /// A datagram from the UDP socket, from `from`.
    pub(crate) fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8], tx: &mut impl Transmit) {
        if from == wg::RELAYED {
            return; // 0.0.0.0:0 cannot be a real source; it means "relayed" inside.
        }
        self.handle(now, from, data, tx);
    }

    fn handle(&mut self, now: Instant, from: SocketAddr, data: &[u8], tx: &mut impl Transmit) {
        match disco::classify(data) {
            disco::DatagramKind::Disco => {
                if !self.manage_paths {
                    return;
                }
                if let Some(opened) = self.disco.open(data) {
                    self.on_disco(opened, from, now, tx);
                }
            }
            disco::DatagramKind::Stun => self.on_stun(now, from, data),
            _ => self.on_wireguard(now, from, data, tx),
        }
    }

    fn on_wireguard(&mut self, now: Instant, from: SocketAddr, data: &[u8], tx: &mut impl Transmit) {
        let Core { wg, paths, manage_paths, relay_up, relayed, .. } = self;
        let manage = *manage_paths;
        let mut ctx = Dispatch { paths, manage_paths: manage, relay_up: *relay_up, relayed };
        wg.recv_datagram(from, data, now, &mut |o| match o {
            // An answer to an authenticated handshake that came straight from
            // `from` goes straight back: that path just worked.
            Output::Network { peer: Some(key), to: Some(to), data } if to == from && from != wg::RELAYED => {
                ctx.direct_traffic(&key, from, now);
                tx.udp(from, data)
            }
            Output::Network { peer, to, data } => ctx.send(now, peer, to, data, tx),
            Output::Tunnel { key, packet, .. } => {
                if from != wg::RELAYED {
                    ctx.direct_traffic(&key, from, now);
                }
                tx.tunnel(&key, packet)
            }
        });
    }

    fn on_stun(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Some((txid, mapped)) = stun::parse_binding_response(data) else { return };
        // Only the answer to our outstanding request, from the server we asked.
        if self.stun_tx != Some(txid) || Some(from) != self.stun_server {
            return;
        }
        self.stun_tx = None;
        self.next_stun = now + STUN_INTERVAL;
        self.stun_retry = STUN_RETRY;
        if self.public_endpoint != Some(mapped) {
            self.public_endpoint = Some(mapped);
            self.events.push_back(Event::PublicEndpoint(mapped));
        }
    }

    fn seal(&mut self, to: &Key, msg: &disco::Message, now: Instant) -> Vec<u8> {
        let counter = self.disco_counter.next(self.wall.micros(now));
        self.disco.seal(to, counter, msg)
    }

    /// Handle an authenticated disco message that arrived from `from` (or via the relay).
    fn on_disco(&mut self, opened: disco::Opened, from: SocketAddr, now: Instant, tx: &mut impl Transmit) {
        let disco::Opened { sender, counter, msg } = opened;
        // Path and disco lines below (and in `path`) name the peer through
        // this span. Disco is rare next to data, so the span costs nothing
        // on the packet path.
        let _span = tracing::debug_span!("peer", peer = %ShortKey(sender)).entered();
        tracing::debug!(%from, ?msg, "disco");
        let Some(st) = self.paths.get_mut(&sender) else { return };
        if !st.accept_counter(counter) {
            tracing::debug!(%from, "replayed disco message dropped");
            return;
        }
        match msg {
            disco::Message::Ping { tx_id } => {
                // Pings only mean something on the path they took.
                if from != wg::RELAYED && st.on_ping(from, now) {
                    let pong = self.seal(&sender, &disco::Message::Pong { tx_id, observed: from }, now);
                    tx.udp(from, &pong);
                }
            }
            disco::Message::Pong { tx_id, observed } => {
                let was_direct = matches!(st.route(now), Route::Direct(_));
                if from != wg::RELAYED && st.on_pong(from, tx_id, now) {
                    tracing::debug!(%from, %observed, "direct path confirmed");
                    if !was_direct && matches!(st.route(now), Route::Direct(_)) {
                        // Both ends see the path open within a round trip;
                        // two initiations that cross leave both sides with
                        // only a responder session, which WireGuard sorts
                        // out after its 5 s rekey timeout. So the higher key
                        // waits, and by then has usually heard the other's.
                        let due = if self.wg.public_key() < sender { now } else { now + RESHAKE_DEFER };
                        self.reshake.push((due, sender));
                    }
                }
            }
            disco::Message::CallMeMaybe { endpoints } => {
                let endpoints: Vec<SocketAddr> = endpoints.into_iter().map(normalize).collect();
                if !st.on_call_me_maybe(&endpoints, now) {
                    tracing::debug!("call-me-maybe over the rate limit dropped");
                }
            }
        }
    }

    /// Send probes and STUN requests that are due.
    fn poll_paths(&mut self, now: Instant, tx: &mut impl Transmit) {
        if !self.manage_paths {
            return;
        }
        let mut actions = Vec::new();
        for (k, st) in self.paths.iter_mut() {
            // Timers only (`handle_timeout`), never per packet.
            let _span = tracing::debug_span!("peer", peer = %ShortKey(*k)).entered();
            for a in st.poll(now) {
                actions.push((*k, a));
            }
        }
        for (k, a) in actions {
            let _span = tracing::debug_span!("peer", peer = %ShortKey(k)).entered();
            match a {
                PathAction::Ping { to, tx_id } => {
                    tracing::trace!(%to, "ping");
                    let d = self.seal(&k, &disco::Message::Ping { tx_id }, now);
                    tx.udp(to, &d);
                }
                PathAction::Open { to } => {
                    tracing::debug!(%to, "opener");
                    tx.udp_hops(to, OPENER, OPENER_HOPS);
                }
                PathAction::CallMeMaybe => {
                    tracing::debug!(relay = self.relay_up, "call me maybe");
                    let mut sent = false;
                    if self.relay_up {
                        let d = self.seal(&k, &disco::Message::CallMeMaybe { endpoints: self.my_endpoints.clone() }, now);
                        sent = tx.relay(&k, &d);
                    }
                    // Before STUN answers, our pings would come from a public
                    // address the peer was never told (nor opened its NAT to).
                    let told = sent && (self.stun_server.is_none() || self.public_endpoint.is_some());
                    if !told && let Some(st) = self.paths.get_mut(&k) {
                        st.call_me_maybe_undelivered();
                    }
                }
            }
        }
        if let Some(server) = self.stun_server
            && now >= self.next_stun
        {
            let txid = stun::new_txid();
            self.stun_tx = Some(txid);
            tx.udp(server, &stun::encode_binding_request(txid));
            // The answer moves this to STUN_INTERVAL; until then, retry.
            self.next_stun = now + self.stun_retry;
            self.stun_retry = (self.stun_retry * 2).min(STUN_INTERVAL);
        }
    }

    fn send(&mut self, now: Instant, peer: Option<Key>, to: Option<SocketAddr>, data: &[u8], tx: &mut impl Transmit) {
        let Core { paths, manage_paths, relay_up, relayed, .. } = self;
        Dispatch { paths, manage_paths: *manage_paths, relay_up: *relay_up, relayed }.send(now, peer, to, data, tx)
    }
}

/// The part of the core that routes WireGuard output, borrowed apart from
/// the `Wg` that produces it.
struct Dispatch<'a> {
    paths: &'a mut HashMap<Key, PathState>,
    manage_paths: bool,
    relay_up: bool,
    relayed: &'a mut HashMap<Key, Relayed>,
}

impl Dispatch<'_> {
    fn dest(&self, peer: Option<Key>, to: Option<SocketAddr>, now: Instant) -> Dest {
        if self.manage_paths
            && let Some(k) = peer
        {
            if to == Some(wg::RELAYED) {
                return Dest::Relay(k);
            }
            if let Some(st) = self.paths.get(&k) {
                return match st.route(now) {
                    Route::Direct(a) => Dest::Udp(a),
                    Route::Relay if self.relay_up => Dest::Relay(k),
                    // No relay: best effort straight at what WireGuard knows,
                    // under the same address and timing rules as probes.
                    Route::Relay => to.filter(|a| is_valid_endpoint(a) && st.may_send_unproven(now)).map_or(Dest::Nowhere, Dest::Udp),
                };
            }
        }
        match to {
            Some(a) if a != wg::RELAYED => Dest::Udp(a),
            _ => Dest::Nowhere,
        }
    }

    /// Send one WireGuard output along the path chosen for its peer.
    fn send(&mut self, now: Instant, peer: Option<Key>, to: Option<SocketAddr>, data: &[u8], tx: &mut impl Transmit) {
        match self.dest(peer, to, now) {
            Dest::Udp(a) => tx.udp(a, data),
            Dest::Relay(k) => {
                if tx.relay(&k, data) {
                    self.relayed.entry(k).or_default().tx_bytes += data.len() as u64;
                }
            }
            Dest::Nowhere => {}
        }
    }

    /// Authenticated WireGuard traffic arrived straight from `from`.
    fn direct_traffic(&mut self, key: &Key, from: SocketAddr, now: Instant) {
        if self.manage_paths
            && let Some(st) = self.paths.get_mut(key)
        {
            st.on_direct_traffic(from, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wg::generate_private_key;

    fn peer(key: Key, last: u8) -> PeerConfig {
        PeerConfig {
            public_key: key,
            preshared_key: None,
            allowed_ips: vec![ipnet::IpNet::from(std::net::IpAddr::from([100, 64, 0, last]))],
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    #[test]
    fn disco_boxes_follow_the_wireguard_peers() {
        let now = Instant::now();
        let ours = generate_private_key();
        let our_pub = wg::public_key_of(&ours);
        let mut core = Core::new(ours, true, now, 1);
        let (old, new) = (disco::DiscoKey::new(generate_private_key()), disco::DiscoKey::new(generate_private_key()));
        let ping = disco::Message::Ping { tx_id: [1; 12] };
        let from_old = disco::seal(&old, &our_pub, 1, &ping);
        assert_eq!(core.disco.open(&from_old), None, "not a peer yet");
        core.add_peer(peer(*old.public(), 2)).unwrap();
        assert!(core.disco.open(&from_old).is_some());
        core.upsert_peer(peer(*old.public(), 3)).unwrap();
        assert!(core.disco.open(&from_old).is_some(), "an update keeps the box");
        // A key rotation reaches the core as remove + add.
        core.remove_peer(old.public());
        assert_eq!(core.disco.open(&from_old), None, "a removed peer's box is gone");
        core.upsert_peer(peer(*new.public(), 2)).unwrap();
        assert_eq!(core.disco.open(&from_old), None);
        let from_new = disco::seal(&new, &our_pub, 2, &ping);
        assert_eq!(core.disco.open(&from_new).map(|o| o.counter), Some(2));
        let to_new = core.seal(new.public(), &ping, now);
        assert!(disco::open(&new, &to_new, |k| *k == our_pub).is_some());
        assert_eq!(disco::open(&old, &to_new, |k| *k == our_pub), None);
    }
}
