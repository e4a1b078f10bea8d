//! The programs, their maps and the globals the agent fills.
//!
//! Hooks available on every supported kernel without kprobes, fentry or LSM:
//! - `tp_btf/sched_process_{exec,fork,exit}` feed the process table;
//! - `syscalls/sys_enter_*` keep the arguments of file-changing calls and
//!   `syscalls/sys_exit_*` judge them once the result is known;
//! - `cgroup/connect{4,6}` see the kernel's own view of a destination and
//!   `syscalls/sys_exit_connect` adds the result.
//!
//! Filtering happens here: a file call is reported only when its resolved
//! absolute path matches the `WATCH_PATHS` trie, a connect only when its port
//! is in `WATCH_PORTS`. Anything else only bumps a counter.
mod gate;
mod long;
mod path;
mod task;

use agent_common::{
    ConnectEvent, DirKey, EventKind, ExecEvent, ExitEvent, FileEvent, FileOp, ForkEvent, GateKey,
    GateRule, InodeKey, KernelOffsets, Mapped, PendingConnect, PendingFile, WatchValue, ARGV_LEN,
    ARGV_TRUNCATED, COUNTER_DROPPED, COUNTER_EMITTED, COUNTER_ENTRIES, COUNTER_FILTERED,
    COUNTER_SEEN, COUNTER_SLOTS, EXE_DELETED, EXE_TRUNCATED, GATE_RESOURCES, HOLD_BY_PATH,
    HOLD_FILE, PATH2_SHIFT, PATH_BY_INODE, PATH_FROM_FILE, PATH_LEN, PATH_TRUNCATED,
    VERDICT_BLOCKED, VIA_CONNECT, VIA_EXEC, VIA_EXIT, VIA_FASTOPEN, VIA_IO_URING, VIA_SENDMSG,
    VIA_SYSCALL,
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated as gen},
    macros::{btf_map, btf_tracepoint, cgroup_sock_addr, map, tracepoint},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{BtfTracePointContext, SockAddrContext, TracePointContext},
    EbpfContext as _,
};
use core::ffi::c_void;
use path::Scratch;
use task::TaskStorage;

/// Filled by the agent from the running kernel's BTF before load.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets::zeroed();

/// Reads one offset; volatile so the compiler keeps the load from `.rodata`
/// that the loader rewrites.
macro_rules! off {
    ($field:ident) => {{
        #[allow(unused_unsafe)]
        // SAFETY: a plain read of a u32 in a static.
        let v = unsafe { core::ptr::read_volatile(&$crate::programs::OFFSETS.$field) };
        v
    }};
}
pub(crate) use off;

/// Events to user space. Its size is set by the agent at load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 24, 0);

/// Watched path prefixes (directories end in `/`, single files in NUL),
/// and a marker for each directory above one. Room for a few thousand
/// policy paths with their markers (an LPM trie allocates per entry, so
/// the bound costs nothing until used).
#[map]
pub(crate) static WATCH_PATHS: LpmTrie<[u8; PATH_LEN], WatchValue> =
    LpmTrie::with_max_entries(16384, 0);

/// Directories with nothing watched in or below them, as far as the watch
/// set of generation `value` goes: a write-open or fd call on a file in one
/// is filtered without building its path.
#[map]
pub(crate) static DIR_CLEAN: LruHashMap<DirKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// The generation of everything `DIR_CLEAN` depends on: the agent steps it
/// when the watch set changes, the programs when a rename or a mount may
/// have given a directory another path.
#[map]
static WATCH_GEN: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn watch_gen() -> u64 {
    WATCH_GEN.get(0).copied().unwrap_or(0)
}

/// Gives the generation a value it never had: the boot clock's now. (No
/// atomic add on this target; a plain store of a fresh value does as well,
/// since a verdict only ever matches the value it read before its lookup,
/// and no later store brings that value back.)
#[inline(always)]
fn step_watch_gen() {
    if let Some(p) = WATCH_GEN.get_ptr_mut(0) {
        // SAFETY: the array's one slot.
        unsafe { core::ptr::write_volatile(p, gen::bpf_ktime_get_boot_ns()) };
    }
}

/// Watched destination ports (host byte order).
#[map]
static WATCH_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(1024, 0);

/// Guardrails by resource index (see `gate`).
#[map]
pub(crate) static GATE_RULES: Array<GateRule> = Array::with_max_entries(GATE_RESOURCES, 0);

/// Facts of processes, by resource, to the selector bits they satisfy.
#[map]
pub(crate) static GATES: HashMap<GateKey, u64> = HashMap::with_max_entries(65536, 0);

/// Arguments of a file call between its entry and exit, in the calling
/// thread's own storage (see [`TaskStorage`]).
#[btf_map]
static PENDING_FILE: TaskStorage<PendingFile> = TaskStorage::new();

/// A connect in flight, by thread: armed at `connect(2)`'s entry (or an
/// io_uring connect's submission), filled by the cgroup hook when the port
/// is watched, reported at the syscall's exit.
#[map]
static PENDING_CONNECT: LruHashMap<u64, PendingConnect> = LruHashMap::with_max_entries(8192, 0);

/// Files opened for write on a watched file, by `struct file *`, valued by
/// their inode (a `struct file` freed and reused for another inode is not
/// taken for one). Whichever process closes an fd of one reports it: the
/// opener, a child that inherited it, a process it was passed to, a dup.
#[map]
pub(crate) static WRITE_FILES: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Processes that may hold a file of `WRITE_FILES` (`HOLD_FILE`), or held
/// watched write handles at the agent's start (`HOLD_BY_PATH`): only their
/// closes are looked at, so everybody else's cost one lookup.
#[map]
pub(crate) static HOLDERS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

/// When a holder last sent a message with control data (boot clock, ns):
/// fds may be on their way over a Unix socket, and whoever receives some
/// in the next [`PASSING_NS`] becomes a holder.
#[map]
static PASSING: Array<u64> = Array::with_max_entries(1, 0);

/// How long after a holder's `sendmsg` received fds are followed.
const PASSING_NS: u64 = 60_000_000_000;

/// The `struct user_msghdr *` of a `recvmsg` while fds may be passing.
#[btf_map]
static RECV_MSG: TaskStorage<u64> = TaskStorage::new();

/// Watched files that have more than one name, by inode, to their
/// resource: a write through a name outside the watched trees (a hard link
/// made before they were watched) is caught by the inode.
#[map]
static WATCH_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(16384, 0);

/// An inode by its filesystem's device and its number.
#[inline(always)]
unsafe fn inode_key(inode: u64) -> InodeKey {
    unsafe {
        let sb: u64 = task::read(inode, off!(inode_i_sb));
        let dev: u32 = task::read(sb, off!(sb_s_dev));
        InodeKey {
            dev: u64::from(dev),
            ino: task::read(inode, off!(inode_i_ino)),
        }
    }
}

/// The inode key of `file` when it has more than one name; a key no file
/// has (all zero) otherwise.
#[inline(always)]
unsafe fn linked_key(file: u64) -> InodeKey {
    unsafe {
        let inode: u64 = task::read(file, off!(file_f_inode));
        let nlink: u32 = task::read(inode, off!(inode_i_nlink));
        if nlink < 2 {
            return InodeKey { dev: 0, ino: 0 };
        }
        inode_key(inode)
    }
}

/// Reports a call on `file` when it is a watched file with several names
/// (a hard link may sit outside the watched trees); true when it did. The
/// record names the file by inode, `(dev, ino)` in `path2`, with the name
/// used (its last component) in `path`, and user space finds the watched
/// name: building the whole path here would take the exit program past
/// the verifier's budget.
#[inline(never)]
unsafe fn linked_emit(p: &PendingFile, ret: i64, file: u64) -> bool {
    let key = unsafe { linked_key(file) };
    if key.ino == 0 {
        return false;
    }
    // SAFETY: read-only lookup of a plain value.
    let Some(resource) = (unsafe { WATCH_INODES.get(&key) }).copied() else {
        return false;
    };
    let verdict = gate::decide(resource) as u32 & 0xf;
    if verdict == VERDICT_BLOCKED {
        // SAFETY: signals the current process.
        unsafe { gen::bpf_send_signal(SIGKILL) };
    }
    let task = task::current();
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<FileEvent>(EventKind::File, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::File, task);
        (*e).ret = ret;
        (*e).op = p.op;
        (*e).flags = p.flags;
        (*e).mode = p.mode;
        (*e).uid = p.uid;
        (*e).gid = p.gid;
        (*e).path_flags = PATH_BY_INODE;
        (*e).verdict = verdict;
        (*e).via = VIA_SYSCALL;
        // The name used, without its directories.
        let dentry: u64 = task::read(file + off!(file_f_path) as u64, off!(path_dentry));
        let name: u64 = task::read(dentry + off!(dentry_d_name) as u64, off!(qstr_name));
        gen::bpf_probe_read_kernel_str(
            (*e).path.as_mut_ptr() as *mut c_void,
            PATH_LEN as u32,
            name as *const c_void,
        );
        core::ptr::write_unaligned((*e).path2.as_mut_ptr() as *mut InodeKey, key);
    });
    if p.op == FileOp::Open as u32 && ret >= 0 {
        // SAFETY: probe reads only.
        unsafe { track_write(file) };
    }
    true
}

/// The current process's `HOLD_*` bits, when it may hold a followed file.
#[inline(always)]
fn holding() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a lookup of a plain value, copied out.
    unsafe { HOLDERS.get(&tgid) }.copied()
}

/// Follows `file`, just opened for write on a watched file, wherever its
/// fds go; the current process holds it.
#[inline(always)]
unsafe fn track_write(file: u64) {
    if file == 0 {
        return;
    }
    let inode: u64 = unsafe { task::read(file, off!(file_f_inode)) };
    let _ = WRITE_FILES.insert(&file, &inode, 0);
    add_holder(HOLD_FILE);
}

/// Processes holding a shared writable mapping of a watched file.
#[map]
static MAPPED: LruHashMap<u32, Mapped> = LruHashMap::with_max_entries(4096, 0);

/// Per-kind counters: seen, filtered, emitted, dropped.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

/// The most bytes seen waiting in the ring after a submit, per CPU, since
/// the agent last read and cleared it: how close the ring came to full.
#[map]
static RING_PEAK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU work area for building paths (too large for the 512-byte stack).
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const AT_FDCWD: i32 = -100;
const AT_EMPTY_PATH: u32 = 0x1000;
const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SIGKILL: u32 = 9;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;
const FMODE_WRITE: u32 = 0x2;
const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
/// Offsets in `struct user_msghdr`.
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const MAP_SHARED: u32 = 0x01;
const PROT_WRITE: u32 = 0x2;
/// `munmap`s of a process with a watched mapping are reported at most once
/// in this many ns.
const MUNMAP_EVERY_NS: u64 = 100_000_000;

#[inline(always)]
fn count(kind: EventKind, slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(kind as u32 * COUNTER_SLOTS + slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Wake the reader only once this much is waiting: a wakeup per record costs
/// the agent more than the record itself. The agent also drains on a short
/// timer, which bounds the latency of a lone record.
const WAKEUP_BYTES: u64 = 256 * 1024;

#[inline(always)]
fn wake_flags() -> u64 {
    let waiting = EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64);
    if let Some(p) = RING_PEAK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if waiting > *p {
                *p = waiting;
            }
        }
    }
    if waiting >= WAKEUP_BYTES {
        aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64
    } else {
        aya_ebpf::bindings::BPF_RB_NO_WAKEUP as u64
    }
}

/// Reserves a `T` on the ring buffer, lets `fill` write it, and submits it;
/// a full ring is counted as a drop for `kind`. Returns whether it was sent.
#[inline(always)]
fn emit<T: 'static>(kind: EventKind, fill: impl FnOnce(*mut T)) -> bool {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(kind, COUNTER_DROPPED);
        return false;
    };
    fill(entry.as_mut_ptr());
    entry.submit(wake_flags());
    count(kind, COUNTER_EMITTED);
    true
}

#[inline(always)]
fn ready() -> bool {
    off!(ready) == 1
}

// ---------------------------------------------------------------- processes

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    if ready() {
        let bprm: u64 = ctx.arg(2);
        // SAFETY: kernel pointers are only dereferenced through probe reads.
        unsafe { on_exec(bprm) };
    }
    0
}

unsafe fn on_exec(bprm: u64) {
    count(EventKind::Exec, COUNTER_SEEN);
    // The old image's mappings are gone (user space reads what they
    // wrote at this exec): the new one's `munmap`s are not theirs.
    let _ = MAPPED.remove(&((bpf_get_current_pid_tgid() >> 32) as u32));
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let s = unsafe { &mut *s };
    let task = task::current();
    let mut flags = 0;
    let file: u64 = unsafe { task::read(bprm, off!(bprm_file)) };
    let exe_flags = unsafe { path::resolve_file(s, file) };
    if exe_flags & agent_common::PATH_TRUNCATED != 0 {
        flags |= EXE_TRUNCATED;
    }
    // SAFETY: probe reads of the file's inode and dentry.
    let (dev, ino, mtime) = unsafe {
        let inode: u64 = task::read(file, off!(file_f_inode));
        let nlink: u32 = task::read(inode, off!(inode_i_nlink));
        if nlink == 0 {
            flags |= EXE_DELETED;
            // A memfd's dentry has no parent to walk to: its name is all.
            path::pseudo_name(s, file);
        }
        let key = inode_key(inode);
        let sec: i64 = task::read(inode, off!(inode_i_mtime_sec));
        let nsec: u32 = task::read(inode, off!(inode_i_mtime_nsec));
        (
            key.dev,
            key.ino,
            sec.wrapping_mul(1_000_000_000) + i64::from(nsec),
        )
    };
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<ExecEvent>(EventKind::Exec, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::Exec, task);
        path::copy_key(s, (*e).exe.as_mut_ptr());
        let mm: u64 = task::read(task, off!(task_mm));
        let start: u64 = task::read(mm, off!(mm_arg_start));
        let end: u64 = task::read(mm, off!(mm_arg_end));
        let mut len = end.saturating_sub(start);
        if len > ARGV_LEN as u64 {
            len = ARGV_LEN as u64;
            flags |= ARGV_TRUNCATED;
        }
        if gen::bpf_probe_read_user(
            (*e).argv.as_mut_ptr() as *mut c_void,
            len as u32,
            start as *const c_void,
        ) != 0
        {
            len = 0;
        }
        (*e).argv_len = len as u32;
        (*e).flags = flags;
        (*e).exe_dev = dev;
        (*e).exe_ino = ino;
        (*e).exe_mtime_ns = mtime;
    });
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    if ready() {
        let child: u64 = ctx.arg(1);
        // SAFETY: probe reads only.
        unsafe { on_fork(child) };
    }
    0
}

unsafe fn on_fork(child: u64) {
    let pid: u32 = unsafe { task::read(child, off!(task_pid)) };
    let tgid: u32 = unsafe { task::read(child, off!(task_tgid)) };
    // A new thread is not a new process; the table only tracks processes.
    if pid != tgid {
        return;
    }
    // The child has copies of the parent's fds and mappings. A holder
    // that has no followed file left among its fds is one no more, and
    // passes nothing on: holding does not spread down a process tree
    // past the files themselves.
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: lookups of plain values, copied out; probe reads.
    unsafe {
        if let Some(how) = HOLDERS.get(&parent).copied() {
            if how & HOLD_BY_PATH != 0 || holds_followed() {
                let _ = HOLDERS.insert(&tgid, &how, 0);
            } else {
                let _ = HOLDERS.remove(&parent);
            }
        }
        if let Some(m) = MAPPED.get(&parent).copied() {
            let _ = MAPPED.insert(&tgid, &m, 0);
        }
    }
    count(EventKind::Fork, COUNTER_SEEN);
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<ForkEvent>(EventKind::Fork, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::Fork, task::current());
        (*e).child_tgid = tgid;
        (*e)._pad = 0;
        (*e).child_start_ns = task::read(child, off!(task_start_boottime));
    });
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    if ready() {
        // SAFETY: probe reads only.
        unsafe { on_exit() };
    }
    0
}

unsafe fn on_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Only the thread group leader's exit ends the process for the table.
    if pid_tgid as u32 != (pid_tgid >> 32) as u32 {
        return;
    }
    count(EventKind::Exit, COUNTER_SEEN);
    let tgid = (pid_tgid >> 32) as u32;
    let _ = MAPPED.remove(&tgid);
    // What a holder still has open goes with it: reported before its exit.
    if let Some(how) = holding() {
        let _ = HOLDERS.remove(&tgid);
        // SAFETY: probe reads only.
        unsafe { sweep(0, u32::MAX, how, VIA_EXIT) };
    }
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<ExitEvent>(EventKind::Exit, |e| unsafe {
        let task = task::current();
        task::fill_header(&mut (*e).hdr, EventKind::Exit, task);
        (*e).exit_code = task::read(task, off!(task_exit_code));
        (*e)._pad = 0;
    });
}

// ---------------------------------------------------------------- file calls

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: syscall enter tracepoints carry six 8-byte argument slots
    // from offset 16. A direct load from the context, which the verifier
    // bounds, costs a fraction of a probe-read helper call.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(16 + 8 * n) as *const u64) }
}

/// Argument `n`, which the call may not have: a direct load past the end
/// of a tracepoint's record makes the kernel refuse to attach the program,
/// so this one is read with a probe (and is garbage when absent).
#[inline(always)]
fn arg_probed(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: a probe read of the context; failure reads as 0.
    unsafe { ctx.read_at::<u64>(16 + 8 * n).unwrap_or(0) }
}

/// A `sys_exit_*` tracepoint's `long ret`.
#[inline(always)]
fn exit_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit tracepoints carry `long ret` at offset 16, inside
    // the record the verifier bounds.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(16) as *const i64) }
}

#[inline(always)]
fn writes(flags: u32) -> bool {
    flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0
}

#[inline(always)]
fn pending(op: FileOp) -> PendingFile {
    PendingFile {
        op: op as u32,
        dfd: AT_FDCWD,
        dfd2: AT_FDCWD,
        flags: 0,
        mode: 0,
        uid: u32::MAX,
        gid: u32::MAX,
        by_fd: 0,
        path: 0,
        path2: 0,
        odd: 0,
        live: 1,
    }
}

#[inline(always)]
fn stash(p: &mut PendingFile) {
    if !ready() {
        return;
    }
    // Opens are judged from the opened file (exact), so only calls that name
    // files by string need their strings checked for `.`, `..` and `//`.
    if p.op != FileOp::Open as u32 && p.by_fd == 0 {
        if let Some(s) = SCRATCH.get_ptr_mut(0) {
            // SAFETY: per-CPU scratch; user strings read with probes.
            let s = unsafe { &mut *s };
            let first = p.op != FileOp::Symlink as u32 && unsafe { path::odd_string(s, p.path) };
            // A one-path call naming a plain file name: its directory is
            // the start directory, whose verdict the exit may find cached.
            let plain = p.op != FileOp::Symlink as u32
                && p.path2 == 0
                && !first
                && unsafe { core::ptr::read_volatile(&s.slash) } == 0;
            let second = unsafe { path::odd_string(s, p.path2) };
            p.odd = u32::from(first) | (u32::from(second) << 1) | (u32::from(plain) << 2);
        }
    }
    match PENDING_FILE.current(true) {
        // SAFETY: this thread's own slot; only this thread's programs,
        // which do not nest, touch it.
        Some(slot) => unsafe { *slot = *p },
        // No memory for the slot: the call goes unjudged, and says so.
        None => count(EventKind::File, COUNTER_DROPPED),
    }
}

/// `(olddfd, oldname, newdfd, newname[, flags])`: renameat, renameat2, linkat.
#[inline(always)]
fn two_at(ctx: &TracePointContext, op: FileOp, has_flags: bool) -> PendingFile {
    PendingFile {
        dfd: arg(ctx, 0) as i32,
        path: arg(ctx, 1),
        dfd2: arg(ctx, 2) as i32,
        path2: arg(ctx, 3),
        // Reading past a call's own arguments would read the next record's bytes.
        flags: if has_flags { arg(ctx, 4) as u32 } else { 0 },
        ..pending(op)
    }
}

/// `(oldname, newname)` relative to the cwd: rename, link, symlink.
#[inline(always)]
fn two(ctx: &TracePointContext, op: FileOp) -> PendingFile {
    PendingFile {
        path: arg(ctx, 0),
        path2: arg(ctx, 1),
        ..pending(op)
    }
}

/// Defines a `sys_enter_*` program that turns the call's arguments into a
/// [`PendingFile`], or `None` to ignore the call.
macro_rules! enter {
    ($name:ident, |$ctx:ident| $body:expr) => {
        #[tracepoint]
        pub fn $name($ctx: TracePointContext) -> u32 {
            let p: Option<PendingFile> = $body;
            if let Some(mut p) = p {
                stash(&mut p);
            }
            0
        }
    };
}

enter!(enter_openat, |ctx| {
    let flags = arg(&ctx, 2) as u32;
    // Read-only opens are most opens: leave them before any map work.
    writes(flags).then(|| PendingFile {
        dfd: arg(&ctx, 0) as i32,
        path: arg(&ctx, 1),
        flags,
        mode: arg(&ctx, 3) as u32,
        ..pending(FileOp::Open)
    })
});
enter!(enter_open, |ctx| {
    let flags = arg(&ctx, 1) as u32;
    writes(flags).then(|| PendingFile {
        path: arg(&ctx, 0),
        flags,
        mode: arg(&ctx, 2) as u32,
        ..pending(FileOp::Open)
    })
});
enter!(enter_creat, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    flags: O_CREAT | O_WRONLY | O_TRUNC,
    mode: arg(&ctx, 1) as u32,
    ..pending(FileOp::Open)
}));
enter!(enter_openat2, |ctx| {
    // struct open_how { u64 flags; u64 mode; u64 resolve; } in user memory.
    let how = arg(&ctx, 2);
    // SAFETY: user pointer, read with a probe.
    let flags = unsafe { aya_ebpf::helpers::bpf_probe_read_user(how as *const u64) }.unwrap_or(0);
    let mode =
        unsafe { aya_ebpf::helpers::bpf_probe_read_user((how + 8) as *const u64) }.unwrap_or(0);
    writes(flags as u32).then(|| PendingFile {
        dfd: arg(&ctx, 0) as i32,
        path: arg(&ctx, 1),
        flags: flags as u32,
        mode: mode as u32,
        ..pending(FileOp::Open)
    })
});
enter!(enter_renameat2, |ctx| Some(two_at(
    &ctx,
    FileOp::Rename,
    true
)));
enter!(enter_renameat, |ctx| Some(two_at(
    &ctx,
    FileOp::Rename,
    false
)));
enter!(enter_rename, |ctx| Some(two(&ctx, FileOp::Rename)));
enter!(enter_unlinkat, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    path: arg(&ctx, 1),
    flags: arg(&ctx, 2) as u32,
    ..pending(FileOp::Unlink)
}));
enter!(enter_unlink, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    ..pending(FileOp::Unlink)
}));
enter!(enter_rmdir, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    flags: 0x200, // AT_REMOVEDIR, so user space can tell rmdir from unlink
    ..pending(FileOp::Unlink)
}));
enter!(enter_fchmodat, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    path: arg(&ctx, 1),
    mode: arg(&ctx, 2) as u32,
    flags: arg_probed(&ctx, 3) as u32, // fchmodat2 only; fchmodat's slot is unused
    ..pending(FileOp::Chmod)
}));
enter!(enter_chmod, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    mode: arg(&ctx, 1) as u32,
    ..pending(FileOp::Chmod)
}));
enter!(enter_fchmod, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    by_fd: 1,
    mode: arg(&ctx, 1) as u32,
    ..pending(FileOp::Chmod)
}));
enter!(enter_fchownat, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    path: arg(&ctx, 1),
    uid: arg(&ctx, 2) as u32,
    gid: arg(&ctx, 3) as u32,
    flags: arg(&ctx, 4) as u32,
    ..pending(FileOp::Chown)
}));
enter!(enter_chown, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    uid: arg(&ctx, 1) as u32,
    gid: arg(&ctx, 2) as u32,
    ..pending(FileOp::Chown)
}));
enter!(enter_fchown, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    by_fd: 1,
    uid: arg(&ctx, 1) as u32,
    gid: arg(&ctx, 2) as u32,
    ..pending(FileOp::Chown)
}));
enter!(enter_truncate, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    ..pending(FileOp::Truncate)
}));
enter!(enter_ftruncate, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    by_fd: 1,
    ..pending(FileOp::Truncate)
}));
enter!(enter_linkat, |ctx| Some(two_at(&ctx, FileOp::Link, true)));
enter!(enter_link, |ctx| Some(two(&ctx, FileOp::Link)));
enter!(enter_symlinkat, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    dfd2: arg(&ctx, 1) as i32,
    path2: arg(&ctx, 2),
    ..pending(FileOp::Symlink)
}));
enter!(enter_symlink, |ctx| Some(two(&ctx, FileOp::Symlink)));
enter!(enter_open_by_handle_at, |ctx| {
    // (mount_fd, handle, flags): judged from the fd it returns, as an open.
    let flags = arg(&ctx, 2) as u32;
    writes(flags).then(|| PendingFile {
        flags,
        ..pending(FileOp::Open)
    })
});
// Metadata. The attribute's name rides in `path2`, which these calls do
// not otherwise use.

/// How an xattr call names its file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Named {
    /// `(path, name, ...)`: setxattr, lsetxattr, removexattr, lremovexattr.
    Path,
    /// `(fd, name, ...)`: fsetxattr, fremovexattr.
    Fd,
    /// `(dfd, path, at_flags, name, ...)`: setxattrat, removexattrat.
    At,
}

#[inline(always)]
fn xattr(ctx: &TracePointContext, op: FileOp, named: Named) -> PendingFile {
    match named {
        Named::Path => PendingFile {
            path: arg(ctx, 0),
            path2: arg(ctx, 1),
            ..pending(op)
        },
        Named::Fd => PendingFile {
            dfd: arg(ctx, 0) as i32,
            by_fd: 1,
            path2: arg(ctx, 1),
            ..pending(op)
        },
        Named::At => PendingFile {
            dfd: arg(ctx, 0) as i32,
            path: arg(ctx, 1),
            flags: arg(ctx, 2) as u32,
            path2: arg(ctx, 3),
            ..pending(op)
        },
    }
}

enter!(enter_setxattr, |ctx| Some(xattr(
    &ctx,
    FileOp::SetXattr,
    Named::Path
)));
enter!(enter_fsetxattr, |ctx| Some(xattr(
    &ctx,
    FileOp::SetXattr,
    Named::Fd
)));
enter!(enter_setxattrat, |ctx| Some(xattr(
    &ctx,
    FileOp::SetXattr,
    Named::At
)));
enter!(enter_removexattr, |ctx| Some(xattr(
    &ctx,
    FileOp::RemoveXattr,
    Named::Path
)));
enter!(enter_fremovexattr, |ctx| Some(xattr(
    &ctx,
    FileOp::RemoveXattr,
    Named::Fd
)));
enter!(enter_removexattrat, |ctx| Some(xattr(
    &ctx,
    FileOp::RemoveXattr,
    Named::At
)));
enter!(enter_utimes, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    ..pending(FileOp::Utimes)
}));
enter!(enter_futimesat, |ctx| Some(PendingFile {
    dfd: arg(&ctx, 0) as i32,
    path: arg(&ctx, 1),
    ..pending(FileOp::Utimes)
}));
enter!(enter_utimensat, |ctx| {
    // (dfd, path, times, flags); a NULL path is futimens(dfd).
    let path = arg(&ctx, 1);
    Some(PendingFile {
        dfd: arg(&ctx, 0) as i32,
        path,
        by_fd: u32::from(path == 0),
        flags: arg(&ctx, 3) as u32,
        ..pending(FileOp::Utimes)
    })
});
enter!(enter_ioctl, |ctx| {
    // Only the inode-flags setter (chattr); every other ioctl leaves here.
    let cmd = arg(&ctx, 1) as u32;
    (cmd == FS_IOC_SETFLAGS || cmd == FS_IOC32_SETFLAGS).then(|| PendingFile {
        dfd: arg(&ctx, 0) as i32,
        by_fd: 1,
        // SAFETY: the new flags, an int in user memory; read with a probe.
        mode: unsafe { aya_ebpf::helpers::bpf_probe_read_user(arg(&ctx, 2) as *const u32) }
            .unwrap_or(0),
        ..pending(FileOp::SetFlags)
    })
});

/// The arguments `stash` kept for this thread's call, taken out: a later
/// exit without an entry (a read-only open) finds nothing.
#[inline(always)]
fn take_pending() -> Option<PendingFile> {
    let slot = PENDING_FILE.current(false)?;
    // SAFETY: this thread's own slot (see `stash`). The copy is volatile
    // so that every later use reads the one copy: fields re-read from the
    // map value would be unrelated unknowns to the verifier, whose paths
    // then multiply past its limit.
    let p = unsafe { core::ptr::read_volatile(slot) };
    // Judged on `live`, not on `op`: a bound on `op` here splits every
    // later test of it in two for the verifier, past its limit.
    if p.live == 0 {
        return None;
    }
    // SAFETY: the same slot, emptied.
    unsafe { (*slot).live = 0 };
    Some(p)
}

/// Attached to the `sys_exit_*` of every call above.
#[tracepoint]
pub fn exit_file(ctx: TracePointContext) -> u32 {
    let Some(p) = take_pending() else {
        return 0;
    };
    let ret = exit_ret(&ctx);
    if p.op == FileOp::Rename as u32 && ret == 0 {
        // A renamed directory has another path now, and so has everything
        // below it: cached verdicts go.
        step_watch_gen();
    }
    // SAFETY: probe reads only.
    if unsafe { on_file(&p, ret) } {
        // SAFETY: a tail call with our own context.
        let _ = unsafe { TAIL.tail_call(&ctx, 0) };
        // Back only when the program is missing from the array: the event
        // is lost, and counted so.
        count(EventKind::File, COUNTER_DROPPED);
    }
    0
}

enter!(enter_mount, |ctx| Some(PendingFile {
    // (source, target, type, flags, data)
    path: arg(&ctx, 1),
    ..pending(FileOp::Mount)
}));
enter!(enter_umount, |ctx| Some(PendingFile {
    path: arg(&ctx, 0),
    ..pending(FileOp::Umount)
}));
enter!(enter_move_mount, |ctx| {
    // (from_dfd, from_path, to_dfd, to_path, flags); with
    // MOVE_MOUNT_T_EMPTY_PATH the target is `to_dfd` itself.
    let empty = arg(&ctx, 4) as u32 & MOVE_MOUNT_T_EMPTY_PATH != 0;
    Some(PendingFile {
        dfd: arg(&ctx, 2) as i32,
        path: if empty { 0 } else { arg(&ctx, 3) },
        by_fd: u32::from(empty),
        ..pending(FileOp::Mount)
    })
});

/// Attached to the `sys_exit_*` of mount, move_mount, umount and
/// pivot_root: a directory may show another path afterwards, so cached
/// verdicts go; a mount or unmount is reported with its target, which user
/// space keeps when it is on, above or below a watched path.
#[tracepoint]
pub fn exit_mount(ctx: TracePointContext) -> u32 {
    let ret = exit_ret(&ctx);
    if ret == 0 {
        step_watch_gen();
    }
    let Some(p) = take_pending() else {
        return 0;
    };
    if ret != 0 {
        return 0;
    }
    // SAFETY: probe reads only.
    unsafe { on_mount(&p) };
    0
}

unsafe fn on_mount(p: &PendingFile) {
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let s = unsafe { &mut *s };
    let task = task::current();
    let flags = if p.by_fd == 1 {
        unsafe { path::resolve_file(s, task::fd_file(task, p.dfd)) }
    } else {
        unsafe { path::resolve_user(s, task, p.dfd, p.path) }
    };
    let flags = if p.odd & 1 != 0 {
        flags | agent_common::PATH_UNNORMALISED
    } else {
        flags
    };
    if flags & PATH_TRUNCATED != 0 {
        // SAFETY: probe reads only.
        let whole = unsafe {
            if p.by_fd == 1 {
                long::of_file(0, task::fd_file(task, p.dfd))
            } else {
                long::of_name(0, path::start_dir(task, p.dfd), p.path, false)
            }
        };
        if let Some(len) = whole {
            long::send(0, 1, len);
        }
    }
    let ev = OnePath {
        op: p.op,
        ret: 0,
        flags: 0,
        path_flags: flags,
        verdict: 0,
        via: VIA_SYSCALL,
    };
    unsafe { emit_one(s, task, ev) };
}

/// Builds the whole paths of a call whose event would hold them cut, and
/// matches those the cut form missed: their lengths (in areas 0 and 1),
/// for the caller to send or keep, or `None` when nothing the call named
/// is watched after all.
#[inline(never)]
unsafe fn whole_paths(
    s: &mut Scratch,
    task: u64,
    c: &mut long::Call,
) -> Option<(Option<usize>, Option<usize>)> {
    let p = c.p;
    let op = p.op;
    let named2 = names_two(op);
    // An io_uring request's names are the kernel's copies.
    let kernel = c.req != 0;
    let mut len1 = None;
    let mut len2 = None;
    unsafe {
        // A symlink's first argument is its text, not a path.
        if c.flags1 & PATH_TRUNCATED != 0 && op != FileOp::Symlink as u32 {
            len1 = if c.flags1 & PATH_FROM_FILE != 0 {
                let fd = if op == FileOp::Open as u32 && c.ret >= 0 && p.by_fd != 1 {
                    c.ret as i32
                } else {
                    p.dfd
                };
                long::of_file(0, task::fd_file(task, fd))
            } else {
                long::of_name(0, path::start_dir(task, p.dfd), p.path, kernel)
            };
            if let (Some(len), Some(head), false) = (len1, long::head(0), c.hit1) {
                path::key_from(s, head);
                c.hit1 = path::matches(s, &mut c.flags1, false);
                c.resource1 = s.hit_resource;
                // The exit program looked its directory up from the file
                // (and left it in the scratch area) on these calls only.
                let by_file = (op == FileOp::Open as u32 && c.ret >= 0) || p.by_fd == 1;
                if !c.hit1 && by_file {
                    path::dir_remember_whole(s, len, c.flags1);
                }
                if c.hit1 && op == FileOp::Open as u32 && c.ret >= 0 {
                    track_write(task::fd_file(task, c.ret as i32));
                }
            }
        }
        if named2 && c.flags2 & PATH_TRUNCATED != 0 {
            len2 = long::of_name(1, path::start_dir(task, p.dfd2), p.path2, kernel);
            if let (Some(_), Some(head), false) = (len2, long::head(1), c.hit2) {
                // The first path's key stays the event's.
                long::keep(path::key_mut(s), false);
                path::key_from(s, head);
                c.hit2 = path::matches(s, &mut c.flags2, false);
                c.resource2 = s.hit_resource;
                long::keep(path::key_mut(s), true);
            }
        }
    }
    if !c.hit1 && !c.hit2 {
        return None;
    }
    if c.verdict == 0 {
        c.verdict = judge(c.hit1, c.resource1, c.hit2, c.resource2);
    }
    Some((len1, len2))
}

/// For a path resolved from an open `file` (into the key, with `flags`),
/// and cut: builds the whole path, matches its head when the cut form
/// missed (`hit`), and sends it ahead of the event. Whether the file is
/// watched.
#[inline(never)]
unsafe fn whole_file(s: &mut Scratch, file: u64, flags: &mut u32, hit: bool) -> bool {
    if *flags & PATH_TRUNCATED == 0 {
        return hit;
    }
    let Some(len) = (unsafe { long::of_file(0, file) }) else {
        return hit;
    };
    let mut hit = hit;
    if !hit {
        if let Some(head) = long::head(0) {
            path::key_from(s, head);
            hit = path::matches(s, flags, false);
        }
    }
    if hit {
        long::send(0, 1, len);
    }
    hit
}

/// A file event on one path, the one now in the scratch key: no owner
/// change, no second path.
struct OnePath {
    op: u32,
    ret: i64,
    flags: u32,
    path_flags: u32,
    verdict: u32,
    via: u32,
}

/// Sends `ev` as `task`'s; returns whether it was sent.
#[inline(always)]
unsafe fn emit_one(s: &Scratch, task: u64, ev: OnePath) -> bool {
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<FileEvent>(EventKind::File, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::File, task);
        (*e).ret = ev.ret;
        (*e).op = ev.op;
        (*e).flags = ev.flags;
        (*e).mode = 0;
        (*e).uid = u32::MAX;
        (*e).gid = u32::MAX;
        (*e).path_flags = ev.path_flags;
        (*e).verdict = ev.verdict;
        (*e).via = ev.via;
        path::copy_key(s, (*e).path.as_mut_ptr());
        (*e).path2[0] = 0;
    })
}

/// Resolves the file(s) a call named, matches them against the watch trie and
/// hands the call to `exit_file_send` when one matches (true).
unsafe fn on_file(p: &PendingFile, ret: i64) -> bool {
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let s = unsafe { &mut *s };
    let task = task::current();
    let op = p.op;
    let mut flags2 = 0u32;
    let mut hit2 = false;

    if names_two(op) {
        // The second path is the new name; keep it aside while the first is resolved.
        flags2 = unsafe { path::resolve_user(s, task, p.dfd2, p.path2) };
        hit2 = path::matches(s, &mut flags2, p.odd & 2 != 0);
        path::save_key(s);
    }
    let resource2 = s.hit_resource;

    let mut hit1 = false;
    let flags1 = if op == FileOp::Symlink as u32 {
        // A symlink's first argument is the text stored in the link, not a file.
        unsafe { path::read_user_text(s, p.path) }
    } else if (op == FileOp::Open as u32 && ret >= 0) || p.by_fd == 1 {
        let fd = if p.by_fd == 1 { p.dfd } else { ret as i32 };
        let file = unsafe { task::fd_file(task, fd) };
        // Another name of a watched file: reported there, whatever the
        // directory's cached verdict.
        if unsafe { linked_emit(p, ret, file) } {
            return false;
        }
        // Read before the lookup: a change meanwhile leaves a verdict
        // stored under a generation already gone.
        if unsafe { path::dir_cached(s, file, watch_gen()) } {
            count(EventKind::File, COUNTER_FILTERED);
            return false;
        }
        let mut f = unsafe { path::resolve_file(s, file) };
        hit1 = path::matches(s, &mut f, false);
        if !hit1 {
            path::dir_remember(s, f);
        }
        f
    } else if p.flags & AT_EMPTY_PATH != 0 && unsafe { path::user_empty(p.path) } {
        let file = unsafe { task::fd_file(task, p.dfd) };
        let mut f = unsafe { path::resolve_file(s, file) };
        hit1 = path::matches(s, &mut f, false);
        f
    } else {
        // A plain name in a directory known to hold nothing watched: no
        // path to build.
        let plain = p.odd & 4 != 0;
        if plain && unsafe { path::start_dir_cached(s, task, p.dfd, watch_gen()) } {
            count(EventKind::File, COUNTER_FILTERED);
            return false;
        }
        let mut f = unsafe { path::resolve_user(s, task, p.dfd, p.path) };
        hit1 = path::matches(s, &mut f, p.odd & 1 != 0);
        if plain && !hit1 {
            path::dir_remember(s, f);
        }
        f
    };

    // A cut path that missed may still be watched: `exit_file_send`
    // matches its whole path.
    if !hit1 && !hit2 && (flags1 | flags2) & PATH_TRUNCATED == 0 {
        count(EventKind::File, COUNTER_FILTERED);
        return false;
    }
    let resource1 = s.hit_resource;
    let verdict = judge(hit1, resource1, hit2, resource2);
    if op == FileOp::Open as u32 && ret >= 0 && hit1 {
        unsafe { track_write(task::fd_file(task, ret as i32)) };
    }
    // Sent by `exit_file_send`, with the whole paths before it when they
    // do not fit the record.
    let Some(c) = long::CALL.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: our per-CPU value.
    unsafe {
        *c = long::Call {
            p: *p,
            ret,
            flags1,
            flags2,
            verdict,
            hit1,
            hit2,
            resource1,
            resource2,
            req: 0,
        }
    };
    true
}

/// Whether a call's second argument names a file (`path2`): the new name
/// of a rename or link, a symlink's own name.
#[inline(always)]
fn names_two(op: u32) -> bool {
    op == FileOp::Rename as u32 || op == FileOp::Link as u32 || op == FileOp::Symlink as u32
}

/// The guardrail: the new name first (a rename or link into a protected
/// tree), then the file acted on. The call has run by now; a refused
/// caller is killed before it returns to user space, so it never writes
/// through the fd it got or goes on to its next step.
#[inline(always)]
fn judge(hit1: bool, resource1: u64, hit2: bool, resource2: u64) -> u32 {
    if !hit1 && !hit2 {
        return 0;
    }
    let verdict = verdict_of(hit1, resource1, hit2, resource2);
    if verdict == VERDICT_BLOCKED {
        // SAFETY: signals the current process.
        unsafe { gen::bpf_send_signal(SIGKILL) };
    }
    verdict
}

/// Sends a call's file event, its paths the ones now in the scratch area.
#[inline(always)]
unsafe fn emit_call(s: &Scratch, task: u64, c: &long::Call) {
    let p = &c.p;
    let op = p.op;
    let two_paths = names_two(op);
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<FileEvent>(EventKind::File, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::File, task);
        (*e).ret = c.ret;
        (*e).op = op;
        (*e).flags = p.flags;
        (*e).mode = p.mode;
        (*e).uid = p.uid;
        (*e).gid = p.gid;
        (*e).path_flags = c.flags1 | (c.flags2 << PATH2_SHIFT);
        (*e).verdict = c.verdict;
        (*e).via = VIA_SYSCALL;
        path::copy_key(s, (*e).path.as_mut_ptr());
        if two_paths {
            path::copy_saved(s, (*e).path2.as_mut_ptr());
        } else if op == FileOp::SetXattr as u32 || op == FileOp::RemoveXattr as u32 {
            // The attribute's name.
            gen::bpf_probe_read_user_str(
                (*e).path2.as_mut_ptr() as *mut c_void,
                PATH_LEN as u32,
                p.path2 as *const c_void,
            );
        } else {
            (*e).path2[0] = 0;
        }
    });
}

/// A symlink's target text too long for its record, whole in area 0 (never
/// matched: it names no file of the call's); its length. `kernel`: the
/// text is an io_uring request's kernel copy (a constant at each caller,
/// so that the verifier walks one branch).
#[inline(always)]
fn symlink_text(c: &long::Call, kernel: bool) -> Option<usize> {
    if c.p.op != FileOp::Symlink as u32 || c.flags1 & PATH_TRUNCATED == 0 {
        return None;
    }
    // SAFETY: probe reads only.
    unsafe { long::of_text(0, c.p.path, kernel) }
}

/// Programs a file call's exit, or an io_uring submission, hands over to:
/// 0 is [`exit_file_send`], 1 [`uring_named_keep`], 2 [`uring_named_match`].
#[map]
static TAIL: ProgramArray = ProgramArray::with_max_entries(3, 0);

/// Sends the event of a file call `exit_file` matched: first, when a path
/// is too long for the record, the whole path. Reached by a tail call, so
/// that neither the event nor the walk counts against the exit program's
/// verifier budget, which its matching uses up.
#[tracepoint]
pub fn exit_file_send(_ctx: TracePointContext) -> u32 {
    let Some(mut c) = long::CALL.get(0).copied() else {
        return 0;
    };
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let task = task::current();
    // SAFETY: our per-CPU value, which still holds the paths the exit
    // program matched (same CPU, no program in between); probe reads.
    let s = unsafe { &mut *s };
    unsafe {
        if (c.flags1 | c.flags2) & PATH_TRUNCATED != 0 {
            let Some((len1, len2)) = whole_paths(s, task, &mut c) else {
                count(EventKind::File, COUNTER_FILTERED);
                return 0;
            };
            if let Some(len) = len1 {
                long::send(0, 1, len);
            }
            if let Some(len) = len2 {
                long::send(1, 2, len);
            }
            if let Some(len) = symlink_text(&c, false) {
                long::send(0, 1, len);
            }
        }
        emit_call(s, task, &c);
    }
    0
}

#[tracepoint]
pub fn enter_close(ctx: TracePointContext) -> u32 {
    let Some(how) = holding() else {
        return 0;
    };
    // SAFETY: probe reads only.
    unsafe {
        let file = task::fd_file(task::current(), arg(&ctx, 0) as i32);
        report_close(file, how, VIA_SYSCALL);
    }
    0
}

/// Whether `file` is one of `WRITE_FILES`, for the inode it was kept with.
#[inline(always)]
unsafe fn followed(file: u64) -> bool {
    let inode: u64 = unsafe { task::read(file, off!(file_f_inode)) };
    // SAFETY: a lookup of a plain value.
    unsafe { WRITE_FILES.get(&file) }.is_some_and(|v| *v == inode)
}

/// Whether a holder's `file` is a watched file open for write: `Some(true)`
/// when it is followed, `Some(false)` when only its path can tell.
#[inline(always)]
unsafe fn held_write(file: u64, how: u32) -> Option<bool> {
    if file == 0 {
        return None;
    }
    unsafe {
        if followed(file) {
            return Some(true);
        }
        let mode: u32 = task::read(file, off!(file_f_mode));
        (how & HOLD_BY_PATH != 0 && mode & FMODE_WRITE != 0).then_some(false)
    }
}

/// Reports that a holder let go of `file` (closed an fd of it, or dropped
/// it with its exit or exec) when it is a watched file open for write. A
/// close says how many references are left elsewhere (other fds, other
/// processes, mappings); the last one ends the following.
unsafe fn report_close(file: u64, how: u32, via: u32) {
    let Some(followed) = (unsafe { held_write(file, how) }) else {
        return;
    };
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let s = unsafe { &mut *s };
    let mut flags = unsafe { path::resolve_file(s, file) };
    let hit = followed || path::matches(s, &mut flags, false);
    // SAFETY: probe reads only.
    if !unsafe { whole_file(s, file, &mut flags, hit) } {
        count(EventKind::File, COUNTER_FILTERED);
        return;
    }
    let mut left = 0;
    if via == VIA_SYSCALL {
        // SAFETY: a probe read of the count, this close's reference included.
        let refs: i64 = unsafe { task::read(file, off!(file_f_ref)) };
        left = (refs + i64::from(off!(file_ref_bias)) - 1).clamp(0, i64::from(u32::MAX)) as u32;
        if left == 0 {
            let _ = WRITE_FILES.remove(&file);
        }
    }
    let ev = OnePath {
        op: FileOp::CloseWrite as u32,
        ret: 0,
        flags: left,
        path_flags: flags,
        verdict: 0,
        via,
    };
    unsafe { emit_one(s, task::current(), ev) };
}

/// The most fds one sweep looks at.
const SWEEP_MAX: u32 = 1 << 16;

/// A sweep over part of a holder's fd table, for `bpf_loop`.
#[repr(C)]
struct Sweep {
    /// `fdtable.fd`.
    fds: u64,
    /// `fdtable.close_on_exec`, read when `via` is [`VIA_EXEC`].
    cloexec: u64,
    /// The first fd.
    first: u32,
    /// The holder's `HOLD_*` bits.
    how: u32,
    /// Why the fds go: `VIA_SYSCALL` (`close_range`), `VIA_EXIT`, `VIA_EXEC`.
    via: u32,
}

/// One fd of a [`Sweep`]; `bpf_loop` has it verified once, whatever the
/// number of fds.
unsafe extern "C" fn sweep_fd(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Sweep`, on its stack.
    let c = unsafe { &*(ctx as *const Sweep) };
    let fd = c.first.wrapping_add(i);
    // SAFETY: probe reads only.
    unsafe {
        if c.via == VIA_EXEC {
            let word: u64 = task::read(c.cloexec, (fd / 64) * 8);
            if word & (1u64 << (fd % 64)) == 0 {
                return 0;
            }
        }
        let file: u64 = task::read(c.fds, fd.wrapping_mul(8));
        report_close(file, c.how, c.via);
    }
    0
}

/// Reports the watched write files among fds `first..end` of the current
/// process, which it is about to let go of.
#[inline(never)]
unsafe fn sweep(first: u32, end: u32, how: u32, via: u32) {
    unsafe {
        let (fdt, max) = task::fd_table(task::current());
        let end = end.min(max).min(SWEEP_MAX);
        if first >= end {
            return;
        }
        let mut c = Sweep {
            fds: task::read(fdt, off!(fdt_fd)),
            cloexec: task::read(fdt, off!(fdt_close_on_exec)),
            first,
            how,
            via,
        };
        let callback: unsafe extern "C" fn(u32, *mut c_void) -> i64 = sweep_fd;
        gen::bpf_loop(
            end - first,
            callback as *mut c_void,
            &mut c as *mut Sweep as *mut c_void,
            0,
        );
    }
}

/// The search of [`holds_followed`], for `bpf_loop`.
#[repr(C)]
struct Holds {
    /// `fdtable.fd`.
    fds: u64,
    /// Set when a followed file was found.
    found: u64,
}

/// One fd of a [`Holds`] search: 1 (stop) once a followed file is found.
unsafe extern "C" fn holds_fd(i: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Holds`, on its stack; probe reads.
    unsafe {
        let c = &mut *(ctx as *mut Holds);
        let file: u64 = task::read(c.fds, i.wrapping_mul(8));
        if file == 0 {
            return 0;
        }
        if followed(file) {
            c.found = 1;
            return 1;
        }
    }
    0
}

/// Whether the current process has an fd of a followed file.
#[inline(never)]
unsafe fn holds_followed() -> bool {
    unsafe {
        let (fdt, max) = task::fd_table(task::current());
        let mut c = Holds {
            fds: task::read(fdt, off!(fdt_fd)),
            found: 0,
        };
        let callback: unsafe extern "C" fn(u32, *mut c_void) -> i64 = holds_fd;
        gen::bpf_loop(
            max.min(SWEEP_MAX),
            callback as *mut c_void,
            &mut c as *mut Holds as *mut c_void,
            0,
        );
        c.found != 0
    }
}

/// `close_range(first, last, flags)` by a holder: each fd it closes.
#[tracepoint]
pub fn enter_close_range(ctx: TracePointContext) -> u32 {
    let Some(how) = holding() else {
        return 0;
    };
    // Only marks the fds close-on-exec: nothing is closed yet.
    if arg(&ctx, 2) as u32 & CLOSE_RANGE_CLOEXEC != 0 {
        return 0;
    }
    let first = arg(&ctx, 0) as u32;
    let end = (arg(&ctx, 1) as u32).saturating_add(1);
    // SAFETY: probe reads only.
    unsafe { sweep(first, end, how, VIA_SYSCALL) };
    0
}

/// `execve`/`execveat` by a holder: its close-on-exec fds go with it.
/// Reported at entry, where they are still there to read (a failed exec
/// closes nothing, and its report only has the file read again).
#[tracepoint]
pub fn enter_execve(_ctx: TracePointContext) -> u32 {
    if let Some(how) = holding() {
        // SAFETY: probe reads only.
        unsafe { sweep(0, u32::MAX, how, VIA_EXEC) };
    }
    0
}

/// A holder's `sendmsg`/`sendmmsg` with control data: fds may be passing.
#[tracepoint]
pub fn enter_sendmsg(ctx: TracePointContext) -> u32 {
    if holding().is_none() {
        return 0;
    }
    // `struct user_msghdr`'s `msg_controllen`; `sendmmsg`'s first
    // `mmsghdr` starts with one.
    let msg = arg(&ctx, 1);
    // SAFETY: a probe read of user memory; failure reads as 0.
    let controllen: u64 =
        unsafe { bpf_probe_read_user((msg + MSG_CONTROLLEN) as *const u64) }.unwrap_or(0);
    if controllen == 0 {
        return 0;
    }
    if let Some(at) = PASSING.get_ptr_mut(0) {
        // SAFETY: the one slot; the boot clock.
        unsafe { *at = gen::bpf_ktime_get_boot_ns() };
    }
    0
}

/// True while a holder may have fds in flight.
#[inline(always)]
fn passing() -> bool {
    // SAFETY: copied out; the boot clock.
    unsafe {
        let at = PASSING.get(0).copied().unwrap_or(0);
        at != 0 && gen::bpf_ktime_get_boot_ns().saturating_sub(at) < PASSING_NS
    }
}

/// A `recvmsg` while fds may be passing: its header is kept for the exit.
#[tracepoint]
pub fn enter_recvmsg(ctx: TracePointContext) -> u32 {
    if !passing() {
        return 0;
    }
    if let Some(slot) = RECV_MSG.current(true) {
        // SAFETY: this thread's own slot.
        unsafe { *slot = arg(&ctx, 1) };
    }
    0
}

/// A `recvmsg` that took fds (`SCM_RIGHTS`) while a holder was passing
/// some makes its process a holder. One that was already waiting when the
/// fds set off has no header kept, and is taken to have received them.
#[tracepoint]
pub fn exit_recvmsg(ctx: TracePointContext) -> u32 {
    if !passing() {
        return 0;
    }
    let msg = match RECV_MSG.current(false) {
        // SAFETY: this thread's own slot, emptied.
        Some(slot) => unsafe { core::ptr::replace(slot, 0) },
        None => 0,
    };
    if exit_ret(&ctx) < 0 {
        return 0;
    }
    // SAFETY: probe reads of user memory; failures read as 0.
    let rights = msg == 0
        || unsafe {
            let control: u64 = bpf_probe_read_user((msg + MSG_CONTROL) as *const u64).unwrap_or(0);
            let len: u64 = bpf_probe_read_user((msg + MSG_CONTROLLEN) as *const u64).unwrap_or(0);
            // `struct cmsghdr { size_t len; int level; int type; }`
            len >= 16
                && control != 0
                && bpf_probe_read_user((control + 8) as *const [i32; 2]).unwrap_or([0; 2])
                    == [SOL_SOCKET, SCM_RIGHTS]
        };
    if rights {
        add_holder(HOLD_FILE);
    }
    0
}

/// `recvmmsg` while fds may be passing: its messages are not read, so a
/// process that receives any is taken to hold some.
#[tracepoint]
pub fn exit_recvmmsg(ctx: TracePointContext) -> u32 {
    if exit_ret(&ctx) > 0 && passing() {
        add_holder(HOLD_FILE);
    }
    0
}

/// Makes the current process a holder, keeping what it already was.
#[inline(always)]
fn add_holder(how: u32) {
    let was = holding().unwrap_or(0);
    if was & how != how {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = HOLDERS.insert(&tgid, &(was | how), 0);
    }
}

/// A shared writable mapping of a watched file open for write: reported,
/// and the process remembered for its `munmap`s.
#[tracepoint]
pub fn enter_mmap(ctx: TracePointContext) -> u32 {
    // (addr, len, prot, flags, fd, off)
    let prot = arg(&ctx, 2) as u32;
    let flags = arg(&ctx, 3) as u32;
    if flags & MAP_SHARED == 0 || prot & PROT_WRITE == 0 || !ready() {
        return 0;
    }
    let Some(how) = holding() else {
        return 0;
    };
    // SAFETY: probe reads only.
    let file = unsafe { task::fd_file(task::current(), arg(&ctx, 4) as i32) };
    // SAFETY: probe reads only.
    if unsafe { held_write(file, how) }.is_none() {
        return 0;
    }
    let _ = MAPPED.insert(
        &((bpf_get_current_pid_tgid() >> 32) as u32),
        &Mapped {
            file,
            reported_ns: 0,
        },
        0,
    );
    // SAFETY: probe reads only.
    unsafe { report_mapped(file, FileOp::Mmap) };
    0
}

#[tracepoint]
pub fn enter_munmap(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(m) = MAPPED.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: the boot clock.
    let now = unsafe { gen::bpf_ktime_get_boot_ns() };
    // SAFETY: the process's own entry; a race with another of its threads
    // only reports twice.
    let file = unsafe {
        if now.saturating_sub((*m).reported_ns) < MUNMAP_EVERY_NS {
            return 0;
        }
        (*m).reported_ns = now;
        (*m).file
    };
    // SAFETY: probe reads only.
    unsafe { report_mapped(file, FileOp::Munmap) };
    0
}

unsafe fn report_mapped(file: u64, op: FileOp) {
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let s = unsafe { &mut *s };
    let mut flags = unsafe { path::resolve_file(s, file) };
    // A file the process no longer maps may be gone: only a watched path
    // is reported.
    let hit = path::matches(s, &mut flags, false);
    // SAFETY: probe reads only.
    if !unsafe { whole_file(s, file, &mut flags, hit) } {
        count(EventKind::File, COUNTER_FILTERED);
        return;
    }
    let ev = OnePath {
        op: op as u32,
        ret: 0,
        flags: 0,
        path_flags: flags,
        verdict: 0,
        via: VIA_SYSCALL,
    };
    unsafe { emit_one(s, task::current(), ev) };
}

// ---------------------------------------------------------------- connects

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    on_connect(sa, AF_INET, v4(sa), false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    on_connect(sa, AF_INET6, v6(sa), false)
}

/// A datagram sent to an address (`sendto`, `sendmsg` on an unconnected
/// UDP socket, or io_uring's `SEND`/`SENDMSG`): no connect ever runs.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    on_connect(sa, AF_INET, v4(sa), true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &*ctx.sock_addr };
    on_connect(sa, AF_INET6, v6(sa), true)
}

#[inline(always)]
fn v4(sa: &bpf_sock_addr) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    addr
}

#[inline(always)]
fn v6(sa: &bpf_sock_addr) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for (i, w) in sa.user_ip6.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    addr
}

/// The kernel marks io-wq worker threads with this task flag.
const PF_IO_WORKER: u32 = 0x10;

/// Datagrams to one destination are reported once per this many ns.
const SENDMSG_EVERY_NS: u64 = 1_000_000_000;

/// Records a connect (or a datagram) to a watched port and returns the
/// hook's answer: 1 lets it proceed, 0 makes the call fail with EPERM
/// before any packet leaves (the guardrail of an enforced resource).
///
/// Only a `connect(2)`, armed at its entry, has an exit to wait for; a
/// connect reached any other way is reported here, with no result, so
/// that it is neither lost nor attached to the thread's next connect.
#[inline(always)]
fn on_connect(sa: &bpf_sock_addr, family: u16, addr: [u8; 16], sendmsg: bool) -> i32 {
    if !ready() {
        return 1;
    }
    count(EventKind::Connect, COUNTER_SEEN);
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let key = bpf_get_current_pid_tgid();
    // SAFETY: read-only lookup of a plain value.
    let Some(resource) = (unsafe { WATCH_PORTS.get(&port) }).copied() else {
        count(EventKind::Connect, COUNTER_FILTERED);
        return 1;
    };
    let decided = gate::decide(resource);
    let verdict = decided as u32 & 0xf;
    let answer = if verdict == VERDICT_BLOCKED { 0 } else { 1 };
    let protocol = sa.protocol as u16;
    let armed = if sendmsg {
        None
    } else {
        PENDING_CONNECT.get_ptr_mut(&key)
    };
    let via = match armed {
        Some(p) => {
            // SAFETY: this thread's own record; only its programs touch it.
            let via = unsafe { (*p).via };
            if via == VIA_CONNECT {
                // SAFETY: as above.
                unsafe {
                    (*p).family = family;
                    (*p).port = port;
                    (*p).verdict = verdict;
                    (*p).addr = addr;
                    (*p).grant = decided >> 4;
                    (*p).protocol = protocol;
                    (*p).watched = 1;
                }
                return answer;
            }
            let _ = PENDING_CONNECT.remove(&key);
            via
        }
        None if sendmsg => {
            if !sendmsg_due(key, family, port, addr) {
                return answer;
            }
            VIA_SENDMSG
        }
        None => {
            // SAFETY: probe read of the current task.
            let task_flags: u32 = unsafe { task::read(task::current(), off!(task_flags)) };
            if task_flags & PF_IO_WORKER != 0 {
                VIA_IO_URING
            } else {
                VIA_FASTOPEN
            }
        }
    };
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<ConnectEvent>(EventKind::Connect, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::Connect, task::current());
        (*e).family = family;
        (*e).port = port;
        (*e).ret = 0;
        (*e).addr = addr;
        (*e).verdict = verdict;
        (*e).via = via;
        (*e).protocol = protocol;
        (*e).grant = decided >> 4;
    });
    answer
}

/// Whether a datagram from this process to this destination is to be
/// reported: the first, then at most one a second.
#[inline(always)]
fn sendmsg_due(pid_tgid: u64, family: u16, port: u16, addr: [u8; 16]) -> bool {
    let key = SentKey {
        tgid: (pid_tgid >> 32) as u32,
        family,
        port,
        addr,
    };
    // SAFETY: the boot clock.
    let now = unsafe { gen::bpf_ktime_get_boot_ns() };
    // SAFETY: read-only lookup of a plain value.
    if let Some(last) = unsafe { SENT.get(&key) } {
        if now.saturating_sub(*last) < SENDMSG_EVERY_NS {
            return false;
        }
    }
    let _ = SENT.insert(&key, &now, 0);
    true
}

/// The key of [`SENT`].
#[repr(C)]
#[derive(Clone, Copy)]
struct SentKey {
    tgid: u32,
    family: u16,
    port: u16,
    addr: [u8; 16],
}

/// When a datagram from a process to a watched destination was last reported.
#[map]
static SENT: LruHashMap<SentKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// Arms the thread's connect record before `connect(2)` runs, so that the
/// cgroup hook knows a syscall exit will follow.
#[tracepoint]
pub fn enter_connect(_ctx: TracePointContext) -> u32 {
    if ready() {
        arm_connect(VIA_CONNECT);
    }
    0
}

#[inline(always)]
fn arm_connect(via: u16) {
    let p = PendingConnect {
        family: 0,
        port: 0,
        verdict: 0,
        addr: [0; 16],
        grant: 0,
        via,
        watched: 0,
        protocol: 0,
        _pad: 0,
    };
    let _ = PENDING_CONNECT.insert(&bpf_get_current_pid_tgid(), &p, 0);
}

#[tracepoint]
pub fn exit_connect(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: copied out before removal.
    let Some(p) = (unsafe { PENDING_CONNECT.get(&key) }).copied() else {
        return 0;
    };
    let _ = PENDING_CONNECT.remove(&key);
    if p.watched == 0 {
        return 0;
    }
    let ret = exit_ret(&ctx);
    // SAFETY: writes into our reserved record; task reads are probe reads.
    emit::<ConnectEvent>(EventKind::Connect, |e| unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::Connect, task::current());
        (*e).family = p.family;
        (*e).port = p.port;
        (*e).ret = ret as i32;
        (*e).addr = p.addr;
        (*e).verdict = p.verdict;
        (*e).via = VIA_CONNECT;
        (*e).protocol = p.protocol;
        (*e).grant = p.grant;
    });
    0
}

// ---------------------------------------------------------------- io_uring
//
// io_uring requests make file changes and connects without the syscalls
// the hooks above watch. Connects meet the cgroup hooks all the same; file
// requests are judged here:
// - requests that name files (rename, unlink, link, symlink) at submission,
//   after their preparation copied the names into the kernel and before
//   they run; the event is kept by request and sent at completion with the
//   result;
// - requests on an open file (write, fallocate, ftruncate) and opens at
//   completion, from the file they wrote or the fd they installed.

const IORING_OP_WRITEV: u8 = 2;
const IORING_OP_WRITE_FIXED: u8 = 5;
const IORING_OP_CONNECT: u8 = 16;
const IORING_OP_FALLOCATE: u8 = 17;
const IORING_OP_OPENAT: u8 = 18;
const IORING_OP_WRITE: u8 = 23;
const IORING_OP_OPENAT2: u8 = 28;
const IORING_OP_RENAMEAT: u8 = 35;
const IORING_OP_UNLINKAT: u8 = 36;
const IORING_OP_SYMLINKAT: u8 = 38;
const IORING_OP_LINKAT: u8 = 39;
const IORING_OP_FTRUNCATE: u8 = 55;
const IORING_OP_WRITEV_FIXED: u8 = 61;

/// Events of io_uring requests that name watched files, built at
/// submission and sent at completion, by request.
#[map]
static URING_PENDING: LruHashMap<u64, FileEvent> = LruHashMap::with_max_entries(1024, 0);

/// Where such an event is built (too large for the stack).
#[map]
static URING_SCRATCH: PerCpuArray<FileEvent> = PerCpuArray::with_max_entries(1, 0);

/// `io_uring:io_uring_submit_req`: after the request's preparation, before
/// its issue.
#[tracepoint]
pub fn uring_submit(ctx: TracePointContext) -> u32 {
    if !ready() {
        return 0;
    }
    // SAFETY: the tracepoint's `void *req` is at offset 16, `u8 opcode` at 32.
    let (req, opcode) = unsafe {
        let base = ctx.as_ptr() as *const u8;
        (
            core::ptr::read(base.add(16) as *const u64),
            core::ptr::read(base.add(32)),
        )
    };
    let named = match opcode {
        // If the connect is issued inline, the cgroup hook runs on this
        // thread and finds the record named io_uring.
        IORING_OP_CONNECT => {
            arm_connect(VIA_IO_URING);
            false
        }
        IORING_OP_RENAMEAT | IORING_OP_UNLINKAT | IORING_OP_SYMLINKAT | IORING_OP_LINKAT => {
            off!(uring) == 1
        }
        // An open into a fixed-file slot installs no fd to follow at
        // completion: judged here by its name, like the requests above.
        IORING_OP_OPENAT | IORING_OP_OPENAT2 if off!(uring) == 1 => {
            // SAFETY: probe reads of the request.
            unsafe {
                let flags: u32 = task::read(req, off!(io_open_how));
                let slot: u32 = task::read(req, off!(io_open_file_slot));
                slot != 0 && writes(flags)
            }
        }
        _ => false,
    };
    if named {
        // Matched by `uring_named_match`, with a verifier budget of its
        // own: two names resolved and matched use most of one.
        if let Some(c) = long::CALL.get_ptr_mut(0) {
            // SAFETY: our per-CPU value; a tail call with our own context.
            unsafe {
                (*c).req = req;
                let _ = TAIL.tail_call(&ctx, 2);
            }
        }
        // Back only when the program is missing from the array: the event
        // is lost, and counted so.
        count(EventKind::File, COUNTER_DROPPED);
    }
    0
}

/// A request naming files, handed over by [`uring_submit`]: its names
/// matched. One that names a watched file, or a path too long for its
/// record, is handed on to [`uring_named_keep`].
#[tracepoint]
pub fn uring_named_match(ctx: TracePointContext) -> u32 {
    let Some(req) = long::CALL.get(0).map(|c| c.req) else {
        return 0;
    };
    // SAFETY: probe reads of the request.
    unsafe {
        let opcode: u8 = task::read(req, off!(io_kiocb_opcode));
        if uring_named(req, opcode) {
            let _ = TAIL.tail_call(&ctx, 1);
            count(EventKind::File, COUNTER_DROPPED);
        }
    }
    0
}

/// The kernel's copy of a name an io_uring request holds (`struct filename *`).
#[inline(always)]
unsafe fn filename(f: u64) -> u64 {
    if f == 0 {
        0
    } else {
        unsafe { task::read(f, off!(filename_name)) }
    }
}

/// Matches the names of a request. True when one is watched, or cut: the
/// request is then left in `long::CALL` for [`uring_named_keep`], which
/// runs with a verifier budget of its own (the matching leaves many
/// states, each of which would walk what follows it).
unsafe fn uring_named(req: u64, opcode: u8) -> bool {
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let s = unsafe { &mut *s };
    let task = task::current();
    // SAFETY: probe reads of the request's command area.
    let p = unsafe {
        match opcode {
            IORING_OP_RENAMEAT => PendingFile {
                dfd: task::read(req, off!(io_rename_old_dfd)),
                path: filename(task::read(req, off!(io_rename_oldpath))),
                dfd2: task::read(req, off!(io_rename_new_dfd)),
                path2: filename(task::read(req, off!(io_rename_newpath))),
                flags: task::read(req, off!(io_rename_flags)),
                ..pending(FileOp::Rename)
            },
            IORING_OP_OPENAT | IORING_OP_OPENAT2 => PendingFile {
                dfd: task::read(req, off!(io_open_dfd)),
                path: filename(task::read(req, off!(io_open_filename))),
                flags: task::read(req, off!(io_open_how)),
                ..pending(FileOp::Open)
            },
            IORING_OP_UNLINKAT => PendingFile {
                dfd: task::read(req, off!(io_unlink_dfd)),
                path: filename(task::read(req, off!(io_unlink_filename))),
                flags: task::read(req, off!(io_unlink_flags)),
                ..pending(FileOp::Unlink)
            },
            _ => PendingFile {
                dfd: task::read(req, off!(io_link_old_dfd)),
                path: filename(task::read(req, off!(io_link_oldpath))),
                dfd2: task::read(req, off!(io_link_new_dfd)),
                path2: filename(task::read(req, off!(io_link_newpath))),
                flags: task::read(req, off!(io_link_flags)),
                ..pending(if opcode == IORING_OP_LINKAT {
                    FileOp::Link
                } else {
                    FileOp::Symlink
                })
            },
        }
    };
    let op = p.op;
    let two = names_two(op);
    let mut flags2 = 0u32;
    let mut hit2 = false;
    if two {
        let odd = unsafe { path::odd_name(s, p.path2, true) };
        flags2 = unsafe { path::resolve_name(s, task, p.dfd2, p.path2, true) };
        hit2 = path::matches(s, &mut flags2, odd);
        path::save_key(s);
    }
    let resource2 = s.hit_resource;
    let mut hit1 = false;
    let flags1 = if op == FileOp::Symlink as u32 {
        unsafe { path::read_text(s, p.path, true) }
    } else {
        let odd = unsafe { path::odd_name(s, p.path, true) };
        let mut f = unsafe { path::resolve_name(s, task, p.dfd, p.path, true) };
        hit1 = path::matches(s, &mut f, odd);
        f
    };
    if !hit1 && !hit2 && (flags1 | flags2) & PATH_TRUNCATED == 0 {
        count(EventKind::File, COUNTER_FILTERED);
        return false;
    }
    let Some(slot) = long::CALL.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: our per-CPU value.
    unsafe {
        *slot = long::Call {
            p,
            // No result yet (and no fd to follow).
            ret: -1,
            flags1,
            flags2,
            verdict: 0,
            hit1,
            hit2,
            resource1: s.hit_resource,
            resource2,
            req,
        }
    };
    true
}

/// A request [`uring_named_match`] handed over: judged, and its event kept
/// for the completion, with the whole paths of names too long for the
/// record, built while the request still holds its names.
#[tracepoint]
pub fn uring_named_keep(_ctx: TracePointContext) -> u32 {
    let Some(mut c) = long::CALL.get(0).copied() else {
        return 0;
    };
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let task = task::current();
    // SAFETY: our per-CPU value, holding the paths the submission matched
    // (same CPU, no program in between); probe reads.
    let s = unsafe { &mut *s };
    let (len1, len2) = if (c.flags1 | c.flags2) & PATH_TRUNCATED != 0 {
        let Some(lens) = (unsafe { whole_paths(s, task, &mut c) }) else {
            count(EventKind::File, COUNTER_FILTERED);
            return 0;
        };
        lens
    } else {
        // Refused before the request runs: the submitter does not return
        // to user space, and io_uring cancels what it left at its exit.
        c.verdict = judge(c.hit1, c.resource1, c.hit2, c.resource2);
        (None, None)
    };
    let len1 = symlink_text(&c, true).or(len1);
    long::forget(c.req);
    if let Some(len) = len1 {
        long::keep_for(c.req, 0, 1, len);
    }
    if let Some(len) = len2 {
        long::keep_for(c.req, 1, 2, len);
    }
    let Some(e) = URING_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: our per-CPU record; task reads are probe reads.
    unsafe {
        task::fill_header(&mut (*e).hdr, EventKind::File, task);
        (*e).ret = 0;
        (*e).op = c.p.op;
        (*e).flags = c.p.flags;
        (*e).mode = 0;
        (*e).uid = u32::MAX;
        (*e).gid = u32::MAX;
        (*e).path_flags = c.flags1 | (c.flags2 << PATH2_SHIFT);
        (*e).verdict = c.verdict;
        (*e).via = VIA_IO_URING as u32;
        path::copy_key(s, (*e).path.as_mut_ptr());
        if names_two(c.p.op) {
            path::copy_saved(s, (*e).path2.as_mut_ptr());
        } else {
            (*e).path2[0] = 0;
        }
        if URING_PENDING.insert(&c.req, &*e, 0).is_err() {
            count(EventKind::File, COUNTER_DROPPED);
        }
    }
    0
}

/// The guardrail's verdict over the file(s) a call hit: the new name first
/// (a rename or link into a protected tree), then the file acted on.
#[inline(always)]
fn verdict_of(hit1: bool, resource1: u64, hit2: bool, resource2: u64) -> u32 {
    let mut verdict = if hit2 {
        gate::decide(resource2 as u32) as u32 & 0xf
    } else {
        0
    };
    if hit1 && verdict != VERDICT_BLOCKED {
        let v = gate::decide(resource1 as u32) as u32 & 0xf;
        if v > verdict {
            verdict = v;
        }
    }
    verdict
}

/// `io_uring:io_uring_complete`: a request's result is posted.
#[tracepoint]
pub fn uring_complete(ctx: TracePointContext) -> u32 {
    if !ready() || off!(uring) != 1 {
        return 0;
    }
    // SAFETY: the tracepoint's `void *req` is at offset 16, `int res` at 32.
    let (req, res) = unsafe {
        let base = ctx.as_ptr() as *const u8;
        (
            core::ptr::read(base.add(16) as *const u64),
            core::ptr::read(base.add(32) as *const i32),
        )
    };
    // SAFETY: probe reads of the request, which lives until after this.
    let opcode: u8 = unsafe { task::read(req, off!(io_kiocb_opcode)) };
    match opcode {
        IORING_OP_RENAMEAT | IORING_OP_UNLINKAT | IORING_OP_SYMLINKAT | IORING_OP_LINKAT => {
            if opcode == IORING_OP_RENAMEAT && res == 0 {
                // As for rename(2): cached directory verdicts go.
                step_watch_gen();
            }
            uring_named_done(req, res);
        }
        IORING_OP_WRITE
        | IORING_OP_WRITEV
        | IORING_OP_WRITE_FIXED
        | IORING_OP_WRITEV_FIXED
        | IORING_OP_FALLOCATE
        | IORING_OP_FTRUNCATE
            if res >= 0 =>
        {
            let op = if opcode == IORING_OP_FTRUNCATE {
                FileOp::Truncate
            } else {
                FileOp::Write
            };
            // SAFETY: probe reads only.
            unsafe {
                let file: u64 = task::read(req, off!(io_kiocb_file));
                uring_on_file(file, op, res, 0);
            }
        }
        IORING_OP_OPENAT | IORING_OP_OPENAT2 => {
            // SAFETY: probe reads only.
            unsafe {
                let flags: u32 = task::read(req, off!(io_open_how));
                let slot: u32 = task::read(req, off!(io_open_file_slot));
                if slot != 0 {
                    // Judged at submission (no fd to follow).
                    uring_named_done(req, res);
                } else if res >= 0 && writes(flags) {
                    let file = task::fd_file(task::current(), res);
                    if uring_on_file(file, FileOp::Open, res, flags) {
                        track_write(file);
                    }
                }
            }
        }
        _ => {}
    }
    0
}

/// Sends the event kept at a named request's submission, with its result.
#[inline(always)]
fn uring_named_done(req: u64, res: i32) {
    let Some(kept) = URING_PENDING.get_ptr_mut(&req) else {
        return;
    };
    long::send_kept(req);
    // SAFETY: the kept record is copied whole into the reserved one.
    emit::<FileEvent>(EventKind::File, |e| unsafe {
        gen::bpf_probe_read_kernel(
            e as *mut c_void,
            core::mem::size_of::<FileEvent>() as u32,
            kept as *const c_void,
        );
        (*e).ret = i64::from(res);
    });
    let _ = URING_PENDING.remove(&req);
}

/// Judges a request's open file; reports it when watched. True when it was.
unsafe fn uring_on_file(file: u64, op: FileOp, res: i32, flags: u32) -> bool {
    count(EventKind::File, COUNTER_SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let s = unsafe { &mut *s };
    if unsafe { path::dir_cached(s, file, watch_gen()) } {
        count(EventKind::File, COUNTER_FILTERED);
        return false;
    }
    let mut f = unsafe { path::resolve_file(s, file) };
    let hit = path::matches(s, &mut f, false);
    if !hit {
        path::dir_remember(s, f);
    }
    // SAFETY: probe reads only.
    if !unsafe { whole_file(s, file, &mut f, hit) } {
        count(EventKind::File, COUNTER_FILTERED);
        return false;
    }
    let verdict = verdict_of(true, s.hit_resource, false, 0);
    if verdict == VERDICT_BLOCKED {
        // SAFETY: signals the current process.
        unsafe { gen::bpf_send_signal(SIGKILL) };
    }
    let ev = OnePath {
        op: op as u32,
        ret: i64::from(res),
        flags,
        path_flags: f,
        verdict,
        via: VIA_IO_URING as u32,
    };
    unsafe { emit_one(s, task::current(), ev) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
