//! The node's audit and recording writer: one OS thread owns `audit.jsonl`,
//! the hash-chain state and every open recording, fed by one bounded queue.
//!
//! Why a thread: file writes and flushes must not run on async workers
//! (issue 12, defect 4), and one consumer keeps the order in which events
//! were produced. Why a chain: the control server can tell when lines were
//! edited, dropped or rewritten before they were shipped (see [`Chain`]).
//!
//! The local files are also the shipping spool: [`crate::daemon::ship`] reads
//! unshipped lines and recording bytes from them, so recording costs one
//! write, not two.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use super::SshError;
use super::audit::AuditEvent;

/// File (in the state directory) holding the chain head: `id hash`.
pub(crate) const CHAIN_FILE: &str = "audit.chain";
/// The `prev` of a node's first event.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Lines longer than this have their command cut, so that every line fits a
/// control frame (64 KiB) with room to spare.
const MAX_LINE: usize = 16 * 1024;
const QUEUE: usize = 4096;
/// Recording bytes queued for the writer, in KiB, before a session's output
/// pump waits: a batch is up to 256 KiB, so the queue's message bound alone
/// would let a stalled disk pin a gigabyte.
const DATA_BUDGET_KIB: usize = 64 * 1024;

/// SHA-256 of one audit line (without its newline), hex.
pub(crate) fn line_hash(line: &str) -> String {
    hex(&Sha256::digest(line.as_bytes()))
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The head of a node's hash chain: the last event's id and line hash.
/// Each new event gets `id = last + 1` and `prev = hash`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chain {
    pub id: u64,
    pub hash: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain { id: 0, hash: GENESIS.into() }
    }
}

impl Chain {
    /// Stamps `ev` with the next id and the previous hash, returns its line
    /// (no newline) and advances.
    pub(crate) fn append(&mut self, ev: &mut AuditEvent) -> String {
        ev.id = Some(self.id + 1);
        ev.prev = Some(self.hash.clone());
        let mut line = ev.to_line();
        if line.len() > MAX_LINE {
            if let Some(c) = &mut ev.command {
                let mut cut = 4096.min(c.len());
                while !c.is_char_boundary(cut) {
                    cut -= 1;
                }
                c.truncate(cut);
                c.push_str("…(cut)");
            }
            line = ev.to_line();
        }
        let line = line.trim_end_matches('\n').to_string();
        self.id += 1;
        self.hash = line_hash(&line);
        line
    }

    fn encode(&self) -> String {
        format!("{:020} {}\n", self.id, self.hash)
    }

    fn decode(s: &str) -> Option<Chain> {
        let (id, hash) = s.trim().split_once(' ')?;
        let id = id.parse().ok()?;
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| Chain { id, hash: hash.into() })
    }

    /// The chain head as saved, or as derived from the log's last line,
    /// whichever is further: a truncated log then continues the old
    /// numbering (the server sees the gap) instead of reusing ids.
    pub(crate) fn load(state_dir: &Path, audit_path: &Path) -> Chain {
        let saved = std::fs::read_to_string(state_dir.join(CHAIN_FILE)).ok().and_then(|s| Chain::decode(&s));
        let from_log = last_line(audit_path).and_then(|l| {
            let v: serde_json::Value = serde_json::from_str(&l).ok()?;
            Some(Chain { id: v["id"].as_u64()?, hash: line_hash(&l) })
        });
        match (saved, from_log) {
            (Some(s), Some(l)) if l.id >= s.id => l,
            (Some(s), _) => s,
            (None, Some(l)) => l,
            (None, None) => Chain::default(),
        }
    }
}

fn last_line(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(64 * 1024);
    f.seek(SeekFrom::Start(start)).ok()?;
    BufReader::new(f).lines().map_while(Result::ok).filter(|l| !l.trim().is_empty()).last()
}

/// State shared between the writer thread, the SSH server and the shipper.
pub(crate) struct Shared {
    /// Bumped after every batch written: the shipper wakes on it.
    pub written: watch::Sender<u64>,
    /// The shipper holds a live control connection.
    pub connected: AtomicBool,
    /// A shipper exists (control mode): the backlog limit applies.
    pub shipping: AtomicBool,
    /// Bytes written locally but not yet acknowledged by control.
    pub backlog: AtomicU64,
    /// Backlog beyond which recording output is no longer written.
    pub limit: AtomicU64,
    /// Recording bytes written so far (all sessions): the shipper tells a
    /// busy session from its rate.
    pub recorded: AtomicU64,
    full_logged: AtomicBool,
    /// Recordings this writer made and the shipper has not finished, with
    /// how many bytes are on disk: the shipper reads sizes here instead of
    /// asking the file system on every pass. An entry appears before its
    /// file exists and its size only grows after a flush; `open` turns
    /// false after the last flush, with the final size.
    pub recs: std::sync::Mutex<std::collections::BTreeMap<String, LiveRec>>,
}

/// A recording as the writer last flushed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LiveRec {
    /// Bytes in the file (flushed).
    pub size: u64,
    /// Still being written (its session runs).
    pub open: bool,
}

impl Shared {
    pub(crate) fn recs(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, LiveRec>> {
        self.recs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn spool_full(&self) -> bool {
        self.shipping.load(Ordering::Acquire) && self.backlog.load(Ordering::Acquire) > self.limit.load(Ordering::Acquire)
    }
}

enum Cmd {
    Audit(Box<AuditEvent>),
    Open {
        session: String,
        header: String,
        failed: Arc<AtomicBool>,
        reply: oneshot::Sender<Result<PathBuf, SshError>>,
    },
    Data {
        session: String,
        bytes: Vec<u8>,
        /// KiB of [`Journal::budget`] to give back once written.
        permits: u32,
    },
    Close {
        session: String,
    },
    #[cfg_attr(not(test), allow(dead_code))] // sent by `flush`, which only the tests call
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer thread.
#[derive(Clone)]
pub(crate) struct Journal {
    tx: mpsc::Sender<Cmd>,
    pub shared: Arc<Shared>,
    audit_path: PathBuf,
    /// Bounds the recording bytes in the queue.
    budget: Arc<tokio::sync::Semaphore>,
}

/// Default backlog bound (`TAILGATE_SPOOL_LIMIT_MB` overrides).
pub(crate) const DEFAULT_SPOOL_LIMIT: u64 = 1024 * 1024 * 1024;

impl Journal {
    /// Opens `audit.jsonl` (0600) and starts the writer thread.
    pub(crate) fn open(state_dir: &Path, audit_path: &Path, recordings_dir: &Path) -> Result<Journal, SshError> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(audit_path).map_err(|e| SshError::io(audit_path, e))?;
        // An existing file created by something else keeps its mode on open; enforce ours.
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| SshError::io(audit_path, e))?;
        let chain_path = state_dir.join(CHAIN_FILE);
        let chain_file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(&chain_path)
            .map_err(|e| SshError::io(&chain_path, e))?;
        let chain = Chain::load(state_dir, audit_path);
        let limit = std::env::var("TAILGATE_SPOOL_LIMIT_MB")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(|mb| mb * 1024 * 1024)
            .unwrap_or(DEFAULT_SPOOL_LIMIT);
        let shared = Arc::new(Shared {
            written: watch::Sender::new(0),
            connected: AtomicBool::new(false),
            shipping: AtomicBool::new(false),
            backlog: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            recorded: AtomicU64::new(0),
            full_logged: AtomicBool::new(false),
            recs: Default::default(),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let budget = Arc::new(tokio::sync::Semaphore::new(DATA_BUDGET_KIB));
        let mut w = Writer {
            budget: budget.clone(),
            audit: file,
            audit_path: audit_path.to_path_buf(),
            chain,
            chain_file,
            recordings_dir: recordings_dir.to_path_buf(),
            open: HashMap::new(),
            shared: shared.clone(),
        };
        std::thread::Builder::new().name("audit-writer".into()).spawn(move || w.run(rx)).map_err(|e| SshError::io(audit_path, e))?;
        Ok(Journal { tx, shared, audit_path: audit_path.to_path_buf(), budget })
    }

    /// Path of `audit.jsonl` (the shipper reads it back).
    pub(crate) fn audit_path(&self) -> &Path {
        &self.audit_path
    }

    /// Queues an audit event. Never blocks an async worker for long: when
    /// the queue is full (the disk stalls) a multi-threaded runtime parks
    /// this worker until there is room, keeping the order of events.
    pub(crate) fn audit(&self, ev: AuditEvent) {
        self.send_sync(Cmd::Audit(Box::new(ev)));
    }

    fn send_sync(&self, cmd: Cmd) {
        let cmd = match self.tx.try_send(cmd) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer is gone; an audit event or recording output was lost");
                return;
            }
            Err(mpsc::error::TrySendError::Full(c)) => c,
        };
        let r = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.tx.blocking_send(cmd))
            }
            Ok(_) => {
                // A current-thread runtime cannot park; hand it to a task (order
                // may slip behind later events, which is logged).
                let tx = self.tx.clone();
                tracing::warn!("audit queue full on a single-threaded runtime; an event may be written out of order");
                tokio::spawn(async move {
                    let _ = tx.send(cmd).await;
                });
                Ok(())
            }
            Err(_) => self.tx.blocking_send(cmd),
        };
        if r.is_err() {
            tracing::error!("audit writer is gone; an audit event or recording output was lost");
        }
    }

    /// Creates `recordings/<session>.cast` (0600) with its header line.
    pub(crate) async fn open_recording(&self, session: &str, header: String) -> Result<RecHandle, SshError> {
        let failed = Arc::new(AtomicBool::new(false));
        let (reply, rx) = oneshot::channel();
        let gone = || SshError::io(&self.audit_path, std::io::Error::other("audit writer stopped"));
        self.tx.send(Cmd::Open { session: session.into(), header, failed: failed.clone(), reply }).await.map_err(|_| gone())?;
        let path = rx.await.map_err(|_| gone())??;
        Ok(RecHandle { journal: self.clone(), session: session.into(), path, failed, order: Default::default() })
    }

    /// Waits until everything queued so far is written.
    #[cfg_attr(not(test), allow(dead_code))] // the unit tests wait on it
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// One open recording, as the session sees it.
pub(crate) struct RecHandle {
    journal: Journal,
    session: String,
    path: PathBuf,
    /// Set by the writer when output could not be recorded (disk error, spool full).
    pub failed: Arc<AtomicBool>,
    /// Held from taking a batch until it is queued, so that batches taken by
    /// the session's two output pumps reach the file in the order taken.
    pub order: tokio::sync::Mutex<()>,
}

impl RecHandle {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
    /// Queues a batch of asciicast lines, waiting for room in the queue
    /// (backpressure on the session when the disk falls behind).
    pub(crate) async fn send(&self, bytes: Vec<u8>) {
        let kib = bytes.len().div_ceil(1024).clamp(1, DATA_BUDGET_KIB) as u32;
        // A writer that is gone refills nothing: do not wait for it.
        if self.journal.tx.is_closed() {
            return;
        }
        let Ok(p) = self.journal.budget.acquire_many(kib).await else { return };
        p.forget();
        let _ = self.journal.tx.send(Cmd::Data { session: self.session.clone(), bytes, permits: kib }).await;
    }
    /// Queues lines from synchronous code (resize events, the last batch);
    /// outside the byte budget, which is at most one batch per session.
    pub(crate) fn send_sync(&self, bytes: Vec<u8>) {
        self.journal.send_sync(Cmd::Data { session: self.session.clone(), bytes, permits: 0 });
    }
    pub(crate) fn close(&self) {
        self.journal.send_sync(Cmd::Close { session: self.session.clone() });
    }
}

struct OpenRec {
    out: std::io::BufWriter<File>,
    path: PathBuf,
    failed: Arc<AtomicBool>,
    /// Bytes handed to `out` (on disk after the next flush).
    written: u64,
    /// Bytes whose writeback has been started (see [`start_writeback`]).
    started: u64,
}

struct Writer {
    budget: Arc<tokio::sync::Semaphore>,
    audit: File,
    audit_path: PathBuf,
    chain: Chain,
    chain_file: File,
    recordings_dir: PathBuf,
    open: HashMap<String, OpenRec>,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            let mut flushes = Vec::new();
            // Everything queued is one batch: one flush per file at the end.
            let mut n = 0;
            while let Some(cmd) = next {
                match cmd {
                    Cmd::Flush(tx) => flushes.push(tx),
                    other => self.handle(other),
                }
                n += 1;
                next = if n < 1024 { rx.try_recv().ok() } else { None };
            }
            let mut flushed = Vec::with_capacity(self.open.len());
            for (s, r) in self.open.iter_mut() {
                match r.out.flush() {
                    Ok(()) => {
                        start_writeback(r);
                        flushed.push((s, r.written))
                    }
                    Err(e) => fail(r, &e),
                }
            }
            if !flushed.is_empty() {
                let mut recs = self.shared.recs();
                for (s, size) in flushed {
                    if let Some(l) = recs.get_mut(s) {
                        l.size = size;
                    }
                }
            }
            self.shared.written.send_modify(|g| *g += 1);
            for f in flushes {
                let _ = f.send(());
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Audit(mut ev) => self.write_audit(&mut ev),
            Cmd::Open { session, header, failed, reply } => {
                let _ = reply.send(self.open(&session, &header, failed));
            }
            Cmd::Data { session, bytes, permits } => {
                self.budget.add_permits(permits as usize);
                let line = bytes;
                let Some(r) = self.open.get_mut(&session) else { return };
                if r.failed.load(Ordering::Relaxed) {
                    return;
                }
                if self.shared.spool_full() {
                    if !self.shared.full_logged.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                            "audit spool full: {} MiB recorded but not yet shipped to the control server; \
                             recording output is no longer written until control takes the backlog \
                             (sessions with record = \"required\" are ended)",
                            self.shared.limit.load(Ordering::Relaxed) >> 20
                        );
                    }
                    r.failed.store(true, Ordering::Release);
                    return;
                }
                self.shared.full_logged.store(false, Ordering::Release);
                match r.out.write_all(&line) {
                    Ok(()) => {
                        r.written += line.len() as u64;
                        self.shared.backlog.fetch_add(line.len() as u64, Ordering::AcqRel);
                        self.shared.recorded.fetch_add(line.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => fail(r, &e),
                }
            }
            Cmd::Close { session } => {
                let Some(mut r) = self.open.remove(&session) else { return };
                if let Err(e) = r.out.flush() {
                    fail(&mut r, &e);
                }
                // The file's length, not the count: after a failed write the
                // file may hold a part the count missed, and it ships as is.
                let size = r.out.get_ref().metadata().map(|m| m.len()).unwrap_or(r.written);
                self.shared.recs().insert(session, LiveRec { size, open: false });
            }
            Cmd::Flush(_) => {}
        }
    }

    fn write_audit(&mut self, ev: &mut AuditEvent) {
        let mut line = self.chain.append(ev);
        tracing::info!(target: "tailgate::audit", "{line}");
        line.push('\n');
        // One write() per line: with O_APPEND nothing else interleaves.
        if let Err(e) = self.audit.write_all(line.as_bytes()) {
            tracing::error!("audit log {}: {e}", self.audit_path.display());
        }
        self.shared.backlog.fetch_add(line.len() as u64, Ordering::AcqRel);
        if let Err(e) = self.chain_file.write_all_at(self.chain.encode().as_bytes(), 0) {
            tracing::error!("audit chain state {CHAIN_FILE}: {e}");
        }
    }

    fn open(&mut self, session: &str, header: &str, failed: Arc<AtomicBool>) -> Result<PathBuf, SshError> {
        let dir = &self.recordings_dir;
        if !dir.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| SshError::io(dir, e))?;
        }
        let path = dir.join(format!("{session}.cast"));
        self.shared.recs().insert(session.to_string(), LiveRec { size: 0, open: true });
        let created = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
        let file = match created {
            Ok(f) => f,
            Err(e) => {
                self.shared.recs().remove(session);
                return Err(SshError::io(&path, e));
            }
        };
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
        if let Err(e) = out.write_all(header.as_bytes()).and_then(|_| out.flush()) {
            // Nothing will be written: not open, and the shipper ships the stub.
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            self.shared.recs().insert(session.to_string(), LiveRec { size, open: false });
            return Err(SshError::io(&path, e));
        }
        self.shared.backlog.fetch_add(header.len() as u64, Ordering::AcqRel);
        self.shared.recs().insert(session.to_string(), LiveRec { size: header.len() as u64, open: true });
        self.open.insert(session.to_string(), OpenRec { out, path: path.clone(), failed, written: header.len() as u64, started: 0 });
        Ok(path)
    }
}

/// Dirty recording bytes after which their writeback is started.
const WRITEBACK_EVERY: u64 = 8 * 1024 * 1024;

/// Starts writing a bulk recording's new bytes to disk now, a few MiB at a
/// time, instead of leaving them dirty in the page cache: hundreds of MiB of
/// dirty spool would otherwise be written back in one burst half a minute
/// later (`dirty_expire_centisecs`), or, past the kernel's dirty limits,
/// throttle this thread in one long stall. `SYNC_FILE_RANGE_WRITE` only
/// queues the I/O; it neither waits for it nor promises durability (control
/// acknowledges what it stored, not what the node wrote).
fn start_writeback(r: &mut OpenRec) {
    use std::os::fd::AsRawFd;
    if r.written - r.started < WRITEBACK_EVERY {
        return;
    }
    let fd = r.out.get_ref().as_raw_fd();
    // SAFETY: a plain syscall on a descriptor this writer owns; a failure
    // (e.g. a file system without it) only leaves writeback to the kernel.
    unsafe { libc::sync_file_range(fd, r.started as i64, (r.written - r.started) as i64, libc::SYNC_FILE_RANGE_WRITE) };
    r.started = r.written;
}

fn fail(r: &mut OpenRec, e: &std::io::Error) {
    if !r.failed.swap(true, Ordering::AcqRel) {
        tracing::error!("recording {}: {e}; further output of this session is not recorded", r.path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::audit::EventKind;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::SystemTime;

    fn id(name: &str) -> crate::daemon::identity::Identity {
        crate::daemon::identity::Identity {
            node_key: "a2V5".into(),
            node_name: name.into(),
            user: Some("alice".into()),
            tags: vec![],
            groups: vec![],
            ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
        }
    }

    fn ev() -> AuditEvent {
        AuditEvent::new(EventKind::SessionStart, "c", &id("laptop"), &id("web1"), SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn chain_links_each_line_to_the_previous() {
        let mut c = Chain::default();
        let l1 = c.append(&mut ev());
        let l2 = c.append(&mut ev());
        let v1: serde_json::Value = serde_json::from_str(&l1).unwrap();
        let v2: serde_json::Value = serde_json::from_str(&l2).unwrap();
        assert_eq!((v1["id"].as_u64(), v1["prev"].as_str()), (Some(1), Some(GENESIS)));
        assert_eq!(v2["id"], 2);
        assert_eq!(v2["prev"].as_str().unwrap(), line_hash(&l1));
        assert_eq!(c, Chain { id: 2, hash: line_hash(&l2) });
        // id and prev lead the line, so a reader sees them first.
        assert!(l1.starts_with("{\"id\":1,\"prev\":"), "{l1}");
    }

    #[test]
    fn huge_commands_are_cut_to_fit_a_frame() {
        let mut c = Chain::default();
        let mut e = ev();
        e.command = Some("é".repeat(100_000));
        let l = c.append(&mut e);
        assert!(l.len() < MAX_LINE, "{}", l.len());
        assert!(serde_json::from_str::<serde_json::Value>(&l).unwrap()["command"].as_str().unwrap().ends_with("(cut)"));
    }

    #[test]
    fn chain_survives_restart_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let j = Journal::open(dir.path(), &audit, &dir.path().join("rec")).unwrap();
            for _ in 0..3 {
                j.audit(ev());
            }
            j.flush().await;
        });
        let text = std::fs::read_to_string(&audit).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(Chain::load(dir.path(), &audit), Chain { id: 3, hash: line_hash(lines[2]) });
        assert_eq!(std::fs::metadata(dir.path().join(CHAIN_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        // Someone cuts the last two lines: numbering goes on from 3, not 1.
        std::fs::write(&audit, format!("{}\n", lines[0])).unwrap();
        assert_eq!(Chain::load(dir.path(), &audit).id, 3);
        // Both gone: the saved head still says where the chain was.
        std::fs::remove_file(&audit).unwrap();
        assert_eq!(Chain::load(dir.path(), &audit).id, 3);
    }

    #[test]
    fn recordings_are_written_in_order_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let j = Journal::open(dir.path(), &dir.path().join("audit.jsonl"), &dir.path().join("rec")).unwrap();
            let r = j.open_recording("s1", "{\"version\":2}\n".into()).await.unwrap();
            for i in 0..1000 {
                r.send(format!("[{i},\"o\",\"x\"]\n").into_bytes()).await;
            }
            r.close();
            j.flush().await;
            let text = std::fs::read_to_string(r.path()).unwrap();
            assert_eq!(text.lines().count(), 1001);
            // The shipper learns the final size without asking the disk.
            assert_eq!(j.shared.recs().get("s1"), Some(&LiveRec { size: text.len() as u64, open: false }));
            assert!(text.lines().nth(1000).unwrap().starts_with("[999,"));
            assert_eq!(std::fs::metadata(r.path()).unwrap().permissions().mode() & 0o777, 0o600);
            // The spool bound: once shipping is on and the backlog is over
            // the limit, output is refused and the handle says so.
            j.shared.shipping.store(true, Ordering::Release);
            j.shared.limit.store(10, Ordering::Release);
            let r2 = j.open_recording("s2", "{}\n".into()).await.unwrap();
            r2.send(b"[0,\"o\",\"y\"]\n".to_vec()).await;
            j.flush().await;
            assert!(r2.failed.load(Ordering::Acquire));
        });
    }
}
