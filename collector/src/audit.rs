//! The audit log: every change a person makes through the API, and every
//! change refused, as an append-only chained record (see
//! [`driftwatch_proto::chain`]) in the store's `audit` tree.

use std::sync::Mutex;

use driftwatch_proto::{
    chain::{self, Link},
    time::now_unix_nanos,
    v1::AuditRecord,
};
use prost::Message as _;

use crate::store::{sled_store::SledStore as Store, StoreError};

/// The audit log.
pub struct Audit {
    store: Store,
    tree: sled::Tree,
    /// The last record's sequence number and chain value; appends take it
    /// in turn.
    head: Mutex<(u64, Link)>,
}

impl Audit {
    /// Opens the log in `store`, continuing its chain.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree("audit")?;
        let head = match tree.last()? {
            Some((_, v)) => {
                let r = AuditRecord::decode(&*v).map_err(|source| StoreError::Corrupt {
                    tree: "audit",
                    source,
                })?;
                (
                    r.seq,
                    r.chain.as_slice().try_into().unwrap_or(chain::GENESIS),
                )
            }
            None => (0, chain::GENESIS),
        };
        Ok(Self {
            store: store.clone(),
            tree,
            head: Mutex::new(head),
        })
    }

    /// Appends a record and makes it durable before returning.
    pub fn record(
        &self,
        principal: &str,
        call: &str,
        args: serde_json::Value,
        outcome: &str,
    ) -> Result<AuditRecord, StoreError> {
        let r = {
            let mut head = self
                .head
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut r = AuditRecord {
                seq: head.0 + 1,
                time_unix_nanos: now_unix_nanos(),
                principal: principal.to_owned(),
                call: call.to_owned(),
                args: args.to_string(),
                outcome: outcome.to_owned(),
                chain: Vec::new(),
            };
            let link = chain::link(&head.1, &r.encode_to_vec());
            r.chain = link.to_vec();
            self.tree.insert(r.seq.to_be_bytes(), r.encode_to_vec())?;
            *head = (r.seq, link);
            r
        };
        self.store.flush_blocking()?;
        Ok(r)
    }

    /// Records at or after `since`, oldest first: the newest `limit`.
    pub fn list(&self, since: i64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev() {
            let (_, v) = kv?;
            let r = AuditRecord::decode(&*v).map_err(|source| StoreError::Corrupt {
                tree: "audit",
                source,
            })?;
            if r.time_unix_nanos < since || out.len() >= limit {
                break;
            }
            out.push(r);
        }
        out.reverse();
        Ok(out)
    }

    /// The last record's sequence number and chain value.
    pub fn head(&self) -> (u64, Link) {
        *self
            .head
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
