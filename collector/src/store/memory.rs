//! The event log in memory: the same rules and block format as the
//! durable backends, for tests of the code above the log (and a collector
//! that should keep nothing). Clones share one log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use driftwatch_proto::v1::{AgentStatus, Event, Gap, NodeInfo};

use super::{
    bucket, chain_head, check_gap, cut_blocks, decode_block, in_scope, keep_log_fields, moves_ack,
    new_agent, plan, prefix_dir, same_event, Appended, Blocks, EventLog, PageFill, Scope,
    StoreError, BLOCK_EVENTS, BUCKET_NS,
};

/// A block's key: bucket first, so that a walk in key order is a walk in
/// time order across nodes.
type Key = (i64, String, u64);

#[derive(Default)]
struct Inner {
    blocks: BTreeMap<Key, Vec<u8>>,
    /// (exec_id, block key).
    by_exec: BTreeSet<(String, Key)>,
    /// (directory, block key).
    by_dir: BTreeSet<(String, Key)>,
    agents: BTreeMap<String, AgentStatus>,
    gaps: BTreeMap<(String, i64, u64), Gap>,
}

/// The event log in memory.
#[derive(Clone, Default)]
pub struct MemoryLog {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    /// The events of `node`'s blocks, in first-sequence order.
    fn node_keys(&self, node: &str) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .blocks
            .keys()
            .filter(|(_, n, _)| n == node)
            .cloned()
            .collect();
        keys.sort_by_key(|(_, _, first)| *first);
        keys
    }

    /// The stored event under `seq` of `node`, looked for first at `time`.
    fn stored(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError> {
        let b = bucket(time);
        for (k, v) in self
            .blocks
            .range((b, node.to_owned(), 0)..=(b, node.to_owned(), u64::MAX))
        {
            if k.1 == node {
                if let Some(e) = decode_block(v)?.into_iter().find(|e| e.seq == seq) {
                    return Ok(Some(e));
                }
            }
        }
        Ok(None)
    }

    fn stored_elsewhere(&self, node: &str, seq: u64) -> Result<bool, StoreError> {
        let best = self
            .node_keys(node)
            .into_iter()
            .filter(|(_, _, first)| *first <= seq && seq < first + BLOCK_EVENTS)
            .max_by_key(|(_, _, first)| *first);
        Ok(match best.and_then(|k| self.blocks.get(&k)) {
            Some(v) => decode_block(v)?.iter().any(|e| e.seq == seq),
            None => false,
        })
    }

    fn add_gap(&mut self, gap: &Gap) {
        self.gaps.insert(
            (gap.node.clone(), gap.from_time_unix_nanos, gap.from_seq),
            gap.clone(),
        );
        if let Some(a) = self.agents.get_mut(&gap.node) {
            if moves_ack(gap, a) {
                a.acked_seq = gap.to_seq;
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.blocks.values().map(|v| v.len() as u64).sum()
    }
}

impl EventLog for MemoryLog {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn hello(
        &self,
        node: &NodeInfo,
        now: i64,
        started: i64,
    ) -> Result<(Option<AgentStatus>, AgentStatus), StoreError> {
        let mut inner = self.lock();
        let previous = inner.agents.get(&node.name).cloned();
        let mut a = previous.clone().unwrap_or_default();
        a.node = Some(node.clone());
        a.connected = true;
        a.last_seen_unix_nanos = now;
        a.agent_started_unix_nanos = started;
        inner.agents.insert(node.name.clone(), a.clone());
        Ok((previous, a))
    }

    fn append(&self, node: &str, events: &[Event], seen_at: i64) -> Result<Appended, StoreError> {
        let mut inner = self.lock();
        let mut agent = inner
            .agents
            .get(node)
            .cloned()
            .unwrap_or_else(|| new_agent(node));
        let plan = plan(node, events, agent.acked_seq, seen_at, |e| {
            Ok(match inner.stored(node, e.seq, e.time_unix_nanos)? {
                Some(s) => same_event(&s, e),
                None => !inner.stored_elsewhere(node, e.seq)?,
            })
        })?;
        let mut head = chain_head(&agent);
        for b in cut_blocks(&plan.accepted, &mut head) {
            let key = (b.bucket, node.to_owned(), b.first_seq);
            for x in b.execs {
                inner.by_exec.insert((x, key.clone()));
            }
            for d in b.dirs {
                inner.by_dir.insert((d, key.clone()));
            }
            inner.blocks.insert(key, b.value);
        }
        for g in &plan.quarantined {
            inner.add_gap(g);
        }
        let done = plan.finish(&mut agent, head, seen_at);
        inner.agents.insert(node.to_owned(), agent);
        Ok(done)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn agent(&self, node: &str) -> Result<Option<AgentStatus>, StoreError> {
        Ok(self.lock().agents.get(node).cloned())
    }

    fn agents(&self) -> Result<Vec<AgentStatus>, StoreError> {
        Ok(self.lock().agents.values().cloned().collect())
    }

    fn update_agent(
        &self,
        node: &str,
        change: &mut (dyn FnMut(&mut AgentStatus) + Send),
    ) -> Result<Option<AgentStatus>, StoreError> {
        let mut inner = self.lock();
        let Some(a) = inner.agents.get_mut(node) else {
            return Ok(None);
        };
        let before = a.clone();
        change(a);
        keep_log_fields(&before, a);
        Ok(Some(a.clone()))
    }

    fn add_gap(&self, gap: &Gap) -> Result<(), StoreError> {
        check_gap(gap)?;
        self.lock().add_gap(gap);
        Ok(())
    }

    fn gaps(&self, node: &str) -> Result<Vec<Gap>, StoreError> {
        Ok(self
            .lock()
            .gaps
            .iter()
            .filter(|((n, _, _), _)| node.is_empty() || n == node)
            .map(|(_, g)| g.clone())
            .collect())
    }

    fn event_at(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError> {
        self.lock().stored(node, seq, time)
    }

    /// Candidate blocks (a node's, or those an index value points at) are
    /// read in key order, which is time order across nodes.
    fn events(
        &self,
        scope: &Scope<'_>,
        since: i64,
        until: i64,
        limit: usize,
        keep: &(dyn Fn(&Event) -> bool + Sync),
    ) -> Result<Vec<Event>, StoreError> {
        let inner = self.lock();
        let first = bucket(since);
        let last = bucket(until.saturating_sub(1)).saturating_add(BUCKET_NS);
        let in_window = |k: &Key| k.0 >= first && k.0 < last;
        let keys: BTreeSet<Key> = match scope {
            Scope::Nodes(nodes) => inner
                .blocks
                .range((first, String::new(), 0)..(last, String::new(), 0))
                .map(|(k, _)| k)
                .filter(|k| nodes.contains(&k.1))
                .cloned()
                .collect(),
            Scope::Exec(id) => inner
                .by_exec
                .iter()
                .filter(|(x, k)| x == id && in_window(k))
                .map(|(_, k)| k.clone())
                .collect(),
            Scope::Path(prefix) => {
                let dir = prefix_dir(prefix);
                inner
                    .by_dir
                    .range((dir.to_owned(), (i64::MIN, String::new(), 0))..)
                    .take_while(|(d, _)| d.starts_with(dir))
                    .filter(|(_, k)| in_window(k))
                    .map(|(_, k)| k.clone())
                    .collect()
            }
        };
        let exact = |e: &Event| in_scope(scope, since, until, e, keep);
        let mut page = PageFill::new(limit);
        for k in keys {
            if page.done_before(k.0) {
                break;
            }
            // An index entry can outlive its block (retention).
            if let Some(v) = inner.blocks.get(&k) {
                page.add(k.0, decode_block(v)?, &exact);
            }
        }
        Ok(page.finish())
    }

    fn node_chain<'a>(&'a self, node: &str) -> Result<Blocks<'a>, StoreError> {
        let inner = self.lock();
        let blocks: Vec<Result<Vec<Event>, StoreError>> = inner
            .node_keys(node)
            .into_iter()
            .filter_map(|k| inner.blocks.get(&k))
            .map(|v| {
                decode_block(v).map(|mut events| {
                    events.sort_by_key(|e| e.seq);
                    events
                })
            })
            .collect();
        Ok(Box::new(blocks.into_iter()))
    }

    fn retain(&self, min_time: i64, max_bytes: u64) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let cut = bucket(min_time);
        let old: Vec<Key> = inner
            .blocks
            .range(..(cut, String::new(), 0))
            .map(|(k, _)| k.clone())
            .collect();
        let mut removed = old.len();
        for k in old {
            inner.blocks.remove(&k);
        }
        while max_bytes > 0 && inner.bytes() > max_bytes {
            let Some(k) = inner.blocks.keys().next().cloned() else {
                break;
            };
            inner.blocks.remove(&k);
            removed += 1;
        }
        Ok(removed)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.lock().bytes())
    }

    fn block_count(&self) -> Result<u64, StoreError> {
        Ok(self.lock().blocks.len() as u64)
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        let inner = self.lock();
        let mut n = 0;
        for v in inner.blocks.values() {
            n += decode_block(v)?.len() as u64;
        }
        Ok(n)
    }
}
