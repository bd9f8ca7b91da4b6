//! Data-plane figures: mesh TCP throughput between two planes over loopback, raw boringtun
//! encrypt+decrypt per core, and single-core ChaCha20-Poly1305 seal+open for comparison (the
//! same work per packet as a WireGuard encrypt+decrypt, without the framing).
//!
//! ```text
//! cargo run --release -p citadel --example dp_bench [-- SECONDS]
//! ```

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use citadel::dataplane::{DataPlane, DataPlaneConfig};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::netmap::NetMap;
use citadel::tailcfg::{FilterRule, NetPortRange, Node, PortRange};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Inner packet size: the mesh MTU.
const PACKET: usize = 1280;
const MB: f64 = 1_000_000.0;

fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let dur = Duration::from_secs(secs);
    println!("data-plane bench ({secs} s per figure, {} cores)", std::thread::available_parallelism()?.get());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mesh = rt.block_on(mesh_tcp(dur))?;
    println!("mesh TCP citadel->citadel over loopback:   {:8.1} MB/s", mesh);
    let wg = boringtun_rate(dur)?;
    println!("boringtun encrypt+decrypt, 1 core, {PACKET} B: {:8.1} MB/s", wg);
    let aead = chacha_rate(dur);
    println!("ChaCha20-Poly1305 seal+open, 1 core, {PACKET} B: {:8.1} MB/s (chacha20poly1305 crate)", aead);
    println!("ratio mesh TCP / boringtun enc+dec: {:.2}", mesh / wg);
    println!("ratio boringtun enc+dec / AEAD seal+open: {:.2}", wg / aead);
    Ok(())
}

fn node(id: i64, key: &PrivateKey, endpoint: SocketAddr) -> Node {
    let ip = format!("100.64.0.{id}/32");
    Node {
        id,
        key: NodePublic(key.public_bytes()),
        addresses: vec![ip.clone()],
        allowed_ips: vec![ip],
        endpoints: vec![endpoint.to_string()],
        ..Default::default()
    }
}

fn netmap(me: &Node, peer: &Node) -> NetMap {
    let rule = FilterRule {
        src_ips: vec!["*".into()],
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    };
    let mut nm = NetMap { self_node: me.clone(), packet_filter: vec![rule], ..Default::default() };
    nm.peers.insert(peer.id, peer.clone());
    nm
}

/// One stream A -> B for `dur`; returns MB/s of payload delivered.
async fn mesh_tcp(dur: Duration) -> anyhow::Result<f64> {
    let mut rng = rand::thread_rng();
    let (ka, kb) = (PrivateKey::generate(&mut rng), PrivateKey::generate(&mut rng));
    let cfg = |k: &PrivateKey| DataPlaneConfig {
        node_key: k.clone(),
        disco_key: PrivateKey::generate(&mut rand::thread_rng()),
        bind: "127.0.0.1:0".parse().expect("constant"),
    };
    let (ta, ra) = watch::channel(NetMap::default());
    let (tb, rb) = watch::channel(NetMap::default());
    let a = DataPlane::start(cfg(&ka), ra)?;
    let b = DataPlane::start(cfg(&kb), rb)?;
    let (na, nb) = (node(1, &ka, a.local_addr()), node(2, &kb, b.local_addr()));
    ta.send_replace(netmap(&na, &nb));
    tb.send_replace(netmap(&nb, &na));
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (total, took) = a.bulk_send(&b, "100.64.0.2:9000".parse()?, dur).await?;
    Ok(total as f64 / MB / took.as_secs_f64())
}

/// A connected pair of boringtun tunnels.
fn tunnels() -> anyhow::Result<(Tunn, Tunn)> {
    let mut rng = rand::thread_rng();
    let (sa, sb) = (PrivateKey::generate(&mut rng), PrivateKey::generate(&mut rng));
    let (sa, sb) = (StaticSecret::from(sa.to_bytes()), StaticSecret::from(sb.to_bytes()));
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let (mut ba, mut bb) = (vec![0u8; 2048], vec![0u8; 2048]);
    let init = match a.format_handshake_initiation(&mut ba, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        r => anyhow::bail!("no initiation: {r:?}"),
    };
    let resp = match b.decapsulate(None, &init, &mut bb) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        r => anyhow::bail!("no response: {r:?}"),
    };
    let keepalive = match a.decapsulate(None, &resp, &mut ba) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        r => anyhow::bail!("no keepalive: {r:?}"),
    };
    let _ = b.decapsulate(None, &keepalive, &mut bb);
    Ok((a, b))
}

/// Encrypts on one tunnel and decrypts on the other, on one thread: MB/s of inner packets.
fn boringtun_rate(dur: Duration) -> anyhow::Result<f64> {
    let (mut a, mut b) = tunnels()?;
    // A valid IPv4 header so decapsulate accepts the inner packet.
    let mut packet = vec![0u8; PACKET];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(PACKET as u16).to_be_bytes());
    packet[8] = 64;
    packet[9] = 17;
    packet[12..16].copy_from_slice(&[100, 64, 0, 1]);
    packet[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let (mut wire, mut inner) = (vec![0u8; PACKET + 64], vec![0u8; PACKET + 64]);
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < dur {
        for _ in 0..1000 {
            let len = match a.encapsulate(&packet, &mut wire) {
                TunnResult::WriteToNetwork(p) => p.len(),
                r => anyhow::bail!("encapsulate: {r:?}"),
            };
            match b.decapsulate(None, &wire[..len], &mut inner) {
                TunnResult::WriteToTunnelV4(..) => {}
                r => anyhow::bail!("decapsulate: {r:?}"),
            }
        }
        n += 1000;
    }
    Ok((n * PACKET as u64) as f64 / MB / start.elapsed().as_secs_f64())
}

/// Seals and opens packets with the RustCrypto AEAD on one thread: MB/s of plaintext.
fn chacha_rate(dur: Duration) -> f64 {
    let cipher = ChaCha20Poly1305::new(&[7u8; 32].into());
    let mut buf = vec![0u8; PACKET];
    let (mut n, start) = (0u64, Instant::now());
    while start.elapsed() < dur {
        for i in 0..1000u64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&(n + i).to_le_bytes());
            let tag = cipher.encrypt_in_place_detached(&nonce.into(), &[], &mut buf).expect("in-memory seal");
            cipher.decrypt_in_place_detached(&nonce.into(), &[], &mut buf, &tag).expect("opens what it sealed");
        }
        n += 1000;
    }
    std::hint::black_box(&buf);
    (n * PACKET as u64) as f64 / MB / start.elapsed().as_secs_f64()
}
