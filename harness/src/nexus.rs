//! nexus-sim's axum app served on a turmoil TCP listener (hyper upgrades included).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

/// Port the simulated Nexus listens on.
pub const NEXUS_PORT: u16 = 8080;

/// A turmoil listener as axum sees one.
pub struct SimListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimListener").field(&self.0.local_addr().ok()).finish()
    }
}

impl axum::serve::Listener for SimListener {
    type Io = turmoil::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(x) => return x,
                // turmoil reports no transient errors worth a pause; keep accepting.
                Err(e) => tracing::debug!("accept: {e}"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The Nexus host's software: serves `shared`, and runs its clock-driven work (key expiries
/// told to the orgs, stale registrations dropped), until the host is crashed.
pub async fn serve(shared: nexus_sim::Shared) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), NEXUS_PORT)).await?;
    tokio::select! {
        r = axum::serve(SimListener(listener), nexus_sim::router(shared.clone())) => r?,
        () = nexus_sim::housekeeping(shared) => {}
    }
    Ok(())
}
