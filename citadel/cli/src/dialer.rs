//! The node as the job worker's dialer: mesh addresses go through the mesh.

use citadel::mesh::Mesh;
use citadel_work::{DialFuture, MeshDialer};
use std::net::{IpAddr, SocketAddr};

/// Adapts a [`Mesh`] to [`citadel_work::MeshDialer`]: the mesh knows nothing of the worker.
pub(crate) struct NodeDialer(pub(crate) Mesh);

impl MeshDialer for NodeDialer {
    fn is_mesh_addr(&self, ip: IpAddr) -> bool {
        citadel::addr::is_mesh_ip(ip) || self.0.routes_to(ip)
    }

    fn dial_tcp(&self, addr: SocketAddr) -> DialFuture<'_> {
        Box::pin(async move {
            let s = self.0.dial_tcp(addr).await?;
            Ok(Box::new(s) as Box<dyn citadel_work::AsyncReadWrite>)
        })
    }
}
