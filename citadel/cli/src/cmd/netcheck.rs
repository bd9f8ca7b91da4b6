//! `citadel netcheck`: UDP, public endpoint, NAT mapping and DERP region latencies.

use crate::{CliError, Ctx};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags of `citadel netcheck`.
#[derive(clap::Args)]
pub struct Args {
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
}

/// `citadel netcheck`: STUN to every region of the DERP map (and `extra` servers) from one UDP
/// socket, like the data plane does, plus HTTPS latency to each region.
pub async fn run(ctx: &Ctx, a: Args) -> Result<(), CliError> {
    let Args { derp_map, stun: extra, port, json } = a;
    let (state_dir, timeout) = (&ctx.state_dir, ctx.timeout);
    use citadel::netcheck::{resolve_hosts, stun_hostnames, stun_targets_with, Probe, StunTarget};
    use citadel::tailcfg::DerpMap;
    let map: DerpMap = match &derp_map {
        Some(f) => match std::fs::read(f)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => return Err(CliError::Usage(format!("cannot read DERP map {}: {e}", f.display()))),
        },
        None => std::fs::read(state_dir.join("netmap.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<citadel::netmap::NetMap>(&b).ok())
            .map(|nm| nm.derp_map)
            .unwrap_or_default(),
    };
    let resolved = resolve_hosts(stun_hostnames(&map), timeout.min(std::time::Duration::from_secs(5))).await;
    let mut targets = stun_targets_with(&map, &resolved);
    targets.extend(extra.iter().map(|a| StunTarget { region: 0, addr: *a }));
    if targets.is_empty() && map.regions.is_empty() {
        return Err(CliError::Usage(
            "no DERP map (run `citadel up` once, or pass --derp-map FILE) and no --stun server".into(),
        ));
    }
    let sock = tokio::net::UdpSocket::bind(("0.0.0.0", port))
        .await
        .map_err(|e| CliError::Failed(format!("cannot bind UDP port {port}: {e}")))?;
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
    Ok(())
}
