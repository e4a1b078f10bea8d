//! `cargo xtask demo`: a collector judging with a sample policy, an agent
//! that receives it, real changes and connects, and what came of them:
//! findings, an approved change, and the timeline.

use std::{net::TcpListener, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{agent::Agent, build_agent, setup};

fn step(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("demo: {what}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        eprintln!("demo:   (exited with {status}, as expected for a refused action)");
    }
    Ok(())
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Runs the demo.
pub fn run() -> Result<()> {
    setup::require_root("cargo xtask demo")?;
    setup::ensure()?;
    let bin = build_agent(true)?;

    let dir = Path::new("/tmp/driftwatch-demo");
    let _ = std::fs::remove_dir_all(dir);
    for d in ["etc/myapp", "models", "scratch"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(
        dir.join("etc/myapp/app.conf"),
        "debug=false\nlisten=0.0.0.0:8080\ndb_password=demo-s3cret-1\n",
    )?;
    std::fs::write(dir.join("models/model.bin"), vec![1u8; 4096])?;
    std::fs::write(dir.join("scratch/candidate.bin"), vec![2u8; 4096])?;
    std::fs::write(
        dir.join("tokens"),
        "alice-demo-token alice\nbob-demo-token bob\n",
    )?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.join("tokens"), std::fs::Permissions::from_mode(0o600))?;
    }

    // A stand-in database: a real listener on a loopback port the policy watches.
    let db = TcpListener::bind("127.0.0.1:0")?;
    let db_port = db.local_addr()?.port();
    let other = TcpListener::bind("127.0.0.1:0")?;
    let other_port = other.local_addr()?.port();
    // A production database behind a guardrail (mode: enforce).
    let prod = TcpListener::bind("127.0.0.1:0")?;
    let prod_port = prod.local_addr()?.port();
    std::thread::spawn(move || {
        for c in prod.incoming().flatten() {
            drop(c)
        }
    });
    std::thread::spawn(move || {
        for c in db.incoming().flatten() {
            drop(c)
        }
    });
    std::thread::spawn(move || {
        for c in other.incoming().flatten() {
            drop(c)
        }
    });

    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"apiVersion: driftwatch.dev/v1
kind: Policy
resources:
  - name: app-config
    kind: config
    paths: ["{d}/etc/myapp/"]
    writers: [ {{ exe: /usr/bin/ansible-playbook }}, {{ user: deploy }} ]
  - name: models
    kind: model
    paths: ["{d}/models/"]
    writers: [ {{ exe: /opt/trainer/bin/trainer }} ]
  - name: postgres
    kind: database
    ports: [{db_port}]
    clients: [ {{ exe: /usr/bin/psql, user: app }} ]
  - name: prod-db
    kind: database
    ports: [{prod_port}]
    mode: enforce
    clients: [ {{ user: app }} ]
"#,
            d = dir.display()
        ),
    )?;

    let release = bin.parent().map(Path::to_path_buf).unwrap_or_default();
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("https://127.0.0.1:{port}");
    let d = dir.display();
    // Who may do what: alice and bob file and approve change requests;
    // nobody approves their own.
    std::fs::write(dir.join("roles.yaml"), "approver: [alice, bob]\n")?;
    let certs = |args: &[&str]| -> Result<()> {
        let o = Command::new(release.join("driftwatch-collector"))
            .arg("certs")
            .args(args)
            .args(["--dir", &format!("{d}/pki")])
            .output()
            .context("running driftwatch-collector certs")?;
        if !o.status.success() {
            anyhow::bail!(
                "driftwatch-collector certs {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    };
    eprintln!("demo: driftwatch-collector certs init: a CA, the collector's certificate, and the node certificate of demo-node ({d}/pki)");
    certs(&["init"])?;
    certs(&["issue", "node", "demo-node"])?;
    eprintln!("demo: starting driftwatch-collector on {url}: TLS, agents by certificate, people by token with roles ({d}/roles.yaml), sled store in {d}/store, policy {d}/policy.yaml");
    let mut collector = Command::new(release.join("driftwatch-collector"))
        .args([
            "--tls-cert",
            &format!("{d}/pki/server.pem"),
            "--tls-key",
            &format!("{d}/pki/server-key.pem"),
            "--client-ca",
            &format!("{d}/pki/ca.pem"),
            "--roles",
            &format!("{d}/roles.yaml"),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &format!("{d}/store"),
            "--policy",
            &policy.display().to_string(),
            "--tokens",
            &format!("{d}/tokens"),
            "--log",
            "warn",
        ])
        .spawn()
        .context("starting the collector")?;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = collector.try_wait()? {
            anyhow::bail!("the collector exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "demo: starting driftwatch-agent with no policy of its own: it applies the collector's"
    );
    let spool = format!("{d}/spool");
    let out = dir.join("events.jsonl");
    let agent = Agent::start_managed(
        &bin,
        &out,
        &[
            "--collector",
            &url,
            "--ca",
            &format!("{d}/pki/ca.pem"),
            "--cert",
            &format!("{d}/pki/node-demo-node.pem"),
            "--key",
            &format!("{d}/pki/node-demo-node-key.pem"),
            "--node-name",
            "demo-node",
            "--spool-dir",
            &spool,
            "--log",
            "warn",
        ],
    )?;
    // The agent reads the state of everything watched once the policy is
    // applied; the collector learns it as the desired state.
    wait_for(
        &out,
        |text| text.matches("\"kind\":\"scan_done\"").count() >= 2,
        "the first look at the watched files",
    )?;
    let cli = release.join("driftwatch");
    let as_user = |who: &str, args: &[&str]| -> Result<std::process::Output> {
        let o = Command::new(&cli)
            .args(["--collector", &url, "--ca", &format!("{d}/pki/ca.pem")])
            .args(args)
            .env("DRIFTWATCH_TOKEN", format!("{who}-demo-token"))
            .output()
            .context("running driftwatch")?;
        Ok(o)
    };

    step(
        "1. drift: root edits the config with sed -i (writers are ansible-playbook and deploy): debug on, and the password rotated by hand (the finding shows it changed, never its value)",
        &mut sh(&format!(
            "sed -i -e 's/debug=false/debug=true/' -e 's/db_password=demo-s3cret-1/db_password=demo-s3cret-2/' {d}/etc/myapp/app.conf"
        )),
    )?;
    step(
        "   and makes it 0600 with chmod",
        &mut sh(&format!("chmod 0600 {d}/etc/myapp/app.conf")),
    )?;
    step(
        "   as user nobody, tries to overwrite it (refused by the kernel: EACCES; the attempt counts)",
        Command::new("python3").args([
            "-c",
            &format!(
                "import os; os.setgid(65534); os.setuid(65534); open('{d}/etc/myapp/app.conf','w')"
            ),
        ]),
    )?;
    step(
        &format!("2. unauthorized connect: python connects to the watched database port {db_port} (clients: psql as app), and to the unwatched {other_port}"),
        Command::new("python3").args([
            "-c",
            &format!("import socket\nfor p in ({db_port}, {other_port}):\n  socket.create_connection(('127.0.0.1', p)).close()"),
        ]),
    )?;
    let candidate = sha256_file(&dir.join("scratch/candidate.bin"))?;
    eprintln!(
        "demo: 3. approved change: alice asks to ship the candidate model (sha256 {}...)",
        &candidate[..12]
    );
    let req = as_user(
        "alice",
        &[
            "approvals",
            "request",
            "--resource",
            "models",
            "--digest",
            &candidate,
            "--window",
            "1h",
            "--reason",
            "ship ranker v2",
            "-o",
            "json",
        ],
    )?;
    let req: Value = serde_json::from_slice(&req.stdout).with_context(|| {
        format!(
            "approvals request: {}",
            String::from_utf8_lossy(&req.stderr)
        )
    })?;
    let id = req["id"].as_u64().unwrap_or(0).to_string();
    let own = as_user("alice", &["approvals", "approve", &id])?;
    eprintln!(
        "demo:    alice approves her own request: {}",
        String::from_utf8_lossy(&own.stderr).trim()
    );
    let ok = as_user("bob", &["approvals", "approve", &id])?;
    eprintln!(
        "demo:    bob approves it: {}",
        String::from_utf8_lossy(&ok.stdout).trim()
    );
    step(
        "   the model is swapped: Python writes a temp file and os.replace()s it into place",
        Command::new("python3").args([
            "-c",
            &format!("import os, shutil; shutil.copy('{d}/scratch/candidate.bin', '{d}/models/.model.tmp'); os.replace('{d}/models/.model.tmp','{d}/models/model.bin')"),
        ]),
    )?;
    let connect = format!(
        "import socket, sys, time\nfor i in range(20):\n  try:\n    socket.create_connection(('127.0.0.1', {prod_port})).close(); print('connected'); sys.exit(0)\n  except PermissionError as e:\n    if i == 0 and len(sys.argv) < 2: print('refused:', e); sys.exit(1)\n    time.sleep(0.25)\nprint('still refused'); sys.exit(1)"
    );
    step(
        &format!("4. guardrail: python, as root, connects to prod-db (port {prod_port}, mode enforce, clients: user app): refused in the kernel before any packet"),
        Command::new("python3").args(["-c", &connect]),
    )?;
    let grant = as_user(
        "alice",
        &[
            "approvals",
            "request",
            "--access",
            "prod-db",
            "--who",
            "user=root",
            "--for",
            "20s",
            "--reason",
            "INC-42: check the replication lag",
            "-o",
            "json",
        ],
    )?;
    let grant: Value = serde_json::from_slice(&grant.stdout).with_context(|| {
        format!(
            "approvals request --access: {}",
            String::from_utf8_lossy(&grant.stderr)
        )
    })?;
    let grant_id = grant["id"].as_u64().unwrap_or(0).to_string();
    let ok = as_user("bob", &["approvals", "approve", &grant_id])?;
    eprintln!(
        "demo:    alice asks for 20 s of access for user root; bob approves: {}",
        String::from_utf8_lossy(&ok.stdout).trim()
    );
    step(
        "   the same connect under the grant (the agent opens the kernel gate for root until the grant ends)",
        Command::new("python3").args(["-c", &connect, "retry"]),
    )?;
    step(
        "write a file outside every watched path (filtered in the kernel)",
        &mut sh(&format!("echo x > {d}/scratch/notes.txt")),
    )?;
    // Digests are read in the background and judged once stored.
    std::thread::sleep(Duration::from_secs(2));

    let show = |args: &[&str]| -> Result<()> {
        println!();
        println!("$ driftwatch {}", args.join(" "));
        let o = as_user("bob", args)?;
        print!("{}", String::from_utf8_lossy(&o.stdout));
        eprint!("{}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    show(&["findings", "list"])?;
    let list = as_user(
        "bob",
        &["findings", "list", "--kind", "drift", "-o", "jsonl"],
    )?;
    if let Some(first) = String::from_utf8_lossy(&list.stdout).lines().next() {
        let f: Value = serde_json::from_str(first)?;
        show(&[
            "findings",
            "show",
            &f["id"].as_u64().unwrap_or(0).to_string(),
        ])?;
    }
    show(&["approvals", "show", &id])?;
    show(&["approvals", "show", &grant_id])?;
    show(&[
        "timeline",
        "--host",
        "demo-node",
        "--kind",
        "file",
        "--kind",
        "connect",
        "--kind",
        "digest",
    ])?;
    show(&["agents"])?;
    show(&["audit"])?;
    show(&["verify"])?;

    let events = agent.stop()?;
    if let Some(stats) = events.iter().rev().find(|e| e["kind"] == "stats") {
        let f = &stats["counters"]["file"];
        let c = &stats["counters"]["connect"];
        println!();
        println!(
            "Kernel filter: {} file calls examined, {} dropped in the kernel as unwatched, {} reported; {} connects examined, {} dropped in the kernel, {} reported; {} records lost. Agent output: {d}/events.jsonl",
            f["seen"], f["filtered_kernel"], f["emitted"], c["seen"], c["filtered_kernel"], c["emitted"],
            f["dropped"].as_u64().unwrap_or(0) + c["dropped"].as_u64().unwrap_or(0)
        );
    }
    let _ = collector.kill();
    let _ = collector.wait();
    Ok(())
}

fn wait_for(out: &Path, done: impl Fn(&str) -> bool, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(out).is_ok_and(|t| done(&t)) {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the agent did not report {what} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}
