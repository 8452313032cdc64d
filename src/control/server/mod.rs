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
//! - The hub ([`hub`]) runs on its own OS thread (SQLite calls are blocking) and
//!   receives every event through one channel, so it needs no locks.
//! - Side tasks: timers (ephemeral cleanup, key expiry), policy file
//!   watcher (mtime poll), admin unix socket.
//!
//! Files: `accept` (listener, TLS, request head and routing), `conn`
//! (one node's control connection), `hub_thread` (the hub's thread and its
//! command channel, relay access), `tasks` (timers, policy watcher, admin
//! socket, metrics), `preauth` (unauthenticated-connection caps),
//! `state_dir` (lock, server key, admin socket path), `signin` (`/oidc/*`
//! pages and a node's sign-in wait).
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::control::UPGRADE_RELAY;
use crate::control::server::hub::{AdminRequest, Hub, HubConfig, HubError, Now};
use crate::control::server::oidc::Oidc;
use crate::control::server::store::{Store, ensure_private_dir};
use crate::control::upgrade::Stream;
use crate::control::wire::frame::DEFAULT_MAX_CLIENT_FRAME;
use crate::dataplane::wg;
use crate::key::{Key, PrivateKey};

mod accept;
/// `tailgate control …` (the admin command line).
pub mod admin;
pub(crate) mod audit;
mod conn;
/// The hub: the server's state machine.
pub mod hub;
mod hub_thread;
pub(crate) mod metrics;
/// Who sees whom: full maps and deltas.
pub mod netmap;
pub(crate) mod oidc;
mod preauth;
mod signin;
mod state_dir;
/// The SQLite store.
pub mod store;
mod tasks;
/// TLS on the listener: certificate files or ACME.
pub mod tls;
pub(crate) mod totp;

pub use accept::UpgradeHandler;
pub(crate) use preauth::PreAuthLimits;
pub use preauth::PreAuthPermit;
pub(crate) use state_dir::{DirLock, lock_state_dir};
pub use state_dir::{admin_socket_path, load_or_create_server_key, server_running};

use accept::{accept_loop, handle_conn};
use hub_thread::{HubCmd, admin_call, hub_loop, relay_auth};
use tasks::{admin_loop, metrics_render, policy_watch, read_policy_file, tick_loop};

/// Everything `tailgate control` is started with.
#[derive(Clone)]
pub struct ServerOptions {
    /// TCP address of the control port (UDP on the same port: STUN).
    pub listen: SocketAddr,
    /// Database, server key, lock, admin socket, audit store.
    pub state_dir: PathBuf,
    /// Policy file, validated and hot-reloaded. `None`: the last policy set
    /// with `policy set`, or the built-in default.
    pub policy_file: Option<PathBuf>,
    /// Public URL put in auth keys; default `http://<listen address>` (the
    /// host name when listening on all addresses).
    pub url: Option<String>,
    /// Tailnet DNS domain.
    pub domain: String,
    /// How long a node key is valid after it registers or signs in.
    pub node_key_expiry: Duration,
    /// How long an ephemeral node outlives its last connection.
    pub ephemeral_grace: Duration,
    /// Lifetime of auth keys created without `--expiry`.
    pub default_auth_key_expiry: Duration,
    /// Keepalive period on control connections.
    pub keepalive: Duration,
    /// How often the policy file's mtime is checked.
    pub policy_poll: Duration,
    /// Period of the ephemeral/expiry timer.
    pub tick: Duration,
    /// Limit on head, handshake and first message.
    pub handshake_timeout: Duration,
    /// Serve `state_dir/admin.sock` (0600).
    pub admin_socket: bool,
    /// Largest frame a node may send, bytes.
    pub max_client_frame: usize,
    /// Messages queued per connection before it is considered stuck.
    pub outbound_queue: usize,
    /// Other `Upgrade:` protocols on this port (e.g. `tailgate-relay`).
    pub upgrades: Vec<(String, Arc<dyn UpgradeHandler>)>,
    /// Connections not authenticated yet (request head, Noise, first
    /// message): at most this many in total and from one IP address; more
    /// are closed as soon as they are accepted.
    pub max_unauthenticated: usize,
    /// See `max_unauthenticated`.
    pub max_unauthenticated_per_ip: usize,
    /// Commands queued for the hub thread before connection tasks wait
    /// (backpressure: a flooding node's reads stall, not the server's memory).
    pub hub_queue: usize,
    /// Endpoint reports applied at once per node, then one per interval.
    pub endpoint_burst: u32,
    /// See `endpoint_burst`.
    pub endpoint_interval: Duration,
    /// TLS on the listener (`None`: plain HTTP, Noise inside either way).
    pub tls: Option<crate::control::server::tls::TlsSource>,
    /// A second listener serving only `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Sign-in with an OpenID Connect provider (`--oidc-*`); `None`: auth keys only.
    pub(crate) oidc: Option<crate::control::server::oidc::OidcConfig>,
    /// Shipped audit events and recordings older than this are deleted.
    pub retention: Option<Duration>,
    /// Limits of the built-in relay (`--relay-rate`).
    pub relay: crate::relay::RelayConfig,
}

impl ServerOptions {
    /// The defaults of `tailgate control`, on `listen` with `state_dir`.
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

impl ControlServer {
    /// Opens the state, binds, and starts serving.
    pub async fn start(opts: ServerOptions) -> Result<ControlServer> {
        // Nodes fill frames up to this size (audit batches, recording
        // chunks); a smaller limit would refuse them and never store them.
        if opts.max_client_frame < DEFAULT_MAX_CLIENT_FRAME {
            anyhow::bail!(
                "max_client_frame is {} bytes, below the {DEFAULT_MAX_CLIENT_FRAME} bytes nodes send in one frame \
                 (audit batches and recording chunks would be refused); use at least {DEFAULT_MAX_CLIENT_FRAME}",
                opts.max_client_frame
            );
        }
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
        let hub = Hub::open(store, cfg, policy, Now::read())?;

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

    /// The bound control port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's Noise public key (pinned by nodes).
    pub fn public_key(&self) -> Key {
        self.public
    }

    /// UDP address of the STUN responder (same IP and port as [`addr`](Self::addr));
    /// `None` if that UDP port could not be bound.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    /// The URL put in auth keys.
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
