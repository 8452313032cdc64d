//! wg-quick configuration files, with tailgate's identity comments.
//!
//! We read the standard format so an existing WireGuard setup can be pointed
//! at tailgate unchanged. Identity rides in comments (`# tailgate-user = alice`)
//! so the same file stays valid for `wg-quick`. Keys that only make sense for
//! a kernel interface (DNS, MTU, PostUp, ...) are reported and ignored.
#![warn(missing_docs)]

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;

use ipnet::IpNet;

use crate::dataplane::wg::{PeerConfig, key_from_base64};
use crate::key::{Key, PrivateKey};

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub(crate) struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// A peer with the identity tailgate attaches to it.
#[derive(Clone, Debug)]
pub(crate) struct QuickPeer {
    pub config: PeerConfig,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct QuickConfig {
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

pub(crate) fn load(path: &Path) -> Result<QuickConfig, ConfigError> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        message: format!("cannot read the file: {e}"),
    })?;
    parse(&src, &file)
}

pub(crate) fn parse(src: &str, file: &str) -> Result<QuickConfig, ConfigError> {
    let mut p = Parser { file, section: Section::None, saw_interface: false, iface: Interface::default(), peers: Vec::new() };
    for (i, raw) in src.lines().enumerate() {
        let line = raw.trim();
        if !line.is_empty() {
            p.line(i + 1, line)?;
        }
    }
    p.finish()
}

/// The `[Interface]` settings read so far.
#[derive(Default)]
struct Interface {
    private_key: Option<PrivateKey>,
    addresses: Vec<IpNet>,
    listen_port: Option<u16>,
    tags: Vec<String>,
    name: Option<String>,
    warnings: Vec<String>,
}

/// The state of one pass over a file, line by line.
struct Parser<'a> {
    file: &'a str,
    section: Section,
    saw_interface: bool,
    iface: Interface,
    /// Each `[Peer]` with the line it starts on.
    peers: Vec<(usize, PartialPeer)>,
}

impl Parser<'_> {
    fn err(&self, line: usize, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_string(), line, message: message.into() }
    }

    /// The `[Peer]` being read; only called while `section` is `Peer`, which
    /// pushed it.
    fn peer(&mut self) -> &mut PartialPeer {
        &mut self.peers.last_mut().expect("in a peer section").1
    }

    fn line(&mut self, line_no: usize, line: &str) -> Result<(), ConfigError> {
        if let Some(comment) = line.strip_prefix('#') {
            return self.directive(line_no, comment);
        }
        if line.starts_with('[') {
            return self.section_header(line_no, line);
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(self.err(line_no, format!("expected `Key = Value`, found {line:?}")));
        };
        // Inline comments are not part of the wg-quick format, but values never contain '#'.
        let value = value.split('#').next().unwrap_or("").trim();
        match self.section {
            Section::None => Err(self.err(line_no, "setting outside a section; start the file with [Interface]")),
            Section::Interface => self.interface_key(line_no, key.trim(), value),
            Section::Peer => self.peer_key(line_no, key.trim(), value),
        }
    }

    /// `# tailgate-KEY = VALUE`; other comments are free text.
    fn directive(&mut self, line_no: usize, comment: &str) -> Result<(), ConfigError> {
        let Some((k, v)) = comment.trim().split_once('=') else { return Ok(()) };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if !k.starts_with("tailgate-") {
            return Ok(());
        }
        match (k.as_str(), &self.section) {
            ("tailgate-user", Section::Peer) => {
                if v.is_empty() || v.contains(char::is_whitespace) {
                    return Err(self.err(line_no, format!("tailgate-user {v:?} must be one user name without spaces")));
                }
                self.peer().user = Some(v.to_string());
            }
            ("tailgate-tags", Section::Peer | Section::Interface) => {
                let list = parse_tags(v).map_err(|m| self.err(line_no, m.to_string()))?;
                match self.section {
                    Section::Peer => self.peer().tags = list,
                    _ => self.iface.tags = list,
                }
            }
            ("tailgate-name", Section::Peer | Section::Interface) => {
                if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                    return Err(self.err(line_no, format!("tailgate-name {v:?} must be a host name (letters, digits, '-', '.')")));
                }
                match self.section {
                    Section::Peer => self.peer().name = Some(v.to_string()),
                    _ => self.iface.name = Some(v.to_string()),
                }
            }
            ("tailgate-user", _) => {
                return Err(self.err(line_no, "tailgate-user belongs in a [Peer] section (the node itself has no user in static mode)"));
            }
            _ => {
                return Err(self.err(line_no, format!("unknown directive {k:?}; known: tailgate-user, tailgate-tags, tailgate-name")));
            }
        }
        Ok(())
    }

    fn section_header(&mut self, line_no: usize, line: &str) -> Result<(), ConfigError> {
        self.section = match line.to_ascii_lowercase().as_str() {
            "[interface]" => {
                if self.saw_interface {
                    return Err(self.err(line_no, "a second [Interface] section; a config has exactly one"));
                }
                self.saw_interface = true;
                Section::Interface
            }
            "[peer]" => {
                self.peers.push((line_no, PartialPeer::default()));
                Section::Peer
            }
            _ => return Err(self.err(line_no, format!("unknown section {line}; expected [Interface] or [Peer]"))),
        };
        Ok(())
    }

    fn interface_key(&mut self, line_no: usize, key: &str, value: &str) -> Result<(), ConfigError> {
        match key.to_ascii_lowercase().as_str() {
            "privatekey" => {
                let k = PrivateKey::from_base64(value)
                    .map_err(|e| self.err(line_no, format!("PrivateKey: {e}; generate one with `tailgate genkey` or `wg genkey`")))?;
                self.iface.private_key = Some(k);
            }
            "address" => {
                for a in split_list(value) {
                    let net = parse_cidr(a).map_err(|m| self.err(line_no, format!("Address {m}")))?;
                    self.iface.addresses.push(net);
                }
            }
            "listenport" => {
                let port =
                    value.parse::<u16>().map_err(|_| self.err(line_no, format!("ListenPort {value:?} is not a port number (0-65535)")))?;
                self.iface.listen_port = Some(port);
            }
            k if IGNORED_INTERFACE_KEYS.contains(&k) => {
                let note = format!("{}:{line_no}: {key} is ignored: tailgate has no kernel interface", self.file);
                self.iface.warnings.push(note);
            }
            _ => return Err(self.err(line_no, format!("unknown [Interface] key {key:?}"))),
        }
        Ok(())
    }

    fn peer_key(&mut self, line_no: usize, key: &str, value: &str) -> Result<(), ConfigError> {
        match key.to_ascii_lowercase().as_str() {
            "publickey" => {
                let k = key_from_base64(value).map_err(|e| self.err(line_no, format!("PublicKey: {e}")))?;
                self.peer().public_key = Some(k);
            }
            "presharedkey" => {
                let k = crate::key::PresharedKey::from_base64(value)
                    .map_err(|e| self.err(line_no, format!("PresharedKey: {e}; generate one with `wg genpsk`")))?;
                self.peer().preshared_key = Some(k);
            }
            "allowedips" => {
                for a in split_list(value) {
                    let net = parse_cidr(a).map_err(|m| self.err(line_no, format!("AllowedIPs {m}")))?;
                    self.peer().allowed_ips.push(net);
                }
            }
            "endpoint" => {
                let addr = resolve_endpoint(value).map_err(|m| self.err(line_no, m.to_string()))?;
                self.peer().endpoint = Some(addr);
            }
            "persistentkeepalive" => {
                let secs = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    let s = value
                        .parse::<u16>()
                        .map_err(|_| self.err(line_no, format!("PersistentKeepalive {value:?} must be seconds (1-65535) or off")))?;
                    Some(s)
                };
                self.peer().keepalive = secs.filter(|s| *s > 0);
            }
            _ => return Err(self.err(line_no, format!("unknown [Peer] key {key:?}"))),
        }
        Ok(())
    }

    /// Checks what must be there and builds the config.
    fn finish(mut self) -> Result<QuickConfig, ConfigError> {
        if !self.saw_interface {
            return Err(self.err(1, "no [Interface] section; a config needs one with PrivateKey and Address"));
        }
        let Some(private_key) = self.iface.private_key.take() else {
            return Err(self.err(1, "[Interface] has no PrivateKey; add `PrivateKey = <output of wg genkey>`"));
        };
        if self.iface.addresses.is_empty() {
            return Err(self.err(1, "[Interface] has no Address; add e.g. `Address = 100.64.0.1/32`"));
        }
        let (file, mut warnings) = (self.file, self.iface.warnings);
        let mut out = Vec::new();
        for (line, p) in self.peers {
            let public_key =
                p.public_key.ok_or_else(|| ConfigError { file: file.into(), line, message: "[Peer] has no PublicKey".into() })?;
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
        let Interface { addresses, listen_port, tags, name, .. } = self.iface;
        Ok(QuickConfig { private_key, addresses, listen_port, tags, name, peers: out, warnings })
    }
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

/// A value in a wg-quick file that does not parse; `ConfigError` adds the place.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ValueError {
    #[error("{0:?} is not an address or CIDR (e.g. 100.64.0.2/32)")]
    NotCidr(String),
    #[error("tag {0:?} must look like tag:name (letters, digits, '-', '_')")]
    BadTag(String),
    #[error("Endpoint {given:?} needs a port, e.g. {example}")]
    EndpointNoPort { given: String, example: String },
    #[error("Endpoint {given:?} cannot be resolved: {source}")]
    EndpointUnresolvable { given: String, source: std::io::Error },
    #[error("Endpoint {0:?} resolves to no address")]
    EndpointNoAddress(String),
}

fn parse_cidr(s: &str) -> Result<IpNet, ValueError> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    // A bare address means a single host, as wg-quick accepts.
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(ValueError::NotCidr(s.into()))
}

fn parse_tags(v: &str) -> Result<Vec<String>, ValueError> {
    split_list(v)
        .map(|t| {
            let ok = t
                .strip_prefix("tag:")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            if ok { Ok(t.to_string()) } else { Err(ValueError::BadTag(t.into())) }
        })
        .collect()
}

/// `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT` (as wg-quick writes them).
fn resolve_endpoint(v: &str) -> Result<SocketAddr, ValueError> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(crate::dataplane::dualstack::normalize(a));
    }
    if v.parse::<std::net::Ipv6Addr>().is_ok() || (v.starts_with('[') && v.ends_with(']')) {
        let ip = v.trim_start_matches('[').trim_end_matches(']');
        return Err(ValueError::EndpointNoPort { given: v.into(), example: format!("[{ip}]:51820") });
    }
    if !v.contains(':') {
        return Err(ValueError::EndpointNoPort { given: v.into(), example: format!("{v}:51820") });
    }
    v.to_socket_addrs()
        .map_err(|source| ValueError::EndpointUnresolvable { given: v.into(), source })?
        .next()
        .map(crate::dataplane::dualstack::normalize)
        .ok_or_else(|| ValueError::EndpointNoAddress(v.into()))
}

/// Create a state directory readable by the owner only (or tighten an existing one).
pub(crate) fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Write `contents` to `path` readable by the owner only.
pub(crate) fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
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
