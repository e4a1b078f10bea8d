//! Events as the agent emits them: one JSON object per line.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{clock::Time, identity::Identity};

/// The node's name, shared by every event it names.
pub type Node = std::sync::Arc<str>;

/// Names of open flags, at most one per kind the agent decodes (held in
/// place: an event's flags cost no allocation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    names: [&'static str; 6],
    len: usize,
}

impl Flags {
    /// Adds a name (beyond six, ignored: the decoder names at most six).
    pub fn push(&mut self, name: &'static str) {
        if let Some(slot) = self.names.get_mut(self.len) {
            *slot = name;
            self.len += 1;
        }
    }

    /// The names, in order.
    pub fn as_slice(&self) -> &[&'static str] {
        &self.names[..self.len]
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> From<[&'static str; N]> for Flags {
    fn from(names: [&'static str; N]) -> Self {
        let mut f = Self::default();
        for n in names {
            f.push(n);
        }
        f
    }
}

impl Serialize for Flags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.as_slice())
    }
}

/// A file mode, shown as four octal digits (`0644`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode(pub u32);

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0 & 0o7777)
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A syscall's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// True when the call succeeded.
    pub ok: bool,
    /// The errno, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// The errno's name (`EACCES`), when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Outcome {
    /// From a syscall return value (`-errno` on failure).
    pub fn from_ret(ret: i64) -> Self {
        if ret >= 0 {
            return Self {
                ok: true,
                errno: None,
                error: None,
            };
        }
        let errno = (-ret) as i32;
        Self {
            ok: false,
            errno: Some(errno),
            error: Some(format!("{:?}", nix::errno::Errno::from_raw(errno))),
        }
    }
}

/// Counters of one event kind.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KindCounters {
    /// Calls the kernel sensor examined.
    pub seen: u64,
    /// Dropped in the kernel: outside every watched path or port.
    pub filtered_kernel: u64,
    /// Passed on by the kernel but found outside the watched set once normalised.
    pub filtered_user: u64,
    /// Records the kernel wrote to the ring buffer.
    pub emitted: u64,
    /// Records lost because the ring buffer was full.
    pub dropped: u64,
    /// Records the agent read.
    pub received: u64,
}

/// One line of the agent's output.
// File changes, the largest variant, are most events: boxing its fields
// would cost an allocation on the hot path, and events travel boxed already
// (`Decoded::Event`).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The agent started: what it loaded and what it watches.
    AgentStart {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Agent version.
        agent_version: String,
        /// `uname -r`.
        kernel: String,
        /// The sensor set chosen for this kernel.
        sensor_set: String,
        /// What the kernel was probed for, and the answers.
        probes: BTreeMap<String, bool>,
        /// Hooks attached.
        hooks: Vec<String>,
        /// Watched path prefixes (a trailing `/` is a tree).
        watched_paths: Vec<String>,
        /// Watched ports.
        watched_ports: Vec<u16>,
    },
    /// A policy was applied: the kernel's watch maps follow it now.
    PolicyApplied {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Policy version (sha256 of its text, first 16 hex digits).
        version: String,
        /// Where it came from (a file, or the collector).
        source: String,
        /// Watched path prefixes.
        watched_paths: Vec<String>,
        /// Watched ports.
        watched_ports: Vec<u16>,
    },
    /// A policy was refused; the running one stays in force.
    PolicyRefused {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Policy version.
        version: String,
        /// Where it came from.
        source: String,
        /// File, field and reason.
        error: String,
    },
    /// A watched file's state: after a change, when first watched, or for
    /// a baseline scan.
    Digest {
        /// When it was read.
        time: Time,
        /// Node name.
        node: Node,
        /// The state.
        #[serde(flatten)]
        state: crate::digest::FileDigest,
    },
    /// A scan finished.
    ScanDone {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// The baseline scan (absent for the scan of newly watched paths).
        #[serde(skip_serializing_if = "Option::is_none")]
        scan_id: Option<String>,
        /// What was scanned.
        path: String,
        /// Files reported.
        files: u64,
        /// Files that could not be read.
        errors: u64,
        /// Why the scan failed as a whole.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A program was executed.
    Exec {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Who (after the exec).
        process: Identity,
        /// argv did not fit the kernel record and was cut.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        args_truncated: bool,
    },
    /// A process exited.
    Exit {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Who.
        process: Identity,
        /// Exit status (when it exited normally).
        exit_code: i32,
        /// Terminating signal, 0 if none.
        signal: i32,
    },
    /// A change, or an attempt, on a watched file.
    File {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// `open`, `rename`, `unlink`, `chmod`, `chown`, `truncate`, `link`,
        /// `symlink`, `close_write`.
        op: &'static str,
        /// The file (for rename and link: the source).
        path: String,
        /// Rename and link: the new name.
        #[serde(skip_serializing_if = "Option::is_none")]
        new_path: Option<String>,
        /// Symlink: the text stored in the link.
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// The policy resource the path belongs to.
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<std::sync::Arc<str>>,
        /// Open flags, decoded (`O_WRONLY`, `O_CREAT`, …).
        #[serde(skip_serializing_if = "Flags::is_empty")]
        flags: Flags,
        /// chmod: new mode; open with O_CREAT: create mode (octal text).
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<Mode>,
        /// chown: new uid (absent when unchanged).
        #[serde(skip_serializing_if = "Option::is_none")]
        owner_uid: Option<u32>,
        /// chown: new gid (absent when unchanged).
        #[serde(skip_serializing_if = "Option::is_none")]
        owner_gid: Option<u32>,
        /// How the path was resolved: `file` (from the kernel's open file) or
        /// `name` (the call's path string joined to its start directory).
        resolved_from: &'static str,
        /// The path did not fit and was cut.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        path_truncated: bool,
        /// `io_uring` when an io_uring request made the change; `exit` or
        /// `exec` for a file its holder let go of that way; absent for a
        /// syscall.
        #[serde(skip_serializing_if = "Option::is_none")]
        via: Option<&'static str>,
        /// setxattr/removexattr: the attribute's name.
        #[serde(skip_serializing_if = "Option::is_none")]
        xattr: Option<String>,
        /// `path` as the process saw it, when it came through another path
        /// that shows the watched one (a bind mount, a container volume).
        #[serde(skip_serializing_if = "Option::is_none")]
        seen_as: Option<String>,
        /// The same for `new_path`.
        #[serde(skip_serializing_if = "Option::is_none")]
        new_path_seen_as: Option<String>,
        /// Success, or the errno.
        result: Outcome,
        /// What the guardrail decided (see `v1::FileChange.guardrail`).
        #[serde(skip_serializing_if = "Option::is_none")]
        guardrail: Option<&'static str>,
        /// Who.
        process: Identity,
    },
    /// A connect to a watched port.
    Connect {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// `ipv4` or `ipv6`.
        family: &'static str,
        /// Destination address.
        address: String,
        /// Destination port.
        port: u16,
        /// The policy resource the port belongs to.
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<std::sync::Arc<str>>,
        /// Success, `EINPROGRESS` (non-blocking), or the errno; `None` when
        /// the socket reached the port without `connect(2)` (see `via`).
        result: Option<Outcome>,
        /// `tcp` or `udp`.
        protocol: &'static str,
        /// How: `connect`, `io_uring`, `fastopen` or `sendmsg` (see
        /// `v1::Connect.via`).
        via: &'static str,
        /// What the guardrail decided (see `v1::Connect.guardrail`).
        #[serde(skip_serializing_if = "Option::is_none")]
        guardrail: Option<&'static str>,
        /// The grant that let it through.
        #[serde(skip_serializing_if = "Option::is_none")]
        grant_id: Option<u64>,
        /// Who.
        process: Identity,
    },
    /// Records were lost in the kernel since the last report.
    Loss {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Lost records by kind, since the previous loss report.
        dropped: BTreeMap<String, u64>,
    },
    /// Counters since start (on request and at shutdown).
    Stats {
        /// When.
        time: Time,
        /// Node name.
        node: Node,
        /// Counters by event kind.
        counters: BTreeMap<String, KindCounters>,
    },
}

impl Event {
    /// When it happened.
    pub fn time(&self) -> Time {
        match self {
            Event::AgentStart { time, .. }
            | Event::PolicyApplied { time, .. }
            | Event::PolicyRefused { time, .. }
            | Event::Digest { time, .. }
            | Event::ScanDone { time, .. }
            | Event::Exec { time, .. }
            | Event::Exit { time, .. }
            | Event::File { time, .. }
            | Event::Connect { time, .. }
            | Event::Loss { time, .. }
            | Event::Stats { time, .. } => *time,
        }
    }
}
