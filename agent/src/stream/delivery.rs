//! What the sender has delivered, and how long events took from the kernel
//! to the collector's disk: reported at exit (`--stats-file`) and by the
//! pipeline benchmark.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use serde::Serialize;

/// Sub-buckets per power of two: latencies are kept to within ~9 %.
const SUB: u32 = 8;
/// Powers of two of microseconds covered (up to ~36 minutes).
const POWERS: u32 = 31;

/// A log-linear histogram of microseconds, fixed in size.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (POWERS * SUB) as usize],
            total: 0,
            max: 0,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < u64::from(SUB) {
        return us as usize;
    }
    let power = 63 - us.leading_zeros(); // >= 3
    let sub = (us >> (power - SUB.trailing_zeros())) as u32 - SUB;
    let i = (power + 1 - SUB.trailing_zeros()) * SUB + sub;
    (i as usize).min((POWERS * SUB) as usize - 1)
}

/// The smallest value of bucket `i`.
fn floor(i: usize) -> u64 {
    let i = i as u32;
    if i < SUB {
        return u64::from(i);
    }
    let power = i / SUB - 1 + SUB.trailing_zeros();
    (u64::from(SUB) + u64::from(i % SUB)) << (power - SUB.trailing_zeros())
}

impl Histogram {
    /// Records one value, in microseconds.
    pub fn record(&mut self, us: u64) {
        self.counts[bucket(us)] += 1;
        self.total += 1;
        self.max = self.max.max(us);
    }

    /// The value at quantile `q` (0..=1), in microseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return floor(i).min(self.max);
            }
        }
        self.max
    }

    /// Values recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Delivery counters, shared by the sender and whoever reports them.
#[derive(Default)]
pub struct Delivery {
    sent: AtomicU64,
    acked: AtomicU64,
    connected: std::sync::atomic::AtomicBool,
    latency: Mutex<Histogram>,
}

/// A snapshot of [`Delivery`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Events sent (a resend after a reconnection counts again).
    pub sent: u64,
    /// Highest sequence number the collector acknowledged as durable.
    pub acked_through: u64,
    /// Events whose time of acknowledgement was measured.
    pub latency_samples: u64,
    /// Kernel event time to durable acknowledgement, median, microseconds.
    pub latency_p50_us: u64,
    /// The same, 99th percentile.
    pub latency_p99_us: u64,
    /// The same, largest.
    pub latency_max_us: u64,
}

impl Delivery {
    /// Says whether a stream to the collector is open.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether a stream to the collector is open.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Counts events sent.
    pub fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The collector acknowledged everything through `through`: the events
    /// in flight up to it have their latency recorded.
    pub fn acked(&self, through: u64, in_flight: &mut VecDeque<(u64, i64)>) {
        self.acked.fetch_max(through, Ordering::Relaxed);
        if in_flight.front().is_none_or(|&(seq, _)| seq > through) {
            return;
        }
        let now = driftwatch_proto::time::now_unix_nanos();
        let mut h = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(&(seq, time)) = in_flight.front() {
            if seq > through {
                break;
            }
            in_flight.pop_front();
            if time > 0 {
                h.record((now.saturating_sub(time).max(0) / 1000) as u64);
            }
        }
    }

    /// The counters now.
    pub fn report(&self) -> DeliveryReport {
        let h = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        DeliveryReport {
            sent: self.sent.load(Ordering::Relaxed),
            acked_through: self.acked.load(Ordering::Relaxed),
            latency_samples: h.len(),
            latency_p50_us: h.quantile(0.5),
            latency_p99_us: h.quantile(0.99),
            latency_max_us: h.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_within_an_eighth() {
        let mut last = 0;
        for us in [0u64, 1, 7, 8, 9, 15, 16, 17, 100, 1000, 12_345, 1 << 30] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            let f = floor(b);
            assert!(f <= us && us - f <= us / 8 + 1, "{us} in bucket from {f}");
        }
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let mut h = Histogram::default();
        for us in 1..=1000 {
            h.record(us);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((450..=500).contains(&p50), "{p50}");
        assert!((900..=990).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000_u64.min(h.quantile(1.0)));
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
