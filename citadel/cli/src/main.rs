//! The `citadel` command line.

use clap::Parser;
use std::io::Write;

fn main() {
    citadel_cli::trim::at_start();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("citadel: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run());
    let _ = std::io::stdout().flush();
    // A command that succeeded has awaited its state writes: exit without dropping the
    // runtime, whose drop waits for every worker's current task and every blocking task (a
    // DERP dial loading the root store, say). The kernel closes sockets and releases the
    // state lock. A failed one may have left a state write running: let it finish.
    if code != 0 {
        drop(rt);
    }
    std::process::exit(code);
}

async fn run() -> i32 {
    let cli = citadel_cli::Cli::parse();
    // boringtun warns on every handshake retry to an unreachable peer (every 5 s); the data
    // plane's own status and logs say it better.
    let default_level = if cli.is_daemon() { "info,boringtun=error" } else { "warn,boringtun=error" };
    citadel_cli::logging::init(std::env::var("CITADEL_LOG").ok().as_deref(), default_level);
    match citadel_cli::run(cli).await {
        Ok(()) => 0,
        Err(e) => {
            if e.has_message() {
                eprintln!("citadel: {e}");
            }
            i32::from(citadel_cli::exit_code(&e) as u8)
        }
    }
}
