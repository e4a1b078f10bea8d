//! The agent's events as `driftwatch.v1` messages.

use std::sync::Arc;

use driftwatch_proto::v1;
use prost::{encoding, Message as _};

use crate::{
    event::Outcome,
    event::{Event, Node},
    identity::{Identity, ProcInfo},
};

fn outcome(o: Outcome) -> v1::Outcome {
    v1::Outcome {
        ok: o.ok,
        errno: o.errno.unwrap_or(0),
        error: o.error.unwrap_or_default(),
    }
}

/// What a process shares with all its events, as a message.
fn process_static(info: &ProcInfo) -> v1::Process {
    v1::Process {
        exec_id: info.exec_id.clone(),
        start_time_unix_nanos: info.start_time.unix_nanos(),
        exe: info.exe.clone(),
        exe_sha256: info.exe_sha256.as_deref().unwrap_or_default().to_owned(),
        fileless: info.fileless,
        args: info.args.clone(),
        cgroup: info.cgroup.clone(),
        container: info.placement.container.as_ref().map(|c| v1::Container {
            id: c.id.clone(),
            runtime: c.runtime.to_owned(),
            // Names and images need the runtime's API, which the agent
            // does not query yet.
            ..Default::default()
        }),
        pod_uid: info.placement.pod_uid.clone().unwrap_or_default(),
        // Pod metadata needs the Kubernetes API, which the agent does not
        // query yet: selectors on it fail closed.
        ..Default::default()
    }
}

/// What differs from one event of a process to the next.
fn process_dynamic(p: &Identity) -> v1::Process {
    v1::Process {
        pid: p.pid,
        tid: p.tid,
        ppid: p.ppid,
        uid: p.uid,
        user: p.user.as_deref().unwrap_or_default().to_owned(),
        gid: p.gid,
        euid: p.euid,
        loginuid: p.loginuid,
        login_user: p.login_user.as_deref().unwrap_or_default().to_owned(),
        comm: p.comm.to_string(),
        ancestors: p
            .ancestors
            .iter()
            .map(|a| v1::Ancestor {
                pid: a.pid,
                exec_id: a.exec_id.clone(),
                exe: a.exe.clone(),
            })
            .collect(),
        pod_name: p.pod.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
        pod_namespace: p
            .pod
            .as_ref()
            .map(|m| m.namespace.clone())
            .unwrap_or_default(),
        pod_labels: p
            .pod
            .as_ref()
            .map(|m| m.labels.clone().into_iter().collect())
            .unwrap_or_default(),
        service_account: p
            .pod
            .as_ref()
            .map(|m| m.service_account.clone())
            .unwrap_or_default(),
        pod_metadata: p
            .pod_metadata
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        // Merged with the static part's id and runtime on decoding.
        container: p.container_meta.as_ref().map(|c| v1::Container {
            name: c.name.clone(),
            image: c.image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What can differ between two events of one process: the key of
/// [`WireProcess`] (the container's name and image follow from the pod and
/// the process's container id, so the pod stands for them). Names and ancestry are shared values, held here so
/// that the same pointer keeps meaning the same text.
#[derive(Debug)]
struct Varying {
    pid: u32,
    tid: u32,
    ppid: u32,
    uid: u32,
    gid: u32,
    euid: u32,
    loginuid: Option<u32>,
    comm: Arc<str>,
    user: Option<Arc<str>>,
    login_user: Option<Arc<str>>,
    ancestors: Arc<Vec<crate::identity::Ancestor>>,
    pod: Option<Arc<crate::pods::PodMeta>>,
    pod_metadata: Option<crate::pods::PodState>,
}

fn same_name(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Varying {
    fn of(p: &Identity) -> Self {
        Self {
            pid: p.pid,
            tid: p.tid,
            ppid: p.ppid,
            uid: p.uid,
            gid: p.gid,
            euid: p.euid,
            loginuid: p.loginuid,
            comm: p.comm.clone(),
            user: p.user.clone(),
            login_user: p.login_user.clone(),
            ancestors: p.ancestors.clone(),
            pod: p.pod.clone(),
            pod_metadata: p.pod_metadata,
        }
    }

    /// True when `p` varies in nothing from what this was built from
    /// (compared in place: a hit copies nothing).
    fn matches(&self, p: &Identity) -> bool {
        self.pid == p.pid
            && self.tid == p.tid
            && self.ppid == p.ppid
            && self.uid == p.uid
            && self.gid == p.gid
            && self.euid == p.euid
            && self.loginuid == p.loginuid
            && self.comm == p.comm
            && same_name(&self.user, &p.user)
            && same_name(&self.login_user, &p.login_user)
            && Arc::ptr_eq(&self.ancestors, &p.ancestors)
            && self.pod_metadata == p.pod_metadata
            && match (&self.pod, &p.pod) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// A process's last `Process` message, encoded, and what it was built from.
#[derive(Debug)]
pub struct WireProcess {
    key: Varying,
    bytes: Vec<u8>,
}

/// Appends `p` as the `Event.process` field: from the process's cache when
/// its last event had the same varying part, else built and cached.
fn encode_process(p: &Identity, buf: &mut Vec<u8>) {
    let mut last = p
        .info
        .wire_last
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !last.as_ref().is_some_and(|w| w.key.matches(p)) {
        let statics = p
            .info
            .wire
            .get_or_init(|| process_static(&p.info).encode_to_vec());
        let dynamic = process_dynamic(p);
        let mut bytes = Vec::with_capacity(dynamic.encoded_len() + statics.len());
        dynamic.encode_raw(&mut bytes);
        bytes.extend_from_slice(statics);
        *last = Some(WireProcess {
            key: Varying::of(p),
            bytes,
        });
    }
    if let Some(w) = last.as_ref() {
        encoding::encode_key(PROCESS_FIELD, encoding::WireType::LengthDelimited, buf);
        encoding::encode_varint(w.bytes.len() as u64, buf);
        buf.extend_from_slice(&w.bytes);
    }
}

fn process(p: &Identity) -> v1::Process {
    let mut m = process_static(&p.info);
    m.merge(&*process_dynamic(p).encode_to_vec())
        .unwrap_or_default();
    m
}

/// Field number of `Event.process`.
const PROCESS_FIELD: u32 = 100;
/// Field number of `Event.node`.
const NODE_FIELD: u32 = 103;

/// Encodes events as `driftwatch.v1.Event`s, as [`to_proto`] would,
/// without building what repeats again: what a process shares with all
/// its events is encoded once per process, and the whole `Process` once per
/// change of thread or identity, then appended (protobuf merges a message's
/// fields in any order); the node's name is appended from the event's
/// shared text; a file change's strings are written into the last one's.
#[derive(Default)]
pub struct Encoder {
    file: v1::FileChange,
}

impl Encoder {
    /// Appends `e`, numbered `seq`, to `buf`; false for the agent's own
    /// notices (start, stats), which are not bound for the collector.
    pub fn encode(&mut self, e: Event, seq: u64, buf: &mut Vec<u8>) -> bool {
        let Some((mut m, p, node)) = parts(e, &mut self.file) else {
            return false;
        };
        m.seq = seq;
        m.encode_raw(buf);
        if !node.is_empty() {
            encoding::encode_key(NODE_FIELD, encoding::WireType::LengthDelimited, buf);
            encoding::encode_varint(node.len() as u64, buf);
            buf.extend_from_slice(node.as_bytes());
        }
        if let Some(p) = p {
            encode_process(&p, buf);
        }
        if let Some(v1::event::Event::File(f)) = m.event.take() {
            self.file = f;
        }
        true
    }
}

/// The API form of an event bound for the collector; `None` for the
/// agent's own notices (start, policy, stats), which travel otherwise.
pub fn to_proto(e: &Event) -> Option<v1::Event> {
    let (mut m, p, node) = parts(e.clone(), &mut v1::FileChange::default())?;
    m.process = p.as_ref().map(process);
    m.node = node.to_string();
    Some(m)
}

/// A file's structure as the API carries it.
fn structure(s: &crate::structure::Structure) -> v1::Structure {
    v1::Structure {
        format: s.format.to_owned(),
        entries: s
            .entries
            .iter()
            .map(|e| v1::StructureEntry {
                key: e.key.clone(),
                value: e.value.clone(),
                masked: e.masked,
            })
            .collect(),
        note: s.note.clone(),
        mask_key_id: s.mask_key_id.clone(),
    }
}

fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

/// The event without its process and node, the process, and the node. A
/// file change is written into `file`, whose strings are reused.
fn parts(e: Event, file: &mut v1::FileChange) -> Option<(v1::Event, Option<Identity>, Node)> {
    use v1::event::Event as K;
    let (kind, time, node, p) = match e {
        Event::Exec {
            time,
            node,
            process,
            args_truncated,
        } => (
            K::Exec(v1::Exec { args_truncated }),
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
            K::Exit(v1::Exit { exit_code, signal }),
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
            via,
            xattr,
            seen_as,
            new_path_seen_as,
            result,
            guardrail,
            process,
        } => (
            {
                let mut f = std::mem::take(file);
                set(&mut f.op, op);
                f.path = path;
                f.new_path = new_path.unwrap_or_default();
                f.target = target.unwrap_or_default();
                set(&mut f.resource, resource.as_deref().unwrap_or(""));
                let flags = flags.as_slice();
                f.flags.truncate(flags.len());
                for (i, name) in flags.iter().enumerate() {
                    match f.flags.get_mut(i) {
                        Some(s) => set(s, name),
                        None => f.flags.push((*name).to_owned()),
                    }
                }
                f.mode.clear();
                if let Some(m) = mode {
                    use std::fmt::Write as _;
                    let _ = write!(f.mode, "{m}");
                }
                f.owner_uid = owner_uid;
                f.owner_gid = owner_gid;
                set(&mut f.resolved_from, resolved_from);
                f.path_truncated = path_truncated;
                let r = f.result.get_or_insert_default();
                r.ok = result.ok;
                r.errno = result.errno.unwrap_or(0);
                set(&mut r.error, result.error.as_deref().unwrap_or(""));
                set(&mut f.guardrail, guardrail.unwrap_or(""));
                set(&mut f.via, via.unwrap_or(""));
                f.xattr = xattr.unwrap_or_default();
                f.seen_as = seen_as.unwrap_or_default();
                f.new_path_seen_as = new_path_seen_as.unwrap_or_default();
                K::File(f)
            },
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
            protocol,
            via,
            guardrail,
            grant_id,
            process,
        } => (
            K::Connect(v1::Connect {
                family: family.to_owned(),
                address,
                port: u32::from(port),
                resource: resource.as_deref().unwrap_or_default().to_owned(),
                result: result.map(outcome),
                protocol: protocol.to_owned(),
                via: via.to_owned(),
                guardrail: guardrail.unwrap_or_default().to_owned(),
                grant_id: grant_id.unwrap_or_default(),
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
                dropped: dropped.into_iter().collect(),
            }),
            time,
            node,
            None,
        ),
        Event::Digest { time, node, state } => (
            K::Digest(v1::Digest {
                path: state.path,
                resource: state.resource.unwrap_or_default(),
                exists: state.exists,
                sha256: state.sha256.unwrap_or_default(),
                size: state.size,
                mode: state.mode,
                uid: state.uid,
                gid: state.gid,
                mtime_unix_nanos: state.mtime_unix_nanos,
                reason: state.reason.as_str().to_owned(),
                scan_id: state.scan_id.unwrap_or_default(),
                trigger_seq: state.trigger_seq.unwrap_or(0),
                error: state.error.unwrap_or_default(),
                link_target: state.link_target.unwrap_or_default(),
                structure: state.structure.as_deref().map(structure),
                attributes: state.attributes.map(|a| v1::Attributes {
                    xattrs: a.xattrs.into_iter().collect(),
                    flags: a.flags.into_iter().map(str::to_owned).collect(),
                }),
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
                scan_id: scan_id.unwrap_or_default(),
                path,
                files,
                errors,
                error: error.unwrap_or_default(),
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
                version,
                applied: true,
                error: String::new(),
                watched_paths,
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
                version,
                applied: false,
                error,
                watched_paths: Vec::new(),
                watched_ports: Vec::new(),
            }),
            time,
            node,
            None,
        ),
        Event::AgentStart { .. } | Event::Stats { .. } => return None,
    };
    Some((
        v1::Event {
            event: Some(kind),
            process: None,
            seq: 0,
            time_unix_nanos: time.unix_nanos(),
            node: String::new(),
            chain: Vec::new(),
        },
        p,
        node,
    ))
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{
        clock::Time,
        identity::{cgroup::Container, cgroup::Placement, Ancestor},
    };

    fn identity() -> Identity {
        Identity {
            pid: 42,
            tid: 43,
            ppid: 1,
            uid: 1000,
            user: Some("ada".into()),
            gid: 1000,
            euid: 0,
            loginuid: Some(1000),
            login_user: Some("ada".into()),
            comm: "vim".into(),
            info: Arc::new(ProcInfo {
                exec_id: "e1".into(),
                start_time: Time(1_700_000_000_000_000_000),
                exe: "/usr/bin/vim".into(),
                exe_sha256: None,
                fileless: false,
                args: vec!["vim".into(), "/etc/app.yaml".into()],
                cgroup: "/kubepods/pod1/abc".into(),
                placement: Placement {
                    container: Some(Container {
                        id: "c".repeat(64),
                        runtime: "containerd",
                    }),
                    pod_uid: Some("pod1".into()),
                },
                wire: Default::default(),
                wire_last: Default::default(),
            }),
            ancestors: Arc::new(vec![Ancestor {
                pid: 1,
                exec_id: "e0".into(),
                exe: "/sbin/init".into(),
            }]),
            pod: Some(Arc::new(crate::pods::PodMeta {
                name: "api-7d9".into(),
                namespace: "payments".into(),
                uid: "pod1".into(),
                labels: [("app".to_owned(), "api".to_owned())].into(),
                service_account: "api".into(),
                containers: Default::default(),
            })),
            pod_metadata: Some(crate::pods::PodState::Known),
            container_meta: Some(Arc::new(crate::identity::ContainerMeta {
                name: "main".into(),
                image: "registry.local/api:1".into(),
            })),
        }
    }

    #[test]
    fn the_spooled_encoding_is_the_api_message() {
        let file = Event::File {
            time: Time(1_700_000_000_123_456_789),
            node: "n1".into(),
            op: "open",
            path: "/etc/app.yaml".into(),
            new_path: None,
            target: None,
            resource: Some("app".into()),
            flags: ["O_WRONLY", "O_TRUNC"].into(),
            mode: None,
            owner_uid: None,
            owner_gid: None,
            resolved_from: "file",
            path_truncated: false,
            via: None,
            xattr: None,
            seen_as: None,
            new_path_seen_as: None,
            result: Outcome::from_ret(-13),
            guardrail: Some("killed"),
            process: identity(),
        };
        let loss = Event::Loss {
            time: Time(5),
            node: "n1".into(),
            dropped: [("file".to_owned(), 3)].into(),
        };
        // The same process from another thread, then under another user:
        // its cached message must not be reused for either.
        let mut other_thread = file.clone();
        let mut other_user = file.clone();
        if let (Event::File { process: t, .. }, Event::File { process: u, .. }) =
            (&mut other_thread, &mut other_user)
        {
            t.tid = 44;
            u.uid = 0;
            u.user = Some("root".into());
            u.comm = "sudo".into();
        }
        // The same process before its pod was known.
        let mut pending = file.clone();
        if let Event::File { process: p, .. } = &mut pending {
            p.pod = None;
            p.pod_metadata = Some(crate::pods::PodState::Pending);
            p.container_meta = None;
        }
        // A change with fewer of everything than the one before it: what
        // the encoder kept of the last change must not show through.
        let plain = Event::File {
            time: Time(1_700_000_000_200_000_000),
            node: "n1".into(),
            op: "close_write",
            path: "/etc/app.yaml".into(),
            new_path: None,
            target: None,
            resource: None,
            flags: Default::default(),
            mode: None,
            owner_uid: None,
            owner_gid: None,
            resolved_from: "name",
            path_truncated: false,
            via: None,
            xattr: None,
            seen_as: None,
            new_path_seen_as: None,
            result: Outcome::from_ret(0),
            guardrail: None,
            process: identity(),
        };
        let mut encoder = Encoder::default();
        for (e, seq) in [
            (&pending, 6),
            (&file, 7),
            (&file, 8),
            (&loss, 9),
            (&other_thread, 10),
            (&other_user, 11),
            (&file, 12),
            (&plain, 13),
            (&pending, 14),
            (&plain, 15),
        ] {
            let mut want = to_proto(e).unwrap();
            want.seq = seq;
            let mut buf = Vec::new();
            assert!(encoder.encode(e.clone(), seq, &mut buf));
            assert_eq!(v1::Event::decode(&*buf).unwrap(), want, "seq {seq}");
            assert_eq!(want.node, "n1");
        }
        // Spooled with seq 0 and the number appended: the same message.
        let mut buf = Vec::new();
        assert!(encoder.encode(file.clone(), 0, &mut buf));
        encoding::uint64::encode(101, &11, &mut buf);
        let mut want = to_proto(&file).unwrap();
        want.seq = 11;
        assert_eq!(v1::Event::decode(&*buf).unwrap(), want);
        let p = want.process.as_ref().unwrap();
        assert_eq!(p.exe, "/usr/bin/vim");
        // The container's id (per process) and name (from the pod) merge.
        let c = p.container.as_ref().unwrap();
        assert_eq!((c.id.len(), c.name.as_str()), (64, "main"));
        assert_eq!(
            (p.pod_namespace.as_str(), p.pod_metadata.as_str()),
            ("payments", "known")
        );
    }
}
