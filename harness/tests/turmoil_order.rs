//! The patched turmoil (vendor/turmoil: links indexed by traffic instead of scanned every step)
//! delivers exactly what and when the published 0.7.2 did: a seeded world with jitter, random
//! loss, a hold/release and a partition/repair gives the same receive log, pinned here by the
//! digest the published crate produced for it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HOSTS: usize = 12;
const PORT: u16 = 9000;

/// FNV-1a over the log: a stable digest without a dependency.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn play() -> (usize, String) {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut b = turmoil::Builder::new();
    b.rng_seed(7)
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(2))
        .max_message_latency(Duration::from_millis(20))
        .fail_rate(0.02)
        .repair_rate(0.5);
    let mut sim = b.build();
    for i in 0..HOSTS {
        let log = log.clone();
        sim.host(format!("h{i}"), move || {
            let log = log.clone();
            async move {
                let sock = Arc::new(turmoil::net::UdpSocket::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), PORT)).await?);
                let rx = sock.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok((n, from)) = rx.recv_from(&mut buf).await {
                        let t = turmoil::sim_elapsed().unwrap_or_default().as_millis();
                        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                        log.lock().unwrap().push(format!("{t} h{i} <- {from}: {msg}"));
                    }
                });
                for k in 0u64.. {
                    tokio::time::sleep(Duration::from_millis(5 + i as u64)).await;
                    let to = (i + 1 + (k as usize * 5 + i) % (HOSTS - 1)) % HOSTS;
                    let dst = SocketAddr::new(turmoil::lookup(format!("h{to}")), PORT);
                    let _ = sock.send_to(format!("{i}:{k}").as_bytes(), dst).await;
                }
                Ok(())
            }
        });
    }
    for step in 0..3000 {
        match step {
            400 => sim.hold("h1", "h2"),
            900 => sim.release("h1", "h2"),
            1200 => sim.partition("h3", "h4"),
            1700 => sim.repair("h3", "h4"),
            _ => {}
        }
        sim.step().unwrap();
    }
    let log = log.lock().unwrap().join("\n");
    (log.lines().count(), format!("{:016x}", fnv(&log)))
}

#[test]
fn delivery_matches_the_published_turmoil() {
    let (lines, digest) = play();
    assert_eq!((lines, digest.as_str()), (EXPECTED_LINES, EXPECTED_DIGEST), "the receive log changed");
    assert_eq!(play().1, digest, "same seed, different log");
}

/// Recorded with the published turmoil 0.7.2 (crates.io), before the patch.
const EXPECTED_LINES: usize = 3768;
const EXPECTED_DIGEST: &str = "da5744da68697637";
