//! Disco hardening against a real node over UDP (security issue 7): a
//! captured sealed ping replayed from many source ports earns no pongs and
//! no candidates, fresh pings are rate-limited with bounded candidates, and
//! loopback sources are never answered.
//!
//! The nodes run in a namespace of their own with a veth pair
//! (10.77.0.1): loopback endpoints are refused by design, so a test on
//! 127.0.0.1 alone could not show a pong at all.

mod common;
use common::*;
use tailgate::key::{Key, PrivateKey};

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tailgate::dataplane::disco::{self, Message};
use tailgate::dataplane::node::{Node, NodeConfig};
use tailgate::dataplane::path::{MAX_CANDIDATES, PING_RATE};
use tailgate::dataplane::wg::{self, PeerConfig};
use tokio::net::UdpSocket;

const LAN_IP: &str = "10.77.0.1";

/// Runs `f` on a thread that lives in `ns`'s network namespace (the test
/// process itself stays where it is).
fn in_netns<F: std::future::Future<Output = ()>>(ns: &Netns, f: impl FnOnce() -> F + Send + 'static) {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { tokio::time::timeout(Duration::from_secs(60), f()).await.expect("test timed out") });
    })
    .join()
    .expect("test thread panicked");
}

fn peer(key: &PrivateKey, ip: &str) -> PeerConfig {
    PeerConfig {
        public_key: wg::public_key_of(key),
        preshared_key: None,
        allowed_ips: vec![format!("{ip}/32").parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    }
}

async fn node(key: PrivateKey, ip: &str, peer_cfg: PeerConfig) -> Node {
    let mut c = NodeConfig::new(key, vec![ip.parse().unwrap()]);
    c.manage_paths = true;
    c.peers.push(peer_cfg);
    Node::start(c).await.unwrap()
}

async fn recv_disco(s: &UdpSocket, secs: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) if disco::is_disco(&buf[..n]) => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// Whether `d` is a pong from B to A (B also pings addresses it learned;
/// those do not count).
fn is_pong(d: &[u8], ka: &disco::DiscoKey, pb: &Key) -> bool {
    matches!(disco::open(ka, d, |k| k == pb), Some(disco::Opened { msg: Message::Pong { .. }, .. }))
}

async fn recv_pong(s: &UdpSocket, ka: &disco::DiscoKey, pb: &Key) -> bool {
    while let Some(d) = recv_disco(s, 10).await {
        if is_pong(&d, ka, pb) {
            return true;
        }
    }
    false
}

/// Pongs already waiting on `s`.
fn pongs_pending(s: &UdpSocket, ka: &disco::DiscoKey, pb: &Key) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while let Ok((len, _)) = s.try_recv_from(&mut buf) {
        n += usize::from(is_pong(&buf[..len], ka, pb));
    }
    n
}

async fn sockets(n: usize, ip: &str) -> Vec<UdpSocket> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(UdpSocket::bind((ip, 0)).await.unwrap());
    }
    v
}

fn lan_netns() -> Option<Netns> {
    if !is_root() {
        skip("needs root for a network namespace");
        return None;
    }
    let ns = Netns::new("dh");
    ns.exec(&format!("ip link add d0 type veth peer name d1 && ip addr add {LAN_IP}/24 dev d0 && ip link set d0 up && ip link set d1 up"));
    Some(ns)
}

#[test]
fn replayed_ping_from_many_ports_gets_no_pongs_and_no_candidates() {
    let Some(ns) = lan_netns() else { return };
    in_netns(&ns, || async {
        let (ka, kb) = (wg::generate_private_key(), wg::generate_private_key());
        let (pa, pb) = (wg::public_key_of(&ka), wg::public_key_of(&kb));
        let da = disco::DiscoKey::new(ka.clone());
        let a = node(ka.clone(), "100.64.0.1", peer(&kb, "100.64.0.2")).await;
        let b = node(kb.clone(), "100.64.0.2", peer(&ka, "100.64.0.1")).await;
        b.set_peer_endpoints(&pa, &[]);
        let b_at: SocketAddr = format!("{LAN_IP}:{}", b.udp_addr().port()).parse().unwrap();

        // Capture a real sealed ping from A to B: stand where A thinks B is.
        let capture = UdpSocket::bind((LAN_IP, 0)).await.unwrap();
        a.set_peer_endpoints(&pb, &[capture.local_addr().unwrap()]);
        let ping = recv_disco(&capture, 10).await.expect("A pings its candidate for B");

        // The first delivery is genuine and answered (so the test can fail).
        let first = UdpSocket::bind((LAN_IP, 0)).await.unwrap();
        first.send_to(&ping, b_at).await.unwrap();
        assert!(recv_pong(&first, &da, &pb).await, "B pongs a fresh ping");

        // The same bytes from 300 other ports.
        let replayers = sockets(300, LAN_IP).await;
        for s in &replayers {
            s.send_to(&ping, b_at).await.unwrap();
        }
        // A fresh ping after them: once it is answered, B has handled every
        // replay before it (one socket, in order).
        let sentinel = UdpSocket::bind((LAN_IP, 0)).await.unwrap();
        let fresh = disco::seal(&da, &pb, disco::unix_micros() + 1_000_000, &Message::Ping { tx_id: [1; 12] });
        sentinel.send_to(&fresh, b_at).await.unwrap();
        assert!(recv_pong(&sentinel, &da, &pb).await, "B still answers fresh pings");
        let answered: usize = replayers.iter().map(|s| pongs_pending(s, &da, &pb)).sum();
        assert_eq!(answered, 0, "replays were answered");
        let cands = b.peer_candidates(&pa);
        assert_eq!(cands.len(), 2, "only the first source and the sentinel: {cands:?}");
        drop((a, b));
    });
}

#[test]
fn fresh_pings_are_rate_limited_and_candidates_bounded() {
    let Some(ns) = lan_netns() else { return };
    in_netns(&ns, || async {
        let (ka, kb) = (wg::generate_private_key(), wg::generate_private_key());
        let (pa, pb) = (wg::public_key_of(&ka), wg::public_key_of(&kb));
        let da = disco::DiscoKey::new(ka.clone());
        let b = node(kb.clone(), "100.64.0.2", peer(&ka, "100.64.0.1")).await;
        let netmap_ep: SocketAddr = "10.77.0.9:41641".parse().unwrap();
        b.set_peer_endpoints(&pa, &[netmap_ep]);
        let b_at: SocketAddr = format!("{LAN_IP}:{}", b.udp_addr().port()).parse().unwrap();

        // What a misbehaving peer can do: genuinely new pings, many ports.
        let senders = sockets(300, LAN_IP).await;
        let start = Instant::now();
        let mut counter = disco::Counter::default();
        for s in &senders {
            let d = disco::seal(&da, &pb, counter.next(disco::unix_micros()), &Message::Ping { tx_id: [2; 12] });
            s.send_to(&d, b_at).await.unwrap();
        }
        // Loopback sources are never answered, whatever the rate limit says.
        let lo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let d = disco::seal(&da, &pb, counter.next(disco::unix_micros()), &Message::Ping { tx_id: [3; 12] });
        lo.send_to(&d, format!("127.0.0.1:{}", b.udp_addr().port())).await.unwrap();
        // Barrier: wait until the bucket has room again, then one more ping.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let sentinel = UdpSocket::bind((LAN_IP, 0)).await.unwrap();
        let d = disco::seal(&da, &pb, counter.next(disco::unix_micros()), &Message::Ping { tx_id: [4; 12] });
        sentinel.send_to(&d, b_at).await.unwrap();
        assert!(recv_pong(&sentinel, &da, &pb).await, "B answers once the bucket refills");
        let elapsed = start.elapsed().as_secs_f64();

        let answered = senders.iter().map(|s| pongs_pending(s, &da, &pb)).sum::<usize>() as f64;
        let allowed = PING_RATE.1 as f64 + PING_RATE.0 as f64 * elapsed + 1.0;
        assert!(answered <= allowed, "{answered} pongs in {elapsed:.1}s, at most {allowed} allowed");
        assert_eq!(pongs_pending(&lo, &da, &pb), 0, "a loopback source got a pong");
        let cands = b.peer_candidates(&pa);
        assert_eq!(cands.len(), MAX_CANDIDATES, "{cands:?}");
        assert!(cands.contains(&netmap_ep), "the netmap endpoint stays");
        assert!(!cands.iter().any(|c| c.ip().is_loopback()));
        drop(b);
    });
}
