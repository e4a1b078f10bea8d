//! The policy file (`apiVersion: driftwatch.dev/v1`, `kind: Policy`).
//!
//! One parser for both sides: the collector loads the file, judges actions
//! with the resources' selectors, and pushes the text to its agents; the
//! agent parses it again (a policy it cannot apply is refused as a whole)
//! and fills the kernel's watch maps from the `paths` and `ports`.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

/// A policy refused, naming the file, the field and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{file}: cannot read policy: {source}")]
    Read {
        /// The policy file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not parse or does not have the policy's shape.
    #[error("{file}: {reason}")]
    Syntax {
        /// The policy file.
        file: String,
        /// Parser message, with line and column.
        reason: String,
    },
    /// A field has a value the policy does not allow.
    #[error("{file}: {field}: {reason}")]
    Invalid {
        /// The policy file.
        file: String,
        /// Path to the field, e.g. `resources[1].paths[0]`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The kind of a watched resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// Configuration files.
    Config,
    /// Model artifacts.
    Model,
    /// A database reached over the network.
    Database,
}

/// Whether a resource's rules only report or also block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Report only (default).
    #[default]
    Monitor,
    /// Report what `enforce` would refuse as `would_block`; stop nothing.
    Audit,
    /// Refuse actions outside the rules in the kernel: a connect fails with
    /// EPERM; a file call's caller is killed before the call returns to it.
    Enforce,
}

impl Mode {
    /// As the policy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Monitor => "monitor",
            Self::Audit => "audit",
            Self::Enforce => "enforce",
        }
    }
}

/// Who a rule lets act. Every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Absolute path of the binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// User name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Numeric uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Login user (the human behind sudo), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_user: Option<String>,
    /// Login uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loginuid: Option<u32>,
    /// Process name (`comm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kubernetes pod labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Kubernetes service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// One watched resource.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Unique name.
    pub name: String,
    /// What it is.
    pub kind: ResourceKind,
    /// Files and directory trees (a trailing `/` or an existing directory is a tree).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Who may change the paths.
    #[serde(default)]
    pub writers: Vec<Selector>,
    /// Who may connect to the ports.
    #[serde(default)]
    pub clients: Vec<Selector>,
    /// Monitor, audit or enforce.
    #[serde(default)]
    pub mode: Mode,
    /// Severity of the resource's findings: `low`, `medium`, `high` or
    /// `critical` (default: from the kind of finding and of resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
}

/// How urgent a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Look today.
    Medium,
    /// Look now.
    High,
    /// Wake someone up.
    Critical,
}

impl Severity {
    /// As the policy spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// The severity of a finding of `kind` on resource `r` (none: a finding of
/// no resource, or one the policy no longer has): the resource's own when
/// the policy gives one; else drift on a model or a database, and any
/// blocked or unauthorized act or deleted file, is `high`; other drift,
/// what only would have been blocked, a silent agent and a blind spot are
/// `medium`.
pub fn severity_of(kind: &str, r: Option<&Resource>) -> &'static str {
    if let Some(s) = r.and_then(|r| r.severity) {
        return s.as_str();
    }
    match kind {
        "blocked" | "unauthorized_write" | "unauthorized_connect" | "deleted" => "high",
        "drift" if r.is_some_and(|r| r.kind != ResourceKind::Config) => "high",
        "drift" | "would_block" | "agent_silent" | "blind_spot" => "medium",
        _ => "low",
    }
}

/// A whole policy document.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// Must be `driftwatch.dev/v1`.
    pub api_version: String,
    /// Must be `Policy`.
    pub kind: String,
    /// The resources.
    #[serde(default)]
    pub resources: Vec<Resource>,
}

/// What [`Policy::warnings`] knows of the install it checks for.
pub struct HostFacts<'a> {
    /// Whether a user of this name exists.
    pub user_exists: &'a dyn Fn(&str) -> bool,
    /// The uid of a user name, when it exists.
    pub uid_of: &'a dyn Fn(&str) -> Option<u32>,
    /// Whether an executable path exists.
    pub exe_exists: &'a dyn Fn(&str) -> bool,
    /// Whether the agents get pod metadata from a Kubernetes API server.
    pub kubernetes: bool,
}

/// The API version this parser reads.
pub const API_VERSION: &str = "driftwatch.dev/v1";

/// A policy text's version: the first 16 hex digits of its SHA-256.
pub fn version(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Longest watched path, in bytes: the kernel's path buffer less the
/// trailing `/` of a tree and the NUL.
pub const MAX_PATH_LEN: usize = 254;

/// Selectors a guarded resource can hold (the kernel gives each a bit).
pub const MAX_GUARD_SELECTORS: usize = 48;

impl Resource {
    /// The selectors a guardrail on this resource lets through: `clients`
    /// of a database, `writers` of anything else.
    pub fn guarded_by(&self) -> &[Selector] {
        if self.kind == ResourceKind::Database {
            &self.clients
        } else {
            &self.writers
        }
    }

    /// True when `path` is one of the resource's files or inside one of its
    /// trees (a path ending in `/`).
    pub fn covers(&self, path: &str) -> bool {
        self.paths.iter().any(|p| covers(p, path))
    }
}

/// True when the policy path `p` names `path` or a tree holding it.
pub fn covers(p: &str, path: &str) -> bool {
    match p.strip_suffix('/') {
        Some(dir) => {
            path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
        }
        None => p == path || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/')),
    }
}

impl Selector {
    /// Reads the text form `field=value[,field=value…]` (`user=app`,
    /// `exe=/usr/bin/psql,uid=1000`, `namespace=payments,label.app=api`),
    /// the fields named as in a policy. An empty selector is refused: it
    /// would match everyone.
    pub fn parse_text(text: &str) -> Result<Self, String> {
        let mut s = Self::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected field=value"))?;
            let (k, v) = (k.trim(), v.trim().to_owned());
            if v.is_empty() {
                return Err(format!("{k}: empty value"));
            }
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("{k}: {v:?} is not a number"))
            };
            match k {
                "exe" if !v.starts_with('/') => {
                    return Err(format!("exe: must be an absolute path, got {v:?}"))
                }
                "exe" => s.exe = Some(v),
                "user" => s.user = Some(v),
                "uid" => s.uid = Some(num(&v)?),
                "loginUser" => s.login_user = Some(v),
                "loginuid" => s.loginuid = Some(num(&v)?),
                "comm" => s.comm = Some(v),
                "image" => s.image = Some(v),
                "container" => s.container = Some(v),
                "namespace" => s.namespace = Some(v),
                "serviceAccount" => s.service_account = Some(v),
                _ => match k.strip_prefix("label.") {
                    Some(l) if !l.is_empty() => {
                        s.labels.insert(l.to_owned(), v);
                    }
                    _ => return Err(format!(
                        "unknown field {k:?} (exe, user, uid, loginUser, loginuid, comm, image, container, namespace, serviceAccount, label.NAME)"
                    )),
                },
            }
        }
        if s == Self::default() {
            return Err("an empty selector would match everyone; name at least one field".into());
        }
        Ok(s)
    }

    /// The text form [`Selector::parse_text`] reads, fields in a fixed order.
    pub fn to_text(&self) -> String {
        let mut out = Vec::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push(format!("{k}={v}"));
            }
        };
        put("exe", self.exe.clone());
        put("user", self.user.clone());
        put("uid", self.uid.map(|u| u.to_string()));
        put("loginUser", self.login_user.clone());
        put("loginuid", self.loginuid.map(|u| u.to_string()));
        put("comm", self.comm.clone());
        put("image", self.image.clone());
        put("container", self.container.clone());
        put("namespace", self.namespace.clone());
        put("serviceAccount", self.service_account.clone());
        for (k, v) in &self.labels {
            out.push(format!("label.{k}={v}"));
        }
        out.join(",")
    }

    /// True when the selector names a container or pod field: the kernel
    /// checks those by the cgroups of the matching containers.
    pub fn names_workload(&self) -> bool {
        self.image.is_some()
            || self.container.is_some()
            || self.namespace.is_some()
            || self.service_account.is_some()
            || !self.labels.is_empty()
    }

    /// True when every field the selector names matches the process.
    /// Fields the agent could not learn (pod labels without an API server,
    /// a container's image) never match: a selector fails closed.
    pub fn matches(&self, p: &crate::v1::Process) -> bool {
        fn eq(want: &Option<String>, have: &str) -> bool {
            want.as_deref()
                .is_none_or(|w| !have.is_empty() && w == have)
        }
        let container = p.container.as_ref();
        let container_ok = self.container.as_deref().is_none_or(|w| {
            container.is_some_and(|c| {
                (!c.name.is_empty() && c.name == w) || (w.len() >= 12 && c.id.starts_with(w))
            })
        });
        let image_ok = self
            .image
            .as_deref()
            .is_none_or(|w| container.is_some_and(|c| !c.image.is_empty() && c.image == w));
        eq(&self.exe, &p.exe)
            && eq(&self.user, &p.user)
            && self.uid.is_none_or(|u| u == p.uid)
            && eq(&self.login_user, &p.login_user)
            && self.loginuid.is_none_or(|u| p.loginuid == Some(u))
            && eq(&self.comm, &p.comm)
            && container_ok
            && image_ok
            && eq(&self.namespace, &p.pod_namespace)
            && eq(&self.service_account, &p.service_account)
            && self
                .labels
                .iter()
                .all(|(k, v)| p.pod_labels.get(k) == Some(v))
    }
}

/// The largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// The deepest nesting of `[` and `{` accepted.
pub const MAX_NESTING: usize = 64;
/// The deepest indentation accepted, in columns.
pub const MAX_INDENT: usize = 512;

/// Refuses, before the YAML parser sees it, text whose shape would make
/// parsing take time or memory out of proportion to any real policy: the
/// parser's cost grows with the square of the nesting (`resources: ` and
/// 160k `[` took 89 s, and a SIGHUP with such a file left the collector
/// deaf meanwhile). A linear scan of the text, quotes and comments
/// skipped.
pub fn check_shape(text: &str) -> Result<(), String> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(format!(
            "{} bytes; a policy may be at most {MAX_POLICY_BYTES}",
            text.len()
        ));
    }
    let (mut depth, mut quote) = (0usize, None::<char>);
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if quote.is_none() && indent > MAX_INDENT {
            return Err(format!(
                "line {}: indented {indent} columns; at most {MAX_INDENT}",
                n + 1
            ));
        }
        let mut prev = ' ';
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev == ' ' || prev == '\t' => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(format!(
                            "line {}: '[' and '{{' nested deeper than {MAX_NESTING}",
                            n + 1
                        ));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    Ok(())
}

impl Policy {
    /// The resource that watches `path`: the one with the longest matching
    /// path, so a file named on its own wins over a tree holding it.
    pub fn resource_for_path(&self, path: &str) -> Option<&Resource> {
        self.resources
            .iter()
            .filter_map(|r| {
                r.paths
                    .iter()
                    .filter(|p| covers(p, path))
                    .map(|p| p.len())
                    .max()
                    .map(|len| (len, r))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, r)| r)
    }

    /// The resource by name.
    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// The database resource that watches `port`.
    pub fn resource_for_port(&self, port: u16) -> Option<&Resource> {
        self.resources.iter().find(|r| r.ports.contains(&port))
    }

    /// Reads and validates a policy file.
    /// Returns the text too, for [`version`] and for sending it on.
    pub fn read(path: &Path) -> Result<(Self, String), PolicyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            file: file.clone(),
            source,
        })?;
        Ok((Self::parse(&file, &text)?, text))
    }

    /// Parses and validates policy text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        check_shape(text).map_err(|reason| PolicyError::Syntax {
            file: file.to_owned(),
            reason,
        })?;
        let policy: Policy = serde_norway::from_str(text).map_err(|e| PolicyError::Syntax {
            file: file.to_owned(),
            reason: e.to_string(),
        })?;
        policy.validate(file)?;
        Ok(policy)
    }

    /// What in a valid policy will not do what it seems to on an install
    /// described by `host`: selectors that can never match, modes not
    /// acted on. Each names the field, as errors do.
    pub fn warnings(&self, host: &HostFacts<'_>) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.resources.iter().enumerate() {
            if r.mode != Mode::Monitor && r.guarded_by().is_empty() {
                let list = if r.kind == ResourceKind::Database {
                    "clients"
                } else {
                    "writers"
                };
                out.push(format!(
                    "resources[{i}].mode: {} with no {list}: every {} of {:?} {}",
                    r.mode.as_str(),
                    if r.kind == ResourceKind::Database {
                        "connect"
                    } else {
                        "change"
                    },
                    r.name,
                    if r.mode == Mode::Enforce {
                        "is refused"
                    } else {
                        "would be refused"
                    }
                ));
            }
            for (list, sels) in [("writers", &r.writers), ("clients", &r.clients)] {
                for (j, s) in sels.iter().enumerate() {
                    let at = |f: &str| format!("resources[{i}].{list}[{j}].{f}");
                    if let Some(u) = &s.user {
                        if !(host.user_exists)(u) {
                            out.push(format!(
                                "{}: no user {u:?} on this host; the selector never matches here",
                                at("user")
                            ));
                        }
                    }
                    if let Some(u) = &s.login_user {
                        if !(host.user_exists)(u) {
                            out.push(format!(
                                "{}: no user {u:?} on this host; the selector never matches here",
                                at("loginUser")
                            ));
                        }
                    }
                    if let Some(exe) = &s.exe {
                        let link = std::fs::symlink_metadata(exe)
                            .is_ok_and(|m| m.file_type().is_symlink());
                        if link {
                            out.push(format!("{}: {exe} is a symlink; processes report the file it points to, so the selector never matches (name the target)", at("exe")));
                        } else if !(host.exe_exists)(exe) {
                            out.push(format!("{}: {exe} does not exist on this host; the selector never matches here", at("exe")));
                        }
                    }
                    if !host.kubernetes {
                        for (field, named) in [
                            ("namespace", s.namespace.is_some()),
                            ("labels", !s.labels.is_empty()),
                            ("serviceAccount", s.service_account.is_some()),
                        ] {
                            if named {
                                out.push(format!(
                                    "{}: pod metadata comes from the Kubernetes API, which this install does not reach; the selector never matches",
                                    at(field)
                                ));
                            }
                        }
                    }
                    if let (Some(u), Some(uid)) = (&s.user, s.uid) {
                        if let Some(id) = (host.uid_of)(u).filter(|id| *id != uid) {
                            out.push(format!("{}: user {u:?} is uid {id} here, not {uid}; the selector never matches here", at("uid")));
                        }
                    }
                }
            }
        }
        out
    }

    fn validate(&self, file: &str) -> Result<(), PolicyError> {
        let bad = |field: String, reason: String| PolicyError::Invalid {
            file: file.to_owned(),
            field,
            reason,
        };
        if self.api_version != API_VERSION {
            return Err(bad(
                "apiVersion".into(),
                format!("must be {API_VERSION:?}, got {:?}", self.api_version),
            ));
        }
        if self.kind != "Policy" {
            return Err(bad(
                "kind".into(),
                format!("must be \"Policy\", got {:?}", self.kind),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.resources.iter().enumerate() {
            let at = |f: &str| format!("resources[{i}]{f}");
            if r.name.trim().is_empty() {
                return Err(bad(at(".name"), "must not be empty".into()));
            }
            if !names.insert(r.name.as_str()) {
                return Err(bad(
                    at(".name"),
                    format!("{:?} is used by an earlier resource", r.name),
                ));
            }
            match r.kind {
                ResourceKind::Database if r.ports.is_empty() => {
                    return Err(bad(
                        at(".ports"),
                        "a database resource needs at least one port".into(),
                    ))
                }
                ResourceKind::Config | ResourceKind::Model if r.paths.is_empty() => {
                    return Err(bad(
                        at(".paths"),
                        "a config or model resource needs at least one path".into(),
                    ))
                }
                _ => {}
            }
            for (j, p) in r.paths.iter().enumerate() {
                let field = at(&format!(".paths[{j}]"));
                if !p.starts_with('/') {
                    return Err(bad(field, format!("must be an absolute path, got {p:?}")));
                }
                if p.len() > MAX_PATH_LEN {
                    return Err(bad(field, format!("is longer than {MAX_PATH_LEN} bytes")));
                }
                if p.split('/').any(|c| c == ".." || c == ".") {
                    return Err(bad(
                        field,
                        format!("must not contain . or .. components, got {p:?}"),
                    ));
                }
            }
            for (j, port) in r.ports.iter().enumerate() {
                if *port == 0 {
                    return Err(bad(
                        at(&format!(".ports[{j}]")),
                        "must be between 1 and 65535".into(),
                    ));
                }
            }
            if r.mode != Mode::Monitor && r.guarded_by().len() > MAX_GUARD_SELECTORS {
                let list = if r.kind == ResourceKind::Database {
                    "clients"
                } else {
                    "writers"
                };
                return Err(bad(
                    at(&format!(".{list}")),
                    format!(
                        "a guarded resource (mode {}) holds at most {MAX_GUARD_SELECTORS} selectors, got {}",
                        r.mode.as_str(),
                        r.guarded_by().len()
                    ),
                ));
            }
            for (list, sels) in [("writers", &r.writers), ("clients", &r.clients)] {
                for (j, s) in sels.iter().enumerate() {
                    if *s == Selector::default() {
                        return Err(bad(
                            at(&format!(".{list}[{j}]")),
                            "an empty selector would match everyone; name at least one field"
                                .into(),
                        ));
                    }
                    if let Some(exe) = &s.exe {
                        if !exe.starts_with('/') {
                            return Err(bad(
                                at(&format!(".{list}[{j}].exe")),
                                format!("must be an absolute path, got {exe:?}"),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: driftwatch.dev/v1
kind: Policy
resources:
  - name: app-config
    kind: config
    paths: ["/etc/myapp/", "/srv/app/settings.yaml"]
    writers:
      - { exe: /usr/bin/ansible-playbook }
      - { user: deploy }
  - name: postgres
    kind: database
    ports: [5432]
    clients: [ { exe: /usr/bin/psql, user: app }, { namespace: payments } ]
    mode: enforce
"#;

    fn err(text: &str) -> String {
        match Policy::parse("p.yaml", text) {
            Ok(_) => panic!("policy should be refused:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn severity_comes_from_the_policy_then_the_kinds() {
        let p = Policy::parse(
            "p.yaml",
            "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - { name: c, kind: config, paths: [/etc/a/] }\n  - { name: m, kind: model, paths: [/m/] }\n  - { name: d, kind: database, ports: [5432], severity: critical }\n",
        )
        .unwrap();
        assert_eq!(severity_of("drift", Some(&p.resources[0])), "medium");
        assert_eq!(severity_of("drift", Some(&p.resources[1])), "high");
        assert_eq!(severity_of("blocked", Some(&p.resources[0])), "high");
        assert_eq!(severity_of("would_block", Some(&p.resources[0])), "medium");
        assert_eq!(severity_of("blocked", Some(&p.resources[2])), "critical");
        assert_eq!(severity_of("blind_spot", None), "medium");
        assert_eq!(severity_of("drift", None), "medium");
        assert!(Policy::parse("p.yaml", "apiVersion: driftwatch.dev/v1\nkind: Policy\nresources:\n  - { name: d, kind: database, ports: [1], severity: urgent }\n").is_err());
    }

    #[test]
    fn selector_text_round_trips_and_refuses_what_it_cannot_read() {
        let s = Selector::parse_text("user=app, exe=/usr/bin/psql,label.app=api,uid=7").unwrap();
        assert_eq!(s.user.as_deref(), Some("app"));
        assert_eq!(s.uid, Some(7));
        assert_eq!(s.labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(Selector::parse_text(&s.to_text()).unwrap(), s);
        for (bad, says) in [
            ("", "empty selector"),
            ("user", "expected field=value"),
            ("uid=x", "not a number"),
            ("exe=psql", "absolute path"),
            ("colour=red", "unknown field"),
            ("user=", "empty value"),
        ] {
            let e = Selector::parse_text(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn shapes_that_would_stall_the_parser_are_refused_first() {
        let deep = format!("resources: {}", "[".repeat(160_000));
        let e = err(&deep);
        assert!(
            e.contains("p.yaml") && e.contains("nested deeper than 64"),
            "{e}"
        );
        let e = err(&format!("resources:\n{}- a: 1\n", " ".repeat(600)));
        assert!(e.contains("line 2: indented 600 columns"), "{e}");
        let e = err(&format!("# {}\n{GOOD}", "x".repeat(MAX_POLICY_BYTES)));
        assert!(e.contains("at most 1048576"), "{e}");
        // Brackets in quotes and comments are text, not nesting.
        let quoted = format!(
            "{GOOD}  - name: odd\n    kind: config\n    paths: [\"/srv/{}/\"]  # {}\n",
            "[".repeat(100),
            "{".repeat(100)
        );
        assert!(Policy::parse("p.yaml", &quoted).is_ok());
        // Aliases that expand to billions of nodes are the YAML library's
        // to refuse, and it does, at once.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let (prev, name) = ((b'a' + i) as char, (b'b' + i) as char);
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        bomb.push_str("resources: *j\n");
        assert!(err(&bomb).contains("p.yaml"));
    }

    #[test]
    fn paths_and_selectors() {
        let p = Policy::parse("p.yaml", GOOD).expect("valid");
        assert_eq!(
            p.resource_for_path("/etc/myapp/a.conf")
                .map(|r| r.name.as_str()),
            Some("app-config")
        );
        assert!(p.resource_for_path("/etc/myapp").is_none());
        assert!(p.resource_for_path("/etc/myappx/a").is_none());
        assert!(p.resource_for_path("/srv/app/settings.yaml").is_some());
        assert!(p.resource_for_path("/srv/app/settings.yaml.bak").is_none());
        let mut proc_ = crate::v1::Process {
            exe: "/usr/bin/psql".into(),
            user: "app".into(),
            ..Default::default()
        };
        let db = p.resource("postgres").expect("postgres");
        assert!(db.clients[0].matches(&proc_));
        proc_.user = "root".into();
        assert!(!db.clients[0].matches(&proc_));
        // No pod namespace known: the namespace selector does not match.
        assert!(!db.clients[1].matches(&proc_));
        proc_.pod_namespace = "payments".into();
        assert!(db.clients[1].matches(&proc_));
    }

    #[test]
    fn parses_the_design_example() {
        let p = Policy::parse("p.yaml", GOOD).expect("valid");
        assert_eq!(p.resources.len(), 2);
        assert_eq!(p.resources[1].ports, [5432]);
        assert_eq!(p.resources[1].mode, Mode::Enforce);
        assert_eq!(p.resources[0].writers[1].user.as_deref(), Some("deploy"));
    }

    #[test]
    fn refusals_name_file_field_and_reason() {
        assert_eq!(
            err(&GOOD.replace("\"/etc/myapp/\"", "\"etc/myapp\"")),
            "p.yaml: resources[0].paths[0]: must be an absolute path, got \"etc/myapp\""
        );
        assert_eq!(
            err(&GOOD.replace("[5432]", "[0]")),
            "p.yaml: resources[1].ports[0]: must be between 1 and 65535"
        );
        assert!(err(&GOOD.replace("[5432]", "[70000]")).starts_with("p.yaml: "));
        assert!(err(&GOOD.replace("driftwatch.dev/v1", "v2")).contains("apiVersion: must be"));
        assert!(
            err(&GOOD.replace("name: postgres", "name: app-config")).contains("resources[1].name")
        );
        assert!(err(&GOOD.replace("kind: database", "kind: databse")).contains("unknown variant"));
        assert!(err(&GOOD.replace("mode: enforce", "mode: block")).contains("p.yaml: "));
        assert!(err(&GOOD.replace("writers:", "writerz:")).contains("unknown field `writerz`"));
        assert!(err("resources: [").starts_with("p.yaml: "));
        assert!(err(&GOOD.replace("{ user: deploy }", "{}")).contains("resources[0].writers[1]"));
        assert!(
            err(&GOOD.replace("/srv/app/settings.yaml", "/srv/../etc/x"))
                .contains("resources[0].paths[1]")
        );
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly() {
        // Nine levels of nine aliases: 9^9 strings if expanded.
        let mut y = String::from(
            "apiVersion: driftwatch.dev/v1\nkind: Policy\na0: &a0 [x, x, x, x, x, x, x, x, x]\n",
        );
        for i in 1..10 {
            let p = i - 1;
            y += &format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            );
        }
        y += "resources: *a9\n";
        let t = std::time::Instant::now();
        let r = Policy::parse("bomb.yaml", &y);
        assert!(r.is_err(), "an alias bomb parsed");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
}
