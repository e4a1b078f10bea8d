//! `cargo xtask bench collector`: durable ingest rate over real gRPC streams,
//! and first-page timeline latency once the store holds 10 million events.
//!
//! Four client streams each send batches of 1,000 events (shaped like real
//! file events: path, identity with args and ancestors) and wait for the
//! collector's acks, which it sends only after fsync. The rate is acked
//! events over wall time.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use driftwatch_proto::raw::Raw;
use driftwatch_proto::v1::{
    agent_message::Msg, collector_message, event, query_service_client::QueryServiceClient,
    AgentMessage, Ancestor, CollectorMessage, Event, FileChange, Hello, NodeInfo, Outcome, Process,
    TimelineRequest,
};

use crate::{bench::cpu_seconds, cargo, root, setup};

const STREAMS: u64 = 4;
/// Node time between two events of one node.
const SPACING_NS: i64 = 20_000;
const BATCH: u64 = 1000;

/// Node time of sequence 0: a day ago, so retention (30 days) keeps it all.
fn t0() -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| driftwatch_proto::time::now_unix_nanos() - 86_400 * 1_000_000_000)
}

/// The template of one stream's events; [`Generator::batch`] changes what
/// differs from event to event in place.
fn template(node: &str) -> Event {
    Event {
        event: Some(event::Event::File(FileChange {
            op: "open".into(),
            path: String::new(),
            resource: "app-config".into(),
            flags: vec!["O_WRONLY".into(), "O_CREAT".into(), "O_TRUNC".into()],
            mode: "0644".into(),
            resolved_from: "file".into(),
            result: Some(Outcome {
                ok: true,
                ..Default::default()
            }),
            ..Default::default()
        })),
        process: Some(Process {
            pid: 4242,
            tid: 4242,
            ppid: 4200,
            exec_id: String::new(),
            start_time_unix_nanos: t0(),
            user: "deploy".into(),
            comm: "sed".into(),
            exe: "/usr/bin/sed".into(),
            args: vec![
                "sed".into(),
                "-i".into(),
                "s/debug=false/debug=true/".into(),
                "app.yaml".into(),
            ],
            cgroup: "/system.slice/deploy.service".into(),
            ancestors: vec![Ancestor {
                pid: 4200,
                exec_id: "00000000deadbeef".into(),
                exe: "/usr/bin/bash".into(),
            }],
            ..Default::default()
        }),
        seq: 0,
        time_unix_nanos: 0,
        node: node.into(),
        chain: Vec::new(),
    }
}

/// Builds one stream's batches.
struct Generator {
    event: Event,
    events: Vec<u8>,
}

impl Generator {
    fn new(node: &str) -> Self {
        Self {
            event: template(node),
            events: Vec::new(),
        }
    }

    /// `AgentMessage { batch: EventBatch { events: seq..=last } }`, encoded.
    fn batch(&mut self, seq: u64, last: u64) -> Raw {
        use std::fmt::Write as _;
        self.events.clear();
        for s in seq..=last {
            let e = &mut self.event;
            e.seq = s;
            // Node time advances SPACING_NS per event: 50k events/s from
            // each of the four nodes, 200k/s together (the target's load).
            e.time_unix_nanos = t0() + s as i64 * SPACING_NS;
            // A new process every 100 events, each writing files of its
            // own, so that blocks are not one identity repeated.
            let proc_no = s / 100;
            if let Some(event::Event::File(f)) = &mut e.event {
                f.path.clear();
                let _ = write!(
                    f.path,
                    "/etc/myapp/conf.d/{}/{}.yaml",
                    proc_no % 20,
                    s.wrapping_mul(2_654_435_761) % 100_000
                );
            }
            if let Some(p) = &mut e.process {
                p.exec_id.clear();
                let _ = write!(
                    p.exec_id,
                    "{:016x}",
                    proc_no.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                );
                p.pid = 10_000 + (proc_no % 50_000) as u32;
                p.tid = p.pid;
                p.start_time_unix_nanos = t0() + (proc_no * 100) as i64 * SPACING_NS;
                if let Some(a) = p.args.last_mut() {
                    a.clear();
                    let _ = write!(a, "app-{}.yaml", s % 997);
                }
            }
            // EventBatch.events is field 1.
            prost::encoding::message::encode(1, &*e, &mut self.events);
        }
        driftwatch_proto::raw::batch_message(&self.events)
    }
}

async fn stream(url: String, node: String, from: u64, count: u64) -> Result<()> {
    use prost::Message as _;
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(8 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let hello = AgentMessage {
        msg: Some(Msg::Hello(Hello {
            node: Some(NodeInfo {
                name: node.clone(),
                ..Default::default()
            }),
            agent_started_unix_nanos: 1,
        })),
    };
    tx.send(Raw(hello.encode_to_vec())).await?;
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<Raw, CollectorMessage>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/driftwatch.v1.AgentService/Stream");
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            path,
            codec,
        )
        .await?
        .into_inner();
    let last = from + count - 1;
    let sender = tokio::spawn(async move {
        let mut generator = Generator::new(&node);
        let mut seq = from;
        while seq <= last {
            let batch = generator.batch(seq, (seq + BATCH - 1).min(last));
            if tx.send(batch).await.is_err() {
                break;
            }
            seq += BATCH;
        }
        tx
    });
    while let Some(m) = inbound.message().await? {
        if let Some(collector_message::Msg::Ack(a)) = m.msg {
            if a.through >= last {
                break;
            }
        }
    }
    drop(sender.await?);
    Ok(())
}

/// Sends `per_stream` events on each of the streams, continuing their sequences.
async fn ingest(url: &str, from: u64, per_stream: u64) -> Result<f64> {
    let start = Instant::now();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            tokio::spawn(stream(
                url.to_owned(),
                format!("bench-{i}"),
                from,
                per_stream,
            ))
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok((STREAMS * per_stream) as f64 / start.elapsed().as_secs_f64())
}

/// What a first page is asked for.
#[derive(Clone, Copy)]
enum Page {
    /// One node's events from a time on.
    Node,
    /// Events under a path prefix (every node) from a time on.
    Path,
    /// Events of one process instance.
    Exec,
    /// Everything from a time on, no limit: the first 100 of a replay.
    Replay,
}

async fn first_page(url: &str, since: i64, page: Page) -> Result<(Duration, usize)> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut q = QueryServiceClient::new(channel);
    let start = Instant::now();
    let mut s = q
        .timeline(match page {
            Page::Node => TimelineRequest {
                node: "bench-1".into(),
                since_unix_nanos: since,
                limit: 100,
                ..Default::default()
            },
            Page::Path => TimelineRequest {
                path_prefix: "/etc/myapp/".into(),
                since_unix_nanos: since,
                limit: 100,
                ..Default::default()
            },
            Page::Replay => TimelineRequest {
                since_unix_nanos: since,
                ..Default::default()
            },
            Page::Exec => TimelineRequest {
                // The process instance of the events at `since`.
                exec_id: format!(
                    "{:016x}",
                    (((since - t0()) / SPACING_NS) as u64 / 100)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ),
                limit: 100,
                ..Default::default()
            },
        })
        .await?
        .into_inner();
    let mut n = 0;
    let mut first = None;
    while n < 100 && s.message().await?.is_some() {
        first.get_or_insert(start.elapsed());
        n += 1;
    }
    if std::env::var_os("DRIFTWATCH_BENCH_DEBUG").is_some() {
        eprintln!(
            "bench:   first item after {:?}, all {n} after {:?}",
            first,
            start.elapsed()
        );
    }
    Ok((start.elapsed(), n))
}

/// The policy the collector judges the load with: every generated write is
/// outside `writers`, the costliest case (each is an unauthorized write
/// folded into its finding).
const POLICY: &str = "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: app-config\n    kind: config\n    paths: [\"/etc/myapp/\"]\n    writers: [ { exe: /usr/bin/ansible-playbook } ]\n";

fn start_collector(bin: &Path, data: &Path, port: u16, store: Option<&str>) -> Result<Child> {
    let policy = data.with_extension("policy.yaml");
    if let Some(parent) = policy.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&policy, POLICY).context("writing the bench policy")?;
    let child = Command::new(bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            &data.display().to_string(),
            "--policy",
            &policy.display().to_string(),
            "--log",
            &std::env::var("DRIFTWATCH_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ])
        .args(store.map(|url| ["--store", url]).into_iter().flatten())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the collector")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("collector did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Where the benchmarked collector stores events.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded default.
    Sled,
    /// A throwaway PostgreSQL server on loopback, started by the bench.
    Postgres,
}

/// Runs the benchmark.
pub fn run(store: StoreKind) -> Result<()> {
    if !crate::bench::set_up_already() {
        setup::ensure()?;
    }
    let store_arg = match store {
        StoreKind::Sled => "sled",
        StoreKind::Postgres => "postgres",
    };
    if crate::bench::rerun_in_release("collector", &["--store", store_arg])? {
        return Ok(());
    }
    let pg = match store {
        StoreKind::Sled => None,
        StoreKind::Postgres => Some(crate::postgres::Server::start("bench")?),
    };
    eprintln!("xtask: building driftwatch-collector (release)");
    setup::run(cargo().args(["build", "--release", "-p", "driftwatch-collector"]))?;
    let bin = root().join("target/release/driftwatch-collector");
    let dir = Path::new("/tmp/driftwatch-bench-collector");
    let _ = std::fs::remove_dir_all(dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut collector = start_collector(
        &bin,
        &dir.join("store"),
        port,
        pg.as_ref().map(|p| p.url.as_str()),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let total: u64 = std::env::var("DRIFTWATCH_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let first = (total / 10).clamp(STREAMS * BATCH, 1_000_000) / STREAMS;
    eprintln!(
        "bench: durable ingest, {} streams x {first} events",
        STREAMS
    );
    let cpu0 = cpu_seconds(collector.id());
    let gen0 = cpu_seconds(std::process::id());
    let rate = rt.block_on(ingest(&url, 1, first))?;
    let cpu_per_event = (cpu_seconds(collector.id()) - cpu0) / (STREAMS * first) as f64;
    let gen_per_event = (cpu_seconds(std::process::id()) - gen0) / (STREAMS * first) as f64;
    eprintln!("bench:   {rate:.0} events/s acked after fsync");
    let rest = total / STREAMS - first;
    eprintln!("bench: filling the store to {total} events");
    let mut rates = vec![rate];
    let chunk = 500_000;
    let mut done = first;
    while done < first + rest {
        let n = chunk.min(first + rest - done);
        rates.push(rt.block_on(ingest(&url, done + 1, n))?);
        done += n;
        eprintln!(
            "bench:   {} events stored ({:.0}/s)",
            done * STREAMS,
            rates.last().copied().unwrap_or(0.0)
        );
    }
    let unary = rt.block_on(async {
        let mut q = QueryServiceClient::connect(url.clone()).await?;
        let t = Instant::now();
        q.agents(driftwatch_proto::v1::AgentsRequest {}).await?;
        let first = t.elapsed();
        let t = Instant::now();
        q.agents(driftwatch_proto::v1::AgentsRequest {}).await?;
        eprintln!(
            "bench: unary agents() again on the same connection {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        anyhow::Ok(first)
    })?;
    eprintln!(
        "bench: unary agents() round trip {:.1} ms",
        unary.as_secs_f64() * 1e3
    );
    // First pages at ten points across the stored history.
    let mut pages = Vec::new();
    for page in [Page::Node, Page::Path, Page::Exec, Page::Replay] {
        let mut lat = Vec::new();
        for i in 0..10 {
            let since = t0() + (done as i64 * SPACING_NS) * i / 10;
            let (d, n) = rt.block_on(first_page(&url, since, page))?;
            if n != 100 {
                bail!("first page held {n} events, expected 100");
            }
            lat.push(d);
        }
        lat.sort();
        pages.push(lat);
    }
    let _ = collector.kill();
    let _ = collector.wait();
    let size: u64 = match &pg {
        None => walk_size(&dir.join("store")),
        Some(pg) => {
            let out = Command::new("psql")
                .args(["-q", "-A", "-t", &pg.url, "-c"])
                .arg("SELECT pg_database_size(current_database())")
                .output()
                .context("psql")?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        }
    };
    rates.sort_by(|a, b| a.total_cmp(b));
    println!();
    println!(
        "Driftwatch collector benchmark, store {store_arg} (one run, {} CPUs)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "durable ingest: {rate:.0} events/s on an empty store; median over the fill {:.0} events/s (target >= 200k/s)",
        rates[rates.len() / 2]
    );
    println!(
        "collector CPU per stored event: {:.1} us, i.e. {:.0} events/s per core; the load generator, on the same cores, {:.1} us per event",
        cpu_per_event * 1e6,
        1.0 / cpu_per_event,
        gen_per_event * 1e6
    );
    println!(
        "timeline first page (100 events) with {} events stored ({} nodes at {:.0} events/s each in node time; store {:.2} GiB on disk), target < 50 ms:",
        done * STREAMS,
        STREAMS,
        1e9 / SPACING_NS as f64,
        size as f64 / (1u64 << 30) as f64
    );
    for (what, lat) in [
        "one node from a time",
        "a path prefix (all nodes) from a time",
        "one exec_id",
        "a replay of all nodes from a time, no limit (its first 100)",
    ]
    .iter()
    .zip(&pages)
    {
        println!(
            "  {what}: median {:.1} ms, worst {:.1} ms",
            lat[lat.len() / 2].as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

fn walk_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}
