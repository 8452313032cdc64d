//! The control server's STUN responder (issue 6), on 127.0.0.1: UDP on the
//! same port number as the HTTP listener; answers Binding requests with the
//! requester's address; ignores junk; answers a standard client (coturn's
//! `turnutils_stunclient`, when installed).

use std::process::Command;
use std::time::Duration;

use tailgate::control::{ControlServer, ServerOptions};
use tailgate::dataplane::stun;
use tokio::net::UdpSocket;

async fn start(dir: &std::path::Path) -> ControlServer {
    let mut o = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir);
    o.admin_socket = false;
    ControlServer::start(o).await.expect("server starts")
}

#[tokio::test]
async fn binding_requests_get_the_requesters_address() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let stun_addr = s.stun_addr().expect("STUN bound");
    assert_eq!(stun_addr, s.addr(), "same IP and port number as the HTTP listener");
    for _ in 0..3 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let seen = stun::query(&sock, stun_addr, Duration::from_secs(5)).await.expect("answer");
        assert_eq!(seen, sock.local_addr().unwrap());
    }
    s.shutdown().await;
}

/// `--listen [::]:PORT`: one socket answers IPv6 clients with their IPv6
/// address and IPv4 clients (IPv4-mapped on that socket) with their plain
/// IPv4 address, the one their peers can use.
#[tokio::test]
async fn a_wildcard_listener_answers_both_families() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = ServerOptions::new("[::]:0".parse().unwrap(), dir.path());
    o.admin_socket = false;
    let s = ControlServer::start(o).await.expect("server starts on [::]");
    let port = s.stun_addr().expect("STUN bound").port();
    assert_eq!(port, s.addr().port());
    for (client, server) in [("[::1]:0", "[::1]"), ("127.0.0.1:0", "127.0.0.1")] {
        let sock = UdpSocket::bind(client).await.unwrap();
        let to = format!("{server}:{port}").parse().unwrap();
        let seen = stun::query(&sock, to, Duration::from_secs(5)).await.expect("answer");
        assert_eq!(seen, sock.local_addr().unwrap(), "asked over {server}");
        // The control port itself takes both families too.
        tokio::net::TcpStream::connect(to).await.unwrap_or_else(|e| panic!("TCP to {to}: {e}"));
    }
    s.shutdown().await;
}

#[tokio::test]
async fn junk_is_ignored_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let stun_addr = s.stun_addr().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![0; 19], vec![1, 0, 0, 0, 9, 9, 9, 9], b"GET / HTTP/1.1\r\n\r\n".to_vec()];
    // A Binding *response* and a request with a broken length.
    let txid = stun::new_txid();
    junk.push(stun::answer_binding_request(&stun::encode_binding_request(txid), "1.2.3.4:5".parse().unwrap()).unwrap());
    let mut bad = stun::encode_binding_request(txid);
    bad[3] = 4;
    junk.push(bad);
    for j in &junk {
        sock.send_to(j, stun_addr).await.unwrap();
    }
    let mut buf = [0u8; 1500];
    let quiet = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await;
    assert!(quiet.is_err(), "junk was answered: {quiet:?}");
    let req = stun::encode_binding_request(txid);
    sock.send_to(&req, stun_addr).await.unwrap();
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(from, stun_addr);
    assert_eq!(stun::parse_binding_response(&buf[..n]), Some((txid, sock.local_addr().unwrap())));
    s.shutdown().await;
}

#[tokio::test]
async fn stun_stops_with_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let stun_addr = s.stun_addr().unwrap();
    s.shutdown().await;
    // The port is free again.
    let again = UdpSocket::bind(stun_addr).await;
    assert!(again.is_ok(), "{again:?}");
}

/// coturn's STUN client (Debian package `coturn`), if present.
fn turnutils() -> Option<&'static str> {
    let ok = Command::new("sh").args(["-c", "command -v turnutils_stunclient"]).output().ok()?.status.success();
    ok.then_some("turnutils_stunclient")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_stun_client_reads_our_answer() {
    let Some(bin) = turnutils() else {
        eprintln!("SKIP: turnutils_stunclient not installed (apt-get install coturn)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let port = s.stun_addr().unwrap().port();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout").args(["10", bin, "-p", &port.to_string(), "-L", "127.0.0.1", "127.0.0.1"]).output().expect("runs")
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    // It prints the reflexive address it was told ("UDP reflexive addr: 127.0.0.1:PORT").
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reflexive addr: 127.0.0.1:"), "{text}");
    s.shutdown().await;
}
