//! The agent stream service: `Hello`, then batches, heartbeats and dropped
//! ranges up; acks, the policy and scan requests down. An ack names the
//! highest sequence number that is on disk (fsync'd), never more; the
//! events it covers are then judged by the correlator, in order.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use driftwatch_proto::time::now_unix_nanos;
use driftwatch_proto::v1::{
    agent_message::Msg, agent_service_server::AgentService, collector_message, Ack, AgentMessage,
    CollectorMessage, Event, Gap, PolicyUpdate, ScanRequest,
};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use crate::correlate::Correlator;
use crate::policy::Loaded;
use crate::store::{sled_store::SledStore, EventLog, StoreError};

type Outbound = mpsc::Sender<Result<CollectorMessage, Status>>;

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The gRPC status for a store error.
pub fn status_of(e: &StoreError) -> Status {
    match e {
        StoreError::OutOfOrder { .. } => Status::failed_precondition(e.to_string()),
        StoreError::Conflict { .. } => Status::already_exists(e.to_string()),
        StoreError::Foreign { .. } => Status::permission_denied(e.to_string()),
        StoreError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Backend(_) | StoreError::Corrupt { .. } | StoreError::CorruptBlock(_) => {
            Status::unavailable(e.to_string())
        }
    }
}

/// A stream error from the transport, as the agent should see it: a message
/// that does not decode is the client's fault, not ours.
fn inbound_status(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && s.message().contains("decode") {
        Status::invalid_argument(format!("malformed message: {}", s.message()))
    } else if s.code() == tonic::Code::OutOfRange && s.message().contains("too large") {
        // gRPC's convention for a message over the size limit.
        Status::resource_exhausted(s.message().to_owned())
    } else {
        s
    }
}

fn valid_node_name(name: &str) -> Result<(), Status> {
    // Names end up in logs, terminals and file names: no control
    // characters (a newline forges a log line, an escape drives a
    // terminal), no '/'. `{name:?}` escapes what is refused.
    if name.is_empty() || name.len() > 253 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(Status::invalid_argument(format!(
            "node name {name:?} must be 1-253 bytes without control characters or '/'"
        )));
    }
    Ok(())
}

/// Group commit: streams append and move on; one task fsyncs whatever has
/// been written and publishes the generation that is now durable. An ack
/// waits for the generation of its batch, so every ack still means "on disk",
/// but one fsync covers many batches from many agents.
pub struct Durability {
    store: Arc<dyn EventLog>,
    /// The judging state's database, when it is not the event log's: made
    /// durable by the same group commit.
    state: Option<SledStore>,
    written: AtomicU64,
    dirty: Notify,
    durable: watch::Sender<u64>,
    /// Why the store cannot be made durable, while it cannot (a full disk:
    /// sled keeps its I/O error until it is opened again).
    failed: watch::Sender<Option<String>>,
}

impl Durability {
    /// Starts the flusher for `store`.
    pub fn start(store: Arc<dyn EventLog>, state: Option<SledStore>) -> Arc<Self> {
        let (durable, _) = watch::channel(0);
        let (failed, _) = watch::channel(None);
        let d = Arc::new(Self {
            store,
            state,
            written: AtomicU64::new(0),
            dirty: Notify::new(),
            durable,
            failed,
        });
        let flusher = d.clone();
        tokio::spawn(async move {
            loop {
                flusher.dirty.notified().await;
                // Every append that counted itself before this load is complete.
                let target = flusher.written.load(Ordering::SeqCst);
                // On a blocking thread: an fsync, or a commit round trip.
                let store = flusher.store.clone();
                let state = flusher.state.clone();
                let flushed = tokio::task::spawn_blocking(move || {
                    store.flush()?;
                    state.map_or(Ok(()), |s| s.flush_blocking())
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Backend(format!("flush task: {e}"))));
                if let Err(e) = flushed {
                    if flusher.failed.borrow().is_none() {
                        tracing::error!("flushing the store failed; nothing more is acknowledged and agents are refused until it works again: {e}");
                    }
                    flusher.failed.send_replace(Some(e.to_string()));
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    flusher.dirty.notify_one();
                    continue;
                }
                if flusher.failed.borrow().is_some() {
                    tracing::info!("the store writes again");
                    flusher.failed.send_replace(None);
                }
                flusher.durable.send_replace(target);
            }
        });
        d
    }

    /// Records a completed write; returns the generation to wait for.
    pub fn wrote(&self) -> u64 {
        let g = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        self.dirty.notify_one();
        g
    }

    /// Waits until generation `g` is on disk; refuses while the store
    /// cannot write.
    pub async fn wait(&self, g: u64) -> Result<(), Status> {
        let mut rx = self.durable.subscribe();
        let mut failed = self.failed.subscribe();
        loop {
            if *rx.borrow_and_update() >= g {
                return Ok(());
            }
            if let Some(e) = failed.borrow_and_update().clone() {
                return Err(Status::unavailable(format!(
                    "the collector cannot write its store ({e}); keep the events and retry"
                )));
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(Status::unavailable("the collector is stopping")) },
                r = failed.changed() => if r.is_err() { return Err(Status::unavailable("the collector is stopping")) },
            }
        }
    }

    /// Why the store cannot write, while it cannot: a watch for the
    /// collector's recovery.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failed.subscribe()
    }
}

/// One writer per node: the newest stream of a node owns it, and an older
/// one (a connection its agent has given up on, or a clone of the machine
/// under the same name) is refused at its next batch instead of
/// interleaving its sequence numbers with the owner's. The check and the
/// append happen under `append`, so a takeover cannot slip between them.
#[derive(Default)]
struct Owner {
    stream: AtomicU64,
    append: Mutex<()>,
}

/// A stream's claim on its node: given up when the stream's handling ends
/// however it ends (a hello that fails included), unless a newer stream
/// holds the node by then.
struct Claim {
    owner: Arc<Owner>,
    stream: u64,
}

impl Claim {
    /// Gives the node up; true when this stream still held it.
    fn release(&self) -> bool {
        self.owner
            .stream
            .compare_exchange(self.stream, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.release();
    }
}

/// The service.
#[derive(Clone)]
pub struct Ingest {
    store: Arc<dyn EventLog>,
    durability: Arc<Durability>,
    correlator: Arc<Correlator>,
    /// The open stream of each connected agent, for requests down.
    links: Arc<Mutex<HashMap<String, Outbound>>>,
    /// Which stream may write each node's events (see [`Owner`]).
    owners: Arc<Mutex<HashMap<String, Arc<Owner>>>>,
    /// Numbers streams for [`Owner`].
    next_stream: Arc<AtomicU64>,
    /// Newly stored events, for `timeline --follow`.
    pub stored: broadcast::Sender<Event>,
    /// Becomes true when the collector stops: open streams end with
    /// UNAVAILABLE instead of holding the stop until their agents leave.
    closing: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Ingest {
    /// What ingest counts, for `/metrics`.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// Ends every open stream, and refuses new ones, once `closing` turns
    /// true.
    pub fn closing_on(mut self, closing: watch::Receiver<bool>) -> Self {
        self.closing = closing;
        self
    }

    /// Turns true when the collector stops.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.clone()
    }

    /// Why the store cannot write, while it cannot.
    pub fn store_failure(&self) -> watch::Receiver<Option<String>> {
        self.durability.failure()
    }
}

fn policy_message(p: &Loaded) -> CollectorMessage {
    CollectorMessage {
        msg: Some(collector_message::Msg::Policy(PolicyUpdate {
            version: p.version.clone(),
            yaml: p.text.clone(),
            source: p.source.clone(),
        })),
    }
}

impl Ingest {
    /// A service writing to `store` and judging with `correlator` (starts
    /// its flusher: call within a runtime). `state` is the judging state's
    /// database when the events are elsewhere: each group commit makes it
    /// durable too.
    pub fn new(
        store: Arc<dyn EventLog>,
        correlator: Arc<Correlator>,
        state: Option<SledStore>,
    ) -> Self {
        let (stored, _) = broadcast::channel(65536);
        Self {
            durability: Durability::start(store.clone(), state),
            store,
            correlator,
            links: Arc::default(),
            owners: Arc::default(),
            next_stream: Arc::new(AtomicU64::new(1)),
            stored,
            closing: watch::channel(false).1,
            metrics: Arc::default(),
        }
    }

    /// The ownership record of `node`.
    fn owner(&self, node: &str) -> Arc<Owner> {
        self.owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.to_owned())
            .or_default()
            .clone()
    }

    /// Asks the agent of `node` to digest `path` for a baseline scan.
    pub async fn request_scan(&self, node: &str, scan_id: &str, path: &str) -> Result<(), Status> {
        let link = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .cloned();
        let Some(link) = link else {
            return Err(Status::failed_precondition(format!(
                "the agent of {node:?} is not connected; a scan needs it online"
            )));
        };
        let m = CollectorMessage {
            msg: Some(collector_message::Msg::Scan(ScanRequest {
                scan_id: scan_id.to_owned(),
                path: path.to_owned(),
            })),
        };
        link.send(Ok(m))
            .await
            .map_err(|_| Status::unavailable(format!("the stream of {node:?} just closed")))
    }
}

impl Ingest {
    /// True when `node`'s agent streams to another replica: not here, but
    /// the shared log says it is connected.
    pub async fn connected_elsewhere(&self, node: &str) -> bool {
        if self.linked(node) {
            return false;
        }
        let (store, node) = (self.store.clone(), node.to_owned());
        tokio::task::spawn_blocking(move || store.agent(&node))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .is_some_and(|a| a.connected)
    }

    fn linked(&self, node: &str) -> bool {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(node)
    }

    /// Asks the agents streaming here for the scans another replica
    /// recorded for them, every second.
    pub fn spawn_scan_router(&self) {
        let ingest = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let c = ingest.correlator.clone();
                let unsent = match tokio::task::spawn_blocking(move || c.unsent_scans()).await {
                    Ok(Ok(u)) => u,
                    Ok(Err(e)) => {
                        tracing::warn!("reading the scans to send: {e}");
                        continue;
                    }
                    Err(_) => return,
                };
                for (id, scan) in unsent {
                    if !ingest.linked(&scan.node) {
                        continue;
                    }
                    if let Err(e) = ingest.request_scan(&scan.node, &id, &scan.path).await {
                        tracing::warn!(scan_id = %id, node = %scan.node, "asking for a scan recorded by another replica: {}", e.message());
                        continue;
                    }
                    tracing::info!(scan_id = %id, node = %scan.node, path = %scan.path, "a scan recorded by another replica was asked of its agent");
                    let (c, sid) = (ingest.correlator.clone(), id.clone());
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.scan_sent(&sid)).await
                    {
                        tracing::warn!(scan_id = %id, "marking the scan sent: {e}");
                    }
                }
            }
        });
    }
}

fn record_gap(store: &dyn EventLog, correlator: &Correlator, gap: &Gap) -> Result<(), Status> {
    store.add_gap(gap).map_err(|e| status_of(&e))?;
    correlator.gap(gap).map_err(|e| status_of(&e))
}

/// What the acking side of a stream does once a write is durable.
struct Pending {
    generation: u64,
    through: u64,
    events: Vec<Event>,
    /// Events kept out as invalid.
    refused: u64,
    error: Option<Status>,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<CollectorMessage, Status>> + Send>>;

fn ack(through: u64) -> CollectorMessage {
    CollectorMessage {
        msg: Some(collector_message::Msg::Ack(Ack { through })),
    }
}

#[tonic::async_trait]
impl AgentService for Ingest {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let caller = crate::security::auth::caller(&request);
        let mut inbound = request.into_inner();
        // A connection that never says hello holds nothing for long.
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no hello within {}s of opening the stream",
                    HELLO_TIMEOUT.as_secs()
                ))
            })?
            .map_err(inbound_status)?
            .ok_or_else(|| Status::invalid_argument("stream closed before hello"))?;
        let Some(Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let node = hello
            .node
            .ok_or_else(|| Status::invalid_argument("hello without node info"))?;
        valid_node_name(&node.name)?;
        // An agent's certificate names the one node it may speak for.
        if let crate::security::auth::Caller::Node(allowed) = &caller {
            if *allowed != node.name {
                tracing::warn!(certificate = %allowed.escape_debug(), hello = %node.name.escape_debug(), "refused a hello for another node");
                return Err(Status::permission_denied(format!(
                    "the certificate of node {allowed:?} may not stream as node {:?}",
                    node.name
                )));
            }
        }
        let name = node.name.clone();
        let store = self.store.clone();
        let now = now_unix_nanos();

        // The new stream owns the node from here; its hello is written
        // under the owner's lock, so no append of an older stream can
        // interleave with it.
        let claim = Claim {
            owner: self.owner(&name),
            stream: self.next_stream.fetch_add(1, Ordering::SeqCst),
        };
        let (previous, status) = {
            let _guard = claim
                .owner
                .append
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if claim.owner.stream.swap(claim.stream, Ordering::SeqCst) != 0 {
                tracing::warn!(
                    node = %name,
                    "a new stream for this node replaces one still open (an agent reconnecting, or two machines with one name); the older one is refused from its next message"
                );
            }
            store
                .hello(&node, now, hello.agent_started_unix_nanos)
                .map_err(|e| status_of(&e))?
        };
        if let Some(p) = &previous {
            if p.agent_started_unix_nanos != 0
                && hello.agent_started_unix_nanos != p.agent_started_unix_nanos
            {
                // A new agent process: nothing was watching from the last
                // contact with the old one until this one started.
                let gap = Gap {
                    node: name.clone(),
                    from_seq: 0,
                    to_seq: 0,
                    from_time_unix_nanos: p.last_seen_unix_nanos,
                    to_time_unix_nanos: hello.agent_started_unix_nanos.max(p.last_seen_unix_nanos),
                    reason: "agent_offline".into(),
                    detail: String::new(),
                };
                record_gap(&*store, &self.correlator, &gap)?;
            }
        }
        self.correlator.seen(&name).map_err(|e| status_of(&e))?;
        tracing::info!(node = %name, acked = status.acked_seq, "agent connected");

        let (tx, rx) = mpsc::channel(64);
        // Tell the agent where to resume; with group commit the stored ack
        // may cover a write not yet on disk, so wait for the next group
        // commit (never a flush of our own: one per connecting agent
        // wedged the store when a cluster reconnected at once).
        let generation = self.durability.wrote();
        self.durability.wait(generation).await?;
        let _ = tx.send(Ok(ack(status.acked_seq))).await;
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), tx.clone());
        // The policy follows the first ack, and every change after it,
        // until the agent's side of the stream ends.
        // So do the access grants for this node.
        let mut policies = self.correlator.policies.subscribe();
        let mut grants = self.correlator.grants.subscribe();
        let policy_tx = tx.clone();
        let grants_node = name.clone();
        let (ended, mut ended_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut sent_policy = None;
            let mut sent_grants = None;
            loop {
                let current = policies.borrow_and_update().clone();
                if let Some(p) = current {
                    if sent_policy.as_ref() != Some(&p.version) {
                        if policy_tx.send(Ok(policy_message(&p))).await.is_err() {
                            return;
                        }
                        sent_policy = Some(p.version.clone());
                    }
                }
                let mine: Vec<_> = grants
                    .borrow_and_update()
                    .iter()
                    .filter(|g| crate::correlate::baselines::host_matches(&g.host, &grants_node))
                    .cloned()
                    .collect();
                if sent_grants.as_ref() != Some(&mine) {
                    let m = CollectorMessage {
                        msg: Some(collector_message::Msg::Grants(
                            driftwatch_proto::v1::Grants {
                                grants: mine.clone(),
                            },
                        )),
                    };
                    if policy_tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                    sent_grants = Some(mine);
                }
                tokio::select! {
                    r = policies.changed() => if r.is_err() { return },
                    r = grants.changed() => if r.is_err() { return },
                    _ = policy_tx.closed() => return,
                    _ = &mut ended_rx => return,
                }
            }
        });
        let stored = self.stored.clone();
        let correlator = self.correlator.clone();
        let acker_node = name.clone();
        let durability = self.durability.clone();
        let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(64);
        // Acks go out in order, each once its write is on disk.
        let ack_tx = tx.clone();
        let metrics = self.metrics.clone();
        let acker = tokio::spawn(async move {
            while let Some(p) = pending_rx.recv().await {
                if let Err(status) = durability.wait(p.generation).await {
                    // Nothing after the last ack is promised: the agent
                    // keeps it and sends it again.
                    let _ = ack_tx.send(Err(status)).await;
                    return;
                }
                let judging = std::time::Instant::now();
                if let Err(e) = correlator.process(&acker_node, &p.events) {
                    tracing::error!(node = %acker_node, "judging stored events failed (judged again at the next start): {e}");
                }
                metrics
                    .judge_seconds
                    .observe(judging.elapsed().as_secs_f64());
                metrics.stored(p.events.iter().map(crate::query::kind_of));
                metrics.refused.inc_by(p.refused);
                for e in p.events {
                    let _ = stored.send(e);
                }
                if ack_tx.send(Ok(ack(p.through))).await.is_err() {
                    return;
                }
                if let Some(status) = p.error {
                    let _ = ack_tx.send(Err(status)).await;
                    return;
                }
            }
        });
        let durability = self.durability.clone();
        let correlator = self.correlator.clone();
        let links = self.links.clone();
        let mut closing = self.closing.clone();
        let streams = self.metrics.streams.clone();
        streams.inc();
        tokio::spawn(async move {
            let result = tokio::select! {
                r = serve(
                    &*store,
                    &correlator,
                    &durability,
                    &name,
                    &claim,
                    &mut inbound,
                    &pending_tx,
                ) => r,
                // What was written is still acked below; the agent sends
                // the rest again to whichever collector it reaches next.
                _ = crate::closed(&mut closing) => Err(Status::unavailable("the collector is stopping; reconnect to resume")),
            };
            {
                let mut links = links
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if links.get(&name).is_some_and(|l| l.same_channel(&tx)) {
                    links.remove(&name);
                }
            }
            drop(pending_tx);
            let _ = acker.await;
            if let Err(s) = &result {
                tracing::warn!(node = %name, "closing the agent's stream: {}", s.message());
                let _ = tx.send(Err(s.clone())).await;
            }
            {
                // Ended: the node is disconnected, unless a newer stream
                // owns it by now (its record is that stream's to write).
                let _guard = claim
                    .owner
                    .append
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if claim.release() {
                    let now = now_unix_nanos();
                    let updated = store.update_agent(&name, &mut |a| {
                        a.connected = false;
                        a.last_seen_unix_nanos = now;
                    });
                    match updated {
                        // Durable with the next group commit.
                        Ok(Some(_)) => {
                            durability.wrote();
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(node = %name, "recording the disconnect: {e}");
                        }
                    }
                }
            }
            tracing::info!(node = %name, "agent disconnected");
            streams.dec();
            // With the policy task gone this was the last sender: the
            // answer stream ends with an OK status.
            drop(ended);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn serve(
    store: &dyn EventLog,
    correlator: &Correlator,
    durability: &Durability,
    name: &str,
    claim: &Claim,
    inbound: &mut Streaming<AgentMessage>,
    pending: &mpsc::Sender<Pending>,
) -> Result<(), Status> {
    while let Some(msg) = inbound.message().await.map_err(inbound_status)? {
        // Judged and written as the node's owner, under its lock; the ack
        // is queued after the lock is let go.
        let next = {
            let _guard = claim
                .owner
                .append
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if claim.owner.stream.load(Ordering::SeqCst) != claim.stream {
                return Err(Status::aborted(format!(
                    "a newer stream for node {name:?} replaced this one; one agent per node name"
                )));
            }
            handle(store, correlator, durability, name, msg)?
        };
        if let Some(p) = next {
            let stop = p.error.is_some();
            if pending.send(p).await.is_err() || stop {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// One message of a node's stream: what to acknowledge once it is durable.
fn handle(
    store: &dyn EventLog,
    correlator: &Correlator,
    durability: &Durability,
    name: &str,
    msg: AgentMessage,
) -> Result<Option<Pending>, Status> {
    let status_err = |e: StoreError| status_of(&e);
    match msg.msg {
        Some(Msg::Batch(batch)) => {
            let t = std::time::Instant::now();
            let done = store
                .append(name, &batch.events, now_unix_nanos())
                .map_err(status_err)?;
            for g in &done.quarantined {
                tracing::warn!(node = name, from = g.from_seq, to = g.to_seq, reason = %g.detail, "events kept out of the store as invalid; recorded as a gap");
                correlator.gap(g).map_err(status_err)?;
            }
            let generation = durability.wrote();
            tracing::debug!(node = name, events = batch.events.len(), appended = ?t.elapsed(), "batch written");
            let events = batch
                .events
                .into_iter()
                .filter(|e| e.seq > done.before && e.seq <= done.through)
                .collect();
            // Whatever part was accepted is acked once durable; then the
            // refusal, if any, ends the stream.
            Ok(Some(Pending {
                generation,
                through: done.through,
                events,
                refused: done
                    .quarantined
                    .iter()
                    .map(|g| g.to_seq - g.from_seq + 1)
                    .sum(),
                error: done.refused.map(|e| status_of(&e)),
            }))
        }
        Some(Msg::Heartbeat(h)) => {
            let now = now_unix_nanos();
            store
                .update_agent(name, &mut |a| {
                    a.last_seen_unix_nanos = now;
                    a.last_seq = a.last_seq.max(h.last_seq);
                })
                .map_err(status_err)?;
            correlator.seen(name).map_err(status_err)?;
            Ok(None)
        }
        Some(Msg::Dropped(d)) => {
            if d.from_seq == 0 || d.to_seq < d.from_seq {
                return Err(Status::invalid_argument(format!(
                    "dropped range {}..={} is empty or starts at 0",
                    d.from_seq, d.to_seq
                )));
            }
            let now = now_unix_nanos();
            let gap = Gap {
                node: name.to_owned(),
                from_seq: d.from_seq,
                to_seq: d.to_seq,
                from_time_unix_nanos: now,
                to_time_unix_nanos: now,
                reason: "agent_dropped".into(),
                // The agent's own word for why (bounded: it is stored).
                detail: d.reason.chars().take(256).collect(),
            };
            record_gap(store, correlator, &gap)?;
            let through = store
                .agent(name)
                .map_err(status_err)?
                .map(|a| a.acked_seq)
                .unwrap_or(0);
            Ok(Some(Pending {
                generation: durability.wrote(),
                through,
                events: Vec::new(),
                refused: 0,
                error: None,
            }))
        }
        Some(Msg::Hello(_)) => Err(Status::invalid_argument("hello sent twice")),
        None => Err(Status::invalid_argument("empty message")),
    }
}
