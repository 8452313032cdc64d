//! The node's inbound filter, driven from outside: a peer reaches only the
//! tailnet ports the policy grants it, in both directions, live.
//!
//! Control mode: control, a "vps" (tag:prod, SSH, `--forward 9000`) and a
//! "laptop" (alice, no SSH, `--forward 9100`), each its own process and
//! namespace. Static mode: wireguard-go and the kernel's TCP/ICMP as the
//! peer, so RSTs and ping replies are judged by a real stack.

mod common;
use common::*;

/// alice may SSH to prod; no [[acl]] opens anything else.
const SSH_ONLY: &str = r#"
[tag_owners]
"tag:prod" = ["alice"]

[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"
"#;

/// The same plus alice -> prod:9000.
const WITH_ACL: &str = r#"
[tag_owners]
"tag:prod" = ["alice"]

[[acl]]
src = ["alice"]
dst = ["tag:prod:9000"]

[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"
"#;

/// What this test adds to the shared lab.
trait FilterLab {
    fn echo_9000(&self) -> (i32, String, String);
    fn refused_json(&self, on: &Netns, state: &str, peer: &str) -> u64;
}

impl FilterLab for ControlLab {
    /// One line through laptop -> vps:9000 (an echo service behind `--forward`).
    fn echo_9000(&self) -> (i32, String, String) {
        self.on_laptop(&format!("echo through-9000 | {TAILGATE} nc vps 9000"), 15)
    }
    fn refused_json(&self, on: &Netns, state: &str, peer: &str) -> u64 {
        let (_, out, _) = on.run(&format!("{TAILGATE} status --json --state-dir {}/{state}", self.d()), 10);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["peers"].as_array().into_iter().flatten().find(|p| p["name"] == peer).and_then(|p| p["refused_inbound"].as_u64()).unwrap_or(0)
    }
}

#[test]
fn control_mode_ports_follow_the_policy_live() {
    if !require(&["ssh", "socat"]) {
        return;
    }
    let w = ControlLab::new("if", "10.93.0");
    let d = w.d();
    let ssh_only = write(w.dir.path(), "ssh_only.toml", SSH_ONLY);
    let with_acl = write(w.dir.path(), "with_acl.toml", WITH_ACL);

    let _control = w.start_control(&ssh_only, 1);
    w.admin("users add alice");
    let server_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey("--user alice");

    let _vps_svc = w.vps.spawn("socat TCP-LISTEN:9000,bind=127.0.0.1,fork,reuseaddr EXEC:cat", &w.dir.path().join("svc9000.log"));
    let _laptop_svc = w
        .laptop
        .spawn("socat TCP-LISTEN:9100,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo laptop-secret'", &w.dir.path().join("svc9100.log"));
    let vps_proc = w.start_node(&w.vps, "vps", &format!("--authkey {server_key} --forward 9000=127.0.0.1:9000"), 1);
    let _laptop_proc = w.start_node(&w.laptop, "laptop", &format!("--authkey {laptop_key} --no-ssh --forward 9100=127.0.0.1:9100"), 1);

    // SSH is granted by the [[ssh]] rule alone; the laptop's own outbound
    // connection passes its filter (the SYN-ACK is a reply).
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(30, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo ssh-ok"), 20);
            r.0 == 0
        }),
        "ssh root@vps: {r:?}\nvps log:\n{}",
        vps_proc.log_text()
    );
    assert_eq!(r.1.trim(), "ssh-ok");

    // (a) No [[acl]] grants 9000: refused (a RST, not a timeout), nothing reaches the service.
    let (code, out, err) = w.echo_9000();
    assert_ne!(code, 0, "laptop must not reach vps:9000 without an acl: {out}");
    assert!(!out.contains("through-9000"), "{out}");
    assert!(err.contains("refused"), "a refused SYN gets a RST: {err}");

    // (b) The reverse: the server may not reach the laptop's forward.
    let (code, out, err) = w.on_vps(&format!("{TAILGATE} nc laptop 9100 </dev/null"), 15);
    assert_ne!(code, 0, "vps must not reach laptop:9100: {out}");
    assert!(!out.contains("laptop-secret"), "{out}");
    assert!(err.contains("refused"), "{err}");

    // (e) Both refusals are counted per peer and shown by `status`.
    assert!(w.refused_json(&w.vps, "vps", "laptop") >= 1, "vps counts the laptop's refused SYN");
    assert!(w.refused_json(&w.laptop, "laptop", "vps") >= 1, "laptop counts the vps's refused SYN");
    let (_, table, _) = w.on_vps(&format!("{TAILGATE} status"), 10);
    let header = table.lines().find(|l| l.starts_with("NAME")).unwrap_or_default();
    assert!(header.ends_with("REFUSED"), "{table}");
    let row = table.lines().find(|l| l.starts_with("laptop")).unwrap_or_default();
    assert_ne!(row.split_whitespace().last(), Some("0"), "{table}");
    assert!(vps_proc.log_text().contains("inbound filter refused TCP port 9000"), "{}", vps_proc.log_text());

    // (d) Live: an acl for 9000 opens it without restarting anything...
    w.admin(&format!("policy set {with_acl}"));
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.echo_9000();
            r.0 == 0 && r.1.contains("through-9000")
        }),
        "after granting 9000: {r:?}"
    );
    // ... and revoking it resets a connection that is open right now.
    let mut open = w.laptop.spawn(
        // Process substitution: the shell does not wait for the writer, only for nc.
        &format!("bash -c '{TAILGATE} nc --state-dir {d}/laptop vps 9000 < <(echo still-open; sleep 40); echo NC-EXIT'"),
        &w.dir.path().join("open.log"),
    );
    open.wait_log("still-open", 15);
    w.admin(&format!("policy set {ssh_only}"));
    // Bounded well below the connection's own 40 s: only a reset ends it sooner.
    open.wait_log("NC-EXIT", 20);
    assert!(vps_proc.log_text().contains("resetting a connection the policy no longer allows"), "{}", vps_proc.log_text());
    let (code, out, _) = w.echo_9000();
    assert!(code != 0 && !out.contains("through-9000"), "new connections are judged by the new policy: {out}");
    // SSH is untouched by the change.
    let (code, out, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo still-ssh"), 20);
    assert_eq!((code, out.trim()), (0, "still-ssh"), "{err}");
}

/// wireguard-go (alice, 100.64.0.1) and `tailgate up --wg-config` (100.64.0.2)
/// with a `--forward 9000`: started with `policy`, or the built-in default.
struct StaticLab {
    k: Netns,
    t: Netns,
    dir: tempfile::TempDir,
    conf: String,
}

fn static_lab() -> StaticLab {
    let k = Netns::new("ifk");
    let t = Netns::new("ift");
    veth(&k, "10.92.0.1", &t, "10.92.0.2");
    let dir = tempdir();
    let (k_private, k_public) = keypair();
    let (t_private, t_public) = keypair();
    let dev = unique("wg");
    wireguard_go(&k, &dev, dir.path(), &k_private, "100.64.0.1/24", 51821);
    k.exec(&format!("wg set {dev} peer {t_public} allowed-ips 100.64.0.2/32 endpoint 10.92.0.2:51820"));
    let conf = write(
        dir.path(),
        "t.conf",
        &format!(
            "[Interface]\n# tailgate-tags = tag:prod\nPrivateKey = {t_private}\nAddress = 100.64.0.2/32\nListenPort = 51820\n\n\
             [Peer]\n# tailgate-user = alice\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = 10.92.0.1:51821\n"
        ),
    );
    StaticLab { k, t, dir, conf }
}

impl StaticLab {
    fn up(&self, policy: Option<&str>, n: u32) -> Proc {
        let policy = policy.map(|p| format!("--policy {}", write(self.dir.path(), &format!("p{n}.toml"), p))).unwrap_or_default();
        let mut p = self.t.spawn(
            &format!(
                "{TAILGATE} up --wg-config {} {policy} --forward 9000=127.0.0.1:9000 --no-ssh --state-dir {}/state{n}",
                self.conf,
                self.dir.path().display()
            ),
            &self.dir.path().join(format!("up{n}.log")),
        );
        p.wait_log("tailgate: up at 100.64.0.2", 10);
        p
    }
    /// The kernel's `nc` to the forward: (exit code, stdout, stderr).
    fn connect(&self) -> (i32, String, String) {
        self.k.run("echo kernel-line | nc -v -N -w 5 100.64.0.2 9000", 10)
    }
    fn ping(&self) -> bool {
        self.k.run("ping -c 2 -W 1 100.64.0.2", 6).0 == 0
    }
}

#[test]
fn static_mode_kernel_peer_gets_rst_and_no_ping_reply() {
    if !require(&["wireguard-go", "wg", "socat", "nc", "ping"]) {
        return;
    }
    let lab = static_lab();
    let _svc = lab.t.spawn("socat TCP-LISTEN:9000,bind=127.0.0.1,fork,reuseaddr EXEC:cat", &lab.dir.path().join("svc.log"));

    // The built-in policy grants alice nothing on a tagged node.
    let mut up = lab.up(None, 1);
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(15, || {
            r = lab.connect();
            r.2.contains("refused")
        }),
        "the kernel must see a RST (connection refused), not a timeout or a connection: {r:?}\n{}",
        up.log_text()
    );
    assert!(!r.1.contains("kernel-line"), "{r:?}");
    // (c) The tunnel is up (the RST came through it), yet pings go unanswered.
    assert!(!lab.ping(), "a peer that may reach no port gets no echo reply");
    up.kill();

    // An acl for 9000: the connection goes through and pings are answered.
    let up = lab.up(Some("[tag_owners]\n\"tag:prod\" = []\n\n[[acl]]\nsrc = [\"alice\"]\ndst = [\"tag:prod:9000\"]\n"), 2);
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(15, || {
            r = lab.connect();
            r.0 == 0 && r.1.contains("kernel-line")
        }),
        "granted port: {r:?}\n{}",
        up.log_text()
    );
    assert!(eventually(10, || lab.ping()), "a peer that may reach a port here may ping");
}
