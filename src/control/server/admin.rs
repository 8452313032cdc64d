//! `tailgate control …`: run the server, or administer it.
//!
//! Admin commands talk to the running server through its unix socket
//! (`STATE_DIR/admin.sock`, mode 0600, one JSON request and one JSON answer
//! per line), so changes reach connected nodes at once. When no server runs
//! they open the database directly (holding the state directory's lock, so a
//! server cannot start meanwhile); the next server start picks the changes
//! up. `policy check` needs neither.
#![warn(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::control::fmt_time;
use crate::control::server::hub::{AdminRequest, Hub, HubConfig, Now};
use crate::control::server::store::Store;
use crate::control::server::{ServerOptions, admin_socket_path, run_server, server_running};
use crate::dataplane::wg;

fn parse_dur(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 24h, 7d, 180days)"))
}

/// A lifetime or period: zero would expire every key (or spin every timer)
/// at once, and more than a century overflows the Unix-seconds arithmetic.
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_dur(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s} is too short: give at least 1s (examples: 30s, 24h, 7d, 180days)"));
    }
    if d > Duration::from_secs(100 * 365 * 86400) {
        return Err(format!("{s} is too long: at most 100years"));
    }
    Ok(d)
}

fn parse_domain(s: &str) -> Result<String, String> {
    crate::daemon::directory::check_domain(s)?;
    Ok(s.to_string())
}

/// `tailgate control`: the coordination server and its admin commands.
#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    /// Where the server keeps its database, key and admin socket.
    /// Default: /var/lib/tailgate/control as root, else ~/.local/share/tailgate/control.
    #[arg(long, global = true, env = "TAILGATE_CONTROL_STATE_DIR", value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Read flags from this TOML file (`listen = "0.0.0.0:443"`, ...)
    /// [default: /etc/tailgate/control.toml when it exists]; flags given here win.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
    #[command(subcommand)]
    pub(crate) command: Option<ControlCommand>,
}

/// Server flags (`tailgate control [serve] --listen ...`). All optional so
/// that giving one together with an admin subcommand can be refused.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ServeArgs {
    /// TCP address for nodes (HTTP upgrade + Noise) [default: 0.0.0.0:8443].
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
    /// Policy file; validated (its tests must pass) and reloaded when it changes.
    #[arg(long, value_name = "FILE")]
    pub(crate) policy: Option<PathBuf>,
    /// Public URL nodes use (put in auth keys) [default: http://<host name or listen address>:<port>].
    #[arg(long, value_name = "URL")]
    pub(crate) url: Option<String>,
    /// Tailnet DNS domain: nodes are NAME.DOMAIN [default: tailnet.internal].
    #[arg(long, value_parser = parse_domain)]
    pub(crate) domain: Option<String>,
    /// Lifetime of a node key; tagged nodes do not expire [default: 180days].
    #[arg(long, value_parser = parse_lifetime, value_name = "DURATION")]
    pub(crate) node_key_expiry: Option<Duration>,
    /// How long an ephemeral node may be offline before it is deleted [default: 30s].
    #[arg(long, value_parser = parse_dur, value_name = "DURATION")]
    pub(crate) ephemeral_grace: Option<Duration>,
    /// Lifetime of auth keys created without --expiry [default: 7days].
    #[arg(long, value_parser = parse_lifetime, value_name = "DURATION")]
    pub(crate) auth_key_expiry: Option<Duration>,
    /// Delete shipped audit events and recordings older than this (e.g. 90days) [default: keep].
    #[arg(long, value_parser = parse_lifetime, value_name = "DURATION")]
    pub(crate) retention: Option<Duration>,
    /// Keepalive period on node connections [default: 30s].
    #[arg(long, value_parser = parse_lifetime, hide = true)]
    pub(crate) keepalive: Option<Duration>,
    #[command(flatten)]
    pub(crate) tls: crate::control::server::tls::TlsArgs,
    /// Serve Prometheus metrics at /metrics on this address (a listener of
    /// its own, never the public control port).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) oidc: crate::control::server::oidc::OidcArgs,
    /// Cap on what one node may send through the relay, in MB/s (0 = no cap;
    /// nodes already get fair shares of each destination without one) [default: 0].
    #[arg(long, value_name = "MB_PER_SEC")]
    pub(crate) relay_rate: Option<u64>,
}

impl ServeArgs {
    fn any_set(&self) -> bool {
        self.listen.is_some()
            || self.policy.is_some()
            || self.url.is_some()
            || self.domain.is_some()
            || self.node_key_expiry.is_some()
            || self.ephemeral_grace.is_some()
            || self.auth_key_expiry.is_some()
            || self.keepalive.is_some()
            || self.tls.any_set()
            || self.metrics_listen.is_some()
            || self.oidc.any_set()
            || self.retention.is_some()
            || self.relay_rate.is_some()
    }
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum ControlCommand {
    /// Run the server (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Server URL, key, counts.
    Status,
    /// People.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Auth keys that let nodes join.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Registered nodes.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// The policy in force.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The fleet's session audit trail as nodes shipped it (filters, --follow);
    /// `audit verify` checks the hash chains; `audit admin` lists admin actions.
    Audit(Box<crate::control::server::audit::cli::AuditArgs>),
    /// Session recordings shipped by nodes: list, play, export.
    Recordings {
        #[command(subcommand)]
        command: crate::control::server::audit::cli::RecordingsCommand,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum UsersCommand {
    /// Add a user (e.g. alice or alice@example.com, as the policy names them).
    Add {
        name: String,
    },
    List,
    /// Remove a user: their nodes are removed from the tailnet (peers drop
    /// them at once) and their auth keys deleted. Tagged nodes stay.
    Remove {
        name: String,
    },
    /// Verification codes (TOTP) for SSH `check` rules.
    Totp {
        #[command(subcommand)]
        command: TotpCommand,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum TotpCommand {
    /// Create a user's secret: prints an otpauth:// URI, a QR code to scan
    /// with an authenticator app, and the current code to compare.
    Enroll { user: String },
    /// Remove a user's secret (and their approvals and lockouts).
    Reset { user: String },
    /// Who is enrolled, when a code was last used, current lockouts.
    Status { user: Option<String> },
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum KeysCommand {
    /// Create an auth key; its token is the last line printed.
    Create {
        /// Owner of the nodes that join with it (required unless --tag).
        #[arg(long)]
        user: Option<String>,
        /// May register any number of nodes (default: one).
        #[arg(long)]
        reusable: bool,
        /// Nodes are deleted when offline for a while (CI runners, containers).
        #[arg(long)]
        ephemeral: bool,
        /// Key lifetime, e.g. 1h, 24h, 30d (default: the server's, 7 days).
        #[arg(long, value_parser = parse_lifetime)]
        expiry: Option<Duration>,
        /// Tag the nodes (repeatable): they belong to the tag, not a user.
        #[arg(long = "tag", value_name = "tag:NAME")]
        tags: Vec<String>,
    },
    List,
    /// Revoke a key by id (nodes already registered stay).
    Revoke {
        id: i64,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum NodesCommand {
    List,
    /// Rename a node (name, id, IP or key prefix) to NEW_NAME.
    Rename {
        node: String,
        new_name: String,
    },
    /// Expire a node's key now: peers drop it; it needs a new auth key.
    Expire {
        node: String,
    },
    /// Delete a node.
    Remove {
        node: String,
    },
    /// Set a node's tags (replacing them); --untag makes it its user's again.
    Tag {
        node: String,
        #[arg(value_name = "tag:NAME")]
        tags: Vec<String>,
        #[arg(long, conflicts_with = "tags")]
        untag: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum PolicyCommand {
    /// Print the policy in force (the file text).
    Get,
    /// Validate FILE (its tests must pass) and put it in force everywhere.
    Set { file: PathBuf },
    /// Validate FILE and run its tests, without changing anything.
    Check { file: PathBuf },
}

/// Default state directory.
pub(crate) fn default_state_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tailgate/control");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("tailgate/control");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/tailgate/control")
}

fn server_options(state_dir: PathBuf, a: &ServeArgs) -> Result<ServerOptions> {
    let mut o = ServerOptions::new(a.listen.unwrap_or_else(|| "0.0.0.0:8443".parse().expect("addr")), state_dir);
    o.policy_file = a.policy.clone();
    o.url = a.url.clone();
    if let Some(d) = &a.domain {
        o.domain = d.clone();
    }
    if let Some(d) = a.node_key_expiry {
        o.node_key_expiry = d;
    }
    if let Some(d) = a.ephemeral_grace {
        o.ephemeral_grace = d;
    }
    if let Some(d) = a.auth_key_expiry {
        o.default_auth_key_expiry = d;
    }
    if let Some(d) = a.keepalive {
        o.keepalive = d;
    }
    o.tls = a.tls.source();
    o.metrics_listen = a.metrics_listen;
    o.oidc = a.oidc.config()?;
    o.retention = a.retention;
    if let Some(r) = a.relay_rate {
        o.relay.rate_bytes_per_sec = r.saturating_mul(1_000_000);
    }
    Ok(o)
}

/// Entry point of `tailgate control`.
pub fn admin_main(args: ControlArgs) -> Result<()> {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    if args.command.as_ref().is_some_and(|c| !matches!(c, ControlCommand::Serve(_))) && args.serve.any_set() {
        bail!("server flags (--listen, --policy, ...) go with `tailgate control [serve]`, not with admin commands");
    }
    let req = match args.command.clone() {
        None => return serve(server_options(state_dir, &args.serve)?),
        Some(ControlCommand::Serve(s)) => return serve(server_options(state_dir, &s)?),
        Some(ControlCommand::Policy { command: PolicyCommand::Check { file } }) => {
            return match crate::policy::cli_check(&file) {
                0 => Ok(()),
                _ => Err(anyhow!("{} is not valid (see above)", file.display())),
            };
        }
        Some(ControlCommand::Audit(a)) => return crate::control::server::audit::cli::audit_main(&state_dir, &a, args.json),
        Some(ControlCommand::Recordings { command }) => {
            return crate::control::server::audit::cli::recordings_main(&state_dir, &command, args.json);
        }
        Some(c) => request_for(c)?,
    };
    let out = execute(&state_dir, req.clone())?;
    print!("{}", render(&req, &out, args.json));
    Ok(())
}

fn serve(opts: ServerOptions) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_server(opts))
}

/// The admin request for a subcommand (reads files for `policy set`).
pub(crate) fn request_for(c: ControlCommand) -> Result<AdminRequest> {
    Ok(match c {
        ControlCommand::Serve(_) => bail!("serve is not an admin request"),
        ControlCommand::Status => AdminRequest::Status,
        ControlCommand::Audit(a) => match a.command {
            Some(crate::control::server::audit::cli::AuditCommand::Admin { limit }) => AdminRequest::AuditList { limit },
            _ => bail!("`control audit` (session events) is not a hub request"),
        },
        ControlCommand::Recordings { .. } => bail!("`control recordings` is not a hub request"),
        ControlCommand::Users { command } => match command {
            UsersCommand::Add { name } => AdminRequest::UsersAdd { name },
            UsersCommand::List => AdminRequest::UsersList,
            UsersCommand::Remove { name } => AdminRequest::UsersRemove { name },
            UsersCommand::Totp { command: TotpCommand::Enroll { user } } => AdminRequest::TotpEnroll { user },
            UsersCommand::Totp { command: TotpCommand::Reset { user } } => AdminRequest::TotpReset { user },
            UsersCommand::Totp { command: TotpCommand::Status { user } } => AdminRequest::TotpStatus { user },
        },
        ControlCommand::Keys { command } => match command {
            KeysCommand::Create { user, reusable, ephemeral, expiry, tags } => {
                AdminRequest::KeysCreate { user, reusable, ephemeral, expiry_secs: expiry.map(|d| d.as_secs().max(1)), tags }
            }
            KeysCommand::List => AdminRequest::KeysList,
            KeysCommand::Revoke { id } => AdminRequest::KeysRevoke { id },
        },
        ControlCommand::Nodes { command } => match command {
            NodesCommand::List => AdminRequest::NodesList,
            NodesCommand::Rename { node, new_name } => AdminRequest::NodesRename { node, name: new_name },
            NodesCommand::Expire { node } => AdminRequest::NodesExpire { node },
            NodesCommand::Remove { node } => AdminRequest::NodesRemove { node },
            NodesCommand::Tag { node, tags, untag } => {
                if tags.is_empty() && !untag {
                    bail!("give the tags to set (e.g. tag:prod), or --untag to remove them all");
                }
                AdminRequest::NodesTag { node, tags }
            }
        },
        ControlCommand::Policy { command } => match command {
            PolicyCommand::Get => AdminRequest::PolicyGet,
            PolicyCommand::Set { file } => AdminRequest::PolicySet {
                text: std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
                name: file.display().to_string(),
            },
            PolicyCommand::Check { file } => AdminRequest::PolicyCheck {
                text: std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?,
                name: file.display().to_string(),
            },
        },
    })
}

/// Runs an admin request against the server in `state_dir` (its socket), or
/// directly on the database when no server runs.
pub fn execute(state_dir: &Path, req: AdminRequest) -> Result<Value> {
    let sock = admin_socket_path(state_dir);
    match std::os::unix::net::UnixStream::connect(&sock) {
        Ok(s) => via_socket(s, &req),
        Err(e) => {
            if server_running(state_dir) {
                bail!("a control server holds {} but its admin socket {} does not answer ({e})", state_dir.display(), sock.display());
            }
            direct(state_dir, req)
        }
    }
}

/// One request over the admin socket: a JSON line out, `{ok, result|error}` back.
pub(crate) fn via_socket(s: std::os::unix::net::UnixStream, req: &impl serde::Serialize) -> Result<Value> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    (&s).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).context("reading the admin answer")?;
    let v: Value = serde_json::from_str(&answer).context("malformed admin answer")?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        Err(anyhow!("{}", v["error"].as_str().unwrap_or("admin request failed")))
    }
}

fn direct(state_dir: &Path, req: AdminRequest) -> Result<Value> {
    if !state_dir.join("control.db").exists() {
        bail!(
            "no control server state in {}; start the server first: tailgate control --state-dir {}",
            state_dir.display(),
            state_dir.display()
        );
    }
    let _lock = crate::control::server::lock_state_dir(state_dir)?;
    let store = Store::open_dir(state_dir)?;
    let url = store.meta_get("url")?.ok_or_else(|| anyhow!("the server has never run in {}", state_dir.display()))?;
    let key = store.meta_get("server_public")?.ok_or_else(|| anyhow!("no server key recorded"))?;
    let mut cfg = HubConfig::new(&url, wg::key_from_base64(&key)?);
    if let Some(d) = store.meta_get("domain")? {
        cfg.domain = d;
    }
    if let Some(s) = store.meta_get("node_key_expiry_secs")?.and_then(|s| s.parse().ok()) {
        cfg.node_key_expiry = Duration::from_secs(s);
    }
    if let Some(s) = store.meta_get("auth_key_expiry_secs")?.and_then(|s| s.parse().ok()) {
        cfg.default_auth_key_expiry = Duration::from_secs(s);
    }
    let now = Now::read();
    let mut hub = Hub::open(store, cfg, None, now)?;
    Ok(hub.admin(req, now)?)
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn when(v: &Value) -> String {
    v.as_i64().map(fmt_time).unwrap_or_else(|| "never".into())
}

pub(crate) fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |x| x.len())).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, x)| format!("{x:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn owner(v: &Value) -> String {
    let tags: Vec<String> = v["tags"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
    if tags.is_empty() { s(&v["user"]) } else { tags.join(",") }
}

/// The enrolment answer: what to scan (or type), and a code to compare.
fn render_enroll(v: &Value) -> String {
    let uri = s(&v["uri"]);
    let qr = crate::control::server::totp::qr_text(&uri).unwrap_or_else(|e| format!("({e}; type the secret instead)\n"));
    format!(
        "Scan this with an authenticator app (or enter the secret by hand):\n\n{qr}\n\n{uri}\n\nsecret:       {}\ncurrent code: {} (the app should show the same code now)\n\n{} can now pass `check` rules. This secret is shown only once.\n",
        s(&v["secret"]),
        s(&v["code"]),
        s(&v["user"]),
    )
}

/// Human (or JSON) rendering of an admin answer.
pub(crate) fn render(req: &AdminRequest, v: &Value, json: bool) -> String {
    if json {
        return format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    }
    let empty = Vec::new();
    let arr = v.as_array().unwrap_or(&empty);
    match req {
        AdminRequest::Status => format!(
            "url:               {}\nserver public key: {}\ndomain:            {}\nnodes:             {} ({} online)\nusers:             {}\npolicy:            version {} ({})\n",
            s(&v["url"]),
            s(&v["server_public_key"]),
            s(&v["domain"]),
            s(&v["nodes"]),
            s(&v["online"]),
            s(&v["users"]),
            s(&v["policy_version"]),
            s(&v["policy_source"])
        ),
        AdminRequest::UsersAdd { .. } => format!("added user {}\n", s(&v["name"])),
        AdminRequest::UsersRemove { .. } => format!("removed user {} and {} node(s)\n", s(&v["removed"]), s(&v["nodes_removed"])),
        AdminRequest::UsersList => {
            let mut rows = vec![vec!["ID".into(), "NAME".into(), "NODES".into(), "CREATED".into(), "PROVIDER GROUPS".into()]];
            let groups =
                |u: &Value| u["provider_groups"].as_array().map(|g| g.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_default();
            rows.extend(arr.iter().map(|u| vec![s(&u["id"]), s(&u["name"]), s(&u["nodes"]), when(&u["created"]), groups(u)]));
            table(rows)
        }
        AdminRequest::KeysCreate { .. } => {
            let kind = format!(
                "{}{}",
                if v["reusable"].as_bool() == Some(true) { "reusable" } else { "one-off" },
                if v["ephemeral"].as_bool() == Some(true) { ", ephemeral" } else { "" }
            );
            format!(
                "auth key #{} for {} ({kind}), expires {}\njoin a node with: tailgate up --authkey <the token below> --state-dir DIR\n{}\n",
                s(&v["id"]),
                owner(v),
                when(&v["expires"]),
                s(&v["token"])
            )
        }
        AdminRequest::KeysList => {
            let mut rows = vec![vec!["ID".into(), "OWNER".into(), "KIND".into(), "STATUS".into(), "EXPIRES".into(), "USED".into()]];
            rows.extend(arr.iter().map(|k| {
                let mut kind = vec![if k["reusable"].as_bool() == Some(true) { "reusable" } else { "one-off" }];
                if k["ephemeral"].as_bool() == Some(true) {
                    kind.push("ephemeral");
                }
                vec![s(&k["id"]), owner(k), kind.join(","), s(&k["status"]), when(&k["expires"]), s(&k["used_count"])]
            }));
            table(rows)
        }
        AdminRequest::KeysRevoke { .. } => format!("revoked auth key #{}\n", s(&v["id"])),
        AdminRequest::NodesList => {
            let mut rows = vec![vec![
                "ID".into(),
                "NAME".into(),
                "IP".into(),
                "OWNER".into(),
                "STATUS".into(),
                "LAST SEEN".into(),
                "KEY EXPIRES".into(),
            ]];
            rows.extend(arr.iter().map(|n| {
                let status = if n["expired"].as_bool() == Some(true) {
                    "expired"
                } else if n["online"].as_bool() == Some(true) {
                    "online"
                } else {
                    "offline"
                };
                let status = if n["ephemeral"].as_bool() == Some(true) { format!("{status},ephemeral") } else { status.into() };
                vec![s(&n["id"]), s(&n["name"]), s(&n["ip"]), owner(n), status, when(&n["last_seen"]), when(&n["key_expiry"])]
            }));
            table(rows)
        }
        AdminRequest::NodesRename { .. } => format!("node #{} is now {}\n", s(&v["id"]), s(&v["fqdn"])),
        AdminRequest::NodesExpire { .. } => format!("node {} expired; it needs a new auth key to come back\n", s(&v["name"])),
        AdminRequest::NodesRemove { .. } => format!("removed node {}\n", s(&v["removed"])),
        AdminRequest::NodesTag { .. } => format!("node {} is owned by {}\n", s(&v["name"]), owner(v)),
        AdminRequest::PolicyGet => {
            let t = s(&v["text"]);
            if t.ends_with('\n') { t } else { format!("{t}\n") }
        }
        AdminRequest::PolicySet { .. } => format!("policy version {} ({}) in force\n", s(&v["version"]), s(&v["name"])),
        AdminRequest::PolicyCheck { .. } => format!("{}: ok, {} tests passed\n", s(&v["name"]), s(&v["tests"])),
        AdminRequest::TotpEnroll { .. } => render_enroll(v),
        AdminRequest::TotpReset { .. } => format!("removed the verification code secret of {}\n", s(&v["user"])),
        AdminRequest::TotpStatus { .. } => {
            let mut rows = vec![vec!["USER".into(), "ENROLLED".into(), "LAST USED".into(), "LOCKED OUT".into()]];
            rows.extend(arr.iter().map(|u| {
                let enrolled = if u["enrolled"].as_bool() == Some(true) { when(&u["enrolled_at"]) } else { "no".into() };
                let locks: Vec<String> = u["locked_out"]
                    .as_array()
                    .map(|a| a.iter().map(|l| format!("{} until {}", s(&l["node"]), when(&l["until"]))).collect())
                    .unwrap_or_default();
                let locks = if locks.is_empty() { "-".to_string() } else { locks.join(", ") };
                vec![s(&u["user"]), enrolled, when(&u["last_used"]), locks]
            }));
            table(rows)
        }
        AdminRequest::AuditList { .. } => {
            let mut rows = vec![vec!["TIME".into(), "ACTOR".into(), "ACTION".into(), "TARGET".into(), "DETAIL".into()]];
            rows.extend(arr.iter().rev().map(|a| vec![when(&a["at"]), s(&a["actor"]), s(&a["action"]), s(&a["target"]), s(&a["detail"])]));
            table(rows)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_that_make_no_sense_are_refused_when_parsed() {
        for bad in ["0s", "500ms", "1000years"] {
            let e = super::parse_lifetime(bad).unwrap_err();
            assert!(e.contains("too short") || e.contains("too long"), "{bad}: {e}");
        }
        assert_eq!(super::parse_lifetime("1h").unwrap(), std::time::Duration::from_secs(3600));
        assert!(super::parse_domain("tailnet.internal").is_ok());
        for bad in ["a b", "x,y", "*.evil", "evil\n@revoked", ""] {
            assert!(super::parse_domain(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        c: TopCmd,
    }
    #[derive(clap::Subcommand)]
    enum TopCmd {
        Control(ControlArgs),
    }

    fn parse(args: &[&str]) -> Result<ControlArgs, clap::Error> {
        let mut v = vec!["tailgate", "control"];
        v.extend_from_slice(args);
        Top::try_parse_from(v).map(|t| match t.c {
            TopCmd::Control(a) => a,
        })
    }

    #[test]
    fn cli_shapes() {
        let a = parse(&[]).unwrap();
        assert!(a.command.is_none());
        assert!(!a.serve.any_set());
        let a = parse(&["--listen", "127.0.0.1:9", "--policy", "p.toml", "--state-dir", "/x"]).unwrap();
        assert_eq!(a.serve.listen.unwrap().port(), 9);
        assert_eq!(a.state_dir.as_deref(), Some(Path::new("/x")));
        let a = parse(&["keys", "create", "--user", "alice", "--reusable", "--expiry", "24h", "--tag", "tag:prod", "--json"]).unwrap();
        assert!(a.json);
        match request_for(a.command.unwrap()).unwrap() {
            AdminRequest::KeysCreate { user, reusable, expiry_secs, tags, .. } => {
                assert_eq!(
                    (user.as_deref(), reusable, expiry_secs, tags),
                    (Some("alice"), true, Some(86400), vec!["tag:prod".to_string()])
                );
            }
            other => panic!("{other:?}"),
        }
        let a = parse(&["--state-dir", "/s", "nodes", "rename", "web1", "web2"]).unwrap();
        assert_eq!(a.state_dir.as_deref(), Some(Path::new("/s")));
        let a = parse(&["--listen", "127.0.0.1:1", "users", "list"]).unwrap();
        let e = admin_main(a).unwrap_err().to_string();
        assert!(e.contains("server flags"), "server flags and admin commands do not mix: {e}");
        assert!(request_for(parse(&["nodes", "tag", "web1"]).unwrap().command.unwrap()).is_err());
        let e = parse(&["keys", "create", "--expiry", "soon"]).unwrap_err().to_string();
        assert!(e.contains("24h"), "{e}");
    }

    #[test]
    fn keys_create_prints_token_last() {
        let v = serde_json::json!({"id": 3, "user": "alice", "tags": [], "reusable": false, "ephemeral": true, "expires": 0, "token": "tg1-abc"});
        let out =
            render(&AdminRequest::KeysCreate { user: None, reusable: false, ephemeral: false, expiry_secs: None, tags: vec![] }, &v, false);
        assert_eq!(out.lines().last(), Some("tg1-abc"));
        assert!(out.contains("one-off, ephemeral"), "{out}");
    }
}
