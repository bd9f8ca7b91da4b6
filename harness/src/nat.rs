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
    rng: StdRng,
    next_port: u16,
}

/// Lowest port handed out.
const PORT_MIN: u16 = 1024;

impl Nat {
    /// A NAT with an empty table; `seed` drives random port allocation.
    pub fn new(cfg: NatConfig, public_ip: IpAddr, seed: u64) -> Self {
        Nat { cfg, public_ip, by_port: BTreeMap::new(), rng: StdRng::seed_from_u64(seed), next_port: 30000 }
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
    }

    /// Forgets every mapping (a NAT reboot or a carrier-side rebinding).
    pub fn flush(&mut self) {
        self.by_port.clear();
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
    }

    fn alloc_port(&mut self, internal: SocketAddr) -> Option<u16> {
        let free = |p: u16, m: &BTreeMap<u16, Entry>| p >= PORT_MIN && !m.contains_key(&p);
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
        let key = self.key_for(dst);
        let existing = self.by_port.iter().find(|(_, e)| e.internal == src && e.key == key).map(|(p, _)| *p);
        let port = match existing {
            Some(p) => p,
            None => {
                let Some(p) = self.alloc_port(src) else {
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
        let Some(e) = self.by_port.get(&port) else {
            return Inbound::Drop("no mapping");
        };
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
    fn reconfigure_drops_mappings() {
        let t = Instant::now();
        let mut n = nat(Mapping::EndpointIndependent, Filtering::EndpointIndependent);
        let p = port(n.outbound(t, sa("10.0.0.2:4000"), sa("198.51.100.1:1")));
        n.reconfigure(NatConfig { ports: PortAlloc::Random, ..Default::default() });
        assert_eq!(n.inbound(t, p, sa("198.51.100.1:1")), Inbound::Drop("no mapping"));
    }
}
