//! Write handles open before the agent started: fds open for write on
//! watched files, and shared writable mappings of them, found in `/proc`.
//! Without them, a file opened before the start and written after would
//! never be read again.

use std::collections::{BTreeMap, BTreeSet};

use super::watch::WatchSet;

/// What `/proc` shows open on watched files.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Handles {
    /// `(pid, fd, path)` of fds open for write.
    pub write_fds: Vec<(u32, u32, String)>,
    /// Paths each process maps shared and writable.
    pub mapped: BTreeMap<u32, BTreeSet<String>>,
}

/// Whether `fdinfo` text says the fd is open for writing.
fn writable(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|f| f & 3 != 0)
}

/// A `maps` line's path when the mapping is shared and writable.
fn shared_writable(line: &str) -> Option<&str> {
    let mut f = line.split_whitespace();
    let perms = f.nth(1)?;
    let path = f.nth(3)?;
    (perms.contains('w') && perms.contains('s') && path.starts_with('/')).then_some(path)
}

/// Looks through every process.
pub fn find(watch: &WatchSet) -> Handles {
    let mut h = Handles::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return h;
    };
    let me = std::process::id();
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.filter_map(Result::ok) {
                let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let Some(path) = target.to_str() else {
                    continue;
                };
                if watch.resource_of(path).is_none() {
                    continue;
                }
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}"));
                if info.is_ok_and(|i| writable(&i)) {
                    h.write_fds.push((pid, n, path.to_owned()));
                }
            }
        }
        if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            for path in maps.lines().filter_map(shared_writable) {
                if watch.resource_of(path).is_some() {
                    h.mapped.entry(pid).or_default().insert(path.to_owned());
                }
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_and_maps_are_read() {
        assert!(writable("pos:\t0\nflags:\t0100002\nmnt_id:\t30\n"));
        assert!(writable("flags:\t01\n"));
        assert!(!writable("pos:\t0\nflags:\t0100000\n"));
        assert_eq!(
            shared_writable("7f00-7f01 rw-s 00000000 fe:01 1234  /etc/app/state.bin"),
            Some("/etc/app/state.bin")
        );
        assert_eq!(
            shared_writable("7f00-7f01 r--s 00000000 fe:01 1234  /etc/app/state.bin"),
            None
        );
        assert_eq!(
            shared_writable("7f00-7f01 rw-p 00000000 00:00 0  [heap]"),
            None
        );
    }
}
