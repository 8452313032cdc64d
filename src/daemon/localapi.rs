//! The daemon's local API: a unix socket (0600) in the state directory.
//!
//! One JSON line per request, one JSON line per answer. `connect` turns the
//! socket into a byte pipe to a tailnet TCP connection after the answer,
//! which is what `tailgate nc` (and so `ssh` via ProxyCommand) rides on.
//! Client to daemon is raw bytes (closing the write half sends a FIN). Daemon
//! to client is framed when both ask for it (see [`Frame`]), so that a
//! connection the peer reset or that timed out ends with an error the client
//! can exit non-zero on, instead of an end of stream indistinguishable from a
//! complete transfer.
//! Access control is the file mode: whoever can open the socket can use the
//! node's identity, exactly like whoever can read its private key.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::daemon::directory::Directory;
use crate::dataplane::node::Node;

pub(crate) const SOCKET_NAME: &str = "tailgate.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    Status,
    /// The name directory (peers, addresses, SSH host keys).
    Directory,
    Connect {
        host: String,
        port: u16,
        /// The client decodes [`Frame`]s; older clients get a raw pipe.
        #[serde(default)]
        framed: bool,
    },
}

/// Frame tags on the daemon-to-client side of a framed `connect` pipe.
/// `D` + u32 big-endian length + that many bytes (at most [`MAX_FRAME`]);
/// `E`: the peer closed cleanly (FIN); `X` + u32 length + UTF-8 reason: the
/// connection failed. A pipe that ends without `E` or `X` means the daemon
/// went away, which is a failure too.
pub(crate) struct Frame;
impl Frame {
    pub(crate) const DATA: u8 = b'D';
    pub(crate) const END: u8 = b'E';
    pub(crate) const FAILED: u8 = b'X';
}
pub(crate) const MAX_FRAME: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// The pipe after this `connect` answer is framed (the daemon speaks it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub framed: bool,
}

impl Answer {
    fn failed(error: String) -> Self {
        Answer { ok: false, error: Some(error), status: None, framed: false }
    }

    fn status(status: serde_json::Value) -> Self {
        Answer { ok: true, error: None, status: Some(status), framed: false }
    }
}

/// What the local API serves from.
#[derive(Clone)]
pub(crate) struct Daemon {
    pub node: Arc<Node>,
    pub directory: Arc<RwLock<Directory>>,
    /// Extra status fields (e.g. the control connection), merged into `status`.
    pub extra: Arc<RwLock<serde_json::Map<String, serde_json::Value>>>,
}

impl Daemon {
    pub(crate) fn new(node: Arc<Node>, directory: Directory) -> Self {
        Daemon { node, directory: Arc::new(RwLock::new(directory)), extra: Default::default() }
    }

    pub(crate) fn directory(&self) -> Directory {
        self.directory.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Self and peers joined with live data-plane counters.
    pub(crate) fn status(&self) -> serde_json::Value {
        let dir = self.directory();
        let ns = self.node.status();
        let peers: Vec<serde_json::Value> = dir
            .peers
            .iter()
            .map(|e| {
                let live = ns.peers.iter().find(|p| p.public_key == e.node_key);
                serde_json::json!({
                    "name": e.name,
                    "ips": e.ips,
                    "user": e.user,
                    "tags": e.tags,
                    "node_key": e.node_key,
                    "path": live.and_then(|p| p.path.clone().or_else(|| p.endpoint.map(|ep| format!("direct {ep}")))),
                    "last_probe": live.and_then(|p| p.last_probe.clone()),
                    "last_handshake_secs_ago": live.and_then(|p| p.last_handshake_secs_ago),
                    // Control's word: WireGuard only handshakes when there
                    // is traffic, so an idle peer has no recent handshake.
                    "online": e.online,
                    "rx_bytes": live.map(|p| p.stats.rx_bytes).unwrap_or(0),
                    "tx_bytes": live.map(|p| p.stats.tx_bytes).unwrap_or(0),
                    "spoofed_dropped": live.map(|p| p.stats.spoofed).unwrap_or(0),
                    "refused_inbound": live.map(|p| p.refused_inbound).unwrap_or(0),
                    "relayed_rx_bytes": live.map(|p| p.relayed.rx_bytes).unwrap_or(0),
                    "relayed_tx_bytes": live.map(|p| p.relayed.tx_bytes).unwrap_or(0),
                })
            })
            .collect();
        let mut v = serde_json::json!({
            "self": dir.me,
            "domain": dir.domain,
            "addresses": ns.addresses,
            "listen": ns.listen,
            "peers": peers,
            "invalid_datagrams": ns.stats.invalid,
            "tcp_sockets": ns.tcp_sockets,
            "tcp_retransmits": ns.tcp_retransmits,
        });
        for (k, val) in self.extra.read().unwrap_or_else(|e| e.into_inner()).iter() {
            v[k] = val.clone();
        }
        v
    }
}

/// Where the daemon of `state_dir` listens (`tailgate nc`, `status` connect there).
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Bind a unix socket at `path` that is 0600 from the moment it has that
/// name. `bind` creates the file with the process umask, so it is bound in a
/// fresh 0700 directory beside `path`, narrowed there, and only then linked
/// into place; nobody else can open it in between. The link (unlike a rename)
/// fails if `path` exists, so a racing second daemon cannot replace ours.
pub(crate) fn bind_private(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let private = tempfile::Builder::new().prefix(".tailgate-sock").tempdir_in(parent)?;
    let tmp = private.path().join(SOCKET_NAME);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::hard_link(&tmp, path)?;
    Ok(listener)
}

/// Listen on `state_dir/tailgate.sock` until the process ends.
pub(crate) fn serve(daemon: Daemon, state_dir: &Path) -> Result<()> {
    let path = socket_path(state_dir);
    // A socket file left by a crashed daemon blocks bind; a live daemon
    // answers, and then we must not steal its socket.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!("another tailgate daemon is running with state dir {}; stop it or use another --state-dir", state_dir.display());
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = bind_private(&path).with_context(|| format!("binding the local API socket {}", path.display()))?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let d = daemon.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(d, conn).await {
                    tracing::debug!(error = %e, "local API connection ended");
                }
            });
        }
    });
    Ok(())
}

async fn answer(conn: &mut UnixStream, a: &Answer) -> Result<()> {
    let mut line = serde_json::to_vec(a)?;
    line.push(b'\n');
    conn.write_all(&line).await?;
    Ok(())
}

async fn handle(d: Daemon, mut conn: UnixStream) -> Result<()> {
    let mut line = String::new();
    {
        let mut rd = BufReader::new(&mut conn);
        // Bounded: a request is a short JSON line.
        (&mut rd).take(64 * 1024).read_line(&mut line).await?;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return answer(&mut conn, &Answer::failed(format!("bad request: {e}"))).await;
        }
    };
    match req {
        Request::Status => answer(&mut conn, &Answer::status(d.status())).await,
        Request::Directory => {
            let dir = serde_json::to_value(d.directory())?;
            answer(&mut conn, &Answer::status(dir)).await
        }
        Request::Connect { host, port, framed } => {
            let ip = match d.directory().resolve(&host) {
                Ok(ip) => ip,
                Err(e) => return answer(&mut conn, &Answer::failed(e.to_string())).await,
            };
            match d.node.connect(SocketAddr::new(ip, port)).await {
                Ok(mut stream) => {
                    answer(&mut conn, &Answer { ok: true, error: None, status: None, framed }).await?;
                    if framed {
                        pipe_framed(conn, stream).await
                    } else {
                        // An older client: it cannot be told about a failure
                        // except by the pipe closing.
                        if tokio::io::copy_bidirectional(&mut conn, &mut stream).await.is_err() {
                            stream.abort();
                        }
                        Ok(())
                    }
                }
                Err(e) => answer(&mut conn, &Answer::failed(format!("{host}:{port}: {e}"))).await,
            }
        }
    }
}

/// How a framed pipe's tailnet side ended.
enum PipeEnd {
    /// The peer sent FIN (downstream) or the client half-closed (upstream).
    Clean,
    /// The tailnet connection failed; the client is told why.
    Failed(std::io::Error),
    /// The local client went away; nobody is left to tell.
    ClientGone,
}

/// Splice `conn` (framed towards it) and a tailnet stream until the peer
/// closes, the connection fails or the client leaves.
async fn pipe_framed(conn: UnixStream, stream: crate::dataplane::netstack::TcpStream) -> Result<()> {
    let (mut urd, mut uwr) = conn.into_split();
    let (mut trd, mut twr) = tokio::io::split(stream);
    let end = {
        let down = async {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                let n = match trd.read(&mut buf).await {
                    Ok(0) => return PipeEnd::Clean,
                    Ok(n) => n,
                    Err(e) => return PipeEnd::Failed(e),
                };
                let mut head = [Frame::DATA, 0, 0, 0, 0];
                head[1..].copy_from_slice(&(n as u32).to_be_bytes());
                if uwr.write_all(&head).await.is_err() || uwr.write_all(&buf[..n]).await.is_err() {
                    return PipeEnd::ClientGone;
                }
            }
        };
        let up = async {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                let n = match urd.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => return PipeEnd::ClientGone,
                };
                if let Err(e) = twr.write_all(&buf[..n]).await {
                    return PipeEnd::Failed(e);
                }
            }
            match twr.shutdown().await {
                Ok(()) => PipeEnd::Clean,
                Err(e) => PipeEnd::Failed(e),
            }
        };
        tokio::pin!(down, up);
        let mut up_done = false;
        loop {
            tokio::select! {
                end = &mut down => break end,
                end = &mut up, if !up_done => match end {
                    PipeEnd::Clean => up_done = true,
                    other => break other,
                },
            }
        }
    };
    let mut stream = trd.unsplit(twr);
    match end {
        PipeEnd::Clean => uwr.write_all(&[Frame::END]).await?,
        PipeEnd::Failed(e) => {
            stream.abort();
            let why: String = e.to_string().chars().take(1024).collect();
            let mut frame = vec![Frame::FAILED];
            frame.extend_from_slice(&(why.len() as u32).to_be_bytes());
            frame.extend_from_slice(why.as_bytes());
            uwr.write_all(&frame).await?;
            return Err(e.into());
        }
        PipeEnd::ClientGone => stream.abort(),
    }
    Ok(())
}

/// The client side of a framed pipe: copy the data frames to `out` until the
/// daemon reports the end. A failure frame, or the daemon vanishing without
/// one, is an error.
pub(crate) async fn copy_framed<R, W>(rd: R, mut out: W) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use std::io::{Error, ErrorKind};
    let vanished =
        |_| Error::new(ErrorKind::UnexpectedEof, "the tailgate daemon closed the connection without saying how it ended (did it stop?)");
    let mut buf = vec![0u8; MAX_FRAME];
    // Buffered so that a frame's header is not a syscall of its own, and so
    // we know when the daemon has nothing more queued: that is when `out`
    // must be flushed (std's stdout under tokio's is line-buffered, and an
    // SSH key exchange has no newlines; unflushed, it waits forever).
    let mut rd = tokio::io::BufReader::with_capacity(MAX_FRAME + 5, rd);
    loop {
        if rd.buffer().is_empty() {
            out.flush().await?;
        }
        let tag = rd.read_u8().await.map_err(vanished)?;
        match tag {
            Frame::END => {
                out.flush().await?;
                return Ok(());
            }
            Frame::DATA | Frame::FAILED => {
                let len = rd.read_u32().await.map_err(vanished)? as usize;
                if len > MAX_FRAME {
                    return Err(Error::new(ErrorKind::InvalidData, "the daemon sent an oversized frame"));
                }
                rd.read_exact(&mut buf[..len]).await.map_err(vanished)?;
                if tag == Frame::FAILED {
                    let _ = out.flush().await;
                    return Err(Error::other(String::from_utf8_lossy(&buf[..len]).into_owned()));
                }
                out.write_all(&buf[..len]).await?;
            }
            _ => return Err(Error::new(ErrorKind::InvalidData, format!("the daemon sent an unknown frame tag {tag:#04x}"))),
        }
    }
}

/// Send one request; returns the answer and the connection (raw after `connect`).
pub(crate) async fn request(state_dir: &Path, req: &Request) -> Result<(Answer, UnixStream)> {
    let path = socket_path(state_dir);
    let mut conn = UnixStream::connect(&path)
        .await
        .with_context(|| format!("no tailgate daemon answers at {} (start one with `tailgate up`)", path.display()))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    conn.write_all(&line).await?;
    // Read the answer byte by byte: after a `connect` answer the stream
    // carries the remote's bytes, which a buffered reader would swallow.
    let mut buf = Vec::new();
    loop {
        let b = conn.read_u8().await.context("the daemon closed the local API connection")?;
        if b == b'\n' {
            break;
        }
        buf.push(b);
        if buf.len() > 16 * 1024 * 1024 {
            bail!("local API answer too long");
        }
    }
    let a: Answer = serde_json::from_slice(&buf).context("malformed local API answer")?;
    Ok((a, conn))
}

/// Whether a daemon is listening in this state directory.
pub(crate) fn daemon_running(state_dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(socket_path(state_dir)).is_ok()
}

/// The running daemon's name directory.
pub(crate) async fn fetch_directory(state_dir: &Path) -> Result<Directory> {
    let (a, _) = request(state_dir, &Request::Directory).await?;
    match (a.ok, a.status) {
        (true, Some(v)) => Ok(serde_json::from_value(v)?),
        _ => bail!("{}", a.error.unwrap_or_else(|| "the daemon sent no directory".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn framed_data_is_flushed_while_the_pipe_stays_open() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut daemon, client) = tokio::io::duplex(1024);
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        // Holds bytes until flushed, as std's line-buffered stdout holds binary data.
        let task = tokio::spawn(super::copy_framed(client, tokio::io::BufWriter::new(out_w)));
        daemon.write_all(&[b'D', 0, 0, 0, 3, 1, 2, 3]).await.unwrap();
        let mut got = [0u8; 3];
        tokio::time::timeout(std::time::Duration::from_secs(5), out_r.read_exact(&mut got))
            .await
            .expect("a data frame must reach the output while the pipe stays open")
            .unwrap();
        assert_eq!(got, [1, 2, 3]);
        daemon.write_all(b"E").await.unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn socket_is_0600_from_creation_even_under_a_permissive_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = super::socket_path(dir.path());
        // With umask 0 a plain bind() makes the socket 0777 until a chmod.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let bound = super::bind_private(&path);
        nix::sys::stat::umask(old);
        let _listener = bound.unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Only the socket is left in the state directory, and it answers.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(super::SOCKET_NAME)]);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        // A second bind on the same path fails instead of replacing it.
        assert!(super::bind_private(&path).is_err());
    }
}
