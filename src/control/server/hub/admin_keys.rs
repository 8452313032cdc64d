//! `tailgate control keys create|list|revoke`: auth keys. Only a hash of
//! the secret is stored; the token is in the answer to `create`, once.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Hub, HubError};
use crate::control::server::store::AuthKeyRow;
use crate::control::wire::token::{AuthKeyToken, hash_secret};

/// The longest auth key lifetime an admin may ask for; keeps the Unix-time
/// sum in range (the admin socket takes any u64).
const MAX_KEY_LIFETIME_SECS: u64 = 100 * 365 * 86400;

/// What `keys create` asks for (see [`super::AdminRequest::KeysCreate`]).
pub(super) struct NewKey {
    pub(super) user: Option<String>,
    pub(super) reusable: bool,
    pub(super) ephemeral: bool,
    pub(super) expiry_secs: Option<u64>,
    pub(super) tags: Vec<String>,
}

impl Hub {
    pub(super) fn keys_create(&mut self, k: NewKey, now: i64) -> Result<Value, HubError> {
        let NewKey { user, reusable, ephemeral, expiry_secs, tags } = k;
        let user_row = match &user {
            Some(u) => Some(
                self.store
                    .user_by_name(u)
                    .map_err(HubError::store)?
                    .ok_or_else(|| HubError::not_found(format!("no user {u}; add it first with `tailgate control users add {u}`")))?,
            ),
            None if tags.is_empty() => {
                return Err(HubError::invalid("give --user NAME (the node's owner) or --tag tag:NAME (a tagged node)"));
            }
            None => None,
        };
        self.check_tags(&tags)?;
        if expiry_secs.is_some_and(|e| e == 0 || e > MAX_KEY_LIFETIME_SECS) {
            return Err(HubError::invalid("an auth key lifetime is between 1 second and 100 years"));
        }
        let expiry = expiry_secs.map(Duration::from_secs).unwrap_or(self.cfg.default_auth_key_expiry);
        let secret = AuthKeyToken::new_secret();
        let row = AuthKeyRow {
            id: 0,
            hash: hash_secret(&secret),
            user_id: user_row.as_ref().map(|u| u.id),
            reusable,
            ephemeral,
            tags: tags.clone(),
            created: now,
            expires: Some(now.saturating_add(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX))),
            revoked: None,
            used_count: 0,
            last_used: None,
        };
        let id = self.store.key_insert(&row).map_err(HubError::store)?;
        let owner = if tags.is_empty() { format!("user {}", user.as_deref().unwrap_or("-")) } else { format!("tags {}", tags.join(",")) };
        let kind = format!("{}{}", if reusable { "reusable" } else { "one-off" }, if ephemeral { ", ephemeral" } else { "" });
        self.audit(now, "admin", "key.create", &format!("#{id}"), &format!("{owner} ({kind})"));
        let token = AuthKeyToken { url: self.cfg.url.clone(), server_public: self.cfg.server_public, secret };
        Ok(json!({
            "id": id,
            "user": user,
            "tags": tags,
            "reusable": reusable,
            "ephemeral": ephemeral,
            "expires": row.expires,
            "token": token.encode(),
        }))
    }

    pub(super) fn keys_list(&self, now: i64) -> Result<Value, HubError> {
        let keys = self.store.keys().map_err(HubError::store)?;
        Ok(Value::Array(
            keys.iter()
                .map(|k| {
                    let status = if k.revoked.is_some() {
                        "revoked"
                    } else if k.expires.is_some_and(|e| e <= now) {
                        "expired"
                    } else if !k.reusable && k.used_count > 0 {
                        "used"
                    } else {
                        "valid"
                    };
                    json!({
                        "id": k.id,
                        "user": k.user_id.and_then(|u| self.users.get(&u).cloned()),
                        "tags": k.tags,
                        "reusable": k.reusable,
                        "ephemeral": k.ephemeral,
                        "created": k.created,
                        "expires": k.expires,
                        "revoked": k.revoked,
                        "used_count": k.used_count,
                        "status": status,
                    })
                })
                .collect(),
        ))
    }

    pub(super) fn keys_revoke(&mut self, id: i64, now: i64) -> Result<Value, HubError> {
        self.store.key_by_id(id).map_err(HubError::store)?.ok_or_else(|| HubError::not_found(format!("no auth key #{id}")))?;
        let changed = self.store.key_revoke(id, now).map_err(HubError::store)?;
        self.audit(now, "admin", "key.revoke", &format!("#{id}"), "");
        Ok(json!({"id": id, "revoked": true, "already_revoked": !changed}))
    }
}
