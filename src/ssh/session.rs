//! One running session (shell, exec or subsystem) on a session channel.
//!
//! Data flow: client data arrives in the russh handler and is queued for the
//! stdin task. russh re-opens the SSH window as soon as data arrives, so the
//! only backpressure on the client is the handler awaiting; awaiting on a
//! small queue would deadlock `ssh host cat` (the child waits for us to take
//! its output, the connection loop waits for the child to take its input),
//! so the queue is bounded by bytes (a few MiB) rather than kept minimal.
//! Output is pumped into a flow-controlled channel writer, so a slow client
//! throttles the child through its pipe/pty. One supervisor task
//! owns the child: it waits for it, enforces the time limit, tears the process
//! group down and reports exit status, EOF and close in that order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::audit::{AuditEvent, EventKind};
use super::handler::ConnCtx;
use super::process::{self, ChildIo, PtyMaster, Spawned};
use super::recording::Recorder;

/// After the main process exits, output still arriving is forwarded, but
/// once the pipes/pty stay silent this long we stop waiting for EOF (a
/// background process may hold them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(1500);
/// Between SIGHUP/SIGTERM and SIGKILL when we end a session.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Client bytes queued per session before the connection is back-pressured.
const STDIN_LIMIT: usize = 4 << 20;

/// Messages from the handler to the stdin task.
pub enum Input {
    Data(Bytes),
    Eof,
}

/// The handler's end of a session's stdin: a byte-bounded queue.
pub struct StdinQueue {
    tx: mpsc::UnboundedSender<Input>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl StdinQueue {
    /// Queues client data, waiting while more than [`STDIN_LIMIT`] bytes are
    /// pending. Returns false once the child's stdin is gone.
    pub async fn push(&self, data: &[u8]) -> bool {
        loop {
            if self.tx.is_closed() {
                return false;
            }
            if self.queued.load(Ordering::Acquire) < STDIN_LIMIT {
                break;
            }
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued.load(Ordering::Acquire) < STDIN_LIMIT {
                break;
            }
            // The timeout only guards against a stdin task that died without notifying.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        self.queued.fetch_add(data.len(), Ordering::AcqRel);
        self.tx.send(Input::Data(Bytes::copy_from_slice(data))).is_ok()
    }

    pub fn eof(&self) {
        let _ = self.tx.send(Input::Eof);
    }
}

/// Why the session is being ended from our side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The client closed the channel or the connection went away.
    Closed,
    /// The policy's max_duration elapsed.
    TimeLimit(Duration),
}

/// What the handler keeps to steer a running session.
pub struct Control {
    pub stdin: Option<StdinQueue>,
    pub pgid: i32,
    pub pty: Option<PtyMaster>,
    pub recorder: Option<Arc<Mutex<Recorder>>>,
    /// Never sent on: dropping it (channel closed, connection gone) is what
    /// tells the supervisor to end the session.
    pub _stop: watch::Sender<Option<Stop>>,
}

impl Control {
    pub fn resize(&self, cols: u32, rows: u32, px_w: u32, px_h: u32) {
        if let Some(p) = &self.pty {
            process::set_winsize(p.raw_fd(), cols, rows, px_w, px_h);
        }
        if let Some(r) = &self.recorder {
            r.lock().unwrap_or_else(|e| e.into_inner()).resize(cols, rows);
        }
    }

    pub fn signal(&self, sig: i32) {
        process::signal_group(self.pgid, sig);
    }
}

/// Everything the supervisor needs; built by the handler after a successful spawn.
pub struct Running {
    pub ctx: Arc<ConnCtx>,
    pub session_id: String,
    pub login: String,
    pub kind: &'static str,
    pub command: Option<String>,
    pub pty: bool,
    pub channel: ChannelId,
    pub writer: ChannelWriteHalf<Msg>,
    pub handle: Handle,
    pub deadline: Option<(Instant, Duration)>,
    pub recorder: Option<Arc<Mutex<Recorder>>>,
    pub started: Instant,
}

/// Starts the stdin task and the supervisor; returns the handler's control.
pub fn start(spawned: Spawned, run: Running) -> Control {
    let Spawned { child, pgid, io } = spawned;
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));
    let queue = StdinQueue { tx: stdin_tx, queued: Arc::new(AtomicUsize::new(0)), drained: Arc::new(Notify::new()) };
    let mut feed = Feed {
        rx: stdin_rx,
        queued: queue.queued.clone(),
        drained: queue.drained.clone(),
        count: bytes_in.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(None);
    let (exited_tx, exited_rx) = watch::channel(false);

    let mut pumps = Vec::new();
    let pty_master;
    let stdin_task = match io {
        ChildIo::Pipes { stdin, stdout, stderr } => {
            pty_master = None;
            pumps.push(tokio::spawn(pump(stdout, run.writer.make_writer(), run.recorder.clone(), exited_rx.clone(), bytes_out.clone())));
            pumps.push(tokio::spawn(pump(stderr, run.writer.make_writer_ext(Some(1)), run.recorder.clone(), exited_rx.clone(), bytes_out.clone())));
            tokio::spawn(async move { feed.run(stdin, true).await })
        }
        ChildIo::Pty { master, .. } => {
            pty_master = Some(master.clone());
            pumps.push(tokio::spawn(pump(master.clone(), run.writer.make_writer(), run.recorder.clone(), exited_rx.clone(), bytes_out.clone())));
            // A pty has one descriptor for both directions: client EOF cannot
            // be passed on as a half-close, so it is ignored (as sshd does).
            tokio::spawn(async move { feed.run(master, false).await })
        }
    };

    let control = Control {
        stdin: Some(queue),
        pgid,
        pty: pty_master,
        recorder: run.recorder.clone(),
        _stop: stop_tx,
    };
    tokio::spawn(supervise(child, pgid, run, stop_rx, exited_tx, pumps, stdin_task, bytes_in, bytes_out));
    control
}

/// The stdin task's end of the queue.
struct Feed {
    rx: mpsc::UnboundedReceiver<Input>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    count: Arc<AtomicU64>,
}

impl Feed {
    async fn next(&mut self) -> Option<Input> {
        let msg = self.rx.recv().await;
        if let Some(Input::Data(d)) = &msg {
            self.queued.fetch_sub(d.len(), Ordering::AcqRel);
            self.drained.notify_waiters();
        }
        msg
    }

    async fn run<W: AsyncWrite + Unpin>(&mut self, mut w: W, close_on_eof: bool) {
        while let Some(msg) = self.next().await {
            match msg {
                Input::Data(d) => {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                    if w.write_all(&d).await.is_err() {
                        break;
                    }
                }
                Input::Eof if close_on_eof => break,
                Input::Eof => {}
            }
        }
        // Closing our end is how the child sees EOF. Keep draining so the
        // handler never waits on a queue nobody empties.
        drop(w);
        while self.next().await.is_some() {}
    }
}

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    recorder: Option<Arc<Mutex<Recorder>>>,
    mut exited: watch::Receiver<bool>,
    count: Arc<AtomicU64>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_IDLE, r.read(&mut buf)).await {
                Ok(res) => res,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                res = r.read(&mut buf) => res,
                // Re-enter the loop to apply the idle limit from now on.
                _ = exited.changed() => continue,
            }
        };
        let n = match n {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(rec) = &recorder {
            rec.lock().unwrap_or_else(|e| e.into_inner()).output(&buf[..n]);
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    mut child: tokio::process::Child,
    pgid: i32,
    run: Running,
    mut stop: watch::Receiver<Option<Stop>>,
    exited_tx: watch::Sender<bool>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    stdin_task: tokio::task::JoinHandle<()>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
) {
    let deadline = async {
        match run.deadline {
            Some((at, _)) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);

    let mut stopped: Option<Stop> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        let kill_timer = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = child.wait() => break st,
            r = stop.changed(), if stopped.is_none() => {
                // Err: the handler dropped the sender (channel closed / connection gone).
                let why = match r { Ok(()) => stop.borrow().clone().unwrap_or(Stop::Closed), Err(_) => Stop::Closed };
                stopped = Some(why);
                terminate(pgid);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            _ = &mut deadline, if stopped.is_none() => {
                let limit = run.deadline.map(|(_, d)| d).unwrap_or_default();
                let msg = format!("\r\ntailgate: session time limit ({}) reached, closing\r\n", human_duration(limit));
                let _ = run.writer.extended_data_bytes(1, Bytes::from(msg)).await;
                stopped = Some(Stop::TimeLimit(limit));
                terminate(pgid);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            _ = kill_timer => {
                process::signal_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
        }
    };

    // The main process is gone. Whatever else it left in its process group
    // is hung up (killed outright if we are the ones ending the session).
    if stopped.is_some() {
        process::signal_group(pgid, libc::SIGKILL);
    } else {
        process::signal_group(pgid, libc::SIGHUP);
    }
    let _ = exited_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    stdin_task.abort();

    let mut exit_status = None;
    let mut exit_signal = None;
    match &status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = st.code() {
                exit_status = Some(code as u32);
            } else if let Some(sig) = st.signal() {
                exit_signal = Some((process::signal_name(sig), st.core_dumped()));
            }
        }
        Err(e) => tracing::warn!(session = %run.session_id, "waiting for session process: {e}"),
    }

    if stopped != Some(Stop::Closed) {
        let _ = run.writer.eof().await;
        if let Some(code) = exit_status {
            let _ = run.writer.exit_status(code).await;
        } else if let Some((name, core)) = &exit_signal {
            let _ = run.handle.exit_signal_request(run.channel, ssh_sig(name), *core, String::new(), "en".into()).await;
        }
        let _ = run.writer.close().await;
    }

    let recording = run.recorder.as_ref().map(|r| {
        let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
        r.finish();
        r.path().display().to_string()
    });
    let mut ev = AuditEvent::new(EventKind::SessionEnd, &run.ctx.conn_id, &run.ctx.caller, &run.ctx.target, SystemTime::now());
    ev.session = Some(run.session_id.clone());
    ev.login = Some(run.login.clone());
    ev.kind = Some(run.kind.to_string());
    ev.command = run.command.clone();
    ev.pty = Some(run.pty);
    ev.bytes_in = Some(bytes_in.load(Ordering::Relaxed));
    ev.bytes_out = Some(bytes_out.load(Ordering::Relaxed));
    ev.exit_status = exit_status;
    ev.exit_signal = exit_signal.map(|(n, _)| n);
    ev.duration_ms = Some(run.started.elapsed().as_millis() as u64);
    ev.recording = recording;
    ev.reason = match stopped {
        Some(Stop::Closed) => Some("closed by client".into()),
        Some(Stop::TimeLimit(d)) => Some(format!("time limit {} reached", human_duration(d))),
        None => None,
    };
    run.ctx.server.audit.write(&ev);
}

fn terminate(pgid: i32) {
    // HUP is what a vanished terminal delivers; TERM for processes ignoring
    // it (nohup); CONT so stopped jobs can act on them.
    process::signal_group(pgid, libc::SIGHUP);
    process::signal_group(pgid, libc::SIGTERM);
    process::signal_group(pgid, libc::SIGCONT);
}

fn ssh_sig(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        other => Sig::Custom(other.to_string()),
    }
}

/// The signal number for an SSH `signal` request.
pub fn sig_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) => return process::signal_number(name),
    })
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(human_duration(Duration::from_secs(120)), "2m");
        assert_eq!(human_duration(Duration::from_secs(90)), "90s");
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn signals_map_both_ways() {
        for n in ["INT", "TERM", "HUP", "WINCH", "USR2"] {
            let num = sig_number(&ssh_sig(n)).unwrap();
            assert_eq!(process::signal_name(num), n);
        }
    }
}
