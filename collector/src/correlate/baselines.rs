//! Desired state: per path and host selector, from a manifest, a scan of a
//! reference host, an approved change, or learned on first sight.
//!
//! Stored through a judging transaction ([`JudgeTx`]), one entry per
//! watched file and selector.

use driftwatch_proto::v1::{Baseline, FileState};

use crate::store::{judging::JudgeTx, StoreError};

/// Manifest entries: read by the collector from a manifest file.
pub const MANIFEST: &str = "manifest";
/// A reference host's state.
pub const SCAN: &str = "scan";
/// The state when the path was first watched.
pub const LEARNED: &str = "learned";
/// The first state of a file created while watched.
pub const LEARNED_CREATED: &str = "learned_created";
/// The result of an approved change.
pub const APPROVED: &str = "approved";

/// True when `name` matches the host `pattern` (`*` any run, `?` one byte).
///
/// Linear in practice and O(pattern × name) at worst: a `*` that fails to
/// extend is retried from the last `*` only, never from every earlier one
/// (the recursive matcher this replaces took exponential time on
/// `*a*a*a…*b` against a long name, and stalled judging for every node).
pub fn host_matches(pattern: &str, name: &str) -> bool {
    host_matches_steps(pattern.as_bytes(), name.as_bytes()).0
}

/// The matcher, with the number of steps it took.
fn host_matches_steps(p: &[u8], s: &[u8]) -> (bool, usize) {
    let (mut pi, mut si, mut steps) = (0, 0, 0);
    // Where the last `*` was, and where in `s` its run ends for now.
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        steps += 1;
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                // Let the last `*` take one more byte and try again.
                Some((sp, ss)) => {
                    star = Some((sp, ss + 1));
                    pi = sp + 1;
                    si = ss + 1;
                }
                None => return (false, steps),
            },
        }
    }
    while p.get(pi) == Some(&b'*') {
        pi += 1;
    }
    (pi == p.len(), steps)
}

/// How well a selector fits a host: exact name beats a glob, a longer glob
/// beats a shorter one, `*` comes last.
fn specificity(pattern: &str, node: &str) -> Option<usize> {
    if pattern == node {
        Some(usize::MAX)
    } else if host_matches(pattern, node) {
        Some(pattern.len())
    } else {
        None
    }
}

/// The best-fitting of one path's baselines for `node`: its desired
/// state there.
pub fn best<'a>(of_path: &'a [Baseline], node: &str) -> Option<&'a Baseline> {
    of_path
        .iter()
        .filter_map(|b| specificity(&b.host, node).map(|s| (s, b)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, b)| b)
}

/// Baselines for a selector (all when empty) under a path prefix,
/// ordered by host selector then path.
/// The baselines under `prefix` whose host selector `host` (a name or a
/// glob, empty for all) matches.
pub fn list(tx: &mut dyn JudgeTx, host: &str, prefix: &str) -> Result<Vec<Baseline>, StoreError> {
    let mut v = tx.baselines("", prefix)?;
    v.retain(|b| host.is_empty() || host_matches(host, &b.host));
    v.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
    Ok(v)
}

/// What differs between a desired and an observed state; fields the desired
/// state leaves unknown are not compared, nor is content that could not be read.
pub fn differences(desired: &FileState, actual: &FileState) -> Vec<String> {
    let mut d = Vec::new();
    if desired.exists && !actual.exists {
        d.push("missing".to_owned());
        return d;
    }
    if !desired.sha256.is_empty() && !actual.sha256.is_empty() && desired.sha256 != actual.sha256 {
        d.push("content".to_owned());
    }
    if desired.mode.is_some() && actual.mode.is_some() && desired.mode != actual.mode {
        d.push("mode".to_owned());
    }
    if (desired.uid.is_some() && actual.uid.is_some() && desired.uid != actual.uid)
        || (desired.gid.is_some() && actual.gid.is_some() && desired.gid != actual.gid)
    {
        d.push("owner".to_owned());
    }
    if let (Some(want), Some(got)) = (&desired.attributes, &actual.attributes) {
        if want.xattrs != got.xattrs {
            d.push("xattrs".to_owned());
        }
        if want.flags != got.flags {
            d.push("inode flags".to_owned());
        }
    }
    d
}

/// Why a manifest line was refused.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ManifestError {
    /// The manifest.
    pub file: String,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses a manifest: `sha256sum` output (`HEX  PATH`, `HEX *PATH`) or
/// `sha256sum --tag` / BSD output (`SHA256 (PATH) = HEX`), as a Git
/// checkout or a model registry export produces, one file per line; a
/// leading `\` marks a name with escapes (`\\`, `\n`), as sha256sum
/// writes them. `#` comments and blank lines are skipped. Relative paths
/// are joined to `root`, which must then be given.
pub fn parse_manifest(
    file: &str,
    text: &str,
    root: Option<&str>,
) -> Result<Vec<(String, String)>, ManifestError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |reason: String| ManifestError {
            file: file.to_owned(),
            line: i + 1,
            reason,
        };
        let line = raw.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let (escaped, line) = match line.strip_prefix('\\') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (hex, path) = if let Some((algo, rest)) = line
            .split_once(" (")
            .filter(|(a, _)| a.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            // The tagged form.
            if !algo.eq_ignore_ascii_case("SHA256") {
                return Err(err(format!(
                    "{algo} digests cannot be compared; give SHA256 (sha256sum --tag)"
                )));
            }
            let Some((path, hex)) = rest.rsplit_once(") = ") else {
                return Err(err("expected \"SHA256 (PATH) = HEX\"".into()));
            };
            (hex.trim(), path)
        } else {
            let Some((hex, rest)) = line.split_once(char::is_whitespace) else {
                return Err(err(
                    "expected \"SHA256  PATH\" or \"SHA256 (PATH) = HEX\"".into()
                ));
            };
            (hex, rest.trim_start().trim_start_matches('*'))
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(format!("{hex:?} is not a SHA-256 (64 hex digits)")));
        }
        let path = if escaped {
            unescape(path).map_err(err)?
        } else {
            path.to_owned()
        };
        if path.is_empty() {
            return Err(err("no path after the digest".into()));
        }
        let path = if path.starts_with('/') {
            path
        } else {
            match root {
                Some(r) => format!(
                    "{}/{}",
                    r.trim_end_matches('/'),
                    path.trim_start_matches("./")
                ),
                None => {
                    let why = "is relative; pass --root DIR to say where the manifest's files live";
                    return Err(err(format!("{path:?} {why}")));
                }
            }
        };
        if path.split('/').any(|c| c == "..") {
            return Err(err(format!("{path:?} must not contain .. components")));
        }
        out.push((path, hex.to_ascii_lowercase()));
    }
    Ok(out)
}

/// A file name as sha256sum escapes it (`\\` and `\n`).
fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => {
                return Err(format!(
                    "{:?} is not an escape sha256sum writes",
                    format!("\\{}", other.map(String::from).unwrap_or_default())
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_globs() {
        assert!(host_matches("*", "node-1"));
        for (p, n, want) in [
            ("node-?", "node-1", true),
            ("node-?", "node-10", false),
            ("*-1", "node-1", true),
            ("n*e*1", "node-1", true),
            ("n*x*1", "node-1", false),
            ("", "", true),
            ("", "a", false),
            ("**", "", true),
            ("a*", "a", true),
        ] {
            assert_eq!(host_matches(p, n), want, "{p:?} ~ {n:?}");
        }
        // The pattern that stalled judging: bounded by pattern × name.
        let (p, n) = ("*a".repeat(12) + "*b", "a".repeat(253));
        let (matched, steps) = host_matches_steps(p.as_bytes(), n.as_bytes());
        assert!(!matched);
        assert!(steps <= (p.len() + 1) * (n.len() + 1), "{steps} steps");
        assert!(host_matches("web-*", "web-12"));
        assert!(!host_matches("web-*", "db-1"));
        assert!(host_matches("n?de", "node"));
        assert!(specificity("node-1", "node-1") > specificity("node-*", "node-1"));
        assert!(specificity("node-*", "node-1") > specificity("*", "node-1"));
    }

    #[test]
    fn manifest_lines() {
        let sha = "a".repeat(64);
        let text = format!("# models\n{sha}  /srv/m/a.bin\n{sha} *rel/b.bin\n\n");
        let v = parse_manifest("m.txt", &text, Some("/srv")).expect("valid");
        assert_eq!(v[0].0, "/srv/m/a.bin");
        assert_eq!(v[1].0, "/srv/rel/b.bin");
        let e = parse_manifest("m.txt", &text, None).expect_err("relative without root");
        assert!(e.to_string().starts_with("m.txt:3: "), "{e}");
        let e = parse_manifest("m.txt", "abc  /x\n", None).expect_err("short digest");
        assert!(
            e.to_string().contains("m.txt:1: \"abc\" is not a SHA-256"),
            "{e}"
        );
    }

    #[test]
    fn tagged_and_escaped_manifest_lines() {
        let sha = "B".repeat(64);
        let text = format!(
            "SHA256 (/srv/m/a (1).bin) = {sha}\n\\{}  /srv/m/odd\\nname\\\\x\n",
            "c".repeat(64)
        );
        let v = parse_manifest("-", &text, None).expect("valid");
        assert_eq!(v[0], ("/srv/m/a (1).bin".to_owned(), "b".repeat(64)));
        assert_eq!(v[1].0, "/srv/m/odd\nname\\x");
        let e = parse_manifest("-", &format!("MD5 (/x) = {sha}\n"), None).expect_err("md5");
        assert!(
            e.to_string().contains("MD5 digests cannot be compared"),
            "{e}"
        );
    }

    #[test]
    fn differences_compare_what_is_known() {
        let want = FileState {
            exists: true,
            sha256: "aa".into(),
            mode: Some(0o644),
            ..Default::default()
        };
        let mut got = want.clone();
        got.uid = Some(1000);
        assert!(differences(&want, &got).is_empty());
        got.mode = Some(0o666);
        got.sha256 = "bb".into();
        assert_eq!(differences(&want, &got), ["content", "mode"]);
        got.exists = false;
        assert_eq!(differences(&want, &got), ["missing"]);
    }
}
