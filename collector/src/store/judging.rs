//! The judging state: what the correlator decides from the events, kept
//! apart from the event log and changed only in transactions.
//!
//! A [`JudgeTx`] is one transaction over: each node's cursor (the last
//! event judged), the per-file state between two digests, the findings
//! (deduplicated by a key while unresolved, ids issued by the backend, a
//! change log for `findings watch`), the baselines, the approvals (ids
//! issued by the backend, decisions checked in the transaction) and the
//! baseline scans in flight. Everything a transaction changes is committed
//! together, or nothing is.
//!
//! Concurrency is the backend's: the embedded backends run one
//! transaction at a time; PostgreSQL locks the rows a transaction reads
//! for an update (a node's cursor, an open finding's key, an approval) and
//! retries a transaction the server aborted for a deadlock, so that
//! replicas judging at once agree on every id, key and decision.

use std::collections::BTreeMap;

use driftwatch_proto::v1::{Approval, Baseline, Finding};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// A baseline scan the collector asked an agent for, until its result is
/// read by whoever asked (on any replica).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScanRecord {
    /// The node asked to scan.
    #[serde(default)]
    pub node: String,
    /// The path it scans.
    #[serde(default)]
    pub path: String,
    /// When it was asked.
    #[serde(default)]
    pub started_unix_nanos: i64,
    /// Asked of the agent (by the replica its stream is on).
    #[serde(default)]
    pub sent: bool,
    /// The host selector the scanned files become desired state for.
    pub apply_to: String,
    /// Who asked.
    pub principal: String,
    /// Files taken into the baseline so far.
    #[serde(default)]
    pub files: u64,
    /// Files that could not be read.
    #[serde(default)]
    pub errors: u64,
    /// The agent reported the scan finished.
    #[serde(default)]
    pub done: bool,
    /// Why the scan failed, if it did.
    #[serde(default)]
    pub error: String,
}

/// Work that runs in one transaction.
pub type Work<'a> = dyn FnMut(&mut dyn JudgeTx) -> Result<(), StoreError> + 'a;

/// Where the judging state lives.
pub trait Judging: Send + Sync {
    /// Runs `work` in one transaction and commits what it changed. `work`
    /// may run more than once (a backend retries a transaction the server
    /// aborted): it must start from what it is given each time.
    fn transact(&self, work: &mut Work<'_>) -> Result<(), StoreError>;

    /// Makes every committed transaction durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// The newest finding-change cursor, announced as it moves (changes
    /// committed through other replicas included, within a second).
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// One transaction over the judging state.
pub trait JudgeTx {
    /// The last event of `node` judged: (seq, time); (0, 0) before any.
    /// Held until the end of the transaction: judging a node is serial.
    fn cursor(&mut self, node: &str) -> Result<(u64, i64), StoreError>;
    /// Moves the cursor of `node`.
    fn set_cursor(&mut self, node: &str, seq: u64, time: i64) -> Result<(), StoreError>;

    /// The correlator's own record of a file between two digests.
    fn path_state(&mut self, node: &str, path: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Replaces (or, with `None`, forgets) that record.
    fn set_path_state(
        &mut self,
        node: &str,
        path: &str,
        state: Option<&[u8]>,
    ) -> Result<(), StoreError>;

    /// The records of several files of `node` at once (as
    /// [`JudgeTx::path_state`] each; a backend may read them in one go).
    fn path_states(
        &mut self,
        node: &str,
        paths: &[&str],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        paths.iter().map(|p| self.path_state(node, p)).collect()
    }
    /// Replaces or forgets several records of `node` at once.
    fn set_path_states(
        &mut self,
        node: &str,
        states: &[(&str, Option<&[u8]>)],
    ) -> Result<(), StoreError> {
        for (p, s) in states {
            self.set_path_state(node, p, *s)?;
        }
        Ok(())
    }

    /// The unresolved finding under `key`, held for an update.
    fn open_finding(&mut self, key: &str) -> Result<Option<Finding>, StoreError>;
    /// The unresolved findings under several keys, each held for an
    /// update (`None` where no finding is open).
    fn open_findings(&mut self, keys: &[&str]) -> Result<Vec<Option<Finding>>, StoreError> {
        keys.iter().map(|k| self.open_finding(k)).collect()
    }
    /// One finding.
    fn finding(&mut self, id: u64) -> Result<Option<Finding>, StoreError>;
    /// Stores a new finding under `key` with an id the backend issues
    /// (written into `f`). False, storing nothing, when an unresolved
    /// finding already holds `key` (opened since it was looked up).
    fn insert_finding(&mut self, key: &str, f: &mut Finding) -> Result<bool, StoreError>;
    /// Stores a changed finding; a resolved one gives up its key.
    fn update_finding(&mut self, f: &Finding) -> Result<(), StoreError>;
    /// Stores changed findings (as [`JudgeTx::update_finding`] each; a
    /// backend may write them at once).
    fn update_findings(&mut self, fs: &[Finding]) -> Result<(), StoreError> {
        for f in fs {
            self.update_finding(f)?;
        }
        Ok(())
    }
    /// Unresolved findings, by id.
    fn unresolved(&mut self) -> Result<Vec<Finding>, StoreError>;
    /// How many findings are unresolved, by kind.
    fn open_by_kind(&mut self) -> Result<BTreeMap<String, u64>, StoreError>;
    /// Findings newest first, passing `keep`, at most `limit`.
    fn findings(
        &mut self,
        limit: usize,
        keep: &dyn Fn(&Finding) -> bool,
    ) -> Result<Vec<Finding>, StoreError>;
    /// Findings changed after `cursor`, each once as it is now, in the
    /// order of their latest change, at most `limit`.
    fn changes_after(
        &mut self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Finding)>, StoreError>;

    /// The baselines of `path`, for every host selector.
    fn baselines_of(&mut self, path: &str) -> Result<Vec<Baseline>, StoreError>;
    /// The baselines of several paths, for every host selector.
    fn baselines_of_paths(&mut self, paths: &[&str]) -> Result<Vec<Baseline>, StoreError> {
        let mut out = Vec::new();
        for p in paths {
            out.extend(self.baselines_of(p)?);
        }
        Ok(out)
    }
    /// Stores (or replaces) a baseline.
    fn put_baseline(&mut self, b: &Baseline) -> Result<(), StoreError>;
    /// Forgets a baseline.
    fn remove_baseline(&mut self, host: &str, path: &str) -> Result<(), StoreError>;
    /// Baselines of a selector (all when empty) under a path prefix.
    fn baselines(&mut self, host: &str, prefix: &str) -> Result<Vec<Baseline>, StoreError>;

    /// Approvals with one of `statuses` (all when empty), oldest first.
    fn approvals(&mut self, statuses: &[&str]) -> Result<Vec<Approval>, StoreError>;
    /// One approval, held for an update.
    fn approval(&mut self, id: u64) -> Result<Option<Approval>, StoreError>;
    /// Stores a new approval with an id the backend issues (written into `a`).
    fn insert_approval(&mut self, a: &mut Approval) -> Result<(), StoreError>;
    /// Stores a changed approval.
    fn update_approval(&mut self, a: &Approval) -> Result<(), StoreError>;
    /// The id of the next approved-change record.
    fn next_change_id(&mut self) -> Result<u64, StoreError>;

    /// A scan in flight.
    fn scan(&mut self, id: &str) -> Result<Option<ScanRecord>, StoreError>;
    /// Records a scan (or its progress).
    fn put_scan(&mut self, id: &str, scan: &ScanRecord) -> Result<(), StoreError>;
    /// Every scan recorded.
    fn scans(&mut self) -> Result<Vec<(String, ScanRecord)>, StoreError>;
    /// Forgets a scan.
    fn remove_scan(&mut self, id: &str) -> Result<(), StoreError>;
}

/// Runs `f` in one transaction of `j` and returns what it returned.
pub fn transact<T>(
    j: &dyn Judging,
    mut f: impl FnMut(&mut dyn JudgeTx) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut out = None;
    j.transact(&mut |tx| {
        out = Some(f(tx)?);
        Ok(())
    })?;
    out.ok_or_else(|| StoreError::Backend("a transaction ended without running".into()))
}
