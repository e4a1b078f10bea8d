//! `driftwatch-collector`: stores agent events durably and serves queries.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use driftwatch_collector::{
    control::{Control, Principals},
    correlate::{self, Correlator, Settings},
    ingest::Ingest,
    policy::Policies,
    query::Query,
    store::Store,
    units,
};
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
#[derive(Debug, Parser)]
#[command(name = "driftwatch-collector", version)]
struct Args {
    /// Address to listen on (agents and the CLI).
    #[arg(long, env = "DRIFTWATCH_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory of the sled store (created if missing).
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
    /// Tokens file: one `TOKEN PRINCIPAL` per line. Callers that change
    /// findings, approvals or baselines must present one of the tokens.
    #[arg(long, env = "DRIFTWATCH_TOKENS", value_name = "FILE")]
    tokens: Option<PathBuf>,
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("driftwatch-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let store = Store::open(&args.data_dir)
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    // Agents whose stream was open when the collector stopped are not connected now.
    for mut a in store.agents()? {
        if a.connected {
            a.connected = false;
            store.put_agent(&a)?;
        }
    }
    tracing::info!(blocks = store.block_count(), dir = %args.data_dir.display(), "store opened");
    let policies = Policies::open(args.policy.clone())?;
    match policies.current() {
        Some(p) => {
            tracing::info!(file = %p.source, version = %p.version, resources = p.policy.resources.len(), "policy loaded")
        }
        None => tracing::warn!(
            "no --policy: agents keep their own, and writes and connects are not judged"
        ),
    }
    let principals = match &args.tokens {
        Some(path) => Principals::load(path)?,
        None => {
            tracing::warn!("no --tokens: findings, approvals and baselines cannot be changed");
            Principals::none()
        }
    };
    let correlator = std::sync::Arc::new(Correlator::open(
        store.clone(),
        policies.clone(),
        Settings {
            learn: !args.no_learn,
            silent_after: args.silent_after,
        },
    )?);
    let judged = correlator.recover()?;
    if judged > 0 {
        tracing::info!(events = judged, "judged events stored before the last stop");
    }
    correlate::spawn_silence_check(correlator.clone());
    tokio::spawn(reload_on_hangup(policies.clone()));
    let ingest = Ingest::new(store.clone(), correlator.clone());
    let control = Control::new(correlator.clone(), ingest.clone(), principals);
    let query = Query::new(store.clone(), ingest.stored.clone());

    let retention_store = store.clone();
    let (age, size) = (args.retention_age, args.retention_size);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let min_time =
                now_unix_nanos().saturating_sub(i64::try_from(age.as_nanos()).unwrap_or(i64::MAX));
            match retention_store.retain(min_time, size) {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "retention removed old events"),
                Err(e) => tracing::error!("retention failed: {e}"),
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "collector listening");
    let max = args.max_message_size as usize;
    tonic::transport::Server::builder()
        .layer(tower::util::MapResponseLayer::new(
            driftwatch_collector::statuses::conventional,
        ))
        .add_service(AgentServiceServer::new(ingest).max_decoding_message_size(max))
        .add_service(QueryServiceServer::new(query))
        .add_service(FindingServiceServer::new(control.clone()))
        .add_service(ApprovalServiceServer::new(control.clone()))
        .add_service(BaselineServiceServer::new(control))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a short answer (an ack, a one-page
            // timeline) can wait ~40 ms for the peer's delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown(),
        )
        .await
        .context("serving")?;
    store.flush().await?;
    tracing::info!("store flushed; exiting");
    Ok(())
}

async fn reload_on_hangup(policies: Policies) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match policies.reload() {
            Ok(Some(version)) => {
                tracing::info!(%version, "policy reloaded; agents are sent the new version")
            }
            Ok(None) => tracing::info!("SIGHUP: no --policy file to re-read"),
            Err(e) => tracing::error!("policy refused, the running policy stays in force: {e}"),
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}
