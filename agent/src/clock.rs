//! Kernel timestamps (boot clock) to wall-clock time.

use std::fmt;

use serde::{Serialize, Serializer};

/// A wall-clock instant, nanoseconds since the Unix epoch: what the wire
/// carries. Shown (and serialized) as RFC 3339 text, rendered only when
/// someone reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time(pub i64);

impl Time {
    /// Nanoseconds since the Unix epoch.
    pub fn unix_nanos(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        driftwatch_proto::time::Rfc3339(i128::from(self.0)).fmt(f)
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Converts `CLOCK_BOOTTIME` nanoseconds to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// `CLOCK_REALTIME - CLOCK_BOOTTIME`, in nanoseconds.
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn saturate(ns: i128) -> Time {
    Time(ns.clamp(0, i128::from(i64::MAX)) as i64)
}

impl Clock {
    /// Measures the offset now.
    pub fn new() -> Self {
        Self {
            offset_ns: now_ns(libc::CLOCK_REALTIME) - now_ns(libc::CLOCK_BOOTTIME),
        }
    }

    /// Wall-clock time of a boot-clock instant.
    pub fn at_boot_ns(&self, boot_ns: u64) -> Time {
        saturate(i128::from(boot_ns) + self.offset_ns)
    }

    /// `CLOCK_BOOTTIME` now, nanoseconds (the clock of kernel event times
    /// and of `bpf_ktime_get_boot_ns`).
    pub fn boot_ns() -> u64 {
        now_ns(libc::CLOCK_BOOTTIME).clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Wall-clock time now.
    pub fn now() -> Time {
        saturate(now_ns(libc::CLOCK_REALTIME))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_reads_as_rfc3339_and_round_trips() {
        let t = Time(1_700_000_000_123_456_789);
        let text = serde_json::to_string(&t).unwrap();
        assert_eq!(text, "\"2023-11-14T22:13:20.123456789Z\"");
        let back = driftwatch_proto::time::parse_rfc3339(text.trim_matches('"')).unwrap();
        assert_eq!(back, t.0);
    }
}
