//! The data plane: WireGuard, the userspace TCP/IP stack, path choice
//! (disco, STUN) and the driver that moves datagrams between them.
pub mod core;
pub mod disco;
pub mod dualstack;
pub mod endpoint;
pub mod filter;
pub mod netstack;
pub mod node;
pub mod path;
pub mod pcp;
pub mod portmap;
#[cfg(test)]
mod sim;
pub mod stun;
pub mod udp;
pub mod wg;
