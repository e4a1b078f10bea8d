//! The findings, approvals and baselines services, and who is calling.
//!
//! Who may call what is settled before a handler runs
//! ([`crate::security::auth`]); a handler that changes something takes the
//! caller's principal name for the record (who acknowledged, who requested,
//! who approved).

use std::{sync::Arc, time::Duration};

use driftwatch_proto::{
    time::now_unix_nanos,
    v1::{
        approval_service_server::ApprovalService, baseline_service_server::BaselineService,
        finding_service_server::FindingService, Approval, Baseline, DecideApprovalRequest,
        FindingChange, FindingDetail, GetFindingRequest, ImportBaselineRequest,
        ImportBaselineResponse, ListApprovalsRequest, ListApprovalsResponse, ListBaselinesRequest,
        ListBaselinesResponse, ListFindingsRequest, ListFindingsResponse, RequestApprovalRequest,
        ScanBaselineRequest, ScanBaselineResponse, UpdateFindingRequest, WatchFindingsRequest,
    },
};
use tonic::{Request, Response, Status};

use crate::{
    audit::Audit,
    correlate::{approvals::ApprovalError, baselines, findings, Correlator, StatusError},
    ingest::{status_of, Ingest},
    security::auth::caller,
};

/// The control services.
#[derive(Clone)]
pub struct Control {
    correlator: Arc<Correlator>,
    ingest: Ingest,
    audit: Arc<Audit>,
    notifier: Option<Arc<crate::notify::Notifier>>,
}

impl Control {
    /// Services over `correlator`; scans go through `ingest`'s streams.
    pub fn new(correlator: Arc<Correlator>, ingest: Ingest, audit: Arc<Audit>) -> Self {
        Self {
            correlator,
            ingest,
            audit,
            notifier: None,
        }
    }

    /// Tells `notifier` of approval requests and decisions.
    pub fn with_notifier(mut self, notifier: Arc<crate::notify::Notifier>) -> Self {
        self.notifier = Some(notifier);
        self
    }

    /// Runs `f` on a blocking thread: the judging state may be a round
    /// trip away (PostgreSQL), or wait for another transaction.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Correlator) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let c = self.correlator.clone();
        tokio::task::spawn_blocking(move || f(&c))
            .await
            .map_err(|e| Status::internal(format!("the store task stopped: {e}")))
    }

    /// Files a request and tells whoever is to decide it.
    async fn file(&self, a: Approval) -> Result<Approval, Status> {
        let a = self
            .blocking(move |c| c.request(a))
            .await?
            .map_err(approval_status)?;
        tracing::info!(id = a.id, kind = %a.kind, requester = %a.requester, resource = %a.resource, who = %a.who, "approval requested");
        self.tell(&a, false);
        Ok(a)
    }

    fn tell(&self, a: &Approval, decided: bool) {
        if let Some(n) = &self.notifier {
            n.notify(&crate::notify::approval_notice(a, decided));
        }
    }

    /// Records what `principal` asked of `call` and how it ended in the
    /// audit log, before the answer goes out. The record's flush also makes
    /// the change itself durable: a person is told a change is done only
    /// once it and its record are on disk. A change the log cannot record
    /// is reported as failed (it was made, but is not attributable).
    ///
    /// The flush (an fsync) runs on a blocking thread, never on one of the
    /// runtime's workers, where it would hold up every agent's acks.
    async fn audited<T>(
        &self,
        principal: &str,
        call: &str,
        args: serde_json::Value,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        let (audit, who, what, how) = (
            self.audit.clone(),
            principal.to_owned(),
            call.to_owned(),
            outcome.clone(),
        );
        let recorded = tokio::task::spawn_blocking(move || audit.record(&who, &what, args, &how))
            .await
            .map_err(|e| format!("the audit writer stopped: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = recorded {
            tracing::error!(%principal, call, %outcome, "the audit log could not record a call: {e}");
            if result.is_ok() {
                return Err(Status::unavailable(format!(
                    "{call} was applied but could not be recorded in the audit log: {e}"
                )));
            }
        }
        result
    }
}

fn approval_status(e: ApprovalError) -> Status {
    match e {
        ApprovalError::NotFound(_) => Status::not_found(e.to_string()),
        ApprovalError::SelfApproval { .. } => Status::permission_denied(e.to_string()),
        ApprovalError::Decided { .. } => Status::failed_precondition(e.to_string()),
        ApprovalError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        ApprovalError::Store(s) => status_of(&s),
    }
}

fn valid_sha(field: &str, s: &str) -> Result<(), Status> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Status::invalid_argument(format!(
            "{field}: {s:?} is not a SHA-256 (64 hex digits)"
        )));
    }
    Ok(())
}

/// A finding as the API shows it: its `changes` stand for the structures
/// kept inside (the actual one waits there for an approval).
pub fn public(mut f: driftwatch_proto::v1::Finding) -> driftwatch_proto::v1::Finding {
    f.desired = driftwatch_proto::structure::without(f.desired);
    f.actual = driftwatch_proto::structure::without(f.actual);
    f
}

/// Changes read from the log per turn of a watch.
const WATCH_PAGE: usize = 256;

type Changes =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<FindingChange, Status>> + Send>>;

#[tonic::async_trait]
impl FindingService for Control {
    type WatchStream = Changes;

    async fn watch(
        &self,
        request: Request<WatchFindingsRequest>,
    ) -> Result<Response<Changes>, Status> {
        let r = request.into_inner();
        if !r.min_severity.is_empty() && !findings::SEVERITIES.contains(&r.min_severity.as_str()) {
            return Err(Status::invalid_argument(format!(
                "min_severity: {:?} is not one of {}",
                r.min_severity,
                findings::SEVERITIES.join(", ")
            )));
        }
        let mut latest = self.correlator.judging().changes();
        let mut cursor = if r.from_now {
            *latest.borrow()
        } else {
            r.after
        };
        let mut closing = self.ingest.closing();
        let min = findings::severity_rank(&r.min_severity);
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_PAGE);
        let correlator = self.correlator.clone();
        tokio::spawn(async move {
            loop {
                let c = correlator.clone();
                let page = match tokio::task::spawn_blocking(move || {
                    c.with_tx(|tx| tx.changes_after(cursor, WATCH_PAGE))
                })
                .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(status_of(&e))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!(
                                "reading the change log: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                let full = page.len() == WATCH_PAGE;
                for (at, f) in page {
                    cursor = at;
                    let wanted = (r.kinds.is_empty() || r.kinds.contains(&f.kind))
                        && findings::severity_rank(&f.severity) >= min;
                    if wanted
                        && tx
                            .send(Ok(FindingChange {
                                cursor: at,
                                finding: Some(public(f)),
                            }))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    r = latest.changed() => if r.is_err() { return },
                    _ = crate::closed(&mut closing) => {
                        let _ = tx.send(Err(Status::unavailable("the collector is stopping; resume with --after the last cursor"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list(
        &self,
        request: Request<ListFindingsRequest>,
    ) -> Result<Response<ListFindingsResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let keep = move |f: &driftwatch_proto::v1::Finding| {
            (r.kinds.is_empty() || r.kinds.contains(&f.kind))
                && (r.node.is_empty() || baselines::host_matches(&r.node, &f.node))
                && (r.resource.is_empty()
                    || f.resource == r.resource
                    || (r.resource.starts_with('/') && f.path.starts_with(&r.resource)))
                && (r.statuses.is_empty() || r.statuses.contains(&f.status))
                && f.last_seen_unix_nanos >= r.since_unix_nanos
        };
        let findings = self
            .blocking(move |c| c.with_tx(|tx| tx.findings(limit, &keep)))
            .await?
            .map_err(|e| status_of(&e))?
            .into_iter()
            .map(public)
            .collect();
        Ok(Response::new(ListFindingsResponse { findings }))
    }

    async fn get(
        &self,
        request: Request<GetFindingRequest>,
    ) -> Result<Response<FindingDetail>, Status> {
        let id = request.into_inner().id;
        let (finding, approval) = self
            .blocking(move |c| {
                c.with_tx(|tx| {
                    let Some(f) = tx.finding(id)? else {
                        return Ok(None);
                    };
                    let a = match f.approval_id {
                        0 => None,
                        a => tx.approval(a)?,
                    };
                    Ok(Some((f, a)))
                })
            })
            .await?
            .map_err(|e| status_of(&e))?
            .ok_or_else(|| Status::not_found(format!("no finding {id}")))?;
        // The evidence is read outside the transaction: from PostgreSQL
        // it is a round trip per event.
        let mut events = Vec::new();
        for r in &finding.evidence {
            if let Some(e) = self
                .correlator
                .log
                .event_at(&r.node, r.seq, r.time_unix_nanos)
                .map_err(|e| status_of(&e))?
            {
                events.push(e);
            }
        }
        Ok(Response::new(FindingDetail {
            finding: Some(public(finding)),
            events,
            approval,
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateFindingRequest>,
    ) -> Result<Response<driftwatch_proto::v1::Finding>, Status> {
        let principal = caller(&request).principal()?.to_owned();
        let r = request.into_inner();
        let args = serde_json::json!({"id": r.id, "status": r.status, "note": r.note, "approval_id": r.approval_id});
        let result: Result<Response<driftwatch_proto::v1::Finding>, Status> = async {
            if r.status != findings::ACKNOWLEDGED && r.status != findings::RESOLVED {
                return Err(Status::invalid_argument(format!(
                    "status: must be \"acknowledged\" or \"resolved\", got {:?}",
                    r.status
                )));
            }
            let (id, status, who, note, approval) = (
                r.id,
                r.status.clone(),
                principal.clone(),
                r.note.clone(),
                r.approval_id,
            );
            if approval != 0 && status != findings::RESOLVED {
                return Err(Status::invalid_argument(
                    "an approval can only be attached when resolving",
                ));
            }
            let f = self
                .blocking(move |c| c.set_status(id, &status, &who, &note, approval))
                .await?
                .map_err(|e| status_of(&e))?
                .map_err(|e| match e {
                    StatusError::NoFinding(_) | StatusError::NoApproval(_) => {
                        Status::not_found(e.to_string())
                    }
                    StatusError::Resolved(_) | StatusError::NotApproved { .. } => {
                        Status::failed_precondition(e.to_string())
                    }
                })?;
            tracing::info!(id = f.id, status = %f.status, %principal, "finding updated");
            Ok(Response::new(f))
        }
        .await;
        self.audited(&principal, "FindingService/Update", args, result)
            .await
    }
}

#[tonic::async_trait]
impl ApprovalService for Control {
    async fn request(
        &self,
        request: Request<RequestApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        let principal = caller(&request).principal()?.to_owned();
        let r = request.into_inner();
        let args = serde_json::json!({"kind": r.kind, "resource": r.resource, "who": r.who, "host": r.host, "sha256": r.sha256, "window_seconds": r.window_seconds, "reason": r.reason});
        let result: Result<Response<Approval>, Status> = async {
            let access = match r.kind.as_str() {
                "" | "change" => false,
                "access" => true,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "kind: {other:?} is neither \"change\" nor \"access\""
                    )))
                }
            };
            if access {
                let who = driftwatch_proto::policy::Selector::parse_text(&r.who)
                    .map_err(|e| Status::invalid_argument(format!("who: {e}")))?;
                let policy = self.correlator.policies.current();
                let guarded = policy.as_deref().and_then(|p| p.policy.resource(&r.resource));
                match guarded {
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "access: no resource named {:?} in the policy",
                            r.resource
                        )))
                    }
                    Some(res) if res.ports.is_empty() => {
                        return Err(Status::invalid_argument(format!(
                            "access: {:?} has no ports; access grants open connects to a database resource",
                            r.resource
                        )))
                    }
                    Some(_) => {}
                }
                if !r.sha256.is_empty() {
                    return Err(Status::invalid_argument(
                        "digest: an access grant names who, not a content digest",
                    ));
                }
                if r.window_seconds <= 0 || r.window_seconds > 86_400 {
                    return Err(Status::invalid_argument(
                        "for: an access grant lasts between 1 second and 24 hours",
                    ));
                }
                if r.reason.trim().is_empty() {
                    return Err(Status::invalid_argument("reason: say why the access is needed"));
                }
                let a = Approval {
                    kind: "access".into(),
                    resource: r.resource,
                    who: who.to_text(),
                    host: if r.host.is_empty() { "*".into() } else { r.host },
                    window_seconds: r.window_seconds,
                    reason: r.reason,
                    requester: principal.clone(),
                    requested_unix_nanos: now_unix_nanos(),
                    ..Default::default()
                };
                return self.file(a).await.map(Response::new);
            }
            if !r.who.is_empty() {
                return Err(Status::invalid_argument(
                    "who: only an access request names who (kind \"access\")",
                ));
            }
            if r.resource.is_empty() {
                return Err(Status::invalid_argument(
                    "resource: name a policy resource or an absolute path",
                ));
            }
            if !r.resource.starts_with('/') {
                if let Some(p) = self.correlator.policies.current() {
                    if p.policy.resource(&r.resource).is_none() {
                        let known: Vec<&str> =
                            p.policy.resources.iter().map(|r| r.name.as_str()).collect();
                        return Err(Status::invalid_argument(format!(
                            "resource: no resource named {:?} in the policy (known: {})",
                            r.resource,
                            known.join(", ")
                        )));
                    }
                }
            }
            if !r.sha256.is_empty() {
                valid_sha("digest", &r.sha256)?;
            }
            if r.window_seconds <= 0 || r.window_seconds > 30 * 86_400 {
                return Err(Status::invalid_argument(
                    "window: must be between 1 second and 30 days",
                ));
            }
            if r.reason.trim().is_empty() {
                return Err(Status::invalid_argument(
                    "reason: say why the change is needed",
                ));
            }
            let a = Approval {
                resource: r.resource,
                host: if r.host.is_empty() {
                    "*".into()
                } else {
                    r.host
                },
                kind: "change".into(),
                sha256: r.sha256.to_ascii_lowercase(),
                window_seconds: r.window_seconds,
                reason: r.reason,
                requester: principal.clone(),
                requested_unix_nanos: now_unix_nanos(),
                ..Default::default()
            };
            self.file(a).await.map(Response::new)
        }
        .await;
        self.audited(&principal, "ApprovalService/Request", args, result)
            .await
    }

    async fn decide(
        &self,
        request: Request<DecideApprovalRequest>,
    ) -> Result<Response<Approval>, Status> {
        let principal = caller(&request).principal()?.to_owned();
        let r = request.into_inner();
        let args = serde_json::json!({"id": r.id, "approve": r.approve, "note": r.note});
        let result: Result<Response<Approval>, Status> = async {
            let (id, approve, who, note) = (r.id, r.approve, principal.clone(), r.note.clone());
            let (a, resolved) = self
                .blocking(move |c| c.decide(id, approve, &who, &note))
                .await?
                .map_err(approval_status)?;
            tracing::info!(id = a.id, status = %a.status, approver = %principal, "change request decided");
            if !resolved.is_empty() {
                tracing::info!(id = a.id, ?resolved, "open findings resolved by the approval");
            }
            if a.kind == crate::correlate::approvals::ACCESS {
                self.blocking(|c| c.publish_grants())
                    .await?
                    .map_err(|e| status_of(&e))?;
            }
            self.tell(&a, true);
            Ok(Response::new(a))
        }
        .await;
        self.audited(&principal, "ApprovalService/Decide", args, result)
            .await
    }

    async fn list(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        let r = request.into_inner();
        let id = r.id;
        let approvals = self
            .blocking(move |c| {
                c.with_tx(|tx| {
                    if id != 0 {
                        return Ok(tx.approval(id)?.into_iter().collect());
                    }
                    crate::correlate::approvals::list(tx, &r.statuses)
                })
            })
            .await?
            .map_err(|e| status_of(&e))?;
        if id != 0 && approvals.is_empty() {
            return Err(Status::not_found(format!("no approval {id}")));
        }
        Ok(Response::new(ListApprovalsResponse { approvals }))
    }
}

#[tonic::async_trait]
impl BaselineService for Control {
    async fn import(
        &self,
        request: Request<ImportBaselineRequest>,
    ) -> Result<Response<ImportBaselineResponse>, Status> {
        let principal = caller(&request).principal()?.to_owned();
        let r = request.into_inner();
        let args = serde_json::json!({"host": r.host, "entries": r.entries.len(), "paths": r.entries.iter().take(20).map(|b| b.path.as_str()).collect::<Vec<_>>()});
        let result: Result<Response<ImportBaselineResponse>, Status> = async {
            let host = if r.host.is_empty() {
                "*".to_owned()
            } else {
                r.host
            };
            // Check everything before storing anything.
            for (i, b) in r.entries.iter().enumerate() {
                if !b.path.starts_with('/') {
                    return Err(Status::invalid_argument(format!(
                        "entries[{i}].path: {:?} is not absolute",
                        b.path
                    )));
                }
                let sha = b.state.as_ref().map(|s| s.sha256.as_str()).unwrap_or("");
                valid_sha(&format!("entries[{i}].state.sha256"), sha)?;
            }
            let now = now_unix_nanos();
            let n = r.entries.len() as u64;
            let entries: Vec<Baseline> = r
                .entries
                .into_iter()
                .map(|b| Baseline {
                    host: if b.host.is_empty() {
                        host.clone()
                    } else {
                        b.host
                    },
                    path: b.path,
                    state: b.state.map(|s| driftwatch_proto::v1::FileState {
                        exists: true,
                        sha256: s.sha256.to_ascii_lowercase(),
                        ..s
                    }),
                    source: baselines::MANIFEST.into(),
                    set_unix_nanos: now,
                    set_by: principal.clone(),
                })
                .collect();
            // One transaction: all of the manifest, or none of it.
            self.blocking(move |c| {
                c.with_tx(|tx| {
                    for b in &entries {
                        tx.put_baseline(b)?;
                    }
                    Ok(())
                })
            })
            .await?
            .map_err(|e| status_of(&e))?;
            tracing::info!(entries = n, %host, %principal, "baseline imported");
            Ok(Response::new(ImportBaselineResponse { stored: n }))
        }
        .await;
        self.audited(&principal, "BaselineService/Import", args, result)
            .await
    }

    async fn scan(
        &self,
        request: Request<ScanBaselineRequest>,
    ) -> Result<Response<ScanBaselineResponse>, Status> {
        let principal = caller(&request).principal()?.to_owned();
        let r = request.into_inner();
        let args = serde_json::json!({"node": r.node, "path": r.path, "apply_to": r.apply_to});
        let result: Result<Response<ScanBaselineResponse>, Status> = async {
            if !r.path.starts_with('/') {
                return Err(Status::invalid_argument(format!(
                    "path: {:?} is not absolute",
                    r.path
                )));
            }
            if r.node.is_empty() {
                return Err(Status::invalid_argument("node: name the reference host"));
            }
            let apply_to = if r.apply_to.is_empty() {
                r.node.clone()
            } else {
                r.apply_to
            };
            let scan_id = format!("scan-{}-{}", now_unix_nanos(), rand_suffix());
            let (id, node, path, to, who) = (
                scan_id.clone(),
                r.node.clone(),
                r.path.clone(),
                apply_to.clone(),
                principal.clone(),
            );
            self.blocking(move |c| c.start_scan(&id, &node, &path, &to, &who))
                .await?
                .map_err(|e| status_of(&e))?;
            match self.ingest.request_scan(&r.node, &scan_id, &r.path).await {
                Ok(()) => {
                    let id = scan_id.clone();
                    self.blocking(move |c| c.scan_sent(&id))
                        .await?
                        .map_err(|e| status_of(&e))?;
                }
                // Streaming to another replica: that one asks it (it
                // reads the scans not yet sent every second).
                Err(e) if self.ingest.connected_elsewhere(&r.node).await => {
                    tracing::debug!(%scan_id, node = %r.node, "the agent streams to another replica, which asks it: {}", e.message());
                }
                Err(e) => {
                    self.correlator.end_scan(&scan_id);
                    return Err(e);
                }
            }
            tracing::info!(%scan_id, node = %r.node, path = %r.path, %apply_to, "baseline scan requested");
            let timeout = Duration::from_secs(if r.timeout_seconds == 0 {
                300
            } else {
                u64::from(r.timeout_seconds)
            });
            match tokio::time::timeout(timeout, self.correlator.wait_scan(&scan_id)).await {
                Ok(Ok((files, errors, error))) => {
                    if !error.is_empty() && files == 0 {
                        return Err(Status::failed_precondition(format!(
                            "the scan on {} failed: {error}",
                            r.node
                        )));
                    }
                    Ok(Response::new(ScanBaselineResponse { files, errors }))
                }
                Ok(Err(e)) => Err(status_of(&e)),
                Err(_) => {
                    self.correlator.end_scan(&scan_id);
                    Err(Status::deadline_exceeded(format!(
                        "the agent of {} did not finish the scan within {}s",
                        r.node,
                        timeout.as_secs()
                    )))
                }
            }
        }
        .await;
        self.audited(&principal, "BaselineService/Scan", args, result)
            .await
    }

    async fn list(
        &self,
        request: Request<ListBaselinesRequest>,
    ) -> Result<Response<ListBaselinesResponse>, Status> {
        let r = request.into_inner();
        let baselines = self
            .blocking(move |c| c.with_tx(|tx| baselines::list(tx, &r.host, &r.path_prefix)))
            .await?
            .map_err(|e| status_of(&e))?
            .into_iter()
            .map(|mut b| {
                // Digests, mode and owner; the structure stays inside.
                b.state = driftwatch_proto::structure::without(b.state);
                b
            })
            .collect();
        Ok(Response::new(ListBaselinesResponse { baselines }))
    }
}

fn rand_suffix() -> u32 {
    std::process::id() ^ (now_unix_nanos() as u32).rotate_left(7)
}
