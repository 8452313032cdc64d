use super::*;

impl PathState {
    /// One probe round whole: `poll` at `now`, then at the moment its
    /// pings were held back to, if they were.
    pub(crate) fn poll_round(&mut self, now: Instant) -> Vec<Action> {
        let mut a = self.poll(now);
        if let Some(t) = self.timers.get(Timer::Pings) {
            a.extend(self.poll(t.max(now)));
        }
        a
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pings(actions: &[Action]) -> Vec<(SocketAddr, [u8; 12])> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ping { to, tx_id } => Some((*to, *tx_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn relay_until_a_pong_proves_a_direct_path() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    assert_eq!(p.route(t0), Route::Relay);
    p.set_candidates(&[addr("10.0.0.1:5000"), addr("192.0.2.7:41641")], t0);
    let a = p.poll_round(t0);
    assert!(a.contains(&Action::CallMeMaybe));
    let sent = pings(&a);
    assert_eq!(sent.len(), 2);
    assert_eq!(p.route(t0), Route::Relay, "no proof yet");
    // Only the public endpoint answers.
    let (to, tx) = sent.iter().find(|(a, _)| a.port() == 41641).copied().unwrap();
    assert!(p.on_pong(to, tx, t0 + Duration::from_millis(30)));
    assert_eq!(p.route(t0 + Duration::from_millis(31)), Route::Direct(to));
    // A replayed or misdirected pong proves nothing.
    assert!(!p.on_pong(to, tx, t0 + Duration::from_millis(40)));
    let (other, tx2) = sent.iter().find(|(a, _)| a.port() == 5000).copied().unwrap();
    assert!(!p.on_pong(addr("203.0.113.1:1"), tx2, t0 + Duration::from_millis(40)));
    assert_ne!(p.route(t0 + Duration::from_millis(41)), Route::Direct(other));
}

#[test]
fn dead_direct_path_falls_back_to_relay_then_recovers() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let ep = addr("192.0.2.7:41641");
    p.set_candidates(&[ep], t0);
    let (to, tx) = pings(&p.poll_round(t0))[0];
    p.on_pong(to, tx, t0);
    // Keepalive pings go unanswered.
    let mut now = t0;
    while now < t0 + TRUST + Duration::from_secs(1) {
        now = p.next_deadline().expect("a peer with candidates has a deadline").max(now + Duration::from_millis(1));
        p.poll(now);
    }
    assert_eq!(p.route(now), Route::Relay, "unanswered keepalives end trust");
    assert!(p.last_result.as_deref().unwrap().contains("stopped answering"));
    // Probing resumes with call-me-maybe; an answer restores the path.
    let a = p.poll_round(now + PROBE_MAX_INTERVAL + CALL_ME_MAYBE_INTERVAL);
    assert!(a.contains(&Action::CallMeMaybe));
    let (to, tx) = pings(&a)[0];
    let later = now + PROBE_MAX_INTERVAL + CALL_ME_MAYBE_INTERVAL;
    p.on_pong(to, tx, later);
    assert_eq!(p.route(later), Route::Direct(ep));
}

#[test]
fn lowest_rtt_wins_and_reset_distrusts() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let (slow, fast) = (addr("192.0.2.7:1"), addr("10.0.0.7:1"));
    p.set_candidates(&[slow, fast], t0);
    let sent = pings(&p.poll_round(t0));
    // The pings left after the openers' lead.
    let t0 = t0 + OPEN_LEAD;
    for (to, tx) in sent {
        let rtt = if to == fast { 1 } else { 40 };
        p.on_pong(to, tx, t0 + Duration::from_millis(rtt));
    }
    assert_eq!(p.route(t0 + Duration::from_millis(50)), Route::Direct(fast));
    p.reset(t0 + Duration::from_millis(60));
    assert_eq!(p.route(t0 + Duration::from_millis(60)), Route::Relay);
    assert!(!p.poll(t0 + Duration::from_millis(60)).is_empty(), "reset probes at once");
}

#[test]
fn backoff_while_unreachable() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    p.set_candidates(&[addr("192.0.2.7:1")], t0);
    let mut now = t0;
    let mut rounds = 0;
    while now < t0 + Duration::from_secs(60) {
        if p.poll(now).iter().any(|a| matches!(a, Action::Ping { .. })) {
            rounds += 1;
        }
        now = p.next_deadline().expect("a peer with candidates has a deadline").max(now + Duration::from_millis(1));
    }
    // 0.5 + 1 + 2 + 4 then every 5 s: about 15 rounds a minute, not 120.
    assert!((10..=20).contains(&rounds), "{rounds} probe rounds");
}
