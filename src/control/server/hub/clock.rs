//! The hub's one clock value. The driver reads the clock once per command
//! and hands the reading in, so hub logic never reads a clock itself and
//! tests can move time forward without sleeping.

use std::time::Instant;

/// One reading of both clocks: `mono` paces and times out things inside
/// this process (endpoint budgets, ephemeral grace), `unix` is what is
/// stored, compared with stored expiries and shown to people.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    /// Monotonic time, for intervals that must not jump with the wall clock.
    pub(crate) mono: Instant,
    /// Wall time in Unix seconds, for what is stored and shown.
    pub(crate) unix: i64,
}

impl Now {
    /// Reads both clocks; only the driver (and the offline admin path) does.
    pub(crate) fn read() -> Now {
        Now { mono: Instant::now(), unix: crate::control::unix_now() }
    }

    /// The same instant on both clocks, `d` later (tests simulate time
    /// with it; whole seconds keep the two clocks in step).
    #[cfg(test)]
    pub(crate) fn after(self, d: std::time::Duration) -> Now {
        Now { mono: self.mono + d, unix: self.unix.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)) }
    }

    /// A reading at Unix time `unix` (tests).
    #[cfg(test)]
    pub(crate) fn at(unix: i64) -> Now {
        Now { mono: Instant::now(), unix }
    }
}
