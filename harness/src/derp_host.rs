//! A DERP host (`derp`, and `derp-<region>` for regions with their own): nexus-sim's DERP server behind TLS on port 443 and its STUN answers on UDP
//! 3478, both on turmoil. Nodes find it through the DERP map Nexus hands out, and reach it the
//! way they reach a real region: STUN over their (possibly NATed) UDP socket, DERP over TLS.

use crate::net::{TurmoilNet, Uplink};
use citadel::net::Net;
use nexus_sim::derp::{self_signed_tls, DerpOptions, DerpServer};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::sync::mpsc;

/// TCP port of the DERP (TLS) listener.
pub const DERP_PORT: u16 = 443;
/// UDP port of the STUN server.
pub const STUN_PORT: u16 = 3478;
/// The DERP map Nexus hands out: one region per `(id, host address)`, self-signed
/// (`InsecureForTests`).
pub fn derp_map(regions: &[(i32, IpAddr)]) -> citadel::tailcfg::DerpMap {
    let mut map = citadel::tailcfg::DerpMap { omit_default_regions: true, ..Default::default() };
    for &(id, ip) in regions {
        let one =
            nexus_sim::embedded_derp_map(&ip.to_string(), &[(id, SocketAddr::new(ip, DERP_PORT))], Some(STUN_PORT));
        map.regions.extend(one.regions);
    }
    map
}

/// The host's software; a crash drops every connection and a bounce starts a fresh server
/// (no client survives a relay restart, as with a real `derper`).
pub async fn run(region: i32) -> turmoil::Result {
    tokio::spawn(async {
        if let Err(e) = stun_server().await {
            tracing::warn!("stun server stopped: {e}");
        }
    });
    let server = DerpServer::new(DerpOptions::new());
    let tls = self_signed_tls(&["derp".to_string()]).map_err(|e| io::Error::other(e.to_string()))?;
    let listener = turmoil::net::TcpListener::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DERP_PORT)).await?;
    axum::serve(TlsListener::new(listener, tls), server.router(region)).await?;
    Ok(())
}

/// Answers STUN binding requests with the address they came from.
async fn stun_server() -> io::Result<()> {
    let net = TurmoilNet { uplink: Uplink::Public, ip: None };
    let sock = net.bind_udp(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), STUN_PORT)).await?;
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let Ok(req) = citadel::stun::BindingRequest::parse(&buf[..n]) else { continue };
        sock.send_to(&citadel::stun::response(req.tx_id, from), from).await?;
    }
}

type TlsStream = tokio_rustls::server::TlsStream<turmoil::net::TcpStream>;

/// A turmoil listener that hands axum TLS streams. Handshakes run in their own tasks, so a
/// client that stops mid-handshake never holds up the others.
struct TlsListener {
    rx: mpsc::Receiver<(TlsStream, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn new(listener: turmoil::net::TcpListener, tls: std::sync::Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DERP_PORT));
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            loop {
                let (tcp, from) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("derp accept: {e}");
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(s) => {
                            let _ = tx.send((s, from)).await;
                        }
                        Err(e) => tracing::debug!(%from, "derp tls: {e}"),
                    }
                });
            }
        });
        TlsListener { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            // The accept task only ends with the host; wait for the crash.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
