//! The watched set: policy paths and ports as the kernel maps hold them.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
};

use agent_common::{WatchValue, PATH_LEN};
use aya::maps::lpm_trie::Key;

use crate::policy::Policy;

/// One entry of the watched-path trie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchPath {
    /// Canonical absolute path; a tree ends in `/`.
    pub prefix: String,
    /// A single file or the tree's own directory, matched exactly.
    pub exact: bool,
    /// Index of the resource in the policy.
    pub resource: usize,
}

impl WatchPath {
    /// The LPM key and value. An exact entry includes the terminating NUL
    /// so that `/a/b` does not match `/a/bc`.
    pub fn to_key(&self) -> (Key<[u8; PATH_LEN]>, WatchValue) {
        let mut data = [0u8; PATH_LEN];
        let bytes = self.prefix.as_bytes();
        let n = bytes.len().min(PATH_LEN - 1);
        data[..n].copy_from_slice(&bytes[..n]);
        (
            Key::new(self.key_bits(), data),
            WatchValue {
                resource: self.resource as u32,
                exact: u32::from(self.exact),
                ancestor: 0,
                bits: self.key_bits(),
            },
        )
    }

    /// Bits of the key that must match.
    pub fn key_bits(&self) -> u32 {
        ((self.prefix.len().min(PATH_LEN - 1) + usize::from(self.exact)) * 8) as u32
    }

    /// True when both produce the same trie key.
    pub fn same_key(&self, other: &Self) -> bool {
        self.prefix == other.prefix && self.exact == other.exact
    }

    fn covers(&self, path: &str) -> bool {
        if self.exact {
            path == self.prefix
        } else {
            path.starts_with(&self.prefix)
        }
    }
}

/// Everything the kernel filters on.
#[derive(Clone, Debug, Default)]
pub struct WatchSet {
    /// Trie entries.
    pub paths: Vec<WatchPath>,
    /// Port to resource index.
    pub ports: BTreeMap<u16, usize>,
    /// Resource names, by index (shared with the events that name them).
    pub names: Vec<std::sync::Arc<str>>,
    /// Other paths that show a watched path (bind mounts, container
    /// volumes): `(alias, watched path)`, each also in `paths`.
    pub aliases: Vec<(String, String)>,
    /// Watched files with more than one name, by inode (the kernel's
    /// device encoding): their watched path and resource index.
    pub inodes: std::collections::HashMap<agent_common::InodeKey, (String, usize)>,
}

/// Files looked at for other names at most, per policy apply.
pub const LINKED_SCAN_MAX: usize = 50_000;

/// A device number as the kernel's `s_dev` holds it.
pub fn kernel_dev(st_dev: u64) -> u64 {
    let (major, minor) = (libc::major(st_dev) as u64, libc::minor(st_dev) as u64);
    (major << 20) | minor
}

/// The inode key of the file at `path` (following symlinks).
pub fn inode_of(path: &str) -> Option<agent_common::InodeKey> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(agent_common::InodeKey {
        dev: kernel_dev(m.dev()),
        ino: m.ino(),
    })
}

impl WatchSet {
    /// What the kernel's trie holds: every entry, and a marker for each
    /// directory above one (`/`, `/etc/` for `/etc/app.yaml`) that is not
    /// itself a watched tree. A lookup that ends on a marker shorter than
    /// the looked-up file's directory proves nothing is watched in or below
    /// that directory, which the kernel then caches.
    pub fn kernel_entries(&self) -> Vec<(Key<[u8; PATH_LEN]>, WatchValue)> {
        let mut out: Vec<_> = self.paths.iter().map(WatchPath::to_key).collect();
        let trees: std::collections::BTreeSet<&str> = self
            .paths
            .iter()
            .filter(|w| !w.exact)
            .map(|w| w.prefix.as_str())
            .collect();
        let mut markers = std::collections::BTreeSet::new();
        for w in &self.paths {
            let body = w.prefix.trim_end_matches('/');
            for (i, _) in body.match_indices('/') {
                markers.insert(&w.prefix[..=i]);
            }
        }
        for m in markers.into_iter().filter(|m| !trees.contains(m)) {
            if m.len() >= PATH_LEN {
                continue;
            }
            let mut data = [0u8; PATH_LEN];
            data[..m.len()].copy_from_slice(m.as_bytes());
            let bits = (m.len() * 8) as u32;
            out.push((
                Key::new(bits, data),
                WatchValue {
                    resource: u32::MAX,
                    exact: 0,
                    ancestor: 1,
                    bits,
                },
            ));
        }
        out
    }
}

/// Resolves symlinks in the part of `path` that exists, so that the prefix
/// is written as the kernel will report it (`/var/run` → `/run`).
pub fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if parent != path => canonical(parent).join(name),
        _ => path.to_path_buf(),
    }
}

/// Lexical normalisation: drops `.` and empty components, applies `..`.
pub fn normalise(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    format!("/{}", parts.join("/"))
}

impl WatchSet {
    /// The watched set a policy asks for, as of the filesystem now.
    pub fn from_policy(policy: &Policy) -> Self {
        let mut set = Self::default();
        for (i, r) in policy.resources.iter().enumerate() {
            set.names.push(r.name.as_str().into());
            for p in &r.paths {
                let canon = canonical(Path::new(p));
                let text = canon.display().to_string();
                let tree = p.ends_with('/') || canon.is_dir();
                if tree {
                    let prefix = if text == "/" {
                        "/".to_owned()
                    } else {
                        format!("{text}/")
                    };
                    set.paths.push(WatchPath {
                        prefix,
                        exact: false,
                        resource: i,
                    });
                }
                set.paths.push(WatchPath {
                    prefix: text,
                    exact: true,
                    resource: i,
                });
            }
            for port in &r.ports {
                set.ports.insert(*port, i);
            }
        }
        set.paths.dedup_by(|a, b| a.same_key(b));
        set
    }

    /// Adds the watched files that have more than one name (hard links),
    /// so that a write through a name outside the trees is caught by its
    /// inode.
    pub fn with_linked(mut self) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        let seen = std::cell::Cell::new(0usize);
        let roots: Vec<(String, usize)> = self
            .own_roots()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let visit = |path: &str, resource: usize, inodes: &mut std::collections::HashMap<_, _>| {
            seen.set(seen.get() + 1);
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.is_file() && m.nlink() > 1 {
                    inodes.insert(
                        agent_common::InodeKey {
                            dev: kernel_dev(m.dev()),
                            ino: m.ino(),
                        },
                        (path.to_owned(), resource),
                    );
                }
            }
        };
        for (root, resource) in roots {
            if root.is_empty() || seen.get() >= LINKED_SCAN_MAX {
                continue;
            }
            if !Path::new(&root).is_dir() {
                visit(&root, resource, &mut self.inodes);
                continue;
            }
            let left = LINKED_SCAN_MAX - seen.get();
            let inodes = &mut self.inodes;
            let (_, _, cut) = crate::digest::walk_bounded(&root, left, &mut |p| {
                visit(p, resource, inodes);
                true
            });
            if let Some(why) = cut {
                tracing::warn!(root, "looking for watched files with other names: {why}");
            }
        }
        self
    }

    /// The watched path of a file reached through another name, when it is
    /// one of the watched files with several names.
    pub fn by_inode(&self, path: &str) -> Option<&str> {
        if self.inodes.is_empty() {
            return None;
        }
        self.inodes.get(&inode_of(path)?).map(|(p, _)| p.as_str())
    }

    /// The watched paths of the policy itself (not aliases), trees without
    /// their `/`, with their resource index.
    fn own_roots(&self) -> impl Iterator<Item = (String, usize)> + '_ {
        self.paths
            .iter()
            .filter(|w| {
                !self
                    .aliases
                    .iter()
                    .any(|(a, _)| w.prefix.starts_with(a.as_str()))
            })
            .map(|w| (w.prefix.trim_end_matches('/').to_owned(), w.resource))
    }

    /// The watched paths (trees without their `/`) that mounts elsewhere
    /// may show.
    pub fn alias_roots(&self) -> Vec<String> {
        let mut roots: Vec<String> = self
            .own_roots()
            .map(|(p, _)| p)
            .filter(|p| !p.is_empty())
            .collect();
        roots.sort();
        roots.dedup();
        roots
    }

    /// Adds `aliases` (`(alias, watched path)`) as watched paths of the
    /// resource of the path each shows.
    pub fn with_aliases(mut self, aliases: Vec<(String, String)>) -> Self {
        for (alias, shows) in &aliases {
            let Some(w) = self
                .paths
                .iter()
                .filter(|w| w.covers(shows) || w.covers(&format!("{shows}/")))
                .max_by_key(|w| w.prefix.len() + usize::from(w.exact))
                .cloned()
            else {
                continue;
            };
            if Path::new(shows).is_dir() {
                self.paths.push(WatchPath {
                    prefix: format!("{alias}/"),
                    exact: false,
                    resource: w.resource,
                });
            }
            self.paths.push(WatchPath {
                prefix: alias.clone(),
                exact: true,
                resource: w.resource,
            });
        }
        self.paths.dedup_by(|a, b| a.same_key(b));
        self.aliases = aliases;
        self
    }

    /// The watched path that `path`, seen through an alias, is; `None` when
    /// it is not under one.
    pub fn unalias(&self, path: &str) -> Option<String> {
        self.aliases
            .iter()
            .filter_map(|(alias, shows)| {
                let rest = path.strip_prefix(alias.as_str())?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| (alias.len(), format!("{shows}{rest}")))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, p)| p)
    }

    /// The resource name a path belongs to (longest match), if watched.
    pub fn resource_of(&self, path: &str) -> Option<&std::sync::Arc<str>> {
        self.paths
            .iter()
            .filter(|w| w.covers(path))
            .max_by_key(|w| w.prefix.len() + usize::from(w.exact))
            .and_then(|w| self.names.get(w.resource))
    }

    /// The resource of a watched path at or below `dir` (a mount over `/etc`
    /// changes what `/etc/app/` shows), else of the tree `dir` is in.
    pub fn resource_at_or_below(&self, dir: &str) -> Option<&std::sync::Arc<str>> {
        let base = format!("{}/", dir.trim_end_matches('/'));
        self.paths
            .iter()
            .find(|w| w.prefix.starts_with(&base) || w.prefix == dir)
            .and_then(|w| self.names.get(w.resource))
            .or_else(|| self.resource_of(dir))
    }

    /// The resource name a port belongs to.
    pub fn resource_of_port(&self, port: u16) -> Option<&std::sync::Arc<str>> {
        self.ports.get(&port).and_then(|i| self.names.get(*i))
    }

    /// Prefixes for display (trees end in `/`).
    pub fn display_paths(&self) -> Vec<String> {
        self.paths
            .iter()
            .filter(|w| {
                !w.exact
                    || !self
                        .paths
                        .iter()
                        .any(|t| !t.exact && t.prefix == format!("{}/", w.prefix))
            })
            .map(|w| w.prefix.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_lexically() {
        assert_eq!(normalise("/etc/myapp/./x"), "/etc/myapp/x");
        assert_eq!(normalise("/etc//myapp/x"), "/etc/myapp/x");
        assert_eq!(normalise("/tmp/a/../../etc/myapp/x"), "/etc/myapp/x");
        assert_eq!(normalise("/../.."), "/");
    }

    #[test]
    fn markers_stand_above_every_entry_but_never_on_a_watched_tree() {
        let set = WatchSet {
            paths: vec![
                WatchPath {
                    prefix: "/srv/models/".into(),
                    exact: false,
                    resource: 0,
                },
                WatchPath {
                    prefix: "/srv/models/a/b.bin".into(),
                    exact: true,
                    resource: 0,
                },
                WatchPath {
                    prefix: "/etc/app.yaml".into(),
                    exact: true,
                    resource: 1,
                },
            ],
            ..Default::default()
        };
        let markers: Vec<String> = set
            .kernel_entries()
            .iter()
            .filter(|(_, v)| v.ancestor == 1)
            .map(|(k, v)| {
                let data = k.data();
                String::from_utf8_lossy(&data[..(v.bits / 8) as usize]).into_owned()
            })
            .collect();
        // `/srv/models/` is watched, so it is an entry, not a marker.
        assert_eq!(markers, ["/", "/etc/", "/srv/", "/srv/models/a/"]);
    }

    #[test]
    fn trees_files_and_resources() {
        let dir = tempfile::tempdir().unwrap();
        let root = canonical(dir.path()).display().to_string();
        let text = format!(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - {{ name: cfg, kind: config, paths: [\"{root}\", \"/srv/app/settings.yaml\"] }}\n  - {{ name: db, kind: database, ports: [5432] }}\n"
        );
        let policy = Policy::parse("p.yaml", &text).unwrap();
        let set = WatchSet::from_policy(&policy);
        assert_eq!(
            set.resource_of(&format!("{root}/a/b.conf")).map(|r| &**r),
            Some("cfg")
        );
        assert_eq!(set.resource_of(&root).map(|r| &**r), Some("cfg"));
        assert_eq!(set.resource_of(&format!("{root}x/a")), None);
        assert_eq!(
            set.resource_of("/srv/app/settings.yaml").map(|r| &**r),
            Some("cfg")
        );
        assert_eq!(set.resource_of("/srv/app/settings.yaml.bak"), None);
        assert_eq!(set.resource_of_port(5432).map(|r| &**r), Some("db"));
        assert_eq!(set.resource_of_port(5433), None);
        let file = set
            .paths
            .iter()
            .find(|w| w.prefix == "/srv/app/settings.yaml")
            .unwrap();
        assert_eq!(
            file.key_bits(),
            ("/srv/app/settings.yaml".len() as u32 + 1) * 8
        );
    }
}
