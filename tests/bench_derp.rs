//! Bench: packets/s through nexus-sim's DERP relay on loopback. Two citadel DERP clients log
//! in over plain HTTP; one sends N packets of 1280 bytes (a full WireGuard MTU datagram) to
//! the other as fast as it can, the other counts what arrives.
//!
//! `cargo run --release -p citadel-e2e --bin bench-derp [N] [QUEUE_DEPTH]` (defaults 200000
//! and nexus-sim's 32). The relay drops the oldest queued packet when a receiver falls behind,
//! as Tailscale's does, so "delivered" can be below N; both rates are printed.

use citadel::derphttp::{DerpClient, Received};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::net::TokioNet;
use std::time::{Duration, Instant};

const SIZE: usize = 1280;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let depth: usize =
        std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(nexus_sim::derp::DEFAULT_QUEUE_DEPTH);
    let running =
        nexus_sim::start(nexus_sim::Config { derp_queue_depth: depth, stun_listen: None, ..Default::default() })
            .await?;
    let ak = PrivateKey::generate(&mut rand::thread_rng());
    let bk = PrivateKey::generate(&mut rand::thread_rng());
    let t = Duration::from_secs(10);
    let a = DerpClient::connect(&TokioNet, running.url.as_str(), &ak, t).await?;
    let b = DerpClient::connect(&TokioNet, running.url.as_str(), &bk, t).await?;
    let dst = NodePublic(bk.public_bytes());

    let recv = tokio::spawn(async move {
        let mut got = 0usize;
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        // Stop at N, or once the stream has been quiet for a second (the rest was dropped).
        while got < n {
            match tokio::time::timeout(Duration::from_secs(1), b.recv()).await {
                Ok(Ok(Received::Packet { packet, .. })) if packet.len() == SIZE => {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (got, first.map(|f| last - f))
    });
    let packet = vec![0x5au8; SIZE];
    let start = Instant::now();
    for _ in 0..n {
        a.send(dst, &packet).await?;
    }
    let send_time = start.elapsed();
    let (got, _) = recv.await?;
    let total = start.elapsed();
    // The receive window ends at the last packet, not at the idle timeout that ended the loop.
    let stats = running.derp.as_ref().map(|d| d.stats()).unwrap_or_default();
    let recv_time = if got < n { total.saturating_sub(Duration::from_secs(1)) } else { total };
    let mb = |count: usize, d: Duration| (count * SIZE) as f64 / d.as_secs_f64() / 1e6;
    println!("DERP relay, loopback, {SIZE}-byte packets, per-client queue {depth}");
    println!(
        "  sent      {n:>8} in {send_time:>10.3?}: {:>9.0} packets/s {:>8.1} MB/s",
        n as f64 / send_time.as_secs_f64(),
        mb(n, send_time)
    );
    println!(
        "  delivered {got:>8} in {recv_time:>10.3?}: {:>9.0} packets/s {:>8.1} MB/s ({:.1}% dropped by the relay)",
        got as f64 / recv_time.as_secs_f64(),
        mb(got, recv_time),
        100.0 * (n - got) as f64 / n as f64
    );
    println!("  server stats: {stats:?}");
    Ok(())
}
