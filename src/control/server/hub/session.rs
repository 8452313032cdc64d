//! An established node's session: what it may say (endpoints, key
//! rotation, check, logout), its disconnect, the timers (ephemeral grace,
//! key expiry) and node removal.

use anyhow::Result;

use super::names::{clean_endpoints, short_key};
use super::{ConnId, Hub, HubError, Now, Out};
use crate::control::wire::proto::{ClientMsg, DeltaOut, ErrorCode, ServerOut};
use crate::key::Key;

impl Hub {
    /// Moves the node on `conn` to `new_key`. The session is authenticated
    /// as the old key, which is the proof; the new key must be unused. The
    /// old session ends; the node logs in again with the new key.
    fn rotate_key(&mut self, conn: ConnId, node: i64, new_key: Key, at: Now) {
        let now = at.unix;
        let Some(mut n) = self.nodes.get(&node).cloned() else { return };
        if new_key == n.node_key || self.by_key.contains_key(&new_key) {
            self.protocol_error(conn, "rotate_key: the new node key is already registered; generate a fresh key".into());
            return;
        }
        let old_key = std::mem::replace(&mut n.node_key, new_key);
        n.online = false;
        n.last_seen = Some(now);
        let name = n.name.clone();
        if let Err(e) = self.save(n) {
            self.refuse(conn, HubError::store(e));
            return;
        }
        self.audit(now, "node", "node.rekey", &name, &format!("{} -> {}", short_key(&old_key), short_key(&new_key)));
        self.conns.remove(&node);
        self.engine.detach(node as u64);
        if self.nodes.get(&node).is_some_and(|n| n.ephemeral) {
            self.offline_since.insert(node, at.mono);
        }
        self.out.push(Out::send(conn, ServerOut::KeyRotated { node_key: new_key }));
        self.out.push(Out::Close(conn, "node key rotated".into()));
        self.refresh(node, now);
    }

    /// A message on an established connection.
    pub(crate) fn client_msg(&mut self, conn: ConnId, node: i64, msg: ClientMsg, at: Now) {
        let now = at.unix;
        if self.conns.get(&node) != Some(&conn) {
            return; // a replaced connection still draining
        }
        match msg {
            ClientMsg::KeepAlive => {}
            // The connection task hands these to the audit ingest thread.
            ClientMsg::AuditEvents { .. } | ClientMsg::RecordingChunk { .. } => {}
            ClientMsg::ReportEndpoints { endpoints } => match clean_endpoints(endpoints) {
                Ok(eps) => self.report_endpoints(node, eps, at),
                Err(e) => self.protocol_error(conn, e.message),
            },
            ClientMsg::RotateKey { new_node_key } => self.rotate_key(conn, node, new_node_key, at),
            msg @ ClientMsg::Check { .. } => self.check_request(conn, node, msg, now),
            ClientMsg::Logout => {
                let Some(n) = self.nodes.get(&node).cloned() else { return };
                self.out.push(Out::send(conn, ServerOut::LoggedOut));
                self.out.push(Out::Close(conn, "logged out".into()));
                self.conns.remove(&node);
                self.engine.detach(node as u64);
                if n.ephemeral {
                    if let Err(e) = self.delete_node(node, now, "node", "logged out") {
                        tracing::error!("store: cannot delete ephemeral node #{node} at logout: {e:#}");
                    }
                } else {
                    let mut n = n;
                    n.key_expiry = Some(now);
                    n.online = false;
                    let name = n.name.clone();
                    if let Err(e) = self.save(n) {
                        tracing::warn!("store: {e:#}");
                    }
                    self.audit(now, "node", "node.logout", &name, "key expired by logout");
                    self.refresh(node, now);
                }
            }
            ClientMsg::Register { .. } | ClientMsg::Login { .. } | ClientMsg::RegisterInteractive { .. } => {
                self.protocol_error(conn, "already logged in on this connection".into());
            }
        }
    }

    fn protocol_error(&mut self, conn: ConnId, message: String) {
        self.out.push(Out::send(conn, ServerOut::Error { code: ErrorCode::Protocol, message: message.clone() }));
        self.out.push(Out::Close(conn, message));
    }

    /// The connection of `node` ended.
    pub(crate) fn disconnected(&mut self, conn: ConnId, node: i64, at: Now) {
        let now = at.unix;
        if self.conns.get(&node) != Some(&conn) {
            return;
        }
        self.conns.remove(&node);
        self.engine.detach(node as u64);
        let Some(n) = self.nodes.get_mut(&node) else { return };
        n.online = false;
        n.last_seen = Some(now);
        if n.ephemeral {
            self.offline_since.insert(node, at.mono);
        }
        if let Err(e) = self.store.node_set_online(node, false, now) {
            tracing::warn!("store: {e:#}");
        }
        if self.engine.contains(node as u64) {
            self.refresh(node, now);
        }
    }

    /// Timers: ephemeral nodes offline past their grace are deleted; nodes
    /// whose key expired drop out of every map.
    pub(crate) fn tick(&mut self, at: Now) {
        self.flush_endpoints(at);
        let (now, now_i) = (at.unix, at.mono);
        let grace = self.cfg.ephemeral_grace;
        let gone: Vec<i64> = self
            .offline_since
            .iter()
            .filter(|(id, since)| !self.conns.contains_key(id) && now_i.saturating_duration_since(**since) >= grace)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.offline_since.remove(&id);
            if self.nodes.get(&id).is_some_and(|n| n.ephemeral)
                && let Err(e) = self.delete_node(id, now, "server", "ephemeral node offline")
            {
                tracing::error!("store: cannot delete offline ephemeral node #{id}: {e:#}");
            }
        }
        let expired: Vec<(i64, String)> = self
            .nodes
            .values()
            .filter(|n| self.expired(n.id, now) && self.engine.contains(n.id as u64))
            .map(|n| (n.id, n.name.clone()))
            .collect();
        for (id, name) in expired {
            self.audit(now, "server", "node.key_expired", &name, "");
            self.cut_off(id, ErrorCode::NodeKeyExpired);
            self.refresh(id, now);
        }
    }

    /// Tells a connected node its key is no longer valid and closes it.
    pub(super) fn cut_off(&mut self, id: i64, why: ErrorCode) {
        if let Some(c) = self.conns.remove(&id) {
            self.engine.detach(id as u64);
            self.out.push(Out::send(c, ServerOut::MapDelta(DeltaOut { key_expired: true, ..Default::default() })));
            let reason = if why == ErrorCode::Removed { "node removed" } else { "node key expired" };
            self.out.push(Out::Close(c, reason.into()));
        }
    }

    pub(super) fn delete_node(&mut self, id: i64, now: i64, actor: &str, why: &str) -> Result<()> {
        let Some(n) = self.nodes.get(&id).cloned() else { return Ok(()) };
        self.cut_off(id, ErrorCode::Removed);
        self.store.tx(|s| {
            s.node_delete(id)?;
            s.audit(now, actor, "node.remove", &n.name, why)
        })?;
        self.unindex(&n);
        self.nodes.remove(&id);
        self.offline_since.remove(&id);
        let d = self.engine.remove(id as u64);
        self.emit(d);
        Ok(())
    }
}
