//! The collector's TLS: its certificate and key, and the CA that signs
//! agents' and people's client certificates, re-read when the files change.
//! Handshakes run off the accept loop, each bounded in time, so a client that
//! stalls mid-handshake holds nothing but its own task.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

use super::watched::Watched;

/// Where the collector's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates; without it no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Reads PEM certificates, naming the file when it holds none.
pub fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{}: cannot read certificates", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in the file", path.display());
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from the files as they are now.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("{}: cannot read a PEM private key", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            // A client without a certificate may still present a token or an
            // ID token; which calls it may make is decided per call.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("{}: client CA", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "{} and {} do not make a usable certificate and key",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The server configuration, re-read when any of its files changes.
pub fn watch(files: TlsFiles) -> anyhow::Result<Arc<Watched<ServerConfig>>> {
    let mut paths = vec![files.cert.clone(), files.key.clone()];
    paths.extend(files.client_ca.clone());
    Watched::start("TLS certificate", paths, move || server_config(&files))
}

/// Most handshakes in progress at once; beyond it new connections wait in
/// the kernel's backlog.
const HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and hands over those whose TLS handshake
/// completes, each with the configuration in force when it arrived.
pub fn incoming(
    listener: TcpListener,
    config: Arc<Watched<ServerConfig>>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, not spin.
                        tracing::warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Without TCP_NODELAY a short answer can wait for a delayed ACK.
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.get());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS handshake not finished in time; dropped"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
