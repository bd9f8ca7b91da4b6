//! Which TLS certificates citadel trusts (control plane and DERP alike), and TLS failures as
//! errors a user can act on.
//!
//! Trusted roots: the webpki (Mozilla) roots, the platform's roots (on Unix the OpenSSL
//! locations, replaced by `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as Go and OpenSSL do),
//! and every CA file added with [`add_ca_file`] (`--ca-file`). The platform's store is read
//! only when the others do not verify a chain (`StagedVerifier`).

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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // First the roots at hand: webpki's (compiled in), `--ca-file`s and `SSL_CERT_FILE`.
    let mut first = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    first.add_parsable_certificates(extra.iter().cloned());
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        // Unreadable: the platform load below reports it, when it runs.
        first.add_parsable_certificates(read_pem_certs(Path::new(&f)).unwrap_or_default());
    }
    // Then all of them: those and the platform's (which reads `SSL_CERT_FILE` again, if set).
    let at_hand = first.clone();
    let verifier = StagedVerifier::new(first, provider.clone(), move || {
        let mut all = at_hand.clone();
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            // An unreadable SSL_CERT_FILE is worth knowing about; a missing system store is not.
            tracing::warn!("loading platform CA certificates: {e}");
        }
        all.add_parsable_certificates(native.certs);
        all
    })?;
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Checks a server's chain against the roots at hand first, and against every trusted root
/// (the platform's too) only when that fails. The platform's roots are read at that first
/// miss, once per process: reading them took 1-4 ms of every start here
/// (a PEM bundle of ~150 certificates, and with `SSL_CERT_DIR` every file of the directory:
/// 3.8 ms of an 11.8 ms `citadel init`), although a Nexus with a public certificate (the
/// webpki roots) or a private CA given by file never needs them. A chain verifies against a
/// union of root sets exactly when it verifies against one of them (a path ends at one
/// anchor), so what is trusted is the same as with one store of all of them. Written by hand:
/// rustls's own verifier takes one fixed store.
struct StagedVerifier {
    first: Arc<rustls::client::WebPkiServerVerifier>,
    all: std::sync::OnceLock<Result<Arc<rustls::client::WebPkiServerVerifier>, String>>,
    load_all: Box<dyn Fn() -> RootCertStore + Send + Sync>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for StagedVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedVerifier").field("platform_roots_loaded", &self.all.get().is_some()).finish()
    }
}

impl StagedVerifier {
    fn new(
        first: RootCertStore,
        provider: Arc<rustls::crypto::CryptoProvider>,
        load_all: impl Fn() -> RootCertStore + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let first = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(first), provider.clone())
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        Ok(StagedVerifier { first, all: std::sync::OnceLock::new(), load_all: Box::new(load_all), provider })
    }

    fn all(&self) -> Result<&Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        self.all
            .get_or_init(|| {
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new((self.load_all)()),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| rustls::Error::General(format!("loading the trusted roots: {e}")))
    }
}

impl rustls::client::danger::ServerCertVerifier for StagedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        // Any failure gets the second look, not only an unknown issuer: a CA at hand can share
        // its name with the one that issued the chain (a test CA minted again under the same
        // name), which fails as a bad signature, where one store of all roots would try both.
        let e1 = match self.first.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let e2 = match self.all()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // Both failed: the error one store of all roots gives. The first look's, unless it
        // only missed the issuer (which the second look knows better about); a wrong name is
        // found after the chain was trusted, so it stays what the user is told.
        match e1 {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
                Err(e2)
            }
            e1 => Err(e1),
        }
    }

    // Signatures do not depend on the roots: both verifiers check them alike.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.first.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.first.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.first.supported_verify_schemes()
    }
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

    /// A CA and a certificate it issued for `localhost`.
    fn ca_and_leaf() -> (CertificateDer<'static>, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let leaf = leaf.signed_by(&KeyPair::generate().unwrap(), &issuer).unwrap();
        (ca_cert.der().clone(), leaf.der().clone())
    }

    /// The platform's roots are read only when the roots at hand do not verify a chain, once;
    /// what verifies is what one store of all of them would verify, even where two CAs share a
    /// name (rcgen's default one here).
    #[test]
    fn platform_roots_are_read_only_when_the_roots_at_hand_miss() {
        use rustls::client::danger::ServerCertVerifier;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ((ca_a, leaf_a), (ca_b, leaf_b), (_, leaf_c)) = (ca_and_leaf(), ca_and_leaf(), ca_and_leaf());
        let loads = Arc::new(AtomicUsize::new(0));
        // At hand: CA a. The "platform": CA b.
        let mut first = RootCertStore::empty();
        first.add(ca_a.clone()).unwrap();
        let (l, b) = (loads.clone(), ca_b.clone());
        let v = StagedVerifier::new(first, provider.clone(), move || {
            l.fetch_add(1, Ordering::SeqCst);
            let mut all = RootCertStore::empty();
            all.add(b.clone()).unwrap();
            all
        })
        .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let check = |leaf: &CertificateDer<'_>| v.verify_server_cert(leaf, &[], &name, &[], now);
        assert!(check(&leaf_a).is_ok());
        assert_eq!(loads.load(Ordering::SeqCst), 0, "a chain the roots at hand know read the platform's");
        assert!(check(&leaf_b).is_ok(), "the platform's CA is trusted");
        assert!(check(&leaf_b).is_ok() && check(&leaf_a).is_ok());
        assert_eq!(loads.load(Ordering::SeqCst), 1, "the platform's roots are read once");
        // Issued by a third CA under the same name as a and b: not trusted.
        assert!(matches!(check(&leaf_c), Err(rustls::Error::InvalidCertificate(_))));
        // A known issuer, the wrong name: refused as that, for the message it gets.
        let other = ServerName::try_from("nexus.example").unwrap();
        assert!(matches!(
            v.verify_server_cert(&leaf_a, &[], &other, &[], now),
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }))
        ));
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
