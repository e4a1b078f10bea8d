//! `cargo xtask bench peers`: what every node pays all day for work that
//! nobody watches, with Driftwatch beside the tools a team would otherwise
//! run for the same job — auditd (`-w DIR -p wa`), bpftrace (a path-filtered
//! write-open tracepoint) and fatrace — each measured against nothing
//! running, in alternating rounds within one run (these machines are shared
//! and noisy: only ratios taken side by side mean anything).
//!
//! Two workloads, neither touching a watched path:
//! - untar + rm of a tree of ~14,000 small files;
//! - open(O_WRONLY|O_CREAT) + close of one file, ns per pair.
//!
//! Every tool watches the same directory (`watched/`), which the workloads
//! never touch. Driftwatch must also report nothing for them: a file event
//! for an unwatched path fails the bench.
//!
//! Two floors run beside them (`floor.rs`): programs that do nothing, on
//! every syscall tracepoint the agent attaches, and on one raw
//! `sys_enter`/`sys_exit` pair that only reads and compares the syscall
//! number. No sensor built on those hooks can cost less than its floor, so
//! they show how much of the agent's cost is its own work and whether a
//! target is within reach of a design at all.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent::Agent,
    bench::{cpath, median},
    floor::Floor,
    setup,
};

const DIR: &str = "/tmp/driftwatch-bench-peers";
/// Directories and files per directory of the untar tree.
const TREE: (usize, usize) = (140, 100);
/// open+close pairs per measurement.
const PAIRS: u32 = 100_000;
/// Untar+rm runs and open+close runs per tool and round (the best counts).
const UNTAR_RUNS: usize = 2;
const PAIR_RUNS: usize = 3;
/// Quiet time after a tool starts, before it is measured.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Nothing,
    Auditd,
    Bpftrace,
    Fatrace,
    Driftwatch,
    /// No-op programs on every syscall tracepoint the agent attaches.
    FloorTracepoints,
    /// No-op raw `sys_enter`/`sys_exit` programs that read and compare the
    /// syscall number, the least a single dispatcher would cost.
    FloorRaw,
}

impl Tool {
    const ALL: [Tool; 7] = [
        Tool::Nothing,
        Tool::Auditd,
        Tool::Bpftrace,
        Tool::Fatrace,
        Tool::Driftwatch,
        Tool::FloorTracepoints,
        Tool::FloorRaw,
    ];

    fn name(self) -> &'static str {
        match self {
            Tool::Nothing => "nothing",
            Tool::Auditd => "auditd -w DIR -p wa",
            Tool::Bpftrace => "bpftrace (openat, path filter)",
            Tool::Fatrace => "fatrace",
            Tool::Driftwatch => "driftwatch agent",
            Tool::FloorTracepoints => "floor: no-op on the agent's tracepoints",
            Tool::FloorRaw => "floor: no-op raw sys_enter/sys_exit",
        }
    }
}

/// A tool running for one round.
enum Running {
    None,
    Child(Child),
    Auditd(Child),
    Agent(Agent),
    Floor(Floor),
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let until = Instant::now() + limit;
    while !ready()? {
        if Instant::now() > until {
            bail!("{what} was not ready within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn audit_enabled() -> bool {
    Command::new("auditctl")
        .arg("-s")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("enabled 1"))
}

fn start(tool: Tool, dir: &Path, agent: &Path, agent_hooks: &[String]) -> Result<Running> {
    let watched = dir.join("watched");
    Ok(match tool {
        Tool::Nothing => Running::None,
        Tool::Auditd => {
            let child = Command::new("auditd")
                .args(["-n", "-s", "enable"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting auditd")?;
            wait_for("auditd", Duration::from_secs(20), || Ok(audit_enabled()))?;
            quiet(Command::new("auditctl").arg("-w").arg(&watched).args([
                "-p",
                "wa",
                "-k",
                "driftwatch-bench",
            ]))?;
            Running::Auditd(child)
        }
        Tool::Bpftrace => {
            let prefix = format!("{}/", watched.display());
            let script = format!(
                "tracepoint:syscalls:sys_enter_openat /(args->flags & 3) != 0 && \
                 strncmp(str(args->filename), \"{prefix}\", {}) == 0/ \
                 {{ printf(\"%d %s\\n\", pid, str(args->filename)); }}",
                prefix.len()
            );
            let mut child = Command::new("bpftrace")
                .args(["-e", &script])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting bpftrace")?;
            // It prints "Attaching N probe..." once the probe is in.
            let stdout = child.stdout.take().context("bpftrace's stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("Attaching") => break,
                    Some(Ok(_)) => {}
                    _ => bail!("bpftrace exited before attaching its probe"),
                }
            }
            // Keep reading so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            Running::Child(child)
        }
        Tool::Fatrace => {
            let log = dir.join("fatrace.log");
            // It refuses to overwrite its log.
            let _ = std::fs::remove_file(&log);
            let child = Command::new("fatrace")
                .args(["-f", "W", "-o"])
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting fatrace")?;
            // fanotify marks are in place a moment after start; nothing to
            // wait on but time.
            std::thread::sleep(Duration::from_millis(500));
            Running::Child(child)
        }
        Tool::Driftwatch => {
            let policy = dir.join("policy.yaml");
            Running::Agent(Agent::start(
                agent,
                &policy,
                &dir.join("events.jsonl"),
                &["--log", "warn"],
            )?)
        }
        Tool::FloorTracepoints => Running::Floor(Floor::tracepoints(
            agent_hooks
                .iter()
                .filter_map(|h| h.strip_prefix("syscalls/")),
        )?),
        Tool::FloorRaw => Running::Floor(Floor::raw_syscalls()?),
    })
}

/// The hooks the agent attaches on this kernel, from its `agent_start`.
fn agent_hooks(dir: &Path, agent: &Path) -> Result<Vec<String>> {
    let a = Agent::start(
        agent,
        &dir.join("policy.yaml"),
        &dir.join("events.jsonl"),
        &["--log", "warn"],
    )?;
    let events = a.stop()?;
    let start = events
        .iter()
        .find(|e| e["kind"] == "agent_start")
        .context("the agent printed no agent_start")?;
    Ok(start["hooks"]
        .as_array()
        .context("agent_start without hooks")?
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect())
}

fn stop(r: Running) -> Result<()> {
    match r {
        Running::None => Ok(()),
        Running::Floor(f) => {
            f.detach();
            Ok(())
        }
        Running::Child(mut c) => {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            c.wait()?;
            Ok(())
        }
        Running::Auditd(mut c) => {
            quiet(Command::new("auditctl").arg("-D"))?;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait()?;
            // No daemon, no auditing: the kernel would log to its ring.
            quiet(Command::new("auditctl").args(["-e", "0"]))?;
            Ok(())
        }
        Running::Agent(a) => {
            let events = a.stop()?;
            let leaked = events
                .iter()
                .filter(|e| {
                    e["kind"] == "file" && e["path"].as_str().is_some_and(|p| p.contains("/work/"))
                })
                .count();
            if leaked > 0 {
                bail!("the agent reported {leaked} file events for unwatched paths");
            }
            Ok(())
        }
    }
}

/// Wall time of `tar -xf` of the tree into `work/` and `rm -rf` of it.
fn untar_rm(dir: &Path) -> Result<f64> {
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    let start = Instant::now();
    quiet(
        Command::new("tar")
            .arg("-xf")
            .arg(dir.join("tree.tar"))
            .arg("-C")
            .arg(&work),
    )?;
    quiet(Command::new("rm").arg("-rf").arg(work.join("tree")))?;
    Ok(start.elapsed().as_secs_f64())
}

/// ns per open(O_WRONLY|O_CREAT) + close of an unwatched file.
fn open_close(dir: &Path) -> Result<f64> {
    let f = cpath(&dir.join("work/oc.txt"))?;
    let start = Instant::now();
    for _ in 0..PAIRS {
        // SAFETY: plain syscalls on our own file with a valid C string.
        let fd = unsafe { libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644) };
        if fd < 0 {
            bail!("open failed: {}", std::io::Error::last_os_error());
        }
        // SAFETY: closing the fd just opened.
        unsafe { libc::close(fd) };
    }
    Ok(start.elapsed().as_nanos() as f64 / f64::from(PAIRS))
}

fn make_tree(dir: &Path) -> Result<()> {
    let src = dir.join("src/tree");
    for d in 0..TREE.0 {
        let sub = src.join(format!("d{d:03}"));
        std::fs::create_dir_all(&sub)?;
        for f in 0..TREE.1 {
            std::fs::write(sub.join(format!("f{f:03}.txt")), format!("file {d} {f}\n"))?;
        }
    }
    quiet(
        Command::new("tar")
            .arg("-cf")
            .arg(dir.join("tree.tar"))
            .arg("-C")
            .arg(dir.join("src"))
            .arg("tree"),
    )?;
    std::fs::remove_dir_all(dir.join("src"))?;
    Ok(())
}

fn best(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        best = best.min(f()?);
    }
    Ok(best)
}

/// Runs the benchmark.
pub fn run() -> Result<()> {
    setup::require_root("cargo xtask bench peers")?;
    if !crate::bench::set_up_already() {
        setup::ensure()?;
        setup::apt(&["auditd", "bpftrace", "fatrace"])?;
        crate::build_agent(true)?;
    }
    if crate::bench::rerun_in_release("peers", &[])? {
        return Ok(());
    }
    if Command::new("pgrep")
        .args(["-x", "auditd"])
        .output()?
        .status
        .success()
    {
        bail!("an auditd is already running; the bench starts and stops its own");
    }
    let rounds: usize = std::env::var("DRIFTWATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let dir = Path::new(DIR);
    let work = dir.join("work");
    let _ = Command::new("umount")
        .arg(&work)
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("watched"))?;
    std::fs::create_dir_all(&work)?;
    // The workloads run on a tmpfs: on the disk, ext4's search for inodes
    // not recently deleted made one untar 7x slower than the one before
    // it, noise that drowns every tool's cost.
    quiet(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1g", "driftwatch-bench"])
            .arg(&work),
    )?;
    // bpftrace wants locked memory it no longer needs (memcg accounting);
    // lift the limit so it does not complain each round.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let result = measure(dir, rounds);
    let _ = Command::new("umount").arg(&work).status();
    result
}

fn measure(dir: &Path, rounds: usize) -> Result<()> {
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  \
             - {{ name: bench, kind: config, paths: [\"{}/watched/\"] }}\n",
            dir.display()
        ),
    )?;
    eprintln!(
        "bench: building a tree of {} files to untar",
        TREE.0 * TREE.1
    );
    make_tree(dir)?;
    // Warm the caches once.
    untar_rm(dir)?;
    open_close(dir)?;

    let agent: PathBuf = crate::root().join("target/release/driftwatch-agent");
    let hooks = agent_hooks(dir, &agent)?;
    eprintln!(
        "bench: the agent attaches {} hooks; the floor puts no-op programs on its {} syscall tracepoints",
        hooks.len(),
        hooks.iter().filter(|h| h.starts_with("syscalls/")).count()
    );
    let n = Tool::ALL.len();
    let mut untar = vec![Vec::new(); n];
    let mut pairs = vec![Vec::new(); n];
    for round in 0..rounds {
        // Each round starts with a different tool: no tool always runs
        // first or after the same neighbour.
        for k in 0..n {
            let i = (round + k) % n;
            let tool = Tool::ALL[i];
            let running = start(tool, dir, &agent, &hooks)
                .with_context(|| format!("starting {}", tool.name()))?;
            // What the previous tool's exit left running (RCU callbacks of
            // detached programs, freed pages) settles first, for every
            // tool alike: without this, "nothing" right after a tool's
            // stop measured slower than the tools themselves.
            std::thread::sleep(SETTLE);
            // The best of a few runs: noise only ever adds time.
            let u = best(UNTAR_RUNS, || untar_rm(dir));
            let p = best(PAIR_RUNS, || open_close(dir));
            stop(running).with_context(|| format!("stopping {}", tool.name()))?;
            let (u, p) = (u?, p?);
            eprintln!(
                "bench:   round {round}: {:<32} untar+rm {:>7.1} ms, open+close {:>6.0} ns",
                tool.name(),
                u * 1e3,
                p
            );
            untar[i].push(u);
            pairs[i].push(p);
        }
    }

    println!();
    println!(
        "Driftwatch vs peers on unwatched work on a tmpfs ({rounds} alternating rounds, best of {UNTAR_RUNS} untars and {PAIR_RUNS} open+close runs each, {} CPUs; ratio to nothing running, median of rounds, per-round range)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| tool | untar+rm of {} files | open(O_WRONLY\\|O_CREAT)+close |",
        TREE.0 * TREE.1
    );
    println!("| --- | --- | --- |");
    let ratio = |v: &[Vec<f64>], i: usize| {
        let base = &v[0];
        let per: Vec<f64> = v[i].iter().zip(base).map(|(x, b)| x / b).collect();
        let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per.iter().copied().fold(0.0, f64::max);
        (median(&v[i]) / median(base), lo, hi)
    };
    for (i, tool) in Tool::ALL.iter().enumerate() {
        if *tool == Tool::Nothing {
            println!(
                "| nothing | {:.1} ms | {:.0} ns |",
                median(&untar[0]) * 1e3,
                median(&pairs[0])
            );
            continue;
        }
        let (u, ulo, uhi) = ratio(&untar, i);
        let (p, plo, phi) = ratio(&pairs, i);
        println!(
            "| {} | {u:.3}× ({ulo:.2}–{uhi:.2}) | {p:.3}× ({plo:.2}–{phi:.2}) |",
            tool.name()
        );
    }
    println!("targets for driftwatch: untar+rm <= 1.02x, open+close <= 1.10x");
    Ok(())
}
