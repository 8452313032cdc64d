//! Shared helpers for the control-plane tests (included with `#[path]`;
//! as a test target of its own it has no tests).
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tailgate::control::server::hub::AdminRequest;
use tailgate::control::{
    AuthKeyToken, ControlClient, ControlError, ControlServer, ControlTarget, MapDelta, NetMap, NodeHello, ServerOptions,
};
use tailgate::dataplane::wg;
use tailgate::key::PrivateKey;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// alice is an admin (root on tag:prod); everyone reaches their own nodes.
pub const POLICY_V1: &str = r#"
[groups]
"group:admins" = ["alice"]

[tag_owners]
"tag:prod" = ["group:admins"]

[[ssh]]
src = ["group:admins"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"

[[ssh]]
src = ["autogroup:member"]
dst = ["autogroup:self"]
users = ["autogroup:nonroot"]
action = "accept"

[[tests]]
src = "alice"
dst = "tag:prod"
accept = ["root"]

[[tests]]
src = "bob"
dst = "tag:prod"
deny = ["root"]
"#;

/// bob becomes an admin too.
pub fn policy_v2() -> String {
    POLICY_V1
        .replace(r#"["alice"]"#, r#"["alice", "bob"]"#)
        .replace("src = \"bob\"\ndst = \"tag:prod\"\ndeny = [\"root\"]", "src = \"bob\"\ndst = \"tag:prod\"\naccept = [\"root\"]")
}

pub fn options(dir: &Path) -> ServerOptions {
    let mut o = ServerOptions::new("127.0.0.1:0".parse().unwrap(), dir);
    o.tick = Duration::from_millis(100);
    o.policy_poll = Duration::from_millis(100);
    o.ephemeral_grace = Duration::from_millis(300);
    o
}

pub async fn start(dir: &Path) -> ControlServer {
    ControlServer::start(options(dir)).await.expect("server starts")
}

pub async fn admin(s: &ControlServer, req: AdminRequest) -> Value {
    s.admin(req.clone()).await.unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

pub async fn setup_users(s: &ControlServer, users: &[&str]) {
    for u in users {
        admin(s, AdminRequest::UsersAdd { name: u.to_string() }).await;
    }
}

pub async fn make_key(s: &ControlServer, user: Option<&str>, tags: &[&str], reusable: bool, ephemeral: bool) -> AuthKeyToken {
    let v = admin(
        s,
        AdminRequest::KeysCreate {
            user: user.map(String::from),
            reusable,
            ephemeral,
            expiry_secs: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
        },
    )
    .await;
    AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap()
}

pub struct Node {
    pub key: PrivateKey,
    pub client: ControlClient,
    pub map: NetMap,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.client.netmap().self_node.name
    }

    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.client.netmap().peers.values().map(|p| p.name.clone()).collect();
        v.sort();
        v
    }

    /// Reads updates until `pred` holds for the map (or panics after TIMEOUT).
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&NetMap) -> bool) -> Vec<MapDelta> {
        let mut seen = Vec::new();
        let r = tokio::time::timeout(TIMEOUT, async {
            while !pred(self.client.netmap()) {
                seen.push(self.client.next_update().await?);
            }
            Ok::<_, ControlError>(())
        })
        .await;
        match r {
            Ok(Ok(())) => seen,
            Ok(Err(e)) => panic!("{}: waiting for {what}: {e}", self.name()),
            Err(_) => panic!("{}: timed out waiting for {what}; map peers {:?}, deltas {seen:?}", self.name(), self.peer_names()),
        }
    }

    /// Reads deltas until one says the node key expired (panics otherwise).
    pub async fn wait_key_expired(&mut self) {
        loop {
            match self.next().await {
                Ok(d) if d.key_expired => return,
                Ok(_) => continue,
                Err(e) => panic!("{}: connection ended without key_expired: {e}", self.name()),
            }
        }
    }

    /// The next delta (panics after TIMEOUT).
    pub async fn next(&mut self) -> Result<MapDelta, ControlError> {
        tokio::time::timeout(TIMEOUT, self.client.next_update()).await.expect("an update in time")
    }
}

pub async fn join(token: &AuthKeyToken, host: &str) -> Node {
    join_with(token, host, wg::generate_private_key()).await.unwrap_or_else(|e| panic!("{host} joins: {e}"))
}

/// A well-formed SSH host key (`ssh-ed25519 BASE64`, the only form control accepts).
pub fn host_key(seed: u8) -> String {
    use russh::keys::ssh_key::public::{Ed25519PublicKey, KeyData};
    russh::keys::PublicKey::new(KeyData::Ed25519(Ed25519PublicKey([seed; 32])), "").to_openssh().unwrap()
}

/// An endpoint peers may be told about (TEST-NET-2; loopback is filtered).
pub const ENDPOINT: &str = "198.51.100.7:41641";

pub fn hello(token: &AuthKeyToken, host: &str) -> NodeHello {
    NodeHello {
        auth_key: Some(token.secret.clone()),
        hostname: host.into(),
        ssh_host_key: Some(host_key(host.len() as u8)),
        endpoints: vec![ENDPOINT.parse().unwrap()],
        ..Default::default()
    }
}

pub async fn join_with(token: &AuthKeyToken, host: &str, key: PrivateKey) -> Result<Node, ControlError> {
    let (client, map) = ControlClient::connect(&ControlTarget::from(token), &key, hello(token, host)).await?;
    Ok(Node { key, client, map })
}

pub async fn login(target: &ControlTarget, host: &str, key: PrivateKey) -> Result<Node, ControlError> {
    let (client, map) = ControlClient::connect(target, &key, NodeHello::login(host)).await?;
    Ok(Node { key, client, map })
}
