//! The floor under any sensor built on a given set of hooks: programs that
//! do nothing, attached where the agent's programs are (or where a design
//! under consideration would put them), so that `bench peers` can show how
//! much of the agent's cost is the hooks firing at all and how much is its
//! own work.
//!
//! The programs are two or four instructions, loaded with the raw `bpf()`
//! syscall: nothing here depends on the agent's build.

use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const TRACEFS: &str = "/sys/kernel/tracing";

/// `struct bpf_insn`, encoded.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst & 0xf) << 8)
        | (u64::from(src & 0xf) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// `r0 = 0; exit`.
fn return_zero() -> Vec<u64> {
    vec![insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)]
}

/// What a raw `sys_enter`/`sys_exit` dispatcher must do on every syscall
/// at the least: load the syscall number from the context and compare it,
/// then return. (`r2 = ctx->args[1]; if r2 != nr goto +0; r0 = 0; exit`.)
fn dispatch_only(nr: i32) -> Vec<u64> {
    vec![
        insn(0x79, 2, 1, 8, 0),
        insn(0x55, 2, 0, 0, nr),
        insn(0xb7, 0, 0, 0, 0),
        insn(0x95, 0, 0, 0, 0),
    ]
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-filled buffer larger than the kernel's
    // `union bpf_attr` prefix for these commands, valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load(prog_type: u32, insns: &[u64], name: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading the no-op program {name}"))
}

/// No-op programs attached; detached when dropped (their descriptors close).
pub struct Floor {
    fds: Vec<OwnedFd>,
}

impl Floor {
    /// A no-op program on each `syscalls/<tp>` tracepoint named.
    pub fn tracepoints<'a>(tps: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let prog = load(BPF_PROG_TYPE_TRACEPOINT, &return_zero(), "dw_floor_tp")?;
        let mut fds = Vec::new();
        for tp in tps {
            let id_path = format!("{TRACEFS}/events/syscalls/{tp}/id");
            let id: u64 = std::fs::read_to_string(&id_path)
                .with_context(|| format!("reading {id_path} (is tracefs mounted?)"))?
                .trim()
                .parse()
                .with_context(|| format!("parsing {id_path}"))?;
            let mut attr = [0u8; 128];
            attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
            attr[4..8].copy_from_slice(&112u32.to_ne_bytes()); // PERF_ATTR_SIZE_VER5
            attr[8..16].copy_from_slice(&id.to_ne_bytes());
            attr[16..24].copy_from_slice(&1u64.to_ne_bytes()); // sample_period
            attr[48..52].copy_from_slice(&1u32.to_ne_bytes()); // wakeup_events
                                                               // As aya attaches: one event, any task, CPU 0; the program runs
                                                               // on every CPU (it sits in the tracepoint's program array).
                                                               // SAFETY: a valid perf_event_attr buffer for the call.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    -1i32,
                    0i32,
                    -1i32,
                    PERF_FLAG_FD_CLOEXEC,
                )
            };
            if fd < 0 {
                bail!(
                    "perf_event_open on syscalls/{tp}: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: the kernel just returned this descriptor to us.
            let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            use std::os::fd::AsRawFd as _;
            // SAFETY: ioctls on our perf event with a program fd argument.
            let ok = unsafe {
                libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) == 0
                    && libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) == 0
            };
            if !ok {
                bail!(
                    "attaching the no-op program to syscalls/{tp}: {}",
                    std::io::Error::last_os_error()
                );
            }
            fds.push(event);
        }
        fds.push(prog);
        Ok(Self { fds })
    }

    /// One raw `sys_enter` and one raw `sys_exit` program that only read
    /// and compare the syscall number: the least a dispatcher on every
    /// syscall must do.
    pub fn raw_syscalls() -> Result<Self> {
        let mut fds = Vec::new();
        for tp in ["sys_enter", "sys_exit"] {
            let prog = load(
                BPF_PROG_TYPE_RAW_TRACEPOINT,
                &dispatch_only(libc::SYS_openat as i32),
                "dw_floor_raw",
            )?;
            let name = CString::new(tp)?;
            let mut attr = [0u8; 128];
            attr[0..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
            use std::os::fd::AsRawFd as _;
            attr[8..12].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
            let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
                .with_context(|| format!("attaching the no-op program to raw {tp}"))?;
            fds.push(prog);
            fds.push(link);
        }
        Ok(Self { fds })
    }

    /// Detaches the programs.
    pub fn detach(self) {
        drop(self.fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K), exit (BPF_JMP | BPF_EXIT).
        assert_eq!(return_zero(), vec![0xb7, 0x95]);
        // r2 = *(u64 *)(r1 + 8): dst 2, src 1, off 8.
        assert_eq!(dispatch_only(257)[0], 0x0008_1279);
        // if r2 != 257 goto +0.
        assert_eq!(dispatch_only(257)[1], (257u64 << 32) | 0x0255);
    }
}
