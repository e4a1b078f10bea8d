//! Who did it: the process table and the identity attached to every event.
//!
//! The table is seeded from `/proc` at start, so processes that started
//! before the agent are attributed too, then kept exact by the kernel's
//! fork, exec and exit records.

pub mod cgroup;
pub mod exe;
pub mod mask;

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::Header;
use serde::Serialize;

use crate::clock::Clock;
use cgroup::Placement;

/// How long an exited process stays in the table for late events about it.
const EXITED_GRACE: Duration = Duration::from_secs(30);
/// How many ancestors an identity lists.
const MAX_ANCESTORS: usize = 16;

/// What a process shares with every event it appears in; built once per
/// exec or fork and shared, so attributing an event copies no strings.
#[derive(Debug, Serialize)]
pub struct ProcInfo {
    /// Stable id of the process instance (unique across pid reuse and hosts).
    pub exec_id: String,
    /// When the process started (RFC 3339).
    pub start_time: crate::clock::Time,
    /// Executable path; `memfd:NAME` for a program run from memory,
    /// `PATH (deleted)` for one whose file was removed.
    pub exe: String,
    /// SHA-256 of the executable (absent when it could not be read, or
    /// while a large one is still being hashed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<Arc<str>>,
    /// The program has no file in any directory: a memfd or a deleted file.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fileless: bool,
    /// Arguments, secrets masked.
    pub args: Vec<String>,
    /// cgroup v2 path.
    pub cgroup: String,
    /// Container and pod.
    #[serde(flatten)]
    pub placement: Placement,
    /// These fields as a `driftwatch.v1.Process` message, encoded once
    /// (see `stream::convert::Encoder`).
    #[serde(skip)]
    pub wire: std::sync::OnceLock<Vec<u8>>,
    /// The whole `Process` message of this process's last event, with
    /// what varies between its events: a process's events mostly come
    /// from one thread under one identity, and then cost a copy.
    #[serde(skip)]
    pub wire_last: std::sync::Mutex<Option<crate::stream::convert::WireProcess>>,
}

/// One process in the table.
#[derive(Clone, Debug)]
pub struct Proc {
    /// Process id.
    pub tgid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Start time in clock ticks since boot (the resolution `/proc` offers,
    /// so ids computed from `/proc` and from the kernel agree).
    pub start_ticks: u64,
    /// Shared identity fields.
    pub info: Arc<ProcInfo>,
    /// Ancestry, computed on first use.
    ancestors: Option<Arc<Vec<Ancestor>>>,
}

/// An ancestor in an identity's chain.
#[derive(Clone, Debug, Serialize)]
pub struct Ancestor {
    /// Process id.
    pub pid: u32,
    /// Stable id.
    pub exec_id: String,
    /// Executable path.
    pub exe: String,
}

/// The identity attached to an event.
#[derive(Clone, Debug, Serialize)]
pub struct Identity {
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    /// Real gid.
    pub gid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Login uid (the human behind sudo); absent when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loginuid: Option<u32>,
    /// Login user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_user: Option<Arc<str>>,
    /// `comm`.
    pub comm: Arc<str>,
    /// exec_id, start time, exe, args, cgroup, container, pod.
    #[serde(flatten)]
    pub info: Arc<ProcInfo>,
    /// Parent, grandparent, …
    pub ancestors: Arc<Vec<Ancestor>>,
    /// The pod, when the process runs in one the API told of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Arc<crate::pods::PodMeta>>,
    /// Whether the pod's metadata is there (for a process in a pod).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_metadata: Option<crate::pods::PodState>,
    /// The container's name and image, from the pod's status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_meta: Option<Arc<ContainerMeta>>,
}

/// A container's name and image, as its pod's status lists them.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ContainerMeta {
    /// Container name.
    pub name: String,
    /// Image.
    pub image: String,
}

/// The process table and the caches identities are built from.
pub struct ProcessTable {
    procs: HashMap<u32, Proc>,
    exited: VecDeque<(Instant, u32, u64)>,
    boot_id: String,
    ns_per_tick: u64,
    users: HashMap<u32, Option<Arc<str>>>,
    cgroup_root: Option<PathBuf>,
    cgroup_paths: HashMap<u64, String>,
    cgroup_scanned: Option<Instant>,
    clock: Clock,
    /// The last `comm` seen and its text: a run of events mostly comes
    /// from one thread, and then shares one string.
    last_comm: ([u8; agent_common::COMM_LEN], Arc<str>),
    /// Pod metadata from the Kubernetes API (empty without one).
    pub pods: crate::pods::Pods,
    /// Digests of executables.
    exes: exe::ExeHashes,
}

/// FNV-1a, 64-bit: a hash that never changes between builds, so ids do not.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Splits NUL-separated argv bytes.
pub fn split_argv(bytes: &[u8]) -> Vec<String> {
    // A command line can be megabytes (/proc/PID/cmdline has no bound);
    // the collector refuses a process with over 32 KiB of arguments, and
    // one refused event would hold back every event after it.
    let bytes = &bytes[..bytes.len().min(MAX_ARGV_BYTES)];
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The most bytes of a command line kept; the rest is cut.
pub const MAX_ARGV_BYTES: usize = 16 * 1024;

/// Text up to the first NUL.
pub fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl ProcessTable {
    /// An empty table for this boot. `cgroup_root` is the cgroup2 mount.
    pub fn new(cgroup_root: Option<PathBuf>, clock: Clock) -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as u64 } else { 100 };
        Self {
            procs: HashMap::new(),
            exited: VecDeque::new(),
            boot_id,
            ns_per_tick: 1_000_000_000 / hz,
            users: HashMap::new(),
            cgroup_root,
            cgroup_paths: HashMap::new(),
            cgroup_scanned: None,
            clock,
            last_comm: ([0; agent_common::COMM_LEN], Arc::from("")),
            pods: crate::pods::Pods::default(),
            exes: exe::ExeHashes::default(),
        }
    }

    /// `comm` as text, shared with the last event's when it is the same.
    fn comm(&mut self, raw: &[u8; agent_common::COMM_LEN]) -> Arc<str> {
        if self.last_comm.0 != *raw {
            self.last_comm = (*raw, Arc::from(cstr(raw)));
        }
        self.last_comm.1.clone()
    }

    /// Fills the table from `/proc`; returns how many processes were found.
    pub fn seed(&mut self) -> usize {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            tracing::warn!(
                "cannot read /proc; processes started before the agent will lack identity"
            );
            return 0;
        };
        for entry in dir.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(p) = self.read_proc(pid) {
                    self.procs.insert(pid, p);
                }
            }
        }
        self.procs.len()
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// True when the table is empty.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn exec_id(&self, tgid: u32, start_ticks: u64) -> String {
        format!(
            "{:016x}",
            fnv1a(format!("{}:{tgid}:{start_ticks}", self.boot_id).as_bytes())
        )
    }

    fn ticks(&self, ns: u64) -> u64 {
        ns / self.ns_per_tick
    }

    /// A table entry; the shared fields are built here, once.
    fn entry(&self, tgid: u32, ppid: u32, start_ticks: u64, shape: Shape) -> Proc {
        Proc {
            tgid,
            ppid,
            start_ticks,
            info: Arc::new(ProcInfo {
                exec_id: self.exec_id(tgid, start_ticks),
                start_time: self.clock.at_boot_ns(start_ticks * self.ns_per_tick),
                exe: shape.exe,
                exe_sha256: shape.exe_sha256,
                fileless: shape.fileless,
                args: shape.args,
                cgroup: shape.cgroup,
                placement: shape.placement,
                wire: std::sync::OnceLock::new(),
                wire_last: std::sync::Mutex::new(None),
            }),
            ancestors: None,
        }
    }

    /// Reads one process from `/proc`; `None` when it is gone.
    fn read_proc(&self, pid: u32) -> Option<Proc> {
        let base = PathBuf::from(format!("/proc/{pid}"));
        let stat = std::fs::read_to_string(base.join("stat")).ok()?;
        // comm may hold spaces and parens: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let start_ticks = fields.get(19)?.parse().ok()?;
        let raw = std::fs::read_link(base.join("exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let (exe, fileless) = exe::display_name(&raw, false);
        let exe_sha256 = if raw.is_empty() {
            None
        } else {
            self.exes.of(pid, &raw, fileless)
        };
        let args = std::fs::read(base.join("cmdline"))
            .map(|b| mask::mask_argv(&split_argv(&b)))
            .unwrap_or_default();
        let (cgroup, placement) = std::fs::read_to_string(base.join("cgroup"))
            .map(|t| cgroup::from_proc_cgroup(&t))
            .unwrap_or_default();
        Some(self.entry(
            pid,
            ppid,
            start_ticks,
            Shape {
                exe,
                exe_sha256,
                fileless,
                args,
                cgroup,
                placement,
            },
        ))
    }

    /// cgroup path and placement for a live process, falling back to the
    /// kernel's cgroup id when the process is already gone.
    fn cgroup_of(&mut self, tgid: u32, cgroup_id: u64) -> (String, Placement) {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")) {
            return cgroup::from_proc_cgroup(&text);
        }
        let path = self.cgroup_path_by_id(cgroup_id).unwrap_or_default();
        let placement = cgroup::parse(&path);
        (path, placement)
    }

    /// A cgroup2 id is the inode number of its directory; map it by a walk
    /// of the hierarchy, redone at most once a second on a miss.
    fn cgroup_path_by_id(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.clone()?;
        if self
            .cgroup_scanned
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.cgroup_scanned = Some(Instant::now());
        let mut stack = vec![root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > 100_000 {
                break;
            }
            use std::os::unix::fs::MetadataExt;
            if let Ok(md) = std::fs::metadata(&dir) {
                let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
                self.cgroup_paths
                    .insert(md.ino(), format!("/{}", rel.display()));
            }
            if let Ok(rd) = std::fs::read_dir(&dir) {
                stack.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        self.cgroup_paths.get(&id).cloned()
    }

    /// A process executed a new program.
    /// `deleted`: the kernel found no link left to the executable.
    /// `exe_key`: the executable's `(s_dev, inode, mtime ns)` as the kernel
    /// read them.
    pub fn on_exec(
        &mut self,
        h: &Header,
        raw_exe: &str,
        deleted: bool,
        exe_key: Option<exe::Key>,
        argv: &[u8],
    ) {
        let (cgroup, placement) = self.cgroup_of(h.tgid, h.cgroup_id);
        let args = mask::mask_argv(&split_argv(argv));
        let (exe, fileless) = exe::display_name(raw_exe, deleted);
        let exe_sha256 = self.exes.of_key(h.tgid, raw_exe, fileless, exe_key);
        let p = self.entry(
            h.tgid,
            h.ppid,
            self.ticks(h.start_ns),
            Shape {
                exe,
                exe_sha256,
                fileless,
                args,
                cgroup,
                placement,
            },
        );
        self.procs.insert(h.tgid, p);
    }

    /// A process forked a child, which inherits its program and cgroup.
    pub fn on_fork(&mut self, parent: &Header, child: u32, child_start_ns: u64) {
        let base = self
            .procs
            .get(&parent.tgid)
            .cloned()
            .or_else(|| self.read_proc(parent.tgid));
        let shape = base.map(|b| Shape::of(&b.info)).unwrap_or_default();
        let p = self.entry(child, parent.tgid, self.ticks(child_start_ns), shape);
        self.procs.insert(child, p);
    }

    /// A process exited; it is kept a little while for late events.
    pub fn on_exit(&mut self, tgid: u32, start_ns: u64) {
        self.exited
            .push_back((Instant::now(), tgid, self.ticks(start_ns)));
        while let Some(&(at, pid, ticks)) = self.exited.front() {
            if at.elapsed() < EXITED_GRACE {
                break;
            }
            self.exited.pop_front();
            // Remove only if the pid was not reused meanwhile.
            if self.procs.get(&pid).is_some_and(|p| p.start_ticks == ticks) {
                self.procs.remove(&pid);
            }
        }
    }

    fn user_name(&mut self, uid: u32) -> Option<Arc<str>> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| Arc::from(u.name))
            })
            .clone()
    }

    /// The chain of parents from `next` up, nearest first.
    fn ancestry(&mut self, mut next: u32) -> Vec<Ancestor> {
        let mut ancestors = Vec::new();
        while next > 0 && ancestors.len() < MAX_ANCESTORS {
            let Some(a) = self
                .procs
                .get(&next)
                .cloned()
                .or_else(|| self.read_proc(next))
            else {
                break;
            };
            ancestors.push(Ancestor {
                pid: a.tgid,
                exec_id: a.info.exec_id.clone(),
                exe: a.info.exe.clone(),
            });
            if a.ppid == a.tgid {
                break;
            }
            next = a.ppid;
        }
        ancestors
    }

    /// The identity of the task that made `h`.
    pub fn identity(&mut self, h: &Header) -> Identity {
        let ticks = self.ticks(h.start_ns);
        let known = self
            .procs
            .get(&h.tgid)
            .filter(|p| p.start_ticks == ticks)
            .cloned();
        let mut proc = match known {
            Some(p) => p,
            None => {
                // Not seen yet (started while the table was being seeded):
                // read it now, or fall back to what the kernel told us.
                let p = match self.read_proc(h.tgid).filter(|p| p.start_ticks == ticks) {
                    Some(p) => p,
                    None => {
                        let (cgroup, placement) = self.cgroup_of(h.tgid, h.cgroup_id);
                        let shape = Shape {
                            cgroup,
                            placement,
                            ..Shape::default()
                        };
                        self.entry(h.tgid, h.ppid, ticks, shape)
                    }
                };
                self.procs.insert(h.tgid, p.clone());
                p
            }
        };
        let ancestors = match &proc.ancestors {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(self.ancestry(h.ppid));
                proc.ancestors = Some(a.clone());
                self.procs.insert(h.tgid, proc.clone());
                a
            }
        };
        let loginuid = (h.loginuid != u32::MAX).then_some(h.loginuid);
        let (pod, pod_metadata) = match proc.info.placement.pod_uid.as_deref() {
            Some(uid) => {
                let (meta, state) = self.pods.lookup(uid);
                (meta, Some(state))
            }
            None => (None, None),
        };
        let container_meta = pod.as_ref().and_then(|p| {
            let id = &proc.info.placement.container.as_ref()?.id;
            p.containers.get(id).cloned()
        });
        Identity {
            pid: h.tgid,
            tid: h.pid,
            ppid: h.ppid,
            uid: h.uid,
            user: self.user_name(h.uid),
            gid: h.gid,
            euid: h.euid,
            loginuid,
            login_user: loginuid.and_then(|u| self.user_name(u)),
            comm: self.comm(&h.comm),
            info: proc.info,
            ancestors,
            pod,
            pod_metadata,
            container_meta,
        }
    }
}

/// The per-program part of an entry: what exec sets and fork inherits.
#[derive(Default)]
struct Shape {
    exe: String,
    exe_sha256: Option<Arc<str>>,
    fileless: bool,
    args: Vec<String>,
    cgroup: String,
    placement: Placement,
}

impl Shape {
    fn of(info: &ProcInfo) -> Self {
        Self {
            exe: info.exe.clone(),
            exe_sha256: info.exe_sha256.clone(),
            fileless: info.fileless,
            args: info.args.clone(),
            cgroup: info.cgroup.clone(),
            placement: info.placement.clone(),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_huge_command_line_is_cut_to_what_the_collector_takes() {
        let mut cmdline = Vec::new();
        for i in 0..5000 {
            cmdline.extend_from_slice(format!("--arg-{i}=value").as_bytes());
            cmdline.push(0);
        }
        assert!(cmdline.len() > 2 * MAX_ARGV_BYTES);
        let args = mask::mask_argv(&split_argv(&cmdline));
        let total: usize = args.iter().map(String::len).sum();
        assert!(total <= MAX_ARGV_BYTES, "{total} bytes kept");
        assert_eq!(args[0], "--arg-0=value");
    }

    use super::*;

    #[test]
    fn argv_splitting() {
        assert_eq!(split_argv(b"ls\0-l\0/tmp\0"), ["ls", "-l", "/tmp"]);
        assert_eq!(split_argv(b""), Vec::<String>::new());
        assert_eq!(split_argv(b"a\0\0b\0"), ["a", "", "b"]);
        assert_eq!(cstr(b"abc\0def"), "abc");
    }

    #[test]
    fn seeded_table_knows_this_process_and_ids_are_stable() {
        let mut t = ProcessTable::new(None, Clock::new());
        assert!(t.seed() > 1);
        let me = std::process::id();
        let p = t.procs.get(&me).cloned().expect("own process in table");
        assert!(p.info.exe.ends_with(
            std::env::current_exe()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        ));
        assert_eq!(p.info.exec_id, t.exec_id(me, p.start_ticks));
        assert_ne!(
            t.exec_id(me, p.start_ticks),
            t.exec_id(me, p.start_ticks + 1)
        );
        assert_eq!(p.info.exec_id.len(), 16);
    }
}
