//! Who is calling, and whether they may: every RPC passes through
//! [`AuthLayer`] before its handler runs.
//!
//! A caller is identified by, in this order:
//! - a client certificate signed by the `--client-ca`: its URI SAN
//!   `urn:driftwatch:node:NAME` makes it the agent of node NAME, and
//!   `urn:driftwatch:user:NAME` the person NAME;
//! - `authorization: Bearer T` where T is in the `--tokens` file;
//! - `authorization: Bearer JWT`, an OIDC ID token verified against the
//!   configured issuer, audience and JWKS file.
//!
//! People hold roles (`--roles`): viewer < responder < approver < admin, each
//! with the calls of the ones before it. An agent may only stream its own
//! node's events. A collector with no credential source configured at all is
//! open for reading and streaming, refuses every change, and only listens on
//! loopback.

use std::{collections::HashMap, fmt, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use serde::Deserialize;
use tonic::{
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
    Status,
};

use super::watched::Watched;
use crate::audit::Audit;

/// A URI SAN naming the node an agent's certificate speaks for.
pub const NODE_URI: &str = "urn:driftwatch:node:";
/// A URI SAN naming the person a client certificate belongs to.
pub const USER_URI: &str = "urn:driftwatch:user:";

/// A role a person holds; each includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the timeline, findings, approvals, baselines, agents and audit log.
    Viewer,
    /// Also acknowledges and resolves findings, and files change requests.
    Responder,
    /// Also approves or denies others' change requests.
    Approver,
    /// Also sets desired state (baseline import and scan).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Responder => "responder",
            Role::Approver => "approver",
            Role::Admin => "admin",
        })
    }
}

/// How a person proved who they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// A client certificate.
    Certificate,
    /// A token from the tokens file.
    Token,
    /// An OIDC ID token.
    Oidc,
}

/// The caller of one RPC, put in the request's extensions for its handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The agent of this node.
    Node(String),
    /// A person (or a service acting as one).
    Person {
        /// The principal name that roles, approvals and the audit log use.
        name: String,
        /// Groups from the identity provider.
        groups: Vec<String>,
        /// The credential presented.
        via: Via,
    },
    /// No credential (only on a collector with none configured).
    Anonymous,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node {n:?}"),
            Caller::Person { name, .. } => write!(f, "{name:?}"),
            Caller::Anonymous => f.write_str("an anonymous caller"),
        }
    }
}

impl Caller {
    /// The principal name of a person, for the handlers of changes.
    pub fn principal(&self) -> Result<&str, Status> {
        match self {
            Caller::Person { name, .. } => Ok(name),
            other => Err(Status::unauthenticated(format!(
                "{other} cannot make changes; present a person's token, ID token or certificate"
            ))),
        }
    }
}

/// The caller a handler is serving (set by [`AuthLayer`]).
pub fn caller<T>(r: &tonic::Request<T>) -> Caller {
    r.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Anonymous)
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// An agent's certificate (the node is checked against the hello).
    Agent,
    /// A person with at least this role.
    Role(Role),
    /// Nothing: probes.
    Nothing,
}

/// What each call needs; `None` for a call this collector does not serve.
pub fn need(path: &str) -> Option<Need> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    Some(match (service, method) {
        ("driftwatch.v1.AgentService", "Stream") => Need::Agent,
        ("driftwatch.v1.QueryService", "Timeline" | "Agents" | "Audit") => Need::Role(Role::Viewer),
        ("driftwatch.v1.FindingService", "List" | "Get" | "Watch") => Need::Role(Role::Viewer),
        ("driftwatch.v1.ApprovalService", "List") => Need::Role(Role::Viewer),
        ("driftwatch.v1.BaselineService", "List") => Need::Role(Role::Viewer),
        ("driftwatch.v1.FindingService", "Update") => Need::Role(Role::Responder),
        ("driftwatch.v1.ApprovalService", "Request") => Need::Role(Role::Responder),
        ("driftwatch.v1.ApprovalService", "Decide") => Need::Role(Role::Approver),
        ("driftwatch.v1.BaselineService", "Import" | "Scan") => Need::Role(Role::Admin),
        ("grpc.health.v1.Health", _) => Need::Nothing,
        // The API's shape, for grpcurl and the like: only to those who may read.
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => {
            Need::Role(Role::Viewer)
        }
        _ => return None,
    })
}

/// Tokens and the principals they name: `TOKEN PRINCIPAL` lines.
#[derive(Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// Reads a tokens file (`#` comments and blank lines skipped).
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the tokens file", path.display()))?;
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(principal), None) = (parts.next(), parts.next(), parts.next())
            else {
                anyhow::bail!("{}:{}: expected \"TOKEN PRINCIPAL\"", path.display(), i + 1);
            };
            if tokens
                .insert(token.to_owned(), principal.to_owned())
                .is_some()
            {
                anyhow::bail!("{}:{}: token listed twice", path.display(), i + 1);
            }
        }
        warn_if_readable(path, "tokens file");
        Ok(Self(tokens))
    }

    /// The principal of `token`. Every token is compared in full, so the
    /// time taken does not tell which prefix matched.
    fn principal(&self, token: &str) -> Option<String> {
        let mut found = None;
        for (t, p) in &self.0 {
            if t.len() == token.len()
                && t.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
            {
                found = Some(p.clone());
            }
        }
        found
    }
}

fn warn_if_readable(path: &std::path::Path, what: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the {what} is readable by group or others; chmod 600 it");
        }
    }
}

/// Who holds which role: a YAML mapping of each role to principals and
/// `group:NAME` entries (`*` is every authenticated person).
///
/// ```yaml
/// admin: [alice]
/// approver: [bob, "group:security"]
/// responder: ["group:oncall"]
/// viewer: ["*"]
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    #[serde(default)]
    viewer: Vec<String>,
    #[serde(default)]
    responder: Vec<String>,
    #[serde(default)]
    approver: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

impl Roles {
    /// Reads and checks a roles file.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the roles file", path.display()))?;
        if text.len() > 1 << 20 {
            anyhow::bail!("{}: larger than 1 MiB", path.display());
        }
        driftwatch_proto::policy::check_shape(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let roles: Roles = serde_norway::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (role, who) in roles.each() {
            for w in who {
                if w.is_empty() || w == "group:" || w.chars().any(char::is_control) {
                    anyhow::bail!(
                        "{}: {role}: {w:?} is not a principal or group:NAME",
                        path.display()
                    );
                }
            }
        }
        Ok(roles)
    }

    fn each(&self) -> [(Role, &Vec<String>); 4] {
        [
            (Role::Admin, &self.admin),
            (Role::Approver, &self.approver),
            (Role::Responder, &self.responder),
            (Role::Viewer, &self.viewer),
        ]
    }

    /// The highest role of a person, if any.
    pub fn of(&self, name: &str, groups: &[String]) -> Option<Role> {
        self.each().into_iter().find_map(|(role, who)| {
            who.iter()
                .any(|w| {
                    w == "*"
                        || w == name
                        || w.strip_prefix("group:")
                            .is_some_and(|g| groups.iter().any(|x| x == g))
                })
                .then_some(role)
        })
    }
}

/// OIDC ID tokens: who issues them, for whom, with which keys.
pub struct Oidc {
    /// Expected `iss`.
    pub issuer: String,
    /// Expected `aud`.
    pub audience: String,
    /// The claim that names the person (`email`, `sub`, `preferred_username`).
    pub username_claim: String,
    /// The claim that lists the person's groups.
    pub groups_claim: String,
    /// The issuer's public keys, re-read when the file changes.
    pub jwks: Arc<Watched<jsonwebtoken::jwk::JwkSet>>,
}

/// Reads a JWKS file.
pub fn load_jwks(path: &std::path::Path) -> anyhow::Result<jsonwebtoken::jwk::JwkSet> {
    let text = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the JWKS file", path.display()))?;
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a JWKS (JSON with \"keys\")", path.display()))?;
    if set.keys.is_empty() {
        anyhow::bail!("{}: the JWKS has no keys", path.display());
    }
    Ok(set)
}

impl Oidc {
    fn verify(&self, token: &str) -> Result<Caller, String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
        // Only public-key algorithms: a shared-secret (HS*) token could be
        // forged by anyone who has the public JWKS.
        if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let jwks = self.jwks.get();
        let jwk = match &header.kid {
            Some(kid) => jwks
                .find(kid)
                .ok_or_else(|| format!("no key {kid:?} in the JWKS"))?,
            None if jwks.keys.len() == 1 => &jwks.keys[0],
            None => return Err("no kid, and the JWKS has several keys".into()),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key: {e}"))?;
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = 60;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| e.to_string())?;
        let claims = data.claims;
        let name = claims
            .get(&self.username_claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
            .ok_or_else(|| format!("no usable {:?} claim", self.username_claim))?
            .to_owned();
        let groups = claims
            .get(&self.groups_claim)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Caller::Person {
            name,
            groups,
            via: Via::Oidc,
        })
    }
}

/// The collector's credential sources and role mapping.
#[derive(Default)]
pub struct Auth {
    /// The tokens file, if any.
    pub tokens: Option<Arc<Watched<Tokens>>>,
    /// OIDC ID tokens, if configured.
    pub oidc: Option<Oidc>,
    /// The roles file; without one every authenticated person is admin.
    pub roles: Option<Arc<Watched<Roles>>>,
    /// Client certificates are verified (TLS with a client CA).
    pub client_certs: bool,
}

/// Where a tokens, roles or JWKS file lives, for [`Auth::from_files`].
#[derive(Clone, Debug, Default)]
pub struct AuthFiles {
    /// `--tokens`.
    pub tokens: Option<PathBuf>,
    /// `--roles`.
    pub roles: Option<PathBuf>,
    /// `--oidc-jwks`.
    pub jwks: Option<PathBuf>,
}

impl Auth {
    /// No credential source: the open, loopback-only mode.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && self.oidc.is_none() && !self.client_certs
    }

    /// Identifies the caller of a request.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        if self.client_certs {
            let certs = extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.peer_certs());
            if let Some(leaf) = certs.as_ref().and_then(|c| c.first()) {
                // The TLS layer has verified the chain against the client CA.
                return identity_of(leaf.as_ref()).map_err(Status::unauthenticated);
            }
        }
        let Some(h) = headers.get("authorization") else {
            return Ok(Caller::Anonymous);
        };
        let bearer = h
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer TOKEN\""))?;
        if let Some(name) = self.tokens.as_ref().and_then(|t| t.get().principal(bearer)) {
            return Ok(Caller::Person {
                name,
                groups: Vec::new(),
                via: Via::Token,
            });
        }
        match &self.oidc {
            Some(oidc) if bearer.split('.').count() == 3 => oidc
                .verify(bearer)
                .map_err(|e| Status::unauthenticated(format!("the ID token is refused: {e}"))),
            _ => Err(Status::unauthenticated("the token is not recognised")),
        }
    }

    /// Whether `caller` may make the call at `path`.
    pub fn authorize(&self, caller: &Caller, path: &str) -> Result<(), Status> {
        let call = path.trim_start_matches('/');
        let Some(need) = need(path) else {
            return Err(Status::unimplemented(format!("no call {call}")));
        };
        let open = self.is_open();
        match (need, caller) {
            (Need::Nothing, _) => Ok(()),
            (Need::Agent, Caller::Node(_)) => Ok(()),
            (Need::Agent, Caller::Anonymous) if open => Ok(()),
            (Need::Agent, Caller::Anonymous) => Err(Status::unauthenticated(format!(
                "{call} needs an agent certificate (URI SAN {NODE_URI}NAME) signed by the collector's client CA"
            ))),
            (Need::Agent, Caller::Person { .. }) => Err(Status::permission_denied(format!(
                "{caller} may not call {call}: it needs an agent certificate, not a person's credential"
            ))),
            (Need::Role(_), Caller::Node(_)) => Err(Status::permission_denied(format!(
                "{caller} may not call {call}: an agent certificate only streams its node's events"
            ))),
            (Need::Role(Role::Viewer), Caller::Anonymous) if open => Ok(()),
            (Need::Role(_), Caller::Anonymous) if open => Err(Status::unauthenticated(format!(
                "{call} changes state and needs a principal, but this collector has no credentials configured (--tokens, --client-ca, --oidc-issuer)"
            ))),
            (Need::Role(_), Caller::Anonymous) => Err(Status::unauthenticated(format!(
                "{call} needs a credential: a token (DRIFTWATCH_TOKEN), an ID token or a client certificate"
            ))),
            (Need::Role(want), Caller::Person { name, groups, .. }) => {
                let has = match &self.roles {
                    Some(r) => r.get().of(name, groups),
                    None => Some(Role::Admin),
                };
                match has {
                    Some(h) if h >= want => Ok(()),
                    Some(h) => Err(Status::permission_denied(format!(
                        "{caller} may not call {call}: it needs the {want} role, and {name:?} is {h}"
                    ))),
                    None => Err(Status::permission_denied(format!(
                        "{caller} may not call {call}: it needs the {want} role, and {name:?} has no role"
                    ))),
                }
            }
        }
    }
}

/// The caller a client certificate names.
pub fn identity_of(der: &[u8]) -> Result<Caller, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let mut found = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::URI(uri) = n {
                let caller = if let Some(node) = uri.strip_prefix(NODE_URI) {
                    Caller::Node(node.to_owned())
                } else if let Some(user) = uri.strip_prefix(USER_URI) {
                    Caller::Person {
                        name: user.to_owned(),
                        groups: Vec::new(),
                        via: Via::Certificate,
                    }
                } else {
                    continue;
                };
                if found.is_some() {
                    return Err(
                        "the client certificate names more than one driftwatch identity".into(),
                    );
                }
                found = Some(caller);
            }
        }
    }
    let subject = cert.subject().to_string();
    let caller = found.ok_or_else(|| {
        format!(
            "the client certificate ({subject}) has no URI SAN {NODE_URI}NAME or {USER_URI}NAME"
        )
    })?;
    match &caller {
        Caller::Node(n) | Caller::Person { name: n, .. }
            if n.is_empty() || n.len() > 253 || n.chars().any(|c| c.is_control() || c == '/') =>
        {
            Err(format!(
                "the client certificate names an invalid identity {n:?}"
            ))
        }
        _ => Ok(caller),
    }
}

/// Authenticates and authorizes every call before its handler runs;
/// refused changes are written to the audit log.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
    audit: Option<Arc<Audit>>,
}

impl AuthLayer {
    /// A layer checking calls against `auth`, recording refused changes in
    /// `audit`.
    pub fn new(auth: Arc<Auth>, audit: Option<Arc<Audit>>) -> Self {
        Self { auth, audit }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authorized<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorized {
            inner,
            auth: self.auth.clone(),
            audit: self.audit.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct Authorized<S> {
    inner: S,
    auth: Arc<Auth>,
    audit: Option<Arc<Audit>>,
}

impl<S> Authorized<S> {
    /// Records a refused change (not refused reads: those are only logged).
    fn audit_refusal(&self, path: &str, who: String, status: &Status) {
        let (Some(audit), Some(Need::Role(role))) = (&self.audit, need(path)) else {
            return;
        };
        if role == Role::Viewer {
            return;
        }
        let audit = audit.clone();
        let call = path
            .trim_start_matches('/')
            .trim_start_matches("driftwatch.v1.")
            .to_owned();
        let outcome = format!("{:?}: {}", status.code(), status.message());
        // The record is flushed to disk: not on the runtime's threads.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = audit.record(&who, &call, serde_json::json!({}), &outcome) {
                tracing::error!(%call, "the audit log could not record a refusal: {e}");
            }
        });
    }
}

impl<S, B> tower::Service<http::Request<B>> for Authorized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let mut who = "unauthenticated".to_owned();
        let checked = self
            .auth
            .authenticate(req.headers(), req.extensions())
            .and_then(|caller| {
                who = match &caller {
                    Caller::Person { name, .. } => name.clone(),
                    Caller::Node(n) => format!("node {n}"),
                    Caller::Anonymous => "anonymous".into(),
                };
                self.auth.authorize(&caller, &path).map(|()| caller)
            });
        match checked {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => {
                self.audit_refusal(&path, who, &status);
                if status.code() == tonic::Code::PermissionDenied {
                    tracing::warn!(call = %path, "refused: {}", status.message());
                } else {
                    tracing::info!(call = %path, "refused: {}", status.message());
                }
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
