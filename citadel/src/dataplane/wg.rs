//! WireGuard: one boringtun [`Tunn`] per peer, keyed by node key, routed by AllowedIPs.
//!
//! [`WgRouter`] opens no socket: datagrams come in through [`WgRouter::handle_datagram`],
//! IP packets from the netstack through [`WgRouter::send_packet`], and timers through
//! [`WgRouter::tick`]; each appends [`Transmit`]s for the driver to send. boringtun reads the
//! OS clock itself, so only the rate limiter's reset period takes `now`.
//!
//! Incoming datagrams are demultiplexed the way boringtun's own device does it: data,
//! handshake responses and cookie replies carry our receiver index (`index << 8 | session`),
//! handshake initiations are opened with our static key (`parse_handshake_anon`, after the
//! shared rate limiter has checked mac1, so an unauthenticated flood costs no DH) to learn the
//! initiator's static key. A peer's endpoint follows the source of its last authenticated
//! packet (roaming).

use super::peers::{diff, PeerChange, PeerConfig};
use super::route::RouteTable;
use super::Counters;
use crate::keys::{NodePublic, PrivateKey};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Handshakes per second the shared rate limiter lets through before demanding cookies
/// (boringtun's device uses the same figure).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Room for the largest UDP datagram plus WireGuard's overhead.
const BUF_LEN: usize = 65536 + 64;
/// A peer can list many endpoints; a handshake is sprayed to at most this many.
const MAX_CANDIDATES: usize = 16;

/// WireGuard message types (first byte, little-endian u32).
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;
const MSG_DATA: u8 = 4;

/// How a peer is reached. The relay path (`Derp { region }`) is added with DERP support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Path {
    /// Straight over UDP to this address.
    Direct(SocketAddr),
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// One datagram for the driver to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub path: Path,
    pub payload: Vec<u8>,
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
    /// The peer's home DERP region (0 = none).
    pub home_derp: i32,
}

struct Peer {
    tunn: Box<Tunn>,
    index: u32,
    endpoint: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    home_derp: i32,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// All tunnels and the routing table.
pub(crate) struct WgRouter {
    secret: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: HashMap<NodePublic, Peer>,
    configs: BTreeMap<NodePublic, PeerConfig>,
    by_index: HashMap<u32, NodePublic>,
    routes: RouteTable,
    next_index: u32,
    buf: Box<[u8]>,
    counters: Arc<Counters>,
    last_rate_reset: Option<Instant>,
}

impl std::fmt::Debug for WgRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgRouter").field("peers", &self.configs.keys()).field("routes", &self.routes).finish()
    }
}

impl WgRouter {
    pub(crate) fn new(key: &PrivateKey, counters: Arc<Counters>) -> WgRouter {
        let secret = StaticSecret::from(key.to_bytes());
        let public = PublicKey::from(&secret);
        WgRouter {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            peers: HashMap::new(),
            configs: BTreeMap::new(),
            by_index: HashMap::new(),
            routes: RouteTable::build([]),
            // Indices only need to be unique locally; a random start keeps restarts apart.
            next_index: rand::random::<u32>() & 0x00ff_ffff,
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            counters,
            last_rate_reset: None,
        }
    }

    /// Reconciles the tunnels with the netmap's peers: new peers get a tunnel, gone peers lose
    /// theirs, changed endpoints or routes keep the tunnel (and its session).
    pub(crate) fn set_peers(&mut self, desired: BTreeMap<NodePublic, PeerConfig>) {
        for change in diff(&self.configs, &desired) {
            match change {
                PeerChange::Remove(k) => {
                    if let Some(p) = self.peers.remove(&k) {
                        self.by_index.remove(&p.index);
                    }
                    tracing::debug!(peer = %k.short(), "peer removed");
                }
                PeerChange::Add(cfg) => {
                    let index = self.alloc_index();
                    let tunn = Tunn::new(
                        self.secret.clone(),
                        PublicKey::from(cfg.key.0),
                        None,
                        None,
                        index,
                        Some(Arc::clone(&self.rate_limiter)),
                    );
                    self.by_index.insert(index, cfg.key);
                    self.peers.insert(
                        cfg.key,
                        Peer {
                            tunn: Box::new(tunn),
                            index,
                            endpoint: None,
                            candidates: cfg.endpoints.iter().copied().take(MAX_CANDIDATES).collect(),
                            home_derp: cfg.home_derp,
                            rx_bytes: 0,
                            tx_bytes: 0,
                        },
                    );
                    tracing::debug!(peer = %cfg.key.short(), endpoints = ?cfg.endpoints, "peer added");
                }
                PeerChange::Update(cfg) => {
                    if let Some(p) = self.peers.get_mut(&cfg.key) {
                        p.candidates = cfg.endpoints.iter().copied().take(MAX_CANDIDATES).collect();
                        p.home_derp = cfg.home_derp;
                    }
                }
            }
        }
        self.routes = RouteTable::build(desired.values());
        self.configs = desired;
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

    /// Handles one UDP datagram from `src`. Decrypted IP packets whose source address belongs
    /// to the sending peer are appended to `deliver`; replies (handshake responses,
    /// keepalives, queued data, cookies) to `out`. Anything else is dropped and counted.
    pub(crate) fn handle_datagram(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        out: &mut Vec<Transmit>,
        deliver: &mut Vec<(NodePublic, Vec<u8>)>,
    ) {
        let c = &self.counters;
        let mut cookie = [0u8; 64];
        let key = match self.rate_limiter.verify_packet(Some(src.ip()), data, &mut cookie) {
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
                out.push(Transmit { path: Path::Direct(src), payload: reply.to_vec() });
                return;
            }
            Err(_) => {
                c.rx_malformed.fetch_add(1, Relaxed);
                return;
            }
        };
        let Some(peer) = self.peers.get_mut(&key) else {
            c.rx_unknown_peer.fetch_add(1, Relaxed);
            tracing::trace!(peer = %key.short(), %src, "handshake from a key not in the netmap");
            return;
        };
        let is_data = data.first() == Some(&MSG_DATA);
        let authenticated = match peer.tunn.decapsulate(Some(src.ip()), data, &mut self.buf) {
            TunnResult::Done => is_data,
            TunnResult::Err(e) => {
                count_error(c, &e);
                tracing::trace!(peer = %key.short(), %src, error = ?e, "dropped datagram");
                false
            }
            TunnResult::WriteToNetwork(reply) => {
                // A cookie reply answers an unverified handshake; anything else (handshake
                // response, keepalive) proves the datagram came from the peer.
                let authed = reply.first() != Some(&MSG_COOKIE_REPLY);
                out.push(Transmit { path: Path::Direct(src), payload: reply.to_vec() });
                peer.tx_bytes += reply.len() as u64;
                // A completed handshake releases the packets queued while it was pending.
                while let TunnResult::WriteToNetwork(p) = peer.tunn.decapsulate(None, &[], &mut self.buf) {
                    peer.tx_bytes += p.len() as u64;
                    out.push(Transmit { path: Path::Direct(src), payload: p.to_vec() });
                }
                authed
            }
            TunnResult::WriteToTunnelV4(packet, ip) => {
                deliver_checked(&self.routes, c, key, IpAddr::V4(ip), packet, deliver);
                true
            }
            TunnResult::WriteToTunnelV6(packet, ip) => {
                deliver_checked(&self.routes, c, key, IpAddr::V6(ip), packet, deliver);
                true
            }
        };
        if authenticated {
            peer.rx_bytes += data.len() as u64;
            if peer.endpoint != Some(src) {
                tracing::debug!(peer = %key.short(), old = ?peer.endpoint, new = %src, "peer path changed");
                peer.endpoint = Some(src);
            }
        }
    }

    /// Encrypts one IP packet from the netstack for the peer that its destination routes to.
    /// Without a session the packet is queued in the tunnel and a handshake goes out.
    pub(crate) fn send_packet(&mut self, packet: &[u8], out: &mut Vec<Transmit>) {
        let c = &self.counters;
        let Some(dst) = Tunn::dst_address(packet) else {
            c.tx_malformed.fetch_add(1, Relaxed);
            return;
        };
        let Some(peer) = self.routes.lookup(dst).and_then(|k| self.peers.get_mut(&k)) else {
            c.tx_no_route.fetch_add(1, Relaxed);
            return;
        };
        match peer.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => emit(peer, p, out, c),
            TunnResult::Err(e) => {
                c.tx_error.fetch_add(1, Relaxed);
                tracing::debug!(error = ?e, "encapsulate failed");
            }
            _ => {}
        }
    }

    /// Drives boringtun's timers (handshake retries, rekey every 2 minutes, keepalives,
    /// session expiry). Call a few times per second.
    pub(crate) fn tick(&mut self, now: Instant, out: &mut Vec<Transmit>) {
        // The shared limiter counts handshakes per period; boringtun's device resets it every
        // second.
        if self.last_rate_reset.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            self.rate_limiter.reset_count();
            self.last_rate_reset = Some(now);
        }
        for (key, peer) in &mut self.peers {
            match peer.tunn.update_timers(&mut self.buf) {
                TunnResult::WriteToNetwork(p) => emit(peer, p, out, &self.counters),
                // Expired means "idle with no session": not an error for an idle peer.
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::debug!(peer = %key.short(), error = ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }

    /// Starts a new handshake with `key` now, as the rekey timer would. False when the peer is
    /// unknown.
    pub(crate) fn force_handshake(&mut self, key: &NodePublic, out: &mut Vec<Transmit>) -> bool {
        let Some(peer) = self.peers.get_mut(key) else {
            return false;
        };
        if let TunnResult::WriteToNetwork(p) = peer.tunn.format_handshake_initiation(&mut self.buf, true) {
            emit(peer, p, out, &self.counters);
        }
        true
    }

    pub(crate) fn stats(&self) -> Vec<PeerStats> {
        let now = SystemTime::now();
        let mut v: Vec<PeerStats> = self
            .peers
            .iter()
            .map(|(k, p)| {
                let (since, ..) = p.tunn.stats();
                PeerStats {
                    node_key: *k,
                    path: p.endpoint.map(Path::Direct),
                    candidates: p.candidates.clone(),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    home_derp: p.home_derp,
                }
            })
            .collect();
        v.sort_by_key(|s| s.node_key);
        v
    }
}

/// Sends a WireGuard message to the peer: to its confirmed endpoint, or, for handshake
/// initiations and while no endpoint is confirmed, to every candidate (a confirmed path can go
/// stale; duplicates are harmless, as the receiver's replay checks drop them).
fn emit(peer: &mut Peer, payload: &[u8], out: &mut Vec<Transmit>, c: &Counters) {
    let is_init = payload.first() == Some(&MSG_HANDSHAKE_INIT);
    if let (Some(ep), false) = (peer.endpoint, is_init) {
        out.push(Transmit { path: Path::Direct(ep), payload: payload.to_vec() });
        peer.tx_bytes += payload.len() as u64;
        return;
    }
    let mut targets: Vec<SocketAddr> = peer.endpoint.into_iter().collect();
    for a in &peer.candidates {
        if !targets.contains(a) {
            targets.push(*a);
        }
    }
    if targets.is_empty() {
        c.tx_no_path.fetch_add(1, Relaxed);
        return;
    }
    for t in targets {
        out.push(Transmit { path: Path::Direct(t), payload: payload.to_vec() });
    }
    peer.tx_bytes += payload.len() as u64;
}

/// Anti-spoofing: a peer may only send from addresses in its own AllowedIPs.
fn deliver_checked(
    routes: &RouteTable,
    c: &Counters,
    key: NodePublic,
    src: IpAddr,
    packet: &[u8],
    deliver: &mut Vec<(NodePublic, Vec<u8>)>,
) {
    if routes.lookup(src) == Some(key) {
        deliver.push((key, packet.to_vec()));
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
mod tests {
    use super::*;
    use crate::dataplane::filter::parse_prefix;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpAddress, IpProtocol, IpRepr, UdpPacket, UdpRepr};

    struct Node {
        key: PrivateKey,
        wg: WgRouter,
        addr: SocketAddr,
    }

    fn node(seed: u8, port: u16) -> Node {
        let key = PrivateKey::from_bytes([seed; 32]);
        let wg = WgRouter::new(&key, Arc::new(Counters::default()));
        Node { key, wg, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }

    fn cfg(of: &Node, ip: &str) -> PeerConfig {
        PeerConfig {
            key: NodePublic(of.key.public_bytes()),
            allowed_ips: vec![parse_prefix(ip).unwrap()],
            endpoints: vec![of.addr],
            home_derp: 0,
        }
    }

    fn connect(a: &mut Node, b: &mut Node) {
        let (ca, cb) = (cfg(b, "100.64.0.2/32"), cfg(a, "100.64.0.1/32"));
        a.wg.set_peers([(ca.key, ca)].into());
        b.wg.set_peers([(cb.key, cb)].into());
    }

    fn udp_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
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

    /// Delivers every transmit to whichever node owns its address until the network is quiet;
    /// returns the packets each side decrypted.
    fn pump(a: &mut Node, b: &mut Node, mut wire: Vec<(SocketAddr, Transmit)>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut got_a, mut got_b) = (vec![], vec![]);
        for _ in 0..20 {
            if wire.is_empty() {
                break;
            }
            let mut next = vec![];
            for (from, t) in wire.drain(..) {
                let Path::Direct(to) = t.path;
                let (n, got) = if to == a.addr { (&mut *a, &mut got_a) } else { (&mut *b, &mut got_b) };
                let (mut out, mut del) = (vec![], vec![]);
                n.wg.handle_datagram(from, &t.payload, &mut out, &mut del);
                got.extend(del.into_iter().map(|(_, p)| p));
                next.extend(out.into_iter().map(|t| (n.addr, t)));
            }
            wire = next;
        }
        (got_a, got_b)
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
        assert_eq!(b.wg.stats()[0].path, Some(Path::Direct(a.addr)));

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
        assert_eq!(b.wg.stats()[0].path, Some(Path::Direct(moved)));

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
        assert!(a.wg.stats().is_empty());
        assert!(!a.wg.force_handshake(&NodePublic(b.key.public_bytes()), &mut out));
    }
}
