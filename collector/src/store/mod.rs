//! Durable event storage: the [`EventLog`] boundary and what every
//! backend shares (validation, the append rules, the block format).
//!
//! Events are stored in blocks: the events of one received batch that fall
//! in the same 10 ms of node time (a bucket), in sequence order, at most
//! [`BLOCK_EVENTS`] of them, as one LZ4-compressed value. A batch of a
//! thousand events is then a handful of writes instead of thousands (sled
//! costs ~10 µs an insert on these machines, PostgreSQL a row each), and a
//! block stays well under the size above which sled writes a value to a
//! file of its own (an inode per block: it was a third of the collector's
//! CPU at 200k events/s). Events of one process repeat most of their
//! bytes, so a block compresses ~10:1. Each block is indexed by the process
//! instances (`exec_id`) and directories of its events, for the timeline
//! of a process or a path.
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

pub mod judging;
pub mod judging_kv;
pub mod memory;
pub mod postgres;
pub mod sled_store;

use std::collections::BTreeSet;

use driftwatch_proto::chain::{self, Link};
use driftwatch_proto::v1::{event, AgentStatus, Event, EventBatch, Gap, NodeInfo};
use prost::Message as _;

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage engine failed (I/O, a lost connection, corruption it
    /// found itself); the text names the engine.
    #[error("store: {0}")]
    Backend(String),
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

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        Self::Backend(format!("sled: {e}"))
    }
}

/// A node's stored blocks, one at a time (each block's events in sequence
/// order).
pub type Blocks<'a> = Box<dyn Iterator<Item = Result<Vec<Event>, StoreError>> + 'a>;

/// What [`EventLog::append`] did.
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
    // Index values (directories, process instances) are keys in every
    // backend: sled's separate their parts with NUL, and PostgreSQL's text
    // cannot hold one.
    let exec_id = e.process.as_ref().map(|p| p.exec_id.as_str());
    if paths_of(e)
        .into_iter()
        .chain(exec_id)
        .any(|v| v.contains('\0'))
    {
        return Err(bad("a path or exec_id contains a NUL byte"));
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

/// The event log: every event of every node, durable, idempotent under
/// redelivery, readable by scope in timeline order. Backends: sled
/// ([`sled_store::SledStore`], the embedded default), PostgreSQL
/// ([`postgres::PgLog`], shared by collector replicas) and memory
/// ([`memory::MemoryLog`], for tests).
///
/// Calls block until the backend answers: callers on the async runtime
/// keep them short (one batch, one page) or move them to a blocking
/// thread.
pub trait EventLog: Send + Sync {
    /// What the log is, for logs and `--help`-level messages
    /// (`sled at /var/lib/driftwatch`, `postgres at 10.0.0.5:5432/driftwatch`).
    fn describe(&self) -> String;

    /// Records that an agent process started at `started` is connected,
    /// creating its record if new. Returns the record as it was before and
    /// as it is now.
    fn hello(
        &self,
        node: &NodeInfo,
        now: i64,
        started: i64,
    ) -> Result<(Option<AgentStatus>, AgentStatus), StoreError>;

    /// Stores events of `node` in sequence order and records `seen_at` as
    /// its last contact, in one update of the agent's record. Already
    /// stored sequence numbers are skipped (redelivery); an invalid event
    /// is kept out and its sequence number recorded as a
    /// `collector_refused` gap; a hole, sequence 0 or another node's event
    /// is refused, and so is everything after it, while what came before it
    /// is kept. Not durable until [`EventLog::flush`]. `Err` is a storage
    /// failure.
    fn append(&self, node: &str, events: &[Event], seen_at: i64) -> Result<Appended, StoreError>;

    /// Makes everything written so far durable. Blocks: the group commit
    /// calls it on a blocking thread.
    fn flush(&self) -> Result<(), StoreError>;

    /// The record of an agent.
    fn agent(&self, node: &str) -> Result<Option<AgentStatus>, StoreError>;

    /// Every known agent.
    fn agents(&self) -> Result<Vec<AgentStatus>, StoreError>;

    /// Changes an agent's record (a heartbeat, a disconnect, the policy it
    /// applied) with `change`, if the agent is known. The sequence fields
    /// are the log's own: what `change` does to them is not kept.
    fn update_agent(
        &self,
        node: &str,
        change: &mut (dyn FnMut(&mut AgentStatus) + Send),
    ) -> Result<Option<AgentStatus>, StoreError>;

    /// Records a gap; a dropped range also moves the acked sequence past it.
    fn add_gap(&self, gap: &Gap) -> Result<(), StoreError>;

    /// Gaps of a node (all nodes when empty), by node and then time.
    fn gaps(&self, node: &str) -> Result<Vec<Gap>, StoreError>;

    /// The event `seq` of `node`, stored at `time`.
    fn event_at(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError>;

    /// The events of `scope` in `[since, until)` that `keep` accepts, in
    /// [`order`]: at least the first `limit` of them, read in time order
    /// and stopped once `limit` are taken and their bucket is complete.
    fn events(
        &self,
        scope: &Scope<'_>,
        since: i64,
        until: i64,
        limit: usize,
        keep: &(dyn Fn(&Event) -> bool + Sync),
    ) -> Result<Vec<Event>, StoreError>;

    /// Events of one node in `[since, until)`, in time order.
    fn node_range(&self, node: &str, since: i64, until: i64) -> Result<Vec<Event>, StoreError> {
        self.events(
            &Scope::Nodes(vec![node.to_owned()]),
            since,
            until,
            usize::MAX,
            &|_| true,
        )
    }

    /// Every stored event of `node` in sequence order, a block at a time,
    /// for verifying its chain.
    fn node_chain<'a>(&'a self, node: &str) -> Result<Blocks<'a>, StoreError>;

    /// Names of nodes with stored events.
    fn nodes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .agents()?
            .into_iter()
            .filter_map(|a| a.node.map(|n| n.name))
            .collect())
    }

    /// Deletes the blocks whose bucket ends before `min_time`, then the
    /// oldest blocks until the log takes at most `max_bytes` (0: no size
    /// bound). Returns how many blocks were removed.
    fn retain(&self, min_time: i64, max_bytes: u64) -> Result<usize, StoreError>;

    /// Bytes the log takes on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;

    /// Number of stored blocks (may walk the log: not for every scrape).
    fn block_count(&self) -> Result<u64, StoreError>;

    /// Number of stored events (reads every block: for tests and tools).
    fn event_count(&self) -> Result<u64, StoreError>;

    /// Sends the events other collectors append to this log to `feed` as
    /// they are stored (live timelines follow what every replica stores).
    /// Nothing to do for a log only this collector writes.
    fn follow_others(self: std::sync::Arc<Self>, _feed: FollowFeed) {}
}

/// Where live events go: the feed `timeline --follow` reads.
pub type FollowFeed = tokio::sync::broadcast::Sender<Event>;

/// What an append keeps, refuses and quarantines, decided before anything
/// is written (the same rules on every backend).
pub(crate) struct Plan<'a> {
    /// Events to store, in sequence order.
    pub accepted: Vec<&'a Event>,
    /// The acked sequence before the batch.
    pub before: u64,
    /// The acked sequence after it.
    pub acked: u64,
    /// Why the rest was refused.
    pub refused: Option<StoreError>,
    /// Invalid events kept out, as gaps to record.
    pub quarantined: Vec<Gap>,
}

/// Decides an append of `events` for `node`, whose acked sequence is
/// `acked`. `same_as_stored` says whether a redelivered event (at or below
/// the acked sequence) is the one stored under its sequence number.
pub(crate) fn plan<'a>(
    node: &str,
    events: &'a [Event],
    acked: u64,
    seen_at: i64,
    mut same_as_stored: impl FnMut(&Event) -> Result<bool, StoreError>,
) -> Result<Plan<'a>, StoreError> {
    let before = acked;
    let mut acked = acked;
    let mut accepted: Vec<&Event> = Vec::with_capacity(events.len());
    let mut refused = None;
    let mut quarantined: Vec<Gap> = Vec::new();
    for e in events {
        // Checked before the redelivery skip below, which would otherwise
        // pass over it silently and ack "through 0".
        if e.seq == 0 {
            refused = Some(StoreError::Invalid {
                seq: 0,
                reason: "sequence numbers start at 1".into(),
            });
            break;
        }
        if e.seq <= acked {
            // A redelivery: the same event again is skipped, another one
            // under a stored sequence number is refused. An invalid one was
            // kept out when it first came.
            if !same_as_stored(e)? && !matches!(validate(node, e), Err(StoreError::Invalid { .. }))
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
            // An event that cannot be stored as sent is kept out, and its
            // sequence number becomes a gap that says why: refusing the
            // stream instead would make the agent send it again forever,
            // and nothing after it would ever arrive.
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
    Ok(Plan {
        accepted,
        before,
        acked,
        refused,
        quarantined,
    })
}

impl Plan<'_> {
    /// Moves the agent's record past the append (`head`: the chain after
    /// the last accepted event) and says what was done.
    pub(crate) fn finish(self, agent: &mut AgentStatus, head: Link, seen_at: i64) -> Appended {
        if let Some(last) = self.accepted.last() {
            agent.chain_head = head.to_vec();
            agent.chain_seq = last.seq;
        }
        agent.acked_seq = self.acked;
        agent.last_seq = agent.last_seq.max(self.acked);
        agent.last_seen_unix_nanos = agent.last_seen_unix_nanos.max(seen_at);
        Appended {
            before: self.before,
            through: self.acked,
            refused: self.refused,
            quarantined: self.quarantined,
        }
    }
}

/// The record of a node first seen in an append (a hello comes first on a
/// real stream, and replaces it).
pub(crate) fn new_agent(node: &str) -> AgentStatus {
    AgentStatus {
        node: Some(NodeInfo {
            name: node.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The chain head an agent's next event continues from.
pub(crate) fn chain_head(agent: &AgentStatus) -> Link {
    agent
        .chain_head
        .as_slice()
        .try_into()
        .unwrap_or(chain::GENESIS)
}

/// A block to write: its key parts, its value, and the index values
/// (process instances, directories) that point at it.
pub(crate) struct NewBlock {
    pub bucket: i64,
    pub first_seq: u64,
    pub value: Vec<u8>,
    pub execs: Vec<String>,
    pub dirs: Vec<String>,
}

/// Cuts accepted events into blocks: runs of consecutive events in one
/// bucket, cut at multiples of [`BLOCK_EVENTS`]; the chain continues from
/// `head`, which ends as the last event's.
pub(crate) fn cut_blocks(accepted: &[&Event], head: &mut Link) -> Vec<NewBlock> {
    let mut out = Vec::new();
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
        out.push(NewBlock {
            bucket: b,
            first_seq: run[0].seq,
            value: encode_block(run, head),
            execs: execs.into_iter().map(str::to_owned).collect(),
            dirs: dirs.into_iter().map(str::to_owned).collect(),
        });
        start = end;
    }
    out
}

/// Whether a redelivered event `e` is the stored one `s` (the stored copy
/// carries its chain value; the sent one never does).
pub(crate) fn same_event(stored: &Event, e: &Event) -> bool {
    let mut s = stored.clone();
    s.chain.clear();
    s == *e
}

/// Merges the events read so far with the next block's, for a read that
/// stops after `limit` events once their bucket is complete: returns true
/// when the read is done (`bucket` is past the full bucket).
pub(crate) struct PageFill {
    pub out: Vec<Event>,
    limit: usize,
    full_at: Option<i64>,
}

impl PageFill {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            out: Vec::new(),
            limit,
            full_at: None,
        }
    }

    /// True once a block of bucket `b` is past what the page needs.
    pub(crate) fn done_before(&self, b: i64) -> bool {
        self.full_at.is_some_and(|f| b > f)
    }

    /// Adds the events of a block of bucket `b` that `exact` accepts.
    pub(crate) fn add(&mut self, b: i64, events: Vec<Event>, exact: &dyn Fn(&Event) -> bool) {
        self.out.extend(events.into_iter().filter(|e| exact(e)));
        if self.out.len() >= self.limit && self.full_at.is_none() {
            self.full_at = Some(b);
        }
    }

    /// The page, in [`order`].
    pub(crate) fn finish(mut self) -> Vec<Event> {
        self.out.sort_by(|a, b| order(a).cmp(&order(b)));
        self.out
    }
}

/// The exact test of a scope and window on an event (blocks and index
/// entries only narrow a read down to candidates).
pub(crate) fn in_scope(
    scope: &Scope<'_>,
    since: i64,
    until: i64,
    e: &Event,
    keep: &(dyn Fn(&Event) -> bool + Sync),
) -> bool {
    e.time_unix_nanos >= since
        && e.time_unix_nanos < until
        && keep(e)
        && match scope {
            Scope::Nodes(_) => true,
            Scope::Exec(id) => e.process.as_ref().is_some_and(|p| p.exec_id == *id),
            Scope::Path(prefix) => paths_of(e).iter().any(|p| p.starts_with(prefix)),
        }
}

/// The directory whose subtree a path prefix covers: `/etc/app` of
/// `/etc/app/` and of `/etc/app/x` (every directory starting with it is a
/// candidate; the events are checked exactly).
pub(crate) fn prefix_dir(prefix: &str) -> &str {
    if prefix.ends_with('/') {
        prefix.trim_end_matches('/')
    } else {
        dir_of(prefix)
    }
}
/// Refuses a gap whose range would end a node's history.
pub(crate) fn check_gap(gap: &Gap) -> Result<(), StoreError> {
    if gap.to_seq > MAX_SEQ {
        return Err(StoreError::Invalid {
            seq: gap.to_seq,
            reason: format!("a dropped range ending past sequence {MAX_SEQ}"),
        });
    }
    Ok(())
}

/// Whether a gap moves the agent's acked sequence: a range the agent
/// dropped that starts at or before the next sequence expected.
pub(crate) fn moves_ack(gap: &Gap, a: &AgentStatus) -> bool {
    gap.reason == "agent_dropped"
        && gap.from_seq <= a.acked_seq.saturating_add(1)
        && gap.to_seq > a.acked_seq
}

/// Puts back the fields only appends and gaps may move.
pub(crate) fn keep_log_fields(before: &AgentStatus, a: &mut AgentStatus) {
    a.acked_seq = before.acked_seq;
    a.chain_head.clone_from(&before.chain_head);
    a.chain_seq = before.chain_seq;
}

#[cfg(test)]
mod judging_tests;
#[cfg(test)]
pub(crate) mod tests;
