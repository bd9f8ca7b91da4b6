//! Builds a turmoil world from a [`Scenario`] and plays it: a Nexus, a DERP/STUN host, NAT
//! middleboxes and citadel nodes running the real [`citadel::mesh::Mesh`] (control plane and
//! data plane: WireGuard, disco, STUN, DERP), with timed faults, sampled observations and
//! expectation verdicts.

use crate::derp_host;
use crate::nat::Nat;
use crate::nat_host::{self, NatBox};
use crate::net::{TurmoilNet, Uplink};
use crate::nexus::{self, NEXUS_PORT};
use crate::probe::{self, PathKind, ProbeFactory};
use crate::report::{self, Checkpoint, NodeLine, Verdict};
use crate::scenario::{ExpectKind, FaultKind, NetworkKind, Scenario};
use anyhow::Context;
use citadel::mesh::{Config, Mesh};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How to play a scenario.
#[derive(Clone)]
pub struct RunOptions {
    /// Overrides the scenario's seed.
    pub seed: Option<u64>,
    /// Replaces the mesh probe ([`probe::MeshProbe`]) that answers `reaches` and `udp_path`.
    pub probe: Option<ProbeFactory>,
    /// How often node state is sampled (simulated time).
    pub sample: Duration,
    /// `(receiver, leaked)` node names: Nexus's fault hook lists the leaked node in every map
    /// it builds for the receiver (see [`nexus_sim::Faults::leak_peer`]). The leak detector
    /// judges these entries like any other.
    pub leaks: Vec<(String, String)>,
    /// Extra `(from, to)` pairs the mesh probe pings once a second, besides those of the
    /// scenario's `udp_path`/`reaches` expectations.
    pub pings: Vec<(String, String)>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { seed: None, probe: None, sample: Duration::from_millis(100), leaks: vec![], pings: vec![] }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("seed", &self.seed)
            .field("probe", &self.probe.is_some())
            .field("sample", &self.sample)
            .field("leaks", &self.leaks)
            .field("pings", &self.pings)
            .finish()
    }
}

/// What a node published about itself (from inside its simulated host).
#[derive(Debug, Default, Clone)]
pub struct NodeObs {
    /// Org it belongs to (from the scenario).
    pub org: String,
    /// Host software running.
    pub running: bool,
    /// Control stream up.
    pub connected: bool,
    /// Mesh IPv4.
    pub ipv4: Option<String>,
    /// Node key.
    pub node_key: String,
    /// Node keys of the peers in its netmap.
    pub peer_keys: BTreeSet<String>,
    /// Ever joined successfully (later starts use the state directory only).
    pub ever_connected: bool,
    /// Host starts.
    pub starts: u32,
    /// `(ip, node key)` after each successful join.
    pub joins: Vec<(String, String)>,
    /// Events with their simulated time.
    pub events: Vec<(Duration, String)>,
    /// Simulated times at which the control stream came up.
    pub connects: Vec<Duration>,
    /// Home DERP region it reports (0: none yet).
    pub home_derp: i32,
    /// Data-plane counters of each start (index: start - 1).
    pub traffic: Vec<Traffic>,
}

/// What one start of a node's data plane counted.
#[derive(Debug, Default, Clone)]
pub struct Traffic {
    /// Packets it received and dropped as from an unknown peer, or refused by its filter.
    pub rx_dropped: u64,
    /// WireGuard bytes sent, by the receiving peer's node key.
    pub tx_bytes: BTreeMap<String, u64>,
}

impl NodeObs {
    /// Drops over every start (see [`Traffic::rx_dropped`]).
    pub fn rx_dropped(&self) -> u64 {
        self.traffic.iter().map(|t| t.rx_dropped).sum()
    }

    /// WireGuard bytes sent to node key `key` over every start.
    pub fn tx_bytes_to(&self, key: &str) -> u64 {
        self.traffic.iter().filter_map(|t| t.tx_bytes.get(key)).sum()
    }
}

pub use crate::report::PingResult;

/// State shared between the simulated hosts and the driver.
#[derive(Debug, Default)]
pub struct Board {
    /// Per node.
    pub nodes: BTreeMap<String, NodeObs>,
    /// Node key → node name.
    pub key_to_name: BTreeMap<String, String>,
    /// Which peers each node pings through the mesh.
    pub reach_targets: BTreeMap<String, BTreeSet<String>>,
    /// `(from, to)` → mesh ping results.
    pub reach: BTreeMap<(String, String), Vec<PingResult>>,
}

struct NodeCtx {
    name: String,
    nexus_url: String,
    auth_key: String,
    state_dir: PathBuf,
    net: TurmoilNet,
    board: Arc<Mutex<Board>>,
    probe: ProbeFactory,
    allow_cross_org: bool,
    /// Seeds this node's reconnect jitter (with its start count), from the world's seed.
    seed: u64,
}

/// UDP port of every node's one socket (Tailscale's default), so traces do not depend on
/// ephemeral port numbers.
pub const NODE_UDP_PORT: u16 = 41641;

fn event(board: &Mutex<Board>, name: &str, what: String) {
    let t = turmoil::sim_elapsed().unwrap_or_default();
    tracing::debug!(node = name, "{what}");
    board.lock().unwrap().nodes.entry(name.to_string()).or_default().events.push((t, what));
}

async fn node_main(ctx: Arc<NodeCtx>) -> turmoil::Result {
    let name = &ctx.name;
    let (first, starts) = {
        let mut b = ctx.board.lock().unwrap();
        let o = b.nodes.entry(name.clone()).or_default();
        o.starts += 1;
        o.running = true;
        o.connected = false;
        (!o.ever_connected, o.starts)
    };
    event(&ctx.board, name, "started".into());
    // A restart joins from the state directory alone.
    let mut cfg = Config::new(Some(ctx.nexus_url.clone()), first.then(|| ctx.auth_key.clone()), ctx.state_dir.clone());
    cfg.hostname = Some(name.clone());
    cfg.timeout = Duration::from_secs(10);
    cfg.net = Arc::new(ctx.net.clone());
    cfg.udp_port = NODE_UDP_PORT;
    cfg.routes.allow_cross_org = ctx.allow_cross_org;
    cfg.jitter_seed = Some(ctx.seed ^ (starts as u64).rotate_left(32));
    let mesh = loop {
        match Mesh::connect(cfg.clone()).await {
            Ok(m) => break Arc::new(m),
            Err(e) => {
                event(&ctx.board, name, format!("join failed: {e}"));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    {
        let st = mesh.status();
        let mut b = ctx.board.lock().unwrap();
        b.key_to_name.insert(st.node_key.clone(), name.clone());
        let o = b.nodes.entry(name.clone()).or_default();
        o.ever_connected = true;
        o.joins.push((st.ipv4.clone().unwrap_or_default(), st.node_key.clone()));
    }
    event(&ctx.board, name, format!("joined as {}", mesh.status().ipv4.unwrap_or_default()));
    let targets: Vec<String> =
        ctx.board.lock().unwrap().reach_targets.get(name).into_iter().flatten().cloned().collect();
    if !targets.is_empty() {
        let probe = (ctx.probe)(mesh.clone());
        for to in targets {
            tokio::spawn(reach_loop(ctx.clone(), probe.clone(), to));
        }
    }
    let mut nm = mesh.netmap();
    let mut conn = mesh.connected();
    // The home DERP region changes without a netmap change: look every half second too.
    let mut look = tokio::time::interval(Duration::from_millis(500));
    let mut key = None;
    loop {
        let st = Glance::of(&mesh, &mut key);
        let was = {
            let mut b = ctx.board.lock().unwrap();
            let o = b.nodes.entry(name.clone()).or_default();
            let was = o.connected;
            o.connected = st.connected;
            o.ipv4 = st.ipv4;
            o.node_key = st.node_key;
            o.peer_keys = st.peer_keys;
            if let Some(dp) = mesh.data_plane() {
                let c = dp.counters();
                let t = Traffic {
                    rx_dropped: c.rx_unknown_peer + c.rx_filtered,
                    tx_bytes: dp.peer_stats().iter().map(|p| (p.node_key.to_string(), p.tx_bytes)).collect(),
                };
                let i = o.starts.saturating_sub(1) as usize;
                if o.traffic.len() <= i {
                    o.traffic.resize(i + 1, Traffic::default());
                }
                o.traffic[i] = t;
            }
            if o.home_derp != st.home_derp {
                o.events
                    .push((turmoil::sim_elapsed().unwrap_or_default(), format!("home DERP region {}", st.home_derp)));
                o.home_derp = st.home_derp;
            }
            if st.connected && !was {
                o.connects.push(turmoil::sim_elapsed().unwrap_or_default());
            }
            was
        };
        if was != st.connected {
            event(&ctx.board, name, if st.connected { "control up".into() } else { "control down".into() });
        }
        tokio::select! {
            r = nm.changed() => if r.is_err() { break },
            r = conn.changed() => if r.is_err() { break },
            _ = look.tick() => {}
        }
    }
    event(&ctx.board, name, "mesh stopped".into());
    std::future::pending::<()>().await;
    Ok(())
}

/// What a node publishes to the board on every look: the fields of [`Mesh::status`] the
/// harness reads, taken without cloning the netmap or building every peer's status (that was
/// a quarter of a steady-state 300-node world's CPU time).
struct Glance {
    connected: bool,
    /// As [`citadel::mesh::Status::ipv4`]: the self node's first address without a colon.
    ipv4: Option<String>,
    node_key: String,
    peer_keys: BTreeSet<String>,
    home_derp: i32,
}

impl Glance {
    /// `key` keeps the last node key and its text: deriving the public key from the private
    /// one and formatting it on every look cost more than the rest of the glance.
    fn of(mesh: &Mesh, key: &mut Option<(citadel::keys::NodePublic, String)>) -> Glance {
        // The data plane switches keys together with the mesh (`commit_key`).
        let pk = mesh.data_plane().map(|d| d.node_public()).unwrap_or_else(|| mesh.node_key());
        let node_key = match key {
            Some((k, text)) if *k == pk => text.clone(),
            _ => key.insert((pk, pk.to_string())).1.clone(),
        };
        let nm = mesh.netmap();
        let nm = nm.borrow();
        Glance {
            connected: mesh.is_connected(),
            ipv4: nm
                .self_node
                .addresses
                .iter()
                .map(|a| a.split('/').next().unwrap_or_default())
                .find(|a| !a.contains(':'))
                .map(str::to_string),
            node_key,
            peer_keys: nm.peers.values().map(|p| p.key.to_string()).collect(),
            home_derp: mesh.home_derp(),
        }
    }
}

/// Pings `to` through the mesh every second (once its address is known) and records which
/// path answered.
async fn reach_loop(ctx: Arc<NodeCtx>, probe: Arc<dyn probe::NodeProbe>, to: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // `to` is a node name, or `name:port` for a ping on another port.
        let (name, port) = match to.split_once(':') {
            Some((n, p)) => (n, p.parse().unwrap_or(probe::PING_PORT)),
            None => (to.as_str(), probe::PING_PORT),
        };
        let ip = ctx.board.lock().unwrap().nodes.get(name).and_then(|o| o.ipv4.clone());
        let Some(ip) = ip.and_then(|i| i.parse().ok()) else { continue };
        let r = probe.ping_port(ip, port, Duration::from_secs(2)).await;
        let t = turmoil::sim_elapsed().unwrap_or_default();
        ctx.board.lock().unwrap().reach.entry((ctx.name.clone(), to.clone())).or_default().push((t, r));
    }
}

/// The result of playing a scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The deterministic trace (snapshotted; same seed → same bytes).
    pub trace: String,
    /// Observed events with exact simulated times and NAT counters.
    pub observed: String,
    /// Verdicts in file order.
    pub verdicts: Vec<(String, Verdict)>,
    /// First org leak seen, if any.
    pub leak: Option<String>,
    /// Every `(node, listed node)` pair across orgs that some sample saw.
    pub leaked_pairs: BTreeSet<(String, String)>,
    /// Every mesh ping by `(from, to)`: when it ended and which path answered.
    pub pings: BTreeMap<(String, String), Vec<PingResult>>,
    /// Final visibility: node → names in its netmap.
    pub visibility: BTreeMap<String, BTreeSet<String>>,
    /// Mesh path per probed pair at its expectation's deadline.
    pub paths: BTreeMap<(String, String), PathKind>,
}

impl Outcome {
    /// No expectation failed and no org leak was seen.
    pub fn passed(&self) -> bool {
        self.leak.is_none() && !self.verdicts.iter().any(|(_, v)| matches!(v, Verdict::Fail(_)))
    }

    /// Trace followed by the observed log: what `harness run` prints.
    pub fn report(&self) -> String {
        format!("{}\n{}", self.trace, self.observed)
    }
}

struct ExpState {
    met: Option<Duration>,
    violated: Option<(Duration, String)>,
    decided: Option<Verdict>,
}

/// Lets citadel use the harness's DERP relays unverified. They serve a self-signed certificate
/// and are marked `InsecureForTests`, which citadel honours only with this opt-in: the harness
/// studies paths, timing and faults, not certificate checks (tests/tls.rs covers those), and its
/// simulated hosts have no CA to verify a relay against. Set here, in code, for the harness
/// alone (the `citadel up` processes of `--real` runs inherit it); nothing else turns it on.
pub fn opt_in_unverified_harness_relays() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var(citadel::derphttp::DERP_INSECURE_ENV, "1"));
}

/// The directory for the nodes' state: on tmpfs where there is one. Nodes write their state
/// atomically (file, fsync, rename) on every netmap change; on ext4 the inode churn of that was
/// a quarter of a 1,000-node world's start.
fn state_tempdir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::Builder::new().prefix("harness-").tempdir_in(shm) {
            return Ok(t);
        }
    }
    tempfile::tempdir()
}

/// When every simulation starts (2026-01-01 UTC), since the Unix epoch: the hosts' wall clock
/// ([`citadel_proto::wall`]) reads it plus the simulated time.
const SIM_EPOCH: Duration = Duration::from_secs(1_767_225_600);

/// Plays `sc` in simulation.
pub fn run(sc: &Scenario, opts: &RunOptions) -> anyhow::Result<Outcome> {
    opt_in_unverified_harness_relays();
    // Key expiries, ControlTime and last-seen times follow simulated time on every host.
    citadel_proto::wall::simulate_with(turmoil::since_epoch);
    let seed = opts.seed.unwrap_or(sc.seed);
    let end = sc.duration.0;
    let tmp = state_tempdir().context("temporary state directory")?;
    let nexus_url = format!("http://nexus:{NEXUS_PORT}");

    let mut b = turmoil::Builder::new();
    let lat = sc.net.latency.0;
    b.rng_seed(seed)
        .epoch(SystemTime::UNIX_EPOCH + SIM_EPOCH)
        .simulation_duration(end + Duration::from_secs(3600))
        .tick_duration(sc.net.tick.0)
        .min_message_latency(lat)
        .max_message_latency(lat + sc.net.jitter.0)
        .fail_rate(sc.net.loss)
        .tcp_capacity(4096)
        .udp_capacity(4096);
    let mut sim = b.build();

    // Fix every address first (registration order decides them), so LANs can be described.
    let mut ip: BTreeMap<String, IpAddr> = BTreeMap::new();
    let derps = sc.derp_regions();
    ip.insert("nexus".into(), sim.lookup("nexus"));
    for (_, _, h) in &derps {
        ip.insert(h.clone(), sim.lookup(h.as_str()));
    }
    for n in &sc.nats {
        ip.insert(n.name.get_ref().clone(), sim.lookup(n.name.get_ref().as_str()));
    }
    for n in &sc.nodes {
        ip.insert(n.name.get_ref().clone(), sim.lookup(n.name.get_ref().as_str()));
    }
    let shared = nexus_sim::build(nexus_sim::Config {
        policy: sc.policy.as_ref().map(|p| crate::scenario::policy_text(p.get_ref())),
        server_url: nexus_url.clone(),
        derp: nexus_sim::DerpMode::External(derp_host::derp_map(
            &derps.iter().map(|(id, _, h)| (*id, ip[h])).collect::<Vec<_>>(),
        )),
        ..Default::default()
    })?;
    let mut org_keys = BTreeMap::new();
    for o in &sc.orgs {
        let st = &shared.store;
        let u = st.create_user(o.name.get_ref(), "").map_err(|e| anyhow::anyhow!("create org: {e}"))?;
        let k = st.create_key(u.id, true, false, None, vec![]).map_err(|e| anyhow::anyhow!("create key: {e}"))?;
        org_keys.insert(o.name.get_ref().clone(), k.key);
    }
    let lan_of = |nat: &str| -> Arc<BTreeSet<IpAddr>> {
        let nodes = sc.nodes.iter().filter(|n| n.nat.as_ref().is_some_and(|x| x.get_ref() == nat)).map(|n| &n.name);
        let nats = sc.nats.iter().filter(|n| n.behind.as_ref().is_some_and(|x| x.get_ref() == nat)).map(|n| &n.name);
        Arc::new(nodes.chain(nats).map(|n| ip[n.get_ref()]).collect())
    };

    sim.host("nexus", {
        let shared = shared.clone();
        move || nexus::serve(shared.clone())
    });
    for (id, _, h) in &derps {
        let id = *id;
        sim.host(h.as_str(), move || derp_host::run(id));
    }

    let mut nat_boxes: BTreeMap<String, Arc<NatBox>> = BTreeMap::new();
    for (i, n) in sc.nats.iter().enumerate() {
        let name = n.name.get_ref().clone();
        let uplink = match &n.behind {
            Some(up) => Uplink::Nat { nat: ip[up.get_ref()], lan: lan_of(up.get_ref()) },
            None => Uplink::Public,
        };
        let nat_seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64 + 1);
        let nb = NatBox::new(Nat::new(n.config(), ip[&name], nat_seed));
        nat_boxes.insert(name.clone(), nb.clone());
        let net = TurmoilNet { uplink, ip: Some(ip[&name]) };
        sim.host(name.as_str(), move || nat_host::run(nb.clone(), net.clone()));
    }

    let board = Arc::new(Mutex::new(Board::default()));
    for e in &sc.expects {
        let (Some(a), Some(bn)) = (&e.a, e.ping_target()) else { continue };
        if matches!(e.kind.get_ref(), ExpectKind::UdpPath | ExpectKind::Reaches) {
            board.lock().unwrap().reach_targets.entry(a.get_ref().clone()).or_default().insert(bn);
        }
    }
    // Identities are made up front from the seed: node keys are deterministic, and a peer is
    // known by its key even before its own join returns.
    let mut key_rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ 0x6b65_7973);
    for n in &sc.nodes {
        let name = n.name.get_ref();
        let st = citadel::state::StateDir::open(&tmp.path().join(name))?;
        let id = st.identity(&mut key_rng)?;
        let key = citadel::keys::NodePublic(id.node_key.public_bytes()).to_string();
        let mut bd = board.lock().unwrap();
        bd.key_to_name.insert(key, name.clone());
        bd.nodes.entry(name.clone()).or_default().org = n.org.get_ref().clone();
    }
    for (a, bn) in &opts.pings {
        board.lock().unwrap().reach_targets.entry(a.clone()).or_default().insert(bn.clone());
    }
    let declared = sc.leaks.iter().map(|l| (l.into.get_ref().clone(), l.peer.get_ref().clone()));
    for (into, peer) in opts.leaks.iter().cloned().chain(declared) {
        let bd = board.lock().unwrap();
        let key = |n: &str| -> anyhow::Result<citadel::keys::NodePublic> {
            let k = bd.key_to_name.iter().find(|(_, v)| *v == n).map(|(k, _)| k);
            let k = k.ok_or_else(|| anyhow::anyhow!("leak names {n:?}, which is no node of the scenario"))?;
            k.parse().map_err(|e| anyhow::anyhow!("node key of {n}: {e:?}"))
        };
        if !shared.faults.leak_peer(key(&into)?, key(&peer)?) {
            anyhow::bail!("too many injected leaks");
        }
    }

    let probe_factory = opts.probe.clone().unwrap_or_else(probe::mesh_probe);
    let mut ctxs: BTreeMap<String, Arc<NodeCtx>> = BTreeMap::new();
    for (i, n) in sc.nodes.iter().enumerate() {
        let name = n.name.get_ref().clone();
        let uplink = match (n.network, &n.nat) {
            (NetworkKind::UdpBlocked, _) => Uplink::Blocked,
            (_, Some(nat)) => Uplink::Nat { nat: ip[nat.get_ref()], lan: lan_of(nat.get_ref()) },
            (_, None) => Uplink::Public,
        };
        let ctx = NodeCtx {
            name: name.clone(),
            nexus_url: nexus_url.clone(),
            auth_key: if n.tags.is_empty() {
                org_keys[n.org.get_ref()].clone()
            } else {
                let st = &shared.store;
                let u = st.user_by_name(n.org.get_ref()).ok_or_else(|| anyhow::anyhow!("org of {name}"))?;
                st.create_key(u.id, true, false, None, n.tags.clone())
                    .map_err(|e| anyhow::anyhow!("create tagged key: {e}"))?
                    .key
            },
            state_dir: tmp.path().join(&name),
            net: TurmoilNet { uplink, ip: Some(ip[&name]) },
            board: board.clone(),
            probe: probe_factory.clone(),
            allow_cross_org: n.allow_cross_org,
            seed: seed.wrapping_mul(0xD134_2543_DE82_EF95).wrapping_add(i as u64 + 1),
        };
        ctxs.insert(name, Arc::new(ctx));
    }

    let mut partitions: BTreeSet<(String, String)> = BTreeSet::new();
    // One-way cuts, `(from, to)`.
    let mut oneway: BTreeSet<(String, String)> = BTreeSet::new();
    let expand = |x: &str| -> Vec<String> {
        if sc.orgs.iter().any(|o| o.name.get_ref() == x) {
            sc.nodes.iter().filter(|n| n.org.get_ref() == x).map(|n| n.name.get_ref().clone()).collect()
        } else {
            vec![x.to_string()]
        }
    };
    let mut registered: BTreeSet<String> = std::iter::once("nexus".to_string())
        .chain(derps.iter().map(|(_, _, h)| h.clone()))
        .chain(sc.nats.iter().map(|n| n.name.get_ref().clone()))
        .collect();
    configure_links(&mut sim, sc, None, &registered, &mut partitions, &oneway);

    let mut pending: Vec<(Duration, String)> = sc.nodes.iter().map(|n| (n.start.0, n.name.get_ref().clone())).collect();
    pending.sort();
    pending.reverse();
    let mut faults: Vec<_> = sc.faults.iter().collect();
    faults.sort_by_key(|f| f.at);
    let mut faults = faults.into_iter().peekable();
    let mut checkpoints: BTreeSet<Duration> = sc.faults.iter().map(|f| f.at.0).collect();
    checkpoints.extend(sc.expects.iter().filter_map(|e| e.by.map(|b| b.0)));
    checkpoints.insert(end);
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    let mut cps: Vec<Checkpoint> = Vec::new();
    let mut exps: Vec<ExpState> =
        sc.expects.iter().map(|_| ExpState { met: None, violated: None, decided: None }).collect();
    let mut leak: Option<String> = None;
    let mut leaked_pairs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut samples = 0u64;
    let mut last_vis: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut observed: Vec<(Duration, String)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut running: BTreeSet<String> = BTreeSet::new();

    let visible = |b: &Board, name: &str| -> BTreeSet<String> {
        b.nodes
            .get(name)
            .map(|o| {
                o.peer_keys.iter().map(|k| b.key_to_name.get(k).cloned().unwrap_or_else(|| format!("?{k}"))).collect()
            })
            .unwrap_or_default()
    };

    loop {
        let now = sim.elapsed();
        // Start nodes that are due.
        while pending.last().is_some_and(|(t, _)| *t <= now) {
            let (_, name) = pending.pop().expect("checked");
            let ctx = ctxs[&name].clone();
            sim.host(name.as_str(), move || node_main(ctx.clone()));
            registered.insert(name.clone());
            configure_links(&mut sim, sc, Some(&name), &registered, &mut partitions, &oneway);
            running.insert(name.clone());
            if now > Duration::ZERO {
                timeline.push((now, format!("start node {name}")));
            }
        }
        // Sample.
        if now >= next_sample || checkpoints.first().is_some_and(|c| *c <= now) {
            next_sample = now + opts.sample;
            samples += 1;
            let bd = board.lock().unwrap();
            for n in &sc.nodes {
                let name = n.name.get_ref();
                let vis = visible(&bd, name);
                let last = last_vis.entry(name.clone()).or_default();
                for gone in last.difference(&vis) {
                    observed.push((now, format!("{name} no longer sees {gone}")));
                }
                for new in vis.difference(last) {
                    observed.push((now, format!("{name} sees {new}")));
                }
                *last = vis.clone();
                // A scenario with its own policy says who sees whom in its expectations.
                for p in vis.iter().filter(|_| sc.policy.is_none()) {
                    let porg = bd.nodes.get(p).map(|o| o.org.as_str()).unwrap_or("?");
                    if porg != n.org.get_ref() {
                        leaked_pairs.insert((name.clone(), p.clone()));
                        if sc.leaks_into(name, p) {
                            continue;
                        }
                        leak.get_or_insert_with(|| {
                            format!("at {}: {name} ({}) lists {p} ({porg})", report::fmt_t(now), n.org.get_ref())
                        });
                    }
                }
            }
            for (e, st) in sc.expects.iter().zip(exps.iter_mut()) {
                if st.decided.is_some() {
                    continue;
                }
                let by = e.by.map(|b| b.0).unwrap_or(end);
                let in_window = now >= e.after.0 && now <= by;
                let node = e.node.as_ref().map(|n| n.get_ref().as_str()).unwrap_or_default();
                match e.kind.get_ref() {
                    ExpectKind::Sees => {
                        let o = bd.nodes.get(node);
                        // A node that is not up has no netmap to judge: "sees exactly {}" must
                        // not hold before it joined.
                        let live = o.is_some_and(|o| o.running && (o.connected || !e.exact));
                        if in_window && live && st.met.is_none() && lists(e, &visible(&bd, node)) {
                            st.met = Some(now);
                        }
                    }
                    ExpectKind::Throughout if in_window => {
                        st.met.get_or_insert(now);
                        let running = bd.nodes.get(node).is_some_and(|o| o.running);
                        let vis = visible(&bd, node);
                        if st.violated.is_none() && !(running && lists(e, &vis)) {
                            let why = if running {
                                format!("{node} saw {{{}}}", join(&vis))
                            } else {
                                format!("{node} was not running")
                            };
                            st.violated = Some((now, why));
                        }
                    }
                    ExpectKind::NeverSees => {
                        let vis = visible(&bd, node);
                        let bad: Vec<&String> =
                            e.peers.iter().map(|p| p.get_ref()).filter(|p| vis.contains(*p)).collect();
                        if !bad.is_empty() && st.violated.is_none() {
                            st.violated = Some((now, format!("{node} listed {}", join(bad))));
                        }
                    }
                    ExpectKind::HomeDerp if now >= by => {
                        let want = e.region.as_ref().and_then(|r| sc.derp_region_id(r.get_ref())).unwrap_or(1);
                        let home = bd.nodes.get(node).map(|o| o.home_derp).unwrap_or(0);
                        st.decided = Some(if home == want {
                            Verdict::Pass
                        } else {
                            Verdict::Fail(format!("home was region {home}"))
                        });
                    }
                    ExpectKind::Connected => {
                        let c = bd.nodes.get(node).is_some_and(|o| o.connected && o.running);
                        if in_window && !c && st.violated.is_none() {
                            st.violated = Some((now, format!("{node} was not connected")));
                        }
                    }
                    _ => {}
                }
            }
            drop(bd);
        }
        // Checkpoints, then faults due now.
        while checkpoints.first().is_some_and(|c| *c <= now) {
            let c = checkpoints.pop_first().expect("checked");
            let bd = board.lock().unwrap();
            let lines = sc
                .nodes
                .iter()
                .map(|n| {
                    let name = n.name.get_ref();
                    let o = bd.nodes.get(name).cloned().unwrap_or_default();
                    NodeLine {
                        name: name.clone(),
                        org: n.org.get_ref().clone(),
                        ip: o.ipv4.clone(),
                        state: if !running.contains(name) {
                            "stopped"
                        } else if o.connected {
                            "up"
                        } else {
                            "down"
                        },
                        sees: visible(&bd, name).into_iter().collect(),
                    }
                })
                .collect();
            cps.push(Checkpoint { at: c, nodes: lines });
        }
        while faults.peek().is_some_and(|f| f.at.0 <= now) {
            let f = faults.next().expect("checked");
            let name = |s: &Option<toml::Spanned<String>>| s.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default();
            let desc = match f.kind.get_ref() {
                FaultKind::NexusDown => {
                    sim.crash("nexus");
                    "nexus down".to_string()
                }
                FaultKind::NexusUp => {
                    sim.bounce("nexus");
                    "nexus up".into()
                }
                FaultKind::NexusRestart => {
                    sim.bounce("nexus");
                    "nexus restart".into()
                }
                FaultKind::DerpDown => {
                    let h = derp_host_of(sc, &f.region);
                    sim.crash(h.as_str());
                    "derp down".into()
                }
                FaultKind::DerpUp => {
                    let h = derp_host_of(sc, &f.region);
                    sim.bounce(h.as_str());
                    "derp up".into()
                }
                FaultKind::Partition | FaultKind::Heal => {
                    let (a, bb) = (name(&f.a), name(&f.b));
                    let cut = *f.kind.get_ref() == FaultKind::Partition;
                    // Rules on hosts not started yet apply when they start (configure_links).
                    for x in expand(&a) {
                        for y in expand(&bb) {
                            let live = registered.contains(&x) && registered.contains(&y) && x != y;
                            match (cut, f.oneway) {
                                (true, false) => {
                                    if live {
                                        sim.partition(x.as_str(), y.as_str());
                                    }
                                    partitions.insert(pair(&x, &y));
                                }
                                (false, false) => {
                                    if live {
                                        sim.repair(x.as_str(), y.as_str());
                                    }
                                    partitions.remove(&pair(&x, &y));
                                }
                                (true, true) => {
                                    if live {
                                        sim.partition_oneway(x.as_str(), y.as_str());
                                    }
                                    oneway.insert((x.clone(), y.clone()));
                                }
                                (false, true) => {
                                    if live {
                                        sim.repair_oneway(x.as_str(), y.as_str());
                                    }
                                    oneway.remove(&(x.clone(), y.clone()));
                                }
                            }
                        }
                    }
                    let arrow = if f.oneway { "->" } else { "|" };
                    format!("{} {a} {arrow} {bb}", if cut { "partition" } else { "heal" })
                }
                FaultKind::Hold | FaultKind::Release => {
                    let (a, bb) = (name(&f.a), name(&f.b));
                    for x in expand(&a).into_iter().filter(|x| registered.contains(x)) {
                        for y in expand(&bb).into_iter().filter(|y| registered.contains(y) && *y != x) {
                            if *f.kind.get_ref() == FaultKind::Hold {
                                sim.hold(x.as_str(), y.as_str());
                            } else {
                                sim.release(x.as_str(), y.as_str());
                            }
                        }
                    }
                    format!("{} {a} | {bb}", if *f.kind.get_ref() == FaultKind::Hold { "hold" } else { "release" })
                }
                FaultKind::Restart => {
                    let n = name(&f.node);
                    if running.contains(&n) {
                        sim.bounce(n.as_str());
                    }
                    mark_stopped(&board, &n);
                    format!("restart node {n}")
                }
                FaultKind::Stop => {
                    let n = name(&f.node);
                    if running.remove(&n) {
                        sim.crash(n.as_str());
                    }
                    mark_stopped(&board, &n);
                    format!("stop node {n}")
                }
                FaultKind::Start => {
                    let n = name(&f.node);
                    if !running.contains(&n) {
                        if registered.contains(&n) {
                            sim.bounce(n.as_str());
                        } else {
                            let ctx = ctxs[&n].clone();
                            sim.host(n.as_str(), move || node_main(ctx.clone()));
                            registered.insert(n.clone());
                            configure_links(&mut sim, sc, Some(&n), &registered, &mut partitions, &oneway);
                            pending.retain(|(_, p)| *p != n);
                        }
                        running.insert(n.clone());
                    }
                    format!("start node {n}")
                }
                FaultKind::ExpireKey => {
                    let n = name(&f.node);
                    let ahead = f.expires_in.map_or(Duration::ZERO, |d| d.0);
                    let at = chrono::DateTime::UNIX_EPOCH
                        + chrono::TimeDelta::from_std(SIM_EPOCH + now + ahead).context("expiry time")?;
                    let st = &shared.store;
                    match st.nodes(None).into_iter().find(|x| x.given_name == n) {
                        Some(x) => {
                            st.expire_node(x.id, Some(at)).map_err(|e| anyhow::anyhow!("expire {n}: {e}"))?;
                            format!("key of {n} expires at {:?}", now + ahead)
                        }
                        None => format!("expire_key: {n} is not registered (nothing done)"),
                    }
                }
                FaultKind::NatChange => {
                    let n = name(&f.nat);
                    let nb = &nat_boxes[&n];
                    let mut nat = nb.nat.lock().unwrap();
                    let mut cfg = nat.config().clone();
                    cfg.mapping = f.mapping.unwrap_or(cfg.mapping);
                    cfg.filtering = f.filtering.unwrap_or(cfg.filtering);
                    cfg.hairpin = f.hairpin.unwrap_or(cfg.hairpin);
                    cfg.ports = f.ports.unwrap_or(cfg.ports);
                    cfg.timeout = f.timeout.map(|t| t.0).unwrap_or(cfg.timeout);
                    cfg.unsolicited = f.unsolicited.unwrap_or(cfg.unsolicited);
                    nat.reconfigure(cfg.clone());
                    format!(
                        "nat {n} now {} mapping, {} filtering, hairpin {}, {:?} ports{}",
                        report::short_mapping(cfg.mapping),
                        report::short_filtering(cfg.filtering),
                        if cfg.hairpin { "on" } else { "off" },
                        cfg.ports,
                        f.unsolicited.map(|u| format!(", unsolicited {u:?}").to_lowercase()).unwrap_or_default()
                    )
                }
                FaultKind::NatFlush => {
                    let n = name(&f.nat);
                    nat_boxes[&n].nat.lock().unwrap().flush();
                    format!("nat {n} flushes its mappings")
                }
            };
            tracing::info!(at = ?now, "fault: {desc}");
            timeline.push((now, desc));
        }
        if now >= end {
            break;
        }
        sim.step().map_err(|e| anyhow::anyhow!("simulation failed at {}: {e}", report::fmt_t(now)))?;
    }

    // Decide what is left.
    let bd = board.lock().unwrap();
    let mut verdicts = Vec::new();
    let mut paths = BTreeMap::new();
    for (e, st) in sc.expects.iter().zip(exps) {
        let by = e.by.map(|b| b.0).unwrap_or(end);
        let node = e.node.as_ref().map(|n| n.get_ref().clone()).unwrap_or_default();
        let v = match (e.kind.get_ref(), st.decided) {
            (_, Some(v)) => v,
            (ExpectKind::Sees, None) => match st.met {
                Some(_) => Verdict::Pass,
                None => Verdict::Fail(format!("{node} saw {{{}}}", join(last_vis.get(&node).into_iter().flatten()))),
            },
            (ExpectKind::Throughout, None) => match (st.met, st.violated) {
                (None, _) => Verdict::Fail("no sample in the window".into()),
                (Some(_), None) => Verdict::Pass,
                (Some(_), Some((t, why))) => Verdict::Fail(format!("{why} at {}", report::fmt_t(t))),
            },
            (ExpectKind::NeverSees | ExpectKind::Connected, None) => match st.violated {
                None => Verdict::Pass,
                Some((t, why)) => Verdict::Fail(format!("{why} at {}", report::fmt_t(t))),
            },
            (ExpectKind::SameIpAfterRestart, None) => {
                let o = bd.nodes.get(&node).cloned().unwrap_or_default();
                let distinct: BTreeSet<_> = o.joins.iter().collect();
                if o.joins.len() < 2 {
                    Verdict::Fail(format!("{node} joined {} time(s); a restart and a rejoin are needed", o.joins.len()))
                } else if distinct.len() != 1 {
                    Verdict::Fail(format!(
                        "{node} joined as {}",
                        join(o.joins.iter().map(|(ip, k)| format!("{ip} ({})", &k[..k.len().min(16)])))
                    ))
                } else {
                    Verdict::Pass
                }
            }
            (ExpectKind::Reconnects, None) => {
                let o = bd.nodes.get(&node).cloned().unwrap_or_default();
                if o.connects.iter().any(|t| *t > e.after.0 && *t <= by) {
                    Verdict::Pass
                } else {
                    Verdict::Fail(format!("{node} did not reconnect in ({}, {}]", e.after, report::fmt_t(by)))
                }
            }
            (ExpectKind::HomeDerp, None) => Verdict::Fail("not decided".into()),
            (ExpectKind::UdpPath | ExpectKind::Reaches, None) => {
                let (a, b2) = (e.a.as_ref().expect("validated").get_ref(), &e.ping_target().expect("validated"));
                let rs = bd.reach.get(&(a.clone(), b2.clone())).map(Vec::as_slice).unwrap_or_default();
                if *e.kind.get_ref() == ExpectKind::UdpPath {
                    paths.insert((a.clone(), b2.clone()), path_at(rs, by));
                }
                let v = judge_pings(e, rs, by);
                if v == Verdict::Pass && e.path == Some(PathKind::None) && sc.leaks_into(a, b2) {
                    judge_at_receiver(&bd, a, b2)
                } else {
                    v
                }
            }
        };
        verdicts.push((report::describe(e, end), v));
    }
    verdicts.extend(injected_verdicts(sc, &leaked_pairs));
    let mut obs_all: Vec<(Duration, String)> = observed;
    for (n, o) in &bd.nodes {
        obs_all.extend(o.events.iter().map(|(t, e)| (*t, format!("{n}: {e}"))));
    }
    // Path changes seen by the mesh pings.
    for ((a, b2), rs) in &bd.reach {
        let mut last: Option<Option<PathKind>> = None;
        for (t, p) in rs {
            if last != Some(*p) {
                obs_all.push((*t, format!("{a} -> {b2}: {}", p.map_or("no answer".to_string(), |p| p.to_string()))));
                last = Some(*p);
            }
        }
    }
    obs_all.sort_by_key(|e| e.0);
    let nat_stats: Vec<(String, nat_host::NatStats)> =
        nat_boxes.iter().map(|(n, nb)| (n.clone(), nb.stats.lock().unwrap().clone())).collect();
    let visibility: BTreeMap<String, BTreeSet<String>> = last_vis;
    let ctx = report::TraceInput {
        sc,
        seed,
        timeline: &timeline,
        checkpoints: &cps,
        verdicts: &verdicts,
        leak: leak.as_deref(),
        samples,
        visibility: &visibility,
        paths: &paths,
        pings: &bd.reach,
    };
    let pings = bd.reach.clone();
    let trace = report::trace(&ctx);
    let observed = report::observed(&obs_all, &nat_stats);
    drop(bd);
    // The simulation's hosts hold state-directory locks; drop them before the directory.
    drop(sim);
    drop(tmp);
    Ok(Outcome { trace, observed, verdicts, leak, leaked_pairs, visibility, paths, pings })
}

/// Applies link settings once both ends exist (turmoil creates links at host registration):
/// for `node` when it is registered, or for the links between non-node hosts with `None`.
fn configure_links(
    sim: &mut turmoil::Sim<'_>,
    sc: &Scenario,
    node: Option<&str>,
    registered: &BTreeSet<String>,
    partitions: &mut BTreeSet<(String, String)>,
    oneway: &BTreeSet<(String, String)>,
) {
    let set_latency = |sim: &turmoil::Sim<'_>, a: &str, b: &str, l: Duration, jitter: Duration| {
        sim.set_link_latency(a, b, l);
        sim.set_link_max_message_latency(a, b, l + jitter);
    };
    if let Some(name) = node {
        let n = sc.node(name).expect("validated");
        if let Some(nat) = &n.nat {
            set_latency(sim, name, nat.get_ref(), Duration::from_millis(1), Duration::ZERO);
        }
        region_links(sim, sc, name, n.region.as_ref());
        for (x, y) in partitions.iter() {
            let other = if x == name {
                y
            } else if y == name {
                x
            } else {
                continue;
            };
            if registered.contains(other) && other != name {
                sim.partition(name, other.as_str());
            }
        }
        for (from, to) in oneway.iter().filter(|(f, t)| f != t && (f == name || t == name)) {
            if registered.contains(from) && registered.contains(to) {
                sim.partition_oneway(from.as_str(), to.as_str());
            }
        }
        // An offline host reaches nobody, and nobody reaches it. (A set, not `sc.node` per
        // registered host: that made starting N nodes O(N³).)
        let offline: BTreeSet<&str> =
            sc.nodes.iter().filter(|n| n.network == NetworkKind::Offline).map(|n| n.name.get_ref().as_str()).collect();
        let me_offline = offline.contains(name);
        for other in registered.iter().filter(|o| o.as_str() != name) {
            if me_offline || offline.contains(other.as_str()) {
                sim.partition(name, other.as_str());
                partitions.insert(pair(name, other));
            }
        }
    }
    if node.is_none() {
        // A NAT in a region carries its inside hosts' traffic at that region's distances.
        for n in sc.nats.iter().filter(|n| n.region.is_some()) {
            region_links(sim, sc, n.name.get_ref(), n.region.as_ref());
        }
    }
    for l in &sc.links {
        let (a, b) = (l.a.get_ref().as_str(), l.b.get_ref().as_str());
        let concerns = match node {
            Some(n) => (a == n || b == n) && registered.contains(a) && registered.contains(b),
            None => sc.node(a).is_none() && sc.node(b).is_none(),
        };
        if !concerns {
            continue;
        }
        // Either one given overrides `[net]`'s; the other keeps `[net]`'s value.
        if l.latency.is_some() || l.jitter.is_some() {
            let lat = l.latency.map_or(sc.net.latency.0, |d| d.0);
            set_latency(sim, a, b, lat, l.jitter.map_or(sc.net.jitter.0, |j| j.0));
        }
        if let Some(loss) = l.loss {
            sim.set_link_fail_rate(a, b, loss);
        }
    }
}

/// Latencies of `host` in `region` (or in none): the region's latency to Nexus and the world's
/// `derp` host; 2 ms to its own regional DERP host and, across the "centre", the sum of both
/// regions' latencies to the others (a host in no region: the other region's latency).
fn region_links(sim: &turmoil::Sim<'_>, sc: &Scenario, host: &str, region: Option<&toml::Spanned<String>>) {
    let set_latency = |a: &str, b: &str, l: Duration| {
        sim.set_link_latency(a, b, l);
        sim.set_link_max_message_latency(a, b, l + sc.net.jitter.0);
    };
    let reg = region.map(|r| sc.regions.iter().find(|x| x.name.get_ref() == r.get_ref()).expect("validated"));
    if let Some(reg) = reg {
        for h in ["nexus", "derp"] {
            set_latency(host, h, reg.latency.0);
        }
    }
    for other in sc.regions.iter().filter(|r| r.derp) {
        let l = match reg {
            Some(mine) if mine.name.get_ref() == other.name.get_ref() => Duration::from_millis(2),
            Some(mine) => mine.latency.0 + other.latency.0,
            None => other.latency.0,
        };
        set_latency(host, &format!("derp-{}", other.name.get_ref()), l);
    }
}

/// The host of the DERP region a derp_down/derp_up fault names (the world's `derp` host by
/// default).
fn derp_host_of(sc: &Scenario, region: &Option<toml::Spanned<String>>) -> String {
    let name = region.as_ref().map(|r| r.get_ref().as_str()).unwrap_or("default");
    sc.derp_regions().into_iter().find(|(_, n, _)| n == name).map(|(.., h)| h).unwrap_or_else(|| "derp".into())
}

fn mark_stopped(board: &Mutex<Board>, n: &str) {
    let mut b = board.lock().unwrap();
    let o = b.nodes.entry(n.to_string()).or_default();
    o.running = false;
    o.connected = false;
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Judges a `udp_path` or `reaches` expectation from the mesh pings `rs` of its pair (the same
/// rule in simulation and in `--real`).
pub(crate) fn judge_pings(e: &crate::scenario::ExpectSpec, rs: &[PingResult], by: Duration) -> Verdict {
    let want = e.path.expect("validated");
    if *e.kind.get_ref() == ExpectKind::UdpPath {
        // "none" means a ping was made and got no answer, not that nobody tried.
        if want == PathKind::None && !rs.iter().any(|(t, _)| *t <= by) {
            return Verdict::Fail(format!("no ping was made by {}", report::fmt_t(by)));
        }
        let p = path_at(rs, by);
        return if p == want { Verdict::Pass } else { Verdict::Fail(format!("path was {p}")) };
    }
    let window: Vec<&PingResult> = rs.iter().filter(|(t, _)| *t >= e.after.0 && *t <= by).collect();
    if want == PathKind::None {
        return match window.iter().find(|(_, p)| p.is_some()) {
            _ if window.is_empty() => Verdict::Fail("no ping was made in the window".into()),
            None => Verdict::Pass,
            Some((t, p)) => Verdict::Fail(format!(
                "answered over {} at {}",
                p.map(|p| p.to_string()).unwrap_or_default(),
                report::fmt_t(*t)
            )),
        };
    }
    if window.iter().any(|(_, p)| *p == Some(want)) {
        return Verdict::Pass;
    }
    let last = rs.iter().rev().find(|(t, _)| *t <= by).map(|(_, p)| *p);
    Verdict::Fail(format!(
        "{} ping(s) by {}, last answer {}",
        rs.iter().filter(|(t, _)| *t <= by).count(),
        report::fmt_t(by),
        match last {
            Some(Some(p)) => p.to_string(),
            Some(None) => "none".into(),
            None => "-".into(),
        }
    ))
}

/// The second half of `reaches a -> b, path none` when Nexus leaked `b` into `a`'s map: `a`
/// really sent WireGuard packets to `b` (`sent` bytes), and `b` received and dropped some
/// (`dropped`). `None`: one of them never ran. The same rule in simulation and in `--real`.
pub(crate) fn receiver_verdict(a: &str, b: &str, counts: Option<(u64, u64)>) -> Verdict {
    match counts {
        None => Verdict::Fail(format!("{a} or {b} never ran")),
        Some((0, _)) => Verdict::Fail(format!("{a} sent no WireGuard bytes to {b}: the leak was not exercised")),
        Some((sent, 0)) => Verdict::Fail(format!("{a} sent {sent} WireGuard bytes to {b}, but {b} dropped nothing")),
        Some(_) => Verdict::Pass,
    }
}

fn judge_at_receiver(bd: &Board, a: &str, b: &str) -> Verdict {
    let counts = match (bd.nodes.get(a), bd.nodes.get(b)) {
        (Some(oa), Some(ob)) => Some((oa.tx_bytes_to(&ob.node_key), ob.rx_dropped())),
        _ => None,
    };
    receiver_verdict(a, b, counts)
}

/// One verdict per `[[leak]]`: the injected entry was seen in the receiver's map (`seen`).
pub(crate) fn injected_verdicts(sc: &Scenario, seen: &BTreeSet<(String, String)>) -> Vec<(String, Verdict)> {
    sc.leaks
        .iter()
        .map(|l| {
            let (into, peer) = (l.into.get_ref(), l.peer.get_ref());
            let v = if seen.contains(&(into.clone(), peer.clone())) {
                Verdict::Pass
            } else {
                Verdict::Fail("the entry never appeared in the netmap".into())
            };
            (format!("injected: {into}'s netmap lists {peer} (another org's node)"), v)
        })
        .collect()
}

/// The path of the last mesh ping that ended by `by` (`none` if it got no answer or there
/// was none).
fn path_at(rs: &[PingResult], by: Duration) -> PathKind {
    rs.iter().rev().find(|(t, _)| *t <= by).and_then(|(_, p)| *p).unwrap_or(PathKind::None)
}

/// Whether the netmap `vis` lists `e.peers` (exactly them with `exact`).
pub(crate) fn lists(e: &crate::scenario::ExpectSpec, vis: &BTreeSet<String>) -> bool {
    let want: BTreeSet<String> = e.peers.iter().map(|p| p.get_ref().clone()).collect();
    if e.exact {
        *vis == want
    } else {
        want.is_subset(vis)
    }
}

fn join<T: std::fmt::Display>(it: impl IntoIterator<Item = T>) -> String {
    it.into_iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}
