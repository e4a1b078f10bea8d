//! Correlation: stored events become findings.
//!
//! Events are judged once they are durable, in each node's sequence order,
//! by one engine behind a lock (the control API's changes take the same
//! lock). A cursor per node (`correlated`: node → last judged seq and its
//! time) is written with the state the judgement left, so a collector that
//! stops between storing and judging judges the rest when it starts.
//!
//! The rules:
//! - a change of a watched file by an identity outside the resource's
//!   `writers` is `unauthorized_write` (failed attempts count too); while an
//!   approved request covers the path the judgement waits for the file's
//!   digest, and a digest that matches the request makes it an approved
//!   change instead;
//! - a digest (content, mode, owner) that differs from the desired state is
//!   `drift`, a file gone is `deleted`, unless an approved request covers it:
//!   then it is an approved-change record and the new state is desired;
//!   back at the desired state, open drift resolves itself;
//! - without desired state, the first state seen is learned;
//! - a connect to a watched port by an identity outside `clients` is
//!   `unauthorized_connect`; refused attempts count;
//! - what a guardrail refused (a connect the kernel failed with EPERM, a
//!   file call whose caller it killed) is `blocked`, and what a guardrail
//!   in mode `audit` would have refused is `would_block`, in place of the
//!   `unauthorized_*` finding; a connect an access grant let through is
//!   recorded under the grant, not flagged;
//! - records lost in the kernel, ranges the agent dropped and windows when
//!   no agent ran are `blind_spot`; an agent without heartbeats for
//!   `silent_after` is `agent_silent`, resolved when it is back.

pub mod approvals;
pub mod baselines;
pub mod findings;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use driftwatch_proto::{
    policy::Policy,
    time::now_unix_nanos,
    v1::{
        event, ApprovedChange, Baseline, Connect, Digest, Event, EvidenceRef, FileChange,
        FileState, Gap, Process,
    },
};
use prost::Message as _;
use tokio::sync::oneshot;

use crate::{
    policy::Policies,
    store::{sled_store::SledStore, EventLog, StoreError},
};
use approvals::Approvals;
use baselines::Baselines;
use findings::{Findings, Occurrence};

/// Writers remembered per file between two digests.
const WRITERS_MAX: usize = 4;
/// Evidence remembered per file between two digests.
const PENDING_EVIDENCE_MAX: usize = 8;
/// errno of a non-blocking connect still under way.
const EINPROGRESS: i32 = 115;

/// An unauthorized write held back while an approved request covers the file.
#[derive(Clone, PartialEq, prost::Message)]
struct Deferred {
    #[prost(message, optional, tag = "1")]
    actor: Option<Process>,
    #[prost(message, optional, tag = "2")]
    evidence: Option<EvidenceRef>,
    #[prost(string, tag = "3")]
    resource: String,
    #[prost(int64, tag = "4")]
    time: i64,
}

/// What happened to a file since its last digest.
#[derive(Clone, PartialEq, prost::Message)]
struct PathState {
    #[prost(message, repeated, tag = "1")]
    writers: Vec<Process>,
    #[prost(message, repeated, tag = "2")]
    evidence: Vec<EvidenceRef>,
    #[prost(message, repeated, tag = "3")]
    deferred: Vec<Deferred>,
}

/// Correlation settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Learn the desired state of a file from its first digest.
    pub learn: bool,
    /// An agent without contact for this long is `agent_silent`.
    pub silent_after: Duration,
}

/// A baseline scan the collector asked an agent for.
struct Scan {
    apply_to: String,
    principal: String,
    files: u64,
    errors: u64,
    done: Option<oneshot::Sender<(u64, u64, String)>>,
}

/// The state behind the lock.
pub struct Engine {
    /// The event log (read on recovery, agents' records).
    log: Arc<dyn EventLog>,
    /// Where the judging state lives.
    state: SledStore,
    /// Findings.
    pub findings: Findings,
    /// Desired state.
    pub baselines: Baselines,
    /// Change requests.
    pub approvals: Approvals,
    states: HashMap<(String, String), PathState>,
    dirty: HashSet<(String, String)>,
    state_tree: sled::Tree,
    cursors: sled::Tree,
    scans: HashMap<String, Scan>,
    /// Scans in flight (`scan_id` → `{apply_to, principal}`), so that a
    /// restarted collector still takes the digests of a scan it requested.
    scan_tree: sled::Tree,
    settings: Settings,
}

/// The correlator: the engine and the policy it judges by.
pub struct Correlator {
    engine: Mutex<Engine>,
    /// The event log, for reads that need no engine.
    pub log: Arc<dyn EventLog>,
    /// The policy.
    pub policies: Policies,
    /// The access grants in force, for the agents' streams.
    pub grants: tokio::sync::watch::Sender<Vec<driftwatch_proto::v1::Grant>>,
}

fn state_key(node: &str, path: &str) -> Vec<u8> {
    let mut k = node.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(path.as_bytes());
    k
}

fn evidence(e: &Event) -> EvidenceRef {
    EvidenceRef {
        node: e.node.clone(),
        seq: e.seq,
        time_unix_nanos: e.time_unix_nanos,
    }
}

/// True when `s` ends with `parts`, in order.
fn ends_with_all(mut s: &str, parts: &[&str]) -> bool {
    for p in parts.iter().rev() {
        match s.strip_suffix(p) {
            Some(rest) => s = rest,
            None => return false,
        }
    }
    true
}

fn who(p: &Process) -> String {
    let user = if p.user.is_empty() {
        format!("uid {}", p.uid)
    } else {
        p.user.clone()
    };
    match (&p.login_user, p.loginuid) {
        (l, _) if !l.is_empty() && *l != user => format!("{user} (login {l}) via {}", p.exe),
        _ => format!("{user} via {}", p.exe),
    }
}

fn state_of(d: &Digest) -> FileState {
    if !d.exists {
        return FileState {
            exists: false,
            ..Default::default()
        };
    }
    FileState {
        exists: true,
        sha256: d.sha256.clone(),
        size: d.size,
        mode: Some(d.mode),
        uid: Some(d.uid),
        gid: Some(d.gid),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

impl Correlator {
    /// Opens the engine's trees.
    pub fn open(
        state: SledStore,
        log: Arc<dyn EventLog>,
        policies: Policies,
        settings: Settings,
    ) -> Result<Self, StoreError> {
        let store = state;
        let mut engine = Engine {
            findings: Findings::open(&store)?,
            baselines: Baselines::open(&store)?,
            approvals: Approvals::open(&store)?,
            states: HashMap::new(),
            dirty: HashSet::new(),
            state_tree: store.tree("path_state")?,
            cursors: store.tree("correlated")?,
            scans: HashMap::new(),
            scan_tree: store.tree("scans")?,
            settings,
            log: log.clone(),
            state: store,
        };
        for kv in engine.scan_tree.iter() {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            let Ok(saved) = serde_json::from_slice::<serde_json::Value>(&v) else {
                tracing::warn!(scan_id = %id, "an unreadable scan record is ignored");
                continue;
            };
            let field = |f: &str| saved[f].as_str().unwrap_or_default().to_owned();
            engine.scans.insert(
                id,
                Scan {
                    apply_to: field("apply_to"),
                    principal: field("principal"),
                    files: 0,
                    errors: 0,
                    done: None,
                },
            );
        }
        let by_policy = policies.clone();
        engine.findings.policy_severity = Some(Box::new(move |kind: &str, resource: &str| {
            let loaded = by_policy.current()?;
            let r = loaded.policy.resource(resource)?;
            Some(driftwatch_proto::policy::severity_of(kind, Some(r)).to_owned())
        }));
        let grants = engine.approvals.grants(now_unix_nanos());
        Ok(Self {
            engine: Mutex::new(engine),
            log,
            policies,
            grants: tokio::sync::watch::channel(grants).0,
        })
    }

    /// Publishes the access grants in force now to the agents' streams
    /// (when they changed: one was decided, or one expired).
    pub fn publish_grants(&self) {
        let now = self.lock().approvals.grants(now_unix_nanos());
        self.grants.send_if_modified(|g| {
            if *g == now {
                return false;
            }
            *g = now;
            true
        });
    }

    /// The engine, for the control API.
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        // A panic while judging leaves the engine as the last complete
        // batch left it on disk; carry on with it.
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Judges a node's newly durable events (in sequence order).
    pub fn process(&self, node: &str, events: &[Event]) -> Result<(), StoreError> {
        let policy = self.policies.current();
        let policy = policy.as_deref().map(|l| &l.policy);
        self.lock().process(node, events, policy)
    }

    /// Judges what was stored but not judged before the last stop.
    pub fn recover(&self) -> Result<usize, StoreError> {
        let policy = self.policies.current();
        let policy = policy.as_deref().map(|l| &l.policy);
        let mut engine = self.lock();
        let mut total = 0;
        for a in engine.log.agents()? {
            let Some(node) = a.node.as_ref().map(|n| n.name.clone()) else {
                continue;
            };
            let (seq, time) = engine.cursor(&node)?;
            if seq >= a.acked_seq {
                continue;
            }
            let mut events: Vec<Event> = engine
                .log
                .node_range(&node, time.saturating_sub(60_000_000_000), i64::MAX)?
                .into_iter()
                .filter(|e| e.seq > seq)
                .collect();
            events.sort_by_key(|e| e.seq);
            total += events.len();
            engine.process(&node, &events, policy)?;
        }
        Ok(total)
    }

    /// A gap was recorded: a blind spot.
    pub fn gap(&self, gap: &Gap) -> Result<(), StoreError> {
        self.lock().gap(gap)
    }

    /// The agent of `node` is in contact: resolves its `agent_silent`.
    pub fn seen(&self, node: &str) -> Result<(), StoreError> {
        let key = format!("agent_silent\0{node}");
        let mut e = self.lock();
        if e.findings.open_with_key(&key)?.is_some() {
            e.findings
                .resolve_key(&key, "the agent is in contact again", 0)?;
        }
        Ok(())
    }

    /// Opens `agent_silent` for agents out of contact for too long.
    pub fn check_silent(&self, now: i64) -> Result<(), StoreError> {
        let mut e = self.lock();
        let limit = i64::try_from(e.settings.silent_after.as_nanos()).unwrap_or(i64::MAX);
        for a in e.log.agents()? {
            let Some(node) = a.node.as_ref().map(|n| n.name.clone()) else {
                continue;
            };
            let silent_for = now.saturating_sub(a.last_seen_unix_nanos);
            if silent_for < limit {
                continue;
            }
            let key = format!("agent_silent\0{node}");
            if e.findings.open_with_key(&key)?.is_some() {
                continue;
            }
            e.findings.record(
                &key,
                Occurrence {
                    kind: "agent_silent",
                    summary: format!(
                        "no heartbeat from the agent on {node} for {}s (last contact {})",
                        silent_for / 1_000_000_000,
                        driftwatch_proto::time::rfc3339(i128::from(a.last_seen_unix_nanos))
                    ),
                    node,
                    time: now,
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }

    /// Registers a baseline scan (kept on disk until it is done, so its
    /// digests count after a collector restart too); the receiver gets
    /// (files, errors, error).
    pub fn start_scan(
        &self,
        scan_id: &str,
        apply_to: &str,
        principal: &str,
    ) -> Result<oneshot::Receiver<(u64, u64, String)>, StoreError> {
        let (tx, rx) = oneshot::channel();
        let store = {
            let mut engine = self.lock();
            let saved = serde_json::json!({ "apply_to": apply_to, "principal": principal });
            engine
                .scan_tree
                .insert(scan_id.as_bytes(), saved.to_string().into_bytes())?;
            engine.scans.insert(
                scan_id.to_owned(),
                Scan {
                    apply_to: apply_to.to_owned(),
                    principal: principal.to_owned(),
                    files: 0,
                    errors: 0,
                    done: Some(tx),
                },
            );
            engine.state.clone()
        };
        // Durable before the agent is asked, and outside the engine's lock:
        // an fsync under it would hold up the judging of every stream.
        if let Err(e) = store.flush_blocking() {
            self.end_scan(scan_id);
            return Err(e);
        }
        Ok(rx)
    }

    /// Forgets a scan that timed out or could not be requested.
    pub fn end_scan(&self, scan_id: &str) {
        let mut engine = self.lock();
        engine.scans.remove(scan_id);
        if let Err(e) = engine.scan_tree.remove(scan_id.as_bytes()) {
            tracing::warn!(%scan_id, "forgetting the scan: {e}");
        }
    }
}

impl Engine {
    fn cursor(&self, node: &str) -> Result<(u64, i64), StoreError> {
        Ok(match self.cursors.get(node.as_bytes())? {
            Some(v) if v.len() == 16 => {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                a.copy_from_slice(&v[..8]);
                b.copy_from_slice(&v[8..]);
                (u64::from_be_bytes(a), i64::from_be_bytes(b))
            }
            _ => (0, 0),
        })
    }

    fn state(&mut self, node: &str, path: &str) -> Result<&mut PathState, StoreError> {
        let k = (node.to_owned(), path.to_owned());
        if !self.states.contains_key(&k) {
            let s = match self.state_tree.get(state_key(node, path))? {
                Some(v) => PathState::decode(&*v).map_err(|source| StoreError::Corrupt {
                    tree: "path_state",
                    source,
                })?,
                None => PathState::default(),
            };
            self.states.insert(k.clone(), s);
        }
        self.dirty.insert(k.clone());
        Ok(self.states.entry(k).or_default())
    }

    fn process(
        &mut self,
        node: &str,
        events: &[Event],
        policy: Option<&Policy>,
    ) -> Result<(), StoreError> {
        let (done, _) = self.cursor(node)?;
        let mut last = None;
        for e in events.iter().filter(|e| e.seq > done) {
            match &e.event {
                Some(event::Event::File(f)) => self.file(e, f, policy)?,
                Some(event::Event::Digest(d)) => self.digest(e, d, policy)?,
                Some(event::Event::Connect(c)) => self.connect(e, c, policy)?,
                Some(event::Event::Loss(l)) => {
                    let lost: u64 = l.dropped.values().sum();
                    self.findings.record(
                        &format!("blind_spot\0{node}\0kernel_loss"),
                        Occurrence {
                            kind: "blind_spot",
                            node: node.to_owned(),
                            summary: format!(
                                "the kernel's ring buffer on {node} overflowed: records lost ({:?})",
                                l.dropped
                            ),
                            time: e.time_unix_nanos,
                            evidence: vec![evidence(e)],
                            count: lost,
                            ..Default::default()
                        },
                    )?;
                }
                Some(event::Event::ScanDone(s)) => {
                    self.scan_tree.remove(s.scan_id.as_bytes())?;
                    if let Some(mut scan) = self.scans.remove(&s.scan_id) {
                        if let Some(tx) = scan.done.take() {
                            let _ = tx.send((scan.files, scan.errors + s.errors, s.error.clone()));
                        }
                    }
                }
                Some(event::Event::Policy(p)) => {
                    self.log.update_agent(node, &mut |a| {
                        if p.applied {
                            a.policy_version.clone_from(&p.version);
                            a.policy_error.clear();
                        } else {
                            a.policy_error = format!("{}: {}", p.version, p.error);
                        }
                    })?;
                }
                _ => {}
            }
            last = Some(e);
        }
        self.findings.write_back()?;
        for (n, p) in self.dirty.drain() {
            if let Some(s) = self.states.get(&(n.clone(), p.clone())) {
                if *s == PathState::default() {
                    self.state_tree.remove(state_key(&n, &p))?;
                    self.states.remove(&(n, p));
                } else {
                    self.state_tree
                        .insert(state_key(&n, &p), s.encode_to_vec())?;
                }
            }
        }
        if let Some(e) = last {
            let mut v = e.seq.to_be_bytes().to_vec();
            v.extend_from_slice(&e.time_unix_nanos.to_be_bytes());
            self.cursors.insert(node.as_bytes(), v)?;
        }
        Ok(())
    }

    fn file(
        &mut self,
        e: &Event,
        f: &FileChange,
        policy: Option<&Policy>,
    ) -> Result<(), StoreError> {
        let Some(actor) = e.process.as_ref() else {
            return Ok(());
        };
        let ok = f.result.as_ref().is_some_and(|r| r.ok);
        let target = if f.new_path.is_empty() {
            f.path.as_str()
        } else {
            f.new_path.as_str()
        };
        // Who completed a change is remembered until the file's digest
        // names what it became.
        if ok && driftwatch_proto::completes_change(&f.op) {
            for p in [f.path.as_str(), f.new_path.as_str()] {
                if p.is_empty() {
                    continue;
                }
                let s = self.state(&e.node, p)?;
                if !s.writers.iter().any(|w| w.exec_id == actor.exec_id) {
                    s.writers.push(actor.clone());
                    if s.writers.len() > WRITERS_MAX {
                        s.writers.remove(0);
                    }
                }
                s.evidence.push(evidence(e));
                if s.evidence.len() > PENDING_EVIDENCE_MAX {
                    s.evidence.remove(1);
                }
            }
        }
        if ok && f.op == "rename" && !f.new_path.is_empty() {
            // The content moves with the name: writes held back for the
            // old name (a temporary file) are judged with the new one.
            let held = std::mem::take(&mut self.state(&e.node, &f.path)?.deferred);
            self.state(&e.node, &f.new_path)?.deferred.extend(held);
        }
        let Some(policy) = policy else {
            return Ok(());
        };
        let Some(r) = policy
            .resource(&f.resource)
            .or_else(|| policy.resource_for_path(target))
        else {
            return Ok(());
        };
        if matches!(f.guardrail.as_str(), "killed" | "would_block") {
            let what = format!("{} of {target}", f.op);
            return self.guarded(e, actor, &r.name, target, &what, &f.guardrail, ("", 0));
        }
        if r.writers.is_empty() || r.writers.iter().any(|s| s.matches(actor)) {
            return Ok(());
        }
        if ok
            && self
                .approvals
                .matching(&e.node, &r.name, target, e.time_unix_nanos, None)
                .is_some()
        {
            // The digest decides: a change the request covers is an
            // approved change, anything else is judged then.
            let d = Deferred {
                actor: Some(actor.clone()),
                evidence: Some(evidence(e)),
                resource: r.name.clone(),
                time: e.time_unix_nanos,
            };
            self.state(&e.node, target)?.deferred.push(d);
            return Ok(());
        }
        self.unauthorized_write(e, actor, &r.name, target, !ok, &f.op)
    }

    fn unauthorized_write(
        &mut self,
        e: &Event,
        actor: &Process,
        resource: &str,
        path: &str,
        failed: bool,
        op: &str,
    ) -> Result<(), StoreError> {
        let key = format!(
            "unauthorized_write\0{}\0{resource}\0{}\0{}",
            e.node, actor.exe, actor.uid
        );
        let attempt = if failed { "tried to change" } else { "changed" };
        let summary = || {
            format!(
                "{} {attempt} {path} ({op}) on {}; not a writer of {resource}",
                who(actor),
                e.node
            )
        };
        // A repeat of an open finding is updated in place: only what
        // differs from the last occurrence is copied or written again.
        let update = |f: &mut driftwatch_proto::v1::Finding| {
            let same_actor = f.actor.as_ref() == Some(actor);
            if !same_actor {
                f.actor = Some(actor.clone());
            }
            if f.path != path {
                path.clone_into(&mut f.path);
            }
            // The summary, but for `who(actor)`, which an equal actor
            // makes the same.
            let tail = [
                " ",
                attempt,
                " ",
                path,
                " (",
                op,
                ") on ",
                e.node.as_str(),
                "; not a writer of ",
                resource,
            ];
            if !same_actor || !ends_with_all(&f.summary, &tail) {
                f.summary = summary();
            }
        };
        if self
            .findings
            .fold_repeat(&key, update, e.time_unix_nanos, failed, evidence(e))?
        {
            return Ok(());
        }
        self.findings.record(
            &key,
            Occurrence {
                kind: "unauthorized_write",
                node: e.node.clone(),
                resource: resource.to_owned(),
                path: path.to_owned(),
                actor: Some(actor.clone()),
                summary: summary(),
                time: e.time_unix_nanos,
                evidence: vec![evidence(e)],
                count: 1,
                failed: u64::from(failed),
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn digest(&mut self, e: &Event, d: &Digest, policy: Option<&Policy>) -> Result<(), StoreError> {
        let node = e.node.clone();
        let actual = state_of(d);
        if !d.scan_id.is_empty() {
            if let Some(scan) = self.scans.get_mut(&d.scan_id) {
                if d.exists && d.error.is_empty() && !d.sha256.is_empty() {
                    let b = Baseline {
                        host: scan.apply_to.clone(),
                        path: d.path.clone(),
                        state: Some(actual),
                        source: baselines::SCAN.into(),
                        set_unix_nanos: now_unix_nanos(),
                        set_by: scan.principal.clone(),
                    };
                    scan.files += 1;
                    self.baselines.put(b)?;
                } else {
                    scan.errors += 1;
                }
            }
            return Ok(());
        }
        if d.exists && !d.error.is_empty() {
            tracing::warn!(%node, path = %d.path, error = %d.error, "the agent could not read a watched file");
            return Ok(());
        }
        let resource = policy
            .and_then(|p| p.resource_for_path(&d.path))
            .map(|r| r.name.clone())
            .unwrap_or_else(|| d.resource.clone());
        let pending = std::mem::take(self.state(&node, &d.path)?);
        let mut ev = pending.evidence.clone();
        ev.push(evidence(e));
        let actor = pending.writers.last().cloned();
        let Some(desired) = self.baselines.lookup(&node, &d.path).cloned() else {
            // Nothing desired yet: learn it, or just judge the writers.
            if self.settings.learn && d.exists {
                self.baselines.put(Baseline {
                    host: node.clone(),
                    path: d.path.clone(),
                    state: Some(actual.clone()),
                    source: if d.reason == "watch" {
                        baselines::LEARNED
                    } else {
                        baselines::LEARNED_CREATED
                    }
                    .into(),
                    set_unix_nanos: now_unix_nanos(),
                    set_by: "collector".into(),
                })?;
            }
            return self.settle_deferred(e, &pending, &resource, &d.path, d, false);
        };
        let want = desired.state.clone().unwrap_or_default();
        let diffs = baselines::differences(&want, &actual);
        let drift_key = format!("drift\0{node}\0{}", d.path);
        let deleted_key = format!("deleted\0{node}\0{}", d.path);
        if diffs.is_empty() {
            self.findings
                .resolve_key(&drift_key, "back at the desired state", 0)?;
            if d.exists {
                self.findings
                    .resolve_key(&deleted_key, "the file exists again", 0)?;
            }
            return self.settle_deferred(e, &pending, &resource, &d.path, d, true);
        }
        if !d.exists && desired.source == baselines::LEARNED_CREATED {
            // A file that appeared while watched and went again (an
            // editor's or sed's temporary file): it never was desired.
            self.baselines.remove(&desired.host, &d.path)?;
            return self.settle_deferred(e, &pending, &resource, &d.path, d, false);
        }
        // A gone file has no digest: only a request naming none covers it.
        if let Some(a) = self
            .approvals
            .matching(
                &node,
                &resource,
                &d.path,
                e.time_unix_nanos,
                Some(&actual.sha256),
            )
            .cloned()
        {
            let mut actors = pending.writers.clone();
            for x in &pending.deferred {
                if let Some(p) = &x.actor {
                    if !actors.iter().any(|w| w.exec_id == p.exec_id) {
                        actors.push(p.clone());
                    }
                }
            }
            let change = ApprovedChange {
                id: self.approvals.next_change_id(),
                approval_id: a.id,
                node: node.clone(),
                resource: resource.clone(),
                path: d.path.clone(),
                before: Some(want),
                after: Some(actual.clone()),
                actors,
                time_unix_nanos: e.time_unix_nanos,
                evidence: ev,
            };
            tracing::info!(approval = a.id, %node, path = %d.path, "approved change recorded");
            self.approvals.add_change(a.id, change)?;
            let mut resolved = Vec::new();
            for k in [&drift_key, &deleted_key] {
                if let Some(id) =
                    self.findings
                        .resolve_key(k, &format!("approved by request {}", a.id), a.id)?
                {
                    resolved.push(id);
                }
            }
            self.approvals.add_resolved(a.id, &resolved)?;
            if d.exists {
                self.baselines.put(Baseline {
                    host: desired.host.clone(),
                    path: d.path.clone(),
                    state: Some(actual),
                    source: baselines::APPROVED.into(),
                    set_unix_nanos: now_unix_nanos(),
                    set_by: a.approver.clone(),
                })?;
            } else {
                self.baselines.remove(&desired.host, &d.path)?;
            }
            return Ok(());
        }
        let (kind, key) = if d.exists {
            ("drift", drift_key)
        } else {
            ("deleted", deleted_key)
        };
        if pending.writers.is_empty() {
            if let Some(open) = self.findings.open_with_key(&key)? {
                if open.actual.as_ref() == Some(&actual) {
                    // The same state reported again: nothing new.
                    return Ok(());
                }
            }
        }
        let by = match (&actor, d.reason.as_str()) {
            (Some(_), _) => format!(
                "by {}",
                pending
                    .writers
                    .iter()
                    .map(who)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (None, "watch") => {
                "while nothing watched it (found when the agent started watching)".into()
            }
            (None, _) => "by an unknown process".into(),
        };
        let summary = if d.exists {
            let mut parts = Vec::new();
            for x in &diffs {
                parts.push(match x.as_str() {
                    "content" => format!(
                        "content {} -> {}",
                        short(&want.sha256),
                        short(&actual.sha256)
                    ),
                    "mode" => format!(
                        "mode {:04o} -> {:04o}",
                        want.mode.unwrap_or(0),
                        actual.mode.unwrap_or(0)
                    ),
                    "owner" => format!(
                        "owner {}:{} -> {}:{}",
                        want.uid.unwrap_or(0),
                        want.gid.unwrap_or(0),
                        actual.uid.unwrap_or(0),
                        actual.gid.unwrap_or(0)
                    ),
                    other => other.to_owned(),
                });
            }
            format!(
                "{} on {node} drifted from its desired state ({}) {by}",
                d.path,
                parts.join(", ")
            )
        } else {
            format!("{} on {node} was deleted {by}", d.path)
        };
        self.findings.record(
            &key,
            Occurrence {
                kind,
                node: node.clone(),
                resource: resource.clone(),
                path: d.path.clone(),
                actor,
                desired: Some(want),
                actual: Some(actual),
                differences: diffs,
                summary,
                time: e.time_unix_nanos,
                evidence: ev,
                count: 1,
                ..Default::default()
            },
        )?;
        self.settle_deferred(e, &pending, &resource, &d.path, d, false)
    }

    /// Judges writes held back for an approval, now that the digest is in:
    /// covered when the approval matches what the file became.
    fn settle_deferred(
        &mut self,
        e: &Event,
        pending: &PathState,
        resource: &str,
        path: &str,
        d: &Digest,
        unchanged: bool,
    ) -> Result<(), StoreError> {
        if pending.deferred.is_empty() {
            return Ok(());
        }
        let covered = self
            .approvals
            .matching(
                &e.node,
                resource,
                path,
                e.time_unix_nanos,
                Some(&state_of(d).sha256),
            )
            .is_some();
        if covered && (unchanged || d.exists) {
            return Ok(());
        }
        for x in &pending.deferred {
            let (Some(actor), Some(ev)) = (&x.actor, &x.evidence) else {
                continue;
            };
            let at = Event {
                node: ev.node.clone(),
                seq: ev.seq,
                time_unix_nanos: ev.time_unix_nanos,
                ..Default::default()
            };
            self.unauthorized_write(&at, actor, &x.resource, path, false, "write")?;
        }
        Ok(())
    }

    fn connect(
        &mut self,
        e: &Event,
        c: &Connect,
        policy: Option<&Policy>,
    ) -> Result<(), StoreError> {
        let (Some(policy), Some(actor)) = (policy, e.process.as_ref()) else {
            return Ok(());
        };
        let Ok(port) = u16::try_from(c.port) else {
            return Ok(());
        };
        let Some(r) = policy
            .resource(&c.resource)
            .or_else(|| policy.resource_for_port(port))
        else {
            return Ok(());
        };
        match c.guardrail.as_str() {
            "granted" => {
                if self
                    .approvals
                    .grant_covering(c.grant_id, &e.node, &r.name, e.time_unix_nanos)
                    .is_some()
                {
                    return self.approvals.add_use(c.grant_id, evidence(e));
                }
                // A grant this collector does not know as in force: judged
                // as if there were none.
                tracing::warn!(node = %e.node, grant = c.grant_id, resource = %r.name, "a connect let through under a grant not in force here");
            }
            "blocked" | "would_block" => {
                let what = format!("a connect to {}:{}", c.address, c.port);
                return self.guarded(
                    e,
                    actor,
                    &r.name,
                    "",
                    &what,
                    &c.guardrail,
                    (&c.address, c.port),
                );
            }
            _ => {}
        }
        if r.clients.is_empty() || r.clients.iter().any(|s| s.matches(actor)) {
            return Ok(());
        }
        let failed = c
            .result
            .as_ref()
            .is_some_and(|o| !o.ok && o.errno != EINPROGRESS);
        let key = format!(
            "unauthorized_connect\0{}\0{}\0{}\0{}",
            e.node, r.name, actor.exe, actor.uid
        );
        let outcome = if failed {
            format!(
                " (failed: {})",
                c.result.as_ref().map(|o| o.error.as_str()).unwrap_or("")
            )
        } else {
            String::new()
        };
        self.findings.record(
            &key,
            Occurrence {
                kind: "unauthorized_connect",
                node: e.node.clone(),
                resource: r.name.clone(),
                actor: Some(actor.clone()),
                summary: format!(
                    "{} connected to {}:{} ({}) on {}{outcome}; not a client of {}",
                    who(actor),
                    c.address,
                    c.port,
                    r.name,
                    e.node,
                    r.name
                ),
                time: e.time_unix_nanos,
                evidence: vec![evidence(e)],
                count: 1,
                failed: u64::from(failed),
                address: c.address.clone(),
                port: c.port,
                ..Default::default()
            },
        )?;
        Ok(())
    }

    /// A `blocked` or `would_block` finding: one per node, resource and
    /// identity (exe, uid, container), counting every attempt.
    #[allow(clippy::too_many_arguments)]
    fn guarded(
        &mut self,
        e: &Event,
        actor: &Process,
        resource: &str,
        path: &str,
        what: &str,
        guardrail: &str,
        (address, port): (&str, u32),
    ) -> Result<(), StoreError> {
        let kind = if guardrail == "would_block" {
            "would_block"
        } else {
            "blocked"
        };
        // One per identity: the same binary and user in two containers are
        // two identities (a pod's and a host's, a team's and another's).
        let container = actor.container.as_ref().map_or("", |c| c.id.as_str());
        let key = format!(
            "{kind}\0{}\0{resource}\0{}\0{}\0{container}",
            e.node, actor.exe, actor.uid
        );
        let summary = match guardrail {
            "would_block" => format!(
                "{} made {what} on {}; the guardrail of {resource} (mode audit) would have refused it",
                who(actor),
                e.node
            ),
            "killed" => format!(
                "{} was killed for {what} on {}: not a writer of {resource} (the call itself ran; nothing was written through it after)",
                who(actor),
                e.node
            ),
            _ => format!(
                "{} was refused {what} on {} (EPERM): not a client of {resource}",
                who(actor),
                e.node
            ),
        };
        self.findings.record(
            &key,
            Occurrence {
                kind,
                node: e.node.clone(),
                resource: resource.to_owned(),
                path: path.to_owned(),
                actor: Some(actor.clone()),
                summary,
                time: e.time_unix_nanos,
                evidence: vec![evidence(e)],
                count: 1,
                failed: u64::from(kind == "blocked"),
                address: address.to_owned(),
                port,
                ..Default::default()
            },
        )?;
        Ok(())
    }

    fn gap(&mut self, g: &Gap) -> Result<(), StoreError> {
        let (count, what) = match g.reason.as_str() {
            "agent_dropped" => (
                g.to_seq.saturating_sub(g.from_seq) + 1,
                format!(
                    "the agent on {} dropped events {}..={} before delivery",
                    g.node, g.from_seq, g.to_seq
                ),
            ),
            "agent_offline" => (
                1,
                format!(
                    "no agent watched {} from {} to {}",
                    g.node,
                    driftwatch_proto::time::rfc3339(i128::from(g.from_time_unix_nanos)),
                    driftwatch_proto::time::rfc3339(i128::from(g.to_time_unix_nanos))
                ),
            ),
            "collector_refused" => (
                g.to_seq.saturating_sub(g.from_seq) + 1,
                format!(
                    "the collector kept events {}..={} from {} out of the store: {}",
                    g.from_seq, g.to_seq, g.node, g.detail
                ),
            ),
            other => (1, format!("{other} on {}", g.node)),
        };
        self.findings.record(
            &format!("blind_spot\0{}\0{}", g.node, g.reason),
            Occurrence {
                kind: "blind_spot",
                node: g.node.clone(),
                summary: what,
                time: g.to_time_unix_nanos,
                count,
                ..Default::default()
            },
        )?;
        self.findings.write_back()
    }

    /// Resolves open findings an approval covers; drift takes the observed
    /// state as desired. Returns the ids resolved.
    pub fn apply_approval(&mut self, id: u64) -> Result<Vec<u64>, StoreError> {
        let Some(a) = self.approvals.get(id).cloned() else {
            return Ok(Vec::new());
        };
        if a.kind == approvals::ACCESS {
            return Ok(Vec::new());
        }
        let mut resolved = Vec::new();
        for f in self.findings.unresolved()? {
            if !matches!(f.kind.as_str(), "drift" | "deleted" | "unauthorized_write")
                || !baselines::host_matches(&a.host, &f.node)
                || !approvals::covers(&a, &f.resource, &f.path)
            {
                continue;
            }
            let actual = f.actual.clone().unwrap_or_default();
            if !a.sha256.is_empty() && (f.kind != "drift" || actual.sha256 != a.sha256) {
                continue;
            }
            self.findings.set_status(
                f.id,
                findings::RESOLVED,
                &a.approver,
                &format!("approved by request {id}"),
                id,
            )?;
            if f.kind == "drift" {
                if let Some(b) = self.baselines.lookup(&f.node, &f.path).cloned() {
                    self.baselines.put(Baseline {
                        state: Some(actual),
                        source: baselines::APPROVED.into(),
                        set_unix_nanos: now_unix_nanos(),
                        set_by: a.approver.clone(),
                        ..b
                    })?;
                }
            }
            resolved.push(f.id);
        }
        self.approvals.add_resolved(id, &resolved)?;
        Ok(resolved)
    }
}

/// Runs the silence check every second.
pub fn spawn_silence_check(c: Arc<Correlator>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = c.check_silent(now_unix_nanos()) {
                tracing::error!("checking for silent agents failed: {e}");
            }
            // Expired grants leave the set the agents hold (their kernels
            // close the gate at the expiry on their own).
            c.publish_grants();
        }
    });
}

#[cfg(test)]
mod tests;
