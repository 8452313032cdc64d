//! tailgate: a userspace WireGuard node with an identity-aware SSH server.
pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod directory;
pub mod forward;
pub mod identity;
pub mod localapi;
pub mod netstack;
pub mod node;
pub mod policy;
pub mod serve;
pub mod ssh;
pub mod sshclient;
pub mod wg;
