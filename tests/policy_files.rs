//! The shipped policies (policies/*.toml) are valid and pass their own tests;
//! broken files give `FILE:LINE:COL: message` diagnostics and a failing exit
//! code from `tailgate policy check`.

use std::path::{Path, PathBuf};

use tailgate::policy::{Action, Policy, cli_check};

fn shipped() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("policies/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_policy_loads_and_passes_its_tests() {
    let files = shipped();
    let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for want in ["default.toml", "solo.toml", "team.toml"] {
        assert!(names.iter().any(|n| n == want), "policies/{want} missing: {names:?}");
    }
    for f in &files {
        let p = Policy::load(f).unwrap_or_else(|e| panic!("{} does not load:\n{e}", f.display()));
        let failures = p.run_tests();
        assert!(
            failures.is_empty(),
            "{} fails its tests:\n{}",
            f.display(),
            failures.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n")
        );
        assert!(p.test_count() > 0, "{} has no [[tests]]", f.display());
        assert_eq!(cli_check(f), 0, "{}", f.display());
    }
}

#[test]
fn default_static_is_policies_default_toml() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.toml")).unwrap();
    assert_eq!(text, tailgate::policy::DEFAULT_POLICY_TOML);
    let p = Policy::default_static();
    assert!(p.run_tests().is_empty());
    assert_eq!(p.file_name(), "default.toml");
}

#[test]
fn team_policy_decisions() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/team.toml");
    let p = Policy::load_and_test(&path).unwrap();
    let node = |user: Option<&str>, tags: &[&str], name: &str| tailgate::daemon::identity::Identity {
        node_key: format!("k-{name}"),
        node_name: name.into(),
        user: user.map(Into::into),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ip: "100.64.0.9".parse().unwrap(),
        groups: Vec::new(),
    };
    let prod = node(None, &["tag:prod"], "prod-db1");
    let staging = node(None, &["tag:staging"], "stg-web1");
    let alice = node(Some("alice@example.com"), &[], "alice-laptop");
    let carol = node(Some("carol@example.com"), &[], "carol-laptop");
    let erin = node(Some("erin@contractor.example"), &[], "erin-laptop");
    let ci = node(None, &["tag:ci"], "ci1");

    let d = p.check_ssh(&alice, &prod, "root");
    assert_eq!((d.action, d.record), (Action::Accept, true));
    assert!(d.rule.as_deref().unwrap().starts_with("ssh[1] at "), "{d:?}");
    assert!(!p.check_ssh(&alice, &staging, "root").record);

    let d = p.check_ssh(&carol, &prod, "carol");
    assert_eq!((d.action, d.record), (Action::Check, true));
    assert_eq!(p.check_ssh(&carol, &staging, "root").action, Action::Reject);
    assert_eq!(p.check_ssh(&carol, &staging, "carol").max_duration, Some(std::time::Duration::from_secs(8 * 3600)));

    let d = p.check_ssh(&erin, &staging, "erin");
    assert_eq!((d.action, d.record), (Action::Accept, true));
    assert_eq!(d.max_duration, Some(std::time::Duration::from_secs(4 * 3600)));
    let d = p.check_ssh(&erin, &prod, "erin");
    assert_eq!(d.action, Action::Reject);
    assert!(d.rule.as_deref().unwrap().starts_with("ssh[0] at "), "{d:?}");

    let d = p.check_ssh(&ci, &staging, "deploy");
    assert_eq!((d.action, d.max_duration), (Action::Accept, Some(std::time::Duration::from_secs(1800))));
    assert_eq!(p.check_ssh(&ci, &prod, "deploy").action, Action::Reject);
}

struct Bad {
    name: &'static str,
    text: &'static str,
    /// `LINE:COL: start of message` expected among the diagnostics.
    want: &'static [&'static str],
}

const BAD: &[Bad] = &[
    Bad { name: "syntax.toml", text: "[[ssh]]\nsrc = [\"alice\"\ndst = [\"web1\"]\n", want: &["3:1: missing comma"] },
    Bad {
        name: "unknown_key.toml",
        text: "[[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"root\"]\naction = \"accept\"\nrecrod = true\n",
        want: &["6:1: unknown field `recrod`"],
    },
    Bad {
        name: "names.toml",
        text: "[groups]\n\"group:dev\" = [\"alice\", \"group:ops\"]\n\n[tag_owners]\n\"tag:prod\" = [\"group:dev\"]\n\n\
               [[ssh]]\nsrc = [\"group:dev\"]\ndst = [\"tag:prod\", \"tag:staging\"]\nusers = [\"root\"]\naction = \"accept\"\n",
        want: &["2:25: unknown group 'group:ops'", "9:20: tag:staging has no entry in [tag_owners]"],
    },
    Bad {
        name: "values.toml",
        text: "[[acl]]\nsrc = [\"*\"]\ndst = [\"web1:22,99999\", \"10.0.0.0/40:22\"]\n\n\
               [[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"root\"]\naction = \"permit\"\n\n\
               [[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"alice\"]\naction = \"accept\"\nmax_duration = \"forever\"\n",
        want: &[
            "3:8: in acl dst 'web1:22,99999': bad port '99999'",
            "3:25: bad CIDR '10.0.0.0/40'",
            "9:10: bad action 'permit'",
            "16:16: bad duration \"forever\"",
        ],
    },
    Bad {
        name: "shadowed.toml",
        text: "[[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"root\"]\naction = \"accept\"\n\n\
               [[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"root\"]\naction = \"accept\"\nrecord = true\n",
        want: &["7:1: unreachable rule: ssh[1] can never decide"],
    },
];

#[test]
fn bad_files_give_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    for b in BAD {
        let path = dir.path().join(b.name);
        std::fs::write(&path, b.text).unwrap();
        let errs = Policy::load(&path).expect_err(b.name);
        let lines: Vec<String> = errs.0.iter().map(|d| d.to_string()).collect();
        for want in b.want {
            let prefix = format!("{}:{want}", path.display());
            assert!(
                lines.iter().any(|l| l.starts_with(&prefix)),
                "{}: expected a line starting with {prefix:?}, got:\n{}",
                b.name,
                lines.join("\n")
            );
        }
        assert_eq!(cli_check(&path), 1, "{}", b.name);
    }
}

#[test]
fn failing_policy_tests_fail_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("failing.toml");
    std::fs::write(
        &path,
        "[[ssh]]\nsrc = [\"alice\"]\ndst = [\"web1\"]\nusers = [\"autogroup:nonroot\"]\naction = \"accept\"\n\n\
         [[tests]]\nsrc = \"alice\"\ndst = \"web1\"\naccept = [\"alice\", \"root\"]\n",
    )
    .unwrap();
    let p = Policy::load(&path).unwrap();
    let f = p.run_tests();
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].to_string(),
        format!(
            "{}:10:20: test failed: tests[0] (alice -> web1): login as root: expected accept, got deny (no ssh rule matched: default deny)",
            path.display()
        )
    );
    assert!(Policy::load_and_test(&path).is_err());
    assert_eq!(cli_check(&path), 1);
    assert_eq!(cli_check(&dir.path().join("missing.toml")), 1);
}
