//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`), enough to
//! find struct member offsets.
//!
//! Rust eBPF programs get no CO-RE relocations, so the agent reads the layout
//! of the running kernel here and passes the offsets to the programs as a
//! global. Nothing about a layout is assumed.

use std::collections::HashMap;

use agent_common::KernelOffsets;

/// Why offsets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF blob is missing or unreadable.
    #[error("reading kernel BTF at {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)")]
    Read {
        /// Where we looked.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The blob is not BTF or is cut short.
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    /// A struct or member the sensors need is not in this kernel.
    #[error("kernel BTF has no {0}; this kernel's layout is not supported")]
    Missing(String),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone)]
struct Type {
    kind: u32,
    name: String,
    /// Referenced type for modifiers, typedefs and pointers.
    target: u32,
    members: Vec<Member>,
}

/// Parsed BTF types, indexed by id (id 0 is `void`).
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || b[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        let types_sec = b
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strs = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;
        let name = |off: u32| -> String {
            let s = strs.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };

        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            target: 0,
            members: Vec::new(),
        }];
        let mut structs = HashMap::new();
        let mut at = 0usize;
        while at < types_sec.len() {
            let name_off = u32_at(types_sec, at)?;
            let info = u32_at(types_sec, at + 4)?;
            let size_or_type = u32_at(types_sec, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let off = u32_at(types_sec, m + 8)?;
                        members.push(Member {
                            name: name(u32_at(types_sec, m)?),
                            type_id: u32_at(types_sec, m + 4)?,
                            bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM => vlen * 8,
                KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            let t = Type {
                kind,
                name: name(name_off),
                target: size_or_type,
                members,
            };
            if kind == KIND_STRUCT && !t.name.is_empty() && !t.members.is_empty() {
                structs.entry(t.name.clone()).or_insert(types.len() as u32);
            }
            types.push(t);
        }
        Ok(Self { types, structs })
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.target
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of `field` in the struct or union `id`, looking through
    /// anonymous members (as C does).
    fn find(&self, id: u32, field: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(self.strip(id) as usize)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &t.members {
            if m.name == field {
                return Some(m.bit_offset);
            }
        }
        for m in t.members.iter().filter(|m| m.name.is_empty()) {
            if let Some(inner) = self.find(m.type_id, field, depth + 1) {
                return Some(m.bit_offset + inner);
            }
        }
        None
    }

    /// Byte offset of `strukt.field` (`field` may be dotted: `d_name.len`).
    pub fn offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("struct {strukt}.{field}"));
        let mut id = *self.structs.get(strukt).ok_or_else(missing)?;
        let mut bits = 0;
        let parts: Vec<&str> = field.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            bits += self.find(id, part, 0).ok_or_else(missing)?;
            if i + 1 < parts.len() {
                id = self.member_type(id, part).ok_or_else(missing)?;
            }
        }
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!("byte-aligned {strukt}.{field}")));
        }
        Ok(bits / 8)
    }

    fn member_type(&self, id: u32, field: &str) -> Option<u32> {
        let t = self.types.get(self.strip(id) as usize)?;
        for m in &t.members {
            if m.name == field {
                return Some(m.type_id);
            }
        }
        t.members
            .iter()
            .filter(|m| m.name.is_empty())
            .find_map(|m| self.member_type(m.type_id, field))
    }

    /// True when the kernel has a BTF-typed tracepoint of this name.
    pub fn has_tracepoint(&self, name: &str) -> bool {
        let want = format!("btf_trace_{name}");
        self.types
            .iter()
            .any(|t| t.kind == KIND_TYPEDEF && t.name == want)
    }

    /// Every offset the sensors use, read from this BTF.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        // 6.13 made the count a `file_ref_t`, which holds references - 1.
        let (file_f_ref, file_ref_bias) = match self.offset("file", "f_ref.refcnt") {
            Ok(off) => (off, 1),
            Err(_) => (self.offset("file", "f_count")?, 0),
        };
        Ok(self.with_uring(KernelOffsets {
            task_real_parent: self.offset("task_struct", "real_parent")?,
            task_group_leader: self.offset("task_struct", "group_leader")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_pid: self.offset("task_struct", "pid")?,
            task_start_boottime: self.offset("task_struct", "start_boottime")?,
            // Kernels without audit have no loginuid: report it as unset.
            task_loginuid: self.offset("task_struct", "loginuid").unwrap_or(0),
            task_cred: self.offset("task_struct", "cred")?,
            task_mm: self.offset("task_struct", "mm")?,
            task_fs: self.offset("task_struct", "fs")?,
            task_files: self.offset("task_struct", "files")?,
            task_exit_code: self.offset("task_struct", "exit_code")?,
            task_flags: self.offset("task_struct", "flags")?,
            task_comm: self.offset("task_struct", "comm")?,
            cred_euid: self.offset("cred", "euid")?,
            mm_arg_start: self.offset("mm_struct", "arg_start")?,
            mm_arg_end: self.offset("mm_struct", "arg_end")?,
            fs_root: self.offset("fs_struct", "root")?,
            fs_pwd: self.offset("fs_struct", "pwd")?,
            files_fdt: self.offset("files_struct", "fdt")?,
            fdt_max_fds: self.offset("fdtable", "max_fds")?,
            fdt_fd: self.offset("fdtable", "fd")?,
            file_f_path: self.offset("file", "f_path")?,
            path_mnt: self.offset("path", "mnt")?,
            path_dentry: self.offset("path", "dentry")?,
            dentry_d_parent: self.offset("dentry", "d_parent")?,
            dentry_d_name: self.offset("dentry", "d_name")?,
            qstr_len: self.offset("qstr", "len")?,
            qstr_name: self.offset("qstr", "name")?,
            vfsmount_mnt_root: self.offset("vfsmount", "mnt_root")?,
            mount_mnt: self.offset("mount", "mnt")?,
            mount_mnt_parent: self.offset("mount", "mnt_parent")?,
            mount_mnt_mountpoint: self.offset("mount", "mnt_mountpoint")?,
            bprm_file: self.offset("linux_binprm", "file")?,
            dentry_d_inode: self.offset("dentry", "d_inode")?,
            inode_i_ino: self.offset("inode", "i_ino")?,
            inode_i_generation: self.offset("inode", "i_generation")?,
            inode_i_nlink: self.offset("inode", "i_nlink")?,
            inode_i_mtime_sec: self
                .offset("inode", "i_mtime_sec")
                .or_else(|_| self.offset("inode", "i_mtime.tv_sec"))?,
            inode_i_mtime_nsec: self
                .offset("inode", "i_mtime_nsec")
                .or_else(|_| self.offset("inode", "i_mtime.tv_nsec"))?,
            mm_exe_file: self.offset("mm_struct", "exe_file")?,
            file_f_inode: self.offset("file", "f_inode")?,
            file_f_mode: self.offset("file", "f_mode")?,
            file_f_ref,
            file_ref_bias,
            fdt_close_on_exec: self.offset("fdtable", "close_on_exec")?,
            inode_i_sb: self.offset("inode", "i_sb")?,
            sb_s_dev: self.offset("super_block", "s_dev")?,
            ready: 1,
            ..KernelOffsets::zeroed()
        }))
    }
}

impl Btf {
    /// Adds the io_uring request layouts the programs read, which only BTF
    /// gives (they are private to io_uring): all found, or none used.
    fn with_uring(&self, mut o: KernelOffsets) -> KernelOffsets {
        let btf = self;
        let found = (|| -> Result<(), BtfError> {
            o.io_kiocb_opcode = btf.offset("io_kiocb", "opcode")?;
            o.io_kiocb_file = btf.offset("io_kiocb", "file")?;
            o.io_rename_old_dfd = btf.offset("io_rename", "old_dfd")?;
            o.io_rename_new_dfd = btf.offset("io_rename", "new_dfd")?;
            o.io_rename_oldpath = btf.offset("io_rename", "oldpath")?;
            o.io_rename_newpath = btf.offset("io_rename", "newpath")?;
            o.io_rename_flags = btf.offset("io_rename", "flags")?;
            o.io_unlink_dfd = btf.offset("io_unlink", "dfd")?;
            o.io_unlink_filename = btf.offset("io_unlink", "filename")?;
            o.io_unlink_flags = btf.offset("io_unlink", "flags")?;
            o.io_link_old_dfd = btf.offset("io_link", "old_dfd")?;
            o.io_link_new_dfd = btf.offset("io_link", "new_dfd")?;
            o.io_link_oldpath = btf.offset("io_link", "oldpath")?;
            o.io_link_newpath = btf.offset("io_link", "newpath")?;
            o.io_link_flags = btf.offset("io_link", "flags")?;
            o.io_open_how = btf.offset("io_open", "how")?;
            o.io_open_dfd = btf.offset("io_open", "dfd")?;
            o.io_open_filename = btf.offset("io_open", "filename")?;
            o.io_open_file_slot = btf.offset("io_open", "file_slot")?;
            o.filename_name = btf.offset("filename", "name")?;
            Ok(())
        })();
        match found {
            Ok(()) => o.uring = 1,
            Err(e) => {
                tracing::warn!("io_uring file requests are named but not resolved to files on this kernel: {e}");
                o.uring = 0;
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"hello world, not btf at all"),
            Err(BtfError::Malformed(_))
        ));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0]),
            Err(BtfError::Malformed(_))
        ));
    }

    #[test]
    fn reads_offsets_of_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            panic!("this machine's kernel has BTF (DESIGN.md); /sys/kernel/btf/vmlinux must be readable");
        };
        let o = btf.kernel_offsets().expect("all offsets present");
        // qstr.len sits in an anonymous struct inside an anonymous union.
        assert_eq!(o.qstr_len, 4);
        assert_eq!(o.qstr_name, 8);
        assert_eq!(o.path_dentry, 8);
        assert!(o.task_tgid > 0 && o.task_pid > 0 && o.task_tgid != o.task_pid);
        assert!(btf.has_tracepoint("sched_process_exec"));
        assert!(matches!(
            btf.offset("task_struct", "no_such_field"),
            Err(BtfError::Missing(_))
        ));
    }
}
