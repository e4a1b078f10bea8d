//! Correlation: stored events become findings.
//!
//! Events are judged once they are durable, in each node's sequence order,
//! each batch in one transaction of the judging state
//! ([`crate::store::judging`]): the node's cursor (the last event judged),
//! the findings, baselines, approvals and per-file state the judgement
//! changed are committed together, so a collector that stops between
//! storing and judging judges the rest when it starts, and replicas over
//! one store never judge an event twice. The rules keep nothing between
//! transactions: what they know is what the store holds.
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
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, OnceLock},
    time::Duration,
};

use driftwatch_proto::{
    policy::Policy,
    time::now_unix_nanos,
    v1::{
        event, Approval, ApprovedChange, Baseline, Connect, Digest, Event, EvidenceRef, FileChange,
        FileState, Finding, Gap, Grant, Process,
    },
};
use prost::Message as _;

use crate::{
    policy::Policies,
    store::{
        judging::{transact, JudgeTx, Judging, ScanRecord},
        EventLog, StoreError,
    },
};
use approvals::{ApprovalError, Approvals};
use findings::{Findings, Occurrence, OnOpen, PolicySeverity};

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

/// Scan records older than this are forgotten when a new scan starts
/// (a scan whose asker went away).
const SCAN_KEPT_NS: i64 = 86_400 * 1_000_000_000;

/// A file's record to write (`None`: to forget).
type StateWrite = (String, Option<Vec<u8>>);

/// One judging transaction: the rules run over it. Its caches (file
/// state, the findings it changed, the approvals in force) live as long
/// as the transaction.
struct Judge<'t> {
    tx: &'t mut dyn JudgeTx,
    log: &'t dyn EventLog,
    settings: &'t Settings,
    findings: Findings<'t>,
    approvals: Approvals,
    states: HashMap<(String, String), PathState>,
    dirty: HashSet<(String, String)>,
    /// Every selector's baseline of the paths read in this transaction.
    baselines: HashMap<String, Vec<Baseline>>,
    /// A scan's record moved in this transaction.
    scans: bool,
}

/// The correlator: the rules, the judging state they run over, and the
/// policy they judge by.
pub struct Correlator {
    judging: Arc<dyn Judging>,
    /// The event log.
    pub log: Arc<dyn EventLog>,
    /// The policy.
    pub policies: Policies,
    /// The access grants in force, for the agents' streams.
    pub grants: tokio::sync::watch::Sender<Vec<Grant>>,
    settings: Settings,
    policy_severity: PolicySeverity,
    on_open: OnceLock<OnOpen>,
    /// Told when a scan's record moved through this replica.
    scan_progress: tokio::sync::Notify,
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
        structure: d.structure.clone(),
        attributes: d.attributes.clone(),
    }
}

/// The extended attributes added, removed or changed from `want` to
/// `actual`: `+security.capability=cap_net_raw=ep`, `-user.owner`,
/// `~user.tier=a->b`.
fn xattr_changes(
    want: Option<&driftwatch_proto::v1::Attributes>,
    actual: Option<&driftwatch_proto::v1::Attributes>,
) -> String {
    let empty = std::collections::HashMap::new();
    let want = want.map_or(&empty, |a| &a.xattrs);
    let actual = actual.map_or(&empty, |a| &a.xattrs);
    let mut names: Vec<&String> = want.keys().chain(actual.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| match (want.get(n), actual.get(n)) {
            (None, Some(v)) => Some(format!("+{n}={v}")),
            (Some(_), None) => Some(format!("-{n}")),
            (Some(a), Some(b)) if a != b => Some(format!("~{n}={a}->{b}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What changed in the content from `want` to `actual`, when the content
/// differs (a change of mode or owner alone has none).
fn content_changes(
    want: &FileState,
    actual: &FileState,
    diffs: &[String],
) -> driftwatch_proto::structure::Diff {
    if !diffs.iter().any(|d| d == "content") {
        return Default::default();
    }
    driftwatch_proto::structure::diff(want.structure.as_ref(), actual.structure.as_ref())
}

/// The changes in a summary line: the first few, as read.
fn changes_line(d: &driftwatch_proto::structure::Diff) -> String {
    const SHOWN: usize = 3;
    let mut parts: Vec<String> = d
        .changes
        .iter()
        .take(SHOWN)
        .map(driftwatch_proto::structure::render)
        .collect();
    if d.changes.len() > SHOWN {
        parts.push(format!("{} more", d.changes.len() - SHOWN));
    }
    parts.join("; ")
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

impl Correlator {
    /// The rules over `judging`, judging the events in `log`.
    pub fn open(
        judging: Arc<dyn Judging>,
        log: Arc<dyn EventLog>,
        policies: Policies,
        settings: Settings,
    ) -> Result<Self, StoreError> {
        let by_policy = policies.clone();
        let policy_severity: PolicySeverity = Box::new(move |kind: &str, resource: &str| {
            let loaded = by_policy.current()?;
            let r = loaded.policy.resource(resource)?;
            Some(driftwatch_proto::policy::severity_of(kind, Some(r)).to_owned())
        });
        let grants = transact(&*judging, |tx| approvals::grants(tx, now_unix_nanos()))?;
        Ok(Self {
            judging,
            log,
            policies,
            grants: tokio::sync::watch::channel(grants).0,
            settings,
            policy_severity,
            on_open: OnceLock::new(),
            scan_progress: tokio::sync::Notify::new(),
        })
    }

    /// The judging state.
    pub fn judging(&self) -> &Arc<dyn Judging> {
        &self.judging
    }

    /// Tells `hook` of every finding opened through this replica, once
    /// its transaction committed (set once).
    pub fn on_open(&self, hook: OnOpen) {
        if self.on_open.set(hook).is_err() {
            tracing::warn!("a second hook for opened findings is ignored");
        }
    }

    /// Runs `rules` in one judging transaction; tells of what it opened
    /// once it committed.
    fn judge<T>(
        &self,
        mut rules: impl FnMut(&mut Judge<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut opened = Vec::new();
        let mut scans = false;
        let out = transact(&*self.judging, |tx| {
            let mut j = Judge {
                tx,
                log: &*self.log,
                settings: &self.settings,
                findings: Findings::new(&self.policy_severity),
                approvals: Approvals::default(),
                states: HashMap::new(),
                dirty: HashSet::new(),
                baselines: HashMap::new(),
                scans: false,
            };
            let out = rules(&mut j)?;
            j.finish()?;
            opened = std::mem::take(&mut j.findings.opened);
            scans = j.scans;
            Ok(out)
        })?;
        if let Some(tell) = self.on_open.get() {
            for f in &opened {
                tell(f);
            }
        }
        if scans {
            self.scan_progress.notify_waiters();
        }
        Ok(out)
    }

    /// Runs `f` in one transaction of the judging state (reads, and the
    /// control API's changes that go through no rule).
    pub fn with_tx<T>(
        &self,
        f: impl FnMut(&mut dyn JudgeTx) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        transact(&*self.judging, f)
    }

    /// Publishes the access grants in force now to the agents' streams
    /// (when they changed: one was decided, or one expired).
    pub fn publish_grants(&self) -> Result<(), StoreError> {
        let now = self.with_tx(|tx| approvals::grants(tx, now_unix_nanos()))?;
        self.grants.send_if_modified(|g| {
            if *g == now {
                return false;
            }
            *g = now;
            true
        });
        Ok(())
    }

    /// Judges a node's newly durable events (in sequence order).
    pub fn process(&self, node: &str, events: &[Event]) -> Result<(), StoreError> {
        let policy = self.policies.current();
        let policy = policy.as_deref().map(|l| &l.policy);
        self.judge(|j| j.process(node, events, policy))
    }

    /// Judges what was stored but not judged before the last stop.
    pub fn recover(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        for a in self.log.agents()? {
            let Some(node) = a.node.as_ref().map(|n| n.name.clone()) else {
                continue;
            };
            let (seq, time) = self.with_tx(|tx| tx.cursor(&node))?;
            if seq >= a.acked_seq {
                continue;
            }
            let mut events: Vec<Event> = self
                .log
                .node_range(&node, time.saturating_sub(60_000_000_000), i64::MAX)?
                .into_iter()
                .filter(|e| e.seq > seq)
                .collect();
            events.sort_by_key(|e| e.seq);
            total += events.len();
            // Judged past the cursor read in its own transaction: another
            // replica may have judged some of them since.
            self.process(&node, &events)?;
        }
        Ok(total)
    }

    /// A gap was recorded: a blind spot.
    pub fn gap(&self, gap: &Gap) -> Result<(), StoreError> {
        self.judge(|j| j.gap(gap))
    }

    /// The agent of `node` is in contact: resolves its `agent_silent`.
    pub fn seen(&self, node: &str) -> Result<(), StoreError> {
        let key = format!("agent_silent\0{node}");
        self.judge(|j| {
            j.findings
                .resolve_key(j.tx, &key, "the agent is in contact again", 0)
                .map(drop)
        })
    }

    /// Opens `agent_silent` for agents out of contact for too long.
    pub fn check_silent(&self, now: i64) -> Result<(), StoreError> {
        let limit = i64::try_from(self.settings.silent_after.as_nanos()).unwrap_or(i64::MAX);
        for a in self.log.agents()? {
            let Some(node) = a.node.as_ref().map(|n| n.name.clone()) else {
                continue;
            };
            let silent_for = now.saturating_sub(a.last_seen_unix_nanos);
            if silent_for < limit {
                continue;
            }
            let key = format!("agent_silent\0{node}");
            self.judge(|j| {
                if j.findings.open_with_key(j.tx, &key)?.is_some() {
                    return Ok(());
                }
                j.findings.record(
                    j.tx,
                    &key,
                    Occurrence {
                        kind: "agent_silent",
                        summary: format!(
                            "no heartbeat from the agent on {node} for {}s (last contact {})",
                            silent_for / 1_000_000_000,
                            driftwatch_proto::time::rfc3339(i128::from(a.last_seen_unix_nanos))
                        ),
                        node: node.clone(),
                        time: now,
                        ..Default::default()
                    },
                )?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Records a baseline scan of `path` on `node` (durable before the
    /// agent is asked, so its digests count after a collector restart and
    /// on whichever replica the agent streams to).
    pub fn start_scan(
        &self,
        scan_id: &str,
        node: &str,
        path: &str,
        apply_to: &str,
        principal: &str,
    ) -> Result<(), StoreError> {
        let now = now_unix_nanos();
        let scan = ScanRecord {
            node: node.to_owned(),
            path: path.to_owned(),
            apply_to: apply_to.to_owned(),
            principal: principal.to_owned(),
            started_unix_nanos: now,
            ..Default::default()
        };
        self.with_tx(|tx| {
            for (id, old) in tx.scans()? {
                if now.saturating_sub(old.started_unix_nanos) > SCAN_KEPT_NS {
                    tx.remove_scan(&id)?;
                }
            }
            tx.put_scan(scan_id, &scan)
        })?;
        // Outside any transaction: a flush waits for the disk.
        self.judging.flush()
    }

    /// Marks a scan as asked of its agent.
    pub fn scan_sent(&self, scan_id: &str) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            if let Some(mut s) = tx.scan(scan_id)? {
                s.sent = true;
                tx.put_scan(scan_id, &s)?;
            }
            Ok(())
        })
    }

    /// Scans not yet asked of their agents (their agents stream to another
    /// replica than the one asked).
    pub fn unsent_scans(&self) -> Result<Vec<(String, ScanRecord)>, StoreError> {
        Ok(self
            .with_tx(|tx| tx.scans())?
            .into_iter()
            .filter(|(_, s)| !s.sent && !s.done)
            .collect())
    }

    /// Waits until the agent reported scan `scan_id` finished (through any
    /// replica), then forgets it: (files, errors, error).
    pub async fn wait_scan(
        self: &Arc<Self>,
        scan_id: &str,
    ) -> Result<(u64, u64, String), StoreError> {
        loop {
            // Registered before the read, so a change in between wakes it.
            let moved = self.scan_progress.notified();
            let (c, id) = (self.clone(), scan_id.to_owned());
            let scan = tokio::task::spawn_blocking(move || c.with_tx(|tx| tx.scan(&id)))
                .await
                .map_err(|e| StoreError::Backend(format!("reading a scan: {e}")))??;
            let Some(scan) = scan else {
                return Err(StoreError::Backend(format!(
                    "scan {scan_id} is no longer recorded"
                )));
            };
            if scan.done {
                self.end_scan(scan_id);
                return Ok((scan.files, scan.errors, scan.error));
            }
            // Other replicas' progress is read again every half second.
            let _ = tokio::time::timeout(Duration::from_millis(500), moved).await;
        }
    }

    /// Forgets a scan (done, timed out, or not requested).
    pub fn end_scan(&self, scan_id: &str) {
        if let Err(e) = self.with_tx(|tx| tx.remove_scan(scan_id)) {
            tracing::warn!(%scan_id, "forgetting the scan: {e}");
        }
    }

    /// Files a change or access request.
    pub fn request(&self, a: Approval) -> Result<Approval, ApprovalError> {
        let mut out = None;
        self.with_tx(|tx| {
            out = Some(approvals::request(tx, a.clone()));
            Ok(())
        })?;
        out.unwrap_or_else(|| Err(StoreError::Backend("the request was not filed".into()).into()))
    }

    /// Decides approval `id` as `principal`; an approved change resolves
    /// the open findings it covers, in the same transaction. Returns the
    /// approval as it then is, and the findings resolved.
    pub fn decide(
        &self,
        id: u64,
        approve: bool,
        principal: &str,
        note: &str,
    ) -> Result<(Approval, Vec<u64>), ApprovalError> {
        let mut out = None;
        self.judge(|j| {
            let decided = approvals::decide(j.tx, id, approve, principal, note, now_unix_nanos());
            let result = match decided {
                Ok(a) if approve => {
                    let resolved = j.apply_approval(&a)?;
                    let a = j.tx.approval(a.id)?.unwrap_or(a);
                    Ok((a, resolved))
                }
                Ok(a) => Ok((a, Vec::new())),
                Err(ApprovalError::Store(e)) => return Err(e),
                Err(e) => Err(e),
            };
            out = Some(result);
            Ok(())
        })?;
        out.unwrap_or_else(|| Err(StoreError::Backend("the decision was not made".into()).into()))
    }

    /// How many findings are unresolved, by kind.
    pub fn open_by_kind(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.with_tx(|tx| tx.open_by_kind())
    }

    /// Moves finding `id` to `status` as `principal`, attaching approval
    /// `approval_id` (when not 0) to a resolution.
    pub fn set_status(
        &self,
        id: u64,
        status: &str,
        principal: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Result<Finding, StatusError>, StoreError> {
        let mut out = None;
        self.judge(|j| {
            out = Some(j.set_status(id, status, principal, note, approval_id)?);
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Backend("the finding was not updated".into()))
    }
}

/// Why a finding's status was not changed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No such finding.
    #[error("no finding {0}")]
    NoFinding(u64),
    /// No such approval.
    #[error("no approval {0}")]
    NoApproval(u64),
    /// Already resolved.
    #[error("finding {0} is already resolved")]
    Resolved(u64),
    /// The approval is not in force.
    #[error("approval {id} is {status}, not approved")]
    NotApproved {
        /// The approval.
        id: u64,
        /// Its status.
        status: String,
    },
}

impl Judge<'_> {
    fn state(&mut self, node: &str, path: &str) -> Result<&mut PathState, StoreError> {
        let k = (node.to_owned(), path.to_owned());
        if !self.states.contains_key(&k) {
            let s = match self.tx.path_state(node, path)? {
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

    /// Writes back what the rules changed.
    fn finish(&mut self) -> Result<(), StoreError> {
        self.findings.write_back(self.tx)?;
        // One write per node: a record per file, or its removal.
        let mut by_node: BTreeMap<String, Vec<StateWrite>> = BTreeMap::new();
        for (n, p) in self.dirty.drain() {
            if let Some(s) = self.states.get(&(n.clone(), p.clone())) {
                let v = (*s != PathState::default()).then(|| s.encode_to_vec());
                by_node.entry(n).or_default().push((p, v));
            }
        }
        for (n, list) in by_node {
            let list: Vec<(&str, Option<&[u8]>)> = list
                .iter()
                .map(|(p, v)| (p.as_str(), v.as_deref()))
                .collect();
            self.tx.set_path_states(&n, &list)?;
        }
        Ok(())
    }

    /// Reads at once what judging `events` of `node` will look up: the
    /// files' records, the digested paths' baselines and the findings open
    /// under their drift and deletion keys (a round trip each on a
    /// database, instead of one per event).
    fn prefetch(&mut self, node: &str, events: &[&Event]) -> Result<(), StoreError> {
        let mut paths = std::collections::BTreeSet::new();
        let mut digested = std::collections::BTreeSet::new();
        for e in events {
            match &e.event {
                Some(event::Event::File(f)) => {
                    paths.insert(f.path.as_str());
                    if !f.new_path.is_empty() {
                        paths.insert(f.new_path.as_str());
                    }
                }
                Some(event::Event::Digest(d)) if d.scan_id.is_empty() => {
                    paths.insert(d.path.as_str());
                    digested.insert(d.path.as_str());
                }
                _ => {}
            }
        }
        let unread: Vec<&str> = paths
            .into_iter()
            .filter(|p| {
                !self
                    .states
                    .contains_key(&(node.to_owned(), (*p).to_owned()))
            })
            .collect();
        if !unread.is_empty() {
            for (p, v) in unread.iter().zip(self.tx.path_states(node, &unread)?) {
                let s = match v {
                    Some(v) => PathState::decode(&*v).map_err(|source| StoreError::Corrupt {
                        tree: "path_state",
                        source,
                    })?,
                    None => PathState::default(),
                };
                self.states.insert((node.to_owned(), (*p).to_owned()), s);
            }
        }
        let unread: Vec<&str> = digested
            .iter()
            .copied()
            .filter(|p| !self.baselines.contains_key(*p))
            .collect();
        if !unread.is_empty() {
            for p in &unread {
                self.baselines.insert((*p).to_owned(), Vec::new());
            }
            for b in self.tx.baselines_of_paths(&unread)? {
                self.baselines.entry(b.path.clone()).or_default().push(b);
            }
        }
        let keys: Vec<String> = digested
            .iter()
            .flat_map(|p| {
                [
                    format!("drift\0{node}\0{p}"),
                    format!("deleted\0{node}\0{p}"),
                ]
            })
            .collect();
        self.findings.prefetch(self.tx, &keys)
    }

    /// The desired state of `path` on `node`.
    fn baseline_for(&mut self, node: &str, path: &str) -> Result<Option<Baseline>, StoreError> {
        if !self.baselines.contains_key(path) {
            let of_path = self.tx.baselines_of(path)?;
            self.baselines.insert(path.to_owned(), of_path);
        }
        Ok(self
            .baselines
            .get(path)
            .and_then(|l| baselines::best(l, node))
            .cloned())
    }

    /// Stores a baseline (and keeps this transaction's view of it).
    fn put_baseline(&mut self, b: &Baseline) -> Result<(), StoreError> {
        self.tx.put_baseline(b)?;
        if let Some(list) = self.baselines.get_mut(&b.path) {
            list.retain(|x| x.host != b.host);
            list.push(b.clone());
        }
        Ok(())
    }

    /// Forgets a baseline.
    fn remove_baseline(&mut self, host: &str, path: &str) -> Result<(), StoreError> {
        self.tx.remove_baseline(host, path)?;
        if let Some(list) = self.baselines.get_mut(path) {
            list.retain(|x| x.host != host);
        }
        Ok(())
    }

    fn process(
        &mut self,
        node: &str,
        events: &[Event],
        policy: Option<&Policy>,
    ) -> Result<(), StoreError> {
        let (done, _) = self.tx.cursor(node)?;
        let fresh: Vec<&Event> = events.iter().filter(|e| e.seq > done).collect();
        self.prefetch(node, &fresh)?;
        let mut last = None;
        for e in fresh {
            match &e.event {
                Some(event::Event::File(f)) => self.file(e, f, policy)?,
                Some(event::Event::Digest(d)) => self.digest(e, d, policy)?,
                Some(event::Event::Connect(c)) => self.connect(e, c, policy)?,
                Some(event::Event::Loss(l)) => {
                    let lost: u64 = l.dropped.values().sum();
                    self.findings.record(
            self.tx,
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
                    if let Some(mut scan) = self.tx.scan(&s.scan_id)? {
                        scan.errors += s.errors;
                        scan.error.clone_from(&s.error);
                        scan.done = true;
                        self.tx.put_scan(&s.scan_id, &scan)?;
                        self.scans = true;
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
        if let Some(e) = last {
            self.tx.set_cursor(node, e.seq, e.time_unix_nanos)?;
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
                .matching(self.tx, &e.node, &r.name, target, e.time_unix_nanos, None)?
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
        if self.findings.fold_repeat(
            self.tx,
            &key,
            update,
            e.time_unix_nanos,
            failed,
            evidence(e),
        )? {
            return Ok(());
        }
        self.findings.record(
            self.tx,
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
            if let Some(mut scan) = self.tx.scan(&d.scan_id)? {
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
                    self.put_baseline(&b)?;
                } else {
                    scan.errors += 1;
                }
                self.tx.put_scan(&d.scan_id, &scan)?;
                self.scans = true;
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
        let Some(desired) = self.baseline_for(&node, &d.path)? else {
            // Nothing desired yet: learn it, or just judge the writers.
            if self.settings.learn && d.exists {
                self.put_baseline(&Baseline {
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
        let content = content_changes(&want, &actual, &diffs);
        let drift_key = format!("drift\0{node}\0{}", d.path);
        let deleted_key = format!("deleted\0{node}\0{}", d.path);
        if diffs.is_empty() {
            self.findings
                .resolve_key(self.tx, &drift_key, "back at the desired state", 0)?;
            if d.exists {
                self.findings
                    .resolve_key(self.tx, &deleted_key, "the file exists again", 0)?;
            }
            return self.settle_deferred(e, &pending, &resource, &d.path, d, true);
        }
        if !d.exists && desired.source == baselines::LEARNED_CREATED {
            // A file that appeared while watched and went again (an
            // editor's or sed's temporary file): it never was desired.
            self.remove_baseline(&desired.host, &d.path)?;
            return self.settle_deferred(e, &pending, &resource, &d.path, d, false);
        }
        // A gone file has no digest: only a request naming none covers it.
        if let Some(a) = self.approvals.matching(
            self.tx,
            &node,
            &resource,
            &d.path,
            e.time_unix_nanos,
            Some(&actual.sha256),
        )? {
            let mut actors = pending.writers.clone();
            for x in &pending.deferred {
                if let Some(p) = &x.actor {
                    if !actors.iter().any(|w| w.exec_id == p.exec_id) {
                        actors.push(p.clone());
                    }
                }
            }
            let change = ApprovedChange {
                id: self.tx.next_change_id()?,
                approval_id: a.id,
                node: node.clone(),
                resource: resource.clone(),
                path: d.path.clone(),
                // The diff stands for the structures, which stay with
                // the baselines.
                before: driftwatch_proto::structure::without(Some(want)),
                after: driftwatch_proto::structure::without(Some(actual.clone())),
                actors,
                time_unix_nanos: e.time_unix_nanos,
                evidence: ev,
                changes: content.changes,
                changes_note: content.note,
            };
            tracing::info!(approval = a.id, %node, path = %d.path, "approved change recorded");
            approvals::add_change(self.tx, a.id, change)?;
            let mut resolved = Vec::new();
            for k in [&drift_key, &deleted_key] {
                if let Some(id) = self.findings.resolve_key(
                    self.tx,
                    k,
                    &format!("approved by request {}", a.id),
                    a.id,
                )? {
                    resolved.push(id);
                }
            }
            approvals::add_resolved(self.tx, a.id, &resolved)?;
            if d.exists {
                self.put_baseline(&Baseline {
                    host: desired.host.clone(),
                    path: d.path.clone(),
                    state: Some(actual),
                    source: baselines::APPROVED.into(),
                    set_unix_nanos: now_unix_nanos(),
                    set_by: a.approver.clone(),
                })?;
            } else {
                self.remove_baseline(&desired.host, &d.path)?;
            }
            return Ok(());
        }
        let (kind, key) = if d.exists {
            ("drift", drift_key)
        } else {
            ("deleted", deleted_key)
        };
        if pending.writers.is_empty() {
            if let Some(open) = self.findings.open_with_key(self.tx, &key)? {
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
                    "content" if !content.changes.is_empty() => format!(
                        "content {} -> {}: {}",
                        short(&want.sha256),
                        short(&actual.sha256),
                        changes_line(&content)
                    ),
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
                    "xattrs" => format!(
                        "xattrs {}",
                        xattr_changes(want.attributes.as_ref(), actual.attributes.as_ref())
                    ),
                    "inode flags" => format!(
                        "inode flags [{}] -> [{}]",
                        want.attributes
                            .as_ref()
                            .map(|a| a.flags.join(","))
                            .unwrap_or_default(),
                        actual
                            .attributes
                            .as_ref()
                            .map(|a| a.flags.join(","))
                            .unwrap_or_default()
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
            self.tx,
            &key,
            Occurrence {
                kind,
                node: node.clone(),
                resource: resource.clone(),
                path: d.path.clone(),
                actor,
                // The desired structure stays with its baseline; the
                // actual one is kept, for an approval that makes it the
                // desired state (the API leaves it out).
                desired: driftwatch_proto::structure::without(Some(want)),
                actual: Some(actual),
                differences: diffs,
                summary,
                time: e.time_unix_nanos,
                evidence: ev,
                count: 1,
                changes: content.changes,
                changes_note: content.note,
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
                self.tx,
                &e.node,
                resource,
                path,
                e.time_unix_nanos,
                Some(&state_of(d).sha256),
            )?
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
                if approvals::grant_covering(
                    self.tx,
                    c.grant_id,
                    &e.node,
                    &r.name,
                    e.time_unix_nanos,
                )?
                .is_some()
                {
                    return approvals::add_use(self.tx, c.grant_id, evidence(e));
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
            self.tx,
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
                "{} was killed for {what} on {}: not a writer of {resource} ({})",
                who(actor),
                e.node,
                match &e.event {
                    // Judged at submission: io_uring cancels what a killed
                    // process left, and says so in the request's result.
                    Some(event::Event::File(f))
                        if f.via == "io_uring"
                            && f.result.as_ref().is_some_and(|r| r.error == "ECANCELED") =>
                    {
                        "an io_uring request, refused before it ran"
                    }
                    _ => "the call itself ran; nothing was written through it after",
                }
            ),
            _ => format!(
                "{} was refused {what} on {} (EPERM): not a client of {resource}",
                who(actor),
                e.node
            ),
        };
        self.findings.record(
            self.tx,
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
            self.tx,
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
        self.findings.write_back(self.tx)
    }

    /// Moves finding `id` to `status` for the control API.
    fn set_status(
        &mut self,
        id: u64,
        status: &str,
        principal: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Result<Finding, StatusError>, StoreError> {
        let Some(current) = self.findings.get(self.tx, id)? else {
            return Ok(Err(StatusError::NoFinding(id)));
        };
        if current.status == findings::RESOLVED {
            return Ok(Err(StatusError::Resolved(id)));
        }
        if approval_id != 0 {
            let Some(a) = self.tx.approval(approval_id)? else {
                return Ok(Err(StatusError::NoApproval(approval_id)));
            };
            if a.status != approvals::APPROVED {
                return Ok(Err(StatusError::NotApproved {
                    id: a.id,
                    status: a.status,
                }));
            }
        }
        let Some(f) =
            self.findings
                .set_status(self.tx, id, status, principal, note, approval_id)?
        else {
            return Ok(Err(StatusError::NoFinding(id)));
        };
        if approval_id != 0 {
            approvals::add_resolved(self.tx, approval_id, &[f.id])?;
        }
        Ok(Ok(f))
    }

    /// Resolves open findings an approval covers; drift takes the observed
    /// state as desired. Returns the ids resolved.
    fn apply_approval(&mut self, a: &Approval) -> Result<Vec<u64>, StoreError> {
        let id = a.id;
        if a.kind == approvals::ACCESS {
            return Ok(Vec::new());
        }
        let mut resolved = Vec::new();
        for f in self.tx.unresolved()? {
            if !matches!(f.kind.as_str(), "drift" | "deleted" | "unauthorized_write")
                || !baselines::host_matches(&a.host, &f.node)
                || !approvals::covers(a, &f.resource, &f.path)
            {
                continue;
            }
            let actual = f.actual.clone().unwrap_or_default();
            if !a.sha256.is_empty() && (f.kind != "drift" || actual.sha256 != a.sha256) {
                continue;
            }
            self.findings.set_status(
                self.tx,
                f.id,
                findings::RESOLVED,
                &a.approver,
                &format!("approved by request {id}"),
                id,
            )?;
            if f.kind == "drift" {
                if let Some(b) = self.baseline_for(&f.node, &f.path)? {
                    self.put_baseline(&Baseline {
                        state: Some(actual.clone()),
                        source: baselines::APPROVED.into(),
                        set_unix_nanos: now_unix_nanos(),
                        set_by: a.approver.clone(),
                        ..b
                    })?;
                }
                // Approved after the fact: the change it approved, with
                // its diff, is on the approval's record too.
                let change = ApprovedChange {
                    id: self.tx.next_change_id()?,
                    approval_id: id,
                    node: f.node.clone(),
                    resource: f.resource.clone(),
                    path: f.path.clone(),
                    before: f.desired.clone(),
                    after: driftwatch_proto::structure::without(Some(actual)),
                    actors: f.actor.clone().into_iter().collect(),
                    time_unix_nanos: f.last_seen_unix_nanos,
                    evidence: f.evidence.clone(),
                    changes: f.changes.clone(),
                    changes_note: f.changes_note.clone(),
                };
                approvals::add_change(self.tx, id, change)?;
            }
            resolved.push(f.id);
        }
        approvals::add_resolved(self.tx, id, &resolved)?;
        Ok(resolved)
    }
}

/// Runs the silence check every second.
pub fn spawn_silence_check(c: Arc<Correlator>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let c2 = c.clone();
            let checked = tokio::task::spawn_blocking(move || {
                c2.check_silent(now_unix_nanos())?;
                // Expired grants leave the set the agents hold (their
                // kernels close the gate at the expiry on their own), and
                // grants decided through another replica join it.
                c2.publish_grants()
            })
            .await;
            match checked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("checking for silent agents and grants failed: {e}"),
                Err(e) => tracing::error!("the silence check stopped: {e}"),
            }
        }
    });
}

#[cfg(test)]
mod tests;
