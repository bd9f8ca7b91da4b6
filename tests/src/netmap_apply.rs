//! What one netmap change costs a running data plane in a large org (the `netmap` figures of
//! the bench). A node holds a map of N peers (each with two addresses, two endpoints, a disco
//! key and a home region); then, one at a time, a peer's endpoints change (a
//! `PeersChangedPatch`) and a new peer joins (a `PeersChanged` entry plus the org filter with
//! its address), as a control server sends them. Each change goes through `NetMap::apply` on
//! the watched map, as `citadel up` applies it, and is then taken up by the data plane
//! (`DataPlane::mesh_addrs` syncs the netmap if the driver has not yet). Last, whole maps (as
//! a reconnect brings) are applied the same way: the cost a change would have if the data
//! plane rebuilt everything, which is what the guard compares a change with.
//!
//! Wall time per change and this process's CPU per change (the driver's thread included).
//!
//! With `orgs` above 1 the peers are spread over that many orgs and the filter admits
//! everyone, as Headscale without a policy sends it: the peers of other orgs are in the map,
//! and the org guard keeps them out.

use citadel::dataplane::{DataPlane, DataPlaneConfig};
use citadel::keys::{DiscoPublic, NodePublic, PrivateKey};
use citadel::netmap::NetMap;
use citadel::tailcfg::{FilterRule, MapResponse, NetPortRange, Node, PeerChange, PortRange};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Wall time (sorted) and mean CPU of one kind of change.
#[derive(Debug, Clone)]
pub struct Sample {
    pub walls: Vec<Duration>,
    pub cpu: Duration,
}

impl Sample {
    /// The wall time at quantile `q` (0..=1).
    pub fn wall(&self, q: f64) -> Duration {
        self.walls[((self.walls.len() - 1) as f64 * q) as usize]
    }
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct Figures {
    pub peers: usize,
    pub orgs: usize,
    /// `DataPlane::start` with the whole first map.
    pub first_map: Duration,
    pub endpoint: Sample,
    pub join: Sample,
    /// A whole map (every peer listed) applied to the running data plane.
    pub whole: Sample,
}

impl Figures {
    /// One line per kind of change.
    pub fn render(&self) -> String {
        let mut s = format!(
            "netmap apply: {} peers in {} org(s); first map applied in {:.1?}\n",
            self.peers, self.orgs, self.first_map
        );
        for (what, x) in
            [("endpoint change", &self.endpoint), ("join (entry + filter)", &self.join), ("whole map", &self.whole)]
        {
            s += &format!(
                "{what:<24} wall p50 {:>9.1?} p99 {:>9.1?}   CPU per change {:>9.1?}\n",
                x.wall(0.5),
                x.wall(0.99),
                x.cpu
            );
        }
        s
    }
}

/// Measures `changes` endpoint changes, `changes` joins and `wholes` whole maps on a data
/// plane holding `peers` peers. Builds its own runtime: call it outside of one.
pub fn measure(peers: usize, orgs: usize, changes: usize, wholes: usize) -> anyhow::Result<Figures> {
    anyhow::ensure!((1..60_000).contains(&peers), "peers must be 1..60000");
    anyhow::ensure!((1..=peers).contains(&orgs), "orgs must be 1..=peers");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(peers, orgs, changes.max(1), wholes.max(1)))
}

/// The mesh address of member `i` (1 is this node).
fn addr(i: usize) -> (String, String) {
    (format!("100.64.{}.{}/32", i / 250, i % 250 + 1), format!("fd7a:115c:a1e0::{i:x}/128"))
}

/// Member `i` of org `7 + i % orgs` (this node, 1, is in org 7).
fn member(i: usize, orgs: usize) -> Node {
    let mut rng = rand::thread_rng();
    let (v4, v6) = addr(i);
    Node {
        id: i as i64,
        stable_id: format!("n{i}"),
        name: format!("node-{i}.org.mesh.example."),
        user: 7 + if i == 1 { 0 } else { (i % orgs) as i64 },
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
/// nexus-sim sends it), which changes with each join; with several orgs, everyone.
fn org_filter(last: usize, orgs: usize) -> Vec<FilterRule> {
    let src_ips = if orgs > 1 { vec!["*".into()] } else { vec!["100.64.0.0/16".into(), addr(last).0, addr(last).1] };
    vec![FilterRule {
        src_ips,
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

async fn run(peers: usize, orgs: usize, changes: usize, wholes: usize) -> anyhow::Result<Figures> {
    let me = member(1, orgs);
    let mut nm = NetMap { self_node: me, packet_filter: org_filter(peers + 1, orgs), ..Default::default() };
    for i in 2..peers + 2 {
        nm.peers.insert(i as i64, member(i, orgs));
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
    let first_map = t0.elapsed();
    // Let the start's follow-up work finish (it ran into the first changes' CPU at 10,000
    // peers): wait until a 100 ms stretch costs under 1 ms of CPU, or at most 5 s.
    let settle = Instant::now() + Duration::from_secs(5);
    loop {
        let c0 = cpu();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if cpu() - c0 < Duration::from_millis(1) || Instant::now() > settle {
            break;
        }
    }

    // The messages are built before the clock starts (key generation is not the data
    // plane's); then each is applied to the watched map and synced, one at a time.
    let apply = |msgs: Vec<MapResponse>| -> anyhow::Result<Sample> {
        let (c0, n) = (cpu(), msgs.len() as u32);
        let mut walls = Vec::with_capacity(msgs.len());
        for r in msgs {
            let start = Instant::now();
            anyhow::ensure!(tx.send_if_modified(|nm| nm.apply(&r)), "a change left the map as it was");
            std::hint::black_box(dp.mesh_addrs());
            walls.push(start.elapsed());
        }
        walls.sort();
        Ok(Sample { walls, cpu: (cpu() - c0) / n })
    };
    let patch = |k: usize| {
        let id = 2 + (k * 7919) % peers;
        PeerChange {
            node_id: id as i64,
            endpoints: Some(vec![format!("198.51.100.{}:{}", k % 250 + 1, 40000 + k)]),
            ..Default::default()
        }
    };
    let patches: Vec<MapResponse> =
        (0..changes).map(|k| MapResponse { peers_changed_patch: Some(vec![patch(k)]), ..Default::default() }).collect();
    let endpoint = apply(patches)?;
    let joins: Vec<MapResponse> = (0..changes)
        .map(|k| {
            let i = peers + 2 + k;
            // Under an allow-all filter a join leaves the filter as it was.
            let filter = (orgs == 1).then(|| org_filter(i, orgs));
            MapResponse { peers_changed: Some(vec![member(i, orgs)]), packet_filter: filter, ..Default::default() }
        })
        .collect();
    let join = apply(joins)?;
    // Whole maps: every peer listed, one endpoint differing from the map before.
    let current: Vec<Node> = tx.borrow().peers.values().cloned().collect();
    let wholes: Vec<MapResponse> = (0..wholes)
        .map(|k| {
            let mut all = current.clone();
            let n = k % all.len();
            all[n].endpoints = vec![format!("203.0.113.{}:{}", k % 250 + 1, 50000 + k)];
            MapResponse { peers: Some(all), ..Default::default() }
        })
        .collect();
    let whole = apply(wholes)?;
    Ok(Figures { peers, orgs, first_map, endpoint, join, whole })
}
