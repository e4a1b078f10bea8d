//! Ring buffer records to events: decoding, normalising and attributing.

use std::net::{Ipv4Addr, Ipv6Addr};

use agent_common::{
    ConnectEvent, EventKind, ExecEvent, ExitEvent, FileEvent, FileOp, ForkEvent, Header,
    ARGV_TRUNCATED, EXE_DELETED, PATH2_SHIFT, PATH_BY_INODE, PATH_FROM_FILE, PATH_TRUNCATED,
    PATH_UNNORMALISED, VERDICT_ALLOWED, VERDICT_BLOCKED, VERDICT_GRANTED, VERDICT_WOULD_BLOCK,
    VIA_CONNECT, VIA_EXEC, VIA_EXIT, VIA_FASTOPEN, VIA_IO_URING, VIA_SYSCALL,
};

use super::watch::{normalise, WatchSet};
use crate::{
    clock::{Clock, Time},
    event::{Event, Flags, Mode, Outcome},
    identity::{cstr, ProcessTable},
};

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its kind's record.
    #[error("record of kind {kind} is {len} bytes, expected {want}")]
    Short {
        /// The kind.
        kind: u32,
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Unknown kind or op.
    #[error("unknown record kind {0}")]
    Unknown(u32),
}

/// Short name of a kind, as used in counters and output.
pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Exec => "exec",
        EventKind::Fork => "fork",
        EventKind::Exit => "exit",
        EventKind::File => "file",
        EventKind::Connect => "connect",
        EventKind::LongPath => "long_path",
    }
}

fn op_name(op: FileOp) -> &'static str {
    match op {
        FileOp::Open => "open",
        FileOp::Rename => "rename",
        FileOp::Unlink => "unlink",
        FileOp::Chmod => "chmod",
        FileOp::Chown => "chown",
        FileOp::Truncate => "truncate",
        FileOp::Link => "link",
        FileOp::Symlink => "symlink",
        FileOp::CloseWrite => "close_write",
        FileOp::Write => "write",
        FileOp::SetXattr => "setxattr",
        FileOp::RemoveXattr => "removexattr",
        FileOp::Utimes => "utimes",
        FileOp::SetFlags => "setflags",
        FileOp::Mount => "mount",
        FileOp::Umount => "umount",
        FileOp::Mmap => "mmap",
        FileOp::Munmap => "munmap",
    }
}

fn open_flags(flags: u32) -> Flags {
    let mut out = Flags::from([match flags & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        _ => "O_RDWR",
    }]);
    for (bit, name) in [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_TMPFILE & !libc::O_DIRECTORY, "O_TMPFILE"),
    ] {
        if flags & bit as u32 != 0 {
            out.push(name);
        }
    }
    out
}

/// A name through `/proc/PID/root`, `/proc/self/root`, or a `cwd` link
/// there, as the path it reaches in the agent's view: the named process's
/// root or working directory joined to the rest. A process gone by now is
/// taken to have had the node's root (its working directory is lost).
/// `None` for any other path.
fn through_proc(path: &str, caller: u32) -> Option<String> {
    let rest = path.strip_prefix("/proc/")?;
    let (who, rest) = rest.split_once('/')?;
    let pid = match who {
        "self" | "thread-self" => caller.to_string(),
        n if n.bytes().all(|b| b.is_ascii_digit()) => n.to_owned(),
        _ => return None,
    };
    let (link, rest) = match rest.split_once('/') {
        Some((l, r)) => (l, r),
        None => (rest, ""),
    };
    if link != "root" && link != "cwd" {
        return None;
    }
    let base = match std::fs::read_link(format!("/proc/{pid}/{link}")) {
        Ok(b) => b.to_str()?.trim_end_matches('/').to_owned(),
        Err(_) if link == "root" => String::new(),
        Err(_) => return None,
    };
    Some(normalise(&format!("{base}/{rest}")))
}

/// The flags and mode a file record says, by its op; `xattr` is the
/// attribute a setxattr names.
fn flags_and_mode(op: FileOp, e: &FileEvent, xattr: Option<&str>) -> (Flags, Option<Mode>) {
    match op {
        FileOp::Open => (
            open_flags(e.flags),
            (e.flags & libc::O_CREAT as u32 != 0).then_some(Mode(e.mode)),
        ),
        FileOp::Chmod => (Flags::default(), Some(Mode(e.mode))),
        FileOp::Rename => (rename_flags(e.flags), None),
        FileOp::SetFlags => (inode_flags(e.mode), None),
        // The file is still open elsewhere: another fd, another process
        // (a child, one it was passed to), a mapping.
        FileOp::CloseWrite if e.flags > 0 && e.via == VIA_SYSCALL => {
            (Flags::from(["still_open"]), None)
        }
        FileOp::SetXattr if xattr == Some("security.capability") => {
            (Flags::from(["file_capability"]), None)
        }
        _ => (Flags::default(), None),
    }
}

/// How a file call came, when not by its own syscall.
fn file_via(via: u32) -> Option<&'static str> {
    match via {
        VIA_SYSCALL => None,
        VIA_EXIT => Some("exit"),
        VIA_EXEC => Some("exec"),
        _ => Some("io_uring"),
    }
}

/// A chown's new owner id; `None` for other ops and for an id left as is.
fn owner(op: FileOp, id: u32) -> Option<u32> {
    (op == FileOp::Chown && id != u32::MAX).then_some(id)
}

/// Names `renameat2`'s flags: an exchange swaps the two names (both now
/// hold other content), a whiteout leaves an overlay whiteout at the old.
fn rename_flags(flags: u32) -> Flags {
    let mut out = Flags::default();
    for (bit, name) in [
        (libc::RENAME_NOREPLACE, "RENAME_NOREPLACE"),
        (libc::RENAME_EXCHANGE, "RENAME_EXCHANGE"),
        (libc::RENAME_WHITEOUT, "RENAME_WHITEOUT"),
    ] {
        if flags & bit != 0 {
            out.push(name);
        }
    }
    out
}

/// Names the inode flags `chattr` sets (`FS_IOC_SETFLAGS`) that matter to
/// integrity; an empty list means none of them is set any more.
fn inode_flags(flags: u32) -> Flags {
    let mut out = Flags::default();
    for name in crate::attributes::flag_names(flags) {
        out.push(name);
    }
    out
}

/// Reads a `T` from the front of `bytes`, checking the length.
fn read<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    let want = std::mem::size_of::<T>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked; T is a plain repr(C) record; unaligned read.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// A `T` at the front of `bytes`, checking the length: borrowed where the
/// record is aligned for `T` (ring records are), copied where not.
fn view<T: Copy>(bytes: &[u8], kind: u32) -> Result<std::borrow::Cow<'_, T>, DecodeError> {
    if bytes.len() >= std::mem::size_of::<T>()
        && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        // SAFETY: length and alignment checked; T is a plain repr(C) record
        // of integers and byte arrays, valid for any bytes.
        return Ok(std::borrow::Cow::Borrowed(unsafe {
            &*(bytes.as_ptr() as *const T)
        }));
    }
    read(bytes, kind).map(std::borrow::Cow::Owned)
}

/// What a record turned into.
pub enum Decoded {
    /// An event to emit.
    Event(Box<Event>),
    /// Bookkeeping only, nothing to emit.
    Internal,
    /// A new process, `child`, of `parent`: bookkeeping only.
    Forked {
        /// The parent's process id.
        parent: u32,
        /// The child's.
        child: u32,
    },
    /// Passed on by the kernel, but outside the watched set once normalised.
    FilteredInUser,
    /// A mount or unmount away from the watched paths: where mounts show
    /// watched trees may have changed.
    Mounted,
}

/// Turns records into events, keeping the process table current.
pub struct Decoder {
    /// Node name put on every event.
    pub node: crate::event::Node,
    /// Boot clock to wall clock.
    pub clock: Clock,
    /// Process identities.
    pub table: ProcessTable,
    /// Whole paths sent ahead of the file event they complete, by thread.
    long_paths: std::collections::HashMap<u32, [Option<String>; 2]>,
}

/// Threads whose whole paths may wait for their event at once; beyond it
/// (their events were lost to a full ring), the waiting ones are dropped.
const LONG_PATHS_WAITING: usize = 4096;

impl Decoder {
    /// A decoder for `node`'s records.
    pub fn new(node: crate::event::Node, clock: Clock, table: ProcessTable) -> Self {
        Self {
            node,
            clock,
            table,
            long_paths: Default::default(),
        }
    }

    /// The kind of a record, from its first four bytes.
    pub fn kind_of(bytes: &[u8]) -> Result<EventKind, DecodeError> {
        let k = read::<u32>(bytes, 0)?;
        EventKind::from_u32(k).ok_or(DecodeError::Unknown(k))
    }

    /// Decodes one record.
    pub fn decode(&mut self, bytes: &[u8], watch: &WatchSet) -> Result<Decoded, DecodeError> {
        let kind = Self::kind_of(bytes)?;
        let k = kind as u32;
        Ok(match kind {
            EventKind::Exec => {
                let e = view::<ExecEvent>(bytes, k)?;
                let argv = &e.argv[..(e.argv_len as usize).min(e.argv.len())];
                let key = (e.exe_ino != 0).then_some((e.exe_dev, e.exe_ino, e.exe_mtime_ns));
                self.table
                    .on_exec(&e.hdr, &cstr(&e.exe), e.flags & EXE_DELETED != 0, key, argv);
                Decoded::Event(Box::new(Event::Exec {
                    time: self.time(&e.hdr),
                    node: self.node.clone(),
                    process: self.table.identity(&e.hdr),
                    args_truncated: e.flags & ARGV_TRUNCATED != 0,
                }))
            }
            EventKind::Fork => {
                let e: ForkEvent = read(bytes, k)?;
                self.table.on_fork(&e.hdr, e.child_tgid, e.child_start_ns);
                Decoded::Forked {
                    parent: e.hdr.tgid,
                    child: e.child_tgid,
                }
            }
            EventKind::Exit => {
                let e: ExitEvent = read(bytes, k)?;
                let process = self.table.identity(&e.hdr);
                self.table.on_exit(e.hdr.tgid, e.hdr.start_ns);
                Decoded::Event(Box::new(Event::Exit {
                    time: self.time(&e.hdr),
                    node: self.node.clone(),
                    process,
                    exit_code: ((e.exit_code >> 8) & 0xff) as i32,
                    signal: (e.exit_code & 0x7f) as i32,
                }))
            }
            EventKind::File => {
                let e = view::<FileEvent>(bytes, k)?;
                self.file(&e, watch)?
            }
            EventKind::LongPath => {
                let head: agent_common::LongPath = read(bytes, k)?;
                let head_len = std::mem::size_of::<agent_common::LongPath>();
                let path = bytes.get(head_len..head_len + head.len as usize).ok_or(
                    DecodeError::Short {
                        kind: k,
                        len: bytes.len(),
                        want: head_len + head.len as usize,
                    },
                )?;
                if self.long_paths.len() >= LONG_PATHS_WAITING {
                    self.long_paths.clear();
                }
                let slot = self.long_paths.entry(head.tid).or_default();
                if let Some(s) = slot.get_mut(head.which.wrapping_sub(1) as usize) {
                    *s = Some(String::from_utf8_lossy(path).into_owned());
                }
                Decoded::Internal
            }
            EventKind::Connect => {
                let e: ConnectEvent = read(bytes, k)?;
                let (family, address) = if e.family == libc::AF_INET6 as u16 {
                    ("ipv6", Ipv6Addr::from(e.addr).to_string())
                } else {
                    let a: [u8; 4] = [e.addr[0], e.addr[1], e.addr[2], e.addr[3]];
                    ("ipv4", Ipv4Addr::from(a).to_string())
                };
                Decoded::Event(Box::new(Event::Connect {
                    time: self.time(&e.hdr),
                    node: self.node.clone(),
                    family,
                    address,
                    port: e.port,
                    resource: watch.resource_of_port(e.port).cloned(),
                    result: (e.via == VIA_CONNECT).then(|| Outcome::from_ret(i64::from(e.ret))),
                    protocol: if e.protocol == libc::IPPROTO_UDP as u16 {
                        "udp"
                    } else {
                        "tcp"
                    },
                    via: match e.via {
                        VIA_CONNECT => "connect",
                        VIA_IO_URING => "io_uring",
                        VIA_FASTOPEN => "fastopen",
                        _ => "sendmsg",
                    },
                    guardrail: guardrail(e.verdict, "blocked"),
                    grant_id: (e.verdict == VERDICT_GRANTED).then_some(e.grant),
                    process: self.table.identity(&e.hdr),
                }))
            }
        })
    }

    fn time(&self, h: &Header) -> Time {
        self.clock.at_boot_ns(h.ktime_ns)
    }

    fn file(&mut self, e: &FileEvent, watch: &WatchSet) -> Result<Decoded, DecodeError> {
        let op = FileOp::from_u32(e.op).ok_or(DecodeError::Unknown(e.op))?;
        let flags1 = e.path_flags & 0xff;
        let flags2 = (e.path_flags >> PATH2_SHIFT) & 0xff;
        // Paths built from a string may hold `.`, `..` or `//`; the kernel
        // matched a prefix or passed them on, so decide here on the normal form.
        let tgid = e.hdr.tgid;
        let fix = |raw: String, flags: u32| {
            if flags & PATH_FROM_FILE == 0 && (flags & PATH_UNNORMALISED != 0 || raw.contains("/."))
            {
                let raw = normalise(&raw);
                through_proc(&raw, tgid).unwrap_or(raw)
            } else {
                raw
            }
        };
        if flags1 & PATH_BY_INODE != 0 {
            return Ok(self.by_inode(e, op, watch));
        }
        let mut raw1 = cstr(&e.path);
        let mut raw2 = cstr(&e.path2);
        // Paths cut in the record, sent whole just before it. The cut one
        // is part of the whole one, else they are not this event's.
        let (mut flags1, mut flags2) = (flags1, flags2);
        if let Some([long1, long2]) = self.long_paths.remove(&e.hdr.pid) {
            for (long, raw, flags) in [
                (long1, &mut raw1, &mut flags1),
                (long2, &mut raw2, &mut flags2),
            ] {
                if let Some(long) =
                    long.filter(|l| *flags & PATH_TRUNCATED != 0 && l.contains(raw.as_str()))
                {
                    *raw = long;
                    *flags &= !PATH_TRUNCATED;
                }
            }
        }
        let xattr = matches!(op, FileOp::SetXattr | FileOp::RemoveXattr).then(|| cstr(&e.path2));
        let (path, new_path, target) = match op {
            FileOp::Symlink => (fix(raw2, flags2), None, Some(raw1)),
            FileOp::Rename | FileOp::Link => (fix(raw1, flags1), Some(fix(raw2, flags2)), None),
            _ => (fix(raw1, flags1), None, None),
        };
        let resource = if matches!(op, FileOp::Mount | FileOp::Umount) {
            watch.resource_at_or_below(&path)
        } else {
            watch
                .resource_of(&path)
                .or_else(|| new_path.as_deref().and_then(|p| watch.resource_of(p)))
                .or_else(|| {
                    // Another name of a watched file, found by its inode.
                    let real = watch.by_inode(&path)?;
                    watch.resource_of(real)
                })
        }
        .cloned();
        if resource.is_none() && matches!(op, FileOp::Mount | FileOp::Umount) {
            return Ok(Decoded::Mounted);
        }
        if resource.is_none() && op != FileOp::CloseWrite {
            return Ok(Decoded::FilteredInUser);
        }
        // Seen through an alias (a bind mount, a container's volume), or
        // another name of a watched file (matched by inode): the watched
        // path it is, and the path as the process saw it.
        let by_inode = || watch.by_inode(&path).map(str::to_owned);
        let (path, seen_as) = match watch.unalias(&path).or_else(by_inode) {
            Some(real) => (real, Some(path)),
            None => (path, None),
        };
        let (new_path, new_path_seen_as) = match new_path.as_deref().map(|p| watch.unalias(p)) {
            Some(Some(real)) => (Some(real), new_path),
            _ => (new_path, None),
        };
        let main_flags = if op == FileOp::Symlink {
            flags2
        } else {
            flags1
        };
        let (flags, mode) = flags_and_mode(op, e, xattr.as_deref());
        Ok(Decoded::Event(Box::new(Event::File {
            time: self.time(&e.hdr),
            node: self.node.clone(),
            op: op_name(op),
            path,
            new_path,
            target,
            resource,
            flags,
            mode,
            owner_uid: owner(op, e.uid),
            owner_gid: owner(op, e.gid),
            resolved_from: if main_flags & PATH_FROM_FILE != 0 {
                "file"
            } else {
                "name"
            },
            path_truncated: (flags1 | flags2) & PATH_TRUNCATED != 0,
            via: file_via(e.via),
            xattr,
            seen_as,
            new_path_seen_as,
            result: Outcome::from_ret(e.ret),
            guardrail: guardrail(e.verdict, "killed"),
            process: self.table.identity(&e.hdr),
        })))
    }

    /// A call on a watched file with several names, which the kernel names
    /// by inode: the watched name it has, and the name the process used
    /// when its fd still shows it.
    fn by_inode(&mut self, e: &FileEvent, op: FileOp, watch: &WatchSet) -> Decoded {
        // SAFETY: the kernel wrote an `InodeKey` at the front of `path2`,
        // which is larger; unaligned read of plain integers.
        let key: agent_common::InodeKey =
            unsafe { std::ptr::read_unaligned(e.path2.as_ptr() as *const agent_common::InodeKey) };
        let Some((path, _)) = watch.inodes.get(&key) else {
            return Decoded::FilteredInUser;
        };
        // The whole name while the fd lasts, else the last component.
        let seen_as = (op == FileOp::Open && e.ret >= 0)
            .then(|| std::fs::read_link(format!("/proc/{}/fd/{}", e.hdr.tgid, e.ret)).ok())
            .flatten()
            .and_then(|p| p.to_str().map(str::to_owned))
            .unwrap_or_else(|| cstr(&e.path));
        let seen_as =
            (seen_as != *path && !path.ends_with(&format!("/{seen_as}"))).then_some(seen_as);
        let (flags, mode) = flags_and_mode(op, e, None);
        Decoded::Event(Box::new(Event::File {
            time: self.time(&e.hdr),
            node: self.node.clone(),
            op: op_name(op),
            path: path.clone(),
            new_path: None,
            target: None,
            resource: watch.resource_of(path).cloned(),
            flags,
            mode,
            owner_uid: owner(op, e.uid),
            owner_gid: owner(op, e.gid),
            resolved_from: "inode",
            path_truncated: false,
            via: None,
            xattr: None,
            seen_as,
            new_path_seen_as: None,
            result: Outcome::from_ret(e.ret),
            guardrail: guardrail(e.verdict, "killed"),
            process: self.table.identity(&e.hdr),
        }))
    }
}

/// The name of a kernel verdict; `blocked` is what enforcement did.
fn guardrail(verdict: u32, blocked: &'static str) -> Option<&'static str> {
    match verdict {
        VERDICT_ALLOWED => Some("allowed"),
        VERDICT_GRANTED => Some("granted"),
        VERDICT_BLOCKED => Some(blocked),
        VERDICT_WOULD_BLOCK => Some("would_block"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert_eq!(
            Decoder::kind_of(&[1, 0]),
            Err(DecodeError::Short {
                kind: 0,
                len: 2,
                want: 4
            })
        );
        assert_eq!(
            Decoder::kind_of(&[99, 0, 0, 0]),
            Err(DecodeError::Unknown(99))
        );
        let mut d = Decoder::new(
            "n".into(),
            Clock::new(),
            ProcessTable::new(None, Clock::new()),
        );
        let short = [4u8, 0, 0, 0, 1, 2, 3];
        assert!(matches!(
            d.decode(&short, &WatchSet::default()),
            Err(DecodeError::Short { kind: 4, .. })
        ));
    }

    #[test]
    fn a_whole_path_sent_ahead_completes_its_own_event_and_no_other() {
        let mut d = Decoder::new(
            "n".into(),
            Clock::new(),
            ProcessTable::new(None, Clock::new()),
        );
        let w = WatchSet::default();
        let whole = format!("/srv/{}/app.conf", "d".repeat(300));
        let cut = &whole[..255];
        let long = |tid: u32, path: &str| {
            let mut b = Vec::new();
            for v in [EventKind::LongPath as u32, tid, 1, path.len() as u32] {
                b.extend(v.to_ne_bytes());
            }
            b.extend(path.as_bytes());
            b
        };
        let file = |tid: u32| {
            // SAFETY: a record of integers and byte arrays; zeroes are valid.
            let mut e: FileEvent = unsafe { std::mem::zeroed() };
            e.hdr.kind = EventKind::File as u32;
            e.hdr.pid = tid;
            e.hdr.tgid = std::process::id();
            e.op = FileOp::CloseWrite as u32;
            e.path_flags = PATH_FROM_FILE | PATH_TRUNCATED;
            e.path[..cut.len()].copy_from_slice(cut.as_bytes());
            // SAFETY: the record's own bytes.
            unsafe {
                std::slice::from_raw_parts(
                    &e as *const FileEvent as *const u8,
                    std::mem::size_of::<FileEvent>(),
                )
            }
            .to_vec()
        };
        let mut path_of = |bytes: &[u8]| match d.decode(bytes, &w) {
            Ok(Decoded::Event(e)) => match *e {
                Event::File {
                    path,
                    path_truncated,
                    ..
                } => (path, path_truncated),
                other => panic!("{other:?}"),
            },
            Ok(_) => ("(internal)".to_owned(), false),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(path_of(&long(7, &whole)).0, "(internal)");
        // Another thread's event is not completed by it.
        assert_eq!(path_of(&file(8)), (cut.to_owned(), true));
        assert_eq!(path_of(&file(7)), (whole.clone(), false));
        // Taken once.
        assert_eq!(path_of(&file(7)), (cut.to_owned(), true));
        // A whole path the cut one is not part of belongs to another event.
        path_of(&long(7, "/srv/other.conf"));
        assert_eq!(path_of(&file(7)), (cut.to_owned(), true));
        let mut short = long(7, &whole);
        short.truncate(40);
        assert!(matches!(
            d.decode(&short, &w),
            Err(DecodeError::Short { kind: 6, .. })
        ));
    }

    #[test]
    fn a_record_reads_the_same_aligned_or_not() {
        // SAFETY: a record of integers and byte arrays; all zeroes is valid.
        let mut e: FileEvent = unsafe { std::mem::zeroed() };
        e.op = FileOp::Chmod as u32;
        e.mode = 0o640;
        e.path[..9].copy_from_slice(b"/etc/x.y\0");
        // SAFETY: the record's own bytes, for as long as it lives.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                &e as *const FileEvent as *const u8,
                std::mem::size_of::<FileEvent>(),
            )
        };
        // One byte in: the same record at an address no u64 may sit at.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        let aligned = view::<FileEvent>(bytes, 3).unwrap();
        let unaligned = view::<FileEvent>(&shifted[1..], 3).unwrap();
        assert!(matches!(aligned, std::borrow::Cow::Borrowed(_)));
        assert!(matches!(unaligned, std::borrow::Cow::Owned(_)));
        for r in [&*aligned, &*unaligned] {
            assert_eq!(
                (r.op, r.mode, cstr(&r.path)),
                (e.op, 0o640, "/etc/x.y".into())
            );
        }
        assert!(view::<FileEvent>(&bytes[..10], 3).is_err());
    }

    #[test]
    fn open_flags_are_named() {
        assert_eq!(
            open_flags(0o1101).as_slice(),
            ["O_WRONLY", "O_CREAT", "O_TRUNC"]
        );
        assert_eq!(open_flags(2).as_slice(), ["O_RDWR"]);
        let all = open_flags(0o2 | 0o100 | 0o200 | 0o1000 | 0o2000 | 0o20000000);
        assert_eq!(all.as_slice().len(), 6, "{all:?}");
        assert_eq!(serde_json::to_string(&Mode(0o100644)).unwrap(), "\"0644\"");
        assert_eq!(rename_flags(0).as_slice(), [] as [&str; 0]);
        assert_eq!(
            rename_flags(2 | 4).as_slice(),
            ["RENAME_EXCHANGE", "RENAME_WHITEOUT"]
        );
        assert_eq!(rename_flags(1).as_slice(), ["RENAME_NOREPLACE"]);
    }

    #[test]
    fn a_close_says_whether_the_file_stays_open_and_how_it_went() {
        // SAFETY: a record of integers and byte arrays; all zeroes is valid.
        let mut e: FileEvent = unsafe { std::mem::zeroed() };
        e.op = FileOp::CloseWrite as u32;
        let flags = |e: &FileEvent| flags_and_mode(FileOp::CloseWrite, e, None).0;
        assert_eq!(flags(&e).as_slice(), [] as [&str; 0]);
        e.flags = 2;
        assert_eq!(flags(&e).as_slice(), ["still_open"]);
        // An exit or exec sweep does not count what is left.
        e.via = VIA_EXIT;
        assert_eq!(flags(&e).as_slice(), [] as [&str; 0]);
        assert_eq!(
            [VIA_SYSCALL, VIA_IO_URING as u32, VIA_EXIT, VIA_EXEC].map(file_via),
            [None, Some("io_uring"), Some("exit"), Some("exec")]
        );
    }
}
