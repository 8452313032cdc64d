//! A small parser for session limits such as `30m`, `8h` or `1h30m`.
#![warn(missing_docs)]

use std::time::Duration;

/// Parses `<number><unit>` groups, units `s`, `m`, `h`, `d` (e.g. `90s`,
/// `30m`, `8h`, `1h30m`, `2d`). The total must be positive.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in t.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = num.unwrap_or(0);
            num = Some(n.checked_mul(10).and_then(|n| n.checked_add(d as u64)).ok_or(DurationError::TooLarge)?);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => {
                return Err(DurationError::UnknownUnit(s.into(), c));
            }
        };
        let n = num.take().ok_or_else(|| DurationError::UnitWithoutNumber(s.into(), c))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or(DurationError::TooLarge)?;
    }
    if num.is_some() {
        return Err(DurationError::NoUnit(s.into()));
    }
    if total == 0 {
        return Err(DurationError::Zero(s.into()));
    }
    Ok(Duration::from_secs(total))
}

/// How long a passed `check` counts for one (user, source node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckPeriod {
    /// Every login asks for a code.
    Always,
    /// A passed check admits the same user from the same node for this long.
    For(Duration),
}

impl Default for CheckPeriod {
    fn default() -> Self {
        CheckPeriod::For(CheckPeriod::DEFAULT)
    }
}

impl CheckPeriod {
    pub(crate) const DEFAULT: Duration = Duration::from_secs(12 * 3600);
    /// An approval older than a year is not a second factor any more.
    pub(crate) const MAX: Duration = Duration::from_secs(366 * 86400);

    /// `"always"` or a duration (`"12h"`, `"30m"`, `"1h30m"`), at most a year.
    pub(crate) fn parse(s: &str) -> Result<CheckPeriod, DurationError> {
        if s.trim() == "always" {
            return Ok(CheckPeriod::Always);
        }
        let d = parse_duration(s).map_err(|e| DurationError::CheckPeriod(Box::new(e)))?;
        if d > Self::MAX {
            return Err(DurationError::CheckPeriodTooLong(s.into()));
        }
        Ok(CheckPeriod::For(d))
    }
}

/// A duration (`max_duration`, `check_period`) that does not parse. The
/// text is shown in policy diagnostics, which add file and line.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum DurationError {
    #[error("empty duration; write e.g. \"30m\", \"8h\" or \"1h30m\"")]
    Empty,
    #[error("bad duration \"{0}\": unexpected '{1}' (units are s, m, h, d; e.g. \"1h30m\")")]
    UnknownUnit(String, char),
    #[error("bad duration \"{0}\": unit '{1}' without a number before it")]
    UnitWithoutNumber(String, char),
    #[error("bad duration \"{0}\": number without a unit at the end (units are s, m, h, d)")]
    NoUnit(String),
    #[error("bad duration \"{0}\": must be longer than zero")]
    Zero(String),
    #[error("duration too large")]
    TooLarge,
    #[error("check_period: {0}; or write \"always\" to ask every time")]
    CheckPeriod(Box<DurationError>),
    #[error("check_period \"{0}\" is longer than a year; use at most \"366d\"")]
    CheckPeriodTooLong(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("8h").unwrap(), Duration::from_secs(8 * 3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(2 * 86400));
    }

    #[test]
    fn check_periods() {
        assert_eq!(CheckPeriod::parse("always").unwrap(), CheckPeriod::Always);
        assert_eq!(CheckPeriod::parse("12h").unwrap(), CheckPeriod::For(Duration::from_secs(43200)));
        assert_eq!(CheckPeriod::default(), CheckPeriod::For(CheckPeriod::DEFAULT));
        for bad in ["never", "", "0s", "400d", "Always"] {
            assert!(CheckPeriod::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "10", "h", "1x", "0m", "1 h", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }
}
