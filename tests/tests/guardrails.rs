//! Guardrails end to end: real programs refused or killed by the real
//! kernel, the events and findings that say so read back through the CLI,
//! and access grants approved by a second principal opening the gate for
//! exactly one identity, for exactly their window.

use std::{
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::ExitStatusExt},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use driftwatch_tests::{c_helper, free_port, http_get, sha256_file, Agent, Collector, Dir};
use serde_json::Value;

/// The system Python, resolved (what a process reports as its exe).
fn system_python() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .expect("/usr/bin/python3 (Debian's python3) is installed")
        .display()
        .to_string()
}

/// A listener on every address (IPv4, IPv6 and IPv4-mapped) of `port`,
/// counting the connections it accepts.
fn listener(port: u16) -> Arc<AtomicU64> {
    let l = TcpListener::bind(("::", port)).expect("bind [::]:port (dual stack)");
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            if c.is_ok() {
                n.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    accepted
}

/// Python, as `user` (root when `None`), connects to `addr` on `port`;
/// returns `ok` or the exception's name.
fn py_connect(user: Option<&str>, addr: &str, port: u16) -> String {
    let script = format!(
        "import socket\nfam = socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET\ns = socket.socket(fam)\ntry:\n    s.connect(('{addr}', {port}))\n    print('ok')\nexcept OSError as e:\n    print(type(e).__name__)\n"
    );
    let mut cmd = match user {
        None => Command::new("/usr/bin/python3"),
        Some(u) => {
            let mut c = Command::new("setpriv");
            // The user's primary group, by number (nobody's is nogroup).
            let gid = nix::unistd::User::from_name(u)
                .ok()
                .flatten()
                .map(|x| x.gid.as_raw())
                .unwrap_or_else(|| panic!("no user {u}"));
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "/usr/bin/python3",
            ]);
            c
        }
    };
    let out = cmd.args(["-c", &script]).output().expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn db_policy(port: u16, mode: &str, clients: &str) -> String {
    format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: postgres\n    kind: database\n    ports: [{port}]\n    mode: {mode}\n    clients: {clients}\n"
    )
}

/// A listener on a free port, a collector judging a database policy on
/// it, and an agent of its own for `node`.
struct Guarded {
    port: u16,
    /// The agent's `/metrics` address.
    metrics: String,
    accepted: Arc<AtomicU64>,
    c: Collector,
    _agent: Agent,
    _dir: Dir,
}

fn guarded(mode: &str, clients: &str, node: &str) -> Guarded {
    let dir = Dir::new();
    let port = free_port();
    let accepted = listener(port);
    let policy = db_policy(port, mode, clients);
    let c = Collector::judging(&policy, &[]);
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = Agent::streaming_with(
        &policy,
        &c,
        node,
        &dir.path.join("spool"),
        &["--metrics-listen", &metrics],
    );
    Guarded {
        port,
        metrics,
        accepted,
        c,
        _agent: agent,
        _dir: dir,
    }
}

fn findings_of<'a>(f: &'a [Value], kind: &str, user: &str) -> Vec<&'a Value> {
    f.iter()
        .filter(|x| x["kind"] == kind && x["actor"]["user"] == user)
        .collect()
}

fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn enforce_refuses_non_clients_in_the_kernel_over_ipv4_ipv6_and_mapped_addresses() {
    let py = system_python();
    // Every field bound: what is left out of a pattern drops at once (the agent).
    let Guarded {
        port,
        metrics,
        accepted,
        c,
        _agent,
        _dir,
    } = guarded(
        "enforce",
        &format!("[ {{ exe: {py}, user: root }}, {{ user: daemon }} ]"),
        "node-db",
    );

    let addrs = ["127.0.0.1", "::1", "::ffff:127.0.0.1"];
    for a in addrs {
        // Python as root: a client by exe and user.
        assert_eq!(py_connect(None, a, port), "ok", "root's python to {a}");
        // Python as daemon: a client by user.
        assert_eq!(py_connect(Some("daemon"), a, port), "ok", "daemon to {a}");
        // Python as nobody: the right exe, the wrong user.
        assert_eq!(
            py_connect(Some("nobody"), a, port),
            "PermissionError",
            "nobody to {a}"
        );
    }
    // Root, but not Python: bash's /dev/tcp.
    let bash = Command::new("bash")
        .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
        .output()
        .expect("run bash");
    assert!(!bash.status.success());
    assert!(
        String::from_utf8_lossy(&bash.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&bash.stderr)
    );
    // Nothing refused ever reached the listener.
    wait_until(10, "6 connections accepted", || {
        accepted.load(Ordering::SeqCst) >= 6
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(accepted.load(Ordering::SeqCst), 6);

    let f = c.wait_findings(
        30,
        |f| {
            findings_of(f, "blocked", "nobody")
                .first()
                .is_some_and(|b| b["count"] == 3)
                && f.iter()
                    .any(|x| x["kind"] == "blocked" && x["actor"]["exe"] == "/usr/bin/bash")
        },
        "blocked findings for nobody's python (3 attempts) and root's bash",
    );
    let b = findings_of(&f, "blocked", "nobody")[0];
    assert_eq!(b["resource"], "postgres");
    assert_eq!(b["severity"], "high");
    assert_eq!(b["actor"]["exe"], py.as_str());
    assert!(b["summary"].as_str().unwrap().contains("EPERM"), "{b:#}");
    // Clients are neither blocked nor unauthorized.
    for user in ["root", "daemon"] {
        assert!(
            !f.iter().any(|x| x["actor"]["user"] == user
                && x["actor"]["exe"] == py.as_str()
                && x["kind"] != "agent_silent"),
            "{user}: {f:#?}"
        );
    }
    // The events say what the kernel did, per family.
    let t = c.wait_timeline(
        &["--host", "node-db", "--kind", "connect"],
        |t| t.iter().filter(|e| e["guardrail"] == "blocked").count() >= 4,
        "the refused connects",
    );
    let blocked: Vec<&Value> = t.iter().filter(|e| e["guardrail"] == "blocked").collect();
    for e in &blocked {
        assert_eq!(e["result"]["error"], "EPERM", "{e:#}");
    }
    assert!(blocked
        .iter()
        .any(|e| e["family"] == "ipv6" && e["address"] == "::1"));
    assert!(blocked
        .iter()
        .any(|e| e["family"] == "ipv6" && e["address"] == "::ffff:127.0.0.1"));
    assert!(t
        .iter()
        .any(|e| e["guardrail"] == "allowed" && e["process"]["user"] == "daemon"));
    // The agent counts its guardrails' decisions.
    let line = |text: &str, verdict: &str| -> f64 {
        let key = format!(
            "driftwatch_agent_guardrail_decisions_total{{kind=\"connect\",verdict=\"{verdict}\"}}"
        );
        text.lines()
            .find(|l| l.starts_with(&key))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let mut text = String::new();
    wait_until(10, "the agent's guardrail metrics", || {
        text = http_get(&metrics, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        line(&text, "blocked") >= 4.0
    });
    assert!(line(&text, "allowed") >= 6.0, "{text}");
}

#[test]
fn audit_lets_the_connect_through_and_reports_would_block() {
    // Every field bound: what is left out of a pattern drops at once (the agent).
    let Guarded {
        port,
        accepted,
        c,
        _agent,
        _dir,
        ..
    } = guarded("audit", "[ { user: daemon } ]", "node-audit");

    assert_eq!(py_connect(Some("nobody"), "127.0.0.1", port), "ok");
    wait_until(10, "the connect accepted", || {
        accepted.load(Ordering::SeqCst) == 1
    });
    let f = c.wait_findings(
        30,
        |f| !findings_of(f, "would_block", "nobody").is_empty(),
        "a would_block finding",
    );
    let w = findings_of(&f, "would_block", "nobody")[0];
    assert!(
        w["summary"].as_str().unwrap().contains("mode audit"),
        "{w:#}"
    );
    assert!(
        !f.iter().any(|x| x["kind"] == "blocked"),
        "audit blocked something: {f:#?}"
    );
}

#[test]
fn an_access_grant_opens_the_gate_for_its_identity_and_window_only() {
    let py = system_python();
    let Guarded {
        port,
        mut c,
        _agent,
        _dir,
        ..
    } = guarded(
        "enforce",
        &format!("[ {{ exe: {py}, user: root }} ]"),
        "node-grant",
    );
    assert_eq!(
        py_connect(Some("nobody"), "127.0.0.1", port),
        "PermissionError"
    );

    let id = c.request_access("postgres", "user=nobody", "6s");
    let shown = c.json("", &["approvals", "show", &id]);
    assert_eq!(shown[0]["who"], "user=nobody");
    assert_eq!(shown[0]["status"], "pending");
    // Pending: still closed.
    assert_eq!(
        py_connect(Some("nobody"), "127.0.0.1", port),
        "PermissionError"
    );
    let own = c.cli("alice", &["approvals", "approve", &id]);
    assert!(!own.status.success());
    assert!(String::from_utf8_lossy(&own.stderr).contains("self-approval is refused"));
    c.cli_ok("bob", &["approvals", "approve", &id]);
    let approved = Instant::now();

    // Open for nobody, once the grant reaches the agent's kernel...
    wait_until(5, "the gate opens for nobody", || {
        py_connect(Some("nobody"), "127.0.0.1", port) == "ok"
    });
    // ...and for nobody only.
    assert_eq!(
        py_connect(Some("daemon"), "127.0.0.1", port),
        "PermissionError"
    );
    // Closed again when the window ends, though the collector that
    // granted it is gone: the node's kernel holds the expiry.
    c.kill();
    wait_until(15, "the gate closes after the window", || {
        py_connect(Some("nobody"), "127.0.0.1", port) == "PermissionError"
    });
    assert!(
        approved.elapsed() >= Duration::from_secs(5),
        "closed before its window ended: {:?}",
        approved.elapsed()
    );
    c.restart();

    // The connects under the grant are recorded against it.
    let shown = c.wait_json(
        &["approvals", "show", &id],
        30,
        |s| s[0]["uses"].as_u64().unwrap_or(0) >= 1,
        "uses recorded under the grant",
    );
    assert_eq!(shown[0]["status"], "approved");
    let t = c.timeline(&["--host", "node-grant", "--kind", "connect"]);
    let granted: Vec<&Value> = t.iter().filter(|e| e["guardrail"] == "granted").collect();
    assert!(!granted.is_empty(), "{t:#?}");
    assert!(granted
        .iter()
        .all(|e| e["grant_id"].as_u64() == id.parse().ok() && e["process"]["user"] == "nobody"));
    // Granted connects are not findings: every blocked attempt of
    // nobody's is one the timeline shows refused.
    let refused = t
        .iter()
        .filter(|e| e["guardrail"] == "blocked" && e["process"]["user"] == "nobody")
        .count() as u64;
    let f = c.json("", &["findings", "list", "--all"]);
    let b = findings_of(&f, "blocked", "nobody");
    assert_eq!(b.len(), 1, "{f:#?}");
    assert_eq!(b[0]["count"].as_u64(), Some(refused), "{f:#?}");
    assert!(
        !f.iter().any(|x| x["kind"] == "unauthorized_connect"),
        "{f:#?}"
    );
}

#[test]
fn a_denied_grant_leaves_the_gate_closed() {
    let Guarded {
        port,
        c,
        _agent,
        _dir,
        ..
    } = guarded("enforce", "[ { user: daemon } ]", "node-deny");
    let id = c.request_access("postgres", "user=nobody", "1m");
    let no = c.cli("bob", &["approvals", "deny", &id]);
    assert!(no.status.success());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        py_connect(Some("nobody"), "127.0.0.1", port),
        "PermissionError"
    );
    // A request naming a resource without ports, or a bad selector, is refused.
    for (args, says) in [
        (
            vec!["--access", "nowhere", "--who", "user=nobody"],
            "no resource named",
        ),
        (
            vec!["--access", "postgres", "--who", "colour=red"],
            "unknown field",
        ),
    ] {
        let mut all = vec!["approvals", "request", "--reason", "x"];
        all.extend(args);
        let out = c.cli("alice", &all);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

/// A directory nobody may write under, holding a protected config.
fn protected(dir: &Dir) -> (String, String) {
    let tree = dir.join("etc/app");
    std::fs::create_dir_all(&tree).unwrap();
    let mut p = std::path::PathBuf::from(&tree);
    while p != dir.path {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        p.pop();
    }
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = format!("{tree}/app.conf");
    std::fs::write(&file, "pool=10\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    (tree, file)
}

fn config_policy(tree: &str, mode: &str) -> String {
    format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"{tree}/\"]\n    mode: {mode}\n    writers: [ {{ exe: /usr/bin/cp }} ]\n"
    )
}

#[test]
fn enforce_kills_a_non_writer_before_it_writes_and_lets_writers_through() {
    let dir = Dir::new();
    let (tree, file) = protected(&dir);
    // Made before the agent starts: the test is no writer either.
    let uring = c_helper(&dir, "uring");
    let deep = format!("{tree}/{}", vec!["d".repeat(60); 20].join("/"));
    std::fs::create_dir_all(&deep).unwrap();
    let deep_file = format!("{deep}/deep.conf");
    std::fs::write(&deep_file, "pool=10\n").unwrap();
    let policy = config_policy(&tree, "enforce");
    let c = Collector::judging(&policy, &[]);
    let _agent = Agent::streaming(&policy, &c, "node-files", &dir.path.join("spool"));
    let before = sha256_file(&file);

    // A shell appending: killed at its open, nothing written.
    let sh = Command::new("sh")
        .args(["-c", &format!("echo x >> {file}")])
        .status()
        .unwrap();
    assert_eq!(sh.signal(), Some(9), "{sh:?}");
    assert_eq!(sha256_file(&file), before);
    // sed -i: killed at its temporary file's open, so no rename into place.
    let sed = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sed",
            "-i",
            "s/pool=10/pool=500/",
            &file,
        ])
        .status()
        .unwrap();
    assert_eq!(sed.signal(), Some(9), "{sed:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pool=10\n");
    // Python writing: killed before its write.
    let py = Command::new("/usr/bin/python3")
        .args([
            "-c",
            &format!("f = open('{file}', 'a'); f.write('evil\\n'); f.close()"),
        ])
        .status()
        .unwrap();
    assert_eq!(py.signal(), Some(9));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pool=10\n");
    // io_uring requests naming the file, by a short path and by a path
    // too long for a record: killed at submission, before the request runs.
    let file_ = file.as_str();
    // The finding's summary is its latest attempt's: an unlink comes last.
    let cases: [(&[&str], &str, &str); 6] = [
        // An open linked to a write on the fd it will get: killed at the
        // open's completion, the write never runs.
        (&["write-linked", file_, "evil\n"], &tree, "0"),
        (&["write-linked", file_, "evil\n"], &tree, "1"),
        // An open (with O_TRUNC) into a fixed-file slot: judged by its name
        // at submission, cancelled before it truncates.
        (&["write-fixed", file_, "evil\n"], &tree, "0"),
        (&["unlink", file_], &tree, "0"),
        // Submitted by the ring's kernel thread, not by the process.
        (&["unlink", file_], &tree, "1"),
        (&["unlink", "deep.conf"], &deep, "0"),
    ];
    for (args, cwd, sqpoll) in cases {
        let out = Command::new(&uring)
            .args(args)
            .current_dir(cwd)
            .env("URING_SQPOLL", sqpoll)
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(9), "{args:?}: {out:?}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pool=10\n");
    assert_eq!(std::fs::read_to_string(&deep_file).unwrap(), "pool=10\n");
    // chmod by a non-writer: the call ran (the fallback cannot undo it),
    // the caller was killed all the same.
    let chmod = Command::new("chmod")
        .args(["0600", &file])
        .status()
        .unwrap();
    assert_eq!(chmod.signal(), Some(9));

    // The writer goes through.
    let new = dir.join("new.conf");
    std::fs::write(&new, "pool=20\n").unwrap();
    let cp = Command::new("/usr/bin/cp")
        .args([&new, &file])
        .status()
        .unwrap();
    assert!(cp.success(), "{cp:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pool=20\n");

    let f = c.wait_findings(
        30,
        |f| {
            f.iter()
                .filter(|x| x["kind"] == "blocked" && x["resource"] == "app-config")
                .count()
                >= 5
                && f.iter().any(|x| x["kind"] == "blocked" && x["count"] == 6)
        },
        "blocked findings for sh, sed, python, chmod and six io_uring requests",
    );
    let exes: Vec<&str> = f
        .iter()
        .filter(|x| x["kind"] == "blocked")
        .filter_map(|x| x["actor"]["exe"].as_str())
        .collect();
    for exe in ["/usr/bin/sed", "/usr/bin/chmod", uring.as_str()] {
        assert!(exes.contains(&exe), "{exes:?}");
    }
    let killed = f
        .iter()
        .find(|x| x["kind"] == "blocked" && x["actor"]["exe"] == "/usr/bin/sed")
        .unwrap();
    assert!(
        killed["summary"].as_str().unwrap().contains("killed"),
        "{killed:#}"
    );
    let by_uring = f
        .iter()
        .find(|x| x["kind"] == "blocked" && x["actor"]["exe"] == uring.as_str())
        .unwrap();
    assert_eq!(by_uring["count"], 6, "{by_uring:#}");
    assert!(
        by_uring["summary"]
            .as_str()
            .unwrap()
            .contains("refused before it ran"),
        "{by_uring:#}"
    );
    assert!(!f
        .iter()
        .any(|x| x["actor"]["exe"] == "/usr/bin/cp" && x["kind"] == "blocked"));
    let t = c.wait_timeline(
        &["--host", "node-files", "--kind", "file"],
        |t| {
            t.iter()
                .any(|e| e["guardrail"] == "allowed" && e["process"]["exe"] == "/usr/bin/cp")
        },
        "the writer's change",
    );
    for path in [&file, &deep_file] {
        assert!(
            t.iter().any(|e| e["guardrail"] == "killed"
                && e["path"] == path.as_str()
                && e["op"] == "unlink"
                && e["via"] == "io_uring"
                && e["result"]["error"] == "ECANCELED"),
            "no killed, cancelled io_uring unlink of {path}"
        );
    }
    // The linked opens ran (judged at completion); their writes did not.
    assert!(
        t.iter().any(|e| e["guardrail"] == "killed"
            && e["path"] == file.as_str()
            && e["op"] == "open"
            && e["via"] == "io_uring"
            && e["result"]["ok"] == true),
        "no killed io_uring open of {file}"
    );
    assert!(t
        .iter()
        .any(|e| e["guardrail"] == "killed" && e["path"] == file.as_str()));
}

#[test]
fn audit_on_files_kills_nothing_and_reports_would_block() {
    let dir = Dir::new();
    let (tree, file) = protected(&dir);
    let policy = config_policy(&tree, "audit");
    let c = Collector::judging(&policy, &[]);
    let _agent = Agent::streaming(&policy, &c, "node-files-audit", &dir.path.join("spool"));
    let sh = Command::new("sh")
        .args(["-c", &format!("echo x >> {file}")])
        .status()
        .unwrap();
    assert!(sh.success(), "{sh:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "pool=10\nx\n");
    c.wait_findings(
        30,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "would_block" && x["path"] == file.as_str())
        },
        "a would_block finding",
    );
}
