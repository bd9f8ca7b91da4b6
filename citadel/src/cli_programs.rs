//! The command-line side of serving other programs: `citadel up`'s `--expose`, `--socks5`,
//! `--http-proxy` and `--metrics` flags, and the `expose` and `whois` subcommands.

use citadel::api::{self, Request, Response};
use citadel::expose::{ExposeInfo, ExposeSpec, Proto};
use citadel::mesh::Mesh;
use citadel::proxy::{Credentials, ProxyConfig, ProxyKind};
use citadel::whois::WhoIs;
use std::net::SocketAddr;
use std::path::Path;
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
    pub async fn start(&self, mesh: &Arc<Mesh>) -> Result<(), String> {
        for spec in &self.expose {
            mesh.expose(spec.clone()).map_err(|e| e.to_string())?;
            eprintln!("citadel: exposing {} on mesh port {} ({})", spec.target, spec.mesh_port, spec.proto);
        }
        let auth = match &self.proxy_auth {
            Some(s) => Some(Credentials::parse(s).ok_or("proxy credentials must be USER:PASSWORD (each 1-255 bytes)")?),
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
            let bound = mesh.start_proxy(kind, cfg).await.map_err(|e| e.to_string())?;
            eprintln!("citadel: {kind} proxy on {bound}");
        }
        if let Some(addr) = self.metrics {
            let l = citadel::metrics::bind(addr, self.metrics_allow_non_loopback).await.map_err(|e| e.to_string())?;
            // A weak handle: `logout` needs to be the mesh's only owner.
            let weak = Arc::downgrade(mesh);
            let render = Arc::new(move || weak.upgrade().map(|m| m.metrics()).unwrap_or_default());
            eprintln!("citadel: metrics on http://{}/metrics", l.local_addr().map_err(|e| e.to_string())?);
            tokio::spawn(citadel::metrics::serve(l, render));
        }
        Ok(())
    }
}

/// `citadel expose …`: change what a running node exposes.
#[derive(clap::Subcommand, Debug)]
pub enum ExposeCmd {
    /// Expose a local service: [udp:]MESH_PORT[=HOST:PORT]
    Add {
        /// What to expose
        spec: ExposeSpec,
    },
    /// Stop exposing a mesh port: [udp:]MESH_PORT
    Remove {
        /// The port
        port: String,
    },
    /// List exposed services
    List {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

fn print_exposes(list: &[ExposeInfo], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(list).expect("serializes"));
        return;
    }
    if list.is_empty() {
        println!("nothing exposed");
        return;
    }
    println!("{:5} {:>9}  {:24} {:>8} {:>6} {:>6}", "PROTO", "MESH PORT", "TARGET", "ACCEPTED", "ACTIVE", "FAILED");
    for e in list {
        println!(
            "{:5} {:>9}  {:24} {:>8} {:>6} {:>6}",
            e.proto.to_string(),
            e.mesh_port,
            e.target,
            e.accepted,
            e.active,
            e.failed
        );
    }
}

/// Runs `citadel expose`; returns the exit code.
pub async fn run_expose(state_dir: &Path, cmd: ExposeCmd) -> u8 {
    let (req, json) = match cmd {
        ExposeCmd::Add { spec } => (Request::ExposeAdd { spec: spec.to_string() }, false),
        ExposeCmd::Remove { port } => {
            let (proto, p) = match port.strip_prefix("udp:") {
                Some(p) => (Proto::Udp, p),
                None => (Proto::Tcp, port.strip_prefix("tcp:").unwrap_or(&port)),
            };
            let Ok(p) = p.parse::<u16>() else {
                eprintln!("citadel: expected [udp:]MESH_PORT, got {port:?}");
                return 2;
            };
            (Request::ExposeRemove { proto, port: p }, false)
        }
        ExposeCmd::List { json } => (Request::ExposeList, json),
    };
    match api::call(state_dir, &req).await {
        Ok(Some(Response::Exposes { exposes })) => {
            print_exposes(&exposes, json);
            0
        }
        Ok(Some(Response::Error { message })) => {
            eprintln!("citadel: {message}");
            1
        }
        Ok(Some(other)) => {
            eprintln!("citadel: unexpected answer from the running node: {other:?}");
            1
        }
        Ok(None) => {
            eprintln!("citadel: no running node (start `citadel up` first; exposes live in it)");
            6
        }
        Err(e) => {
            eprintln!("citadel: cannot reach the running node: {e}");
            1
        }
    }
}

fn print_whois(w: &WhoIs, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(w).expect("serializes"));
        return;
    }
    println!("Name       {}{}", w.name, if w.is_self { " (this node)" } else { "" });
    println!("FQDN       {}", w.fqdn);
    println!("Org        {}", w.org);
    println!("Tags       {}", if w.tags.is_empty() { "-".to_string() } else { w.tags.join(", ") });
    println!("Node key   {}", w.node_key);
    println!("OS         {}", if w.os.is_empty() { "-" } else { &w.os });
    println!("Addresses  {}", w.addresses.join(", "));
}

/// Runs `citadel whois ADDR`: asks the running node, or brings one up from `cfg`'s state.
pub async fn run_whois(state_dir: &Path, cfg: citadel::mesh::Config, addr: &str, json: bool) -> u8 {
    let Some(ip) = citadel::whois::parse_addr(addr) else {
        eprintln!("citadel: expected IP[:PORT], got {addr:?}");
        return 2;
    };
    match api::call(state_dir, &Request::Whois { addr: addr.to_string() }).await {
        Ok(Some(Response::Whois(w))) => {
            print_whois(&w, json);
            return 0;
        }
        Ok(Some(Response::Error { message })) => {
            eprintln!("citadel: {message}");
            return 1;
        }
        _ => {}
    }
    match Mesh::connect(cfg).await {
        Ok(m) => match m.whois(ip) {
            Some(w) => {
                print_whois(&w, json);
                0
            }
            None => {
                eprintln!("citadel: no mesh node has address {ip}");
                1
            }
        },
        Err(e) => {
            eprintln!("citadel: {e}");
            4
        }
    }
}
