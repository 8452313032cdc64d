//! Administering the control server: the admin socket (changes reach
//! connected nodes at once), direct database access when no server runs,
//! the policy file watcher (a bad file never replaces a good policy), file
//! modes, and the state-directory lock.

#[path = "control_util.rs"]
mod util;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tailgate::control::server::admin::execute;
use tailgate::control::server::hub::AdminRequest;
use tailgate::control::{AuthKeyToken, ControlServer};
use util::*;

/// `execute` is blocking (it is what the CLI runs); keep it off the runtime.
async fn cli(dir: &Path, req: AdminRequest) -> anyhow::Result<Value> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || execute(&dir, req)).await.unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn admin_socket_changes_reach_connected_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let s = start(&dir).await;
    assert_eq!(mode(&dir), 0o700);
    for f in ["control.db", "server.key", "admin.sock"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }

    cli(&dir, AdminRequest::UsersAdd { name: "alice@example.com".into() }).await.unwrap();
    let e = cli(&dir, AdminRequest::UsersAdd { name: "alice@example.com".into() }).await.unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    let v = cli(
        &dir,
        AdminRequest::KeysCreate {
            user: Some("alice@example.com".into()),
            reusable: true,
            ephemeral: false,
            expiry_secs: Some(3600),
            tags: vec![],
        },
    )
    .await
    .unwrap();
    let token = AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap();
    assert_eq!(token.url, s.url());
    assert_eq!(token.server_public, s.public_key());
    let mut a = join(&token, "a").await;
    let mut b = join(&token, "b").await;
    a.wait_for("b", |m| m.peer_by_name("b").is_some()).await;

    let nodes = cli(&dir, AdminRequest::NodesList).await.unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["online"], true);
    assert_eq!(nodes[0]["user"], "alice@example.com");
    let keys = cli(&dir, AdminRequest::KeysList).await.unwrap();
    assert_eq!(keys[0]["used_count"], 2);
    assert_eq!(keys[0]["status"], "valid");

    // Through the socket, live: rename and remove.
    cli(&dir, AdminRequest::NodesRename { node: "b".into(), name: "bee".into() }).await.unwrap();
    a.wait_for("bee", |m| m.peer_by_name("bee").is_some()).await;
    cli(&dir, AdminRequest::NodesRemove { node: "bee.tailnet.internal".into() }).await.unwrap();
    a.wait_for("bee removed", |m| m.peers.is_empty()).await;
    b.wait_key_expired().await;
    let e = cli(&dir, AdminRequest::NodesRemove { node: "nope".into() }).await.unwrap_err();
    assert!(e.to_string().contains("nodes list"), "{e}");

    let audit = cli(&dir, AdminRequest::AuditList { limit: 100 }).await.unwrap();
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    for want in ["user.add", "key.create", "node.register", "node.rename", "node.remove"] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }
    s.shutdown().await;
    assert!(!dir.join("admin.sock").exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn without_a_server_admin_commands_use_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let e = cli(&dir, AdminRequest::UsersList).await.unwrap_err();
    assert!(e.to_string().contains("start the server first"), "{e}");
    let s = start(&dir).await;
    let url = s.url().to_string();
    let public = s.public_key();
    // A second server on the same state directory is refused.
    let e = ControlServer::start(options(&dir)).await.err().unwrap();
    assert!(e.to_string().contains("another tailgate control server"), "{e}");
    s.shutdown().await;

    cli(&dir, AdminRequest::UsersAdd { name: "bob".into() }).await.unwrap();
    let v = cli(
        &dir,
        AdminRequest::KeysCreate { user: Some("bob".into()), reusable: false, ephemeral: false, expiry_secs: None, tags: vec![] },
    )
    .await
    .unwrap();
    let token = AuthKeyToken::parse(v["token"].as_str().unwrap()).unwrap();
    assert_eq!((token.url.as_str(), token.server_public), (url.as_str(), public), "token made offline points at the server");
    let e = cli(&dir, AdminRequest::PolicySet { text: "nonsense = [".into(), name: "x.toml".into() }).await.unwrap_err();
    assert!(e.to_string().contains("x.toml:1"), "{e}");
    cli(&dir, AdminRequest::PolicySet { text: POLICY_V1.into(), name: "p.toml".into() }).await.unwrap();

    // The restarted server has it all.
    let mut o = options(&dir);
    o.listen = url.trim_start_matches("http://").parse().unwrap();
    let s = ControlServer::start(o).await.unwrap();
    let n = join(&token, "bobs-laptop").await;
    assert_eq!(n.map.self_node.user.as_deref(), Some("bob"));
    assert_eq!(n.map.policy.text, POLICY_V1);
    s.shutdown().await;
}

async fn write_file(p: &PathBuf, text: &str) {
    // Different length or a later mtime: the watcher polls both.
    tokio::fs::write(p, text).await.unwrap();
}

#[tokio::test]
async fn the_policy_file_is_hot_reloaded_and_a_bad_one_never_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let file = tmp.path().join("policy.toml");
    // An invalid file at start: refused, with the reason.
    write_file(&file, "[[ssh]]\nsrc = [\"group:nobody\"]\ndst = [\"*\"]\nusers = [\"root\"]\naction = \"accept\"\n").await;
    let mut o = options(&dir);
    o.policy_file = Some(file.clone());
    let e = ControlServer::start(o.clone()).await.err().unwrap();
    assert!(format!("{e:#}").contains("group:nobody"), "{e:#}");

    write_file(&file, POLICY_V1).await;
    let s = ControlServer::start(o).await.unwrap();
    setup_users(&s, &["alice", "bob"]).await;
    let kb = make_key(&s, Some("bob"), &[], false, false).await;
    let kp = make_key(&s, Some("alice"), &["tag:prod"], false, false).await;
    let mut b = join(&kb, "bob").await;
    let _p = join(&kp, "prod1").await;
    assert!(b.map.peers.is_empty());
    let v1 = b.map.policy.version;

    write_file(&file, &policy_v2()).await;
    b.wait_for("prod1 via the reloaded file", |m| m.peer_by_name("prod1").is_some()).await;
    assert_eq!(b.client.netmap().policy.version, v1 + 1);

    // A broken edit: logged, and nothing changes.
    write_file(&file, "[[ssh]]\nsrc = [\"bob\"]\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pol = admin(&s, AdminRequest::PolicyGet).await;
    assert_eq!(pol["version"].as_u64().unwrap(), v1 + 1);
    assert_eq!(pol["text"].as_str().unwrap(), policy_v2());
    // A policy whose own tests fail is refused the same way.
    let failing = policy_v2().replace("accept = [\"root\"]\n\n[[tests]]", "deny = [\"root\"]\n\n[[tests]]");
    assert_ne!(failing, policy_v2());
    let e = s.admin(AdminRequest::PolicySet { text: failing.clone(), name: "f.toml".into() }).await.unwrap_err();
    assert!(e.message.contains("test failed"), "{e}");
    write_file(&file, &failing).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(admin(&s, AdminRequest::PolicyGet).await["version"].as_u64().unwrap(), v1 + 1);

    // Fixing the file goes through again.
    write_file(&file, POLICY_V1).await;
    b.wait_for("prod1 gone again", |m| m.peers.is_empty()).await;
    s.shutdown().await;
}

#[test]
fn a_zero_node_key_lifetime_is_refused_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tailgate"))
        .args(["control", "--listen", "127.0.0.1:0", "--node-key-expiry", "0s", "--state-dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // With the old parser this started a server: bound the wait, then kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let status = status.expect("refused at once instead of starting a server");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("too short") && err.contains("--node-key-expiry"), "{err}");
}
