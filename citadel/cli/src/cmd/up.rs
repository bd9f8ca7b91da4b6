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
}

/// Runs `citadel up`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let mesh = Mesh::connect(ctx.config(a.nexus, a.authkey, a.hostname)).await?;
    let s = mesh.status();
    eprintln!("citadel: up as {} ({}) in org {}", s.hostname, s.ipv4.as_deref().unwrap_or("-"), s.org);
    let mesh = Arc::new(tokio::sync::Mutex::new(Some(Arc::new(mesh))));
    let done = Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn(api::serve(mesh.clone(), api::socket_path(&ctx.state_dir), done.clone()));
    let mut term = Terminate::new();
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
