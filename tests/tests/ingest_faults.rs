//! Bad input on the agent stream: each gets the right gRPC status, nothing of
//! it is stored, and a real agent streaming alongside is not disturbed.

use driftwatch_proto::v1::{
    agent_message::Msg, agent_service_client::AgentServiceClient, event, AgentMessage, Event,
    EventBatch, FileChange,
};
use driftwatch_tests::{block_on, hello, policy, Agent, Collector, Dir};
use tonic::Code;

fn file_event(node: &str, seq: u64, path: &str) -> Event {
    Event {
        event: Some(event::Event::File(FileChange {
            op: "open".into(),
            path: path.into(),
            ..Default::default()
        })),
        process: None,
        seq,
        time_unix_nanos: 1_700_000_000_000_000_000 + seq as i64,
        node: node.into(),
        chain: Vec::new(),
    }
}

fn batch(events: Vec<Event>) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Batch(EventBatch { events })),
    }
}

/// Sends `msgs` on one stream; returns the status the stream ended with.
async fn status_of(url: &str, msgs: Vec<AgentMessage>) -> Code {
    let mut client = AgentServiceClient::connect(url.to_owned())
        .await
        .expect("connect");
    let resp = match client.stream(tokio_stream::iter(msgs)).await {
        Ok(r) => r,
        Err(s) => return s.code(),
    };
    let mut inbound = resp.into_inner();
    loop {
        match inbound.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return Code::Ok,
            Err(s) => return s.code(),
        }
    }
}

#[test]
fn bad_messages_get_the_right_status_and_do_not_disturb_other_agents() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let collector = Collector::start();
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "good",
        &dir.path.join("spool"),
    );
    let url = collector.url.clone();
    block_on(async {
        // No hello first.
        assert_eq!(
            status_of(&url, vec![batch(vec![file_event("x", 1, "/a")])]).await,
            Code::InvalidArgument
        );
        // A node name that cannot be one.
        assert_eq!(
            status_of(&url, vec![hello("a/b")]).await,
            Code::InvalidArgument
        );
        // Out of order: sequence 5 with nothing before it.
        assert_eq!(
            status_of(
                &url,
                vec![
                    hello("bad-order"),
                    batch(vec![file_event("bad-order", 5, "/ooo")])
                ]
            )
            .await,
            Code::FailedPrecondition
        );
        // Another node's events on this node's stream.
        assert_eq!(
            status_of(
                &url,
                vec![
                    hello("bad-node"),
                    batch(vec![file_event("someone-else", 1, "/spoof")])
                ]
            )
            .await,
            Code::PermissionDenied
        );
        // Oversized: a 5 MiB message against the 4 MiB limit.
        let huge = file_event("bad-size", 1, &"/".repeat(5 << 20));
        assert_eq!(
            status_of(&url, vec![hello("bad-size"), batch(vec![huge])]).await,
            Code::ResourceExhausted
        );
        // Names that would forge a log line or drive a terminal.
        for name in ["evil\n2026-01-01T00:00:00Z INFO forged", "evil\u{1b}[2J"] {
            assert_eq!(
                status_of(&url, vec![hello(name)]).await,
                Code::InvalidArgument,
                "{name:?}"
            );
        }
        // Sequence 0 names no place to go on from: refused.
        assert_eq!(
            status_of(
                &url,
                vec![
                    hello("bad-values"),
                    batch(vec![file_event("bad-values", 0, "/zero")])
                ]
            )
            .await,
            Code::InvalidArgument
        );
        // No kind, a time past any skew (year 2262), a path over PATH_MAX
        // that still fits a message: each kept out of the store and
        // recorded as a gap that says why, and the node's next event is
        // stored as usual; refusing the stream would have the agent send
        // them again forever, and nothing after them would arrive.
        let mut empty = file_event("bad-values", 1, "/x");
        empty.event = None;
        let mut far = file_event("bad-values", 2, "/far");
        far.time_unix_nanos = i64::MAX;
        let long = file_event("bad-values", 3, &"/long".repeat(200 << 10));
        assert_eq!(
            status_of(
                &url,
                vec![
                    hello("bad-values"),
                    batch(vec![empty, far]),
                    batch(vec![long, file_event("bad-values", 4, "/after-bad")]),
                ]
            )
            .await,
            Code::Ok
        );
        // A valid prefix of a batch is kept, the hole after it is refused.
        assert_eq!(
            status_of(
                &url,
                vec![
                    hello("half"),
                    batch(vec![
                        file_event("half", 1, "/half-1"),
                        file_event("half", 3, "/half-3")
                    ])
                ]
            )
            .await,
            Code::FailedPrecondition
        );
    });
    for path in ["/ooo", "/spoof", "/x", "/zero", "/far"] {
        let stored = collector.timeline(&["--path", path]);
        assert!(
            stored.iter().all(|v| v["type"] == "gap"),
            "{path} was stored: {stored:?}"
        );
    }
    assert_eq!(collector.timeline(&["--host", "half"]).len(), 1);
    let kept = collector.timeline(&["--host", "bad-values"]);
    let gaps: Vec<_> = kept.iter().filter(|v| v["type"] == "gap").collect();
    let events: Vec<_> = kept.iter().filter(|v| v["type"] != "gap").collect();
    assert_eq!(events.len(), 1, "{kept:?}");
    assert_eq!(events[0]["path"], "/after-bad", "{kept:?}");
    let ranges: Vec<_> = gaps
        .iter()
        .map(|g| (g["from_seq"].as_u64(), g["to_seq"].as_u64()))
        .collect();
    assert_eq!(ranges, [(Some(1), Some(2)), (Some(3), Some(3))], "{gaps:?}");
    assert!(gaps.iter().all(|g| g["reason"] == "collector_refused"));
    assert!(
        gaps[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no event kind"),
        "{gaps:?}"
    );
    assert!(
        gaps[1]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("PATH_MAX"),
        "{gaps:?}"
    );
    // And a blind spot names them.
    let findings = collector.json(
        "",
        &[
            "findings",
            "list",
            "--all",
            "--kind",
            "blind_spot",
            "--host",
            "bad-values",
        ],
    );
    assert!(
        findings.iter().any(|f| f["summary"]
            .as_str()
            .unwrap_or("")
            .contains("out of the store")),
        "{findings:?}"
    );

    // The real agent kept streaming through all of it.
    std::fs::write(format!("{tree}/after-faults.conf"), "x").unwrap();
    collector.wait_timeline(
        &[
            "--host",
            "good",
            "--path",
            &format!("{tree}/after-faults.conf"),
        ],
        |t| t.len() >= 2,
        "the good agent's change",
    );
    agent.stop();
}

/// A stream whose messages the test sends one at a time.
struct Link {
    tx: tokio::sync::mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<driftwatch_proto::v1::CollectorMessage>,
}

impl Link {
    async fn open(url: &str, node: &str) -> Link {
        let mut client = AgentServiceClient::connect(url.to_owned())
            .await
            .expect("connect");
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(hello(node)).await.expect("hello");
        let inbound = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let mut link = Link { tx, inbound };
        // The first answer is the ack to resume from.
        assert!(matches!(link.next().await, Ok(Some(_))));
        link
    }

    async fn next(
        &mut self,
    ) -> Result<Option<driftwatch_proto::v1::CollectorMessage>, tonic::Status> {
        self.inbound.message().await
    }

    /// Sends `events`; returns the highest ack that follows, or the status
    /// the stream ended with.
    async fn send(&mut self, events: Vec<Event>) -> Result<u64, Code> {
        let last = events.last().map_or(0, |e| e.seq);
        self.tx
            .send(batch(events))
            .await
            .map_err(|_| Code::Unknown)?;
        loop {
            match self.next().await {
                Ok(Some(m)) => {
                    if let Some(driftwatch_proto::v1::collector_message::Msg::Ack(a)) = m.msg {
                        if a.through >= last {
                            return Ok(a.through);
                        }
                    }
                }
                Ok(None) => return Err(Code::Ok),
                Err(s) => return Err(s.code()),
            }
        }
    }
}

#[test]
fn two_streams_for_one_node_never_interleave() {
    let collector = Collector::start();
    let url = collector.url.clone();
    block_on(async {
        // A cloned machine: two agents under one name, each numbering
        // from 1 with its own events.
        let mut first = Link::open(&url, "twin").await;
        assert_eq!(
            first
                .send((1..=3).map(|s| file_event("twin", s, "/first")).collect())
                .await,
            Ok(3)
        );
        let mut second = Link::open(&url, "twin").await;
        // The older stream is refused from its next message on ...
        assert_eq!(
            first
                .send((4..=6).map(|s| file_event("twin", s, "/first")).collect())
                .await,
            Err(Code::Aborted)
        );
        // ... and the newer one resumes after what is stored.
        assert_eq!(
            second
                .send((4..=9).map(|s| file_event("twin", s, "/second")).collect())
                .await,
            Ok(9)
        );
    });
    let t = collector.timeline(&["--host", "twin"]);
    let mut seqs: Vec<u64> = t
        .iter()
        .filter(|e| e["kind"] == "file")
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=9).collect::<Vec<_>>(), "{t:#?}");
    let first = t.iter().filter(|e| e["path"] == "/first").count();
    assert_eq!(first, 3, "{t:#?}");
}

/// A unary call to `path` whose request body is `body`, as sent.
async fn unary_raw(url: &str, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.expect("ready");
    let codec =
        tonic_prost::ProstCodec::<driftwatch_proto::raw::Raw, driftwatch_proto::raw::Raw>::default(
        );
    match grpc
        .unary(
            tonic::Request::new(driftwatch_proto::raw::Raw(body)),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
    {
        Ok(_) => tonic::Status::ok(""),
        Err(s) => s,
    }
}

#[test]
fn unary_calls_name_undecodable_and_oversized_requests_by_their_status() {
    let collector = Collector::start();
    let url = collector.url.clone();
    block_on(async {
        for path in [
            "/driftwatch.v1.QueryService/Agents",
            "/driftwatch.v1.FindingService/List",
        ] {
            // Wire type 7 does not exist: the request cannot be decoded.
            let s = unary_raw(&url, path, vec![0xff; 64]).await;
            assert_eq!(s.code(), Code::InvalidArgument, "{path}: {s:?}");
            // Over the 4 MiB limit.
            let s = unary_raw(&url, path, vec![0x0a; 5 << 20]).await;
            assert_eq!(s.code(), Code::ResourceExhausted, "{path}: {s:?}");
        }
    });
    // The collector still answers.
    assert!(collector.timeline(&["--host", "nobody"]).is_empty());
}

#[test]
fn hundreds_of_idle_then_cancelled_streams_do_not_wedge_the_collector() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let collector = Collector::start();
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "honest",
        &dir.path.join("spool"),
    );
    let url = collector.url.clone();
    block_on(async {
        // 300 streams on 10 connections: half said hello as a node of
        // their own and went quiet, half never said anything.
        let mut held = Vec::new();
        for c in 0..10 {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())
                .unwrap()
                .connect()
                .await
                .expect("connect");
            for i in 0..30 {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                if i % 2 == 0 {
                    tx.send(hello(&format!("idle-{c}-{i}"))).await.unwrap();
                }
                let mut client = AgentServiceClient::new(channel.clone());
                let task = tokio::spawn(async move {
                    let r = client
                        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await;
                    if let Ok(r) = r {
                        let mut inbound = r.into_inner();
                        while let Ok(Some(_)) = inbound.message().await {}
                    }
                });
                held.push((tx, task));
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        // Cancelled all at once.
        for (tx, task) in held {
            task.abort();
            drop(tx);
        }
    });
    // The honest agent's changes are still stored and acknowledged, and
    // queries answer.
    for i in 0..10 {
        std::fs::write(format!("{tree}/after{i}.conf"), "x").unwrap();
    }
    collector.wait_timeline(
        &["--host", "honest", "--path", &tree],
        |t| {
            t.iter()
                .filter(|e| {
                    e["op"] == "close_write" && e["path"].as_str().unwrap_or("").contains("after")
                })
                .count()
                == 10
        },
        "the honest agent's 10 changes after the cancellations",
    );
    let agents = collector.json("", &["agents"]);
    assert!(agents
        .iter()
        .any(|a| a["host"] == "honest" && a["connected"] == true));
    drop(agent);
    // And it still stops on SIGTERM, promptly.
    let started = std::time::Instant::now();
    // SAFETY: kill(2) on the collector's pid.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGTERM) };
    let mut collector = collector;
    while std::net::TcpStream::connect(collector.url.trim_start_matches("http://")).is_ok() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "the collector ignored SIGTERM for 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    collector.kill();
}

/// A tmpfs of `mb` MiB mounted at `dir`, unmounted when dropped.
struct SmallDisk(String);

impl SmallDisk {
    fn mount(dir: &str, mb: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        driftwatch_tests::run(std::process::Command::new("mount").args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mb}m"),
            "tmpfs",
            dir,
        ]));
        Self(dir.to_owned())
    }

    /// Writes until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = std::path::Path::new(&self.0).join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.0])
            .status();
    }
}

#[test]
fn a_full_disk_is_refused_meanwhile_and_recovered_from_when_space_is_back() {
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let disk = SmallDisk::mount(&dir.join("disk"), 48);
    let data = std::path::Path::new(&disk.0).join("store");
    let collector = Collector::start_at(&data, &[]);
    let agent = Agent::streaming(
        &policy(&[format!("{tree}/")], &[]),
        &collector,
        "full",
        &dir.path.join("spool"),
    );
    let writes = |prefix: &str| {
        for i in 0..100 {
            std::fs::write(format!("{tree}/{prefix}{i}.conf"), "x").unwrap();
        }
    };
    // While the store is failed, reads may be refused too: count nothing.
    let stored = |c: &Collector, prefix: &str| {
        let out = c
            .command("")
            .args([
                "timeline", "-o", "jsonl", "--host", "full", "--kind", "file", "--path", &tree,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect::<Vec<_>>()
            .iter()
            .filter(|e| {
                e["op"] == "close_write"
                    && e["path"]
                        .as_str()
                        .unwrap_or("")
                        .rsplit('/')
                        .next()
                        .is_some_and(|n| n.starts_with(prefix))
            })
            .count()
    };
    writes("before");
    collector.wait_timeline(
        &["--host", "full"],
        |_| stored(&collector, "before") == 100,
        "100 changes",
    );

    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    assert_eq!(collector.health(""), SERVING);
    let filler = disk.fill();
    writes("during");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !collector.log().contains("the store cannot write") {
        assert!(
            std::time::Instant::now() < deadline,
            "the full disk was never noticed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Reads still answer while nothing can be written; health says so.
    assert!(!collector.json("", &["agents"]).is_empty());
    assert_eq!(collector.health("driftwatch.v1.AgentService"), NOT_SERVING);
    assert_eq!(collector.health(""), NOT_SERVING);

    std::fs::remove_file(filler).unwrap();
    writes("after");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let (d, a) = (stored(&collector, "during"), stored(&collector, "after"));
        if d == 100 && a == 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after the space came back: {d} of 100 changes made while full, {a} of 100 after"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(
        stored(&collector, "before"),
        100,
        "nothing stored before was lost or doubled"
    );
    assert!(collector
        .log()
        .contains("restarting in place to reopen the store"));
    assert_eq!(collector.health(""), SERVING);
    drop(agent);
    // SIGTERM still stops it.
    // SAFETY: kill(2) on the collector's pid.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGTERM) };
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(collector.url.trim_start_matches("http://")).is_ok() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the collector ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(collector);
    drop(disk);
}
