//! Change requests and access grants: filed by one principal, approved or
//! denied by another. An approved access request is a grant: the agents
//! open their kernel gate for its identity until it expires.
//!
//! Tree `approvals`: id (u64, big-endian) → `Approval`, with the changes
//! recorded under it. All of them are also kept in memory.

use driftwatch_proto::v1::{Approval, ApprovedChange, EvidenceRef, Grant};
use prost::Message as _;

use super::baselines::host_matches;
use crate::store::{sled_store::SledStore as Store, StoreError};

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

/// The approvals.
pub struct Approvals {
    tree: sled::Tree,
    all: Vec<Approval>,
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

impl Approvals {
    /// Opens and loads the tree.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree("approvals")?;
        let mut all = Vec::new();
        for kv in tree.iter() {
            let (_, v) = kv?;
            all.push(Approval::decode(&*v).map_err(|source| StoreError::Corrupt {
                tree: "approvals",
                source,
            })?);
        }
        Ok(Self { tree, all })
    }

    fn save(&self, a: &Approval) -> Result<(), StoreError> {
        self.tree.insert(a.id.to_be_bytes(), a.encode_to_vec())?;
        Ok(())
    }

    /// Files a request.
    pub fn request(&mut self, mut a: Approval) -> Result<Approval, ApprovalError> {
        a.id = self.all.iter().map(|a| a.id).max().unwrap_or(0) + 1;
        a.status = PENDING.into();
        self.save(&a)?;
        self.all.push(a.clone());
        Ok(a)
    }

    /// Approves or denies `id` as `principal`.
    pub fn decide(
        &mut self,
        id: u64,
        approve: bool,
        principal: &str,
        note: &str,
        now: i64,
    ) -> Result<Approval, ApprovalError> {
        let a = self
            .all
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or(ApprovalError::NotFound(id))?;
        if a.status != PENDING {
            return Err(ApprovalError::Decided {
                id,
                status: a.status.clone(),
            });
        }
        if a.requester == principal {
            return Err(ApprovalError::SelfApproval {
                id,
                requester: a.requester.clone(),
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
        let a = a.clone();
        self.save(&a)?;
        Ok(a)
    }

    /// The approved request covering a change of `path` (resource `name`)
    /// on `node` at `time` that left content `sha256` (empty: the file is
    /// gone). The window runs from the request until the approval's end.
    pub fn matching(
        &self,
        node: &str,
        name: &str,
        path: &str,
        time: i64,
        sha256: Option<&str>,
    ) -> Option<&Approval> {
        self.all.iter().rev().find(|a| {
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
    }

    /// Records a change under approval `id`.
    pub fn add_change(&mut self, id: u64, c: ApprovedChange) -> Result<(), StoreError> {
        if let Some(a) = self.all.iter_mut().find(|a| a.id == id) {
            if a.changes.len() < CHANGES_MAX {
                a.changes.push(c);
            }
            let a = a.clone();
            self.save(&a)?;
        }
        Ok(())
    }

    /// The access grants in force at `now`.
    pub fn grants(&self, now: i64) -> Vec<Grant> {
        self.all
            .iter()
            .filter(|a| a.kind == ACCESS && a.status == APPROVED && a.valid_until_unix_nanos > now)
            .map(|a| Grant {
                id: a.id,
                resource: a.resource.clone(),
                who: a.who.clone(),
                valid_until_unix_nanos: a.valid_until_unix_nanos,
                host: a.host.clone(),
            })
            .collect()
    }

    /// The access grant `id` when it covers an act on `resource` by `node`
    /// at `time`.
    pub fn grant_covering(
        &self,
        id: u64,
        node: &str,
        resource: &str,
        time: i64,
    ) -> Option<&Approval> {
        self.get(id).filter(|a| {
            a.kind == ACCESS
                && a.status == APPROVED
                && a.resource == resource
                && host_matches(&a.host, node)
                && time >= a.decided_unix_nanos
                && time <= a.valid_until_unix_nanos
        })
    }

    /// Records an act under access grant `id`.
    pub fn add_use(&mut self, id: u64, e: EvidenceRef) -> Result<(), StoreError> {
        if let Some(a) = self.all.iter_mut().find(|a| a.id == id) {
            a.uses += 1;
            a.use_evidence.push(e);
            if a.use_evidence.len() > USES_KEPT {
                a.use_evidence.remove(0);
            }
            let a = a.clone();
            self.save(&a)?;
        }
        Ok(())
    }

    /// Records findings resolved by approval `id`.
    pub fn add_resolved(&mut self, id: u64, findings: &[u64]) -> Result<(), StoreError> {
        if let Some(a) = self.all.iter_mut().find(|a| a.id == id) {
            a.resolved_findings.extend_from_slice(findings);
            let a = a.clone();
            self.save(&a)?;
        }
        Ok(())
    }

    /// One approval.
    pub fn get(&self, id: u64) -> Option<&Approval> {
        self.all.iter().find(|a| a.id == id)
    }

    /// Newest first, filtered by status.
    pub fn list(&self, statuses: &[String]) -> Vec<Approval> {
        self.all
            .iter()
            .rev()
            .filter(|a| statuses.is_empty() || statuses.contains(&a.status))
            .cloned()
            .collect()
    }

    /// The id of the next change record.
    pub fn next_change_id(&self) -> u64 {
        self.all.iter().map(|a| a.changes.len() as u64).sum::<u64>() + 1
    }
}
