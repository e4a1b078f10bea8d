//! The API's times are Unix nanoseconds (`int64 *_unix_nanos`); these turn
//! them into RFC 3339 text and back.

/// Now, Unix nanoseconds (0 if the clock is before 1970).
pub fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Unix nanoseconds to `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
pub fn rfc3339(unix_ns: i128) -> String {
    Rfc3339(unix_ns).to_string()
}

/// Unix nanoseconds shown as `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, written
/// straight into the formatter (no allocation: every event an agent prints
/// carries two of these).
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub i128);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.div_euclid(1_000_000_000);
        let nanos = self.0.rem_euclid(1_000_000_000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        // Civil date from days since 1970-01-01 (proleptic Gregorian).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
        let y = yoe + era * 400 + i128::from(m <= 2);
        let Ok(year @ 0..=9999) = u32::try_from(y) else {
            return write!(
                f,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
                sod / 3600,
                sod % 3600 / 60,
                sod % 60
            );
        };
        let mut b = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, m);
        put(8, 2, d);
        put(11, 2, sod / 3600);
        put(14, 2, sod % 3600 / 60);
        put(17, 2, sod % 60);
        put(20, 9, nanos);
        // Only ASCII digits were written into an ASCII template.
        f.write_str(std::str::from_utf8(&b).map_err(|_| std::fmt::Error)?)
    }
}

/// Parses RFC 3339 (`2026-11-21T16:00:00Z`, fractions and `±HH:MM` offsets
/// allowed) to Unix nanoseconds. Impossible dates (February 31st) are
/// refused, and so are instants a signed 64-bit nanosecond count cannot
/// hold (before 1677 or after 2262) instead of wrapping around.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let ts: jiff::Timestamp = s
        .parse()
        .map_err(|e| format!("{s:?} is not an RFC 3339 time like 2026-11-21T16:00:00Z ({e})"))?;
    i64::try_from(ts.as_nanosecond()).map_err(|_| {
        format!("{s:?} is outside the times events can carry (1677-09-21 to 2262-04-11)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            rfc3339(i128::from(i64::MAX)),
            "2262-04-11T23:47:16.854775807Z"
        );
        // Beyond four-digit years the text still says what the number is.
        assert_eq!(
            rfc3339(-62_167_219_200_000_000_001),
            "-001-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339(1_795_392_000_500_000_000),
            "2026-11-23T00:00:00.500000000Z"
        );
        for t in [0i64, 951_782_400_000_000_001, 1_795_392_000_500_000_000, -1] {
            assert_eq!(parse_rfc3339(&rfc3339(t.into())).unwrap(), t);
        }
        assert_eq!(
            parse_rfc3339("2026-11-23T01:00:00+01:00").unwrap(),
            1_795_392_000_000_000_000
        );
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_err());
        assert!(parse_rfc3339("2026-02-31T00:00:00Z").is_err());
        assert!(parse_rfc3339("2026-11-21T16:00:00").is_err(), "no offset");
        // Past i64 nanoseconds: refused, where arithmetic used to wrap
        // and a timeline from it returned the whole history.
        let far = parse_rfc3339("9000-12-31T23:59:59Z").unwrap_err();
        assert!(far.contains("2262"), "{far}");
        assert!(parse_rfc3339("9999-12-31T23:59:59Z").is_err());
        assert_eq!(
            parse_rfc3339("2262-04-11T23:47:16.854775807Z").unwrap(),
            i64::MAX
        );
    }
}
