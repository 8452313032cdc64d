//! Control protocol messages (JSON in frames) and the node's view of them.
//!
//! Encoding: `serde_json`, one message per frame, internally tagged by a
//! `type` field (`{"type":"login", ...}`). Keys are standard base64 (as in
//! wg-quick files). Unknown fields are ignored so either side can add
//! optional fields without a version bump; removing or retyping one needs a
//! new [`crate::control::PROTOCOL_VERSION`].
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};

use crate::daemon::identity::Identity;
use crate::dataplane::wg::{self, PeerConfig};
use crate::key::Key;
use crate::policy::{Policy, PolicyErrors};

/// serde for [`Key`] as standard base64.
pub(crate) mod b64key {
    use super::*;
    /// The key as standard base64 (44 characters).
    pub(crate) fn serialize<S: Serializer>(k: &Key, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&wg::key_to_base64(k))
    }
    /// A standard base64 32-byte key; anything else is a parse error.
    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        let s = String::deserialize(d)?;
        wg::key_from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// Why a host key or node name from the network was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostInfoError {
    /// Not exactly one canonical `ssh-ed25519` key (first 60 characters kept).
    #[error(
        "ssh host key {0:?} is not accepted: it must be exactly `ssh-ed25519 BASE64` \
         (one Ed25519 public key, no comment, no other bytes)"
    )]
    HostKey(String),
    /// Not a DNS label of our alphabet (first 80 characters kept).
    #[error("node name {0:?} is not valid: 1 to 63 lowercase letters, digits and '-', not starting or ending with '-'")]
    Name(String),
}

/// The one host key form a node may publish: `ssh-ed25519 <base64 blob>`,
/// parsed by `ssh-key` and re-encoded, so a string that is not byte for byte
/// the canonical encoding (a comment, a second line, `@revoked`, padding
/// tricks) is refused. Every peer writes this string into `known_hosts`,
/// so anything beyond one key would let one node edit every peer's pins.
pub(crate) fn canonical_ssh_host_key(k: &str) -> Result<String, HostInfoError> {
    let refuse = || HostInfoError::HostKey(k.chars().take(60).collect());
    // 80 covers `ssh-ed25519 ` plus the 68-character base64 of a 51-byte blob.
    if k.len() > 128 || !k.starts_with("ssh-ed25519 ") || k.bytes().filter(|b| *b == b' ').count() != 1 {
        return Err(refuse());
    }
    let key = russh::keys::PublicKey::from_openssh(k).map_err(|_| refuse())?;
    if key.algorithm() != russh::keys::Algorithm::Ed25519 || !key.comment().is_empty() {
        return Err(refuse());
    }
    let canon = key.to_openssh().map_err(|_| refuse())?;
    if canon != k {
        return Err(refuse());
    }
    Ok(canon)
}

/// A node name as the control server assigns it (`sanitize_hostname`'s
/// alphabet): safe as a `known_hosts` host, an ssh_config `Host` word and a
/// DNS label, with no pattern characters (`*`, `?`, `!`, `,`).
pub(crate) fn check_node_name(name: &str) -> Result<(), HostInfoError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok { Ok(()) } else { Err(HostInfoError::Name(name.chars().take(80).collect())) }
}

/// A recording's session id as nodes make them (`ssh::new_id`: 32 hex
/// digits). The server builds file names from it, so nothing else passes.
pub(crate) fn valid_session_id(s: &str) -> bool {
    (8..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Node → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message of a node that joins with an auth key. If the node key
    /// (from the Noise handshake) is already registered and not expired, this
    /// is treated as a [`ClientMsg::Login`] and the auth key is not used.
    Register {
        /// The secret part of the auth key token.
        auth_key: String,
        /// The name the node asks for (its OS host name, usually); the
        /// server sanitizes it and adds a suffix if it is taken.
        hostname: String,
        /// The node's SSH host key, `ssh-ed25519 BASE64` (peers pin it).
        #[serde(default)]
        ssh_host_key: Option<String>,
        /// Where peers may reach the node's WireGuard UDP socket.
        #[serde(default)]
        endpoints: Vec<SocketAddr>,
        /// Refused when present: an auth key does not prove possession of
        /// another node's key, so it cannot move that node. Key rotation is
        /// [`ClientMsg::RotateKey`] over a session of the old key. Kept in
        /// the schema so an old node gets a clear refusal, not a parse error.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_node_key: Option<String>,
    },
    /// First message of a node whose key is already registered.
    Login {
        /// A new host name to store (the assigned node name stays).
        #[serde(default)]
        hostname: Option<String>,
        /// A new SSH host key (`None`: keep the stored one).
        #[serde(default)]
        ssh_host_key: Option<String>,
        /// The node's current endpoints (replace the stored ones).
        #[serde(default)]
        endpoints: Vec<SocketAddr>,
    },
    /// First message of a node that joins by signing in with the identity
    /// provider (no auth key). A node key that is registered, not expired
    /// and not asking for `force_reauth` just logs in. Otherwise the server
    /// answers [`ServerMsg::SignIn`] with a short-lived single-use URL and
    /// holds the connection until the person has signed in there; then it
    /// registers the node for that user and goes on as after a login.
    RegisterInteractive {
        /// As in [`ClientMsg::Register`].
        hostname: String,
        /// As in [`ClientMsg::Register`].
        #[serde(default)]
        ssh_host_key: Option<String>,
        /// As in [`ClientMsg::Register`].
        #[serde(default)]
        endpoints: Vec<SocketAddr>,
        /// Sign in again even though the node key is valid (renews its expiry,
        /// refreshes the user's groups, may change the user).
        #[serde(default)]
        force_reauth: bool,
    },
    /// Replace the node's reported endpoints (peers get a delta).
    ReportEndpoints {
        /// Every endpoint the node knows now (STUN, port mapping, local
        /// addresses); the server drops unusable ones and paces changes.
        endpoints: Vec<SocketAddr>,
    },
    /// Leave the tailnet: an ephemeral node is deleted, any other node's key
    /// expires (it needs a new auth key to come back).
    Logout,
    /// Move this node (name, IP, owner, host key) to `new_node_key`. Only
    /// valid on a session authenticated (Noise) as the current key, which is
    /// what proves the rotation. The server answers `key_rotated` and closes;
    /// the node then logs in with the new key.
    RotateKey {
        /// The WireGuard public key the node moves to (unused so far).
        #[serde(with = "b64key")]
        new_node_key: Key,
    },
    /// Sent when the node has had nothing else to say for the announced
    /// keepalive period, so the server knows the connection is alive.
    KeepAlive,
    /// Audit lines from the node's journal (`audit.jsonl`), in id order. The
    /// server stores each once per (node, id) and answers [`ServerMsg::ShipAck`].
    AuditEvents {
        /// One JSON audit event each, as written in the journal.
        lines: Vec<String>,
    },
    /// Bytes of the recording of `session` (its asciicast file), starting at
    /// `offset`; `fin`: the recording is complete after these bytes.
    RecordingChunk {
        /// The SSH session's id (8 to 64 lowercase hex digits).
        session: String,
        /// Byte offset of `data` in the recording file.
        offset: u64,
        /// Standard base64.
        data: String,
        /// The recording ends with these bytes.
        #[serde(default)]
        fin: bool,
    },
    /// Second factor for an SSH `check` rule: may the user owning the node
    /// `source` log in now? Without `code`: is a recent approval on record
    /// (younger than `max_age_secs`; `None` = never reuse one), or must the
    /// user type a code? With `code`: verify it. Answered by
    /// [`ServerMsg::CheckResult`] with the same `id`.
    Check {
        /// Chosen by the node, echoed in the answer (several may be in flight).
        id: u64,
        /// The node key of the SSH client's node; its owner is checked.
        #[serde(with = "b64key")]
        source: Key,
        /// The one-time code the person typed, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// The rule's reuse period for an earlier approval, seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_age_secs: Option<u64>,
    },
}

/// What the control server says to a [`ClientMsg::Check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckOutcome {
    /// The user passed (this code, or an approval within the period).
    Approved,
    /// Enrolled, not locked out, no usable approval: ask for a code.
    CodeNeeded,
    /// Refused; the message says why and what to do (not enrolled, a
    /// tagged source, a server problem).
    Denied,
    /// The code was wrong or already used (counts toward the lockout).
    WrongCode,
    /// Too many wrong codes from this source: locked out for a while.
    LockedOut,
}

/// Why the server refused something; the `message` is for humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Auth key unknown, revoked, expired, used, or its user is gone.
    AuthKey,
    /// The node key is not registered (send Register with an auth key).
    NotRegistered,
    /// The node key expired (or the node was expired by an admin).
    NodeKeyExpired,
    /// The request was malformed or out of order.
    Protocol,
    /// Something failed on the server.
    Internal,
    /// Another connection with the same node key replaced this one.
    Replaced,
    /// The node was removed by an admin (or its user was).
    Removed,
    /// The SSH host key or host name the node reported is not acceptable.
    HostInfo,
    /// Signing in with the identity provider failed or was refused.
    SignIn,
    /// An admin request that cannot be done as asked.
    Invalid,
    /// An admin request names a user, node or auth key that does not exist.
    NotFound,
    /// A code this build does not know (a newer server); treated as a refusal.
    #[serde(other)]
    Other,
}

/// Server → node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to Register/Login; a [`ServerMsg::MapFull`] follows.
    LoginOk {
        /// True when this connection created the node.
        new_node: bool,
        /// The node as registered (assigned name, addresses, owner, expiry).
        node: SelfInfo,
        /// The tailnet DNS domain (`NAME.domain`).
        domain: String,
        /// The node should send something at least this often (seconds).
        keepalive_secs: u32,
        /// The server takes recording chunks as binary frames
        /// ([`crate::control::wire::chunk`]); absent from older servers.
        #[serde(default)]
        binary_chunks: bool,
        /// The server takes binary chunks holding gzip members
        /// ([`crate::control::wire::chunk`]); absent from older servers.
        #[serde(default)]
        gzip_chunks: bool,
    },
    /// A refusal (of the first message, or of a request later); the server
    /// closes the connection after it.
    Error {
        /// What kind of refusal, for programs.
        code: ErrorCode,
        /// What happened and what to do, for the person running the node.
        message: String,
    },
    /// The whole map: after `LoginOk`, and again whenever the server
    /// cannot express a change as a delta.
    MapFull(MapFull),
    /// What changed in the node's map since the last map or delta.
    MapDelta(MapDelta),
    /// Sent on a quiet connection every keepalive period, so the node
    /// notices a dead server.
    KeepAlive,
    /// Answer to Logout; the server closes the connection after it.
    LoggedOut,
    /// Answer to RotateKey: the node now lives under `node_key`; the server
    /// closes this (old-key) connection after it.
    KeyRotated {
        /// The key the node now lives under (the one it asked for).
        #[serde(with = "b64key")]
        node_key: Key,
    },
    /// Answer to [`ClientMsg::Check`]. `user` is who was checked (the owner
    /// of the source node); `message` is for the person logging in.
    CheckResult {
        /// The `id` of the check answered.
        id: u64,
        /// The verdict.
        outcome: CheckOutcome,
        /// The owner of the source node.
        #[serde(default)]
        user: String,
        /// For the person logging in.
        #[serde(default)]
        message: String,
    },
    /// Answer to RegisterInteractive: show this URL to the person; `LoginOk`
    /// (or an `Error`) follows once they have signed in there.
    SignIn {
        /// `<server>/oidc/start/<id>`: single use, expires with the sign-in.
        url: String,
    },
    /// What the server has committed (fsync/commit) of what this node shipped.
    ShipAck(ShipAck),
}

/// Answer to [`ClientMsg::AuditEvents`] / [`ClientMsg::RecordingChunk`]:
/// everything up to here is stored and survives a server restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipAck {
    /// Every audit event with an id up to this one is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// This recording is stored up to `offset` bytes (and complete if `fin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Bytes of `session` stored.
    #[serde(default)]
    pub offset: u64,
    /// `session` is stored complete.
    #[serde(default)]
    pub fin: bool,
    /// The server refused the shipment (bad session id, ...); not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// This node, as the control server sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfInfo {
    /// The server's id of the node (stable across key rotation).
    pub node_id: u64,
    /// The node's WireGuard public key, as it authenticated.
    #[serde(with = "b64key")]
    pub node_key: Key,
    /// Short name, unique in the tailnet (`web1`).
    pub name: String,
    /// `name.domain`.
    pub fqdn: String,
    /// The node's tailnet addresses (one IPv4 today).
    pub ips: Vec<IpAddr>,
    /// The owning user; `None` for a tagged node (its tags are its identity).
    pub user: Option<String>,
    /// The tags the auth key or an admin gave the node (`tag:prod`).
    pub tags: Vec<String>,
    /// The user's groups at the identity provider (`group:oidc/NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Unix seconds when the node key expires; `None` = never (tagged nodes).
    pub key_expiry: Option<i64>,
    /// Deleted once offline past the server's grace period.
    pub ephemeral: bool,
}

/// A peer in the map: everything needed for WireGuard, identity and SSH.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The server's id of the peer (stable across key rotation).
    pub node_id: u64,
    /// The peer's WireGuard public key: its identity on the data plane.
    #[serde(with = "b64key")]
    pub node_key: Key,
    /// Short name, unique in the tailnet.
    pub name: String,
    /// `name.domain`.
    pub fqdn: String,
    /// Tailnet addresses; WireGuard allowed IPs are these as /32 (/128).
    pub ips: Vec<IpAddr>,
    /// The owning user; `None` for a tagged node.
    pub user: Option<String>,
    /// The peer's tags (`tag:prod`); policy rules match on them.
    pub tags: Vec<String>,
    /// The user's groups at the identity provider (`group:oidc/NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Endpoints the peer reported (candidates for direct UDP).
    pub endpoints: Vec<SocketAddr>,
    /// The peer's SSH host public key, OpenSSH format, for pinning.
    pub ssh_host_key: Option<String>,
    /// Connected to the control server right now.
    pub online: bool,
}

/// The policy in force. Nodes evaluate it with [`Policy`] (as destination of
/// SSH and for inbound network checks). The server only sends policies that
/// passed `Policy::parse_and_test`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Increases with every change; equal version = equal text.
    pub version: u64,
    /// File name used in diagnostics and rule labels.
    pub name: String,
    /// The policy file's TOML, verbatim.
    pub text: String,
}

/// A node's whole map: sent after `LoginOk`, and when a delta will not do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MapFull {
    /// The receiving node itself.
    pub self_node: SelfInfo,
    /// The tailnet DNS domain.
    pub domain: String,
    /// Every node the policy lets this one talk to (either direction).
    pub peers: Vec<PeerInfo>,
    /// The policy in force.
    pub policy: PolicyInfo,
}

/// Changes since the previous map. Apply in field order: removed, added,
/// changed (a re-keyed peer is removed under its old key and added under
/// the new one).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapDelta {
    /// Node keys (standard base64) of peers gone from the map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<String>,
    /// Peers new in the map.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_added: Vec<PeerInfo>,
    /// Peers already in the map, in full as they are now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers_changed: Vec<PeerInfo>,
    /// A new policy (full text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyInfo>,
    /// This node's own info changed (renamed, retagged, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_node: Option<SelfInfo>,
    /// The node key expired (or was expired, or the node removed): the node
    /// must stop using this map's peers and log in again with an auth key.
    /// The server closes the connection after sending this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub key_expired: bool,
}

impl MapDelta {
    /// Nothing changed (the server never sends an empty delta).
    pub fn is_empty(&self) -> bool {
        self.peers_removed.is_empty()
            && self.peers_added.is_empty()
            && self.peers_changed.is_empty()
            && self.policy.is_none()
            && self.self_node.is_none()
            && !self.key_expired
    }
}

/// The identity of a node as the map describes it (self or peer alike).
fn identity_of(key: &Key, name: &str, user: &Option<String>, tags: &[String], groups: &[String], ips: &[IpAddr]) -> Identity {
    Identity {
        node_key: wg::key_to_base64(key),
        node_name: name.to_string(),
        user: user.clone(),
        tags: tags.to_vec(),
        ip: ips.first().copied().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        groups: groups.to_vec(),
    }
}

impl SelfInfo {
    /// This node's identity, as peers' policies see it.
    pub fn identity(&self) -> Identity {
        identity_of(&self.node_key, &self.name, &self.user, &self.tags, &self.groups, &self.ips)
    }
}

impl PeerInfo {
    /// The identity the SSH server and inbound filter act on for this peer.
    pub fn identity(&self) -> Identity {
        identity_of(&self.node_key, &self.name, &self.user, &self.tags, &self.groups, &self.ips)
    }

    /// WireGuard config: allowed IPs = the peer's addresses as host routes,
    /// endpoint = the first reported endpoint (direct path candidate).
    pub fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            public_key: self.node_key,
            preshared_key: None,
            allowed_ips: self.ips.iter().map(|ip| ipnet::IpNet::from(*ip)).collect(),
            endpoint: self.endpoints.first().copied(),
            persistent_keepalive: None,
        }
    }
}

/// A node's current map: what `ControlClient` keeps up to date.
#[derive(Clone, Debug, PartialEq)]
pub struct NetMap {
    /// This node, as of the last map or delta.
    pub self_node: SelfInfo,
    /// The tailnet DNS domain.
    pub domain: String,
    /// Peers by node key.
    pub peers: BTreeMap<Key, PeerInfo>,
    /// The policy in force.
    pub policy: PolicyInfo,
}

impl NetMap {
    /// The map a [`MapFull`] describes.
    pub fn from_full(m: MapFull) -> NetMap {
        NetMap { self_node: m.self_node, domain: m.domain, peers: m.peers.into_iter().map(|p| (p.node_key, p)).collect(), policy: m.policy }
    }

    /// Applies a delta (removed, then added, then changed).
    pub fn apply(&mut self, d: &MapDelta) {
        for k in &d.peers_removed {
            if let Ok(k) = wg::key_from_base64(k) {
                self.peers.remove(&k);
            }
        }
        for p in d.peers_added.iter().chain(&d.peers_changed) {
            self.peers.insert(p.node_key, p.clone());
        }
        if let Some(p) = &d.policy {
            self.policy = p.clone();
        }
        if let Some(s) = &d.self_node {
            self.self_node = s.clone();
        }
        if d.key_expired {
            self.peers.clear();
        }
    }

    /// WireGuard peer configs for every peer.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers.values().map(PeerInfo::peer_config).collect()
    }

    /// (key, identity) pairs for [`crate::daemon::identity::TableResolver`].
    pub fn identities(&self) -> Vec<(Key, Identity)> {
        self.peers.values().map(|p| (p.node_key, p.identity())).collect()
    }

    /// The peer with this name (short or fully qualified, case-insensitive).
    pub fn peer_by_name(&self, name: &str) -> Option<&PeerInfo> {
        self.peers.values().find(|p| p.name.eq_ignore_ascii_case(name) || p.fqdn.eq_ignore_ascii_case(name))
    }

    /// Compiles the map's policy (already validated by the server).
    pub fn compile_policy(&self) -> Result<Policy, PolicyErrors> {
        Policy::parse(&self.policy.text, &self.policy.name)
    }
}

// ---------------------------------------------------------------------------
// Server-side outbound messages: same JSON as `ServerMsg`, but holding the
// shared (`Arc`) peer infos and policy so one change fanned out to thousands
// of nodes is not cloned per node. Serialized in the connection tasks.

fn ser_arcs<S: Serializer, T: Serialize>(v: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|a| &**a))
}

fn ser_opt_arc<S: Serializer, T: Serialize>(v: &Option<Arc<T>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => s.serialize_some(&**a),
        None => s.serialize_none(),
    }
}

fn ser_arc_str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn ser_arc<S: Serializer, T: Serialize>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    (**v).serialize(s)
}

/// [`MapDelta`] as the server builds it (shared peers and policy).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct DeltaOut {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_arcs")]
    pub peers_added: Vec<Arc<PeerInfo>>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "ser_arcs")]
    pub peers_changed: Vec<Arc<PeerInfo>>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_arc")]
    pub policy: Option<Arc<PolicyInfo>>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_arc")]
    pub self_node: Option<Arc<SelfInfo>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub key_expired: bool,
}

impl DeltaOut {
    /// Nothing to send.
    pub(crate) fn is_empty(&self) -> bool {
        self.peers_removed.is_empty()
            && self.peers_added.is_empty()
            && self.peers_changed.is_empty()
            && self.policy.is_none()
            && self.self_node.is_none()
            && !self.key_expired
    }
}

/// [`MapFull`] as the server builds it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FullOut {
    #[serde(serialize_with = "ser_arc")]
    pub self_node: Arc<SelfInfo>,
    #[serde(serialize_with = "ser_arc_str")]
    pub domain: Arc<str>,
    #[serde(serialize_with = "ser_arcs")]
    pub peers: Vec<Arc<PeerInfo>>,
    #[serde(serialize_with = "ser_arc")]
    pub policy: Arc<PolicyInfo>,
}

/// [`ServerMsg`] as the server builds it: the same JSON, with the map
/// messages holding shared data.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerOut {
    LoginOk {
        new_node: bool,
        node: SelfInfo,
        domain: String,
        keepalive_secs: u32,
        binary_chunks: bool,
        gzip_chunks: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    MapFull(FullOut),
    MapDelta(DeltaOut),
    KeepAlive,
    LoggedOut,
    KeyRotated {
        #[serde(with = "b64key")]
        node_key: Key,
    },
    CheckResult {
        id: u64,
        outcome: CheckOutcome,
        user: String,
        message: String,
    },
    SignIn {
        url: String,
    },
    ShipAck(ShipAck),
}

impl From<FullOut> for MapFull {
    fn from(f: FullOut) -> MapFull {
        MapFull {
            self_node: (*f.self_node).clone(),
            domain: f.domain.to_string(),
            peers: f.peers.iter().map(|p| (**p).clone()).collect(),
            policy: (*f.policy).clone(),
        }
    }
}

impl From<DeltaOut> for MapDelta {
    fn from(d: DeltaOut) -> MapDelta {
        MapDelta {
            peers_removed: d.peers_removed,
            peers_added: d.peers_added.iter().map(|p| (**p).clone()).collect(),
            peers_changed: d.peers_changed.iter().map(|p| (**p).clone()).collect(),
            policy: d.policy.map(|p| (*p).clone()),
            self_node: d.self_node.map(|p| (*p).clone()),
            key_expired: d.key_expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn peer(n: u8) -> PeerInfo {
        PeerInfo {
            node_id: n as u64,
            node_key: [n; 32],
            name: format!("n{n}"),
            fqdn: format!("n{n}.tailnet.internal"),
            ips: vec![IpAddr::from([100, 64, 0, n])],
            user: Some("alice".into()),
            tags: vec![],
            groups: vec![],
            endpoints: vec!["192.0.2.1:41641".parse().unwrap()],
            ssh_host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIO1 host".into()),
            online: true,
        }
    }

    #[test]
    fn out_types_serialize_like_the_public_ones() {
        let p = Arc::new(peer(1));
        let pol = Arc::new(PolicyInfo { version: 3, name: "p.toml".into(), text: "x".into() });
        let out = ServerOut::MapDelta(DeltaOut {
            peers_removed: vec!["k".into()],
            peers_added: vec![p.clone()],
            peers_changed: vec![],
            policy: Some(pol.clone()),
            self_node: None,
            key_expired: false,
        });
        let json = serde_json::to_vec(&out).unwrap();
        let back: ServerMsg = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            back,
            ServerMsg::MapDelta(MapDelta {
                peers_removed: vec!["k".into()],
                peers_added: vec![(*p).clone()],
                policy: Some((*pol).clone()),
                ..Default::default()
            })
        );
        let me = SelfInfo {
            node_id: 9,
            node_key: [9; 32],
            name: "me".into(),
            fqdn: "me.d".into(),
            ips: vec![IpAddr::from([100, 64, 0, 9])],
            user: None,
            tags: vec!["tag:prod".into()],
            groups: vec![],
            key_expiry: None,
            ephemeral: false,
        };
        let full = FullOut { self_node: Arc::new(me.clone()), domain: "d".into(), peers: vec![p.clone()], policy: pol.clone() };
        let json = serde_json::to_vec(&ServerOut::MapFull(full.clone())).unwrap();
        let back: ServerMsg = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, ServerMsg::MapFull(full.into()));
    }

    fn ed25519(seed: u8) -> String {
        use russh::keys::ssh_key::public::{Ed25519PublicKey, KeyData};
        russh::keys::PublicKey::new(KeyData::Ed25519(Ed25519PublicKey([seed; 32])), "").to_openssh().unwrap()
    }

    #[test]
    fn only_one_canonical_ed25519_host_key_is_accepted() {
        let good = ed25519(1);
        assert_eq!(good.split(' ').count(), 2, "{good}");
        assert_eq!(canonical_ssh_host_key(&good).unwrap(), good);
        let b64 = good.split(' ').nth(1).unwrap();
        for bad in [
            format!("{good}\n@revoked * {}", ed25519(2)),
            format!("{good}\r\n"),
            format!("{good} comment"),
            format!("{good}="),
            format!("ssh-ed25519  {b64}"),
            format!("ssh-ed25519 {}", &b64[..b64.len() - 4]),
            format!("ssh-rsa {b64}"),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9uZQ".into(),
            "ssh-ed25519 !!!!".into(),
            String::new(),
        ] {
            assert!(canonical_ssh_host_key(&bad).is_err(), "{bad:?}");
        }
        for n in ["web1", "a", "web-2", &"x".repeat(63)] {
            assert!(check_node_name(n).is_ok(), "{n}");
        }
        for n in ["", "-a", "a-", "Web", "a.b", "a,b", "*", "a b", "a\nb", "@revoked", &"x".repeat(64)] {
            assert!(check_node_name(n).is_err(), "{n:?}");
        }
    }

    #[test]
    fn client_messages_roundtrip_and_tolerate_unknown_fields() {
        let m = ClientMsg::Register {
            auth_key: "s".into(),
            hostname: "web1".into(),
            ssh_host_key: None,
            endpoints: vec!["127.0.0.1:1".parse().unwrap()],
            previous_node_key: None,
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.contains(r#""type":"register""#), "{j}");
        assert_eq!(serde_json::from_str::<ClientMsg>(&j).unwrap(), m);
        let m: ClientMsg = serde_json::from_str(r#"{"type":"login","future_field":1}"#).unwrap();
        assert_eq!(m, ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] });
        assert!(serde_json::from_str::<ClientMsg>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn netmap_applies_deltas_and_builds_peer_configs() {
        let me = SelfInfo {
            node_id: 9,
            node_key: [9; 32],
            name: "me".into(),
            fqdn: "me.d".into(),
            ips: vec![IpAddr::from([100, 64, 0, 9])],
            user: Some("alice".into()),
            tags: vec![],
            groups: vec![],
            key_expiry: None,
            ephemeral: false,
        };
        let pol = PolicyInfo { version: 1, name: "p".into(), text: String::new() };
        let mut m = NetMap::from_full(MapFull { self_node: me, domain: "d".into(), peers: vec![peer(1), peer(2)], policy: pol });
        let mut p2 = peer(2);
        p2.online = false;
        m.apply(&MapDelta {
            peers_removed: vec![wg::key_to_base64(&[1; 32])],
            peers_added: vec![peer(3)],
            peers_changed: vec![p2.clone()],
            ..Default::default()
        });
        assert_eq!(m.peers.len(), 2);
        assert_eq!(m.peers[&[2; 32]], p2);
        let cfgs = m.peer_configs();
        assert_eq!(cfgs[0].allowed_ips[0].to_string(), "100.64.0.2/32");
        assert_eq!(cfgs[0].endpoint, Some("192.0.2.1:41641".parse().unwrap()));
        assert_eq!(m.peer_by_name("N3.tailnet.internal").unwrap().node_id, 3);
        let id = m.peers[&[3; 32]].identity();
        assert_eq!((id.user.as_deref(), id.node_name.as_str()), (Some("alice"), "n3"));
    }
}
