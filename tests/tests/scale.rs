//! Collectors over PostgreSQL: the real path (kernel → agent → spool →
//! stream → collector → PostgreSQL → CLI), and replicas sharing one
//! database with an agent that moves between them.

use std::{
    collections::HashSet,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use driftwatch_tests::{
    assert_stored_once, chmod_burst, pg_schema_url, policy, psql_value, run, stored_chmods,
    wait_stored, Agent, Collector, Dir,
};

/// The tests here share one PostgreSQL server, and one of them turns its
/// TLS on: run one at a time.
static SERVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Turns the server's TLS off again when dropped, however the test ends.
struct TlsOn<'a>(&'a str);

impl Drop for TlsOn<'_> {
    fn drop(&mut self) {
        psql_value(self.0, "ALTER SYSTEM RESET ssl");
        psql_value(self.0, "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(10);
        while psql_value(self.0, "SHOW ssl") != "off" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn real_changes_reach_the_timeline_through_a_collector_on_postgresql() {
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("e2e") else {
        return;
    };
    let dir = Dir::new();
    let cfg = dir.join("etc");
    std::fs::create_dir_all(&cfg).unwrap();
    let file = format!("{cfg}/app.conf");
    std::fs::write(&file, "threads = 4\n").unwrap();
    let collector = Collector::start_with(&["--store", &url]);
    assert!(
        collector.log().contains("postgres at 127.0.0.1"),
        "{}",
        collector.log()
    );
    let spool = dir.path.join("spool");
    let mut agent = Agent::streaming(
        &policy(&[format!("{cfg}/")], &[]),
        &collector,
        "pg-node",
        &spool,
    );
    agent.wait_policy_watching(&format!("{cfg}/"));
    run(Command::new("sed").args(["-i", "s/4/8/", &file]));
    run(Command::new("cp")
        .arg("/etc/hostname")
        .arg(format!("{cfg}/copied.conf")));
    run(&mut driftwatch_tests::python(&format!(
        "open({:?}, 'a').write('x = 1\\n')",
        file
    )));
    let timeline = collector.wait_timeline(
        &["--host", "pg-node", "--path", &format!("{cfg}/")],
        |items| {
            let execs: HashSet<&str> = items
                .iter()
                .filter(|v| v["type"] == "event" && v["kind"] == "file")
                .filter_map(|v| v["process"]["exe"].as_str())
                .collect();
            ["sed", "cp", "python3"].iter().all(|name| {
                execs
                    .iter()
                    .any(|e| e.rsplit('/').next().is_some_and(|b| b.starts_with(name)))
            })
        },
        "the sed, cp and python changes in the timeline",
    );
    assert!(!timeline.is_empty());
    // They are PostgreSQL's rows, not a local store's.
    let blocks: u64 = psql_value(&url, "SELECT count(*) FROM dw_blocks")
        .parse()
        .unwrap();
    assert!(blocks > 0, "no blocks in PostgreSQL");
    let agents = psql_value(
        &url,
        "SELECT count(*) FROM dw_agents WHERE node = 'pg-node'",
    );
    assert_eq!(agents, "1");
    drop(agent);
}

#[test]
fn an_agent_moves_to_another_replica_when_its_collector_is_killed_and_nothing_is_lost() {
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("replicas") else {
        return;
    };
    const CHANGES: u64 = 20_000;
    let dir = Dir::new();
    let tree = dir.join("models");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/ranker.bin");
    std::fs::write(&file, b"weights").unwrap();
    let mut a = Collector::start_with(&["--store", &url]);
    let b = Collector::start_with(&["--store", &url]);
    let spool = dir.path.join("spool");
    let both = format!("{},{}", a.url, b.url);
    let mut agent = Agent::start_with(
        &policy(&[format!("{tree}/")], &[]),
        &[
            "--collector",
            &both,
            "--node-name",
            "node-moving",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--heartbeat-interval",
            "1",
        ],
    );
    agent.wait_policy_watching(&format!("{tree}/"));
    let done = AtomicU64::new(0);
    let killed = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| chmod_burst(&file, CHANGES, Some(4_000), &AtomicBool::new(false), &done));
        // A third of the way in, once the first replica has stored some.
        while done.load(Ordering::Relaxed) < CHANGES / 3 {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !stored_chmods(&a, "node-moving", &file).is_empty(),
            "the first replica stored nothing before it was killed"
        );
        a.kill();
        killed.store(true, Ordering::Relaxed);
    });
    assert!(killed.load(Ordering::Relaxed));
    // Every event, once, through the replica that lived...
    let seqs = wait_stored(&b, "node-moving", &file, CHANGES as usize);
    assert_stored_once(&seqs, CHANGES as usize);
    // ...and the same view through the other one, started again.
    a.restart();
    let again = stored_chmods(&a, "node-moving", &file);
    assert_eq!(again, seqs, "both replicas show one timeline");
    let events = agent.stop();
    let stats = driftwatch_tests::final_stats(&events);
    assert_eq!(stats["file"]["dropped"], 0, "{stats}");
    assert!(
        b.log()
            .lines()
            .any(|l| l.contains("agent connected") && l.contains("node-moving")),
        "the second replica never saw the agent: {}",
        b.log()
    );
}

/// The collector speaks TLS to PostgreSQL and checks its certificate: a
/// server whose certificate chains to `--store-ca` is used (and the
/// server sees an encrypted connection); without that CA, the same server
/// is refused by name before anything is written.
#[test]
fn the_collector_checks_postgresqls_certificate() {
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("tls") else {
        return;
    };
    let dir = Dir::new();
    let pki = dir.path.join("pki");
    run(Command::new(driftwatch_tests::bin("driftwatch-collector"))
        .args(["certs", "init", "--dir"])
        .arg(&pki)
        .stdout(std::process::Stdio::null()));
    // The server's files, readable by the server's user only.
    let server = dir.path.join("server");
    std::fs::create_dir_all(&server).unwrap();
    for f in ["server.pem", "server-key.pem"] {
        std::fs::copy(pki.join(f), server.join(f)).unwrap();
    }
    run(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&server));
    run(Command::new("chmod")
        .arg("600")
        .arg(server.join("server-key.pem")));
    run(Command::new("chmod").arg("755").arg(&dir.path));
    psql_value(
        &url,
        &format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            server.join("server.pem").display()
        ),
    );
    psql_value(
        &url,
        &format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            server.join("server-key.pem").display()
        ),
    );
    psql_value(&url, "ALTER SYSTEM SET ssl = on");
    let _tls = TlsOn(&url);
    psql_value(&url, "SELECT pg_reload_conf()");
    let deadline = Instant::now() + Duration::from_secs(10);
    while psql_value(&url, "SHOW ssl") != "on" {
        assert!(Instant::now() < deadline, "PostgreSQL did not turn TLS on");
        std::thread::sleep(Duration::from_millis(100));
    }
    let tls_url = format!("{url}&sslmode=require&application_name=dw-tls-test");
    let ca = pki.join("ca.pem");
    let collector =
        Collector::start_with(&["--store", &tls_url, "--store-ca", ca.to_str().unwrap()]);
    let encrypted = psql_value(
        &url,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'dw-tls-test' AND s.ssl",
    );
    assert_ne!(encrypted, "0", "no encrypted connection from the collector");
    drop(collector);
    // The system's roots do not know this CA: refused, and said why.
    let out = Command::new(driftwatch_tests::bin("driftwatch-collector"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path.join("other"))
        .args(["--store", &tls_url])
        .output()
        .expect("run the collector");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PostgreSQL") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// `timeline --follow` asked of one replica shows what an agent streams
/// to another: each append's commit notifies the replicas that follow.
#[test]
fn a_follow_on_one_replica_shows_what_another_stores() {
    use std::io::BufRead as _;
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("follow") else {
        return;
    };
    let dir = Dir::new();
    let cfg = dir.join("etc");
    std::fs::create_dir_all(&cfg).unwrap();
    let file = format!("{cfg}/app.conf");
    std::fs::write(&file, "a = 1\n").unwrap();
    let a = Collector::start_with(&["--store", &url]);
    let b = Collector::start_with(&["--store", &url]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.log().contains("following the appends of other replicas") {
        assert!(
            Instant::now() < deadline,
            "replica b never listened: {}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut follow = b
        .command("")
        .args([
            "timeline",
            "--follow",
            "-o",
            "jsonl",
            "--host",
            "node-followed",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("driftwatch timeline --follow");
    let out = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let spool = dir.path.join("spool");
    let mut agent = Agent::streaming(
        &policy(&[format!("{cfg}/")], &[]),
        &a,
        "node-followed",
        &spool,
    );
    agent.wait_policy_watching(&format!("{cfg}/"));
    run(Command::new("chmod").args(["600", &file]));
    let seen = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the follow on replica b showed nothing within 60 s");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "event" && v["op"] == "chmod" && v["path"] == file.as_str() {
            break v;
        }
    };
    assert_eq!(seen["node"], "node-followed");
    let _ = follow.kill();
    let _ = follow.wait();
    drop(agent);
}

/// PostgreSQL crashes (an immediate restart: no shutdown checkpoint, the
/// asynchronous commits not yet flushed are lost) while an agent streams.
/// Acks meant durable, so the agent sends again what the crash took and
/// every event is stored once.
#[test]
fn postgresql_crashing_under_load_loses_and_duplicates_nothing() {
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("crash") else {
        return;
    };
    let (Ok(data), Ok(pg_bin)) = (
        std::env::var("DRIFTWATCH_TEST_POSTGRES_DATA"),
        std::env::var("DRIFTWATCH_TEST_POSTGRES_BIN"),
    ) else {
        panic!("DRIFTWATCH_TEST_POSTGRES_DATA and _BIN name the test server (cargo xtask test sets them)");
    };
    const CHANGES: u64 = 12_000;
    let dir = Dir::new();
    let tree = dir.join("models");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/ranker.bin");
    std::fs::write(&file, b"weights").unwrap();
    let collector = Collector::start_with(&["--store", &url]);
    let spool = dir.path.join("spool");
    let mut agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "node-crash",
        &spool,
    );
    agent.wait_policy_watching(&format!("{tree}/"));
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| chmod_burst(&file, CHANGES, Some(3_000), &AtomicBool::new(false), &done));
        while done.load(Ordering::Relaxed) < CHANGES / 3 {
            std::thread::sleep(Duration::from_millis(20));
        }
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{pg_bin}/pg_ctl"))
            .args(["restart", "-m", "immediate", "-w", "-D", &data])
            .stdout(std::process::Stdio::null()));
    });
    let seqs = wait_stored(&collector, "node-crash", &file, CHANGES as usize);
    assert_stored_once(&seqs, CHANGES as usize);
    // The crash happened under the collector: its connections broke.
    assert!(
        collector.log().to_lowercase().contains("connection closed"),
        "the collector never saw the server go: {}",
        collector.log()
    );
    let events = agent.stop();
    let stats = driftwatch_tests::final_stats(&events);
    assert_eq!(stats["file"]["dropped"], 0, "{stats}");
}

fn id(v: &serde_json::Value) -> String {
    v["id"].as_u64().expect("an id").to_string()
}

/// Two replicas over one PostgreSQL judge as one collector: a finding
/// opened through one is acknowledged through the other, a repeat judged
/// by the other folds into it, a scan asked of the replica the agent does
/// not stream to is done, and two approvals racing on both replicas make
/// one decision.
#[test]
fn replicas_share_findings_approvals_and_scans() {
    driftwatch_tests::require_root();
    let _server = one_at_a_time();
    let Some(url) = pg_schema_url("judging") else {
        return;
    };
    let dir = Dir::new();
    let tree = dir.join("srv/app");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/settings.yaml");
    std::fs::write(&file, "replicas: 2\n").unwrap();
    let policy_yaml = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"{tree}/\"]\n    writers: [ {{ exe: /usr/bin/install }} ]\n"
    );
    let mut a = Collector::judging(&policy_yaml, &["--store", &url]);
    let b = a.replica();
    let mut args = a.agent_args("node-shared");
    args[1] = format!("{},{}", a.url, b.url);
    let spool = dir.path.join("spool");
    args.extend(
        [
            "--node-name",
            "node-shared",
            "--spool-dir",
            spool.to_str().unwrap(),
            "--heartbeat-interval",
            "1",
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start_with(&policy_yaml, &args);
    agent.wait_policy_watching(&format!("{tree}/"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("agent connected") {
        assert!(
            Instant::now() < deadline,
            "the agent never streamed to the first replica: {}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Judged by the first replica, seen through the second.
    run(Command::new("sed").args(["-i", "s/2/3/", &file]));
    let unauthorized = |f: &[serde_json::Value]| {
        f.iter()
            .find(|x| x["kind"] == "unauthorized_write" && x["path"] == file.as_str())
            .cloned()
    };
    let seen = b.wait_findings(60, |f| unauthorized(f).is_some(), "the sed's finding");
    let finding = unauthorized(&seen).unwrap();
    let fid = id(&finding);
    // Acknowledged through the second, acknowledged on the first.
    b.cli_ok("bob", &["findings", "ack", &fid, "--note", "looking"]);
    let shown = a.json("", &["findings", "show", &fid]);
    assert_eq!(shown[0]["status"], "acknowledged", "{shown:#?}");
    let before = shown[0]["count"].as_u64().unwrap_or(0);

    // The first replica dies; the agent moves; the second judges the
    // repeat into the same finding.
    a.kill();
    run(Command::new("sed").args(["-i", "s/3/4/", &file]));
    let folded = b.wait_findings(
        90,
        |f| unauthorized(f).is_some_and(|x| x["count"].as_u64() > Some(before)),
        "the repeat folded into the finding",
    );
    let repeat = unauthorized(&folded).unwrap();
    assert_eq!(id(&repeat), fid, "one finding for both writes: {folded:#?}");
    assert_eq!(
        folded
            .iter()
            .filter(|x| x["kind"] == "unauthorized_write")
            .count(),
        1,
        "{folded:#?}"
    );
    assert!(
        b.log()
            .lines()
            .any(|l| l.contains("agent connected") && l.contains("node-shared")),
        "the agent never reached the second replica: {}",
        b.log()
    );

    // Back, the first replica shows the same; a scan asked of it reaches
    // the agent through the second, which it streams to now.
    a.restart();
    let again = a.json("", &["findings", "show", &fid]);
    assert_eq!(again[0]["count"], repeat["count"], "{again:#?}");
    let scan = a.cli_ok(
        "alice",
        &[
            "baseline",
            "scan",
            "--host",
            "node-shared",
            &tree,
            "--apply-to",
            "node-*",
        ],
    );
    assert!(
        String::from_utf8_lossy(&scan.stdout).contains("1 files"),
        "{}",
        String::from_utf8_lossy(&scan.stdout)
    );
    assert!(
        b.log()
            .contains("a scan recorded by another replica was asked of its agent"),
        "{}",
        b.log()
    );
    let baselines = b.json("", &["baseline", "list", "--hosts", "node-*"]);
    assert!(
        baselines
            .iter()
            .any(|x| x["path"] == file.as_str() && x["source"] == "scan"),
        "{baselines:#?}"
    );

    // Two approvers race on the two replicas: one decision.
    let req = a.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            "app-config",
            "--window",
            "1h",
            "--reason",
            "INC-7: revert the replica count",
        ],
    );
    let rid = id(&req[0]);
    let own = b.cli("alice", &["approvals", "approve", &rid]);
    assert!(
        !own.status.success(),
        "a self-approval through the other replica"
    );
    let (by_a, by_b) = std::thread::scope(|s| {
        let x = s.spawn(|| a.cli("bob", &["approvals", "approve", &rid]));
        let y = s.spawn(|| b.cli("reader", &["approvals", "deny", &rid]));
        (x.join().unwrap(), y.join().unwrap())
    });
    assert_ne!(
        by_a.status.success(),
        by_b.status.success(),
        "exactly one decision: approve {} / deny {}",
        String::from_utf8_lossy(&by_a.stderr),
        String::from_utf8_lossy(&by_b.stderr)
    );
    let loser = if by_a.status.success() { &by_b } else { &by_a };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("is already"),
        "{}",
        String::from_utf8_lossy(&loser.stderr)
    );
    let decided = b.json("", &["approvals", "show", &rid]);
    let it = &decided[0];
    let want = if by_a.status.success() {
        ("approved", "bob")
    } else {
        ("denied", "reader")
    };
    assert_eq!(
        (it["status"].as_str(), it["approver"].as_str()),
        (Some(want.0), Some(want.1))
    );
    drop(agent);
}
