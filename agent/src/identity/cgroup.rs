//! Container and Kubernetes pod identity from a cgroup path.
//!
//! Runtimes name their cgroups differently, under the cgroupfs and the
//! systemd drivers alike:
//! - docker: `/docker/<id>`, `/system.slice/docker-<id>.scope`
//! - containerd (CRI): `.../cri-containerd-<id>.scope`, `/kubepods/.../pod<uid>/<id>`
//! - CRI-O: `.../crio-<id>.scope`, `.../crio-<id>`
//! - podman: `.../libpod-<id>.scope`, `/libpod_parent/libpod-<id>`
//!
//! Kubernetes puts the pod uid in a `pod<uid>` component (dashes) or a
//! `kubepods-<qos>-pod<uid>.slice` component (underscores for dashes).

use serde::Serialize;

/// A container found in a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Full container id (64 hex characters).
    pub id: String,
    /// `docker`, `containerd`, `cri-o`, `podman`, or `cri` when only the
    /// Kubernetes layout tells us it is a container.
    pub runtime: &'static str,
}

/// What a cgroup path says about where a process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The container, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    /// The Kubernetes pod uid, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// Container id and runtime of one path component, if it names a container.
fn container_of(component: &str, under_kubepods: bool) -> Option<Container> {
    let stem = component.strip_suffix(".scope").unwrap_or(component);
    for (prefix, runtime) in [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
    ] {
        if let Some(id) = stem.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some(Container {
                    id: id.to_owned(),
                    runtime,
                });
            }
        }
    }
    if is_container_id(stem) && under_kubepods {
        return Some(Container {
            id: stem.to_owned(),
            runtime: "cri",
        });
    }
    None
}

fn pod_of(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice").unwrap_or(component);
    let at = stem.rfind("pod")?;
    let uid = stem[at + 3..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// Reads container and pod identity from a cgroup path.
pub fn parse(path: &str) -> Placement {
    let mut out = Placement::default();
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let under_kubepods = components.iter().any(|c| c.starts_with("kubepods"));
    let under_docker = components.first() == Some(&"docker");
    for (i, c) in components.iter().enumerate() {
        if out.pod_uid.is_none() && under_kubepods {
            out.pod_uid = pod_of(c);
        }
        if out.container.is_none() {
            out.container = container_of(c, under_kubepods).or_else(|| {
                (under_docker && i == 1 && is_container_id(c)).then(|| Container {
                    id: (*c).to_owned(),
                    runtime: "docker",
                })
            });
        }
    }
    out
}

/// The cgroup v2 path of a process from `/proc/PID/cgroup` text, and its
/// placement, judged from every hierarchy listed (a cgroup v1 host names its
/// containers in the v1 lines).
pub fn from_proc_cgroup(text: &str) -> (String, Placement) {
    let mut v2 = String::new();
    let mut placement = Placement::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" {
            v2 = path.to_owned();
        }
        let p = parse(path);
        if placement.container.is_none() {
            placement.container = p.container;
        }
        if placement.pod_uid.is_none() {
            placement.pod_uid = p.pod_uid;
        }
    }
    (v2, placement)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e9a0b6f1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e";
    const POD: &str = "0d3c1f2e-8a4b-4c5d-9e6f-7a8b9c0d1e2f";

    fn placement(path: &str) -> (Option<(String, &'static str)>, Option<String>) {
        let p = parse(path);
        (p.container.map(|c| (c.id, c.runtime)), p.pod_uid)
    }

    #[test]
    fn docker_cgroupfs_and_systemd() {
        assert_eq!(
            placement(&format!("/docker/{ID}")),
            (Some((ID.into(), "docker")), None)
        );
        assert_eq!(
            placement(&format!("/system.slice/docker-{ID}.scope")),
            (Some((ID.into(), "docker")), None)
        );
    }

    #[test]
    fn kubernetes_containerd_systemd_driver() {
        let pod_us = POD.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_us}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            placement(&path),
            (Some((ID.into(), "containerd")), Some(POD.into()))
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let path = format!("/kubepods/besteffort/pod{POD}/{ID}");
        assert_eq!(
            placement(&path),
            (Some((ID.into(), "cri")), Some(POD.into()))
        );
        let guaranteed = format!("/kubepods/pod{POD}/{ID}");
        assert_eq!(
            placement(&guaranteed),
            (Some((ID.into(), "cri")), Some(POD.into()))
        );
    }

    #[test]
    fn crio_and_podman() {
        let crio = format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            POD.replace('-', "_")
        );
        assert_eq!(
            placement(&crio),
            (Some((ID.into(), "cri-o")), Some(POD.into()))
        );
        assert_eq!(
            placement(&format!("/machine.slice/libpod-{ID}.scope")),
            (Some((ID.into(), "podman")), None)
        );
        assert_eq!(
            placement(&format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container")),
            (Some((ID.into(), "podman")), None)
        );
    }

    #[test]
    fn host_processes_are_not_containers() {
        assert_eq!(placement("/"), (None, None));
        assert_eq!(
            placement("/user.slice/user-0.slice/session-3.scope"),
            (None, None)
        );
        assert_eq!(placement("/system.slice/sshd.service"), (None, None));
        // A 64-hex component outside docker/kubepods is not enough on its own.
        assert_eq!(placement(&format!("/system.slice/{ID}")), (None, None));
        // A short id is not a container id.
        assert_eq!(placement("/docker/abc123"), (None, None));
    }

    #[test]
    fn proc_cgroup_text_uses_v2_path_and_any_hierarchy_for_placement() {
        let text = format!("12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/init.scope\n");
        let (v2, p) = from_proc_cgroup(&text);
        assert_eq!(v2, "/init.scope");
        assert_eq!(p.container.map(|c| c.runtime), Some("docker"));
        let (v2, p) = from_proc_cgroup("garbage without colons\n0::/\n");
        assert_eq!(v2, "/");
        assert_eq!(p, Placement::default());
    }
}
