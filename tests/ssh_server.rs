//! The embedded SSH server driven by stock OpenSSH and dropbear clients:
//! exec, exit codes and signals, stderr, EOF, env, denials, forwarding, audit.
//! (File transfer: ssh_files.rs; interactive pty and recording: ssh_pty.rs;
//! fd/zombie/process-group hygiene: ssh_hygiene.rs.)

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ssh_harness::*;

const T: Duration = Duration::from_secs(30);

fn policy(extra: &str) -> String {
    format!(
        r#"{POLICY_HEAD}
[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["root"]
action = "accept"
accept_env = ["LANG", "TG_OK_*"]

[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["daemon"]
action = "check"

[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["tg-no-such-user"]
action = "accept"
{extra}
"#
    )
}

#[test]
fn exec_exit_status_stdout_stderr() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("root").arg("echo out; echo err >&2; exit 3"), b"", T);
    assert_eq!(o.code(), 3, "{o:?}");
    assert_eq!(o.out(), "out\n");
    assert_eq!(o.err(), "err\n");

    let o = run(s.ssh("root").arg("true"), b"", T);
    assert_eq!(o.code(), 0, "{o:?}");

    // The audit log has the auth decision and both sessions with their status.
    let log = s.audit();
    let auth = events(&log, "auth");
    assert_eq!(auth.len(), 2, "{log:#?}");
    assert_eq!(auth[0]["allowed"], true);
    assert_eq!(auth[0]["action"], "accept");
    assert_eq!(auth[0]["login"], "root");
    assert_eq!(auth[0]["caller"]["user"], ALICE);
    assert_eq!(auth[0]["caller"]["node"], "laptop");
    assert_eq!(auth[0]["caller"]["ip"], "100.64.0.2");
    assert_eq!(auth[0]["target"], "web1");
    assert!(auth[0]["rule"].as_str().unwrap().contains("ssh[0]"), "{:?}", auth[0]);
    let end = s.wait_audit("session_end exit 3", |v| v["event"] == "session_end" && v["exit_status"] == 3);
    assert_eq!(end["kind"], "exec");
    assert_eq!(end["command"], "echo out; echo err >&2; exit 3");
    assert_eq!(end["pty"], false);
    assert_eq!(end["bytes_out"], 8);
    assert!(end["duration_ms"].is_u64());
    let start = events(&log, "session_start");
    assert!(start.iter().any(|v| v["session"] == end["session"] && v["conn"] == end["conn"]));
    for v in &log {
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
    }
}

#[test]
fn exec_killed_by_signal_reports_exit_signal() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("root").arg("kill -TERM $$"), b"", T);
    // OpenSSH exits 255 when the remote command died of a signal.
    assert_eq!(o.code(), 255, "{o:?}");
    let end = s.wait_audit("session_end", |v| v["event"] == "session_end");
    assert_eq!(end["exit_signal"], "TERM");
}

#[test]
fn stdin_is_passed_and_eof_closes_it() {
    let s = TestServer::start(&policy(""));
    let data = pseudo_random(300_000, 7);
    let o = run(s.ssh("root").arg("sha256sum; echo done"), &data, T);
    assert_eq!(o.code(), 0, "{o:?}");
    let want = run(&mut Command::new("sha256sum"), &data, T).out();
    assert_eq!(o.out(), format!("{want}done\n"));
    // `cat` echoing a large stream back must not deadlock the connection.
    let big = pseudo_random(8 << 20, 9);
    let o = run(s.ssh("root").arg("cat"), &big, Duration::from_secs(60));
    assert_eq!(o.code(), 0, "{}", o.err());
    assert!(o.stdout == big, "echoed {} bytes of {}", o.stdout.len(), big.len());
    // A program that stops reading: the client is held back, then the rest
    // is discarded when the program exits, and the session ends normally.
    let o = run(s.ssh("root").arg("head -c 10 >/dev/null; sleep 1; echo done"), &vec![b'x'; 24 << 20], Duration::from_secs(60));
    assert_eq!((o.code(), o.out().as_str()), (0, "done\n"), "{}", o.err());
}

#[test]
fn login_environment_is_clean_and_env_follows_accept_env() {
    let s = TestServer::start(&policy(""));
    let o = run(
        s.ssh("root")
            .args(["-o", "SendEnv=LANG", "-o", "SetEnv=TG_OK_A=yes TG_NOPE=no HOME=/evil"])
            .env("LANG", "C.UTF-8")
            .env("TG_LEAK", "leak")
            .arg("echo \"$LANG|$TG_OK_A|$TG_NOPE|$HOME|$USER|$LOGNAME|$SHELL|$TG_LEAK|$(pwd)\"; env | cut -d= -f1 | sort | tr '\\n' ' '"),
        b"",
        T,
    );
    assert_eq!(o.code(), 0, "{o:?}");
    let mut lines = o.out().lines().map(String::from).collect::<Vec<_>>().into_iter();
    let shell = tailgate::ssh::account::lookup("root").unwrap().unwrap().shell;
    assert_eq!(lines.next().unwrap(), format!("C.UTF-8|yes||/root|root|root|{}||/root", shell.display()));
    let names = lines.next().unwrap();
    assert!(names.contains("SSH_CONNECTION") && names.contains("PATH"), "{names}");
    assert!(!names.contains("CARGO") && !names.contains("RUST"), "daemon environment leaked: {names}");
    let start = s.wait_audit("session_start", |v| v["event"] == "session_start");
    let env: Vec<&str> = start["env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(env.contains(&"LANG") && env.contains(&"TG_OK_A") && !env.contains(&"TG_NOPE"), "{env:?}");
    assert!(!start.to_string().contains("yes"), "env values must not be audited: {start}");
}

#[test]
fn denied_login_user_is_told_why() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("bin").arg("id"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(o.out().is_empty(), "{o:?}");
    let err = o.err();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tailgate: access denied: no ssh rule"), "{err}");
    assert!(err.contains("as bin"), "{err}");
    let auth = s.wait_audit("auth deny", |v| v["event"] == "auth");
    assert_eq!(auth["allowed"], false);
    assert_eq!(auth["action"], "reject");
    assert_eq!(auth["login"], "bin");
    assert!(auth.get("rule").is_none(), "default deny has no rule: {auth}");
    let denied = s.wait_audit("session_denied", |v| v["event"] == "session_denied");
    assert_eq!(denied["command"], "id");
    assert!(events(&s.audit(), "session_start").is_empty());
}

#[test]
fn check_rule_is_denied_until_checks_exist() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("daemon").arg("id"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    let err = o.err();
    assert!(err.contains("requires a check") && err.contains("cannot perform"), "{err}");
    assert!(err.contains("ssh[1]"), "names the rule: {err}");
    let auth = s.wait_audit("auth", |v| v["event"] == "auth");
    assert_eq!(auth["action"], "check");
    assert_eq!(auth["allowed"], false);
}

#[test]
fn login_user_must_exist_locally() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("tg-no-such-user").arg("id"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(o.err().contains("there is no user \"tg-no-such-user\" on web1"), "{o:?}");
    let auth = s.wait_audit("auth", |v| v["event"] == "auth");
    // Refused before the policy ran: there is no account to judge.
    assert_eq!((auth["action"].as_str(), auth["allowed"].as_bool()), (None, Some(false)));
}

#[test]
fn denied_login_without_session_is_disconnected_with_reason() {
    let s = TestServer::start(&policy(""));
    // `ssh -N` opens no session: the reason arrives as a disconnect message.
    let mut c = s.ssh("bin");
    c.args(["-N", "-o", "LogLevel=INFO"]);
    let o = run(&mut c, b"", T);
    assert_eq!(o.code(), 255, "{o:?}");
    assert!(o.err().contains("tailgate: access denied: no ssh rule"), "{o:?}");
}

#[test]
fn policy_swap_applies_to_next_session() {
    let s = TestServer::start(&policy(""));
    assert_eq!(run(s.ssh("root").arg("true"), b"", T).code(), 0);
    s.policy.replace(tailgate::policy::Policy::parse(POLICY_HEAD, "empty.toml").unwrap());
    let o = run(s.ssh("root").arg("true"), b"", T);
    assert_eq!(o.code(), 1, "{o:?}");
    assert!(o.err().contains("no ssh rule"), "{o:?}");
}

#[test]
fn dbclient_exec_and_denial() {
    let s = TestServer::start(&policy(""));
    let home = tempfile::tempdir().unwrap();
    let db = |user: &str, cmd: &str| {
        let mut c = Command::new("dbclient");
        c.env("HOME", home.path()).args(["-y", "-y", "-p", &s.port.to_string(), &format!("{user}@127.0.0.1"), cmd]);
        run(&mut c, b"", T)
    };
    let o = db("root", "echo ok; echo e >&2; exit 4");
    assert_eq!(o.code(), 4, "{o:?}");
    assert_eq!(o.out(), "ok\n");
    assert!(o.err().contains("e\n"), "{o:?}");
    let o = db("bin", "id");
    assert_ne!(o.code(), 0, "{o:?}");
    assert!(o.err().contains("tailgate: access denied: no ssh rule"), "{o:?}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Connects to a local forward (retrying while ssh sets it up) and echoes a line.
fn through_forward(port: u16) -> std::io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"ping through tailgate\n")?;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn local_forwarding_allowed_and_denied_by_network_policy() {
    let allowed = echo_server();
    let denied = echo_server();
    let s = TestServer::start(&policy(&format!(
        r#"
[[acl]]
src = ["alice@example.com"]
dst = ["tag:test:{allowed}"]
"#
    )));
    let (la, ld, lx) = (free_port(), free_port(), free_port());
    let mut c = s.ssh("root");
    c.args([
        "-N",
        "-L",
        &format!("{la}:127.0.0.1:{allowed}"),
        "-L",
        &format!("{ld}:localhost:{denied}"),
        "-L",
        &format!("{lx}:10.1.2.3:{allowed}"),
    ]);
    let _ssh = KillOnDrop(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());

    assert_eq!(through_forward(la).unwrap(), "ping through tailgate\n");
    // Refused channels: ssh accepted the local connection, then closes it.
    assert_eq!(through_forward(ld).unwrap_or_default(), "");
    assert_eq!(through_forward(lx).unwrap_or_default(), "");

    let ok = s.wait_audit("forward allowed", |v| v["event"] == "forward" && v["allowed"] == true);
    assert_eq!(ok["dest"], format!("127.0.0.1:{allowed}"));
    let no = s.wait_audit("forward denied", |v| v["event"] == "forward" && v["dest"] == format!("localhost:{denied}"));
    assert_eq!(no["allowed"], false);
    assert!(no["reason"].as_str().unwrap().contains("network policy"), "{no}");
    let off = s.wait_audit("forward off-node", |v| v["event"] == "forward" && v["dest"] == format!("10.1.2.3:{allowed}"));
    assert_eq!(off["allowed"], false);
    drop(_ssh);
    let end = s.wait_audit("forward_end", |v| v["event"] == "forward_end");
    assert_eq!(end["bytes_in"], 22, "{end}");
}

#[test]
fn remote_agent_and_x11_forwarding_refused() {
    let s = TestServer::start(&policy(""));
    let o = run(s.ssh("root").args(["-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"]), b"", T);
    assert_eq!(o.code(), 255, "{o:?}");
    s.wait_audit("tcpip-forward refused", |v| v["event"] == "forward" && v["kind"] == "tcpip-forward" && v["allowed"] == false);

    // Agent forwarding is requested when the client has an agent socket.
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent");
    agent.args(["-D", "-a"]).arg(&sock).stdout(Stdio::null()).stderr(Stdio::null());
    let _agent = KillOnDrop(agent.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run(
        s.ssh("root")
            .args(["-A", "-o", "ForwardX11=yes"])
            .env("SSH_AUTH_SOCK", &sock)
            .env("DISPLAY", "127.0.0.1:0")
            .arg("echo $SSH_AUTH_SOCK; echo $DISPLAY"),
        b"",
        T,
    );
    assert_eq!(o.code(), 0, "{o:?}");
    assert_eq!(o.out(), "\n\n");
    s.wait_audit("agent refused", |v| v["event"] == "forward" && v["kind"] == "agent" && v["allowed"] == false);
    s.wait_audit("x11 refused", |v| v["event"] == "forward" && v["kind"] == "x11" && v["allowed"] == false);
}
