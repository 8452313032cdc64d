//! Tables of SSH `check`: TOTP secrets per user (with the last accepted
//! time step, so a code is good once) and per (user, source node) state:
//! the last approval and the failure count / lockout.

use anyhow::Result;
use rusqlite::{OptionalExtension, params};

use super::Store;
use crate::dataplane::wg;
use crate::key::Key;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TotpRow {
    pub(crate) user_id: i64,
    /// Base32. Never logged, never sent to nodes.
    pub(crate) secret: String,
    pub(crate) created: i64,
    /// The newest time step a code was accepted for.
    pub(crate) last_step: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CheckStateRow {
    pub(crate) approved_at: Option<i64>,
    pub(crate) failures: i64,
    pub(crate) last_failure: Option<i64>,
    pub(crate) locked_until: Option<i64>,
}

impl Store {
    pub(crate) fn totp_get(&self, user_id: i64) -> Result<Option<TotpRow>> {
        Ok(self
            .conn
            .prepare_cached("SELECT user_id, secret, created, last_step FROM totp WHERE user_id = ?1")?
            .query_row([user_id], |r| Ok(TotpRow { user_id: r.get(0)?, secret: r.get(1)?, created: r.get(2)?, last_step: r.get(3)? }))
            .optional()?)
    }

    /// Enrols a user; a new secret also forgets old approvals and lockouts.
    pub(crate) fn totp_set(&self, user_id: i64, secret: &str, now: i64) -> Result<()> {
        self.tx(|s| {
            s.conn
                .prepare_cached("INSERT OR REPLACE INTO totp(user_id, secret, created, last_step) VALUES (?1, ?2, ?3, NULL)")?
                .execute(params![user_id, secret, now])?;
            s.conn.prepare_cached("DELETE FROM check_state WHERE user_id = ?1")?.execute([user_id])?;
            Ok(())
        })
    }

    /// Removes the user's secret, approvals and lockouts. True if there was a secret.
    pub(crate) fn totp_delete(&self, user_id: i64) -> Result<bool> {
        self.tx(|s| {
            let n = s.conn.prepare_cached("DELETE FROM totp WHERE user_id = ?1")?.execute([user_id])?;
            s.conn.prepare_cached("DELETE FROM check_state WHERE user_id = ?1")?.execute([user_id])?;
            Ok(n > 0)
        })
    }

    pub(crate) fn totp_set_last_step(&self, user_id: i64, step: i64) -> Result<()> {
        self.conn.prepare_cached("UPDATE totp SET last_step = ?2 WHERE user_id = ?1")?.execute(params![user_id, step])?;
        Ok(())
    }

    pub(crate) fn check_state_get(&self, user_id: i64, source: &Key) -> Result<CheckStateRow> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT approved_at, failures, last_failure, locked_until FROM check_state WHERE user_id = ?1 AND source_key = ?2",
            )?
            .query_row(params![user_id, wg::key_to_base64(source)], |r| {
                Ok(CheckStateRow { approved_at: r.get(0)?, failures: r.get(1)?, last_failure: r.get(2)?, locked_until: r.get(3)? })
            })
            .optional()?
            .unwrap_or_default())
    }

    pub(crate) fn check_state_put(&self, user_id: i64, source: &Key, st: &CheckStateRow) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO check_state(user_id, source_key, approved_at, failures, last_failure, locked_until) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![user_id, wg::key_to_base64(source), st.approved_at, st.failures, st.last_failure, st.locked_until])?;
        Ok(())
    }

    /// Pairs of this user locked out at `now` (for `totp status`).
    pub(crate) fn check_lockouts(&self, user_id: i64, now: i64) -> Result<Vec<(String, i64)>> {
        let mut st =
            self.conn.prepare_cached("SELECT source_key, locked_until FROM check_state WHERE user_id = ?1 AND locked_until > ?2")?;
        let rows = st.query_map(params![user_id, now], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
