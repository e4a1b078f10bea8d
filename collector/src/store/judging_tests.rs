//! The judging-state conformance suite: every backend issues ids, keeps
//! keys unique, commits all or nothing and orders its change log alike;
//! PostgreSQL also holds them when replicas race.

use std::sync::Arc;

use driftwatch_proto::v1::{Approval, Baseline, Finding};

use super::{
    judging::{transact, JudgeTx, Judging, ScanRecord},
    judging_kv::{MemoryJudging, SledJudging},
    postgres::PgLog,
    sled_store::SledStore,
    tests::{pg_schema_url, shared_server},
    StoreError,
};

/// A judging state under test, and how to open it again.
struct TestJudging {
    judging: Arc<dyn Judging>,
    _dir: Option<tempfile::TempDir>,
    url: Option<String>,
    _server: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

impl TestJudging {
    fn of(backend: &str) -> Option<Self> {
        Some(match backend {
            "sled" => {
                let dir = tempfile::tempdir().unwrap();
                let store = SledStore::open(dir.path()).unwrap();
                Self {
                    judging: Arc::new(SledJudging::open(store).unwrap()),
                    _dir: Some(dir),
                    url: None,
                    _server: None,
                }
            }
            "memory" => Self {
                judging: Arc::new(MemoryJudging::memory()),
                _dir: None,
                url: None,
                _server: None,
            },
            _ => {
                let server = shared_server();
                let url = pg_schema_url()?;
                Self {
                    judging: Arc::new(PgLog::connect(&url).unwrap()),
                    _dir: None,
                    url: Some(url),
                    _server: Some(server),
                }
            }
        })
    }

    fn tx<T>(&self, f: impl FnMut(&mut dyn JudgeTx) -> Result<T, StoreError>) -> T {
        transact(&*self.judging, f).unwrap()
    }
}

fn finding(kind: &str) -> Finding {
    Finding {
        kind: kind.into(),
        status: "open".into(),
        node: "n1".into(),
        ..Default::default()
    }
}

macro_rules! on_every_judging {
    ($($name:ident),* $(,)?) => {
        on_every_judging!(@one sled; $($name),*);
        on_every_judging!(@one memory; $($name),*);
        on_every_judging!(@one postgres; $($name),*);
    };
    (@one $backend:ident; $($name:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $name() {
                    if let Some(t) = super::TestJudging::of(stringify!($backend)) {
                        super::$name(&t);
                    }
                }
            )*
        }
    };
}

on_every_judging!(
    finding_ids_are_issued_and_an_open_key_is_held_once,
    a_failed_transaction_leaves_nothing,
    the_change_log_holds_each_finding_once_in_commit_order,
    cursors_path_state_baselines_and_scans_round_trip,
    approval_ids_are_issued_and_statuses_filter,
);

fn finding_ids_are_issued_and_an_open_key_is_held_once(t: &TestJudging) {
    let (a, b) = t.tx(|tx| {
        let mut a = finding("drift");
        assert!(tx.insert_finding("drift\0n1\0/etc/a", &mut a)?);
        let mut b = finding("drift");
        assert!(tx.insert_finding("drift\0n1\0/etc/b", &mut b)?);
        Ok((a, b))
    });
    assert!(a.id > 0 && b.id > a.id, "ids {} then {}", a.id, b.id);
    // The key is taken while the finding is unresolved.
    t.tx(|tx| {
        let mut again = finding("drift");
        assert!(!tx.insert_finding("drift\0n1\0/etc/a", &mut again)?);
        let open = tx.open_finding("drift\0n1\0/etc/a")?.expect("open");
        assert_eq!(open.id, a.id);
        Ok(())
    });
    let by_kind = t.tx(|tx| tx.open_by_kind());
    assert_eq!(by_kind.get("drift"), Some(&2));
    // Resolved, it gives the key up: the next occurrence is a new finding.
    t.tx(|tx| {
        let mut r = a.clone();
        r.status = "resolved".into();
        tx.update_finding(&r)
    });
    let c = t.tx(|tx| {
        assert!(tx.open_finding("drift\0n1\0/etc/a")?.is_none());
        let mut c = finding("drift");
        assert!(tx.insert_finding("drift\0n1\0/etc/a", &mut c)?);
        Ok(c)
    });
    assert!(c.id > b.id);
    let unresolved: Vec<u64> = t.tx(|tx| tx.unresolved()).iter().map(|f| f.id).collect();
    assert_eq!(unresolved, [b.id, c.id]);
    let newest: Vec<u64> = t
        .tx(|tx| tx.findings(2, &|_| true))
        .iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(newest, [c.id, b.id]);
}

fn a_failed_transaction_leaves_nothing(t: &TestJudging) {
    let failed = transact(&*t.judging, |tx| {
        let mut f = finding("drift");
        tx.insert_finding("drift\0n1\0/etc/x", &mut f)?;
        tx.set_cursor("n1", 9, 9)?;
        tx.put_baseline(&Baseline {
            host: "*".into(),
            path: "/etc/x".into(),
            ..Default::default()
        })?;
        Err::<(), _>(StoreError::Backend("the rules failed".into()))
    });
    assert!(failed.is_err());
    t.tx(|tx| {
        assert!(tx.open_finding("drift\0n1\0/etc/x")?.is_none());
        assert_eq!(tx.cursor("n1")?, (0, 0));
        assert!(tx.baselines_of("/etc/x")?.is_empty());
        assert!(tx.unresolved()?.is_empty());
        Ok(())
    });
    // And the ids it took are not a hole anyone can see.
    let f = t.tx(|tx| {
        let mut f = finding("drift");
        tx.insert_finding("drift\0n1\0/etc/x", &mut f)?;
        Ok(f)
    });
    assert_eq!(t.tx(|tx| tx.finding(f.id)).map(|x| x.id), Some(f.id));
}

fn the_change_log_holds_each_finding_once_in_commit_order(t: &TestJudging) {
    let mut changes = t.judging.changes();
    let start = *changes.borrow_and_update();
    let (a, b) = t.tx(|tx| {
        let mut a = finding("drift");
        tx.insert_finding("k\0a", &mut a)?;
        let mut b = finding("deleted");
        tx.insert_finding("k\0b", &mut b)?;
        Ok((a, b))
    });
    // `a` changes again later: it moves to the end, once.
    t.tx(|tx| {
        let mut a2 = a.clone();
        a2.count = 7;
        tx.update_finding(&a2)
    });
    assert!(changes.has_changed().unwrap());
    let log = t.tx(|tx| tx.changes_after(start, 100));
    let ids: Vec<u64> = log.iter().map(|(_, f)| f.id).collect();
    assert_eq!(ids, [b.id, a.id], "{log:?}");
    assert_eq!(log[1].1.count, 7);
    assert!(log[0].0 < log[1].0);
    assert_eq!(*changes.borrow(), log[1].0);
    // Resuming from a cursor shows only what came after it.
    let after = t.tx(|tx| tx.changes_after(log[0].0, 100));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].1.id, a.id);
}

fn cursors_path_state_baselines_and_scans_round_trip(t: &TestJudging) {
    t.tx(|tx| {
        assert_eq!(tx.cursor("n1")?, (0, 0));
        tx.set_cursor("n1", 42, 1_000)?;
        tx.set_path_state("n1", "/etc/a", Some(b"state"))?;
        for (host, path) in [("*", "/etc/a"), ("web-*", "/etc/a"), ("*", "/srv/b")] {
            tx.put_baseline(&Baseline {
                host: host.into(),
                path: path.into(),
                ..Default::default()
            })?;
        }
        tx.put_scan(
            "scan-1",
            &ScanRecord {
                node: "n1".into(),
                files: 3,
                ..Default::default()
            },
        )
    });
    t.tx(|tx| {
        assert_eq!(tx.cursor("n1")?, (42, 1_000));
        assert_eq!(
            tx.path_state("n1", "/etc/a")?.as_deref(),
            Some(&b"state"[..])
        );
        tx.set_path_state("n1", "/etc/a", None)?;
        assert_eq!(tx.baselines_of("/etc/a")?.len(), 2);
        assert_eq!(tx.baselines("*", "/etc/")?.len(), 1);
        assert_eq!(tx.baselines("", "/")?.len(), 3);
        tx.remove_baseline("web-*", "/etc/a")?;
        assert_eq!(tx.scan("scan-1")?.map(|s| s.files), Some(3));
        assert_eq!(tx.scans()?.len(), 1);
        tx.remove_scan("scan-1")
    });
    t.tx(|tx| {
        assert!(tx.path_state("n1", "/etc/a")?.is_none());
        assert_eq!(tx.baselines_of("/etc/a")?.len(), 1);
        assert!(tx.scans()?.is_empty());
        Ok(())
    });
}

fn approval_ids_are_issued_and_statuses_filter(t: &TestJudging) {
    let (a, b) = t.tx(|tx| {
        let mut a = Approval {
            status: "pending".into(),
            requester: "alice".into(),
            ..Default::default()
        };
        tx.insert_approval(&mut a)?;
        let mut b = a.clone();
        tx.insert_approval(&mut b)?;
        Ok((a, b))
    });
    assert!(a.id > 0 && b.id > a.id);
    t.tx(|tx| {
        let mut d = tx.approval(b.id)?.expect("stored");
        assert_eq!(d.id, b.id);
        d.status = "approved".into();
        d.approver = "bob".into();
        tx.update_approval(&d)
    });
    let approved = t.tx(|tx| tx.approvals(&["approved"]));
    assert_eq!(approved.iter().map(|a| a.id).collect::<Vec<_>>(), [b.id]);
    assert_eq!(t.tx(|tx| tx.approvals(&[])).len(), 2);
    let c1 = t.tx(|tx| tx.next_change_id());
    let c2 = t.tx(|tx| tx.next_change_id());
    assert!(c2 > c1 || t.url.is_none(), "change ids {c1}, {c2}");
}

/// Two replicas (two connections) open a finding under one key at once:
/// the second waits for the first and finds the key taken.
#[test]
fn postgres_replicas_racing_for_one_key_open_one_finding() {
    let Some(t) = TestJudging::of("postgres") else {
        return;
    };
    let url = t.url.clone().unwrap();
    let other = PgLog::connect(&url).unwrap();
    let inserted_first = std::sync::Barrier::new(2);
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(|| {
            transact(&*t.judging, |tx| {
                let mut f = finding("unauthorized_write");
                let ok = tx.insert_finding("race\0key", &mut f)?;
                inserted_first.wait();
                // Hold the key a moment while the other replica tries.
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok((ok, f.id))
            })
            .unwrap()
        });
        let second = s.spawn(|| {
            inserted_first.wait();
            transact(&other, |tx| {
                let mut f = finding("unauthorized_write");
                let ok = tx.insert_finding("race\0key", &mut f)?;
                let open = tx.open_finding("race\0key")?.map(|f| f.id);
                Ok((ok, open))
            })
            .unwrap()
        });
        (first.join().unwrap(), second.join().unwrap())
    });
    assert!(first.0, "the first insert takes the key");
    assert!(!second.0, "the second finds it taken");
    assert_eq!(second.1, Some(first.1), "and updates the first's finding");
    let open = t.tx(|tx| tx.unresolved());
    assert_eq!(open.len(), 1);
}

/// The database itself refuses a self-approval, whoever writes it.
#[test]
fn postgres_refuses_a_self_approval_by_constraint() {
    let Some(t) = TestJudging::of("postgres") else {
        return;
    };
    let a = t.tx(|tx| {
        let mut a = Approval {
            status: "pending".into(),
            requester: "alice".into(),
            ..Default::default()
        };
        tx.insert_approval(&mut a)?;
        Ok(a)
    });
    let err = transact(&*t.judging, |tx| {
        let mut d = a.clone();
        d.status = "approved".into();
        d.approver = "alice".into();
        tx.update_approval(&d)
    })
    .expect_err("a self-approval must not be stored");
    assert!(err.to_string().contains("dw_no_self_approval"), "{err}");
    assert_eq!(
        t.tx(|tx| tx.approval(a.id)).map(|a| a.status),
        Some("pending".into())
    );
}

/// A replica that starts knows the newest change at once (a watch from
/// now on it must not replay the history).
#[test]
fn postgres_a_new_replica_starts_at_the_newest_change() {
    let Some(t) = TestJudging::of("postgres") else {
        return;
    };
    t.tx(|tx| {
        let mut f = finding("drift");
        tx.insert_finding("k\0new", &mut f)?;
        Ok(())
    });
    let newest = *t.judging.changes().borrow();
    assert!(newest > 0);
    let other = PgLog::connect(t.url.as_deref().unwrap()).unwrap();
    assert_eq!(*other.changes().borrow(), newest);
}
