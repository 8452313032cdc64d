//! `tailgate control audit [...]`, `audit verify`, `audit admin`,
//! `recordings list|play|export`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::{AuditRequest, Filter};

/// Filters shared by `audit` and `recordings list`.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// The caller's tailnet user (e.g. alice@example.com).
    #[arg(long)]
    pub user: Option<String>,
    /// The node the session ran on.
    #[arg(long)]
    pub node: Option<String>,
    /// The local account (root, deploy, ...).
    #[arg(long)]
    pub login: Option<String>,
    /// A session id (or its first characters).
    #[arg(long)]
    pub session: Option<String>,
    /// From this time: RFC 3339 (2026-01-02T03:04:05Z) or an age (1h, 2days).
    #[arg(long, value_parser = parse_when, value_name = "TIME")]
    pub since: Option<i64>,
    /// Up to this time (same forms).
    #[arg(long, value_parser = parse_when, value_name = "TIME")]
    pub until: Option<i64>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            user: self.user.clone(),
            node: self.node.clone(),
            login: self.login.clone(),
            session: self.session.clone(),
            since_ms: self.since,
            until_ms: self.until,
        }
    }
}

/// A time given as RFC 3339 or as an age, in Unix ms.
fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0));
    }
    let d = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?}: give an RFC 3339 time (2026-01-02T03:04:05Z) or an age (90s, 1h, 2days)"))?;
    let t = SystemTime::now().checked_sub(d).unwrap_or(UNIX_EPOCH);
    Ok(t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}

/// `tailgate control audit`: the fleet's session audit trail.
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Keep printing new events as nodes ship them.
    #[arg(long)]
    pub follow: bool,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AuditCommand {
    /// Check every node's hash chain; report gaps, breaks and rewritten events.
    Verify {
        #[arg(long)]
        node: Option<String>,
    },
    /// Admin actions on the control server (registrations, keys, policy, chain problems).
    Admin {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum RecordingsCommand {
    /// Recorded sessions (id, node, user, login, start, size).
    List(Box<FilterArgs>),
    /// Replay a recording in this terminal with its recorded timing.
    Play {
        id: String,
        /// Faster (2) or slower (0.5) than recorded.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Write a recording as an asciicast v2 file to stdout (`> x.cast`).
    Export { id: String },
}

/// Runs one of this module's requests: through the server's admin socket,
/// or on the database directly when no server runs.
pub fn execute(state_dir: &Path, req: &AuditRequest) -> Result<Value> {
    let sock = crate::control::server::admin_socket_path(state_dir);
    match std::os::unix::net::UnixStream::connect(&sock) {
        Ok(s) => crate::control::server::admin::via_socket(s, req),
        Err(_) => {
            if !state_dir.join("control.db").exists() {
                bail!("no control server state in {}; start the server first", state_dir.display());
            }
            // Make sure the schema exists (a server of this version may never have run here).
            drop(crate::control::server::store::Store::open_dir(state_dir)?);
            super::handle(state_dir, req).map_err(|e| anyhow!(e))
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn detail(e: &Value) -> String {
    let mut d = Vec::new();
    if let Some(a) = e["allowed"].as_bool() {
        d.push(if a { "allowed".to_string() } else { "denied".to_string() });
    }
    for k in ["kind", "command", "reason", "exit_status", "dest"] {
        if !e[k].is_null() {
            d.push(format!("{k}={}", s(&e[k])));
        }
    }
    d.join(" ")
}

fn short(x: &Value) -> String {
    s(x).chars().take(12).collect()
}

fn audit_rows(events: &[Value], header: bool) -> String {
    let mut rows = Vec::new();
    if header {
        rows.push(["TIME", "NODE", "ID", "EVENT", "USER", "FROM", "LOGIN", "SESSION", "DETAIL"].map(String::from).to_vec());
    }
    for e in events {
        rows.push(vec![
            s(&e["time"]),
            s(&e["node"]),
            s(&e["id"]),
            s(&e["event"]),
            s(&e["caller"]["user"]),
            s(&e["caller"]["node"]),
            s(&e["login"]),
            short(&e["session"]),
            detail(e),
        ]);
    }
    crate::control::server::admin::table(rows)
}

/// `tailgate control audit ...`.
pub fn audit_main(state_dir: &Path, a: &AuditArgs, json: bool) -> Result<()> {
    match &a.command {
        Some(AuditCommand::Admin { limit }) => {
            let req = crate::control::server::hub::AdminRequest::AuditList { limit: *limit };
            let out = crate::control::server::admin::execute(state_dir, req.clone())?;
            print!("{}", crate::control::server::admin::render(&req, &out, json));
            Ok(())
        }
        Some(AuditCommand::Verify { node }) => {
            let v = execute(state_dir, &AuditRequest::Verify { node: node.clone() })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for n in v["nodes"].as_array().into_iter().flatten() {
                    let status = if n["ok"].as_bool() == Some(true) { "ok".to_string() } else { "PROBLEMS".into() };
                    println!("{}: {} events ({}..{}) {status}", s(&n["node"]), s(&n["events"]), s(&n["first"]), s(&n["last"]));
                    for p in n["problems"].as_array().into_iter().flatten().chain(n["recorded"].as_array().into_iter().flatten()) {
                        println!("  {} at event {}: {}", s(&p["kind"]), s(&p["seq"]), s(&p["detail"]));
                    }
                }
            }
            if v["ok"].as_bool() != Some(true) {
                bail!("the audit trail has gaps or breaks (see above)");
            }
            Ok(())
        }
        None => {
            let filter = a.filter.filter();
            let v = execute(state_dir, &AuditRequest::List { filter: filter.clone(), after: None, limit: a.limit })?;
            let mut cursor = v["cursor"].as_i64().unwrap_or(0);
            print_events(&v, json, true)?;
            if !a.follow {
                return Ok(());
            }
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let v = execute(state_dir, &AuditRequest::List { filter: filter.clone(), after: Some(cursor), limit: 1000 })?;
                cursor = v["cursor"].as_i64().unwrap_or(cursor);
                print_events(&v, json, false)?;
            }
        }
    }
}

fn print_events(v: &Value, json: bool, header: bool) -> Result<()> {
    let events = v["events"].as_array().cloned().unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if json {
        for e in &events {
            writeln!(out, "{e}")?;
        }
    } else if !events.is_empty() || header {
        let t = audit_rows(&events, header);
        write!(out, "{t}")?;
    }
    out.flush()?;
    Ok(())
}

/// `tailgate control recordings ...`.
pub fn recordings_main(state_dir: &Path, c: &RecordingsCommand, json: bool) -> Result<()> {
    match c {
        RecordingsCommand::List(f) => {
            let v = execute(state_dir, &AuditRequest::Recordings { filter: f.filter() })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let mut rows = vec![["ID", "NODE", "USER", "FROM", "LOGIN", "STARTED", "BYTES", "STATUS"].map(String::from).to_vec()];
            for r in v.as_array().into_iter().flatten() {
                let started = r["started_ms"].as_i64().map(|t| crate::control::fmt_time(t / 1000)).unwrap_or_else(|| "-".into());
                let status = if r["complete"].as_bool() == Some(true) { "complete" } else { "live" };
                rows.push(vec![
                    s(&r["id"]),
                    s(&r["node"]),
                    s(&r["user"]),
                    s(&r["source"]),
                    s(&r["login"]),
                    started,
                    s(&r["bytes"]),
                    status.into(),
                ]);
            }
            print!("{}", crate::control::server::admin::table(rows));
            Ok(())
        }
        RecordingsCommand::Export { id } => {
            let mut out = std::io::stdout().lock();
            read_all(state_dir, id, |b| out.write_all(b).map_err(Into::into))?;
            out.flush()?;
            Ok(())
        }
        RecordingsCommand::Play { id, speed } => {
            if !(*speed > 0.0 && speed.is_finite()) {
                bail!("--speed must be a positive number (0.5 = half speed, 2 = double)");
            }
            let mut text = Vec::new();
            read_all(state_dir, id, |b| {
                text.extend_from_slice(b);
                Ok(())
            })?;
            play(&String::from_utf8_lossy(&text), *speed, &mut std::io::stdout())
        }
    }
}

fn read_all(state_dir: &Path, id: &str, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let mut offset = 0u64;
    loop {
        let v = execute(state_dir, &AuditRequest::Read { id: id.to_string(), offset, len: 1 << 20 })?;
        let data = base64::engine::general_purpose::STANDARD.decode(v["data"].as_str().unwrap_or_default()).context("recording data")?;
        sink(&data)?;
        offset += data.len() as u64;
        if v["eof"].as_bool() != Some(false) || data.is_empty() {
            return Ok(());
        }
    }
}

/// Writes each output event of an asciicast v2 text at its recorded time.
pub fn play(cast: &str, speed: f64, out: &mut dyn Write) -> Result<()> {
    let mut last = 0.0f64;
    for line in cast.lines().skip(1) {
        let Ok((t, code, data)) = serde_json::from_str::<(f64, String, String)>(line) else { continue };
        if code != "o" {
            continue;
        }
        let wait = ((t - last) / speed).clamp(0.0, 3600.0);
        if wait > 0.0 {
            out.flush()?;
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        last = t;
        out.write_all(data.as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn play_writes_output_events_in_order() {
        let cast = "{\"version\":2}\n[0.0,\"o\",\"a\"]\n[0.01,\"r\",\"80x24\"]\n[0.02,\"o\",\"b\\r\\n\"]\n";
        let mut out = Vec::new();
        super::play(cast, 100.0, &mut out).unwrap();
        assert_eq!(out, b"ab\r\n");
    }

    #[test]
    fn times_are_rfc3339_or_ages() {
        assert_eq!(super::parse_when("1970-01-01T00:00:01Z").unwrap(), 1000);
        let age = super::parse_when("1h").unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((now - age - 3_600_000).abs() < 60_000);
        assert!(super::parse_when("yesterday-ish").unwrap_err().contains("RFC 3339"));
    }
}
