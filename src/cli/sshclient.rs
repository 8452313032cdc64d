//! `tailgate ssh` and `tailgate ssh-config`: stock OpenSSH wired to the
//! tailnet. The daemon keeps `known_hosts` current from the netmap, and every
//! host is pinned by its short name (`HostKeyAlias`), so whether the user
//! typed `web1`, `web1.<domain>` or the IP, a key other than the netmap's is
//! refused and the first login has no trust-on-first-use prompt.
#![warn(missing_docs)]

use std::path::Path;

use anyhow::{Context, Result};

use crate::control::wire::proto::check_node_name;
use crate::daemon::agent::KNOWN_HOSTS_FILE;
use crate::daemon::directory::{Directory, check_domain};

/// Options that route ssh through `tailgate nc` and pin host keys for `name`.
pub(crate) fn ssh_options(exe: &Path, state_dir: &Path, name: &str, pinned: bool) -> Vec<String> {
    let mut v = vec![
        "-o".into(),
        format!("ProxyCommand={} nc --state-dir {} %h %p", exe.display(), state_dir.display()),
        "-o".into(),
        format!("HostKeyAlias={name}"),
    ];
    if pinned {
        v.extend(["-o".into(), format!("UserKnownHostsFile={}", state_dir.join(KNOWN_HOSTS_FILE).display())]);
        v.extend(["-o".into(), "StrictHostKeyChecking=yes".into()]);
    } else {
        // No key in the netmap (a static-mode peer): trust on first use, in
        // a file of our own so the user's known_hosts stays untouched.
        v.extend(["-o".into(), format!("UserKnownHostsFile={}", state_dir.join("known_hosts.tofu").display())]);
        v.extend(["-o".into(), "StrictHostKeyChecking=accept-new".into()]);
    }
    v
}

/// OpenSSH's option letters (ssh.c's getopt string, OpenSSH 9.x): these
/// take an argument, either attached (`-p22`) or as the next word.
const SSH_OPTS_WITH_ARG: &str = "bceilmopBDEFIJLOPQRSwW";
/// ... and these are switches, which may be clustered (`-NTv`).
const SSH_SWITCHES: &str = "1246afgknqstvxACGKMNTVXYy";

/// `tailgate ssh ARGS` taken apart as ssh would: the options before the
/// destination, the destination, and the remote command after it.
#[derive(Debug, PartialEq)]
pub(crate) struct SshInvocation {
    pub options: Vec<String>,
    pub destination: String,
    pub command: Vec<String>,
}

/// Reads `args` with ssh's option rules, refusing what the tailnet makes
/// meaningless: a jump host or proxy command would replace the tailnet
/// path that `tailgate ssh` exists to provide.
pub(crate) fn parse_ssh_args(args: &[String]) -> Result<SshInvocation, SshArgsError> {
    let mut options = Vec::new();
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        let letters: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < letters.len() {
            let c = letters[j];
            if SSH_OPTS_WITH_ARG.contains(c) {
                let attached: String = letters[j + 1..].iter().collect();
                let value = if attached.is_empty() {
                    i += 1;
                    args.get(i).cloned().ok_or(SshArgsError::NeedsValue(c))?
                } else {
                    attached
                };
                check_option(c, &value)?;
                options.push(format!("-{c}"));
                options.push(value);
                break;
            }
            if !SSH_SWITCHES.contains(c) {
                return Err(SshArgsError::NotAnOption(c));
            }
            options.push(format!("-{c}"));
            j += 1;
        }
        i += 1;
    }
    let destination = args.get(i).cloned().ok_or(SshArgsError::NoDestination)?;
    Ok(SshInvocation { options, destination, command: args[i + 1..].to_vec() })
}

/// Why `tailgate ssh ARGS` will not run ssh.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum SshArgsError {
    #[error("ssh option -{0} needs a value")]
    NeedsValue(char),
    #[error("-{0} is not an ssh option (see `man ssh`); put tailgate's own flags before them")]
    NotAnOption(char),
    #[error("give a destination: tailgate ssh [ssh options] [user@]host [command]")]
    NoDestination,
    /// `-J`, `-o ProxyCommand`, `-o ProxyJump`: the option as written.
    #[error("{0} is meaningless here: {WHY_NO_PROXY}; drop it")]
    Proxy(String),
}

const WHY_NO_PROXY: &str = "tailgate ssh already reaches every node directly through the tailnet (ProxyCommand `tailgate nc`)";

fn check_option(c: char, value: &str) -> Result<(), SshArgsError> {
    if c == 'J' {
        return Err(SshArgsError::Proxy("-J (jump host)".into()));
    }
    if c == 'o' {
        // ssh_config syntax: `Key=value` or `Key value`, keys case-insensitive.
        let key = value.trim_start().split(|ch: char| ch == '=' || ch.is_whitespace()).next().unwrap_or_default();
        if key.eq_ignore_ascii_case("ProxyCommand") || key.eq_ignore_ascii_case("ProxyJump") {
            return Err(SshArgsError::Proxy(format!("-o {key}")));
        }
    }
    Ok(())
}

/// Split `user@host`.
pub(crate) fn split_target(target: &str) -> (Option<&str>, &str) {
    match target.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, target),
    }
}

/// Replace this process with `ssh` to the invocation's destination over the
/// tailnet. Our options come first: for `-o` settings ssh keeps the first
/// value it sees, so the user's options cannot unpin the host key.
pub(crate) fn exec_ssh(exe: &Path, state_dir: &Path, dir: &Directory, inv: &SshInvocation) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let (user, host) = split_target(&inv.destination);
    let entry = dir.lookup(host)?;
    // The name becomes `HostKeyAlias=` and the ssh destination.
    check_node_name(&entry.name).with_context(|| format!("refusing to ssh to {host}"))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(ssh_options(exe, state_dir, &entry.name, entry.ssh_host_key.is_some()));
    cmd.args(&inv.options);
    if let Some(u) = user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("--").arg(&entry.name).args(&inv.command);
    let err = cmd.exec();
    Err(err).context("cannot run ssh (install openssh-client)")
}

/// An OpenSSH config block for every node in the directory.
pub fn ssh_config(exe: &Path, state_dir: &Path, dir: &Directory) -> String {
    let mut out =
        "# tailgate ssh-config: add to ~/.ssh/config (or `Include` it) so plain ssh/scp/sftp/rsync/ansible reach the tailnet\n".to_string();
    // Every word here is ssh_config syntax: a name with a space or a line
    // break would add directives (a ProxyCommand runs code), so entries and
    // a domain that fail the name rules are skipped.
    let domain = dir.domain.as_deref().filter(|d| check_domain(d).is_ok());
    for e in &dir.peers {
        if let Err(err) = check_node_name(&e.name) {
            out.push_str(&format!(
                "\n# skipped a peer ({}): its name is not valid\n",
                e.node_key.replace(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '/' && c != '=', "")
            ));
            tracing::warn!("ssh-config: skipped peer {}: {err}", e.node_key);
            continue;
        }
        let mut names = vec![e.name.clone()];
        if let Some(d) = domain {
            names.push(format!("{}.{d}", e.name));
        }
        names.extend(e.ips.iter().map(|ip| ip.to_string()));
        out.push_str(&format!("\nHost {}\n", names.join(" ")));
        let opts = ssh_options(exe, state_dir, &e.name, e.ssh_host_key.is_some());
        for pair in opts.chunks(2) {
            if let Some((k, v)) = pair.get(1).and_then(|o| o.split_once('=')) {
                out.push_str(&format!("    {k} {v}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<SshInvocation, SshArgsError> {
        parse_ssh_args(&line.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn options_are_read_as_openssh_reads_them() {
        let inv = parse("-L 8080:localhost:80 -N -p22 -o User=bob -tt -vNi key root@web1 ls -la").unwrap();
        assert_eq!(inv.options, ["-L", "8080:localhost:80", "-N", "-p", "22", "-o", "User=bob", "-t", "-t", "-v", "-N", "-i", "key"]);
        assert_eq!(inv.destination, "root@web1");
        assert_eq!(inv.command, ["ls", "-la"]);
        let inv = parse("-- -weird").unwrap();
        assert_eq!((inv.options.len(), inv.destination.as_str()), (0, "-weird"));
        let inv = parse("web1 -t").unwrap();
        assert_eq!(inv.command, ["-t"], "after the destination everything is the command");
    }

    #[test]
    fn meaningless_and_unknown_options_are_refused() {
        assert!(parse("-J jump web1").unwrap_err().to_string().contains("-J (jump host) is meaningless"));
        assert!(parse("-Jjump web1").unwrap_err().to_string().contains("meaningless"));
        assert!(parse("-o ProxyCommand=nc web1").unwrap_err().to_string().contains("-o ProxyCommand is meaningless"));
        assert!(parse("-o proxyjump=x web1").unwrap_err().to_string().contains("meaningless"));
        assert!(parse("-Z web1").unwrap_err().to_string().contains("-Z is not an ssh option"));
        assert!(parse("-p").unwrap_err().to_string().contains("-p needs a value"));
        assert!(parse("-N").unwrap_err().to_string().contains("give a destination"));
    }
}
