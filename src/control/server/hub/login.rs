//! The first message of a connection: register with an auth key, log in
//! with a known node key, and admission (LoginOk + the full map) or refusal.

use std::net::SocketAddr;

use super::names::{check_hostinfo, short_key};
use super::{ConnId, Hub, HubError, Now, Out};
use crate::control::fmt_time;
use crate::control::server::store::{AuthKeyRow, NodeRow};
use crate::control::wire::proto::{ClientMsg, ErrorCode, ServerOut, check_node_name};
use crate::control::wire::token::hash_secret;
use crate::key::Key;

impl Hub {
    /// First message of a connection. On success the node is online, `conn`
    /// gets LoginOk + MapFull, and the node id is returned. On refusal the
    /// error goes to `conn` and the driver should close it.
    pub(crate) fn hello(&mut self, conn: ConnId, node_key: Key, msg: ClientMsg, now: Now) -> Result<i64, HubError> {
        let r = match msg {
            ClientMsg::Register { auth_key, hostname, ssh_host_key, endpoints, previous_node_key } => {
                if previous_node_key.is_some() {
                    Err(HubError::new(
                        ErrorCode::Protocol,
                        "previous_node_key is no longer accepted (an auth key does not prove you hold the old node key); \
                         rotate keys with rotate_key over a session of the old key, or register as a new node",
                    ))
                } else {
                    self.register(node_key, &auth_key, &hostname, ssh_host_key, endpoints, now)
                }
            }
            ClientMsg::Login { hostname, ssh_host_key, endpoints } => self.login(node_key, hostname, ssh_host_key, endpoints, now.unix),
            ClientMsg::RegisterInteractive { hostname, ssh_host_key, endpoints, force_reauth } => {
                // Only a sign-in the server itself completed reaches
                // `hello_signed_in`; here a valid key may just log in.
                if !force_reauth && self.relay_allowed(&node_key, now) {
                    self.login(node_key, Some(hostname), ssh_host_key, endpoints, now.unix)
                } else {
                    Err(HubError::new(
                        ErrorCode::SignIn,
                        "signing in with an identity provider is not enabled on this control server; \
                         join with an auth key: `tailgate up --authkey TOKEN` (an admin makes one with `tailgate control keys create`)",
                    ))
                }
            }
            other => {
                Err(HubError::new(ErrorCode::Protocol, format!("the first message must be register or login, not {}", msg_name(&other))))
            }
        };
        self.admit(conn, r, now)
    }

    /// Puts a registered or logged-in node online on `conn` (LoginOk +
    /// MapFull), or refuses with `r`'s error.
    pub(super) fn admit(&mut self, conn: ConnId, r: Result<(i64, bool), HubError>, at: Now) -> Result<i64, HubError> {
        let now = at.unix;
        let (id, new_node) = match r {
            Ok(x) => x,
            Err(e) => return Err(self.refuse(conn, e)),
        };
        // One connection per node: the newer one wins.
        if let Some(old) = self.conns.insert(id, conn) {
            self.engine.detach(id as u64);
            self.out.push(Out::send(
                old,
                ServerOut::Error { code: ErrorCode::Replaced, message: "another connection with this node key replaced this one".into() },
            ));
            self.out.push(Out::Close(old, "replaced by a newer connection".into()));
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.online = true;
            n.last_seen = Some(now);
        }
        if let Err(e) = self.store.node_set_online(id, true, now) {
            tracing::warn!("store: {e:#}");
        }
        self.refresh(id, now);
        // The node may be gone from the engine (a key lifetime so short it
        // expired on arrival): refuse rather than assume it is there.
        let (Some(n), Some(full)) = (self.nodes.get(&id), self.engine.attach(id as u64)) else {
            self.conns.remove(&id);
            self.engine.detach(id as u64);
            if let Some(n) = self.nodes.get_mut(&id) {
                n.online = false;
            }
            if let Err(e) = self.store.node_set_online(id, false, now) {
                tracing::warn!("store: {e:#}");
            }
            self.refresh(id, now);
            // Offline again: an ephemeral node must stay on the grace list
            // (keeping an earlier "offline since", since it never got
            // online), or nothing would ever delete it.
            if self.nodes.get(&id).is_some_and(|n| n.ephemeral) {
                self.offline_since.entry(id).or_insert(at.mono);
            }
            let e =
                HubError::new(ErrorCode::NodeKeyExpired, "the node key expired as it logged in; log in again with an auth key".to_string());
            return Err(self.refuse(conn, e));
        };
        self.offline_since.remove(&id);
        let me = self.self_info(n);
        self.out.push(Out::send(
            conn,
            ServerOut::LoginOk {
                new_node,
                node: me,
                domain: self.cfg.domain.clone(),
                keepalive_secs: self.cfg.keepalive.as_secs().max(1) as u32,
                binary_chunks: true,
                gzip_chunks: true,
            },
        ));
        self.out.push(Out::send(conn, ServerOut::MapFull(full)));
        Ok(id)
    }

    pub(super) fn refuse(&mut self, conn: ConnId, e: HubError) -> HubError {
        self.out.push(Out::send(conn, ServerOut::Error { code: e.code, message: e.message.clone() }));
        self.out.push(Out::Close(conn, e.message.clone()));
        e
    }

    fn login(
        &mut self,
        node_key: Key,
        hostname: Option<String>,
        ssh_host_key: Option<String>,
        endpoints: Vec<SocketAddr>,
        now: i64,
    ) -> Result<(i64, bool), HubError> {
        let (ssh_host_key, endpoints) = check_hostinfo(hostname.as_deref(), ssh_host_key, endpoints)?;
        let Some(&id) = self.by_key.get(&node_key) else {
            return Err(HubError::new(
                ErrorCode::NotRegistered,
                format!(
                    "node key {} is not registered with this control server (the node may have been removed); \
                     join with an auth key: `tailgate up --authkey TOKEN` (an admin creates one with `tailgate control keys create`)",
                    short_key(&node_key)
                ),
            ));
        };
        let Some(mut n) = self.nodes.get(&id).cloned() else {
            return Err(HubError::new(ErrorCode::Internal, "node index out of step; try again"));
        };
        if self.expired(id, now) {
            return Err(HubError::new(
                ErrorCode::NodeKeyExpired,
                format!(
                    "the node key of {} expired on {}; log in again with an auth key (`tailgate up --authkey TOKEN`; an admin creates one with `tailgate control keys create`)",
                    n.name,
                    fmt_time(n.key_expiry.unwrap_or(now))
                ),
            ));
        }
        if let Some(h) = hostname {
            n.hostname = h;
        }
        if ssh_host_key.is_some() {
            n.ssh_host_key = ssh_host_key;
        }
        n.endpoints = endpoints;
        // A fresh login starts a fresh report budget.
        self.endpoint_gates.remove(&id);
        self.save(n).map_err(HubError::store)?;
        Ok((id, false))
    }

    fn check_auth_key(&self, secret: &str, now: i64) -> Result<AuthKeyRow, HubError> {
        let ask = "ask an admin for a new one with `tailgate control keys create`";
        let k = self.store.key_by_hash(&hash_secret(secret)).map_err(HubError::store)?.ok_or_else(|| {
            HubError::new(
                ErrorCode::AuthKey,
                format!(
                    "auth key not recognised by this control server (it may belong to another tailnet, or was deleted with its user); {ask}"
                ),
            )
        })?;
        if let Some(r) = k.revoked {
            return Err(HubError::new(ErrorCode::AuthKey, format!("auth key #{} was revoked on {}; {ask}", k.id, fmt_time(r))));
        }
        if let Some(e) = k.expires.filter(|e| *e <= now) {
            return Err(HubError::new(ErrorCode::AuthKey, format!("auth key #{} expired on {}; {ask}", k.id, fmt_time(e))));
        }
        if !k.reusable && k.used_count > 0 {
            return Err(HubError::new(
                ErrorCode::AuthKey,
                format!(
                    "auth key #{} is a one-off key and was already used on {}; {ask} (add --reusable for a key that joins several nodes)",
                    k.id,
                    fmt_time(k.last_used.unwrap_or(k.created))
                ),
            ));
        }
        for t in &k.tags {
            if !self.engine.policy().tags().any(|d| d == t) {
                return Err(HubError::new(
                    ErrorCode::AuthKey,
                    format!(
                        "auth key #{} applies {t}, which the policy in force does not declare in [tag_owners]; fix the policy, or {ask}",
                        k.id
                    ),
                ));
            }
        }
        Ok(k)
    }

    /// Registers a new node, or re-authenticates the node that holds
    /// `node_key` (proven by the Noise handshake) after its key expired.
    /// It never touches a node under another key: moving a node to a new
    /// key is [`ClientMsg::RotateKey`], proven by a session of the old key.
    fn register(
        &mut self,
        node_key: Key,
        secret: &str,
        hostname: &str,
        ssh_host_key: Option<String>,
        endpoints: Vec<SocketAddr>,
        at: Now,
    ) -> Result<(i64, bool), HubError> {
        let now = at.unix;
        let (ssh_host_key, endpoints) = check_hostinfo(Some(hostname), ssh_host_key, endpoints)?;
        // A known, valid node key: this is a login; the auth key is not used.
        if let Some(&id) = self.by_key.get(&node_key)
            && !self.expired(id, now)
        {
            return self.login(node_key, Some(hostname.into()), ssh_host_key, endpoints, now);
        }
        let key = self.check_auth_key(secret, now)?;
        let lifetime = self.cfg.node_key_expiry.as_secs() as i64;
        let key_expiry = |tags: &[String]| if tags.is_empty() { Some(now + lifetime) } else { None };
        self.store.key_mark_used(key.id, now).map_err(HubError::store)?;
        let owner = NodeOwner {
            user_id: key.user_id,
            key_expiry: key_expiry(&key.tags),
            tags: key.tags.clone(),
            ephemeral: key.ephemeral,
            auth_key_id: Some(key.id),
        };
        let host = HostInfo { hostname, ssh_host_key, endpoints };
        self.register_node(node_key, host, owner, &format!("authkey#{}", key.id), "re-authenticated", at)
    }

    /// Registers `node_key` for `owner`. A node already holding the key
    /// (expired: re-auth) keeps its name and IP and takes the new owner
    /// (`reauth_detail` goes in the audit line); otherwise a new node gets
    /// a fresh IP and name. Returns (node id, created).
    pub(super) fn register_node(
        &mut self,
        node_key: Key,
        host: HostInfo<'_>,
        owner: NodeOwner,
        actor: &str,
        reauth_detail: &str,
        at: Now,
    ) -> Result<(i64, bool), HubError> {
        let now = at.unix;
        let HostInfo { hostname, ssh_host_key, endpoints } = host;
        if let Some(mut n) = self.by_key.get(&node_key).and_then(|id| self.nodes.get(id)).cloned() {
            n.hostname = hostname.into();
            if ssh_host_key.is_some() {
                n.ssh_host_key = ssh_host_key;
            }
            n.endpoints = endpoints;
            n.user_id = owner.user_id.or(n.user_id);
            n.tags = owner.tags;
            n.key_expiry = owner.key_expiry;
            n.ephemeral = owner.ephemeral;
            n.auth_key_id = owner.auth_key_id;
            let (id, name) = (n.id, n.name.clone());
            self.save(n).map_err(HubError::store)?;
            self.endpoint_gates.remove(&id);
            self.audit(now, actor, "node.reauth", &name, reauth_detail);
            return Ok((id, false));
        }
        let ip = self.alloc_ip().map_err(HubError::store)?;
        let name = self.alloc_name(hostname, None).map_err(HubError::store)?;
        check_node_name(&name).map_err(|e| HubError::store(e.into()))?;
        let mut n = NodeRow {
            id: 0,
            node_key,
            name: name.clone(),
            hostname: hostname.into(),
            ip,
            user_id: owner.user_id,
            tags: owner.tags,
            ssh_host_key,
            endpoints,
            created: now,
            last_seen: Some(now),
            key_expiry: owner.key_expiry,
            online: false,
            ephemeral: owner.ephemeral,
            auth_key_id: owner.auth_key_id,
        };
        n.id = self
            .store
            .tx(|s| {
                let id = s.node_insert(&n)?;
                s.audit(now, actor, "node.register", &name, &format!("{ip} key {}", short_key(&node_key)))?;
                Ok(id)
            })
            .map_err(HubError::store)?;
        self.index(&n);
        if n.ephemeral {
            self.offline_since.insert(n.id, at.mono);
        }
        let id = n.id;
        self.nodes.insert(id, n);
        Ok((id, true))
    }
}

/// Who a registering node will belong to, and on what terms.
pub(super) struct NodeOwner {
    pub(super) user_id: Option<i64>,
    pub(super) tags: Vec<String>,
    pub(super) key_expiry: Option<i64>,
    pub(super) ephemeral: bool,
    pub(super) auth_key_id: Option<i64>,
}

/// What a registering node says about itself (already checked).
pub(super) struct HostInfo<'a> {
    pub(super) hostname: &'a str,
    pub(super) ssh_host_key: Option<String>,
    pub(super) endpoints: Vec<SocketAddr>,
}

pub(super) fn msg_name(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Register { .. } => "register",
        ClientMsg::Login { .. } => "login",
        ClientMsg::RegisterInteractive { .. } => "register_interactive",
        ClientMsg::ReportEndpoints { .. } => "report_endpoints",
        ClientMsg::Logout => "logout",
        ClientMsg::RotateKey { .. } => "rotate_key",
        ClientMsg::KeepAlive => "keep_alive",
        ClientMsg::Check { .. } => "check",
        ClientMsg::AuditEvents { .. } => "audit_events",
        ClientMsg::RecordingChunk { .. } => "recording_chunk",
    }
}
