//! The timeline web view for responders (`--web-listen`): a host's events
//! on a time axis with gaps drawn in, the processes that acted arranged by
//! ancestry with their file changes, execs and connects, and findings
//! linked to their evidence. Server-rendered HTML and SVG: no script, no
//! CDN, nothing fetched but the page.
//!
//! It authenticates as the API does: a bearer token (`Authorization:
//! Bearer TOKEN`), or from a browser the same token as the password of
//! HTTP Basic authentication (any user name); the caller needs the viewer
//! role. On a collector without credentials it is open, like the API.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, sync::Arc};

use axum::{
    extract::{Path, Query, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use driftwatch_proto::v1::{event, timeline_item, Event, Finding, Gap, TimelineRequest};

use crate::{
    correlate::{baselines::host_matches, Correlator},
    json as shape,
    security::auth::Auth,
};

/// Most events one page shows.
const MAX_EVENTS: usize = 5000;
/// The time axis's drawing width, in pixels.
const AXIS_W: f64 = 1100.0;
/// Left margin of the axis (lane names).
const AXIS_X: f64 = 70.0;
/// Lanes of the axis, top to bottom.
const LANES: [&str; 5] = ["exec", "file", "connect", "digest", "finding"];

#[derive(Clone)]
struct Web {
    correlator: Arc<Correlator>,
    auth: Arc<Auth>,
}

/// Binds `addr` and serves the view until the process ends.
pub async fn serve(
    addr: SocketAddr,
    correlator: Arc<Correlator>,
    auth: Arc<Auth>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("web view on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the web view serves plain HTTP beyond loopback: tokens travel in clear; put it behind a TLS proxy");
    }
    let app = Router::new()
        .route("/", get(index))
        .route("/timeline", get(timeline))
        .route("/findings/{id}", get(finding))
        .with_state(Web { correlator, auth });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the web view stopped: {e}");
        }
    });
    tracing::info!(%bound, "web view listening");
    Ok(bound)
}

/// HTML-escaped text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `s` for a query string.
fn url(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/' | b':') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The caller may read, or the answer that says why not.
fn check(web: &Web, headers: &HeaderMap) -> Result<(), Box<Response>> {
    // A browser's Basic credentials: the password is the token.
    let mut h = headers.clone();
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| pair.split_once(':').map(|(_, t)| t.to_owned()))
    {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            h.insert(header::AUTHORIZATION, v);
        }
    }
    let refused = |why: String| {
        let body = page(
            "not signed in",
            "",
            &format!(
                "<p class=\"refused\">{}</p><p>Sign in with your Driftwatch token as the password (any user name).</p>",
                esc(&why)
            ),
        );
        let mut r = (StatusCode::UNAUTHORIZED, body).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Basic realm=\"driftwatch: your token is the password\", charset=\"UTF-8\"",
            ),
        );
        r
    };
    let caller = web
        .auth
        .authenticate(&h, &axum::http::Extensions::new())
        .map_err(|s| Box::new(refused(s.message().to_owned())))?;
    web.auth
        .authorize(&caller, "/driftwatch.v1.QueryService/Timeline")
        .map_err(|s| {
            Box::new(if s.code() == tonic::Code::PermissionDenied {
                (
                    StatusCode::FORBIDDEN,
                    page(
                        "refused",
                        "",
                        &format!("<p class=\"refused\">{}</p>", esc(s.message())),
                    ),
                )
                    .into_response()
            } else {
                refused(s.message().to_owned())
            })
        })
}

/// A whole page: no script may run, nothing is fetched from elsewhere.
fn page(title: &str, head: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>driftwatch · {}</title>{head}<style>{STYLE}</style></head><body><header><a href=\"/\">driftwatch</a> · {}</header>{body}</body></html>",
        esc(title),
        esc(title)
    );
    let mut r = (StatusCode::OK, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0 24px 40px;color:#222}\
header{font-weight:600;padding:12px 0;border-bottom:1px solid #ccc;margin-bottom:12px}\
header a{color:#222;text-decoration:none}\
form.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin:8px 0 16px}\
form.filters input{width:9em}\
svg{background:#fafafa;border:1px solid #ddd}\
rect.gap{fill:rgb(255,214,214)}\
circle.ev-exec{fill:rgb(44,160,44)}circle.ev-file{fill:rgb(31,119,180)}\
circle.ev-connect{fill:rgb(255,127,14)}circle.ev-digest{fill:rgb(127,127,127)}\
circle.ev-other{fill:rgb(148,103,189)}path.finding{fill:rgb(214,39,40)}\
.lane{font-size:11px;fill:#555}.tick{font-size:10px;fill:#777}\
ul.tree,ul.tree ul{list-style:none;padding-left:18px;border-left:1px dotted #bbb}\
table.events{border-collapse:collapse;margin:4px 0 8px}\
table.events td{padding:1px 8px;border-bottom:1px solid #eee;font:12px ui-monospace,monospace}\
tr:target{background:#fff3b0}code{font:12px ui-monospace,monospace}\
.refused{color:#b00}.gaps li{color:#a33}.diff td{padding:1px 8px;font:12px ui-monospace,monospace}\
.muted{color:#777}";

/// A time from a query (a duration back from now, or RFC 3339); none when
/// empty or unreadable.
fn when(s: &str) -> Option<i64> {
    crate::units::when(s.trim()).ok()
}

async fn index(State(web): State<Web>, headers: HeaderMap) -> Response {
    if let Err(r) = check(&web, &headers) {
        return *r;
    }
    let c = web.correlator.clone();
    let got = tokio::task::spawn_blocking(move || {
        let nodes = c.log.nodes()?;
        let open = c.with_tx(|tx| tx.findings(200, &|f: &Finding| f.status != "resolved"))?;
        Ok::<_, crate::store::StoreError>((nodes, open))
    })
    .await;
    let (nodes, open) = match got {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return error(&e.to_string()),
        Err(e) => return error(&e.to_string()),
    };
    let mut body = String::from("<h2>Hosts</h2><ul class=\"hosts\">");
    for n in &nodes {
        let _ = write!(
            body,
            "<li><a href=\"/timeline?host={}&amp;since=1h\">{}</a></li>",
            url(n),
            esc(n)
        );
    }
    body.push_str("</ul><h2>Open findings</h2><ul class=\"findings\">");
    for f in &open {
        let _ = write!(
            body,
            "<li>{} {}</li>",
            finding_link(f, &f.node),
            esc(&f.summary)
        );
    }
    body.push_str("</ul>");
    page("hosts", "", &body)
}

/// A finding's link and kind, its severity and `also` (host or status).
fn finding_link(f: &Finding, also: &str) -> String {
    format!(
        "<a href=\"/findings/{id}\">#{id} {}</a> <span class=\"muted\">{} · {}</span>",
        esc(&f.kind),
        esc(&f.severity),
        esc(also),
        id = f.id
    )
}

fn error(why: &str) -> Response {
    let mut r = page(
        "error",
        "",
        &format!("<p class=\"refused\">{}</p>", esc(why)),
    );
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// What the timeline shows: events and gaps of the window, and the
/// findings of its hosts seen in it.
struct Window {
    events: Vec<Event>,
    gaps: Vec<Gap>,
    findings: Vec<Finding>,
    more: bool,
}

fn read_window(c: &Correlator, r: &TimelineRequest) -> Result<Window, crate::store::StoreError> {
    let mut events = Vec::new();
    let mut gaps = Vec::new();
    let mut more = false;
    crate::query::walk(&*c.log, r, &mut |item| match item.item {
        Some(timeline_item::Item::Event(e)) => {
            if events.len() >= MAX_EVENTS {
                more = true;
                return false;
            }
            events.push(e);
            true
        }
        Some(timeline_item::Item::Gap(g)) => {
            gaps.push(g);
            true
        }
        None => true,
    })?;
    let (since, until) = (r.since_unix_nanos, r.until_unix_nanos);
    let host = r.node.clone();
    let findings = c.with_tx(|tx| {
        tx.findings(500, &|f: &Finding| {
            (host.is_empty() || host_matches(&host, &f.node))
                && f.last_seen_unix_nanos >= since
                && (until == 0 || f.first_seen_unix_nanos < until)
        })
    })?;
    Ok(Window {
        events,
        gaps,
        findings: findings.into_iter().map(crate::control::public).collect(),
        more,
    })
}

fn lane_of(e: &Event) -> usize {
    match &e.event {
        Some(event::Event::Exec(_) | event::Event::Exit(_)) => 0,
        Some(event::Event::File(_)) => 1,
        Some(event::Event::Connect(_)) => 2,
        Some(event::Event::Digest(_)) => 3,
        _ => 3,
    }
}

fn class_of(e: &Event) -> &'static str {
    match &e.event {
        Some(event::Event::Exec(_) | event::Event::Exit(_)) => "ev-exec",
        Some(event::Event::File(_)) => "ev-file",
        Some(event::Event::Connect(_)) => "ev-connect",
        Some(event::Event::Digest(_)) => "ev-digest",
        _ => "ev-other",
    }
}

fn anchor(node: &str, seq: u64) -> String {
    let node: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("ev-{node}-{seq}")
}

async fn timeline(
    State(web): State<Web>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Err(r) = check(&web, &headers) {
        return *r;
    }
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let follow = get("follow") == "1";
    let now = driftwatch_proto::time::now_unix_nanos();
    let since = when(get("since")).unwrap_or(now - 3_600_000_000_000);
    let until = if follow { None } else { when(get("until")) };
    let kinds: Vec<String> = get("kind")
        .split(',')
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    let r = TimelineRequest {
        node: get("host").to_owned(),
        since_unix_nanos: since,
        until_unix_nanos: until.unwrap_or(0),
        exec_id: get("exec_id").to_owned(),
        pid: 0,
        path_prefix: get("path").to_owned(),
        kinds,
        follow: false,
        limit: 0,
    };
    let c = web.correlator.clone();
    let req = r.clone();
    let w = match tokio::task::spawn_blocking(move || read_window(&c, &req)).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => return error(&e.to_string()),
        Err(e) => return error(&e.to_string()),
    };
    let t0 = since;
    let t1 = until.unwrap_or(now).max(t0 + 1);
    let x = |t: i64| AXIS_X + ((t.clamp(t0, t1) - t0) as f64 / (t1 - t0) as f64) * AXIS_W;
    let lane_y = |i: usize| 30.0 + 30.0 * i as f64;

    let mut body = String::new();
    // Filters, as in the CLI.
    let field = |name: &str, label: &str| {
        format!(
            "<label>{label} <input name=\"{name}\" value=\"{}\"></label>",
            esc(get(name))
        )
    };
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/timeline\">{}{}{}{}{}{}<label><input type=\"checkbox\" name=\"follow\" value=\"1\"{}> follow</label><button>show</button></form>",
        field("host", "host"),
        field("since", "since"),
        field("until", "until"),
        field("kind", "kind"),
        field("path", "path"),
        field("exec_id", "exec_id"),
        if follow { " checked" } else { "" }
    );

    // The axis.
    let height = lane_y(LANES.len()) + 10.0;
    let _ = write!(
        body,
        "<svg id=\"time-axis\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" viewBox=\"0 0 {w} {height}\">",
        w = AXIS_X + AXIS_W + 20.0
    );
    for g in &w.gaps {
        let (a, b) = (x(g.from_time_unix_nanos), x(g.to_time_unix_nanos));
        let _ = write!(
            body,
            "<rect class=\"gap\" x=\"{a:.1}\" y=\"15\" width=\"{:.1}\" height=\"{:.1}\"><title>gap on {}: {} {}</title></rect>",
            (b - a).max(3.0),
            lane_y(LANES.len() - 1) - 5.0,
            esc(&g.node),
            esc(&g.reason),
            esc(&g.detail)
        );
    }
    for (i, name) in LANES.iter().enumerate() {
        let y = lane_y(i);
        let _ = write!(
            body,
            "<text class=\"lane\" x=\"4\" y=\"{:.1}\">{name}</text><line x1=\"{AXIS_X}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>",
            y + 4.0,
            AXIS_X + AXIS_W
        );
    }
    for k in 0..=4 {
        let t = t0 + (t1 - t0) / 4 * k;
        let _ = write!(
            body,
            "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x(t) - 30.0,
            height - 2.0,
            esc(shape::time(t).get(11..19).unwrap_or(""))
        );
    }
    for e in &w.events {
        let _ = write!(
            body,
            "<a href=\"#{}\"><circle class=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"5\"><title>{} {} seq {}</title></circle></a>",
            anchor(&e.node, e.seq),
            class_of(e),
            x(e.time_unix_nanos),
            lane_y(lane_of(e)),
            esc(crate::query::kind_of(e)),
            esc(&e.node),
            e.seq
        );
    }
    for f in &w.findings {
        let (cx, cy) = (x(f.first_seen_unix_nanos), lane_y(4));
        let _ = write!(
            body,
            "<a href=\"/findings/{}\"><path class=\"finding\" d=\"M{cx:.1} {:.1} l7 7 l-7 7 l-7 -7 z\"><title>#{} {}</title></path></a>",
            f.id,
            cy - 7.0,
            f.id,
            esc(&f.summary)
        );
    }
    body.push_str("</svg>");
    body.push_str("<p class=\"muted\">exec · file · connect · digest per lane; shaded: gaps (lost records, offline agents); ◆ findings</p>");
    if w.more {
        let _ = write!(
            body,
            "<p class=\"refused\">Only the first {MAX_EVENTS} events are shown: narrow the window or the filters.</p>"
        );
    }

    // Findings, linked to their evidence.
    body.push_str("<h2>Findings</h2><ul class=\"findings\">");
    for f in &w.findings {
        let ev: Vec<String> = f
            .evidence
            .iter()
            .map(|r| {
                format!(
                    "<a href=\"#{}\">{} seq {}</a>",
                    anchor(&r.node, r.seq),
                    esc(&r.node),
                    r.seq
                )
            })
            .collect();
        let _ = write!(
            body,
            "<li class=\"finding\">{} {} <span class=\"muted\">evidence:</span> {}</li>",
            finding_link(f, &f.status),
            esc(&f.summary),
            ev.join(", ")
        );
    }
    body.push_str("</ul>");

    // Gaps.
    if !w.gaps.is_empty() {
        body.push_str("<h2>Gaps</h2><ul class=\"gaps\">");
        for g in &w.gaps {
            let _ = write!(
                body,
                "<li>{} {} from {} to {} {}</li>",
                esc(&g.node),
                esc(&g.reason),
                esc(&shape::time(g.from_time_unix_nanos)),
                esc(&shape::time(g.to_time_unix_nanos)),
                esc(&g.detail)
            );
        }
        body.push_str("</ul>");
    }

    // Processes by ancestry, each with what it did.
    body.push_str("<h2>Processes</h2>");
    body.push_str(&process_tree(&w.events));
    let head = if follow {
        "<meta http-equiv=\"refresh\" content=\"3\">"
    } else {
        ""
    };
    let title = if r.node.is_empty() {
        "timeline".to_owned()
    } else {
        format!("timeline · {}", r.node)
    };
    page(&title, head, &body)
}

/// A process in a window: its node and exec_id.
type ProcKey = (String, String);
/// Each process's children (`None`: the roots).
type Children = BTreeMap<Option<ProcKey>, Vec<ProcKey>>;

/// The processes of `events` as a tree by ancestry (a process whose parent
/// did nothing in the window hangs from the root), each with its events;
/// events of no process (digests, policy, loss) come last.
fn process_tree(events: &[Event]) -> String {
    struct Proc<'a> {
        first: &'a Event,
        events: Vec<&'a Event>,
    }
    let mut procs: BTreeMap<(String, String), Proc<'_>> = BTreeMap::new();
    let mut loose: Vec<&Event> = Vec::new();
    for e in events {
        match e.process.as_ref().filter(|p| !p.exec_id.is_empty()) {
            Some(p) => procs
                .entry((e.node.clone(), p.exec_id.clone()))
                .or_insert(Proc {
                    first: e,
                    events: Vec::new(),
                })
                .events
                .push(e),
            None => loose.push(e),
        }
    }
    let parent = |key: &(String, String)| -> Option<(String, String)> {
        let p = procs.get(key)?.first.process.as_ref()?;
        p.ancestors
            .iter()
            .map(|a| (key.0.clone(), a.exec_id.clone()))
            .find(|k| procs.contains_key(k))
    };
    let mut children: Children = BTreeMap::new();
    for key in procs.keys() {
        children.entry(parent(key)).or_default().push(key.clone());
    }
    for list in children.values_mut() {
        list.sort_by_key(|k| procs.get(k).map_or(0, |p| p.first.time_unix_nanos));
    }
    fn rows(out: &mut String, events: &[&Event]) {
        out.push_str("<table class=\"events\">");
        for e in events {
            let _ = write!(
                out,
                "<tr id=\"{}\" class=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
                anchor(&e.node, e.seq),
                class_of(e),
                esc(&shape::time(e.time_unix_nanos)),
                esc(crate::query::kind_of(e)),
                esc(&shape::detail(e))
            );
        }
        out.push_str("</table>");
    }
    fn walk(
        out: &mut String,
        at: Option<(String, String)>,
        procs: &BTreeMap<(String, String), Proc<'_>>,
        children: &Children,
        depth: usize,
    ) {
        let Some(list) = children.get(&at) else {
            return;
        };
        out.push_str("<ul class=\"tree\">");
        for key in list {
            let Some(p) = procs.get(key) else { continue };
            let pr = p.first.process.clone().unwrap_or_default();
            let _ = write!(
                out,
                "<li class=\"proc\" id=\"p-{}\"><details open><summary><code>{}</code> pid {} · {} · <span class=\"muted\">{} {}</span></summary>",
                esc(&pr.exec_id),
                esc(&pr.exe),
                pr.pid,
                esc(if pr.user.is_empty() { "?" } else { &pr.user }),
                esc(&key.0),
                esc(&pr.exec_id)
            );
            rows(out, &p.events);
            out.push_str("</details>");
            if depth < 64 {
                walk(out, Some(key.clone()), procs, children, depth + 1);
            }
            out.push_str("</li>");
        }
        out.push_str("</ul>");
    }
    let mut out = String::new();
    walk(&mut out, None, &procs, &children, 0);
    if !loose.is_empty() {
        out.push_str("<h3>Host events</h3>");
        rows(&mut out, &loose);
    }
    out
}

async fn finding(State(web): State<Web>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Err(r) = check(&web, &headers) {
        return *r;
    }
    let c = web.correlator.clone();
    let f = match tokio::task::spawn_blocking(move || c.with_tx(|tx| tx.finding(id))).await {
        Ok(Ok(Some(f))) => crate::control::public(f),
        Ok(Ok(None)) => {
            let mut r = page(
                "not found",
                "",
                &format!("<p class=\"refused\">No finding {id}.</p>"),
            );
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
        Ok(Err(e)) => return error(&e.to_string()),
        Err(e) => return error(&e.to_string()),
    };
    let v = shape::finding(&f);
    let mut body = format!(
        "<h2>Finding #{} · {} · {} · {}</h2><p>{}</p><table class=\"diff\"><tr><td>host</td><td>{}</td></tr><tr><td>resource</td><td>{} {}</td></tr><tr><td>who</td><td>{} <code>{}</code></td></tr><tr><td>desired</td><td><code>{}</code></td></tr><tr><td>actual</td><td><code>{}</code></td></tr><tr><td>seen</td><td>{} .. {} ({} times)</td></tr></table>",
        f.id,
        esc(&f.kind),
        esc(&f.severity),
        esc(&f.status),
        esc(&f.summary),
        esc(&f.node),
        esc(&f.resource),
        esc(&f.path),
        esc(v["actor"]["user"].as_str().unwrap_or("-")),
        esc(v["actor"]["exe"].as_str().unwrap_or("")),
        esc(v["desired"]["sha256"].as_str().unwrap_or("-")),
        esc(v["actual"]["sha256"].as_str().unwrap_or("-")),
        esc(&shape::time(f.first_seen_unix_nanos)),
        esc(&shape::time(f.last_seen_unix_nanos)),
        f.count
    );
    if !f.changes.is_empty() || !f.changes_note.is_empty() {
        body.push_str("<h3>What changed</h3><table class=\"diff\">");
        for ch in &f.changes {
            let _ = write!(
                body,
                "<tr class=\"{}\"><td>{}</td></tr>",
                esc(&ch.op),
                esc(&driftwatch_proto::structure::render(ch))
            );
        }
        if !f.changes_note.is_empty() {
            let _ = write!(
                body,
                "<tr><td class=\"muted\">{}</td></tr>",
                esc(&f.changes_note)
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h3>Evidence</h3><ul class=\"evidence\">");
    for r in &f.evidence {
        let t = r.time_unix_nanos;
        let _ = write!(
            body,
            "<li><a href=\"/timeline?host={}&amp;since={}&amp;until={}#{}\">{} seq {} at {}</a></li>",
            url(&r.node),
            url(&shape::time(t - 60_000_000_000)),
            url(&shape::time(t + 60_000_000_000)),
            anchor(&r.node, r.seq),
            esc(&r.node),
            r.seq,
            esc(&shape::time(t))
        );
    }
    body.push_str("</ul><h3>History</h3><ul>");
    for h in &f.history {
        let _ = write!(
            body,
            "<li>{} {} by {} {}</li>",
            esc(&shape::time(h.time_unix_nanos)),
            esc(&h.status),
            esc(&h.principal),
            esc(&h.note)
        );
    }
    body.push_str("</ul>");
    page(&format!("finding {id}"), "", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_anchors_are_safe() {
        assert_eq!(
            esc("<script>alert('x')</script>&\u{1b}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;\\u{001b}"
        );
        assert_eq!(anchor("node.1\"<", 5), "ev-node_1__-5");
        assert_eq!(url("a b&c"), "a%20b%26c");
    }
}
