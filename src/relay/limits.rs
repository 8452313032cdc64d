//! The relay's flow control, sans-IO: the optional per-node token bucket
//! (`--relay-rate`) and the per-destination bounded fair queue. Time is an
//! input.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::key::Key;

/// A token bucket over bytes. [`take`](Self::take) always succeeds but may
/// put the bucket in debt; it answers how long the caller should wait before
/// taking more (the relay stops reading that node's socket for that long, so
/// TCP pushes back on the sender instead of the relay dropping its packets).
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    /// Bytes per second; 0 = unlimited.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate_bytes_per_sec: u64, burst_bytes: u64, now: Instant) -> TokenBucket {
        TokenBucket { rate: rate_bytes_per_sec as f64, burst: burst_bytes as f64, tokens: burst_bytes as f64, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Spends `n` bytes; returns how long until the bucket is out of debt
    /// (zero when there were enough tokens).
    pub(crate) fn take(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.rate) }
    }

    /// Tokens available now (negative = debt).
    pub(crate) fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }
}

/// Frames waiting to be written to one node, bounded in count and bytes,
/// with one sub-queue per sending node served by deficit round robin (DRR):
/// each sender with something queued gets `quantum` bytes per round, so two
/// senders contending for one destination get equal shares of its link, and
/// a sender alone gets all of it (no fixed per-node rate is needed for
/// fairness). When the queue is full, the newest frame of the sender with
/// the most bytes queued is dropped ("longest queue drop"): a flood fills
/// and loses only its own share, and a modest sender keeps its slot. The
/// sender is never blocked by a slow receiver.
#[derive(Debug)]
pub(crate) struct FairQueue {
    flows: HashMap<Key, Flow>,
    /// Senders with frames queued, in service order.
    active: VecDeque<Key>,
    packets: usize,
    bytes: usize,
    max_packets: usize,
    max_bytes: usize,
    quantum: usize,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Flow {
    items: VecDeque<Vec<u8>>,
    bytes: usize,
    deficit: usize,
}

impl FairQueue {
    /// `quantum`: bytes a sender may send per round (at least one frame's worth
    /// is always allowed, whatever the value).
    pub(crate) fn new(max_packets: usize, max_bytes: usize, quantum: usize) -> FairQueue {
        FairQueue {
            flows: HashMap::new(),
            active: VecDeque::new(),
            packets: 0,
            bytes: 0,
            max_packets: max_packets.max(1),
            max_bytes,
            quantum: quantum.max(1),
            dropped: 0,
        }
    }

    fn full_for(&self, len: usize) -> bool {
        self.packets >= self.max_packets || self.bytes + len > self.max_bytes
    }

    /// Queues `frame` from `src`; `false` = dropped (the queue is full and
    /// `src` already holds the largest share). A `true` may have dropped an
    /// older frame of a sender holding more than `src`.
    pub(crate) fn push(&mut self, src: Key, frame: Vec<u8>) -> bool {
        let len = frame.len();
        while self.full_for(len) {
            let mine = self.flows.get(&src).map_or(0, |f| f.bytes);
            // The longest sender (ties broken by key, so the choice does not
            // depend on hash order); a sender never displaces an equal one.
            let victim = self.flows.iter().filter(|(_, f)| f.bytes > mine + len).max_by_key(|(k, f)| (f.bytes, **k)).map(|(k, _)| *k);
            let Some(victim) = victim else {
                self.dropped += 1;
                return false;
            };
            self.drop_newest(&victim);
        }
        let flow = self.flows.entry(src).or_default();
        if flow.items.is_empty() {
            self.active.push_back(src);
        }
        flow.items.push_back(frame);
        flow.bytes += len;
        self.packets += 1;
        self.bytes += len;
        true
    }

    fn drop_newest(&mut self, key: &Key) {
        let Some(flow) = self.flows.get_mut(key) else { return };
        if let Some(it) = flow.items.pop_back() {
            flow.bytes -= it.len();
            self.packets -= 1;
            self.bytes -= it.len();
            self.dropped += 1;
        }
        if flow.items.is_empty() {
            self.flows.remove(key);
            self.active.retain(|k| k != key);
        }
    }

    /// The next frame in fair order, and its sender.
    pub(crate) fn pop(&mut self) -> Option<(Key, Vec<u8>)> {
        loop {
            let key = *self.active.front()?;
            let Some(flow) = self.flows.get_mut(&key) else {
                self.active.pop_front();
                continue;
            };
            let Some(next_len) = flow.items.front().map(Vec::len) else {
                self.flows.remove(&key);
                self.active.pop_front();
                continue;
            };
            if flow.deficit < next_len {
                // This sender's turn is over: top it up, next sender.
                flow.deficit += self.quantum;
                self.active.rotate_left(1);
                continue;
            }
            flow.deficit -= next_len;
            let it = flow.items.pop_front()?;
            flow.bytes -= it.len();
            self.packets -= 1;
            self.bytes -= it.len();
            if flow.items.is_empty() {
                // An idle sender keeps no credit (DRR).
                self.flows.remove(&key);
                self.active.pop_front();
            }
            return Some((key, it));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.packets
    }

    #[cfg(test)]
    /// Frame bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    /// Frames dropped so far because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) < Duration::from_micros(1)
    }

    #[test]
    fn bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO, "the burst is free");
        // 250 bytes of debt at 1000 B/s: wait 250 ms.
        assert!(close(b.take(250, t0), Duration::from_millis(250)));
        // After waiting, the debt is paid; another 100 bytes cost 100 ms.
        let t1 = t0 + Duration::from_millis(250);
        assert!(b.available(t1).abs() < 1e-6);
        assert!(close(b.take(100, t1), Duration::from_millis(100)));
        // A long pause refills to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.available(t2), 500.0);
    }

    #[test]
    fn bucket_long_run_rate() {
        // Send 1 KiB chunks as fast as allowed for 10 simulated seconds.
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::new(50_000, 4_000, t0);
        let mut sent = 0usize;
        while now < t0 + Duration::from_secs(10) {
            sent += 1024;
            now += b.take(1024, now);
        }
        let rate = sent as f64 / 10.0;
        assert!((49_000.0..=51_500.0).contains(&rate), "{rate}");
    }

    #[test]
    fn zero_rate_is_unlimited_and_clock_going_back_is_harmless() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 0, t0);
        assert_eq!(b.take(1 << 30, t0), Duration::ZERO);
        let mut b = TokenBucket::new(100, 100, t0 + Duration::from_secs(1));
        assert_eq!(b.take(100, t0), Duration::ZERO);
    }

    #[test]
    fn queue_bounds_packets_and_bytes_and_counts_drops() {
        let mut q = FairQueue::new(3, 100, 1500);
        assert!(q.push([1; 32], vec![0; 40]));
        assert!(q.push([2; 32], vec![0; 30]));
        assert!(!q.push([3; 32], vec![0; 40]), "bytes bound: no sender holds more than 3 would");
        assert!(q.push([3; 32], vec![0; 30]));
        assert!(!q.push([2; 32], vec![0; 10]), "packet bound: 1 holds 40, not more than 2 would");
        assert_eq!((q.len(), q.bytes(), q.dropped()), (3, 100, 2));
        assert_eq!(q.pop().unwrap().0, [1; 32], "one frame each, in arrival order of the senders");
        assert!(q.push([5; 32], vec![0; 40]));
        let order: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|(k, _)| k[0]).collect();
        assert_eq!(order, [2, 3, 5]);
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }

    #[test]
    fn one_sender_keeps_its_order_and_a_full_queue_drops_the_longest_sender() {
        let mut q = FairQueue::new(4, 10_000, 10);
        for i in 0..4u8 {
            assert!(q.push([1; 32], vec![i; 10]));
        }
        // Full: a newcomer takes the flood's newest slot, the flood itself cannot.
        assert!(!q.push([1; 32], vec![9; 10]));
        assert!(q.push([2; 32], vec![7; 10]));
        assert_eq!((q.len(), q.dropped()), (4, 2));
        let got: Vec<(u8, u8)> = std::iter::from_fn(|| q.pop()).map(|(k, d)| (k[0], d[0])).collect();
        assert_eq!(got, [(1, 0), (2, 7), (1, 1), (1, 2)], "FIFO per sender, round robin between senders");
    }

    /// Senders offer `offered[i]` frames of 1,000 bytes per tick (simulated
    /// time), the destination takes `drain` per tick; returns what each got
    /// over `ticks`.
    fn simulate(offered: &[usize], drain: usize, ticks: usize) -> Vec<usize> {
        let mut q = FairQueue::new(256, 256_000, 1500);
        let mut got = vec![0; offered.len()];
        for _ in 0..ticks {
            for (i, n) in offered.iter().enumerate() {
                for _ in 0..*n {
                    q.push([i as u8; 32], vec![0; 1000]);
                }
            }
            for _ in 0..drain {
                match q.pop() {
                    Some((k, _)) => got[k[0] as usize] += 1,
                    None => break,
                }
            }
        }
        got
    }

    #[test]
    fn a_sender_alone_gets_the_whole_link() {
        let got = simulate(&[10], 4, 1000);
        assert_eq!(got, [4000]);
    }

    #[test]
    fn two_contending_senders_get_half_each_whatever_they_offer() {
        for offered in [[5, 5], [10, 3], [40, 3]] {
            let got = simulate(&offered, 4, 1000);
            let share = |g: usize| g as f64 / 4000.0;
            for g in &got {
                assert!((0.45..=0.55).contains(&share(*g)), "{offered:?}: {got:?}");
            }
        }
    }

    #[test]
    fn a_sender_below_its_share_gets_all_it_offers_and_the_rest_goes_to_the_other() {
        // Max-min fairness: 1 of 4 per tick is below half, so it is served in
        // full and the flood gets the remaining 3.
        let got = simulate(&[40, 1], 4, 1000);
        assert!(got[1] >= 995, "{got:?}");
        assert!(got[0] >= 2990 && got[0] + got[1] == 4000, "{got:?}");
    }
}
