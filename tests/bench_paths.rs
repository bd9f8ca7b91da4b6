//! Relayed vs direct: mesh TCP throughput and round trip between two in-process data planes,
//! once over a direct UDP path and once relayed by nexus-sim's embedded DERP (in-process,
//! loopback, TLS). The relayed run gives the peers no usable endpoint and no disco key, so
//! nothing can upgrade it.
//!
//! ```text
//! cargo run --release -p citadel-e2e --bin bench-paths [-- SECONDS]
//! ```

use citadel::dataplane::{DataPlane, DataPlaneConfig};
use citadel::keys::PrivateKey;
use citadel::netmap::NetMap;
use citadel::tailcfg::DerpMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MB: f64 = 1_000_000.0;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Ok(f) = std::env::var("CITADEL_LOG") {
        tracing_subscriber::fmt().with_env_filter(f).with_writer(std::io::stderr).init();
    }
    // The bench's own nexus-sim serves DERP with a self-signed certificate (InsecureForTests):
    // opt in here, so the relayed figure does not depend on being started through cargo.
    std::env::set_var(citadel::derphttp::DERP_INSECURE_ENV, "1");
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let nx =
        citadel_e2e::Nexus::start_with(nexus_sim::Config { derp_verify_clients: false, ..Default::default() }).await;
    let map = nx.running.shared.derp_map.clone();
    for relay in [false, true] {
        let (mbps, rtt, path) = run(&map, relay, Duration::from_secs(secs)).await?;
        println!(
            "{:7} path {:10}  TCP {:8.1} MB/s   1-byte echo RTT {:7.3} ms (median of 200)",
            if relay { "relayed" } else { "direct" },
            path,
            mbps,
            rtt.as_secs_f64() * 1e3
        );
    }
    let s = nx.running.derp.as_ref().map(|d| d.stats());
    if let Some(s) = s {
        println!("DERP: {} packets relayed, {} dropped (full queues)", s.packets_relayed, s.packets_dropped);
    }
    Ok(())
}

async fn run(map: &DerpMap, relay: bool, dur: Duration) -> anyhow::Result<(f64, Duration, String)> {
    let mut rng = rand::thread_rng();
    let keys: Vec<(PrivateKey, PrivateKey)> =
        (0..2).map(|_| (PrivateKey::generate(&mut rng), PrivateKey::generate(&mut rng))).collect();
    let cfg = |i: usize| DataPlaneConfig {
        node_key: keys[i].0.clone(),
        disco_key: keys[i].1.clone(),
        bind: "127.0.0.1:0".parse().expect("constant"),
    };
    let (ta, ra) = tokio::sync::watch::channel(NetMap::default());
    let (tb, rb) = tokio::sync::watch::channel(NetMap::default());
    let planes = [DataPlane::start(cfg(0), ra)?, DataPlane::start(cfg(1), rb)?];
    // Relayed: no disco and an endpoint nobody answers, so packets can only go over DERP.
    let eps = |i: usize| if relay { "192.0.2.1:9".to_string() } else { planes[i].local_addr().to_string() };
    let [n0, n1] = citadel_e2e::two_node_netmaps(&keys, [eps(0), eps(1)], !relay, map);
    ta.send_replace(n0);
    tb.send_replace(n1);
    let (a, b) = (&planes[0], &planes[1]);

    // Round trip: 1-byte echo.
    let l = b.listen_tcp(7000)?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut s = match a.dial_tcp("100.64.0.2:7000".parse()?).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("A: {:?}\n{:?}\nB: {:?}\n{:?}", a.counters(), a.peer_stats(), b.counters(), b.peer_stats());
            return Err(e.into());
        }
    };
    let mut rtts = Vec::new();
    let mut one = [7u8; 1];
    for _ in 0..200 {
        let t = Instant::now();
        s.write_all(&one).await?;
        s.read_exact(&mut one).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let rtt = rtts[rtts.len() / 2];

    // Throughput: one stream A -> B for `dur`.
    let (total, took) =
        tokio::time::timeout(dur + Duration::from_secs(30), a.bulk_send(b, "100.64.0.2:9000".parse()?, dur)).await??;
    let path = a.peer_stats().first().and_then(|p| p.path).map(|p| p.to_string()).unwrap_or_default();
    Ok((total as f64 / MB / took.as_secs_f64(), rtt, path))
}
