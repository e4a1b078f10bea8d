//! Exports for the tools teams already run: findings (and, when asked,
//! events) as rotated JSON Lines files and as OpenTelemetry log records
//! (OTLP/HTTP, JSON encoding), in the JSON shape `driftwatch -o json`
//! prints ([`crate::json`]).
//!
//! Findings are read from the judging change log by cursor: every change
//! of a finding (opened, seen again, acknowledged, resolved) is one record,
//! carrying its `cursor`. Each sink keeps its own cursor in the data
//! directory (`export-cursors.json`), saved after what it wrote is on disk
//! or acknowledged, so a restart resumes where the sink stopped: at least
//! once, and a repeat after a crash carries the same cursor, for consumers
//! to drop. An OTLP endpoint that is down holds its cursor and is retried
//! with backoff; the files do not wait for it.
//!
//! Events (`--export-events`) are taken as they are stored. The export
//! keeps up with the store's live feed; if it falls behind by more than
//! the feed holds, a `gap` record says how many it missed (they stay in
//! the store: `driftwatch timeline` reads them).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::{
    correlate::Correlator,
    json as shape,
    notify::{https_client, post, Client},
};

/// Finding changes read per turn.
const PAGE: usize = 256;
/// Longest wait between two tries of a failing OTLP endpoint.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What to export, and where.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Directory of the JSON Lines files.
    pub dir: Option<PathBuf>,
    /// Also export events.
    pub events: bool,
    /// Rotate a file once it would grow past this.
    pub max_bytes: u64,
    /// Rotated files kept (`findings.jsonl.1` … `.N`).
    pub keep: usize,
    /// OTLP/HTTP logs endpoint (`http://host:4318/v1/logs`).
    pub otlp: Option<String>,
}

impl Config {
    /// True when nothing is exported.
    pub fn is_empty(&self) -> bool {
        self.dir.is_none() && self.otlp.is_none()
    }
}

/// A JSON Lines file rotated by size.
pub struct Rotating {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl Rotating {
    /// Opens (appends to) `dir/name`.
    pub fn open(dir: &Path, name: &str, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            file: std::io::BufWriter::with_capacity(64 << 10, file),
            size,
            max_bytes,
            keep,
        })
    }

    /// Appends one record (a line), rotating first when it would not fit.
    pub fn write(&mut self, v: &Value) -> std::io::Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        let len = line.len() as u64;
        if self.max_bytes > 0 && self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += len;
        Ok(())
    }

    /// Puts what was written on disk.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()
    }

    /// `name` → `name.1` → `name.2` …, the oldest beyond `keep` removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.sync()?;
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = std::io::BufWriter::with_capacity(64 << 10, file);
        self.size = 0;
        tracing::debug!(path = %self.path.display(), "export file rotated");
        Ok(())
    }
}

/// The sinks' cursors, in the data directory.
struct Cursors {
    path: PathBuf,
    at: BTreeMap<String, u64>,
}

impl Cursors {
    fn open(data_dir: &Path) -> Self {
        let path = data_dir.join("export-cursors.json");
        let at = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { path, at }
    }

    fn get(&self, sink: &str) -> u64 {
        self.at.get(sink).copied().unwrap_or(0)
    }

    /// Saves `cursor` for `sink` (written aside, then renamed into place).
    fn set(&mut self, sink: &str, cursor: u64) -> std::io::Result<()> {
        self.at.insert(sink.to_owned(), cursor);
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(&self.at)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// A finding change as exported: the CLI's finding, with the cursor.
pub fn finding_record(cursor: u64, f: &driftwatch_proto::v1::Finding) -> Value {
    let mut v = shape::finding(f);
    v["type"] = json!("finding");
    v["cursor"] = json!(cursor);
    v
}

/// OTLP severity of a finding.
fn severity(s: &str) -> (u32, &'static str) {
    match s {
        "critical" => (21, "FATAL"),
        "high" => (17, "ERROR"),
        "medium" => (13, "WARN"),
        _ => (9, "INFO"),
    }
}

/// One OTLP log record for `v` (a finding or an event record).
fn log_record(v: &Value, time_nanos: i64) -> Value {
    let attr = |k: &str, val: &Value| json!({"key": k, "value": {"stringValue": val.as_str().map_or_else(|| val.to_string(), str::to_owned)}});
    let mut attributes = vec![attr("driftwatch.type", &v["type"])];
    let (number, text) = if v["type"] == "finding" {
        for k in ["kind", "status", "host", "resource", "path", "severity"] {
            if !v[k].is_null() {
                attributes.push(attr(&format!("driftwatch.{k}"), &v[k]));
            }
        }
        severity(v["severity"].as_str().unwrap_or(""))
    } else {
        for k in ["kind", "node"] {
            if !v[k].is_null() {
                attributes.push(attr(&format!("driftwatch.{k}"), &v[k]));
            }
        }
        (9, "INFO")
    };
    json!({
        "timeUnixNano": time_nanos.to_string(),
        "observedTimeUnixNano": driftwatch_proto::time::now_unix_nanos().to_string(),
        "severityNumber": number,
        "severityText": text,
        "body": {"stringValue": v.to_string()},
        "attributes": attributes,
    })
}

/// The OTLP/HTTP JSON request carrying `records`.
pub fn otlp_request(records: Vec<Value>) -> Value {
    json!({"resourceLogs": [{
        "resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "driftwatch-collector"}},
            {"key": "service.version", "value": {"stringValue": env!("CARGO_PKG_VERSION")}},
        ]},
        "scopeLogs": [{"scope": {"name": "driftwatch"}, "logRecords": records}],
    }]})
}

/// Starts the exports `config` asks for.
pub fn spawn(
    config: Config,
    data_dir: &Path,
    correlator: Arc<Correlator>,
    stored: &broadcast::Sender<driftwatch_proto::v1::Event>,
) -> anyhow::Result<()> {
    if config.is_empty() {
        return Ok(());
    }
    let cursors = Arc::new(std::sync::Mutex::new(Cursors::open(data_dir)));
    if let Some(dir) = &config.dir {
        let findings = Rotating::open(dir, "findings.jsonl", config.max_bytes, config.keep)
            .map_err(|e| {
                anyhow::anyhow!("{}: cannot open the findings export: {e}", dir.display())
            })?;
        tokio::spawn(follow_findings(
            findings,
            correlator.clone(),
            cursors.clone(),
        ));
        if config.events {
            let events = Rotating::open(dir, "events.jsonl", config.max_bytes, config.keep)
                .map_err(|e| {
                    anyhow::anyhow!("{}: cannot open the events export: {e}", dir.display())
                })?;
            tokio::spawn(events_to_file(events, stored.subscribe()));
        }
        tracing::info!(dir = %dir.display(), events = config.events, max_bytes = config.max_bytes, keep = config.keep, "exporting to JSON Lines files");
    }
    if let Some(url) = &config.otlp {
        let client =
            https_client().map_err(|e| anyhow::anyhow!("the OTLP export cannot start: {e}"))?;
        let sink = Otlp {
            client: client.clone(),
            url: url.clone(),
        };
        tokio::spawn(follow_findings(sink, correlator, cursors));
        if config.events {
            tokio::spawn(events_to_otlp(client, url.clone(), stored.subscribe()));
        }
        tracing::info!(%url, events = config.events, "exporting to an OTLP logs endpoint");
    }
    Ok(())
}

/// The finding changes after `cursor`, read off the async runtime.
async fn page(
    correlator: &Arc<Correlator>,
    cursor: u64,
) -> Result<Vec<(u64, driftwatch_proto::v1::Finding)>, String> {
    let c = correlator.clone();
    tokio::task::spawn_blocking(move || c.with_tx(|tx| tx.changes_after(cursor, PAGE)))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Where finding changes go: a file or an endpoint.
trait FindingSink {
    /// Its name for the cursor file and the logs.
    const NAME: &'static str;
    /// Delivers `records` (finding changes with their cursors) durably:
    /// written and synced, or acknowledged.
    async fn deliver(&mut self, records: Vec<(u64, Value)>) -> Result<(), String>;
}

impl FindingSink for Rotating {
    const NAME: &'static str = "file_findings";

    async fn deliver(&mut self, records: Vec<(u64, Value)>) -> Result<(), String> {
        for (_, v) in &records {
            self.write(v).map_err(|e| e.to_string())?;
        }
        self.sync().map_err(|e| e.to_string())
    }
}

/// An OTLP/HTTP logs endpoint.
struct Otlp {
    client: Client,
    url: String,
}

impl FindingSink for Otlp {
    const NAME: &'static str = "otlp_findings";

    async fn deliver(&mut self, records: Vec<(u64, Value)>) -> Result<(), String> {
        let logs = records
            .iter()
            .map(|(_, v)| {
                let t = v["last_seen"]
                    .as_str()
                    .and_then(|t| driftwatch_proto::time::parse_rfc3339(t).ok())
                    .unwrap_or_else(driftwatch_proto::time::now_unix_nanos);
                log_record(v, t)
            })
            .collect();
        post(&self.client, &self.url, &otlp_request(logs)).await
    }
}

/// Delivers every finding change after the sink's cursor, as they come;
/// a failed delivery keeps the cursor and is tried again with backoff.
async fn follow_findings<S: FindingSink>(
    mut sink: S,
    correlator: Arc<Correlator>,
    cursors: Arc<std::sync::Mutex<Cursors>>,
) {
    let mut changed = correlator.judging().changes();
    let mut cursor = cursors.lock().map(|c| c.get(S::NAME)).unwrap_or(0);
    let mut backoff = Duration::from_secs(1);
    loop {
        let page = match page(&correlator, cursor).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    sink = S::NAME,
                    "reading finding changes for the export: {e}"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !page.is_empty() {
            let full = page.len() == PAGE;
            let last = page.last().map_or(cursor, |(at, _)| *at);
            let records = page
                .into_iter()
                .map(|(at, f)| (at, finding_record(at, &crate::control::public(f))))
                .collect();
            match sink.deliver(records).await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    cursor = last;
                    if let Ok(mut c) = cursors.lock() {
                        if let Err(e) = c.set(S::NAME, cursor) {
                            tracing::warn!(
                                sink = S::NAME,
                                "the export's cursor could not be saved: {e}"
                            );
                        }
                    }
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(sink = S::NAME, retry_in = ?backoff, "finding changes could not be exported: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The next stored events (at least one, up to `most`), or a gap record
/// when the feed moved on without us; `None` when the feed ended.
async fn next_events(
    rx: &mut broadcast::Receiver<driftwatch_proto::v1::Event>,
    most: usize,
) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    loop {
        let got = if out.is_empty() {
            rx.recv().await
        } else {
            match rx.try_recv() {
                Ok(e) => Ok(e),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(_) => return Some(out),
            }
        };
        match got {
            Ok(e) => out.push(shape::event(&e)),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "the events export fell behind the store; the missed events stay in the store"
                );
                out.push(json!({
                    "type": "gap", "reason": "export_lagged", "missed": n,
                    "detail": "the export fell behind; the events are in the store (driftwatch timeline)",
                    "time": shape::time(driftwatch_proto::time::now_unix_nanos()),
                }));
            }
            Err(broadcast::error::RecvError::Closed) => {
                return (!out.is_empty()).then_some(out);
            }
        }
        if out.len() >= most {
            return Some(out);
        }
    }
}

async fn events_to_file(
    mut file: Rotating,
    mut rx: broadcast::Receiver<driftwatch_proto::v1::Event>,
) {
    while let Some(batch) = next_events(&mut rx, 4096).await {
        for v in &batch {
            if let Err(e) = file.write(v) {
                tracing::error!("the events export could not be written: {e}");
            }
        }
        if let Err(e) = file.sync() {
            tracing::error!("the events export could not be written: {e}");
        }
    }
}

async fn events_to_otlp(
    client: Client,
    url: String,
    mut rx: broadcast::Receiver<driftwatch_proto::v1::Event>,
) {
    while let Some(batch) = next_events(&mut rx, 1024).await {
        let now = driftwatch_proto::time::now_unix_nanos();
        let records: Vec<Value> = batch
            .iter()
            .map(|v| {
                let t = v["time"]
                    .as_str()
                    .and_then(|t| driftwatch_proto::time::parse_rfc3339(t).ok())
                    .unwrap_or(now);
                log_record(v, t)
            })
            .collect();
        if let Err(e) = post(&client, &url, &otlp_request(records)).await {
            // Events are not held for a failing endpoint (the store has
            // them); finding changes are.
            tracing::warn!(%url, events = batch.len(), "the OTLP logs endpoint refused events: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_rotate_by_size_and_keep_so_many() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = Rotating::open(dir.path(), "x.jsonl", 200, 2).expect("open");
        for i in 0..40 {
            f.write(&json!({"i": i, "pad": "................"}))
                .expect("write");
        }
        f.sync().expect("sync");
        let size = |n: &str| std::fs::metadata(dir.path().join(n)).map(|m| m.len());
        assert!(size("x.jsonl").expect("current") <= 200);
        assert!(size("x.jsonl.1").expect("first rotated") <= 200);
        assert!(size("x.jsonl.2").is_ok());
        assert!(size("x.jsonl.3").is_err(), "only two kept");
        // The newest record is last in the current file.
        let text = std::fs::read_to_string(dir.path().join("x.jsonl")).expect("read");
        assert!(
            text.lines().last().is_some_and(|l| l.contains("\"i\":39")),
            "{text}"
        );
    }

    #[test]
    fn cursors_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cursors::open(dir.path());
        assert_eq!(c.get("a"), 0);
        c.set("a", 42).expect("save");
        assert_eq!(Cursors::open(dir.path()).get("a"), 42);
    }

    #[test]
    fn an_otlp_record_carries_the_finding_as_the_cli_shows_it() {
        let f = driftwatch_proto::v1::Finding {
            id: 7,
            kind: "drift".into(),
            severity: "high".into(),
            node: "n1".into(),
            ..Default::default()
        };
        let rec = log_record(&finding_record(3, &f), 5);
        assert_eq!(rec["severityText"], "ERROR");
        let body: Value =
            serde_json::from_str(rec["body"]["stringValue"].as_str().expect("a string"))
                .expect("JSON");
        assert_eq!(body["id"], 7);
        assert_eq!(body["cursor"], 3);
        assert_eq!(body["host"], "n1");
        let req = otlp_request(vec![rec]);
        assert_eq!(
            req["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["timeUnixNano"],
            "5"
        );
    }
}
