//! Records shared by the Driftwatch eBPF programs and the agent.
//!
//! Every type here is `#[repr(C)]` with padding written out as named fields, so
//! the kernel side can zero it and the user side can read it as plain bytes.
//! With the `user` feature the types implement [`aya::Pod`].
#![no_std]

/// Bytes kept of a path. Matches the LPM trie's largest key (256 bytes of data).
pub const PATH_LEN: usize = 256;
/// Bytes of argv kept for an exec (NUL-separated, as in `/proc/PID/cmdline`).
pub const ARGV_LEN: usize = 1024;
/// Length of `task_struct::comm`.
pub const COMM_LEN: usize = 16;

/// The kind of a record on the ring buffer; also the index of its counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A program was executed (`sched_process_exec`).
    Exec = 1,
    /// A new process (not a thread) was created.
    Fork = 2,
    /// A process (thread group leader) exited.
    Exit = 3,
    /// A change, or an attempted change, to a watched file.
    File = 4,
    /// A connect to a watched port.
    Connect = 5,
    /// The whole path of the file event the same thread sends next, whose
    /// record holds it cut.
    LongPath = 6,
}

/// Number of slots in the per-kind counter arrays (index 0 is unused).
pub const KIND_SLOTS: u32 = 7;

impl EventKind {
    /// Decodes a kind read from a record.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Exec,
            2 => Self::Fork,
            3 => Self::Exit,
            4 => Self::File,
            5 => Self::Connect,
            6 => Self::LongPath,
            _ => return None,
        })
    }
}

/// What a [`FileEvent`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// `open`/`openat`/`openat2`/`creat` for write, create or truncate.
    Open = 1,
    /// `rename`/`renameat`/`renameat2`: `path` is the old name, `path2` the new.
    Rename = 2,
    /// `unlink`/`unlinkat`/`rmdir`.
    Unlink = 3,
    /// `chmod`/`fchmod`/`fchmodat`/`fchmodat2`; `mode` is the new mode.
    Chmod = 4,
    /// `chown`/`lchown`/`fchown`/`fchownat`; `uid`/`gid` are the new owner.
    Chown = 5,
    /// `truncate`/`ftruncate`.
    Truncate = 6,
    /// `link`/`linkat`: `path` is the existing file, `path2` the new name.
    Link = 7,
    /// `symlink`/`symlinkat`: `path` is the link's target text, `path2` the new link.
    Symlink = 8,
    /// Last `close` of an fd that was opened for write on a watched file.
    CloseWrite = 9,
    /// Data written to a watched file by a request that no close follows
    /// for the agent to see (an io_uring `WRITE`, `WRITEV`, `FALLOCATE`).
    Write = 10,
    /// `setxattr`/`lsetxattr`/`fsetxattr`/`setxattrat`: `path2` holds the
    /// attribute's name.
    SetXattr = 11,
    /// `removexattr`/`lremovexattr`/`fremovexattr`/`removexattrat`: `path2`
    /// holds the attribute's name.
    RemoveXattr = 12,
    /// `utime`/`utimes`/`utimensat`/`futimesat`: timestamps set.
    Utimes = 13,
    /// `ioctl(FS_IOC_SETFLAGS)`: `mode` holds the new inode flags.
    SetFlags = 14,
    /// `mount`/`move_mount` onto `path`. Reported whatever the path (mounts
    /// are few); user space keeps those on, above or below a watched path.
    Mount = 15,
    /// `umount2` of `path`, likewise.
    Umount = 16,
    /// A shared writable mapping of a watched file opened for write: its
    /// writes need no syscall, so the file is read again at `munmap` and
    /// when the process exits.
    Mmap = 17,
    /// `munmap` in a process holding such a mapping (at most one report a
    /// tenth of a second).
    Munmap = 18,
}

impl FileOp {
    /// Decodes an op read from a record.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Open,
            2 => Self::Rename,
            3 => Self::Unlink,
            4 => Self::Chmod,
            5 => Self::Chown,
            6 => Self::Truncate,
            7 => Self::Link,
            8 => Self::Symlink,
            9 => Self::CloseWrite,
            10 => Self::Write,
            11 => Self::SetXattr,
            12 => Self::RemoveXattr,
            13 => Self::Utimes,
            14 => Self::SetFlags,
            15 => Self::Mount,
            16 => Self::Umount,
            17 => Self::Mmap,
            18 => Self::Munmap,
            _ => return None,
        })
    }
}

/// `path` was resolved from a kernel object (an open file), not from a string.
pub const PATH_FROM_FILE: u32 = 1 << 0;
/// `path` did not fit in [`PATH_LEN`] bytes.
pub const PATH_TRUNCATED: u32 = 1 << 1;
/// `path` contains `.`/`..`/`//` components: the kernel passed it on without a
/// prefix match so that user space can normalise it and decide.
pub const PATH_UNNORMALISED: u32 = 1 << 2;
/// `path` is another name (a hard link outside the watched trees) of a
/// watched file, matched by its inode: user space finds the watched name.
pub const PATH_BY_INODE: u32 = 1 << 3;
/// The same three flags for `path2`, shifted.
pub const PATH2_SHIFT: u32 = 8;
/// The argv did not fit in [`ARGV_LEN`] bytes.
pub const ARGV_TRUNCATED: u32 = 1 << 0;
/// The exe path did not fit in [`PATH_LEN`] bytes.
pub const EXE_TRUNCATED: u32 = 1 << 1;
/// The executed file has no name left in any directory: a memfd (`exe` is
/// then `/memfd:NAME`) or a file deleted before or while it ran.
pub const EXE_DELETED: u32 = 1 << 2;

/// Fields every record starts with: who did it and when.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    /// An [`EventKind`].
    pub kind: u32,
    /// Thread id (kernel `pid`).
    pub pid: u32,
    /// Process id (kernel `tgid`).
    pub tgid: u32,
    /// Parent's process id.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Audit login uid: the human behind `sudo`; `u32::MAX` when unset.
    pub loginuid: u32,
    /// `bpf_ktime_get_boot_ns` when the record was made.
    pub ktime_ns: u64,
    /// Start time of the thread group leader, in boot-clock nanoseconds.
    pub start_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// `task_struct::comm`.
    pub comm: [u8; COMM_LEN],
}

/// An `execve`: the new program's path (from its `struct file`) and argv.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    /// Common fields.
    pub hdr: Header,
    /// Bytes of `argv` in use.
    pub argv_len: u32,
    /// [`ARGV_TRUNCATED`], [`EXE_TRUNCATED`], [`EXE_DELETED`].
    pub flags: u32,
    /// The executable's device (`s_dev`), inode and modification time
    /// (ns): the key its digest is cached under, read without a `stat`.
    pub exe_dev: u64,
    /// See `exe_dev`.
    pub exe_ino: u64,
    /// See `exe_dev`.
    pub exe_mtime_ns: i64,
    /// Absolute path of the executed file, NUL-terminated.
    pub exe: [u8; PATH_LEN],
    /// Arguments, NUL-separated.
    pub argv: [u8; ARGV_LEN],
}

/// A new process; `hdr` describes the parent.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkEvent {
    /// Common fields (of the parent).
    pub hdr: Header,
    /// The child's process id.
    pub child_tgid: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The child's start time, boot-clock nanoseconds.
    pub child_start_ns: u64,
}

/// The longest whole path a [`LongPath`] record carries (`PATH_MAX`).
pub const LONG_PATH_MAX: usize = 4096;

/// A path too long for its file event's record, sent just before that
/// event by the same thread; `len` bytes of path (no NUL) follow.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LongPath {
    /// [`EventKind::LongPath`].
    pub kind: u32,
    /// The thread (kernel `pid`) whose next file event it completes.
    pub tid: u32,
    /// 1: the event's `path`; 2: its `path2`.
    pub which: u32,
    /// Bytes of path that follow.
    pub len: u32,
}

/// A process exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExitEvent {
    /// Common fields.
    pub hdr: Header,
    /// `task_struct::exit_code` (`status << 8 | signal`).
    pub exit_code: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// A change, or attempted change, to a watched file.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileEvent {
    /// Common fields.
    pub hdr: Header,
    /// The syscall's return value: `>= 0` success (an fd for opens), else `-errno`.
    pub ret: i64,
    /// A [`FileOp`].
    pub op: u32,
    /// Open flags, or `AT_*` / rename flags.
    pub flags: u32,
    /// New mode (chmod), or the create mode (open).
    pub mode: u32,
    /// New owner (chown); `u32::MAX` means unchanged.
    pub uid: u32,
    /// New group (chown); `u32::MAX` means unchanged.
    pub gid: u32,
    /// `PATH_*` flags for `path`, and shifted by [`PATH2_SHIFT`] for `path2`.
    pub path_flags: u32,
    /// A `VERDICT_*`: what the guardrail of the path's resource decided.
    pub verdict: u32,
    /// How the call came: [`VIA_SYSCALL`] or [`VIA_IO_URING`] (whose
    /// requests have no syscall of their own).
    pub via: u32,
    /// Absolute path, NUL-terminated.
    pub path: [u8; PATH_LEN],
    /// Second path (rename/link target), NUL-terminated; empty otherwise.
    pub path2: [u8; PATH_LEN],
}

/// A connect to a watched port.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    /// Common fields.
    pub hdr: Header,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// `connect`'s return value: 0, or `-errno` (`-EINPROGRESS` for non-blocking).
    pub ret: i32,
    /// Destination address: 4 bytes for IPv4, 16 for IPv6, network order.
    pub addr: [u8; 16],
    /// A `VERDICT_*`: what the guardrail of the port's resource decided.
    pub verdict: u32,
    /// How the socket reached the port: a `VIA_*`. Only [`VIA_CONNECT`]
    /// carries the call's result in `ret`; the others report before the
    /// result exists.
    pub via: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u16,
    /// The grant that let the connect through (`VERDICT_GRANTED`), else 0.
    pub grant: u64,
}

/// A file call made by its own syscall.
pub const VIA_SYSCALL: u32 = 0;
/// A file still held by a process when it exited: its last reference in
/// that process went with the exit, not with a `close`.
pub const VIA_EXIT: u32 = 4;
/// A close-on-exec fd, closed by the `execve` of the process holding it.
pub const VIA_EXEC: u32 = 5;

/// `connect(2)`: the event waits for the call's exit and carries its result.
pub const VIA_CONNECT: u16 = 0;
/// An io_uring `IORING_OP_CONNECT`, issued from the submitting thread or an
/// io-wq worker: no syscall exit follows, the result is unknown.
pub const VIA_IO_URING: u16 = 1;
/// A stream socket connected by a send (`sendto`/`sendmsg` with
/// `MSG_FASTOPEN`, TCP Fast Open): the result is unknown.
pub const VIA_FASTOPEN: u16 = 2;
/// A datagram sent to the address without a connect (`cgroup/sendmsg4|6`):
/// reported once per process, destination and second.
pub const VIA_SENDMSG: u16 = 3;

/// A connect seen by the cgroup hook, waiting for the syscall's result.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingConnect {
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// A `VERDICT_*`.
    pub verdict: u32,
    /// Destination address, network order.
    pub addr: [u8; 16],
    /// The grant that let the connect through, else 0.
    pub grant: u64,
    /// Who armed the record: [`VIA_CONNECT`] at `connect(2)`'s entry,
    /// [`VIA_IO_URING`] at an io_uring connect's submission.
    pub via: u16,
    /// Set by the cgroup hook once the destination is known to be watched;
    /// a record still unset at the call's exit is dropped.
    pub watched: u16,
    /// `IPPROTO_*` of the socket.
    pub protocol: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// A file syscall's arguments, kept from its entry to its exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingFile {
    /// A [`FileOp`].
    pub op: u32,
    /// Directory fd for `path` (`AT_FDCWD` = -100), or the fd for fd-based calls.
    pub dfd: i32,
    /// Directory fd for `path2`.
    pub dfd2: i32,
    /// Open flags or `AT_*` flags.
    pub flags: u32,
    /// Mode argument.
    pub mode: u32,
    /// uid argument (chown).
    pub uid: u32,
    /// gid argument (chown).
    pub gid: u32,
    /// 1 when the call names its file by fd (`dfd`), not by `path`.
    pub by_fd: u32,
    /// User pointer to the first path string (0 when none).
    pub path: u64,
    /// User pointer to the second path string (0 when none).
    pub path2: u64,
    /// Bit 0: the first path string has `.`, `..` or `//` components;
    /// bit 1: the second has; bit 2: the call has one path, a plain name
    /// (no `/`), resolved in its start directory.
    pub odd: u32,
    /// 1 from the call's entry until its exit has taken the record (the
    /// record stays in the thread's storage, emptied, for its next call).
    pub live: u32,
}

/// A process's shared writable mapping of a watched file.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Mapped {
    /// The mapped `struct file *`.
    pub file: u64,
    /// When a `munmap` of the process was last reported (boot clock, ns).
    pub reported_ns: u64,
}

/// A process in `HOLDERS` may hold a file opened for write on a watched
/// file: it opened one, or its parent held one when it forked, or it took
/// fds over a Unix socket while a holder was passing some.
pub const HOLD_FILE: u32 = 1 << 0;
/// A process in `HOLDERS` held write handles on watched files when the
/// agent started (or descends from one that did): their `struct file`s are
/// unknown, so any file it closes open for write is judged by its path.
pub const HOLD_BY_PATH: u32 = 1 << 1;

/// Counter slots per event kind, in the `COUNTERS` per-CPU array at
/// `kind * COUNTER_SLOTS + slot`.
pub const COUNTER_SLOTS: u32 = 4;
/// Calls the sensor examined.
pub const COUNTER_SEEN: u32 = 0;
/// Calls the kernel filter dropped because nothing watched matched.
pub const COUNTER_FILTERED: u32 = 1;
/// Records written to the ring buffer.
pub const COUNTER_EMITTED: u32 = 2;
/// Records lost because the ring buffer was full.
pub const COUNTER_DROPPED: u32 = 3;
/// Size of the `COUNTERS` array.
pub const COUNTER_ENTRIES: u32 = KIND_SLOTS * COUNTER_SLOTS;

/// Value stored in the watched-path trie: which policy resource the prefix is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WatchValue {
    /// Index of the resource in the agent's policy.
    pub resource: u32,
    /// 1 when the entry is a single file (matched with its trailing NUL).
    pub exact: u32,
    /// 1 for a directory above something watched (`/etc/` for
    /// `/etc/app.yaml`): not watched itself, but its presence says "look
    /// deeper", and its absence lets the kernel cache a directory as clean.
    pub ancestor: u32,
    /// The entry's key length in bits.
    pub bits: u32,
}

/// A directory as the kernel's verdict cache knows it: the mount it was
/// reached through and its dentry, with its inode's number and generation
/// so that a freed and reused dentry is never mistaken for it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct DirKey {
    /// `struct vfsmount *` of the path.
    pub mnt: u64,
    /// `struct dentry *` of the directory.
    pub dentry: u64,
    /// `inode.i_ino`.
    pub ino: u64,
    /// `inode.i_generation`.
    pub generation: u32,
    /// Padding, zero.
    pub _pad: u32,
}

/// A file by device and inode: watched files with more than one name.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct InodeKey {
    /// `super_block.s_dev` (the kernel's encoding: major << 20 | minor).
    pub dev: u64,
    /// `inode.i_ino`.
    pub ino: u64,
}

/// Struct member offsets of the running kernel, read from its BTF at start.
///
/// Rust eBPF gets no CO-RE relocations, so the agent passes these in as a
/// global; the programs never assume a layout.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct KernelOffsets {
    /// `task_struct.real_parent`
    pub task_real_parent: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.start_boottime`
    pub task_start_boottime: u32,
    /// `task_struct.loginuid` (0 when the kernel has no audit)
    pub task_loginuid: u32,
    /// `task_struct.cred`
    pub task_cred: u32,
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `task_struct.fs`
    pub task_fs: u32,
    /// `task_struct.files`
    pub task_files: u32,
    /// `task_struct.exit_code`
    pub task_exit_code: u32,
    /// `task_struct.flags`
    pub task_flags: u32,
    /// `task_struct.comm`
    pub task_comm: u32,
    /// `cred.euid`
    pub cred_euid: u32,
    /// `mm_struct.arg_start`
    pub mm_arg_start: u32,
    /// `mm_struct.arg_end`
    pub mm_arg_end: u32,
    /// `fs_struct.root`
    pub fs_root: u32,
    /// `fs_struct.pwd`
    pub fs_pwd: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_path`
    pub file_f_path: u32,
    /// `path.mnt`
    pub path_mnt: u32,
    /// `path.dentry`
    pub path_dentry: u32,
    /// `dentry.d_parent`
    pub dentry_d_parent: u32,
    /// `dentry.d_name`
    pub dentry_d_name: u32,
    /// `qstr.len`
    pub qstr_len: u32,
    /// `qstr.name`
    pub qstr_name: u32,
    /// `vfsmount.mnt_root`
    pub vfsmount_mnt_root: u32,
    /// `mount.mnt` (the embedded `vfsmount`)
    pub mount_mnt: u32,
    /// `mount.mnt_parent`
    pub mount_mnt_parent: u32,
    /// `mount.mnt_mountpoint`
    pub mount_mnt_mountpoint: u32,
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `dentry.d_inode`
    pub dentry_d_inode: u32,
    /// `inode.i_ino`
    pub inode_i_ino: u32,
    /// `inode.i_generation`
    pub inode_i_generation: u32,
    /// `inode.i_nlink`
    pub inode_i_nlink: u32,
    /// `inode.i_mtime_sec` (`i_mtime.tv_sec` before 6.7)
    pub inode_i_mtime_sec: u32,
    /// `inode.i_mtime_nsec` (`i_mtime.tv_nsec` before 6.7)
    pub inode_i_mtime_nsec: u32,
    /// `mm_struct.exe_file`
    pub mm_exe_file: u32,
    /// `file.f_inode`
    pub file_f_inode: u32,
    /// `file.f_mode`
    pub file_f_mode: u32,
    /// `file.f_ref` (`f_count` before 6.13): the file's reference count
    pub file_f_ref: u32,
    /// What to add to the count at `file_f_ref` to get the references:
    /// 1 for a `file_ref_t`, which counts from 0 for one reference; 0 for
    /// an `atomic_long_t f_count`.
    pub file_ref_bias: u32,
    /// `fdtable.close_on_exec`
    pub fdt_close_on_exec: u32,
    /// `inode.i_sb`
    pub inode_i_sb: u32,
    /// `super_block.s_dev`
    pub sb_s_dev: u32,
    /// `io_kiocb.opcode` (the io_uring offsets below are 0, and `uring` 0,
    /// on a kernel whose BTF lacks one of them)
    pub io_kiocb_opcode: u32,
    /// `io_kiocb.file`
    pub io_kiocb_file: u32,
    /// `io_rename.old_dfd`
    pub io_rename_old_dfd: u32,
    /// `io_rename.new_dfd`
    pub io_rename_new_dfd: u32,
    /// `io_rename.oldpath`
    pub io_rename_oldpath: u32,
    /// `io_rename.newpath`
    pub io_rename_newpath: u32,
    /// `io_rename.flags`
    pub io_rename_flags: u32,
    /// `io_unlink.dfd`
    pub io_unlink_dfd: u32,
    /// `io_unlink.filename`
    pub io_unlink_filename: u32,
    /// `io_unlink.flags`
    pub io_unlink_flags: u32,
    /// `io_link.old_dfd`
    pub io_link_old_dfd: u32,
    /// `io_link.new_dfd`
    pub io_link_new_dfd: u32,
    /// `io_link.oldpath`
    pub io_link_oldpath: u32,
    /// `io_link.newpath`
    pub io_link_newpath: u32,
    /// `io_link.flags`
    pub io_link_flags: u32,
    /// `io_open.how` (an `open_how`, whose `flags` come first)
    pub io_open_how: u32,
    /// `io_open.dfd`
    pub io_open_dfd: u32,
    /// `io_open.filename`
    pub io_open_filename: u32,
    /// `io_open.file_slot`
    pub io_open_file_slot: u32,
    /// `filename.name`
    pub filename_name: u32,
    /// 1 when every io_uring offset above was found.
    pub uring: u32,
    /// 1 once the agent has filled this struct; programs do nothing before.
    pub ready: u32,
}

impl KernelOffsets {
    /// All offsets zero and `ready == 0`: the programs' compiled-in default.
    pub const fn zeroed() -> Self {
        // SAFETY: every field is a u32, for which zero is valid.
        unsafe { core::mem::zeroed() }
    }
}

// ---------------------------------------------------------------- guardrails

/// No guardrail covers the resource (mode `monitor`), or none was consulted.
pub const VERDICT_NONE: u32 = 0;
/// The policy allows the identity.
pub const VERDICT_ALLOWED: u32 = 1;
/// An approved, unexpired grant allows the identity.
pub const VERDICT_GRANTED: u32 = 2;
/// Refused: a connect returned EPERM; a file call's caller was sent SIGKILL.
pub const VERDICT_BLOCKED: u32 = 3;
/// Mode `audit`: it would have been refused; nothing was stopped.
pub const VERDICT_WOULD_BLOCK: u32 = 4;

/// A resource's guardrail mode in [`GateRule::mode`].
pub const GATE_MONITOR: u32 = 0;
/// Report `would_block`, stop nothing.
pub const GATE_AUDIT: u32 = 1;
/// Refuse.
pub const GATE_ENFORCE: u32 = 2;

/// The facts of a process the kernel checks a selector against, as
/// [`GateKey::kind`] and the index of [`GateRule::free`].
pub const FACT_UID: u32 = 0;
/// Audit login uid.
pub const FACT_LOGINUID: u32 = 1;
/// The executable: `a` is the kernel's device number, `b` the inode number.
pub const FACT_EXE: u32 = 2;
/// cgroup v2 id (a container's or a pod's).
pub const FACT_CGROUP: u32 = 3;
/// `comm`, 16 bytes NUL-padded, in `a` and `b`.
pub const FACT_COMM: u32 = 4;
/// Number of fact kinds.
pub const FACTS: usize = 5;
/// Selector bits below this are the policy's; the bits from here up are grants.
pub const GRANT_BIT0: u32 = 48;
/// Grants a resource can hold at once.
pub const GRANT_SLOTS: usize = 16;
/// Resources the gate table holds.
pub const GATE_RESOURCES: u32 = 1024;

/// One fact of one resource's selectors: "a process whose `kind` is
/// `(a, b)` satisfies this fact of the selectors in the value's bits".
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GateKey {
    /// Resource index.
    pub resource: u32,
    /// A `FACT_*`.
    pub kind: u32,
    /// The fact's value (see the `FACT_*` constants).
    pub a: u64,
    /// Second half of the value, else 0.
    pub b: u64,
}

/// A resource's guardrail: a process is allowed when, for every fact kind,
/// its fact's bits (from `GATES`) or the kind's `free` bits hold a common
/// selector bit. Bits from [`GRANT_BIT0`] are grants, valid until their
/// expiry on the kernel's boot clock.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GateRule {
    /// A `GATE_*` mode.
    pub mode: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Per fact kind: the selectors that do not constrain it.
    pub free: [u64; FACTS],
    /// Per grant slot: the grant's id (0: empty slot).
    pub grant_id: [u64; GRANT_SLOTS],
    /// Per grant slot: `bpf_ktime_get_boot_ns` at which it expires.
    pub grant_until_ns: [u64; GRANT_SLOTS],
}

impl Default for GateRule {
    fn default() -> Self {
        Self {
            mode: GATE_MONITOR,
            _pad: 0,
            free: [0; FACTS],
            grant_id: [0; GRANT_SLOTS],
            grant_until_ns: [0; GRANT_SLOTS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding.
    unsafe impl aya::Pod for Header {}
    unsafe impl aya::Pod for ExecEvent {}
    unsafe impl aya::Pod for ForkEvent {}
    unsafe impl aya::Pod for ExitEvent {}
    unsafe impl aya::Pod for FileEvent {}
    unsafe impl aya::Pod for ConnectEvent {}
    unsafe impl aya::Pod for PendingConnect {}
    unsafe impl aya::Pod for PendingFile {}
    unsafe impl aya::Pod for Mapped {}
    unsafe impl aya::Pod for LongPath {}
    unsafe impl aya::Pod for DirKey {}
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for WatchValue {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for GateKey {}
    unsafe impl aya::Pod for GateRule {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // A size that is not a multiple of 8 means implicit padding crept in,
    // which the kernel would leave uninitialised.
    #[test]
    fn records_have_no_implicit_padding() {
        assert_eq!(size_of::<Header>(), 8 * 4 + 8 * 3 + COMM_LEN);
        assert_eq!(
            size_of::<ExecEvent>(),
            size_of::<Header>() + 8 + 24 + PATH_LEN + ARGV_LEN
        );
        assert_eq!(
            size_of::<FileEvent>(),
            size_of::<Header>() + 8 + 32 + 2 * PATH_LEN
        );
        assert_eq!(size_of::<ConnectEvent>(), size_of::<Header>() + 8 + 16 + 16);
        assert_eq!(size_of::<PendingConnect>(), 8 + 16 + 8 + 8);
        assert_eq!(size_of::<GateKey>(), 24);
        assert_eq!(size_of::<GateRule>(), 8 + 8 * FACTS + 16 * GRANT_SLOTS);
        assert_eq!(size_of::<PendingFile>(), 8 * 4 + 16 + 8);
    }
}
