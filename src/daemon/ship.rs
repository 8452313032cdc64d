//! Ships the node's audit trail and recordings to the control server.
//!
//! The spool is the node's own files: `audit.jsonl` (lines carry ids, see
//! [`crate::ssh::journal`]) and `recordings/<session>.cast`. What control
//! has acknowledged is the cursor in `ship.json` (0600): the last event id
//! and, per recording, the byte offset. Everything past the cursor is the
//! backlog; it is bounded ([`crate::ssh::journal::Shared::limit`]).
//!
//! Delivery is at least once: after a reconnect (or a restart) everything
//! past the cursor is sent again; the server stores each event once per
//! (node, id) and each recording byte once per offset. Acks come only after
//! the server committed, so an acknowledged byte is never lost.
//!
//! [`ShipCore`] holds the cursors and decides what to send next given what
//! the files hold (sans-IO, unit-tested); [`run`] moves bytes.
#![warn(missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::control::client::ShipLink;
use crate::control::wire::chunk::{BinChunk, MAX_HEADER};
use crate::control::wire::frame::DEFAULT_MAX_CLIENT_FRAME;
use crate::control::wire::proto::{ClientMsg, ShipAck};
use crate::ssh::journal::{Journal, LiveRec, Shared};

/// Cursor file in the node's state directory.
pub(crate) const STATE_FILE: &str = "ship.json";
/// Marker written next to a recording once control holds all of it.
const SHIPPED_SUFFIX: &str = ".cast.shipped";
/// Raw recording bytes per JSON chunk (to a server without binary chunks):
/// as many as fit one client frame (64 KiB) after base64 and the JSON
/// around them, so a bulk session costs as few frames, ingest commands and
/// acks as possible.
const CHUNK: usize = 46 * 1024;
/// Raw recording bytes per binary chunk: a full client frame.
const BIN_CHUNK: usize = DEFAULT_MAX_CLIENT_FRAME - MAX_HEADER;
/// Most raw recording bytes per gzip chunk: terminal output shrinks several
/// times, so one frame carries far more than [`BIN_CHUNK`].
const GZ_RAW: usize = 1 << 20;
/// Raw bytes compressed at a time into a gzip chunk, until the next piece
/// might not fit the frame any more (it may not shrink at all).
const GZ_PIECE: usize = 32 * 1024;
/// [`WINDOW`] in raw bytes when chunks are gzipped: what control holds in
/// memory is the compressed bytes, so more raw bytes may be in flight.
const GZ_WINDOW: u64 = 16 * 1024 * 1024;
/// JSON-escaped audit lines per message.
const EVENTS_BATCH: usize = 40 * 1024;
/// Silence after which unacknowledged shipments are sent again.
const RESEND_AFTER: Duration = Duration::from_secs(20);
/// Unacknowledged bytes in flight before waiting for acks. Control fsyncs
/// once per batch it finds queued, so a larger window means fewer fsyncs per
/// byte there; it is also what control may hold in memory for this node.
const WINDOW: u64 = 4 * 1024 * 1024;
/// How long new output is gathered before it is shipped: the lag it adds is
/// small against a human, and a bulk session then ships full chunks.
const GATHER: Duration = Duration::from_millis(20);
/// Recording output faster than this is a busy session (bulk output, not a
/// human): its recording waits in the spool instead of competing with it.
const BUSY_RATE: u64 = 4 * 1024 * 1024;
/// The longest recording bytes wait while sessions are busy: past it they
/// are shipped alongside, whatever the rate.
const MAX_HOLD: Duration = Duration::from_secs(15);
/// How often moved cursors are written to `ship.json`. Between saves a crash
/// only costs a resend of what control already has (it dedupes by id and
/// offset); a write + rename per ack cost the node more than the bytes.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What is persisted: the acknowledged cursors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cursors {
    /// Highest audit event id control stored.
    pub events_acked: u64,
    /// Byte offset in `audit.jsonl` just after that event's line (a hint).
    pub events_offset: u64,
    /// Recording session -> bytes control stored.
    pub recordings: BTreeMap<String, u64>,
}

/// A recording as the files show it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecFile {
    pub session: String,
    pub size: u64,
    /// Still being written (its session runs).
    pub open: bool,
}

#[derive(Debug, Default)]
struct RecState {
    sent: u64,
    fin_sent: bool,
}

/// The shipping state machine.
#[derive(Debug, Default)]
pub(crate) struct ShipCore {
    pub acked: Cursors,
    events_sent: u64,
    read_offset: u64,
    /// (last event id, offset after its line, bytes) per batch sent but not acknowledged.
    inflight_events: VecDeque<(u64, u64, u64)>,
    recs: BTreeMap<String, RecState>,
    /// Recordings control holds completely (marker to write).
    pub finished: Vec<String>,
    /// The server takes binary chunks (this connection).
    pub binary: bool,
    /// The server takes gzip members in binary chunks (this connection).
    pub gzip: bool,
}

/// One message to send.
#[derive(Debug)]
pub(crate) enum Shipment {
    Msg(ClientMsg),
    /// A recording chunk as a binary frame.
    Chunk(BinChunk),
}

impl ShipCore {
    pub(crate) fn new(acked: Cursors) -> ShipCore {
        let mut c = ShipCore { acked, ..Default::default() };
        c.rewind();
        c
    }

    /// After a (re)connect: everything not acknowledged is sent again.
    pub(crate) fn rewind(&mut self) {
        self.events_sent = self.acked.events_acked;
        self.read_offset = self.acked.events_offset;
        self.inflight_events.clear();
        self.recs.clear();
    }

    /// Anything sent and not yet acknowledged?
    pub(crate) fn waiting(&self) -> bool {
        self.inflight() > 0
    }

    pub(crate) fn window_open(&self) -> bool {
        self.inflight() < if self.gzip && self.binary { GZ_WINDOW } else { WINDOW }
    }

    fn inflight(&self) -> u64 {
        let ev: u64 = self.inflight_events.iter().map(|e| e.2).sum();
        let recs: u64 = self
            .recs
            .iter()
            .map(|(s, st)| st.sent.saturating_sub(*self.acked.recordings.get(s).unwrap_or(&0)) + u64::from(st.fin_sent) * 64)
            .sum();
        ev + recs
    }

    /// Unshipped bytes: what the spool holds beyond the cursors.
    pub(crate) fn backlog(&self, audit_len: u64, recs: &[RecFile]) -> u64 {
        let ev = audit_len.saturating_sub(self.acked.events_offset);
        ev + recs.iter().map(|r| r.size.saturating_sub(*self.acked.recordings.get(&r.session).unwrap_or(&0))).sum::<u64>()
    }

    /// The next audit batch from `audit.jsonl` (`read` reads lines from an
    /// offset: `(line, offset after it)`), or `None`.
    pub(crate) fn next_events(&mut self, audit_len: u64, read: &mut dyn FnMut(u64) -> Vec<(String, u64)>) -> Option<Shipment> {
        if self.read_offset > audit_len {
            // The log shrank under us (truncated): find our place by id.
            tracing::warn!("audit.jsonl is shorter than what was already shipped; it was truncated or replaced");
            self.read_offset = 0;
        }
        if self.read_offset >= audit_len {
            return None;
        }
        let mut lines = Vec::new();
        let mut size = 0;
        let mut last = None;
        for (line, end) in read(self.read_offset) {
            let id = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["id"].as_u64());
            let esc = serde_json::to_string(&line).map(|s| s.len()).unwrap_or(line.len() * 2);
            if !lines.is_empty() && size + esc > EVENTS_BATCH {
                break;
            }
            self.read_offset = end;
            // Lines without an id predate the chain; lines at or below what was
            // sent are already on their way (a rescan after truncation).
            match id {
                Some(id) if id > self.events_sent => {
                    size += esc;
                    lines.push(line);
                    self.events_sent = id;
                    last = Some((id, end));
                }
                _ => {}
            }
        }
        let (id, end) = last?;
        self.inflight_events.push_back((id, end, size as u64));
        Some(Shipment::Msg(ClientMsg::AuditEvents { lines }))
    }

    /// The next recording chunk (`read(session, offset, len)` reads bytes).
    pub(crate) fn next_chunk(&mut self, recs: &[RecFile], read: &mut dyn FnMut(&str, u64, usize) -> Vec<u8>) -> Option<Shipment> {
        for r in recs {
            let acked = *self.acked.recordings.get(&r.session).unwrap_or(&0);
            let st = self.recs.entry(r.session.clone()).or_insert(RecState { sent: acked, fin_sent: false });
            if st.fin_sent {
                continue;
            }
            let gzip = self.gzip && self.binary;
            let most = match (self.binary, gzip) {
                (true, true) => GZ_RAW,
                (true, false) => BIN_CHUNK,
                _ => CHUNK,
            };
            let want = (r.size.saturating_sub(st.sent) as usize).min(most);
            let data = if want > 0 { read(&r.session, st.sent, want) } else { Vec::new() };
            let (data, raw_len) = if gzip && !data.is_empty() { gzip_chunk(data) } else { (data, None) };
            let n = raw_len.map_or(data.len() as u64, u64::from);
            let fin = !r.open && st.sent + n >= r.size;
            if n == 0 && !fin {
                continue;
            }
            let offset = st.sent;
            st.sent += n;
            st.fin_sent = fin;
            let c = BinChunk { session: r.session.clone(), offset, fin, data, raw_len };
            return Some(if self.binary { Shipment::Chunk(c) } else { Shipment::Msg(json_chunk(c)) });
        }
        None
    }

    /// Applies an ack; returns whether the cursors moved (persist them).
    pub(crate) fn ack(&mut self, a: &ShipAck) -> bool {
        let mut moved = false;
        if let Some(id) = a.events {
            while let Some(&(sent, end, _)) = self.inflight_events.front() {
                if sent > id {
                    break;
                }
                self.inflight_events.pop_front();
                self.acked.events_offset = end;
                moved = true;
            }
            if id > self.acked.events_acked {
                self.acked.events_acked = id;
                moved = true;
            }
        }
        if let Some(s) = &a.session {
            if let Some(e) = &a.error {
                tracing::error!("control refused recording {s}: {e}; it stays on this node only");
                self.acked.recordings.remove(s);
                self.finished.push(s.clone());
                return true;
            }
            let cur = self.acked.recordings.entry(s.clone()).or_insert(0);
            if a.offset > *cur {
                *cur = a.offset;
                moved = true;
            }
            if a.fin {
                self.acked.recordings.remove(s);
                self.recs.remove(s);
                self.finished.push(s.clone());
                moved = true;
            }
        }
        moved
    }
}

/// Compresses a prefix of `raw` into one gzip member that fits a frame,
/// [`GZ_PIECE`] at a time, each flushed so the size so far is known; every
/// byte is compressed once, however well it shrinks. Returns the member and
/// the raw bytes it holds.
fn gzip_chunk(raw: Vec<u8>) -> (Vec<u8>, Option<u32>) {
    use std::io::Write;
    // Room left after a piece that does not shrink at all: its stored
    // blocks, the flush marker, the gzip trailer.
    let room = |out: usize| out + GZ_PIECE + 64 <= BIN_CHUNK;
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(BIN_CHUNK), flate2::Compression::fast());
    let mut n = 0;
    for piece in raw.chunks(GZ_PIECE) {
        if !room(enc.get_ref().len()) || enc.write_all(piece).and_then(|()| enc.flush()).is_err() {
            break;
        }
        n += piece.len();
    }
    match enc.finish() {
        Ok(member) if member.len() <= BIN_CHUNK => (member, Some(n as u32)),
        // Not reached (a Vec does not fail, and each piece had room); plain then.
        _ => (raw[..raw.len().min(BIN_CHUNK)].to_vec(), None),
    }
}

/// A chunk as the JSON message a server without binary chunks takes.
fn json_chunk(c: BinChunk) -> ClientMsg {
    let data = base64::engine::general_purpose::STANDARD.encode(&c.data);
    ClientMsg::RecordingChunk { session: c.session, offset: c.offset, data, fin: c.fin }
}

/// Whether to hold recording chunks back for now. Shipping a recording costs
/// about as much CPU as the session producing it (read, encrypt, and on
/// control decrypt, write, fsync); during a burst of bulk output that would
/// halve the session's speed on a busy box. Bytes are already durable in the
/// spool, so they wait for the burst to end — but never longer than
/// [`MAX_HOLD`] behind, and never past 3/4 of the spool limit. Audit events
/// are never held, and neither are gzip chunks: compressed, shipping costs
/// the session little, and holding only added the lag.
#[derive(Debug)]
pub(crate) struct Hold<T> {
    last: Option<(T, u64)>,
    busy: bool,
    /// Since when recording bytes have been waiting (the backlog was not empty).
    behind_since: Option<T>,
}

impl<T> Default for Hold<T> {
    fn default() -> Self {
        Hold { last: None, busy: false, behind_since: None }
    }
}

impl<T: Copy + Ord + std::ops::Sub<Output = Duration>> Hold<T> {
    /// `recorded`: recording bytes written so far; `backlog`: bytes not yet
    /// acknowledged; `limit`: the spool limit. Returns whether to hold.
    pub(crate) fn update(&mut self, now: T, recorded: u64, backlog: u64, limit: u64) -> bool {
        match self.last {
            Some((t, n)) if now - t >= Duration::from_millis(5) => {
                let dt = (now - t).as_secs_f64();
                self.busy = recorded.saturating_sub(n) as f64 / dt >= BUSY_RATE as f64;
                self.last = Some((now, recorded));
            }
            Some(_) => {}
            None => self.last = Some((now, recorded)),
        }
        if backlog == 0 {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(now);
        }
        let waited = self.behind_since.map(|t| now - t).unwrap_or_default();
        self.busy && waited < MAX_HOLD && backlog < limit / 4 * 3
    }
}

// --- the driver --------------------------------------------------------------

struct Files {
    state_dir: PathBuf,
    audit: PathBuf,
    recordings: PathBuf,
    /// The recording read last, open.
    last: std::sync::Mutex<Option<(String, std::fs::File)>>,
}

impl Files {
    fn load_cursors(&self) -> Cursors {
        std::fs::read(self.state_dir.join(STATE_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_cursors(&self, c: &Cursors) {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        let r = (|| {
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec(c).unwrap_or_default())?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = r {
            tracing::error!("{}: {e}", path.display());
        }
    }

    /// Recordings left from before this start (the writer tells the
    /// shipper about its own in [`Shared::recs`]): each file not yet shipped
    /// is added there as closed, with its size, unless the writer has it
    /// (it adds its entry before it creates the file, so a file listed here
    /// and still being written is never taken for a closed one).
    fn scan_once(&self, shared: &Shared) {
        let Ok(rd) = std::fs::read_dir(&self.recordings) else { return };
        for e in rd.flatten() {
            let Some(session) = e.file_name().to_str().and_then(|n| n.strip_suffix(".cast")).map(String::from) else { continue };
            if !crate::control::wire::proto::valid_session_id(&session)
                || self.recordings.join(format!("{session}{SHIPPED_SUFFIX}")).exists()
            {
                continue;
            }
            let Ok(m) = std::fs::metadata(self.recordings.join(format!("{session}.cast"))) else { continue };
            shared.recs().entry(session).or_insert(LiveRec { size: m.len(), open: false });
        }
    }

    fn read_lines(&self, offset: u64) -> Vec<(String, u64)> {
        let Ok(mut f) = std::fs::File::open(&self.audit) else { return Vec::new() };
        if f.seek(SeekFrom::Start(offset)).is_err() {
            return Vec::new();
        }
        let mut r = BufReader::new(f.take(256 * 1024));
        let mut out = Vec::new();
        let mut pos = offset;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !line.ends_with('\n') {
                        break; // a line still being written
                    }
                    pos += n as u64;
                    out.push((line.trim_end_matches('\n').to_string(), pos));
                }
            }
        }
        out
    }

    fn read_chunk(&self, session: &str, offset: u64, len: usize) -> Vec<u8> {
        // A bulk session is read chunk after chunk from one file: keep it open.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_none_or(|(s, _)| s != session) {
            let Ok(f) = std::fs::File::open(self.recordings.join(format!("{session}.cast"))) else { return Vec::new() };
            *last = Some((session.to_string(), f));
        }
        let Some((_, file)) = last.as_ref() else { return Vec::new() };
        let mut f: &std::fs::File = file;
        // Read into spare capacity: a zeroed buffer cost a memset of every
        // byte shipped. The file is only read here, under the lock, so
        // seeking it is safe.
        let mut buf = Vec::with_capacity(len);
        match f.seek(SeekFrom::Start(offset)).and_then(|_| f.take(len as u64).read_to_end(&mut buf)) {
            Ok(_) => buf,
            Err(_) => Vec::new(),
        }
    }

    fn mark_shipped(&self, session: &str) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_some_and(|(s, _)| s == session) {
            *last = None;
        }
        drop(last);
        let p = self.recordings.join(format!("{session}{SHIPPED_SUFFIX}"));
        let _ = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(p);
    }
}

/// Produces the next messages (file reads happen here, off the runtime).
fn produce(core: &mut ShipCore, files: &Files, shared: &Shared, hold: bool) -> Vec<Shipment> {
    let audit_len = std::fs::metadata(&files.audit).map(|m| m.len()).unwrap_or(0);
    for s in core.finished.drain(..) {
        shared.recs().remove(&s);
        files.mark_shipped(&s);
    }
    let recs: Vec<RecFile> = shared.recs().iter().map(|(s, l)| RecFile { session: s.clone(), size: l.size, open: l.open }).collect();
    shared.backlog.store(core.backlog(audit_len, &recs), Ordering::Release);
    let mut out = Vec::new();
    while core.window_open() && out.len() < 32 {
        if let Some(m) = core.next_events(audit_len, &mut |o| files.read_lines(o)) {
            out.push(m);
            continue;
        }
        if hold {
            break;
        }
        match core.next_chunk(&recs, &mut |s, o, l| files.read_chunk(s, o, l)) {
            Some(m) => out.push(m),
            None => break,
        }
    }
    out
}

/// Runs the shipper: takes a [`ShipLink`] for each control connection from
/// `links` and ships over it until it ends.
pub(crate) async fn run(journal: Journal, state_dir: PathBuf, mut links: mpsc::Receiver<ShipLink>) {
    let shared = journal.shared.clone();
    shared.shipping.store(true, Ordering::Release);
    let files = Arc::new(Files {
        state_dir: state_dir.clone(),
        audit: journal.audit_path().to_path_buf(),
        recordings: state_dir.join(crate::ssh::RECORDINGS_DIR),
        last: Default::default(),
    });
    let (f2, s2) = (files.clone(), shared.clone());
    let cursors = tokio::task::spawn_blocking(move || {
        f2.scan_once(&s2);
        f2.load_cursors()
    })
    .await
    .unwrap_or_default();
    let mut core = Some(ShipCore::new(cursors));
    let mut written = shared.written.subscribe();
    let mut next_link = None;
    let (mut dirty, mut saved) = (false, tokio::time::Instant::now());
    let mut hold = Hold::default();
    // For measuring what the hold buys (`bench/ssh.sh record`): ship at once.
    let never_hold = std::env::var_os("TAILGATE_SHIP_NO_HOLD").is_some();
    loop {
        let mut link = match next_link.take() {
            Some(l) => l,
            None => match links.recv().await {
                Some(l) => l,
                None => return,
            },
        };
        shared.connected.store(true, Ordering::Release);
        if let Some(c) = core.as_mut() {
            c.rewind();
            c.binary = link.frames.is_some();
            c.gzip = link.gzip;
        }
        let mut progress = tokio::time::Instant::now();
        'conn: loop {
            // Read what to send on the blocking pool, then send it. Gzip
            // chunks are held too: on a quiet box that still keeps a
            // 512 MiB burst at 1.13x instead of 1.26x (ARCHITECTURE,
            // "Hold, re-evaluated").
            let held = !never_hold
                && hold.update(
                    std::time::Instant::now(),
                    shared.recorded.load(Ordering::Relaxed),
                    shared.backlog.load(Ordering::Acquire),
                    shared.limit.load(Ordering::Acquire),
                );
            let (c, batch) = {
                let (mut c, files, shared) = (core.take().unwrap_or_default(), files.clone(), shared.clone());
                tokio::task::spawn_blocking(move || {
                    let b = produce(&mut c, &files, &shared, held);
                    (c, b)
                })
                .await
                .unwrap_or_else(|_| (ShipCore::default(), Vec::new()))
            };
            core = Some(c);
            let more = !batch.is_empty();
            for s in batch {
                let sent = match (s, &link.frames) {
                    (Shipment::Msg(m), _) => link.cmds.send(m).await.is_ok(),
                    (Shipment::Chunk(c), Some(f)) => f.send(c.encode()).await.is_ok(),
                    (Shipment::Chunk(c), None) => link.cmds.send(json_chunk(c)).await.is_ok(),
                };
                if !sent {
                    break 'conn;
                }
            }
            let window_open = core.as_ref().is_some_and(|c| c.window_open());
            tokio::select! {
                a = link.acks.recv() => {
                    let Some(a) = a else { break 'conn };
                    let c = core.as_mut().expect("core is back");
                    progress = tokio::time::Instant::now();
                    let mut moved = c.ack(&a);
                    while let Ok(a) = link.acks.try_recv() {
                        moved |= c.ack(&a);
                    }
                    dirty |= moved;
                    // A finished recording is saved at once: its marker comes next.
                    if dirty && (!c.finished.is_empty() || saved.elapsed() >= SAVE_EVERY) {
                        save(c, &files).await;
                        (dirty, saved) = (false, tokio::time::Instant::now());
                    }
                }
                _ = written.changed(), if !more => {
                    // A busy session's writer finishes a batch every few
                    // hundred microseconds; shipping each would cut the output
                    // into slivers (a file scan, a frame, an fsync at control
                    // and an ack per sliver). Gather a little first.
                    tokio::time::sleep(GATHER).await;
                }
                _ = tokio::time::sleep(Duration::from_millis(if more && window_open { 0 } else if held { 50 } else { 1000 })) => {
                    if let Some(c) = core.as_ref().filter(|_| dirty && saved.elapsed() >= SAVE_EVERY) {
                        save(c, &files).await;
                        (dirty, saved) = (false, tokio::time::Instant::now());
                    }
                    // The server logs and drops what it cannot store; after a
                    // silence, send everything unacknowledged again.
                    if let Some(c) = core.as_mut().filter(|c| c.waiting() && progress.elapsed() > RESEND_AFTER) {
                        tracing::warn!("audit shipping: no ack from control for {RESEND_AFTER:?}; resending");
                        c.rewind();
                        progress = tokio::time::Instant::now();
                    }
                }
                l = links.recv() => {
                    next_link = l;
                    if next_link.is_none() {
                        shared.connected.store(false, Ordering::Release);
                        if let Some(c) = core.as_ref().filter(|_| dirty) {
                            save(c, &files).await;
                        }
                        return;
                    }
                    break 'conn;
                }
            }
        }
        shared.connected.store(false, Ordering::Release);
        if let Some(c) = core.as_ref().filter(|_| dirty) {
            save(c, &files).await;
            dirty = false;
        }
    }
}

async fn save(c: &ShipCore, files: &Arc<Files>) {
    let (cur, files) = (c.acked.clone(), files.clone());
    let _ = tokio::task::spawn_blocking(move || files.save_cursors(&cur)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u64) -> String {
        format!("{{\"id\":{id},\"prev\":\"x\",\"event\":\"auth\"}}")
    }

    /// An audit file of `ids` as (line, end offset) pairs.
    fn log(ids: &[u64]) -> (Vec<(String, u64)>, u64) {
        let mut out = Vec::new();
        let mut pos = 0;
        for &i in ids {
            let l = line(i);
            pos += l.len() as u64 + 1;
            out.push((l, pos));
        }
        (out, pos)
    }

    fn reader(lines: Vec<(String, u64)>) -> impl FnMut(u64) -> Vec<(String, u64)> {
        move |o| lines.iter().filter(|(l, end)| *end - l.len() as u64 > o).cloned().collect()
    }

    fn ids(m: &Shipment) -> Vec<u64> {
        match m {
            Shipment::Msg(ClientMsg::AuditEvents { lines }) => {
                lines.iter().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap()).collect()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unacked_events_are_sent_again_after_a_reconnect() {
        let (lines, len) = log(&[1, 2, 3]);
        let mut c = ShipCore::new(Cursors::default());
        let mut rd = reader(lines.clone());
        let m = c.next_events(len, &mut rd).unwrap();
        assert_eq!(ids(&m), vec![1, 2, 3]);
        assert!(c.next_events(len, &mut rd).is_none(), "nothing new");
        // The connection drops before any ack: all three go again.
        c.rewind();
        assert_eq!(ids(&c.next_events(len, &mut rd).unwrap()), vec![1, 2, 3]);
        assert!(c.ack(&ShipAck { events: Some(3), ..Default::default() }));
        assert_eq!((c.acked.events_acked, c.acked.events_offset), (3, len));
        c.rewind();
        assert!(c.next_events(len, &mut rd).is_none(), "acked events are not resent");
        // A restart resumes from the persisted cursors.
        let (lines, len2) = log(&[1, 2, 3, 4]);
        let mut c2 = ShipCore::new(c.acked.clone());
        assert_eq!(ids(&c2.next_events(len2, &mut reader(lines)).unwrap()), vec![4]);
    }

    #[test]
    fn a_truncated_log_is_rescanned_by_id() {
        let mut c = ShipCore::new(Cursors { events_acked: 5, events_offset: 10_000, ..Default::default() });
        // The file is now shorter than the cursor: ids 1..=5 are skipped, 6 goes.
        let (lines, len) = log(&[1, 2, 6]);
        assert_eq!(ids(&c.next_events(len, &mut reader(lines)).unwrap()), vec![6]);
    }

    #[test]
    fn recordings_are_chunked_resumed_and_finished() {
        let data: Vec<u8> = (0..(5 * CHUNK / 2) as u32).map(|i| (i % 251) as u8).collect();
        let mut rd = |_: &str, o: u64, l: usize| data[o as usize..(o as usize + l).min(data.len())].to_vec();
        let mut c = ShipCore::new(Cursors::default());
        let open = [RecFile { session: "s".into(), size: (5 * CHUNK / 4) as u64, open: true }];
        let mut got = Vec::new();
        while let Some(m) = c.next_chunk(&open, &mut rd) {
            match m {
                Shipment::Msg(ClientMsg::RecordingChunk { offset, data, fin, .. }) => {
                    assert!(!fin);
                    assert_eq!(offset as usize, got.len());
                    got.extend(base64::engine::general_purpose::STANDARD.decode(data).unwrap());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got.len(), 5 * CHUNK / 4);
        // Control stored one chunk, then the link dropped: resume from there.
        c.ack(&ShipAck { session: Some("s".into()), offset: CHUNK as u64, ..Default::default() });
        c.rewind();
        let closed = [RecFile { session: "s".into(), size: data.len() as u64, open: false }];
        let mut offsets = Vec::new();
        let mut fins = 0;
        while let Some(m) = c.next_chunk(&closed, &mut rd) {
            if let Shipment::Msg(ClientMsg::RecordingChunk { offset, fin, .. }) = m {
                offsets.push(offset);
                fins += usize::from(fin);
            }
        }
        assert_eq!(offsets, vec![CHUNK as u64, 2 * CHUNK as u64]);
        assert_eq!(fins, 1, "the last chunk carries fin");
        assert!(c.ack(&ShipAck { session: Some("s".into()), offset: data.len() as u64, fin: true, ..Default::default() }));
        assert_eq!(c.finished, vec!["s".to_string()]);
        assert!(c.acked.recordings.is_empty());
    }

    #[test]
    fn recordings_wait_during_bulk_output_but_not_for_long() {
        let ms = Duration::from_millis;
        let t0 = Duration::ZERO;
        let limit = 1 << 30;
        let mut h = Hold::default();
        assert!(!h.update(t0, 0, 0, limit), "no rate known yet");
        // 1 MiB in 20 ms: bulk output; its bytes wait.
        assert!(h.update(t0 + ms(20), 1 << 20, 1 << 20, limit));
        // A human's trickle: shipped at once.
        let mut h2 = Hold::default();
        h2.update(t0, 0, 0, limit);
        assert!(!h2.update(t0 + ms(20), 300, 300, limit));
        // Bulk output for longer than MAX_HOLD: shipped alongside.
        let mut n = 1 << 20;
        let mut t = t0 + ms(20);
        while t < MAX_HOLD {
            t += ms(20);
            n += 1 << 20;
            assert!(h.update(t, n, n, limit), "held at {t:?}");
        }
        t += ms(20);
        n += 1 << 20;
        assert!(!h.update(t, n, n, limit), "never more than MAX_HOLD behind");
        // Once caught up, a new burst may wait again.
        t += ms(20);
        h.update(t, n, 0, limit);
        t += ms(20);
        n += 1 << 20;
        assert!(h.update(t, n, 1 << 20, limit));
        // Never near the spool limit, so holding never makes it full.
        t += ms(20);
        n += 1 << 20;
        assert!(!h.update(t, n, limit / 4 * 3, limit));
    }

    #[test]
    fn a_full_chunk_fits_a_client_frame() {
        let data = vec![0xffu8; 100 * 1024];
        let mut rd = |_: &str, o: u64, l: usize| data[o as usize..(o as usize + l).min(data.len())].to_vec();
        let session = "f".repeat(64);
        let mut c = ShipCore::new(Cursors::default());
        let recs = [RecFile { session, size: data.len() as u64, open: false }];
        let Some(Shipment::Msg(m)) = c.next_chunk(&recs, &mut rd) else { panic!("a JSON chunk") };
        let json = serde_json::to_vec(&m).unwrap();
        assert!(json.len() <= crate::control::wire::frame::DEFAULT_MAX_CLIENT_FRAME, "{} bytes", json.len());
        assert!(json.len() > crate::control::wire::frame::DEFAULT_MAX_CLIENT_FRAME * 9 / 10, "chunks should fill frames: {}", json.len());
    }

    #[test]
    fn a_binary_chunk_fills_a_client_frame_and_decodes() {
        let data: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 253) as u8).collect();
        let mut rd = |_: &str, o: u64, l: usize| data[o as usize..(o as usize + l).min(data.len())].to_vec();
        let mut c = ShipCore { binary: true, ..ShipCore::new(Cursors::default()) };
        let recs = [RecFile { session: "f".repeat(64), size: data.len() as u64, open: false }];
        let mut got = Vec::new();
        let mut fins = 0;
        while let Some(m) = c.next_chunk(&recs, &mut rd) {
            let Shipment::Chunk(ch) = m else { panic!("{m:?}") };
            let frame = ch.encode();
            assert!(frame.len() <= DEFAULT_MAX_CLIENT_FRAME, "{} bytes", frame.len());
            let back = BinChunk::decode(frame, DEFAULT_MAX_CLIENT_FRAME).unwrap();
            assert_eq!(back.offset as usize, got.len());
            fins += usize::from(back.fin);
            got.extend(back.data);
        }
        assert_eq!(got, data);
        assert_eq!(fins, 1);
        assert_eq!(c.inflight(), data.len() as u64 + 64, "a binary chunk counts its raw bytes against the window");
    }

    /// Gzip chunks: text goes in far fewer frames, each one member control
    /// can check; output that does not shrink still fits a frame.
    #[test]
    fn gzip_chunks_carry_more_text_per_frame_and_fit_a_frame() {
        let mut text = Vec::new();
        let mut i = 0u64;
        while text.len() < 3 << 20 {
            text.extend_from_slice(format!("[{i}.5,\"o\",\"line {i} of the output\\r\\n\"]\n").as_bytes());
            i += 1;
        }
        let mut seed = 7u32;
        let noise: Vec<u8> = (0..300 * 1024)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        // Text: at least 3x fewer frames than plain binary chunks.
        for (data, most_frames) in [(&text, text.len() / BIN_CHUNK / 3), (&noise, 300 * 1024 / GZ_PIECE + 1)] {
            let mut rd = |_: &str, o: u64, l: usize| data[o as usize..(o as usize + l).min(data.len())].to_vec();
            let mut c = ShipCore { binary: true, gzip: true, ..ShipCore::new(Cursors::default()) };
            let recs = [RecFile { session: "ab".repeat(32), size: data.len() as u64, open: false }];
            let (mut got, mut frames, mut fins) = (Vec::new(), 0, 0);
            while let Some(m) = c.next_chunk(&recs, &mut rd) {
                let Shipment::Chunk(ch) = m else { panic!("{m:?}") };
                let frame = ch.encode();
                assert!(frame.len() <= DEFAULT_MAX_CLIENT_FRAME, "{} bytes", frame.len());
                let back = BinChunk::decode(frame, DEFAULT_MAX_CLIENT_FRAME).unwrap();
                assert_eq!(back.offset as usize, got.len());
                let n = back.raw_len.expect("gzipped");
                crate::control::wire::chunk::gzip_member_len(&back.data, n).unwrap();
                let mut raw = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&back.data[..]), &mut raw).unwrap();
                got.extend(raw);
                fins += usize::from(back.fin);
                frames += 1;
            }
            assert_eq!(&got, data);
            assert_eq!(fins, 1);
            assert!(frames <= most_frames, "{frames} frames for {} bytes", data.len());
        }
    }

    #[test]
    fn backlog_counts_what_control_has_not_acknowledged() {
        let mut cur = Cursors { events_offset: 100, ..Default::default() };
        cur.recordings.insert("a".into(), 50);
        let c = ShipCore::new(cur);
        let recs = [RecFile { session: "a".into(), size: 80, open: true }, RecFile { session: "b".into(), size: 10, open: false }];
        assert_eq!(c.backlog(150, &recs), 50 + 30 + 10);
    }
}
