//! `driftwatch verify` and `driftwatch audit`: the hash chains of stored
//! history, checked here on the caller's side from what the collector
//! returns (or from an export), and people's actions.

use std::{collections::BTreeMap, io::Write};

use base64::Engine as _;
use driftwatch_proto::{
    chain::{self, Broken, Verifier},
    v1::{timeline_item, AgentsRequest, AuditRequest, Event, TimelineRequest},
};
use prost::Message as _;
use serde_json::{json, Value};

use crate::{status_text, Conn, Output};
use driftwatch_collector::json::{self, time};

type Query = driftwatch_proto::v1::query_service_client::QueryServiceClient<Conn>;

/// The export fields `timeline --chain` adds to an event's JSON.
pub(crate) fn add_chain(v: &mut Value, e: &Event) {
    v["chain"] = json!(chain::hex(&e.chain));
    v["body"] = json!(base64::engine::general_purpose::STANDARD.encode(chain::event_body(e)));
}

/// What one chain's check found.
struct Report {
    what: String,
    checked: u64,
    first: Option<u64>,
    last: Option<u64>,
    head_seq: u64,
    broken: Option<Broken>,
    note: Option<String>,
}

impl Report {
    fn print(&self, out: &mut impl Write, output: Output) {
        let range = match (self.first, self.last) {
            (Some(a), Some(b)) => format!("seq {a}..{b}"),
            _ => "nothing stored".into(),
        };
        let _ = match output {
            Output::Json | Output::Jsonl | Output::Yaml => writeln!(
                out,
                "{}",
                json!({
                    "chain": self.what, "ok": self.broken.is_none(), "checked": self.checked,
                    "first_seq": self.first, "last_seq": self.last, "head_seq": self.head_seq,
                    "first_bad_seq": self.broken.as_ref().map(|b| b.seq),
                    "reason": self.broken.as_ref().map(|b| b.reason.as_str()),
                    "note": self.note,
                })
            ),
            Output::Table | Output::Wide => match &self.broken {
                None => writeln!(
                    out,
                    "{:<24} ok      {} verified ({range}){}",
                    self.what,
                    self.checked,
                    self.note
                        .as_ref()
                        .map(|n| format!("; {n}"))
                        .unwrap_or_default()
                ),
                Some(b) => writeln!(
                    out,
                    "{:<24} BROKEN  first bad event: seq {}: {}",
                    self.what, b.seq, b.reason
                ),
            },
        };
    }
}

/// Checks events of one node (any order) against their chain; `head` is
/// what the collector recorded as the node's last event, when the whole
/// history up to now was read.
fn check_events(
    what: String,
    mut events: Vec<(Event, Vec<u8>)>,
    head: Option<(u64, Vec<u8>)>,
) -> Report {
    events.sort_by_key(|(e, _)| e.seq);
    let first = events.first().map(|(e, _)| e.seq);
    let last = events.last().map(|(e, _)| e.seq);
    // The first stored event starts the chain only if it is the node's
    // first; otherwise older ones were removed by retention (or lie before
    // the window) and it is taken as the anchor.
    let mut v = Verifier::new(first == Some(1));
    if let Some((seq, link)) = &head {
        v = v.through_head(*seq, link);
    }
    let mut broken = None;
    for (e, body) in &events {
        if let Err(b) = v.feed(e.seq, &e.chain, body) {
            broken = Some(b);
            break;
        }
    }
    let mut note = None;
    let head_seq = head.as_ref().map_or(0, |h| h.0);
    if broken.is_none() && head.is_some() {
        match v.finish() {
            Ok(()) => note = Some(format!("passes the recorded head (seq {head_seq})")),
            Err(b) => broken = Some(b),
        }
    }
    Report {
        what,
        checked: v.checked(),
        first,
        last,
        head_seq,
        broken,
        note,
    }
}

/// `driftwatch verify` against the collector: every stored event of the
/// hosts (or one host) since a time, and the audit log.
pub async fn verify_online(
    client: &mut Query,
    host: Option<String>,
    since: Option<i64>,
    output: Output,
    out: &mut impl Write,
) -> Result<bool, String> {
    let agents = client
        .agents(AgentsRequest {})
        .await
        .map_err(|s| status_text("verify", &s))?
        .into_inner()
        .agents;
    let mut ok = true;
    let mut found = false;
    for a in agents {
        let node = a.node.clone().unwrap_or_default().name;
        if host.as_ref().is_some_and(|h| *h != node) {
            continue;
        }
        found = true;
        let mut stream = client
            .timeline(TimelineRequest {
                node: node.clone(),
                since_unix_nanos: since.unwrap_or(0),
                ..Default::default()
            })
            .await
            .map_err(|s| status_text("verify", &s))?
            .into_inner();
        let mut events = Vec::new();
        while let Some(item) = stream
            .message()
            .await
            .map_err(|s| status_text("verify", &s))?
        {
            if let Some(timeline_item::Item::Event(e)) = item.item {
                if e.node == node {
                    let body = chain::event_body(&e);
                    events.push((e, body));
                }
            }
        }
        // The recorded head is only where this read must end when it read
        // from the start; a window checks its own links.
        let head = since.is_none().then(|| (a.chain_seq, a.chain_head.clone()));
        let r = check_events(format!("host {node}"), events, head);
        ok &= r.broken.is_none();
        r.print(out, output);
    }
    if let Some(h) = &host {
        if !found {
            return Err(format!("verify: no host {h:?} is known to the collector"));
        }
    }
    if host.is_none() {
        let a = client
            .audit(AuditRequest {
                since_unix_nanos: 0,
                limit: 100_000,
            })
            .await
            .map_err(|s| status_text("verify", &s))?
            .into_inner();
        let first = a.records.first().map(|r| r.seq);
        let mut v = Verifier::new(first == Some(1)).through_head(a.head_seq, &a.head);
        let mut broken = None;
        for r in &a.records {
            if let Err(b) = v.feed(r.seq, &r.chain, &chain::audit_body(r)) {
                broken = Some(b);
                break;
            }
        }
        if broken.is_none() {
            broken = v.finish().err();
        }
        let r = Report {
            what: "audit log".into(),
            checked: v.checked(),
            first,
            last: a.records.last().map(|r| r.seq),
            head_seq: a.head_seq,
            broken,
            note: None,
        };
        ok &= r.broken.is_none();
        r.print(out, output);
    }
    Ok(ok)
}

/// `driftwatch verify --file EXPORT`: an export of `timeline -o json
/// --chain`, offline. Each event's readable fields must be what its body
/// says, and the bodies must chain.
pub fn verify_file(
    path: &std::path::Path,
    output: Output,
    out: &mut impl Write,
) -> Result<bool, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the export: {e}", path.display()))?;
    let mut nodes: BTreeMap<String, Vec<(Event, Vec<u8>)>> = BTreeMap::new();
    let mut bad: BTreeMap<String, Broken> = BTreeMap::new();
    // `-o jsonl` (a line per item) or `-o json` (one array of them).
    let items: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?
    } else {
        let mut v = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            v.push(
                serde_json::from_str(line)
                    .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), i + 1))?,
            );
        }
        v
    };
    for (i, mut v) in items.into_iter().enumerate() {
        if v["type"] != "event" {
            continue;
        }
        let node = v["node"].as_str().unwrap_or("").to_owned();
        let seq = v["seq"].as_u64().unwrap_or(0);
        let (Some(chain_hex), Some(body_b64)) = (v["chain"].as_str(), v["body"].as_str()) else {
            return Err(format!(
                "{}:{}: no chain fields; export with `driftwatch timeline -o jsonl --chain`",
                path.display(),
                i + 1
            ));
        };
        let chain_value = chain::from_hex(chain_hex).unwrap_or_default();
        let body = base64::engine::general_purpose::STANDARD
            .decode(body_b64)
            .unwrap_or_default();
        let mut e = match Event::decode(body.as_slice()) {
            Ok(e) => e,
            Err(_) => {
                bad.entry(node).or_insert(Broken {
                    seq,
                    reason: "its body does not decode".into(),
                });
                continue;
            }
        };
        e.chain = chain_value;
        // The readable fields are what the body says.
        if let Some(o) = v.as_object_mut() {
            o.remove("chain");
            o.remove("body");
        }
        if json::event(&e) != v {
            bad.entry(node.clone()).or_insert(Broken {
                seq,
                reason: "its readable fields differ from its chained body (the export was edited)"
                    .into(),
            });
        }
        nodes.entry(node).or_default().push((e, body));
    }
    let mut ok = true;
    for (node, events) in nodes {
        let mut r = check_events(format!("host {node}"), events, None);
        if let Some(b) = bad.remove(&node) {
            if r.broken.as_ref().is_none_or(|x| b.seq <= x.seq) {
                r.broken = Some(b);
            }
        }
        ok &= r.broken.is_none();
        r.print(out, output);
    }
    for (node, b) in bad {
        ok = false;
        let _ = writeln!(
            out,
            "host {node}: BROKEN first bad event: seq {}: {}",
            b.seq, b.reason
        );
    }
    Ok(ok)
}

/// `s` with control characters escaped: what people typed goes to a
/// terminal.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let v: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            v
        })
        .collect()
}

/// `driftwatch audit`.
pub async fn audit(
    client: &mut Query,
    since: Option<i64>,
    limit: Option<u32>,
    output: Output,
    out: &mut impl Write,
) -> Result<(), String> {
    let a = client
        .audit(AuditRequest {
            since_unix_nanos: since.unwrap_or(0),
            limit: limit.unwrap_or(0),
        })
        .await
        .map_err(|s| status_text("audit", &s))?
        .into_inner();
    if output.machine() {
        for r in a.records {
            let v = json!({
                "seq": r.seq, "time": time(r.time_unix_nanos), "principal": r.principal,
                "call": r.call, "args": serde_json::from_str::<Value>(&r.args).unwrap_or(Value::Null),
                "outcome": r.outcome, "chain": chain::hex(&r.chain),
            });
            let _ = writeln!(out, "{v}");
        }
        return Ok(());
    }
    let mut rows = crate::table::Rows::new(
        &["SEQ", "TIME", "PRINCIPAL", "CALL", "OUTCOME", "ARGS"],
        &[0],
    );
    for r in a.records {
        rows.push(vec![
            r.seq.to_string(),
            time(r.time_unix_nanos),
            printable(&r.principal),
            r.call,
            printable(&r.outcome),
            printable(&r.args),
        ]);
    }
    rows.print(out, output);
    Ok(())
}
