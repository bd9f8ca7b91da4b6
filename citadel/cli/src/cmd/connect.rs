//! `citadel connect`: stdin/stdout to a TCP connection over the mesh.

use crate::node::{split_target, Node};
use crate::{CliError, Ctx};

/// Flags of `citadel connect`.
#[derive(clap::Args)]
pub struct Args {
    /// PEER:PORT (peer name, FQDN or mesh IP)
    target: String,
}

/// Runs `citadel connect`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let (peer, port) = split_target(&a.target)?;
    let node = Node::attach(&ctx.state_dir, ctx.config(None, None, None)).await?;
    let mut conn = node.dial(&peer, port).await.map_err(CliError::Failed)?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    // The node's own copy: 64 KiB reads where tokio's takes 8 KiB at a time.
    citadel::copy::both_ways(&mut stdio, &mut conn)
        .await
        .map_err(|e| CliError::Failed(format!("connection to {} failed: {e}", a.target)))?;
    Ok(())
}
