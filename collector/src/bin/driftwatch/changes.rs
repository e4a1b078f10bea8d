//! `driftwatch findings`, `approvals` and `baseline`.

use std::io::Write;

use clap::Subcommand;
use driftwatch_collector::{correlate::baselines::parse_manifest, units};
use driftwatch_proto::v1::{
    approval_service_client::ApprovalServiceClient, baseline_service_client::BaselineServiceClient,
    finding_service_client::FindingServiceClient, Approval, Baseline, ConfigChange,
    DecideApprovalRequest, FileState, GetFindingRequest, ImportBaselineRequest,
    ListApprovalsRequest, ListBaselinesRequest, ListFindingsRequest, Process,
    RequestApprovalRequest, ScanBaselineRequest, UpdateFindingRequest, WatchFindingsRequest,
};
use serde_json::{json, Value};
use tonic::{Request, Status};

use crate::{table::Rows, Conn};

use crate::Output;
use driftwatch_collector::json::{self, time};
use driftwatch_collector::units::when;

/// Entries sent per import call, well under the message size limit.
const IMPORT_CHUNK: usize = 5_000;

#[derive(Subcommand)]
pub enum Findings {
    /// Findings, newest first.
    List {
        /// Only these kinds (drift, deleted, unauthorized_write,
        /// unauthorized_connect, agent_silent, blind_spot, blocked,
        /// would_block); repeatable.
        #[arg(long = "kind", value_parser = ["drift", "deleted", "unauthorized_write", "unauthorized_connect", "agent_silent", "blind_spot", "blocked", "would_block"])]
        kinds: Vec<String>,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Only this resource name, or paths under this absolute path.
        #[arg(long)]
        resource: Option<String>,
        /// Only these statuses (open, acknowledged, resolved); repeatable.
        /// Default: open and acknowledged.
        #[arg(long = "status", value_parser = ["open", "acknowledged", "resolved"])]
        statuses: Vec<String>,
        /// Also resolved ones (same as --status open --status acknowledged --status resolved).
        #[arg(long, short)]
        all: bool,
        /// Only findings seen since: a duration back (`1h`) or an RFC 3339 time.
        #[arg(long, value_parser = when)]
        since: Option<i64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Follow new and changed findings as they happen, one line each, for
    /// a SIEM or a chat bot. Each line carries a cursor; `--after CURSOR`
    /// resumes after it. When the collector goes away the watch reconnects
    /// and resumes from the last cursor it printed, so nothing is missed.
    Watch {
        /// Resume after this cursor (default: replay every change kept).
        #[arg(long, conflicts_with = "from_now")]
        after: Option<u64>,
        /// Only changes from now on.
        #[arg(long)]
        from_now: bool,
        /// Only these kinds; repeatable.
        #[arg(long = "kind", value_parser = ["drift", "deleted", "unauthorized_write", "unauthorized_connect", "agent_silent", "blind_spot", "blocked", "would_block"])]
        kinds: Vec<String>,
        /// Only findings at or above this severity.
        #[arg(long, value_parser = ["low", "medium", "high", "critical"])]
        min_severity: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// One finding with its evidence events.
    Show {
        /// Finding id.
        id: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Acknowledge: someone is looking at it.
    Ack {
        /// Finding id.
        id: u64,
        /// Note.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Resolve, optionally attaching an approved change request.
    Resolve {
        /// Finding id.
        id: u64,
        /// Note.
        #[arg(long, default_value = "")]
        note: String,
        /// Approved request that covers it.
        #[arg(long)]
        approval: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum Approvals {
    /// Ask for a change (`--resource`) or a time-boxed access (`--access`);
    /// you are the requester, and another principal must approve it.
    ///
    /// An approved access request opens the guardrail of a database
    /// resource for exactly the `--who` identity until `--for` runs out;
    /// the agents' kernels close it then on their own clock.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["resource", "access"]))]
    Request {
        /// A change: policy resource name, or an absolute path (a tree ends in `/`).
        #[arg(long)]
        resource: Option<String>,
        /// An access: the database resource the identity may connect to.
        #[arg(long, requires = "who")]
        access: Option<String>,
        /// The identity an access is for, as `field=value,…`: `user=app`,
        /// `exe=/usr/bin/psql,user=app`, `loginUser=alice`,
        /// `namespace=payments,serviceAccount=api`, `label.app=reports`.
        #[arg(long, requires = "access")]
        who: Option<String>,
        /// Expected SHA-256 of the new content (any content when absent), as
        /// printed: 64 hex digits, or a prefix of at least 12 that one
        /// finding or baseline has, with or without `sha256:`.
        #[arg(long, conflicts_with = "access", value_parser = digest_arg)]
        digest: Option<String>,
        /// How long the change or access may last once approved (`30m`,
        /// `2h`, `1h30m`).
        #[arg(long, visible_alias = "for", default_value = "2h", value_parser = units::parse_duration, value_name = "DURATION")]
        window: std::time::Duration,
        /// Hosts it applies to: a name or a glob.
        #[arg(long, default_value = "*")]
        host: String,
        /// Why.
        #[arg(long)]
        reason: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Approve a request (not your own).
    Approve {
        /// Request id.
        id: u64,
        /// Note.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a request.
    Deny {
        /// Request id.
        id: u64,
        /// Note.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Requests and the changes recorded under them.
    List {
        /// Only these statuses (pending, approved, denied); repeatable.
        #[arg(long = "status", value_parser = ["pending", "approved", "denied"])]
        statuses: Vec<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// One request with its changes and the findings it resolved.
    Show {
        /// Request id.
        id: u64,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum Baselines {
    /// Store a manifest (`sha256sum` format: `HEX  PATH`) as desired state.
    Import {
        /// The manifest file (`-`: standard input).
        file: String,
        /// Its entries, read before anything is sent.
        #[arg(skip)]
        entries: Vec<(String, String)>,
        /// Directory the manifest's relative paths live under on the hosts.
        #[arg(long)]
        root: Option<String>,
        /// Hosts it applies to: a name or a glob.
        #[arg(long, default_value = "*")]
        hosts: String,
    },
    /// Take a host's current state of PATH as desired (its agent digests it).
    Scan {
        /// The reference host.
        #[arg(long)]
        host: String,
        /// Absolute path of a file or directory on it.
        path: String,
        /// Hosts the result applies to [default: the reference host].
        #[arg(long)]
        apply_to: Option<String>,
        /// How long the agent may take to digest the tree.
        #[arg(long, default_value = "5m", value_parser = units::parse_duration, value_name = "DURATION")]
        wait: std::time::Duration,
    },
    /// Desired state.
    List {
        /// Only this host selector.
        #[arg(long)]
        hosts: Option<String>,
        /// Only paths under this prefix.
        #[arg(long)]
        path: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
}

fn status_err(what: &str, s: tonic::Status) -> String {
    crate::status_text(what, &s)
}

fn who(p: &Option<Process>) -> String {
    let Some(p) = p else {
        return "-".into();
    };
    let user = if p.user.is_empty() {
        p.uid.to_string()
    } else {
        p.user.clone()
    };
    if !p.login_user.is_empty() && p.login_user != user {
        format!("{user}({}) {}", p.login_user, p.exe)
    } else {
        format!("{user} {}", p.exe)
    }
}

/// A diff as lines under a `label`, and its note.
fn print_diff(out: &mut impl Write, label: &str, changes: &[ConfigChange], note: &str) {
    let pad = " ".repeat(label.len());
    for (i, c) in changes.iter().enumerate() {
        let head = if i == 0 { label } else { &pad };
        let _ = writeln!(out, "{head}{}", driftwatch_proto::structure::render(c));
    }
    if !note.is_empty() {
        let head = if changes.is_empty() { label } else { &pad };
        let _ = writeln!(out, "{head}({note})");
    }
}

fn short(s: &str) -> &str {
    s.get(..12).unwrap_or(s)
}

fn state_line(s: &Option<FileState>) -> String {
    match s {
        None => "-".into(),
        Some(s) if !s.exists => "(absent)".into(),
        Some(s) => {
            let mut v = vec![format!("sha256:{}", short(&s.sha256))];
            if let Some(m) = s.mode {
                v.push(format!("mode {m:04o}"));
            }
            if let (Some(u), Some(g)) = (s.uid, s.gid) {
                v.push(format!("owner {u}:{g}"));
            }
            v.join(" ")
        }
    }
}

/// `driftwatch findings ...`
pub async fn findings(channel: Conn, cmd: Findings, out: &mut impl Write) -> Result<(), String> {
    let mut client =
        FindingServiceClient::new(channel).max_decoding_message_size(crate::MAX_ANSWER);
    match cmd {
        Findings::Watch {
            after,
            from_now,
            kinds,
            min_severity,
            output,
        } => {
            let mut cursor = after.unwrap_or(0);
            let mut from_now = from_now;
            let mut backoff = std::time::Duration::from_millis(500);
            loop {
                let req = WatchFindingsRequest {
                    after: cursor,
                    kinds: kinds.clone(),
                    min_severity: min_severity.clone().unwrap_or_default(),
                    from_now,
                };
                let ended = match client.watch(req).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(c)) => {
                                    backoff = std::time::Duration::from_millis(500);
                                    cursor = c.cursor;
                                    from_now = false;
                                    let Some(f) = c.finding else { continue };
                                    let line = match output {
                                        Output::Json | Output::Jsonl | Output::Yaml => {
                                            let mut v = json::finding(&f);
                                            v["cursor"] = json!(c.cursor);
                                            v.to_string()
                                        }
                                        Output::Table | Output::Wide => format!(
                                            "{:>8} {:>5} {:<20} {:<8} {:<12} {}",
                                            c.cursor, f.id, f.kind, f.severity, f.status, f.summary
                                        ),
                                    };
                                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                                        return Ok(());
                                    }
                                }
                                Ok(None) => break Status::unavailable("the watch ended"),
                                Err(s) => break s,
                            }
                        }
                    }
                    Err(s) => s,
                };
                // Only a collector that is away is waited for; a refusal is final.
                if !matches!(
                    ended.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    return Err(status_err("findings watch", ended));
                }
                eprintln!(
                    "driftwatch: the watch ended ({}); resuming after cursor {cursor} in {:?}",
                    ended.message(),
                    backoff
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
        }
        Findings::List {
            kinds,
            host,
            resource,
            mut statuses,
            all,
            since,
            limit,
            output,
        } => {
            if statuses.is_empty() && !all {
                statuses = vec!["open".into(), "acknowledged".into()];
            }
            let r = ListFindingsRequest {
                kinds,
                node: host.unwrap_or_default(),
                resource: resource.unwrap_or_default(),
                statuses,
                since_unix_nanos: since.unwrap_or(0),
                limit,
            };
            let list = client
                .list(r)
                .await
                .map_err(|s| status_err("findings", s))?
                .into_inner()
                .findings;
            if output.machine() {
                for f in &list {
                    let _ = writeln!(out, "{}", json::finding(f));
                }
                return Ok(());
            }
            let wide = output == Output::Wide;
            let mut header = vec![
                "ID", "KIND", "SEVERITY", "STATUS", "HOST", "RESOURCE", "COUNT", "AGE",
            ];
            if wide {
                header.push("LAST SEEN");
            }
            header.push("SUMMARY");
            let mut rows = Rows::new(&header, &[0, 6]);
            let now = driftwatch_proto::time::now_unix_nanos();
            for f in &list {
                let mut row = vec![
                    f.id.to_string(),
                    f.kind.clone(),
                    f.severity.clone(),
                    f.status.clone(),
                    f.node.clone(),
                    f.resource.clone(),
                    f.count.to_string(),
                    units::age(f.last_seen_unix_nanos, now),
                ];
                if wide {
                    row.push(time(f.last_seen_unix_nanos));
                }
                row.push(f.summary.clone());
                rows.push(row);
            }
            rows.print(out, output);
        }
        Findings::Show { id, output } => {
            let d = client
                .get(GetFindingRequest { id })
                .await
                .map_err(|s| status_err("findings show", s))?
                .into_inner();
            let Some(f) = d.finding else {
                return Err(format!("finding {id}: empty answer"));
            };
            match output {
                Output::Json | Output::Jsonl | Output::Yaml => {
                    let mut v = json::finding(&f);
                    v["events"] = Value::Array(d.events.iter().map(json::event).collect());
                    v["approval"] = d.approval.as_ref().map_or(Value::Null, json::approval);
                    let _ = writeln!(out, "{v}");
                }
                Output::Table | Output::Wide => {
                    let _ = writeln!(
                        out,
                        "finding {} ({}, {}), {}",
                        f.id, f.kind, f.severity, f.status
                    );
                    let _ = writeln!(out, "  what:      {}", f.summary);
                    let _ = writeln!(out, "  host:      {}", f.node);
                    let _ = writeln!(out, "  resource:  {} {}", f.resource, f.path);
                    let _ = writeln!(out, "  who:       {}", who(&f.actor));
                    if f.desired.is_some() || f.actual.is_some() {
                        let _ = writeln!(out, "  desired:   {}", state_line(&f.desired));
                        let _ = writeln!(out, "  actual:    {}", state_line(&f.actual));
                        let _ = writeln!(out, "  differs:   {}", f.differences.join(", "));
                        print_diff(out, "  changed:   ", &f.changes, &f.changes_note);
                    }
                    let _ = writeln!(
                        out,
                        "  when:      {} .. {} ({} times, {} failed)",
                        time(f.first_seen_unix_nanos),
                        time(f.last_seen_unix_nanos),
                        f.count,
                        f.failed
                    );
                    if let Some(a) = &d.approval {
                        let _ = writeln!(
                            out,
                            "  approval:  {} requested by {}, approved by {}: {}",
                            a.id, a.requester, a.approver, a.reason
                        );
                    }
                    for h in &f.history {
                        let _ = writeln!(
                            out,
                            "  history:   {} {} by {} {}",
                            time(h.time_unix_nanos),
                            h.status,
                            h.principal,
                            h.note
                        );
                    }
                    let _ = writeln!(out, "  evidence:");
                    for e in &d.events {
                        let _ = writeln!(
                            out,
                            "    {} {} seq {} {} {} {}",
                            time(e.time_unix_nanos),
                            e.node,
                            e.seq,
                            driftwatch_collector::query::kind_of(e),
                            e.process.as_ref().map(|p| p.exe.as_str()).unwrap_or(""),
                            json::detail(e)
                        );
                    }
                }
            }
        }
        Findings::Ack { id, note } => {
            let f = client
                .update(Request::new(UpdateFindingRequest {
                    id,
                    status: "acknowledged".into(),
                    note,
                    approval_id: 0,
                }))
                .await
                .map_err(|s| status_err("findings ack", s))?
                .into_inner();
            let _ = writeln!(out, "finding {} acknowledged", f.id);
        }
        Findings::Resolve { id, note, approval } => {
            let f = client
                .update(Request::new(UpdateFindingRequest {
                    id,
                    status: "resolved".into(),
                    note,
                    approval_id: approval.unwrap_or(0),
                }))
                .await
                .map_err(|s| status_err("findings resolve", s))?
                .into_inner();
            let _ = writeln!(out, "finding {} resolved", f.id);
        }
    }
    Ok(())
}

/// One approval: JSON, or the whole record as `approvals show` prints it.
fn print_approval(out: &mut impl Write, a: &Approval, output: Output) {
    match output {
        Output::Json | Output::Jsonl | Output::Yaml => {
            let _ = writeln!(out, "{}", json::approval(a));
        }
        Output::Table | Output::Wide => {
            let _ = writeln!(out, "approval {} ({})", a.id, a.status);
            let _ = writeln!(out, "  resource:  {} on {}", a.resource, a.host);
            if a.kind == "access" {
                let _ = writeln!(out, "  access:    {} for {}s", a.who, a.window_seconds);
                let _ = writeln!(out, "  uses:      {}", a.uses);
            }
            if !a.sha256.is_empty() {
                let _ = writeln!(out, "  digest:    {}", a.sha256);
            }
            let _ = writeln!(out, "  reason:    {}", a.reason);
            let _ = writeln!(
                out,
                "  requested: {} by {}",
                time(a.requested_unix_nanos),
                a.requester
            );
            if !a.approver.is_empty() {
                let _ = writeln!(
                    out,
                    "  decided:   {} by {} {}",
                    time(a.decided_unix_nanos),
                    a.approver,
                    a.note
                );
            }
            if a.valid_until_unix_nanos != 0 {
                let _ = writeln!(out, "  valid to:  {}", time(a.valid_until_unix_nanos));
            }
            if !a.resolved_findings.is_empty() {
                let _ = writeln!(out, "  resolved:  findings {:?}", a.resolved_findings);
            }
            for c in &a.changes {
                let actors: Vec<String> = c.actors.iter().map(|p| who(&Some(p.clone()))).collect();
                let _ = writeln!(
                    out,
                    "  change:    {} {} {}: {} -> {} by {}",
                    time(c.time_unix_nanos),
                    c.node,
                    c.path,
                    state_line(&c.before),
                    state_line(&c.after),
                    actors.join(", ")
                );
                print_diff(out, "    what:    ", &c.changes, &c.changes_note);
            }
        }
    }
}

/// Approves (`approve`) or denies request `id`.
async fn decide(
    client: &mut ApprovalServiceClient<Conn>,
    id: u64,
    approve: bool,
    note: String,
) -> Result<Approval, String> {
    let what = if approve {
        "approvals approve"
    } else {
        "approvals deny"
    };
    Ok(client
        .decide(Request::new(DecideApprovalRequest { id, approve, note }))
        .await
        .map_err(|s| status_err(what, s))?
        .into_inner())
}

/// `driftwatch approvals ...`
pub async fn approvals(channel: Conn, cmd: Approvals, out: &mut impl Write) -> Result<(), String> {
    let out_channel = channel.clone();
    let mut client =
        ApprovalServiceClient::new(channel).max_decoding_message_size(crate::MAX_ANSWER);
    match cmd {
        Approvals::Request {
            resource,
            access,
            who,
            digest,
            window,
            host,
            reason,
            output,
        } => {
            let digest = match digest {
                Some(d) if d.len() < 64 => Some(resolve_digest(out_channel, &d).await?),
                d => d,
            };
            if let Some(who) = &who {
                driftwatch_proto::policy::Selector::parse_text(who)
                    .map_err(|e| format!("--who: {e}"))?;
            }
            let kind = if access.is_some() { "access" } else { "change" };
            let a = client
                .request(Request::new(RequestApprovalRequest {
                    resource: access.or(resource).unwrap_or_default(),
                    host,
                    sha256: digest.unwrap_or_default(),
                    window_seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
                    reason,
                    kind: kind.into(),
                    who: who.unwrap_or_default(),
                }))
                .await
                .map_err(|s| status_err("approvals request", s))?
                .into_inner();
            match output {
                Output::Json | Output::Jsonl | Output::Yaml => {
                    let _ = writeln!(out, "{}", json::approval(&a));
                }
                Output::Table | Output::Wide => {
                    let _ = writeln!(
                        out,
                        "approval {} requested by {}; another principal must approve it: driftwatch approvals approve {} (or deny {})",
                        a.id, a.requester, a.id, a.id
                    );
                }
            }
        }
        Approvals::Approve { id, note } => {
            let a = decide(&mut client, id, true, note).await?;
            if a.kind == "access" {
                let _ = writeln!(
                    out,
                    "approval {} approved by {}: {} may connect to {} until {}",
                    a.id,
                    a.approver,
                    a.who,
                    a.resource,
                    time(a.valid_until_unix_nanos)
                );
                return Ok(());
            }
            let _ = writeln!(
                out,
                "approval {} approved by {}; changes until {} are recorded, not flagged{}",
                a.id,
                a.approver,
                time(a.valid_until_unix_nanos),
                if a.resolved_findings.is_empty() {
                    String::new()
                } else {
                    format!("; resolved findings {:?}", a.resolved_findings)
                }
            );
        }
        Approvals::Deny { id, note } => {
            let a = decide(&mut client, id, false, note).await?;
            let _ = writeln!(out, "approval {} denied by {}", a.id, a.approver);
        }
        Approvals::List { statuses, output } => {
            let list = client
                .list(ListApprovalsRequest { statuses, id: 0 })
                .await
                .map_err(|s| status_err("approvals", s))?
                .into_inner()
                .approvals;
            if output.machine() {
                for a in &list {
                    print_approval(out, a, output);
                }
                return Ok(());
            }
            let mut rows = Rows::new(
                &[
                    "ID",
                    "STATUS",
                    "KIND",
                    "RESOURCE",
                    "HOSTS",
                    "REQUESTER",
                    "APPROVER",
                    "CHANGES",
                    "AGE",
                    "REASON",
                ],
                &[0, 7],
            );
            let now = driftwatch_proto::time::now_unix_nanos();
            for a in &list {
                rows.push(vec![
                    a.id.to_string(),
                    a.status.clone(),
                    if a.kind.is_empty() {
                        "change".into()
                    } else {
                        a.kind.clone()
                    },
                    a.resource.clone(),
                    a.host.clone(),
                    a.requester.clone(),
                    if a.approver.is_empty() {
                        "-".into()
                    } else {
                        a.approver.clone()
                    },
                    a.changes.len().to_string(),
                    units::age(a.requested_unix_nanos, now),
                    a.reason.clone(),
                ]);
            }
            rows.print(out, output);
        }
        Approvals::Show { id, output } => {
            let list = client
                .list(ListApprovalsRequest {
                    statuses: Vec::new(),
                    id,
                })
                .await
                .map_err(|s| status_err("approvals show", s))?
                .into_inner()
                .approvals;
            for a in &list {
                print_approval(out, a, output);
            }
        }
    }
    Ok(())
}

/// Reads and checks the manifest of `baseline import` (before the
/// collector is contacted: a bad line is named whether or not it is up).
pub fn read_manifest(cmd: &mut Baselines) -> Result<(), String> {
    let Baselines::Import {
        file,
        root,
        entries,
        ..
    } = cmd
    else {
        return Ok(());
    };
    let text = if file == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .map_err(|e| format!("standard input: cannot read the manifest: {e}"))?;
        t
    } else {
        std::fs::read_to_string(&*file)
            .map_err(|e| format!("{file}: cannot read the manifest: {e}"))?
    };
    let name = if file == "-" { "(stdin)" } else { file };
    *entries = parse_manifest(name, &text, root.as_deref()).map_err(|e| e.to_string())?;
    if entries.is_empty() {
        return Err(format!("{name}: no entries"));
    }
    Ok(())
}

/// A digest as people copy it: `sha256:` optional, at least 12 hex digits.
fn digest_arg(s: &str) -> Result<String, String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    if !(12..=64).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256: 64 hex digits, or a prefix of at least 12 as printed (sha256:0be5df8721cf)"
        ));
    }
    Ok(hex)
}

/// The one full digest, among findings and baselines, that starts with
/// `prefix`.
async fn resolve_digest(channel: Conn, prefix: &str) -> Result<String, String> {
    let mut known = std::collections::BTreeSet::new();
    let findings = FindingServiceClient::new(channel.clone())
        .max_decoding_message_size(crate::MAX_ANSWER)
        .list(ListFindingsRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|s| status_err("looking up the digest", s))?
        .into_inner()
        .findings;
    for f in &findings {
        for s in [&f.desired, &f.actual].into_iter().flatten() {
            known.insert(s.sha256.clone());
        }
    }
    let baselines = BaselineServiceClient::new(channel)
        .max_decoding_message_size(crate::MAX_ANSWER)
        .list(ListBaselinesRequest::default())
        .await
        .map_err(|s| status_err("looking up the digest", s))?
        .into_inner()
        .baselines;
    for b in &baselines {
        if let Some(s) = &b.state {
            known.insert(s.sha256.clone());
        }
    }
    let hits: Vec<&String> = known.iter().filter(|d| d.starts_with(prefix)).collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "--digest {prefix}: no finding or baseline has a digest starting so; give all 64 hex digits"
        )),
        many => Err(format!(
            "--digest {prefix}: {} digests start so ({}); give more digits",
            many.len(),
            many.iter().map(|d| &d[..16]).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// `driftwatch baseline ...`
pub async fn baselines(channel: Conn, cmd: Baselines, out: &mut impl Write) -> Result<(), String> {
    let mut client =
        BaselineServiceClient::new(channel).max_decoding_message_size(crate::MAX_ANSWER);
    match cmd {
        Baselines::Import {
            file,
            hosts,
            entries,
            ..
        } => {
            let total = entries.len();
            let mut stored = 0;
            for chunk in entries.chunks(IMPORT_CHUNK) {
                let r = ImportBaselineRequest {
                    host: hosts.clone(),
                    entries: chunk
                        .iter()
                        .map(|(path, sha)| Baseline {
                            path: path.clone(),
                            state: Some(FileState {
                                exists: true,
                                sha256: sha.clone(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                };
                stored += client
                    .import(Request::new(r))
                    .await
                    .map_err(|s| status_err("baseline import", s))?
                    .into_inner()
                    .stored;
                if total > IMPORT_CHUNK {
                    eprintln!("driftwatch: imported {stored}/{total}");
                }
            }
            let _ = writeln!(
                out,
                "imported {stored} entries from {file} for hosts {hosts}"
            );
        }
        Baselines::Scan {
            host,
            path,
            apply_to,
            wait,
        } => {
            eprintln!("driftwatch: asking the agent on {host} to digest {path} ...");
            let r = client
                .scan(Request::new(ScanBaselineRequest {
                    node: host.clone(),
                    path: path.clone(),
                    apply_to: apply_to.clone().unwrap_or_default(),
                    timeout_seconds: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
                }))
                .await
                .map_err(|s| status_err("baseline scan", s))?
                .into_inner();
            let _ = writeln!(
                out,
                "baseline from {host}:{path}: {} files stored as desired for hosts {}{}",
                r.files,
                apply_to.as_deref().unwrap_or(&host),
                if r.errors > 0 {
                    format!(" ({} could not be read)", r.errors)
                } else {
                    String::new()
                }
            );
        }
        Baselines::List {
            hosts,
            path,
            output,
        } => {
            let list = client
                .list(ListBaselinesRequest {
                    host: hosts.unwrap_or_default(),
                    path_prefix: path.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_err("baseline list", s))?
                .into_inner()
                .baselines;
            if output.machine() {
                for b in &list {
                    let v = json!({
                        "hosts": b.host, "path": b.path, "state": json::state(&b.state),
                        "source": b.source, "set": time(b.set_unix_nanos), "set_by": b.set_by,
                    });
                    let _ = writeln!(out, "{v}");
                }
                return Ok(());
            }
            let mut rows = Rows::new(&["HOSTS", "SOURCE", "SET BY", "AGE", "STATE", "PATH"], &[]);
            let now = driftwatch_proto::time::now_unix_nanos();
            for b in &list {
                rows.push(vec![
                    b.host.clone(),
                    b.source.clone(),
                    b.set_by.clone(),
                    units::age(b.set_unix_nanos, now),
                    state_line(&b.state),
                    b.path.clone(),
                ]);
            }
            rows.print(out, output);
        }
    }
    Ok(())
}
