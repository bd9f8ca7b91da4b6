//! `citadel status`: connection, mesh IPs, org and peers.

use crate::term::use_color;
use crate::{CliError, Ctx, Exit};
use citadel::api::{self, Request, Response};
use citadel::mesh::{Mesh, Status};

/// Flags of `citadel status`.
#[derive(clap::Args)]
pub struct Args {
    /// Machine-readable output (stable keys, see README)
    #[arg(long)]
    json: bool,
    /// No colours (also off when stdout is not a terminal or NO_COLOR is set)
    #[arg(long)]
    no_color: bool,
}

/// Runs `citadel status`.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let state_dir = &ctx.state_dir;
    match api::call(state_dir, &Request::Status).await {
        Ok(Some(Response::Status(s))) => {
            print_status(&s, a.json, use_color(a.no_color));
            return if s.connected { Ok(()) } else { Err(CliError::Reported(Exit::NotConnected)) };
        }
        Ok(Some(Response::Error { message })) => return Err(CliError::Failed(message)),
        _ => {}
    }
    let registered = matches!(
        std::fs::read(state_dir.join("node.json")).ok().and_then(|b| serde_json::from_slice::<citadel::state::NodeInfo>(&b).ok()),
        Some(i) if i.registered
    );
    if !registered && !state_dir.join("node.json").exists() {
        if a.json {
            println!("{}", serde_json::json!({"connected": false, "peers": []}));
        } else {
            println!("Citadel    not logged in (run `citadel init --authkey KEY --nexus URL`)");
        }
        return Err(CliError::Reported(Exit::NotConnected));
    }
    let m = Mesh::connect(ctx.config(None, None, None)).await?;
    print_status(&m.status(), a.json, use_color(a.no_color));
    Ok(())
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
    println!(
        "  Key expiry {}",
        match &s.key_expiry {
            Some(e) if s.key_expired => bad(&format!("{e} (expired: run `citadel init --authkey KEY` again)")),
            Some(e) if s.key_renewals > 0 => format!("{e} (renewed {}x)", s.key_renewals),
            Some(e) => format!("{e} (renewed automatically before then)"),
            None => "never".to_string(),
        }
    );
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
        if let Some(extra) = peer_details(p) {
            println!("  {:w$}  {}", "", dim(&extra));
        }
    }
    if s.org_guard_dropped > 0 {
        println!("  {}", dim(&format!("org guard dropped {} packets from other orgs", s.org_guard_dropped)));
    }
}

/// The second line of a peer: tags, routes taken beyond its own addresses, exit node and org
/// guard marks; `None` when there is nothing to say.
fn peer_details(p: &citadel::mesh::PeerStatus) -> Option<String> {
    let own = |r: &String| {
        let ip = r.split('/').next().unwrap_or_default();
        p.ipv4.as_deref() == Some(ip) || p.ipv6.as_deref() == Some(ip)
    };
    let mut parts = Vec::new();
    if !p.tags.is_empty() {
        parts.push(format!("tags {}", p.tags.join(",")));
    }
    let extra: Vec<&str> = p.routes.iter().filter(|r| !own(r)).map(String::as_str).collect();
    if !extra.is_empty() {
        parts.push(format!("routes {}", extra.join(",")));
    }
    if !p.routes_skipped.is_empty() {
        parts.push(format!("offers {} (not taken)", p.routes_skipped.join(",")));
    }
    if p.exit_node {
        parts.push("exit node".into());
    }
    if p.org_blocked {
        parts.push("other org: blocked by the org guard".into());
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}
