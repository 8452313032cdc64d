//! What a node may call itself and where it lives: hostname and user-name
//! rules, the checks on what a node reports about itself, and allocation
//! of tailnet addresses and unique node names.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Result, anyhow};

use super::{Hub, HubError};
use crate::control::wire::proto::{ErrorCode, canonical_ssh_host_key};
use crate::key::Key;

/// First address handed out is 100.64.0.1; the range is 100.64.0.0/10.
const IP_BASE: u32 = u32::from_be_bytes([100, 64, 0, 0]);
const IP_RANGE: u32 = 1 << 22;
const MAX_ENDPOINTS: usize = 32;
/// The raw hostname a node reports is only shown to admins, but it is
/// stored and printed, so it gets a bound and no control characters.
const MAX_HOSTNAME: usize = 255;

/// `web1.example.com` / `Web 1` → `web1` / `web-1`: the first label,
/// lowercase letters, digits and '-', at most 63 characters.
pub(crate) fn sanitize_hostname(h: &str) -> String {
    let first = h.trim().split('.').next().unwrap_or("");
    let mut s: String = first.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let mut s: String = s.chars().take(63).collect();
    while s.ends_with('-') {
        s.pop();
    }
    if s.is_empty() { "node".into() } else { s }
}

pub(super) fn valid_user_name(name: &str) -> Result<(), HubError> {
    if name.is_empty() || name.len() > 128 {
        return Err(HubError::invalid("a user name has 1 to 128 characters"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == '"') {
        return Err(HubError::invalid(format!("user name {name:?} must not contain spaces, commas, quotes or control characters")));
    }
    for p in ["tag:", "group:", "autogroup:"] {
        if name.starts_with(p) {
            return Err(HubError::invalid(format!("user name {name:?} must not start with {p:?} (that is a policy keyword)")));
        }
    }
    Ok(())
}

/// Validates what a node says about itself. The host key comes back in
/// canonical form (what peers will write to `known_hosts`); endpoints come
/// back without the ones no peer may be sent to (loopback, link-local,
/// metadata, multicast, ...), deduplicated.
pub(super) fn check_hostinfo(
    hostname: Option<&str>,
    ssh_host_key: Option<String>,
    endpoints: Vec<SocketAddr>,
) -> Result<(Option<String>, Vec<SocketAddr>), HubError> {
    if let Some(h) = hostname
        && (h.len() > MAX_HOSTNAME || h.chars().any(char::is_control))
    {
        return Err(HubError::new(
            ErrorCode::HostInfo,
            format!("hostname must be at most {MAX_HOSTNAME} bytes without control characters"),
        ));
    }
    let key = match ssh_host_key {
        Some(k) => Some(canonical_ssh_host_key(&k).map_err(|e| HubError::new(ErrorCode::HostInfo, e.to_string()))?),
        None => None,
    };
    Ok((key, clean_endpoints(endpoints)?))
}

pub(super) fn clean_endpoints(endpoints: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, HubError> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(HubError::new(ErrorCode::Protocol, format!("{} endpoints reported, at most {MAX_ENDPOINTS}", endpoints.len())));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        // `::ffff:a.b.c.d` and `a.b.c.d` are one endpoint: store the plain form.
        let e = crate::dataplane::dualstack::normalize(e);
        if crate::dataplane::endpoint::is_valid_endpoint(&e) && !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

pub(super) fn short_key(k: &Key) -> String {
    crate::key::ShortKey(*k).prefix()
}

impl Hub {
    pub(super) fn alloc_ip(&mut self) -> Result<Ipv4Addr> {
        for _ in 0..IP_RANGE {
            let off = self.next_ip % IP_RANGE;
            self.next_ip = (off + 1) % IP_RANGE;
            let ip = Ipv4Addr::from(IP_BASE + off);
            let last = ip.octets()[3];
            if off == 0 || last == 0 || last == 255 || self.ips.contains(&ip) {
                continue;
            }
            self.store.meta_set("next_ip", &self.next_ip.to_string())?;
            return Ok(ip);
        }
        Err(anyhow!("no free address left in 100.64.0.0/10"))
    }

    pub(super) fn alloc_name(&self, hostname: &str, for_node: Option<i64>) -> Result<String> {
        let base = sanitize_hostname(hostname);
        let free = |n: &str| self.names.get(n).is_none_or(|id| Some(*id) == for_node);
        if free(&base) {
            return Ok(base);
        }
        // There are fewer nodes than suffixes tried, so one is free; the
        // suffix may need room, so the base is cut to keep 63 characters.
        for i in 2..=self.names.len() as u64 + 2 {
            let suffix = format!("-{i}");
            let stem: String = base.chars().take(63 - suffix.len()).collect();
            let name = format!("{}{suffix}", stem.trim_end_matches('-'));
            if free(&name) {
                return Ok(name);
            }
        }
        Err(anyhow!("no free name for {base}"))
    }
}
