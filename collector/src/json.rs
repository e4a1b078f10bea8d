//! The JSON shape of findings, approvals, baselines' states, events and
//! processes: what `driftwatch -o json` prints and what the exports write,
//! one shape in both.

use driftwatch_proto::{
    time::rfc3339,
    v1::{event, Approval, ApprovedChange, ConfigChange, Event, FileState, Finding, Gap, Process},
};
use serde_json::{json, Value};

use crate::query::kind_of;

/// A time as RFC 3339 (UTC, nanoseconds).
pub fn time(t: i64) -> String {
    rfc3339(t.into())
}

/// A process as JSON: the one shape every command prints, with every field
/// of the API's `Process` (times as RFC 3339, `*_unix_nanos` named
/// without the suffix).
pub fn process(p: &Process) -> Value {
    json!({
        "pid": p.pid, "tid": p.tid, "ppid": p.ppid, "exec_id": p.exec_id,
        "start_time": time(p.start_time_unix_nanos), "uid": p.uid, "user": p.user,
        "gid": p.gid, "euid": p.euid, "loginuid": p.loginuid, "login_user": p.login_user,
        "comm": p.comm, "exe": p.exe, "exe_sha256": p.exe_sha256, "fileless": p.fileless,
        "args": p.args, "cgroup": p.cgroup,
        "container": p.container.as_ref().map(|c| json!({"id": c.id, "runtime": c.runtime, "name": c.name, "image": c.image})),
        "pod_uid": p.pod_uid, "pod_name": p.pod_name, "pod_namespace": p.pod_namespace,
        "pod_labels": p.pod_labels, "service_account": p.service_account,
        "pod_metadata": p.pod_metadata,
        "ancestors": p.ancestors.iter().map(|a| json!({"pid": a.pid, "exec_id": a.exec_id, "exe": a.exe})).collect::<Vec<_>>(),
    })
}

pub fn event(e: &Event) -> Value {
    let p = e.process.as_ref();
    let mut v = json!({
        "type": "event",
        "kind": kind_of(e),
        "node": e.node,
        "seq": e.seq,
        "time": time(e.time_unix_nanos),
    });
    if let Some(p) = p {
        v["process"] = process(p);
    }
    let outcome = |o: &Option<driftwatch_proto::v1::Outcome>| {
        o.as_ref()
            .map(|o| json!({"ok": o.ok, "errno": o.errno, "error": o.error}))
    };
    match &e.event {
        Some(event::Event::Exec(x)) => v["args_truncated"] = json!(x.args_truncated),
        Some(event::Event::Exit(x)) => {
            v["exit_code"] = json!(x.exit_code);
            v["signal"] = json!(x.signal);
        }
        Some(event::Event::File(f)) => {
            v["op"] = json!(f.op);
            v["path"] = json!(f.path);
            if !f.new_path.is_empty() {
                v["new_path"] = json!(f.new_path);
            }
            if !f.target.is_empty() {
                v["target"] = json!(f.target);
            }
            v["resource"] = json!(f.resource);
            v["flags"] = json!(f.flags);
            if !f.mode.is_empty() {
                v["mode"] = json!(f.mode);
            }
            v["owner_uid"] = json!(f.owner_uid);
            v["owner_gid"] = json!(f.owner_gid);
            v["resolved_from"] = json!(f.resolved_from);
            v["result"] = json!(outcome(&f.result));
            if !f.via.is_empty() {
                v["via"] = json!(f.via);
            }
            if !f.xattr.is_empty() {
                v["xattr"] = json!(f.xattr);
            }
            if !f.seen_as.is_empty() {
                v["seen_as"] = json!(f.seen_as);
            }
            if !f.new_path_seen_as.is_empty() {
                v["new_path_seen_as"] = json!(f.new_path_seen_as);
            }
            if !f.guardrail.is_empty() {
                v["guardrail"] = json!(f.guardrail);
            }
        }
        Some(event::Event::Connect(c)) => {
            v["family"] = json!(c.family);
            v["address"] = json!(c.address);
            v["port"] = json!(c.port);
            v["resource"] = json!(c.resource);
            // No result: the socket reached the port without connect(2).
            v["result"] = json!(outcome(&c.result));
            v["protocol"] = json!(if c.protocol.is_empty() {
                "tcp"
            } else {
                &c.protocol
            });
            v["via"] = json!(if c.via.is_empty() { "connect" } else { &c.via });
            if !c.guardrail.is_empty() {
                v["guardrail"] = json!(c.guardrail);
            }
            if c.grant_id != 0 {
                v["grant_id"] = json!(c.grant_id);
            }
        }
        Some(event::Event::Loss(l)) => v["dropped"] = json!(l.dropped),
        Some(event::Event::Digest(d)) => {
            v["path"] = json!(d.path);
            v["resource"] = json!(d.resource);
            v["exists"] = json!(d.exists);
            v["sha256"] = json!(d.sha256);
            if !d.link_target.is_empty() {
                v["link_target"] = json!(d.link_target);
            }
            v["size"] = json!(d.size);
            v["mode"] = json!(format!("{:04o}", d.mode));
            v["uid"] = json!(d.uid);
            v["gid"] = json!(d.gid);
            v["reason"] = json!(d.reason);
            if !d.scan_id.is_empty() {
                v["scan_id"] = json!(d.scan_id);
            }
            if d.trigger_seq != 0 {
                v["trigger_seq"] = json!(d.trigger_seq);
            }
            if !d.error.is_empty() {
                v["error"] = json!(d.error);
            }
            if let Some(st) = &d.structure {
                // Secrets in it are salted hashes, masked on the node.
                v["structure"] = json!({
                    "format": st.format,
                    "entries": st.entries.iter().map(|e| json!({"key": e.key, "value": e.value, "masked": e.masked})).collect::<Vec<_>>(),
                    "note": (!st.note.is_empty()).then_some(&st.note),
                    "mask_key_id": st.mask_key_id,
                });
            }
        }
        Some(event::Event::ScanDone(d)) => {
            v["scan_id"] = json!(d.scan_id);
            v["path"] = json!(d.path);
            v["files"] = json!(d.files);
            v["errors"] = json!(d.errors);
            if !d.error.is_empty() {
                v["error"] = json!(d.error);
            }
        }
        Some(event::Event::Policy(p)) => {
            v["version"] = json!(p.version);
            v["applied"] = json!(p.applied);
            if !p.error.is_empty() {
                v["error"] = json!(p.error);
            }
            v["watched_paths"] = json!(p.watched_paths);
            v["watched_ports"] = json!(p.watched_ports);
        }
        None => {}
    }
    v
}

pub fn gap(g: &Gap) -> Value {
    json!({
        "type": "gap", "node": g.node, "reason": g.reason, "detail": g.detail,
        "from_seq": g.from_seq, "to_seq": g.to_seq,
        "from": time(g.from_time_unix_nanos), "to": time(g.to_time_unix_nanos),
    })
}

pub fn state(s: &Option<FileState>) -> Value {
    match s {
        None => Value::Null,
        Some(s) => json!({
            "exists": s.exists, "sha256": s.sha256, "size": s.size,
            "mode": s.mode.map(|m| format!("{m:04o}")), "uid": s.uid, "gid": s.gid,
        }),
    }
}

/// An optional process (an actor): `null` when none.
pub fn actor(p: &Option<Process>) -> Value {
    p.as_ref().map_or(Value::Null, process)
}

/// A diff as JSON: one object per key or line changed.
pub fn diff(changes: &[ConfigChange]) -> Value {
    Value::Array(
        changes
            .iter()
            .map(|c| {
                json!({
                    "op": c.op, "key": c.key,
                    "old": (c.op != "added").then_some(&c.old),
                    "new": (c.op != "removed").then_some(&c.new),
                    "masked": c.masked,
                })
            })
            .collect(),
    )
}

pub fn finding(f: &Finding) -> Value {
    json!({
        "diff": diff(&f.changes),
        "diff_note": (!f.changes_note.is_empty()).then_some(&f.changes_note),
        "id": f.id, "kind": f.kind, "status": f.status, "host": f.node, "resource": f.resource,
        "path": f.path, "actor": actor(&f.actor), "desired": state(&f.desired),
        "actual": state(&f.actual), "differences": f.differences, "summary": f.summary,
        "first_seen": time(f.first_seen_unix_nanos), "last_seen": time(f.last_seen_unix_nanos),
        "count": f.count, "failed": f.failed, "severity": f.severity,
        "address": (!f.address.is_empty()).then_some(&f.address),
        "port": (f.port != 0).then_some(f.port),
        "evidence": f.evidence.iter().map(|e| json!({"host": e.node, "seq": e.seq, "time": time(e.time_unix_nanos)})).collect::<Vec<_>>(),
        "approval_id": (f.approval_id != 0).then_some(f.approval_id),
        "history": f.history.iter().map(|h| json!({"status": h.status, "by": h.principal, "time": time(h.time_unix_nanos), "note": h.note})).collect::<Vec<_>>(),
    })
}

pub fn change(c: &ApprovedChange) -> Value {
    json!({
        "id": c.id, "approval_id": c.approval_id, "host": c.node, "resource": c.resource,
        "path": c.path, "before": state(&c.before), "after": state(&c.after),
        "diff": diff(&c.changes),
        "diff_note": (!c.changes_note.is_empty()).then_some(&c.changes_note),
        "actors": c.actors.iter().map(process).collect::<Vec<_>>(),
        "time": time(c.time_unix_nanos),
        "evidence": c.evidence.iter().map(|e| json!({"host": e.node, "seq": e.seq})).collect::<Vec<_>>(),
    })
}

pub fn approval(a: &Approval) -> Value {
    json!({
        "id": a.id, "resource": a.resource, "host": a.host,
        "digest": (!a.sha256.is_empty()).then_some(&a.sha256),
        "window_seconds": a.window_seconds, "reason": a.reason, "requester": a.requester,
        "requested": time(a.requested_unix_nanos), "status": a.status,
        "approver": (!a.approver.is_empty()).then_some(&a.approver),
        "decided": (a.decided_unix_nanos != 0).then(|| time(a.decided_unix_nanos)),
        "valid_until": (a.valid_until_unix_nanos != 0).then(|| time(a.valid_until_unix_nanos)),
        "note": a.note, "resolved_findings": a.resolved_findings,
        "kind": if a.kind.is_empty() { "change" } else { a.kind.as_str() },
        "who": (!a.who.is_empty()).then_some(&a.who),
        "uses": a.uses,
        "use_evidence": a.use_evidence.iter().map(|e| json!({"seq": e.seq, "node": e.node, "time": time(e.time_unix_nanos)})).collect::<Vec<_>>(),
        "changes": a.changes.iter().map(change).collect::<Vec<_>>(),
    })
}

/// One line saying what an event did, as the CLI's tables and the web
/// view show it.
pub fn detail(e: &Event) -> String {
    match &e.event {
        Some(event::Event::Exec(_)) => e
            .process
            .as_ref()
            .map(|p| p.args.join(" "))
            .unwrap_or_default(),
        Some(event::Event::Exit(x)) => format!("exit {} signal {}", x.exit_code, x.signal),
        Some(event::Event::File(f)) => {
            let res = f
                .result
                .as_ref()
                .map(|r| {
                    if r.ok {
                        String::new()
                    } else {
                        format!(" [{}]", r.error)
                    }
                })
                .unwrap_or_default();
            let guard = match f.guardrail.as_str() {
                "" | "allowed" => String::new(),
                g => format!(" (guardrail: {g})"),
            };
            let guard = if f.via.is_empty() {
                guard
            } else {
                format!(" [{}]{guard}", f.via)
            };
            if !f.xattr.is_empty() {
                format!("{} {} {}{res}{guard}", f.op, f.path, f.xattr)
            } else if f.op == "setflags" {
                let set = if f.flags.is_empty() {
                    "none".to_owned()
                } else {
                    f.flags.join(",")
                };
                format!("setflags {} {set}{res}{guard}", f.path)
            } else if f.new_path.is_empty() {
                format!("{} {}{res}{guard}", f.op, f.path)
            } else if f.flags.iter().any(|x| x == "RENAME_EXCHANGE") {
                format!("exchange {} <-> {}{res}{guard}", f.path, f.new_path)
            } else {
                format!("{} {} -> {}{res}{guard}", f.op, f.path, f.new_path)
            }
        }
        Some(event::Event::Connect(c)) => {
            let res = c
                .result
                .as_ref()
                .map(|r| {
                    if r.ok {
                        "ok".to_owned()
                    } else {
                        r.error.clone()
                    }
                })
                .unwrap_or_else(|| "result unknown".to_owned());
            let guard = match c.guardrail.as_str() {
                "" | "allowed" => String::new(),
                "granted" => format!(" (guardrail: granted by approval {})", c.grant_id),
                g => format!(" (guardrail: {g})"),
            };
            let how = match (c.protocol.as_str(), c.via.as_str()) {
                ("" | "tcp", "" | "connect") => String::new(),
                (p, "" | "connect") => format!(" [{p}]"),
                ("", v) => format!(" [tcp {v}]"),
                (p, v) => format!(" [{p} {v}]"),
            };
            let verb = if c.via == "sendmsg" {
                "send to"
            } else {
                "connect"
            };
            format!("{verb} {}:{}{how} {res}{guard}", c.address, c.port)
        }
        Some(event::Event::Loss(l)) => format!("kernel lost records: {:?}", l.dropped),
        Some(event::Event::Digest(d)) if !d.exists => {
            format!("state {} gone ({})", d.path, d.reason)
        }
        Some(event::Event::Digest(d)) => format!(
            "state {} sha256:{} {}B mode {:04o} owner {}:{} ({}){}",
            d.path,
            d.sha256.get(..12).unwrap_or(&d.sha256),
            d.size,
            d.mode,
            d.uid,
            d.gid,
            d.reason,
            match (&d.structure, d.error.is_empty()) {
                (_, false) => format!(" [{}]", d.error),
                (Some(st), true) => format!(" [{}, {} entries]", st.format, st.entries.len()),
                (None, true) => String::new(),
            }
        ),
        Some(event::Event::ScanDone(d)) => format!(
            "scan {} of {}: {} files, {} errors{}",
            if d.scan_id.is_empty() {
                "(watched)"
            } else {
                &d.scan_id
            },
            d.path,
            d.files,
            d.errors,
            if d.error.is_empty() {
                String::new()
            } else {
                format!(" [{}]", d.error)
            }
        ),
        Some(event::Event::Policy(p)) if p.applied => format!("policy {} applied", p.version),
        Some(event::Event::Policy(p)) => format!("policy {} refused: {}", p.version, p.error),
        None => String::new(),
    }
}
