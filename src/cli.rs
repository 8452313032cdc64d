//! Command-line edge: argument parsing, logging, and wiring the modules into
//! the subcommands. Errors here are `anyhow` with messages for humans.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{self, QuickConfig};
use crate::identity::{Identity, TableResolver};
use crate::node::{Node, NodeConfig};
use crate::wg;

#[derive(Parser)]
#[command(name = "tailgate", version, about = "Userspace WireGuard mesh node with an identity-aware SSH server")]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the tailnet and serve (SSH on the tailnet address, forwards).
    Up(UpArgs),
    /// Connect stdin/stdout to HOST:PORT through the tailnet (for ssh ProxyCommand).
    Nc(NcArgs),
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print a new WireGuard private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and validate a policy file and run its [[tests]].
    Check { file: PathBuf },
}

#[derive(clap::Args)]
struct UpArgs {
    /// A wg-quick style config (static mode).
    #[arg(long, value_name = "FILE")]
    wg_config: PathBuf,
    /// Forward tailnet TCP PORT to a local TARGET, e.g. 8080=127.0.0.1:80 (repeatable).
    #[arg(long, value_name = "PORT=HOST:PORT")]
    forward: Vec<String>,
    /// Listen on a local TCP address and connect each client through the
    /// tailnet, like `ssh -L`: 127.0.0.1:2222=100.64.0.2:22 (repeatable).
    #[arg(long, value_name = "LOCAL=HOST:PORT")]
    local_forward: Vec<String>,
    /// Policy file for the SSH server; without it the embedded default applies.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Where the SSH host key, audit log and recordings live.
    #[arg(long, env = "TAILGATE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Tailnet TCP port of the embedded SSH server.
    #[arg(long, default_value_t = 22)]
    ssh_port: u16,
    /// Do not run the embedded SSH server.
    #[arg(long)]
    no_ssh: bool,
}

#[derive(clap::Args)]
struct NcArgs {
    /// A wg-quick style config (static mode).
    #[arg(long, value_name = "FILE")]
    wg_config: PathBuf,
    host: String,
    port: u16,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Policy { command: PolicyCommand::Check { file } } => {
            return ExitCode::from(crate::policy::cli_check(&file) as u8);
        }
        Command::Genkey => {
            println!("{}", wg::key_to_base64(&wg::generate_private_key()));
            Ok(())
        }
        Command::Pubkey => pubkey(),
        Command::Up(args) => run_async(up(args)),
        Command::Nc(args) => run_async(nc(args)),
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

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run_async(fut: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let r = rt.block_on(fut);
    // A blocked stdin read must not keep the process alive after the work is done.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    r
}

fn pubkey() -> Result<()> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s)?;
    let k = wg::key_from_base64(&s).context("reading a private key from stdin")?;
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
    let mut nc = NodeConfig::new(c.private_key, c.addresses.iter().map(|n| n.addr()).collect());
    nc.listen = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), listen_port);
    nc.peers = c.peers.iter().map(|p| p.config.clone()).collect();
    nc
}

/// Identities from the `# tailgate-*` comments of a static config.
pub fn static_resolver(c: &QuickConfig) -> TableResolver {
    let me_key = wg::public_key_of(&c.private_key);
    let me = Identity {
        node_key: wg::key_to_base64(&me_key),
        node_name: c.name.clone().unwrap_or_else(local_hostname),
        user: None,
        tags: c.tags.clone(),
        ip: c.addresses[0].addr(),
    };
    let peers = c.peers.iter().map(|p| {
        let key = wg::key_to_base64(&p.config.public_key);
        let id = Identity {
            node_name: p.name.clone().unwrap_or_else(|| format!("peer-{}", key_short(&key))),
            node_key: key,
            user: p.user.clone(),
            tags: p.tags.clone(),
            ip: p.config.allowed_ips.first().map(|n| n.addr()).unwrap_or(IpAddr::from([0, 0, 0, 0])),
        };
        (p.config.public_key, id)
    });
    TableResolver::new(me, peers)
}

fn key_short(k: &str) -> String {
    k.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect::<String>().to_lowercase()
}

fn local_hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

fn parse_forward(s: &str) -> Result<(u16, String)> {
    let (port, target) = s
        .split_once('=')
        .with_context(|| format!("--forward {s:?}: expected PORT=HOST:PORT, e.g. 8080=127.0.0.1:80"))?;
    let port = port.parse::<u16>().with_context(|| format!("--forward {s:?}: {port:?} is not a port"))?;
    if !target.contains(':') {
        bail!("--forward {s:?}: the target needs a port, e.g. {target}:80");
    }
    Ok((port, target.to_string()))
}

fn parse_local_forward(s: &str) -> Result<(SocketAddr, SocketAddr)> {
    let (local, remote) = s
        .split_once('=')
        .with_context(|| format!("--local-forward {s:?}: expected LOCAL=HOST:PORT, e.g. 127.0.0.1:2222=100.64.0.2:22"))?;
    let local = local.parse().with_context(|| format!("--local-forward {s:?}: {local:?} is not IP:PORT"))?;
    let remote = remote.parse().with_context(|| format!("--local-forward {s:?}: {remote:?} is not a tailnet IP:PORT"))?;
    Ok((local, remote))
}

async fn up(args: UpArgs) -> Result<()> {
    let forwards = args.forward.iter().map(|f| parse_forward(f)).collect::<Result<Vec<_>>>()?;
    let local_forwards = args.local_forward.iter().map(|f| parse_local_forward(f)).collect::<Result<Vec<_>>>()?;
    let c = load_config(&args.wg_config)?;
    // A policy that fails its own tests never goes into force.
    let policy = match &args.policy {
        Some(p) => crate::policy::Policy::load_and_test(p).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => crate::policy::Policy::default_static(),
    };
    let node = Arc::new(Node::start(node_config(&c, c.listen_port.unwrap_or(0))).await?);
    tracing::info!(udp = %node.udp_addr(), addresses = ?node.addresses(), "node up");
    for (port, target) in forwards {
        let mut listener = node.listen(port).with_context(|| format!("--forward {port}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(stream) = listener.accept().await else { return };
                let target = target.clone();
                tokio::spawn(async move {
                    let from = stream.peer_addr();
                    match tokio::net::TcpStream::connect(&target).await {
                        Ok(mut local) => {
                            let _ = local.set_nodelay(true);
                            let mut stream = stream;
                            if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut local).await {
                                tracing::debug!(%from, %target, error = %e, "forward ended");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%from, %target, error = %e, "forward target refused");
                            let mut stream = stream;
                            stream.abort();
                        }
                    }
                });
            }
        });
    }
    for (local, remote) in local_forwards {
        let listener = tokio::net::TcpListener::bind(local).await.with_context(|| format!("--local-forward: cannot listen on {local}"))?;
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, from)) = listener.accept().await else { continue };
                let _ = client.set_nodelay(true);
                let node = node.clone();
                tokio::spawn(async move {
                    match node.connect(remote).await {
                        Ok(mut stream) => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut stream).await;
                        }
                        Err(e) => tracing::warn!(%from, %remote, error = %e, "local forward could not connect"),
                    }
                });
            }
        });
    }
    if !args.no_ssh {
        let state_dir = match args.state_dir.clone() {
            Some(d) => d,
            None => default_state_dir()?,
        };
        let svc = crate::serve::serve_ssh(&node, Arc::new(static_resolver(&c)), policy, &state_dir, args.ssh_port)?;
        tracing::info!(host_key = %svc.server.host_public_key_openssh(), port = args.ssh_port, "ssh server up");
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

pub fn default_state_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .context("no HOME; pass --state-dir")?;
    Ok(base.join("tailgate"))
}

async fn nc(args: NcArgs) -> Result<()> {
    let c = load_config(&args.wg_config)?;
    let ip: IpAddr = match args.host.parse() {
        Ok(ip) => ip,
        Err(_) => {
            let found = c.peers.iter().find(|p| p.name.as_deref() == Some(args.host.as_str()));
            match found.and_then(|p| p.config.allowed_ips.first()) {
                Some(n) => n.addr(),
                None => bail!("{}: not an IP address or a peer name (# tailgate-name) in {}", args.host, args.wg_config.display()),
            }
        }
    };
    // An ephemeral UDP port: a daemon may hold the configured ListenPort, and
    // the peer learns where we are from our authenticated handshake.
    let node = Node::start(node_config(&c, 0)).await?;
    let stream = node.connect(SocketAddr::new(ip, args.port)).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
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
    let downstream = async {
        let mut stdout = tokio::io::stdout();
        tokio::io::copy(&mut rd, &mut stdout).await?;
        stdout.flush().await?;
        Ok::<_, std::io::Error>(())
    };
    // The remote closing ends the session; our stdin closing only half-closes.
    tokio::pin!(downstream);
    tokio::select! {
        r = &mut downstream => r?,
        r = upstream => { r?; downstream.await?; }
    }
    node.shutdown().await;
    Ok(())
}
