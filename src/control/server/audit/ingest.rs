//! The ingest thread: stores what nodes ship, then acknowledges it.
//!
//! It has its own SQLite connection (`synchronous = FULL`: an ack promises
//! the data survives a crash), so nothing nodes ship passes through the hub
//! thread that distributes maps. Audit events are stored here; recording
//! chunks go on to the recording writer ([`super::recordings`]), so bulk
//! recording bytes never delay anyone's events. Acks go out only after the
//! commit (events) or the fsync (recordings).
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::mpsc;

use super::chain::{Verdict, judge};
use super::recordings::Chunk;
use crate::control::wire::proto::ShipAck;
use crate::ssh::journal::line_hash;

/// Sends an ack to the node's connection (dropped if it is gone).
pub type Reply = Box<dyn Fn(ShipAck) + Send>;

pub enum IngestCmd {
    Events {
        node: i64,
        lines: Vec<String>,
        reply: Reply,
    },
    /// `gzip`: `data` is one gzip member of that many raw bytes.
    Chunk {
        node: i64,
        session: String,
        offset: u64,
        data: Vec<u8>,
        gzip: Option<u32>,
        fin: bool,
        reply: Reply,
    },
    Prune {
        older_than_ms: i64,
    },
}

/// Handle: a bounded queue, so a node shipping faster than the disk is read
/// more slowly (TCP pushes back on it alone).
#[derive(Clone)]
pub struct Ingest {
    pub tx: mpsc::Sender<IngestCmd>,
    /// The recording writer's queue (chunks go there, not to `tx`).
    chunks: mpsc::Sender<Chunk>,
}

impl Ingest {
    /// Queues a shipment for the thread that stores it; `Err` when the
    /// server is shutting down.
    pub async fn send(&self, cmd: IngestCmd) -> Result<(), ()> {
        match cmd {
            IngestCmd::Chunk { node, session, offset, data, gzip, fin, reply } => {
                self.chunks.send(Chunk { node, session, offset, data, gzip, fin, reply }).await.map_err(|_| ())
            }
            other => self.tx.send(other).await.map_err(|_| ()),
        }
    }
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
    let chunks = super::recordings::start(state_dir, recordings_dir(state_dir))?;
    let (tx, rx) = mpsc::channel(256);
    let mut w = Worker { conn, dir: recordings_dir(state_dir), unstored: Default::default() };
    let h = std::thread::Builder::new().name("control-audit".into()).spawn(move || w.run(rx))?;
    Ok((Ingest { tx, chunks }, h))
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

struct Worker {
    conn: Connection,
    dir: PathBuf,
    /// Nodes whose last batch could not be stored (e.g. a busy database).
    unstored: std::collections::HashSet<i64>,
}

impl Worker {
    fn run(&mut self, mut rx: mpsc::Receiver<IngestCmd>) {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                IngestCmd::Events { node, lines, reply } => {
                    if self.unstored.contains(&node) && !self.resumes(node, &lines) {
                        // The node pipelines batches: one sent after a batch
                        // we could not store would look like a gap. It gets
                        // no ack either, so the node resends from the first
                        // unacknowledged event.
                        tracing::debug!("audit: events of node #{node} after an unstored batch; waiting for its resend");
                        continue;
                    }
                    match self.events(node, &lines) {
                        Ok(upto) => {
                            self.unstored.remove(&node);
                            reply(ShipAck { events: Some(upto), ..Default::default() })
                        }
                        Err(e) => {
                            self.unstored.insert(node);
                            tracing::error!("audit: storing events of node #{node}: {e:#}; not acknowledged, the node resends")
                        }
                    }
                }
                IngestCmd::Chunk { session, .. } => tracing::error!("audit: recording {session} reached the event thread; dropped"),
                IngestCmd::Prune { older_than_ms } => {
                    if let Err(e) = super::query::prune(&self.conn, &self.dir, older_than_ms) {
                        tracing::error!("audit: retention pruning failed: {e:#}");
                    }
                }
            }
        }
    }

    /// Whether `lines` carry on where the stored chain of `node` ends (the
    /// node's resend after an unstored batch), or start before it.
    fn resumes(&self, node: i64, lines: &[String]) -> bool {
        let first = lines.iter().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["id"].as_u64()));
        let head = chain_head(&self.conn, node).ok().flatten().map_or(0, |(seq, _)| seq);
        first.is_none_or(|f| f <= head + 1)
    }

    /// Stores a batch in one transaction; returns the highest id handled.
    fn events(&mut self, node: i64, lines: &[String]) -> anyhow::Result<u64> {
        let name = node_name(&self.conn, node);
        let now = now_ms();
        // Immediate: take the write lock first, waiting out `busy_timeout`.
        // A deferred transaction that reads and then writes fails at once
        // with "database is locked" when another connection (an admin
        // command) wrote in between.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut head = chain_head(&tx, node)?;
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
}

/// The node's name for the audit tables (`#id` if it is gone).
/// The last stored event of a node's chain: its seq and hash.
fn chain_head(conn: &Connection, node: i64) -> rusqlite::Result<Option<(u64, String)>> {
    conn.query_row("SELECT last_seq, last_hash FROM node_chains WHERE node_id = ?1", [node], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
    })
    .optional()
}

pub(crate) fn node_name(conn: &Connection, node: i64) -> String {
    conn.query_row("SELECT name FROM nodes WHERE id = ?1", [node], |r| r.get(0))
        .optional()
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("#{node}"))
}

/// Records a chain problem in the node-audit integrity table and as an
/// admin audit row, so it shows in `control audit admin` too.
pub(crate) fn integrity(conn: &Connection, node: i64, name: &str, now: i64, kind: &str, seq: u64, detail: &str) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::journal::GENESIS;

    fn worker() -> (tempfile::TempDir, Worker) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_db(dir.path()).unwrap();
        conn.execute_batch(super::super::query::MIGRATION).unwrap();
        conn.execute_batch("CREATE TABLE audit(at, actor, action, target, detail)").unwrap();
        (dir, Worker { conn, dir: PathBuf::new(), unstored: Default::default() })
    }

    /// `n` chained audit lines, ids from 1.
    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|id| {
                let line = format!(r#"{{"id":{id},"prev":"{prev}","event":"auth","time":"2026-11-27T10:00:00Z"}}"#);
                prev = line_hash(&line);
                line
            })
            .collect()
    }

    fn gaps(w: &Worker) -> i64 {
        w.conn.query_row("SELECT count(*) FROM audit_integrity", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_batch_waits_for_a_busy_database_instead_of_failing() {
        // An admin command holds the write lock while a batch arrives, and
        // commits in the middle of it: a deferred transaction (read, then
        // write) failed at once with "database is locked" there.
        let (dir, mut w) = worker();
        let other = open_db(dir.path()).unwrap();
        other.execute_batch("BEGIN IMMEDIATE; INSERT INTO audit VALUES (1, 'admin', 'x', 'y', 'z');").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            other.execute_batch("COMMIT").unwrap();
        });
        let lines = chain(2);
        assert_eq!(w.events(1, &lines).expect("stored once the lock is free"), 2);
        release.join().unwrap();
        assert_eq!(gaps(&w), 0);
    }

    #[test]
    fn after_an_unstored_batch_only_the_resend_is_taken() {
        let (_dir, mut w) = worker();
        let lines = chain(4);
        assert_eq!(w.events(1, &lines[..1]).unwrap(), 1);
        // Event 2's batch could not be stored; event 3's, sent behind it,
        // must not be taken as a gap, and the resend from 2 must be.
        w.unstored.insert(1);
        assert!(!w.resumes(1, &lines[2..3]));
        assert!(w.resumes(1, &lines[1..]));
        assert!(w.resumes(1, &lines[..]), "a resend from before the head only repeats what is stored");
        assert_eq!(w.events(1, &lines[1..]).unwrap(), 4);
        assert_eq!(gaps(&w), 0);
    }
}
