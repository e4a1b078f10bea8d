//! What counts as a secret, and how one is hidden before anything leaves
//! the node.
//!
//! A value is secret by the name it is kept under (`password`, `api_key`,
//! `dbPassword`, `tls.key`…), by its shape (a PEM private key, a cloud or
//! forge access token, a JWT, a URL with a password), or by its entropy (a
//! long token of mixed letters and digits that is as random as its length
//! allows). A hidden value is replaced by its hash salted with the node's
//! [`MaskKey`]: a change is still seen (the hash changes), the value never
//! leaves the node, and without the key a short secret cannot be guessed
//! back from its hash.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

/// Length of a mask key, in bytes.
const KEY_LEN: usize = 32;

/// Hex digits of a salted hash shown in place of a secret (64 bits).
const HASH_HEX: usize = 16;

/// The node's key for salting the hashes of masked values.
pub struct MaskKey {
    key: [u8; KEY_LEN],
    id: String,
    /// Where it was read from, or `None` for a key made for this run.
    pub source: Option<PathBuf>,
}

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskKey")
            .field("id", &self.id)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl MaskKey {
    fn from_bytes(key: [u8; KEY_LEN], source: Option<PathBuf>) -> Self {
        let mut h = Sha256::new();
        h.update(b"driftwatch mask key id\0");
        h.update(key);
        let id = crate::digest::hex(&h.finalize()[..6]);
        Self { key, id, source }
    }

    /// A key for this run only: masked values stay hidden, but hashes taken
    /// before a restart are not comparable with those after it.
    pub fn ephemeral() -> Self {
        Self::from_bytes(rand::random(), None)
    }

    /// Reads the key at `path` (exactly 32 bytes, or 64 hex digits and an
    /// optional newline, as a Kubernetes Secret holds it), or creates one
    /// there (mode 0600) when `create` and the file does not exist.
    pub fn load(path: &Path, create: bool) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes)
                .map(|k| Self::from_bytes(k, Some(path.to_owned())))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: a mask key is 32 bytes or 64 hex digits; this file holds {} bytes",
                        path.display(),
                        bytes.len()
                    )
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let key: [u8; KEY_LEN] = rand::random();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| {
                        anyhow::anyhow!("{}: cannot create the mask key: {e}", path.display())
                    })?;
                f.write_all(&key).and_then(|()| f.sync_all()).map_err(|e| {
                    anyhow::anyhow!("{}: cannot write the mask key: {e}", path.display())
                })?;
                tracing::info!(path = %path.display(), "created this node's mask key");
                Ok(Self::from_bytes(key, Some(path.to_owned())))
            }
            Err(e) => Err(anyhow::anyhow!(
                "{}: cannot read the mask key: {e}",
                path.display()
            )),
        }
    }

    fn parse(bytes: &[u8]) -> Option<[u8; KEY_LEN]> {
        if bytes.len() == KEY_LEN {
            return bytes.try_into().ok();
        }
        let text = std::str::from_utf8(bytes).ok()?.trim();
        if text.len() != 2 * KEY_LEN {
            return None;
        }
        let mut key = [0u8; KEY_LEN];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(key)
    }

    /// Names the key without revealing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The salted hash shown instead of `value`.
    pub fn hash(&self, value: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(value.as_bytes());
        let mut s = crate::digest::hex(&h.finalize());
        s.truncate(HASH_HEX);
        s
    }
}

/// `apiKey` → `api_key`, `DB-PASSWORD` → `db_password`.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    let mut prev_lower = false;
    for c in name.trim_start_matches('-').chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(match c {
            '-' | '.' | ' ' => '_',
            c => c.to_ascii_lowercase(),
        });
    }
    out
}

/// True for a name whose value is a secret whatever it looks like.
/// (`PWD` is the working directory, not a password, so `pwd` is not a word
/// here; `passes` is a count.)
pub fn is_secret_name(name: &str) -> bool {
    let n = normalize(name);
    const ENDINGS: [&str; 12] = [
        "password",
        "passwd",
        "secret",
        "secrets",
        "token",
        "api_key",
        "apikey",
        "access_key",
        "private_key",
        "credential",
        "credentials",
        "passphrase",
    ];
    n == "pass"
        || n.ends_with("_pass")
        || n == "key"
        || n.ends_with("_key")
        || ENDINGS.iter().any(|w| n.ends_with(w))
}

/// True when a value kept under `name` must be hidden: a secret name (but
/// a `*key` that names a file, `tls.key: /etc/tls/key.pem`, says where the
/// secret is, not what it is), or a secret-looking value.
pub fn is_secret(name: &str, value: &str) -> bool {
    if value.is_empty() {
        return false;
    }
    if is_secret_name(name) {
        let n = normalize(name);
        let names_a_key = n == "key" || n.ends_with("_key");
        let is_path = value.starts_with('/') && !value.contains(char::is_whitespace);
        return !(names_a_key && is_path);
    }
    looks_secret(value)
}

/// True for a value shaped like a credential, or random like one,
/// whatever its name.
pub fn looks_secret(value: &str) -> bool {
    credential_shape(value) || high_entropy(value.trim())
}

/// True for a value in a known credential's shape.
fn credential_shape(value: &str) -> bool {
    let v = value.trim();
    if v.contains("PRIVATE KEY") && v.contains("-----BEGIN") {
        return true;
    }
    if has_url_password(v) {
        return true;
    }
    if v.contains(char::is_whitespace) {
        return false;
    }
    let upper_alnum = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    };
    for p in ["AKIA", "ASIA"] {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.len() == 16 && upper_alnum(rest) {
                return true;
            }
        }
    }
    const TOKEN_PREFIXES: [&str; 12] = [
        "ghp_",
        "gho_",
        "ghu_",
        "ghs_",
        "ghr_",
        "github_pat_",
        "glpat-",
        "xoxb-",
        "xoxp-",
        "xoxa-",
        "xoxs-",
        "sk_live_",
    ];
    if v.len() >= 16 && TOKEN_PREFIXES.iter().any(|p| v.starts_with(p)) {
        return true;
    }
    if v.len() >= 24 && (v.starts_with("sk-") || v.starts_with("hf_")) {
        return true;
    }
    v.starts_with("eyJ") && v.matches('.').count() == 2 && v.len() >= 32
}

/// A long token of letters and digits (and `+/=_-`) whose symbols are
/// spread as evenly as random ones would be, with a run of at least 16
/// that mixes letters and digits. Names made of words and numbers
/// (`web-frontend-2024-prod`, a UUID's groups) are not; hex digests stay
/// visible: sixteen symbols cannot reach the bar for their length.
fn high_entropy(v: &str) -> bool {
    let n = v.len();
    if !(20..=4096).contains(&n) {
        return false;
    }
    let charset = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-'));
    let random_run = v.split(['-', '_', '.']).any(|run| {
        run.len() >= 16
            && run.bytes().any(|b| b.is_ascii_alphabetic())
            && run.bytes().any(|b| b.is_ascii_digit())
    });
    if !charset || !random_run {
        return false;
    }
    let mut counts = [0u32; 256];
    for b in v.bytes() {
        counts[usize::from(b)] += 1;
    }
    let len = n as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / len;
            -p * p.log2()
        })
        .sum();
    // The most a string of this length can hold, up to 64 symbols.
    let most = len.min(64.0).log2();
    entropy >= 0.85 * most
}

/// True when `v` holds `scheme://user:password@`.
fn has_url_password(v: &str) -> bool {
    let mut rest = v;
    while let Some(at) = rest.find("://") {
        let tail = &rest[at + 3..];
        let end = tail
            .find(['/', '?', '#', ' ', '"', '\''])
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        if let (Some(atsign), Some(colon)) = (authority.rfind('@'), authority.find(':')) {
            if colon < atsign && colon + 1 < atsign {
                return true;
            }
        }
        rest = &tail[end..];
    }
    false
}

/// Replaces, inside free text, every `name: value` or `name=value` whose
/// name is a secret name, every URL's password, and every word shaped
/// like a credential (and, with `entropy`, every random-looking token),
/// by what `hide` makes of it. Used on command-line arguments (a `sed`
/// expression rewriting a password; without `entropy`, so identifiers a
/// responder needs stay) and on lines of text files (with it).
pub fn mask_inline(
    text: &str,
    entropy: bool,
    hide: &mut dyn FnMut(&str) -> String,
) -> (String, bool) {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut masked = false;
    let mut i = 0;
    let is_name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    let ends_value = |b: u8| {
        b.is_ascii_whitespace()
            || matches!(
                b,
                b'/' | b'"' | b'\'' | b',' | b';' | b'&' | b'}' | b']' | b')'
            )
    };
    while i < bytes.len() {
        if !is_name(bytes[i]) {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        // A word.
        let start = i;
        while i < bytes.len() && is_name(bytes[i]) {
            i += 1;
        }
        let word = &text[start..i];
        // A URL: its password, if it has one, is hidden.
        if text[i..].starts_with("://") {
            let end = text[i..]
                .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\''))
                .map_or(text.len(), |k| i + k);
            let url = &text[start..end];
            let authority_end = url[word.len() + 3..]
                .find(['/', '?', '#'])
                .map_or(url.len(), |k| word.len() + 3 + k);
            let authority = &url[word.len() + 3..authority_end];
            if let (Some(at), Some(colon)) = (authority.rfind('@'), authority.find(':')) {
                if colon + 1 < at {
                    let base = word.len() + 3;
                    out.push_str(&url[..base + colon + 1]);
                    out.push_str(&hide(&authority[colon + 1..at]));
                    out.push_str(&url[base + at..]);
                    masked = true;
                    i = end;
                    continue;
                }
            }
            out.push_str(url);
            i = end;
            continue;
        }
        // `word` then quote? spaces? `:` or `=` spaces? quote? value.
        let mut j = i;
        if j < bytes.len() && matches!(bytes[j], b'"' | b'\'') {
            j += 1;
        }
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        let sep = j < bytes.len() && matches!(bytes[j], b':' | b'=');
        if sep && is_secret_name(word) {
            j += 1;
            while j < bytes.len() && matches!(bytes[j], b' ' | b'"' | b'\'') {
                j += 1;
            }
            let v_start = j;
            while j < bytes.len() && !ends_value(bytes[j]) {
                j += 1;
            }
            let value = &text[v_start..j];
            if !value.is_empty() && is_secret(word, value) {
                out.push_str(&text[start..v_start]);
                out.push_str(&hide(value));
                masked = true;
                i = j;
                continue;
            }
        }
        // A bare word or token: hidden when it looks like a credential.
        let token_end = {
            let mut k = i;
            while k < bytes.len() && !ends_value(bytes[k]) && bytes[k] != b':' && bytes[k] != b'=' {
                k += 1;
            }
            k
        };
        let token = &text[start..token_end];
        let secret = if entropy {
            looks_secret(token)
        } else {
            credential_shape(token)
        };
        if secret {
            out.push_str(&hide(token));
            masked = true;
            i = token_end;
            continue;
        }
        out.push_str(word);
    }
    (out, masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_in_every_spelling() {
        for n in [
            "password",
            "DB_PASSWORD",
            "dbPassword",
            "api-key",
            "apiKey",
            "tls.key",
            "key",
            "AWS_SECRET_ACCESS_KEY",
            "github_token",
            "client_secret",
            "secrets",
            "pass",
            "ssh_passphrase",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in [
            "replicas", "passes", "pwd", "monkey", "keyboard", "host", "image",
        ] {
            assert!(!is_secret_name(n), "{n}");
        }
    }

    #[test]
    fn a_key_that_names_a_file_is_not_hidden() {
        assert!(!is_secret("tls.key", "/etc/tls/key.pem"));
        assert!(is_secret("tls.key", "c2VjcmV0"));
        assert!(is_secret("password", "/starts-with-slash"));
    }

    #[test]
    fn credential_shapes() {
        for v in [
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "xoxb-123456789012-abcdefghijkl",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXNpZw",
            "postgresql://app:hunter2@db:5432/prod",
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE...",
            "q8Zr2Lx0VbN4tYw7KpD1sFgH3jMc",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ] {
            assert!(looks_secret(v), "{v}");
        }
        for v in [
            "3",
            "nginx:1.27",
            "https://example.com/path",
            "postgresql://db:5432/prod",
            // A sha256 in hex: a pin, not a secret.
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "config_manager_2024_production",
            "/var/lib/models/llama-3-8b-instruct.safetensors",
            "a sentence with several words in it",
            "dw-marker-28641-exit",
            "web-frontend-2024-prod-eu1",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert!(!looks_secret(v), "{v}");
        }
    }

    #[test]
    fn inline_assignments_in_free_text_are_hidden() {
        let key = MaskKey::ephemeral();
        let mut hide = |v: &str| format!("<{}>", key.hash(v));
        let (s, m) = mask_inline(
            "s/password: s3cret-OLD-7f3a/password: s3cret-NEW-9c1d/",
            true,
            &mut hide,
        );
        assert!(m);
        assert!(!s.contains("s3cret"), "{s}");
        assert!(s.starts_with("s/password: <"), "{s}");
        let (s, _) = mask_inline("export API_TOKEN=\"abc123\" # note", true, &mut hide);
        assert!(!s.contains("abc123"), "{s}");
        let (s, m) = mask_inline("replicas: 3 # three of them", true, &mut hide);
        assert_eq!((s.as_str(), m), ("replicas: 3 # three of them", false));
        let (s, m) = mask_inline("url = postgresql://u:pw@db/x", true, &mut hide);
        assert!(m && !s.contains("pw@"), "{s}");
        // A random token: hidden in text, kept in a command line.
        let token = "q8Zr2Lx0VbN4tYw7KpD1sFgH3jMc";
        assert!(mask_inline(token, true, &mut hide).1);
        assert!(!mask_inline(token, false, &mut hide).1);
    }

    #[test]
    fn the_key_salts_and_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mask.key");
        let a = MaskKey::load(&p, true).expect("created");
        let b = MaskKey::load(&p, false).expect("read back");
        assert_eq!(a.hash("x"), b.hash("x"));
        assert_eq!(a.id(), b.id());
        assert_ne!(a.hash("x"), MaskKey::ephemeral().hash("x"));
        assert_eq!(a.hash("x").len(), HASH_HEX);
        std::fs::write(&p, "short").expect("write");
        let e = MaskKey::load(&p, true).expect_err("refused");
        assert!(e.to_string().contains("32 bytes or 64 hex digits"), "{e}");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).expect("write");
        MaskKey::load(&p, false).expect("hex accepted");
        let e = MaskKey::load(&dir.path().join("none"), false).expect_err("missing");
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
