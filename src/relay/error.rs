//! Why a relay connection ended, on the server side.

use std::time::Duration;

use crate::control::upgrade::HandshakeError;
use crate::control::wire::noise::ChannelError;

/// Why a relay connection ended: logged, and (as its text) the reason in
/// the `Closing` frame the node gets.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayConnError {
    #[error("relay shutting down")]
    ShuttingDown,
    #[error("{method} {path}: not the relay path")]
    NotRelayPath { method: String, path: String },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("refused (unknown or expired)")]
    Refused,
    #[error("this node may no longer use the relay (key expired or node removed)")]
    NoLongerAllowed,
    #[error("relay authorization did not answer within {0:?}; reconnect")]
    AuthTimeout(Duration),
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    #[error("writes stalled for {0:?}")]
    Stalled(Duration),
    #[error("silent for {0:?}")]
    Silent(Duration),
    #[error("encrypt: {0}")]
    Encrypt(#[source] ChannelError),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// Closed by the other task or the registry (replaced…), with its reason.
    #[error("{0}")]
    Closed(String),
}

/// A node broke the relay protocol; its connection is closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Frame(#[from] super::proto::FrameError),
    #[error("unexpected frame from a node: {0}")]
    Unexpected(String),
}
