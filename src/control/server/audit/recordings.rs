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
//!
//! A recording whose first chunk comes gzipped (see
//! [`crate::control::wire::chunk`]) is stored as it comes: each member is
//! checked, then appended to `<session>.cast.part.gz`, which `fin` renames
//! to `<session>.cast.gz` — no inflating to disk, no compressing again.
//! Exactly once by raw offset still holds: the raw length of the part file
//! is kept in memory, and found again after a restart by walking its
//! members (a member cut by a crash is truncated away; it was never acked).
//! Plain chunks of such a recording are compressed before they are
//! appended, and gzip chunks of a recording stored plain are inflated.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::ingest::{Reply, integrity, now_ms, open_db};
use crate::control::wire::chunk::{gzip_member, gzip_member_len};
use crate::control::wire::proto::{ShipAck, valid_session_id};

/// One recording chunk from a node.
pub(crate) struct Chunk {
    pub node: i64,
    pub session: String,
    pub offset: u64,
    pub data: Vec<u8>,
    /// `Some(n)`: `data` is one gzip member of `n` raw bytes.
    pub gzip: Option<u32>,
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
    let mut w = Writer { conn, dir, rows: HashMap::new(), compressing, gz: gz_tx, parts: HashMap::new() };
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
    /// Recordings stored as gzip members: raw bytes in the part file.
    parts: HashMap<Key, u64>,
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

/// The file a recording shipped as gzip members grows in until `fin`.
fn part_path(dir: &Path, node: i64, session: &str) -> PathBuf {
    dir.join(node.to_string()).join(format!("{session}.cast.part.gz"))
}

/// Walks the members of a part file: the raw bytes they hold and where the
/// last complete member ends (anything after it was cut by a crash).
fn scan_members(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut rd = std::io::BufReader::with_capacity(256 * 1024, File::open(path)?);
    let (mut raw, mut good) = (0u64, 0u64);
    while !rd.fill_buf()?.is_empty() {
        let mut dec = flate2::bufread::GzDecoder::new(&mut rd);
        match std::io::copy(&mut dec, &mut std::io::sink()) {
            Ok(n) if dec.header().is_some() => raw += n,
            _ => break,
        }
        drop(dec);
        good = rd.stream_position()?;
    }
    Ok((raw, good))
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
            for Chunk { node, session, offset, data, gzip, fin, reply } in batch {
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
                match self.chunk(&key, offset, data, gzip, &mut files) {
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
    fn chunk(
        &mut self,
        key: &Key,
        offset: u64,
        data: Vec<u8>,
        gzip: Option<u32>,
        files: &mut BTreeMap<Key, File>,
    ) -> anyhow::Result<Option<ShipAck>> {
        let (node, session) = (key.0, key.1.as_str());
        let (live, done) = paths(&self.dir, node, session);
        if done.exists() {
            return self.already_done(key, &live, &done).map(Some);
        }
        if let Some(n) = gzip {
            gzip_member_len(&data, n)?;
        }
        // A recording keeps the form its first chunk gave it.
        let part = part_path(&self.dir, node, session);
        if self.parts.contains_key(key) || (!live.exists() && (gzip.is_some() || part.exists())) {
            self.part_chunk(key, &part, offset, data, gzip, files)?;
            return Ok(None);
        }
        let data = match gzip {
            Some(n) => inflate(&data, n)?,
            None => data,
        };
        let data = &data[..];
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

    /// Appends a chunk to a recording stored as gzip members, once per raw
    /// offset: what the part file holds already is skipped.
    fn part_chunk(
        &mut self,
        key: &Key,
        part: &Path,
        offset: u64,
        data: Vec<u8>,
        gzip: Option<u32>,
        files: &mut BTreeMap<Key, File>,
    ) -> anyhow::Result<()> {
        if !files.contains_key(key) {
            if let Some(d) = part.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
            }
            let f = OpenOptions::new().create(true).append(true).mode(0o600).open(part)?;
            if !self.parts.contains_key(key) {
                // First touch since start: find the raw length, drop a cut member.
                let (raw, good) = scan_members(part)?;
                if f.metadata()?.len() > good {
                    f.set_len(good)?;
                }
                self.parts.insert(key.clone(), raw);
            }
            files.insert(key.clone(), f);
        }
        let f = files.get_mut(key).expect("inserted above");
        let cur = *self.parts.get(key).unwrap_or(&0);
        let n = gzip.map_or(data.len() as u64, u64::from);
        if offset > cur {
            let name = super::ingest::node_name(&self.conn, key.0);
            let detail = format!("recording {}: bytes {cur}..{offset} never arrived", key.1);
            integrity(&self.conn, key.0, &name, now_ms(), "recording_gap", 0, &detail)?;
        }
        let skip = cur.saturating_sub(offset);
        if skip >= n {
            return Ok(());
        }
        let member = match (gzip, skip) {
            (Some(_), 0) => data,
            (Some(len), _) => gzip_member(&inflate(&data, len)?[skip as usize..]),
            (None, _) => gzip_member(&data[skip as usize..]),
        };
        f.write_all(&member)?;
        self.parts.insert(key.clone(), cur + n - skip);
        Ok(())
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
        let part = self.parts.get(key).copied();
        let len = match part {
            Some(raw) => raw,
            None => f.metadata()?.len(),
        };
        drop(f);
        // The live file's length is what is stored (and what a resend is
        // deduplicated against); the row only lists the recording and its
        // progress. Writing it once a second, not once per batch, saves a
        // WAL fsync per batch on a bulk session.
        let stale = self.rows.get(key).is_none_or(|t| t.elapsed() >= ROW_EVERY);
        if stale || fin {
            let live = match part {
                Some(_) => part_path(&self.dir, key.0, &key.1),
                None => paths(&self.dir, key.0, &key.1).0,
            };
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
        if self.parts.remove(&key).is_some() {
            // Already compressed and fsynced: it only needs its final name.
            let part = part_path(&self.dir, key.0, &key.1);
            let r = std::fs::rename(&part, &done)
                .and_then(|()| done.parent().map_or(Ok(()), |d| File::open(d)?.sync_all()))
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(mark_finished(&self.conn, &key, &done)?));
            match r {
                Ok(_) => {
                    for reply in replies {
                        reply(ShipAck { session: Some(key.1.clone()), offset: len, fin: true, ..Default::default() });
                    }
                }
                // Not acknowledged: the `fin` comes again and finds the file
                // renamed (`already_done`) or the part file still there.
                Err(e) => tracing::error!("audit: finishing recording {} of node #{}: {e:#}; not acknowledged", key.1, key.0),
            }
            return;
        }
        lock(&self.compressing).insert(key.clone(), (len, replies));
        // Blocks while the compressor is GZIP_QUEUE recordings behind:
        // chunks then wait in the bounded queue before this thread.
        if self.gz.send(Job { key: key.clone(), live, done }).is_err() {
            tracing::error!("audit: the recording compressor is gone; recording {} stays uncompressed", key.1);
            lock(&self.compressing).remove(&key);
        }
    }
}

/// A checked gzip member ([`gzip_member_len`]) inflated.
fn inflate(member: &[u8], raw_len: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(raw_len as usize);
    flate2::read::GzDecoder::new(member).take(u64::from(raw_len)).read_to_end(&mut out)?;
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "0123456789abcdef";

    fn store() -> (tempfile::TempDir, mpsc::Sender<Chunk>) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_db(dir.path()).unwrap();
        conn.execute_batch(super::super::query::MIGRATION).unwrap();
        conn.execute_batch("CREATE TABLE audit(at, actor, action, target, detail)").unwrap();
        let tx = start(dir.path(), dir.path().join("recordings")).unwrap();
        (dir, tx)
    }

    /// Sends one chunk and waits for its ack.
    fn send(tx: &mpsc::Sender<Chunk>, offset: u64, raw: &[u8], gzip: bool, fin: bool) -> ShipAck {
        let (t, r) = std::sync::mpsc::channel();
        let (data, gzip) = match gzip {
            true => (gzip_member(raw), Some(raw.len() as u32)),
            false => (raw.to_vec(), None),
        };
        let reply: Reply = Box::new(move |a| {
            let _ = t.send(a);
        });
        tx.blocking_send(Chunk { node: 1, session: S.into(), offset, data, gzip, fin, reply }).unwrap();
        r.recv_timeout(Duration::from_secs(20)).expect("an ack")
    }

    fn stored(dir: &Path) -> Vec<u8> {
        let f = File::open(dir.join("recordings/1").join(format!("{S}.cast.gz"))).unwrap();
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(f).read_to_end(&mut out).unwrap();
        out
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"[0.1,\"o\",\"abc\\r\\n\"]\n"[i % 20]).collect()
    }

    /// Gzip chunks are stored as members, once per raw offset, whatever
    /// overlaps a resend brings, and plain chunks join them compressed.
    #[test]
    fn gzip_chunks_are_stored_once_per_offset() {
        let (dir, tx) = store();
        let raw = text(10_000);
        assert_eq!(send(&tx, 0, &raw[..4000], true, false).offset, 4000);
        // A resend of what is stored, and one overlapping it: only the new part stays.
        assert_eq!(send(&tx, 0, &raw[..4000], true, false).offset, 4000);
        assert_eq!(send(&tx, 3000, &raw[3000..6000], true, false).offset, 6000);
        // Plain bytes (a node that stopped compressing), overlapping too.
        assert_eq!(send(&tx, 5000, &raw[5000..8000], false, false).offset, 8000);
        let part = dir.path().join("recordings/1").join(format!("{S}.cast.part.gz"));
        assert!(part.exists());
        let a = send(&tx, 8000, &raw[8000..], true, true);
        assert_eq!((a.offset, a.fin), (10_000, true));
        assert!(!part.exists(), "renamed at fin");
        assert_eq!(stored(dir.path()), raw);
        // A fin resent after that is answered from the finished file.
        let a = send(&tx, 0, &raw[..100], true, true);
        assert_eq!((a.offset, a.fin), (10_000, true));
        let row: (i64, Option<i64>) =
            open_db(dir.path()).unwrap().query_row("SELECT bytes, finished FROM recordings", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!(row.0, 10_000);
        assert!(row.1.is_some());
    }

    /// A part file cut by a crash mid-member: after a restart the cut
    /// member is dropped and the node's resend from its cursor fills it.
    #[test]
    fn a_cut_member_is_dropped_after_a_restart() {
        let (dir, tx) = store();
        let raw = text(9000);
        assert_eq!(send(&tx, 0, &raw[..3000], true, false).offset, 3000);
        drop(tx);
        let part = dir.path().join("recordings/1").join(format!("{S}.cast.part.gz"));
        let mut f = OpenOptions::new().append(true).open(&part).unwrap();
        let member = gzip_member(&raw[3000..6000]);
        f.write_all(&member[..member.len() / 2]).unwrap();
        drop(f);
        std::thread::sleep(Duration::from_millis(100));
        let tx = start(dir.path(), dir.path().join("recordings")).unwrap();
        assert_eq!(send(&tx, 3000, &raw[3000..6000], true, false).offset, 6000);
        assert_eq!(send(&tx, 6000, &raw[6000..], true, true).offset, 9000);
        assert_eq!(stored(dir.path()), raw);
    }

    /// A recording begun plain stays plain: gzip chunks are inflated into it,
    /// and it is compressed at `fin` as before.
    #[test]
    fn gzip_chunks_of_a_plain_recording_are_inflated() {
        let (dir, tx) = store();
        let raw = text(5000);
        assert_eq!(send(&tx, 0, &raw[..2000], false, false).offset, 2000);
        assert_eq!(send(&tx, 1000, &raw[1000..4000], true, false).offset, 4000);
        let a = send(&tx, 4000, &raw[4000..], true, true);
        assert_eq!((a.offset, a.fin), (5000, true));
        assert_eq!(stored(dir.path()), raw);
    }

    /// A member that does not inflate to what it claims is not stored nor acked.
    #[test]
    fn a_lying_member_is_refused() {
        let (dir, tx) = store();
        let (t, r) = std::sync::mpsc::channel();
        let reply: Reply = Box::new(move |a| {
            let _ = t.send(a);
        });
        let data = gzip_member(b"twelve bytes");
        tx.blocking_send(Chunk { node: 1, session: S.into(), offset: 0, data, gzip: Some(13), fin: false, reply }).unwrap();
        assert!(r.recv_timeout(Duration::from_secs(2)).is_err(), "no ack");
        assert!(!dir.path().join("recordings/1").join(format!("{S}.cast.part.gz")).exists());
    }
}
