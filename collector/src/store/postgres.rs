//! The event log on PostgreSQL, for collectors that outgrow one node or run
//! as replicas over one database.
//!
//! Tables (schema version [`SCHEMA_VERSION`], applied at start):
//! - `dw_blocks (node, bucket, first_seq) → data`: the same LZ4 blocks as
//!   sled's, partitioned by day of `bucket` (`dw_blocks_d<day>`), so that
//!   retention drops whole tables;
//! - `dw_by_exec (exec_id, bucket, node, first_seq)` and
//!   `dw_by_dir (dir, bucket, node, first_seq)`: the timeline indexes,
//!   partitioned the same way;
//! - `dw_agents (node) → status` and `dw_gaps (node, time, from_seq) → gap`;
//! - the judging state (findings, approvals, baselines, cursors): see
//!   [`judging`].
//!
//! Text keys are `COLLATE "C"`: byte order, as in sled, and directory
//! prefixes served by the index.
//!
//! An append is one transaction: the agent's row is locked first (`FOR
//! UPDATE`), so two replicas that both hold a stream of one node (an agent
//! that moved while the old stream lingered) append one after the other,
//! and the second sees the first's acked sequence and skips what it stored.
//! Appends commit with `synchronous_commit = off`; [`EventLog::flush`]
//! commits one write with it on, which makes every earlier commit durable
//! (the WAL is flushed in order): the group commit acks exactly what is on
//! disk, as with sled.
//!
//! The client runs on a runtime of its own: the [`EventLog`] calls are
//! synchronous (the judging code and sled are), and a call from the main
//! runtime's threads waits on a scoped thread instead of blocking the
//! runtime that drives the database connections.

use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use driftwatch_proto::v1::{AgentStatus, Event, Gap, NodeInfo};
use prost::Message as _;
use tokio_postgres::NoTls;

mod judging;

use super::{
    bucket, chain_head, check_gap, cut_blocks, decode_block, in_scope, keep_log_fields, moves_ack,
    new_agent, plan, prefix_dir, same_event, Appended, Blocks, EventLog, FollowFeed, PageFill,
    Scope, StoreError, BLOCK_EVENTS, BUCKET_NS,
};

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = 2;

/// Migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE dw_agents (
    node text COLLATE "C" PRIMARY KEY,
    status bytea NOT NULL
);
CREATE TABLE dw_gaps (
    node text COLLATE "C" NOT NULL,
    time bigint NOT NULL,
    from_seq bigint NOT NULL,
    gap bytea NOT NULL,
    PRIMARY KEY (node, time, from_seq)
);
CREATE TABLE dw_blocks (
    node text COLLATE "C" NOT NULL,
    bucket bigint NOT NULL,
    first_seq bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (node, bucket, first_seq)
) PARTITION BY RANGE (bucket);
-- Blocks are LZ4 already: stored out of line without a second compression.
ALTER TABLE dw_blocks ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE INDEX dw_blocks_by_seq ON dw_blocks (node, first_seq);
CREATE TABLE dw_by_exec (
    exec_id text COLLATE "C" NOT NULL,
    bucket bigint NOT NULL,
    node text COLLATE "C" NOT NULL,
    first_seq bigint NOT NULL,
    PRIMARY KEY (exec_id, bucket, node, first_seq)
) PARTITION BY RANGE (bucket);
CREATE TABLE dw_by_dir (
    dir text COLLATE "C" NOT NULL,
    bucket bigint NOT NULL,
    node text COLLATE "C" NOT NULL,
    first_seq bigint NOT NULL,
    PRIMARY KEY (dir, bucket, node, first_seq)
) PARTITION BY RANGE (bucket);
CREATE TABLE dw_flush (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO dw_flush VALUES (1, 0);
"#,
    judging::MIGRATION,
];

/// The partitioned tables, each cut by day.
const PARTITIONED: [&str; 3] = ["dw_blocks", "dw_by_exec", "dw_by_dir"];

/// Width of a partition.
const DAY_NS: i64 = 86_400 * 1_000_000_000;

/// An append found no partition for a day it had created (see `append`).
const MISSING_PARTITION: &str = "postgres: no partition for a day of the batch";

/// Rows a timeline read fetches from one run at a time.
const PAGE_ROWS: i64 = 64;

/// Connections kept open to the database.
const POOL_SIZE: usize = 16;

/// A lock id for migrations (any constant shared by every replica).
const MIGRATION_LOCK: i64 = 0x6472_6966_7477_6368; // "driftwch"

/// Statements prepared once per connection (a text query is a Parse and a
/// Bind round trip each time; a prepared one is a Bind).
mod sql {
    use deadpool_postgres::GenericClient;
    use tokio_postgres::{types::ToSql, Error, Row};

    pub async fn execute<C: GenericClient>(
        db: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let st = db.prepare_cached(sql).await?;
        db.execute(&st, params).await
    }

    pub async fn query<C: GenericClient>(
        db: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let st = db.prepare_cached(sql).await?;
        db.query(&st, params).await
    }

    pub async fn query_opt<C: GenericClient>(
        db: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let st = db.prepare_cached(sql).await?;
        db.query_opt(&st, params).await
    }

    pub async fn query_one<C: GenericClient>(
        db: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let st = db.prepare_cached(sql).await?;
        db.query_one(&st, params).await
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("postgres: {e}"))
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message (and its detail) says what went wrong.
        match e.as_db_error() {
            Some(db) => backend(format!(
                "{}{}",
                db.message(),
                db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
            )),
            None => backend(with_causes(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        backend(with_causes(&e))
    }
}

/// An error with the causes under it (a TLS handshake failure says why:
/// the certificate's issuer is unknown, its name does not match).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn decode<M: prost::Message + Default>(tree: &'static str, v: &[u8]) -> Result<M, StoreError> {
    M::decode(v).map_err(|source| StoreError::Corrupt { tree, source })
}

/// A sequence number as a bigint (validated events stay below 2^62).
fn seq_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The day (partition) of a bucket.
fn day_of(bucket: i64) -> i64 {
    bucket.div_euclid(DAY_NS)
}

fn partition_name(table: &str, day: i64) -> String {
    if day < 0 {
        format!("{table}_dm{}", day.unsigned_abs())
    } else {
        format!("{table}_d{day}")
    }
}

/// A random id for this process among the replicas.
fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The TLS settings for the database: its certificate checked against `ca`
/// or the system's roots.
fn tls_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, StoreError> {
    use rustls_pki_types::{pem::PemObject as _, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| backend(format!("reading the store CA {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(backend(format!(
                    "the store CA {} holds no certificate",
                    path.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| backend(format!("the store CA {}: {e}", path.display())))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // A system root rustls cannot parse is skipped, as a
                // browser would.
                let _ = roots.add(c);
            }
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The event log in a PostgreSQL database.
pub struct PgLog {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    target: String,
    /// For the connection that listens to other replicas' appends.
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// This process among the replicas, in its notifications.
    replica: u64,
    /// The server runs (postmaster start times) the appends since the last
    /// flush committed to.
    unflushed: Mutex<HashSet<String>>,
    /// Days whose partitions are known to exist.
    days: Mutex<HashSet<i64>>,
    /// The newest finding-change cursor (see [`judging`]).
    finding_changes: tokio::sync::watch::Sender<u64>,
}

impl Drop for PgLog {
    fn drop(&mut self) {
        // Dropped from async code too (the collector stopping): never wait
        // for the runtime's threads there.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One scope value's entries in timeline order, fetched a page at a time.
struct Run {
    /// `blocks` (a node's blocks), `exec` or `dir` (index entries).
    kind: RunKind,
    value: String,
    /// The last key read: (bucket, node, first_seq).
    after: (i64, String, i64),
    until: i64,
    rows: VecDeque<Row>,
    exhausted: bool,
    /// Rows the next fetch asks for: a few at first (a first page over
    /// many directories reads a few blocks of each), doubling up to
    /// [`PAGE_ROWS`] as the run is read on.
    page: i64,
}

#[derive(Clone, Copy, PartialEq)]
enum RunKind {
    Blocks,
    Exec,
    Dir,
}

/// A block (or an index entry and the block it points at, `None` once
/// retention removed it).
struct Row {
    bucket: i64,
    node: String,
    first_seq: i64,
    data: Option<Vec<u8>>,
}

impl Run {
    async fn next(&mut self, db: &impl GenericClient) -> Result<Option<Row>, StoreError> {
        if self.rows.is_empty() && !self.exhausted {
            let (b, n, s) = &self.after;
            let rows = match self.kind {
                RunKind::Blocks => {
                    sql::query(
                        db,
                        "SELECT bucket, node, first_seq, data FROM dw_blocks \
                         WHERE node = $1 AND (bucket, first_seq) > ($2, $3) AND bucket < $4 \
                         ORDER BY bucket, first_seq LIMIT $5",
                        &[&self.value, b, s, &self.until, &self.page],
                    )
                    .await?
                }
                kind => {
                    let sql = format!(
                        "SELECT x.bucket, x.node, x.first_seq, b.data FROM {t} x \
                         LEFT JOIN dw_blocks b \
                           ON b.node = x.node AND b.bucket = x.bucket AND b.first_seq = x.first_seq \
                         WHERE x.{c} = $1 AND (x.bucket, x.node, x.first_seq) > ($2, $3, $4) \
                           AND x.bucket < $5 \
                         ORDER BY x.bucket, x.node, x.first_seq LIMIT $6",
                        t = if kind == RunKind::Exec {
                            "dw_by_exec"
                        } else {
                            "dw_by_dir"
                        },
                        c = if kind == RunKind::Exec {
                            "exec_id"
                        } else {
                            "dir"
                        },
                    );
                    sql::query(db, &sql, &[&self.value, b, n, s, &self.until, &self.page]).await?
                }
            };
            self.exhausted = (rows.len() as i64) < self.page;
            self.page = (self.page * 2).min(PAGE_ROWS);
            for r in rows {
                self.rows.push_back(Row {
                    bucket: r.try_get(0)?,
                    node: r.try_get(1)?,
                    first_seq: r.try_get(2)?,
                    data: r.try_get(3)?,
                });
            }
            if let Some(last) = self.rows.back() {
                self.after = (last.bucket, last.node.clone(), last.first_seq);
            }
        }
        Ok(self.rows.pop_front())
    }
}

impl PgLog {
    /// Connects to the database at `url` (`postgres://user@host:port/db`,
    /// libpq's key/value form works too) and brings its schema to this
    /// build's version.
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, None)
    }

    /// As [`PgLog::connect`], checking the server's certificate against
    /// the CA certificates (PEM) in `ca` instead of the system's roots.
    /// TLS is used unless the URL says `sslmode=disable`; with the default
    /// `sslmode=prefer` a server without TLS is spoken to in plaintext,
    /// with `sslmode=require` it is refused. A certificate that does not
    /// verify (CA, name, dates) is refused in either mode.
    pub fn connect_with(url: &str, ca: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| backend(format!("the store URL does not parse: {e}")))?;
        if config.get_application_name().is_none() {
            config.application_name("driftwatch-collector");
        }
        // Appends commit without waiting for the WAL; the group commit's
        // flush is the one synchronous commit (see the module's note).
        let options = format!(
            "{} -c synchronous_commit=off",
            config.get_options().unwrap_or_default()
        );
        config.options(options.trim());
        let target = {
            let host = config
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_else(|| "localhost".into());
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let db = config
                .get_dbname()
                .or(config.get_user())
                .unwrap_or("postgres");
            format!("postgres at {host}:{port}/{db}")
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| backend(format!("starting the client runtime: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => None,
            _ => Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
                ca,
            )?)),
        };
        let manager = match &tls {
            None => Manager::from_config(config.clone(), NoTls, manager_config),
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(backend)?;
        let log = Self {
            rt: Some(rt),
            pool,
            target,
            config,
            tls,
            replica: rand_id(),
            unflushed: Mutex::new(HashSet::new()),
            days: Mutex::new(HashSet::new()),
            finding_changes: tokio::sync::watch::channel(0).0,
        };
        log.block_on(log.migrate())?;
        // `findings watch --from-now` starts at the newest change, from the
        // first call on.
        let latest = log.block_on(async {
            let db = log.pool.get().await?;
            let row = sql::query_one(&db, "SELECT v FROM dw_finding_seq WHERE id = 1", &[]).await?;
            Ok::<i64, StoreError>(row.try_get(0)?)
        })?;
        log.finding_changes
            .send_replace(u64::try_from(latest).unwrap_or(0));
        judging::spawn_change_poll(&log);
        Ok(log)
    }

    /// Runs `f` on the client's runtime and waits for it, from any thread.
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let Some(rt) = self.rt.as_ref() else {
            unreachable!("the runtime lives until drop")
        };
        let handle = rt.handle();
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => return handle.block_on(f),
            // A worker of the collector's runtime hands its other tasks
            // over and waits here.
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                return tokio::task::block_in_place(|| handle.block_on(f));
            }
            Ok(_) => {}
        }
        // Inside a single-threaded runtime a thread may not block on
        // another one: wait on a thread of our own.
        std::thread::scope(|s| {
            s.spawn(|| handle.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        // Replicas starting together migrate one at a time.
        sql::execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS dw_schema (version int NOT NULL)")
            .await?;
        let version: i32 = match sql::query_opt(&tx, "SELECT version FROM dw_schema", &[]).await? {
            Some(r) => r.try_get(0)?,
            None => {
                sql::execute(&tx, "INSERT INTO dw_schema VALUES (0)", &[]).await?;
                0
            }
        };
        if version > SCHEMA_VERSION {
            return Err(backend(format!(
                "the database has schema version {version}; this collector knows up to {SCHEMA_VERSION}: upgrade the collector"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tracing::info!(store = %self.target, version = i + 1, "applying a schema migration");
            tx.batch_execute(sql).await?;
        }
        sql::execute(&tx, "UPDATE dw_schema SET version = $1", &[&SCHEMA_VERSION]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates the partitions of these days that are not known to exist.
    async fn ensure_days(&self, days: &[i64]) -> Result<(), StoreError> {
        let missing: Vec<i64> = {
            let known = self.days.lock().unwrap_or_else(|p| p.into_inner());
            days.iter()
                .copied()
                .filter(|d| !known.contains(d))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let db = self.pool.get().await?;
        for day in missing {
            for table in PARTITIONED {
                let name = partition_name(table, day);
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ({}) TO ({})",
                    day.saturating_mul(DAY_NS),
                    day.saturating_add(1).saturating_mul(DAY_NS)
                );
                if let Err(e) = db.batch_execute(&sql).await {
                    // Another replica created it a moment ago.
                    let exists =
                        sql::query_one(&db, "SELECT to_regclass($1) IS NOT NULL", &[&name])
                            .await?
                            .try_get::<_, bool>(0)?;
                    if !exists {
                        return Err(e.into());
                    }
                }
            }
            self.days
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(day);
        }
        Ok(())
    }

    /// The events stored under redelivered sequence numbers, by sequence.
    async fn stored_for(
        db: &impl GenericClient,
        node: &str,
        redelivered: &[&Event],
    ) -> Result<HashMap<u64, Option<Event>>, StoreError> {
        let mut out = HashMap::new();
        if redelivered.is_empty() {
            return Ok(out);
        }
        let buckets: Vec<i64> = redelivered
            .iter()
            .map(|e| bucket(e.time_unix_nanos))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut found: HashMap<u64, Event> = HashMap::new();
        for r in sql::query(
            db,
            "SELECT data FROM dw_blocks WHERE node = $1 AND bucket = ANY($2)",
            &[&node, &buckets],
        )
        .await?
        {
            let data: Vec<u8> = r.try_get(0)?;
            for e in decode_block(&data)? {
                found.insert(e.seq, e);
            }
        }
        for e in redelivered {
            if let Some(s) = found.get(&e.seq) {
                out.insert(e.seq, Some(s.clone()));
                continue;
            }
            // Not at the time it claims: stored elsewhere (another event),
            // or removed by retention (nothing to replace).
            let seq = seq_sql(e.seq);
            let elsewhere = match sql::query_opt(
                db,
                "SELECT data FROM dw_blocks WHERE node = $1 AND first_seq <= $2 \
                     AND first_seq > $2 - $3 ORDER BY first_seq DESC LIMIT 1",
                &[&node, &seq, &seq_sql(BLOCK_EVENTS)],
            )
            .await?
            {
                Some(r) => {
                    let data: Vec<u8> = r.try_get(0)?;
                    decode_block(&data)?.into_iter().find(|s| s.seq == e.seq)
                }
                None => None,
            };
            out.insert(e.seq, elsewhere);
        }
        Ok(out)
    }

    async fn agent_for_update(
        tx: &impl GenericClient,
        node: &str,
    ) -> Result<Option<AgentStatus>, StoreError> {
        sql::query_opt(
            tx,
            "SELECT status FROM dw_agents WHERE node = $1 FOR UPDATE",
            &[&node],
        )
        .await?
        .map(|r| decode::<AgentStatus>("agents", r.try_get(0)?))
        .transpose()
    }

    async fn put_agent(
        tx: &impl GenericClient,
        node: &str,
        a: &AgentStatus,
    ) -> Result<(), StoreError> {
        sql::execute(
            tx,
            "INSERT INTO dw_agents (node, status) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET status = EXCLUDED.status",
            &[&node, &a.encode_to_vec()],
        )
        .await?;
        Ok(())
    }

    async fn insert_gap(tx: &impl GenericClient, gap: &Gap) -> Result<(), StoreError> {
        sql::execute(
            tx,
            "INSERT INTO dw_gaps (node, time, from_seq, gap) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (node, time, from_seq) DO UPDATE SET gap = EXCLUDED.gap",
            &[
                &gap.node,
                &gap.from_time_unix_nanos,
                &seq_sql(gap.from_seq),
                &gap.encode_to_vec(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn append_async(
        &self,
        node: &str,
        events: &[Event],
        seen_at: i64,
    ) -> Result<Appended, StoreError> {
        // Partitions for every day the batch may touch, before the
        // transaction (DDL there would lock the parent tables for its
        // whole length).
        let days: Vec<i64> = events
            .iter()
            .filter(|e| e.time_unix_nanos > 0)
            .map(|e| day_of(bucket(e.time_unix_nanos)))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        self.ensure_days(&days).await?;
        let mut db = self.pool.get().await?;
        let tx = db.transaction().await?;
        // The node's row is the lock every append of it takes first; a
        // node first seen here gets one (a hello normally made it).
        sql::execute(
            &tx,
            "INSERT INTO dw_agents (node, status) VALUES ($1, $2) ON CONFLICT (node) DO NOTHING",
            &[&node, &new_agent(node).encode_to_vec()],
        )
        .await?;
        // The row's lock, and which run of the server this append is
        // committed to (see `flush`).
        let row = sql::query_one(
            &tx,
            "SELECT status, pg_postmaster_start_time()::text FROM dw_agents WHERE node = $1 FOR UPDATE",
            &[&node],
        )
        .await?;
        let mut agent = decode::<AgentStatus>("agents", row.try_get(0)?)?;
        let server_run: String = row.try_get(1)?;
        let redelivered: Vec<&Event> = events
            .iter()
            .filter(|e| e.seq != 0 && e.seq <= agent.acked_seq)
            .collect();
        let stored = Self::stored_for(&tx, node, &redelivered).await?;
        let plan = plan(node, events, agent.acked_seq, seen_at, |e| {
            Ok(match stored.get(&e.seq) {
                Some(Some(s)) => same_event(s, e),
                // Nothing stored under it (retention): nothing replaced.
                Some(None) | None => true,
            })
        })?;
        let mut head = chain_head(&agent);
        let blocks = cut_blocks(&plan.accepted, &mut head);
        if !blocks.is_empty() {
            let mut buckets = Vec::with_capacity(blocks.len());
            let mut firsts = Vec::with_capacity(blocks.len());
            let mut data = Vec::with_capacity(blocks.len());
            let (mut x_val, mut x_bucket, mut x_first) = (Vec::new(), Vec::new(), Vec::new());
            let (mut d_val, mut d_bucket, mut d_first) = (Vec::new(), Vec::new(), Vec::new());
            for b in blocks {
                let first = seq_sql(b.first_seq);
                for x in b.execs {
                    x_val.push(x);
                    x_bucket.push(b.bucket);
                    x_first.push(first);
                }
                for d in b.dirs {
                    d_val.push(d);
                    d_bucket.push(b.bucket);
                    d_first.push(first);
                }
                buckets.push(b.bucket);
                firsts.push(first);
                data.push(b.value);
            }
            // Three statements, pipelined on the connection.
            let blocks_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&node, &buckets, &firsts, &data];
            let blocks = sql::execute(
                &tx,
                "INSERT INTO dw_blocks (node, bucket, first_seq, data) \
                 SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bytea[]) \
                 ON CONFLICT (node, bucket, first_seq) DO UPDATE SET data = EXCLUDED.data",
                &blocks_params,
            );
            let execs_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&node, &x_val, &x_bucket, &x_first];
            let execs = sql::execute(&tx,
                "INSERT INTO dw_by_exec (exec_id, bucket, node, first_seq) \
                 SELECT v, b, $1, f FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(v, b, f) \
                 ON CONFLICT DO NOTHING",
                &execs_params,
            );
            let dirs_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&node, &d_val, &d_bucket, &d_first];
            let dirs = sql::execute(&tx,
                "INSERT INTO dw_by_dir (dir, bucket, node, first_seq) \
                 SELECT v, b, $1, f FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS t(v, b, f) \
                 ON CONFLICT DO NOTHING",
                &dirs_params,
            );
            let (blocks, execs, dirs) = tokio::join!(blocks, execs, dirs);
            let failed: Vec<tokio_postgres::Error> = [blocks, execs, dirs]
                .into_iter()
                .filter_map(Result::err)
                .collect();
            // The first refusal aborts the transaction; the statements
            // pipelined after it only say so.
            if failed
                .iter()
                .any(|e| e.code() == Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION))
            {
                // No partition for a day this process thought had one:
                // another replica's retention dropped it.
                return Err(StoreError::Backend(MISSING_PARTITION.into()));
            }
            if let Some(e) = failed.into_iter().next() {
                return Err(e.into());
            }
        }
        for g in &plan.quarantined {
            Self::insert_gap(&tx, g).await?;
        }
        let done = plan.finish(&mut agent, head, seen_at);
        Self::put_agent(&tx, node, &agent).await?;
        if done.through > done.before {
            // Delivered with the commit, to the replicas that follow.
            let note = format!(
                "{}\t{}\t{}\t{node}",
                self.replica, done.before, done.through
            );
            sql::execute(&tx, "SELECT pg_notify('dw_events', $1)", &[&note]).await?;
        }
        tx.commit().await?;
        self.unflushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(server_run);
        Ok(done)
    }
    /// The events `from < seq <= through` of `node`, in sequence order.
    async fn seq_range(
        &self,
        node: &str,
        from: u64,
        through: u64,
    ) -> Result<Vec<Event>, StoreError> {
        let db = self.pool.get().await?;
        let rows = sql::query(
            &db,
            "SELECT data FROM dw_blocks WHERE node = $1 AND first_seq > $2 AND first_seq <= $3 \
             ORDER BY first_seq",
            &[
                &node,
                &seq_sql(from.saturating_sub(BLOCK_EVENTS)),
                &seq_sql(through),
            ],
        )
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let data: Vec<u8> = r.try_get(0)?;
            out.extend(
                decode_block(&data)?
                    .into_iter()
                    .filter(|e| e.seq > from && e.seq <= through),
            );
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// One listening connection: every append another replica commits is
    /// read and sent to `feed`. Returns when the connection fails.
    async fn listen<T>(&self, tls: T, feed: &FollowFeed) -> Result<(), StoreError>
    where
        T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
        T::Stream: Send + 'static,
    {
        use futures_util::StreamExt as _;
        let (client, mut conn) = self.config.connect(tls).await?;
        let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        let _ = notes.send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute("LISTEN dw_events").await?;
        tracing::info!(store = %self.target, "following the appends of other replicas");
        while let Some(note) = received.recv().await {
            let mut parts = note.splitn(4, '\t');
            let (Some(replica), Some(from), Some(through), Some(node)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(replica), Ok(from), Ok(through)) = (
                replica.parse::<u64>(),
                from.parse::<u64>(),
                through.parse::<u64>(),
            ) else {
                continue;
            };
            if replica == self.replica {
                continue;
            }
            for e in self.seq_range(node, from, through).await? {
                let _ = feed.send(e);
            }
        }
        driver.abort();
        match driver.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(backend("the listening connection closed")),
        }
    }

    /// Partitions of the event tables, as (day, table, partition name).
    async fn partitions(db: &impl GenericClient) -> Result<Vec<(i64, String)>, StoreError> {
        let mut out = Vec::new();
        for r in sql::query(
            db,
            "SELECT c.relname::text FROM pg_inherits i \
                 JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'dw_blocks'::regclass",
            &[],
        )
        .await?
        {
            let name: String = r.try_get(0)?;
            let day = match name.strip_prefix("dw_blocks_d") {
                Some(d) => match d.strip_prefix('m') {
                    Some(m) => m.parse::<i64>().ok().map(|v| -v),
                    None => d.parse::<i64>().ok(),
                },
                None => None,
            };
            if let Some(day) = day {
                out.push((day, name));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Drops a day's partitions; returns the blocks it held.
    async fn drop_day(&self, db: &impl GenericClient, day: i64) -> Result<u64, StoreError> {
        let blocks = partition_name("dw_blocks", day);
        let n: i64 = sql::query_one(db, &format!("SELECT count(*) FROM {blocks}"), &[])
            .await?
            .try_get(0)?;
        for table in PARTITIONED {
            db.batch_execute(&format!(
                "DROP TABLE IF EXISTS {}",
                partition_name(table, day)
            ))
            .await?;
        }
        self.days
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&day);
        tracing::info!(store = %self.target, day, blocks = n, "dropped a day of events");
        Ok(seq_of(n))
    }

    async fn size_async(db: &impl GenericClient) -> Result<u64, StoreError> {
        let n: i64 = sql::query_one(
            db,
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                 WHERE c.relnamespace = current_schema()::regnamespace \
                   AND c.relkind = 'r' AND c.relname LIKE 'dw\\_%'",
            &[],
        )
        .await?
        .try_get(0)?;
        Ok(seq_of(n))
    }
}

impl EventLog for PgLog {
    fn describe(&self) -> String {
        self.target.clone()
    }
    /// A connection of its own LISTENs to `dw_events`, which every append
    /// NOTIFYs with its commit; it is opened again when it fails.
    fn follow_others(self: std::sync::Arc<Self>, feed: FollowFeed) {
        let Some(rt) = self.rt.as_ref() else { return };
        let log = std::sync::Arc::downgrade(&self);
        rt.spawn(async move {
            let mut backoff = std::time::Duration::from_millis(500);
            loop {
                let Some(me) = log.upgrade() else { return };
                let ended = match me.tls.clone() {
                    None => me.listen(NoTls, &feed).await,
                    Some(tls) => me.listen(tls, &feed).await,
                };
                drop(me);
                if let Err(e) = ended {
                    tracing::warn!("following other replicas: {e}; again in {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
        });
    }

    fn hello(
        &self,
        node: &NodeInfo,
        now: i64,
        started: i64,
    ) -> Result<(Option<AgentStatus>, AgentStatus), StoreError> {
        self.block_on(async {
            let mut db = self.pool.get().await?;
            let tx = db.transaction().await?;
            let previous = Self::agent_for_update(&tx, &node.name).await?;
            let mut a = previous.clone().unwrap_or_default();
            a.node = Some(node.clone());
            a.connected = true;
            a.last_seen_unix_nanos = now;
            a.agent_started_unix_nanos = started;
            Self::put_agent(&tx, &node.name, &a).await?;
            tx.commit().await?;
            Ok((previous, a))
        })
    }

    fn append(&self, node: &str, events: &[Event], seen_at: i64) -> Result<Appended, StoreError> {
        match self.block_on(self.append_async(node, events, seen_at)) {
            Err(StoreError::Backend(m)) if m == MISSING_PARTITION => {
                // Forget what this process knew of the partitions, and
                // create them again.
                self.days.lock().unwrap_or_else(|p| p.into_inner()).clear();
                self.block_on(self.append_async(node, events, seen_at))
            }
            done => done,
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.block_on(async {
            let mut db = self.pool.get().await?;
            // A synchronous commit: the WAL up to it, with every earlier
            // asynchronous commit, is on disk when it returns.
            let tx = db.transaction().await?;
            tx.batch_execute(
                "SET LOCAL synchronous_commit = on; UPDATE dw_flush SET n = n + 1 WHERE id = 1",
            )
            .await?;
            let run: String = sql::query_one(&tx, "SELECT pg_postmaster_start_time()::text", &[])
                .await?
                .try_get(0)?;
            tx.commit().await?;
            // Unless the server restarted since an append: a crash loses
            // the asynchronous commits it had not flushed, and this flush,
            // on the new run, would vouch for them. Failing it closes the
            // streams; their agents resend from what the store kept.
            let appended = std::mem::take(
                &mut *self.unflushed.lock().unwrap_or_else(|p| p.into_inner()),
            );
            if appended.iter().any(|a| *a != run) {
                return Err(backend(
                    "the database restarted since the last appends; they may be lost, so they are not acknowledged (agents resend them)",
                ));
            }
            Ok(())
        })
    }

    fn agent(&self, node: &str) -> Result<Option<AgentStatus>, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            sql::query_opt(
                &db,
                "SELECT status FROM dw_agents WHERE node = $1",
                &[&node],
            )
            .await?
            .map(|r| decode::<AgentStatus>("agents", r.try_get(0)?))
            .transpose()
        })
    }

    fn agents(&self) -> Result<Vec<AgentStatus>, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            sql::query(&db, "SELECT status FROM dw_agents ORDER BY node", &[])
                .await?
                .into_iter()
                .map(|r| decode::<AgentStatus>("agents", r.try_get(0)?))
                .collect()
        })
    }

    fn update_agent(
        &self,
        node: &str,
        change: &mut (dyn FnMut(&mut AgentStatus) + Send),
    ) -> Result<Option<AgentStatus>, StoreError> {
        // Read and written under the row's lock: an append on another
        // replica waits, and the sequence fields it moves are kept.
        self.block_on(async {
            let mut db = self.pool.get().await?;
            let tx = db.transaction().await?;
            let Some(before) = Self::agent_for_update(&tx, node).await? else {
                return Ok(None);
            };
            let mut a = before.clone();
            change(&mut a);
            keep_log_fields(&before, &mut a);
            Self::put_agent(&tx, node, &a).await?;
            tx.commit().await?;
            Ok(Some(a))
        })
    }

    fn add_gap(&self, gap: &Gap) -> Result<(), StoreError> {
        check_gap(gap)?;
        self.block_on(async {
            let mut db = self.pool.get().await?;
            let tx = db.transaction().await?;
            Self::insert_gap(&tx, gap).await?;
            if let Some(mut a) = Self::agent_for_update(&tx, &gap.node).await? {
                if moves_ack(gap, &a) {
                    a.acked_seq = gap.to_seq;
                    Self::put_agent(&tx, &gap.node, &a).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn gaps(&self, node: &str) -> Result<Vec<Gap>, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            let rows = if node.is_empty() {
                sql::query(
                    &db,
                    "SELECT gap FROM dw_gaps ORDER BY node, time, from_seq",
                    &[],
                )
                .await?
            } else {
                sql::query(
                    &db,
                    "SELECT gap FROM dw_gaps WHERE node = $1 ORDER BY time, from_seq",
                    &[&node],
                )
                .await?
            };
            rows.into_iter()
                .map(|r| decode::<Gap>("gaps", r.try_get(0)?))
                .collect()
        })
    }

    fn event_at(&self, node: &str, seq: u64, time: i64) -> Result<Option<Event>, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            for r in sql::query(
                &db,
                "SELECT data FROM dw_blocks WHERE node = $1 AND bucket = $2",
                &[&node, &bucket(time)],
            )
            .await?
            {
                let data: Vec<u8> = r.try_get(0)?;
                if let Some(e) = decode_block(&data)?.into_iter().find(|e| e.seq == seq) {
                    return Ok(Some(e));
                }
            }
            Ok(None)
        })
    }

    /// Each node's blocks (or each index value's entries) are a run read a
    /// page at a time in key order; the runs are merged by bucket.
    fn events(
        &self,
        scope: &Scope<'_>,
        since: i64,
        until: i64,
        limit: usize,
        keep: &(dyn Fn(&Event) -> bool + Sync),
    ) -> Result<Vec<Event>, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            let (kind, values) = match scope {
                Scope::Nodes(nodes) => (RunKind::Blocks, nodes.clone()),
                Scope::Exec(id) => (RunKind::Exec, vec![(*id).to_owned()]),
                Scope::Path(prefix) => {
                    // A skip scan: the next directory after each one, through
                    // the index, instead of every entry under the prefix.
                    let rows = sql::query(
                        &db,
                        "WITH RECURSIVE d(dir) AS ( \
                           SELECT min(dir) FROM dw_by_dir WHERE dir >= $1 \
                           UNION ALL \
                           SELECT (SELECT min(x.dir) FROM dw_by_dir x WHERE x.dir > d.dir) FROM d \
                           WHERE d.dir IS NOT NULL AND starts_with(d.dir, $1)) \
                         SELECT dir FROM d WHERE dir IS NOT NULL AND starts_with(dir, $1)",
                        &[&prefix_dir(prefix)],
                    )
                    .await?;
                    let dirs = rows
                        .into_iter()
                        .map(|r| r.try_get::<_, String>(0))
                        .collect::<Result<Vec<_>, _>>()?;
                    (RunKind::Dir, dirs)
                }
            };
            let last = bucket(until.saturating_sub(1)).saturating_add(BUCKET_NS);
            let mut runs: Vec<Run> = values
                .into_iter()
                .map(|value| Run {
                    kind,
                    value,
                    after: (bucket(since), String::new(), -1),
                    until: last,
                    rows: VecDeque::new(),
                    exhausted: false,
                    page: 4,
                })
                .collect();
            // The key before a run's first: its first bucket, node "" and
            // sequence -1 (node names are never empty).
            // The first page of every run at once, pipelined on the
            // connection (a prefix over many directories is many runs).
            let firsts =
                futures_util::future::try_join_all(runs.iter_mut().map(|r| r.next(&db))).await?;
            let mut heap = BinaryHeap::new();
            for (i, row) in firsts.into_iter().enumerate() {
                if let Some(row) = row {
                    heap.push(std::cmp::Reverse((row.bucket, i, HeapRow(row))));
                }
            }
            let exact = |e: &Event| in_scope(scope, since, until, e, keep);
            let mut page = PageFill::new(limit);
            let mut read = HashSet::new();
            while let Some(std::cmp::Reverse((b, i, HeapRow(row)))) = heap.pop() {
                if page.done_before(b) {
                    break;
                }
                let fresh = kind == RunKind::Blocks
                    || read.insert((row.node.clone(), row.bucket, row.first_seq));
                if let (true, Some(data)) = (fresh, &row.data) {
                    page.add(b, decode_block(data)?, &exact);
                }
                if let Some(next) = runs[i].next(&db).await? {
                    heap.push(std::cmp::Reverse((next.bucket, i, HeapRow(next))));
                }
            }
            Ok(page.finish())
        })
    }

    fn node_chain<'a>(&'a self, node: &str) -> Result<Blocks<'a>, StoreError> {
        let node = node.to_owned();
        let mut after = -1i64;
        let mut page: VecDeque<Vec<u8>> = VecDeque::new();
        let mut done = false;
        Ok(Box::new(std::iter::from_fn(move || {
            if page.is_empty() && !done {
                let fetched = self.block_on(async {
                    let db = self.pool.get().await?;
                    let rows = sql::query(
                        &db,
                        "SELECT first_seq, data FROM dw_blocks WHERE node = $1 AND first_seq > $2 \
                             ORDER BY first_seq LIMIT $3",
                        &[&node, &after, &PAGE_ROWS],
                    )
                    .await?;
                    rows.into_iter()
                        .map(|r| Ok((r.try_get::<_, i64>(0)?, r.try_get::<_, Vec<u8>>(1)?)))
                        .collect::<Result<Vec<_>, StoreError>>()
                });
                match fetched {
                    Ok(rows) => {
                        done = (rows.len() as i64) < PAGE_ROWS;
                        for (first, data) in rows {
                            after = first;
                            page.push_back(data);
                        }
                    }
                    Err(e) => {
                        done = true;
                        return Some(Err(e));
                    }
                }
            }
            let data = page.pop_front()?;
            Some(decode_block(&data).map(|mut events| {
                events.sort_by_key(|e| e.seq);
                events
            }))
        })))
    }

    /// Whole days go by dropping their partitions; the day `min_time`
    /// falls in is cut with a delete. The size bound drops whole days,
    /// oldest first, never the newest (a delete frees no disk space until
    /// PostgreSQL vacuums).
    fn retain(&self, min_time: i64, max_bytes: u64) -> Result<usize, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            let cut = bucket(min_time);
            let mut removed = 0u64;
            for (day, _) in Self::partitions(&db).await? {
                if day.saturating_add(1).saturating_mul(DAY_NS) <= cut {
                    removed += self.drop_day(&db, day).await?;
                }
            }
            let n = sql::execute(&db, "DELETE FROM dw_blocks WHERE bucket < $1", &[&cut])
                .await?;
            sql::execute(&db, "DELETE FROM dw_by_exec WHERE bucket < $1", &[&cut])
                .await?;
            sql::execute(&db, "DELETE FROM dw_by_dir WHERE bucket < $1", &[&cut])
                .await?;
            removed += n;
            if max_bytes > 0 {
                loop {
                    if Self::size_async(&db).await? <= max_bytes {
                        break;
                    }
                    let days = Self::partitions(&db).await?;
                    if days.len() < 2 {
                        tracing::warn!(store = %self.target, max_bytes, "the event log is over its size bound with one day left; the bound drops whole days");
                        break;
                    }
                    removed += self.drop_day(&db, days[0].0).await?;
                }
            }
            Ok(usize::try_from(removed).unwrap_or(usize::MAX))
        })
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            Self::size_async(&db).await
        })
    }

    fn block_count(&self) -> Result<u64, StoreError> {
        self.block_on(async {
            let db = self.pool.get().await?;
            let n: i64 = sql::query_one(&db, "SELECT count(*) FROM dw_blocks", &[])
                .await?
                .try_get(0)?;
            Ok(seq_of(n))
        })
    }

    fn event_count(&self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for node in self.nodes()? {
            for block in self.node_chain(&node)? {
                n += block?.len() as u64;
            }
        }
        Ok(n)
    }
}

/// A row in the merge heap: ordered by the (bucket, run) before it only.
struct HeapRow(Row);

impl PartialEq for HeapRow {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for HeapRow {}
impl PartialOrd for HeapRow {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapRow {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}
