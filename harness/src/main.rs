//! `harness`: play scenario files in simulation (or with the real binaries), and measure.

use clap::{Parser, Subcommand};
use harness::scenario::Scenario;
use harness::world::{self, RunOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "harness", about = "Deterministic simulated networks for Citadel")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plays a scenario file and prints the report.
    Run {
        /// The scenario (TOML).
        file: PathBuf,
        /// Overrides the file's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Also play it with the real binaries in network namespaces (root) and compare.
        #[arg(long)]
        real: bool,
        /// Directory holding the `citadel` and `nexus-sim` binaries (for --real).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Checks scenario files without running them.
    Check {
        /// Files.
        files: Vec<PathBuf>,
    },
    /// Measures wall time per simulated minute at several world sizes.
    Bench {
        /// Node counts.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        nodes: Vec<usize>,
        /// Simulated time per size, in seconds.
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Simulation tick in milliseconds.
        #[arg(long, default_value_t = 10)]
        tick_ms: u64,
    },
}

/// Log lines carry the simulated time (seconds since the world started) when they come from
/// inside a simulation, so they line up with the report's timeline; wall time otherwise.
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "sim {:>9.3}s", t.as_secs_f64()),
            None => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

fn main() -> ExitCode {
    // Before any thread: `world::run` and `real::run` opt in too, but only once they start.
    harness::world::opt_in_unverified_harness_relays();
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,turmoil=error,boringtun=error".into());
    // turmoil's span for the host a line comes from ("node{name=...}"), whatever the filter
    // says of turmoil's own events: every line of a world names its node.
    let host_span =
        tracing_subscriber::filter::filter_fn(|m| m.is_span() && m.name() == "node" && m.target() == "turmoil::sim");
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_timer(SimTime)
                .with_filter(env.or(host_span)),
        )
        .init();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Run { file, seed, real, bin_dir } => {
            let sc = Scenario::load(&file)?;
            let t0 = std::time::Instant::now();
            let out = world::run(&sc, &RunOptions { seed, ..Default::default() })?;
            println!("{}", out.report());
            println!("simulation wall time {:.1}s", t0.elapsed().as_secs_f64());
            #[allow(unused_mut)] // only --real (Unix) updates it
            let mut ok = out.passed();
            if real {
                #[cfg(unix)]
                {
                    let dir = bin_dir.unwrap_or_else(harness::real::default_bin_dir);
                    let r = harness::real::run(&sc, &dir)?;
                    println!("{}", r.report);
                    let cmp = harness::real::compare(&sc, &out, &r);
                    println!("{}", cmp.report);
                    if !cmp.agrees || std::env::var_os("HARNESS_REAL_DIAGNOSTICS").is_some() {
                        println!("{}", r.diagnostics);
                    } else if let Some(dir) = &r.kept_logs {
                        // The real side failed only where the file expects it to.
                        let _ = std::fs::remove_dir_all(dir);
                    }
                    // A real-side failure listed in `[real] expect_differ` is the agreed outcome.
                    ok &= cmp.agrees;
                }
                #[cfg(not(unix))]
                {
                    let _ = bin_dir;
                    anyhow::bail!("--real needs Linux network namespaces");
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Check { files } => {
            let mut ok = true;
            for f in files {
                match Scenario::load(&f) {
                    Ok(s) => {
                        println!("{}: ok ({} nodes, {} expectations)", f.display(), s.nodes.len(), s.expects.len())
                    }
                    Err(e) => {
                        ok = false;
                        println!("{e}");
                    }
                }
            }
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { nodes, secs, tick_ms } => {
            for n in nodes {
                let r = harness::bench::measure(
                    n,
                    std::time::Duration::from_secs(secs),
                    std::time::Duration::from_millis(tick_ms),
                )?;
                println!("{r}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
