//! What an operator runs both daemons with: logs in the format a cluster
//! collects, and a `/metrics`, `/healthz`, `/readyz` endpoint.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use prometheus_client::{encoding::text::encode, registry::Registry};

/// What tells a file changed: (modification time, size, inode) of each
/// path, following symlinks, so that a Kubernetes ConfigMap or Secret
/// update (a `..data` symlink swapped to a new directory) is seen as one.
pub type Stamp = Vec<Option<(std::time::SystemTime, u64, u64)>>;

/// The [`Stamp`] of `paths` now (`None` for a path that does not stat).
pub fn stamp(paths: &[std::path::PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (time, level, target, message, fields),
    /// for a cluster's log collector.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

/// Installs the global subscriber. An invalid filter is an error naming
/// it, not a silent fall-back.
pub fn init_logging(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| format!("log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (the reader of standard error
        // went away) is dropped: reporting it would print to that same
        // standard error, which panics, and a panic in the task that logs
        // "stopping" left the daemon deaf to SIGTERM.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            // Colour only for a person at a terminal, never into a file.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

/// Whether the daemon is ready to do its job (store open, sensors
/// attached): `/readyz` answers 200 only then.
#[derive(Clone, Default)]
pub struct Ready(Arc<AtomicBool>);

impl Ready {
    /// Marks the daemon ready, or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether it is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` (OpenMetrics text from `registry`, with `refresh`
/// run first to sample gauges), `/healthz` (the process answers) and
/// `/readyz` (`ready`), until the process exits, on a thread and runtime of
/// its own: probes and scrapes are answered while the daemon's own loop is
/// busy (attaching programs, draining a burst). Binding is done before it
/// returns, so a port in use is an error here.
pub fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    refresh: Arc<dyn Fn() + Send + Sync>,
    ready: Ready,
) -> Result<SocketAddr, String> {
    use axum::{http::header::CONTENT_TYPE, http::StatusCode, routing::get, Router};
    let metrics = move || {
        let registry = registry.clone();
        let refresh = refresh.clone();
        async move {
            refresh();
            let mut body = String::new();
            match encode(&mut body, &registry) {
                Ok(()) => (StatusCode::OK, [(CONTENT_TYPE, OPENMETRICS)], body),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(CONTENT_TYPE, "text/plain")],
                    format!("encoding the metrics: {e}\n"),
                ),
            }
        }
    };
    let readyz = move || {
        let ready = ready.clone();
        async move {
            if ready.get() {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("the metrics endpoint's runtime: {e}");
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("the metrics listener: {e}");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!("the metrics endpoint stopped: {e}");
                }
            });
        })
        .map_err(|e| format!("starting the metrics thread: {e}"))?;
    Ok(bound)
}
