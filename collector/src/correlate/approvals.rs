//! Change requests and access grants: filed by one principal, approved or
//! denied by another. An approved access request is a grant: the agents
//! open their kernel gate for its identity until it expires.
//!
//! Stored through a judging transaction ([`JudgeTx`]), each with the
//! changes recorded under it.

use driftwatch_proto::v1::{Approval, ApprovedChange, EvidenceRef, Grant};

use super::baselines::host_matches;
use crate::store::{judging::JudgeTx, StoreError};

/// Waiting for a decision.
pub const PENDING: &str = "pending";
/// Approved: matching changes are audit records.
pub const APPROVED: &str = "approved";
/// Denied.
pub const DENIED: &str = "denied";

/// Changes kept per approval.
const CHANGES_MAX: usize = 1000;
/// Events kept per access grant (the latest).
const USES_KEPT: usize = 20;
/// The kind of an access request.
pub const ACCESS: &str = "access";

/// Why a request or a decision was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// No such approval.
    #[error("no approval {0}")]
    NotFound(u64),
    /// The requester tried to approve their own request.
    #[error("approval {id} was requested by {requester}; a different principal must approve it (self-approval is refused)")]
    SelfApproval {
        /// The approval.
        id: u64,
        /// Its requester.
        requester: String,
    },
    /// Already decided.
    #[error("approval {id} is already {status}")]
    Decided {
        /// The approval.
        id: u64,
        /// Its status.
        status: String,
    },
    /// A field of the request is wrong.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The approvals one transaction judges by: the approved ones, read once
/// when first needed.
#[derive(Default)]
pub struct Approvals {
    approved: Option<Vec<Approval>>,
}

/// True when an approval's `resource` (a name, or an absolute path: a file,
/// or a tree ending in `/`) covers `path` of resource `name`.
pub fn covers(a: &Approval, name: &str, path: &str) -> bool {
    if a.resource.starts_with('/') {
        a.resource == path || driftwatch_proto::policy::covers(&a.resource, path)
    } else {
        a.resource == name
    }
}

/// Files a request: the backend issues its id.
pub fn request(tx: &mut dyn JudgeTx, mut a: Approval) -> Result<Approval, ApprovalError> {
    a.status = PENDING.into();
    tx.insert_approval(&mut a)?;
    Ok(a)
}

/// Approves or denies `id` as `principal`, with the approval held for the
/// transaction: of two decisions at once, the second finds it decided.
pub fn decide(
    tx: &mut dyn JudgeTx,
    id: u64,
    approve: bool,
    principal: &str,
    note: &str,
    now: i64,
) -> Result<Approval, ApprovalError> {
    let mut a = tx.approval(id)?.ok_or(ApprovalError::NotFound(id))?;
    if a.status != PENDING {
        return Err(ApprovalError::Decided {
            id,
            status: a.status,
        });
    }
    if a.requester == principal {
        return Err(ApprovalError::SelfApproval {
            id,
            requester: a.requester,
        });
    }
    a.status = if approve { APPROVED } else { DENIED }.into();
    a.approver = principal.to_owned();
    a.decided_unix_nanos = now;
    a.note = note.to_owned();
    if approve {
        a.valid_until_unix_nanos =
            now.saturating_add(a.window_seconds.saturating_mul(1_000_000_000));
    }
    tx.update_approval(&a)?;
    Ok(a)
}

/// The access grants in force at `now`.
pub fn grants(tx: &mut dyn JudgeTx, now: i64) -> Result<Vec<Grant>, StoreError> {
    Ok(tx
        .approvals(&[APPROVED])?
        .into_iter()
        .filter(|a| a.kind == ACCESS && a.valid_until_unix_nanos > now)
        .map(|a| Grant {
            id: a.id,
            resource: a.resource,
            who: a.who,
            valid_until_unix_nanos: a.valid_until_unix_nanos,
            host: a.host,
        })
        .collect())
}

/// Newest first, filtered by status.
pub fn list(tx: &mut dyn JudgeTx, statuses: &[String]) -> Result<Vec<Approval>, StoreError> {
    let statuses: Vec<&str> = statuses.iter().map(String::as_str).collect();
    let mut all = tx.approvals(&statuses)?;
    all.reverse();
    Ok(all)
}

/// Changes an approval in place (when it exists).
fn change(tx: &mut dyn JudgeTx, id: u64, f: impl FnOnce(&mut Approval)) -> Result<(), StoreError> {
    if let Some(mut a) = tx.approval(id)? {
        f(&mut a);
        tx.update_approval(&a)?;
    }
    Ok(())
}

/// Records a change under approval `id`.
pub fn add_change(tx: &mut dyn JudgeTx, id: u64, c: ApprovedChange) -> Result<(), StoreError> {
    change(tx, id, |a| {
        if a.changes.len() < CHANGES_MAX {
            a.changes.push(c);
        }
    })
}

/// Records an act under access grant `id`.
pub fn add_use(tx: &mut dyn JudgeTx, id: u64, e: EvidenceRef) -> Result<(), StoreError> {
    change(tx, id, |a| {
        a.uses += 1;
        a.use_evidence.push(e);
        if a.use_evidence.len() > USES_KEPT {
            a.use_evidence.remove(0);
        }
    })
}

/// Records findings resolved by approval `id`.
pub fn add_resolved(tx: &mut dyn JudgeTx, id: u64, findings: &[u64]) -> Result<(), StoreError> {
    if findings.is_empty() {
        return Ok(());
    }
    change(tx, id, |a| a.resolved_findings.extend_from_slice(findings))
}

/// The access grant `id` when it covers an act on `resource` by `node`
/// at `time`.
pub fn grant_covering(
    tx: &mut dyn JudgeTx,
    id: u64,
    node: &str,
    resource: &str,
    time: i64,
) -> Result<Option<Approval>, StoreError> {
    Ok(tx.approval(id)?.filter(|a| {
        a.kind == ACCESS
            && a.status == APPROVED
            && a.resource == resource
            && host_matches(&a.host, node)
            && time >= a.decided_unix_nanos
            && time <= a.valid_until_unix_nanos
    }))
}

impl Approvals {
    /// The approved request covering a change of `path` (resource `name`)
    /// on `node` at `time` that left content `sha256` (empty: the file is
    /// gone). The window runs from the request until the approval's end.
    pub fn matching(
        &mut self,
        tx: &mut dyn JudgeTx,
        node: &str,
        name: &str,
        path: &str,
        time: i64,
        sha256: Option<&str>,
    ) -> Result<Option<Approval>, StoreError> {
        if self.approved.is_none() {
            self.approved = Some(tx.approvals(&[APPROVED])?);
        }
        let all = self.approved.as_deref().unwrap_or_default();
        Ok(all
            .iter()
            .rev()
            .find(|a| {
                a.status == APPROVED
                    && a.kind != ACCESS
                    && host_matches(&a.host, node)
                    && covers(a, name, path)
                    && time >= a.requested_unix_nanos
                    && time <= a.valid_until_unix_nanos
                    && match sha256 {
                        Some(s) => a.sha256.is_empty() || a.sha256 == s,
                        None => true,
                    }
            })
            .cloned())
    }
}
