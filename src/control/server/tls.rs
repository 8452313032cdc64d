//! TLS on the control port: a certificate from files (`--tls-cert/--tls-key`,
//! reloaded when they change) or from an ACME CA (`--acme-domain`, TLS-ALPN-01 on this same port).
//!
//! TLS only wraps the byte stream: the HTTP head, the control protocol's
//! Noise channel and the relay run inside it unchanged, so the server's
//! dispatch code never knows whether a connection was TLS.
//!
//! ACME uses `rustls-acme`: it answers TLS-ALPN-01 challenges from the same
//! certificate resolver that serves normal connections, so no second port
//! (HTTP-01 on 80) has to be opened, and it renews when two thirds of a
//! certificate's lifetime have passed. Its account key and certificates
//! (with their private key) live in `STATE_DIR/acme`, 0700, files 0600.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::control::upgrade::Stream;

/// Where the control port's certificate comes from.
/// Where the listener's certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// PEM files, reloaded when they change.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Obtained and renewed with ACME (TLS-ALPN-01).
    Acme(AcmeOptions),
}

/// How to obtain a certificate with ACME.
#[derive(Clone, Debug)]
pub struct AcmeOptions {
    /// The one name on the certificate.
    pub domain: String,
    /// Contact address given to the ACME server.
    pub email: Option<String>,
    /// ACME directory URL (Let's Encrypt production by default).
    pub directory: String,
    /// PEM CA certificate(s) to trust for the ACME directory itself instead
    /// of the system roots (a private or test CA such as pebble).
    pub directory_ca: Option<PathBuf>,
}

/// Let's Encrypt's production ACME directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
const ACME_ALPN: &[u8] = b"acme-tls/1";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS side of the listener.
#[derive(Clone)]
pub(crate) struct TlsAcceptor {
    config: Arc<ServerConfig>,
}

impl TlsAcceptor {
    /// Builds the acceptor; for ACME also starts the task that orders and
    /// renews certificates (it ends when `shutdown` fires).
    pub(crate) fn start(source: &TlsSource, state_dir: &Path, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<TlsAcceptor> {
        let config = match source {
            TlsSource::Files { cert, key } => files_config(cert, key, shutdown)?,
            TlsSource::Acme(a) => acme_config(a, state_dir, shutdown)?,
        };
        Ok(TlsAcceptor { config })
    }

    /// The TLS handshake on an accepted connection. `Ok(None)`: it was an
    /// ACME validation connection, already answered.
    pub(crate) async fn accept<S: Stream>(&self, s: S) -> std::io::Result<Option<Box<dyn Stream>>> {
        let tls = tokio_rustls::TlsAcceptor::from(self.config.clone()).accept(s).await?;
        if tls.get_ref().1.alpn_protocol() == Some(ACME_ALPN) {
            return Ok(None);
        }
        Ok(Some(Box::new(tls)))
    }
}

/// How often certificate files are checked for changes (certbot and
/// similar tools replace them in place before they expire).
const FILE_POLL: std::time::Duration = std::time::Duration::from_secs(5);

fn load_files(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--tls-cert: reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--tls-cert {}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert {}: no certificate in it (expected PEM `BEGIN CERTIFICATE` blocks)", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key {}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)", key.display()))?;
    let ck = CertifiedKey::from_der(chain, key, &provider())
        .context("--tls-cert/--tls-key: the key does not match the certificate, or rustls cannot use them")?;
    Ok(Arc::new(ck))
}

/// The certificate from `--tls-cert/--tls-key`, replaced when the files change.
#[derive(Debug)]
struct FileCert {
    current: std::sync::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Nothing panics while the lock is held; recover rather than fail.
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn files_config(cert: &Path, key: &Path, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<Arc<ServerConfig>> {
    let resolver = Arc::new(FileCert { current: std::sync::RwLock::new(load_files(cert, key)?) });
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    let (cert2, key2) = (cert.clone(), key.clone());
    let stamp = move || {
        let m = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
        (m(&cert), m(&key))
    };
    tokio::spawn(async move {
        let mut last = stamp();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(FILE_POLL) => {}
            }
            let now = stamp();
            if now == last {
                continue;
            }
            // A half-written pair fails to load; the next poll tries again.
            match load_files(&cert2, &key2) {
                Ok(ck) => {
                    *resolver.current.write().unwrap_or_else(|e| e.into_inner()) = ck;
                    last = now;
                    tracing::info!("TLS certificate reloaded from {}", cert2.display());
                }
                Err(e) => tracing::warn!("TLS certificate files changed but do not load ({e:#}); still serving the previous one"),
            }
        }
    });
    Ok(Arc::new(cfg))
}

fn acme_config(a: &AcmeOptions, state_dir: &Path, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<Arc<ServerConfig>> {
    let cache_dir = state_dir.join("acme");
    crate::daemon::config::ensure_private_dir(&cache_dir)?;
    // The ACME directory's own HTTPS: the system roots, or a given CA.
    let roots = match &a.directory_ca {
        Some(ca) => {
            let pem = std::fs::read_to_string(ca).with_context(|| format!("--acme-ca: reading {}", ca.display()))?;
            crate::control::transport::parse_ca(&pem).map_err(|e| anyhow::anyhow!("--acme-ca {}: {e}", ca.display()))?
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            roots
        }
    };
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut cfg = rustls_acme::AcmeConfig::new_with_client_config([a.domain.clone()], Arc::new(client))
        .directory(&a.directory)
        .cache(rustls_acme::caches::DirCache::new(cache_dir.clone()));
    if let Some(e) = &a.email {
        cfg = cfg.contact_push(format!("mailto:{e}"));
    }
    let mut state = cfg.state();
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(state.resolver());
    // http/1.1 first: a browser offering both gets HTTP; the CA's validator
    // offers only acme-tls/1 and gets the challenge certificate.
    server.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_ALPN.to_vec()];
    let domain = a.domain.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.changed() => return,
                ev = state.next() => ev,
            };
            match ev {
                Some(Ok(ok)) => {
                    tracing::info!("acme {domain}: {ok:?}");
                    // rustls-acme writes with the umask's mode; the cert
                    // file holds the private key.
                    tighten(&cache_dir);
                }
                Some(Err(e)) => tracing::error!("acme {domain}: {e} (retrying with backoff)"),
                None => return,
            }
        }
    });
    Ok(Arc::new(server))
}

fn tighten(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if let Err(err) = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600)) {
            tracing::error!("acme: cannot make {} private: {err}", e.path().display());
        }
    }
}

/// `tailgate control` flags for TLS (flattened into the serve flags).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve the control port over TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key", conflicts_with = "acme_domain")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Get and renew a certificate for this name from an ACME CA (TLS-ALPN-01
    /// on the control port, which must be reachable on 443 by that name).
    #[arg(long, value_name = "NAME")]
    pub(crate) acme_domain: Option<String>,
    /// Contact address given to the ACME CA.
    #[arg(long, value_name = "EMAIL", requires = "acme_domain")]
    pub(crate) acme_email: Option<String>,
    /// ACME directory URL [default: Let's Encrypt].
    #[arg(long, value_name = "URL", requires = "acme_domain")]
    pub(crate) acme_directory: Option<String>,
    /// PEM CA certificate to trust for the ACME directory's own HTTPS (a private or test CA).
    #[arg(long, value_name = "FILE", requires = "acme_domain")]
    pub(crate) acme_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub(crate) fn any_set(&self) -> bool {
        self.tls_cert.is_some() || self.acme_domain.is_some()
    }

    pub(crate) fn source(&self) -> Option<TlsSource> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            return Some(TlsSource::Files { cert: cert.clone(), key: key.clone() });
        }
        self.acme_domain.as_ref().map(|d| {
            TlsSource::Acme(AcmeOptions {
                domain: d.clone(),
                email: self.acme_email.clone(),
                directory: self.acme_directory.clone().unwrap_or_else(|| LETS_ENCRYPT.into()),
                directory_ca: self.acme_ca.clone(),
            })
        })
    }
}
