//! The node's stateful inbound filter.
//!
//! Every decrypted packet passes [`Filter::check`] before the netstack sees
//! it. New connections from a peer (a TCP SYN, an ICMP echo request) are
//! admitted only when a [`Judge`] says so; everything else that belongs to a
//! connection (TCP segments without a bare SYN, ICMP replies and errors)
//! passes, because the netstack itself only accepts segments for sockets that
//! exist: the ones the filter admitted and the ones this node opened. That is
//! the "state" of this stateful filter, and why replies to our own outbound
//! connections are never judged.
//!
//! Deny by default: a packet the filter cannot take apart completely (IPv4
//! fragments, IPv6 extension headers, truncated headers) or a protocol the
//! stack has no use for (UDP, anything but TCP and ICMP) is dropped, so no
//! SYN can be smuggled past the classifier in a form the netstack would
//! still parse.
//!
//! Sans-IO: the filter is plain state fed packets, peer keys and time; the
//! [`PolicyJudge`] consults the live identity table and policy.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, IpRepr, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};

use crate::daemon::identity::IdentityResolver;
use crate::dataplane::node::Node;
use crate::dataplane::wg;
use crate::key::Key;
use crate::ssh::PolicyHandle;

/// How often a peer's refusals are logged at most.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What an inbound packet is, as far as admission goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A TCP segment with SYN and without ACK: a new connection to `port`.
    Syn { port: u16 },
    /// An ICMP or ICMPv6 echo request.
    Echo,
    /// Part of an existing exchange (TCP without a bare SYN, ICMP other than
    /// echo requests); the netstack drops it unless a socket wants it.
    Other,
    /// Not parseable end to end, or a protocol the stack does not serve.
    Unwanted,
}

/// What to do with one inbound packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the netstack.
    Pass,
    /// A refused SYN: answer with a RST ([`rst_for`]) and drop it.
    Reset,
    /// Drop it silently.
    Drop,
}

/// Classify a decrypted IP packet.
pub(crate) fn classify(packet: &[u8]) -> Inbound {
    let Some((proto, payload)) = transport(packet) else { return Inbound::Unwanted };
    match proto {
        IpProtocol::Tcp => match TcpPacket::new_checked(payload) {
            Ok(t) if t.syn() && !t.ack() => Inbound::Syn { port: t.dst_port() },
            Ok(_) => Inbound::Other,
            Err(_) => Inbound::Unwanted,
        },
        IpProtocol::Icmp => match Icmpv4Packet::new_checked(payload) {
            Ok(i) if i.msg_type() == Icmpv4Message::EchoRequest => Inbound::Echo,
            Ok(_) => Inbound::Other,
            Err(_) => Inbound::Unwanted,
        },
        IpProtocol::Icmpv6 => match Icmpv6Packet::new_checked(payload) {
            Ok(i) if i.msg_type() == Icmpv6Message::EchoRequest => Inbound::Echo,
            Ok(_) => Inbound::Other,
            Err(_) => Inbound::Unwanted,
        },
        _ => Inbound::Unwanted,
    }
}

/// The transport protocol and its bytes, for unfragmented packets whose
/// transport header directly follows the IP header.
fn transport(packet: &[u8]) -> Option<(IpProtocol, &[u8])> {
    match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            Some((p.next_header(), p.payload()))
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            Some((p.next_header(), p.payload()))
        }
        _ => None,
    }
}

/// The RST answering a refused SYN, as a closed port would send it.
pub(crate) fn rst_for(syn: &[u8]) -> Option<Vec<u8>> {
    let (src, dst, payload) = match syn.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(syn).ok()?;
            (IpAddress::Ipv4(p.src_addr()), IpAddress::Ipv4(p.dst_addr()), p.payload())
        }
        6 => {
            let p = Ipv6Packet::new_checked(syn).ok()?;
            (IpAddress::Ipv6(p.src_addr()), IpAddress::Ipv6(p.dst_addr()), p.payload())
        }
        _ => return None,
    };
    let t = TcpPacket::new_checked(payload).ok()?;
    let tcp = TcpRepr {
        src_port: t.dst_port(),
        dst_port: t.src_port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(t.seq_number() + t.segment_len()),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = IpRepr::new(dst, src, IpProtocol::Tcp, tcp.buffer_len(), 64);
    let mut buf = vec![0u8; ip.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut buf[..], &caps);
    let mut out = TcpPacket::new_unchecked(&mut buf[ip.header_len()..]);
    tcp.emit(&mut out, &dst, &src, &caps);
    Some(buf)
}

/// Why a connection was refused, for the log.
pub(crate) type Refusal = String;

/// Decides whether a peer may open a connection to this node.
pub(crate) trait Judge: Send + Sync {
    /// May the peer with WireGuard key `peer` connect to TCP `port` here?
    fn admit_tcp(&self, peer: &Key, port: u16) -> Result<(), Refusal>;
    /// May it ping this node? `listening` are the TCP ports served here.
    fn admit_echo(&self, peer: &Key, listening: &[u16]) -> Result<(), Refusal> {
        if listening.iter().any(|p| self.admit_tcp(peer, *p).is_ok()) { Ok(()) } else { Err("it may reach no port on this node".into()) }
    }
    /// Whether established connections to `port` are re-judged here when
    /// the policy or identities change (false: another layer does it).
    fn rejudges(&self, _port: u16) -> bool {
        true
    }
}

impl std::fmt::Debug for dyn Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Judge")
    }
}

#[derive(Default)]
struct PeerCount {
    refused: u64,
    last_log: Option<Instant>,
    unlogged: u64,
}

/// The filter: a judge plus per-peer refusal counters.
pub(crate) struct Filter {
    judge: Arc<dyn Judge>,
    peers: HashMap<Key, PeerCount>,
}

impl Filter {
    pub(crate) fn new(judge: Arc<dyn Judge>) -> Self {
        Filter { judge, peers: HashMap::new() }
    }

    pub(crate) fn judge(&self) -> &Arc<dyn Judge> {
        &self.judge
    }

    /// Judge one decrypted packet from `peer`, as [`classify`] saw it.
    /// `listening` is asked only for echo requests.
    pub(crate) fn check(&mut self, peer: &Key, packet: Inbound, listening: impl FnOnce() -> Vec<u16>, now: Instant) -> Verdict {
        let (what, result) = match packet {
            Inbound::Other => return Verdict::Pass,
            Inbound::Unwanted => return Verdict::Drop,
            Inbound::Syn { port } => (format!("TCP port {port}"), self.judge.admit_tcp(peer, port)),
            Inbound::Echo => ("ping".to_string(), self.judge.admit_echo(peer, &listening())),
        };
        let Err(why) = result else { return Verdict::Pass };
        self.count(peer, &what, &why, now);
        if what == "ping" { Verdict::Drop } else { Verdict::Reset }
    }

    fn count(&mut self, peer: &Key, what: &str, why: &str, now: Instant) {
        let c = self.peers.entry(*peer).or_default();
        c.refused += 1;
        if c.last_log.is_some_and(|t| now.saturating_duration_since(t) < LOG_INTERVAL) {
            c.unlogged += 1;
            return;
        }
        tracing::warn!(
            peer = %wg::key_to_base64(peer),
            refused_total = c.refused,
            not_logged_since_last = c.unlogged,
            "inbound filter refused {what}: {why}"
        );
        c.last_log = Some(now);
        c.unlogged = 0;
    }

    /// How many connections from `peer` were refused so far.
    pub(crate) fn refused(&self, peer: &Key) -> u64 {
        self.peers.get(peer).map_or(0, |c| c.refused)
    }

    /// Forget a removed peer's counters.
    pub(crate) fn forget(&mut self, peer: &Key) {
        self.peers.remove(peer);
    }
}

/// Refuses every new inbound connection: for nodes that only dial out
/// (`tailgate nc` without a daemon).
pub(crate) struct DenyAll;

impl Judge for DenyAll {
    fn admit_tcp(&self, _: &Key, _: u16) -> Result<(), Refusal> {
        Err("this node accepts no connections".into())
    }
}

/// The judge of a running node: the live identity table and policy.
///
/// A TCP connection to `port` is admitted when the policy's
/// `check_network(caller, this node, port)` allows it or, on the port of
/// this node's SSH server, when some accept/check `[[ssh]]` rule could
/// admit the caller here. Unknown peers are refused.
pub(crate) struct PolicyJudge {
    pub(crate) resolver: Arc<dyn IdentityResolver>,
    pub(crate) policy: PolicyHandle,
    /// The embedded SSH server's port, if it runs.
    pub(crate) ssh_port: Option<u16>,
}

impl Judge for PolicyJudge {
    fn admit_tcp(&self, peer: &Key, port: u16) -> Result<(), Refusal> {
        let Some(caller) = self.resolver.resolve(peer) else {
            return Err("the peer has no identity in the tailnet map".into());
        };
        let me = self.resolver.self_identity();
        let policy = self.policy.current();
        if Some(port) == self.ssh_port && policy.ssh_reachable(&caller, &me) {
            return Ok(());
        }
        if policy.check_network(&caller, &me, port) {
            return Ok(());
        }
        Err(format!(
            "no [[acl]] in the policy lets {} reach {}:{port}; add one (dst = [\"{}:{port}\"]) if it should",
            caller.who(),
            me.node_name,
            me.node_name
        ))
    }

    fn rejudges(&self, port: u16) -> bool {
        // SSH sessions are re-judged per login by the SSH server.
        Some(port) != self.ssh_port
    }
}

/// Judge `node`'s inbound connections by `policy` and the identities from
/// `resolver`, live: when either is replaced, open connections the new state
/// no longer admits are reset (except on the SSH port, see [`Judge::rejudges`]).
pub(crate) fn install(node: &Node, resolver: Arc<dyn IdentityResolver>, policy: PolicyHandle, ssh_port: Option<u16>) {
    let changes = vec![resolver.changes(), policy.changes()];
    node.set_inbound_filter(Arc::new(PolicyJudge { resolver, policy, ssh_port }));
    node.rejudge_on(changes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Icmpv4Repr, Ipv4Address, Ipv4Repr};

    const A: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
    const B: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);

    fn tcp(control: TcpControl, ack: Option<i32>, port: u16) -> Vec<u8> {
        let t = TcpRepr {
            src_port: 40000,
            dst_port: port,
            control,
            seq_number: TcpSeqNumber(1000),
            ack_number: ack.map(TcpSeqNumber),
            window_len: 100,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = IpRepr::new(A.into(), B.into(), IpProtocol::Tcp, t.buffer_len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &ChecksumCapabilities::default());
        t.emit(&mut TcpPacket::new_unchecked(&mut buf[ip.header_len()..]), &A.into(), &B.into(), &ChecksumCapabilities::default());
        buf
    }

    fn echo() -> Vec<u8> {
        let icmp = Icmpv4Repr::EchoRequest { ident: 1, seq_no: 1, data: b"hi" };
        let ip = Ipv4Repr { src_addr: A, dst_addr: B, next_header: IpProtocol::Icmp, payload_len: icmp.buffer_len(), hop_limit: 64 };
        let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &ChecksumCapabilities::default());
        icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut buf[20..]), &ChecksumCapabilities::default());
        buf
    }

    /// Admits TCP port 22 only.
    struct Only22;
    impl Judge for Only22 {
        fn admit_tcp(&self, _: &Key, port: u16) -> Result<(), Refusal> {
            if port == 22 { Ok(()) } else { Err("no".into()) }
        }
    }

    #[test]
    fn syns_are_judged_and_the_rest_of_a_connection_passes() {
        let mut f = Filter::new(Arc::new(Only22));
        let k = [1u8; 32];
        let now = Instant::now();
        let none = Vec::new;
        assert_eq!(f.check(&k, classify(&tcp(TcpControl::Syn, None, 22)), none, now), Verdict::Pass);
        assert_eq!(f.check(&k, classify(&tcp(TcpControl::Syn, None, 9000)), none, now), Verdict::Reset);
        // A SYN-ACK answers a connection we opened; an ACK belongs to one.
        assert_eq!(f.check(&k, classify(&tcp(TcpControl::Syn, Some(5), 9000)), none, now), Verdict::Pass);
        assert_eq!(f.check(&k, classify(&tcp(TcpControl::None, Some(5), 9000)), none, now), Verdict::Pass);
        assert_eq!(f.refused(&k), 1);
        assert_eq!(f.refused(&[2u8; 32]), 0);
    }

    #[test]
    fn echo_needs_some_reachable_port() {
        let mut f = Filter::new(Arc::new(Only22));
        let k = [1u8; 32];
        let now = Instant::now();
        assert_eq!(f.check(&k, classify(&echo()), || vec![9000], now), Verdict::Drop);
        assert_eq!(f.check(&k, classify(&echo()), || vec![9000, 22], now), Verdict::Pass);
        assert_eq!(f.refused(&k), 1);
    }

    #[test]
    fn fragments_and_garbage_are_dropped() {
        let mut f = Filter::new(Arc::new(Only22));
        let k = [1u8; 32];
        let now = Instant::now();
        let mut frag = tcp(TcpControl::Syn, None, 9000);
        frag[6] |= 0x20; // more fragments
        assert_eq!(f.check(&k, classify(&frag), Vec::new, now), Verdict::Drop);
        let syn = tcp(TcpControl::Syn, None, 9000);
        assert_eq!(f.check(&k, classify(&syn[..30]), Vec::new, now), Verdict::Drop);
        assert_eq!(f.check(&k, classify(&[]), Vec::new, now), Verdict::Drop);
        assert_eq!(f.check(&k, classify(&[0x45; 3]), Vec::new, now), Verdict::Drop);
        // IPv6 with a hop-by-hop header in front of TCP.
        let mut v6 = vec![0x60, 0, 0, 0, 0, 28, 0, 64];
        v6.extend_from_slice(&[0u8; 32]);
        v6.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        v6.extend_from_slice(&syn[20..]);
        assert_eq!(classify(&v6), Inbound::Unwanted);
    }

    #[test]
    fn rst_answers_the_syn() {
        let syn = tcp(TcpControl::Syn, None, 9000);
        let rst = rst_for(&syn).unwrap();
        let ip = Ipv4Packet::new_checked(&rst[..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (B, A));
        assert!(ip.verify_checksum());
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.rst() && t.ack() && !t.syn());
        assert_eq!((t.src_port(), t.dst_port()), (9000, 40000));
        assert_eq!(t.ack_number(), TcpSeqNumber(1001));
        assert!(t.verify_checksum(&B.into(), &A.into()));
    }

    fn identity(key: &Key, name: &str, user: Option<&str>, tags: &[&str], ip: &str) -> crate::daemon::identity::Identity {
        crate::daemon::identity::Identity {
            node_key: wg::key_to_base64(key),
            node_name: name.into(),
            user: user.map(Into::into),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ip: ip.parse().unwrap(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn policy_judge_opens_acl_ports_and_the_ssh_port_only_to_ssh_callers() {
        let policy = crate::policy::Policy::parse(
            r#"
[tag_owners]
"tag:prod" = ["alice"]
[[acl]]
src = ["bob"]
dst = ["tag:prod:9000"]
[[ssh]]
src = ["alice"]
dst = ["tag:prod"]
users = ["root"]
action = "accept"
[[ssh]]
src = ["carol"]
dst = ["tag:prod"]
users = ["*"]
action = "reject"
"#,
            "t.toml",
        )
        .unwrap();
        let (alice, bob, carol, stranger) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32]);
        let me = identity(&[9u8; 32], "web1", None, &["tag:prod"], "100.64.0.9");
        let resolver = crate::daemon::identity::TableResolver::new(
            me,
            [
                (alice, identity(&alice, "a", Some("alice"), &[], "100.64.0.1")),
                (bob, identity(&bob, "b", Some("bob"), &[], "100.64.0.2")),
                (carol, identity(&carol, "c", Some("carol"), &[], "100.64.0.3")),
            ],
        );
        // The SSH server on a non-standard port: the [[ssh]] rules open that port.
        let judge = PolicyJudge { resolver: Arc::new(resolver), policy: PolicyHandle::new(policy), ssh_port: Some(2222) };
        assert!(judge.admit_tcp(&alice, 2222).is_ok());
        assert!(judge.admit_tcp(&alice, 9000).is_err());
        assert!(judge.admit_tcp(&bob, 9000).is_ok());
        assert!(judge.admit_tcp(&bob, 2222).is_err(), "an acl elsewhere does not open SSH");
        assert!(judge.admit_tcp(&carol, 2222).is_err(), "reject-only rules open nothing");
        let why = judge.admit_tcp(&stranger, 9000).unwrap_err();
        assert!(why.contains("no identity"), "{why}");
        let why = judge.admit_tcp(&alice, 9000).unwrap_err();
        assert!(why.contains("web1:9000"), "the refusal says what to add: {why}");
        assert!(!judge.rejudges(2222) && judge.rejudges(9000));
    }

    #[test]
    fn refusals_are_counted_but_logged_at_most_once_a_second() {
        let mut f = Filter::new(Arc::new(Only22));
        let k = [1u8; 32];
        let t0 = Instant::now();
        for i in 0..10 {
            f.check(&k, classify(&tcp(TcpControl::Syn, None, 80)), Vec::new, t0 + Duration::from_millis(i * 10));
        }
        let c = &f.peers[&k];
        assert_eq!((c.refused, c.unlogged, c.last_log), (10, 9, Some(t0)));
        f.check(&k, classify(&tcp(TcpControl::Syn, None, 80)), Vec::new, t0 + Duration::from_secs(2));
        assert_eq!(f.peers[&k].unlogged, 0);
    }
}
