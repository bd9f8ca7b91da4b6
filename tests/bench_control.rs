//! Bench: nexus-sim's control plane under many lightweight control clients.
//!
//! Each client is citadel's ts2021 control client (`citadel::control`: Noise, HTTP/2,
//! `/machine/register`, the streaming `/machine/map`) with no data plane, all in this process;
//! nexus-sim runs in a child process (this binary with `serve`) so its memory and CPU are
//! its own. After `--nodes` clients have joined `--orgs` orgs, it times `--probes` rounds of:
//! a new node joins org 0 → every other member's map holds it; that node changes endpoints →
//! every other member's map shows them. Prints p50/p99 of both, nexus-sim RSS per node and
//! nexus-sim CPU per change.
//!
//!   cargo run --release -p citadel-e2e --bin bench-control -- --nodes 1000 [--orgs 1] [--probes 20]
//!       [--offline N] [--concurrency 32] [--apply]
//!
//! `--offline N` first registers N more nodes spread over the orgs through the same protocol
//! (Noise handshake, `/machine/register` with the org's auth key) and closes each connection,
//! so nexus-sim holds them as registered, offline members of the online members' maps. Every
//! online node is one open socket in each process, so `--nodes` is checked against the
//! open-file limit before anything starts.
//!
//! `--floor BYTES` measures the transport alone instead: the same number of loopback TCP
//! connections and tasks, one `BYTES`-byte write to each per probe, no protocol (see `floor`).
//!
//! `--apply` makes every client keep a full `citadel::netmap::NetMap` (the real delta apply;
//! memory grows with nodes × org size); without it a client tracks only the probe node.
//!
//! The joiner stands for a machine elsewhere: its map request goes out at once (so nexus-sim
//! counts it online and tells the org), but its own first map, every member as a peer (25-55
//! ms to decode at 10,000), is read once every member holds the joiner, and the report gives
//! that decode's time. Read during the round (`--joiner-inline`), that decode shares the two
//! cores with the fan-out it does not take part in; its CPU counts in the join's either way.

use citadel::control::{fetch_server_key, ControlConn};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::net::TokioNet;
use citadel::netmap::NetMap;
use citadel::tailcfg::{self, Hostinfo, MapRequest, MapResponse, RegisterAuth, RegisterRequest};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The load generator (10,000 clients' tasks on two threads, each freeing what the other
/// allocated) spent a fifth of its CPU in glibc malloc's arena locks; mimalloc cuts that. The
/// nexus-sim child keeps the system allocator, as the `nexus-sim` binary has, so its CPU and
/// memory figures are the shipped server's. The choice is made once, at the first allocation,
/// from an environment variable the parent sets for the child (`getenv` does not allocate).
struct BenchAlloc;

/// 0: not chosen yet; 1: the system allocator (the server child); 2: mimalloc.
static CHOSEN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
const SERVE_ENV: &std::ffi::CStr = c"BENCH_CONTROL_SERVE";

impl BenchAlloc {
    #[inline]
    fn chosen() -> &'static dyn std::alloc::GlobalAlloc {
        let mut c = CHOSEN.load(Ordering::Relaxed);
        if c == 0 {
            // SAFETY: getenv reads the environment without allocating; nothing here changes it.
            c = if unsafe { libc::getenv(SERVE_ENV.as_ptr()) }.is_null() { 2 } else { 1 };
            CHOSEN.store(c, Ordering::Relaxed);
        }
        if c == 2 {
            &mimalloc::MiMalloc
        } else {
            &std::alloc::System
        }
    }
}

// SAFETY: every call goes to the allocator chosen before the first allocation, for good.
unsafe impl std::alloc::GlobalAlloc for BenchAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        Self::chosen().alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        Self::chosen().dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        Self::chosen().alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        Self::chosen().realloc(p, l, n)
    }
}

#[global_allocator]
static ALLOC: BenchAlloc = BenchAlloc;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `--policy allow-all`: every node reaches every other, across orgs.
const ALLOW_ALL: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#;

const USAGE: &str = "usage: bench-control [--nodes N online (200)] [--offline N registered, then \
disconnected (0)] [--orgs N (1)] [--probes N (10)] [--concurrency N joins in flight (32)] [--apply] \
[--short] [--rounds: a line per probe round] [--joiner-inline: the joiner reads its first map during the round] [--joiner-alternate: in odd rounds only] [--policy FILE|allow-all: an ACL policy instead of org isolation] [--floor BYTES: the same fan-out over bare TCP instead]";

/// Open files each process needs besides one socket per online node (runtime, listener, stdio).
const FD_SPARE: u64 = 64;

#[derive(Clone)]
struct Opts {
    nodes: usize,
    orgs: usize,
    probes: usize,
    apply: bool,
    concurrency: usize,
    offline: usize,
    /// `--floor BYTES`: the transport floor instead (see [`floor`]).
    floor: Option<usize>,
    /// `--rounds`: a line per probe round (latency, messages, each side's CPU, the machine's steal).
    rounds: bool,
    /// `--policy PATH|allow-all`: the server's ACL policy instead of its built-in org isolation
    /// (any other policy takes the map streams' path for peers across orgs).
    policy: Option<String>,
    /// When the joiner reads its own first map.
    joiner: JoinerMap,
}

/// When a probe round's joiner reads its own first map (every member as a peer).
#[derive(Clone, Copy, PartialEq)]
enum JoinerMap {
    /// Once every member holds the joiner (the default).
    After,
    /// `--joiner-inline`: during the round, on the cores the fan-out uses.
    During,
    /// `--joiner-alternate`: during odd rounds, after even ones; both reported.
    Alternate,
}

impl JoinerMap {
    /// Whether round `round`'s joiner reads its map during the round.
    fn during(self, round: u64) -> bool {
        self == JoinerMap::During || (self == JoinerMap::Alternate && round % 2 == 1)
    }
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        nodes: 200,
        orgs: 1,
        probes: 10,
        apply: false,
        concurrency: 32,
        offline: 0,
        floor: None,
        rounds: false,
        policy: None,
        joiner: JoinerMap::After,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> anyhow::Result<usize> {
            args.next().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow::anyhow!("{name} needs a number"))
        };
        match a.as_str() {
            "--nodes" => o.nodes = num("--nodes")?,
            "--orgs" => o.orgs = num("--orgs")?.max(1),
            "--probes" => o.probes = num("--probes")?.max(1),
            "--concurrency" => o.concurrency = num("--concurrency")?.max(1),
            "--offline" => o.offline = num("--offline")?,
            "--apply" => o.apply = true,
            "--rounds" => o.rounds = true,
            "--joiner-inline" => o.joiner = JoinerMap::During,
            "--joiner-alternate" => o.joiner = JoinerMap::Alternate,
            "--policy" => {
                let p = args.next().ok_or_else(|| anyhow::anyhow!("--policy needs a file or allow-all"))?;
                o.policy = Some(if p == "allow-all" {
                    ALLOW_ALL.to_string()
                } else {
                    std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("--policy {p}: {e}"))?
                });
            }
            "--floor" => o.floor = Some(num("--floor")?.max(1)),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--short" => (o.nodes, o.probes) = (100, 5),
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(o)
}

/// Raises the open-file limit (every client is one socket here and one in nexus-sim): to the
/// kernel's per-process maximum when allowed (root), else to the hard limit.
fn raise_nofile() {
    #[cfg(unix)]
    let most: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
        .min(4 << 20);
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            let up = libc::rlimit { rlim_cur: most.max(r.rlim_max), rlim_max: most.max(r.rlim_max) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &up) != 0 {
                r.rlim_cur = r.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    }
}

/// The open-file limit now in force (soft).
fn nofile_limit() -> u64 {
    #[cfg(unix)]
    // SAFETY: getrlimit only writes the struct passed.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            return r.rlim_cur;
        }
    }
    u64::MAX
}

/// Number of open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// `serve ORGS`: nexus-sim for the bench; prints `{"url", "keys"}` and runs until stdin closes.
/// The policy, if any, comes in `BENCH_CONTROL_POLICY`.
fn serve(orgs: usize) -> anyhow::Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let r = nexus_sim::start(nexus_sim::Config {
            derp: nexus_sim::DerpMode::Off,
            stun_listen: None,
            keepalive: Duration::from_secs(3600),
            policy: std::env::var("BENCH_CONTROL_POLICY").ok(),
            ..Default::default()
        })
        .await?;
        let mut keys = vec![];
        for i in 0..orgs {
            let u = r.shared.store.create_user(&format!("org{i}"), "")?;
            keys.push(r.shared.store.create_key(u.id, true, false, None, vec![])?.key);
        }
        println!("{}", serde_json::json!({"url": r.url, "keys": keys}));
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        })
        .await?;
        drop(r);
        anyhow::Ok(())
    })
}

/// The node whose arrival or change is being timed.
#[derive(Clone)]
struct Probe {
    round: u64,
    org: usize,
    key: NodePublic,
    /// Endpoints the members must show; `None`: presence is enough.
    endpoints: Option<Vec<String>>,
}

#[derive(Default)]
struct Board {
    probe: RwLock<Option<Probe>>,
    /// The round of `probe`, set after it: members read the lock only when this moved (10,000
    /// readers of one lock on every message made its line bounce between the cores).
    round: AtomicU64,
    seen: AtomicUsize,
    /// When the first member saw the current probe (set by the member that made `seen` 1): a
    /// fan-out's start apart from its length.
    first_seen: std::sync::Mutex<Option<Instant>>,
    messages: AtomicU64,
    joined: AtomicUsize,
    /// Fewest peers any member's first (full) map held.
    min_first_peers: AtomicUsize,
    /// Set once the figures are printed (streams ending then are expected).
    stopping: std::sync::atomic::AtomicBool,
}

impl Board {
    /// Starts timing `p`: members see it on their next message.
    fn set_probe(&self, p: Probe) {
        let round = p.round;
        *self.probe.write().unwrap() = Some(p);
        self.round.store(round, Ordering::Release);
    }

    /// How long after `start` the first member saw the probe.
    fn first_after(&self, start: Instant) -> Duration {
        self.first_seen.lock().unwrap().map_or(Duration::ZERO, |t| t.saturating_duration_since(start))
    }
}

/// What a client knows of the probe node (all a client keeps without `--apply`).
#[derive(Default)]
struct ProbeView {
    key: NodePublic,
    id: Option<i64>,
    endpoints: Vec<String>,
}

impl ProbeView {
    fn apply(&mut self, m: &MapResponse) {
        if let Some(peers) = &m.peers {
            self.id = None;
            for p in peers.iter().filter(|p| p.key == self.key) {
                (self.id, self.endpoints) = (Some(p.id), p.endpoints.clone());
            }
            return;
        }
        if self.id.is_some_and(|id| m.peers_removed.iter().flatten().any(|r| *r == id)) {
            self.id = None;
        }
        for p in m.peers_changed.iter().flatten().filter(|p| p.key == self.key) {
            (self.id, self.endpoints) = (Some(p.id), p.endpoints.clone());
        }
        for c in m.peers_changed_patch.iter().flatten() {
            if Some(c.node_id) == self.id {
                if let Some(e) = &c.endpoints {
                    self.endpoints.clone_from(e);
                }
            }
        }
    }
}

enum View {
    Probe(ProbeView),
    /// The real map, and where the probe is in it (a lookup by ID, not a scan of the peers:
    /// the bench's own check must not cost more than the apply it measures).
    Full(Box<NetMap>, ProbeView),
}

impl View {
    fn apply(&mut self, m: &MapResponse) {
        match self {
            View::Probe(v) => v.apply(m),
            View::Full(nm, v) => {
                nm.apply(m);
                v.apply(m);
            }
        }
    }
    fn holds(&self, p: &Probe) -> bool {
        let eps: &[String] = match self {
            View::Probe(v) if v.key == p.key && v.id.is_some() => &v.endpoints,
            View::Full(nm, v) => match v.id.and_then(|id| nm.peers.get(&id)).filter(|n| n.key == p.key) {
                Some(n) => &n.endpoints,
                None => return false,
            },
            View::Probe(_) => return false,
        };
        p.endpoints.as_deref().is_none_or(|e| e == eps)
    }
}

struct Client {
    conn: ControlConn,
    node: PrivateKey,
}

async fn join(
    url: &str,
    server: &citadel::keys::MachinePublic,
    authkey: &str,
    name: &str,
    node: PrivateKey,
) -> anyhow::Result<Client> {
    let machine = PrivateKey::generate(&mut rand::thread_rng());
    let mut conn = ControlConn::dial(&TokioNet, url, &machine, server, TIMEOUT).await?;
    let r = conn
        .register(&RegisterRequest {
            version: tailcfg::CAPABILITY_VERSION,
            node_key: NodePublic(node.public_bytes()),
            hostinfo: Some(Hostinfo { hostname: name.to_string(), ..Default::default() }),
            auth: Some(RegisterAuth { auth_key: authkey.to_string(), ..Default::default() }),
            ..Default::default()
        })
        .await?;
    anyhow::ensure!(r.error.is_empty() && r.machine_authorized, "register refused: {}", r.error);
    Ok(Client { conn, node })
}

fn map_request(node: &PrivateKey, endpoints: Vec<String>, stream: bool) -> MapRequest {
    MapRequest {
        version: tailcfg::CAPABILITY_VERSION,
        keep_alive: stream,
        stream,
        omit_peers: !stream,
        node_key: NodePublic(node.public_bytes()),
        endpoints,
        compress: "zstd".into(),
        ..Default::default()
    }
}

/// Runs one member: streams its map and reports when it holds the current probe. Endpoint
/// changes for this node arrive on `cmds` (probe members only).
async fn member(
    mut c: Client,
    org: usize,
    board: Arc<Board>,
    apply: bool,
    mut cmds: Option<tokio::sync::mpsc::Receiver<Vec<String>>>,
    first_map: tokio::sync::oneshot::Sender<()>,
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    let me = NodePublic(c.node.public_bytes());
    let eps = vec![format!("127.0.0.1:{}", 10000 + (me.0[0] as u16) * 100 + me.0[1] as u16 % 100)];
    let mut stream = c.conn.map(&map_request(&c.node, eps, true)).await?;
    // The request is out, so the server counts the node online and tells its org; its own
    // first map is read when `hold` fires.
    if let Some(h) = hold {
        let _ = h.await;
    }
    let mut view =
        if apply { View::Full(Box::default(), ProbeView::default()) } else { View::Probe(ProbeView::default()) };
    let mut done_round = 0u64;
    let mut first = Some(first_map);
    let (mut probe, mut probe_round) = (None::<Probe>, 0u64);
    loop {
        // Biased: a message wakes the member without polling its command channel too. Only
        // the probe nodes have one.
        let m = tokio::select! {
            biased;
            m = stream.next() => m,
            e = async { cmds.as_mut()?.recv().await }, if cmds.is_some() => {
                let Some(e) = e else { return Ok(()) };
                c.conn.map(&map_request(&c.node, e, false)).await?;
                continue;
            }
        };
        let Some(m) = m? else { anyhow::bail!("map stream ended") };
        board.messages.fetch_add(1, Ordering::Relaxed);
        let round = board.round.load(Ordering::Acquire);
        if round != probe_round {
            (probe, probe_round) = (board.probe.read().unwrap().clone(), round);
        }
        if let (View::Probe(v) | View::Full(_, v), Some(p)) = (&mut view, &probe) {
            if v.key != p.key {
                // A new probe node: nothing seen of it yet.
                *v = ProbeView { key: p.key, ..Default::default() };
            }
        }
        view.apply(&m);
        if let Some(tx) = first.take() {
            board.min_first_peers.fetch_min(m.peers.as_ref().map_or(0, Vec::len), Ordering::Relaxed);
            let _ = tx.send(());
        }
        if let Some(p) = probe.as_ref().filter(|p| p.org == org && p.key != me && p.round != done_round) {
            if view.holds(&p) {
                done_round = p.round;
                if board.seen.fetch_add(1, Ordering::AcqRel) == 0 {
                    *board.first_seen.lock().unwrap() = Some(Instant::now());
                }
            }
        }
    }
}

/// nexus-sim's resident memory (bytes) and CPU time (user + system).
fn proc_stats(pid: u32) -> (u64, Duration) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let hz = clock_ticks();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (rss_kb * 1024, Duration::from_millis(ticks * 1000 / hz))
}

/// CPU time the hypervisor took from this machine's virtual CPUs so far (`steal` in
/// `/proc/stat`; zero on bare metal): a round that took more CPU than the others for the same
/// work shows here whether the machine, not the code, was slower then.
fn machine_steal() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .and_then(|l| l.split_whitespace().nth(8)?.parse().ok())
        .unwrap_or(0);
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

/// Clock ticks per second of `/proc/PID/stat` (the bench reads /proc, so Linux only).
fn clock_ticks() -> u64 {
    #[cfg(unix)]
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[cfg(not(unix))]
    let hz = 100;
    u64::try_from(hz).unwrap_or(100).max(1)
}

/// The `p` quantile of `v` (nearest rank on `len - 1`): with 50 samples or fewer, p99 is the
/// largest; with 100 it is the second largest, so a run meant to show a p99 takes `--probes 100`.
fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Starts a member; a probe member takes endpoint changes on `cmds` and ends when it closes.
/// The receiver fires at the member's first map; with `hold`, the member reads that map only
/// once `hold` fires.
fn spawn_member(
    c: Client,
    org: usize,
    board: &Arc<Board>,
    apply: bool,
    cmds: Option<tokio::sync::mpsc::Receiver<Vec<String>>>,
    hold: Option<tokio::sync::oneshot::Receiver<()>>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (ftx, frx) = tokio::sync::oneshot::channel();
    let b = board.clone();
    tokio::spawn(async move {
        let r = member(c, org, b.clone(), apply, cmds, ftx, hold).await;
        if let Some(e) = r.as_ref().err().filter(|_| !b.stopping.load(Ordering::Relaxed)) {
            eprintln!("member ended: {e}");
        }
    });
    frx
}

/// What registering the offline nodes cost.
struct Registered {
    elapsed: Duration,
    retries: usize,
    /// nexus-sim's RSS once all are registered.
    rss: u64,
    /// nexus-sim's CPU time spent on them.
    cpu: Duration,
    server_fds: usize,
    own_fds: usize,
}

/// Registers `--offline` nodes, node `i` in org `i % orgs`, each over its own connection that
/// is closed once registered (as a node that registers and goes away).
async fn register_offline(
    o: &Opts,
    url: &str,
    server: &citadel::keys::MachinePublic,
    keys: &[String],
    sem: &Arc<tokio::sync::Semaphore>,
    server_pid: u32,
) -> anyhow::Result<Option<Registered>> {
    if o.offline == 0 {
        return Ok(None);
    }
    println!("registering {} offline nodes in {} orgs ...", o.offline, o.orgs);
    let (_, cpu0) = proc_stats(server_pid);
    let t0 = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..o.offline {
        let (url, server, key, sem) = (url.to_string(), *server, keys[i % o.orgs].clone(), sem.clone());
        let (done, retries) = (done.clone(), retries.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let node = PrivateKey::generate(&mut rand::thread_rng());
            // A loopback port still in TIME_WAIT or a full accept queue fails one dial; a few
            // tries ride over it, anything persistent is reported.
            let mut tries = 0;
            loop {
                match join(&url, &server, &key, &format!("off{i}"), node.clone()).await {
                    Ok(c) => {
                        drop(c);
                        break;
                    }
                    Err(e) if tries < 5 => {
                        tries += 1;
                        retries.fetch_add(1, Ordering::Relaxed);
                        if tries == 5 {
                            eprintln!("offline node {i}: {e} (retrying)");
                        }
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(e) => return Err(e.context(format!("registering offline node {i}"))),
                }
            }
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if n % 10_000 == 0 {
                println!("  {n} registered ({:.0}/s)", n as f64 / t0.elapsed().as_secs_f64());
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = t0.elapsed();
    // The closed connections' tasks end on their own; let them finish before counting fds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, cpu1) = proc_stats(server_pid);
    let r = Registered {
        elapsed,
        retries: retries.load(Ordering::Relaxed),
        rss,
        cpu: cpu1 - cpu0,
        server_fds: open_fds(server_pid),
        own_fds: open_fds(std::process::id()),
    };
    println!(
        "{} registered in {elapsed:.1?} ({:.0}/s); nexus-sim RSS {} MB, open fds: nexus-sim {}, generator {}",
        o.offline,
        o.offline as f64 / elapsed.as_secs_f64(),
        rss / 1_000_000,
        r.server_fds,
        r.own_fds
    );
    Ok(Some(r))
}

/// Waits until `want` members saw the probe or the timeout passes.
async fn wait_seen(board: &Board, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while board.seen.load(Ordering::Acquire) < want {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {}/{want} members saw the probe",
            board.seen.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn bench(o: Opts, url: String, keys: Vec<String>, server_pid: u32) -> anyhow::Result<()> {
    let server = fetch_server_key(&TokioNet, &url, TIMEOUT).await?;
    let board = Arc::new(Board { min_first_peers: AtomicUsize::new(usize::MAX), ..Default::default() });
    let (rss0, _) = proc_stats(server_pid);
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency));
    let reg = register_offline(&o, &url, &server, &keys, &sem, server_pid).await?;
    let rss_off = reg.as_ref().map_or(rss0, |r| r.rss);
    // Org 0 gets the remainder's first node, and the probes join org 0.
    let per_org = o.nodes.div_ceil(o.orgs);
    println!("joining {} online nodes in {} orgs ({per_org} in org 0) ...", o.nodes, o.orgs);
    let (_, cpu_wave0) = proc_stats(server_pid);
    let t0 = Instant::now();
    let mut tasks = vec![];
    for i in 0..o.nodes {
        let (url, key, board, sem) = (url.clone(), keys[i % o.orgs].clone(), board.clone(), sem.clone());
        let org = i % o.orgs;
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let node = PrivateKey::generate(&mut rand::thread_rng());
            let c = join(&url, &server, &key, &format!("n{i}"), node).await?;
            let first = spawn_member(c, org, &board, o.apply, None, None);
            first.await.map_err(|_| anyhow::anyhow!("no first map"))?;
            board.joined.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let join_all = t0.elapsed();
    // Let the join wave's deltas drain.
    let mut last = board.messages.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = board.messages.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let (rss1, cpu1) = proc_stats(server_pid);
    // Every org holds at least this many offline nodes, all of them in each member's map.
    let min_off = o.offline / o.orgs;
    let min_first = board.min_first_peers.load(Ordering::Relaxed);
    anyhow::ensure!(
        min_first >= min_off,
        "a member's first map held {min_first} peers, fewer than its org's {min_off} offline nodes"
    );
    println!("every member's first map held at least {min_first} peers (its org's offline nodes: >= {min_off})");
    println!(
        "{} nodes joined and settled in {:.1?} (all first maps in {join_all:.1?}); nexus-sim RSS {} MB",
        o.nodes,
        t0.elapsed(),
        rss1 / 1_000_000
    );

    // From a join's start to the first member holding it: registration, the joiner's map
    // request and the start of the fan-out, before it is spread over the org.
    let mut first_lat = vec![];
    let mut ep_lat = vec![];
    // From the round's end to the joiner holding its own first map.
    let mut own_map = vec![];
    // The join latencies of the rounds whose joiner read its first map after / during them.
    let mut join_lat: [Vec<Duration>; 2] = [vec![], vec![]];
    let (mut join_cpu, mut ep_cpu) = (Duration::ZERO, Duration::ZERO);
    // The load generator's own CPU over the same windows: it shares the machine's cores with
    // nexus-sim, so each latency is of both.
    let (mut gen_join_cpu, mut gen_ep_cpu) = (Duration::ZERO, Duration::ZERO);
    let own = std::process::id();
    // CPU time so far of nexus-sim and of this process.
    let cpu = || (proc_stats(server_pid).1, proc_stats(own).1);
    // Messages the members received per round, over the members: 1.0 is one delta each.
    let (mut join_msgs, mut ep_msgs, mut member_rounds) = (0u64, 0u64, 0u64);
    let mut probes = vec![];
    for round in 0..o.probes as u64 {
        let node = PrivateKey::generate(&mut rand::thread_rng());
        let key = NodePublic(node.public_bytes());
        // Join: from the register request to every other member of org 0 holding the node.
        board.seen.store(0, Ordering::Release);
        board.set_probe(Probe { round: 2 * round + 1, org: 0, key, endpoints: None });
        let members = per_org + probes.len();
        member_rounds += members as u64;
        let (c0, g0) = cpu();
        let steal0 = machine_steal();
        let m0 = board.messages.load(Ordering::Relaxed);
        let start = Instant::now();
        let c = join(&url, &server, &keys[0], &format!("probe{round}"), node).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel();
        let during = o.joiner.during(round);
        let joiner_first = spawn_member(c, 0, &board, o.apply, Some(rx), (!during).then_some(hold_rx));
        wait_seen(&board, members).await?;
        let join_t = start.elapsed();
        join_lat[usize::from(during)].push(join_t);
        let join_first = board.first_after(start);
        first_lat.push(join_first);
        // The joiner's own first map (every member as a peer), read now unless it was read
        // during the round (`--joiner-inline`); its CPU counts in the join's either way.
        let t_own = Instant::now();
        let _ = hold_tx.send(());
        joiner_first.await.map_err(|_| anyhow::anyhow!("the joiner got no first map"))?;
        own_map.push(t_own.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (c1, g1) = cpu();
        (join_cpu, gen_join_cpu) = (join_cpu + (c1 - c0), gen_join_cpu + (g1 - g0));
        let msgs = board.messages.load(Ordering::Relaxed) - m0;
        join_msgs += msgs;
        let join_round = (c1 - c0, g1 - g0, msgs, machine_steal().saturating_sub(steal0));

        // Endpoint change of that node.
        let eps = vec![format!("127.0.0.1:{}", 20000 + round), format!("[::1]:{}", 20000 + round)];
        board.seen.store(0, Ordering::Release);
        board.set_probe(Probe { round: 2 * round + 2, org: 0, key, endpoints: Some(eps.clone()) });
        let (c0, g0) = cpu();
        let steal0 = machine_steal();
        let m0 = board.messages.load(Ordering::Relaxed);
        let start = Instant::now();
        tx.send(eps).await?;
        wait_seen(&board, members).await?;
        ep_lat.push(start.elapsed());
        let ep_first = board.first_after(start);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (c1, g1) = cpu();
        (ep_cpu, gen_ep_cpu) = (ep_cpu + (c1 - c0), gen_ep_cpu + (g1 - g0));
        let msgs = board.messages.load(Ordering::Relaxed) - m0;
        ep_msgs += msgs;
        if o.rounds {
            // CPU comes in clock ticks (10 ms at 100 Hz); each window ends 50 ms after the last
            // member saw the change. Steal is the whole machine's over the same window.
            let per = |m: u64| m as f64 / members as f64;
            println!(
                "round {round:>3}: join {:>8.1?} (first member {:>6.1?}, {:.2} msg/member, CPU nexus-sim {:>6.1?} \
                 generator {:>6.1?}, steal {:.1?})  endpoint {:>8.1?} (first {:>6.1?}, {:.2}, {:>6.1?} / {:>6.1?}, \
                 steal {:.1?})",
                join_t,
                join_first,
                per(join_round.2),
                join_round.0,
                join_round.1,
                join_round.3,
                ep_lat[ep_lat.len() - 1],
                ep_first,
                per(msgs),
                c1 - c0,
                g1 - g0,
                machine_steal().saturating_sub(steal0)
            );
        }
        probes.push(tx);
    }
    let n = o.probes as u32;
    let total = o.nodes + o.probes;
    println!(
        "\nnodes held {} ({} online, {} registered offline) orgs {} (org 0: {} online members at the end), \
         clients {}",
        total + o.offline,
        total,
        o.offline,
        o.orgs,
        per_org + o.probes,
        if o.apply { "full NetMap apply" } else { "probe tracking only" }
    );
    println!(
        "join -> the first member holds it     p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
        pct(&mut first_lat, 0.5),
        pct(&mut first_lat, 0.99),
        pct(&mut first_lat, 1.0)
    );
    let mut all_joins = join_lat.concat();
    println!(
        "join -> every member's map holds it   p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
        pct(&mut all_joins, 0.5),
        pct(&mut all_joins, 0.99),
        pct(&mut all_joins, 1.0)
    );
    if o.joiner == JoinerMap::Alternate {
        for (during, v) in join_lat.iter_mut().enumerate().filter(|(_, v)| !v.is_empty()) {
            println!(
                "  rounds whose joiner read its own map {}  p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
                if during == 1 { "during them" } else { "after them " },
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 1.0)
            );
        }
    }
    println!(
        "the joiner's own first map, {}  p50 {:>8.1?}  p99 {:>8.1?}",
        match o.joiner {
            JoinerMap::During => "read during the round: done after it",
            JoinerMap::Alternate => "read during odd rounds, after even ones: done after the round",
            JoinerMap::After => "read after the round: decoded in",
        },
        pct(&mut own_map, 0.5),
        pct(&mut own_map, 0.99)
    );
    println!(
        "endpoint change -> every member       p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
        pct(&mut ep_lat, 0.5),
        pct(&mut ep_lat, 0.99),
        pct(&mut ep_lat, 1.0)
    );
    println!(
        "nexus-sim RSS {:.1} MB ({:.1} KB per node over the empty server)",
        rss1 as f64 / 1e6,
        rss1.saturating_sub(rss0) as f64 / 1e3 / (o.nodes + o.offline) as f64
    );
    if let Some(r) = &reg {
        println!(
            "nexus-sim KB per offline node {:.1} (RSS after registering them), per online node {:.1} \
             (RSS of the join wave over that)",
            r.rss.saturating_sub(rss0) as f64 / 1e3 / o.offline as f64,
            rss1.saturating_sub(rss_off) as f64 / 1e3 / o.nodes as f64
        );
        println!(
            "registration: {} offline nodes in {:.1?} = {:.0}/s at concurrency {} ({} retried), nexus-sim CPU \
             {:.0?} per registration; open fds after: nexus-sim {}, generator {}",
            o.offline,
            r.elapsed,
            o.offline as f64 / r.elapsed.as_secs_f64(),
            o.concurrency,
            r.retries,
            r.cpu / o.offline as u32,
            r.server_fds,
            r.own_fds
        );
    }
    println!(
        "nexus-sim CPU per join {:.1?}, per endpoint change {:.1?} (whole org's deltas; {} clock ticks/s)",
        join_cpu / n,
        ep_cpu / n,
        clock_ticks()
    );
    println!(
        "load generator CPU per join {:.1?}, per endpoint change {:.1?} (every member's client decoding the deltas, \
         the joiner's first map)",
        gen_join_cpu / n,
        gen_ep_cpu / n
    );
    let per_member = |m: u64| m as f64 / member_rounds as f64;
    println!(
        "messages per member: {:.2} per join (the joiner's first map included), {:.2} per endpoint change",
        per_member(join_msgs),
        per_member(ep_msgs)
    );
    println!("nexus-sim CPU for the whole join wave {:.1?}", cpu1 - cpu_wave0);
    let (grss, gcpu) = proc_stats(std::process::id());
    println!(
        "load generator (this process): RSS {:.1} MB ({:.1} KB per client), CPU {:.1?} in all",
        grss as f64 / 1e6,
        grss as f64 / 1e3 / total as f64,
        gcpu
    );
    board.stopping.store(true, Ordering::Relaxed);
    drop(probes);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        return serve(args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1));
    }
    if args.get(1).map(String::as_str) == Some("serve-floor") {
        return serve_floor(args.get(2).and_then(|v| v.parse().ok()).unwrap_or(1));
    }
    let o = parse()?;
    raise_nofile();
    let limit = nofile_limit();
    let need = (o.nodes + o.probes) as u64 + o.concurrency as u64 + FD_SPARE;
    if need > limit {
        // One line, no backtrace: this is a setting to change, not a failure.
        eprintln!(
            "--nodes {} needs about {need} open files in each process (one socket per online node) but the \
             limit is {limit} and cannot be raised here: use --nodes {} or less and --offline for the rest",
            o.nodes,
            limit.saturating_sub(o.probes as u64 + o.concurrency as u64 + FD_SPARE)
        );
        std::process::exit(2);
    }
    if let Some(bytes) = o.floor {
        return floor(&o, bytes);
    }
    if let Some(p) = &o.policy {
        println!("policy: {} bytes (not the built-in org isolation)", p.len());
    }
    let (mut child, line) = spawn_server(&["serve", &o.orgs.to_string()], o.policy.as_deref())?;
    let pid = child.id();
    let v: serde_json::Value = serde_json::from_str(&line)?;
    let url = v["url"].as_str().unwrap_or_default().to_string();
    let keys: Vec<String> =
        v["keys"].as_array().into_iter().flatten().filter_map(|k| k.as_str().map(String::from)).collect();
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(bench(o, url, keys, pid));
    drop(child.stdin.take());
    let _ = child.wait();
    r
}

/// Starts this binary as a server child (`serve` or `serve-floor`) with the system allocator;
/// returns it and the first line it printed (where to reach it).
fn spawn_server(args: &[&str], policy: Option<&str>) -> anyhow::Result<(std::process::Child, String)> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    if let Some(p) = policy {
        cmd.env("BENCH_CONTROL_POLICY", p);
    }
    let mut child = cmd
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .env("NEXUS_LOG", "warn")
        .env(SERVE_ENV.to_str().expect("ASCII"), "1")
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    Ok((child, line))
}

/// `serve-floor BYTES`: the floor's server. Accepts connections; each has a task that waits on
/// one shared notifier (as a map stream waits on its org's) and writes `BYTES` to its socket
/// each time it fires. Prints its port; a line on stdin fires it, end of stdin stops it.
fn serve_floor(bytes: usize) -> anyhow::Result<()> {
    raise_nofile();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?.port());
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let msg: Arc<[u8]> = vec![7u8; bytes].into();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (mut rx, msg) = (rx.clone(), msg.clone());
                let _ = sock.set_nodelay(true);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while rx.changed().await.is_ok() {
                        if sock.write_all(&msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let lines = tokio::task::spawn_blocking(move || {
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        let _ = lines.await;
        anyhow::Ok(())
    })
}

/// `--floor BYTES`: what the same fan-out costs with nothing but the transport: `--nodes`
/// TCP connections on loopback to a child process, one task per connection on each side (as
/// in the control bench), and per probe one `BYTES`-byte write to every connection. No Noise,
/// HTTP/2, zstd or JSON: the time from the trigger until every client has read its bytes, and
/// both processes' CPU per probe, are what the kernel and the runtime alone take here.
fn floor(o: &Opts, bytes: usize) -> anyhow::Result<()> {
    let (mut child, line) = spawn_server(&["serve-floor", &bytes.to_string()], None)?;
    let server_pid = child.id();
    let port: u16 = line.trim().parse()?;
    let mut trigger = child.stdin.take().expect("piped");
    let rt = tokio::runtime::Runtime::new()?;
    let r = rt.block_on(async move {
        let board = Arc::new(Board::default());
        for _ in 0..o.nodes {
            let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let _ = sock.set_nodelay(true);
            let b = board.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; bytes];
                while sock.read_exact(&mut buf).await.is_ok() {
                    b.seen.fetch_add(1, Ordering::AcqRel);
                }
            });
        }
        let own = std::process::id();
        let (mut lat, mut srv_cpu, mut gen_cpu) = (vec![], Duration::ZERO, Duration::ZERO);
        for _ in 0..o.probes {
            board.seen.store(0, Ordering::Release);
            let (c0, g0) = (proc_stats(server_pid).1, proc_stats(own).1);
            let start = Instant::now();
            trigger.write_all(b"go\n")?;
            trigger.flush()?;
            wait_seen(&board, o.nodes).await?;
            lat.push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
            srv_cpu += proc_stats(server_pid).1 - c0;
            gen_cpu += proc_stats(own).1 - g0;
        }
        let n = o.probes as u32;
        println!(
            "transport floor: {} connections, {bytes} bytes each per probe\n\
             trigger -> every client read it   p50 {:>8.1?}  p99 {:>8.1?}\n\
             server CPU per probe {:.1?}, clients' CPU per probe {:.1?} ({} clock ticks/s)",
            o.nodes,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            srv_cpu / n,
            gen_cpu / n,
            clock_ticks()
        );
        anyhow::Ok(())
    });
    drop(rt);
    let _ = child.wait();
    r
}
