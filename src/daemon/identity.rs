//! Who is on the other end of a connection.
//!
//! The data plane knows only WireGuard public keys and tailnet addresses. An
//! [`IdentityResolver`] maps those to people and tags. In static mode it is fed
//! from `# tailgate-user` / `# tailgate-tags` comments in a wg-quick file; in
//! control-plane mode from the netmap. The SSH server only ever sees an
//! [`Identity`] produced here, never a bare IP it would have to trust.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

/// The verified identity of a tailnet node (and the person or tags that own it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The node's WireGuard public key, standard base64.
    pub node_key: String,
    /// The node's name in the tailnet (host name), or its key prefix when unnamed.
    pub node_name: String,
    /// The owning user, for user-owned nodes. Tagged nodes have no user.
    pub user: Option<String>,
    /// Tags such as `tag:prod`.
    pub tags: Vec<String>,
    /// The node's primary tailnet address.
    pub ip: IpAddr,
    /// The owning user's groups at the identity provider, as of their last
    /// sign-in (`group:oidc/NAME` in the policy). Empty for tagged nodes and
    /// for users who joined with an auth key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Identity {
    /// A human-readable label: the user if there is one, else the tags.
    pub fn who(&self) -> String {
        match &self.user {
            Some(u) => u.clone(),
            None if !self.tags.is_empty() => self.tags.join(","),
            None => format!("node {}", self.node_name),
        }
    }
}

/// Maps a WireGuard peer key to the identity of the node behind it.
pub trait IdentityResolver: Send + Sync {
    /// The identity of the peer with this WireGuard public key, if known.
    fn resolve(&self, peer_key: &[u8; 32]) -> Option<Identity>;
    /// The identity of this node itself (target of inbound SSH).
    fn self_identity(&self) -> Identity;
    /// A receiver that changes whenever the table may have changed (a new
    /// netmap). Holders of live decisions (the inbound filter, open SSH
    /// connections) re-judge what they admitted when it fires.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// A resolver backed by a table that can be replaced at runtime (the netmap
/// feeds it in control mode; the wg-quick file feeds it once in static mode).
#[derive(Clone)]
pub struct TableResolver {
    inner: Arc<RwLock<Table>>,
    generation: Arc<watch::Sender<u64>>,
}

struct Table {
    me: Identity,
    peers: HashMap<[u8; 32], Identity>,
}

impl TableResolver {
    /// A resolver for this node (`me`) and its known peers, by node key.
    pub fn new(me: Identity, peers: impl IntoIterator<Item = ([u8; 32], Identity)>) -> Self {
        TableResolver {
            inner: Arc::new(RwLock::new(Table { me, peers: peers.into_iter().collect() })),
            generation: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Replace the whole table (a new netmap).
    pub fn replace(&self, me: Identity, peers: impl IntoIterator<Item = ([u8; 32], Identity)>) {
        let mut t = self.inner.write().unwrap_or_else(|e| e.into_inner());
        t.me = me;
        t.peers = peers.into_iter().collect();
        drop(t);
        self.generation.send_modify(|g| *g += 1);
    }
}

impl IdentityResolver for TableResolver {
    fn resolve(&self, peer_key: &[u8; 32]) -> Option<Identity> {
        let t = self.inner.read().unwrap_or_else(|e| e.into_inner());
        t.peers.get(peer_key).cloned()
    }
    fn self_identity(&self) -> Identity {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).me.clone()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
