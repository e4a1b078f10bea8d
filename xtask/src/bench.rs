//! `cargo xtask bench sensors`: the agent's cost and capacity, each measured
//! as a ratio or a rate within one run (machines here are shared and noisy).
//!
//! 1. Unwatched file syscalls (open for write, write, close, stat, chmod,
//!    rename) with the agent off vs on: alternating rounds, median ns per
//!    iteration, ratio on/off. Target ≤ 1.05×.
//! 2. Watched events end to end: a generator on one core calls `fchmod` on a
//!    watched file as fast as it can (each call is one event through kernel
//!    filter, ring buffer, decode, identity and JSON); the agent's counters
//!    say how many it received and whether any were lost. Then the same at a
//!    paced 200k/s. Target ≥ 200k events/s with zero loss.

use std::{
    ffi::CString,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{agent::Agent, build_agent, setup};

/// Which benchmark to run.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    /// Kernel sensors and agent pipeline.
    Sensors,
    /// Collector ingest and timeline queries.
    Collector,
    /// The whole path: kernel, agent, spool, stream, durable collector.
    Pipeline,
    /// Unwatched work with driftwatch, auditd, bpftrace and fatrace.
    Peers,
    /// What a guardrail adds to the connects and writes it judges.
    Guardrails,
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// Set for the release build a benchmark re-runs: the set-up is done.
const SET_UP: &str = "DRIFTWATCH_BENCH_SET_UP";

/// True in the release build a benchmark re-ran: the set-up is done.
pub fn set_up_already() -> bool {
    std::env::var_os(SET_UP).is_some()
}

/// From a debug build of xtask (what `cargo xtask` runs), builds and runs
/// the release build of `bench <which>` instead: an unoptimised load
/// generator would take the cores it shares with what it measures. True
/// when it did so and the caller is done.
pub fn rerun_in_release(which: &str, extra: &[&str]) -> Result<bool> {
    if !cfg!(debug_assertions) {
        return Ok(false);
    }
    eprintln!("xtask: building the load generator (xtask, release)");
    setup::run(crate::cargo().args(["build", "--release", "-p", "xtask"]))?;
    let status = std::process::Command::new(crate::root().join("target/release/xtask"))
        .args(["bench", which])
        .args(extra)
        .env(SET_UP, "1")
        .status()
        .context("running the release build of xtask")?;
    if !status.success() {
        bail!("the {which} benchmark failed ({status})");
    }
    Ok(true)
}

/// `p` as a C string, for the benchmarks' direct syscalls.
pub fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).context("path with NUL")
}

/// One iteration of unwatched file work; returns ns per iteration.
fn unwatched_round(dir: &Path, iters: u32) -> Result<f64> {
    let a = cpath(&dir.join("a.txt"))?;
    let b = cpath(&dir.join("b.txt"))?;
    let start = Instant::now();
    for _ in 0..iters {
        // SAFETY: plain syscalls on our own files with valid C strings.
        unsafe {
            let fd = libc::open(a.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
            if fd < 0 {
                bail!("open failed: {}", std::io::Error::last_os_error());
            }
            libc::write(fd, b"x".as_ptr().cast(), 1);
            libc::close(fd);
            let mut st: libc::stat = std::mem::zeroed();
            libc::stat(a.as_ptr(), &mut st);
            libc::chmod(a.as_ptr(), 0o600);
            libc::rename(a.as_ptr(), b.as_ptr());
            libc::rename(b.as_ptr(), a.as_ptr());
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / f64::from(iters))
}

/// The middle value (the upper of the two middles for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Calls fchmod on `fd` `count` times, paced to `rate` per second if given.
fn generate(fd: i32, count: u64, rate: Option<u64>) -> Duration {
    let start = Instant::now();
    for i in 0..count {
        if let Some(rate) = rate {
            if i % 1000 == 0 {
                let due = Duration::from_nanos(i * 1_000_000_000 / rate);
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
        // SAFETY: fchmod on our own open fd.
        unsafe { libc::fchmod(fd, if i % 2 == 0 { 0o600 } else { 0o644 }) };
    }
    start.elapsed()
}

struct Throughput {
    offered_per_s: f64,
    end_to_end_per_s: f64,
    emitted: u64,
    received: u64,
    dropped: u64,
}

fn throughput(
    bin: &Path,
    policy: &Path,
    dir: &Path,
    count: u64,
    rate: Option<u64>,
) -> Result<Throughput> {
    let stats = dir.join("stats.json");
    let _ = std::fs::remove_file(&stats);
    let stats_arg = stats.display().to_string();
    let agent = Agent::start(
        bin,
        policy,
        Path::new("/dev/null"),
        &[
            "--ring-mib",
            "256",
            "--stats-file",
            &stats_arg,
            "--log",
            "warn",
        ],
    );
    // /dev/null never shows agent_start; wait for the sensors differently.
    let agent = match agent {
        Ok(a) => a,
        Err(e) => bail!("{e:#}"),
    };
    let file = cpath(&dir.join("watched/target.bin"))?;
    // SAFETY: opening our own file.
    let fd = unsafe { libc::open(file.as_ptr(), libc::O_RDONLY | libc::O_CREAT, 0o644) };
    if fd < 0 {
        bail!("open failed: {}", std::io::Error::last_os_error());
    }
    let t0 = Instant::now();
    let gen = generate(fd, count, rate);
    // SAFETY: closing our fd.
    unsafe { libc::close(fd) };
    // The clock stops when the agent has read every record the kernel
    // wrote (asked for with SIGUSR1), not at its exit: stopping (detaching
    // ~55 hooks, RCU grace periods) is shutdown cost, not throughput.
    let read_all = |v: &serde_json::Value| {
        let f = &v["counters"]["file"];
        let n = |k: &str| f[k].as_u64().unwrap_or(0);
        n("emitted") + n("dropped") >= count && n("received") >= n("emitted")
    };
    let mut total = None;
    while t0.elapsed() < Duration::from_secs(300) {
        let _ = std::fs::remove_file(&stats);
        agent.ask_stats();
        let asked = Instant::now();
        while !stats.exists() && asked.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let now = t0.elapsed();
        let v: Option<serde_json::Value> = std::fs::read_to_string(&stats)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if v.as_ref().is_some_and(read_all) {
            total = Some(now);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let total = total.context("the agent did not read every record within 300 s")?;
    let _ = std::fs::remove_file(&stats);
    agent.stop_quiet()?;
    let text = std::fs::read_to_string(&stats).context("reading the agent's stats file")?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let f = &v["counters"]["file"];
    let n = |k: &str| f[k].as_u64().unwrap_or(0);
    Ok(Throughput {
        offered_per_s: count as f64 / gen.as_secs_f64(),
        end_to_end_per_s: n("received") as f64 / total.as_secs_f64(),
        emitted: n("emitted"),
        received: n("received"),
        dropped: n("dropped"),
    })
}

/// Median ns per operation of each guardrail configuration.
struct GuardCost {
    connect_off: f64,
    connect_monitor: f64,
    connect_enforce: f64,
    write_monitor: f64,
    write_enforce: f64,
    /// Best rounds: connect off, monitor, enforce; write monitor, enforce.
    best: [f64; 5],
}

/// ns per connect+close to `port` on loopback, where nothing listens: the
/// cgroup hook (and the guardrail) runs before the SYN, and the answer
/// (ECONNREFUSED) takes no accept on a busy machine's scheduler.
fn connect_round(port: u16, iters: u32) -> Result<f64> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: plain socket calls on our own fd, with valid pointers and sizes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let rc = libc::connect(
                fd,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            if rc == 0 || e.raw_os_error() != Some(libc::ECONNREFUSED) {
                bail!("connect to 127.0.0.1:{port}: expected ECONNREFUSED, got {e}");
            }
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / f64::from(iters))
}

/// ns per open(O_WRONLY|O_TRUNC)+write+close of a watched file.
fn write_round(file: &Path, iters: u32) -> Result<f64> {
    let c = cpath(file)?;
    let t = Instant::now();
    for _ in 0..iters {
        // SAFETY: our own file and fd.
        unsafe {
            let fd = libc::open(
                c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            );
            if fd < 0 {
                bail!("open failed: {}", std::io::Error::last_os_error());
            }
            libc::write(fd, b"x".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
    Ok(t.elapsed().as_nanos() as f64 / f64::from(iters))
}

/// What a guardrail adds to the calls it judges: connects to a watched
/// port and writes of a watched file by an allowed process (this one), the
/// agent off, in mode monitor and in mode enforce, in alternating rounds.
fn guard_cost(bin: &Path, dir: &Path) -> Result<GuardCost> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let me = std::env::current_exe()?.canonicalize()?;
    let tree = dir.join("guarded");
    std::fs::create_dir_all(&tree)?;
    let file = tree.join("settings.yaml");
    let policy = |mode: &str| -> Result<std::path::PathBuf> {
        let p = dir.join(format!("guard-{mode}.yaml"));
        std::fs::write(
            &p,
            format!(
                "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - {{ name: db, kind: database, ports: [{port}], mode: {mode}, clients: [ {{ exe: \"{me}\" }} ] }}\n  - {{ name: cfg, kind: config, paths: [\"{tree}/\"], mode: {mode}, writers: [ {{ exe: \"{me}\" }} ] }}\n",
                me = me.display(),
                tree = tree.display()
            ),
        )?;
        Ok(p)
    };
    let (monitor, enforce) = (policy("monitor")?, policy("enforce")?);
    let (iters, writes, rounds) = (20_000, 5_000, 7);
    eprintln!("bench: guardrail cost, connects and writes: off, monitor, enforce ({rounds} alternating rounds)");
    connect_round(port, iters / 4)?;
    let mut c = [Vec::new(), Vec::new(), Vec::new()];
    let mut w = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        c[0].push(connect_round(port, iters)?);
        for (i, p) in [&monitor, &enforce].into_iter().enumerate() {
            let agent = Agent::start(
                bin,
                p,
                Path::new("/dev/null"),
                &["--log", "warn", "--ring-mib", "64"],
            )?;
            // The gates are in before the agent reports ready; a refused
            // connect here would fail the round.
            c[i + 1].push(connect_round(port, iters)?);
            w[i].push(write_round(&file, writes)?);
            agent.stop_quiet()?;
        }
        eprintln!(
            "bench:   round {round}: connect off {:.0} / monitor {:.0} / enforce {:.0} ns, write monitor {:.0} / enforce {:.0} ns",
            c[0][round], c[1][round], c[2][round], w[0][round], w[1][round]
        );
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(GuardCost {
        connect_off: median(&c[0]),
        connect_monitor: median(&c[1]),
        connect_enforce: median(&c[2]),
        write_monitor: median(&w[0]),
        write_enforce: median(&w[1]),
        best: [
            best(&c[0]),
            best(&c[1]),
            best(&c[2]),
            best(&w[0]),
            best(&w[1]),
        ],
    })
}

fn print_guard(g: &GuardCost) {
    println!(
        "guardrails, connect to a watched port by an allowed client (median of rounds): off {:.0} ns, monitor {:.0} ns ({:.3}x), enforce {:.0} ns ({:.3}x); enforce vs monitor {:.3}x",
        g.connect_off,
        g.connect_monitor,
        g.connect_monitor / g.connect_off,
        g.connect_enforce,
        g.connect_enforce / g.connect_off,
        g.connect_enforce / g.connect_monitor
    );
    println!(
        "guardrails, connect, best rounds: off {:.0} ns, monitor {:.0} ns, enforce {:.0} ns; enforce vs monitor {:.3}x",
        g.best[0],
        g.best[1],
        g.best[2],
        g.best[2] / g.best[1]
    );
    println!(
        "guardrails, open(O_WRONLY|O_TRUNC)+write+close of a watched file by an allowed writer: monitor {:.0} ns, enforce {:.0} ns ({:.3}x); best rounds {:.0} / {:.0} ns ({:.3}x)",
        g.write_monitor,
        g.write_enforce,
        g.write_enforce / g.write_monitor,
        g.best[3],
        g.best[4],
        g.best[4] / g.best[3]
    );
}

/// Runs a benchmark.
pub fn run(which: Which) -> Result<()> {
    if !matches!(which, Which::Sensors | Which::Guardrails) {
        bail!("bench::run handles the sensors and guardrails benchmarks only");
    }
    setup::require_root("cargo xtask bench")?;
    setup::ensure()?;
    let bin = build_agent(true)?;
    let dir = Path::new("/tmp/driftwatch-bench");
    let _ = std::fs::remove_dir_all(dir);
    if matches!(which, Which::Guardrails) {
        std::fs::create_dir_all(dir)?;
        let g = guard_cost(&bin, dir)?;
        println!();
        print_guard(&g);
        return Ok(());
    }
    std::fs::create_dir_all(dir.join("watched"))?;
    std::fs::create_dir_all(dir.join("unwatched"))?;
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - {{ name: bench, kind: model, paths: [\"{}/watched/\"] }}\n",
            dir.display()
        ),
    )?;

    let rounds = 9;
    eprintln!("bench: unwatched file syscalls, agent off vs on ({rounds} alternating rounds)");
    let iters = 20_000;
    unwatched_round(&dir.join("unwatched"), iters / 4)?; // warm caches
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        off.push(unwatched_round(&dir.join("unwatched"), iters)?);
        let agent = Agent::start(&bin, &policy, &dir.join("events.jsonl"), &["--log", "warn"])?;
        on.push(unwatched_round(&dir.join("unwatched"), iters)?);
        let events = agent.stop()?;
        let leaked = events.iter().filter(|e| e["kind"] == "file").count();
        if leaked > 0 {
            bail!("{leaked} file events reached user space for unwatched paths");
        }
        eprintln!(
            "bench:   round {round}: off {:.0} ns/iter, on {:.0} ns/iter",
            off[round], on[round]
        );
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (off_min, on_min) = (min(&off), min(&on));
    let (off_m, on_m) = (median(&off), median(&on));

    let guard = guard_cost(&bin, dir)?;

    eprintln!("bench: watched events, unpaced burst of 1,000,000");
    let burst = throughput(&bin, &policy, dir, 1_000_000, None)?;
    eprintln!("bench: watched events, paced at 200,000/s for 3 s");
    let paced = throughput(&bin, &policy, dir, 600_000, Some(200_000))?;

    println!();
    println!(
        "Driftwatch sensors benchmark (one run, {} CPUs)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "unwatched file syscalls: median off {off_m:.0} ns/iter, on {on_m:.0} ns/iter, ratio {:.3}x; \
         best off {off_min:.0}, on {on_min:.0}, ratio {:.3}x (target <= 1.05x)",
        on_m / off_m,
        on_min / off_min
    );
    print_guard(&guard);
    for (name, t) in [("unpaced burst", &burst), ("paced 200k/s", &paced)] {
        println!(
            "watched events, {name}: offered {:.0}/s, end to end {:.0}/s, emitted {}, received {}, lost {}{}",
            t.offered_per_s,
            t.end_to_end_per_s,
            t.emitted,
            t.received,
            t.dropped,
            if t.dropped == 0 && t.received == t.emitted { " (zero loss)" } else { "" }
        );
    }
    Ok(())
}
