//! Local forwarding (`ssh -L`, `direct-tcpip`) to ports on this node.
//!
//! Only loopback destinations (or this node's own tailnet address, which is
//! the same machine) are reachable, and only ports the network policy lets
//! the caller reach on this node: an SSH login must not become a way around
//! the ACLs, nor a pivot to other hosts.
#![warn(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelOpenFailure};

use super::audit::EventKind;
use super::handler::ConnCtx;

/// Where a `direct-tcpip` request may connect, if anywhere: loopback names
/// and addresses, or this node's tailnet address (mapped to loopback, since
/// the tailnet address lives in tailgate's userspace stack, not the kernel's).
pub(crate) fn local_destination(host: &str, port: u32, self_ip: IpAddr) -> Option<SocketAddr> {
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
/// then copies bytes both ways until either side closes, the connection's
/// time limit passes, or a change of policy or identity no longer allows it.
pub(crate) async fn run(ctx: Arc<ConnCtx>, login: String, channel: Channel<Msg>, reply: ChannelOpenHandle, dest: SocketAddr) {
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
    let (counts, ended) = tokio::select! {
        r = copy => (r.unwrap_or((0, 0)), None),
        why = until_disallowed(&ctx, dest.port()) => ((0, 0), Some(why)),
    };
    // Dropping the stream closes the channel.
    drop(stream);
    let mut ev = ctx.event(EventKind::ForwardEnd);
    ev.login = Some(login);
    ev.kind = Some("direct-tcpip".into());
    ev.dest = Some(dest.to_string());
    ev.bytes_in = Some(counts.0);
    ev.bytes_out = Some(counts.1);
    ev.duration_ms = Some(started.elapsed().as_millis() as u64);
    ev.reason = ended;
    ctx.server.audit.write(&ev);
}

/// Resolves, with the reason, once the forward must end: the time limit
/// passed or, after a change, the login or the port is no longer allowed.
async fn until_disallowed(ctx: &ConnCtx, port: u16) -> String {
    let mut live = ctx.live.subscribe();
    loop {
        let limit = live.borrow_and_update().deadline;
        let expired = async {
            match limit {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = live.changed() => {
                // The connection is gone; russh closes the channel itself.
                if r.is_err() {
                    return std::future::pending().await;
                }
                if let Err(why) = ctx.forward_allowed(port) {
                    return format!("access revoked: {why}");
                }
            }
            _ = expired => return "time limit reached".into(),
        }
    }
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
