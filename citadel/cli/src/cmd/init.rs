//! `citadel init`: join with a pre-auth key and print the mesh IP.

use crate::{CliError, Ctx};
use citadel::mesh::Mesh;

/// Flags of `citadel init`.
#[derive(clap::Args)]
pub struct Args {
    /// Pre-auth key from Nexus
    #[arg(long, env = "CITADEL_AUTHKEY", hide_env_values = true)]
    authkey: Option<String>,
    /// Nexus (Headscale) URL
    #[arg(long, env = "CITADEL_NEXUS")]
    nexus: String,
    /// Host name to register
    #[arg(long)]
    hostname: Option<String>,
    /// Register as ephemeral (removed when offline)
    #[arg(long)]
    ephemeral: bool,
}

/// Runs `citadel init`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let mut c = ctx.config(Some(a.nexus), a.authkey, a.hostname);
    c.ephemeral = a.ephemeral;
    // Registration and the mesh IP need the control plane only: the process exits right
    // after, so a UDP socket, STUN and a DERP connection would only delay it (`citadel up`
    // reports endpoints when it starts).
    c.data_plane = false;
    let m = Mesh::connect(c).await?;
    println!("{}", m.ipv4().map(|a| a.to_string()).unwrap_or_default());
    Ok(())
}
