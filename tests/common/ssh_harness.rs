//! Test harness for the embedded SSH server: the server runs in-process on a
//! plain TCP listener (every connection comes from alice's laptop key, which
//! `TestServer::resolver` maps to an identity tests may change), and stock
//! clients (`ssh`, `scp`, `sftp`, `dbclient`) are driven as subprocesses with
//! a timeout on every wait.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tailgate::daemon::identity::{Identity, IdentityResolver, TableResolver};
use tailgate::policy::Policy;
use tailgate::ssh::{PolicyHandle, SshServer, SshServerConfig};

pub const ALICE: &str = "alice@example.com";
/// The WireGuard key every test connection arrives with.
pub const ALICE_KEY: [u8; 32] = [0xa1; 32];

pub fn alice() -> Identity {
    Identity {
        node_key: "YWxpY2UtbGFwdG9wLWtleS0wMDAwMDAwMDAwMDA=".into(),
        node_name: "laptop".into(),
        user: Some(ALICE.into()),
        tags: vec![],
        ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
        groups: Vec::new(),
    }
}

pub fn web1() -> Identity {
    Identity {
        node_key: "d2ViMS1zZXJ2ZXIta2V5LTAwMDAwMDAwMDAwMDA=".into(),
        node_name: "web1".into(),
        user: None,
        tags: vec!["tag:test".into()],
        ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3)),
        groups: Vec::new(),
    }
}

/// A policy header every test policy starts with.
pub const POLICY_HEAD: &str = r#"
[tag_owners]
"tag:test" = ["alice@example.com"]
"#;

pub struct TestServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub server: Arc<SshServer>,
    pub policy: PolicyHandle,
    /// Who `ALICE_KEY` is, and who this node is; `replace` it to change identities live.
    pub resolver: TableResolver,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// Starts a server for `policy_toml` (parsed with the real policy engine).
    pub fn start(policy_toml: &str) -> TestServer {
        let policy = Policy::parse(policy_toml, "test.toml").unwrap_or_else(|e| panic!("test policy: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let handle = PolicyHandle::new(policy);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let resolver = TableResolver::new(web1(), [(ALICE_KEY, alice())]);
        let mut cfg = SshServerConfig::new(state.clone(), handle.clone(), web1());
        let me = resolver.clone();
        cfg.self_identity = Arc::new(move || me.self_identity());
        let shared: Arc<dyn IdentityResolver> = Arc::new(resolver.clone());
        let server = SshServer::new(cfg).unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let srv = server.clone();
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(srv.clone().serve(s, ALICE_KEY, shared.clone()));
            }
        });
        TestServer { port, dir, state, server, policy: handle, resolver, rt: Some(rt) }
    }

    pub fn ssh(&self, user: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(ssh_opts(self.port)).arg(format!("{user}@127.0.0.1"));
        c
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.state.join("audit.jsonl")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))).collect()
    }

    /// Waits (bounded) until an audit event matching `pred` appears.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = self.audit().into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("no audit event {what}; log:\n{:#?}", self.audit());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(3));
        }
    }
}

/// Options for stock OpenSSH: no config files, no host key prompts, no
/// passwords, no chatter on stderr.
pub fn ssh_opts(port: u16) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-p",
        &port.to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub struct Out {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {:?}\n--- stdout\n{}\n--- stderr\n{}", self.status, self.out(), self.err())
    }
}

/// Runs `cmd` with `input` on stdin; kills it and panics after `timeout`.
pub fn run(cmd: &mut Command, input: &[u8], timeout: Duration) -> Out {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn client");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let ro = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let re = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| panic!("client timed out after {timeout:?}: {cmd:?}"));
    let _ = w.join();
    Out { status, stdout: ro.join().unwrap(), stderr: re.join().unwrap() }
}

/// Waits for `child` at most `timeout`; on timeout kills it, reaps it, returns None.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills and reaps a child when dropped (for long-running clients like `ssh -N`).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn write_file(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
}

/// Events of a kind from the audit log.
pub fn events<'a>(log: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    log.iter().filter(|v| v["event"] == kind).collect()
}

/// A local account created for one test and removed when dropped (even when
/// the test panics). Names are unique per process and call.
pub struct TempUser {
    pub name: String,
    uid0: bool,
}

impl TempUser {
    /// `useradd` with `shell` and extra arguments; `prefix` must be a short
    /// lower-case word (`--badname` is passed, so odd prefixes work too).
    pub fn create(prefix: &str, shell: &str, extra: &[&str]) -> TempUser {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
        let uid0 = extra.windows(2).any(|w| w == ["-u", "0"]);
        let _ = Command::new("userdel").args(["-f", &name]).stderr(Stdio::null()).status();
        let mut c = Command::new("useradd");
        c.args(["--badname", "-s", shell]).args(extra).arg(&name);
        let st = c.status().expect("useradd");
        assert!(st.success(), "useradd failed: {c:?}");
        TempUser { name, uid0 }
    }

    /// An account with uid 0 under another name (like BSD's `toor`); no home
    /// directory of its own, so removing it touches nothing of root's.
    pub fn root_alias(prefix: &str) -> TempUser {
        Self::create(prefix, "/bin/sh", &["-o", "-u", "0", "-g", "0", "-M", "-d", "/nonexistent"])
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        if !self.uid0 {
            // Never for a uid-0 alias: that would be every root process.
            let _ = Command::new("pkill").args(["-KILL", "-u", &self.name]).status();
        }
        let args: &[&str] = if self.uid0 { &["-f"] } else { &["-f", "-r"] };
        let _ = Command::new("userdel").args(args).arg(&self.name).stderr(Stdio::null()).status();
    }
}

/// A TCP echo server on 127.0.0.1; returns its port.
pub fn echo_server() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    port
}

/// [`POLICY_HEAD`] plus one rule accepting alice on `tag:test` as `users`
/// (TOML list items, e.g. `"root"`); `extra` lines follow the rule (more
/// keys of it, or further sections).
pub fn accept_alice(users: &str, extra: &str) -> String {
    format!(
        r#"{POLICY_HEAD}
[[ssh]]
src = ["alice@example.com"]
dst = ["tag:test"]
users = [{users}]
action = "accept"
{extra}
"#
    )
}
