//! Durations of the command line and the environment: `humantime`'s notation (`250ms`,
//! `10s`, `5m`, `1h 30m`, `2min`), or a bare number of seconds (`3`, `0.5`).
//!
//! Every duration option of both binaries is an interval or a deadline (how often to
//! poll, when a heartbeat is stale, when a request is abandoned), for which zero means a
//! busy loop or an instant failure, so zero is refused here, once, for all of them.

use std::time::Duration;

/// Parses a positive duration; the error names the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let duration = if let Ok(seconds) = s.parse::<f64>() {
        Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}): use e.g. 250ms, 10s, 5m or 1h"))?
    };
    if duration.is_zero() {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_forms() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration(" 3 ").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn zero_negative_and_nonsense_are_refused() {
        for bad in [
            "0",
            "0s",
            "0ms",
            "-1",
            "soon",
            "3 days ago",
            "5y2",
            "",
            "NaN",
            "inf",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{:?}", bad.trim())), "{err}");
        }
    }
}
