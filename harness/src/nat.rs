//! A sans-IO UDP NAT: the translation table of one middlebox, with the standard behaviours of
//! RFC 4787 (mapping and filtering: endpoint-independent, address-dependent,
//! address-and-port-dependent), hairpinning, mapping timeouts and port allocation.
//!
//! [`Nat`] opens no sockets and reads no clock: every call takes `now`, and the answer says
//! what the middlebox does with the packet. The turmoil host in [`crate::nat_host`] applies it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::time::Instant;

/// Which outbound packets share one external port (RFC 4787 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mapping {
    /// One external port per internal endpoint, whatever the destination ("EIM").
    EndpointIndependent,
    /// One external port per internal endpoint and destination IP.
    AddressDependent,
    /// One external port per internal endpoint and destination IP and port ("symmetric").
    AddressAndPortDependent,
}

/// Which inbound packets a mapping lets through (RFC 4787 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filtering {
    /// Anyone may send to a live mapping ("full cone").
    EndpointIndependent,
    /// Only IPs the mapping has sent to ("restricted cone").
    AddressDependent,
    /// Only IP and port pairs the mapping has sent to ("port restricted").
    AddressAndPortDependent,
}

/// How external ports are chosen for new mappings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortAlloc {
    /// Keep the internal port when it is free on the outside, else pick the next free one.
    Preserve,
    /// A random free port (seeded; Linux `--random-fully` behaves like this).
    Random,
}

/// What a NAT does with a UDP packet to its public address that no mapping admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unsolicited {
    /// Drop it and remember nothing (a router with a "drop unsolicited inbound" firewall rule).
    #[default]
    Drop,
    /// The router's own stack takes it and keeps a flow for its sender (Linux conntrack with
    /// no input firewall): until that flow idles out, an inside host's mapping towards that
    /// sender must take another public port.
    Remap,
}

/// The behaviour of one NAT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatConfig {
    /// Mapping behaviour.
    pub mapping: Mapping,
    /// Filtering behaviour.
    pub filtering: Filtering,
    /// Whether an inside host may reach another inside host through the public address.
    pub hairpin: bool,
    /// How long an idle mapping lives (refreshed by outbound packets only).
    pub timeout: Duration,
    /// Port allocation.
    pub ports: PortAlloc,
    /// Unsolicited inbound UDP.
    pub unsolicited: Unsolicited,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            mapping: Mapping::EndpointIndependent,
            filtering: Filtering::AddressAndPortDependent,
            hairpin: false,
            // RFC 4787 REQ-5 asks for at least 2 minutes.
            timeout: Duration::from_secs(120),
            ports: PortAlloc::Preserve,
            unsolicited: Unsolicited::Drop,
        }
    }
}

/// What to do with a packet an inside host sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// Send it from the public `port` to `to`.
    Forward {
        /// External port to send from.
        port: u16,
        /// The destination, unchanged.
        to: SocketAddr,
    },
    /// Deliver it to an inside host (hairpinning), as if it came from `from`.
    Hairpin {
        /// The inside host it is for.
        to: SocketAddr,
        /// The source the receiver sees (the sender's public mapping).
        from: SocketAddr,
    },
    /// Drop it.
    Drop(&'static str),
}

/// What to do with a packet that arrived on a public port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// Deliver it to this inside host (the source stays as it was).
    Forward(SocketAddr),
    /// Drop it.
    Drop(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Any,
    Ip(IpAddr),
    Endpoint(SocketAddr),
}

#[derive(Debug, Clone)]
struct Entry {
    internal: SocketAddr,
    key: Key,
    last_out: Instant,
    /// Remote endpoints this mapping has sent to.
    sent_to: Vec<SocketAddr>,
}

/// The translation table of one NAT with public address `public_ip`.
///
/// Call [`Nat::outbound`] for each packet from the inside and [`Nat::inbound`] for each packet
/// arriving on a public port. Instants must never go backwards.
#[derive(Debug)]
pub struct Nat {
    cfg: NatConfig,
    public_ip: IpAddr,
    /// Live mappings by external port.
    by_port: BTreeMap<u16, Entry>,
    /// With [`Unsolicited::Remap`]: flows the router's own stack keeps for unsolicited senders,
    /// `(public port, sender)` → last packet.
    router_flows: BTreeMap<(u16, SocketAddr), Instant>,
    rng: StdRng,
    next_port: u16,
}

/// Bound on the router flows one NAT keeps (unsolicited senders are strangers).
const ROUTER_FLOWS_MAX: usize = 65536;

/// Lowest port handed out.
const PORT_MIN: u16 = 1024;

impl Nat {
    /// A NAT with an empty table; `seed` drives random port allocation.
    pub fn new(cfg: NatConfig, public_ip: IpAddr, seed: u64) -> Self {
        Nat {
            cfg,
            public_ip,
            by_port: BTreeMap::new(),
            router_flows: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
            next_port: 30000,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &NatConfig {
        &self.cfg
    }

    /// Replaces the behaviour (a "NAT mapping change" fault); existing mappings are dropped,
    /// as a rebooted home router would.
    pub fn reconfigure(&mut self, cfg: NatConfig) {
        self.cfg = cfg;
        self.by_port.clear();
        self.router_flows.clear();
    }

    /// Forgets every mapping (a NAT reboot or a carrier-side rebinding).
    pub fn flush(&mut self) {
        self.by_port.clear();
        self.router_flows.clear();
    }

    /// The public address.
    pub fn public_ip(&self) -> IpAddr {
        self.public_ip
    }

    /// Number of live mappings at `now`.
    pub fn mappings(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.by_port.len()
    }

    fn key_for(&self, dst: SocketAddr) -> Key {
        match self.cfg.mapping {
            Mapping::EndpointIndependent => Key::Any,
            Mapping::AddressDependent => Key::Ip(dst.ip()),
            Mapping::AddressAndPortDependent => Key::Endpoint(dst),
        }
    }

    fn expire(&mut self, now: Instant) {
        let t = self.cfg.timeout;
        self.by_port.retain(|_, e| now.saturating_duration_since(e.last_out) < t);
        self.router_flows.retain(|_, last| now.saturating_duration_since(*last) < t);
    }

    fn find(&self, src: SocketAddr, key: &Key) -> Option<u16> {
        self.by_port.iter().find(|(_, e)| e.internal == src && e.key == *key).map(|(p, _)| *p)
    }

    fn alloc_port(&mut self, internal: SocketAddr, avoid: Option<u16>) -> Option<u16> {
        let free = |p: u16, m: &BTreeMap<u16, Entry>| p >= PORT_MIN && !m.contains_key(&p) && Some(p) != avoid;
        if self.by_port.len() >= usize::from(u16::MAX - PORT_MIN) {
            return None;
        }
        match self.cfg.ports {
            PortAlloc::Preserve => {
                if free(internal.port(), &self.by_port) {
                    return Some(internal.port());
                }
                loop {
                    let p = self.next_port;
                    self.next_port = if p == u16::MAX { PORT_MIN } else { p + 1 };
                    if free(p, &self.by_port) {
                        return Some(p);
                    }
                }
            }
            PortAlloc::Random => loop {
                let p = self.rng.gen_range(PORT_MIN..=u16::MAX);
                if free(p, &self.by_port) {
                    return Some(p);
                }
            },
        }
    }

    /// Translates a packet from inside endpoint `src` to `dst`.
    pub fn outbound(&mut self, now: Instant, src: SocketAddr, dst: SocketAddr) -> Outbound {
        self.expire(now);
        let mut key = self.key_for(dst);
        // A flow the router keeps for `dst` on the port this packet would leave from makes
        // the kernel pick another port for this destination alone.
        let remapped = Key::Endpoint(dst);
        let mut avoid = None;
        if self.cfg.unsolicited == Unsolicited::Remap && key != remapped {
            if self.find(src, &remapped).is_some() {
                key = remapped;
            } else {
                let p = self.find(src, &key).unwrap_or(src.port());
                if self.router_flows.contains_key(&(p, dst)) {
                    key = remapped;
                    avoid = Some(p);
                }
            }
        }
        let port = match self.find(src, &key) {
            Some(p) => p,
            None => {
                let Some(p) = self.alloc_port(src, avoid) else {
                    return Outbound::Drop("no free external port");
                };
                self.by_port.insert(p, Entry { internal: src, key, last_out: now, sent_to: Vec::new() });
                p
            }
        };
        let e = self.by_port.get_mut(&port).expect("inserted above");
        e.last_out = now;
        if !e.sent_to.contains(&dst) {
            e.sent_to.push(dst);
        }
        if dst.ip() == self.public_ip {
            if !self.cfg.hairpin {
                return Outbound::Drop("hairpinning disabled");
            }
            let from = SocketAddr::new(self.public_ip, port);
            return match self.inbound(now, dst.port(), from) {
                Inbound::Forward(to) => Outbound::Hairpin { to, from },
                Inbound::Drop(why) => Outbound::Drop(why),
            };
        }
        Outbound::Forward { port, to: dst }
    }

    /// Decides about a packet from `from` arriving on public port `port`.
    pub fn inbound(&mut self, now: Instant, port: u16, from: SocketAddr) -> Inbound {
        self.expire(now);
        let remap = self.cfg.unsolicited == Unsolicited::Remap;
        if remap {
            if let Some(last) = self.router_flows.get_mut(&(port, from)) {
                *last = now;
                return Inbound::Drop("router flow");
            }
        }
        let verdict = match self.by_port.get(&port) {
            None => Inbound::Drop("no mapping"),
            Some(e) => {
                let allowed = match self.cfg.filtering {
                    Filtering::EndpointIndependent => true,
                    Filtering::AddressDependent => e.sent_to.iter().any(|s| s.ip() == from.ip()),
                    Filtering::AddressAndPortDependent => e.sent_to.contains(&from),
                };
                if allowed {
                    Inbound::Forward(e.internal)
                } else {
                    Inbound::Drop("filtered")
                }
            }
        };
        if remap && matches!(verdict, Inbound::Drop(_)) && self.router_flows.len() < ROUTER_FLOWS_MAX {
            self.router_flows.insert((port, from), now);
        }
        verdict
    }
}

/// How a NAT is set up on Linux for `harness run --real`: one nftables table in the NAT's
/// namespace plus its conntrack timeouts. Pure text generation; [`crate::real`] applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelNat {
    /// The nftables ruleset (table `ip hz`), for `nft -f -`.
    pub ruleset: String,
    /// `sysctl` settings (`name=value`) for the namespace.
    pub sysctls: Vec<String>,
    /// Where Linux only approximates this configuration (empty when it is exact).
    pub approximations: Vec<&'static str>,
}

/// The addresses a kernel NAT is built around.
#[derive(Debug, Clone)]
pub struct KernelNatAddrs {
    /// Public (outside) address, on interface `out0`.
    pub public_ip: std::net::Ipv4Addr,
    /// The inside LAN (`lan` interface), e.g. `198.19.3.0/24`.
    pub lan: String,
    /// Inside hosts (nodes and NATs behind this one): with `ports = "random"` each gets a
    /// seeded random public port of its own.
    pub inside: Vec<std::net::Ipv4Addr>,
}

/// The kernel setup for `cfg`. `generation` counts flushes and changes: random ports are
/// drawn again for each (a rebinding hands out new ports, as in simulation).
///
/// Mapping: Linux conntrack keeps the inside port whenever the resulting 5-tuple is unique,
/// which is endpoint-independent mapping with port preservation (plain `masquerade`);
/// `random-fully` draws a port per connection (address-and-port-dependent mapping). Filtering:
/// conntrack only admits replies to the exact tuple (address-and-port-dependent); the looser
/// filterings DNAT new inbound UDP through a dynamic map that outbound packets fill and refresh
/// (keyed by public port, or by remote address and public port), with the NAT's timeout.
pub fn kernel_nat(cfg: &NatConfig, a: &KernelNatAddrs, seed: u64, generation: u64) -> KernelNat {
    use std::fmt::Write;
    let t = cfg.timeout.as_secs().max(1);
    let pubip = a.public_ip;
    let mut approx = Vec::new();
    let mut r = String::from("table ip hz {\n");
    let map = |name: &str, key: &str| {
        format!(
            "  map {name} {{ type {key} : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; size 65535; }}\n"
        )
    };
    let eif = cfg.filtering == Filtering::EndpointIndependent || cfg.hairpin;
    let adf = cfg.filtering == Filtering::AddressDependent;
    if eif {
        r += &map("eif", "inet_service");
    }
    if adf {
        r += &map("adf", "ipv4_addr . inet_service");
    }
    // Unsolicited UDP to the router: dropped before conntrack confirms an entry for it, or
    // left to the router's own input, where the entry it leaves makes the next outbound
    // mapping towards that sender take another port.
    r += "  chain input {\n    type filter hook input priority filter; policy accept;\n";
    if cfg.unsolicited == Unsolicited::Drop {
        r += "    iifname \"out0\" meta l4proto udp ct state new drop\n";
    }
    r += "  }\n";
    r += "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n";
    if cfg.filtering == Filtering::EndpointIndependent {
        r += "    iifname \"out0\" meta l4proto udp dnat ip to udp dport map @eif\n";
    }
    if adf {
        r += "    iifname \"out0\" meta l4proto udp dnat ip to ip saddr . udp dport map @adf\n";
    }
    if cfg.hairpin {
        let _ = writeln!(r, "    iifname \"lan\" ip daddr {pubip} meta l4proto udp dnat ip to udp dport map @eif");
        approx.push("hairpinned packets are let in by public port alone, whatever the filtering");
    }
    r += "  }\n";
    r += "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n";
    if cfg.hairpin {
        // (No input interface in postrouting: a DNATed packet from the LAN back to the LAN is
        // the hairpinned one.)
        let _ =
            writeln!(r, "    oifname \"lan\" ip saddr {} ct status dnat meta l4proto udp snat ip to {pubip}", a.lan);
    }
    match (cfg.mapping, cfg.ports) {
        (Mapping::EndpointIndependent, PortAlloc::Preserve) => {}
        (Mapping::EndpointIndependent, PortAlloc::Random) => {
            // One fixed public port per inside host (its one UDP socket): a single-port SNAT
            // range keeps the port for every destination.
            let mut rng = StdRng::seed_from_u64(seed ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut used = std::collections::BTreeSet::new();
            for ip in &a.inside {
                let p = loop {
                    let p: u16 = rng.gen_range(20000..=60000);
                    if used.insert(p) {
                        break p;
                    }
                };
                let _ = writeln!(r, "    oifname \"out0\" ip saddr {ip} meta l4proto udp snat ip to {pubip}:{p}");
            }
            approx.push("random ports are drawn per inside host (each runs one UDP socket), not per socket");
        }
        (m, _) => {
            let _ = writeln!(r, "    oifname \"out0\" meta l4proto udp masquerade fully-random");
            if m == Mapping::AddressDependent {
                approx.push("address-dependent mapping is played as address-and-port-dependent (fully-random): Linux has no per-address mapping");
            }
        }
    }
    r += "    oifname \"out0\" masquerade\n  }\n";
    // Outbound packets fill and refresh the filtering maps: public port (and remote address)
    // to the inside endpoint, whichever direction of its conntrack entry the packet is.
    r += "  chain record {\n    type filter hook postrouting priority srcnat + 1; policy accept;\n";
    for (dir, pubport, inside) in [
        ("original", "ct reply proto-dst", "ct original ip saddr . ct original proto-src"),
        ("reply", "ct original proto-dst", "ct reply ip saddr . ct reply proto-src"),
    ] {
        if eif {
            let _ = writeln!(
                r,
                "    oifname \"out0\" meta l4proto udp ct direction {dir} update @eif {{ {pubport} : {inside} }}"
            );
        }
        if adf {
            let _ = writeln!(
                r,
                "    oifname \"out0\" meta l4proto udp ct direction {dir} update @adf {{ ip daddr . {pubport} : {inside} }}"
            );
        }
    }
    r += "  }\n}\n";
    if cfg.filtering != Filtering::AddressAndPortDependent {
        approx.push(
            "conntrack keeps an admitted flow alive on inbound packets too (the simulation refreshes on outbound only)",
        );
    }
    let sysctls = vec![
        format!("net.netfilter.nf_conntrack_udp_timeout={t}"),
        format!("net.netfilter.nf_conntrack_udp_timeout_stream={t}"),
    ];
    KernelNat { ruleset: r, sysctls, approximations: approx }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn nat(mapping: Mapping, filtering: Filtering) -> Nat {
        let cfg = NatConfig { mapping, filtering, ..Default::default() };
        Nat::new(cfg, "203.0.113.1".parse().unwrap(), 7)
    }

    fn port(o: Outbound) -> u16 {
        match o {
            Outbound::Forward { port, .. } => port,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    #[test]
    fn mapping_behaviours_share_ports_as_specified() {
        let t = Instant::now();
        let src = sa("10.0.0.2:4000");
        let (d1, d2, d3) = (sa("198.51.100.1:1"), sa("198.51.100.1:2"), sa("198.51.100.2:1"));
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let p = port(n.outbound(t, src, d1));
        assert_eq!(p, 4000, "port preserved");
        assert_eq!(port(n.outbound(t, src, d2)), p);
        assert_eq!(port(n.outbound(t, src, d3)), p);

        let mut n = nat(Mapping::AddressDependent, Filtering::EndpointIndependent);
        let p = port(n.outbound(t, src, d1));
        assert_eq!(port(n.outbound(t, src, d2)), p);
        assert_ne!(port(n.outbound(t, src, d3)), p);

        let mut n = nat(Mapping::AddressAndPortDependent, Filtering::EndpointIndependent);
        let p = port(n.outbound(t, src, d1));
        assert_ne!(port(n.outbound(t, src, d2)), p);
        assert_ne!(port(n.outbound(t, src, d3)), p);
        assert_eq!(n.mappings(t), 3);
    }

    #[test]
    fn filtering_behaviours_admit_as_specified() {
        let t = Instant::now();
        let src = sa("10.0.0.2:4000");
        let sent = sa("198.51.100.1:1");
        let same_ip = sa("198.51.100.1:9");
        let other = sa("198.51.100.7:1");
        let cases = [
            (Filtering::EndpointIndependent, [true, true, true]),
            (Filtering::AddressDependent, [true, true, false]),
            (Filtering::AddressAndPortDependent, [true, false, false]),
        ];
        for (f, want) in cases {
            let mut n = nat(Mapping::EndpointIndependent, f);
            let p = port(n.outbound(t, src, sent));
            let got = [sent, same_ip, other].map(|from| n.inbound(t, p, from) == Inbound::Forward(src));
            assert_eq!(got, want, "{f:?}");
        }
    }

    #[test]
    fn unmapped_ports_and_expired_mappings_drop() {
        let t = Instant::now();
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        assert_eq!(n.inbound(t, 4000, sa("198.51.100.1:1")), Inbound::Drop("no mapping"));
        let p = port(n.outbound(t, sa("10.0.0.2:4000"), sa("198.51.100.1:1")));
        let later = t + Duration::from_secs(119);
        assert!(matches!(n.inbound(later, p, sa("198.51.100.1:1")), Inbound::Forward(_)));
        // Inbound traffic does not refresh the mapping.
        assert_eq!(n.inbound(t + Duration::from_secs(121), p, sa("198.51.100.1:1")), Inbound::Drop("no mapping"));
        assert_eq!(n.mappings(t + Duration::from_secs(121)), 0);
    }

    #[test]
    fn outbound_refreshes_the_mapping() {
        let t = Instant::now();
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let (src, dst) = (sa("10.0.0.2:4000"), sa("198.51.100.1:1"));
        let p = port(n.outbound(t, src, dst));
        let p2 = port(n.outbound(t + Duration::from_secs(100), src, dst));
        assert_eq!(p, p2);
        assert!(matches!(n.inbound(t + Duration::from_secs(200), p, dst), Inbound::Forward(_)));
    }

    #[test]
    fn port_preservation_falls_back_when_taken() {
        let t = Instant::now();
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let a = port(n.outbound(t, sa("10.0.0.2:4000"), sa("198.51.100.1:1")));
        let b = port(n.outbound(t, sa("10.0.0.3:4000"), sa("198.51.100.1:1")));
        assert_eq!(a, 4000);
        assert_ne!(b, 4000);
    }

    #[test]
    fn random_ports_are_seeded() {
        let t = Instant::now();
        let cfg = NatConfig { ports: PortAlloc::Random, ..Default::default() };
        let run = |seed| {
            let mut n = Nat::new(cfg.clone(), "203.0.113.1".parse().unwrap(), seed);
            port(n.outbound(t, sa("10.0.0.2:4000"), sa("198.51.100.1:1")))
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), 4000);
    }

    #[test]
    fn hairpinning() {
        let t = Instant::now();
        let (a, b) = (sa("10.0.0.2:4000"), sa("10.0.0.3:5000"));
        for hairpin in [false, true] {
            let cfg = NatConfig { hairpin, filtering: Filtering::EndpointIndependent, ..Default::default() };
            let mut n = Nat::new(cfg, "203.0.113.1".parse().unwrap(), 1);
            let pb = port(n.outbound(t, b, sa("198.51.100.1:3478")));
            let got = n.outbound(t, a, SocketAddr::new(n.public_ip(), pb));
            if hairpin {
                assert_eq!(got, Outbound::Hairpin { to: b, from: sa("203.0.113.1:4000") });
            } else {
                assert_eq!(got, Outbound::Drop("hairpinning disabled"));
            }
        }
    }

    #[test]
    fn unsolicited_remap_moves_the_mapping_towards_an_early_sender() {
        let t = Instant::now();
        let (src, peer, other) = (sa("10.0.0.2:4000"), sa("198.51.100.1:41641"), sa("198.51.100.9:1"));
        for mode in [Unsolicited::Drop, Unsolicited::Remap] {
            let cfg = NatConfig { unsolicited: mode, ..Default::default() };
            let mut n = Nat::new(cfg, "203.0.113.1".parse().unwrap(), 1);
            // The peer's punch arrives before the inside host ever sent to it.
            assert_eq!(n.inbound(t, 4000, peer), Inbound::Drop("no mapping"));
            let to_peer = port(n.outbound(t, src, peer));
            let to_other = port(n.outbound(t, src, other));
            assert_eq!(to_other, 4000, "{mode:?}: other destinations keep the preserved port");
            match mode {
                Unsolicited::Drop => {
                    assert_eq!(to_peer, 4000);
                    assert_eq!(n.inbound(t, 4000, peer), Inbound::Forward(src));
                }
                Unsolicited::Remap => {
                    assert_ne!(to_peer, 4000, "the router's flow holds 4000 towards the peer");
                    assert_eq!(port(n.outbound(t, src, peer)), to_peer, "the remapped port stays");
                    assert_eq!(n.inbound(t, 4000, peer), Inbound::Drop("router flow"));
                    assert_eq!(n.inbound(t, to_peer, peer), Inbound::Forward(src));
                    // Once the router's flow idles out, a new mapping preserves the port again.
                    let later = t + Duration::from_secs(121);
                    assert_eq!(port(n.outbound(later, src, peer)), 4000);
                }
            }
        }
    }

    #[test]
    fn kernel_rulesets_follow_the_configuration() {
        let a = KernelNatAddrs {
            public_ip: "198.18.1.1".parse().unwrap(),
            lan: "198.19.0.0/24".into(),
            inside: vec!["198.19.0.10".parse().unwrap(), "198.19.0.11".parse().unwrap()],
        };
        let k = kernel_nat(&NatConfig::default(), &a, 1, 0);
        assert!(!k.ruleset.contains("map eif") && !k.ruleset.contains("random-fully"), "{}", k.ruleset);
        assert!(k.ruleset.contains("ct state new drop"), "{}", k.ruleset);
        assert!(k.approximations.is_empty());
        assert_eq!(k.sysctls[0], "net.netfilter.nf_conntrack_udp_timeout=120");

        let eif = NatConfig {
            filtering: Filtering::EndpointIndependent,
            unsolicited: Unsolicited::Remap,
            ..Default::default()
        };
        let k = kernel_nat(&eif, &a, 1, 0);
        assert!(k.ruleset.contains("dnat ip to udp dport map @eif"), "{}", k.ruleset);
        assert!(!k.ruleset.contains("ct state new drop"), "{}", k.ruleset);

        let adf = NatConfig { filtering: Filtering::AddressDependent, hairpin: true, ..Default::default() };
        let k = kernel_nat(&adf, &a, 1, 0);
        assert!(k.ruleset.contains("dnat ip to ip saddr . udp dport map @adf"), "{}", k.ruleset);
        assert!(k.ruleset.contains("iifname \"lan\" ip daddr 198.18.1.1"), "{}", k.ruleset);

        let sym = NatConfig { mapping: Mapping::AddressDependent, ..Default::default() };
        let k = kernel_nat(&sym, &a, 1, 0);
        assert!(k.ruleset.contains("masquerade fully-random"), "{}", k.ruleset);
        assert_eq!(k.approximations.len(), 1);

        let rnd = NatConfig { ports: PortAlloc::Random, ..Default::default() };
        let (g0, g1) = (kernel_nat(&rnd, &a, 1, 0).ruleset, kernel_nat(&rnd, &a, 1, 1).ruleset);
        assert!(g0.contains("ip saddr 198.19.0.11 meta l4proto udp snat ip to 198.18.1.1:"), "{g0}");
        assert_eq!(g0, kernel_nat(&rnd, &a, 1, 0).ruleset, "seeded");
        assert_ne!(g0, g1, "a rebinding draws new ports");
    }

    #[test]
    fn reconfigure_drops_mappings() {
        let t = Instant::now();
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let p = port(n.outbound(t, sa("10.0.0.2:4000"), sa("198.51.100.1:1")));
        n.reconfigure(NatConfig { ports: PortAlloc::Random, ..Default::default() });
        assert_eq!(n.inbound(t, p, sa("198.51.100.1:1")), Inbound::Drop("no mapping"));
    }
}
