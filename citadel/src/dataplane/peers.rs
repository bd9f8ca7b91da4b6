//! The data plane's view of the netmap's peers, and the diff between two such views, so a
//! netmap update touches only the tunnels that changed (a tunnel rebuilt needlessly would
//! drop its session and force a new handshake).
//!
//! AllowedIPs are taken as Tailscale clients take them: a peer's own addresses always, subnet
//! routes only with [`RoutePrefs::accept_routes`], exit routes (`0.0.0.0/0`, `::/0`) only from
//! the peer chosen as [`RoutePrefs::exit_node`]. The same filtered set is what the anti-spoofing
//! check accepts as source addresses. Peers of another org (user) get no tunnel at all unless
//! [`RoutePrefs::allow_cross_org`] is set: the [`OrgGuard`] lists them so the packet core
//! (magicsock's `Conn`) can drop and count their packets.

use super::filter::parse_prefix;
use crate::keys::{DiscoPublic, NodePublic};
use crate::netmap::{short_name, NetMap};
use crate::tailcfg::Node;
use ip_network::IpNetwork;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

/// How this node takes the routes its peers offer, and whether it talks across orgs.
/// The default is the safe one: own addresses only, no exit node, org guard on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePrefs {
    /// Take the subnet routes peers advertise (`--accept-routes`).
    pub accept_routes: bool,
    /// The peer (short name, FQDN, host name or mesh IP) whose exit routes to take
    /// (`--exit-node`); every other peer's exit routes are ignored.
    pub exit_node: Option<String>,
    /// Turn the org guard off (`--allow-cross-org`): for deployments whose policy shares nodes
    /// across orgs on purpose.
    pub allow_cross_org: bool,
}

/// Peers of another org that the org guard keeps out, by node key and disco key, each with
/// the number of guarded peers holding it (so one leaving does not unblock another's key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OrgGuard {
    node_keys: BTreeMap<NodePublic, u32>,
    disco_keys: BTreeMap<DiscoPublic, u32>,
}

/// One change to the [`OrgGuard`]: a guarded peer's keys, added or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuardEdit {
    Add(NodePublic, DiscoPublic),
    Remove(NodePublic, DiscoPublic),
}

impl OrgGuard {
    /// True when packets relayed from this node key must be dropped.
    pub(crate) fn blocks_node(&self, k: &NodePublic) -> bool {
        self.node_keys.contains_key(k)
    }

    /// True when disco from this disco key must be dropped.
    pub(crate) fn blocks_disco(&self, k: &DiscoPublic) -> bool {
        self.disco_keys.contains_key(k)
    }

    /// Applies one change (a zero disco key is not a key and is never blocked).
    pub(crate) fn edit(&mut self, e: GuardEdit) {
        fn dec<K: Ord>(m: &mut BTreeMap<K, u32>, k: K) {
            if let std::collections::btree_map::Entry::Occupied(mut o) = m.entry(k) {
                *o.get_mut() -= 1;
                if *o.get() == 0 {
                    o.remove();
                }
            }
        }
        match e {
            GuardEdit::Add(k, d) => {
                *self.node_keys.entry(k).or_default() += 1;
                if !d.is_zero() {
                    *self.disco_keys.entry(d).or_default() += 1;
                }
            }
            GuardEdit::Remove(k, d) => {
                dec(&mut self.node_keys, k);
                if !d.is_zero() {
                    dec(&mut self.disco_keys, d);
                }
            }
        }
    }

    /// How many peers are kept out.
    pub(crate) fn len(&self) -> usize {
        self.node_keys.len()
    }
}

/// What the data plane should have for one netmap: the tunnels, and who is kept out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Desired {
    /// Peers to keep a tunnel to, keyed by node key.
    pub peers: BTreeMap<NodePublic, PeerConfig>,
    /// Peers of another org, left without a tunnel.
    pub guard: OrgGuard,
}

/// How one peer's AllowedIPs were taken, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerRoutes {
    /// Prefixes this node routes to the peer (and accepts as its source addresses).
    pub taken: Vec<String>,
    /// Prefixes the peer offers that are not taken (subnet routes without
    /// `--accept-routes`, exit routes of a peer not chosen as exit node).
    pub skipped: Vec<String>,
    /// The peer belongs to another org and the org guard drops its traffic.
    pub org_blocked: bool,
    /// The peer is the selected exit node and offers exit routes.
    pub exit_node: bool,
}

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

/// True for an exit route (a default route, `/0`).
fn is_exit_route(p: &IpNetwork) -> bool {
    p.netmask() == 0
}

/// True when `p` is exactly one of `n`'s own addresses (Tailscale's test: a single-IP prefix
/// equal to one of the node's `Addresses`); anything else but `/0` is a subnet route.
fn is_own_address(n: &Node, p: &IpNetwork) -> bool {
    let single = p.netmask() == if p.is_ipv4() { 32 } else { 128 };
    single && n.addresses.iter().filter_map(|a| parse_prefix(a)).any(|a| a == *p)
}

/// The peer `sel` names: a mesh IP, short name, FQDN (with or without the final dot), the
/// host name it reported, or its stable ID. Names compare case-insensitively.
pub fn find_peer<'a>(nm: &'a NetMap, sel: &str) -> Option<&'a Node> {
    let sel = Selector::new(sel)?;
    nm.peers.values().find(|n| sel.names(n))
}

/// A parsed peer selector (see [`find_peer`]).
enum Selector<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

impl<'a> Selector<'a> {
    fn new(sel: &'a str) -> Option<Self> {
        let sel = sel.trim().trim_end_matches('.');
        if sel.is_empty() {
            return None;
        }
        Some(sel.parse::<IpAddr>().map_or(Selector::Name(sel), Selector::Ip))
    }

    /// True when the selector names `n`.
    fn names(&self, n: &Node) -> bool {
        match *self {
            Selector::Ip(ip) => {
                n.addresses.iter().filter_map(|a| parse_prefix(a)).any(|a| a.contains(ip) && is_own_address(n, &a))
            }
            Selector::Name(sel) => {
                let eq = |s: &str| !s.is_empty() && s.eq_ignore_ascii_case(sel);
                eq(&short_name(n)) || eq(n.name.trim_end_matches('.')) || eq(&n.hostinfo.hostname) || eq(&n.stable_id)
            }
        }
    }
}

/// The user id Headscale (from 0.28) gives every tagged node in map responses, its
/// "tagged-devices" user: the tags are the node's identity, shared by all orgs' tagged nodes.
pub const TAGGED_DEVICES_USER: i64 = 2147455555;

/// The org (user) a node belongs to; `None` for a tagged node shown as Headscale's
/// tagged-devices user (its org is not in the map).
fn org_of(n: &Node) -> Option<i64> {
    (n.user != TAGGED_DEVICES_USER || n.tags.is_empty()).then_some(n.user)
}

/// True when this node's filter admits every source to every destination and port
/// (Headscale without a policy, or `*` to `*:*`): such a server admits peers without
/// saying who belongs together.
fn admits_everyone(nm: &NetMap) -> bool {
    let any = |s: &str| matches!(s, "*" | "0.0.0.0/0" | "::/0");
    nm.packet_filter.iter().any(|r| {
        r.src_ips.iter().any(|s| any(s))
            && r.dst_ports.iter().any(|d| any(&d.ip) && d.ports.first == 0 && d.ports.last == 65535)
    })
}

/// True when `n` belongs to another org (user) than this node. A tagged node without an org
/// in the map (newer Headscale) counts as this node's org when the server's policy says
/// who may reach whom and put it in this map; under an allow-all filter it stays out.
fn other_org(nm: &NetMap, n: &Node) -> bool {
    match (org_of(&nm.self_node), org_of(n)) {
        (Some(a), Some(b)) => a != b,
        _ => admits_everyone(nm),
    }
}

/// Splits `n`'s AllowedIPs into taken and skipped; unparseable entries are dropped.
fn split_routes(n: &Node, prefs: &RoutePrefs, chosen_exit: bool) -> (Vec<IpNetwork>, Vec<IpNetwork>) {
    let (mut taken, mut skipped) = (Vec::new(), Vec::new());
    for p in n.allowed_ips.iter().filter_map(|s| parse_prefix(s)) {
        let take = if is_exit_route(&p) { chosen_exit } else { is_own_address(n, &p) || prefs.accept_routes };
        let v = if take { &mut taken } else { &mut skipped };
        if !v.contains(&p) {
            v.push(p);
        }
    }
    (taken, skipped)
}

/// The peer chosen as exit node, if `prefs` names one present in the map.
fn chosen_exit_node<'a>(nm: &'a NetMap, prefs: &RoutePrefs) -> Option<&'a Node> {
    let sel = prefs.exit_node.as_deref()?;
    let n = find_peer(nm, sel);
    if n.is_none() {
        tracing::debug!(exit_node = sel, "the chosen exit node is not in the netmap");
    }
    n
}

/// True for a peer the data plane never keeps a tunnel to: no key, expired, or our own key.
fn unusable(nm: &NetMap, n: &Node) -> bool {
    n.key.is_zero() || n.expired || n.key == nm.self_node.key
}

/// How each peer's AllowedIPs are taken under `prefs`, keyed by node key (for `status`).
pub fn peer_routes(nm: &NetMap, prefs: &RoutePrefs) -> BTreeMap<NodePublic, PeerRoutes> {
    let exit = chosen_exit_node(nm, prefs).map(|n| n.key);
    nm.peers
        .values()
        .map(|n| {
            let blocked = !prefs.allow_cross_org && other_org(nm, n);
            let is_exit = exit == Some(n.key) && !blocked;
            let (taken, skipped) = split_routes(n, prefs, is_exit);
            let r = if blocked {
                PeerRoutes {
                    taken: Vec::new(),
                    skipped: taken.iter().chain(&skipped).map(|p| p.to_string()).collect(),
                    org_blocked: true,
                    exit_node: false,
                }
            } else {
                PeerRoutes {
                    exit_node: is_exit && taken.iter().any(is_exit_route),
                    taken: taken.iter().map(|p| p.to_string()).collect(),
                    skipped: skipped.iter().map(|p| p.to_string()).collect(),
                    org_blocked: false,
                }
            };
            (n.key, r)
        })
        .collect()
}

/// The peers the data plane should have for this netmap under `prefs`. Peers without a key,
/// with an expired key, or with this node's own key are left out; so are peers of another org
/// unless the org guard is off (they go into [`Desired::guard`]); unparseable addresses are
/// skipped.
#[cfg(test)]
pub(crate) fn desired(nm: &NetMap, prefs: &RoutePrefs) -> Desired {
    desired_indexed(nm, prefs).0
}

/// [`desired`], and the [`PeerIndex`] that later changes of a few peers start from.
pub(crate) fn desired_indexed(nm: &NetMap, prefs: &RoutePrefs) -> (Desired, PeerIndex) {
    let chosen = chosen_exit_node(nm, prefs).map(|n| (n.id, n.key));
    let exit = chosen.map(|(_, k)| k);
    let mut out = Desired::default();
    let mut index = PeerIndex {
        by_id: HashMap::new(),
        owners: HashMap::new(),
        whole_only: false,
        admits_everyone: admits_everyone(nm),
        me: (nm.self_node.key, org_of(&nm.self_node)),
        exit: chosen,
    };
    for n in nm.peers.values() {
        match classify(nm, n, prefs, exit) {
            Slot::Unusable => {}
            Slot::Guarded => {
                out.guard.edit(GuardEdit::Add(n.key, n.disco_key));
                index.note(n.id, Held { key: n.key, guarded: Some(n.disco_key) });
            }
            Slot::Tunnel(cfg) => {
                index.note(n.id, Held { key: n.key, guarded: None });
                if out.peers.insert(n.key, cfg).is_some() {
                    tracing::warn!(peer = %n.key.short(), "netmap lists the same node key twice; keeping the last");
                }
            }
        }
    }
    // A key listed both as a peer of ours and of another org stays blocked: deny wins.
    for k in out.guard.node_keys.keys() {
        out.peers.remove(k);
    }
    (out, index)
}

/// What one peer gets.
enum Slot {
    /// Nothing (see [`unusable`]).
    Unusable,
    /// No tunnel: the org guard keeps it out.
    Guarded,
    /// A tunnel with this config.
    Tunnel(PeerConfig),
}

fn classify(nm: &NetMap, n: &Node, prefs: &RoutePrefs, exit: Option<NodePublic>) -> Slot {
    if unusable(nm, n) {
        return Slot::Unusable;
    }
    if !prefs.allow_cross_org && other_org(nm, n) {
        return Slot::Guarded;
    }
    let (allowed_ips, _) = split_routes(n, prefs, exit == Some(n.key));
    let mut endpoints: Vec<SocketAddr> = n.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
    endpoints.dedup();
    Slot::Tunnel(PeerConfig { key: n.key, allowed_ips, endpoints, home_derp: n.home_region(), disco: n.disco_key })
}

/// Which node ID holds which key in the netmap last applied in whole, kept up to date by
/// [`PeerIndex::update`]: a change to a few peers of a large org is applied to them alone
/// instead of going over every peer (tens of milliseconds at 10,000 peers, for every member
/// on every change in the org).
#[derive(Debug)]
pub(crate) struct PeerIndex {
    /// What each peer holds; peers without a key, expired or with this node's key are absent.
    by_id: HashMap<i64, Held>,
    /// The ID holding each of those keys.
    owners: HashMap<NodePublic, i64>,
    /// A key listed twice: only the whole map tells who wins.
    whole_only: bool,
    /// [`admits_everyone`] of the map: it decides which tagged peers count as another org's.
    admits_everyone: bool,
    /// This node's key and org in the map: they decide which peers are usable and whose org.
    me: (NodePublic, Option<i64>),
    /// The ID and key of the peer chosen as exit node, if one is chosen and in the map
    /// (usable or not).
    exit: Option<(i64, NodePublic)>,
}

/// Before any map was applied in whole (or after the route preferences changed): the next
/// change takes the whole map.
impl Default for PeerIndex {
    fn default() -> Self {
        PeerIndex {
            by_id: HashMap::new(),
            owners: HashMap::new(),
            whole_only: true,
            admits_everyone: false,
            me: (NodePublic([0; 32]), None),
            exit: None,
        }
    }
}

impl PeerIndex {
    fn note(&mut self, id: i64, held: Held) {
        self.whole_only |= self.owners.insert(held.key, id).is_some_and(|other| other != id);
        self.by_id.insert(id, held);
    }

    /// The tunnel changes (removals first) when the peers `ids` changed in `nm` and nothing
    /// else that decides peers' tunnels did since this index was made or last updated (the
    /// filter may have: `filter_changed`); `current` are the tunnels' configs now. `None`,
    /// with the index left as it was, when only the whole map can tell: this node's key or
    /// org changed, the chosen exit node is another peer now (or another key), the filter
    /// started or stopped admitting everyone, or a key is listed twice (or would be).
    pub(crate) fn update(
        &mut self,
        nm: &NetMap,
        prefs: &RoutePrefs,
        ids: &BTreeSet<i64>,
        filter_changed: bool,
        current: &BTreeMap<NodePublic, PeerConfig>,
    ) -> Option<Update> {
        if self.whole_only || (nm.self_node.key, org_of(&nm.self_node)) != self.me {
            return None;
        }
        // The exit node is the first peer (by ID) the selector names: only a change to the
        // current one or to a peer the selector names can make it another, and then the map
        // is searched again (no other peer's tunnel depends on which one it is otherwise).
        if let Some(sel) = prefs.exit_node.as_deref().and_then(Selector::new) {
            let exit_id = self.exit.map(|(id, _)| id);
            let touched = ids.iter().any(|id| Some(*id) == exit_id || nm.peers.get(id).is_some_and(|n| sel.names(n)));
            if touched && chosen_exit_node(nm, prefs).map(|n| (n.id, n.key)) != self.exit {
                return None;
            }
        }
        let exit = self.exit.map(|(_, k)| k);
        if filter_changed && admits_everyone(nm) != self.admits_everyone {
            return None;
        }
        // Every peer's new state first: a clash stops it before anything changed.
        let mut next = Vec::with_capacity(ids.len());
        let mut keys = BTreeSet::new();
        for id in ids {
            let n = nm.peers.get(id);
            let slot = n.map_or(Slot::Unusable, |n| classify(nm, n, prefs, exit));
            let held = match (&slot, n) {
                (Slot::Guarded, Some(n)) => Some(Held { key: n.key, guarded: Some(n.disco_key) }),
                (Slot::Tunnel(cfg), _) => Some(Held { key: cfg.key, guarded: None }),
                _ => None,
            };
            // A key another peer holds (deny wins, or the last listed): the whole map decides.
            if let Some(h) = &held {
                if self.owners.get(&h.key).is_some_and(|o| o != id) || !keys.insert(h.key) {
                    return None;
                }
            }
            next.push((*id, slot, held));
        }
        let (mut changes, mut added, mut guard) = (Vec::new(), Vec::new(), Vec::new());
        for (id, slot, held) in next {
            // The tunnel this peer had; a guarded peer had none, its keys leave the guard.
            let old_tunnel = match self.by_id.remove(&id) {
                Some(old) => {
                    self.owners.remove(&old.key);
                    match old.guarded {
                        Some(d) => {
                            guard.push(GuardEdit::Remove(old.key, d));
                            None
                        }
                        None => Some(old.key),
                    }
                }
                None => None,
            };
            if let Some(h) = held {
                self.owners.insert(h.key, id);
                self.by_id.insert(id, h);
                if let Some(d) = h.guarded {
                    guard.push(GuardEdit::Add(h.key, d));
                }
            }
            match slot {
                Slot::Tunnel(cfg) => match old_tunnel {
                    Some(k) if k == cfg.key => {
                        if current.get(&k) != Some(&cfg) {
                            added.push(PeerChange::Update(cfg));
                        }
                    }
                    Some(k) => {
                        changes.push(PeerChange::Remove(k));
                        added.push(PeerChange::Add(cfg));
                    }
                    None => added.push(PeerChange::Add(cfg)),
                },
                Slot::Guarded | Slot::Unusable => changes.extend(old_tunnel.map(PeerChange::Remove)),
            }
        }
        changes.extend(added);
        Some(Update { peers: changes, guard })
    }
}

/// What one peer holds in a [`PeerIndex`]: its node key, and its disco key if the org guard
/// keeps it out (then it has no tunnel).
#[derive(Debug, Clone, Copy)]
struct Held {
    key: NodePublic,
    guarded: Option<DiscoPublic>,
}

/// What [`PeerIndex::update`] found to do: tunnel changes (removals first) and org-guard
/// changes.
#[derive(Debug, Default)]
pub(crate) struct Update {
    pub peers: Vec<PeerChange>,
    pub guard: Vec<GuardEdit>,
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
    use crate::dataplane::route::RouteTable;

    fn node(id: i64, key: u8, ip: &str, ep: &str) -> Node {
        Node {
            id,
            key: NodePublic([key; 32]),
            addresses: vec![format!("{ip}/32")],
            allowed_ips: vec![format!("{ip}/32"), "garbage".into()],
            endpoints: vec![ep.to_string(), "not-an-endpoint".into()],
            ..Default::default()
        }
    }

    fn desired_peers(nm: &NetMap) -> BTreeMap<NodePublic, PeerConfig> {
        desired(nm, &RoutePrefs::default()).peers
    }

    fn nets(v: &[&str]) -> Vec<IpNetwork> {
        v.iter().map(|s| parse_prefix(s).unwrap()).collect()
    }

    /// A map with a plain peer (2), a subnet router (3) and two exit nodes (4, 5), all in
    /// this node's org.
    fn routed_map() -> NetMap {
        let mut nm = NetMap::default();
        nm.self_node.key = NodePublic([1; 32]);
        nm.self_node.user = 7;
        let mut add = |id: i64, name: &str, extra: &[&str]| {
            let ip = format!("100.64.0.{id}");
            let mut n = node(id, id as u8, &ip, "127.0.0.1:1000");
            n.user = 7;
            n.name = format!("{name}.acme.mesh.");
            n.addresses.push(format!("fd7a:115c:a1e0::{id}/128"));
            n.allowed_ips.push(format!("fd7a:115c:a1e0::{id}/128"));
            n.allowed_ips.extend(extra.iter().map(|s| s.to_string()));
            nm.peers.insert(id, n);
        };
        add(2, "plain", &[]);
        add(3, "router", &["192.0.2.0/24", "100.64.0.99/32"]);
        add(4, "exit-a", &["0.0.0.0/0", "::/0"]);
        add(5, "exit-b", &["0.0.0.0/0", "::/0", "198.51.100.0/24"]);
        nm
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
        assert_eq!(p.allowed_ips, nets(&["100.64.0.2/32"]));
        assert_eq!(p.endpoints, vec!["127.0.0.1:1000".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn own_addresses_only_by_default() {
        let nm = routed_map();
        let d = desired_peers(&nm);
        for id in 2..=5u8 {
            let want = nets(&[&format!("100.64.0.{id}/32"), &format!("fd7a:115c:a1e0::{id}/128")]);
            assert_eq!(d[&NodePublic([id; 32])].allowed_ips, want, "peer {id}");
        }
        // Neither a subnet nor the internet routes anywhere, and the router cannot use an
        // address of its subnet (or another node's-looking single IP) as a source.
        let t = RouteTable::build(d.values());
        for ip in ["192.0.2.1", "198.51.100.7", "203.0.113.5", "100.64.0.99", "2001:db8::1"] {
            assert_eq!(t.lookup(ip.parse().unwrap()), None, "{ip}");
        }
        assert_eq!(t.lookup("100.64.0.3".parse().unwrap()), Some(NodePublic([3; 32])));
    }

    #[test]
    fn accept_routes_takes_subnets_but_no_exit_routes() {
        let nm = routed_map();
        let prefs = RoutePrefs { accept_routes: true, ..Default::default() };
        let d = desired(&nm, &prefs).peers;
        let t = RouteTable::build(d.values());
        assert_eq!(t.lookup("192.0.2.1".parse().unwrap()), Some(NodePublic([3; 32])));
        assert_eq!(t.lookup("100.64.0.99".parse().unwrap()), Some(NodePublic([3; 32])));
        assert_eq!(t.lookup("198.51.100.7".parse().unwrap()), Some(NodePublic([5; 32])));
        assert_eq!(t.lookup("203.0.113.5".parse().unwrap()), None);
        assert!(d.values().all(|p| !p.allowed_ips.iter().any(is_exit_route)));
    }

    #[test]
    fn exit_routes_only_from_the_chosen_peer() {
        let nm = routed_map();
        for sel in ["exit-a", "EXIT-A.acme.mesh.", "100.64.0.4", "fd7a:115c:a1e0::4"] {
            let prefs = RoutePrefs { exit_node: Some(sel.into()), ..Default::default() };
            let d = desired(&nm, &prefs).peers;
            let t = RouteTable::build(d.values());
            assert_eq!(t.lookup("203.0.113.5".parse().unwrap()), Some(NodePublic([4; 32])), "{sel}");
            assert_eq!(t.lookup("2001:db8::1".parse().unwrap()), Some(NodePublic([4; 32])), "{sel}");
            // Subnets still need --accept-routes, even those of the exit node's neighbour.
            assert_eq!(t.lookup("198.51.100.7".parse().unwrap()), Some(NodePublic([4; 32])), "{sel}");
            assert!(!d[&NodePublic([5; 32])].allowed_ips.iter().any(is_exit_route), "{sel}");
            // Mesh addresses still go to their own peers.
            assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(NodePublic([2; 32])));
        }
        // A name no peer has, or a subnet address, chooses nothing.
        for sel in ["nope", "192.0.2.1", "100.64.0.99", ""] {
            let prefs = RoutePrefs { exit_node: Some(sel.into()), ..Default::default() };
            let t = RouteTable::build(desired(&nm, &prefs).peers.values());
            assert_eq!(t.lookup("203.0.113.5".parse().unwrap()), None, "{sel}");
        }
    }

    #[test]
    fn peer_routes_report_taken_and_skipped() {
        let nm = routed_map();
        let prefs = RoutePrefs { exit_node: Some("exit-b".into()), ..Default::default() };
        let r = peer_routes(&nm, &prefs);
        let b = &r[&NodePublic([5; 32])];
        assert!(b.exit_node && !b.org_blocked);
        assert!(b.taken.contains(&"0.0.0.0/0".to_string()) && b.taken.contains(&"::/0".to_string()));
        assert_eq!(b.skipped, vec!["198.51.100.0/24".to_string()]);
        let a = &r[&NodePublic([4; 32])];
        assert!(!a.exit_node);
        assert_eq!(a.skipped, vec!["0.0.0.0/0".to_string(), "::/0".to_string()]);
    }

    #[test]
    fn org_guard_keeps_other_orgs_out_unless_allowed() {
        let mut nm = routed_map();
        let mut foreign = node(9, 9, "100.64.0.9", "127.0.0.1:1009");
        foreign.user = 8;
        foreign.name = "g1.globex.mesh.".into();
        foreign.disco_key = DiscoPublic([9; 32]);
        foreign.allowed_ips.push("0.0.0.0/0".into());
        nm.peers.insert(9, foreign);
        // Even chosen as exit node, a peer of another org gets nothing.
        let prefs = RoutePrefs { exit_node: Some("g1".into()), accept_routes: true, ..Default::default() };
        let d = desired(&nm, &prefs);
        assert!(!d.peers.contains_key(&NodePublic([9; 32])));
        assert!(d.guard.blocks_node(&NodePublic([9; 32])) && d.guard.blocks_disco(&DiscoPublic([9; 32])));
        assert!(!d.guard.blocks_node(&NodePublic([2; 32])));
        assert_eq!(d.guard.len(), 1);
        let t = RouteTable::build(d.peers.values());
        assert_eq!(t.lookup("100.64.0.9".parse().unwrap()), None);
        assert_eq!(t.lookup("203.0.113.5".parse().unwrap()), None);
        assert!(peer_routes(&nm, &prefs)[&NodePublic([9; 32])].org_blocked);

        let open = RoutePrefs { allow_cross_org: true, ..prefs };
        let d = desired(&nm, &open);
        assert_eq!(d.guard.len(), 0);
        let t = RouteTable::build(d.peers.values());
        assert_eq!(t.lookup("100.64.0.9".parse().unwrap()), Some(NodePublic([9; 32])));
        assert_eq!(t.lookup("203.0.113.5".parse().unwrap()), Some(NodePublic([9; 32])));
    }

    /// Newer Headscale shows tagged nodes as its tagged-devices user: one of them is this
    /// org's under a policy naming who reaches whom, another org's under an allow-all filter;
    /// untagged peers of another user stay out either way.
    #[test]
    fn tagged_devices_user_counts_as_own_org_only_under_a_real_policy() {
        use citadel_proto::tailcfg::{FilterRule, NetPortRange, PortRange};
        let mut nm = routed_map();
        let mut server = node(9, 9, "100.64.0.9", "127.0.0.1:1009");
        server.user = TAGGED_DEVICES_USER;
        server.tags = vec!["tag:server".into()];
        nm.peers.insert(9, server.clone());
        let mut stranger = node(10, 10, "100.64.0.10", "127.0.0.1:1010");
        stranger.user = 8;
        nm.peers.insert(10, stranger);
        let rule = |src: &str, dst: &str, first: u16, last: u16| FilterRule {
            src_ips: vec![src.into()],
            dst_ports: vec![NetPortRange { ip: dst.into(), ports: PortRange { first, last } }],
            ip_proto: vec![],
        };
        let blocked = |nm: &NetMap| {
            let d = desired(nm, &RoutePrefs::default());
            (d.guard.blocks_node(&NodePublic([9; 32])), d.guard.blocks_node(&NodePublic([10; 32])))
        };
        // A policy: the tagged server may reach this node on port 22.
        nm.packet_filter = vec![rule("100.64.0.9/32", "100.64.0.1/32", 22, 22)];
        assert_eq!(blocked(&nm), (false, true));
        // Everyone admitted to everything (Headscale without a policy): the guard holds.
        nm.packet_filter = vec![rule("*", "*", 0, 65535)];
        assert_eq!(blocked(&nm), (true, true));
        nm.packet_filter = vec![rule("0.0.0.0/0", "0.0.0.0/0", 0, 65535)];
        assert_eq!(blocked(&nm), (true, true));
        // A wildcard source to one port is a policy, not allow-all.
        nm.packet_filter = vec![rule("*", "100.64.0.1/32", 443, 443)];
        assert_eq!(blocked(&nm), (false, true));
        // The special user without tags is just another user.
        let mut untagged = server;
        untagged.tags.clear();
        nm.peers.insert(9, untagged);
        assert_eq!(blocked(&nm), (true, true));
        // This node tagged: its org peers count as its own under the policy.
        nm.self_node.user = TAGGED_DEVICES_USER;
        nm.self_node.tags = vec!["tag:ci".into()];
        let d = desired(&nm, &RoutePrefs::default());
        assert!(!d.guard.blocks_node(&NodePublic([2; 32])));
        nm.packet_filter = vec![rule("*", "*", 0, 65535)];
        assert!(desired(&nm, &RoutePrefs::default()).guard.blocks_node(&NodePublic([2; 32])));
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

    proptest::proptest! {
        /// Whatever the map offers, without options a peer is routed nothing but its own
        /// addresses.
        #[test]
        fn default_prefs_take_only_own_addresses(
            extra in proptest::collection::vec("[0-9a-f.:/]{0,20}", 0..6),
            own in proptest::collection::vec((0u8..=255, 0u8..=255), 1..3),
        ) {
            let mut nm = NetMap::default();
            let mut n = node(2, 2, "100.64.0.2", "127.0.0.1:1");
            n.addresses = own.iter().map(|(a, b)| format!("100.64.{a}.{b}/32")).collect();
            n.allowed_ips = n.addresses.iter().cloned().chain(extra).collect();
            nm.peers.insert(2, n.clone());
            let d = desired_peers(&nm);
            for p in &d[&NodePublic([2; 32])].allowed_ips {
                proptest::prop_assert!(is_own_address(&n, p), "{p}");
            }
        }
    }
}
