//! Which TLS certificates citadel trusts (control plane and DERP alike), and TLS failures as
//! errors a user can act on.
//!
//! Trusted roots: the webpki (Mozilla) roots, the platform's roots (on Unix the OpenSSL
//! locations, replaced by `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as Go and OpenSSL do),
//! and every CA file added with [`add_ca_file`] (`--ca-file`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, CertificateError, ClientConfig, RootCertStore};

/// A TLS failure, worded for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A CA file given with `--ca-file` cannot be used.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The server's certificate chain does not lead to a trusted root.
    #[error(
        "the TLS certificate of {host} is not trusted ({detail}); if it is issued by your own CA, \
         pass --ca-file CA.pem or set SSL_CERT_FILE=CA.pem"
    )]
    Untrusted {
        /// The host name dialled.
        host: String,
        /// What the TLS library reported.
        detail: String,
    },
    /// The certificate is valid, but for another name.
    #[error(
        "the TLS certificate of {host} is not valid for the name {host:?} ({detail}); use the host \
         name the certificate was issued for"
    )]
    WrongHost {
        /// The host name dialled.
        host: String,
        /// What the TLS library reported.
        detail: String,
    },
    /// Any other handshake failure (protocol mismatch, connection dropped).
    #[error("TLS handshake with {host} failed: {detail}")]
    Handshake {
        /// The host name dialled.
        host: String,
        /// What the TLS library reported.
        detail: String,
    },
    /// The host is neither a DNS name nor an IP address.
    #[error("{0:?} is not a valid TLS server name")]
    BadName(String),
    /// The client configuration could not be built.
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

struct Trust {
    extra: Vec<CertificateDer<'static>>,
    config: Option<Arc<ClientConfig>>,
}

static TRUST: Mutex<Trust> = Mutex::new(Trust { extra: Vec::new(), config: None });

/// Reads every certificate of a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::CaFile { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Trusts the CA certificates in the PEM file `path` too, from the next connection on.
/// Returns how many certificates it held.
pub fn add_ca_file(path: &Path) -> Result<usize, TlsError> {
    let certs = read_pem_certs(path)?;
    let mut roots = RootCertStore::empty();
    let (ok, _) = roots.add_parsable_certificates(certs.iter().cloned());
    if ok == 0 {
        return Err(TlsError::CaFile { path: path.to_path_buf(), reason: "no usable CA certificate".into() });
    }
    let mut t = TRUST.lock().unwrap_or_else(|p| p.into_inner());
    t.extra.extend(certs);
    t.config = None;
    Ok(ok)
}

fn build(extra: &[CertificateDer<'static>]) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        // An unreadable SSL_CERT_FILE is worth knowing about; a missing system store is not.
        tracing::warn!("loading platform CA certificates: {e}");
    }
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The shared client configuration (built once; rebuilt after [`add_ca_file`]).
pub fn client_config() -> Result<Arc<ClientConfig>, TlsError> {
    let mut t = TRUST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = &t.config {
        return Ok(c.clone());
    }
    let c = Arc::new(build(&t.extra)?);
    t.config = Some(c.clone());
    Ok(c)
}

/// The rustls name for `host` (a DNS name or an IP literal, brackets allowed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_string()).map_err(|_| TlsError::BadName(host.to_string()))
}

/// Runs the TLS handshake over `io` with `config`, checking the certificate against `host`.
pub async fn connect_with<S: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    io: S,
    host: &str,
) -> Result<TlsStream<S>, TlsError> {
    let name = server_name(host)?;
    tokio_rustls::TlsConnector::from(config).connect(name, io).await.map_err(|e| classify(host, &e))
}

/// Runs the TLS handshake over `io` with the shared trust, checking the certificate against
/// `host`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(io: S, host: &str) -> Result<TlsStream<S>, TlsError> {
    connect_with(client_config()?, io, host).await
}

/// Sorts a failed handshake into the error a user can act on.
pub fn classify(host: &str, e: &std::io::Error) -> TlsError {
    let host = host.to_string();
    let detail = e.to_string();
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsError::WrongHost { host, detail }
            }
            _ => TlsError::Untrusted { host, detail },
        },
        _ => TlsError::Handshake { host, detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = add_ca_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = add_ca_file(&junk).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn handshake_errors_are_sorted_by_what_to_do() {
        let io = |c: CertificateError| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::InvalidCertificate(c))
        };
        let e = classify("nexus.example", &io(CertificateError::UnknownIssuer));
        assert!(matches!(e, TlsError::Untrusted { .. }));
        let text = e.to_string();
        assert!(
            text.contains("nexus.example") && text.contains("--ca-file") && text.contains("SSL_CERT_FILE"),
            "{text}"
        );
        let e = classify("nexus.example", &io(CertificateError::NotValidForName));
        assert!(matches!(e, TlsError::WrongHost { .. }), "{e}");
        let e = classify("nexus.example", &std::io::Error::other("reset"));
        assert!(matches!(e, TlsError::Handshake { .. }), "{e}");
        assert!(server_name("[::1]").is_ok() && server_name("bad name!").is_err());
    }
}
