//! The node's side of the control protocol.
//!
//! ```no_run
//! # async fn f(token: &str, node_private: tailgate::key::PrivateKey) -> anyhow::Result<()> {
//! use tailgate::control::{AuthKeyToken, ControlClient, ControlTarget, NodeHello};
//! let token = AuthKeyToken::parse(token)?;
//! let hello = NodeHello::register(&token.secret, "web1");
//! let (mut client, map) = ControlClient::connect(&ControlTarget::from(&token), &node_private, hello).await?;
//! // build WireGuard peers from map.peer_configs(), identities from map.identities()
//! loop {
//!     let delta = client.next_update().await?; // Err: connection lost -> reconnect
//!     // apply delta (or rebuild from client.netmap())
//! }
//! # }
//! ```
//!
//! **Reconnection is the caller's job.** When [`ControlClient::next_update`]
//! returns an error the connection is gone; keep the last map (the data plane
//! keeps working), wait with backoff (e.g. 1 s doubling to 60 s, with jitter)
//! and connect again. Passing the same [`NodeHello`] with the auth key again
//! is fine: a node key the server already knows logs in without using the
//! key. Do not retry [`ControlError::Refused`] in a tight loop: it carries a
//! message for the person running the node (auth key expired, node removed,
//! ...). After `key_expired` the node needs a new auth key.
//!
//! A background task owns the socket: it answers nothing on its own but
//! sends keepalives, and queues deltas until `next_update` takes them (up to
//! 256; the socket is not read while the queue is full, so call
//! `next_update` continuously).
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::transport::{ControlUrl, DialError};
use super::upgrade::Stream;
use super::{CONTROL_PATH, UPGRADE_CONTROL};
use crate::control::wire::frame::{DEFAULT_MAX_SERVER_FRAME, WireDecoder};
use crate::control::wire::http;
use crate::control::wire::noise::{ChannelError, Initiator, SecureChannel};
use crate::control::wire::proto::{CheckOutcome, ClientMsg, ErrorCode, MapDelta, NetMap, SelfInfo, ServerMsg, ShipAck};
use crate::control::wire::token::AuthKeyToken;
use crate::dataplane::wg;
use crate::key::{Key, PrivateKey};

/// Where the control server is and which key it must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlTarget {
    /// `http://host:port` or `https://host[:port]`
    pub url: String,
    /// Pinned Noise static key of the server.
    pub server_public: Key,
    /// PEM CA certificate(s) that `https://` must chain to instead of the
    /// system roots (`tailgate up --control-ca`).
    pub ca_pem: Option<String>,
}

impl From<&AuthKeyToken> for ControlTarget {
    fn from(t: &AuthKeyToken) -> ControlTarget {
        ControlTarget { url: t.url.clone(), server_public: t.server_public, ca_pem: None }
    }
}

/// What the node says about itself when it connects.
#[derive(Clone, Debug, Default)]
pub struct NodeHello {
    /// Auth key secret ([`AuthKeyToken::secret`]): `Some` = register (or log
    /// in, if the node key is already known); `None` = log in.
    pub auth_key: Option<String>,
    /// The name the node asks for (the server sanitizes it and makes it
    /// unique; the assigned name is in [`SelfInfo::name`]).
    pub hostname: String,
    /// OpenSSH public host key of the node's SSH server (peers pin it).
    pub ssh_host_key: Option<String>,
    /// Endpoints where peers may reach the node's WireGuard UDP socket.
    pub endpoints: Vec<SocketAddr>,
    /// No auth key: join by signing in with the identity provider (a node
    /// key that is registered and valid just logs in).
    pub interactive: bool,
    /// With `interactive`: sign in again even if the node key is valid.
    pub force_reauth: bool,
    /// Where the sign-in URL goes when the server sends one (the person
    /// must open it); without it a sign-in request fails.
    pub sign_in_urls: Option<mpsc::UnboundedSender<String>>,
}

impl NodeHello {
    /// Join (or log in, if the node key is known) with an auth key's secret.
    pub fn register(auth_secret: &str, hostname: &str) -> NodeHello {
        NodeHello { auth_key: Some(auth_secret.into()), hostname: hostname.into(), ..Default::default() }
    }

    /// Log in with a node key the server already knows.
    pub fn login(hostname: &str) -> NodeHello {
        NodeHello { hostname: hostname.into(), ..Default::default() }
    }

    fn message(&self) -> ClientMsg {
        if self.interactive && self.auth_key.is_none() {
            return ClientMsg::RegisterInteractive {
                hostname: self.hostname.clone(),
                ssh_host_key: self.ssh_host_key.clone(),
                endpoints: self.endpoints.clone(),
                force_reauth: self.force_reauth,
            };
        }
        match &self.auth_key {
            Some(k) => ClientMsg::Register {
                auth_key: k.clone(),
                hostname: self.hostname.clone(),
                ssh_host_key: self.ssh_host_key.clone(),
                endpoints: self.endpoints.clone(),
                previous_node_key: None,
            },
            None => ClientMsg::Login {
                hostname: Some(self.hostname.clone()),
                ssh_host_key: self.ssh_host_key.clone(),
                endpoints: self.endpoints.clone(),
            },
        }
    }
}

/// Why joining or following the map failed. [`is_transient`](Self::is_transient)
/// says whether reconnecting may help; the others need a person.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The TCP connection could not be made (DNS, refused, unreachable).
    #[error("cannot reach the control server at {url}: {message}")]
    Connect {
        /// The control URL dialed.
        url: String,
        /// What the dialer said.
        message: String,
    },
    /// A bad control URL, or the server did not answer the upgrade with
    /// `101` (not a tailgate control server, or a proxy in the way).
    #[error("{0}")]
    Http(String),
    /// The TLS layer of an `https://` URL failed (untrusted certificate,
    /// wrong name, unreadable CA file): a person has to fix the setup.
    #[error("{0}")]
    Tls(String),
    /// The Noise handshake failed: the server does not hold the pinned key.
    #[error(
        "the control server at {url} did not complete the Noise handshake: its key is not the one pinned in the auth key \
         (another server, or the server's key changed), or it is not a tailgate control server"
    )]
    WrongServerKey {
        /// The control URL dialed.
        url: String,
    },
    /// The server said no; `message` is for the person running the node.
    #[error("the control server refused: {message}")]
    Refused {
        /// What kind of refusal, for programs (retry or not).
        code: ErrorCode,
        /// What happened and what to do, from the server.
        message: String,
    },
    /// The server sent something this node cannot use (bad frame, bad
    /// JSON, a message out of order).
    #[error("control protocol error: {0}")]
    Protocol(String),
    /// The connection ended (the server closed it, or a read or write failed).
    #[error("connection to the control server lost: {0}")]
    Closed(String),
    /// No answer within the limit (handshake, login, sign-in, a check).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server moved this node to another key ([`ControlClient::rotate_key`]);
    /// connect again with that key's private half.
    #[error("the node key was rotated to {}; log in with the new key", wg::key_to_base64(.0))]
    KeyRotated(Key),
}

impl ControlError {
    /// Worth reconnecting automatically (as opposed to needing a person)?
    pub fn is_transient(&self) -> bool {
        match self {
            ControlError::Connect { .. } | ControlError::Closed(_) | ControlError::Timeout(_) | ControlError::KeyRotated(_) => true,
            ControlError::Refused { code, .. } => matches!(code, ErrorCode::Internal | ErrorCode::Replaced),
            _ => false,
        }
    }
}

/// A logged-in connection to the control server.
pub struct ControlClient {
    map: NetMap,
    new_node: bool,
    updates: mpsc::Receiver<Result<MapDelta, ControlError>>,
    cmds: mpsc::Sender<ClientMsg>,
    /// Binary recording chunks, when the server takes them.
    frames: Option<mpsc::Sender<Vec<u8>>>,
    /// The server takes gzip members in binary chunks (`LoginOk.gzip_chunks`).
    gzip_chunks: bool,
    task: tokio::task::JoinHandle<()>,
    done: bool,
    acks: Option<mpsc::UnboundedReceiver<ShipAck>>,
    pending: Pending,
    next_check_id: Arc<AtomicU64>,
}

/// Check requests waiting for their answer, by request id. The background
/// task answers them and, when the connection ends, drops them (the waiter
/// then learns the connection is gone).
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<CheckAnswer>>>>;

/// The control server's answer to a check request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckAnswer {
    /// Approved, code needed, or refused (and why).
    pub outcome: CheckOutcome,
    /// The user checked (owner of the source node).
    pub user: String,
    /// For the person logging in (what to do when refused).
    pub message: String,
}

/// Asks the control server to verify `check` codes over this node's control
/// connection. Cheap to clone; valid while that connection lasts.
#[derive(Clone)]
pub(crate) struct CheckHandle {
    cmds: mpsc::Sender<ClientMsg>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

impl CheckHandle {
    /// Asks about the owner of node `source`: with `code`, verify it;
    /// without, is an approval younger than `max_age` on record (else a code
    /// is needed)? `max_age` `None`: never reuse an approval.
    pub async fn check(
        &self,
        source: Key,
        code: Option<String>,
        max_age: Option<Duration>,
        timeout: Duration,
    ) -> Result<CheckAnswer, ControlError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let msg = ClientMsg::Check { id, source, code, max_age_secs: max_age.map(|d| d.as_secs()) };
        let gone = || ControlError::Closed("the connection to the control server ended".into());
        let res = async {
            self.cmds.send(msg).await.map_err(|_| gone())?;
            rx.await.map_err(|_| gone())
        };
        let out = tokio::time::timeout(timeout, res)
            .await
            .unwrap_or_else(|_| Err(ControlError::Timeout(format!("the control server did not answer within {timeout:?}"))));
        lock(&self.pending).remove(&id);
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The audit shipper's share of a connection: send shipments, read acks.
/// Both ends close when the connection ends.
pub(crate) struct ShipLink {
    /// `audit_events` and `recording_chunk` messages to send.
    pub cmds: mpsc::Sender<ClientMsg>,
    /// The server's `ship_ack`s, in arrival order.
    pub acks: mpsc::UnboundedReceiver<ShipAck>,
    /// Encoded [`crate::control::wire::chunk::BinChunk`]s; `None` when the
    /// server is too old to take them (send JSON `recording_chunk`s then).
    pub frames: Option<mpsc::Sender<Vec<u8>>>,
    /// The server takes binary chunks holding gzip members.
    pub gzip: bool,
}

impl Drop for ControlClient {
    fn drop(&mut self) {
        self.task.abort();
        lock(&self.pending).clear();
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a node waits for its person to sign in (the server gives up
/// after its own sign-in lifetime, 10 minutes by default).
const SIGN_IN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, ControlError> {
    match r.read(buf).await {
        Ok(0) => Err(ControlError::Closed("the server closed the connection".into())),
        Ok(n) => Ok(n),
        Err(e) => Err(ControlError::Closed(e.to_string())),
    }
}

impl ControlClient {
    /// Dials `target.url`, upgrades, runs Noise IK with `node_private` (the
    /// node's WireGuard key), registers or logs in, and returns the client
    /// and the node's first full map.
    pub async fn connect(
        target: &ControlTarget,
        node_private: &PrivateKey,
        hello: NodeHello,
    ) -> Result<(ControlClient, NetMap), ControlError> {
        let s = super::transport::dial(&target.url, target.ca_pem.as_deref(), HANDSHAKE_TIMEOUT).await.map_err(|e| match e {
            DialError::Url(m) => ControlError::Http(m.to_string()),
            DialError::Connect { url, message } => ControlError::Connect { url, message },
            e @ (DialError::Tls { .. } | DialError::Ca(_)) => ControlError::Tls(e.to_string()),
        })?;
        Self::connect_stream(s, target, node_private, hello).await
    }

    /// [`connect`](Self::connect) over an already-open stream (in-memory
    /// transports, proxies).
    pub async fn connect_stream<S: Stream>(
        s: S,
        target: &ControlTarget,
        node_private: &PrivateKey,
        hello: NodeHello,
    ) -> Result<(ControlClient, NetMap), ControlError> {
        let limit = if hello.interactive { SIGN_IN_TIMEOUT } else { HANDSHAKE_TIMEOUT };
        tokio::time::timeout(limit, Self::handshake(s, target, node_private, hello))
            .await
            .map_err(|_| ControlError::Timeout(format!("no login answer from {} within {limit:?}", target.url)))?
    }

    async fn handshake<S: Stream>(
        mut s: S,
        target: &ControlTarget,
        node_private: &PrivateKey,
        hello: NodeHello,
    ) -> Result<(ControlClient, NetMap), ControlError> {
        let hosthdr = ControlUrl::parse(&target.url).map_err(|e| ControlError::Http(e.to_string()))?.host_header();
        s.write_all(&http::upgrade_request(&hosthdr, CONTROL_PATH, UPGRADE_CONTROL))
            .await
            .map_err(|e| ControlError::Closed(e.to_string()))?;
        let mut rbuf = vec![0u8; 64 * 1024];
        // Every read must come within the handshake limit, except while the
        // person signs in: a silent server is noticed in seconds either way.
        let mut deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
        let late = || ControlError::Timeout(format!("no answer from {} within {HANDSHAKE_TIMEOUT:?}", target.url));
        let mut head = Vec::new();
        let (code, reason, used) = loop {
            if let Some(x) = http::parse_response(&head).map_err(|e| ControlError::Http(format!("{}: {e}", target.url)))? {
                break x;
            }
            let n = tokio::time::timeout_at(deadline, read_more(&mut s, &mut rbuf)).await.map_err(|_| late())??;
            head.extend_from_slice(&rbuf[..n]);
        };
        if code != 101 {
            return Err(ControlError::Http(format!(
                "{} answered `{code} {reason}` to the control upgrade; is it a tailgate control server?",
                target.url
            )));
        }
        let mut wire = WireDecoder::new();
        wire.push(&head[used..]);
        let (init, msg1) = Initiator::start(node_private, &target.server_public).map_err(|e| ControlError::Protocol(e.to_string()))?;
        s.write_all(&msg1).await.map_err(|e| ControlError::Closed(e.to_string()))?;
        let msg2 = loop {
            if let Some(m) = wire.next_message().map_err(|e| ControlError::Protocol(e.to_string()))? {
                break m;
            }
            match tokio::time::timeout_at(deadline, s.read(&mut rbuf)).await.map_err(|_| late())? {
                Ok(0) | Err(_) => return Err(ControlError::WrongServerKey { url: target.url.clone() }),
                Ok(n) => wire.push(&rbuf[..n]),
            }
        };
        let mut chan =
            init.finish(&msg2, wire, DEFAULT_MAX_SERVER_FRAME).map_err(|_| ControlError::WrongServerKey { url: target.url.clone() })?;
        let mut out = Vec::new();
        seal(&mut chan, &hello.message(), &mut out)?;
        s.write_all(&out).await.map_err(|e| ControlError::Closed(e.to_string()))?;

        let mut login = None;
        let map = loop {
            let msg = match next_msg(&mut chan)? {
                Some(m) => m,
                None => {
                    let n = tokio::time::timeout_at(deadline, read_more(&mut s, &mut rbuf)).await.map_err(|_| late())??;
                    chan.push_wire(&rbuf[..n]).map_err(chan_err)?;
                    continue;
                }
            };
            match msg {
                ServerMsg::Error { code, message } => return Err(ControlError::Refused { code, message }),
                ServerMsg::LoginOk { new_node, node, domain, keepalive_secs, binary_chunks, gzip_chunks } => {
                    login = Some((new_node, node, domain, keepalive_secs, binary_chunks, gzip_chunks))
                }
                ServerMsg::MapFull(full) => break NetMap::from_full(full),
                // The server's keepalives show it is alive while we wait.
                ServerMsg::KeepAlive if hello.interactive => deadline = tokio::time::Instant::now() + SIGN_IN_TIMEOUT,
                ServerMsg::KeepAlive => {}
                ServerMsg::SignIn { url } if login.is_none() => match &hello.sign_in_urls {
                    Some(tx) => {
                        deadline = tokio::time::Instant::now() + SIGN_IN_TIMEOUT;
                        let _ = tx.send(url);
                    }
                    None => return Err(ControlError::Protocol("the server asks for a sign-in, but this node cannot show a URL".into())),
                },
                other => return Err(ControlError::Protocol(format!("unexpected {other:?} before the first map"))),
            }
        };
        let Some((new_node, _node, _domain, keepalive_secs, binary_chunks, gzip_chunks)) = login else {
            return Err(ControlError::Protocol("map before login answer".into()));
        };
        let (utx, urx) = mpsc::channel(256);
        let (ctx, crx) = mpsc::channel(16);
        let keepalive = Duration::from_secs(keepalive_secs.max(1) as u64);
        let pending = Pending::default();
        let (atx, arx) = mpsc::unbounded_channel();
        // Room for one shipper batch, written in one go; the shipper keeps
        // its own window.
        let (ftx, frx) = mpsc::channel(32);
        // The environment knob makes this node ship like one from before
        // binary chunks (for testing that mix against a current server).
        let binary_chunks = binary_chunks && std::env::var_os("TAILGATE_SHIP_JSON_CHUNKS").is_none();
        // Likewise for a node from before gzip chunks.
        let gzip_chunks = binary_chunks && gzip_chunks && std::env::var_os("TAILGATE_SHIP_PLAIN_CHUNKS").is_none();
        let task = tokio::spawn(run(s, chan, utx, Outgoing { cmds: crx, frames: frx }, keepalive, pending.clone(), atx));
        let client = ControlClient {
            map: map.clone(),
            new_node,
            updates: urx,
            cmds: ctx,
            frames: binary_chunks.then_some(ftx),
            gzip_chunks,
            task,
            done: false,
            pending,
            next_check_id: Arc::new(AtomicU64::new(1)),
            acks: Some(arx),
        };
        Ok((client, map))
    }

    /// A handle for `check` verification over this connection (for the SSH
    /// server, which does not own the client).
    pub(crate) fn check_handle(&self) -> CheckHandle {
        CheckHandle { cmds: self.cmds.clone(), pending: self.pending.clone(), next_id: self.next_check_id.clone() }
    }

    /// The audit shipper's link over this connection (once per connection).
    pub(crate) fn ship_link(&mut self) -> Option<ShipLink> {
        Some(ShipLink { cmds: self.cmds.clone(), acks: self.acks.take()?, frames: self.frames.clone(), gzip: self.gzip_chunks })
    }

    /// Did this connection create the node (first registration)?
    pub fn new_node(&self) -> bool {
        self.new_node
    }

    /// The current map (every delta returned so far applied).
    pub fn netmap(&self) -> &NetMap {
        &self.map
    }

    /// This node as the server sees it (name, addresses, owner, expiry).
    pub fn self_node(&self) -> &SelfInfo {
        &self.map.self_node
    }

    /// The next change, already applied to [`netmap`](Self::netmap). An
    /// error means the connection is over (reconnect, see module docs). A
    /// delta with `key_expired` is followed by an error.
    pub async fn next_update(&mut self) -> Result<MapDelta, ControlError> {
        if self.done {
            return Err(ControlError::Closed("connection already ended".into()));
        }
        match self.updates.recv().await {
            Some(Ok(d)) => {
                self.map.apply(&d);
                Ok(d)
            }
            Some(Err(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(ControlError::Closed("connection ended".into()))
            }
        }
    }

    /// Tells the server where this node's WireGuard socket can be reached.
    pub async fn report_endpoints(&self, endpoints: Vec<SocketAddr>) -> Result<(), ControlError> {
        self.cmds.send(ClientMsg::ReportEndpoints { endpoints }).await.map_err(|_| ControlError::Closed("connection ended".into()))
    }

    /// Moves this node (name, IP, owner, host key) to the key whose public
    /// half is `new_public`. This session, authenticated as the current key,
    /// is the proof. The server answers and closes; connect again with the
    /// new private key (a plain login). Returns once the server confirmed.
    pub async fn rotate_key(mut self, new_public: Key) -> Result<(), ControlError> {
        let gone = || ControlError::Closed("connection ended".into());
        self.cmds.send(ClientMsg::RotateKey { new_node_key: new_public }).await.map_err(|_| gone())?;
        let wait = async {
            loop {
                match self.updates.recv().await {
                    Some(Ok(_)) => continue,
                    Some(Err(ControlError::KeyRotated(k))) if k == new_public => return Ok(()),
                    Some(Err(e)) => return Err(e),
                    None => return Err(gone()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.map_err(|_| ControlError::Timeout("no answer to rotate_key".into()))?
    }

    /// Leaves the tailnet: an ephemeral node is deleted, another node's key
    /// expires (it needs a new auth key to come back). Waits for the answer.
    pub async fn logout(mut self) -> Result<(), ControlError> {
        self.cmds.send(ClientMsg::Logout).await.map_err(|_| ControlError::Closed("connection ended".into()))?;
        let wait = async {
            loop {
                match self.updates.recv().await {
                    Some(Ok(_)) => continue,
                    Some(Err(ControlError::Closed(_))) | None => return Ok(()),
                    Some(Err(e)) => return Err(e),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait).await.map_err(|_| ControlError::Timeout("no answer to logout".into()))?
    }
}

fn chan_err(e: ChannelError) -> ControlError {
    ControlError::Protocol(e.to_string())
}

fn seal(chan: &mut SecureChannel, msg: &ClientMsg, out: &mut Vec<u8>) -> Result<(), ControlError> {
    let json = serde_json::to_vec(msg).map_err(|e| ControlError::Protocol(e.to_string()))?;
    chan.seal_frame(&json, out).map_err(chan_err)
}

fn next_msg(chan: &mut SecureChannel) -> Result<Option<ServerMsg>, ControlError> {
    match chan.next_frame().map_err(chan_err)? {
        None => Ok(None),
        Some(f) => {
            serde_json::from_slice(&f).map(Some).map_err(|e| ControlError::Protocol(format!("malformed message from the server: {e}")))
        }
    }
}

/// What the node's side queues for the server: JSON commands, and
/// pre-encoded binary frames (recording chunks).
struct Outgoing {
    cmds: mpsc::Receiver<ClientMsg>,
    frames: mpsc::Receiver<Vec<u8>>,
}

/// The background task: reads messages, forwards deltas, writes commands
/// and keepalives, notices a silent server.
async fn run<S: Stream>(
    s: S,
    mut chan: SecureChannel,
    updates: mpsc::Sender<Result<MapDelta, ControlError>>,
    out: Outgoing,
    keepalive: Duration,
    pending: Pending,
    acks: mpsc::UnboundedSender<ShipAck>,
) {
    let Outgoing { mut cmds, mut frames } = out;
    let (mut r, mut w) = tokio::io::split(s);
    let mut rbuf = vec![0u8; 16 * 1024];
    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let idle_limit = keepalive * 3 + Duration::from_secs(5);
    let mut last_rx = tokio::time::Instant::now();
    let mut out = Vec::new();
    let end: Result<(), ControlError> = 'outer: loop {
        // Frames may already be buffered (they can arrive with the first map).
        loop {
            match next_msg(&mut chan) {
                Ok(None) => break,
                Err(e) => break 'outer Err(e),
                Ok(Some(ServerMsg::MapDelta(d))) => {
                    let expired = d.key_expired;
                    if updates.send(Ok(d)).await.is_err() {
                        break 'outer Ok(());
                    }
                    if expired {
                        break 'outer Err(ControlError::Refused {
                            code: ErrorCode::NodeKeyExpired,
                            message: "this node's key expired or the node was removed; log in again with an auth key".into(),
                        });
                    }
                }
                Ok(Some(ServerMsg::KeepAlive)) => {}
                Ok(Some(ServerMsg::CheckResult { id, outcome, user, message })) => {
                    // No waiter: it timed out meanwhile.
                    if let Some(tx) = lock(&pending).remove(&id) {
                        let _ = tx.send(CheckAnswer { outcome, user, message });
                    }
                }
                Ok(Some(ServerMsg::ShipAck(a))) => {
                    let _ = acks.send(a);
                }
                Ok(Some(ServerMsg::LoggedOut)) => break 'outer Err(ControlError::Closed("logged out".into())),
                Ok(Some(ServerMsg::KeyRotated { node_key })) => break 'outer Err(ControlError::KeyRotated(node_key)),
                Ok(Some(ServerMsg::Error { code, message })) => break 'outer Err(ControlError::Refused { code, message }),
                Ok(Some(other)) => {
                    break 'outer Err(ControlError::Protocol(format!("unexpected message {other:?}")));
                }
            }
        }
        tokio::select! {
            n = r.read(&mut rbuf) => {
                let n = match n {
                    Ok(0) => break Err(ControlError::Closed("the server closed the connection".into())),
                    Ok(n) => n,
                    Err(e) => break Err(ControlError::Closed(e.to_string())),
                };
                last_rx = tokio::time::Instant::now();
                if let Err(e) = chan.push_wire(&rbuf[..n]) {
                    break Err(chan_err(e));
                }
            }
            c = cmds.recv() => {
                let Some(c) = c else { break Ok(()) };
                out.clear();
                if let Err(e) = seal(&mut chan, &c, &mut out) { break Err(e); }
                if let Err(e) = w.write_all(&out).await { break Err(ControlError::Closed(e.to_string())); }
            }
            Some(f) = frames.recv() => {
                out.clear();
                // Whatever else is queued goes in the same write.
                let mut next = Some(f);
                let mut sealed = Ok(());
                while let Some(f) = next.take() {
                    sealed = chan.seal_frame(&f, &mut out).map_err(chan_err);
                    if sealed.is_err() || out.len() >= 1 << 20 { break; }
                    next = frames.try_recv().ok();
                }
                if let Err(e) = sealed { break Err(e); }
                if let Err(e) = w.write_all(&out).await { break Err(ControlError::Closed(e.to_string())); }
            }
            _ = ka.tick() => {
                if last_rx.elapsed() > idle_limit {
                    break Err(ControlError::Timeout(format!("the server has been silent for {:?}", last_rx.elapsed())));
                }
                out.clear();
                if let Err(e) = seal(&mut chan, &ClientMsg::KeepAlive, &mut out) { break Err(e); }
                if let Err(e) = w.write_all(&out).await { break Err(ControlError::Closed(e.to_string())); }
            }
        }
    };
    // Waiting checks learn at once that no answer will come.
    lock(&pending).clear();
    if let Err(e) = end {
        let _ = updates.send(Err(e)).await;
    }
    let _ = w.shutdown().await;
}
