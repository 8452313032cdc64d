use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn port(p: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 5], p))
}

/// What the node does with an opened ping (see `node::on_disco`).
fn ping(p: &mut PathState, counter: u64, from: SocketAddr, now: Instant) -> bool {
    p.accept_counter(counter) && p.on_ping(from, now)
}

#[test]
fn replayed_ping_from_1000_ports_earns_one_pong_and_one_candidate() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let netmap = addr("192.0.2.7:41641");
    p.set_candidates(&[netmap], t0);
    let mut pongs = 0;
    for i in 0..1000u16 {
        // The same captured ping (same counter), a new source port each time.
        if ping(&mut p, 1_700_000_000_000_001, port(10_000 + i), t0 + Duration::from_millis(i.into())) {
            pongs += 1;
        }
    }
    assert_eq!(pongs, 1);
    assert_eq!(p.candidates().count(), 2, "netmap endpoint + the first source");
    let targets: Vec<_> = p.poll(t0 + Duration::from_secs(1)).into_iter().filter(|a| matches!(a, Action::Ping { .. })).collect();
    assert!(targets.len() <= 2, "{targets:?}");
}

#[test]
fn fresh_pings_from_many_ports_are_rate_limited_and_candidates_bounded() {
    // What a misbehaving (authenticated) peer can do with new counters.
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let netmap = addr("192.0.2.7:41641");
    p.set_candidates(&[netmap], t0);
    let mut pongs = 0u64;
    for i in 0..1000u16 {
        if ping(&mut p, 100 + u64::from(i), port(10_000 + i), t0 + Duration::from_millis(i.into())) {
            pongs += 1;
        }
    }
    // One second: the burst plus one second of refill.
    assert!(pongs <= PING_RATE.1 + PING_RATE.0 + 1, "{pongs} pongs");
    assert!(pongs >= PING_RATE.1, "legitimate bursts still pass: {pongs}");
    assert_eq!(p.candidates().count(), MAX_CANDIDATES);
    assert!(p.candidates().any(|a| *a == netmap), "the netmap endpoint is never evicted");
}

#[test]
fn learned_candidates_expire_netmap_ones_stay() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let netmap = addr("192.0.2.7:41641");
    p.set_candidates(&[netmap], t0);
    assert!(ping(&mut p, 1, port(5000), t0));
    assert!(p.on_call_me_maybe(&[addr("198.51.100.1:1")], t0));
    assert_eq!(p.candidates().count(), 3);
    p.poll(t0 + LEARNED_TTL + Duration::from_secs(1));
    assert_eq!(p.candidates().copied().collect::<Vec<_>>(), vec![netmap]);
}

#[test]
fn eviction_prefers_unproven_learned_candidates() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let netmap = addr("192.0.2.7:41641");
    p.set_candidates(&[netmap], t0);
    let proven = port(1);
    p.on_direct_traffic(proven, t0);
    for i in 0..100u16 {
        p.on_call_me_maybe(&[port(100 + i)], t0 + Duration::from_secs(i.into()));
    }
    assert_eq!(p.candidates().count(), MAX_CANDIDATES);
    assert!(p.candidates().any(|a| *a == netmap));
    assert!(p.candidates().any(|a| *a == proven), "the proven path outlives unproven newcomers");
    assert!(p.candidates().any(|a| *a == port(199)), "the newest unproven one is kept");
}

#[test]
fn a_full_netmap_list_never_exceeds_the_bound() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let learned = port(1);
    p.on_direct_traffic(learned, t0);
    assert_eq!(p.route(t0), Route::Direct(learned));
    let netmap: Vec<SocketAddr> = (0..40u16).map(|i| SocketAddr::from(([192, 0, 2, 1], 1000 + i))).collect();
    p.set_candidates(&netmap, t0);
    assert_eq!(p.candidates().count(), MAX_CANDIDATES);
    assert!(p.candidates().all(|a| netmap[..MAX_CANDIDATES].contains(a)));
    assert_eq!(p.route(t0), Route::Relay, "the evicted path is no longer used");
}

#[test]
fn call_me_maybe_is_rate_limited_on_receipt() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let mut taken = 0u64;
    for i in 0..1000u64 {
        if p.on_call_me_maybe(&[addr("192.0.2.7:1")], t0 + Duration::from_millis(i)) {
            taken += 1;
        }
    }
    assert!(taken <= CALL_ME_MAYBE_RATE.1 + CALL_ME_MAYBE_RATE.0 + 1, "{taken}");
    assert!(taken >= CALL_ME_MAYBE_RATE.1);
}

#[test]
fn forbidden_addresses_are_never_probed_or_ponged() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let bad = [
        addr("127.0.0.1:41641"),
        addr("169.254.169.254:80"),
        addr("224.0.0.1:41641"),
        addr("0.0.0.0:41641"),
        addr("255.255.255.255:41641"),
        addr("[::1]:41641"),
        addr("[fe80::1]:41641"),
        addr("[::ffff:127.0.0.1]:41641"),
        addr("10.0.0.1:0"),
    ];
    p.set_candidates(&bad, t0);
    assert!(p.on_call_me_maybe(&bad, t0));
    for (i, b) in bad.iter().enumerate() {
        assert!(!ping(&mut p, i as u64 + 1, *b, t0), "pong to {b}");
        p.on_direct_traffic(*b, t0);
    }
    assert_eq!(p.candidates().count(), 0);
    assert!(p.poll_round(t0).iter().all(|a| !matches!(a, Action::Ping { .. })));
    assert_eq!(p.route(t0), Route::Relay);
}
