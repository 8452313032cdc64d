//! NAT traversal and relay fallback in a namespace lab:
//!
//!   ctl (10.50.0.1, control + relay + STUN) ── "internet" bridge ──┬── ra (10.50.0.2) ── na 192.168.1.2 "vps"
//!                                                                  └── rb (10.50.0.3) ── nb 192.168.2.2 "laptop"
//!
//! ra and rb are routers doing nftables masquerade (endpoint-independent
//! mapping, like a home router); rb can also drop UDP or use a symmetric NAT.
//! The bridge's namespace also routes (.254): ra and rb reach each other
//! through it, one hop, as two NATs on the Internet do.

mod common;
use common::*;

use std::time::Duration;

struct Lab {
    ctl: Netns,
    ra: Netns,
    rb: Netns,
    na: Netns,
    nb: Netns,
    _hub: Netns,
    dir: tempfile::TempDir,
    /// The "internet": first three octets (control .1, ra .2, rb .3).
    net: &'static str,
}

/// How a lab router translates and filters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Endpoint-independent mapping and filtering (port forward of 41641).
    FullCone,
    /// Plain `masquerade`: keeps the port unless it clashes, admits only
    /// replies. Unsolicited datagrams to the router itself are answered
    /// with ICMP (no input firewall, like a Docker host).
    Masquerade,
    /// Plain `masquerade` with a WAN input firewall that drops what no
    /// connection expects (like OpenWrt's default zone rules).
    MasqueradeFirewall,
    /// [`Kind::Masquerade`] plus miniupnpd answering PCP and NAT-PMP (one
    /// switch in miniupnpd) on the LAN side.
    MasqueradeNatPmp,
    /// [`Kind::Masquerade`] plus miniupnpd offering UPnP IGD only (SSDP on
    /// the LAN interface), no PCP or NAT-PMP: most home routers' "UPnP".
    MasqueradeUpnp,
    /// `masquerade fully-random`: a new random port for every remote
    /// endpoint (a symmetric NAT). Punching cannot reach a node behind it;
    /// it can only reach out, so a direct path needs the other side to be
    /// reachable (full cone or a port mapping).
    Symmetric,
}

fn router(r: &Netns, node: &Netns, lan: &str, kind: Kind, dir: &std::path::Path, net: &str) {
    let (ri, ni) = (unique("rl"), unique("nl"));
    must(&format!("ip link add {ri} type veth peer name {ni}"));
    must(&format!("ip link set {ri} netns {} && ip link set {ni} netns {}", r.name, node.name));
    r.exec(&format!("ip addr add {lan}.1/24 dev {ri} && ip link set {ri} up && sysctl -qw net.ipv4.ip_forward=1"));
    node.exec(&format!("ip addr add {lan}.2/24 dev {ni} && ip link set {ni} up && ip route add default via {lan}.1"));
    // An endpoint-independent NAT ("full cone"): masquerade everything
    // leaving toward the internet, keeping the node's port, and let anyone
    // reach that mapping. (Plain Linux masquerade filters by remote endpoint
    // and, when a peer's probe lands before our own first packet, moves the
    // mapping to another port: an endpoint-dependent NAT, which case 6 covers.)
    if kind != Kind::FullCone {
        r.exec(&format!(
            "nft add table ip nat && nft 'add chain ip nat post {{ type nat hook postrouting priority 100; }}' && \
             nft add rule ip nat post oifname != {ri} masquerade{} && \
             nft add table ip filter && nft 'add chain ip filter forwarding {{ type filter hook forward priority 0; }}'",
            if kind == Kind::Symmetric { " fully-random" } else { "" }
        ));
        if kind == Kind::MasqueradeNatPmp || kind == Kind::MasqueradeUpnp {
            natpmp(r, &ri, lan, dir, net, kind == Kind::MasqueradeUpnp);
        }
        if kind == Kind::MasqueradeFirewall {
            r.exec(&format!(
                "nft 'add chain ip filter input {{ type filter hook input priority 0; policy drop; }}' && \
                 nft add rule ip filter input iifname {{ lo, {ri} }} accept && \
                 nft add rule ip filter input ct state established,related accept"
            ));
        }
        return;
    }
    r.exec(&format!(
        "nft add table ip nat && nft 'add chain ip nat post {{ type nat hook postrouting priority 100; }}' && \
         nft 'add chain ip nat pre {{ type nat hook prerouting priority -100; }}' && \
         nft add rule ip nat post oifname != {ri} masquerade persistent && \
         nft add rule ip nat pre iifname != {ri} udp dport 41641 dnat to {lan}.2:41641 && \
         nft add table ip filter && nft 'add chain ip filter forwarding {{ type filter hook forward priority 0; }}'"
    ));
}

/// miniupnpd (nftables backend) in the router, mapping for its LAN with
/// PCP/NAT-PMP only, or (`upnp`) with UPnP IGD only. Killed with the
/// router's namespace.
fn natpmp(r: &Netns, lan_if: &str, lan: &str, dir: &std::path::Path, net: &str, upnp: bool) {
    let wan_if = r.exec(&format!("ip -o -4 addr show | awk '/{net}./ {{print $2}}'")).trim().to_string();
    let wan_ip = r.exec(&format!("ip -o -4 addr show | awk '/{net}./ {{print $4}}'")).trim().trim_end_matches("/24").to_string();
    r.exec(
        "nft -f - <<'EOF'
table inet filter {
    chain forward { type filter hook forward priority 0; policy accept; jump miniupnpd; }
    chain miniupnpd { }
    chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }
    chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }
    chain prerouting_miniupnpd { }
    chain postrouting_miniupnpd { }
}
EOF",
    );
    let dir = dir.display();
    let (natpmp, upnp) = if upnp { ("no", "yes") } else { ("yes", "no") };
    let conf = format!(
        "ext_ifname={wan_if}\next_ip={wan_ip}\nlistening_ip={lan_if}\nenable_natpmp={natpmp}\nenable_upnp={upnp}\n\
         secure_mode=yes\nsystem_uptime=yes\nuuid=bab1079e-342b-48ae-b32e-d198949be7c7\n\
         allow 1024-65535 {lan}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
    );
    std::fs::write(format!("{dir}/miniupnpd.conf"), conf).unwrap();
    r.exec(&format!("miniupnpd -f {dir}/miniupnpd.conf -P {dir}/miniupnpd.pid >{dir}/miniupnpd.log 2>&1"));
}

impl Lab {
    fn new() -> Lab {
        Lab::with(Kind::FullCone, Kind::FullCone)
    }
    fn with(a: Kind, b: Kind) -> Lab {
        Lab::on("10.50.0", a, b)
    }

    fn on(net: &'static str, a: Kind, b: Kind) -> Lab {
        let ctl = Netns::new("ntc");
        let ra = Netns::new("nra");
        let rb = Netns::new("nrb");
        let na = Netns::new("nna");
        let nb = Netns::new("nnb");
        let hub = lan(&[&ctl, &ra, &rb], &[&format!("{net}.1"), &format!("{net}.2"), &format!("{net}.3")]);
        // The routers reach each other through a router (the hub), as on
        // the Internet, so a datagram with a TTL of 2 (an opener) passes
        // its own NAT but never reaches the other one.
        hub.exec(&format!(
            "ip addr add {net}.254/24 dev br0 && sysctl -qw net.ipv4.ip_forward=1 && \
             sysctl -qw net.ipv4.conf.all.send_redirects=0 && sysctl -qw net.ipv4.conf.br0.send_redirects=0"
        ));
        ra.exec(&format!("ip route add {net}.3/32 via {net}.254"));
        rb.exec(&format!("ip route add {net}.2/32 via {net}.254"));
        let dir = tempdir();
        router(&ra, &na, "192.168.1", a, dir.path(), net);
        router(&rb, &nb, "192.168.2", b, dir.path(), net);
        Lab { ctl, ra, rb, na, nb, _hub: hub, dir, net }
    }
    fn d(&self) -> String {
        self.dir.path().display().to_string()
    }
    fn admin(&self, args: &str) -> String {
        self.ctl.exec(&format!("{TAILGATE} control --state-dir {}/ctl {args}", self.d()))
    }
    fn node(&self, ns: &Netns, name: &str, key: Option<&str>, n: u32) -> Proc {
        let key = key.map(|k| format!("--authkey {k}")).unwrap_or_default();
        let mut p = ns.spawn(
            &format!("env RUST_LOG=tailgate=debug,russh=info,boringtun=info {TAILGATE} up {key} --state-dir {}/{name} --hostname {name} --listen-port 41641", self.d()),
            &self.dir.path().join(format!("{name}{n}.log")),
        );
        p.wait_log("tailgate: up at", 20);
        p
    }
    fn path_of_vps(&self) -> String {
        peer_path(&self.nb, &format!("{}/laptop", self.d()))
    }
    fn ssh(&self, cmd: &str, secs: u64) -> (i32, String, String) {
        self.nb.run(&format!("{TAILGATE} ssh --state-dir {}/laptop root@vps {cmd}", self.d()), secs)
    }
    fn block_udp(&self) {
        // Only TCP leaves this home network: UDP is dropped both ways.
        self.rb.exec("nft add rule ip filter forwarding meta l4proto udp drop");
    }
    fn unblock_udp(&self) {
        self.rb.exec("nft flush chain ip filter forwarding");
    }
}

#[test]
fn direct_when_possible_relay_when_not() {
    if !require(&["nft", "ssh"]) {
        return;
    }
    let lab = Lab::new();
    let d = lab.d();
    std::fs::write(format!("{d}/policy.toml"), ALICE_ROOT_POLICY).unwrap();
    let mut ctl = lab.ctl.spawn(
        &format!("{TAILGATE} control --state-dir {d}/ctl --listen 10.50.0.1:8443 --policy {d}/policy.toml"),
        &lab.dir.path().join("ctl.log"),
    );
    ctl.wait_log("listening on", 15);
    lab.admin("users add alice");
    let vps_key = lab.admin("keys create --tag tag:prod").lines().last().unwrap().trim().to_string();
    let laptop_key = lab.admin("keys create --user alice --reusable").lines().last().unwrap().trim().to_string();

    // 1. Both behind endpoint-independent NATs: a direct path within seconds.
    let vps = lab.node(&lab.na, "vps", Some(&vps_key), 1);
    let mut laptop = lab.node(&lab.nb, "laptop", Some(&laptop_key), 1);
    assert!(
        eventually(20, || lab.path_of_vps().starts_with("direct 10.50.0.2:")),
        "expected a direct path through both NATs, got {:?}\nlaptop:\n{}\nvps:\n{}",
        lab.path_of_vps(),
        laptop.log_text(),
        vps.log_text()
    );
    let (code, out, err) = lab.ssh("echo direct-ok", 20);
    assert_eq!((code, out.trim()), (0, "direct-ok"), "{err}");

    // 2. UDP blocked at the laptop's router: the relay over the control port carries SSH.
    laptop.kill();
    lab.block_udp();
    let mut laptop = lab.node(&lab.nb, "laptop", None, 2);
    let (code, out, err) = lab.ssh("echo relay-ok", 30);
    assert_eq!((code, out.trim()), (0, "relay-ok"), "ssh over the relay: {err}\n{}", laptop.log_text());
    assert_eq!(lab.path_of_vps(), "relay");

    // 3. The relay connection is cut: the node reconnects on its own.
    lab.nb.exec("ss -K dst 10.50.0.1 dport = 8443 >/dev/null");
    let mut r = (0, String::new(), String::new());
    assert!(
        eventually(30, || {
            r = lab.ssh("echo relay-again", 15);
            r.0 == 0
        }),
        "after cutting the relay connection: {r:?}"
    );

    // 4. UDP unblocked during an open session: upgrade to direct, session survives.
    let session = lab
        .nb
        .spawn(&format!("{TAILGATE} ssh --state-dir {d}/laptop root@vps 'sleep 10; echo survived'"), &lab.dir.path().join("session.log"));
    std::thread::sleep(Duration::from_secs(1));
    lab.unblock_udp();
    assert!(
        eventually(20, || lab.path_of_vps().starts_with("direct")),
        "no upgrade to direct after UDP came back: {:?}",
        lab.path_of_vps()
    );
    let mut session = session;
    session.wait_log("survived", 20);

    // 5. Forged probes (right magic, wrong keys) are ignored.
    lab.rb.exec(
        "for i in $(seq 50); do head -c 120 /dev/urandom | sed '1s/^/TGDSC\\x01/' | socat -u - UDP:10.50.0.2:41641; done 2>/dev/null; true",
    );
    let (code, out, _) = lab.ssh("echo still-ok", 20);
    assert_eq!((code, out.trim()), (0, "still-ok"));

    // 6. The laptop behind a symmetric NAT (a new port per destination):
    // SSH still works, over whichever path is possible, and status says which.
    laptop.kill();
    lab.rb.exec("nft flush chain ip nat post && nft flush chain ip nat pre");
    let lan_if = lab.rb.exec("ip -o addr show | awk '/192.168.2.1/ {print $2}'").trim().to_string();
    lab.rb.exec(&format!("nft add rule ip nat post oifname != {lan_if} masquerade fully-random"));
    let _laptop = lab.node(&lab.nb, "laptop", None, 3);
    let (code, out, err) = lab.ssh("echo symmetric-ok", 30);
    assert_eq!((code, out.trim()), (0, "symmetric-ok"), "{err}");
    let path = lab.path_of_vps();
    assert!(path == "relay" || path.starts_with("direct"), "status names the path: {path:?}");
    eprintln!("symmetric NAT: path = {path}");
}

/// The sizes of the laptop's router's answers to a PCP ANNOUNCE and a
/// NAT-PMP public-address request (0: no answer within 2 s).
fn gateway_answers(lab: &Lab) -> (usize, usize) {
    // ANNOUNCE: version 2, opcode 0, lifetime 0, client ::ffff:192.168.2.2.
    let pcp = format!("\\002{}\\377\\377\\300\\250\\002\\002", "\\000".repeat(17));
    let ask = |req: &str| {
        let (_, n, _) = lab.nb.run(&format!("printf '{req}' | socat -T2 - UDP:192.168.2.1:5351 2>/dev/null | wc -c"), 10);
        n.trim().parse().unwrap_or(0)
    };
    (ask(&pcp), ask("\\000\\000"))
}

/// Control, then the vps, then the laptop (which joins with an auth key
/// each): the three processes, in that order.
fn start_pair(lab: &Lab) -> (Proc, Proc, Proc) {
    let d = lab.d();
    std::fs::write(format!("{d}/policy.toml"), ALICE_ROOT_POLICY).unwrap();
    let mut ctl = lab.ctl.spawn(
        &format!("{TAILGATE} control --state-dir {d}/ctl --listen {}.1:8443 --policy {d}/policy.toml", lab.net),
        &lab.dir.path().join("ctl.log"),
    );
    ctl.wait_log("listening on", 15);
    lab.admin("users add alice");
    let vps_key = lab.admin("keys create --tag tag:prod").lines().last().unwrap().trim().to_string();
    let laptop_key = lab.admin("keys create --user alice").lines().last().unwrap().trim().to_string();
    let vps = lab.node(&lab.na, "vps", Some(&vps_key), 1);
    let laptop = lab.node(&lab.nb, "laptop", Some(&laptop_key), 1);
    (ctl, vps, laptop)
}

/// Waits (at most `secs`) for a direct path from the laptop to the vps and
/// returns how long it took from now, or panics with both logs and both
/// routers' conntrack tables.
fn time_to_direct(lab: &Lab, vps: &Proc, laptop: &Proc, secs: u64) -> Duration {
    let t0 = std::time::Instant::now();
    let want = format!("direct {}.2:", lab.net);
    if eventually(secs, || lab.path_of_vps().starts_with(&want)) {
        return t0.elapsed();
    }
    panic!(
        "no direct path within {secs} s, path {:?}\nra conntrack:\n{}\nrb conntrack:\n{}\nlaptop:\n{}\nvps:\n{}",
        lab.path_of_vps(),
        lab.ra.run("conntrack -L -p udp 2>&1", 5).1,
        lab.rb.run("conntrack -L -p udp 2>&1", 5).1,
        laptop.log_text(),
        vps.log_text()
    );
}

#[test]
fn masquerade_both_sides_goes_direct() {
    if !require(&["nft", "ssh", "conntrack"]) {
        return;
    }
    // Routers with a WAN input firewall, like most home routers: an
    // unsolicited probe is dropped before conntrack keeps it, so whichever
    // side probes first, the other's mapping stays put.
    let kind = Kind::MasqueradeFirewall;
    let lab = Lab::with(kind, kind);
    let (_ctl, vps, laptop) = start_pair(&lab);
    let took = time_to_direct(&lab, &vps, &laptop, 5);
    eprintln!("masquerade both sides ({kind:?}): direct after {:.1} s", took.as_secs_f64());
    let (code, out, err) = lab.ssh("echo masq-ok", 20);
    assert_eq!((code, out.trim()), (0, "masq-ok"), "{err}");
}

#[test]
fn masquerade_both_sides_without_firewall_goes_direct() {
    if !require(&["nft", "ssh", "conntrack"]) {
        return;
    }
    // Plain masquerade that accepts WAN input (Docker hosts, cloud NAT
    // gateways): a probe that reaches a router before the node behind it
    // sent anything to its source is kept as a flow to the router, and the
    // node's own packets to that peer then leave from a random port. Openers
    // (TTL 2, past our router only) announced by call-me-maybe, with pings
    // held back behind them, keep every first probe on the right side.
    let kind = Kind::Masquerade;
    let lab = Lab::with(kind, kind);
    let (_ctl, vps, laptop) = start_pair(&lab);
    let took = time_to_direct(&lab, &vps, &laptop, 5);
    eprintln!("masquerade both sides ({kind:?}): direct after {:.1} s", took.as_secs_f64());
    let (code, out, err) = lab.ssh("echo masq-nofw-ok", 20);
    assert_eq!((code, out.trim()), (0, "masq-nofw-ok"), "{err}");
    // Both routers kept the port (no clash): the path is the announced one.
    assert!(lab.path_of_vps().starts_with("direct 10.50.0.2:41641"), "{}", lab.path_of_vps());
}

#[test]
fn natpmp_mapping_gives_a_direct_path_where_punching_cannot() {
    if !require(&["nft", "ssh", "conntrack", "miniupnpd"]) {
        return;
    }
    // The vps is behind a symmetric NAT (a new random port per peer) and the
    // laptop behind plain masquerade, which admits only replies: punching
    // cannot work (bench/nat-kinds.sh: "masq symmetric" stays on the relay).
    // A PCP mapping on the laptop's router gives the vps an address that
    // always reaches the laptop, so a direct path here proves the mapping
    // is announced and used.
    // miniupnpd maps nothing on a private WAN address: this lab's
    // "internet" uses a public-looking prefix that exists only in its namespaces.
    let lab = Lab::on("45.50.0", Kind::Symmetric, Kind::MasqueradeNatPmp);
    let (pcp, natpmp) = gateway_answers(&lab);
    assert!(pcp >= 24 && natpmp == 12, "miniupnpd's answers: PCP {pcp} bytes, NAT-PMP {natpmp} bytes");
    let (_ctl, vps, mut laptop) = start_pair(&lab);
    // miniupnpd speaks PCP and NAT-PMP; PCP is asked first.
    laptop.wait_log("PCP: the gateway maps a public port to us", 10);
    let took = time_to_direct(&lab, &vps, &laptop, 10);
    eprintln!("symmetric vps, laptop behind masquerade + PCP: direct after {:.1} s", took.as_secs_f64());
    let mapped = lab.rb.exec("nft list chain inet filter prerouting_miniupnpd");
    assert!(mapped.contains("192.168.2.2") && mapped.contains("41641"), "{mapped}");
    let (code, out, err) = lab.ssh("echo natpmp-ok", 20);
    assert_eq!((code, out.trim()), (0, "natpmp-ok"), "{err}");
    // A clean shutdown deletes the mapping.
    must(&format!("kill -TERM {}", laptop.pid()));
    assert!(
        eventually(10, || !lab.rb.exec("nft list chain inet filter prerouting_miniupnpd").contains("192.168.2.2")),
        "mapping left behind: {}",
        lab.rb.exec("nft list chain inet filter prerouting_miniupnpd")
    );
    drop(laptop);
}

#[test]
fn upnp_mapping_gives_a_direct_path_where_punching_cannot() {
    if !require(&["nft", "ssh", "conntrack", "miniupnpd", "socat"]) {
        return;
    }
    // As the PCP test (symmetric NAT at the vps: only the mapping can give a
    // direct path), but the laptop's router offers UPnP IGD only
    // (SSDP multicast on its LAN, SOAP over HTTP), like most home routers.
    let lab = Lab::on("45.51.0", Kind::Symmetric, Kind::MasqueradeUpnp);
    // PCP and NAT-PMP really get no answer from this router (the NAT-PMP
    // test shows the same probes get one from miniupnpd with them on).
    assert_eq!(gateway_answers(&lab), (0, 0), "PCP or NAT-PMP answered on the UPnP-only router");
    let (_ctl, vps, mut laptop) = start_pair(&lab);
    laptop.wait_log("UPnP: the gateway maps a public port to us", 15);
    let log = laptop.log_text();
    assert!(!log.contains("PCP: the gateway maps") && !log.contains("NAT-PMP: the gateway maps"), "{log}");
    let took = time_to_direct(&lab, &vps, &laptop, 10);
    eprintln!("symmetric vps, laptop behind masquerade + UPnP: direct after {:.1} s", took.as_secs_f64());
    let mapped = lab.rb.exec("nft list chain inet filter prerouting_miniupnpd");
    assert!(mapped.contains("192.168.2.2") && mapped.contains("41641"), "{mapped}");
    let (code, out, err) = lab.ssh("echo upnp-ok", 20);
    assert_eq!((code, out.trim()), (0, "upnp-ok"), "{err}");
    // A clean shutdown deletes the mapping (a SOAP call, not a datagram).
    must(&format!("kill -TERM {}", laptop.pid()));
    assert!(
        eventually(10, || !lab.rb.exec("nft list chain inet filter prerouting_miniupnpd").contains("192.168.2.2")),
        "mapping left behind: {}\n{}",
        lab.rb.exec("nft list chain inet filter prerouting_miniupnpd"),
        laptop.log_text()
    );
    drop(laptop);
}
