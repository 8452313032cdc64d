//! File transfer through the embedded SSH server with stock OpenSSH tools:
//! legacy `scp -O` (the server runs `scp -t/-f` via the user's shell), the
//! SFTP-based scp of OpenSSH >= 9, and `sftp -b`.

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::process::Command;
use std::time::Duration;

use ssh_harness::*;

const T: Duration = Duration::from_secs(60);

fn server() -> TestServer {
    TestServer::start(&format!(
        r#"{POLICY_HEAD}
[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = ["root"]
action = "accept"
"#
    ))
}

fn scp(s: &TestServer, legacy: bool) -> Command {
    let mut c = Command::new("scp");
    c.args(["-F", "/dev/null", "-P", &s.port.to_string()]);
    for o in ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"] {
        c.args(["-o", o]);
    }
    if legacy {
        c.arg("-O");
    }
    c
}

fn round_trip(legacy: bool) {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(5 << 20, if legacy { 11 } else { 12 });
    let src = dir.path().join("src.bin");
    write_file(&src, &data);
    let remote = dir.path().join("remote.bin");
    let back = dir.path().join("back.bin");

    let o = run(scp(&s, legacy).arg(&src).arg(format!("root@127.0.0.1:{}", remote.display())), b"", T);
    assert_eq!(o.code(), 0, "upload: {o:?}");
    assert!(std::fs::read(&remote).unwrap() == data, "uploaded file differs");

    let o = run(scp(&s, legacy).arg(format!("root@127.0.0.1:{}", remote.display())).arg(&back), b"", T);
    assert_eq!(o.code(), 0, "download: {o:?}");
    assert!(std::fs::read(&back).unwrap() == data, "downloaded file differs");

    let log = s.audit();
    let starts = events(&log, "session_start");
    if legacy {
        assert!(starts.iter().any(|v| v["kind"] == "exec" && v["command"].as_str().unwrap().starts_with("scp -t")), "{log:#?}");
        assert!(starts.iter().any(|v| v["kind"] == "exec" && v["command"].as_str().unwrap().starts_with("scp -f")), "{log:#?}");
    } else {
        assert!(starts.iter().all(|v| v["kind"] == "subsystem" && v["command"] == "sftp"), "{log:#?}");
    }
    let ends = s.wait_audit("two session ends", |_| events(&s.audit(), "session_end").len() >= 2);
    drop(ends);
    let total_in: u64 = events(&s.audit(), "session_end").iter().map(|v| v["bytes_in"].as_u64().unwrap()).sum();
    let total_out: u64 = events(&s.audit(), "session_end").iter().map(|v| v["bytes_out"].as_u64().unwrap()).sum();
    assert!(total_in >= data.len() as u64 && total_out >= data.len() as u64, "in {total_in} out {total_out}");
}

#[test]
fn scp_legacy_protocol_both_ways() {
    round_trip(true);
}

#[test]
fn scp_sftp_protocol_both_ways() {
    round_trip(false);
}

#[test]
fn sftp_batch_listing() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    for n in ["alpha.txt", "beta.txt", "gamma dir"] {
        write_file(&dir.path().join(n), n.as_bytes());
    }
    let batch = dir.path().join("batch");
    write_file(&batch, format!("cd {}\nls -1\npwd\n", dir.path().display()).as_bytes());
    let mut c = Command::new("sftp");
    c.args(["-F", "/dev/null", "-P", &s.port.to_string(), "-b"]).arg(&batch);
    for o in ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR"] {
        c.args(["-o", o]);
    }
    c.arg("root@127.0.0.1");
    let o = run(&mut c, b"", T);
    assert_eq!(o.code(), 0, "{o:?}");
    let out = o.out();
    for n in ["alpha.txt", "beta.txt", "gamma dir", "batch"] {
        assert!(out.lines().any(|l| l.trim() == n), "{n} missing from listing:\n{out}");
    }
    assert!(out.contains(&format!("Remote working directory: {}", dir.path().display())), "{out}");
}
