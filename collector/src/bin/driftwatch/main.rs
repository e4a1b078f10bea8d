//! `driftwatch`: the command line for security teams and responders.

mod changes;
mod evidence;
mod table;

use std::{io::Write as _, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use driftwatch_collector::{
    json::{self, time},
    query::kind_of,
    units::{self, when},
};
use driftwatch_proto::{
    time::now_unix_nanos,
    v1::{
        event, query_service_client::QueryServiceClient, timeline_item, AgentsRequest,
        TimelineRequest,
    },
};
use serde_json::{json, Value};

/// Query Driftwatch: findings (drift, unauthorized writes and connects,
/// silent agents, blind spots), change approvals, desired state, and the
/// event timeline of a host, a file or a process.
///
/// Every call acts as you: a client certificate (--cert/--key), or a token
/// (DRIFTWATCH_TOKEN or --token-file; an OIDC ID token works the same way).
/// What you may do is your role on the collector: viewer, responder,
/// approver or admin.
#[derive(Parser)]
#[command(name = "driftwatch", version)]
struct Cli {
    /// File holding your token (the collector maps it to your principal).
    #[arg(
        long,
        global = true,
        env = "DRIFTWATCH_TOKEN_FILE",
        value_name = "FILE"
    )]
    token_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) that signed the collector's (for https://).
    #[arg(long, global = true, env = "DRIFTWATCH_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// Your client certificate (PEM; URI SAN urn:driftwatch:user:NAME).
    #[arg(long, global = true, env = "DRIFTWATCH_CERT", value_name = "FILE")]
    cert: Option<std::path::PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long, global = true, env = "DRIFTWATCH_KEY", value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    /// Collector URL: `https://` for TLS, `http://` for plaintext (then
    /// tokens travel in clear; only for loopback or a trusted network).
    #[arg(
        long,
        global = true,
        env = "DRIFTWATCH_COLLECTOR",
        default_value = "http://127.0.0.1:7070"
    )]
    collector: String,
    /// Give up on the collector after this long: connecting, and each
    /// call's answer (a stream, once it has started, runs on).
    #[arg(long, global = true, env = "DRIFTWATCH_TIMEOUT", value_parser = units::parse_duration, value_name = "DURATION")]
    timeout: Option<std::time::Duration>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Event kinds a timeline can be narrowed to.
const EVENT_KINDS: [&str; 8] = [
    "exec",
    "exit",
    "file",
    "connect",
    "loss",
    "digest",
    "scan_done",
    "policy",
];

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// A readable table.
    Table,
    /// The table with nothing shortened.
    Wide,
    /// One JSON document: the object for `show`, an array of them otherwise.
    Json,
    /// One JSON object per line (what streams such as --follow print).
    Jsonl,
    /// One YAML document, shaped as `json`.
    Yaml,
}

impl Output {
    /// For programs rather than people.
    pub(crate) fn machine(self) -> bool {
        matches!(self, Output::Json | Output::Jsonl | Output::Yaml)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Events in order, with gaps (lost records, offline agents) shown inline.
    Timeline {
        /// Only this host (node name).
        #[arg(long)]
        host: Option<String>,
        /// From: a duration back from now (`10m`, `2h`) or an RFC 3339 time.
        #[arg(long, value_parser = when)]
        since: Option<i64>,
        /// Until: a duration back from now or an RFC 3339 time.
        #[arg(long, value_parser = when)]
        until: Option<i64>,
        /// Only this process instance.
        #[arg(long)]
        exec_id: Option<String>,
        /// Only this pid.
        #[arg(long)]
        pid: Option<u32>,
        /// Only file events under this path prefix.
        #[arg(long)]
        path: Option<String>,
        /// Only these kinds; repeatable.
        #[arg(long = "kind", value_parser = EVENT_KINDS)]
        kinds: Vec<String>,
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
        /// At most this many events.
        #[arg(long)]
        limit: Option<u32>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// With `-o json`: add each event's chain value and chained body,
        /// so the export can be checked offline with `driftwatch verify
        /// --file`.
        #[arg(long)]
        chain: bool,
    },
    /// Check that stored history is intact: every stored event of each host
    /// (or one) follows from the one before in its hash chain and the newest
    /// is the head the collector recorded, and so does the audit log. Names
    /// the first bad event. Exit status 1 when anything is broken.
    Verify {
        /// Only this host.
        #[arg(long, conflicts_with = "file")]
        host: Option<String>,
        /// Only events from this time (a duration back or RFC 3339); the
        /// first one is then taken as given.
        #[arg(long, value_parser = when, conflicts_with = "file")]
        since: Option<i64>,
        /// Check an export (`driftwatch timeline -o json --chain`) instead,
        /// offline.
        #[arg(long, value_name = "FILE")]
        file: Option<std::path::PathBuf>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// People's actions through the API (acknowledge, resolve, request,
    /// approve, deny, baseline import and scan, policy reloads), refused
    /// ones included, oldest first.
    Audit {
        /// From: a duration back from now or an RFC 3339 time.
        #[arg(long, value_parser = when)]
        since: Option<i64>,
        /// At most this many (the newest; default 1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Findings: list, show with evidence, acknowledge, resolve.
    #[command(subcommand)]
    Findings(changes::Findings),
    /// Change requests: request, approve or deny (a different principal), list.
    #[command(subcommand)]
    Approvals(changes::Approvals),
    /// Desired state: import a manifest, scan a reference host, list.
    #[command(subcommand)]
    Baseline(changes::Baselines),
    /// Policies, checked offline.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Agents, their last heartbeat, sensor set and lag.
    Agents {
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print a shell completion script: `source <(driftwatch completion
    /// bash)`, or write it where your shell loads completions from.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `driftwatch man | man -l -`.
    Man,
}

/// How a command prints.
struct Shape {
    output: Output,
    /// Shows one object (`show`, `request`): `-o json` prints it alone.
    single: bool,
    /// Prints as things happen (`--follow`, `watch`).
    stream: bool,
}

fn shape_of(cmd: &Cmd) -> Shape {
    use changes::{Approvals as A, Baselines as B, Findings as F};
    let (output, single, stream) = match cmd {
        Cmd::Timeline { output, follow, .. } => (*output, false, *follow),
        Cmd::Verify { output, .. } | Cmd::Audit { output, .. } | Cmd::Agents { output } => {
            (*output, false, false)
        }
        Cmd::Findings(F::List { output, .. }) => (*output, false, false),
        Cmd::Findings(F::Watch { output, .. }) => (*output, false, true),
        Cmd::Findings(F::Show { output, .. }) => (*output, true, false),
        Cmd::Approvals(A::Request { output, .. }) | Cmd::Approvals(A::Show { output, .. }) => {
            (*output, true, false)
        }
        Cmd::Approvals(A::List { output, .. }) | Cmd::Baseline(B::List { output, .. }) => {
            (*output, false, false)
        }
        _ => (Output::Table, false, false),
    };
    Shape {
        output,
        single,
        stream,
    }
}

/// Checks what can be checked without the collector, so a mistake is
/// named before any connection is tried: the output for a stream, the
/// order of --since and --until, the manifest to import.
fn prepare(cmd: &mut Cmd) -> Result<Shape, String> {
    let shape = shape_of(cmd);
    if shape.stream && matches!(shape.output, Output::Json | Output::Yaml) {
        return Err(
            "this prints as things happen, one document at a time: use -o jsonl (one JSON object per line) or the table"
                .into(),
        );
    }
    if let Cmd::Timeline {
        since: Some(since),
        until: Some(until),
        ..
    } = cmd
    {
        if since >= until {
            return Err(format!(
                "--since ({}) is not before --until ({}): durations count back from now, so --since 1h --until 10m is the hour up to ten minutes ago",
                time(*since),
                time(*until)
            ));
        }
    }
    if let Cmd::Baseline(b) = cmd {
        changes::read_manifest(b)?;
    }
    Ok(shape)
}

/// Writes `bytes` to standard output; a reader that went away (`| head`)
/// is not an error.
fn print_whole(bytes: &[u8]) -> Result<(), String> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("writing to standard output: {e}"))
        }
        _ => Ok(()),
    }
}

/// What `-o json` and `-o yaml` print: the JSON lines a command wrote,
/// as one document (the object alone for a command that shows one).
fn reshape(lines: &[u8], shape: &Shape) -> Result<String, String> {
    let text = String::from_utf8_lossy(lines);
    let mut items = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        items.push(
            serde_json::from_str::<Value>(line)
                .map_err(|e| format!("an answer could not be shown as JSON ({e}): {line}"))?,
        );
    }
    let doc = if shape.single && items.len() == 1 {
        items.remove(0)
    } else {
        Value::Array(items)
    };
    match shape.output {
        Output::Yaml => serde_norway::to_string(&doc).map_err(|e| e.to_string()),
        _ => serde_json::to_string_pretty(&doc)
            .map(|s| s + "\n")
            .map_err(|e| e.to_string()),
    }
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file with the collector's own messages (file,
    /// field, reason), then warn about what will not do what it seems to
    /// on this host: users and executables that do not exist here, pod
    /// selectors without Kubernetes, modes not acted on. Exit status 1 when
    /// the policy is invalid (or has warnings, with --strict). No collector
    /// is contacted.
    Check {
        /// The policy file.
        file: std::path::PathBuf,
        /// The agents run on Kubernetes nodes and read pod metadata from
        /// its API (pod selectors can match).
        #[arg(long)]
        kubernetes: bool,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
    },
}

/// `driftwatch policy check`.
fn policy_check(file: &std::path::Path, kubernetes: bool, strict: bool) -> Result<(), String> {
    let (policy, text) = driftwatch_proto::policy::Policy::read(file).map_err(|e| e.to_string())?;
    let user = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
    let host = driftwatch_proto::policy::HostFacts {
        user_exists: &|name| user(name).is_some(),
        uid_of: &|name| user(name).map(|u| u.uid.as_raw()),
        exe_exists: &|path| std::path::Path::new(path).exists(),
        kubernetes,
    };
    let warnings = policy.warnings(&host);
    for w in &warnings {
        eprintln!("driftwatch: warning: {}: {w}", file.display());
    }
    println!(
        "{}: valid, version {}, {} resources, {} warnings",
        file.display(),
        driftwatch_proto::policy::version(&text),
        policy.resources.len(),
        warnings.len()
    );
    if strict && !warnings.is_empty() {
        return Err(format!(
            "{}: {} warnings (--strict)",
            file.display(),
            warnings.len()
        ));
    }
    Ok(())
}

/// The largest answer the CLI reads: a thousand findings of long paths, or
/// an audit log page, can pass gRPC's default of 4 MiB.
pub(crate) const MAX_ANSWER: usize = 64 << 20;

/// The collector asked and the --timeout given, for the error a call that
/// timed out reports.
static ASKED: std::sync::OnceLock<(String, std::time::Duration)> = std::sync::OnceLock::new();

/// Adds the caller's token, if any, to every call.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A connection to the collector that carries the caller's token.
pub(crate) type Conn =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Writes through, with control characters (C0 but newline and tab, DEL,
/// and the C1 range) shown as `\u00NN` instead of acting on the terminal
/// (the same escape JSON uses, so `-o json` stays valid JSON).
pub(crate) struct Escaping<W>(W);

impl<W: std::io::Write> std::io::Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut start = 0;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            // U+0080..U+009F are 0xC2 0x80..0x9F in UTF-8.
            let c1 = b == 0xC2 && buf.get(i + 1).is_some_and(|n| (0x80..=0x9F).contains(n));
            if (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7F || c1 {
                self.0.write_all(&buf[start..i])?;
                let shown = if c1 { buf[i + 1] } else { b };
                write!(self.0, "\\u{shown:04x}")?;
                i += if c1 { 2 } else { 1 };
                start = i;
            } else {
                i += 1;
            }
        }
        self.0.write_all(&buf[start..])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A refused call as the person should read it: the collector's message,
/// or for a transport failure (no TLS, a refused certificate) its causes.
pub(crate) fn status_text(what: &str, s: &tonic::Status) -> String {
    if let Some((url, t)) = ASKED.get() {
        if s.message() == "Timeout expired" || s.code() == tonic::Code::DeadlineExceeded {
            return format!(
                "{what}: no answer from the collector at {url} within {} (--timeout)",
                units::fmt_duration(*t)
            );
        }
    }
    match std::error::Error::source(s) {
        Some(cause) if s.message() == "transport error" || s.message().is_empty() => {
            format!(
                "{what}: cannot talk to the collector: {}",
                driftwatch_proto::client::error_chain(cause)
            )
        }
        _ => format!("{what}: {}", s.message()),
    }
}

fn token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f)
            .map_err(|e| format!("{}: cannot read the token: {e}", f.display()))?;
        let t = t.trim().to_owned();
        if t.is_empty() {
            return Err(format!("{}: the token file is empty", f.display()));
        }
        return Ok(Some(t));
    }
    Ok(std::env::var("DRIFTWATCH_TOKEN")
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

async fn run(mut cli: Cli) -> Result<(), String> {
    match &cli.cmd {
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "driftwatch", &mut script);
            return print_whole(&script);
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| format!("making the manual page: {e}"))?;
            return print_whole(&page);
        }
        _ => {}
    }
    // An export is checked offline: no collector involved.
    if let Cmd::Verify {
        file: Some(f),
        output,
        ..
    } = &cli.cmd
    {
        let mut out = Escaping(std::io::stdout().lock());
        if !evidence::verify_file(f, *output, &mut out)? {
            return Err(format!("verify: {} is not intact (see above)", f.display()));
        }
        return Ok(());
    }
    if let Cmd::Policy(PolicyCmd::Check {
        file,
        kubernetes,
        strict,
    }) = &cli.cmd
    {
        return policy_check(file, *kubernetes, *strict);
    }
    let shape = prepare(&mut cli.cmd)?;
    let tls = driftwatch_proto::client::ClientTls {
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
    };
    let (endpoint, plaintext) = driftwatch_proto::client::endpoint(&cli.collector, &tls)?;
    let endpoint = match cli.timeout {
        Some(t) => {
            let _ = ASKED.set((cli.collector.clone(), t));
            endpoint.connect_timeout(t).timeout(t)
        }
        None => endpoint.connect_timeout(std::time::Duration::from_secs(10)),
    };
    let token = token(cli.token_file.as_deref())?;
    if plaintext && token.is_some() {
        let loopback = endpoint.uri().host().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if !loopback {
            eprintln!(
                "driftwatch: warning: sending your token in plaintext to {}; use https://",
                cli.collector
            );
        }
    }
    let channel = endpoint.connect().await.map_err(|e| {
        format!(
            "cannot reach the collector at {}: {}",
            cli.collector,
            driftwatch_proto::client::error_chain(&e)
        )
    })?;
    let bearer = match &token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "the token contains characters a header cannot carry".to_owned())?,
        ),
        None => None,
    };
    let channel = tonic::service::interceptor::InterceptedService::new(channel, Bearer(bearer));
    let client = QueryServiceClient::new(channel.clone()).max_decoding_message_size(MAX_ANSWER);
    // File names, arguments and principals come from people and programs
    // that may put terminal escapes in them: none reaches the terminal raw.
    let mut stdout = Escaping(std::io::stdout().lock());
    // One document (-o json, -o yaml) is made of the JSON lines a command
    // writes, once it has written them all.
    let whole = matches!(shape.output, Output::Json | Output::Yaml);
    let mut lines = Vec::new();
    let out: &mut dyn std::io::Write = if whole { &mut lines } else { &mut stdout };
    dispatch(cli.cmd, channel, client, out).await?;
    if whole {
        let doc = reshape(&lines, &shape)?;
        let _ = stdout.write_all(doc.as_bytes());
    }
    Ok(())
}

async fn dispatch(
    cmd: Cmd,
    channel: Conn,
    mut client: QueryServiceClient<Conn>,
    mut out: &mut dyn std::io::Write,
) -> Result<(), String> {
    match cmd {
        Cmd::Findings(c) => changes::findings(channel, c, &mut out).await?,
        Cmd::Approvals(c) => changes::approvals(channel, c, &mut out).await?,
        Cmd::Baseline(c) => changes::baselines(channel, c, &mut out).await?,
        Cmd::Timeline {
            host,
            since,
            until,
            exec_id,
            pid,
            path,
            kinds,
            follow,
            limit,
            output,
            chain,
        } => {
            let req = TimelineRequest {
                node: host.unwrap_or_default(),
                since_unix_nanos: since.unwrap_or(0),
                until_unix_nanos: until.unwrap_or(0),
                exec_id: exec_id.unwrap_or_default(),
                pid: pid.unwrap_or(0),
                path_prefix: path.unwrap_or_default(),
                kinds,
                follow,
                limit: limit.unwrap_or(0),
            };
            let mut stream = client
                .timeline(req)
                .await
                .map_err(|s| status_text("timeline", &s))?
                .into_inner();
            if !output.machine() {
                let _ = writeln!(
                    out,
                    "{:<30} {:<12} {:>6} {:<8} {:<8} {:<7} {:<24} DETAIL",
                    "TIME", "HOST", "SEQ", "KIND", "USER", "PID", "EXE"
                );
            }
            while let Some(item) = stream
                .message()
                .await
                .map_err(|s| status_text("timeline", &s))?
            {
                let line = match (&item.item, output) {
                    (Some(timeline_item::Item::Event(e)), o) if o.machine() => {
                        let mut v = json::event(e);
                        if chain {
                            evidence::add_chain(&mut v, e);
                        }
                        v.to_string()
                    }
                    (Some(timeline_item::Item::Gap(g)), o) if o.machine() => {
                        json::gap(g).to_string()
                    }
                    (Some(timeline_item::Item::Event(e)), _) if kind_of(e) == "loss" => {
                        // A kernel loss record is a hole in the history: show it as one.
                        let dropped = match &e.event {
                            Some(event::Event::Loss(l)) => format!("{:?}", l.dropped),
                            _ => String::new(),
                        };
                        format!("---- GAP {} kernel_loss (ring buffer full, records lost: {dropped}) at {} ----", e.node, time(e.time_unix_nanos))
                    }
                    (Some(timeline_item::Item::Event(e)), _) => {
                        let p = e.process.clone().unwrap_or_default();
                        let user = if p.login_user.is_empty() || p.login_user == p.user {
                            p.user.clone()
                        } else {
                            format!("{}({})", p.user, p.login_user)
                        };
                        format!(
                            "{:<30} {:<12} {:>6} {:<8} {:<8} {:<7} {:<24} {}",
                            time(e.time_unix_nanos),
                            e.node,
                            e.seq,
                            kind_of(e),
                            user,
                            p.pid,
                            p.exe,
                            json::detail(e)
                        )
                    }
                    (Some(timeline_item::Item::Gap(g)), _) => {
                        let seqs = if g.from_seq > 0 {
                            format!(" seq {}..{}", g.from_seq, g.to_seq)
                        } else {
                            String::new()
                        };
                        let why = if g.detail.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", g.detail)
                        };
                        format!(
                            "---- GAP {} {}{seqs} from {} to {}{why} ----",
                            g.node,
                            g.reason,
                            time(g.from_time_unix_nanos),
                            time(g.to_time_unix_nanos)
                        )
                    }
                    (None, _) => continue,
                };
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(());
                }
            }
        }
        Cmd::Verify {
            host,
            since,
            output,
            file: _,
        } => {
            if !evidence::verify_online(&mut client, host, since, output, &mut out).await? {
                return Err("verify: the stored history is not intact (see above)".into());
            }
        }
        Cmd::Audit {
            since,
            limit,
            output,
        } => evidence::audit(&mut client, since, limit, output, &mut out).await?,
        Cmd::Policy(PolicyCmd::Check {
            file,
            kubernetes,
            strict,
        }) => policy_check(&file, kubernetes, strict)?,
        Cmd::Completion { .. } | Cmd::Man => {}
        Cmd::Agents { output } => {
            let agents = client
                .agents(AgentsRequest {})
                .await
                .map_err(|s| status_text("agents", &s))?
                .into_inner()
                .agents;
            let now = now_unix_nanos();
            let wide = output == Output::Wide;
            let mut header = vec![
                "HOST",
                "STATE",
                "SEEN",
                "SENSOR SET",
                "ACKED",
                "LAG",
                "POLICY",
            ];
            if wide {
                header.extend(["LAST SEEN", "KERNEL", "VERSION"]);
            }
            let mut rows = table::Rows::new(&header, &[4, 5]);
            for a in agents {
                let n = a.node.clone().unwrap_or_default();
                let lag = a.last_seq.saturating_sub(a.acked_seq);
                if output.machine() {
                    let v = json!({
                        "host": n.name, "connected": a.connected, "last_seen": time(a.last_seen_unix_nanos),
                        "sensor_set": n.sensor_set, "kernel": n.kernel, "agent_version": n.agent_version,
                        "acked_seq": a.acked_seq, "last_seq": a.last_seq, "lag": lag,
                        "policy_version": a.policy_version,
                        "policy_error": (!a.policy_error.is_empty()).then_some(&a.policy_error),
                        "chain_seq": a.chain_seq,
                        "chain_head": driftwatch_proto::chain::hex(&a.chain_head),
                    });
                    let _ = writeln!(out, "{v}");
                    continue;
                }
                let policy = match (a.policy_version.as_str(), a.policy_error.as_str()) {
                    ("", "") => "-".to_owned(),
                    (v, "") => v.to_owned(),
                    (v, e) => format!("{v} (refused {e})"),
                };
                let mut row = vec![
                    n.name.clone(),
                    if a.connected { "connected" } else { "offline" }.to_owned(),
                    units::age(a.last_seen_unix_nanos, now),
                    n.sensor_set.clone(),
                    a.acked_seq.to_string(),
                    lag.to_string(),
                    policy,
                ];
                if wide {
                    row.extend([
                        time(a.last_seen_unix_nanos),
                        n.kernel.clone(),
                        n.agent_version.clone(),
                    ]);
                }
                rows.push(row);
            }
            if !output.machine() {
                rows.print(out, output);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("driftwatch: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driftwatch: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Escaping;
    use std::io::Write as _;

    #[test]
    fn a_process_shows_every_field_of_the_api() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(driftwatch_proto::v1::FILE_DESCRIPTOR_SET)
            .expect("the API's descriptors");
        let message = |name: &str| {
            set.file
                .iter()
                .flat_map(|f| &f.message_type)
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("no message {name}"))
                .clone()
        };
        let v = driftwatch_collector::json::process(&driftwatch_proto::v1::Process {
            container: Some(Default::default()),
            ancestors: vec![Default::default()],
            ..Default::default()
        });
        let json_name = |f: &str| f.strip_suffix("_unix_nanos").unwrap_or(f).to_owned();
        for f in &message("Process").field {
            assert!(
                v.get(json_name(f.name())).is_some(),
                "process.{} missing",
                f.name()
            );
        }
        for f in &message("Container").field {
            assert!(
                v["container"].get(f.name()).is_some(),
                "container.{}",
                f.name()
            );
        }
        for f in &message("Ancestor").field {
            assert!(
                v["ancestors"][0].get(f.name()).is_some(),
                "ancestor.{}",
                f.name()
            );
        }
    }

    #[test]
    fn terminal_controls_are_shown_not_obeyed() {
        let mut out = Escaping(Vec::new());
        writeln!(out, "ok\tfile \u{1b}[31mred\u{7}\u{9b}2J é").unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "ok\tfile \\u001b[31mred\\u0007\\u009b2J é\n"
        );
    }
}
