//! Notifications: telling a human where they work, at the moment it
//! matters — an approval asked for (with the command that decides it), an
//! approval decided, a new finding above a severity, an action a guardrail
//! blocked.
//!
//! Destinations come from a YAML file (`--notify FILE`), each a webhook in
//! one of three payload shapes: `json` (the notice as a JSON object),
//! `slack` (an incoming-webhook message with blocks) or `teams` (an
//! incoming-webhook message carrying an Adaptive Card), with filters on
//! what is sent. A notice is rendered once per matching destination and
//! put in the store's `notify_queue` tree before anything is sent, so
//! judging never waits on a webhook and a collector restart loses nothing;
//! a sender delivers the queue in order per destination, retrying failures
//! with exponential backoff (1 s doubling to 5 min) and logging each.
//! Delivered entries are removed; an entry refused [`MAX_ATTEMPTS`] times
//! moves to `notify_dead` with its last error.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::store::{sled_store::SledStore as Store, StoreError};

/// Deliveries tried per entry before it is set aside.
pub const MAX_ATTEMPTS: u32 = 30;
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A webhook that does not answer in this long has failed this try.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A payload shape.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The notice as a JSON object.
    #[default]
    Json,
    /// Slack incoming webhook.
    Slack,
    /// Microsoft Teams incoming webhook (Adaptive Card).
    Teams,
}

/// What a notice is about.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    /// Someone asked for a change or an access.
    ApprovalRequested,
    /// Someone approved or denied one.
    ApprovalDecided,
    /// A new finding (at or above the destination's severity).
    Finding,
    /// A guardrail refused an action (a `blocked` finding opened).
    Blocked,
}

impl Topic {
    fn as_str(self) -> &'static str {
        match self {
            Self::ApprovalRequested => "approval_requested",
            Self::ApprovalDecided => "approval_decided",
            Self::Finding => "finding",
            Self::Blocked => "blocked",
        }
    }
}

/// One destination.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Destination {
    /// Unique name (logs and metrics name it; the URL may hold a secret).
    pub name: String,
    /// Where to POST.
    pub url: String,
    /// Payload shape.
    #[serde(default)]
    pub format: Format,
    /// What to send (all when empty).
    #[serde(default)]
    pub topics: Vec<Topic>,
    /// Only notices about these resources (any when empty).
    #[serde(default)]
    pub resources: Vec<String>,
    /// Only findings of these kinds (any when empty).
    #[serde(default)]
    pub finding_kinds: Vec<String>,
    /// Only findings at or above this severity.
    #[serde(default)]
    pub min_severity: Option<String>,
}

/// The `--notify` file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The destinations.
    #[serde(default)]
    pub destinations: Vec<Destination>,
}

impl Config {
    /// Reads and checks the file; errors name the file and the field.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let c: Self =
            serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut names = std::collections::HashSet::new();
        for (i, d) in c.destinations.iter().enumerate() {
            let at = |f: &str| format!("{}: destinations[{i}].{f}", path.display());
            if d.name.trim().is_empty() || !names.insert(d.name.clone()) {
                return Err(format!("{}: must be a unique, non-empty name", at("name")));
            }
            let uri: hyper::Uri = d
                .url
                .parse()
                .map_err(|e| format!("{}: not a URL: {e}", at("url")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!("{}: must be an http:// or https:// URL", at("url")));
            }
            if let Some(s) = &d.min_severity {
                if !crate::correlate::findings::SEVERITIES.contains(&s.as_str()) {
                    return Err(format!(
                        "{}: {s:?} is not one of {}",
                        at("minSeverity"),
                        crate::correlate::findings::SEVERITIES.join(", ")
                    ));
                }
            }
        }
        Ok(c)
    }
}

/// Something to tell people.
#[derive(Clone, Debug, Default)]
pub struct Notice {
    /// What it is about.
    pub topic: Option<Topic>,
    /// One line.
    pub title: String,
    /// What happened, in a sentence or two.
    pub text: String,
    /// Policy resource, when there is one.
    pub resource: String,
    /// Finding severity, for findings.
    pub severity: String,
    /// Finding kind, for findings.
    pub finding_kind: String,
    /// Name → value pairs shown as facts.
    pub facts: Vec<(String, String)>,
    /// Commands that act on it (approve, deny).
    pub commands: Vec<String>,
    /// The whole object (the finding or the approval), for `json`.
    pub data: Value,
}

impl Notice {
    fn wanted_by(&self, d: &Destination) -> bool {
        let Some(topic) = self.topic else {
            return false;
        };
        let topic_ok = d.topics.is_empty()
            || d.topics.contains(&topic)
            // A blocked action is also a finding.
            || (topic == Topic::Blocked && d.topics.contains(&Topic::Finding));
        let resource_ok = d.resources.is_empty() || d.resources.contains(&self.resource);
        let finding = matches!(topic, Topic::Finding | Topic::Blocked);
        let kind_ok =
            !finding || d.finding_kinds.is_empty() || d.finding_kinds.contains(&self.finding_kind);
        let severity_ok = !finding
            || d.min_severity.as_deref().is_none_or(|m| {
                crate::correlate::findings::severity_rank(&self.severity)
                    >= crate::correlate::findings::severity_rank(m)
            });
        topic_ok && resource_ok && kind_ok && severity_ok
    }

    /// The body for a destination of `format`.
    pub fn render(&self, format: Format) -> Value {
        let topic = self.topic.map_or("", Topic::as_str);
        match format {
            Format::Json => json!({
                "type": topic,
                "title": self.title,
                "text": self.text,
                "resource": self.resource,
                "severity": self.severity,
                "facts": self.facts.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
                "commands": self.commands,
                "data": self.data,
            }),
            Format::Slack => {
                let mut blocks = vec![
                    json!({"type": "header", "text": {"type": "plain_text", "text": self.title}}),
                    json!({"type": "section", "text": {"type": "mrkdwn", "text": self.text}}),
                ];
                if !self.facts.is_empty() {
                    blocks.push(json!({"type": "section", "fields": self.facts.iter().map(|(k, v)| json!({"type": "mrkdwn", "text": format!("*{k}*\n{v}")})).collect::<Vec<_>>()}));
                }
                if !self.commands.is_empty() {
                    let cmds: Vec<String> =
                        self.commands.iter().map(|c| format!("`{c}`")).collect();
                    blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": cmds.join("\n")}}));
                }
                json!({"text": format!("{}: {}", self.title, self.text), "blocks": blocks})
            }
            Format::Teams => {
                let mut body = vec![
                    json!({"type": "TextBlock", "text": self.title, "weight": "Bolder", "size": "Medium", "wrap": true}),
                    json!({"type": "TextBlock", "text": self.text, "wrap": true}),
                ];
                if !self.facts.is_empty() {
                    body.push(json!({"type": "FactSet", "facts": self.facts.iter().map(|(k, v)| json!({"title": k, "value": v})).collect::<Vec<_>>()}));
                }
                for c in &self.commands {
                    body.push(json!({"type": "TextBlock", "text": c, "fontType": "Monospace", "wrap": true}));
                }
                json!({
                    "type": "message",
                    "attachments": [{
                        "contentType": "application/vnd.microsoft.card.adaptive",
                        "content": {
                            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                            "type": "AdaptiveCard",
                            "version": "1.4",
                            "body": body,
                        }
                    }]
                })
            }
        }
    }
}

/// One queued delivery.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    destination: String,
    body: Value,
    attempts: u32,
    next_at_unix_nanos: i64,
    created_unix_nanos: i64,
    #[serde(default)]
    last_error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dest {
    destination: String,
}

/// Delivery counters.
#[derive(Clone, Default)]
struct Counters {
    delivered: Family<Dest, Counter>,
    failed: Family<Dest, Counter>,
    given_up: Family<Dest, Counter>,
    queued: Gauge,
}

/// The notifier: enqueue from anywhere (a store write and a wake-up), a
/// sender task delivers.
pub struct Notifier {
    config: Config,
    queue: sled::Tree,
    dead: sled::Tree,
    wake: tokio::sync::Notify,
    counters: Counters,
    /// The next queue key.
    next: std::sync::atomic::AtomicU64,
}

/// An HTTP(S) client for webhooks and OTLP endpoints.
pub(crate) type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// A client trusting the system's roots, for `http://` and `https://`.
pub(crate) fn https_client() -> Result<Client, String> {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?;
    let https = b.https_or_http().enable_http1().build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

impl Notifier {
    /// A notifier over `store` for `config`.
    pub fn open(store: &Store, config: Config) -> Result<Arc<Self>, StoreError> {
        let queue = store.tree("notify_queue")?;
        let next = match queue.last()? {
            Some((k, _)) => <[u8; 8]>::try_from(&*k).map_or(0, u64::from_be_bytes) + 1,
            None => 1,
        };
        let n = Self {
            next: std::sync::atomic::AtomicU64::new(next),
            config,
            queue,
            dead: store.tree("notify_dead")?,
            wake: tokio::sync::Notify::new(),
            counters: Counters::default(),
        };
        n.counters.queued.set(n.queue.len() as i64);
        Ok(Arc::new(n))
    }

    /// Registers the delivery metrics.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "notifications_delivered",
            "Notifications a webhook accepted (2xx), by destination",
            self.counters.delivered.clone(),
        );
        r.register(
            "notifications_failed",
            "Delivery tries that failed (retried with backoff), by destination",
            self.counters.failed.clone(),
        );
        r.register(
            "notifications_given_up",
            "Notifications set aside after every try failed, by destination",
            self.counters.given_up.clone(),
        );
        r.register(
            "notifications_queued",
            "Notifications waiting for delivery (kept in the store)",
            self.counters.queued.clone(),
        );
    }

    /// Queues `notice` for every destination that wants it. Never waits on
    /// the network; a store error is logged (the notice is lost, the
    /// judgement that caused it is not).
    pub fn notify(&self, notice: &Notice) {
        let now = driftwatch_proto::time::now_unix_nanos();
        for d in self
            .config
            .destinations
            .iter()
            .filter(|d| notice.wanted_by(d))
        {
            let e = Entry {
                destination: d.name.clone(),
                body: notice.render(d.format),
                attempts: 0,
                next_at_unix_nanos: now,
                created_unix_nanos: now,
                last_error: String::new(),
            };
            let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bytes = serde_json::to_vec(&e).unwrap_or_default();
            match self.queue.insert(id.to_be_bytes(), bytes) {
                Ok(_) => {
                    self.counters.queued.inc();
                }
                Err(err) => {
                    tracing::error!(destination = %d.name, "a notification could not be queued: {err}");
                }
            }
        }
        self.wake.notify_one();
    }

    /// Delivers the queue until the process ends.
    pub fn spawn(self: &Arc<Self>) {
        if self.config.destinations.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let client = match https_client() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(
                        "webhook deliveries cannot start ({e}); notifications stay queued"
                    );
                    return;
                }
            };
            loop {
                let next = me.deliver_due(&client).await;
                let wait = next
                    .unwrap_or(Duration::from_secs(5))
                    .min(Duration::from_secs(5));
                tokio::select! {
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
    }

    /// Tries every entry that is due; returns how long until the next one.
    async fn deliver_due(&self, client: &Client) -> Option<Duration> {
        let now = driftwatch_proto::time::now_unix_nanos();
        let mut soonest: Option<i64> = None;
        // Per destination, in queue order: a destination that fails holds
        // its later entries back (they are not sent out of order).
        let mut blocked: BTreeMap<String, ()> = BTreeMap::new();
        let entries: Vec<(sled::IVec, sled::IVec)> = self.queue.iter().flatten().collect();
        for (key, value) in entries {
            let Ok(mut e) = serde_json::from_slice::<Entry>(&value) else {
                tracing::warn!("an unreadable notification entry was dropped");
                let _ = self.queue.remove(&key);
                continue;
            };
            if blocked.contains_key(&e.destination) {
                continue;
            }
            if e.next_at_unix_nanos > now {
                blocked.insert(e.destination.clone(), ());
                soonest =
                    Some(soonest.map_or(e.next_at_unix_nanos, |s| s.min(e.next_at_unix_nanos)));
                continue;
            }
            let Some(d) = self
                .config
                .destinations
                .iter()
                .find(|d| d.name == e.destination)
            else {
                tracing::warn!(destination = %e.destination, "a queued notification for a destination no longer configured was dropped");
                let _ = self.queue.remove(&key);
                self.counters.queued.dec();
                continue;
            };
            let label = Dest {
                destination: d.name.clone(),
            };
            match post(client, &d.url, &e.body).await {
                Ok(()) => {
                    let _ = self.queue.remove(&key);
                    self.counters.queued.dec();
                    self.counters.delivered.get_or_create(&label).inc();
                    tracing::debug!(destination = %d.name, "notification delivered");
                }
                Err(err) => {
                    e.attempts += 1;
                    e.last_error = err.clone();
                    self.counters.failed.get_or_create(&label).inc();
                    if e.attempts >= MAX_ATTEMPTS {
                        tracing::error!(destination = %d.name, attempts = e.attempts, "a notification was refused every time and is set aside in notify_dead: {err}");
                        let _ = self
                            .dead
                            .insert(&key, serde_json::to_vec(&e).unwrap_or_default());
                        let _ = self.queue.remove(&key);
                        self.counters.queued.dec();
                        self.counters.given_up.get_or_create(&label).inc();
                        continue;
                    }
                    let backoff =
                        Duration::from_secs(1u64 << (e.attempts - 1).min(9)).min(MAX_BACKOFF);
                    e.next_at_unix_nanos = now + backoff.as_nanos() as i64;
                    tracing::warn!(destination = %d.name, attempt = e.attempts, retry_in = ?backoff, "a notification was not delivered: {err}");
                    let _ = self
                        .queue
                        .insert(&key, serde_json::to_vec(&e).unwrap_or_default());
                    blocked.insert(e.destination.clone(), ());
                    soonest =
                        Some(soonest.map_or(e.next_at_unix_nanos, |s| s.min(e.next_at_unix_nanos)));
                }
            }
        }
        let _ = self.queue.flush_async().await;
        soonest.map(|t| Duration::from_nanos(t.saturating_sub(now).max(0) as u64))
    }
}

/// POSTs `body` as JSON to `url`; an answer other than 2xx, or none
/// within 10 s, is an error.
pub(crate) async fn post(client: &Client, url: &str, body: &Value) -> Result<(), String> {
    let req = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = tokio::time::timeout(TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("no answer in {TIMEOUT:?}"))?
        .map_err(|e| format!("{e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the endpoint answered {}", resp.status()))
    }
}

/// The notice for a new finding.
pub fn finding_notice(f: &driftwatch_proto::v1::Finding) -> Notice {
    let blocked = f.kind == "blocked";
    let who = f
        .actor
        .as_ref()
        .map(|p| {
            if p.user.is_empty() {
                format!("uid {} ({})", p.uid, p.exe)
            } else {
                format!("{} ({})", p.user, p.exe)
            }
        })
        .unwrap_or_default();
    let mut facts = vec![
        ("host".to_owned(), f.node.clone()),
        ("resource".to_owned(), f.resource.clone()),
        ("severity".to_owned(), f.severity.clone()),
    ];
    if !who.is_empty() {
        facts.push(("who".into(), who));
    }
    if !f.path.is_empty() {
        facts.push(("path".into(), f.path.clone()));
    }
    if !f.address.is_empty() {
        facts.push(("destination".into(), format!("{}:{}", f.address, f.port)));
    }
    Notice {
        topic: Some(if blocked {
            Topic::Blocked
        } else {
            Topic::Finding
        }),
        title: format!("{} finding {} ({}) on {}", f.severity, f.id, f.kind, f.node),
        text: f.summary.clone(),
        resource: f.resource.clone(),
        severity: f.severity.clone(),
        finding_kind: f.kind.clone(),
        facts,
        commands: vec![
            format!("driftwatch findings show {}", f.id),
            format!("driftwatch findings ack {}", f.id),
        ],
        data: json!({
            "id": f.id, "kind": f.kind, "node": f.node, "resource": f.resource,
            "path": f.path, "summary": f.summary, "severity": f.severity,
            "address": f.address, "port": f.port, "count": f.count,
        }),
    }
}

/// The notice for an approval asked for or decided.
pub fn approval_notice(a: &driftwatch_proto::v1::Approval, decided: bool) -> Notice {
    let access = a.kind == "access";
    let what = if access {
        format!(
            "access to {} for {} ({}s)",
            a.resource, a.who, a.window_seconds
        )
    } else {
        format!("a change of {} on {}", a.resource, a.host)
    };
    let (title, text, commands) = if decided {
        (
            format!("approval {} {}", a.id, a.status),
            format!(
                "{} {} {what} asked by {}",
                a.approver, a.status, a.requester
            ),
            vec![format!("driftwatch approvals show {}", a.id)],
        )
    } else {
        (
            format!("approval {} requested", a.id),
            format!("{} asks for {what}: {}", a.requester, a.reason),
            vec![
                format!("driftwatch approvals approve {}", a.id),
                format!("driftwatch approvals deny {}", a.id),
            ],
        )
    };
    let mut facts = vec![
        (
            "kind".to_owned(),
            if access { "access" } else { "change" }.to_owned(),
        ),
        ("resource".to_owned(), a.resource.clone()),
        ("requester".to_owned(), a.requester.clone()),
        ("reason".to_owned(), a.reason.clone()),
    ];
    if access {
        facts.push(("who".into(), a.who.clone()));
    }
    if decided {
        facts.push(("approver".into(), a.approver.clone()));
    }
    Notice {
        topic: Some(if decided {
            Topic::ApprovalDecided
        } else {
            Topic::ApprovalRequested
        }),
        title,
        text,
        resource: a.resource.clone(),
        facts,
        commands,
        data: json!({
            "id": a.id, "kind": if access { "access" } else { "change" }, "resource": a.resource,
            "who": a.who, "host": a.host, "reason": a.reason, "requester": a.requester,
            "status": a.status, "approver": a.approver, "window_seconds": a.window_seconds,
            "valid_until_unix_nanos": a.valid_until_unix_nanos,
        }),
        ..Notice::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(yaml: &str) -> Destination {
        serde_norway::from_str(yaml).expect("a destination")
    }

    #[test]
    fn filters_pick_topics_resources_kinds_and_severities() {
        let f = driftwatch_proto::v1::Finding {
            id: 3,
            kind: "blocked".into(),
            resource: "postgres".into(),
            severity: "high".into(),
            ..Default::default()
        };
        let n = finding_notice(&f);
        assert!(n.wanted_by(&dest("{name: a, url: 'http://x/'}")));
        assert!(n.wanted_by(&dest("{name: a, url: 'http://x/', topics: [finding]}")));
        assert!(!n.wanted_by(&dest(
            "{name: a, url: 'http://x/', topics: [approval_requested]}"
        )));
        assert!(!n.wanted_by(&dest("{name: a, url: 'http://x/', resources: [other]}")));
        assert!(!n.wanted_by(&dest("{name: a, url: 'http://x/', minSeverity: critical}")));
        assert!(n.wanted_by(&dest("{name: a, url: 'http://x/', minSeverity: medium}")));
        assert!(!n.wanted_by(&dest("{name: a, url: 'http://x/', findingKinds: [drift]}")));
    }

    #[test]
    fn each_format_has_its_shape() {
        let a = driftwatch_proto::v1::Approval {
            id: 9,
            kind: "access".into(),
            resource: "postgres".into(),
            who: "user=app".into(),
            requester: "alice".into(),
            reason: "INC-1".into(),
            ..Default::default()
        };
        let n = approval_notice(&a, false);
        let j = n.render(Format::Json);
        assert_eq!(j["type"], "approval_requested");
        assert!(j["commands"][0]
            .as_str()
            .unwrap()
            .contains("approvals approve 9"));
        let s = n.render(Format::Slack);
        assert!(s["text"].as_str().unwrap().contains("approval 9 requested"));
        assert_eq!(s["blocks"][0]["type"], "header");
        let t = n.render(Format::Teams);
        assert_eq!(t["type"], "message");
        assert_eq!(t["attachments"][0]["content"]["type"], "AdaptiveCard");
    }
}
