//! The data plane: WireGuard, the userspace TCP/IP stack, path choice
//! (disco, STUN) and the driver that moves datagrams between them.
#![warn(missing_docs)]

pub(crate) mod core;
pub mod disco;
pub mod dualstack;
pub(crate) mod endpoint;
pub(crate) mod filter;
pub mod netstack;
pub mod node;
pub mod path;
pub mod pcp;
pub mod portmap;
#[cfg(test)]
mod sim;
pub mod stun;
pub(crate) mod udp;
pub(crate) mod upnp;
pub mod wg;
