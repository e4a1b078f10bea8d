//! The rules on synthetic event sequences, in orders the agent can produce
//! but a live test cannot force.

use driftwatch_proto::v1::{Approval, Digest, Event, FileChange, Outcome, Process};

use super::*;
use crate::store::{
    judging_kv::{MemoryJudging, SledJudging},
    memory::MemoryLog,
    postgres::PgLog,
    sled_store::SledStore,
};

const SHA_OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const SHA_NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// The correlator over one backend's log and judging state.
struct Fixture {
    c: Correlator,
    seq: u64,
    /// What the correlator runs over, kept across a restart.
    backend: Backend,
}

enum Backend {
    Sled(tempfile::TempDir),
    Memory(Arc<MemoryLog>, Arc<MemoryJudging>),
    Postgres {
        url: String,
        _server: std::sync::RwLockReadGuard<'static, ()>,
    },
}

fn who(exe: &str) -> Process {
    Process {
        exe: exe.into(),
        exec_id: format!("id-{exe}"),
        user: "root".into(),
        ..Default::default()
    }
}

fn policies() -> Policies {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: models\n    kind: model\n    paths: [\"/m/\"]\n    writers: [ { exe: /opt/trainer } ]\n",
    )
    .expect("policy");
    Policies::open(Some(policy)).expect("valid policy")
}

/// A correlator over what `backend` holds (opened again: a restart).
fn correlator(backend: &Backend) -> Correlator {
    let (judging, log): (Arc<dyn Judging>, Arc<dyn EventLog>) = match backend {
        Backend::Sled(dir) => {
            let store = SledStore::reopen_for_test(dir.path());
            (
                Arc::new(SledJudging::open(store.clone()).expect("judging state")),
                Arc::new(store),
            )
        }
        Backend::Memory(log, judging) => (judging.clone(), log.clone()),
        Backend::Postgres { url, .. } => {
            let pg = Arc::new(PgLog::connect(url).expect("postgres"));
            (pg.clone(), pg)
        }
    };
    Correlator::open(
        judging,
        log,
        policies(),
        Settings {
            learn: true,
            silent_after: Duration::from_secs(30),
        },
    )
    .expect("correlator")
}

impl Fixture {
    /// A fresh correlator on the backend named `sled`, `memory` or
    /// `postgres` (`None`: skipped, see `TestLog::postgres`).
    fn on(backend: &str) -> Option<Self> {
        let backend = match backend {
            "sled" => Backend::Sled(tempfile::tempdir().expect("tempdir")),
            "memory" => Backend::Memory(
                Arc::new(MemoryLog::new()),
                Arc::new(MemoryJudging::memory()),
            ),
            _ => {
                let server = crate::store::tests::shared_server();
                Backend::Postgres {
                    url: crate::store::tests::pg_schema_url()?,
                    _server: server,
                }
            }
        };
        Some(Self {
            c: correlator(&backend),
            seq: 0,
            backend,
        })
    }

    /// The collector stopped and started again on the same store.
    fn restart(self) -> Self {
        let Self { c, seq, backend } = self;
        drop(c);
        Self {
            c: correlator(&backend),
            seq,
            backend,
        }
    }

    fn feed(&mut self, kind: event::Event, process: Option<Process>) {
        self.seq += 1;
        let e = Event {
            event: Some(kind),
            process,
            seq: self.seq,
            time_unix_nanos: now_unix_nanos(),
            node: "n".into(),
            chain: Vec::new(),
        };
        self.c.process("n", &[e]).expect("judged");
    }

    fn file(&mut self, op: &str, path: &str, new_path: &str, exe: &str) {
        self.feed(
            event::Event::File(FileChange {
                op: op.into(),
                path: path.into(),
                new_path: new_path.into(),
                resource: "models".into(),
                result: Some(Outcome {
                    ok: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            Some(who(exe)),
        );
    }

    fn digest(&mut self, path: &str, sha: Option<&str>, reason: &str) {
        self.feed(
            event::Event::Digest(Digest {
                path: path.into(),
                resource: "models".into(),
                exists: sha.is_some(),
                sha256: sha.unwrap_or_default().into(),
                size: 1,
                mode: 0o644,
                reason: reason.into(),
                ..Default::default()
            }),
            None,
        );
    }

    fn approve(&mut self, sha: &str) -> u64 {
        let a = self
            .c
            .request(Approval {
                resource: "models".into(),
                host: "*".into(),
                sha256: sha.into(),
                window_seconds: 3600,
                reason: "test".into(),
                requester: "alice".into(),
                requested_unix_nanos: now_unix_nanos(),
                ..Default::default()
            })
            .expect("request");
        assert!(matches!(
            self.c.decide(a.id, true, "alice", ""),
            Err(ApprovalError::SelfApproval { .. })
        ));
        self.c.decide(a.id, true, "bob", "").expect("approve");
        a.id
    }

    fn findings(&self) -> Vec<driftwatch_proto::v1::Finding> {
        self.c
            .with_tx(|tx| tx.findings(100, &|_| true))
            .expect("list")
    }
}

use approvals::ApprovalError;

/// Runs each `name(Fixture)` on every backend: as `sled::name`,
/// `memory::name` and `postgres::name`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        on_every_backend!(@one sled; $($name),*);
        on_every_backend!(@one memory; $($name),*);
        on_every_backend!(@one postgres; $($name),*);
    };
    (@one $backend:ident; $($name:ident),*) => {
        mod $backend {
            $(
                #[test]
                fn $name() {
                    if let Some(f) = super::Fixture::on(stringify!($backend)) {
                        super::$name(f);
                    }
                }
            )*
        }
    };
}

on_every_backend!(
    an_approved_swap_through_a_temporary_file_is_not_flagged_whatever_the_digest_order,
    a_swap_to_other_content_under_an_approval_is_drift_and_unauthorized,
    a_temporary_file_that_comes_and_goes_is_not_reported_deleted,
    judged_events_are_not_judged_again,
    a_scan_requested_before_a_restart_still_sets_baselines,
    a_finding_only_looked_at_is_not_a_change,
    repeats_fold_in_place_and_a_changed_repeat_still_updates_the_finding,
);

fn an_approved_swap_through_a_temporary_file_is_not_flagged_whatever_the_digest_order(
    mut f: Fixture,
) {
    f.digest("/m/w.bin", Some(SHA_OLD), "watch");
    let id = f.approve(SHA_NEW);
    // A non-writer writes a temporary file and renames it into place; the
    // temporary file's digest arrives only after it is gone.
    f.file("close_write", "/m/.w.tmp", "", "/usr/bin/python3");
    f.file("rename", "/m/.w.tmp", "/m/w.bin", "/usr/bin/python3");
    f.digest("/m/.w.tmp", None, "change");
    f.digest("/m/w.bin", Some(SHA_NEW), "change");
    assert!(f.findings().is_empty(), "{:#?}", f.findings());
    let a =
        f.c.with_tx(|tx| tx.approval(id))
            .expect("read")
            .expect("approval");
    assert_eq!(a.changes.len(), 1);
    assert_eq!(a.changes[0].actors[0].exe, "/usr/bin/python3");
}

fn a_swap_to_other_content_under_an_approval_is_drift_and_unauthorized(mut f: Fixture) {
    f.digest("/m/w.bin", Some(SHA_OLD), "watch");
    f.approve(SHA_NEW);
    f.file("close_write", "/m/.w.tmp", "", "/usr/bin/python3");
    f.file("rename", "/m/.w.tmp", "/m/w.bin", "/usr/bin/python3");
    f.digest("/m/.w.tmp", None, "change");
    let other = "3".repeat(64);
    f.digest("/m/w.bin", Some(&other), "change");
    let kinds: Vec<String> = f.findings().into_iter().map(|x| x.kind).collect();
    assert!(kinds.contains(&"drift".to_owned()), "{kinds:?}");
    assert!(
        kinds.contains(&"unauthorized_write".to_owned()),
        "{kinds:?}"
    );
}

fn a_temporary_file_that_comes_and_goes_is_not_reported_deleted(mut f: Fixture) {
    f.file("close_write", "/m/.x.tmp", "", "/opt/trainer");
    f.digest("/m/.x.tmp", Some(SHA_NEW), "change");
    f.digest("/m/.x.tmp", None, "change");
    assert!(f.findings().is_empty(), "{:#?}", f.findings());
    // A file that was there when watching began is.
    f.digest("/m/w.bin", Some(SHA_OLD), "watch");
    f.digest("/m/w.bin", None, "change");
    assert_eq!(f.findings()[0].kind, "deleted");
}

fn judged_events_are_not_judged_again(mut f: Fixture) {
    f.digest("/m/w.bin", Some(SHA_OLD), "watch");
    f.file("chmod", "/m/w.bin", "", "/usr/bin/chmod");
    let e = Event {
        event: Some(event::Event::File(FileChange {
            op: "chmod".into(),
            path: "/m/w.bin".into(),
            resource: "models".into(),
            result: Some(Outcome {
                ok: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
        process: Some(who("/usr/bin/chmod")),
        seq: f.seq,
        time_unix_nanos: now_unix_nanos(),
        node: "n".into(),
        chain: Vec::new(),
    };
    // Redelivered after a restart: the cursor skips it.
    f.c.process("n", &[e]).expect("judged");
    let list = f.findings();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].count, 1);
}

fn a_scan_requested_before_a_restart_still_sets_baselines(f: Fixture) {
    f.c.start_scan("scan-1", "n", "/m", "prod-*", "alice")
        .expect("scan");
    let mut f = f.restart();
    f.feed(
        event::Event::Digest(Digest {
            path: "/m/a.bin".into(),
            resource: "models".into(),
            exists: true,
            sha256: SHA_NEW.into(),
            size: 1,
            mode: 0o644,
            reason: "scan".into(),
            scan_id: "scan-1".into(),
            ..Default::default()
        }),
        None,
    );
    let b =
        f.c.with_tx(|tx| Ok(baselines::best(&tx.baselines_of("/m/a.bin")?, "prod-1").cloned()))
            .expect("read")
            .expect("a baseline from the scan");
    assert_eq!(b.source, baselines::SCAN);
    assert_eq!(b.set_by, "alice");
    assert_eq!(b.host, "prod-*");
    // Done: forgotten on disk too, so a third start does not keep it.
    f.feed(
        event::Event::ScanDone(driftwatch_proto::v1::ScanDone {
            scan_id: "scan-1".into(),
            ..Default::default()
        }),
        None,
    );
    // Done, with what it took, for whoever waits for it on any replica.
    let f = f.restart();
    let scan =
        f.c.with_tx(|tx| tx.scan("scan-1"))
            .expect("read")
            .expect("the scan's record");
    assert!(scan.done);
    assert_eq!((scan.files, scan.errors), (1, 0));
}

fn repeats_fold_in_place_and_a_changed_repeat_still_updates_the_finding(mut f: Fixture) {
    let writes = |f: &Fixture| -> Vec<driftwatch_proto::v1::Finding> {
        f.findings()
            .into_iter()
            .filter(|x| x.kind == "unauthorized_write")
            .collect()
    };
    for _ in 0..3 {
        f.file("open", "/m/a.bin", "", "/usr/bin/cp");
    }
    let w = writes(&f);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert_eq!(w[0].count, 3);
    assert_eq!(w[0].evidence.len(), 3);
    assert!(
        w[0].summary.contains("changed /m/a.bin (open)"),
        "{}",
        w[0].summary
    );

    // Another op, another path and another process of the same program:
    // the same finding, with what it says brought up to date.
    f.file("truncate", "/m/a.bin", "", "/usr/bin/cp");
    assert!(writes(&f)[0].summary.contains("(truncate)"));
    f.file("open", "/m/b.bin", "", "/usr/bin/cp");
    let w = writes(&f);
    assert_eq!(w[0].path, "/m/b.bin");
    assert!(
        w[0].summary.contains("changed /m/b.bin (open)"),
        "{}",
        w[0].summary
    );
    let mut other = who("/usr/bin/cp");
    other.pid = 77;
    f.feed(
        event::Event::File(FileChange {
            op: "open".into(),
            path: "/m/b.bin".into(),
            resource: "models".into(),
            result: Some(Outcome {
                ok: false,
                errno: 13,
                error: "EACCES".into(),
            }),
            ..Default::default()
        }),
        Some(other),
    );
    let w = writes(&f);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].count, 6);
    assert_eq!(w[0].failed, 1);
    assert_eq!(w[0].actor.as_ref().map(|a| a.pid), Some(77));
    assert!(
        w[0].summary.contains("tried to change /m/b.bin"),
        "{}",
        w[0].summary
    );
}

fn a_finding_only_looked_at_is_not_a_change(mut f: Fixture) {
    f.digest("/m/w.bin", Some(SHA_OLD), "watch");
    f.digest("/m/w.bin", Some(SHA_NEW), "change");
    assert_eq!(f.findings()[0].kind, "drift");
    let changes = f.c.judging().changes();
    let before = *changes.borrow();
    // The same state reported again reads the open finding and leaves it.
    f.digest("/m/w.bin", Some(SHA_NEW), "change");
    assert_eq!(*changes.borrow(), before, "a read finding was written back");
    let log =
        f.c.with_tx(|tx| tx.changes_after(before, 10))
            .expect("read the change log");
    assert!(log.is_empty(), "{log:#?}");
}
