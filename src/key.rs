//! The node key type every layer shares: WireGuard, disco, relay, control
//! and the SSH server all name a node by its 32-byte x25519 public key.

use std::fmt;

/// A 32-byte WireGuard (x25519) key.
pub type Key = [u8; 32];

/// How every log line names a node key: the first 8 base64 characters in
/// brackets, `[AbCdEfGh]`. One form everywhere, so `grep '\[AbCdEfGh\]'`
/// follows a peer across the data plane, control and SSH logs. Only for
/// public keys: it is a prefix, not an identifier anything may trust.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShortKey(pub Key);

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

#[cfg(test)]
mod tests {
    use super::ShortKey;

    #[test]
    fn short_key_is_the_bracketed_base64_prefix() {
        let k = [0xffu8; 32];
        assert_eq!(ShortKey(k).to_string(), "[////////]");
        assert_eq!(ShortKey(k).prefix(), "////////");
        assert_eq!(format!("{:?}", ShortKey([0; 32])), "[AAAAAAAA]");
    }
}
