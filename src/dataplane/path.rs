//! Path selection for one peer: direct UDP when a probe proves it, the relay
//! until then. Sans-IO: fed endpoints, pongs, authenticated traffic and time;
//! answers which route to use now, which probes to send, and when to wake.
//!
//! The rules:
//! - A direct path is *proven* by a pong to one of our pings (or by
//!   authenticated WireGuard traffic arriving from that address) and stays
//!   trusted for [`TRUST`] after the last such proof.
//! - While no path is trusted, every candidate is pinged each [`PROBE_INTERVAL`]
//!   (backing off to [`PROBE_MAX_INTERVAL`]) and the peer is asked, through the
//!   relay, to ping us back at the same time ("call me maybe"), so that both
//!   NATs see outbound traffic and endpoint-independent mappings open.
//! - Once trusted, the chosen path is pinged every [`KEEPALIVE`] (which also
//!   holds NAT mappings) and all candidates are re-probed every
//!   [`REPROBE_INTERVAL`] to find a faster one; the lowest RTT wins.
//! - [`PathState::reset`] (a network change) distrusts everything and
//!   restarts probing at once.
//!
//! What the peer (or someone replaying its messages) can make us do is
//! bounded:
//! - Only addresses passing [`crate::dataplane::endpoint::is_valid_endpoint`] become
//!   candidates or get a pong, so we never probe loopback, link-local (the
//!   metadata service), multicast or unspecified addresses.
//! - At most [`MAX_CANDIDATES`] per peer. Netmap ones are kept over learned
//!   ones (from pings, call-me-maybe or direct traffic), which give way
//!   unproven-first and expire [`LEARNED_TTL`] after they were last seen.
//! - Received pings and call-me-maybes pass a per-peer token bucket
//!   ([`PING_RATE`], [`CALL_ME_MAYBE_RATE`]), and every disco message must be
//!   new to the peer's [`crate::dataplane::disco::ReplayWindow`].
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::dataplane::disco::ReplayWindow;
use crate::dataplane::endpoint::is_valid_endpoint;
use crate::relay::limits::TokenBucket;

/// Spend one token if there is one.
fn take_one(bucket: &mut TokenBucket, now: Instant) -> bool {
    if bucket.available(now) < 1.0 {
        return false;
    }
    bucket.take(1, now);
    true
}

pub(crate) const TRUST: Duration = Duration::from_millis(6500);
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(2);
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_millis(500);
pub(crate) const PROBE_MAX_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const REPROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Call-me-maybe goes out at most this often: answering one probes at once,
/// and without a limit two peers would bounce them back and forth.
pub(crate) const CALL_ME_MAYBE_INTERVAL: Duration = Duration::from_secs(2);
/// A ping not answered within this long is forgotten.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Candidates kept per peer. A peer has a handful of interfaces plus a
/// public mapping; more is either a misconfiguration or an attack.
pub const MAX_CANDIDATES: usize = 16;
/// A learned candidate neither re-announced nor proven for this long is dropped.
pub(crate) const LEARNED_TTL: Duration = Duration::from_secs(60);
/// Received pings per second (and burst) per peer. A peer pings each of our
/// candidates once a round; rounds are at most every [`PROBE_INTERVAL`] plus
/// one per call-me-maybe.
pub const PING_RATE: (u64, u64) = (10, 2 * MAX_CANDIDATES as u64);
/// Received call-me-maybes per second (and burst) per peer; peers send one
/// per [`CALL_ME_MAYBE_INTERVAL`].
pub(crate) const CALL_ME_MAYBE_RATE: (u64, u64) = (1, 3);
/// How long a round's full pings wait after the call-me-maybe that told the
/// peer our endpoints (and after our openers). Behind NATs that accept WAN
/// input, a ping that reaches the peer's router before the peer's own first
/// packet toward us is kept there as a flow to the router itself, and the
/// peer's later packets to us get a new, unannounced port (conntrack's clash
/// handling). The peer answers a call-me-maybe with openers at once, so
/// pinging only after this lead lets its router map our address first. It
/// must cover one trip over the relay; the cost is this much on the first
/// direct path.
pub(crate) const OPEN_LEAD: Duration = Duration::from_millis(300);
/// Without a relay to send call-me-maybe through, the peer only learns our
/// endpoints from the netmap: give that this long from the start of
/// probing before pinging.
pub(crate) const UNTOLD_LEAD: Duration = Duration::from_secs(2);

/// Where packets for the peer should go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Direct(SocketAddr),
    Relay,
}

/// Where the search for a direct path to one peer stands. Every state but
/// `Direct` sends traffic over the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// No direct path yet: every candidate is pinged each round, rounds back
    /// off from [`PROBE_INTERVAL`] toward [`PROBE_MAX_INTERVAL`].
    Probing,
    /// A proven path, pinged every [`KEEPALIVE`] and trusted until [`TRUST`]
    /// after its last proof.
    Direct(SocketAddr),
    /// Probing backed off to its slowest pace without an answer (UDP
    /// blocked, or NATs that will not open): the relay is the path, one
    /// round every [`PROBE_MAX_INTERVAL`] still looks for a direct one.
    RelayOnly,
    /// This direct path stopped answering: probing again from the fastest
    /// pace, as after a network change.
    Lost(SocketAddr),
}

/// The state's timers. Each is armed (a deadline) or not; the path's next
/// deadline is the earliest armed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The next probe round (or keepalive ping when direct).
    Probe = 0,
    /// The next round over all candidates while direct, to find a faster path.
    Reprobe,
    /// When the direct path's trust runs out without a new proof.
    Trust,
    /// The earliest moment another call-me-maybe may go out.
    CallMeMaybe,
    /// This round's full pings, held back [`OPEN_LEAD`] behind its openers.
    Pings,
}

#[derive(Clone, Copy, Debug, Default)]
struct Timers([Option<Instant>; 5]);

impl Timers {
    fn arm(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }
    fn disarm(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }
    /// Armed and due at `now`.
    fn due(&self, t: Timer, now: Instant) -> bool {
        self.get(t).is_some_and(|at| at <= now)
    }
    /// Not armed, or due: nothing holds back what it guards.
    fn free(&self, t: Timer, now: Instant) -> bool {
        self.get(t).is_none_or(|at| at <= now)
    }
    fn earliest(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

/// Something the driver must send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// A sealed ping with this transaction id, straight to this address.
    Ping { to: SocketAddr, tx_id: [u8; 12] },
    /// Ask the peer (via the relay) to ping our endpoints now.
    CallMeMaybe,
    /// A datagram that only goes far enough to open our own NAT's mapping
    /// toward this address (a small TTL), so the peer's ping, arriving
    /// later, finds it instead of creating a flow that clashes with it.
    Open { to: SocketAddr },
}

#[derive(Clone, Debug)]
struct Candidate {
    /// From the netmap (kept until the netmap drops it), else learned.
    from_netmap: bool,
    /// When a learned candidate was last announced or seen.
    seen_at: Instant,
    /// Last proof that this address reaches the peer.
    proven_at: Option<Instant>,
    rtt: Option<Duration>,
}

impl Candidate {
    fn new(from_netmap: bool, now: Instant) -> Self {
        Candidate { from_netmap, seen_at: now, proven_at: None, rtt: None }
    }

    fn last_sign_of_life(&self) -> Instant {
        self.proven_at.map_or(self.seen_at, |p| p.max(self.seen_at))
    }
}

#[derive(Debug)]
pub(crate) struct PathState {
    candidates: HashMap<SocketAddr, Candidate>,
    pending: HashMap<[u8; 12], (SocketAddr, Instant)>,
    state: State,
    timers: Timers,
    /// The pause before the next unanswered probe round (grows while probing).
    probe_interval: Duration,
    /// Last probe outcome, for `status`.
    pub(crate) last_result: Option<String>,
    tx_counter: u64,
    salt: u32,
    replay: ReplayWindow,
    pings_in: TokenBucket,
    call_me_maybes_in: TokenBucket,
    /// When our last call-me-maybe (with our endpoints as they are now)
    /// went out; `None` after a network change or while the relay is down.
    told_at: Option<Instant>,
    /// When this search for a direct path began (or our endpoints changed).
    probing_since: Instant,
}

impl PathState {
    pub(crate) fn new(now: Instant) -> Self {
        let mut timers = Timers::default();
        timers.arm(Timer::Probe, now);
        PathState {
            candidates: HashMap::new(),
            pending: HashMap::new(),
            state: State::Probing,
            timers,
            probe_interval: PROBE_INTERVAL,
            last_result: None,
            tx_counter: 0,
            salt: rand::random(),
            replay: ReplayWindow::default(),
            pings_in: TokenBucket::new(PING_RATE.0, PING_RATE.1, now),
            call_me_maybes_in: TokenBucket::new(CALL_ME_MAYBE_RATE.0, CALL_ME_MAYBE_RATE.1, now),
            told_at: None,
            probing_since: now,
        }
    }

    /// Where the search for a direct path stands.
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    fn best(&self) -> Option<SocketAddr> {
        match self.state {
            State::Direct(b) => Some(b),
            _ => None,
        }
    }

    /// Probe now at the fastest pace; out of `RelayOnly` (something new
    /// is worth trying), a lost path stays `Lost` until a round answers.
    fn probe_now(&mut self, now: Instant) {
        self.timers.arm(Timer::Probe, now);
        if self.best().is_none() {
            self.probe_interval = PROBE_INTERVAL;
            if self.state == State::RelayOnly {
                self.state = State::Probing;
            }
        }
    }

    /// The peer's endpoints from the netmap changed. Learned candidates stay
    /// (they expire on their own); netmap ones no longer listed go.
    pub(crate) fn set_candidates(&mut self, endpoints: &[SocketAddr], now: Instant) {
        let mut wanted: Vec<SocketAddr> = Vec::new();
        for e in endpoints.iter().filter(|e| is_valid_endpoint(e)) {
            if !wanted.contains(e) && wanted.len() < MAX_CANDIDATES {
                wanted.push(*e);
            }
        }
        let before = self.candidates.len();
        self.candidates.retain(|a, c| !c.from_netmap || wanted.contains(a));
        let mut added = false;
        for e in &wanted {
            match self.candidates.get_mut(e) {
                Some(c) => c.from_netmap = true,
                None => {
                    // The netmap wins over a learned path, even the current one.
                    if !self.make_room(true) {
                        continue;
                    }
                    self.candidates.insert(*e, Candidate::new(true, now));
                    added = true;
                }
            }
        }
        self.forget_best_if_gone(now);
        if added || before != self.candidates.len() {
            if added && self.best().is_none() {
                self.probing_since = now;
            }
            // New addresses are worth trying right away.
            self.probe_now(now);
            self.probe_interval = PROBE_INTERVAL;
        }
    }

    /// Learn (or refresh) `addr` as a candidate, if it is a valid endpoint
    /// and there is room. Returns whether it is a candidate now.
    fn learn(&mut self, addr: SocketAddr, now: Instant) -> bool {
        if !is_valid_endpoint(&addr) {
            return false;
        }
        if let Some(c) = self.candidates.get_mut(&addr) {
            c.seen_at = c.seen_at.max(now);
            return true;
        }
        if !self.make_room(false) {
            return false;
        }
        self.candidates.insert(addr, Candidate::new(false, now));
        true
    }

    /// If full, evict the least useful learned candidate (never a netmap one,
    /// nor the current path unless `even_best`): unproven before proven, then
    /// the stalest. Returns whether there is room now.
    fn make_room(&mut self, even_best: bool) -> bool {
        if self.candidates.len() < MAX_CANDIDATES {
            return true;
        }
        let best = self.best();
        let victim = self
            .candidates
            .iter()
            .filter(|(a, c)| !c.from_netmap && (even_best || Some(**a) != best))
            .min_by_key(|(_, c)| (c.proven_at.is_some(), c.last_sign_of_life()))
            .map(|(a, _)| *a);
        match victim {
            Some(v) => {
                self.candidates.remove(&v);
                true
            }
            None => false,
        }
    }

    /// The current path was evicted: back to probing (the callers that can
    /// evict it probe at once anyway).
    fn forget_best_if_gone(&mut self, now: Instant) {
        if self.best().is_some_and(|b| !self.candidates.contains_key(&b)) {
            self.enter_probing(State::Probing, now);
        }
    }

    /// Leave `Direct` (or restart probing) in `state` (`Probing` or `Lost`).
    fn enter_probing(&mut self, state: State, now: Instant) {
        self.state = state;
        self.probing_since = now;
        self.timers.disarm(Timer::Trust);
        self.timers.disarm(Timer::Reprobe);
        self.probe_now(now);
    }

    /// Add candidates without dropping the known ones.
    pub(crate) fn add_candidates(&mut self, endpoints: &[SocketAddr], now: Instant) {
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            self.learn(*e, now);
        }
        self.timers.arm(Timer::Probe, now);
        if self.state == State::RelayOnly {
            self.probe_now(now);
        }
    }

    /// An authenticated disco message from the peer carried `counter`: true
    /// if it is new (act on it), false for a replay (drop it).
    pub(crate) fn accept_counter(&mut self, counter: u64) -> bool {
        self.replay.accept(counter)
    }

    /// A (fresh, authenticated) ping from the peer arrived from `from`.
    /// Returns whether to answer it with a pong there.
    pub(crate) fn on_ping(&mut self, from: SocketAddr, now: Instant) -> bool {
        if !is_valid_endpoint(&from) || !take_one(&mut self.pings_in, now) {
            return false;
        }
        // They can reach us from there (a NAT may have given them a new
        // port on the way): check the way back too, at once, so our ping
        // leaves while their mapping is fresh.
        let known = self.candidates.contains_key(&from);
        if self.learn(from, now) && !known {
            self.probe_now(now);
        }
        true
    }

    /// A (fresh, authenticated) call-me-maybe: probe these endpoints now.
    /// Returns false if it was dropped by the rate limit.
    pub(crate) fn on_call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant) -> bool {
        if !take_one(&mut self.call_me_maybes_in, now) {
            return false;
        }
        self.add_candidates(endpoints, now);
        true
    }

    pub(crate) fn candidates(&self) -> impl Iterator<Item = &SocketAddr> {
        self.candidates.keys()
    }

    /// A pong arrived from `from` for `tx_id`.
    pub(crate) fn on_pong(&mut self, from: SocketAddr, tx_id: [u8; 12], now: Instant) -> bool {
        let Some((to, sent)) = self.pending.remove(&tx_id) else { return false };
        if to != from {
            // A pong must come back from where the ping went.
            return false;
        }
        let rtt = now.saturating_duration_since(sent);
        // Evicted since the ping went out: the answer proves nothing we keep.
        let Some(c) = self.candidates.get_mut(&from) else { return false };
        c.proven_at = Some(now);
        c.rtt = Some(rtt);
        self.last_result = Some(format!("pong from {from} in {:.1} ms", rtt.as_secs_f64() * 1e3));
        self.choose(now);
        true
    }

    /// Authenticated WireGuard traffic came straight from `from`: that
    /// address works (the peer roamed, or our probes were answered by data).
    pub(crate) fn on_direct_traffic(&mut self, from: SocketAddr, now: Instant) {
        if !self.learn(from, now) {
            return;
        }
        let Some(c) = self.candidates.get_mut(&from) else { return };
        c.proven_at = Some(now);
        if self.best().is_none() || self.best() == Some(from) {
            self.choose(now);
        }
    }

    /// A network change: trust nothing, probe everything now.
    pub(crate) fn reset(&mut self, now: Instant) {
        for c in self.candidates.values_mut() {
            c.proven_at = None;
        }
        self.pending.clear();
        // Our endpoints may be new: the peer must hear them (and open its
        // NAT toward them) before our pings arrive.
        self.told_at = None;
        self.timers.disarm(Timer::CallMeMaybe);
        self.enter_probing(State::Probing, now);
    }

    fn trusted(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.candidates.get(addr).and_then(|c| c.proven_at).is_some_and(|t| now.saturating_duration_since(t) < TRUST)
    }

    /// Pick the trusted candidate with the lowest RTT; entering `Direct`
    /// arms the keepalive, re-probe and trust timers.
    fn choose(&mut self, now: Instant) {
        let best = self
            .candidates
            .iter()
            .filter(|(a, _)| self.trusted(a, now))
            .min_by_key(|(_, c)| c.rtt.unwrap_or(Duration::from_secs(1)))
            .map(|(a, _)| *a);
        let Some(b) = best else { return };
        if self.best() != Some(b) {
            tracing::debug!(from = ?self.state, to = %b, "path changed");
            self.timers.arm(Timer::Probe, now + KEEPALIVE);
            if self.timers.get(Timer::Reprobe).is_none() {
                self.timers.arm(Timer::Reprobe, now + REPROBE_INTERVAL);
            }
        }
        self.state = State::Direct(b);
        if let Some(t) = self.candidates.get(&b).and_then(|c| c.proven_at) {
            self.timers.arm(Timer::Trust, t + TRUST);
        }
    }

    /// The route for traffic now.
    pub(crate) fn route(&self, now: Instant) -> Route {
        match self.state {
            State::Direct(b) if self.trusted(&b, now) => Route::Direct(b),
            _ => Route::Relay,
        }
    }

    fn new_tx(&mut self) -> [u8; 12] {
        self.tx_counter += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.tx_counter.to_le_bytes());
        t[8..].copy_from_slice(&self.salt.to_le_bytes());
        t
    }

    fn ping(&mut self, to: SocketAddr, now: Instant, out: &mut Vec<Action>) {
        let tx_id = self.new_tx();
        self.pending.insert(tx_id, (to, now));
        out.push(Action::Ping { to, tx_id });
    }

    /// Drop what has aged out: unanswered pings, learned candidates not
    /// seen for [`LEARNED_TTL`] (never the current path).
    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, (_, sent)| now.saturating_duration_since(*sent) < PING_TIMEOUT);
        let best = self.best();
        self.candidates
            .retain(|a, c| c.from_netmap || Some(*a) == best || now.saturating_duration_since(c.last_sign_of_life()) < LEARNED_TTL);
    }

    /// Probes due now. Call again at [`PathState::next_deadline`].
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<Action> {
        self.expire(now);
        if let State::Direct(b) = self.state
            && (self.timers.due(Timer::Trust, now) || !self.trusted(&b, now))
        {
            self.last_result = Some(format!("direct path {b} stopped answering; using the relay"));
            self.enter_probing(State::Lost(b), now);
        }
        let mut out = Vec::new();
        if self.timers.due(Timer::Pings, now) {
            self.timers.disarm(Timer::Pings);
            if self.best().is_none() {
                self.ping_all(now, &mut out);
            }
        }
        if !self.timers.due(Timer::Probe, now) || self.candidates.is_empty() {
            return out;
        }
        match self.state {
            State::Direct(b) if !self.timers.due(Timer::Reprobe, now) => {
                self.ping(b, now, &mut out);
                self.timers.arm(Timer::Probe, now + KEEPALIVE);
            }
            State::Direct(_) => {
                self.ping_all(now, &mut out);
                self.timers.arm(Timer::Probe, now + KEEPALIVE);
                self.timers.arm(Timer::Reprobe, now + REPROBE_INTERVAL);
            }
            State::Probing | State::Lost(_) | State::RelayOnly => {
                // Open our NAT toward every candidate, ask the peer to do
                // the same toward us (call-me-maybe answers with openers
                // at once), and ping once both had time: see [`OPEN_LEAD`].
                let mut targets: Vec<SocketAddr> = self.candidates.keys().copied().collect();
                targets.sort();
                out.extend(targets.into_iter().map(|to| Action::Open { to }));
                if self.timers.free(Timer::CallMeMaybe, now) {
                    out.push(Action::CallMeMaybe);
                    self.timers.arm(Timer::CallMeMaybe, now + CALL_ME_MAYBE_INTERVAL);
                    self.told_at = Some(now);
                }
                // A path that just stopped answering had the peer's mapping
                // a moment ago: no need to wait for its openers.
                let ready = if matches!(self.state, State::Lost(_)) { now } else { self.pings_ready() };
                if ready <= now {
                    self.timers.disarm(Timer::Pings);
                    self.ping_all(now, &mut out);
                } else {
                    self.timers.arm(Timer::Pings, ready);
                }
                self.timers.arm(Timer::Probe, now + self.probe_interval);
                if self.probe_interval >= PROBE_MAX_INTERVAL {
                    self.state = State::RelayOnly;
                }
                self.probe_interval = (self.probe_interval * 2).min(PROBE_MAX_INTERVAL);
            }
        }
        out
    }

    /// When this round's pings may go: [`OPEN_LEAD`] after the peer was
    /// told our endpoints, else [`UNTOLD_LEAD`] into the search.
    fn pings_ready(&self) -> Instant {
        self.told_at.map_or(self.probing_since + UNTOLD_LEAD, |t| t + OPEN_LEAD)
    }

    /// Whether something unproven may go straight to the peer now (the
    /// driver's best effort without a relay): only once our pings may,
    /// since any full-TTL datagram that reaches the peer's router before
    /// the peer's opener spoils that router's mapping toward us.
    pub fn may_send_unproven(&self, now: Instant) -> bool {
        matches!(self.state, State::Lost(_)) || self.pings_ready() <= now
    }

    /// The call-me-maybe [`PathState::poll`] asked for could not go out (no
    /// relay): the peer was not told, so hold the pings back, and ask
    /// again next round.
    pub fn call_me_maybe_undelivered(&mut self) {
        self.told_at = None;
        self.timers.disarm(Timer::CallMeMaybe);
        if let Some(t) = self.timers.get(Timer::Pings) {
            self.timers.arm(Timer::Pings, t.max(self.pings_ready()));
        }
    }

    /// The relay link came up: a search still under way tells the peer our
    /// endpoints now rather than at the next round.
    pub fn relay_came_up(&mut self, now: Instant) {
        if self.best().is_none() && self.told_at.is_none() {
            self.timers.disarm(Timer::CallMeMaybe);
            self.timers.arm(Timer::Probe, now);
        }
    }

    fn ping_all(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut targets: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        targets.sort();
        for to in targets {
            self.ping(to, now, out);
        }
    }

    /// When [`PathState::poll`] has work next; `None` while it has none.
    /// Without candidates `poll` sends nothing, so a `Probe` timer left due
    /// there must not wake the caller (it would spin on a past deadline).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.candidates.is_empty() {
            return None;
        }
        // The call-me-maybe timer only holds messages back; it wakes no one.
        let mut t = self.timers;
        t.disarm(Timer::CallMeMaybe);
        t.earliest()
    }
}

// The tests sit in path/ beside this file: with them it passed 1,000 lines.
// `tests` also holds `PathState::poll_round`, which the others use.
#[cfg(test)]
mod hardening;
#[cfg(test)]
mod states;
#[cfg(test)]
mod storm;
#[cfg(test)]
mod tests;
