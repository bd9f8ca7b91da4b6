//! `nexus-sim`: serve, and Headscale-style admin subcommands that call the REST API.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "nexus-sim", version, about = "A Headscale-compatible coordination server for Citadel")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Conn {
    /// Server URL
    #[arg(long, env = "NEXUS_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// API key
    #[arg(long, env = "NEXUS_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print JSON instead of a table
    #[arg(long, short = 'o', global = true, value_parser = ["json", "table"], default_value = "table")]
    output: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server
    Serve(ServeArgs),
    /// Run only a DERP relay (one region) and STUN, without the control plane; prints the
    /// region's DERP map as JSON on stdout
    Derp {
        #[arg(long, default_value = "127.0.0.1:3340")]
        listen: SocketAddr,
        /// Host name put in the printed DERP map (default: the listen IP)
        #[arg(long)]
        hostname: Option<String>,
        #[command(flatten)]
        stun: StunArgs,
        /// Mesh key (64 hex digits) for trusted region peers
        #[arg(long, env = "NEXUS_DERP_MESH_KEY", hide_env_values = true)]
        mesh_key: Option<String>,
    },
    /// Mint a test CA and a server certificate for NAMEs (DNS names or IPs) into DIR
    /// (ca.pem, cert.pem, key.pem), for `serve --tls-cert DIR/cert.pem --tls-key DIR/key.pem`
    /// and clients' SSL_CERT_FILE=DIR/ca.pem
    Cert {
        /// Output directory
        #[arg(long)]
        out: PathBuf,
        /// Names the certificate is valid for
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Manage users (orgs)
    Users {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: UsersCmd,
    },
    /// Manage pre-auth keys
    Preauthkeys {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Manage nodes
    Nodes {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: NodesCmd,
    },
    /// Decide device-authorization requests (`citadel login`)
    Device {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Manage API keys
    Apikeys {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: ApiKeysCmd,
    },
    /// Show, replace or check the ACL policy
    Policy {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the active policy
    Get,
    /// Replace the active policy with a file's (refused, leaving the old one, if invalid);
    /// kept in the server's database when it runs with --db
    Set {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
    /// Check a policy file locally; prints every problem with its line
    Check {
        #[arg(long, short = 'f')]
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// SQLite file (in memory when absent)
    #[arg(long)]
    db: Option<PathBuf>,
    /// URL clients use to reach this server
    #[arg(long)]
    server_url: Option<String>,
    /// Accept this admin API key (else one is generated and printed)
    #[arg(long, env = "NEXUS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Tailnet DNS suffix
    #[arg(long, default_value = "nexus.sim")]
    base_domain: String,
    /// Map keep-alive interval in seconds
    #[arg(long, default_value_t = 50)]
    keepalive: u64,
    /// Seconds an offline ephemeral node is kept
    #[arg(long, default_value_t = 120)]
    ephemeral_timeout: u64,
    /// Minimum seconds between device-login polls
    #[arg(long, default_value_t = 5)]
    device_poll_interval: u64,
    /// Seconds a device-login code stays valid
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86400))]
    device_code_ttl: u64,
    /// Embedded DERP regions (region 1 on --listen's port, each further one on its own port)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    derp_regions: u16,
    /// Hand out an empty DERP map and relay nothing
    #[arg(long, conflicts_with_all = ["derp_map", "derp_regions"])]
    no_derp: bool,
    /// Hand out this DERP map (tailcfg DERPMap JSON) instead of the embedded relay's
    #[arg(long, conflicts_with = "derp_regions")]
    derp_map: Option<PathBuf>,
    /// Refuse DERP clients whose node key is not a registered node (the default; kept for
    /// compatibility)
    #[arg(long, conflicts_with = "no_derp_verify_clients")]
    derp_verify_clients: bool,
    /// Let any key use the embedded DERP relay and relay between any keys, as Headscale's
    /// embedded DERP does (the policy then does not apply to relayed packets)
    #[arg(long)]
    no_derp_verify_clients: bool,
    /// ACL policy file (Headscale v2 HuJSON); default: the policy last set with `policy set`
    /// when --db keeps one, else the built-in org isolation policy
    #[arg(long, conflicts_with = "headscale_default")]
    policy: Option<PathBuf>,
    /// No policy, as Headscale without one: every node may reach every other
    #[arg(long)]
    headscale_default: bool,
    /// Mesh key (64 hex digits) for trusted DERP region peers
    #[arg(long, env = "NEXUS_DERP_MESH_KEY", hide_env_values = true)]
    derp_mesh_key: Option<String>,
    #[command(flatten)]
    stun: StunArgs,
    /// Serve TLS with this PEM certificate chain (control, REST API, DERP, device flow);
    /// the default server URL becomes https://
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Node keys expire this many seconds after registration or renewal (default: never)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    node_key_expiry: Option<u64>,
    /// Fault injection for test labs, never for a real deployment: breaks org isolation on
    /// purpose by listing host PEER in every map built for host INTO, whatever their orgs
    /// (repeatable, at most 64)
    #[arg(long, value_name = "INTO=PEER", value_parser = parse_leak)]
    fault_leak_peer: Vec<(String, String)>,
}

fn parse_leak(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(format!("{s:?}: expected INTO=PEER (two host names)")),
    }
}

#[derive(clap::Args)]
struct StunArgs {
    /// STUN listen address, e.g. 0.0.0.0:3478 (default: the listen IP and a free port; the DERP
    /// map carries the port either way)
    #[arg(long)]
    stun_listen: Option<SocketAddr>,
    /// Serve no STUN
    #[arg(long, conflicts_with = "stun_listen")]
    no_stun: bool,
}

impl StunArgs {
    fn resolve(&self, listen: SocketAddr) -> Option<SocketAddr> {
        if self.no_stun {
            return None;
        }
        if let Some(a) = self.stun_listen {
            return Some(a);
        }
        // Not 3478 by default: several servers run side by side in tests, and probing for a
        // free 3478 would race between them. The DERP map names whatever port is bound.
        Some(SocketAddr::new(listen.ip(), 0))
    }
}

#[derive(Subcommand)]
enum UsersCmd {
    /// Create a user; prints its name
    Create { name: String },
    /// List users
    List,
    /// Delete a user (by name or id)
    Delete { name: String },
    /// Rename a user
    Rename { name: String, new_name: String },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a pre-auth key; prints only the key
    Create {
        #[arg(long, short)]
        user: String,
        #[arg(long)]
        reusable: bool,
        #[arg(long)]
        ephemeral: bool,
        /// Lifetime, e.g. 90s, 30m, 24h, 7d
        #[arg(long, default_value = "1h")]
        expiration: String,
        /// ACL tags (tag:name), comma separated
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// List a user's keys
    List {
        #[arg(long, short)]
        user: String,
    },
    /// Expire a key
    Expire {
        #[arg(long, short)]
        user: String,
        key: String,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// List nodes
    List {
        #[arg(long, short)]
        user: Option<String>,
    },
    /// Delete a node
    Delete { id: u64 },
    /// Expire a node's key (now, or `--in` a duration from now)
    Expire {
        id: u64,
        /// Expire it this long from now instead (e.g. 40s, 2h)
        #[arg(long = "in")]
        after: Option<String>,
    },
    /// Rename a node
    Rename { id: u64, name: String },
    /// Set a node's approved routes (replaces them; no --routes approves none)
    ApproveRoutes {
        /// Node id
        #[arg(long, short = 'i')]
        identifier: u64,
        /// Comma-separated prefixes, e.g. 10.0.0.0/8,0.0.0.0/0
        #[arg(long, short, value_delimiter = ',')]
        routes: Vec<String>,
    },
    /// Replace a node's tags (no --tags removes them all)
    Tag {
        /// Node id
        #[arg(long, short = 'i')]
        identifier: u64,
        /// Comma-separated tags, e.g. tag:server,tag:gpu
        #[arg(long, short, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Move a node to another user (org)
    Move {
        /// Node id
        #[arg(long, short = 'i')]
        identifier: u64,
        /// User id or name
        #[arg(long, short)]
        user: String,
    },
    /// Approve an interactive registration (the id from /register/{id})
    Register {
        #[arg(long, short)]
        user: String,
        #[arg(long, short)]
        key: String,
    },
    /// Refuse an interactive registration
    Reject {
        #[arg(long, short)]
        key: String,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Approve a login code into an org
    Approve {
        #[arg(long)]
        code: String,
        #[arg(long, short)]
        user: String,
    },
    /// Deny a login code
    Deny {
        #[arg(long)]
        code: String,
    },
}

#[derive(Subcommand)]
enum ApiKeysCmd {
    /// Create an API key; prints only the key
    Create {
        /// Lifetime (e.g. 90d); never expires when omitted
        #[arg(long)]
        expiration: Option<String>,
    },
    /// List API keys
    List,
    /// Expire an API key now
    Expire {
        /// The key's prefix, as `apikeys list` shows it
        #[arg(long)]
        prefix: String,
    },
    /// Delete an API key
    Delete {
        /// The key's prefix, as `apikeys list` shows it
        #[arg(long)]
        prefix: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("bad duration unit in {s:?} (use s, m, h or d)"),
    };
    Ok(Duration::from_secs(secs))
}

/// The system clock's now plus a duration as `parse_duration` reads it (the admin CLI is
/// never simulated).
fn from_now(d: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    Ok(chrono::Utc::now() + chrono::Duration::from_std(parse_duration(d)?)?)
}

struct Client {
    http: reqwest::Client,
    conn: Conn,
}

impl Client {
    fn new(conn: Conn) -> Result<Self> {
        if conn.api_key.is_none() {
            bail!("no API key: pass --api-key or set NEXUS_API_KEY");
        }
        let tls = nexus_sim::tls::client_config()?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).use_preconfigured_tls(tls).build()?;
        Ok(Client { http, conn })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{}", self.conn.url.trim_end_matches('/'), path);
        let mut rb = self.http.request(method, &url).bearer_auth(self.conn.api_key.as_deref().unwrap_or_default());
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.map_err(|e| {
            // reqwest hides the certificate error several sources deep.
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = s.to_string();
                src = s.source();
            }
            anyhow::anyhow!("cannot reach {}: {why}", self.conn.url)
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{}: {}", status, v.get("message").and_then(|m| m.as_str()).unwrap_or("request failed"));
        }
        Ok(v)
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(o) => o.to_string(),
    }
}

async fn admin(conn: Conn, f: impl AsyncFnOnce(&Client, bool) -> Result<()>) -> Result<()> {
    let json = conn.output == "json";
    let c = Client::new(conn)?;
    f(&c, json).await
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let generated = a.api_key.is_none();
    let key = a.api_key.unwrap_or_else(|| format!("nsapi-{}", nexus_sim::store::random_hex(24)));
    let derp = if a.no_derp {
        nexus_sim::DerpMode::Off
    } else if let Some(f) = &a.derp_map {
        nexus_sim::DerpMode::from_file(f).with_context(|| format!("reading DERP map {}", f.display()))?
    } else {
        nexus_sim::DerpMode::Embedded { regions: a.derp_regions }
    };
    let policy = match (&a.policy, a.headscale_default) {
        (Some(f), _) => Some(std::fs::read_to_string(f).with_context(|| format!("reading policy {}", f.display()))?),
        (None, true) => Some(nexus_sim::policy::HEADSCALE_DEFAULT.to_string()),
        (None, false) => None,
    };
    let cfg = nexus_sim::Config {
        listen: a.listen,
        db: a.db,
        server_url: a.server_url.unwrap_or_default(),
        base_domain: a.base_domain,
        api_keys: vec![key.clone()],
        keepalive: Duration::from_secs(a.keepalive.max(1)),
        ephemeral_timeout: Duration::from_secs(a.ephemeral_timeout),
        device_poll_interval: a.device_poll_interval,
        device_code_ttl: Duration::from_secs(a.device_code_ttl),
        derp,
        derp_verify_clients: !a.no_derp_verify_clients,
        policy,
        derp_mesh_key: a.derp_mesh_key,
        stun_listen: a.stun.resolve(a.listen),
        node_key_expiry: a.node_key_expiry.map(Duration::from_secs),
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(c), Some(k)) => Some(nexus_sim::tls::load(c, k)?),
            _ => None,
        },
        ..Default::default()
    };
    let running = nexus_sim::start(cfg).await?;
    for (into, peer) in &a.fault_leak_peer {
        if !running.shared.faults.leak_peer_by_hostname(into, peer) {
            anyhow::bail!("too many --fault-leak-peer entries (at most 64)");
        }
        tracing::warn!("fault injection: {into}'s netmap lists {peer} whatever its org (--fault-leak-peer)");
    }
    if generated {
        // The admin credential goes to stdout (never to the log) so a script can capture it.
        println!("NEXUS_API_KEY={key}");
    }
    tracing::info!("nexus-sim listening on {}", running.url);
    for (id, addr) in &running.derp_regions {
        tracing::info!(region = id, %addr, "DERP region listening");
    }
    wait_for_signal().await?;
    drop(running);
    Ok(())
}

/// `nexus-sim derp`: a relay and STUN alone, for citadel tests against a bare relay.
async fn derp_only(
    listen: SocketAddr,
    hostname: Option<String>,
    stun: StunArgs,
    mesh_key: Option<String>,
) -> Result<()> {
    use nexus_sim::derp::{DerpOptions, DerpServer, DualListener};
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let host = hostname.unwrap_or_else(|| addr.ip().to_string());
    let stun_srv = match stun.resolve(addr) {
        Some(a) => Some(nexus_sim::stun::StunServer::bind(a).await.with_context(|| format!("binding STUN {a}"))?),
        None => None,
    };
    let server = DerpServer::new(DerpOptions { mesh_key, ..DerpOptions::new() });
    let tls = nexus_sim::derp::self_signed_tls(std::slice::from_ref(&host))?;
    let task = nexus_sim::derp::serve(DualListener::new(listener, tls)?, server.router(1));
    let map = nexus_sim::embedded_derp_map(&host, &[(1, addr)], stun_srv.as_ref().map(|s| s.addr.port()));
    println!("{}", serde_json::to_string(&map)?);
    tracing::info!(%addr, key = %server.public_key(), "DERP relay listening");
    wait_for_signal().await?;
    server.set_stopped(true);
    task.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEXUS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: logs redirected to files are read by tests and tools.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let r = run(Cli::parse()).await;
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nexus-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    use reqwest::Method;
    match cli.cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Derp { listen, hostname, stun, mesh_key } => derp_only(listen, hostname, stun, mesh_key).await,
        Cmd::Policy { cmd: PolicyCmd::Check { file }, .. } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            nexus_sim::policy::Policy::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: invalid policy:\n{e}", file.display()))?;
            println!("policy is valid");
            Ok(())
        }
        Cmd::Policy { conn, cmd } => {
            admin(conn, async |c, json| {
                match cmd {
                    PolicyCmd::Get => {
                        let v = c.call(Method::GET, "/api/v1/policy", None).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v)?);
                        } else {
                            print!("{}", v["policy"].as_str().unwrap_or_default());
                        }
                    }
                    PolicyCmd::Set { file } => {
                        let text =
                            std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                        let v = c.call(Method::PUT, "/api/v1/policy", Some(json!({"policy": text}))).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v)?);
                        } else {
                            println!("policy updated at {}", s(&v, "updatedAt"));
                        }
                    }
                    PolicyCmd::Check { .. } => unreachable!("handled without a connection"),
                }
                Ok(())
            })
            .await
        }
        Cmd::Cert { out, names } => {
            nexus_sim::tls::mint(&names)?.write(&out)?;
            println!("{}", out.join("ca.pem").display());
            Ok(())
        }
        Cmd::Users { conn, cmd } => {
            admin(conn, async |c, json| {
                match cmd {
                    UsersCmd::Create { name } => {
                        let v = c.call(Method::POST, "/api/v1/user", Some(json!({"name": name}))).await?;
                        if json {
                            println!("{}", v["user"])
                        } else {
                            println!("{}", s(&v["user"], "name"))
                        }
                    }
                    UsersCmd::List => {
                        let v = c.call(Method::GET, "/api/v1/user", None).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v["users"])?);
                        } else {
                            println!("{:<6} {:<24} {}", "ID", "NAME", "CREATED");
                            for u in v["users"].as_array().into_iter().flatten() {
                                println!("{:<6} {:<24} {}", s(u, "id"), s(u, "name"), s(u, "createdAt"));
                            }
                        }
                    }
                    UsersCmd::Delete { name } => {
                        c.call(Method::DELETE, &format!("/api/v1/user/{name}"), None).await?;
                    }
                    UsersCmd::Rename { name, new_name } => {
                        c.call(Method::POST, &format!("/api/v1/user/{name}/rename/{new_name}"), None).await?;
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Preauthkeys { conn, cmd } => {
            admin(conn, async |c, json| {
                match cmd {
                    KeysCmd::Create { user, reusable, ephemeral, expiration, tags } => {
                        let exp = from_now(&expiration)?;
                        let v = c
                            .call(
                                Method::POST,
                                "/api/v1/preauthkey",
                                Some(json!({"user": user, "reusable": reusable, "ephemeral": ephemeral,
                                            "expiration": exp.to_rfc3339(), "aclTags": tags})),
                            )
                            .await?;
                        if json {
                            println!("{}", v["preAuthKey"])
                        } else {
                            println!("{}", s(&v["preAuthKey"], "key"))
                        }
                    }
                    KeysCmd::List { user } => {
                        let v = c.call(Method::GET, &format!("/api/v1/preauthkey?user={user}"), None).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v["preAuthKeys"])?);
                        } else {
                            println!(
                                "{:<6} {:<10} {:<10} {:<6} {}",
                                "ID", "REUSABLE", "EPHEMERAL", "USED", "EXPIRATION"
                            );
                            for k in v["preAuthKeys"].as_array().into_iter().flatten() {
                                println!(
                                    "{:<6} {:<10} {:<10} {:<6} {}",
                                    s(k, "id"),
                                    s(k, "reusable"),
                                    s(k, "ephemeral"),
                                    s(k, "used"),
                                    s(k, "expiration")
                                );
                            }
                        }
                    }
                    KeysCmd::Expire { user, key } => {
                        c.call(Method::POST, "/api/v1/preauthkey/expire", Some(json!({"user": user, "key": key})))
                            .await?;
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Nodes { conn, cmd } => {
            admin(conn, async |c, json| {
                match cmd {
                    NodesCmd::List { user } => {
                        let q = user.map(|u| format!("?user={u}")).unwrap_or_default();
                        let v = c.call(Method::GET, &format!("/api/v1/node{q}"), None).await?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&v["nodes"])?);
                        } else {
                            println!(
                                "{:<5} {:<20} {:<12} {:<16} {:<8} {}",
                                "ID", "NAME", "USER", "IPV4", "ONLINE", "ENDPOINTS"
                            );
                            for n in v["nodes"].as_array().into_iter().flatten() {
                                let ips = n["ipAddresses"]
                                    .as_array()
                                    .and_then(|a| a.first())
                                    .and_then(|a| a.as_str())
                                    .unwrap_or("-");
                                let eps: Vec<&str> = n["endpoints"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|e| e.as_str())
                                    .collect();
                                println!(
                                    "{:<5} {:<20} {:<12} {:<16} {:<8} {}",
                                    s(n, "id"),
                                    s(n, "givenName"),
                                    s(&n["user"], "name"),
                                    ips,
                                    s(n, "online"),
                                    eps.join(",")
                                );
                            }
                        }
                    }
                    NodesCmd::Delete { id } => {
                        c.call(Method::DELETE, &format!("/api/v1/node/{id}"), None).await?;
                    }
                    NodesCmd::Expire { id, after } => {
                        let query = match after {
                            Some(d) => {
                                let at = from_now(&d)?;
                                format!("?expiry={}", at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                            }
                            None => String::new(),
                        };
                        c.call(Method::POST, &format!("/api/v1/node/{id}/expire{query}"), None).await?;
                    }
                    NodesCmd::Rename { id, name } => {
                        c.call(Method::POST, &format!("/api/v1/node/{id}/rename/{name}"), None).await?;
                    }
                    NodesCmd::ApproveRoutes { identifier, routes } => {
                        let body = serde_json::json!({"routes": routes});
                        let v = c
                            .call(Method::POST, &format!("/api/v1/node/{identifier}/approve_routes"), Some(body))
                            .await?;
                        if json {
                            println!("{}", v["node"])
                        } else {
                            println!("approved routes: {}", v["node"]["approvedRoutes"])
                        }
                    }
                    NodesCmd::Tag { identifier, tags } => {
                        let body = serde_json::json!({"tags": tags});
                        let v = c.call(Method::POST, &format!("/api/v1/node/{identifier}/tags"), Some(body)).await?;
                        if json {
                            println!("{}", v["node"])
                        } else {
                            println!("tags: {}", v["node"]["forcedTags"])
                        }
                    }
                    NodesCmd::Move { identifier, user } => {
                        let body = serde_json::json!({"user": user});
                        let v = c.call(Method::POST, &format!("/api/v1/node/{identifier}/user"), Some(body)).await?;
                        if json {
                            println!("{}", v["node"])
                        } else {
                            println!("moved to user {}", v["node"]["user"]["name"])
                        }
                    }
                    NodesCmd::Reject { key } => {
                        let id = key.rsplit('/').next().unwrap_or(&key).to_string();
                        c.call(Method::DELETE, &format!("/api/v1/node/register/{id}"), None).await?;
                    }
                    NodesCmd::Register { user, key } => {
                        let v =
                            c.call(Method::POST, &format!("/api/v1/node/register?user={user}&key={key}"), None).await?;
                        if json {
                            println!("{}", v["node"])
                        } else {
                            println!("{}", s(&v["node"], "givenName"))
                        }
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Device { conn, cmd } => {
            admin(conn, async |c, _json| {
                match cmd {
                    DeviceCmd::Approve { code, user } => {
                        c.call(Method::POST, "/api/v1/device/approve", Some(json!({"code": code, "user": user})))
                            .await?;
                    }
                    DeviceCmd::Deny { code } => {
                        c.call(Method::POST, "/api/v1/device/deny", Some(json!({"code": code}))).await?;
                    }
                }
                Ok(())
            })
            .await
        }
        Cmd::Apikeys { conn, cmd } => {
            admin(conn, async |c, json| {
                match cmd {
                    ApiKeysCmd::Create { expiration } => {
                        let body = match expiration {
                            Some(e) => {
                                let at = from_now(&e)?;
                                json!({"expiration": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)})
                            }
                            None => json!({}),
                        };
                        let v = c.call(Method::POST, "/api/v1/apikey", Some(body)).await?;
                        println!("{}", s(&v, "apiKey"));
                    }
                    ApiKeysCmd::Expire { prefix } => {
                        c.call(Method::POST, "/api/v1/apikey/expire", Some(json!({"prefix": prefix}))).await?;
                    }
                    ApiKeysCmd::Delete { prefix } => {
                        c.call(Method::DELETE, &format!("/api/v1/apikey/{prefix}"), None).await?;
                    }
                    ApiKeysCmd::List => {
                        let v = c.call(Method::GET, "/api/v1/apikey", None).await?;
                        if json {
                            println!("{}", v["apiKeys"])
                        } else {
                            for k in v["apiKeys"].as_array().into_iter().flatten() {
                                println!("{:<5} {:<14} {}", s(k, "id"), s(k, "prefix"), s(k, "expiration"));
                            }
                        }
                    }
                }
                Ok(())
            })
            .await
        }
    }
}
