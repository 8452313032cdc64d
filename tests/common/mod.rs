//! Shared helpers for tests that build network namespaces and run processes.
//! Everything made here is torn down by `Drop`, even when a test panics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const TAILGATE: &str = env!("CARGO_BIN_EXE_tailgate");

/// alice (group:admins) may log in as root on tag:prod nodes, nothing else.
#[allow(dead_code)]
pub const ADMINS_ROOT_POLICY: &str = r#"
[groups]
"group:admins" = ["alice"]

[tag_owners]
"tag:prod" = ["group:admins"]

[[ssh]]
src = ["group:admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"
"#;

/// alice owns tag:prod and may log in as root there, nothing else (with a
/// policy test saying so).
pub const ALICE_ROOT_POLICY: &str = r#"
[tag_owners]
"tag:prod" = ["alice"]

[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[tests]]
src = "alice"
dst = "tag:prod"
accept = ["root"]
"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique tag, so parallel tests never collide on namespace names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100000, COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("spawn sh")
}

/// Run a shell command, panic with its output if it fails.
pub fn must(cmd: &str) -> String {
    let o = sh(cmd);
    assert!(
        o.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run with a time bound; returns (exit code, stdout, stderr).
pub fn run_timeout(cmd: &str, secs: u64) -> (i32, String, String) {
    let o = Command::new("timeout")
        .arg("-k")
        .arg("2")
        .arg(secs.to_string())
        .arg("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("spawn timeout");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Reports the running test as skipped: a `SKIPPED: NAME: WHY` line on the
/// real stderr (libtest captures only the print macros, so the line shows
/// even for a passing test) and its name appended to `$TAILGATE_SKIP_LOG`,
/// which tests/run.sh counts, so a skipped test never reads as passed.
pub fn skip(why: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED: {name}: {why}");
    if let Some(log) = std::env::var_os("TAILGATE_SKIP_LOG") {
        let bin = std::env::current_exe().ok().and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned())).unwrap_or_default();
        let bin = bin.rsplit_once('-').map(|(b, _)| b.to_string()).unwrap_or(bin);
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{bin}::{name}");
        }
    }
}

/// Skip (reported, see [`skip`]) when the machine cannot run namespace
/// tests. CI runs as root with the packages installed, so there these
/// always run; a missing tool there is a failure, not a skip.
pub fn require(tools: &[&str]) -> bool {
    if !is_root() {
        skip("needs root for network namespaces");
        return false;
    }
    for t in tools {
        if sh(&format!("command -v {t}")).status.code() != Some(0) {
            panic!("{t} is not installed; tests/deps.sh lists it (tests/run.sh installs it as root)");
        }
    }
    true
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
    wg_devs: std::sync::Mutex<Vec<String>>,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        must(&format!("ip netns add {name}"));
        must(&format!("ip -n {name} link set lo up"));
        Netns { name, wg_devs: Default::default() }
    }

    /// `ip netns exec NAME CMD` as a shell string.
    pub fn wrap(&self, cmd: &str) -> String {
        format!("ip netns exec {} sh -c {}", self.name, shell_quote(cmd))
    }

    pub fn exec(&self, cmd: &str) -> String {
        must(&self.wrap(cmd))
    }

    pub fn run(&self, cmd: &str, secs: u64) -> (i32, String, String) {
        run_timeout(&self.wrap(cmd), secs)
    }

    /// Start a long-running process inside the namespace.
    pub fn spawn(&self, cmd: &str, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", &format!("exec {cmd}")])
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn in netns");
        Proc { child: Some(child), log: log.to_path_buf() }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&format!("for p in $(ip netns pids {0} 2>/dev/null); do kill -9 $p; done; ip netns del {0}", self.name));
        for d in self.wg_devs.lock().unwrap().iter() {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{d}.sock"));
        }
    }
}

/// Join two namespaces with a veth pair and give each end an address.
pub fn veth(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) {
    let ia = unique("va");
    let ib = unique("vb");
    must(&format!("ip link add {ia} type veth peer name {ib}"));
    must(&format!("ip link set {ia} netns {}", a.name));
    must(&format!("ip link set {ib} netns {}", b.name));
    must(&format!("ip -n {} addr add {a_ip}/24 dev {ia} && ip -n {} link set {ia} up", a.name, a.name));
    must(&format!("ip -n {} addr add {b_ip}/24 dev {ib} && ip -n {} link set {ib} up", b.name, b.name));
}

/// The path `tailgate status` names for the first peer of the node whose
/// state dir is `state_dir` ("direct ADDR", "relay", ...), or "" if unknown.
pub fn peer_path(ns: &Netns, state_dir: &str) -> String {
    let (_, out, _) = ns.run(&format!("{TAILGATE} status --json --state-dir {state_dir}"), 10);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["peers"].get(0).and_then(|p| p["path"].as_str().map(str::to_string)))
        .unwrap_or_default()
}

/// A child process killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Own an already spawned child (killed on drop) whose output goes to `log`.
    pub fn from_child(child: Child, log: PathBuf) -> Proc {
        Proc { child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log contains `needle`, or panic with the log.
    pub fn wait_log(&mut self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("process exited ({st}) before logging {needle:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {needle:?} in log:\n{}", self.log_text());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Poll `f` until it returns true or `secs` pass.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A WireGuard key pair from our own binary (same format as `wg genkey`).
pub fn keypair() -> (String, String) {
    let private = must(&format!("{TAILGATE} genkey")).trim().to_string();
    let public = must(&format!("echo {private} | {TAILGATE} pubkey")).trim().to_string();
    (private, public)
}

/// A wireguard-go interface inside `ns` with one address, configured by `wg`.
pub fn wireguard_go(ns: &Netns, dev: &str, dir: &Path, private: &str, addr: &str, port: u16) {
    let keyfile = dir.join(format!("{dev}.key"));
    std::fs::write(&keyfile, private).unwrap();
    ns.wg_devs.lock().unwrap().push(dev.to_string());
    ns.exec(&format!("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go {dev} >/dev/null 2>&1"));
    ns.exec(&format!("wg set {dev} private-key {} listen-port {port}", keyfile.display()));
    ns.exec(&format!("ip addr add {addr} dev {dev} && ip link set {dev} up"));
}

/// Write `body` to `dir/name`; returns the path as a string for commands.
pub fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// A test's directory (state dirs, logs). `TAILGATE_TEST_KEEP=1` keeps it
/// after the test, to read the logs of a failure.
pub fn tempdir() -> tempfile::TempDir {
    let keep = std::env::var_os("TAILGATE_TEST_KEEP").is_some();
    tempfile::Builder::new().prefix("tailgate-test").disable_cleanup(keep).tempdir().unwrap()
}

/// Put namespaces on one LAN: a bridge in its own namespace, a veth to each.
/// `ips[i]` (a /24 address) goes to `nss[i]`. Returns the hub namespace.
pub fn lan(nss: &[&Netns], ips: &[&str]) -> Netns {
    let hub = Netns::new("tgh");
    hub.exec("ip link add br0 type bridge && ip link set br0 up");
    for (ns, ip) in nss.iter().zip(ips) {
        let a = unique("lh");
        let b = unique("ln");
        must(&format!("ip link add {a} type veth peer name {b}"));
        must(&format!("ip link set {a} netns {} && ip link set {b} netns {}", hub.name, ns.name));
        hub.exec(&format!("ip link set {a} master br0 && ip link set {a} up"));
        ns.exec(&format!("ip addr add {ip}/24 dev {b} && ip link set {b} up"));
    }
    hub
}

/// The control-mode lab: control, a "vps" and a "laptop", each its own
/// namespace, on one LAN `NET.1` / `NET.2` / `NET.3`, with one scratch
/// directory holding every state dir (`ctl`, `vps`, `laptop`) and log.
pub struct ControlLab {
    pub ctl: Netns,
    pub vps: Netns,
    pub laptop: Netns,
    _hub: Netns,
    pub dir: tempfile::TempDir,
    net: String,
}

impl ControlLab {
    /// `prefix`: two letters naming the namespaces; `net`: the first three
    /// octets of the lab LAN, e.g. `10.96.0`.
    pub fn new(prefix: &str, net: &str) -> ControlLab {
        let ctl = Netns::new(&format!("{prefix}c"));
        let vps = Netns::new(&format!("{prefix}v"));
        let laptop = Netns::new(&format!("{prefix}l"));
        let hub = lan(&[&ctl, &vps, &laptop], &[&format!("{net}.1"), &format!("{net}.2"), &format!("{net}.3")]);
        ControlLab { ctl, vps, laptop, _hub: hub, dir: tempdir(), net: net.to_string() }
    }
    pub fn d(&self) -> String {
        self.dir.path().display().to_string()
    }
    /// `tailgate control ARGS` on the control server's state directory.
    pub fn admin(&self, args: &str) -> String {
        self.ctl.exec(&format!("{TAILGATE} control --state-dir {}/ctl {args}", self.d()))
    }
    /// A new auth key (`keys create ARGS`), the token alone.
    pub fn authkey(&self, args: &str) -> String {
        self.admin(&format!("keys create {args}")).lines().last().unwrap_or_default().trim().to_string()
    }
    /// Starts control on `NET.1:8443` with `--policy POLICY_FILE`; `n` numbers the log.
    pub fn start_control(&self, policy_file: &str, n: u32) -> Proc {
        let mut p = self.ctl.spawn(
            &format!("{TAILGATE} control --state-dir {}/ctl --listen {}.1:8443 --policy {policy_file}", self.d(), self.net),
            &self.dir.path().join(format!("ctl{n}.log")),
        );
        p.wait_log("listening on", 15);
        p
    }
    /// Starts `tailgate up --state-dir DIR/NAME --hostname NAME ARGS` in `ns`
    /// and waits until it is up; the log is `NAME{n}.log`.
    pub fn start_node(&self, ns: &Netns, name: &str, args: &str, n: u32) -> Proc {
        let mut p = ns.spawn(
            &format!("env RUST_LOG=tailgate=info {TAILGATE} up --state-dir {0}/{name} --hostname {name} {args}", self.d()),
            &self.dir.path().join(format!("{name}{n}.log")),
        );
        p.wait_log("tailgate: up at", 15);
        p
    }
    /// A shell command on the laptop, with its state dir as the default.
    pub fn on_laptop(&self, cmd: &str, secs: u64) -> (i32, String, String) {
        self.laptop.run(&format!("export TAILGATE_STATE_DIR={}/laptop; {cmd}", self.d()), secs)
    }
    /// Waits (at most `secs`) until the laptop reaches the vps directly, not
    /// through the relay on the control server; panics with the path otherwise.
    /// Tests that kill control mid-session need this, or the session dies with
    /// the relay.
    pub fn wait_direct(&self, secs: u64) {
        let state = format!("{}/laptop", self.d());
        let mut path = String::new();
        let ok = eventually(secs, || {
            path = peer_path(&self.laptop, &state);
            path.starts_with("direct")
        });
        assert!(ok, "laptop -> vps never went direct (path {path:?})");
    }
    /// A shell command on the vps, with its state dir as the default.
    pub fn on_vps(&self, cmd: &str, secs: u64) -> (i32, String, String) {
        self.vps.run(&format!("export TAILGATE_STATE_DIR={}/vps; {cmd}", self.d()), secs)
    }
}
