//! What the control protocol and the relay share once a connection has
//! been upgraded on the control port: the byte stream, the server side of
//! the Noise IK handshake, and closing with a last message. Both the
//! server's connection handlers and the node's dialer ([`super::transport`])
//! speak over a [`Stream`].

#![warn(missing_docs)]

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control::wire::frame::{FrameError, WireDecoder};
use crate::control::wire::noise::{self, ChannelError, SecureChannel};
use crate::key::{Key, PrivateKey};

/// A byte stream the control port is served over or dialed through (TCP,
/// TLS, or in-memory in tests).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Why a Noise handshake after an upgrade did not complete.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("closed during the handshake")]
    Closed,
    #[error("handshake timed out")]
    TimedOut,
    #[error("read during the handshake: {0}")]
    Read(#[source] io::Error),
    #[error("write during the handshake: {0}")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Noise(#[from] ChannelError),
}

/// Reads the first Noise message after an upgrade, within `timeout`.
/// `wire` already holds whatever came after the request head.
pub(crate) async fn read_handshake_message<R: AsyncRead + Unpin>(
    r: &mut R,
    wire: &mut WireDecoder,
    rbuf: &mut [u8],
    timeout: Duration,
) -> Result<bytes::BytesMut, HandshakeError> {
    tokio::time::timeout(timeout, async {
        loop {
            if let Some(m) = wire.next_message()? {
                return Ok(m);
            }
            match r.read(rbuf).await {
                Ok(0) => return Err(HandshakeError::Closed),
                Err(e) => return Err(HandshakeError::Read(e)),
                Ok(n) => wire.push(&rbuf[..n]),
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::TimedOut)?
}

/// The responder's whole handshake, as the control server and the relay
/// both run it with the server key `private`: read message 1 (after
/// `leftover`, the bytes that followed the request head), answer it, and
/// return the channel and the peer's authenticated static key.
pub(crate) async fn accept_noise<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    private: &PrivateKey,
    leftover: &[u8],
    max_frame: usize,
    rbuf: &mut [u8],
    timeout: Duration,
) -> Result<(SecureChannel, Key), HandshakeError> {
    let mut wire = WireDecoder::new();
    wire.push(leftover);
    let msg1 = read_handshake_message(s, &mut wire, rbuf, timeout).await?;
    let (chan, peer, msg2) = noise::respond(private, &msg1, wire, max_frame)?;
    s.write_all(&msg2).await.map_err(HandshakeError::Write)?;
    Ok((chan, peer))
}

/// Writes `bytes` (an HTTP error, a last sealed frame) and closes, giving
/// up after 5 s so a peer that does not read cannot hold the task.
pub(crate) async fn write_and_close<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
    })
    .await;
}
