//! nexus-sim under load from strangers: 1,000 concurrent unauthenticated ts2021 handshakes
//! (then held open, idle) while a registered node still gets its map updates within a bound;
//! and a DERP client flooding a destination while another client's packets to it still arrive
//! (none dropped, bounded delay).

use base64::Engine as _;
use citadel::derphttp::{DerpClient, Received};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::mesh::{Config, Mesh};
use citadel::net::TokioNet;
use citadel::noise::Initiator;
use citadel_e2e::{eventually, Nexus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HANDSHAKES: usize = 1000;
/// How long a registered node may wait for a map update while the server is under load.
const MAP_BOUND: Duration = Duration::from_secs(10);

fn cfg(url: &str, key: &str, dir: &std::path::Path, host: &str) -> Config {
    let mut c = Config::new(Some(url.to_string()), Some(key.to_string()), dir.to_path_buf());
    c.hostname = Some(host.to_string());
    c.timeout = Duration::from_secs(20);
    c
}

fn peer_names(m: &Mesh) -> Vec<String> {
    m.status().peers.into_iter().map(|p| p.name).collect()
}

/// Opens a ts2021 connection as a fresh, unregistered machine, completes the Noise handshake
/// and then holds the connection without a request until `release`; counts itself in
/// `answered` once the server answered the handshake.
async fn stranger(
    addr: std::net::SocketAddr,
    server_key: [u8; 32],
    release: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return };
    let machine = PrivateKey::generate(&mut rand::thread_rng());
    let init = Initiator::new(&machine, &server_key, citadel::tailcfg::CAPABILITY_VERSION).unwrap();
    let req = format!(
        "POST /ts2021 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\n\
         X-Tailscale-Handshake: {}\r\nContent-Length: 0\r\n\r\n",
        base64::engine::general_purpose::STANDARD.encode(&init.init_frame)
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let ok = loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            // The 101 head, then the 51-byte response frame.
            if got.len() >= end + 4 + 51 {
                break got.starts_with(b"HTTP/1.1 101");
            }
        }
    };
    if !ok {
        return;
    }
    answered.fetch_add(1, Ordering::Relaxed);
    while !release.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unauthenticated_handshakes_do_not_stop_map_updates() {
    // Plain http: the strangers speak the ts2021 upgrade without TLS.
    let nx = Nexus::start_plain_with(nexus_sim::Config::default()).await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(cfg(&nx.url(), &key, &t.path().join("a"), "a")).await.unwrap();

    let addr = nx.running.addr;
    let server_key = nx.running.shared.server_key.public_bytes();
    let release = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let strangers: Vec<_> = (0..HANDSHAKES)
        .map(|_| {
            let (release, answered) = (release.clone(), answered.clone());
            tokio::spawn(stranger(addr, server_key, release, answered))
        })
        .collect();

    // While the handshakes pour in: a new node joins and `a` must hear of it.
    let start = Instant::now();
    let b = Mesh::connect(cfg(&nx.url(), &key, &t.path().join("b"), "b")).await.unwrap();
    assert!(eventually(MAP_BOUND, || peer_names(&a) == ["b"]).await, "a missed b's join under load");
    let join = start.elapsed();

    // With every stranger connected and idle: a leave still reaches `a` within the bound.
    assert!(
        eventually(Duration::from_secs(60), || answered.load(Ordering::Relaxed) == HANDSHAKES).await,
        "only {} of {HANDSHAKES} handshakes were answered",
        answered.load(Ordering::Relaxed)
    );
    let start = Instant::now();
    b.logout().await.unwrap();
    assert!(eventually(MAP_BOUND, || peer_names(&a).is_empty()).await, "a missed b's leave with 1,000 idle strangers");
    let leave = start.elapsed();
    eprintln!("load: {HANDSHAKES} handshakes answered; join seen after {join:?}, leave after {leave:?}");

    release.store(true, Ordering::Relaxed);
    for s in strangers {
        s.await.unwrap();
    }
    drop(a);
}

fn derp_key() -> PrivateKey {
    PrivateKey::generate(&mut rand::thread_rng())
}

/// Catches a relay whose full queue drops the oldest packet whatever its source: with one
/// drop-oldest queue per destination, 5 to 10 of the quiet sender's 50 packets are lost here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derp_flooder_does_not_starve_another_sender() {
    let nx = Nexus::start_with(nexus_sim::Config { derp_verify_clients: false, ..Default::default() }).await;
    let url = nx.url();
    let (fk, sk, rk) = (derp_key(), derp_key(), derp_key());
    let t = Duration::from_secs(10);
    let flooder = Arc::new(DerpClient::connect(&TokioNet, url.as_str(), &fk, t).await.unwrap());
    let sender = DerpClient::connect(&TokioNet, url.as_str(), &sk, t).await.unwrap();
    let receiver = Arc::new(DerpClient::connect(&TokioNet, url.as_str(), &rk, t).await.unwrap());
    let (rpub, spub) = (NodePublic(rk.public_bytes()), NodePublic(sk.public_bytes()));
    let base = Instant::now();

    // The receiver reads as fast as it can; the flooder still outpaces it, so the receiver's
    // queue at the relay overflows (the test checks that it did).
    let rx = {
        let receiver = receiver.clone();
        tokio::spawn(async move {
            let mut delays = Vec::new();
            let mut flood = 0u64;
            loop {
                let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(3), receiver.recv()).await else { break };
                if let Received::Packet { src, packet } = msg {
                    if src == spub {
                        let sent = u64::from_be_bytes(packet[..8].try_into().unwrap());
                        delays.push(base.elapsed().saturating_sub(Duration::from_micros(sent)));
                    } else {
                        flood += 1;
                    }
                }
            }
            (delays, flood)
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (flooder, stop) = (flooder.clone(), stop.clone());
        tokio::spawn(async move {
            let junk = vec![0xabu8; 1200];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if flooder.send(rpub, &junk).await.is_err() {
                    break;
                }
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    const SENT: usize = 50;
    for _ in 0..SENT {
        let mut p = (base.elapsed().as_micros() as u64).to_be_bytes().to_vec();
        p.resize(100, 0);
        sender.send(rpub, &p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.await.unwrap();
    let (mut delays, flood_received) = rx.await.unwrap();
    delays.sort();
    let stats = nx.running.derp.as_ref().unwrap().stats();
    eprintln!(
        "derp load: flooder sent {flooded}, receiver got {flood_received} of them; relay dropped {}; \
         {} of {SENT} quiet packets arrived, delays median {:?} max {:?}",
        stats.packets_dropped,
        delays.len(),
        delays.get(delays.len() / 2),
        delays.last()
    );
    assert!(stats.packets_dropped > 0, "the flood never filled the receiver's queue: the test proves nothing");
    assert_eq!(delays.len(), SENT, "quiet sender's packets were dropped while another client flooded");
    assert!(*delays.last().unwrap() < Duration::from_secs(2), "quiet packets delayed {:?}", delays.last());
}
