//! The relay: forwards opaque WireGuard (and disco) datagrams between nodes
//! that cannot reach each other directly, over the control server's HTTP
//! port (TCP, so it works where UDP is blocked and only 80/443 are open).
//!
//! ## Protocol
//!
//! 1. The node sends `GET /tailgate/relay` with `Upgrade: tailgate-relay`
//!    on the control server's port; the relay answers `101`.
//! 2. Noise IK exactly as the control protocol ([`crate::control::wire::noise`]):
//!    the node's static key is its WireGuard key, the server's key is pinned
//!    (the same key as the control server). The relay thereby learns the
//!    node key, authenticated.
//! 3. The relay asks its [`NodeAuthorizer`] whether that key may relay (the
//!    control server's: a known node whose key has not expired) and answers
//!    `Accepted { keepalive_secs }` or `Closing { reason }`. It asks again
//!    every `reauth_interval`, so removed or expired nodes are dropped; an
//!    answer that does not come within `handshake_timeout` counts as no.
//! 4. Frames ([`proto`]): node → relay `Send { dst, datagram }`, relay →
//!    node `Recv { src, datagram }` (src is the *authenticated* sender),
//!    `KeepAlive` both ways, `PeerGone` when the destination is not
//!    connected, `Closing` before the relay hangs up.
//!
//! The relay never looks inside datagrams: they are WireGuard messages
//! (end-to-end encrypted between the nodes) or sealed [`crate::dataplane::disco`]
//! messages. It is not a trust anchor: a node still only accepts WireGuard
//! traffic from peers it has keys for.
//!
//! Both ends frame many relay frames back to back and seal them as
//! full-size Noise messages (64 KiB) rather than one message per datagram.
//! The decrypted byte stream is the same as with one frame per message, and
//! frame decoders read it as a stream, so this needs no version change:
//! older nodes and relays that seal frame by frame interoperate.
//!
//! ## Flow control ([`limits`])
//!
//! - Per destination: a bounded fair queue (packets and bytes), one
//!   sub-queue per sender served by deficit round robin. A full queue drops
//!   the newest frame of the sender holding the most and counts it; a slow
//!   node never blocks senders, and senders to one node share it equally.
//! - Per sending node, only if the operator sets `--relay-rate`: a token
//!   bucket (4 MiB burst). A node in debt is simply not read for a while,
//!   so TCP slows it down. Without it a node alone may use all the relay
//!   can carry.
//! - One connection per node key: a new one replaces the old.
//!
//! ## Modules
//! - [`proto`]: frame codec (sans-IO).
//! - [`limits`]: token bucket and datagram queue (sans-IO).
//! - [`auth`]: the [`NodeAuthorizer`] trait.
//! - `error`: why a relay connection ended (`RelayConnError`), logged in
//!   its `relay_conn{peer}` span and told to the node in `Closing`.
//! - [`server`]: [`RelayServer`], the `UpgradeHandler` the control server
//!   registers by default.
//! - [`client`]: [`RelayClient`], [`RelaySender`], [`RelayReceiver`].

#![warn(missing_docs)]

/// Who may use the relay.
pub mod auth;
/// The node's side.
pub mod client;
mod error;
pub(crate) mod limits;
/// Frame codec.
pub mod proto;
/// The server side, run by the control server.
pub mod server;

pub use auth::NodeAuthorizer;
pub use client::{RelayClient, RelayClientOptions, RelayClientStats, RelayError, RelayEvent, RelayReceiver, RelaySender, SendError};
pub use server::{RelayConfig, RelayServer, RelayStats};

/// HTTP path of the relay upgrade (token: [`crate::control::UPGRADE_RELAY`]).
pub const RELAY_PATH: &str = "/tailgate/relay";
