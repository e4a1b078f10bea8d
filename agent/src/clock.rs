//! Kernel timestamps (boot clock) to wall-clock RFC 3339 text.

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

impl Clock {
    /// Measures the offset now.
    pub fn new() -> Self {
        Self {
            offset_ns: now_ns(libc::CLOCK_REALTIME) - now_ns(libc::CLOCK_BOOTTIME),
        }
    }

    /// Wall-clock time of a boot-clock instant.
    pub fn boot_ns_to_rfc3339(&self, boot_ns: u64) -> String {
        rfc3339(i128::from(boot_ns) + self.offset_ns)
    }

    /// Wall-clock time now.
    pub fn now_rfc3339() -> String {
        rfc3339(now_ns(libc::CLOCK_REALTIME))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub use driftwatch_proto::time::rfc3339;
