//! The timeline web view, in a real headless Chromium (Debian's): a real
//! agent's events on the time axis, a gap drawn where the agent was away,
//! sed's process with its file changes, the drift finding linked to its
//! evidence and its diff on the finding's page; signed in with a token as
//! the API is, refused without one. A screenshot is checked for the drawn
//! elements by their colours.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use driftwatch_tests::{free_port, run, Agent, ConfigTree};
use serde_json::Value;

/// `chromium --headless` with `args` on `url`; its standard output.
fn chromium(profile: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1300,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium (cargo xtask test installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pixels of `png` exactly `rgb`.
fn pixels(png: &Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png).expect("the screenshot"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("a screenshot in {other:?}"),
    };
    buf[..info.buffer_size()]
        .chunks(step)
        .filter(|p| p[..3] == rgb)
        .count()
}

/// A plain HTTP GET with an optional Authorization header: (status, headers and body).
fn get(addr: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the web view");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[test]
fn a_responder_reads_a_hosts_timeline_in_a_browser() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut w = ConfigTree::new(
        "node-web",
        &[("app.yaml", "replicas: 1\n")],
        &["--web-listen", &addr],
    );
    let file = w.path("app.yaml");
    let spool = w.dir.path.join("spool");

    // The agent goes away for a while and comes back: a gap.
    w.agent.stop();
    std::thread::sleep(Duration::from_secs(2));
    w.agent = Agent::managed(&w.collector, "node-web", &spool);
    run(Command::new("sed").args(["-i", "s/replicas: 1/replicas: 2/", &file]));
    let f = w.collector.wait_findings(
        30,
        |f| {
            f.iter().any(|x| {
                x["kind"] == "drift" && x["diff"].as_array().is_some_and(|d| !d.is_empty())
            })
        },
        "the drift",
    );
    let drift = f.iter().find(|x| x["kind"] == "drift").unwrap();
    let id = drift["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w
        .collector
        .json("", &["timeline", "--host", "node-web"])
        .iter()
        .any(|i: &Value| i["type"] == "gap")
    {
        assert!(Instant::now() < deadline, "no gap for the agent's absence");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Without the token: refused, with a challenge a browser answers.
    let path = "/timeline?host=node-web&since=1m";
    let (code, head) = get(&addr, path, None);
    assert_eq!(code, 401, "{head}");
    assert!(
        head.contains("WWW-Authenticate: Basic") || head.contains("www-authenticate: Basic"),
        "{head}"
    );
    use base64::Engine as _;
    let basic = |t: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("x:{t}"))
        )
    };
    assert_eq!(get(&addr, path, Some(&basic("wrong-token"))).0, 401);
    let (code, page) = get(&addr, path, Some(&basic("reader-token")));
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("content-security-policy: default-src 'none'"),
        "{page}"
    );

    // In Chromium, signed in as reader.
    let profile = w.dir.path.join("chromium");
    let base = format!("http://x:reader-token@{addr}");
    let dom = chromium(&profile, &["--dump-dom"], &format!("{base}{path}"));
    assert!(dom.contains("id=\"time-axis\""), "no time axis: {dom}");
    assert!(dom.contains("class=\"gap\""), "no gap drawn: {dom}");
    assert!(dom.contains("class=\"ev-file\""), "no file event drawn");
    assert!(
        dom.contains("/usr/bin/sed"),
        "sed's process is not in the tree"
    );
    assert!(dom.contains("class=\"proc\""), "no process tree");
    assert!(
        dom.contains(&format!("href=\"/findings/{id}\"")),
        "the finding is not linked"
    );
    // Each piece of evidence links to its event's row on the page.
    let evidence = drift["evidence"].as_array().unwrap();
    let seq = evidence.last().unwrap()["seq"].as_u64().unwrap();
    assert!(
        dom.contains(&format!("href=\"#ev-node-web-{seq}\"")),
        "evidence not linked"
    );
    assert!(
        dom.contains(&format!("id=\"ev-node-web-{seq}\"")),
        "no row for the evidence"
    );

    // The finding's page: its diff, and its evidence back on the timeline.
    let dom = chromium(&profile, &["--dump-dom"], &format!("{base}/findings/{id}"));
    assert!(dom.contains("replicas: 1 → 2"), "{dom}");
    assert!(dom.contains("/timeline?host=node-web"), "{dom}");

    // The screenshot shows the gap band, file events and the finding.
    let shot = w.dir.path.join("timeline.png");
    chromium(
        &profile,
        &[&format!("--screenshot={}", shot.display())],
        &format!("{base}{path}"),
    );
    if let Ok(keep) = std::env::var("DRIFTWATCH_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
    let gap = pixels(&shot, [255, 214, 214]);
    let file_events = pixels(&shot, [31, 119, 180]);
    let findings = pixels(&shot, [214, 39, 40]);
    assert!(gap > 500, "gap band: {gap} pixels");
    assert!(file_events > 20, "file events: {file_events} pixels");
    assert!(findings > 20, "finding markers: {findings} pixels");
}
