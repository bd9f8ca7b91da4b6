//! The `citadel` command line: argument parsing, one module per subcommand in [`cmd`], and the
//! exit codes in [`exit`].
#![warn(missing_docs)]

pub mod cmd;
mod dialer;
pub mod exit;
pub mod logging;
mod node;
pub mod programs;
mod term;
pub mod trim;

pub use exit::{exit_code, CliError, Exit};

use citadel::mesh::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// The command line.
#[derive(Parser)]
#[command(name = "citadel", version, about = "Join your organization's WireGuard mesh without root, TUN or a VPN install", after_help = exit::help())]
pub struct Cli {
    /// State directory [default: $CITADEL_STATE_DIR or ~/.citadel-node/network]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Bound on each network step, in seconds
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    /// Also trust the CA certificates in this PEM file for https Nexus URLs and DERP
    /// (repeatable; SSL_CERT_FILE and SSL_CERT_DIR are honoured too)
    #[arg(long, global = true)]
    ca_file: Vec<PathBuf>,
    /// Forget the Nexus server key pinned at registration and trust the one it presents now
    /// (only after the operator confirms the key was replaced)
    #[arg(long, global = true)]
    retrust_server_key: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join the mesh with a pre-auth key, print the mesh IP and exit
    Init(cmd::init::Args),
    /// Log in interactively (no key): device code, or an approval URL on Headscale
    Login(cmd::login::Args),
    /// Run the node in the foreground until SIGINT/SIGTERM
    Up(cmd::up::Args),
    /// Show connection, mesh IPs, org and peers
    Status(cmd::status::Args),
    /// Leave the mesh (Nexus removes the node) and clear the state directory
    Logout,
    /// Check the network: UDP, public endpoint, NAT mapping, DERP region latencies
    Netcheck(cmd::netcheck::Args),
    /// Mesh-level ping: round trip through the tunnel and the path it took
    Ping(cmd::ping::Args),
    /// Pipe stdin/stdout to a TCP connection over the mesh (usable as ssh's ProxyCommand)
    Connect(cmd::connect::Args),
    /// Listen on 127.0.0.1:LOCAL_PORT and forward each connection into the mesh
    Proxy(cmd::proxy::Args),
    /// Run the job loop (Redis Streams consumer group); refuses unless the node is connected
    Work(cmd::work::Args),
    /// Change what the running node exposes on its mesh ports
    #[command(subcommand)]
    Expose(cmd::expose::Args),
    /// Who is behind a mesh address: name, FQDN, org, tags, node key, OS
    Whois(cmd::whois::Args),
}

impl Cli {
    /// Whether the command runs the node until a signal (and so logs at info level).
    pub fn is_daemon(&self) -> bool {
        matches!(self.cmd, Cmd::Up(_))
    }
}

/// What every subcommand gets from the global flags.
pub struct Ctx {
    /// The node's state directory.
    pub state_dir: PathBuf,
    /// Bound on each network step.
    pub timeout: Duration,
    /// Trust whatever server key the Nexus presents now (`--retrust-server-key`).
    pub retrust_server_key: bool,
}

impl Ctx {
    /// A node configuration on this state directory.
    pub fn config(&self, nexus: Option<String>, authkey: Option<String>, hostname: Option<String>) -> Config {
        let mut c = Config::new(nexus, authkey, self.state_dir.clone());
        c.hostname = hostname;
        c.timeout = self.timeout;
        c.retrust_server_key = self.retrust_server_key;
        c
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let ctx = Ctx {
        state_dir: cli.state_dir.clone().unwrap_or_else(citadel::state::default_dir),
        timeout: Duration::from_secs(cli.timeout.max(1)),
        retrust_server_key: cli.retrust_server_key,
    };
    for f in &cli.ca_file {
        citadel::tls::add_ca_file(f).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    match cli.cmd {
        Cmd::Init(a) => cmd::init::run(&ctx, a).await,
        Cmd::Login(a) => cmd::login::run(&ctx, a).await,
        Cmd::Up(a) => cmd::up::run(&ctx, a).await,
        Cmd::Status(a) => cmd::status::run(&ctx, a).await,
        Cmd::Logout => cmd::logout::run(&ctx).await,
        Cmd::Netcheck(a) => cmd::netcheck::run(&ctx, a).await,
        Cmd::Ping(a) => cmd::ping::run(&ctx, a).await,
        Cmd::Connect(a) => cmd::connect::run(&ctx, a).await,
        Cmd::Proxy(a) => cmd::proxy::run(&ctx, a).await,
        Cmd::Work(a) => cmd::work::run(&ctx, a).await,
        Cmd::Expose(a) => cmd::expose::run(&ctx, a).await,
        Cmd::Whois(a) => cmd::whois::run(&ctx, a).await,
    }
}
