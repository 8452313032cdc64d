//! Names on the tailnet: which node is `web1`, what its addresses and SSH host
//! key are. Fed by the static config or the netmap; read by `nc`, `ssh`,
//! `ssh-config` and `status`.
#![warn(missing_docs)]

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::daemon::identity::Identity;

/// One node as `tailgate status`, `tailgate ssh` and known_hosts see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Node name (`web1`).
    pub name: String,
    /// Its tailnet addresses.
    pub ips: Vec<IpAddr>,
    /// WireGuard public key, base64.
    pub node_key: String,
    /// Owner, for a person's node.
    pub user: Option<String>,
    /// Tags, for a tagged node.
    pub tags: Vec<String>,
    /// `ssh-ed25519 AAAA...` when known (the netmap carries it).
    pub ssh_host_key: Option<String>,
    /// Connected to the control server, as the netmap says; `None` when
    /// nobody knows (static mode, where only handshakes tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
}

impl Entry {
    /// The entry for a node whose identity is known; `ips` are all its addresses.
    pub(crate) fn from_identity(id: Identity, ips: Vec<IpAddr>, ssh_host_key: Option<String>) -> Entry {
        Entry { name: id.node_name, ips, node_key: id.node_key, user: id.user, tags: id.tags, ssh_host_key, online: None }
    }
}

/// A tailnet domain (`tailnet.internal`): dot-separated labels of the node
/// name alphabet. It is appended to names in `known_hosts` and ssh_config,
/// so it must not carry spaces, commas, wildcards or line breaks.
pub(crate) fn check_domain(d: &str) -> Result<(), BadDomain> {
    if d.len() <= 253 && d.split('.').all(|l| crate::control::wire::proto::check_node_name(l).is_ok()) {
        Ok(())
    } else {
        Err(BadDomain(d.chars().take(80).collect()))
    }
}

/// A tailnet domain that [`check_domain`] refuses (its first 80 characters).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0:?} is not a domain (lowercase letters, digits, '-' and '.')")]
pub(crate) struct BadDomain(String);

// The admin command's flag parser speaks `Result<_, String>` (clap value parsers).
impl From<BadDomain> for String {
    fn from(e: BadDomain) -> String {
        e.to_string()
    }
}

/// Every node this one can name: itself and its peers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Directory {
    /// The tailnet domain; `web1.<domain>` resolves like `web1`.
    pub domain: Option<String>,
    /// This node.
    pub me: Option<Entry>,
    /// The nodes it can reach.
    pub peers: Vec<Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum ResolveError {
    #[error("unknown host {host:?}{}", suggestions(.close))]
    Unknown { host: String, close: Vec<String> },
}

fn suggestions(close: &[String]) -> String {
    if close.is_empty() {
        "; `tailgate status` lists the nodes you can reach".into()
    } else {
        format!("; did you mean {}?", close.join(", "))
    }
}

/// Edits (insertions, deletions, substitutions, swaps of neighbours) that
/// still make a typed name a likely typo of `name`: one for short names,
/// where two edits reach nearly any other short name; two from six letters.
fn max_typos(name: &str) -> usize {
    if name.chars().count() >= 6 { 2 } else { 1 }
}

impl Directory {
    fn all(&self) -> impl Iterator<Item = &Entry> {
        self.me.iter().chain(self.peers.iter())
    }

    /// Find a node by name, fully qualified name, or tailnet IP.
    pub(crate) fn lookup(&self, host: &str) -> Result<&Entry, ResolveError> {
        let want = host.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = want.parse::<IpAddr>()
            && let Some(e) = self.all().find(|e| e.ips.contains(&ip))
        {
            return Ok(e);
        }
        let short = match &self.domain {
            Some(d) => want.strip_suffix(&format!(".{}", d.to_ascii_lowercase())).unwrap_or(&want).to_string(),
            None => want.clone(),
        };
        if let Some(e) = self.all().find(|e| e.name.eq_ignore_ascii_case(&short)) {
            return Ok(e);
        }
        let mut close: Vec<(usize, String)> = self
            .all()
            .map(|e| (strsim::damerau_levenshtein(&short, &e.name.to_ascii_lowercase()), e.name.clone()))
            .filter(|(d, name)| *d <= max_typos(name))
            .collect();
        close.sort();
        Err(ResolveError::Unknown { host: host.to_string(), close: close.into_iter().take(3).map(|(_, n)| n).collect() })
    }

    /// The address to dial for `host`: an IP literal passes through even when
    /// it names no known node (the data plane will say if nothing routes it).
    pub(crate) fn resolve(&self, host: &str) -> Result<IpAddr, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ip);
        }
        let e = self.lookup(host)?;
        Ok(e.ips[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, ip: &str) -> Entry {
        Entry {
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            node_key: String::new(),
            user: None,
            tags: vec![],
            ssh_host_key: None,
            online: None,
        }
    }

    #[test]
    fn names_fqdns_ips_and_close_matches() {
        let d = Directory {
            domain: Some("tail.example".into()),
            me: Some(entry("laptop", "100.64.0.1")),
            peers: vec![entry("web1", "100.64.0.2"), entry("web2", "100.64.0.3"), entry("db", "100.64.0.4")],
        };
        assert_eq!(d.resolve("web1").unwrap().to_string(), "100.64.0.2");
        assert_eq!(d.resolve("WEB2.tail.example").unwrap().to_string(), "100.64.0.3");
        assert_eq!(d.resolve("web1.tail.example.").unwrap().to_string(), "100.64.0.2");
        assert_eq!(d.resolve("100.64.0.9").unwrap().to_string(), "100.64.0.9");
        assert_eq!(d.lookup("100.64.0.4").unwrap().name, "db");
        let e = d.resolve("web3").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("did you mean") && msg.contains("web1") && msg.contains("web2"), "{msg}");
        assert!(!msg.contains("laptop"), "{msg}");
        assert!(d.resolve("zzzzzz").unwrap_err().to_string().contains("tailgate status"));
    }

    #[test]
    fn typos_and_transpositions_suggest_the_name() {
        let d = Directory {
            domain: Some("tail.example".into()),
            me: Some(entry("laptop", "100.64.0.1")),
            peers: vec![entry("vps", "100.64.0.2"), entry("db", "100.64.0.3"), entry("postgres", "100.64.0.4")],
        };
        let suggests = |typed: &str, want: &str| {
            let msg = d.lookup(typed).unwrap_err().to_string();
            assert!(msg.ends_with(&format!("did you mean {want}?")), "{typed}: {msg}");
        };
        suggests("vsp", "vps"); // swapped neighbours
        suggests("vpz", "vps"); // one wrong letter
        suggests("vs", "vps"); // one missing
        suggests("vpss", "vps"); // one extra
        suggests("db1", "db");
        suggests("postgers", "postgres");
        suggests("potsgers", "postgres"); // two edits in a long name
        suggests("laptpo", "laptop");
        // Too far: no suggestion rather than a wrong one.
        for typed in ["spv", "web", "xyz", "pgsql"] {
            let msg = d.lookup(typed).unwrap_err().to_string();
            assert!(msg.contains("tailgate status"), "{typed}: {msg}");
        }
    }
}
