//! The NAT middlebox as a turmoil host: thin plumbing around the sans-IO [`Nat`] table.
//!
//! Inside hosts send encapsulated packets to [`NAT_INSIDE_PORT`]; the table decides, and the
//! packet leaves from a public port (a socket bound on demand through this host's own uplink,
//! so a NAT behind another NAT is a CGNAT chain). Packets arriving on public ports are
//! filtered and forwarded encapsulated with their real source.

use crate::nat::{Inbound, Nat, Outbound};
use crate::net::{encap, TurmoilNet, NAT_INSIDE_PORT};
use citadel::net::{Datagram, Net};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Counters of what a NAT did (shown in reports).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NatStats {
    /// Packets sent out.
    pub out: u64,
    /// Packets let in.
    pub inbound: u64,
    /// Packets hairpinned.
    pub hairpin: u64,
    /// Drops by reason.
    pub dropped: BTreeMap<&'static str, u64>,
}

/// A NAT shared between its host software and the world (which reconfigures it on faults).
#[derive(Debug)]
pub struct NatBox {
    /// The table.
    pub nat: Mutex<Nat>,
    /// Counters.
    pub stats: Mutex<NatStats>,
}

impl NatBox {
    /// Wraps a table.
    pub fn new(nat: Nat) -> Arc<Self> {
        Arc::new(NatBox { nat: Mutex::new(nat), stats: Mutex::default() })
    }

    fn drop_pkt(&self, why: &'static str) {
        *self.stats.lock().unwrap().dropped.entry(why).or_default() += 1;
    }
}

/// The NAT host's software: runs until the host is crashed.
pub async fn run(nb: Arc<NatBox>, net: TurmoilNet) -> turmoil::Result {
    // The inside leg is the LAN itself, never behind this NAT's own uplink.
    let inside: Arc<dyn Datagram> =
        TurmoilNet::public().bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), NAT_INSIDE_PORT)).await?.into();
    let mut public: BTreeMap<u16, Arc<dyn Datagram>> = BTreeMap::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<(u16, SocketAddr, Vec<u8>)>();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = inside.recv_from(&mut buf) => {
                let (n, from) = r?;
                let Some((dst, payload)) = encap::unwrap(&buf[..n]) else {
                    nb.drop_pkt("malformed");
                    continue;
                };
                let verdict = nb.nat.lock().unwrap().outbound(tokio::time::Instant::now(), from, dst);
                match verdict {
                    Outbound::Forward { port, to } => {
                        let sock = match public.get(&port) {
                            Some(s) => s.clone(),
                            None => {
                                let s: Arc<dyn Datagram> =
                                    net.bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)).await?.into();
                                spawn_reader(port, s.clone(), tx.clone());
                                public.insert(port, s.clone());
                                s
                            }
                        };
                        nb.stats.lock().unwrap().out += 1;
                        sock.send_to(payload, to).await?;
                    }
                    Outbound::Hairpin { to, from } => {
                        nb.stats.lock().unwrap().hairpin += 1;
                        inside.send_to(&encap::wrap(from, payload), to).await?;
                    }
                    Outbound::Drop(why) => nb.drop_pkt(why),
                }
            }
            Some((port, from, payload)) = rx.recv() => {
                let verdict = nb.nat.lock().unwrap().inbound(tokio::time::Instant::now(), port, from);
                match verdict {
                    Inbound::Forward(to) => {
                        nb.stats.lock().unwrap().inbound += 1;
                        inside.send_to(&encap::wrap(from, &payload), to).await?;
                    }
                    Inbound::Drop(why) => nb.drop_pkt(why),
                }
            }
        }
    }
}

fn spawn_reader(port: u16, sock: Arc<dyn Datagram>, tx: mpsc::UnboundedSender<(u16, SocketAddr, Vec<u8>)>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if tx.send((port, from, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
}
