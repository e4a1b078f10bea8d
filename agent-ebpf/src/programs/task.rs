//! Reading the current task and its open files through BTF-derived offsets.

use super::off;
use agent_common::{EventKind, Header};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
    generated as gen,
};

/// The current `struct task_struct *`.
#[inline(always)]
pub fn current() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { gen::bpf_get_current_task() }
}

/// Reads a `T` at `base + off` from kernel memory; zero when `base` is null
/// or the read faults, so a torn chain of pointers ends in zeros, not garbage.
#[inline(always)]
pub unsafe fn read<T: Default + Copy>(base: u64, off: u32) -> T {
    if base == 0 {
        return T::default();
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

/// Fills the fields every record carries from the current task.
#[inline(always)]
pub unsafe fn fill_header(h: &mut Header, kind: EventKind, task: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    h.kind = kind as u32;
    h.pid = pid_tgid as u32;
    h.tgid = (pid_tgid >> 32) as u32;
    h.uid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    unsafe {
        let parent: u64 = read(task, off!(task_real_parent));
        h.ppid = read(parent, off!(task_tgid));
        let cred: u64 = read(task, off!(task_cred));
        h.euid = read(cred, off!(cred_euid));
        let lo = off!(task_loginuid);
        h.loginuid = if lo == 0 { u32::MAX } else { read(task, lo) };
        let leader: u64 = read(task, off!(task_group_leader));
        h.start_ns = read(leader, off!(task_start_boottime));
        h.ktime_ns = gen::bpf_ktime_get_boot_ns();
        h.cgroup_id = gen::bpf_get_current_cgroup_id();
        // An io_uring worker thread (`iou-wrk-PID`, `iou-sqp-PID`) works
        // for its process: the process's name is the one to report.
        let flags: u32 = read(task, off!(task_flags));
        if flags & PF_IO_WORKER != 0 {
            h.comm = read(leader, off!(task_comm));
            return;
        }
    }
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// `task_struct.flags`: an io_uring worker thread.
const PF_IO_WORKER: u32 = 0x10;

/// The kernel's `(device, inode)` of `task`'s executable, or zeros (a
/// kernel thread has none).
#[inline(always)]
pub unsafe fn exe_id(task: u64) -> (u64, u64) {
    unsafe {
        let mm: u64 = read(task, off!(task_mm));
        let file: u64 = read(mm, off!(mm_exe_file));
        let inode: u64 = read(file, off!(file_f_inode));
        let ino: u64 = read(inode, off!(inode_i_ino));
        let sb: u64 = read(inode, off!(inode_i_sb));
        let dev: u32 = read(sb, off!(sb_s_dev));
        (dev as u64, ino)
    }
}

/// `task`'s fd table (`struct fdtable *`) and its size.
#[inline(always)]
pub unsafe fn fd_table(task: u64) -> (u64, u32) {
    unsafe {
        let files: u64 = read(task, off!(task_files));
        let fdt: u64 = read(files, off!(files_fdt));
        (fdt, read(fdt, off!(fdt_max_fds)))
    }
}

/// The `struct file *` behind `fd` in `task`'s table, or 0.
#[inline(always)]
pub unsafe fn fd_file(task: u64, fd: i32) -> u64 {
    if fd < 0 {
        return 0;
    }
    unsafe {
        let (fdt, max) = fd_table(task);
        if fd as u32 >= max {
            return 0;
        }
        let array: u64 = read(fdt, off!(fdt_fd));
        if array == 0 {
            return 0;
        }
        read(array, fd as u32 * 8)
    }
}

/// `BPF_MAP_TYPE_TASK_STORAGE`: a value per task, kept by the kernel in
/// the task itself and freed with it. Finding this thread's value is a
/// cached pointer lookup, where a hash map keyed by thread id costs an
/// insert, a lookup and a delete per call (an LRU hash's insert alone was
/// most of the entry programs' time). aya-ebpf has no such map yet, so it
/// is declared here the way its BTF maps are: a `.maps` struct whose
/// field types the loader reads from BTF (type 29, no preallocation, no
/// entry bound, an `int` key).
#[repr(C)]
pub(crate) struct TaskStorage<T> {
    r#type: *const [i32; 29],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing
// reads or writes them at run time.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    /// The placeholder definition.
    pub(crate) const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    /// The current thread's value, created zeroed when `create` is set and
    /// there is none; `None` when there is none (or no memory for it).
    #[inline(always)]
    pub(crate) fn current(&self, create: bool) -> Option<*mut T> {
        let flags = if create {
            aya_ebpf::bindings::BPF_LOCAL_STORAGE_GET_F_CREATE as u64
        } else {
            0
        };
        // SAFETY: the map is this static; the task is the kernel's own
        // trusted pointer to the current task.
        let p = unsafe {
            aya_ebpf::helpers::generated::bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                aya_ebpf::helpers::generated::bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast::<T>())
    }
}
