//! `citadel ping`: round trips through the tunnel and the path each took.

use crate::node::Node;
use crate::{CliError, Ctx, Exit};
use std::time::Duration;

/// Flags of `citadel ping`.
#[derive(clap::Args)]
pub struct Args {
    /// Peer name, FQDN or mesh IP
    peer: String,
    /// Number of pings
    #[arg(short = 'c', long, default_value_t = 4)]
    count: u32,
    /// TCP port probed (a closed port answers with a reset, which is enough)
    #[arg(long, default_value_t = 1)]
    port: u16,
    /// JSON lines
    #[arg(long)]
    json: bool,
}

/// Runs `citadel ping`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let node = Node::attach(&ctx.state_dir, ctx.config(None, None, None)).await?;
    let count = a.count.max(1);
    let mut lost = 0;
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        match node.ping(&a.peer, a.port, ctx.timeout).await {
            Ok(p) if a.json => println!("{}", serde_json::to_string(&p).expect("serializes")),
            Ok(p) => println!(
                "pong from {} ({}) via {} in {:.2} ms",
                p.name,
                p.ip,
                p.path.as_deref().unwrap_or("unknown path"),
                p.rtt_ms
            ),
            Err(e) => {
                lost += 1;
                eprintln!("citadel: {e}");
            }
        }
    }
    if lost == count {
        Err(CliError::Reported(Exit::Failure))
    } else {
        Ok(())
    }
}
