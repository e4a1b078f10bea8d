use super::memory::MemoryLog;
use super::postgres::PgLog;
use super::sled_store::{block_key, SledStore};
use super::*;
use driftwatch_proto::v1::{FileChange, Process};

/// A file event (`open` of `path`) by process instance `exec_id`.
pub(crate) fn ev(node: &str, seq: u64, t: i64, path: &str, exec_id: &str) -> Event {
    Event {
        event: Some(event::Event::File(FileChange {
            op: "open".into(),
            path: path.into(),
            ..Default::default()
        })),
        process: Some(Process {
            exec_id: exec_id.into(),
            ..Default::default()
        }),
        seq,
        time_unix_nanos: t,
        node: node.into(),
        chain: Vec::new(),
    }
}

/// A log under test: sled in a temporary directory, or a fresh schema of
/// the PostgreSQL server the test run started.
pub(crate) struct TestLog {
    log: Option<Box<dyn EventLog>>,
    _server: Option<std::sync::RwLockReadGuard<'static, ()>>,
    memory: Option<MemoryLog>,
    dir: Option<tempfile::TempDir>,
    url: Option<String>,
}

static SCHEMAS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl TestLog {
    pub(crate) fn sled() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = SledStore::open(dir.path()).unwrap();
        Self {
            log: Some(Box::new(log)),
            _server: None,
            memory: None,
            dir: Some(dir),
            url: None,
        }
    }

    pub(crate) fn memory() -> Self {
        let log = MemoryLog::new();
        Self {
            log: Some(Box::new(log.clone())),
            _server: None,
            memory: Some(log),
            dir: None,
            url: None,
        }
    }

    /// A fresh schema on the server in `DRIFTWATCH_TEST_POSTGRES`, which
    /// `cargo xtask test` starts; `None` (the test skipped, said on
    /// stderr) only when `DRIFTWATCH_SKIP_POSTGRES=1` says so.
    pub(crate) fn postgres() -> Option<Self> {
        let server = shared_server();
        let url = pg_schema_url()?;
        let log = PgLog::connect(&url).unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        Some(Self {
            log: Some(Box::new(log)),
            _server: Some(server),
            memory: None,
            dir: None,
            url: Some(url),
        })
    }

    /// The log of the backend named `sled`, `memory` or `postgres`
    /// (`None`: skipped, see [`TestLog::postgres`]).
    pub(crate) fn of(backend: &str) -> Option<Self> {
        match backend {
            "sled" => Some(Self::sled()),
            "memory" => Some(Self::memory()),
            _ => Self::postgres(),
        }
    }

    pub(crate) fn log(&self) -> &dyn EventLog {
        self.log.as_deref().unwrap()
    }

    /// Closes and opens the log again (a collector restart).
    fn reopen(&mut self) {
        drop(self.log.take());
        self.log = Some(match (&self.dir, &self.url, &self.memory) {
            (Some(d), _, _) => Box::new(SledStore::reopen_for_test(d.path())),
            (_, Some(url), _) => Box::new(PgLog::connect(url).unwrap()),
            (_, _, Some(m)) => Box::new(m.clone()),
            _ => unreachable!(),
        });
    }
}

/// The test server: shared by the tests that use it, taken alone by the
/// one that crashes it.
static SERVER: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub(crate) fn shared_server() -> std::sync::RwLockReadGuard<'static, ()> {
    SERVER
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The URL of a new, empty schema on the test server.
pub(crate) fn pg_schema_url() -> Option<String> {
    let Ok(base) = std::env::var("DRIFTWATCH_TEST_POSTGRES") else {
        if std::env::var("DRIFTWATCH_SKIP_POSTGRES").as_deref() == Ok("1") {
            eprintln!("skipped: the PostgreSQL half (DRIFTWATCH_SKIP_POSTGRES=1)");
            return None;
        }
        panic!(
            "DRIFTWATCH_TEST_POSTGRES is not set: run `cargo xtask test`, which starts a throwaway PostgreSQL, \
             or set DRIFTWATCH_SKIP_POSTGRES=1 to skip the PostgreSQL half of the store suite"
        );
    };
    let schema = format!(
        "t{}_{}",
        std::process::id(),
        SCHEMAS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
    });
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

/// A log with node `n1` said hello.
fn hello(t: &TestLog) {
    t.log()
        .hello(
            &NodeInfo {
                name: "n1".into(),
                ..Default::default()
            },
            1,
            1,
        )
        .unwrap();
}

/// Runs each `name(&mut TestLog)` on every backend, after
/// `setup(&TestLog)`: as `sled::name`, `memory::name` and `postgres::name`.
macro_rules! on_every_backend {
    ($setup:ident; $($name:ident),* $(,)?) => {
        on_every_backend!(@one sled, $setup; $($name),*);
        on_every_backend!(@one memory, $setup; $($name),*);
        on_every_backend!(@one postgres, $setup; $($name),*);
    };
    (@one $backend:ident, $setup:ident; $($name:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $name() {
                    if let Some(mut t) = crate::store::tests::TestLog::of(stringify!($backend)) {
                        super::$setup(&t);
                        super::$name(&mut t);
                    }
                }
            )*
        }
    };
}
pub(crate) use on_every_backend;

on_every_backend!(
    hello;
    redelivery_is_stored_once_and_holes_are_refused,
    events_must_belong_to_the_stream,
    hostile_values_are_kept_out_by_name_and_the_node_goes_on,
    a_time_window_is_a_range_scan_in_time_order_and_survives_reopen,
    exec_id_and_path_indexes,
    dropped_ranges_are_gaps_that_move_the_ack,
    retention_by_age,
    a_batch_becomes_few_blocks_in_sequence_order,
    an_indexed_first_page_reads_from_since_and_stops_after_the_limit,
    stored_history_is_chained_and_continues_after_a_reopen,
    a_redelivery_with_other_content_is_refused_by_seq_and_the_stored_event_stays,
    sequence_numbers_near_u64_max_are_refused_without_overflow,
    agent_records_keep_what_only_appends_move,
);

fn redelivery_is_stored_once_and_holes_are_refused(t: &mut TestLog) {
    let s = t.log();
    let batch: Vec<Event> = (1..=5)
        .map(|i| ev("n1", i, 100 + i as i64, "/a", "x"))
        .collect();
    assert_eq!(s.append("n1", &batch, 1).unwrap().through, 5);
    assert_eq!(
        s.append("n1", &batch[2..], 1).unwrap().through,
        5,
        "redelivery is a no-op"
    );
    assert_eq!(s.event_count().unwrap(), 5);
    let err = s
        .append("n1", &[ev("n1", 7, 200, "/a", "x")], 1)
        .unwrap()
        .refused
        .expect("a hole is refused");
    assert!(
        matches!(
            err,
            StoreError::OutOfOrder {
                expected: 6,
                got: 7
            }
        ),
        "{err}"
    );
    assert_eq!(
        s.event_count().unwrap(),
        5,
        "nothing of a refused batch is stored"
    );
    // A valid prefix is kept; the rest of the batch is refused.
    let mixed = [ev("n1", 6, 201, "/a", "x"), ev("n1", 8, 202, "/a", "x")];
    assert!(s.append("n1", &mixed, 1).unwrap().refused.is_some());
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 6);
}

fn events_must_belong_to_the_stream(t: &mut TestLog) {
    let s = t.log();
    let other = ev("n2", 1, 100, "/a", "x");
    let r = s.append("n1", &[other], 1).unwrap();
    assert!(
        matches!(&r.refused, Some(StoreError::Foreign { seq: 1, named, stream }) if named == "n2" && stream == "n1"),
        "{:?}",
        r.refused
    );
    assert_eq!(r.through, 0);
    assert_eq!(s.event_count().unwrap(), 0);
}

fn hostile_values_are_kept_out_by_name_and_the_node_goes_on(t: &mut TestLog) {
    let s = t.log();
    // Sequence 0 was passed over as a redelivery and acked "through 0":
    // it stays a refusal of the stream, since it names no place to skip.
    assert!(matches!(
        s.append("n1", &[ev("n1", 0, 100, "/a", "x")], 1)
            .unwrap()
            .refused,
        Some(StoreError::Invalid { seq: 0, .. })
    ));
    let now = driftwatch_proto::time::now_unix_nanos();
    let mut seq = 0;
    // Each invalid event is kept out, its sequence number recorded as a
    // gap that says why, and the next event is stored as usual.
    let mut kept_out = |mut e: Event| -> String {
        seq += 1;
        e.seq = seq;
        let mut next = ev("n1", seq + 1, 100 + seq as i64, "/ok", "x");
        next.seq = seq + 1;
        let r = s.append("n1", &[e, next], 1).unwrap();
        assert!(r.refused.is_none(), "{:?}", r.refused);
        assert_eq!(r.through, seq + 1);
        let [g] = r.quarantined.as_slice() else {
            panic!("{:?}", r.quarantined)
        };
        assert_eq!((g.from_seq, g.to_seq), (seq, seq));
        assert_eq!(g.reason, "collector_refused");
        seq += 1;
        g.detail.clone()
    };
    assert!(
        kept_out(ev("n1", 1, now + 25 * 3600 * 1_000_000_000, "/a", "x")).contains("a day ahead")
    );
    assert!(kept_out(ev("n1", 1, i64::MAX, "/a", "x")).contains("a day ahead"));
    assert!(kept_out(ev("n1", 1, 100, &"/x".repeat(3000), "x")).contains("PATH_MAX"));
    let mut big_args = ev("n1", 1, 100, "/a", "x");
    if let Some(p) = big_args.process.as_mut() {
        p.args = vec!["a".repeat(40 * 1024)];
    }
    assert!(kept_out(big_args).contains("arguments of 40960 bytes"));
    let mut big = ev("n1", 1, 100, "/a", "x");
    if let Some(p) = big.process.as_mut() {
        p.comm = "c".repeat(100 * 1024);
    }
    assert!(kept_out(big).contains("the limit for one event"));
    let mut empty = ev("n1", 1, 100, "/a", "x");
    empty.event = None;
    assert!(kept_out(empty).contains("no event kind"));
    let mut chained = ev("n1", 1, 100, "/a", "x");
    chained.chain = vec![0; 32];
    assert!(kept_out(chained).contains("chain"));
    assert!(kept_out(ev("n1", 1, 100, "/a\0b", "x")).contains("NUL"));
    assert!(kept_out(ev("n1", 1, 100, "/a", "x\0")).contains("NUL"));
    // Only the valid events were stored, each gap is on record, and the
    // chain over what was stored still verifies.
    assert_eq!(s.event_count().unwrap(), 9);
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 18);
    let gaps = s.gaps("n1").unwrap();
    assert_eq!(gaps.len(), 9, "{gaps:?}");
    assert_eq!(verify_chain(s, "n1"), Ok(9));
    // Sent again (an agent that missed the ack), a kept-out event is a
    // redelivery, not a conflict.
    let mut again = ev("n1", 13, 100, "/a", "x");
    again.chain = vec![0; 32];
    let r = s.append("n1", &[again], 1).unwrap();
    assert!(r.refused.is_none() && r.quarantined.is_empty(), "{r:?}");
    // A run of invalid events is one gap.
    let run: Vec<Event> = (19..=21)
        .map(|q| {
            let mut e = ev("n1", q, 100, "/a", "x");
            e.event = None;
            e
        })
        .collect();
    let r = s.append("n1", &run, 1).unwrap();
    assert_eq!(r.through, 21);
    assert_eq!(
        r.quarantined
            .iter()
            .map(|g| (g.from_seq, g.to_seq))
            .collect::<Vec<_>>(),
        vec![(19, 21)]
    );
    // A day ahead is still fine: agents' clocks drift.
    let soon = ev("n1", 22, now + 3600 * 1_000_000_000, "/a", "x");
    assert_eq!(s.append("n1", &[soon], 1).unwrap().through, 22);
}

fn a_time_window_is_a_range_scan_in_time_order_and_survives_reopen(t: &mut TestLog) {
    let batch: Vec<Event> = (1..=100)
        .map(|i| ev("n1", i, 1_000 + i as i64 * 10, "/a", "x"))
        .collect();
    t.log().append("n1", &batch, 1).unwrap();
    t.log().flush().unwrap();
    t.reopen();
    let s = t.log();
    let got: Vec<u64> = s
        .node_range("n1", 1_200, 1_300)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(got, (20..30).collect::<Vec<u64>>());
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 100);
}

fn exec_id_and_path_indexes(t: &mut TestLog) {
    let s = t.log();
    s.append(
        "n1",
        &[
            ev("n1", 1, 10, "/etc/app/a.conf", "e1"),
            ev("n1", 2, 20, "/etc/other", "e2"),
            ev("n1", 3, 30, "/etc/app/b.conf", "e1"),
        ],
        1,
    )
    .unwrap();
    let by_exec: Vec<u64> = s
        .events(&Scope::Exec("e1"), i64::MIN, i64::MAX, usize::MAX, &|_| {
            true
        })
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(by_exec, [1, 3]);
    let by_path: Vec<u64> = s
        .events(
            &Scope::Path("/etc/app/"),
            i64::MIN,
            i64::MAX,
            usize::MAX,
            &|_| true,
        )
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(by_path, [1, 3]);
}

fn dropped_ranges_are_gaps_that_move_the_ack(t: &mut TestLog) {
    let s = t.log();
    s.append("n1", &[ev("n1", 1, 10, "/a", "x")], 1).unwrap();
    s.add_gap(&Gap {
        node: "n1".into(),
        from_seq: 2,
        to_seq: 9,
        reason: "agent_dropped".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.append("n1", &[ev("n1", 10, 50, "/a", "x")], 1)
            .unwrap()
            .through,
        10
    );
    assert_eq!(s.gaps("n1").unwrap().len(), 1);
}

fn retention_by_age(t: &mut TestLog) {
    let s = t.log();
    // One event per second: each its own bucket.
    let batch: Vec<Event> = (1..=10)
        .map(|i| ev("n1", i, i as i64 * BUCKET_NS, "/a", "x"))
        .collect();
    s.append("n1", &batch, 1).unwrap();
    assert_eq!(s.retain(5 * BUCKET_NS + BUCKET_NS / 2, 0).unwrap(), 4);
    let left: Vec<u64> = s
        .node_range("n1", i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [5, 6, 7, 8, 9, 10]);
    // Index entries of removed blocks are skipped, not returned.
    assert_eq!(
        s.events(&Scope::Exec("x"), i64::MIN, i64::MAX, usize::MAX, &|_| true)
            .unwrap()
            .len(),
        6
    );
}

/// 1,000 events over 25 ms: three buckets (1..=399, 400..=799,
/// 800..=1000), cut at 256, 512 and 768: six blocks.
fn thousand_events() -> Vec<Event> {
    (1..=1000)
        .map(|i| {
            ev(
                "n1",
                i,
                i as i64 * 25_000,
                &format!("/etc/app/{}.conf", i % 7),
                "x",
            )
        })
        .collect()
}

fn a_batch_becomes_few_blocks_in_sequence_order(t: &mut TestLog) {
    let s = t.log();
    let batch = thousand_events();
    assert_eq!(s.append("n1", &batch, 1).unwrap().through, 1000);
    assert_eq!(s.block_count().unwrap(), 6);
    let seqs: Vec<u64> = s
        .node_range("n1", i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    assert_eq!(
        s.events(
            &Scope::Path("/etc/app/3.conf"),
            i64::MIN,
            i64::MAX,
            usize::MAX,
            &|_| true
        )
        .unwrap()
        .len(),
        1000 / 7 + 1
    );
    assert_eq!(s.event_count().unwrap(), 1000);
}

/// sled's trees are written one by one: a crash after the blocks and
/// before the agent's record leaves the ack behind the blocks.
#[test]
fn a_cut_redelivery_after_a_crash_between_blocks_and_ack_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let batch = thousand_events();
    assert_eq!(s.append("n1", &batch, 1).unwrap().through, 1000);
    // Simulate the crash: roll the ack back and redeliver the same events
    // cut differently.
    let mut a = s.agent("n1").unwrap().unwrap();
    a.acked_seq = 0;
    s.put_agent_for_test(&a);
    s.append("n1", &batch[..300], 1).unwrap();
    s.append("n1", &batch[300..650], 1).unwrap();
    s.append("n1", &batch[650..], 1).unwrap();
    let all = s.node_range("n1", i64::MIN, i64::MAX).unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=1000).collect::<Vec<u64>>(),
        "every event exactly once"
    );
}

#[test]
fn blocks_written_before_compression_still_read_and_corrupt_ones_are_errors() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let s = SledStore::open(dir.path()).unwrap();
    let blocks = s.tree("blocks").unwrap();
    let old = EventBatch {
        events: vec![ev("n1", 1, 5, "/a", "x"), ev("n1", 2, 6, "/a", "x")],
    };
    blocks
        .insert(block_key("n1", bucket(5), 1), old.encode_to_vec())
        .unwrap();
    s.put_agent_for_test(&driftwatch_proto::v1::AgentStatus {
        node: Some(driftwatch_proto::v1::NodeInfo {
            name: "n1".into(),
            ..Default::default()
        }),
        acked_seq: 2,
        ..Default::default()
    });
    s.append("n1", &[ev("n1", 3, 7, "/a", "x")], 1).unwrap();
    let seqs: Vec<u64> = s
        .node_range("n1", i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);

    // A compressed block whose header claims more than the bound, and one
    // whose data is cut: errors naming the block, no panic, no huge alloc.
    blocks
        .insert(
            block_key("n2", 0, 1),
            [0u8, 0xff, 0xff, 0xff, 0xff].to_vec(),
        )
        .unwrap();
    blocks
        .insert(block_key("n3", 0, 1), [0u8, 100, 0, 0, 0, 0x40].to_vec())
        .unwrap();
    for node in ["n2", "n3"] {
        let err = s.node_range(node, i64::MIN, i64::MAX).unwrap_err();
        assert!(matches!(err, StoreError::CorruptBlock(_)), "{node}: {err}");
    }
}

fn an_indexed_first_page_reads_from_since_and_stops_after_the_limit(t: &mut TestLog) {
    let s = t.log();
    // Two nodes, three directories under /srv/ (one nested, one a sibling
    // name that only shares the prefix's bytes), one event a millisecond
    // for two seconds: 200 buckets.
    let dirs = ["/srv/a", "/srv/a/sub", "/srv/b", "/srvx"];
    for node in ["n1", "n2"] {
        let batch: Vec<Event> = (1..=2000)
            .map(|i| {
                let dir = dirs[i as usize % dirs.len()];
                ev(
                    node,
                    i,
                    i as i64 * 1_000_000,
                    &format!("{dir}/f{}", i % 3),
                    "x",
                )
            })
            .collect();
        assert_eq!(s.append(node, &batch, 1).unwrap().through, 2000);
    }
    let since = 700 * 1_000_000;
    let key = |e: &Event| (e.time_unix_nanos, e.node.clone(), e.seq);
    let everything: Vec<_> = s
        .events(
            &Scope::Path("/srv/"),
            i64::MIN,
            i64::MAX,
            usize::MAX,
            &|_| true,
        )
        .unwrap();
    assert_eq!(everything.len(), 2 * 1500, "/srvx is not under /srv/");
    let want: Vec<_> = everything
        .iter()
        .filter(|e| e.time_unix_nanos >= since && e.node == "n2")
        .take(50)
        .map(key)
        .collect();
    let page = s
        .events(&Scope::Path("/srv/"), since, i64::MAX, 50, &|e| {
            e.node == "n2"
        })
        .unwrap();
    let got: Vec<_> = page.iter().take(50).map(key).collect();
    assert_eq!(got, want);
    assert!(
        page.len() < 200,
        "read {} events for a page of 50: the walk did not stop",
        page.len()
    );
    // By exec_id, bounded the same way.
    let page = s
        .events(&Scope::Exec("x"), since, i64::MAX, 10, &|_| true)
        .unwrap();
    assert_eq!(page[0].time_unix_nanos, since);
    assert!(page.len() < 100, "{}", page.len());
}

/// Verifies the whole stored chain of `node` the way `driftwatch verify`
/// does: sequence order, each link, and the recorded head.
fn verify_chain(s: &dyn EventLog, node: &str) -> Result<u64, chain::Broken> {
    let a = s.agent(node).unwrap().unwrap();
    let mut v = chain::Verifier::new(true).through_head(a.chain_seq, &a.chain_head);
    for block in s.node_chain(node).unwrap() {
        for e in block.unwrap() {
            v.feed(e.seq, &e.chain, &chain::event_body(&e))?;
        }
    }
    v.finish()?;
    Ok(v.checked())
}

/// Rewrites the block holding `seq` with `change` applied to its events,
/// as someone editing the database would: chain values left as they were.
fn tamper(s: &SledStore, node: &str, seq: u64, change: impl FnOnce(&mut Vec<Event>)) {
    for k in s.raw_block_keys(node).unwrap() {
        let mut events = s.block(&k).unwrap().unwrap();
        if events.iter().any(|e| e.seq == seq) {
            change(&mut events);
            let raw = EventBatch { events }.encode_to_vec();
            let mut value = vec![LZ4];
            value.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            value.extend_from_slice(&lz4_flex::block::compress(&raw));
            s.put_raw_block(&k, value).unwrap();
            return;
        }
    }
    panic!("no block holds seq {seq}");
}

/// Six batches, many buckets and blocks; a clock step back in the middle
/// puts later events in earlier buckets.
fn chain_six_batches(s: &dyn EventLog) {
    for b in 0..6u64 {
        let batch: Vec<Event> = (1..=100)
            .map(|i| {
                let seq = b * 100 + i;
                let t = if b == 3 { 5_000 } else { 1_000_000 } + seq as i64 * 3_000_000;
                ev("n1", seq, t, &format!("/etc/f{seq}"), "x")
            })
            .collect();
        assert_eq!(s.append("n1", &batch, 1).unwrap().through, (b + 1) * 100);
    }
}

fn chained_store() -> (tempfile::TempDir, SledStore) {
    let d = tempfile::tempdir().unwrap();
    let s = SledStore::open(d.path()).unwrap();
    chain_six_batches(&s);
    (d, s)
}

fn stored_history_is_chained_and_continues_after_a_reopen(t: &mut TestLog) {
    chain_six_batches(t.log());
    assert_eq!(verify_chain(t.log(), "n1"), Ok(600));
    let a = t.log().agent("n1").unwrap().unwrap();
    assert_eq!((a.chain_seq, a.chain_head.len()), (600, 32));
    // The chain survives a reopen and continues from the recorded head.
    t.reopen();
    let more: Vec<Event> = (601..=610)
        .map(|i| ev("n1", i, 10_000_000_000 + i as i64, "/etc/g", "x"))
        .collect();
    assert_eq!(t.log().append("n1", &more, 1).unwrap().through, 610);
    assert_eq!(verify_chain(t.log(), "n1"), Ok(610));
}

/// What the chain names when someone edits stored blocks (done here to
/// sled's raw blocks; the verification reads through the log either way).
#[test]
fn altered_removed_reordered_or_truncated_events_are_named() {
    let (_d, s) = chained_store();
    tamper(&s, "n1", 300, |events| {
        let e = events.iter_mut().find(|e| e.seq == 300).unwrap();
        if let Some(event::Event::File(f)) = &mut e.event {
            f.path = "/etc/innocent".into();
        }
    });
    assert_eq!(verify_chain(&s, "n1").unwrap_err().seq, 300, "altered");

    let (_d, s) = chained_store();
    tamper(&s, "n1", 300, |events| events.retain(|e| e.seq != 300));
    assert_eq!(verify_chain(&s, "n1").unwrap_err().seq, 301, "removed");

    // Two events trade places: each keeps its sequence number and chain
    // value, and takes the other's content.
    let (_d, s) = chained_store();
    let mut first = 0;
    tamper(&s, "n1", 250, |events| {
        assert!(events.len() >= 2);
        first = events[0].seq;
        let a = events[0].event.take();
        events[0].event = events[1].event.take();
        events[1].event = a;
    });
    assert_eq!(verify_chain(&s, "n1").unwrap_err().seq, first, "reordered");

    let (_d, s) = chained_store();
    let mut gone = 0;
    tamper(&s, "n1", 600, |events| {
        gone = events[0].seq;
        events.clear();
    });
    let e = verify_chain(&s, "n1").unwrap_err();
    assert_eq!(e.seq, gone, "truncated: {e:?}");
    assert!(e.reason.contains("newest were removed"), "{e:?}");
}

fn a_redelivery_with_other_content_is_refused_by_seq_and_the_stored_event_stays(t: &mut TestLog) {
    let s = t.log();
    let batch: Vec<Event> = (1..=5)
        .map(|i| ev("n1", i, 100 + i as i64, "/a", "x"))
        .collect();
    s.append("n1", &batch, 1).unwrap();
    // The same events again: skipped.
    assert!(s.append("n1", &batch, 1).unwrap().refused.is_none());
    // Seq 3 with another path, or at another time: refused, named.
    for forged in [
        ev("n1", 3, 103, "/forged", "x"),
        ev("n1", 3, 999, "/a", "x"),
    ] {
        let r = s.append("n1", &[forged], 1).unwrap();
        assert!(
            matches!(r.refused, Some(StoreError::Conflict { seq: 3 })),
            "{:?}",
            r.refused
        );
    }
    assert_eq!(s.event_at("n1", 3, 103).unwrap().map(|e| e.seq), Some(3));
    assert_eq!(verify_chain(s, "n1"), Ok(5));
    // An agent may not set the chain itself: the event is kept out.
    let mut e = ev("n1", 6, 106, "/a", "x");
    e.chain = vec![0; 32];
    let r = s.append("n1", &[e], 1).unwrap();
    assert!(r.refused.is_none() && r.quarantined.len() == 1, "{r:?}");
    assert_eq!(s.event_at("n1", 6, 106).unwrap().map(|e| e.seq), None);
}

fn sequence_numbers_near_u64_max_are_refused_without_overflow(t: &mut TestLog) {
    let s = t.log();
    s.append("n1", &[ev("n1", 1, 101, "/a", "x")], 1).unwrap();
    let gap = |to_seq| Gap {
        node: "n1".into(),
        from_seq: 2,
        to_seq,
        reason: "agent_dropped".into(),
        ..Default::default()
    };
    assert!(matches!(
        s.add_gap(&gap(u64::MAX)),
        Err(StoreError::Invalid { .. })
    ));
    assert_eq!(s.agent("n1").unwrap().unwrap().acked_seq, 1);
    let r = s
        .append("n1", &[ev("n1", u64::MAX, 102, "/a", "x")], 1)
        .unwrap();
    assert!(matches!(
        r.refused,
        Some(StoreError::OutOfOrder { expected: 2, .. })
    ));
    // The highest allowed range is taken, and what follows it still
    // refuses cleanly.
    s.add_gap(&gap(MAX_SEQ)).unwrap();
    let r = s
        .append("n1", &[ev("n1", u64::MAX, 103, "/a", "x")], 1)
        .unwrap();
    assert!(r.refused.is_some());
}

fn agent_records_keep_what_only_appends_move(t: &mut TestLog) {
    let s = t.log();
    s.append("n1", &[ev("n1", 1, 10, "/a", "x")], 5).unwrap();
    let before = s.agent("n1").unwrap().unwrap();
    assert_eq!(before.last_seen_unix_nanos, 5);
    let after = s
        .update_agent("n1", &mut |a| {
            a.connected = false;
            a.acked_seq = 99;
            a.chain_seq = 99;
            a.policy_version = "v2".into();
        })
        .unwrap()
        .unwrap();
    assert!(!after.connected);
    assert_eq!(after.policy_version, "v2");
    assert_eq!(
        (after.acked_seq, after.chain_seq),
        (1, 1),
        "sequence fields are the log's"
    );
    assert_eq!(s.agent("n1").unwrap().unwrap(), after);
    assert!(s.update_agent("nobody", &mut |_| {}).unwrap().is_none());
    // A hello returns the record as it was.
    let (previous, now) = s
        .hello(
            &NodeInfo {
                name: "n1".into(),
                ..Default::default()
            },
            7,
            3,
        )
        .unwrap();
    assert_eq!(
        previous.as_ref().map(|p| p.policy_version.as_str()),
        Some("v2")
    );
    assert!(now.connected);
    assert_eq!((now.acked_seq, now.agent_started_unix_nanos), (1, 3));
    assert_eq!(s.nodes().unwrap(), ["n1"]);
}

/// Two replicas, one node: an agent that reconnected to the second while
/// its stream to the first still delivered. Both append the same events
/// at once, cut differently; the agent's row lock orders them, and each
/// event is stored once.
#[test]
fn two_replicas_appending_one_node_at_once_store_each_event_once() {
    let _server = shared_server();
    let Some(url) = pg_schema_url() else { return };
    let a = PgLog::connect(&url).unwrap();
    let b = PgLog::connect(&url).unwrap();
    let batch: Vec<Event> = (1..=3000)
        .map(|i| {
            ev(
                "n1",
                i,
                1_000_000 + i as i64 * 10_000,
                &format!("/m/{}", i % 5),
                "x",
            )
        })
        .collect();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            for chunk in batch.chunks(500) {
                let r = a.append("n1", chunk, 1).unwrap();
                assert!(r.refused.is_none(), "{:?}", r.refused);
            }
        });
        sc.spawn(|| {
            for chunk in batch.chunks(700) {
                let r = b.append("n1", chunk, 1).unwrap();
                assert!(r.refused.is_none(), "{:?}", r.refused);
            }
        });
    });
    let seqs: Vec<u64> = a
        .node_range("n1", i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=3000).collect::<Vec<u64>>());
    assert_eq!(verify_chain(&b, "n1"), Ok(3000));
}

/// A schema from a newer collector is refused by name, not written to.
#[test]
fn a_newer_schema_is_refused() {
    let _server = shared_server();
    let Some(url) = pg_schema_url() else { return };
    drop(PgLog::connect(&url).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .execute("UPDATE dw_schema SET version = version + 1", &[])
            .await
            .unwrap();
    });
    let err = PgLog::connect(&url).err().expect("refused");
    assert!(err.to_string().contains("upgrade the collector"), "{err}");
}

/// A crash of the server between an append (committed asynchronously)
/// and the flush: the flush fails instead of vouching for what the crash
/// may have taken, and the log's acked sequence and its blocks agree.
#[test]
fn a_server_crash_between_append_and_flush_fails_the_flush() {
    let _alone = SERVER
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(url) = pg_schema_url() else { return };
    let (Ok(data), Ok(bin)) = (
        std::env::var("DRIFTWATCH_TEST_POSTGRES_DATA"),
        std::env::var("DRIFTWATCH_TEST_POSTGRES_BIN"),
    ) else {
        panic!("DRIFTWATCH_TEST_POSTGRES_DATA and _BIN name the test server (cargo xtask test sets them)");
    };
    let log = PgLog::connect(&url).unwrap();
    let batch: Vec<Event> = (1..=100)
        .map(|i| ev("n1", i, 1_000 + i as i64, "/a", "x"))
        .collect();
    log.append("n1", &batch[..50], 1).unwrap();
    log.flush().unwrap();
    log.append("n1", &batch[50..], 1).unwrap();
    let restart = |cmd: &mut std::process::Command| {
        let status = cmd.status().expect("pg_ctl");
        assert!(status.success(), "pg_ctl restart: {status}");
    };
    let pg_ctl = format!("{bin}/pg_ctl");
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
        c
    } else {
        std::process::Command::new(&pg_ctl)
    };
    restart(
        cmd.args(["restart", "-m", "immediate", "-w", "-D", &data])
            .stdout(std::process::Stdio::null()),
    );
    // The pool's connections died with the server: the first calls may
    // fail; the flush must never succeed for the appends before it.
    let mut flushed = None;
    for _ in 0..50 {
        match log.flush() {
            Err(e) if e.to_string().contains("restarted") => {
                flushed = Some(false);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            Ok(()) => {
                flushed = Some(true);
                break;
            }
        }
    }
    assert_eq!(
        flushed,
        Some(false),
        "the flush after the crash vouched for the appends before it"
    );
    // Whatever survived, the record and the blocks agree, and the agent
    // resumes from the record.
    let acked = log.agent("n1").unwrap().unwrap().acked_seq;
    let stored = log.node_range("n1", i64::MIN, i64::MAX).unwrap();
    assert_eq!(stored.len() as u64, acked);
    assert!(acked >= 50, "a flushed append was lost: acked {acked}");
    let r = log.append("n1", &batch[acked as usize..], 1).unwrap();
    assert_eq!(r.through, 100);
    log.flush().unwrap();
    assert_eq!(verify_chain(&log, "n1"), Ok(100));
}

/// Retention on one replica drops a day's partitions that another replica
/// remembers creating: the other's next append into that day creates them
/// again instead of failing forever.
#[test]
fn a_day_dropped_by_another_replica_is_created_again() {
    let _server = shared_server();
    let Some(url) = pg_schema_url() else { return };
    let a = PgLog::connect(&url).unwrap();
    let b = PgLog::connect(&url).unwrap();
    let day = 86_400 * 1_000_000_000i64;
    // Day 1 through b, which now remembers its partitions.
    b.append("n1", &[ev("n1", 1, day + 5, "/a", "x")], 1)
        .unwrap();
    // a's retention drops every day before day 2.
    assert_eq!(a.retain(2 * day, 0).unwrap(), 1);
    let r = b
        .append("n1", &[ev("n1", 2, day + 6, "/a", "x")], 1)
        .unwrap();
    assert!(r.refused.is_none(), "{:?}", r.refused);
    assert_eq!(r.through, 2);
    let seqs: Vec<u64> = a
        .node_range("n1", i64::MIN, i64::MAX)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [2]);
}
