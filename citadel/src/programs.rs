//! What a [`Mesh`] offers the programs around it: exposed services, proxy listeners and
//! identity lookups (the pieces live in [`crate::expose`], [`crate::proxy_server`] and
//! [`crate::whois`]).

use crate::expose::{ExposeError, ExposeInfo, ExposeSpec, Proto};
use crate::mesh::Mesh;
use crate::proxy_server::{MeshBackend, ProxyConfig, ProxyError, ProxyKind, ProxyListener};
use crate::whois::{Listener, WhoIs};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

impl Mesh {
    /// Forwards inbound mesh connections on `spec.mesh_port` to `spec.target`.
    ///
    /// # Errors
    /// The port is taken, or the node runs without a data plane.
    pub fn expose(&self, spec: ExposeSpec) -> Result<(), ExposeError> {
        self.exposer.as_ref().ok_or(ExposeError::NoDataPlane)?.add(spec)
    }

    /// Stops exposing `port`.
    ///
    /// # Errors
    /// Nothing is exposed there.
    pub fn unexpose(&self, proto: Proto, port: u16) -> Result<(), ExposeError> {
        self.exposer.as_ref().ok_or(ExposeError::NoDataPlane)?.remove(proto, port)
    }

    /// What is exposed.
    pub fn exposes(&self) -> Vec<ExposeInfo> {
        self.exposer.as_ref().map(|e| e.list()).unwrap_or_default()
    }

    /// Starts a SOCKS5 or HTTP proxy listener into the mesh; it runs as long as the node.
    /// Returns the bound address.
    ///
    /// # Errors
    /// The bind rule ([`crate::proxy_server::check_listen`]) or the OS refused the address.
    pub async fn start_proxy(&self, kind: ProxyKind, cfg: ProxyConfig) -> Result<SocketAddr, ProxyError> {
        let dp = self.data_plane().ok_or(ProxyError::NoDataPlane)?.clone();
        let backend = Arc::new(MeshBackend::new(dp, self.netmap()));
        let l = ProxyListener::start(kind, cfg, backend).await?;
        let addr = l.local_addr();
        self.proxies.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        Ok(addr)
    }

    /// Who holds mesh address `ip` (a peer, or this node).
    pub fn whois(&self, ip: IpAddr) -> Option<WhoIs> {
        crate::whois::lookup(&self.netmap().borrow(), ip)
    }

    /// Listens on a mesh TCP port; each accepted connection comes with its peer's identity.
    ///
    /// # Errors
    /// See [`Mesh::listen_tcp`].
    pub fn listen(&self, port: u16) -> std::io::Result<Listener> {
        Ok(Listener::new(self.listen_tcp(port)?, self.netmap()))
    }
}
