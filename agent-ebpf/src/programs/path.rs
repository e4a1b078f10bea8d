//! Turning kernel objects and user strings into absolute paths, and matching
//! them against the watched-path trie.
//!
//! A path from an open file is exact: the kernel already resolved relative
//! names, `dirfd`s, `..` and symlinks to a dentry, and we walk its parents
//! (crossing mounts) to the root. A path given as a string to a call such as
//! `rename` is joined to the exact path of its start directory (cwd, dirfd or
//! root); if it contains `.`, `..` or `//` components it is passed on flagged
//! so user space can normalise it rather than being dropped by a prefix test.

use super::{off, task, DIR_CLEAN, WATCH_PATHS};
use agent_common::{DirKey, PATH_FROM_FILE, PATH_LEN, PATH_TRUNCATED, PATH_UNNORMALISED};
use aya_ebpf::{
    helpers::{bpf_probe_read_user, generated as gen},
    maps::lpm_trie::Key,
};
use core::ffi::c_void;

const AT_FDCWD: i32 = -100;
/// The walk writes names right to left, ending here (a NUL sits at this index).
const WALK_END: usize = 511;
/// Leaves room for a 255-byte name written at any masked offset below `WALK_END`.
const WALK_LEN: usize = 768;
/// Components (plus mount crossings) walked before giving up as truncated.
const MAX_DEPTH: u32 = 40;

/// Per-CPU work area.
#[repr(C)]
pub struct Scratch {
    walk: [u8; WALK_LEN],
    /// LPM key header; must sit right before `key`.
    prefix_len: u32,
    /// The candidate path; its first `PATH_LEN` bytes are the LPM key data.
    key: [u8; 2 * PATH_LEN],
    /// Where the user string starts in `key` (for the normalisation scan).
    join: u32,
    saved: [u8; PATH_LEN],
    // Loop state of the dentry walk (see `d_path`).
    pos: u64,
    dentry: u64,
    vfsmnt: u64,
    mnt: u64,
    mnt_root: u64,
    truncated: u64,
    odd: u64,
    /// 0 when the last string `odd_string` read is a plain, non-empty name
    /// (no `/`); 1 otherwise.
    pub slash: u64,
    /// Length of the path in `key` (without the NUL), from `resolve_file`,
    /// or from `resolve_user` for a joined name.
    key_len: u64,
    /// Bits of the ancestor marker the last miss ended on (0: none).
    miss_bits: u64,
    /// Resource index of the last hit (`u32::MAX`: none known).
    pub hit_resource: u64,
    /// The verdict cache's key for the file being resolved (see `dir_of`),
    /// its name's length, whether there is one, and the generation read
    /// before: kept here, not in registers, so that the verifier sees one
    /// state whichever way the cache went.
    dir: DirKey,
    dir_name_len: u64,
    dir_ok: u64,
    dir_gen: u64,
}

/// Writes the absolute path of `(dentry, vfsmount)` into `walk`, ending at
/// `WALK_END`; returns the start index and whether it was cut short.
///
/// Everything the loop carries lives in the scratch map, not in registers:
/// the verifier then sees the same state at the top of every iteration and
/// prunes, instead of exploring each path through every iteration.
#[inline(always)]
unsafe fn d_path(s: &mut Scratch, dentry: u64, vfsmnt: u64) -> (usize, bool) {
    s.walk[WALK_END] = 0;
    s.pos = WALK_END as u64;
    s.truncated = 1;
    if dentry == 0 || vfsmnt == 0 {
        return (WALK_END, true);
    }
    s.dentry = dentry;
    s.vfsmnt = vfsmnt;
    s.mnt = vfsmnt - off!(mount_mnt) as u64;
    // Only changes when the walk crosses into the parent mount.
    s.mnt_root = unsafe { task::read(vfsmnt, off!(vfsmount_mnt_root)) };
    for _ in 0..MAX_DEPTH {
        if unsafe { walk_step(s) } {
            break;
        }
    }
    let mut pos = (s.pos as usize) & 511;
    if pos == WALK_END {
        pos -= 1;
        s.walk[pos] = b'/';
    }
    (pos, s.truncated != 0)
}

/// One step up the tree: prepends a name, or crosses a mount. True when done.
#[inline(always)]
unsafe fn walk_step(s: &mut Scratch) -> bool {
    unsafe {
        let dentry = core::ptr::read_volatile(&s.dentry);
        let mnt = core::ptr::read_volatile(&s.mnt);
        let mnt_root = core::ptr::read_volatile(&s.mnt_root);
        let parent: u64 = task::read(dentry, off!(dentry_d_parent));
        if dentry == mnt_root || dentry == parent {
            if dentry != mnt_root {
                s.truncated = 0;
                return true;
            }
            let mnt_parent: u64 = task::read(mnt, off!(mount_mnt_parent));
            if mnt_parent == mnt || mnt_parent == 0 {
                s.truncated = 0;
                return true;
            }
            s.dentry = task::read(mnt, off!(mount_mnt_mountpoint));
            s.mnt = mnt_parent;
            s.vfsmnt = mnt_parent + off!(mount_mnt) as u64;
            s.mnt_root = task::read(s.vfsmnt, off!(vfsmount_mnt_root));
            return false;
        }
        let name_base = dentry + off!(dentry_d_name) as u64;
        let len: u32 = task::read(name_base, off!(qstr_len));
        let name: u64 = task::read(name_base, off!(qstr_name));
        let len = (len & 0xff) as u64;
        let pos = core::ptr::read_volatile(&s.pos);
        if len + 1 > pos {
            return true;
        }
        let at = (pos - len) as usize & 511;
        gen::bpf_probe_read_kernel(
            s.walk.as_mut_ptr().add(at) as *mut c_void,
            len as u32,
            name as *const c_void,
        );
        let slash = (pos - len - 1) as usize & 511;
        s.walk[slash] = b'/';
        s.pos = pos - len - 1;
        s.dentry = parent;
        false
    }
}

/// Copies the walked path into the key; returns its length without the NUL.
#[inline(always)]
unsafe fn walk_to_key(s: &mut Scratch, pos: usize) -> usize {
    let pos = pos & 511;
    unsafe {
        gen::bpf_probe_read_kernel(
            s.key.as_mut_ptr() as *mut c_void,
            PATH_LEN as u32,
            s.walk.as_ptr().add(pos) as *const c_void,
        );
    }
    WALK_END - pos
}

/// The directory holding an open file, as the verdict cache keys it, and
/// the length of the file's own name; `None` where the path has no such
/// directory to speak for it (a mount's root, a bind-mounted file).
#[inline(always)]
pub unsafe fn dir_of(file: u64) -> Option<(DirKey, u64)> {
    if file == 0 {
        return None;
    }
    unsafe {
        let fpath = file + off!(file_f_path) as u64;
        let dentry: u64 = task::read(fpath, off!(path_dentry));
        let mnt: u64 = task::read(fpath, off!(path_mnt));
        let parent: u64 = task::read(dentry, off!(dentry_d_parent));
        let mnt_root: u64 = task::read(mnt, off!(vfsmount_mnt_root));
        if dentry == 0 || parent == 0 || dentry == parent || dentry == mnt_root {
            return None;
        }
        let inode: u64 = task::read(parent, off!(dentry_d_inode));
        if inode == 0 {
            return None;
        }
        let name_len: u32 = task::read(dentry + off!(dentry_d_name) as u64, off!(qstr_len));
        Some((
            DirKey {
                mnt,
                dentry: parent,
                ino: task::read(inode, off!(inode_i_ino)),
                generation: task::read(inode, off!(inode_i_generation)),
                _pad: 0,
            },
            u64::from(name_len),
        ))
    }
}

/// Looks up the directory of `file` in the verdict cache: true when it is
/// known to hold nothing watched under generation `gen`. Leaves the key in
/// the scratch area for [`dir_remember`].
#[inline(always)]
pub unsafe fn dir_cached(s: &mut Scratch, file: u64, gen: u64) -> bool {
    unsafe {
        core::ptr::write_volatile(&mut s.dir_ok, 0);
        core::ptr::write_volatile(&mut s.dir_gen, gen);
        let Some((k, name_len)) = dir_of(file) else {
            return false;
        };
        s.dir = k;
        core::ptr::write_volatile(&mut s.dir_name_len, name_len);
        core::ptr::write_volatile(&mut s.dir_ok, 1);
        DIR_CLEAN.get(&s.dir).copied() == Some(gen)
    }
}

/// After a miss on the path `resolve_file` built (with `flags`): caches the
/// file's directory as clean when nothing is watched in or below it. Every
/// directory above a watched entry has a marker in the trie, so a miss that
/// ended on a marker shorter than `dir/` (or on none) proves it.
#[inline(always)]
pub fn dir_remember(s: &Scratch, flags: u32) {
    // SAFETY: reads of our own scratch fields.
    let (ok, name_len, gen) = unsafe {
        (
            core::ptr::read_volatile(&s.dir_ok),
            core::ptr::read_volatile(&s.dir_name_len),
            core::ptr::read_volatile(&s.dir_gen),
        )
    };
    if ok != 1 || flags & PATH_TRUNCATED != 0 {
        return;
    }
    let dir_len = s.key_len.saturating_sub(name_len);
    if dir_len > 0 && s.miss_bits < dir_len * 8 {
        let _ = DIR_CLEAN.insert(&s.dir, &gen, 0);
    }
}

/// Resolves an open `struct file *` into the key. Returns `PATH_*` flags.
#[inline(always)]
pub unsafe fn resolve_file(s: &mut Scratch, file: u64) -> u32 {
    s.join = 0;
    if file == 0 {
        s.key[0] = 0;
        return 0;
    }
    let fpath = file + off!(file_f_path) as u64;
    unsafe {
        let dentry: u64 = task::read(fpath, off!(path_dentry));
        let mnt: u64 = task::read(fpath, off!(path_mnt));
        let (pos, truncated) = d_path(s, dentry, mnt);
        let len = walk_to_key(s, pos);
        s.key_len = len as u64;
        let mut flags = PATH_FROM_FILE;
        if truncated || len >= PATH_LEN {
            flags |= PATH_TRUNCATED;
        }
        flags
    }
}

/// When the key holds just `/` (the walk of a dentry with no parent, as a
/// memfd's is), writes the dentry's own name after it: `/memfd:NAME`.
#[inline(always)]
pub unsafe fn pseudo_name(s: &mut Scratch, file: u64) {
    if file == 0 || s.key[0] != b'/' || s.key[1] != 0 {
        return;
    }
    unsafe {
        let dentry: u64 = task::read(file + off!(file_f_path) as u64, off!(path_dentry));
        let name: u64 = task::read(dentry + off!(dentry_d_name) as u64, off!(qstr_name));
        gen::bpf_probe_read_kernel_str(
            s.key.as_mut_ptr().add(1) as *mut c_void,
            (PATH_LEN - 1) as u32,
            name as *const c_void,
        );
    }
}

/// Resolves the user string `upath`, relative to `dfd` (or the cwd, or the
/// root when absolute), into the key. Returns `PATH_*` flags.
#[inline(always)]
pub unsafe fn resolve_user(s: &mut Scratch, task: u64, dfd: i32, upath: u64) -> u32 {
    unsafe { resolve_name(s, task, dfd, upath, false) }
}

/// Reads a string from user memory, or from kernel memory (`kernel`: the
/// copy an io_uring request keeps), as the `bpf_probe_read_*_str` helpers do.
#[inline(always)]
pub(crate) unsafe fn read_str(dst: *mut u8, len: u32, src: u64, kernel: bool) -> i64 {
    unsafe {
        if kernel {
            gen::bpf_probe_read_kernel_str(dst as *mut c_void, len, src as *const c_void)
        } else {
            gen::bpf_probe_read_user_str(dst as *mut c_void, len, src as *const c_void)
        }
    }
}

/// [`resolve_user`] for a name in user memory or, with `kernel`, in kernel
/// memory.
#[inline(always)]
pub unsafe fn resolve_name(s: &mut Scratch, task: u64, dfd: i32, upath: u64, kernel: bool) -> u32 {
    s.join = 0;
    s.key[0] = 0;
    if upath == 0 {
        return 0;
    }
    // Two bytes: a string read keeps the last for the NUL.
    let mut first = [0u8; 2];
    // SAFETY: a probe read into a local buffer.
    unsafe { read_str(first.as_mut_ptr(), 2, upath, kernel) };
    let first = first[0];
    let mut flags = 0;
    let mut at = 0usize;
    if first != b'/' {
        let (dentry, mnt) = unsafe { start_dir(task, dfd) };
        let (pos, truncated) = unsafe { d_path(s, dentry, mnt) };
        if truncated {
            flags |= PATH_TRUNCATED;
        }
        at = unsafe { walk_to_key(s, pos) };
        if at >= PATH_LEN - 1 {
            // No room left for the name: the directory prefix alone is matched.
            s.key[PATH_LEN - 1] = 0;
            return flags | PATH_TRUNCATED;
        }
        if at > 1 {
            s.key[at & 255] = b'/';
            at += 1;
        }
    }
    s.join = at as u32;
    // One byte more than the key holds: a name that fills it exactly is
    // told from one that goes on.
    let n = unsafe {
        read_str(
            s.key.as_mut_ptr().add(at & 255),
            PATH_LEN as u32 + 1,
            upath,
            kernel,
        )
    };
    if n < 0 {
        s.key[at & 255] = 0;
    } else if at + n as usize > PATH_LEN {
        flags |= PATH_TRUNCATED;
    } else if n > 0 {
        // For `dir_remember`: the joined path's length and the name's.
        s.key_len = (at + n as usize - 1) as u64;
        // SAFETY: a write to our own scratch field.
        unsafe { core::ptr::write_volatile(&mut s.dir_name_len, (n - 1) as u64) };
    }
    flags
}

/// The directory a relative name starts from: the cwd for `AT_FDCWD`,
/// else the directory `dfd` is open on, as `(dentry, vfsmount)`.
#[inline(always)]
pub(crate) unsafe fn start_dir(task: u64, dfd: i32) -> (u64, u64) {
    unsafe {
        if dfd == AT_FDCWD {
            let fs: u64 = task::read(task, off!(task_fs));
            let pwd = fs + off!(fs_pwd) as u64;
            (
                task::read::<u64>(pwd, off!(path_dentry)),
                task::read::<u64>(pwd, off!(path_mnt)),
            )
        } else {
            let file = task::fd_file(task, dfd);
            let fpath = file + off!(file_f_path) as u64;
            if file == 0 {
                (0, 0)
            } else {
                (
                    task::read::<u64>(fpath, off!(path_dentry)),
                    task::read::<u64>(fpath, off!(path_mnt)),
                )
            }
        }
    }
}

/// For a call naming its file by a plain name (no `/`): looks up the
/// directory the name is resolved in, under the key a file opened there
/// gets from [`dir_of`]. True when it is known to hold nothing watched
/// under generation `gen`; leaves the key for [`dir_remember`], which needs
/// the name's length from [`resolve_user`].
#[inline(always)]
pub unsafe fn start_dir_cached(s: &mut Scratch, task: u64, dfd: i32, gen: u64) -> bool {
    unsafe {
        core::ptr::write_volatile(&mut s.dir_ok, 0);
        core::ptr::write_volatile(&mut s.dir_gen, gen);
        let (dentry, mnt) = start_dir(task, dfd);
        if dentry == 0 || mnt == 0 {
            return false;
        }
        let inode: u64 = task::read(dentry, off!(dentry_d_inode));
        if inode == 0 {
            return false;
        }
        s.dir = DirKey {
            mnt,
            dentry,
            ino: task::read(inode, off!(inode_i_ino)),
            generation: task::read(inode, off!(inode_i_generation)),
            _pad: 0,
        };
        core::ptr::write_volatile(&mut s.dir_ok, 1);
        DIR_CLEAN.get(&s.dir).copied() == Some(gen)
    }
}

/// Reads a user string verbatim (a symlink's target text) into the key.
#[inline(always)]
pub unsafe fn read_user_text(s: &mut Scratch, upath: u64) -> u32 {
    unsafe { read_text(s, upath, false) }
}

/// [`read_user_text`] from user or (`kernel`) kernel memory.
#[inline(always)]
pub unsafe fn read_text(s: &mut Scratch, upath: u64, kernel: bool) -> u32 {
    s.join = 0;
    s.key[0] = 0;
    if upath == 0 {
        return 0;
    }
    // A text that fills the key may go on: sent whole by `exit_file_send`.
    if unsafe { read_str(s.key.as_mut_ptr(), PATH_LEN as u32, upath, kernel) } >= PATH_LEN as i64 {
        PATH_TRUNCATED
    } else {
        0
    }
}

/// True when the user string at `upath` is empty (`AT_EMPTY_PATH` calls).
#[inline(always)]
pub unsafe fn user_empty(upath: u64) -> bool {
    upath == 0 || unsafe { bpf_probe_read_user(upath as *const u8) }.unwrap_or(1) == 0
}

/// True when the key's path is watched. A string path that missed the trie
/// but holds `.`, `..` or `//` components (`odd`, found at entry) is passed
/// on with `PATH_UNNORMALISED` set, since a prefix test on it proves nothing.
#[inline(always)]
pub fn matches(s: &mut Scratch, flags: &mut u32, odd: bool) -> bool {
    s.hit_resource = u32::MAX as u64;
    if s.key[0] == 0 {
        return false;
    }
    s.prefix_len = (PATH_LEN * 8) as u32;
    // SAFETY: `prefix_len` is immediately followed by the key bytes (repr(C)).
    let key = unsafe { &*(&s.prefix_len as *const u32 as *const Key<[u8; PATH_LEN]>) };
    match WATCH_PATHS.get(key) {
        Some(v) if v.ancestor == 0 => {
            s.hit_resource = u64::from(v.resource);
            return true;
        }
        Some(v) => s.miss_bits = u64::from(v.bits),
        None => s.miss_bits = 0,
    }
    if odd && *flags & PATH_FROM_FILE == 0 {
        *flags |= PATH_UNNORMALISED;
        return true;
    }
    false
}

/// True when the user string has `.`, `..` or `//` components (or a hidden
/// name, `/.x`, which costs a user-space look but never a miss).
///
/// Runs in the entry programs, each verified from a single state; in the
/// exit program the loop would be walked once per path into it.
#[inline(always)]
pub unsafe fn odd_string(s: &mut Scratch, upath: u64) -> bool {
    unsafe { odd_name(s, upath, false) }
}

/// [`odd_string`] for a name in user or (`kernel`) kernel memory.
#[inline(always)]
pub unsafe fn odd_name(s: &mut Scratch, upath: u64, kernel: bool) -> bool {
    if upath == 0 {
        return false;
    }
    s.odd = 0;
    s.slash = 1;
    let n = unsafe { read_str(s.key.as_mut_ptr(), PATH_LEN as u32, upath, kernel) };
    if n <= 0 {
        return false;
    }
    if n > 1 {
        s.slash = 0;
    }
    // A name through /proc/PID/root or /cwd reaches a file by another
    // path: user space resolves it.
    if n > 6 && s.key[..6] == *b"/proc/" {
        s.slash = 1;
        return true;
    }
    // A relative name is joined to its directory with one '/': put it before
    // the string so a leading `./` or `../` is seen. An absolute one has its own.
    s.key[511] = if s.key[0] == b'/' { 0 } else { b'/' };
    for i in 0..PATH_LEN {
        // SAFETY: indices are masked into the 512-byte key; nothing but the
        // index is carried in registers, so the verifier prunes each step.
        let c = unsafe { core::ptr::read_volatile(&s.key[i & 511]) };
        if c == 0 {
            break;
        }
        if c == b'/' {
            // SAFETY: a write to our own scratch field.
            unsafe { core::ptr::write_volatile(&mut s.slash, 1) };
        }
        let prev = unsafe { core::ptr::read_volatile(&s.key[i.wrapping_sub(1) & 511]) };
        if prev == b'/' && (c == b'.' || c == b'/') {
            s.odd = 1;
            break;
        }
    }
    s.odd != 0
}

/// Keeps the key aside while a second path is resolved.
#[inline(always)]
pub fn save_key(s: &mut Scratch) {
    // SAFETY: both buffers are inside the scratch value and PATH_LEN long.
    unsafe {
        gen::bpf_probe_read_kernel(
            s.saved.as_mut_ptr() as *mut c_void,
            PATH_LEN as u32,
            s.key.as_ptr() as *const c_void,
        );
    }
}

/// Makes the `PATH_LEN` bytes at `src` (the head of a whole path) the key.
#[inline(always)]
pub fn key_from(s: &mut Scratch, src: *const u8) {
    // SAFETY: the key is inside the scratch value and PATH_LEN long.
    unsafe {
        gen::bpf_probe_read_kernel(
            s.key.as_mut_ptr() as *mut c_void,
            PATH_LEN as u32,
            src as *const c_void,
        );
    }
}

/// After the head of a whole path (`len` bytes) missed: its directory is
/// remembered as holding nothing watched, as for a path that fit.
#[inline(always)]
pub fn dir_remember_whole(s: &mut Scratch, len: usize, flags: u32) {
    s.key_len = len as u64;
    dir_remember(s, flags & !PATH_TRUNCATED);
}

/// The key's bytes, to put aside and bring back.
#[inline(always)]
pub fn key_mut(s: &mut Scratch) -> *mut u8 {
    s.key.as_mut_ptr()
}

/// Copies the key's first `PATH_LEN` bytes to `dst` (a ring buffer record).
#[inline(always)]
pub unsafe fn copy_key(s: &Scratch, dst: *mut u8) {
    unsafe {
        gen::bpf_probe_read_kernel(
            dst as *mut c_void,
            PATH_LEN as u32,
            s.key.as_ptr() as *const c_void,
        );
    }
}

/// Copies the saved path to `dst`.
#[inline(always)]
pub unsafe fn copy_saved(s: &Scratch, dst: *mut u8) {
    unsafe {
        gen::bpf_probe_read_kernel(
            dst as *mut c_void,
            PATH_LEN as u32,
            s.saved.as_ptr() as *const c_void,
        );
    }
}
