use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn first_ping(a: &[Action]) -> (SocketAddr, [u8; 12]) {
    a.iter()
        .find_map(|a| match a {
            Action::Ping { to, tx_id } => Some((*to, *tx_id)),
            _ => None,
        })
        .expect("a ping")
}

/// Poll at every deadline until `until`; returns the time reached.
fn run_until(p: &mut PathState, from: Instant, until: Instant) -> Instant {
    let mut now = from;
    while now < until {
        now = p.next_deadline().expect("a peer with candidates has a deadline").max(now + Duration::from_millis(1)).min(until);
        p.poll(now);
    }
    now
}

#[test]
fn unanswered_probing_settles_on_relay_only_and_new_candidates_wake_it() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    p.set_candidates(&[addr("192.0.2.7:41641")], t0);
    assert_eq!(p.state(), State::Probing);
    // Rounds at 0, 0.5, 1.5, 3.5 and 7.5 s; the last one is at the slowest pace.
    let now = run_until(&mut p, t0, t0 + Duration::from_secs(7));
    assert_eq!(p.state(), State::Probing, "still backing off after 7 s");
    let now = run_until(&mut p, now, t0 + Duration::from_secs(20));
    assert_eq!(p.state(), State::RelayOnly);
    assert_eq!(p.route(now), Route::Relay);
    // The peer calls with a new endpoint: probing restarts at the fastest pace.
    assert!(p.on_call_me_maybe(&[addr("198.51.100.9:41641")], now));
    assert_eq!(p.state(), State::Probing);
    let a = p.poll_round(now);
    assert_eq!(a.iter().filter(|a| matches!(a, Action::Ping { .. })).count(), 2);
    let a = p.poll(now + PROBE_INTERVAL);
    assert!(!a.is_empty(), "the next round comes after {PROBE_INTERVAL:?}, not {PROBE_MAX_INTERVAL:?}");
}

#[test]
fn direct_then_lost_then_direct_again() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let ep = addr("192.0.2.7:41641");
    p.set_candidates(&[ep], t0);
    let (to, tx) = first_ping(&p.poll_round(t0));
    assert!(p.on_pong(to, tx, t0 + Duration::from_millis(5)));
    assert_eq!(p.state(), State::Direct(ep));
    // The trust timer is the deadline to watch besides the keepalive.
    assert!(p.next_deadline().expect("a peer with candidates has a deadline") <= t0 + Duration::from_millis(5) + KEEPALIVE);
    // Keepalives go unanswered until trust runs out.
    let mut now = t0;
    let lost_round = loop {
        now = p.next_deadline().expect("a peer with candidates has a deadline").max(now + Duration::from_millis(1));
        let a = p.poll(now);
        if p.state() != State::Direct(ep) {
            break a;
        }
        assert!(now < t0 + TRUST + Duration::from_secs(1), "still direct at {:?}", now - t0);
    };
    assert_eq!(p.state(), State::Lost(ep));
    assert_eq!(p.route(now), Route::Relay);
    // Losing the path probes at once, with a call-me-maybe.
    assert!(lost_round.contains(&Action::CallMeMaybe), "{lost_round:?}");
    let (to, tx) = first_ping(&lost_round);
    assert!(p.on_pong(to, tx, now + Duration::from_millis(5)));
    assert_eq!(p.state(), State::Direct(ep));
    assert_eq!(p.route(now + Duration::from_millis(6)), Route::Direct(ep));
}

#[test]
fn keepalive_answers_keep_the_path_past_the_trust_window() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let ep = addr("192.0.2.7:41641");
    p.set_candidates(&[ep], t0);
    let (to, tx) = first_ping(&p.poll_round(t0));
    p.on_pong(to, tx, t0);
    let mut now = t0;
    for _ in 0..20 {
        now = p.next_deadline().expect("a peer with candidates has a deadline").max(now + Duration::from_millis(1));
        for a in p.poll(now) {
            if let Action::Ping { to, tx_id } = a {
                assert!(p.on_pong(to, tx_id, now + Duration::from_millis(1)));
            }
        }
    }
    assert!(now > t0 + 3 * TRUST, "ran {:?}", now - t0);
    assert_eq!(p.state(), State::Direct(ep));
}

#[test]
fn a_ping_from_a_new_port_is_probed_back_at_once() {
    // The peer's NAT gave its ping a port we never heard of (a clash or
    // a symmetric NAT): we ping that source right away, without waiting
    // for the backed-off round.
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    p.set_candidates(&[addr("192.0.2.7:41641")], t0);
    let _ = run_until(&mut p, t0, t0 + Duration::from_secs(4));
    let now = t0 + Duration::from_secs(4);
    let moved = addr("192.0.2.7:1051");
    assert!(p.accept_counter(1) && p.on_ping(moved, now));
    let a = p.poll(now);
    assert!(a.iter().any(|a| matches!(a, Action::Ping { to, .. } if *to == moved)), "{a:?}");
    let (to, tx) = a
        .iter()
        .find_map(|a| match a {
            Action::Ping { to, tx_id } if *to == moved => Some((*to, *tx_id)),
            _ => None,
        })
        .unwrap();
    assert!(p.on_pong(to, tx, now));
    assert_eq!(p.route(now), Route::Direct(moved));
}
