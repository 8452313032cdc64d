//! The node key type every layer shares: WireGuard, disco, relay, control
//! and the SSH server all name a node by its 32-byte x25519 public key.

/// A 32-byte WireGuard (x25519) key.
pub type Key = [u8; 32];
