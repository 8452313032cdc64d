//! One running session (shell, exec or subsystem) on a session channel.
//!
//! Data flow: client data arrives in the russh handler and is queued for the
//! stdin task. russh re-opens the SSH window as soon as data arrives, so the
//! only way to push back on a client is for the handler to wait, which stalls
//! the whole connection loop. Waiting is safe only while this session's
//! output is not itself waiting on that loop (`ssh host cat`: the child
//! blocks on its full stdout, the pump waits for window, the window update
//! sits unread behind the stalled loop). So the handler waits when the queue
//! is over a soft limit and the output is idle, lets the queue grow while
//! output is in flight, and past a hard limit ends the session rather than
//! hang the connection. Output goes through a flow-controlled channel writer,
//! so a slow client throttles the child through its pipe/pty.
//!
//! One supervisor task owns the child: it waits for it, enforces the time
//! limit, tears the process group down and reports EOF, exit status and
//! close in that order.
#![warn(missing_docs)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{ChannelId, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::audit::EventKind;
use super::handler::{ConnCtx, Live};
use super::process::{self, ChildIo, PtyMaster, Spawned};
use super::recording::Recorder;

/// After the main process exits, output still arriving is forwarded, but
/// once the pipes/pty stay silent this long we stop waiting for EOF (a
/// background process may hold them open forever).
const DRAIN_IDLE: Duration = Duration::from_millis(1500);
/// How long recorded output may wait in the recorder's batch (see
/// [`super::recording::BATCH`]): well below what a person notices in the
/// shipping lag, and a bulk session fills a batch long before.
const REC_FLUSH: Duration = Duration::from_millis(20);
/// Between SIGHUP/SIGTERM and SIGKILL when we end a session.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Queued client bytes above which the handler waits for the child (if its output is idle).
const STDIN_SOFT_LIMIT: usize = 8 << 20;
/// Queued client bytes at which the session is ended instead (output stuck too).
const STDIN_HARD_LIMIT: usize = 64 << 20;

/// Messages from the handler to the stdin task.
pub(crate) enum Input {
    Data(Bytes),
    Eof,
}

/// State shared by the handler, the stdin task and the output pumps.
#[derive(Default)]
struct Flow {
    queued: AtomicUsize,
    /// Output pumps currently blocked handing data to the connection.
    output_busy: AtomicUsize,
    /// Signalled when `queued` drops or `output_busy` rises.
    wake: Notify,
}

/// Outcome of [`StdinQueue::push`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// The child's stdin is gone; further data is discarded.
    Closed,
    /// Neither the child nor the client is draining: the session must end.
    Overflow,
}

/// The handler's end of a session's stdin.
pub(crate) struct StdinQueue {
    tx: mpsc::UnboundedSender<Input>,
    flow: Arc<Flow>,
}

impl StdinQueue {
    pub(crate) async fn push(&self, data: &[u8]) -> Pushed {
        let f = &self.flow;
        let mut throttled = false;
        loop {
            if self.tx.is_closed() {
                return Pushed::Closed;
            }
            let queued = f.queued.load(Ordering::Acquire);
            if queued < STDIN_SOFT_LIMIT {
                break;
            }
            if f.output_busy.load(Ordering::Acquire) > 0 {
                if queued >= STDIN_HARD_LIMIT {
                    return Pushed::Overflow;
                }
                // Waiting for the child could deadlock (see module docs), but a
                // short pause per packet slows the client down enough for the
                // connection loop to move output in between.
                if !throttled {
                    throttled = true;
                    let notified = f.wake.notified();
                    let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
                    continue;
                }
                break;
            }
            let notified = f.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if f.queued.load(Ordering::Acquire) < STDIN_SOFT_LIMIT || f.output_busy.load(Ordering::Acquire) > 0 {
                continue;
            }
            // The timeout only guards against a task that died without notifying.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        f.queued.fetch_add(data.len(), Ordering::AcqRel);
        if self.tx.send(Input::Data(Bytes::copy_from_slice(data))).is_ok() { Pushed::Queued } else { Pushed::Closed }
    }

    pub(crate) fn eof(&self) {
        let _ = self.tx.send(Input::Eof);
    }
}

/// Why the session is being ended from our side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The client closed the channel or the connection went away.
    Closed,
    /// The policy's max_duration elapsed.
    TimeLimit(Duration),
    /// Client input piled up with nobody draining it (see module docs).
    Overflow,
    /// The login no longer holds (policy or identity changed): the message shown.
    Revoked(String),
    /// `record = "required"` and the recording can neither be shipped nor spooled.
    RecordingLost,
}

/// What the handler keeps to steer a running session.
pub(crate) struct Control {
    pub stdin: Option<StdinQueue>,
    pub pgid: i32,
    pub pty: Option<PtyMaster>,
    pub recorder: Option<Arc<Mutex<Recorder>>>,
    /// Ends the session when sent on or dropped (channel closed, connection gone).
    pub stop: watch::Sender<Option<Stop>>,
}

impl Control {
    pub(crate) fn resize(&self, cols: u32, rows: u32, px_w: u32, px_h: u32) {
        if let Some(p) = &self.pty {
            process::set_winsize(p.raw_fd(), cols, rows, px_w, px_h);
        }
        if let Some(r) = &self.recorder {
            r.lock().unwrap_or_else(|e| e.into_inner()).resize(cols, rows);
        }
    }

    pub(crate) fn signal(&self, sig: i32) {
        process::signal_group(self.pgid, sig);
    }
}

/// Everything the supervisor needs; built by the handler after a successful spawn.
pub(crate) struct Running {
    pub ctx: Arc<ConnCtx>,
    pub session_id: String,
    pub login: String,
    pub kind: &'static str,
    pub command: Option<String>,
    pub pty: bool,
    pub channel: ChannelId,
    pub writer: ChannelWriteHalf<Msg>,
    pub handle: Handle,
    /// The connection's live state: revocation and the current time limit.
    pub live: watch::Receiver<Live>,
    pub recorder: Option<Arc<Mutex<Recorder>>>,
    pub started: Instant,
    /// `session{session, kind}` under the connection's span: the session's
    /// tasks run in it.
    pub span: tracing::Span,
}

fn in_span<F: std::future::Future>(span: &tracing::Span, f: F) -> tracing::instrument::Instrumented<F> {
    tracing::Instrument::instrument(f, span.clone())
}

/// Starts the stdin task and the supervisor; returns the handler's control.
pub(crate) fn start(spawned: Spawned, run: Running) -> Control {
    let Spawned { child, pgid, io } = spawned;
    let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));
    let flow = Arc::new(Flow::default());
    let queue = StdinQueue { tx: stdin_tx, flow: flow.clone() };
    let mut feed = Feed { rx: stdin_rx, flow: flow.clone(), count: bytes_in.clone() };
    let (stop_tx, stop_rx) = watch::channel(None);
    // Not a stop_tx clone: the supervisor treats "every sender dropped" as
    // the channel being closed, so pumps must not hold one.
    let lost = Arc::new(tokio::sync::Notify::new());
    let (exited_tx, exited_rx) = watch::channel(false);

    let mut pumps = Vec::new();
    let pty_master;
    let stdin_task = match io {
        ChildIo::Pipes { stdin, stdout, stderr } => {
            pty_master = None;
            pumps.push(tokio::spawn(in_span(
                &run.span,
                pump(
                    stdout,
                    run.writer.make_writer(),
                    run.recorder.clone().map(|r| (r, lost.clone())),
                    exited_rx.clone(),
                    bytes_out.clone(),
                    flow.clone(),
                ),
            )));
            pumps.push(tokio::spawn(in_span(
                &run.span,
                pump(
                    stderr,
                    run.writer.make_writer_ext(Some(1)),
                    run.recorder.clone().map(|r| (r, lost.clone())),
                    exited_rx.clone(),
                    bytes_out.clone(),
                    flow.clone(),
                ),
            )));
            tokio::spawn(in_span(&run.span, async move { feed.run(stdin, true).await }))
        }
        ChildIo::Pty { master, .. } => {
            pty_master = Some(master.clone());
            pumps.push(tokio::spawn(in_span(
                &run.span,
                pump(
                    master.clone(),
                    run.writer.make_writer(),
                    run.recorder.clone().map(|r| (r, lost.clone())),
                    exited_rx.clone(),
                    bytes_out.clone(),
                    flow.clone(),
                ),
            )));
            // A pty has one descriptor for both directions: client EOF cannot
            // be passed on as a half-close, so it is ignored (as sshd does).
            tokio::spawn(in_span(&run.span, async move { feed.run(master, false).await }))
        }
    };

    let control = Control { stdin: Some(queue), pgid, pty: pty_master, recorder: run.recorder.clone(), stop: stop_tx };
    let span = run.span.clone();
    let sup = Supervised { child, pgid, run, stop: stop_rx, exited_tx, pumps, stdin_task, bytes_in, bytes_out, lost };
    tokio::spawn(in_span(&span, supervise(sup)));
    control
}

/// The stdin task's end of the queue.
struct Feed {
    rx: mpsc::UnboundedReceiver<Input>,
    flow: Arc<Flow>,
    count: Arc<AtomicU64>,
}

impl Feed {
    async fn next(&mut self) -> Option<Input> {
        let msg = self.rx.recv().await;
        if let Some(Input::Data(d)) = &msg {
            self.flow.queued.fetch_sub(d.len(), Ordering::AcqRel);
            self.flow.wake.notify_waiters();
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

const RECORDING_LOST: &str = "\r\ntailgate: session ended: this session must be recorded, but the recording can neither \
     reach the control server nor be spooled on this node (see the node's log)\r\n";

async fn pump<R, W>(
    mut r: R,
    mut w: W,
    recorder: Option<(Arc<Mutex<Recorder>>, Arc<tokio::sync::Notify>)>,
    mut exited: watch::Receiver<bool>,
    count: Arc<AtomicU64>,
    flow: Arc<Flow>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 32 * 1024];
    // When output left in the recorder's batch is handed to the journal.
    let mut flush_at: Option<tokio::time::Instant> = None;
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
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                    flush_at = None;
                    if let Some((rec, _)) = &recorder {
                        flush_recording(rec).await;
                    }
                    continue;
                }
            }
        };
        let n = match n {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some((rec, lost_signal)) = &recorder
            && rec.lock().unwrap_or_else(|e| e.into_inner()).lost()
        {
            // Fail closed: this output is not passed on unrecorded.
            lost_signal.notify_one();
            break;
        }
        flow.output_busy.fetch_add(1, Ordering::AcqRel);
        flow.wake.notify_waiters();
        let res = w.write_all(&buf[..n]).await;
        flow.output_busy.fetch_sub(1, Ordering::AcqRel);
        if let Some((rec, _)) = &recorder {
            // Encoded once the client has it: the session's next read does
            // not wait for the encoding. The write happens on the journal's
            // thread, and waiting for room there is backpressure.
            let (full, pending) = {
                let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
                (r.encode_output(&buf[..n]), r.pending())
            };
            if full {
                flush_recording(rec).await;
                flush_at = None;
            } else if !pending {
                flush_at = None;
            } else if flush_at.is_none() {
                flush_at = Some(tokio::time::Instant::now() + REC_FLUSH);
            }
        }
        if res.is_err() {
            break;
        }
    }
    if let Some((rec, _)) = &recorder {
        flush_recording(rec).await;
    }
}

/// Hands what waits in the recorder's batch to the journal.
async fn flush_recording(rec: &Mutex<Recorder>) {
    let handle = rec.lock().unwrap_or_else(|e| e.into_inner()).handle();
    let _order = handle.order.lock().await;
    let batch = rec.lock().unwrap_or_else(|e| e.into_inner()).take_batch();
    if let Some(b) = batch {
        handle.send(b).await;
    }
}

/// The supervisor's inputs: the child, the tasks around it and their counters.
struct Supervised {
    child: tokio::process::Child,
    pgid: i32,
    run: Running,
    /// Why the handler wants the session to end (or that it is gone).
    stop: watch::Receiver<Option<Stop>>,
    /// Tells the output pumps the main process has exited.
    exited_tx: watch::Sender<bool>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    stdin_task: tokio::task::JoinHandle<()>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    /// A required recording could not be kept.
    lost: Arc<tokio::sync::Notify>,
}

/// How the main process ended, as SSH reports it.
#[derive(Default)]
struct ExitReport {
    status: Option<u32>,
    /// Signal name and whether it dumped core.
    signal: Option<(String, bool)>,
}

async fn supervise(mut s: Supervised) {
    let (status, stopped, kill_pending) = wait_or_stop(&mut s).await;
    reap_group(s.pgid, stopped.is_some(), kill_pending);
    let _ = s.exited_tx.send(true);
    for p in std::mem::take(&mut s.pumps) {
        let _ = p.await;
    }
    s.stdin_task.abort();

    let mut exit = ExitReport::default();
    match &status {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            if let Some(code) = st.code() {
                exit.status = Some(code as u32);
            } else if let Some(sig) = st.signal() {
                exit.signal = Some((process::signal_name(sig), st.core_dumped()));
            }
        }
        Err(e) => tracing::warn!("waiting for session process: {e}"),
    }
    let run = &s.run;
    if stopped != Some(Stop::Closed) {
        let _ = run.writer.eof().await;
        if let Some(code) = exit.status {
            let _ = run.writer.exit_status(code).await;
        } else if let Some((name, core)) = &exit.signal {
            let _ = run.handle.exit_signal_request(run.channel, ssh_sig(name), *core, String::new(), "en".into()).await;
        }
        let _ = run.writer.close().await;
    }
    audit_end(&s, exit, stopped);
}

/// Waits for the main process, ending it (TERM, then KILL after a grace)
/// when the handler, the live state, the recording or the time limit says
/// so. Returns its status, why we stopped it, and whether a KILL is due.
async fn wait_or_stop(s: &mut Supervised) -> (std::io::Result<std::process::ExitStatus>, Option<Stop>, bool) {
    let mut live = s.run.live.clone();
    let mut live_open = true;
    let mut stopped: Option<Stop> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let writer = &s.run.writer;
    let pgid = s.pgid;
    let end = |why: Stop, stopped: &mut Option<Stop>, kill_at: &mut Option<tokio::time::Instant>| {
        *stopped = Some(why);
        terminate(pgid);
        *kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
    };
    let status = loop {
        let (revoked, limit) = {
            let l = live.borrow_and_update();
            (l.revoked.clone(), l.deadline)
        };
        if let (Some(msg), None) = (revoked, &stopped) {
            let _ = writer.extended_data_bytes(1, Bytes::from(format!("\r\n{msg}\r\n"))).await;
            end(Stop::Revoked(msg), &mut stopped, &mut kill_at);
        }
        // Re-armed every turn: a policy change may add, move or drop the limit.
        let deadline = async {
            match limit {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let kill_timer = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = s.child.wait() => break st,
            r = s.stop.changed(), if stopped.is_none() => {
                // Err: the handler dropped the sender (channel closed / connection gone).
                let why = match r { Ok(()) => s.stop.borrow().clone().unwrap_or(Stop::Closed), Err(_) => Stop::Closed };
                if why == Stop::Overflow {
                    let msg = "\r\ntailgate: session ended: input piled up while the program's output was blocked\r\n";
                    let _ = writer.extended_data_bytes(1, Bytes::from_static(msg.as_bytes())).await;
                }
                end(why, &mut stopped, &mut kill_at);
            }
            r = live.changed(), if live_open && stopped.is_none() => live_open = r.is_ok(),
            _ = s.lost.notified(), if stopped.is_none() => {
                let _ = writer.extended_data_bytes(1, Bytes::from_static(RECORDING_LOST.as_bytes())).await;
                end(Stop::RecordingLost, &mut stopped, &mut kill_at);
            }
            _ = deadline, if stopped.is_none() => {
                let limit = limit.map(|(_, d)| d).unwrap_or_default();
                let msg = format!("\r\ntailgate: session time limit ({}) reached, closing\r\n", human_duration(limit));
                let _ = writer.extended_data_bytes(1, Bytes::from(msg)).await;
                end(Stop::TimeLimit(limit), &mut stopped, &mut kill_at);
            }
            _ = kill_timer => {
                process::signal_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
        }
    };
    (status, stopped, kill_at.is_some())
}

/// The main process is gone. Whatever else it left in its process group is
/// hung up (killed outright if we are the ones ending the session).
fn reap_group(pgid: i32, we_stopped_it: bool, kill_pending: bool) {
    if !we_stopped_it {
        process::signal_group(pgid, libc::SIGHUP);
    } else if kill_pending {
        // The rest of the group got HUP/TERM with the main process; give it
        // the same grace to run its exit handlers before SIGKILL. Killing it
        // at once stranded lock files mid-cleanup (a root .bashrc's `pyenv
        // rehash` lock then hung every later root login for a minute).
        tokio::spawn(async move {
            tokio::time::sleep(KILL_GRACE).await;
            process::signal_group(pgid, libc::SIGKILL);
        });
    } else {
        process::signal_group(pgid, libc::SIGKILL);
    }
}

/// The `session_end` audit event (and the recording's last line).
fn audit_end(s: &Supervised, exit: ExitReport, stopped: Option<Stop>) {
    let run = &s.run;
    let recording = run.recorder.as_ref().map(|r| {
        let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
        r.finish();
        r.path().display().to_string()
    });
    let mut ev = run.ctx.event(EventKind::SessionEnd);
    ev.session = Some(run.session_id.clone());
    ev.login = Some(run.login.clone());
    ev.kind = Some(run.kind.to_string());
    ev.command = run.command.clone();
    ev.pty = Some(run.pty);
    ev.bytes_in = Some(s.bytes_in.load(Ordering::Relaxed));
    ev.bytes_out = Some(s.bytes_out.load(Ordering::Relaxed));
    ev.exit_status = exit.status;
    ev.exit_signal = exit.signal.map(|(n, _)| n);
    ev.duration_ms = Some(run.started.elapsed().as_millis() as u64);
    ev.recording = recording;
    ev.reason = match stopped {
        Some(Stop::Closed) => Some("closed by client".into()),
        Some(Stop::TimeLimit(d)) => Some(format!("time limit {} reached", human_duration(d))),
        Some(Stop::Overflow) => Some("input overflow: the program stopped reading while its output was blocked".into()),
        Some(Stop::Revoked(msg)) => Some(msg.trim_start_matches("tailgate: ").to_string()),
        Some(Stop::RecordingLost) => Some("recording required but it can neither be shipped nor spooled".into()),
        None => None,
    };
    tracing::debug!(exit_status = ?ev.exit_status, reason = ev.reason.as_deref(), "session ended");
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
pub(crate) fn sig_number(sig: &Sig) -> Option<i32> {
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

pub(crate) fn human_duration(d: Duration) -> String {
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
