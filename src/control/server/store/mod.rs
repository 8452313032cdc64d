//! Persistence: SQLite (bundled), WAL, versioned migrations in code.
//!
//! One connection, owned by the hub thread (or by an admin command when no
//! server runs). Times are Unix seconds. Lists (tags, endpoints) are JSON
//! text columns. Auth keys are stored as SHA-256 of their secret only.
#![warn(missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::dataplane::wg;
use crate::key::Key;

mod check;
pub(crate) use check::CheckStateRow;

/// Schema migrations; `PRAGMA user_version` = how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    r#"
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created INTEGER NOT NULL
    );
    CREATE TABLE nodes (
        id INTEGER PRIMARY KEY,
        node_key TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        hostname TEXT NOT NULL,
        ip TEXT NOT NULL UNIQUE,
        user_id INTEGER REFERENCES users(id) ON DELETE SET NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        ssh_host_key TEXT,
        endpoints TEXT NOT NULL DEFAULT '[]',
        created INTEGER NOT NULL,
        last_seen INTEGER,
        key_expiry INTEGER,
        online INTEGER NOT NULL DEFAULT 0,
        ephemeral INTEGER NOT NULL DEFAULT 0,
        auth_key_id INTEGER
    );
    CREATE TABLE auth_keys (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
        reusable INTEGER NOT NULL,
        ephemeral INTEGER NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        created INTEGER NOT NULL,
        expires INTEGER,
        revoked INTEGER,
        used_count INTEGER NOT NULL DEFAULT 0,
        last_used INTEGER
    );
    CREATE TABLE policies (
        version INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        set_at INTEGER NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX audit_at ON audit(at);
    "#,
    // 2: check: TOTP secrets, replay guard, approvals and lockouts (src/control/store/check.rs)
    r#"
    CREATE TABLE totp (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        secret TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_step INTEGER
    );
    CREATE TABLE check_state (
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        source_key TEXT NOT NULL,
        approved_at INTEGER,
        failures INTEGER NOT NULL DEFAULT 0,
        last_failure INTEGER,
        locked_until INTEGER,
        PRIMARY KEY (user_id, source_key)
    );
    "#,
    // 3 (issue 13): provider groups of users who sign in with OIDC, as a
    // JSON list, and when they last signed in.
    r#"
    ALTER TABLE users ADD COLUMN provider_groups TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE users ADD COLUMN last_sign_in INTEGER;
    "#,
    // 4: the fleet audit trail shipped by nodes (control::audit)
    crate::control::server::audit::query::MIGRATION,
];

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct UserRow {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) created: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct NodeRow {
    pub(crate) id: i64,
    #[serde(serialize_with = "ser_key")]
    pub(crate) node_key: Key,
    pub(crate) name: String,
    pub(crate) hostname: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) user_id: Option<i64>,
    pub(crate) tags: Vec<String>,
    pub(crate) ssh_host_key: Option<String>,
    pub(crate) endpoints: Vec<SocketAddr>,
    pub(crate) created: i64,
    pub(crate) last_seen: Option<i64>,
    pub(crate) key_expiry: Option<i64>,
    pub(crate) online: bool,
    pub(crate) ephemeral: bool,
    pub(crate) auth_key_id: Option<i64>,
}

fn ser_key<S: serde::Serializer>(k: &Key, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&wg::key_to_base64(k))
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct AuthKeyRow {
    pub(crate) id: i64,
    #[serde(skip)]
    pub(crate) hash: String,
    pub(crate) user_id: Option<i64>,
    pub(crate) reusable: bool,
    pub(crate) ephemeral: bool,
    pub(crate) tags: Vec<String>,
    pub(crate) created: i64,
    pub(crate) expires: Option<i64>,
    pub(crate) revoked: Option<i64>,
    pub(crate) used_count: i64,
    pub(crate) last_used: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PolicyRow {
    pub(crate) version: u64,
    pub(crate) name: String,
    pub(crate) text: String,
    pub(crate) source: String,
    pub(crate) set_at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct AuditRow {
    pub(crate) id: i64,
    pub(crate) at: i64,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) target: String,
    pub(crate) detail: String,
}

pub(crate) struct Store {
    conn: Connection,
}

fn json_list<T: serde::de::DeserializeOwned>(s: String) -> Vec<T> {
    serde_json::from_str(&s).unwrap_or_default()
}

fn node_from_row(r: &Row) -> rusqlite::Result<NodeRow> {
    let key: String = r.get("node_key")?;
    let ip: String = r.get("ip")?;
    Ok(NodeRow {
        id: r.get("id")?,
        node_key: wg::key_from_base64(&key).unwrap_or([0; 32]),
        name: r.get("name")?,
        hostname: r.get("hostname")?,
        ip: ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
        user_id: r.get("user_id")?,
        tags: json_list(r.get("tags")?),
        ssh_host_key: r.get("ssh_host_key")?,
        endpoints: json_list(r.get("endpoints")?),
        created: r.get("created")?,
        last_seen: r.get("last_seen")?,
        key_expiry: r.get("key_expiry")?,
        online: r.get("online")?,
        ephemeral: r.get("ephemeral")?,
        auth_key_id: r.get("auth_key_id")?,
    })
}

fn key_from_row(r: &Row) -> rusqlite::Result<AuthKeyRow> {
    Ok(AuthKeyRow {
        id: r.get("id")?,
        hash: r.get("hash")?,
        user_id: r.get("user_id")?,
        reusable: r.get("reusable")?,
        ephemeral: r.get("ephemeral")?,
        tags: json_list(r.get("tags")?),
        created: r.get("created")?,
        expires: r.get("expires")?,
        revoked: r.get("revoked")?,
        used_count: r.get("used_count")?,
        last_used: r.get("last_used")?,
    })
}

/// Creates `dir` (and parents) with mode 0700; tightens it if it exists.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting mode 0700 on {}", dir.display()))?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) `dir/control.db`, mode 0600, WAL, and runs
    /// pending migrations.
    pub(crate) fn open_dir(dir: &Path) -> Result<Store> {
        ensure_private_dir(dir)?;
        Store::open(&dir.join("control.db"))
    }

    pub(crate) fn open(path: &Path) -> Result<Store> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Create the file ourselves so it is 0600 from the start; SQLite
        // gives its -wal/-shm files the same mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut s = Store { conn };
        s.migrate().with_context(|| format!("migrating {}", path.display()))?;
        Ok(s)
    }

    /// An in-memory store (tests).
    #[cfg(test)]
    pub(crate) fn open_memory() -> Result<Store> {
        let conn = Connection::open_in_memory()?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut s = Store { conn };
        s.migrate()?;
        Ok(s)
    }

    fn migrate(&mut self) -> Result<()> {
        let have: i64 = self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if have as usize > MIGRATIONS.len() {
            anyhow::bail!(
                "the database has schema version {have}, newer than this build knows ({}); use a newer tailgate",
                MIGRATIONS.len()
            );
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m).with_context(|| format!("migration {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn schema_version(&self) -> Result<i64> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Makes every audit write fail (a full disk, a broken table), for tests.
    #[cfg(test)]
    pub(crate) fn break_audit(&self) {
        self.conn.execute_batch("DROP TABLE audit").expect("drop audit table");
    }

    /// Runs `f` in one transaction.
    pub(crate) fn tx<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        // Immediate: see `audit::ingest` (a deferred read-then-write
        // transaction fails at once when another connection wrote between).
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate)?;
        let out = f(self)?;
        tx.commit()?;
        Ok(out)
    }

    // --- meta -------------------------------------------------------------

    pub(crate) fn meta_get(&self, key: &str) -> Result<Option<String>> {
        Ok(self.conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()?)
    }

    pub(crate) fn meta_set(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2")?
            .execute([key, value])?;
        Ok(())
    }

    // --- users ------------------------------------------------------------

    pub(crate) fn user_add(&self, name: &str, now: i64) -> Result<UserRow> {
        self.conn.prepare_cached("INSERT INTO users(name, created) VALUES (?1, ?2)")?.execute(params![name, now])?;
        Ok(UserRow { id: self.conn.last_insert_rowid(), name: name.into(), created: now })
    }

    pub(crate) fn users(&self) -> Result<Vec<UserRow>> {
        let mut st = self.conn.prepare_cached("SELECT id, name, created FROM users ORDER BY name")?;
        let rows = st.query_map([], |r| Ok(UserRow { id: r.get(0)?, name: r.get(1)?, created: r.get(2)? }))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Provider groups of every user that has any.
    pub(crate) fn user_groups_all(&self) -> Result<std::collections::HashMap<i64, Vec<String>>> {
        let mut st = self.conn.prepare_cached("SELECT id, provider_groups FROM users WHERE provider_groups != '[]'")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (id, json) = row?;
            out.insert(id, serde_json::from_str(&json).with_context(|| format!("corrupt provider_groups of user {id}"))?);
        }
        Ok(out)
    }

    /// Records a sign-in: the groups the provider sent this time.
    pub(crate) fn user_signed_in(&self, id: i64, groups: &[String], now: i64) -> Result<()> {
        self.conn.prepare_cached("UPDATE users SET provider_groups = ?2, last_sign_in = ?3 WHERE id = ?1")?.execute(params![
            id,
            serde_json::to_string(groups)?,
            now
        ])?;
        Ok(())
    }

    pub(crate) fn user_by_name(&self, name: &str) -> Result<Option<UserRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT id, name, created FROM users WHERE name = ?1")?
            .query_row([name], |r| Ok(UserRow { id: r.get(0)?, name: r.get(1)?, created: r.get(2)? }))
            .optional()?)
    }

    pub(crate) fn user_delete(&self, id: i64) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM users WHERE id = ?1")?.execute([id])?;
        Ok(())
    }

    // --- nodes ------------------------------------------------------------

    pub(crate) fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM nodes ORDER BY id")?;
        let rows = st.query_map([], node_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Inserts `n` (its `id` is ignored) and returns the new id.
    pub(crate) fn node_insert(&self, n: &NodeRow) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO nodes(node_key, name, hostname, ip, user_id, tags, ssh_host_key, endpoints, created, \
                 last_seen, key_expiry, online, ephemeral, auth_key_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                wg::key_to_base64(&n.node_key),
                n.name,
                n.hostname,
                n.ip.to_string(),
                n.user_id,
                serde_json::to_string(&n.tags)?,
                n.ssh_host_key,
                serde_json::to_string(&n.endpoints)?,
                n.created,
                n.last_seen,
                n.key_expiry,
                n.online,
                n.ephemeral,
                n.auth_key_id,
            ])?;
        Ok(self.conn.last_insert_rowid())
    }

    pub(crate) fn node_update(&self, n: &NodeRow) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE nodes SET node_key = ?2, name = ?3, hostname = ?4, ip = ?5, user_id = ?6, tags = ?7, \
                 ssh_host_key = ?8, endpoints = ?9, last_seen = ?10, key_expiry = ?11, online = ?12, \
                 ephemeral = ?13, auth_key_id = ?14 WHERE id = ?1",
            )?
            .execute(params![
                n.id,
                wg::key_to_base64(&n.node_key),
                n.name,
                n.hostname,
                n.ip.to_string(),
                n.user_id,
                serde_json::to_string(&n.tags)?,
                n.ssh_host_key,
                serde_json::to_string(&n.endpoints)?,
                n.last_seen,
                n.key_expiry,
                n.online,
                n.ephemeral,
                n.auth_key_id,
            ])?;
        Ok(())
    }

    /// Cheap update for connect/disconnect.
    pub(crate) fn node_set_online(&self, id: i64, online: bool, last_seen: i64) -> Result<()> {
        self.conn.prepare_cached("UPDATE nodes SET online = ?2, last_seen = ?3 WHERE id = ?1")?.execute(params![id, online, last_seen])?;
        Ok(())
    }

    /// At server start nobody is connected yet.
    pub(crate) fn nodes_all_offline(&self) -> Result<()> {
        self.conn.execute("UPDATE nodes SET online = 0 WHERE online = 1", [])?;
        Ok(())
    }

    pub(crate) fn node_delete(&self, id: i64) -> Result<()> {
        self.conn.prepare_cached("DELETE FROM nodes WHERE id = ?1")?.execute([id])?;
        Ok(())
    }

    // --- auth keys --------------------------------------------------------

    pub(crate) fn key_insert(&self, k: &AuthKeyRow) -> Result<i64> {
        self.conn
            .prepare_cached(
                "INSERT INTO auth_keys(hash, user_id, reusable, ephemeral, tags, created, expires, revoked, used_count, last_used) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(params![
                k.hash,
                k.user_id,
                k.reusable,
                k.ephemeral,
                serde_json::to_string(&k.tags)?,
                k.created,
                k.expires,
                k.revoked,
                k.used_count,
                k.last_used
            ])?;
        Ok(self.conn.last_insert_rowid())
    }

    pub(crate) fn key_by_hash(&self, hash: &str) -> Result<Option<AuthKeyRow>> {
        Ok(self.conn.prepare_cached("SELECT * FROM auth_keys WHERE hash = ?1")?.query_row([hash], key_from_row).optional()?)
    }

    pub(crate) fn key_by_id(&self, id: i64) -> Result<Option<AuthKeyRow>> {
        Ok(self.conn.prepare_cached("SELECT * FROM auth_keys WHERE id = ?1")?.query_row([id], key_from_row).optional()?)
    }

    pub(crate) fn keys(&self) -> Result<Vec<AuthKeyRow>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM auth_keys ORDER BY id")?;
        let rows = st.query_map([], key_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub(crate) fn key_mark_used(&self, id: i64, now: i64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE auth_keys SET used_count = used_count + 1, last_used = ?2 WHERE id = ?1")?
            .execute(params![id, now])?;
        Ok(())
    }

    pub(crate) fn key_revoke(&self, id: i64, now: i64) -> Result<bool> {
        let n =
            self.conn.prepare_cached("UPDATE auth_keys SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL")?.execute(params![id, now])?;
        Ok(n > 0)
    }

    // --- policy -----------------------------------------------------------

    pub(crate) fn policy_latest(&self) -> Result<Option<PolicyRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT version, name, text, source, set_at FROM policies ORDER BY version DESC LIMIT 1")?
            .query_row([], |r| {
                Ok(PolicyRow {
                    version: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    text: r.get(2)?,
                    source: r.get(3)?,
                    set_at: r.get(4)?,
                })
            })
            .optional()?)
    }

    pub(crate) fn policy_insert(&self, p: &PolicyRow) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO policies(version, name, text, source, set_at) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![p.version as i64, p.name, p.text, p.source, p.set_at])?;
        Ok(())
    }

    // --- audit ------------------------------------------------------------

    pub(crate) fn audit(&self, now: i64, actor: &str, action: &str, target: &str, detail: &str) -> Result<()> {
        self.conn
            .prepare_cached("INSERT INTO audit(at, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![now, actor, action, target, detail])?;
        Ok(())
    }

    pub(crate) fn audit_recent(&self, limit: usize) -> Result<Vec<AuditRow>> {
        let mut st = self.conn.prepare_cached("SELECT id, at, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(AuditRow { id: r.get(0)?, at: r.get(1)?, actor: r.get(2)?, action: r.get(3)?, target: r.get(4)?, detail: r.get(5)? })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(key: u8, name: &str, ip: [u8; 4], user: Option<i64>) -> NodeRow {
        NodeRow {
            id: 0,
            node_key: [key; 32],
            name: name.into(),
            hostname: name.into(),
            ip: ip.into(),
            user_id: user,
            tags: vec![],
            ssh_host_key: Some("ssh-ed25519 AAAA".into()),
            endpoints: vec!["127.0.0.1:5".parse().unwrap()],
            created: 10,
            last_seen: None,
            key_expiry: Some(1000),
            online: false,
            ephemeral: false,
            auth_key_id: None,
        }
    }

    #[test]
    fn migrations_files_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        {
            let s = Store::open_dir(&sd).unwrap();
            assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
            s.user_add("alice", 1).unwrap();
        }
        // Reopening keeps data and does not re-run migrations.
        let s = Store::open_dir(&sd).unwrap();
        assert_eq!(s.users().unwrap()[0].name, "alice");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sd), 0o700);
        assert_eq!(mode(&sd.join("control.db")), 0o600);
        let mode_wal = mode(&sd.join("control.db-wal"));
        assert_eq!(mode_wal & 0o077, 0, "wal file readable by others: {mode_wal:o}");
    }

    #[test]
    fn nodes_keys_policy_audit_roundtrip() {
        let s = Store::open_memory().unwrap();
        let u = s.user_add("alice", 1).unwrap();
        assert!(s.user_add("alice", 2).is_err(), "user names are unique");
        let mut n = node(1, "web1", [100, 64, 0, 1], Some(u.id));
        n.id = s.node_insert(&n).unwrap();
        assert!(s.node_insert(&node(2, "web1", [100, 64, 0, 2], None)).is_err(), "names are unique");
        assert!(s.node_insert(&node(3, "x", [100, 64, 0, 1], None)).is_err(), "ips are unique");
        n.tags = vec!["tag:prod".into()];
        n.online = true;
        s.node_update(&n).unwrap();
        assert_eq!(s.nodes().unwrap(), vec![n.clone()]);

        let k = AuthKeyRow {
            id: 0,
            hash: "h".into(),
            user_id: Some(u.id),
            reusable: false,
            ephemeral: true,
            tags: vec![],
            created: 1,
            expires: Some(5),
            revoked: None,
            used_count: 0,
            last_used: None,
        };
        let kid = s.key_insert(&k).unwrap();
        s.key_mark_used(kid, 3).unwrap();
        assert!(s.key_revoke(kid, 4).unwrap());
        assert!(!s.key_revoke(kid, 4).unwrap());
        let got = s.key_by_hash("h").unwrap().unwrap();
        assert_eq!((got.used_count, got.revoked, got.ephemeral), (1, Some(4), true));

        s.tx(|s| {
            s.policy_insert(&PolicyRow { version: 1, name: "a".into(), text: "x".into(), source: "admin".into(), set_at: 1 })?;
            s.policy_insert(&PolicyRow { version: 2, name: "b".into(), text: "y".into(), source: "admin".into(), set_at: 2 })?;
            s.audit(1, "admin", "policy.set", "b", "")
        })
        .unwrap();
        assert_eq!(s.policy_latest().unwrap().unwrap().version, 2);
        assert_eq!(s.audit_recent(10).unwrap().len(), 1);

        // Removing the user cascades to keys and detaches nodes.
        s.user_delete(u.id).unwrap();
        assert!(s.keys().unwrap().is_empty());
        assert_eq!(s.nodes().unwrap()[0].user_id, None);
    }
}
