//! The agent's events as `driftwatch.v1` messages.

use driftwatch_proto::v1;

use crate::{event::Event, event::Outcome, identity::Identity};

fn outcome(o: &Outcome) -> v1::Outcome {
    v1::Outcome {
        ok: o.ok,
        errno: o.errno.unwrap_or(0),
        error: o.error.clone().unwrap_or_default(),
    }
}

fn process(p: &Identity) -> v1::Process {
    v1::Process {
        pid: p.pid,
        tid: p.tid,
        ppid: p.ppid,
        exec_id: p.info.exec_id.clone(),
        start_time_unix_nanos: p.info.start_time.unix_nanos(),
        uid: p.uid,
        user: p.user.as_deref().unwrap_or_default().to_owned(),
        gid: p.gid,
        euid: p.euid,
        loginuid: p.loginuid,
        login_user: p.login_user.as_deref().unwrap_or_default().to_owned(),
        comm: p.comm.clone(),
        exe: p.info.exe.clone(),
        args: p.info.args.clone(),
        cgroup: p.info.cgroup.clone(),
        container: p.info.placement.container.as_ref().map(|c| v1::Container {
            id: c.id.clone(),
            runtime: c.runtime.to_owned(),
            // Names and images need the runtime's API, which the agent
            // does not query yet.
            ..Default::default()
        }),
        pod_uid: p.info.placement.pod_uid.clone().unwrap_or_default(),
        ancestors: p
            .ancestors
            .iter()
            .map(|a| v1::Ancestor {
                pid: a.pid,
                exec_id: a.exec_id.clone(),
                exe: a.exe.clone(),
            })
            .collect(),
        // Pod metadata needs the Kubernetes API, which the agent does not
        // query yet: selectors on it fail closed.
        ..Default::default()
    }
}

/// The API form of an event bound for the collector; `None` for the
/// agent's own notices (start, policy, stats), which travel otherwise.
pub fn to_proto(e: &Event) -> Option<v1::Event> {
    use v1::event::Event as K;
    let (kind, time, node, p) = match e {
        Event::Exec {
            time,
            node,
            process,
            args_truncated,
        } => (
            K::Exec(v1::Exec {
                args_truncated: *args_truncated,
            }),
            time,
            node,
            Some(process),
        ),
        Event::Exit {
            time,
            node,
            process,
            exit_code,
            signal,
        } => (
            K::Exit(v1::Exit {
                exit_code: *exit_code,
                signal: *signal,
            }),
            time,
            node,
            Some(process),
        ),
        Event::File {
            time,
            node,
            op,
            path,
            new_path,
            target,
            resource,
            flags,
            mode,
            owner_uid,
            owner_gid,
            resolved_from,
            path_truncated,
            result,
            process,
        } => (
            K::File(v1::FileChange {
                op: (*op).to_owned(),
                path: path.clone(),
                new_path: new_path.clone().unwrap_or_default(),
                target: target.clone().unwrap_or_default(),
                resource: resource.clone().unwrap_or_default(),
                flags: flags.iter().map(|f| (*f).to_owned()).collect(),
                mode: mode.clone().unwrap_or_default(),
                owner_uid: *owner_uid,
                owner_gid: *owner_gid,
                resolved_from: (*resolved_from).to_owned(),
                path_truncated: *path_truncated,
                result: Some(outcome(result)),
            }),
            time,
            node,
            Some(process),
        ),
        Event::Connect {
            time,
            node,
            family,
            address,
            port,
            resource,
            result,
            process,
        } => (
            K::Connect(v1::Connect {
                family: (*family).to_owned(),
                address: address.clone(),
                port: u32::from(*port),
                resource: resource.clone().unwrap_or_default(),
                result: Some(outcome(result)),
            }),
            time,
            node,
            Some(process),
        ),
        Event::Loss {
            time,
            node,
            dropped,
        } => (
            K::Loss(v1::Loss {
                dropped: dropped.clone().into_iter().collect(),
            }),
            time,
            node,
            None,
        ),
        Event::Digest { time, node, state } => (
            K::Digest(v1::Digest {
                path: state.path.clone(),
                resource: state.resource.clone().unwrap_or_default(),
                exists: state.exists,
                sha256: state.sha256.clone().unwrap_or_default(),
                size: state.size,
                mode: state.mode,
                uid: state.uid,
                gid: state.gid,
                mtime_unix_nanos: state.mtime_unix_nanos,
                reason: state.reason.as_str().to_owned(),
                scan_id: state.scan_id.clone().unwrap_or_default(),
                trigger_seq: state.trigger_seq.unwrap_or(0),
                error: state.error.clone().unwrap_or_default(),
            }),
            time,
            node,
            None,
        ),
        Event::ScanDone {
            time,
            node,
            scan_id,
            path,
            files,
            errors,
            error,
        } => (
            K::ScanDone(v1::ScanDone {
                scan_id: scan_id.clone().unwrap_or_default(),
                path: path.clone(),
                files: *files,
                errors: *errors,
                error: error.clone().unwrap_or_default(),
            }),
            time,
            node,
            None,
        ),
        Event::PolicyApplied {
            time,
            node,
            version,
            watched_paths,
            watched_ports,
            ..
        } => (
            K::Policy(v1::PolicyStatus {
                version: version.clone(),
                applied: true,
                error: String::new(),
                watched_paths: watched_paths.clone(),
                watched_ports: watched_ports.iter().map(|p| u32::from(*p)).collect(),
            }),
            time,
            node,
            None,
        ),
        Event::PolicyRefused {
            time,
            node,
            version,
            error,
            ..
        } => (
            K::Policy(v1::PolicyStatus {
                version: version.clone(),
                applied: false,
                error: error.clone(),
                watched_paths: Vec::new(),
                watched_ports: Vec::new(),
            }),
            time,
            node,
            None,
        ),
        Event::AgentStart { .. } | Event::Stats { .. } => return None,
    };
    Some(v1::Event {
        event: Some(kind),
        process: p.map(process),
        seq: 0,
        time_unix_nanos: time.unix_nanos(),
        node: node.clone(),
    })
}
