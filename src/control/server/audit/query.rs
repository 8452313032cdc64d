//! Reads of the fleet audit store: listings, chain verification, recording
//! bytes; and retention pruning.
#![warn(missing_docs)]

use std::io::Read;
use std::path::Path;

use base64::Engine;
use rusqlite::{Connection, params_from_iter, types::Value as Sql};
use serde_json::{Value, json};

use super::Filter;
use super::chain;

/// The schema, appended to the store's migrations.
pub const MIGRATION: &str = r#"
    CREATE TABLE node_events (
        node_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        node TEXT NOT NULL,
        at INTEGER NOT NULL,
        received INTEGER NOT NULL,
        event TEXT NOT NULL,
        user TEXT,
        source TEXT,
        login TEXT,
        session TEXT,
        prev TEXT NOT NULL,
        hash TEXT NOT NULL,
        line TEXT NOT NULL,
        PRIMARY KEY (node_id, seq)
    );
    CREATE INDEX node_events_user ON node_events(user, at);
    CREATE INDEX node_events_node ON node_events(node, at);
    CREATE INDEX node_events_login ON node_events(login, at);
    CREATE INDEX node_events_session ON node_events(session);
    CREATE INDEX node_events_at ON node_events(at);
    CREATE TABLE node_chains (node_id INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL);
    CREATE TABLE audit_integrity (
        id INTEGER PRIMARY KEY,
        node_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        seq INTEGER NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE recordings (
        node_id INTEGER NOT NULL,
        session TEXT NOT NULL,
        node TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        started INTEGER NOT NULL,
        finished INTEGER,
        path TEXT NOT NULL,
        PRIMARY KEY (node_id, session)
    );
    CREATE INDEX recordings_started ON recordings(started);
"#;

fn where_clause(f: &Filter, alias: &str) -> (String, Vec<Sql>) {
    let mut w = vec!["1 = 1".to_string()];
    let mut p: Vec<Sql> = Vec::new();
    let mut add = |col: &str, v: &Option<String>| {
        if let Some(v) = v {
            p.push(Sql::Text(v.clone()));
            w.push(format!("{alias}{col} = ?{}", p.len()));
        }
    };
    add("user", &f.user);
    add("node", &f.node);
    add("login", &f.login);
    if let Some(s) = &f.session {
        p.push(Sql::Text(format!("{s}%")));
        w.push(format!("{alias}session LIKE ?{}", p.len()));
    }
    if let Some(t) = f.since_ms {
        p.push(Sql::Integer(t));
        w.push(format!("{alias}at >= ?{}", p.len()));
    }
    if let Some(t) = f.until_ms {
        p.push(Sql::Integer(t));
        w.push(format!("{alias}at <= ?{}", p.len()));
    }
    (w.join(" AND "), p)
}

/// Events matching `f`, oldest first; `after`: only rows that arrived after
/// this cursor (the `rowid` of the last one seen, for `--follow`).
pub fn list(conn: &Connection, f: &Filter, after: Option<i64>, limit: usize) -> anyhow::Result<Value> {
    let (mut w, mut p) = where_clause(f, "");
    if let Some(a) = after {
        p.push(Sql::Integer(a));
        w.push_str(&format!(" AND rowid > ?{}", p.len()));
    }
    // Following: the oldest new rows first. Listing: the newest `limit`, printed oldest first.
    let inner = if after.is_some() { "rowid ASC" } else { "at DESC, rowid DESC" };
    let sql = format!(
        "SELECT * FROM (SELECT rowid, node, seq, line, at FROM node_events WHERE {w} ORDER BY {inner} LIMIT {limit}) ORDER BY at, rowid"
    );
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(p), |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
    })?;
    let mut out = Vec::new();
    let mut cursor = after.unwrap_or(0);
    for row in rows {
        let (rowid, node, _seq, line) = row?;
        cursor = cursor.max(rowid);
        let mut v: Value = serde_json::from_str(&line).unwrap_or(json!({ "raw": line }));
        v["node"] = json!(node);
        out.push(v);
    }
    Ok(json!({ "events": out, "cursor": cursor }))
}

/// Re-walks every node's stored chain and lists what the ingest recorded.
pub fn verify(conn: &Connection, node: Option<&str>) -> anyhow::Result<Value> {
    let mut nodes: Vec<(i64, String)> = conn
        .prepare("SELECT DISTINCT node_id, node FROM node_events")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    nodes.sort_by(|a, b| a.1.cmp(&b.1));
    nodes.dedup_by_key(|n| n.0);
    let mut out = Vec::new();
    let mut ok = true;
    for (id, name) in nodes {
        if node.is_some_and(|n| n != name) {
            continue;
        }
        let events: Vec<(u64, String, String)> = conn
            .prepare("SELECT seq, prev, line FROM node_events WHERE node_id = ?1 ORDER BY seq")?
            .query_map([id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let (first, last) = (events.first().map(|e| e.0), events.last().map(|e| e.0));
        let count = events.len();
        let problems = chain::verify(events);
        let recorded: Vec<Value> = conn
            .prepare("SELECT at, kind, seq, detail FROM audit_integrity WHERE node_id = ?1 ORDER BY id")?
            .query_map([id], |r| {
                Ok(json!({"at_ms": r.get::<_, i64>(0)?, "kind": r.get::<_, String>(1)?, "seq": r.get::<_, i64>(2)?, "detail": r.get::<_, String>(3)?}))
            })?
            .collect::<Result<_, _>>()?;
        let node_ok = problems.is_empty() && recorded.is_empty();
        ok &= node_ok;
        out.push(json!({"node": name, "events": count, "first": first, "last": last, "ok": node_ok,
            "problems": problems, "recorded": recorded}));
    }
    Ok(json!({ "ok": ok, "nodes": out }))
}

/// Recordings matching `f` (user/login/time from their session_start event).
pub fn recordings(conn: &Connection, f: &Filter) -> anyhow::Result<Value> {
    let (w, p) = where_clause(f, "e.");
    let w = w.replace("e.session", "r.session").replace("e.node", "r.node");
    let sql = format!(
        "SELECT r.session, r.node, r.bytes, r.finished, e.user, e.login, e.at, e.line
         FROM recordings r LEFT JOIN node_events e
           ON e.node_id = r.node_id AND e.session = r.session AND e.event = 'session_start'
         WHERE {w} ORDER BY COALESCE(e.at, r.started)"
    );
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(p), |r| {
        let line: Option<String> = r.get(7)?;
        let start: Value = line.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or(Value::Null);
        Ok(json!({
            "id": r.get::<_, String>(0)?,
            "node": r.get::<_, String>(1)?,
            "bytes": r.get::<_, i64>(2)?,
            "complete": r.get::<_, Option<i64>>(3)?.is_some(),
            "user": r.get::<_, Option<String>>(4)?,
            "login": r.get::<_, Option<String>>(5)?,
            "started_ms": r.get::<_, Option<i64>>(6)?,
            "source": start["caller"]["node"],
            "command": start["command"],
        }))
    })?;
    Ok(Value::Array(rows.collect::<Result<_, _>>()?))
}

/// Up to `len` bytes of recording `id` (a session id or a unique prefix)
/// from `offset`, decompressed.
pub fn read(conn: &Connection, id: &str, offset: u64, len: usize) -> anyhow::Result<Value> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("{id:?} is not a recording id (see `tailgate control recordings list`)");
    }
    let hits: Vec<(String, String)> = conn
        .prepare("SELECT session, path FROM recordings WHERE session LIKE ?1 LIMIT 2")?
        .query_map([format!("{id}%")], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let (session, path) = match hits.as_slice() {
        [one] => one.clone(),
        [] => anyhow::bail!("no recording {id}; see `tailgate control recordings list`"),
        _ => anyhow::bail!("{id} matches several recordings; give more of the id"),
    };
    let len = len.min(1 << 20);
    let mut buf = Vec::with_capacity(len);
    let f = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let mut r: Box<dyn Read> =
        if path.ends_with(".gz") { Box::new(flate2::read::MultiGzDecoder::new(f)) } else { Box::new(std::io::BufReader::new(f)) };
    std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())?;
    r.take(len as u64).read_to_end(&mut buf)?;
    Ok(json!({
        "id": session,
        "offset": offset,
        "eof": buf.len() < len,
        "data": base64::engine::general_purpose::STANDARD.encode(&buf),
    }))
}

/// Deletes events, integrity notes and recordings older than the cutoff.
pub fn prune(conn: &Connection, dir: &Path, older_than_ms: i64) -> anyhow::Result<()> {
    let n = conn.execute("DELETE FROM node_events WHERE at < ?1", [older_than_ms])?;
    conn.execute("DELETE FROM audit_integrity WHERE at < ?1", [older_than_ms])?;
    let old: Vec<(i64, String, String)> = conn
        .prepare("SELECT node_id, session, path FROM recordings WHERE COALESCE(finished, started) < ?1 AND finished IS NOT NULL")?
        .query_map([older_than_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (node, session, path) in &old {
        // Only files under our own directory, whatever the row says.
        let p = Path::new(path);
        if p.starts_with(dir) {
            let _ = std::fs::remove_file(p);
        }
        conn.execute("DELETE FROM recordings WHERE node_id = ?1 AND session = ?2", rusqlite::params![node, session])?;
    }
    if n > 0 || !old.is_empty() {
        tracing::info!("audit retention: pruned {n} events and {} recordings", old.len());
    }
    Ok(())
}
