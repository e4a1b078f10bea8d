//! Exports end to end: a real collector judging a real agent's events
//! writes finding changes and events as rotated JSON Lines files and sends
//! them to an OTLP/HTTP logs endpoint (a small receiver here, started after
//! the finding so the export must retry), in the shape the CLI prints.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use driftwatch_tests::{free_port, run, ConfigTree, Dir};
use serde_json::Value;

/// An OTLP/HTTP receiver: appends each request body as a line to `out`.
fn receiver(port: u16, out: &Path) -> Child {
    let script = r#"
import http.server, sys
port, out = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
        ok = self.path == '/v1/logs' and self.headers.get('Content-Type') == 'application/json'
        if ok:
            with open(out, 'ab') as f:
                f.write(body.replace(b'\n', b' ') + b'\n')
        self.send_response(200 if ok else 400)
        self.send_header('Content-Type', 'application/json')
        self.end_headers()
        self.wfile.write(b'{}')
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"#;
    Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .arg(out)
        .spawn()
        .expect("python3 receiver")
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

fn wait_until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn findings_and_events_are_exported_to_rotated_files_and_otlp() {
    let scratch = Dir::new();
    let export = scratch.path.join("export");
    let otlp_port = free_port();
    let received = scratch.path.join("otlp.jsonl");
    let url = format!("http://127.0.0.1:{otlp_port}/v1/logs");
    let export_arg = export.display().to_string();
    let mut w = ConfigTree::new(
        "node-exp",
        &[("app.yaml", "replicas: 1\n")],
        &[
            "--export-dir",
            &export_arg,
            "--export-events",
            "--export-max-bytes",
            "64KiB",
            "--export-keep",
            "2",
            "--otlp-logs-url",
            &url,
        ],
    );
    let (file, tree) = (w.path("app.yaml"), w.tree.clone());
    run(Command::new("sed").args(["-i", "s/replicas: 1/replicas: 4/", &file]));

    // The findings file: the CLI's finding, with its type and cursor.
    let findings = export.join("findings.jsonl");
    let exported = wait_until(30, "the drift in findings.jsonl", || {
        lines(&findings).into_iter().find(|v| {
            v["kind"] == "drift"
                && v["path"] == file.as_str()
                && v["diff"].as_array().is_some_and(|d| !d.is_empty())
        })
    });
    assert_eq!(exported["type"], "finding");
    assert!(exported["cursor"].as_u64().is_some_and(|c| c > 0));
    let id = exported["id"].as_u64().unwrap().to_string();
    let shown: Value = serde_json::from_slice(
        &w.collector
            .cli_ok("reader", &["findings", "show", &id, "-o", "json"])
            .stdout,
    )
    .unwrap();
    let mut want = keys(&shown);
    want.remove("events");
    want.remove("approval");
    want.extend(["type".to_owned(), "cursor".to_owned()]);
    assert_eq!(keys(&exported), want);
    assert_eq!(exported["diff"], shown["diff"]);

    // The events file: sed's own events, as the timeline shows them.
    let events = export.join("events.jsonl");
    let by_sed = wait_until(30, "sed's events in events.jsonl", || {
        lines(&events)
            .into_iter()
            .find(|e| e["kind"] == "file" && e["process"]["exe"] == "/usr/bin/sed")
    });
    assert_eq!(by_sed["type"], "event");
    assert_eq!(by_sed["node"], "node-exp");

    // The OTLP endpoint was down: the finding arrives once it is up.
    let mut rx = receiver(otlp_port, &received);
    let record = wait_until(60, "the drift at the OTLP endpoint", || {
        lines(&received).into_iter().find_map(|req| {
            req["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
                .as_array()?
                .iter()
                .find(|r| {
                    r["body"]["stringValue"]
                        .as_str()
                        .and_then(|b| serde_json::from_str::<Value>(b).ok())
                        .is_some_and(|b| b["kind"] == "drift" && b["path"] == file.as_str())
                })
                .cloned()
        })
    });
    assert!(record["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["key"] == "driftwatch.kind" && a["value"]["stringValue"] == "drift"));
    assert!(record["severityText"].is_string() && record["timeUnixNano"].is_string());

    // Many events: the file rotates by size, keeping two.
    run(Command::new("python3").args([
        "-c",
        &format!("for i in range(400):\n    open('{tree}/burst.txt', 'w').write(str(i))"),
    ]));
    wait_until(60, "events.jsonl to rotate twice", || {
        export.join("events.jsonl.2").exists().then_some(())
    });
    for n in ["events.jsonl", "events.jsonl.1", "events.jsonl.2"] {
        let size = std::fs::metadata(export.join(n)).unwrap().len();
        assert!(size <= 64 << 10, "{n}: {size} bytes");
    }
    assert!(!export.join("events.jsonl.3").exists());

    // A restart resumes after the last exported change: no cursor twice.
    let before = lines(&findings).len();
    w.collector.stop();
    w.collector.restart();
    run(Command::new("sed").args(["-i", "s/replicas: 4/replicas: 5/", &file]));
    wait_until(30, "the new change exported after the restart", || {
        (lines(&findings).len() > before).then_some(())
    });
    let cursors: Vec<u64> = lines(&findings)
        .iter()
        .filter_map(|v| v["cursor"].as_u64())
        .collect();
    let unique: BTreeSet<u64> = cursors.iter().copied().collect();
    assert_eq!(
        cursors.len(),
        unique.len(),
        "a change exported twice: {cursors:?}"
    );
    let _ = rx.kill();
    let _ = rx.wait();
}
