//! The `citadel` command line.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = citadel_cli::Cli::parse();
    // boringtun warns on every handshake retry to an unreachable peer (every 5 s); the data
    // plane's own status and logs say it better.
    let default_level = if cli.is_daemon() { "info,boringtun=error" } else { "warn,boringtun=error" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CITADEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match citadel_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.has_message() {
                eprintln!("citadel: {e}");
            }
            ExitCode::from(citadel_cli::exit_code(&e) as u8)
        }
    }
}
