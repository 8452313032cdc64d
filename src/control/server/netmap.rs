//! Who sees whom, sans-IO: per-node full maps and the deltas between them.
//!
//! **May talk.** Nodes A and B see each other iff the policy lets one reach
//! the other on *some* port: `check_network(A, B, p) || check_network(B, A, p)`
//! for some `p`. (SSH rules count: an accept/check rule opens port 22.) The
//! relation is symmetric, so "A sees B" = "B sees A", and it never depends
//! on the login name. Only the candidate ports matter: 22 and the first port
//! of every port range that appears in an `[[acl]]` destination (`*` = 1); a
//! rule that matches on any port of a range also matches on its first port,
//! so testing those is exact.
//!
//! **Classes.** Evaluating every pair of 10,000 nodes is 10^8 policy calls.
//! Instead nodes are grouped into classes that no policy pattern can tell
//! apart: same tags, same user *if the policy mentions that user* (otherwise
//! "some unmentioned user"), same name if any host pattern could match it,
//! same membership in every IP/CIDR the policy mentions. The relation is
//! evaluated once per pair of classes on a representative. `autogroup:self`
//! is the one pattern that compares the users of two nodes, so for two
//! classes of unmentioned users the engine keeps two answers: for nodes of
//! the same user and for nodes of different users. "Mentioned" is decided
//! generously (any string anywhere in the policy file), which can only make
//! classes finer, never wrong. [`Engine`] is checked against the pairwise
//! definition ([`naive_visible`]) in the tests below.
//!
//! **Engine.** [`Engine`] holds every live node and, for each connected
//! node, the map last sent to it. Changes (`upsert`, `remove`, `set_policy`)
//! return the deltas to send; a node change touches only the nodes that see
//! it (before or after), a policy change recomputes everyone.
#![warn(missing_docs)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;

use crate::control::wire::proto::{DeltaOut, FullOut, PeerInfo, PolicyInfo, SelfInfo};
use crate::daemon::identity::Identity;
use crate::dataplane::wg;
use crate::policy::{Policy, SSH_PORT};

pub(crate) type NodeId = u64;
type ClassId = u32;

/// A node as the engine needs it.
#[derive(Clone, Debug)]
pub(crate) struct NodeEntry {
    /// Identity for policy evaluation (`user` is ignored for tagged nodes).
    pub(crate) identity: Identity,
    /// What the node's peers see.
    pub(crate) peer: Arc<PeerInfo>,
    /// What the node itself sees.
    pub(crate) me: Arc<SelfInfo>,
}

/// May `a` and `b` talk (either direction, any port)? The definition.
pub(crate) fn may_talk(policy: &Policy, ports: &[u16], a: &Identity, b: &Identity) -> bool {
    ports.iter().any(|&p| policy.check_network(a, b, p) || policy.check_network(b, a, p))
}

/// Facts about a policy that decide classes.
struct Analysis {
    policy: Policy,
    ports: Vec<u16>,
    /// Every string in the policy file, exactly (user names compare exactly).
    strings: HashSet<String>,
    /// The same, lowercased (host names compare case-insensitively).
    lower: HashSet<String>,
    nets: Vec<IpNet>,
}

fn collect_strings(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        toml::Value::Table(t) => {
            for (k, x) in t {
                out.push(k.clone());
                collect_strings(x, out);
            }
        }
        _ => {}
    }
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim_start_matches('[').trim_end_matches(']');
    s.parse::<IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// First port of each range in a port list (`*`, `22`, `80,443`, `8000-8999`).
fn port_starts(spec: &str) -> Option<Vec<u16>> {
    spec.split(',')
        .map(|item| {
            let item = item.trim();
            if item == "*" { Some(1) } else { item.split('-').next()?.parse::<u16>().ok() }
        })
        .collect()
}

impl Analysis {
    fn new(policy: Policy, text: &str) -> Analysis {
        let mut strings = Vec::new();
        if let Ok(mut t) = text.parse::<toml::Table>() {
            // `[[tests]]` make up identities; they never affect evaluation.
            t.remove("tests");
            collect_strings(&toml::Value::Table(t), &mut strings);
        }
        let mut ports = BTreeSet::from([SSH_PORT]);
        let mut nets = Vec::new();
        let mut targets = Vec::new();
        for s in &strings {
            if let Some(n) = parse_net(s) {
                nets.push(n);
            }
            // `TARGET:PORTS` (acl destinations): the target is a pattern too.
            if let Some((target, spec)) = s.rsplit_once(':') {
                if let Some(n) = parse_net(target) {
                    nets.push(n);
                }
                if let Some(ps) = port_starts(spec) {
                    ports.extend(ps.into_iter().filter(|p| *p > 0));
                    targets.push(target.trim_start_matches('[').trim_end_matches(']').to_string());
                }
            }
        }
        strings.extend(targets);
        nets.sort();
        nets.dedup();
        Analysis {
            policy,
            ports: ports.into_iter().collect(),
            lower: strings.iter().map(|s| s.to_ascii_lowercase()).collect(),
            strings: strings.into_iter().collect(),
            nets,
        }
    }

    fn key(&self, id: &Identity) -> ClassKey {
        let user = if !id.tags.is_empty() {
            UserKey::None
        } else {
            match &id.user {
                None => UserKey::None,
                Some(u) if self.strings.contains(u) => UserKey::Named(u.clone()),
                Some(_) => UserKey::Anon,
            }
        };
        let mut tags = id.tags.clone();
        tags.sort();
        tags.dedup();
        let lname = id.node_name.to_ascii_lowercase();
        let first = lname.split('.').next().unwrap_or("");
        let name = (self.lower.contains(&lname) || self.lower.contains(first)).then_some(lname.clone());
        let nets = self.nets.iter().enumerate().filter(|(_, n)| n.contains(&id.ip)).map(|(i, _)| i as u32).collect();
        // Provider groups tell nodes apart only when the node acts for its
        // user and the policy names the group.
        let mut groups: Vec<String> = if id.tags.is_empty() && id.user.is_some() {
            id.groups.iter().filter(|g| self.strings.contains(&format!("{}{g}", crate::policy::PROVIDER_GROUP_PREFIX))).cloned().collect()
        } else {
            Vec::new()
        };
        groups.sort();
        groups.dedup();
        ClassKey { user, tags, name, nets, groups }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum UserKey {
    /// Tagged, or no user.
    None,
    /// A user the policy mentions.
    Named(String),
    /// A user the policy does not mention.
    Anon,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    user: UserKey,
    tags: Vec<String>,
    name: Option<String>,
    nets: Vec<u32>,
    groups: Vec<String>,
}

/// Link bits between two classes.
const SAME_USER: u8 = 1;
const DIFF_USER: u8 = 2;
const ALWAYS: u8 = SAME_USER | DIFF_USER;

struct Class {
    key: ClassKey,
    rep: Identity,
    /// Members by their actual user (None for tagged/userless).
    members: HashMap<Option<String>, BTreeSet<NodeId>>,
    len: usize,
    /// Non-zero links to other classes (and possibly itself).
    links: HashMap<ClassId, u8>,
}

/// The user a node counts as (tagged nodes have none).
fn eff_user(id: &Identity) -> Option<String> {
    if id.tags.is_empty() { id.user.clone() } else { None }
}

struct LiveNode {
    entry: NodeEntry,
    class: ClassId,
}

struct Sent {
    peers: HashMap<NodeId, Arc<PeerInfo>>,
    me: Arc<SelfInfo>,
    policy_version: u64,
}

/// Live nodes, classes, and the maps last sent to connected nodes.
pub(crate) struct Engine {
    an: Analysis,
    policy: Arc<PolicyInfo>,
    domain: Arc<str>,
    nodes: HashMap<NodeId, LiveNode>,
    classes: HashMap<ClassId, Class>,
    by_key: HashMap<ClassKey, ClassId>,
    next_class: ClassId,
    sent: HashMap<NodeId, Sent>,
}

type Deltas = HashMap<NodeId, DeltaOut>;

impl Engine {
    pub(crate) fn new(policy: Policy, info: PolicyInfo, domain: &str) -> Engine {
        Engine {
            an: Analysis::new(policy, &info.text),
            policy: Arc::new(info),
            domain: domain.into(),
            nodes: HashMap::new(),
            classes: HashMap::new(),
            by_key: HashMap::new(),
            next_class: 0,
            sent: HashMap::new(),
        }
    }

    pub(crate) fn policy(&self) -> &Policy {
        &self.an.policy
    }

    #[cfg(test)]
    pub(crate) fn is_attached(&self, id: NodeId) -> bool {
        self.sent.contains_key(&id)
    }

    #[cfg(test)]
    pub(crate) fn class_count(&self) -> usize {
        self.classes.len()
    }

    pub(crate) fn contains(&self, id: NodeId) -> bool {
        self.nodes.contains_key(&id)
    }

    fn link(&self, a: &Class, b: &Class) -> u8 {
        let pol = &self.an.policy;
        let ports = &self.an.ports;
        if a.key.user == UserKey::Anon && b.key.user == UserKey::Anon {
            let with = |ua: &str, ub: &str| {
                let mut x = a.rep.clone();
                let mut y = b.rep.clone();
                x.user = Some(ua.into());
                y.user = Some(ub.into());
                may_talk(pol, ports, &x, &y)
            };
            let mut bits = 0;
            if with("\u{1}anon-a", "\u{1}anon-a") {
                bits |= SAME_USER;
            }
            if with("\u{1}anon-a", "\u{1}anon-b") {
                bits |= DIFF_USER;
            }
            bits
        } else if may_talk(pol, ports, &a.rep, &b.rep) {
            ALWAYS
        } else {
            0
        }
    }

    fn class_for(&mut self, id: &Identity) -> ClassId {
        let key = self.an.key(id);
        if let Some(c) = self.by_key.get(&key) {
            return *c;
        }
        let cid = self.next_class;
        self.next_class += 1;
        let mut rep = id.clone();
        rep.user = match &key.user {
            UserKey::None => None,
            UserKey::Named(u) => Some(u.clone()),
            UserKey::Anon => Some("\u{1}anon-a".into()),
        };
        rep.groups = key.groups.clone();
        let mut class = Class { key: key.clone(), rep, members: HashMap::new(), len: 0, links: HashMap::new() };
        let self_bits = self.link(&class, &class);
        if self_bits != 0 {
            class.links.insert(cid, self_bits);
        }
        let mut others = Vec::new();
        for (&oid, other) in &self.classes {
            let bits = self.link(&class, other);
            if bits != 0 {
                others.push((oid, bits));
            }
        }
        for (oid, bits) in others {
            class.links.insert(oid, bits);
            if let Some(o) = self.classes.get_mut(&oid) {
                o.links.insert(cid, bits);
            }
        }
        self.classes.insert(cid, class);
        self.by_key.insert(key, cid);
        cid
    }

    fn join_class(&mut self, node: NodeId, id: &Identity) -> ClassId {
        let cid = self.class_for(id);
        // `class_for` has just inserted or found it.
        if let Some(c) = self.classes.get_mut(&cid)
            && c.members.entry(eff_user(id)).or_default().insert(node)
        {
            c.len += 1;
        }
        cid
    }

    fn leave_class(&mut self, node: NodeId, cid: ClassId, id: &Identity) {
        let Some(c) = self.classes.get_mut(&cid) else { return };
        let u = eff_user(id);
        if let Some(set) = c.members.get_mut(&u) {
            if set.remove(&node) {
                c.len -= 1;
            }
            if set.is_empty() {
                c.members.remove(&u);
            }
        }
        if c.len == 0
            && let Some(c) = self.classes.remove(&cid)
        {
            self.by_key.remove(&c.key);
            for oid in c.links.keys() {
                if let Some(o) = self.classes.get_mut(oid) {
                    o.links.remove(&cid);
                }
            }
        }
    }

    /// The live nodes `node` sees (never itself), unsorted.
    pub(crate) fn visible(&self, node: NodeId) -> Vec<NodeId> {
        let Some(n) = self.nodes.get(&node) else { return Vec::new() };
        let me_user = eff_user(&n.entry.identity);
        let mut out = Vec::new();
        let Some(class) = self.classes.get(&n.class) else { return out };
        for (oid, bits) in &class.links {
            let Some(other) = self.classes.get(oid) else { continue };
            match *bits {
                ALWAYS => {
                    for set in other.members.values() {
                        out.extend(set.iter().copied().filter(|&x| x != node));
                    }
                }
                SAME_USER => {
                    if let Some(set) = other.members.get(&me_user) {
                        out.extend(set.iter().copied().filter(|&x| x != node));
                    }
                }
                DIFF_USER => {
                    for (u, set) in &other.members {
                        if *u != me_user {
                            out.extend(set.iter().copied());
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// The full map `node` would get now (does not record it as sent).
    pub(crate) fn full_map(&self, node: NodeId) -> Option<FullOut> {
        let n = self.nodes.get(&node)?;
        let mut ids = self.visible(node);
        ids.sort_unstable();
        Some(FullOut {
            self_node: n.entry.me.clone(),
            domain: self.domain.clone(),
            peers: ids.iter().filter_map(|i| self.nodes.get(i)).map(|p| p.entry.peer.clone()).collect(),
            policy: self.policy.clone(),
        })
    }

    /// Marks `node` connected and returns its full map (recorded as sent).
    pub(crate) fn attach(&mut self, node: NodeId) -> Option<FullOut> {
        let full = self.full_map(node)?;
        let peers = full.peers.iter().map(|p| (p.node_id, p.clone())).collect();
        self.sent.insert(node, Sent { peers, me: full.self_node.clone(), policy_version: self.policy.version });
        Some(full)
    }

    /// Marks `node` disconnected (no more deltas for it).
    pub(crate) fn detach(&mut self, node: NodeId) {
        self.sent.remove(&node);
    }

    /// Adds or updates a node. Returns deltas for connected nodes (including
    /// the node itself if connected and its own info or view changed).
    pub(crate) fn upsert(&mut self, node: NodeId, entry: NodeEntry) -> Vec<(NodeId, DeltaOut)> {
        let mut deltas = Deltas::new();
        let before: HashSet<NodeId> = self.visible(node).into_iter().collect();
        let old = self.nodes.remove(&node);
        let class = match &old {
            Some(o)
                if self.an.key(&o.entry.identity) == self.an.key(&entry.identity)
                    && eff_user(&o.entry.identity) == eff_user(&entry.identity) =>
            {
                o.class
            }
            Some(o) => {
                let (c, id) = (o.class, o.entry.identity.clone());
                self.leave_class(node, c, &id);
                self.join_class(node, &entry.identity)
            }
            None => self.join_class(node, &entry.identity),
        };
        let peer = entry.peer.clone();
        self.nodes.insert(node, LiveNode { entry, class });
        let after: HashSet<NodeId> = self.visible(node).into_iter().collect();
        for v in before.union(&after) {
            if *v == node {
                continue;
            }
            let Some(sent) = self.sent.get_mut(v) else { continue };
            let d = deltas.entry(*v).or_default();
            update_one(sent, d, node, after.contains(v).then_some(&peer));
        }
        if self.sent.contains_key(&node) {
            let d = self.resync(node);
            merge(deltas.entry(node).or_default(), d);
        }
        finish(deltas)
    }

    /// Removes a node. Returns deltas for the nodes that saw it. The node
    /// itself is detached (the caller tells it why, e.g. `key_expired`).
    pub(crate) fn remove(&mut self, node: NodeId) -> Vec<(NodeId, DeltaOut)> {
        let mut deltas = Deltas::new();
        let vis = self.visible(node);
        if let Some(n) = self.nodes.remove(&node) {
            self.leave_class(node, n.class, &n.entry.identity);
        }
        self.sent.remove(&node);
        for v in vis {
            if let Some(sent) = self.sent.get_mut(&v) {
                update_one(sent, deltas.entry(v).or_default(), node, None);
            }
        }
        finish(deltas)
    }

    /// Puts a new policy in force: new classes, every connected node's map
    /// recomputed and diffed (every delta carries the new policy).
    pub(crate) fn set_policy(&mut self, policy: Policy, info: PolicyInfo) -> Vec<(NodeId, DeltaOut)> {
        self.an = Analysis::new(policy, &info.text);
        self.policy = Arc::new(info);
        self.classes.clear();
        self.by_key.clear();
        let mut ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(identity) = self.nodes.get(&id).map(|n| n.entry.identity.clone()) else { continue };
            let c = self.join_class(id, &identity);
            if let Some(n) = self.nodes.get_mut(&id) {
                n.class = c;
            }
        }
        let mut attached: Vec<NodeId> = self.sent.keys().copied().collect();
        attached.sort_unstable();
        let mut out = Vec::with_capacity(attached.len());
        for id in attached {
            let d = self.resync(id);
            if !d.is_empty() {
                out.push((id, d));
            }
        }
        out
    }

    /// Recomputes `node`'s view and returns the delta from what was sent.
    fn resync(&mut self, node: NodeId) -> DeltaOut {
        let mut ids = self.visible(node);
        ids.sort_unstable();
        let Some(me) = self.nodes.get(&node).map(|n| n.entry.me.clone()) else { return DeltaOut::default() };
        let policy = self.policy.clone();
        let new: Vec<(NodeId, Arc<PeerInfo>)> = ids.iter().filter_map(|i| Some((*i, self.nodes.get(i)?.entry.peer.clone()))).collect();
        let Some(sent) = self.sent.get_mut(&node) else { return DeltaOut::default() };
        let mut d = DeltaOut::default();
        let new_set: HashSet<NodeId> = ids.iter().copied().collect();
        let mut gone: Vec<NodeId> = sent.peers.keys().filter(|k| !new_set.contains(k)).copied().collect();
        gone.sort_unstable();
        for g in gone {
            update_one(sent, &mut d, g, None);
        }
        for (id, p) in &new {
            update_one(sent, &mut d, *id, Some(p));
        }
        if sent.me != me && *sent.me != *me {
            d.self_node = Some(me.clone());
        }
        sent.me = me;
        if sent.policy_version != policy.version {
            d.policy = Some(policy.clone());
            sent.policy_version = policy.version;
        }
        d
    }

    /// What was last sent to `node` (for tests and checks): sorted peer ids.
    #[cfg(test)]
    pub(crate) fn sent_peers(&self, node: NodeId) -> Option<Vec<NodeId>> {
        self.sent.get(&node).map(|s| {
            let mut v: Vec<NodeId> = s.peers.keys().copied().collect();
            v.sort_unstable();
            v
        })
    }
}

/// Brings `sent`'s entry for `peer_id` to `now` (None = not visible), noting
/// the change in `d`.
fn update_one(sent: &mut Sent, d: &mut DeltaOut, peer_id: NodeId, now: Option<&Arc<PeerInfo>>) {
    match (sent.peers.get(&peer_id), now) {
        (None, None) => {}
        (None, Some(p)) => {
            d.peers_added.push(p.clone());
            sent.peers.insert(peer_id, p.clone());
        }
        (Some(old), None) => {
            d.peers_removed.push(wg::key_to_base64(&old.node_key));
            sent.peers.remove(&peer_id);
        }
        (Some(old), Some(p)) => {
            if Arc::ptr_eq(old, p) || **old == **p {
                return;
            }
            if old.node_key != p.node_key {
                d.peers_removed.push(wg::key_to_base64(&old.node_key));
                d.peers_added.push(p.clone());
            } else {
                d.peers_changed.push(p.clone());
            }
            sent.peers.insert(peer_id, p.clone());
        }
    }
}

fn merge(into: &mut DeltaOut, d: DeltaOut) {
    into.peers_removed.extend(d.peers_removed);
    into.peers_added.extend(d.peers_added);
    into.peers_changed.extend(d.peers_changed);
    if d.policy.is_some() {
        into.policy = d.policy;
    }
    if d.self_node.is_some() {
        into.self_node = d.self_node;
    }
    into.key_expired |= d.key_expired;
}

fn finish(d: Deltas) -> Vec<(NodeId, DeltaOut)> {
    let mut v: Vec<_> = d.into_iter().filter(|(_, d)| !d.is_empty()).collect();
    v.sort_unstable_by_key(|(id, _)| *id);
    v
}

/// The candidate ports of a policy (see the module docs), for [`may_talk`].
#[cfg(test)]
pub(crate) fn candidate_ports(policy_text: &str) -> Vec<u16> {
    let p = Policy::default_static();
    Analysis::new(p, policy_text).ports
}

/// Reference definition: the nodes `me` sees, by evaluating every pair.
#[cfg(test)]
pub(crate) fn naive_visible(policy: &Policy, policy_text: &str, nodes: &[(NodeId, Identity)], me: NodeId) -> Vec<NodeId> {
    let ports = candidate_ports(policy_text);
    let Some((_, mine)) = nodes.iter().find(|(i, _)| *i == me) else { return Vec::new() };
    let mut v: Vec<NodeId> = nodes.iter().filter(|(i, id)| *i != me && may_talk(policy, &ports, mine, id)).map(|(i, _)| *i).collect();
    v.sort_unstable();
    v
}

/// The delta that turns map `old` into map `new` (pure; the engine computes
/// the same incrementally).
#[cfg(test)]
pub(crate) fn diff_maps(
    old: &crate::control::wire::proto::MapFull,
    new: &crate::control::wire::proto::MapFull,
) -> crate::control::wire::proto::MapDelta {
    let old_k: HashMap<crate::key::Key, &PeerInfo> = old.peers.iter().map(|p| (p.node_key, p)).collect();
    let new_k: HashMap<crate::key::Key, &PeerInfo> = new.peers.iter().map(|p| (p.node_key, p)).collect();
    let mut d = crate::control::wire::proto::MapDelta::default();
    for p in &old.peers {
        if !new_k.contains_key(&p.node_key) {
            d.peers_removed.push(wg::key_to_base64(&p.node_key));
        }
    }
    for p in &new.peers {
        match old_k.get(&p.node_key) {
            None => d.peers_added.push(p.clone()),
            Some(o) if *o != p => d.peers_changed.push(p.clone()),
            _ => {}
        }
    }
    if old.policy.version != new.policy.version {
        d.policy = Some(new.policy.clone());
    }
    if old.self_node != new.self_node {
        d.self_node = Some(new.self_node.clone());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::proto::{MapDelta, MapFull, NetMap};
    use std::net::IpAddr;

    const TEAM: &str = include_str!("../../../policies/team.toml");

    fn entry(id: NodeId, name: &str, user: Option<&str>, tags: &[&str]) -> NodeEntry {
        let ip = IpAddr::from([100, 64, (id >> 8) as u8, id as u8]);
        let key = {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&id.to_le_bytes());
            k
        };
        let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        let user = if tags.is_empty() { user.map(String::from) } else { None };
        let identity = Identity {
            node_key: wg::key_to_base64(&key),
            node_name: name.into(),
            user: user.clone(),
            tags: tags.clone(),
            ip,
            groups: vec![],
        };
        let peer = Arc::new(PeerInfo {
            node_id: id,
            node_key: key,
            name: name.into(),
            fqdn: format!("{name}.d"),
            ips: vec![ip],
            user: user.clone(),
            tags: tags.clone(),
            groups: vec![],
            endpoints: vec![],
            ssh_host_key: None,
            online: true,
        });
        let me = Arc::new(SelfInfo {
            node_id: id,
            node_key: key,
            name: name.into(),
            fqdn: format!("{name}.d"),
            ips: vec![ip],
            user,
            tags,
            groups: vec![],
            key_expiry: None,
            ephemeral: false,
        });
        NodeEntry { identity, peer, me }
    }

    fn pinfo(v: u64, text: &str) -> PolicyInfo {
        PolicyInfo { version: v, name: "p.toml".into(), text: text.into() }
    }

    fn engine(text: &str) -> Engine {
        Engine::new(Policy::parse_and_test(text, "p.toml").unwrap(), pinfo(1, text), "d")
    }

    fn check_against_naive(e: &Engine, text: &str) {
        let nodes: Vec<(NodeId, Identity)> = e.nodes.iter().map(|(i, n)| (*i, n.entry.identity.clone())).collect();
        for (id, _) in &nodes {
            let mut got = e.visible(*id);
            got.sort_unstable();
            let want = naive_visible(e.policy(), text, &nodes, *id);
            if got != want {
                let me = &e.nodes[id];
                eprintln!("me {id}: {:?} key {:?}", me.entry.identity, e.an.key(&me.entry.identity));
                for (o, n) in &e.nodes {
                    eprintln!("  {o}: {:?} {:?} class {}", n.entry.identity.user, n.entry.identity.tags, n.class);
                }
                eprintln!("links of {}: {:?}", me.class, e.classes[&me.class].links);
            }
            assert_eq!(got, want, "node {id}");
            if e.is_attached(*id) {
                assert_eq!(e.sent_peers(*id).unwrap(), got, "sent map of node {id} is stale");
            }
        }
    }

    #[test]
    fn candidate_ports_cover_every_range() {
        assert_eq!(candidate_ports(TEAM), vec![1, 22, 80, 443, 5000]);
        assert_eq!(candidate_ports(crate::policy::DEFAULT_POLICY_TOML), vec![22]);
    }

    #[test]
    fn default_policy_users_see_only_their_own_nodes() {
        let text = crate::policy::DEFAULT_POLICY_TOML;
        let mut e = engine(text);
        e.upsert(1, entry(1, "a-laptop", Some("alice"), &[]));
        e.upsert(2, entry(2, "a-server", Some("alice"), &[]));
        e.upsert(3, entry(3, "b-laptop", Some("bob"), &[]));
        e.upsert(4, entry(4, "ci", None, &["tag:ci"]));
        let mut v = e.visible(1);
        v.sort();
        assert_eq!(v, vec![2]);
        assert!(e.visible(3).is_empty());
        assert!(e.visible(4).is_empty());
        // Every unmentioned user lands in the same class.
        assert!(e.class_count() <= 2, "{}", e.class_count());
        check_against_naive(&e, text);
    }

    #[test]
    fn team_policy_matches_pairwise_definition() {
        let mut e = engine(TEAM);
        let people = ["alice@example.com", "bob@example.com", "carol@example.com", "erin@contractor.example", "zed", "yan"];
        let mut id = 0;
        for (i, u) in people.iter().enumerate() {
            for j in 0..2 {
                id += 1;
                e.upsert(id, entry(id, &format!("{}-{j}", i), Some(u), &[]));
            }
        }
        for tags in [&["tag:prod"][..], &["tag:staging"], &["tag:ci"], &["tag:prod", "tag:staging"]] {
            id += 1;
            e.upsert(id, entry(id, &format!("srv{id}"), None, tags));
        }
        check_against_naive(&e, TEAM);
    }

    /// Random operations on an engine with attached nodes: every delta applied
    /// to a client-side NetMap must give exactly the recomputed full map.
    #[test]
    fn incremental_deltas_equal_recomputation() {
        let policies = [
            crate::policy::DEFAULT_POLICY_TOML.to_string(),
            TEAM.to_string(),
            // Host, IP and CIDR patterns, and a hosts alias.
            r#"
[hosts]
db = "100.64.0.7"
[tag_owners]
"tag:prod" = []
[[acl]]
src = ["alice", "100.64.0.0/30"]
dst = ["n5:443", "db:5432", "tag:prod:8000-8999"]
[[acl]]
src = ["autogroup:member"]
dst = ["autogroup:self:*"]
"#
            .to_string(),
        ];
        let users = [Some("alice"), Some("bob"), Some("carol@example.com"), Some("zed"), None];
        let tagsets: [&[&str]; 4] = [&[], &["tag:prod"], &["tag:staging"], &["tag:ci"]];
        let mut seed = 42u64;
        let mut rnd = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut e = engine(&policies[0]);
        let mut ver = 1;
        let mut cur = 0;
        let mut maps: HashMap<NodeId, NetMap> = HashMap::new();
        let apply = |maps: &mut HashMap<NodeId, NetMap>, ds: Vec<(NodeId, DeltaOut)>| {
            for (id, d) in ds {
                let d: MapDelta = d.into();
                maps.get_mut(&id).expect("delta for an attached node").apply(&d);
            }
        };
        for step in 0..600 {
            let id = rnd(16) + 1;
            match rnd(10) {
                0..=4 => {
                    let u = users[rnd(users.len() as u64) as usize];
                    let t = if rnd(3) == 0 { tagsets[rnd(4) as usize] } else { &[][..] };
                    let t: Vec<&str> = t.iter().copied().filter(|t| policies[cur].contains(t)).collect();
                    let u = if t.is_empty() && u.is_none() { Some("zed") } else { u };
                    let mut en = entry(id, &format!("n{}", rnd(8)), u, &t);
                    if rnd(4) == 0 {
                        Arc::make_mut(&mut en.peer).online = false;
                    }
                    let ds = e.upsert(id, en);
                    apply(&mut maps, ds);
                }
                5 => {
                    maps.remove(&id);
                    let ds = e.remove(id);
                    apply(&mut maps, ds);
                }
                6 | 7 => {
                    if e.contains(id) && !e.is_attached(id) {
                        maps.insert(id, NetMap::from_full(e.attach(id).unwrap().into()));
                    }
                }
                8 => {
                    e.detach(id);
                    maps.remove(&id);
                }
                _ => {
                    if step % 3 == 0 {
                        cur = (cur + 1) % policies.len();
                        ver += 1;
                        let p = Policy::parse_and_test(&policies[cur], "p.toml").unwrap();
                        let ds = e.set_policy(p, pinfo(ver, &policies[cur]));
                        apply(&mut maps, ds);
                    }
                }
            }
            check_against_naive(&e, &policies[cur]);
            for (id, m) in &maps {
                let want = NetMap::from_full(e.full_map(*id).unwrap().into());
                assert_eq!(m, &want, "step {step}: node {id}'s map diverged");
            }
        }
    }

    #[test]
    fn diff_of_two_full_maps() {
        let mut e = engine(TEAM);
        e.upsert(1, entry(1, "a", Some("alice@example.com"), &[]));
        e.upsert(2, entry(2, "p", None, &["tag:prod"]));
        e.upsert(3, entry(3, "s", None, &["tag:staging"]));
        let before: MapFull = e.full_map(1).unwrap().into();
        let mut changed = entry(2, "p", None, &["tag:prod"]);
        Arc::make_mut(&mut changed.peer).endpoints = vec!["192.0.2.1:1".parse().unwrap()];
        e.upsert(2, changed);
        e.remove(3);
        e.upsert(4, entry(4, "c", None, &["tag:ci"]));
        let after: MapFull = e.full_map(1).unwrap().into();
        let d = diff_maps(&before, &after);
        assert_eq!(d.peers_removed.len(), 1);
        assert_eq!(d.peers_added.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![4]);
        assert_eq!(d.peers_changed.iter().map(|p| p.node_id).collect::<Vec<_>>(), vec![2]);
        let mut m = NetMap::from_full(before);
        m.apply(&d);
        assert_eq!(m, NetMap::from_full(after));
    }
}
