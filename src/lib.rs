//! tailgate: a userspace WireGuard node with an identity-aware SSH server.
#![warn(missing_docs)]
pub mod cli;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod key;
pub mod policy;
pub mod relay;
pub mod ssh;
