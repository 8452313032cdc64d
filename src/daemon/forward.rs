//! TCP forwards between the tailnet and local sockets.
//!
//! `--forward 8080=127.0.0.1:80` publishes a local service on the node's
//! tailnet address (like `tailscale serve` for TCP); `--local-forward
//! 127.0.0.1:2222=100.64.0.2:22` is the reverse, like `ssh -L`.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::dataplane::netstack::TcpStream;
use crate::dataplane::node::Node;

pub(crate) fn parse_forward(s: &str) -> Result<(u16, String)> {
    let (port, target) = s.split_once('=').with_context(|| format!("--forward {s:?}: expected PORT=HOST:PORT, e.g. 8080=127.0.0.1:80"))?;
    let port = port.parse::<u16>().with_context(|| format!("--forward {s:?}: {port:?} is not a port"))?;
    if !target.contains(':') {
        bail!("--forward {s:?}: the target needs a port, e.g. {target}:80");
    }
    Ok((port, target.to_string()))
}

pub(crate) fn parse_local_forward(s: &str) -> Result<(SocketAddr, SocketAddr)> {
    let (local, remote) =
        s.split_once('=').with_context(|| format!("--local-forward {s:?}: expected LOCAL=HOST:PORT, e.g. 127.0.0.1:2222=100.64.0.2:22"))?;
    let local = local.parse().with_context(|| format!("--local-forward {s:?}: {local:?} is not IP:PORT"))?;
    let remote = remote.parse().with_context(|| format!("--local-forward {s:?}: {remote:?} is not a tailnet IP:PORT"))?;
    Ok((local, remote))
}

/// Serve tailnet `port` by connecting each client to the local `target`.
pub fn spawn_forward(node: &Node, port: u16, target: String) -> Result<()> {
    let mut listener = node.listen(port).with_context(|| format!("--forward {port}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut stream) = listener.accept().await else { return };
            let target = target.clone();
            tokio::spawn(async move {
                let from = stream.peer_addr();
                match tokio::net::TcpStream::connect(&target).await {
                    Ok(local) => {
                        let _ = local.set_nodelay(true);
                        if let Err(e) = splice(stream, local).await {
                            tracing::debug!(%from, %target, error = %e, "forward ended");
                        }
                    }
                    Err(e) => {
                        // Refuse the tailnet side the way a closed port would.
                        tracing::warn!(%from, %target, error = %e, "forward target refused");
                        stream.abort();
                    }
                }
            });
        }
    });
    Ok(())
}

/// Accept on a local address and connect each client through the tailnet.
pub(crate) async fn spawn_local_forward(node: Arc<Node>, local: SocketAddr, remote: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(local).await.with_context(|| format!("--local-forward: cannot listen on {local}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((client, from)) = listener.accept().await else { continue };
            let _ = client.set_nodelay(true);
            let node = node.clone();
            tokio::spawn(async move {
                match node.connect(remote).await {
                    Ok(stream) => {
                        if let Err(e) = splice(stream, client).await {
                            tracing::debug!(%from, %remote, error = %e, "local forward ended");
                        }
                    }
                    Err(e) => tracing::warn!(%from, %remote, error = %e, "local forward could not connect"),
                }
            });
        }
    });
    Ok(())
}

/// Copy both ways until both sides have closed. If either side fails (reset,
/// timeout), both are reset: a local socket closed with a FIN would tell its
/// client that a cut transfer was complete.
async fn splice(mut tailnet: TcpStream, mut local: tokio::net::TcpStream) -> std::io::Result<()> {
    let r = tokio::io::copy_bidirectional(&mut tailnet, &mut local).await;
    if r.is_err() {
        tailnet.abort();
        // Closing with a zero linger sends a RST instead of a FIN.
        let _ = local.set_zero_linger();
    }
    r.map(drop)
}
