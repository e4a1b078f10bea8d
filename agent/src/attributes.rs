//! What a file carries besides its content, mode and owner: extended
//! attributes (a binary's `security.capability` among them) and inode flags
//! (`chattr +i`). Both change a file's meaning without a write to it, so
//! the digest records them and drift compares them.

use std::{collections::BTreeMap, path::Path};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::secrets::{self, MaskKey};

/// Extended attributes and inode flags of one file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attributes {
    /// Name to value as text: a short printable value as it is, a
    /// `security.capability` decoded (`cap_net_raw=ep`), a secret masked,
    /// anything else as `sha256:<16 hex> (N bytes)`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// Inode flags set (`immutable`, `append_only`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
}

/// The inode flags (`FS_IOC_GETFLAGS`/`SETFLAGS`) that bear on integrity,
/// by bit.
const FLAG_NAMES: [(u32, &str); 6] = [
    (0x10, "immutable"),
    (0x20, "append_only"),
    (0x8, "sync"),
    (0x40, "no_dump"),
    (0x80, "no_atime"),
    (0x80_0000, "no_cow"),
];

/// The names of the flags set in `flags`, in a fixed order.
pub fn flag_names(flags: u32) -> impl Iterator<Item = &'static str> {
    FLAG_NAMES
        .into_iter()
        .filter(move |(bit, _)| flags & bit != 0)
        .map(|(_, name)| name)
}

/// Values longer than this are shown by digest.
const SHOWN_MAX: usize = 64;

/// Reads the attributes of `path` without following a final symlink. A
/// filesystem without extended attributes or inode flags gives none; only
/// a failure to read what exists is an error.
pub fn read(path: &Path, is_file: bool, mask: &MaskKey) -> std::io::Result<Attributes> {
    let mut a = Attributes::default();
    match xattr::list(path) {
        Ok(names) => {
            for name in names {
                let name = name.to_string_lossy().into_owned();
                match xattr::get(path, &name) {
                    Ok(Some(v)) => {
                        let shown = show(&name, &v, mask);
                        a.xattrs.insert(name, shown);
                    }
                    Ok(None) => {}
                    Err(e) if unsupported(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Err(e) if unsupported(&e) => {}
        Err(e) => return Err(e),
    }
    if is_file {
        a.flags = inode_flags(path)?;
    }
    Ok(a)
}

/// Attributes read before, by (device, inode), with the inode's change
/// time then: a setxattr, a chattr and a write all move the change time, so
/// an unchanged one means unchanged attributes and no reads.
#[derive(Default)]
pub struct Cache {
    known: std::collections::HashMap<(u64, u64), (i64, Attributes)>,
}

/// Entries kept before the cache starts over.
const CACHE_MAX: usize = 65_536;

impl Cache {
    /// The attributes of `path` (whose metadata is `m`), read again only
    /// when its change time moved.
    pub fn read(
        &mut self,
        path: &Path,
        m: &std::fs::Metadata,
        mask: &MaskKey,
    ) -> std::io::Result<Attributes> {
        use std::os::unix::fs::MetadataExt as _;
        let key = (m.dev(), m.ino());
        let ctime = m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec();
        if let Some((at, a)) = self.known.get(&key) {
            if *at == ctime {
                return Ok(a.clone());
            }
        }
        let a = read(path, m.is_file(), mask)?;
        if self.known.len() >= CACHE_MAX {
            self.known.clear();
        }
        self.known.insert(key, (ctime, a.clone()));
        Ok(a)
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::ENOTTY) | Some(libc::ENODATA) | Some(libc::EINVAL)
    )
}

/// The flags `statx` reports (`STATX_ATTR_IMMUTABLE`, `_APPEND`, `_NODUMP`
/// share their bits with the inode flags): one call, no open. The other
/// inode flags (sync, no_atime, no_cow) are named in `setflags` events but
/// not kept in the digest.
fn inode_flags(path: &Path) -> std::io::Result<Vec<&'static str>> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statx is a valid value for the kernel to fill.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statx buffer of the right size.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            0,
            &mut st,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let kept =
        (libc::STATX_ATTR_IMMUTABLE | libc::STATX_ATTR_APPEND | libc::STATX_ATTR_NODUMP) as u64;
    Ok(flag_names((st.stx_attributes & st.stx_attributes_mask & kept) as u32).collect())
}

/// An attribute's value as the digest records it.
fn show(name: &str, value: &[u8], mask: &MaskKey) -> String {
    if name == "security.capability" {
        if let Some(caps) = capabilities(value) {
            return caps;
        }
    }
    match std::str::from_utf8(value) {
        Ok(text) if secrets::is_secret(name, text) => format!("masked:{}", mask.hash(text)),
        Ok(text)
            if text.len() <= SHOWN_MAX && text.chars().all(|c| !c.is_control() || c == '\0') =>
        {
            text.trim_end_matches('\0').to_owned()
        }
        _ => {
            let sha = crate::digest::hex(&Sha256::digest(value));
            format!("sha256:{} ({} bytes)", &sha[..16], value.len())
        }
    }
}

/// Capability names by number, as `capabilities(7)` lists them.
const CAPS: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// Decodes a `vfs_cap_data` (revision 1, 2 or 3) the way `getcap` prints
/// it: `cap_net_raw,cap_sys_admin=ep`, inheritable ones as `...=i`.
fn capabilities(v: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u32> {
        v.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let magic = word(0)?;
    let effective = magic & 1 != 0;
    let (permitted, inheritable) = match magic & 0xff00_0000 {
        0x0100_0000 => (u64::from(word(1)?), u64::from(word(2)?)),
        0x0200_0000 | 0x0300_0000 => (
            u64::from(word(1)?) | (u64::from(word(3)?) << 32),
            u64::from(word(2)?) | (u64::from(word(4)?) << 32),
        ),
        _ => return None,
    };
    let names = |set: u64| -> String {
        (0..64)
            .filter(|b| set & (1 << b) != 0)
            .map(|b| match CAPS.get(b) {
                Some(n) => format!("cap_{n}"),
                None => format!("cap_{b}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut parts = Vec::new();
    if permitted != 0 {
        parts.push(format!(
            "{}={}",
            names(permitted),
            if effective { "ep" } else { "p" }
        ));
    }
    if inheritable != 0 {
        parts.push(format!("{}=i", names(inheritable)));
    }
    if parts.is_empty() {
        parts.push("none".to_owned());
    }
    Some(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_read_as_getcap_prints_them() {
        let v2 = |magic: u32, p: u32, i: u32| {
            [magic, p, i, 0, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        assert_eq!(
            capabilities(&v2(0x0200_0001, 1 << 13, 0)).as_deref(),
            Some("cap_net_raw=ep")
        );
        assert_eq!(
            capabilities(&v2(0x0200_0000, (1 << 13) | (1 << 21), 1)).as_deref(),
            Some("cap_net_raw,cap_sys_admin=p cap_chown=i")
        );
        assert_eq!(capabilities(&[1, 2]), None);
        assert_eq!(capabilities(&v2(0x0900_0000, 1, 0)), None);
    }

    #[test]
    fn values_are_shown_masked_or_digested() {
        let key = MaskKey::ephemeral();
        assert_eq!(show("user.owner", b"team-a", &key), "team-a");
        assert!(show("user.password", b"hunter2", &key).starts_with("masked:"));
        let long = vec![b'x'; 100];
        assert!(show("user.blob", &long, &key).ends_with("(100 bytes)"));
        assert!(show("security.selinux", b"\x01\x02", &key).starts_with("sha256:"));
    }

    #[test]
    fn attributes_of_a_file_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("f");
        std::fs::write(&f, "x").expect("write");
        let key = MaskKey::ephemeral();
        let before = read(&f, true, &key).expect("read");
        if xattr::set(&f, "user.test", b"on").is_err() {
            return; // no user xattrs on this filesystem
        }
        let after = read(&f, true, &key).expect("read");
        assert_ne!(before, after);
        assert_eq!(
            after.xattrs.get("user.test").map(String::as_str),
            Some("on")
        );
    }
}
