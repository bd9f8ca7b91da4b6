//! Reachability probes.
//!
//! - [`NodeProbe`]: the data-plane hook. The mesh (WireGuard/magicsock) implements it; until it
//!   does, "reaches" expectations are reported as not evaluated.
//! - [`punch_agent`] and [`stun_server`]: a raw UDP hole-punch probe that runs on the same
//!   simulated hosts behind the same NATs. It does what disco does (learn the public endpoint
//!   by STUN, ping every endpoint of the peer, answer every ping to its source address) and so
//!   tells which pairs the NAT layer lets connect directly.

use crate::net::TurmoilNet;
use citadel::net::{BoxFuture, Net};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How one node reaches another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Direct UDP between the two nodes' endpoints.
    Direct,
    /// Through a DERP relay.
    Relay,
    /// Not at all.
    None,
}

impl std::fmt::Display for PathKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
            PathKind::None => "none",
        })
    }
}

/// The data-plane hook the mesh implements: send one ping through the mesh to `peer` (its mesh
/// IPv4) and say which path answered, or `None` when no answer came within `timeout`.
///
/// The harness calls it from inside the node's simulated host, so it runs on simulated time
/// and the node's [`crate::net::TurmoilNet`].
pub trait NodeProbe: Send + Sync {
    /// Pings `peer` once.
    fn ping(&self, peer: Ipv4Addr, timeout: Duration) -> BoxFuture<'_, Option<PathKind>>;
}

/// Makes a [`NodeProbe`] for a node once its mesh is up.
pub type ProbeFactory = Arc<dyn Fn(Arc<citadel::mesh::Mesh>) -> Arc<dyn NodeProbe> + Send + Sync>;

/// UDP port of the STUN responder.
pub const STUN_PORT: u16 = 3478;
/// UDP port the punch agents use (Tailscale's default).
pub const AGENT_PORT: u16 = 41641;

/// The rendezvous the punch agents share (what the control plane does for disco): endpoints
/// by node, who should punch whom, and the first time each agent got a pong from each peer.
#[derive(Debug, Default)]
pub struct PunchBoard {
    /// Endpoints each agent advertises (STUN-observed first, then its local address).
    pub endpoints: BTreeMap<String, Vec<SocketAddr>>,
    /// Which peers each agent pings.
    pub targets: BTreeMap<String, BTreeSet<String>>,
    /// `(a, b)` → simulated time `a` first got a pong from `b`.
    pub pongs: BTreeMap<(String, String), Duration>,
}

impl PunchBoard {
    /// Asks `a` and `b` to punch towards each other.
    pub fn add_pair(&mut self, a: &str, b: &str) {
        self.targets.entry(a.to_string()).or_default().insert(b.to_string());
        self.targets.entry(b.to_string()).or_default().insert(a.to_string());
    }

    /// The first time a direct round trip succeeded between `a` and `b` in either direction.
    pub fn direct_since(&self, a: &str, b: &str) -> Option<Duration> {
        let x = self.pongs.get(&(a.to_string(), b.to_string()));
        let y = self.pongs.get(&(b.to_string(), a.to_string()));
        match (x, y) {
            (Some(x), Some(y)) => Some(*x.min(y)),
            (x, y) => x.or(y).copied(),
        }
    }
}

/// Answers every datagram with `stun <observed source>` (a stand-in for a STUN binding).
pub async fn stun_server() -> turmoil::Result {
    let sock = TurmoilNet::public().bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), STUN_PORT)).await?;
    let mut buf = vec![0u8; 2048];
    loop {
        let (_, from) = sock.recv_from(&mut buf).await?;
        sock.send_to(format!("stun {from}").as_bytes(), from).await?;
    }
}

/// A hole-punch agent for node `name` whose local address is `local`: STUNs every second,
/// pings every endpoint of its targets, answers pings, records pongs in `board`.
pub async fn punch_agent(
    name: String,
    local: SocketAddr,
    net: TurmoilNet,
    stun: SocketAddr,
    board: Arc<Mutex<PunchBoard>>,
) -> std::io::Result<()> {
    let sock = net.bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), local.port())).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut buf = vec![0u8; 2048];
    board.lock().unwrap().endpoints.insert(name.clone(), vec![local]);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sock.send_to(b"stun?", stun).await?;
                let pings: Vec<SocketAddr> = {
                    let b = board.lock().unwrap();
                    b.targets.get(&name).into_iter().flatten()
                        .flat_map(|t| b.endpoints.get(t).cloned().unwrap_or_default())
                        .collect()
                };
                for ep in pings {
                    sock.send_to(format!("ping {name}").as_bytes(), ep).await?;
                }
            }
            r = sock.recv_from(&mut buf) => {
                let (n, from) = r?;
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let Some((verb, arg)) = msg.split_once(' ') else { continue };
                match verb {
                    "stun" => {
                        let Ok(ep) = arg.parse::<SocketAddr>() else { continue };
                        let mut b = board.lock().unwrap();
                        let eps = b.endpoints.entry(name.clone()).or_default();
                        if !eps.contains(&ep) {
                            tracing::debug!(node = %name, %ep, "stun endpoint");
                            // Newest STUN answer first; the local address stays last.
                            eps.retain(|e| *e == local);
                            eps.insert(0, ep);
                        }
                    }
                    "ping" => {
                        sock.send_to(format!("pong {name}").as_bytes(), from).await?;
                    }
                    "pong" => {
                        let t = turmoil::sim_elapsed().unwrap_or_default();
                        board.lock().unwrap().pongs.entry((name.clone(), arg.to_string())).or_insert(t);
                    }
                    _ => {}
                }
            }
        }
    }
}
