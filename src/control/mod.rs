//! The coordination server (`tailgate control`) and the node's client for it.
//!
//! Layout, sans-IO cores first:
//! - [`wire`]: what a node and the server (and the relay) both speak:
//!   [`wire::frame`] (length-prefixed, versioned frames), [`wire::noise`]
//!   (the Noise IK channel over `snow`), [`wire::http`] (the request head
//!   before the upgrade), [`wire::proto`] (the JSON messages and the node's
//!   [`NetMap`]), and [`wire::token`] (`tg1-…` auth keys).
//! - [`server`]: the coordination server: its tokio driver (listener,
//!   upgrade dispatch, connections, admin socket, policy watcher) and, under
//!   it, [`server::hub`] (the state machine: registration, login, admin ops,
//!   timers; no sockets), [`server::netmap`] (who sees whom, full maps and
//!   deltas), [`server::store`] (SQLite), `server::audit`, `server::oidc`,
//!   `server::totp`, [`server::tls`], `server::metrics` and
//!   [`server::admin`] (the `tailgate control …` command line).
//! - [`upgrade`]: what the control protocol and the relay share after the
//!   HTTP upgrade: the [`upgrade::Stream`] type and the server side of the
//!   Noise handshake.
//! - `transport`: the node's dialer (TCP, TLS for `https://`), shared by
//!   the control and relay clients.
//! - [`client`]: [`ControlClient`], what a node uses to join and follow its map.
//!
//! Design notes live in ARCHITECTURE.md, section `control`.

pub mod client;
pub mod server;
pub(crate) mod transport;
pub mod upgrade;
pub mod wire;

pub(crate) use client::{CheckAnswer, CheckHandle};
pub use client::{ControlClient, ControlError, ControlTarget, NodeHello};
pub use server::admin::{ControlArgs, admin_main};
pub use server::{ControlServer, ServerOptions, run_server};
pub use wire::proto::{MapDelta, NetMap, PeerInfo, PolicyInfo, SelfInfo};
pub use wire::token::AuthKeyToken;

/// Version of the control protocol spoken after the Noise handshake. Every
/// frame carries it; a peer speaking another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// `Upgrade:` token of the control protocol on the HTTP port.
pub const UPGRADE_CONTROL: &str = "tailgate-control";
/// `Upgrade:` token reserved for the relay (another issue) on the same port.
pub const UPGRADE_RELAY: &str = "tailgate-relay";
/// HTTP path of the control upgrade.
pub const CONTROL_PATH: &str = "/tailgate/control";

/// Default tailnet DNS domain (`web1.<domain>`).
pub const DEFAULT_DOMAIN: &str = "tailnet.internal";

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// RFC 3339 (seconds) rendering of a Unix time, for messages.
pub fn fmt_time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
