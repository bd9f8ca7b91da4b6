//! Bench: what one netmap change costs a running data plane in a large org. A node holds a map
//! of N peers (each with two addresses, two endpoints, a disco key and a home region); then,
//! one at a time, a peer's endpoints change (a `PeersChangedPatch`) and a new peer joins (a
//! `PeersChanged` entry plus the org filter with its address), as a control server sends them.
//! Each change goes through `NetMap::apply` on the watched map, as `citadel up` applies it, and
//! is then taken up by the data plane (`DataPlane::mesh_addrs` syncs the netmap if the driver
//! has not yet). Prints the wall time per change and this process's CPU per change (the
//! driver's thread included).
//!
//! ```text
//! cargo run --release -p citadel --example netmap_apply [-- PEERS [CHANGES]]
//! ```

use citadel::dataplane::{DataPlane, DataPlaneConfig};
use citadel::keys::{DiscoPublic, NodePublic, PrivateKey};
use citadel::netmap::NetMap;
use citadel::tailcfg::{FilterRule, MapResponse, NetPortRange, Node, PeerChange, PortRange};
use std::time::{Duration, Instant};
use tokio::sync::watch;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let peers: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let changes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    anyhow::ensure!((1..60_000).contains(&peers), "PEERS must be 1..60000");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(peers, changes.max(1)))
}

/// The mesh address of member `i` (1 is this node).
fn addr(i: usize) -> (String, String) {
    (format!("100.64.{}.{}/32", i / 250, i % 250 + 1), format!("fd7a:115c:a1e0::{i:x}/128"))
}

fn member(i: usize) -> Node {
    let mut rng = rand::thread_rng();
    let (v4, v6) = addr(i);
    Node {
        id: i as i64,
        stable_id: format!("n{i}"),
        name: format!("node-{i}.org.mesh.example."),
        user: 7,
        key: NodePublic(PrivateKey::generate(&mut rng).public_bytes()),
        disco_key: DiscoPublic(PrivateKey::generate(&mut rng).public_bytes()),
        addresses: vec![v4.clone(), v6.clone()],
        allowed_ips: vec![v4, v6],
        endpoints: vec![format!("192.0.2.{}:41641", i % 250 + 1), format!("[2001:db8::{i:x}]:41641")],
        home_derp: 1,
        online: Some(true),
        ..Default::default()
    }
}

/// The org's filter after member `last` joined: the members as a short prefix list (as
/// nexus-sim sends it), which changes with each join.
fn org_filter(last: usize) -> Vec<FilterRule> {
    vec![FilterRule {
        src_ips: vec!["100.64.0.0/16".into(), addr(last).0, addr(last).1],
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    }]
}

/// CPU time of this process so far.
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn run(peers: usize, changes: usize) -> anyhow::Result<()> {
    let me = member(1);
    let mut nm = NetMap { self_node: me, packet_filter: org_filter(peers + 1), ..Default::default() };
    for i in 2..peers + 2 {
        nm.peers.insert(i as i64, member(i));
    }
    let cfg = DataPlaneConfig {
        node_key: PrivateKey::generate(&mut rand::thread_rng()),
        disco_key: PrivateKey::generate(&mut rand::thread_rng()),
        bind: "127.0.0.1:0".parse()?,
    };
    let (tx, rx) = watch::channel(nm);
    let t0 = Instant::now();
    let dp = DataPlane::start(cfg, rx)?;
    anyhow::ensure!(!dp.mesh_addrs().is_empty(), "the data plane took no addresses");
    println!("netmap apply bench: {peers} peers; first map applied in {:.1?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The messages are built before the clock starts (key generation is not the data
    // plane's); then each is applied to the watched map and synced, one at a time.
    let run = |what: &str, msgs: Vec<MapResponse>| {
        let (c0, n) = (cpu(), msgs.len() as u32);
        let mut walls: Vec<Duration> = msgs
            .into_iter()
            .map(|r| {
                let start = Instant::now();
                tx.send_if_modified(|nm| nm.apply(&r));
                std::hint::black_box(dp.mesh_addrs());
                start.elapsed()
            })
            .collect();
        report(what, &mut walls, (cpu() - c0) / n);
    };
    let patches: Vec<MapResponse> = (0..changes)
        .map(|k| {
            let id = 2 + (k * 7919) % peers;
            let patch = PeerChange {
                node_id: id as i64,
                endpoints: Some(vec![format!("198.51.100.{}:{}", k % 250 + 1, 40000 + k)]),
                ..Default::default()
            };
            MapResponse { peers_changed_patch: Some(vec![patch]), ..Default::default() }
        })
        .collect();
    run("endpoint change", patches);
    let joins: Vec<MapResponse> = (0..changes)
        .map(|k| {
            let i = peers + 2 + k;
            MapResponse {
                peers_changed: Some(vec![member(i)]),
                packet_filter: Some(org_filter(i)),
                ..Default::default()
            }
        })
        .collect();
    run("join (entry + filter)", joins);
    Ok(())
}

fn report(what: &str, walls: &mut [Duration], cpu: Duration) {
    walls.sort();
    let p = |q: f64| walls[((walls.len() - 1) as f64 * q) as usize];
    println!("{what:<24} wall p50 {:>9.1?} p99 {:>9.1?}   CPU per change {cpu:>9.1?}", p(0.5), p(0.99));
}
