//! What the kernel and the process must offer before sensors can load, made
//! so where the agent can (mounting tracefs, bpffs and cgroup2), refused with
//! an actionable message where it cannot.

use std::path::{Path, PathBuf};

/// Where tracefs is expected (and mounted when missing).
pub const TRACEFS: &str = "/sys/kernel/tracing";
const BPFFS: &str = "/sys/fs/bpf";
/// Where the agent mounts a cgroup2 hierarchy when the host has none.
const OWN_CGROUP2: &str = "/run/driftwatch/cgroup2";

/// Why the node cannot run the sensors.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Missing capabilities.
    #[error(
        "driftwatch-agent lacks {missing} (effective capabilities {have:#x}); run it as root, \
         or grant CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (the DaemonSet runs it privileged)"
    )]
    Privileges {
        /// Names of the missing capabilities.
        missing: String,
        /// The effective set.
        have: u64,
    },
    /// No kernel BTF.
    #[error(
        "kernel BTF not found at /sys/kernel/btf/vmlinux: the sensors need a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (every major distribution kernel since 2021 has it)"
    )]
    NoBtf,
    /// A filesystem could not be mounted.
    #[error("{what} is not mounted at {path} and mounting it failed: {source}")]
    Mount {
        /// tracefs, bpffs or cgroup2.
        what: &'static str,
        /// Where.
        path: String,
        /// The error.
        source: nix::Error,
    },
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Checks capabilities.
pub fn check_privileges() -> Result<(), PreflightError> {
    let have = effective_caps();
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| have & (1 << bit) == 0)
    .map(|(_, n)| *n)
    .collect();
    // Not needed to start, but each missing one costs something, said once.
    for (bit, name, without) in [
        (
            CAP_SYS_RESOURCE,
            "CAP_SYS_RESOURCE",
            "the memlock limit cannot be raised for maps on kernels that charge it",
        ),
        (
            CAP_SYS_PTRACE,
            "CAP_SYS_PTRACE",
            "other users' processes show no executable or command line when read from /proc",
        ),
        (
            CAP_DAC_READ_SEARCH,
            "CAP_DAC_READ_SEARCH",
            "watched files the agent may not read get no digest",
        ),
        (
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN",
            "connect hooks may not attach to the cgroup root",
        ),
    ] {
        if have & (1 << bit) == 0 {
            tracing::warn!("{name} is missing: {without}");
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::Privileges {
            missing: missing.join(", "),
            have,
        })
    }
}

fn mounts() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let target = f.next()?;
            let fstype = f.next()?;
            Some((target.replace("\\040", " "), fstype.to_owned()))
        })
        .collect()
}

fn ensure_mounted(what: &'static str, fstype: &str, path: &str) -> Result<(), PreflightError> {
    if mounts().iter().any(|(t, f)| t == path && f == fstype) {
        return Ok(());
    }
    let err = |source| PreflightError::Mount {
        what,
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path)
        .map_err(|e| err(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    nix::mount::mount(
        Some(fstype),
        path,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(err)?;
    tracing::info!("mounted {what} at {path} (it was not mounted)");
    Ok(())
}

/// Makes sure BTF, tracefs and bpffs are there; returns the cgroup2 root to
/// attach connect hooks to (the host's, or one the agent mounts).
pub fn prepare() -> Result<PathBuf, PreflightError> {
    check_privileges()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    ensure_mounted("tracefs", "tracefs", TRACEFS)?;
    ensure_mounted("bpffs", "bpf", BPFFS)?;
    let cgroup2 = mounts()
        .into_iter()
        .find(|(_, f)| f == "cgroup2")
        .map(|(t, _)| PathBuf::from(t));
    let root = match cgroup2 {
        Some(p) => p,
        None => {
            ensure_mounted("cgroup2", "cgroup2", OWN_CGROUP2)?;
            PathBuf::from(OWN_CGROUP2)
        }
    };
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let _ = nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
    Ok(root)
}
