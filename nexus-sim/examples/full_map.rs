//! What a full map of N peers costs nexus-sim to encode and a client to decode: as one zstd
//! frame (the whole JSON compressed at once) and as kept chunks (`nexus_sim::chunks`), the
//! chunks first made, then again with the last entry changed and the viewer's own entry left
//! out (a join's first map once the org's other maps were sent). Peer entries have random keys
//! like real ones (about 1.2 MB compressed at 10,000 peers, not the 0.2 MB of repeated keys).
//!
//! `cargo run --release -p nexus-sim --example full_map [PEERS] [ROUNDS]`

use bytes::Bytes;
use citadel_proto::tailcfg::decode_map_body;
use rand::RngCore;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn entry(i: u64) -> Bytes {
    let mut key = [0u8; 96];
    rand::thread_rng().fill_bytes(&mut key);
    let (a, b) = (i / 250, i % 250 + 1);
    Bytes::from(format!(
        r#"{{"ID":{i},"StableID":"{i}","Name":"node{i}.nexus.sim.","User":1,"Key":"nodekey:{}","KeyExpiry":null,"Machine":"mkey:{}","DiscoKey":"discokey:{}","Addresses":["100.64.{a}.{b}/32","fd7a:115c:a1e0::{i:x}/128"],"AllowedIPs":["100.64.{a}.{b}/32","fd7a:115c:a1e0::{i:x}/128"],"Endpoints":["127.0.0.1:{}"],"DERP":"127.3.3.40:1","HomeDERP":1,"Hostinfo":{{"IPNVersion":"citadel-0.1.0","OS":"linux","Hostname":"node{i}"}},"Created":"2026-11-27T07:07:49.172709015Z","LastSeen":"2026-11-27T07:08:01.5Z","Online":true,"MachineAuthorized":true}}"#,
        hex::encode(&key[..32]),
        hex::encode(&key[32..64]),
        hex::encode(&key[64..]),
        10000 + i % 50000
    ))
}

fn per(rounds: u32, mut f: impl FnMut(u32)) -> Duration {
    let t = Instant::now();
    for r in 0..rounds {
        f(r);
    }
    t.elapsed() / rounds
}

fn main() {
    let mut args = std::env::args().skip(1);
    let peers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let prefix = br#"{"Domain":"nexus.sim.","Peers":["#;
    let mut entries: Vec<Bytes> = (0..peers).map(entry).collect();
    let mut json = prefix.to_vec();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(e);
    }
    json.extend_from_slice(b"]}");
    let single = nexus_sim::control::zstd_frame(&json);
    let t_single = per(rounds, |_| {
        black_box(nexus_sim::control::zstd_frame(black_box(&json)));
    });
    let cache = nexus_sim::chunks::ChunkCache::default();
    let t = Instant::now();
    let chunked = cache.body(prefix, &entries, b"]}", usize::MAX);
    let t_cold = t.elapsed();
    let t_warm = per(rounds, |r| {
        let last = entries.len() - 1;
        entries[last] = entry(peers + u64::from(r));
        let mut viewer = entries.clone();
        viewer.remove((r as usize * 97) % last);
        black_box(cache.body(prefix, &viewer, b"]}", usize::MAX));
    });
    let d_single = per(rounds, |_| {
        black_box(decode_map_body(&single, true).expect("decodes"));
    });
    let d_chunked = per(rounds, |_| {
        black_box(decode_map_body(&chunked, true).expect("decodes"));
    });
    println!("full map of {peers} peers: {} B JSON", json.len());
    println!(
        "  one frame        {:>9} B   encode {:>10.2?}   client decode {:>10.2?}",
        single.len(),
        t_single,
        d_single
    );
    println!(
        "  chunks, made     {:>9} B   encode {:>10.2?}   client decode {:>10.2?}",
        chunked.len(),
        t_cold,
        d_chunked
    );
    println!("  chunks, kept     {:>9}     encode {:>10.2?}   (last entry changed, the viewer's left out)", "", t_warm);
}
