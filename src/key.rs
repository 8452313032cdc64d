//! The node key type every layer shares: WireGuard, disco, relay, control
//! and the SSH server all name a node by its 32-byte x25519 public key.
//! Private keys live in [`PrivateKey`], which zeroes itself and never prints.
#![warn(missing_docs)]

use std::fmt;

use secrecy::{ExposeSecret, SecretBox, SecretString};

/// A 32-byte WireGuard (x25519) public key. Private keys are [`PrivateKey`].
pub type Key = [u8; 32];

/// A node's (or the control server's) x25519 private key: the WireGuard
/// static key, which also seals disco and is the Noise static key towards
/// control and relay. Boxed by `secrecy` so it is zeroed on drop, has no
/// `Copy`, and prints as its public half only: a `{:?}` of a config or a
/// trace span cannot leak it.
pub struct PrivateKey(SecretBox<Key>);

/// Why a string is not a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not standard base64.
    #[error("not valid base64 ({0})")]
    Base64(String),
    /// Decoded, but not 32 bytes.
    #[error("decodes to {0} bytes, a WireGuard key is 32 bytes (44 base64 characters)")]
    Length(usize),
}

impl PrivateKey {
    /// A fresh random key (the OS RNG via x25519-dalek).
    pub fn generate() -> PrivateKey {
        let s = x25519_dalek::StaticSecret::random();
        PrivateKey(SecretBox::init_with_mut(|k: &mut Key| *k = s.to_bytes()))
    }

    /// Wraps raw key bytes. The caller's copy is theirs to drop; prefer
    /// [`PrivateKey::from_base64`] and [`PrivateKey::generate`].
    pub fn from_bytes(bytes: Key) -> PrivateKey {
        PrivateKey(SecretBox::init_with_mut(|k: &mut Key| *k = bytes))
    }

    /// Parses the `wg genkey` form (standard base64, surrounding whitespace ignored).
    pub fn from_base64(s: &str) -> Result<PrivateKey, KeyError> {
        use base64::Engine;
        use secrecy::zeroize::Zeroizing;
        let bytes =
            Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| KeyError::Base64(e.to_string()))?);
        if bytes.len() != 32 {
            return Err(KeyError::Length(bytes.len()));
        }
        Ok(PrivateKey(SecretBox::init_with_mut(|k: &mut Key| k.copy_from_slice(&bytes))))
    }

    /// The `wg genkey` form, for writing the key file (0600) and nothing else.
    pub fn to_base64(&self) -> SecretString {
        use base64::Engine;
        SecretString::from(base64::engine::general_purpose::STANDARD.encode(self.0.expose_secret()))
    }

    /// The raw bytes, for the crypto libraries that take them (boringtun,
    /// x25519-dalek, snow). Do not log or store what this returns.
    pub fn expose_secret(&self) -> &Key {
        self.0.expose_secret()
    }

    /// The x25519 public key of this private key.
    pub fn public_key(&self) -> Key {
        let s = x25519_dalek::StaticSecret::from(*self.0.expose_secret());
        *x25519_dalek::PublicKey::from(&s).as_bytes()
    }
}

impl Clone for PrivateKey {
    fn clone(&self) -> PrivateKey {
        PrivateKey(SecretBox::init_with_mut(|k: &mut Key| *k = *self.0.expose_secret()))
    }
}

impl fmt::Debug for PrivateKey {
    /// Names the key by its public half, which is what a reader of a log
    /// needs to tell keys apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(redacted, public {})", ShortKey(self.public_key()))
    }
}

/// How every log line names a node key: the first 8 base64 characters in
/// brackets, `[AbCdEfGh]`. One form everywhere, so `grep '\[AbCdEfGh\]'`
/// follows a peer across the data plane, control and SSH logs. Only for
/// public keys: it is a prefix, not an identifier anything may trust.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortKey(
    /// The public key shown.
    pub Key,
);

impl ShortKey {
    /// The 8 characters without brackets (for audit details and messages
    /// that already had this form).
    pub fn prefix(&self) -> String {
        use base64::Engine;
        let mut s = base64::engine::general_purpose::STANDARD.encode(self.0);
        s.truncate(8);
        s
    }
}

impl From<&Key> for ShortKey {
    fn from(k: &Key) -> ShortKey {
        ShortKey(*k)
    }
}

impl fmt::Display for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.prefix())
    }
}

impl fmt::Debug for ShortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A WireGuard preshared key (`PresharedKey =` in a wg-quick file): a
/// symmetric secret mixed into the handshake. Same handling as
/// [`PrivateKey`]: zeroed on drop, never printed.
#[derive(Clone)]
pub struct PresharedKey(PrivateKey);

impl PresharedKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: Key) -> PresharedKey {
        PresharedKey(PrivateKey::from_bytes(bytes))
    }

    /// Parses the `wg genpsk` form (standard base64).
    pub fn from_base64(s: &str) -> Result<PresharedKey, KeyError> {
        PrivateKey::from_base64(s).map(PresharedKey)
    }

    /// The raw bytes, for boringtun. Do not log or store what this returns.
    pub fn expose_secret(&self) -> &Key {
        self.0.expose_secret()
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::{PrivateKey, ShortKey};
    use secrecy::ExposeSecret;

    #[test]
    fn private_key_debug_names_only_the_public_half() {
        let k = PrivateKey::generate();
        let shown = format!("{k:?} {:?}", k.clone());
        let b64 = k.to_base64();
        assert!(!shown.contains(&b64.expose_secret()[..8]), "{shown}");
        assert!(shown.contains(&ShortKey(k.public_key()).to_string()), "{shown}");
        let again = PrivateKey::from_base64(&format!(" {}\n", b64.expose_secret())).unwrap();
        assert_eq!(again.expose_secret(), k.expose_secret());
        assert!(PrivateKey::from_base64("AAAA").is_err());
        let psk = super::PresharedKey::from_bytes([7; 32]);
        assert_eq!(format!("{psk:?}"), "PresharedKey(redacted)");
    }

    #[test]
    fn short_key_is_the_bracketed_base64_prefix() {
        let k = [0xffu8; 32];
        assert_eq!(ShortKey(k).to_string(), "[////////]");
        assert_eq!(ShortKey(k).prefix(), "////////");
        assert_eq!(format!("{:?}", ShortKey([0; 32])), "[AAAAAAAA]");
    }
}
