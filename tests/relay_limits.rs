//! Relay flow control and access checks with a custom-configured
//! [`RelayServer`] plugged into a control server's upgrades (127.0.0.1):
//! per-node rate limit, per-destination queues that drop instead of
//! blocking other nodes, re-authorization of connected nodes, the client's
//! bounded receive queue.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tailgate::control::server::load_or_create_server_key;
use tailgate::control::{ControlServer, ServerOptions, UPGRADE_RELAY};
use tailgate::dataplane::wg;
use tailgate::key::{Key, PrivateKey};
use tailgate::relay::{
    NodeAuthorizer, RelayClient, RelayClientOptions, RelayConfig, RelayError, RelayReceiver, RelaySender, RelayServer, SendError,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const TIMEOUT: Duration = Duration::from_secs(15);

struct Lab {
    _dir: tempfile::TempDir,
    server: ControlServer,
    relay: RelayServer,
    allowed: Arc<Mutex<HashSet<Key>>>,
}

impl Lab {
    async fn new(cfg: RelayConfig) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = load_or_create_server_key(dir.path()).unwrap();
        let allowed: Arc<Mutex<HashSet<Key>>> = Arc::default();
        let a = allowed.clone();
        let auth: Arc<dyn NodeAuthorizer> = Arc::new(move |k: &Key| a.lock().unwrap().contains(k));
        let relay = RelayServer::new(private, cfg, auth);
        let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
        opts.admin_socket = false;
        opts.upgrades.push((UPGRADE_RELAY.into(), Arc::new(relay.clone())));
        let server = ControlServer::start(opts).await.unwrap();
        Lab { _dir: dir, server, relay, allowed }
    }

    /// A new node key the relay allows.
    fn node(&self) -> PrivateKey {
        let k = wg::generate_private_key();
        self.allowed.lock().unwrap().insert(wg::public_key_of(&k));
        k
    }

    async fn connect(&self, k: &PrivateKey) -> (RelaySender, RelayReceiver) {
        self.connect_with(k, RelayClientOptions::default()).await
    }

    async fn connect_with(&self, k: &PrivateKey, opts: RelayClientOptions) -> (RelaySender, RelayReceiver) {
        RelayClient::connect_with(self.server.url(), &self.server.public_key(), k, opts).await.expect("relay accepts")
    }
}

/// Sends, waiting (briefly) while the client's queue is full.
async fn send_paced(tx: &RelaySender, dst: &Key, d: &[u8]) {
    loop {
        match tx.send(dst, d) {
            Ok(()) => return,
            Err(SendError::Full) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_rate_limit_paces_the_sender() {
    let cfg = RelayConfig { rate_bytes_per_sec: 500_000, burst_bytes: 64 * 1024, ..Default::default() };
    let lab = Lab::new(cfg).await;
    let (a, b) = (lab.node(), lab.node());
    let pb = wg::public_key_of(&b);
    let (ta, _ra) = lab.connect(&a).await;
    let (_tb, mut rb) = lab.connect(&b).await;
    let n = 1000usize;
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let mut d = vec![0u8; 1250];
            d[..4].copy_from_slice(&(i as u32).to_be_bytes());
            send_paced(&ta, &pb, &d).await;
        }
        ta
    });
    for i in 0..n {
        let (_, d) = tokio::time::timeout(TIMEOUT, rb.recv()).await.expect("in time").unwrap();
        assert_eq!(d[..4], (i as u32).to_be_bytes(), "in order, none lost");
    }
    let took = t0.elapsed();
    let _ = sender.await;
    // ~1.3 MB on the wire, 64 KiB free, then 500 kB/s: about 2.5 s.
    assert!(took >= Duration::from_millis(1800), "rate limit not applied: {took:?}");
    assert!(took <= Duration::from_secs(10), "far too slow: {took:?}");
    let st = lab.relay.stats();
    assert!(st.rate_limited > 0, "{st:?}");
    assert_eq!(st.dropped_queue_full, 0, "{st:?}");
    lab.server.shutdown().await;
}

/// A stream whose reads can be paused (the node stops reading its socket).
struct Pausable<S> {
    inner: S,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    paused: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    fn set(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused && let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Pausable<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.gate.paused.load(Ordering::SeqCst) {
            *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.gate.paused.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Pausable<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_drops_its_own_traffic_and_blocks_no_one() {
    let cfg = RelayConfig { rate_bytes_per_sec: 0, queue_packets: 64, ..Default::default() };
    let lab = Lab::new(cfg).await;
    let (a, b, c) = (lab.node(), lab.node(), lab.node());
    let (pa, pb, pc) = (wg::public_key_of(&a), wg::public_key_of(&b), wg::public_key_of(&c));
    let (ta, mut ra) = lab.connect(&a).await;
    let gate = Arc::new(Gate::default());
    let tcp = tokio::net::TcpStream::connect(lab.server.addr()).await.unwrap();
    let stream = Pausable { inner: tcp, gate: gate.clone() };
    let (_tb, mut rb) =
        RelayClient::connect_stream(stream, lab.server.url(), &lab.server.public_key(), &b, Default::default()).await.expect("b accepted");
    let (tc, _rc) = lab.connect(&c).await;

    // B stops reading; A floods B until the relay's queue for B overflows.
    gate.set(true);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while lab.relay.stats().dropped_queue_full == 0 {
        assert!(t0.elapsed() < TIMEOUT && sent < 200_000, "no drops after {sent} datagrams: {:?}", lab.relay.stats());
        for _ in 0..256 {
            if ta.send(&pb, &[0x55; 1400]).is_ok() {
                sent += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Meanwhile C reaches A without delay (a burst that fits A's queue).
    let t1 = Instant::now();
    for i in 0..40u32 {
        send_paced(&tc, &pa, &i.to_be_bytes()).await;
    }
    let mut got = 0;
    while got < 40 {
        let (src, d) = tokio::time::timeout(Duration::from_secs(5), ra.recv()).await.expect("C's datagrams are not stuck").unwrap();
        assert_eq!(src, pc);
        assert_eq!(d, (got as u32).to_be_bytes());
        got += 1;
    }
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());

    // B reads again: it drains what was queued (until quiet), then gets
    // new traffic.
    gate.set(false);
    let mut drained = 0;
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), rb.recv()).await {
        r.expect("B's connection survived the stall");
        drained += 1;
    }
    assert!(drained > 0);
    send_paced(&ta, &pb, b"after").await;
    let (src, d) = tokio::time::timeout(TIMEOUT, rb.recv()).await.expect("B works again").unwrap();
    assert_eq!((src, d.as_slice()), (pa, &b"after"[..]));
    let st = lab.relay.stats();
    assert!(st.dropped_queue_full > 0 && st.forwarded_packets > 0, "{st:?}");
    assert_eq!(st.connections, 3);
    lab.server.shutdown().await;
}

#[tokio::test]
async fn connected_nodes_are_reauthorized() {
    let cfg = RelayConfig { reauth_interval: Duration::from_millis(200), ..Default::default() };
    let lab = Lab::new(cfg).await;
    let a = lab.node();
    let (_ta, mut ra) = lab.connect(&a).await;
    assert!(lab.relay.is_connected(&wg::public_key_of(&a)));
    lab.allowed.lock().unwrap().clear();
    match tokio::time::timeout(Duration::from_secs(5), ra.recv()).await.expect("dropped in time") {
        Err(RelayError::Closed(m)) => assert!(m.contains("no longer"), "{m}"),
        other => panic!("{other:?}"),
    }
    match RelayClient::connect(lab.server.url(), &lab.server.public_key(), &a).await {
        Err(RelayError::Refused(_)) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted after revocation"),
    }
    let st = lab.relay.stats();
    assert_eq!((st.connections, st.accepted, st.refused), (0, 1, 1), "{st:?}");
    lab.server.shutdown().await;
}

#[tokio::test]
async fn the_client_drops_what_its_owner_does_not_read() {
    let lab = Lab::new(RelayConfig::default()).await;
    let (a, b) = (lab.node(), lab.node());
    let (ta, _ra) = lab.connect(&a).await;
    let (_tb, mut rb) = lab.connect_with(&b, RelayClientOptions { recv_queue: 8, ..Default::default() }).await;
    let pb = wg::public_key_of(&b);
    for i in 0..100u8 {
        send_paced(&ta, &pb, &[i]).await;
    }
    let t0 = Instant::now();
    while rb.stats().received_packets < 100 {
        assert!(t0.elapsed() < TIMEOUT, "{:?}", rb.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rb.stats().dropped_recv_full, 92);
    for i in 0..8u8 {
        assert_eq!(rb.recv().await.unwrap().1, [i]);
    }
    assert_eq!(rb.try_recv_event().unwrap(), None);
    lab.server.shutdown().await;
}

/// Says yes once (the connection is accepted), then never answers: a hub
/// that is stuck or gone quiet.
struct AnswersOnce(AtomicBool);

impl NodeAuthorizer for AnswersOnce {
    fn allowed<'a>(&'a self, _node: &'a Key) -> futures::future::BoxFuture<'a, bool> {
        let first = !self.0.swap(true, Ordering::SeqCst);
        Box::pin(async move {
            if !first {
                std::future::pending::<()>().await;
            }
            true
        })
    }
}

#[tokio::test]
async fn a_reauthorization_that_never_answers_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (private, _) = load_or_create_server_key(dir.path()).unwrap();
    // Keepalive far beyond the wait below, so only the re-check can end it.
    let cfg = RelayConfig {
        reauth_interval: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(500),
        keepalive: Duration::from_secs(600),
        ..Default::default()
    };
    let relay = RelayServer::new(private, cfg, Arc::new(AnswersOnce(AtomicBool::new(false))));
    let mut opts = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir.path());
    opts.admin_socket = false;
    opts.upgrades.push((UPGRADE_RELAY.into(), Arc::new(relay.clone())));
    let server = ControlServer::start(opts).await.unwrap();
    let a = wg::generate_private_key();
    let (_ta, mut ra) = RelayClient::connect(server.url(), &server.public_key(), &a).await.expect("first check says yes");
    match tokio::time::timeout(TIMEOUT, ra.recv()).await.expect("closed instead of hanging on the authorizer") {
        Err(RelayError::Closed(m)) => assert!(m.contains("did not answer"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!relay.is_connected(&wg::public_key_of(&a)));
    server.shutdown().await;
}
