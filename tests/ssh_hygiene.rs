//! Process hygiene of the embedded SSH server: sessions run as the login user
//! (uid, gid, groups, home, pty owner), the daemon leaks no descriptors into
//! sessions nor keeps any after them, no zombies are left, and ending a
//! session ends its process group. These tests look at process-wide state, so
//! they run one at a time.

#[path = "common/ssh_harness.rs"]
mod ssh_harness;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ssh_harness::*;

const T: Duration = Duration::from_secs(30);
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Alice may log in as `users` and reach every port of the test node.
fn policy(users: &str) -> String {
    accept_alice(users, "\n[[acl]]\nsrc = [\"alice@example.com\"]\ndst = [\"tag:test:*\"]")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Our direct children that are zombies.
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == me {
            out.push(stat.clone());
        }
    }
    out
}

/// Pids whose command line is exactly `sleep <arg>`.
fn sleepers(arg: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd == format!("sleep\0{arg}\0").as_bytes() {
            out.push(pid);
        }
    }
    out
}

fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn no_leaked_descriptors_or_zombies() {
    let _g = serial();
    let s = TestServer::start(&policy("\"root\""));
    // Warm-up: the runtime creates its signal/process machinery lazily.
    assert_eq!(run(s.ssh("root").arg("true"), b"", T).code(), 0);
    std::thread::sleep(Duration::from_millis(300));
    let before = open_fds();

    // Sessions see only stdin/stdout/stderr (bash may keep 255 for itself).
    let o = run(s.ssh("root").arg("ls /proc/$$/fd; true"), b"", T);
    let fds: Vec<String> = o.out().split_whitespace().map(String::from).collect();
    assert!(fds.len() >= 3 && fds.iter().all(|f| ["0", "1", "2", "255"].contains(&f.as_str())), "session inherited fds: {fds:?}");
    let o = run(s.ssh("root").arg("-tt").arg("ls /proc/$$/fd; true"), b"", T);
    let fds: Vec<String> = o.out().split_whitespace().map(String::from).collect();
    assert!(fds.len() >= 3 && fds.iter().all(|f| ["0", "1", "2", "255"].contains(&f.as_str())), "pty session inherited fds: {fds:?}");

    for i in 0..5 {
        let o = run(s.ssh("root").arg(format!("echo {i}; exit {i}")), b"", T);
        assert_eq!(o.code(), i);
    }
    let o = run(s.ssh("root").arg("-tt").arg("exit 9"), b"", T);
    assert_eq!(o.code(), 9);
    let mut sftp = Command::new("sftp");
    sftp.args(["-F", "/dev/null", "-P", &s.port.to_string(), "-b", "-"])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .arg("root@127.0.0.1");
    assert_eq!(run(&mut sftp, b"ls /\n", T).code(), 0);

    wait_until("all sessions ended", T, || events(&s.audit(), "session_end").len() >= 10);
    wait_until("descriptors released", Duration::from_secs(10), || open_fds() <= before);
    assert_eq!(open_fds(), before, "descriptor leak");
    assert!(zombie_children().is_empty(), "zombies: {:?}", zombie_children());
}

#[test]
fn closing_the_connection_kills_the_process_group() {
    let _g = serial();
    let s = TestServer::start(&policy("\"root\""));
    let mut c = s.ssh("root");
    c.arg("sleep 3011 & sleep 3012; echo never").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut client = KillOnDrop(c.spawn().unwrap());
    wait_until("both sleeps running", T, || sleepers("3011").len() == 1 && sleepers("3012").len() == 1);
    // The client vanishes without closing anything.
    client.0.kill().unwrap();
    let _ = client.0.wait();
    wait_until("process group gone", Duration::from_secs(10), || sleepers("3011").is_empty() && sleepers("3012").is_empty());
    let end = s.wait_audit("session_end", |v| v["event"] == "session_end");
    assert_eq!(end["reason"], "closed by client");
    assert!(zombie_children().is_empty(), "zombies: {:?}", zombie_children());
}

#[test]
fn background_job_does_not_hold_the_session_open() {
    let _g = serial();
    let s = TestServer::start(&policy("\"root\""));
    let t0 = Instant::now();
    let o = run(s.ssh("root").arg("sleep 3021 & echo started"), b"", T);
    assert_eq!((o.code(), o.out().as_str()), (0, "started\n"));
    assert!(t0.elapsed() < Duration::from_secs(8), "session lingered {:?}", t0.elapsed());
    wait_until("background job hung up", Duration::from_secs(10), || sleepers("3021").is_empty());
}

/// A local user created for the test and removed afterwards.
struct TempUser(String);

impl TempUser {
    fn create() -> TempUser {
        let name = format!("tgssh{}", std::process::id() % 100_000);
        let _ = Command::new("userdel").args(["-r", &name]).stderr(Stdio::null()).status();
        let _ = Command::new("groupadd").arg("tgsshextra").stderr(Stdio::null()).status();
        let st = Command::new("useradd").args(["-m", "-s", "/bin/sh", "-G", "tgsshextra", &name]).status().unwrap();
        assert!(st.success(), "useradd failed");
        TempUser(name)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-KILL", "-u", &self.0]).status();
        let _ = Command::new("userdel").args(["-r", &self.0]).stderr(Stdio::null()).status();
        let _ = Command::new("groupdel").arg("tgsshextra").stderr(Stdio::null()).status();
    }
}

fn id_of(flag: &str, user: &str) -> String {
    let o = Command::new("id").args([flag, user]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn sessions_run_as_the_login_user() {
    let _g = serial();
    let user = TempUser::create();
    let u = &user.0;
    let s = TestServer::start(&policy(&format!("\"{u}\"")));
    let o = run(s.ssh(u).arg("id -u; id -g; id -G; echo $HOME; pwd; echo $USER $LOGNAME; ps -o pid=,pgid=,sid= -p $$"), b"", T);
    assert_eq!(o.code(), 0, "{o:?}");
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    let home = format!("/home/{u}");
    assert_eq!(lines[0], id_of("-u", u));
    assert_eq!(lines[1], id_of("-g", u));
    assert_eq!(lines[2], id_of("-G", u), "supplementary groups");
    assert!(lines[2].split(' ').count() >= 2);
    assert_eq!(lines[3], home);
    assert_eq!(lines[4], home);
    assert_eq!(lines[5], format!("{u} {u}"));
    // The shell leads its own session and process group.
    let ids: Vec<&str> = lines[6].split_whitespace().collect();
    assert!(ids[0] == ids[1] && ids[1] == ids[2], "pid/pgid/sid {ids:?}");

    // The user owns their terminal; files they create are theirs.
    let o = run(s.ssh(u).args(["-tt", "stat -c %U $(tty); touch f; stat -c %U f"]), b"", T);
    assert_eq!(o.code(), 0, "{o:?}");
    let out = o.out().replace('\r', "");
    assert_eq!(out, format!("{u}\n{u}\n"));
    // And cannot become root again.
    let o = run(s.ssh(u).arg("cat /etc/shadow"), b"", T);
    assert_ne!(o.code(), 0, "{o:?}");
}
