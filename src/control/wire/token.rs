//! Auth-key tokens: one string an admin hands out that holds everything a
//! node needs to join: the control URL, the server's Noise public key (pinned
//! by the node) and the secret.
//!
//! Format: `tg1-` + base64url (no padding) of the JSON
//! `{"u":"http://host:port","k":"<server key, std base64>","s":"<secret>"}`.
//! The server stores only a SHA-256 of the secret.
#![warn(missing_docs)]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dataplane::wg;
use crate::key::Key;

/// How every token starts (format version 1).
pub(crate) const TOKEN_PREFIX: &str = "tg1-";

/// A decoded auth key: where to join, whom to trust, and the secret.
/// `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKeyToken {
    /// Control server URL, `http://host:port` or `https://host[:port]`.
    pub url: String,
    /// The control server's Noise public key, pinned by the node.
    pub server_public: Key,
    /// The secret the node sends in `Register`.
    pub secret: String,
}

impl std::fmt::Debug for AuthKeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthKeyToken")
            .field("url", &self.url)
            .field("server_public", &wg::key_to_base64(&self.server_public))
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    u: String,
    k: String,
    s: String,
}

/// Why a string is not a usable auth key; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a `tg1-` token (the first characters, for the message).
    #[error("not a tailgate auth key: it should start with `{TOKEN_PREFIX}` (got {0:?}); create one with `tailgate control keys create`")]
    Prefix(String),
    /// Not base64url, not the JSON, or a secret too short to be ours.
    #[error("auth key is damaged or truncated ({0}); copy the whole last line printed by `tailgate control keys create`")]
    Damaged(String),
    /// The server key is not a base64 32-byte key.
    #[error("auth key holds an invalid server key: {0}")]
    ServerKey(String),
    /// The URL is not `http://HOST:PORT` or `https://HOST[:PORT]`.
    #[error("auth key holds an invalid control URL {0:?}: expected http://HOST:PORT or https://HOST[:PORT]")]
    Url(String),
}

impl AuthKeyToken {
    /// A fresh random secret (32 bytes, base64url).
    pub(crate) fn new_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The `tg1-…` string an admin hands out.
    pub fn encode(&self) -> String {
        let w = Wire { u: self.url.clone(), k: wg::key_to_base64(&self.server_public), s: self.secret.clone() };
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&w).expect("json")))
    }

    /// Decodes a token as pasted (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<AuthKeyToken, TokenError> {
        let s = s.trim();
        let Some(body) = s.strip_prefix(TOKEN_PREFIX) else {
            let shown: String = s.chars().take(12).collect();
            return Err(TokenError::Prefix(shown));
        };
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let w: Wire = serde_json::from_slice(&raw).map_err(|e| TokenError::Damaged(e.to_string()))?;
        let server_public = wg::key_from_base64(&w.k).map_err(|e| TokenError::ServerKey(e.to_string()))?;
        parse_url(&w.u).map_err(|_| TokenError::Url(w.u.clone()))?;
        if w.s.len() < 16 {
            return Err(TokenError::Damaged("secret too short".into()));
        }
        Ok(AuthKeyToken { url: w.u, server_public, secret: w.s })
    }
}

impl std::fmt::Display for AuthKeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.encode())
    }
}

/// Hash under which a secret is stored (hex SHA-256). Secrets are 256-bit
/// random, so a fast hash is enough: there is nothing to brute-force.
pub(crate) fn hash_secret(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits `http[s]://host:port[/]` into (host, port). `https://` means
/// TLS around the Noise channel (see [`crate::control::transport`]).
pub(crate) fn parse_url(url: &str) -> Result<(String, u16), crate::control::transport::UrlError> {
    crate::control::transport::ControlUrl::parse(url).map(|u| (u.host, u.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_roundtrip_and_errors() {
        let t = AuthKeyToken { url: "http://127.0.0.1:8443".into(), server_public: [7; 32], secret: AuthKeyToken::new_secret() };
        let s = t.encode();
        assert!(s.starts_with("tg1-") && !s.contains('=') && !s.contains('+') && !s.contains('/'));
        assert_eq!(AuthKeyToken::parse(&format!("  {s}\n")).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));

        let e = AuthKeyToken::parse("tskey-abc").unwrap_err().to_string();
        assert!(e.contains("should start with `tg1-`"), "{e}");
        let e = AuthKeyToken::parse(&s[..s.len() - 10]).unwrap_err().to_string();
        assert!(e.contains("damaged or truncated"), "{e}");
        let bad = format!(
            "tg1-{}",
            URL_SAFE_NO_PAD.encode(br#"{"u":"ftp://x","k":"BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=","s":"0123456789abcdefgh"}"#)
        );
        assert!(matches!(AuthKeyToken::parse(&bad), Err(TokenError::Url(_))));
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://h:1/").unwrap(), ("h".into(), 1));
        assert_eq!(parse_url("http://h").unwrap(), ("h".into(), 80));
        assert_eq!(parse_url("http://[::1]:9").unwrap(), ("::1".into(), 9));
        assert_eq!(parse_url("https://h").unwrap(), ("h".into(), 443));
        assert!(parse_url("http://h/x").is_err());
    }

    #[test]
    fn hash_is_stable_hex() {
        assert_eq!(hash_secret("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
