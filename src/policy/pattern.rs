//! Patterns that appear in `src`, `dst`, `users` and `accept_env`, how they
//! are parsed, how they match identities, and when one covers another (used
//! to find rules that can never decide anything).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::daemon::identity::Identity;

/// The user a node acts for. Tagged nodes have no user, even if the identity
/// happens to carry one: a node is either user-owned or tagged.
pub fn effective_user(id: &Identity) -> Option<&str> {
    if id.tags.is_empty() { id.user.as_deref() } else { None }
}

/// Which side of a rule a pattern is on. It changes what a bare name means:
/// a user in `src`, a host in `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// A set of nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePat {
    /// `*`: every node.
    Any,
    /// `autogroup:member`: every user-owned (untagged) node.
    Member,
    /// `autogroup:tagged`: every tagged node.
    Tagged,
    /// `autogroup:self` (dst only): user-owned nodes of the caller's user.
    SelfNodes,
    /// A bare name in `src`: the nodes owned by this user.
    User(String),
    /// `group:NAME`: nodes owned by any (transitive) member.
    Group { name: String, members: BTreeSet<String> },
    /// `tag:NAME`: nodes carrying this tag.
    Tag(String),
    /// `group:oidc/NAME`: user-owned nodes whose user was in the identity
    /// provider's group NAME at their last sign-in.
    ProviderGroup(String),
    /// A bare name in `dst`: the node with this name (`web1` also matches
    /// `web1.<tailnet domain>`).
    Host(String),
    /// An IP, a CIDR, or a `[hosts]` alias for one.
    Net { net: IpNet, alias: Option<String> },
}

/// The names a policy defines, needed to resolve patterns.
pub struct Names<'a> {
    pub groups: &'a BTreeMap<String, BTreeSet<String>>,
    pub tags: &'a BTreeSet<String>,
    pub hosts: &'a BTreeMap<String, IpNet>,
}

fn name_chars_ok(s: &str, extra: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(c))
}

/// Checks `tag:NAME`.
pub fn check_tag_name(s: &str) -> Result<(), String> {
    let Some(rest) = s.strip_prefix("tag:") else {
        return Err(format!("'{s}' is not a tag: tags are written tag:NAME"));
    };
    if rest.is_empty() {
        return Err(format!("empty tag name in '{s}'"));
    }
    if !name_chars_ok(rest, "") {
        return Err(format!("bad tag name '{s}': use letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Checks `group:NAME`.
pub fn check_group_name(s: &str) -> Result<(), String> {
    let Some(rest) = s.strip_prefix("group:") else {
        return Err(format!("'{s}' is not a group name: groups are written group:NAME"));
    };
    if rest.is_empty() {
        return Err(format!("empty group name in '{s}'"));
    }
    if !name_chars_ok(rest, "@") {
        return Err(format!("bad group name '{s}': use letters, digits, '-', '_', '.' and '@'"));
    }
    Ok(())
}

/// Prefix of a provider group in patterns. `[groups]` names cannot contain
/// '/', so a provider group never clashes with a policy-defined group.
pub const PROVIDER_GROUP_PREFIX: &str = "group:oidc/";

/// Checks `group:oidc/NAME` and returns NAME. Provider group names are the
/// provider's own (Keycloak sends `/team/admins`, Google `admins@example.com`),
/// so anything printable is allowed.
pub fn check_provider_group(s: &str) -> Result<&str, String> {
    let Some(name) = s.strip_prefix(PROVIDER_GROUP_PREFIX) else {
        return Err(format!("'{s}' is not a provider group: they are written group:oidc/NAME"));
    };
    if name.is_empty() {
        return Err(format!("empty provider group name in '{s}' (write group:oidc/NAME, NAME as the identity provider sends it)"));
    }
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(format!("bad provider group name '{s}': at most 256 printable characters"));
    }
    Ok(name)
}

/// Checks a tailnet user name (`alice`, `alice@example.com`).
pub fn check_user_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty user name".into());
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || ",:*\"'/\\".contains(*c)) {
        return Err(format!("bad user name '{s}': '{c}' is not allowed in user names"));
    }
    Ok(())
}

/// Checks a host name or `[hosts]` alias.
pub fn check_host_name(s: &str) -> Result<(), String> {
    if s.contains('@') {
        return Err(format!(
            "'{s}' is not a host name (in dst, bare names are host names; \
             for a user's own nodes use autogroup:self, or a group)"
        ));
    }
    if !name_chars_ok(s, "") || s.starts_with(['-', '.']) || s.ends_with('.') {
        return Err(format!("bad host name '{s}': use letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// Checks a local login name (`root`, `deploy`, `www-data`).
pub fn check_login_name(s: &str) -> Result<(), String> {
    let body = s.strip_suffix('$').unwrap_or(s);
    if body.is_empty() || body.len() > 32 || body.starts_with('-') || !name_chars_ok(body, "") {
        return Err(format!("bad login name '{s}': use 1-32 letters, digits, '-', '_' or '.', not starting with '-'"));
    }
    Ok(())
}

/// Parses an IP address or CIDR, if the text looks like one. `Ok(None)`
/// means "not an address at all".
pub fn parse_net(s: &str) -> Result<Option<IpNet>, String> {
    if s.contains('/') {
        return s
            .parse::<IpNet>()
            .map(|n| Some(n.trunc()))
            .map_err(|_| format!("bad CIDR '{s}' (expected e.g. 100.64.0.0/10 or fd7a::/48)"));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(ip)));
    }
    let looks_v4 = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') && s.contains('.');
    let looks_v6 = s.contains("::");
    if looks_v4 || looks_v6 {
        return Err(format!("bad IP address '{s}'"));
    }
    Ok(None)
}

/// Parses one `src` or `dst` entry (without ports).
pub fn parse_node(s: &str, side: Side, names: &Names) -> Result<NodePat, String> {
    if s == "*" {
        return Ok(NodePat::Any);
    }
    if let Some(ag) = s.strip_prefix("autogroup:") {
        return match (ag, side) {
            ("member", _) => Ok(NodePat::Member),
            ("tagged", _) => Ok(NodePat::Tagged),
            ("self", Side::Dst) => Ok(NodePat::SelfNodes),
            ("self", Side::Src) => Err("autogroup:self only works in dst (it means the caller's own nodes)".into()),
            ("nonroot" | "caller", _) => Err(format!("{s} is a login pattern; it belongs in users = [...] of an ssh rule")),
            _ => Err(format!("unknown autogroup '{s}' (known: autogroup:member, autogroup:tagged, autogroup:self)")),
        };
    }
    if s.starts_with(PROVIDER_GROUP_PREFIX) {
        return Ok(NodePat::ProviderGroup(check_provider_group(s)?.to_string()));
    }
    if s.starts_with("group:") {
        check_group_name(s)?;
        return match names.groups.get(s) {
            Some(m) => Ok(NodePat::Group { name: s.to_string(), members: m.clone() }),
            None => Err(format!("unknown group '{s}' (not defined in [groups])")),
        };
    }
    if s.starts_with("tag:") {
        check_tag_name(s)?;
        return if names.tags.contains(s) {
            Ok(NodePat::Tag(s.to_string()))
        } else {
            Err(format!("{s} has no entry in [tag_owners]; declare it there first"))
        };
    }
    if let Some(net) = parse_net(s)? {
        return Ok(NodePat::Net { net, alias: None });
    }
    if let Some((prefix, _)) = s.split_once(':') {
        return Err(format!(
            "unknown pattern '{s}': '{prefix}:' is not a known prefix \
             (expected tag:, group:, autogroup:, *, a name or an IP/CIDR)"
        ));
    }
    if let Some(net) = names.hosts.get(s) {
        return Ok(NodePat::Net { net: *net, alias: Some(s.to_string()) });
    }
    match side {
        Side::Src => {
            check_user_name(s)?;
            Ok(NodePat::User(s.to_string()))
        }
        Side::Dst => {
            check_host_name(s)?;
            Ok(NodePat::Host(s.to_string()))
        }
    }
}

fn host_matches(pat: &str, node_name: &str) -> bool {
    node_name.eq_ignore_ascii_case(pat)
        || (!pat.contains('.') && node_name.split('.').next().is_some_and(|first| first.eq_ignore_ascii_case(pat)))
}

impl NodePat {
    /// Does `node` belong to this set? `caller` matters only for
    /// `autogroup:self` (pass the node itself when matching sources).
    pub fn matches(&self, node: &Identity, caller: &Identity) -> bool {
        match self {
            NodePat::Any => true,
            NodePat::Member => effective_user(node).is_some(),
            NodePat::Tagged => !node.tags.is_empty(),
            NodePat::SelfNodes => match (effective_user(node), effective_user(caller)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
            NodePat::User(u) => effective_user(node) == Some(u.as_str()),
            NodePat::Group { members, .. } => effective_user(node).is_some_and(|u| members.contains(u)),
            NodePat::Tag(t) => node.tags.iter().any(|x| x == t),
            NodePat::ProviderGroup(g) => effective_user(node).is_some() && node.groups.iter().any(|x| x == g),
            NodePat::Host(h) => host_matches(h, &node.node_name),
            NodePat::Net { net, .. } => net.contains(&node.ip),
        }
    }

    /// Is every node in `other` also in `self`, whoever the caller is?
    /// Conservative: `false` when unsure.
    pub fn covers(&self, other: &NodePat) -> bool {
        use NodePat::*;
        match (self, other) {
            (Any, _) => true,
            (Member, Member | User(_) | Group { .. } | SelfNodes | ProviderGroup(_)) => true,
            (ProviderGroup(a), ProviderGroup(b)) => a == b,
            (Tagged, Tagged | Tag(_)) => true,
            (User(a), User(b)) => a == b,
            (User(a), Group { members, .. }) => members.iter().all(|m| m == a),
            (Group { name: a, .. }, Group { name: b, .. }) if a == b => true,
            (Group { members, .. }, User(u)) => members.contains(u),
            (Group { members: a, .. }, Group { members: b, .. }) => b.is_subset(a),
            (Tag(a), Tag(b)) => a == b,
            (Host(a), Host(b)) => a.eq_ignore_ascii_case(b),
            (Net { net: a, .. }, Net { net: b, .. }) => a.contains(b),
            (SelfNodes, SelfNodes) => true,
            _ => false,
        }
    }
}

/// Is every node matched by `inner` also matched by `outer`?
pub fn list_covers(outer: &[NodePat], inner: &[NodePat]) -> bool {
    inner.iter().all(|a| {
        outer.iter().any(|b| b.covers(a))
            || matches!(a, NodePat::Group { members, .. }
                if members.iter().all(|m| outer.iter().any(|b| b.covers(&NodePat::User(m.clone())))))
    })
}

/// A pattern for the local login name, in an ssh rule's `users`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoginPat {
    /// `*`: any login, root included.
    Any,
    /// `autogroup:nonroot`: any login except `root`.
    NonRoot,
    /// `autogroup:caller`: the login equal to the caller's tailnet user name,
    /// or to its part before `@` (`alice@example.com` may log in as `alice`).
    Caller,
    /// One login name.
    Name(String),
}

pub fn parse_login(s: &str) -> Result<LoginPat, String> {
    match s {
        "*" => Ok(LoginPat::Any),
        "autogroup:nonroot" => Ok(LoginPat::NonRoot),
        "autogroup:caller" => Ok(LoginPat::Caller),
        _ if s.starts_with("autogroup:") => Err(format!("unknown login pattern '{s}' (known: autogroup:nonroot, autogroup:caller, *)")),
        _ if s.starts_with("group:") || s.starts_with("tag:") => Err(format!(
            "'{s}' is not a login name: users = [...] lists local accounts \
             (root, deploy, autogroup:nonroot, autogroup:caller)"
        )),
        _ => {
            check_login_name(s)?;
            Ok(LoginPat::Name(s.to_string()))
        }
    }
}

impl LoginPat {
    pub fn matches(&self, login: &str, caller: &Identity) -> bool {
        match self {
            LoginPat::Any => true,
            LoginPat::NonRoot => login != "root",
            LoginPat::Caller => effective_user(caller)
                .is_some_and(|u| !login.is_empty() && (login == u || u.split_once('@').is_some_and(|(local, _)| local == login))),
            LoginPat::Name(n) => n == login,
        }
    }

    pub fn covers(&self, other: &LoginPat) -> bool {
        match (self, other) {
            (LoginPat::Any, _) => true,
            (LoginPat::NonRoot, LoginPat::NonRoot) => true,
            (LoginPat::NonRoot, LoginPat::Name(n)) => n != "root",
            (LoginPat::Caller, LoginPat::Caller) => true,
            (LoginPat::Name(a), LoginPat::Name(b)) => a == b,
            _ => false,
        }
    }
}

pub fn logins_cover(outer: &[LoginPat], inner: &[LoginPat]) -> bool {
    inner.iter().all(|a| outer.iter().any(|b| b.covers(a)))
}

/// The ports of an `acl` destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ports {
    All,
    Ranges(Vec<(u16, u16)>),
}

impl Ports {
    pub fn contains(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Ranges(r) => r.iter().any(|&(lo, hi)| lo <= port && port <= hi),
        }
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port '{s}' in port list '{whole}' (ports are 1-65535)")),
    }
}

/// `*`, or a comma list of ports and ranges: `22`, `80,443`, `8000-8999`.
pub fn parse_ports(s: &str) -> Result<Ports, String> {
    if s == "*" {
        return Ok(Ports::All);
    }
    if s.is_empty() {
        return Err("empty port list (write e.g. :22, :80,443, :8000-8999 or :*)".into());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (parse_port(a, s)?, parse_port(b, s)?),
            None => {
                let p = parse_port(part, s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("bad port range '{part}' in '{s}': start is after end"));
        }
        out.push((lo, hi));
    }
    Ok(Ports::Ranges(out))
}

/// Parses an `acl` destination `TARGET:PORTS` (`tag:prod:22,80`, `web1:*`,
/// `autogroup:self:*`, `100.64.0.0/10:443`, `[fd7a::1]:22`).
pub fn parse_acl_dst(s: &str, names: &Names) -> Result<(NodePat, Ports), String> {
    let (target, ports) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, ports)) = rest.split_once("]:") else {
            return Err(format!("bad acl dst '{s}': write [IPv6]:PORTS"));
        };
        (ip, ports)
    } else {
        match s.rsplit_once(':') {
            Some((t, p)) if !matches!(t, "tag" | "group" | "autogroup") => (t, p),
            _ => {
                return Err(format!("acl dst '{s}' needs a port list: write {s}:22, {s}:80,443 or {s}:*"));
            }
        }
    };
    let ports = parse_ports(ports).map_err(|e| format!("in acl dst '{s}': {e}"))?;
    let node = parse_node(target, Side::Dst, names)?;
    Ok((node, ports))
}

/// Checks an `accept_env` pattern: a variable name with `*` wildcards.
pub fn check_env_pattern(s: &str) -> Result<(), String> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*') {
        return Err(format!("bad accept_env pattern '{s}': use letters, digits, '_' and '*' wildcards"));
    }
    Ok(())
}

/// Glob match with `*` (any run of characters, possibly empty).
pub fn env_matches(pat: &str, name: &str) -> bool {
    let p = pat.as_bytes();
    let n = name.as_bytes();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}
