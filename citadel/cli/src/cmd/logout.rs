//! `citadel logout`: leave the mesh and clear the state directory.

use crate::{CliError, Ctx};
use citadel::api::{self, Request, Response};
use citadel::mesh::{ConnectError, Mesh};

/// Runs `citadel logout`.
pub async fn run(ctx: &Ctx) -> Result<(), CliError> {
    match api::call(&ctx.state_dir, &Request::Logout).await {
        Ok(Some(Response::Ok)) => {
            println!("logged out");
            return Ok(());
        }
        Ok(Some(Response::Error { message })) => return Err(CliError::Failed(message)),
        _ => {}
    }
    match Mesh::connect(ctx.config(None, None, None)).await {
        Ok(m) => m.logout().await?,
        Err(ConnectError::NeedsAuth { .. })
        | Err(ConnectError::NoNexusUrl)
        | Err(ConnectError::State(citadel::state::StateError::Corrupt { .. })) => {
            // Not registered anywhere, or the state cannot say where: clear local state.
            citadel::state::StateDir::open(&ctx.state_dir).and_then(|s| s.clear()).map_err(ConnectError::State)?
        }
        Err(e) => return Err(e.into()),
    }
    println!("logged out");
    Ok(())
}
