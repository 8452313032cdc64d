//! wg-quick configuration files, with tailgate's identity comments.
//!
//! We read the standard format so an existing WireGuard setup can be pointed
//! at tailgate unchanged. Identity rides in comments (`# tailgate-user = alice`)
//! so the same file stays valid for `wg-quick`. Keys that only make sense for
//! a kernel interface (DNS, MTU, PostUp, ...) are reported and ignored.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

use ipnet::IpNet;

use crate::dataplane::wg::{PeerConfig, key_from_base64};
use crate::key::{Key, PrivateKey};

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// A peer with the identity tailgate attaches to it.
#[derive(Clone, Debug)]
pub struct QuickPeer {
    pub config: PeerConfig,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug)]
pub struct QuickConfig {
    pub private_key: PrivateKey,
    pub addresses: Vec<IpNet>,
    pub listen_port: Option<u16>,
    /// Tags of this node itself (`# tailgate-tags` in `[Interface]`).
    pub tags: Vec<String>,
    pub name: Option<String>,
    pub peers: Vec<QuickPeer>,
    /// Lines that were understood but ignored, as `FILE:LINE: ...` notes.
    pub warnings: Vec<String>,
}

#[derive(PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Keys valid in wg-quick files that have no meaning for a userspace node.
const IGNORED_INTERFACE_KEYS: &[&str] = &["dns", "mtu", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"];

pub fn load(path: &Path) -> Result<QuickConfig, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        message: format!("cannot read the file: {e}"),
    })?;
    parse(&src, &file)
}

pub fn parse(src: &str, file: &str) -> Result<QuickConfig, ConfigError> {
    let err = |line: usize, message: String| ConfigError { file: file.to_string(), line, message };
    let mut section = Section::None;
    let mut private_key = None;
    let mut addresses = Vec::new();
    let mut listen_port = None;
    let mut tags = Vec::new();
    let mut name = None;
    let mut peers: Vec<(usize, PartialPeer)> = Vec::new();
    let mut warnings = Vec::new();
    let mut saw_interface = false;

    for (i, raw) in src.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            // Only our own directives are meaningful; other comments are free text.
            let Some((k, v)) = comment.trim().split_once('=') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if !k.starts_with("tailgate-") {
                continue;
            }
            match (k.as_str(), &section) {
                ("tailgate-user", Section::Peer) => {
                    let p = &mut peers.last_mut().expect("in a peer section").1;
                    if v.is_empty() || v.contains(char::is_whitespace) {
                        return Err(err(line_no, format!("tailgate-user {v:?} must be one user name without spaces")));
                    }
                    p.user = Some(v.to_string());
                }
                ("tailgate-tags", Section::Peer | Section::Interface) => {
                    let list = parse_tags(v).map_err(|m| err(line_no, m))?;
                    match section {
                        Section::Peer => peers.last_mut().expect("in a peer section").1.tags = list,
                        _ => tags = list,
                    }
                }
                ("tailgate-name", Section::Peer | Section::Interface) => {
                    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                        return Err(err(line_no, format!("tailgate-name {v:?} must be a host name (letters, digits, '-', '.')")));
                    }
                    match section {
                        Section::Peer => peers.last_mut().expect("in a peer section").1.name = Some(v.to_string()),
                        _ => name = Some(v.to_string()),
                    }
                }
                ("tailgate-user", _) => {
                    return Err(err(
                        line_no,
                        "tailgate-user belongs in a [Peer] section (the node itself has no user in static mode)".into(),
                    ));
                }
                _ => {
                    return Err(err(line_no, format!("unknown directive {k:?}; known: tailgate-user, tailgate-tags, tailgate-name")));
                }
            }
            continue;
        }
        if line.starts_with('[') {
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" => {
                    if saw_interface {
                        return Err(err(line_no, "a second [Interface] section; a config has exactly one".into()));
                    }
                    saw_interface = true;
                    Section::Interface
                }
                "[peer]" => {
                    peers.push((line_no, PartialPeer::default()));
                    Section::Peer
                }
                _ => return Err(err(line_no, format!("unknown section {line}; expected [Interface] or [Peer]"))),
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(line_no, format!("expected `Key = Value`, found {line:?}")));
        };
        let key_lc = key.trim().to_ascii_lowercase();
        // Inline comments are not part of the wg-quick format, but values never contain '#'.
        let value = value.split('#').next().unwrap_or("").trim();
        match section {
            Section::None => {
                return Err(err(line_no, "setting outside a section; start the file with [Interface]".into()));
            }
            Section::Interface => match key_lc.as_str() {
                "privatekey" => {
                    private_key = Some(
                        PrivateKey::from_base64(value)
                            .map_err(|e| err(line_no, format!("PrivateKey: {e}; generate one with `tailgate genkey` or `wg genkey`")))?,
                    )
                }
                "address" => {
                    for a in split_list(value) {
                        addresses.push(parse_cidr(a).map_err(|m| err(line_no, format!("Address {m}")))?);
                    }
                }
                "listenport" => {
                    listen_port = Some(
                        value.parse::<u16>().map_err(|_| err(line_no, format!("ListenPort {value:?} is not a port number (0-65535)")))?,
                    )
                }
                k if IGNORED_INTERFACE_KEYS.contains(&k) => {
                    warnings.push(format!("{file}:{line_no}: {} is ignored: tailgate has no kernel interface", key.trim()));
                }
                _ => return Err(err(line_no, format!("unknown [Interface] key {:?}", key.trim()))),
            },
            Section::Peer => {
                let p = &mut peers.last_mut().expect("in a peer section").1;
                match key_lc.as_str() {
                    "publickey" => p.public_key = Some(key_from_base64(value).map_err(|e| err(line_no, format!("PublicKey: {e}")))?),
                    "presharedkey" => {
                        p.preshared_key = Some(
                            crate::key::PresharedKey::from_base64(value)
                                .map_err(|e| err(line_no, format!("PresharedKey: {e}; generate one with `wg genpsk`")))?,
                        )
                    }
                    "allowedips" => {
                        for a in split_list(value) {
                            p.allowed_ips.push(parse_cidr(a).map_err(|m| err(line_no, format!("AllowedIPs {m}")))?);
                        }
                    }
                    "endpoint" => p.endpoint = Some(resolve_endpoint(value).map_err(|m| err(line_no, m))?),
                    "persistentkeepalive" => {
                        p.keepalive = if value.eq_ignore_ascii_case("off") {
                            None
                        } else {
                            Some(
                                value
                                    .parse::<u16>()
                                    .map_err(|_| err(line_no, format!("PersistentKeepalive {value:?} must be seconds (1-65535) or off")))?,
                            )
                        }
                        .filter(|s| *s > 0)
                    }
                    _ => return Err(err(line_no, format!("unknown [Peer] key {:?}", key.trim()))),
                }
            }
        }
    }

    if !saw_interface {
        return Err(err(1, "no [Interface] section; a config needs one with PrivateKey and Address".into()));
    }
    let private_key =
        private_key.ok_or_else(|| err(1, "[Interface] has no PrivateKey; add `PrivateKey = <output of wg genkey>`".into()))?;
    if addresses.is_empty() {
        return Err(err(1, "[Interface] has no Address; add e.g. `Address = 100.64.0.1/32`".into()));
    }
    let mut out = Vec::new();
    for (line, p) in peers {
        let public_key = p.public_key.ok_or_else(|| err(line, "[Peer] has no PublicKey".into()))?;
        if p.allowed_ips.is_empty() {
            warnings.push(format!("{file}:{line}: this [Peer] has no AllowedIPs, so no traffic can reach or leave it"));
        }
        out.push(QuickPeer {
            config: PeerConfig {
                public_key,
                preshared_key: p.preshared_key,
                allowed_ips: p.allowed_ips,
                endpoint: p.endpoint,
                persistent_keepalive: p.keepalive,
            },
            user: p.user,
            tags: p.tags,
            name: p.name,
        });
    }
    Ok(QuickConfig { private_key, addresses, listen_port, tags, name, peers: out, warnings })
}

#[derive(Default)]
struct PartialPeer {
    public_key: Option<Key>,
    preshared_key: Option<crate::key::PresharedKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    user: Option<String>,
    tags: Vec<String>,
    name: Option<String>,
}

fn split_list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    // A bare address means a single host, as wg-quick accepts.
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("{s:?} is not an address or CIDR (e.g. 100.64.0.2/32)"))
}

fn parse_tags(v: &str) -> Result<Vec<String>, String> {
    split_list(v)
        .map(|t| {
            let ok = t
                .strip_prefix("tag:")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            if ok { Ok(t.to_string()) } else { Err(format!("tag {t:?} must look like tag:name (letters, digits, '-', '_')")) }
        })
        .collect()
}

/// `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT` (as wg-quick writes them).
fn resolve_endpoint(v: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(crate::dataplane::dualstack::normalize(a));
    }
    if v.parse::<std::net::Ipv6Addr>().is_ok() || (v.starts_with('[') && v.ends_with(']')) {
        let ip = v.trim_start_matches('[').trim_end_matches(']');
        return Err(format!("Endpoint {v:?} needs a port, e.g. [{ip}]:51820"));
    }
    if !v.contains(':') {
        return Err(format!("Endpoint {v:?} needs a port, e.g. {v}:51820"));
    }
    v.to_socket_addrs()
        .map_err(|e| format!("Endpoint {v:?} cannot be resolved: {e}"))?
        .next()
        .map(crate::dataplane::dualstack::normalize)
        .ok_or_else(|| format!("Endpoint {v:?} resolves to no address"))
}

/// Create a state directory readable by the owner only (or tighten an existing one).
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Write `contents` to `path` readable by the owner only.
pub fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn parses_full_config_with_identity_comments() {
        let src = format!(
            "[Interface]\n# tailgate-tags = tag:prod\nPrivateKey = {KEY}\nAddress = 100.64.0.1/32, fd7a::1/128\nListenPort = 51820\nDNS = 1.1.1.1\n\n\
             [Peer]\n# tailgate-user = alice\n# tailgate-tags = tag:ops, tag:ci\nPublicKey = {PUB}\nPresharedKey = {KEY}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 127.0.0.1:51821\nPersistentKeepalive = 25\n"
        );
        let c = parse(&src, "wg0.conf").unwrap();
        assert_eq!(c.tags, vec!["tag:prod"]);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].starts_with("wg0.conf:6: DNS"));
        let p = &c.peers[0];
        assert_eq!(p.user.as_deref(), Some("alice"));
        assert_eq!(p.tags, vec!["tag:ops", "tag:ci"]);
        assert_eq!(p.config.persistent_keepalive, Some(25));
        assert!(p.config.preshared_key.is_some());
    }

    #[test]
    fn ipv6_endpoints_as_wg_quick_writes_them() {
        let conf = |ep: &str| {
            parse(
                &format!(
                    "[Interface]\nPrivateKey = {KEY}\nAddress = 100.64.0.1/32\n[Peer]\nPublicKey = {PUB}\nAllowedIPs = 100.64.0.2/32\nEndpoint = {ep}\n"
                ),
                "v6.conf",
            )
        };
        let ep = |s: &str| conf(s).unwrap().peers[0].config.endpoint.unwrap().to_string();
        assert_eq!(ep("[2001:db8::1]:51820"), "[2001:db8::1]:51820");
        assert_eq!(ep("[fd00::2]:1"), "[fd00::2]:1");
        // The mapped form is the IPv4 peer it names (one endpoint, one roaming key).
        assert_eq!(ep("[::ffff:192.0.2.7]:51820"), "192.0.2.7:51820");
        for bad in ["2001:db8::1", "[2001:db8::1]"] {
            let e = conf(bad).unwrap_err();
            assert_eq!(e.line, 7, "{e}");
            assert!(e.message.contains("[2001:db8::1]:51820"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("[Interface]\nPrivateKey = abc!\n".to_string(), 2, "not valid base64"),
            ("[Interface]\nPrivateKey = AAAA\n".to_string(), 2, "32 bytes"),
            (format!("[Peer]\nPublicKey = {PUB}\n"), 1, "no [Interface]"),
            (format!("[Interface]\nPrivateKey = {KEY}\nAddress = 100.64.0.300/32\n"), 3, "not an address"),
            (format!("[Interface]\nPrivateKey = {KEY}\nAddress = 100.64.0.1/40\n"), 3, "not an address"),
            (format!("[Interface]\nPrivateKey = {KEY}\n"), 1, "no Address"),
            (format!("[Interface]\nPrivateKey = {KEY}\nAddress = 100.64.0.1\n[Peer]\nAllowedIPs = 1.2.3.4/32\n"), 4, "no PublicKey"),
            (format!("[Interface]\nPrivateKey = {KEY}\nAddress = 100.64.0.1\n[Peer]\n# tailgate-tags = prod\n"), 5, "tag:name"),
            ("[Interface]\nBogus = 1\n".to_string(), 2, "unknown [Interface] key"),
            (format!("[Interface]\nPrivateKey = {KEY}\nListenPort = 99999\n"), 3, "not a port"),
        ];
        for (src, line, needle) in cases {
            let e = parse(&src, "f.conf").unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.to_string().starts_with(&format!("f.conf:{line}: ")), "{e}");
            assert!(e.message.contains(needle), "{e} should mention {needle}");
        }
    }
}
