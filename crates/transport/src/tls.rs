//! TLS for `tls:` and `wss:` listeners (rustls, TLS 1.2 and 1.3).
//!
//! The certificate sits behind a resolver that can be swapped at any time: a reload (SIGHUP or
//! a changed file) serves the new certificate to the next handshake while established
//! connections keep the session they negotiated.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Where the certificate comes from and whether clients must present one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle client certificates are checked against; none: no client certificates.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse clients without a certificate (otherwise one is checked when
    /// offered).
    pub require_client_cert: bool,
}

/// TLS setup failures; each names the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM section.
    #[error("{path}: {reason}")]
    File {
        /// the file
        path: PathBuf,
        /// what is wrong
        reason: String,
    },
    /// rustls refused the certificate/key pair or the client CA.
    #[error("{0}")]
    Rustls(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The live certificate, swapped on reload.
#[derive(Debug)]
pub struct CertStore {
    settings: TlsSettings,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl CertStore {
    fn load(settings: &TlsSettings) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_file_iter(&settings.cert)
            .map_err(|e| file_err(&settings.cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(&settings.cert, e))?;
        if chain.is_empty() {
            return Err(file_err(&settings.cert, "no CERTIFICATE section"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| file_err(&settings.key, e))?;
        CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| file_err(&settings.key, format!("does not fit the certificate: {e}")))
    }

    fn stamps(settings: &TlsSettings) -> (Option<SystemTime>, Option<SystemTime>) {
        let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (m(&settings.cert), m(&settings.key))
    }

    /// Loads the files again and swaps the certificate in. On error the old one stays.
    pub fn reload(&self) -> Result<String, TlsError> {
        let stamps = Self::stamps(&self.settings);
        let key = Self::load(&self.settings)?;
        let fp = key.cert.first().map(|c| fingerprint(c)).unwrap_or_default();
        if let Ok(mut cur) = self.current.write() {
            *cur = Arc::new(key);
        }
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        Ok(fp)
    }

    /// Reloads when either file's modification time changed since the last load; logs the
    /// outcome. Returns whether a new certificate is served.
    pub fn reload_if_changed(&self) -> bool {
        let now = Self::stamps(&self.settings);
        let changed = self.stamps.lock().map(|s| *s != now).unwrap_or(false);
        if !changed {
            return false;
        }
        match self.reload() {
            Ok(fp) => {
                tracing::info!(cert = %self.settings.cert.display(), fingerprint = %fp,
                    "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Remember the stamps so a half-written file is not retried in a loop; the
                // next write changes them again.
                if let Ok(mut s) = self.stamps.lock() {
                    *s = now;
                }
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the old one");
                false
            }
        }
    }

    /// SHA-256 fingerprint of the leaf certificate served now.
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .ok()
            .and_then(|k| k.cert.first().map(|c| fingerprint(c)))
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

/// A ready TLS server configuration and the store its certificate can be reloaded through.
#[derive(Clone)]
pub struct TlsServer {
    /// SIP connections are served with it by [`crate::tls_stream::ServerTlsStream`], other
    /// listeners through [`Self::acceptor`].
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// The certificate store (reload on SIGHUP).
    pub certs: Arc<CertStore>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("cert", &self.certs.settings.cert)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the certificate (and client CA) and builds the server configuration.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let stamps = CertStore::stamps(&settings);
        let key = CertStore::load(&settings)?;
        let certs = Arc::new(CertStore {
            current: RwLock::new(Arc::new(key)),
            stamps: Mutex::new(stamps),
            settings,
        });
        let client_ca = certs.settings.client_ca.clone();
        let require = certs.settings.require_client_cert;
        Self::build(certs, client_ca.as_deref(), require)
    }

    /// The same certificate (reloaded with this one) for another listener, with its own
    /// client CA (or none): the provisioning server, where a client certificate is checked
    /// when offered and never required.
    pub fn for_other_listener(&self, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        Self::build(self.certs.clone(), client_ca, false)
    }

    /// The acceptor, for a listener outside this crate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    fn build(
        certs: Arc<CertStore>,
        client_ca: Option<&Path>,
        require_client_cert: bool,
    ) -> Result<Self, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
                    let c = c.map_err(|e| file_err(ca, e))?;
                    roots.add(c).map_err(|e| file_err(ca, e))?;
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let v = if require_client_cert {
                    v
                } else {
                    v.allow_unauthenticated()
                };
                builder.with_client_cert_verifier(
                    v.build()
                        .map_err(|e| file_err(ca, format!("client CA: {e}")))?,
                )
            }
        };
        let mut config = builder.with_cert_resolver(certs.clone());
        // No TLS 1.3 session tickets: SIP connections are long-lived, so resumption gains
        // little, and some SIP stacks (sipsak 0.9.8, seen here) take the post-handshake ticket
        // records for a failed read and give up. TLS 1.2 session ids stay cached, bounded.
        config.send_tls13_tickets = 0;
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
        Ok(Self {
            config: Arc::new(config),
            certs,
        })
    }
}

/// The system's CA bundle on Debian and derivatives.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS towards other servers (a gateway or proxy reached with `transport=tls` or `sips:`).
/// Their certificate must chain to the system CAs or to the configured extra CA file, and name
/// the IP address dialled (careflow-sip is configured with addresses, not names).
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trusts the system CA bundle (when present) and `extra_ca`.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let system = Path::new(SYSTEM_CA_BUNDLE);
        if system.exists()
            && let Ok(certs) = CertificateDer::pem_file_iter(system)
        {
            roots.add_parsable_certificates(certs.filter_map(Result::ok));
        }
        if let Some(ca) = extra_ca {
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
                let c = c.map_err(|e| file_err(ca, e))?;
                roots.add(c).map_err(|e| file_err(ca, e))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }
}

/// `AA:BB:…` SHA-256 fingerprint of a DER certificate (what `openssl x509 -fingerprint
/// -sha256` prints).
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let mut s = String::with_capacity(95);
    for (i, b) in d.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Makes sure `dir` holds a certificate and key for `domain`, generating a self-signed pair on
/// first use so a default installation can serve TLS. Returns the settings and whether the
/// pair was generated now.
pub fn ensure_self_signed(dir: &Path, domain: &str) -> Result<(TlsSettings, bool), TlsError> {
    let cert = dir.join("tls-selfsigned.crt");
    let key = dir.join("tls-selfsigned.key");
    let settings = TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
        require_client_cert: false,
    };
    if cert.exists() && key.exists() {
        return Ok((settings, false));
    }
    let mut names = vec![domain.to_string()];
    if domain != "localhost" {
        names.push("localhost".into());
    }
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Rustls(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    write_private(&key, generated.key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem()).map_err(|e| file_err(&cert, e))?;
    Ok((settings, true))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| file_err(path, e))?;
    f.write_all(data).map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads_and_reloads_when_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, made) = ensure_self_signed(dir.path(), "sip.example.com").unwrap();
        assert!(made);
        assert!(!ensure_self_signed(dir.path(), "sip.example.com").unwrap().1);
        let server = TlsServer::new(settings.clone()).unwrap();
        let first = server.certs.fingerprint();
        assert_eq!(first.len(), 95);
        assert!(!server.certs.reload_if_changed());

        // A new pair written over the old files is picked up.
        let other = tempfile::tempdir().unwrap();
        let (fresh, _) = ensure_self_signed(other.path(), "sip.example.com").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::copy(&fresh.cert, &settings.cert).unwrap();
        std::fs::copy(&fresh.key, &settings.key).unwrap();
        let now = SystemTime::now();
        for p in [&settings.cert, &settings.key] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(now + std::time::Duration::from_secs(5))
                .unwrap();
        }
        assert!(server.certs.reload_if_changed());
        assert_ne!(server.certs.fingerprint(), first);
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut settings, _) = ensure_self_signed(dir.path(), "x.example").unwrap();
        settings.key = dir.path().join("missing.key");
        let e = TlsServer::new(settings.clone()).unwrap_err().to_string();
        assert!(e.contains("missing.key"), "{e}");
        std::fs::write(dir.path().join("empty.crt"), "nothing here").unwrap();
        settings.cert = dir.path().join("empty.crt");
        let e = TlsServer::new(settings).unwrap_err().to_string();
        assert!(e.contains("empty.crt"), "{e}");
    }
}
