//! TLS identities for nexus-sim: an operator's certificate and key (`serve --tls-cert
//! --tls-key`), and a test CA with a server certificate minted by rcgen, so tests and demos
//! need no openssl.

use anyhow::{anyhow, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA and one server certificate it issued, all PEM.
#[derive(Clone)]
pub struct TestPki {
    /// The CA certificate (what clients trust: `SSL_CERT_FILE`, `--ca-file`).
    pub ca_pem: String,
    /// The CA's private key (to issue more certificates, e.g. an impostor's under another CA).
    pub ca_key_pem: String,
    /// The server certificate.
    pub cert_pem: String,
    /// The server certificate's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for TestPki {
    // By hand so the private keys are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("ca_pem", &self.ca_pem).finish_non_exhaustive()
    }
}

fn san(name: &str) -> Result<SanType> {
    let n = name.trim_start_matches('[').trim_end_matches(']');
    Ok(match n.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(n.to_string().try_into().map_err(|e| anyhow!("name {n:?}: {e}"))?),
    })
}

/// Mints a fresh CA and a server certificate for `names` (DNS names or IP literals).
pub fn mint(names: &[String]) -> Result<TestPki> {
    if names.is_empty() {
        return Err(anyhow!("a server certificate needs at least one name"));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "nexus-sim test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, names[0].clone());
    leaf.subject_alt_names = names.iter().map(|n| san(n)).collect::<Result<_>>()?;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(TestPki {
        ca_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl TestPki {
    /// Writes `ca.pem`, `cert.pem` and `key.pem` (keys 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text, secret) in
            [("ca.pem", &self.ca_pem, false), ("cert.pem", &self.cert_pem, false), ("key.pem", &self.key_pem, true)]
        {
            let path = dir.join(name);
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            if secret {
                std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            }
            let _ = secret;
            let mut f = o.open(&path).with_context(|| format!("writing {}", path.display()))?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
        }
        Ok(())
    }

    /// The server configuration for this certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        server_config_from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

fn server_config_from_pem(cert: &[u8], key: &[u8]) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>().map_err(|e| anyhow!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err(anyhow!("the certificate file holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| anyhow!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow!("certificate and key do not fit together: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The admin subcommands' client trust, as citadel's: the webpki roots and the platform's
/// (replaced by `SSL_CERT_FILE` / `SSL_CERT_DIR` when set), so one variable serves both.
pub fn client_config() -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!("loading platform CA certificates: {e}");
    }
    roots.add_parsable_certificates(native.certs);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Loads a PEM certificate chain and private key (`serve --tls-cert FILE --tls-key FILE`).
pub fn load(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let c = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let k = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    server_config_from_pem(&c, &k).with_context(|| format!("TLS identity {} / {}", cert.display(), key.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_certificates_load_and_keys_stay_private() {
        let pki = mint(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        assert!(pki.ca_pem.contains("BEGIN CERTIFICATE") && pki.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{pki:?}").contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().unwrap();
        pki.write(dir.path()).unwrap();
        load(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        let e = load(&dir.path().join("ca.pem"), &dir.path().join("ca.pem")).unwrap_err();
        assert!(format!("{e:#}").contains("private key"), "{e:#}");
        assert!(mint(&[]).is_err());
    }
}
