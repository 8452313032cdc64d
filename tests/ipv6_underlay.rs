//! The IPv6 underlay (issue 11, goal 4), in namespaces whose only addresses
//! (besides loopback and link-local, which are never endpoints) are IPv6:
//!
//!   control mode:  ctl fd00:96::1 (control + relay + STUN on `--listen [::]:8443`)
//!                  vps fd00:96::2, laptop fd00:96::3 (`tailgate up`), one bridge
//!   static mode:   k fd00:97::1 (wireguard-go, kernel TCP) ── t fd00:97::2 (`tailgate up --wg-config`)
//!
//! No NAT: the direct path is the nodes' own IPv6 addresses, which they
//! report to control themselves and learn from STUN over IPv6.

mod common;
use common::*;

/// `ip` with `nodad`: the address is usable at once instead of after
/// duplicate address detection (about a second, racing the processes).
fn addr6(ns: &Netns, dev: &str, ip: &str) {
    ns.exec(&format!("ip -6 addr add {ip}/64 dev {dev} nodad && ip link set {dev} up"));
}

/// A bridge in its own namespace with a veth to each of `nss`, addressed `ips[i]`/64.
fn lan6(nss: &[&Netns], ips: &[&str]) -> Netns {
    let hub = Netns::new("t6h");
    hub.exec("ip link add br0 type bridge && ip link set br0 up");
    for (ns, ip) in nss.iter().zip(ips) {
        let (a, b) = (unique("lh"), unique("ln"));
        must(&format!("ip link add {a} type veth peer name {b}"));
        must(&format!("ip link set {a} netns {} && ip link set {b} netns {}", hub.name, ns.name));
        hub.exec(&format!("ip link set {a} master br0 && ip link set {a} up"));
        addr6(ns, &b, ip);
    }
    hub
}

/// No IPv4 address but loopback's: a v4 fallback anywhere would show.
fn assert_ipv6_only(ns: &Netns) {
    let v4 = ns.exec("ip -4 -o addr show | awk '{print $4}'");
    assert_eq!(v4.trim(), "127.0.0.1/8", "{} must have no IPv4 underlay", ns.name);
}

/// The log without terminal colours (tracing colours field names).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn control_mode_direct_path_over_ipv6_only_underlay() {
    if !require(&["ssh"]) {
        return;
    }
    let _ = std::fs::remove_file("/root/.pyenv/shims/.pyenv-shim");
    let (ctl, vps, laptop) = (Netns::new("t6c"), Netns::new("t6v"), Netns::new("t6l"));
    let _hub = lan6(&[&ctl, &vps, &laptop], &["fd00:96::1", "fd00:96::2", "fd00:96::3"]);
    for ns in [&ctl, &vps, &laptop] {
        assert_ipv6_only(ns);
    }
    let dir = tempdir();
    let d = dir.path().display().to_string();
    std::fs::write(format!("{d}/policy.toml"), ALICE_ROOT_POLICY).unwrap();
    let mut control = ctl.spawn(
        &format!("{TAILGATE} control --state-dir {d}/ctl --listen [::]:8443 --url http://[fd00:96::1]:8443 --policy {d}/policy.toml"),
        &dir.path().join("ctl.log"),
    );
    control.wait_log("listening on [::]:8443", 15);
    control.wait_log("STUN:              udp [::]:8443", 5);
    let admin = |args: &str| ctl.exec(&format!("{TAILGATE} control --state-dir {d}/ctl {args}"));
    admin("users add alice");
    let vps_key = admin("keys create --tag tag:prod").lines().last().unwrap().trim().to_string();
    let laptop_key = admin("keys create --user alice").lines().last().unwrap().trim().to_string();
    let node = |ns: &Netns, name: &str, key: &str| {
        let mut p = ns.spawn(
            &format!(
                "env RUST_LOG=tailgate=debug,russh=info,boringtun=info {TAILGATE} up --authkey {key} --state-dir {d}/{name} --hostname {name} --listen-port 41641"
            ),
            &dir.path().join(format!("{name}.log")),
        );
        p.wait_log("tailgate: up at", 20);
        p
    };
    let vps_p = node(&vps, "vps", &vps_key);
    let laptop_p = node(&laptop, "laptop", &laptop_key);

    // STUN is asked over IPv6 (the host has no IPv4 route) and answers with
    // the node's IPv6 address, which goes to control with the local ones.
    for needle in ["STUN: the control server's UDP port server=Some([fd00:96::1]:8443)", "stun=Some([fd00:96::2]:41641)"] {
        assert!(eventually(20, || plain(&vps_p.log_text()).contains(needle)), "no {needle:?} in the vps log:\n{}", vps_p.log_text());
    }

    // Candidates from the netmap are IPv6; disco proves one; the path is direct.
    assert!(
        eventually(20, || peer_path(&laptop, &format!("{d}/laptop")) == "direct [fd00:96::2]:41641"),
        "expected a direct IPv6 path, got {:?}\nlaptop:\n{}\nvps:\n{}",
        peer_path(&laptop, &format!("{d}/laptop")),
        laptop_p.log_text(),
        vps_p.log_text()
    );
    // Stock OpenSSH (through `tailgate ssh`'s ProxyCommand) over that path.
    let (code, out, err) = laptop.run(&format!("{TAILGATE} ssh --state-dir {d}/laptop root@vps echo over-ipv6"), 30);
    assert_eq!((code, out.trim()), (0, "over-ipv6"), "{err}\nlaptop:\n{}", laptop_p.log_text());
    assert_eq!(peer_path(&laptop, &format!("{d}/laptop")), "direct [fd00:96::2]:41641", "the session stayed direct");
}

/// wireguard-go (a stock WireGuard) and `tailgate up --wg-config` with
/// `Endpoint = [fd00:97::1]:51821`, over an IPv6-only link.
#[test]
fn static_mode_with_wireguard_go_over_an_ipv6_endpoint() {
    if !require(&["wireguard-go", "wg", "socat", "nc", "ping", "sha256sum"]) {
        return;
    }
    let (k, t) = (Netns::new("t6k"), Netns::new("t6t"));
    let (ka, tb) = (unique("va"), unique("vb"));
    must(&format!("ip link add {ka} type veth peer name {tb}"));
    must(&format!("ip link set {ka} netns {} && ip link set {tb} netns {}", k.name, t.name));
    addr6(&k, &ka, "fd00:97::1");
    addr6(&t, &tb, "fd00:97::2");
    assert_ipv6_only(&k);
    assert_ipv6_only(&t);
    let dir = tempdir();
    let d = dir.path().display().to_string();
    let (k_private, k_public) = keypair();
    let (t_private, t_public) = keypair();
    let wgdev = unique("wg");
    wireguard_go(&k, &wgdev, dir.path(), &k_private, "100.64.0.1/24", 51821);
    // wireguard-go learns tailgate's endpoint from its handshake (roaming):
    // the first packet comes from tailgate, which has an IPv6 endpoint to use.
    let (nc_private, nc_public) = keypair();
    k.exec(&format!("wg set {wgdev} peer {t_public} allowed-ips 100.64.0.2/32 peer {nc_public} allowed-ips 100.64.0.3/32"));
    let conf = write(
        dir.path(),
        "up.conf",
        &format!(
            "[Interface]\nPrivateKey = {t_private}\nAddress = 100.64.0.2/32\nListenPort = 51820\n\n\
             [Peer]\n# tailgate-user = kernel-admin\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = [fd00:97::1]:51821\nPersistentKeepalive = 5\n"
        ),
    );
    // A second, one-shot node (`tailgate nc`) with its own key.
    let conf_nc = write(
        dir.path(),
        "nc.conf",
        &format!(
            "[Interface]\nPrivateKey = {nc_private}\nAddress = 100.64.0.3/32\n\n\
             [Peer]\nPublicKey = {k_public}\nAllowedIPs = 100.64.0.1/32\nEndpoint = [fd00:97::1]:51821\n"
        ),
    );
    let policy = write(dir.path(), "policy.toml", "[[acl]]\nsrc = [\"kernel-admin\"]\ndst = [\"*:8080\"]\n");
    must(&format!("head -c 2000000 /dev/urandom > {d}/blob"));
    let _echo = t.spawn("socat TCP-LISTEN:9000,bind=127.0.0.1,fork,reuseaddr EXEC:cat", &dir.path().join("echo.log"));
    let _ksrv =
        k.spawn("socat TCP-LISTEN:9100,bind=100.64.0.1,fork,reuseaddr SYSTEM:'echo kernel-says-hi; cat'", &dir.path().join("ksrv.log"));
    let mut up = t.spawn(
        &format!("env RUST_LOG=tailgate=debug {TAILGATE} up --wg-config {conf} --policy {policy} --forward 8080=127.0.0.1:9000 --no-ssh --state-dir {d}/state"),
        &dir.path().join("up.log"),
    );
    up.wait_log("tailgate: up at 100.64.0.2", 10);
    assert!(up.log_text().contains("(UDP [::]:51820)"), "one dual-stack socket:\n{}", up.log_text());

    // The handshake went over IPv6: wireguard-go saw tailgate at its IPv6 address.
    assert!(eventually(15, || k.run("ping -c 1 -W 1 100.64.0.2", 5).0 == 0), "ping over the IPv6 underlay failed\n{}", up.log_text());
    let ep = k.exec(&format!("wg show {wgdev} endpoints"));
    assert!(ep.contains("[fd00:97::2]:51820"), "wireguard-go's view of tailgate: {ep}");

    // Kernel TCP -> --forward -> echo, content checked, both directions.
    let (code, out, err) = k.run(&format!("nc -N -w 10 100.64.0.2 8080 < {d}/blob | sha256sum; sha256sum < {d}/blob"), 30);
    let sums: Vec<&str> = out.lines().collect();
    assert_eq!((code, sums.len()), (0, 2), "{out} {err}");
    assert_eq!(sums[0], sums[1], "echo over the IPv6 underlay must return the same bytes");
    let (code, out, err) = t.run(&format!("echo hi | {TAILGATE} nc --wg-config {conf_nc} 100.64.0.1 9100"), 20);
    assert!(code == 0 && out.contains("kernel-says-hi"), "tailgate nc -> kernel TCP over IPv6: {code} {out} {err}");
}
