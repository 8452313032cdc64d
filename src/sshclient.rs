//! `tailgate ssh` and `tailgate ssh-config`: stock OpenSSH wired to the
//! tailnet. The daemon keeps `known_hosts` current from the netmap, and every
//! host is pinned by its short name (`HostKeyAlias`), so whether the user
//! typed `web1`, `web1.<domain>` or the IP, a key other than the netmap's is
//! refused and the first login has no trust-on-first-use prompt.

use std::path::Path;

use anyhow::{Context, Result};

use crate::agent::KNOWN_HOSTS_FILE;
use crate::control::proto::check_node_name;
use crate::directory::{Directory, check_domain};

/// Options that route ssh through `tailgate nc` and pin host keys for `name`.
pub fn ssh_options(exe: &Path, state_dir: &Path, name: &str, pinned: bool) -> Vec<String> {
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

/// Split `user@host`.
pub fn split_target(target: &str) -> (Option<&str>, &str) {
    match target.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, target),
    }
}

/// Replace this process with `ssh` to `target` over the tailnet.
pub fn exec_ssh(exe: &Path, state_dir: &Path, dir: &Directory, target: &str, rest: &[String]) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let (user, host) = split_target(target);
    let entry = dir.lookup(host)?;
    // The name becomes `HostKeyAlias=` and the ssh destination.
    check_node_name(&entry.name).with_context(|| format!("refusing to ssh to {host}"))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.args(ssh_options(exe, state_dir, &entry.name, entry.ssh_host_key.is_some()));
    if let Some(u) = user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("--").arg(&entry.name).args(rest);
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
