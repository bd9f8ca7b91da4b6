//! The node as the job worker's dialer: mesh addresses go through the mesh, the rest over the
//! host network.

use citadel::mesh::Mesh;
use citadel::net::{Dial, DialFuture, TokioNet};
use std::net::{IpAddr, SocketAddr};

/// Adapts a [`Mesh`] to the one dial trait for `citadel-work`: the mesh knows nothing of the
/// worker.
pub(crate) struct NodeDialer(pub(crate) Mesh);

impl Dial for NodeDialer {
    fn is_mesh_addr(&self, ip: IpAddr) -> bool {
        citadel::addr::is_mesh_ip(ip) || self.0.routes_to(ip)
    }

    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
        match host.parse::<IpAddr>() {
            Ok(ip) if self.is_mesh_addr(ip) => Box::pin(async move {
                let s = self.0.dial_tcp(SocketAddr::new(ip, port)).await?;
                Ok(Box::new(s) as Box<dyn citadel::net::AsyncReadWrite>)
            }),
            _ => TokioNet.connect_tcp(host, port),
        }
    }
}
