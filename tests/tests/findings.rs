//! Correlation end to end: a real collector judging with a policy it pushes
//! to a real agent, real writers and connects, findings read back through
//! the `driftwatch` CLI.

use std::{
    os::unix::fs::PermissionsExt,
    process::Command,
    time::{Duration, Instant},
};

use driftwatch_tests::{free_port, python, run, sha256_file, Agent, Collector, Dir};
use serde_json::Value;

fn find<'a>(f: &'a [Value], kind: &str, path: &str) -> Option<&'a Value> {
    f.iter().find(|x| x["kind"] == kind && x["path"] == path)
}

fn has(f: &[Value], kind: &str, path: &str) -> bool {
    find(f, kind, path).is_some()
}

/// A tree anyone may write (for writers that are not root), under a
/// directory anyone may enter.
fn open_tree(dir: &Dir, rel: &str) -> String {
    let tree = dir.join(rel);
    std::fs::create_dir_all(&tree).expect("mkdir");
    let mut p = std::path::PathBuf::from(&tree);
    while p != dir.path {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        p.pop();
    }
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tree
}

fn config_policy(tree: &str, writers: &str) -> String {
    format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"{tree}/\"]\n    writers: {writers}\n"
    )
}

fn id(v: &Value) -> String {
    v["id"].as_u64().expect("an id").to_string()
}

#[test]
fn sed_by_a_non_writer_is_drift_and_an_unauthorized_write() {
    let dir = Dir::new();
    let tree = open_tree(&dir, "etc/app");
    let file = format!("{tree}/app.conf");
    std::fs::write(&file, "pool=10\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let before = sha256_file(&file);
    let c = Collector::judging(
        &config_policy(
            &tree,
            "[ { exe: /usr/bin/ansible-playbook }, { user: deploy } ]",
        ),
        &[],
    );
    // No policy of its own: what it watches comes from the collector.
    let _agent = Agent::managed(&c, "node-sed", &dir.path.join("spool"));

    run(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "sed",
        "-i",
        "s/pool=10/pool=500/",
        &file,
    ]));
    let after = sha256_file(&file);
    let f = c.wait_findings(
        30,
        |f| has(f, "drift", &file) && has(f, "unauthorized_write", &file),
        "drift and unauthorized_write on app.conf",
    );
    let drift = find(&f, "drift", &file).unwrap();
    assert_eq!(drift["host"], "node-sed");
    assert_eq!(drift["resource"], "app-config");
    assert_eq!(drift["status"], "open");
    assert!(drift["differences"]
        .as_array()
        .unwrap()
        .contains(&"content".into()));
    assert_eq!(drift["desired"]["sha256"], before.as_str());
    assert_eq!(drift["actual"]["sha256"], after.as_str());
    assert_eq!(drift["actor"]["user"], "nobody", "{drift:#}");
    let w = find(&f, "unauthorized_write", &file).unwrap();
    assert_eq!(w["actor"]["user"], "nobody");
    assert_eq!(w["actor"]["uid"], 65534);
    assert_eq!(w["actor"]["exe"], "/usr/bin/sed");
    assert_eq!(w["resource"], "app-config");
    // The evidence is the real events: sed's rename into place among them.
    let shown = c.json("", &["findings", "show", &id(w)]);
    let events = shown[0]["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "file" && e["op"] == "rename" && e["new_path"] == file.as_str()),
        "{events:#?}"
    );
    // Sed's temporary file is not reported deleted.
    assert!(
        !f.iter().any(|x| x["kind"] == "deleted"),
        "a temporary file reported: {f:#?}"
    );
    // The table names the finding too.
    let table = c.cli("reader", &["findings", "list", "--kind", "drift"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains(&file));
}

#[test]
fn an_approved_change_is_an_audit_record_and_a_denied_one_is_drift() {
    let dir = Dir::new();
    let tree = open_tree(&dir, "srv/app");
    let file = format!("{tree}/settings.yaml");
    std::fs::write(&file, "replicas: 2\n").unwrap();
    let c = Collector::judging(
        &config_policy(&tree, "[ { exe: /usr/bin/sed, uid: 0 } ]"),
        &[],
    );
    let _agent = Agent::managed(&c, "node-appr", &dir.path.join("spool"));

    let wanted = dir.join("wanted");
    std::fs::write(&wanted, "replicas: 6\n").unwrap();
    let req = c.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            "app-config",
            "--window",
            "1h",
            "--digest",
            &sha256_file(&wanted),
            "--reason",
            "scale out for the launch",
        ],
    );
    assert_eq!(req[0]["requester"], "alice");
    assert_eq!(req[0]["status"], "pending");
    let a = id(&req[0]);
    // Self-approval is refused, and so is an anonymous one.
    let own = c.cli("alice", &["approvals", "approve", &a]);
    assert!(!own.status.success());
    let err = String::from_utf8_lossy(&own.stderr);
    assert!(
        err.contains("self-approval is refused") && err.contains("alice"),
        "{err}"
    );
    let anon = c.cli("", &["approvals", "approve", &a]);
    assert!(!anon.status.success());
    assert!(String::from_utf8_lossy(&anon.stderr).contains("needs a credential"));
    c.cli_ok("bob", &["approvals", "approve", &a]);

    run(Command::new("sed").args(["-i", "s/replicas: 2/replicas: 6/", &file]));
    let after = sha256_file(&file);
    let change_of = |shown: &[Value]| {
        shown[0]["changes"]
            .as_array()
            .and_then(|v| v.iter().find(|ch| ch["path"] == file.as_str()))
            .cloned()
    };
    let shown = c.wait_json(
        &["approvals", "show", &a],
        30,
        |s| change_of(s).is_some(),
        "an approved change",
    );
    let change = change_of(&shown).unwrap();
    assert_eq!(change["after"]["sha256"], after.as_str());
    assert_eq!(change["actors"][0]["exe"], "/usr/bin/sed");
    assert_eq!(change["host"], "node-appr");
    // The approval's record says what it let change.
    assert_eq!(
        change["diff"],
        serde_json::json!([{"op": "changed", "key": "replicas", "old": "2", "new": "6", "masked": false}])
    );
    let table = c.cli_ok("reader", &["approvals", "show", &a]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("replicas: 2 → 6"));
    let f = c.json("", &["findings", "list", "--all"]);
    assert!(
        !f.iter().any(|x| x["path"] == file.as_str()),
        "an approved change was flagged: {f:#?}"
    );
    let base = c.json("", &["baseline", "list", "--path", &file]);
    assert_eq!(base[0]["source"], "approved");
    assert_eq!(base[0]["state"]["sha256"], after.as_str());

    // The same writer without an approval: drift (but no unauthorized write).
    let req = c.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            &file,
            "--reason",
            "again",
        ],
    );
    let denied = c.cli("bob", &["approvals", "deny", &id(&req[0])]);
    assert!(denied.status.success());
    run(Command::new("sed").args(["-i", "s/replicas: 6/replicas: 60/", &file]));
    let f = c.wait_findings(
        30,
        |f| has(f, "drift", &file),
        "drift after a denied request",
    );
    assert!(!has(&f, "unauthorized_write", &file), "{f:#?}");
}

#[test]
fn a_model_replaced_with_cp_drifts_and_approving_it_resolves_the_finding() {
    let dir = Dir::new();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let model = format!("{models}/ranker.bin");
    std::fs::write(&model, vec![7u8; 1 << 20]).unwrap();
    let old = sha256_file(&model);
    let candidate = dir.join("candidate.bin");
    std::fs::write(&candidate, vec![9u8; 1 << 20]).unwrap();
    let new = sha256_file(&candidate);
    let policy = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: models\n    kind: model\n    paths: [\"{models}/\"]\n    writers: [ {{ exe: /opt/trainer/bin/trainer }} ]\n"
    );
    let mut c = Collector::judging(&policy, &[]);
    let _agent = Agent::managed(&c, "node-model", &dir.path.join("spool"));

    run(Command::new("cp").args([&candidate, &model]));
    let f = c.wait_findings(30, |f| has(f, "drift", &model), "drift of the model");
    let drift = find(&f, "drift", &model).unwrap();
    assert_eq!(drift["desired"]["sha256"], old.as_str());
    assert_eq!(drift["actual"]["sha256"], new.as_str());
    assert_eq!(drift["actor"]["exe"], "/usr/bin/cp");
    let w = find(&f, "unauthorized_write", &model).expect("cp is not the trainer");
    assert_eq!(w["actor"]["exe"], "/usr/bin/cp");

    // A wrong digest is refused with a clear error.
    let bad = c.cli(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            "models",
            "--digest",
            "abc",
            "--reason",
            "x",
        ],
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a SHA-256"));
    let req = c.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            "models",
            "--digest",
            &new,
            "--reason",
            "ship ranker v2",
        ],
    );
    let a = id(&req[0]);
    c.cli_ok("bob", &["approvals", "approve", &a]);
    let f = c.json("", &["findings", "list", "--all", "--kind", "drift"]);
    let drift = find(&f, "drift", &model).unwrap();
    assert_eq!(drift["status"], "resolved");
    assert_eq!(
        drift["approval_id"].as_u64().map(|x| x.to_string()),
        Some(a.clone())
    );
    let shown = c.json("", &["findings", "show", &id(drift)]);
    assert_eq!(shown[0]["approval"]["requester"], "alice");
    assert_eq!(shown[0]["approval"]["approver"], "bob");
    // The approved content is now the desired state.
    let base = c.json("", &["baseline", "list", "--path", &model]);
    assert_eq!(base[0]["state"]["sha256"], new.as_str());

    // What people decided survives a collector killed without warning.
    c.kill();
    c.restart();
    let shown = c.json("", &["approvals", "show", &a]);
    assert_eq!(shown[0]["status"], "approved");
    let f = c.json("", &["findings", "list", "--all", "--kind", "drift"]);
    assert_eq!(find(&f, "drift", &model).unwrap()["status"], "resolved");

    // Approved first, then swapped by a non-writer through a temporary file
    // and os.replace: an approved change, and no finding.
    let v3 = dir.join("v3.bin");
    std::fs::write(&v3, vec![3u8; 1 << 20]).unwrap();
    let req = c.json(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            &format!("{models}/"),
            "--digest",
            &sha256_file(&v3),
            "--reason",
            "ranker v3",
        ],
    );
    let a3 = id(&req[0]);
    assert!(c
        .cli("bob", &["approvals", "approve", &a3])
        .status
        .success());
    run(&mut python(&format!(
        "import os, shutil\nshutil.copy('{v3}', '{models}/.ranker.tmp')\nos.replace('{models}/.ranker.tmp', '{model}')"
    )));
    c.wait_json(
        &["approvals", "show", &a3],
        30,
        |s| s[0]["changes"].as_array().is_some_and(|v| !v.is_empty()),
        "the swap recorded as approved",
    );
    let f = c.json("", &["findings", "list", "--all"]);
    assert!(
        !f.iter().any(|x| x["actor"]["exe"]
            .as_str()
            .is_some_and(|e| e.contains("python"))),
        "an approved swap was flagged: {f:#?}"
    );
}

#[test]
fn chmod_of_a_config_is_drift_on_mode_until_it_is_put_back() {
    let dir = Dir::new();
    let tree = dir.join("etc/svc");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/svc.conf");
    std::fs::write(&file, "x=1\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let c = Collector::judging(&config_policy(&tree, "[ { user: deploy } ]"), &[]);
    let _agent = Agent::managed(&c, "node-mode", &dir.path.join("spool"));

    run(Command::new("chmod").args(["0666", &file]));
    let f = c.wait_findings(30, |f| has(f, "drift", &file), "drift on mode");
    let drift = find(&f, "drift", &file).unwrap();
    assert_eq!(drift["differences"], serde_json::json!(["mode"]));
    assert_eq!(drift["desired"]["mode"], "0640");
    assert_eq!(drift["actual"]["mode"], "0666");
    assert_eq!(drift["actor"]["exe"], "/usr/bin/chmod");
    run(Command::new("chmod").args(["0640", &file]));
    c.wait_findings(
        30,
        |f| find(f, "drift", &file).is_some_and(|d| d["status"] == "resolved"),
        "drift resolved once the mode is back",
    );

    // Deleting it is a finding a responder acknowledges, then resolves.
    std::fs::remove_file(&file).unwrap();
    let f = c.wait_findings(30, |f| has(f, "deleted", &file), "deleted");
    let deleted = id(find(&f, "deleted", &file).unwrap());
    let anon = c.cli("", &["findings", "ack", &deleted]);
    assert!(!anon.status.success(), "an anonymous ack was accepted");
    // A token file works as well as the environment.
    let token = dir.join("bob.token");
    std::fs::write(&token, "bob-token\n").unwrap();
    c.cli_ok(
        "",
        &[
            "--token-file",
            &token,
            "findings",
            "ack",
            &deleted,
            "--note",
            "on it",
        ],
    );
    let listed = c.json("", &["findings", "list", "--status", "acknowledged"]);
    assert!(listed
        .iter()
        .any(|x| x["id"].as_u64().map(|i| i.to_string()) == Some(deleted.clone())));
    let done = c.cli(
        "alice",
        &[
            "findings",
            "resolve",
            &deleted,
            "--note",
            "restored from backup",
        ],
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let shown = c.json("", &["findings", "show", &deleted]);
    let history: Vec<(String, String)> = shown[0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["status"].as_str().unwrap().to_owned(),
                h["by"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            ("open".to_owned(), "collector".to_owned()),
            ("acknowledged".to_owned(), "bob".to_owned()),
            ("resolved".to_owned(), "alice".to_owned())
        ]
    );
    // The default listing shows what still needs attention only.
    let open = c.json(
        "",
        &[
            "findings",
            "list",
            "--host",
            "node-mode",
            "--kind",
            "drift",
            "--kind",
            "deleted",
        ],
    );
    assert!(open.is_empty(), "{open:#?}");
}

#[test]
fn connects_outside_the_clients_are_unauthorized_and_failed_attempts_count() {
    let dir = Dir::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port();
    let closed = free_port();
    let bash = std::fs::canonicalize("/bin/bash")
        .unwrap()
        .display()
        .to_string();
    let policy = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: orders-db\n    kind: database\n    ports: [{open}, {closed}]\n    clients: [ {{ exe: {bash} }} ]\n"
    );
    let c = Collector::judging(&policy, &[]);
    let node = "node-db";
    let _agent = Agent::managed(&c, node, &dir.path.join("spool"));

    // An allowed client first: seen, and not a finding.
    run(Command::new(&bash).args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{open}")]));
    c.wait_timeline(
        &["--host", node, "--kind", "connect"],
        |t| t.iter().any(|e| e["process"]["exe"] == bash.as_str()),
        "bash's connect",
    );
    run(&mut python(&format!(
        "import socket\nsocket.create_connection(('127.0.0.1', {open})).close()\ntry:\n    socket.create_connection(('127.0.0.1', {closed}))\nexcept OSError:\n    pass\n"
    )));
    let f = c.wait_findings(
        30,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "unauthorized_connect" && x["count"] == 2 && x["failed"] == 1)
        },
        "an unauthorized connect with one refused attempt",
    );
    let found: Vec<&Value> = f
        .iter()
        .filter(|x| x["kind"] == "unauthorized_connect")
        .collect();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0]["actor"]["exe"]
        .as_str()
        .unwrap()
        .contains("python"));
    assert_eq!(found[0]["resource"], "orders-db");
    assert_eq!(found[0]["host"], node);
    drop(listener);
}

#[test]
fn a_killed_agent_is_reported_silent_and_its_return_resolves_it() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let c = Collector::judging(&config_policy(&tree, "[]"), &["--silent-after", "3s"]);
    let spool = dir.path.join("spool");
    let agent = Agent::managed(&c, "node-quiet", &spool);
    std::thread::sleep(Duration::from_secs(4));
    let f = c.json("", &["findings", "list", "--kind", "agent_silent"]);
    assert!(f.is_empty(), "a live agent reported silent: {f:#?}");
    let killed = Instant::now();
    agent.kill();
    let f = c.wait_findings(
        20,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "agent_silent" && x["host"] == "node-quiet")
        },
        "agent_silent",
    );
    // Three seconds of silence, checked every second, plus the last heartbeat's age.
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "took {:?}",
        killed.elapsed()
    );
    assert_eq!(
        f.iter().find(|x| x["kind"] == "agent_silent").unwrap()["status"],
        "open"
    );
    let _agent = Agent::managed(&c, "node-quiet", &spool);
    let f = c.wait_findings(
        30,
        |f| {
            f.iter()
                .any(|x| x["kind"] == "agent_silent" && x["status"] == "resolved")
        },
        "agent_silent resolved",
    );
    assert!(
        f.iter().any(|x| x["kind"] == "blind_spot"
            && x["summary"].as_str().unwrap().contains("no agent watched")),
        "the offline window is a blind spot: {f:#?}"
    );
}

#[test]
fn baselines_from_a_manifest_a_scan_and_first_sight() {
    let dir = Dir::new();
    let tree = dir.join("etc/app");
    std::fs::create_dir_all(format!("{tree}/golden")).unwrap();
    let pinned = format!("{tree}/pinned.conf");
    let free = format!("{tree}/free.conf");
    let golden = format!("{tree}/golden/a.conf");
    std::fs::write(&pinned, "tampered\n").unwrap();
    std::fs::write(&free, "anything\n").unwrap();
    std::fs::write(&golden, "golden\n").unwrap();
    let manifest = dir.join("manifest.sha256");
    let expected = dir.join("expected");
    std::fs::write(&expected, "as released\n").unwrap();
    std::fs::write(
        &manifest,
        format!("# release 1.2\n{}  pinned.conf\n", sha256_file(&expected)),
    )
    .unwrap();
    let c = Collector::judging(&config_policy(&tree, "[]"), &[]);

    // Bad input: relative paths need --root; changes need a principal.
    let e = c.cli("alice", &["baseline", "import", &manifest]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("manifest.sha256:2: "));
    let e = c.cli("", &["baseline", "import", &manifest, "--root", &tree]);
    assert!(!e.status.success());
    c.cli_ok("alice", &["baseline", "import", &manifest, "--root", &tree]);

    // The agent's first look finds the pinned file off its manifest.
    let _agent = Agent::managed(&c, "node-base", &dir.path.join("spool"));
    let f = c.wait_findings(30, |f| has(f, "drift", &pinned), "drift from the manifest");
    assert!(find(&f, "drift", &pinned).unwrap()["summary"]
        .as_str()
        .unwrap()
        .contains("while nothing watched it"));
    let b = c.json("", &["baseline", "list"]);
    let source = |p: &str| {
        b.iter()
            .find(|x| x["path"] == p)
            .map(|x| x["source"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(source(&pinned).as_deref(), Some("manifest"));
    assert_eq!(source(&free).as_deref(), Some("learned"));
    assert!(!f.iter().any(|x| x["path"] == free.as_str()));

    // A scan of the reference host makes its current state desired.
    let out = c.cli(
        "alice",
        &[
            "baseline",
            "scan",
            "--host",
            "node-base",
            &format!("{tree}/golden"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 files"));
    let b = c.json("", &["baseline", "list", "--path", &golden]);
    assert_eq!(b[0]["source"], "scan");
    assert_eq!(b[0]["set_by"], "alice");
    std::fs::write(&golden, "changed\n").unwrap();
    c.wait_findings(
        30,
        |f| has(f, "drift", &golden),
        "drift from the scanned state",
    );
    // A scan of a host whose agent is not connected is refused clearly.
    let out = c.cli(
        "alice",
        &["baseline", "scan", "--host", "node-gone", "/etc"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not connected"));
}

#[test]
fn a_policy_change_reaches_the_agent_and_a_bad_one_is_refused() {
    let dir = Dir::new();
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let c = Collector::judging(&config_policy(&a, "[]"), &[]);
    let mut agent = Agent::managed(&c, "node-pol", &dir.path.join("spool"));
    let policy = c.policy.clone().unwrap();
    let signal = |sig| {
        // SAFETY: signalling the collector this test started.
        unsafe { libc::kill(c.pid() as i32, sig) };
    };

    std::fs::write(&policy, config_policy(&b, "[]")).unwrap();
    signal(libc::SIGHUP);
    agent.wait_policy_watching(&format!("{b}/"));
    std::fs::write(format!("{b}/new.conf"), "x").unwrap();
    agent.wait_for(
        |e| e["kind"] == "file" && e["path"] == format!("{b}/new.conf").as_str(),
        "an event under the newly watched tree",
    );
    let agents = c.json("", &["agents"]);
    let version = agents[0]["policy_version"].as_str().unwrap().to_owned();
    assert_eq!(version.len(), 16);

    // A bad policy is refused by the collector; the agent keeps the last one.
    std::fs::write(&policy, config_policy(&b, "[ { exe: bin/sed } ]")).unwrap();
    signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    let applied = agent
        .events()
        .iter()
        .filter(|e| e["kind"] == "policy_applied" || e["kind"] == "policy_refused")
        .count();
    assert_eq!(applied, 2, "the bad policy reached the agent");
    assert_eq!(
        c.json("", &["agents"])[0]["policy_version"],
        version.as_str()
    );

    // A collector started on a bad policy says which field is wrong.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, config_policy(&a, "[ { exe: bin/sed } ]")).unwrap();
    let out = Command::new(driftwatch_tests::bin("driftwatch-collector"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &dir.join("c2"),
            "--policy",
            &bad,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml: resources[0].writers[0].exe: must be an absolute path"),
        "{err}"
    );
}

#[test]
fn policy_check_validates_offline_and_warns_about_selectors_that_cannot_match() {
    let dir = Dir::new();
    let check = |file: &str, extra: &[&str]| {
        let out = Command::new(driftwatch_tests::bin("driftwatch"))
            // No collector listens there: the check must not need one.
            .args(["--collector", "http://127.0.0.1:1", "policy", "check", file])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let clean = dir.join("clean.yaml");
    std::fs::write(
        &clean,
        config_policy("/etc/app", "[ { exe: /usr/bin/sed, user: root, uid: 0 } ]"),
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&clean, &["--strict"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("valid") && stdout.contains("0 warnings"),
        "{stdout}"
    );

    let doubtful = dir.join("doubtful.yaml");
    std::fs::write(
        &doubtful,
        format!(
            "{}    mode: enforce
  - {{ name: models, kind: model, paths: [/srv/models/], mode: audit }}
",
            config_policy(
                "/etc/app",
                "[ { user: no-such-user-here }, { exe: /no/such/binary }, { namespace: payments }, { user: root, uid: 1234 } ]"
            )
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = check(&doubtful, &[]);
    assert!(ok, "warnings alone do not fail: {stderr}");
    assert!(stdout.contains("5 warnings"), "{stdout}");
    for want in [
        "resources[1].mode: audit with no writers: every change of \"models\" would be refused",
        "resources[0].writers[0].user: no user \"no-such-user-here\"",
        "resources[0].writers[1].exe: /no/such/binary does not exist",
        "resources[0].writers[2].namespace: pod metadata comes from the Kubernetes API",
        "resources[0].writers[3].uid: user \"root\" is uid 0 here, not 1234",
    ] {
        assert!(stderr.contains(want), "{want:?} not in {stderr}");
    }
    let (ok, _, stderr) = check(&doubtful, &["--kubernetes"]);
    assert!(ok);
    assert!(!stderr.contains("Kubernetes API"), "{stderr}");
    let (ok, _, stderr) = check(&doubtful, &["--strict"]);
    assert!(!ok && stderr.contains("5 warnings (--strict)"), "{stderr}");

    // Invalid: the collector's own message, and a failure.
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, config_policy("/etc/app", "[ { exe: bin/sed } ]")).unwrap();
    let (ok, _, stderr) = check(&bad, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("bad.yaml: resources[0].writers[0].exe: must be an absolute path"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(&dir.join("missing.yaml"), &[]);
    assert!(!ok && stderr.contains("missing.yaml"), "{stderr}");
}

#[test]
fn a_configmap_update_of_the_policy_is_applied_without_a_signal() {
    let dir = Dir::new();
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    // A ConfigMap volume as kubelet lays it out: the file is a symlink
    // through `..data`, itself a symlink to a timestamped directory.
    let volume = dir.path.join("config");
    let version = |name: &str, text: &str| {
        let d = volume.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("policy.yaml"), text).unwrap();
    };
    version("..2026_12_03_01_00_00.1", &config_policy(&a, "[]"));
    std::os::unix::fs::symlink("..2026_12_03_01_00_00.1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", volume.join("policy.yaml")).unwrap();
    let file = volume.join("policy.yaml").display().to_string();
    let c = Collector::secured(&["--policy", &file]);
    let mut agent = Agent::managed(&c, "node-cm", &dir.path.join("spool"));
    // The update: a new directory, `..data_tmp` pointing at it, renamed
    // over `..data` (AtomicWriter's swap). No SIGHUP.
    version("..2026_12_03_02_00_00.2", &config_policy(&b, "[]"));
    std::os::unix::fs::symlink("..2026_12_03_02_00_00.2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    agent.wait_policy_watching(&format!("{b}/"));
    let audit = c.json("", &["audit"]);
    assert!(
        audit.iter().any(|r| r["call"] == "PolicyReload"
            && r["principal"] == "local operator (policy file changed)"),
        "{audit:?}"
    );
}

#[test]
fn a_large_model_is_digested_off_the_event_path() {
    let dir = Dir::new();
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let small = format!("{models}/tokenizer.json");
    std::fs::write(&small, "{}").unwrap();
    let mut agent = Agent::start(&driftwatch_tests::policy(&[format!("{models}/")], &[]));
    agent.wait_for(|e| e["kind"] == "scan_done", "the first watch scan");
    // 2 GiB, sparse: reading it all takes the digester a second or more.
    let big = format!("{models}/weights.bin");
    run(Command::new("truncate").args(["-s", "2G", &big]));
    run(Command::new("chmod").args(["0600", &small]));
    let events = {
        // However busy the machine, the digest comes while the agent reads.
        let pid_reads = agent.bytes_read_fn();
        agent.wait_for_progress(
            |e| e["kind"] == "digest" && e["path"] == big.as_str(),
            "the large file's digest",
            pid_reads,
        );
        agent.events()
    };
    let pos = |pred: &dyn Fn(&Value) -> bool| events.iter().position(pred);
    let chmod = pos(&|e| e["kind"] == "file" && e["op"] == "chmod" && e["path"] == small.as_str())
        .expect("the chmod event");
    let small_digest =
        pos(&|e| e["kind"] == "digest" && e["path"] == small.as_str() && e["reason"] == "change")
            .expect("the small file's digest");
    let big_digest = pos(&|e| e["kind"] == "digest" && e["path"] == big.as_str()).unwrap();
    assert!(
        chmod < big_digest && small_digest < big_digest,
        "events waited for the large digest"
    );
    assert_eq!(events[small_digest]["mode"], "0600");
    assert_eq!(events[big_digest]["size"], 2u64 << 30);
    assert_eq!(events[big_digest]["sha256"], sha256_file(&big).as_str());
}
