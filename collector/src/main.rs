//! `driftwatch-collector`: stores agent events durably and serves queries.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use driftwatch_collector::{
    audit::Audit,
    control::Control,
    correlate::{self, Correlator, Settings},
    ingest::Ingest,
    policy::Policies,
    query::Query,
    security::{
        auth::{self, Auth, AuthLayer},
        certs, tls,
        watched::Watched,
    },
    store::{
        judging::Judging, judging_kv::SledJudging, postgres::PgLog, sled_store::SledStore,
        EventLog, StoreError,
    },
    units,
};
use driftwatch_proto::ops::{init_logging, LogFormat};
use driftwatch_proto::time::now_unix_nanos;
use driftwatch_proto::v1::{
    agent_service_server::AgentServiceServer, approval_service_server::ApprovalServiceServer,
    baseline_service_server::BaselineServiceServer, finding_service_server::FindingServiceServer,
    query_service_server::QueryServiceServer,
};

/// Ingest decodes, stores and drops a tree of small strings per event;
/// mimalloc's thread-local free lists cost a fraction of glibc's malloc for
/// that pattern (the allocator was ~40% of the collector's CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Driftwatch collector: one bidirectional gRPC stream per agent, events
/// acknowledged only once they are on disk, stored in sled (one directory,
/// nothing else to set up), replayed by `driftwatch timeline`, and judged
/// into findings (`driftwatch findings`) against the policy, the desired
/// state (`driftwatch baseline`) and approved change requests
/// (`driftwatch approvals`).
///
/// SIGHUP re-reads the policy file and pushes it to every agent; a bad
/// policy is refused (file, field, reason) and the running one stays.
///
/// Trust: `--tls-cert/--tls-key` serve TLS; `--client-ca` verifies client
/// certificates (agents must present one naming their node); `--tokens`,
/// `--oidc-*` and client certificates identify people, and `--roles` says
/// what each may do. With no credential source the collector is open for
/// reading and streaming, refuses changes, and listens on loopback only.
/// Certificate, tokens, roles and JWKS files are re-read when they change.
#[derive(Debug, Parser)]
#[command(
    name = "driftwatch-collector",
    version,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Sub>,
    /// Address to listen on (agents and the CLI).
    #[arg(long, env = "DRIFTWATCH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Where events are stored: `sled` (embedded, in --data-dir) or a
    /// PostgreSQL URL (`postgres://user:password@host:5432/driftwatch`),
    /// which collector replicas share. The schema is created and migrated
    /// at start.
    #[arg(long, env = "DRIFTWATCH_STORE", hide_env_values = true, default_value = "sled", value_parser = parse_store)]
    store: StoreChoice,
    /// CA certificate (PEM) PostgreSQL's server certificate must chain to
    /// (default: the system's roots). TLS is used unless the URL says
    /// `sslmode=disable`; add `sslmode=require` to refuse a server without
    /// it.
    #[arg(long, env = "DRIFTWATCH_STORE_CA", value_name = "FILE")]
    store_ca: Option<PathBuf>,
    /// Directory of the sled store (created if missing): the events with
    /// `--store sled`, and the judging state (findings, approvals,
    /// baselines, audit log) in either case.
    #[arg(
        long,
        env = "DRIFTWATCH_DATA_DIR",
        default_value = "/var/lib/driftwatch/collector"
    )]
    data_dir: PathBuf,
    /// Delete events older than this (`30d`, `12h`, `90m`).
    #[arg(long, default_value = "30d", value_parser = units::parse_duration)]
    retention_age: Duration,
    /// Delete the oldest events while the store is larger than this
    /// (`10GiB`, `500MiB`; `0` for no bound).
    #[arg(long, default_value = "0", value_parser = units::parse_bytes)]
    retention_size: u64,
    /// Largest message accepted from an agent; larger ones are refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "4MiB", value_parser = units::parse_bytes)]
    max_message_size: u64,
    /// Policy file (YAML, `apiVersion: driftwatch.dev/v1`): judged here and
    /// sent to every agent, which applies it to its kernel maps.
    #[arg(long, env = "DRIFTWATCH_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Tokens file: one `TOKEN PRINCIPAL` per line (`chmod 600`). A caller
    /// sending `authorization: Bearer TOKEN` acts as PRINCIPAL.
    #[arg(long, env = "DRIFTWATCH_TOKENS", value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// Roles file (YAML): `viewer`, `responder`, `approver`, `admin`, each a
    /// list of principals, `group:NAME` or `*`. Without it every
    /// authenticated person is admin.
    #[arg(long, env = "DRIFTWATCH_ROLES", value_name = "FILE")]
    roles: Option<PathBuf>,
    /// The collector's TLS certificate chain (PEM).
    #[arg(
        long,
        env = "DRIFTWATCH_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "DRIFTWATCH_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are accepted: agents
    /// (`urn:driftwatch:node:NAME`) and people (`urn:driftwatch:user:NAME`).
    #[arg(
        long,
        env = "DRIFTWATCH_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    client_ca: Option<PathBuf>,
    /// OIDC issuer whose ID tokens identify people (the `iss` claim).
    #[arg(long, env = "DRIFTWATCH_OIDC_ISSUER", requires_all = ["oidc_audience", "oidc_jwks"])]
    oidc_issuer: Option<String>,
    /// The audience ID tokens must be for (the `aud` claim).
    #[arg(long, env = "DRIFTWATCH_OIDC_AUDIENCE", requires = "oidc_issuer")]
    oidc_audience: Option<String>,
    /// The issuer's public keys (a JWKS JSON file, kept current by whatever
    /// fetches it).
    #[arg(
        long,
        env = "DRIFTWATCH_OIDC_JWKS",
        value_name = "FILE",
        requires = "oidc_issuer"
    )]
    oidc_jwks: Option<PathBuf>,
    /// The ID token claim that names the person.
    #[arg(long, default_value = "email")]
    oidc_username_claim: String,
    /// The ID token claim that lists the person's groups.
    #[arg(long, default_value = "groups")]
    oidc_groups_claim: String,
    /// Listen beyond loopback even with no credential source configured
    /// (anyone who reaches the port can read everything and stream events).
    #[arg(long)]
    allow_unauthenticated: bool,
    /// An agent without contact for this long is reported `agent_silent`.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    silent_after: Duration,
    /// Do not take a file's first observed state as its desired state when
    /// no baseline names it (by default it is learned, marked `learned`).
    #[arg(long)]
    no_learn: bool,
    /// Log filter for standard error.
    #[arg(long, env = "DRIFTWATCH_LOG", default_value = "info")]
    log: String,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one
    /// object per line, for a cluster's log collector).
    #[arg(long, env = "DRIFTWATCH_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Serve `/metrics` (Prometheus, OpenMetrics text), `/healthz` and
    /// `/readyz` on this address (plain HTTP; keep it inside the cluster).
    #[arg(long, env = "DRIFTWATCH_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Webhooks to notify (YAML): approval requests with the command that
    /// decides them, decisions, new findings above a severity, blocked
    /// actions; `json`, `slack` or `teams` payloads, filtered per
    /// destination. Queued in the store, retried with backoff.
    #[arg(long, env = "DRIFTWATCH_NOTIFY", value_name = "FILE")]
    notify: Option<PathBuf>,
    /// Write every finding change (and, with --export-events, every
    /// event) to JSON Lines files in this directory, `findings.jsonl` and
    /// `events.jsonl`, in the shape `driftwatch -o json` prints.
    #[arg(long, env = "DRIFTWATCH_EXPORT_DIR", value_name = "DIR")]
    export_dir: Option<PathBuf>,
    /// Also export events, not only findings.
    #[arg(long, env = "DRIFTWATCH_EXPORT_EVENTS")]
    export_events: bool,
    /// Rotate an export file once it would grow past this.
    #[arg(long, default_value = "100MiB", value_parser = units::parse_bytes)]
    export_max_bytes: u64,
    /// Rotated export files kept (`findings.jsonl.1` … `.N`).
    #[arg(long, default_value_t = 5)]
    export_keep: usize,
    /// Send finding changes (and events, with --export-events) as
    /// OpenTelemetry log records to this OTLP/HTTP endpoint
    /// (`http://otel-collector:4318/v1/logs`; JSON encoding).
    #[arg(long, env = "DRIFTWATCH_OTLP_LOGS_URL", value_name = "URL", value_parser = otlp_url)]
    otlp_logs_url: Option<String>,
    /// Serve the timeline web view for responders on this address (plain
    /// HTTP; the same credentials as the API: a bearer token, or in a
    /// browser the token as the Basic password; the viewer role).
    #[arg(long, env = "DRIFTWATCH_WEB_LISTEN", value_name = "ADDR")]
    web_listen: Option<std::net::SocketAddr>,
}

/// An OTLP/HTTP URL: http(s), with a host.
fn otlp_url(s: &str) -> Result<String, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(s.to_owned()),
        _ => Err(format!(
            "{s:?}: give an http:// or https:// URL with a host, like http://otel-collector:4318/v1/logs"
        )),
    }
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Certificates for a first install, a demo or tests: a CA and what it
    /// signs. Bring your own CA or cert-manager for production.
    #[command(subcommand)]
    Certs(Certs),
}

#[derive(Debug, clap::Subcommand)]
enum Certs {
    /// Make a CA (`ca.pem`, `ca-key.pem`) and a server certificate
    /// (`server.pem`, `server-key.pem`) in DIR.
    Init {
        /// Directory for the files (created; keys are mode 600).
        #[arg(long)]
        dir: PathBuf,
        /// Names the collector is reached by (DNS names or IP addresses).
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
        server_names: Vec<String>,
        /// Days the server certificate is valid (the CA: ten times as long).
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue (or re-issue, to rotate) a certificate signed by DIR's CA:
    /// `node NAME` for an agent, `user NAME` for a person, `server NAMES…`.
    Issue {
        /// Directory of the CA; the certificate is written next to it.
        #[arg(long)]
        dir: PathBuf,
        /// What the certificate is for.
        kind: certs::Kind,
        /// The node or user name; a server's DNS names or IPs.
        #[arg(required = true)]
        names: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
}

fn certs_command(c: Certs) -> ExitCode {
    let written = match c {
        Certs::Init {
            dir,
            server_names,
            days,
        } => certs::init(&dir, &server_names, days),
        Certs::Issue {
            dir,
            kind,
            names,
            days,
        } => certs::issue(&dir, kind, &names, days),
    };
    match written {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("driftwatch-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Sub::Certs(c)) = args.cmd.take() {
        return certs_command(c);
    }
    if let Err(e) = init_logging(&args.log, args.log_format) {
        eprintln!("driftwatch-collector: error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("driftwatch-collector: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // A flush stuck on a failed disk must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(Stop::Exit) => ExitCode::SUCCESS,
        Ok(Stop::Reopen) => {
            // sled keeps an I/O error for as long as the store is open:
            // the process starts again in place, with the same arguments,
            // and opens it anew (file locks go with the old image).
            use std::os::unix::process::CommandExt as _;
            let mut argv = std::env::args_os();
            let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
            let mut cmd = std::process::Command::new(exe);
            if let Some(arg0) = argv.next() {
                cmd.arg0(arg0);
            }
            let e = cmd.args(argv).exec();
            eprintln!("driftwatch-collector: error: restarting to reopen the store: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("driftwatch-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGINT or SIGTERM.
    Exit,
    /// The store failed to write and its directory can be written again.
    Reopen,
}

/// How long open calls (a `timeline --follow`, an agent draining) may take
/// to end once the collector stops; then their connections are closed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Where the events go.
#[derive(Clone, Debug)]
enum StoreChoice {
    Sled,
    Postgres(String),
}

fn parse_store(s: &str) -> Result<StoreChoice, String> {
    if s == "sled" {
        Ok(StoreChoice::Sled)
    } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(StoreChoice::Postgres(s.to_owned()))
    } else {
        Err(format!(
            "{s:?}: expected `sled` or a PostgreSQL URL (postgres://user@host:5432/db)"
        ))
    }
}

async fn run(args: Args) -> anyhow::Result<Stop> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let state = SledStore::open(&args.data_dir)
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    // The event log and the judging state live in one store: replicas
    // over one PostgreSQL share both.
    let (store, judging): (Arc<dyn EventLog>, Arc<dyn Judging>) = match &args.store {
        StoreChoice::Sled => (
            Arc::new(state.clone()),
            Arc::new(SledJudging::open(state.clone()).context("opening the judging state")?),
        ),
        StoreChoice::Postgres(url) => {
            let pg = Arc::new(
                PgLog::connect_with(url, args.store_ca.as_deref())
                    .context("opening the PostgreSQL store")?,
            );
            (pg.clone(), pg)
        }
    };
    // Agents whose stream was open when the collector stopped are not
    // connected now (an embedded store has no other collector).
    if matches!(args.store, StoreChoice::Sled) {
        for a in store.agents()? {
            if let (true, Some(n)) = (a.connected, &a.node) {
                store.update_agent(&n.name, &mut |a| a.connected = false)?;
            }
        }
    }
    tracing::info!(store = %store.describe(), blocks = store.block_count()?, state = %args.data_dir.display(), "store opened");
    let policies = Policies::open(args.policy.clone())?;
    match policies.current() {
        Some(p) => {
            tracing::info!(file = %p.source, version = %p.version, resources = p.policy.resources.len(), "policy loaded")
        }
        None => tracing::warn!(
            "no --policy: agents keep their own, and writes and connects are not judged"
        ),
    }
    let auth = std::sync::Arc::new(auth_of(&args)?);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::watch(tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.client_ca.clone(),
        })?),
        _ => None,
    };
    if auth.is_open() {
        if !args.listen.ip().is_loopback() && !args.allow_unauthenticated {
            anyhow::bail!(
                "refusing to listen on {} with no credential source: configure --client-ca, --tokens or --oidc-issuer, or pass --allow-unauthenticated",
                args.listen
            );
        }
        tracing::warn!("no credentials configured (--client-ca, --tokens, --oidc-issuer): anyone reaching the port may read and stream; changes are refused");
    } else if args.roles.is_none() {
        tracing::warn!("no --roles: every authenticated person is admin");
    }
    if tls.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "serving plaintext beyond loopback: tokens and events travel in clear; configure --tls-cert");
    }
    let correlator = std::sync::Arc::new(Correlator::open(
        judging.clone(),
        store.clone(),
        policies.clone(),
        Settings {
            learn: !args.no_learn,
            silent_after: args.silent_after,
        },
    )?);
    let notify_config = match &args.notify {
        Some(path) => {
            driftwatch_collector::notify::Config::read(path).map_err(anyhow::Error::msg)?
        }
        None => driftwatch_collector::notify::Config::default(),
    };
    let destinations = notify_config.destinations.len();
    let notifier = driftwatch_collector::notify::Notifier::open(&state, notify_config)?;
    if destinations > 0 {
        tracing::info!(destinations, "notifications on");
        let n = notifier.clone();
        correlator.on_open(Box::new(move |f| {
            n.notify(&driftwatch_collector::notify::finding_notice(f))
        }));
        notifier.spawn();
    }
    let judged = correlator.recover()?;
    if judged > 0 {
        tracing::info!(events = judged, "judged events stored before the last stop");
    }
    correlate::spawn_silence_check(correlator.clone());
    // Open streams and follows end with UNAVAILABLE when the collector
    // stops, instead of holding the stop until their clients leave.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let separate_state = matches!(args.store, StoreChoice::Postgres(_)).then(|| state.clone());
    let ingest =
        Ingest::new(store.clone(), correlator.clone(), separate_state).closing_on(closing.clone());
    // Scans another replica recorded for agents streaming here.
    ingest.spawn_scan_router();
    // What other replicas store reaches this one's live timelines too.
    store.clone().follow_others(ingest.stored.clone());
    if let Some(addr) = args.web_listen {
        driftwatch_collector::web::serve(addr, correlator.clone(), auth.clone()).await?;
    }
    driftwatch_collector::export::spawn(
        driftwatch_collector::export::Config {
            dir: args.export_dir.clone(),
            events: args.export_events,
            max_bytes: args.export_max_bytes,
            keep: args.export_keep,
            otlp: args.otlp_logs_url.clone(),
        },
        &args.data_dir,
        correlator.clone(),
        &ingest.stored,
    )?;
    let audit = std::sync::Arc::new(Audit::open(&state).context("opening the audit log")?);
    tokio::spawn(reload_policy(
        policies.clone(),
        args.policy.clone(),
        audit.clone(),
    ));
    let control = Control::new(correlator.clone(), ingest.clone(), audit.clone())
        .with_notifier(notifier.clone());
    let query = Query::new(store.clone(), ingest.stored.clone(), audit.clone()).closing_on(closing);
    let ingest_failure = ingest.store_failure();
    let ready = driftwatch_proto::ops::Ready::default();
    if let Some(addr) = args.metrics_listen {
        let metrics = ingest.metrics();
        let mut registry = metrics.registry();
        notifier.register(&mut registry);
        let registry = std::sync::Arc::new(registry);
        let (store, correlator, failure) =
            (store.clone(), correlator.clone(), ingest_failure.clone());
        let refresh = std::sync::Arc::new(move || {
            metrics.refresh(&*store, &correlator, failure.borrow().is_some())
        });
        let bound = driftwatch_proto::ops::serve_metrics(addr, registry, refresh, ready.clone())
            .map_err(anyhow::Error::msg)?;
        tracing::info!(addr = %bound, "metrics at /metrics, health at /healthz and /readyz");
    }
    // grpc.health.v1: SERVING while the store takes writes, NOT_SERVING
    // while it cannot and once the collector stops.
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(driftwatch_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("server reflection")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(driftwatch_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("server reflection")?;

    let retention_store = store.clone();
    let (age, size) = (args.retention_age, args.retention_size);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let min_time =
                now_unix_nanos().saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX));
            let log = retention_store.clone();
            let done = tokio::task::spawn_blocking(move || log.retain(min_time, size)).await;
            match done.unwrap_or_else(|e| Err(StoreError::Backend(format!("retention task: {e}"))))
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "retention removed old events"),
                Err(e) => tracing::error!("retention failed: {e}"),
            }
        }
    });

    let signals = stop_signals()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = tls.is_some(), client_certs = args.client_ca.is_some(), "collector listening");
    let max = args.max_message_size as usize;
    let router = tonic::transport::Server::builder()
        // A client holds at most this many calls open on one connection,
        // a connection that stops answering pings is closed, and a burst
        // of opened-and-reset streams is cut short: idle or abandoned
        // clients hold nothing for long.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_max_header_list_size(Some(16 * 1024))
        // An agent's batch (up to 1 MiB) crosses in a few frames rather
        // than sixty-four 16 KiB ones, and two in flight fit the window:
        // fewer frames, writes and window updates on both ends.
        .max_frame_size(Some(256 * 1024))
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .layer(tower::util::MapResponseLayer::new(
            driftwatch_collector::statuses::conventional,
        ))
        .layer(AuthLayer::new(auth, Some(audit)))
        .add_service(AgentServiceServer::new(ingest).max_decoding_message_size(max))
        .add_service(QueryServiceServer::new(query))
        .add_service(FindingServiceServer::new(control.clone()))
        .add_service(ApprovalServiceServer::new(control.clone()))
        .add_service(BaselineServiceServer::new(control))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None::<Stop>);
    tokio::spawn(report_health(
        health,
        ingest_failure.clone(),
        stop_rx.clone(),
        ready.clone(),
    ));
    tokio::spawn(stop_on_signal(signals, stop_tx.clone()));
    tokio::spawn(reopen_when_writable(
        ingest_failure,
        args.data_dir.clone(),
        stop_tx,
    ));
    let stopping = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(Option::is_some).await;
            closing_tx.send_replace(true);
        }
    };
    let serving = async {
        match tls {
            Some(config) => router
                .serve_with_incoming_shutdown(tls::incoming(listener, config), stopping)
                .await
                .context("serving"),
            None => router
                .serve_with_incoming_shutdown(
                    // Without TCP_NODELAY a short answer (an ack, a one-page
                    // timeline) can wait ~40 ms for the peer's delayed ACK.
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stopping,
                )
                .await
                .context("serving"),
        }
    };
    let grace = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(Option::is_some).await;
            tokio::time::sleep(STOP_GRACE).await;
        }
    };
    tokio::select! {
        r = serving => r?,
        _ = grace => tracing::warn!("calls still open {}s after the stop was asked for; closing their connections", STOP_GRACE.as_secs()),
    }
    let stop = (*stop_rx.borrow()).unwrap_or(Stop::Exit);
    if stop == Stop::Reopen {
        tracing::warn!("restarting in place to reopen the store");
        return Ok(Stop::Reopen);
    }
    let log = store.clone();
    tokio::task::spawn_blocking(move || log.flush()).await??;
    tokio::task::spawn_blocking(move || judging.flush()).await??;
    state.flush_blocking()?;
    tracing::info!("store flushed; exiting");
    Ok(Stop::Exit)
}

/// Keeps `grpc.health.v1` and `/readyz` current: SERVING (overall and for
/// the agent stream) while the store takes writes and the collector is not
/// stopping.
async fn report_health(
    health: tonic_health::server::HealthReporter,
    mut failure: tokio::sync::watch::Receiver<Option<String>>,
    mut stop: tokio::sync::watch::Receiver<Option<Stop>>,
    ready: driftwatch_proto::ops::Ready,
) {
    const AGENTS: &str = "driftwatch.v1.AgentService";
    loop {
        let serving = stop.borrow_and_update().is_none() && failure.borrow_and_update().is_none();
        // /readyz says the same, for probes that do not speak gRPC over TLS.
        ready.set(serving);
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health.set_service_status(AGENTS, status).await;
        tokio::select! {
            r = failure.changed() => if r.is_err() { return },
            r = stop.changed() => if r.is_err() { return },
        }
    }
}

/// Asks the server to stop on SIGINT or SIGTERM.
async fn stop_on_signal(
    signals: impl std::future::Future<Output = ()>,
    stop: tokio::sync::watch::Sender<Option<Stop>>,
) {
    signals.await;
    tracing::info!("stopping");
    stop.send_replace(Some(Stop::Exit));
}

/// While the store cannot write (a full disk), checks every 2 s whether its
/// directory takes a write again, and then asks for the store to be
/// reopened. Agents are refused meanwhile and keep their events.
async fn reopen_when_writable(
    mut failure: tokio::sync::watch::Receiver<Option<String>>,
    dir: PathBuf,
    stop: tokio::sync::watch::Sender<Option<Stop>>,
) {
    loop {
        if failure.wait_for(Option::is_some).await.is_err() {
            return;
        }
        tracing::warn!(dir = %dir.display(), "the store cannot write; checking every 2 s whether its directory can be written again");
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if failure.borrow().is_none() {
                break;
            }
            let probe = dir.join(".driftwatch-space-probe");
            let writable = tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                let ok = std::fs::File::create(&probe)
                    .and_then(|mut f| {
                        f.write_all(&vec![0u8; SPACE_PROBE_BYTES])?;
                        f.sync_all()
                    })
                    .is_ok();
                let _ = std::fs::remove_file(&probe);
                ok
            })
            .await
            .unwrap_or(false);
            if writable {
                tracing::info!(dir = %dir.display(), "the store's directory can be written again");
                stop.send_replace(Some(Stop::Reopen));
                return;
            }
        }
    }
}

/// What must fit in the data directory before the store is reopened.
const SPACE_PROBE_BYTES: usize = 8 << 20;

/// The credential sources and roles the arguments name, loaded and watched.
fn auth_of(args: &Args) -> anyhow::Result<Auth> {
    let tokens = match &args.tokens {
        Some(path) => {
            let p = path.clone();
            Some(Watched::start(
                "tokens file",
                vec![path.clone()],
                move || auth::Tokens::load(&p),
            )?)
        }
        None => None,
    };
    let roles = match &args.roles {
        Some(path) => {
            let p = path.clone();
            Some(Watched::start(
                "roles file",
                vec![path.clone()],
                move || auth::Roles::load(&p),
            )?)
        }
        None => None,
    };
    let oidc = match (&args.oidc_issuer, &args.oidc_audience, &args.oidc_jwks) {
        (Some(issuer), Some(audience), Some(jwks)) => {
            let p = jwks.clone();
            Some(auth::Oidc {
                issuer: issuer.clone(),
                audience: audience.clone(),
                username_claim: args.oidc_username_claim.clone(),
                groups_claim: args.oidc_groups_claim.clone(),
                jwks: Watched::start("JWKS file", vec![jwks.clone()], move || auth::load_jwks(&p))?,
            })
        }
        _ => None,
    };
    Ok(Auth {
        tokens,
        oidc,
        roles,
        client_certs: args.client_ca.is_some(),
    })
}

/// Calls one connection may have open at once (an agent needs one, the
/// CLI a few).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Re-reads the policy on SIGHUP, and when its file changes on disk
/// (checked each second: an edit, or a ConfigMap update swapping the
/// `..data` symlink), and pushes a new version to every agent.
async fn reload_policy(policies: Policies, file: Option<PathBuf>, audit: std::sync::Arc<Audit>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let files: Vec<PathBuf> = file.into_iter().collect();
    let mut seen = driftwatch_proto::ops::stamp(&files);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Whoever could signal the collector or write its policy file
        // changed the policy: recorded as the local operator.
        let who = tokio::select! {
            r = hup.recv() => match r {
                Some(()) => "local operator (SIGHUP)",
                None => return,
            },
            _ = tick.tick(), if !files.is_empty() => {
                let now = driftwatch_proto::ops::stamp(&files);
                if now == seen {
                    continue;
                }
                "local operator (policy file changed)"
            }
        };
        seen = driftwatch_proto::ops::stamp(&files);
        let outcome = match policies.reload() {
            Ok(Some(version)) => {
                if policies.current().is_some_and(|p| p.version == version) {
                    tracing::info!(%version, by = who, "policy in force; agents are sent any new version");
                }
                format!("ok: version {version}")
            }
            Ok(None) => {
                tracing::info!("SIGHUP: no --policy file to re-read");
                continue;
            }
            Err(e) => {
                tracing::error!("policy refused, the running policy stays in force: {e}");
                format!("refused: {e}")
            }
        };
        let audit = audit.clone();
        let file = policies
            .current()
            .map(|p| p.source.to_string())
            .unwrap_or_default();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = audit.record(
                who,
                "PolicyReload",
                serde_json::json!({ "file": file }),
                &outcome,
            ) {
                tracing::error!("the audit log could not record a policy reload: {e}");
            }
        })
        .await;
    }
}

/// SIGINT and SIGTERM, caught from the moment this is called (before the
/// listener is bound, so a stop asked for as soon as the port answers is a
/// clean stop, not the signal's default death).
fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
