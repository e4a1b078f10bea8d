//! What a watched file's content says, as keys and values: the base of a
//! drift finding that names what changed (`replicas: 1 → 3`, `password:
//! changed`) instead of two digests.
//!
//! Config files of known formats (YAML, JSON, TOML, INI, `.env` and Java
//! properties) are flattened into key paths; other text is kept line by
//! line; model artifacts give their header (safetensors, GGUF). Every
//! value that looks secret (see [`crate::secrets`]) is replaced by its
//! hash salted with the node's mask key before it leaves this module, so
//! a structure never holds a secret in clear. Parse errors name a line,
//! never a snippet of the file.

use std::{
    collections::HashMap,
    io::{BufReader, Read},
};

use serde::Serialize;
use serde_json::Value;

use crate::{policy::ResourceKind, secrets::MaskKey};

/// Largest config file summarised (larger ones keep digests only).
pub const CONFIG_MAX: u64 = 1 << 20;
/// Largest other text file kept line by line.
pub const LINES_MAX: u64 = 256 << 10;
/// Most entries in one structure.
pub const MAX_ENTRIES: usize = 4096;
/// Longest value kept whole; a longer one keeps its start, length and hash.
const MAX_VALUE: usize = 256;
/// Largest model header read.
const HEADER_MAX: u64 = 64 << 20;
/// Most tensors listed one by one in a model's structure.
const MAX_TENSORS: usize = 1024;

/// What the digester summarises of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Digest only.
    Plain,
    /// A config file: keys and values, or lines.
    Config,
    /// A model artifact: its header.
    Model,
}

impl Content {
    /// By the file's resource kind and, where that says nothing, its name.
    pub fn of(kind: Option<ResourceKind>, path: &str) -> Self {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        if name.ends_with(".safetensors") || name.ends_with(".gguf") {
            return Content::Model;
        }
        // A model's `config.json` beside its weights is a config file.
        if Format::of(path) != Format::Lines {
            return Content::Config;
        }
        match kind {
            Some(ResourceKind::Config) => Content::Config,
            Some(ResourceKind::Model) => Content::Model,
            _ => Content::Plain,
        }
    }
}

/// A file's content as keys and values.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Structure {
    /// `yaml`, `json`, `toml`, `ini`, `env`, `lines`, `safetensors`, `gguf`.
    pub format: &'static str,
    /// Keys and values (lines: values in file order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<Entry>,
    /// Why entries are missing or partial.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// The mask key the masked values are salted with.
    pub mask_key_id: String,
}

/// One key and its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Entry {
    /// Key path (empty for a line).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// The value, or its salted hash when masked.
    pub value: String,
    /// The value looked secret: `value` is its salted hash (for a line,
    /// the secret parts are replaced by theirs).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
}

/// A config file's format, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
    Toml,
    /// `.ini`, `.cfg`: INI is claimed, a parse error is noted.
    Ini,
    /// `.conf`, `.cnf`: INI when every line reads as INI, lines otherwise.
    MaybeIni,
    Env,
    Lines,
}

impl Format {
    fn of(path: &str) -> Self {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        match ext {
            "yaml" | "yml" => Format::Yaml,
            "json" => Format::Json,
            "toml" => Format::Toml,
            "ini" | "cfg" => Format::Ini,
            "conf" | "cnf" => Format::MaybeIni,
            "env" | "properties" => Format::Env,
            _ if name.starts_with(".env") => Format::Env,
            _ => Format::Lines,
        }
    }
}

/// Too many entries to keep.
struct TooMany;

/// Collects entries, masking and bounding values.
struct Builder<'k> {
    entries: Vec<Entry>,
    key: &'k MaskKey,
    /// Times each key was seen (a repeated INI or `.env` key gets `[n]`).
    seen: HashMap<String, usize>,
}

impl<'k> Builder<'k> {
    fn new(key: &'k MaskKey) -> Self {
        Self {
            entries: Vec::new(),
            key,
            seen: HashMap::new(),
        }
    }

    /// Adds `path = value`; `name` is the key the value is kept under,
    /// `secret` forces masking (inside a secret-named map, a Secret's data).
    fn put(&mut self, path: String, name: &str, value: &str, secret: bool) -> Result<(), TooMany> {
        if self.entries.len() >= MAX_ENTRIES {
            return Err(TooMany);
        }
        let path = match self.seen.get_mut(&path) {
            Some(n) => {
                *n += 1;
                format!("{path}[{n}]")
            }
            None => {
                self.seen.insert(path.clone(), 1);
                path
            }
        };
        let masked = secret || crate::secrets::is_secret(name, value);
        let value = if masked {
            self.key.hash(value)
        } else {
            bounded(value)
        };
        self.entries.push(Entry {
            key: path,
            value,
            masked,
        });
        Ok(())
    }

    fn done(self, format: &'static str, note: String) -> Structure {
        Structure {
            format,
            entries: self.entries,
            note,
            mask_key_id: self.key.id().to_owned(),
        }
    }
}

/// `value`, or its start, length and hash when it is long.
fn bounded(value: &str) -> String {
    if value.len() <= MAX_VALUE {
        return value.to_owned();
    }
    let mut end = MAX_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    use sha2::Digest as _;
    let sha = crate::digest::hex(&sha2::Sha256::digest(value.as_bytes()));
    format!(
        "{}… ({} bytes, sha256 {})",
        &value[..end],
        value.len(),
        &sha[..12]
    )
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Flattens a parsed document into key paths.
fn flatten(
    b: &mut Builder<'_>,
    v: &Value,
    path: &str,
    name: &str,
    secret: bool,
) -> Result<(), TooMany> {
    match v {
        Value::Object(m) if m.is_empty() => b.put(path.to_owned(), name, "{}", false),
        Value::Object(m) => {
            // A Kubernetes Secret's data is secret under any key.
            let k8s_secret = m.get("kind").and_then(Value::as_str) == Some("Secret");
            for (k, child) in m {
                let inside = secret
                    || crate::secrets::is_secret_name(k)
                        && matches!(child, Value::Object(_) | Value::Array(_))
                    || k8s_secret && (k == "data" || k == "stringData");
                flatten(b, child, &join(path, k), k, inside)?;
            }
            Ok(())
        }
        Value::Array(a) if a.is_empty() => b.put(path.to_owned(), name, "[]", false),
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                flatten(b, child, &format!("{path}[{i}]"), name, secret)?;
            }
            Ok(())
        }
        Value::String(s) => b.put(path.to_owned(), name, s, secret),
        Value::Null => b.put(path.to_owned(), name, "null", secret),
        other => b.put(path.to_owned(), name, &other.to_string(), secret),
    }
}

/// The line a byte offset is on (1-based).
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string())),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

/// Parses `text` as `format` into documents; the error names a line.
fn parse(format: Format, text: &str) -> Result<Vec<Value>, String> {
    match format {
        Format::Json => serde_json::from_str(text)
            .map(|v| vec![v])
            .map_err(|e| format!("not valid JSON (line {})", e.line())),
        Format::Toml => toml::from_str::<toml::Table>(text)
            .map(|t| vec![toml_to_json(toml::Value::Table(t))])
            .map_err(|e| {
                let line = e.span().map_or(0, |s| line_of(text, s.start));
                format!("not valid TOML (line {line})")
            }),
        Format::Yaml => {
            use serde::Deserialize as _;
            let mut docs = Vec::new();
            for doc in serde_norway::Deserializer::from_str(text) {
                match Value::deserialize(doc) {
                    Ok(v) => docs.push(v),
                    Err(e) => {
                        let line = e.location().map_or(0, |l| l.line());
                        return Err(format!("not valid YAML (line {line})"));
                    }
                }
            }
            Ok(docs)
        }
        _ => Err("not a keyed format".into()),
    }
}

/// INI: `[section]`, `key = value` or `key: value`, `;`/`#` comments.
/// `strict` (a `.conf`): a line that is neither fails the parse.
fn ini(b: &mut Builder<'_>, text: &str, strict: bool) -> Result<Result<(), TooMany>, usize> {
    let mut section = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = inner.trim().to_owned();
            continue;
        }
        let (k, v) = match line.find(['=', ':']) {
            Some(i) => (line[..i].trim(), unquote(line[i + 1..].trim())),
            None => (line, ""),
        };
        let simple = !k.is_empty()
            && k.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.' | b'/'));
        if !simple && strict {
            return Err(n + 1);
        }
        if let Err(e) = b.put(join(&section, k), k, v, false) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

/// `.env` and properties: `[export ]KEY=VALUE` or `key: value`.
fn env(b: &mut Builder<'_>, text: &str) -> Result<Result<(), TooMany>, usize> {
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some(i) = line.find(['=', ':']) else {
            return Err(n + 1);
        };
        let k = line[..i].trim();
        let rest = line[i + 1..].trim();
        let v = if rest.starts_with(['"', '\'']) {
            unquote(rest)
        } else {
            // An unquoted value ends at a comment.
            rest.split(" #").next().unwrap_or(rest).trim_end()
        };
        if let Err(e) = b.put(k.to_owned(), k, v, false) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q) {
            if let Some(end) = inner.find(q) {
                return &inner[..end];
            }
        }
    }
    v
}

/// Other text: one entry per line, secrets inside a line replaced by
/// their salted hashes.
fn lines(key: &MaskKey, text: &str, note: String) -> Structure {
    let mut entries = Vec::new();
    for line in text.lines() {
        if entries.len() >= MAX_ENTRIES {
            return Structure {
                format: "lines",
                entries: Vec::new(),
                note: format!("more than {MAX_ENTRIES} lines: compared by digest only"),
                mask_key_id: key.id().to_owned(),
            };
        }
        let (value, masked) =
            crate::secrets::mask_inline(line, true, &mut |v| format!("[masked {}]", key.hash(v)));
        entries.push(Entry {
            key: String::new(),
            value: bounded(&value),
            masked,
        });
    }
    Structure {
        format: "lines",
        entries,
        note,
        mask_key_id: key.id().to_owned(),
    }
}

fn too_many(key: &MaskKey, format: &'static str) -> Structure {
    Structure {
        format,
        entries: Vec::new(),
        note: format!("more than {MAX_ENTRIES} keys: compared by digest only"),
        mask_key_id: key.id().to_owned(),
    }
}

/// The structure of a config file's content, `None` when it is not text.
pub fn config(path: &str, bytes: &[u8], key: &MaskKey) -> Option<Structure> {
    if bytes.contains(&0) {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let format = Format::of(path);
    let (name, result) = match format {
        Format::Yaml | Format::Json | Format::Toml => {
            let name = match format {
                Format::Yaml => "yaml",
                Format::Json => "json",
                _ => "toml",
            };
            match parse(format, text) {
                Ok(docs) => {
                    let mut b = Builder::new(key);
                    let many = docs.len() > 1;
                    let mut r = Ok(());
                    for (i, doc) in docs.iter().enumerate() {
                        let prefix = if many { format!("#{i}") } else { String::new() };
                        r = flatten(&mut b, doc, &prefix, "", false);
                        if r.is_err() {
                            break;
                        }
                    }
                    (name, r.map(|()| b))
                }
                Err(why) => {
                    return Some(lines(key, text, format!("{why}: shown as lines")));
                }
            }
        }
        Format::Ini | Format::MaybeIni => {
            let mut b = Builder::new(key);
            match ini(&mut b, text, format == Format::MaybeIni) {
                Ok(r) => ("ini", r.map(|()| b)),
                Err(_) if format == Format::MaybeIni => {
                    return Some(lines(key, text, String::new()))
                }
                Err(line) => {
                    return Some(lines(
                        key,
                        text,
                        format!("not valid INI (line {line}): shown as lines"),
                    ))
                }
            }
        }
        Format::Env => {
            let mut b = Builder::new(key);
            match env(&mut b, text) {
                Ok(r) => ("env", r.map(|()| b)),
                Err(line) => {
                    return Some(lines(
                        key,
                        text,
                        format!("not valid .env/properties (line {line}): shown as lines"),
                    ))
                }
            }
        }
        Format::Lines => {
            if bytes.len() as u64 > LINES_MAX {
                return Some(Structure {
                    format: "lines",
                    entries: Vec::new(),
                    note: format!(
                        "larger than {} KiB: compared by digest only",
                        LINES_MAX >> 10
                    ),
                    mask_key_id: key.id().to_owned(),
                });
            }
            return Some(lines(key, text, String::new()));
        }
    };
    Some(match result {
        Ok(b) => b.done(name, String::new()),
        Err(TooMany) => too_many(key, name),
    })
}

/// A config file too large to summarise.
pub fn too_large(key: &MaskKey) -> Structure {
    Structure {
        format: "lines",
        entries: Vec::new(),
        note: format!(
            "larger than {} MiB: compared by digest only",
            CONFIG_MAX >> 20
        ),
        mask_key_id: key.id().to_owned(),
    }
}

/// The header of a model artifact (safetensors, GGUF), `None` for other
/// formats.
pub fn model(file: &std::fs::File, key: &MaskKey) -> Option<Structure> {
    let mut r = BufReader::with_capacity(64 << 10, file.take(HEADER_MAX));
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).ok()?;
    if &magic[..4] == b"GGUF" {
        let version = u32::from_le_bytes(magic[4..8].try_into().ok()?);
        return Some(gguf(&mut r, version, key).unwrap_or_else(|why| Structure {
            format: "gguf",
            entries: Vec::new(),
            note: why,
            mask_key_id: key.id().to_owned(),
        }));
    }
    let len = u64::from_le_bytes(magic);
    if !(2..=HEADER_MAX).contains(&len) {
        return None;
    }
    let mut json = vec![0u8; usize::try_from(len).ok()?];
    r.read_exact(&mut json).ok()?;
    if json.first() != Some(&b'{') {
        return None;
    }
    let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&json) else {
        return None;
    };
    Some(safetensors(&header, key))
}

fn safetensors(header: &serde_json::Map<String, Value>, key: &MaskKey) -> Structure {
    let mut b = Builder::new(key);
    let mut dtypes: std::collections::BTreeMap<String, u64> = Default::default();
    let mut parameters: u128 = 0;
    let tensors: Vec<_> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect();
    let mut listed = Vec::new();
    for (name, t) in &tensors {
        let dtype = t.get("dtype").and_then(Value::as_str).unwrap_or("?");
        let shape: Vec<u64> = t
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        *dtypes.entry(dtype.to_owned()).or_default() += 1;
        parameters += shape.iter().map(|&d| u128::from(d)).product::<u128>();
        if tensors.len() <= MAX_TENSORS {
            listed.push((format!("tensor.{name}"), format!("{dtype} {shape:?}")));
        }
    }
    let dtypes = dtypes
        .iter()
        .map(|(d, n)| format!("{d}×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let put = |b: &mut Builder<'_>, k: String, v: &str| b.put(k, "", v, false).is_ok();
    put(&mut b, "tensors".into(), &tensors.len().to_string());
    put(&mut b, "parameters".into(), &parameters.to_string());
    put(&mut b, "dtypes".into(), &dtypes);
    if let Some(Value::Object(meta)) = header.get("__metadata__") {
        for (k, v) in meta {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            if b.put(format!("metadata.{k}"), k, &v, false).is_err() {
                return too_many(key, "safetensors");
            }
        }
    }
    for (k, v) in listed {
        if !put(&mut b, k, &v) {
            return too_many(key, "safetensors");
        }
    }
    let note = if tensors.len() > MAX_TENSORS {
        format!("more than {MAX_TENSORS} tensors: counted, not listed")
    } else {
        String::new()
    };
    b.done("safetensors", note)
}

/// GGUF v2/v3: version, tensor count, metadata (arrays as their length and
/// type), and the tensors' types and shapes.
fn gguf(r: &mut impl Read, version: u32, key: &MaskKey) -> Result<Structure, String> {
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version}: header not read"));
    }
    let cut = |_| "the GGUF header is cut short or too large".to_owned();
    let u32_ = |r: &mut dyn Read| -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map(|()| u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut dyn Read| -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).map(|()| u64::from_le_bytes(b))
    };
    let string = |r: &mut dyn Read| -> std::io::Result<String> {
        let mut len = [0u8; 8];
        r.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut s = vec![0u8; len as usize];
        r.read_exact(&mut s)?;
        Ok(String::from_utf8_lossy(&s).into_owned())
    };
    const TYPES: [&str; 13] = [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ];
    fn scalar(r: &mut dyn Read, t: u32) -> std::io::Result<String> {
        let size = match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return Err(std::io::ErrorKind::InvalidData.into()),
        };
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..size])?;
        Ok(match t {
            0 => b[0].to_string(),
            1 => (b[0] as i8).to_string(),
            2 => u16::from_le_bytes([b[0], b[1]]).to_string(),
            3 => i16::from_le_bytes([b[0], b[1]]).to_string(),
            4 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
            5 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
            6 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_string(),
            7 => (b[0] != 0).to_string(),
            10 => u64::from_le_bytes(b).to_string(),
            11 => i64::from_le_bytes(b).to_string(),
            _ => f64::from_le_bytes(b).to_string(),
        })
    }
    let tensors = u64_(r).map_err(cut)?;
    let kvs = u64_(r).map_err(cut)?;
    let mut b = Builder::new(key);
    let full = |_| "more than the entries kept".to_owned();
    b.put("version".into(), "", &version.to_string(), false)
        .map_err(full)?;
    b.put("tensors".into(), "", &tensors.to_string(), false)
        .map_err(full)?;
    for _ in 0..kvs {
        let k = string(r).map_err(cut)?;
        let t = u32_(r).map_err(cut)?;
        let v = match t {
            8 => string(r).map_err(cut)?,
            9 => {
                let et = u32_(r).map_err(cut)?;
                let n = u64_(r).map_err(cut)?;
                for _ in 0..n {
                    if et == 8 {
                        string(r).map_err(cut)?;
                    } else {
                        scalar(r, et).map_err(cut)?;
                    }
                }
                let name = TYPES.get(et as usize).copied().unwrap_or("?");
                format!("[{n} × {name}]")
            }
            t => scalar(r, t).map_err(cut)?,
        };
        let name = k.rsplit('.').next().unwrap_or(&k).to_owned();
        if b.put(format!("metadata.{k}"), &name, &v, false).is_err() {
            return Ok(too_many(key, "gguf"));
        }
    }
    if tensors as usize <= MAX_TENSORS {
        for _ in 0..tensors {
            let name = string(r).map_err(cut)?;
            let dims = u32_(r).map_err(cut)?;
            if dims > 8 {
                return Err("a GGUF tensor with more than 8 dimensions".into());
            }
            let mut shape = Vec::new();
            for _ in 0..dims {
                shape.push(u64_(r).map_err(cut)?);
            }
            let t = u32_(r).map_err(cut)?;
            let _offset = u64_(r).map_err(cut)?;
            let t = match t {
                0 => "F32".to_owned(),
                1 => "F16".to_owned(),
                2 => "Q4_0".to_owned(),
                3 => "Q4_1".to_owned(),
                6 => "Q5_0".to_owned(),
                7 => "Q5_1".to_owned(),
                8 => "Q8_0".to_owned(),
                10 => "Q2_K".to_owned(),
                11 => "Q3_K".to_owned(),
                12 => "Q4_K".to_owned(),
                13 => "Q5_K".to_owned(),
                14 => "Q6_K".to_owned(),
                30 => "BF16".to_owned(),
                t => format!("type {t}"),
            };
            if b.put(
                format!("tensor.{name}"),
                "",
                &format!("{t} {shape:?}"),
                false,
            )
            .is_err()
            {
                return Ok(too_many(key, "gguf"));
            }
        }
    }
    Ok(b.done("gguf", String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &Structure) -> Vec<(String, String, bool)> {
        s.entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone(), e.masked))
            .collect()
    }

    fn find<'a>(s: &'a Structure, key: &str) -> &'a Entry {
        s.entries
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no {key} in {s:?}"))
    }

    const SECRETS: [&str; 2] = ["s3cret-OLD-7f3a", "hunter2-pw"];

    fn no_secret(s: &Structure) {
        let text = format!("{s:?}");
        for x in SECRETS {
            assert!(!text.contains(x), "{x} in {text}");
        }
    }

    #[test]
    fn yaml_is_flattened_and_its_secrets_masked() {
        let key = MaskKey::ephemeral();
        let s = config(
            "/etc/app/app.yaml",
            b"replicas: 1\ndb:\n  password: s3cret-OLD-7f3a\n  hosts: [a, b]\nempty: {}\n",
            &key,
        )
        .expect("text");
        assert_eq!(s.format, "yaml");
        assert_eq!(find(&s, "replicas").value, "1");
        assert_eq!(find(&s, "db.hosts[1]").value, "b");
        assert_eq!(find(&s, "empty").value, "{}");
        let pw = find(&s, "db.password");
        assert!(pw.masked);
        assert_eq!(pw.value, key.hash("s3cret-OLD-7f3a"));
        no_secret(&s);
    }

    #[test]
    fn every_keyed_format() {
        let key = MaskKey::ephemeral();
        let cases: [(&str, &str, &str); 5] = [
            (
                "a.json",
                r#"{"replicas": 1, "db": {"password": "s3cret-OLD-7f3a"}}"#,
                "db.password",
            ),
            (
                "a.toml",
                "replicas = 1\n[db]\npassword = \"s3cret-OLD-7f3a\"\n",
                "db.password",
            ),
            (
                "a.ini",
                "replicas = 1\n[db]\npassword = s3cret-OLD-7f3a\n",
                "db.password",
            ),
            (
                ".env",
                "export REPLICAS=1\nDB_PASSWORD=\"s3cret-OLD-7f3a\"\n",
                "DB_PASSWORD",
            ),
            (
                "app.properties",
                "replicas: 1\n# c\ndb.password=s3cret-OLD-7f3a\n",
                "db.password",
            ),
        ];
        for (path, text, secret) in cases {
            let s = config(path, text.as_bytes(), &key).expect("text");
            assert!(s.note.is_empty(), "{path}: {}", s.note);
            assert!(find(&s, secret).masked, "{path}");
            let replicas = s
                .entries
                .iter()
                .find(|e| e.key.eq_ignore_ascii_case("replicas"))
                .unwrap_or_else(|| panic!("{path}: {s:?}"));
            assert_eq!(replicas.value, "1", "{path}");
            no_secret(&s);
        }
    }

    #[test]
    fn a_kubernetes_secret_is_masked_whole_and_documents_are_numbered() {
        let key = MaskKey::ephemeral();
        let s = config(
            "m.yaml",
            b"kind: ConfigMap\ndata:\n  mode: fast\n---\nkind: Secret\ndata:\n  anything: aHVudGVyMi1wdw==\n",
            &key,
        )
        .expect("text");
        assert_eq!(find(&s, "#0.data.mode").value, "fast");
        assert!(find(&s, "#1.data.anything").masked);
    }

    #[test]
    fn a_parse_error_names_a_line_never_the_text() {
        let key = MaskKey::ephemeral();
        for (path, text) in [
            ("a.yaml", "a: 1\npassword: [hunter2-pw\n"),
            ("a.toml", "a = 1\npassword = hunter2-pw\n"),
            ("a.json", "{\"password\": hunter2-pw}"),
        ] {
            let s = config(path, text.as_bytes(), &key).expect("text");
            assert_eq!(s.format, "lines", "{path}");
            assert!(s.note.contains("line"), "{path}: {}", s.note);
            no_secret(&s);
        }
    }

    #[test]
    fn other_text_is_kept_by_line_with_secrets_hidden() {
        let key = MaskKey::ephemeral();
        let s = config(
            "/etc/app/run.sh",
            b"#!/bin/sh\nexport DB_PASSWORD=hunter2-pw\nexec app --port 80\n",
            &key,
        )
        .expect("text");
        assert_eq!(s.format, "lines");
        assert_eq!(s.entries.len(), 3);
        assert!(s.entries[1].masked);
        assert_eq!(s.entries[2].value, "exec app --port 80");
        no_secret(&s);
        // nginx is not INI: lines, without a note.
        let s = config(
            "/etc/nginx/nginx.conf",
            b"server {\n  listen 80;\n}\n",
            &key,
        )
        .expect("t");
        assert_eq!((s.format, s.note.as_str()), ("lines", ""));
        // A my.cnf is.
        let s = config(
            "/etc/my.cnf",
            b"[mysqld]\nport = 3306\nskip-networking\n",
            &key,
        )
        .expect("t");
        assert_eq!(s.format, "ini");
        assert_eq!(
            kv(&s),
            [
                ("mysqld.port".into(), "3306".into(), false),
                ("mysqld.skip-networking".into(), "".into(), false)
            ]
        );
        assert!(config("x.yaml", b"\0\x01binary", &key).is_none());
    }

    #[test]
    fn bounds_hold() {
        let key = MaskKey::ephemeral();
        let many: String = (0..MAX_ENTRIES + 1)
            .map(|i| format!("k{i}: {i}\n"))
            .collect();
        let s = config("big.yaml", many.as_bytes(), &key).expect("text");
        assert!(
            s.entries.is_empty() && s.note.contains("more than"),
            "{}",
            s.note
        );
        let long = format!("v: {}\n", "x".repeat(1000));
        let s = config("long.yaml", long.as_bytes(), &key).expect("text");
        assert!(find(&s, "v").value.contains("1000 bytes"));
    }

    #[test]
    fn a_safetensors_header_is_summarised() {
        let header = br#"{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[3],"data_offsets":[12,24]}}"#;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 24]);
        std::fs::write(&p, &bytes).expect("write");
        let key = MaskKey::ephemeral();
        let s = model(&std::fs::File::open(&p).expect("open"), &key).expect("header");
        assert_eq!(s.format, "safetensors");
        assert_eq!(find(&s, "tensors").value, "2");
        assert_eq!(find(&s, "parameters").value, "9");
        assert_eq!(find(&s, "dtypes").value, "F16×1, F32×1");
        assert_eq!(find(&s, "tensor.w").value, "F16 [2, 3]");
        assert_eq!(find(&s, "metadata.format").value, "pt");
        std::fs::write(&p, b"not a model at all").expect("write");
        assert!(model(&std::fs::File::open(&p).expect("open"), &key).is_none());
    }

    #[test]
    fn a_gguf_header_is_summarised() {
        let mut g = b"GGUF".to_vec();
        g.extend_from_slice(&3u32.to_le_bytes());
        g.extend_from_slice(&1u64.to_le_bytes()); // tensors
        g.extend_from_slice(&2u64.to_le_bytes()); // kvs
        let s = |g: &mut Vec<u8>, s: &str| {
            g.extend_from_slice(&(s.len() as u64).to_le_bytes());
            g.extend_from_slice(s.as_bytes());
        };
        s(&mut g, "general.architecture");
        g.extend_from_slice(&8u32.to_le_bytes());
        s(&mut g, "llama");
        s(&mut g, "tokenizer.ggml.tokens");
        g.extend_from_slice(&9u32.to_le_bytes());
        g.extend_from_slice(&8u32.to_le_bytes());
        g.extend_from_slice(&2u64.to_le_bytes());
        s(&mut g, "a");
        s(&mut g, "b");
        s(&mut g, "blk.0.w");
        g.extend_from_slice(&2u32.to_le_bytes());
        g.extend_from_slice(&4u64.to_le_bytes());
        g.extend_from_slice(&8u64.to_le_bytes());
        g.extend_from_slice(&1u32.to_le_bytes());
        g.extend_from_slice(&0u64.to_le_bytes());
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, &g).expect("write");
        let key = MaskKey::ephemeral();
        let st = model(&std::fs::File::open(&p).expect("open"), &key).expect("header");
        assert_eq!(st.format, "gguf");
        assert_eq!(find(&st, "metadata.general.architecture").value, "llama");
        assert_eq!(
            find(&st, "metadata.tokenizer.ggml.tokens").value,
            "[2 × string]"
        );
        assert_eq!(find(&st, "tensor.blk.0.w").value, "F16 [4, 8]");
        // Cut short: noted, not a panic.
        std::fs::write(&p, &g[..40]).expect("write");
        let st = model(&std::fs::File::open(&p).expect("open"), &key).expect("header");
        assert!(st.note.contains("cut short"), "{}", st.note);
    }
}
