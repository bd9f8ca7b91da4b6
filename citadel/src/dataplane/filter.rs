//! Inbound packet filter built from the netmap's `PacketFilter` (defence in depth for org
//! isolation: a packet the coordination server did not allow is dropped here even if a
//! misbehaving server handed its sender our key and address).
//!
//! Semantics follow Tailscale's `wgengine/filter`: a rule allows traffic whose source is in
//! `SrcIPs` to a destination in `DstPorts` (IP set + port range) for the protocols in `IPProto`
//! (default TCP, UDP, ICMPv4, ICMPv6; ports are not checked for ICMP). Return traffic of flows
//! this node opened is let through: TCP segments that are not a bare SYN (as Tailscale does —
//! the TCP stack itself rejects segments that belong to no connection) and UDP datagrams that
//! answer a flow recorded by [`InboundFilter::record_outbound`]. Fragments and unknown IPv6
//! extension headers are dropped, as the netstack does not reassemble.
//!
//! Sans-IO: time comes in as a parameter.

use crate::tailcfg::FilterRule;
use ip_network::IpNetwork;
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// IANA protocol numbers the filter knows by name.
pub(crate) const PROTO_ICMP: u8 = 1;
pub(crate) const PROTO_TCP: u8 = 6;
pub(crate) const PROTO_UDP: u8 = 17;
pub(crate) const PROTO_ICMPV6: u8 = 58;

/// Protocols a rule applies to when its `IPProto` is empty (Tailscale's default).
const DEFAULT_PROTOS: [u8; 4] = [PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6];

/// How long an outbound UDP flow keeps its return path open without traffic.
const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);
/// Upper bound on tracked flows, so a chatty app cannot grow memory without bound.
const MAX_FLOWS: usize = 4096;

/// The header fields of an IP packet that filtering and demultiplexing need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PacketInfo {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Zero for protocols without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP with SYN set and ACK clear: a new connection attempt.
    pub tcp_syn_only: bool,
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("truncated or malformed IP packet")]
    Malformed,
    #[error("IP fragment")]
    Fragment,
}

impl PacketInfo {
    /// Parses the IPv4/IPv6 header and, for TCP and UDP, the ports. Never panics.
    pub(crate) fn parse(packet: &[u8]) -> Result<PacketInfo, ParseError> {
        let version = packet.first().map(|b| b >> 4).ok_or(ParseError::Malformed)?;
        let (src, dst, proto, payload) = match version {
            4 => {
                let p = Ipv4Packet::new_checked(packet).map_err(|_| ParseError::Malformed)?;
                if p.more_frags() || p.frag_offset() != 0 {
                    return Err(ParseError::Fragment);
                }
                let hl = usize::from(p.header_len());
                let total = usize::from(p.total_len());
                let payload = packet.get(hl..total).ok_or(ParseError::Malformed)?;
                (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()), u8::from(p.next_header()), payload)
            }
            6 => {
                let p = Ipv6Packet::new_checked(packet).map_err(|_| ParseError::Malformed)?;
                let total = 40 + usize::from(p.payload_len());
                let payload = packet.get(40..total).ok_or(ParseError::Malformed)?;
                if p.next_header() == IpProtocol::Ipv6Frag {
                    return Err(ParseError::Fragment);
                }
                (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()), u8::from(p.next_header()), payload)
            }
            _ => return Err(ParseError::Malformed),
        };
        let mut info = PacketInfo { proto, src, dst, src_port: 0, dst_port: 0, tcp_syn_only: false };
        match proto {
            PROTO_TCP => {
                let t = TcpPacket::new_checked(payload).map_err(|_| ParseError::Malformed)?;
                info.src_port = t.src_port();
                info.dst_port = t.dst_port();
                info.tcp_syn_only = t.syn() && !t.ack();
            }
            PROTO_UDP => {
                let u = UdpPacket::new_checked(payload).map_err(|_| ParseError::Malformed)?;
                info.src_port = u.src_port();
                info.dst_port = u.dst_port();
            }
            _ => {}
        }
        Ok(info)
    }

    fn has_ports(&self) -> bool {
        matches!(self.proto, PROTO_TCP | PROTO_UDP)
    }
}

/// A set of IP addresses as filter rules write them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IpMatch {
    Any,
    Net(IpNetwork),
    Range(IpAddr, IpAddr),
}

impl IpMatch {
    /// Parses `*`, an IP, a CIDR prefix or an inclusive `a-b` range.
    fn parse(s: &str) -> Option<IpMatch> {
        let s = s.trim();
        if s == "*" {
            return Some(IpMatch::Any);
        }
        if let Some((a, b)) = s.split_once('-') {
            let (a, b): (IpAddr, IpAddr) = (a.parse().ok()?, b.parse().ok()?);
            return (a.is_ipv4() == b.is_ipv4() && a <= b).then_some(IpMatch::Range(a, b));
        }
        parse_prefix(s).map(IpMatch::Net)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match self {
            IpMatch::Any => true,
            IpMatch::Net(n) => n.contains(ip),
            IpMatch::Range(a, b) => a.is_ipv4() == ip.is_ipv4() && *a <= ip && ip <= *b,
        }
    }
}

/// Parses `IP` or `IP/len` (host bits are cleared: `100.64.0.1/10` is `100.64.0.0/10`).
pub(crate) fn parse_prefix(s: &str) -> Option<IpNetwork> {
    let s = s.trim();
    if s.contains('/') {
        return IpNetwork::from_str_truncate(s).ok();
    }
    let ip: IpAddr = s.parse().ok()?;
    let len = if ip.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(ip, len).ok()
}

#[derive(Debug, Clone)]
struct Rule {
    srcs: Vec<IpMatch>,
    dsts: Vec<(IpMatch, u16, u16)>,
    protos: Vec<u8>,
}

/// The compiled rules of a netmap's packet filter. An empty filter allows nothing new inbound.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    /// Compiles the rules; entries that do not parse (e.g. capability grants this node does
    /// not implement) are skipped, so they can only ever narrow what is allowed.
    pub(crate) fn new(rules: &[FilterRule]) -> Filter {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let srcs: Vec<IpMatch> = r
                .src_ips
                .iter()
                .filter_map(|s| {
                    let m = IpMatch::parse(s);
                    if m.is_none() {
                        tracing::debug!(src = %s, "filter: skipping source entry");
                    }
                    m
                })
                .collect();
            let dsts: Vec<(IpMatch, u16, u16)> = r
                .dst_ports
                .iter()
                .filter_map(|d| {
                    let m = IpMatch::parse(&d.ip);
                    if m.is_none() {
                        tracing::debug!(dst = %d.ip, "filter: skipping destination entry");
                    }
                    Some((m?, d.ports.first, d.ports.last))
                })
                .collect();
            let protos = r.ip_proto.iter().filter_map(|p| u8::try_from(*p).ok()).collect();
            if !srcs.is_empty() && !dsts.is_empty() {
                out.push(Rule { srcs, dsts, protos });
            }
        }
        Filter { rules: out }
    }

    /// True when some rule allows this packet as a new inbound flow.
    pub(crate) fn allows(&self, p: &PacketInfo) -> bool {
        self.rules.iter().any(|r| {
            let proto_ok =
                if r.protos.is_empty() { DEFAULT_PROTOS.contains(&p.proto) } else { r.protos.contains(&p.proto) };
            proto_ok
                && r.srcs.iter().any(|s| s.contains(p.src))
                && r.dsts.iter().any(|(ip, first, last)| {
                    ip.contains(p.dst) && (!p.has_ports() || (*first..=*last).contains(&p.dst_port))
                })
        })
    }
}

/// What the filter decided, with the reason (for counters and traces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A rule allows the packet.
    AcceptRule,
    /// TCP segment of an existing connection (not a bare SYN).
    AcceptTcpEstablished,
    /// UDP answer to a flow this node opened.
    AcceptUdpReply,
    /// The destination is not one of this node's addresses.
    DropNotLocal,
    /// No rule allows it.
    DropNoRule,
}

impl Verdict {
    pub(crate) fn accepted(self) -> bool {
        matches!(self, Verdict::AcceptRule | Verdict::AcceptTcpEstablished | Verdict::AcceptUdpReply)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey {
    local: SocketAddr,
    remote: SocketAddr,
}

/// The filter plus the state it keeps: this node's addresses and its outbound UDP flows.
#[derive(Debug, Default)]
pub(crate) struct InboundFilter {
    filter: Filter,
    local: Vec<IpAddr>,
    flows: HashMap<FlowKey, Instant>,
}

impl InboundFilter {
    pub(crate) fn set_rules(&mut self, rules: &[FilterRule]) {
        self.filter = Filter::new(rules);
    }

    pub(crate) fn set_local_addrs(&mut self, addrs: Vec<IpAddr>) {
        self.local = addrs;
    }

    /// Notes an outbound packet so that answers to it are let in.
    pub(crate) fn record_outbound(&mut self, p: &PacketInfo, now: Instant) {
        if p.proto != PROTO_UDP {
            return;
        }
        let key = FlowKey { local: SocketAddr::new(p.src, p.src_port), remote: SocketAddr::new(p.dst, p.dst_port) };
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
            self.flows.retain(|_, t| now.saturating_duration_since(*t) < UDP_FLOW_IDLE);
            if self.flows.len() >= MAX_FLOWS {
                if let Some(oldest) = self.flows.iter().min_by_key(|(_, t)| **t).map(|(k, _)| *k) {
                    self.flows.remove(&oldest);
                }
            }
        }
        self.flows.insert(key, now);
    }

    /// Decides whether an inbound packet (already authenticated and source-checked) may be
    /// delivered to the netstack.
    pub(crate) fn check(&mut self, p: &PacketInfo, now: Instant) -> Verdict {
        if !self.local.contains(&p.dst) {
            return Verdict::DropNotLocal;
        }
        if p.proto == PROTO_TCP && !p.tcp_syn_only {
            return Verdict::AcceptTcpEstablished;
        }
        if p.proto == PROTO_UDP {
            let key = FlowKey { local: SocketAddr::new(p.dst, p.dst_port), remote: SocketAddr::new(p.src, p.src_port) };
            if let Some(t) = self.flows.get_mut(&key) {
                if now.saturating_duration_since(*t) < UDP_FLOW_IDLE {
                    *t = now;
                    return Verdict::AcceptUdpReply;
                }
                self.flows.remove(&key);
            }
        }
        if self.filter.allows(p) {
            Verdict::AcceptRule
        } else {
            Verdict::DropNoRule
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::{NetPortRange, PortRange};
    use proptest::prelude::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpRepr, TcpControl, TcpRepr, TcpSeqNumber, UdpRepr};

    fn rule(srcs: &[&str], dst: &str, first: u16, last: u16, protos: &[i32]) -> FilterRule {
        FilterRule {
            src_ips: srcs.iter().map(|s| s.to_string()).collect(),
            dst_ports: vec![NetPortRange { ip: dst.to_string(), ports: PortRange { first, last } }],
            ip_proto: protos.to_vec(),
        }
    }

    fn info(proto: u8, src: &str, dst: &str, dst_port: u16) -> PacketInfo {
        PacketInfo {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: 40000,
            dst_port,
            tcp_syn_only: proto == PROTO_TCP,
        }
    }

    #[test]
    fn rules_match_source_destination_port_and_proto() {
        let f = Filter::new(&[
            rule(&["100.64.0.2/32", "fd7a:115c:a1e0::2"], "*", 22, 22, &[]),
            rule(&["*"], "100.64.0.1", 8000, 8010, &[PROTO_UDP as i32]),
            rule(&["100.64.0.5-100.64.0.9"], "100.64.0.0/24", 0, 65535, &[]),
        ]);
        assert!(f.allows(&info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 22)));
        assert!(f.allows(&info(PROTO_TCP, "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 22)));
        assert!(!f.allows(&info(PROTO_TCP, "100.64.0.3", "100.64.0.1", 22)));
        assert!(!f.allows(&info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 23)));
        assert!(f.allows(&info(PROTO_UDP, "10.9.9.9", "100.64.0.1", 8005)));
        assert!(!f.allows(&info(PROTO_TCP, "10.9.9.9", "100.64.0.1", 8005)), "rule 2 is UDP only");
        assert!(f.allows(&info(PROTO_TCP, "100.64.0.7", "100.64.0.1", 1)));
        assert!(!f.allows(&info(PROTO_TCP, "100.64.0.10", "100.64.0.1", 1)));
        // ICMP ignores ports; default protocols include it.
        assert!(f.allows(&info(PROTO_ICMP, "100.64.0.2", "100.64.0.1", 0)));
        // Protocols outside the default set need an explicit IPProto.
        assert!(!f.allows(&info(132, "100.64.0.2", "100.64.0.1", 0)));
    }

    #[test]
    fn empty_or_unparseable_rules_allow_nothing() {
        assert!(!Filter::default().allows(&info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 22)));
        let f = Filter::new(&[rule(&["tag:prod", "bogus"], "*", 0, 65535, &[])]);
        assert!(!f.allows(&info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 22)));
    }

    #[test]
    fn return_traffic_and_locality() {
        let now = crate::clock::now();
        let mut f = InboundFilter::default();
        f.set_local_addrs(vec!["100.64.0.1".parse().unwrap()]);
        // Nothing is allowed by rules; a SYN is dropped, an established segment is not.
        assert_eq!(f.check(&info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 80), now), Verdict::DropNoRule);
        let mut ack = info(PROTO_TCP, "100.64.0.2", "100.64.0.1", 80);
        ack.tcp_syn_only = false;
        assert_eq!(f.check(&ack, now), Verdict::AcceptTcpEstablished);
        // UDP answers only to flows we opened, and only while fresh.
        let reply = PacketInfo {
            proto: PROTO_UDP,
            src: "100.64.0.2".parse().unwrap(),
            dst: "100.64.0.1".parse().unwrap(),
            src_port: 53,
            dst_port: 5000,
            tcp_syn_only: false,
        };
        assert_eq!(f.check(&reply, now), Verdict::DropNoRule);
        let out = PacketInfo { src: reply.dst, dst: reply.src, src_port: 5000, dst_port: 53, ..reply };
        f.record_outbound(&out, now);
        assert_eq!(f.check(&reply, now), Verdict::AcceptUdpReply);
        assert_eq!(f.check(&reply, now + UDP_FLOW_IDLE * 2), Verdict::DropNoRule);
        // Not addressed to us.
        assert_eq!(f.check(&info(PROTO_TCP, "100.64.0.2", "100.64.0.9", 80), now), Verdict::DropNotLocal);
    }

    #[test]
    fn flow_table_is_bounded() {
        let now = crate::clock::now();
        let mut f = InboundFilter::default();
        for i in 0..(MAX_FLOWS as u16 + 100) {
            let mut p = info(PROTO_UDP, "100.64.0.1", "100.64.0.2", i);
            p.tcp_syn_only = false;
            f.record_outbound(&p, now + Duration::from_millis(u64::from(i)));
        }
        assert!(f.flows.len() <= MAX_FLOWS);
    }

    #[test]
    fn parses_real_packets() {
        let src = IpAddress::v4(100, 64, 0, 2);
        let dst = IpAddress::v4(100, 64, 0, 1);
        let tcp = TcpRepr {
            src_port: 1234,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let ip = IpRepr::new(src, dst, IpProtocol::Tcp, tcp.buffer_len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[ip.header_len()..]), &src, &dst, &caps);
        let p = PacketInfo::parse(&buf).unwrap();
        assert_eq!((p.proto, p.src_port, p.dst_port, p.tcp_syn_only), (PROTO_TCP, 1234, 80, true));

        let src6 = IpAddress::Ipv6("fd7a:115c:a1e0::2".parse().unwrap());
        let dst6 = IpAddress::Ipv6("fd7a:115c:a1e0::1".parse().unwrap());
        let udp = UdpRepr { src_port: 53, dst_port: 5353 };
        let ip = IpRepr::new(src6, dst6, IpProtocol::Udp, 8 + 3, 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        ip.emit(&mut buf[..], &caps);
        let hl = ip.header_len();
        udp.emit(&mut UdpPacket::new_unchecked(&mut buf[hl..]), &src6, &dst6, 3, |b| b.copy_from_slice(b"abc"), &caps);
        let p = PacketInfo::parse(&buf).unwrap();
        assert_eq!(
            (p.proto, p.src, p.src_port, p.dst_port),
            (PROTO_UDP, "fd7a:115c:a1e0::2".parse().unwrap(), 53, 5353)
        );
        // Truncations never panic and never parse.
        for n in 0..buf.len() {
            assert!(PacketInfo::parse(&buf[..n]).is_err(), "len {n}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PacketInfo::parse(&b);
        }

        #[test]
        fn filter_compile_never_panics(srcs in proptest::collection::vec(".{0,30}", 0..4), dst in ".{0,30}") {
            let srcs: Vec<&str> = srcs.iter().map(String::as_str).collect();
            let _ = Filter::new(&[rule(&srcs, &dst, 0, 65535, &[-1, 300, 6])]);
        }
    }
}
