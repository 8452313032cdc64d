//! The control server's state machine: registration, login, logout, admin
//! operations, timers. No sockets and no clock: the driver
//! ([`crate::control::server`]) feeds it events with one [`Now`] reading
//! and sends what it puts in its outbox.
//!
//! It owns the [`Store`] (every change is written through before it is
//! announced) and an in-memory mirror of the nodes plus the netmap
//! [`Engine`]. Connections are opaque [`ConnId`]s.
//!
//! By concern: `login` (hello, register, login, admit), `session` (what an
//! established node says, disconnects, timers, removal), `endpoints`
//! (endpoint report pacing), `names` (what a node may call itself, address
//! and name allocation), `policy`, `admin` (the admin requests), `check`
//! (SSH check / TOTP), `signin` (identity-provider sign-in).
#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::control::server::netmap::{Engine, NodeEntry};
use crate::control::server::store::{NodeRow, Store};
use crate::control::wire::proto::{DeltaOut, PeerInfo, PolicyInfo, SelfInfo, ServerOut, check_node_name};
use crate::daemon::identity::Identity;
use crate::dataplane::wg;
use crate::key::Key;

mod admin;
mod admin_keys;
mod admin_nodes;
mod check;
mod clock;
mod endpoints;
mod error;
mod login;
mod names;
mod policy;
mod session;
mod signin;
#[cfg(test)]
mod tests;

pub use admin::AdminRequest;
pub(crate) use clock::Now;
pub(crate) use error::HubError;

use endpoints::EndpointGate;
use policy::PolicyState;

/// A connection as the driver numbers it; the hub never sees sockets.
pub(crate) type ConnId = u64;

/// The hub's settings, fixed for the life of a server.
#[derive(Clone, Debug)]
pub(crate) struct HubConfig {
    /// Tailnet DNS domain: nodes are NAME.DOMAIN.
    pub(crate) domain: String,
    /// Control URL embedded in auth keys.
    pub(crate) url: String,
    /// The server's Noise public key, embedded in auth keys.
    pub(crate) server_public: Key,
    /// Lifetime of a (user-owned) node key. Tagged nodes do not expire.
    pub(crate) node_key_expiry: Duration,
    /// How long an ephemeral node may stay offline before it is deleted.
    pub(crate) ephemeral_grace: Duration,
    /// Keepalive period announced to nodes in LoginOk.
    pub(crate) keepalive: Duration,
    /// Default lifetime of an auth key when `keys create` gives none.
    pub(crate) default_auth_key_expiry: Duration,
    /// Endpoint reports applied at once per node before coalescing starts.
    pub(crate) endpoint_burst: u32,
    /// Once the burst is spent, at most one endpoint change per node per
    /// this interval reaches the store and the viewers (the latest wins).
    pub(crate) endpoint_interval: Duration,
}

impl HubConfig {
    /// The defaults for a server reached at `url` with key `server_public`.
    pub(crate) fn new(url: &str, server_public: Key) -> HubConfig {
        HubConfig {
            domain: crate::control::DEFAULT_DOMAIN.into(),
            url: url.into(),
            server_public,
            node_key_expiry: Duration::from_secs(180 * 86400),
            ephemeral_grace: Duration::from_secs(30),
            keepalive: Duration::from_secs(30),
            default_auth_key_expiry: Duration::from_secs(7 * 86400),
            endpoint_burst: 4,
            endpoint_interval: Duration::from_secs(2),
        }
    }
}

/// What the driver must do.
#[derive(Debug)]
pub(crate) enum Out {
    /// Send this message on the connection. Boxed: a `ServerOut` is ten
    /// times the size of a close, and the box moves on unchanged into the
    /// connection's queue (one allocation per control message, none per
    /// packet).
    Send(ConnId, Box<ServerOut>),
    /// Close the connection (after sending what was queued before).
    Close(ConnId, String),
}

impl Out {
    /// [`Out::Send`] of `msg` on `conn`.
    pub(crate) fn send(conn: ConnId, msg: ServerOut) -> Out {
        Out::Send(conn, Box::new(msg))
    }
}

/// The hub's state; see the module docs.
pub(crate) struct Hub {
    store: Store,
    cfg: HubConfig,
    engine: Engine,
    policy: PolicyState,
    nodes: HashMap<i64, NodeRow>,
    by_key: HashMap<Key, i64>,
    names: HashMap<String, i64>,
    ips: HashSet<Ipv4Addr>,
    users: HashMap<i64, String>,
    /// Provider groups per user, as of their last sign-in (issue 13).
    user_groups: HashMap<i64, Vec<String>>,
    conns: HashMap<i64, ConnId>,
    offline_since: HashMap<i64, Instant>,
    endpoint_gates: HashMap<i64, EndpointGate>,
    next_ip: u32,
    out: Vec<Out>,
    /// Audit rows that could not be written (see [`Hub::audit`]).
    audit_failures: u64,
}

impl Hub {
    /// Loads state. `policy_file` = (text, name) of a policy file that must
    /// be valid and is put in force (a new version if it differs).
    pub(crate) fn open(store: Store, cfg: HubConfig, policy_file: Option<(String, String)>, now: Now) -> Result<Hub> {
        store.nodes_all_offline()?;
        store.meta_set("url", &cfg.url)?;
        store.meta_set("server_public", &wg::key_to_base64(&cfg.server_public))?;
        store.meta_set("domain", &cfg.domain)?;
        store.meta_set("node_key_expiry_secs", &cfg.node_key_expiry.as_secs().to_string())?;
        store.meta_set("auth_key_expiry_secs", &cfg.default_auth_key_expiry.as_secs().to_string())?;
        let (policy, state) = policy::load(&store, policy_file, now.unix)?;
        let info = PolicyInfo { version: state.version, name: state.name.clone(), text: state.text.clone() };
        let engine = Engine::new(policy, info, &cfg.domain);
        let next_ip = store.meta_get("next_ip")?.and_then(|s| s.parse().ok()).unwrap_or(1);
        let mut hub = Hub {
            store,
            cfg,
            engine,
            policy: state,
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            names: HashMap::new(),
            ips: HashSet::new(),
            users: HashMap::new(),
            user_groups: HashMap::new(),
            conns: HashMap::new(),
            offline_since: HashMap::new(),
            endpoint_gates: HashMap::new(),
            next_ip,
            out: Vec::new(),
            audit_failures: 0,
        };
        for u in hub.store.users()? {
            hub.users.insert(u.id, u.name);
        }
        hub.user_groups = hub.store.user_groups_all()?;
        for mut n in hub.store.nodes()? {
            n.online = false;
            if n.ephemeral {
                hub.offline_since.insert(n.id, now.mono);
            }
            hub.index(&n);
            if n.key_expiry.is_none_or(|e| e > now.unix) {
                let e = hub.entry(&n);
                hub.engine.upsert(n.id as u64, e);
            }
            hub.nodes.insert(n.id, n);
        }
        Ok(hub)
    }

    /// Outputs accumulated since the last call.
    pub(crate) fn take_outputs(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    /// Version of the policy in force.
    #[cfg(test)]
    pub(crate) fn policy_version(&self) -> u64 {
        self.policy.version
    }

    /// Audit rows lost to store errors since the server started
    /// (`control status` shows it as `audit_write_failures`).
    #[cfg(test)]
    pub(crate) fn audit_failures(&self) -> u64 {
        self.audit_failures
    }

    /// Writes an audit row. The action already happened, so a failed write
    /// must not undo it, but it must not vanish either: it is logged as an
    /// error with the whole row and counted (`control status`).
    fn audit(&mut self, now: i64, actor: &str, action: &str, target: &str, detail: &str) {
        if let Err(e) = self.store.audit(now, actor, action, target, detail) {
            self.audit_failures += 1;
            tracing::error!(
                "AUDIT WRITE FAILED ({} so far): {e:#}; lost row: at={now} actor={actor} action={action} target={target:?} detail={detail:?}",
                self.audit_failures
            );
        }
    }

    /// May this node key use the relay? Known, not expired. The relay asks
    /// this typed query for each connecting key (a lookup, not a node
    /// listing) and again at every re-check.
    pub(crate) fn relay_allowed(&self, key: &Key, now: Now) -> bool {
        self.by_key.get(key).is_some_and(|id| !self.expired(*id, now.unix))
    }

    fn index(&mut self, n: &NodeRow) {
        self.by_key.insert(n.node_key, n.id);
        self.names.insert(n.name.to_ascii_lowercase(), n.id);
        self.ips.insert(n.ip);
    }

    fn unindex(&mut self, n: &NodeRow) {
        self.by_key.remove(&n.node_key);
        self.names.remove(&n.name.to_ascii_lowercase());
        self.ips.remove(&n.ip);
    }

    fn expired(&self, id: i64, now: i64) -> bool {
        self.nodes.get(&id).and_then(|n| n.key_expiry).is_some_and(|e| e <= now)
    }

    /// Provider groups of the node's user (none for tagged nodes).
    fn groups_of(&self, n: &NodeRow) -> Vec<String> {
        if !n.tags.is_empty() {
            return Vec::new();
        }
        n.user_id.and_then(|u| self.user_groups.get(&u).cloned()).unwrap_or_default()
    }

    fn user_of(&self, n: &NodeRow) -> Option<String> {
        if n.tags.is_empty() { n.user_id.and_then(|u| self.users.get(&u).cloned()) } else { None }
    }

    fn self_info(&self, n: &NodeRow) -> SelfInfo {
        SelfInfo {
            node_id: n.id as u64,
            node_key: n.node_key,
            name: n.name.clone(),
            fqdn: format!("{}.{}", n.name, self.cfg.domain),
            ips: vec![IpAddr::V4(n.ip)],
            user: self.user_of(n),
            tags: n.tags.clone(),
            groups: self.groups_of(n),
            key_expiry: n.key_expiry,
            ephemeral: n.ephemeral,
        }
    }

    fn entry(&self, n: &NodeRow) -> NodeEntry {
        let user = self.user_of(n);
        let groups = self.groups_of(n);
        NodeEntry {
            identity: Identity {
                node_key: wg::key_to_base64(&n.node_key),
                node_name: n.name.clone(),
                user: user.clone(),
                tags: n.tags.clone(),
                ip: IpAddr::V4(n.ip),
                groups: groups.clone(),
            },
            peer: Arc::new(PeerInfo {
                node_id: n.id as u64,
                node_key: n.node_key,
                name: n.name.clone(),
                fqdn: format!("{}.{}", n.name, self.cfg.domain),
                ips: vec![IpAddr::V4(n.ip)],
                user,
                tags: n.tags.clone(),
                groups,
                endpoints: n.endpoints.clone(),
                ssh_host_key: n.ssh_host_key.clone(),
                online: self.conns.contains_key(&n.id),
            }),
            me: Arc::new(self.self_info(n)),
        }
    }

    fn emit(&mut self, deltas: Vec<(u64, DeltaOut)>) {
        for (nid, d) in deltas {
            if let Some(c) = self.conns.get(&(nid as i64)) {
                self.out.push(Out::send(*c, ServerOut::MapDelta(d)));
            }
        }
    }

    /// Re-announces node `id` after its row changed (or removes it from
    /// maps if it is expired or gone).
    fn refresh(&mut self, id: i64, now: i64) {
        let d = match self.nodes.get(&id) {
            Some(n) if !self.expired(id, now) => {
                let e = self.entry(n);
                self.engine.upsert(id as u64, e)
            }
            _ => self.engine.remove(id as u64),
        };
        self.emit(d);
    }

    fn save(&mut self, n: NodeRow) -> Result<()> {
        check_node_name(&n.name)?;
        self.store.node_update(&n)?;
        let id = n.id;
        if let Some(old) = self.nodes.remove(&id) {
            self.unindex(&old);
        }
        self.index(&n);
        self.nodes.insert(id, n);
        Ok(())
    }
}
