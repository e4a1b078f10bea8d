//! The read side: a node's (or every node's) events in order with gaps
//! inline, optionally followed live; and the agents' status.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use driftwatch_proto::v1::{
    event, query_service_server::QueryService, timeline_item, AgentsRequest, AgentsResponse,
    AuditRequest, AuditResponse, Event, Gap, TimelineItem, TimelineRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use crate::{
    audit::Audit,
    correlate::baselines::host_matches,
    ingest::status_of,
    store::{order, EventLog, Scope, StoreError},
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

/// A host filter is a name or a glob (`*` any run, `?` one character),
/// the same everywhere a host is given.
fn is_glob(host: &str) -> bool {
    host.contains(['*', '?'])
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
    if !r.node.is_empty() && !host_matches(&r.node, &e.node) {
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

/// Most events a walk reads from the store at a time: the first ones of a
/// replay go out before the rest is read, and memory stays bounded however
/// long the history is. Pages start at [`FIRST_PAGE`] and double: a
/// responder sees the start of a replay after one small read.
const PAGE: usize = 4096;

/// The first page of a walk.
const FIRST_PAGE: usize = 128;

/// The last event a walk sent.
type Cursor = (i64, String, u64);

/// Up to `limit` events that pass `r` and come after `after`, in order,
/// reading from `since` on.
fn page(
    store: &dyn EventLog,
    r: &TimelineRequest,
    since: i64,
    until: i64,
    after: Option<&Cursor>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let keep =
        |e: &Event| matches(r, e) && after.is_none_or(|(t, n, s)| order(e) > (*t, n.as_str(), *s));
    let scope = if !r.exec_id.is_empty() {
        Scope::Exec(&r.exec_id)
    } else if !r.path_prefix.is_empty() {
        Scope::Path(&r.path_prefix)
    } else if r.node.is_empty() {
        Scope::Nodes(store.nodes()?)
    } else if is_glob(&r.node) {
        Scope::Nodes(
            store
                .nodes()?
                .into_iter()
                .filter(|n| host_matches(&r.node, n))
                .collect(),
        )
    } else {
        Scope::Nodes(vec![r.node.clone()])
    };
    // Each block is read once, however many index entries list it, so no
    // event comes twice; the first `limit` are complete and in order.
    let mut events = store.events(&scope, since, until, limit, &keep)?;
    events.truncate(limit);
    Ok(events)
}

/// Sends the stored part of a timeline to `emit` in order (time, node,
/// seq), gaps inline by their start, reading a page at a time. Stops early,
/// without an error, when `emit` returns false (the reader went away).
pub fn walk(
    store: &dyn EventLog,
    r: &TimelineRequest,
    emit: &mut dyn FnMut(TimelineItem) -> bool,
) -> Result<(), StoreError> {
    let until = if r.until_unix_nanos == 0 {
        i64::MAX
    } else {
        r.until_unix_nanos
    };
    let mut left = if r.limit > 0 {
        r.limit as usize
    } else {
        usize::MAX
    };
    let one = if is_glob(&r.node) {
        ""
    } else {
        r.node.as_str()
    };
    let mut gaps: Vec<Gap> = store
        .gaps(one)?
        .into_iter()
        .filter(|g| g.to_time_unix_nanos >= r.since_unix_nanos && g.from_time_unix_nanos < until)
        .filter(|g| r.node.is_empty() || host_matches(&r.node, &g.node))
        .collect();
    gaps.sort_by_key(|g| g.from_time_unix_nanos);
    let mut gaps = gaps.into_iter().peekable();
    let gap = |g: Gap| TimelineItem {
        item: Some(timeline_item::Item::Gap(g)),
    };
    let mut after: Option<Cursor> = None;
    let mut size = FIRST_PAGE;
    loop {
        let since = after.as_ref().map_or(r.since_unix_nanos, |c| c.0);
        let want = size.min(left);
        size = (size * 2).min(PAGE);
        let events = page(store, r, since, until, after.as_ref(), want)?;
        let more = events.len() == want;
        for e in events {
            while let Some(g) = gaps.next_if(|g| g.from_time_unix_nanos < e.time_unix_nanos) {
                if !emit(gap(g)) {
                    return Ok(());
                }
            }
            after = Some((e.time_unix_nanos, e.node.clone(), e.seq));
            left -= 1;
            let item = TimelineItem {
                item: Some(timeline_item::Item::Event(e)),
            };
            if !emit(item) {
                return Ok(());
            }
        }
        if !more || left == 0 {
            break;
        }
    }
    // Gaps after the last event; when the limit cut the events short,
    // only those that began before it ended.
    let last = if left == 0 {
        after.as_ref().map_or(i64::MAX, |c| c.0)
    } else {
        i64::MAX
    };
    for g in gaps.take_while(|g| g.from_time_unix_nanos <= last) {
        if !emit(gap(g)) {
            break;
        }
    }
    Ok(())
}

/// The service.
pub struct Query {
    store: Arc<dyn EventLog>,
    stored: broadcast::Sender<Event>,
    audit: Arc<Audit>,
    /// Becomes true when the collector stops: a follow then ends with
    /// UNAVAILABLE instead of holding the stop open.
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Query {
    /// Reads `store`; `stored` announces newly stored events (for follow).
    pub fn new(
        store: Arc<dyn EventLog>,
        stored: broadcast::Sender<Event>,
        audit: Arc<Audit>,
    ) -> Self {
        Self {
            store,
            stored,
            audit,
            closing: tokio::sync::watch::channel(false).1,
        }
    }

    /// Ends every follow once `closing` turns true.
    pub fn closing_on(mut self, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        self.closing = closing;
        self
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
        let mut closing = self.closing.clone();
        let (tx, rx) = mpsc::channel(PAGE);
        let store = self.store.clone();
        let req = r.clone();
        // The store is read on a blocking thread, a page at a time, while
        // the answer streams; the bounded channel holds it back when the
        // reader is slow.
        let stored_part = tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let mut last: HashMap<String, u64> = HashMap::new();
            let mut sent = 0usize;
            let result = walk(&*store, &req, &mut |item| {
                if let Some(timeline_item::Item::Event(e)) = &item.item {
                    let l = last.entry(e.node.clone()).or_default();
                    *l = (*l).max(e.seq);
                }
                sent += 1;
                tx.blocking_send(Ok(item)).is_ok()
            });
            tracing::debug!(items = sent, elapsed = ?t.elapsed(), "timeline read");
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(status_of(&e)));
                return None;
            }
            Some((tx, last))
        });
        tokio::spawn(async move {
            let Ok(Some((tx, mut last))) = stored_part.await else {
                return;
            };
            let Some(live) = live.as_mut() else { return };
            loop {
                let next = tokio::select! {
                    next = live.recv() => next,
                    _ = crate::closed(&mut closing) => {
                        let _ = tx.send(Err(Status::unavailable("the collector is stopping; follow again once it is back"))).await;
                        return;
                    }
                };
                match next {
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

    async fn audit(
        &self,
        request: Request<AuditRequest>,
    ) -> Result<Response<AuditResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(100_000)
        } as usize;
        // The head first: the records read after it include it.
        let (head_seq, head) = self.audit.head();
        let records = self
            .audit
            .list(r.since_unix_nanos, limit)
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(AuditResponse {
            records,
            head: head.to_vec(),
            head_seq,
        }))
    }
}

#[cfg(test)]
mod tests;
