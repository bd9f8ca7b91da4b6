//! `citadel up`: run the node and its local API until a signal.

use crate::term::Terminate;
use crate::{CliError, Ctx};
use citadel::api;
use citadel::mesh::Mesh;
use std::sync::Arc;

/// Flags of `citadel up`.
#[derive(clap::Args)]
pub struct Args {
    /// Pre-auth key, if not registered yet
    #[arg(long, env = "CITADEL_AUTHKEY", hide_env_values = true)]
    authkey: Option<String>,
    /// Nexus URL, if not saved by `init`
    #[arg(long, env = "CITADEL_NEXUS")]
    nexus: Option<String>,
    /// Host name to register
    #[arg(long)]
    hostname: Option<String>,
    /// Take the subnet routes peers advertise (as `tailscale up --accept-routes`)
    #[arg(long)]
    accept_routes: bool,
    /// Send non-mesh traffic through this peer (name, FQDN or mesh IP); only the chosen
    /// peer's exit routes are ever taken
    #[arg(long, value_name = "PEER")]
    exit_node: Option<String>,
    /// Turn the org guard off: accept packets from peers of other orgs when the Nexus policy
    /// admits them (by default they are dropped and counted as `rx_cross_org`)
    #[arg(long)]
    allow_cross_org: bool,
    #[command(flatten)]
    programs: crate::programs::UpFlags,
}

/// Runs `citadel up`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let mut cfg = ctx.config(a.nexus, a.authkey, a.hostname);
    cfg.routes = citadel::dataplane::RoutePrefs {
        accept_routes: a.accept_routes,
        exit_node: a.exit_node.filter(|s| !s.trim().is_empty()),
        allow_cross_org: a.allow_cross_org,
    };
    let mesh = Mesh::connect(cfg).await?;
    let s = mesh.status();
    eprintln!("citadel: up as {} ({}) in org {}", s.hostname, s.ipv4.as_deref().unwrap_or("-"), s.org);
    let net_info = mesh.data_plane().map(|dp| dp.net_info());
    let mesh = Arc::new(mesh);
    a.programs.start(&mesh).await?;
    let mesh = Arc::new(tokio::sync::Mutex::new(Some(mesh)));
    let done = Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn(api::serve(mesh.clone(), api::socket_path(&ctx.state_dir), done.clone()));
    let mut term = Terminate::new();
    tokio::spawn(crate::trim::after_settled(net_info));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = done.notified() => {}
        r = server => { if let Ok(Err(e)) = r { return Err(CliError::Failed(format!("local API failed: {e}"))); } }
    }
    let _ = std::fs::remove_file(api::socket_path(&ctx.state_dir));
    drop(mesh.lock().await.take());
    Ok(())
}
