//! Parsing durations (`30d`, `10m`) and sizes (`10GiB`) given on command lines.

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

/// `90s`, `10m`, `12h`, `30d`, `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS: [(&str, u64); 5] = [
        ("s", 1),
        ("m", 60),
        ("h", 3600),
        ("d", 86_400),
        ("w", 7 * 86_400),
    ];
    parse_with(s, "a duration like 90s, 10m, 12h, 30d", &UNITS).map(Duration::from_secs)
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
        assert!(parse_duration("10 minutes").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert!(parse_bytes("lots").is_err());
        // Too large is an error, not an overflow.
        assert_eq!(
            parse_duration("99999999999999999w").unwrap_err(),
            "\"99999999999999999w\" is too large"
        );
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }
}
