//! `cargo xtask demo`: the agent on a sample policy, real changes and
//! connects, and the timeline it recorded.

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

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("")
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
        "debug=false\nlisten=0.0.0.0:8080\n",
    )?;
    std::fs::write(dir.join("models/model.bin"), vec![1u8; 4096])?;
    std::fs::write(dir.join("scratch/candidate.bin"), vec![2u8; 4096])?;

    // A stand-in database: a real listener on a loopback port the policy watches.
    let db = TcpListener::bind("127.0.0.1:0")?;
    let db_port = db.local_addr()?.port();
    let other = TcpListener::bind("127.0.0.1:0")?;
    let other_port = other.local_addr()?.port();
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
"#,
            d = dir.display()
        ),
    )?;

    let release = bin.parent().map(Path::to_path_buf).unwrap_or_default();
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    eprintln!(
        "demo: starting driftwatch-collector on {url} (sled store in {}/store)",
        dir.display()
    );
    let mut collector = Command::new(release.join("driftwatch-collector"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &format!("{}/store", dir.display()),
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
        "demo: starting driftwatch-agent on {}, streaming to the collector",
        policy.display()
    );
    let spool = format!("{}/spool", dir.display());
    let agent = Agent::start(
        &bin,
        &policy,
        &dir.join("events.jsonl"),
        &[
            "--collector",
            &url,
            "--node-name",
            "demo-node",
            "--spool-dir",
            &spool,
            "--log",
            "warn",
        ],
    )?;
    let d = dir.display();
    step(
        "edit the config in place with sed -i",
        &mut sh(&format!(
            "sed -i 's/debug=false/debug=true/' {d}/etc/myapp/app.conf"
        )),
    )?;
    step(
        "chmod the config to 0600",
        &mut sh(&format!("chmod 0600 {d}/etc/myapp/app.conf")),
    )?;
    step(
        "swap the model: Python writes a temp file and os.replace()s it into place",
        Command::new("python3").args([
            "-c",
            &format!("import os; open('{d}/models/.model.tmp','wb').write(b'\\x03'*4096); os.replace('{d}/models/.model.tmp','{d}/models/model.bin')"),
        ]),
    )?;
    step(
        "copy another model over it with cp",
        &mut sh(&format!(
            "cp {d}/scratch/candidate.bin {d}/models/model.bin"
        )),
    )?;
    step(
        "as user nobody, try to overwrite the config (refused by the kernel: EACCES)",
        Command::new("python3").args([
            "-c",
            &format!(
                "import os; os.setgid(65534); os.setuid(65534); open('{d}/etc/myapp/app.conf','w')"
            ),
        ]),
    )?;
    step(
        &format!("connect to the watched database port {db_port}, and to the unwatched port {other_port}"),
        Command::new("python3").args([
            "-c",
            &format!("import socket\nfor p in ({db_port}, {other_port}):\n  socket.create_connection(('127.0.0.1', p)).close()"),
        ]),
    )?;
    step(
        "write a file outside every watched path",
        &mut sh(&format!("echo x > {d}/scratch/notes.txt")),
    )?;
    // Delivery takes milliseconds; what is not acknowledged yet stays in
    // the agent's spool for its next run.
    std::thread::sleep(Duration::from_millis(1500));
    let events = agent.stop()?;

    println!();
    println!(
        "Timeline of watched activity ({} events recorded, full JSON in {d}/events.jsonl):",
        events.len()
    );
    println!(
        "{:<12} {:<8} {:<12} {:<44} {:<18} {:<16} {:<28} RESOURCE",
        "TIME", "KIND", "OP", "TARGET", "RESULT", "USER(LOGIN)", "EXE"
    );
    for e in &events {
        let kind = s(e, &["kind"]);
        if kind != "file" && kind != "connect" {
            continue;
        }
        let time = s(e, &["time"]).get(11..23).unwrap_or("");
        let (op, target) = if kind == "file" {
            let mut t = s(e, &["path"]).replace(&format!("{d}/"), "");
            if let Some(n) = e["new_path"].as_str() {
                t = format!("{t} -> {}", n.replace(&format!("{d}/"), ""));
            }
            (s(e, &["op"]).to_owned(), t)
        } else {
            (
                "connect".to_owned(),
                format!("{}:{}", s(e, &["address"]), e["port"]),
            )
        };
        let result = if e["result"]["ok"].as_bool() == Some(true) {
            "ok".to_owned()
        } else {
            s(e, &["result", "error"]).to_owned()
        };
        let p = &e["process"];
        let user = format!(
            "{}({})",
            s(p, &["user"]),
            p["login_user"].as_str().unwrap_or("-")
        );
        println!(
            "{time:<12} {kind:<8} {op:<12} {target:<44} {result:<18} {user:<16} {:<28} {}",
            s(p, &["exe"]),
            s(e, &["resource"])
        );
    }
    if let Some(stats) = events.iter().rev().find(|e| e["kind"] == "stats") {
        let f = &stats["counters"]["file"];
        let c = &stats["counters"]["connect"];
        println!();
        println!(
            "Kernel filter: {} file calls examined, {} dropped in the kernel as unwatched, {} reported; {} connects examined, {} dropped in the kernel, {} reported; {} records lost.",
            f["seen"], f["filtered_kernel"], f["emitted"], c["seen"], c["filtered_kernel"], c["emitted"],
            f["dropped"].as_u64().unwrap_or(0) + c["dropped"].as_u64().unwrap_or(0)
        );
    }
    println!();
    println!("What the collector stored (driftwatch timeline --host demo-node --kind file --kind connect):");
    let cli = release.join("driftwatch");
    let _ = Command::new(&cli)
        .args([
            "--collector",
            &url,
            "timeline",
            "--host",
            "demo-node",
            "--kind",
            "file",
            "--kind",
            "connect",
        ])
        .status();
    println!();
    println!("driftwatch agents:");
    let _ = Command::new(&cli)
        .args(["--collector", &url, "agents"])
        .status();
    let _ = collector.kill();
    let _ = collector.wait();
    println!();
    println!("Findings (drift, unauthorized access) are the next step: the correlation issue judges these events against the policy.");
    Ok(())
}
