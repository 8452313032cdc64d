//! The control server's state machine: registration, login, logout, admin
//! operations, timers. No sockets: the driver ([`crate::control::server`]) feeds it
//! events with the current time and sends what it puts in its outbox.
//!
//! It owns the [`Store`] (every change is written through before it is
//! announced) and an in-memory mirror of the nodes plus the netmap
//! [`Engine`]. Connections are opaque [`ConnId`]s.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::control::fmt_time;
use crate::control::server::netmap::{Engine, NodeEntry};
use crate::control::server::store::{AuthKeyRow, NodeRow, PolicyRow, Store};
use crate::control::wire::proto::{
    ClientMsg, DeltaOut, ErrorCode, PeerInfo, PolicyInfo, SelfInfo, ServerOut, canonical_ssh_host_key, check_node_name,
};
use crate::control::wire::token::{AuthKeyToken, hash_secret};
use crate::daemon::identity::Identity;
use crate::dataplane::wg;
use crate::key::Key;
use crate::policy::{DEFAULT_POLICY_TOML, Policy};

mod check;
mod error;

pub use error::HubError;

pub type ConnId = u64;

/// First address handed out is 100.64.0.1; the range is 100.64.0.0/10.
const IP_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const IP_RANGE: u32 = 1 << 22;
const MAX_ENDPOINTS: usize = 32;
/// The raw hostname a node reports is only shown to admins, but it is
/// stored and printed, so it gets a bound and no control characters.
const MAX_HOSTNAME: usize = 255;

mod signin;

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub domain: String,
    /// Control URL embedded in auth keys.
    pub url: String,
    pub server_public: Key,
    /// Lifetime of a (user-owned) node key. Tagged nodes do not expire.
    pub node_key_expiry: Duration,
    /// How long an ephemeral node may stay offline before it is deleted.
    pub ephemeral_grace: Duration,
    pub keepalive: Duration,
    /// Default lifetime of an auth key when `keys create` gives none.
    pub default_auth_key_expiry: Duration,
    /// Endpoint reports applied at once per node before coalescing starts.
    pub endpoint_burst: u32,
    /// Once the burst is spent, at most one endpoint change per node per
    /// this interval reaches the store and the viewers (the latest wins).
    pub endpoint_interval: Duration,
}

impl HubConfig {
    pub fn new(url: &str, server_public: Key) -> HubConfig {
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

/// Per-node endpoint report pacing: a token bucket plus the latest report
/// that had to wait. Every applied report is a SQLite write and a delta to
/// every viewer, so a node may not make the server do that at will.
struct EndpointGate {
    tokens: f64,
    refilled: Instant,
    pending: Option<Vec<SocketAddr>>,
}

impl EndpointGate {
    fn new(burst: u32, now: Instant) -> EndpointGate {
        EndpointGate { tokens: burst as f64, refilled: now, pending: None }
    }

    /// Refills, then takes a token if one is there.
    fn take(&mut self, cfg: &HubConfig, now: Instant) -> bool {
        let per = cfg.endpoint_interval.as_secs_f64();
        let gained = if per > 0.0 { now.saturating_duration_since(self.refilled).as_secs_f64() / per } else { f64::INFINITY };
        self.tokens = (self.tokens + gained).min(cfg.endpoint_burst.max(1) as f64);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the driver must do.
#[derive(Debug)]
pub enum Out {
    Send(ConnId, ServerOut),
    /// Close the connection (after sending what was queued before).
    Close(ConnId, String),
}

/// Admin operations (the unix socket speaks these as JSON, one per line).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    UsersAdd {
        name: String,
    },
    UsersList,
    UsersRemove {
        name: String,
    },
    KeysCreate {
        user: Option<String>,
        #[serde(default)]
        reusable: bool,
        #[serde(default)]
        ephemeral: bool,
        /// Seconds; `None` = the server's default.
        #[serde(default)]
        expiry_secs: Option<u64>,
        #[serde(default)]
        tags: Vec<String>,
    },
    KeysList,
    KeysRevoke {
        id: i64,
    },
    NodesList,
    NodesRename {
        node: String,
        name: String,
    },
    NodesExpire {
        node: String,
    },
    NodesRemove {
        node: String,
    },
    NodesTag {
        node: String,
        tags: Vec<String>,
    },
    PolicyGet,
    PolicySet {
        text: String,
        name: String,
    },
    PolicyCheck {
        text: String,
        name: String,
    },
    AuditList {
        limit: usize,
    },
    TotpEnroll {
        user: String,
    },
    TotpReset {
        user: String,
    },
    TotpStatus {
        #[serde(default)]
        user: Option<String>,
    },
}

/// The policy in force.
struct PolicyState {
    version: u64,
    name: String,
    text: String,
    source: String,
}

/// Store the built-in default policy as `version` and put it in force.
fn install_builtin_policy(store: &Store, version: u64, now: i64) -> Result<(Policy, PolicyState)> {
    let state = PolicyState { version, name: "default.toml".into(), text: DEFAULT_POLICY_TOML.into(), source: "built-in".into() };
    store.policy_insert(&PolicyRow {
        version,
        name: state.name.clone(),
        text: state.text.clone(),
        source: state.source.clone(),
        set_at: now,
    })?;
    Ok((Policy::default_static(), state))
}

pub struct Hub {
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

/// `web1.example.com` / `Web 1` → `web1` / `web-1`: the first label,
/// lowercase letters, digits and '-', at most 63 characters.
pub fn sanitize_hostname(h: &str) -> String {
    let first = h.trim().split('.').next().unwrap_or("");
    let mut s: String = first.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let mut s: String = s.chars().take(63).collect();
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() { "node".into() } else { s }
}

fn valid_user_name(name: &str) -> Result<(), HubError> {
    if name.is_empty() || name.len() > 128 {
        return Err(HubError::invalid("a user name has 1 to 128 characters"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '"') {
        return Err(HubError::invalid(format!("user name {name:?} must not contain spaces, commas, quotes or control characters")));
    }
    for p in ["tag:", "group:", "autogroup:"] {
        if name.starts_with(p) {
            return Err(HubError::invalid(format!("user name {name:?} must not start with {p:?} (that is a policy keyword)")));
        }
    }
    Ok(())
}

/// Validates what a node says about itself. The host key comes back in
/// canonical form (what peers will write to `known_hosts`); endpoints come
/// back without the ones no peer may be sent to (loopback, link-local,
/// metadata, multicast, ...), deduplicated.
fn check_hostinfo(
    hostname: Option<&str>,
    ssh_host_key: Option<String>,
    endpoints: Vec<SocketAddr>,
) -> Result<(Option<String>, Vec<SocketAddr>), HubError> {
    if let Some(h) = hostname
        && (h.len() > MAX_HOSTNAME || h.chars().any(char::is_control))
    {
        return Err(HubError::new(
            ErrorCode::HostInfo,
            format!("hostname must be at most {MAX_HOSTNAME} bytes without control characters"),
        ));
    }
    let key = match ssh_host_key {
        Some(k) => Some(canonical_ssh_host_key(&k).map_err(|e| HubError::new(ErrorCode::HostInfo, e.to_string()))?),
        None => None,
    };
    Ok((key, clean_endpoints(endpoints)?))
}

fn clean_endpoints(endpoints: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, HubError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(HubError::new(ErrorCode::Protocol, format!("{} endpoints reported, at most {MAX_ENDPOINTS}", endpoints.len())));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        // `::ffff:a.b.c.d` and `a.b.c.d` are one endpoint: store the plain form.
        let e = crate::dataplane::dualstack::normalize(e);
        if crate::dataplane::endpoint::is_valid_endpoint(&e) && !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

fn short_key(k: &Key) -> String {
    crate::key::ShortKey(*k).prefix()
}

impl Hub {
    /// Loads state. `policy_file` = (text, name) of a policy file that must
    /// be valid and is put in force (a new version if it differs).
    pub fn open(store: Store, cfg: HubConfig, policy_file: Option<(String, String)>, now: i64) -> Result<Hub> {
        store.nodes_all_offline()?;
        store.meta_set("url", &cfg.url)?;
        store.meta_set("server_public", &wg::key_to_base64(&cfg.server_public))?;
        store.meta_set("domain", &cfg.domain)?;
        store.meta_set("node_key_expiry_secs", &cfg.node_key_expiry.as_secs().to_string())?;
        store.meta_set("auth_key_expiry_secs", &cfg.default_auth_key_expiry.as_secs().to_string())?;
        let latest = store.policy_latest()?;
        let policy = match (policy_file, latest) {
            (Some((text, name)), latest) => {
                let p = Policy::parse_and_test(&text, &name).map_err(|e| anyhow!("policy {name} is not valid, not starting:\n{e}"))?;
                let version = match latest {
                    Some(l) if l.text == text => l.version,
                    Some(l) => l.version + 1,
                    None => 1,
                };
                if store.policy_latest()?.map(|l| l.version) != Some(version) {
                    store.policy_insert(&PolicyRow {
                        version,
                        name: name.clone(),
                        text: text.clone(),
                        source: "file".into(),
                        set_at: now,
                    })?;
                    store.audit(now, "server", "policy.set", &name, &format!("version {version} from file"))?;
                }
                (p, PolicyState { version, name, text, source: "file".into() })
            }
            (None, Some(l)) => {
                // Stored policies were validated when set; if this build's
                // validator disagrees, fall back to the built-in default.
                match Policy::parse_and_test(&l.text, &l.name) {
                    Ok(p) => (p, PolicyState { version: l.version, name: l.name, text: l.text, source: l.source }),
                    Err(e) => {
                        tracing::error!("stored policy version {} no longer validates, using the built-in default:\n{e}", l.version);
                        install_builtin_policy(&store, l.version + 1, now)?
                    }
                }
            }
            (None, None) => install_builtin_policy(&store, 1, now)?,
        };
        let info = PolicyInfo { version: policy.1.version, name: policy.1.name.clone(), text: policy.1.text.clone() };
        let engine = Engine::new(policy.0, info, &cfg.domain);
        let next_ip = store.meta_get("next_ip")?.and_then(|s| s.parse().ok()).unwrap_or(1);
        let mut hub = Hub {
            store,
            cfg,
            engine,
            policy: policy.1,
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
        let start = Instant::now();
        for mut n in hub.store.nodes()? {
            n.online = false;
            if n.ephemeral {
                hub.offline_since.insert(n.id, start);
            }
            hub.index(&n);
            let id = n.id;
            hub.nodes.insert(id, n);
            if !hub.expired(id, now) {
                let e = hub.entry(id);
                hub.engine.upsert(id as u64, e);
            }
        }
        Ok(hub)
    }

    /// Outputs accumulated since the last call.
    pub fn take_outputs(&mut self) -> Vec<Out> {
        std::mem::take(&mut self.out)
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn connected_count(&self) -> usize {
        self.conns.len()
    }

    pub fn policy_version(&self) -> u64 {
        self.policy.version
    }

    /// Audit rows lost to store errors since the server started.
    pub fn audit_failures(&self) -> u64 {
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
    /// this for each connecting key (a lookup, not a node listing).
    pub fn relay_allowed(&self, key: &Key, now: i64) -> bool {
        self.by_key.get(key).is_some_and(|id| !self.expired(*id, now))
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

    fn entry(&self, id: i64) -> NodeEntry {
        let n = &self.nodes[&id];
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
                online: self.conns.contains_key(&id),
            }),
            me: Arc::new(self.self_info(n)),
        }
    }

    fn emit(&mut self, deltas: Vec<(u64, DeltaOut)>) {
        for (nid, d) in deltas {
            if let Some(c) = self.conns.get(&(nid as i64)) {
                self.out.push(Out::Send(*c, ServerOut::MapDelta(d)));
            }
        }
    }

    /// Re-announces node `id` after its row changed (or removes it from
    /// maps if it is expired).
    fn refresh(&mut self, id: i64, now: i64) {
        if self.expired(id, now) || !self.nodes.contains_key(&id) {
            let d = self.engine.remove(id as u64);
            self.emit(d);
        } else {
            let e = self.entry(id);
            let d = self.engine.upsert(id as u64, e);
            self.emit(d);
        }
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

    fn alloc_ip(&mut self) -> Result<Ipv4Addr> {
        for _ in 0..IP_RANGE {
            let off = self.next_ip % IP_RANGE;
            self.next_ip = (off + 1) % IP_RANGE;
            let ip = Ipv4Addr::from(IP_BASE + off);
            let last = ip.octets()[3];
            if off == 0 || last == 0 || last == 255 || self.ips.contains(&ip) {
                continue;
            }
            self.store.meta_set("next_ip", &self.next_ip.to_string())?;
            return Ok(ip);
        }
        Err(anyhow!("no free address left in 100.64.0.0/10"))
    }

    fn alloc_name(&self, hostname: &str, for_node: Option<i64>) -> Result<String> {
        let base = sanitize_hostname(hostname);
        let free = |n: &str| self.names.get(n).is_none_or(|id| Some(*id) == for_node);
        if free(&base) {
            return Ok(base);
        }
        // There are fewer nodes than suffixes tried, so one is free; the
        // suffix may need room, so the base is cut to keep 63 characters.
        for i in 2..=self.names.len() as u64 + 2 {
            let suffix = format!("-{i}");
            let stem: String = base.chars().take(63 - suffix.len()).collect();
            let name = format!("{}{suffix}", stem.trim_end_matches('-'));
            if free(&name) {
                return Ok(name);
            }
        }
        Err(anyhow!("no free name for {base}"))
    }

    // --- connections --------------------------------------------------------

    /// First message of a connection. On success the node is online, `conn`
    /// gets LoginOk + MapFull, and the node id is returned. On refusal the
    /// error goes to `conn` and the driver should close it.
    pub fn hello(&mut self, conn: ConnId, node_key: Key, msg: ClientMsg, now: i64) -> Result<i64, HubError> {
        let r = match msg {
            ClientMsg::Register { auth_key, hostname, ssh_host_key, endpoints, previous_node_key } => {
                if previous_node_key.is_some() {
                    Err(HubError::new(
                        ErrorCode::Protocol,
                        "previous_node_key is no longer accepted (an auth key does not prove you hold the old node key); \
                         rotate keys with rotate_key over a session of the old key, or register as a new node",
                    ))
                } else {
                    self.register(node_key, &auth_key, &hostname, ssh_host_key, endpoints, now)
                }
            }
            ClientMsg::Login { hostname, ssh_host_key, endpoints } => self.login(node_key, hostname, ssh_host_key, endpoints, now),
            ClientMsg::RegisterInteractive { hostname, ssh_host_key, endpoints, force_reauth } => {
                // Only a sign-in the server itself completed reaches
                // `hello_signed_in`; here a valid key may just log in.
                if !force_reauth && self.relay_allowed(&node_key, now) {
                    self.login(node_key, Some(hostname), ssh_host_key, endpoints, now)
                } else {
                    Err(HubError::new(
                        ErrorCode::SignIn,
                        "signing in with an identity provider is not enabled on this control server; \
                         join with an auth key: `tailgate up --authkey TOKEN` (an admin makes one with `tailgate control keys create`)",
                    ))
                }
            }
            other => {
                Err(HubError::new(ErrorCode::Protocol, format!("the first message must be register or login, not {}", msg_name(&other))))
            }
        };
        self.admit(conn, r, now)
    }

    /// Puts a registered or logged-in node online on `conn` (LoginOk +
    /// MapFull), or refuses with `r`'s error.
    fn admit(&mut self, conn: ConnId, r: Result<(i64, bool), HubError>, now: i64) -> Result<i64, HubError> {
        let (id, new_node) = match r {
            Ok(x) => x,
            Err(e) => return Err(self.refuse(conn, e)),
        };
        // One connection per node: the newer one wins.
        if let Some(old) = self.conns.insert(id, conn) {
            self.engine.detach(id as u64);
            self.out.push(Out::Send(
                old,
                ServerOut::Error { code: ErrorCode::Replaced, message: "another connection with this node key replaced this one".into() },
            ));
            self.out.push(Out::Close(old, "replaced by a newer connection".into()));
        }
        self.offline_since.remove(&id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.online = true;
            n.last_seen = Some(now);
        }
        if let Err(e) = self.store.node_set_online(id, true, now) {
            tracing::warn!("store: {e:#}");
        }
        self.refresh(id, now);
        // The node may be gone from the engine (a key lifetime so short it
        // expired on arrival): refuse rather than assume it is there.
        let (Some(n), Some(full)) = (self.nodes.get(&id), self.engine.attach(id as u64)) else {
            self.conns.remove(&id);
            self.engine.detach(id as u64);
            if let Err(e) = self.store.node_set_online(id, false, now) {
                tracing::warn!("store: {e:#}");
            }
            self.refresh(id, now);
            let e =
                HubError::new(ErrorCode::NodeKeyExpired, "the node key expired as it logged in; log in again with an auth key".to_string());
            return Err(self.refuse(conn, e));
        };
        let me = self.self_info(n);
        self.out.push(Out::Send(
            conn,
            ServerOut::LoginOk {
                new_node,
                node: me,
                domain: self.cfg.domain.clone(),
                keepalive_secs: self.cfg.keepalive.as_secs().max(1) as u32,
            },
        ));
        self.out.push(Out::Send(conn, ServerOut::MapFull(full)));
        Ok(id)
    }

    fn refuse(&mut self, conn: ConnId, e: HubError) -> HubError {
        self.out.push(Out::Send(conn, ServerOut::Error { code: e.code, message: e.message.clone() }));
        self.out.push(Out::Close(conn, e.message.clone()));
        e
    }

    fn login(
        &mut self,
        node_key: Key,
        hostname: Option<String>,
        ssh_host_key: Option<String>,
        endpoints: Vec<SocketAddr>,
        now: i64,
    ) -> Result<(i64, bool), HubError> {
        let (ssh_host_key, endpoints) = check_hostinfo(hostname.as_deref(), ssh_host_key, endpoints)?;
        let Some(&id) = self.by_key.get(&node_key) else {
            return Err(HubError::new(
                ErrorCode::NotRegistered,
                format!(
                    "node key {} is not registered with this control server (the node may have been removed); \
                     join with an auth key: `tailgate up --authkey TOKEN` (an admin creates one with `tailgate control keys create`)",
                    short_key(&node_key)
                ),
            ));
        };
        let Some(mut n) = self.nodes.get(&id).cloned() else {
            return Err(HubError::new(ErrorCode::Internal, "node index out of step; try again"));
        };
        if self.expired(id, now) {
            return Err(HubError::new(
                ErrorCode::NodeKeyExpired,
                format!(
                    "the node key of {} expired on {}; log in again with an auth key (`tailgate up --authkey TOKEN`; an admin creates one with `tailgate control keys create`)",
                    n.name,
                    fmt_time(n.key_expiry.unwrap_or(now))
                ),
            ));
        }
        if let Some(h) = hostname {
            n.hostname = h;
        }
        if ssh_host_key.is_some() {
            n.ssh_host_key = ssh_host_key;
        }
        n.endpoints = endpoints;
        // A fresh login starts a fresh report budget.
        self.endpoint_gates.remove(&id);
        self.save(n).map_err(HubError::store)?;
        Ok((id, false))
    }

    fn check_auth_key(&self, secret: &str, now: i64) -> Result<AuthKeyRow, HubError> {
        let ask = "ask an admin for a new one with `tailgate control keys create`";
        let k = self.store.key_by_hash(&hash_secret(secret)).map_err(HubError::store)?.ok_or_else(|| {
            HubError::new(
                ErrorCode::AuthKey,
                format!(
                    "auth key not recognised by this control server (it may belong to another tailnet, or was deleted with its user); {ask}"
                ),
            )
        })?;
        if let Some(r) = k.revoked {
            return Err(HubError::new(ErrorCode::AuthKey, format!("auth key #{} was revoked on {}; {ask}", k.id, fmt_time(r))));
        }
        if let Some(e) = k.expires.filter(|e| *e <= now) {
            return Err(HubError::new(ErrorCode::AuthKey, format!("auth key #{} expired on {}; {ask}", k.id, fmt_time(e))));
        }
        if !k.reusable && k.used_count > 0 {
            return Err(HubError::new(
                ErrorCode::AuthKey,
                format!(
                    "auth key #{} is a one-off key and was already used on {}; {ask} (add --reusable for a key that joins several nodes)",
                    k.id,
                    fmt_time(k.last_used.unwrap_or(k.created))
                ),
            ));
        }
        for t in &k.tags {
            if !self.engine.policy().tags().any(|d| d == t) {
                return Err(HubError::new(
                    ErrorCode::AuthKey,
                    format!(
                        "auth key #{} applies {t}, which the policy in force does not declare in [tag_owners]; fix the policy, or {ask}",
                        k.id
                    ),
                ));
            }
        }
        Ok(k)
    }

    /// Registers a new node, or re-authenticates the node that holds
    /// `node_key` (proven by the Noise handshake) after its key expired.
    /// It never touches a node under another key: moving a node to a new
    /// key is [`ClientMsg::RotateKey`], proven by a session of the old key.
    fn register(
        &mut self,
        node_key: Key,
        secret: &str,
        hostname: &str,
        ssh_host_key: Option<String>,
        endpoints: Vec<SocketAddr>,
        now: i64,
    ) -> Result<(i64, bool), HubError> {
        let (ssh_host_key, endpoints) = check_hostinfo(Some(hostname), ssh_host_key, endpoints)?;
        // A known, valid node key: this is a login; the auth key is not used.
        if let Some(&id) = self.by_key.get(&node_key)
            && !self.expired(id, now)
        {
            return self.login(node_key, Some(hostname.into()), ssh_host_key, endpoints, now);
        }
        let key = self.check_auth_key(secret, now)?;
        let lifetime = self.cfg.node_key_expiry.as_secs() as i64;
        let key_expiry = |tags: &[String]| if tags.is_empty() { Some(now + lifetime) } else { None };
        self.store.key_mark_used(key.id, now).map_err(HubError::store)?;
        let owner = NodeOwner {
            user_id: key.user_id,
            key_expiry: key_expiry(&key.tags),
            tags: key.tags.clone(),
            ephemeral: key.ephemeral,
            auth_key_id: Some(key.id),
        };
        let host = HostInfo { hostname, ssh_host_key, endpoints };
        self.register_node(node_key, host, owner, &format!("authkey#{}", key.id), "re-authenticated", now)
    }

    /// Registers `node_key` for `owner`. A node already holding the key
    /// (expired: re-auth) keeps its name and IP and takes the new owner
    /// (`reauth_detail` goes in the audit line); otherwise a new node gets
    /// a fresh IP and name. Returns (node id, created).
    pub(super) fn register_node(
        &mut self,
        node_key: Key,
        host: HostInfo<'_>,
        owner: NodeOwner,
        actor: &str,
        reauth_detail: &str,
        now: i64,
    ) -> Result<(i64, bool), HubError> {
        let HostInfo { hostname, ssh_host_key, endpoints } = host;
        if let Some(mut n) = self.by_key.get(&node_key).and_then(|id| self.nodes.get(id)).cloned() {
            n.hostname = hostname.into();
            if ssh_host_key.is_some() {
                n.ssh_host_key = ssh_host_key;
            }
            n.endpoints = endpoints;
            n.user_id = owner.user_id.or(n.user_id);
            n.tags = owner.tags;
            n.key_expiry = owner.key_expiry;
            n.ephemeral = owner.ephemeral;
            n.auth_key_id = owner.auth_key_id;
            let (id, name) = (n.id, n.name.clone());
            self.save(n).map_err(HubError::store)?;
            self.endpoint_gates.remove(&id);
            self.audit(now, actor, "node.reauth", &name, reauth_detail);
            return Ok((id, false));
        }
        let ip = self.alloc_ip().map_err(HubError::store)?;
        let name = self.alloc_name(hostname, None).map_err(HubError::store)?;
        check_node_name(&name).map_err(|e| HubError::store(e.into()))?;
        let mut n = NodeRow {
            id: 0,
            node_key,
            name: name.clone(),
            hostname: hostname.into(),
            ip,
            user_id: owner.user_id,
            tags: owner.tags,
            ssh_host_key,
            endpoints,
            created: now,
            last_seen: Some(now),
            key_expiry: owner.key_expiry,
            online: false,
            ephemeral: owner.ephemeral,
            auth_key_id: owner.auth_key_id,
        };
        n.id = self
            .store
            .tx(|s| {
                let id = s.node_insert(&n)?;
                s.audit(now, actor, "node.register", &name, &format!("{ip} key {}", short_key(&node_key)))?;
                Ok(id)
            })
            .map_err(HubError::store)?;
        self.index(&n);
        if n.ephemeral {
            self.offline_since.insert(n.id, Instant::now());
        }
        let id = n.id;
        self.nodes.insert(id, n);
        Ok((id, true))
    }

    /// Moves the node on `conn` to `new_key`. The session is authenticated
    /// as the old key, which is the proof; the new key must be unused. The
    /// old session ends; the node logs in again with the new key.
    fn rotate_key(&mut self, conn: ConnId, node: i64, new_key: Key, now: i64) {
        let Some(mut n) = self.nodes.get(&node).cloned() else { return };
        if new_key == n.node_key || self.by_key.contains_key(&new_key) {
            self.protocol_error(conn, "rotate_key: the new node key is already registered; generate a fresh key".into());
            return;
        }
        let old_key = std::mem::replace(&mut n.node_key, new_key);
        n.online = false;
        n.last_seen = Some(now);
        let name = n.name.clone();
        if let Err(e) = self.save(n) {
            self.refuse(conn, HubError::store(e));
            return;
        }
        self.audit(now, "node", "node.rekey", &name, &format!("{} -> {}", short_key(&old_key), short_key(&new_key)));
        self.conns.remove(&node);
        self.engine.detach(node as u64);
        if self.nodes.get(&node).is_some_and(|n| n.ephemeral) {
            self.offline_since.insert(node, Instant::now());
        }
        self.out.push(Out::Send(conn, ServerOut::KeyRotated { node_key: new_key }));
        self.out.push(Out::Close(conn, "node key rotated".into()));
        self.refresh(node, now);
    }

    /// A (validated) endpoint report: applied now if the node's budget
    /// allows, else kept as the node's pending report for [`Hub::tick`].
    fn report_endpoints(&mut self, node: i64, endpoints: Vec<SocketAddr>, now: i64, now_i: Instant) {
        let Some(current) = self.nodes.get(&node).map(|n| &n.endpoints) else { return };
        let gate = self.endpoint_gates.entry(node).or_insert_with(|| EndpointGate::new(self.cfg.endpoint_burst, now_i));
        if gate.pending.is_none() && *current == endpoints {
            return;
        }
        if gate.pending.is_some() || !gate.take(&self.cfg, now_i) {
            gate.pending = Some(endpoints);
            return;
        }
        self.apply_endpoints(node, endpoints, now);
    }

    fn apply_endpoints(&mut self, node: i64, endpoints: Vec<SocketAddr>, now: i64) {
        let Some(mut n) = self.nodes.get(&node).cloned() else { return };
        if n.endpoints == endpoints {
            return;
        }
        n.endpoints = endpoints;
        if let Err(e) = self.save(n) {
            tracing::warn!("store: {e:#}");
        }
        self.refresh(node, now);
    }

    /// Applies pending endpoint reports whose node has budget again.
    fn flush_endpoints(&mut self, now: i64, now_i: Instant) {
        let cfg = self.cfg.clone();
        let ready: Vec<(i64, Vec<SocketAddr>)> = self
            .endpoint_gates
            .iter_mut()
            .filter(|(_, g)| g.pending.is_some())
            .filter_map(|(id, g)| if g.take(&cfg, now_i) { g.pending.take().map(|p| (*id, p)) } else { None })
            .collect();
        for (id, eps) in ready {
            self.apply_endpoints(id, eps, now);
        }
        // Gates of nodes that are gone or idle long enough to be full again.
        let idle = cfg.endpoint_interval * cfg.endpoint_burst.max(1);
        self.endpoint_gates
            .retain(|id, g| g.pending.is_some() || (self.conns.contains_key(id) && now_i.saturating_duration_since(g.refilled) < idle));
    }

    /// A message on an established connection.
    pub fn client_msg(&mut self, conn: ConnId, node: i64, msg: ClientMsg, now: i64) {
        if self.conns.get(&node) != Some(&conn) {
            return; // a replaced connection still draining
        }
        match msg {
            ClientMsg::KeepAlive => {}
            // The connection task hands these to the audit ingest thread.
            ClientMsg::AuditEvents { .. } | ClientMsg::RecordingChunk { .. } => {}
            ClientMsg::ReportEndpoints { endpoints } => match clean_endpoints(endpoints) {
                Ok(eps) => self.report_endpoints(node, eps, now, Instant::now()),
                Err(e) => self.protocol_error(conn, e.message),
            },
            ClientMsg::RotateKey { new_node_key } => self.rotate_key(conn, node, new_node_key, now),
            msg @ ClientMsg::Check { .. } => self.check_request(conn, node, msg, now),
            ClientMsg::Logout => {
                let Some(n) = self.nodes.get(&node).cloned() else { return };
                self.out.push(Out::Send(conn, ServerOut::LoggedOut));
                self.out.push(Out::Close(conn, "logged out".into()));
                self.conns.remove(&node);
                self.engine.detach(node as u64);
                if n.ephemeral {
                    if let Err(e) = self.delete_node(node, now, "node", "logged out") {
                        tracing::error!("store: cannot delete ephemeral node #{node} at logout: {e:#}");
                    }
                } else {
                    let mut n = n;
                    n.key_expiry = Some(now);
                    n.online = false;
                    let name = n.name.clone();
                    if let Err(e) = self.save(n) {
                        tracing::warn!("store: {e:#}");
                    }
                    self.audit(now, "node", "node.logout", &name, "key expired by logout");
                    self.refresh(node, now);
                }
            }
            ClientMsg::Register { .. } | ClientMsg::Login { .. } | ClientMsg::RegisterInteractive { .. } => {
                self.protocol_error(conn, "already logged in on this connection".into());
            }
        }
    }

    fn protocol_error(&mut self, conn: ConnId, message: String) {
        self.out.push(Out::Send(conn, ServerOut::Error { code: ErrorCode::Protocol, message: message.clone() }));
        self.out.push(Out::Close(conn, message));
    }

    /// The connection of `node` ended.
    pub fn disconnected(&mut self, conn: ConnId, node: i64, now: i64) {
        if self.conns.get(&node) != Some(&conn) {
            return;
        }
        self.conns.remove(&node);
        self.engine.detach(node as u64);
        let Some(n) = self.nodes.get_mut(&node) else { return };
        n.online = false;
        n.last_seen = Some(now);
        if n.ephemeral {
            self.offline_since.insert(node, Instant::now());
        }
        if let Err(e) = self.store.node_set_online(node, false, now) {
            tracing::warn!("store: {e:#}");
        }
        if self.engine.contains(node as u64) {
            self.refresh(node, now);
        }
    }

    /// Timers: ephemeral nodes offline past their grace are deleted; nodes
    /// whose key expired drop out of every map.
    pub fn tick(&mut self, now: i64, now_i: Instant) {
        self.flush_endpoints(now, now_i);
        let grace = self.cfg.ephemeral_grace;
        let gone: Vec<i64> = self
            .offline_since
            .iter()
            .filter(|(id, since)| !self.conns.contains_key(id) && now_i.saturating_duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.offline_since.remove(&id);
            if self.nodes.get(&id).is_some_and(|n| n.ephemeral)
                && let Err(e) = self.delete_node(id, now, "server", "ephemeral node offline")
            {
                tracing::error!("store: cannot delete offline ephemeral node #{id}: {e:#}");
            }
        }
        let expired: Vec<i64> =
            self.nodes.keys().copied().filter(|id| self.expired(*id, now) && self.engine.contains(*id as u64)).collect();
        for id in expired {
            let name = self.nodes[&id].name.clone();
            self.audit(now, "server", "node.key_expired", &name, "");
            self.cut_off(id, ErrorCode::NodeKeyExpired);
            self.refresh(id, now);
        }
    }

    /// Tells a connected node its key is no longer valid and closes it.
    fn cut_off(&mut self, id: i64, why: ErrorCode) {
        if let Some(c) = self.conns.remove(&id) {
            self.engine.detach(id as u64);
            self.out.push(Out::Send(c, ServerOut::MapDelta(DeltaOut { key_expired: true, ..Default::default() })));
            let reason = if why == ErrorCode::Removed { "node removed" } else { "node key expired" };
            self.out.push(Out::Close(c, reason.into()));
        }
    }

    fn delete_node(&mut self, id: i64, now: i64, actor: &str, why: &str) -> Result<()> {
        let Some(n) = self.nodes.get(&id).cloned() else { return Ok(()) };
        self.cut_off(id, ErrorCode::Removed);
        self.store.tx(|s| {
            s.node_delete(id)?;
            s.audit(now, actor, "node.remove", &n.name, why)
        })?;
        self.unindex(&n);
        self.nodes.remove(&id);
        self.offline_since.remove(&id);
        let d = self.engine.remove(id as u64);
        self.emit(d);
        Ok(())
    }

    // --- policy -------------------------------------------------------------

    /// Validates and puts a policy in force. A policy that does not parse or
    /// fails its tests is refused with the diagnostics; the old one stays.
    /// Returns the version in force (unchanged if the text is the same).
    pub fn set_policy(&mut self, text: &str, name: &str, source: &str, now: i64) -> Result<u64, HubError> {
        let p = Policy::parse_and_test(text, name).map_err(|e| {
            HubError::invalid(format!("policy refused, the previous one (version {}) stays in force:\n{e}", self.policy.version))
        })?;
        if text == self.policy.text {
            return Ok(self.policy.version);
        }
        let version = self.policy.version + 1;
        self.store
            .tx(|s| {
                s.policy_insert(&PolicyRow { version, name: name.into(), text: text.into(), source: source.into(), set_at: now })?;
                s.audit(now, source, "policy.set", name, &format!("version {version}"))
            })
            .map_err(|e| HubError::store(e.context("cannot store the policy")))?;
        self.policy = PolicyState { version, name: name.into(), text: text.into(), source: source.into() };
        let d = self.engine.set_policy(p, PolicyInfo { version, name: name.into(), text: text.into() });
        self.emit(d);
        tracing::info!("policy version {version} ({name}, from {source}) in force");
        Ok(version)
    }

    // --- admin --------------------------------------------------------------

    fn find_node(&self, q: &str) -> Result<i64, HubError> {
        let ql = q.to_ascii_lowercase();
        let ql = ql.strip_suffix(&format!(".{}", self.cfg.domain)).unwrap_or(&ql);
        if let Some(id) = self.names.get(ql) {
            return Ok(*id);
        }
        if let Ok(id) = q.parse::<i64>()
            && self.nodes.contains_key(&id)
        {
            return Ok(id);
        }
        if let Ok(ip) = q.parse::<Ipv4Addr>()
            && let Some(n) = self.nodes.values().find(|n| n.ip == ip)
        {
            return Ok(n.id);
        }
        if q.len() >= 6 {
            let hits: Vec<i64> = self.nodes.values().filter(|n| wg::key_to_base64(&n.node_key).starts_with(q)).map(|n| n.id).collect();
            if hits.len() == 1 {
                return Ok(hits[0]);
            }
        }
        Err(HubError::not_found(format!(
            "no node {q:?} (give a name, id, tailnet IP or node key prefix; see `tailgate control nodes list`)"
        )))
    }

    fn check_tags(&self, tags: &[String]) -> Result<(), HubError> {
        for t in tags {
            if !t.starts_with("tag:") || t.len() < 5 {
                return Err(HubError::invalid(format!("{t:?} is not a tag (tags look like tag:prod)")));
            }
            if !self.engine.policy().tags().any(|d| d == t) {
                let declared: Vec<&str> = self.engine.policy().tags().collect();
                return Err(HubError::invalid(format!(
                    "{t} is not declared in the policy's [tag_owners] (declared: {}); add it to the policy first",
                    if declared.is_empty() { "none".into() } else { declared.join(", ") }
                )));
            }
        }
        Ok(())
    }

    fn node_json(&self, n: &NodeRow, now: i64) -> Value {
        json!({
            "id": n.id,
            "name": n.name,
            "fqdn": format!("{}.{}", n.name, self.cfg.domain),
            "hostname": n.hostname,
            "ip": n.ip.to_string(),
            "user": self.user_of(n),
            "registered_by": n.user_id.and_then(|u| self.users.get(&u).cloned()),
            "tags": n.tags,
            "node_key": wg::key_to_base64(&n.node_key),
            "online": self.conns.contains_key(&n.id),
            "last_seen": n.last_seen,
            "created": n.created,
            "key_expiry": n.key_expiry,
            "expired": self.expired(n.id, now),
            "ephemeral": n.ephemeral,
            "endpoints": n.endpoints,
            "ssh_host_key": n.ssh_host_key,
        })
    }

    /// Runs an admin operation. `Ok` carries a JSON result for the CLI.
    pub fn admin(&mut self, req: AdminRequest, now: i64) -> Result<Value, HubError> {
        match req {
            AdminRequest::Status => Ok(json!({
                "url": self.cfg.url,
                "server_public_key": wg::key_to_base64(&self.cfg.server_public),
                "domain": self.cfg.domain,
                "nodes": self.nodes.len(),
                "online": self.conns.len(),
                "users": self.users.len(),
                "policy_version": self.policy.version,
                "policy_source": self.policy.source,
                "audit_write_failures": self.audit_failures,
            })),
            AdminRequest::UsersAdd { name } => {
                valid_user_name(&name)?;
                if self.store.user_by_name(&name).map_err(HubError::store)?.is_some() {
                    return Err(HubError::invalid(format!("user {name} already exists")));
                }
                let u = self.store.user_add(&name, now).map_err(HubError::store)?;
                self.audit(now, "admin", "user.add", &name, "");
                self.users.insert(u.id, u.name.clone());
                Ok(json!({"id": u.id, "name": u.name, "created": u.created}))
            }
            AdminRequest::UsersList => {
                let users = self.store.users().map_err(HubError::store)?;
                Ok(Value::Array(
                    users
                        .iter()
                        .map(|u| {
                            let nodes = self.nodes.values().filter(|n| n.user_id == Some(u.id) && n.tags.is_empty()).count();
                            let groups = self.user_groups.get(&u.id).cloned().unwrap_or_default();
                            json!({"id": u.id, "name": u.name, "created": u.created, "nodes": nodes, "provider_groups": groups})
                        })
                        .collect(),
                ))
            }
            AdminRequest::UsersRemove { name } => {
                let u = self
                    .store
                    .user_by_name(&name)
                    .map_err(HubError::store)?
                    .ok_or_else(|| HubError::not_found(format!("no user {name}")))?;
                let owned: Vec<i64> = self.nodes.values().filter(|n| n.user_id == Some(u.id) && n.tags.is_empty()).map(|n| n.id).collect();
                for id in &owned {
                    self.delete_node(*id, now, "admin", &format!("user {name} removed")).map_err(HubError::store)?;
                }
                self.store.user_delete(u.id).map_err(HubError::store)?;
                self.audit(now, "admin", "user.remove", &name, &format!("{} nodes removed", owned.len()));
                self.users.remove(&u.id);
                for n in self.nodes.values_mut() {
                    if n.user_id == Some(u.id) {
                        n.user_id = None; // tagged nodes it registered (FK set NULL)
                    }
                }
                Ok(json!({"removed": name, "nodes_removed": owned.len()}))
            }
            AdminRequest::KeysCreate { user, reusable, ephemeral, expiry_secs, tags } => {
                let user_row =
                    match &user {
                        Some(u) => Some(self.store.user_by_name(u).map_err(HubError::store)?.ok_or_else(|| {
                            HubError::not_found(format!("no user {u}; add it first with `tailgate control users add {u}`"))
                        })?),
                        None if tags.is_empty() => {
                            return Err(HubError::invalid("give --user NAME (the node's owner) or --tag tag:NAME (a tagged node)"));
                        }
                        None => None,
                    };
                self.check_tags(&tags)?;
                // The admin socket takes any u64; keep the Unix-time sum in range.
                if expiry_secs.is_some_and(|e| e == 0 || e > 100 * 365 * 86400) {
                    return Err(HubError::invalid("an auth key lifetime is between 1 second and 100 years"));
                }
                let expiry = expiry_secs.map(Duration::from_secs).unwrap_or(self.cfg.default_auth_key_expiry);
                let secret = AuthKeyToken::new_secret();
                let row = AuthKeyRow {
                    id: 0,
                    hash: hash_secret(&secret),
                    user_id: user_row.as_ref().map(|u| u.id),
                    reusable,
                    ephemeral,
                    tags: tags.clone(),
                    created: now,
                    expires: Some(now + expiry.as_secs() as i64),
                    revoked: None,
                    used_count: 0,
                    last_used: None,
                };
                let id = self.store.key_insert(&row).map_err(HubError::store)?;
                let owner =
                    if tags.is_empty() { format!("user {}", user.as_deref().unwrap_or("-")) } else { format!("tags {}", tags.join(",")) };
                let kind = format!("{}{}", if reusable { "reusable" } else { "one-off" }, if ephemeral { ", ephemeral" } else { "" });
                self.audit(now, "admin", "key.create", &format!("#{id}"), &format!("{owner} ({kind})"));
                let token = AuthKeyToken { url: self.cfg.url.clone(), server_public: self.cfg.server_public, secret };
                Ok(json!({
                    "id": id,
                    "user": user,
                    "tags": tags,
                    "reusable": reusable,
                    "ephemeral": ephemeral,
                    "expires": row.expires,
                    "token": token.encode(),
                }))
            }
            AdminRequest::KeysList => {
                let keys = self.store.keys().map_err(HubError::store)?;
                Ok(Value::Array(
                    keys.iter()
                        .map(|k| {
                            let status = if k.revoked.is_some() {
                                "revoked"
                            } else if k.expires.is_some_and(|e| e <= now) {
                                "expired"
                            } else if !k.reusable && k.used_count > 0 {
                                "used"
                            } else {
                                "valid"
                            };
                            json!({
                                "id": k.id,
                                "user": k.user_id.and_then(|u| self.users.get(&u).cloned()),
                                "tags": k.tags,
                                "reusable": k.reusable,
                                "ephemeral": k.ephemeral,
                                "created": k.created,
                                "expires": k.expires,
                                "revoked": k.revoked,
                                "used_count": k.used_count,
                                "status": status,
                            })
                        })
                        .collect(),
                ))
            }
            AdminRequest::KeysRevoke { id } => {
                self.store.key_by_id(id).map_err(HubError::store)?.ok_or_else(|| HubError::not_found(format!("no auth key #{id}")))?;
                let changed = self.store.key_revoke(id, now).map_err(HubError::store)?;
                self.audit(now, "admin", "key.revoke", &format!("#{id}"), "");
                Ok(json!({"id": id, "revoked": true, "already_revoked": !changed}))
            }
            AdminRequest::NodesList => {
                let mut v: Vec<&NodeRow> = self.nodes.values().collect();
                v.sort_by_key(|n| n.id);
                Ok(Value::Array(v.into_iter().map(|n| self.node_json(n, now)).collect()))
            }
            AdminRequest::NodesRename { node, name } => {
                let id = self.find_node(&node)?;
                let clean = sanitize_hostname(&name);
                if clean != name {
                    return Err(HubError::invalid(format!(
                        "{name:?} is not a valid node name (lowercase letters, digits and '-'); {clean:?} would be"
                    )));
                }
                if let Some(other) = self.names.get(&clean).filter(|o| **o != id) {
                    let o = &self.nodes[other];
                    return Err(HubError::invalid(format!("name {clean} is taken by node #{} ({})", o.id, o.ip)));
                }
                let mut n = self.nodes[&id].clone();
                let old = std::mem::replace(&mut n.name, clean.clone());
                self.save(n).map_err(HubError::store)?;
                self.audit(now, "admin", "node.rename", &old, &clean);
                self.refresh(id, now);
                Ok(self.node_json(&self.nodes[&id], now))
            }
            AdminRequest::NodesExpire { node } => {
                let id = self.find_node(&node)?;
                let mut n = self.nodes[&id].clone();
                n.key_expiry = Some(now);
                let name = n.name.clone();
                self.save(n).map_err(HubError::store)?;
                self.audit(now, "admin", "node.expire", &name, "");
                self.cut_off(id, ErrorCode::NodeKeyExpired);
                self.refresh(id, now);
                Ok(self.node_json(&self.nodes[&id], now))
            }
            AdminRequest::NodesRemove { node } => {
                let id = self.find_node(&node)?;
                let name = self.nodes[&id].name.clone();
                self.delete_node(id, now, "admin", "removed by admin").map_err(HubError::store)?;
                Ok(json!({"removed": name, "id": id}))
            }
            AdminRequest::NodesTag { node, tags } => {
                let id = self.find_node(&node)?;
                self.check_tags(&tags)?;
                let mut n = self.nodes[&id].clone();
                if tags.is_empty() && n.user_id.is_none() {
                    return Err(HubError::invalid(format!("node {} has no user to fall back to; it must keep at least one tag", n.name)));
                }
                let mut tags = tags;
                tags.sort();
                tags.dedup();
                let was_tagged = !n.tags.is_empty();
                n.tags = tags.clone();
                if !tags.is_empty() {
                    n.key_expiry = None;
                } else if was_tagged {
                    n.key_expiry = Some(now + self.cfg.node_key_expiry.as_secs() as i64);
                }
                let name = n.name.clone();
                self.save(n).map_err(HubError::store)?;
                self.audit(now, "admin", "node.tag", &name, &if tags.is_empty() { "untagged".to_string() } else { tags.join(",") });
                self.refresh(id, now);
                Ok(self.node_json(&self.nodes[&id], now))
            }
            AdminRequest::PolicyGet => Ok(json!({
                "version": self.policy.version,
                "name": self.policy.name,
                "source": self.policy.source,
                "text": self.policy.text,
            })),
            AdminRequest::PolicySet { text, name } => {
                let v = self.set_policy(&text, &name, "admin", now)?;
                Ok(json!({"version": v, "name": name}))
            }
            AdminRequest::PolicyCheck { text, name } => {
                let p = Policy::parse_and_test(&text, &name).map_err(|e| HubError::invalid(e.to_string()))?;
                Ok(json!({
                    "name": name,
                    "ok": true,
                    "tests": p.test_count(),
                    "assertions": p.assertion_count(),
                    "ssh_rules": p.ssh_rule_count(),
                }))
            }
            req @ (AdminRequest::TotpEnroll { .. } | AdminRequest::TotpReset { .. } | AdminRequest::TotpStatus { .. }) => {
                self.totp_admin(req, now)
            }
            AdminRequest::AuditList { limit } => {
                let rows = self.store.audit_recent(limit).map_err(HubError::store)?;
                Ok(serde_json::to_value(rows).unwrap_or(Value::Null))
            }
        }
    }
}

/// Who a registering node will belong to, and on what terms.
pub(super) struct NodeOwner {
    pub user_id: Option<i64>,
    pub tags: Vec<String>,
    pub key_expiry: Option<i64>,
    pub ephemeral: bool,
    pub auth_key_id: Option<i64>,
}

/// What a registering node says about itself (already checked).
pub(super) struct HostInfo<'a> {
    pub hostname: &'a str,
    pub ssh_host_key: Option<String>,
    pub endpoints: Vec<SocketAddr>,
}

fn msg_name(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Register { .. } => "register",
        ClientMsg::Login { .. } => "login",
        ClientMsg::RegisterInteractive { .. } => "register_interactive",
        ClientMsg::ReportEndpoints { .. } => "report_endpoints",
        ClientMsg::Logout => "logout",
        ClientMsg::RotateKey { .. } => "rotate_key",
        ClientMsg::KeepAlive => "keep_alive",
        ClientMsg::Check { .. } => "check",
        ClientMsg::AuditEvents { .. } => "audit_events",
        ClientMsg::RecordingChunk { .. } => "recording_chunk",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::proto::{MapFull, NetMap, ServerMsg};

    fn hub() -> Hub {
        let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
        cfg.ephemeral_grace = Duration::from_millis(0);
        Hub::open(Store::open_memory().unwrap(), cfg, None, 1000).unwrap()
    }

    fn token(h: &mut Hub, req: AdminRequest) -> String {
        let v = h.admin(req, 1000).unwrap();
        AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret
    }

    fn key_for(user: &str) -> AdminRequest {
        AdminRequest::KeysCreate { user: Some(user.into()), reusable: true, ephemeral: false, expiry_secs: None, tags: vec![] }
    }

    fn reg(secret: &str, host: &str) -> ClientMsg {
        ClientMsg::Register {
            auth_key: secret.into(),
            hostname: host.into(),
            ssh_host_key: None,
            endpoints: vec![],
            previous_node_key: None,
        }
    }

    /// Splits outputs into per-connection decoded messages.
    fn drain(h: &mut Hub) -> HashMap<ConnId, Vec<ServerMsg>> {
        let mut m: HashMap<ConnId, Vec<ServerMsg>> = HashMap::new();
        for o in h.take_outputs() {
            if let Out::Send(c, msg) = o {
                let j = serde_json::to_vec(&msg).unwrap();
                m.entry(c).or_default().push(serde_json::from_slice(&j).unwrap());
            }
        }
        m
    }

    fn full_of(msgs: &[ServerMsg]) -> NetMap {
        msgs.iter()
            .find_map(|m| match m {
                ServerMsg::MapFull(f) => Some(NetMap::from_full(MapFull::clone(f))),
                _ => None,
            })
            .expect("a full map")
    }

    #[test]
    fn hostnames_sanitize() {
        assert_eq!(sanitize_hostname("Web1.example.com"), "web1");
        assert_eq!(sanitize_hostname("my laptop!!"), "my-laptop");
        assert_eq!(sanitize_hostname("---"), "node");
        assert_eq!(sanitize_hostname(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn registration_allocates_ips_and_unique_names() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        let a = h.hello(1, [11; 32], reg(&s, "web"), 1000).unwrap();
        let b = h.hello(2, [12; 32], reg(&s, "WEB"), 1000).unwrap();
        let c = h.hello(3, [13; 32], reg(&s, "web.example.com"), 1000).unwrap();
        let names: Vec<_> = [a, b, c].iter().map(|i| h.nodes[i].name.clone()).collect();
        assert_eq!(names, ["web", "web-2", "web-3"]);
        let ips: Vec<_> = [a, b, c].iter().map(|i| h.nodes[i].ip.to_string()).collect();
        assert_eq!(ips, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);
        let out = drain(&mut h);
        // The third node sees the first two (same user, default policy).
        assert_eq!(full_of(&out[&3]).peers.len(), 2);
    }

    #[test]
    fn ip_allocation_skips_network_and_broadcast_like_addresses() {
        let mut h = hub();
        h.next_ip = 254;
        let ip1 = h.alloc_ip().unwrap();
        h.ips.insert(ip1);
        let ip2 = h.alloc_ip().unwrap();
        assert_eq!(ip1.to_string(), "100.64.0.254");
        assert_eq!(ip2.to_string(), "100.64.1.1");
    }

    #[test]
    fn auth_key_refusals_are_clear() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let one = token(
            &mut h,
            AdminRequest::KeysCreate { user: Some("alice".into()), reusable: false, ephemeral: false, expiry_secs: Some(60), tags: vec![] },
        );
        h.hello(1, [1; 32], reg(&one, "a"), 1000).unwrap();
        let e = h.hello(2, [2; 32], reg(&one, "b"), 1001).unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthKey);
        assert!(e.message.contains("one-off") && e.message.contains("keys create"), "{}", e.message);
        let short = token(
            &mut h,
            AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: false, expiry_secs: Some(60), tags: vec![] },
        );
        let e = h.hello(3, [3; 32], reg(&short, "c"), 1061).unwrap_err();
        assert!(e.message.contains("expired on 1970-01-01T00:17:40Z"), "{}", e.message);
        let v = h.admin(key_for("alice"), 1000).unwrap();
        let id = v["id"].as_i64().unwrap();
        let secret = AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret;
        h.admin(AdminRequest::KeysRevoke { id }, 1000).unwrap();
        let e = h.hello(4, [4; 32], reg(&secret, "d"), 1000).unwrap_err();
        assert!(e.message.contains("revoked"), "{}", e.message);
        let e = h.hello(5, [5; 32], reg("nonsense-secret-value", "d"), 1000).unwrap_err();
        assert!(e.message.contains("not recognised"), "{}", e.message);
        let e = h
            .admin(
                AdminRequest::KeysCreate { user: Some("bob".into()), reusable: false, ephemeral: false, expiry_secs: None, tags: vec![] },
                1000,
            )
            .unwrap_err();
        assert!(e.code == ErrorCode::NotFound && e.message.contains("users add bob"), "{e}");
        let e = h
            .admin(
                AdminRequest::KeysCreate {
                    user: None,
                    reusable: false,
                    ephemeral: false,
                    expiry_secs: None,
                    tags: vec!["tag:prod".into()],
                },
                1000,
            )
            .unwrap_err();
        assert!(e.message.contains("not declared"), "{e}");
    }

    #[test]
    fn login_unknown_and_expired_keys() {
        let mut h = hub();
        let e = h.hello(1, [9; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotRegistered);
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        let id = h.hello(2, [2; 32], reg(&s, "a"), 1000).unwrap();
        h.disconnected(2, id, 1000);
        h.admin(AdminRequest::NodesExpire { node: "a".into() }, 1000).unwrap();
        let e = h.hello(3, [2; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, 1001).unwrap_err();
        assert_eq!(e.code, ErrorCode::NodeKeyExpired);
        assert!(e.message.contains("expired on"), "{}", e.message);
        // Re-auth with an auth key revives the same node (same IP and name).
        let id2 = h.hello(4, [2; 32], reg(&s, "a"), 1002).unwrap();
        assert_eq!(id2, id);
        // An auth key never moves a node to another key, even of the same
        // owner: that is a takeover unless the old key proves it.
        h.disconnected(4, id, 1002);
        let msg = ClientMsg::Register {
            auth_key: s.clone(),
            hostname: "a".into(),
            ssh_host_key: None,
            endpoints: vec![],
            previous_node_key: Some(wg::key_to_base64(&[2; 32])),
        };
        let e = h.hello(5, [3; 32], msg, 1003).unwrap_err();
        assert_eq!(e.code, ErrorCode::Protocol);
        assert_eq!(h.nodes[&id].node_key, [2; 32]);
        assert!(!h.by_key.contains_key(&[3; 32]));
        // Rotation over a session of the old key does move it.
        let id4 = h.hello(6, [2; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, 1004).unwrap();
        drain(&mut h);
        h.client_msg(6, id4, ClientMsg::RotateKey { new_node_key: [3; 32] }, 1004);
        let out = drain(&mut h);
        assert!(out[&6].contains(&ServerMsg::KeyRotated { node_key: [3; 32] }), "{out:?}");
        assert_eq!(h.nodes[&id].node_key, [3; 32]);
        assert!(!h.by_key.contains_key(&[2; 32]));
        assert!(h.conns.is_empty(), "the old-key session ends");
    }

    #[test]
    fn a_failed_audit_write_is_counted_and_the_action_stands() {
        let mut h = hub();
        h.store.break_audit();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        assert!(h.users.values().any(|u| u == "alice"));
        assert_eq!(h.audit_failures(), 1);
        assert_eq!(h.admin(AdminRequest::Status, 1000).unwrap()["audit_write_failures"], 1);
    }

    #[test]
    fn relay_authorization_is_a_key_lookup() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        h.hello(1, [1; 32], reg(&s, "a"), 1000).unwrap();
        assert!(h.relay_allowed(&[1; 32], 1000));
        assert!(!h.relay_allowed(&[2; 32], 1000), "unknown key");
        h.admin(AdminRequest::NodesExpire { node: "a".into() }, 1001).unwrap();
        assert!(!h.relay_allowed(&[1; 32], 1001), "expired key");
    }

    #[test]
    fn endpoint_reports_are_paced_and_the_latest_wins() {
        let mut h = hub();
        h.cfg.endpoint_burst = 2;
        h.cfg.endpoint_interval = Duration::from_secs(10);
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        h.hello(1, [1; 32], reg(&s, "viewer"), 1000).unwrap();
        let id = h.hello(2, [2; 32], reg(&s, "noisy"), 1000).unwrap();
        drain(&mut h);
        let t0 = Instant::now();
        let ep = |i: u16| SocketAddr::from(([198, 51, 100, 1], 1000 + i));
        for i in 0..50 {
            h.report_endpoints(id, vec![ep(i)], 1000, t0);
        }
        // A bad endpoint is dropped before it is even paced.
        h.client_msg(2, id, ClientMsg::ReportEndpoints { endpoints: vec!["127.0.0.1:1".parse().unwrap(), ep(50)] }, 1000);
        let changes = |h: &mut Hub| drain(h).get(&1).map_or(0, |m| m.iter().filter(|m| matches!(m, ServerMsg::MapDelta(_))).count());
        assert_eq!(changes(&mut h), 2, "the burst");
        assert_eq!(h.nodes[&id].endpoints, vec![ep(1)]);
        h.tick(1000, t0 + Duration::from_secs(1));
        assert_eq!(changes(&mut h), 0, "no budget yet");
        h.tick(1010, t0 + Duration::from_secs(10));
        assert_eq!(changes(&mut h), 1, "one coalesced change");
        assert_eq!(h.nodes[&id].endpoints, vec![ep(50)]);
        assert_eq!(h.store.nodes().unwrap().iter().find(|n| n.id == id).unwrap().endpoints, vec![ep(50)]);
    }

    #[test]
    fn a_key_lifetime_of_zero_refuses_instead_of_panicking() {
        let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
        cfg.node_key_expiry = Duration::ZERO;
        let mut h = Hub::open(Store::open_memory().unwrap(), cfg, None, 1000).unwrap();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        let e = h.hello(1, [1; 32], reg(&s, "a"), 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::NodeKeyExpired);
        assert!(h.conns.is_empty());
    }

    #[test]
    fn long_names_keep_their_suffix_within_63_characters() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        let long = "x".repeat(100);
        let a = h.hello(1, [1; 32], reg(&s, &long), 1000).unwrap();
        let b = h.hello(2, [2; 32], reg(&s, &long), 1000).unwrap();
        assert_eq!(h.nodes[&a].name.len(), 63);
        assert!(h.nodes[&b].name.ends_with("-2") && h.nodes[&b].name.len() == 63, "{}", h.nodes[&b].name);
        let e = h.hello(3, [3; 32], reg(&s, "bad\nname"), 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::HostInfo);
    }

    #[test]
    fn removing_a_user_removes_their_nodes_from_peers_maps() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let s = token(&mut h, key_for("alice"));
        let a1 = h.hello(1, [1; 32], reg(&s, "a1"), 1000).unwrap();
        let _a2 = h.hello(2, [2; 32], reg(&s, "a2"), 1000).unwrap();
        drain(&mut h);
        h.admin(AdminRequest::UsersRemove { name: "alice".into() }, 1000).unwrap();
        let out = h.take_outputs();
        // Both connections are told their key is gone and closed.
        let closes = out.iter().filter(|o| matches!(o, Out::Close(..))).count();
        assert_eq!(closes, 2);
        assert!(!h.engine.contains(a1 as u64));
        assert!(h.nodes.is_empty());
        assert!(h.store.keys().unwrap().is_empty(), "their keys go too");
    }

    #[test]
    fn ephemeral_nodes_are_deleted_after_going_offline() {
        let mut h = hub();
        h.admin(AdminRequest::UsersAdd { name: "alice".into() }, 1000).unwrap();
        let eph = token(
            &mut h,
            AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: true, expiry_secs: None, tags: vec![] },
        );
        let s = token(&mut h, key_for("alice"));
        let keep = h.hello(1, [1; 32], reg(&s, "keep"), 1000).unwrap();
        let e = h.hello(2, [2; 32], reg(&eph, "ci-runner"), 1000).unwrap();
        drain(&mut h);
        h.tick(1000, Instant::now());
        assert!(h.nodes.contains_key(&e), "online ephemeral nodes stay");
        h.disconnected(2, e, 1001);
        h.tick(1001, Instant::now() + Duration::from_millis(1));
        assert!(!h.nodes.contains_key(&e));
        let out = drain(&mut h);
        let removed: Vec<_> = out[&1]
            .iter()
            .filter_map(|m| match m {
                ServerMsg::MapDelta(d) => Some(d.peers_removed.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(removed, vec![wg::key_to_base64(&[2; 32])]);
        assert!(h.nodes.contains_key(&keep));
    }

    #[test]
    fn bad_policy_never_replaces_good_one() {
        let mut h = hub();
        let before = h.policy_version();
        let e = h.admin(AdminRequest::PolicySet { text: "[[ssh]]\nsrc = [\"*\"]\n".into(), name: "bad.toml".into() }, 1000).unwrap_err();
        assert!(e.code == ErrorCode::Invalid && e.message.contains("bad.toml:") && e.message.contains("stays in force"), "{e}");
        assert_eq!(h.policy_version(), before);
        let team = include_str!("../../../../policies/team.toml");
        let v = h.admin(AdminRequest::PolicySet { text: team.into(), name: "team.toml".into() }, 1000).unwrap();
        assert_eq!(v["version"], before + 1);
        // Same text again: no new version.
        h.admin(AdminRequest::PolicySet { text: team.into(), name: "team.toml".into() }, 1000).unwrap();
        assert_eq!(h.policy_version(), before + 1);
    }
}
