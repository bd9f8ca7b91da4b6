//! `citadel up`'s flags for the programs around the node: `--expose`, `--socks5`,
//! `--http-proxy` and `--metrics`.

use crate::CliError;
use citadel::expose::ExposeSpec;
use citadel::mesh::Mesh;
use citadel::proxy_server::{Credentials, ProxyConfig, ProxyKind};
use std::net::SocketAddr;
use std::sync::Arc;

/// Flags of `citadel up` for the programs around the node.
#[derive(clap::Args, Debug, Default)]
pub struct UpFlags {
    /// Forward inbound mesh connections on MESH_PORT to a local service (default
    /// 127.0.0.1:MESH_PORT; `udp:` prefix for UDP). Repeatable. The packet filter still decides
    /// who may connect.
    #[arg(long = "expose", value_name = "[udp:]MESH_PORT[=HOST:PORT]")]
    pub expose: Vec<ExposeSpec>,
    /// Serve a SOCKS5 proxy into the mesh on ADDR (e.g. 127.0.0.1:1080)
    #[arg(long, value_name = "ADDR")]
    pub socks5: Option<SocketAddr>,
    /// Serve an HTTP proxy (CONNECT and http:// URIs) into the mesh on ADDR
    #[arg(long, value_name = "ADDR")]
    pub http_proxy: Option<SocketAddr>,
    /// Let the proxies reach destinations outside the mesh over the host network (off: such
    /// requests fail with SOCKS reply 0x02 / HTTP 403)
    #[arg(long)]
    pub proxy_allow_direct: bool,
    /// Allow a non-loopback proxy address (credentials are then required)
    #[arg(long)]
    pub proxy_allow_non_loopback: bool,
    /// USER:PASSWORD the proxies require (SOCKS5 RFC 1929, HTTP Basic)
    #[arg(long, env = "CITADEL_PROXY_AUTH", hide_env_values = true, value_name = "USER:PASSWORD")]
    pub proxy_auth: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9100)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Allow a non-loopback metrics address (metrics name the peers)
    #[arg(long)]
    pub metrics_allow_non_loopback: bool,
}

impl UpFlags {
    /// Starts everything asked for on `mesh`; the first failure stops `up` with its message.
    pub async fn start(&self, mesh: &Arc<Mesh>) -> Result<(), CliError> {
        for spec in &self.expose {
            mesh.expose(spec.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
            eprintln!("citadel: exposing {} on mesh port {} ({})", spec.target, spec.mesh_port, spec.proto);
        }
        let auth =
            match &self.proxy_auth {
                Some(s) => Some(Credentials::parse(s).ok_or_else(|| {
                    CliError::Usage("proxy credentials must be USER:PASSWORD (each 1-255 bytes)".into())
                })?),
                None => None,
            };
        for (kind, addr) in [(ProxyKind::Socks5, self.socks5), (ProxyKind::HttpProxy, self.http_proxy)] {
            let Some(listen) = addr else { continue };
            let cfg = ProxyConfig {
                auth: auth.clone(),
                allow_direct: self.proxy_allow_direct,
                allow_non_loopback: self.proxy_allow_non_loopback,
                ..ProxyConfig::new(listen)
            };
            let bound = mesh.start_proxy(kind, cfg).await.map_err(|e| CliError::Usage(e.to_string()))?;
            eprintln!("citadel: {kind} proxy on {bound}");
        }
        if let Some(addr) = self.metrics {
            let l = citadel::metrics::bind(addr, self.metrics_allow_non_loopback)
                .await
                .map_err(|e| CliError::Usage(e.to_string()))?;
            // A weak handle: `logout` needs to be the mesh's only owner.
            let weak = Arc::downgrade(mesh);
            let render = Arc::new(move || weak.upgrade().map(|m| m.metrics()).unwrap_or_default());
            eprintln!(
                "citadel: metrics on http://{}/metrics",
                l.local_addr().map_err(|e| CliError::Failed(e.to_string()))?
            );
            tokio::spawn(citadel::metrics::serve(l, render));
        }
        Ok(())
    }
}
