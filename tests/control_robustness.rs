//! The control server under hostile or unlucky conditions, on 127.0.0.1:
//! garbage HTTP, garbage Noise, oversized and malformed frames (each ends
//! only its own connection), a wrong pinned server key, and a restart that
//! keeps all state while nodes reconnect on their own.

#[path = "control_util.rs"]
mod util;

use std::net::SocketAddr;
use std::time::Duration;

use tailgate::control::server::hub::AdminRequest;
use tailgate::control::wire::frame::WireDecoder;
use tailgate::control::wire::noise::{Initiator, SecureChannel};
use tailgate::control::wire::proto::{ClientMsg, ErrorCode, NetMap, ServerMsg};
use tailgate::control::{AuthKeyToken, ControlClient, ControlError, ControlServer, ControlTarget, NodeHello, wire::http};
use tailgate::dataplane::wg;
use tailgate::key::{Key, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use util::*;

async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out)).await.expect("server answers and closes").ok();
    String::from_utf8_lossy(&out).into_owned()
}

async fn upgraded(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&http::upgrade_request("x", "/tailgate/control", "tailgate-control")).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some((code, _, used)) = http::parse_response(&buf).unwrap() {
            assert_eq!(code, 101);
            assert_eq!(used, buf.len());
            return s;
        }
    }
}

/// A completed Noise handshake on a raw socket, for injecting bad frames.
async fn raw_channel(addr: SocketAddr, server: &Key) -> (TcpStream, SecureChannel) {
    let mut s = upgraded(addr).await;
    let (init, m1) = Initiator::start(&wg::generate_private_key(), server).unwrap();
    s.write_all(&m1).await.unwrap();
    let mut w = WireDecoder::new();
    let mut chunk = [0u8; 512];
    let m2 = loop {
        if let Some(m) = w.next_message().unwrap() {
            break m;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "server closed during handshake");
        w.push(&chunk[..n]);
    };
    let chan = init.finish(&m2, w, 1 << 24).unwrap();
    (s, chan)
}

/// Reads until EOF; returns the server messages that came before it.
async fn read_until_closed(s: &mut TcpStream, chan: &mut SecureChannel) -> Vec<ServerMsg> {
    let mut msgs = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let r = tokio::time::timeout(TIMEOUT, async {
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(0) => return,
                Err(e) => {
                    eprintln!("read_until_closed: {e}");
                    return;
                }
                Ok(n) => n,
            };
            if let Err(e) = chan.push_wire(&chunk[..n]) {
                eprintln!("read_until_closed: {e}");
                return;
            }
            while let Ok(Some(f)) = chan.next_frame() {
                msgs.push(serde_json::from_slice(&f).unwrap());
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the server did not close the connection");
    msgs
}

fn error_of(msgs: &[ServerMsg]) -> (ErrorCode, String) {
    msgs.iter()
        .find_map(|m| match m {
            ServerMsg::Error { code, message } => Some((*code, message.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no error message in {msgs:?}"))
}

#[tokio::test]
async fn garbage_and_oversized_input_ends_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let addr = s.addr();
    admin(&s, AdminRequest::PolicySet { text: POLICY_V1.into(), name: "p.toml".into() }).await;
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut a = join(&k, "a").await;
    let mut b = join(&k, "b").await;
    a.wait_for("b", |m| m.peer_by_name("b").is_some()).await;

    // Plain HTTP: not our business.
    assert!(send_raw(addr, b"GARBAGE\r\n\r\n").await.starts_with("HTTP/1.1 400"));
    assert!(send_raw(addr, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n").await.starts_with("HTTP/1.1 400"));
    assert!(send_raw(addr, &[b'A'; 9000]).await.starts_with("HTTP/1.1 400"), "huge head refused");
    assert!(send_raw(addr, b"GET /wp-login.php HTTP/1.1\r\nHost: x\r\n\r\n").await.starts_with("HTTP/1.1 404"));
    assert!(send_raw(addr, b"GET /tailgate/control HTTP/1.1\r\nHost: x\r\n\r\n").await.starts_with("HTTP/1.1 426"));
    assert!(send_raw(addr, b"GET /tailgate/health HTTP/1.1\r\nHost: x\r\n\r\n").await.starts_with("HTTP/1.1 200"));
    // Unknown upgrades are not found (tailgate-relay belongs to the relay).
    let other = send_raw(addr, b"GET /tailgate/control HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    // Upgraded, then garbage instead of a Noise handshake: closed.
    let mut up = upgraded(addr).await;
    up.write_all(&[0, 96]).await.unwrap();
    up.write_all(&[0x5a; 96]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, up.read_to_end(&mut rest)).await.expect("closed").ok();
    assert!(rest.is_empty(), "no handshake answer to garbage");

    // A valid channel, then an oversized frame: an error, then closed.
    let (mut raw, mut chan) = raw_channel(addr, &s.public_key()).await;
    let mut hdr = vec![tailgate::control::PROTOCOL_VERSION];
    hdr.extend_from_slice(&(100u32 << 20).to_be_bytes());
    let mut wire = Vec::new();
    chan.seal_raw(&hdr, &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    let (code, msg) = error_of(&read_until_closed(&mut raw, &mut chan).await);
    assert_eq!(code, ErrorCode::Protocol);
    assert!(msg.contains("exceeds"), "{msg}");

    // A valid channel, then a frame of another protocol version.
    let (mut raw, mut chan) = raw_channel(addr, &s.public_key()).await;
    let mut wire = Vec::new();
    chan.seal_raw(&[9, 0, 0, 0, 2, b'{', b'}'], &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    let (_, msg) = error_of(&read_until_closed(&mut raw, &mut chan).await);
    assert!(msg.contains("version 9"), "{msg}");

    // A valid channel and frame, but not a message.
    let (mut raw, mut chan) = raw_channel(addr, &s.public_key()).await;
    let mut wire = Vec::new();
    chan.seal_frame(br#"{"type":"register","auth_key":5}"#, &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    let (_, msg) = error_of(&read_until_closed(&mut raw, &mut chan).await);
    assert!(msg.contains("malformed"), "{msg}");

    // A valid channel, then bytes that are not ciphertext of that channel.
    let (mut raw, mut chan) = raw_channel(addr, &s.public_key()).await;
    raw.write_all(&[0, 40]).await.unwrap();
    raw.write_all(&[7u8; 40]).await.unwrap();
    read_until_closed(&mut raw, &mut chan).await;

    // A logged-in node sending an oversized frame is cut off; its peers see
    // it go offline and carry on.
    let (mut raw, mut chan) = raw_channel(addr, &s.public_key()).await;
    let mut wire = Vec::new();
    let reg = format!(r#"{{"type":"register","auth_key":"{}","hostname":"rogue"}}"#, k.secret);
    chan.seal_frame(reg.as_bytes(), &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    // Wait for its first map before misbehaving.
    let mut chunk = vec![0u8; 65536];
    let got_map = tokio::time::timeout(TIMEOUT, async {
        loop {
            let n = raw.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before the first map");
            chan.push_wire(&chunk[..n]).unwrap();
            while let Some(f) = chan.next_frame().unwrap() {
                if let ServerMsg::MapFull(m) = serde_json::from_slice(&f).unwrap() {
                    return m;
                }
            }
        }
    })
    .await
    .expect("a first map");
    assert_eq!(got_map.self_node.name, "rogue");
    a.wait_for("rogue online", |m| m.peer_by_name("rogue").is_some_and(|p| p.online)).await;
    let mut hdr = vec![tailgate::control::PROTOCOL_VERSION];
    hdr.extend_from_slice(&(1u32 << 20).to_be_bytes());
    let mut wire = Vec::new();
    chan.seal_raw(&hdr, &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    let (_, msg) = error_of(&read_until_closed(&mut raw, &mut chan).await);
    assert!(msg.contains("exceeds"), "{msg}");
    a.wait_for("rogue offline", |m| m.peer_by_name("rogue").is_some_and(|p| !p.online)).await;

    // The nodes that behaved still get updates.
    admin(&s, AdminRequest::PolicySet { text: policy_v2(), name: "p.toml".into() }).await;
    let v = admin(&s, AdminRequest::PolicyGet).await["version"].as_u64().unwrap();
    a.wait_for("new policy", |m| m.policy.version == v).await;
    b.wait_for("new policy", |m| m.policy.version == v).await;
    assert!(a.client.netmap().peer_by_name("b").unwrap().online);
    s.shutdown().await;
}

#[tokio::test]
async fn a_wrong_server_key_is_refused_by_noise() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    setup_users(&s, &["alice"]).await;
    let mut k = make_key(&s, Some("alice"), &[], true, false).await;
    k.server_public = wg::public_key_of(&wg::generate_private_key());
    match join_with(&k, "evil", wg::generate_private_key()).await {
        Err(e @ ControlError::WrongServerKey { .. }) => {
            let m = e.to_string();
            assert!(m.contains("Noise handshake") && m.contains("pinned"), "{m}");
        }
        other => panic!("expected a Noise failure, got {:?}", other.map(|n| n.map.self_node)),
    }
    // Nothing was registered.
    assert!(admin(&s, AdminRequest::NodesList).await.as_array().unwrap().is_empty());
    // Not a control server at all: a clear error too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut c, _)) = listener.accept().await {
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b).await;
            let _ = c.write_all(&http::simple_response(404, "Not Found", "")).await;
        }
    });
    let t = ControlTarget { url: format!("http://{other}"), server_public: s.public_key(), ca_pem: None };
    let e = ControlClient::connect(&t, &wg::generate_private_key(), NodeHello::login("x")).await.err().unwrap();
    assert!(e.to_string().contains("404") && e.to_string().contains("tailgate control server"), "{e}");
    s.shutdown().await;
}

/// A node agent's reconnect loop, as the module docs recommend: keep the
/// last map, retry with backoff, log in with the known key.
fn spawn_reconnecting(token: AuthKeyToken, host: &'static str, key: PrivateKey) -> tokio::sync::watch::Receiver<Option<NetMap>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let target = ControlTarget::from(&token);
        let mut backoff = Duration::from_millis(50);
        loop {
            match ControlClient::connect(&target, &key, hello(&token, host)).await {
                Ok((mut c, map)) => {
                    backoff = Duration::from_millis(50);
                    let _ = tx.send(Some(map));
                    loop {
                        match c.next_update().await {
                            Ok(_) => {
                                let _ = tx.send(Some(c.netmap().clone()));
                            }
                            Err(e) => {
                                eprintln!("{host}: {e}; reconnecting");
                                break;
                            }
                        }
                    }
                }
                Err(e) if !e.is_transient() => panic!("{host}: {e}"),
                Err(e) => eprintln!("{host}: {e}; retrying"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
        }
    });
    rx
}

async fn wait_map(rx: &mut tokio::sync::watch::Receiver<Option<NetMap>>, what: &str, pred: impl Fn(&NetMap) -> bool) -> NetMap {
    let r = tokio::time::timeout(TIMEOUT, rx.wait_for(|m| m.as_ref().is_some_and(&pred))).await;
    match r {
        Ok(Ok(m)) => m.clone().unwrap(),
        _ => panic!("timed out waiting for {what}"),
    }
}

#[tokio::test]
async fn restart_keeps_state_and_nodes_reconnect_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let addr = s.addr();
    let public = s.public_key();
    admin(&s, AdminRequest::PolicySet { text: POLICY_V1.into(), name: "p.toml".into() }).await;
    setup_users(&s, &["alice", "bob"]).await;
    let ka = make_key(&s, Some("alice"), &[], true, false).await;
    let kp = make_key(&s, Some("alice"), &["tag:prod"], false, false).await;
    let mut a = spawn_reconnecting(ka.clone(), "laptop", wg::generate_private_key());
    let mut p = spawn_reconnecting(kp.clone(), "prod1", wg::generate_private_key());
    let mut a2 = spawn_reconnecting(ka.clone(), "phone", wg::generate_private_key());
    let before = wait_map(&mut a, "alice sees prod1 and phone", |m| m.peers.len() == 2).await;
    wait_map(&mut p, "prod1 sees laptop", |m| m.peer_by_name("laptop").is_some()).await;
    wait_map(&mut a2, "phone sees laptop", |m| m.peer_by_name("laptop").is_some()).await;
    let policy_version = before.policy.version;

    s.shutdown().await;
    // Everything offline: nodes keep their last map and keep retrying.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut opts = options(dir.path());
    opts.listen = addr;
    let s2 = ControlServer::start(opts).await.expect("restart on the same port");
    assert_eq!(s2.public_key(), public, "the server key persists");

    let after = wait_map(&mut a, "alice back with both peers online", |m| m.peers.len() == 2 && m.peers.values().all(|p| p.online)).await;
    assert_eq!(after.self_node.name, before.self_node.name);
    assert_eq!(after.self_node.ips, before.self_node.ips);
    assert_eq!(after.policy.version, policy_version, "policy persisted, same version");
    let names = |m: &NetMap| {
        let mut v: Vec<(String, std::net::IpAddr)> = m.peers.values().map(|p| (p.name.clone(), p.ips[0])).collect();
        v.sort();
        v
    };
    assert_eq!(names(&after), names(&before));
    let users = admin(&s2, AdminRequest::UsersList).await;
    assert_eq!(users.as_array().unwrap().len(), 2);
    let nodes = admin(&s2, AdminRequest::NodesList).await;
    assert_eq!(nodes.as_array().unwrap().len(), 3);
    // The one-off key used before the restart is still used; a new node
    // cannot reuse it.
    let e = join_with(&kp, "prod2", wg::generate_private_key()).await.err().unwrap();
    assert!(e.to_string().contains("already used"), "{e}");
    // Names keep being unique after the restart.
    let n = join(&ka, "laptop").await;
    assert_eq!(n.map.self_node.name, "laptop-2");
    assert_eq!(n.map.self_node.ips[0].to_string(), "100.64.0.4");
    drop((a, p, a2));
    s2.shutdown().await;
}

/// Sends one client message on a fresh raw session and returns what the
/// server said before closing.
async fn raw_first_message(addr: SocketAddr, server: &Key, msg: &ClientMsg) -> Vec<ServerMsg> {
    let (mut s, mut chan) = raw_channel(addr, server).await;
    let mut out = Vec::new();
    chan.seal_frame(&serde_json::to_vec(msg).unwrap(), &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    read_until_closed(&mut s, &mut chan).await
}

#[tokio::test]
async fn an_auth_key_of_the_same_owner_cannot_take_over_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut victim = join(&k, "web").await;
    let before = admin(&s, AdminRequest::NodesList).await[0].clone();
    // Another of alice's auth keys (ephemeral, so a takeover would also
    // have made the victim ephemeral), used with the victim's public key.
    let other = make_key(&s, Some("alice"), &[], true, true).await;
    let attack = ClientMsg::Register {
        auth_key: other.secret.clone(),
        hostname: "web".into(),
        ssh_host_key: Some(host_key(99)),
        endpoints: vec![],
        previous_node_key: Some(wg::key_to_base64(&wg::public_key_of(&victim.key))),
    };
    let msgs = raw_first_message(s.addr(), &s.public_key(), &attack).await;
    let (code, message) = error_of(&msgs);
    assert_eq!(code, ErrorCode::Protocol, "{message}");
    assert!(message.contains("rotate_key"), "{message}");
    let after = admin(&s, AdminRequest::NodesList).await;
    assert_eq!(after.as_array().unwrap().len(), 1, "{after}");
    for f in ["name", "ip", "node_key", "ssh_host_key", "ephemeral", "tags", "online"] {
        assert_eq!(after[0][f], before[f], "{f} changed: {after}");
    }
    assert_eq!(after[0]["online"], true);
    // Still connected: the victim hears about a new peer.
    let _p = join(&k, "peer").await;
    victim.wait_for("a new peer", |m| m.peer_by_name("peer").is_some()).await;
    s.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path());
    o.max_unauthenticated_per_ip = 4;
    // Long enough that only the cap, not the handshake timer, can close
    // the extra connection within the test's wait.
    o.handshake_timeout = Duration::from_secs(120);
    let s = ControlServer::start(o).await.unwrap();
    setup_users(&s, &["alice"]).await;
    let k = make_key(&s, Some("alice"), &[], true, false).await;
    let mut early = join(&k, "early").await;
    // Four connections from 127.0.0.1 that never authenticate.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(s.addr()).await.unwrap();
        c.write_all(b"GET /tailgate/control HTTP/1.1\r\n").await.unwrap();
        idle.push(c);
    }
    tokio::time::timeout(TIMEOUT, async {
        while s.unauthenticated_connections() < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server counts the idle connections");
    // The fifth from the same address is closed at once.
    let mut fifth = TcpStream::connect(s.addr()).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(TIMEOUT, fifth.read(&mut buf)).await.expect("the fifth connection is closed, not left waiting");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // Another address is not affected, and neither is a node that is
    // already logged in from the capped one.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = sock.connect(s.addr()).await.unwrap();
    let key = wg::generate_private_key();
    let (_c2, map) = ControlClient::connect_stream(stream, &ControlTarget::from(&k), &key, hello(&k, "other-addr")).await.unwrap();
    assert_eq!(map.self_node.name, "other-addr");
    early.wait_for("the node from 127.0.0.2", |m| m.peer_by_name("other-addr").is_some()).await;
    // Slots come back when the idle connections go away.
    drop(idle);
    tokio::time::timeout(TIMEOUT, async {
        while s.unauthenticated_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("slots released");
    let _late = join(&k, "late").await;
    s.shutdown().await;
}
