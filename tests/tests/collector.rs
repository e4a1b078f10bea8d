//! Delivery end to end: real agents streaming real kernel events to a real
//! collector, through the faults a fleet sees.

use std::{collections::HashMap, process::Command};

use driftwatch_tests::{policy, run, Agent, Collector, Dir};
use serde_json::Value;

fn file_events<'a>(t: &'a [Value], node: &str, needle: &str) -> Vec<&'a Value> {
    t.iter()
        .filter(|e| e["type"] == "event" && e["kind"] == "file" && e["node"] == node)
        .filter(|e| e["path"].as_str().unwrap_or("").contains(needle))
        .collect()
}

fn write_files(dir: &str, prefix: &str, n: usize) {
    for i in 0..n {
        std::fs::write(format!("{dir}/{prefix}{i}.conf"), i.to_string()).unwrap();
    }
}

/// Every (op, path) of `prefix` files appears exactly once.
fn assert_exactly_once(t: &[Value], node: &str, prefix: &str, n: usize) {
    let mut count: HashMap<(String, String), usize> = HashMap::new();
    for e in file_events(t, node, prefix) {
        *count
            .entry((
                e["op"].as_str().unwrap().into(),
                e["path"].as_str().unwrap().into(),
            ))
            .or_default() += 1;
    }
    let opens = count.keys().filter(|(op, _)| op == "open").count();
    assert_eq!(
        opens, n,
        "expected {n} opens of {prefix}* on {node}: {count:?}"
    );
    assert!(count.values().all(|&c| c == 1), "duplicates: {count:?}");
    let seqs: Vec<u64> = t
        .iter()
        .filter(|e| e["node"] == node && e["type"] == "event")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let unique: std::collections::HashSet<_> = seqs.iter().collect();
    assert_eq!(unique.len(), seqs.len(), "a sequence number stored twice");
}

#[test]
fn a_collector_killed_mid_stream_loses_and_duplicates_nothing() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let mut collector = Collector::start();
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "node-k",
        &dir.path.join("spool"),
    );
    write_files(&tree, "before", 20);
    collector.wait_timeline(
        &["--host", "node-k", "--kind", "file"],
        |t| file_events(t, "node-k", "before").len() >= 40,
        "the first changes",
    );

    collector.kill();
    write_files(&tree, "during", 30);
    collector.restart();
    write_files(&tree, "after", 10);
    let t = collector.wait_timeline(
        &["--host", "node-k", "--kind", "file"],
        |t| {
            file_events(t, "node-k", "after").len() >= 20
                && file_events(t, "node-k", "during").len() >= 60
        },
        "the changes made while the collector was down",
    );
    assert_exactly_once(&t, "node-k", "before", 20);
    assert_exactly_once(&t, "node-k", "during", 30);
    assert_exactly_once(&t, "node-k", "after", 10);
    // The agent's copy of the same events agrees.
    let local = agent.stop();
    let local_during = local
        .iter()
        .filter(|e| e["kind"] == "file" && e["path"].as_str().unwrap_or("").contains("during"))
        .count();
    assert_eq!(local_during, 60);
}

#[test]
fn an_agent_killed_and_restarted_replays_its_spool_and_the_window_is_a_gap() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let spool = dir.path.join("spool");
    let mut collector = Collector::start();
    let pol = policy(&[format!("{tree}/")], &[]);
    let agent = Agent::streaming(&pol, &collector, "node-r", &spool);
    write_files(&tree, "first", 5);
    collector.wait_timeline(
        &["--host", "node-r"],
        |t| file_events(t, "node-r", "first").len() >= 10,
        "first changes",
    );
    // Changes the agent spools while the collector is away, then the agent dies.
    collector.kill();
    write_files(&tree, "spooled", 5);
    std::thread::sleep(std::time::Duration::from_millis(500)); // the spool reaches disk every 100 ms
    agent.kill();
    write_files(&tree, "unwatched-window", 3);
    collector.restart();
    let again = Agent::streaming(&pol, &collector, "node-r", &spool);
    write_files(&tree, "second", 5);
    let t = collector.wait_timeline(
        &["--host", "node-r"],
        |t| {
            file_events(t, "node-r", "second").len() >= 10
                && file_events(t, "node-r", "spooled").len() >= 10
        },
        "spooled and new changes",
    );
    assert_exactly_once(&t, "node-r", "spooled", 5);
    assert!(file_events(&t, "node-r", "unwatched-window").is_empty());
    let gap = t
        .iter()
        .find(|e| e["type"] == "gap" && e["reason"] == "agent_offline")
        .unwrap_or_else(|| panic!("no agent_offline gap in {t:#?}"));
    assert_eq!(gap["node"], "node-r");
    again.stop();
}

/// A collector and one agent streaming to it, watching `tree`.
struct OneNode {
    dir: Dir,
    tree: String,
    spool: std::path::PathBuf,
    collector: Collector,
    pol: String,
    agent: Agent,
}

fn one_node(node: &str) -> OneNode {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let spool = dir.path.join("spool");
    let collector = Collector::start();
    let pol = policy(&[format!("{tree}/")], &[]);
    let agent = Agent::streaming(&pol, &collector, node, &spool);
    OneNode {
        dir,
        tree,
        spool,
        collector,
        pol,
        agent,
    }
}

#[test]
fn an_agent_stopped_and_started_again_numbers_on_without_a_false_loss() {
    let OneNode {
        dir: _dir,
        tree,
        spool,
        collector,
        pol,
        agent,
    } = one_node("node-s");
    write_files(&tree, "before", 5);
    collector.wait_timeline(
        &["--host", "node-s"],
        |t| file_events(t, "node-s", "before").len() >= 10,
        "changes before the restart",
    );
    agent.stop();
    let again = Agent::streaming(&pol, &collector, "node-s", &spool);
    write_files(&tree, "after", 5);
    let t = collector.wait_timeline(
        &["--host", "node-s"],
        |t| file_events(t, "node-s", "after").len() >= 10,
        "changes after the restart",
    );
    assert_exactly_once(&t, "node-s", "after", 5);
    // The stop was clean: no sequence numbers went unused, so nothing is
    // reported as dropped by the agent.
    let dropped: Vec<_> = t
        .iter()
        .filter(|e| e["type"] == "gap" && e["reason"] == "agent_dropped")
        .collect();
    assert!(dropped.is_empty(), "false loss reported: {dropped:#?}");
    again.stop();
}

#[test]
fn an_agent_whose_spool_was_wiped_numbers_on_above_what_the_collector_holds() {
    let OneNode {
        dir: _dir,
        tree,
        spool,
        collector,
        pol,
        agent,
    } = one_node("node-w");
    write_files(&tree, "before", 5);
    let t = collector.wait_timeline(
        &["--host", "node-w"],
        |t| file_events(t, "node-w", "before").len() >= 10,
        "changes before the wipe",
    );
    let highest = |t: &[Value]| {
        t.iter()
            .filter_map(|e| e["seq"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let before = highest(&t);
    agent.stop();
    // A reinstalled node: same name, empty spool, numbering from 1 again.
    std::fs::remove_dir_all(&spool).unwrap();
    let again = Agent::streaming(&pol, &collector, "node-w", &spool);
    write_files(&tree, "after", 5);
    let t = collector.wait_timeline(
        &["--host", "node-w"],
        |t| file_events(t, "node-w", "after").len() >= 10,
        "changes after the wipe",
    );
    assert_exactly_once(&t, "node-w", "after", 5);
    let after: Vec<u64> = file_events(&t, "node-w", "after")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(
        after.iter().all(|&s| s > before),
        "events after the wipe were numbered {after:?}, at or below {before}"
    );
    let log = collector.log();
    assert!(
        !log.contains("already stored") && !log.contains("different event"),
        "{log}"
    );
    again.stop();
}

#[test]
fn eight_agents_stream_at_once() {
    let dir = Dir::new();
    let tree = dir.join("shared");
    std::fs::create_dir_all(&tree).unwrap();
    let collector = Collector::start();
    let pol = policy(&[format!("{tree}/")], &[]);
    let agents: Vec<Agent> = (0..8)
        .map(|i| {
            Agent::streaming(
                &pol,
                &collector,
                &format!("node-{i}"),
                &dir.path.join(format!("spool-{i}")),
            )
        })
        .collect();
    write_files(&tree, "fleet", 25);
    // Every agent sees every change on this machine and stores them under its own node.
    let t = collector.wait_timeline(
        &["--kind", "file"],
        |t| (0..8).all(|i| file_events(t, &format!("node-{i}"), "fleet").len() >= 50),
        "all eight nodes' events",
    );
    for i in 0..8 {
        assert_exactly_once(&t, &format!("node-{i}"), "fleet", 25);
    }
    let out = Command::new(driftwatch_tests::bin("driftwatch"))
        .args(["--collector", &collector.url, "agents", "-o", "jsonl"])
        .output()
        .unwrap();
    let agents_json: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(agents_json.len(), 8);
    assert!(
        agents_json
            .iter()
            .all(|a| a["connected"] == true
                && a["sensor_set"] == "tracepoint+tp_btf+cgroup_sock_addr")
    );
    for a in agents {
        a.stop();
    }
}

#[test]
fn timeline_filters_and_follow() {
    use std::io::BufRead;
    let dir = Dir::new();
    let tree = dir.join("cfg");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(format!("{tree}/x.conf"), "a\n").unwrap();
    let collector = Collector::start();
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "node-f",
        &dir.path.join("spool"),
    );
    let mut follow = Command::new(driftwatch_tests::bin("driftwatch"))
        .args([
            "--collector",
            &collector.url,
            "timeline",
            "--follow",
            "--host",
            "node-f",
            "--path",
            &tree,
            "-o",
            "jsonl",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    run(Command::new("sed")
        .args(["-i", "s/a/b/", "x.conf"])
        .current_dir(&tree));
    let conf = format!("{tree}/x.conf");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rename = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let v = rx
            .recv_timeout(left)
            .expect("the follower printed the rename within 60 s");
        if v["op"] == "rename" && v["new_path"] == conf.as_str() {
            break v;
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(rename["process"]["comm"], "sed");

    // Stored queries: by exec_id, by pid, by kind and window.
    let exec_id = rename["process"]["exec_id"].as_str().unwrap().to_owned();
    let by_exec = collector.timeline(&["--exec-id", &exec_id]);
    assert!(!by_exec.is_empty());
    assert!(
        by_exec
            .iter()
            .all(|e| e["process"]["exec_id"] == exec_id.as_str()),
        "{by_exec:#?}"
    );
    let pid = rename["process"]["pid"].as_u64().unwrap().to_string();
    let by_pid = collector.timeline(&["--pid", &pid, "--kind", "file"]);
    assert!(by_pid.iter().any(|e| e["op"] == "rename"));
    let recent = collector.timeline(&[
        "--since", "10m", "--host", "node-f", "--kind", "file", "--path", &tree,
    ]);
    assert!(recent
        .iter()
        .all(|e| e["kind"] == "file" && e["node"] == "node-f"));
    assert!(collector
        .timeline(&[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2000-01-02T00:00:00Z"
        ])
        .is_empty());
    let bad = Command::new(driftwatch_tests::bin("driftwatch"))
        .args([
            "--collector",
            &collector.url,
            "timeline",
            "--since",
            "yesterday-ish",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an RFC 3339 time"));
    agent.stop();
}

#[test]
fn an_unreachable_collector_is_a_clear_error_and_the_agent_keeps_spooling() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let mut collector = Collector::start();
    collector.kill();
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "node-u",
        &dir.path.join("spool"),
    );
    write_files(&tree, "offline", 10);
    std::thread::sleep(std::time::Duration::from_secs(2));
    collector.restart();
    let t = collector.wait_timeline(
        &["--host", "node-u"],
        |t| file_events(t, "node-u", "offline").len() >= 20,
        "the spooled changes",
    );
    assert_exactly_once(&t, "node-u", "offline", 10);
    agent.stop();

    let policy_file = dir.path.join("p.yaml");
    std::fs::write(&policy_file, policy(&[format!("{tree}/")], &[])).unwrap();
    let bad = Command::new(driftwatch_tests::agent_bin())
        .args([
            "--policy",
            &policy_file.display().to_string(),
            "--collector",
            "collector:7070",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("collector URL \"collector:7070\" must start with https://"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn a_full_spool_drops_the_oldest_and_the_collector_shows_exactly_which() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let mut collector = Collector::start();
    collector.kill();
    let agent = Agent::start_with(
        &policy(&[format!("{tree}/")], &[]),
        &[
            "--collector",
            &collector.url,
            "--node-name",
            "node-s",
            "--spool-dir",
            &dir.path.join("spool").display().to_string(),
            "--spool-max-events",
            "10",
        ],
    );
    write_files(&tree, "evicted", 20);
    write_files(&tree, "kept", 2);
    std::thread::sleep(std::time::Duration::from_millis(500));
    collector.restart();
    let t = collector.wait_timeline(
        &["--host", "node-s"],
        |t| {
            t.iter()
                .any(|e| e["type"] == "gap" && e["reason"] == "agent_dropped")
        },
        "the dropped range",
    );
    let gap = t.iter().find(|e| e["reason"] == "agent_dropped").unwrap();
    assert_eq!(gap["from_seq"], 1, "{gap}");
    let to = gap["to_seq"].as_u64().unwrap();
    // What survived is exactly what follows the range: nothing below it, no hole after it.
    let t = collector.wait_timeline(
        &["--host", "node-s"],
        |t| t.iter().filter(|e| e["type"] == "event").count() >= 10,
        "the kept events",
    );
    let seqs: Vec<u64> = t
        .iter()
        .filter(|e| e["type"] == "event")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.iter().min().copied(), Some(to + 1), "{seqs:?}");
    assert!(file_events(&t, "node-s", "evicted0.conf").is_empty());
    agent.stop();
}

#[test]
fn an_agent_stopped_normally_delivers_what_it_saw_and_ends_its_stream() {
    let OneNode {
        dir: _dir,
        tree,
        collector,
        agent,
        ..
    } = one_node("node-s");
    write_files(&tree, "warmup", 1);
    collector.wait_timeline(
        &["--host", "node-s"],
        |t| !file_events(t, "node-s", "warmup").is_empty(),
        "the agent streaming",
    );
    // Changes, then at once a normal stop: the agent sends what it saw
    // (some of it still in the kernel's ring buffer at the signal) and
    // waits for the acks before it exits.
    write_files(&tree, "last", 5);
    agent.stop();
    let t = collector.timeline(&["--host", "node-s"]);
    assert_exactly_once(&t, "node-s", "last", 5);
    let agents = collector.json("", &["agents"]);
    let me = agents
        .iter()
        .find(|a| a["host"] == "node-s")
        .unwrap_or_else(|| panic!("node-s not listed: {agents:?}"));
    assert_eq!(me["connected"], false, "{me}");
    // The agent ended its half of the stream: no reset, no error logged.
    let log = collector.log();
    assert!(log.contains("agent disconnected"), "{log}");
    assert!(
        !log.contains("closing the agent's stream"),
        "the stream ended with an error:\n{log}"
    );
}

#[test]
fn a_time_the_store_cannot_hold_is_refused_before_the_collector_is_asked() {
    // Nothing listens on port 1: a refusal that names the time proves it
    // was judged before any connection (it used to wrap around and return
    // the whole history).
    for args in [
        &["timeline", "--since", "9999-12-31T23:59:59Z"][..],
        &["timeline", "--until", "2026-02-31T00:00:00Z"][..],
        &["findings", "list", "--since", "9000-01-01T00:00:00Z"][..],
    ] {
        let out = Command::new(driftwatch_tests::bin("driftwatch"))
            .args(["--collector", "http://127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value"), "{args:?}: {err}");
        assert!(!err.contains("cannot reach"), "{args:?}: {err}");
    }
}
