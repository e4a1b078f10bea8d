//! What changed between two structures of a file (see `Structure` in the
//! API): keys added, removed and changed, or lines for text kept by line.
//! Masked values are compared by their salted hashes and reported only as
//! changed.

use std::collections::BTreeMap;

use crate::v1::{ConfigChange, Structure, StructureEntry};

/// `ConfigChange.op` of a key or line only in the new structure.
pub const ADDED: &str = "added";
/// Only in the old one.
pub const REMOVED: &str = "removed";
/// In both, with different values.
pub const CHANGED: &str = "changed";

/// Most changes kept in one finding; the note counts the rest.
pub const MAX_CHANGES: usize = 200;

/// The changes from `old` to `new`, and why they are missing or partial.
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    /// Changes, in key order (lines: in file order).
    pub changes: Vec<ConfigChange>,
    /// Empty, or why `changes` is empty or partial.
    pub note: String,
}

fn change(op: &str, key: String, old: &StructureEntry, new: &StructureEntry) -> ConfigChange {
    ConfigChange {
        op: op.into(),
        key,
        old: old.value.clone(),
        new: new.value.clone(),
        masked: old.masked || new.masked,
    }
}

fn one_sided(op: &str, key: String, e: &StructureEntry) -> ConfigChange {
    let (old, new) = if op == ADDED {
        (String::new(), e.value.clone())
    } else {
        (e.value.clone(), String::new())
    };
    ConfigChange {
        op: op.into(),
        key,
        old,
        new,
        masked: e.masked,
    }
}

/// Compares the structures of the desired (`old`) and the actual (`new`)
/// content of a file.
pub fn diff(old: Option<&Structure>, new: Option<&Structure>) -> Diff {
    let note = |s: &str| Diff {
        changes: Vec::new(),
        note: s.to_owned(),
    };
    let (old, new) = match (old, new) {
        (None, None) => return Diff::default(),
        (None, Some(_)) => {
            return note("the desired state has no recorded content (a manifest or an older agent gave digests only)")
        }
        (Some(_), None) => return note("the actual content was not summarised"),
        (Some(o), Some(n)) => (o, n),
    };
    if old.format != new.format {
        let why = if new.note.is_empty() {
            &old.note
        } else {
            &new.note
        };
        return note(&format!(
            "the content changed format ({} -> {}){}{}",
            old.format,
            new.format,
            if why.is_empty() { "" } else { ": " },
            why
        ));
    }
    if old.entries.is_empty() || new.entries.is_empty() {
        let why = [&old.note, &new.note]
            .into_iter()
            .find(|n| !n.is_empty())
            .cloned()
            .unwrap_or_default();
        if !why.is_empty() {
            return note(&why);
        }
    }
    let comparable = old.mask_key_id == new.mask_key_id;
    let mut d = if new.format == "lines" {
        lines(&old.entries, &new.entries, comparable)
    } else {
        keyed(&old.entries, &new.entries, comparable)
    };
    if !comparable && d.note.is_empty() {
        d.note = "masked values were hashed under different mask keys and are not compared".into();
    }
    if d.changes.len() > MAX_CHANGES {
        let more = d.changes.len() - MAX_CHANGES;
        d.changes.truncate(MAX_CHANGES);
        let sep = if d.note.is_empty() { "" } else { "; " };
        d.note = format!("{}{sep}{more} more changes not shown", d.note);
    }
    d
}

fn differs(a: &StructureEntry, b: &StructureEntry, comparable: bool) -> bool {
    if (a.masked || b.masked) && !comparable {
        return false;
    }
    a.value != b.value || a.masked != b.masked
}

fn keyed(old: &[StructureEntry], new: &[StructureEntry], comparable: bool) -> Diff {
    let o: BTreeMap<&str, &StructureEntry> = old.iter().map(|e| (e.key.as_str(), e)).collect();
    let n: BTreeMap<&str, &StructureEntry> = new.iter().map(|e| (e.key.as_str(), e)).collect();
    let mut changes = Vec::new();
    for (k, a) in &o {
        match n.get(k) {
            None => changes.push(one_sided(REMOVED, (*k).to_owned(), a)),
            Some(b) if differs(a, b, comparable) => {
                changes.push(change(CHANGED, (*k).to_owned(), a, b))
            }
            Some(_) => {}
        }
    }
    for (k, b) in &n {
        if !o.contains_key(k) {
            changes.push(one_sided(ADDED, (*k).to_owned(), b));
        }
    }
    // Key order, an added key beside its neighbours.
    changes.sort_by(|a, b| a.key.cmp(&b.key));
    Diff {
        changes,
        note: String::new(),
    }
}

fn lines(old: &[StructureEntry], new: &[StructureEntry], comparable: bool) -> Diff {
    use similar::{Algorithm, DiffOp};
    let key = |e: &StructureEntry| {
        // Lines with masked parts under another key never compare equal.
        if e.masked && !comparable {
            None
        } else {
            Some(e.value.clone())
        }
    };
    let ops = similar::capture_diff_slices_by_key(Algorithm::Myers, old, new, key);
    let mut changes = Vec::new();
    let line = |i: usize| format!("line {}", i + 1);
    // Lines `from..to` of `lines`, each added or removed.
    let side = |changes: &mut Vec<ConfigChange>,
                op: &str,
                lines: &[StructureEntry],
                from: usize,
                to: usize| {
        for (i, e) in lines.iter().enumerate().take(to).skip(from) {
            changes.push(one_sided(op, line(i), e));
        }
    };
    for op in ops {
        match op {
            DiffOp::Equal { .. } => {}
            DiffOp::Delete {
                old_index, old_len, ..
            } => {
                side(&mut changes, REMOVED, old, old_index, old_index + old_len);
            }
            DiffOp::Insert {
                new_index, new_len, ..
            } => {
                side(&mut changes, ADDED, new, new_index, new_index + new_len);
            }
            DiffOp::Replace {
                old_index,
                old_len,
                new_index,
                new_len,
            } => {
                let paired = old_len.min(new_len);
                for k in 0..paired {
                    changes.push(change(
                        CHANGED,
                        line(new_index + k),
                        &old[old_index + k],
                        &new[new_index + k],
                    ));
                }
                side(
                    &mut changes,
                    REMOVED,
                    old,
                    old_index + paired,
                    old_index + old_len,
                );
                side(
                    &mut changes,
                    ADDED,
                    new,
                    new_index + paired,
                    new_index + new_len,
                );
            }
        }
    }
    Diff {
        changes,
        note: String::new(),
    }
}

/// One change as a person reads it: `replicas: 1 → 3`, `password: changed
/// (secret; salted hash 1a2b… → 3c4d…)`, `+ key: value`, `- key: value`.
pub fn render(c: &ConfigChange) -> String {
    let short = |h: &str| h.get(..8).unwrap_or(h).to_owned();
    match (c.op.as_str(), c.masked) {
        (CHANGED, true) if c.key.starts_with("line ") => {
            format!("{}: {} → {}", c.key, c.old, c.new)
        }
        (CHANGED, true) => format!(
            "{}: changed (secret; salted hash {} → {})",
            c.key,
            short(&c.old),
            short(&c.new)
        ),
        (CHANGED, false) => format!("{}: {} → {}", c.key, c.old, c.new),
        (ADDED, true) if !c.key.starts_with("line ") => {
            format!("+ {}: (secret; salted hash {})", c.key, short(&c.new))
        }
        (ADDED, _) => format!("+ {}: {}", c.key, c.new),
        (REMOVED, true) if !c.key.starts_with("line ") => {
            format!("- {}: (secret; salted hash {})", c.key, short(&c.old))
        }
        (_, _) => format!("- {}: {}", c.key, c.old),
    }
}

/// `state` without its structure (kept with baselines, not copied into
/// every finding and change record: those keep the diff).
pub fn without(state: Option<crate::v1::FileState>) -> Option<crate::v1::FileState> {
    state.map(|mut s| {
        s.structure = None;
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(format: &str, kv: &[(&str, &str, bool)]) -> Structure {
        Structure {
            format: format.into(),
            entries: kv
                .iter()
                .map(|(k, v, m)| StructureEntry {
                    key: (*k).into(),
                    value: (*v).into(),
                    masked: *m,
                })
                .collect(),
            note: String::new(),
            mask_key_id: "k1".into(),
        }
    }

    fn rendered(d: &Diff) -> Vec<String> {
        d.changes.iter().map(render).collect()
    }

    #[test]
    fn keys_added_removed_and_changed_secrets_by_hash_only() {
        let old = st(
            "yaml",
            &[
                ("replicas", "1", false),
                ("password", "aaaa1111bbbb2222", true),
                ("gone", "x", false),
            ],
        );
        let new = st(
            "yaml",
            &[
                ("replicas", "3", false),
                ("password", "cccc3333dddd4444", true),
                ("new", "y", false),
            ],
        );
        let d = diff(Some(&old), Some(&new));
        assert_eq!(
            rendered(&d),
            [
                "- gone: x",
                "+ new: y",
                "password: changed (secret; salted hash aaaa1111 → cccc3333)",
                "replicas: 1 → 3",
            ]
        );
        assert!(d.note.is_empty());
        assert!(diff(Some(&old), Some(&old)).changes.is_empty());
    }

    #[test]
    fn lines_are_diffed_in_order() {
        let old = st(
            "lines",
            &[("", "a", false), ("", "b", false), ("", "c", false)],
        );
        let new = st(
            "lines",
            &[
                ("", "a", false),
                ("", "B", false),
                ("", "c", false),
                ("", "d", false),
            ],
        );
        assert_eq!(
            rendered(&diff(Some(&old), Some(&new))),
            ["line 2: b → B", "+ line 4: d"]
        );
    }

    #[test]
    fn what_cannot_be_compared_is_said() {
        let a = st("yaml", &[("password", "aaaa", true), ("x", "1", false)]);
        let mut b = st("yaml", &[("password", "bbbb", true), ("x", "2", false)]);
        b.mask_key_id = "k2".into();
        let d = diff(Some(&a), Some(&b));
        assert_eq!(rendered(&d), ["x: 1 → 2"]);
        assert!(d.note.contains("different mask keys"), "{}", d.note);
        let d = diff(None, Some(&b));
        assert!(d.note.contains("no recorded content"), "{}", d.note);
        let mut lines = st("lines", &[("", "password: [", false)]);
        lines.note = "not valid YAML (line 1): shown as lines".into();
        let d = diff(Some(&a), Some(&lines));
        assert!(
            d.note.contains("yaml -> lines") && d.note.contains("line 1"),
            "{}",
            d.note
        );
        let many: Vec<(String, String)> = (0..MAX_CHANGES + 5)
            .map(|i| (format!("k{i:04}"), i.to_string()))
            .collect();
        let kv: Vec<(&str, &str, bool)> = many
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str(), false))
            .collect();
        let d = diff(Some(&st("json", &[])), Some(&st("json", &kv)));
        assert_eq!(d.changes.len(), MAX_CHANGES);
        assert!(d.note.contains("5 more changes"), "{}", d.note);
    }
}
