//! How a node reaches the control port: one dialer for the control client
//! and the relay client, so both get the same URL rules, timeouts and TLS.
//!
//! `http://` is plain TCP (the Noise IK channel inside is what protects the
//! control protocol and relay frames). `https://` adds TLS around it,
//! verified against the system roots or, when the node was given one, a
//! pinned CA certificate. The Noise server key is pinned either way, so TLS
//! is an extra layer that lets the port sit behind an ordinary certificate
//! on 443, not a replacement for the pin.

#![warn(missing_docs)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::upgrade::Stream;

/// Why a control URL is not usable; the text says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UrlError {
    #[error("control URL {0:?} must start with http:// or https://")]
    Scheme(String),
    #[error("control URL {0:?} must not have a path")]
    Path(String),
    #[error("bad port in {0:?}")]
    Port(String),
    #[error("control URL {0:?} has no host")]
    NoHost(String),
}

/// A control URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ControlUrl {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl ControlUrl {
    pub(crate) fn parse(url: &str) -> Result<ControlUrl, UrlError> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(UrlError::Scheme(url.into()));
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.contains('/') {
            return Err(UrlError::Path(url.into()));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
                (h.to_string(), p.parse::<u16>().map_err(|_| UrlError::Port(url.into()))?)
            }
            _ => (hostport.to_string(), default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(UrlError::NoHost(url.into()));
        }
        Ok(ControlUrl { tls, host, port })
    }

    /// The `Host` header value.
    pub(crate) fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default_port { host } else { format!("{host}:{}", self.port) }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    #[error(
        "TLS with {url} failed: {message}. If the control server uses a private CA, give the node its certificate \
         with `tailgate up --control-ca FILE`"
    )]
    Tls { url: String, message: String },
    #[error("control CA {0}")]
    Ca(String),
}

/// Certificates a node trusts for an `https://` control URL.
fn client_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, DialError> {
    static SYSTEM: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let Some(pem) = ca_pem else {
        return Ok(SYSTEM
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!("system CA certificates: {e}");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                tracing::debug!("TLS: {added} system CA certificates");
                Arc::new(builder().with_root_certificates(roots).with_no_client_auth())
            })
            .clone());
    };
    Ok(Arc::new(builder().with_root_certificates(parse_ca(pem)?).with_no_client_auth()))
}

/// A root store from PEM text: at least one certificate, nothing unparsable.
pub(crate) fn parse_ca(pem: &str) -> Result<rustls::RootCertStore, DialError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let c = c.map_err(|e| DialError::Ca(format!("is not valid PEM: {e}")))?;
        roots.add(c).map_err(|e| DialError::Ca(format!("holds a certificate rustls cannot use: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DialError::Ca("holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)".into()));
    }
    Ok(roots)
}

fn builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
}

/// Opens a connection to the control port named by `url` (TCP, then TLS
/// for `https://`), within `timeout`. `ca_pem` replaces the system roots.
pub(crate) async fn dial(url: &str, ca_pem: Option<&str>, timeout: Duration) -> Result<Box<dyn Stream>, DialError> {
    let u = ControlUrl::parse(url)?;
    let tls = if u.tls { Some(client_config(ca_pem)?) } else { None };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect((u.host.as_str(), u.port))
            .await
            .map_err(|e| DialError::Connect { url: url.into(), message: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = tls else { return Ok(Box::new(tcp) as Box<dyn Stream>) };
        let name = ServerName::try_from(u.host.clone())
            .map_err(|e| DialError::Tls { url: url.into(), message: format!("{:?} is not a valid server name: {e}", u.host) })?;
        let s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| DialError::Tls { url: url.into(), message: e.to_string() })?;
        Ok(Box::new(s) as Box<dyn Stream>)
    };
    tokio::time::timeout(timeout, connect).await.map_err(|_| DialError::Connect { url: url.into(), message: "timed out".into() })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = |s| ControlUrl::parse(s).map(|u| (u.tls, u.host, u.port));
        assert_eq!(p("http://h:1/").unwrap(), (false, "h".into(), 1));
        assert_eq!(p("http://h").unwrap(), (false, "h".into(), 80));
        assert_eq!(p("https://h").unwrap(), (true, "h".into(), 443));
        assert_eq!(p("https://[::1]:9").unwrap(), (true, "::1".into(), 9));
        assert!(p("ftp://h").is_err());
        assert!(p("https://h/x").is_err());
        assert!(p("https://:1").is_err());
        assert_eq!(ControlUrl::parse("https://h:443").unwrap().host_header(), "h");
        assert_eq!(ControlUrl::parse("http://[::1]:8").unwrap().host_header(), "[::1]:8");
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        assert!(matches!(parse_ca("hello"), Err(DialError::Ca(_))));
        assert!(matches!(parse_ca(""), Err(DialError::Ca(_))));
    }
}
