//! `driftwatch-collector certs`: a CA and the certificates of a first
//! install, the demo and the tests. Production installs may use their own CA
//! or cert-manager instead; what matters to the collector is the URI SAN
//! (`urn:driftwatch:node:NAME`, `urn:driftwatch:user:NAME`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::auth::{NODE_URI, USER_URI};

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// The collector's serving certificate (names are DNS names or IPs).
    Server,
    /// An agent: may stream the events of the node it names.
    Node,
    /// A person, for the CLI.
    User,
}

/// The CA's files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

/// The files of a certificate named `name` of kind `kind` in `dir`.
pub fn cert_paths(dir: &Path, kind: Kind, name: &str) -> (PathBuf, PathBuf) {
    let stem = match kind {
        Kind::Server => "server".to_owned(),
        Kind::Node => format!("node-{name}"),
        Kind::User => format!("user-{name}"),
    };
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// The (year, month, day) `days` from now.
fn end_date(days: u32) -> anyhow::Result<(i32, u8, u8)> {
    let end = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(i64::from(days) * 24))
        .context("validity too long")?;
    let end = jiff::tz::Offset::UTC.to_datetime(end).date();
    Ok((i32::from(end.year()), end.month() as u8, end.day() as u8))
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// collector watching the file never reads half of it.
fn write_atomic(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("pem.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))
}

/// Makes a CA in `dir` and a server certificate for `server_names`.
pub fn init(dir: &Path, server_names: &[String], days: u32) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (ca_cert, ca_key) = ca_paths(dir);
    if ca_key.exists() {
        anyhow::bail!(
            "{} exists: this directory already has a CA (issue certificates with `certs issue`, or choose another --dir)",
            ca_key.display()
        );
    }
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Driftwatch CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let (y, m, d) = end_date(days.max(365) * 10)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_atomic(&ca_key, &key.serialize_pem(), true)?;
    write_atomic(&ca_cert, &cert.pem(), false)?;
    let mut written = vec![ca_cert, ca_key];
    written.extend(issue(dir, Kind::Server, server_names, days)?);
    Ok(written)
}

/// Issues a certificate of `kind` for `names` (the first is the identity of
/// a node or user; a server takes them all as DNS names or IPs), signed by
/// the CA in `dir`. An existing certificate of the same name is replaced:
/// that is how it is rotated.
pub fn issue(dir: &Path, kind: Kind, names: &[String], days: u32) -> anyhow::Result<Vec<PathBuf>> {
    let Some(first) = names.first() else {
        anyhow::bail!("name the certificate's subject");
    };
    for n in names {
        if n.is_empty()
            || n.len() > 253
            || n.chars().any(|c| c.is_control() || c == '/' || c == ' ')
        {
            anyhow::bail!(
                "{n:?} is not a usable name (1-253 bytes, no spaces, control characters or '/')"
            );
        }
    }
    let (ca_cert, ca_key) = ca_paths(dir);
    let ca_key_pem = std::fs::read_to_string(&ca_key).with_context(|| {
        format!(
            "{}: cannot read the CA key (run `certs init` first)",
            ca_key.display()
        )
    })?;
    let ca_pem = std::fs::read_to_string(&ca_cert)
        .with_context(|| format!("{}: cannot read the CA certificate", ca_cert.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{}: not a PEM private key", ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{}: not a CA certificate", ca_cert.display()))?;

    let mut params = match kind {
        Kind::Server => CertificateParams::new(names.to_vec()),
        Kind::Node | Kind::User => CertificateParams::new(Vec::<String>::new()),
    }
    .context("certificate parameters")?;
    params
        .distinguished_name
        .push(DnType::CommonName, first.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let (y, m, d) = end_date(days)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.use_authority_key_identifier_extension = true;
    match kind {
        Kind::Server => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Kind::Node | Kind::User => {
            let prefix = if kind == Kind::Node {
                NODE_URI
            } else {
                USER_URI
            };
            let uri = format!("{prefix}{first}")
                .try_into()
                .map_err(|e| anyhow::anyhow!("{first:?} cannot be put in a URI: {e}"))?;
            params.subject_alt_names.push(SanType::URI(uri));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params.signed_by(&key, &issuer).context("signing")?;
    let (cert_path, key_path) = cert_paths(dir, kind, first);
    // The key first: a watcher that sees the new certificate finds its key.
    write_atomic(&key_path, &key.serialize_pem(), true)?;
    write_atomic(&cert_path, &cert.pem(), false)?;
    Ok(vec![cert_path, key_path])
}
