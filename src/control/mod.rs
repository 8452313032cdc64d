//! The coordination server (`tailgate control`) and the node's client for it.
//!
//! Layout, sans-IO cores first:
//! - [`frame`]: length-prefixed, versioned frames; the Noise transport framing.
//! - [`noise`]: the Noise IK handshake and the encrypted channel over `snow`.
//! - [`http`]: the HTTP/1.1 request head that precedes the upgrade.
//! - [`proto`]: the messages (JSON) and the node's [`NetMap`].
//! - [`netmap`]: who sees whom (policy → visibility), full maps and deltas.
//! - [`token`]: auth-key tokens (`tg1-…`) that embed URL and server key.
//! - [`transport`]: the node's dialer (TCP, TLS for `https://`), shared by
//!   the control and relay clients.
//! - [`store`]: SQLite persistence (users, nodes, auth keys, policy, audit).
//! - [`hub`]: the server's state machine (registration, login, admin ops,
//!   timers) over the store and the netmap engine; no sockets.
//! - [`server`]: the tokio driver: listener, upgrade dispatch, connections,
//!   admin socket, policy file watcher.
//! - [`tls`]: TLS on the control port (certificate files or ACME).
//! - [`client`]: [`ControlClient`], what a node uses to join and follow its map.
//! - [`admin`]: the `tailgate control …` command line.
//!
//! Design notes live in ARCHITECTURE.md, section `control`.

pub mod admin;
pub mod audit;
pub mod client;
pub mod frame;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod netmap;
pub mod noise;
pub mod oidc;
pub mod proto;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod totp;
pub mod transport;

pub use admin::{ControlArgs, admin_main};
pub use client::{CheckAnswer, CheckHandle, ControlClient, ControlError, ControlTarget, NodeHello};
pub use proto::{MapDelta, NetMap, PeerInfo, PolicyInfo, SelfInfo};
pub use server::{ControlServer, ServerOptions, run_server};
pub use token::AuthKeyToken;

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
