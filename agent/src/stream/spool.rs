//! The local spool: every event bound for the collector is written here
//! first, under its sequence number, and removed once the collector has
//! acknowledged it as durable.
//!
//! Sequence numbers are never reused, even after a crash: they are handed
//! out from a block whose upper end is written to disk (fsync'd) before the
//! block is used. Numbers a crash lost, and numbers evicted because the spool
//! hit its bound, show up to the sender as a hole below the first spooled
//! event, which it reports to the collector as a dropped range.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use driftwatch_proto::v1::Event;
use prost::Message as _;

const RESERVE: u64 = 1 << 16;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// sled failed.
    #[error("spool: {0}")]
    Sled(#[from] sled::Error),
    /// A spooled record does not decode.
    #[error("spool: corrupt record at seq {0}")]
    Corrupt(u64),
}

/// The spool; clones share it.
#[derive(Clone)]
pub struct Spool {
    db: sled::Db,
    events: sled::Tree,
    meta: sled::Tree,
    next: Arc<AtomicU64>,
    reserved: Arc<AtomicU64>,
    max_events: usize,
    evicted: Arc<AtomicU64>,
}

fn be(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(k: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&k[..8.min(k.len())]);
    u64::from_be_bytes(a)
}

impl Spool {
    /// Opens the spool in `dir`, bounded to `max_events` unacknowledged events.
    pub fn open(dir: &Path, max_events: usize) -> Result<Self, SpoolError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(100))
            .open()?;
        let events = db.open_tree("events")?;
        let meta = db.open_tree("meta")?;
        let reserved = meta.get("reserved")?.map(|v| seq_of(&v)).unwrap_or(0);
        let last = events.last()?.map(|(k, _)| seq_of(&k)).unwrap_or(0);
        // Start above every number a previous run may have handed out.
        let next = reserved.max(last) + 1;
        let spool = Self {
            db,
            events,
            meta,
            next: Arc::new(AtomicU64::new(next)),
            reserved: Arc::new(AtomicU64::new(0)),
            max_events: max_events.max(1),
            evicted: Arc::new(AtomicU64::new(0)),
        };
        spool.reserve(next)?;
        Ok(spool)
    }

    fn reserve(&self, from: u64) -> Result<(), SpoolError> {
        let upto = from + RESERVE;
        self.meta.insert("reserved", &be(upto))?;
        self.db.flush()?;
        self.reserved.store(upto, Ordering::SeqCst);
        Ok(())
    }

    /// Spools `e` under the next sequence number; returns it.
    pub fn push(&self, mut e: Event) -> Result<u64, SpoolError> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if seq >= self.reserved.load(Ordering::SeqCst) {
            self.reserve(seq)?;
        }
        e.seq = seq;
        self.events.insert(be(seq), e.encode_to_vec())?;
        if self.events.len() > self.max_events {
            // Full: the oldest unacknowledged events go; the sender reports the hole.
            while self.events.len() > self.max_events {
                if self.events.pop_min()?.is_none() {
                    break;
                }
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(seq)
    }

    /// Up to `max` events with sequence numbers above `after`, in order.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<Event>, SpoolError> {
        let mut out = Vec::new();
        for kv in self.events.range(be(after + 1)..).take(max) {
            let (k, v) = kv?;
            out.push(Event::decode(&*v).map_err(|_| SpoolError::Corrupt(seq_of(&k)))?);
        }
        Ok(out)
    }

    /// Removes everything the collector acknowledged.
    pub fn ack(&self, through: u64) -> Result<(), SpoolError> {
        loop {
            match self.events.first()? {
                Some((k, _)) if seq_of(&k) <= through => {
                    self.events.remove(k)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// The highest sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.next.load(Ordering::SeqCst) - 1
    }

    /// Events waiting for an acknowledgement.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Events evicted because the spool was full, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Event {
        Event {
            node: "n".into(),
            time_unix_nanos: 1,
            ..Default::default()
        }
    }

    #[test]
    fn sequences_ack_and_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 5).unwrap();
        let seqs: Vec<u64> = (0..3).map(|_| s.push(ev()).unwrap()).collect();
        assert_eq!(seqs, [1, 2, 3]);
        s.ack(2).unwrap();
        assert_eq!(
            s.read_after(0, 10)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            [3]
        );
        for _ in 0..10 {
            s.push(ev()).unwrap();
        }
        assert_eq!(s.len(), 5);
        assert_eq!(s.evicted(), 6);
        // The survivors are the newest; the hole below them is what was evicted.
        assert_eq!(s.read_after(0, 10).unwrap().first().unwrap().seq, 9);
    }

    #[test]
    fn numbers_are_not_reused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Spool::open(dir.path(), 100).unwrap();
            s.push(ev()).unwrap();
            s.push(ev()).unwrap()
        };
        let s = Spool::open(dir.path(), 100).unwrap();
        let next = s.push(ev()).unwrap();
        assert!(next > first, "{next} must be above {first}");
        assert!(
            next > RESERVE,
            "a reopened spool starts above the reserved block"
        );
    }
}
