//! What the collector exposes on `--metrics-listen` (`/metrics`, OpenMetrics
//! text): ingest, judging, the store, findings and agents.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::{correlate::Correlator, store::EventLog};

/// A label of one value.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// Event or finding kind.
    pub kind: String,
}

/// A node's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Node {
    /// Node name.
    pub node: String,
}

/// The collector's metrics; clones share them.
#[derive(Clone)]
pub struct Metrics {
    /// Events stored durably and acknowledged, by kind.
    pub events: Family<Kind, Counter>,
    /// Batches acknowledged.
    pub batches: Counter,
    /// Events kept out of the store as invalid.
    pub refused: Counter,
    /// Seconds spent judging one durable batch.
    pub judge_seconds: Histogram,
    /// Agent streams open now.
    pub streams: Gauge,
    findings_open: Family<Kind, Gauge>,
    store_bytes: Gauge<u64, AtomicU64>,
    store_failed: Gauge,
    agents_connected: Gauge,
    agent_unacked: Family<Node, Gauge>,
    agent_last_seen: Family<Node, Gauge<i64, AtomicI64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events: Family::default(),
            batches: Counter::default(),
            refused: Counter::default(),
            // 100 µs .. ~1.6 s.
            judge_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 15),
            ),
            streams: Gauge::default(),
            findings_open: Family::default(),
            store_bytes: Gauge::default(),
            store_failed: Gauge::default(),
            agents_connected: Gauge::default(),
            agent_unacked: Family::default(),
            agent_last_seen: Family::default(),
        }
    }
}

impl Metrics {
    /// Counts a durable batch of events.
    pub fn stored<'a>(&self, kinds: impl Iterator<Item = &'a str>) {
        self.batches.inc();
        // A batch is mostly of one or two kinds: count runs, not events.
        let mut run: Option<(&str, u64)> = None;
        for k in kinds {
            match &mut run {
                Some((kind, n)) if *kind == k => *n += 1,
                _ => {
                    if let Some((kind, n)) = run.replace((k, 1)) {
                        self.count(kind, n);
                    }
                }
            }
        }
        if let Some((kind, n)) = run {
            self.count(kind, n);
        }
    }

    fn count(&self, kind: &str, n: u64) {
        self.events
            .get_or_create(&Kind {
                kind: kind.to_owned(),
            })
            .inc_by(n);
    }

    /// A registry holding every metric, under `driftwatch_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("driftwatch");
        r.register(
            "ingest_events",
            "Events stored durably and acknowledged to their agent, by kind",
            self.events.clone(),
        );
        r.register(
            "ingest_batches",
            "Batches of events acknowledged to agents",
            self.batches.clone(),
        );
        r.register(
            "ingest_refused_events",
            "Events kept out of the store as invalid (each a collector_refused gap)",
            self.refused.clone(),
        );
        r.register_with_unit(
            "judge_duration",
            "Time to judge one durable batch against the policy, baselines and approvals",
            Unit::Seconds,
            self.judge_seconds.clone(),
        );
        r.register("agent_streams", "Agent streams open", self.streams.clone());
        r.register(
            "findings_open",
            "Findings not resolved, by kind",
            self.findings_open.clone(),
        );
        r.register_with_unit(
            "store_size",
            "Size of the store on disk",
            Unit::Bytes,
            self.store_bytes.clone(),
        );
        r.register(
            "store_failed",
            "1 while the store cannot write (agents are refused and keep their events)",
            self.store_failed.clone(),
        );
        r.register(
            "agents_connected",
            "Agents with a stream open",
            self.agents_connected.clone(),
        );
        r.register(
            "agent_unacked_events",
            "Events an agent has reported sending beyond what is acknowledged, by node",
            self.agent_unacked.clone(),
        );
        r.register(
            "agent_last_seen_timestamp_seconds",
            "Last contact with each node's agent, Unix seconds",
            self.agent_last_seen.clone(),
        );
        r
    }

    /// Samples what is read rather than counted: findings, store, agents.
    pub fn refresh(&self, store: &dyn EventLog, correlator: &Correlator, failed: bool) {
        match correlator.open_by_kind() {
            Ok(open) => {
                self.findings_open.clear();
                for (kind, n) in open {
                    self.findings_open
                        .get_or_create(&Kind { kind })
                        .set(n as i64);
                }
            }
            Err(e) => tracing::warn!("counting open findings for the metrics: {e}"),
        }
        if let Ok(bytes) = store.size_on_disk() {
            self.store_bytes.set(bytes);
        }
        self.store_failed.set(i64::from(failed));
        if let Ok(agents) = store.agents() {
            let mut connected = 0;
            for a in agents {
                let Some(node) = a.node.as_ref().map(|n| n.name.clone()) else {
                    continue;
                };
                connected += i64::from(a.connected);
                let label = Node { node };
                self.agent_unacked
                    .get_or_create(&label)
                    .set(a.last_seq.saturating_sub(a.acked_seq) as i64);
                self.agent_last_seen
                    .get_or_create(&label)
                    .set(a.last_seen_unix_nanos / 1_000_000_000);
            }
            self.agents_connected.set(connected);
        }
    }
}
