//! What a cluster operator relies on: Prometheus scrapes both daemons and
//! sees real events counted, health says SERVING only when ready, logs are
//! JSON line by line, the API describes itself, and SIGTERM ends open
//! streams within a bound.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use driftwatch_tests::{
    agent_bin, block_on, free_port, hello, http_get, policy, require_root, Agent, Collector, Dir,
};
use serde_json::Value;

/// A Prometheus server from Debian's package, scraping `targets` (job,
/// address) every second, on loopback.
struct Prometheus {
    child: std::process::Child,
    addr: String,
    _dir: Dir,
}

impl Prometheus {
    fn start(targets: &[(&str, &str)]) -> Self {
        let dir = Dir::new();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{addr}\"]\n"
            ));
        }
        let file = dir.path.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb")))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by cargo xtask test)");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The value of instant query `q` (first series), if any.
    fn value(&self, q: &str) -> Option<f64> {
        let mut path = String::from("/api/v1/query?query=");
        for b in q.bytes() {
            if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
                path.push(b as char);
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
        let (code, body) = http_get(&self.addr, &path).ok()?;
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (up to 60 s) until query `q` is at least `want`.
    fn wait_at_least(&self, q: &str, want: f64) -> f64 {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.value(q);
            if v.is_some_and(|v| v >= want) {
                return v.unwrap_or_default();
            }
            assert!(
                Instant::now() < until,
                "Prometheus never saw {q} >= {want} (last: {v:?})"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_both_daemons_and_counts_real_events() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let collector_metrics = format!("127.0.0.1:{}", free_port());
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let collector = Collector::start_with(&["--metrics-listen", &collector_metrics]);
    let agent = Agent::streaming_with(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "metrics-node",
        &dir.path.join("spool"),
        &["--metrics-listen", &agent_metrics],
    );
    let prometheus =
        Prometheus::start(&[("collector", &collector_metrics), ("agent", &agent_metrics)]);
    // 20 real changes: an open for write and a close_write each.
    for i in 0..20 {
        std::fs::write(format!("{tree}/file-{i}.conf"), format!("v{i}")).unwrap();
    }
    prometheus.wait_at_least("up{job=\"collector\"}", 1.0);
    prometheus.wait_at_least("up{job=\"agent\"}", 1.0);
    prometheus.wait_at_least("driftwatch_agent_sensor_emitted_total{kind=\"file\"}", 40.0);
    prometheus.wait_at_least(
        "driftwatch_agent_sensor_received_total{kind=\"file\"}",
        40.0,
    );
    prometheus.wait_at_least("driftwatch_agent_stream_connected", 1.0);
    prometheus.wait_at_least("driftwatch_agent_ring_size_bytes", 16.0 * 1024.0 * 1024.0);
    // Each record waits in the ring a moment: the peak saw some.
    prometheus.wait_at_least("driftwatch_agent_ring_peak_waiting_bytes", 1.0);
    prometheus.wait_at_least("driftwatch_ingest_events_total{kind=\"file\"}", 40.0);
    prometheus.wait_at_least("driftwatch_ingest_events_total{kind=\"digest\"}", 20.0);
    prometheus.wait_at_least("driftwatch_agents_connected", 1.0);
    prometheus.wait_at_least("driftwatch_judge_duration_seconds_count", 1.0);
    // What the agent sent is what the collector acknowledged.
    prometheus.wait_at_least(
        "driftwatch_agent_stream_acked_seq - driftwatch_agent_spool_last_seq + 1",
        1.0,
    );
    // Nothing was lost in the kernel, and the health endpoints answer.
    assert_eq!(
        prometheus.value("sum(driftwatch_agent_sensor_lost_total)"),
        Some(0.0)
    );
    for addr in [&collector_metrics, &agent_metrics] {
        assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
        assert_eq!(http_get(addr, "/readyz").unwrap().0, 200);
    }
    agent.stop();
}

#[test]
fn logs_are_json_line_by_line_when_asked() {
    require_root();
    let collector = Collector::start_with(&["--log-format", "json"]);
    let dir = Dir::new();
    let pol = dir.path.join("policy.yaml");
    std::fs::write(&pol, policy(&[format!("{}/", dir.join("w"))], &[])).unwrap();
    let err = dir.path.join("agent.log");
    let mut agent = Command::new(agent_bin())
        .args(["--stdout", "--log-format", "json", "--policy"])
        .arg(&pol)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    // Three lines at least (the process table is seeded after the sensors
    // attach): a SIGTERM any earlier may end it before it says more.
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("process table seeded")
    {
        assert!(
            Instant::now() < until,
            "the agent never attached its sensors"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    let agent_log = std::fs::read_to_string(&err).unwrap();
    for (who, log) in [
        ("agent", agent_log.as_str()),
        ("collector", &collector.log()),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{who}: {log}");
        for line in lines {
            assert!(!line.contains('\u{1b}'), "{who}: an ANSI code: {line:?}");
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {line}"));
            assert!(
                v["level"].is_string() && v["message"].is_string(),
                "{who}: {v}"
            );
            assert!(v["timestamp"].is_string(), "{who}: {v}");
        }
    }
}

#[test]
fn health_and_reflection_answer_on_the_api_port() {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let collector = Collector::start();
    let url = collector.url.clone();
    block_on(async {
        let channel = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "driftwatch.v1.AgentService"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        }
        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("{answer:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in [
            "driftwatch.v1.AgentService",
            "driftwatch.v1.QueryService",
            "driftwatch.v1.FindingService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
    });
}

#[test]
fn sigterm_ends_open_streams_and_follows_within_the_bound() {
    let mut collector = Collector::start();
    let url = collector.url.clone();
    // A follow and an agent stream that never end by themselves.
    let follow = collector
        .command("")
        .args(["timeline", "--follow"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let agent_side = std::thread::spawn(move || {
        block_on(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(hello("still-here")).await.unwrap();
            let mut client =
                driftwatch_proto::v1::agent_service_client::AgentServiceClient::connect(url)
                    .await
                    .unwrap();
            let mut inbound = client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let _ = inbound.message().await; // the hello's ack
            opened_tx.send(()).unwrap();
            // Held open until the collector ends it.
            let end = loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break None,
                    Err(s) => break Some(s.code()),
                }
            };
            drop(tx);
            end
        })
    });
    opened_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pid = collector.pid();
    let t = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(30);
    // SAFETY: as above; signal 0 only asks whether the process exists.
    while unsafe { libc::kill(pid as i32, 0) } == 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(Instant::now() < until, "the collector ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    collector.kill();
    assert!(
        took < Duration::from_secs(5),
        "the collector took {took:?} to stop with open streams"
    );
    assert_eq!(
        agent_side.join().unwrap(),
        Some(tonic::Code::Unavailable),
        "the agent's stream ends with UNAVAILABLE"
    );
    let out = follow.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopping"), "{err}");
}

#[test]
fn the_agent_is_ready_only_while_its_sensors_are_attached() {
    require_root();
    let dir = Dir::new();
    let pol = dir.path.join("policy.yaml");
    std::fs::write(&pol, policy(&[format!("{}/", dir.join("w"))], &[])).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut agent = Command::new(agent_bin())
        .args(["--stdout", "--metrics-listen", &metrics, "--policy"])
        .arg(&pol)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Attaching some sixty programs takes the agent a while: the endpoint
    // answers meanwhile, and says "not ready".
    let mut answers = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((code, _)) = http_get(&metrics, "/readyz") {
            if answers.last() != Some(&code) {
                answers.push(code);
            }
            if code == 200 {
                break;
            }
        }
        assert!(Instant::now() < until, "never ready: {answers:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(answers, [503, 200], "not ready, then ready");
    assert_eq!(http_get(&metrics, "/healthz").unwrap().0, 200);
    // Stopping: not ready while the programs detach.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(10);
    let mut saw_not_ready = false;
    while agent.try_wait().unwrap().is_none() && Instant::now() < until {
        if http_get(&metrics, "/readyz").is_ok_and(|(c, _)| c == 503) {
            saw_not_ready = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(saw_not_ready, "ready until the end of a stop");
}

#[test]
fn the_collector_stops_on_sigterm_after_its_log_reader_went_away() {
    // A log pipe whose reader died (a crashed log shipper, `| head`): the
    // log lines fail to write, and the stop must not depend on them.
    let dir = Dir::new();
    let port = free_port();
    let mut child = Command::new(driftwatch_tests::bin("driftwatch-collector"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--log", "debug"])
        .arg("--data-dir")
        .arg(dir.path.join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the collector");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the collector did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child.stderr.take());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "exited with {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the collector ignored SIGTERM once its log reader was gone");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
