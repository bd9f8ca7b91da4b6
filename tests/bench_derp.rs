//! Bench: packets/s through nexus-sim's DERP relay on loopback. Two citadel DERP clients log
//! in over plain HTTP and one sends N packets of 1280 bytes (a full WireGuard MTU datagram) to
//! the other, in two ways:
//!
//! - flow-controlled: the receiver acknowledges every 8 packets and the sender keeps at most
//!   one queue's worth (the relay's per-client queue depth) unacknowledged, as a congestion-
//!   controlled tunnel would; nothing is dropped, so this is the relay's delivered capacity;
//! - flood: the sender writes as fast as it can. The relay drops the oldest queued packet when
//!   a receiver falls behind (as Tailscale's does), so much less than N arrives.
//!
//! `cargo run --release -p citadel-e2e --bin bench-derp [N] [QUEUE_DEPTH]` (defaults 200000
//! and nexus-sim's 32).

use citadel::derphttp::{DerpClient, Received};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::net::TokioNet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: usize = 1280;
const ACK_EVERY: u64 = 8;

struct Outcome {
    sent: u64,
    delivered: u64,
    elapsed: Duration,
}

async fn run(url: &str, n: u64, window: Option<u64>) -> anyhow::Result<Outcome> {
    let ak = PrivateKey::generate(&mut rand::thread_rng());
    let bk = PrivateKey::generate(&mut rand::thread_rng());
    let t = Duration::from_secs(10);
    let a = Arc::new(DerpClient::connect(&TokioNet, url, &ak, t).await?);
    let b = Arc::new(DerpClient::connect(&TokioNet, url, &bk, t).await?);
    let (apub, bpub) = (NodePublic(ak.public_bytes()), NodePublic(bk.public_bytes()));

    let acked = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let receiver = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut got = 0u64;
            let mut last = Instant::now();
            // Until N arrived, or the stream has been quiet for a second (the rest was dropped).
            while got < n {
                match tokio::time::timeout(Duration::from_secs(1), b.recv()).await {
                    Ok(Ok(Received::Packet { packet, .. })) if packet.len() == SIZE => {
                        got += 1;
                        last = Instant::now();
                        if window.is_some() && got.is_multiple_of(ACK_EVERY) {
                            let _ = b.send(apub, &got.to_be_bytes()).await;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            (got, last)
        })
    };
    let acker = {
        let (a, acked, progress) = (a.clone(), acked.clone(), progress.clone());
        tokio::spawn(async move {
            while let Ok(r) = a.recv().await {
                if let Received::Packet { packet, .. } = r {
                    if let Ok(b) = <[u8; 8]>::try_from(&packet[..]) {
                        acked.fetch_max(u64::from_be_bytes(b), Ordering::Relaxed);
                        progress.notify_one();
                    }
                }
            }
        })
    };
    let packet = vec![0x5au8; SIZE];
    let start = Instant::now();
    for sent in 0..n {
        if let Some(w) = window {
            while sent - acked.load(Ordering::Relaxed) >= w {
                // A lost ack would stall forever; re-check every few milliseconds.
                let _ = tokio::time::timeout(Duration::from_millis(5), progress.notified()).await;
            }
        }
        a.send(bpub, &packet).await?;
    }
    let (delivered, last) = receiver.await?;
    acker.abort();
    Ok(Outcome { sent: n, delivered, elapsed: last - start })
}

fn report(name: &str, o: &Outcome) {
    let secs = o.elapsed.as_secs_f64();
    println!(
        "  {name:<16} {:>7}/{:<7} delivered in {:>9.3?}: {:>8.0} packets/s {:>7.1} MB/s ({:.1}% dropped)",
        o.delivered,
        o.sent,
        o.elapsed,
        o.delivered as f64 / secs,
        (o.delivered as usize * SIZE) as f64 / secs / 1e6,
        100.0 * (o.sent - o.delivered) as f64 / o.sent as f64
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let depth: usize =
        std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(nexus_sim::derp::DEFAULT_QUEUE_DEPTH);
    let running = nexus_sim::start(nexus_sim::Config {
        derp_queue_depth: depth,
        stun_listen: None,
        derp_verify_clients: false,
        ..Default::default()
    })
    .await?;
    println!("DERP relay (nexus-sim), loopback, plain HTTP, {SIZE}-byte packets, per-client queue {depth}");
    report("flow-controlled", &run(&running.url, n, Some(depth as u64)).await?);
    report("flood", &run(&running.url, n, None).await?);
    if let Some(d) = &running.derp {
        println!("  relay stats: {:?}", d.stats());
    }
    Ok(())
}
