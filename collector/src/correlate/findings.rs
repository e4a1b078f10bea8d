//! Findings: one record per finding, deduplicated by a key while open or
//! acknowledged, moving open → acknowledged → resolved, stored through a
//! judging transaction ([`JudgeTx`]).

use std::collections::{BTreeMap, HashMap};

use driftwatch_proto::v1::{EvidenceRef, FileState, Finding, Process, StatusChange};

use crate::store::{judging::JudgeTx, StoreError};

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
    /// What changed in the content, desired -> actual.
    pub changes: Vec<driftwatch_proto::v1::ConfigChange>,
    /// Why `changes` is empty or partial.
    pub changes_note: String,
}

/// The findings one transaction touches: those it changed, written back
/// together by [`Findings::write_back`], and the keys it looked up. Nothing
/// here outlives the transaction.
#[derive(Default)]
pub struct Findings<'c> {
    /// Read in this transaction, unchanged.
    loaded: HashMap<u64, Finding>,
    /// Changed in this transaction, to write back.
    pending: BTreeMap<u64, Finding>,
    /// Keys looked up in this transaction: the unresolved finding's id.
    open: HashMap<String, Option<u64>>,
    /// Findings opened in this transaction, to tell of once it commits.
    pub opened: Vec<Finding>,
    /// The severity the policy gives a finding (kind, resource), if any.
    pub policy_severity: Option<&'c PolicySeverity>,
}

/// A hook told of every finding opened.
pub type OnOpen = Box<dyn Fn(&Finding) + Send + Sync>;
/// The policy's severity for a finding of a kind on a resource.
pub type PolicySeverity = Box<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// The severities, lowest first.
pub const SEVERITIES: [&str; 4] = ["low", "medium", "high", "critical"];

/// A severity's rank (unknown: 0).
pub fn severity_rank(s: &str) -> usize {
    SEVERITIES.iter().position(|x| *x == s).unwrap_or(0)
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

impl<'c> Findings<'c> {
    /// Nothing touched yet, severities from `policy_severity`.
    pub fn new(policy_severity: &'c PolicySeverity) -> Self {
        Self {
            policy_severity: Some(policy_severity),
            ..Self::default()
        }
    }

    /// One finding, as this transaction left it.
    pub fn get(&self, tx: &mut dyn JudgeTx, id: u64) -> Result<Option<Finding>, StoreError> {
        if let Some(f) = self.pending.get(&id).or_else(|| self.loaded.get(&id)) {
            return Ok(Some(f.clone()));
        }
        tx.finding(id)
    }

    /// Writes the findings changed since the last call.
    pub fn write_back(&mut self, tx: &mut dyn JudgeTx) -> Result<(), StoreError> {
        let changed: Vec<Finding> = std::mem::take(&mut self.pending).into_values().collect();
        if changed.is_empty() {
            return Ok(());
        }
        tx.update_findings(&changed)
    }

    fn open_id(&mut self, tx: &mut dyn JudgeTx, key: &str) -> Result<Option<u64>, StoreError> {
        if let Some(id) = self.open.get(key) {
            return Ok(*id);
        }
        let found = tx.open_finding(key)?;
        let id = found.as_ref().map(|f| f.id);
        if let Some(f) = found {
            if !self.pending.contains_key(&f.id) {
                self.loaded.insert(f.id, f);
            }
        }
        self.open.insert(key.to_owned(), id);
        Ok(id)
    }

    /// Reads the unresolved findings under `keys` at once (those not
    /// looked up yet in this transaction).
    pub fn prefetch(&mut self, tx: &mut dyn JudgeTx, keys: &[String]) -> Result<(), StoreError> {
        let wanted: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| !self.open.contains_key(*k))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        for (k, f) in wanted.iter().zip(tx.open_findings(&wanted)?) {
            let id = f.as_ref().map(|f| f.id);
            if let Some(f) = f {
                if !self.pending.contains_key(&f.id) {
                    self.loaded.insert(f.id, f);
                }
            }
            self.open.insert((*k).to_owned(), id);
        }
        Ok(())
    }

    /// The unresolved finding with this key, if any.
    pub fn open_with_key(
        &mut self,
        tx: &mut dyn JudgeTx,
        key: &str,
    ) -> Result<Option<Finding>, StoreError> {
        match self.open_id(tx, key)? {
            Some(id) => self.get(tx, id),
            None => Ok(None),
        }
    }

    /// The finding open under `key`, loaded for an update in place (it is
    /// written back with the others by [`Findings::write_back`]).
    fn open_mut(
        &mut self,
        tx: &mut dyn JudgeTx,
        key: &str,
    ) -> Result<Option<&mut Finding>, StoreError> {
        let Some(id) = self.open_id(tx, key)? else {
            return Ok(None);
        };
        if let std::collections::btree_map::Entry::Vacant(slot) = self.pending.entry(id) {
            let found = match self.loaded.remove(&id) {
                Some(f) => Some(f),
                None => tx.finding(id)?,
            };
            match found {
                Some(f) => {
                    slot.insert(f);
                }
                None => return Ok(None),
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
        tx: &mut dyn JudgeTx,
        key: &str,
        update: impl FnOnce(&mut Finding),
        time: i64,
        failed: bool,
        evidence: EvidenceRef,
    ) -> Result<bool, StoreError> {
        let Some(f) = self.open_mut(tx, key)? else {
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
    pub fn record(
        &mut self,
        tx: &mut dyn JudgeTx,
        key: &str,
        o: Occurrence,
    ) -> Result<u64, StoreError> {
        let count = o.count.max(1);
        if let Some(f) = self.open_mut(tx, key)? {
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
                // The changes are those of the latest actual state.
                f.changes = o.changes;
                f.changes_note = o.changes_note;
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
        let mut f = Finding {
            id: 0,
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
            changes: o.changes,
            changes_note: o.changes_note,
        };
        if !tx.insert_finding(key, &mut f)? {
            // Opened under this key since it was looked up (by another
            // replica): this occurrence folds into that one.
            self.open.remove(key);
            if self.open_id(tx, key)?.is_none() {
                return Err(StoreError::Backend(format!(
                    "the finding under {:?} is neither open nor insertable",
                    key.replace('\0', " ")
                )));
            }
            let o = Occurrence {
                // The open finding keeps its kind.
                kind: "",
                node: f.node,
                resource: f.resource,
                path: f.path,
                actor: f.actor,
                desired: f.desired,
                actual: f.actual,
                differences: f.differences,
                summary: f.summary,
                time: f.last_seen_unix_nanos,
                evidence: f.evidence,
                count: f.count,
                failed: f.failed,
                address: f.address,
                port: f.port,
                severity: f.severity,
                changes: f.changes,
                changes_note: f.changes_note,
            };
            return self.record(tx, key, o);
        }
        let id = f.id;
        self.open.insert(key.to_owned(), Some(id));
        tracing::info!(id, kind = %f.kind, node = %f.node, severity = %f.severity, summary = %f.summary, "finding opened");
        self.opened.push(f);
        Ok(id)
    }

    /// Moves a finding to `status` (`acknowledged` or `resolved`).
    pub fn set_status(
        &mut self,
        tx: &mut dyn JudgeTx,
        id: u64,
        status: &str,
        principal: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Option<Finding>, StoreError> {
        let Some(mut f) = self.get(tx, id)? else {
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
        // Written at once: a resolved finding gives up its key, which
        // this transaction may then open again.
        self.pending.remove(&id);
        self.loaded.remove(&id);
        tx.update_finding(&f)?;
        if status == RESOLVED {
            for v in self.open.values_mut() {
                if *v == Some(id) {
                    *v = None;
                }
            }
        }
        Ok(Some(f))
    }

    /// Resolves the unresolved finding with `key`, if there is one.
    pub fn resolve_key(
        &mut self,
        tx: &mut dyn JudgeTx,
        key: &str,
        note: &str,
        approval_id: u64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(id) = self.open_id(tx, key)? else {
            return Ok(None);
        };
        self.set_status(tx, id, RESOLVED, "collector", note, approval_id)?;
        tracing::info!(id, key = %key.replace('\0', " "), note, "finding resolved");
        Ok(Some(id))
    }
}
