//! Whole paths for the events whose path does not fit their record.
//!
//! A file event carries 256 bytes of path, and the walk that matches it
//! against the watch trie stops there too. When a reported path was cut,
//! the whole path is built here, apart from that hot path: the dentry walk
//! runs under `bpf_loop` (verified once, whatever the depth) into a 4 KiB
//! per-CPU area, and goes to user space as a [`LongPath`] record just
//! before the event it completes, from the same thread.

use super::{off, task, EVENTS};
use agent_common::{EventKind, LongPath, PendingFile, LONG_PATH_MAX};
use aya_ebpf::{
    helpers::generated as gen,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use core::ffi::c_void;

/// Where the walk ends: names are written right to left before it.
const END: usize = LONG_PATH_MAX;
/// Index mask for the walk and the output (both twice `END` long, so that
/// a 255-byte name written at any masked offset stays inside).
const MASK: usize = LONG_PATH_MAX - 1;
/// Components and mount crossings walked at most.
const MAX_STEPS: u32 = 2048;

/// Per-CPU work area.
#[repr(C)]
pub struct Long {
    walk: [u8; 2 * END],
    pos: u64,
    dentry: u64,
    mnt: u64,
    mnt_root: u64,
    /// 1 when the walk reached the root, 2 when it gave up.
    done: u64,
    /// A key put aside while another path is matched.
    pub keep: [u8; agent_common::PATH_LEN],
    /// The records of an event's two paths.
    out: [Out; 2],
}

/// A record: `path` must follow `head`.
#[repr(C)]
struct Out {
    head: LongPath,
    path: [u8; 2 * END],
}

#[map]
static LONG: PerCpuArray<Long> = PerCpuArray::with_max_entries(1, 0);

/// A file call `exit_file` matched, or could not match for a cut path,
/// for `exit_file_send`.
#[derive(Clone, Copy)]
pub struct Call {
    pub p: PendingFile,
    pub ret: i64,
    pub flags1: u32,
    pub flags2: u32,
    pub verdict: u32,
    /// Whether each path matched, and its resource.
    pub hit1: bool,
    pub hit2: bool,
    pub resource1: u64,
    pub resource2: u64,
    /// The io_uring request that named the paths (kernel copies of the
    /// names, the event sent at its completion), or 0 for a syscall.
    pub req: u64,
}

/// The call `exit_file` hands to `exit_file_send`, per CPU.
#[map]
pub static CALL: PerCpuArray<Call> = PerCpuArray::with_max_entries(1, 0);

/// Whole paths of io_uring requests, built at submission while the
/// request still holds its names and sent at its completion: by request
/// plus 1 or 2 for `path` or `path2`. One evicted before its request
/// completes leaves that event's path cut, and flagged so.
#[map]
static KEPT: LruHashMap<u64, Out> = LruHashMap::with_max_entries(64, 0);

/// One step up the tree, for `bpf_loop`: 1 when done.
unsafe extern "C" fn step(_i: u32, _ctx: *mut c_void) -> i64 {
    let Some(l) = LONG.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: our per-CPU value; kernel memory only through probe reads.
    unsafe {
        let l = &mut *l;
        let dentry = l.dentry;
        let mnt = l.mnt;
        let parent: u64 = task::read(dentry, off!(dentry_d_parent));
        if dentry == l.mnt_root || dentry == parent {
            if dentry != l.mnt_root {
                l.done = 1;
                return 1;
            }
            let mnt_parent: u64 = task::read(mnt, off!(mount_mnt_parent));
            if mnt_parent == mnt || mnt_parent == 0 {
                l.done = 1;
                return 1;
            }
            l.dentry = task::read(mnt, off!(mount_mnt_mountpoint));
            l.mnt = mnt_parent;
            l.mnt_root = task::read(mnt_parent + off!(mount_mnt) as u64, off!(vfsmount_mnt_root));
            return 0;
        }
        let name_base = dentry + off!(dentry_d_name) as u64;
        let len: u32 = task::read(name_base, off!(qstr_len));
        let name: u64 = task::read(name_base, off!(qstr_name));
        let len = u64::from(len & 0xff);
        let pos = l.pos;
        if len + 1 > pos {
            l.done = 2;
            return 1;
        }
        gen::bpf_probe_read_kernel(
            l.walk.as_mut_ptr().add((pos - len) as usize & MASK) as *mut c_void,
            len as u32,
            name as *const c_void,
        );
        l.walk[(pos - len - 1) as usize & MASK] = b'/';
        l.pos = pos - len - 1;
        l.dentry = parent;
        0
    }
}

/// Walks `(dentry, vfsmount)` to the root into area `area`'s path; its
/// length, or `None` when it does not fit.
unsafe fn walk(area: usize, dentry: u64, vfsmnt: u64) -> Option<usize> {
    let l = unsafe { &mut *LONG.get_ptr_mut(0)? };
    if dentry == 0 || vfsmnt == 0 {
        return None;
    }
    l.pos = END as u64;
    l.done = 0;
    l.dentry = dentry;
    l.mnt = vfsmnt - off!(mount_mnt) as u64;
    l.mnt_root = unsafe { task::read(vfsmnt, off!(vfsmount_mnt_root)) };
    let callback: unsafe extern "C" fn(u32, *mut c_void) -> i64 = step;
    // SAFETY: the callback takes no context.
    unsafe { gen::bpf_loop(MAX_STEPS, callback as *mut c_void, core::ptr::null_mut(), 0) };
    let l = unsafe { &mut *LONG.get_ptr_mut(0)? };
    if l.done != 1 {
        return None;
    }
    let pos = l.pos as usize & MASK;
    let len = END - pos;
    let out = &mut l.out[area & 1];
    if len == 0 {
        out.path[0] = b'/';
        return Some(1);
    }
    // SAFETY: both areas are ours; the length is bounded by the mask.
    unsafe {
        gen::bpf_probe_read_kernel(
            out.path.as_mut_ptr() as *mut c_void,
            (len & MASK) as u32,
            l.walk.as_ptr().add(pos) as *const c_void,
        )
    };
    Some(len & MASK)
}

/// The first bytes of area `area`'s path, for matching.
pub fn head(area: usize) -> Option<*const u8> {
    let l = LONG.get_ptr_mut(0)?;
    // SAFETY: our per-CPU value.
    Some(unsafe { (*l).out[area & 1].path.as_ptr() })
}

/// Puts `key` aside, or (`back`) brings it back.
pub fn keep(key: *mut u8, back: bool) {
    let Some(l) = LONG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: our per-CPU value and the caller's key, both PATH_LEN long.
    unsafe {
        let keep = (*l).keep.as_mut_ptr();
        let (dst, src) = if back { (key, keep) } else { (keep, key) };
        gen::bpf_probe_read_kernel(
            dst as *mut c_void,
            agent_common::PATH_LEN as u32,
            src as *const c_void,
        );
    }
}

/// Sends area `area`'s path, `len` bytes long, as path `which` (1: `path`,
/// 2: `path2`) of the event the current thread is about to send.
pub fn send(area: usize, which: u32, len: usize) {
    let Some(l) = LONG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: our per-CPU value.
    let l = unsafe { &mut (*l).out[area & 1] };
    let len = len & (2 * END - 1);
    l.head = record_head(which, len);
    let size = core::mem::size_of::<LongPath>() + len;
    // SAFETY: `head` and `path` are one contiguous area of the map value,
    // `size` within it.
    let bytes =
        unsafe { core::slice::from_raw_parts(&l.head as *const LongPath as *const u8, size) };
    let _ = EVENTS.output::<[u8]>(bytes, 0);
}

/// Keeps area `area`'s path, `len` bytes long, as path `which` of the event
/// request `req` sends at its completion, for the current thread's.
pub fn keep_for(req: u64, area: usize, which: u32, len: usize) {
    let Some(l) = LONG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: our per-CPU value.
    let out = unsafe { &mut (*l).out[area & 1] };
    out.head = record_head(which, len);
    let _ = KEPT.insert(&(req + u64::from(which)), out, 0);
}

/// Sends the paths kept for request `req`, ahead of its event.
pub fn send_kept(req: u64) {
    for which in [1u64, 2] {
        let key = req + which;
        let Some(out) = KEPT.get_ptr(&key) else {
            continue;
        };
        // SAFETY: a map value; `head` and `path` are contiguous in it, the
        // size bounded within it.
        unsafe {
            let len = (*out).head.len as usize & (2 * END - 1);
            let bytes = core::slice::from_raw_parts(
                out as *const u8,
                core::mem::size_of::<LongPath>() + len,
            );
            let _ = EVENTS.output::<[u8]>(bytes, 0);
        }
        let _ = KEPT.remove(&key);
    }
}

/// Drops what a request that did not need it may have left kept.
pub fn forget(req: u64) {
    for which in [1u64, 2] {
        let _ = KEPT.remove(&(req + which));
    }
}

/// The header of a whole path for the current thread's next event.
fn record_head(which: u32, len: usize) -> LongPath {
    LongPath {
        kind: EventKind::LongPath as u32,
        tid: aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32,
        which,
        len: (len & (2 * END - 1)) as u32,
    }
}

/// The whole path of an open `file`, into area `area`; its length.
pub unsafe fn of_file(area: usize, file: u64) -> Option<usize> {
    if file == 0 {
        return None;
    }
    let fpath = file + off!(file_f_path) as u64;
    unsafe {
        let dentry: u64 = task::read(fpath, off!(path_dentry));
        let mnt: u64 = task::read(fpath, off!(path_mnt));
        walk(area, dentry, mnt)
    }
}

/// The whole path a name resolves to, into area `area`: relative to
/// `(dentry, vfsmount)`, the directory it starts from, unless absolute. As
/// it was written (`..` and `.` are left to user space, as for the cut
/// path). Its length. Inlined: six arguments are more than a BPF call has.
#[inline(always)]
pub unsafe fn of_name(area: usize, dir: (u64, u64), upath: u64, kernel: bool) -> Option<usize> {
    let mut first = [0u8; 2];
    unsafe { super::path::read_str(first.as_mut_ptr(), 2, upath, kernel) };
    let mut at = 0usize;
    if first[0] != b'/' {
        at = unsafe { walk(area, dir.0, dir.1) }?;
    }
    // SAFETY: our per-CPU value.
    let l = unsafe { &mut (*LONG.get_ptr_mut(0)?).out[area & 1] };
    // After the directory's own path, unless that is the root `/`.
    if at > 1 {
        l.path[at & MASK] = b'/';
        at += 1;
    }
    let n = unsafe {
        super::path::read_str(
            l.path.as_mut_ptr().add(at & MASK),
            LONG_PATH_MAX as u32,
            upath,
            kernel,
        )
    };
    if n <= 1 {
        return None;
    }
    Some((at & MASK) + n as usize - 1)
}

/// A symlink's target text, whole, into area `area`: its length.
pub unsafe fn of_text(area: usize, text: u64, kernel: bool) -> Option<usize> {
    // SAFETY: our per-CPU value.
    let l = unsafe { &mut (*LONG.get_ptr_mut(0)?).out[area & 1] };
    let n =
        unsafe { super::path::read_str(l.path.as_mut_ptr(), LONG_PATH_MAX as u32, text, kernel) };
    if n <= 1 {
        return None;
    }
    Some((n as usize - 1) & MASK)
}
