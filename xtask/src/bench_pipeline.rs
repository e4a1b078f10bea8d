//! `cargo xtask bench pipeline`: the path a deployment uses, end to end —
//! kernel sensors → agent → spool → gRPC stream → durable collector — with
//! the generator, the agent and the collector sharing this machine's cores.
//!
//! For each load (paced file changes at 1k…200k events/s, an exec-heavy and
//! a connect-heavy mix), a fresh collector and agent run for
//! `DRIFTWATCH_BENCH_SECONDS` (default 30) and the bench reports: events
//! offered, durable at the collector (acknowledged), lost (kernel ring,
//! spool eviction), agent and collector CPU and peak RSS, kernel event →
//! durable latency (p50/p99, from the agent's acknowledgements), the time
//! the backlog took to drain after the load, and how long the agent took to
//! stop after SIGINT. The headline is the highest rate with zero loss and
//! everything durable.
//!
//! `DRIFTWATCH_BENCH_AGENT=PATH` runs that agent binary instead of this
//! build's: an older build, run in turns with this one, gives an A/B on the
//! same machine in the same phase.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bench::{cpath, cpu_seconds},
    root, setup,
};

/// One load.
#[derive(Clone, Copy)]
enum Mix {
    /// open(O_WRONLY|O_CREAT) + close of 100 watched files: two events a change.
    File,
    /// fork + exec of /bin/true and its exit.
    Exec,
    /// TCP connects to a watched port on a loopback listener.
    Connect,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::File => "file changes",
            Mix::Exec => "exec-heavy",
            Mix::Connect => "connect-heavy",
        }
    }

    /// Events the agent reports per operation.
    fn events_per_op(self) -> u64 {
        match self {
            Mix::File | Mix::Exec => 2,
            Mix::Connect => 1,
        }
    }

    /// The agent's counter kinds this load produces.
    fn kinds(self) -> &'static [&'static str] {
        match self {
            Mix::File => &["file"],
            Mix::Exec => &["exec", "exit"],
            Mix::Connect => &["connect"],
        }
    }
}

struct Figures {
    mix: Mix,
    rate: u64,
    seconds: f64,
    ops: u64,
    kernel_emitted: u64,
    kernel_dropped: u64,
    spool_evicted: u64,
    spooled_last: u64,
    durable: u64,
    left_spooled: u64,
    agent_cpu: f64,
    collector_cpu: f64,
    agent_rss_mib: f64,
    collector_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    drain_s: f64,
    stop_s: f64,
}

impl Figures {
    fn zero_loss(&self) -> bool {
        self.kernel_dropped == 0
            && self.spool_evicted == 0
            && self.left_spooled == 0
            && self.durable >= self.spooled_last
            && self.kernel_emitted >= self.ops * self.mix.events_per_op()
    }
}

/// Peak resident memory of a live process, MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, sig) };
}

struct Procs {
    collector: Child,
    agent: Child,
    url: String,
    stats: PathBuf,
    cli: PathBuf,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in [&mut self.agent, &mut self.collector] {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A collector on `port` with its store in `dir`, judging with `policy`,
/// once it listens.
fn start_collector(dir: &Path, port: u16, policy: &Path, log: &str) -> Result<Child> {
    let mut collector = Command::new(root().join("target/release/driftwatch-collector"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("store"))
        .arg("--policy")
        .arg(policy)
        .args(["--log", log])
        .args(
            postgres_schema()?
                .map(|url| ["--store".to_owned(), url])
                .into_iter()
                .flatten(),
        )
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the collector")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = collector.kill();
            let _ = collector.wait();
            bail!("the collector did not listen within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(collector)
}

fn start(dir: &Path, watched: &Path, db_port: u16) -> Result<Procs> {
    let bin = root().join("target/release");
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let policy = write_policy(dir, watched, Some(db_port))?;
    let log = std::env::var("DRIFTWATCH_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let collector = start_collector(dir, port, &policy, &log)?;
    let stats = dir.join("agent-stats.json");
    let agent = Command::new(agent_bin())
        .args(["--collector", &url, "--node-name", "bench", "--spool-dir"])
        .arg(dir.join("spool"))
        .arg("--stats-file")
        .arg(&stats)
        .args(["--log", &log])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the agent")?;
    let procs = Procs {
        collector,
        agent,
        url,
        stats,
        cli: bin.join("driftwatch"),
    };
    // Ready once the collector's policy is in the agent's maps: its
    // policy_applied event is then durable.
    let deadline = Instant::now() + Duration::from_secs(90);
    while procs.acked()? < 2 {
        if Instant::now() > deadline {
            bail!("the agent did not connect and apply the policy within 90 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The first look at the watched files is digested; let it settle.
    std::thread::sleep(Duration::from_secs(1));
    Ok(procs)
}

impl Procs {
    /// The collector's durable acknowledgement for the bench node.
    fn acked(&self) -> Result<u64> {
        Ok(acked_seqs(&self.cli, &self.url)?
            .get("bench")
            .copied()
            .unwrap_or(0))
    }

    /// The agent's stats file, fresh (SIGUSR1 rewrites it).
    fn stats_now(&self) -> Result<serde_json::Value> {
        let before = std::fs::metadata(&self.stats)
            .and_then(|m| m.modified())
            .ok();
        signal(&self.agent, libc::SIGUSR1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::fs::metadata(&self.stats)
                .and_then(|m| m.modified())
                .ok();
            if now.is_some() && now != before {
                break;
            }
            if Instant::now() > deadline {
                bail!("the agent did not write its stats file on SIGUSR1");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        read_json(&self.stats)
    }
}

/// The collector's durable acknowledgement per host, from `driftwatch agents`.
fn acked_seqs(cli: &Path, url: &str) -> Result<std::collections::HashMap<String, u64>> {
    let out = Command::new(cli)
        .args(["--collector", url, "agents", "-o", "jsonl"])
        .stderr(Stdio::null())
        .output()
        .context("running driftwatch agents")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["host"].as_str()?.to_owned(), v["acked_seq"].as_u64()?)))
        .collect())
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Runs `op` paced to `ops_per_s` for `dur`; returns the operations done.
fn paced(ops_per_s: u64, dur: Duration, mut op: impl FnMut(u64) -> Result<()>) -> Result<u64> {
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= dur {
            return Ok(done);
        }
        let due = (elapsed.as_secs_f64() * ops_per_s as f64) as u64;
        if done >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        // Catch up in slices, never more than 1 ms of work at once.
        for _ in 0..(due - done).min(ops_per_s / 1000 + 1) {
            op(done)?;
            done += 1;
        }
    }
}

fn generate(mix: Mix, watched: &Path, db_port: u16, rate: u64, dur: Duration) -> Result<u64> {
    let ops_per_s = (rate / mix.events_per_op()).max(1);
    match mix {
        Mix::File => {
            let files: Vec<std::ffi::CString> = (0..100)
                .map(|i| cpath(&watched.join(format!("f{i}.conf"))))
                .collect::<Result<_>>()?;
            paced(ops_per_s, dur, |i| {
                let f = &files[(i % 100) as usize];
                // SAFETY: open and close of our own file with a valid C string.
                unsafe {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
                    if fd < 0 {
                        bail!("open failed: {}", std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            })
        }
        Mix::Exec => paced(ops_per_s, dur, |_| {
            let status = Command::new("/bin/true")
                .status()
                .context("running /bin/true")?;
            if !status.success() {
                bail!("/bin/true failed");
            }
            Ok(())
        }),
        Mix::Connect => paced(ops_per_s, dur, |_| {
            let s = TcpStream::connect(("127.0.0.1", db_port)).context("connecting")?;
            // Reset on close: no TIME_WAIT, so the ephemeral ports last.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our own socket with a valid struct of its size.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            Ok(())
        }),
    }
}

/// The policy file for a load in `dir`: the watched tree and, given a
/// port, a database on it. Writers and clients exclude the generator:
/// every event is judged an unauthorized write or connect and folded into
/// its finding, the costliest case for the collector.
fn write_policy(dir: &Path, watched: &Path, db_port: Option<u16>) -> Result<PathBuf> {
    let mut yaml = format!(
        "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  \
         - {{ name: bench, kind: config, paths: [\"{}/\"], writers: [ {{ user: nobody-else }} ] }}\n",
        watched.display()
    );
    if let Some(port) = db_port {
        yaml.push_str(&format!(
            "  - {{ name: db, kind: database, ports: [{port}], clients: [ {{ user: nobody-else }} ] }}\n"
        ));
    }
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, yaml)?;
    Ok(policy)
}

/// A fresh `/tmp/driftwatch-bench-pipeline/<name>` with the 100 watched
/// files the file mix changes; returns it and the watched tree.
fn fresh_dir(name: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = PathBuf::from(format!("/tmp/driftwatch-bench-pipeline/{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    let watched = dir.join("watched");
    std::fs::create_dir_all(&watched)?;
    for i in 0..100 {
        std::fs::write(watched.join(format!("f{i}.conf")), format!("key: {i}\n"))?;
    }
    Ok((dir, watched))
}

fn run_one(mix: Mix, rate: u64, dur: Duration) -> Result<Figures> {
    let (dir, watched) = fresh_dir(&format!("{}-{rate}", mix.name().replace(' ', "-")))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let db_port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut p = start(&dir, &watched, db_port)?;
    let before = p.stats_now()?;
    let kernel = |v: &serde_json::Value, field: &str| -> u64 {
        mix.kinds()
            .iter()
            .map(|k| v["counters"][k][field].as_u64().unwrap_or(0))
            .sum()
    };
    let (a0, c0) = (cpu_seconds(p.agent.id()), cpu_seconds(p.collector.id()));
    let t0 = Instant::now();
    let ops = generate(mix, &watched, db_port, rate, dur)?;
    let seconds = t0.elapsed().as_secs_f64();
    let (a1, c1) = (cpu_seconds(p.agent.id()), cpu_seconds(p.collector.id()));
    // Everything spooled by now must become durable.
    let at_end = p.stats_now()?;
    let spooled_last = at_end["spool_last_seq"].as_u64().unwrap_or(0);
    let drain_start = Instant::now();
    let mut durable = p.acked()?;
    while durable < spooled_last && drain_start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
        durable = p.acked()?;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let agent_rss_mib = peak_rss_mib(p.agent.id());
    let collector_rss_mib = peak_rss_mib(p.collector.id());
    let stop = Instant::now();
    signal(&p.agent, libc::SIGINT);
    let status = p.agent.wait()?;
    let stop_s = stop.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    let last = read_json(&p.stats)?;
    let durable_at_stop = p.acked()?;
    let d = &last["delivery"];
    Ok(Figures {
        mix,
        rate,
        seconds,
        ops,
        kernel_emitted: kernel(&last, "emitted") - kernel(&before, "emitted"),
        kernel_dropped: kernel(&last, "dropped"),
        spool_evicted: last["spool_evicted"].as_u64().unwrap_or(0),
        spooled_last,
        durable: durable.max(durable_at_stop),
        left_spooled: last["spool_waiting"].as_u64().unwrap_or(0),
        agent_cpu: (a1 - a0) / seconds * 100.0,
        collector_cpu: (c1 - c0) / seconds * 100.0,
        agent_rss_mib,
        collector_rss_mib,
        p50_ms: d["latency_p50_us"].as_f64().unwrap_or(0.0) / 1e3,
        p99_ms: d["latency_p99_us"].as_f64().unwrap_or(0.0) / 1e3,
        drain_s,
        stop_s,
    })
}

/// The same file changes with the agent alone writing JSON lines to a file
/// (`--stdout`, no collector): agent CPU, and records emitted / read.
fn run_stdout(rate: u64, dur: Duration) -> Result<(f64, u64, u64, u64)> {
    let (dir, watched) = fresh_dir(&format!("stdout-{rate}"))?;
    let policy = write_policy(&dir, &watched, None)?;
    let stats = dir.join("agent-stats.json");
    let stats_arg = stats.display().to_string();
    let agent = crate::agent::Agent::start(
        &agent_bin(),
        &policy,
        &dir.join("events.jsonl"),
        &["--stats-file", &stats_arg, "--log", "warn"],
    )?;
    // The first look at the watched files is digested; let it settle.
    std::thread::sleep(Duration::from_secs(1));
    let a0 = cpu_seconds(agent.pid());
    let t0 = Instant::now();
    generate(Mix::File, &watched, 0, rate, dur)?;
    let seconds = t0.elapsed().as_secs_f64();
    let a1 = cpu_seconds(agent.pid());
    agent.stop_quiet()?;
    let last = read_json(&stats)?;
    let f = &last["counters"]["file"];
    let n = |k: &str| f[k].as_u64().unwrap_or(0);
    Ok((
        (a1 - a0) / seconds * 100.0,
        n("emitted"),
        n("received"),
        n("dropped"),
    ))
}

/// Agents that spool a backlog with no collector up, then all reconnect
/// to a fresh one at once (what every collector restart looks like).
const BACKLOG_AGENTS: usize = 2;

/// What the collector did with the agents' backlog.
struct Backlog {
    agents: usize,
    events: u64,
    seconds: f64,
    collector_cpu: f64,
    collector_rss_mib: f64,
}

/// Collector ingest from real agents: `BACKLOG_AGENTS` agents each spool
/// `events` file events (every agent sees every change) while no collector
/// listens, stop with their spools full, and start again beside a fresh
/// collector; the rate is everything they had spooled, durable, over the
/// time from the collector's first acknowledgement to its last. The
/// generator is idle by then, so the cores are the collector's and the
/// agents' alone.
fn run_backlog(events: u64) -> Result<Backlog> {
    let (dir, watched) = fresh_dir("backlog")?;
    let bin = root().join("target/release");
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let policy = write_policy(&dir, &watched, None)?;
    let log = std::env::var("DRIFTWATCH_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let spawn_agent = |i: usize| -> Result<Child> {
        Command::new(agent_bin())
            .args(["--collector", &url, "--node-name", &format!("backlog-{i}")])
            .arg("--policy")
            .arg(&policy)
            .arg("--spool-dir")
            .arg(dir.join(format!("spool-{i}")))
            .arg("--stats-file")
            .arg(dir.join(format!("stats-{i}.json")))
            .args(["--spool-max-events", &(events * 2).to_string()])
            .args(["--log", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting an agent")
    };
    let stop_all = |agents: &mut Vec<Child>| -> Result<()> {
        for a in agents.iter() {
            signal(a, libc::SIGINT);
        }
        for a in agents.iter_mut() {
            a.wait()?;
        }
        Ok(())
    };
    let mut agents = (0..BACKLOG_AGENTS)
        .map(spawn_agent)
        .collect::<Result<Vec<_>>>()?;
    for a in &agents {
        crate::agent::wait_attached(a.id(), Duration::from_secs(90))?;
    }
    // Paced so that no agent falls behind its ring while it spools.
    generate(
        Mix::File,
        &watched,
        0,
        50_000,
        Duration::from_secs_f64(events as f64 / 50_000.0),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    stop_all(&mut agents)?;
    // Per agent: the backlog, and the last sequence number it holds.
    let mut backlog = Vec::new();
    for i in 0..BACKLOG_AGENTS {
        let s = read_json(&dir.join(format!("stats-{i}.json")))?;
        if s["counters"]["file"]["dropped"].as_u64().unwrap_or(0) > 0 {
            bail!("agent {i} lost file events in its ring while spooling the backlog");
        }
        backlog.push((
            s["spool_waiting"].as_u64().unwrap_or(0),
            s["spool_last_seq"].as_u64().unwrap_or(0),
        ));
    }
    let events: u64 = backlog.iter().map(|b| b.0).sum();
    let mut collector = start_collector(&dir, port, &policy, &log)?;
    let mut agents = (0..BACKLOG_AGENTS)
        .map(spawn_agent)
        .collect::<Result<Vec<_>>>()?;
    let cli = bin.join("driftwatch");
    // Acknowledged sequence number per agent.
    let acked = || -> Result<Vec<u64>> {
        let all = acked_seqs(&cli, &url)?;
        Ok((0..BACKLOG_AGENTS)
            .map(|i| all.get(&format!("backlog-{i}")).copied().unwrap_or(0))
            .collect())
    };
    let c0 = cpu_seconds(collector.id());
    let deadline = Instant::now() + Duration::from_secs(300);
    // The clock starts at the last look that saw nothing acknowledged
    // yet: the rate is never flattered by the polling interval.
    let mut first: Option<Instant> = None;
    let mut looked = Instant::now();
    let end = loop {
        let a = acked()?;
        let now = Instant::now();
        if first.is_none() && a.iter().any(|&x| x > 0) {
            first = Some(looked);
        }
        looked = now;
        if a.iter().zip(&backlog).all(|(x, b)| *x >= b.1) {
            break now;
        }
        if now > deadline {
            bail!("the collector did not store the agents' backlog within 300 s (acked {a:?} of {backlog:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let c1 = cpu_seconds(collector.id());
    let collector_rss_mib = peak_rss_mib(collector.id());
    stop_all(&mut agents)?;
    let _ = collector.kill();
    let _ = collector.wait();
    let seconds = (end - first.unwrap_or(end)).as_secs_f64().max(1e-3);
    Ok(Backlog {
        agents: BACKLOG_AGENTS,
        events,
        seconds,
        collector_cpu: (c1 - c0) / seconds * 100.0,
        collector_rss_mib,
    })
}

/// The server `DRIFTWATCH_BENCH_STORE=postgres` runs the collectors on.
static POSTGRES: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// A new, empty schema for the next collector (each load starts from an
/// empty store), when the bench runs on PostgreSQL.
fn postgres_schema() -> Result<Option<String>> {
    let Some(base) = POSTGRES.get() else {
        return Ok(None);
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let schema = format!(
        "bench_{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    setup::run(
        Command::new("psql")
            .args(["-q", base, "-c"])
            .arg(format!("CREATE SCHEMA {schema}"))
            .stdout(Stdio::null()),
    )?;
    Ok(Some(format!("{base}?options=-c%20search_path%3D{schema}")))
}

/// The agent binary under test: this build's, or `DRIFTWATCH_BENCH_AGENT`.
fn agent_bin() -> PathBuf {
    std::env::var_os("DRIFTWATCH_BENCH_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/driftwatch-agent"))
}

/// Runs the benchmark.
pub fn run() -> Result<()> {
    setup::require_root("cargo xtask bench pipeline")?;
    if !crate::bench::set_up_already() {
        setup::ensure()?;
        crate::build_agent(true)?;
    }
    if crate::bench::rerun_in_release("pipeline", &[])? {
        return Ok(());
    }
    // DRIFTWATCH_BENCH_STORE=postgres: every collector on a throwaway
    // PostgreSQL (the server's CPU is not in the collector's figure).
    let _pg = match std::env::var("DRIFTWATCH_BENCH_STORE").as_deref() {
        Ok("postgres") => {
            let server = crate::postgres::Server::start("bench-pipeline")?;
            let _ = POSTGRES.set(server.url.clone());
            Some(server)
        }
        Ok("sled") | Err(_) => None,
        Ok(other) => bail!("DRIFTWATCH_BENCH_STORE={other}: expected sled or postgres"),
    };
    let secs: u64 = std::env::var("DRIFTWATCH_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dur = Duration::from_secs(secs);
    let rates: Vec<u64> = std::env::var("DRIFTWATCH_BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 100_000, 200_000]);
    let mut loads: Vec<(Mix, u64)> = rates.iter().map(|&r| (Mix::File, r)).collect();
    if std::env::var_os("DRIFTWATCH_BENCH_FILE_ONLY").is_none() {
        loads.push((Mix::Exec, 2_000));
        loads.push((Mix::Connect, 10_000));
    }
    let mut all = Vec::new();
    for (mix, rate) in loads {
        eprintln!("bench: {} at {rate} events/s for {secs} s", mix.name());
        let f = run_one(mix, rate, dur)?;
        eprintln!(
            "bench:   offered {:.0}/s, durable {} of {} spooled, lost {}+{}, agent {:.1}% collector {:.1}%, p99 {:.1} ms, stop {:.2} s",
            f.ops as f64 * f.mix.events_per_op() as f64 / f.seconds,
            f.durable,
            f.spooled_last,
            f.kernel_dropped,
            f.spool_evicted,
            f.agent_cpu,
            f.collector_cpu,
            f.p99_ms,
            f.stop_s
        );
        all.push(f);
    }
    let backlog_events: u64 = std::env::var("DRIFTWATCH_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    eprintln!(
        "bench: {BACKLOG_AGENTS} agents spool {backlog_events} file events each with no collector, then reconnect to a fresh one"
    );
    let backlog = run_backlog(backlog_events)?;
    let stdout_rate = 10_000;
    eprintln!(
        "bench: file changes at {stdout_rate} events/s for {secs} s, agent alone with --stdout"
    );
    let (stdout_cpu, emitted, received, dropped) = run_stdout(stdout_rate, dur)?;
    println!();
    println!(
        "Driftwatch pipeline benchmark: kernel -> agent -> spool -> gRPC -> durable collector on {} ({} CPUs, generator, agent and collector together; {secs} s per load)",
        if POSTGRES.get().is_some() { "PostgreSQL" } else { "sled" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "| load | offered events/s | kernel events | durable (acked) / spooled | lost: kernel ring, spool | agent CPU | collector CPU | agent / collector peak RSS | event -> durable p50 / p99 | backlog drained | agent stop after SIGINT |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for f in &all {
        println!(
            "| {} at {} | {:.0} | {} | {} / {}{} | {}, {} | {:.1} % | {:.1} % | {:.0} / {:.0} MiB | {:.1} / {:.1} ms | {:.1} s | {:.2} s |",
            f.mix.name(),
            f.rate,
            f.ops as f64 * f.mix.events_per_op() as f64 / f.seconds,
            f.kernel_emitted,
            f.durable,
            f.spooled_last,
            if f.zero_loss() { " (zero loss)" } else { "" },
            f.kernel_dropped,
            f.spool_evicted,
            f.agent_cpu,
            f.collector_cpu,
            f.agent_rss_mib,
            f.collector_rss_mib,
            f.p50_ms,
            f.p99_ms,
            f.drain_s,
            f.stop_s,
        );
    }
    println!(
        "file changes at {stdout_rate}, agent alone with --stdout to a file (no collector): agent CPU {stdout_cpu:.1} %, {received} of {emitted} records read, {dropped} lost in the ring"
    );
    println!(
        "collector ingest from real agents: {} agents' spooled backlog, {} events durable in {:.1} s = {:.0} events/s (collector CPU {:.0} % of a core, peak RSS {:.0} MiB; judged against the policy)",
        backlog.agents,
        backlog.events,
        backlog.seconds,
        backlog.events as f64 / backlog.seconds,
        backlog.collector_cpu,
        backlog.collector_rss_mib
    );
    // A load counts as sustained only if the generator really offered it
    // (on two shared cores it may not keep up with its own target).
    let offered = |f: &Figures| f.ops as f64 * f.mix.events_per_op() as f64 / f.seconds;
    let clean = || {
        all.iter()
            .filter(|f| matches!(f.mix, Mix::File) && f.zero_loss())
    };
    match clean()
        .filter(|f| offered(f) >= 0.95 * f.rate as f64)
        .map(|f| f.rate)
        .max()
    {
        Some(r) => println!(
            "highest file-change rate offered and sustained with zero loss, everything durable: {r} events/s"
        ),
        None => println!("no file-change rate was sustained with zero loss"),
    }
    if let Some(f) = clean().max_by(|a, b| offered(a).total_cmp(&offered(b))) {
        println!(
            "highest rate the generator reached, with zero loss: {:.0} events/s (its target: {})",
            offered(f),
            f.rate
        );
    }
    Ok(())
}
