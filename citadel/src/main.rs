//! The `citadel` command line.

use citadel::api::{self, Request, Response};
use citadel::control::ControlError;
use citadel::mesh::{Config, ConnectError, Mesh, Status};
use citadel::state::StateError;

use clap::{Parser, Subcommand};

mod cli_programs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  other failure
  2  bad command line
  3  authentication failed or needed (wrong, used or expired key; not logged in)
  4  Nexus unreachable or speaking something else
  5  state directory locked by another process, corrupt or unwritable
  6  not connected";

#[derive(Parser)]
#[command(name = "citadel", version, about = "Join your organization's WireGuard mesh without root, TUN or a VPN install", after_help = EXIT_CODES)]
struct Cli {
    /// State directory [default: $CITADEL_STATE_DIR or ~/.citadel-node/network]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Bound on each network step, in seconds
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join the mesh with a pre-auth key, print the mesh IP and exit
    Init {
        /// Pre-auth key from Nexus
        #[arg(long, env = "CITADEL_AUTHKEY", hide_env_values = true)]
        authkey: Option<String>,
        /// Nexus (Headscale) URL
        #[arg(long, env = "CITADEL_NEXUS")]
        nexus: String,
        /// Host name to register
        #[arg(long)]
        hostname: Option<String>,
        /// Register as ephemeral (removed when offline)
        #[arg(long)]
        ephemeral: bool,
    },
    /// Log in interactively (no key): device code, or an approval URL on Headscale
    Login {
        /// Nexus (Headscale) URL
        #[arg(long, env = "CITADEL_NEXUS")]
        nexus: String,
        /// Host name to register
        #[arg(long)]
        hostname: Option<String>,
        /// auto: device code if the server offers it, else Headscale's approval URL
        #[arg(long, value_parser = ["auto", "device", "web"], default_value = "auto")]
        flow: String,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 600)]
        login_timeout: u64,
        /// Never draw the QR code
        #[arg(long)]
        no_qr: bool,
    },
    /// Run the node in the foreground until SIGINT/SIGTERM
    Up {
        /// Pre-auth key, if not registered yet
        #[arg(long, env = "CITADEL_AUTHKEY", hide_env_values = true)]
        authkey: Option<String>,
        /// Nexus URL, if not saved by `init`
        #[arg(long, env = "CITADEL_NEXUS")]
        nexus: Option<String>,
        /// Host name to register
        #[arg(long)]
        hostname: Option<String>,
        #[command(flatten)]
        programs: cli_programs::UpFlags,
    },
    /// Change what the running node exposes on its mesh ports
    #[command(subcommand)]
    Expose(cli_programs::ExposeCmd),
    /// Who is behind a mesh address: name, FQDN, org, tags, node key, OS
    Whois {
        /// IP[:PORT]
        addr: String,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Show connection, mesh IPs, org and peers
    Status {
        /// Machine-readable output (stable keys, see README)
        #[arg(long)]
        json: bool,
        /// No colours (also off when stdout is not a terminal or NO_COLOR is set)
        #[arg(long)]
        no_color: bool,
    },
    /// Leave the mesh (Nexus removes the node) and clear the state directory
    Logout,
    /// Check the network: UDP, public endpoint, NAT mapping, DERP region latencies
    Netcheck {
        /// DERP map (JSON, Tailscale's DERPMap) [default: the one in the cached netmap]
        #[arg(long)]
        derp_map: Option<PathBuf>,
        /// Extra STUN server (IP:PORT), repeatable; two servers tell whether the NAT maps
        /// differently per destination
        #[arg(long)]
        stun: Vec<std::net::SocketAddr>,
        /// Local UDP port to probe from (0 = any)
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Mesh-level ping: round trip through the tunnel and the path it took
    Ping {
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
    },
    /// Pipe stdin/stdout to a TCP connection over the mesh (usable as ssh's ProxyCommand)
    Connect {
        /// PEER:PORT (peer name, FQDN or mesh IP)
        target: String,
    },
    /// Listen on 127.0.0.1:LOCAL_PORT and forward each connection into the mesh
    Proxy {
        /// Loopback port to listen on
        local_port: u16,
        /// PEER:PORT
        target: String,
    },
    /// Run the job loop (Redis Streams consumer group); refuses unless the node is connected
    Work {
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
    },
}

fn exit_code(e: &ConnectError) -> u8 {
    match e {
        ConnectError::NeedsAuth { .. } | ConnectError::AuthRejected(_) | ConnectError::Expired => 3,
        ConnectError::Control(ControlError::BadUrl(..)) => 2,
        ConnectError::Control(_) | ConnectError::NoMap(_) | ConnectError::NoNexusUrl => 4,
        ConnectError::State(_) => 5,
    }
}

fn fail(e: &ConnectError) -> ExitCode {
    eprintln!("citadel: {e}");
    ExitCode::from(exit_code(e))
}

fn print_status(s: &Status, json: bool, color: bool) {
    use owo_colors::OwoColorize;
    if json {
        println!("{}", serde_json::to_string_pretty(s).expect("serializes"));
        return;
    }
    let head = |t: &str| if color { t.bold().to_string() } else { t.to_string() };
    let good = |t: &str| if color { t.green().to_string() } else { t.to_string() };
    let bad = |t: &str| if color { t.red().to_string() } else { t.to_string() };
    let dim = |t: &str| if color { t.dimmed().to_string() } else { t.to_string() };
    println!("{}", head("Connection"));
    println!("  State      {}", if s.connected { good("● connected") } else { bad("○ disconnected") });
    println!("  Nexus      {}", s.nexus_url);
    println!("{}", head("Node"));
    println!("  Hostname   {} {}", s.hostname, dim(&format!("({})", s.fqdn)));
    println!("  Org        {}", s.org);
    println!("  Mesh IPv4  {}", s.ipv4.as_deref().unwrap_or("-"));
    println!("  Mesh IPv6  {}", s.ipv6.as_deref().unwrap_or("-"));
    if s.home_derp > 0 {
        println!("  Relay      DERP region {}", s.home_derp);
    }
    for e in &s.exposes {
        println!("  Expose     {} mesh port {} -> {} ({} accepted)", e.proto, e.mesh_port, e.target, e.accepted);
    }
    for l in &s.listeners {
        println!("  Listener   {} on {}{}", l.kind, l.addr, if l.auth { " (auth)" } else { "" });
    }
    println!("{}", head(&format!("Peers ({})", s.peers.len())));
    if s.peers.is_empty() {
        println!("  {}", dim("none"));
        return;
    }
    let w = s.peers.iter().map(|p| p.name.len()).max().unwrap_or(4).max(4);
    println!("  {}", dim(&format!("{:w$}  {:15}  {:8}  {}", "NAME", "IPV4", "STATE", "PATH (LATENCY)")));
    for p in &s.peers {
        let st = match p.online {
            Some(true) => good(&format!("{:8}", "online")),
            Some(false) => bad(&format!("{:8}", "offline")),
            None => dim(&format!("{:8}", "unknown")),
        };
        let lat = p.latency_ms.map(|l| format!(" ({l:.1} ms)")).unwrap_or_default();
        let path = match (&p.path, &p.last_handshake) {
            (Some(path), Some(hs)) => format!("{path}{lat}, handshake {hs}"),
            (Some(path), None) => format!("{path}{lat}"),
            _ => dim("-"),
        };
        println!("  {:w$}  {:15}  {}  {}", p.name, p.ipv4.as_deref().unwrap_or("-"), st, path);
    }
}

fn use_color(no_color: bool) -> bool {
    use std::io::IsTerminal;
    !no_color && std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Shows a login code: URL, code and (on a terminal) a QR code of the complete URL.
fn show_login(url: &str, code: Option<&str>, qr: bool) {
    use std::io::IsTerminal;
    eprintln!("\nTo log in, open:\n\n    {url}\n");
    if let Some(c) = code {
        eprintln!("and enter the code:  {c}\n");
    }
    if qr && std::io::stderr().is_terminal() {
        if let Ok(q) = qrcode::QrCode::new(url.as_bytes()) {
            eprintln!("{}", q.render::<qrcode::render::unicode::Dense1x2>().quiet_zone(true).build());
        }
    }
}

/// A spinner on stderr while `fut` runs (only on a terminal).
async fn with_spinner<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let what = what.to_string();
    let spin = tokio::spawn(async move {
        let frames = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];
        for i in 0.. {
            eprint!("\r{} {what}", frames[i % frames.len()]);
            let _ = std::io::stderr().flush();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let out = fut.await;
    spin.abort();
    eprint!("\r\x1b[2K");
    out
}

/// SIGTERM where there is one (Windows has only Ctrl-C, handled beside it).
struct Terminate(#[cfg(unix)] tokio::signal::unix::Signal);

impl Terminate {
    fn new() -> Self {
        #[cfg(unix)]
        return Terminate(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler"),
        );
        #[cfg(not(unix))]
        return Terminate();
    }

    async fn recv(&mut self) -> Option<()> {
        #[cfg(unix)]
        return self.0.recv().await;
        #[cfg(not(unix))]
        std::future::pending().await
    }
}

/// `host:port`, `[v6]:port` or `v6-literal:port` → (peer, port).
fn split_target(t: &str) -> Option<(String, u16)> {
    let (host, port) = t.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The node a command talks through: the running `citadel up` (through its socket), or one
/// brought up in this process from the saved state.
enum Node {
    Running(PathBuf),
    Own(Mesh),
}

impl Node {
    async fn attach(state_dir: &std::path::Path, cfg: Config) -> Result<Node, ExitCode> {
        if let Ok(Some(Response::Status(_))) = api::call(state_dir, &Request::Status).await {
            return Ok(Node::Running(state_dir.to_path_buf()));
        }
        match Mesh::connect(cfg).await {
            Ok(m) => Ok(Node::Own(m)),
            Err(e) => Err(fail(&e)),
        }
    }

    async fn ping(&self, peer: &str, port: u16, timeout: Duration) -> Result<citadel::mesh::Pong, String> {
        match self {
            Node::Running(dir) => {
                let req = Request::Ping { peer: peer.to_string(), port, timeout_ms: timeout.as_millis() as u64 };
                match api::call(dir, &req).await {
                    Ok(Some(Response::Pong(p))) => Ok(p),
                    Ok(Some(Response::Error { message })) => Err(message),
                    Ok(_) => Err("the running node did not answer".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Node::Own(m) => {
                let ip = m.resolve(peer).ok_or_else(|| format!("unknown peer {peer:?}"))?;
                m.ping(ip, port, timeout).await.map_err(|e| format!("no reply from {peer}: {e}"))
            }
        }
    }

    async fn dial(&self, peer: &str, port: u16) -> Result<Box<dyn citadel::net::AsyncReadWrite>, String> {
        match self {
            Node::Running(dir) => match api::dial(dir, peer, port).await {
                Ok(Some(Ok(s))) => Ok(Box::new(s)),
                Ok(Some(Err(e))) => Err(e),
                Ok(None) => Err("the running node went away".into()),
                Err(e) => Err(e.to_string()),
            },
            Node::Own(m) => {
                let ip = m.resolve(peer).ok_or_else(|| format!("unknown peer {peer:?}"))?;
                m.dial_tcp(std::net::SocketAddr::new(ip, port))
                    .await
                    .map(|c| Box::new(c) as Box<dyn citadel::net::AsyncReadWrite>)
                    .map_err(|e| format!("cannot connect to {peer}:{port}: {e}"))
            }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // boringtun warns on every handshake retry to an unreachable peer (every 5 s); the data
    // plane's own status and logs say it better.
    let default_level = if matches!(cli.cmd, Cmd::Up { .. }) { "info,boringtun=error" } else { "warn,boringtun=error" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CITADEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let state_dir = cli.state_dir.clone().unwrap_or_else(citadel::state::default_dir);
    let timeout = Duration::from_secs(cli.timeout.max(1));
    let cfg = |nexus: Option<String>, authkey: Option<String>, hostname: Option<String>| {
        let mut c = Config::new(nexus, authkey, state_dir.clone());
        c.hostname = hostname;
        c.timeout = timeout;
        c
    };
    match cli.cmd {
        Cmd::Init { authkey, nexus, hostname, ephemeral } => {
            let mut c = cfg(Some(nexus), authkey, hostname);
            c.ephemeral = ephemeral;
            match Mesh::connect(c).await {
                Ok(m) => {
                    println!("{}", m.ipv4().map(|a| a.to_string()).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Login { nexus, hostname, flow, login_timeout, no_qr } => {
            let limit = Duration::from_secs(login_timeout.max(1));
            let net = citadel::net::TokioNet;
            let mut key = None;
            if flow != "web" {
                let r = citadel::login::device_login(&net, &nexus, limit, timeout, |c| {
                    let full = if c.verification_uri_complete.is_empty() {
                        &c.verification_uri
                    } else {
                        &c.verification_uri_complete
                    };
                    show_login(full, Some(&c.user_code), !no_qr);
                });
                match with_spinner("waiting for approval…", r).await {
                    Ok(k) => key = Some(k),
                    Err(citadel::login::LoginError::Unsupported) if flow == "auto" => {}
                    Err(e @ citadel::login::LoginError::Control(_)) => {
                        eprintln!("citadel: {e}");
                        return ExitCode::from(4);
                    }
                    Err(e) => {
                        eprintln!("citadel: {e}");
                        return ExitCode::from(3);
                    }
                }
            }
            let mut c = cfg(Some(nexus), key.clone(), hostname);
            if key.is_none() {
                c.login_timeout = limit;
                c.on_auth_url = Some(Arc::new(move |u: &str| show_login(u, None, !no_qr)));
            }
            match with_spinner("waiting for approval…", Mesh::connect(c)).await {
                Ok(m) => {
                    let s = m.status();
                    println!("{}", s.ipv4.as_deref().unwrap_or_default());
                    eprintln!("citadel: logged in as {} in org {}", s.hostname, s.org);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Expose(cmd) => ExitCode::from(cli_programs::run_expose(&state_dir, cmd).await),
        Cmd::Whois { addr, json } => {
            ExitCode::from(cli_programs::run_whois(&state_dir, cfg(None, None, None), &addr, json).await)
        }
        Cmd::Up { authkey, nexus, hostname, programs } => {
            let mesh = match Mesh::connect(cfg(nexus, authkey, hostname)).await {
                Ok(m) => m,
                Err(e) => return fail(&e),
            };
            let s = mesh.status();
            eprintln!("citadel: up as {} ({}) in org {}", s.hostname, s.ipv4.as_deref().unwrap_or("-"), s.org);
            let mesh = Arc::new(mesh);
            if let Err(e) = programs.start(&mesh).await {
                eprintln!("citadel: {e}");
                return ExitCode::from(2);
            }
            let mesh = Arc::new(tokio::sync::Mutex::new(Some(mesh)));
            let done = Arc::new(tokio::sync::Notify::new());
            let server = tokio::spawn(api::serve(mesh.clone(), api::socket_path(&state_dir), done.clone()));
            let mut term = Terminate::new();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = done.notified() => {}
                r = server => { if let Ok(Err(e)) = r { eprintln!("citadel: local API failed: {e}"); return ExitCode::from(1); } }
            }
            let _ = std::fs::remove_file(api::socket_path(&state_dir));
            drop(mesh.lock().await.take());
            ExitCode::SUCCESS
        }
        Cmd::Status { json, no_color } => {
            match api::call(&state_dir, &Request::Status).await {
                Ok(Some(Response::Status(s))) => {
                    print_status(&s, json, use_color(no_color));
                    return if s.connected { ExitCode::SUCCESS } else { ExitCode::from(6) };
                }
                Ok(Some(Response::Error { message })) => {
                    eprintln!("citadel: {message}");
                    return ExitCode::from(1);
                }
                _ => {}
            }
            let registered = matches!(
                std::fs::read(state_dir.join("node.json")).ok().and_then(|b| serde_json::from_slice::<citadel::state::NodeInfo>(&b).ok()),
                Some(i) if i.registered
            );
            if !registered && !state_dir.join("node.json").exists() {
                if json {
                    println!("{}", serde_json::json!({"connected": false, "peers": []}));
                } else {
                    println!("Citadel    not logged in (run `citadel init --authkey KEY --nexus URL`)");
                }
                return ExitCode::from(6);
            }
            match Mesh::connect(cfg(None, None, None)).await {
                Ok(m) => {
                    print_status(&m.status(), json, use_color(no_color));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Work { redis_url, queue, group, max_retries, max_concurrency, claim_idle, drain_timeout, allow_shell } => {
            // The job loop runs only on a node that is in the mesh: bring it up from state.
            let mesh = match Mesh::connect(cfg(None, None, None)).await {
                Ok(m) if m.is_connected() => m,
                Ok(_) => {
                    eprintln!("citadel: not connected to the mesh; refusing to start the job loop");
                    return ExitCode::from(6);
                }
                Err(ConnectError::State(StateError::Locked(_))) => {
                    eprintln!("citadel: a node is already running on this state directory (`citadel up`); stop it first, `citadel work` runs the node itself");
                    return ExitCode::from(5);
                }
                Err(e) => {
                    eprintln!("citadel: not connected to the mesh ({e}); refusing to start the job loop");
                    return ExitCode::from(match exit_code(&e) {
                        3 => 3,
                        5 => 5,
                        _ => 6,
                    });
                }
            };
            let mut wc = citadel::work::WorkConfig::new(redis_url);
            wc.queue = queue;
            wc.group = group;
            wc.max_retries = max_retries;
            wc.max_concurrency = max_concurrency.max(1);
            wc.claim_idle = Duration::from_secs(claim_idle.max(1));
            wc.drain_timeout = Duration::from_secs(drain_timeout);
            wc.allow_shell = allow_shell;
            let s = mesh.status();
            eprintln!("citadel: working as {} ({}) in org {}", s.hostname, s.ipv4.as_deref().unwrap_or("-"), s.org);
            let shutdown = async {
                let mut term = Terminate::new();
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            let dialer: Arc<dyn citadel::work::MeshDialer> = Arc::new(mesh);
            match citadel::work::run(wc, dialer, shutdown).await {
                Ok(sum) => {
                    eprintln!(
                        "citadel: job loop stopped: {} succeeded, {} failed attempts, {} dead-lettered, {} reclaimed, {} left for reclaim",
                        sum.succeeded, sum.failed_attempts, sum.dead_lettered, sum.reclaimed, sum.abandoned
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("citadel: {e}");
                    ExitCode::from(4)
                }
            }
        }
        Cmd::Ping { peer, count, port, json } => {
            let node = match Node::attach(&state_dir, cfg(None, None, None)).await {
                Ok(n) => n,
                Err(code) => return code,
            };
            let mut lost = 0;
            for i in 0..count.max(1) {
                if i > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                match node.ping(&peer, port, timeout).await {
                    Ok(p) if json => println!("{}", serde_json::to_string(&p).expect("serializes")),
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
            if lost == count.max(1) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Cmd::Connect { target } => {
            let Some((peer, port)) = split_target(&target) else {
                eprintln!("citadel: expected PEER:PORT, got {target:?}");
                return ExitCode::from(2);
            };
            let node = match Node::attach(&state_dir, cfg(None, None, None)).await {
                Ok(n) => n,
                Err(code) => return code,
            };
            let mut conn = match node.dial(&peer, port).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("citadel: {e}");
                    return ExitCode::from(1);
                }
            };
            let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
            match tokio::io::copy_bidirectional(&mut stdio, &mut conn).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("citadel: connection to {target} failed: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Proxy { local_port, target } => {
            let Some((peer, port)) = split_target(&target) else {
                eprintln!("citadel: expected PEER:PORT, got {target:?}");
                return ExitCode::from(2);
            };
            let node = match Node::attach(&state_dir, cfg(None, None, None)).await {
                Ok(n) => Arc::new(n),
                Err(code) => return code,
            };
            let listener = match tokio::net::TcpListener::bind(("127.0.0.1", local_port)).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("citadel: cannot listen on 127.0.0.1:{local_port}: {e}");
                    return ExitCode::from(1);
                }
            };
            eprintln!(
                "citadel: forwarding 127.0.0.1:{} to {target}",
                listener.local_addr().map(|a| a.port()).unwrap_or(local_port)
            );
            let mut term = Terminate::new();
            loop {
                let (mut local, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(e) => { eprintln!("citadel: accept: {e}"); continue; } },
                    _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                    _ = term.recv() => return ExitCode::SUCCESS,
                };
                let node = node.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    match node.dial(&peer, port).await {
                        Ok(mut remote) => {
                            let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                        }
                        Err(e) => tracing::warn!("proxy: {e}"),
                    }
                });
            }
        }
        Cmd::Netcheck { derp_map, stun, port, json } => netcheck(&state_dir, derp_map, stun, port, json, timeout).await,
        Cmd::Logout => {
            match api::call(&state_dir, &Request::Logout).await {
                Ok(Some(Response::Ok)) => {
                    println!("logged out");
                    return ExitCode::SUCCESS;
                }
                Ok(Some(Response::Error { message })) => {
                    eprintln!("citadel: {message}");
                    return ExitCode::from(1);
                }
                _ => {}
            }
            match Mesh::connect(cfg(None, None, None)).await {
                Ok(m) => match m.logout().await {
                    Ok(()) => {
                        println!("logged out");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                Err(ConnectError::NeedsAuth { .. }) | Err(ConnectError::NoNexusUrl) => {
                    // Not registered anywhere: just clear local state.
                    match citadel::state::StateDir::open(&state_dir).and_then(|s| s.clear()) {
                        Ok(()) => {
                            println!("logged out");
                            ExitCode::SUCCESS
                        }
                        Err(e) => fail(&ConnectError::State(e)),
                    }
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// `citadel netcheck`: STUN to every region of the DERP map (and `extra` servers) from one UDP
/// socket, like the data plane does, plus HTTPS latency to each region.
async fn netcheck(
    state_dir: &std::path::Path,
    derp_map: Option<PathBuf>,
    extra: Vec<std::net::SocketAddr>,
    port: u16,
    json: bool,
    timeout: Duration,
) -> ExitCode {
    use citadel::netcheck::{stun_targets, Probe, StunTarget};
    use citadel::tailcfg::DerpMap;
    let map: DerpMap = match &derp_map {
        Some(f) => match std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => {
                eprintln!("citadel: cannot read DERP map {}: {e}", f.display());
                return ExitCode::from(2);
            }
        },
        None => std::fs::read(state_dir.join("netmap.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<citadel::netmap::NetMap>(&b).ok())
            .map(|nm| nm.derp_map)
            .unwrap_or_default(),
    };
    let mut targets = stun_targets(&map);
    targets.extend(extra.iter().map(|a| StunTarget { region: 0, addr: *a }));
    if targets.is_empty() && map.regions.is_empty() {
        eprintln!("citadel: no DERP map (run `citadel up` once, or pass --derp-map FILE) and no --stun server");
        return ExitCode::from(2);
    }
    let sock = match tokio::net::UdpSocket::bind(("0.0.0.0", port)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("citadel: cannot bind UDP port {port}: {e}");
            return ExitCode::from(1);
        }
    };
    let start = std::time::Instant::now();
    let mut probe = Probe::new(&targets, start);
    let mut buf = [0u8; 1500];
    loop {
        let now = std::time::Instant::now();
        for (dst, payload) in probe.poll(now) {
            let _ = sock.send_to(&payload, dst).await;
        }
        if probe.done(now) {
            break;
        }
        let wait = probe.next_deadline().saturating_duration_since(now).max(Duration::from_millis(1));
        if let Ok(Ok((n, from))) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
            probe.on_packet(from, &buf[..n], std::time::Instant::now());
        }
    }
    let report = probe.report();
    let https =
        citadel::derphttp::measure_regions(Arc::new(citadel::net::TokioNet), &map, timeout.min(Duration::from_secs(5)))
            .await;
    let preferred = report.fastest_region().filter(|r| *r != 0).or_else(|| citadel::derphttp::pick_home_region(&https));
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    if json {
        let v = serde_json::json!({
            "udp": report.udp,
            "mapped": report.mapped.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "mapping_varies_by_dest": report.mapping_varies_by_dest,
            "preferred_derp": preferred.unwrap_or(0),
            "stun_latency_ms": report.region_latency.iter().map(|(r, l)| (r.to_string(), serde_json::json!(ms(*l)))).collect::<serde_json::Map<_, _>>(),
            "https_latency_ms": https.iter().filter_map(|r| r.latency.map(|l| (r.region_id.to_string(), serde_json::json!(ms(l))))).collect::<serde_json::Map<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        println!("Report:");
        println!("  UDP                      {}", report.udp);
        println!(
            "  Public endpoint(s)       {}",
            if report.mapped.is_empty() {
                "-".to_string()
            } else {
                report.mapped.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            }
        );
        println!(
            "  Mapping varies by dest   {}",
            report.mapping_varies_by_dest.map_or("unknown (needs two STUN servers)".to_string(), |v| v.to_string())
        );
        println!("  Preferred DERP           {}", preferred.map_or("-".to_string(), |r| r.to_string()));
        println!("  DERP latency");
        for (id, region) in &map.regions {
            let stun = report.region_latency.get(id).map_or("-".to_string(), |l| format!("{:.1} ms", ms(*l)));
            let web = https
                .iter()
                .find(|r| r.region_id == *id)
                .and_then(|r| r.latency)
                .map_or("-".to_string(), |l| format!("{:.1} ms", ms(l)));
            println!("    {id:>3} {:12} stun {stun:>10}   https {web:>10}", region.region_code);
        }
    }
    ExitCode::SUCCESS
}
