//! Property tests of the evaluation order (see policies/README.md):
//! - nothing matches -> default deny (`Reject`, no rule);
//! - a matching reject rule decides, wherever it is (order-independent);
//! - otherwise the first matching accept/check rule decides;
//! - rules that do not match a request never change its decision;
//! - evaluation is deterministic, and parsing the same text gives the same
//!   decisions;
//! - user-based sources never match tagged callers; autogroup:self never
//!   matches tagged targets;
//! - whoever an ssh rule admits can reach the SSH port.
//!
//! Policies are generated as TOML text over a small universe of names and
//! compiled without the unreachable-rule check (random rule lists are full of
//! shadowed rules, which is fine for evaluation).
#![warn(missing_docs)]

use std::net::IpAddr;

use proptest::prelude::*;

use super::compile::{Options, compile};
use super::*;

const HEADER: &str = r#"
[groups]
"group:a" = ["alice"]
"group:ab" = ["alice", "bob"]
"group:nested" = ["group:a", "carol@x.org"]

[tag_owners]
"tag:prod" = []
"tag:ci" = []

[hosts]
db = "100.64.0.5"
"#;

const SRC: &[&str] = &[
    "*",
    "autogroup:member",
    "autogroup:tagged",
    "alice",
    "bob",
    "carol@x.org",
    "group:a",
    "group:ab",
    "group:nested",
    "tag:prod",
    "tag:ci",
    "100.64.0.0/24",
    "db",
];
/// Sources that only ever match user-owned nodes.
const USER_SRC: &[&str] = &["autogroup:member", "alice", "bob", "carol@x.org", "group:a", "group:ab", "group:nested"];
const DST: &[&str] =
    &["*", "autogroup:self", "autogroup:member", "autogroup:tagged", "tag:prod", "tag:ci", "web1", "db1", "100.64.0.0/24", "db"];
const LOGINS: &[&str] = &["*", "autogroup:nonroot", "autogroup:caller", "root", "alice", "deploy"];
const ACTIONS: &[&str] = &["accept", "check", "reject"];

#[derive(Clone, Debug)]
struct Rule {
    src: Vec<&'static str>,
    dst: Vec<&'static str>,
    users: Vec<&'static str>,
    action: &'static str,
    record: bool,
    max_duration: Option<&'static str>,
}

fn pick(from: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(from, 1..=from.len().min(3))
}

fn rule_from(src: &'static [&'static str], dst: &'static [&'static str]) -> impl Strategy<Value = Rule> {
    (
        pick(src),
        pick(dst),
        pick(LOGINS),
        proptest::sample::select(ACTIONS),
        any::<bool>(),
        proptest::option::of(proptest::sample::select(&["30m", "8h", "1h30m"][..])),
    )
        .prop_map(|(src, dst, users, action, record, max_duration)| Rule {
            src,
            dst,
            users,
            action,
            record: record && action != "reject",
            max_duration: max_duration.filter(|_| action != "reject"),
        })
}

fn rule() -> impl Strategy<Value = Rule> {
    rule_from(SRC, DST)
}

fn render(rules: &[Rule]) -> String {
    let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut s = HEADER.to_string();
    for r in rules {
        s += &format!(
            "\n[[ssh]]\nsrc = [{}]\ndst = [{}]\nusers = [{}]\naction = \"{}\"\n",
            list(&r.src),
            list(&r.dst),
            list(&r.users),
            r.action
        );
        if r.record {
            s += "record = true\n";
        }
        if let Some(d) = r.max_duration {
            s += &format!("max_duration = \"{d}\"\naccept_env = [\"LC_*\"]\n");
        }
    }
    s
}

fn build(rules: &[Rule]) -> Policy {
    compile(&render(rules), "p.toml", Options { shadow_check: false })
        .unwrap_or_else(|e| panic!("generated policy must compile:\n{e}\n{}", render(rules)))
}

fn identity() -> impl Strategy<Value = Identity> {
    let owner = proptest::option::of(proptest::sample::select(&["alice", "bob", "carol@x.org", "dave"][..]));
    let tags = proptest::sample::subsequence(&["tag:prod", "tag:ci"][..], 0..=2);
    let name = proptest::sample::select(&["web1", "db1", "web1.ts.example", "laptop"][..]);
    let ip = proptest::sample::select(&["100.64.0.5", "100.64.0.9", "100.64.1.1"][..]);
    (owner, tags, name, ip).prop_map(|(owner, tags, name, ip)| Identity {
        node_key: format!("k-{name}"),
        node_name: name.to_string(),
        user: owner.map(str::to_string),
        tags: tags.into_iter().map(str::to_string).collect(),
        ip: ip.parse::<IpAddr>().unwrap(),
        groups: Vec::new(),
    })
}

fn login() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(&["root", "alice", "carol", "deploy", "nobody"][..])
}

/// The documented order, written independently of `eval.rs` on top of the
/// per-rule match: first matching reject, else first matching accept/check.
fn oracle<'a>(p: &'a Policy, c: &Identity, t: &Identity, l: &str) -> Option<&'a compile::SshRule> {
    let matching: Vec<_> = p.ssh.iter().filter(|r| r.matches(c, t, l)).collect();
    matching.iter().find(|r| r.action == Action::Reject).or_else(|| matching.first()).copied()
}

/// A decision without the rule label (labels carry positions, which move
/// when rules are inserted).
fn outcome(d: &SshDecision) -> (Action, bool, bool, Option<std::time::Duration>, Vec<String>) {
    (d.action, d.rule.is_some(), d.record, d.max_duration, d.accept_env.clone())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn decision_follows_documented_order(rules in prop::collection::vec(rule(), 0..8),
                                         c in identity(), t in identity(), l in login()) {
        let p = build(&rules);
        let d = p.check_ssh(&c, &t, l);
        match oracle(&p, &c, &t, l) {
            None => {
                prop_assert_eq!(d.action, Action::Reject);
                prop_assert_eq!(d.rule, None);
                prop_assert!(d.reason.starts_with("no ssh rule in the policy allows"));
                prop_assert!(!d.record && d.max_duration.is_none() && d.accept_env.is_empty());
            }
            Some(r) => {
                prop_assert_eq!(d.action, r.action);
                prop_assert_eq!(d.rule.as_deref(), Some(r.label.as_str()));
            }
        }
    }

    #[test]
    fn nothing_matches_means_deny(rules in prop::collection::vec(rule(), 0..8),
                                  c in identity(), t in identity(), l in login()) {
        let p = build(&rules);
        if p.ssh.iter().all(|r| !r.matches(&c, &t, l)) {
            let d = p.check_ssh(&c, &t, l);
            prop_assert_eq!(d.action, Action::Reject);
            prop_assert_eq!(d.rule, None);
        }
    }

    #[test]
    fn reject_wins_wherever_it_is((rules, shuffled) in prop::collection::vec(rule(), 1..8)
                                      .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
                                  c in identity(), t in identity(), l in login()) {
        let p = build(&rules);
        let any_reject = p.ssh.iter().any(|r| r.action == Action::Reject && r.matches(&c, &t, l));
        // The same rules in any order.
        let q = build(&shuffled);
        let (a, b) = (p.check_ssh(&c, &t, l), q.check_ssh(&c, &t, l));
        if any_reject {
            prop_assert_eq!(a.action, Action::Reject);
            prop_assert_eq!(b.action, Action::Reject);
            prop_assert!(a.rule.is_some() && b.rule.is_some());
        }
        prop_assert_eq!(a.action == Action::Reject, b.action == Action::Reject);
    }

    #[test]
    fn adding_a_matching_reject_anywhere_denies(rules in prop::collection::vec(rule(), 0..8),
                                                at in any::<prop::sample::Index>(),
                                                c in identity(), t in identity(), l in login()) {
        let mut rules = rules;
        let catch_all = Rule { src: vec!["*"], dst: vec!["*"], users: vec!["*"], action: "reject", record: false, max_duration: None };
        let i = at.index(rules.len() + 1);
        rules.insert(i, catch_all);
        let d = build(&rules).check_ssh(&c, &t, l);
        prop_assert_eq!(d.action, Action::Reject);
        prop_assert!(d.rule.is_some());
    }

    #[test]
    fn irrelevant_rules_change_nothing(base in prop::collection::vec(rule(), 0..6),
                                       extra in prop::collection::vec((rule(), any::<prop::sample::Index>()), 1..4),
                                       c in identity(), t in identity(), l in login()) {
        let mut all = base.clone();
        for (r, at) in &extra {
            let i = at.index(all.len() + 1);
            all.insert(i, r.clone());
        }
        let extra_only = build(&extra.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());
        if extra_only.ssh.iter().all(|r| !r.matches(&c, &t, l)) {
            let before = build(&base).check_ssh(&c, &t, l);
            let after = build(&all).check_ssh(&c, &t, l);
            prop_assert_eq!(outcome(&before), outcome(&after));
        }
    }

    #[test]
    fn evaluation_is_deterministic(rules in prop::collection::vec(rule(), 0..8),
                                   c in identity(), t in identity(), l in login()) {
        let p = build(&rules);
        let q = build(&rules);
        let r = p.clone();
        let d = format!("{:?}", p.check_ssh(&c, &t, l));
        prop_assert_eq!(&d, &format!("{:?}", p.check_ssh(&c, &t, l)));
        prop_assert_eq!(&d, &format!("{:?}", q.check_ssh(&c, &t, l)));
        prop_assert_eq!(&d, &format!("{:?}", r.check_ssh(&c, &t, l)));
        for port in [22u16, 80, 443] {
            prop_assert_eq!(p.check_network(&c, &t, port), q.check_network(&c, &t, port));
        }
    }

    #[test]
    fn user_sources_never_match_tagged_callers(rules in prop::collection::vec(rule_from(USER_SRC, DST), 0..8),
                                               c in identity(), t in identity(), l in login()) {
        prop_assume!(!c.tags.is_empty());
        let d = build(&rules).check_ssh(&c, &t, l);
        prop_assert_eq!(d.action, Action::Reject);
        prop_assert_eq!(d.rule, None);
    }

    #[test]
    fn autogroup_self_never_matches_tagged_targets(rules in prop::collection::vec(rule_from(SRC, &["autogroup:self"]), 0..8),
                                                   c in identity(), t in identity(), l in login()) {
        prop_assume!(!t.tags.is_empty());
        let d = build(&rules).check_ssh(&c, &t, l);
        prop_assert_eq!(d.action, Action::Reject);
        prop_assert_eq!(d.rule, None);
    }

    #[test]
    fn admitted_callers_can_reach_the_ssh_port(rules in prop::collection::vec(rule(), 0..8),
                                               c in identity(), t in identity(), l in login()) {
        let p = build(&rules);
        if p.check_ssh(&c, &t, l).action != Action::Reject {
            prop_assert!(p.check_network(&c, &t, SSH_PORT));
        }
    }

    #[test]
    fn shadow_check_never_flags_a_rule_that_decides(rules in prop::collection::vec(rule(), 1..6),
                                                    c in identity(), t in identity(), l in login()) {
        // If the validator calls a rule unreachable, no request may be
        // decided by it.
        let text = render(&rules);
        let flagged: Vec<usize> = match Policy::parse(&text, "p.toml") {
            Ok(_) => vec![],
            Err(e) => e.0.iter()
                .filter_map(|d| d.message.strip_prefix("unreachable rule: ssh["))
                .filter_map(|m| m.split(']').next()?.parse().ok())
                .collect(),
        };
        let p = build(&rules);
        if let Some(rule) = p.deciding_ssh_rule(&c, &t, l) {
            let idx: usize = rule.label[4..].split(']').next().unwrap().parse().unwrap();
            prop_assert!(!flagged.contains(&idx), "ssh[{}] was flagged unreachable but decides {:?} -> {:?} as {}", idx, c, t, l);
        }
    }
}
