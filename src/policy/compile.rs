//! From TOML text to a validated [`Policy`]: every problem found is reported
//! with its line and column, all at once.
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;

use super::pattern::{self, LoginPat, Names, NodePat, Ports, Side};
use super::raw::RawRecord;
use super::raw::{RawPolicy, RawTest, SList, SStr};
use super::{Action, CheckPeriod, Diagnostic, Policy, PolicyErrors};
use crate::daemon::identity::Identity;

/// The address given to synthesized test callers (TEST-NET-1, never a
/// tailnet address) unless the test sets `src_ip`.
pub(crate) const TEST_SRC_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// The address given to synthesized test targets unless `dst` is an IP or a
/// `[hosts]` alias.
pub(crate) const TEST_DST_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

#[derive(Clone, Debug)]
pub(crate) struct TagOwners {
    pub users: BTreeSet<String>,
    pub tags: BTreeSet<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct AclRule {
    pub label: String,
    pub src: Vec<NodePat>,
    pub dst: Vec<(NodePat, Ports)>,
}

#[derive(Clone, Debug)]
pub(crate) struct SshRule {
    /// `ssh[INDEX] at FILE:LINE`
    pub label: String,
    pub line: usize,
    pub col: usize,
    pub src: Vec<NodePat>,
    pub dst: Vec<NodePat>,
    pub users: Vec<LoginPat>,
    pub action: Action,
    pub record: bool,
    /// `record = "required"`: no session unless the recording reaches control.
    pub record_required: bool,
    pub max_duration: Option<Duration>,
    pub accept_env: Vec<String>,
    pub check_period: CheckPeriod,
}

#[derive(Clone, Debug)]
pub(crate) struct LoginExpect {
    pub login: String,
    pub expect: Action,
    pub line: usize,
    pub col: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct PortExpect {
    pub port: u16,
    pub reachable: bool,
    pub line: usize,
    pub col: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct PolicyTest {
    /// `tests[INDEX] (SRC -> DST)`
    pub label: String,
    pub src: Identity,
    pub dst: Identity,
    pub logins: Vec<LoginExpect>,
    pub ports: Vec<PortExpect>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    /// Report rules that can never decide (on for every real load; property
    /// tests turn it off to evaluate arbitrary rule lists).
    pub shadow_check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { shadow_check: true }
    }
}

/// Byte offset -> 1-based line and column (in characters).
pub(crate) struct LineIndex<'a> {
    src: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { src, starts }
    }
    pub(crate) fn pos(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let line = self.starts.partition_point(|&s| s <= offset) - 1;
        let start = self.starts[line];
        let col = self.src.get(start..offset).map_or(offset - start, |t| t.chars().count()) + 1;
        (line + 1, col)
    }
}

struct Ctx<'a> {
    file: &'a str,
    lines: LineIndex<'a>,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    /// A diagnostic at `span`; `message` is a string or a typed parse error.
    fn err(&mut self, span: Range<usize>, message: impl std::fmt::Display) {
        let (line, col) = self.lines.pos(span.start);
        self.diags.push(Diagnostic { file: self.file.to_string(), line, col, message: message.to_string() });
    }
    fn pos(&self, span: Range<usize>) -> (usize, usize) {
        self.lines.pos(span.start)
    }
}

pub(crate) fn compile(src: &str, file: &str, opts: Options) -> Result<Policy, PolicyErrors> {
    let mut cx = Ctx { file, lines: LineIndex::new(src), diags: Vec::new() };
    let raw: RawPolicy = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            cx.err(e.span().unwrap_or(0..0), e.message().trim_end().to_string());
            return Err(PolicyErrors(cx.diags));
        }
    };

    let groups = compile_groups(&mut cx, &raw);
    let (tags, tag_owners) = compile_tag_owners(&mut cx, &raw, &groups);
    let hosts = compile_hosts(&mut cx, &raw);
    let names = Names { groups: &groups, tags: &tags, hosts: &hosts };

    let mut acls = Vec::new();
    for (i, a) in raw.acl.iter().flatten().enumerate() {
        let (line, _) = cx.pos(a.span());
        let rule = a.get_ref();
        let before = cx.diags.len();
        if let Some(act) = &rule.action
            && act.get_ref() != "accept"
        {
            cx.err(
                act.span(),
                format!("bad acl action '{}': acl rules can only \"accept\" (anything not accepted is denied)", act.get_ref()),
            );
        }
        let src = node_list(&mut cx, &rule.src, "src", |s| pattern::parse_node(s, Side::Src, &names));
        let dst = node_list(&mut cx, &rule.dst, "dst", |s| pattern::parse_acl_dst(s, &names));
        if cx.diags.len() == before {
            acls.push(AclRule { label: format!("acl[{i}] at {file}:{line}"), src, dst });
        }
    }

    let mut ssh = Vec::new();
    for (i, r) in raw.ssh.iter().enumerate() {
        let (line, col) = cx.pos(r.span());
        let rule = r.get_ref();
        let before = cx.diags.len();
        let action = match rule.action.get_ref().as_str() {
            "accept" => Some(Action::Accept),
            "check" => Some(Action::Check),
            "reject" => Some(Action::Reject),
            other => {
                cx.err(rule.action.span(), format!("bad action '{other}': expected \"accept\", \"check\" or \"reject\""));
                None
            }
        };
        let src = node_list(&mut cx, &rule.src, "src", |s| pattern::parse_node(s, Side::Src, &names));
        let dst = node_list(&mut cx, &rule.dst, "dst", |s| pattern::parse_node(s, Side::Dst, &names));
        let users = node_list(&mut cx, &rule.users, "users", pattern::parse_login);
        let (record, record_required) = match rule.record.as_ref().map(|r| (r.get_ref(), r.span())) {
            None | Some((RawRecord::Bool(false), _)) => (false, false),
            Some((RawRecord::Bool(true), _)) => (true, false),
            Some((RawRecord::Word(w), _)) if w == "required" => (true, true),
            Some((RawRecord::Word(w), span)) => {
                cx.err(span, format!("bad record value \"{w}\": expected a boolean (true, false) or \"required\""));
                (false, false)
            }
        };
        let mut max_duration = None;
        if let Some(d) = &rule.max_duration {
            match super::duration::parse_duration(d.get_ref()) {
                Ok(v) => max_duration = Some(v),
                Err(e) => cx.err(d.span(), e),
            }
        }
        let mut accept_env = Vec::new();
        if let Some(list) = &rule.accept_env {
            for e in list.get_ref() {
                match pattern::check_env_pattern(e.get_ref()) {
                    Ok(()) => accept_env.push(e.get_ref().clone()),
                    Err(m) => cx.err(e.span(), m),
                }
            }
        }
        let mut check_period = CheckPeriod::default();
        if let Some(p) = &rule.check_period {
            if action.is_some_and(|a| a != Action::Check) {
                cx.err(p.span(), "check_period only applies to a check rule (action = \"check\"); remove it".to_string());
            }
            match CheckPeriod::parse(p.get_ref()) {
                Ok(v) => check_period = v,
                Err(e) => cx.err(p.span(), e),
            }
        }
        if action == Some(Action::Reject) {
            let opts: [(&str, Option<Range<usize>>); 3] = [
                ("record", rule.record.as_ref().map(|r| r.span())),
                ("max_duration", rule.max_duration.as_ref().map(|r| r.span())),
                ("accept_env", rule.accept_env.as_ref().map(|r| r.span())),
            ];
            for (name, span) in opts {
                if let Some(span) = span {
                    cx.err(span, format!("{name} has no effect on a reject rule; remove it"));
                }
            }
        }
        if let Some(action) = action
            && cx.diags.len() == before
        {
            ssh.push(SshRule {
                label: format!("ssh[{i}] at {file}:{line}"),
                line,
                col,
                src,
                dst,
                users,
                action,
                record,
                record_required,
                max_duration,
                accept_env,
                check_period,
            });
        }
    }
    if opts.shadow_check && ssh.len() == raw.ssh.len() {
        check_shadowed(&mut cx, &ssh);
    }

    let mut tests = Vec::new();
    for (i, t) in raw.tests.iter().enumerate() {
        if let Some(t) = compile_test(&mut cx, i, t.get_ref(), t.span(), &names) {
            tests.push(t);
        }
    }

    if !cx.diags.is_empty() {
        let mut d = cx.diags;
        d.sort_by_key(|a| (a.line, a.col));
        return Err(PolicyErrors(d));
    }
    Ok(Policy { file: file.to_string(), groups, tag_owners, acls, ssh, tests })
}

fn node_list<T>(cx: &mut Ctx, list: &SList, what: &str, parse: impl Fn(&str) -> Result<T, pattern::PatternError>) -> Vec<T> {
    if list.get_ref().is_empty() {
        cx.err(list.span(), format!("empty {what} list: it would match nothing"));
    }
    let mut out = Vec::new();
    for s in list.get_ref() {
        match parse(s.get_ref()) {
            Ok(v) => out.push(v),
            Err(m) => cx.err(s.span(), m),
        }
    }
    out
}

fn compile_groups(cx: &mut Ctx, raw: &RawPolicy) -> BTreeMap<String, BTreeSet<String>> {
    // Direct members: users, and references to other groups (with spans).
    let mut direct: BTreeMap<String, (Vec<String>, Vec<&SStr>)> = BTreeMap::new();
    for (k, members) in &raw.groups {
        if let Err(m) = pattern::check_group_name(k.get_ref()) {
            cx.err(k.span(), m);
            continue;
        }
        let mut users = Vec::new();
        let mut refs = Vec::new();
        for m in members {
            let s = m.get_ref().as_str();
            if s.starts_with(pattern::PROVIDER_GROUP_PREFIX) {
                cx.err(
                    m.span(),
                    format!(
                        "'{s}' is a group at the identity provider; use it directly in src/dst, [groups] list users and other [groups]"
                    ),
                );
            } else if s.starts_with("group:") {
                refs.push(m);
            } else if s.starts_with("tag:") || s.starts_with("autogroup:") || s == "*" {
                cx.err(m.span(), format!("groups list users and other groups, not '{s}'"));
            } else if let Err(e) = pattern::check_user_name(s) {
                cx.err(m.span(), e);
            } else {
                users.push(s.to_string());
            }
        }
        direct.insert(k.get_ref().clone(), (users, refs));
    }
    for (_, refs) in direct.values() {
        for r in refs {
            if !direct.contains_key(r.get_ref()) {
                cx.err(r.span(), format!("unknown group '{}' (not defined in [groups])", r.get_ref()));
            }
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Visiting,
        Done,
    }
    fn expand(
        g: &str,
        direct: &BTreeMap<String, (Vec<String>, Vec<&SStr>)>,
        state: &mut BTreeMap<String, State>,
        out: &mut BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        cx: &mut Ctx,
    ) {
        if state.contains_key(g) {
            return;
        }
        let Some((users, refs)) = direct.get(g) else {
            return;
        };
        state.insert(g.to_string(), State::Visiting);
        stack.push(g.to_string());
        let mut set: BTreeSet<String> = users.iter().cloned().collect();
        for r in refs {
            let name = r.get_ref().as_str();
            match state.get(name) {
                Some(State::Visiting) => {
                    let at = stack.iter().position(|s| s == name).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(name.to_string());
                    cx.err(r.span(), format!("group cycle: {}", cycle.join(" -> ")));
                }
                _ => {
                    expand(name, direct, state, out, stack, cx);
                    if let Some(s) = out.get(name) {
                        set.extend(s.iter().cloned());
                    }
                }
            }
        }
        stack.pop();
        state.insert(g.to_string(), State::Done);
        out.insert(g.to_string(), set);
    }

    let mut state = BTreeMap::new();
    let mut out = BTreeMap::new();
    let mut stack = Vec::new();
    for g in direct.keys() {
        expand(g, &direct, &mut state, &mut out, &mut stack, cx);
    }
    out
}

fn compile_tag_owners(
    cx: &mut Ctx,
    raw: &RawPolicy,
    groups: &BTreeMap<String, BTreeSet<String>>,
) -> (BTreeSet<String>, BTreeMap<String, TagOwners>) {
    let mut tags = BTreeSet::new();
    for k in raw.tag_owners.keys() {
        match pattern::check_tag_name(k.get_ref()) {
            Ok(()) => {
                tags.insert(k.get_ref().clone());
            }
            Err(m) => cx.err(k.span(), m),
        }
    }
    let mut owners = BTreeMap::new();
    for (k, list) in &raw.tag_owners {
        if !tags.contains(k.get_ref()) {
            continue;
        }
        let mut o = TagOwners { users: BTreeSet::new(), tags: BTreeSet::new() };
        for m in list {
            let s = m.get_ref().as_str();
            if s.starts_with("group:") {
                match groups.get(s) {
                    Some(u) => o.users.extend(u.iter().cloned()),
                    None => cx.err(m.span(), format!("unknown group '{s}' (not defined in [groups])")),
                }
            } else if s.starts_with("tag:") {
                if tags.contains(s) {
                    o.tags.insert(s.to_string());
                } else {
                    cx.err(m.span(), format!("{s} has no entry in [tag_owners]; declare it there first"));
                }
            } else if s.starts_with("autogroup:") || s == "*" {
                cx.err(m.span(), format!("tag owners are users, groups or tags, not '{s}'"));
            } else if let Err(e) = pattern::check_user_name(s) {
                cx.err(m.span(), e);
            } else {
                o.users.insert(s.to_string());
            }
        }
        owners.insert(k.get_ref().clone(), o);
    }
    (tags, owners)
}

fn compile_hosts(cx: &mut Ctx, raw: &RawPolicy) -> BTreeMap<String, IpNet> {
    let mut hosts = BTreeMap::new();
    for (k, v) in &raw.hosts {
        if let Err(m) = pattern::check_host_name(k.get_ref()) {
            cx.err(k.span(), m);
            continue;
        }
        match pattern::parse_net(v.get_ref()) {
            Ok(Some(net)) => {
                hosts.insert(k.get_ref().clone(), net);
            }
            Ok(None) => cx.err(v.span(), format!("bad host address '{}': expected an IP or CIDR", v.get_ref())),
            Err(m) => cx.err(v.span(), m),
        }
    }
    hosts
}

/// Rules that can never decide: an earlier accept/check rule (or a reject
/// rule anywhere) already matches every login they match.
fn check_shadowed(cx: &mut Ctx, rules: &[SshRule]) {
    // Rejects first, so a rule shadowed both ways is blamed on the reject.
    let order: Vec<usize> = (0..rules.len())
        .filter(|&i| rules[i].action == Action::Reject)
        .chain((0..rules.len()).filter(|&i| rules[i].action != Action::Reject))
        .collect();
    for (j, r) in rules.iter().enumerate() {
        for &i in &order {
            let e = &rules[i];
            let relevant = match (e.action, r.action) {
                (Action::Reject, Action::Reject) => i < j,
                (Action::Reject, _) => i != j,
                (_, Action::Reject) => false,
                _ => i < j,
            };
            if relevant
                && pattern::list_covers(&e.src, &r.src)
                && pattern::list_covers(&e.dst, &r.dst)
                && pattern::logins_cover(&e.users, &r.users)
            {
                let why = if e.action == Action::Reject && r.action != Action::Reject {
                    "a matching reject rule wins over accept and check, wherever it is"
                } else {
                    "the first matching rule decides"
                };
                let (file, line, col) = (cx.file.to_string(), r.line, r.col);
                cx.diags.push(Diagnostic {
                    file,
                    line,
                    col,
                    message: format!(
                        "unreachable rule: {} can never decide, every login it matches is decided by {} ({why})",
                        r.label.split(" at ").next().unwrap_or(&r.label),
                        e.label
                    ),
                });
                break;
            }
        }
    }
}

fn compile_test(cx: &mut Ctx, i: usize, t: &RawTest, span: Range<usize>, names: &Names) -> Option<PolicyTest> {
    let before = cx.diags.len();
    let check_tags = |cx: &mut Ctx, s: &SStr| -> Vec<String> {
        let mut out = Vec::new();
        for tag in s.get_ref().split(',').map(str::trim) {
            if let Err(m) = pattern::check_tag_name(tag) {
                cx.err(s.span(), m);
            } else if !names.tags.contains(tag) {
                cx.err(s.span(), format!("{tag} has no entry in [tag_owners]; declare it there first"));
            } else {
                out.push(tag.to_string());
            }
        }
        out
    };

    // The caller.
    let src_s = t.src.get_ref().as_str();
    let mut src = Identity {
        node_key: "test-src".into(),
        node_name: "test-src".into(),
        user: None,
        tags: Vec::new(),
        ip: TEST_SRC_IP,
        groups: Vec::new(),
    };
    if src_s.starts_with("tag:") {
        src.tags = check_tags(cx, &t.src);
    } else if src_s.starts_with("group:") || src_s.starts_with("autogroup:") || src_s == "*" || src_s.contains(':') {
        cx.err(
            t.src.span(),
            format!("test src must be one concrete caller, a user name or tag(s) (e.g. \"alice\" or \"tag:ci\"), not '{src_s}'"),
        );
    } else if let Err(m) = pattern::check_user_name(src_s) {
        cx.err(t.src.span(), m);
    } else {
        src.user = Some(src_s.to_string());
    }
    if let Some(groups) = &t.src_groups {
        if src.user.is_none() {
            cx.err(groups.span(), "src_groups needs a user as src (tagged nodes have no provider groups)");
        }
        for g in groups.get_ref() {
            let full = if g.get_ref().starts_with("group:") {
                g.get_ref().clone()
            } else {
                format!("{}{}", pattern::PROVIDER_GROUP_PREFIX, g.get_ref())
            };
            match pattern::check_provider_group(&full) {
                Ok(name) => src.groups.push(name.to_string()),
                Err(m) => cx.err(g.span(), m),
            }
        }
    }
    if let Some(ip) = &t.src_ip {
        match ip.get_ref().parse::<IpAddr>() {
            Ok(a) => src.ip = a,
            Err(_) => cx.err(ip.span(), format!("bad IP address '{}'", ip.get_ref())),
        }
    }

    // The target.
    let dst_s = t.dst.get_ref().as_str();
    let mut dst = Identity {
        node_key: "test-dst".into(),
        node_name: dst_s.to_string(),
        user: None,
        tags: Vec::new(),
        ip: TEST_DST_IP,
        groups: Vec::new(),
    };
    if dst_s == "autogroup:self" {
        match &src.user {
            Some(u) => dst.user = Some(u.clone()),
            None if src.tags.is_empty() => {}
            None => cx.err(t.dst.span(), "dst = \"autogroup:self\" needs a user as src (tagged nodes own no nodes)"),
        }
        if let Some(dt) = &t.dst_tags {
            cx.err(dt.span(), "dst_tags can't be used with dst = \"autogroup:self\" (a tagged node belongs to no user)");
        }
    } else if dst_s.starts_with("tag:") {
        dst.tags = check_tags(cx, &t.dst);
    } else if dst_s.starts_with("group:") || dst_s.starts_with("autogroup:") || dst_s == "*" {
        cx.err(
            t.dst.span(),
            format!("test dst must be one concrete node: a host name, an IP, tag(s) or \"autogroup:self\", not '{dst_s}'"),
        );
    } else {
        match pattern::parse_net(dst_s) {
            Ok(Some(net)) if net.prefix_len() == net.max_prefix_len() => dst.ip = net.addr(),
            Ok(Some(_)) => cx.err(t.dst.span(), format!("test dst must be one node, not the network '{dst_s}'")),
            Err(m) => cx.err(t.dst.span(), m),
            Ok(None) => match pattern::check_host_name(dst_s) {
                Ok(()) => {
                    if let Some(net) = names.hosts.get(dst_s) {
                        dst.ip = net.network();
                    }
                }
                Err(m) => cx.err(t.dst.span(), m),
            },
        }
    }
    if dst_s != "autogroup:self"
        && let Some(dt) = &t.dst_tags
    {
        for tag in dt.get_ref() {
            if let Err(m) = pattern::check_tag_name(tag.get_ref()) {
                cx.err(tag.span(), m);
            } else if !names.tags.contains(tag.get_ref()) {
                cx.err(tag.span(), format!("{} has no entry in [tag_owners]; declare it there first", tag.get_ref()));
            } else if !dst.tags.contains(tag.get_ref()) {
                dst.tags.push(tag.get_ref().clone());
            }
        }
    }

    // The assertions.
    let mut logins = Vec::new();
    let mut seen = BTreeSet::new();
    for (list, expect) in [(&t.accept, Action::Accept), (&t.check, Action::Check), (&t.deny, Action::Reject)] {
        for l in list {
            let (line, col) = cx.pos(l.span());
            if let Err(m) = pattern::check_login_name(l.get_ref()) {
                cx.err(l.span(), format!("{m} (tests list concrete login names, not patterns)"));
            } else if !seen.insert(l.get_ref().clone()) {
                cx.err(l.span(), format!("login '{}' is listed twice in this test", l.get_ref()));
            } else {
                logins.push(LoginExpect { login: l.get_ref().clone(), expect, line, col });
            }
        }
    }
    let mut ports = Vec::new();
    for (list, reachable) in [(&t.reach, true), (&t.no_reach, false)] {
        for p in list {
            let (line, col) = cx.pos(p.span());
            match u16::try_from(*p.get_ref()) {
                Ok(port) if port > 0 => ports.push(PortExpect { port, reachable, line, col }),
                _ => cx.err(p.span(), format!("bad port {} (ports are 1-65535)", p.get_ref())),
            }
        }
    }
    if logins.is_empty() && ports.is_empty() && cx.diags.len() == before {
        cx.err(span, "this test asserts nothing: add accept, check, deny, reach or no_reach");
    }
    if cx.diags.len() != before {
        return None;
    }
    Some(PolicyTest { label: format!("tests[{i}] ({src_s} -> {dst_s})"), src, dst, logins, ports })
}
