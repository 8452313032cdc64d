//! The tokio driver of the control server.
//!
//! - One TCP listener speaking just enough HTTP/1.1 to dispatch on the
//!   `Upgrade` header: `tailgate-control` (this module), `tailgate-relay`
//!   (a pluggable [`UpgradeHandler`]; [`crate::relay::RelayServer`] by
//!   default); anything else gets a plain 400/404/426 and is closed.
//! - STUN Binding ([`crate::dataplane::stun`]) on UDP, same IP and port as the listener.
//! - One task per connection: upgrade, Noise IK, then frames. It forwards
//!   node messages to the hub and writes what the hub sends back (coalescing
//!   queued messages into one write). A connection whose outbound queue
//!   overflows is closed (the node reconnects and gets a fresh full map).
//! - The [`Hub`] runs on its own OS thread (SQLite calls are blocking) and
//!   receives every event through one channel, so it needs no locks.
//! - Side tasks: timers (ephemeral cleanup, key expiry), policy file
//!   watcher (mtime poll), admin unix socket.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};

use crate::control::server::hub::{AdminRequest, ConnId, Hub, HubConfig, HubError, Out};
use crate::control::server::oidc::{Oidc, SignedIn};
use crate::control::server::store::{Store, ensure_private_dir};
use crate::control::wire::frame::{DEFAULT_MAX_CLIENT_FRAME, WireDecoder};
use crate::control::wire::http::{self, RequestHead};
use crate::control::wire::noise::{self, ChannelError, SecureChannel};
use crate::control::wire::proto::{ClientMsg, ErrorCode, ServerOut};

pub mod admin;
pub mod audit;
pub mod hub;
pub mod metrics;
pub mod netmap;
pub mod oidc;
mod signin;
pub mod store;
pub mod tls;
pub mod totp;
use crate::control::{CONTROL_PATH, UPGRADE_CONTROL, UPGRADE_RELAY, unix_now};
use crate::daemon::config::write_secret;
use crate::dataplane::wg;
use crate::key::{Key, PrivateKey, ShortKey};
use secrecy::ExposeSecret;

/// A byte stream the server can serve (TCP, or in-memory in tests).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Handles another protocol upgraded on the same port (the relay). It gets
/// the stream right after the request head (it writes its own 101), the
/// head, any bytes that came after the head, and the connection's
/// [`PreAuthPermit`], to drop once the peer has authenticated.
pub trait UpgradeHandler: Send + Sync {
    fn handle(&self, stream: Box<dyn Stream>, head: RequestHead, leftover: Vec<u8>, permit: PreAuthPermit) -> BoxFuture<'static, ()>;
}

/// Counts connections that have not authenticated yet, in total and per
/// source address. Until a peer has proven a node key it costs the server a
/// task, buffers and a handshake timer for nothing, so that is what gets a
/// cap; authenticated connections are bounded by the number of nodes.
pub struct PreAuthLimits {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl PreAuthLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<PreAuthLimits> {
        Arc::new(PreAuthLimits { max_total, max_per_ip, state: Mutex::new((0, HashMap::new())) })
    }

    /// A permit for one more unauthenticated connection from `ip` (`None`:
    /// in-memory streams, counted in the total only), or `None` if a cap
    /// is reached.
    pub fn try_acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<PreAuthPermit> {
        // Nothing panics under this lock; recovering keeps the counts usable.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 >= self.max_total {
            return None;
        }
        if let Some(ip) = ip {
            let n = st.1.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return None;
            }
            *n += 1;
        }
        st.0 += 1;
        Some(PreAuthPermit { limits: Some(self.clone()), ip })
    }

    /// Unauthenticated connections right now.
    pub fn current(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn release(&self, ip: Option<IpAddr>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = st.0.saturating_sub(1);
        if let Some(ip) = ip
            && let Some(n) = st.1.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.1.remove(&ip);
            }
        }
    }
}

/// One unauthenticated connection's slot; freed when dropped.
pub struct PreAuthPermit {
    limits: Option<Arc<PreAuthLimits>>,
    ip: Option<IpAddr>,
}

impl PreAuthPermit {
    /// A permit that counts nowhere (handlers driven outside a server).
    pub fn none() -> PreAuthPermit {
        PreAuthPermit { limits: None, ip: None }
    }
}

impl Drop for PreAuthPermit {
    fn drop(&mut self) {
        if let Some(l) = self.limits.take() {
            l.release(self.ip);
        }
    }
}

#[derive(Clone)]
pub struct ServerOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Policy file, validated and hot-reloaded. `None`: the last policy set
    /// with `policy set`, or the built-in default.
    pub policy_file: Option<PathBuf>,
    /// Public URL put in auth keys; default `http://<listen address>` (the
    /// host name when listening on all addresses).
    pub url: Option<String>,
    pub domain: String,
    pub node_key_expiry: Duration,
    pub ephemeral_grace: Duration,
    pub default_auth_key_expiry: Duration,
    pub keepalive: Duration,
    pub policy_poll: Duration,
    /// Period of the ephemeral/expiry timer.
    pub tick: Duration,
    /// Limit on head, handshake and first message.
    pub handshake_timeout: Duration,
    pub admin_socket: bool,
    pub max_client_frame: usize,
    /// Messages queued per connection before it is considered stuck.
    pub outbound_queue: usize,
    /// Other `Upgrade:` protocols on this port (e.g. `tailgate-relay`).
    pub upgrades: Vec<(String, Arc<dyn UpgradeHandler>)>,
    /// Connections not authenticated yet (request head, Noise, first
    /// message): at most this many in total and from one IP address; more
    /// are closed as soon as they are accepted.
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_ip: usize,
    /// Commands queued for the hub thread before connection tasks wait
    /// (backpressure: a flooding node's reads stall, not the server's memory).
    pub hub_queue: usize,
    /// Endpoint reports applied at once per node, then one per interval.
    pub endpoint_burst: u32,
    pub endpoint_interval: Duration,
    /// TLS on the listener (`None`: plain HTTP, Noise inside either way).
    pub tls: Option<crate::control::server::tls::TlsSource>,
    /// A second listener serving only `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Sign-in with an OpenID Connect provider (`--oidc-*`); `None`: auth keys only.
    pub oidc: Option<crate::control::server::oidc::OidcConfig>,
    /// Shipped audit events and recordings older than this are deleted.
    pub retention: Option<Duration>,
    /// Limits of the built-in relay (`--relay-rate`).
    pub relay: crate::relay::RelayConfig,
}

impl ServerOptions {
    pub fn new(listen: SocketAddr, state_dir: impl Into<PathBuf>) -> ServerOptions {
        ServerOptions {
            listen,
            state_dir: state_dir.into(),
            policy_file: None,
            url: None,
            domain: crate::control::DEFAULT_DOMAIN.into(),
            node_key_expiry: Duration::from_secs(180 * 86400),
            ephemeral_grace: Duration::from_secs(30),
            default_auth_key_expiry: Duration::from_secs(7 * 86400),
            keepalive: Duration::from_secs(30),
            policy_poll: Duration::from_secs(1),
            tick: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            admin_socket: true,
            max_client_frame: DEFAULT_MAX_CLIENT_FRAME,
            outbound_queue: 1024,
            upgrades: Vec::new(),
            max_unauthenticated: 2048,
            max_unauthenticated_per_ip: 128,
            hub_queue: 4096,
            endpoint_burst: 4,
            endpoint_interval: Duration::from_secs(2),
            tls: None,
            metrics_listen: None,
            oidc: None,
            retention: None,
            relay: Default::default(),
        }
    }
}

/// Path of the admin socket in a state directory.
pub fn admin_socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Loads `state_dir/server.key`, creating it (0600) on first start.
/// Returns (private key, created).
pub fn load_or_create_server_key(state_dir: &Path) -> Result<(PrivateKey, bool)> {
    let path = state_dir.join("server.key");
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok((PrivateKey::from_base64(&s).with_context(|| format!("{} is not a valid key", path.display()))?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = wg::generate_private_key();
            write_secret(&path, format!("{}\n", k.to_base64().expose_secret()).as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((k, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// An exclusive lock on the state directory, held while a server runs.
pub(crate) struct DirLock(#[allow(dead_code)] std::fs::File);

pub(crate) fn lock_state_dir(dir: &Path) -> Result<DirLock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("control.lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&path)?;
    // SAFETY: flock on a valid fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!("another tailgate control server is running with state directory {}", dir.display());
    }
    Ok(DirLock(f))
}

/// Is a server holding the state directory's lock?
pub fn server_running(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(dir.join("control.lock")) else { return false };
    // SAFETY: flock on a valid fd we own; released when `f` drops.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    r != 0
}

enum Outbound {
    Msg(ServerOut),
    Close(String),
}

type ConnTx = mpsc::Sender<Outbound>;

enum HubCmd {
    Hello { conn: ConnId, node_key: Key, msg: ClientMsg, tx: ConnTx, reply: oneshot::Sender<Option<i64>> },
    Msg { conn: ConnId, node: i64, msg: ClientMsg },
    Disconnected { conn: ConnId, node: i64 },
    Admin { req: AdminRequest, reply: oneshot::Sender<Result<Value, HubError>> },
    RelayAllowed { key: Key, reply: oneshot::Sender<bool> },
    SignedIn { conn: ConnId, node_key: Key, hello: signin::Hello, who: SignedIn, tx: ConnTx, reply: oneshot::Sender<Option<i64>> },
    PolicyFile { text: String, name: String },
    Tick,
    Shutdown,
}

struct Shared {
    hub: mpsc::Sender<HubCmd>,
    metrics: Arc<crate::control::server::metrics::ControlMetrics>,
    relay: Option<Arc<crate::relay::RelayServer>>,
    oidc: Option<Arc<Oidc>>,
    preauth: Arc<PreAuthLimits>,
    private: PrivateKey,
    opts: ServerOptions,
    next_conn: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// Stores what nodes ship (audit events, recordings), off the hub thread.
    ingest: crate::control::server::audit::ingest::Ingest,
}

/// A running control server (in-process handle).
pub struct ControlServer {
    addr: SocketAddr,
    public: Key,
    url: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    hub_thread: Option<std::thread::JoinHandle<()>>,
    created_key: bool,
    state_dir: PathBuf,
    stun_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    _lock: DirLock,
}

fn default_url(listen: SocketAddr, tls: Option<&crate::control::server::tls::TlsSource>) -> String {
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some(crate::control::server::tls::TlsSource::Acme(a)) = tls {
        // The certificate names only this domain.
        return if listen.port() == 443 { format!("https://{}", a.domain) } else { format!("https://{}:{}", a.domain, listen.port()) };
    }
    let host = if listen.ip().is_unspecified() {
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
    } else if listen.is_ipv6() {
        format!("[{}]", listen.ip())
    } else {
        listen.ip().to_string()
    };
    format!("{scheme}://{host}:{}", listen.port())
}

fn read_policy_file(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading policy file {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

impl ControlServer {
    /// Opens the state, binds, and starts serving.
    pub async fn start(opts: ServerOptions) -> Result<ControlServer> {
        ensure_private_dir(&opts.state_dir)?;
        let lock = lock_state_dir(&opts.state_dir)?;
        let (private, created_key) = load_or_create_server_key(&opts.state_dir)?;
        let public = wg::public_key_of(&private);
        // A wildcard listen address takes IPv4 and IPv6 clients on one socket.
        let listener = crate::dataplane::dualstack::tcp_listener(opts.listen).with_context(|| format!("listening on {}", opts.listen))?;
        let addr = listener.local_addr()?;
        // STUN (issue 6): UDP on the same IP and port number.
        let stun = match crate::dataplane::stun::StunServer::bind(addr).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("control: no STUN on udp {addr}: {e}");
                None
            }
        };
        let stun_addr = stun.as_ref().and_then(|s| s.local_addr().ok());
        let url = opts.url.clone().unwrap_or_else(|| default_url(addr, opts.tls.as_ref()));
        crate::control::wire::token::parse_url(&url).map_err(|e| anyhow!(e))?;
        let oidc = match opts.oidc.clone() {
            Some(cfg) => {
                let u = url.clone();
                let o = tokio::task::spawn_blocking(move || Oidc::discover(cfg, &u)).await??;
                tracing::info!("sign-in with {} enabled; redirect URL {}", o.issuer(), o.redirect_url());
                Some(Arc::new(o))
            }
            None => None,
        };

        let mut cfg = HubConfig::new(&url, public);
        cfg.domain = opts.domain.clone();
        cfg.node_key_expiry = opts.node_key_expiry;
        cfg.ephemeral_grace = opts.ephemeral_grace;
        cfg.keepalive = opts.keepalive;
        cfg.default_auth_key_expiry = opts.default_auth_key_expiry;
        cfg.endpoint_burst = opts.endpoint_burst;
        cfg.endpoint_interval = opts.endpoint_interval;
        let policy = match &opts.policy_file {
            Some(p) => Some(read_policy_file(p)?),
            None => None,
        };
        let store = Store::open_dir(&opts.state_dir)?;
        let hub = Hub::open(store, cfg, policy, unix_now())?;

        // After Hub::open: the store has run the migrations.
        let (ingest, _ingest_thread) = crate::control::server::audit::ingest::start(&opts.state_dir)?;
        let (hub_tx, hub_rx) = mpsc::channel(opts.hub_queue.max(1));
        let metrics = Arc::new(crate::control::server::metrics::ControlMetrics::default());
        let hub_metrics = metrics.clone();
        let hub_thread = std::thread::Builder::new().name("control-hub".into()).spawn(move || hub_loop(hub, hub_rx, hub_metrics))?;
        let (stop, shutdown) = watch::channel(false);
        let tls = match &opts.tls {
            Some(src) => Some(crate::control::server::tls::TlsAcceptor::start(src, &opts.state_dir, shutdown.clone())?),
            None => None,
        };
        // The relay (issue 6) on this port, unless the caller brought one.
        let mut opts = opts;
        let mut relay_handle = None;
        if !opts.upgrades.iter().any(|(t, _)| t == UPGRADE_RELAY) {
            let relay = Arc::new(
                crate::relay::RelayServer::new(private.clone(), opts.relay.clone(), relay_auth(&hub_tx)).with_shutdown(shutdown.clone()),
            );
            relay_handle = Some(relay.clone());
            opts.upgrades.push((UPGRADE_RELAY.into(), relay));
        }
        let preauth = PreAuthLimits::new(opts.max_unauthenticated, opts.max_unauthenticated_per_ip);
        let shared = Arc::new(Shared {
            hub: hub_tx,
            metrics,
            relay: relay_handle,
            oidc,
            ingest,
            preauth,
            private,
            opts: opts.clone(),
            next_conn: AtomicU64::new(1),
            shutdown,
        });

        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(accept_loop(listener, tls, shared.clone())));
        tasks.push(tokio::spawn(tick_loop(shared.clone())));
        if let Some(r) = opts.retention {
            tasks.push(tokio::spawn(crate::control::server::audit::ingest::retention_loop(shared.ingest.clone(), r)));
        }
        if let Some(s) = stun {
            tasks.push(tokio::spawn(s.run()));
        }
        if let Some(p) = opts.policy_file.clone() {
            tasks.push(tokio::spawn(policy_watch(p, shared.clone())));
        }
        let mut metrics_addr = None;
        if let Some(addr) = opts.metrics_listen {
            let (bound, task) = crate::daemon::metrics::listen(addr, metrics_render(&shared)).await?;
            tracing::info!("control metrics at http://{bound}/metrics");
            metrics_addr = Some(bound);
            tasks.push(task);
        }
        if opts.admin_socket {
            let path = admin_socket_path(&opts.state_dir);
            let _ = std::fs::remove_file(&path); // stale: we hold the lock
            let l = UnixListener::bind(&path).with_context(|| format!("binding admin socket {}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            tasks.push(tokio::spawn(admin_loop(l, shared.clone())));
        }
        tracing::info!("control server on {addr}, url {url}, key {}", wg::key_to_base64(&public));
        Ok(ControlServer {
            addr,
            public,
            url,
            shared,
            stop,
            tasks,
            hub_thread: Some(hub_thread),
            created_key,
            state_dir: opts.state_dir.clone(),
            stun_addr,
            metrics_addr,
            _lock: lock,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn public_key(&self) -> Key {
        self.public
    }

    /// UDP address of the STUN responder (same IP and port as [`addr`](Self::addr));
    /// `None` if that UDP port could not be bound.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where `/metrics` is served (`--metrics-listen`), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// (issuer, redirect URL to register there) when sign-in is enabled.
    pub fn oidc(&self) -> Option<(String, String)> {
        self.shared.oidc.as_ref().map(|o| (o.issuer().to_string(), o.redirect_url()))
    }

    /// Was the server key created by this start?
    pub fn created_key(&self) -> bool {
        self.created_key
    }

    /// Runs an admin operation in-process (what the admin socket does).
    pub async fn admin(&self, req: AdminRequest) -> Result<Value, HubError> {
        admin_call(&self.shared, req).await
    }

    /// Serves one already-connected stream (in-memory transports, tests).
    /// It counts against the total cap on unauthenticated connections.
    pub fn serve_stream<S: Stream>(&self, stream: S) {
        let shared = self.shared.clone();
        let Some(permit) = shared.preauth.try_acquire(None) else {
            tracing::warn!("control: too many unauthenticated connections; dropping an in-memory one");
            return;
        };
        tokio::spawn(async move { handle_conn(stream, "in-memory".into(), shared, permit).await });
    }

    /// Connections accepted that have not authenticated yet.
    pub fn unauthenticated_connections(&self) -> usize {
        self.shared.preauth.current()
    }

    /// Stops listening, closes every connection, stops the hub, removes the
    /// admin socket and releases the state directory.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        let _ = self.shared.hub.send(HubCmd::Shutdown).await;
        if let Some(h) = self.hub_thread.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        let _ = std::fs::remove_file(admin_socket_path(&self.state_dir));
        // Give connection tasks a moment to see the stop signal.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.shared.hub.try_send(HubCmd::Shutdown);
    }
}

/// `tailgate control` (serve): runs until Ctrl-C / SIGTERM.
pub async fn run_server(opts: ServerOptions) -> Result<()> {
    let server = ControlServer::start(opts.clone()).await?;
    if server.created_key() {
        println!("tailgate control: created a new server key in {}", opts.state_dir.join("server.key").display());
    }
    println!("tailgate control: listening on {}", server.addr());
    println!("  URL:               {}", server.url());
    if let Some(a) = server.stun_addr() {
        println!("  STUN:              udp {a} (relay: same port, Upgrade: {UPGRADE_RELAY})");
    }
    println!("  server public key: {}", wg::key_to_base64(&server.public_key()));
    println!("  state directory:   {}", opts.state_dir.display());
    if let Some(a) = server.metrics_addr() {
        println!("  metrics:           http://{a}/metrics");
    }
    if let Some((issuer, redirect)) = server.oidc() {
        println!("  sign-in:           {issuer} (redirect URL to register there: {redirect})");
    }
    match &opts.policy_file {
        Some(p) => println!("  policy:            {} (reloaded when it changes)", p.display()),
        None => println!("  policy:            stored (`tailgate control policy set FILE`), or the built-in default"),
    }
    println!("Create an auth key: tailgate control keys create --state-dir {} --user NAME", opts.state_dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("tailgate control: shutting down");
    server.shutdown().await;
    Ok(())
}

/// One scrape: the hub's status (asked like an admin request) and the counters.
fn metrics_render(shared: &Arc<Shared>) -> crate::daemon::metrics::Render {
    let weak = Arc::downgrade(shared);
    Arc::new(move || {
        let weak = weak.clone();
        Box::pin(async move {
            let Some(shared) = weak.upgrade() else { return String::new() };
            let status = admin_call(&shared, AdminRequest::Status).await.unwrap_or(Value::Null);
            shared.metrics.render(&status, shared.relay.as_ref().map(|r| r.stats()), shared.preauth.current())
        })
    })
}

/// Relay access: a node key the hub knows and whose key has not expired,
/// asked of the hub as one typed lookup per check.
struct HubRelayAuth {
    hub: mpsc::WeakSender<HubCmd>,
}

impl crate::relay::NodeAuthorizer for HubRelayAuth {
    fn allowed<'a>(&'a self, node: &'a Key) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(hub) = self.hub.upgrade() else { return false };
            let (reply, rx) = oneshot::channel();
            if hub.send(HubCmd::RelayAllowed { key: *node, reply }).await.is_err() {
                return false;
            }
            drop(hub);
            rx.await.unwrap_or(false)
        })
    }
}

fn relay_auth(hub: &mpsc::Sender<HubCmd>) -> Arc<dyn crate::relay::NodeAuthorizer> {
    Arc::new(HubRelayAuth { hub: hub.downgrade() })
}

// --- hub thread ---------------------------------------------------------------

fn hub_loop(mut hub: Hub, mut rx: mpsc::Receiver<HubCmd>, metrics: Arc<crate::control::server::metrics::ControlMetrics>) {
    use crate::control::server::metrics::inc;
    let mut conns: HashMap<ConnId, ConnTx> = HashMap::new();
    while let Some(cmd) = rx.blocking_recv() {
        let now = unix_now();
        match cmd {
            HubCmd::Hello { conn, node_key, msg, tx, reply } => {
                conns.insert(conn, tx);
                let register = matches!(msg, ClientMsg::Register { .. });
                let r = hub.hello(conn, node_key, msg, now);
                match &r {
                    Err(HubError { message: m, .. }) => {
                        inc(&metrics.hellos_refused);
                        tracing::info!(peer = %ShortKey(node_key), "control: refused node: {m}");
                    }
                    Ok(_) if register => inc(&metrics.registrations),
                    Ok(_) => inc(&metrics.logins),
                }
                let _ = reply.send(r.ok());
            }
            HubCmd::SignedIn { conn, node_key, hello, who, tx, reply } => {
                conns.insert(conn, tx);
                let r = hub.hello_signed_in(conn, node_key, &hello.hostname, hello.ssh_host_key, hello.endpoints, &who, now);
                if let Err(HubError { message: m, .. }) = &r {
                    tracing::info!(peer = %ShortKey(node_key), "control: refused signed-in node: {m}");
                }
                let _ = reply.send(r.ok());
            }
            HubCmd::Msg { conn, node, msg } => hub.client_msg(conn, node, msg, now),
            HubCmd::Disconnected { conn, node } => {
                conns.remove(&conn);
                hub.disconnected(conn, node, now);
            }
            HubCmd::Admin { req, reply } => {
                let _ = reply.send(hub.admin(req, now));
            }
            HubCmd::RelayAllowed { key, reply } => {
                let _ = reply.send(hub.relay_allowed(&key, now));
            }
            HubCmd::PolicyFile { text, name } => match (inc(&metrics.policy_reloads), hub.set_policy(&text, &name, "file", now)).1 {
                Ok(v) => tracing::info!("policy file {name}: version {v} in force"),
                Err(e) => tracing::error!("policy file {name}: {e}"),
            },
            HubCmd::Tick => hub.tick(now, Instant::now()),
            HubCmd::Shutdown => break,
        }
        for o in hub.take_outputs() {
            dispatch(&mut conns, o);
        }
    }
    // Dropping every sender ends the connection tasks' loops.
    conns.clear();
}

fn dispatch(conns: &mut HashMap<ConnId, ConnTx>, o: Out) {
    match o {
        Out::Send(c, msg) => {
            let Some(tx) = conns.get(&c) else { return };
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Outbound::Msg(msg)) {
                tracing::warn!("control: connection {c} is not reading its updates; closing it (it will reconnect)");
                conns.remove(&c); // dropping the sender closes it
            }
        }
        Out::Close(c, reason) => {
            if let Some(tx) = conns.remove(&c) {
                let _ = tx.try_send(Outbound::Close(reason));
            }
        }
    }
}

async fn admin_call(shared: &Shared, req: AdminRequest) -> Result<Value, HubError> {
    let down = || HubError::new(ErrorCode::Internal, "the control server is shutting down; try again once it is back");
    let (tx, rx) = oneshot::channel();
    shared.hub.send(HubCmd::Admin { req, reply: tx }).await.map_err(|_| down())?;
    rx.await.map_err(|_| down())?
}

// --- side tasks -----------------------------------------------------------------

async fn accept_loop(listener: TcpListener, tls: Option<crate::control::server::tls::TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                // One per-IP budget for an IPv4 client, mapped or not.
                let peer = crate::dataplane::dualstack::normalize(peer);
                // Over a cap: close at once (dropping the socket), before
                // spending a task or a buffer on it.
                let Some(permit) = shared.preauth.try_acquire(Some(peer.ip())) else {
                    crate::control::server::metrics::inc(&shared.metrics.rejected_cap);
                    tracing::debug!("control: {peer}: too many unauthenticated connections; closed");
                    continue;
                };
                let _ = s.set_nodelay(true);
                let shared = shared.clone();
                let Some(tls) = tls.clone() else {
                    tokio::spawn(async move { handle_conn(s, peer.to_string(), shared, permit).await });
                    continue;
                };
                // The handshake is part of the unauthenticated phase: same
                // permit, same time limit as the request head.
                tokio::spawn(async move {
                    match tokio::time::timeout(shared.opts.handshake_timeout, tls.accept(s)).await {
                        Ok(Ok(Some(s))) => handle_conn(s, peer.to_string(), shared, permit).await,
                        Ok(Ok(None)) => tracing::debug!("control: {peer}: answered an ACME validation"),
                        Ok(Err(e)) => {
                            crate::control::server::metrics::inc(&shared.metrics.rejected_tls);
                            tracing::debug!("control: {peer}: TLS handshake failed: {e}")
                        }
                        Err(_) => {
                            crate::control::server::metrics::inc(&shared.metrics.rejected_tls);
                            tracing::debug!("control: {peer}: no TLS handshake within the time limit")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let mut iv = tokio::time::interval(shared.opts.tick);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        // A busy hub skips a tick rather than queueing them up.
        if let Err(mpsc::error::TrySendError::Closed(_)) = shared.hub.try_send(HubCmd::Tick) {
            return;
        }
    }
}

async fn policy_watch(path: PathBuf, shared: Arc<Shared>) {
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    let mut last = stamp(&path);
    let mut iv = tokio::time::interval(shared.opts.policy_poll);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match read_policy_file(&path) {
            Ok((text, name)) => {
                if shared.hub.send(HubCmd::PolicyFile { text, name }).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("policy file: {e:#}; the policy in force stays"),
        }
    }
}

async fn admin_loop(l: UnixListener, shared: Arc<Shared>) {
    loop {
        let Ok((s, _)) = l.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // Fleet-audit requests (tagged `audit_op`) are reads answered
                // from their own connection, not by the hub thread.
                let resp = if let Ok(req) = serde_json::from_str::<crate::control::server::audit::AuditRequest>(&line) {
                    let dir = shared.opts.state_dir.clone();
                    tokio::task::spawn_blocking(move || crate::control::server::audit::handle(&dir, &req))
                        .await
                        .unwrap_or_else(|_| Err("audit query failed".into()))
                } else {
                    match serde_json::from_str::<AdminRequest>(&line) {
                        Ok(req) => admin_call(&shared, req).await.map_err(|e| e.message),
                        Err(e) => Err(format!("bad admin request: {e}")),
                    }
                };
                let v = match resp {
                    Ok(v) => serde_json::json!({"ok": true, "result": v}),
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                };
                let mut out = serde_json::to_vec(&v).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

// --- connections ---------------------------------------------------------------

async fn write_and_close<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
    })
    .await;
}

async fn handle_conn<S: Stream>(mut s: S, peer: String, shared: Arc<Shared>, permit: PreAuthPermit) {
    let timeout = shared.opts.handshake_timeout;
    // 1. HTTP request head.
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 1024];
        loop {
            match http::parse_request(&buf) {
                Ok(Some(x)) => return Ok(x),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err("connection closed before a request".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let (head, used) = match head {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            crate::control::server::metrics::inc(&shared.metrics.rejected_request);
            tracing::debug!("control: {peer}: bad request: {e}");
            write_and_close(&mut s, &http::simple_response(400, "Bad Request", "bad request\n")).await;
            return;
        }
        Err(_) => {
            tracing::debug!("control: {peer}: no request within {timeout:?}");
            return;
        }
    };
    let leftover = buf[used..].to_vec();
    let upgrade = head.upgrade();
    match (head.method.as_str(), head.path.as_str(), upgrade.as_deref()) {
        ("GET", p, Some(UPGRADE_CONTROL)) if p == CONTROL_PATH => {
            if s.write_all(&http::switching_protocols(UPGRADE_CONTROL)).await.is_err() {
                return;
            }
            if let Err(reason) = control_session(s, leftover, &peer, &shared, permit).await {
                tracing::info!("control: {peer}: connection closed: {reason}");
            }
        }
        (_, _, Some(token)) if token == UPGRADE_RELAY || shared.opts.upgrades.iter().any(|(t, _)| t == token) => {
            match shared.opts.upgrades.iter().find(|(t, _)| t == token) {
                Some((_, h)) => h.handle(Box::new(s), head, leftover, permit).await,
                None => write_and_close(&mut s, &http::simple_response(501, "Not Implemented", "relay not enabled on this server\n")).await,
            }
        }
        ("GET", "/tailgate/health", None) => write_and_close(&mut s, &http::simple_response(200, "OK", "ok\n")).await,
        ("GET", "/tailgate/key", None) => {
            let key = format!("{}\n", wg::key_to_base64(&wg::public_key_of(&shared.private)));
            write_and_close(&mut s, &http::simple_response(200, "OK", &key)).await
        }
        ("GET", p, None) if p.starts_with("/oidc/") => {
            let resp = signin::http(p, &shared).await;
            write_and_close(&mut s, &resp).await
        }
        (_, p, None) if p == CONTROL_PATH => {
            write_and_close(
                &mut s,
                &http::simple_response(426, "Upgrade Required", "this is the tailgate control endpoint; use `tailgate up`\n"),
            )
            .await
        }
        _ => write_and_close(&mut s, &http::simple_response(404, "Not Found", "not found\n")).await,
    }
}

fn seal(chan: &mut SecureChannel, msg: &ServerOut, out: &mut Vec<u8>) -> Result<(), String> {
    let json = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    chan.seal_frame(&json, out).map_err(|e| e.to_string())
}

/// Read the first Noise message after an upgrade (control and relay alike),
/// within `timeout`.
pub(crate) async fn read_handshake_message<R: AsyncRead + Unpin>(
    r: &mut R,
    wire: &mut WireDecoder,
    rbuf: &mut [u8],
    timeout: Duration,
) -> Result<bytes::BytesMut, String> {
    tokio::time::timeout(timeout, async {
        loop {
            if let Some(m) = wire.next_message().map_err(|e| e.to_string())? {
                return Ok::<_, String>(m);
            }
            match r.read(rbuf).await {
                Ok(0) | Err(_) => return Err("closed during the handshake".into()),
                Ok(n) => wire.push(&rbuf[..n]),
            }
        }
    })
    .await
    .map_err(|_| "handshake timed out".to_string())?
}

/// After the 101: handshake, first message, then the message loop.
/// Returns why the connection ended.
async fn control_session<S: Stream>(
    s: S,
    leftover: Vec<u8>,
    peer: &str,
    shared: &Arc<Shared>,
    permit: PreAuthPermit,
) -> Result<(), String> {
    let timeout = shared.opts.handshake_timeout;
    let (mut r, mut w) = tokio::io::split(s);
    // Nodes send small messages; keep per-connection memory small.
    let mut rbuf = vec![0u8; 4096];
    let mut wire = WireDecoder::new();
    wire.push(&leftover);
    // 2. Noise IK message 1.
    let msg1 = read_handshake_message(&mut r, &mut wire, &mut rbuf, timeout).await?;
    let (mut chan, node_key, msg2) =
        noise::respond(&shared.private, &msg1, wire, shared.opts.max_client_frame).map_err(|e| e.to_string())?;
    w.write_all(&msg2).await.map_err(|e| e.to_string())?;
    let who = format!("{peer} (node {})", ShortKey(node_key));

    // 3. First message: register or login.
    let first = tokio::time::timeout(timeout, async {
        loop {
            match chan.next_frame() {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
            match r.read(&mut rbuf).await {
                Ok(0) | Err(_) => return Err(ChannelError::Handshake("closed before logging in".into())),
                Ok(n) => chan.push_wire(&rbuf[..n])?,
            }
        }
    })
    .await
    .map_err(|_| format!("{who}: no login within {timeout:?}"))?;
    let first = match first.and_then(|f| parse_client(&f).map_err(ChannelError::Handshake)) {
        Ok(m) => m,
        Err(e) => {
            let mut out = Vec::new();
            let _ = seal(&mut chan, &ServerOut::Error { code: ErrorCode::Protocol, message: e.to_string() }, &mut out);
            let _ = w.write_all(&out).await;
            let _ = w.shutdown().await;
            return Err(format!("{who}: {e}"));
        }
    };
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(shared.opts.outbound_queue);
    let (rtx, rrx) = oneshot::channel();
    let acks = tx.clone();
    let cmd = match signin::needs_sign_in(&first, &node_key, shared).await {
        Some(hello) => match signin::wait(&mut r, &mut w, &mut chan, &mut rbuf, &who, shared).await {
            Ok(who) => HubCmd::SignedIn { conn, node_key, hello, who, tx, reply: rtx },
            Err(e) => {
                let mut out = Vec::new();
                let _ = seal(&mut chan, &ServerOut::Error { code: ErrorCode::SignIn, message: e.clone() }, &mut out);
                let _ = w.write_all(&out).await;
                let _ = w.shutdown().await;
                return Err(format!("{who}: sign-in: {e}"));
            }
        },
        None => HubCmd::Hello { conn, node_key, msg: first, tx, reply: rtx },
    };
    shared.hub.send(cmd).await.map_err(|_| "server shutting down".to_string())?;
    let node = rrx.await.map_err(|_| "server shutting down".to_string())?;
    // Authenticated (or refused and about to close): no longer counted.
    drop(permit);

    // 4. Message loop.
    // Every line the session logs carries the connection and the peer.
    let span = tracing::info_span!("control_conn", conn, peer = %ShortKey(node_key));
    let result =
        tracing::Instrument::instrument(session_loop(&mut r, &mut w, &mut chan, &mut rx, &mut rbuf, conn, node, &who, shared, &acks), span)
            .await;
    drop(acks);
    if let Some(node) = node {
        let _ = shared.hub.send(HubCmd::Disconnected { conn, node }).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn session_loop<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    chan: &mut SecureChannel,
    rx: &mut mpsc::Receiver<Outbound>,
    rbuf: &mut [u8],
    conn: ConnId,
    node: Option<i64>,
    who: &str,
    shared: &Arc<Shared>,
    acks: &ConnTx,
) -> Result<(), String> {
    let keepalive = shared.opts.keepalive;
    let idle_limit = keepalive * 3 + Duration::from_secs(5);
    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let mut last_rx = tokio::time::Instant::now();
    let mut shutdown = shared.shutdown.clone();
    let mut out = Vec::new();
    // Frames that came in with the first message.
    if let Err(e) = drain_frames(chan, conn, node, shared, acks).await {
        let _ = seal(chan, &ServerOut::Error { code: ErrorCode::Protocol, message: e.clone() }, &mut out);
        let _ = w.write_all(&out).await;
        let _ = w.shutdown().await;
        return Err(format!("{who}: {e}"));
    }
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Err("server shutting down".into()),
            m = rx.recv() => {
                let mut closing = None;
                let mut next = m;
                out.clear();
                // Coalesce whatever is queued into one write.
                loop {
                    match next {
                        Some(Outbound::Msg(msg)) => {
                            let before = out.len();
                            seal(chan, &msg, &mut out)?;
                            let m = &shared.metrics;
                            let sends = match msg {
                                ServerOut::MapFull(_) => Some(&m.map_full_sends),
                                ServerOut::MapDelta(_) => Some(&m.map_delta_sends),
                                _ => None,
                            };
                            if let Some(c) = sends {
                                crate::control::server::metrics::inc(c);
                                m.map_bytes.fetch_add((out.len() - before) as u64, Ordering::Relaxed);
                            }
                        }
                        Some(Outbound::Close(reason)) => { closing = Some(reason); break; }
                        None => { closing = Some("closed by the server".into()); break; }
                    }
                    if out.len() > 1 << 20 { break; }
                    match rx.try_recv() {
                        Ok(x) => next = Some(x),
                        Err(_) => break,
                    }
                }
                if !out.is_empty() {
                    w.write_all(&out).await.map_err(|e| format!("{who}: write: {e}"))?;
                }
                if let Some(reason) = closing {
                    let _ = w.shutdown().await;
                    return Err(format!("{who}: {reason}"));
                }
            }
            n = r.read(rbuf) => {
                let n = match n { Ok(0) => return Ok(()), Ok(n) => n, Err(e) => return Err(format!("{who}: read: {e}")) };
                last_rx = tokio::time::Instant::now();
                let bad = match chan.push_wire(&rbuf[..n]) {
                    Err(ChannelError::Decrypt) => return Err(format!("{who}: undecryptable message")),
                    Err(e) => Some(e.to_string()),
                    Ok(()) => drain_frames(chan, conn, node, shared, acks).await.err(),
                };
                if let Some(e) = bad {
                    out.clear();
                    let _ = seal(chan, &ServerOut::Error { code: ErrorCode::Protocol, message: e.clone() }, &mut out);
                    let _ = w.write_all(&out).await;
                    let _ = w.shutdown().await;
                    return Err(format!("{who}: {e}"));
                }
            }
            _ = ka.tick() => {
                if last_rx.elapsed() > idle_limit {
                    return Err(format!("{who}: silent for {:?}", last_rx.elapsed()));
                }
                out.clear();
                seal(chan, &ServerOut::KeepAlive, &mut out)?;
                w.write_all(&out).await.map_err(|e| format!("{who}: write: {e}"))?;
            }
        }
    }
}

/// Forwards every complete frame to the hub; `Err` = a bad frame. Waits
/// when the hub's queue is full, so a node sending faster than the hub
/// works is simply read more slowly.
async fn drain_frames(chan: &mut SecureChannel, conn: ConnId, node: Option<i64>, shared: &Shared, acks: &ConnTx) -> Result<(), String> {
    while let Some(f) = chan.next_frame().map_err(|e| e.to_string())? {
        let msg = parse_client(&f)?;
        let msg = match (node, msg) {
            (Some(node), ClientMsg::AuditEvents { lines }) => {
                let cmd = crate::control::server::audit::ingest::IngestCmd::Events { node, lines, reply: ack_reply(acks) };
                shared.ingest.tx.send(cmd).await.map_err(|_| "server shutting down".to_string())?;
                continue;
            }
            (Some(node), ClientMsg::RecordingChunk { session, offset, data, fin }) => {
                use base64::Engine;
                let data = base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| "recording chunk: bad base64".to_string())?;
                let cmd =
                    crate::control::server::audit::ingest::IngestCmd::Chunk { node, session, offset, data, fin, reply: ack_reply(acks) };
                shared.ingest.tx.send(cmd).await.map_err(|_| "server shutting down".to_string())?;
                continue;
            }
            (_, m) => m,
        };
        // Keepalives only prove liveness (the read already did that).
        if let (Some(node), false) = (node, matches!(msg, ClientMsg::KeepAlive)) {
            shared.hub.send(HubCmd::Msg { conn, node, msg }).await.map_err(|_| "server shutting down".to_string())?;
        }
    }
    Ok(())
}

/// Acks go into the connection's outbound queue; a full queue (a node not
/// reading) drops them: the node resends and the server dedupes.
fn ack_reply(tx: &ConnTx) -> crate::control::server::audit::ingest::Reply {
    let tx = tx.clone();
    Box::new(move |a| {
        let _ = tx.try_send(Outbound::Msg(ServerOut::ShipAck(a)));
    })
}

fn parse_client(frame: &[u8]) -> Result<ClientMsg, String> {
    serde_json::from_slice(frame).map_err(|e| format!("malformed message: {e}"))
}
