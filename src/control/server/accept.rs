//! The listener side of the control port: accepting TCP (and TLS)
//! connections under the unauthenticated-connection caps, reading the
//! HTTP request head, and dispatching on it: the control upgrade
//! ([`super::conn`]), other upgrades (the relay) through an
//! [`UpgradeHandler`], the small plain pages (`/tailgate/health`,
//! `/tailgate/key`, `/oidc/*`), and 400/404/426 for anything else.

#![warn(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::preauth::PreAuthPermit;
use super::tls::TlsAcceptor;
use super::{Shared, conn, metrics, signin};
use crate::control::upgrade::{Stream, write_and_close};
use crate::control::wire::http::{self, RequestHead};
use crate::control::{CONTROL_PATH, UPGRADE_CONTROL, UPGRADE_RELAY};
use crate::dataplane::wg;

/// Handles another protocol upgraded on the same port (the relay). It gets
/// the stream right after the request head (it writes its own 101), the
/// head, any bytes that came after the head, and the connection's
/// [`PreAuthPermit`], to drop once the peer has authenticated.
pub trait UpgradeHandler: Send + Sync {
    /// Serves the connection to its end.
    fn handle(&self, stream: Box<dyn Stream>, head: RequestHead, leftover: Vec<u8>, permit: PreAuthPermit) -> BoxFuture<'static, ()>;
}

/// Accepts connections until the task is aborted.
pub(super) async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                // One per-IP budget for an IPv4 client, mapped or not.
                let peer = crate::dataplane::dualstack::normalize(peer);
                // Over a cap: close at once (dropping the socket), before
                // spending a task or a buffer on it.
                let Some(permit) = shared.preauth.try_acquire(Some(peer.ip())) else {
                    metrics::inc(&shared.metrics.rejected_cap);
                    tracing::debug!("control: {peer}: too many unauthenticated connections; closed");
                    continue;
                };
                let _ = s.set_nodelay(true);
                let shared = shared.clone();
                let Some(tls) = tls.clone() else {
                    tokio::spawn(async move { handle_conn(s, peer.to_string(), shared, permit).await });
                    continue;
                };
                // The handshake is part of the unauthenticated phase: same
                // permit, same time limit as the request head.
                tokio::spawn(async move {
                    match tokio::time::timeout(shared.opts.handshake_timeout, tls.accept(s)).await {
                        Ok(Ok(Some(s))) => handle_conn(s, peer.to_string(), shared, permit).await,
                        Ok(Ok(None)) => tracing::debug!("control: {peer}: answered an ACME validation"),
                        Ok(Err(e)) => {
                            metrics::inc(&shared.metrics.rejected_tls);
                            tracing::debug!("control: {peer}: TLS handshake failed: {e}")
                        }
                        Err(_) => {
                            metrics::inc(&shared.metrics.rejected_tls);
                            tracing::debug!("control: {peer}: no TLS handshake within the time limit")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One accepted connection, from its request head on.
pub(super) async fn handle_conn<S: Stream>(mut s: S, peer: String, shared: Arc<Shared>, permit: PreAuthPermit) {
    let timeout = shared.opts.handshake_timeout;
    // 1. HTTP request head.
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 1024];
        loop {
            match http::parse_request(&buf) {
                Ok(Some(x)) => return Ok(x),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err("connection closed before a request".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let (head, used) = match head {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            metrics::inc(&shared.metrics.rejected_request);
            tracing::debug!("control: {peer}: bad request: {e}");
            write_and_close(&mut s, &http::simple_response(400, "Bad Request", "bad request\n")).await;
            return;
        }
        Err(_) => {
            tracing::debug!("control: {peer}: no request within {timeout:?}");
            return;
        }
    };
    let leftover = buf[used..].to_vec();
    let upgrade = head.upgrade();
    match (head.method.as_str(), head.path.as_str(), upgrade.as_deref()) {
        ("GET", p, Some(UPGRADE_CONTROL)) if p == CONTROL_PATH => {
            if s.write_all(&http::switching_protocols(UPGRADE_CONTROL)).await.is_err() {
                return;
            }
            conn::control_session(s, leftover, &peer, &shared, permit).await
        }
        (_, _, Some(token)) if token == UPGRADE_RELAY || shared.opts.upgrades.iter().any(|(t, _)| t == token) => {
            match shared.opts.upgrades.iter().find(|(t, _)| t == token) {
                Some((_, h)) => h.handle(Box::new(s), head, leftover, permit).await,
                None => write_and_close(&mut s, &http::simple_response(501, "Not Implemented", "relay not enabled on this server\n")).await,
            }
        }
        ("GET", "/tailgate/health", None) => write_and_close(&mut s, &http::simple_response(200, "OK", "ok\n")).await,
        ("GET", "/tailgate/key", None) => {
            let key = format!("{}\n", wg::key_to_base64(&wg::public_key_of(&shared.private)));
            write_and_close(&mut s, &http::simple_response(200, "OK", &key)).await
        }
        ("GET", p, None) if p.starts_with("/oidc/") => {
            let resp = signin::http(p, &shared).await;
            write_and_close(&mut s, &resp).await
        }
        (_, p, None) if p == CONTROL_PATH => {
            write_and_close(
                &mut s,
                &http::simple_response(426, "Upgrade Required", "this is the tailgate control endpoint; use `tailgate up`\n"),
            )
            .await
        }
        _ => write_and_close(&mut s, &http::simple_response(404, "Not Found", "not found\n")).await,
    }
}
