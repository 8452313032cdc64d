//! Logins are judged by the local account, not just its name: the name must
//! be a plain account name that exists, a uid-0 account counts as root under
//! any name, and every session (exec, shell, sftp, scp) runs through the
//! account's shell, so nologin accounts get nothing. Driven with stock ssh,
//! sftp and scp; temporary accounts are created and removed by each test.

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::process::Command;
use std::time::Duration;

use ssh_harness::*;

const T: Duration = Duration::from_secs(30);

fn auth_event(s: &TestServer, login: &str) -> serde_json::Value {
    s.wait_audit(&format!("auth as {login}"), |v| v["event"] == "auth" && v["login"] == login)
}

#[test]
fn uid0_alias_is_refused_by_autogroup_nonroot() {
    let toor = TempUser::root_alias("tgtoor");
    let plain = TempUser::create("tgplain", "/bin/sh", &["-M", "-d", "/nonexistent"]);
    let s = TestServer::start(&accept_alice(r#""autogroup:nonroot""#, ""));

    let o = run(s.ssh(&toor.name).arg("id -u"), b"", T);
    assert_eq!(o.code(), 1, "a uid-0 alias got in under autogroup:nonroot: {o:?}");
    assert_eq!(o.out(), "");
    assert!(o.err().contains(&format!("as {} (uid 0, judged as root)", toor.name)), "{o:?}");
    let ev = auth_event(&s, &toor.name);
    assert_eq!((ev["allowed"].as_bool(), ev["action"].as_str()), (Some(false), Some("reject")), "{ev}");

    // An ordinary account is still admitted by the same rule.
    let o = run(s.ssh(&plain.name).arg("id -un"), b"", T);
    assert_eq!((o.code(), o.out().trim()), (0, plain.name.as_str()), "{o:?}");
}

#[test]
fn uid0_alias_needs_a_rule_that_also_admits_root() {
    let toor = TempUser::root_alias("tgtoor");
    // Naming the alias alone is not enough: it is root.
    let s = TestServer::start(&accept_alice(&format!("\"{}\"", toor.name), ""));
    let o = run(s.ssh(&toor.name).arg("id -u"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(o.err().contains("uid 0, judged as root"), "{o:?}");
    drop(s);

    let s = TestServer::start(&accept_alice(&format!("\"{}\", \"root\"", toor.name), ""));
    let o = run(s.ssh(&toor.name).arg("id -u"), b"", T);
    assert_eq!((o.code(), o.out().as_str()), (0, "0\n"), "{o:?}");
}

#[test]
fn malformed_and_unknown_names_are_refused_before_the_policy() {
    // An account that exists but has a name outside [a-z_][a-z0-9_.-]*.
    let odd = TempUser::create("TgOdd", "/bin/sh", &["-M", "-d", "/nonexistent"]);
    let s = TestServer::start(&accept_alice(r#""*""#, ""));

    let o = run(s.ssh(&odd.name).arg("id -u"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert_eq!(o.out(), "");
    assert!(o.err().contains("is not a valid login name"), "{o:?}");
    let ev = auth_event(&s, &odd.name);
    assert_eq!(ev["allowed"], false);
    assert!(ev["action"].is_null() && ev["rule"].is_null(), "the policy ran: {ev}");
    assert!(ev["reason"].as_str().unwrap().contains("not a valid login name"), "{ev}");

    for name in ["tg-no-such-user", "nosuchuser"] {
        let o = run(s.ssh(name).arg("id -u"), b"", T);
        assert_eq!(o.code(), 1, "{o:?}");
        assert!(o.err().contains(&format!("there is no user \"{name}\" on web1")), "{o:?}");
        let ev = auth_event(&s, name);
        assert!(ev["action"].is_null(), "the policy ran for a missing account: {ev}");
    }
}

fn sftp(s: &TestServer, user: &str) -> Command {
    let mut c = Command::new("sftp");
    c.args(["-F", "/dev/null", "-P", &s.port.to_string(), "-b", "-"]);
    for o in ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"] {
        c.args(["-o", o]);
    }
    c.arg(format!("{user}@127.0.0.1"));
    c
}

#[test]
fn nologin_account_gets_no_exec_sftp_or_scp() {
    let svc = TempUser::create("tgsvc", "/usr/sbin/nologin", &["-m"]);
    let home = format!("/home/{}", svc.name);
    write_file(&std::path::Path::new(&home).join("secret"), b"service data\n");
    let s = TestServer::start(&accept_alice(r#""autogroup:nonroot""#, ""));

    let o = run(s.ssh(&svc.name).arg("cat secret"), b"", T);
    assert_ne!(o.code(), 0, "{o:?}");
    // nologin's own message (it writes it to stdout without a terminal).
    assert!((o.out() + &o.err()).contains("This account is currently not available."), "{o:?}");
    assert!(!o.out().contains("service data"), "{o:?}");

    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("got");
    let batch = format!("put /etc/hostname planted\nget secret {}\n", got.display());
    let o = run(&mut sftp(&s, &svc.name), batch.as_bytes(), T);
    assert_ne!(o.code(), 0, "sftp went around nologin: {o:?}");
    assert!(!std::path::Path::new(&home).join("planted").exists(), "sftp wrote into the account: {o:?}");
    assert!(!got.exists(), "sftp read the account's files: {o:?}");

    let mut scp = Command::new("scp");
    scp.args(["-O", "-F", "/dev/null", "-P", &s.port.to_string(), "-o", "StrictHostKeyChecking=no"]);
    scp.args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
    scp.arg(format!("{}@127.0.0.1:secret", svc.name)).arg(dir.path());
    let o = run(&mut scp, b"", T);
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(!dir.path().join("secret").exists());

    // sftp still works for an account with a real shell, through that shell.
    let plain = TempUser::create("tgplain", "/bin/sh", &["-m"]);
    let o = run(&mut sftp(&s, &plain.name), b"pwd\nput /etc/hostname uploaded\n", T);
    assert_eq!(o.code(), 0, "{o:?}");
    assert!(std::path::Path::new(&format!("/home/{}/uploaded", plain.name)).exists());
}
