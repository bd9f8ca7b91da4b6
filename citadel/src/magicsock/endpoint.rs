//! Per-peer path selection (Tailscale's "magicsock" endpoint logic), sans-IO: every method
//! takes the current time, and what to send comes back as [`Probe`]s for the caller to seal
//! and transmit.
//!
//! A peer starts on its home DERP region. Disco pings go to each direct candidate (the
//! netmap's endpoints, addresses the peer pinged us from, and what it listed in a
//! call-me-maybe); a pong from a candidate confirms it as a direct path, the fastest one wins,
//! and it stays trusted for [`TRUST_DURATION`] after its last pong. While the peer is active
//! the best path is re-pinged every [`HEARTBEAT`], so a path that stops answering is dropped
//! (traffic falls back to DERP) within [`TRUST_DURATION`]. Roaming: an authenticated packet
//! from a new address (WireGuard data or a disco ping) makes that address the path.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a direct path is used after its last proof (Tailscale's `trustUDPAddrDuration`).
pub const TRUST_DURATION: Duration = Duration::from_millis(6500);
/// Re-ping interval of the best path while the peer is active (Tailscale: 3 s heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// Minimum gap between full discovery rounds (all candidates plus a call-me-maybe).
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// A peer with no traffic for this long gets no more pings (pings cost the peer wakeups).
pub const ACTIVE_TIMEOUT: Duration = Duration::from_secs(45);
/// A ping unanswered this long is forgotten.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Minimum gap between two pings to the same address (avoids ping storms when pings answer
/// pings).
pub const MIN_PING_GAP: Duration = Duration::from_millis(500);
/// Candidates kept per peer; extras (from a hostile call-me-maybe, say) are ignored.
pub const MAX_CANDIDATES: usize = 16;
/// Pending pings kept per peer.
const MAX_PENDING: usize = 64;
/// A new path must beat the current one by this much to replace it (avoids flapping).
const BETTER_BY: Duration = Duration::from_millis(1);

/// Something the path logic wants sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A disco ping with this tx id to a direct address.
    PingUdp {
        /// The endpoint pinged.
        addr: SocketAddr,
        /// Transaction ID of the ping.
        tx_id: [u8; 12],
    },
    /// A disco ping over DERP (measures the relay; keeps the peer's DERP route warm).
    PingDerp {
        /// Transaction ID of the ping.
        tx_id: [u8; 12],
    },
    /// Our endpoints over DERP, so the peer pings us too (hole punching).
    CallMeMaybe,
}

#[derive(Debug, Clone, Copy)]
struct Best {
    addr: SocketAddr,
    latency: Option<Duration>,
    trusted_until: Instant,
}

/// Where to send and what is known about one peer's paths.
#[derive(Debug, Clone)]
pub struct PeerPaths {
    /// Direct candidates (netmap endpoints first).
    candidates: Vec<SocketAddr>,
    /// Addresses learned from the peer itself (pings, call-me-maybe), kept across netmap
    /// updates.
    learned: Vec<SocketAddr>,
    best: Option<Best>,
    /// tx id → (address, sent at); `None` address for a DERP ping.
    pending: BTreeMap<[u8; 12], (Option<SocketAddr>, Instant)>,
    last_ping: BTreeMap<SocketAddr, Instant>,
    /// Pings sent in answer to the peer (its ping, its call-me-maybe), limited on their own:
    /// the discovery ping that punched our NAT usually left just before, and must not hold
    /// back the answer that completes the punch (that would cost a heartbeat, 3 s).
    last_ping_back: BTreeMap<SocketAddr, Instant>,
    /// Where the peer's authenticated packets last came from, and when.
    seen_from: Option<(SocketAddr, Instant)>,
    last_discovery: Option<Instant>,
    last_heartbeat: Option<Instant>,
    last_active: Option<Instant>,
    derp_latency: Option<Duration>,
    /// Transaction ids of the peer's recent pings: a ping seen again is a replay.
    seen_pings: VecDeque<[u8; 12]>,
}

/// How many of a peer's ping ids are remembered to refuse replays.
const PING_REPLAY_WINDOW: usize = 256;

/// A disco ping whose transaction id was already seen: a replay, ignored entirely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayedPing;

impl PeerPaths {
    /// Paths to a peer with these netmap endpoints.
    pub fn new(candidates: &[SocketAddr]) -> Self {
        let mut p = PeerPaths {
            candidates: Vec::new(),
            learned: Vec::new(),
            best: None,
            pending: BTreeMap::new(),
            last_ping: BTreeMap::new(),
            last_ping_back: BTreeMap::new(),
            seen_from: None,
            last_discovery: None,
            last_heartbeat: None,
            last_active: None,
            derp_latency: None,
            seen_pings: VecDeque::new(),
        };
        p.set_candidates(candidates);
        p
    }

    /// Replaces the netmap's candidates (the peer's endpoints changed). A confirmed path stays
    /// until it stops answering: the peer may simply have dropped an endpoint we do not use.
    pub fn set_candidates(&mut self, c: &[SocketAddr]) {
        self.candidates = c.iter().copied().take(MAX_CANDIDATES).collect();
        self.candidates.dedup();
        // New endpoints deserve a look soon.
        self.last_discovery = None;
    }

    /// Every direct address worth pinging.
    pub fn all_candidates(&self) -> Vec<SocketAddr> {
        let mut v = self.candidates.clone();
        for a in &self.learned {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    }

    /// The trusted direct path, if any.
    pub fn direct(&self, now: Instant) -> Option<SocketAddr> {
        self.best.filter(|b| now < b.trusted_until).map(|b| b.addr)
    }

    /// The last direct path, trusted or not (a hint worth trying beside DERP).
    pub fn last_direct(&self) -> Option<SocketAddr> {
        self.best.map(|b| b.addr)
    }

    /// Latency of the best direct path from its pongs.
    pub fn direct_latency(&self) -> Option<Duration> {
        self.best.and_then(|b| b.latency)
    }

    /// Latency over DERP from the last DERP pong.
    pub fn derp_latency(&self) -> Option<Duration> {
        self.derp_latency
    }

    /// Traffic to or from the peer: keeps the heartbeat going; the first activity after a
    /// quiet period starts discovery at once (the next [`PeerPaths::poll`]).
    pub fn note_active(&mut self, now: Instant) {
        let was_idle = self.last_active.is_none_or(|t| now.saturating_duration_since(t) > ACTIVE_TIMEOUT);
        self.last_active = Some(now);
        if was_idle && self.direct(now).is_none() {
            self.last_discovery = None;
        }
    }

    pub(crate) fn is_active(&self, now: Instant) -> bool {
        self.last_active.is_some_and(|t| now.saturating_duration_since(t) <= ACTIVE_TIMEOUT)
    }

    fn learn(&mut self, addr: SocketAddr) {
        if !self.candidates.contains(&addr) && !self.learned.contains(&addr) {
            if self.learned.len() >= MAX_CANDIDATES {
                self.learned.remove(0);
            }
            self.learned.push(addr);
        }
    }

    /// An authenticated WireGuard packet arrived from `addr` over UDP. For a plain WireGuard
    /// peer (`proves_path`, no disco) that is the only evidence there is, and the path follows
    /// it (roaming). For a disco peer it only shows that the peer reaches us from there, not that
    /// our packets reach it (a NAT may filter the way back), so the address is pinged instead and
    /// the pong decides. Returns the ping to send, if any.
    pub fn on_authenticated_udp(&mut self, addr: SocketAddr, now: Instant, proves_path: bool) -> Option<Probe> {
        self.learn(addr);
        self.seen_from = Some((addr, now));
        if proves_path {
            match &mut self.best {
                Some(b) if b.addr == addr => b.trusted_until = now + TRUST_DURATION,
                _ => self.best = Some(Best { addr, latency: None, trusted_until: now + TRUST_DURATION }),
            }
            return None;
        }
        if self.direct(now) == Some(addr) {
            return None;
        }
        self.ping(addr, now)
    }

    /// A disco ping came from `addr` over UDP. Returns the probe to send back when we have no
    /// trusted path there yet: pinging back completes the hole punch from our side.
    pub fn on_ping_from(&mut self, addr: SocketAddr, now: Instant) -> Option<Probe> {
        self.learn(addr);
        // The ping is sealed by the peer, so it sends from here now. A replay from elsewhere
        // gains nothing: only a pong sealed by the peer moves the path.
        self.seen_from = Some((addr, now));
        self.note_active(now);
        if self.direct(now) == Some(addr) {
            return None;
        }
        self.ping_back(addr, now)
    }

    /// A disco ping with transaction id `tx_id` came from `addr` over UDP. A replayed ping
    /// (seen before, from anywhere) is refused before it can teach an address, evict a learned
    /// one or trigger a ping back; otherwise as [`Self::on_ping_from`].
    pub fn on_ping(&mut self, tx_id: [u8; 12], addr: SocketAddr, now: Instant) -> Result<Option<Probe>, ReplayedPing> {
        if self.seen_pings.contains(&tx_id) {
            return Err(ReplayedPing);
        }
        if self.seen_pings.len() >= PING_REPLAY_WINDOW {
            self.seen_pings.pop_front();
        }
        self.seen_pings.push_back(tx_id);
        Ok(self.on_ping_from(addr, now))
    }

    /// The peer asked us to ping `endpoints` (call-me-maybe, over DERP): ping them all now.
    pub fn on_call_me_maybe(&mut self, endpoints: &[SocketAddr], now: Instant) -> Vec<Probe> {
        for e in endpoints.iter().take(MAX_CANDIDATES) {
            self.learn(*e);
        }
        self.note_active(now);
        endpoints.iter().take(MAX_CANDIDATES).filter_map(|e| self.ping_back(*e, now)).collect()
    }

    /// A pong over UDP from `from` answering `tx_id`: the address the ping went to is a
    /// working path. The pong may come back from another address (the peer's NAT maps each
    /// destination to its own port) and still counts: it is sealed by the peer's disco key and
    /// echoes a transaction id only that ping carried, so the ping reached the peer, and
    /// WireGuard replies are taken from any address once authenticated (Tailscale does the
    /// same). Returns true when the best path changed.
    pub fn on_pong_udp(&mut self, tx_id: [u8; 12], from: SocketAddr, now: Instant) -> bool {
        let Some((Some(to), sent)) = self.pending.get(&tx_id).copied() else {
            return false;
        };
        if to != from {
            tracing::trace!(%to, %from, "pong from another address than the ping went to");
        }
        self.pending.remove(&tx_id);
        let rtt = now.saturating_duration_since(sent);
        let trusted_until = now + TRUST_DURATION;
        match &mut self.best {
            Some(b) if b.addr == to => {
                b.latency = Some(rtt);
                b.trusted_until = trusted_until;
                false
            }
            // The peer sends from `to` now (it restarted on a new port, or its NAT rebound)
            // and answers there: follow it even if the old path looked as good.
            _ if self.seen_from.is_some_and(|(a, t)| a == to && now.saturating_duration_since(t) < TRUST_DURATION) => {
                self.best = Some(Best { addr: to, latency: Some(rtt), trusted_until });
                true
            }
            Some(b) if now < b.trusted_until && b.latency.is_some_and(|l| l <= rtt + BETTER_BY) => false,
            _ => {
                self.best = Some(Best { addr: to, latency: Some(rtt), trusted_until });
                true
            }
        }
    }

    /// A pong over DERP answering `tx_id`.
    pub fn on_pong_derp(&mut self, tx_id: [u8; 12], now: Instant) {
        if let Some((None, sent)) = self.pending.get(&tx_id).copied() {
            self.pending.remove(&tx_id);
            self.derp_latency = Some(now.saturating_duration_since(sent));
        }
    }

    fn ping_back(&mut self, addr: SocketAddr, now: Instant) -> Option<Probe> {
        if self.last_ping_back.get(&addr).is_some_and(|t| now.saturating_duration_since(*t) < MIN_PING_GAP) {
            return None;
        }
        if self.last_ping_back.len() >= 2 * MAX_CANDIDATES {
            self.last_ping_back.clear();
        }
        self.last_ping_back.insert(addr, now);
        self.last_ping.insert(addr, now);
        let tx_id = self.new_tx(Some(addr), now);
        Some(Probe::PingUdp { addr, tx_id })
    }

    fn ping(&mut self, addr: SocketAddr, now: Instant) -> Option<Probe> {
        if self.last_ping.get(&addr).is_some_and(|t| now.saturating_duration_since(*t) < MIN_PING_GAP) {
            return None;
        }
        self.last_ping.insert(addr, now);
        let tx_id = self.new_tx(Some(addr), now);
        Some(Probe::PingUdp { addr, tx_id })
    }

    fn new_tx(&mut self, addr: Option<SocketAddr>, now: Instant) -> [u8; 12] {
        if self.pending.len() >= MAX_PENDING {
            // Forget the oldest rather than grow without bound.
            if let Some(k) = self.pending.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                self.pending.remove(&k);
            }
        }
        let tx_id: [u8; 12] = rand::random();
        self.pending.insert(tx_id, (addr, now));
        tx_id
    }

    /// Timers: expire old pings, heartbeat the best path, and run discovery while the peer is
    /// active and no direct path is trusted. `can_derp` says whether call-me-maybe and DERP
    /// pings can go out.
    pub fn poll(&mut self, now: Instant, can_derp: bool) -> Vec<Probe> {
        self.pending.retain(|_, (_, t)| now.saturating_duration_since(*t) < PING_TIMEOUT);
        self.last_ping.retain(|_, t| now.saturating_duration_since(*t) < PING_TIMEOUT);
        self.last_ping_back.retain(|_, t| now.saturating_duration_since(*t) < PING_TIMEOUT);
        let mut out = Vec::new();
        if !self.is_active(now) {
            return out;
        }
        let trusted = self.direct(now);
        if let Some(b) = self.best {
            if self.last_heartbeat.is_none_or(|t| now.saturating_duration_since(t) >= HEARTBEAT) {
                self.last_heartbeat = Some(now);
                out.extend(self.ping(b.addr, now));
            }
        }
        let due = self.last_discovery.is_none_or(|t| now.saturating_duration_since(t) >= DISCOVERY_INTERVAL);
        if trusted.is_none() && due {
            self.last_discovery = Some(now);
            for a in self.all_candidates() {
                out.extend(self.ping(a, now));
            }
            if can_derp {
                let tx_id = self.new_tx(None, now);
                out.push(Probe::PingDerp { tx_id });
                out.push(Probe::CallMeMaybe);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pings(v: &[Probe]) -> Vec<(SocketAddr, [u8; 12])> {
        v.iter()
            .filter_map(|p| match p {
                Probe::PingUdp { addr, tx_id } => Some((*addr, *tx_id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn starts_on_derp_upgrades_on_pong_and_falls_back() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[a("192.0.2.1:1"), a("198.51.100.1:2")]);
        assert_eq!(p.direct(t0), None);
        assert!(p.poll(t0, true).is_empty(), "idle peers are not pinged");
        p.note_active(t0);
        let out = p.poll(t0, true);
        let ps = pings(&out);
        assert_eq!(ps.len(), 2);
        assert!(out.contains(&Probe::CallMeMaybe));
        assert!(out.iter().any(|p| matches!(p, Probe::PingDerp { .. })));

        // A pong for a transaction never sent is ignored.
        assert!(!p.on_pong_udp([7; 12], ps[0].0, t0));
        // The slow path answers first, then the fast one: the fast one wins.
        let t1 = t0 + Duration::from_millis(50);
        assert!(p.on_pong_udp(ps[1].1, ps[1].0, t1));
        assert_eq!(p.direct(t1), Some(ps[1].0));
        let t2 = t0 + Duration::from_millis(60);
        assert!(!p.on_pong_udp(ps[0].1, ps[0].0, t2), "60 ms is not better than 50 ms");
        assert_eq!(p.direct(t2), Some(ps[1].0));

        // Heartbeats go to the best path only while trusted.
        p.note_active(t0 + HEARTBEAT);
        let hb = pings(&p.poll(t0 + HEARTBEAT, true));
        assert_eq!(hb.iter().map(|x| x.0).collect::<Vec<_>>(), vec![ps[1].0]);
        // No pong: after the trust window the path is gone and discovery restarts.
        let late = t1 + TRUST_DURATION;
        assert_eq!(p.direct(late), None);
        p.note_active(late);
        let out = p.poll(late + DISCOVERY_INTERVAL, true);
        assert!(out.contains(&Probe::CallMeMaybe));
    }

    #[test]
    fn a_pong_from_another_port_confirms_where_the_ping_went() {
        // The peer's NAT maps each destination to its own port: its pong leaves from a port we
        // never pinged, yet the ping reached it, so the pinged address is the path.
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[a("192.0.2.1:41641")]);
        p.note_active(t0);
        let ps = pings(&p.poll(t0, false));
        assert!(p.on_pong_udp(ps[0].1, a("192.0.2.1:50000"), t0 + Duration::from_millis(20)));
        assert_eq!(p.direct(t0 + Duration::from_millis(20)), Some(a("192.0.2.1:41641")));
        // The same pong again (a replay, from anywhere) changes nothing.
        assert!(!p.on_pong_udp(ps[0].1, a("203.0.113.9:9"), t0 + Duration::from_millis(30)));
        assert_eq!(p.direct(t0 + Duration::from_millis(30)), Some(a("192.0.2.1:41641")));
    }

    #[test]
    fn lower_latency_replaces_and_roaming_follows() {
        let t0 = Instant::now();
        let mut q = PeerPaths::new(&[a("192.0.2.1:1"), a("10.0.0.1:1")]);
        q.note_active(t0);
        let ps = pings(&q.poll(t0, false));
        q.on_pong_udp(ps[0].1, ps[0].0, t0 + Duration::from_millis(40));
        // The second pong's RTT is 45 ms: not better, the first path stays.
        assert!(!q.on_pong_udp(ps[1].1, ps[1].0, t0 + Duration::from_millis(45)));
        assert_eq!(q.direct(t0 + Duration::from_millis(45)), Some(ps[0].0));
        // Once the best path is no longer trusted, any answering path replaces it.
        let stale = t0 + TRUST_DURATION + Duration::from_secs(1);
        q.note_active(stale);
        let again = pings(&q.poll(stale, false));
        let other = again.iter().find(|x| x.0 == ps[1].0).copied().unwrap();
        assert!(q.on_pong_udp(other.1, other.0, stale + Duration::from_millis(30)));
        assert_eq!(q.direct(stale + Duration::from_millis(30)), Some(ps[1].0));

        // Roaming, plain WireGuard peer: authenticated traffic from a new address moves the path.
        let t1 = t0 + Duration::from_secs(1);
        let moved = a("192.0.2.1:5555");
        let mut plain = q.clone();
        assert_eq!(plain.on_authenticated_udp(moved, t1, true), None);
        assert_eq!(plain.direct(t1), Some(moved));
        // Disco peer: the new address is pinged, and only its pong moves the path (the way
        // back may be filtered).
        let Some(Probe::PingUdp { addr, tx_id }) = q.on_authenticated_udp(moved, t1, false) else {
            panic!("expected a ping to the new address")
        };
        assert_eq!(addr, moved);
        assert_eq!(q.direct(t1), Some(ps[1].0), "not moved before the pong");
        assert!(q.all_candidates().contains(&moved));
        // The pong from where the peer now sends moves the path, though the old one was as fast.
        let t2 = t1 + Duration::from_millis(50);
        assert!(q.on_pong_udp(tx_id, moved, t2));
        assert_eq!(q.direct(t2), Some(moved));
    }

    #[test]
    fn pings_answer_with_a_ping_back_once() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[]);
        let from = a("203.0.113.5:41641");
        let back = p.on_ping_from(from, t0);
        let Some(Probe::PingUdp { addr, tx_id }) = back else { panic!("expected a ping back") };
        assert_eq!(addr, from);
        assert_eq!(p.on_ping_from(from, t0 + Duration::from_millis(10)), None, "rate limited");
        assert!(p.on_pong_udp(tx_id, from, t0 + Duration::from_millis(20)));
        // A discovery ping that just left does not hold back the ping answering the peer's.
        let mut q = PeerPaths::new(&[from]);
        q.note_active(t0);
        assert_eq!(pings(&q.poll(t0, false)).len(), 1);
        assert!(q.on_ping_from(from, t0 + Duration::from_millis(1)).is_some());
        assert_eq!(p.on_ping_from(from, t0 + Duration::from_secs(1)), None, "already trusted");
    }

    #[test]
    fn a_replayed_ping_from_a_new_address_changes_nothing() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[]);
        for i in 0..MAX_CANDIDATES as u16 {
            let mut tx = [0u8; 12];
            tx[..2].copy_from_slice(&i.to_be_bytes());
            p.on_ping(tx, SocketAddr::from(([198, 51, 100, 1], 1000 + i)), t0).unwrap();
        }
        let (learned, seen) = (p.learned.clone(), p.seen_from);
        assert_eq!(learned.len(), MAX_CANDIDATES);
        let spoofed = a("203.0.113.66:9999");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.on_ping([0; 12], spoofed, t1), Err(ReplayedPing));
        assert_eq!(p.learned, learned, "a replay evicted a learned endpoint");
        assert_eq!(p.seen_from, seen);
        assert!(p.on_ping([9; 12], spoofed, t1).is_ok(), "a fresh ping is still accepted");
    }

    #[test]
    fn call_me_maybe_pings_listed_endpoints_bounded() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[]);
        let many: Vec<SocketAddr> = (0..100).map(|i| SocketAddr::from(([192, 0, 2, 1], 1000 + i))).collect();
        let out = p.on_call_me_maybe(&many, t0);
        assert_eq!(out.len(), MAX_CANDIDATES);
        assert!(p.all_candidates().len() <= 2 * MAX_CANDIDATES);
        for i in 0..200u16 {
            p.on_ping_from(SocketAddr::from(([198, 51, 100, 1], i)), t0);
        }
        assert!(p.all_candidates().len() <= 2 * MAX_CANDIDATES);
        assert!(p.pending.len() <= MAX_PENDING);
    }

    #[test]
    fn derp_pong_measures_relay() {
        let t0 = Instant::now();
        let mut p = PeerPaths::new(&[]);
        p.note_active(t0);
        let out = p.poll(t0, true);
        let Some(Probe::PingDerp { tx_id }) = out.iter().find(|p| matches!(p, Probe::PingDerp { .. })).cloned() else {
            panic!("no DERP ping")
        };
        p.on_pong_derp(tx_id, t0 + Duration::from_millis(7));
        assert_eq!(p.derp_latency(), Some(Duration::from_millis(7)));
        // Expired pings are forgotten.
        let _ = p.poll(t0 + PING_TIMEOUT + Duration::from_secs(1), true);
        assert!(p.pending.is_empty() || p.pending.values().all(|(_, t)| *t > t0));
    }
}
