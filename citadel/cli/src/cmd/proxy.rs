//! `citadel proxy`: forward a loopback port into the mesh.

use crate::node::{split_target, Node};
use crate::term::Terminate;
use crate::{CliError, Ctx};
use std::sync::Arc;

/// Flags of `citadel proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// Loopback port to listen on
    local_port: u16,
    /// PEER:PORT
    target: String,
}

/// Runs `citadel proxy` until a signal.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let (peer, port) = split_target(&a.target)?;
    let node = Arc::new(Node::attach(&ctx.state_dir, ctx.config(None, None, None)).await?);
    let local_port = a.local_port;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local_port))
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on 127.0.0.1:{local_port}: {e}")))?;
    eprintln!(
        "citadel: forwarding 127.0.0.1:{} to {}",
        listener.local_addr().map(|a| a.port()).unwrap_or(local_port),
        a.target
    );
    let mut term = Terminate::new();
    loop {
        let (mut local, _) = tokio::select! {
            r = listener.accept() => match r { Ok(c) => c, Err(e) => { eprintln!("citadel: accept: {e}"); continue; } },
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        let node = node.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            match node.dial(&peer, port).await {
                Ok(mut remote) => {
                    let _ = citadel::copy::both_ways(&mut local, &mut remote).await;
                }
                Err(e) => tracing::warn!("proxy: {e}"),
            }
        });
    }
}
