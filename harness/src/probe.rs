//! Reachability probes: [`NodeProbe`] is how the harness asks a node "can you reach this
//! peer, and over which path?". [`MeshProbe`], the default, answers through the node's real
//! data plane (WireGuard, disco, DERP) on simulated time; tests may plug in their own.

use citadel::net::BoxFuture;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::sync::Arc;
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

/// Sends one ping through the mesh to `peer` (its mesh IPv4) and says which path answered,
/// or `None` when no answer came within `timeout`.
///
/// The harness calls it from inside the node's simulated host, so it runs on simulated time
/// and the node's [`crate::net::TurmoilNet`].
pub trait NodeProbe: Send + Sync {
    /// Pings `peer` once.
    fn ping(&self, peer: Ipv4Addr, timeout: Duration) -> BoxFuture<'_, Option<PathKind>>;

    /// Pings `peer` once on TCP `port`; probes that cannot choose a port ping as [`NodeProbe::ping`].
    fn ping_port(&self, peer: Ipv4Addr, port: u16, timeout: Duration) -> BoxFuture<'_, Option<PathKind>> {
        let _ = port;
        self.ping(peer, timeout)
    }
}

/// Makes a [`NodeProbe`] for a node once its mesh is up.
pub type ProbeFactory = Arc<dyn Fn(Arc<citadel::mesh::Mesh>) -> Arc<dyn NodeProbe> + Send + Sync>;

/// Port the mesh ping dials: nothing listens there, so the peer's netstack answers with a
/// reset, which proves the round trip as well as an accept would.
pub const PING_PORT: u16 = 9;

/// The real probe: a [`citadel::mesh::Mesh::ping`] (one TCP attempt through the tunnel) and
/// the path the data plane reports for the peer that answered.
pub struct MeshProbe(pub Arc<citadel::mesh::Mesh>);

impl std::fmt::Debug for MeshProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MeshProbe").field(&self.0.status().ipv4).finish()
    }
}

impl NodeProbe for MeshProbe {
    fn ping(&self, peer: Ipv4Addr, timeout: Duration) -> BoxFuture<'_, Option<PathKind>> {
        self.ping_port(peer, PING_PORT, timeout)
    }

    fn ping_port(&self, peer: Ipv4Addr, port: u16, timeout: Duration) -> BoxFuture<'_, Option<PathKind>> {
        Box::pin(async move {
            let pong = self.0.ping(peer.into(), port, timeout).await.ok()?;
            Some(path_kind(pong.path.as_deref()))
        })
    }
}

/// The path a data-plane path string names (`direct <addr>` or `relay <region>`).
pub fn path_kind(path: Option<&str>) -> PathKind {
    match path {
        Some(p) if p.starts_with("direct") => PathKind::Direct,
        Some(p) if p.starts_with("relay") => PathKind::Relay,
        _ => PathKind::None,
    }
}

/// The default probe factory: [`MeshProbe`].
pub fn mesh_probe() -> ProbeFactory {
    Arc::new(|mesh| Arc::new(MeshProbe(mesh)) as Arc<dyn NodeProbe>)
}
