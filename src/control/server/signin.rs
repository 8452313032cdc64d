//! The control server's side of joining by signing in with the identity
//! provider (issue 13): the `/oidc/*` pages and the wait of a node's
//! connection for its person to sign in. The OIDC protocol is in
//! [`crate::control::server::oidc`].

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::Shared;
use super::conn::seal;
use super::hub_thread::HubCmd;
use crate::control::server::oidc::{Oidc, OidcError, SignedIn};
use crate::control::wire::http;
use crate::control::wire::noise::ChannelError;
use crate::control::wire::noise::SecureChannel;
use crate::control::wire::proto::{ClientMsg, ServerOut};
use crate::key::Key;

/// What a signing-in node said about itself.
pub(crate) struct Hello {
    pub hostname: String,
    pub ssh_host_key: Option<String>,
    pub endpoints: Vec<SocketAddr>,
}

/// `Some` when this first message needs a sign-in now: it asks for one,
/// the server has a provider, and the node key is unknown, expired, or the
/// node asked to sign in again. Otherwise the hub treats it as a login (or
/// refuses it when no provider is configured).
pub(super) async fn needs_sign_in(first: &ClientMsg, key: &Key, shared: &Shared) -> Option<Hello> {
    let ClientMsg::RegisterInteractive { hostname, ssh_host_key, endpoints, force_reauth } = first else { return None };
    shared.oidc.as_ref()?;
    if !force_reauth {
        let (reply, rx) = oneshot::channel();
        // Known and not expired: the same lookup the relay uses.
        if shared.hub.send(HubCmd::RelayAllowed { key: *key, reply }).await.is_ok() && rx.await.unwrap_or(false) {
            return None;
        }
    }
    Some(Hello { hostname: hostname.clone(), ssh_host_key: ssh_host_key.clone(), endpoints: endpoints.clone() })
}

/// Why a node's wait for its person to sign in ended without a sign-in.
/// Each message is what the node is told.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignInError {
    #[error("sign-in is not enabled on this control server")]
    NotEnabled,
    /// Refused by the provider or by the allowed users/domains/groups, or
    /// too many sign-ins pending.
    #[error(transparent)]
    Refused(OidcError),
    #[error("the sign-in was abandoned")]
    Abandoned,
    #[error("nobody signed in within {0} s; run `tailgate up` again for a new sign-in URL")]
    Expired(u64),
    #[error("the control server is shutting down")]
    ShuttingDown,
    #[error("the node went away before signing in")]
    NodeGone,
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("write: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot send the sign-in URL: {0}")]
    Send(String),
}

/// Forgets the sign-in when the waiting connection ends, however it ends.
struct Cancel(Arc<Oidc>, String);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.cancel(&self.1);
    }
}

/// Sends the node its sign-in URL and waits for the outcome, the sign-in's
/// lifetime, the node going away, or the server stopping.
pub(super) async fn wait<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    chan: &mut SecureChannel,
    rbuf: &mut [u8],
    who: &str,
    shared: &Shared,
) -> Result<SignedIn, SignInError> {
    let oidc = shared.oidc.clone().ok_or(SignInError::NotEnabled)?;
    let (login, url, outcome) = oidc.new_login().map_err(SignInError::Refused)?;
    let _cancel = Cancel(oidc.clone(), login);
    let ttl = oidc.login_ttl();
    tracing::info!("control: {who}: waiting up to {}s for a sign-in", ttl.as_secs());
    let mut out = Vec::new();
    seal(chan, &ServerOut::SignIn { url }, &mut out).map_err(|e| SignInError::Send(e.to_string()))?;
    w.write_all(&out).await.map_err(SignInError::Write)?;
    let deadline = tokio::time::sleep(ttl);
    tokio::pin!(deadline);
    tokio::pin!(outcome);
    let mut ka = tokio::time::interval(shared.opts.keepalive);
    ka.tick().await;
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            o = &mut outcome => return o.map_err(|_| SignInError::Abandoned)?.map_err(SignInError::Refused),
            _ = &mut deadline => {
                return Err(SignInError::Expired(ttl.as_secs()))
            }
            _ = shutdown.changed() => return Err(SignInError::ShuttingDown),
            // Keep NATs and proxies from dropping an idle connection.
            _ = ka.tick() => {
                out.clear();
                seal(chan, &ServerOut::KeepAlive, &mut out).map_err(|e| SignInError::Send(e.to_string()))?;
                w.write_all(&out).await.map_err(SignInError::Write)?;
            }
            n = r.read(rbuf) => match n {
                Ok(0) | Err(_) => return Err(SignInError::NodeGone),
                // Nothing but keepalives is expected before the login answer;
                // the bytes still pass through the channel to stay in step.
                Ok(n) => {
                    chan.push_wire(&rbuf[..n])?;
                    while chan.next_frame()?.is_some() {}
                }
            },
        }
    }
}

fn page(code: u16, message: &str) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    http::simple_response(code, reason, &format!("tailgate: {message}\n"))
}

/// `GET /oidc/start/<login>` and `GET /oidc/callback?...`.
pub(super) async fn http(path: &str, shared: &Shared) -> Vec<u8> {
    let Some(oidc) = shared.oidc.clone() else {
        return page(404, "signing in with an identity provider is not enabled on this control server");
    };
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    if let Some(login) = p.strip_prefix("/oidc/start/") {
        if !oidc.is_login(login) {
            return page(404, "this sign-in link is unknown or has expired; run `tailgate up` again on the device for a new sign-in URL");
        }
        // The provider's keys are fetched again for every sign-in: that picks
        // up a key rotation early and tells the person now, not after they
        // typed a password, when the provider is down. The link stays valid.
        let probe = oidc.clone();
        match tokio::task::spawn_blocking(move || probe.refresh_keys()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!("control: sign-in: {e}");
                return page(503, &format!("{e}; open this link again once the identity provider is back"));
            }
            Err(_) => return page(500, "internal error while signing in; try again"),
        }
        return match oidc.start(login) {
            Ok(url) => http::redirect(&url),
            Err(e) => page(e.http_status(), &e.to_string()),
        };
    }
    if p != "/oidc/callback" {
        return page(404, "not found");
    }
    let query = query.to_string();
    match tokio::task::spawn_blocking(move || oidc.callback(&query)).await {
        Ok(Ok(email)) => page(200, &format!("signed in as {email}; the device is joining the tailnet, you can close this window")),
        Ok(Err(e)) => {
            tracing::info!("control: sign-in refused: {e}");
            page(e.http_status(), &e.to_string())
        }
        Err(_) => page(500, "internal error while signing in; try again"),
    }
}
