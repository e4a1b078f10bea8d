//! The read side: a node's (or every node's) events in order with gaps
//! inline, optionally followed live; and the agents' status.

use std::{collections::HashMap, pin::Pin};

use driftwatch_proto::v1::{
    event, query_service_server::QueryService, timeline_item, AgentsRequest, AgentsResponse, Event,
    Gap, TimelineItem, TimelineRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use crate::{
    ingest::status_of,
    store::{Store, StoreError},
};

/// Kind name of an event, as the API's filters use it.
pub fn kind_of(e: &Event) -> &'static str {
    match &e.event {
        Some(event::Event::Exec(_)) => "exec",
        Some(event::Event::Exit(_)) => "exit",
        Some(event::Event::File(_)) => "file",
        Some(event::Event::Connect(_)) => "connect",
        Some(event::Event::Loss(_)) => "loss",
        Some(event::Event::Digest(_)) => "digest",
        Some(event::Event::ScanDone(_)) => "scan_done",
        Some(event::Event::Policy(_)) => "policy",
        None => "unknown",
    }
}

/// True when `e` passes every filter of `r`.
pub fn matches(r: &TimelineRequest, e: &Event) -> bool {
    let until = if r.until_unix_nanos == 0 {
        i64::MAX
    } else {
        r.until_unix_nanos
    };
    if e.time_unix_nanos < r.since_unix_nanos || e.time_unix_nanos >= until {
        return false;
    }
    if !r.node.is_empty() && e.node != r.node {
        return false;
    }
    if !r.kinds.is_empty() && !r.kinds.iter().any(|k| k == kind_of(e)) {
        return false;
    }
    let p = e.process.as_ref();
    if !r.exec_id.is_empty() && p.is_none_or(|p| p.exec_id != r.exec_id) {
        return false;
    }
    if r.pid != 0 && p.is_none_or(|p| p.pid != r.pid) {
        return false;
    }
    if !r.path_prefix.is_empty() {
        let hit = match &e.event {
            Some(event::Event::File(f)) => {
                f.path.starts_with(&r.path_prefix) || f.new_path.starts_with(&r.path_prefix)
            }
            Some(event::Event::Digest(d)) => d.path.starts_with(&r.path_prefix),
            _ => false,
        };
        if !hit {
            return false;
        }
    }
    true
}

/// The stored part of a timeline, in order (time, node, seq), gaps by their start.
pub fn collect(store: &Store, r: &TimelineRequest) -> Result<Vec<TimelineItem>, StoreError> {
    let until = if r.until_unix_nanos == 0 {
        i64::MAX
    } else {
        r.until_unix_nanos
    };
    let limit = if r.limit > 0 {
        r.limit as usize
    } else {
        usize::MAX
    };
    let keep = |e: &Event| matches(r, e);
    let mut events: Vec<Event> = if !r.exec_id.is_empty() {
        store.indexed(false, &r.exec_id, r.since_unix_nanos, until, limit, &keep)?
    } else if !r.path_prefix.is_empty() {
        store.indexed(
            true,
            &r.path_prefix,
            r.since_unix_nanos,
            until,
            limit,
            &keep,
        )?
    } else {
        let nodes = if r.node.is_empty() {
            store.nodes()?
        } else {
            vec![r.node.clone()]
        };
        let mut v = Vec::new();
        for n in nodes {
            // Buckets come in time order; events inside one are not, so stop
            // only once the bucket in which the limit was reached is complete.
            let mut taken = 0;
            let mut full_at: Option<i64> = None;
            for block in store.node_blocks(&n, r.since_unix_nanos, until) {
                let (b, block) = block?;
                if full_at.is_some_and(|f| b > f) {
                    break;
                }
                for e in block.into_iter().filter(|e| matches(r, e)) {
                    v.push(e);
                    taken += 1;
                }
                if taken >= limit && full_at.is_none() {
                    full_at = Some(b);
                }
            }
        }
        v
    };
    events.retain(|e| matches(r, e));
    events.sort_by(|a, b| {
        (a.time_unix_nanos, &a.node, a.seq).cmp(&(b.time_unix_nanos, &b.node, b.seq))
    });
    // A rename is indexed under both of its paths.
    events.dedup_by(|a, b| a.node == b.node && a.seq == b.seq);
    events.truncate(limit);
    let gaps: Vec<Gap> = store
        .gaps(&r.node)?
        .into_iter()
        .filter(|g| g.to_time_unix_nanos >= r.since_unix_nanos && g.from_time_unix_nanos < until)
        .collect();
    let mut items: Vec<(i64, TimelineItem)> = events
        .into_iter()
        .map(|e| {
            (
                e.time_unix_nanos,
                TimelineItem {
                    item: Some(timeline_item::Item::Event(e)),
                },
            )
        })
        .collect();
    items.extend(gaps.into_iter().map(|g| {
        (
            g.from_time_unix_nanos,
            TimelineItem {
                item: Some(timeline_item::Item::Gap(g)),
            },
        )
    }));
    items.sort_by_key(|(t, _)| *t);
    Ok(items.into_iter().map(|(_, i)| i).collect())
}

/// The service.
pub struct Query {
    store: Store,
    stored: broadcast::Sender<Event>,
}

impl Query {
    /// Reads `store`; `stored` announces newly stored events (for follow).
    pub fn new(store: Store, stored: broadcast::Sender<Event>) -> Self {
        Self { store, stored }
    }
}

type Items = Pin<Box<dyn Stream<Item = Result<TimelineItem, Status>> + Send>>;

#[tonic::async_trait]
impl QueryService for Query {
    type TimelineStream = Items;

    async fn timeline(&self, request: Request<TimelineRequest>) -> Result<Response<Items>, Status> {
        let r = request.into_inner();
        // Subscribe before reading the store, so nothing falls between the two.
        let mut live = r.follow.then(|| self.stored.subscribe());
        let t = std::time::Instant::now();
        let items = collect(&self.store, &r).map_err(|e| status_of(&e))?;
        tracing::debug!(items = items.len(), elapsed = ?t.elapsed(), "timeline collected");
        if live.is_none() {
            // Everything is known: one ready stream, no task or channel hops.
            return Ok(Response::new(Box::pin(tokio_stream::iter(
                items.into_iter().map(Ok),
            ))));
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut last: HashMap<String, u64> = HashMap::new();
            for item in items {
                if let Some(timeline_item::Item::Event(e)) = &item.item {
                    let l = last.entry(e.node.clone()).or_default();
                    *l = (*l).max(e.seq);
                }
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
            let Some(live) = live.as_mut() else { return };
            loop {
                match live.recv().await {
                    Ok(e) => {
                        if !matches(&r, &e) || last.get(&e.node).is_some_and(|l| e.seq <= *l) {
                            continue;
                        }
                        last.insert(e.node.clone(), e.seq);
                        let item = TimelineItem {
                            item: Some(timeline_item::Item::Event(e)),
                        };
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // The follower fell behind the live feed: say so inline.
                        let gap = Gap {
                            reason: format!(
                                "follow_lagged ({n} events not shown; query the window again)"
                            ),
                            ..Default::default()
                        };
                        if tx
                            .send(Ok(TimelineItem {
                                item: Some(timeline_item::Item::Gap(gap)),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn agents(&self, _: Request<AgentsRequest>) -> Result<Response<AgentsResponse>, Status> {
        let agents = self.store.agents().map_err(|e| status_of(&e))?;
        Ok(Response::new(AgentsResponse { agents }))
    }
}
