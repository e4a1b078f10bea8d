//! The embedded event log on sled (the default).
//!
//! Trees and their keys (integers big-endian, so byte order is numeric order):
//! - `blocks`: `node \0 bucket first_seq` → an encoded block; a node's time
//!   window is one range scan over its buckets;
//! - `by_exec`: `exec_id \0 bucket node \0 first_seq` → `blocks` key;
//! - `by_dir`: `directory \0 bucket node \0 first_seq` → `blocks` key, for
//!   path-prefix queries (a directory per file, so a batch touching a
//!   thousand files in one directory is one entry);
//! - `agents`: `node` → `AgentStatus`;
//! - `gaps`: `node \0 time from_seq` → `Gap`.
//!
//! Redelivery is idempotent: a sequence number at or below the agent's acked
//! sequence is skipped, and a block's key is a function of its first event
//! (see [`super`]): a batch written but not acknowledged before a crash, and
//! redelivered in batches cut anywhere, writes each of its blocks again
//! under the same key or cuts it short and continues it in a block keyed by
//! the next event; no event lands in two blocks.
//!
//! The judging state (findings, approvals, baselines, the audit log) lives
//! in other trees of the same database, opened with [`SledStore::tree`] and
//! made durable by the same flush.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::path::{Path, PathBuf};

use driftwatch_proto::v1::{AgentStatus, Event, Gap, NodeInfo};
use prost::Message as _;

use super::{
    bucket, chain_head, check_gap, cut_blocks, decode_block, in_scope, keep_log_fields, moves_ack,
    new_agent, plan, prefix_dir, same_event, Appended, Blocks, EventLog, PageFill, Scope,
    StoreError, BLOCK_EVENTS, BUCKET_NS,
};

/// The sled database: the event log's trees and the judging state's.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    dir: PathBuf,
    blocks: sled::Tree,
    by_exec: sled::Tree,
    by_dir: sled::Tree,
    agents: sled::Tree,
    gaps: sled::Tree,
}

/// Signed nanoseconds as an order-preserving unsigned key.
fn time_key(t: i64) -> [u8; 8] {
    ((t as u64) ^ (1 << 63)).to_be_bytes()
}

/// The inverse of [`time_key`].
fn time_from_key(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

fn node_prefix(node: &str) -> Vec<u8> {
    let mut k = node.as_bytes().to_vec();
    k.push(0);
    k
}

/// `blocks` key.
pub fn block_key(node: &str, bucket: i64, first_seq: u64) -> Vec<u8> {
    let mut k = node_prefix(node);
    k.extend_from_slice(&time_key(bucket));
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

/// Index key: `value \0 bucket node \0 first_seq`.
fn index_key(value: &str, node: &str, bucket: i64, first_seq: u64) -> Vec<u8> {
    let mut k = node_prefix(value);
    k.extend_from_slice(&time_key(bucket));
    k.extend_from_slice(&node_prefix(node));
    k.extend_from_slice(&first_seq.to_be_bytes());
    k
}

/// The next entry of a run: its bucket (the key's time after the `skip`
/// bytes of value and separator) and its value.
fn next_entry(run: &mut sled::Iter, skip: usize) -> Result<Option<(i64, sled::IVec)>, StoreError> {
    run.next()
        .transpose()?
        .map(|(k, v)| {
            k.get(skip..skip + 8)
                .map(|t| (time_from_key(t), v))
                .ok_or_else(|| StoreError::CorruptBlock("short key".into()))
        })
        .transpose()
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 << 20)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            blocks: db.open_tree("blocks")?,
            by_exec: db.open_tree("by_exec")?,
            by_dir: db.open_tree("by_dir")?,
            agents: db.open_tree("agents")?,
            gaps: db.open_tree("gaps")?,
            dir: dir.to_owned(),
            db,
        })
    }

    /// A named tree of the same database (findings, approvals, baselines),
    /// made durable by the same flush.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Opens a store that this process had open a moment ago. sled lets
    /// go of its directory lock only when its I/O pool drops its last
    /// reference, shortly after the store was dropped; under load a reopen
    /// came first and failed with WouldBlock.
    #[cfg(test)]
    pub(crate) fn reopen_for_test(dir: &Path) -> Self {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::open(dir) {
                Ok(s) => return s,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the store in {}: {e:?}", dir.display()),
            }
        }
    }

    /// Makes everything written so far durable (fsync). Blocks: not from
    /// the runtime's async code.
    ///
    /// Never `sled::Db::flush_async`: it runs on sled's own I/O pool, and a
    /// few of them at once (a flush per agent connecting) parked every
    /// thread of that pool waiting for a log write queued behind them on
    /// the same pool, which wedged ingest for good.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Writes an agent's record as it is.
    fn put_agent(&self, a: &AgentStatus) -> Result<(), StoreError> {
        let name = a.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        self.agents.insert(name.as_bytes(), a.encode_to_vec())?;
        Ok(())
    }

    /// Whether `e`, at or below the acked sequence, is the event stored
    /// under its sequence number. `cache` keeps the last block read.
    fn same_as_stored(
        &self,
        node: &str,
        e: &Event,
        cache: &mut Vec<Event>,
    ) -> Result<bool, StoreError> {
        if !cache.iter().any(|s| s.seq == e.seq) {
            cache.clear();
            let t = e.time_unix_nanos;
            for block in self.node_blocks(node, t, t.saturating_add(1)) {
                let (_, events) = block?;
                if events.iter().any(|s| s.seq == e.seq) {
                    *cache = events;
                    break;
                }
            }
        }
        Ok(match cache.iter().find(|s| s.seq == e.seq) {
            Some(s) => same_event(s, e),
            // Nothing under that sequence at that time: either retention
            // removed it (then nothing is replaced either), or the event
            // claims another time than the stored one.
            None => !self.seq_stored_elsewhere(node, e.seq)?,
        })
    }

    /// The keys of `node`'s blocks, each with its block's first sequence
    /// number, in key (bucket) order.
    fn node_block_keys(&self, node: &str) -> Result<Vec<(u64, sled::IVec)>, StoreError> {
        let prefix = node_prefix(node);
        let mut keys = Vec::new();
        for kv in self.blocks.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let first = k
                .get(prefix.len() + 8..prefix.len() + 16)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::CorruptBlock("short key".into()))?;
            keys.push((first, k));
        }
        Ok(keys)
    }

    /// Whether `seq` of `node` is stored in any block (a scan of the node's
    /// block keys, then of the one block that may hold it).
    fn seq_stored_elsewhere(&self, node: &str, seq: u64) -> Result<bool, StoreError> {
        let best = self
            .node_block_keys(node)?
            .into_iter()
            .filter(|(first, _)| *first <= seq && seq < first + BLOCK_EVENTS)
            .max_by_key(|(first, _)| *first);
        match best {
            Some((_, k)) => Ok(self
                .block(&k)?
                .is_some_and(|events| events.iter().any(|e| e.seq == seq))),
            None => Ok(false),
        }
    }

    /// The events of the block stored under `key`.
    pub fn block(&self, key: &[u8]) -> Result<Option<Vec<Event>>, StoreError> {
        self.blocks.get(key)?.map(|v| decode_block(&v)).transpose()
    }

    /// Replaces the value stored under a block key as it is (tests of what
    /// the chain and the decoder make of altered blocks).
    #[cfg(test)]
    pub(crate) fn put_raw_block(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.blocks.insert(key, value)?;
        Ok(())
    }

    /// Writes an agent's record as it is, sequence fields included (tests
    /// of what a crash between two trees leaves).
    #[cfg(test)]
    pub(crate) fn put_agent_for_test(&self, a: &AgentStatus) {
        self.put_agent(a).unwrap();
    }

    /// The block keys of a node (tests).
    #[cfg(test)]
    pub(crate) fn raw_block_keys(&self, node: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .node_block_keys(node)?
            .into_iter()
            .map(|(_, k)| k.to_vec())
            .collect())
    }

    /// Blocks of one node whose bucket overlaps `[since, until)`, in bucket
    /// order, each with its bucket. Events inside are in sequence order;
    /// callers filter by time and sort within a bucket.
    pub fn node_blocks(
        &self,
        node: &str,
        since: i64,
        until: i64,
    ) -> impl Iterator<Item = Result<(i64, Vec<Event>), StoreError>> + '_ {
        let start = block_key(node, bucket(since), 0);
        let end = block_key(
            node,
            bucket(until.saturating_sub(1)).saturating_add(BUCKET_NS),
            0,
        );
        let skip = node.len() + 1;
        self.blocks.range(start..end).map(move |kv| {
            let (k, v) = kv?;
            Ok((time_from_key(&k[skip..]), decode_block(&v)?))
        })
    }

    /// The directories with `by_dir` entries that a path prefix could cover
    /// (exact matches are checked on the events).
    fn dirs_under(&self, prefix: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let dir = prefix_dir(prefix);
        let mut dirs = Vec::new();
        let mut next = dir.as_bytes().to_vec();
        while let Some(kv) = self.by_dir.range(next.as_slice()..).next() {
            let (k, _) = kv?;
            if !k.starts_with(dir.as_bytes()) {
                break;
            }
            let Some(end) = k.iter().position(|b| *b == 0) else {
                return Err(StoreError::CorruptBlock(
                    "by_dir key without a separator".into(),
                ));
            };
            // The first key after every `d \0 ...` entry.
            next = k[..end].to_vec();
            dirs.push(next.clone());
            next.push(1);
        }
        Ok(dirs)
    }
}

impl EventLog for SledStore {
    fn describe(&self) -> String {
        format!("sled at {}", self.dir.display())
    }

    fn hello(
        &self,
        node: &NodeInfo,
        now: i64,
        started: i64,
    ) -> Result<(Option<AgentStatus>, AgentStatus), StoreError> {
        let previous = self.agent(&node.name)?;
        let mut a = previous.clone().unwrap_or_default();
        a.node = Some(node.clone());
        a.connected = true;
        a.last_seen_unix_nanos = now;
        a.agent_started_unix_nanos = started;
        self.put_agent(&a)?;
        Ok((previous, a))
    }

    fn append(&self, node: &str, events: &[Event], seen_at: i64) -> Result<Appended, StoreError> {
        let mut agent = self.agent(node)?.unwrap_or_else(|| new_agent(node));
        // The block last read to compare a redelivery with.
        let mut stored: Vec<Event> = Vec::new();
        let plan = plan(node, events, agent.acked_seq, seen_at, |e| {
            self.same_as_stored(node, e, &mut stored)
        })?;
        let mut head = chain_head(&agent);
        for b in cut_blocks(&plan.accepted, &mut head) {
            let key = block_key(node, b.bucket, b.first_seq);
            self.blocks.insert(key.as_slice(), b.value)?;
            for x in &b.execs {
                self.by_exec
                    .insert(index_key(x, node, b.bucket, b.first_seq), key.as_slice())?;
            }
            for d in &b.dirs {
                self.by_dir
                    .insert(index_key(d, node, b.bucket, b.first_seq), key.as_slice())?;
            }
        }
        for g in &plan.quarantined {
            self.add_gap(g)?;
        }
        let done = plan.finish(&mut agent, head, seen_at);
        self.put_agent(&agent)?;
        Ok(done)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flush_blocking()
    }

    fn agent(&self, node: &str) -> Result<Option<AgentStatus>, StoreError> {
        self.agents
            .get(node.as_bytes())?
            .map(|v| {
                AgentStatus::decode(&*v).map_err(|source| StoreError::Corrupt {
                    tree: "agents",
                    source,
                })
            })
            .transpose()
    }

    fn agents(&self) -> Result<Vec<AgentStatus>, StoreError> {
        self.agents
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                AgentStatus::decode(&*v).map_err(|source| StoreError::Corrupt {
                    tree: "agents",
                    source,
                })
            })
            .collect()
    }

    fn update_agent(
        &self,
        node: &str,
        change: &mut (dyn FnMut(&mut AgentStatus) + Send),
    ) -> Result<Option<AgentStatus>, StoreError> {
        let Some(before) = self.agent(node)? else {
            return Ok(None);
        };
        let mut a = before.clone();
        change(&mut a);
        keep_log_fields(&before, &mut a);
        self.put_agent(&a)?;
        Ok(Some(a))
    }

    fn add_gap(&self, gap: &Gap) -> Result<(), StoreError> {
        check_gap(gap)?;
        let mut k = node_prefix(&gap.node);
        k.extend_from_slice(&time_key(gap.from_time_unix_nanos));
        k.extend_from_slice(&gap.from_seq.to_be_bytes());
        self.gaps.insert(k, gap.encode_to_vec())?;
        if let Some(mut a) = self.agent(&gap.node)? {
            if moves_ack(gap, &a) {
                a.acked_seq = gap.to_seq;
                self.put_agent(&a)?;
            }
        }
        Ok(())
    }

    fn gaps(&self, node: &str) -> Result<Vec<Gap>, StoreError> {
        let iter = if node.is_empty() {
            self.gaps.iter()
        } else {
            self.gaps.scan_prefix(node_prefix(node))
        };
        iter.map(|kv| {
            let (_, v) = kv?;
            Gap::decode(&*v).map_err(|source| StoreError::Corrupt {
                tree: "gaps",
                source,
            })
        })
        .collect()
    }

    fn event_at(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError> {
        for block in self.node_blocks(node, time, time.saturating_add(1)) {
            let (_, events) = block?;
            if let Some(e) = events.into_iter().find(|e| e.seq == seq) {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// Each node's blocks (or each index value's entries) form a run in
    /// bucket order; the runs are merged by bucket, so blocks are read in
    /// time order across all of them (events inside a bucket are not in
    /// time order: a page ends at a bucket's end).
    fn events(
        &self,
        scope: &Scope<'_>,
        since: i64,
        until: i64,
        limit: usize,
        keep: &(dyn Fn(&Event) -> bool + Sync),
    ) -> Result<Vec<Event>, StoreError> {
        let (tree, values): (_, Vec<Vec<u8>>) = match scope {
            Scope::Nodes(nodes) => (
                &self.blocks,
                nodes.iter().map(|n| n.as_bytes().to_vec()).collect(),
            ),
            Scope::Exec(id) => (&self.by_exec, vec![id.as_bytes().to_vec()]),
            Scope::Path(prefix) => (&self.by_dir, self.dirs_under(prefix)?),
        };
        // Runs of `blocks` hold the blocks; index runs hold `blocks` keys.
        let indexed = !matches!(scope, Scope::Nodes(_));
        let exact = |e: &Event| in_scope(scope, since, until, e, keep);
        // Keys of every run: `value \0 bucket ...`.
        let key = |v: &[u8], t: i64| {
            let mut k = v.to_vec();
            k.push(0);
            k.extend_from_slice(&time_key(t));
            k
        };
        let last = bucket(until.saturating_sub(1)).saturating_add(BUCKET_NS);
        let mut runs: Vec<sled::Iter> = values
            .iter()
            .map(|v| tree.range(key(v, bucket(since))..key(v, last)))
            .collect();
        let mut heap = BinaryHeap::new();
        for (i, run) in runs.iter_mut().enumerate() {
            if let Some((b, v)) = next_entry(run, values[i].len() + 1)? {
                heap.push(Reverse((b, i, v)));
            }
        }
        let mut page = PageFill::new(limit);
        // A block holding several directories is listed under each.
        let mut read = HashSet::new();
        while let Some(Reverse((b, i, v))) = heap.pop() {
            if page.done_before(b) {
                break;
            }
            let events = if !indexed {
                Some(decode_block(&v)?)
            } else if read.insert(v.clone()) {
                // An index entry can outlive its block (retention): skip it.
                self.block(&v)?
            } else {
                None
            };
            page.add(b, events.unwrap_or_default(), &exact);
            if let Some((b, v)) = next_entry(&mut runs[i], values[i].len() + 1)? {
                heap.push(Reverse((b, i, v)));
            }
        }
        Ok(page.finish())
    }

    /// Block keys are read first and ordered by first sequence number (a
    /// clock that went back puts later events in earlier buckets).
    fn node_chain<'a>(&'a self, node: &str) -> Result<Blocks<'a>, StoreError> {
        let mut keys = self.node_block_keys(node)?;
        keys.sort_by_key(|(first, _)| *first);
        Ok(Box::new(keys.into_iter().map(move |(_, k)| {
            let mut events = self.block(&k)?.unwrap_or_default();
            events.sort_by_key(|e| e.seq);
            Ok(events)
        })))
    }

    fn retain(&self, min_time: i64, max_bytes: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let nodes = self.nodes()?;
        for node in &nodes {
            let start = block_key(node, i64::MIN, 0);
            let end = block_key(node, bucket(min_time), 0);
            let keys: Vec<_> = self
                .blocks
                .range(start..end)
                .keys()
                .collect::<Result<_, _>>()?;
            for k in keys {
                self.blocks.remove(k)?;
                removed += 1;
            }
        }
        if max_bytes > 0 {
            while self.db.size_on_disk()? > max_bytes {
                let mut oldest: Option<(i64, sled::IVec, usize)> = None;
                for node in &nodes {
                    if let Some(kv) = self.blocks.scan_prefix(node_prefix(node)).next() {
                        let (k, _) = kv?;
                        let t = time_from_key(&k[node.len() + 1..]);
                        if oldest.as_ref().is_none_or(|(ot, _, _)| t < *ot) {
                            oldest = Some((t, k, node.len() + 1));
                        }
                    }
                }
                let Some((_, k, plen)) = oldest else { break };
                // A slice at a time: size_on_disk moves in segments.
                let keys: Vec<_> = self
                    .blocks
                    .scan_prefix(&k[..plen])
                    .keys()
                    .take(256)
                    .collect::<Result<_, _>>()?;
                if keys.is_empty() {
                    break;
                }
                for key in keys {
                    self.blocks.remove(key)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn block_count(&self) -> Result<u64, StoreError> {
        Ok(self.blocks.len() as u64)
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.blocks.iter() {
            let (_, v) = kv?;
            n += decode_block(&v)?.len() as u64;
        }
        Ok(n)
    }
}
