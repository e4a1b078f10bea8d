//! The local spool: every event bound for the collector is written here
//! first, under its sequence number, and dropped once the collector has
//! acknowledged it as durable.
//!
//! It is an append-only log of segment files, each holding a contiguous
//! run of sequence numbers (`<first seq>.seg`, records of `len, crc32, seq,
//! encoded Event`). Everything it does is proportional to the records it
//! is given or hands out, never to what it holds: a push appends to a
//! buffer, an ack deletes whole segments and trims the in-memory tail, the
//! count of waiting events is kept, not counted. The newest events are
//! also kept encoded in memory (bounded) so the sender rarely reads disk.
//!
//! Sequence numbers are never reused, even after a crash: they are handed
//! out from a block whose upper end is written to disk (fsync'd) before the
//! block is used. That record (`reserved`) is rewritten in place, in two
//! alternating checksummed slots, so a torn write leaves the previous one
//! standing and no file is created on the event path. A clean close gives
//! back what was reserved and not used. Numbers a crash lost, and numbers
//! evicted because the spool hit its bound, show up to the sender as a
//! hole below the first spooled event, which it reports to the collector
//! as a dropped range.
//!
//! Buffered records reach the file (the page cache, which survives the
//! agent being killed) on every [`Spool::commit`], and are fsync'd at most
//! [`SYNC_EVERY`] later.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    io::{Seek as _, SeekFrom, Write as _},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use driftwatch_proto::v1::Event;
use prost::Message as _;

/// Field number of `Event.seq`.
const SEQ_FIELD: u32 = 101;

/// Sequence numbers reserved on disk at a time.
const RESERVE: u64 = 1 << 16;
/// Longest a record written to the file waits for its fsync.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Most bytes of one segment file.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Most events in one segment (smaller when the spool's bound is small, so
/// that eviction, which drops whole segments, stays close to the bound).
const SEGMENT_EVENTS: u64 = 1 << 16;
/// Bytes of encoded events kept in memory for the sender.
const MEMORY_BYTES: usize = 32 << 20;
/// Bytes buffered before they are written to the file.
const BUFFER_BYTES: usize = 256 << 10;
/// A record's header: payload length, crc32 of seq + payload, seq.
const HEADER: usize = 16;
/// Events read at a time when the spool is renumbered.
const BATCH_READ: usize = 4096;
/// Largest record accepted on reading (a corrupt length must not allocate).
const MAX_RECORD: usize = 64 << 20;

/// One slot of the reservation record: generation, upper end, crc32 of
/// both, little-endian.
const SLOT: usize = 20;

fn reserved_slot(generation: u64, upto: u64) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[..8].copy_from_slice(&generation.to_le_bytes());
    b[8..16].copy_from_slice(&upto.to_le_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The newest intact slot of the reservation record: (generation, upper
/// end); (0, 0) for a new spool. An earlier version kept the number as
/// text, which is still read.
fn read_reserved(bytes: &[u8]) -> (u64, u64) {
    if let Some(upto) = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
    {
        return (0, upto);
    }
    bytes
        .chunks_exact(SLOT)
        .take(2)
        .filter_map(|b| {
            let crc = u32::from_le_bytes(b[16..].try_into().ok()?);
            (crc32fast::hash(&b[..16]) == crc).then(|| {
                let generation = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                let upto = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
                (generation, upto)
            })
        })
        .max()
        .unwrap_or((0, 0))
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file of the spool could not be read or written.
    #[error("spool: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A spooled record does not decode.
    #[error("spool: corrupt record: {0}")]
    Corrupt(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Encoded events read from the spool, framed as the body of an
/// `EventBatch` ([`driftwatch_proto::raw`]).
#[derive(Debug, Default)]
pub struct Batch {
    /// Sequence number of the first event (0 when empty).
    pub first: u64,
    /// Sequence number of the last event (0 when empty).
    pub last: u64,
    /// Events in it.
    pub count: usize,
    /// The `EventBatch` body.
    pub body: Vec<u8>,
    /// Each event's time (Unix nanoseconds) where the spool still had it
    /// in memory, 0 where it came from disk: for delivery latency.
    pub times: Vec<i64>,
}

impl Batch {
    /// True if event `seq` of `len` bytes belongs in this batch: the first
    /// always does; the others while the batch has room and follows on
    /// without a hole (a hole is reported before the events above it, so
    /// it must start a batch).
    fn takes(&self, seq: u64, len: usize, max_events: usize, max_bytes: usize) -> bool {
        self.count == 0
            || (self.count < max_events
                && seq == self.last + 1
                && self.body.len() + driftwatch_proto::raw::framed_len(len) <= max_bytes)
    }

    fn add(&mut self, seq: u64, time: i64, payload: &[u8]) {
        if self.count == 0 {
            self.first = seq;
        }
        self.last = seq;
        self.count += 1;
        self.times.push(time);
        driftwatch_proto::raw::push_event(&mut self.body, payload);
    }
}

struct Segment {
    path: PathBuf,
    first: u64,
    /// Last sequence number written to it (first - 1 while empty).
    last: u64,
    bytes: u64,
}

impl Segment {
    fn events(&self) -> u64 {
        self.last + 1 - self.first
    }
}

/// Where the sender's last read from disk ended, to continue from there.
struct Cursor {
    segment: u64,
    offset: u64,
    next: u64,
}

struct Inner {
    dir: PathBuf,
    /// Segments by first sequence number; the last one is the active one.
    segments: BTreeMap<u64, Segment>,
    active: Option<File>,
    /// Records not yet written to the active segment's file.
    buffer: Vec<u8>,
    /// The next sequence number to hand out.
    next: u64,
    reserved: u64,
    /// The reservation record, kept open.
    meta: File,
    meta_path: PathBuf,
    /// Writes of the reservation record so far (its slot is the parity).
    generation: u64,
    /// Everything at or below is acknowledged.
    acked: u64,
    /// Events spooled and neither acknowledged nor evicted.
    waiting: u64,
    evicted: u64,
    max_events: u64,
    segment_events: u64,
    /// Encoded events `memory_first..next` with their times, newest last.
    memory: VecDeque<(i64, Vec<u8>)>,
    memory_first: u64,
    memory_bytes: usize,
    cursor: Option<Cursor>,
    last_sync: Instant,
    unsynced: bool,
    /// Records visited by every operation since open (see [`Spool::work`]).
    work: u64,
}

/// The spool; clones share it.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Mutex<Inner>>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// Reads one record at the reader's position: `Ok(None)` at a clean end,
/// `Err(())` at a torn or corrupt record.
fn read_record(r: &mut impl std::io::Read) -> Result<Option<(u64, Vec<u8>)>, ()> {
    let mut h = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    if len > MAX_RECORD {
        return Err(());
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|_| ())?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[8..16]);
    hasher.update(&payload);
    if hasher.finalize() != crc {
        return Err(());
    }
    Ok(Some((seq, payload)))
}

fn write_record(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&hasher.finalize().to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Scans a segment left by an earlier run: its last good record, and the
/// length up to it (a torn tail from a crash is cut off).
fn recover(path: &Path, first: u64) -> Result<Option<Segment>, SpoolError> {
    let file = File::open(path).map_err(io("opening", path))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut last = first - 1;
    let mut good = 0u64;
    while let Ok(Some((seq, payload))) = read_record(&mut r) {
        if seq != last + 1 {
            break;
        }
        last = seq;
        good += (HEADER + payload.len()) as u64;
    }
    let len = std::fs::metadata(path).map_err(io("reading", path))?.len();
    if good < len {
        tracing::warn!(
            file = %path.display(),
            kept = last + 1 - first,
            "the spool segment ends in a torn or corrupt record (an earlier crash); keeping what precedes it"
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io("opening", path))?;
        f.set_len(good).map_err(io("truncating", path))?;
    }
    if last < first {
        std::fs::remove_file(path).map_err(io("removing", path))?;
        return Ok(None);
    }
    Ok(Some(Segment {
        path: path.to_owned(),
        first,
        last,
        bytes: good,
    }))
}

impl Spool {
    /// Opens the spool in `dir`, bounded to `max_events` unacknowledged
    /// events; events an earlier run left are kept and sent first.
    pub fn open(dir: &Path, max_events: usize) -> Result<Self, SpoolError> {
        let dir = dir.join("log");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let meta_path = dir.join("reserved");
        let meta = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&meta_path)
            .map_err(io("opening", &meta_path))?;
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut &meta, &mut text).map_err(io("reading", &meta_path))?;
        let (generation, reserved) = read_reserved(&text);
        if text.is_empty() {
            // A new record: its name must survive a crash too.
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing", &dir))?;
        }
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io("reading", &dir))? {
            let entry = entry.map_err(io("reading", &dir))?;
            let name = entry.file_name();
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|&f| f > 0)
            else {
                continue;
            };
            firsts.push(first);
        }
        firsts.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut waiting = 0;
        let mut work = 0;
        for first in firsts {
            if let Some(s) = recover(&dir.join(segment_name(first)), first)? {
                waiting += s.events();
                work += s.events();
                segments.insert(first, s);
            }
        }
        let last = segments.values().next_back().map_or(0, |s| s.last);
        // Start above every number a previous run may have handed out.
        let next = reserved.max(last) + 1;
        let max_events = max_events.max(1) as u64;
        let mut inner = Inner {
            dir,
            segments,
            active: None,
            buffer: Vec::with_capacity(BUFFER_BYTES),
            next,
            reserved: 0,
            meta,
            meta_path,
            generation,
            acked: 0,
            waiting,
            evicted: 0,
            max_events,
            segment_events: (max_events / 8).clamp(1, SEGMENT_EVENTS),
            memory: VecDeque::new(),
            memory_first: next,
            memory_bytes: 0,
            cursor: None,
            last_sync: Instant::now(),
            unsynced: false,
            work,
        };
        inner.reserve(next)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters, not files, half
        // updated; carrying on is better than losing the spool.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spools `e` under the next sequence number and returns the number;
    /// the record reaches the file at the next [`Spool::commit`].
    pub fn push(&self, mut e: Event) -> Result<u64, SpoolError> {
        e.seq = 0;
        self.push_encoded(e.time_unix_nanos, e.encode_to_vec())
    }

    /// Spools an event already encoded without its sequence number (`seq`
    /// 0, which protobuf leaves out): the number is appended as a field of
    /// its own, so the encoding happens outside the lock.
    pub fn push_encoded(&self, time: i64, mut payload: Vec<u8>) -> Result<u64, SpoolError> {
        let mut s = self.lock();
        let seq = s.next;
        if seq >= s.reserved {
            s.reserve(seq)?;
        }
        prost::encoding::uint64::encode(SEQ_FIELD, &seq, &mut payload);
        s.append(seq, time, payload)?;
        Ok(seq)
    }

    /// Writes buffered records to the file, and fsyncs them when the last
    /// fsync is older than [`SYNC_EVERY`].
    pub fn commit(&self) -> Result<(), SpoolError> {
        let mut s = self.lock();
        s.write_buffer()?;
        if s.unsynced && s.last_sync.elapsed() >= SYNC_EVERY {
            s.sync()?;
        }
        Ok(())
    }

    /// Writes everything to disk and fsyncs it.
    pub fn flush(&self) -> Result<(), SpoolError> {
        let mut s = self.lock();
        s.write_buffer()?;
        s.sync()
    }

    /// Writes everything to disk, fsyncs it, and gives back the sequence
    /// numbers reserved beyond the last one handed out: the next run goes
    /// on from there, and the collector sees no hole. (After a crash the
    /// reservation stands, and what may have been lost in it is reported.)
    pub fn close(&self) -> Result<(), SpoolError> {
        let mut s = self.lock();
        s.write_buffer()?;
        s.sync()?;
        let last = s.next - 1;
        s.write_reserved(last)
    }

    /// Events above `after`, in order: at most `max_events` of them and,
    /// beyond the first, at most `max_bytes` of batch body.
    pub fn read_after(
        &self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Batch, SpoolError> {
        let mut s = self.lock();
        s.read_after(after, max_events, max_bytes)
    }

    /// Forgets everything the collector acknowledged.
    pub fn ack(&self, through: u64) -> Result<(), SpoolError> {
        let retired = self.lock().ack(through);
        // Unlinking a large file takes a while; the event path must not
        // wait for it behind the lock.
        for path in retired {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
        }
        Ok(())
    }

    /// Moves every waiting event above `floor`, when the collector has
    /// stored this node's events through a number this spool never handed
    /// out: the spool was wiped (a reinstalled node, a lost volume) or
    /// another machine streamed under this node's name. Numbering on below
    /// `floor` would have every event taken for a redelivery of another
    /// one. The events are written again under new numbers, made durable,
    /// and only then are the old records removed: a crash in between
    /// leaves both, and the old ones are below the collector's ack.
    /// Returns how many events moved.
    pub fn renumber_above(&self, floor: u64) -> Result<u64, SpoolError> {
        let mut retired = Vec::new();
        let moved = {
            let mut s = self.lock();
            if floor < s.next {
                return Ok(0);
            }
            let old_last = s.next - 1;
            let mut events = Vec::new();
            let mut after = s.acked;
            loop {
                let b = s.read_after(after, BATCH_READ, usize::MAX)?;
                if b.count == 0 {
                    break;
                }
                after = b.last;
                let batch = driftwatch_proto::v1::EventBatch::decode(b.body.as_slice())
                    .map_err(|e| SpoolError::Corrupt(format!("a spooled batch: {e}")))?;
                events.extend(batch.events);
            }
            s.write_buffer()?;
            s.write_reserved(floor + 1 + RESERVE)?;
            s.next = floor + 1;
            s.memory.clear();
            s.memory_bytes = 0;
            s.memory_first = floor + 1;
            s.cursor = None;
            let moved = events.len() as u64;
            // Old and new copies are both counted until the old go: the
            // bound must not evict either meanwhile.
            let bound = std::mem::replace(&mut s.max_events, u64::MAX);
            for mut e in events {
                let seq = s.next;
                if seq >= s.reserved {
                    s.reserve(seq)?;
                }
                e.seq = seq;
                s.append(seq, e.time_unix_nanos, e.encode_to_vec())?;
            }
            s.max_events = bound;
            s.write_buffer()?;
            s.sync()?;
            retired.extend(s.ack(old_last));
            s.acked = floor;
            moved
        };
        for path in retired {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
        }
        Ok(moved)
    }

    /// The highest sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.lock().next - 1
    }

    /// Events waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.lock().waiting as usize
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events evicted because the spool was full, since start.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// Records visited by every operation since the spool was opened: a
    /// measure of its work that grows with what it is given and hands out,
    /// never with what it holds (checked by a test).
    pub fn work(&self) -> u64 {
        self.lock().work
    }
}

impl Inner {
    fn reserve(&mut self, from: u64) -> Result<(), SpoolError> {
        self.write_reserved(from + RESERVE)
    }

    /// Records durably that no run has handed out a number above `upto`.
    fn write_reserved(&mut self, upto: u64) -> Result<(), SpoolError> {
        let generation = self.generation + 1;
        let slot = reserved_slot(generation, upto);
        let offset = (generation % 2) * SLOT as u64;
        self.meta
            .write_all_at(&slot, offset)
            .and_then(|()| self.meta.sync_data())
            .map_err(io("writing", &self.meta_path))?;
        self.generation = generation;
        self.reserved = upto;
        Ok(())
    }

    fn append(&mut self, seq: u64, time: i64, payload: Vec<u8>) -> Result<(), SpoolError> {
        let cut = match self.segments.values().next_back() {
            Some(s) => {
                self.active.is_none()
                    || s.last + 1 != seq
                    || s.events() >= self.segment_events
                    || s.bytes >= SEGMENT_BYTES
            }
            None => true,
        };
        if cut {
            self.rotate(seq)?;
        }
        let before = self.buffer.len();
        write_record(&mut self.buffer, seq, &payload);
        let added = (self.buffer.len() - before) as u64;
        if let Some(s) = self.segments.values_mut().next_back() {
            s.last = seq;
            s.bytes += added;
        }
        self.next = seq + 1;
        self.waiting += 1;
        self.work += 1;
        self.memory_bytes += payload.len();
        self.memory.push_back((time, payload));
        while self.memory_bytes > MEMORY_BYTES {
            // Still on disk; the sender reads it from there if it needs it.
            self.pop_memory();
        }
        if self.buffer.len() >= BUFFER_BYTES {
            self.write_buffer()?;
        }
        if self.waiting > self.max_events {
            self.evict()?;
        }
        Ok(())
    }

    fn pop_memory(&mut self) {
        if let Some((_, p)) = self.memory.pop_front() {
            self.memory_bytes -= p.len();
            self.memory_first += 1;
            self.work += 1;
        }
    }

    /// Starts a new segment whose first record will be `first`.
    fn rotate(&mut self, first: u64) -> Result<(), SpoolError> {
        self.write_buffer()?;
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io("creating", &path))?;
        self.active = Some(file);
        self.segments.insert(
            first,
            Segment {
                path,
                first,
                last: first - 1,
                bytes: 0,
            },
        );
        Ok(())
    }

    fn write_buffer(&mut self) -> Result<(), SpoolError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(file) = self.active.as_mut() else {
            self.buffer.clear();
            return Ok(());
        };
        let path = self
            .segments
            .values()
            .next_back()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        file.write_all(&self.buffer).map_err(io("writing", &path))?;
        self.buffer.clear();
        self.unsynced = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(f) = &self.active {
            f.sync_data().map_err(io("syncing", &self.dir))?;
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Unacknowledged events of `s`.
    fn waiting_in(&self, s: &Segment) -> u64 {
        if s.last <= self.acked {
            0
        } else {
            s.last - s.first.max(self.acked + 1) + 1
        }
    }

    /// Drops whole segments, oldest first, until the bound holds again.
    fn evict(&mut self) -> Result<(), SpoolError> {
        while self.waiting > self.max_events {
            let Some((&first, _)) = self.segments.iter().next() else {
                return Ok(());
            };
            if self.segments.len() == 1 {
                // Only the active segment is left: close it so the next
                // push starts a fresh one, then drop it.
                self.write_buffer()?;
                self.active = None;
            }
            let Some(s) = self.segments.remove(&first) else {
                return Ok(());
            };
            let lost = self.waiting_in(&s);
            self.waiting -= lost;
            self.evicted += lost;
            std::fs::remove_file(&s.path).map_err(io("removing", &s.path))?;
            while self.memory_first <= s.last && !self.memory.is_empty() {
                self.pop_memory();
            }
            self.memory_first = self.memory_first.max(s.last + 1);
        }
        Ok(())
    }

    /// Returns the files of the segments it retired, for the caller to
    /// remove outside the lock.
    fn ack(&mut self, through: u64) -> Vec<PathBuf> {
        let through = through.min(self.next - 1);
        if through <= self.acked {
            return Vec::new();
        }
        // Waiting events in the range being acknowledged, segment by segment.
        let mut done = 0;
        for s in self.segments.range(..=through).map(|(_, s)| s) {
            let upto = s.last.min(through);
            let from = s.first.max(self.acked + 1);
            if upto >= from {
                done += upto - from + 1;
            }
        }
        self.acked = through;
        self.waiting -= done.min(self.waiting);
        let mut retired = Vec::new();
        while let Some((&first, s)) = self.segments.iter().next() {
            // The segment being written stays, acknowledged or not: it
            // goes when a newer one takes over. (Dropping it whenever the
            // sender caught up made every next push create a file.)
            if s.last > through || (self.segments.len() == 1 && self.active.is_some()) {
                break;
            }
            if let Some(s) = self.segments.remove(&first) {
                retired.push(s.path);
            }
        }
        while self.memory_first <= through && !self.memory.is_empty() {
            self.pop_memory();
        }
        self.memory_first = self.memory_first.max(through + 1);
        retired
    }

    fn read_after(
        &mut self,
        after: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Batch, SpoolError> {
        let mut batch = Batch::default();
        let mut want = after + 1;
        // What is older than the in-memory tail comes from the files.
        if want < self.memory_first {
            self.read_disk(&mut want, &mut batch, max_events, max_bytes)?;
        }
        if want >= self.memory_first {
            let start = (want - self.memory_first) as usize;
            let before = batch.count;
            for (i, (time, payload)) in self.memory.iter().enumerate().skip(start) {
                let seq = self.memory_first + i as u64;
                if !batch.takes(seq, payload.len(), max_events, max_bytes) {
                    break;
                }
                batch.add(seq, *time, payload);
            }
            self.work += (batch.count - before) as u64;
        }
        Ok(batch)
    }

    fn read_disk(
        &mut self,
        want: &mut u64,
        batch: &mut Batch,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(), SpoolError> {
        // Records may still sit in the buffer; the files must hold them.
        self.write_buffer()?;
        loop {
            if batch.count >= max_events || *want >= self.memory_first {
                return Ok(());
            }
            // The segment holding `want`, or the first one after it (a hole).
            let seg = self
                .segments
                .range(..=*want)
                .next_back()
                .filter(|(_, s)| s.last >= *want)
                .or_else(|| self.segments.range(*want..).next())
                .map(|(_, s)| (s.first, s.last, s.path.clone()));
            let Some((first, last, path)) = seg else {
                return Ok(());
            };
            let (mut offset, mut next) = match &self.cursor {
                Some(c) if c.segment == first && c.next <= (*want).max(first) => (c.offset, c.next),
                _ => (0, first),
            };
            let mut file = File::open(&path).map_err(io("opening", &path))?;
            file.seek(SeekFrom::Start(offset))
                .map_err(io("reading", &path))?;
            let mut r = std::io::BufReader::with_capacity(1 << 20, file);
            while next <= last {
                let Ok(Some((seq, payload))) = read_record(&mut r) else {
                    tracing::error!(file = %path.display(), seq = next, "a spool record does not read back; the rest of the segment is reported lost");
                    break;
                };
                self.work += 1;
                if seq >= *want {
                    if !batch.takes(seq, payload.len(), max_events, max_bytes) {
                        // Not taken: the next read starts at this record.
                        self.cursor = Some(Cursor {
                            segment: first,
                            offset,
                            next: seq,
                        });
                        return Ok(());
                    }
                    // Read from disk: the event's time is not at hand.
                    batch.add(seq, 0, &payload);
                    *want = seq + 1;
                }
                offset += (HEADER + payload.len()) as u64;
                next = seq + 1;
            }
            self.cursor = Some(Cursor {
                segment: first,
                offset,
                next,
            });
            *want = (*want).max(last + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::v1::{agent_message::Msg, AgentMessage};

    fn ev() -> Event {
        Event {
            node: "n".into(),
            time_unix_nanos: 1,
            ..Default::default()
        }
    }

    fn seqs(b: &Batch) -> Vec<u64> {
        let m = AgentMessage::decode(&*driftwatch_proto::raw::batch_message(&b.body).0).unwrap();
        let Some(Msg::Batch(batch)) = m.msg else {
            panic!("not a batch")
        };
        batch.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn sequences_ack_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 5).unwrap();
        let pushed: Vec<u64> = (0..3).map(|_| s.push(ev()).unwrap()).collect();
        assert_eq!(pushed, [1, 2, 3]);
        s.ack(2).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(seqs(&s.read_after(0, 10, 1 << 20).unwrap()), [3]);
        for _ in 0..10 {
            s.push(ev()).unwrap();
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.evicted(), 6);
        // The survivors are the newest; the hole below them is what was evicted.
        assert_eq!(
            seqs(&s.read_after(0, 10, 1 << 20).unwrap()),
            [9, 10, 11, 12, 13]
        );
    }

    #[test]
    fn a_collector_ahead_of_the_spool_has_the_waiting_events_moved_above_its_ack() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1_000).unwrap();
        let mut e = ev();
        for i in 0..300 {
            e.time_unix_nanos = 1 + i;
            s.push(e.clone()).unwrap();
        }
        s.commit().unwrap();
        s.ack(100).unwrap();
        // Below the ack nothing moves.
        assert_eq!(s.renumber_above(250).unwrap(), 0);
        assert_eq!(s.renumber_above(5_000).unwrap(), 200);
        assert_eq!((s.len(), s.last_seq(), s.evicted()), (200, 5_200, 0));
        let b = s.read_after(5_000, 1_000, 1 << 24).unwrap();
        assert_eq!(seqs(&b), (5_001..=5_200).collect::<Vec<_>>());
        // The same events in the same order: only their numbers changed.
        let m = AgentMessage::decode(&*driftwatch_proto::raw::batch_message(&b.body).0).unwrap();
        let Some(Msg::Batch(batch)) = m.msg else {
            panic!("not a batch")
        };
        let times: Vec<i64> = batch.events.iter().map(|e| e.time_unix_nanos).collect();
        assert_eq!(times, (101..=300).collect::<Vec<_>>());
        // New events follow them, and a restart keeps them all.
        assert_eq!(s.push(ev()).unwrap(), 5_201);
        s.close().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 1_000).unwrap();
        assert_eq!(s.len(), 201);
        assert_eq!(
            seqs(&s.read_after(5_000, 1_000, 1 << 24).unwrap()),
            (5_001..=5_201).collect::<Vec<_>>()
        );
        assert_eq!(s.push(ev()).unwrap(), 5_202);
    }

    #[test]
    fn numbers_are_not_reused_after_a_restart_and_unacked_events_survive() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Spool::open(dir.path(), 100).unwrap();
            s.push(ev()).unwrap();
            let last = s.push(ev()).unwrap();
            s.commit().unwrap();
            last
        };
        let s = Spool::open(dir.path(), 100).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(seqs(&s.read_after(0, 10, 1 << 20).unwrap()), [1, 2]);
        let next = s.push(ev()).unwrap();
        assert!(next > first, "{next} must be above {first}");
        assert!(
            next > RESERVE,
            "a reopened spool starts above the reserved block"
        );
        assert_eq!(seqs(&s.read_after(2, 10, 1 << 20).unwrap()), [next]);
    }

    #[test]
    fn a_clean_close_gives_back_the_reservation_so_a_restart_leaves_no_hole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 100).unwrap();
            for _ in 0..3 {
                s.push(ev()).unwrap();
            }
            s.ack(3).unwrap();
            s.push(ev()).unwrap();
            s.close().unwrap();
        }
        let s = Spool::open(dir.path(), 100).unwrap();
        assert_eq!(s.push(ev()).unwrap(), 5);
        assert_eq!(seqs(&s.read_after(3, 10, 1 << 20).unwrap()), [4, 5]);
        // Closed with everything acknowledged, too.
        s.ack(5).unwrap();
        s.close().unwrap();
        drop(s);
        let s = Spool::open(dir.path(), 100).unwrap();
        assert_eq!(s.push(ev()).unwrap(), 6);
    }

    #[test]
    fn a_sender_that_keeps_up_does_not_make_every_push_start_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1_000).unwrap();
        for _ in 0..50 {
            let seq = s.push(ev()).unwrap();
            s.commit().unwrap();
            s.ack(seq).unwrap();
        }
        let files: Vec<_> = std::fs::read_dir(dir.path().join("log"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        assert_eq!(files, [segment_name(1)], "one segment for all 50");
        assert!(s.is_empty());
    }

    #[test]
    fn a_torn_reservation_write_leaves_the_previous_one_standing() {
        let a = reserved_slot(7, 1000);
        let mut b = reserved_slot(8, 2000);
        let mut record = [0u8; 2 * SLOT];
        // Generation 7 sits in slot 1, 8 in slot 0.
        record[SLOT..].copy_from_slice(&a);
        record[..SLOT].copy_from_slice(&b);
        assert_eq!(read_reserved(&record), (8, 2000));
        // A lower reservation (a clean close) wins by generation, not size.
        record[SLOT..].copy_from_slice(&reserved_slot(9, 5));
        assert_eq!(read_reserved(&record), (9, 5));
        // Torn: slot 0's write of generation 10 never completed.
        b = reserved_slot(10, 3000);
        b[12] ^= 0xff;
        record[..SLOT].copy_from_slice(&b);
        assert_eq!(read_reserved(&record), (9, 5));
        // The earlier text form, and nothing at all.
        assert_eq!(read_reserved(b"65536\n"), (0, 65536));
        assert_eq!(read_reserved(b""), (0, 0));
    }

    #[test]
    fn a_batch_stops_at_a_hole_so_the_hole_is_reported_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 100).unwrap();
            s.push(ev()).unwrap();
            s.push(ev()).unwrap();
            s.commit().unwrap();
        }
        // A restart: the new run's numbers start above the reserved block.
        let s = Spool::open(dir.path(), 100).unwrap();
        let next = s.push(ev()).unwrap();
        assert_eq!(seqs(&s.read_after(0, 10, 1 << 20).unwrap()), [1, 2]);
        assert_eq!(seqs(&s.read_after(2, 10, 1 << 20).unwrap()), [next]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_what_precedes_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 100).unwrap();
            for _ in 0..3 {
                s.push(ev()).unwrap();
            }
            s.flush().unwrap();
        }
        let seg = dir.path().join("log").join(segment_name(1));
        let len = std::fs::metadata(&seg).unwrap().len();
        // A crash in the middle of the third record.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let s = Spool::open(dir.path(), 100).unwrap();
        assert_eq!(seqs(&s.read_after(0, 10, 1 << 20).unwrap()), [1, 2]);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn reads_from_disk_continue_where_memory_does_not_reach() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1_000_000).unwrap();
        for _ in 0..2000 {
            s.push(ev()).unwrap();
        }
        // As if memory had been short: everything comes from the files.
        {
            let mut i = s.lock();
            while !i.memory.is_empty() {
                i.pop_memory();
            }
        }
        let mut after = 0;
        let mut got = Vec::new();
        loop {
            let b = s.read_after(after, 300, 1 << 20).unwrap();
            if b.count == 0 {
                break;
            }
            got.extend(seqs(&b));
            after = b.last;
        }
        assert_eq!(got, (1..=2000).collect::<Vec<_>>());
        // A batch limited by bytes still carries at least one event.
        assert_eq!(s.read_after(0, 10, 1).unwrap().count, 1);
    }

    /// A million events pushed, read and acknowledged in the sender's
    /// pattern: the spool's work stays proportional to the events (a push,
    /// a read or an ack that walked what the spool holds would be O(n) and
    /// make it quadratic).
    #[test]
    fn a_million_events_cost_work_in_proportion_to_them() {
        const N: u64 = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 2_000_000).unwrap();
        let base = s.work();
        let mut sent = 0;
        let mut acked = 0;
        for i in 1..=N {
            s.push(ev()).unwrap();
            if i % 512 == 0 {
                s.commit().unwrap();
                let b = s.read_after(sent, 512, 1 << 20).unwrap();
                sent = b.last.max(sent);
                // Acks trail the sends by a window, as the collector's do.
                if sent > 4096 {
                    acked = sent - 4096;
                    s.ack(acked).unwrap();
                }
            }
        }
        assert!(acked > N - 5000);
        s.ack(N).unwrap();
        assert!(s.is_empty());
        let work = s.work() - base;
        assert!(
            work <= 4 * N,
            "{work} record visits for {N} events: something walks the spool"
        );
        // Acknowledged segments are gone from disk.
        let files = std::fs::read_dir(dir.path().join("log")).unwrap().count();
        assert!(files <= 2, "{files} files left");
    }
}
