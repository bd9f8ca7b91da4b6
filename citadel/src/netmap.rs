//! The node's view of its network, built from the map stream: self, peers, DERP map, packet
//! filter and the org it belongs to. Applying a [`MapResponse`] is a pure function.

use crate::tailcfg::{DerpMap, FilterRule, MapResponse, Node, UserProfile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The current network map.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetMap {
    /// This node as the server sees it.
    pub self_node: Node,
    /// Peers by node ID.
    pub peers: BTreeMap<i64, Node>,
    /// DERP regions.
    pub derp_map: DerpMap,
    /// Inbound packet filter.
    pub packet_filter: Vec<FilterRule>,
    /// Known users (orgs) by ID.
    pub users: BTreeMap<i64, UserProfile>,
    /// Tailnet domain.
    pub domain: String,
}

impl NetMap {
    /// Applies one map message; returns true when something a user could see changed.
    pub fn apply(&mut self, r: &MapResponse) -> bool {
        let before = self.clone();
        if let Some(n) = &r.node {
            self.self_node = n.clone();
        }
        if let Some(d) = &r.derp_map {
            self.derp_map = d.clone();
        }
        if let Some(f) = &r.packet_filter {
            self.packet_filter = f.clone();
        }
        for u in &r.user_profiles {
            self.users.insert(u.id, u.clone());
        }
        if !r.domain.is_empty() {
            self.domain = r.domain.clone();
        }
        if let Some(peers) = &r.peers {
            self.peers = peers.iter().map(|p| (p.id, p.clone())).collect();
        }
        for p in r.peers_changed.iter().flatten() {
            self.peers.insert(p.id, p.clone());
        }
        for id in r.peers_removed.iter().flatten() {
            self.peers.remove(id);
        }
        for c in r.peers_changed_patch.iter().flatten() {
            if let Some(p) = self.peers.get_mut(&c.node_id) {
                if let Some(r) = c.derp_region {
                    p.home_derp = r;
                }
                if let Some(e) = &c.endpoints {
                    p.endpoints = e.clone();
                }
                if let Some(k) = c.key {
                    p.key = k;
                }
                if let Some(k) = c.disco_key {
                    p.disco_key = k;
                }
                if let Some(o) = c.online {
                    p.online = Some(o);
                }
                if let Some(k) = c.key_expiry {
                    p.key_expiry = Some(k);
                }
            }
        }
        for (id, online) in r.online_change.iter().flatten() {
            if let Some(p) = self.peers.get_mut(id) {
                p.online = Some(*online);
            }
        }
        *self != before
    }

    /// The org (user) name this node belongs to.
    pub fn org(&self) -> String {
        self.users.get(&self.self_node.user).map(|u| u.login_name.clone()).unwrap_or_default()
    }

    /// The node's first IPv4 mesh address, without prefix length.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.self_node.addresses.iter().find_map(|a| a.split('/').next()?.parse().ok())
    }

    /// The node's first IPv6 mesh address.
    pub fn ipv6(&self) -> Option<std::net::Ipv6Addr> {
        self.self_node.addresses.iter().find_map(|a| a.split('/').next()?.parse().ok())
    }
}

/// The short host name of a node (first label of its FQDN).
pub fn short_name(n: &Node) -> String {
    let name = n.name.split('.').next().unwrap_or_default();
    if name.is_empty() {
        n.hostinfo.hostname.clone()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tailcfg::PeerChange;

    fn node(id: i64) -> Node {
        Node { id, name: format!("n{id}.mesh."), ..Default::default() }
    }

    #[test]
    fn full_then_delta_updates() {
        let mut m = NetMap::default();
        assert!(m.apply(&MapResponse {
            node: Some(node(1)),
            peers: Some(vec![node(2), node(3)]),
            ..Default::default()
        }));
        assert_eq!(m.peers.len(), 2);
        assert!(m.apply(&MapResponse {
            peers_removed: Some(vec![2]),
            peers_changed: Some(vec![node(4)]),
            ..Default::default()
        }));
        assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
        m.apply(&MapResponse {
            peers_changed_patch: Some(vec![PeerChange { node_id: 3, online: Some(true), ..Default::default() }]),
            ..Default::default()
        });
        assert_eq!(m.peers[&3].online, Some(true));
        assert!(!m.apply(&MapResponse { keep_alive: true, ..Default::default() }));
        assert!(m.apply(&MapResponse { peers: Some(vec![]), ..Default::default() }));
        assert!(m.peers.is_empty());
    }
}
