//! Findings on disk: one record per finding, deduplicated by a key while
//! open or acknowledged, moving open → acknowledged → resolved.
//!
//! Trees: `findings`: id (u64, big-endian) → `Finding`; `finding_keys`:
//! dedupe key → id, for findings not yet resolved.

use std::collections::HashMap;

use driftwatch_proto::v1::{EvidenceRef, FileState, Finding, Process, StatusChange};
use prost::Message as _;

use crate::store::{sled_store::SledStore as Store, StoreError};

/// Evidence kept per finding: the first events and the latest ones.
const EVIDENCE_HEAD: usize = 10;
const EVIDENCE_TAIL: usize = 10;

/// Finding statuses.
pub const OPEN: &str = "open";
/// Someone has seen it.
pub const ACKNOWLEDGED: &str = "acknowledged";
/// Closed.
pub const RESOLVED: &str = "resolved";

/// One occurrence of something a finding reports.
#[derive(Debug, Default)]
pub struct Occurrence {
    /// Finding kind.
    pub kind: &'static str,
    /// Node.
    pub node: String,
    /// Policy resource.
    pub resource: String,
    /// File path.
    pub path: String,
    /// Who acted.
    pub actor: Option<Process>,
    /// Desired state.
    pub desired: Option<FileState>,
    /// Observed state.
    pub actual: Option<FileState>,
    /// What differs.
    pub differences: Vec<String>,
    /// One line.
    pub summary: String,
    /// When.
    pub time: i64,
    /// Its events.
    pub evidence: Vec<EvidenceRef>,
    /// Occurrences this stands for (at least 1).
    pub count: u64,
    /// Failed attempts among them.
    pub failed: u64,
    /// Connect destination.
    pub address: String,
    /// Connect port.
    pub port: u32,
    /// Severity (empty: the kind's default).
    pub severity: String,
}

/// The findings trees, with the open keys in memory. Updates within a
/// batch of events are kept in memory and written once by [`Findings::write_back`].
pub struct Findings {
    tree: sled::Tree,
    keys: sled::Tree,
    open: HashMap<String, u64>,
    pending: HashMap<u64, Finding>,
    log: ChangeLog,
    /// Told of every finding opened.
    pub on_open: Option<OnOpen>,
    /// The severity the policy gives a finding (kind, resource), if any.
    pub policy_severity: Option<PolicySeverity>,
}

/// A hook told of every finding opened.
pub type OnOpen = Box<dyn Fn(&Finding) + Send>;
/// The policy's severity for a finding of a kind on a resource.
pub type PolicySeverity = Box<dyn Fn(&str, &str) -> Option<String> + Send>;

/// The change log behind `findings watch`: cursor → finding id, one entry
/// per finding (its latest change), so a reader that resumes sees each
/// changed finding once, as it is now.
#[derive(Clone)]
pub struct ChangeLog {
    /// Cursor (u64, big-endian) → finding id (u64, big-endian).
    pub log: sled::Tree,
    /// Finding id → its cursor.
    pos: sled::Tree,
    /// The findings.
    pub findings: sled::Tree,
    /// The newest cursor.
    pub latest: tokio::sync::watch::Sender<u64>,
}

impl ChangeLog {
    fn append(&self, id: u64) -> Result<(), StoreError> {
        let next = *self.latest.borrow() + 1;
        if let Some(old) = self.pos.insert(id.to_be_bytes(), &next.to_be_bytes())? {
            self.log.remove(old)?;
        }
        self.log.insert(next.to_be_bytes(), &id.to_be_bytes())?;
        self.latest.send_replace(next);
        Ok(())
    }

    /// Changes after `cursor`, oldest first, at most `limit`.
    pub fn after(&self, cursor: u64, limit: usize) -> Result<Vec<(u64, Finding)>, StoreError> {
        let mut out = Vec::new();
        let start = cursor.saturating_add(1).to_be_bytes();
        for kv in self.log.range(start..).take(limit) {
            let (k, v) = kv?;
            let (Ok(k), Ok(v)) = (<[u8; 8]>::try_from(&*k), <[u8; 8]>::try_from(&*v)) else {
                continue;
            };
            if let Some(f) = self.findings.get(v)? {
                out.push((
                    u64::from_be_bytes(k),
                    Finding::decode(&*f).map_err(corrupt)?,
                ));
            }
        }
        Ok(out)
    }
}

/// The severities, lowest first.
pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];

/// A severity's rank (unknown: 0).
pub fn severity_rank(s: &str) -> usize {
    SEVERITIES.iter().position(|x| *x == s).unwrap_or(0)
}

fn corrupt(source: prost::DecodeError) -> StoreError {
    StoreError::Corrupt {
        tree: "findings",
        source,
    }
}

fn push_evidence(list: &mut Vec<EvidenceRef>, more: Vec<EvidenceRef>) {
    for e in more {
        if list.iter().any(|x| x.node == e.node && x.seq == e.seq) {
            continue;
        }
        list.push(e);
        if list.len() > EVIDENCE_HEAD + EVIDENCE_TAIL {
            list.remove(EVIDENCE_HEAD);
        }
    }
}

impl Findings {
    /// Opens the trees.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree("findings")?;
        let keys = store.tree("finding_keys")?;
        let mut open = HashMap::new();
        for kv in keys.iter() {
            let (k, v) = kv?;
            let mut id = [0u8; 8];
            id.copy_from_slice(&v[..8.min(v.len())]);
            open.insert(
                String::from_utf8_lossy(&k).into_owned(),
                u64::from_be_bytes(id),
            );
        }
        let log = store.tree("finding_log")?;
        let latest = match log.last()? {
            Some((k, _)) => <[u8; 8]>::try_from(&*k).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let log = ChangeLog {
            log,
            pos: store.tree("finding_log_pos")?,
            findings: tree.clone(),
            latest: tokio::sync::watch::channel(latest).0,
        };
        Ok(Self {
            tree,
            keys,
            open,
            pending: HashMap::new(),
            log,
            on_open: None,
            policy_severity: None,
        })
    }

    /// The change log, for readers.
    pub fn change_log(&self) -> ChangeLog {
        self.log.clone()
    }

    /// One finding.
    pub fn get(&self, id: u64) -> Result<Option<Finding>, StoreError> {
        if let Some(f) = self.pending.get(&id) {
            return Ok(Some(f.clone()));
        }
        self.tree
            .get(id.to_be_bytes())?
            .map(|v| Finding::decode(&*v).map_err(corrupt))
            .transpose()
    }

    fn put(&mut self, f: &Finding) -> Result<(), StoreError> {
        self.pending.insert(f.id, f.clone());
        Ok(())
    }

    /// Writes the findings changed since the last call.
    pub fn write_back(&mut self) -> Result<(), StoreError> {
        let mut ids: Vec<u64> = self.pending.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(f) = self.pending.remove(&id) {
                self.tree.insert(id.to_be_bytes(), f.encode_to_vec())?;
                self.log.append(id)?;
            }
        }
        Ok(())
    }

    /// The unresolved finding with this key, if any.
    pub fn open_with_key(&self, key: &str) -> Result<Option<Finding>, StoreError> {
        match self.open.get(key) {
            Some(id) => self.get(*id),
            None => Ok(None),
        }
    }

    /// The finding open under `key`, loaded for an update in place (it is
    /// written back with the others by [`Findings::write_back`]).
    fn open_mut(&mut self, key: &str) -> Result<Option<&mut Finding>, StoreError> {
        let Some(id) = self.open.get(key).copied() else {
            return Ok(None);
        };
        if !self.pending.contains_key(&id) {
            if let Some(f) = self.get(id)? {
                self.pending.insert(id, f);
            }
        }
        Ok(self.pending.get_mut(&id))
    }

    /// Folds one more occurrence into the open finding under `key` in
    /// place: `update` brings what the occurrence says up to date (and
    /// should copy nothing that is already equal), then its count,
    /// failures, last time and evidence follow. Returns false, having
    /// changed nothing, when no finding is open under `key`. A storm of
    /// repeats then costs no copy of the actor per event.
    pub fn fold_repeat(
        &mut self,
        key: &str,
        update: impl FnOnce(&mut Finding),
        time: i64,
        failed: bool,
        evidence: EvidenceRef,
    ) -> Result<bool, StoreError> {
        let Some(f) = self.open_mut(key)? else {
            return Ok(false);
        };
        update(f);
        f.count += 1;
        f.failed += u64::from(failed);
        f.last_seen_unix_nanos = f.last_seen_unix_nanos.max(time);
        push_evidence(&mut f.evidence, vec![evidence]);
        Ok(true)
    }

    /// Folds an occurrence into the unresolved finding with `key`, or opens
    /// a new one. Returns the finding's id.
    pub fn record(&mut self, key: &str, o: Occurrence) -> Result<u64, StoreError> {
        let count = o.count.max(1);
        if let Some(f) = self.open_mut(key)? {
            f.count += count;
            f.failed += o.failed;
            f.last_seen_unix_nanos = f.last_seen_unix_nanos.max(o.time);
            if o.actor.is_some() {
                f.actor = o.actor;
            }
            if !o.path.is_empty() {
                f.path = o.path;
            }
            if o.desired.is_some() {
                f.desired = o.desired;
            }
            if o.actual.is_some() {
                f.actual = o.actual;
            }
            if !o.differences.is_empty() {
                f.differences = o.differences;
            }
            if !o.summary.is_empty() {
                f.summary = o.summary;
            }
            if !o.address.is_empty() {
                f.address = o.address;
                f.port = o.port;
            }
            push_evidence(&mut f.evidence, o.evidence);
            return Ok(f.id);
        }
        let stored = match self.tree.last()? {
            Some((k, _)) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&k[..8]);
                u64::from_be_bytes(b)
            }
            None => 0,
        };
        let id = stored.max(self.pending.keys().copied().max().unwrap_or(0)) + 1;
        let mut evidence = Vec::new();
        push_evidence(&mut evidence, o.evidence);
        let severity = if !o.severity.is_empty() {
            o.severity
        } else if let Some(s) = self
            .policy_severity
            .as_ref()
            .and_then(|p| p(o.kind, &o.resource))
        {
            s
        } else {
            driftwatch_proto::policy::severity_of(o.kind, None).to_owned()
        };
        let f = Finding {
            id,
            kind: o.kind.to_owned(),
            status: OPEN.into(),
            node: o.node,
            resource: o.resource,
            path: o.path,
            actor: o.actor,
            desired: o.desired,
            actual: o.actual,
            differences: o.differences,
            summary: o.summary,
            first_seen_unix_nanos: o.time,
            last_seen_unix_nanos: o.time,
            count,
            evidence,
            approval_id: 0,
            history: vec![StatusChange {
                status: OPEN.into(),
                principal: "collector".into(),
                time_unix_nanos: driftwatch_proto::time::now_unix_nanos(),
                note: String::new(),
            }],
            address: o.address,
            port: o.port,
            failed: o.failed,
            severity,
        };
        self.put(&f)?;
        // A new finding is written at once: it is what a reader waits for.
        self.write_back()?;
        self.keys.insert(key.as_bytes(), &id.to_be_bytes())?;
        self.open.insert(key.to_owned(), id);
        tracing::info!(id, kind = %f.kind, node = %f.node, severity = %f.severity, summary = %f.summary, "finding opened");
        if let Some(tell) = &self.on_open {
            tell(&f);
        }
        Ok(id)
    }

    /// Moves a finding to `status` (`acknowledged` or `resolved`).
    pub fn set_status(
        &mut self,
        id: u64,
        status: &str,
        principal: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Option<Finding>, StoreError> {
        let Some(mut f) = self.get(id)? else {
            return Ok(None);
        };
        f.status = status.to_owned();
        if approval_id != 0 {
            f.approval_id = approval_id;
        }
        f.history.push(StatusChange {
            status: status.to_owned(),
            principal: principal.to_owned(),
            time_unix_nanos: driftwatch_proto::time::now_unix_nanos(),
            note: note.to_owned(),
        });
        self.put(&f)?;
        self.write_back()?;
        if status == RESOLVED {
            let keys: Vec<String> = self
                .open
                .iter()
                .filter(|(_, v)| **v == id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                self.open.remove(&k);
                self.keys.remove(k.as_bytes())?;
            }
        }
        Ok(Some(f))
    }

    /// Resolves the unresolved finding with `key`, if there is one.
    pub fn resolve_key(
        &mut self,
        key: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(id) = self.open.get(key).copied() else {
            return Ok(None);
        };
        self.set_status(id, RESOLVED, "collector", note, approval_id)?;
        tracing::info!(id, key = %key.replace('\0', " "), note, "finding resolved");
        Ok(Some(id))
    }

    /// Unresolved findings by kind (a finding's key starts with its kind),
    /// without reading them.
    pub fn open_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        let mut by_kind = std::collections::BTreeMap::new();
        for key in self.open.keys() {
            let kind = key.split('\0').next().unwrap_or_default();
            *by_kind.entry(kind.to_owned()).or_default() += 1;
        }
        by_kind
    }

    /// Unresolved findings.
    pub fn unresolved(&self) -> Result<Vec<Finding>, StoreError> {
        let mut out = Vec::new();
        for id in self.open.values() {
            if let Some(f) = self.get(*id)? {
                out.push(f);
            }
        }
        out.sort_by_key(|f| f.id);
        Ok(out)
    }

    /// Findings newest first, passing `keep`, at most `limit`.
    pub fn list(
        &self,
        limit: usize,
        keep: impl Fn(&Finding) -> bool,
    ) -> Result<Vec<Finding>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev() {
            let (_, v) = kv?;
            let f = Finding::decode(&*v).map_err(corrupt)?;
            if keep(&f) {
                out.push(f);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}
