//! Two tailgate nodes in one process on loopback: TCP both ways, concurrency,
//! bulk transfers with content checks, close and reset paths, hostile input.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tailgate::key::Key;

use tailgate::dataplane::node::{Node, NodeConfig};
use tailgate::dataplane::wg::{self, PeerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A_IP: &str = "100.64.0.1";
const B_IP: &str = "100.64.0.2";

struct Pair {
    a: Node,
    b: Node,
    b_key: Key,
}

async fn pair() -> Pair {
    let ka = wg::generate_private_key();
    let kb = wg::generate_private_key();
    let mut ca = NodeConfig::new(ka.clone(), vec![A_IP.parse().unwrap()]);
    ca.listen = "127.0.0.1:0".parse().unwrap();
    let mut cb = NodeConfig::new(kb.clone(), vec![B_IP.parse().unwrap()]);
    cb.listen = "127.0.0.1:0".parse().unwrap();
    // b has no endpoint for a: it learns it from a's authenticated handshake.
    cb.peers.push(PeerConfig {
        public_key: wg::public_key_of(&ka),
        preshared_key: Some(tailgate::key::PresharedKey::from_bytes([7u8; 32])),
        allowed_ips: vec![format!("{A_IP}/32").parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    });
    let b = Node::start(cb).await.unwrap();
    ca.peers.push(PeerConfig {
        public_key: wg::public_key_of(&kb),
        preshared_key: Some(tailgate::key::PresharedKey::from_bytes([7u8; 32])),
        allowed_ips: vec![format!("{B_IP}/32").parse().unwrap()],
        endpoint: Some(b.udp_addr()),
        persistent_keepalive: Some(25),
    });
    let a = Node::start(ca).await.unwrap();
    Pair { a, b, b_key: wg::public_key_of(&kb) }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("test step timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_both_ways_with_identity() {
    let p = pair().await;
    let mut lb = p.b.listen(7000).unwrap();
    let mut la = p.a.listen(7001).unwrap();
    timed(async {
        // a -> b
        let mut c = p.a.connect(addr(B_IP, 7000)).await.unwrap();
        assert_eq!(c.peer_key(), p.b_key);
        let mut s = lb.accept().await.unwrap();
        assert_eq!(s.peer_addr().ip().to_string(), A_IP);
        assert_eq!(s.peer_key(), p.a.public_key(), "accepted stream names the WireGuard peer");
        c.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // b -> a: b learned a's endpoint from the handshake (roaming).
        let mut c2 = p.b.connect(addr(A_IP, 7001)).await.unwrap();
        let mut s2 = la.accept().await.unwrap();
        c2.write_all(b"back").await.unwrap();
        s2.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"back");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_connections_with_content_checked() {
    let p = pair().await;
    let mut lb = p.b.listen(7100).unwrap();
    // Echo server.
    tokio::spawn(async move {
        loop {
            let Ok(mut s) = lb.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        s.shutdown().await.unwrap();
                        return;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
            });
        }
    });
    let a = std::sync::Arc::new(p.a);
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(i, 256 * 1024);
            let c = a.connect(addr(B_IP, 7100)).await.unwrap();
            let (mut rd, mut wr) = tokio::io::split(c);
            let d2 = data.clone();
            let w = tokio::spawn(async move {
                wr.write_all(&d2).await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            let _wr = w.await.unwrap();
            assert_eq!(got.len(), data.len(), "conn {i}");
            assert!(got == data, "conn {i}: content differs");
        }));
    }
    timed(async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_megabyte_transfer_both_directions() {
    let p = pair().await;
    let mut lb = p.b.listen(7200).unwrap();
    let up = pattern(1, 24 * 1024 * 1024);
    let down = pattern(2, 16 * 1024 * 1024);
    let (up2, down2) = (up.clone(), down.clone());
    let server = tokio::spawn(async move {
        let s = lb.accept().await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(s);
        let w = tokio::spawn(async move {
            wr.write_all(&down2).await.unwrap();
            wr.shutdown().await.unwrap();
            wr
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _wr = w.await.unwrap();
        assert!(got == up2, "upload differs ({} bytes)", got.len());
    });
    timed(async {
        let c = p.a.connect(addr(B_IP, 7200)).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(c);
        let w = tokio::spawn(async move {
            wr.write_all(&up).await.unwrap();
            wr.shutdown().await.unwrap();
            wr
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        assert!(got == down, "download differs ({} bytes)", got.len());
        let _wr = w.await.unwrap();
        server.await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reset_and_closed_paths() {
    let p = pair().await;
    timed(async {
        // Nobody listens on 7300: RST -> refused, fast.
        let e = p.a.connect(addr(B_IP, 7300)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        // No route.
        let e = p.a.connect(addr("100.64.0.77", 22)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable, "{e}");

        // Server aborts: the client's writes start failing.
        let mut lb = p.b.listen(7301).unwrap();
        let mut c = p.a.connect(addr(B_IP, 7301)).await.unwrap();
        let mut s = lb.accept().await.unwrap();
        s.abort();
        let mut failed = false;
        for _ in 0..200 {
            if c.write_all(&[0u8; 1024]).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(failed, "writes to a reset connection must fail");

        // Clean close: client shuts down, server reads EOF, then closes too.
        let mut c = p.a.connect(addr(B_IP, 7301)).await.unwrap();
        let mut s = lb.accept().await.unwrap();
        c.write_all(b"bye").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        s.write_all(b"ok").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ok");
        drop((c, s));
    })
    .await;
    // Dropped streams are reclaimed once closed (no leaked sockets): only
    // the spare listening sockets remain.
    let mut ok = false;
    for _ in 0..100 {
        if p.a.status().tcp_sockets == 0 && p.b.status().tcp_sockets <= 2 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "sockets leaked: a={} b={}", p.a.status().tcp_sockets, p.b.status().tcp_sockets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_are_dropped_and_node_keeps_serving() {
    let p = pair().await;
    let mut lb = p.b.listen(7400).unwrap();
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = p.b.udp_addr();
    // Random datagrams and forged WireGuard message types of every size.
    for i in 0..2000u64 {
        let len = (i as usize * 37) % 1600;
        let mut d = pattern(i, len);
        if len >= 4 && i % 2 == 0 {
            d[0] = (i % 4 + 1) as u8;
            d[1..4].fill(0);
        }
        junk.send_to(&d, target).unwrap();
    }
    timed(async {
        let mut c = p.a.connect(addr(B_IP, 7400)).await.unwrap();
        let mut s = lb.accept().await.unwrap();
        c.write_all(b"still here").await.unwrap();
        let mut buf = [0u8; 10];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still here");
    })
    .await;
    assert!(p.b.status().stats.invalid > 1000, "garbage counted: {:?}", p.b.status().stats);
}

/// A `--forward` whose tailnet client resets must reset the local service's
/// connection too, not close it with a FIN that reads as a complete request.
#[tokio::test]
async fn forward_passes_a_tailnet_reset_on_to_the_local_side() {
    let p = pair().await;
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tailgate::daemon::forward::spawn_forward(&p.b, 8080, local.local_addr().unwrap().to_string()).unwrap();
    let mut client = timed(p.a.connect(addr(B_IP, 8080))).await.unwrap();
    let (mut served, _) = timed(local.accept()).await.unwrap();
    client.write_all(b"half a request").await.unwrap();
    let mut got = vec![0u8; 14];
    timed(served.read_exact(&mut got)).await.unwrap();
    client.abort();
    let mut rest = Vec::new();
    let e = timed(served.read_to_end(&mut rest)).await.expect_err("the local side must see the reset, not end of stream");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}
