//! A tailnet connection cut by a reset must not pass for a complete one:
//! `tailgate nc` (one-shot and through the daemon's local API) exits 0 after
//! the peer's FIN and non-zero after its RST.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{TAILGATE, tempdir};
use tailgate::dataplane::netstack::TcpStream;
use tailgate::dataplane::node::{Node, NodeConfig};
use tailgate::dataplane::wg::{self, PeerConfig};
use tokio::io::AsyncWriteExt;

const PORT: u16 = 7000;
/// Enough that the cut lands mid-transfer, with data still in flight.
const LEN: usize = 4 * 1024 * 1024;

/// The remote end: an in-process node at 100.64.0.2 that serves one
/// connection per call, and a wg-quick config for the `tailgate` side.
struct Remote {
    node: Node,
    listener: tailgate::dataplane::netstack::TcpListener,
    config: String,
    dir: tempfile::TempDir,
}

async fn remote() -> Remote {
    let local_key = wg::generate_private_key();
    let remote_key = wg::generate_private_key();
    let mut c = NodeConfig::new(remote_key.clone(), vec!["100.64.0.2".parse().unwrap()]);
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.peers.push(PeerConfig {
        public_key: wg::public_key_of(&local_key),
        preshared_key: None,
        allowed_ips: vec!["100.64.0.1/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    });
    let node = Node::start(c).await.unwrap();
    let listener = node.listen(PORT).unwrap();
    let dir = tempdir();
    let body = format!(
        "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.1/32\n\n[Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.2/32\nEndpoint = {}\n",
        wg::key_to_base64(local_key.expose_secret()),
        wg::key_to_base64(&wg::public_key_of(&remote_key)),
        node.udp_addr(),
    );
    let config = common::write(dir.path(), "wg.conf", &body);
    Remote { node, listener, config, dir }
}

fn data() -> Vec<u8> {
    (0..LEN).map(|i| (i * 31 % 251) as u8).collect()
}

/// Accept one connection and send `data()`, then FIN or (`reset`) RST.
/// Returns the stream so it outlives the client.
async fn serve_one(listener: &mut tailgate::dataplane::netstack::TcpListener, reset: bool) -> TcpStream {
    let mut s: TcpStream = listener.accept().await.unwrap();
    let d = data();
    if reset {
        // Half the payload, then vanish the way a crashed peer's stack would.
        let _ = s.write_all(&d[..LEN / 2]).await;
        s.abort();
    } else {
        s.write_all(&d).await.unwrap();
        s.shutdown().await.unwrap();
    }
    s
}

/// Run `tailgate nc ARGS` against a remote serving once; returns (status, stdout, stderr).
async fn nc(remote: &mut Remote, args: &str, reset: bool) -> (Option<i32>, Vec<u8>, String) {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec {TAILGATE} nc {args}"))
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // stdin stays open, as under ssh: the remote's end decides.
    let stdin = child.stdin.take();
    let run = async {
        let (out, _stream) = tokio::join!(child.wait_with_output(), serve_one(&mut remote.listener, reset));
        out.unwrap()
    };
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.expect("nc finished");
    drop(stdin);
    (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn check(clean: (Option<i32>, Vec<u8>, String), cut: (Option<i32>, Vec<u8>, String)) {
    assert_eq!(clean.0, Some(0), "a clean transfer exits 0 ({} bytes): {}", clean.1.len(), clean.2);
    assert!(clean.1 == data(), "a clean transfer delivers everything ({} of {LEN} bytes)", clean.1.len());
    assert_ne!(cut.0, Some(0), "a reset transfer must exit non-zero (got {} of {LEN} bytes)", cut.1.len());
    assert!(cut.2.contains("reset"), "the error names the reset: {}", cut.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_nc_exits_nonzero_when_the_peer_resets() {
    let mut r = remote().await;
    let args = format!("--wg-config {} 100.64.0.2 {PORT}", r.config);
    let clean = nc(&mut r, &args, false).await;
    let cut = nc(&mut r, &args, true).await;
    check(clean, cut);
    r.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nc_through_the_daemon_exits_nonzero_when_the_peer_resets() {
    let mut r = remote().await;
    let state = r.dir.path().join("state");
    let mut daemon = tokio::process::Command::new(TAILGATE)
        .args(["up", "--no-ssh", "--wg-config", &r.config, "--state-dir"])
        .arg(&state)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let sock = tailgate::daemon::localapi::socket_path(&state);
    assert!(common::eventually(20, || std::os::unix::net::UnixStream::connect(&sock).is_ok()), "the daemon's local API comes up");
    let args = format!("--state-dir {} 100.64.0.2 {PORT}", state.display());
    let clean = nc(&mut r, &args, false).await;
    let cut = nc(&mut r, &args, true).await;
    daemon.kill().await.unwrap();
    check(clean, cut);
    r.node.shutdown().await;
}
