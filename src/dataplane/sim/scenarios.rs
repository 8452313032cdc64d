//! Path scenarios on the simulated network, in simulated time.
#![warn(missing_docs)]

use std::time::Duration;

use super::{Nat, STUN, Sim, Via};
use crate::dataplane::disco;
use crate::dataplane::path::{Route, TRUST};

const A: usize = 0;
const B: usize = 1;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Send a packet each way with a distinct payload and let it arrive; return
/// how it reached each side.
fn exchange(sim: &mut Sim, tag: &str) -> (Vec<Via>, Vec<Via>) {
    let ab = format!("{tag} a->b");
    let ba = format!("{tag} b->a");
    sim.send(A, B, ab.as_bytes());
    sim.send(B, A, ba.as_bytes());
    sim.run_for(Duration::from_millis(500));
    (sim.received(B, ab.as_bytes()), sim.received(A, ba.as_bytes()))
}

/// Both sides on the relay with a WireGuard session, before any endpoint is known.
fn on_relay(nats: &[Nat]) -> Sim {
    let mut sim = Sim::new(nats);
    assert_eq!(sim.route(A, B), Route::Relay);
    let (at_b, at_a) = exchange(&mut sim, "hello");
    assert_eq!(at_b, vec![Via::Relay], "the first packet goes through the relay");
    assert_eq!(at_a, vec![Via::Relay]);
    sim
}

fn direct_to(sim: &Sim, i: usize, j: usize) -> Route {
    let addr = sim.public_addr(j, sim.hosts[i].local).or_else(|| sim.hosts[j].stun_endpoint).expect("j has a public mapping");
    Route::Direct(addr)
}

/// Relay first, direct once STUN endpoints are exchanged and probes prove the path.
fn upgraded(nats: &[Nat]) -> Sim {
    let mut sim = on_relay(nats);
    sim.enable_stun();
    sim.run_for(secs(3));
    assert!(sim.hosts[A].stun_endpoint.is_some() && sim.hosts[B].stun_endpoint.is_some(), "STUN answered");
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    assert_eq!(sim.route(B, A), direct_to(&sim, B, A));
    let (at_b, at_a) = exchange(&mut sim, "upgraded");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(at_a, vec![Via::Direct]);
    sim
}

#[test]
fn direct_upgrade_from_relay() {
    upgraded(&[Nat::FullCone, Nat::PortRestricted]);
}

#[test]
fn direct_upgrade_survives_some_loss() {
    let mut sim = on_relay(&[Nat::FullCone, Nat::FullCone]);
    sim.loss_ppm = 100_000; // 10% of UDP datagrams (probes, STUN, data) vanish.
    sim.enable_stun();
    let mut direct_at = None;
    for step in 0..80 {
        sim.run_for(Duration::from_millis(250));
        if sim.hosts[B].stun_endpoint.is_some() && sim.route(A, B) == direct_to(&sim, A, B) {
            direct_at = Some(step);
            break;
        }
    }
    assert!(
        direct_at.is_some(),
        "no direct path within 20 s at 10% loss: stun {:?} {:?} route {:?}",
        sim.hosts[A].stun_endpoint,
        sim.hosts[B].stun_endpoint,
        sim.route(A, B)
    );
    // Once there, keepalives (one lost now and then) hold it.
    let mut direct = 0;
    for _ in 0..40 {
        sim.run_for(Duration::from_millis(500));
        direct += usize::from(matches!(sim.route(A, B), Route::Direct(_)));
    }
    assert!(direct >= 36, "direct only {direct} of 40 samples");
}

#[test]
fn downgrade_to_relay_when_the_direct_path_dies_and_back_when_it_returns() {
    let mut sim = upgraded(&[Nat::FullCone, Nat::FullCone]);
    sim.direct_cut = true;
    sim.run_for(TRUST + secs(1));
    assert_eq!(sim.route(A, B), Route::Relay);
    assert_eq!(sim.route(B, A), Route::Relay);
    let (at_b, at_a) = exchange(&mut sim, "cut");
    assert_eq!(at_b, vec![Via::Relay]);
    assert_eq!(at_a, vec![Via::Relay]);

    sim.direct_cut = false;
    sim.run_for(secs(10));
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    let (at_b, _) = exchange(&mut sim, "healed");
    assert_eq!(at_b, vec![Via::Direct]);
}

#[test]
fn roaming_peer_is_followed_to_its_new_address() {
    let mut sim = upgraded(&[Nat::FullCone, Nat::FullCone]);
    let old = sim.public_addr(B, sim.hosts[A].local).unwrap();
    sim.rebind(B);
    // B keeps talking; A sees it from a new port.
    sim.send(B, A, b"from the new port");
    sim.run_for(TRUST + secs(2));
    let new = sim.public_addr(B, sim.hosts[A].local).unwrap();
    assert_ne!(old, new);
    assert_eq!(sim.route(A, B), Route::Direct(new));
    let mark = sim.wire.len();
    let (at_b, at_a) = exchange(&mut sim, "roamed");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(at_a, vec![Via::Direct]);
    // Probes may still try the old address; tunnel traffic must not.
    let late = sim.wire[mark..].iter().filter(|w| w.to == old && !disco::is_disco(&w.data)).count();
    assert_eq!(late, 0, "WireGuard traffic still goes to B's old address");
}

#[test]
fn a_restarted_peer_greets_and_traffic_resumes_at_once() {
    // Without the greeting, A keeps sending into the session B's previous
    // process held: B drops it, and only WireGuard's 15 s timeout (real time,
    // so never here) would start over.
    let mut sim = upgraded(&[Nat::FullCone, Nat::PortRestricted]);
    sim.restart(B, false);
    sim.send(A, B, b"into the old session");
    sim.run_for(secs(1));
    assert!(sim.received(B, b"into the old session").is_empty(), "B cannot read its previous session");

    let mut sim = upgraded(&[Nat::FullCone, Nat::PortRestricted]);
    sim.restart(B, true);
    sim.run_for(secs(1));
    let (at_b, at_a) = exchange(&mut sim, "after restart");
    assert_eq!(at_b.len(), 1, "A's first packet after the restart arrives");
    assert_eq!(at_a.len(), 1);
    // And the pair finds its direct path again, at B's new mapping.
    sim.run_for(secs(5));
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    let (at_b, _) = exchange(&mut sim, "direct again");
    assert_eq!(at_b, vec![Via::Direct]);
}

#[test]
fn a_greeting_lost_before_any_path_is_sent_again_when_the_direct_path_opens() {
    // A node that just joined greets its peers before either path exists
    // (here: the relay drops it). WireGuard resends only after its 5 s
    // rekey timeout (real time, so never here), and the first connection
    // would wait that long behind the lost initiation.
    let mut sim = Sim::new(&[Nat::FullCone, Nat::PortRestricted]);
    sim.relay_up = false;
    let b = sim.hosts[B].key;
    sim.hosts[A].core.greet(&b);
    sim.send(A, B, b"first");
    sim.run_for(secs(1));
    assert!(sim.received(B, b"first").is_empty(), "no path carried the greeting");
    sim.enable_stun();
    sim.run_for(secs(3));
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    assert_eq!(sim.received(B, b"first"), vec![Via::Direct], "the packet queued behind the lost handshake arrived");
    let (at_b, at_a) = exchange(&mut sim, "then");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(at_a, vec![Via::Direct]);
}

#[test]
fn a_greeting_sent_before_the_relay_link_is_sent_again_when_it_comes_up() {
    // A has no UDP at all, and its relay link is not up yet when it greets.
    let mut sim = Sim::new(&[Nat::UdpBlocked, Nat::FullCone]);
    let now = sim.now;
    sim.hosts[A].core.set_relay_up(false, now);
    let b = sim.hosts[B].key;
    sim.hosts[A].core.greet(&b);
    sim.send(A, B, b"first");
    sim.run_for(secs(1));
    assert!(sim.received(B, b"first").is_empty(), "no path yet");
    let now = sim.now;
    sim.hosts[A].core.set_relay_up(true, now);
    sim.run_for(secs(1));
    assert_eq!(sim.received(B, b"first"), vec![Via::Relay], "the packet queued behind the lost handshake arrived");
}

#[test]
fn relay_loss_and_recovery() {
    // Relay only (A has no UDP): an outage loses packets, recovery resumes them.
    let mut sim = on_relay(&[Nat::UdpBlocked, Nat::FullCone]);
    sim.relay_up = false;
    let (at_b, at_a) = exchange(&mut sim, "outage");
    assert!(at_b.is_empty() && at_a.is_empty(), "nothing crosses a dead relay");
    sim.run_for(secs(5));
    sim.relay_up = true;
    let (at_b, at_a) = exchange(&mut sim, "recovered");
    assert_eq!(at_b, vec![Via::Relay]);
    assert_eq!(at_a, vec![Via::Relay]);

    // With a direct path, losing the relay changes nothing: keepalives hold it.
    let mut sim = upgraded(&[Nat::FullCone, Nat::FullCone]);
    sim.relay_up = false;
    sim.run_for(secs(30));
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    let (at_b, at_a) = exchange(&mut sim, "no relay");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(at_a, vec![Via::Direct]);
}

#[test]
fn replayed_probes_are_rejected() {
    let mut sim = upgraded(&[Nat::FullCone, Nat::FullCone]);
    let b_pub = sim.public_addr(B, STUN).unwrap();
    let ping = sim.wire.iter().rev().find(|w| w.to == b_pub && disco::is_disco(&w.data)).expect("A pinged B").clone();
    let attacker: std::net::SocketAddr = "198.51.100.66:5555".parse().unwrap();
    let a_key = sim.hosts[A].key;

    // The same ping again, from where it came and from elsewhere: no pong, no new candidate.
    assert!(sim.inject(B, ping.from, &ping.data).is_empty(), "a replayed ping got an answer");
    assert!(sim.inject(B, attacker, &ping.data).is_empty(), "a replayed ping got an answer");
    assert!(!sim.hosts[B].core.peer_candidates(&a_key).contains(&attacker));

    // Control: a fresh ping sealed with A's key is answered, so the check above is about replay.
    let b_key = sim.hosts[B].key;
    let fresh = disco::seal(
        &disco::DiscoKey::new(sim.hosts[A].private_key.clone()),
        &b_key,
        u64::MAX / 2,
        &disco::Message::Ping { tx_id: [7; 12] },
    );
    let answers = sim.inject(B, attacker, &fresh);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, attacker);
    // ... and once more it is a replay.
    assert!(sim.inject(B, attacker, &fresh).is_empty());
}

#[test]
fn symmetric_nat_against_port_restricted_stays_on_relay() {
    let mut sim = on_relay(&[Nat::Symmetric, Nat::PortRestricted]);
    sim.enable_stun();
    for _ in 0..60 {
        sim.run_for(Duration::from_millis(500));
        assert_eq!(sim.route(A, B), Route::Relay);
        assert_eq!(sim.route(B, A), Route::Relay);
    }
    let pings = sim.wire.iter().filter(|w| w.to != STUN && disco::is_disco(&w.data)).count();
    assert!(pings > 10, "both sides kept probing ({pings} pings)");
    let (at_b, at_a) = exchange(&mut sim, "symmetric");
    assert_eq!(at_b, vec![Via::Relay]);
    assert_eq!(at_a, vec![Via::Relay]);
}

#[test]
fn symmetric_nat_against_full_cone_goes_direct() {
    // The sim's NATs are not simply hostile: a symmetric NAT can still reach
    // a full-cone peer, which learns its per-destination port from the pings.
    let mut sim = on_relay(&[Nat::Symmetric, Nat::FullCone]);
    sim.enable_stun();
    sim.run_for(secs(10));
    assert!(matches!(sim.route(A, B), Route::Direct(_)));
    assert!(matches!(sim.route(B, A), Route::Direct(_)));
    let (at_b, at_a) = exchange(&mut sim, "mixed");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(at_a, vec![Via::Direct]);
}

#[test]
fn relayed_bytes_are_counted_per_peer_until_the_path_goes_direct() {
    let mut sim = on_relay(&[Nat::FullCone, Nat::PortRestricted]);
    let (kb, ka) = (sim.hosts[B].key, sim.hosts[A].key);
    let (a, b) = (sim.hosts[A].core.relayed(&kb), sim.hosts[B].core.relayed(&ka));
    assert!(a.tx_bytes > 0 && a.rx_bytes > 0, "{a:?}");
    assert_eq!((a.tx_bytes, a.rx_bytes), (b.rx_bytes, b.tx_bytes), "what one sent through the relay the other received");
    sim.enable_stun();
    sim.run_for(secs(3));
    let before = sim.hosts[A].core.relayed(&kb);
    let (at_b, _) = exchange(&mut sim, "direct now");
    assert_eq!(at_b, vec![Via::Direct]);
    assert_eq!(sim.hosts[A].core.relayed(&kb), before, "direct traffic is not counted as relayed");
}

#[test]
fn udp_blocked_stays_on_relay() {
    let mut sim = on_relay(&[Nat::UdpBlocked, Nat::FullCone]);
    sim.enable_stun();
    sim.run_for(secs(30));
    assert_eq!(sim.hosts[A].stun_endpoint, None, "no STUN without UDP");
    assert_eq!(sim.route(A, B), Route::Relay);
    assert_eq!(sim.route(B, A), Route::Relay);
    let (at_b, at_a) = exchange(&mut sim, "blocked");
    assert_eq!(at_b, vec![Via::Relay]);
    assert_eq!(at_a, vec![Via::Relay]);
}

#[test]
fn a_peer_without_endpoints_does_not_make_the_core_spin() {
    // `run_for` panics if handle_timeout leaves poll_timeout in the past.
    let mut sim = Sim::new(&[Nat::FullCone, Nat::FullCone]);
    sim.run_for(secs(5));
}

#[test]
fn masquerade_on_both_sides_goes_direct() {
    // Routers that keep an early probe as a flow to themselves: a ping may
    // only arrive once the peer's own NAT has mapped our address (its
    // opener), or the peer's answers leave from a port we never hear of.
    let mut sim = upgraded(&[Nat::Masquerade, Nat::Masquerade]);
    for i in [A, B] {
        assert_eq!(sim.hosts[i].stun_endpoint.map(|e| e.port()), Some(41641), "masquerade keeps the port");
    }
    let (at_b, at_a) = exchange(&mut sim, "masq");
    assert_eq!((at_b, at_a), (vec![Via::Direct], vec![Via::Direct]));
}

#[test]
fn masquerade_peer_that_probes_before_we_know_it_still_goes_direct() {
    // B knows A's public address a while before A learns B's (B's first
    // STUN request is lost): B's pings would reach A's router first and be kept
    // there, so A's answers would leave from a new port. The call-me-maybe
    // with openers that B's new endpoint sets off lets A open first.
    let mut sim = on_relay(&[Nat::Masquerade, Nat::Masquerade]);
    sim.loss_ppm = 1_000_000;
    sim.hosts[B].core.set_stun_server(Some(STUN), sim.now);
    sim.run_for(Duration::from_millis(10));
    sim.loss_ppm = 0;
    sim.hosts[A].core.set_stun_server(Some(STUN), sim.now);
    sim.run_for(secs(3));
    assert_eq!(sim.route(A, B), direct_to(&sim, A, B));
    assert_eq!(sim.route(B, A), direct_to(&sim, B, A));
}
