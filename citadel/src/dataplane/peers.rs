//! The data plane's view of the netmap's peers, and the diff between two such views, so a
//! netmap update touches only the tunnels that changed (a tunnel rebuilt needlessly would
//! drop its session and force a new handshake).

use super::filter::parse_prefix;
use crate::keys::{DiscoPublic, NodePublic};
use crate::netmap::NetMap;
use ip_network::IpNetwork;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What the data plane needs to know about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerConfig {
    /// The peer's WireGuard static key (its node key).
    pub key: NodePublic,
    /// Prefixes routed to this peer, and the only source addresses accepted from it.
    pub allowed_ips: Vec<IpNetwork>,
    /// Direct UDP endpoint candidates the peer reported.
    pub endpoints: Vec<SocketAddr>,
    /// Home DERP region (0 = none): where to relay to it.
    pub home_derp: i32,
    /// Disco key (zero for plain WireGuard peers, which get no path discovery).
    pub disco: DiscoPublic,
}

/// One change to apply to the tunnel set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerChange {
    /// A new peer: create its tunnel.
    Add(PeerConfig),
    /// Same key, different routes or endpoints: keep the tunnel, update the rest.
    Update(PeerConfig),
    /// The peer is gone: drop its tunnel.
    Remove(NodePublic),
}

/// The peers the data plane should have for this netmap, keyed by node key. Peers without a
/// key, with an expired key, or with this node's own key are left out; unparseable
/// addresses are skipped.
pub(crate) fn desired_peers(nm: &NetMap) -> BTreeMap<NodePublic, PeerConfig> {
    let mut out = BTreeMap::new();
    for n in nm.peers.values() {
        if n.key.is_zero() || n.expired || n.key == nm.self_node.key {
            continue;
        }
        let allowed_ips: Vec<IpNetwork> = n.allowed_ips.iter().filter_map(|s| parse_prefix(s)).collect();
        let mut endpoints: Vec<SocketAddr> = n.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
        endpoints.dedup();
        let cfg = PeerConfig { key: n.key, allowed_ips, endpoints, home_derp: n.home_region(), disco: n.disco_key };
        if out.insert(n.key, cfg).is_some() {
            tracing::warn!(peer = %n.key.short(), "netmap lists the same node key twice; keeping the last");
        }
    }
    out
}

/// The changes that turn `current` into `desired`, removals first (so a prefix moving from one
/// peer to another is never routed to both).
pub(crate) fn diff(
    current: &BTreeMap<NodePublic, PeerConfig>,
    desired: &BTreeMap<NodePublic, PeerConfig>,
) -> Vec<PeerChange> {
    let mut out: Vec<PeerChange> =
        current.keys().filter(|k| !desired.contains_key(k)).map(|k| PeerChange::Remove(*k)).collect();
    for (k, want) in desired {
        match current.get(k) {
            None => out.push(PeerChange::Add(want.clone())),
            Some(have) if have != want => out.push(PeerChange::Update(want.clone())),
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::Node;

    fn node(id: i64, key: u8, ip: &str, ep: &str) -> Node {
        Node {
            id,
            key: NodePublic([key; 32]),
            allowed_ips: vec![format!("{ip}/32"), "garbage".into()],
            endpoints: vec![ep.to_string(), "not-an-endpoint".into()],
            ..Default::default()
        }
    }

    #[test]
    fn desired_skips_bad_peers_and_parses() {
        let mut nm = NetMap::default();
        nm.self_node.key = NodePublic([1; 32]);
        nm.peers.insert(2, node(2, 2, "100.64.0.2", "127.0.0.1:1000"));
        nm.peers.insert(3, node(3, 1, "100.64.0.3", "127.0.0.1:1001")); // our own key
        nm.peers.insert(4, Node { expired: true, ..node(4, 4, "100.64.0.4", "127.0.0.1:1002") });
        nm.peers.insert(5, node(5, 0, "100.64.0.5", "127.0.0.1:1003")); // zero key
        let d = desired_peers(&nm);
        assert_eq!(d.len(), 1);
        let p = &d[&NodePublic([2; 32])];
        assert_eq!(p.allowed_ips, vec![parse_prefix("100.64.0.2/32").unwrap()]);
        assert_eq!(p.endpoints, vec!["127.0.0.1:1000".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn diff_adds_updates_removes() {
        let mut nm = NetMap::default();
        nm.peers.insert(2, node(2, 2, "100.64.0.2", "127.0.0.1:1000"));
        nm.peers.insert(3, node(3, 3, "100.64.0.3", "127.0.0.1:1001"));
        let a = desired_peers(&nm);
        assert_eq!(diff(&BTreeMap::new(), &a).len(), 2);
        assert!(diff(&a, &a).is_empty());

        nm.peers.remove(&2);
        nm.peers.get_mut(&3).unwrap().endpoints = vec!["127.0.0.1:2000".into()];
        nm.peers.insert(4, node(4, 4, "100.64.0.4", "127.0.0.1:1002"));
        let b = desired_peers(&nm);
        let changes = diff(&a, &b);
        assert_eq!(changes[0], PeerChange::Remove(NodePublic([2; 32])));
        assert!(matches!(&changes[1], PeerChange::Update(p) if p.key == NodePublic([3; 32])));
        assert!(matches!(&changes[2], PeerChange::Add(p) if p.key == NodePublic([4; 32])));
    }
}
