//! The ingest thread: stores what nodes ship, then acknowledges it.
//!
//! It has its own SQLite connection (`synchronous = FULL`: an ack promises
//! the data survives a crash) and writes recording files itself, so bulk
//! recording bytes never pass through the hub thread that distributes maps.
//! Acks go out only after the commit (events) or the fsync (recordings).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::chain::{Verdict, judge};
use crate::control::wire::proto::{ShipAck, valid_session_id};
use crate::ssh::journal::line_hash;

/// Sends an ack to the node's connection (dropped if it is gone).
pub type Reply = Box<dyn Fn(ShipAck) + Send>;

pub enum IngestCmd {
    Events { node: i64, lines: Vec<String>, reply: Reply },
    Chunk { node: i64, session: String, offset: u64, data: Vec<u8>, fin: bool, reply: Reply },
    Prune { older_than_ms: i64 },
}

/// Handle: a bounded queue, so a node shipping faster than the disk is read
/// more slowly (TCP pushes back on it alone).
#[derive(Clone)]
pub struct Ingest {
    pub tx: mpsc::Sender<IngestCmd>,
}

/// Asks for pruning now and then: a quarter of the retention, 1 s to 1 h.
pub async fn retention_loop(ingest: Ingest, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let mut iv = tokio::time::interval(every);
    loop {
        iv.tick().await;
        let older_than_ms = now_ms() - retention.as_millis() as i64;
        if ingest.tx.send(IngestCmd::Prune { older_than_ms }).await.is_err() {
            return;
        }
    }
}

pub fn recordings_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("recordings")
}

/// Opens the database (already migrated by the hub's store) and starts the thread.
pub fn start(state_dir: &Path) -> anyhow::Result<(Ingest, std::thread::JoinHandle<()>)> {
    let conn = open_db(state_dir)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let (tx, rx) = mpsc::channel(256);
    let mut w = Worker { conn, dir: recordings_dir(state_dir), rows: Default::default() };
    let h = std::thread::Builder::new().name("control-audit".into()).spawn(move || w.run(rx))?;
    Ok((Ingest { tx }, h))
}

pub fn open_db(state_dir: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(state_dir.join("control.db"))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    Ok(conn)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Event time of a line (`time`, RFC 3339) in Unix ms; arrival time if absent.
fn event_ms(v: &serde_json::Value) -> i64 {
    v["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or_else(now_ms)
}

/// How often the `recordings` row of a live recording is brought up to date.
const ROW_EVERY: Duration = Duration::from_secs(1);

struct Worker {
    conn: Connection,
    dir: PathBuf,
    /// Live recordings whose row exists, and when it was last written.
    rows: std::collections::HashMap<(i64, String), std::time::Instant>,
}

struct Pending {
    reply: Reply,
    fin: bool,
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::Receiver<IngestCmd>) {
        while let Some(first) = rx.blocking_recv() {
            // Everything queued is one batch: one fsync per recording file.
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let mut chunks: BTreeMap<(i64, String), Vec<Pending>> = BTreeMap::new();
            let mut files: BTreeMap<(i64, String), File> = BTreeMap::new();
            for cmd in batch {
                match cmd {
                    IngestCmd::Events { node, lines, reply } => match self.events(node, &lines) {
                        Ok(upto) => reply(ShipAck { events: Some(upto), ..Default::default() }),
                        Err(e) => tracing::error!("audit: storing events of node #{node}: {e:#}; not acknowledged, the node resends"),
                    },
                    IngestCmd::Chunk { node, session, offset, data, fin, reply } => {
                        if !valid_session_id(&session) {
                            reply(ShipAck { session: Some(session), error: Some("invalid session id".into()), ..Default::default() });
                            continue;
                        }
                        match self.chunk(node, &session, offset, &data, &mut files) {
                            Ok(Some(done)) => reply(done),
                            Ok(None) => chunks.entry((node, session)).or_default().push(Pending { reply, fin }),
                            Err(e) => tracing::error!("audit: recording {session} of node #{node}: {e:#}; not acknowledged"),
                        }
                    }
                    IngestCmd::Prune { older_than_ms } => {
                        if let Err(e) = super::query::prune(&self.conn, &self.dir, older_than_ms) {
                            tracing::error!("audit: retention pruning failed: {e:#}");
                        }
                    }
                }
            }
            for ((node, session), pend) in chunks {
                let Some(f) = files.remove(&(node, session.clone())) else { continue };
                match self.commit_chunks(node, &session, f, pend.iter().any(|p| p.fin)) {
                    Ok((len, fin)) => {
                        for p in pend {
                            (p.reply)(ShipAck { session: Some(session.clone()), offset: len, fin: fin && p.fin, ..Default::default() });
                        }
                    }
                    Err(e) => tracing::error!("audit: recording {session} of node #{node}: {e:#}; not acknowledged"),
                }
            }
        }
    }

    fn node_name(&self, node: i64) -> String {
        self.conn
            .query_row("SELECT name FROM nodes WHERE id = ?1", [node], |r| r.get(0))
            .optional()
            .ok()
            .flatten()
            .unwrap_or_else(|| format!("#{node}"))
    }

    /// Stores a batch in one transaction; returns the highest id handled.
    fn events(&mut self, node: i64, lines: &[String]) -> anyhow::Result<u64> {
        let name = self.node_name(node);
        let now = now_ms();
        let tx = self.conn.transaction()?;
        let mut head: Option<(u64, String)> = tx
            .query_row("SELECT last_seq, last_hash FROM node_chains WHERE node_id = ?1", [node], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })
            .optional()?;
        let mut upto = 0;
        for line in lines {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) => {
                    integrity(&tx, node, &name, now, "malformed", 0, "an audit line that is not JSON")?;
                    continue;
                }
            };
            let (Some(seq), Some(prev)) = (v["id"].as_u64(), v["prev"].as_str()) else {
                integrity(&tx, node, &name, now, "malformed", 0, "an audit line without id or prev")?;
                continue;
            };
            let hash = line_hash(line);
            upto = upto.max(seq);
            let stored: Option<String> = tx
                .query_row("SELECT hash FROM node_events WHERE node_id = ?1 AND seq = ?2", params![node, seq as i64], |r| r.get(0))
                .optional()?;
            match judge(head.as_ref().map(|(s, h)| (*s, h.as_str())), seq, prev, stored.as_deref(), &hash) {
                Verdict::Duplicate => continue,
                Verdict::Conflict => {
                    integrity(&tx, node, &name, now, "conflict", seq, "event id reused with different content (log rewritten?)")?;
                    continue;
                }
                Verdict::Ok => {}
                Verdict::Gap { from, to } => {
                    integrity(&tx, node, &name, now, "gap", seq, &format!("events {from}..={to} never arrived (log truncated or edited?)"))?
                }
                Verdict::Break => integrity(
                    &tx,
                    node,
                    &name,
                    now,
                    "break",
                    seq,
                    "prev hash does not match the stored previous event (an earlier line was edited)",
                )?,
                Verdict::Late => {}
            }
            let s = |k: &str| v[k].as_str().map(String::from);
            tx.execute(
                "INSERT INTO node_events(node_id, seq, node, at, received, event, user, source, login, session, prev, hash, line)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    node,
                    seq as i64,
                    name,
                    event_ms(&v),
                    now,
                    s("event").unwrap_or_default(),
                    v["caller"]["user"].as_str(),
                    v["caller"]["node"].as_str(),
                    s("login"),
                    s("session"),
                    prev,
                    hash,
                    line
                ],
            )?;
            if head.as_ref().is_none_or(|(s, _)| seq > *s) {
                head = Some((seq, hash));
            }
        }
        if let Some((s, h)) = &head {
            tx.execute(
                "INSERT INTO node_chains(node_id, last_seq, last_hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node_id) DO UPDATE SET last_seq = ?2, last_hash = ?3",
                params![node, *s as i64, h],
            )?;
        }
        tx.commit()?;
        Ok(upto)
    }

    fn paths(&self, node: i64, session: &str) -> (PathBuf, PathBuf) {
        let d = self.dir.join(node.to_string());
        (d.join(format!("{session}.cast")), d.join(format!("{session}.cast.gz")))
    }

    /// Appends the new part of a chunk. `Some(ack)`: nothing to write (the
    /// recording is complete already).
    fn chunk(
        &mut self,
        node: i64,
        session: &str,
        offset: u64,
        data: &[u8],
        files: &mut BTreeMap<(i64, String), File>,
    ) -> anyhow::Result<Option<ShipAck>> {
        let (live, done) = self.paths(node, session);
        if done.exists() {
            let len: i64 = self
                .conn
                .query_row("SELECT bytes FROM recordings WHERE node_id = ?1 AND session = ?2", params![node, session], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
            return Ok(Some(ShipAck { session: Some(session.into()), offset: len as u64, fin: true, ..Default::default() }));
        }
        let key = (node, session.to_string());
        if !files.contains_key(&key) {
            if let Some(d) = live.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d)?;
            }
            let f = OpenOptions::new().create(true).append(true).mode(0o600).open(&live)?;
            files.insert(key.clone(), f);
        }
        let f = files.get_mut(&key).expect("inserted above");
        let cur = f.metadata()?.len();
        // At least once on the wire, once on disk: skip what we have.
        let skip = cur.saturating_sub(offset) as usize;
        if offset > cur {
            let name = self.node_name(node);
            integrity(
                &self.conn,
                node,
                &name,
                now_ms(),
                "recording_gap",
                0,
                &format!("recording {session}: bytes {cur}..{offset} never arrived"),
            )?;
        }
        if skip < data.len() {
            f.write_all(&data[skip..])?;
        }
        Ok(None)
    }

    /// fsync, record the length, and compress a finished recording.
    fn commit_chunks(&mut self, node: i64, session: &str, f: File, fin: bool) -> anyhow::Result<(u64, bool)> {
        f.sync_data()?;
        let len = f.metadata()?.len();
        drop(f);
        let (live, done) = self.paths(node, session);
        let now = now_ms();
        // The live file's length is what is stored (and what a resend is
        // deduplicated against); the row only lists the recording and its
        // progress. Writing it once a second, not once per batch, saves a
        // WAL fsync per batch on a bulk session.
        let key = (node, session.to_string());
        let stale = self.rows.get(&key).is_none_or(|t| t.elapsed() >= ROW_EVERY);
        if stale || fin {
            let name = self.node_name(node);
            self.conn
                .prepare_cached(
                    "INSERT INTO recordings(node_id, session, node, bytes, started, path) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(node_id, session) DO UPDATE SET bytes = ?4",
                )?
                .execute(params![node, session, name, len as i64, now, live.display().to_string()])?;
            self.rows.insert(key.clone(), std::time::Instant::now());
        }
        if fin {
            self.rows.remove(&key);
            compress(&live, &done)?;
            self.conn.execute(
                "UPDATE recordings SET finished = ?3, path = ?4 WHERE node_id = ?1 AND session = ?2",
                params![node, session, now, done.display().to_string()],
            )?;
            std::fs::remove_file(&live)?;
        }
        Ok((len, fin))
    }
}

/// `live` -> `done` (gzip), fsynced before the original goes.
fn compress(live: &Path, done: &Path) -> anyhow::Result<()> {
    let tmp = done.with_extension("gz.tmp");
    let out = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    std::io::copy(&mut File::open(live)?, &mut enc)?;
    let out = enc.finish()?;
    out.sync_all()?;
    std::fs::rename(&tmp, done)?;
    if let Some(d) = done.parent() {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

/// Records a chain problem in the node-audit integrity table and as an
/// admin audit row, so it shows in `control audit admin` too.
fn integrity(conn: &Connection, node: i64, name: &str, now: i64, kind: &str, seq: u64, detail: &str) -> anyhow::Result<()> {
    tracing::warn!("audit chain of node {name}: {kind} at event {seq}: {detail}");
    conn.execute(
        "INSERT INTO audit_integrity(node_id, node, at, kind, seq, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![node, name, now, kind, seq as i64, detail],
    )?;
    conn.execute(
        "INSERT INTO audit(at, actor, action, target, detail) VALUES (?1, 'server', ?2, ?3, ?4)",
        params![now / 1000, format!("audit.{kind}"), name, format!("event {seq}: {detail}")],
    )?;
    Ok(())
}
