//! The judging state in an ordered key-value engine: sled (the embedded
//! default, in the collector's `--data-dir`) or memory (tests).
//!
//! A transaction reads the engine through its own writes and commits them
//! in one atomic batch (a sled transaction over every tree it wrote).
//! These engines live in one process: transactions run one at a time, and
//! ids are the largest stored plus one.
//!
//! Trees (one layout for both engines, the one earlier versions wrote):
//! - `correlated`: node → seq (u64 BE) ‖ time (i64 BE);
//! - `path_state`: node `\0` path → the correlator's record;
//! - `findings`: id (u64 BE) → `Finding`; `finding_keys`: dedupe key → id,
//!   for unresolved findings;
//! - `finding_log`: cursor (u64 BE) → id, one entry per finding (its latest
//!   change); `finding_log_pos`: id → its cursor;
//! - `baselines`: path `\0` host → `Baseline`;
//! - `approvals`: id (u64 BE) → `Approval`;
//! - `scans`: scan id → [`ScanRecord`] (JSON).

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::Mutex,
};

use driftwatch_proto::v1::{Approval, Baseline, Finding};
use prost::Message as _;

use super::{
    judging::{JudgeTx, Judging, ScanRecord, Work},
    sled_store::SledStore,
    StoreError,
};

const CURSORS: &str = "correlated";
const PATH_STATE: &str = "path_state";
const FINDINGS: &str = "findings";
const FINDING_KEYS: &str = "finding_keys";
const FINDING_LOG: &str = "finding_log";
const FINDING_LOG_POS: &str = "finding_log_pos";
const BASELINES: &str = "baselines";
const APPROVALS: &str = "approvals";
const SCANS: &str = "scans";
const TREES: [&str; 9] = [
    CURSORS,
    PATH_STATE,
    FINDINGS,
    FINDING_KEYS,
    FINDING_LOG,
    FINDING_LOG_POS,
    BASELINES,
    APPROVALS,
    SCANS,
];

/// One write of a transaction: (tree, key, value or removal).
type Write = (&'static str, Vec<u8>, Option<Vec<u8>>);

/// An ordered key-value engine.
pub trait Kv: Send + Sync {
    /// One value.
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Entries from `from` (inclusive) on, ascending or (`rev`) descending
    /// from the end, until `visit` returns false.
    fn scan(
        &self,
        tree: &'static str,
        from: &[u8],
        rev: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// Applies every write at once.
    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Makes what was committed durable.
    fn flush(&self) -> Result<(), StoreError>;
}

/// sled, in the collector's data directory.
pub struct SledKv {
    store: SledStore,
    trees: HashMap<&'static str, sled::Tree>,
}

impl SledKv {
    /// The judging trees of `store`.
    pub fn open(store: SledStore) -> Result<Self, StoreError> {
        let mut trees = HashMap::new();
        for t in TREES {
            trees.insert(t, store.tree(t)?);
        }
        Ok(Self { store, trees })
    }

    fn tree(&self, name: &'static str) -> Result<&sled::Tree, StoreError> {
        self.trees
            .get(name)
            .ok_or_else(|| StoreError::Backend(format!("sled: no tree {name}")))
    }
}

impl Kv for SledKv {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        tree: &'static str,
        from: &[u8],
        rev: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let t = self.tree(tree)?;
        if rev {
            for kv in t.iter().rev() {
                let (k, v) = kv?;
                if !visit(&k, &v) {
                    break;
                }
            }
        } else {
            for kv in t.range(from..) {
                let (k, v) = kv?;
                if !visit(&k, &v) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        use sled::Transactional as _;
        if writes.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&'static str> = writes.iter().map(|w| w.0).collect();
        names.sort_unstable();
        names.dedup();
        let trees: Vec<sled::Tree> = names
            .iter()
            .map(|n| self.tree(n).cloned())
            .collect::<Result<_, _>>()?;
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        trees
            .as_slice()
            .transaction(|tx| {
                for (tree, k, v) in &writes {
                    let t = &tx[index[tree]];
                    match v {
                        Some(v) => {
                            t.insert(k.as_slice(), v.as_slice())?;
                        }
                        None => {
                            t.remove(k.as_slice())?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| {
                StoreError::Backend(format!("sled: committing the judging state: {e:?}"))
            })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.store.flush_blocking()
    }
}

/// One tree in memory.
type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

/// What a transaction's scan calls with each entry: go on?
type Visit<'v> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'v;

/// Memory, for tests.
#[derive(Default)]
pub struct MemoryKv {
    trees: Mutex<HashMap<&'static str, Tree>>,
}

impl Kv for MemoryKv {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        Ok(trees.get(tree).and_then(|t| t.get(key)).cloned())
    }

    fn scan(
        &self,
        tree: &'static str,
        from: &[u8],
        rev: bool,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = trees.get(tree) else {
            return Ok(());
        };
        if rev {
            for (k, v) in t.iter().rev() {
                if !visit(k, v) {
                    break;
                }
            }
        } else {
            for (k, v) in t.range::<[u8], _>((Bound::Included(from), Bound::Unbounded)) {
                if !visit(k, v) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        for (tree, k, v) in writes {
            let t = trees.entry(tree).or_default();
            match v {
                Some(v) => t.insert(k, v),
                None => t.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The judging state in a [`Kv`].
pub struct KvJudging<K> {
    kv: K,
    /// One transaction at a time.
    serial: Mutex<()>,
    latest: tokio::sync::watch::Sender<u64>,
}

/// The judging state in sled.
pub type SledJudging = KvJudging<SledKv>;
/// The judging state in memory.
pub type MemoryJudging = KvJudging<MemoryKv>;

impl SledJudging {
    /// The judging state in `store` (the collector's `--data-dir`).
    pub fn open(store: SledStore) -> Result<Self, StoreError> {
        KvJudging::new(SledKv::open(store)?)
    }
}

impl MemoryJudging {
    /// An empty judging state in memory.
    pub fn memory() -> Self {
        // An empty engine has no log to read.
        let latest = tokio::sync::watch::channel(0).0;
        Self {
            kv: MemoryKv::default(),
            serial: Mutex::new(()),
            latest,
        }
    }
}

impl<K: Kv> KvJudging<K> {
    /// The judging state in `kv`.
    pub fn new(kv: K) -> Result<Self, StoreError> {
        let mut last = 0;
        kv.scan(FINDING_LOG, &[], true, &mut |k, _| {
            last = be_u64(k);
            false
        })?;
        Ok(Self {
            kv,
            serial: Mutex::new(()),
            latest: tokio::sync::watch::channel(last).0,
        })
    }
}

impl<K: Kv> Judging for KvJudging<K> {
    fn transact(&self, work: &mut Work<'_>) -> Result<(), StoreError> {
        let _one = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = KvTx {
            kv: &self.kv,
            writes: BTreeMap::new(),
            next_cursor: None,
        };
        work(&mut tx)?;
        let moved = tx.next_cursor;
        let writes: Vec<Write> = tx.writes.into_iter().map(|((t, k), v)| (t, k, v)).collect();
        self.kv.commit(writes)?;
        if let Some(next) = moved {
            self.latest.send_replace(next - 1);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.latest.subscribe()
    }
}

fn be_u64(b: &[u8]) -> u64 {
    <[u8; 8]>::try_from(b).map_or(0, u64::from_be_bytes)
}

fn with_nul(a: &str, b: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn decode<M: prost::Message + Default>(tree: &'static str, v: &[u8]) -> Result<M, StoreError> {
    M::decode(v).map_err(|source| StoreError::Corrupt { tree, source })
}

/// One transaction: the engine read through the writes not yet committed.
struct KvTx<'a, K> {
    kv: &'a K,
    writes: BTreeMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
    /// The next change-log cursor, once one was issued.
    next_cursor: Option<u64>,
}

impl<K: Kv> KvTx<'_, K> {
    fn get(&self, tree: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(&(tree, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.kv.get(tree, key),
        }
    }

    fn put(&mut self, tree: &'static str, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.writes.insert((tree, key), value);
    }

    /// Entries from `from` on (or from the end, `rev`), as this
    /// transaction sees them, until `visit` returns false.
    fn walk(
        &self,
        tree: &'static str,
        from: &[u8],
        rev: bool,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let lo = (tree, from.to_vec());
        let mine: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .writes
            .range(lo..)
            .take_while(|((t, _), _)| *t == tree)
            .map(|((_, k), v)| (k, v))
            .collect();
        let mut failed = None;
        let mut step = |k: &[u8], v: &[u8]| match visit(k, v) {
            Ok(more) => more,
            Err(e) => {
                failed = Some(e);
                false
            }
        };
        if mine.is_empty() {
            // Nothing of ours in the way: stream the engine's entries.
            self.kv.scan(tree, from, rev, &mut step)?;
        } else {
            let mut merged = BTreeMap::new();
            self.kv.scan(tree, from, false, &mut |k, v| {
                merged.insert(k.to_vec(), v.to_vec());
                true
            })?;
            for (k, v) in mine {
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
            let mut go = |(k, v): (&Vec<u8>, &Vec<u8>)| step(k, v);
            if rev {
                for kv in merged.iter().rev() {
                    if !go(kv) {
                        break;
                    }
                }
            } else {
                for kv in &merged {
                    if !go(kv) {
                        break;
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn last_id(&self, tree: &'static str) -> Result<u64, StoreError> {
        let mut last = 0;
        self.walk(tree, &[], true, &mut |k, _| {
            last = be_u64(k);
            Ok(false)
        })?;
        Ok(last)
    }

    /// Moves finding `id` to the head of the change log.
    fn log_change(&mut self, id: u64) -> Result<(), StoreError> {
        let next = match self.next_cursor {
            Some(n) => n,
            None => self.last_id(FINDING_LOG)? + 1,
        };
        if let Some(old) = self.get(FINDING_LOG_POS, &id.to_be_bytes())? {
            self.put(FINDING_LOG, old, None);
        }
        self.put(
            FINDING_LOG_POS,
            id.to_be_bytes().to_vec(),
            Some(next.to_be_bytes().to_vec()),
        );
        self.put(
            FINDING_LOG,
            next.to_be_bytes().to_vec(),
            Some(id.to_be_bytes().to_vec()),
        );
        self.next_cursor = Some(next + 1);
        Ok(())
    }

    /// Unresolved findings' (key, id).
    fn open_keys(&self) -> Result<Vec<(Vec<u8>, u64)>, StoreError> {
        let mut out = Vec::new();
        self.walk(FINDING_KEYS, &[], false, &mut |k, v| {
            out.push((k.to_vec(), be_u64(v.get(..8).unwrap_or_default())));
            Ok(true)
        })?;
        Ok(out)
    }
}

impl<K: Kv> JudgeTx for KvTx<'_, K> {
    fn cursor(&mut self, node: &str) -> Result<(u64, i64), StoreError> {
        Ok(match self.get(CURSORS, node.as_bytes())? {
            Some(v) if v.len() == 16 => (be_u64(&v[..8]), be_u64(&v[8..]) as i64),
            _ => (0, 0),
        })
    }

    fn set_cursor(&mut self, node: &str, seq: u64, time: i64) -> Result<(), StoreError> {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(&time.to_be_bytes());
        self.put(CURSORS, node.as_bytes().to_vec(), Some(v));
        Ok(())
    }

    fn path_state(&mut self, node: &str, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(PATH_STATE, &with_nul(node, path))
    }

    fn set_path_state(
        &mut self,
        node: &str,
        path: &str,
        state: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.put(PATH_STATE, with_nul(node, path), state.map(<[u8]>::to_vec));
        Ok(())
    }

    fn open_finding(&mut self, key: &str) -> Result<Option<Finding>, StoreError> {
        match self.get(FINDING_KEYS, key.as_bytes())? {
            Some(id) => self.finding(be_u64(id.get(..8).unwrap_or_default())),
            None => Ok(None),
        }
    }

    fn finding(&mut self, id: u64) -> Result<Option<Finding>, StoreError> {
        self.get(FINDINGS, &id.to_be_bytes())?
            .map(|v| decode(FINDINGS, &v))
            .transpose()
    }

    fn insert_finding(&mut self, key: &str, f: &mut Finding) -> Result<bool, StoreError> {
        if self.get(FINDING_KEYS, key.as_bytes())?.is_some() {
            return Ok(false);
        }
        f.id = self.last_id(FINDINGS)? + 1;
        let id = f.id.to_be_bytes().to_vec();
        self.put(FINDINGS, id.clone(), Some(f.encode_to_vec()));
        self.put(FINDING_KEYS, key.as_bytes().to_vec(), Some(id));
        self.log_change(f.id)?;
        Ok(true)
    }

    fn update_finding(&mut self, f: &Finding) -> Result<(), StoreError> {
        self.put(
            FINDINGS,
            f.id.to_be_bytes().to_vec(),
            Some(f.encode_to_vec()),
        );
        if f.status == crate::correlate::findings::RESOLVED {
            for (k, id) in self.open_keys()? {
                if id == f.id {
                    self.put(FINDING_KEYS, k, None);
                }
            }
        }
        self.log_change(f.id)
    }

    fn unresolved(&mut self) -> Result<Vec<Finding>, StoreError> {
        let mut ids: Vec<u64> = self.open_keys()?.into_iter().map(|(_, id)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            if let Some(f) = self.finding(id)? {
                out.push(f);
            }
        }
        Ok(out)
    }

    fn open_by_kind(&mut self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut by_kind = BTreeMap::new();
        for (k, _) in self.open_keys()? {
            let kind = k.split(|b| *b == 0).next().unwrap_or_default();
            *by_kind
                .entry(String::from_utf8_lossy(kind).into_owned())
                .or_default() += 1;
        }
        Ok(by_kind)
    }

    fn findings(
        &mut self,
        limit: usize,
        keep: &dyn Fn(&Finding) -> bool,
    ) -> Result<Vec<Finding>, StoreError> {
        let mut out = Vec::new();
        self.walk(FINDINGS, &[], true, &mut |_, v| {
            let f: Finding = decode(FINDINGS, v)?;
            if keep(&f) {
                out.push(f);
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    fn changes_after(
        &mut self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Finding)>, StoreError> {
        let mut ids = Vec::new();
        self.walk(
            FINDING_LOG,
            &cursor.saturating_add(1).to_be_bytes(),
            false,
            &mut |k, v| {
                ids.push((be_u64(k), be_u64(v)));
                Ok(ids.len() < limit)
            },
        )?;
        let mut out = Vec::new();
        for (at, id) in ids {
            if let Some(f) = self.finding(id)? {
                out.push((at, f));
            }
        }
        Ok(out)
    }

    fn baselines_of(&mut self, path: &str) -> Result<Vec<Baseline>, StoreError> {
        let prefix = with_nul(path, "");
        let mut out = Vec::new();
        self.walk(BASELINES, &prefix, false, &mut |k, v| {
            if !k.starts_with(&prefix) {
                return Ok(false);
            }
            out.push(decode(BASELINES, v)?);
            Ok(true)
        })?;
        Ok(out)
    }

    fn put_baseline(&mut self, b: &Baseline) -> Result<(), StoreError> {
        self.put(
            BASELINES,
            with_nul(&b.path, &b.host),
            Some(b.encode_to_vec()),
        );
        Ok(())
    }

    fn remove_baseline(&mut self, host: &str, path: &str) -> Result<(), StoreError> {
        self.put(BASELINES, with_nul(path, host), None);
        Ok(())
    }

    fn baselines(&mut self, host: &str, prefix: &str) -> Result<Vec<Baseline>, StoreError> {
        let mut out = Vec::new();
        self.walk(BASELINES, prefix.as_bytes(), false, &mut |k, v| {
            if !k.starts_with(prefix.as_bytes()) {
                return Ok(false);
            }
            let b: Baseline = decode(BASELINES, v)?;
            if host.is_empty() || b.host == host {
                out.push(b);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    fn approvals(&mut self, statuses: &[&str]) -> Result<Vec<Approval>, StoreError> {
        let mut out = Vec::new();
        self.walk(APPROVALS, &[], false, &mut |_, v| {
            let a: Approval = decode(APPROVALS, v)?;
            if statuses.is_empty() || statuses.contains(&a.status.as_str()) {
                out.push(a);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    fn approval(&mut self, id: u64) -> Result<Option<Approval>, StoreError> {
        self.get(APPROVALS, &id.to_be_bytes())?
            .map(|v| decode(APPROVALS, &v))
            .transpose()
    }

    fn insert_approval(&mut self, a: &mut Approval) -> Result<(), StoreError> {
        a.id = self.last_id(APPROVALS)? + 1;
        self.update_approval(a)
    }

    fn update_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.put(
            APPROVALS,
            a.id.to_be_bytes().to_vec(),
            Some(a.encode_to_vec()),
        );
        Ok(())
    }

    fn next_change_id(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        self.walk(APPROVALS, &[], false, &mut |_, v| {
            let a: Approval = decode(APPROVALS, v)?;
            n += a.changes.len() as u64;
            Ok(true)
        })?;
        Ok(n + 1)
    }

    fn scan(&mut self, id: &str) -> Result<Option<ScanRecord>, StoreError> {
        match self.get(SCANS, id.as_bytes())? {
            Some(v) => match serde_json::from_slice(&v) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::warn!(scan_id = %id, "an unreadable scan record is ignored: {e}");
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    fn put_scan(&mut self, id: &str, scan: &ScanRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(scan)
            .map_err(|e| StoreError::Backend(format!("encoding a scan record: {e}")))?;
        self.put(SCANS, id.as_bytes().to_vec(), Some(v));
        Ok(())
    }

    fn scans(&mut self) -> Result<Vec<(String, ScanRecord)>, StoreError> {
        let mut out = Vec::new();
        self.walk(SCANS, &[], false, &mut |k, v| {
            let id = String::from_utf8_lossy(k).into_owned();
            match serde_json::from_slice(v) {
                Ok(s) => out.push((id, s)),
                Err(e) => {
                    tracing::warn!(scan_id = %id, "an unreadable scan record is ignored: {e}")
                }
            }
            Ok(true)
        })?;
        Ok(out)
    }

    fn remove_scan(&mut self, id: &str) -> Result<(), StoreError> {
        self.put(SCANS, id.as_bytes().to_vec(), None);
        Ok(())
    }
}
