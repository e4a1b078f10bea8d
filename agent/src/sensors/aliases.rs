//! Other paths that show a watched tree: bind mounts, and the volumes of
//! containers (a Kubernetes hostPath, a ConfigMap's host directory), in
//! this or any other mount namespace on the node.
//!
//! The kernel names a file as the process that touched it sees it; a
//! container writing `/config/app.yaml` through a bind mount of the host's
//! `/etc/app` is seen at `/config/app.yaml`. Each mount whose source lies
//! in (or holds) a watched tree is found in `/proc/PID/mountinfo` of every
//! mount namespace, and its path joins the watched set as an alias of the
//! watched path it shows.

use std::collections::{BTreeSet, HashSet};

/// At most this many aliases are watched (each is a trie entry).
pub const MAX_ALIASES: usize = 512;

/// One line of `mountinfo`: the filesystem, the directory of it that is
/// mounted, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    dev: String,
    root: String,
    point: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(Mount {
                dev: (*f.get(2)?).to_owned(),
                root: unescape(f.get(3)?),
                point: unescape(f.get(4)?),
            })
        })
        .collect()
}

/// `inner` relative to `outer` when it lies in it (on a component
/// boundary): `""` for the same path, else `/rest`.
fn within<'a>(inner: &'a str, outer: &str) -> Option<&'a str> {
    let outer = outer.trim_end_matches('/');
    let rest = inner.strip_prefix(outer)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn join(base: &str, rest: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.is_empty() && rest.is_empty() {
        "/".to_owned()
    } else {
        format!("{base}{rest}")
    }
}

/// Where a path of this namespace lives: its filesystem and its path in it.
fn locate(path: &str, mounts: &[Mount]) -> Option<(String, String)> {
    // The last mount on the longest matching point is the one in force.
    let m = mounts
        .iter()
        .rev()
        .filter(|m| within(path, &m.point).is_some())
        .max_by_key(|m| m.point.len())?;
    let rest = within(path, &m.point)?;
    Some((m.dev.clone(), join(&m.root, rest)))
}

/// The aliases of `watched` (canonical directories, no trailing `/`)
/// given this namespace's mounts and every namespace's: `(alias, watched
/// path it shows)`.
fn aliases_in(
    watched: &[String],
    own: &[Mount],
    namespaces: &[Vec<Mount>],
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for w in watched {
        let Some((dev, fs_path)) = locate(w, own) else {
            continue;
        };
        for mounts in namespaces {
            for m in mounts.iter().filter(|m| m.dev == dev) {
                let (alias, shows) = if let Some(rest) = within(&fs_path, &m.root) {
                    // The mount shows the whole watched tree, at point+rest.
                    (join(&m.point, rest), w.clone())
                } else if let Some(rest) = within(&m.root, &fs_path) {
                    // The mount shows a part of it.
                    (m.point.clone(), join(w, rest))
                } else {
                    continue;
                };
                if alias != shows && !alias.is_empty() {
                    out.insert((alias, shows));
                }
            }
        }
    }
    out
}

/// Finds the aliases of `watched` on this node now.
pub fn find(watched: &[String]) -> Vec<(String, String)> {
    if watched.is_empty() {
        return Vec::new();
    }
    let Ok(own) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let own = parse(&own);
    let mut seen = HashSet::new();
    let mut namespaces = vec![own.clone()];
    if let Ok(ns) = std::fs::read_link("/proc/self/ns/mnt") {
        seen.insert(ns);
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.filter_map(Result::ok) {
            let name = p.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
                continue;
            };
            if !seen.insert(ns) {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) {
                namespaces.push(parse(&text));
            }
        }
    }
    let found = aliases_in(watched, &own, &namespaces);
    if found.len() > MAX_ALIASES {
        tracing::warn!(
            found = found.len(),
            "more mounts show watched trees than the agent watches ({MAX_ALIASES}); the rest are not seen through"
        );
    }
    found.into_iter().take(MAX_ALIASES).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(dev: &str, root: &str, point: &str) -> Mount {
        Mount {
            dev: dev.into(),
            root: root.into(),
            point: point.into(),
        }
    }

    #[test]
    fn mountinfo_lines_are_read_with_their_escapes() {
        let t = "36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 - ext3 /dev/root rw\n";
        assert_eq!(parse(t), [m("98:0", "/mnt1", "/mnt two")]);
    }

    #[test]
    fn bind_mounts_of_a_watched_tree_or_a_part_of_it_are_aliases() {
        let own = vec![m("8:1", "/", "/"), m("8:2", "/", "/data")];
        let container = vec![
            m("0:50", "/", "/"),                   // overlay rootfs
            m("8:1", "/etc/app", "/config"),       // hostPath of the tree
            m("8:1", "/etc/app/sub", "/sub-only"), // a part of it
            m("8:2", "/models", "/models"),        // the second filesystem
            m("8:1", "/etc/other", "/other"),      // unrelated
        ];
        let got = aliases_in(
            &["/etc/app".into(), "/data/models".into()],
            &own,
            &[own.clone(), container],
        );
        let got: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            got,
            [
                ("/config", "/etc/app"),
                ("/models", "/data/models"),
                ("/sub-only", "/etc/app/sub"),
            ]
        );
    }

    #[test]
    fn a_bind_of_a_parent_shows_the_tree_below_its_point() {
        let own = vec![m("8:1", "/", "/")];
        let ns = vec![m("8:1", "/etc", "/host-etc")];
        let got = aliases_in(&["/etc/app".into()], &own, &[ns]);
        assert!(got.contains(&("/host-etc/app".into(), "/etc/app".into())));
    }
}
