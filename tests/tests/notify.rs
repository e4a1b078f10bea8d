//! Notifications and `findings watch` end to end: webhooks received by a
//! local HTTP server in each payload shape, retried after errors and kept
//! over a collector restart; a finding watch that resumes from its cursor.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use driftwatch_tests::{free_port, http_get, Agent, Collector, Dir};
use serde_json::Value;

/// A webhook receiver: answers POSTs to `/json` with 500 while its
/// failure count lasts (then 200) and every other path with 200, keeping
/// every request it was sent (path, body, status).
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<(String, Value, u16)>>>,
    fail_first: Arc<Mutex<u32>>,
}

impl Receiver {
    fn start(fail_first: u32) -> Self {
        Self::start_on(free_port(), fail_first)
    }

    fn start_on(port: u16, fail_first: u32) -> Self {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver");
        let got = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(Mutex::new(fail_first));
        let (g, f) = (got.clone(), fail.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                let status = {
                    let mut n = f.lock().unwrap();
                    if *n > 0 && path == "/json" {
                        *n -= 1;
                        500
                    } else {
                        200
                    }
                };
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                g.lock().unwrap().push((path, v, status));
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Self {
            port,
            got,
            fail_first: fail,
        }
    }

    /// Bodies accepted (200) at `path`.
    fn accepted(&self, path: &str) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, s)| p == path && *s == 200)
            .map(|(_, v, _)| v.clone())
            .collect()
    }

    fn tries(&self, path: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, ..)| p == path)
            .count()
    }

    fn wait(&self, path: &str, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let v = self.accepted(path);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never received {what}: {v:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn notify_file(dir: &Dir, port: u16) -> String {
    let file = dir.join("notify.yaml");
    std::fs::write(
        &file,
        format!(
            "destinations:\n  - {{ name: siem, url: 'http://127.0.0.1:{port}/json' }}\n  - {{ name: slack, format: slack, url: 'http://127.0.0.1:{port}/slack', topics: [approval_requested, approval_decided] }}\n  - {{ name: teams, format: teams, url: 'http://127.0.0.1:{port}/teams', topics: [blocked], minSeverity: high }}\n"
        ),
    )
    .unwrap();
    file
}

fn db_policy(port: u16) -> String {
    format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: postgres\n    kind: database\n    ports: [{port}]\n    mode: enforce\n    severity: critical\n    clients: [ {{ user: daemon }} ]\n"
    )
}

/// A refused connect by nobody (bash's /dev/tcp): a `blocked` finding.
fn blocked_connect(port: u16, user: &str) {
    let _ = Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            "--regid=65534",
            "--clear-groups",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port}"),
        ])
        .output();
}

#[test]
fn webhooks_arrive_in_three_shapes_are_retried_and_survive_a_restart() {
    let dir = Dir::new();
    let hooks = Receiver::start(2);
    let file = notify_file(&dir, hooks.port);
    let db = free_port();
    let policy = db_policy(db);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut c = Collector::judging(&policy, &["--notify", &file, "--metrics-listen", &metrics]);
    let _agent = Agent::streaming(&policy, &c, "node-notify", &dir.path.join("spool"));

    // An access request: JSON (after two 500s) and Slack, with the command.
    let id = c.request_access("postgres", "user=nobody", "1m");
    let json = hooks.wait("/json", "the request", |v| {
        v.iter().any(|b| b["type"] == "approval_requested")
    });
    assert!(hooks.tries("/json") >= 3, "not retried after the 500s");
    // The failures show in the metrics, per destination.
    let (_, text) = http_get(&metrics, "/metrics").expect("scrape /metrics");
    let failed = text
        .lines()
        .find(|l| l.starts_with("driftwatch_notifications_failed_total{destination=\"siem\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(failed.is_some_and(|n| n >= 2.0), "{text}");
    assert!(text.contains("driftwatch_notifications_delivered_total{destination=\"slack\"}"));
    let req = json
        .iter()
        .find(|b| b["type"] == "approval_requested")
        .unwrap();
    assert_eq!(req["data"]["requester"], "alice");
    assert_eq!(req["data"]["who"], "user=nobody");
    assert!(req["commands"]
        .as_array()
        .unwrap()
        .contains(&format!("driftwatch approvals approve {id}").into()));
    let slack = hooks.wait("/slack", "the request", |v| !v.is_empty());
    let text = slack[0].to_string();
    assert!(text.contains(&format!("approvals approve {id}")), "{text}");
    assert!(slack[0]["blocks"].is_array());
    assert!(
        hooks.accepted("/teams").is_empty(),
        "teams takes blocked only"
    );

    // A decision.
    assert!(c.cli("bob", &["approvals", "deny", &id]).status.success());
    hooks.wait("/slack", "the decision", |v| {
        v.iter()
            .any(|b| b["text"].as_str().unwrap_or("").contains("denied"))
    });

    // A blocked action: JSON and Teams (an Adaptive Card).
    blocked_connect(db, "nobody");
    let teams = hooks.wait("/teams", "the blocked connect", |v| !v.is_empty());
    assert_eq!(
        teams[0]["attachments"][0]["content"]["type"],
        "AdaptiveCard"
    );
    assert!(teams[0].to_string().contains("blocked"), "{}", teams[0]);
    let json = hooks.wait("/json", "the blocked finding", |v| {
        v.iter()
            .any(|b| b["type"] == "blocked" && b["data"]["resource"] == "postgres")
    });
    // The policy's severity for the resource, not the kind's default.
    let b = json.iter().find(|b| b["type"] == "blocked").unwrap();
    assert_eq!(b["severity"], "critical", "{b:#}");

    // The receiver fails while a request is made; the collector is killed
    // before it could deliver; once both are back the request arrives.
    *hooks.fail_first.lock().unwrap() = 1_000;
    let id2 = c.request_access("postgres", "user=nobody", "1m");
    std::thread::sleep(Duration::from_millis(500));
    c.kill();
    *hooks.fail_first.lock().unwrap() = 0;
    c.restart();
    hooks.wait("/json", "the request queued before the restart", |v| {
        v.iter().any(|b| {
            b["type"] == "approval_requested"
                && b["data"]["id"].as_u64().map(|x| x.to_string()) == Some(id2.clone())
        })
    });
    let log = c.log();
    assert!(
        log.contains("a notification was not delivered"),
        "failures are logged"
    );
}

/// `driftwatch findings watch -o json` as a child, its lines collected.
struct Watch {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Watch {
    fn start(c: &Collector, extra: &[&str]) -> Self {
        let mut child = c
            .command("reader")
            .args(["findings", "watch", "-o", "jsonl"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start findings watch");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    l.lock().unwrap().push(v);
                }
            }
        });
        Self { child, lines }
    }

    fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(v) = self.lines.lock().unwrap().iter().find(|v| pred(v)) {
                return v.clone();
            }
            assert!(Instant::now() < deadline, "the watch never showed {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn findings_watch_follows_new_findings_and_resumes_from_its_cursor() {
    let dir = Dir::new();
    let db = free_port();
    let policy = db_policy(db);
    let mut c = Collector::judging(&policy, &[]);
    let agent = Agent::streaming(&policy, &c, "node-watch", &dir.path.join("spool"));
    let watch = Watch::start(&c, &["--from-now"]);
    std::thread::sleep(Duration::from_millis(500));

    blocked_connect(db, "nobody");
    let first = watch.wait("nobody's blocked connect", |v| {
        v["kind"] == "blocked" && v["actor"]["user"] == "nobody"
    });
    let cursor = first["cursor"].as_u64().expect("a cursor");

    // The collector goes away and comes back: the same watch resumes.
    c.kill();
    c.restart();
    blocked_connect(db, "daemon");
    // daemon is a client: nothing. Another non-client is a new finding.
    blocked_connect(db, "bin");
    watch.wait("bin's blocked connect, after the restart", |v| {
        v["kind"] == "blocked" && v["actor"]["user"] == "bin"
    });

    // A watch that was not running resumes from its cursor: it sees what
    // changed after it (bin's finding), not what it had seen before.
    drop(watch);
    blocked_connect(db, "sys");
    let again = Watch::start(&c, &["--after", &cursor.to_string()]);
    again.wait("sys's finding, made while no watch ran", |v| {
        v["actor"]["user"] == "sys"
    });
    again.wait("bin's finding", |v| v["actor"]["user"] == "bin");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        again
            .lines
            .lock()
            .unwrap()
            .iter()
            .all(|v| v["cursor"].as_u64().unwrap() > cursor),
        "replayed what came before the cursor"
    );
    drop(agent);
}
