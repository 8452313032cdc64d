//! The relay as the control server runs it by default (issue 6), in process
//! on 127.0.0.1: registered nodes relay to each other by node key; unknown,
//! expired and wrongly-pinned clients are refused; a second connection
//! replaces the first; PeerGone; junk after the upgrade; shutdown.

#[path = "control_util.rs"]
mod util;

use std::time::Duration;

use tailgate::control::server::hub::AdminRequest;
use tailgate::dataplane::wg;
use tailgate::key::{Key, PrivateKey};
use tailgate::relay::{RelayClient, RelayError, RelayEvent, RelayReceiver, RelaySender, SendError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::*;

async fn relay(s: &tailgate::control::ControlServer, node: &PrivateKey) -> Result<(RelaySender, RelayReceiver), RelayError> {
    RelayClient::connect(s.url(), &s.public_key(), node).await
}

async fn recv(rx: &mut RelayReceiver) -> (Key, Vec<u8>) {
    tokio::time::timeout(TIMEOUT, rx.recv()).await.expect("a datagram in time").expect("connection alive")
}

/// Two registered nodes (alice's), relaying.
async fn two(s: &tailgate::control::ControlServer) -> (Node, Node) {
    setup_users(s, &["alice"]).await;
    let key = make_key(s, Some("alice"), &[], true, false).await;
    (join(&key, "a").await, join(&key, "b").await)
}

#[tokio::test]
async fn registered_nodes_relay_datagrams_by_node_key() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, b) = two(&s).await;
    let (pa, pb) = (wg::public_key_of(&a.key), wg::public_key_of(&b.key));
    let (ta, mut ra) = relay(&s, &a.key).await.expect("a accepted");
    let (tb, mut rb) = relay(&s, &b.key).await.expect("b accepted");

    // Sizes from empty to the largest datagram, in order, src authenticated.
    let sizes = [0usize, 1, 148, 1420, 9000, 65_535];
    for (i, n) in sizes.iter().enumerate() {
        let d: Vec<u8> = (0..*n).map(|j| (i + j) as u8).collect();
        ta.send(&pb, &d).unwrap();
    }
    for (i, n) in sizes.iter().enumerate() {
        let (src, d) = recv(&mut rb).await;
        assert_eq!(src, pa);
        assert_eq!(d.len(), *n);
        assert!(d.iter().enumerate().all(|(j, b)| *b == (i + j) as u8));
    }
    assert_eq!(ta.send(&pb, &vec![0; 65_536]), Err(SendError::TooLarge));

    // Both directions, many packets.
    for i in 0..500u32 {
        tb.send(&pa, &i.to_be_bytes()).unwrap();
    }
    for i in 0..500u32 {
        let (src, d) = recv(&mut ra).await;
        assert_eq!((src, d), (pb, i.to_be_bytes().to_vec()));
    }
    assert_eq!(tb.stats().sent_packets, 500);
    assert_eq!(ra.stats().received_packets, 500);
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_keys_and_wrong_server_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let stranger = wg::generate_private_key();
    match relay(&s, &stranger).await {
        Err(RelayError::Refused(m)) => assert!(m.contains("not allowed"), "{m}"),
        Err(e) => panic!("expected Refused, got {e}"),
        Ok(_) => panic!("a stranger was accepted"),
    }
    let (a, _b) = two(&s).await;
    let other = wg::public_key_of(&wg::generate_private_key());
    match RelayClient::connect(s.url(), &other, &a.key).await {
        Err(RelayError::WrongServerKey { .. }) => {}
        Err(e) => panic!("expected WrongServerKey, got {e}"),
        Ok(_) => panic!("accepted with a wrong pinned key"),
    }
    // The server is fine afterwards.
    relay(&s, &a.key).await.expect("a accepted");
    s.shutdown().await;
}

#[tokio::test]
async fn expired_and_removed_nodes_lose_relay_access() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, b) = two(&s).await;
    let name_a = a.name().to_string();
    let name_b = b.name().to_string();
    relay(&s, &a.key).await.expect("a accepted before expiry");
    admin(&s, AdminRequest::NodesExpire { node: name_a }).await;
    admin(&s, AdminRequest::NodesRemove { node: name_b }).await;
    // The relay's view is cached for at most a couple of seconds.
    for (who, k) in [("expired", &a.key), ("removed", &b.key)] {
        let t0 = std::time::Instant::now();
        loop {
            match relay(&s, k).await {
                Err(RelayError::Refused(_)) => break,
                Ok(_) if t0.elapsed() < Duration::from_secs(8) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(_) => panic!("{who} node still accepted after {:?}", t0.elapsed()),
                Err(e) => panic!("{who}: {e}"),
            }
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, b) = two(&s).await;
    let pb = wg::public_key_of(&b.key);
    let (_t1, mut r1) = relay(&s, &a.key).await.unwrap();
    let (t2, mut r2) = relay(&s, &a.key).await.unwrap();
    match tokio::time::timeout(TIMEOUT, r1.recv()).await.expect("old connection ends") {
        Err(RelayError::Closed(m)) => assert!(m.contains("replaced"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The new one carries traffic both ways.
    let (tb, mut rb) = relay(&s, &b.key).await.unwrap();
    t2.send(&pb, b"ping").unwrap();
    assert_eq!(recv(&mut rb).await.1, b"ping");
    tb.send(&wg::public_key_of(&a.key), b"pong").unwrap();
    assert_eq!(recv(&mut r2).await.1, b"pong");
    s.shutdown().await;
}

#[tokio::test]
async fn sending_to_a_node_not_on_the_relay_reports_peer_gone() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, b) = two(&s).await;
    let pb = wg::public_key_of(&b.key);
    let (ta, mut ra) = relay(&s, &a.key).await.unwrap();
    for _ in 0..20 {
        ta.send(&pb, b"x").unwrap();
    }
    let ev = tokio::time::timeout(TIMEOUT, ra.recv_event()).await.unwrap().unwrap();
    assert_eq!(ev, RelayEvent::PeerGone(pb));
    // Rate-limited: one notice for the burst.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ra.try_recv_event().unwrap(), None);
    s.shutdown().await;
}

#[tokio::test]
async fn junk_after_the_upgrade_and_wrong_paths_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, _b) = two(&s).await;
    // Not the relay path: 404.
    let mut c = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    c.write_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: tailgate-relay\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, c.read_to_end(&mut buf)).await.unwrap().unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 404"), "{}", String::from_utf8_lossy(&buf));
    // Upgrade, then garbage instead of Noise: closed, nothing else happens.
    let mut c = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    c.write_all(b"GET /tailgate/relay HTTP/1.1\r\nHost: x\r\nUpgrade: tailgate-relay\r\n\r\n\x00\x30").await.unwrap();
    c.write_all(&[0xA5; 48]).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, c.read_to_end(&mut buf)).await.unwrap().ok();
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    assert!(buf.len() < 200, "no Noise answer to garbage");
    // Still serving.
    relay(&s, &a.key).await.expect("accepted");
    s.shutdown().await;
}

#[tokio::test]
async fn server_shutdown_ends_relay_connections() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, _b) = two(&s).await;
    let (ta, mut ra) = relay(&s, &a.key).await.unwrap();
    s.shutdown().await;
    match tokio::time::timeout(TIMEOUT, ra.recv()).await.expect("ends in time") {
        Err(RelayError::Closed(m)) => assert!(m.contains("shutting down") || m.contains("closed"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(ta.is_closed());
    assert_eq!(ta.send(&[0; 32], b"x"), Err(SendError::Closed));
}

/// Log lines captured in memory for one test (the subscriber is this
/// thread's default; `#[tokio::test]` runs every task on this thread).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn relay_log_lines_name_the_node_by_short_key_in_a_span() {
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber =
        tracing_subscriber::fmt().with_env_filter("tailgate=debug").with_ansi(false).with_writer(move || sink.clone()).finish();
    // Global, not `set_default`: other tests in this binary run on other
    // threads at the same time, and a callsite first seen there (with no
    // subscriber) could otherwise stay disabled for this thread's scoped one.
    // Lines of other tests land here too; the checks below name this test's keys.
    tracing::subscriber::set_global_default(subscriber).expect("the only test here that installs a subscriber");
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let (a, _b) = two(&s).await;
    let (_t1, mut r1) = relay(&s, &a.key).await.unwrap();
    // A second connection replaces the first: the old one's end is logged.
    let (_t2, _r2) = relay(&s, &a.key).await.unwrap();
    assert!(matches!(tokio::time::timeout(TIMEOUT, r1.recv()).await.expect("old connection ends"), Err(RelayError::Closed(_))));
    let stranger = wg::generate_private_key();
    assert!(matches!(relay(&s, &stranger).await, Err(RelayError::Refused(_))));
    s.shutdown().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let pa = wg::public_key_of(&a.key);
    let short = tailgate::key::ShortKey(pa).to_string();
    let span = format!("relay_conn{{peer={short}}}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("relay:")).collect();
    assert!(lines.iter().any(|l| l.contains(&span) && l.contains("node connected")), "{text}");
    assert!(lines.iter().any(|l| l.contains(&span) && l.contains("replaced")), "{text}");
    let stranger_span = format!("relay_conn{{peer={}}}", tailgate::key::ShortKey(wg::public_key_of(&stranger)));
    assert!(lines.iter().any(|l| l.contains(&stranger_span) && l.contains("refused")), "{text}");
    // Full keys never appear; nodes are named one way.
    assert!(!text.contains(&wg::key_to_base64(&pa)), "{text}");
}
