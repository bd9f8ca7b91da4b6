//! Network check, sans-IO: STUN binding requests to the DERP map's STUN servers from the node's
//! one UDP socket, to learn whether UDP works, the public (NAT-mapped) endpoint(s), whether the
//! NAT maps differently per destination (a "hard" NAT, where hole punching rarely works), and
//! the round trip to each region, from which the home DERP region is picked.
//!
//! [`Probe`] takes packets and the time and returns datagrams to send; the data plane's driver
//! (or `citadel netcheck`) owns the socket.

use crate::stun::{self, TxId};
use crate::tailcfg::DerpMap;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Default STUN port when a DERP node says 0.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// Requests are re-sent to silent servers at these offsets from the start (UDP may drop).
const RETRIES: [Duration; 3] = [Duration::ZERO, Duration::from_millis(250), Duration::from_millis(700)];
/// A probe gives up on silent servers after this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A new home region must be this much faster (ratio) than the current one to replace it, so
/// the home does not flap between regions of similar latency (Tailscale uses a similar rule).
const HOME_SWITCH_RATIO: f64 = 2.0 / 3.0;

/// One STUN server of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StunTarget {
    /// DERP region (0: an extra server).
    pub region: i32,
    /// STUN server address.
    pub addr: SocketAddr,
}

fn stun_port(n: &crate::tailcfg::DerpNode) -> Option<u16> {
    match n.stun_port {
        p if p < 0 => None,
        0 => Some(DEFAULT_STUN_PORT),
        p => u16::try_from(p).ok().filter(|p| *p != 0),
    }
}

fn literal_ip(n: &crate::tailcfg::DerpNode) -> Option<IpAddr> {
    [&n.ipv4, &n.ipv6, &n.host_name]
        .into_iter()
        .filter(|s| !s.is_empty() && s.as_str() != "none")
        .find_map(|s| s.parse::<IpAddr>().ok())
}

/// The STUN servers of a DERP map: per region, each node with STUN enabled (port ≥ 0) and a
/// literal address (`IPv4`, else `IPv6`, else an IP-literal `HostName`). Names are not
/// resolved here, so the probe never blocks on DNS; see [`stun_targets_with`].
pub fn stun_targets(map: &DerpMap) -> Vec<StunTarget> {
    stun_targets_with(map, &HashMap::new())
}

/// Like [`stun_targets`], plus nodes known only by a `HostName` that `resolved` has an
/// address for (from [`resolve_hosts`] over [`stun_hostnames`]).
pub fn stun_targets_with(map: &DerpMap, resolved: &HashMap<String, IpAddr>) -> Vec<StunTarget> {
    let mut out = Vec::new();
    for (id, region) in &map.regions {
        for n in &region.nodes {
            let Some(port) = stun_port(n) else { continue };
            if let Some(ip) = literal_ip(n).or_else(|| resolved.get(&n.host_name).copied()) {
                let t = StunTarget { region: *id, addr: SocketAddr::new(ip, port) };
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// Host names of the STUN servers that have no literal address (to resolve before probing).
pub fn stun_hostnames(map: &DerpMap) -> Vec<String> {
    let mut out: Vec<String> = map
        .regions
        .values()
        .flat_map(|r| &r.nodes)
        .filter(|n| stun_port(n).is_some() && literal_ip(n).is_none() && !n.host_name.is_empty())
        .map(|n| n.host_name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Resolves `names` (IPv4 preferred, as the node's socket is usually IPv4), each bounded by
/// `timeout`; names that fail are left out.
pub async fn resolve_hosts(names: Vec<String>, timeout: Duration) -> HashMap<String, IpAddr> {
    let mut out = HashMap::new();
    for name in names {
        let Ok(Ok(addrs)) = tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), 0))).await else {
            tracing::debug!(host = %name, "STUN host name did not resolve");
            continue;
        };
        let addrs: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
        if let Some(ip) = addrs.iter().find(|i| i.is_ipv4()).or(addrs.first()) {
            out.insert(name, *ip);
        }
    }
    out
}

/// What a probe learned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Some STUN server answered over UDP.
    pub udp: bool,
    /// Public endpoints the servers saw, deduplicated, most common first.
    pub mapped: Vec<SocketAddr>,
    /// True when two different servers saw different mappings (endpoint-dependent NAT);
    /// `None` with fewer than two distinct servers answering.
    pub mapping_varies_by_dest: Option<bool>,
    /// Best STUN round trip per region that answered.
    #[serde(serialize_with = "ser_latencies")]
    pub region_latency: BTreeMap<i32, Duration>,
}

fn ser_latencies<S: serde::Serializer>(m: &BTreeMap<i32, Duration>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        map.serialize_entry(&k.to_string(), &(v.as_secs_f64() * 1e3))?;
    }
    map.end()
}

impl Report {
    /// The fastest region, ties to the lower id.
    pub fn fastest_region(&self) -> Option<i32> {
        self.region_latency.iter().map(|(r, l)| (*l, *r)).min().map(|(_, r)| r)
    }

    /// The home region given the current one: the fastest, unless the current one answered
    /// and the fastest is not clearly better.
    pub fn preferred_region(&self, current: i32) -> Option<i32> {
        let best = self.fastest_region()?;
        if let (Some(cur), Some(new)) = (self.region_latency.get(&current), self.region_latency.get(&best)) {
            if new.as_secs_f64() > cur.as_secs_f64() * HOME_SWITCH_RATIO {
                return Some(current);
            }
        }
        Some(best)
    }
}

#[derive(Debug, Clone)]
struct Server {
    addr: SocketAddr,
    regions: Vec<i32>,
    answer: Option<(Duration, SocketAddr)>,
}

/// One round of STUN probes.
#[derive(Debug, Clone)]
pub struct Probe {
    started: Instant,
    servers: Vec<Server>,
    /// tx id → (server index, sent at).
    pending: HashMap<TxId, (usize, Instant)>,
    sent_rounds: usize,
}

impl Probe {
    /// A probe of `targets`, starting at `now`. Targets sharing an address are asked once.
    pub fn new(targets: &[StunTarget], now: Instant) -> Self {
        let mut servers: Vec<Server> = Vec::new();
        for t in targets {
            match servers.iter_mut().find(|s| s.addr == t.addr) {
                Some(s) => {
                    if !s.regions.contains(&t.region) {
                        s.regions.push(t.region)
                    }
                }
                None => servers.push(Server { addr: t.addr, regions: vec![t.region], answer: None }),
            }
        }
        Probe { started: now, servers, pending: HashMap::new(), sent_rounds: 0 }
    }

    /// Datagrams due now: the first request to every server, then retries to silent ones.
    pub fn poll(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        while self.sent_rounds < RETRIES.len()
            && now.saturating_duration_since(self.started) >= RETRIES[self.sent_rounds]
        {
            self.sent_rounds += 1;
            for (i, s) in self.servers.iter().enumerate() {
                if s.answer.is_some() {
                    continue;
                }
                let tx: TxId = rand::random();
                self.pending.insert(tx, (i, now));
                out.push((s.addr, stun::request(tx)));
            }
        }
        out
    }

    /// When to call [`Probe::poll`] next.
    pub fn next_deadline(&self) -> Instant {
        match RETRIES.get(self.sent_rounds) {
            Some(d) => self.started + *d,
            None => self.started + PROBE_TIMEOUT,
        }
    }

    /// A STUN packet from `from`. Returns false when it answers none of our requests (a
    /// response from an address we did not ask, an unknown tx id, or garbage).
    pub fn on_packet(&mut self, from: SocketAddr, data: &[u8], now: Instant) -> bool {
        let Ok((tx, mapped)) = stun::parse_response(data) else { return false };
        let Some((i, sent)) = self.pending.get(&tx).copied() else { return false };
        let s = &mut self.servers[i];
        if canonical(s.addr) != canonical(from) {
            return false;
        }
        self.pending.remove(&tx);
        let rtt = now.saturating_duration_since(sent);
        if s.answer.is_none_or(|(best, _)| rtt < best) {
            s.answer = Some((rtt, canonical(mapped)));
        }
        true
    }

    /// Every server answered, or the time is up.
    pub fn done(&self, now: Instant) -> bool {
        self.servers.iter().all(|s| s.answer.is_some()) || now.saturating_duration_since(self.started) >= PROBE_TIMEOUT
    }

    /// What was learned so far.
    pub fn report(&self) -> Report {
        let mut r = Report::default();
        let mut counts: Vec<(SocketAddr, usize)> = Vec::new();
        for s in &self.servers {
            let Some((rtt, mapped)) = s.answer else { continue };
            r.udp = true;
            for reg in &s.regions {
                let e = r.region_latency.entry(*reg).or_insert(rtt);
                *e = (*e).min(rtt);
            }
            match counts.iter_mut().find(|(a, _)| *a == mapped) {
                Some((_, n)) => *n += 1,
                None => counts.push((mapped, 1)),
            }
        }
        let answered = self.servers.iter().filter(|s| s.answer.is_some()).count();
        if answered >= 2 {
            r.mapping_varies_by_dest = Some(counts.len() > 1);
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        r.mapped = counts.into_iter().map(|(a, _)| a).collect();
        r
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::{DerpNode, DerpRegion};

    fn map() -> DerpMap {
        let node = |r: i32, ip: &str, port: i32| DerpNode {
            name: format!("{r}a"),
            region_id: r,
            host_name: "derp.example".into(),
            ipv4: ip.into(),
            stun_port: port,
            ..Default::default()
        };
        let mut m = DerpMap::default();
        for (r, ip, port) in [(1, "192.0.2.1", 3478), (2, "192.0.2.2", 0), (3, "192.0.2.3", -1), (4, "", 3478)] {
            m.regions.insert(r, DerpRegion { region_id: r, nodes: vec![node(r, ip, port)], ..Default::default() });
        }
        m
    }

    #[tokio::test]
    async fn stun_host_names_are_resolved_when_asked() {
        let mut m = map();
        let names = stun_hostnames(&m);
        assert_eq!(names, vec!["derp.example".to_string()], "only region 4 lacks a literal");
        m.regions.get_mut(&4).unwrap().nodes[0].host_name = "localhost".into();
        let resolved = resolve_hosts(stun_hostnames(&m), Duration::from_secs(5)).await;
        let t = stun_targets_with(&m, &resolved);
        assert!(t.iter().any(|t| t.region == 4 && t.addr.ip().is_loopback() && t.addr.port() == 3478), "{t:?}");
        assert_eq!(stun_targets(&m).len(), 2);
    }

    #[test]
    fn targets_from_the_derp_map() {
        let t = stun_targets(&map());
        let got: Vec<(i32, String)> = t.iter().map(|t| (t.region, t.addr.to_string())).collect();
        assert_eq!(got, vec![(1, "192.0.2.1:3478".into()), (2, "192.0.2.2:3478".into())]);
    }

    #[test]
    fn probe_retries_measures_and_detects_varying_mappings() {
        let t0 = crate::clock::now();
        let mut p = Probe::new(&stun_targets(&map()), t0);
        let first = p.poll(t0);
        assert_eq!(first.len(), 2);
        assert!(p.poll(t0).is_empty());
        // Server 1 answers after 20 ms; an answer from the wrong address or garbage is ignored.
        let tx1 = stun::tx_id(&first[0].1).unwrap();
        let mapped1: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        assert!(!p.on_packet("192.0.2.9:3478".parse().unwrap(), &stun::response(tx1, mapped1), t0));
        assert!(!p.on_packet(first[0].0, b"garbage", t0));
        assert!(p.on_packet(first[0].0, &stun::response(tx1, mapped1), t0 + Duration::from_millis(20)));
        assert!(!p.done(t0 + Duration::from_millis(20)));
        // Only the silent server is asked again.
        let retry = p.poll(t0 + Duration::from_millis(300));
        assert_eq!(retry.iter().map(|r| r.0).collect::<Vec<_>>(), vec![first[1].0]);
        let tx2 = stun::tx_id(&retry[0].1).unwrap();
        let mapped2: SocketAddr = "203.0.113.7:40001".parse().unwrap();
        assert!(p.on_packet(retry[0].0, &stun::response(tx2, mapped2), t0 + Duration::from_millis(310)));
        assert!(p.done(t0 + Duration::from_millis(310)));
        let r = p.report();
        assert!(r.udp);
        assert_eq!(r.mapping_varies_by_dest, Some(true));
        assert_eq!(r.region_latency[&1], Duration::from_millis(20));
        assert_eq!(r.region_latency[&2], Duration::from_millis(10));
        assert_eq!(r.fastest_region(), Some(2));
        // 10 ms is not 2/3 of 20 ms better... it is: switch.
        assert_eq!(r.preferred_region(1), Some(2));
    }

    #[test]
    fn silence_means_no_udp_and_home_is_sticky() {
        let t0 = crate::clock::now();
        let mut p = Probe::new(&stun_targets(&map()), t0);
        let _ = p.poll(t0);
        assert!(p.done(t0 + PROBE_TIMEOUT));
        let r = p.report();
        assert!(!r.udp && r.mapped.is_empty() && r.mapping_varies_by_dest.is_none());
        assert_eq!(r.preferred_region(1), None);

        let mut r = Report::default();
        r.region_latency.insert(1, Duration::from_millis(10));
        r.region_latency.insert(2, Duration::from_millis(9));
        assert_eq!(r.preferred_region(1), Some(1), "9 ms is not clearly better than 10 ms");
        assert_eq!(r.preferred_region(0), Some(2));
    }
}
