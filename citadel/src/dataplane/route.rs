//! Routing by AllowedIPs: the peer whose longest prefix contains an address. Used both ways —
//! outbound to pick the tunnel for a destination, inbound to check that a decrypted packet's
//! source belongs to the peer that sent it (WireGuard's cryptokey routing).

use super::peers::PeerConfig;
use crate::keys::NodePublic;
use ip_network_table::IpNetworkTable;
use std::cell::Cell;
use std::net::IpAddr;

/// Longest-prefix-match table from AllowedIPs to peers.
pub(crate) struct RouteTable {
    table: IpNetworkTable<NodePublic>,
    /// The last two answers: bulk traffic asks for the same peer address per packet (its
    /// destination outbound, its source inbound), and the tree walk showed in profiles.
    recent: [Cell<Option<(IpAddr, Option<NodePublic>)>>; 2],
    /// The slot the next miss replaces.
    next: Cell<usize>,
    /// Two peers claimed one prefix when the table was built: which keeps it depends on all
    /// the peers, so changes go through [`RouteTable::build`] until a build finds no clash.
    contested: bool,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.table.iter().map(|(n, k)| (n.to_string(), k.short()))).finish()
    }
}

impl RouteTable {
    /// Builds the table from the peers' AllowedIPs. When two peers claim the same prefix the
    /// first (in key order) keeps it, so the outcome does not depend on map iteration order.
    pub(crate) fn build<'a>(peers: impl IntoIterator<Item = &'a PeerConfig>) -> RouteTable {
        let mut table: IpNetworkTable<NodePublic> = IpNetworkTable::new();
        let mut contested = false;
        for p in peers {
            for net in &p.allowed_ips {
                if let Some(other) = table.exact_match(*net) {
                    if *other != p.key {
                        contested = true;
                        tracing::warn!(%net, kept = %other.short(), ignored = %p.key.short(), "two peers claim one prefix");
                    }
                    continue;
                }
                table.insert(*net, p.key);
            }
        }
        RouteTable { table, recent: Default::default(), next: Cell::new(0), contested }
    }

    /// Drops the prefixes `p` holds, for a peer removed or about to get other AllowedIPs;
    /// false (the table unchanged) when only a build can tell who holds what.
    pub(crate) fn remove_peer(&mut self, p: &PeerConfig) -> bool {
        if self.contested {
            return false;
        }
        for net in &p.allowed_ips {
            if self.table.exact_match(*net) == Some(&p.key) {
                self.table.remove(*net);
            }
        }
        self.forget();
        true
    }

    /// Adds `p`'s prefixes; false when one of them is another peer's (the caller builds the
    /// table again, which decides the clash as every build does). A peer's prefixes are
    /// either all added or none.
    pub(crate) fn add_peer(&mut self, p: &PeerConfig) -> bool {
        if self.contested || p.allowed_ips.iter().any(|n| self.table.exact_match(*n).is_some_and(|k| *k != p.key)) {
            return false;
        }
        for net in &p.allowed_ips {
            self.table.insert(*net, p.key);
        }
        self.forget();
        true
    }

    /// Clears the recent answers after a change.
    fn forget(&self) {
        for slot in &self.recent {
            slot.set(None);
        }
    }

    /// The peer that `ip` routes to.
    pub(crate) fn lookup(&self, ip: IpAddr) -> Option<NodePublic> {
        for slot in &self.recent {
            if let Some((at, k)) = slot.get() {
                if at == ip {
                    return k;
                }
            }
        }
        let k = self.table.longest_match(ip).map(|(_, k)| *k);
        let i = self.next.get();
        self.recent[i].set(Some((ip, k)));
        self.next.set((i + 1) % self.recent.len());
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::filter::parse_prefix;

    fn peer(k: u8, nets: &[&str]) -> PeerConfig {
        PeerConfig {
            key: NodePublic([k; 32]),
            allowed_ips: nets.iter().map(|n| parse_prefix(n).unwrap()).collect(),
            endpoints: vec![],
            home_derp: 0,
            disco: crate::keys::DiscoPublic([0; 32]),
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let peers = [
            peer(1, &["100.64.0.0/10", "fd7a:115c:a1e0::/48"]),
            peer(2, &["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]),
            peer(3, &["100.64.0.2/32"]),
        ];
        let t = RouteTable::build(peers.iter());
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(NodePublic([2; 32])));
        assert_eq!(t.lookup("100.64.9.9".parse().unwrap()), Some(NodePublic([1; 32])));
        assert_eq!(t.lookup("fd7a:115c:a1e0::2".parse().unwrap()), Some(NodePublic([2; 32])));
        assert_eq!(t.lookup("fd7a:115c:a1e0::3".parse().unwrap()), Some(NodePublic([1; 32])));
        assert_eq!(t.lookup("10.0.0.1".parse().unwrap()), None);
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
    }
}
