//! Delivery to the collector: a spool on disk and one gRPC stream.
//!
//! The sender resumes from the collector's acknowledgement on every
//! (re)connection, so a collector restart costs a replay, never an event;
//! redelivered events are stored once because the collector keys them by
//! sequence number. Holes below the first spooled event (evicted from a full
//! spool, or lost in an agent crash before the spool reached disk) are
//! reported as dropped ranges, which the collector shows as gaps.

pub mod convert;
pub mod delivery;
pub mod spool;

use std::{collections::VecDeque, sync::Arc, time::Duration};

use driftwatch_proto::raw::{batch_message, Raw};
use driftwatch_proto::time::now_unix_nanos;
use driftwatch_proto::v1::{
    agent_message::Msg, collector_message, AgentMessage, CollectorMessage, Dropped, Heartbeat,
    Hello, NodeInfo,
};
use prost::Message as _;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;

pub use delivery::{Delivery, DeliveryReport};
pub use spool::Spool;

/// Most events per batch.
const BATCH: usize = 1024;
/// Most bytes of events per batch (a single larger event still goes alone).
const BATCH_BYTES: usize = 1 << 20;
/// Batches sent ahead of the last acknowledgement.
const WINDOW_BATCHES: usize = 32;
/// Events sent ahead of the last acknowledgement.
const WINDOW: u64 = (WINDOW_BATCHES * BATCH) as u64;
/// Longest a spooled event waits for its batch to fill.
const LINGER: Duration = Duration::from_millis(20);
/// Largest message the agent sends (the collector's default limit).
const MAX_MESSAGE: usize = 4 << 20;
/// How long a stopping agent waits for the collector to acknowledge what
/// it has spooled when no deadline is given; what is still unacknowledged
/// then is sent at the next start.
const DRAIN: Duration = Duration::from_secs(3);

fn raw(m: &AgentMessage) -> Raw {
    Raw(m.encode_to_vec())
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Bad URL.
    #[error("collector URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Could not connect.
    #[error("cannot reach the collector at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The transport error and its causes.
        reason: String,
    },
    /// The collector ended or refused the stream.
    #[error("the collector closed the stream: {0}")]
    Status(#[from] tonic::Status),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// Settings of the sender.
#[derive(Clone)]
pub struct Sender {
    /// Collector URLs (`https://host:port`, or `http://` for plaintext):
    /// replicas over one store. The sender streams to one and moves to
    /// the next when it cannot reach it or its stream fails.
    pub urls: Vec<String>,
    /// The one in use.
    pub current: usize,
    /// TLS files, read at each connection.
    pub tls: driftwatch_proto::client::ClientTls,
    /// The spool to read from.
    pub spool: Spool,
    /// Woken when events are spooled.
    pub notify: std::sync::Arc<Notify>,
    /// Set while the sender has nothing waiting to go: only then does a
    /// new event need to wake it (it reads whatever else came meanwhile
    /// when its batch is due).
    pub idle: Arc<std::sync::atomic::AtomicBool>,
    /// What this node is.
    pub node: NodeInfo,
    /// When this agent started, Unix nanoseconds.
    pub started: i64,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Where policies and scan requests from the collector go.
    pub downlink: mpsc::UnboundedSender<Downlink>,
    /// Becomes `Some(deadline)` when the agent stops: the sender delivers
    /// what is spooled until then, ends its stream and returns.
    pub stop: watch::Receiver<Option<std::time::Instant>>,
    /// What was delivered, and how fast.
    pub stats: Arc<Delivery>,
}

/// What the collector asks of the agent.
#[derive(Debug)]
pub enum Downlink {
    /// Apply this policy.
    Policy(driftwatch_proto::v1::PolicyUpdate),
    /// Digest a path for a baseline.
    Scan(driftwatch_proto::v1::ScanRequest),
    /// The access grants in force now.
    Grants(driftwatch_proto::v1::Grants),
}

fn jitter(max: Duration) -> Duration {
    use rand::Rng as _;
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(rand::rng().random_range(0..ms))
}

impl Sender {
    /// Streams until told to stop, reconnecting with exponential backoff
    /// and jitter.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let r = self.stream_once().await;
            self.stats.set_connected(false);
            let mut wait = backoff;
            match r {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    // Another replica next; the backoff grows once every
                    // one of them failed.
                    let next = (self.current + 1) % self.urls.len().max(1);
                    if next != 0 {
                        wait = Duration::from_millis(200);
                    }
                    tracing::warn!(
                        spooled = self.spool.len(),
                        next = %self.urls.get(next).map_or("", String::as_str),
                        "{e}; events stay in the spool, retrying in {:.1}s",
                        wait.as_secs_f64()
                    );
                    self.current = next;
                    if next != 0 {
                        if self.stop.borrow().is_some() {
                            return;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = self.stop.changed() => return,
                        }
                        continue;
                    }
                }
            }
            if self.stop.borrow().is_some() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter(backoff / 2)) => {}
                _ = self.stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn down(&self, m: collector_message::Msg) {
        let d = match m {
            collector_message::Msg::Policy(p) => Downlink::Policy(p),
            collector_message::Msg::Scan(s) => Downlink::Scan(s),
            collector_message::Msg::Grants(g) => Downlink::Grants(g),
            collector_message::Msg::Ack(_) => return,
        };
        let _ = self.downlink.send(d);
    }

    /// One connection: resume from the collector's ack, send, take acks,
    /// policies and scan requests. Returns when the stream ends, or once a
    /// stop is drained.
    async fn stream_once(&mut self) -> Result<(), StreamError> {
        let url = self.urls.get(self.current).cloned().unwrap_or_default();
        let (endpoint, _) =
            driftwatch_proto::client::endpoint(&url, &self.tls).map_err(|reason| {
                StreamError::Url {
                    url: url.clone(),
                    reason,
                }
            })?;
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect().await.map_err(|e| StreamError::Connect {
            url: url.clone(),
            reason: driftwatch_proto::client::error_chain(&e),
        })?;
        // Events travel as the spool keeps them, encoded once: the batch
        // is framed around their bytes, not decoded and encoded again.
        let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<Raw>(WINDOW_BATCHES);
        let hello = AgentMessage {
            msg: Some(Msg::Hello(Hello {
                node: Some(self.node.clone()),
                agent_started_unix_nanos: self.started,
            })),
        };
        let _ = tx.send(raw(&hello)).await;
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("collector not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Raw, CollectorMessage>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/driftwatch.v1.AgentService/Stream",
        );
        let mut inbound = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
            .await?
            .into_inner();
        // The collector answers the hello with where to resume.
        let mut acked = match inbound.message().await? {
            Some(m) => match m.msg {
                Some(collector_message::Msg::Ack(a)) => a.through,
                Some(other) => {
                    self.down(other);
                    0
                }
                None => 0,
            },
            None => return Ok(()),
        };
        tracing::info!(%url, acked, spooled = self.spool.len(), "streaming to the collector");
        if acked > self.spool.last_seq() {
            // The collector holds this node's events beyond any number
            // this spool handed out: go on above them.
            let moved = self.spool.renumber_above(acked)?;
            tracing::warn!(
                acked,
                last = self.spool.last_seq(),
                moved,
                "the collector has this node's events through a sequence number this spool never reached (a wiped spool, or another machine under this node's name); numbering goes on above it"
            );
        }
        self.spool.ack(acked)?;
        self.stats.set_connected(true);
        self.stats.acked(acked, &mut VecDeque::new());
        let mut sent = acked;
        // Times of the events in flight, for their latency when acked.
        let mut in_flight: VecDeque<(u64, i64)> = VecDeque::new();
        let mut beat = tokio::time::interval(self.heartbeat);
        // Set when the agent stops: the time by which the spool must be
        // acknowledged.
        let mut draining: Option<tokio::time::Instant> = None;
        // When the events spooled but not sent are due to go.
        let mut linger: Option<tokio::time::Instant> =
            (self.spool.last_seq() > sent).then(tokio::time::Instant::now);
        loop {
            if sent < acked {
                sent = acked;
            }
            if let Some(deadline) = draining {
                let done = acked >= self.spool.last_seq();
                if done || tokio::time::Instant::now() >= deadline {
                    if !done {
                        tracing::warn!(
                            acked,
                            last = self.spool.last_seq(),
                            "stopping before the collector acknowledged everything; the rest is sent at the next start"
                        );
                    }
                    // End our half of the stream; the collector then ends
                    // its own, and neither side sees a reset.
                    drop(tx);
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    return Ok(());
                }
            }
            // A batch goes when it is full, or once the oldest event in
            // it has waited LINGER: a trickle costs a send and an ack per
            // LINGER, not per run of events the agent read.
            //
            // Idle is said before the spool is looked at: an event pushed
            // after the look sees it and wakes us; one pushed before it is
            // seen here and given its linger.
            self.idle
                .store(linger.is_none(), std::sync::atomic::Ordering::SeqCst);
            let unsent = self.spool.last_seq().saturating_sub(sent);
            if unsent > 0 && linger.is_none() {
                linger = Some(tokio::time::Instant::now() + LINGER);
                self.idle.store(false, std::sync::atomic::Ordering::SeqCst);
            }
            let full = unsent >= BATCH as u64;
            let ripe = linger.is_some_and(|t| tokio::time::Instant::now() >= t);
            if sent - acked < WINDOW && (full || ripe || draining.is_some()) {
                let batch = self.spool.read_after(sent, BATCH, BATCH_BYTES)?;
                if batch.count == 0 {
                    linger = None;
                } else {
                    if batch.first > sent + 1 {
                        let d = Dropped {
                            from_seq: sent + 1,
                            to_seq: batch.first - 1,
                            reason: "spool".into(),
                        };
                        tracing::warn!(
                            from = d.from_seq,
                            to = d.to_seq,
                            "events were lost before delivery; reporting the range"
                        );
                        let m = AgentMessage {
                            msg: Some(Msg::Dropped(d)),
                        };
                        if tx.send(raw(&m)).await.is_err() {
                            return Ok(());
                        }
                    }
                    sent = batch.last;
                    in_flight.extend((batch.first..).zip(batch.times.iter().copied()));
                    self.stats.sent(batch.count);
                    if tx.send(batch_message(&batch.body)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            }
            tokio::select! {
                m = inbound.message() => match m? {
                    Some(m) => match m.msg {
                        Some(collector_message::Msg::Ack(a)) => {
                            acked = acked.max(a.through);
                            self.spool.ack(acked)?;
                            self.stats.acked(acked, &mut in_flight);
                        }
                        Some(other) => self.down(other),
                        None => {}
                    },
                    None => return Ok(()),
                },
                // What was spooled is seen at the top of the loop.
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() && sent - acked < WINDOW => {}
                // A closed channel means the agent is going away too.
                _ = self.stop.changed(), if draining.is_none() => {
                    let until = *self.stop.borrow();
                    draining = Some(until.map_or_else(|| tokio::time::Instant::now() + DRAIN, tokio::time::Instant::from_std));
                }
                _ = tokio::time::sleep_until(draining.unwrap_or_else(tokio::time::Instant::now)), if draining.is_some() => {}
                _ = beat.tick() => {
                    let hb = Heartbeat { time_unix_nanos: now_unix_nanos(), last_seq: self.spool.last_seq() };
                    if tx.send(raw(&AgentMessage { msg: Some(Msg::Heartbeat(hb)) })).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
