//! Serving the embedded SSH server on the node's tailnet address.
//!
//! This is where identity crosses from the data plane to SSH: the netstack
//! says which WireGuard key carried a connection, the resolver turns that key
//! into an [`Identity`](crate::daemon::identity::Identity), and only then does the
//! SSH server see the stream. A connection from a key the resolver does not
//! know is reset before a single SSH byte is exchanged. The server keeps the
//! key and the resolver, not the identity, so later netmaps apply to open
//! connections too.
#![warn(missing_docs)]

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::daemon::identity::IdentityResolver;
use crate::dataplane::node::Node;
use crate::policy::Policy;
use crate::ssh::{PolicyHandle, SshServer, SshServerConfig};

/// A running SSH service; keep it to swap the policy later.
pub(crate) struct SshService {
    pub server: Arc<SshServer>,
    pub policy: PolicyHandle,
}

pub(crate) fn serve_ssh(
    node: &Node,
    resolver: Arc<dyn IdentityResolver>,
    policy: Policy,
    state_dir: &Path,
    port: u16,
) -> Result<SshService> {
    let policy = PolicyHandle::new(policy);
    let me = resolver.clone();
    let mut cfg = SshServerConfig::new(state_dir, policy.clone(), resolver.self_identity());
    cfg.self_identity = Arc::new(move || me.self_identity());
    let server = SshServer::new(cfg).context("starting the SSH server")?;
    let mut listener = node.listen(port).with_context(|| format!("listening for SSH on tailnet port {port}"))?;
    let srv = server.clone();
    tokio::spawn(async move {
        loop {
            let Ok(mut stream) = listener.accept().await else { return };
            let key = stream.peer_key();
            match resolver.resolve(&key) {
                Some(caller) => {
                    tracing::info!(from = %stream.peer_addr(), who = %caller.who(), "ssh connection");
                    tokio::spawn(srv.clone().serve(stream, key, resolver.clone()));
                }
                None => {
                    tracing::warn!(from = %stream.peer_addr(), peer = %crate::key::ShortKey(key), "ssh from a peer with no identity; reset");
                    stream.abort();
                }
            }
        }
    });
    Ok(SshService { server, policy })
}
