//! Embedded SSH server: admits callers by their tailnet identity and the policy.
//!
//! The server is handed already-accepted byte streams together with the
//! WireGuard key of the peer that carried them and the live
//! [`IdentityResolver`] that maps it to an [`Identity`]. It never looks at IP
//! addresses, passwords or `authorized_keys`: whatever authentication method
//! the client offers, the answer is the policy decision for `(caller, this
//! node, login account)`, and it is judged again whenever the identity table
//! or the policy changes.
//!
//! Layout:
//! - [`handler`]: the russh `Handler` — authentication and channel dispatch.
//! - [`session`]: one running shell/exec/subsystem, its I/O pumps and teardown.
//! - [`process`]: spawning processes as the login user, on a pty or on pipes.
//! - [`account`]: local accounts, the login environment, `accept_env` filtering.
//! - [`forward`]: `direct-tcpip` (`ssh -L`) to ports on this node.
//! - [`audit`]: one JSON line per decision or session event.
//! - [`recording`]: asciicast v2 recordings.
//! - [`check`]: the second factor of `check` rules (prompt, verified by control).
//! - [`journal`]: the writer thread behind both, and the audit hash chain.
#![warn(missing_docs)]

pub mod account;
pub(crate) mod audit;
pub(crate) mod check;
mod forward;
mod handler;
pub(crate) mod journal;
pub(crate) mod process;
pub(crate) mod recording;
mod session;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use russh::MethodKind;
use russh::keys::{Algorithm, PrivateKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::daemon::identity::{Identity, IdentityResolver};
use crate::policy::{Policy, SshDecision};

pub(crate) use audit::AuditLog;

/// File name of the host key inside the state directory.
pub(crate) const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// File name of the audit log inside the state directory.
pub(crate) const AUDIT_FILE: &str = "audit.jsonl";
/// Directory (inside the state directory) holding asciicast recordings.
pub(crate) const RECORDINGS_DIR: &str = "recordings";

/// Errors of the SSH module.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SshError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("host key {path}: {source}")]
    HostKey { path: PathBuf, source: russh::keys::ssh_key::Error },
    #[error("spawning {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("pty: {0}")]
    Pty(#[from] nix::Error),
}

impl SshError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SshError::Io { path: path.to_path_buf(), source }
    }
}

/// The access decisions the SSH server needs. [`Policy`] implements it; tests
/// and the node may supply other implementations (e.g. while a policy is
/// being compiled elsewhere).
pub trait AccessPolicy: Send + Sync + 'static {
    /// The decision for logging in to `target` as `login`.
    fn check_ssh(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision;
    /// The decision for a login whose account has uid 0: root by another name.
    fn check_ssh_superuser(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision;
    /// May `src` open TCP `port` on `dst` (`ssh -L` to this node)?
    fn check_network(&self, src: &Identity, dst: &Identity, port: u16) -> bool;
    /// Could some SSH rule admit `caller` on `target` for some login?
    fn ssh_reachable(&self, caller: &Identity, target: &Identity) -> bool;
}

impl AccessPolicy for Policy {
    fn check_ssh(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision {
        Policy::check_ssh(self, caller, target, login)
    }
    fn check_ssh_superuser(&self, caller: &Identity, target: &Identity, login: &str) -> SshDecision {
        Policy::check_ssh_superuser(self, caller, target, login)
    }
    fn check_network(&self, src: &Identity, dst: &Identity, port: u16) -> bool {
        Policy::check_network(self, src, dst, port)
    }
    fn ssh_reachable(&self, caller: &Identity, target: &Identity) -> bool {
        Policy::ssh_reachable(self, caller, target)
    }
}

/// The policy in force, swappable at runtime. Every new session or forward
/// asks the current policy; [`PolicyHandle::changes`] tells holders of live
/// decisions (the inbound filter, open SSH connections) to re-judge them.
#[derive(Clone)]
pub struct PolicyHandle {
    current: Arc<RwLock<Arc<dyn AccessPolicy>>>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl PolicyHandle {
    /// A handle holding `policy`.
    pub fn new(policy: impl AccessPolicy) -> Self {
        PolicyHandle { current: Arc::new(RwLock::new(Arc::new(policy))), generation: Arc::new(tokio::sync::watch::Sender::new(0)) }
    }
    /// Replace the policy for all future decisions.
    pub fn replace(&self, policy: impl AccessPolicy) {
        let mut g = self.current.write().unwrap_or_else(|e| e.into_inner());
        *g = Arc::new(policy);
        drop(g);
        self.generation.send_modify(|g| *g += 1);
    }
    /// A receiver that changes on every [`PolicyHandle::replace`].
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
    /// The policy in force now.
    pub fn current(&self) -> Arc<dyn AccessPolicy> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Everything the SSH server needs from the node.
pub struct SshServerConfig {
    /// Holds the host key, `audit.jsonl` and `recordings/`. Created (0700) if missing.
    pub state_dir: PathBuf,
    /// The policy every login, session and forward is judged by.
    pub policy: PolicyHandle,
    /// The identity of this node (target of every login); asked per connection
    /// so a new netmap (new tags) applies to the next login.
    pub self_identity: Arc<dyn Fn() -> Identity + Send + Sync>,
    /// The sftp-server binary. `None`: the first of the usual Debian/Fedora/Alpine paths that exists.
    pub sftp_server: Option<PathBuf>,
}

impl SshServerConfig {
    /// A config for a node whose identity does not change.
    pub fn new(state_dir: impl Into<PathBuf>, policy: PolicyHandle, self_identity: Identity) -> Self {
        SshServerConfig { state_dir: state_dir.into(), policy, self_identity: Arc::new(move || self_identity.clone()), sftp_server: None }
    }
}

/// The embedded SSH server. One per node; `serve` once per accepted stream.
pub struct SshServer {
    pub(crate) cfg: SshServerConfig,
    russh_config: Arc<russh::server::Config>,
    host_public: String,
    pub(crate) audit: AuditLog,
    pub(crate) sftp_server: Option<PathBuf>,
    pub(crate) check: check::CheckLink,
}

const SFTP_SERVER_PATHS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
];

impl SshServer {
    /// Loads (or creates, 0600) the ed25519 host key and opens the audit log.
    pub fn new(cfg: SshServerConfig) -> anyhow::Result<Arc<Self>> {
        ensure_private_dir(&cfg.state_dir)?;
        let key = load_or_create_host_key(&cfg.state_dir.join(HOST_KEY_FILE))?;
        let host_public =
            key.public_key().to_openssh().map_err(|e| SshError::HostKey { path: cfg.state_dir.join(HOST_KEY_FILE), source: e })?;
        // Strip the comment: known_hosts wants "type base64".
        let host_public = host_public.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let recordings_dir = cfg.state_dir.join(RECORDINGS_DIR);
        let audit = AuditLog::open(&cfg.state_dir, &cfg.state_dir.join(AUDIT_FILE), &recordings_dir)?;
        let sftp_server = cfg.sftp_server.clone().or_else(|| SFTP_SERVER_PATHS.iter().map(PathBuf::from).find(|p| p.exists()));

        let russh_config = russh::server::Config {
            server_id: russh::SshId::Standard(format!("SSH-2.0-tailgate_{}", env!("CARGO_PKG_VERSION")).into()),
            methods: russh::MethodSet::from(
                &[MethodKind::None, MethodKind::PublicKey, MethodKind::Password, MethodKind::KeyboardInteractive][..],
            ),
            keys: vec![key],
            // Every attempt is answered from the identity, so there is no secret
            // to time; a short delay only slows down legitimate retries.
            auth_rejection_time: Duration::from_millis(50),
            auth_rejection_time_initial: Some(Duration::ZERO),
            // Idle interactive shells are normal; dead peers are found by keepalives.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 4,
            nodelay: true,
            ..Default::default()
        };
        process::init_tty_gid();
        Ok(Arc::new(SshServer {
            cfg,
            russh_config: Arc::new(russh_config),
            host_public,
            audit,
            sftp_server,
            check: check::CheckLink::default(),
        }))
    }

    /// `ssh-ed25519 AAAA...`, for known_hosts lines and the netmap.
    pub(crate) fn host_public_key_openssh(&self) -> String {
        self.host_public.clone()
    }

    /// Where `check` logins are verified: static (nowhere) until the agent
    /// points it at a control connection.
    pub(crate) fn check_link(&self) -> check::CheckLink {
        self.check.clone()
    }

    /// The audit and recording writer (the shipper follows it).
    pub(crate) fn journal(&self) -> &journal::Journal {
        self.audit.journal()
    }

    /// Runs one SSH connection to completion. `peer_key` is the WireGuard key
    /// that carried the stream; `resolver` says who that is, now and after
    /// every change. Nothing the client says can change it. A key the
    /// resolver does not know is dropped without a word.
    pub async fn serve<S>(self: Arc<Self>, stream: S, peer_key: [u8; 32], resolver: Arc<dyn IdentityResolver>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(caller) = resolver.resolve(&peer_key) else {
            return;
        };
        let target = (self.cfg.self_identity)();
        let conn = handler::Conn::new(self.clone(), peer_key, resolver, caller, target);
        let span = conn.span();
        self.run_conn(stream, conn).instrument(span).await
    }

    async fn run_conn<S>(&self, stream: S, conn: handler::Conn)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let authed = conn.authenticated_flag();
        // No inactivity timeout in russh (idle shells are fine), so bound the
        // unauthenticated phase here: banner, key exchange and login.
        let running = match tokio::time::timeout(LOGIN_GRACE, russh::server::run_stream(self.russh_config.clone(), stream, conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!("ssh handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("ssh client sent no banner in time");
                return;
            }
        };
        let handle = running.handle();
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(LOGIN_GRACE).await;
            if !authed.load(std::sync::atomic::Ordering::Acquire) {
                let _ = handle.disconnect(russh::Disconnect::ByApplication, "tailgate: login timed out".into(), "en".into()).await;
            }
        });
        if let Err(e) = running.await {
            tracing::debug!("ssh connection ended: {e}");
        }
        watchdog.abort();
    }
}

/// How long a connection may take from TCP accept to a completed login.
const LOGIN_GRACE: Duration = Duration::from_secs(60);

fn ensure_private_dir(dir: &Path) -> Result<(), SshError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| SshError::io(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| SshError::io(dir, e))?;
    }
    Ok(())
}

fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let meta = fs::metadata(path).map_err(|e| SshError::io(path, e))?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!("{}: host key was readable by others; fixing mode to 0600", path.display());
                fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| SshError::io(path, e))?;
            }
            PrivateKey::from_openssh(text.as_bytes()).map_err(|e| SshError::HostKey { path: path.into(), source: e })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key =
                PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(|e| SshError::HostKey { path: path.into(), source: e })?;
            let text =
                key.to_openssh(russh::keys::ssh_key::LineEnding::LF).map_err(|e| SshError::HostKey { path: path.into(), source: e })?;
            // Write to a temporary name and rename, so a crash never leaves a
            // truncated key that would change the host identity.
            let tmp = path.with_extension("tmp");
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| SshError::io(&tmp, e))?;
            f.write_all(text.as_bytes()).map_err(|e| SshError::io(&tmp, e))?;
            f.sync_all().map_err(|e| SshError::io(&tmp, e))?;
            fs::rename(&tmp, path).map_err(|e| SshError::io(path, e))?;
            Ok(key)
        }
        Err(e) => Err(SshError::io(path, e)),
    }
}

/// Short random identifier (128 bits, hex) for connections and sessions.
pub(crate) fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(HOST_KEY_FILE);
        let k1 = load_or_create_host_key(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let k2 = load_or_create_host_key(&p).unwrap();
        assert_eq!(k1.public_key(), k2.public_key());
    }
}
