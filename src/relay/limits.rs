//! The relay's flow control, sans-IO: a per-node token bucket and the
//! per-destination bounded queue. Time is an input.

use std::collections::VecDeque;
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

/// Datagrams waiting to be written to one node, bounded in count and bytes.
/// A push to a full queue drops the new datagram and counts it: the sender
/// is never blocked by a slow receiver.
#[derive(Debug)]
pub(crate) struct DatagramQueue {
    items: VecDeque<(Key, Vec<u8>)>,
    bytes: usize,
    max_packets: usize,
    max_bytes: usize,
    dropped: u64,
}

impl DatagramQueue {
    pub(crate) fn new(max_packets: usize, max_bytes: usize) -> DatagramQueue {
        DatagramQueue { items: VecDeque::new(), bytes: 0, max_packets: max_packets.max(1), max_bytes, dropped: 0 }
    }

    /// Queues a datagram from `src`; `false` = dropped (queue full).
    pub(crate) fn push(&mut self, src: Key, datagram: Vec<u8>) -> bool {
        if self.items.len() >= self.max_packets || self.bytes + datagram.len() > self.max_bytes {
            self.dropped += 1;
            return false;
        }
        self.bytes += datagram.len();
        self.items.push_back((src, datagram));
        true
    }

    pub(crate) fn pop(&mut self) -> Option<(Key, Vec<u8>)> {
        let it = self.items.pop_front()?;
        self.bytes -= it.1.len();
        Some(it)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    /// Datagram bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    /// Datagrams dropped so far because the queue was full.
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
        let mut q = DatagramQueue::new(3, 100);
        assert!(q.push([1; 32], vec![0; 40]));
        assert!(q.push([2; 32], vec![0; 40]));
        assert!(!q.push([3; 32], vec![0; 40]), "bytes bound");
        assert!(q.push([3; 32], vec![0; 20]));
        assert!(!q.push([4; 32], vec![]), "packet bound");
        assert_eq!((q.len(), q.bytes(), q.dropped()), (3, 100, 2));
        assert_eq!(q.pop().unwrap().0, [1; 32], "FIFO");
        assert!(q.push([5; 32], vec![0; 40]));
        let order: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|(k, _)| k[0]).collect();
        assert_eq!(order, [2, 3, 5]);
        assert_eq!((q.len(), q.bytes()), (0, 0));
    }
}
