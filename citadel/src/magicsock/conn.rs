//! [`Conn`]: the node's packet core, sans-IO. It owns the WireGuard tunnels, disco and the
//! per-peer paths ([`super::endpoint`]), and the netcheck and home-relay policy
//! ([`super::home`]). It opens no socket and reads no clock: inputs are `handle_*` calls with
//! `now`, outputs are drained with `poll_*`, and the caller sleeps until [`Conn::poll_timeout`].
//!
//! Call order per wakeup: feed what arrived (`handle_udp`, `handle_relayed`, `send_ip`, the
//! answers to earlier [`Event`]s), then `handle_timeout(now)`, then drain `poll_ip` (decrypted
//! packets for the netstack), `poll_transmit` (datagrams for UDP or DERP) and `poll_event`
//! (work for the driver's I/O: DERP connections, name resolution, HTTPS probes, published
//! [`NetInfo`]).

use super::home::{Action, HomePolicy};
use crate::dataplane::peers::{self, PeerIndex, RoutePrefs};
use crate::dataplane::wg::{Source, Transmit, WgRouter};
use crate::dataplane::{Counters, NetInfo, PeerStats};
use crate::derphttp::RegionLatency;
use crate::keys::{NodePublic, PrivateKey};
use crate::netmap::NetMap;
use crate::tailcfg::DerpMap;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often boringtun's timers run while some peer has a tunnel or disco paths in use (its
/// own device uses 250 ms; it has no way to say when its next timer is due). Peers with neither
/// need no timer: their tunnel is made by the first packet.
const WG_TIMER: Duration = Duration::from_millis(250);

/// Work for the driver's I/O.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A new DERP map: close connections to regions that vanished or changed.
    DerpMap(DerpMap),
    /// Connect to this region ahead of the first packet (a peer lives there).
    Connect(i32),
    /// This region is home now (NotePreferred on its connection).
    Home(i32),
    /// Resolve these STUN host names; answer with [`Conn::handle_resolved`].
    Resolve(Vec<String>),
    /// Rank these regions over HTTPS; answer with [`Conn::handle_https_latency`].
    MeasureHttps(DerpMap),
    /// Endpoints or home region changed: tell the control server.
    NetInfo(NetInfo),
}

/// The packet core of one node (see the module doc).
pub(crate) struct Conn {
    wg: WgRouter,
    home: HomePolicy,
    /// How peers' routes are taken; applied with every netmap.
    prefs: RoutePrefs,
    /// Which netmap peer holds which tunnel, for applying changes of a few peers.
    index: PeerIndex,
    counters: Arc<Counters>,
    /// Interface endpoints of the UDP socket.
    local: Vec<SocketAddr>,
    /// An IPv4 socket cannot use IPv6 mapped endpoints.
    v4_only: bool,
    derp_map: DerpMap,
    net_info: NetInfo,
    next_wg_timer: Option<Instant>,
    transmits: VecDeque<Transmit>,
    ips: VecDeque<(NodePublic, Vec<u8>)>,
    events: VecDeque<Event>,
    scratch: Vec<Transmit>,
    scratch_ips: Vec<(NodePublic, Vec<u8>)>,
    actions: Vec<Action>,
}

impl Conn {
    /// A core with no peers. `local` are the socket's interface endpoints.
    pub(crate) fn new(
        now: Instant,
        node_key: &PrivateKey,
        disco_key: &PrivateKey,
        local: Vec<SocketAddr>,
        v4_only: bool,
        counters: Arc<Counters>,
    ) -> Conn {
        let mut wg = WgRouter::new(node_key, Arc::clone(&counters), now);
        wg.set_disco_key(disco_key);
        wg.set_my_endpoints(local.clone());
        Conn {
            wg,
            home: HomePolicy::default(),
            prefs: RoutePrefs::default(),
            index: PeerIndex::default(),
            counters,
            net_info: NetInfo { endpoints: local.clone(), ..Default::default() },
            local,
            v4_only,
            derp_map: DerpMap::default(),
            next_wg_timer: None,
            transmits: VecDeque::new(),
            ips: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            scratch_ips: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// Applies a netmap: peers (their routes taken under the [`RoutePrefs`], peers of another
    /// org kept out) and their paths, the DERP map (connections, netcheck, home).
    pub(crate) fn set_netmap(&mut self, now: Instant, nm: &NetMap) {
        self.wg.set_now(now);
        let (desired, index) = peers::desired_indexed(nm, &self.prefs);
        if desired.guard.len() > 0 {
            tracing::debug!(peers = desired.guard.len(), "org guard: peers of another org get no tunnel");
        }
        self.wg.set_peers(desired.peers);
        self.wg.set_org_guard(desired.guard);
        self.index = index;
        self.set_derp(now, &nm.derp_map, None);
    }

    /// Applies a netmap in which only the peers `ids` (by node ID), perhaps the packet filter
    /// (`filter_changed`) and perhaps the DERP map (compared here) changed since the last one
    /// applied: those peers' tunnels and
    /// routes, not every peer's. False, with nothing changed, when only the whole map can tell
    /// (see [`PeerIndex::update`]): the caller then applies it with [`Conn::set_netmap`].
    pub(crate) fn update_netmap(
        &mut self,
        now: Instant,
        nm: &NetMap,
        ids: &std::collections::BTreeSet<i64>,
        filter_changed: bool,
    ) -> bool {
        self.wg.set_now(now);
        let Some(peers::Update { peers: changes, guard }) =
            self.index.update(nm, &self.prefs, ids, filter_changed, self.wg.configs())
        else {
            return false;
        };
        for e in guard {
            self.wg.edit_org_guard(e);
        }
        let touched: Vec<NodePublic> = changes
            .iter()
            .filter_map(|c| match c {
                peers::PeerChange::Add(cfg) | peers::PeerChange::Update(cfg) => Some(cfg.key),
                peers::PeerChange::Remove(_) => None,
            })
            .collect();
        self.wg.update_peers(changes);
        self.set_derp(now, &nm.derp_map, Some(&touched));
        true
    }

    /// The DERP map and what follows from it and the peers: relays for initiations that had
    /// none, connections to the peers' regions, the home region. `touched`: only these peers
    /// changed (all of them when the DERP map did).
    fn set_derp(&mut self, now: Instant, dm: &DerpMap, touched: Option<&[NodePublic]>) {
        let touched = if *dm != self.derp_map {
            self.derp_map = dm.clone();
            self.events.push_back(Event::DerpMap(dm.clone()));
            None
        } else {
            touched
        };
        self.wg.set_derp_ok(!dm.regions.is_empty());
        match touched {
            None => self.wg.resend_unrelayed_initiations(&mut self.scratch),
            Some(keys) => self.wg.resend_unrelayed_initiations_of(keys, &mut self.scratch),
        }
        self.flush();
        if !dm.regions.is_empty() {
            let regions = match touched {
                None => self.wg.peer_regions(),
                Some(keys) => self.wg.peer_regions_of(keys),
            };
            for r in regions {
                self.events.push_back(Event::Connect(r));
            }
        }
        self.home.set_derp_map(now, dm, &mut self.actions);
        self.apply_actions();
    }

    /// One datagram from the UDP socket: disco (magic prefix), STUN (cookie), else WireGuard.
    pub(crate) fn handle_udp(&mut self, now: Instant, src: SocketAddr, data: &[u8]) {
        // IPv4 peers reach a dual-stack socket as `::ffff:a.b.c.d`; keep them as IPv4 so they
        // match the netmap's endpoints.
        let src = SocketAddr::new(src.ip().to_canonical(), src.port());
        self.wg.set_now(now);
        if crate::disco::looks_like_disco(data) {
            if self.cross_org_disco(data) {
                return;
            }
            self.wg.handle_disco(Source::Udp(src), data, &mut self.scratch);
        } else if crate::stun::is_stun(data) {
            if !self.home.handle_stun(now, src, data, &mut self.actions) {
                tracing::trace!(%src, "unexpected STUN packet");
            }
            self.apply_actions();
        } else {
            self.wg.handle_wg(Source::Udp(src), data, &mut self.scratch, &mut self.scratch_ips);
        }
        self.flush();
    }

    /// One packet relayed by DERP `region` from the holder of `from`.
    pub(crate) fn handle_relayed(&mut self, now: Instant, region: i32, from: NodePublic, data: &[u8]) {
        tracing::trace!(region, peer = %from.short(), len = data.len(), "received over DERP");
        if self.wg.org_guard().blocks_node(&from) {
            self.counters.rx_cross_org.fetch_add(1, Relaxed);
            tracing::trace!(peer = %from.short(), "org guard dropped a relayed packet");
            return;
        }
        self.wg.set_now(now);
        let src = Source::Derp { region, key: from };
        if crate::disco::looks_like_disco(data) {
            if self.cross_org_disco(data) {
                return;
            }
            self.wg.handle_disco(src, data, &mut self.scratch);
        } else {
            self.wg.handle_wg(src, data, &mut self.scratch, &mut self.scratch_ips);
        }
        self.flush();
    }

    /// True (and counted) when a disco message comes from a peer of another org.
    fn cross_org_disco(&self, data: &[u8]) -> bool {
        let Some(sender) = crate::disco::sender(data) else { return false };
        if self.wg.org_guard().blocks_disco(&sender) {
            self.counters.rx_cross_org.fetch_add(1, Relaxed);
            tracing::trace!("org guard dropped a disco message");
            return true;
        }
        false
    }

    /// Sets how peers' routes are taken; they apply from the next [`Conn::set_netmap`].
    pub(crate) fn set_route_prefs(&mut self, prefs: RoutePrefs) {
        self.prefs = prefs;
        // Every peer's routes may change: the next netmap is applied in whole.
        self.index = PeerIndex::default();
    }

    /// How peers' routes are taken now.
    pub(crate) fn route_prefs(&self) -> &RoutePrefs {
        &self.prefs
    }

    /// Switches to a renewed node key: every tunnel starts over (see
    /// [`WgRouter::set_static_key`]).
    pub(crate) fn set_static_key(&mut self, now: Instant, key: &PrivateKey) {
        self.wg.set_now(now);
        self.wg.set_static_key(key);
    }

    /// A region's DERP connection came up or went down.
    pub(crate) fn handle_relay_status(&mut self, now: Instant, region: i32, up: bool) {
        self.home.handle_relay_status(now, region, up, &mut self.actions);
        self.apply_actions();
        // The control loop probes its connection when the home relay breaks or returns.
        self.publish();
    }

    /// The answer to [`Event::Resolve`].
    pub(crate) fn handle_resolved(&mut self, now: Instant, hosts: HashMap<String, IpAddr>) {
        self.home.handle_resolved(now, hosts, &mut self.actions);
        self.apply_actions();
    }

    /// The answer to [`Event::MeasureHttps`].
    pub(crate) fn handle_https_latency(&mut self, now: Instant, latencies: &[RegionLatency]) {
        self.home.handle_https_latency(now, latencies, &mut self.actions);
        self.apply_actions();
    }

    /// Encrypts one IP packet from the netstack for the peer its destination routes to.
    pub(crate) fn send_ip(&mut self, now: Instant, packet: &[u8]) {
        self.wg.set_now(now);
        self.wg.send_packet(packet, &mut self.scratch);
        self.flush();
    }

    /// Starts a fresh handshake with `peer`; false when it is not in the netmap.
    pub(crate) fn force_handshake(&mut self, now: Instant, peer: &NodePublic) -> bool {
        self.wg.set_now(now);
        let known = self.wg.force_handshake(peer, &mut self.scratch);
        self.flush();
        known
    }

    /// Runs what is due: WireGuard timers, disco (heartbeats, discovery, which also starts as
    /// soon as traffic to a peer does), netcheck. Safe to call early: it does only what is due.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.wg.set_now(now);
        let due = self.next_wg_timer.is_some_and(|t| now >= t);
        if due {
            self.wg.tick(now, &mut self.scratch);
        } else {
            self.wg.poll_disco(&mut self.scratch);
        }
        // Without a timer, a packet sent or received since the last call may have made a tunnel.
        if due || self.next_wg_timer.is_none() {
            self.next_wg_timer = self.wg.needs_timers().then(|| now + WG_TIMER);
        }
        self.flush();
        self.home.handle_timeout(now, &mut self.actions);
        self.apply_actions();
    }

    /// When [`Conn::handle_timeout`] next has work; `None`: only input can create work.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [self.next_wg_timer, self.home.poll_timeout()].into_iter().flatten().min()
    }

    /// Takes spent packet buffers (sent datagrams' payloads, consumed packets) for reuse.
    pub(crate) fn recycle(&mut self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        for b in bufs {
            self.wg.pool.put(b);
        }
    }

    /// The next datagram to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next decrypted packet (from a peer's AllowedIPs), for the packet filter and netstack.
    pub(crate) fn poll_ip(&mut self) -> Option<(NodePublic, Vec<u8>)> {
        self.ips.pop_front()
    }

    /// The next piece of work for the driver's I/O.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True when some peer's AllowedIPs contain `ip`.
    pub(crate) fn routes_to(&self, ip: IpAddr) -> bool {
        self.wg.routes_to(ip)
    }

    /// Per-peer tunnel state at `now`, sorted by node key.
    pub(crate) fn stats(&self, now: Instant) -> Vec<PeerStats> {
        self.wg.stats(now)
    }

    /// The home region; 0 until one is picked.
    #[cfg(test)]
    pub(crate) fn home_region(&self) -> i32 {
        self.home.home()
    }

    fn flush(&mut self) {
        self.transmits.extend(self.scratch.drain(..));
        self.ips.extend(self.scratch_ips.drain(..));
    }

    fn apply_actions(&mut self) {
        let mut publish = false;
        for a in std::mem::take(&mut self.actions) {
            match a {
                Action::Stun(dst, payload) => self.transmits.push_back(Transmit::udp(dst, payload)),
                Action::Home(r) => {
                    self.events.push_back(Event::Home(r));
                    publish = true;
                }
                Action::Resolve(names) => self.events.push_back(Event::Resolve(names)),
                Action::MeasureHttps(dm) => self.events.push_back(Event::MeasureHttps(dm)),
                Action::Report => publish = true,
            }
        }
        if publish {
            self.publish();
        }
    }

    /// Endpoints (local, then STUN-mapped) and home region, for the control server.
    fn publish(&mut self) {
        let mut endpoints = self.local.clone();
        for m in self.home.report().iter().flat_map(|r| r.mapped.iter()) {
            if !(endpoints.contains(m) || self.v4_only && m.is_ipv6()) {
                endpoints.push(*m);
            }
        }
        self.wg.set_my_endpoints(endpoints.clone());
        let info = NetInfo {
            endpoints,
            preferred_derp: self.home.home(),
            report: self.home.report().cloned(),
            derp_connected: self.home.connected(),
        };
        if info != self.net_info {
            self.net_info = info.clone();
            self.events.push_back(Event::NetInfo(info));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Path;
    use crate::keys::DiscoPublic;
    use crate::magicsock::endpoint::{HEARTBEAT, TRUST_DURATION};
    use crate::magicsock::{HOME_DOWN_RECHECK, NETCHECK_INTERVAL};
    use crate::tailcfg::{DerpNode, DerpRegion, Node};

    struct N {
        conn: Conn,
        key: PrivateKey,
        disco: PrivateKey,
        addr: SocketAddr,
        id: i64,
    }

    fn node(id: u8, t0: Instant) -> N {
        let (key, disco) = (PrivateKey::from_bytes([id; 32]), PrivateKey::from_bytes([id + 100; 32]));
        let addr = SocketAddr::from(([198, 51, 100, id], 41641));
        let conn = Conn::new(t0, &key, &disco, vec![addr], true, Arc::new(Counters::default()));
        N { conn, key, disco, addr, id: id.into() }
    }

    fn pub_key(n: &N) -> NodePublic {
        NodePublic(n.key.public_bytes())
    }

    fn derp_map(regions: &[u8]) -> DerpMap {
        let mut m = DerpMap::default();
        for r in regions {
            let node = DerpNode {
                name: format!("{r}a"),
                region_id: (*r).into(),
                host_name: format!("derp{r}.test"),
                ipv4: format!("192.0.2.{r}"),
                stun_port: 3478,
                ..Default::default()
            };
            m.regions
                .insert((*r).into(), DerpRegion { region_id: (*r).into(), nodes: vec![node], ..Default::default() });
        }
        m
    }

    fn mesh_node(n: &N) -> Node {
        let ip = format!("100.64.0.{}/32", n.id);
        Node {
            id: n.id,
            key: pub_key(n),
            disco_key: DiscoPublic(n.disco.public_bytes()),
            addresses: vec![ip.clone()],
            allowed_ips: vec![ip],
            endpoints: vec![n.addr.to_string()],
            home_derp: 1,
            ..Default::default()
        }
    }

    fn netmap(me: &N, peer: &N, dm: DerpMap) -> NetMap {
        let mut nm = NetMap { self_node: mesh_node(me), derp_map: dm, ..Default::default() };
        nm.peers.insert(peer.id, mesh_node(peer));
        nm
    }

    /// A minimal IPv4/UDP packet from 100.64.0.`src` to 100.64.0.`dst`.
    fn ip_packet(src: u8, dst: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, src, 100, 64, 0, dst];
        p.extend_from_slice(&[0, 1, 0, 2, 0, 12, 0, 0, b'p', b'i', b'n', b'g']);
        p
    }

    fn transmits(c: &mut Conn) -> Vec<Transmit> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn events(c: &mut Conn) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    /// Carries every datagram between the two cores (over UDP to the other's address, or over
    /// DERP) at `now` until the wire is quiet; UDP is dropped unless `udp_ok`.
    fn pump(a: &mut N, b: &mut N, now: Instant, udp_ok: bool) {
        for _ in 0..20 {
            let (ta, tb) = (transmits(&mut a.conn), transmits(&mut b.conn));
            if ta.is_empty() && tb.is_empty() {
                return;
            }
            deliver(b, (a.addr, pub_key(a)), ta, now, udp_ok);
            deliver(a, (b.addr, pub_key(b)), tb, now, udp_ok);
        }
    }

    fn deliver(to: &mut N, from: (SocketAddr, NodePublic), ts: Vec<Transmit>, now: Instant, udp_ok: bool) {
        for t in ts {
            match t.path {
                Path::Direct(dst) if udp_ok && dst == to.addr => to.conn.handle_udp(now, from.0, &t.payload),
                Path::Derp(region) if t.peer == pub_key(to) => to.conn.handle_relayed(now, region, from.1, &t.payload),
                _ => {}
            }
        }
    }

    fn pair(t0: Instant, dm: &[u8]) -> (N, N) {
        let (mut a, mut b) = (node(1, t0), node(2, t0));
        let (na, nb) = (netmap(&a, &b, derp_map(dm)), netmap(&b, &a, derp_map(dm)));
        a.conn.set_netmap(t0, &na);
        b.conn.set_netmap(t0, &nb);
        (a, b)
    }

    fn path(c: &Conn, now: Instant) -> Option<Path> {
        c.stats(now)[0].path
    }

    /// A direct (UDP) WireGuard handshake from a peer of another org is counted as cross-org,
    /// not as coming from an unknown peer.
    #[test]
    fn direct_handshake_from_another_org_counts_as_cross_org() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node(1, t0), node(2, t0));
        let mut na = netmap(&a, &b, DerpMap::default());
        na.peers.get_mut(&b.id).expect("peer").user = 7;
        a.conn.set_netmap(t0, &na);
        b.conn.set_netmap(t0, &netmap(&b, &a, DerpMap::default()));
        b.conn.force_handshake(t0, &pub_key(&a));
        let hs: Vec<Transmit> =
            transmits(&mut b.conn).into_iter().filter(|t| !crate::disco::looks_like_disco(&t.payload)).collect();
        assert!(!hs.is_empty(), "b sends a handshake over UDP");
        deliver(&mut a, (b.addr, pub_key(&b)), hs, t0, true);
        let c = &a.conn.counters;
        assert!(c.rx_cross_org.load(Relaxed) >= 1);
        assert_eq!(c.rx_unknown_peer.load(Relaxed), 0);
        assert!(transmits(&mut a.conn).is_empty(), "no answer to a peer of another org");
    }

    #[test]
    fn org_guard_drops_and_counts_relayed_traffic_from_another_org_unless_allowed() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node(1, t0), node(2, t0));
        let mut na = netmap(&a, &b, derp_map(&[1]));
        na.peers.get_mut(&b.id).expect("peer").user = 7;
        a.conn.set_netmap(t0, &na);
        b.conn.set_netmap(t0, &netmap(&b, &a, derp_map(&[1])));
        assert!(!a.conn.routes_to("100.64.0.2".parse().unwrap()));

        // b's handshake and disco reach a over DERP only to be dropped and counted.
        b.conn.send_ip(t0, &ip_packet(2, 1));
        b.conn.handle_timeout(t0);
        pump(&mut b, &mut a, t0, false);
        assert_eq!(a.conn.poll_ip(), None);
        let dropped = a.conn.counters.rx_cross_org.load(Relaxed);
        assert!(dropped > 0);
        assert!(transmits(&mut a.conn).is_empty());

        // With the guard off, the same traffic gets through.
        a.conn.set_route_prefs(RoutePrefs { allow_cross_org: true, ..Default::default() });
        a.conn.set_netmap(t0, &na);
        assert!(a.conn.routes_to("100.64.0.2".parse().unwrap()));
        let t1 = t0 + Duration::from_secs(6);
        b.conn.force_handshake(t1, &pub_key(&a));
        pump(&mut b, &mut a, t1, false);
        b.conn.send_ip(t1, &ip_packet(2, 1));
        pump(&mut b, &mut a, t1, false);
        assert_eq!(a.conn.poll_ip(), Some((pub_key(&b), ip_packet(2, 1))));
        assert_eq!(a.conn.counters.rx_cross_org.load(Relaxed), dropped);
    }

    /// Peers that carry no traffic cost no timer wake-ups; the first packet makes the tunnel,
    /// which handshakes and runs timers until it expires, after which they stop again. (Plain
    /// WireGuard peers, so the tunnel alone decides; disco paths have their own tests.)
    #[test]
    fn idle_peers_need_no_timer_until_traffic_and_again_after_expiry() {
        let t0 = Instant::now();
        let (mut a, mut b) = (node(1, t0), node(2, t0));
        let plain = |me: &N, peer: &N| {
            let mut nm = netmap(me, peer, DerpMap::default());
            nm.peers.values_mut().for_each(|p| p.disco_key = DiscoPublic([0; 32]));
            nm
        };
        let (na, nb) = (plain(&a, &b), plain(&b, &a));
        a.conn.set_netmap(t0, &na);
        b.conn.set_netmap(t0, &nb);
        for n in [&mut a, &mut b] {
            n.conn.handle_timeout(t0);
            assert_eq!(n.conn.poll_timeout(), None, "a peer without traffic needs no timer");
        }
        a.conn.send_ip(t0, &ip_packet(1, 2));
        a.conn.handle_timeout(t0);
        assert!(a.conn.poll_timeout().is_some(), "a tunnel in use runs its timers");
        pump(&mut a, &mut b, t0, true);
        assert_eq!(b.conn.poll_ip(), Some((pub_key(&a), ip_packet(1, 2))));
        b.conn.handle_timeout(t0);
        assert!(b.conn.poll_timeout().is_some(), "the answering side runs timers too");

        // Idle past boringtun's connection expiry (9 minutes without a new handshake).
        let mut now = t0;
        let end = t0 + Duration::from_secs(10 * 60);
        while let Some(t) = a.conn.poll_timeout().filter(|_| now < end) {
            now = t.max(now + Duration::from_secs(1));
            for n in [&mut a, &mut b] {
                n.conn.handle_timeout(now);
            }
            pump(&mut a, &mut b, now, true);
        }
        assert!(now < end, "the timers stop once the idle tunnel expired");
        b.conn.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(b.conn.poll_timeout(), None);

        // The next packet makes a new tunnel, which handshakes again.
        let later = now + Duration::from_secs(60);
        a.conn.send_ip(later, &ip_packet(1, 2));
        pump(&mut a, &mut b, later, true);
        assert_eq!(b.conn.poll_ip(), Some((pub_key(&a), ip_packet(1, 2))));
    }

    #[test]
    fn relayed_first_then_direct_on_pong_then_relayed_when_pongs_stop() {
        let t0 = Instant::now();
        let (mut a, mut b) = pair(t0, &[1]);
        // The first packet completes a handshake over DERP and arrives relayed.
        a.conn.send_ip(t0, &ip_packet(1, 2));
        pump(&mut a, &mut b, t0, false);
        assert_eq!(b.conn.poll_ip(), Some((pub_key(&a), ip_packet(1, 2))));
        assert_eq!(path(&a.conn, t0), Some(Path::Derp(1)));

        // Discovery: a's ping reaches b directly, b's pong comes back: a goes direct.
        let t1 = t0 + Duration::from_millis(100);
        a.conn.handle_timeout(t1);
        pump(&mut a, &mut b, t1, true);
        assert_eq!(path(&a.conn, t1), Some(Path::Direct(b.addr)));
        a.conn.send_ip(t1, &ip_packet(1, 2));
        let sent: Vec<Path> = transmits(&mut a.conn).iter().map(|t| t.path).collect();
        assert_eq!(sent, vec![Path::Direct(b.addr)]);

        // The pongs stop (UDP dropped from here on): heartbeats go unanswered, and once the
        // trust window after the last pong passes, traffic is relayed again.
        let mut now = t1;
        while now < t1 + TRUST_DURATION {
            now = a.conn.poll_timeout().expect("peers keep timers running").max(now + HEARTBEAT / 4);
            a.conn.handle_timeout(now);
            b.conn.handle_timeout(now);
            pump(&mut a, &mut b, now, false);
        }
        assert_eq!(path(&a.conn, now), Some(Path::Derp(1)));
        a.conn.send_ip(now, &ip_packet(1, 2));
        assert!(transmits(&mut a.conn).iter().any(|t| t.path == Path::Derp(1)));
    }

    /// Sends STUN answers from the given regions (`(region, delay)`) to the probe's requests.
    fn answer_stun(c: &mut Conn, sent: &[Transmit], at: Instant, answers: &[(u8, u64)]) {
        for (region, ms) in answers {
            let server = SocketAddr::from(([192, 0, 2, *region], 3478));
            let req = sent.iter().find(|t| t.path == Path::Direct(server)).expect("STUN request to the region");
            let tx = crate::stun::tx_id(&req.payload).expect("a STUN request");
            let mapped = SocketAddr::from(([203, 0, 113, 1], 50000));
            c.handle_udp(at + Duration::from_millis(*ms), server, &crate::stun::response(tx, mapped));
        }
    }

    fn homes(evs: &[Event]) -> Vec<i32> {
        evs.iter().filter_map(|e| if let Event::Home(r) = e { Some(*r) } else { None }).collect()
    }

    #[test]
    fn home_is_the_fastest_region_and_moves_when_its_relay_drops() {
        let t0 = Instant::now();
        let mut a = node(1, t0);
        let b = node(2, t0);
        a.conn.set_netmap(t0, &netmap(&a, &b, derp_map(&[1, 2])));
        let sent = transmits(&mut a.conn);
        assert!(events(&mut a.conn).contains(&Event::DerpMap(derp_map(&[1, 2]))));
        answer_stun(&mut a.conn, &sent, t0, &[(1, 10), (2, 30)]);
        let evs = events(&mut a.conn);
        assert_eq!(homes(&evs), vec![1]);
        let info = evs.iter().find_map(|e| if let Event::NetInfo(i) = e { Some(i.clone()) } else { None });
        let info = info.expect("NetInfo published");
        assert_eq!(info.preferred_derp, 1);
        assert_eq!(info.endpoints, vec![a.addr, "203.0.113.1:50000".parse().unwrap()]);

        // Both relays up; the home one drops. Nothing before the recheck delay, a probe then.
        let t1 = t0 + Duration::from_secs(5);
        a.conn.handle_relay_status(t1, 1, true);
        a.conn.handle_relay_status(t1, 2, true);
        let t2 = t1 + Duration::from_secs(5);
        a.conn.handle_relay_status(t2, 1, false);
        assert!(a.conn.poll_timeout().is_some_and(|t| t <= t2 + HOME_DOWN_RECHECK));
        a.conn.handle_timeout(t2 + HOME_DOWN_RECHECK / 2);
        assert!(transmits(&mut a.conn).iter().all(|t| t.path != Path::Direct("192.0.2.2:3478".parse().unwrap())));
        let t3 = t2 + HOME_DOWN_RECHECK;
        a.conn.handle_timeout(t3);
        let sent = transmits(&mut a.conn);
        // Only region 2 answers now: when the probe gives up on region 1, 2 becomes home.
        answer_stun(&mut a.conn, &sent, t3, &[(2, 20)]);
        let mut evs = events(&mut a.conn);
        for _ in 0..100 {
            if !homes(&evs).is_empty() {
                break;
            }
            let now = a.conn.poll_timeout().expect("the probe is running");
            a.conn.handle_timeout(now);
            evs.extend(events(&mut a.conn));
        }
        assert_eq!(homes(&evs), vec![2]);
        assert_eq!(a.conn.home_region(), 2);
    }

    #[test]
    fn no_stun_answer_ranks_regions_over_https_and_netcheck_repeats() {
        let t0 = Instant::now();
        let mut a = node(1, t0);
        let b = node(2, t0);
        a.conn.set_netmap(t0, &netmap(&a, &b, derp_map(&[1, 2])));
        // Nobody answers: step from deadline to deadline until the probe gives up.
        let mut now = t0;
        let mut evs = Vec::new();
        for _ in 0..100 {
            now = a.conn.poll_timeout().expect("a probe is running");
            a.conn.handle_timeout(now);
            evs.extend(events(&mut a.conn));
            if evs.iter().any(|e| matches!(e, Event::MeasureHttps(_))) {
                break;
            }
        }
        assert!(evs.contains(&Event::MeasureHttps(derp_map(&[1, 2]))), "{evs:?}");
        assert!(homes(&evs).is_empty());
        let l = |r, ms| RegionLatency { region_id: r, latency: Some(Duration::from_millis(ms)) };
        a.conn.handle_https_latency(now, &[l(1, 40), l(2, 15)]);
        assert_eq!(homes(&events(&mut a.conn)), vec![2]);
        // The next probe is due one interval after the last one started.
        let next = a.conn.home.poll_timeout().expect("netcheck repeats");
        assert!(next > now && next <= t0 + NETCHECK_INTERVAL, "{next:?}");
    }

    #[test]
    fn an_idle_core_sleeps_until_input() {
        let t0 = Instant::now();
        let mut a = node(1, t0);
        assert_eq!(a.conn.poll_timeout(), None, "no peers, no DERP map: nothing to wake for");
        a.conn.handle_timeout(t0);
        assert!(transmits(&mut a.conn).is_empty() && events(&mut a.conn).is_empty());
    }

    /// One change to a netmap of the incremental-apply property below.
    #[derive(Debug, Clone)]
    enum Op {
        /// A peer joins or its whole entry changes: id, key, org, routes (0 its own, 1 a
        /// subnet, 2 exit routes), tagged.
        Upsert(i64, u8, i64, u8, bool),
        Remove(i64),
        Endpoint(i64, u16),
        Key(i64, u8),
        Disco(i64, u8),
        Region(i64, i32),
        Expired(i64, bool),
        /// The filter: allow-all or the org's members only (which decides tagged peers' org).
        Filter(bool),
        /// This node's own entry: its org.
        SelfOrg(i64),
        /// Several of the above in one message.
        Batch(Vec<Op>),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let id = 2i64..14;
        let leaf = prop_oneof![
            4 => (id.clone(), 1u8..20, 7i64..9, 0u8..3, proptest::bool::weighted(0.1))
                .prop_map(|(i, k, o, r, t)| Op::Upsert(i, k, o, r, t)),
            2 => id.clone().prop_map(Op::Remove),
            4 => (id.clone(), 1u16..4).prop_map(|(i, p)| Op::Endpoint(i, p)),
            1 => (id.clone(), 1u8..20).prop_map(|(i, k)| Op::Key(i, k)),
            1 => (id.clone(), 1u8..4).prop_map(|(i, k)| Op::Disco(i, k)),
            1 => (id.clone(), 0i32..3).prop_map(|(i, r)| Op::Region(i, r)),
            1 => (id.clone(), any::<bool>()).prop_map(|(i, e)| Op::Expired(i, e)),
            1 => any::<bool>().prop_map(Op::Filter),
            1 => (7i64..9).prop_map(Op::SelfOrg),
        ];
        leaf.prop_recursive(1, 6, 4, |inner| proptest::collection::vec(inner, 1..4).prop_map(Op::Batch))
    }

    /// `--exit-node`: none, a mesh IP, or a stable ID (which may name several peers).
    fn exit_choice() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        use proptest::prelude::*;
        prop_oneof![
            Just(None),
            (2i64..8).prop_map(|i| Some(format!("100.64.0.{i}"))),
            (0i64..5).prop_map(|i| Some(format!("n{i}"))),
        ]
    }

    /// A tagged peer shows as Headscale's tagged-devices user. Stable IDs repeat every five
    /// IDs, so a name can select more than one peer (the first by ID is the one).
    fn peer_entry(id: i64, key: u8, org: i64, routes: u8, tagged: bool) -> Node {
        let own = [format!("100.64.0.{id}/32"), format!("fd7a:115c:a1e0::{id}/128")];
        let mut allowed = own.to_vec();
        match routes {
            1 => allowed.push(format!("10.{}.0.0/16", id % 3)),
            2 => allowed.extend(["0.0.0.0/0".to_string(), "::/0".to_string()]),
            _ => {}
        }
        Node {
            id,
            stable_id: format!("n{}", id % 5),
            key: NodePublic([key; 32]),
            disco_key: DiscoPublic([key + 100; 32]),
            user: if tagged { peers::TAGGED_DEVICES_USER } else { org },
            tags: if tagged { vec!["tag:ci".into()] } else { vec![] },
            addresses: own.to_vec(),
            allowed_ips: allowed,
            endpoints: vec![format!("192.0.2.{id}:41641")],
            home_derp: 1,
            ..Default::default()
        }
    }

    fn message(nm: &NetMap, op: &Op, r: &mut crate::tailcfg::MapResponse) {
        use crate::tailcfg::{FilterRule, NetPortRange, PeerChange, PortRange};
        let patch = |id: i64| PeerChange { node_id: id, ..Default::default() };
        match op {
            Op::Upsert(i, k, o, s, t) => r.peers_changed.get_or_insert_default().push(peer_entry(*i, *k, *o, *s, *t)),
            Op::Remove(i) => r.peers_removed.get_or_insert_default().push(*i),
            Op::Endpoint(i, p) => r
                .peers_changed_patch
                .get_or_insert_default()
                .push(PeerChange { endpoints: Some(vec![format!("198.51.100.{i}:{p}")]), ..patch(*i) }),
            Op::Key(i, k) => r
                .peers_changed_patch
                .get_or_insert_default()
                .push(PeerChange { key: Some(NodePublic([*k; 32])), ..patch(*i) }),
            Op::Disco(i, k) => r
                .peers_changed_patch
                .get_or_insert_default()
                .push(PeerChange { disco_key: Some(DiscoPublic([*k + 150; 32])), ..patch(*i) }),
            Op::Region(i, g) => {
                r.peers_changed_patch.get_or_insert_default().push(PeerChange { derp_region: Some(*g), ..patch(*i) })
            }
            Op::Expired(i, e) => {
                if let Some(mut n) = nm.peers.get(i).cloned() {
                    n.expired = *e;
                    r.peers_changed.get_or_insert_default().push(n);
                }
            }
            Op::Filter(all) => {
                let src = if *all { "*".to_string() } else { "100.64.0.0/24".to_string() };
                r.packet_filter = Some(vec![FilterRule {
                    src_ips: vec![src],
                    dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
                    ip_proto: vec![],
                }]);
            }
            Op::SelfOrg(o) => r.node = Some(Node { user: *o, ..nm.self_node.clone() }),
            Op::Batch(ops) => {
                for op in ops {
                    message(nm, op, r);
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Applying only the peers a message changed leaves the core exactly as applying the
        /// whole map does: the same tunnels and configs, the same org guard, the same route
        /// for every address in play; and the changes that need the whole map take it.
        #[test]
        fn applying_changed_peers_equals_applying_the_whole_map(
            ops in proptest::collection::vec(op(), 1..40),
            accept_routes in proptest::prelude::any::<bool>(),
            exit_node in exit_choice(),
        ) {
            let t0 = Instant::now();
            let (mut inc, mut whole) = (node(1, t0), node(1, t0));
            let prefs = RoutePrefs { accept_routes, exit_node, ..Default::default() };
            inc.conn.set_route_prefs(prefs.clone());
            whole.conn.set_route_prefs(prefs);
            let mut nm = NetMap::default();
            nm.apply(&crate::tailcfg::MapResponse {
                node: Some(Node { id: 1, key: pub_key(&inc), user: 7, ..Default::default() }),
                derp_map: Some(derp_map(&[1, 2])),
                peers: Some((2..6).map(|i| peer_entry(i, i as u8, 7, if i == 4 { 2 } else { 0 }, false)).collect()),
                ..Default::default()
            });
            inc.conn.set_netmap(t0, &nm);
            whole.conn.set_netmap(t0, &nm);
            let mut at = nm.cursor();
            for op in &ops {
                let mut r = crate::tailcfg::MapResponse::default();
                message(&nm, op, &mut r);
                nm.apply(&r);
                let done = match nm.changes_since(&at) {
                    crate::netmap::Changes::Parts { peers, filter, .. } => inc.conn.update_netmap(t0, &nm, &peers, filter),
                    crate::netmap::Changes::Everything => false,
                };
                // A plain peer change (endpoints, region, disco key) never needs the whole map
                // while no two peers hold one key (then the whole map decides who has it).
                let plain = matches!(op, Op::Endpoint(..) | Op::Region(..) | Op::Disco(..));
                let key_shared = || {
                    let keys: std::collections::BTreeSet<_> = nm.peers.values().map(|n| n.key).collect();
                    keys.len() < nm.peers.len()
                };
                proptest::prop_assert!(
                    done || !plain || key_shared(),
                    "{:?} fell back to the whole map after {:?}",
                    op,
                    ops
                );
                if !done {
                    inc.conn.set_netmap(t0, &nm);
                }
                at = nm.cursor();
                whole.conn.set_netmap(t0, &nm);
                proptest::prop_assert_eq!(inc.conn.wg.configs(), whole.conn.wg.configs(), "after {:?}", op);
                proptest::prop_assert_eq!(
                    inc.conn.wg.peers.keys().collect::<Vec<_>>(),
                    whole.conn.wg.peers.keys().collect::<Vec<_>>()
                );
                proptest::prop_assert_eq!(inc.conn.wg.org_guard(), whole.conn.wg.org_guard());
                for i in 0..16u8 {
                    for ip in [
                        IpAddr::from([100, 64, 0, i]),
                        format!("fd7a:115c:a1e0::{i}").parse().unwrap(),
                        IpAddr::from([10, i % 3, 0, 1]),
                        IpAddr::from([203, 0, 113, i]),
                        format!("2001:db8::{i}").parse().unwrap(),
                    ] {
                        proptest::prop_assert_eq!(inc.conn.wg.route_of(ip), whole.conn.wg.route_of(ip), "{} after {:?}", ip, op);
                    }
                }
            }
        }
    }
}
