//! Hub unit tests: the hub driven as the server drives it, without
//! sockets, and with time passed in.

use super::names::sanitize_hostname;
use super::*;
use crate::control::server::store::Store;
use crate::control::wire::proto::{ClientMsg, ErrorCode};
use crate::control::wire::proto::{MapFull, NetMap, ServerMsg};
use crate::control::wire::token::AuthKeyToken;
use std::collections::HashMap;
use std::net::SocketAddr;

fn hub() -> Hub {
    let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
    cfg.ephemeral_grace = Duration::from_millis(0);
    Hub::open(Store::open_memory().unwrap(), cfg, None, Now::at(1000)).unwrap()
}

fn token(h: &mut Hub, req: AdminRequest) -> String {
    let v = h.admin(req, Now::at(1000)).unwrap();
    AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret
}

fn key_for(user: &str) -> AdminRequest {
    AdminRequest::KeysCreate { user: Some(user.into()), reusable: true, ephemeral: false, expiry_secs: None, tags: vec![] }
}

fn reg(secret: &str, host: &str) -> ClientMsg {
    ClientMsg::Register { auth_key: secret.into(), hostname: host.into(), ssh_host_key: None, endpoints: vec![], previous_node_key: None }
}

/// Splits outputs into per-connection decoded messages.
fn drain(h: &mut Hub) -> HashMap<ConnId, Vec<ServerMsg>> {
    let mut m: HashMap<ConnId, Vec<ServerMsg>> = HashMap::new();
    for o in h.take_outputs() {
        if let Out::Send(c, msg) = o {
            let j = serde_json::to_vec(&msg).unwrap();
            m.entry(c).or_default().push(serde_json::from_slice(&j).unwrap());
        }
    }
    m
}

fn full_of(msgs: &[ServerMsg]) -> NetMap {
    msgs.iter()
        .find_map(|m| match m {
            ServerMsg::MapFull(f) => Some(NetMap::from_full(MapFull::clone(f))),
            _ => None,
        })
        .expect("a full map")
}

#[test]
fn hostnames_sanitize() {
    assert_eq!(sanitize_hostname("Web1.example.com"), "web1");
    assert_eq!(sanitize_hostname("my laptop!!"), "my-laptop");
    assert_eq!(sanitize_hostname("---"), "node");
    assert_eq!(sanitize_hostname(&"x".repeat(100)).len(), 63);
}

#[test]
fn registration_allocates_ips_and_unique_names() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    let a = h.hello(1, [11; 32], reg(&s, "web"), Now::at(1000)).unwrap();
    let b = h.hello(2, [12; 32], reg(&s, "WEB"), Now::at(1000)).unwrap();
    let c = h.hello(3, [13; 32], reg(&s, "web.example.com"), Now::at(1000)).unwrap();
    let names: Vec<_> = [a, b, c].iter().map(|i| h.nodes[i].name.clone()).collect();
    assert_eq!(names, ["web", "web-2", "web-3"]);
    let ips: Vec<_> = [a, b, c].iter().map(|i| h.nodes[i].ip.to_string()).collect();
    assert_eq!(ips, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);
    let out = drain(&mut h);
    // The third node sees the first two (same user, default policy).
    assert_eq!(full_of(&out[&3]).peers.len(), 2);
}

#[test]
fn ip_allocation_skips_network_and_broadcast_like_addresses() {
    let mut h = hub();
    h.next_ip = 254;
    let ip1 = h.alloc_ip().unwrap();
    h.ips.insert(ip1);
    let ip2 = h.alloc_ip().unwrap();
    assert_eq!(ip1.to_string(), "100.64.0.254");
    assert_eq!(ip2.to_string(), "100.64.1.1");
}

#[test]
fn auth_key_refusals_are_clear() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let one = token(
        &mut h,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: false, ephemeral: false, expiry_secs: Some(60), tags: vec![] },
    );
    h.hello(1, [1; 32], reg(&one, "a"), Now::at(1000)).unwrap();
    let e = h.hello(2, [2; 32], reg(&one, "b"), Now::at(1001)).unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthKey);
    assert!(e.message.contains("one-off") && e.message.contains("keys create"), "{}", e.message);
    let short = token(
        &mut h,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: false, expiry_secs: Some(60), tags: vec![] },
    );
    let e = h.hello(3, [3; 32], reg(&short, "c"), Now::at(1061)).unwrap_err();
    assert!(e.message.contains("expired on 1970-01-01T00:17:40Z"), "{}", e.message);
    let v = h.admin(key_for("alice"), Now::at(1000)).unwrap();
    let id = v["id"].as_i64().unwrap();
    let secret = AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap().secret;
    h.admin(AdminRequest::KeysRevoke { id }, Now::at(1000)).unwrap();
    let e = h.hello(4, [4; 32], reg(&secret, "d"), Now::at(1000)).unwrap_err();
    assert!(e.message.contains("revoked"), "{}", e.message);
    let e = h.hello(5, [5; 32], reg("nonsense-secret-value", "d"), Now::at(1000)).unwrap_err();
    assert!(e.message.contains("not recognised"), "{}", e.message);
    let e = h
        .admin(
            AdminRequest::KeysCreate { user: Some("bob".into()), reusable: false, ephemeral: false, expiry_secs: None, tags: vec![] },
            Now::at(1000),
        )
        .unwrap_err();
    assert!(e.code == ErrorCode::NotFound && e.message.contains("users add bob"), "{e}");
    let e = h
        .admin(
            AdminRequest::KeysCreate { user: None, reusable: false, ephemeral: false, expiry_secs: None, tags: vec!["tag:prod".into()] },
            Now::at(1000),
        )
        .unwrap_err();
    assert!(e.message.contains("not declared"), "{e}");
}

#[test]
fn login_unknown_and_expired_keys() {
    let mut h = hub();
    let e = h.hello(1, [9; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, Now::at(1000)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotRegistered);
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    let id = h.hello(2, [2; 32], reg(&s, "a"), Now::at(1000)).unwrap();
    h.disconnected(2, id, Now::at(1000));
    h.admin(AdminRequest::NodesExpire { node: "a".into() }, Now::at(1000)).unwrap();
    let e = h.hello(3, [2; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, Now::at(1001)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NodeKeyExpired);
    assert!(e.message.contains("expired on"), "{}", e.message);
    // Re-auth with an auth key revives the same node (same IP and name).
    let id2 = h.hello(4, [2; 32], reg(&s, "a"), Now::at(1002)).unwrap();
    assert_eq!(id2, id);
    // An auth key never moves a node to another key, even of the same
    // owner: that is a takeover unless the old key proves it.
    h.disconnected(4, id, Now::at(1002));
    let msg = ClientMsg::Register {
        auth_key: s.clone(),
        hostname: "a".into(),
        ssh_host_key: None,
        endpoints: vec![],
        previous_node_key: Some(wg::key_to_base64(&[2; 32])),
    };
    let e = h.hello(5, [3; 32], msg, Now::at(1003)).unwrap_err();
    assert_eq!(e.code, ErrorCode::Protocol);
    assert_eq!(h.nodes[&id].node_key, [2; 32]);
    assert!(!h.by_key.contains_key(&[3; 32]));
    // Rotation over a session of the old key does move it.
    let id4 = h.hello(6, [2; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, Now::at(1004)).unwrap();
    drain(&mut h);
    h.client_msg(6, id4, ClientMsg::RotateKey { new_node_key: [3; 32] }, Now::at(1004));
    let out = drain(&mut h);
    assert!(out[&6].contains(&ServerMsg::KeyRotated { node_key: [3; 32] }), "{out:?}");
    assert_eq!(h.nodes[&id].node_key, [3; 32]);
    assert!(!h.by_key.contains_key(&[2; 32]));
    assert!(h.conns.is_empty(), "the old-key session ends");
}

#[test]
fn a_failed_audit_write_is_counted_and_the_action_stands() {
    let mut h = hub();
    h.store.break_audit();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    assert!(h.users.values().any(|u| u == "alice"));
    assert_eq!(h.audit_failures(), 1);
    assert_eq!(h.admin(AdminRequest::Status, Now::at(1000)).unwrap()["audit_write_failures"], 1);
}

#[test]
fn relay_authorization_is_a_key_lookup() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    h.hello(1, [1; 32], reg(&s, "a"), Now::at(1000)).unwrap();
    assert!(h.relay_allowed(&[1; 32], Now::at(1000)));
    assert!(!h.relay_allowed(&[2; 32], Now::at(1000)), "unknown key");
    h.admin(AdminRequest::NodesExpire { node: "a".into() }, Now::at(1001)).unwrap();
    assert!(!h.relay_allowed(&[1; 32], Now::at(1001)), "expired key");
}

#[test]
fn endpoint_reports_are_paced_and_the_latest_wins() {
    let mut h = hub();
    h.cfg.endpoint_burst = 2;
    h.cfg.endpoint_interval = Duration::from_secs(10);
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    h.hello(1, [1; 32], reg(&s, "viewer"), Now::at(1000)).unwrap();
    let id = h.hello(2, [2; 32], reg(&s, "noisy"), Now::at(1000)).unwrap();
    drain(&mut h);
    let t0 = Now::at(1000);
    let ep = |i: u16| SocketAddr::from(([198, 51, 100, 1], 1000 + i));
    for i in 0..50 {
        h.report_endpoints(id, vec![ep(i)], t0);
    }
    // A bad endpoint is dropped before it is even paced.
    h.client_msg(2, id, ClientMsg::ReportEndpoints { endpoints: vec!["127.0.0.1:1".parse().unwrap(), ep(50)] }, Now::at(1000));
    let changes = |h: &mut Hub| drain(h).get(&1).map_or(0, |m| m.iter().filter(|m| matches!(m, ServerMsg::MapDelta(_))).count());
    assert_eq!(changes(&mut h), 2, "the burst");
    assert_eq!(h.nodes[&id].endpoints, vec![ep(1)]);
    h.tick(t0.after(Duration::from_secs(1)));
    assert_eq!(changes(&mut h), 0, "no budget yet");
    h.tick(t0.after(Duration::from_secs(10)));
    assert_eq!(changes(&mut h), 1, "one coalesced change");
    assert_eq!(h.nodes[&id].endpoints, vec![ep(50)]);
    assert_eq!(h.store.nodes().unwrap().iter().find(|n| n.id == id).unwrap().endpoints, vec![ep(50)]);
}

#[test]
fn a_key_lifetime_of_zero_refuses_instead_of_panicking() {
    let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
    cfg.node_key_expiry = Duration::ZERO;
    let mut h = Hub::open(Store::open_memory().unwrap(), cfg, None, Now::at(1000)).unwrap();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    let e = h.hello(1, [1; 32], reg(&s, "a"), Now::at(1000)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NodeKeyExpired);
    assert!(h.conns.is_empty());
}

#[test]
fn long_names_keep_their_suffix_within_63_characters() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    let long = "x".repeat(100);
    let a = h.hello(1, [1; 32], reg(&s, &long), Now::at(1000)).unwrap();
    let b = h.hello(2, [2; 32], reg(&s, &long), Now::at(1000)).unwrap();
    assert_eq!(h.nodes[&a].name.len(), 63);
    assert!(h.nodes[&b].name.ends_with("-2") && h.nodes[&b].name.len() == 63, "{}", h.nodes[&b].name);
    let e = h.hello(3, [3; 32], reg(&s, "bad\nname"), Now::at(1000)).unwrap_err();
    assert_eq!(e.code, ErrorCode::HostInfo);
}

#[test]
fn removing_a_user_removes_their_nodes_from_peers_maps() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    let a1 = h.hello(1, [1; 32], reg(&s, "a1"), Now::at(1000)).unwrap();
    let _a2 = h.hello(2, [2; 32], reg(&s, "a2"), Now::at(1000)).unwrap();
    drain(&mut h);
    h.admin(AdminRequest::UsersRemove { name: "alice".into() }, Now::at(1000)).unwrap();
    let out = h.take_outputs();
    // Both connections are told their key is gone and closed.
    let closes = out.iter().filter(|o| matches!(o, Out::Close(..))).count();
    assert_eq!(closes, 2);
    assert!(!h.engine.contains(a1 as u64));
    assert!(h.nodes.is_empty());
    assert!(h.store.keys().unwrap().is_empty(), "their keys go too");
}

#[test]
fn ephemeral_nodes_are_deleted_after_going_offline() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let eph = token(
        &mut h,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: true, expiry_secs: None, tags: vec![] },
    );
    let s = token(&mut h, key_for("alice"));
    let keep = h.hello(1, [1; 32], reg(&s, "keep"), Now::at(1000)).unwrap();
    let e = h.hello(2, [2; 32], reg(&eph, "ci-runner"), Now::at(1000)).unwrap();
    drain(&mut h);
    h.tick(Now::at(1000));
    assert!(h.nodes.contains_key(&e), "online ephemeral nodes stay");
    h.disconnected(2, e, Now::at(1001));
    h.tick(Now::at(1001));
    assert!(!h.nodes.contains_key(&e));
    let out = drain(&mut h);
    let removed: Vec<_> = out[&1]
        .iter()
        .filter_map(|m| match m {
            ServerMsg::MapDelta(d) => Some(d.peers_removed.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(removed, vec![wg::key_to_base64(&[2; 32])]);
    assert!(h.nodes.contains_key(&keep));
}

#[test]
fn bad_policy_never_replaces_good_one() {
    let mut h = hub();
    let before = h.policy_version();
    let e =
        h.admin(AdminRequest::PolicySet { text: "[[ssh]]\nsrc = [\"*\"]\n".into(), name: "bad.toml".into() }, Now::at(1000)).unwrap_err();
    assert!(e.code == ErrorCode::Invalid && e.message.contains("bad.toml:") && e.message.contains("stays in force"), "{e}");
    assert_eq!(h.policy_version(), before);
    let team = include_str!("../../../../policies/team.toml");
    let v = h.admin(AdminRequest::PolicySet { text: team.into(), name: "team.toml".into() }, Now::at(1000)).unwrap();
    assert_eq!(v["version"], before + 1);
    // Same text again: no new version.
    h.admin(AdminRequest::PolicySet { text: team.into(), name: "team.toml".into() }, Now::at(1000)).unwrap();
    assert_eq!(h.policy_version(), before + 1);
}

#[test]
fn simulated_time_expires_auth_keys_ephemeral_nodes_and_node_keys() {
    let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
    cfg.node_key_expiry = Duration::from_secs(3600);
    cfg.ephemeral_grace = Duration::from_secs(30);
    let t0 = Now::at(1000);
    let secs = |s: u64| t0.after(Duration::from_secs(s));
    let mut h = Hub::open(Store::open_memory().unwrap(), cfg, None, t0).unwrap();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, t0).unwrap();
    let create = |h: &mut Hub, ephemeral: bool| {
        let req = AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral, expiry_secs: Some(600), tags: vec![] };
        AuthKeyToken::parse(h.admin(req, t0).unwrap()["token"].as_str().unwrap()).unwrap().secret
    };
    let (s, eph) = (create(&mut h, false), create(&mut h, true));
    let viewer = h.hello(1, [1; 32], reg(&s, "viewer"), t0).unwrap();
    let runner = h.hello(2, [2; 32], reg(&eph, "runner"), t0).unwrap();

    // The auth key lives 600 s on the simulated clock.
    h.hello(3, [3; 32], reg(&s, "late"), secs(599)).unwrap();
    let e = h.hello(4, [4; 32], reg(&s, "too-late"), secs(600)).unwrap_err();
    assert!(e.code == ErrorCode::AuthKey && e.message.contains("expired on 1970-01-01T00:26:40Z"), "{e}");

    // An ephemeral node goes 30 s (monotonic) after it went offline.
    h.disconnected(2, runner, secs(10));
    h.tick(secs(39));
    assert!(h.nodes.contains_key(&runner), "still inside its grace");
    h.tick(secs(40));
    assert!(!h.nodes.contains_key(&runner), "gone once the grace is over");

    // The node key lives 3600 s: the tick at its expiry cuts the node off.
    h.tick(secs(3599));
    assert!(h.conns.contains_key(&viewer) && h.relay_allowed(&[1; 32], secs(3599)));
    drain(&mut h);
    h.tick(secs(3600));
    let out = drain(&mut h);
    assert!(out[&1].iter().any(|m| matches!(m, ServerMsg::MapDelta(d) if d.key_expired)), "{out:?}");
    assert!(!h.conns.contains_key(&viewer));
    assert!(!h.relay_allowed(&[1; 32], secs(3600)));
    let e = h.hello(5, [1; 32], ClientMsg::Login { hostname: None, ssh_host_key: None, endpoints: vec![] }, secs(3600)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NodeKeyExpired);
}

#[test]
fn admin_requests_on_an_index_out_of_step_answer_instead_of_panicking() {
    let mut h = hub();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, Now::at(1000)).unwrap();
    let s = token(&mut h, key_for("alice"));
    h.hello(1, [1; 32], reg(&s, "real"), Now::at(1000)).unwrap();
    // A name left pointing at a node that is not there (what a bug
    // elsewhere would leave behind); before, these requests indexed the
    // node map with it and took the whole control server down.
    h.names.insert("ghost".into(), 999);
    for req in [
        AdminRequest::NodesExpire { node: "ghost".into() },
        AdminRequest::NodesRemove { node: "ghost".into() },
        AdminRequest::NodesTag { node: "ghost".into(), tags: vec![] },
        AdminRequest::NodesRename { node: "ghost".into(), name: "x".into() },
    ] {
        assert_eq!(h.admin(req, Now::at(1000)).unwrap_err().code, ErrorCode::NotFound);
    }
    // Renaming a real node onto the dangling name is not refused by a ghost.
    let v = h.admin(AdminRequest::NodesRename { node: "real".into(), name: "ghost".into() }, Now::at(1000)).unwrap();
    assert_eq!(v["name"], "ghost");
    h.tick(Now::at(1000));
}

#[test]
fn an_ephemeral_node_refused_at_admission_is_still_deleted_after_its_grace() {
    let mut cfg = HubConfig::new("http://127.0.0.1:1", [1; 32]);
    cfg.node_key_expiry = Duration::ZERO;
    cfg.ephemeral_grace = Duration::from_secs(30);
    let t0 = Now::at(1000);
    let secs = |s: u64| t0.after(Duration::from_secs(s));
    let mut h = Hub::open(Store::open_memory().unwrap(), cfg, None, t0).unwrap();
    h.admin(AdminRequest::UsersAdd { name: "alice".into() }, t0).unwrap();
    let eph = token(
        &mut h,
        AdminRequest::KeysCreate { user: Some("alice".into()), reusable: true, ephemeral: true, expiry_secs: None, tags: vec![] },
    );
    // Registered, then refused: its key expires the moment it logs in.
    let e = h.hello(1, [2; 32], reg(&eph, "runner"), t0).unwrap_err();
    assert_eq!(e.code, ErrorCode::NodeKeyExpired);
    let runner = h.by_key[&[2; 32]];
    // A second attempt (re-authentication of the same key) fails the same way
    // and does not restart the grace.
    h.hello(2, [2; 32], reg(&eph, "runner"), secs(5)).unwrap_err();
    h.tick(secs(29));
    assert!(h.nodes.contains_key(&runner), "still inside its grace");
    h.tick(secs(30));
    assert!(!h.nodes.contains_key(&runner), "an ephemeral node that never got online is deleted like any offline one");

    // The same for an ephemeral node that was online: its key expires, and
    // before the tick cuts it off it re-authenticates into an expired key;
    // the refusal also closes the connection it replaced.
    h.cfg.node_key_expiry = Duration::from_secs(3600);
    let online = h.hello(3, [3; 32], reg(&eph, "worker"), secs(100)).unwrap();
    h.cfg.node_key_expiry = Duration::ZERO;
    let e = h.hello(4, [3; 32], reg(&eph, "worker"), secs(3700)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NodeKeyExpired);
    assert!(h.conns.is_empty(), "neither connection is left");
    h.tick(secs(3729));
    assert!(h.nodes.contains_key(&online), "still inside its grace");
    h.tick(secs(3730));
    assert!(!h.nodes.contains_key(&online), "deleted once offline past its grace");
}
