//! Prometheus metrics: the node's (`tailgate up --metrics-listen`) and the
//! small HTTP server both the node and control use to expose them.
//!
//! Nothing here counts traffic on its own: a scrape reads the counters the
//! data plane already keeps (the ones `tailgate status --json` shows) and
//! renders them with `prometheus-client`. The only counters kept here are
//! the SSH server's, fed from the audit events, which every login decision
//! and session already produces.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ssh::audit::{AuditEvent, EventKind};

/// Labels of one sample: `[("peer", "web1")]`.
pub(crate) type Labels = Vec<(String, String)>;

/// Distinct denial reasons kept apart; more are counted as `other`, so a
/// stream of odd requests cannot grow the label set without bound.
const MAX_REASONS: usize = 32;

#[derive(Default)]
struct SshCounters {
    sessions_open: AtomicI64,
    sessions_total: AtomicU64,
    denials: Mutex<BTreeMap<String, u64>>,
}

static SSH: std::sync::LazyLock<SshCounters> = std::sync::LazyLock::new(SshCounters::default);

/// Feeds the SSH counters from an audit event (called by the audit log).
pub(crate) fn ssh_event(ev: &AuditEvent) {
    match ev.event {
        EventKind::SessionStart => {
            SSH.sessions_total.fetch_add(1, Ordering::Relaxed);
            SSH.sessions_open.fetch_add(1, Ordering::Relaxed);
        }
        EventKind::SessionEnd => {
            SSH.sessions_open.fetch_sub(1, Ordering::Relaxed);
        }
        EventKind::Auth | EventKind::SessionDenied | EventKind::Forward if ev.allowed == Some(false) => {
            let reason = denial_reason(ev);
            let mut d = SSH.denials.lock().unwrap_or_else(|e| e.into_inner());
            let key = if d.contains_key(&reason) || d.len() < MAX_REASONS { reason } else { "other".into() };
            *d.entry(key).or_insert(0) += 1;
        }
        _ => {}
    }
}

/// A short label for why a request was refused: the policy's action when
/// it decided, else the first words of the local reason (no user input).
fn denial_reason(ev: &AuditEvent) -> String {
    let kind = match ev.event {
        EventKind::Auth => "login",
        EventKind::Forward => "forward",
        _ => "session",
    };
    let why = match (&ev.action, &ev.reason) {
        // Cut before the first quote or colon: names and values come after.
        (_, Some(r)) => {
            let r = r.trim_start_matches("access denied: ");
            r.split([':', '(', '"', '\'']).next().unwrap_or("").trim().chars().take(48).collect::<String>()
        }
        (Some(a), None) => format!("{a:?}").to_lowercase(),
        (None, None) => "denied".into(),
    };
    format!("{kind}: {why}")
}

pub(crate) fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

pub(crate) fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    reg.register(name, help, g);
}

pub(crate) fn counter_family(reg: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, u64)>) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, f);
}

pub(crate) fn gauge_family(reg: &mut Registry, name: &str, help: &str, rows: impl IntoIterator<Item = (Labels, i64)>) {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in rows {
        f.get_or_create(&l).set(v);
    }
    reg.register(name, help, f);
}

/// The registry in the Prometheus text format (0.0.4). prometheus-client
/// writes OpenMetrics, where a counter family `x` has samples `x_total`;
/// the classic format (what `promtool check metrics` and older scrapers
/// read) names the family `x_total` too, and has no `# EOF`.
pub(crate) fn encode(reg: &Registry) -> String {
    let mut om = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut om, reg);
    let counters: std::collections::HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn peer_label(p: &crate::dataplane::node::PeerStatus, names: &BTreeMap<String, String>) -> Labels {
    let name = names.get(&p.public_key).cloned().unwrap_or_else(|| p.public_key.chars().take(8).collect());
    vec![("peer".into(), name)]
}

/// The node's metrics. `names`: node key (base64) -> peer name.
pub(crate) fn render_node(st: &crate::dataplane::node::NodeStatus, names: &BTreeMap<String, String>) -> String {
    let mut reg = Registry::with_prefix("tailgate_node");
    let peers = &st.peers;
    counter_family(
        &mut reg,
        "handshakes",
        "WireGuard handshakes completed, per peer",
        peers.iter().map(|p| (peer_label(p, names), p.stats.handshakes)),
    );
    counter_family(
        &mut reg,
        "received_bytes",
        "Bytes received from each peer (decrypted)",
        peers.iter().map(|p| (peer_label(p, names), p.stats.rx_bytes)),
    );
    counter_family(
        &mut reg,
        "sent_bytes",
        "Bytes sent to each peer (before encryption)",
        peers.iter().map(|p| (peer_label(p, names), p.stats.tx_bytes)),
    );
    gauge_family(
        &mut reg,
        "last_handshake_seconds",
        "Seconds since the last handshake with each peer (absent: none yet)",
        peers.iter().filter_map(|p| p.last_handshake_secs_ago.map(|s| (peer_label(p, names), s as i64))),
    );
    gauge_family(
        &mut reg,
        "peer_path",
        "1 for the path each peer currently uses (direct, relay or none)",
        peers.iter().map(|p| {
            let kind = match (&p.path, p.endpoint) {
                (Some(x), _) if x.starts_with("relay") => "relay",
                (Some(x), _) if x.starts_with("direct") => "direct",
                (None, Some(_)) => "direct",
                _ => "none",
            };
            let mut l = peer_label(p, names);
            l.push(("path".into(), kind.into()));
            (l, 1)
        }),
    );
    counter_family(
        &mut reg,
        "inbound_refused",
        "New connections (SYNs, pings) from each peer refused by the inbound filter",
        peers.iter().map(|p| (peer_label(p, names), p.refused_inbound)),
    );
    counter_family(
        &mut reg,
        "spoofed_dropped",
        "Packets dropped for an inner source outside the peer's addresses",
        peers.iter().map(|p| (peer_label(p, names), p.stats.spoofed)),
    );
    counter(&mut reg, "invalid_datagrams", "Datagrams that failed to parse or authenticate", st.stats.invalid);
    gauge(&mut reg, "peers", "Peers configured", peers.len() as i64);
    gauge(&mut reg, "tcp_sockets", "Tailnet TCP sockets in the userspace stack", st.tcp_sockets as i64);
    let r = st.tcp_retransmits;
    counter(&mut reg, "tcp_retransmit_timeouts", "Retransmission timer expiries in the userspace TCP stack", r.timeouts);
    counter(&mut reg, "tcp_loss_recoveries", "Loss episodes repaired by SACK or fast retransmit", r.recoveries);
    counter(&mut reg, "tcp_retransmitted_segments", "Segments resent by SACK or fast retransmit", r.retransmitted_segments);
    gauge(
        &mut reg,
        "ssh_sessions_open",
        "SSH sessions (shell, exec, subsystem) running now",
        SSH.sessions_open.load(Ordering::Relaxed).max(0),
    );
    counter(&mut reg, "ssh_sessions", "SSH sessions started", SSH.sessions_total.load(Ordering::Relaxed));
    let denials: Vec<(Labels, u64)> =
        SSH.denials.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(r, n)| (vec![("reason".to_string(), r.clone())], *n)).collect();
    counter_family(&mut reg, "ssh_denials", "SSH logins, sessions and forwards refused, by reason", denials);
    encode(&reg)
}

/// What a metrics endpoint renders on each scrape.
pub(crate) type Render = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// Binds `addr` and serves `GET /metrics` from `render` (anything else: 404).
pub(crate) async fn listen(addr: SocketAddr, render: Render) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    let bound = l.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), serve_one(s, render)).await;
            });
        }
    });
    Ok((bound, task))
}

async fn serve_one(mut s: tokio::net::TcpStream, render: Render) {
    use crate::control::wire::http;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let head = loop {
        match http::parse_request(&buf) {
            Ok(Some((h, _))) => break h,
            Ok(None) if buf.len() < 16 * 1024 => {}
            _ => return,
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let resp = if head.method == "GET" && head.path == "/metrics" {
        let body = render().await;
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    } else {
        http::simple_response(404, "Not Found", "metrics are at /metrics\n")
    };
    let _ = s.write_all(&resp).await;
    let _ = s.shutdown().await;
}

/// `tailgate up --metrics-listen ADDR`: the node's metrics from its daemon
/// (data-plane counters and the directory's peer names).
pub(crate) async fn serve_node(addr: SocketAddr, daemon: crate::daemon::localapi::Daemon) -> anyhow::Result<SocketAddr> {
    if !addr.ip().is_loopback() {
        tracing::warn!("metrics on {addr}: not a loopback address; anyone who reaches it sees peer names and traffic counters");
    }
    let render: Render = Arc::new(move || {
        let daemon = daemon.clone();
        Box::pin(async move {
            let names = daemon.directory().peers.iter().map(|e| (e.node_key.clone(), e.name.clone())).collect();
            render_node(&daemon.node.status(), &names)
        })
    });
    let (bound, _task) = listen(addr, render).await?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_classic_format() {
        let mut reg = Registry::with_prefix("t");
        counter(&mut reg, "things", "Things seen", 3);
        gauge(&mut reg, "now", "Now", 2);
        counter_family(&mut reg, "by", "By reason", [(vec![("reason".to_string(), "a".to_string())], 1)]);
        let out = encode(&reg);
        assert!(out.contains("# HELP t_things_total Things seen.\n# TYPE t_things_total counter\nt_things_total 3\n"), "{out}");
        assert!(out.contains("# TYPE t_now gauge\nt_now 2\n"), "{out}");
        assert!(out.contains("t_by_total{reason=\"a\"} 1\n"), "{out}");
        assert!(!out.contains("# EOF"), "{out}");
    }

    #[test]
    fn denial_reasons_are_short_and_bounded() {
        let id = crate::daemon::identity::Identity {
            node_key: "k".into(),
            node_name: "n".into(),
            user: Some("alice".into()),
            tags: vec![],
            groups: vec![],
            ip: "100.64.0.1".parse().unwrap(),
        };
        let mut ev = AuditEvent::new(EventKind::Auth, "c", &id, &id, std::time::SystemTime::now());
        ev.allowed = Some(false);
        ev.reason = Some("access denied: there is no user \"evil\" on web1".into());
        assert_eq!(denial_reason(&ev), "login: there is no user");
        for i in 0..100 {
            ev.reason = Some(format!("reason {i}"));
            ssh_event(&ev);
        }
        let d = SSH.denials.lock().unwrap();
        assert!(d.len() <= MAX_REASONS + 1 && d.contains_key("other"), "{d:?}");
    }
}
