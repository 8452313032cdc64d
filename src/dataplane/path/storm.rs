use super::*;

#[test]
fn call_me_maybe_is_rate_limited_even_when_prodded() {
    let t0 = Instant::now();
    let mut p = PathState::new(t0);
    let ep: SocketAddr = "192.0.2.7:1".parse().unwrap();
    let mut sent = 0;
    for i in 0..1000u64 {
        let now = t0 + Duration::from_millis(i);
        // The peer's call-me-maybe arrives every millisecond.
        p.add_candidates(&[ep], now);
        sent += p.poll(now).iter().filter(|a| **a == Action::CallMeMaybe).count();
    }
    assert_eq!(sent, 1, "one call-me-maybe per {CALL_ME_MAYBE_INTERVAL:?}");
}
