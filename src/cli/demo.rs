//! `tailgate demo`: the whole product on one machine, with embedded defaults.
//!
//! A control server, a "vps" node (SSH server on its tailnet address only)
//! and a "laptop" node, all in this process, each with its own state
//! directory. The laptop's local API socket lets `tailgate ssh` from another
//! terminal reach the vps exactly as it would across the internet.
#![warn(missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::control::server::hub::AdminRequest;
use crate::control::{ControlServer, ServerOptions};
use crate::daemon::agent::{self, AgentOptions};

/// The demo's policy: the demo user may be anyone on their own nodes, and
/// sessions as root are recorded.
const DEMO_POLICY: &str = r#"
# tailgate demo policy: one user owns both nodes.
[[ssh]]
src = ["autogroup:member"]
dst = ["autogroup:self"]
users = ["root"]
action = "accept"
record = true

[[ssh]]
src = ["autogroup:member"]
dst = ["autogroup:self"]
users = ["autogroup:nonroot"]
action = "accept"

[[tests]]
src = "demo"
dst = "autogroup:self"
accept = ["root", "nobody"]
"#;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    /// Where the demo keeps its state (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Control server address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Exit after setting up and checking one SSH login (for scripts and CI).
    #[arg(long)]
    check: bool,
}

/// The first complete recording at control, waiting up to 15 s.
async fn wait_shipped(ctl_dir: &std::path::Path) -> Option<String> {
    use crate::control::server::audit::{AuditRequest, handle};
    for _ in 0..60 {
        let d = ctl_dir.to_path_buf();
        let v = tokio::task::spawn_blocking(move || handle(&d, &AuditRequest::Recordings { filter: Default::default() })).await.ok()?;
        if let Some(r) = v.ok().and_then(|v| v.as_array().and_then(|a| a.iter().find(|r| r["complete"] == true).cloned())) {
            return r["id"].as_str().map(String::from);
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    None
}

pub(crate) async fn run(args: DemoArgs) -> Result<()> {
    let scratch = args.dir.is_none();
    let dir = match args.dir {
        Some(d) => d,
        None => tempfile::Builder::new().prefix("tailgate-demo.").tempdir()?.keep(),
    };
    let dir = std::path::absolute(&dir)?;
    crate::daemon::config::ensure_private_dir(&dir)?;
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, DEMO_POLICY)?;
    let mut opts = ServerOptions::new(args.listen, dir.join("control"));
    opts.policy_file = Some(policy_file.clone());
    opts.admin_socket = true;
    let control = ControlServer::start(opts).await.context("starting the control server")?;
    let admin = |req| control.admin(req);
    let _ = admin(AdminRequest::UsersAdd { name: "demo".into() }).await;
    let key = admin(AdminRequest::KeysCreate {
        user: Some("demo".into()),
        reusable: true,
        ephemeral: false,
        expiry_secs: Some(3600),
        tags: vec![],
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating an auth key: {e}"))?;
    let token = key["token"].as_str().context("auth key answer without a token")?.to_string();

    let vps = agent::start(AgentOptions {
        state_dir: dir.join("vps"),
        authkey: Some(token.clone()),
        hostname: "vps".into(),
        listen_port: 0,
        control_ca: None,
        ssh_port: Some(22),
        login_server: None,
        login_server_key: None,
        force_reauth: false,
    })
    .await
    .context("starting the vps node")?;
    let laptop = agent::start(AgentOptions {
        state_dir: dir.join("laptop"),
        authkey: Some(token),
        hostname: "laptop".into(),
        listen_port: 0,
        control_ca: None,
        ssh_port: None,
        login_server: None,
        login_server_key: None,
        force_reauth: false,
    })
    .await
    .context("starting the laptop node")?;
    let exe = std::env::current_exe()?;
    let user = if nix::unistd::geteuid().is_root() { "root".to_string() } else { std::env::var("USER").unwrap_or_else(|_| "root".into()) };
    let laptop_dir = dir.join("laptop");
    println!("tailgate demo is running (state in {})", dir.display());
    println!("  control server  {}", control.url());
    println!(
        "  vps             {} (SSH on its tailnet address only)",
        vps.node.addresses().first().map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  laptop          {}", laptop.node.addresses().first().map(|a| a.to_string()).unwrap_or_default());
    println!();
    println!("In another terminal, try:");
    println!("  {} ssh --state-dir {} {user}@vps", exe.display(), laptop_dir.display());
    println!("  {} status --state-dir {}", exe.display(), laptop_dir.display());
    println!("  {} ssh-config --state-dir {}   # then plain `ssh vps`", exe.display(), laptop_dir.display());
    println!("Audit log: {}   recordings: {}", dir.join("vps/audit.jsonl").display(), dir.join("vps/recordings").display());
    let ctl_dir = dir.join("control");
    println!("Root sessions are recorded and shipped to control; replay one with:");
    println!("  {} control --state-dir {} recordings list", exe.display(), ctl_dir.display());
    println!("  {} control --state-dir {} recordings play ID", exe.display(), ctl_dir.display());
    if args.check {
        let out = tokio::process::Command::new(&exe)
            .args(["ssh", "--state-dir"])
            .arg(&laptop_dir)
            .arg(format!("{user}@vps"))
            .args(["echo", "demo-ok"])
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || stdout.trim() != "demo-ok" {
            bail!("demo login failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
        }
        println!("check: `tailgate ssh {user}@vps echo demo-ok` worked");
        if user == "root" {
            match wait_shipped(&ctl_dir).await {
                Some(id) => println!(
                    "check: recording {id} reached control; replay: tailgate control --state-dir {} recordings play {id}",
                    ctl_dir.display()
                ),
                None => bail!("the recording of the check session did not reach the control server"),
            }
        }
        drop((vps, laptop));
        control.shutdown().await;
        if scratch {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }
    println!("Ctrl-C stops the demo.");
    let _ = tokio::signal::ctrl_c().await;
    drop((vps, laptop));
    control.shutdown().await;
    Ok(())
}
