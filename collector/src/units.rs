//! Parsing durations (`30d`, `1h30m`, `500ms`) and sizes (`10GiB`) given on
//! command lines, and showing ages (`5m`, `2h3m`, `4d`).

use std::time::Duration;

/// Splits `"10GiB"` into `(10, "GiB")` and multiplies by the unit's factor
/// from `units`; `what` names the expected form in errors.
fn parse_with(s: &str, what: &str, units: &[(&str, u64)]) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not {what}");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let factor = units
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, f)| *f)
        .ok_or_else(bad)?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `90s`, `10m`, `1h30m`, `500ms`, `30d`, `2w`, `2 hours` (days are 24
/// hours; months and years, which vary, are refused).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{t:?} is not a duration like 90s, 10m, 1h30m, 500ms or 30d");
    if t.is_empty() || t.starts_with('-') {
        return Err(bad());
    }
    let span: jiff::Span = t.parse().map_err(|e: jiff::Error| {
        if e.to_string().contains("too big") || e.to_string().contains("overflow") {
            format!("{t:?} is too large")
        } else {
            bad()
        }
    })?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(format!(
            "{t:?}: months and years vary in length; give days or weeks"
        ));
    }
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|_| format!("{t:?} is too large"))?;
    Duration::try_from(d).map_err(|_| bad())
}

/// A moment as people give it: a duration back from now (`10m`, `1h30m`)
/// or an RFC 3339 time; Unix nanoseconds.
pub fn when(s: &str) -> Result<i64, String> {
    if let Ok(d) = parse_duration(s) {
        let back = i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        return Ok(driftwatch_proto::time::now_unix_nanos().saturating_sub(back));
    }
    driftwatch_proto::time::parse_rfc3339(s)
        .map_err(|e| format!("{e}, or a duration back from now like 10m"))
}

/// `d` as people write it: `1s`, `1h30m`, `500ms`.
pub fn fmt_duration(d: Duration) -> String {
    match jiff::SignedDuration::try_from(d) {
        Ok(sd) => format!("{sd:#}").replace(' ', ""),
        Err(_) => format!("{}s", d.as_secs()),
    }
}

/// How long ago `then` was, at `now` (both Unix nanoseconds), in at most
/// two units: `40s`, `5m12s`, `2h3m`, `4d5h`; `-` for no time.
pub fn age(then: i64, now: i64) -> String {
    if then <= 0 {
        return "-".into();
    }
    let s = (now.saturating_sub(then) / 1_000_000_000).max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 || m >= 10 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) if m == 0 || h >= 10 => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        _ if h == 0 || d >= 10 => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

/// `0`, `4096`, `512KiB`, `4MiB`, `10GiB` (also KB/MB/GB as powers of ten).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    const UNITS: [(&str, u64); 8] = [
        ("", 1),
        ("B", 1),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
    ];
    parse_with(s, "a size like 4MiB or 10GiB", &UNITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(
            parse_duration("10 minutes").unwrap(),
            Duration::from_secs(600)
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("bogus").unwrap_err().contains("1h30m"));
        assert!(parse_duration("1mo").unwrap_err().contains("months"));
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert!(parse_bytes("lots").is_err());
        // Too large is an error, not an overflow.
        assert!(parse_duration("99999999999999999w").is_err());
        assert_eq!(fmt_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(age(0, 5), "-");
        let s = 1_000_000_000;
        assert_eq!(age(100 * s, 140 * s), "40s");
        assert_eq!(age(s, s + 312 * s), "5m12s");
        assert_eq!(age(s, s + 7380 * s), "2h3m");
        assert_eq!(age(s, s + (4 * 86_400 + 5 * 3600) * s), "4d5h");
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }
}
