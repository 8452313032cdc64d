//! Local forwarding (`ssh -L`, `direct-tcpip`) to ports on this node.
//!
//! Only loopback destinations (or this node's own tailnet address, which is
//! the same machine) are reachable, and only ports the network policy lets
//! the caller reach on this node: an SSH login must not become a way around
//! the ACLs, nor a pivot to other hosts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};

use super::audit::{AuditEvent, EventKind};
use super::handler::ConnCtx;

/// Where a `direct-tcpip` request may connect, if anywhere: loopback names
/// and addresses, or this node's tailnet address (mapped to loopback, since
/// the tailnet address lives in tailgate's userspace stack, not the kernel's).
pub fn local_destination(host: &str, port: u32, self_ip: IpAddr) -> Option<SocketAddr> {
    let port = u16::try_from(port).ok().filter(|p| *p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match host {
        "localhost" | "localhost." => IpAddr::V4(Ipv4Addr::LOCALHOST),
        _ => match host.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => ip,
            Ok(ip) if ip == self_ip => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            _ => return None,
        },
    };
    Some(SocketAddr::new(ip, port))
}

/// Answers an allowed request: connects, then accepts or refuses the channel,
/// then copies bytes both ways until either side closes or the deadline.
pub async fn run(
    ctx: Arc<ConnCtx>,
    login: String,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    dest: SocketAddr,
    deadline: Option<Instant>,
) {
    let started = Instant::now();
    let tcp = match tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect(dest)).await {
        Ok(Ok(s)) => s,
        _ => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    let mut tcp = tcp;
    let mut stream = channel.into_stream();
    let copy = tokio::io::copy_bidirectional(&mut stream, &mut tcp);
    let (up, down) = match deadline {
        Some(at) => match tokio::time::timeout_at(at.into(), copy).await {
            Ok(r) => r.unwrap_or((0, 0)),
            Err(_) => (0, 0),
        },
        None => copy.await.unwrap_or((0, 0)),
    };
    let mut ev = AuditEvent::new(EventKind::ForwardEnd, &ctx.conn_id, &ctx.caller, &ctx.target, SystemTime::now());
    ev.login = Some(login);
    ev.kind = Some("direct-tcpip".into());
    ev.dest = Some(dest.to_string());
    ev.bytes_in = Some(up);
    ev.bytes_out = Some(down);
    ev.duration_ms = Some(started.elapsed().as_millis() as u64);
    ctx.server.audit.write(&ev);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machine() {
        let me: IpAddr = "100.64.0.3".parse().unwrap();
        assert_eq!(local_destination("localhost", 80, me), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(local_destination("127.0.0.1", 8080, me), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(local_destination("127.1.2.3", 8080, me), Some("127.1.2.3:8080".parse().unwrap()));
        assert_eq!(local_destination("::1", 22, me), Some("[::1]:22".parse().unwrap()));
        assert_eq!(local_destination("[::1]", 22, me), Some("[::1]:22".parse().unwrap()));
        assert_eq!(local_destination("100.64.0.3", 5432, me), Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(local_destination("100.64.0.4", 5432, me), None);
        assert_eq!(local_destination("10.0.0.1", 80, me), None);
        assert_eq!(local_destination("example.com", 80, me), None);
        assert_eq!(local_destination("localhost", 0, me), None);
        assert_eq!(local_destination("localhost", 70000, me), None);
    }
}
