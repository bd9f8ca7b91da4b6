//! How long a client takes to decode map messages as nexus-sim sends them: a join's delta
//! (one new peer and the org's packet filter; again with the filter's sources as a prefix
//! cover), an endpoint patch and a full map of N peers, framed as zstd as on the wire (stored
//! up to 2 KB, compressed above). Every member of an org decodes every delta, so this is the
//! client's share of a change's cost (`bench-control` measures the whole).
//!
//! `cargo run --release -p citadel-proto --example map_decode [PEERS] [ROUNDS]`

use citadel_proto::tailcfg::decode_map_body;
use std::time::Instant;

/// One peer entry as nexus-sim serializes it (keys differ per peer).
fn entry(i: u32) -> String {
    let key = |tag: u8| {
        let mut k = [tag; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        k.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (a, b) = (i / 250, i % 250 + 1);
    format!(
        r#"{{"ID":{id},"StableID":"{id}","Name":"node{i}.nexus.sim.","User":1,"Key":"nodekey:{nk}","KeyExpiry":null,"Machine":"mkey:{mk}","DiscoKey":"discokey:{dk}","Addresses":["100.64.{a}.{b}/32","fd7a:115c:a1e0::{i:x}/128"],"AllowedIPs":["100.64.{a}.{b}/32","fd7a:115c:a1e0::{i:x}/128"],"Endpoints":["127.0.0.1:{port}"],"DERP":"127.3.3.40:1","HomeDERP":1,"Hostinfo":{{"IPNVersion":"citadel-0.1.0","OS":"linux","Hostname":"node{i}","NetInfo":{{"PreferredDERP":1}}}},"Created":"2026-11-27T07:07:49.172709015Z","LastSeen":"2026-11-27T07:08:01.5Z","Online":true,"MachineAuthorized":true}}"#,
        id = i + 1,
        nk = key(9),
        mk = key(7),
        dk = key(5),
        port = 10000 + i % 50000,
    )
}

/// The org's filter as nexus-sim sends it: its members as one range per family.
const FILTER: &str = r#""PacketFilter":[{"SrcIPs":["100.64.0.1-100.64.39.16","fd7a:115c:a1e0::1-fd7a:115c:a1e0::2710"],"DstPorts":[{"IP":"100.64.0.0/18","Ports":{"First":0,"Last":65535}},{"IP":"fd7a:115c:a1e0::/114","Ports":{"First":0,"Last":65535}}],"IPProto":[6,17,1,58]}]"#;

/// The same members' filter as their prefix cover (what nexus-sim sent before it wrote ranges).
fn prefix_filter() -> String {
    let v4 = [
        "100.64.0.1/32",
        "100.64.0.2/31",
        "100.64.0.4/30",
        "100.64.0.8/29",
        "100.64.0.16/28",
        "100.64.0.32/27",
        "100.64.0.64/26",
        "100.64.0.128/25",
        "100.64.1.0/24",
        "100.64.2.0/23",
        "100.64.4.0/22",
        "100.64.8.0/21",
        "100.64.16.0/20",
        "100.64.32.0/22",
        "100.64.36.0/23",
        "100.64.38.0/24",
        "100.64.39.0/28",
        "100.64.39.16/32",
    ];
    let v6 = [
        "fd7a:115c:a1e0::1/128",
        "fd7a:115c:a1e0::2/127",
        "fd7a:115c:a1e0::4/126",
        "fd7a:115c:a1e0::8/125",
        "fd7a:115c:a1e0::10/124",
        "fd7a:115c:a1e0::20/123",
        "fd7a:115c:a1e0::40/122",
        "fd7a:115c:a1e0::80/121",
        "fd7a:115c:a1e0::100/120",
        "fd7a:115c:a1e0::200/119",
        "fd7a:115c:a1e0::400/118",
        "fd7a:115c:a1e0::800/117",
        "fd7a:115c:a1e0::1000/116",
        "fd7a:115c:a1e0::2000/118",
        "fd7a:115c:a1e0::2400/120",
        "fd7a:115c:a1e0::2500/119",
        "fd7a:115c:a1e0::2700/124",
        "fd7a:115c:a1e0::2710/128",
    ];
    let srcs: Vec<String> = v4.iter().chain(&v6).map(|p| format!("\"{p}\"")).collect();
    FILTER.replace(r#""100.64.0.1-100.64.39.16","fd7a:115c:a1e0::1-fd7a:115c:a1e0::2710""#, &srcs.join(","))
}

fn time(name: &str, body: &[u8], json_len: usize, rounds: u32) {
    decode_map_body(body, true).expect("the sample decodes");
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(decode_map_body(std::hint::black_box(body), true).unwrap());
    }
    let per = t.elapsed() / rounds;
    println!(
        "{name:<28} {json_len:>9} B JSON {:>8} B zstd  {:>10.2?} per message  {:>7.1} MB/s of JSON",
        body.len(),
        per,
        json_len as f64 / per.as_secs_f64() / 1e6
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let peers: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let ctime = r#""ControlTime":"2026-11-27T07:07:49.172915551Z""#;
    let join = format!(r#"{{{FILTER},{ctime},"PeersChanged":[{}]}}"#, entry(peers));
    let join_prefixes = format!(r#"{{{},{ctime},"PeersChanged":[{}]}}"#, prefix_filter(), entry(peers));
    let patch =
        format!(r#"{{{ctime},"PeersChangedPatch":[{{"NodeID":7,"Endpoints":["127.0.0.1:20001","[::1]:20001"]}}]}}"#);
    let list: Vec<String> = (0..peers).map(entry).collect();
    let full = format!(r#"{{"Node":{},{FILTER},{ctime},"Peers":[{}]}}"#, entry(peers + 1), list.join(","));
    for (name, json, rounds) in [
        ("join delta (1 peer + filter)", &join, rounds),
        ("  same, filter as prefixes", &join_prefixes, rounds),
        ("endpoint patch", &patch, rounds),
        (&*format!("full map of {peers} peers"), &full, (rounds / peers).max(3)),
    ] {
        // As nexus-sim sends them: small ones stored, larger compressed.
        let z = if json.len() <= citadel_proto::tailcfg::STORED_UP_TO {
            citadel_proto::tailcfg::zstd_stored(json.as_bytes())
        } else {
            zstd::bulk::compress(json.as_bytes(), 1).unwrap()
        };
        time(name, &z, json.len(), rounds);
    }
}
