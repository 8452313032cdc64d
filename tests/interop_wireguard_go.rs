//! Interop against an independent WireGuard: wireguard-go configured with `wg`,
//! with the kernel's TCP stack on its side, in network namespaces.
//!
//! nsK: wireguard-go (100.64.0.1), kernel TCP servers, sshd.
//! nsT: `tailgate up` (100.64.0.2, forwarding :8080 to a local echo server)
//!      and `tailgate nc` as a second node (100.64.0.3).

mod common;
use common::*;

struct Lab {
    k: Netns,
    t: Netns,
    dir: tempfile::TempDir,
    wgdev: String,
    k_private: String,
    conf_up: String,
    conf_nc: String,
    peers_cmd: String,
}

fn lab() -> Lab {
    let k = Netns::new("tgk");
    let t = Netns::new("tgt");
    veth(&k, "10.99.0.1", &t, "10.99.0.2");
    let dir = tempdir();
    let (k_private, k_public) = keypair();
    let (up_private, up_public) = keypair();
    let (nc_private, nc_public) = keypair();
    let wgdev = unique("wg");
    wireguard_go(&k, &wgdev, dir.path(), &k_private, "100.64.0.1/24", 51821);
    let peers_cmd = format!(
        "wg set {wgdev} peer {up_public} allowed-ips 100.64.0.2/32 endpoint 10.99.0.2:51820 peer {nc_public} allowed-ips 100.64.0.3/32"
    );
    k.exec(&peers_cmd);
    let conf_up = write(
        dir.path(),
        "up.conf",
        &format!(
            "[Interface]\nPrivateKey = {up_private}\nAddress = 100.64.0.2/32\nListenPort = 51820\nDNS = 10.99.0.53\n\n\
             [Peer]\n# tailgate-user = kernel-admin\n# tailgate-name = kernelbox\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = 10.99.0.1:51821\n"
        ),
    );
    let conf_nc = write(
        dir.path(),
        "nc.conf",
        &format!(
            "[Interface]\nPrivateKey = {nc_private}\nAddress = 100.64.0.3/32\n\n\
             [Peer]\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = 10.99.0.1:51821\nPersistentKeepalive = 25\n"
        ),
    );
    Lab { k, t, dir, wgdev, k_private, conf_up, conf_nc, peers_cmd }
}

/// The inbound filter admits only what the policy grants: the kernel side
/// may use the forwarded port (which also lets it ping).
const POLICY: &str = r#"
[[acl]]
src = ["kernel-admin"]
dst = ["*:8080"]
"#;

fn start_up(lab: &Lab, n: u32) -> Proc {
    let log = lab.dir.path().join(format!("up{n}.log"));
    let policy = write(lab.dir.path(), "policy.toml", POLICY);
    let mut p = lab.t.spawn(
        &format!(
            "env RUST_LOG=tailgate=debug {TAILGATE} up --wg-config {} --policy {policy} --forward 8080=127.0.0.1:9000 --no-ssh --state-dir {}/state",
            lab.conf_up,
            lab.dir.path().display()
        ),
        &log,
    );
    p.wait_log("tailgate: up at 100.64.0.2", 10);
    p
}

fn ping_ok(lab: &Lab) -> bool {
    lab.k.run("ping -c 1 -W 1 100.64.0.2", 5).0 == 0
}

#[test]
fn wireguard_go_interop() {
    if !require(&["wireguard-go", "wg", "socat", "nc", "ping", "sha256sum"]) {
        return;
    }
    let lab = lab();
    let d = lab.dir.path().display().to_string();
    must(&format!("head -c 3000000 /dev/urandom > {d}/blob"));
    let _echo = lab.t.spawn("socat TCP-LISTEN:9000,bind=127.0.0.1,fork,reuseaddr EXEC:cat", &lab.dir.path().join("echo.log"));
    let _ksrv = lab
        .k
        .spawn("socat TCP-LISTEN:9100,bind=100.64.0.1,fork,reuseaddr SYSTEM:'echo kernel-says-hi; cat'", &lab.dir.path().join("ksrv.log"));
    let mut up = start_up(&lab, 1);
    assert!(up.log_text().contains("DNS is ignored"), "wg-quick keys without meaning are reported:\n{}", up.log_text());

    // 1. ICMP echo to tailgate's address, answered by the userspace stack.
    assert!(eventually(15, || ping_ok(&lab)), "ping 100.64.0.2 from wireguard-go failed\n{}", up.log_text());

    // 2. Kernel TCP client -> --forward -> local echo server; content checked.
    let (code, out, err) = lab.k.run(&format!("nc -N -w 10 100.64.0.2 8080 < {d}/blob | sha256sum; sha256sum < {d}/blob"), 30);
    let sums: Vec<&str> = out.lines().collect();
    assert_eq!(code, 0, "{err}");
    assert_eq!(sums.len(), 2, "{out} {err}");
    assert_eq!(sums[0], sums[1], "echo through --forward must return the same bytes");

    // 3. tailgate nc -> kernel TCP server behind wireguard-go.
    let (code, out, err) = lab.t.run(
        &format!("{TAILGATE} nc --wg-config {} 100.64.0.1 9100 < {d}/blob > {d}/nc.out; head -1 {d}/nc.out; tail -c +16 {d}/nc.out | sha256sum; sha256sum < {d}/blob", lab.conf_nc),
        30,
    );
    assert_eq!(code, 0, "tailgate nc failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "kernel-says-hi", "{out}");
    assert_eq!(lines[1], lines[2], "bytes through tailgate nc differ");

    // 3b. The daemon's local API: nc by peer name, close-match hints, status.
    let st = format!("--state-dir {d}/state");
    let (code, out, err) = lab.t.run(&format!("echo via-daemon | {TAILGATE} nc {st} kernelbox 9100"), 20);
    assert_eq!(code, 0, "nc through the daemon: {err}");
    assert_eq!(out, "kernel-says-hi\nvia-daemon\n");
    let (code, _, err) = lab.t.run(&format!("{TAILGATE} nc {st} kernelbx 9100 </dev/null"), 20);
    assert_ne!(code, 0);
    assert!(err.contains("did you mean kernelbox"), "{err}");
    let (code, out, err) = lab.t.run(&format!("{TAILGATE} status {st}"), 10);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("kernelbox") && out.contains("100.64.0.1") && out.contains("kernel-admin") && out.contains("direct 10.99.0.1:51821"),
        "{out}"
    );
    let (code, out, _) = lab.t.run(&format!("{TAILGATE} status {st} --json"), 10);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert!(v["peers"][0]["rx_bytes"].as_u64().unwrap() > 0, "{v}");
    let mode = must(&format!("stat -c %a {d}/state/tailgate.sock"));
    assert_eq!(mode.trim(), "600", "local API socket is owner-only");

    // 4. Stock OpenSSH over `tailgate nc` as ProxyCommand to a plain sshd.
    if sh("test -x /usr/sbin/sshd").status.success() {
        must(&format!(
            "ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey && ssh-keygen -q -t ed25519 -N '' -f {d}/userkey && cp {d}/userkey.pub {d}/authorized_keys && mkdir -p /run/sshd"
        ));
        lab.k.exec(&format!(
            "/usr/sbin/sshd -f /dev/null -h {d}/hostkey -o ListenAddress=100.64.0.1 -o PidFile={d}/sshd.pid -o PermitRootLogin=prohibit-password -o UsePAM=no -o StrictModes=no -o AuthorizedKeysFile={d}/authorized_keys"
        ));
        let (code, out, err) = lab.t.run(
            &format!(
                "ssh -i {d}/userkey -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
                 -o ProxyCommand='{TAILGATE} nc --wg-config {} %h %p' root@100.64.0.1 'echo via-proxy; exit 7'",
                lab.conf_nc
            ),
            30,
        );
        assert_eq!(code, 7, "ssh exit status passes through: {out} {err}");
        assert_eq!(out.trim(), "via-proxy");
    }

    // 5. A real peer sending a spoofed inner source: dropped and counted.
    lab.k.exec(&format!("ip addr add 100.64.0.50/32 dev {}", lab.wgdev));
    assert_ne!(lab.k.run("ping -c 2 -W 1 -I 100.64.0.50 100.64.0.2", 5).0, 0, "spoofed source must not get replies");
    assert!(
        eventually(5, || up.log_text().contains("inner source outside the peer's AllowedIPs")),
        "spoofed packets are logged as dropped:\n{}",
        up.log_text()
    );
    assert!(ping_ok(&lab) || eventually(5, || ping_ok(&lab)), "node keeps serving after spoofed packets");

    // 6. tailgate restarts: it re-handshakes on its own (it knows the endpoint).
    up.kill();
    let up = start_up(&lab, 2);
    assert!(eventually(15, || ping_ok(&lab)), "no handshake after tailgate restart\n{}", up.log_text());

    // 7. wireguard-go restarts with the same key: it handshakes again on traffic.
    lab.k.exec(&format!("ip link del {}", lab.wgdev));
    wireguard_go(&lab.k, &lab.wgdev, lab.dir.path(), &lab.k_private, "100.64.0.1/24", 51821);
    lab.k.exec(&lab.peers_cmd);
    assert!(eventually(20, || ping_ok(&lab)), "no handshake after wireguard-go restart\n{}", up.log_text());
    let (code, out, _) = lab.k.run("echo again | nc -N -w 5 100.64.0.2 8080", 15);
    assert_eq!((code, out.trim()), (0, "again"));
}
