//! The executable behind a process: its name as a reader should see it
//! (`memfd:NAME` for a fileless program, `PATH (deleted)` for a removed
//! one) and its SHA-256, cached by device, inode and modification time so
//! that a program run a thousand times is read once.

use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    sync::{Arc, Mutex},
};

/// Executables up to this size are hashed when first run, on the event
/// path (about a millisecond); larger ones on a thread of their own, one
/// at a time, for the runs after: a new large program must not hold up the
/// events behind it.
const HASH_NOW_MAX: u64 = 1 << 20;

/// Cached digests kept before the cache starts over.
const CACHE_MAX: usize = 8192;

/// The name to report for an executable the kernel named `raw`, and
/// whether it has no file left: `deleted` is the kernel's word (no links
/// left); a name read from `/proc/PID/exe` says ` (deleted)` itself.
pub fn display_name(raw: &str, deleted: bool) -> (String, bool) {
    let (base, deleted) = match raw.strip_suffix(" (deleted)") {
        Some(b) => (b, true),
        None => (raw, deleted),
    };
    if !deleted {
        return (base.to_owned(), false);
    }
    match base.strip_prefix("/memfd:") {
        Some(name) => (format!("memfd:{name}"), true),
        None => (format!("{base} (deleted)"), true),
    }
}

/// `(s_dev as the kernel encodes it, inode, mtime ns)`.
pub type Key = (u64, u64, i64);

/// Digests of executables by (device, inode, mtime).
#[derive(Default)]
pub struct ExeHashes {
    known: Arc<Mutex<HashMap<Key, Arc<str>>>>,
    hashing: Arc<Mutex<HashSet<Key>>>,
    /// The thread that hashes large executables, started on first use.
    aside: Mutex<Option<std::sync::mpsc::Sender<(Key, std::fs::File)>>>,
}

/// Large executables waiting to be hashed aside at most; more are hashed
/// at a later run.
const ASIDE_MAX: usize = 64;

impl ExeHashes {
    /// The SHA-256 of the program process `pid` runs (`exe` as the kernel
    /// named it, tried when the process is already gone and the file is
    /// not fileless). `None` when it cannot be read, or while a large one
    /// is being hashed.
    pub fn of(&self, pid: u32, exe: &str, fileless: bool) -> Option<Arc<str>> {
        self.of_key(pid, exe, fileless, None)
    }

    /// [`ExeHashes::of`], first by the key the kernel read at exec
    /// (`(s_dev, inode, mtime ns)`): a program run before costs no `stat`.
    pub fn of_key(
        &self,
        pid: u32,
        exe: &str,
        fileless: bool,
        kernel_key: Option<Key>,
    ) -> Option<Arc<str>> {
        if let Some(k) = kernel_key {
            if let Some(h) = self.known.lock().ok()?.get(&k) {
                return Some(h.clone());
            }
        }
        let via_proc = format!("/proc/{pid}/exe");
        let (path, meta) = match std::fs::metadata(&via_proc) {
            Ok(m) => (via_proc, m),
            Err(_) if !fileless && exe.starts_with('/') => {
                (exe.to_owned(), std::fs::metadata(exe).ok()?)
            }
            Err(_) => return None,
        };
        let key = (
            crate::sensors::watch::kernel_dev(meta.dev()),
            meta.ino(),
            meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
        );
        if let Some(h) = self.known.lock().ok()?.get(&key) {
            return Some(h.clone());
        }
        if meta.len() <= HASH_NOW_MAX {
            let h = hash_reader(std::fs::File::open(&path).ok()?)?;
            remember(&self.known, key, h.clone());
            return Some(h);
        }
        // Large: hashed aside, through a handle opened now (the process
        // may be gone by the time the thread reads).
        {
            let mut hashing = self.hashing.lock().ok()?;
            if hashing.len() >= ASIDE_MAX || !hashing.insert(key) {
                return None;
            }
        }
        let file = std::fs::File::open(&path).ok()?;
        let mut aside = self.aside.lock().ok()?;
        if aside.is_none() {
            *aside = self.start_aside();
        }
        if let Some(tx) = aside.as_ref() {
            if tx.send((key, file)).is_err() {
                *aside = None;
            }
        }
        None
    }

    /// Starts the thread that hashes large executables one at a time.
    fn start_aside(&self) -> Option<std::sync::mpsc::Sender<(Key, std::fs::File)>> {
        let (tx, rx) = std::sync::mpsc::channel::<(Key, std::fs::File)>();
        let (known, hashing) = (self.known.clone(), self.hashing.clone());
        let spawned = std::thread::Builder::new()
            .name("exe-hash".into())
            .spawn(move || {
                for (key, file) in rx {
                    if let Some(h) = hash_reader(file) {
                        remember(&known, key, h);
                    }
                    if let Ok(mut h) = hashing.lock() {
                        h.remove(&key);
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::debug!("no thread to hash large executables: {e}");
                None
            }
        }
    }
}

/// Keeps a digest, starting the cache over when it is full.
fn remember(known: &Mutex<HashMap<Key, Arc<str>>>, key: Key, h: Arc<str>) {
    if let Ok(mut k) = known.lock() {
        if k.len() >= CACHE_MAX {
            k.clear();
        }
        k.insert(key, h);
    }
}

fn hash_reader(f: std::fs::File) -> Option<Arc<str>> {
    crate::digest::hash_reader(f).ok().map(Arc::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest as _, Sha256};

    #[test]
    fn fileless_and_deleted_programs_are_named_as_such() {
        assert_eq!(
            display_name("/usr/bin/sed", false),
            ("/usr/bin/sed".into(), false)
        );
        assert_eq!(
            display_name("/memfd:payload", true),
            ("memfd:payload".into(), true)
        );
        assert_eq!(
            display_name("/memfd:payload (deleted)", false),
            ("memfd:payload".into(), true)
        );
        assert_eq!(
            display_name("/tmp/x/tool", true),
            ("/tmp/x/tool (deleted)".into(), true)
        );
        assert_eq!(
            display_name("/tmp/x/tool (deleted)", false),
            ("/tmp/x/tool (deleted)".into(), true)
        );
    }

    #[test]
    fn an_executable_is_hashed_once_per_inode_and_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").expect("write");
        let tool = tool.display().to_string();
        let hashes = ExeHashes::default();
        // No such process: the kernel's name is read instead.
        let a = hashes
            .of(u32::MAX, &tool, false)
            .expect("the file's digest");
        assert_eq!(
            &*a,
            crate::digest::hex(&Sha256::digest(b"#!/bin/sh\n")).as_str()
        );
        let b = hashes.of(u32::MAX, &tool, false).expect("cached");
        assert!(Arc::ptr_eq(&a, &b), "read twice");
        assert_eq!(
            hashes.of(u32::MAX, &tool, true),
            None,
            "fileless: no name to read"
        );
    }
}
