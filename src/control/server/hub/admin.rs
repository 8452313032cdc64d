//! Admin requests (`tailgate control users|keys|nodes|policy|audit …`): the
//! request type the admin socket speaks, and one dispatcher that hands each
//! request family to its own function (`admin_nodes`, `admin_keys`, `check`
//! for TOTP; users, policy and status here).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::names::valid_user_name;
use super::{Hub, HubError, Now};
use crate::dataplane::wg;
use crate::policy::Policy;

/// Admin operations (the unix socket speaks these as JSON, one per line).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Server summary: URL, key, counts, policy version, audit failures.
    Status,
    /// Add a user.
    UsersAdd {
        /// The user name (1–128 characters, no spaces, commas or quotes).
        name: String,
    },
    /// List users with their node counts and provider groups.
    UsersList,
    /// Remove a user, their untagged nodes and their auth keys.
    UsersRemove {
        /// The user name.
        name: String,
    },
    /// Create an auth key; the answer carries the token (shown once).
    KeysCreate {
        /// Owner of the nodes it joins; `None` for a tagged key.
        user: Option<String>,
        /// May join several nodes.
        #[serde(default)]
        reusable: bool,
        /// Nodes it joins are deleted once offline for the grace period.
        #[serde(default)]
        ephemeral: bool,
        /// Seconds; `None` = the server's default.
        #[serde(default)]
        expiry_secs: Option<u64>,
        /// Tags for the nodes it joins (each declared in the policy).
        #[serde(default)]
        tags: Vec<String>,
    },
    /// List auth keys (never their secrets).
    KeysList,
    /// Revoke an auth key.
    KeysRevoke {
        /// The key's number, as `keys list` shows it.
        id: i64,
    },
    /// List nodes.
    NodesList,
    /// Rename a node.
    NodesRename {
        /// Name, id, tailnet IP or node key prefix of the node.
        node: String,
        /// The new name (lowercase letters, digits and '-').
        name: String,
    },
    /// Expire a node's key now (it must log in again with an auth key).
    NodesExpire {
        /// Name, id, tailnet IP or node key prefix of the node.
        node: String,
    },
    /// Remove a node.
    NodesRemove {
        /// Name, id, tailnet IP or node key prefix of the node.
        node: String,
    },
    /// Replace a node's tags (empty: back to its user).
    NodesTag {
        /// Name, id, tailnet IP or node key prefix of the node.
        node: String,
        /// The new tags, each declared in the policy.
        tags: Vec<String>,
    },
    /// The policy in force.
    PolicyGet,
    /// Validate a policy and put it in force.
    PolicySet {
        /// The policy TOML.
        text: String,
        /// A name for it (shown in diagnostics and `policy get`).
        name: String,
    },
    /// Validate a policy and run its tests without putting it in force.
    PolicyCheck {
        /// The policy TOML.
        text: String,
        /// A name for it (shown in diagnostics).
        name: String,
    },
    /// The latest audit rows.
    AuditList {
        /// At most this many rows.
        limit: usize,
    },
    /// Enrol a user for `check` verification codes (TOTP).
    TotpEnroll {
        /// The user name.
        user: String,
    },
    /// Forget a user's TOTP secret.
    TotpReset {
        /// The user name.
        user: String,
    },
    /// Who is enrolled and who is locked out.
    TotpStatus {
        /// One user, or everyone.
        #[serde(default)]
        user: Option<String>,
    },
}

impl Hub {
    /// Runs an admin operation. `Ok` carries a JSON result for the CLI.
    pub(crate) fn admin(&mut self, req: AdminRequest, at: Now) -> Result<Value, HubError> {
        let now = at.unix;
        match req {
            AdminRequest::Status => Ok(self.status_json()),
            AdminRequest::UsersAdd { name } => self.users_add(name, now),
            AdminRequest::UsersList => self.users_list(),
            AdminRequest::UsersRemove { name } => self.users_remove(name, now),
            AdminRequest::KeysCreate { user, reusable, ephemeral, expiry_secs, tags } => {
                self.keys_create(super::admin_keys::NewKey { user, reusable, ephemeral, expiry_secs, tags }, now)
            }
            AdminRequest::KeysList => self.keys_list(now),
            AdminRequest::KeysRevoke { id } => self.keys_revoke(id, now),
            AdminRequest::NodesList => Ok(self.nodes_list(now)),
            AdminRequest::NodesRename { node, name } => self.nodes_rename(&node, name, now),
            AdminRequest::NodesExpire { node } => self.nodes_expire(&node, now),
            AdminRequest::NodesRemove { node } => self.nodes_remove(&node, now),
            AdminRequest::NodesTag { node, tags } => self.nodes_tag(&node, tags, now),
            AdminRequest::PolicyGet => Ok(json!({
                "version": self.policy.version,
                "name": self.policy.name,
                "source": self.policy.source,
                "text": self.policy.text,
            })),
            AdminRequest::PolicySet { text, name } => {
                let v = self.set_policy(&text, &name, "admin", at)?;
                Ok(json!({"version": v, "name": name}))
            }
            AdminRequest::PolicyCheck { text, name } => policy_check(&text, &name),
            req @ (AdminRequest::TotpEnroll { .. } | AdminRequest::TotpReset { .. } | AdminRequest::TotpStatus { .. }) => {
                self.totp_admin(req, now)
            }
            AdminRequest::AuditList { limit } => {
                let rows = self.store.audit_recent(limit).map_err(HubError::store)?;
                Ok(serde_json::to_value(rows).unwrap_or(Value::Null))
            }
        }
    }

    fn status_json(&self) -> Value {
        json!({
            "url": self.cfg.url,
            "server_public_key": wg::key_to_base64(&self.cfg.server_public),
            "domain": self.cfg.domain,
            "nodes": self.nodes.len(),
            "online": self.conns.len(),
            "users": self.users.len(),
            "policy_version": self.policy.version,
            "policy_source": self.policy.source,
            "audit_write_failures": self.audit_failures,
        })
    }

    fn users_add(&mut self, name: String, now: i64) -> Result<Value, HubError> {
        valid_user_name(&name)?;
        if self.store.user_by_name(&name).map_err(HubError::store)?.is_some() {
            return Err(HubError::invalid(format!("user {name} already exists")));
        }
        let u = self.store.user_add(&name, now).map_err(HubError::store)?;
        self.audit(now, "admin", "user.add", &name, "");
        self.users.insert(u.id, u.name.clone());
        Ok(json!({"id": u.id, "name": u.name, "created": u.created}))
    }

    fn users_list(&self) -> Result<Value, HubError> {
        let users = self.store.users().map_err(HubError::store)?;
        Ok(Value::Array(
            users
                .iter()
                .map(|u| {
                    let nodes = self.nodes.values().filter(|n| n.user_id == Some(u.id) && n.tags.is_empty()).count();
                    let groups = self.user_groups.get(&u.id).cloned().unwrap_or_default();
                    json!({"id": u.id, "name": u.name, "created": u.created, "nodes": nodes, "provider_groups": groups})
                })
                .collect(),
        ))
    }

    fn users_remove(&mut self, name: String, now: i64) -> Result<Value, HubError> {
        let u = self.store.user_by_name(&name).map_err(HubError::store)?.ok_or_else(|| HubError::not_found(format!("no user {name}")))?;
        let owned: Vec<i64> = self.nodes.values().filter(|n| n.user_id == Some(u.id) && n.tags.is_empty()).map(|n| n.id).collect();
        for id in &owned {
            self.delete_node(*id, now, "admin", &format!("user {name} removed")).map_err(HubError::store)?;
        }
        self.store.user_delete(u.id).map_err(HubError::store)?;
        self.audit(now, "admin", "user.remove", &name, &format!("{} nodes removed", owned.len()));
        self.users.remove(&u.id);
        for n in self.nodes.values_mut() {
            if n.user_id == Some(u.id) {
                n.user_id = None; // tagged nodes it registered (FK set NULL)
            }
        }
        Ok(json!({"removed": name, "nodes_removed": owned.len()}))
    }
}

fn policy_check(text: &str, name: &str) -> Result<Value, HubError> {
    let p = Policy::parse_and_test(text, name).map_err(|e| HubError::invalid(e.to_string()))?;
    Ok(json!({
        "name": name,
        "ok": true,
        "tests": p.test_count(),
        "assertions": p.assertion_count(),
        "ssh_rules": p.ssh_rule_count(),
    }))
}
