//! Guardrails: the policy's `writers` and `clients` of every resource in
//! mode `audit` or `enforce`, and the approved access grants, compiled into
//! what the kernel checks at the moment of a call (see `agent-ebpf`'s
//! `gate`): per resource, one bit per selector (policy selectors from bit
//! 0, grants from [`GRANT_BIT0`]), and per fact of a process — uid, login
//! uid, executable `(device, inode)`, cgroup id, comm — the bits it
//! satisfies.
//!
//! Names are resolved here, once: a user to its uid, an executable path to
//! its inode, a container or pod selector to the cgroup ids of the
//! containers that match it now. The agent compiles again when the policy,
//! the grants, the pods or the cgroups change (at most a second later),
//! and writes only what differs.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::{
    GateKey, GateRule, FACTS, FACT_CGROUP, FACT_COMM, FACT_EXE, FACT_LOGINUID, FACT_UID,
    GATE_AUDIT, GATE_ENFORCE, GATE_MONITOR, GRANT_BIT0, GRANT_SLOTS,
};
use driftwatch_proto::{
    policy::{Mode, Policy, Selector},
    v1,
};

/// How this kernel stops a refused action, per kind of action.
pub const GUARD_SET: &str =
    "connect: cgroup/connect4|6 and sendmsg4|6 refuse with EPERM; files: SIGKILL at syscall exit (the call itself runs), or at io_uring submission (the request never runs)";

/// An approved access grant, as the collector sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The approval's id.
    pub id: u64,
    /// Policy resource name.
    pub resource: String,
    /// Who may act.
    pub who: Selector,
    /// End of the window, Unix nanoseconds.
    pub until_unix_nanos: i64,
}

impl Grant {
    /// Reads a grant from the stream; a selector that does not parse is an
    /// error naming the grant.
    pub fn from_wire(g: &v1::Grant) -> Result<Self, String> {
        Ok(Self {
            id: g.id,
            resource: g.resource.clone(),
            who: Selector::parse_text(&g.who).map_err(|e| format!("grant {}: who: {e}", g.id))?,
            until_unix_nanos: g.valid_until_unix_nanos,
        })
    }
}

/// What the compiler needs to know of the host.
pub trait Host {
    /// uid of a user name.
    fn uid_of(&self, name: &str) -> Option<u32>;
    /// The kernel's `(s_dev, i_ino)` of an executable; `None` when it does
    /// not exist or is a symlink (processes report the file it points to).
    fn exe_id(&self, path: &str) -> Option<(u64, u64)>;
    /// Every cgroup that holds a container or a pod: its id, and the
    /// container and pod facts a selector can name, as a process carries them.
    fn workloads(&self) -> Vec<(u64, v1::Process)>;
}

/// The kernel tables for the guardrails.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gates {
    /// Rules by resource index (resources in mode `monitor` are absent).
    pub rules: BTreeMap<u32, Rule>,
    /// Facts to selector bits.
    pub facts: BTreeMap<GateKey, u64>,
}

/// A [`GateRule`] that compares by value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// A `GATE_*` mode.
    pub mode: u32,
    /// Per fact kind, the selectors that leave it free.
    pub free: [u64; FACTS],
    /// Grant slots: id and boot-clock expiry.
    pub grants: [(u64, u64); GRANT_SLOTS],
}

impl Rule {
    /// As the kernel map holds it.
    pub fn to_kernel(&self) -> GateRule {
        let mut r = GateRule {
            mode: self.mode,
            free: self.free,
            ..GateRule::default()
        };
        for (i, (id, until)) in self.grants.iter().enumerate() {
            r.grant_id[i] = *id;
            r.grant_until_ns[i] = *until;
        }
        r
    }
}

/// What one fact kind of a selector asks for.
enum Want {
    /// Not named: any value.
    Free,
    /// These values.
    Values(Vec<(u64, u64)>),
    /// Named, but nothing on this host can match (an unknown user, a
    /// missing binary): the selector lets no one through.
    Never,
}

fn comm_key(comm: &str) -> Option<(u64, u64)> {
    let b = comm.as_bytes();
    // The kernel keeps 15 bytes and a NUL: a longer name never matches.
    if b.len() > 15 {
        return None;
    }
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    let (lo, hi) = buf.split_at(8);
    Some((
        u64::from_ne_bytes(lo.try_into().ok()?),
        u64::from_ne_bytes(hi.try_into().ok()?),
    ))
}

fn one_uid(num: Option<u32>, name: Option<&String>, host: &dyn Host) -> Want {
    let by_name = name.map(|n| host.uid_of(n));
    match (num, by_name) {
        (None, None) => Want::Free,
        (Some(u), None) | (None, Some(Some(u))) => Want::Values(vec![(u64::from(u), 0)]),
        (Some(a), Some(Some(b))) if a == b => Want::Values(vec![(u64::from(a), 0)]),
        _ => Want::Never,
    }
}

/// The facts a selector asks for, per kind, or `None` when it can match
/// no process on this host.
fn wants(s: &Selector, host: &dyn Host, workloads: &[(u64, v1::Process)]) -> Option<[Want; FACTS]> {
    let exe = match &s.exe {
        None => Want::Free,
        Some(p) => host
            .exe_id(p)
            .map_or(Want::Never, |id| Want::Values(vec![id])),
    };
    let comm = match &s.comm {
        None => Want::Free,
        Some(c) => comm_key(c).map_or(Want::Never, |k| Want::Values(vec![k])),
    };
    let cgroup = if s.names_workload() {
        let only = Selector {
            image: s.image.clone(),
            container: s.container.clone(),
            namespace: s.namespace.clone(),
            labels: s.labels.clone(),
            service_account: s.service_account.clone(),
            ..Selector::default()
        };
        let ids: Vec<_> = workloads
            .iter()
            .filter(|(_, p)| only.matches(p))
            .map(|(id, _)| (*id, 0))
            .collect();
        // No matching container now: nothing satisfies it, though a
        // matching pod may start later (compiled again then).
        Want::Values(ids)
    } else {
        Want::Free
    };
    let all = [
        one_uid(s.uid, s.user.as_ref(), host),
        one_uid(s.loginuid, s.login_user.as_ref(), host),
        exe,
        cgroup,
        comm,
    ];
    debug_assert_eq!(
        [FACT_UID, FACT_LOGINUID, FACT_EXE, FACT_CGROUP, FACT_COMM],
        [0, 1, 2, 3, 4]
    );
    if all.iter().any(|w| matches!(w, Want::Never)) {
        return None;
    }
    Some(all)
}

impl Gates {
    /// Compiles the guardrails of `policy` and the grants in force at
    /// `now_unix` (the boot clock reading `now_boot` at the same moment).
    pub fn compile(
        policy: &Policy,
        grants: &[Grant],
        host: &dyn Host,
        now_unix: i64,
        now_boot: u64,
    ) -> Self {
        let mut out = Self::default();
        let needs_workloads = policy.resources.iter().any(|r| {
            r.mode != Mode::Monitor && r.guarded_by().iter().any(Selector::names_workload)
        }) || grants.iter().any(|g| g.who.names_workload());
        let workloads = if needs_workloads {
            host.workloads()
        } else {
            Vec::new()
        };
        for (i, r) in policy.resources.iter().enumerate() {
            let mode = match r.mode {
                Mode::Monitor => continue,
                Mode::Audit => GATE_AUDIT,
                Mode::Enforce => GATE_ENFORCE,
            };
            let index = i as u32;
            out.rules.insert(
                index,
                Rule {
                    mode,
                    ..Rule::default()
                },
            );
            for (j, s) in r.guarded_by().iter().enumerate().take(GRANT_BIT0 as usize) {
                out.add(index, 1u64 << j, s, host, &workloads);
            }
            let mut slot = 0;
            for g in grants.iter().filter(|g| g.resource == r.name) {
                if g.until_unix_nanos <= now_unix || slot >= GRANT_SLOTS {
                    continue;
                }
                let left = (g.until_unix_nanos - now_unix) as u64;
                if let Some(rule) = out.rules.get_mut(&index) {
                    rule.grants[slot] = (g.id, now_boot.saturating_add(left));
                }
                out.add(
                    index,
                    1u64 << (GRANT_BIT0 as usize + slot),
                    &g.who,
                    host,
                    &workloads,
                );
                slot += 1;
            }
        }
        out
    }

    fn add(
        &mut self,
        resource: u32,
        bit: u64,
        s: &Selector,
        host: &dyn Host,
        workloads: &[(u64, v1::Process)],
    ) {
        let Some(wants) = wants(s, host, workloads) else {
            return;
        };
        let Some(rule) = self.rules.get_mut(&resource) else {
            return;
        };
        for (kind, want) in wants.into_iter().enumerate() {
            match want {
                Want::Free => rule.free[kind] |= bit,
                Want::Values(values) => {
                    for (a, b) in values {
                        *self
                            .facts
                            .entry(GateKey {
                                resource,
                                kind: kind as u32,
                                a,
                                b,
                            })
                            .or_default() |= bit;
                    }
                }
                Want::Never => {}
            }
        }
    }

    /// True when no resource is guarded.
    pub fn is_empty(&self) -> bool {
        self.rules.values().all(|r| r.mode == GATE_MONITOR)
    }
}

/// The host as it is: the user database, the filesystem, the cgroup tree
/// and the pods the agent has seen.
pub struct LiveHost<'a> {
    /// Root of the cgroup v2 hierarchy.
    pub cgroup_root: &'a Path,
    /// Pod metadata.
    pub pods: &'a crate::pods::Pods,
}

/// The kernel's encoding of a device number (`MKDEV`: major << 20 | minor).
pub fn kernel_dev(dev: u64) -> u64 {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    (major << 20) | minor
}

/// Directories below the cgroup root looked at, at most: a node runs
/// hundreds of containers, not tens of thousands.
const MAX_CGROUPS: usize = 20_000;

impl Host for LiveHost<'_> {
    fn uid_of(&self, name: &str) -> Option<u32> {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    }

    fn exe_id(&self, path: &str) -> Option<(u64, u64)> {
        let m = std::fs::symlink_metadata(path).ok()?;
        if m.file_type().is_symlink() {
            return None;
        }
        Some((kernel_dev(m.dev()), m.ino()))
    }

    fn workloads(&self) -> Vec<(u64, v1::Process)> {
        let mut out = Vec::new();
        let mut stack: Vec<PathBuf> = vec![self.cgroup_root.to_owned()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_CGROUPS {
                tracing::warn!(
                    "more than {MAX_CGROUPS} cgroups: container selectors see only the first"
                );
                break;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            let Ok(rel) = dir.strip_prefix(self.cgroup_root) else {
                continue;
            };
            let placement = crate::identity::cgroup::parse(&format!("/{}", rel.display()));
            if placement.container.is_none() && placement.pod_uid.is_none() {
                continue;
            }
            let Ok(m) = std::fs::metadata(&dir) else {
                continue;
            };
            let mut p = v1::Process::default();
            let pod = placement
                .pod_uid
                .as_deref()
                .and_then(|uid| self.pods.lookup(uid).0);
            if let Some(c) = &placement.container {
                let meta = pod.as_ref().and_then(|p| p.containers.get(&c.id));
                p.container = Some(v1::Container {
                    id: c.id.clone(),
                    runtime: c.runtime.to_owned(),
                    name: meta.map(|m| m.name.clone()).unwrap_or_default(),
                    image: meta.map(|m| m.image.clone()).unwrap_or_default(),
                });
            }
            if let Some(pod) = &pod {
                p.pod_namespace = pod.namespace.clone();
                p.pod_labels = pod.labels.clone().into_iter().collect();
                p.service_account = pod.service_account.clone();
            }
            out.push((m.ino(), p));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Host for Fake {
        fn uid_of(&self, name: &str) -> Option<u32> {
            match name {
                "app" => Some(1000),
                "root" => Some(0),
                _ => None,
            }
        }
        fn exe_id(&self, path: &str) -> Option<(u64, u64)> {
            (path == "/usr/bin/psql").then_some((8, 42))
        }
        fn workloads(&self) -> Vec<(u64, v1::Process)> {
            let p = |ns: &str| v1::Process {
                pod_namespace: ns.into(),
                ..Default::default()
            };
            vec![(501, p("payments")), (502, p("web")), (503, p("payments"))]
        }
    }

    fn policy(text: &str) -> Policy {
        Policy::parse("p.yaml", text).expect("a valid policy")
    }

    const DB: &str = "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - name: cfg\n    kind: config\n    paths: [/etc/app/]\n    writers: [{ user: root }]\n  - name: pg\n    kind: database\n    ports: [5432]\n    mode: enforce\n    clients:\n      - { exe: /usr/bin/psql, user: app }\n      - { namespace: payments }\n      - { user: nobody-here }\n";

    #[test]
    fn selectors_become_bits_on_facts_and_free_kinds() {
        let g = Gates::compile(&policy(DB), &[], &Fake, 0, 0);
        // The monitored config resource has no rule at all.
        assert_eq!(g.rules.keys().copied().collect::<Vec<_>>(), [1]);
        let rule = g.rules[&1];
        assert_eq!(rule.mode, GATE_ENFORCE);
        let key = |kind, a, b| GateKey {
            resource: 1,
            kind,
            a,
            b,
        };
        // Selector 0: exe and user named; loginuid, cgroup and comm free.
        assert_eq!(g.facts[&key(FACT_UID, 1000, 0)], 0b1);
        assert_eq!(g.facts[&key(FACT_EXE, 8, 42)], 0b1);
        assert_eq!(rule.free[FACT_LOGINUID as usize] & 1, 1);
        assert_eq!(rule.free[FACT_UID as usize] & 1, 0);
        // Selector 1: the two payments cgroups, everything else free.
        assert_eq!(g.facts[&key(FACT_CGROUP, 501, 0)], 0b10);
        assert_eq!(g.facts[&key(FACT_CGROUP, 503, 0)], 0b10);
        assert!(!g.facts.contains_key(&key(FACT_CGROUP, 502, 0)));
        assert_eq!(rule.free[FACT_UID as usize] & 0b10, 0b10);
        // Selector 2 names a user this host does not have: no bit anywhere.
        assert!(g.facts.values().all(|b| b & 0b100 == 0));
        assert!(rule.free.iter().all(|b| b & 0b100 == 0));
    }

    #[test]
    fn grants_take_slots_until_they_expire() {
        let who = Selector::parse_text("user=app").unwrap();
        let grants = [
            Grant {
                id: 7,
                resource: "pg".into(),
                who: who.clone(),
                until_unix_nanos: 2_000,
            },
            Grant {
                id: 8,
                resource: "pg".into(),
                who,
                until_unix_nanos: 500,
            },
        ];
        let g = Gates::compile(&policy(DB), &grants, &Fake, 1_000, 50_000);
        let rule = g.rules[&1];
        // The live grant: slot 0, expiring 1000 ns from now on the boot clock.
        assert_eq!(rule.grants[0], (7, 51_000));
        // The expired one is not compiled.
        assert_eq!(rule.grants[1], (0, 0));
        let uid = GateKey {
            resource: 1,
            kind: FACT_UID,
            a: 1000,
            b: 0,
        };
        assert_eq!(g.facts[&uid], 0b1 | (1 << GRANT_BIT0));
    }

    #[test]
    fn long_comms_and_mismatched_uids_never_match() {
        assert!(comm_key("0123456789abcdef").is_none());
        assert!(comm_key("psql").is_some());
        let s = Selector::parse_text("user=app,uid=5").unwrap();
        assert!(wants(&s, &Fake, &[]).is_none());
    }
}
