//! `citadel work`: the Redis Streams job loop on a node brought up from its state.

use crate::dialer::NodeDialer;
use crate::term::Terminate;
use crate::{CliError, Ctx};
use citadel::mesh::Mesh;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `citadel work`.
#[derive(clap::Args)]
pub struct Args {
    /// Redis URL (redis://[:password@]host:port[/db]); a mesh address is reached through the mesh
    #[arg(long, env = "CITADEL_REDIS_URL", hide_env_values = true)]
    redis_url: String,
    /// Job stream
    #[arg(long, default_value = "citadel:jobs")]
    queue: String,
    /// Consumer group
    #[arg(long, default_value = "citadel-workers")]
    group: String,
    /// Attempts before a job goes to the dead-letter stream
    #[arg(long, default_value_t = 3)]
    max_retries: u32,
    /// Jobs run at once
    #[arg(long, default_value_t = 4)]
    max_concurrency: usize,
    /// Seconds before an idle pending job of a crashed worker is reclaimed
    #[arg(long, default_value_t = 30)]
    claim_idle: u64,
    /// Seconds SIGTERM waits for in-flight jobs
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Run SHELL_COMMAND jobs (off by default: whoever can write the queue could run any program)
    #[arg(long)]
    allow_shell: bool,
    /// Let HTTP_FETCH reach this network outside the mesh (CIDR or address; repeatable).
    /// Without it only mesh addresses are fetched; names are checked after DNS resolution
    #[arg(long, value_name = "CIDR", value_parser = citadel_work::parse_network)]
    allow_fetch: Vec<citadel_work::IpNetwork>,
}

/// Runs `citadel work` until a signal.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    // The job loop runs only on a node that is in the mesh: bring it up from state.
    let mesh = Mesh::connect(ctx.config(None, None, None)).await.map_err(CliError::WorkNeedsNode)?;
    if !mesh.is_connected() {
        return Err(CliError::NotConnected("not connected to the mesh; refusing to start the job loop".into()));
    }
    let mut wc = citadel_work::WorkConfig::new(a.redis_url, &citadel::mesh::os_hostname());
    wc.queue = a.queue;
    wc.group = a.group;
    wc.max_retries = a.max_retries;
    wc.max_concurrency = a.max_concurrency.max(1);
    wc.claim_idle = Duration::from_secs(a.claim_idle.max(1));
    wc.drain_timeout = Duration::from_secs(a.drain_timeout);
    wc.allow_shell = a.allow_shell;
    wc.allow_fetch = a.allow_fetch;
    let s = mesh.status();
    eprintln!("citadel: working as {} ({}) in org {}", s.hostname, s.ipv4.as_deref().unwrap_or("-"), s.org);
    let shutdown = async {
        let mut term = Terminate::new();
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let dialer: Arc<dyn citadel_work::Dial> = Arc::new(NodeDialer(mesh));
    let sum = citadel_work::run(wc, dialer, shutdown).await?;
    eprintln!(
        "citadel: job loop stopped: {} succeeded, {} failed attempts, {} dead-lettered, {} reclaimed, {} left for reclaim, {} taken over by other workers",
        sum.succeeded, sum.failed_attempts, sum.dead_lettered, sum.reclaimed, sum.abandoned, sum.superseded
    );
    Ok(())
}
