//! The policy compiler (src/policy), reachable from the network through
//! `tailgate policy set` (admin API) and every netmap a node receives.
//! Any UTF-8 text goes through `Policy::parse_and_test`; a policy that
//! compiles is then evaluated for a few callers, targets and logins.
//!
//! Invariants: no panic (including in the `[[tests]]` runner); errors point
//! inside the file; an SSH accept/check implies network access to port 22
//! (as documented); a decision names its rule unless it is the default deny.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use tailgate::daemon::identity::Identity;
use tailgate::policy::{Action, Policy, SSH_PORT};

fn ident(name: &str, user: Option<&str>, tags: Vec<String>, last: u8) -> Identity {
    Identity {
        node_key: format!("{name}-key"),
        node_name: name.into(),
        user: user.map(Into::into),
        tags,
        ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, last)),
        groups: Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    let lines = src.lines().count().max(1) + 1;
    let policy = match Policy::parse_and_test(src, "fuzz.toml") {
        Ok(p) => p,
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an error without a diagnostic");
            for d in &errs.0 {
                // Test failures may point at line 0 of a file that could
                // not be located; anything else is inside the text.
                assert!(d.line <= lines, "{d} points past the end ({lines} lines)");
            }
            return;
        }
    };
    let tags: Vec<String> = policy.tags().map(String::from).collect();
    let mut people = vec![
        ident("laptop", Some("alice@example.com"), vec![], 1),
        ident("desk", Some("bob@example.com"), vec![], 2),
        ident("server", None, tags.iter().take(2).cloned().collect(), 3),
        ident("other", None, tags.iter().skip(2).take(1).cloned().collect(), 4),
    ];
    if let Some(g) = src.split('"').find_map(|w| policy.group_members(w)) {
        if let Some(u) = g.iter().next() {
            people.push(ident("member", Some(u.as_str()), vec![], 5));
        }
    }
    for caller in &people {
        for target in &people {
            for login in ["root", "alice", "ubuntu", "", "*"] {
                let d = policy.check_ssh(caller, target, login);
                if d.action != Action::Reject {
                    assert!(d.rule.is_some(), "{:?} without a rule", d.action);
                    assert!(
                        policy.check_network(caller, target, SSH_PORT),
                        "ssh {:?} for {}->{}@{login} but port 22 is closed",
                        d.action,
                        caller.node_name,
                        target.node_name
                    );
                }
                let _ = d.allows_env("LANG");
            }
            let _ = policy.check_network(caller, target, 443);
        }
        for t in &tags {
            let _ = policy.may_apply_tag(caller, t);
        }
    }
});
