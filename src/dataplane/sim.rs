//! A simulated network for [`Core`], in simulated time.
//!
//! Hosts sit behind NATs of the usual kinds ([`Nat`]) on separate private
//! LANs, reach each other over links with a latency and a loss rate, ask one
//! STUN server for their public endpoint, and can always (unless it is cut)
//! reach one relay, which forwards frames by node key. A "control" step plays
//! the coordination server: whatever endpoint STUN reports for a host
//! becomes a candidate at every other host, as the netmap does.
//!
//! Everything runs in one thread on a clock the simulation advances: a
//! minute of probing takes milliseconds, and a run is reproducible (loss
//! comes from a seeded generator). Only boringtun's internal clock still
//! reads real time, so scenarios never depend on WireGuard's own retry
//! timers (a lost handshake would not be retried).
#![warn(missing_docs)]

#[cfg(test)]
mod scenarios;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::dataplane::core::{Core, Event, Transmit};
use crate::dataplane::path::Route;
use crate::dataplane::wg::{self, PeerConfig};
use crate::key::{Key, PrivateKey};

/// How a host's NAT maps and filters UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nat {
    /// Endpoint-independent mapping and filtering: once mapped, anyone can send in.
    FullCone,
    /// Endpoint-independent mapping; only addresses the host sent to may answer.
    PortRestricted,
    /// A new public port per destination; only that destination may answer.
    Symmetric,
    /// No UDP in or out (only the relay, over TCP, works).
    UdpBlocked,
    /// Linux `masquerade` on a router without an input firewall: the port
    /// is kept per destination, only that destination may answer, and a
    /// datagram that arrives before we sent to its source is kept as a flow
    /// to the router, so our own first datagram to that source then clashes
    /// and leaves from a new port.
    Masquerade,
}

/// How a packet reached the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    Direct,
    Relay,
}

/// The STUN server's public address.
pub(crate) const STUN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
/// The port every host's socket binds on its LAN.
const LOCAL_PORT: u16 = 41641;

pub(crate) struct Host {
    pub(crate) core: Core,
    pub(crate) private_key: PrivateKey,
    pub(crate) key: Key,
    /// The host's tailnet address (100.64.0.x).
    pub(crate) tailnet_ip: Ipv4Addr,
    /// The socket on its private LAN.
    pub(crate) local: SocketAddr,
    pub(crate) nat: Nat,
    pub(crate) public_ip: Ipv4Addr,
    /// NAT mappings: destination (`None`: endpoint-independent) -> public port.
    mappings: HashMap<Option<SocketAddr>, u16>,
    /// (public port, remote) pairs the NAT lets in under port-restricted filtering.
    permits: HashSet<(u16, SocketAddr)>,
    /// (public port, remote) flows a [`Nat::Masquerade`] router keeps to itself.
    inbound: HashSet<(u16, SocketAddr)>,
    next_port: u16,
    /// Tailnet packets the stack received, with the path they came by.
    pub(crate) received: Vec<(Via, Vec<u8>)>,
    pub(crate) stun_endpoint: Option<SocketAddr>,
}

/// Something on the wire.
#[derive(Clone, Debug)]
enum Frame {
    Udp { from: SocketAddr, to: SocketAddr, data: Vec<u8> },
    Relay { src: Key, dst: Key, data: Vec<u8> },
}

/// One datagram the simulation saw leave a NAT (for assertions).
#[derive(Clone, Debug)]
pub(crate) struct Wire {
    pub(crate) from: SocketAddr,
    pub(crate) to: SocketAddr,
    pub(crate) data: Vec<u8>,
}

pub(crate) struct Sim {
    pub(crate) now: Instant,
    pub(crate) hosts: Vec<Host>,
    in_flight: BTreeMap<(Instant, u64), Frame>,
    seq: u64,
    pub(crate) latency: Duration,
    pub(crate) relay_latency: Duration,
    /// Chance in a million that a UDP datagram is lost.
    pub(crate) loss_ppm: u32,
    rng: u64,
    /// The relay forwards frames (false: it is down and drops them).
    pub(crate) relay_up: bool,
    /// Direct UDP between hosts is cut (STUN still works).
    pub(crate) direct_cut: bool,
    /// Every UDP datagram that left a NAT.
    pub(crate) wire: Vec<Wire>,
}

/// Collects one host's output during one call into the core.
#[derive(Default)]
struct Out {
    udp: Vec<(SocketAddr, Vec<u8>)>,
    /// Openers: they pass the host's own NAT and die on the wire after it.
    openers: Vec<SocketAddr>,
    relay: Vec<(Key, Vec<u8>)>,
    tunnel: Vec<Vec<u8>>,
    relay_up: bool,
}

impl Transmit for Out {
    fn udp(&mut self, to: SocketAddr, data: &[u8]) {
        self.udp.push((to, data.to_vec()));
    }
    fn udp_hops(&mut self, to: SocketAddr, _data: &[u8], _hops: u8) {
        self.openers.push(to);
    }
    fn relay(&mut self, to: &Key, data: &[u8]) -> bool {
        if self.relay_up {
            self.relay.push((*to, data.to_vec()));
        }
        self.relay_up
    }
    fn tunnel(&mut self, _peer: &Key, packet: &[u8]) {
        self.tunnel.push(packet.to_vec());
    }
}

/// A minimal IPv4/UDP packet: enough for WireGuard's routing and checks.
pub(crate) fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let len = 20 + payload.len();
    let mut p = vec![0x45, 0, (len >> 8) as u8, len as u8, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

impl Sim {
    /// A network of hosts behind `nats`, all peers of each other, with
    /// path management on and the relay connected. No endpoints are known
    /// yet: traffic starts on the relay until [`Sim::enable_stun`].
    pub(crate) fn new(nats: &[Nat]) -> Sim {
        let now = Instant::now();
        let keys: Vec<PrivateKey> = nats.iter().map(|_| wg::generate_private_key()).collect();
        let mut hosts: Vec<Host> = Vec::new();
        for (i, nat) in nats.iter().enumerate() {
            let n = i as u8 + 1;
            let mut core = Core::new(keys[i].clone(), true, now, 1_700_000_000_000_000);
            core.set_relay_up(true, now);
            hosts.push(Host {
                core,
                private_key: keys[i].clone(),
                key: wg::public_key_of(&keys[i]),
                tailnet_ip: Ipv4Addr::new(100, 64, 0, n),
                local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, n, 0, 2)), LOCAL_PORT),
                nat: *nat,
                public_ip: Ipv4Addr::new(203, 0, 113, n),
                mappings: HashMap::new(),
                permits: HashSet::new(),
                inbound: HashSet::new(),
                next_port: 20000,
                received: Vec::new(),
                stun_endpoint: None,
            });
        }
        for i in 0..hosts.len() {
            for j in 0..hosts.len() {
                if i == j {
                    continue;
                }
                let cfg = PeerConfig {
                    public_key: hosts[j].key,
                    preshared_key: None,
                    allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(hosts[j].tailnet_ip))],
                    endpoint: None,
                    persistent_keepalive: None,
                };
                hosts[i].core.add_peer(cfg).expect("distinct peers");
                let peer = hosts[j].key;
                hosts[i].core.set_peer_endpoints(&peer, &[], now);
            }
        }
        Sim {
            now,
            hosts,
            in_flight: BTreeMap::new(),
            seq: 0,
            latency: Duration::from_millis(20),
            relay_latency: Duration::from_millis(40),
            loss_ppm: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
            relay_up: true,
            direct_cut: false,
            wire: Vec::new(),
        }
    }

    /// Start every host's STUN queries (the control server tells nodes where
    /// its STUN port is); answers become candidates at the other hosts.
    pub(crate) fn enable_stun(&mut self) {
        let now = self.now;
        for i in 0..self.hosts.len() {
            self.hosts[i].core.set_stun_server(Some(STUN), now);
            let local = self.hosts[i].local;
            self.hosts[i].core.set_my_endpoints(vec![local]);
        }
        self.control();
    }

    /// The coordination server's part: publish each host's endpoints (its
    /// LAN socket and what STUN saw) to every other host.
    fn control(&mut self) {
        let now = self.now;
        let eps: Vec<Vec<SocketAddr>> = self.hosts.iter().map(|h| std::iter::once(h.local).chain(h.stun_endpoint).collect()).collect();
        for i in 0..self.hosts.len() {
            let mine = eps[i].clone();
            self.hosts[i].core.set_my_endpoints(mine);
            for (j, e) in eps.iter().enumerate() {
                if i != j {
                    let k = self.hosts[j].key;
                    self.hosts[i].core.set_peer_endpoints(&k, e, now);
                }
            }
        }
    }

    /// The route host `i` uses for host `j` now.
    pub(crate) fn route(&self, i: usize, j: usize) -> Route {
        self.hosts[i].core.path(&self.hosts[j].key, self.now).expect("managed peer").route
    }

    /// Where host `i`'s NAT currently maps its socket for `to` (`None`:
    /// nothing mapped yet).
    pub(crate) fn public_addr(&self, i: usize, to: SocketAddr) -> Option<SocketAddr> {
        let h = &self.hosts[i];
        let key = if matches!(h.nat, Nat::Symmetric | Nat::Masquerade) { Some(to) } else { None };
        h.mappings.get(&key).map(|p| SocketAddr::new(IpAddr::V4(h.public_ip), *p))
    }

    /// The NAT of host `i` forgets its mappings (a rebinding: the host now
    /// appears from new public ports).
    pub(crate) fn rebind(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.mappings.clear();
        h.permits.clear();
        h.inbound.clear();
        h.next_port += 1000;
    }

    /// Host `i` restarts: a fresh core with the same key (so no WireGuard
    /// session), its socket mapped anew by the NAT, the peers re-learned from
    /// "control". With `greet`, it greets them the way the agent does.
    pub(crate) fn restart(&mut self, i: usize, greet: bool) {
        let now = self.now;
        let had_stun = self.hosts[i].stun_endpoint.is_some();
        let mut core = Core::new(self.hosts[i].private_key.clone(), true, now, 1_700_000_000_000_000);
        core.set_relay_up(true, now);
        for j in (0..self.hosts.len()).filter(|j| *j != i) {
            let cfg = PeerConfig {
                public_key: self.hosts[j].key,
                preshared_key: None,
                allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(self.hosts[j].tailnet_ip))],
                endpoint: None,
                persistent_keepalive: None,
            };
            core.add_peer(cfg).expect("distinct peers");
            core.set_peer_endpoints(&self.hosts[j].key, &[], now);
            if greet {
                core.greet(&self.hosts[j].key);
            }
        }
        self.hosts[i].core = core;
        self.hosts[i].stun_endpoint = None;
        self.rebind(i);
        if had_stun {
            self.hosts[i].core.set_stun_server(Some(STUN), now);
        }
        self.control();
    }

    /// Host `i`'s stack sends `payload` to host `j`'s tailnet address.
    pub(crate) fn send(&mut self, i: usize, j: usize, payload: &[u8]) {
        let p = ipv4(self.hosts[i].tailnet_ip, self.hosts[j].tailnet_ip, payload);
        let now = self.now;
        self.with_core(i, |core, out| core.send_ip(now, &p, out), Via::Direct);
    }

    /// Hand host `i` a datagram from `from` as if it came off its socket, and
    /// return what the core sent in reply (before any NAT).
    pub(crate) fn inject(&mut self, i: usize, from: SocketAddr, data: &[u8]) -> Vec<(SocketAddr, Vec<u8>)> {
        let now = self.now;
        let mut out = Out { relay_up: self.relay_up, ..Out::default() };
        self.hosts[i].core.handle_datagram(now, from, data, &mut out);
        out.udp
    }

    fn with_core(&mut self, i: usize, f: impl FnOnce(&mut Core, &mut Out), via: Via) {
        let mut out = Out { relay_up: self.relay_up, ..Out::default() };
        f(&mut self.hosts[i].core, &mut out);
        let mut stun_changed = false;
        while let Some(ev) = self.hosts[i].core.poll_event() {
            let Event::PublicEndpoint(a) = ev;
            self.hosts[i].stun_endpoint = Some(a);
            stun_changed = true;
        }
        for p in out.tunnel {
            self.hosts[i].received.push((via, p));
        }
        for to in out.openers {
            self.nat_out(i, to);
        }
        for (to, data) in out.udp {
            self.egress(i, to, data);
        }
        for (dst, data) in out.relay {
            let src = self.hosts[i].key;
            self.schedule(self.relay_latency, Frame::Relay { src, dst, data });
        }
        if stun_changed {
            self.control();
            // As the agent does when its endpoints change.
            let now = self.now;
            self.hosts[i].core.network_changed(now);
        }
    }

    fn schedule(&mut self, after: Duration, f: Frame) {
        self.seq += 1;
        self.in_flight.insert((self.now + after, self.seq), f);
    }

    fn lost(&mut self) -> bool {
        // xorshift64: reproducible, and good enough to drop packets.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1_000_000) < u64::from(self.loss_ppm)
    }

    /// A datagram leaves host `i` for `to`: through its NAT onto the wire.
    fn egress(&mut self, i: usize, to: SocketAddr, data: Vec<u8>) {
        let Some(from) = self.nat_out(i, to) else { return };
        self.wire.push(Wire { from, to, data: data.clone() });
        self.put_on_wire(from, to, data);
    }

    /// Host `i`'s NAT maps a datagram for `to`: the public source it leaves
    /// with, `None` if it goes nowhere.
    fn nat_out(&mut self, i: usize, to: SocketAddr) -> Option<SocketAddr> {
        let h = &mut self.hosts[i];
        if h.nat == Nat::UdpBlocked {
            return None;
        }
        if to.ip().is_ipv4() && matches!(to.ip(), IpAddr::V4(a) if a.is_private()) {
            // Another LAN's private address: every host has its own LAN.
            return None;
        }
        let key = if matches!(h.nat, Nat::Symmetric | Nat::Masquerade) { Some(to) } else { None };
        let port = match h.mappings.get(&key) {
            Some(p) => *p,
            // Linux masquerade keeps the port unless the flow would clash
            // with one the router already keeps toward itself.
            None if h.nat == Nat::Masquerade && !h.inbound.contains(&(LOCAL_PORT, to)) => {
                h.mappings.insert(key, LOCAL_PORT);
                LOCAL_PORT
            }
            None => {
                h.next_port += 1;
                h.mappings.insert(key, h.next_port);
                h.next_port
            }
        };
        h.permits.insert((port, to));
        Some(SocketAddr::new(IpAddr::V4(h.public_ip), port))
    }

    /// Send a datagram from an address on the Internet (not behind a NAT).
    pub(crate) fn put_on_wire(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        if self.lost() {
            return;
        }
        self.schedule(self.latency, Frame::Udp { from, to, data });
    }

    /// A datagram arrives at public address `to`.
    fn arrive(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        if to == STUN {
            if let Some(answer) = crate::dataplane::stun::answer_binding_request(&data, from) {
                self.put_on_wire(STUN, from, answer);
            }
            return;
        }
        let Some(i) = self.hosts.iter().position(|h| IpAddr::V4(h.public_ip) == to.ip()) else { return };
        if self.direct_cut && from != STUN {
            return;
        }
        let h = &self.hosts[i];
        let admitted = match h.nat {
            Nat::UdpBlocked => false,
            Nat::FullCone => h.mappings.values().any(|p| *p == to.port()),
            Nat::PortRestricted => h.permits.contains(&(to.port(), from)),
            Nat::Symmetric | Nat::Masquerade => h.mappings.get(&Some(from)) == Some(&to.port()),
        };
        if !admitted {
            if h.nat == Nat::Masquerade {
                // No input firewall: kept as a flow to the router itself.
                self.hosts[i].inbound.insert((to.port(), from));
            }
            return;
        }
        let now = self.now;
        self.with_core(i, |core, out| core.handle_datagram(now, from, &data, out), Via::Direct);
    }

    fn deliver(&mut self, f: Frame) {
        match f {
            Frame::Udp { from, to, data } => self.arrive(from, to, data),
            Frame::Relay { src, dst, data } => {
                if !self.relay_up {
                    return;
                }
                let Some(i) = self.hosts.iter().position(|h| h.key == dst) else { return };
                let now = self.now;
                self.with_core(i, |core, out| core.handle_relay(now, &src, &data, out), Via::Relay);
            }
        }
    }

    /// Advance the clock by `d`, delivering frames and running timers in order.
    pub(crate) fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_frame = self.in_flight.keys().next().map(|(t, _)| *t);
            let next_timer = self.hosts.iter().map(|h| h.core.poll_timeout()).min();
            let next = [next_frame, next_timer].into_iter().flatten().min().unwrap_or(end);
            if next > end {
                break;
            }
            // A deadline in the past runs now; time never goes backwards.
            self.now = self.now.max(next);
            while let Some(entry) = self.in_flight.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let f = entry.remove();
                self.deliver(f);
            }
            let now = self.now;
            for i in 0..self.hosts.len() {
                if self.hosts[i].core.poll_timeout() <= now {
                    self.with_core(i, |core, out| core.handle_timeout(now, out), Via::Direct);
                    if self.hosts[i].core.poll_timeout() <= now {
                        // A timer that does not move would spin; that is a core bug.
                        panic!("host {i}: poll_timeout() did not advance past {now:?} after handle_timeout");
                    }
                }
            }
        }
        self.now = end;
    }

    /// Tailnet packets host `i` received with `payload`, by path.
    pub(crate) fn received(&self, i: usize, payload: &[u8]) -> Vec<Via> {
        self.hosts[i].received.iter().filter(|(_, p)| p.ends_with(payload)).map(|(v, _)| *v).collect()
    }
}
