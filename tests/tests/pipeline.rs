//! The whole path at volume: real kernel events through a real agent, its
//! spool and stream, into a real collector — every event stored exactly
//! once, through bursts, a stop under load and a cluster reconnecting.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use driftwatch_proto::v1::{
    agent_message::Msg, agent_service_client::AgentServiceClient, collector_message,
    query_service_client::QueryServiceClient, AgentMessage, AgentsRequest, Event, EventBatch,
    FileChange, Hello, NodeInfo,
};
use driftwatch_tests::{
    assert_stored_once, chmod_burst, policy, wait_stored, Agent, Collector, Dir,
};

/// The tests here each load the machine; run one at a time, so that each
/// measures its own load, not its neighbours'.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn a_burst_of_100k_changes_reaches_the_collector_exactly_once() {
    let _heavy = one_at_a_time();
    const CHANGES: u64 = 100_000;
    let dir = Dir::new();
    let tree = dir.join("models");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/ranker.bin");
    std::fs::write(&file, b"weights").unwrap();
    let collector = Collector::start();
    let spool = dir.path.join("spool");
    let agent = Agent::start_with(
        &policy(&[format!("{tree}/")], &[]),
        &[
            "--collector",
            &collector.url,
            "--node-name",
            "node-burst",
            "--spool-dir",
            spool.to_str().unwrap(),
            // The burst is written faster than any reader: the ring holds it.
            "--ring-mib",
            "256",
        ],
    );
    let done = AtomicU64::new(0);
    chmod_burst(&file, CHANGES, None, &AtomicBool::new(false), &done);
    assert_eq!(done.load(Ordering::Relaxed), CHANGES);
    let seqs = wait_stored(&collector, "node-burst", &file, CHANGES as usize);
    assert_stored_once(&seqs, CHANGES as usize);
    let events = agent.stop();
    let stats = driftwatch_tests::final_stats(&events);
    assert_eq!(stats["file"]["dropped"], 0, "{stats}");
}

#[test]
fn an_agent_interrupted_under_load_stops_in_time_and_loses_nothing() {
    let _heavy = one_at_a_time();
    let dir = Dir::new();
    let tree = dir.join("etc");
    std::fs::create_dir_all(&tree).unwrap();
    let file = format!("{tree}/app.conf");
    std::fs::write(&file, b"a: 1").unwrap();
    let collector = Collector::start();
    let spool = dir.path.join("spool");
    let stats_file = dir.path.join("stats.json");
    let pol = policy(&[format!("{tree}/")], &[]);
    let args = [
        "--collector",
        &collector.url,
        "--node-name",
        "node-stop",
        "--spool-dir",
        spool.to_str().unwrap(),
        "--ring-mib",
        "256",
        "--stats-file",
        stats_file.to_str().unwrap(),
    ];
    let agent = Agent::start_with(&pol, &args);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let generator = {
        let (file, stop, done) = (file.clone(), stop.clone(), done.clone());
        // A steady load the agent keeps up with (a test build, printing
        // JSON too), still going when the signal comes and after it. The
        // rate leaves room for a machine running at half speed: at 10k/s
        // such a day left the test build 16k records behind at the stop,
        // which the agent rightly counted as unread.
        std::thread::spawn(move || chmod_burst(&file, u64::MAX, Some(3_000), &stop, &done))
    };
    while done.load(Ordering::Relaxed) < 15_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (took, events) = agent.stop_timed();
    stop.store(true, Ordering::Relaxed);
    generator.join().unwrap();
    assert!(
        took <= Duration::from_secs(5),
        "the agent took {took:?} to stop after SIGINT"
    );
    let stats = driftwatch_tests::final_stats(&events);
    assert_eq!(stats["file"]["dropped"], 0, "{stats}");
    let received = stats["file"]["received"].as_u64().unwrap();
    assert!(received >= 15_000, "{stats}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats_file).unwrap()).unwrap();
    assert_eq!(s["spool_evicted"], 0, "{s}");
    assert_eq!(s["unread_at_stop"], 0, "{s}");
    // What the collector had not acknowledged stayed spooled; the next
    // start delivers it. Every chmod the agent read is stored exactly once.
    let again = Agent::start_with(&pol, &args);
    let seqs = wait_stored(&collector, "node-stop", &file, received as usize);
    assert_stored_once(&seqs, received as usize);
    again.stop();
}

fn hello(node: &str, started: i64) -> AgentMessage {
    AgentMessage {
        msg: Some(Msg::Hello(Hello {
            node: Some(NodeInfo {
                name: node.into(),
                ..Default::default()
            }),
            agent_started_unix_nanos: started,
        })),
    }
}

/// One simulated agent's connection: hello, `count` events after `from`,
/// and the ack that covers them. Returns the ack the hello got.
async fn one_agent(url: String, node: String, from: u64, count: u64, started: i64) -> u64 {
    let mut client = AgentServiceClient::connect(url).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(&node, started)).await.unwrap();
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream accepted")
        .into_inner();
    let resumed = loop {
        match inbound.message().await.expect("an answer to hello") {
            Some(m) => {
                if let Some(collector_message::Msg::Ack(a)) = m.msg {
                    break a.through;
                }
            }
            None => panic!("{node}: stream ended before its first ack"),
        }
    };
    assert_eq!(resumed, from, "{node} resumes where it was acked");
    let events = (from + 1..=from + count)
        .map(|seq| Event {
            event: Some(driftwatch_proto::v1::event::Event::File(FileChange {
                op: "open".into(),
                path: format!("/srv/{node}/{seq}"),
                ..Default::default()
            })),
            seq,
            time_unix_nanos: driftwatch_proto::time::now_unix_nanos(),
            node: node.clone(),
            ..Default::default()
        })
        .collect();
    tx.send(AgentMessage {
        msg: Some(Msg::Batch(EventBatch { events })),
    })
    .await
    .unwrap();
    loop {
        match inbound.message().await.expect("acks") {
            Some(m) => {
                if let Some(collector_message::Msg::Ack(a)) = m.msg {
                    if a.through >= from + count {
                        break;
                    }
                }
            }
            None => panic!("{node}: stream ended before its events were acked"),
        }
    }
    // All of them leave at once: dropping the stream is the disconnect.
    from + count
}

/// What happens after every collector restart: the whole cluster says
/// hello at the same moment, streams, and (here) leaves at once — again and
/// again. A flush per hello and per teardown wedged ingest for good at 40.
#[test]
fn two_hundred_agents_connect_stream_and_leave_at_once_repeatedly() {
    let _heavy = one_at_a_time();
    const AGENTS: u64 = 200;
    const ROUNDS: u64 = 4;
    const EVENTS: u64 = 50;
    let mut collector = Collector::start();
    let url = collector.url.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..ROUNDS {
        let all = rt.block_on(async {
            let tasks: Vec<_> = (0..AGENTS)
                .map(|i| {
                    tokio::spawn(one_agent(
                        url.clone(),
                        format!("sim-{i}"),
                        round * EVENTS,
                        EVENTS,
                        // A new agent process each round: each has a gap.
                        1 + round as i64,
                    ))
                })
                .collect();
            tokio::time::timeout(Duration::from_secs(120), async {
                let mut acked = Vec::new();
                for t in tasks {
                    acked.push(t.await.expect("an agent task"));
                }
                acked
            })
            .await
        });
        let acked = all.unwrap_or_else(|_| panic!("round {round}: not every agent was acked"));
        assert!(acked.iter().all(|&a| a == (round + 1) * EVENTS));
        // The collector still answers, and saw every agent come and go.
        let agents = rt.block_on(async {
            let mut q = QueryServiceClient::connect(url.clone()).await.unwrap();
            tokio::time::timeout(Duration::from_secs(30), q.agents(AgentsRequest {}))
                .await
                .expect("agents answered in time")
                .expect("agents")
                .into_inner()
                .agents
        });
        let ours: Vec<_> = agents
            .iter()
            .filter(|a| a.node.as_ref().is_some_and(|n| n.name.starts_with("sim-")))
            .collect();
        assert_eq!(ours.len(), AGENTS as usize);
        assert!(ours.iter().all(|a| a.acked_seq == (round + 1) * EVENTS));
    }
    // Every event once, across all rounds, for a sample of the agents.
    for i in [0, 99, 199] {
        let t = collector.timeline(&["--host", &format!("sim-{i}")]);
        let events = t.iter().filter(|e| e["type"] == "event").count();
        assert_eq!(events as u64, ROUNDS * EVENTS, "sim-{i}");
    }
    // And it stops on SIGTERM.
    let pid = collector.pid();
    let stopping = Instant::now();
    // SAFETY: signalling the collector this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "the collector ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    collector.kill();
}
