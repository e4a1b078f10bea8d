//! Loading the kernel sensors, filling their watch maps and reading their
//! counters.
//!
//! One sensor set runs on kernels without kprobes, fentry or BPF LSM (the
//! kind these nodes run): syscall tracepoints, BTF-typed scheduler
//! tracepoints and cgroup `connect4`/`connect6` hooks. The agent probes for
//! the richer program types too and reports what it found, so a node's
//! capabilities are visible before a sensor set that uses them exists.

pub mod aliases;
pub mod btf;
pub mod decode;
pub mod handles;
pub mod preflight;
pub mod watch;

use std::{collections::BTreeMap, fs::File, path::Path};

use agent_common::{
    EventKind, COUNTER_DROPPED, COUNTER_EMITTED, COUNTER_FILTERED, COUNTER_SEEN, COUNTER_SLOTS,
};
use aya::{
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, MapError, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramType, TracePoint,
    },
    Ebpf, EbpfError, EbpfLoader,
};

use crate::event::KindCounters;
pub use watch::WatchSet;

/// Why the sensors could not be started or updated.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// Kernel BTF is missing or lacks a needed type.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// The object could not be loaded.
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    /// A program was refused by the kernel (verifier, permissions, type).
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: String,
        /// What the kernel said.
        source: ProgramError,
    },
    /// A hook the sensors cannot work without is missing on this kernel.
    #[error("this kernel lacks {0}, which the sensors need")]
    MissingHook(String),
    /// The embedded eBPF object lacks a program the agent loads: the agent
    /// and its object come from different sources.
    #[error("the embedded eBPF object has no program {0}; rebuild the agent (cargo xtask build)")]
    MissingProgram(String),
    /// A map is missing or of the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// The error.
        source: MapError,
    },
    /// The binary was built without its eBPF object.
    #[error("this driftwatch-agent was built with AYA_BUILD_SKIP=1 and has no eBPF object; rebuild it without (cargo xtask build)")]
    NoObject,
    /// No cgroup v2 hierarchy to attach connect hooks to.
    #[error("opening cgroup2 root {path}: {source}")]
    Cgroup {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/driftwatch-ebpf"));

/// Name of the sensor set this build provides.
pub const SENSOR_SET: &str = "tracepoint+tp_btf+cgroup_sock_addr";

/// (program, `syscalls/` tracepoint, required) for the entry side of file calls.
const FILE_ENTERS: &[(&str, &str, bool)] = &[
    ("enter_openat", "sys_enter_openat", true),
    ("enter_openat2", "sys_enter_openat2", false),
    ("enter_open", "sys_enter_open", false),
    ("enter_creat", "sys_enter_creat", false),
    ("enter_renameat2", "sys_enter_renameat2", true),
    ("enter_renameat", "sys_enter_renameat", false),
    ("enter_rename", "sys_enter_rename", false),
    ("enter_unlinkat", "sys_enter_unlinkat", true),
    ("enter_unlink", "sys_enter_unlink", false),
    ("enter_rmdir", "sys_enter_rmdir", false),
    ("enter_fchmodat", "sys_enter_fchmodat", true),
    ("enter_fchmodat", "sys_enter_fchmodat2", false),
    ("enter_chmod", "sys_enter_chmod", false),
    ("enter_fchmod", "sys_enter_fchmod", true),
    ("enter_fchownat", "sys_enter_fchownat", true),
    ("enter_chown", "sys_enter_chown", false),
    ("enter_chown", "sys_enter_lchown", false),
    ("enter_fchown", "sys_enter_fchown", true),
    ("enter_truncate", "sys_enter_truncate", true),
    ("enter_ftruncate", "sys_enter_ftruncate", true),
    ("enter_linkat", "sys_enter_linkat", true),
    ("enter_link", "sys_enter_link", false),
    ("enter_symlinkat", "sys_enter_symlinkat", true),
    ("enter_symlink", "sys_enter_symlink", false),
    (
        "enter_open_by_handle_at",
        "sys_enter_open_by_handle_at",
        false,
    ),
    ("enter_setxattr", "sys_enter_setxattr", false),
    ("enter_setxattr", "sys_enter_lsetxattr", false),
    ("enter_fsetxattr", "sys_enter_fsetxattr", false),
    ("enter_setxattrat", "sys_enter_setxattrat", false),
    ("enter_removexattr", "sys_enter_removexattr", false),
    ("enter_removexattr", "sys_enter_lremovexattr", false),
    ("enter_fremovexattr", "sys_enter_fremovexattr", false),
    ("enter_removexattrat", "sys_enter_removexattrat", false),
    ("enter_utimes", "sys_enter_utime", false),
    ("enter_utimes", "sys_enter_utimes", false),
    ("enter_futimesat", "sys_enter_futimesat", false),
    ("enter_utimensat", "sys_enter_utimensat", false),
    ("enter_ioctl", "sys_enter_ioctl", false),
    ("enter_close", "sys_enter_close", true),
];

/// Running sensors. Dropping this detaches every program.
pub struct Sensors {
    ebpf: Ebpf,
    /// Kept alive: dropping the logger closes its map.
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Hooks attached, as `category/name`.
    pub hooks: Vec<String>,
    /// Program types probed, and whether the kernel accepts them.
    pub probes: BTreeMap<String, bool>,
    watch: WatchSet,
    gates: crate::guard::Gates,
    /// The attachments, owned so that [`Sensors::detach`] can undo them
    /// together.
    links: Vec<Box<dyn std::any::Any + Send>>,
    /// Kept open: the kernel empties a program array when its last file
    /// descriptor closes.
    _tail_progs: ProgramArray<MapData>,
}

/// Drops `links` (detaching their programs) on up to 16 threads at once.
fn drop_links(links: Vec<Box<dyn std::any::Any + Send>>) {
    let started = std::time::Instant::now();
    let count = links.len();
    let per_thread = count.div_ceil(16).max(1);
    let mut chunks: Vec<Vec<Box<dyn std::any::Any + Send>>> = Vec::new();
    let mut links = links.into_iter().peekable();
    while links.peek().is_some() {
        chunks.push(links.by_ref().take(per_thread).collect());
    }
    std::thread::scope(|scope| {
        for chunk in chunks {
            if std::thread::Builder::new()
                .name("detach".into())
                .spawn_scoped(scope, move || drop(chunk))
                .is_err()
            {
                // No thread to spare: the chunk was dropped here instead.
                tracing::debug!("detaching on the calling thread");
            }
        }
    });
    tracing::info!(hooks = count, took = ?started.elapsed(), "hooks detached");
}

/// True when this kernel has the tracepoint `syscalls/<tp>`.
fn syscall_tracepoint(tp: &str) -> bool {
    Path::new(&format!("{}/events/syscalls/{tp}", preflight::TRACEFS)).exists()
}

/// Attaches programs to syscall tracepoints, loading each on first use.
struct Syscalls<'a> {
    ebpf: &'a mut Ebpf,
    loaded: std::collections::HashSet<&'static str>,
    links: &'a mut Vec<Box<dyn std::any::Any + Send>>,
    hooks: &'a mut Vec<String>,
}

impl Syscalls<'_> {
    fn attach(&mut self, name: &'static str, tp: &str) -> Result<(), SensorError> {
        self.attach_in(name, "syscalls", tp)
    }

    fn attach_in(
        &mut self,
        name: &'static str,
        category: &str,
        tp: &str,
    ) -> Result<(), SensorError> {
        let prog: &mut TracePoint = program(self.ebpf, name)?;
        if self.loaded.insert(name) {
            prog.load().map_err(program_err(name))?;
            verified(name, prog.info());
        }
        let id = prog.attach(category, tp).map_err(program_err(name))?;
        self.links
            .push(Box::new(prog.take_link(id).map_err(program_err(name))?));
        self.hooks.push(format!("{category}/{tp}"));
        Ok(())
    }
}

/// Logs how many instructions the verifier walked to accept program
/// `name`, against its limit of one million: how near a program is to it.
fn verified(name: &str, info: Result<aya::programs::ProgramInfo, aya::programs::ProgramError>) {
    if let Some(walked) = info.ok().and_then(|i| i.verified_instruction_count()) {
        tracing::debug!(program = name, walked, "verified");
    }
}

/// Puts `wanted` into the kernel hash map `name` and takes `stale` out.
fn sync_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: impl IntoIterator<Item = (K, V)>,
    stale: impl IntoIterator<Item = K>,
) -> Result<(), SensorError> {
    let map_err = |source| SensorError::Map { name, source };
    let mut map: BpfHashMap<&mut MapData, K, V> =
        BpfHashMap::try_from(ebpf.map_mut(name).ok_or_else(|| missing_map(name))?)
            .map_err(map_err)?;
    for (k, v) in wanted {
        map.insert(k, v, 0).map_err(map_err)?;
    }
    for k in stale {
        map.remove(&k).map_err(map_err)?;
    }
    Ok(())
}

/// The error for a map the object does not have.
fn missing_map(name: &'static str) -> SensorError {
    SensorError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    }
}

fn program_err(name: &str) -> impl FnOnce(ProgramError) -> SensorError + '_ {
    move |source| SensorError::Program {
        name: name.to_owned(),
        source,
    }
}

/// The program `name` in the object, as its type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, SensorError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| SensorError::MissingProgram(name.to_owned()))?
        .try_into()
        .map_err(program_err(name))
}

/// Asks the kernel which program types it loads.
fn probe_kernel() -> BTreeMap<String, bool> {
    let mut probes = BTreeMap::new();
    for (name, ty) in [
        ("tracepoint", ProgramType::TracePoint),
        ("raw_tracepoint", ProgramType::RawTracePoint),
        ("cgroup_sock_addr", ProgramType::CgroupSockAddr),
        ("tracing(fentry,tp_btf)", ProgramType::Tracing),
        ("lsm", ProgramType::Lsm(aya::programs::LsmAttachType::Mac)),
        ("kprobe", ProgramType::KProbe),
    ] {
        let ok = aya::sys::is_program_supported(ty).unwrap_or(false);
        probes.insert(name.to_owned(), ok);
    }
    // A kprobe program loads on a kernel built without kprobes; attaching
    // one needs the kprobe perf event source, which only such a kernel has.
    if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        probes.insert("kprobe".to_owned(), false);
    }
    probes.insert(
        "btf".to_owned(),
        Path::new("/sys/kernel/btf/vmlinux").exists(),
    );
    probes
}

impl Sensors {
    /// Loads and attaches every program. `ring_bytes` sizes the event ring
    /// buffer (a power of two, multiple of the page size).
    pub fn start(cgroup_root: &Path, ring_bytes: u32) -> Result<Self, SensorError> {
        if OBJECT.is_empty() {
            return Err(SensorError::NoObject);
        }
        let btf = btf::Btf::from_sys_fs()?;
        let offsets = btf.kernel_offsets()?;
        tracing::debug!(?offsets, "kernel struct offsets from BTF");
        for tp in [
            "sched_process_exec",
            "sched_process_fork",
            "sched_process_exit",
        ] {
            if !btf.has_tracepoint(tp) {
                return Err(SensorError::MissingHook(format!("the BTF tracepoint {tp}")));
            }
        }
        let probes = probe_kernel();

        let mut ebpf = EbpfLoader::new()
            // The per-thread pending-call storage is a task storage map,
            // which aya creates but has no user-space type for; the agent
            // never reads it.
            .allow_unsupported_maps()
            .override_global("OFFSETS", &offsets, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::debug!("no eBPF log map ({e}); kernel-side logs are off");
                None
            }
        };
        let mut hooks = Vec::new();
        let mut links: Vec<Box<dyn std::any::Any + Send>> = Vec::new();

        let kernel_btf =
            aya::Btf::from_sys_fs().map_err(|e| SensorError::Load(EbpfError::BtfError(e)))?;
        for tp in [
            "sched_process_exec",
            "sched_process_fork",
            "sched_process_exit",
        ] {
            let prog: &mut BtfTracePoint = program(&mut ebpf, tp)?;
            prog.load(tp, &kernel_btf).map_err(program_err(tp))?;
            verified(tp, prog.info());
            let id = prog.attach().map_err(program_err(tp))?;
            links.push(Box::new(prog.take_link(id).map_err(program_err(tp))?));
            hooks.push(format!("tp_btf/{tp}"));
        }

        // The programs a file call's exit hands a matched call to, to send
        // its event (and whole paths too long for the record), and an
        // io_uring submission a path too long for its record: loaded, not
        // attached, reached by tail calls through `TAIL`.
        let mut tail_progs: ProgramArray<MapData> =
            ProgramArray::try_from(ebpf.take_map("TAIL").ok_or_else(|| missing_map("TAIL"))?)
                .map_err(|source| SensorError::Map {
                    name: "TAIL",
                    source,
                })?;
        for (index, name) in [
            (0, "exit_file_send"),
            (1, "uring_named_keep"),
            (2, "uring_named_match"),
        ] {
            let prog: &mut TracePoint = program(&mut ebpf, name)?;
            prog.load().map_err(program_err(name))?;
            verified(name, prog.info());
            let fd = prog.fd().map_err(program_err(name))?;
            tail_progs
                .set(index, fd, 0)
                .map_err(|source| SensorError::Map {
                    name: "TAIL",
                    source,
                })?;
        }

        let mut syscalls = Syscalls {
            ebpf: &mut ebpf,
            loaded: std::collections::HashSet::new(),
            links: &mut links,
            hooks: &mut hooks,
        };
        for &(name, tp, required) in FILE_ENTERS {
            if !syscall_tracepoint(tp) {
                if required {
                    return Err(SensorError::MissingHook(format!(
                        "the tracepoint syscalls/{tp}"
                    )));
                }
                tracing::debug!("tracepoint syscalls/{tp} not on this kernel; skipped");
                continue;
            }
            syscalls.attach(name, tp)?;
            if name != "enter_close" {
                syscalls.attach("exit_file", &tp.replacen("sys_enter_", "sys_exit_", 1))?;
            }
        }

        // Write files followed past their opener's fd: closes of several
        // fds at once, execs that close some, fds passed over Unix sockets
        // (closes, forks and exits are hooked above), shared mappings.
        for (name, tp) in [
            ("enter_close_range", "sys_enter_close_range"),
            ("enter_execve", "sys_enter_execve"),
            ("enter_execve", "sys_enter_execveat"),
            ("enter_sendmsg", "sys_enter_sendmsg"),
            ("enter_sendmsg", "sys_enter_sendmmsg"),
            ("enter_recvmsg", "sys_enter_recvmsg"),
            ("exit_recvmsg", "sys_exit_recvmsg"),
            ("exit_recvmmsg", "sys_exit_recvmmsg"),
            ("enter_mmap", "sys_enter_mmap"),
            ("enter_munmap", "sys_enter_munmap"),
        ] {
            if !syscall_tracepoint(tp) {
                tracing::debug!("tracepoint syscalls/{tp} not on this kernel; skipped");
                continue;
            }
            syscalls.attach(name, tp)?;
        }

        // Calls that change which path a directory has: the kernel's cache
        // of directories with nothing watched below is dropped after each.
        // (Renames do the same in exit_file.)
        for (enter, tp) in [
            (Some("enter_mount"), "sys_exit_mount"),
            (Some("enter_move_mount"), "sys_exit_move_mount"),
            (Some("enter_umount"), "sys_exit_umount"),
            (None, "sys_exit_pivot_root"),
        ] {
            if !syscall_tracepoint(tp) {
                tracing::debug!("tracepoint syscalls/{tp} not on this kernel; skipped");
                continue;
            }
            if let Some(enter) = enter {
                syscalls.attach(enter, &tp.replacen("sys_exit_", "sys_enter_", 1))?;
            }
            syscalls.attach("exit_mount", tp)?;
        }

        let cgroup = File::open(cgroup_root).map_err(|source| SensorError::Cgroup {
            path: cgroup_root.display().to_string(),
            source,
        })?;
        for name in ["connect4", "connect6", "sendmsg4", "sendmsg6"] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(program_err(name))?;
            verified(name, prog.info());
            // On 5.7+ aya attaches through a bpf_link, which always coexists
            // with other programs and takes no flags; `Single` passes none.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            links.push(Box::new(prog.take_link(id).map_err(program_err(name))?));
            hooks.push(format!("cgroup/{name}@{}", cgroup_root.display()));
        }
        let mut syscalls = Syscalls {
            ebpf: &mut ebpf,
            loaded: std::collections::HashSet::new(),
            links: &mut links,
            hooks: &mut hooks,
        };
        syscalls.attach("enter_connect", "sys_enter_connect")?;
        syscalls.attach("exit_connect", "sys_exit_connect")?;
        // io_uring requests: without this hook an io_uring connect would
        // still be reported (by the cgroup hook), but not named as one.
        if Path::new(&format!(
            "{}/events/io_uring/io_uring_submit_req",
            preflight::TRACEFS
        ))
        .exists()
        {
            syscalls.attach_in("uring_submit", "io_uring", "io_uring_submit_req")?;
            syscalls.attach_in("uring_complete", "io_uring", "io_uring_complete")?;
        } else {
            tracing::warn!("no tracepoint io_uring/io_uring_submit_req on this kernel: io_uring requests are not named");
        }

        Ok(Self {
            ebpf,
            _logger: logger,
            hooks,
            probes,
            watch: WatchSet::default(),
            gates: crate::guard::Gates::default(),
            links,
            _tail_progs: tail_progs,
        })
    }

    /// Starts detaching every hook on a thread of its own, so that the
    /// caller can go on reading what the hooks wrote meanwhile; the maps
    /// (ring, counters) stay readable. `None` when no thread could be
    /// started: the hooks were detached here.
    ///
    /// Each detach waits for an RCU grace period, ~60 ms here: one after
    /// the other, 55 hooks took 3.5 s of a stopping agent. Detached from
    /// several threads at once, the waits overlap.
    pub fn detach_in_background(&mut self) -> Option<std::thread::JoinHandle<()>> {
        let links = std::mem::take(&mut self.links);
        match std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || drop_links(links))
        {
            Ok(h) => Some(h),
            Err(e) => {
                // The links went with the closure that could not start,
                // and were dropped (detached) on this thread.
                tracing::debug!("detaching on the calling thread: {e}");
                None
            }
        }
    }

    /// The ring buffer to read events from (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, SensorError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| missing_map("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| SensorError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// The kernel-side log reader, for the caller to poll.
    pub fn logger(&mut self) -> Option<&mut aya_log::EbpfLogger<&'static dyn log::Log>> {
        self._logger.as_mut()
    }

    /// The watched set in force.
    pub fn watch(&self) -> &WatchSet {
        &self.watch
    }

    /// Replaces the watched set in the kernel maps, in place: programs stay
    /// loaded and attached, and entries in both sets are never removed.
    pub fn apply(&mut self, next: WatchSet) -> Result<(), SensorError> {
        let map_err = |name| move |source| SensorError::Map { name, source };
        {
            let mut paths: LpmTrie<
                &mut MapData,
                [u8; agent_common::PATH_LEN],
                agent_common::WatchValue,
            > = LpmTrie::try_from(
                self.ebpf
                    .map_mut("WATCH_PATHS")
                    .ok_or_else(|| missing_map("WATCH_PATHS"))?,
            )
            .map_err(map_err("WATCH_PATHS"))?;
            let wanted = next.kernel_entries();
            for (key, value) in &wanted {
                paths
                    .insert(key, value, 0)
                    .map_err(map_err("WATCH_PATHS"))?;
            }
            type PathKey = aya::maps::lpm_trie::Key<[u8; agent_common::PATH_LEN]>;
            let same =
                |a: &PathKey, b: &PathKey| a.prefix_len() == b.prefix_len() && a.data() == b.data();
            for (key, _) in self
                .watch
                .kernel_entries()
                .iter()
                .filter(|(o, _)| !wanted.iter().any(|(n, _)| same(n, o)))
            {
                paths.remove(key).map_err(map_err("WATCH_PATHS"))?;
            }
        }
        {
            // Every directory verdict the kernel cached was taken against
            // the old set: the generation gets a value it never had, the
            // boot clock's now (as the programs do on renames and mounts).
            let mut gen: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(
                self.ebpf
                    .map_mut("WATCH_GEN")
                    .ok_or_else(|| missing_map("WATCH_GEN"))?,
            )
            .map_err(map_err("WATCH_GEN"))?;
            let now = crate::clock::Clock::boot_ns();
            let before = gen.get(&0, 0).map_err(map_err("WATCH_GEN"))?;
            gen.set(0, now.max(before + 1), 0)
                .map_err(map_err("WATCH_GEN"))?;
        }
        sync_hash(
            &mut self.ebpf,
            "WATCH_PORTS",
            next.ports.iter().map(|(p, r)| (*p, *r as u32)),
            self.watch
                .ports
                .keys()
                .filter(|p| !next.ports.contains_key(p))
                .copied(),
        )?;
        sync_hash(
            &mut self.ebpf,
            "WATCH_INODES",
            next.inodes.iter().map(|(k, (_, r))| (*k, *r as u32)),
            self.watch
                .inodes
                .keys()
                .filter(|k| !next.inodes.contains_key(k))
                .copied(),
        )?;
        self.watch = next;
        Ok(())
    }

    /// The guardrails in the kernel now.
    pub fn gates(&self) -> &crate::guard::Gates {
        &self.gates
    }

    /// Replaces the guardrail tables in place. New facts go in before the
    /// rules that need them and old ones leave after, so a process allowed
    /// before and after is never refused in between.
    pub fn apply_gates(&mut self, next: crate::guard::Gates) -> Result<(), SensorError> {
        if next == self.gates {
            return Ok(());
        }
        let map_err = |name| move |source| SensorError::Map { name, source };
        {
            let mut facts: BpfHashMap<&mut MapData, agent_common::GateKey, u64> =
                BpfHashMap::try_from(
                    self.ebpf
                        .map_mut("GATES")
                        .ok_or_else(|| missing_map("GATES"))?,
                )
                .map_err(map_err("GATES"))?;
            for (k, bits) in &next.facts {
                if self.gates.facts.get(k) != Some(bits) {
                    facts.insert(k, bits, 0).map_err(map_err("GATES"))?;
                }
            }
        }
        {
            let mut rules: aya::maps::Array<&mut MapData, agent_common::GateRule> =
                aya::maps::Array::try_from(
                    self.ebpf
                        .map_mut("GATE_RULES")
                        .ok_or_else(|| missing_map("GATE_RULES"))?,
                )
                .map_err(map_err("GATE_RULES"))?;
            for (i, rule) in &next.rules {
                if self.gates.rules.get(i) != Some(rule) {
                    rules
                        .set(*i, rule.to_kernel(), 0)
                        .map_err(map_err("GATE_RULES"))?;
                }
            }
            for i in self
                .gates
                .rules
                .keys()
                .filter(|i| !next.rules.contains_key(i))
            {
                rules
                    .set(*i, agent_common::GateRule::default(), 0)
                    .map_err(map_err("GATE_RULES"))?;
            }
        }
        {
            let mut facts: BpfHashMap<&mut MapData, agent_common::GateKey, u64> =
                BpfHashMap::try_from(
                    self.ebpf
                        .map_mut("GATES")
                        .ok_or_else(|| missing_map("GATES"))?,
                )
                .map_err(map_err("GATES"))?;
            for k in self
                .gates
                .facts
                .keys()
                .filter(|k| !next.facts.contains_key(k))
            {
                facts.remove(k).map_err(map_err("GATES"))?;
            }
        }
        self.gates = next;
        Ok(())
    }

    /// Follows a process found holding write handles on watched files at
    /// start: their `struct file`s are unknown here, so whatever it (or a
    /// child) closes open for write is judged by its path.
    pub fn hold_by_path(&mut self, tgid: u32) -> Result<(), SensorError> {
        sync_hash(
            &mut self.ebpf,
            "HOLDERS",
            [(tgid, agent_common::HOLD_BY_PATH)],
            [],
        )
    }

    /// The most bytes that waited in the ring buffer since the last call
    /// (the peak over every CPU), and clears it.
    pub fn take_ring_peak(&mut self) -> Result<u64, SensorError> {
        let map_err = |source| SensorError::Map {
            name: "RING_PEAK",
            source,
        };
        let map = self
            .ebpf
            .map_mut("RING_PEAK")
            .ok_or_else(|| missing_map("RING_PEAK"))?;
        let mut arr: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err)?;
        let peak = arr
            .get(&0, 0)
            .map_err(map_err)?
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| SensorError::Map {
            name: "RING_PEAK",
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| SensorError::Map {
                name: "RING_PEAK",
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "clearing",
                    io_error: e,
                }),
            })?;
        arr.set(0, zeros, 0).map_err(map_err)?;
        Ok(peak)
    }

    /// Kernel counters summed over CPUs, by kind name.
    pub fn counters(&self) -> Result<BTreeMap<String, KindCounters>, SensorError> {
        let map_err = |source| SensorError::Map {
            name: "COUNTERS",
            source,
        };
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("COUNTERS")
                .ok_or_else(|| missing_map("COUNTERS"))?,
        )
        .map_err(map_err)?;
        let mut out = BTreeMap::new();
        for kind in [
            EventKind::Exec,
            EventKind::Fork,
            EventKind::Exit,
            EventKind::File,
            EventKind::Connect,
        ] {
            let slot = |s: u32| -> Result<u64, SensorError> {
                Ok(arr
                    .get(&(kind as u32 * COUNTER_SLOTS + s), 0)
                    .map_err(map_err)?
                    .iter()
                    .sum())
            };
            out.insert(
                decode::kind_name(kind).to_owned(),
                KindCounters {
                    seen: slot(COUNTER_SEEN)?,
                    filtered_kernel: slot(COUNTER_FILTERED)?,
                    emitted: slot(COUNTER_EMITTED)?,
                    dropped: slot(COUNTER_DROPPED)?,
                    ..Default::default()
                },
            );
        }
        Ok(out)
    }
}
