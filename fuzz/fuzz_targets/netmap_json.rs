//! Control messages as JSON (src/control/proto.rs): what a node deserializes
//! from every frame the server sends (and the server from every node), then
//! applies the way the node does: maps, deltas, WireGuard peer configs,
//! identities and the map's policy.
//!
//! Invariants: no panic; serialize(deserialize(x)) deserializes to the same
//! message; applying a delta never leaves a peer under a key other than its
//! own.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tailgate::control::wire::proto::{ClientMsg, MapDelta, MapFull, NetMap, PolicyInfo, SelfInfo, ServerMsg};
use tailgate::dataplane::wg::Wg;

fn base() -> NetMap {
    NetMap::from_full(MapFull {
        self_node: SelfInfo {
            node_id: 1,
            node_key: [1; 32],
            name: "self".into(),
            fqdn: "self.ts".into(),
            ips: vec![[100, 64, 0, 1].into()],
            user: Some("alice@example.com".into()),
            tags: vec![],
            groups: vec![],
            key_expiry: None,
            ephemeral: false,
        },
        domain: "ts".into(),
        peers: vec![],
        policy: PolicyInfo { version: 1, name: "p.toml".into(), text: String::new() },
    })
}

/// What the agent does with a map: peer configs into WireGuard (errors are
/// logged there, not fatal), identities, the policy.
fn use_map(m: &NetMap) {
    for (k, p) in &m.peers {
        assert_eq!(*k, p.node_key, "peer filed under another key");
    }
    let mut wg = Wg::new(&tailgate::key::PrivateKey::from_bytes([7; 32]), Instant::now());
    for c in m.peer_configs() {
        let _ = wg.upsert_peer(c);
    }
    let _ = m.identities();
    let _ = m.peer_by_name("self");
    let _ = m.self_node.identity();
    let _ = m.compile_policy();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = serde_json::from_slice::<ServerMsg>(data) {
        let again: ServerMsg = serde_json::from_slice(&serde_json::to_vec(&msg).unwrap()).unwrap();
        assert_eq!(again, msg, "server message does not round-trip");
        match msg {
            ServerMsg::MapFull(full) => use_map(&NetMap::from_full(full)),
            ServerMsg::MapDelta(d) => apply(&d),
            ServerMsg::LoginOk { node, .. } => {
                let _ = node.identity();
            }
            _ => {}
        }
    }
    if let Ok(msg) = serde_json::from_slice::<ClientMsg>(data) {
        let again: ClientMsg = serde_json::from_slice(&serde_json::to_vec(&msg).unwrap()).unwrap();
        assert_eq!(again, msg, "client message does not round-trip");
    }
    // A bare delta too, so the fuzzer need not find the "type" tag first.
    if let Ok(d) = serde_json::from_slice::<MapDelta>(data) {
        apply(&d);
    }
});

fn apply(d: &MapDelta) {
    let mut m = base();
    m.apply(d);
    m.apply(d);
    use_map(&m);
}
