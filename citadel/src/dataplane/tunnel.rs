//! A peer's WireGuard tunnel, made only when the peer is first used.
//!
//! A boringtun [`Tunn`] holds room for eight sessions and weighs about 11 KB; a node with a
//! hundred peers it never talks to would keep a megabyte of them and run their timers four times
//! a second. Like Tailscale, which configures WireGuard only with the peers that had traffic
//! recently, a [`LazyTunn`] keeps just what is needed to make its tunnel (the keys, the index,
//! the shared rate limiter) until a packet goes to or comes from the peer. When boringtun
//! reports the connection expired (its sessions and queue already cleared), the tunnel is
//! dropped again, so a peer idle for minutes costs no memory and no timer.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// What [`Tunn::stats`] returns: time since the last handshake, bytes sent and received, loss
/// estimate, last round trip.
pub(crate) type TunnStats = (Option<Duration>, usize, usize, f32, Option<u32>);

/// One peer's tunnel, made on first use (see the module doc). The methods mirror [`Tunn`]'s;
/// those that send or receive make the tunnel, the timers and the statistics do not. Callers
/// point boringtun's clock at the current time before calling, as for a [`Tunn`].
pub(crate) struct LazyTunn {
    secret: StaticSecret,
    peer: PublicKey,
    index: u32,
    rate_limiter: Arc<RateLimiter>,
    live: Option<Box<Tunn>>,
}

impl LazyTunn {
    /// A tunnel to `peer` with our `secret`, receiver `index` and the shared `rate_limiter`;
    /// nothing is made yet.
    pub(crate) fn new(secret: StaticSecret, peer: PublicKey, index: u32, rate_limiter: Arc<RateLimiter>) -> Self {
        LazyTunn { secret, peer, index, rate_limiter, live: None }
    }

    /// True while a boringtun tunnel exists (it has timers to run).
    pub(crate) fn is_live(&self) -> bool {
        self.live.is_some()
    }

    fn tunn(&mut self) -> &mut Tunn {
        let (secret, peer, index, limiter) = (&self.secret, self.peer, self.index, &self.rate_limiter);
        self.live.get_or_insert_with(|| {
            Box::new(Tunn::new(secret.clone(), peer, None, None, index, Some(Arc::clone(limiter))))
        })
    }

    /// [`Tunn::decapsulate`]: a datagram from the peer (empty: the next queued packet). Only
    /// a handshake initiation makes the tunnel: any other message needs a session or a
    /// handshake of ours, which a tunnel not yet made cannot have, so a stranger's datagram
    /// naming this peer's index allocates nothing.
    pub(crate) fn decapsulate<'a>(
        &mut self,
        src: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        if self.live.is_none() {
            if datagram.is_empty() {
                return TunnResult::Done;
            }
            match Tunn::parse_incoming_packet(datagram) {
                Ok(Packet::HandshakeInit(_)) => {}
                Ok(_) => return TunnResult::Err(WireGuardError::NoCurrentSession),
                Err(e) => return TunnResult::Err(e),
            }
        }
        self.tunn().decapsulate(src, datagram, dst)
    }

    /// [`Tunn::encapsulate`]: an IP packet for the peer; without a session it is queued and a
    /// handshake starts.
    pub(crate) fn encapsulate<'a>(&mut self, packet: &[u8], dst: &'a mut [u8]) -> TunnResult<'a> {
        self.tunn().encapsulate(packet, dst)
    }

    /// [`Tunn::format_handshake_initiation`].
    pub(crate) fn format_handshake_initiation<'a>(&mut self, dst: &'a mut [u8], force: bool) -> TunnResult<'a> {
        self.tunn().format_handshake_initiation(dst, force)
    }

    /// [`Tunn::update_timers`]; nothing to do before the tunnel exists. An expired connection
    /// (boringtun has cleared its sessions and queue) gives the tunnel up.
    pub(crate) fn update_timers<'a>(&mut self, dst: &'a mut [u8]) -> TunnResult<'a> {
        let Some(t) = self.live.as_mut() else { return TunnResult::Done };
        let r = t.update_timers(dst);
        if matches!(r, TunnResult::Err(WireGuardError::ConnectionExpired)) {
            self.live = None;
        }
        r
    }

    /// [`Tunn::stats`]; all empty before the tunnel exists.
    pub(crate) fn stats(&self) -> TunnStats {
        match &self.live {
            Some(t) => t.stats(),
            None => (None, 0, 0, 0.0, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::rate_limiter::RateLimiter;

    fn pair() -> (LazyTunn, LazyTunn) {
        let (a, b) = (StaticSecret::from([1u8; 32]), StaticSecret::from([2u8; 32]));
        let (pa, pb) = (PublicKey::from(&a), PublicKey::from(&b));
        let la = Arc::new(RateLimiter::new(&pa, 100));
        let lb = Arc::new(RateLimiter::new(&pb, 100));
        (LazyTunn::new(a, pb, 1, la), LazyTunn::new(b, pa, 2, lb))
    }

    /// Sends one packet from `a` to `b` through a fresh handshake; returns what `b` delivered.
    fn handshake_and_send(a: &mut LazyTunn, b: &mut LazyTunn, packet: &[u8]) -> Vec<u8> {
        let (mut buf, mut buf2) = (vec![0u8; 2048], vec![0u8; 2048]);
        let init = match a.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no handshake initiation for the first packet"),
        };
        let resp = match b.decapsulate(None, &init, &mut buf2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no handshake response"),
        };
        let data = match a.decapsulate(None, &resp, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("the response did not complete the handshake"),
        };
        // The queued packet follows the keepalive that confirms the session.
        let queued = match a.decapsulate(None, &[], &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("the queued packet was not released"),
        };
        assert!(matches!(b.decapsulate(None, &data, &mut buf2), TunnResult::Done | TunnResult::WriteToNetwork(_)));
        match b.decapsulate(None, &queued, &mut buf2) {
            TunnResult::WriteToTunnelV4(p, _) => p.to_vec(),
            _ => panic!("the queued packet was not delivered"),
        }
    }

    fn ipv4_packet() -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[3] = 28;
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 1]);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p
    }

    #[test]
    fn an_unused_tunnel_has_no_state_and_no_timer_work() {
        let (mut a, _) = pair();
        let mut buf = vec![0u8; 256];
        assert!(matches!(a.update_timers(&mut buf), TunnResult::Done));
        assert!(matches!(a.decapsulate(None, &[], &mut buf), TunnResult::Done));
        assert_eq!(a.stats().0, None);
        assert!(!a.is_live(), "timers, statistics and an empty read must not make the tunnel");
    }

    #[test]
    fn only_a_handshake_initiation_makes_the_tunnel_from_outside() {
        let (mut a, mut b) = pair();
        let mut buf = vec![0u8; 2048];
        // A data message naming our index (type 4, receiver 2, counter, a tag's worth).
        let mut data = vec![0u8; 32];
        data[0] = 4;
        data[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(b.decapsulate(None, &data, &mut buf), TunnResult::Err(WireGuardError::NoCurrentSession)));
        assert!(matches!(b.decapsulate(None, &[9, 9, 9], &mut buf), TunnResult::Err(_)));
        assert!(!b.is_live(), "a stranger's datagram made a tunnel");
        let init = match a.encapsulate(&ipv4_packet(), &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no handshake initiation"),
        };
        assert!(matches!(b.decapsulate(None, &init, &mut buf), TunnResult::WriteToNetwork(_)));
        assert!(b.is_live(), "the peer's initiation makes the tunnel");
    }

    #[test]
    fn first_packet_makes_the_tunnel_and_handshakes() {
        let (mut a, mut b) = pair();
        let p = ipv4_packet();
        assert_eq!(handshake_and_send(&mut a, &mut b, &p), p);
        assert!(a.is_live() && b.is_live());
        assert!(a.stats().0.is_some(), "a session exists after the handshake");
    }

    #[test]
    fn an_expired_tunnel_is_given_up_and_made_again_on_the_next_packet() {
        let (mut a, mut b) = pair();
        let p = ipv4_packet();
        handshake_and_send(&mut a, &mut b, &p);
        // Nine minutes without a new handshake: boringtun expires the connection.
        mock_instant::MockClock::advance(Duration::from_secs(9 * 60 + 1));
        let mut buf = vec![0u8; 2048];
        let mut expired = false;
        for _ in 0..4 {
            if let TunnResult::Err(WireGuardError::ConnectionExpired) = a.update_timers(&mut buf) {
                expired = true;
                break;
            }
        }
        assert!(expired, "boringtun never reported the connection expired");
        assert!(!a.is_live(), "an expired tunnel is dropped");
        let _ = b.update_timers(&mut buf);
        assert!(!b.is_live());
        assert_eq!(handshake_and_send(&mut a, &mut b, &p), p, "a new tunnel handshakes again");
    }
}
