//! Unit tests of the policy engine (property tests are in `props.rs`, the
//! shipped policy files are tested by tests/policy_files.rs).

use std::net::IpAddr;
use std::time::Duration;

use super::compile::LineIndex;
use super::*;

pub(crate) fn user(name: &str, node: &str) -> Identity {
    Identity {
        node_key: format!("key-{node}"),
        node_name: node.into(),
        user: Some(name.into()),
        tags: vec![],
        ip: "100.64.0.1".parse().unwrap(),
        groups: Vec::new(),
    }
}

pub(crate) fn tagged(tags: &[&str], node: &str) -> Identity {
    Identity {
        node_key: format!("key-{node}"),
        node_name: node.into(),
        user: None,
        tags: tags.iter().map(|s| s.to_string()).collect(),
        ip: "100.64.0.2".parse().unwrap(),
        groups: Vec::new(),
    }
}

fn at(mut id: Identity, ip: &str) -> Identity {
    id.ip = ip.parse::<IpAddr>().unwrap();
    id
}

fn parse(src: &str) -> Policy {
    Policy::parse(src, "t.toml").unwrap_or_else(|e| panic!("policy should parse:\n{e}"))
}

fn errors(src: &str) -> Vec<String> {
    match Policy::parse(src, "t.toml") {
        Ok(_) => panic!("policy should not parse:\n{src}"),
        Err(e) => e.0.iter().map(|d| d.to_string()).collect(),
    }
}

fn assert_error(src: &str, line_col: &str, needle: &str) {
    let errs = errors(src);
    let want = format!("t.toml:{line_col}: ");
    assert!(
        errs.iter().any(|e| e.starts_with(&want) && e.contains(needle)),
        "expected an error at {line_col} containing {needle:?}, got:\n{}",
        errs.join("\n")
    );
}

const TAGS: &str = "[tag_owners]\n\"tag:prod\" = []\n\"tag:ci\" = []\n";

// ---- decisions ---------------------------------------------------------

#[test]
fn empty_policy_denies_everything_with_a_reason() {
    let p = parse("");
    let d = p.check_ssh(&user("alice", "laptop"), &user("alice", "web1"), "root");
    assert_eq!(d.action, Action::Reject);
    assert_eq!(d.rule, None);
    assert_eq!(d.reason, "no ssh rule in the policy allows alice to log in to web1 as root");
    assert!(!d.record && d.max_duration.is_none() && d.accept_env.is_empty());
    assert!(!p.check_network(&user("alice", "a"), &user("alice", "b"), 22));
}

#[test]
fn rule_label_names_index_file_and_line() {
    let p = parse(&format!(
        "{TAGS}\n[[ssh]]\nsrc = [\"bob\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"accept\"\n\n\
         [[ssh]]\nsrc = [\"alice\"]\ndst = [\"tag:prod\"]\nusers = [\"root\"]\naction = \"accept\"\n"
    ));
    let d = p.check_ssh(&user("alice", "laptop"), &tagged(&["tag:prod"], "web1"), "root");
    assert_eq!(d.action, Action::Accept);
    assert_eq!(d.rule.as_deref(), Some("ssh[1] at t.toml:11"));
    assert_eq!(d.reason, "ssh[1] at t.toml:11 allows alice to log in to web1 as root");
}

#[test]
fn reject_wins_even_after_accept() {
    let p = parse(
        "[[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"*\"]\naction = \"accept\"\n\n\
         [[ssh]]\nsrc = [\"*\"]\ndst = [\"web1\"]\nusers = [\"root\"]\naction = \"reject\"\n",
    );
    let (a, w) = (user("alice", "laptop"), user("x", "web1"));
    let d = p.check_ssh(&a, &w, "root");
    assert_eq!(d.action, Action::Reject);
    assert_eq!(d.rule.as_deref(), Some("ssh[1] at t.toml:7"));
    assert!(d.reason.contains("rejects alice"), "{}", d.reason);
    assert_eq!(p.check_ssh(&a, &w, "alice").action, Action::Accept);
}

#[test]
fn first_matching_accept_or_check_wins() {
    let rule = |act: &str, users: &str| format!("[[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [{users}]\naction = \"{act}\"\n");
    let (a, w) = (user("alice", "laptop"), user("x", "web1"));
    let p = parse(&(rule("check", "\"alice\"") + &rule("accept", "\"*\"")));
    assert_eq!(p.check_ssh(&a, &w, "alice").action, Action::Check);
    assert_eq!(p.check_ssh(&a, &w, "root").action, Action::Accept);
    let p = parse(&(rule("accept", "\"alice\"") + &rule("check", "\"*\"")));
    assert_eq!(p.check_ssh(&a, &w, "alice").action, Action::Accept);
    assert_eq!(p.check_ssh(&a, &w, "root").action, Action::Check);
    assert!(p.check_ssh(&a, &w, "root").reason.contains("requires a check"));
}

#[test]
fn options_of_the_deciding_rule_are_returned() {
    let p = parse(
        "[[ssh]]\nsrc = [\"alice\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"accept\"\n\
         record = true\nmax_duration = \"1h30m\"\naccept_env = [\"LC_*\", \"TERM\"]\n",
    );
    let d = p.check_ssh(&user("alice", "l"), &user("bob", "w"), "root");
    assert!(d.record);
    assert_eq!(d.max_duration, Some(Duration::from_secs(5400)));
    assert!(d.allows_env("LC_ALL") && d.allows_env("TERM") && d.allows_env("LC_"));
    assert!(!d.allows_env("LD_PRELOAD") && !d.allows_env("TERMX"));
}

#[test]
fn tagged_caller_never_matches_user_based_src() {
    let p = parse(&format!(
        "{TAGS}[groups]\n\"group:g\" = [\"alice\"]\n\
         [[ssh]]\nsrc = [\"alice\", \"group:g\", \"autogroup:member\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"accept\"\n"
    ));
    let w = tagged(&["tag:prod"], "web1");
    assert_eq!(p.check_ssh(&user("alice", "l"), &w, "root").action, Action::Accept);
    // A tagged node has no user, even if an identity carries one by mistake.
    let mut ci = tagged(&["tag:ci"], "ci1");
    assert_eq!(p.check_ssh(&ci, &w, "root").action, Action::Reject);
    ci.user = Some("alice".into());
    assert_eq!(p.check_ssh(&ci, &w, "root").action, Action::Reject);
}

#[test]
fn tags_and_autogroup_tagged_match_tagged_callers() {
    let p = parse(&format!(
        "{TAGS}[[ssh]]\nsrc = [\"tag:ci\"]\ndst = [\"tag:prod\"]\nusers = [\"deploy\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"autogroup:tagged\"]\ndst = [\"tag:prod\"]\nusers = [\"monitor\"]\naction = \"accept\"\n"
    ));
    let w = tagged(&["tag:prod"], "web1");
    let ci = tagged(&["tag:ci", "tag:other"], "ci1");
    assert_eq!(p.check_ssh(&ci, &w, "deploy").action, Action::Accept);
    assert_eq!(p.check_ssh(&ci, &w, "root").action, Action::Reject);
    assert_eq!(p.check_ssh(&tagged(&["tag:prod"], "x"), &w, "monitor").action, Action::Accept);
    assert_eq!(p.check_ssh(&user("alice", "l"), &w, "monitor").action, Action::Reject);
}

#[test]
fn autogroup_self_matches_same_user_only_and_never_tagged_targets() {
    let p = parse("[[ssh]]\nsrc = [\"*\"]\ndst = [\"autogroup:self\"]\nusers = [\"*\"]\naction = \"accept\"\n");
    let alice = user("alice", "laptop");
    assert_eq!(p.check_ssh(&alice, &user("alice", "desk"), "root").action, Action::Accept);
    assert_eq!(p.check_ssh(&alice, &user("bob", "desk"), "root").action, Action::Reject);
    let mut t = tagged(&["tag:prod"], "web1");
    assert_eq!(p.check_ssh(&alice, &t, "root").action, Action::Reject);
    t.user = Some("alice".into());
    assert_eq!(p.check_ssh(&alice, &t, "root").action, Action::Reject);
    // Two tagged nodes (no user on either side) are not "self".
    assert_eq!(p.check_ssh(&tagged(&["tag:x"], "a"), &tagged(&["tag:x"], "b"), "root").action, Action::Reject);
}

#[test]
fn autogroup_caller_and_nonroot() {
    let p = parse(
        "[[ssh]]\nsrc = [\"*\"]\ndst = [\"*\"]\nusers = [\"autogroup:caller\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"bob\"]\ndst = [\"*\"]\nusers = [\"autogroup:nonroot\"]\naction = \"accept\"\n",
    );
    let w = user("x", "web1");
    let alice = user("alice@example.com", "l");
    assert_eq!(p.check_ssh(&alice, &w, "alice").action, Action::Accept);
    assert_eq!(p.check_ssh(&alice, &w, "alice@example.com").action, Action::Accept);
    assert_eq!(p.check_ssh(&alice, &w, "bob").action, Action::Reject);
    assert_eq!(p.check_ssh(&alice, &w, "example.com").action, Action::Reject);
    assert_eq!(p.check_ssh(&alice, &w, "").action, Action::Reject);
    assert_eq!(p.check_ssh(&tagged(&["tag:x"], "t"), &w, "alice").action, Action::Reject);
    let bob = user("bob", "l");
    assert_eq!(p.check_ssh(&bob, &w, "deploy").action, Action::Accept);
    assert_eq!(p.check_ssh(&bob, &w, "root").action, Action::Reject);
}

#[test]
fn uid0_alias_is_judged_as_root() {
    let p = parse(
        "[[ssh]]\nsrc = [\"bob\"]\ndst = [\"*\"]\nusers = [\"autogroup:nonroot\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"carol\"]\ndst = [\"*\"]\nusers = [\"toor\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"dave\"]\ndst = [\"*\"]\nusers = [\"toor\", \"root\"]\naction = \"accept\"\nmax_duration = \"1h\"\n\
         [[ssh]]\nsrc = [\"erin\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"erin\"]\ndst = [\"*\"]\nusers = [\"root\"]\naction = \"reject\"\n",
    );
    let w = user("x", "web1");
    let (bob, carol, dave, erin) = (user("bob", "l"), user("carol", "l"), user("dave", "l"), user("erin", "l"));
    // By name (policy tests), toor is just another non-root login.
    assert_eq!(p.check_ssh(&bob, &w, "toor").action, Action::Accept);
    // With uid 0 it is root: nonroot never admits it, nor a rule naming only toor.
    let d = p.check_ssh_superuser(&bob, &w, "toor");
    assert_eq!(d.action, Action::Reject);
    assert!(d.reason.contains("as toor (uid 0, judged as root)"), "{}", d.reason);
    assert_eq!(p.check_ssh_superuser(&carol, &w, "toor").action, Action::Reject);
    // A rule admitting both the name and root admits it, with its options.
    let d = p.check_ssh_superuser(&dave, &w, "toor");
    assert_eq!(d.action, Action::Accept);
    assert_eq!(d.max_duration, Some(Duration::from_secs(3600)));
    assert_eq!(p.check_ssh_superuser(&dave, &w, "root").action, Action::Accept);
    // A reject of root also rejects every uid-0 alias.
    assert_eq!(p.check_ssh_superuser(&erin, &w, "toor").action, Action::Reject);
    assert_eq!(p.check_ssh_superuser(&erin, &w, "erin").action, Action::Reject);
    assert_eq!(p.check_ssh(&erin, &w, "erin").action, Action::Accept);
}

#[test]
fn hosts_by_name_alias_and_cidr() {
    let p = parse(
        "[hosts]\ndb = \"100.64.0.5\"\n\
         [[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"a\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1.ts.example\"]\nusers = [\"b\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"alice\"]\ndst = [\"db\"]\nusers = [\"c\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"100.64.9.0/24\"]\ndst = [\"100.64.1.0/24\"]\nusers = [\"d\"]\naction = \"accept\"\n",
    );
    let a = user("alice", "l");
    for (node, login, ok) in
        [("web1", "a", true), ("WEB1.ts.example", "a", true), ("web10", "a", false), ("web1.ts.example", "b", true), ("web1", "b", false)]
    {
        assert_eq!(p.check_ssh(&a, &user("x", node), login).action == Action::Accept, ok, "{node} {login}");
    }
    assert_eq!(p.check_ssh(&a, &at(user("x", "db1"), "100.64.0.5"), "c").action, Action::Accept);
    assert_eq!(p.check_ssh(&a, &at(user("x", "db"), "100.64.0.6"), "c").action, Action::Reject);
    let from = at(tagged(&["tag:x"], "n"), "100.64.9.7");
    assert_eq!(p.check_ssh(&from, &at(user("x", "t"), "100.64.1.200"), "d").action, Action::Accept);
    assert_eq!(p.check_ssh(&from, &at(user("x", "t"), "100.64.2.1"), "d").action, Action::Reject);
}

#[test]
fn nested_groups_expand() {
    let p = parse(
        "[groups]\n\"group:a\" = [\"alice\"]\n\"group:b\" = [\"group:a\", \"bob\"]\n\"group:c\" = [\"group:b\"]\n\
         [[ssh]]\nsrc = [\"group:c\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"accept\"\n",
    );
    let w = user("x", "w");
    assert_eq!(p.check_ssh(&user("alice", "l"), &w, "r").action, Action::Accept);
    assert_eq!(p.check_ssh(&user("bob", "l"), &w, "r").action, Action::Accept);
    assert_eq!(p.check_ssh(&user("carol", "l"), &w, "r").action, Action::Reject);
    assert_eq!(p.group_members("group:c").unwrap().len(), 2);
}

#[test]
fn network_acls_ports_and_implied_ssh_port() {
    let p = parse(&format!(
        "{TAGS}[[acl]]\nsrc = [\"alice\"]\ndst = [\"tag:prod:80,443\", \"web1:*\", \"100.64.5.0/24:8000-8010\", \"autogroup:self:3000\"]\n\
         [[ssh]]\nsrc = [\"bob\"]\ndst = [\"tag:prod\"]\nusers = [\"bob\"]\naction = \"check\"\n\
         [[ssh]]\nsrc = [\"carol\"]\ndst = [\"tag:prod\"]\nusers = [\"*\"]\naction = \"reject\"\n"
    ));
    let (alice, bob, carol) = (user("alice", "l"), user("bob", "l"), user("carol", "l"));
    let prod = tagged(&["tag:prod"], "prod1");
    assert!(p.check_network(&alice, &prod, 80) && p.check_network(&alice, &prod, 443));
    assert!(!p.check_network(&alice, &prod, 22) && !p.check_network(&alice, &prod, 8080));
    assert!(p.check_network(&alice, &user("x", "web1"), 5432));
    let net = at(user("x", "n"), "100.64.5.9");
    assert!(p.check_network(&alice, &net, 8000) && p.check_network(&alice, &net, 8010));
    assert!(!p.check_network(&alice, &net, 8011));
    assert!(p.check_network(&alice, &user("alice", "desk"), 3000));
    assert!(!p.check_network(&alice, &user("bob", "desk"), 3000));
    // ssh rules open port 22, but only accept/check ones and only port 22.
    assert!(p.check_network(&bob, &prod, 22));
    assert!(!p.check_network(&bob, &prod, 443));
    assert!(!p.check_network(&carol, &prod, 22));
    assert!(!p.check_network(&prod, &alice, 80));
}

#[test]
fn may_apply_tag_uses_owners() {
    let p = parse(
        "[groups]\n\"group:admins\" = [\"alice\"]\n[tag_owners]\n\"tag:prod\" = [\"group:admins\"]\n\"tag:ci\" = [\"tag:prod\", \"bob\"]\n",
    );
    assert!(p.may_apply_tag(&user("alice", "l"), "tag:prod"));
    assert!(!p.may_apply_tag(&user("bob", "l"), "tag:prod"));
    assert!(p.may_apply_tag(&user("bob", "l"), "tag:ci"));
    assert!(p.may_apply_tag(&tagged(&["tag:prod"], "n"), "tag:ci"));
    assert!(!p.may_apply_tag(&user("alice", "l"), "tag:nope"));
    assert_eq!(p.tags().collect::<Vec<_>>(), ["tag:ci", "tag:prod"]);
}

#[test]
fn default_static_lets_users_onto_their_own_nodes_only() {
    let p = Policy::default_static();
    assert!(p.run_tests().is_empty());
    let alice = user("alice", "laptop");
    let d = p.check_ssh(&alice, &user("alice", "desk"), "alice");
    assert_eq!(d.action, Action::Accept);
    assert!(d.rule.as_deref().unwrap().starts_with("ssh[0] at default.toml:"));
    assert!(d.allows_env("LANG") && !d.allows_env("PATH"));
    assert_eq!(p.check_ssh(&alice, &user("alice", "desk"), "root").action, Action::Reject);
    assert_eq!(p.check_ssh(&alice, &user("bob", "desk"), "alice").action, Action::Reject);
    assert_eq!(p.check_ssh(&alice, &tagged(&["tag:prod"], "web1"), "alice").action, Action::Reject);
    assert_eq!(p.check_ssh(&tagged(&["tag:ci"], "ci"), &tagged(&["tag:ci"], "ci2"), "deploy").action, Action::Reject);
}

// ---- diagnostics ---------------------------------------------------------

#[test]
fn line_index_counts_characters() {
    let src = "ab\n\u{e9}\u{e9}x\n";
    let li = LineIndex::new(src);
    assert_eq!(li.pos(0), (1, 1));
    assert_eq!(li.pos(3), (2, 1));
    assert_eq!(li.pos(src.find('x').unwrap()), (2, 3));
    assert_eq!(li.pos(src.len()), (3, 1));
}

#[test]
fn toml_syntax_and_unknown_keys() {
    assert_error("[[ssh]]\nsrc = [\"a\"\nusers = []\n", "3:1", "missing comma");
    assert_error("[groups]\n\"group:a\" = []\n[sssh]\n", "3:2", "unknown field `sssh`");
    assert_error(
        "[[ssh]]\nsrc = [\"a\"]\ndst = [\"b\"]\nusers = [\"c\"]\naction = \"accept\"\nrecrod = true\n",
        "6:1",
        "unknown field `recrod`",
    );
    assert_error("[[ssh]]\nsrc = [\"a\"]\n", "1:1", "missing field");
    assert_error("[[ssh]]\nsrc = [\"a\"]\ndst = [\"b\"]\nusers = [\"c\"]\naction = \"accept\"\nrecord = \"yes\"\n", "6:10", "boolean");
}

#[test]
fn groups_tags_and_names_are_checked() {
    assert_error("[groups]\n\"group:a\" = [\"group:b\"]\n", "2:14", "unknown group 'group:b'");
    assert_error("[groups]\n\"admins\" = [\"a\"]\n", "2:1", "groups are written group:NAME");
    assert_error(
        "[groups]\n\"group:a\" = [\"group:b\"]\n\"group:b\" = [\"x\", \"group:a\"]\n",
        "3:19",
        "group cycle: group:a -> group:b -> group:a",
    );
    assert_error("[groups]\n\"group:a\" = [\"group:a\"]\n", "2:14", "group cycle");
    assert_error("[groups]\n\"group:a\" = [\"tag:x\"]\n", "2:14", "not 'tag:x'");
    assert_error("[tag_owners]\n\"tag:\" = []\n", "2:1", "empty tag name");
    assert_error("[tag_owners]\n\"tag:a\" = [\"group:nope\"]\n", "2:12", "unknown group");
    assert_error("[tag_owners]\n\"tag:a\" = [\"tag:b\"]\n", "2:12", "tag:b has no entry in [tag_owners]");
    assert_error(
        "[[ssh]]\nsrc = [\"tag:ci\"]\ndst = [\"*\"]\nusers = [\"root\"]\naction = \"accept\"\n",
        "2:8",
        "tag:ci has no entry in [tag_owners]",
    );
    assert_error(
        "[[ssh]]\nsrc = [\"alice\", \"group:x\"]\ndst = [\"*\"]\nusers = [\"root\"]\naction = \"accept\"\n",
        "2:17",
        "unknown group 'group:x'",
    );
}

#[test]
fn bad_patterns_actions_and_durations() {
    let rule = |src: &str, dst: &str, users: &str, extra: &str| {
        format!("{TAGS}[[ssh]]\nsrc = [{src}]\ndst = [{dst}]\nusers = [{users}]\naction = \"accept\"\n{extra}")
    };
    // Line 4 is [[ssh]], 5 src, 6 dst, 7 users, 8 action, 9 extra.
    assert_error(&rule("\"autogroup:self\"", "\"*\"", "\"a\"", ""), "5:8", "only works in dst");
    assert_error(&rule("\"foo:bar\"", "\"*\"", "\"a\"", ""), "5:8", "'foo:' is not a known prefix");
    assert_error(&rule("\"a\"", "\"alice@example.com\"", "\"a\"", ""), "6:8", "not a host name");
    assert_error(&rule("\"a\"", "\"10.0.0.0/33\"", "\"a\"", ""), "6:8", "bad CIDR");
    assert_error(&rule("\"a\"", "\"autogroup:everyone\"", "\"a\"", ""), "6:8", "unknown autogroup");
    assert_error(&rule("\"a\"", "\"*\"", "\"autogroup:root\"", ""), "7:10", "unknown login pattern");
    assert_error(&rule("\"a\"", "\"*\"", "\"-x\"", ""), "7:10", "bad login name");
    assert_error(&rule("\"a\"", "\"*\"", "", ""), "7:9", "empty users list");
    assert_error(&rule("\"a\"", "\"*\"", "\"a\"", "max_duration = \"5 minutes\"\n"), "9:16", "bad duration");
    assert_error(&rule("\"a\"", "\"*\"", "\"a\"", "accept_env = [\"A-B\"]\n"), "9:15", "bad accept_env pattern");
    assert_error("[[ssh]]\nsrc = [\"a\"]\ndst = [\"*\"]\nusers = [\"a\"]\naction = \"allow\"\n", "5:10", "bad action 'allow'");
    assert_error(
        "[[ssh]]\nsrc = [\"a\"]\ndst = [\"*\"]\nusers = [\"a\"]\naction = \"reject\"\nrecord = true\n",
        "6:10",
        "no effect on a reject rule",
    );
    // A bad action must not also produce "no effect on a reject rule".
    let errs = errors("[[ssh]]\nsrc = [\"a\"]\ndst = [\"*\"]\nusers = [\"a\"]\naction = \"x\"\nrecord = true\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn bad_acl_entries() {
    let acl = |dst: &str| format!("{TAGS}[[acl]]\nsrc = [\"*\"]\ndst = [{dst}]\n");
    assert_error(&acl("\"tag:prod\""), "6:8", "needs a port list");
    assert_error(&acl("\"web1\""), "6:8", "needs a port list");
    assert_error(&acl("\"tag:prod:0\""), "6:8", "bad port '0'");
    assert_error(&acl("\"tag:prod:22,x\""), "6:8", "bad port 'x'");
    assert_error(&acl("\"tag:prod:90-80\""), "6:8", "start is after end");
    assert_error(&acl("\"tag:prod:22\", \"tag:nope:22\""), "6:23", "tag:nope has no entry");
    assert_error(&acl("\"1.2.3.4.5:22\""), "6:8", "bad IP address");
    assert_error(&format!("{TAGS}[[acl]]\naction = \"deny\"\nsrc = [\"*\"]\ndst = [\"*:*\"]\n"), "5:10", "can only \"accept\"");
    // IPv6 forms.
    parse("[[acl]]\nsrc = [\"fd7a::/48\"]\ndst = [\"[fd7a::1]:22\", \"fd7a::/48:443\"]\n");
}

#[test]
fn unreachable_rules_are_reported() {
    let r = |src: &str, dst: &str, users: &str, action: &str| {
        format!("[[ssh]]\nsrc = [{src}]\ndst = [{dst}]\nusers = [{users}]\naction = \"{action}\"\n\n")
    };
    // Exact duplicate: the second never decides (each rule is 6 lines).
    let dup = r("\"alice\"", "\"web1\"", "\"root\"", "accept").repeat(2);
    assert_error(&dup, "7:1", "unreachable rule: ssh[1] can never decide, every login it matches is decided by ssh[0] at t.toml:1");
    // After (or before) a catch-all reject, nothing else can decide.
    let src = r("\"*\"", "\"*\"", "\"*\"", "reject") + &r("\"alice\"", "\"web1\"", "\"root\"", "accept");
    assert_error(&src, "7:1", "ssh[1] can never decide");
    let src = r("\"alice\"", "\"web1\"", "\"root\"", "check") + &r("\"*\"", "\"*\"", "\"*\"", "reject");
    assert_error(&src, "1:1", "a matching reject rule wins");
    // Covered through groups, autogroups and login patterns.
    let src = "[groups]\n\"group:g\" = [\"alice\", \"bob\"]\n".to_string()
        + &r("\"autogroup:member\"", "\"*\"", "\"autogroup:nonroot\"", "accept")
        + &r("\"group:g\"", "\"web1\"", "\"deploy\", \"www-data\"", "check");
    assert_error(&src, "9:1", "ssh[1] can never decide");
    let src = r("\"alice\", \"bob\"", "\"web1\"", "\"*\"", "accept") + &r("\"alice\"", "\"web1\"", "\"root\"", "accept");
    assert_eq!(errors(&src).len(), 1);
    // Not covered: a later, broader rule; a later reject of something the
    // earlier accept does not fully cover.
    parse(&(r("\"alice\"", "\"web1\"", "\"root\"", "accept") + &r("\"alice\"", "\"web1\"", "\"*\"", "accept")));
    parse(&(r("\"alice\"", "\"web1\"", "\"*\"", "accept") + &r("\"alice\"", "\"web1\"", "\"root\"", "reject")));
    parse(&(r("\"alice\"", "\"web1\"", "\"root\"", "accept") + &r("\"bob\"", "\"web1\"", "\"root\"", "accept")));
}

#[test]
fn errors_are_all_reported_in_file_order() {
    let errs = errors(&format!(
        "{TAGS}[[ssh]]\nsrc = [\"tag:x\"]\ndst = [\"tag:y\"]\nusers = [\"root\"]\naction = \"nope\"\nmax_duration = \"1y\"\n"
    ));
    let locs: Vec<&str> = errs.iter().map(|e| e.split(':').nth(1).unwrap()).collect();
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert_eq!(locs, ["5", "6", "8", "9"]);
}

// ---- [[tests]] -------------------------------------------------------------

#[test]
fn policy_tests_pass_and_fail_with_useful_messages() {
    let base = format!(
        "{TAGS}[[ssh]]\nsrc = [\"alice\"]\ndst = [\"tag:prod\"]\nusers = [\"root\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"alice\"]\ndst = [\"tag:prod\"]\nusers = [\"alice\"]\naction = \"check\"\n"
    );
    let p = parse(&format!(
        "{base}[[tests]]\nsrc = \"alice\"\ndst = \"tag:prod\"\naccept = [\"root\"]\ncheck = [\"alice\"]\ndeny = [\"bob\"]\nreach = [22]\nno_reach = [80]\n"
    ));
    assert!(p.run_tests().is_empty(), "{:?}", p.run_tests());
    assert_eq!((p.test_count(), p.assertion_count()), (1, 5));

    // Line 14 is [[tests]], 17 accept, 18 deny, 19 reach.
    let p = parse(&format!(
        "{base}[[tests]]\nsrc = \"alice\"\ndst = \"tag:prod\"\naccept = [\"alice\", \"bob\"]\ndeny = [\"root\"]\nreach = [443]\n"
    ));
    let f: Vec<String> = p.run_tests().iter().map(|d| d.to_string()).collect();
    assert_eq!(f.len(), 4, "{f:?}");
    assert_eq!(
        f[0],
        "t.toml:17:11: test failed: tests[0] (alice -> tag:prod): login as alice: expected accept, got check (decided by ssh[1] at t.toml:9)"
    );
    assert_eq!(
        f[1],
        "t.toml:17:20: test failed: tests[0] (alice -> tag:prod): login as bob: expected accept, got deny (no ssh rule matched: default deny)"
    );
    assert!(f[2].starts_with("t.toml:18:9: ") && f[2].contains("expected deny, got accept (decided by ssh[0] at t.toml:4)"));
    assert!(f[3].starts_with("t.toml:19:10: ") && f[3].contains("port 443: expected reachable, got unreachable"));
    assert!(
        Policy::parse_and_test(&format!("{base}[[tests]]\nsrc = \"alice\"\ndst = \"tag:prod\"\ndeny = [\"root\"]\n"), "t.toml").is_err()
    );
}

#[test]
fn policy_tests_are_validated() {
    let t = |body: &str| format!("{TAGS}[[tests]]\n{body}");
    assert_error(&t("src = \"group:x\"\ndst = \"web1\"\ndeny = [\"a\"]\n"), "5:7", "one concrete caller");
    assert_error(&t("src = \"tag:nope\"\ndst = \"web1\"\ndeny = [\"a\"]\n"), "5:7", "tag:nope has no entry");
    assert_error(&t("src = \"tag:ci\"\ndst = \"autogroup:self\"\ndeny = [\"a\"]\n"), "6:7", "needs a user as src");
    assert_error(&t("src = \"a\"\ndst = \"*\"\ndeny = [\"a\"]\n"), "6:7", "one concrete node");
    assert_error(&t("src = \"a\"\ndst = \"10.0.0.0/8\"\ndeny = [\"a\"]\n"), "6:7", "not the network");
    assert_error(&t("src = \"a\"\ndst = \"web1\"\ndeny = [\"autogroup:nonroot\"]\n"), "7:9", "not patterns");
    assert_error(&t("src = \"a\"\ndst = \"web1\"\naccept = [\"x\"]\ndeny = [\"x\"]\n"), "8:9", "listed twice");
    assert_error(&t("src = \"a\"\ndst = \"web1\"\nreach = [0]\n"), "7:10", "bad port 0");
    assert_error(&t("src = \"a\"\ndst = \"web1\"\n"), "4:1", "asserts nothing");
    assert_error(&t("src = \"a\"\nsrc_ip = \"x\"\ndst = \"web1\"\ndeny = [\"a\"]\n"), "6:10", "bad IP address");
}

#[test]
fn synthesized_test_nodes() {
    let p = parse(&format!(
        "{TAGS}[hosts]\ndb = \"100.64.0.5\"\n\
         [[ssh]]\nsrc = [\"100.64.7.0/24\"]\ndst = [\"db\"]\nusers = [\"a\"]\naction = \"accept\"\n\
         [[ssh]]\nsrc = [\"bob\"]\ndst = [\"tag:prod\"]\nusers = [\"b\"]\naction = \"accept\"\n\
         [[tests]]\nsrc = \"tag:ci\"\nsrc_ip = \"100.64.7.7\"\ndst = \"db\"\naccept = [\"a\"]\n\
         [[tests]]\nsrc = \"tag:ci\"\ndst = \"db\"\ndeny = [\"a\"]\n\
         [[tests]]\nsrc = \"bob\"\ndst = \"web1\"\ndst_tags = [\"tag:prod\"]\naccept = [\"b\"]\n\
         [[tests]]\nsrc = \"bob\"\ndst = \"web1\"\ndeny = [\"b\"]\n\
         [[tests]]\nsrc = \"tag:ci\"\nsrc_ip = \"100.64.7.8\"\ndst = \"100.64.0.5\"\naccept = [\"a\"]\n"
    ));
    assert!(p.run_tests().is_empty(), "{:?}", p.run_tests());
}

#[test]
fn readme_order_example() {
    let specific = "[[ssh]]\nsrc = [\"alice@example.com\"]\ndst = [\"tag:prod\"]\nusers = [\"deploy\"]\naction = \"accept\"\n";
    let broad = "[[ssh]]\nsrc = [\"group:developers\"]\ndst = [\"tag:prod\"]\nusers = [\"autogroup:nonroot\"]\naction = \"check\"\n";
    let head = "[groups]\n\"group:developers\" = [\"alice@example.com\", \"carol\"]\n[tag_owners]\n\"tag:prod\" = []\n";
    let p = parse(&format!("{head}{specific}{broad}"));
    let (alice, prod) = (user("alice@example.com", "l"), tagged(&["tag:prod"], "p"));
    assert_eq!(p.check_ssh(&alice, &prod, "deploy").action, Action::Accept);
    assert_eq!(p.check_ssh(&alice, &prod, "alice").action, Action::Check);
    // Swapped, the specific accept can never decide: reported.
    assert_error(&format!("{head}{broad}{specific}"), "10:1", "unreachable rule: ssh[1]");
}

#[test]
fn check_period_is_parsed_defaulted_and_validated() {
    let rule =
        |action: &str, period: &str| format!("[[ssh]]\nsrc = [\"alice\"]\ndst = [\"*\"]\nusers = [\"*\"]\naction = \"{action}\"\n{period}");
    let d = parse(&rule("check", "")).check_ssh(&user("alice", "l"), &user("bob", "w"), "root");
    assert_eq!(d.check_period, CheckPeriod::For(Duration::from_secs(12 * 3600)));
    let d = parse(&rule("check", "check_period = \"30m\"\n")).check_ssh(&user("alice", "l"), &user("bob", "w"), "root");
    assert_eq!(d.check_period, CheckPeriod::For(Duration::from_secs(1800)));
    let d = parse(&rule("check", "check_period = \"always\"\n")).check_ssh(&user("alice", "l"), &user("bob", "w"), "root");
    assert_eq!(d.check_period, CheckPeriod::Always);
    assert_error(&rule("check", "check_period = \"sometimes\"\n"), "6:16", "or write \"always\"");
    assert_error(&rule("check", "check_period = \"500d\"\n"), "6:16", "longer than a year");
    assert_error(&rule("accept", "check_period = \"1h\"\n"), "6:16", "only applies to a check rule");
}

// ---- provider groups (issue 13) ------------------------------------------

const PROVIDER: &str = r#"
[groups]
"group:admins" = ["bob@example.com"]

[tag_owners]
"tag:prod" = []

[[ssh]]
src = ["group:oidc/admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[ssh]]
src = ["group:oidc//team/Domain Admins"]
dst = ["tag:prod"]
users = ["deploy"]
action = "accept"

[[tests]]
src = "alice@example.com"
src_groups = ["admins"]
dst = "tag:prod"
accept = ["root"]

[[tests]]
src = "alice@example.com"
src_groups = ["group:oidc//team/Domain Admins"]
dst = "tag:prod"
accept = ["deploy"]
deny = ["root"]
"#;

#[test]
fn provider_groups_match_the_users_groups_and_never_policy_groups() {
    let p = parse(PROVIDER);
    assert!(p.run_tests().is_empty(), "{:?}", p.run_tests());
    let prod = tagged(&["tag:prod"], "prod1");
    let mut alice = user("alice@example.com", "laptop");
    assert_eq!(p.check_ssh(&alice, &prod, "root").action, Action::Reject);
    alice.groups = vec!["admins".into()];
    assert_eq!(p.check_ssh(&alice, &prod, "root").action, Action::Accept);
    // [groups] "group:admins" is the policy's own group, not the provider's.
    let bob = user("bob@example.com", "bobbox");
    assert_eq!(p.check_ssh(&bob, &prod, "root").action, Action::Reject);
    // A tagged node has no user, so no provider groups either.
    let mut ci = tagged(&["tag:prod"], "ci");
    ci.groups = vec!["admins".into()];
    assert_eq!(p.check_ssh(&ci, &prod, "root").action, Action::Reject);
}

#[test]
fn provider_group_mistakes_are_reported() {
    assert_error(
        &format!("{TAGS}[[ssh]]\nsrc = [\"group:oidc/\"]\ndst = [\"tag:prod\"]\nusers = [\"root\"]\naction = \"accept\"\n"),
        "5:8",
        "empty provider group",
    );
    assert_error("[groups]\n\"group:a\" = [\"group:oidc/admins\"]\n", "2:14", "group at the identity provider");
    assert_error(
        &format!(
            "{TAGS}[[ssh]]\nsrc = [\"*\"]\ndst = [\"tag:prod\"]\nusers = [\"root\"]\naction = \"accept\"\n[[tests]]\nsrc = \"tag:ci\"\nsrc_groups = [\"admins\"]\ndst = \"tag:prod\"\naccept = [\"root\"]\n"
        ),
        "11:14",
        "src_groups needs a user",
    );
}
