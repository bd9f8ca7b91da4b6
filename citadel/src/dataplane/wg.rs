//! WireGuard: one boringtun [`Tunn`] per peer, keyed by node key, routed by AllowedIPs.
//!
//! [`WgRouter`] opens no socket: datagrams come in through [`WgRouter::handle_datagram`],
//! IP packets from the netstack through [`WgRouter::send_packet`], and timers through
//! [`WgRouter::tick`]; each appends [`Transmit`]s for the caller to send. Time comes from the
//! caller, [`crate::magicsock`]'s `Conn` ([`WgRouter::set_now`], `tick(now)`); boringtun reads
//! a mock clock, which the router points at that time before every call into a [`Tunn`] or the
//! rate limiter (the one place that clock is set). Disco messages
//! (ping, pong, call-me-maybe) arrive on the same socket; `magicsock`'s disco module handles
//! them.
//!
//! Incoming datagrams are demultiplexed the way boringtun's own device does it: data,
//! handshake responses and cookie replies carry our receiver index (`index << 8 | session`),
//! handshake initiations are opened with our static key (`parse_handshake_anon`, after the
//! shared rate limiter has checked mac1, so an unauthenticated flood costs no DH) to learn the
//! initiator's static key. A peer's endpoint follows the source of its last authenticated
//! packet (roaming).

use super::peers::{diff, PeerChange, PeerConfig};
use super::route::RouteTable;
use super::tunnel::LazyTunn;
use super::Counters;
use crate::disco::SharedKey;
use crate::keys::{NodePublic, PrivateKey};
use crate::magicsock::disco::Disco;
use crate::magicsock::endpoint::PeerPaths;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Handshakes per second the shared rate limiter lets through before demanding cookies
/// (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Room for the largest UDP datagram plus WireGuard's overhead.
const BUF_LEN: usize = 65536 + 64;
/// Tailscale's stand-in address for "via DERP region N": `127.3.3.40:N` (a pong sent over
/// DERP reports it as the ping's source).
pub const DERP_MAGIC_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 3, 3, 40);

/// WireGuard message types (first byte, little-endian u32).
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_HANDSHAKE_RESPONSE: u8 = 2;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// How a peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Path {
    /// Straight over UDP to this address.
    Direct(SocketAddr),
    /// Relayed by the DERP server of this region.
    Derp(i32),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(a) => write!(f, "direct {a}"),
            Path::Derp(r) => write!(f, "relay {r}"),
        }
    }
}

/// One datagram for the driver to send: over UDP, or over DERP to `peer`'s node key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub path: Path,
    /// The recipient's node key (what DERP routes by); zero when unknown (UDP-only replies).
    pub peer: NodePublic,
    pub payload: Vec<u8>,
}

impl Transmit {
    pub(crate) fn udp(addr: SocketAddr, payload: Vec<u8>) -> Self {
        Transmit { path: Path::Direct(addr), peer: NodePublic([0; 32]), payload }
    }

    pub(crate) fn derp(region: i32, peer: NodePublic, payload: Vec<u8>) -> Self {
        Transmit { path: Path::Derp(region), peer, payload }
    }
}

/// Spent packet buffers, reused so that a packet in flight costs no allocation. Bounded in
/// count and in the size of the buffers it keeps.
#[derive(Debug, Default)]
pub(crate) struct Pool(Vec<Vec<u8>>);

impl Pool {
    /// Buffers kept at most.
    const MAX: usize = 256;
    /// Larger buffers (a rare jumbo datagram) are freed, not kept.
    const MAX_CAPACITY: usize = 4096;

    /// An empty buffer, reused when one is spare.
    fn empty(&mut self) -> Vec<u8> {
        let mut v = self.0.pop().unwrap_or_default();
        v.clear();
        v
    }

    /// A buffer holding a copy of `data`.
    pub(crate) fn copy_of(&mut self, data: &[u8]) -> Vec<u8> {
        let mut v = self.empty();
        v.extend_from_slice(data);
        v
    }

    /// A zeroed buffer of `len` bytes.
    pub(crate) fn zeroed(&mut self, len: usize) -> Vec<u8> {
        let mut v = self.empty();
        v.resize(len, 0);
        v
    }

    /// Takes `v` back for reuse.
    pub(crate) fn put(&mut self, v: Vec<u8>) {
        if self.0.len() < Self::MAX && v.capacity() <= Self::MAX_CAPACITY && v.capacity() > 0 {
            self.0.push(v);
        }
    }

    /// Buffers beyond `keep`, for another pool.
    pub(crate) fn surplus(&mut self, keep: usize, to: &mut Vec<Vec<u8>>) {
        if self.0.len() > keep {
            to.extend(self.0.drain(keep..));
        }
    }
}

/// Where an incoming packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The UDP socket, from this address.
    Udp(SocketAddr),
    /// A DERP connection to `region`, sent by the holder of node key `key` (the DERP server
    /// vouches for the key: it checked the client's login box).
    Derp { region: i32, key: NodePublic },
}

/// A snapshot of one peer's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's node key (its WireGuard static key).
    pub node_key: NodePublic,
    /// The path its last authenticated packet came over; `None` until one arrives.
    pub path: Option<Path>,
    /// Direct endpoints from the netmap, tried until a path is confirmed.
    pub candidates: Vec<SocketAddr>,
    /// When the current session's handshake completed.
    pub last_handshake: Option<SystemTime>,
    /// Authenticated WireGuard bytes received from the peer (UDP payload).
    pub rx_bytes: u64,
    /// WireGuard bytes sent to the peer (UDP payload, counted once per datagram).
    pub tx_bytes: u64,
    /// Authenticated WireGuard messages received from the peer.
    pub rx_packets: u64,
    /// WireGuard messages sent to the peer.
    pub tx_packets: u64,
    /// The peer's home DERP region (0 = none).
    pub home_derp: i32,
    /// Round trip of the current path from disco pongs (direct, or DERP while relayed).
    pub latency: Option<Duration>,
}

pub(crate) struct Peer {
    pub(crate) tunn: LazyTunn,
    index: u32,
    pub(crate) paths: PeerPaths,
    /// Box key for disco with this peer; `None` for plain WireGuard peers (no disco key).
    pub(crate) disco: Option<SharedKey>,
    home_derp: i32,
    /// The last handshake initiation went only to unconfirmed direct candidates, or nowhere
    /// (the peer had no relay yet), so it may well be lost; see
    /// [`WgRouter::resend_unrelayed_initiations`].
    unrelayed_init: bool,
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
}

impl Peer {
    /// DERP region to relay through, when the peer has one and we have DERP at all.
    pub(crate) fn derp_region(&self, derp_ok: bool) -> Option<i32> {
        (derp_ok && self.home_derp > 0).then_some(self.home_derp)
    }
}

/// The home DERP regions of `peers`, sorted, each once.
fn regions<'a>(peers: impl Iterator<Item = &'a Peer>) -> Vec<i32> {
    let mut v: Vec<i32> = peers.map(|p| p.home_derp).filter(|r| *r > 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// All tunnels and the routing table.
pub(crate) struct WgRouter {
    secret: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    pub(crate) peers: BTreeMap<NodePublic, Peer>,
    configs: BTreeMap<NodePublic, PeerConfig>,
    by_index: BTreeMap<u32, NodePublic>,
    routes: RouteTable,
    next_index: u32,
    pub(crate) buf: Box<[u8]>,
    /// Buffers for outgoing datagrams and decrypted packets.
    pub(crate) pool: Pool,
    pub(crate) counters: Arc<Counters>,
    last_rate_reset: Option<Instant>,
    /// The time the current batch runs at (set by the driver; the path logic is sans-IO).
    pub(crate) now: Instant,
    /// When this router was made: boringtun's clock reads `now - epoch` (see [`Self::sync_clock`]).
    epoch: Instant,
    /// boringtun's clock as this router last set it.
    clock: std::cell::Cell<Duration>,
    /// Disco keys and advertised endpoints ([`crate::magicsock::disco`]).
    pub(crate) disco: Disco,
    /// Whether a DERP map is known (else peers are reached over UDP only).
    pub(crate) derp_ok: bool,
    /// Peers of another org (no tunnel): their handshakes count as cross-org, not unknown.
    org_guard: super::peers::OrgGuard,
}

impl std::fmt::Debug for WgRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgRouter").field("peers", &self.configs.keys()).field("routes", &self.routes).finish()
    }
}

impl WgRouter {
    pub(crate) fn new(key: &PrivateKey, counters: Arc<Counters>, now: Instant) -> WgRouter {
        let secret = StaticSecret::from(key.to_bytes());
        let public = PublicKey::from(&secret);
        set_boringtun_clock(Duration::ZERO);
        WgRouter {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            peers: BTreeMap::new(),
            configs: BTreeMap::new(),
            by_index: BTreeMap::new(),
            routes: RouteTable::build([]),
            // Indices only need to be unique locally; a random start keeps restarts apart.
            next_index: rand::random::<u32>() & 0x00ff_ffff,
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            pool: Pool::default(),
            counters,
            last_rate_reset: None,
            now,
            epoch: now,
            clock: std::cell::Cell::new(Duration::ZERO),
            disco: Disco::default(),
            derp_ok: false,
            org_guard: Default::default(),
        }
    }

    /// Sets the peers of another org the org guard keeps out (for counting their packets).
    pub(crate) fn set_org_guard(&mut self, guard: super::peers::OrgGuard) {
        self.org_guard = guard;
    }

    /// Peers of another org, whose relayed packets and disco are dropped (the one copy: the
    /// core reads it here too).
    pub(crate) fn org_guard(&self) -> &super::peers::OrgGuard {
        &self.org_guard
    }

    /// Applies one change to the org guard (see [`super::peers::PeerIndex::update`]).
    pub(crate) fn edit_org_guard(&mut self, e: super::peers::GuardEdit) {
        self.org_guard.edit(e);
    }

    /// Enables disco with this key (peers with a disco key get path discovery).
    pub(crate) fn set_disco_key(&mut self, key: &PrivateKey) {
        self.disco.set_key(key);
    }

    /// Sets the time for the following calls (never backwards).
    pub(crate) fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Points boringtun's clock at this router's time. Every method that calls into a
    /// [`Tunn`] or the rate limiter calls this first.
    ///
    /// The clock moves strictly forward on every call, by a nanosecond when `now` has not
    /// moved. A handshake initiation carries boringtun's clock as its TAI64N timestamp, and a
    /// peer drops an initiation not newer than the last one it took. Initiations made in one
    /// batch (the same `now`) carried the same stamp: the peer answered the first and dropped
    /// the rest, and boringtun, which keeps only the last initiation and the one before it,
    /// threw the answer away once there were three; the tunnel stalled until its 5 s retry.
    pub(crate) fn sync_clock(&self) {
        let t = self.now.saturating_duration_since(self.epoch).max(self.clock.get() + Duration::from_nanos(1));
        self.clock.set(t);
        set_boringtun_clock(t);
    }

    /// Our endpoints, as advertised in call-me-maybe.
    pub(crate) fn set_my_endpoints(&mut self, eps: Vec<SocketAddr>) {
        self.disco.set_my_endpoints(eps);
    }

    /// This node's public key.
    pub(crate) fn me(&self) -> NodePublic {
        NodePublic(self.public.to_bytes())
    }

    /// Whether DERP can carry packets.
    pub(crate) fn set_derp_ok(&mut self, ok: bool) {
        self.derp_ok = ok;
    }

    /// Whether some peer has timer work: a live tunnel, or disco paths in use.
    pub(crate) fn needs_timers(&self) -> bool {
        let now = self.now;
        self.peers.values().any(|p| p.tunn.is_live() || p.paths.is_active(now))
    }

    /// DERP regions the peers live in (to connect to ahead of the first packet).
    pub(crate) fn peer_regions(&self) -> Vec<i32> {
        regions(self.peers.values())
    }

    /// The DERP regions of these peers (see [`Self::peer_regions`]).
    pub(crate) fn peer_regions_of(&self, keys: &[NodePublic]) -> Vec<i32> {
        regions(keys.iter().filter_map(|k| self.peers.get(k)))
    }

    /// The peer `ip` routes to.
    #[cfg(test)]
    pub(crate) fn route_of(&self, ip: IpAddr) -> Option<NodePublic> {
        self.routes.lookup(ip)
    }

    /// The peers as configured, by node key.
    pub(crate) fn configs(&self) -> &BTreeMap<NodePublic, PeerConfig> {
        &self.configs
    }

    /// Reconciles the tunnels with the netmap's peers: new peers get a tunnel, gone peers lose
    /// theirs, changed endpoints or routes keep the tunnel (and its session).
    pub(crate) fn set_peers(&mut self, desired: BTreeMap<NodePublic, PeerConfig>) {
        self.apply_changes(diff(&self.configs, &desired), false);
        debug_assert!(self.configs == desired, "the changes lead to the desired peers");
        self.routes = RouteTable::build(desired.values());
        self.configs = desired;
    }

    /// Applies the changes of a few peers (the rest as they are): their tunnels, and their
    /// routes without building the table again unless two peers claim one prefix.
    pub(crate) fn update_peers(&mut self, changes: Vec<PeerChange>) {
        if self.apply_changes(changes, true) {
            self.routes = RouteTable::build(self.configs.values());
        }
    }

    /// The tunnels of `changes`, and their configs; true when the route table must be built
    /// again (always, unless `routes` asks to update it in place and it could).
    fn apply_changes(&mut self, changes: Vec<PeerChange>, routes: bool) -> bool {
        self.sync_clock();
        let mut rebuild = !routes;
        for change in changes {
            match change {
                PeerChange::Remove(k) => {
                    if let Some(p) = self.peers.remove(&k) {
                        self.by_index.remove(&p.index);
                        self.disco.detach(p.disco.as_ref());
                    }
                    if let Some(old) = self.configs.remove(&k) {
                        rebuild = rebuild || !self.routes.remove_peer(&old);
                    }
                    tracing::debug!(peer = %k.short(), "peer removed");
                }
                PeerChange::Add(cfg) => {
                    let index = self.alloc_index();
                    let tunn = self.new_tunn(&cfg.key, index);
                    self.by_index.insert(index, cfg.key);
                    let disco = self.disco.shared_for(&cfg);
                    self.disco.attach(disco.as_ref(), cfg.key);
                    self.peers.insert(
                        cfg.key,
                        Peer {
                            tunn,
                            index,
                            paths: PeerPaths::new(&cfg.endpoints),
                            disco,
                            home_derp: cfg.home_derp,
                            unrelayed_init: false,
                            rx_bytes: 0,
                            tx_bytes: 0,
                            rx_packets: 0,
                            tx_packets: 0,
                        },
                    );
                    tracing::debug!(peer = %cfg.key.short(), endpoints = ?cfg.endpoints, "peer added");
                    rebuild = rebuild || !self.routes.add_peer(&cfg);
                    self.configs.insert(cfg.key, cfg);
                }
                PeerChange::Update(cfg) => {
                    let mut restarted = false;
                    let old = self.configs.get(&cfg.key);
                    // The box key costs a Diffie-Hellman: made only for a new disco key.
                    let disco = old.is_none_or(|c| c.disco != cfg.disco).then(|| self.disco.shared_for(&cfg));
                    if let Some(p) = self.peers.get_mut(&cfg.key) {
                        if old.is_none_or(|c| c.endpoints != cfg.endpoints) {
                            p.paths.set_candidates(&cfg.endpoints);
                        }
                        p.home_derp = cfg.home_derp;
                        let disco =
                            disco.filter(|new| p.disco.as_ref().map(|d| d.peer()) != new.as_ref().map(|d| d.peer()));
                        if let Some(disco) = disco {
                            // A new disco key means a restarted peer: start its paths afresh.
                            self.disco.detach(p.disco.as_ref());
                            self.disco.attach(disco.as_ref(), cfg.key);
                            restarted = p.disco.is_some();
                            p.disco = disco;
                            p.paths = PeerPaths::new(&cfg.endpoints);
                        }
                    }
                    if !rebuild {
                        match old {
                            Some(old) if old.allowed_ips == cfg.allowed_ips => {}
                            Some(old) => {
                                let old = old.clone();
                                rebuild = !self.routes.remove_peer(&old) || !self.routes.add_peer(&cfg);
                            }
                            None => rebuild = !self.routes.add_peer(&cfg),
                        }
                    }
                    if restarted {
                        // Its WireGuard state too: a restarted peer's handshake timestamps
                        // start again from its clock, which the old tunnel could take for
                        // replays until that clock passed the last one it saw (Tailscale
                        // removes and re-adds such a peer in wireguard-go for the same reason).
                        self.reset_tunnel(&cfg.key);
                    }
                    self.configs.insert(cfg.key, cfg);
                }
            }
        }
        rebuild
    }

    /// Switches to a new static key (a renewed node key): every peer's tunnel starts over, as
    /// sessions made with the old key mean nothing to peers that now know the new one.
    pub(crate) fn set_static_key(&mut self, key: &PrivateKey) {
        self.sync_clock();
        self.secret = StaticSecret::from(key.to_bytes());
        self.public = PublicKey::from(&self.secret);
        self.rate_limiter = Arc::new(RateLimiter::new(&self.public, HANDSHAKE_RATE_LIMIT));
        let peers: Vec<NodePublic> = self.peers.keys().copied().collect();
        for k in peers {
            self.reset_tunnel(&k);
        }
    }

    /// Replaces `key`'s tunnel with a fresh one (new index, no sessions, no replay memory).
    fn reset_tunnel(&mut self, key: &NodePublic) {
        let index = self.alloc_index();
        let tunn = self.new_tunn(key, index);
        if let Some(p) = self.peers.get_mut(key) {
            self.by_index.remove(&p.index);
            self.by_index.insert(index, *key);
            p.index = index;
            p.tunn = tunn;
            tracing::debug!(peer = %key.short(), "peer restarted: tunnel reset");
        }
    }

    fn new_tunn(&self, key: &NodePublic, index: u32) -> LazyTunn {
        LazyTunn::new(self.secret.clone(), PublicKey::from(key.0), index, Arc::clone(&self.rate_limiter))
    }

    fn alloc_index(&mut self) -> u32 {
        loop {
            let i = self.next_index & 0x00ff_ffff;
            self.next_index = self.next_index.wrapping_add(1);
            if !self.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// True when some peer's AllowedIPs contain `ip`.
    pub(crate) fn routes_to(&self, ip: IpAddr) -> bool {
        self.routes.lookup(ip).is_some()
    }

    /// Handles one UDP datagram from `src` (see [`WgRouter::handle_wg`]).
    #[cfg(test)]
    pub(crate) fn handle_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        out: &mut Vec<Transmit>,
        deliver: &mut Vec<(NodePublic, Vec<u8>)>,
    ) {
        self.handle_wg(Source::Udp(src), data, out, deliver)
    }

    /// Handles one WireGuard message from `src`. Decrypted IP packets whose source address
    /// belongs to the sending peer are appended to `deliver`; replies (handshake responses,
    /// keepalives, queued data, cookies) to `out`. Anything else is dropped and counted.
    pub(crate) fn handle_wg(
        &mut self,
        src: Source,
        data: &[u8],
        out: &mut Vec<Transmit>,
        deliver: &mut Vec<(NodePublic, Vec<u8>)>,
    ) {
        self.sync_clock();
        self.reset_rate_limit(self.now);
        let c = &self.counters;
        let now = self.now;
        let derp_ok = self.derp_ok;
        let src_ip = match src {
            Source::Udp(a) => Some(a.ip()),
            // Cookies are bound to an address; a relayed packet has none (boringtun then
            // refuses handshakes only while under load).
            Source::Derp { .. } => None,
        };
        let mut cookie = [0u8; 64];
        let key = match self.rate_limiter.verify_packet(src_ip, data, &mut cookie) {
            Ok(Packet::HandshakeInit(p)) => match parse_handshake_anon(&self.secret, &self.public, &p) {
                Ok(half) => NodePublic(half.peer_static_public),
                Err(_) => {
                    c.rx_rejected.fetch_add(1, Relaxed);
                    return;
                }
            },
            Ok(Packet::HandshakeResponse(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    c.rx_unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
            },
            Ok(Packet::PacketCookieReply(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    c.rx_unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
            },
            Ok(Packet::PacketData(p)) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(k) => *k,
                None => {
                    c.rx_unknown_peer.fetch_add(1, Relaxed);
                    return;
                }
            },
            Err(TunnResult::WriteToNetwork(reply)) => {
                // Under load: answer with a cookie instead of doing the handshake's DH.
                if let Source::Udp(a) = src {
                    out.push(Transmit::udp(a, reply.to_vec()));
                }
                return;
            }
            Err(_) => {
                c.rx_malformed.fetch_add(1, Relaxed);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            if self.org_guard.blocks_node(&key) {
                c.rx_cross_org.fetch_add(1, Relaxed);
                tracing::trace!(peer = %key.short(), ?src, "org guard dropped a handshake");
            } else {
                c.rx_unknown_peer.fetch_add(1, Relaxed);
                tracing::trace!(peer = %key.short(), ?src, "handshake from a key not in the netmap");
            }
            return;
        };
        // Replies go back the way the message came: over UDP to its source, or over DERP to
        // the peer's home region (where it surely listens), else the region it came through.
        let reply_to = |payload: &[u8], peer: &Peer| match src {
            Source::Udp(a) => Transmit::udp(a, payload.to_vec()),
            Source::Derp { region, .. } => {
                Transmit::derp(peer.derp_region(derp_ok).unwrap_or(region), key, payload.to_vec())
            }
        };
        let is_data = data.first() == Some(&MSG_DATA);
        let authenticated = match peer.tunn.decapsulate(src_ip, data, &mut self.buf) {
            TunnResult::Done => is_data,
            TunnResult::Err(e) => {
                count_error(c, &e);
                tracing::trace!(peer = %key.short(), ?src, error = ?e, "dropped datagram");
                false
            }
            TunnResult::WriteToNetwork(reply) => {
                // A cookie reply answers an unverified handshake; anything else (handshake
                // response, keepalive) proves the datagram came from the peer.
                let authed = reply.first() != Some(&MSG_COOKIE_REPLY);
                if reply.first() == Some(&MSG_HANDSHAKE_RESPONSE) {
                    c.handshakes.fetch_add(1, Relaxed);
                }
                // Having answered the peer's initiation, packets still queued wait for a
                // session: flushing them now would start an initiation of ours, which replaces
                // the one in flight, and two peers initiating at once would keep invalidating
                // each other's handshakes.
                let answered_init = reply.first() == Some(&MSG_HANDSHAKE_RESPONSE);
                let t = reply_to(reply, peer);
                peer.tx_bytes += t.payload.len() as u64;
                peer.tx_packets += 1;
                out.push(t);
                // A completed handshake releases the packets queued while it was pending.
                if !answered_init {
                    while let TunnResult::WriteToNetwork(p) = peer.tunn.decapsulate(None, &[], &mut self.buf) {
                        let t = reply_to(p, peer);
                        peer.tx_bytes += t.payload.len() as u64;
                        peer.tx_packets += 1;
                        out.push(t);
                    }
                }
                authed
            }
            TunnResult::WriteToTunnelV4(packet, ip) => {
                deliver_checked(&self.routes, c, key, IpAddr::V4(ip), packet, deliver, &mut self.pool);
                true
            }
            TunnResult::WriteToTunnelV6(packet, ip) => {
                deliver_checked(&self.routes, c, key, IpAddr::V6(ip), packet, deliver, &mut self.pool);
                true
            }
        };
        if authenticated {
            peer.rx_bytes += data.len() as u64;
            peer.rx_packets += 1;
            if data.first() == Some(&MSG_HANDSHAKE_RESPONSE) {
                c.handshakes.fetch_add(1, Relaxed);
            }
            peer.paths.note_active(now);
            if let Source::Udp(a) = src {
                if peer.paths.direct(now) != Some(a) {
                    tracing::debug!(peer = %key.short(), old = ?peer.paths.last_direct(), new = %a, "peer seen at a new address");
                }
                let me = NodePublic(self.public.to_bytes());
                out.extend(self.disco.after_udp(peer, key, derp_ok, a, now, me));
            }
        }
    }

    /// Encrypts one IP packet from the netstack for the peer that its destination routes to.
    /// Without a session the packet is queued in the tunnel and a handshake goes out.
    pub(crate) fn send_packet(&mut self, packet: &[u8], out: &mut Vec<Transmit>) {
        self.sync_clock();
        let c = &self.counters;
        let Some(dst) = Tunn::dst_address(packet) else {
            c.tx_malformed.fetch_add(1, Relaxed);
            return;
        };
        let Some(key) = self.routes.lookup(dst) else {
            c.tx_no_route.fetch_add(1, Relaxed);
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            c.tx_no_route.fetch_add(1, Relaxed);
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => emit(peer, key, p, out, c, self.now, self.derp_ok, &mut self.pool),
            TunnResult::Err(e) => {
                c.tx_error.fetch_add(1, Relaxed);
                tracing::debug!(error = ?e, "encapsulate failed");
            }
            _ => {}
        }
    }

    /// Drives boringtun's timers (handshake retries, rekey every 2 minutes, keepalives,
    /// session expiry) and the disco timers (heartbeats, discovery). Call a few times per
    /// second.
    pub(crate) fn tick(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        self.set_now(now);
        let now = self.now;
        self.sync_clock();
        self.reset_rate_limit(now);
        for (key, peer) in &mut self.peers {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(p) => {
                    emit(peer, *key, p, out, &self.counters, now, self.derp_ok, &mut self.pool)
                }
                // Expired means "idle with no session": not an error for an idle peer.
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::debug!(peer = %key.short(), error = ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        self.poll_disco(out);
    }

    /// Starts the shared rate limiter's next period once a second has passed (boringtun's
    /// device resets it every second; handshakes counted while no timer ran must not add up).
    /// Callers have pointed boringtun's clock at `now`.
    fn reset_rate_limit(&mut self, now: Instant) {
        if self.last_rate_reset.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.rate_limiter.reset_count();
            self.last_rate_reset = Some(now);
        }
    }

    /// Starts a new handshake with `key` now, as the rekey timer would. False when the peer is
    /// unknown.
    pub(crate) fn force_handshake(&mut self, key: &NodePublic, out: &mut Vec<Transmit>) -> bool {
        self.sync_clock();
        let Some(peer) = self.peers.get_mut(key) else {
            return false;
        };
        if let TunnResult::WriteToNetwork(p) = peer.tunn.format_handshake_initiation(&mut self.buf, true) {
            emit(peer, *key, p, out, &self.counters, self.now, self.derp_ok, &mut self.pool);
        }
        true
    }

    /// Sends a fresh initiation to each peer that now has a relay but whose pending
    /// handshake went only to direct candidates that nobody has confirmed. Without this, a
    /// packet sent before the netmap named the peer's home region (a peer that joined a moment
    /// earlier) waits for boringtun's 5 s handshake retry when its candidates are behind a NAT.
    /// Call after the peers or the DERP map changed.
    pub(crate) fn resend_unrelayed_initiations(&mut self, out: &mut Vec<Transmit>) {
        let pending: Vec<NodePublic> = self.peers.iter().filter(|(_, p)| p.unrelayed_init).map(|(k, _)| *k).collect();
        self.resend_unrelayed_initiations_of(&pending, out);
    }

    /// [`Self::resend_unrelayed_initiations`] for these peers only (those a netmap change
    /// touched: only their relays can have become known).
    pub(crate) fn resend_unrelayed_initiations_of(&mut self, keys: &[NodePublic], out: &mut Vec<Transmit>) {
        let derp_ok = self.derp_ok;
        let mut due = Vec::new();
        for k in keys {
            let Some(p) = self.peers.get_mut(k).filter(|p| p.unrelayed_init) else { continue };
            if p.tunn.stats().0.is_some() {
                // Answered after all (the candidate was reachable): nothing is pending.
                p.unrelayed_init = false;
            } else if p.derp_region(derp_ok).is_some() {
                due.push(*k);
            }
        }
        for key in due {
            tracing::trace!(peer = %key.short(), "relay now known: initiation sent again over it");
            self.force_handshake(&key, out);
        }
    }

    pub(crate) fn stats(&self, at: Instant) -> Vec<PeerStats> {
        self.sync_clock();
        let now = SystemTime::now();
        let mono = at.max(self.now);
        let mut v: Vec<PeerStats> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let (since, ..) = p.tunn.stats();
                let used = p.tx_bytes > 0 || p.rx_bytes > 0;
                let (path, latency) = match (p.paths.direct(mono), p.derp_region(self.derp_ok)) {
                    (Some(a), _) => (Some(Path::Direct(a)), p.paths.direct_latency()),
                    (None, Some(r)) if used => (Some(Path::Derp(r)), p.paths.derp_latency()),
                    // Plain WireGuard peers: the address their last packet came from.
                    (None, _) => (p.paths.last_direct().map(Path::Direct), None),
                };
                PeerStats {
                    node_key: *k,
                    path,
                    candidates: p.paths.all_candidates(),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    rx_packets: p.rx_packets,
                    tx_packets: p.tx_packets,
                    home_derp: p.home_derp,
                    latency,
                }
            })
            .collect();
        v.sort_by_key(|s| s.node_key);
        v
    }
}

/// Sets the thread-local clock boringtun reads (its `mock-instant` feature): a router's
/// `now - epoch`.
///
/// boringtun reads `Instant::now()` for its timers, cookies and handshake timestamps; built
/// this way, the same code keeps WireGuard time on tokio's clock in production and on the
/// simulated clock under turmoil. The clock is per thread and set right before each call, so
/// routers on one thread (several nodes in one process) never see each other's time.
fn set_boringtun_clock(t: Duration) {
    mock_instant::MockClock::set_time(t);
}

/// Sends a WireGuard message to the peer: over its trusted direct path when there is one;
/// otherwise over DERP (plus the last direct address, which may still work) when the peer has
/// a home region; otherwise, for plain WireGuard peers, to every candidate (duplicates are
/// harmless, the receiver's replay checks drop them).
#[allow(clippy::too_many_arguments)]
fn emit(
    peer: &mut Peer,
    key: NodePublic,
    payload: &[u8],
    out: &mut Vec<Transmit>,
    c: &Counters,
    now: Instant,
    derp_ok: bool,
    pool: &mut Pool,
) {
    peer.paths.note_active(now);
    peer.tx_bytes += payload.len() as u64;
    peer.tx_packets += 1;
    let initiation = payload.first() == Some(&MSG_HANDSHAKE_INIT);
    if initiation {
        peer.unrelayed_init = false;
    }
    if let Some(a) = peer.paths.direct(now) {
        out.push(Transmit::udp(a, pool.copy_of(payload)));
        return;
    }
    if let Some(region) = peer.derp_region(derp_ok) {
        out.push(Transmit::derp(region, key, payload.to_vec()));
        if let Some(a) = peer.paths.last_direct() {
            out.push(Transmit::udp(a, payload.to_vec()));
        }
        return;
    }
    let mut targets: Vec<SocketAddr> = peer.paths.last_direct().into_iter().collect();
    for a in peer.paths.all_candidates() {
        if !targets.contains(&a) {
            targets.push(a);
        }
    }
    // An initiation that goes to unconfirmed candidates, or nowhere, is sent again once the
    // peer has a relay.
    peer.unrelayed_init |= initiation;
    if targets.is_empty() {
        c.tx_no_path.fetch_add(1, Relaxed);
        peer.tx_bytes -= payload.len() as u64;
        peer.tx_packets -= 1;
        return;
    }
    tracing::trace!(peer = %key.short(), ?targets, len = payload.len(), "no relay for this peer: send to its candidates");
    for t in targets {
        out.push(Transmit::udp(t, payload.to_vec()));
    }
}

/// Anti-spoofing: a peer may only send from addresses in its own AllowedIPs.
fn deliver_checked(
    routes: &RouteTable,
    c: &Counters,
    key: NodePublic,
    src: IpAddr,
    packet: &[u8],
    deliver: &mut Vec<(NodePublic, Vec<u8>)>,
    pool: &mut Pool,
) {
    if routes.lookup(src) == Some(key) {
        deliver.push((key, pool.copy_of(packet)));
    } else {
        c.rx_spoofed.fetch_add(1, Relaxed);
        tracing::debug!(peer = %key.short(), %src, "dropped packet with a source outside the peer's AllowedIPs");
    }
}

fn count_error(c: &Counters, e: &WireGuardError) {
    let counter = match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => &c.rx_replayed,
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType
        | WireGuardError::DestinationBufferTooSmall => &c.rx_malformed,
        _ => &c.rx_rejected,
    };
    counter.fetch_add(1, Relaxed);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dataplane::filter::parse_prefix;
    use crate::keys::DiscoPublic;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, UdpPacket, UdpRepr};

    pub(crate) struct Node {
        pub(crate) key: PrivateKey,
        pub(crate) wg: WgRouter,
        pub(crate) addr: SocketAddr,
    }

    pub(crate) fn node(seed: u8, port: u16) -> Node {
        let key = PrivateKey::from_bytes([seed; 32]);
        let wg = WgRouter::new(&key, Arc::new(Counters::default()), crate::clock::now());
        Node { key, wg, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    pub(crate) fn cfg(of: &Node, ip: &str) -> PeerConfig {
        PeerConfig {
            key: NodePublic(of.key.public_bytes()),
            allowed_ips: vec![parse_prefix(ip).unwrap()],
            endpoints: vec![of.addr],
            home_derp: 0,
            disco: DiscoPublic([0; 32]),
        }
    }

    fn connect(a: &mut Node, b: &mut Node) {
        let (ca, cb) = (cfg(b, "100.64.0.2/32"), cfg(a, "100.64.0.1/32"));
        a.wg.set_peers([(ca.key, ca)].into());
        b.wg.set_peers([(cb.key, cb)].into());
    }

    pub(crate) fn udp_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let (s, d) = (IpAddress::from(std::net::Ipv4Addr::from(src)), IpAddress::from(std::net::Ipv4Addr::from(dst)));
        let udp = UdpRepr { src_port: 1, dst_port: 2 };
        let ip = IpRepr::new(s, d, IpProtocol::Udp, 8 + payload.len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        let hl = ip.header_len();
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut buf[hl..]),
            &s,
            &d,
            payload.len(),
            |b| b.copy_from_slice(payload),
            &caps,
        );
        buf
    }

    /// Delivers every transmit until the network is quiet: a direct one to whichever node owns
    /// its address (an address neither owns loses it), a relayed one to the node it names, as
    /// from the other; returns the packets each side decrypted.
    fn pump(a: &mut Node, b: &mut Node, mut wire: Vec<(SocketAddr, Transmit)>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut got_a, mut got_b) = (vec![], vec![]);
        let (ka, kb) = (a.wg.me(), b.wg.me());
        for _ in 0..20 {
            if wire.is_empty() {
                break;
            }
            let mut next = vec![];
            for (from, t) in wire.drain(..) {
                let (to_a, src) = match t.path {
                    Path::Direct(to) if to == a.addr || to == b.addr => (to == a.addr, Source::Udp(from)),
                    Path::Direct(_) => continue,
                    Path::Derp(region) => {
                        (t.peer == ka, Source::Derp { region, key: if t.peer == ka { kb } else { ka } })
                    }
                };
                let (n, got) = if to_a { (&mut *a, &mut got_a) } else { (&mut *b, &mut got_b) };
                let (mut out, mut del) = (vec![], vec![]);
                n.wg.handle_wg(src, &t.payload, &mut out, &mut del);
                got.extend(del.into_iter().map(|(_, p)| p));
                next.extend(out.into_iter().map(|t| (n.addr, t)));
            }
            wire = next;
        }
        (got_a, got_b)
    }

    #[test]
    fn simultaneous_initiations_both_complete() {
        // Both sides queue a packet and initiate at once; every message of a round crosses the
        // other side's, as on a link with equal latency both ways. Time moves 30 ms a round,
        // so each initiation carries a newer timestamp than the last.
        let (mut a, mut b) = (node(3, 1003), node(4, 1004));
        connect(&mut a, &mut b);
        let pa = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"from a");
        let pb = udp_packet([100, 64, 0, 2], [100, 64, 0, 1], b"from b");
        let (mut out_a, mut out_b) = (vec![], vec![]);
        a.wg.send_packet(&pa, &mut out_a);
        b.wg.send_packet(&pb, &mut out_b);
        let mut wire: Vec<(SocketAddr, Transmit)> =
            out_a.into_iter().map(|t| (a.addr, t)).chain(out_b.into_iter().map(|t| (b.addr, t))).collect();
        let (mut got_a, mut got_b) = (vec![], vec![]);
        let mut now = crate::clock::now();
        for _ in 0..40 {
            now += Duration::from_millis(30);
            a.wg.set_now(now);
            b.wg.set_now(now);
            let mut next = vec![];
            for (from, t) in wire.drain(..) {
                let Path::Direct(to) = t.path else { continue };
                let (n, got) = if to == a.addr { (&mut a, &mut got_a) } else { (&mut b, &mut got_b) };
                let (mut out, mut del) = (vec![], vec![]);
                n.wg.handle_datagram(from, &t.payload, &mut out, &mut del);
                got.extend(del.into_iter().map(|(_, p)| p));
                next.extend(out.into_iter().map(|t| (n.addr, t)));
            }
            wire = next;
        }
        assert_eq!(got_b, vec![pa], "b got a's packet");
        assert_eq!(got_a, vec![pb], "a got b's packet");
        for n in [&a, &b] {
            let c = &n.wg.counters;
            assert!(c.rx_rejected.load(Relaxed) <= 1, "handshakes kept replacing each other: {c:?}");
            assert!(n.wg.stats(now)[0].last_handshake.is_some());
        }
    }

    /// Initiations at the same instant (a queued packet's, then forced ones) carry different
    /// timestamps: the peer answers each and the handshake completes at once, not after
    /// boringtun's 5 s retry (it keeps one earlier initiation besides the last, so three in a
    /// batch with one stamp stalled).
    #[test]
    fn initiations_in_one_batch_all_count() {
        let (mut a, mut b) = (node(5, 1005), node(6, 1006));
        connect(&mut a, &mut b);
        let pa = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"from a");
        let mut out = vec![];
        a.wg.send_packet(&pa, &mut out);
        assert!(a.wg.force_handshake(&b.wg.me(), &mut out));
        assert!(a.wg.force_handshake(&b.wg.me(), &mut out));
        assert_eq!(out.len(), 3, "three initiations");
        let wire = out.into_iter().map(|t| (a.addr, t)).collect();
        let (_, got_b) = pump(&mut a, &mut b, wire);
        assert_eq!(got_b, vec![pa], "b got a's packet without a retry");
        assert!(a.wg.stats(a.wg.now)[0].last_handshake.is_some());
    }

    /// A packet to a peer whose home region the netmap does not name yet goes to its direct
    /// candidates only (here one nobody answers on, as a private address behind a NAT), or
    /// nowhere when it has none. When a netmap then names the region, the initiation goes
    /// again over DERP at once: the packet arrives without boringtun's 5 s retry.
    #[test]
    fn initiation_sent_again_once_the_peer_has_a_relay() {
        let lost: SocketAddr = "192.168.9.9:41641".parse().unwrap();
        for endpoints in [vec![lost], vec![]] {
            let (mut a, mut b) = (node(7, 1007), node(8, 1008));
            let (ka, kb) = (a.wg.me(), b.wg.me());
            let mut cb = cfg(&b, "100.64.0.2/32");
            cb.endpoints = endpoints.clone();
            let mut ca = cfg(&a, "100.64.0.1/32");
            ca.home_derp = 1;
            a.wg.set_derp_ok(true);
            b.wg.set_derp_ok(true);
            a.wg.set_peers([(kb, cb.clone())].into());
            b.wg.set_peers([(ka, ca)].into());
            let pa = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"from a");
            let mut out = vec![];
            a.wg.send_packet(&pa, &mut out);
            let direct: Vec<Path> = endpoints.iter().map(|e| Path::Direct(*e)).collect();
            assert_eq!(out.iter().map(|t| t.path).collect::<Vec<_>>(), direct);
            // Nothing to resend while the peer has no relay.
            a.wg.resend_unrelayed_initiations(&mut out);
            assert_eq!(out.len(), endpoints.len());

            cb.home_derp = 1;
            a.wg.set_peers([(kb, cb)].into());
            let mut out = vec![];
            a.wg.resend_unrelayed_initiations(&mut out);
            assert_eq!(out.len(), 1, "one fresh initiation: {out:?}");
            assert_eq!((out[0].path, out[0].payload[0]), (Path::Derp(1), MSG_HANDSHAKE_INIT));
            // Over the relay: b answers, a's session releases the queued packet.
            let wire = out.into_iter().map(|t| (a.addr, t)).collect();
            let (_, got_b) = pump(&mut a, &mut b, wire);
            assert_eq!(got_b, vec![pa], "b got a's packet over DERP");
            // Done: the next netmap sends nothing again.
            let mut out = vec![];
            a.wg.resend_unrelayed_initiations(&mut out);
            assert!(out.is_empty(), "{out:?}");
        }
    }

    #[test]
    fn handshake_data_replay_and_spoofing() {
        let (mut a, mut b) = (node(1, 1001), node(2, 1002));
        connect(&mut a, &mut b);
        let pkt = udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"hello");
        let mut out = vec![];
        a.wg.send_packet(&pkt, &mut out);
        assert_eq!(out.len(), 1, "handshake initiation to the single candidate");
        let wire: Vec<_> = out.into_iter().map(|t| (a.addr, t)).collect();
        let (_, got_b) = pump(&mut a, &mut b, wire);
        assert_eq!(got_b, vec![pkt.clone()], "queued packet flushed after the handshake");
        assert_eq!(b.wg.stats(crate::clock::now())[0].path, Some(Path::Direct(a.addr)));

        // A data packet decrypts once; its replay is dropped and counted.
        let mut out = vec![];
        a.wg.send_packet(&pkt, &mut out);
        let data = out.pop().unwrap().payload;
        let (mut o, mut d) = (vec![], vec![]);
        b.wg.handle_datagram(a.addr, &data, &mut o, &mut d);
        assert_eq!(d.len(), 1);
        b.wg.handle_datagram(a.addr, &data, &mut o, &mut d);
        assert_eq!(d.len(), 1);
        assert_eq!(b.wg.counters.rx_replayed.load(Relaxed), 1);

        // Roaming: an authenticated packet from a new address moves the path.
        let mut out = vec![];
        a.wg.send_packet(&pkt, &mut out);
        let moved: SocketAddr = "127.0.0.1:4444".parse().unwrap();
        b.wg.handle_datagram(moved, &out[0].payload, &mut o, &mut d);
        assert_eq!(b.wg.stats(crate::clock::now())[0].path, Some(Path::Direct(moved)));

        // A packet whose inner source is outside A's AllowedIPs is dropped.
        let spoof = udp_packet([100, 64, 0, 9], [100, 64, 0, 2], b"x");
        let mut out = vec![];
        a.wg.send_packet(&spoof, &mut out);
        let before = d.len();
        b.wg.handle_datagram(a.addr, &out[0].payload, &mut o, &mut d);
        assert_eq!(d.len(), before);
        assert_eq!(b.wg.counters.rx_spoofed.load(Relaxed), 1);
    }

    #[test]
    fn garbage_and_strangers_are_counted_not_fatal() {
        let (mut a, mut b) = (node(1, 1001), node(2, 1002));
        connect(&mut a, &mut b);
        let (mut o, mut d) = (vec![], vec![]);
        for g in [&b""[..], &[4, 0, 0, 0][..], &[1u8; 148][..], &[4u8; 100][..], &[9u8; 40][..]] {
            b.wg.handle_datagram(a.addr, g, &mut o, &mut d);
        }
        assert!(d.is_empty() && o.is_empty());
        let c = &b.wg.counters;
        let total = c.rx_malformed.load(Relaxed) + c.rx_rejected.load(Relaxed) + c.rx_unknown_peer.load(Relaxed);
        assert_eq!(total, 5);

        // A stranger with B's key and address but not in B's peers gets nowhere.
        let mut stranger = node(3, 1003);
        let cb = cfg(&b, "100.64.0.2/32");
        stranger.wg.set_peers([(cb.key, cb)].into());
        let mut out = vec![];
        stranger.wg.send_packet(&udp_packet([100, 64, 0, 3], [100, 64, 0, 2], b"hi"), &mut out);
        for t in out {
            b.wg.handle_datagram(stranger.addr, &t.payload, &mut o, &mut d);
        }
        assert!(o.is_empty() && d.is_empty());
        assert!(b.wg.counters.rx_unknown_peer.load(Relaxed) >= 1);
    }

    #[test]
    fn no_route_and_peer_removal() {
        let (mut a, mut b) = (node(1, 1001), node(2, 1002));
        connect(&mut a, &mut b);
        let mut out = vec![];
        a.wg.send_packet(&udp_packet([100, 64, 0, 1], [100, 64, 0, 7], b"x"), &mut out);
        assert!(out.is_empty());
        assert_eq!(a.wg.counters.tx_no_route.load(Relaxed), 1);
        assert!(a.wg.routes_to("100.64.0.2".parse().unwrap()));
        a.wg.set_peers(BTreeMap::new());
        assert!(!a.wg.routes_to("100.64.0.2".parse().unwrap()));
        assert!(a.wg.stats(crate::clock::now()).is_empty());
        assert!(!a.wg.force_handshake(&NodePublic(b.key.public_bytes()), &mut out));
    }
}
