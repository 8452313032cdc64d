//! End to end in network namespaces, each component its own process:
//! control in one namespace, a "vps" node in another, a "laptop" in a third.

mod common;
use common::*;

use std::time::Duration;

const POLICY: &str = r#"
[groups]
"group:admins" = ["alice"]

[tag_owners]
"tag:prod" = ["group:admins"]

[[ssh]]
src = ["group:admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[tests]]
src = "alice"
dst = "tag:prod"
accept = ["root"]
deny = ["nobody"]
"#;

/// Alice loses root but keeps web access and a non-root login, so vps stays
/// in her netmap, its SSH port stays open to her (the inbound filter opens
/// it to callers some ssh rule could admit) and the SSH server itself must
/// say no to root at the next login.
const REVOKED: &str = r#"
[groups]
"group:admins" = ["bob"]

[[acl]]
src = ["alice"]
dst = ["tag:prod:80"]

[tag_owners]
"tag:prod" = ["group:admins"]

[[ssh]]
src = ["group:admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["nobody"]
action = "accept"

[[tests]]
src = "alice"
dst = "tag:prod"
deny = ["root"]
"#;

#[test]
fn control_vps_laptop_end_to_end() {
    if !require(&["ssh", "scp", "sftp", "rsync"]) {
        return;
    }
    let w = ControlLab::new("e2", "10.96.0");
    let d = w.d();
    std::fs::write(format!("{d}/policy.toml"), POLICY).unwrap();
    std::fs::write(format!("{d}/revoked.toml"), REVOKED).unwrap();

    let mut control = w.start_control(&format!("{d}/policy.toml"), 1);
    w.admin("users add alice");
    let server_key = w.authkey("--tag tag:prod");
    let laptop_key = w.authkey("--user alice");
    assert!(server_key.starts_with("tg1-"), "{server_key}");

    let mut vps_proc = w.start_node(&w.vps, "vps", &format!("--authkey {server_key}"), 1);
    let mut laptop_proc = w.laptop.spawn(
        &format!("env RUST_LOG=tailgate=info {TAILGATE} up --authkey {laptop_key} --state-dir {d}/laptop --hostname laptop --no-ssh"),
        &w.dir.path().join("laptop.log"),
    );
    laptop_proc.wait_log("tailgate: up at", 15);

    // tailgate ssh, pinned host key from the netmap, no TOFU prompt.
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps id -u"), 20);
            r.0 == 0
        }),
        "tailgate ssh root@vps: {r:?}\nvps log:\n{}",
        vps_proc.log_text()
    );
    assert_eq!(r.1.trim(), "0");
    assert!(!r.2.contains("Permanently added"), "no trust-on-first-use: {}", r.2);

    // status lists the peer with its path (the first login may have gone
    // through the relay while the direct path was being proven).
    w.wait_direct(10);
    let (_, out, _) = w.on_laptop(&format!("{TAILGATE} status"), 10);
    assert!(out.contains("vps") && out.contains("tag:prod") && out.contains("direct 10.96.0.2"), "{out}");

    // Plain ssh / scp / sftp / rsync through `tailgate ssh-config`.
    w.on_laptop(&format!("{TAILGATE} ssh-config > {d}/ssh_config"), 10);
    let ssh = format!("ssh -F {d}/ssh_config -o BatchMode=yes");
    let (code, out, err) = w.on_laptop(&format!("{ssh} root@vps.tailnet.internal echo plain-ssh"), 20);
    assert_eq!((code, out.trim()), (0, "plain-ssh"), "{err}");
    must(&format!("head -c 2000000 /dev/urandom > {d}/blob"));
    let (code, _, err) = w.on_laptop(&format!("scp -F {d}/ssh_config {d}/blob root@vps:{d}/blob.scp"), 30);
    assert_eq!(code, 0, "scp: {err}");
    let (code, _, err) = w.on_laptop(&format!("rsync -a -e '{ssh}' {d}/blob root@vps:{d}/blob.rsync"), 30);
    assert_eq!(code, 0, "rsync: {err}");
    let (code, out, err) = w.on_laptop(&format!("echo 'ls {d}' | sftp -F {d}/ssh_config -b - root@vps"), 20);
    assert_eq!(code, 0, "sftp: {err}");
    assert!(out.contains("blob.scp") && out.contains("blob.rsync"), "{out}");
    let sums = must(&format!("sha256sum < {d}/blob; sha256sum < {d}/blob.scp; sha256sum < {d}/blob.rsync"));
    let sums: Vec<&str> = sums.lines().collect();
    assert!(sums[0] == sums[1] && sums[1] == sums[2], "{sums:?}");

    // A login the policy denies.
    let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh nobody@vps true"), 20);
    assert_ne!(code, 0);
    assert!(err.contains("denied"), "{err}");

    // A tampered host key is refused.
    let kh = format!("{d}/laptop/known_hosts");
    let good = std::fs::read_to_string(&kh).unwrap();
    must(&format!("rm -f {d}/fake* && ssh-keygen -q -t ed25519 -N '' -f {d}/fake"));
    let fake_pub = std::fs::read_to_string(format!("{d}/fake.pub")).unwrap();
    let fake_pub: Vec<&str> = fake_pub.split_whitespace().collect();
    let tampered: String = good
        .lines()
        .map(|l| {
            if l.starts_with("vps,") {
                format!("{} {} {}\n", l.split(' ').next().unwrap(), fake_pub[0], fake_pub[1])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&kh, tampered).unwrap();
    let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vps true"), 20);
    assert_ne!(code, 0, "a host key differing from the netmap must be refused");
    assert!(err.contains("Host key verification failed") || err.contains("IDENTIFICATION HAS CHANGED"), "{err}");
    std::fs::write(&kh, good).unwrap();

    // Control down: logins still work, and an open session survives (on the
    // direct path; the relay goes down with control).
    w.wait_direct(30);
    let long = w.laptop.spawn(
        &format!("env TAILGATE_STATE_DIR={d}/laptop {TAILGATE} ssh root@vps 'sleep 4; echo survived'"),
        &w.dir.path().join("long.log"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    control.kill();
    let (code, _, err) = w.on_laptop(&format!("{TAILGATE} ssh root@vps true"), 20);
    assert_eq!(code, 0, "login with control down: {err}");
    let mut long = long;
    long.wait_log("survived", 15);

    // Control back; a policy change revoking access applies at the next login.
    let _control = w.start_control(&format!("{d}/policy.toml"), 2);
    w.admin(&format!("policy set {d}/revoked.toml"));
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(20, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps true"), 20);
            r.0 != 0 && r.2.contains("denied")
        }),
        "revoked access must be denied at the next login: {r:?}"
    );
    w.admin(&format!("policy set {d}/policy.toml"));

    // vps restarts (new UDP port, same identity): laptop reconnects on its own.
    vps_proc.kill();
    let _vps2 = w.start_node(&w.vps, "vps", "", 2);
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(30, || {
            r = w.on_laptop(&format!("{TAILGATE} ssh root@vps echo back"), 20);
            r.0 == 0
        }),
        "after vps restart: {r:?}\nlaptop log:\n{}",
        laptop_proc.log_text()
    );
    assert_eq!(r.1.trim(), "back");

    // No daemon: `tailgate nc` joins one-shot with the saved node key.
    laptop_proc.kill();
    let (code, out, err) = w.laptop.run(
        &format!(
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={d}/laptop/known_hosts -o HostKeyAlias=vps \
             -o ProxyCommand='{TAILGATE} nc --state-dir {d}/laptop %h %p' root@vps echo oneshot"
        ),
        30,
    );
    assert_eq!((code, out.trim()), (0, "oneshot"), "one-shot nc: {err}");

    // Removing alice cuts her node off: the vps drops the peer from its map.
    let mut laptop_proc =
        w.laptop.spawn(&format!("{TAILGATE} up --state-dir {d}/laptop --hostname laptop --no-ssh"), &w.dir.path().join("laptop2.log"));
    laptop_proc.wait_log("tailgate: up at", 15);
    let vps_sees_laptop = || w.vps.run(&format!("{TAILGATE} status --state-dir {d}/vps"), 10).1.contains("laptop");
    assert!(eventually(10, vps_sees_laptop), "vps lists laptop before removal");
    w.admin("users remove alice");
    assert!(eventually(10, || !vps_sees_laptop()), "vps must drop alice's node");
    let (code, _, _) = w.on_laptop(&format!("{TAILGATE} ssh root@vps true"), 20);
    assert_ne!(code, 0, "a removed user's node can no longer log in");
}
