//! Subnet and exit routes as Headscale handles them: a node advertises prefixes in
//! `Hostinfo.RoutableIPs`, an admin approves some (`nodes approve-routes`), and a route is
//! served when it is both advertised and approved. A served exit route (`0.0.0.0/0`, `::/0`)
//! goes into the node's AllowedIPs as is; a served subnet route goes there only on its primary
//! node (one per prefix, among the nodes online) and is listed in `PrimaryRoutes`.
//!
//! Pure functions over the store's rows: the caller passes which nodes are online.

use crate::policy::ipset::Prefix;
use crate::store::Node;
use crate::Shared;
use citadel_proto::tailcfg::{self, Hostinfo, MapResponse};
use std::collections::{BTreeMap, BTreeSet};

/// Most routes one node may advertise or have approved (bounds what a client can make the
/// server store and send to every peer).
pub const MAX_ROUTES: usize = 256;

/// A route list that cannot be approved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// An entry is not an IP prefix.
    #[error("invalid route {0:?}: expected a prefix such as 10.0.0.0/8 or 0.0.0.0/0")]
    Invalid(String),
    /// An entry has host bits set (Headscale refuses `10.0.0.1/8` too).
    #[error("invalid route {0:?}: host bits are set (did you mean {1}?)")]
    HostBits(String, String),
    /// More routes than [`MAX_ROUTES`].
    #[error("too many routes: {0} (at most {MAX_ROUTES})")]
    TooMany(usize),
    /// A route other than an exit route overlaps the tailnet's own address ranges.
    #[error("invalid route {0:?}: it overlaps the tailnet's addresses (100.64.0.0/10, fd7a:115c:a1e0::/48)")]
    InsideTailnet(String),
}

/// True when `p` shares an address with the tailnet's own ranges: nodes' addresses come
/// from them, so a subnet route there would shadow members' addresses.
fn inside_tailnet(p: &Prefix) -> bool {
    crate::policy::ipset::TAILNET_RANGES.iter().any(|r| r.overlaps(p))
}

/// Headscale's prefix order (Go's `netip.Prefix.Compare`): IPv4 first, then shorter
/// prefixes, then by address.
pub fn sort_prefixes(v: &mut [Prefix]) {
    v.sort_by_key(|p| (p.addr.is_ipv6(), p.len, p.addr));
}

/// True for an exit route.
pub fn is_exit(p: &Prefix) -> bool {
    p.len == 0
}

/// Parses an admin's route list: canonical prefixes, sorted, without duplicates. Approving
/// one exit route approves both families, as Headscale's CLI does.
///
/// # Errors
/// An entry that is not a prefix, has host bits set, or too many entries.
pub fn parse_approved(routes: &[String]) -> Result<Vec<String>, RouteError> {
    if routes.len() > MAX_ROUTES {
        return Err(RouteError::TooMany(routes.len()));
    }
    let mut out: BTreeSet<Prefix> = BTreeSet::new();
    for r in routes.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
        if !r.contains('/') {
            return Err(RouteError::Invalid(r.to_string()));
        }
        let p = Prefix::parse(r).ok_or_else(|| RouteError::Invalid(r.to_string()))?;
        let ip = r.split('/').next().unwrap_or_default();
        if ip.parse::<std::net::IpAddr>().ok() != Some(p.addr) {
            return Err(RouteError::HostBits(r.to_string(), p.to_string()));
        }
        if !is_exit(&p) && inside_tailnet(&p) {
            return Err(RouteError::InsideTailnet(r.to_string()));
        }
        if is_exit(&p) {
            out.insert(Prefix::parse("0.0.0.0/0").expect("valid"));
            out.insert(Prefix::parse("::/0").expect("valid"));
        } else {
            out.insert(p);
        }
    }
    let mut out: Vec<Prefix> = out.into_iter().collect();
    sort_prefixes(&mut out);
    Ok(out.into_iter().map(|p| p.to_string()).collect())
}

/// The prefixes a node advertises (`Hostinfo.RoutableIPs`); entries that are not prefixes
/// are ignored, at most [`MAX_ROUTES`] are kept.
pub fn advertised(h: &Hostinfo) -> Vec<Prefix> {
    let mut out: BTreeSet<Prefix> = BTreeSet::new();
    let routable = h.rest.get("RoutableIPs");
    for v in routable.as_ref().and_then(|v| v.as_array()).into_iter().flatten().take(MAX_ROUTES) {
        if let Some(p) = v.as_str().filter(|s| s.contains('/')).and_then(Prefix::parse) {
            out.insert(p);
        }
    }
    let mut out: Vec<Prefix> = out.into_iter().collect();
    sort_prefixes(&mut out);
    out
}

/// The routes a node serves: advertised and approved.
pub fn served(n: &Node) -> Vec<Prefix> {
    let approved: BTreeSet<Prefix> = n.approved_routes.iter().filter_map(|r| Prefix::parse(r)).collect();
    advertised(&n.hostinfo).into_iter().filter(|p| approved.contains(p)).collect()
}

/// Each node's primary subnet routes: for every served non-exit prefix, the online node with
/// the lowest id serving it (offline nodes serve nothing). Exit routes are never primary.
pub fn primaries<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    online: impl Fn(u64) -> bool,
) -> BTreeMap<u64, Vec<Prefix>> {
    let mut owner: BTreeMap<Prefix, u64> = BTreeMap::new();
    for n in nodes {
        if !online(n.id) {
            continue;
        }
        for p in served(n).into_iter().filter(|p| !is_exit(p)) {
            let e = owner.entry(p).or_insert(n.id);
            *e = (*e).min(n.id);
        }
    }
    let mut out: BTreeMap<u64, Vec<Prefix>> = BTreeMap::new();
    for (p, id) in owner {
        out.entry(id).or_default().push(p);
    }
    for v in out.values_mut() {
        sort_prefixes(v);
    }
    out
}

/// What goes into a node's map entry: `(AllowedIPs, PrimaryRoutes)` from its own addresses,
/// its primary subnet routes and its served exit routes, in Headscale's order.
pub fn allowed_ips(n: &Node, own: &[Prefix], primary: &[Prefix]) -> (Vec<String>, Vec<String>) {
    let mut allowed: Vec<Prefix> =
        own.iter().chain(primary).copied().chain(served(n).into_iter().filter(is_exit)).collect();
    sort_prefixes(&mut allowed);
    allowed.dedup();
    let str = |v: &[Prefix]| v.iter().map(|p| p.to_string()).collect();
    (str(&allowed), str(primary))
}

/// Applies the active policy's `autoApprovers` to node `id`: every advertised route the
/// policy approves joins its approved routes (none is ever removed, as Headscale). Returns
/// the node as stored afterwards.
///
/// # Errors
/// The node does not exist.
pub fn auto_approve(s: &Shared, id: u64) -> Result<Node, crate::store::StoreError> {
    let (pol, _) = s.policy.get();
    if !pol.has_auto_approvers() {
        return s
            .store
            .node(id)
            .map(std::sync::Arc::unwrap_or_clone)
            .ok_or_else(|| crate::store::StoreError::NotFound(format!("node {id}")));
    }
    let users = crate::policy::state::users(&s.store);
    s.store.update_node(id, |n| {
        let announced = advertised(&n.hostinfo);
        if announced.is_empty() {
            return false;
        }
        let approved: Vec<Prefix> = n.approved_routes.iter().filter_map(|r| Prefix::parse(r)).collect();
        let node = crate::policy::state::policy_node(n);
        match pol.auto_approved(&users, &node, &approved, &announced) {
            Some(v) => {
                tracing::info!(node = n.id, routes = ?v.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "routes auto-approved by policy");
                n.approved_routes = v.iter().map(|p| p.to_string()).collect();
                true
            }
            None => false,
        }
    })
}

/// [`auto_approve`] for every node (after the policy changed).
pub fn auto_approve_all(s: &Shared) {
    if !s.policy.get().0.has_auto_approvers() {
        return;
    }
    for id in s.store.node_ids() {
        // A node deleted meanwhile has nothing to approve.
        let _ = auto_approve(s, id);
    }
}

/// Removes from one map entry the routes `keep` refuses, from `PrimaryRoutes` and
/// `AllowedIPs`; the entry's own addresses always stay, and its exit routes too when
/// `keep_exit` (a node's own entry, as Headscale).
pub fn reduce_entry(entry: &mut tailcfg::Node, keep_exit: bool, keep: &dyn Fn(&Prefix) -> bool) {
    if entry.allowed_ips.len() <= entry.addresses.len() {
        return;
    }
    let addrs = entry.addresses.clone();
    let ok = |r: &String| {
        if addrs.contains(r) {
            return true;
        }
        match Prefix::parse(r) {
            Some(p) if keep_exit && is_exit(&p) => true,
            Some(p) => keep(&p),
            None => false,
        }
    };
    entry.allowed_ips.retain(ok);
    entry.primary_routes.retain(ok);
}

/// [`reduce_entry`] over a whole map or delta: its own node and every peer in it.
pub fn reduce_map(m: &mut MapResponse, keep: &dyn Fn(&Prefix) -> bool) {
    if let Some(n) = m.node.as_mut() {
        reduce_entry(n, true, keep);
    }
    for p in m.peers.iter_mut().flatten().chain(m.peers_changed.iter_mut().flatten()) {
        reduce_entry(p, false, keep);
    }
}

/// The route check of the built-in org-isolation policy for `me`, without compiling it
/// over the tailnet: its rules let an org's untagged nodes reach each other's addresses
/// only, so a route is reachable when `me` is untagged and the route overlaps one of those
/// addresses (what [`crate::policy::Compiled::can_access_route`] answers for that policy).
pub fn org_route_check(s: &Shared, me: &Node) -> impl Fn(&Prefix) -> bool {
    let tagged = !me.tags.is_empty();
    let store = s.store.clone();
    let user = me.user_id;
    let set = std::sync::OnceLock::new();
    move |r: &Prefix| {
        if tagged {
            return false;
        }
        set.get_or_init(|| store.org_member_set(user)).overlaps_prefix(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, advertised: &[&str], approved: &[&str]) -> Node {
        let mut h = Hostinfo::default();
        h.rest.insert("RoutableIPs", serde_json::json!(advertised));
        Node {
            id,
            machine_key: Default::default(),
            node_key: Default::default(),
            disco_key: Default::default(),
            user_id: 1,
            hostname: format!("n{id}"),
            given_name: format!("n{id}"),
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: std::net::Ipv6Addr::LOCALHOST,
            endpoints: vec![],
            hostinfo: h,
            expiry: None,
            created_at: chrono::Utc::now(),
            last_seen: None,
            ephemeral: false,
            tags: vec![],
            auth_key_id: None,
            register_method: "authkey".into(),
            home_derp: 0,
            approved_routes: approved.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn approved_routes_are_checked_and_canonical() {
        let v = |a: &[&str]| parse_approved(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&["10.1.0.0/16", " 10.1.0.0/16", ""]).unwrap(), vec!["10.1.0.0/16"]);
        assert_eq!(v(&["0.0.0.0/0"]).unwrap(), vec!["0.0.0.0/0", "::/0"]);
        assert_eq!(
            v(&["9.9.0.0/16", "10.0.0.0/8", "::/0"]).unwrap(),
            vec!["0.0.0.0/0", "10.0.0.0/8", "9.9.0.0/16", "::/0"]
        );
        assert!(matches!(v(&["10.1.0.1/16"]), Err(RouteError::HostBits(_, s)) if s == "10.1.0.0/16"));
        assert!(matches!(v(&["10.1.0.1"]), Err(RouteError::Invalid(_))));
        assert!(matches!(v(&["nonsense/8"]), Err(RouteError::Invalid(_))));
        for inside in ["100.64.0.0/24", "100.0.0.0/8", "fd7a:115c:a1e0:5::/64", "fd00::/8"] {
            assert!(matches!(v(&[inside]), Err(RouteError::InsideTailnet(_))), "{inside}");
        }
        assert_eq!(v(&["100.128.0.0/16"]).unwrap(), vec!["100.128.0.0/16"]);
        let many: Vec<String> = (0..=MAX_ROUTES).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
        assert!(matches!(parse_approved(&many), Err(RouteError::TooMany(_))));
    }

    #[test]
    fn served_needs_both_advertised_and_approved() {
        let n = node(1, &["10.1.0.0/16", "10.2.0.0/16", "0.0.0.0/0", "::/0", "junk"], &["10.2.0.0/16", "10.9.0.0/16"]);
        let s: Vec<String> = served(&n).iter().map(|p| p.to_string()).collect();
        assert_eq!(s, vec!["10.2.0.0/16"]);
        let own = [Prefix::parse("100.64.0.1/32").unwrap()];
        let (allowed, primary) = allowed_ips(&n, &own, &served(&n));
        assert_eq!(allowed, vec!["10.2.0.0/16", "100.64.0.1/32"]);
        assert_eq!(primary, vec!["10.2.0.0/16"]);
    }

    #[test]
    fn exit_routes_go_to_allowed_ips_but_are_never_primary() {
        let n = node(1, &["0.0.0.0/0", "::/0"], &["0.0.0.0/0", "::/0"]);
        let prim = primaries([&n], |_| true);
        assert!(prim.get(&1).is_none());
        let own = [Prefix::parse("fd7a:115c:a1e0::1/128").unwrap(), Prefix::parse("100.64.0.1/32").unwrap()];
        let (allowed, primary) = allowed_ips(&n, &own, &[]);
        assert_eq!(allowed, vec!["0.0.0.0/0", "100.64.0.1/32", "::/0", "fd7a:115c:a1e0::1/128"]);
        assert!(primary.is_empty());
    }

    #[test]
    fn one_primary_per_prefix_among_online_nodes() {
        let a = node(1, &["10.1.0.0/16"], &["10.1.0.0/16"]);
        let b = node(2, &["10.1.0.0/16", "10.2.0.0/16"], &["10.1.0.0/16", "10.2.0.0/16"]);
        let p = primaries([&a, &b], |_| true);
        assert_eq!(p[&1].iter().map(|p| p.to_string()).collect::<Vec<_>>(), vec!["10.1.0.0/16"]);
        assert_eq!(p[&2].iter().map(|p| p.to_string()).collect::<Vec<_>>(), vec!["10.2.0.0/16"]);
        // The first router offline: the second takes its prefix over.
        let p = primaries([&a, &b], |id| id != 1);
        assert!(p.get(&1).is_none());
        assert_eq!(p[&2].len(), 2);
    }

    /// What a map request runs: the policy's autoApprovers take the advertised routes they
    /// cover, and nothing without them.
    #[test]
    fn auto_approve_follows_the_active_policy() {
        let s = crate::build(crate::Config { derp: crate::DerpMode::Off, stun_listen: None, ..Default::default() })
            .unwrap();
        let u = s.store.create_user("acme", "").unwrap();
        let mut h = Hostinfo { hostname: "r".into(), ..Default::default() };
        h.rest.insert("RoutableIPs", serde_json::json!(["10.1.0.0/16", "192.168.0.0/24", "0.0.0.0/0"]));
        let key = citadel_proto::keys::NodePublic([7; 32]);
        let n = s
            .store
            .register(
                citadel_proto::keys::MachinePublic([7; 32]),
                key,
                u.id,
                h,
                false,
                vec![],
                None,
                "authkey",
                s.cfg.ipv4_base,
                s.cfg.ipv6_base,
            )
            .unwrap();
        assert!(auto_approve(&s, n.id).unwrap().approved_routes.is_empty(), "the built-in policy approves nothing");
        s.policy.set(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["acme@"]}}}"#).unwrap();
        assert_eq!(auto_approve(&s, n.id).unwrap().approved_routes, vec!["10.1.0.0/16"]);
        assert!(auto_approve(&s, 999).is_err());
    }
}
