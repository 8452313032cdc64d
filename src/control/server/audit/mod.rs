//! The fleet audit trail on the control server: what nodes ship (audit
//! events with their hash chain, recordings), stored, verified, queried.
//!
//! - [`ingest`]: the thread that stores audit events and acknowledges them.
//! - [`recordings`]: the threads that write, fsync and compress recordings.
//! - [`chain`]: the hash-chain rules (pure).
//! - [`query`]: listings, verification, recording bytes, retention.
//! - [`cli`]: `tailgate control audit ...` / `recordings ...`.
//!
//! Admin requests for this module travel over the same admin socket as the
//! hub's, tagged `audit_op` instead of `op`, and are answered here from a
//! connection of their own (reads only), never by the hub thread.

pub(crate) mod chain;
pub mod cli;
pub(crate) mod ingest;
pub(crate) mod query;
pub(crate) mod recordings;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which events or recordings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// The caller's tailnet user.
    #[serde(default)]
    pub user: Option<String>,
    /// The node the event happened on.
    #[serde(default)]
    pub node: Option<String>,
    /// The local account logged in to.
    #[serde(default)]
    pub login: Option<String>,
    /// Session id (or a prefix).
    #[serde(default)]
    pub session: Option<String>,
    #[serde(default)]
    pub since_ms: Option<i64>,
    #[serde(default)]
    pub until_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "audit_op", rename_all = "snake_case")]
pub enum AuditRequest {
    List {
        filter: Filter,
        #[serde(default)]
        after: Option<i64>,
        limit: usize,
    },
    Verify {
        #[serde(default)]
        node: Option<String>,
    },
    Recordings {
        filter: Filter,
    },
    Read {
        id: String,
        offset: u64,
        len: usize,
    },
}

/// Answers a request from the database in `state_dir`.
pub fn handle(state_dir: &Path, req: &AuditRequest) -> Result<Value, String> {
    let conn = ingest::open_db(state_dir).map_err(|e| format!("{e:#}"))?;
    let r = match req {
        AuditRequest::List { filter, after, limit } => query::list(&conn, filter, *after, (*limit).clamp(1, 100_000)),
        AuditRequest::Verify { node } => query::verify(&conn, node.as_deref()),
        AuditRequest::Recordings { filter } => query::recordings(&conn, filter),
        AuditRequest::Read { id, offset, len } => query::read(&conn, id, *offset, *len),
    };
    r.map_err(|e| format!("{e:#}"))
}
