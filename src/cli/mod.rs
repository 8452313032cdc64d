//! Command-line edge: argument parsing, logging, and wiring the modules into
//! the subcommands. Errors here are `anyhow` with messages for humans.
#![warn(missing_docs)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::config::{self, QuickConfig};
use crate::daemon::directory::{Directory, Entry};
use crate::daemon::identity::{Identity, IdentityResolver, TableResolver};
use crate::daemon::{forward, localapi};
use crate::dataplane::node::{Node, NodeConfig};
use crate::dataplane::wg;

pub(crate) mod demo;
pub(crate) mod flagfile;
pub mod sshclient;

#[derive(Parser)]
#[command(name = "tailgate", version, about = "Userspace WireGuard mesh node with an identity-aware SSH server")]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log lines as text or as one JSON object per line (journald, Loki).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process; boxing the arguments saves nothing")]
enum Command {
    /// Join the tailnet and serve (SSH on the tailnet address, forwards).
    Up(UpArgs),
    /// Connect stdin/stdout to HOST:PORT through the tailnet (for ssh ProxyCommand).
    Nc(NcArgs),
    /// A control server, a "vps" and a "laptop" node on this machine, ready for `tailgate ssh`.
    Demo(crate::cli::demo::DemoArgs),
    /// Run or administer the coordination server (users, auth keys, nodes, policy).
    Control(crate::control::ControlArgs),
    /// Run stock `ssh` to a tailnet node: `tailgate ssh [ssh options] [user@]host [command]`.
    Ssh(SshArgs),
    /// Print an OpenSSH config block so plain `ssh web1` works.
    SshConfig {
        #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show this node and its peers (from the running daemon).
    Status(StatusArgs),
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print shell completions (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// Write man pages or completion scripts into a directory (packaging).
    #[command(hide = true)]
    Gen {
        #[command(subcommand)]
        what: GenCommand,
    },
    /// Print a new WireGuard private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
}

#[derive(Subcommand)]
enum GenCommand {
    /// tailgate.1 and one page per subcommand (tailgate-up.1, ...).
    Man { dir: PathBuf },
    /// bash, zsh and fish completion scripts.
    Completions { dir: PathBuf },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and validate a policy file and run its [[tests]].
    Check { file: PathBuf },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Read flags from this TOML file (`listen_port = 41641`, `forward = [...]`)
    /// [default: /etc/tailgate/node.toml when it exists]; flags given here win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Join with this auth key (first start only; later starts reuse the state dir).
    #[arg(long, value_name = "TOKEN", env = "TAILGATE_AUTHKEY", conflicts_with = "wg_config")]
    authkey: Option<String>,
    /// Join this control server by signing in with its identity provider
    /// (no auth key): prints a URL to open in a browser, here or elsewhere.
    #[arg(long, value_name = "URL", conflicts_with_all = ["wg_config", "authkey"])]
    login_server: Option<String>,
    /// The control server's public key (from `tailgate control` at start),
    /// instead of trusting what the server says on first contact.
    #[arg(long, value_name = "KEY", requires = "login_server")]
    login_server_key: Option<String>,
    /// Sign in with the identity provider again (renews the node key).
    #[arg(long, conflicts_with_all = ["wg_config", "authkey"])]
    force_reauth: bool,
    /// Node name to ask for (default: this machine's host name).
    #[arg(long)]
    hostname: Option<String>,
    /// WireGuard UDP port (0 picks one).
    #[arg(long, default_value_t = 0)]
    listen_port: u16,
    /// Static mode: a wg-quick style config instead of a control server.
    #[arg(long, value_name = "FILE")]
    wg_config: Option<PathBuf>,
    /// Forward tailnet TCP PORT to a local TARGET, e.g. 8080=127.0.0.1:80 (repeatable).
    #[arg(long, value_name = "PORT=HOST:PORT")]
    forward: Vec<String>,
    /// Listen on a local TCP address and connect each client through the
    /// tailnet, like `ssh -L`: 127.0.0.1:2222=100.64.0.2:22 (repeatable).
    #[arg(long, value_name = "LOCAL=HOST:PORT")]
    local_forward: Vec<String>,
    /// Static mode: the SSH policy file (without it the embedded default
    /// applies). In control mode the policy comes from the control server.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Where the node key, SSH host key, audit log and recordings live
    /// [default: /var/lib/tailgate/node as root, else ~/.local/state/tailgate].
    #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Tailnet TCP port of the embedded SSH server.
    #[arg(long, default_value_t = 22)]
    ssh_port: u16,
    /// Do not run the embedded SSH server.
    #[arg(long)]
    no_ssh: bool,
    /// CA certificate (PEM) the control server's TLS certificate must chain
    /// to, instead of the system roots; remembered in the state directory.
    #[arg(long, value_name = "FILE", conflicts_with = "wg_config")]
    control_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (keep it on loopback).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct NcArgs {
    /// Join one-shot from a wg-quick style config instead of using the running daemon.
    #[arg(long, value_name = "FILE")]
    wg_config: Option<PathBuf>,
    /// The daemon's state directory (its local API socket lives there).
    #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A node name (`web1`, `web1.<tailnet domain>`) or tailnet IP.
    host: String,
    port: u16,
}

#[derive(clap::Args)]
#[command(
    override_usage = "tailgate ssh [--state-dir DIR] [SSH OPTIONS] [user@]host [command]",
    after_help = "Every ssh option before the destination goes to ssh (-L, -N, -p, -o, -t, -v, -i, -A, ...); \
                  -J and ProxyCommand/ProxyJump are refused: the tailnet is the path."
)]
struct SshArgs {
    #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// ssh options, `[user@]host` (a node name, `name.<tailnet domain>` or
    /// tailnet IP), and the command to run instead of a login shell.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// The `tailgate` command: parses the command line (and config files) and runs it.
pub fn main() -> ExitCode {
    use clap::CommandFactory;
    let argv = match crate::cli::flagfile::expand_args(Cli::command(), std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tailgate: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(ssh_args_verbatim(argv));
    init_logging(cli.verbose, cli.log_format);
    let result = match cli.command {
        Command::Policy { command: PolicyCommand::Check { file } } => {
            return ExitCode::from(crate::policy::cli_check(&file) as u8);
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "tailgate", &mut std::io::stdout());
            Ok(())
        }
        Command::Gen { what } => generate(what),
        Command::Genkey => {
            println!("{}", secrecy::ExposeSecret::expose_secret(&wg::generate_private_key().to_base64()));
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Up(args) => run_async(up(args)),
        Command::Nc(args) => run_async(nc(args)),
        Command::Status(args) => run_async(status(args)),
        Command::Ssh(args) => run_async(ssh(args)),
        Command::SshConfig { state_dir } => run_async(ssh_config(state_dir)),
        Command::Control(args) => crate::control::admin_main(args),
        Command::Demo(args) => run_async(crate::cli::demo::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Config errors already carry FILE:LINE; exit 2 = bad input, nothing started.
            if let Some(ce) = e.downcast_ref::<config::ConfigError>() {
                eprintln!("tailgate: {ce}");
                return ExitCode::from(2);
            }
            eprintln!("tailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tailgate [flags] ssh [--state-dir DIR] REST`: REST is ssh's, and clap
/// would otherwise take ssh's `-v` for our global `--verbose` and refuse
/// the other letters. A `--` after our own flags makes clap pass REST on
/// untouched; `tailgate ssh --help` still reaches clap.
fn ssh_args_verbatim(argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(pos) = argv.iter().skip(1).position(|a| !a.to_string_lossy().starts_with('-')).map(|p| p + 1) else { return argv };
    if argv[pos] != "ssh" {
        return argv;
    }
    let mut i = pos + 1;
    loop {
        let a = argv.get(i).map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        if a == "--state-dir" {
            i += 2;
        } else if a.starts_with("--state-dir=") {
            i += 1;
        } else {
            break;
        }
    }
    match argv.get(i).map(|a| a.to_string_lossy()) {
        None => argv,
        Some(a) if a == "--" || a == "--help" || a == "-h" => argv,
        Some(_) => {
            let mut out = argv;
            out.insert(i.min(out.len()), "--".into());
            out
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(verbose: u8, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        // Flattened: `{"timestamp","level","target","message",...fields}`,
        // what Loki and journald's JSON readers expect.
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).init(),
    }
}

fn run_async(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let r = rt.block_on(fut);
    // A blocked stdin read must not keep the process alive after the work is done.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    r
}

fn generate(what: GenCommand) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    match what {
        GenCommand::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            // Hidden subcommands (this one) get no page.
            let cmd = cmd.mut_subcommand("gen", |c| c.hide(true));
            clap_mangen::generate_to(cmd, &dir).with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
        GenCommand::Completions { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd, "tailgate", &dir)
                    .with_context(|| format!("writing completions to {}", dir.display()))?;
            }
        }
    }
    Ok(())
}

fn pubkey() -> Result<()> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s)?;
    let k = crate::key::PrivateKey::from_base64(&s).context("reading a private key from stdin")?;
    println!("{}", wg::key_to_base64(&wg::public_key_of(&k)));
    Ok(())
}

fn load_config(path: &Path) -> Result<QuickConfig> {
    let c = config::load(path)?;
    for w in &c.warnings {
        tracing::warn!("{w}");
    }
    Ok(c)
}

fn node_config(c: &QuickConfig, listen_port: u16) -> NodeConfig {
    let mut nc = NodeConfig::new(c.private_key.clone(), c.addresses.iter().map(|n| n.addr()).collect());
    nc.listen = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), listen_port);
    nc.peers = c.peers.iter().map(|p| p.config.clone()).collect();
    // Refuse inbound connections until the policy's filter is installed.
    nc.inbound = Some(Arc::new(crate::dataplane::filter::DenyAll));
    nc
}

/// Identities from the `# tailgate-*` comments of a static config.
pub(crate) fn static_resolver(c: &QuickConfig) -> TableResolver {
    let me_key = wg::public_key_of(&c.private_key);
    let me = Identity {
        node_key: wg::key_to_base64(&me_key),
        node_name: c.name.clone().unwrap_or_else(local_hostname),
        user: None,
        tags: c.tags.clone(),
        ip: c.addresses[0].addr(),
        groups: Vec::new(),
    };
    let peers = c.peers.iter().map(|p| {
        let key = wg::key_to_base64(&p.config.public_key);
        let id = Identity {
            node_name: p.name.clone().unwrap_or_else(|| format!("peer-{}", key_short(&key))),
            node_key: key,
            user: p.user.clone(),
            tags: p.tags.clone(),
            ip: p.config.allowed_ips.first().map(|n| n.addr()).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            groups: Vec::new(),
        };
        (p.config.public_key, id)
    });
    TableResolver::new(me, peers)
}

/// Names and addresses from a static config, for `nc`, `ssh` and `status`.
pub(crate) fn static_directory(c: &QuickConfig) -> Directory {
    let resolver = static_resolver(c);
    let me = Entry::from_identity(resolver.self_identity(), c.addresses.iter().map(|n| n.addr()).collect(), None);
    let peers = c
        .peers
        .iter()
        .filter_map(|p| {
            let id = resolver.resolve(&p.config.public_key)?;
            Some(Entry::from_identity(id, p.config.allowed_ips.iter().map(|n| n.addr()).collect(), None))
        })
        .collect();
    Directory { domain: None, me: Some(me), peers }
}

fn key_short(k: &str) -> String {
    k.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect::<String>().to_lowercase()
}

fn local_hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

async fn up(args: UpArgs) -> Result<()> {
    let forwards = args.forward.iter().map(|f| forward::parse_forward(f)).collect::<Result<Vec<_>>>()?;
    let local_forwards = args.local_forward.iter().map(|f| forward::parse_local_forward(f)).collect::<Result<Vec<_>>>()?;
    // A policy that fails its own tests never goes into force.
    let policy = match &args.policy {
        Some(p) => crate::policy::Policy::load_and_test(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => crate::policy::Policy::default_static(),
    };
    let state_dir = state_dir_or_default(args.state_dir.clone())?;
    let Some(wg_config) = args.wg_config.as_deref() else {
        if args.policy.is_some() {
            bail!(
                "--policy is for static mode (--wg-config); with a control server, set the policy there: `tailgate control policy set FILE`"
            );
        }
        let agent = crate::daemon::agent::start(crate::daemon::agent::AgentOptions {
            state_dir: state_dir.clone(),
            authkey: args.authkey.clone(),
            hostname: args.hostname.clone().unwrap_or_else(local_hostname),
            listen_port: args.listen_port,
            ssh_port: (!args.no_ssh).then_some(args.ssh_port),
            control_ca: args.control_ca.clone(),
            login_server: args.login_server.clone(),
            login_server_key: args.login_server_key.clone(),
            force_reauth: args.force_reauth,
        })
        .await?;
        for (port, target) in forwards {
            forward::spawn_forward(&agent.node, port, target)?;
        }
        for (local, remote) in local_forwards {
            forward::spawn_local_forward(agent.node.clone(), local, remote).await?;
        }
        if let Some(addr) = args.metrics_listen {
            let bound = crate::daemon::metrics::serve_node(addr, agent.daemon.clone()).await?;
            println!("tailgate: metrics at http://{bound}/metrics");
        }
        let me = agent.daemon.directory().me.map(|e| e.name).unwrap_or_default();
        let ip = agent.node.addresses().first().map(|a| a.to_string()).unwrap_or_default();
        println!("tailgate: up at {ip} as {me} (UDP {})", agent.node.udp_addr());
        wait_for_signal().await;
        return Ok(());
    };
    let c = load_config(wg_config)?;
    config::ensure_private_dir(&state_dir)?;
    let node = Arc::new(Node::start(node_config(&c, c.listen_port.unwrap_or(0))).await?);
    tracing::info!(udp = %node.udp_addr(), addresses = ?node.addresses(), "node up");
    for (port, target) in forwards {
        forward::spawn_forward(&node, port, target)?;
    }
    for (local, remote) in local_forwards {
        forward::spawn_local_forward(node.clone(), local, remote).await?;
    }
    let mut directory = static_directory(&c);
    let resolver: Arc<dyn IdentityResolver> = Arc::new(static_resolver(&c));
    let policy = if args.no_ssh {
        crate::ssh::PolicyHandle::new(policy)
    } else {
        let svc = crate::daemon::serve::serve_ssh(&node, resolver.clone(), policy, &state_dir, args.ssh_port)?;
        tracing::info!(host_key = %svc.server.host_public_key_openssh(), port = args.ssh_port, "ssh server up");
        if let Some(me) = directory.me.as_mut() {
            me.ssh_host_key = Some(svc.server.host_public_key_openssh());
        }
        svc.policy
    };
    crate::dataplane::filter::install(&node, resolver, policy, (!args.no_ssh).then_some(args.ssh_port));
    let daemon = localapi::Daemon::new(node.clone(), directory);
    if let Some(addr) = args.metrics_listen {
        let bound = crate::daemon::metrics::serve_node(addr, daemon.clone()).await?;
        println!("tailgate: metrics at http://{bound}/metrics");
    }
    if let Err(e) = localapi::serve(daemon, &state_dir) {
        // The node still serves; only `tailgate nc/status` without --wg-config lose it.
        tracing::warn!("local API unavailable: {e:#}");
    }
    println!("tailgate: up at {} (UDP {})", node.addresses()[0], node.udp_addr());
    wait_for_signal().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn state_dir_or_default(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(d) => Ok(d),
        None => default_state_dir(),
    }
}

/// Root's node is the system's (the packaged unit's state directory), so
/// `sudo tailgate status` finds the daemon; anyone else gets their own.
pub(crate) const SYSTEM_NODE_STATE_DIR: &str = "/var/lib/tailgate/node";

pub(crate) fn default_state_dir() -> Result<PathBuf> {
    if nix::unistd::geteuid().is_root() && std::env::var_os("XDG_STATE_HOME").is_none() {
        return Ok(PathBuf::from(SYSTEM_NODE_STATE_DIR));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .context("no HOME; pass --state-dir")?;
    Ok(base.join("tailgate"))
}

async fn ssh(args: SshArgs) -> Result<()> {
    let inv = crate::cli::sshclient::parse_ssh_args(&args.args)?;
    let state_dir = std::path::absolute(state_dir_or_default(args.state_dir)?)?;
    let dir = localapi::fetch_directory(&state_dir).await?;
    let exe = std::env::current_exe().context("locating the tailgate binary")?;
    crate::cli::sshclient::exec_ssh(&exe, &state_dir, &dir, &inv)?;
    Ok(())
}

async fn ssh_config(state_dir: Option<PathBuf>) -> Result<()> {
    let state_dir = std::path::absolute(state_dir_or_default(state_dir)?)?;
    let dir = localapi::fetch_directory(&state_dir).await?;
    let exe = std::env::current_exe().context("locating the tailgate binary")?;
    print!("{}", crate::cli::sshclient::ssh_config(&exe, &state_dir, &dir));
    Ok(())
}

async fn status(args: StatusArgs) -> Result<()> {
    let state_dir = state_dir_or_default(args.state_dir)?;
    let (answer, _) = localapi::request(&state_dir, &localapi::Request::Status).await?;
    let st = match (answer.ok, answer.status) {
        (true, Some(st)) => st,
        _ => bail!("{}", answer.error.unwrap_or_else(|| "the daemon gave no status".into())),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    print!("{}", format_status(&st));
    Ok(())
}

fn format_status(st: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let who = |v: &serde_json::Value| match v["user"].as_str() {
        Some(u) => u.to_string(),
        None => v["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "-".into()),
    };
    let first_ip = |v: &serde_json::Value| v["ips"].get(0).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let mut out = String::new();
    let me = &st["self"];
    let _ = writeln!(out, "{:<16} {:<16} {:<20} self, UDP {}", s(&me["name"]), first_ip(me), who(me), s(&st["listen"]));
    if let Some(c) = st.get("control") {
        let _ = writeln!(out, "control: {}", c.as_str().map(str::to_string).unwrap_or_else(|| c.to_string()));
    }
    let _ = writeln!(
        out,
        "{:<16} {:<16} {:<20} {:<8} {:<28} {:>14} {:>12} {:>12} {:>8}",
        "NAME", "IP", "USER/TAGS", "ONLINE", "PATH", "LAST HANDSHAKE", "RX", "TX", "REFUSED"
    );
    for p in st["peers"].as_array().into_iter().flatten() {
        let hs = p["last_handshake_secs_ago"].as_u64().map(|x| format!("{x}s ago")).unwrap_or_else(|| "never".into());
        // Online is control's view of the peer; static mode has none.
        let online = match p["online"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<20} {:<8} {:<28} {:>14} {:>12} {:>12} {:>8}",
            s(&p["name"]),
            first_ip(p),
            who(p),
            online,
            relayed_path(p),
            hs,
            p["rx_bytes"].as_u64().unwrap_or(0),
            p["tx_bytes"].as_u64().unwrap_or(0),
            p["refused_inbound"].as_u64().unwrap_or(0),
        );
    }
    out
}

/// The peer's path, with the bytes relayed so far when there were any
/// (a peer now direct that used the relay shows how much it did).
fn relayed_path(p: &serde_json::Value) -> String {
    let path = p["path"].as_str().unwrap_or("-");
    let n = p["relayed_rx_bytes"].as_u64().unwrap_or(0) + p["relayed_tx_bytes"].as_u64().unwrap_or(0);
    if n == 0 { path.to_string() } else { format!("{path} (relayed {:.1} MB)", n as f64 / 1e6) }
}

/// Copy stdin to `wr` and run `downstream` (the remote's bytes to stdout).
/// The remote closing ends the session; our stdin closing only half-closes,
/// as ssh expects of a proxy. A connection that was reset or timed out is an
/// error, so the exit status tells a cut transfer from a complete one.
async fn pipe_stdio<W, D>(downstream: D, mut wr: W) -> Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    D: std::future::Future<Output = std::io::Result<()>>,
{
    let upstream = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                wr.shutdown().await?;
                return Ok::<_, std::io::Error>(());
            }
            wr.write_all(&buf[..n]).await?;
        }
    };
    tokio::pin!(downstream);
    tokio::select! {
        r = &mut downstream => r.context("tailnet connection")?,
        r = upstream => {
            if let Err(e) = r {
                // The remote side usually knows better why sending failed
                // (e.g. a reset); give it a moment to say so.
                if let Ok(Err(down)) = tokio::time::timeout(std::time::Duration::from_secs(2), &mut downstream).await {
                    return Err(anyhow::Error::new(down).context("tailnet connection"));
                }
                return Err(anyhow::Error::new(e).context("sending to the tailnet connection"));
            }
            downstream.await.context("tailnet connection")?;
        }
    }
    Ok(())
}

/// The remote's bytes from `rd` to stdout.
async fn to_stdout<R: tokio::io::AsyncRead + Unpin>(mut rd: R) -> std::io::Result<()> {
    let mut stdout = tokio::io::stdout();
    tokio::io::copy(&mut rd, &mut stdout).await?;
    stdout.flush().await
}

async fn nc(args: NcArgs) -> Result<()> {
    let Some(wg_config) = args.wg_config.as_deref() else {
        let state_dir = state_dir_or_default(args.state_dir)?;
        if !localapi::daemon_running(&state_dir) {
            return nc_oneshot(&state_dir, &args.host, args.port).await;
        }
        let req = localapi::Request::Connect { host: args.host.clone(), port: args.port, framed: true };
        let (answer, conn) = localapi::request(&state_dir, &req).await?;
        if !answer.ok {
            bail!("{}", answer.error.unwrap_or_else(|| "connect failed".into()));
        }
        let (rd, wr) = conn.into_split();
        if !answer.framed {
            // An older daemon: a reset looks like a clean end on its pipe.
            return pipe_stdio(to_stdout(rd), wr).await;
        }
        return pipe_stdio(localapi::copy_framed(rd, tokio::io::stdout()), wr).await;
    };
    nc_static(wg_config, &args.host, args.port).await
}

/// No daemon: log in to control with the saved node key, take the netmap,
/// and bring up just enough of a node for this one connection.
async fn nc_oneshot(state_dir: &Path, host: &str, port: u16) -> Result<()> {
    let (target, _) = crate::daemon::agent::control_target(state_dir, None)?;
    let key = crate::daemon::agent::load_or_create_node_key(state_dir)?;
    let hello = crate::control::NodeHello::login(&local_hostname());
    let map = match crate::control::ControlClient::connect(&target, &key, hello).await {
        Ok((client, map)) => {
            drop(client);
            map
        }
        Err(e) if e.is_transient() => {
            crate::daemon::agent::cached_netmap(state_dir).with_context(|| format!("{e}, and no cached netmap"))?
        }
        Err(e) => bail!("{e}"),
    };
    let dir = crate::daemon::agent::directory_of(&map, None);
    let ip = dir.resolve(host)?;
    let mut nc = NodeConfig::new(key, map.self_node.ips.clone());
    nc.peers = map.peer_configs();
    nc.inbound = Some(Arc::new(crate::dataplane::filter::DenyAll));
    dial_once(nc, SocketAddr::new(ip, port)).await
}

/// Bring up a node just for one connection to `remote`, piped to stdio.
async fn dial_once(config: NodeConfig, remote: SocketAddr) -> Result<()> {
    let node = Node::start(config).await?;
    let stream = node.connect(remote).await?;
    let (rd, wr) = tokio::io::split(stream);
    let piped = pipe_stdio(to_stdout(rd), wr).await;
    node.shutdown().await;
    piped
}

async fn nc_static(wg_config: &Path, host: &str, port: u16) -> Result<()> {
    let c = load_config(wg_config)?;
    let ip = static_directory(&c).resolve(host).map_err(|e| anyhow::anyhow!("{e} (in {})", wg_config.display()))?;
    // An ephemeral UDP port: a daemon may hold the configured ListenPort, and
    // the peer learns where we are from our authenticated handshake.
    dial_once(node_config(&c, 0), SocketAddr::new(ip, port)).await
}
