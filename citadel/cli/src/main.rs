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

/// The C library's `pow`, defined here: tokio's multi-thread scheduler (its average task poll
/// time) is the program's only caller of a libm function, and this definition (the `libm`
/// crate's, a port of musl's) keeps the executable from loading libm.so for it, whose own
/// start-up relocations leave about 0.5 MB of its pages resident in every `citadel` process.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
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

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    #[test]
    fn pow_matches_the_c_library_on_the_values_tokio_uses() {
        assert_eq!(super::pow(2.0, 10.0), 1024.0);
        assert_eq!(super::pow(0.9, 0.0), 1.0);
        // tokio: (1 - 0.1)^polls, polls up to a batch of tasks.
        let want = [(1.0, 0.9), (2.0, 0.81), (61.0, 0.0016173092699229906)];
        for (polls, expected) in want {
            let got = super::pow(0.9, polls);
            assert!((got - expected).abs() <= expected * 1e-15, "0.9^{polls} = {got}, not {expected}");
        }
    }
}
