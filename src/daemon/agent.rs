//! The node agent in control mode: `tailgate up --authkey TOKEN`.
//!
//! It keeps the data plane (WireGuard peers, tailnet address), the SSH
//! server's identities and policy, the name directory and the known_hosts
//! file in step with the netmap from the control server. The netmap is cached
//! on disk so the node starts and serves from it while control is down, and
//! control can come and go without disturbing open sessions.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::control::wire::proto::{PeerInfo, PolicyInfo, SelfInfo, canonical_ssh_host_key, check_node_name};
use crate::control::{AuthKeyToken, ControlClient, ControlTarget, NetMap, NodeHello};
use crate::daemon::config::{ensure_private_dir, write_secret};
use crate::daemon::directory::{Directory, Entry};
use crate::daemon::identity::{Identity, TableResolver};
use crate::daemon::localapi::Daemon;
use crate::dataplane::node::{Node, NodeConfig};
use crate::dataplane::wg;
use crate::key::{Key, PrivateKey};
use crate::policy::Policy;
use crate::ssh::PolicyHandle;
use secrecy::ExposeSecret;

pub(crate) const NODE_KEY_FILE: &str = "node.key";
pub(crate) const CONTROL_FILE: &str = "control.json";
pub(crate) const NETMAP_CACHE_FILE: &str = "netmap.json";
pub(crate) const KNOWN_HOSTS_FILE: &str = "known_hosts";

const LOCAL_ADDRESS_POLL: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where this node's control server is (saved from the auth key on first join).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SavedControl {
    pub url: String,
    pub server_public: String,
    /// PEM CA certificate(s) an `https://` URL must chain to (`--control-ca`),
    /// kept so later starts verify the same way without the flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Joined by signing in with the identity provider: an expired node
    /// key asks for a sign-in again instead of an auth key.
    #[serde(default)]
    pub sign_in: bool,
}

impl SavedControl {
    fn target(&self) -> Result<ControlTarget> {
        Ok(ControlTarget {
            url: self.url.clone(),
            server_public: wg::key_from_base64(&self.server_public).context("corrupt control.json")?,
            ca_pem: self.ca_pem.clone(),
        })
    }
}

/// Pins the CA certificate(s) in `pem` for this state directory's control
/// server (replacing the system roots for its `https://` URL).
pub(crate) fn pin_control_ca(state_dir: &Path, target: &mut ControlTarget, pem: &str, from: &Path) -> Result<()> {
    crate::control::transport::parse_ca(pem).map_err(|e| anyhow::anyhow!("--control-ca {}: {e}", from.display()))?;
    let saved = SavedControl {
        url: target.url.clone(),
        server_public: wg::key_to_base64(&target.server_public),
        ca_pem: Some(pem.into()),
        sign_in: saved_control(state_dir).is_some_and(|s| s.sign_in),
    };
    write_secret(&state_dir.join(CONTROL_FILE), serde_json::to_string_pretty(&saved)?.as_bytes())?;
    target.ca_pem = Some(pem.into());
    Ok(())
}

/// The netmap as cached on disk.
#[derive(Serialize, Deserialize)]
struct CachedMap {
    self_node: SelfInfo,
    domain: String,
    peers: Vec<PeerInfo>,
    policy: PolicyInfo,
}

impl From<&NetMap> for CachedMap {
    fn from(m: &NetMap) -> Self {
        CachedMap {
            self_node: m.self_node.clone(),
            domain: m.domain.clone(),
            peers: m.peers.values().cloned().collect(),
            policy: m.policy.clone(),
        }
    }
}

impl From<CachedMap> for NetMap {
    fn from(c: CachedMap) -> Self {
        NetMap { self_node: c.self_node, domain: c.domain, peers: c.peers.into_iter().map(|p| (p.node_key, p)).collect(), policy: c.policy }
    }
}

/// Load the node's WireGuard key, creating it (0600) on first run.
pub(crate) fn load_or_create_node_key(state_dir: &Path) -> Result<PrivateKey> {
    let path = state_dir.join(NODE_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => PrivateKey::from_base64(&s).with_context(|| format!("{}: not a WireGuard private key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = wg::generate_private_key();
            write_secret(&path, format!("{}\n", k.to_base64().expose_secret()).as_bytes())?;
            Ok(k)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The control server this state directory belongs to, from an auth key
/// (saved for later starts) or from the saved file.
pub(crate) fn control_target(state_dir: &Path, authkey: Option<&str>) -> Result<(ControlTarget, Option<String>)> {
    let path = state_dir.join(CONTROL_FILE);
    if let Some(token) = authkey {
        let t = AuthKeyToken::parse(token.trim()).map_err(|e| anyhow::anyhow!("--authkey: {e}"))?;
        let saved = SavedControl { url: t.url.clone(), server_public: wg::key_to_base64(&t.server_public), ca_pem: None, sign_in: false };
        write_secret(&path, serde_json::to_string_pretty(&saved)?.as_bytes())?;
        return Ok((ControlTarget::from(&t), Some(t.secret.clone())));
    }
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has not joined a tailnet yet; run `tailgate up --authkey TOKEN` once (an admin makes one with `tailgate control keys create`), \
             or `tailgate up --login-server URL` to sign in with your identity provider",
            state_dir.display()
        )
    })?;
    let saved: SavedControl = serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
    Ok((saved.target()?, None))
}

/// Addresses where peers may reach our UDP socket: every interface address
/// that [`crate::dataplane::endpoint::is_valid_endpoint`] accepts. Loopback and
/// link-local are left out: peers never probe them and control refuses them,
/// so nodes on one host meet on another interface address or the relay.
/// IPv6 addresses only when `udp` (our socket) is dual-stack.
pub(crate) fn local_endpoints(udp: SocketAddr) -> Vec<SocketAddr> {
    let (port, v6) = (udp.port(), udp.is_ipv6());
    let mut v: Vec<SocketAddr> = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(s) = a.address.as_ref() else { continue };
            let ip = match (s.as_sockaddr_in(), s.as_sockaddr_in6()) {
                (Some(sa), _) => IpAddr::V4(sa.ip()),
                (None, Some(sa)) if v6 => IpAddr::V6(sa.ip()),
                _ => continue,
            };
            let e = SocketAddr::new(ip, port);
            if crate::dataplane::endpoint::is_valid_endpoint(&e) && !v.iter().any(|x| x.ip() == e.ip()) {
                v.push(e);
            }
        }
    }
    v
}

pub(crate) fn cached_netmap(state_dir: &Path) -> Option<NetMap> {
    let text = std::fs::read_to_string(state_dir.join(NETMAP_CACHE_FILE)).ok()?;
    let c: CachedMap = serde_json::from_str(&text).ok()?;
    Some(c.into())
}

/// Keeps node, SSH, directory and files in step with the netmap.
pub(crate) struct Applier {
    pub node: Arc<Node>,
    pub resolver: TableResolver,
    pub policy: Option<PolicyHandle>,
    pub daemon: Daemon,
    pub state_dir: PathBuf,
    pub ssh_host_key: Option<String>,
    current: Option<NetMap>,
    /// Peers this process has greeted with a handshake while they were online.
    greeted: std::collections::HashSet<Key>,
}

impl Applier {
    pub(crate) fn new(
        node: Arc<Node>,
        resolver: TableResolver,
        policy: Option<PolicyHandle>,
        daemon: Daemon,
        state_dir: PathBuf,
        ssh_host_key: Option<String>,
    ) -> Self {
        Applier { node, resolver, policy, daemon, state_dir, ssh_host_key, current: None, greeted: Default::default() }
    }

    pub(crate) fn current(&self) -> Option<&NetMap> {
        self.current.as_ref()
    }

    /// Make the world match `map`, changing only what differs.
    pub(crate) fn apply(&mut self, map: NetMap) {
        let old_peers: BTreeMap<Key, PeerInfo> = self.current.as_ref().map(|m| m.peers.clone()).unwrap_or_default();
        if self.current.as_ref().map(|m| &m.self_node.ips) != Some(&map.self_node.ips) {
            self.node.set_addresses(map.self_node.ips.clone());
        }
        for (k, p) in &old_peers {
            if !map.peers.contains_key(k) {
                tracing::info!(peer = %p.name, "peer removed from the netmap; cutting its connections");
                self.node.remove_peer(k, &p.ips);
                self.greeted.remove(k);
            }
        }
        for (k, p) in &map.peers {
            if old_peers.get(k) != Some(p) {
                if let Err(e) = self.node.upsert_peer(p.peer_config()) {
                    tracing::warn!(peer = %p.name, "cannot add peer: {e:#}");
                }
                self.node.set_peer_endpoints(k, &p.endpoints);
            }
            // After our restart, or the peer's (it went offline and came
            // back), either side may hold a session the other forgot. A fresh
            // handshake replaces it at once instead of after WireGuard's 15 s.
            let came_online = p.online && old_peers.get(k).is_some_and(|o| !o.online);
            if p.online && (self.greeted.insert(*k) || came_online) {
                self.node.greet(k);
            }
        }
        self.resolver.replace(map.self_node.identity(), map.identities());
        let policy_changed = self.current.as_ref().map(|m| &m.policy) != Some(&map.policy);
        if policy_changed && let Some(handle) = &self.policy {
            match Policy::parse(&map.policy.text, &map.policy.name) {
                Ok(p) => {
                    tracing::info!(version = map.policy.version, "policy in force");
                    handle.replace(p);
                }
                Err(e) => {
                    tracing::error!("policy version {} from control does not parse; keeping the previous one: {e}", map.policy.version)
                }
            }
        }
        let dir = directory_of(&map, self.ssh_host_key.clone());
        if let Err(e) = write_known_hosts(&self.state_dir, &dir) {
            tracing::warn!("cannot write known_hosts: {e:#}");
        }
        *self.daemon.directory.write().unwrap_or_else(|e| e.into_inner()) = dir;
        if let Ok(json) = serde_json::to_vec_pretty(&CachedMap::from(&map))
            && let Err(e) = write_secret(&self.state_dir.join(NETMAP_CACHE_FILE), &json)
        {
            tracing::warn!("cannot cache the netmap: {e}");
        }
        self.current = Some(map);
    }

    /// Drop every peer (key expired or node removed).
    pub(crate) fn cut_off(&mut self) {
        if let Some(mut m) = self.current.clone() {
            m.peers.clear();
            self.apply(m);
        }
    }

    pub(crate) fn set_control_status(&self, s: String) {
        self.daemon.extra.write().unwrap_or_else(|e| e.into_inner()).insert("control".into(), serde_json::Value::String(s));
    }
}

/// The name directory for `map`. Names, the domain and host keys come from
/// the control server but originate with other nodes, and they end up in
/// `known_hosts`, ssh_config blocks and ssh command lines, so they are
/// checked again here: a peer whose name or host key is not in the one
/// accepted form is left out (with a warning) rather than written, and a
/// bad domain is dropped. Leaving a peer out (instead of keeping it without
/// a key) matters: without a pinned key `tailgate ssh` would fall back to
/// trust on first use.
pub fn directory_of(map: &NetMap, own_host_key: Option<String>) -> Directory {
    let s = &map.self_node;
    let domain = match crate::daemon::directory::check_domain(&map.domain) {
        Ok(()) => Some(map.domain.clone()),
        Err(e) => {
            tracing::warn!("control sent an unusable tailnet domain; names work without it: {e}");
            None
        }
    };
    let me = match check_node_name(&s.name) {
        Ok(()) => Some(Entry::from_identity(s.identity(), s.ips.clone(), own_host_key)),
        Err(e) => {
            tracing::warn!("control sent an unusable name for this node: {e}");
            None
        }
    };
    let peers = map
        .peers
        .values()
        .filter_map(|p| {
            let key = match p.ssh_host_key.as_deref().map(canonical_ssh_host_key).transpose() {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(peer = %crate::key::ShortKey(p.node_key), "peer left out of known_hosts and the directory: {e}");
                    return None;
                }
            };
            if let Err(e) = check_node_name(&p.name) {
                tracing::warn!(peer = %crate::key::ShortKey(p.node_key), "peer left out of known_hosts and the directory: {e}");
                return None;
            }
            Some(Entry { online: Some(p.online), ..Entry::from_identity(p.identity(), p.ips.clone(), key) })
        })
        .collect();
    Directory { domain, me, peers }
}

/// `state_dir/known_hosts`: one line per peer with a host key, keyed by its
/// short name (clients pin with `HostKeyAlias`), fully qualified name and IPs.
/// Every field is checked at the point of writing too, whoever built `dir`.
pub fn write_known_hosts(state_dir: &Path, dir: &Directory) -> Result<()> {
    let mut out = String::from("# written by tailgate from the netmap; do not edit\n");
    let domain = dir.domain.as_deref().filter(|d| crate::daemon::directory::check_domain(d).is_ok());
    for e in &dir.peers {
        let Some(key) = &e.ssh_host_key else { continue };
        let (key, name) = match (canonical_ssh_host_key(key), check_node_name(&e.name)) {
            (Ok(k), Ok(())) => (k, &e.name),
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!("not writing a known_hosts line for peer {}: {err}", e.node_key);
                continue;
            }
        };
        let mut names = vec![name.clone()];
        if let Some(d) = domain {
            names.push(format!("{name}.{d}"));
        }
        names.extend(e.ips.iter().map(|ip| ip.to_string()));
        out.push_str(&format!("{} {key}\n", names.join(",")));
    }
    write_secret(&state_dir.join(KNOWN_HOSTS_FILE), out.as_bytes())?;
    Ok(())
}

fn placeholder_identity(key: &PrivateKey) -> Identity {
    Identity {
        node_key: wg::key_to_base64(&wg::public_key_of(key)),
        node_name: "unjoined".into(),
        user: None,
        tags: vec![],
        ip: IpAddr::from([0, 0, 0, 0]),
        groups: Vec::new(),
    }
}

pub(crate) struct AgentOptions {
    pub state_dir: PathBuf,
    pub authkey: Option<String>,
    pub hostname: String,
    pub listen_port: u16,
    pub ssh_port: Option<u16>,
    /// `--control-ca FILE`: pin this CA for an `https://` control URL.
    pub control_ca: Option<PathBuf>,
    /// Join by signing in with the identity provider at this control server.
    pub login_server: Option<String>,
    /// The control server's key, base64, instead of asking the server.
    pub login_server_key: Option<String>,
    /// Sign in again even with a valid node key.
    pub force_reauth: bool,
}

/// The saved control server, if this state directory has joined one.
fn saved_control(state_dir: &Path) -> Option<SavedControl> {
    serde_json::from_str(&std::fs::read_to_string(state_dir.join(CONTROL_FILE)).ok()?).ok()
}

/// Where to log in, the auth key if any, and whether to sign in with the
/// identity provider (a `--login-server` join, a node that joined that
/// way, or `--force-reauth`).
async fn resolve_target(opts: &AgentOptions, ca_pem: Option<&str>) -> Result<(ControlTarget, Option<String>, bool)> {
    if opts.authkey.is_some() {
        let (t, secret) = control_target(&opts.state_dir, opts.authkey.as_deref())?;
        return Ok((t, secret, false));
    }
    let saved = saved_control(&opts.state_dir);
    if let Some(url) = &opts.login_server {
        let url = url.trim_end_matches('/');
        if let Some(s) = saved.filter(|s| s.url == url && opts.login_server_key.is_none()) {
            return Ok((s.target()?, None, true));
        }
        let t = crate::daemon::signin::target_for(url, opts.login_server_key.as_deref(), ca_pem).await?;
        let saved = SavedControl { url: t.url.clone(), server_public: wg::key_to_base64(&t.server_public), ca_pem: None, sign_in: true };
        write_secret(&opts.state_dir.join(CONTROL_FILE), serde_json::to_string_pretty(&saved)?.as_bytes())?;
        return Ok((t, None, true));
    }
    let (t, _) = control_target(&opts.state_dir, None)?;
    let sign_in = opts.force_reauth || saved.is_some_and(|s| s.sign_in);
    Ok((t, None, sign_in))
}

/// A running agent: the node plus the task following the control server.
pub(crate) struct Agent {
    pub node: Arc<Node>,
    pub daemon: Daemon,
}

/// Join (or rejoin) the tailnet and keep following the netmap.
pub(crate) async fn start(opts: AgentOptions) -> Result<Agent> {
    ensure_private_dir(&opts.state_dir)?;
    let key = load_or_create_node_key(&opts.state_dir)?;
    let ca = match &opts.control_ca {
        Some(file) => Some((file, std::fs::read_to_string(file).with_context(|| format!("--control-ca: reading {}", file.display()))?)),
        None => None,
    };
    let (mut target, auth_secret, interactive) = resolve_target(&opts, ca.as_ref().map(|(_, pem)| pem.as_str())).await?;
    if let Some((file, pem)) = &ca {
        pin_control_ca(&opts.state_dir, &mut target, pem, file)?;
    }
    let mut nc = NodeConfig::new(key.clone(), vec![]);
    nc.listen = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), opts.listen_port);
    nc.manage_paths = true;
    // Refuse inbound connections until the policy's filter is installed.
    nc.inbound = Some(Arc::new(crate::dataplane::filter::DenyAll));
    let node = Arc::new(Node::start(nc).await?);
    node.set_my_endpoints(local_endpoints(node.udp_addr()));
    // The control server answers STUN on the UDP port matching its TCP port.
    if let Ok((host, port)) = crate::control::wire::token::parse_url(&target.url)
        && let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await
    {
        let stun = stun_server_of(addrs.collect(), node.udp_addr());
        tracing::info!(server = ?stun, "STUN: the control server's UDP port");
        node.set_stun_server(stun);
    }
    let resolver = TableResolver::new(placeholder_identity(&key), []);
    // Until a netmap arrives the resolver knows no peers, so every SSH
    // connection is reset; the default policy is never consulted.
    // The audit shipper gets a link on every control connection.
    let (ship_tx, ship_rx) = tokio::sync::mpsc::channel(4);
    let mut ship_tx = Some(ship_tx);
    let (policy, host_key, check) = match opts.ssh_port {
        Some(port) => {
            let svc = crate::daemon::serve::serve_ssh(&node, Arc::new(resolver.clone()), Policy::default_static(), &opts.state_dir, port)?;
            tokio::spawn(crate::daemon::ship::run(svc.server.journal().clone(), opts.state_dir.clone(), ship_rx));
            let check = svc.server.check_link();
            check.set_disconnected("not connected yet".into());
            (svc.policy, Some(svc.server.host_public_key_openssh()), Some(check))
        }
        // No SSH server, but the inbound filter still follows control's policy.
        None => {
            ship_tx = None;
            (PolicyHandle::new(Policy::default_static()), None, None)
        }
    };
    crate::dataplane::filter::install(&node, Arc::new(resolver.clone()), policy.clone(), opts.ssh_port);
    let policy = Some(policy);
    let daemon = Daemon::new(node.clone(), Directory::default());
    if let Err(e) = crate::daemon::localapi::serve(daemon.clone(), &opts.state_dir) {
        tracing::warn!("local API unavailable: {e:#}");
    }
    let mut applier = Applier::new(node.clone(), resolver, policy, daemon.clone(), opts.state_dir.clone(), host_key.clone());
    let mut hello = NodeHello {
        auth_key: auth_secret,
        hostname: opts.hostname.clone(),
        ssh_host_key: host_key,
        endpoints: local_endpoints(node.udp_addr()),
        interactive,
        force_reauth: opts.force_reauth,
        sign_in_urls: None,
    };
    let prompt = interactive.then(crate::daemon::signin::Prompt::start);
    hello.sign_in_urls = prompt.as_ref().map(|p| p.urls.clone());
    // The first contact decides whether we can start at all: a refused auth
    // key is fatal; an unreachable server is not if we have a cached map.
    let first = ControlClient::connect(&target, &key, hello.clone()).await;
    if let Some(p) = &prompt {
        p.done();
    }
    let first = match first {
        Ok((mut client, map)) => {
            give_ship_link(&ship_tx, &mut client);
            applier.apply(map);
            applier.set_control_status(format!("connected to {}", target.url));
            if let Some(c) = &check {
                c.set_connected(client.check_handle());
            }
            Some(client)
        }
        Err(e) if e.is_transient() => match cached_netmap(&opts.state_dir) {
            Some(map) => {
                tracing::warn!("{e}; serving from the cached netmap and retrying");
                applier.apply(map);
                applier.set_control_status(format!("disconnected ({e}); using the cached netmap"));
                None
            }
            None => bail!("{e}"),
        },
        Err(e) => bail!("{e}"),
    };
    // Only now: the relay admits registered node keys only. Started before
    // the first login, a new node was refused and then waited out a growing
    // backoff (0.5-3.5 s at start, up to 30 s after a slow browser sign-in)
    // before it had a relay, and with it its first direct path.
    tokio::spawn(keep_relay(node.clone(), target.clone(), key.clone()));
    // Registered: from now on we log in with the node key.
    hello.auth_key = None;
    hello.force_reauth = false;
    // Follows control for the life of the process.
    tokio::spawn(follow(applier, target, key, hello, first, check, ship_tx));
    Ok(Agent { node, daemon })
}

/// Sends datagrams into the relay connection without blocking the data plane.
struct RelayAdapter(crate::relay::client::RelaySender);

impl crate::dataplane::node::RelayLink for RelayAdapter {
    fn send(&self, dst: &Key, datagram: &[u8]) -> bool {
        self.0.send(dst, datagram).is_ok()
    }
}

/// Keep a relay connection up for as long as the node runs.
async fn keep_relay(node: Arc<Node>, target: ControlTarget, key: PrivateKey) {
    let mut backoff = BACKOFF_MIN;
    let inbound = node.relay_inbound();
    loop {
        let opts = crate::relay::client::RelayClientOptions { ca_pem: target.ca_pem.clone(), ..Default::default() };
        match crate::relay::client::RelayClient::connect_with(&target.url, &target.server_public, &key, opts).await {
            Ok((tx, mut rx)) => {
                tracing::info!("relay connected");
                backoff = BACKOFF_MIN;
                node.set_relay(Some(Arc::new(RelayAdapter(tx))));
                loop {
                    match rx.recv_batch().await {
                        Ok(b) => {
                            if inbound.send(b).await.is_err() {
                                return; // node gone
                            }
                        }
                        Err(e) => {
                            tracing::warn!("relay connection lost: {e}; reconnecting");
                            break;
                        }
                    }
                }
                node.set_relay(None);
            }
            Err(e) => tracing::debug!("relay unavailable: {e}"),
        }
        tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 250)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Which of the control server's addresses to ask STUN: IPv4 first (that is
/// where NAT hides our endpoint; IPv6 addresses are reported as they are),
/// else IPv6 when our socket is dual-stack and the host has a route there
/// (an IPv6-only host).
fn stun_server_of(addrs: Vec<SocketAddr>, udp: SocketAddr) -> Option<SocketAddr> {
    let routed = |a: &SocketAddr| {
        let any: SocketAddr = if a.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        // A UDP connect sends nothing; it fails with ENETUNREACH without a route.
        std::net::UdpSocket::bind(any).and_then(|s| s.connect(a)).is_ok()
    };
    let v4 = addrs.iter().copied().find(|a| a.is_ipv4() && routed(a));
    v4.or_else(|| addrs.iter().copied().find(|a| a.is_ipv6() && udp.is_ipv6() && routed(a)))
}

/// Our endpoints as peers should try them: the public one STUN saw first,
/// then the one the gateway maps for us (NAT-PMP), then local addresses.
fn my_endpoints(node: &Node, public: Option<SocketAddr>, mapped: Option<SocketAddr>) -> Vec<SocketAddr> {
    let mut v = local_endpoints(node.udp_addr());
    // A control server on loopback sees us at 127.0.0.1: not an endpoint.
    for p in [mapped, public].into_iter().flatten().filter(crate::dataplane::endpoint::is_valid_endpoint) {
        v.retain(|e| *e != p);
        v.insert(0, p);
    }
    v
}

fn give_ship_link(ship: &Option<tokio::sync::mpsc::Sender<crate::control::client::ShipLink>>, c: &mut ControlClient) {
    if let (Some(tx), Some(link)) = (ship, c.ship_link()) {
        let _ = tx.try_send(link);
    }
}

async fn follow(
    mut applier: Applier,
    target: ControlTarget,
    key: PrivateKey,
    mut hello: NodeHello,
    mut client: Option<ControlClient>,
    check: Option<crate::ssh::check::CheckLink>,
    ship: Option<tokio::sync::mpsc::Sender<crate::control::client::ShipLink>>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut public = applier.node.public_endpoint();
    // STUN may have answered before we subscribed: look at the value once.
    public.mark_changed();
    // Lives as long as we follow control; dropping it deletes the mapping.
    let portmap = crate::dataplane::portmap::start(applier.node.udp_addr().port());
    let (_no_mapper, none) = tokio::sync::watch::channel(None);
    let mut mapped = portmap.as_ref().map_or(none, |p| p.mapped());
    let mut local_check = tokio::time::interval(LOCAL_ADDRESS_POLL);
    local_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(mut c) = client.take() {
            backoff = BACKOFF_MIN;
            loop {
                let update = tokio::select! {
                    u = c.next_update() => u,
                    // A new local address (Wi-Fi to Ethernet, DHCP) is a network
                    // change too; interfaces have no cheap portable event, so look.
                    _ = local_check.tick() => {
                        let eps = my_endpoints(&applier.node, *public.borrow(), *mapped.borrow());
                        if eps != hello.endpoints {
                            public.mark_changed();
                        }
                        continue;
                    }
                    m = mapped.changed() => {
                        // A new or lost port mapping is a new endpoint set.
                        if m.is_ok() {
                            public.mark_changed();
                        }
                        continue;
                    }
                    changed = public.changed() => {
                        if changed.is_ok() {
                            let eps = my_endpoints(&applier.node, *public.borrow(), *mapped.borrow());
                            tracing::info!(endpoints = ?eps, stun = ?*public.borrow(), "our endpoints changed; telling control");
                            applier.node.set_my_endpoints(eps.clone());
                            applier.node.network_changed();
                            hello.endpoints = eps.clone();
                            if let Err(e) = c.report_endpoints(eps).await {
                                tracing::warn!("{e}; reconnecting");
                                break;
                            }
                        }
                        continue;
                    }
                };
                match update {
                    Ok(delta) => {
                        if delta.key_expired {
                            tracing::error!(
                                "this node's key expired or the node was removed; rejoin with `tailgate up --authkey TOKEN` \
                                 (or `tailgate up --force-reauth` if it joined by signing in)"
                            );
                            applier.cut_off();
                            applier.set_control_status("node key expired: rejoin with --authkey".into());
                            break;
                        }
                        if let Some(mut m) = applier.current().cloned() {
                            m.apply(&delta);
                            applier.apply(m);
                        }
                    }
                    Err(e) => {
                        tracing::warn!("{e}; reconnecting");
                        applier.set_control_status(format!("disconnected ({e}); reconnecting"));
                        break;
                    }
                }
            }
            if let Some(l) = &check {
                l.set_disconnected("the connection to the control server was lost".into());
            }
        }
        tokio::time::sleep(backoff + Duration::from_millis(rand::random::<u64>() % 250)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        hello.endpoints = my_endpoints(&applier.node, *public.borrow(), *mapped.borrow());
        match ControlClient::connect(&target, &key, hello.clone()).await {
            Ok((mut c, map)) => {
                tracing::info!("reconnected to control");
                give_ship_link(&ship, &mut c);
                applier.apply(map);
                applier.set_control_status(format!("connected to {}", target.url));
                if let Some(l) = &check {
                    l.set_connected(c.check_handle());
                }
                client = Some(c);
            }
            Err(e) => {
                tracing::debug!("control still unreachable: {e}");
                applier.set_control_status(format!("disconnected ({e}); retrying"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_leave_out_loopback_and_link_local() {
        // Every host has lo (127.0.0.1); it used to be reported, last.
        let eps = local_endpoints("[::]:41641".parse().unwrap());
        assert!(eps.iter().all(crate::dataplane::endpoint::is_valid_endpoint), "{eps:?}");
        assert!(!eps.iter().any(|e| e.ip().is_loopback()), "{eps:?}");
    }
}
