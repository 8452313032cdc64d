//! Nodes that join by signing in with the identity provider (issue 13).
//! The OIDC exchange itself happens outside the hub ([`crate::control::server::oidc`]);
//! the hub only sees its verified outcome, never anything a node claims.

use std::net::SocketAddr;

use super::login::{HostInfo, NodeOwner};
use super::names::{check_hostinfo, valid_user_name};
use super::{ConnId, Hub, HubError, Now};
use crate::control::server::oidc::SignedIn;
use crate::control::server::signin::Hello;
use crate::control::wire::proto::ErrorCode;
use crate::key::Key;

impl Hub {
    /// First message of a connection whose person has just signed in with
    /// the provider: the user (email) is created or updated with the groups
    /// the provider sent, then the node is registered for that user (or
    /// re-authenticated, which also renews its key expiry).
    pub(crate) fn hello_signed_in(&mut self, conn: ConnId, node_key: Key, hello: Hello, who: &SignedIn, now: Now) -> Result<i64, HubError> {
        let Hello { hostname, ssh_host_key, endpoints } = hello;
        let r = self.register_signed_in(node_key, &hostname, ssh_host_key, endpoints, who, now);
        self.admit(conn, r, now)
    }

    /// Creates the user if needed and stores the groups from this sign-in.
    /// A change of groups re-announces every node of the user at once, so
    /// peers re-judge open SSH sessions and connections.
    fn user_signed_in(&mut self, who: &SignedIn, now: i64) -> Result<i64, HubError> {
        valid_user_name(&who.email)
            .map_err(|m| HubError::new(ErrorCode::SignIn, format!("the identity provider's email cannot be a tailnet user name: {m}")))?;
        let actor = format!("oidc:{}", who.email);
        let uid = match self.store.user_by_name(&who.email).map_err(HubError::store)? {
            Some(u) => u.id,
            None => {
                let u = self.store.user_add(&who.email, now).map_err(HubError::store)?;
                self.users.insert(u.id, u.name.clone());
                self.audit(now, &actor, "user.add", &who.email, "first sign-in");
                u.id
            }
        };
        let mut groups = who.groups.clone();
        groups.sort();
        groups.dedup();
        self.store.user_signed_in(uid, &groups, now).map_err(HubError::store)?;
        let before = self.user_groups.get(&uid).cloned().unwrap_or_default();
        if before != groups {
            self.audit(now, &actor, "user.groups", &who.email, &format!("{before:?} -> {groups:?}"));
            if groups.is_empty() {
                self.user_groups.remove(&uid);
            } else {
                self.user_groups.insert(uid, groups);
            }
            let mine: Vec<i64> = self.nodes.values().filter(|n| n.user_id == Some(uid)).map(|n| n.id).collect();
            for id in mine {
                self.refresh(id, now);
            }
        }
        Ok(uid)
    }

    fn register_signed_in(
        &mut self,
        node_key: Key,
        hostname: &str,
        ssh_host_key: Option<String>,
        endpoints: Vec<SocketAddr>,
        who: &SignedIn,
        at: Now,
    ) -> Result<(i64, bool), HubError> {
        let now = at.unix;
        let (ssh_host_key, endpoints) = check_hostinfo(Some(hostname), ssh_host_key, endpoints)?;
        let uid = self.user_signed_in(who, now)?;
        let actor = format!("oidc:{}", who.email);
        let key_expiry = Some(now + self.cfg.node_key_expiry.as_secs() as i64);
        // The node holding this key (proven by Noise) signs in again: it
        // becomes this user's, untagged, with a fresh expiry.
        let owner = NodeOwner { user_id: Some(uid), tags: Vec::new(), key_expiry, ephemeral: false, auth_key_id: None };
        let host = HostInfo { hostname, ssh_host_key, endpoints };
        self.register_node(node_key, host, owner, &actor, "signed in with the identity provider", at)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{HubConfig, Out};
    use super::*;
    use crate::control::server::store::Store;
    use crate::control::wire::proto::{ClientMsg, ServerMsg};

    fn msgs(h: &mut Hub, conn: ConnId) -> Vec<ServerMsg> {
        h.take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Out::Send(c, m) if c == conn => Some(serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn hello(host: &str) -> Hello {
        Hello { hostname: host.into(), ssh_host_key: None, endpoints: vec![] }
    }

    fn alice(groups: &[&str]) -> SignedIn {
        SignedIn { email: "alice@example.com".into(), groups: groups.iter().map(|g| g.to_string()).collect() }
    }

    #[test]
    fn a_sign_in_sets_the_users_groups_and_a_later_one_changes_them_at_once() {
        let mut h = Hub::open(Store::open_memory().unwrap(), HubConfig::new("http://127.0.0.1:1", [1; 32]), None, Now::at(1000)).unwrap();
        h.hello_signed_in(1, [10; 32], hello("laptop"), &alice(&["admins", "dev"]), Now::at(1000)).unwrap();
        h.take_outputs();
        h.hello_signed_in(2, [11; 32], hello("phone"), &alice(&["admins", "dev"]), Now::at(1000)).unwrap();
        // The laptop (same user: the default policy shows a user's nodes to
        // each other) sees the phone with the provider's groups.
        let added = msgs(&mut h, 1);
        let phone = added
            .iter()
            .find_map(|m| match m {
                ServerMsg::MapDelta(d) => d.peers_added.first().cloned(),
                _ => None,
            })
            .expect("the phone reaches the laptop's map");
        assert_eq!(phone.groups, vec!["admins".to_string(), "dev".to_string()]);
        // Signing in again without "admins": the laptop learns at once that
        // it lost the group (self) and so did the phone (peer).
        h.hello_signed_in(3, [11; 32], hello("phone"), &alice(&["dev"]), Now::at(1001)).unwrap();
        let deltas: Vec<_> = msgs(&mut h, 1)
            .into_iter()
            .filter_map(|m| match m {
                ServerMsg::MapDelta(d) => Some(d),
                _ => None,
            })
            .collect();
        assert!(deltas.iter().any(|d| d.self_node.as_ref().is_some_and(|s| s.groups == vec!["dev".to_string()])), "{deltas:?}");
        assert!(deltas.iter().any(|d| d.peers_changed.iter().any(|p| p.groups == vec!["dev".to_string()])), "{deltas:?}");
        assert_eq!(h.user_groups.values().next(), Some(&vec!["dev".to_string()]));
        // Only the hub's own sign-in path trusts a user: a node's message cannot.
        let r = h.hello(
            4,
            [12; 32],
            ClientMsg::RegisterInteractive { hostname: "x".into(), ssh_host_key: None, endpoints: vec![], force_reauth: false },
            Now::at(1002),
        );
        assert_eq!(r.unwrap_err().code, ErrorCode::SignIn);
    }
}
