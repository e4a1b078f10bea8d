//! What the agent exposes on `--metrics-listen` (`/metrics`, OpenMetrics
//! text): its sensors' counts by kind, the spool and the stream.

use std::collections::BTreeMap;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::event::KindCounters;
use crate::stream::DeliveryReport;

/// An event kind's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// exec, fork, exit, file, connect.
    pub kind: String,
}

/// Where a record was filtered out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Filtered {
    /// The event kind.
    pub kind: String,
    /// `kernel` (outside every watched path or port) or `user` (found
    /// outside the watched set once normalised).
    pub stage: String,
}

/// A guardrail decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Verdict {
    /// `file` or `connect`.
    pub kind: String,
    /// `allowed`, `granted`, `blocked`, `killed` or `would_block`.
    pub verdict: String,
}

/// The agent's metrics. Counts are taken from the kernel's counters and
/// the event loop's at each refresh, so a scrape sees them as of then.
#[derive(Default)]
pub struct Metrics {
    seen: Family<Kind, Counter>,
    filtered: Family<Filtered, Counter>,
    emitted: Family<Kind, Counter>,
    lost: Family<Kind, Counter>,
    received: Family<Kind, Counter>,
    malformed: Counter,
    ring_size: Gauge,
    ring_peak: Gauge,
    spool_waiting: Gauge,
    spool_evicted: Counter,
    spool_last_seq: Gauge,
    acked_seq: Gauge,
    unacked: Gauge,
    connected: Gauge,
    sent: Counter,
    latency_p50: Gauge<f64, std::sync::atomic::AtomicU64>,
    latency_p99: Gauge<f64, std::sync::atomic::AtomicU64>,
    guardrail: Family<Verdict, Counter>,
}

/// Raises a counter to `to` (the sources are totals since start).
fn advance(c: &Counter, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

/// The spool's state, when the agent streams.
pub struct SpoolState {
    /// Events not yet acknowledged.
    pub waiting: u64,
    /// Events evicted because the spool was full.
    pub evicted: u64,
    /// The highest sequence number handed out.
    pub last_seq: u64,
}

impl Metrics {
    /// A registry holding every metric, under `driftwatch_agent_`.
    pub fn registry(self: &std::sync::Arc<Self>) -> Registry {
        let mut r = Registry::with_prefix("driftwatch_agent");
        r.register(
            "sensor_seen",
            "Calls the kernel sensors examined, by kind",
            self.seen.clone(),
        );
        r.register(
            "sensor_filtered",
            "Records filtered out, by kind and stage (kernel or user)",
            self.filtered.clone(),
        );
        r.register(
            "sensor_emitted",
            "Records the kernel wrote to the ring buffer, by kind",
            self.emitted.clone(),
        );
        r.register(
            "sensor_lost",
            "Records lost because the ring buffer was full, by kind (each reported as a loss event)",
            self.lost.clone(),
        );
        r.register(
            "sensor_received",
            "Records the agent read from the ring buffer, by kind",
            self.received.clone(),
        );
        r.register(
            "sensor_malformed",
            "Ring records that did not decode (skipped)",
            self.malformed.clone(),
        );
        r.register(
            "ring_size_bytes",
            "Size of the kernel's event ring buffer",
            self.ring_size.clone(),
        );
        r.register(
            "ring_peak_waiting_bytes",
            "Most bytes waiting in the ring buffer since the agent started (records are lost once it is full)",
            self.ring_peak.clone(),
        );
        r.register(
            "spool_waiting_events",
            "Events spooled and not yet acknowledged by the collector",
            self.spool_waiting.clone(),
        );
        r.register(
            "spool_evicted",
            "Events dropped because the spool was full (each reported as a gap)",
            self.spool_evicted.clone(),
        );
        r.register(
            "spool_last_seq",
            "The highest sequence number handed out",
            self.spool_last_seq.clone(),
        );
        r.register(
            "stream_acked_seq",
            "The highest sequence number the collector acknowledged as durable",
            self.acked_seq.clone(),
        );
        r.register(
            "stream_unacked_events",
            "Sequence numbers handed out and not yet acknowledged",
            self.unacked.clone(),
        );
        r.register(
            "stream_connected",
            "1 while the stream to the collector is open",
            self.connected.clone(),
        );
        r.register(
            "stream_sent_events",
            "Events sent to the collector (a resend counts again)",
            self.sent.clone(),
        );
        r.register(
            "stream_latency_p50_seconds",
            "Kernel event time to durable acknowledgement, median since start",
            self.latency_p50.clone(),
        );
        r.register(
            "stream_latency_p99_seconds",
            "Kernel event time to durable acknowledgement, 99th percentile since start",
            self.latency_p99.clone(),
        );
        r.register(
            "guardrail_decisions",
            "What the guardrails decided on the calls they judged, by event kind and verdict (killed and blocked were stopped)",
            self.guardrail.clone(),
        );
        r
    }

    /// Takes in the ring buffer's size and the most it held lately (the
    /// metric keeps the highest ever: a one-second burst between two
    /// scrapes is not missed).
    pub fn ring(&self, size: u64, peak: u64) {
        self.ring_size.set(size as i64);
        let peak = peak as i64;
        if peak > self.ring_peak.get() {
            self.ring_peak.set(peak);
        }
    }

    /// Takes in the guardrail decisions seen so far (totals since start).
    pub fn guardrails(&self, totals: &BTreeMap<(&str, &str), u64>) {
        for ((kind, verdict), n) in totals {
            let v = Verdict {
                kind: (*kind).to_owned(),
                verdict: (*verdict).to_owned(),
            };
            advance(&self.guardrail.get_or_create(&v), *n);
        }
    }

    /// Takes in the current totals.
    pub fn update(
        &self,
        counters: &BTreeMap<String, KindCounters>,
        malformed: u64,
        spool: Option<SpoolState>,
        delivery: Option<(DeliveryReport, bool)>,
    ) {
        for (kind, c) in counters {
            let k = Kind { kind: kind.clone() };
            advance(&self.seen.get_or_create(&k), c.seen);
            advance(&self.emitted.get_or_create(&k), c.emitted);
            advance(&self.lost.get_or_create(&k), c.dropped);
            advance(&self.received.get_or_create(&k), c.received);
            for (stage, n) in [("kernel", c.filtered_kernel), ("user", c.filtered_user)] {
                let f = Filtered {
                    kind: kind.clone(),
                    stage: stage.into(),
                };
                advance(&self.filtered.get_or_create(&f), n);
            }
        }
        advance(&self.malformed, malformed);
        if let Some(s) = spool {
            self.spool_waiting.set(s.waiting as i64);
            advance(&self.spool_evicted, s.evicted);
            self.spool_last_seq.set(s.last_seq as i64);
            if let Some((d, connected)) = delivery {
                self.acked_seq.set(d.acked_through as i64);
                self.unacked
                    .set(s.last_seq.saturating_sub(d.acked_through) as i64);
                self.connected.set(i64::from(connected));
                advance(&self.sent, d.sent);
                self.latency_p50.set(d.latency_p50_us as f64 / 1e6);
                self.latency_p99.set(d.latency_p99_us as f64 / 1e6);
            }
        }
    }
}
