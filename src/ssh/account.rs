//! Local accounts and the login environment.
//!
//! Sessions start from an empty environment (nothing of tailgate's own leaks
//! into users' shells) plus the variables a login program sets, plus the
//! client's `env` requests that the policy's `accept_env` patterns allow.
#![warn(missing_docs)]

use std::path::PathBuf;

use crate::daemon::identity::Identity;

/// A local user that sessions run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id the session runs as.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (the session's working directory and `$HOME`).
    pub home: PathBuf,
    /// Login shell: every shell, command and subsystem runs through it.
    pub shell: PathBuf,
    /// Supplementary groups (includes the primary group).
    pub groups: Vec<u32>,
}

/// Looks a user up in the system database (getpwnam + getgrouplist).
/// `Ok(None)` when there is no such user.
pub fn lookup(name: &str) -> std::io::Result<Option<Account>> {
    if name.is_empty() || name.contains(['\0', '/', ':', '\n']) {
        return Ok(None);
    }
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => return Ok(None),
        Err(e) => return Err(std::io::Error::from(e)),
    };
    let cname = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()]);
    let shell = if user.shell.as_os_str().is_empty() { PathBuf::from("/bin/sh") } else { user.shell };
    Ok(Some(Account { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir, shell, groups }))
}

/// Is `name` a login name tailgate will look up at all: `[a-z_][a-z0-9_.-]*`,
/// at most 32 characters (the portable useradd rule). Anything else (upper
/// case, shell metacharacters, `$`, non-ASCII) is refused before the policy
/// or NSS ever see it.
pub(crate) fn valid_login_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 32
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

/// The account tailgate itself runs as (for the unprivileged mode).
pub(crate) fn current_user_name() -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.name)
}

/// Variables the client may never set, whatever `accept_env` says: they
/// define who the session is (or how the dynamic loader behaves for it).
const RESERVED_ENV: &[&str] = &["USER", "LOGNAME", "HOME", "SHELL", "MAIL", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "TAILGATE_CALLER"];

/// Whether a client may set `name` at all: a sane name that is not one of
/// the variables defining the session. The policy's `accept_env` patterns
/// are applied on top (`SshDecision::allows_env`).
pub(crate) fn env_name_acceptable(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.contains(['=', '\0']) && !RESERVED_ENV.contains(&name) && !name.starts_with("LD_")
}

/// What the login environment is built from.
pub(crate) struct LoginEnv<'a> {
    pub account: &'a Account,
    pub caller: &'a Identity,
    pub target: &'a Identity,
    /// `TERM` from the pty request, if a pty was requested.
    pub term: Option<&'a str>,
    /// Path of the pty slave, if any.
    pub tty: Option<&'a str>,
    /// Client variables already filtered by [`env_name_acceptable`] and the policy.
    pub client: &'a [(String, String)],
}

/// The complete environment of a session process.
pub(crate) fn login_env(e: &LoginEnv<'_>) -> Vec<(String, String)> {
    let a = e.account;
    let path = if a.uid == 0 {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
    };
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| {
        env.retain(|(kk, _)| kk != k);
        env.push((k.to_string(), v));
    };
    set("PATH", path.to_string());
    // Client variables go before the identity ones so they can change e.g.
    // LANG or TZ but never who the session is.
    for (k, v) in e.client {
        set(k, v.clone());
    }
    set("USER", a.name.clone());
    set("LOGNAME", a.name.clone());
    set("HOME", a.home.to_string_lossy().into_owned());
    set("SHELL", a.shell.to_string_lossy().into_owned());
    set("MAIL", format!("/var/mail/{}", a.name));
    // Programs (and shells deciding whether to read rc files) look at these to
    // know they run under SSH. The ports are not meaningful on the tailnet's
    // userspace stack, so report the conventional ones.
    set("SSH_CLIENT", format!("{} 0 22", e.caller.ip));
    set("SSH_CONNECTION", format!("{} 0 {} 22", e.caller.ip, e.target.ip));
    set("TAILGATE_CALLER", format!("{}@{}", e.caller.who(), e.caller.node_name));
    if let Some(t) = e.term {
        set("TERM", if t.is_empty() { "dumb".into() } else { t.to_string() });
    }
    if let Some(t) = e.tty {
        set("SSH_TTY", t.to_string());
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn reserved_and_malformed_names_are_never_accepted() {
        for n in ["USER", "HOME", "LD_PRELOAD", "LD_LIBRARY_PATH", "SSH_CONNECTION", "TAILGATE_CALLER", "", "A=B"] {
            assert!(!env_name_acceptable(n), "{n}");
        }
        for n in ["LANG", "LC_ALL", "TERM", "GIT_AUTHOR_NAME"] {
            assert!(env_name_acceptable(n), "{n}");
        }
    }

    #[test]
    fn login_env_is_clean_and_identity_wins() {
        let acct =
            Account { name: "bob".into(), uid: 1001, gid: 1001, home: "/home/bob".into(), shell: "/bin/bash".into(), groups: vec![1001] };
        let id = Identity {
            node_key: "k".into(),
            node_name: "laptop".into(),
            user: Some("alice".into()),
            tags: vec![],
            ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            groups: Vec::new(),
        };
        let me = Identity { node_name: "web1".into(), ip: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 3)), ..id.clone() };
        let client = vec![("LANG".to_string(), "C.UTF-8".to_string()), ("PATH".to_string(), "/x".to_string())];
        let env = login_env(&LoginEnv { account: &acct, caller: &id, target: &me, term: Some("xterm"), tty: None, client: &client });
        let get = |k: &str| env.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        assert_eq!(get("USER"), Some("bob"));
        assert_eq!(get("HOME"), Some("/home/bob"));
        assert_eq!(get("LANG"), Some("C.UTF-8"));
        assert_eq!(get("PATH"), Some("/x"));
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("SSH_CONNECTION"), Some("100.64.0.2 0 100.64.0.3 22"));
        assert_eq!(get("TAILGATE_CALLER"), Some("alice@laptop"));
        assert_eq!(get("SSH_TTY"), None);
        // No duplicates.
        let mut keys: Vec<_> = env.iter().map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), env.len());
    }

    #[test]
    fn login_names() {
        for n in ["root", "_apt", "www-data", "a.b", "tg_x9", &"a".repeat(32)] {
            assert!(valid_login_name(n), "{n}");
        }
        for n in ["", "Root", "a;b", "-x", "9a", ".a", "a b", "a$", "é", "a/b", "a\n", &"a".repeat(33)] {
            assert!(!valid_login_name(n), "{n:?}");
        }
    }

    #[test]
    fn lookup_root_and_missing() {
        let root = lookup("root").unwrap().unwrap();
        assert_eq!(root.uid, 0);
        assert!(lookup("no-such-user-tailgate-xyz").unwrap().is_none());
        assert!(lookup("../etc").unwrap().is_none());
        assert!(lookup("").unwrap().is_none());
    }
}
