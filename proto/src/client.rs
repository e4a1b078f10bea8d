//! Connecting to a collector, for the agent and the CLI: `https://` is TLS
//! with the collector's CA and, when given, a client certificate;
//! `http://` is plaintext, which the caller must have asked for and logs.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// TLS material for a connection.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA certificate(s) (PEM) that signed the collector's certificate.
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// The key of `cert` (PEM).
    pub key: Option<PathBuf>,
}

/// An endpoint for `url`, and whether it is plaintext. The files are read
/// now, so a certificate rotated on disk is used from the next connection.
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<(Endpoint, bool), String> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| format!("collector URL {url:?}: {e}"))?;
    let scheme = endpoint.uri().scheme_str().unwrap_or("");
    match scheme {
        "http" => {
            if tls.cert.is_some() {
                return Err(format!(
                    "{url} is plaintext but a client certificate was given; use https://"
                ));
            }
            Ok((endpoint, true))
        }
        "https" => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p)
                    .map_err(|e| format!("{}: cannot read the {what}: {e}", p.display()))
            };
            let ca = tls.ca.as_ref().ok_or_else(|| {
                format!(
                    "{url}: https needs the CA that signed the collector's certificate (--ca FILE)"
                )
            })?;
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => {
                    config = config.identity(Identity::from_pem(
                        read(c, "client certificate")?,
                        read(k, "client key")?,
                    ));
                }
                (None, None) => {}
                _ => return Err("a client certificate needs both --cert and --key".into()),
            }
            let endpoint = endpoint
                .tls_config(config)
                .map_err(|e| format!("TLS settings for {url}: {e}"))?;
            Ok((endpoint, false))
        }
        other => Err(format!(
            "collector URL {url:?}: scheme {other:?} is neither https (TLS) nor http (plaintext)"
        )),
    }
}

/// An error with its causes: a refused certificate or a TLS failure is
/// several layers below "transport error".
///
/// A cause that says what the one before it said (`tcp connect error:
/// tcp connect error`) is given once, and the bare `transport error` that
/// wraps everything is left out when a cause follows.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        cur = c.source();
    }
    if parts.len() > 1 && parts[0] == "transport error" {
        parts.remove(0);
    }
    parts.join(": ")
}
