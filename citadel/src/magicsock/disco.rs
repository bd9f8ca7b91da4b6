//! Disco, Tailscale's path discovery: pings, pongs and call-me-maybe, sealed with the peers'
//! disco keys, arriving on the WireGuard socket or over DERP. [`Disco`] holds the keys; the
//! handlers here feed each peer's path state ([`super::endpoint::PeerPaths`]) and answer
//! through the same [`Transmit`]s as WireGuard.

use super::endpoint::Probe;
use crate::dataplane::peers::PeerConfig;
use crate::dataplane::wg::{Peer, Source, Transmit, WgRouter, DERP_MAGIC_IP};
use crate::disco::{self, SharedKey};
use crate::keys::{DiscoPublic, NodePublic, PrivateKey};
use boringtun::noise::TunnResult;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// This node's disco key, which peer owns each disco key, and the endpoints we advertise.
#[derive(Default)]
pub(crate) struct Disco {
    /// Our disco key and its public half (every peer's box key starts from them).
    key: Option<(std::sync::Arc<PrivateKey>, DiscoPublic)>,
    by_disco: BTreeMap<DiscoPublic, NodePublic>,
    /// Our endpoints, sent in call-me-maybe.
    my_endpoints: Vec<SocketAddr>,
}

impl Disco {
    /// Enables disco with this key (peers with a disco key get path discovery).
    pub(crate) fn set_key(&mut self, key: &PrivateKey) {
        self.key = Some((std::sync::Arc::new(key.clone()), DiscoPublic(key.public_bytes())));
    }

    /// Our endpoints, as advertised in call-me-maybe.
    pub(crate) fn set_my_endpoints(&mut self, eps: Vec<SocketAddr>) {
        self.my_endpoints = eps;
    }

    /// The box key for a peer's disco key; `None` without disco (plain WireGuard peers).
    pub(crate) fn shared_for(&self, cfg: &PeerConfig) -> Option<SharedKey> {
        match (&self.key, cfg.disco.is_zero()) {
            (Some((k, public)), false) => Some(SharedKey::with_public(k.clone(), *public, &cfg.disco)),
            _ => None,
        }
    }

    /// The probe an authenticated WireGuard datagram from `from` triggers, sealed (see
    /// [`super::endpoint::PeerPaths::on_authenticated_udp`]).
    pub(crate) fn after_udp(
        &self,
        peer: &mut Peer,
        key: NodePublic,
        derp_ok: bool,
        from: SocketAddr,
        now: Instant,
        me: NodePublic,
    ) -> Option<Transmit> {
        // Without disco, an authenticated packet is the only proof a path works.
        let proves_path = peer.disco.is_none();
        let probe = peer.paths.on_authenticated_udp(from, now, proves_path)?;
        self.probe_transmit(peer.disco.as_ref(), key, peer.derp_region(derp_ok), &probe, me)
    }

    /// Records that `peer` holds the disco key of `shared`.
    pub(crate) fn attach(&mut self, shared: Option<&SharedKey>, peer: NodePublic) {
        if let Some(d) = shared {
            self.by_disco.insert(d.peer(), peer);
        }
    }

    /// Forgets the owner of the disco key of `shared`.
    pub(crate) fn detach(&mut self, shared: Option<&SharedKey>) {
        if let Some(d) = shared {
            self.by_disco.remove(&d.peer());
        }
    }

    /// Seals one probe for `key`. `None` when it needs DERP (`region`) and there is none.
    pub(crate) fn probe_transmit(
        &self,
        shared: Option<&SharedKey>,
        key: NodePublic,
        region: Option<i32>,
        probe: &Probe,
        me: NodePublic,
    ) -> Option<Transmit> {
        let shared = shared?;
        let nonce: [u8; disco::NONCE_LEN] = rand::random();
        match probe {
            Probe::PingUdp { addr, tx_id } => {
                let m = disco::Message::Ping(disco::Ping { tx_id: *tx_id, node_key: me, padding: 0 });
                Some(Transmit::udp(*addr, shared.seal(nonce, &m)))
            }
            Probe::PingDerp { tx_id } => {
                let m = disco::Message::Ping(disco::Ping { tx_id: *tx_id, node_key: me, padding: 0 });
                Some(Transmit::derp(region?, key, shared.seal(nonce, &m)))
            }
            Probe::CallMeMaybe => {
                let m = disco::Message::CallMeMaybe(disco::CallMeMaybe { endpoints: self.my_endpoints.clone() });
                Some(Transmit::derp(region?, key, shared.seal(nonce, &m)))
            }
        }
    }
}

impl WgRouter {
    /// Handles one disco packet (already recognised by [`disco::looks_like_disco`]) from `src`.
    /// Packets from disco keys not in the netmap, that fail to open, or that do not make sense
    /// on the path they came over are dropped.
    pub(crate) fn handle_disco(&mut self, src: Source, packet: &[u8], out: &mut Vec<Transmit>) {
        self.sync_clock();
        let now = self.now;
        let derp_ok = self.derp_ok;
        let me = self.me();
        let Some(sender) = disco::sender(packet) else { return };
        let Some(key) = self.disco.by_disco.get(&sender).copied() else {
            self.counters.rx_unknown_peer.fetch_add(1, Relaxed);
            tracing::trace!(?src, "disco from a key not in the netmap");
            return;
        };
        let Some(peer) = self.peers.get_mut(&key) else { return };
        if let Source::Derp { key: via, .. } = src {
            // DERP authenticates the sender's node key: it must be the disco key's owner.
            if via != key {
                self.counters.rx_rejected.fetch_add(1, Relaxed);
                return;
            }
        }
        let Some(shared) = &peer.disco else { return };
        let msg = match shared.open(packet) {
            Ok(m) => m,
            Err(e) => {
                self.counters.rx_rejected.fetch_add(1, Relaxed);
                tracing::trace!(peer = %key.short(), ?src, error = %e, "dropped disco packet");
                return;
            }
        };
        let seal = |shared: &SharedKey, m: &disco::Message| shared.seal(rand::random(), m);
        match &msg {
            disco::Message::Ping(_) => self.counters.disco_pings_rx.fetch_add(1, Relaxed),
            disco::Message::Pong(_) => self.counters.disco_pongs_rx.fetch_add(1, Relaxed),
            disco::Message::CallMeMaybe(_) => 0,
        };
        let region = peer.derp_region(derp_ok);
        match (msg, src) {
            (disco::Message::Ping(p), Source::Udp(addr)) => {
                if !p.node_key.is_zero() && p.node_key != key {
                    self.counters.rx_rejected.fetch_add(1, Relaxed);
                    return;
                }
                let Ok(probe) = peer.paths.on_ping(p.tx_id, addr, now) else {
                    // A replay (maybe from a spoofed address): no pong, nothing learned.
                    self.counters.rx_rejected.fetch_add(1, Relaxed);
                    return;
                };
                let pong = disco::Message::Pong(disco::Pong { tx_id: p.tx_id, src: addr });
                out.push(Transmit::udp(addr, seal(shared, &pong)));
                tracing::trace!(peer = %key.short(), %addr, "disco ping over UDP");
                if let Some(probe) = probe {
                    out.extend(self.disco.probe_transmit(Some(shared), key, region, &probe, me));
                }
            }
            (disco::Message::Ping(p), Source::Derp { region: via, .. }) => {
                let src = SocketAddr::from((DERP_MAGIC_IP, u16::try_from(via).unwrap_or(0)));
                let pong = disco::Message::Pong(disco::Pong { tx_id: p.tx_id, src });
                out.push(Transmit::derp(region.unwrap_or(via), key, seal(shared, &pong)));
            }
            (disco::Message::Pong(p), Source::Udp(addr)) => {
                if peer.paths.on_pong_udp(p.tx_id, addr, now) {
                    tracing::debug!(peer = %key.short(), %addr, latency = ?peer.paths.direct_latency(), "direct path confirmed");
                    // The peer is alive and reachable now. If our handshake is still pending,
                    // its initiation was probably lost (e.g. relayed before the peer was ready):
                    // resend it over the new path instead of waiting for the 5 s retry.
                    if peer.tunn.stats().0.is_none() {
                        if let TunnResult::WriteToNetwork(hs) =
                            peer.tunn.format_handshake_initiation(&mut self.buf, true)
                        {
                            out.push(Transmit::udp(addr, hs.to_vec()));
                        }
                    }
                }
            }
            (disco::Message::Pong(p), Source::Derp { .. }) => peer.paths.on_pong_derp(p.tx_id, now),
            (disco::Message::CallMeMaybe(cmm), Source::Derp { .. }) => {
                tracing::debug!(peer = %key.short(), endpoints = ?cmm.endpoints, "call-me-maybe");
                for probe in peer.paths.on_call_me_maybe(&cmm.endpoints, now) {
                    out.extend(self.disco.probe_transmit(Some(shared), key, region, &probe, me));
                }
            }
            // Call-me-maybe is only meaningful over DERP (Tailscale ignores it over UDP).
            (disco::Message::CallMeMaybe(_), Source::Udp(_)) => {}
        }
    }

    /// Runs the disco timers of all peers now (cheap when nothing is due).
    pub(crate) fn poll_disco(&mut self, out: &mut Vec<Transmit>) {
        let me = self.me();
        let (now, derp_ok) = (self.now, self.derp_ok);
        for (key, peer) in &mut self.peers {
            let Some(shared) = &peer.disco else { continue };
            let region = peer.derp_region(derp_ok);
            for probe in peer.paths.poll(now, region.is_some()) {
                out.extend(self.disco.probe_transmit(Some(shared), *key, region, &probe, me));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wg::tests::{cfg, node, udp_packet, Node};
    use crate::dataplane::wg::Path;
    use crate::magicsock::endpoint::PeerPaths;
    use std::time::Duration;

    /// Two routers with disco keys and a home region: the first packet goes over DERP, pings
    /// and call-me-maybe go out, a pong confirms the direct path, and hostile disco input is
    /// dropped without effect.
    #[test]
    fn disco_upgrades_derp_to_direct_and_drops_hostile_input() {
        let (mut a, mut b) = (node(1, 1001), node(2, 1002));
        let (da, db) = (PrivateKey::from_bytes([11; 32]), PrivateKey::from_bytes([12; 32]));
        a.wg.set_disco_key(&da);
        b.wg.set_disco_key(&db);
        let with = |of: &Node, d: &PrivateKey, ip: &str| PeerConfig {
            disco: DiscoPublic(d.public_bytes()),
            home_derp: 1,
            ..cfg(of, ip)
        };
        let (ca, cb) = (with(&b, &db, "100.64.0.2/32"), with(&a, &da, "100.64.0.1/32"));
        a.wg.set_peers([(ca.key, ca)].into());
        b.wg.set_peers([(cb.key, cb)].into());
        for n in [&mut a, &mut b] {
            n.wg.set_derp_ok(true);
            let addr = n.addr;
            n.wg.set_my_endpoints(vec![addr]);
        }
        let ka = NodePublic(a.key.public_bytes());

        // The first packet (a handshake) goes over DERP only: nothing is confirmed yet.
        let mut out = vec![];
        a.wg.send_packet(&udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"hi"), &mut out);
        assert_eq!(out.iter().map(|t| t.path).collect::<Vec<_>>(), vec![Path::Derp(1)]);
        // Discovery: a ping to each candidate, a DERP ping and a call-me-maybe.
        let mut probes = vec![];
        a.wg.poll_disco(&mut probes);
        assert!(probes.iter().any(|t| t.path == Path::Direct(b.addr)));
        assert_eq!(probes.iter().filter(|t| t.path == Path::Derp(1)).count(), 2);

        // B answers the UDP ping with a pong to its source; A takes it and goes direct.
        let ping = probes.iter().find(|t| t.path == Path::Direct(b.addr)).unwrap();
        let mut back = vec![];
        b.wg.handle_disco(Source::Udp(a.addr), &ping.payload, &mut back);
        let pong = back.iter().find(|t| t.path == Path::Direct(a.addr)).expect("pong to the ping's source");
        // ...and pings back at once (completing the punch from its side).
        assert_eq!(back.iter().filter(|t| t.path == Path::Direct(a.addr)).count(), 2, "{back:?}");
        a.wg.handle_disco(Source::Udp(b.addr), &pong.payload, &mut vec![]);
        assert_eq!(a.wg.stats(crate::clock::now())[0].path, Some(Path::Direct(b.addr)));
        let mut out = vec![];
        a.wg.send_packet(&udp_packet([100, 64, 0, 1], [100, 64, 0, 2], b"hi"), &mut out);
        assert!(out.iter().all(|t| t.path == Path::Direct(b.addr)), "{out:?}");

        // Hostile input: garbage with the magic, a ping relayed by DERP under another node key,
        // a pong for no ping, a replayed pong from another address.
        let before = b.wg.stats(crate::clock::now());
        let mut junk = disco::MAGIC.to_vec();
        junk.extend_from_slice(&[0u8; 100]);
        let mut o = vec![];
        b.wg.handle_disco(Source::Udp(a.addr), &junk, &mut o);
        b.wg.handle_disco(Source::Derp { region: 1, key: NodePublic([9; 32]) }, &ping.payload, &mut o);
        assert!(o.is_empty(), "{o:?}");
        let stranger: SocketAddr = "192.0.2.66:1".parse().unwrap();
        let mut c = PeerPaths::new(&[]);
        assert!(!c.on_pong_udp([0; 12], stranger, crate::clock::now()));
        a.wg.handle_disco(Source::Udp(stranger), &pong.payload, &mut o);
        assert_eq!(a.wg.stats(crate::clock::now())[0].path, Some(Path::Direct(b.addr)));
        assert_eq!(b.wg.stats(crate::clock::now()), before);

        // A call-me-maybe over DERP makes B ping the listed endpoints at once.
        let cmm = probes.iter().filter(|t| t.path == Path::Derp(1)).find_map(|t| {
            let (_, m) = disco::open(&db, &t.payload).ok()?;
            matches!(m, disco::Message::CallMeMaybe(_)).then(|| t.payload.clone())
        });
        let mut o = vec![];
        // (after the per-address ping gap, or the ping back above already covers it)
        b.wg.set_now(crate::clock::now() + Duration::from_secs(1));
        b.wg.handle_disco(Source::Derp { region: 1, key: ka }, &cmm.expect("call-me-maybe"), &mut o);
        assert!(o.iter().any(|t| t.path == Path::Direct(a.addr)), "{o:?}");
        // The pong B sends over DERP to a DERP ping names the region as its source.
        let dping = probes
            .iter()
            .filter(|t| t.path == Path::Derp(1))
            .find(|t| matches!(disco::open(&db, &t.payload), Ok((_, disco::Message::Ping(_)))));
        let mut o = vec![];
        b.wg.handle_disco(Source::Derp { region: 1, key: ka }, &dping.unwrap().payload, &mut o);
        let (_, m) = disco::open(&da, &o[0].payload).unwrap();
        assert!(matches!(m, disco::Message::Pong(p) if p.src == SocketAddr::from((DERP_MAGIC_IP, 1))));
        assert_eq!((o[0].path, o[0].peer), (Path::Derp(1), ka));
    }
}
