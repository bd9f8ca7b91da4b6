//! Bench: join time, `citadel init` vs the real tsnet node (Caddy), both timed from process
//! start to the node being online as nexus-sim sees it, runs interleaved. The same figure as
//! `bench join`. Run as root: `cargo run --release -p citadel-e2e --bin bench-join [RUNS]`.

use citadel_e2e::bench::{run, table, Plan};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(Plan::FULL.join_runs);
    let figs = run("join", Plan { join_runs: runs.max(1), ..Plan::FULL })?;
    print!("{}", table(&figs));
    Ok(())
}
