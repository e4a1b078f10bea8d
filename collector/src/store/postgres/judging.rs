//! The judging state on PostgreSQL: what replicas over one database decide
//! together.
//!
//! Tables (schema version 2):
//! - `dw_cursors (node) → seq, time`: locked (`FOR UPDATE`) by the
//!   transaction judging the node, so two replicas never judge one event
//!   twice;
//! - `dw_path_state (node, path) → state`;
//! - `dw_findings (id bigserial) → open_key, kind, status, changed,
//!   finding`: `open_key` (bytes: keys join their parts with NUL) is unique and `NULL` once resolved, so an
//!   occurrence judged on two replicas at once folds into one finding (the
//!   second insert finds the key taken and updates the first's row);
//!   `changed` is the change-log cursor, issued at commit under the lock of
//!   `dw_finding_seq`, so cursors follow commit order;
//! - `dw_baselines (path, host) → baseline`;
//! - `dw_approvals (id bigserial) → status, requester, approver, approval`,
//!   with `CHECK (approver = '' OR approver <> requester)`: no replica, and
//!   no client of the database, can record a self-approval;
//! - `dw_change_ids`: the ids of approved-change records;
//! - `dw_scans (id) → scan`.
//!
//! A transaction commits with `synchronous_commit = on`: a decision, a
//! finding's acknowledgement or a judged batch is on disk when its caller
//! is told. One aborted by the server for a deadlock or a serialization
//! failure runs again (up to [`ATTEMPTS`] times).

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::Object;
use driftwatch_proto::v1::{Approval, Baseline, Finding};
use prost::Message as _;
use tokio_postgres::error::SqlState;

use super::{backend, decode, sql, PgLog};
use crate::store::{
    judging::{JudgeTx, Judging, ScanRecord, Work},
    StoreError,
};

/// Runs of a transaction the server keeps aborting for deadlocks.
const ATTEMPTS: usize = 8;

/// Findings read per page when listing.
const LIST_PAGE: i64 = 256;

/// The judging tables (schema version 2).
pub(super) const MIGRATION: &str = r#"
CREATE TABLE dw_cursors (
    node text COLLATE "C" PRIMARY KEY,
    seq bigint NOT NULL,
    time bigint NOT NULL
);
CREATE TABLE dw_path_state (
    node text COLLATE "C" NOT NULL,
    path text COLLATE "C" NOT NULL,
    state bytea NOT NULL,
    PRIMARY KEY (node, path)
);
CREATE TABLE dw_findings (
    id bigserial PRIMARY KEY,
    open_key bytea UNIQUE,
    kind text NOT NULL,
    status text NOT NULL,
    changed bigint NOT NULL DEFAULT 0,
    finding bytea NOT NULL
);
CREATE INDEX dw_findings_changed ON dw_findings (changed);
CREATE TABLE dw_finding_seq (id int PRIMARY KEY, v bigint NOT NULL);
INSERT INTO dw_finding_seq VALUES (1, 0);
CREATE TABLE dw_baselines (
    path text COLLATE "C" NOT NULL,
    host text COLLATE "C" NOT NULL,
    baseline bytea NOT NULL,
    PRIMARY KEY (path, host)
);
CREATE TABLE dw_approvals (
    id bigserial PRIMARY KEY,
    status text NOT NULL,
    requester text NOT NULL,
    approver text NOT NULL,
    approval bytea NOT NULL,
    CONSTRAINT dw_no_self_approval CHECK (approver = '' OR approver <> requester)
);
CREATE INDEX dw_approvals_status ON dw_approvals (status);
CREATE SEQUENCE dw_change_ids;
CREATE TABLE dw_scans (
    id text COLLATE "C" PRIMARY KEY,
    scan bytea NOT NULL
);
"#;

/// Reads the newest finding-change cursor every half second, so that
/// `findings watch` on this replica sees what other replicas committed.
pub(super) fn spawn_change_poll(log: &PgLog) {
    let Some(rt) = log.rt.as_ref() else { return };
    let (pool, latest) = (log.pool.clone(), log.finding_changes.clone());
    rt.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            let read = async {
                let db = pool.get().await.map_err(StoreError::from)?;
                let row =
                    sql::query_one(&db, "SELECT v FROM dw_finding_seq WHERE id = 1", &[]).await?;
                Ok::<i64, StoreError>(row.try_get(0)?)
            };
            match read.await {
                Ok(v) => {
                    let v = u64::try_from(v).unwrap_or(0);
                    latest.send_if_modified(|l| {
                        if v > *l {
                            *l = v;
                            return true;
                        }
                        false
                    });
                }
                Err(e) => tracing::debug!("reading the finding-change cursor: {e}"),
            }
        }
    });
}

fn id_sql(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

fn id_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// True for what a second run of the transaction may get past.
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// One transaction on a connection of the pool.
struct PgTx<'a> {
    log: &'a PgLog,
    /// Taken out when the transaction ends.
    db: Option<Object>,
    /// Findings written, for their change-log cursors at commit.
    changed: BTreeSet<u64>,
    /// The server aborted a statement for a deadlock or a serialization
    /// failure: the whole transaction may run again.
    retry: bool,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        // Never hand a connection back in the middle of a transaction (a
        // panic in the rules): closing it makes the server roll back.
        if let Some(db) = self.db.take() {
            drop(Object::take(db));
        }
    }
}

impl PgTx<'_> {
    fn db(&self) -> Result<&Object, StoreError> {
        self.db
            .as_ref()
            .ok_or_else(|| backend("the transaction already ended"))
    }

    fn rows(
        &mut self,
        q: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let db = self.db()?;
        let out = self.log.block_on(sql::query(db, q, params));
        self.noted(out)
    }

    /// A statement's result, noting whether its failure is one the whole
    /// transaction may get past when run again.
    fn noted<T>(&mut self, out: Result<T, tokio_postgres::Error>) -> Result<T, StoreError> {
        out.map_err(|e| {
            self.retry |= retryable(&e);
            e.into()
        })
    }

    fn exec(
        &mut self,
        q: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let db = self.db()?;
        let out = self.log.block_on(sql::execute(db, q, params));
        self.noted(out)
    }

    fn bytes_rows<M: prost::Message + Default>(
        &mut self,
        table: &'static str,
        q: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<M>, StoreError> {
        let mut out = Vec::new();
        for r in self.rows(q, params)? {
            let v: Vec<u8> = r.try_get(0)?;
            out.push(decode(table, &v)?);
        }
        Ok(out)
    }

    /// Issues the change-log cursors of the findings written and commits.
    fn commit(&mut self) -> Result<Option<u64>, StoreError> {
        let mut latest = None;
        if !self.changed.is_empty() {
            let ids: Vec<i64> = self.changed.iter().map(|id| id_sql(*id)).collect();
            let n = ids.len() as i64;
            // The lock of the counter's row is held to the commit: cursors
            // are issued in commit order, one per finding, in id order.
            let rows = self.rows(
                "WITH s AS (UPDATE dw_finding_seq SET v = v + $1 WHERE id = 1 RETURNING v)                  UPDATE dw_findings f SET changed = s.v - $1 + c.ord                  FROM s, unnest($2::bigint[]) WITH ORDINALITY AS c(id, ord)                  WHERE f.id = c.id RETURNING s.v",
                &[&n, &ids],
            )?;
            let last: i64 = rows
                .first()
                .ok_or_else(|| backend("no finding took a change cursor"))?
                .try_get(0)?;
            latest = Some(id_of(last));
        }
        let db = self.db()?;
        let done = self.log.block_on(db.batch_execute("COMMIT"));
        self.noted(done)?;
        // Back to the pool only now, outside any transaction.
        drop(self.db.take());
        Ok(latest)
    }

    /// Ends a failed transaction; a connection that cannot roll back is
    /// closed instead of going back to the pool.
    fn rollback(&mut self) {
        let Some(db) = self.db.take() else { return };
        if self.log.block_on(db.batch_execute("ROLLBACK")).is_err() {
            drop(Object::take(db));
        }
    }
}

impl Judging for PgLog {
    fn transact(&self, work: &mut Work<'_>) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            let db = self.block_on(self.pool.get())?;
            self.block_on(db.batch_execute("BEGIN; SET LOCAL synchronous_commit = on"))?;
            let mut tx = PgTx {
                log: self,
                db: Some(db),
                changed: BTreeSet::new(),
                retry: false,
            };
            let done = work(&mut tx).and_then(|()| tx.commit());
            match done {
                Ok(latest) => {
                    if let Some(v) = latest {
                        self.finding_changes.send_if_modified(|l| {
                            if v > *l {
                                *l = v;
                                return true;
                            }
                            false
                        });
                    }
                    return Ok(());
                }
                Err(e) => {
                    tx.rollback();
                    if !tx.retry || attempt >= ATTEMPTS {
                        return Err(e);
                    }
                    tracing::debug!(attempt, "a judging transaction runs again: {e}");
                    attempt += 1;
                }
            }
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every judging transaction commits synchronously.
        Ok(())
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finding_changes.subscribe()
    }
}

impl JudgeTx for PgTx<'_> {
    fn cursor(&mut self, node: &str) -> Result<(u64, i64), StoreError> {
        // One round trip: the no-op update locks the row (made if new)
        // and returns what it holds.
        let rows = self.rows(
            "INSERT INTO dw_cursors VALUES ($1, 0, 0)              ON CONFLICT (node) DO UPDATE SET node = excluded.node RETURNING seq, time",
            &[&node],
        )?;
        match rows.first() {
            Some(r) => Ok((id_of(r.try_get(0)?), r.try_get(1)?)),
            None => Ok((0, 0)),
        }
    }

    fn set_cursor(&mut self, node: &str, seq: u64, time: i64) -> Result<(), StoreError> {
        self.exec(
            "UPDATE dw_cursors SET seq = $2, time = $3 WHERE node = $1",
            &[&node, &id_sql(seq), &time],
        )?;
        Ok(())
    }

    fn path_state(&mut self, node: &str, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.rows(
            "SELECT state FROM dw_path_state WHERE node = $1 AND path = $2",
            &[&node, &path],
        )?;
        rows.first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(Into::into)
    }

    fn set_path_state(
        &mut self,
        node: &str,
        path: &str,
        state: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        match state {
            Some(s) => self.exec(
                "INSERT INTO dw_path_state VALUES ($1, $2, $3) \
                 ON CONFLICT (node, path) DO UPDATE SET state = excluded.state",
                &[&node, &path, &s],
            )?,
            None => self.exec(
                "DELETE FROM dw_path_state WHERE node = $1 AND path = $2",
                &[&node, &path],
            )?,
        };
        Ok(())
    }

    fn path_states(
        &mut self,
        node: &str,
        paths: &[&str],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let list: Vec<&str> = paths.to_vec();
        let mut found = std::collections::HashMap::new();
        for r in self.rows(
            "SELECT path, state FROM dw_path_state WHERE node = $1 AND path = ANY($2)",
            &[&node, &list],
        )? {
            let p: String = r.try_get(0)?;
            let v: Vec<u8> = r.try_get(1)?;
            found.insert(p, v);
        }
        Ok(paths.iter().map(|p| found.remove(*p)).collect())
    }

    fn set_path_states(
        &mut self,
        node: &str,
        states: &[(&str, Option<&[u8]>)],
    ) -> Result<(), StoreError> {
        let (mut put_paths, mut put_states, mut gone) = (Vec::new(), Vec::new(), Vec::new());
        for (p, s) in states {
            match s {
                Some(s) => {
                    put_paths.push(*p);
                    put_states.push(*s);
                }
                None => gone.push(*p),
            }
        }
        if !put_paths.is_empty() {
            self.exec(
                "INSERT INTO dw_path_state SELECT $1, p, s FROM unnest($2::text[], $3::bytea[]) AS u(p, s) \
                 ON CONFLICT (node, path) DO UPDATE SET state = excluded.state",
                &[&node, &put_paths, &put_states],
            )?;
        }
        if !gone.is_empty() {
            self.exec(
                "DELETE FROM dw_path_state WHERE node = $1 AND path = ANY($2)",
                &[&node, &gone],
            )?;
        }
        Ok(())
    }

    fn open_findings(&mut self, keys: &[&str]) -> Result<Vec<Option<Finding>>, StoreError> {
        let list: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let mut found = std::collections::HashMap::new();
        for r in self.rows(
            "SELECT open_key, finding FROM dw_findings WHERE open_key = ANY($1) ORDER BY id FOR UPDATE",
            &[&list],
        )? {
            let k: Vec<u8> = r.try_get(0)?;
            let v: Vec<u8> = r.try_get(1)?;
            found.insert(k, decode::<Finding>("findings", &v)?);
        }
        Ok(keys.iter().map(|k| found.remove(k.as_bytes())).collect())
    }

    fn open_finding(&mut self, key: &str) -> Result<Option<Finding>, StoreError> {
        Ok(self
            .bytes_rows(
                "findings",
                "SELECT finding FROM dw_findings WHERE open_key = $1 FOR UPDATE",
                &[&key.as_bytes()],
            )?
            .pop())
    }

    fn finding(&mut self, id: u64) -> Result<Option<Finding>, StoreError> {
        Ok(self
            .bytes_rows(
                "findings",
                "SELECT finding FROM dw_findings WHERE id = $1",
                &[&id_sql(id)],
            )?
            .pop())
    }

    fn insert_finding(&mut self, key: &str, f: &mut Finding) -> Result<bool, StoreError> {
        // A key another transaction holds waits for it; once it committed,
        // nothing is inserted.
        let rows = self.rows(
            "INSERT INTO dw_findings (open_key, kind, status, finding) VALUES ($1, $2, $3, '') \
             ON CONFLICT (open_key) DO NOTHING RETURNING id",
            &[&key.as_bytes(), &f.kind, &f.status],
        )?;
        let Some(r) = rows.first() else {
            return Ok(false);
        };
        f.id = id_of(r.try_get(0)?);
        self.exec(
            "UPDATE dw_findings SET finding = $2 WHERE id = $1",
            &[&id_sql(f.id), &f.encode_to_vec()],
        )?;
        self.changed.insert(f.id);
        Ok(true)
    }

    fn update_finding(&mut self, f: &Finding) -> Result<(), StoreError> {
        self.exec(
            "UPDATE dw_findings SET finding = $2, status = $3, \
             open_key = CASE WHEN $3 = 'resolved' THEN NULL ELSE open_key END WHERE id = $1",
            &[&id_sql(f.id), &f.encode_to_vec(), &f.status],
        )?;
        self.changed.insert(f.id);
        Ok(())
    }

    fn update_findings(&mut self, fs: &[Finding]) -> Result<(), StoreError> {
        let ids: Vec<i64> = fs.iter().map(|f| id_sql(f.id)).collect();
        let bodies: Vec<Vec<u8>> = fs.iter().map(prost::Message::encode_to_vec).collect();
        let statuses: Vec<&str> = fs.iter().map(|f| f.status.as_str()).collect();
        self.exec(
            "UPDATE dw_findings f SET finding = c.finding, status = c.status,              open_key = CASE WHEN c.status = 'resolved' THEN NULL ELSE f.open_key END              FROM unnest($1::bigint[], $2::bytea[], $3::text[]) AS c(id, finding, status)              WHERE f.id = c.id",
            &[&ids, &bodies, &statuses],
        )?;
        self.changed.extend(fs.iter().map(|f| f.id));
        Ok(())
    }

    fn unresolved(&mut self) -> Result<Vec<Finding>, StoreError> {
        self.bytes_rows(
            "findings",
            "SELECT finding FROM dw_findings WHERE open_key IS NOT NULL ORDER BY id",
            &[],
        )
    }

    fn open_by_kind(&mut self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for r in self.rows(
            "SELECT kind, count(*) FROM dw_findings WHERE open_key IS NOT NULL GROUP BY kind",
            &[],
        )? {
            let n: i64 = r.try_get(1)?;
            out.insert(r.try_get(0)?, id_of(n));
        }
        Ok(out)
    }

    fn findings(
        &mut self,
        limit: usize,
        keep: &dyn Fn(&Finding) -> bool,
    ) -> Result<Vec<Finding>, StoreError> {
        let mut out = Vec::new();
        let mut before = i64::MAX;
        loop {
            let rows = self.rows(
                "SELECT id, finding FROM dw_findings WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before, &LIST_PAGE],
            )?;
            let full = rows.len() as i64 == LIST_PAGE;
            for r in rows {
                before = r.try_get(0)?;
                let v: Vec<u8> = r.try_get(1)?;
                let f: Finding = decode("findings", &v)?;
                if keep(&f) {
                    out.push(f);
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        }
    }

    fn changes_after(
        &mut self,
        cursor: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Finding)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for r in self.rows(
            "SELECT changed, finding FROM dw_findings WHERE changed > $1 ORDER BY changed LIMIT $2",
            &[&id_sql(cursor), &limit],
        )? {
            let at: i64 = r.try_get(0)?;
            let v: Vec<u8> = r.try_get(1)?;
            out.push((id_of(at), decode("findings", &v)?));
        }
        Ok(out)
    }

    fn baselines_of(&mut self, path: &str) -> Result<Vec<Baseline>, StoreError> {
        self.bytes_rows(
            "baselines",
            "SELECT baseline FROM dw_baselines WHERE path = $1",
            &[&path],
        )
    }

    fn baselines_of_paths(&mut self, paths: &[&str]) -> Result<Vec<Baseline>, StoreError> {
        let list: Vec<&str> = paths.to_vec();
        self.bytes_rows(
            "baselines",
            "SELECT baseline FROM dw_baselines WHERE path = ANY($1)",
            &[&list],
        )
    }

    fn put_baseline(&mut self, b: &Baseline) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO dw_baselines VALUES ($1, $2, $3) \
             ON CONFLICT (path, host) DO UPDATE SET baseline = excluded.baseline",
            &[&b.path, &b.host, &b.encode_to_vec()],
        )?;
        Ok(())
    }

    fn remove_baseline(&mut self, host: &str, path: &str) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM dw_baselines WHERE path = $1 AND host = $2",
            &[&path, &host],
        )?;
        Ok(())
    }

    fn baselines(&mut self, host: &str, prefix: &str) -> Result<Vec<Baseline>, StoreError> {
        self.bytes_rows(
            "baselines",
            "SELECT baseline FROM dw_baselines WHERE ($1 = '' OR host = $1) \
             AND starts_with(path, $2) ORDER BY host, path",
            &[&host, &prefix],
        )
    }

    fn approvals(&mut self, statuses: &[&str]) -> Result<Vec<Approval>, StoreError> {
        let statuses: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
        self.bytes_rows(
            "approvals",
            "SELECT approval FROM dw_approvals \
             WHERE cardinality($1::text[]) = 0 OR status = ANY($1) ORDER BY id",
            &[&statuses],
        )
    }

    fn approval(&mut self, id: u64) -> Result<Option<Approval>, StoreError> {
        Ok(self
            .bytes_rows(
                "approvals",
                "SELECT approval FROM dw_approvals WHERE id = $1 FOR UPDATE",
                &[&id_sql(id)],
            )?
            .pop())
    }

    fn insert_approval(&mut self, a: &mut Approval) -> Result<(), StoreError> {
        let rows = self.rows(
            "INSERT INTO dw_approvals (status, requester, approver, approval) \
             VALUES ($1, $2, $3, '') RETURNING id",
            &[&a.status, &a.requester, &a.approver],
        )?;
        let r = rows
            .first()
            .ok_or_else(|| backend("an approval insert returned no id"))?;
        a.id = id_of(r.try_get(0)?);
        self.update_approval(a)
    }

    fn update_approval(&mut self, a: &Approval) -> Result<(), StoreError> {
        self.exec(
            "UPDATE dw_approvals SET status = $2, approver = $3, approval = $4 WHERE id = $1",
            &[&id_sql(a.id), &a.status, &a.approver, &a.encode_to_vec()],
        )?;
        Ok(())
    }

    fn next_change_id(&mut self) -> Result<u64, StoreError> {
        let rows = self.rows("SELECT nextval('dw_change_ids')", &[])?;
        let r = rows
            .first()
            .ok_or_else(|| backend("nextval returned no row"))?;
        Ok(id_of(r.try_get(0)?))
    }

    fn scan(&mut self, id: &str) -> Result<Option<ScanRecord>, StoreError> {
        let rows = self.rows("SELECT scan FROM dw_scans WHERE id = $1", &[&id])?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let v: Vec<u8> = r.try_get(0)?;
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| backend(format!("scan record {id}: {e}")))
    }

    fn put_scan(&mut self, id: &str, scan: &ScanRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(scan).map_err(|e| backend(format!("a scan record: {e}")))?;
        self.exec(
            "INSERT INTO dw_scans VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET scan = excluded.scan",
            &[&id, &v],
        )?;
        Ok(())
    }

    fn scans(&mut self) -> Result<Vec<(String, ScanRecord)>, StoreError> {
        let mut out = Vec::new();
        for r in self.rows("SELECT id, scan FROM dw_scans ORDER BY id", &[])? {
            let id: String = r.try_get(0)?;
            let v: Vec<u8> = r.try_get(1)?;
            match serde_json::from_slice(&v) {
                Ok(s) => out.push((id, s)),
                Err(e) => {
                    tracing::warn!(scan_id = %id, "an unreadable scan record is ignored: {e}")
                }
            }
        }
        Ok(out)
    }

    fn remove_scan(&mut self, id: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM dw_scans WHERE id = $1", &[&id])?;
        Ok(())
    }
}
