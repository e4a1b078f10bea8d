//! Durable event storage on sled.
//!
//! Events are stored in blocks: the events of one received batch that fall
//! in the same 10 ms of node time (a bucket), in sequence order, at most
//! [`BLOCK_EVENTS`] of them, as one LZ4-compressed value. A batch of a
//! thousand events is then a handful of inserts instead of thousands (sled
//! costs ~10 µs an insert on these machines), and a block stays well under
//! the size above which sled writes a value to a file of its own (an
//! inode per block: it was a third of the collector's CPU at 200k
//! events/s). Events of one process repeat most of their bytes, so a block
//! compresses ~10:1.
//!
//! Trees and their keys (integers big-endian, so byte order is numeric order):
//! - `blocks`: `node \0 bucket first_seq` → an encoded `EventBatch`; a
//!   node's time window is one range scan over its buckets;
//! - `by_exec`: `exec_id \0 bucket node \0 first_seq` → `blocks` key;
//! - `by_dir`: `directory \0 bucket node \0 first_seq` → `blocks` key, for
//!   path-prefix queries (a directory per file, so a batch touching a
//!   thousand files in one directory is one entry);
//! - `agents`: `node` → `AgentStatus`;
//! - `gaps`: `node \0 time from_seq` → `Gap`.
//!
//! Redelivery is idempotent: a sequence number at or below the agent's acked
//! sequence is skipped, and a block's key is a function of its first event.
//! A block starts at a batch's first event, where the bucket changes, and at
//! every multiple of [`BLOCK_EVENTS`] — never anywhere else, so a batch
//! interrupted by a crash (written, not acknowledged) and redelivered from
//! the same first sequence number, in batches cut anywhere, writes each of
//! its blocks again under the same key or, when a new batch ends sooner,
//! cuts it short and continues it in a block keyed by the next event: no
//! event lands in two blocks.

use std::path::Path;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashSet};

use driftwatch_proto::chain::{self, Link};
use driftwatch_proto::v1::{event, AgentStatus, Event, EventBatch, Gap, NodeInfo};
use prost::Message as _;

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored block does not decompress.
    #[error("store: corrupt block: {0}")]
    CorruptBlock(String),
    /// A stored value does not decode.
    #[error("store: corrupt record in {tree}: {source}")]
    Corrupt {
        /// Which tree.
        tree: &'static str,
        /// The decode error.
        source: prost::DecodeError,
    },
    /// A batch skipped sequence numbers.
    #[error("out of order: expected sequence {expected}, got {got}")]
    OutOfOrder {
        /// The next sequence the store can take.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A redelivered sequence number carries another event than the one
    /// stored under it.
    #[error("sequence {seq}: a different event is already stored under this sequence number; stored events are never replaced")]
    Conflict {
        /// The sequence number.
        seq: u64,
    },
    /// An event names another node than the stream it came on.
    #[error("event {seq} names node {named:?} on the stream of {stream:?}")]
    Foreign {
        /// Its sequence number.
        seq: u64,
        /// The node it names.
        named: String,
        /// The node of the stream.
        stream: String,
    },
    /// An event is not acceptable as sent.
    #[error("invalid event (seq {seq}): {reason}")]
    Invalid {
        /// Its sequence number.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
}

/// What [`Store::append`] did.
#[derive(Debug)]
pub struct Appended {
    /// The acked sequence before the batch.
    pub before: u64,
    /// The highest sequence stored contiguously after it.
    pub through: u64,
    /// Why the rest of the batch was refused, if it was.
    pub refused: Option<StoreError>,
    /// Events kept out of the store as invalid, as gaps already recorded
    /// (reason `collector_refused`), for the correlator to report.
    pub quarantined: Vec<Gap>,
}

/// The event store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
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
pub fn time_from_key(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

fn node_prefix(node: &str) -> Vec<u8> {
    let mut k = node.as_bytes().to_vec();
    k.push(0);
    k
}

/// Width of a bucket: a block never holds events from two buckets. Narrow
/// enough that a first page reads at most a few thousand events even at
/// 200k events/s from one node; wide enough that a batch is a few blocks.
pub const BUCKET_NS: i64 = 10_000_000;

/// The bucket of a time.
pub fn bucket(t: i64) -> i64 {
    t.div_euclid(BUCKET_NS).saturating_mul(BUCKET_NS)
}

/// Most events in one block; a block also starts at every sequence number
/// that is a multiple of it (see the module's note on redelivery). 256
/// events of a typical ~300 bytes are ~75 KiB before compression.
pub const BLOCK_EVENTS: u64 = 256;

/// First byte of an LZ4 block value. A protobuf message cannot start with
/// a zero byte (field number 0 does not exist), so blocks written before
/// compression (plain `EventBatch`) still read.
const LZ4: u8 = 0;

/// Bound on a block's decompressed size, checked before allocating it.
const MAX_BLOCK_BYTES: usize = 256 << 20;

/// Field number of `Event.chain`.
const CHAIN_FIELD: u32 = 104;

/// Encodes events (in sequence order, their chain fields empty) as a block
/// value, each with its chain value after `prev`; `prev` ends as the last
/// event's.
fn encode_block(events: &[&Event], prev: &mut Link) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    // The chain field: key, length 32, value.
    let chain_len = encoded_len_varint(u64::from(CHAIN_FIELD << 3)) + 1 + 32;
    let mut raw = Vec::with_capacity(events.iter().map(|e| e.encoded_len() + chain_len + 8).sum());
    for e in events {
        // As `EventBatch { events }` (field 1) would, without copying
        // them: the event's body is hashed where it is written, and its
        // chain field follows it (a field may come in any order).
        let len = e.encoded_len();
        encode_key(1, WireType::LengthDelimited, &mut raw);
        encode_varint((len + chain_len) as u64, &mut raw);
        let start = raw.len();
        e.encode_raw(&mut raw);
        *prev = chain::link(prev, &raw[start..]);
        prost::encoding::bytes::encode(CHAIN_FIELD, &prev.to_vec(), &mut raw);
    }
    let mut v = Vec::with_capacity(5 + lz4_flex::block::get_maximum_output_size(raw.len()));
    v.push(LZ4);
    v.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    v.extend_from_slice(&lz4_flex::block::compress(&raw));
    v
}

/// Decodes a block value (compressed, or plain from before compression).
fn decode_block(v: &[u8]) -> Result<Vec<Event>, StoreError> {
    let decode = |raw: &[u8]| {
        EventBatch::decode(raw)
            .map(|b| b.events)
            .map_err(|source| StoreError::Corrupt {
                tree: "blocks",
                source,
            })
    };
    match v.split_first() {
        Some((&LZ4, rest)) => {
            let Some((len, data)) = rest.split_first_chunk::<4>() else {
                return Err(StoreError::CorruptBlock("truncated header".into()));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if len > MAX_BLOCK_BYTES {
                return Err(StoreError::CorruptBlock(format!(
                    "claims {len} bytes decompressed (at most {MAX_BLOCK_BYTES})"
                )));
            }
            let raw = lz4_flex::block::decompress(data, len)
                .map_err(|e| StoreError::CorruptBlock(e.to_string()))?;
            decode(&raw)
        }
        _ => decode(v),
    }
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

/// The order of a timeline: time, then node, then sequence.
pub fn order(e: &Event) -> (i64, &str, u64) {
    (e.time_unix_nanos, e.node.as_str(), e.seq)
}

/// What a timeline read covers.
pub enum Scope<'a> {
    /// Every event of these nodes.
    Nodes(Vec<String>),
    /// The events of one process instance (an exec_id), on any node.
    Exec(&'a str),
    /// The events about paths under a prefix, on any node.
    Path(&'a str),
}

/// The paths an event is about, if any (both names of a rename count).
fn paths_of(e: &Event) -> Vec<&str> {
    match &e.event {
        Some(event::Event::File(f)) => {
            let mut v = vec![f.path.as_str()];
            if !f.new_path.is_empty() {
                v.push(f.new_path.as_str());
            }
            v
        }
        Some(event::Event::Digest(d)) => vec![d.path.as_str()],
        _ => Vec::new(),
    }
}

/// The directory part of a path (`/etc/app` of `/etc/app/x.conf`).
fn dir_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

/// Checks what a node sent before anything is stored.
pub fn validate(node: &str, e: &Event) -> Result<(), StoreError> {
    let bad = |reason: &str| StoreError::Invalid {
        seq: e.seq,
        reason: reason.to_owned(),
    };
    if e.seq == 0 {
        return Err(bad("sequence numbers start at 1"));
    }
    if e.event.is_none() {
        return Err(bad("no event kind set"));
    }
    if !e.chain.is_empty() {
        return Err(bad("the chain field is the collector's to set"));
    }
    if e.node != node {
        return Err(StoreError::Foreign {
            seq: e.seq,
            named: e.node.clone(),
            stream: node.to_owned(),
        });
    }
    if e.time_unix_nanos <= 0 {
        return Err(bad("time_unix_nanos must be positive"));
    }
    let limit = driftwatch_proto::time::now_unix_nanos().saturating_add(MAX_SKEW_NS);
    if e.time_unix_nanos > limit {
        return Err(bad(&format!(
            "time_unix_nanos {} is more than a day ahead of the collector's clock",
            e.time_unix_nanos
        )));
    }
    // The event's paths, then its process's (no list is built: this runs
    // for every event ingested).
    let too_long = |p: &&String| p.len() > MAX_PATH_BYTES;
    let long_path = match &e.event {
        Some(event::Event::File(f)) => [&f.path, &f.new_path, &f.target].into_iter().find(too_long),
        Some(event::Event::Digest(d)) => Some(&d.path).filter(too_long),
        Some(event::Event::ScanDone(d)) => Some(&d.path).filter(too_long),
        _ => None,
    }
    .or_else(|| {
        let p = e.process.as_ref()?;
        [&p.exe, &p.cgroup]
            .into_iter()
            .chain(p.ancestors.iter().map(|a| &a.exe))
            .find(too_long)
    });
    if let Some(p) = &e.process {
        if p.ancestors.len() > MAX_ANCESTORS {
            return Err(bad(&format!(
                "{} ancestors; at most {MAX_ANCESTORS} are kept",
                p.ancestors.len()
            )));
        }
        let args: usize = p.args.iter().map(String::len).sum();
        if args > MAX_ARGS_BYTES {
            return Err(bad(&format!(
                "arguments of {args} bytes; the limit is {MAX_ARGS_BYTES}"
            )));
        }
    }
    if let Some(p) = long_path {
        return Err(bad(&format!(
            "a path of {} bytes; the limit is {MAX_PATH_BYTES} (PATH_MAX)",
            p.len()
        )));
    }
    let size = e.encoded_len();
    if size > MAX_EVENT_BYTES {
        return Err(bad(&format!(
            "{size} bytes encoded; the limit for one event is {MAX_EVENT_BYTES}"
        )));
    }
    Ok(())
}

/// How far ahead of the collector's clock an event may be: agents' clocks
/// drift, but an event from next year is forged or broken, and would sort
/// after everything a timeline will ever show.
const MAX_SKEW_NS: i64 = 24 * 3600 * 1_000_000_000;
/// The longest path an event may name (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// The most argument bytes a process may carry (the agent reads at most a
/// few KiB of argv in the kernel).
pub const MAX_ARGS_BYTES: usize = 32 * 1024;
/// The most ancestors a process may list (the agent lists 16).
pub const MAX_ANCESTORS: usize = 64;
/// The highest sequence number a node may reach (a million events a second
/// for a hundred thousand years): arithmetic on sequence numbers never
/// overflows, and a forged dropped range cannot end a node's history.
pub const MAX_SEQ: u64 = 1 << 62;
/// The largest encoded event: every query answer and finding that carries
/// one stays far below the 4 MiB message limit.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

impl Store {
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
            db,
        })
    }

    /// A named tree of the same database (findings, approvals, baselines),
    /// made durable by the same [`Store::flush`].
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// The event `seq` of `node`, stored at `time`.
    pub fn event_at(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError> {
        for block in self.node_blocks(node, time, time.saturating_add(1)) {
            let (_, events) = block?;
            if let Some(e) = events.into_iter().find(|e| e.seq == seq) {
                return Ok(Some(e));
            }
        }
        Ok(None)
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

    /// [`Store::flush`] for callers outside the runtime's async code.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Makes everything written so far durable (fsync), on a blocking
    /// thread of the runtime.
    ///
    /// Not `sled::Db::flush_async`: it runs on sled's own I/O pool, and a
    /// few of them at once (a flush per agent connecting) parked every
    /// thread of that pool waiting for a log write queued behind them on
    /// the same pool, which wedged ingest for good.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| sled::Error::Io(std::io::Error::other(format!("flush task: {e}"))))??;
        Ok(())
    }

    /// The record of an agent.
    pub fn agent(&self, node: &str) -> Result<Option<AgentStatus>, StoreError> {
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

    /// Every known agent.
    pub fn agents(&self) -> Result<Vec<AgentStatus>, StoreError> {
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

    /// Writes an agent's record.
    pub fn put_agent(&self, a: &AgentStatus) -> Result<(), StoreError> {
        let name = a.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        self.agents.insert(name.as_bytes(), a.encode_to_vec())?;
        Ok(())
    }

    /// Records that an agent process started at `started` is connected,
    /// creating its record if new. Returns the record as it was before.
    pub fn hello(
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

    /// Stores events of `node` in sequence order and records `seen_at` as
    /// its last contact, in one update of the agent's record. Already stored
    /// sequence numbers are skipped (redelivery); an invalid event is kept
    /// out and its sequence number recorded as a `collector_refused` gap; a
    /// hole, sequence 0 or another node's event is refused, and so is
    /// everything after it, while what came before it is kept. Not durable until [`Store::flush`]. `Err` is a storage failure.
    pub fn append(
        &self,
        node: &str,
        events: &[Event],
        seen_at: i64,
    ) -> Result<Appended, StoreError> {
        let mut agent = self.agent(node)?.unwrap_or_default();
        let before = agent.acked_seq;
        let mut acked = before;
        let mut accepted: Vec<&Event> = Vec::with_capacity(events.len());
        let mut refused = None;
        let mut quarantined: Vec<Gap> = Vec::new();
        // The block last read to compare a redelivery with.
        let mut stored: Vec<Event> = Vec::new();
        for e in events {
            // Checked before the redelivery skip below, which would
            // otherwise pass over it silently and ack "through 0".
            if e.seq == 0 {
                refused = Some(StoreError::Invalid {
                    seq: 0,
                    reason: "sequence numbers start at 1".into(),
                });
                break;
            }
            if e.seq <= acked {
                // A redelivery: the same event again is skipped, another
                // one under a stored sequence number is refused. An
                // invalid one was kept out when it first came.
                if !self.same_as_stored(node, e, &mut stored)?
                    && !matches!(validate(node, e), Err(StoreError::Invalid { .. }))
                {
                    refused = Some(StoreError::Conflict { seq: e.seq });
                    break;
                }
                continue;
            }
            if Some(e.seq) != acked.checked_add(1) {
                refused = Some(StoreError::OutOfOrder {
                    expected: acked.saturating_add(1),
                    got: e.seq,
                });
                break;
            }
            match validate(node, e) {
                Ok(()) => {}
                // An event that cannot be stored as sent is kept out, and
                // its sequence number becomes a gap that says why: refusing
                // the stream instead would make the agent send it again
                // forever, and nothing after it would ever arrive.
                Err(StoreError::Invalid { reason, .. }) if e.seq <= MAX_SEQ => {
                    match quarantined.last_mut() {
                        Some(g) if g.to_seq + 1 == e.seq => g.to_seq = e.seq,
                        _ => quarantined.push(Gap {
                            node: node.to_owned(),
                            from_seq: e.seq,
                            to_seq: e.seq,
                            from_time_unix_nanos: seen_at,
                            to_time_unix_nanos: seen_at,
                            reason: "collector_refused".into(),
                            detail: reason,
                        }),
                    }
                    acked = e.seq;
                    continue;
                }
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
            accepted.push(e);
            acked = e.seq;
        }
        // Runs of consecutive events in the same bucket, cut at multiples
        // of BLOCK_EVENTS; the chain continues from the node's head.
        let mut head: Link = agent
            .chain_head
            .as_slice()
            .try_into()
            .unwrap_or(chain::GENESIS);
        let mut start = 0;
        while start < accepted.len() {
            let b = bucket(accepted[start].time_unix_nanos);
            let mut end = start + 1;
            while end < accepted.len()
                && bucket(accepted[end].time_unix_nanos) == b
                && !accepted[end].seq.is_multiple_of(BLOCK_EVENTS)
            {
                end += 1;
            }
            let run = &accepted[start..end];
            let first = run[0].seq;
            let key = block_key(node, b, first);
            let mut execs = BTreeSet::new();
            let mut dirs = BTreeSet::new();
            for e in run {
                if let Some(p) = &e.process {
                    if !p.exec_id.is_empty() {
                        execs.insert(p.exec_id.as_str());
                    }
                }
                for path in paths_of(e) {
                    dirs.insert(dir_of(path));
                }
            }
            self.blocks
                .insert(key.as_slice(), encode_block(run, &mut head))?;
            for x in execs {
                self.by_exec
                    .insert(index_key(x, node, b, first), key.as_slice())?;
            }
            for d in dirs {
                self.by_dir
                    .insert(index_key(d, node, b, first), key.as_slice())?;
            }
            start = end;
        }
        if let Some(last) = accepted.last() {
            agent.chain_head = head.to_vec();
            agent.chain_seq = last.seq;
        }
        for g in &quarantined {
            self.add_gap(g)?;
        }
        agent.acked_seq = acked;
        agent.last_seq = agent.last_seq.max(acked);
        agent.last_seen_unix_nanos = agent.last_seen_unix_nanos.max(seen_at);
        self.put_agent(&agent)?;
        Ok(Appended {
            before,
            through: acked,
            refused,
            quarantined,
        })
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
            Some(s) => {
                let mut s = s.clone();
                s.chain.clear();
                s == *e
            }
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

    /// Every stored event of `node` in sequence order, a block at a time,
    /// for verifying its chain: block keys are read first and ordered by
    /// first sequence number (a clock that went back puts later events in
    /// earlier buckets).
    pub fn node_chain(
        &self,
        node: &str,
    ) -> Result<impl Iterator<Item = Result<Vec<Event>, StoreError>> + '_, StoreError> {
        let mut keys = self.node_block_keys(node)?;
        keys.sort_by_key(|(first, _)| *first);
        Ok(keys.into_iter().map(move |(_, k)| {
            let mut events = self.block(&k)?.unwrap_or_default();
            events.sort_by_key(|e| e.seq);
            Ok(events)
        }))
    }

    /// Records a gap; a dropped range also moves the acked sequence past it.
    pub fn add_gap(&self, gap: &Gap) -> Result<(), StoreError> {
        if gap.to_seq > MAX_SEQ {
            return Err(StoreError::Invalid {
                seq: gap.to_seq,
                reason: format!("a dropped range ending past sequence {MAX_SEQ}"),
            });
        }
        let mut k = node_prefix(&gap.node);
        k.extend_from_slice(&time_key(gap.from_time_unix_nanos));
        k.extend_from_slice(&gap.from_seq.to_be_bytes());
        self.gaps.insert(k, gap.encode_to_vec())?;
        if gap.reason == "agent_dropped" {
            if let Some(mut a) = self.agent(&gap.node)? {
                if gap.from_seq <= a.acked_seq.saturating_add(1) && gap.to_seq > a.acked_seq {
                    a.acked_seq = gap.to_seq;
                    self.put_agent(&a)?;
                }
            }
        }
        Ok(())
    }

    /// Gaps of a node (all nodes when empty) in time order.
    pub fn gaps(&self, node: &str) -> Result<Vec<Gap>, StoreError> {
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

    /// The events of the block stored under `key`.
    pub fn block(&self, key: &[u8]) -> Result<Option<Vec<Event>>, StoreError> {
        self.blocks.get(key)?.map(|v| decode_block(&v)).transpose()
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

    /// Events of one node in `[since, until)`, in time order.
    pub fn node_range(&self, node: &str, since: i64, until: i64) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for block in self.node_blocks(node, since, until) {
            let (_, events) = block?;
            out.extend(
                events
                    .into_iter()
                    .filter(|e| e.time_unix_nanos >= since && e.time_unix_nanos < until),
            );
        }
        out.sort_by(|a, b| order(a).cmp(&order(b)));
        Ok(out)
    }

    /// Names of nodes with stored events.
    pub fn nodes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .agents()?
            .into_iter()
            .filter_map(|a| a.node.map(|n| n.name))
            .collect())
    }

    /// The events of `scope` in `[since, until)` that `keep` accepts, in
    /// [`order`]. At least the first `limit` of them: each node's blocks (or
    /// each index value's entries) form a run in bucket order; the runs are
    /// merged by bucket, so blocks are read in time order across all of
    /// them, and the read stops once `limit` events are taken and their
    /// bucket is complete (events inside a bucket are not in time order).
    pub fn events(
        &self,
        scope: &Scope<'_>,
        since: i64,
        until: i64,
        limit: usize,
        keep: &dyn Fn(&Event) -> bool,
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
        let exact = |e: &Event| {
            e.time_unix_nanos >= since
                && e.time_unix_nanos < until
                && keep(e)
                && match scope {
                    Scope::Nodes(_) => true,
                    Scope::Exec(id) => e.process.as_ref().is_some_and(|p| p.exec_id == *id),
                    Scope::Path(prefix) => paths_of(e).iter().any(|p| p.starts_with(prefix)),
                }
        };
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
        let mut out = Vec::new();
        // A block holding several directories is listed under each.
        let mut read = HashSet::new();
        let mut full_at: Option<i64> = None;
        while let Some(Reverse((b, i, v))) = heap.pop() {
            if full_at.is_some_and(|f| b > f) {
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
            out.extend(events.into_iter().flatten().filter(|e| exact(e)));
            if out.len() >= limit && full_at.is_none() {
                full_at = Some(b);
            }
            if let Some((b, v)) = next_entry(&mut runs[i], values[i].len() + 1)? {
                heap.push(Reverse((b, i, v)));
            }
        }
        out.sort_by(|a, b| order(a).cmp(&order(b)));
        Ok(out)
    }

    /// The directories with `by_dir` entries that a path prefix could cover
    /// (exact matches are checked on the events).
    fn dirs_under(&self, prefix: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let dir = if prefix.ends_with('/') {
            prefix.trim_end_matches('/')
        } else {
            dir_of(prefix)
        };
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

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Number of stored blocks (walks the tree: not for every scrape).
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Number of stored events (reads every block).
    pub fn event_count(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self.blocks.iter() {
            let (_, v) = kv?;
            n += decode_block(&v)?.len();
        }
        Ok(n)
    }

    /// Deletes the blocks whose bucket ends before `min_time`, then the
    /// oldest blocks until the store is under `max_bytes` on disk (0: no
    /// size bound). Returns how many blocks were removed.
    pub fn retain(&self, min_time: i64, max_bytes: u64) -> Result<usize, StoreError> {
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
}

#[cfg(test)]
pub(crate) mod tests;
