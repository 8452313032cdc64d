//! Patterns that appear in `src`, `dst`, `users` and `accept_env`, how they
//! are parsed, how they match identities, and when one covers another (used
//! to find rules that can never decide anything).
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::daemon::identity::Identity;

/// The user a node acts for. Tagged nodes have no user, even if the identity
/// happens to carry one: a node is either user-owned or tagged.
pub(crate) fn effective_user(id: &Identity) -> Option<&str> {
    if id.tags.is_empty() { id.user.as_deref() } else { None }
}

/// Which side of a rule a pattern is on. It changes what a bare name means:
/// a user in `src`, a host in `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Src,
    Dst,
}

/// A set of nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodePat {
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
pub(crate) struct Names<'a> {
    pub groups: &'a BTreeMap<String, BTreeSet<String>>,
    pub tags: &'a BTreeSet<String>,
    pub hosts: &'a BTreeMap<String, IpNet>,
}

/// A policy entry that is not a valid pattern. The text is user-facing:
/// the compiler puts `FILE:LINE:COL` in front of it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("'{0}' is not a tag: tags are written tag:NAME")]
    NotATag(String),
    #[error("empty tag name in '{0}'")]
    EmptyTag(String),
    #[error("bad tag name '{0}': use letters, digits, '-', '_' and '.'")]
    BadTag(String),
    #[error("'{0}' is not a group name: groups are written group:NAME")]
    NotAGroup(String),
    #[error("empty group name in '{0}'")]
    EmptyGroup(String),
    #[error("bad group name '{0}': use letters, digits, '-', '_', '.' and '@'")]
    BadGroup(String),
    #[error("'{0}' is not a provider group: they are written group:oidc/NAME")]
    NotAProviderGroup(String),
    #[error("empty provider group name in '{0}' (write group:oidc/NAME, NAME as the identity provider sends it)")]
    EmptyProviderGroup(String),
    #[error("bad provider group name '{0}': at most 256 printable characters")]
    BadProviderGroup(String),
    #[error("empty user name")]
    EmptyUser,
    #[error("bad user name '{0}': '{1}' is not allowed in user names")]
    BadUser(String, char),
    #[error("'{0}' is not a host name (in dst, bare names are host names; for a user's own nodes use autogroup:self, or a group)")]
    UserAsHost(String),
    #[error("bad host name '{0}': use letters, digits, '-', '_' and '.'")]
    BadHost(String),
    #[error("bad login name '{0}': use 1-32 letters, digits, '-', '_' or '.', not starting with '-'")]
    BadLogin(String),
    #[error("bad CIDR '{0}' (expected e.g. 100.64.0.0/10 or fd7a::/48)")]
    BadCidr(String),
    #[error("bad IP address '{0}'")]
    BadIp(String),
    #[error("autogroup:self only works in dst (it means the caller's own nodes)")]
    SelfInSrc,
    #[error("{0} is a login pattern; it belongs in users = [...] of an ssh rule")]
    LoginPatternAsNode(String),
    #[error("unknown autogroup '{0}' (known: autogroup:member, autogroup:tagged, autogroup:self)")]
    UnknownAutogroup(String),
    #[error("unknown group '{0}' (not defined in [groups])")]
    UnknownGroup(String),
    #[error("{0} has no entry in [tag_owners]; declare it there first")]
    TagWithoutOwner(String),
    #[error("unknown pattern '{0}': '{1}:' is not a known prefix (expected tag:, group:, autogroup:, *, a name or an IP/CIDR)")]
    UnknownPrefix(String, String),
    #[error("unknown login pattern '{0}' (known: autogroup:nonroot, autogroup:caller, *)")]
    UnknownLoginPattern(String),
    #[error("'{0}' is not a login name: users = [...] lists local accounts (root, deploy, autogroup:nonroot, autogroup:caller)")]
    NodeAsLogin(String),
    #[error("bad port '{0}' in port list '{1}' (ports are 1-65535)")]
    BadPort(String, String),
    #[error("empty port list (write e.g. :22, :80,443, :8000-8999 or :*)")]
    EmptyPorts,
    #[error("bad port range '{0}' in '{1}': start is after end")]
    BackwardsRange(String, String),
    #[error("bad acl dst '{0}': write [IPv6]:PORTS")]
    BadIpv6Dst(String),
    #[error("acl dst '{0}' needs a port list: write {0}:22, {0}:80,443 or {0}:*")]
    DstWithoutPorts(String),
    #[error("in acl dst '{0}': {1}")]
    InDst(String, Box<PatternError>),
    #[error("bad accept_env pattern '{0}': use letters, digits, '_' and '*' wildcards")]
    BadEnvPattern(String),
}

fn name_chars_ok(s: &str, extra: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(c))
}

/// Checks `tag:NAME`.
pub(crate) fn check_tag_name(s: &str) -> Result<(), PatternError> {
    let Some(rest) = s.strip_prefix("tag:") else {
        return Err(PatternError::NotATag(s.into()));
    };
    if rest.is_empty() {
        return Err(PatternError::EmptyTag(s.into()));
    }
    if !name_chars_ok(rest, "") {
        return Err(PatternError::BadTag(s.into()));
    }
    Ok(())
}

/// Checks `group:NAME`.
pub(crate) fn check_group_name(s: &str) -> Result<(), PatternError> {
    let Some(rest) = s.strip_prefix("group:") else {
        return Err(PatternError::NotAGroup(s.into()));
    };
    if rest.is_empty() {
        return Err(PatternError::EmptyGroup(s.into()));
    }
    if !name_chars_ok(rest, "@") {
        return Err(PatternError::BadGroup(s.into()));
    }
    Ok(())
}

/// Prefix of a provider group in patterns. `[groups]` names cannot contain
/// '/', so a provider group never clashes with a policy-defined group.
pub(crate) const PROVIDER_GROUP_PREFIX: &str = "group:oidc/";

/// Checks `group:oidc/NAME` and returns NAME. Provider group names are the
/// provider's own (Keycloak sends `/team/admins`, Google `admins@example.com`),
/// so anything printable is allowed.
pub(crate) fn check_provider_group(s: &str) -> Result<&str, PatternError> {
    let Some(name) = s.strip_prefix(PROVIDER_GROUP_PREFIX) else {
        return Err(PatternError::NotAProviderGroup(s.into()));
    };
    if name.is_empty() {
        return Err(PatternError::EmptyProviderGroup(s.into()));
    }
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(PatternError::BadProviderGroup(s.into()));
    }
    Ok(name)
}

/// Checks a tailnet user name (`alice`, `alice@example.com`).
pub(crate) fn check_user_name(s: &str) -> Result<(), PatternError> {
    if s.is_empty() {
        return Err(PatternError::EmptyUser);
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || ",:*\"'/\\".contains(*c)) {
        return Err(PatternError::BadUser(s.into(), c));
    }
    Ok(())
}

/// Checks a host name or `[hosts]` alias.
pub(crate) fn check_host_name(s: &str) -> Result<(), PatternError> {
    if s.contains('@') {
        return Err(PatternError::UserAsHost(s.into()));
    }
    if !name_chars_ok(s, "") || s.starts_with(['-', '.']) || s.ends_with('.') {
        return Err(PatternError::BadHost(s.into()));
    }
    Ok(())
}

/// Checks a local login name (`root`, `deploy`, `www-data`).
pub(crate) fn check_login_name(s: &str) -> Result<(), PatternError> {
    let body = s.strip_suffix('$').unwrap_or(s);
    if body.is_empty() || body.len() > 32 || body.starts_with('-') || !name_chars_ok(body, "") {
        return Err(PatternError::BadLogin(s.into()));
    }
    Ok(())
}

/// Parses an IP address or CIDR, if the text looks like one. `Ok(None)`
/// means "not an address at all".
pub(crate) fn parse_net(s: &str) -> Result<Option<IpNet>, PatternError> {
    if s.contains('/') {
        return s.parse::<IpNet>().map(|n| Some(n.trunc())).map_err(|_| PatternError::BadCidr(s.into()));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Some(IpNet::from(ip)));
    }
    let looks_v4 = !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') && s.contains('.');
    let looks_v6 = s.contains("::");
    if looks_v4 || looks_v6 {
        return Err(PatternError::BadIp(s.into()));
    }
    Ok(None)
}

/// Parses one `src` or `dst` entry (without ports).
pub(crate) fn parse_node(s: &str, side: Side, names: &Names) -> Result<NodePat, PatternError> {
    if s == "*" {
        return Ok(NodePat::Any);
    }
    if let Some(ag) = s.strip_prefix("autogroup:") {
        return match (ag, side) {
            ("member", _) => Ok(NodePat::Member),
            ("tagged", _) => Ok(NodePat::Tagged),
            ("self", Side::Dst) => Ok(NodePat::SelfNodes),
            ("self", Side::Src) => Err(PatternError::SelfInSrc),
            ("nonroot" | "caller", _) => Err(PatternError::LoginPatternAsNode(s.into())),
            _ => Err(PatternError::UnknownAutogroup(s.into())),
        };
    }
    if s.starts_with(PROVIDER_GROUP_PREFIX) {
        return Ok(NodePat::ProviderGroup(check_provider_group(s)?.to_string()));
    }
    if s.starts_with("group:") {
        check_group_name(s)?;
        return match names.groups.get(s) {
            Some(m) => Ok(NodePat::Group { name: s.to_string(), members: m.clone() }),
            None => Err(PatternError::UnknownGroup(s.into())),
        };
    }
    if s.starts_with("tag:") {
        check_tag_name(s)?;
        return if names.tags.contains(s) { Ok(NodePat::Tag(s.to_string())) } else { Err(PatternError::TagWithoutOwner(s.into())) };
    }
    if let Some(net) = parse_net(s)? {
        return Ok(NodePat::Net { net, alias: None });
    }
    if let Some((prefix, _)) = s.split_once(':') {
        return Err(PatternError::UnknownPrefix(s.into(), prefix.into()));
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
    pub(crate) fn matches(&self, node: &Identity, caller: &Identity) -> bool {
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
    pub(crate) fn covers(&self, other: &NodePat) -> bool {
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
pub(crate) fn list_covers(outer: &[NodePat], inner: &[NodePat]) -> bool {
    inner.iter().all(|a| {
        outer.iter().any(|b| b.covers(a))
            || matches!(a, NodePat::Group { members, .. }
                if members.iter().all(|m| outer.iter().any(|b| b.covers(&NodePat::User(m.clone())))))
    })
}

/// A pattern for the local login name, in an ssh rule's `users`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LoginPat {
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

pub(crate) fn parse_login(s: &str) -> Result<LoginPat, PatternError> {
    match s {
        "*" => Ok(LoginPat::Any),
        "autogroup:nonroot" => Ok(LoginPat::NonRoot),
        "autogroup:caller" => Ok(LoginPat::Caller),
        _ if s.starts_with("autogroup:") => Err(PatternError::UnknownLoginPattern(s.into())),
        _ if s.starts_with("group:") || s.starts_with("tag:") => Err(PatternError::NodeAsLogin(s.into())),
        _ => {
            check_login_name(s)?;
            Ok(LoginPat::Name(s.to_string()))
        }
    }
}

impl LoginPat {
    pub(crate) fn matches(&self, login: &str, caller: &Identity) -> bool {
        match self {
            LoginPat::Any => true,
            LoginPat::NonRoot => login != "root",
            LoginPat::Caller => effective_user(caller)
                .is_some_and(|u| !login.is_empty() && (login == u || u.split_once('@').is_some_and(|(local, _)| local == login))),
            LoginPat::Name(n) => n == login,
        }
    }

    pub(crate) fn covers(&self, other: &LoginPat) -> bool {
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

pub(crate) fn logins_cover(outer: &[LoginPat], inner: &[LoginPat]) -> bool {
    inner.iter().all(|a| outer.iter().any(|b| b.covers(a)))
}

/// The ports of an `acl` destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ports {
    All,
    Ranges(Vec<(u16, u16)>),
}

impl Ports {
    pub(crate) fn contains(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Ranges(r) => r.iter().any(|&(lo, hi)| lo <= port && port <= hi),
        }
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, PatternError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PatternError::BadPort(s.into(), whole.into())),
    }
}

/// `*`, or a comma list of ports and ranges: `22`, `80,443`, `8000-8999`.
pub(crate) fn parse_ports(s: &str) -> Result<Ports, PatternError> {
    if s == "*" {
        return Ok(Ports::All);
    }
    if s.is_empty() {
        return Err(PatternError::EmptyPorts);
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
            return Err(PatternError::BackwardsRange(part.into(), s.into()));
        }
        out.push((lo, hi));
    }
    Ok(Ports::Ranges(out))
}

/// Parses an `acl` destination `TARGET:PORTS` (`tag:prod:22,80`, `web1:*`,
/// `autogroup:self:*`, `100.64.0.0/10:443`, `[fd7a::1]:22`).
pub(crate) fn parse_acl_dst(s: &str, names: &Names) -> Result<(NodePat, Ports), PatternError> {
    let (target, ports) = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, ports)) = rest.split_once("]:") else {
            return Err(PatternError::BadIpv6Dst(s.into()));
        };
        (ip, ports)
    } else {
        match s.rsplit_once(':') {
            Some((t, p)) if !matches!(t, "tag" | "group" | "autogroup") => (t, p),
            _ => {
                return Err(PatternError::DstWithoutPorts(s.into()));
            }
        }
    };
    let ports = parse_ports(ports).map_err(|e| PatternError::InDst(s.into(), Box::new(e)))?;
    let node = parse_node(target, Side::Dst, names)?;
    Ok((node, ports))
}

/// Checks an `accept_env` pattern: a variable name with `*` wildcards.
pub(crate) fn check_env_pattern(s: &str) -> Result<(), PatternError> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '*') {
        return Err(PatternError::BadEnvPattern(s.into()));
    }
    Ok(())
}

/// Glob match with `*` (any run of characters, possibly empty).
pub(crate) fn env_matches(pat: &str, name: &str) -> bool {
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
