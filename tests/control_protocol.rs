//! Control plane end to end, in process on 127.0.0.1: a control server and
//! protocol clients (what `tailgate up` uses). Registration, IP and name
//! allocation, policy-filtered maps, live policy changes, auth-key refusals,
//! user removal, renames, endpoints, expiry, ephemeral cleanup.

#[path = "control_util.rs"]
mod util;

use std::net::IpAddr;
use std::time::Duration;

use tailgate::control::server::hub::AdminRequest;
use tailgate::control::wire::proto::ErrorCode;
use tailgate::control::{ControlError, ControlTarget};
use tailgate::dataplane::wg;
use tailgate::policy::Action;
use util::*;

/// alice's laptop, bob's laptop and a tag:prod server under POLICY_V1.
async fn three_nodes(s: &tailgate::control::ControlServer) -> (Node, Node, Node) {
    admin(s, AdminRequest::PolicySet { text: POLICY_V1.into(), name: "policy.toml".into() }).await;
    setup_users(s, &["alice", "bob"]).await;
    let ka = make_key(s, Some("alice"), &[], false, false).await;
    let kb = make_key(s, Some("bob"), &[], false, false).await;
    let kp = make_key(s, Some("alice"), &["tag:prod"], false, false).await;
    let a = join(&ka, "laptop").await;
    let b = join(&kb, "laptop").await;
    let p = join(&kp, "prod1.example.com").await;
    (a, b, p)
}

#[tokio::test]
async fn registration_allocates_addresses_and_unique_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, b, p) = three_nodes(&s).await;
    // Names from host names, a suffix on clash; sequential addresses.
    assert_eq!((a.name(), b.name(), p.name()), ("laptop", "laptop-2", "prod1"));
    let ips: Vec<IpAddr> = [&a, &b, &p].iter().map(|n| n.map.self_node.ips[0]).collect();
    assert_eq!(ips, ["100.64.0.1", "100.64.0.2", "100.64.0.3"].map(|s| s.parse::<IpAddr>().unwrap()));
    assert_eq!(a.map.self_node.fqdn, "laptop.tailnet.internal");
    assert_eq!(a.map.self_node.user.as_deref(), Some("alice"));
    // A tagged node belongs to its tags, not to the key's user, and does not expire.
    assert_eq!(p.map.self_node.user, None);
    assert_eq!(p.map.self_node.tags, vec!["tag:prod"]);
    assert_eq!(p.map.self_node.key_expiry, None);
    // A user node's key expires in 180 days by default.
    let exp = a.map.self_node.key_expiry.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((exp - now - 180 * 86400).abs() < 60, "expiry {exp} vs now {now}");
    assert!(a.client.new_node());
    // The map carries the node key (from the Noise handshake) and the policy.
    assert_eq!(a.map.self_node.node_key, wg::public_key_of(&a.key));
    assert!(a.map.policy.text.contains("group:admins"));
    s.shutdown().await;
}

#[tokio::test]
async fn maps_only_show_peers_the_policy_lets_talk() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (mut a, b, mut p) = three_nodes(&s).await;
    // alice (admin) <-> prod; bob sees nobody (no own nodes yet).
    a.wait_for("prod1 in alice's map", |m| m.peer_by_name("prod1").is_some()).await;
    p.wait_for("alice in prod1's map", |m| m.peer_by_name("laptop").is_some()).await;
    assert_eq!(a.peer_names(), vec!["prod1"]);
    assert_eq!(p.peer_names(), vec!["laptop"]);
    assert!(b.map.peers.is_empty(), "bob sees {:?}", b.map.peers.keys().collect::<Vec<_>>());
    // What a peer entry holds: key, address, identity, SSH host key, endpoints.
    let prod = a.client.netmap().peer_by_name("prod1").unwrap().clone();
    assert_eq!(prod.node_key, wg::public_key_of(&p.key));
    assert_eq!(prod.peer_config().allowed_ips[0].to_string(), "100.64.0.3/32");
    assert_eq!(prod.identity().tags, vec!["tag:prod"]);
    assert!(prod.ssh_host_key.as_deref().unwrap().starts_with("ssh-ed25519 "));
    assert_eq!(prod.endpoints, vec![ENDPOINT.parse().unwrap()]);
    assert!(prod.online);
    // A second node of bob's sees his first one, nothing else.
    let kb = make_key(&s, Some("bob"), &[], false, false).await;
    let b2 = join(&kb, "desktop").await;
    assert_eq!(b2.peer_names(), vec!["laptop-2"]);
    s.shutdown().await;
}

#[tokio::test]
async fn a_policy_change_reaches_every_node_as_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (mut a, mut b, mut p) = three_nodes(&s).await;
    a.wait_for("prod1", |m| m.peer_by_name("prod1").is_some()).await;
    p.wait_for("laptop", |m| m.peer_by_name("laptop").is_some()).await;
    let v1 = a.client.netmap().policy.version;

    let v = admin(&s, AdminRequest::PolicySet { text: policy_v2(), name: "policy.toml".into() }).await;
    let v2 = v["version"].as_u64().unwrap();
    assert_eq!(v2, v1 + 1);
    for n in [&mut a, &mut b, &mut p] {
        let deltas = n.wait_for("the new policy", |m| m.policy.version == v2).await;
        assert!(deltas.iter().any(|d| d.policy.is_some()), "the policy came as a delta");
    }
    // bob now sees prod1 and prod1 sees bob: peers added in the same delta.
    b.wait_for("prod1 in bob's map", |m| m.peer_by_name("prod1").is_some()).await;
    p.wait_for("bob in prod1's map", |m| m.peer_by_name("laptop-2").is_some()).await;
    assert_eq!(a.peer_names(), vec!["prod1"], "alice's peers unchanged");

    // The policy each node received changes who can SSH where: prod1
    // evaluates bob's login with the map's policy and identities.
    let pol = p.client.netmap().compile_policy().unwrap();
    let me = p.client.netmap().self_node.identity();
    let bob = p.client.netmap().peer_by_name("laptop-2").unwrap().identity();
    assert_eq!(pol.check_ssh(&bob, &me, "root").action, Action::Accept);
    // ... and back: the old policy again removes bob from prod1's map.
    admin(&s, AdminRequest::PolicySet { text: POLICY_V1.into(), name: "policy.toml".into() }).await;
    p.wait_for("bob gone from prod1's map", |m| m.peer_by_name("laptop-2").is_none()).await;
    let pol = p.client.netmap().compile_policy().unwrap();
    assert_eq!(pol.check_ssh(&bob, &me, "root").action, Action::Reject);
    b.wait_for("prod1 gone from bob's map", |m| m.peers.is_empty()).await;

    // A bad policy is refused with the reason; the good one stays.
    let e = s.admin(AdminRequest::PolicySet { text: "[[ssh]]\nsrc = [\"*\"]\n".into(), name: "bad.toml".into() }).await.unwrap_err();
    assert!(e.code == ErrorCode::Invalid && e.message.contains("bad.toml:") && e.message.contains("stays in force"), "{e}");
    let pol = admin(&s, AdminRequest::PolicyGet).await;
    assert_eq!(pol["text"].as_str().unwrap(), POLICY_V1);
    s.shutdown().await;
}

#[tokio::test]
async fn revoked_expired_and_used_auth_keys_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    setup_users(&s, &["alice"]).await;
    // Revoked.
    let v = admin(
        &s,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: false, expiry_secs: None, tags: vec![] },
    )
    .await;
    let t = tailgate::control::AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap();
    admin(&s, AdminRequest::KeysRevoke { id: v["id"].as_i64().unwrap() }).await;
    match join_with(&t, "x", wg::generate_private_key()).await {
        Err(ControlError::Refused { code: ErrorCode::AuthKey, message }) => {
            assert!(message.contains("revoked on") && message.contains("tailgate control keys create"), "{message}");
        }
        other => panic!("revoked key accepted: {:?}", other.map(|n| n.map.self_node)),
    }
    // Expired (1-second lifetime).
    let v = admin(
        &s,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: false, expiry_secs: Some(1), tags: vec![] },
    )
    .await;
    let t = tailgate::control::AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = join_with(&t, "x", wg::generate_private_key()).await.err().expect("expired key refused");
    let msg = e.to_string();
    assert!(msg.contains("expired on") && msg.contains("keys create"), "{msg}");
    // One-off, used twice.
    let t = make_key(&s, Some("alice"), &[], false, false).await;
    let _n = join(&t, "first").await;
    let e = join_with(&t, "second", wg::generate_private_key()).await.err().expect("used key refused");
    assert!(e.to_string().contains("already used"), "{e}");
    // The same node coming back with the same (used) key just logs in.
    let again = join_with(&t, "first", _n.key).await.expect("known node key logs in");
    assert_eq!(again.map.self_node.name, "first");
    assert!(!again.client.new_node());
    s.shutdown().await;
}

#[tokio::test]
async fn removing_a_user_cuts_their_nodes_off() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (mut a, _b, mut p) = three_nodes(&s).await;
    a.wait_for("prod1", |m| m.peer_by_name("prod1").is_some()).await;
    p.wait_for("laptop", |m| m.peer_by_name("laptop").is_some()).await;
    let alice_key = wg::key_to_base64(&wg::public_key_of(&a.key));

    let v = admin(&s, AdminRequest::UsersRemove { name: "alice".into() }).await;
    assert_eq!(v["nodes_removed"], 1);
    // prod1 gets a delta removing alice's laptop.
    let deltas = p.wait_for("alice's laptop removed", |m| m.peer_by_name("laptop").is_none()).await;
    assert!(deltas.iter().any(|d| d.peers_removed.contains(&alice_key)));
    // alice's node is told (key_expired) and disconnected.
    a.wait_key_expired().await;
    let e = a.next().await.unwrap_err();
    assert!(!e.is_transient(), "{e}");
    // Coming back with the old key fails: the node is gone.
    let target = ControlTarget { url: s.url().into(), server_public: s.public_key(), ca_pem: None };
    match login(&target, "laptop", a.key).await {
        Err(ControlError::Refused { code: ErrorCode::NotRegistered, .. }) => {}
        other => panic!("{:?}", other.map(|n| n.map.self_node)),
    }
    // The tagged node alice registered stays.
    assert!(p.client.netmap().self_node.tags == vec!["tag:prod"]);
    let nodes = admin(&s, AdminRequest::NodesList).await;
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    s.shutdown().await;
}

#[tokio::test]
async fn rename_endpoints_tags_and_expiry_flow_to_peers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (mut a, _b, mut p) = three_nodes(&s).await;
    a.wait_for("prod1", |m| m.peer_by_name("prod1").is_some()).await;
    p.wait_for("laptop", |m| m.peer_by_name("laptop").is_some()).await;

    // Rename: peers see the new name, the node itself gets self_node.
    admin(&s, AdminRequest::NodesRename { node: "prod1".into(), name: "db1".into() }).await;
    a.wait_for("renamed peer", |m| m.peer_by_name("db1").is_some()).await;
    let d = p.wait_for("own new name", |m| m.self_node.name == "db1").await;
    assert!(d.iter().any(|d| d.self_node.is_some()));
    let e = s.admin(AdminRequest::NodesRename { node: "db1".into(), name: "laptop".into() }).await.unwrap_err();
    assert!(e.code == ErrorCode::Invalid && e.message.contains("taken"), "{e}");

    // Endpoints reported by a node reach its peers.
    let ep: std::net::SocketAddr = "198.51.100.9:5555".parse().unwrap();
    p.client.report_endpoints(vec![ep]).await.unwrap();
    a.wait_for("new endpoint", |m| m.peer_by_name("db1").is_some_and(|x| x.endpoints == vec![ep])).await;

    // Going offline is visible to peers.
    drop(p);
    a.wait_for("db1 offline", |m| m.peer_by_name("db1").is_some_and(|x| !x.online)).await;

    // Expiring alice's node: she is told, peers drop her, login is refused.
    let kp2 = make_key(&s, Some("alice"), &["tag:prod"], false, false).await;
    let mut p2 = join(&kp2, "prod2").await;
    p2.wait_for("laptop", |m| m.peer_by_name("laptop").is_some()).await;
    admin(&s, AdminRequest::NodesExpire { node: "laptop".into() }).await;
    a.wait_key_expired().await;
    p2.wait_for("laptop dropped", |m| m.peer_by_name("laptop").is_none()).await;
    let target = ControlTarget { url: s.url().into(), server_public: s.public_key(), ca_pem: None };
    match login(&target, "laptop", a.key).await {
        Err(ControlError::Refused { code: ErrorCode::NodeKeyExpired, message }) => {
            assert!(message.contains("expired on") && message.contains("--authkey"), "{message}")
        }
        other => panic!("{:?}", other.map(|n| n.map.self_node)),
    }
    s.shutdown().await;
}

#[tokio::test]
async fn ephemeral_nodes_disappear_after_going_offline() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await; // grace 300 ms
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let ke = make_key(&s, Some("alice"), &[], true, true).await;
    let mut keep = join(&k, "keep").await;
    let eph = join(&ke, "ci-runner").await;
    assert!(eph.map.self_node.ephemeral);
    keep.wait_for("ci-runner", |m| m.peer_by_name("ci-runner").is_some()).await;
    // Online ephemeral nodes stay past the grace period.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(admin(&s, AdminRequest::NodesList).await.as_array().unwrap().len(), 2);
    drop(eph);
    keep.wait_for("ci-runner removed", |m| m.peer_by_name("ci-runner").is_none()).await;
    let nodes = admin(&s, AdminRequest::NodesList).await;
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    // Logout of an ephemeral node deletes it at once.
    let eph2 = join(&ke, "ci-runner-b").await;
    keep.wait_for("ci-runner-b", |m| m.peer_by_name("ci-runner-b").is_some()).await;
    eph2.client.logout().await.unwrap();
    keep.wait_for("ci-runner-b removed", |m| m.peer_by_name("ci-runner-b").is_none()).await;
    s.shutdown().await;
}

#[tokio::test]
async fn a_key_rotation_is_proven_by_a_session_of_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut other = join(&k, "other").await;
    let old = join(&k, "web").await;
    let ip = old.map.self_node.ips[0];
    let old_key = old.key;
    let new_key = wg::generate_private_key();
    old.client.rotate_key(wg::public_key_of(&new_key)).await.unwrap();
    let target = ControlTarget::from(&k);
    let new = login(&target, "web", new_key.clone()).await.unwrap();
    assert_eq!((new.map.self_node.name.as_str(), new.map.self_node.ips[0]), ("web", ip), "same node, new key");
    assert_eq!(new.map.self_node.node_key, wg::public_key_of(&new_key));
    other.wait_for("web under its new key", |m| m.peer_by_name("web").is_some_and(|p| p.node_key == wg::public_key_of(&new_key))).await;
    match login(&target, "web", old_key).await {
        Err(ControlError::Refused { code: ErrorCode::NotRegistered, .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the old key still logs in"),
    }
    // A key that already belongs to a node cannot be rotated onto.
    let web = new.client.rotate_key(wg::public_key_of(&other.key)).await;
    assert!(matches!(web, Err(ControlError::Refused { code: ErrorCode::Protocol, .. })), "{web:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_host_key_with_extra_lines_is_refused_and_reaches_no_peer() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut peer = join(&k, "peer").await;
    let good = host_key(1);
    let bad = [
        format!("{good}\n@revoked * {}", host_key(2)),
        format!("{good}\n* {}", host_key(2)),
        format!("{good} root@evil"),
        format!("{good} "),
        format!(" {good}"),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG9uZQ".into(),
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ".into(),
        good.replace("ssh-ed25519", "ssh-ed25519\t"),
    ];
    for (i, key) in bad.iter().enumerate() {
        let mut h = hello(&k, &format!("evil{i}"));
        h.ssh_host_key = Some(key.clone());
        match tailgate::control::ControlClient::connect(&ControlTarget::from(&k), &wg::generate_private_key(), h).await {
            Err(ControlError::Refused { code: ErrorCode::HostInfo, message }) => {
                assert!(message.contains("ssh-ed25519 BASE64"), "{message}")
            }
            Err(e) => panic!("{key:?}: {e}"),
            Ok(_) => panic!("{key:?} accepted"),
        }
    }
    // A registered node cannot slip one in at login either.
    let mut h = tailgate::control::NodeHello::login("peer2");
    h.ssh_host_key = Some(bad[0].clone());
    let p2 = join(&k, "peer2").await;
    let key2 = p2.key.clone();
    drop(p2);
    match tailgate::control::ControlClient::connect(&ControlTarget::from(&k), &key2, h).await {
        Err(ControlError::Refused { code: ErrorCode::HostInfo, .. }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    let nodes = admin(&s, AdminRequest::NodesList).await;
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    assert!(!nodes.to_string().contains("revoked"), "{nodes}");
    // What the peer writes to known_hosts holds one line per peer, no markers.
    peer.wait_for("peer2", |m| m.peer_by_name("peer2").is_some()).await;
    let kh = tempfile::tempdir().unwrap();
    tailgate::daemon::agent::write_known_hosts(kh.path(), &tailgate::daemon::agent::directory_of(peer.client.netmap(), None)).unwrap();
    let text = std::fs::read_to_string(kh.path().join("known_hosts")).unwrap();
    assert!(!text.contains('@') && !text.contains('*'), "{text}");
    assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1, "{text}");
    s.shutdown().await;
}

/// A control server (compromised, or older than the checks) vouching for
/// bad names or keys: the client leaves those peers out of `known_hosts`,
/// the directory and `ssh-config` rather than writing them.
#[tokio::test]
async fn clients_check_names_and_host_keys_again_before_writing_them() {
    use tailgate::control::wire::proto::{MapFull, PeerInfo, PolicyInfo, SelfInfo};
    let peer = |n: u8, name: &str, key: Option<String>| PeerInfo {
        node_id: n as u64,
        node_key: [n; 32],
        name: name.into(),
        fqdn: format!("{name}.tailnet.internal"),
        ips: vec![IpAddr::from([100, 64, 0, n])],
        user: Some("alice".into()),
        tags: vec![],
        groups: vec![],
        endpoints: vec![],
        ssh_host_key: key,
        online: true,
    };
    let good = host_key(1);
    let map = tailgate::control::NetMap::from_full(MapFull {
        self_node: SelfInfo {
            node_id: 9,
            node_key: [9; 32],
            name: "me".into(),
            fqdn: "me.tailnet.internal".into(),
            ips: vec![IpAddr::from([100, 64, 0, 9])],
            user: Some("alice".into()),
            tags: vec![],
            groups: vec![],
            key_expiry: None,
            ephemeral: false,
        },
        domain: "tailnet.internal".into(),
        peers: vec![
            peer(1, "web", Some(good.clone())),
            peer(2, "evil", Some(format!("{good}\n@revoked * {good}"))),
            peer(3, "*", Some(host_key(3))),
            peer(4, "a,b", Some(host_key(4))),
            peer(5, "x\nProxyCommand touch /tmp/pwned", Some(host_key(5))),
            peer(6, "comment", Some(format!("{} root@h", host_key(6)))),
        ],
        policy: PolicyInfo { version: 1, name: "p".into(), text: String::new() },
    });
    let dir = tailgate::daemon::agent::directory_of(&map, None);
    let names: Vec<&str> = dir.peers.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    let kh = tempfile::tempdir().unwrap();
    tailgate::daemon::agent::write_known_hosts(kh.path(), &dir).unwrap();
    let text = std::fs::read_to_string(kh.path().join("known_hosts")).unwrap();
    assert_eq!(text.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>(), [format!("web,web.tailnet.internal,100.64.0.1 {good}")]);
    // A directory built some other way is checked at writing time too.
    let mut raw = dir.clone();
    raw.peers.push(tailgate::daemon::directory::Entry {
        name: "*".into(),
        ips: vec![],
        node_key: "k".into(),
        user: None,
        tags: vec![],
        ssh_host_key: Some(format!("{good}\n@revoked * {good}")),
        online: None,
    });
    tailgate::daemon::agent::write_known_hosts(kh.path(), &raw).unwrap();
    assert_eq!(std::fs::read_to_string(kh.path().join("known_hosts")).unwrap(), text);
    let cfg = tailgate::cli::sshclient::ssh_config(std::path::Path::new("/usr/bin/tailgate"), kh.path(), &raw);
    assert!(!cfg.contains("Host *") && cfg.matches("\nHost ").count() == 1, "{cfg}");
}

#[tokio::test]
async fn endpoint_reports_are_filtered_and_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    let interval = Duration::from_secs(1);
    o.endpoint_burst = 4;
    o.endpoint_interval = interval;
    let s = tailgate::control::ControlServer::start(o).await.unwrap();
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut viewer = join(&k, "viewer").await;
    let good: std::net::SocketAddr = "198.51.100.20:41641".parse().unwrap();
    let bad: Vec<std::net::SocketAddr> =
        ["127.0.0.1:41641", "169.254.169.254:80", "224.0.0.1:41641", "0.0.0.0:41641", "[::1]:41641", "[fe80::1]:41641", "198.51.100.20:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
    // At registration and in reports alike, only usable endpoints pass.
    let mut h = hello(&k, "noisy");
    h.endpoints = bad.clone();
    let (noisy, _) = tailgate::control::ControlClient::connect(&ControlTarget::from(&k), &wg::generate_private_key(), h).await.unwrap();
    let mut seen = viewer.wait_for("noisy", |m| m.peer_by_name("noisy").is_some()).await;
    assert_eq!(viewer.client.netmap().peer_by_name("noisy").unwrap().endpoints, vec![]);
    let mut with_good = bad.clone();
    with_good.push(good);
    noisy.report_endpoints(with_good).await.unwrap();
    seen.extend(viewer.wait_for("good endpoint", |m| m.peer_by_name("noisy").is_some_and(|p| p.endpoints == vec![good])).await);
    // A flood of reports: a few reach the viewer, the last one always does.
    let n = 200u16;
    let ep = |i: u16| std::net::SocketAddr::from(([198, 51, 100, 30], 1000 + i));
    let t0 = std::time::Instant::now();
    for i in 0..n {
        noisy.report_endpoints(vec![ep(i)]).await.unwrap();
    }
    let flood = viewer.wait_for("the last report", |m| m.peer_by_name("noisy").is_some_and(|p| p.endpoints == vec![ep(n - 1)])).await;
    let elapsed = t0.elapsed();
    let changes = flood.iter().filter(|d| d.peers_changed.iter().any(|p| p.name == "noisy")).count();
    // The burst left after the earlier report, plus one per interval passed.
    let bound = 4 + (elapsed.as_secs_f64() / interval.as_secs_f64()).ceil() as usize + 1;
    assert!(changes <= bound, "{changes} endpoint deltas for {n} reports in {elapsed:?} (bound {bound})");
    seen.extend(flood);
    for d in &seen {
        for p in d.peers_added.iter().chain(&d.peers_changed) {
            assert!(p.endpoints.iter().all(|e| !bad.contains(e)), "a bad endpoint reached a viewer: {p:?}");
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn tagging_a_node_changes_who_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (mut a, mut b, _p) = three_nodes(&s).await;
    a.wait_for("prod1", |m| m.peer_by_name("prod1").is_some()).await;
    assert!(a.client.netmap().peer_by_name("laptop-2").is_none());
    let e = s.admin(AdminRequest::NodesTag { node: "laptop-2".into(), tags: vec!["tag:nope".into()] }).await.unwrap_err();
    assert!(e.message.contains("not declared"), "{e}");
    admin(&s, AdminRequest::NodesTag { node: "laptop-2".into(), tags: vec!["tag:prod".into()] }).await;
    // bob's laptop is now a prod server: alice (admin) sees it, it has no user.
    a.wait_for("bob's laptop as a prod server", |m| m.peer_by_name("laptop-2").is_some_and(|p| p.user.is_none())).await;
    let d = b.wait_for("own tags", |m| m.self_node.tags == vec!["tag:prod"]).await;
    assert!(d.iter().any(|d| d.self_node.is_some()));
    assert_eq!(b.client.netmap().self_node.key_expiry, None, "tagged nodes do not expire");
    // Untagged again: bob's, and gone from alice's map.
    admin(&s, AdminRequest::NodesTag { node: "laptop-2".into(), tags: vec![] }).await;
    a.wait_for("bob's laptop gone", |m| m.peer_by_name("laptop-2").is_none()).await;
    b.wait_for("bob's again", |m| m.self_node.user.as_deref() == Some("bob")).await;
    s.shutdown().await;
}
