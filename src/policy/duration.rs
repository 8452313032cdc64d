//! A small parser for session limits such as `30m`, `8h` or `1h30m`.

use std::time::Duration;

/// Parses `<number><unit>` groups, units `s`, `m`, `h`, `d` (e.g. `90s`,
/// `30m`, `8h`, `1h30m`, `2d`). The total must be positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; write e.g. \"30m\", \"8h\" or \"1h30m\"".into());
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in t.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = num.unwrap_or(0);
            num = Some(n.checked_mul(10).and_then(|n| n.checked_add(d as u64)).ok_or_else(too_big)?);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => {
                return Err(format!("bad duration \"{s}\": unexpected '{c}' (units are s, m, h, d; e.g. \"1h30m\")"));
            }
        };
        let n = num.take().ok_or_else(|| format!("bad duration \"{s}\": unit '{c}' without a number before it"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(too_big)?;
    }
    if num.is_some() {
        return Err(format!("bad duration \"{s}\": number without a unit at the end (units are s, m, h, d)"));
    }
    if total == 0 {
        return Err(format!("bad duration \"{s}\": must be longer than zero"));
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
    pub const DEFAULT: Duration = Duration::from_secs(12 * 3600);
    /// An approval older than a year is not a second factor any more.
    pub const MAX: Duration = Duration::from_secs(366 * 86400);

    /// `"always"` or a duration (`"12h"`, `"30m"`, `"1h30m"`), at most a year.
    pub fn parse(s: &str) -> Result<CheckPeriod, String> {
        if s.trim() == "always" {
            return Ok(CheckPeriod::Always);
        }
        let d = parse_duration(s).map_err(|e| format!("check_period: {e}; or write \"always\" to ask every time"))?;
        if d > Self::MAX {
            return Err(format!("check_period \"{s}\" is longer than a year; use at most \"366d\""));
        }
        Ok(CheckPeriod::For(d))
    }

    /// How old an approval may be, `None` for `always`.
    pub fn max_age(self) -> Option<Duration> {
        match self {
            CheckPeriod::Always => None,
            CheckPeriod::For(d) => Some(d),
        }
    }
}

fn too_big() -> String {
    "duration too large".into()
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
        assert_eq!(CheckPeriod::default().max_age(), Some(CheckPeriod::DEFAULT));
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
