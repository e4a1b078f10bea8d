//! `driftwatch-agent`: the node agent's command line and event loop.

use driftwatch_proto::ops::{init_logging, LogFormat};
use std::{
    collections::BTreeMap,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use driftwatch_agent::digest::{Batch, Digester, Reason, Report};
use driftwatch_agent::stream::{self, Downlink, Spool};
use driftwatch_agent::{
    clock::Clock,
    event::{Event, KindCounters},
    guard,
    identity::ProcessTable,
    policy::{self, Policy, PolicyError},
    sensors::{
        decode::{kind_name, Decoded, Decoder},
        preflight, Sensors, WatchSet, SENSOR_SET,
    },
};
use driftwatch_agent::{secrets::MaskKey, structure::Content};
use driftwatch_proto::{client::ClientTls, v1::NodeInfo};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

/// Driftwatch node agent: kernel evidence of who changed watched files and
/// who connected to watched ports.
///
/// Loads eBPF sensors for exec, file changes and connects, filters them in
/// the kernel against the policy's paths and ports, attributes every event
/// to a process identity (user, login user behind sudo, binary, container,
/// pod) and prints one JSON object per event.
///
/// After every completed change to a watched file (close after write,
/// rename into place, truncate, chmod, chown, unlink) the agent reads the
/// file's state (sha256, size, mode, owner) in the background and reports
/// it as a `digest` event; it does the same for everything watched when a
/// policy is applied.
///
/// With --collector, the collector's policy replaces the local file as soon
/// as it arrives (and is kept in the spool directory for the next start).
///
/// Signals: SIGINT/SIGTERM send what is spooled to the collector (waiting up
/// to 3 s for its acks; the rest is sent at the next start), end the stream,
/// detach and exit; SIGHUP re-reads the local policy
/// file and updates the kernel's watch maps in place (a bad policy is
/// refused and the running one stays); SIGUSR1 prints the counters.
#[derive(Debug, Parser)]
#[command(name = "driftwatch-agent", version)]
struct Args {
    /// Policy file (YAML, `apiVersion: driftwatch.dev/v1`); its resources'
    /// `paths` and `ports` are what the kernel watches. Optional with
    /// --collector, which sends its own.
    #[arg(long, env = "DRIFTWATCH_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,

    /// Print one JSON object per event on standard output.
    #[arg(long)]
    stdout: bool,

    /// Stream events to the collector at this URL: `https://host:7070`
    /// (TLS; with --ca, and --cert/--key naming this node) or
    /// `http://host:7070` (plaintext, logged as a warning). Events are
    /// spooled on disk first and kept until the collector has stored them;
    /// while it is unreachable the agent keeps collecting. Several URLs,
    /// comma-separated, name replicas over one store: the agent streams to
    /// one and moves to the next when it fails.
    #[arg(long, env = "DRIFTWATCH_COLLECTOR", value_name = "URL")]
    collector: Option<String>,

    /// CA certificate (PEM) that signed the collector's certificate.
    #[arg(long, env = "DRIFTWATCH_CA", value_name = "FILE")]
    ca: Option<PathBuf>,

    /// This agent's client certificate (PEM, URI SAN
    /// `urn:driftwatch:node:NODE`); re-read at every (re)connection, so a
    /// rotated certificate is used without a restart.
    #[arg(long, env = "DRIFTWATCH_CERT", value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// The private key of --cert (PEM).
    #[arg(long, env = "DRIFTWATCH_KEY", value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Directory of the spool (with --collector).
    #[arg(
        long,
        env = "DRIFTWATCH_SPOOL_DIR",
        default_value = "/var/lib/driftwatch/spool"
    )]
    spool_dir: PathBuf,

    /// Key that salts the hashes shown in place of secrets in config
    /// diffs (32 bytes, or 64 hex digits). Give every node the same key (a
    /// Kubernetes Secret) to compare masked values across hosts; without
    /// it each node makes its own, kept as `mask.key` in --spool-dir with
    /// --collector, or for the run only with --stdout alone.
    #[arg(long, env = "DRIFTWATCH_MASK_KEY_FILE", value_name = "FILE")]
    mask_key_file: Option<PathBuf>,

    /// Most events the spool keeps for an unreachable collector; beyond it
    /// the oldest go, and the collector is told exactly which.
    #[arg(long, default_value_t = 2_000_000)]
    spool_max_events: usize,

    /// Seconds between heartbeats to the collector.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    heartbeat_interval: u64,

    /// Pod metadata from the Kubernetes API: `auto` watches this node's
    /// pods when running in a cluster (the service account's credentials,
    /// or KUBECONFIG), `off` never does.
    #[arg(long, env = "DRIFTWATCH_KUBERNETES", default_value = "auto", value_parser = ["auto", "off"])]
    kubernetes: String,

    /// The Kubernetes API's URL, instead of finding it (a `kubectl proxy`,
    /// or a test's stand-in server).
    #[arg(long, env = "DRIFTWATCH_KUBE_API", value_name = "URL")]
    kube_api: Option<String>,

    /// Node name put on every event [default: the host name].
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,

    /// Size of the kernel's event ring buffer, in MiB (a power of two).
    #[arg(long, default_value_t = 16, value_parser = parse_ring_mib)]
    ring_mib: u32,

    /// Seconds between checks for records lost in the kernel (reported as
    /// `loss` events).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    loss_interval: u64,

    /// Also write the counters, delivery figures (sent, acknowledged,
    /// kernel-to-durable latency) and spool state, as JSON, to this file at
    /// exit and on SIGUSR1.
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,

    /// Log filter for standard error (`info`, `debug`, `driftwatch_agent=trace`, …).
    #[arg(long, env = "DRIFTWATCH_LOG", default_value = "info")]
    log: String,

    /// Log lines as `text` (coloured only on a terminal) or `json` (one
    /// object per line, for a cluster's log collector).
    #[arg(long, env = "DRIFTWATCH_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Serve `/metrics` (Prometheus, OpenMetrics text), `/healthz` and
    /// `/readyz` (ready once the sensors are attached) on this address.
    #[arg(long, env = "DRIFTWATCH_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn parse_ring_mib(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v == 0 || !v.is_power_of_two() || v > 1024 {
        return Err(format!("{v} is not a power of two between 1 and 1024"));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = init_logging(&args.log, args.log_format) {
        eprintln!("driftwatch-agent: error: {e}");
        return ExitCode::from(2);
    }
    // aya-log forwards kernel-side log records through the `log` crate.
    let _ = tracing_log::LogTracer::init();

    if args.policy.is_none() && args.collector.is_none() {
        eprintln!(
            "driftwatch-agent: error: no policy; pass --policy FILE, or --collector URL to receive the collector's"
        );
        return ExitCode::from(2);
    }
    if !args.stdout && args.collector.is_none() {
        eprintln!(
            "driftwatch-agent: error: nothing to send events to; pass --stdout to print them as JSON lines, \
             and/or --collector URL to stream them"
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("driftwatch-agent: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driftwatch-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Longest an event waits in the ring buffer when few are arriving.
const DRAIN_MS: u64 = 20;
/// How long after a reported `munmap` a mapped file is read once more:
/// past the kernel's window of 100 ms in which further `munmap`s of the
/// process go unreported.
const MUNMAP_AFTER: Duration = Duration::from_millis(150);

/// Most ring records read in one turn of the event loop.
const DRAIN_SLICE: usize = 1024;

/// Most ring records read before a digest is reported (what waits in a
/// 16 MiB ring), to keep digests behind the events that caused them.
const CAUSAL_DRAIN: usize = 1 << 17;

/// How long after SIGINT/SIGTERM the agent may go on reading the ring.
const STOP_READING: Duration = Duration::from_millis(2500);

/// How long after SIGINT/SIGTERM the sender may go on delivering.
const STOP_DELIVERY: Duration = Duration::from_secs(3);

/// What `--stats-file` holds (at exit, and on SIGUSR1).
#[derive(serde::Serialize)]
struct StatsFile<'a> {
    /// Counters by event kind.
    counters: &'a BTreeMap<String, KindCounters>,
    /// What the sender delivered (with --collector).
    delivery: Option<stream::DeliveryReport>,
    /// Events the spool evicted because it was full.
    spool_evicted: u64,
    /// Ring records a stopping agent had no time left to read (lost).
    unread_at_stop: u64,
    /// Events in the spool not yet acknowledged (at exit: left for the
    /// next start).
    spool_waiting: u64,
    /// The highest sequence number handed out.
    spool_last_seq: u64,
    /// From the stop signal to these figures, milliseconds (at exit).
    stop_ms: Option<u64>,
}

fn write_stats_file(
    path: &Path,
    stats: &Event,
    out: &Output,
    delivery: &stream::Delivery,
    stopping: Option<std::time::Instant>,
    unread_at_stop: u64,
) -> anyhow::Result<()> {
    let Event::Stats { counters, .. } = stats else {
        return Ok(());
    };
    let spool = out.spool.as_ref().map(|(s, _)| s);
    let report = StatsFile {
        counters,
        delivery: spool.map(|_| delivery.report()),
        spool_evicted: spool.map_or(0, Spool::evicted),
        unread_at_stop,
        spool_waiting: spool.map_or(0, |s| s.len() as u64),
        spool_last_seq: spool.map_or(0, Spool::last_seq),
        stop_ms: stopping.map(|t| t.elapsed().as_millis() as u64),
    };
    let text = serde_json::to_string_pretty(&report)?;
    // Whole or not at all, for whoever reads it meanwhile.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Reads at most `max` records waiting in the ring; returns how many it
/// read and whether the ring ran dry.
fn read_ring(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    max: usize,
    mut f: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(usize, bool)> {
    for n in 0..max {
        let Some(item) = ring.next() else {
            return Ok((n, true));
        };
        f(&item)?;
    }
    Ok((max, false))
}

/// Reads the records waiting in the ring until `until`; returns how many
/// were left unread then (counted, not decoded: a stopping agent that fell
/// far behind would otherwise take as long to stop as it is behind).
fn drain_ring(
    ring: &mut AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    until: std::time::Instant,
    mut f: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut n = 0u64;
    let mut late = false;
    let mut unread = 0;
    while let Some(item) = ring.get_mut().next() {
        if late {
            unread += 1;
            continue;
        }
        f(&item)?;
        n += 1;
        late = n.is_multiple_of(1024) && std::time::Instant::now() >= until;
    }
    Ok(unread)
}

/// Joins a thread, giving up after `limit`.
fn wait_thread(t: std::thread::JoinHandle<()>, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while !t.is_finished() {
        if std::time::Instant::now() >= until {
            tracing::warn!("the collector did not answer in time; unsent events stay in the spool");
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().is_ok()
}

/// Counters kept in user space, by kind.
#[derive(Default)]
struct UserCounts {
    received: BTreeMap<&'static str, u64>,
    filtered_user: BTreeMap<&'static str, u64>,
    malformed: u64,
    /// Guardrail decisions by kind of event and verdict.
    guardrail: BTreeMap<(&'static str, &'static str), u64>,
    /// A mount or unmount happened somewhere since the aliases of the
    /// watched trees were last looked for.
    mounts_changed: bool,
    /// Watched files each process maps shared and writable: read again
    /// when it exits or execs (either drops every mapping).
    mapped: BTreeMap<u32, std::collections::BTreeSet<String>>,
    /// Mapped files to read once more, and when: the kernel reports a
    /// process's `munmap`s at most once per [`MUNMAP_AFTER`], so the last
    /// one of a burst may go unreported while the process runs on.
    after_munmap: std::collections::VecDeque<(std::time::Instant, String)>,
}

struct Output {
    out: Option<BufWriter<std::io::Stdout>>,
    node: driftwatch_agent::event::Node,
    spool: Option<(Spool, std::sync::Arc<tokio::sync::Notify>)>,
    /// Encodes events for the spool.
    wire: stream::convert::Encoder,
    /// Where an event is encoded first.
    scratch: Vec<u8>,
    /// Events were spooled since the sender was last woken.
    pushed: bool,
    /// The sender has nothing waiting (see `stream::Sender::idle`).
    sender_idle: Arc<std::sync::atomic::AtomicBool>,
}

impl Output {
    /// Writes and spools an event; returns its sequence number when spooled.
    /// The event is taken: its strings move into the wire message.
    fn emit(&mut self, event: Event) -> anyhow::Result<Option<u64>> {
        let mut seq = None;
        if let Some(out) = self.out.as_mut() {
            serde_json::to_writer(&mut *out, &event).context("writing an event to stdout")?;
            out.write_all(b"\n").context("writing an event to stdout")?;
        }
        if let Some((spool, _)) = &self.spool {
            let time = event.time().unix_nanos();
            self.scratch.clear();
            if self.wire.encode(event, 0, &mut self.scratch) {
                // Sized to the event and the sequence number's field (key
                // and a varint below 2^63): kept in the spool's memory
                // as it is, never grown.
                let mut body = Vec::with_capacity(self.scratch.len() + 11);
                body.extend_from_slice(&self.scratch);
                // A failing spool must not stop the sensors: the hole it
                // leaves is reported to the collector as a dropped range.
                match spool.push_encoded(time, body) {
                    Ok(s) => seq = Some(s),
                    Err(err) => tracing::error!("spooling an event failed: {err}"),
                }
                self.pushed = true;
            }
        }
        Ok(seq)
    }

    /// Ends a run of events: stdout is flushed, spooled records are
    /// written to the spool's file (and fsync'd every 100 ms).
    fn flush(&mut self) -> anyhow::Result<()> {
        if let Some((spool, notify)) = &self.spool {
            if let Err(err) = spool.commit() {
                tracing::error!("writing the spool failed: {err}");
            }
            // One wake-up of the sender per run of events, not per event:
            // it then reads them as one batch.
            if std::mem::take(&mut self.pushed)
                && self.sender_idle.load(std::sync::atomic::Ordering::SeqCst)
            {
                notify.notify_one();
            }
        }
        match self.out.as_mut() {
            Some(out) => out.flush().context("flushing stdout"),
            None => Ok(()),
        }
    }
}

fn stats(sensors: &Sensors, user: &UserCounts, node: &str) -> anyhow::Result<Event> {
    let mut counters = sensors.counters()?;
    for (kind, c) in counters.iter_mut() {
        c.received = user.received.get(kind.as_str()).copied().unwrap_or(0);
        c.filtered_user = user.filtered_user.get(kind.as_str()).copied().unwrap_or(0);
    }
    Ok(Event::Stats {
        time: Clock::now(),
        node: node.into(),
        counters,
    })
}

/// Reads the policy file again and applies it; a bad one is refused and
/// the running policy stays.
fn reread_policy(
    path: &Path,
    sensors: &mut Sensors,
    out: &mut Output,
    digester: &Digester,
    running: &mut Running,
    only_if_changed: bool,
) -> anyhow::Result<()> {
    match from_file(path) {
        Ok(next) if only_if_changed && next.version == running.version => Ok(()),
        Ok(next) => apply_policy(sensors, out, digester, next, running),
        Err(e) => {
            tracing::error!("policy refused, the running policy stays in force: {e}");
            Ok(())
        }
    }
}

fn update_metrics(
    metrics: &driftwatch_agent::metrics::Metrics,
    sensors: &Sensors,
    user: &UserCounts,
    out: &Output,
    delivery: &stream::Delivery,
) -> anyhow::Result<()> {
    let Event::Stats { counters, .. } = stats(sensors, user, &out.node)? else {
        return Ok(());
    };
    let spool = out
        .spool
        .as_ref()
        .map(|(s, _)| driftwatch_agent::metrics::SpoolState {
            waiting: s.len() as u64,
            evicted: s.evicted(),
            last_seq: s.last_seq(),
        });
    let streaming = out
        .spool
        .as_ref()
        .map(|_| (delivery.report(), delivery.connected()));
    metrics.update(&counters, user.malformed, spool, streaming);
    metrics.guardrails(&user.guardrail);
    Ok(())
}

fn node_name(arg: Option<String>) -> String {
    arg.or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
    })
    .unwrap_or_else(|| "unknown".into())
}

/// The collector URLs of `--collector` (comma-separated replicas).
fn collector_urls(args: &Args) -> Vec<String> {
    args.collector
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A collector URL and TLS files the transport accepts, checked before
/// anything is loaded.
fn check_collector_url(url: &str, tls: &ClientTls) -> anyhow::Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        anyhow::bail!("collector URL {url:?} must start with https:// (TLS) or http:// (plaintext), e.g. https://collector:7070");
    }
    let (_, plaintext) =
        driftwatch_proto::client::endpoint(url, tls).map_err(|e| anyhow::anyhow!("{e}"))?;
    if plaintext {
        tracing::warn!(%url, "streaming in plaintext: events and the node's identity travel in clear and unauthenticated; use https:// with --ca, --cert and --key");
    }
    Ok(())
}

/// The policy in force.
struct Running {
    policy: Arc<Policy>,
    version: String,
    source: String,
    /// Sent by the collector (then SIGHUP does not re-read the local file).
    from_collector: bool,
}

/// Where the last policy from the collector is kept for the next start.
fn saved_policy_path(spool_dir: &Path) -> PathBuf {
    spool_dir.join("policy.yaml")
}

/// A local policy file, read and validated.
fn from_file(path: &Path) -> Result<Running, PolicyError> {
    let (policy, text) = Policy::read(path)?;
    Ok(Running {
        policy: Arc::new(policy),
        version: policy::version(&text),
        source: path.display().to_string(),
        from_collector: false,
    })
}

/// The policy to start with: the local file, else the collector's last one.
fn initial_policy(args: &Args) -> anyhow::Result<Running> {
    if let Some(path) = &args.policy {
        return Ok(from_file(path)?);
    }
    let saved = saved_policy_path(&args.spool_dir);
    if let Ok(text) = std::fs::read_to_string(&saved) {
        match Policy::parse(&saved.display().to_string(), &text) {
            Ok(p) => {
                tracing::info!(file = %saved.display(), "starting with the collector's last policy");
                return Ok(Running {
                    policy: Arc::new(p),
                    version: policy::version(&text),
                    source: "collector".into(),
                    from_collector: true,
                });
            }
            Err(e) => tracing::warn!("ignoring the saved policy: {e}"),
        }
    }
    tracing::info!("no policy yet; watching nothing until the collector sends one");
    Ok(Running {
        policy: Arc::new(Policy {
            api_version: policy::API_VERSION.into(),
            kind: "Policy".into(),
            resources: Vec::new(),
        }),
        version: String::new(),
        source: "none".into(),
        from_collector: false,
    })
}

/// The resource `path` belongs to, and what is summarised of its content.
fn resource_and_content(policy: &Policy, path: &str) -> (Option<String>, Content) {
    let r = policy.resource_for_path(path);
    (
        r.map(|r| r.name.clone()),
        Content::of(r.map(|r| r.kind), path),
    )
}

/// The key secrets in config diffs are salted with: `--mask-key-file`,
/// else this node's own in the spool directory (made on first start),
/// else one for this run.
fn mask_key(args: &Args) -> anyhow::Result<MaskKey> {
    if let Some(path) = &args.mask_key_file {
        return MaskKey::load(path, false);
    }
    if args.collector.is_some() {
        std::fs::create_dir_all(&args.spool_dir).with_context(|| {
            format!("creating the spool directory {}", args.spool_dir.display())
        })?;
        return MaskKey::load(&args.spool_dir.join("mask.key"), true);
    }
    tracing::info!(
        "no --mask-key-file: secrets in config diffs are hashed with a key made for this run"
    );
    Ok(MaskKey::ephemeral())
}

/// Digests everything a policy watches (reason `watch`).
fn scan_watched(digester: &Digester, policy: &Arc<Policy>) {
    for r in &policy.resources {
        for p in &r.paths {
            let policy = policy.clone();
            digester.scan(p.clone(), Reason::Watch, None, move |path| {
                resource_and_content(&policy, path)
            });
        }
    }
}

/// The report of `running` now in the kernel's maps.
fn policy_applied(sensors: &Sensors, node: &str, running: &Running) -> Event {
    Event::PolicyApplied {
        time: Clock::now(),
        node: node.into(),
        version: running.version.clone(),
        source: running.source.clone(),
        watched_paths: sensors.watch().display_paths(),
        watched_ports: sensors.watch().ports.keys().copied().collect(),
    }
}

/// The watched set of `policy`, with the other paths mounts on this node
/// show its trees at.
fn watch_set(policy: &Policy) -> WatchSet {
    let set = WatchSet::from_policy(policy);
    let aliases = driftwatch_agent::sensors::aliases::find(&set.alias_roots());
    with_aliases(set, aliases)
}

/// `set` with `aliases` and the watched files that have other names.
fn with_aliases(set: WatchSet, aliases: Vec<(String, String)>) -> WatchSet {
    for (alias, shows) in &aliases {
        tracing::info!(
            alias,
            shows,
            "a mount shows a watched path elsewhere; watched there too"
        );
    }
    set.with_aliases(aliases).with_linked()
}

/// Applies a policy to the kernel's maps and reports it.
fn apply_policy(
    sensors: &mut Sensors,
    out: &mut Output,
    digester: &Digester,
    next: Running,
    running: &mut Running,
) -> anyhow::Result<()> {
    let time = Clock::now();
    if let Err(e) = sensors.apply(watch_set(&next.policy)) {
        tracing::error!(
            "policy {} could not be applied, the running policy stays in force: {e:#}",
            next.version
        );
        out.emit(Event::PolicyRefused {
            time,
            node: out.node.clone(),
            version: next.version,
            source: next.source,
            error: format!("{e:#}"),
        })?;
        return out.flush();
    }
    tracing::info!(version = %next.version, source = %next.source, "policy applied; watch maps updated in place");
    let user = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
    let host = driftwatch_proto::policy::HostFacts {
        user_exists: &|name| user(name).is_some(),
        uid_of: &|name| user(name).map(|u| u.uid.as_raw()),
        exe_exists: &|path| Path::new(path).exists(),
        kubernetes: driftwatch_agent::pods::api_configured(),
    };
    for w in next.policy.warnings(&host) {
        tracing::warn!(source = %next.source, "{w}");
    }
    out.emit(policy_applied(sensors, &out.node, &next))?;
    out.flush()?;
    scan_watched(digester, &next.policy);
    *running = next;
    Ok(())
}

/// Compiles the guardrails of the running policy and the grants in force,
/// and writes what changed into the kernel. A failure leaves the tables
/// as they were and is logged; the agent goes on reporting.
fn refresh_gates(
    sensors: &mut Sensors,
    policy: &Policy,
    grants: &mut Vec<guard::Grant>,
    cgroup_root: &Path,
    pods: &driftwatch_agent::pods::Pods,
) {
    let now = driftwatch_proto::time::now_unix_nanos();
    grants.retain(|g| {
        let open = g.until_unix_nanos > now;
        if !open {
            tracing::info!(grant = g.id, resource = %g.resource, who = %g.who.to_text(), "access grant expired; its gate is closed");
        }
        open
    });
    let host = guard::LiveHost { cgroup_root, pods };
    let next = guard::Gates::compile(policy, grants, &host, now, Clock::boot_ns());
    if &next == sensors.gates() {
        return;
    }
    let (rules, facts) = (next.rules.len(), next.facts.len());
    let guarded: Vec<String> = next
        .rules
        .iter()
        .filter_map(|(i, r)| {
            let name = policy.resources.get(*i as usize)?.name.as_str();
            let mode = if r.mode == agent_common::GATE_ENFORCE {
                "enforce"
            } else {
                "audit"
            };
            Some(format!("{name}={mode}"))
        })
        .collect();
    let changed_rules = next.rules.keys().ne(sensors.gates().rules.keys())
        || next
            .rules
            .values()
            .map(|r| r.mode)
            .ne(sensors.gates().rules.values().map(|r| r.mode));
    match sensors.apply_gates(next) {
        Ok(()) if changed_rules => {
            tracing::info!(rules, facts, guarded = ?guarded, "guardrails in force")
        }
        Ok(()) => tracing::debug!(rules, facts, "guardrail tables updated"),
        Err(e) => tracing::error!("the guardrail tables could not be updated: {e:#}"),
    }
}

/// Digests to take after a change event: the file(s) it names, and when a
/// directory or symlink moved (or a mount changed what a path shows),
/// what is now reachable through it under watched names.
fn digest_jobs(e: &Event, policy: &Policy, batch: &mut Batch) {
    let Event::File {
        op,
        path,
        new_path,
        result,
        flags,
        path_truncated,
        ..
    } = e
    else {
        return;
    };
    if !result.ok || !driftwatch_proto::completes_change(op) {
        return;
    }
    if *path_truncated {
        // A cut path names another file, or none: its digest would be a
        // false state (a deletion, most often). The event says it was cut.
        tracing::warn!(
            path,
            "a change on a path too long to report whole is not digested"
        );
        return;
    }
    let (first, second) = match *op {
        "rename" => (Some(path.as_str()), new_path.as_deref()),
        "link" | "symlink" => (new_path.as_deref(), None),
        _ => (Some(path.as_str()), None),
    };
    let content_may_change = !matches!(
        *op,
        "chmod" | "chown" | "setxattr" | "removexattr" | "utimes" | "setflags"
    );
    for p in [first, second].into_iter().flatten() {
        add_watched(batch, policy, p, content_may_change);
    }
    match *op {
        "rename" => {
            // An exchange moved something to both names.
            let exchanged = flags.as_slice().contains(&"RENAME_EXCHANGE");
            let moved = [new_path.as_deref(), exchanged.then_some(path.as_str())];
            for p in moved.into_iter().flatten() {
                reach(p, policy, batch);
            }
        }
        "mount" | "umount" => {
            // A mount above watched trees changes what each shows.
            let dir = format!("{}/", path.trim_end_matches('/'));
            let mut below = policy
                .resources
                .iter()
                .flat_map(|r| &r.paths)
                .filter(|p| p.starts_with(&dir))
                .peekable();
            if below.peek().is_none() {
                reach(path, policy, batch);
            }
            for root in below {
                reach(root.trim_end_matches('/'), policy, batch);
            }
        }
        _ => {}
    }
}

/// Adds a digest of `path` to `batch` when the policy watches it; true when
/// it does.
fn add_watched(batch: &mut Batch, policy: &Policy, path: &str, content_may_change: bool) -> bool {
    let Some(r) = policy.resource_for_path(path) else {
        return false;
    };
    batch.add(path, &r.name, r.kind, content_may_change);
    true
}

/// Files digested at most on the event path after one move or mount; the
/// rest are digested at their next change (said in the log).
const REACH_MAX: usize = 1024;

/// After `moved` (a directory or symlink) was renamed into place or had a
/// mount put over it: digests the watched files under it, and the watched
/// symlinks beside it, whose targets may now resolve through it (as a
/// Kubernetes ConfigMap's `app.yaml -> ..data/app.yaml` after kubelet
/// renames a new `..data` into place).
fn reach(moved: &str, policy: &Policy, batch: &mut Batch) {
    let Ok(meta) = std::fs::symlink_metadata(moved) else {
        return;
    };
    if !meta.is_dir() && !meta.file_type().is_symlink() {
        return;
    }
    let mut added = 0usize;
    let mut add = |p: &str, batch: &mut Batch| {
        added += usize::from(add_watched(batch, policy, p, true));
    };
    if meta.is_dir() {
        let (_, _, cut) = driftwatch_agent::digest::walk_bounded(moved, REACH_MAX, &mut |p| {
            add(p, batch);
            true
        });
        if let Some(why) = cut {
            tracing::warn!(
                path = moved,
                "a directory moved into a watched tree: {why}; the rest are digested at their next change"
            );
        }
    }
    let parent = std::path::Path::new(moved).parent();
    if let Some(Ok(entries)) = parent.map(std::fs::read_dir) {
        for e in entries.filter_map(Result::ok).take(REACH_MAX) {
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                if let Some(p) = e.path().to_str() {
                    add(p, batch);
                }
            }
        }
    }
    tracing::debug!(
        path = moved,
        digests = added,
        "what a move or mount reaches"
    );
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Handled from the start: a SIGHUP or SIGTERM that comes while the
    // programs load (as soon as `agent_start` is printed, say) is taken
    // when the event loop starts, instead of killing the agent with the
    // default action.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    for url in collector_urls(&args) {
        check_collector_url(
            &url,
            &ClientTls {
                ca: args.ca.clone(),
                cert: args.cert.clone(),
                key: args.key.clone(),
            },
        )?;
    }
    // The policy file's stamp is taken before the file is read: a change
    // after that (even one made while the programs load, before the event
    // loop looks) differs from it and is read at the next second.
    let policy_files: Vec<PathBuf> = args.policy.iter().cloned().collect();
    let mut policy_seen = driftwatch_proto::ops::stamp(&policy_files);
    let mut running = initial_policy(&args)?;
    // Up before the sensors, so a probe sees "alive, not ready" meanwhile.
    let ready = driftwatch_proto::ops::Ready::default();
    let metrics = Arc::new(driftwatch_agent::metrics::Metrics::default());
    if let Some(addr) = args.metrics_listen {
        let registry = Arc::new(metrics.registry());
        let bound =
            driftwatch_proto::ops::serve_metrics(addr, registry, Arc::new(|| {}), ready.clone())
                .map_err(anyhow::Error::msg)?;
        tracing::info!(addr = %bound, "metrics at /metrics, health at /healthz and /readyz");
    }
    let cgroup_root = preflight::prepare()?;
    let mut sensors = Sensors::start(&cgroup_root, args.ring_mib << 20)?;
    let node = node_name(args.node_name.clone());
    // The name every event carries, one string shared by all of them.
    let event_node: driftwatch_agent::event::Node = node.as_str().into();
    tracing::info!(
        sensor_set = SENSOR_SET,
        hooks = sensors.hooks.len(),
        probes = ?sensors.probes,
        "sensors attached; selected sensor set {SENSOR_SET}"
    );
    // Loading the programs and relocating them takes tens of MiB of heap
    // for a moment; glibc keeps it unless told to give it back (measured:
    // 81 MiB resident at idle without this, 47 MiB with it).
    #[cfg(target_env = "gnu")]
    // SAFETY: a plain libc call; it only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    sensors.apply(watch_set(&running.policy))?;
    // Write handles open since before the start are followed like those
    // the agent sees opened.
    let handles = driftwatch_agent::sensors::handles::find(sensors.watch());
    for (pid, fd, path) in &handles.write_fds {
        tracing::info!(
            pid,
            fd,
            path,
            "a watched file was open for write before the start; followed"
        );
    }
    let holders: std::collections::BTreeSet<u32> =
        handles.write_fds.iter().map(|(pid, _, _)| *pid).collect();
    for pid in holders {
        if let Err(e) = sensors.hold_by_path(pid) {
            tracing::warn!(pid, "cannot follow write fds open before the start: {e}");
        }
    }
    for (pid, paths) in &handles.mapped {
        tracing::info!(pid, ?paths, "watched files mapped shared and writable before the start; read again when the process exits");
    }

    let clock = Clock::new();
    let mut table = ProcessTable::new(Some(cgroup_root.clone()), clock);
    let seeded = table.seed();
    tracing::info!(processes = seeded, "process table seeded from /proc");
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    let kube_source = match (&args.kube_api, args.kubernetes.as_str()) {
        (_, "off") => None,
        (Some(url), _) => Some(driftwatch_agent::pods::Source::Url(url.clone())),
        (None, _) if in_cluster => Some(driftwatch_agent::pods::Source::Infer),
        (None, _) => {
            tracing::info!("not in a Kubernetes cluster (no KUBERNETES_SERVICE_HOST, KUBECONFIG or --kube-api): events carry no pod metadata");
            None
        }
    };
    if let Some(source) = kube_source {
        tokio::spawn(driftwatch_agent::pods::watch(
            table.pods.clone(),
            node.clone(),
            source,
        ));
    }
    let mut decoder = Decoder::new(event_node.clone(), clock, table);
    let mut grants: Vec<guard::Grant> = Vec::new();
    refresh_gates(
        &mut sensors,
        &running.policy,
        &mut grants,
        &cgroup_root,
        &decoder.table.pods,
    );
    tracing::info!(
        guardrails = guard::GUARD_SET,
        "guardrails: {}",
        guard::GUARD_SET
    );
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let (downlink_tx, mut downlink) = tokio::sync::mpsc::unbounded_channel();
    let (stop_sender, stop) = tokio::sync::watch::channel(None);
    let delivery = Arc::new(stream::Delivery::default());
    let sender_idle = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut sending = None;
    let spool = match collector_urls(&args).first() {
        Some(url) => {
            std::fs::create_dir_all(&args.spool_dir).with_context(|| {
                format!("creating the spool directory {}", args.spool_dir.display())
            })?;
            let spool = Spool::open(&args.spool_dir, args.spool_max_events)
                .with_context(|| format!("opening the spool in {}", args.spool_dir.display()))?;
            let notify = std::sync::Arc::new(tokio::sync::Notify::new());
            let sender = stream::Sender {
                urls: collector_urls(&args),
                current: 0,
                tls: ClientTls {
                    ca: args.ca.clone(),
                    cert: args.cert.clone(),
                    key: args.key.clone(),
                },
                spool: spool.clone(),
                notify: notify.clone(),
                node: NodeInfo {
                    name: node.clone(),
                    kernel: kernel.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_default(),
                    sensor_set: SENSOR_SET.into(),
                    probes: sensors.probes.clone().into_iter().collect(),
                    guardrails: guard::GUARD_SET.into(),
                },
                started: driftwatch_proto::time::now_unix_nanos(),
                heartbeat: Duration::from_secs(args.heartbeat_interval),
                downlink: downlink_tx,
                stop,
                stats: delivery.clone(),
                idle: sender_idle.clone(),
            };
            tracing::info!(%url, spooled = spool.len(), dir = %args.spool_dir.display(), "streaming to the collector");
            // The sender has a thread and an event loop of its own, so that
            // reading the kernel's ring never waits for the network, nor
            // delivery for a burst of decoding.
            let thread = std::thread::Builder::new()
                .name("sender".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(sender.run()),
                        Err(e) => tracing::error!("starting the sender's runtime: {e}"),
                    }
                })
                .context("starting the sender thread")?;
            sending = Some(thread);
            Some((spool, notify))
        }
        None => {
            drop(downlink_tx);
            None
        }
    };
    let mut out = Output {
        out: args
            .stdout
            .then(|| BufWriter::with_capacity(1 << 16, std::io::stdout())),
        node: event_node.clone(),
        spool,
        wire: Default::default(),
        scratch: Vec::with_capacity(4096),
        pushed: false,
        sender_idle,
    };
    out.emit(Event::AgentStart {
        time: Clock::now(),
        node: event_node.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        kernel,
        sensor_set: SENSOR_SET.into(),
        probes: sensors.probes.clone(),
        hooks: sensors.hooks.clone(),
        watched_paths: sensors.watch().display_paths(),
        watched_ports: sensors.watch().ports.keys().copied().collect(),
    })?;
    if !running.version.is_empty() {
        out.emit(policy_applied(&sensors, &node, &running))?;
    }
    out.flush()?;
    let mask = mask_key(&args)?;
    tracing::info!(id = mask.id(), source = ?mask.source, "mask key for secrets in config diffs");
    let (digester, mut reports) = Digester::start(Arc::new(mask));
    scan_watched(&digester, &running.policy);

    let ring = sensors.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // until the AsyncFd is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| {
            anyhow::anyhow!(
                "registering the ring buffer with the event loop: {}",
                e.into_parts().1
            )
        })?;
    let mut tick = tokio::time::interval(Duration::from_secs(args.loss_interval));
    // The kernel wakes us only when 64 KiB are waiting; this bounds the
    // delay of a lone event.
    let mut drain = tokio::time::interval(Duration::from_millis(DRAIN_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut user = UserCounts {
        mapped: handles.mapped,
        ..UserCounts::default()
    };
    // Each second: metrics taken in (when served), the policy file looked at.
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ready.set(true);
    let mut reported_drops: BTreeMap<String, u64> = BTreeMap::new();
    let mut digests = Batch::default();

    let handle = |bytes: &[u8],
                  decoder: &mut Decoder,
                  sensors: &Sensors,
                  user: &mut UserCounts,
                  out: &mut Output,
                  digests: &mut Batch,
                  policy: &Policy|
     -> anyhow::Result<()> {
        let kind = match Decoder::kind_of(bytes) {
            Ok(k) => kind_name(k),
            Err(e) => {
                user.malformed += 1;
                tracing::warn!("skipping a malformed kernel record: {e}");
                return Ok(());
            }
        };
        *user.received.entry(kind).or_default() += 1;
        match decoder.decode(bytes, sensors.watch()) {
            Ok(Decoded::Event(e)) => {
                match &*e {
                    Event::File {
                        guardrail: Some(g), ..
                    } => *user.guardrail.entry(("file", g)).or_default() += 1,
                    Event::Connect {
                        guardrail: Some(g), ..
                    } => *user.guardrail.entry(("connect", g)).or_default() += 1,
                    _ => {}
                }
                match &*e {
                    Event::File {
                        op: "mount" | "umount",
                        ..
                    } => user.mounts_changed = true,
                    Event::File {
                        op: "mmap",
                        path,
                        process,
                        ..
                    } => {
                        user.mapped
                            .entry(process.pid)
                            .or_default()
                            .insert(path.clone());
                    }
                    Event::Exit { process, .. } | Event::Exec { process, .. } => {
                        // Its mappings are gone: what they wrote is read.
                        for path in user.mapped.remove(&process.pid).unwrap_or_default() {
                            add_watched(digests, policy, &path, true);
                        }
                    }
                    Event::File {
                        op: "munmap", path, ..
                    } => user
                        .after_munmap
                        .push_back((std::time::Instant::now() + MUNMAP_AFTER, path.clone())),
                    _ => {}
                }
                digest_jobs(&e, policy, digests);
                let seq = out.emit(*e)?;
                digests.triggered(seq);
            }
            Ok(Decoded::Internal) => {}
            Ok(Decoded::Forked { parent, child }) => {
                // The child has the parent's mappings found at start too.
                if let Some(paths) = user.mapped.get(&parent).cloned() {
                    user.mapped.insert(child, paths);
                }
            }
            Ok(Decoded::Mounted) => {
                user.mounts_changed = true;
                *user.filtered_user.entry(kind).or_default() += 1;
            }
            Ok(Decoded::FilteredInUser) => *user.filtered_user.entry(kind).or_default() += 1,
            Err(e) => {
                user.malformed += 1;
                tracing::warn!("skipping a malformed kernel record: {e}");
            }
        }
        Ok(())
    };

    loop {
        tokio::select! {
            // In this order: signals first, then the rare work, and the
            // ring last — under load it is always ready, and would leave
            // signals, policies and digests waiting.
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                match (&args.policy, running.from_collector) {
                    (_, true) => tracing::info!("SIGHUP: the policy comes from the collector; nothing to re-read"),
                    (None, false) => tracing::info!("SIGHUP: no --policy file to re-read"),
                    (Some(path), false) => {
                        reread_policy(path, &mut sensors, &mut out, &digester, &mut running, false)?;
                        policy_seen = driftwatch_proto::ops::stamp(&policy_files);
                    }
                }
            }
            Some(d) = downlink.recv() => match d {
                Downlink::Policy(p) => {
                    if p.version == running.version && running.from_collector {
                        continue;
                    }
                    let source = if p.source.is_empty() { "collector".to_owned() } else { format!("collector:{}", p.source) };
                    match Policy::parse(&source, &p.yaml) {
                        Ok(policy) => {
                            let saved = saved_policy_path(&args.spool_dir);
                            if let Err(e) = std::fs::write(&saved, &p.yaml) {
                                tracing::warn!(file = %saved.display(), "cannot keep the collector's policy for the next start: {e}");
                            }
                            let next = Running { policy: Arc::new(policy), version: policy::version(&p.yaml), source, from_collector: true };
                            apply_policy(&mut sensors, &mut out, &digester, next, &mut running)?;
                        }
                        Err(e) => {
                            tracing::error!("policy from the collector refused, the running policy stays in force: {e}");
                            out.emit(Event::PolicyRefused {
                                time: Clock::now(),
                                node: out.node.clone(),
                                version: p.version,
                                source,
                                error: e.to_string(),
                            })?;
                            out.flush()?;
                        }
                    }
                }
                Downlink::Grants(list) => {
                    let mut next = Vec::new();
                    for g in &list.grants {
                        match guard::Grant::from_wire(g) {
                            Ok(g) => next.push(g),
                            Err(e) => tracing::error!("an access grant from the collector was refused: {e}"),
                        }
                    }
                    for g in next.iter().filter(|g| !grants.iter().any(|o| o.id == g.id)) {
                        tracing::info!(grant = g.id, resource = %g.resource, who = %g.who.to_text(), until = %driftwatch_proto::time::rfc3339(i128::from(g.until_unix_nanos)), "access grant in force; its gate is open until then");
                    }
                    grants = next;
                    refresh_gates(&mut sensors, &running.policy, &mut grants, &cgroup_root, &decoder.table.pods);
                }
                Downlink::Scan(req) => {
                    tracing::info!(scan = %req.scan_id, path = %req.path, "baseline scan requested by the collector");
                    let policy = running.policy.clone();
                    digester.scan(req.path, Reason::Scan, Some(req.scan_id), move |path| {
                        resource_and_content(&policy, path)
                    });
                }
            },
            Some(report) = reports.recv() => {
                // A file's state was read after the kernel events that
                // changed it: those still in the ring go first, so the
                // collector never sees a state before the change behind it
                // (a temporary file read as gone before its rename).
                read_ring(ring.get_mut(), CAUSAL_DRAIN, |item| handle(item, &mut decoder, &sensors, &mut user, &mut out, &mut digests, &running.policy))?;
                digester.submit_batch(&mut digests);
                let time = Clock::now();
                let e = match report {
                    Report::Digest(state) => Event::Digest { time, node: out.node.clone(), state },
                    Report::ScanDone { scan_id, path, files, errors, error } => {
                        Event::ScanDone { time, node: out.node.clone(), scan_id, path, files, errors, error }
                    }
                };
                out.emit(e)?;
                out.flush()?;
            }
            _ = second.tick() => {
                refresh_gates(&mut sensors, &running.policy, &mut grants, &cgroup_root, &decoder.table.pods);
                // Mounts came or went: the watched trees may show elsewhere.
                if std::mem::take(&mut user.mounts_changed) {
                    let aliases = driftwatch_agent::sensors::aliases::find(&sensors.watch().alias_roots());
                    if aliases != sensors.watch().aliases {
                        let next = with_aliases(WatchSet::from_policy(&running.policy), aliases);
                        if let Err(e) = sensors.apply(next) {
                            tracing::error!("the watched set with new aliases could not be applied: {e:#}");
                        }
                    }
                }
                if args.metrics_listen.is_some() {
                    update_metrics(&metrics, &sensors, &user, &out, &delivery)?;
                    match sensors.take_ring_peak() {
                        Ok(peak) => metrics.ring(u64::from(args.ring_mib) << 20, peak),
                        Err(e) => tracing::debug!("reading the ring's peak: {e}"),
                    }
                }
                // The policy file changed on disk (an edit, or a ConfigMap
                // update swapping its `..data` symlink): read it again.
                if let (Some(path), false) = (&args.policy, running.from_collector) {
                    let now = driftwatch_proto::ops::stamp(&policy_files);
                    if now != policy_seen {
                        policy_seen = now;
                        tracing::info!(file = %path.display(), "the policy file changed; reading it again");
                        reread_policy(path, &mut sensors, &mut out, &digester, &mut running, true)?;
                    }
                }
            }
            _ = sigusr1.recv() => {
                let s = stats(&sensors, &user, &out.node)?;
                out.emit(s.clone())?;
                out.flush()?;
                if let Some(path) = &args.stats_file {
                    write_stats_file(path, &s, &out, &delivery, None, 0)?;
                }
            }
            _ = tick.tick() => {
                if let Some(logger) = sensors.logger() {
                    logger.flush();
                }
                let counters = sensors.counters()?;
                let mut dropped = BTreeMap::new();
                for (kind, c) in &counters {
                    let before = reported_drops.get(kind).copied().unwrap_or(0);
                    if c.dropped > before {
                        dropped.insert(kind.clone(), c.dropped - before);
                        reported_drops.insert(kind.clone(), c.dropped);
                    }
                }
                if !dropped.is_empty() {
                    tracing::warn!(?dropped, "kernel ring buffer overflowed; records lost");
                    out.emit(Event::Loss { time: Clock::now(), node: out.node.clone(), dropped })?;
                    out.flush()?;
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // At most a slice per turn: under a load as fast as the
                // reader the ring never runs dry, and signals must still be
                // heard. Readiness stays set until the ring is empty.
                let (_, empty) = read_ring(guard.get_inner_mut(), DRAIN_SLICE, |item| handle(item, &mut decoder, &sensors, &mut user, &mut out, &mut digests, &running.policy))?;
                digester.submit_batch(&mut digests);
                if empty {
                    guard.clear_ready();
                }
                out.flush()?;
            }
            _ = drain.tick() => {
                let (n, _) = read_ring(ring.get_mut(), DRAIN_SLICE, |item| handle(item, &mut decoder, &sensors, &mut user, &mut out, &mut digests, &running.policy))?;
                let now = std::time::Instant::now();
                while user.after_munmap.front().is_some_and(|(at, _)| *at <= now) {
                    if let Some((_, path)) = user.after_munmap.pop_front() {
                        add_watched(&mut digests, &running.policy, &path, true);
                    }
                }
                digester.submit_batch(&mut digests);
                if n > 0 {
                    out.flush()?;
                }
            }
        }
    }

    // The stop budget runs from the signal. The hooks go first: they then
    // write nothing more, so the ring has an end however heavy the load
    // was; then it is read to that end, and the sender delivers what is
    // spooled or leaves it on disk for the next start.
    let stopping = std::time::Instant::now();
    ready.set(false);
    // While the hooks detach (RCU grace periods: seconds on a busy
    // machine) what they wrote is read, spooled and sent, not left waiting
    // behind the detach.
    let detaching = sensors.detach_in_background();
    let mut record = |item: &[u8], out: &mut Output| {
        handle(
            item,
            &mut decoder,
            &sensors,
            &mut user,
            out,
            // Read at a stop, nothing is digested any more.
            &mut digests,
            &running.policy,
        )
    };
    while detaching.as_ref().is_some_and(|d| !d.is_finished()) && stopping.elapsed() < STOP_READING
    {
        let (n, _) = read_ring(ring.get_mut(), DRAIN_SLICE, |item| record(item, &mut out))?;
        out.flush()?;
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if detaching.is_some_and(|d| d.join().is_err()) {
        tracing::error!("detaching the hooks failed");
    }
    let unread = drain_ring(&mut ring, stopping + STOP_READING, |item| {
        record(item, &mut out)
    })?;
    if unread > 0 {
        tracing::error!(
            records = unread,
            "the agent was too far behind to read the whole ring before stopping; these records are lost (counted in the stats)"
        );
        out.emit(Event::Loss {
            time: Clock::now(),
            node: event_node.clone(),
            dropped: BTreeMap::from([("unread_at_stop".to_owned(), unread)]),
        })?;
    }
    out.flush()?;
    if sending.is_some() {
        let _ = stop_sender.send(Some(stopping + STOP_DELIVERY));
    }
    let final_stats = stats(&sensors, &user, &node)?;
    out.emit(final_stats.clone())?;
    out.flush()?;
    if let Some(sending) = sending {
        // The sender ends its stream by the deadline; what the collector
        // has not acknowledged by then stays spooled.
        let _ = wait_thread(sending, STOP_DELIVERY + Duration::from_secs(1));
    }
    if let Some((spool, _)) = &out.spool {
        // What was not acknowledged yet is sent by the next run, which
        // numbers on from here.
        if let Err(e) = spool.close() {
            tracing::error!("flushing the spool: {e}");
        }
    }
    if let Some(path) = &args.stats_file {
        write_stats_file(path, &final_stats, &out, &delivery, Some(stopping), unread)?;
    }
    if user.malformed > 0 {
        tracing::warn!(
            count = user.malformed,
            "malformed kernel records were skipped"
        );
    }
    drop(ring);
    drop(sensors);
    tracing::info!("programs detached; exiting");
    Ok(())
}
