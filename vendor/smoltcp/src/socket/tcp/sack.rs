//! SACK-based loss recovery (tailgate patch; RFC 2018 / RFC 6675, simplified).
//!
//! Upstream smoltcp advertises SACK and sends SACK blocks as a receiver, but as
//! a sender it ignores them: after a loss it retransmits one segment on the
//! third duplicate ACK and otherwise waits for the retransmission timer. When a
//! burst overflows a receiver's socket buffer (wireguard-go on a busy host),
//! many consecutive segments are lost, so every burst loss ended in an RTO
//! stall. This scoreboard remembers which ranges the peer has SACKed, so that
//! every hole below the highest SACKed byte is retransmitted within one round
//! trip, clocked by the ACKs that arrive.

use crate::wire::TcpSeqNumber;

/// SACKed ranges kept; the peer reports at most 3-4 per ACK, older ones are
/// merged, so a handful covers the holes of one window.
const MAX_RANGES: usize = 16;
/// Segments a single ACK may release during recovery (ACK clocking with a
/// little headroom, so the retransmissions do not form a burst of their own).
const PER_ACK: u16 = 2;
const MAX_BUDGET: u16 = 64;
/// Bytes SACKed above the cumulative ACK that mean "lost" (DupThresh * SMSS).
const DUP_THRESH: usize = 3;

/// Counters for diagnosing loss recovery.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitStats {
    /// Retransmission timer expiries (each rewinds to the first unacked byte).
    pub timeouts: u64,
    /// Loss recovery episodes entered (SACK or three duplicate ACKs).
    pub recoveries: u64,
    /// Segments resent by fast / SACK recovery.
    pub retransmitted_segments: u64,
}

#[derive(Debug, Default)]
pub(super) struct Scoreboard {
    /// Sorted, disjoint, non-adjacent SACKed ranges, all above the cumulative ACK.
    ranges: [(TcpSeqNumber, TcpSeqNumber); MAX_RANGES],
    len: usize,
    /// `Some(highest sequence sent when the loss was detected)` during recovery.
    recovery_point: Option<TcpSeqNumber>,
    /// Below this, holes have been retransmitted in this episode.
    rexmit_next: TcpSeqNumber,
    budget: u16,
    pub(super) stats: RetransmitStats,
}

impl Scoreboard {
    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.recovery_point = None;
        self.budget = 0;
    }

    pub(super) fn in_recovery(&self) -> bool {
        self.recovery_point.is_some()
    }

    fn sacked_bytes(&self) -> usize {
        self.ranges[..self.len].iter().map(|(s, e)| *e - *s).sum()
    }

    fn insert(&mut self, mut start: TcpSeqNumber, mut end: TcpSeqNumber) {
        // Merge with every range it touches, then insert in order.
        let mut out: [(TcpSeqNumber, TcpSeqNumber); MAX_RANGES] = Default::default();
        let mut n = 0;
        let mut placed = false;
        for &(s, e) in &self.ranges[..self.len] {
            if e < start {
                out[n] = (s, e);
                n += 1;
            } else if s > end {
                if !placed {
                    out[n] = (start, end);
                    n += 1;
                    placed = true;
                }
                if n < MAX_RANGES {
                    out[n] = (s, e);
                    n += 1;
                }
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        if !placed && n < MAX_RANGES {
            out[n] = (start, end);
            n += 1;
        }
        self.ranges = out;
        self.len = n;
    }

    /// Take in one ACK: its cumulative `ack`, its SACK blocks, and whether it
    /// was a duplicate ACK count reaching the threshold. `snd_nxt` is the
    /// highest sequence sent. Returns true when a new recovery episode begins
    /// (the caller cuts the congestion window once).
    pub(super) fn on_ack(
        &mut self,
        ack: TcpSeqNumber,
        blocks: &[Option<(u32, u32)>; 3],
        snd_nxt: TcpSeqNumber,
        dup_acks: u8,
        mss: usize,
    ) -> bool {
        // Forget what the cumulative ACK now covers.
        let mut kept = 0;
        for i in 0..self.len {
            let (s, e) = self.ranges[i];
            if e > ack {
                self.ranges[kept] = (s.max(ack), e);
                kept += 1;
            }
        }
        self.len = kept;
        // Take only blocks inside (ack, snd_nxt]: D-SACKs (below the ACK) and
        // blocks for data never sent are ignored.
        for (l, r) in blocks.iter().flatten() {
            let (l, r) = (TcpSeqNumber(*l as i32), TcpSeqNumber(*r as i32));
            if l < r && l >= ack && r <= snd_nxt {
                self.insert(l, r);
            }
        }
        if let Some(point) = self.recovery_point {
            if ack >= point {
                self.recovery_point = None;
                self.budget = 0;
            } else {
                self.budget = (self.budget + PER_ACK).min(MAX_BUDGET);
            }
            return false;
        }
        if self.sacked_bytes() >= DUP_THRESH * mss || dup_acks >= 3 {
            self.recovery_point = Some(snd_nxt);
            self.rexmit_next = ack;
            self.budget = PER_ACK;
            self.stats.recoveries += 1;
            return true;
        }
        false
    }

    /// The next hole to resend during recovery: (start, length <= mss). A
    /// recovery entered on duplicate ACKs alone (no SACK blocks) resends the
    /// first unacknowledged segment, like classic fast retransmit, and each
    /// partial ACK the next one (NewReno).
    pub(super) fn next_hole(&self, una: TcpSeqNumber, mss: usize) -> Option<(TcpSeqNumber, usize)> {
        self.recovery_point?;
        if self.budget == 0 {
            return None;
        }
        let mut p = self.rexmit_next.max(una);
        if self.len == 0 {
            // No SACK information: only the segment at the cumulative ACK is
            // known to be missing.
            return (p == una && self.rexmit_next <= una).then_some((una, mss));
        }
        for &(s, e) in &self.ranges[..self.len] {
            if e <= p {
                continue;
            }
            if s <= p {
                p = e;
                continue;
            }
            return Some((p, (s - p).min(mss)));
        }
        None
    }

    /// A hole segment went out.
    pub(super) fn sent(&mut self, seq: TcpSeqNumber, len: usize) {
        self.rexmit_next = seq + len;
        self.budget = self.budget.saturating_sub(1);
        self.stats.retransmitted_segments += 1;
    }

    /// The retransmission timer fired: the sender rewinds to the first
    /// unacknowledged byte, so the episode and its knowledge start over.
    pub(super) fn on_timeout(&mut self) {
        self.clear();
        self.stats.timeouts += 1;
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn seq(n: i32) -> TcpSeqNumber {
        TcpSeqNumber(n)
    }

    #[test]
    fn holes_below_the_highest_sack_are_resent_in_order() {
        let mut sb = Scoreboard::default();
        let blocks = [Some((3000, 5000)), Some((6000, 9000)), None];
        assert!(sb.on_ack(seq(1000), &blocks, seq(10000), 0, 500));
        assert_eq!(sb.next_hole(seq(1000), 500), Some((seq(1000), 500)));
        sb.sent(seq(1000), 500);
        assert_eq!(sb.next_hole(seq(1000), 500), Some((seq(1500), 500)));
        for s in [1500, 2000] {
            sb.on_ack(seq(1000), &blocks, seq(10000), 0, 500);
            sb.sent(seq(s), 500);
        }
        assert_eq!(sb.next_hole(seq(1000), 500), Some((seq(2500), 500)));
        sb.sent(seq(2500), 500);
        assert_eq!(sb.next_hole(seq(1000), 500), Some((seq(5000), 500)));
        sb.sent(seq(5000), 500);
        sb.on_ack(seq(1000), &blocks, seq(10000), 0, 500);
        sb.sent(seq(5500), 500);
        // Above the highest SACK nothing is known lost.
        assert_eq!(sb.next_hole(seq(1000), 500), None);
        // An ACK past the recovery point ends the episode.
        assert!(!sb.on_ack(seq(10000), &[None; 3], seq(10000), 0, 500));
        assert!(!sb.in_recovery());
    }

    #[test]
    fn bogus_blocks_are_ignored_and_ranges_merge() {
        let mut sb = Scoreboard::default();
        // Below the ACK (D-SACK), beyond what was sent, inverted.
        let bogus = [Some((0, 500)), Some((9000, 20000)), Some((4000, 3000))];
        assert!(!sb.on_ack(seq(1000), &bogus, seq(10000), 0, 500));
        assert_eq!(sb.len, 0);
        for b in [(2000, 2500), (3000, 3500), (2500, 3000)] {
            sb.on_ack(seq(1000), &[Some(b), None, None], seq(10000), 0, 500);
        }
        assert_eq!(&sb.ranges[..sb.len], &[(seq(2000), seq(3500))]);
    }

    #[test]
    fn many_blocks_never_overflow_the_board() {
        let mut sb = Scoreboard::default();
        for i in 0..100 {
            let l = 2000 + i * 200;
            sb.on_ack(seq(1000), &[Some((l as u32, l as u32 + 100)), None, None], seq(100_000), 0, 100);
        }
        assert!(sb.len <= MAX_RANGES);
        assert!(sb.in_recovery());
    }

    #[test]
    fn dup_acks_without_sack_resend_the_first_segment_once() {
        let mut sb = Scoreboard::default();
        assert!(sb.on_ack(seq(1000), &[None; 3], seq(5000), 3, 500));
        assert_eq!(sb.next_hole(seq(1000), 500), Some((seq(1000), 500)));
        sb.sent(seq(1000), 500);
        assert_eq!(sb.next_hole(seq(1000), 500), None);
        // A partial ACK: the next segment is missing too (NewReno).
        sb.on_ack(seq(1500), &[None; 3], seq(5000), 0, 500);
        assert_eq!(sb.next_hole(seq(1500), 500), Some((seq(1500), 500)));
    }
}
