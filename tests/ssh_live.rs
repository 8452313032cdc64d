//! Open SSH connections follow the identity table and the policy: a change
//! that revokes a login ends its sessions (with a message and an audit line),
//! its forwards and its ControlMaster connection; a forward whose port the
//! new policy closes is ended alone; a `max_duration` added later applies.
//! Driven with stock OpenSSH; changes go through the same `PolicyHandle` and
//! `TableResolver` the node updates from each netmap.

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ssh_harness::*;
use tailgate::policy::Policy;

const T: Duration = Duration::from_secs(30);

fn parse(text: &str) -> Policy {
    Policy::parse(text, "changed.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// A client running in the background; its output is collected until it exits.
struct Background {
    child: KillOnDrop,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
}

impl Background {
    fn spawn(cmd: &mut Command) -> Background {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ssh");
        let (mut o, mut e) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = o.read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = e.read_to_end(&mut v);
            v
        });
        Background { child: KillOnDrop(child), out, err }
    }

    /// Waits for the client to exit; panics (killing it) if it does not within `T`.
    fn finish(mut self) -> Out {
        let status = wait_timeout(&mut self.child.0, T).unwrap_or_else(|| panic!("the session was not ended within {T:?}"));
        Out { status, stdout: self.out.join().unwrap(), stderr: self.err.join().unwrap() }
    }
}

/// Starts `sleep 60` as root and waits until the server has started it.
fn long_session(s: &TestServer, cmd: &mut Command, tag: &str) -> Background {
    let bg = Background::spawn(cmd.arg(format!("sleep 60 # {tag}\necho not-reached")));
    s.wait_audit("session_start", |v| v["event"] == "session_start" && v["command"].as_str().is_some_and(|c| c.contains(tag)));
    bg
}

fn assert_revoked(o: &Out) {
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(o.err().contains("tailgate: access revoked"), "{o:?}");
    assert!(!o.out().contains("not-reached"), "{o:?}");
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + T;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn policy_change_ends_sessions_and_the_control_master() {
    let s = TestServer::start(&accept_alice(r#""root""#, ""));
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cm");
    let control_path = format!("ControlPath={}", cp.display());
    let mut master = s.ssh("root");
    master.args(["-N", "-o", "ControlMaster=yes", "-o", &control_path]);
    let mut master = KillOnDrop(master.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    wait_path(&cp);
    let mux = || {
        let mut c = s.ssh("root");
        c.args(["-o", "ControlMaster=no", "-o", &control_path]);
        c
    };
    let o = run(mux().arg("echo via-master"), b"", T);
    assert_eq!((o.code(), o.out().as_str()), (0, "via-master\n"), "{o:?}");

    let session = long_session(&s, &mut mux(), "cm-session");
    // The new policy no longer lets alice log in as root.
    s.policy.replace(parse(&accept_alice(r#""autogroup:nonroot""#, "")));

    assert_revoked(&session.finish());
    let ev = s.wait_audit("revoked", |v| v["event"] == "revoked");
    assert_eq!((ev["login"].as_str(), ev["allowed"].as_bool()), (Some("root"), Some(false)), "{ev}");
    assert!(ev["reason"].as_str().unwrap().contains("no ssh rule in the policy allows"), "{ev}");
    let end = s.wait_audit("session_end", |v| v["event"] == "session_end" && v["command"].as_str().unwrap().contains("cm-session"));
    assert!(end["reason"].as_str().unwrap().starts_with("access revoked"), "{end}");

    // The master connection itself is gone, and a fresh login is refused.
    assert!(wait_timeout(&mut master.0, T).is_some(), "the ControlMaster connection stayed open");
    let o = run(mux().arg("echo again"), b"", T);
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(o.err().contains("access denied"), "{o:?}");
}

#[test]
fn identity_change_ends_sessions() {
    let s = TestServer::start(&accept_alice(r#""root""#, ""));
    let session = long_session(&s, &mut s.ssh("root"), "retagged");
    // alice's laptop becomes a tagged node: it no longer belongs to alice.
    let mut retagged = alice();
    retagged.user = None;
    retagged.tags = vec!["tag:test".into()];
    s.resolver.replace(web1(), [(ALICE_KEY, retagged)]);
    assert_revoked(&session.finish());
    let ev = s.wait_audit("revoked", |v| v["event"] == "revoked");
    assert_eq!(ev["caller"]["tags"][0], "tag:test", "the audit line names the new identity: {ev}");

    // The node leaves the tailnet altogether.
    s.resolver.replace(web1(), [(ALICE_KEY, alice())]);
    let session = long_session(&s, &mut s.ssh("root"), "removed");
    s.resolver.replace(web1(), []);
    let o = session.finish();
    assert_revoked(&o);
    assert!(o.err().contains("no longer on this tailnet"), "{o:?}");
}

#[test]
fn max_duration_added_later_applies() {
    let s = TestServer::start(&accept_alice(r#""root""#, ""));
    let session = long_session(&s, &mut s.ssh("root"), "limited");
    s.policy.replace(parse(&accept_alice(r#""root""#, "max_duration = \"3s\"")));
    let o = session.finish();
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(o.err().contains("session time limit (3s) reached"), "{o:?}");
    let end = s.wait_audit("session_end", |v| v["event"] == "session_end");
    assert!(end["reason"].as_str().unwrap().contains("time limit 3s"), "{end}");
}

fn connect_retrying(port: u16) -> TcpStream {
    let deadline = Instant::now() + T;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("forward never listened: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sends a line and reads what comes back: the echo, or "" when closed.
fn echo_once(c: &mut TcpStream) -> String {
    c.set_read_timeout(Some(T)).unwrap();
    let _ = c.write_all(b"ping\n");
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            panic!("the forward stayed open after its port was revoked")
        }
        Err(_) => String::new(),
    }
}

#[test]
fn forward_ends_when_its_port_is_revoked() {
    let echo = echo_server();
    let acl = format!("[[acl]]\nsrc = [\"alice@example.com\"]\ndst = [\"tag:test:{echo}\"]\n");
    let s = TestServer::start(&accept_alice(r#""root""#, &acl));
    let local = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = s.ssh("root");
    c.args(["-N", "-L", &format!("{local}:127.0.0.1:{echo}")]);
    let _ssh = KillOnDrop(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let mut open = connect_retrying(local);
    assert_eq!(echo_once(&mut open), "ping\n");

    // Same login rule, but no acl for the port any more.
    s.policy.replace(parse(&accept_alice(r#""root""#, "")));
    let mut rest = String::new();
    let _ = open.set_read_timeout(Some(T));
    match open.read_to_string(&mut rest) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            panic!("the open forward was not closed")
        }
        _ => assert_eq!(rest, ""),
    }
    let end = s.wait_audit("forward_end", |v| v["event"] == "forward_end");
    assert!(end["reason"].as_str().unwrap().contains(&format!("network policy does not allow port {echo}")), "{end}");
    // New connections through the same forward are refused; the login itself stands.
    assert_eq!(echo_once(&mut connect_retrying(local)), "");
    assert!(s.audit().iter().all(|v| v["event"] != "revoked"));
}
