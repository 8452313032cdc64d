//! `tailgate control nodes list|rename|expire|remove|tag`.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use super::names::sanitize_hostname;
use super::{Hub, HubError};
use crate::control::server::store::NodeRow;
use crate::control::wire::proto::ErrorCode;
use crate::dataplane::wg;

impl Hub {
    /// The node an admin names by name, FQDN, id, tailnet IP or a unique
    /// node key prefix (at least 6 characters).
    fn find_node(&self, q: &str) -> Result<NodeRow, HubError> {
        let ql = q.to_ascii_lowercase();
        let ql = ql.strip_suffix(&format!(".{}", self.cfg.domain)).unwrap_or(&ql);
        if let Some(n) = self.names.get(ql).and_then(|id| self.nodes.get(id)) {
            return Ok(n.clone());
        }
        if let Some(n) = q.parse::<i64>().ok().and_then(|id| self.nodes.get(&id)) {
            return Ok(n.clone());
        }
        if let Ok(ip) = q.parse::<Ipv4Addr>()
            && let Some(n) = self.nodes.values().find(|n| n.ip == ip)
        {
            return Ok(n.clone());
        }
        if q.len() >= 6 {
            let mut hits = self.nodes.values().filter(|n| wg::key_to_base64(&n.node_key).starts_with(q));
            if let (Some(n), None) = (hits.next(), hits.next()) {
                return Ok(n.clone());
            }
        }
        Err(HubError::not_found(format!(
            "no node {q:?} (give a name, id, tailnet IP or node key prefix; see `tailgate control nodes list`)"
        )))
    }

    /// Tags an admin gives must look like tags and be declared in the policy.
    pub(super) fn check_tags(&self, tags: &[String]) -> Result<(), HubError> {
        for t in tags {
            if !t.starts_with("tag:") || t.len() < 5 {
                return Err(HubError::invalid(format!("{t:?} is not a tag (tags look like tag:prod)")));
            }
            if !self.engine.policy().tags().any(|d| d == t) {
                let declared: Vec<&str> = self.engine.policy().tags().collect();
                return Err(HubError::invalid(format!(
                    "{t} is not declared in the policy's [tag_owners] (declared: {}); add it to the policy first",
                    if declared.is_empty() { "none".into() } else { declared.join(", ") }
                )));
            }
        }
        Ok(())
    }

    fn node_json(&self, n: &NodeRow, now: i64) -> Value {
        json!({
            "id": n.id,
            "name": n.name,
            "fqdn": format!("{}.{}", n.name, self.cfg.domain),
            "hostname": n.hostname,
            "ip": n.ip.to_string(),
            "user": self.user_of(n),
            "registered_by": n.user_id.and_then(|u| self.users.get(&u).cloned()),
            "tags": n.tags,
            "node_key": wg::key_to_base64(&n.node_key),
            "online": self.conns.contains_key(&n.id),
            "last_seen": n.last_seen,
            "created": n.created,
            "key_expiry": n.key_expiry,
            "expired": self.expired(n.id, now),
            "ephemeral": n.ephemeral,
            "endpoints": n.endpoints,
            "ssh_host_key": n.ssh_host_key,
        })
    }

    /// The node as it is now (after a change), for the admin's answer.
    fn node_answer(&self, id: i64, now: i64) -> Result<Value, HubError> {
        self.nodes.get(&id).map(|n| self.node_json(n, now)).ok_or_else(|| {
            HubError::new(ErrorCode::Internal, format!("node #{id} vanished while changing it; list the nodes to see its state"))
        })
    }

    pub(super) fn nodes_list(&self, now: i64) -> Value {
        let mut v: Vec<&NodeRow> = self.nodes.values().collect();
        v.sort_by_key(|n| n.id);
        Value::Array(v.into_iter().map(|n| self.node_json(n, now)).collect())
    }

    pub(super) fn nodes_rename(&mut self, node: &str, name: String, now: i64) -> Result<Value, HubError> {
        let mut n = self.find_node(node)?;
        let id = n.id;
        let clean = sanitize_hostname(&name);
        if clean != name {
            return Err(HubError::invalid(format!(
                "{name:?} is not a valid node name (lowercase letters, digits and '-'); {clean:?} would be"
            )));
        }
        if let Some(o) = self.names.get(&clean).filter(|o| **o != id).and_then(|o| self.nodes.get(o)) {
            return Err(HubError::invalid(format!("name {clean} is taken by node #{} ({})", o.id, o.ip)));
        }
        let old = std::mem::replace(&mut n.name, clean.clone());
        self.save(n).map_err(HubError::store)?;
        self.audit(now, "admin", "node.rename", &old, &clean);
        self.refresh(id, now);
        self.node_answer(id, now)
    }

    pub(super) fn nodes_expire(&mut self, node: &str, now: i64) -> Result<Value, HubError> {
        let mut n = self.find_node(node)?;
        let id = n.id;
        n.key_expiry = Some(now);
        let name = n.name.clone();
        self.save(n).map_err(HubError::store)?;
        self.audit(now, "admin", "node.expire", &name, "");
        self.cut_off(id, ErrorCode::NodeKeyExpired);
        self.refresh(id, now);
        self.node_answer(id, now)
    }

    pub(super) fn nodes_remove(&mut self, node: &str, now: i64) -> Result<Value, HubError> {
        let n = self.find_node(node)?;
        self.delete_node(n.id, now, "admin", "removed by admin").map_err(HubError::store)?;
        Ok(json!({"removed": n.name, "id": n.id}))
    }

    pub(super) fn nodes_tag(&mut self, node: &str, mut tags: Vec<String>, now: i64) -> Result<Value, HubError> {
        let mut n = self.find_node(node)?;
        let id = n.id;
        self.check_tags(&tags)?;
        if tags.is_empty() && n.user_id.is_none() {
            return Err(HubError::invalid(format!("node {} has no user to fall back to; it must keep at least one tag", n.name)));
        }
        tags.sort();
        tags.dedup();
        let was_tagged = !n.tags.is_empty();
        n.tags = tags.clone();
        if !tags.is_empty() {
            n.key_expiry = None;
        } else if was_tagged {
            n.key_expiry = Some(now.saturating_add(self.cfg.node_key_expiry.as_secs() as i64));
        }
        let name = n.name.clone();
        self.save(n).map_err(HubError::store)?;
        self.audit(now, "admin", "node.tag", &name, &if tags.is_empty() { "untagged".to_string() } else { tags.join(",") });
        self.refresh(id, now);
        self.node_answer(id, now)
    }
}
