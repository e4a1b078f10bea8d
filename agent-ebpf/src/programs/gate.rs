//! The guardrail check: whether the current process may act on a resource,
//! decided here, at the moment of the call, from facts the kernel holds.
//!
//! The agent compiles each enforced resource's selectors into one bit per
//! selector (and per grant): `GATES` maps a fact of a process (its uid,
//! login uid, executable, cgroup or comm) to the selectors that fact
//! satisfies, and the resource's [`GateRule`] says which selectors leave a
//! fact kind unconstrained. A process is allowed when some selector bit
//! survives the AND over the five kinds: five hash lookups, no loop over
//! selectors, and no round trip to user space.

use super::{off, task, GATES, GATE_RULES};
use agent_common::{
    GateKey, FACTS, FACT_CGROUP, FACT_COMM, FACT_EXE, FACT_LOGINUID, FACT_UID, GATE_ENFORCE,
    GATE_MONITOR, GRANT_BIT0, GRANT_SLOTS, VERDICT_ALLOWED, VERDICT_BLOCKED, VERDICT_GRANTED,
    VERDICT_NONE, VERDICT_WOULD_BLOCK,
};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_uid_gid, generated as gen};

#[inline(always)]
fn fact(resource: u32, kind: u32, a: u64, b: u64) -> u64 {
    let key = GateKey {
        resource,
        kind,
        a,
        b,
    };
    // SAFETY: read-only lookup of a plain value.
    unsafe { GATES.get(&key) }.copied().unwrap_or(0)
}

/// The verdict (a `VERDICT_*`, low 4 bits) for the current process on
/// `resource`, with the id of the grant that allowed it above them.
///
/// Kept out of line: the exit program calls it for up to two paths, and
/// one verified copy keeps that program inside the verifier's budget.
#[inline(never)]
pub fn decide(resource: u32) -> u64 {
    let Some(rule) = GATE_RULES.get(resource) else {
        return VERDICT_NONE as u64;
    };
    if rule.mode == GATE_MONITOR {
        return VERDICT_NONE as u64;
    }
    let t = task::current();
    let uid = bpf_get_current_uid_gid() as u32;
    let lo = off!(task_loginuid);
    // SAFETY: probe reads of the current task.
    let loginuid: u32 = if lo == 0 {
        u32::MAX
    } else {
        unsafe { task::read(t, lo) }
    };
    // SAFETY: as above.
    let (dev, ino) = unsafe { task::exe_id(t) };
    // SAFETY: helper without arguments.
    let cgroup = unsafe { gen::bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let mut c = [0u64; 2];
    // SAFETY: 16 bytes into 16 bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(comm.as_ptr(), c.as_mut_ptr() as *mut u8, 16);
    }

    let free = |k: u32| rule.free[k as usize % FACTS];
    let mut bits = fact(resource, FACT_UID, uid as u64, 0) | free(FACT_UID);
    bits &= fact(resource, FACT_LOGINUID, loginuid as u64, 0) | free(FACT_LOGINUID);
    bits &= fact(resource, FACT_EXE, dev, ino) | free(FACT_EXE);
    bits &= fact(resource, FACT_CGROUP, cgroup, 0) | free(FACT_CGROUP);
    bits &= fact(resource, FACT_COMM, c[0], c[1]) | free(FACT_COMM);

    if bits & ((1u64 << GRANT_BIT0) - 1) != 0 {
        return VERDICT_ALLOWED as u64;
    }
    let grants = bits >> GRANT_BIT0;
    if grants != 0 {
        // SAFETY: helper without arguments.
        let now = unsafe { gen::bpf_ktime_get_boot_ns() };
        for i in 0..GRANT_SLOTS {
            let id = rule.grant_id[i];
            if grants & (1 << i) != 0 && id != 0 && now < rule.grant_until_ns[i] {
                return VERDICT_GRANTED as u64 | (id << 4);
            }
        }
    }
    if rule.mode == GATE_ENFORCE {
        VERDICT_BLOCKED as u64
    } else {
        VERDICT_WOULD_BLOCK as u64
    }
}
