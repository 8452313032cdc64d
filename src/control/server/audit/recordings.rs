//! The recording writer: appends what nodes ship to
//! `recordings/<node id>/<session>.cast`, fsyncs, then acknowledges; a
//! finished recording is gzipped by a thread of its own.
//!
//! Recording bytes are the bulk of what nodes ship. They get their own
//! thread (`control-recordings`), apart from the audit events of every node
//! (`control-audit`), and compression gets another (`control-gzip`), so a
//! large recording finishing never delays anyone's events or chunks. Both
//! queues are bounded: a node shipping faster than the disk is read more
//! slowly.
//!
//! Exactly once per offset: bytes below the live file's length are skipped.
//! The `fin` ack comes only after the compressed file is fsynced, renamed
//! and listed, so a server killed while compressing is sent the `fin` again
//! and compresses again from the live file (which goes only after that).
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::ingest::{Reply, integrity, now_ms, open_db};
use crate::control::wire::proto::{ShipAck, valid_session_id};

/// One recording chunk from a node.
pub(crate) struct Chunk {
    pub node: i64,
    pub session: String,
    pub offset: u64,
    pub data: Vec<u8>,
    pub fin: bool,
    pub reply: Reply,
}

/// How often the `recordings` row of a live recording is brought up to date.
const ROW_EVERY: Duration = Duration::from_secs(1);
/// Finished recordings waiting for the compressor.
const GZIP_QUEUE: usize = 64;

type Key = (i64, String);

/// Recordings being compressed: their length and the `fin` acks waiting
/// for the compressor (a resend that arrives meanwhile joins them).
type Compressing = Arc<Mutex<HashMap<Key, (u64, Vec<Reply>)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the writer and the compressor; returns the writer's queue.
pub(crate) fn start(state_dir: &Path, dir: PathBuf) -> anyhow::Result<mpsc::Sender<Chunk>> {
    let compressing = Compressing::default();
    let (gz_tx, gz_rx) = std::sync::mpsc::sync_channel(GZIP_QUEUE);
    let gz = Gzip { conn: open_db(state_dir)?, compressing: compressing.clone() };
    std::thread::Builder::new().name("control-gzip".into()).spawn(move || gz.run(gz_rx))?;
    let conn = open_db(state_dir)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let (tx, rx) = mpsc::channel(256);
    let mut w = Writer { conn, dir, rows: HashMap::new(), compressing, gz: gz_tx };
    std::thread::Builder::new().name("control-recordings".into()).spawn(move || w.run(rx))?;
    Ok(tx)
}

struct Writer {
    conn: Connection,
    dir: PathBuf,
    /// Live recordings whose row exists, and when it was last written.
    rows: HashMap<Key, Instant>,
    compressing: Compressing,
    gz: std::sync::mpsc::SyncSender<Job>,
}

struct Pending {
    reply: Reply,
    fin: bool,
}

/// A finished, fsynced recording to compress.
struct Job {
    key: Key,
    live: PathBuf,
    done: PathBuf,
}

fn paths(dir: &Path, node: i64, session: &str) -> (PathBuf, PathBuf) {
    let d = dir.join(node.to_string());
    (d.join(format!("{session}.cast")), d.join(format!("{session}.cast.gz")))
}

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Chunk>) {
        while let Some(first) = rx.blocking_recv() {
            // Everything queued is one batch: one fsync per recording file.
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut pending: BTreeMap<Key, Vec<Pending>> = BTreeMap::new();
            let mut files: BTreeMap<Key, File> = BTreeMap::new();
            for Chunk { node, session, offset, data, fin, reply } in batch {
                if !valid_session_id(&session) {
                    reply(ShipAck { session: Some(session), error: Some("invalid session id".into()), ..Default::default() });
                    continue;
                }
                let key = (node, session);
                if let Some((len, waiting)) = lock(&self.compressing).get_mut(&key) {
                    // Everything is on disk already; the fin ack comes from the compressor.
                    match fin {
                        true => waiting.push(reply),
                        false => reply(ShipAck { session: Some(key.1.clone()), offset: *len, ..Default::default() }),
                    }
                    continue;
                }
                match self.chunk(&key, offset, &data, &mut files) {
                    Ok(Some(done)) => reply(done),
                    Ok(None) => pending.entry(key).or_default().push(Pending { reply, fin }),
                    Err(e) => tracing::error!("audit: recording {} of node #{node}: {e:#}; not acknowledged", key.1),
                }
            }
            for (key, pend) in pending {
                let Some(f) = files.remove(&key) else { continue };
                let fin = pend.iter().any(|p| p.fin);
                match self.commit(&key, f, fin) {
                    Ok(len) => {
                        let (fins, rest): (Vec<_>, Vec<_>) = pend.into_iter().partition(|p| p.fin);
                        for p in rest {
                            (p.reply)(ShipAck { session: Some(key.1.clone()), offset: len, ..Default::default() });
                        }
                        if fin {
                            self.finish(key, len, fins.into_iter().map(|p| p.reply).collect());
                        }
                    }
                    Err(e) => tracing::error!("audit: recording {} of node #{}: {e:#}; not acknowledged", key.1, key.0),
                }
            }
        }
    }

    /// Appends the new part of a chunk to the open file. `Some(ack)`:
    /// nothing to write (the recording is complete already).
    fn chunk(&mut self, key: &Key, offset: u64, data: &[u8], files: &mut BTreeMap<Key, File>) -> anyhow::Result<Option<ShipAck>> {
        let (node, session) = (key.0, key.1.as_str());
        let (live, done) = paths(&self.dir, node, session);
        if done.exists() {
            return self.already_done(key, &live, &done).map(Some);
        }
        if !files.contains_key(key) {
            if let Some(d) = live.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
            }
            let f = OpenOptions::new().create(true).append(true).mode(0o600).open(&live)?;
            files.insert(key.clone(), f);
        }
        let f = files.get_mut(key).expect("inserted above");
        let cur = f.metadata()?.len();
        // At least once on the wire, once on disk: skip what we have.
        let skip = cur.saturating_sub(offset) as usize;
        if offset > cur {
            let name = super::ingest::node_name(&self.conn, node);
            let detail = format!("recording {session}: bytes {cur}..{offset} never arrived");
            integrity(&self.conn, node, &name, now_ms(), "recording_gap", 0, &detail)?;
        }
        if skip < data.len() {
            f.write_all(&data[skip..])?;
        }
        Ok(None)
    }

    /// The compressed file exists: answer `fin`. If the server stopped
    /// between the rename and the row update, finish that first.
    fn already_done(&mut self, key: &Key, live: &Path, done: &Path) -> anyhow::Result<ShipAck> {
        let row: Option<(i64, Option<i64>)> = self
            .conn
            .query_row("SELECT bytes, finished FROM recordings WHERE node_id = ?1 AND session = ?2", params![key.0, key.1], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((_, None)) = row {
            mark_finished(&self.conn, key, done)?;
            let _ = std::fs::remove_file(live);
        }
        let len = row.map(|r| r.0).unwrap_or(0) as u64;
        Ok(ShipAck { session: Some(key.1.clone()), offset: len, fin: true, ..Default::default() })
    }

    /// fsync and record the length; returns it.
    fn commit(&mut self, key: &Key, f: File, fin: bool) -> anyhow::Result<u64> {
        f.sync_data()?;
        let len = f.metadata()?.len();
        drop(f);
        // The live file's length is what is stored (and what a resend is
        // deduplicated against); the row only lists the recording and its
        // progress. Writing it once a second, not once per batch, saves a
        // WAL fsync per batch on a bulk session.
        let stale = self.rows.get(key).is_none_or(|t| t.elapsed() >= ROW_EVERY);
        if stale || fin {
            let (live, _) = paths(&self.dir, key.0, &key.1);
            let name = super::ingest::node_name(&self.conn, key.0);
            self.conn
                .prepare_cached(
                    "INSERT INTO recordings(node_id, session, node, bytes, started, path) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(node_id, session) DO UPDATE SET bytes = ?4",
                )?
                .execute(params![key.0, key.1, name, len as i64, now_ms(), live.display().to_string()])?;
            self.rows.insert(key.clone(), Instant::now());
        }
        Ok(len)
    }

    /// Hands a complete, fsynced recording to the compressor.
    fn finish(&mut self, key: Key, len: u64, replies: Vec<Reply>) {
        self.rows.remove(&key);
        let (live, done) = paths(&self.dir, key.0, &key.1);
        lock(&self.compressing).insert(key.clone(), (len, replies));
        // Blocks while the compressor is GZIP_QUEUE recordings behind:
        // chunks then wait in the bounded queue before this thread.
        if self.gz.send(Job { key: key.clone(), live, done }).is_err() {
            tracing::error!("audit: the recording compressor is gone; recording {} stays uncompressed", key.1);
            lock(&self.compressing).remove(&key);
        }
    }
}

fn mark_finished(conn: &Connection, key: &Key, done: &Path) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE recordings SET finished = ?3, path = ?4 WHERE node_id = ?1 AND session = ?2",
        params![key.0, key.1, now_ms(), done.display().to_string()],
    )
}

struct Gzip {
    conn: Connection,
    compressing: Compressing,
}

impl Gzip {
    fn run(self, rx: std::sync::mpsc::Receiver<Job>) {
        while let Ok(Job { key, live, done }) = rx.recv() {
            let r = compress(&live, &done).and_then(|()| {
                mark_finished(&self.conn, &key, &done)?;
                std::fs::remove_file(&live)?;
                Ok(())
            });
            // The entry goes only after the row says finished: a chunk that
            // finds no entry then finds the compressed file.
            let Some((len, replies)) = lock(&self.compressing).remove(&key) else { continue };
            match r {
                Ok(()) => {
                    for reply in replies {
                        reply(ShipAck { session: Some(key.1.clone()), offset: len, fin: true, ..Default::default() });
                    }
                }
                // Not acknowledged: the node sends fin again, and this runs again.
                Err(e) => tracing::error!("audit: compressing recording {} of node #{}: {e:#}; not acknowledged", key.1, key.0),
            }
        }
    }
}

/// `live` -> `done` (gzip), fsynced and renamed before the original goes.
/// The fastest level: a recording is mostly repeated terminal output, which
/// it already shrinks several times, at a fraction of the default's CPU.
fn compress(live: &Path, done: &Path) -> anyhow::Result<()> {
    let tmp = done.with_extension("gz.tmp");
    let out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    let mut enc = flate2::write::GzEncoder::new(std::io::BufWriter::with_capacity(256 * 1024, out), flate2::Compression::fast());
    std::io::copy(&mut File::open(live)?, &mut enc)?;
    let out = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    std::fs::rename(&tmp, done)?;
    if let Some(d) = done.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}
