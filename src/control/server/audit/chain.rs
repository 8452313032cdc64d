//! Hash-chain checks, pure functions over what the store holds.
//!
//! Each node numbers its events 1, 2, 3, ... and puts the SHA-256 of the
//! previous line in `prev`. Lines arrive in order and possibly more than
//! once. What an arriving event means, given the chain head stored so far:
#![warn(missing_docs)]

/// What to do with an arriving event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Next in the chain: store.
    Ok,
    /// Same id and same content as a stored event: a resend, skip.
    Duplicate,
    /// Same id, different content: the node rewrote its log; keep the first.
    Conflict,
    /// Ids `from..=to` are missing before this one: store, and record the gap.
    Gap { from: u64, to: u64 },
    /// Next id, but `prev` is not the stored previous event's hash: an
    /// earlier line was changed before it was shipped. Store and record.
    Break,
    /// Fills an id below the head (after a recorded gap): store.
    Late,
}

/// `head`: last stored (id, hash) of this node; `stored`: the hash already
/// stored under `id`, if any.
pub fn judge(head: Option<(u64, &str)>, id: u64, prev: &str, stored: Option<&str>, hash: &str) -> Verdict {
    if let Some(h) = stored {
        return if h == hash { Verdict::Duplicate } else { Verdict::Conflict };
    }
    let (last, last_hash) = head.unwrap_or((0, crate::ssh::journal::GENESIS));
    if id == last + 1 {
        if prev == last_hash { Verdict::Ok } else { Verdict::Break }
    } else if id > last + 1 {
        Verdict::Gap { from: last + 1, to: id - 1 }
    } else {
        Verdict::Late
    }
}

/// A problem found by re-walking a node's stored events.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub kind: &'static str,
    pub seq: u64,
    pub detail: String,
}

/// Walks stored `(id, prev, line)` in id order. The first stored event may
/// be above 1 (retention pruned the older ones); everything after it must
/// link up.
pub fn verify(events: impl IntoIterator<Item = (u64, String, String)>) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut last: Option<(u64, String)> = None;
    for (id, prev, line) in events {
        let hash = crate::ssh::journal::line_hash(&line);
        let parsed: Option<(u64, String)> =
            serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| Some((v["id"].as_u64()?, v["prev"].as_str()?.to_string())));
        if parsed != Some((id, prev.clone())) {
            out.push(Problem { kind: "altered", seq: id, detail: "the stored line does not match its id/prev columns".into() });
        }
        match &last {
            None if id > 1 => {}
            None => {
                if prev != crate::ssh::journal::GENESIS {
                    out.push(Problem { kind: "break", seq: id, detail: "the first event does not start the chain".into() });
                }
            }
            Some((l, h)) => {
                if id > l + 1 {
                    out.push(Problem { kind: "gap", seq: id, detail: format!("events {}..={} missing", l + 1, id - 1) });
                } else if &prev != h {
                    out.push(Problem { kind: "break", seq: id, detail: "prev does not match the previous event's hash".into() });
                }
            }
        }
        last = Some((id, hash));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::journal::{GENESIS, line_hash};

    #[test]
    fn arrivals_in_every_order_that_can_happen() {
        assert_eq!(judge(None, 1, GENESIS, None, "h1"), Verdict::Ok);
        assert_eq!(judge(None, 3, "x", None, "h3"), Verdict::Gap { from: 1, to: 2 });
        assert_eq!(judge(Some((1, "h1")), 2, "h1", None, "h2"), Verdict::Ok);
        assert_eq!(judge(Some((1, "h1")), 2, "hX", None, "h2"), Verdict::Break);
        assert_eq!(judge(Some((2, "h2")), 2, "h1", Some("h2"), "h2"), Verdict::Duplicate);
        assert_eq!(judge(Some((2, "h2")), 2, "h1", Some("h2"), "h2'"), Verdict::Conflict);
        assert_eq!(judge(Some((5, "h5")), 3, "h2", None, "h3"), Verdict::Late);
    }

    fn chain(n: u64) -> Vec<(u64, String, String)> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|i| {
                let line = format!("{{\"id\":{i},\"prev\":\"{prev}\",\"event\":\"auth\"}}");
                let out = (i, prev.clone(), line.clone());
                prev = line_hash(&line);
                out
            })
            .collect()
    }

    #[test]
    fn verify_finds_edits_gaps_and_tolerates_pruning() {
        assert!(verify(chain(5)).is_empty());
        let mut c = chain(5);
        c.remove(2);
        assert_eq!(verify(c.clone())[0].kind, "gap");
        // Pruned head: starts at 3, links from there.
        assert!(verify(chain(5).into_iter().skip(2)).is_empty());
        let mut c = chain(5);
        c[1].2 = c[1].2.replace("auth", "session_start");
        let p = verify(c);
        assert_eq!(p.iter().map(|p| (p.kind, p.seq)).collect::<Vec<_>>(), vec![("break", 3)]);
    }
}
