//! The embedded SSH server on a real tailnet, in static mode:
//! (b) wireguard-go + the kernel's TCP carry a plain `ssh root@100.64.0.2`
//!     (and dropbear's `dbclient`, `scp`, `sftp`) with no ProxyCommand;
//! (a) stock `ssh` through `ProxyCommand tailgate nc --wg-config ...`.
//! Identity comes from `# tailgate-user` comments; the policy decides.

mod common;
use common::*;

const POLICY: &str = r#"
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
record = true

[[ssh]]
src = ["bob"]
dst = ["tag:prod"]
users = ["daemon"]
action = "check"

[[tests]]
src = "alice"
dst = "tag:prod"
accept = ["root"]

[[tests]]
src = "bob"
dst = "tag:prod"
deny = ["root"]
check = ["daemon"]
"#;

struct Lab {
    k: Netns,
    t: Netns,
    dir: tempfile::TempDir,
    conf_nc: String,
    state: String,
}

const SSH_OPTS: &str =
    "-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10";

fn lab() -> (Lab, Proc) {
    lab_logging("tailgate=info")
}

fn lab_logging(rust_log: &str) -> (Lab, Proc) {
    let k = Netns::new("tsk");
    let t = Netns::new("tst");
    veth(&k, "10.98.0.1", &t, "10.98.0.2");
    let dir = tempdir();
    let (k_private, k_public) = keypair();
    let (up_private, up_public) = keypair();
    let (nc_private, nc_public) = keypair();
    let wgdev = unique("wg");
    wireguard_go(&k, &wgdev, dir.path(), &k_private, "100.64.0.1/24", 51821);
    k.exec(&format!("wg set {wgdev} peer {up_public} allowed-ips 100.64.0.2/32 endpoint 10.98.0.2:51820"));
    let conf_up = write(
        dir.path(),
        "up.conf",
        &format!(
            "[Interface]\n# tailgate-tags = tag:prod\n# tailgate-name = vps\nPrivateKey = {up_private}\nAddress = 100.64.0.2/32\nListenPort = 51820\n\n\
             [Peer]\n# tailgate-user = alice\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = 10.98.0.1:51821\n\n\
             [Peer]\n# tailgate-user = bob\nPublicKey = {nc_public}\nAllowedIPs = 100.64.0.3/32\n"
        ),
    );
    let conf_nc = write(
        dir.path(),
        "nc.conf",
        &format!(
            "[Interface]\nPrivateKey = {nc_private}\nAddress = 100.64.0.3/32\n\n\
             [Peer]\nPublicKey = {up_public}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 127.0.0.1:51820\n"
        ),
    );
    let policy = write(dir.path(), "policy.toml", POLICY);
    let state = dir.path().join("state").display().to_string();
    let mut up = t.spawn(
        &format!("env RUST_LOG={rust_log} {TAILGATE} up --wg-config {conf_up} --policy {policy} --state-dir {state}"),
        &dir.path().join("up.log"),
    );
    up.wait_log("tailgate: up at 100.64.0.2", 10);
    (Lab { k, t, dir, conf_nc, state }, up)
}

#[test]
fn ssh_over_wireguard_go_and_proxycommand() {
    if !require(&["wireguard-go", "wg", "ssh", "scp", "sftp", "dbclient", "asciinema", "socat", "script"]) {
        return;
    }
    let (lab, up) = lab();
    let d = lab.dir.path().display().to_string();
    let ssh = format!("ssh {SSH_OPTS}");

    // (b) plain ssh from the kernel side, exit status passes through.
    let mut last = (0, String::new(), String::new());
    let ok = eventually(20, || {
        last = lab.k.run(&format!("{ssh} root@100.64.0.2 'id -u; exit 3'"), 20);
        last.0 == 3
    });
    assert!(ok, "ssh root@100.64.0.2 failed: {last:?}\n{}", up.log_text());
    assert_eq!(last.1.trim(), "0", "runs as root");

    // Host key persisted at 0600.
    let mode = must(&format!("stat -c %a {}/ssh_host_ed25519_key", lab.state));
    assert_eq!(mode.trim(), "600");

    // dropbear's client too.
    let (code, out, err) = lab.k.run("dbclient -y -y root@100.64.0.2 'echo from-dbclient'", 20);
    assert_eq!((code, out.trim()), (0, "from-dbclient"), "{err}");

    // scp both ways (SFTP-based default and legacy -O), checksums compared.
    must(&format!("head -c 5000000 /dev/urandom > {d}/blob"));
    for mode in ["", "-O"] {
        let (code, _, err) = lab.k.run(&format!("scp {mode} {SSH_OPTS} {d}/blob root@100.64.0.2:{d}/up{mode}.bin"), 30);
        assert_eq!(code, 0, "scp {mode} upload: {err}");
        let (code, _, err) = lab.k.run(&format!("scp {mode} {SSH_OPTS} root@100.64.0.2:{d}/up{mode}.bin {d}/down{mode}.bin"), 30);
        assert_eq!(code, 0, "scp {mode} download: {err}");
        let sums = must(&format!("sha256sum < {d}/blob; sha256sum < {d}/up{mode}.bin; sha256sum < {d}/down{mode}.bin"));
        let sums: Vec<&str> = sums.lines().collect();
        assert!(sums[0] == sums[1] && sums[1] == sums[2], "scp {mode} changed bytes: {sums:?}");
    }

    // sftp listing.
    let (code, out, err) = lab.k.run(&format!("echo 'ls -1 {d}' | sftp {SSH_OPTS} -b - root@100.64.0.2"), 20);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up.bin"), "sftp ls shows the uploaded file: {out}");

    // An interactive pty session driven through a real pty, recorded.
    let (code, out, err) = lab.k.run(
        &format!("(sleep 1; printf 'echo hi-$((1+2))\\n'; sleep 1; printf 'exit\\n') | script -qfec \"ssh -tt {SSH_OPTS} root@100.64.0.2\" /dev/null"),
        20,
    );
    assert_eq!(code, 0, "pty session: {out} {err}");
    assert!(out.contains("hi-3"), "shell output arrives through the pty: {out}");
    let casts = must(&format!("ls {}/recordings/*.cast", lab.state));
    let mut replayed = String::new();
    for cast in casts.lines() {
        // asciinema cat insists on a terminal; give it one.
        replayed.push_str(&must(&format!("script -qec \"asciinema cat {cast}\" /dev/null")));
    }
    assert!(replayed.contains("hi-3"), "asciinema replays the recorded session");

    // -L to a port the policy allows, and one it does not.
    let _svc =
        lab.t.spawn("socat TCP-LISTEN:9000,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo forwarded-ok'", &lab.dir.path().join("svc.log"));
    let _svc2 =
        lab.t.spawn("socat TCP-LISTEN:9001,bind=127.0.0.1,fork,reuseaddr SYSTEM:'echo must-not-see'", &lab.dir.path().join("svc2.log"));
    let (_, out, _) = lab.k.run(
        &format!("{ssh} -f -N -o ExitOnForwardFailure=yes -L 127.0.0.1:19000:127.0.0.1:9000 -L 127.0.0.1:19001:127.0.0.1:9001 root@100.64.0.2; sleep 0.5; nc -w 3 127.0.0.1 19000; nc -w 3 127.0.0.1 19001; pkill -f 'ssh.*19000'"),
        20,
    );
    assert!(out.contains("forwarded-ok"), "allowed -L works: {out}");
    assert!(!out.contains("must-not-see"), "denied -L must not connect: {out}");

    // (a) ProxyCommand through tailgate nc, as bob: root is denied with a reason.
    let proxy = format!("-o ProxyCommand='{TAILGATE} nc --wg-config {} %h %p'", lab.conf_nc);
    let (code, out, err) = lab.t.run(&format!("{ssh} {proxy} root@100.64.0.2 'echo should-not-run'"), 20);
    assert_ne!(code, 0);
    assert!(!out.contains("should-not-run"));
    assert!(err.to_lowercase().contains("policy") || err.contains("denied"), "denial says why: {err}");
    // ... and the `check` rule is refused with a message saying so.
    let (code, _, err) = lab.t.run(&format!("{ssh} {proxy} daemon@100.64.0.2 true"), 20);
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("check"), "check rule explains itself: {err}");

    // Audit: every decision is a JSON line naming caller, login and action.
    let audit = std::fs::read_to_string(format!("{}/audit.jsonl", lab.state)).unwrap();
    let events: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).expect("audit line is JSON")).collect();
    let text = audit.to_lowercase();
    assert!(events.len() >= 5, "{audit}");
    assert!(text.contains("alice") && text.contains("bob"), "{audit}");
    assert!(text.contains("\"reject\"") && text.contains("\"accept\"") && text.contains("\"check\""), "{audit}");
    drop(up);
}

/// The node's log without terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every log line of an SSH connection names it: `ssh_conn{conn, peer, user,
/// login}`, with a `session{..}` child span for what runs on its channels.
#[test]
fn ssh_log_lines_carry_the_connection_span() {
    if !require(&["wireguard-go", "wg", "ssh"]) {
        return;
    }
    let (lab, up) = lab_logging("tailgate=debug");
    let mut last = (0, String::new(), String::new());
    let ok = eventually(20, || {
        last = lab.k.run(&format!("ssh {SSH_OPTS} root@100.64.0.2 'exit 7'"), 20);
        last.0 == 7
    });
    assert!(ok, "ssh root@100.64.0.2 failed: {last:?}\n{}", up.log_text());
    // bob is refused root: the denial is logged in bob's connection span.
    let proxy = format!("-o ProxyCommand='{TAILGATE} nc --wg-config {} %h %p'", lab.conf_nc);
    let (code, _, _) = lab.t.run(&format!("ssh {SSH_OPTS} {proxy} root@100.64.0.2 true"), 20);
    assert_ne!(code, 0);

    let log = plain(&up.log_text());
    let line = |needle: &str| {
        eventually(10, || plain(&up.log_text()).lines().any(|l| l.contains(needle)));
        plain(&up.log_text()).lines().find(|l| l.contains(needle)).map(String::from).unwrap_or_else(|| panic!("no {needle:?} in\n{log}"))
    };
    let admitted = line("login admitted");
    assert!(admitted.contains("ssh_conn{conn=") && admitted.contains("peer=[") && admitted.contains("user=alice"), "{admitted}");
    let started = line("session started");
    assert!(started.contains("user=alice") && started.contains("login=\"root\"}:session{session="), "{started}");
    assert!(started.contains("kind=\"exec\""), "{started}");
    let ended = line("session ended");
    assert!(ended.contains("ssh_conn{") && ended.contains(":session{") && ended.contains("exit_status=Some(7)"), "{ended}");
    let denied = line("login denied");
    assert!(denied.contains("ssh_conn{") && denied.contains("user=bob") && denied.contains("login=\"root\""), "{denied}");
    println!("{admitted}\n{started}\n{ended}\n{denied}");
    // The conn id in the span is the one the audit log names.
    let conn = admitted.split("ssh_conn{conn=").nth(1).and_then(|r| r.split(' ').next()).unwrap().to_string();
    let audit = std::fs::read_to_string(format!("{}/audit.jsonl", lab.state)).unwrap();
    assert!(audit.contains(&format!("\"conn\":\"{conn}\"")), "conn {conn} not in the audit log:\n{audit}");
    drop(up);
}
