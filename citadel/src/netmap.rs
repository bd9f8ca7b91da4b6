//! The node's view of its network, built from the map stream: self, peers, DERP map, packet
//! filter and the org it belongs to. Applying a [`MapResponse`] is a pure function.

use crate::tailcfg::{DerpMap, FilterRule, MapResponse, Node, UserProfile};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// What [`NetMap::apply`] changed, for readers that follow the map in steps (the data
    /// plane, which would otherwise rebuild every peer on every change). Bookkeeping, not map
    /// content: not serialized, ignored by `==`, and a clone starts a log of its own. Code that
    /// changes `peers`, `self_node` or `packet_filter` in a watched map other than
    /// through `apply` or [`NetMap::clear_peers`] must call [`ChangeLog::touch_all`].
    #[serde(skip)]
    pub changes: ChangeLog,
}

/// The part of a map one change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Peer(i64),
    SelfNode,
    Filter,
    /// The peer list was replaced, or the map changed in ways the log did not record.
    All,
}

/// Changes kept: a reader further behind rebuilds from the whole map.
const LOG_LEN: usize = 1024;

/// Numbers the logs: a reader's cursor from another log (another map, a copy, a map read
/// from disk) never matches.
static LINEAGE: AtomicU64 = AtomicU64::new(1);

/// The change log of a [`NetMap`] (see [`NetMap::changes`]): numbered changes, the latest
/// [`LOG_LEN`] kept.
pub struct ChangeLog {
    lineage: u64,
    seq: u64,
    log: VecDeque<(u64, Part)>,
}

impl ChangeLog {
    fn note(&mut self, part: Part) {
        self.seq += 1;
        if self.log.len() == LOG_LEN {
            self.log.pop_front();
        }
        self.log.push_back((self.seq, part));
    }

    /// Records that the map changed in ways not logged part by part: every reader takes the
    /// whole map at its next look.
    pub fn touch_all(&mut self) {
        self.note(Part::All);
    }
}

impl Default for ChangeLog {
    fn default() -> Self {
        ChangeLog { lineage: LINEAGE.fetch_add(1, Ordering::Relaxed), seq: 0, log: VecDeque::new() }
    }
}

/// A copy is a map of its own: its readers start from the whole of it.
impl Clone for ChangeLog {
    fn clone(&self) -> Self {
        ChangeLog::default()
    }
}

/// Not map content: two maps with the same content are equal whatever their logs.
impl PartialEq for ChangeLog {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the lineage: it comes from a process-wide counter, and a simulation's log must
        // not depend on what else the process made.
        write!(f, "ChangeLog({} changes)", self.seq)
    }
}

/// Where a reader of a map's [`ChangeLog`] stands (see [`NetMap::changes_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    lineage: u64,
    seq: u64,
}

/// What changed in a map since a [`Cursor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Take the whole map: another map, a reader too far behind, or a peer list replaced.
    Everything,
    /// Only these parts changed (all empty or false: nothing among them; the DERP map, users
    /// and domain are not logged, and a reader of them compares them itself).
    Parts {
        /// Peers (by node ID) added, removed or changed.
        peers: BTreeSet<i64>,
        /// This node's own entry.
        self_node: bool,
        /// The packet filter.
        filter: bool,
    },
}

impl NetMap {
    /// Applies one map message; returns true when something a user could see changed. Each
    /// part is compared where it is applied, so a delta costs what it names, not the whole map
    /// (a copy of the map to compare against cost a client of a 1,000-peer org about 1 ms per
    /// delta, and every member applies every delta). A message that changes a value and sets it
    /// back within itself counts as a change.
    pub fn apply(&mut self, r: &MapResponse) -> bool {
        let mut changed = false;
        if let Some(n) = &r.node {
            if set(&mut self.self_node, n) {
                self.changes.note(Part::SelfNode);
                changed = true;
            }
        }
        if let Some(d) = &r.derp_map {
            // Not logged: its one reader compares the map with its own copy.
            changed |= set(&mut self.derp_map, d);
        }
        if let Some(f) = &r.packet_filter {
            if set(&mut self.packet_filter, f) {
                self.changes.note(Part::Filter);
                changed = true;
            }
        }
        for u in &r.user_profiles {
            match self.users.get_mut(&u.id) {
                Some(old) => changed |= set(old, u),
                None => {
                    self.users.insert(u.id, u.clone());
                    changed = true;
                }
            }
        }
        if !r.domain.is_empty() {
            changed |= set(&mut self.domain, &r.domain);
        }
        // As Tailscale's client: a full peer list replaces the peers and precludes deltas;
        // otherwise removals, then changed entries, then online changes, then patches.
        // Removals and patches of peers this node does not know are ignored.
        if let Some(peers) = &r.peers {
            let peers: BTreeMap<i64, Node> = peers.iter().map(|p| (p.id, p.clone())).collect();
            if peers != self.peers {
                self.peers = peers;
                self.changes.note(Part::All);
                changed = true;
            }
            return changed;
        }
        for id in r.peers_removed.iter().flatten() {
            if self.peers.remove(id).is_some() {
                self.changes.note(Part::Peer(*id));
                changed = true;
            }
        }
        for p in r.peers_changed.iter().flatten() {
            let new = match self.peers.get_mut(&p.id) {
                Some(old) => set(old, p),
                None => {
                    self.peers.insert(p.id, p.clone());
                    true
                }
            };
            if new {
                self.changes.note(Part::Peer(p.id));
                changed = true;
            }
        }
        for (id, online) in r.online_change.iter().flatten() {
            if let Some(p) = self.peers.get_mut(id) {
                if set(&mut p.online, &Some(*online)) {
                    self.changes.note(Part::Peer(*id));
                    changed = true;
                }
            }
        }
        for c in r.peers_changed_patch.iter().flatten() {
            let Some(p) = self.peers.get_mut(&c.node_id) else { continue };
            let mut patched = false;
            if let Some(r) = c.derp_region {
                patched |= set(&mut p.home_derp, &r);
                patched |= set(&mut p.derp, &if r > 0 { format!("127.3.3.40:{r}") } else { String::new() });
            }
            if let Some(e) = &c.endpoints {
                patched |= set(&mut p.endpoints, e);
            }
            if let Some(k) = &c.key {
                patched |= set(&mut p.key, k);
            }
            if let Some(k) = &c.disco_key {
                patched |= set(&mut p.disco_key, k);
            }
            if let Some(o) = c.online {
                patched |= set(&mut p.online, &Some(o));
            }
            if let Some(k) = c.key_expiry {
                patched |= set(&mut p.key_expiry, &Some(k));
            }
            if let Some(t) = c.last_seen {
                patched |= set(&mut p.last_seen, &Some(t));
            }
            if patched {
                self.changes.note(Part::Peer(c.node_id));
                changed = true;
            }
        }
        changed
    }

    /// Drops every peer (a node that starts from its cached map before the first fresh one).
    pub fn clear_peers(&mut self) {
        if !self.peers.is_empty() {
            self.peers.clear();
            self.changes.note(Part::All);
        }
    }

    /// Where this map's change log stands now.
    pub fn cursor(&self) -> Cursor {
        Cursor { lineage: self.changes.lineage, seq: self.changes.seq }
    }

    /// What changed since `at` (a cursor from this map's [`NetMap::cursor`]); from another
    /// map's cursor, or one further behind than the log reaches, [`Changes::Everything`].
    pub fn changes_since(&self, at: &Cursor) -> Changes {
        let log = &self.changes;
        let oldest = log.log.front().map_or(log.seq + 1, |(seq, _)| *seq);
        if at.lineage != log.lineage || at.seq > log.seq || at.seq + 1 < oldest {
            return Changes::Everything;
        }
        let (mut peers, mut self_node, mut filter) = (BTreeSet::new(), false, false);
        let skip = log.log.len() - (log.seq - at.seq) as usize;
        for (_, part) in log.log.iter().skip(skip) {
            match part {
                Part::Peer(id) => {
                    peers.insert(*id);
                }
                Part::SelfNode => self_node = true,
                Part::Filter => filter = true,
                Part::All => return Changes::Everything,
            }
        }
        Changes::Parts { peers, self_node, filter }
    }

    /// Marks expired every peer whose key expiry has passed at `now` and that the server has not
    /// marked yet, as Tailscale's client does: the data plane drops such a peer's tunnel even
    /// while the server is unreachable or did not say so (a cached map, an older server).
    /// `now` is this node's clock set to the server's (see `Mesh`). A later entry from the
    /// server replaces the mark; the next look marks it again. One pass over the peers, so it
    /// runs when an expiry is due, not per change. Returns whether it marked any.
    pub fn expire_peers(&mut self, now: DateTime<Utc>) -> bool {
        let mut marked = false;
        for (id, p) in self.peers.iter_mut() {
            if !p.expired && p.key_expiry_passed(now) {
                p.expired = true;
                self.changes.note(Part::Peer(*id));
                marked = true;
            }
        }
        marked
    }

    /// The earliest key expiry after `now` among peers not marked expired: when
    /// [`NetMap::expire_peers`] next has something to do (unless the map changes).
    pub fn next_peer_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.peers.values().filter(|p| !p.expired).filter_map(|p| p.key_expiry).filter(|e| *e > now).min()
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

/// Sets `slot` to `value` when they differ; true when it did.
fn set<T: PartialEq + Clone>(slot: &mut T, value: &T) -> bool {
    if slot == value {
        return false;
    }
    slot.clone_from(value);
    true
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
    use crate::keys::{DiscoPublic, NodePublic};
    use crate::tailcfg::{FilterRule, PeerChange};

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

    fn with_peers(ids: &[i64]) -> NetMap {
        let mut m = NetMap::default();
        m.apply(&MapResponse {
            node: Some(node(1)),
            peers: Some(ids.iter().map(|i| node(*i)).collect()),
            ..Default::default()
        });
        m
    }

    #[test]
    fn peers_changed_adds_and_replaces_whole_entries() {
        let mut m = with_peers(&[2]);
        let mut n2 = node(2);
        n2.endpoints = vec!["127.0.0.1:1".into()];
        assert!(m.apply(&MapResponse { peers_changed: Some(vec![n2.clone(), node(3)]), ..Default::default() }));
        assert_eq!(m.peers[&2], n2);
        assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        // The same entry again is no visible change.
        assert!(!m.apply(&MapResponse { peers_changed: Some(vec![n2]), ..Default::default() }));
    }

    #[test]
    fn removals_of_unknown_peers_are_ignored() {
        let mut m = with_peers(&[2, 3]);
        assert!(!m.apply(&MapResponse { peers_removed: Some(vec![7, 8]), ..Default::default() }));
        assert!(m.apply(&MapResponse { peers_removed: Some(vec![3, 9]), ..Default::default() }));
        assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn removal_applies_before_change_in_one_message() {
        // A node removed and re-added in one message stays (Tailscale's order).
        let mut m = with_peers(&[2]);
        let mut again = node(2);
        again.key_expiry = Some(crate::tailcfg::zero_time());
        m.apply(&MapResponse {
            peers_removed: Some(vec![2]),
            peers_changed: Some(vec![again.clone()]),
            ..Default::default()
        });
        assert_eq!(m.peers.get(&2), Some(&again));
    }

    #[test]
    fn patches_change_only_their_fields_and_skip_unknown_peers() {
        let mut m = with_peers(&[2, 3]);
        let before3 = m.peers[&3].clone();
        let seen = chrono::Utc::now();
        assert!(m.apply(&MapResponse {
            peers_changed_patch: Some(vec![
                PeerChange {
                    node_id: 2,
                    endpoints: Some(vec!["127.0.0.1:41641".into()]),
                    derp_region: Some(3),
                    online: Some(true),
                    last_seen: Some(seen),
                    ..Default::default()
                },
                PeerChange { node_id: 99, online: Some(true), ..Default::default() },
            ]),
            ..Default::default()
        }));
        let p = &m.peers[&2];
        assert_eq!(p.endpoints, vec!["127.0.0.1:41641".to_string()]);
        assert_eq!((p.home_derp, p.home_region(), p.online, p.last_seen), (3, 3, Some(true), Some(seen)));
        assert_eq!(p.name, "n2.mesh.");
        assert_eq!(m.peers[&3], before3);
        assert!(!m.peers.contains_key(&99));
        // Patches apply after changed entries of the same message.
        m.apply(&MapResponse {
            peers_changed: Some(vec![node(4)]),
            peers_changed_patch: Some(vec![PeerChange { node_id: 4, online: Some(false), ..Default::default() }]),
            ..Default::default()
        });
        assert_eq!(m.peers[&4].online, Some(false));
    }

    /// `apply` compares each part where it applies it: every kind of message reports a change
    /// exactly when the map differs afterwards, and the same message again reports none.
    #[test]
    fn a_message_reports_a_change_exactly_when_the_map_changed() {
        use crate::tailcfg::{DerpMap, FilterRule, UserProfile};
        let mut start = with_peers(&[2, 3]);
        start.apply(&MapResponse {
            user_profiles: vec![UserProfile { id: 1, login_name: "acme".into(), ..Default::default() }],
            domain: "mesh".into(),
            ..Default::default()
        });
        let patch = |c: PeerChange| MapResponse { peers_changed_patch: Some(vec![c]), ..Default::default() };
        let mut n2 = node(2);
        n2.hostinfo.os = "linux".into();
        let seen = chrono::Utc::now();
        let messages = [
            MapResponse { node: Some(node(1)), ..Default::default() },
            MapResponse { node: Some(node(11)), ..Default::default() },
            MapResponse { derp_map: Some(DerpMap::default()), ..Default::default() },
            MapResponse { packet_filter: Some(vec![]), ..Default::default() },
            MapResponse { packet_filter: Some(vec![FilterRule::default()]), ..Default::default() },
            MapResponse {
                user_profiles: vec![UserProfile { id: 1, login_name: "acme".into(), ..Default::default() }],
                ..Default::default()
            },
            MapResponse {
                user_profiles: vec![UserProfile { id: 1, login_name: "other".into(), ..Default::default() }],
                ..Default::default()
            },
            MapResponse { user_profiles: vec![UserProfile { id: 2, ..Default::default() }], ..Default::default() },
            MapResponse { domain: "mesh".into(), ..Default::default() },
            MapResponse { domain: "other".into(), ..Default::default() },
            MapResponse { peers: Some(vec![node(2), node(3)]), ..Default::default() },
            MapResponse { peers: Some(vec![node(2)]), ..Default::default() },
            MapResponse { peers_removed: Some(vec![9]), ..Default::default() },
            MapResponse { peers_removed: Some(vec![3]), ..Default::default() },
            MapResponse { peers_changed: Some(vec![node(2)]), ..Default::default() },
            MapResponse { peers_changed: Some(vec![n2]), ..Default::default() },
            MapResponse { peers_changed: Some(vec![node(4)]), ..Default::default() },
            MapResponse { online_change: Some([(2, true)].into()), ..Default::default() },
            MapResponse { online_change: Some([(9, true)].into()), ..Default::default() },
            patch(PeerChange { node_id: 2, derp_region: Some(0), ..Default::default() }),
            patch(PeerChange { node_id: 2, derp_region: Some(2), ..Default::default() }),
            patch(PeerChange { node_id: 2, endpoints: Some(vec![]), ..Default::default() }),
            patch(PeerChange { node_id: 2, endpoints: Some(vec!["127.0.0.1:1".into()]), ..Default::default() }),
            patch(PeerChange { node_id: 2, key: Some(Default::default()), ..Default::default() }),
            patch(PeerChange { node_id: 2, key: Some(NodePublic([7; 32])), ..Default::default() }),
            patch(PeerChange { node_id: 2, disco_key: Some(DiscoPublic([7; 32])), ..Default::default() }),
            patch(PeerChange { node_id: 2, online: Some(false), ..Default::default() }),
            patch(PeerChange { node_id: 2, key_expiry: Some(seen), ..Default::default() }),
            patch(PeerChange { node_id: 2, last_seen: Some(seen), ..Default::default() }),
            patch(PeerChange { node_id: 9, online: Some(false), ..Default::default() }),
        ];
        let mut changes = 0;
        for (i, msg) in messages.iter().enumerate() {
            let mut m = start.clone();
            let changed = m.apply(msg);
            assert_eq!(changed, m != start, "message {i}: {msg:?}");
            assert!(!m.apply(msg), "message {i} again");
            changes += changed as usize;
        }
        // Some of them change nothing, most do.
        assert_eq!(changes, messages.len() - 13);
    }

    #[test]
    fn a_full_peer_list_precludes_deltas_in_the_same_message() {
        let mut m = with_peers(&[2]);
        m.apply(&MapResponse { peers: Some(vec![node(5)]), peers_removed: Some(vec![5]), ..Default::default() });
        assert_eq!(m.peers.keys().copied().collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn the_change_log_names_what_changed_and_sends_readers_of_other_maps_to_the_whole() {
        let mut m = with_peers(&[2, 3]);
        let at = m.cursor();
        assert_eq!(m.changes_since(&at), Changes::Parts { peers: BTreeSet::new(), self_node: false, filter: false });
        // A message that changes nothing logs nothing.
        m.apply(&MapResponse { peers_changed: Some(vec![node(2)]), ..Default::default() });
        assert_eq!(m.cursor(), at);
        m.apply(&MapResponse {
            peers_changed: Some(vec![node(4)]),
            peers_removed: Some(vec![3, 99]),
            peers_changed_patch: Some(vec![PeerChange { node_id: 2, online: Some(true), ..Default::default() }]),
            packet_filter: Some(vec![FilterRule::default()]),
            ..Default::default()
        });
        assert_eq!(
            m.changes_since(&at),
            Changes::Parts { peers: BTreeSet::from([2, 3, 4]), self_node: false, filter: true }
        );
        let mid = m.cursor();
        m.apply(&MapResponse { node: Some(Node { name: "renamed.".into(), ..node(1) }), ..Default::default() });
        assert_eq!(m.changes_since(&mid), Changes::Parts { peers: BTreeSet::new(), self_node: true, filter: false });
        // A whole peer list, a cleared map, a copy, a map read back, a reader too far behind:
        // the whole map.
        let before_list = m.cursor();
        m.apply(&MapResponse { peers: Some(vec![node(5)]), ..Default::default() });
        assert_eq!(m.changes_since(&before_list), Changes::Everything);
        let before_clear = m.cursor();
        m.clear_peers();
        assert_eq!(m.changes_since(&before_clear), Changes::Everything);
        let copy = m.clone();
        assert_eq!(copy, m, "the log is not map content");
        assert_eq!(copy.changes_since(&m.cursor()), Changes::Everything);
        let read: NetMap = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(read.changes_since(&m.cursor()), Changes::Everything);
        let behind = m.cursor();
        for i in 0..LOG_LEN as i64 + 1 {
            m.apply(&MapResponse { peers_changed: Some(vec![node(100 + i)]), ..Default::default() });
        }
        assert_eq!(m.changes_since(&behind), Changes::Everything);
        let one_behind = {
            let mut c = m.cursor();
            c.seq -= LOG_LEN as u64;
            c
        };
        assert!(matches!(m.changes_since(&one_behind), Changes::Parts { ref peers, .. } if peers.len() == LOG_LEN));
    }

    #[test]
    fn peers_whose_key_expiry_passed_are_marked_by_the_clock_and_logged() {
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z").unwrap().with_timezone(&Utc);
        let s = chrono::Duration::seconds;
        let with_expiry = |id, e: Option<DateTime<Utc>>| Node { key_expiry: e, ..node(id) };
        let mut m = NetMap::default();
        m.apply(&MapResponse {
            peers: Some(vec![
                with_expiry(1, Some(t0 + s(10))),
                with_expiry(2, Some(t0 + s(30))),
                // No expiry, and Go's zero time (what tailcfg sends for none).
                with_expiry(3, None),
                with_expiry(4, Some(crate::tailcfg::zero_time())),
            ]),
            ..Default::default()
        });
        assert_eq!(m.next_peer_expiry(t0), Some(t0 + s(10)));
        let c = m.cursor();
        assert!(!m.expire_peers(t0 + s(9)), "nothing is due yet");
        assert_eq!(m.changes_since(&c), Changes::Parts { peers: BTreeSet::new(), self_node: false, filter: false });
        assert!(m.expire_peers(t0 + s(10)), "an expiry is passed at its instant");
        assert_eq!(m.changes_since(&c), Changes::Parts { peers: [1].into(), self_node: false, filter: false });
        assert!(m.peers[&1].expired && !m.peers[&2].expired && !m.peers[&3].expired && !m.peers[&4].expired);
        assert_eq!(m.next_peer_expiry(t0 + s(10)), Some(t0 + s(30)));
        // The server renews peer 1's key: its entry replaces the mark.
        m.apply(&MapResponse { peers_changed: Some(vec![with_expiry(1, Some(t0 + s(3600)))]), ..Default::default() });
        assert!(!m.peers[&1].expired);
        assert!(m.expire_peers(t0 + s(31)));
        assert!(m.peers[&2].expired && !m.peers[&1].expired);
        assert!(!m.expire_peers(t0 + s(32)), "a marked peer is not marked again");
        assert_eq!(m.next_peer_expiry(t0 + s(32)), Some(t0 + s(3600)));
    }
}
