//! Plays a scenario with the real binaries (`nexus-sim serve`, `citadel up`) in Linux network
//! namespaces with kernel NAT, on wall-clock time, and compares verdicts with the simulation.
//!
//! Topology: namespace `<prefix>-inet` holds the "internet" bridge (198.18.0.0/16) and Nexus at
//! 198.18.0.1:8080; each NAT is a namespace with an outside leg on its upstream (the internet or,
//! for CGNAT, the LAN of the NAT it is behind) and a LAN bridge 198.19.J.0/24 inside, translated
//! by iptables MASQUERADE (`--random-fully` when the mapping is not endpoint-independent);
//! each node is a namespace on its NAT's LAN or on the internet. Every namespace is deleted
//! when the run ends, also on error and on Ctrl-C.
//!
//! The DERP relay (`nexus-sim derp`, with STUN) is its own process at 198.18.0.2, named in the
//! DERP map Nexus hands out, as the simulation's `derp` host is.
//!
//! Played here: node starts, `nexus_down`/`nexus_up`/`nexus_restart`, `derp_down`/`derp_up`
//! (the world's relay), `restart`/`stop`/`start`, and `partition`/`heal`/`hold`/`release`
//! between nodes and `nexus` or `derp`, or between public nodes (iptables DROP in the node's
//! namespace; a hold is a blackhole that TCP rides out by retransmitting).
//! Evaluated: everything, from each running `up`'s status and mesh pings over its local API
//! socket; expectations whose deadline follows a fault that is not played are reported as not
//! evaluated.

use crate::nat::Mapping;
use crate::report::{fmt_t, Verdict};
use crate::scenario::{ExpectKind, FaultKind, NetworkKind, Scenario};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The directory of the running executable (where cargo puts `citadel` and `nexus-sim` too).
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| ".".into())
}

/// The result of a real run.
#[derive(Debug, Clone)]
pub struct RealOutcome {
    /// Human-readable report.
    pub report: String,
    /// Verdicts in file order (same descriptions as the simulation's).
    pub verdicts: Vec<(String, Verdict)>,
    /// No failure and no org leak.
    pub passed: bool,
}

/// Namespaces and processes of one run; dropping it removes everything.
struct Lab {
    prefix: String,
    children: Vec<Child>,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn sh(&self, ns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
        let mut c = match ns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.ns(n)]).args(args);
                c
            }
            None => {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        };
        let o = c.output().with_context(|| format!("running {args:?}"))?;
        if !o.status.success() {
            bail!("{args:?} in {ns:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        self.sh(None, &["ip", "netns", "add", &self.ns(name)])?;
        self.sh(Some(name), &["ip", "link", "set", "lo", "up"])
    }

    /// A veth from `a` (named `an`) to `b` (named `bn`).
    fn veth(&self, a: &str, an: &str, b: &str, bn: &str) -> anyhow::Result<()> {
        let (na, nb) = (self.ns(a), self.ns(b));
        self.sh(None, &["ip", "link", "add", an, "netns", &na, "type", "veth", "peer", "name", bn, "netns", &nb])?;
        self.sh(Some(a), &["ip", "link", "set", an, "up"])?;
        self.sh(Some(b), &["ip", "link", "set", bn, "up"])
    }

    fn spawn(&mut self, ns: &str, bin: &Path, args: &[String], log: &Path) -> anyhow::Result<usize> {
        let f = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    fn stop(&mut self, idx: usize) {
        let c = &mut self.children[idx];
        // SIGTERM first: citadel and nexus-sim close their connections on it.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let list = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
        let mine = format!("{}-", self.prefix);
        for line in String::from_utf8_lossy(&list).lines() {
            let Some(name) = line.split_whitespace().next() else { continue };
            if !name.starts_with(&mine) {
                continue;
            }
            let pids = Command::new("ip").args(["netns", "pids", name]).output().map(|o| o.stdout).unwrap_or_default();
            for pid in String::from_utf8_lossy(&pids).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Obs {
    running: bool,
    /// Its `up` answered the last status request on its local API socket.
    api: bool,
    connected: bool,
    ip: Option<String>,
    key: String,
    peers: BTreeSet<String>,
    joins: Vec<String>,
    connects: Vec<Duration>,
    /// `(when, home DERP region)` at each sample.
    homes: Vec<(Duration, i32)>,
    /// Packets received and dropped (unknown peer, filtered): earlier runs' sum, this run's.
    dropped: (u64, u64),
    /// WireGuard bytes sent, by peer node key: earlier runs' sum, this run's.
    tx: BTreeMap<String, (u64, u64)>,
}

/// Adds a sample of a counter that restarts from zero with the process to `(earlier, current)`.
fn grow(c: &mut (u64, u64), now: u64) {
    if now < c.1 {
        c.0 += c.1;
    }
    c.1 = now;
}

/// Plays `sc` with the binaries in `bin_dir`. Needs root, `ip` and `iptables`.
pub fn run(sc: &Scenario, bin_dir: &Path) -> anyhow::Result<RealOutcome> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("--real needs root (network namespaces and iptables)");
    }
    let citadel = bin_dir.join("citadel");
    let nexus = bin_dir.join("nexus-sim");
    for b in [&citadel, &nexus] {
        if !b.is_file() {
            bail!(
                "{} not found; build it with `cargo build -p citadel-cli -p nexus-sim` (or pass --bin-dir)",
                b.display()
            );
        }
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("`{tool}` is not installed");
        }
    }
    if sc.nodes.len() > 200 || sc.nats.len() > 200 {
        bail!("--real supports at most 200 nodes and 200 NATs");
    }
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let tmp = tempfile::tempdir()?;
    let mut lab = Lab { prefix: format!("hz{}", std::process::id() % 100_000), children: Vec::new() };
    let url = "http://198.18.0.1:8080".to_string();

    // Orgs and keys go into the database before the server starts.
    let db = tmp.path().join("nexus.db");
    let mut keys = BTreeMap::new();
    {
        let shared = nexus_sim::build(nexus_sim::Config { db: Some(db.clone()), ..Default::default() })?;
        for o in &sc.orgs {
            let u = shared.store.create_user(o.name.get_ref(), "").map_err(|e| anyhow::anyhow!("{e}"))?;
            let k = shared.store.create_key(u.id, true, false, None, vec![]).map_err(|e| anyhow::anyhow!("{e}"))?;
            keys.insert(o.name.get_ref().clone(), k.key);
        }
        // A tagged node joins with a key of its own carrying its tags (keyed by node name).
        for n in sc.nodes.iter().filter(|n| !n.tags.is_empty()) {
            let u = shared.store.user_by_name(n.org.get_ref()).ok_or_else(|| anyhow::anyhow!("unknown org"))?;
            let k =
                shared.store.create_key(u.id, true, false, None, n.tags.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
            keys.insert(n.name.get_ref().clone(), k.key);
        }
    }
    let policy_file = tmp.path().join("policy.hujson");
    if let Some(p) = &sc.policy {
        std::fs::write(&policy_file, crate::scenario::policy_text(p.get_ref()))?;
    }

    lab.add_ns("inet")?;
    lab.sh(Some("inet"), &["ip", "link", "add", "br0", "type", "bridge"])?;
    lab.sh(Some("inet"), &["ip", "addr", "add", "198.18.0.1/16", "dev", "br0"])?;
    // The relay is a host of its own, as in simulation: `derp_down` stops it alone and a
    // partition from Nexus leaves it reachable.
    lab.sh(Some("inet"), &["ip", "addr", "add", "198.18.0.2/16", "dev", "br0"])?;
    lab.sh(Some("inet"), &["ip", "link", "set", "br0", "up"])?;

    // NATs, upstream first.
    let idx: BTreeMap<String, usize> = sc.nats.iter().enumerate().map(|(i, n)| (n.name.get_ref().clone(), i)).collect();
    let depth = |n: &str| {
        let (mut d, mut cur) = (0, n.to_string());
        while let Some(b) = sc.nat(&cur).and_then(|x| x.behind.as_ref()) {
            cur = b.get_ref().clone();
            d += 1;
        }
        d
    };
    let mut order: Vec<&crate::scenario::NatSpec> = sc.nats.iter().collect();
    order.sort_by_key(|n| depth(n.name.get_ref()));
    let mut lan_next: BTreeMap<usize, u32> = BTreeMap::new();
    let mut lan_addr = |j: usize| {
        let k = lan_next.entry(j).or_insert(10);
        *k += 1;
        format!("198.19.{j}.{}", *k - 1)
    };
    for n in order {
        let j = idx[n.name.get_ref()];
        let ns = format!("t{j}");
        lab.add_ns(&ns)?;
        lab.sh(Some(&ns), &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let (up_ns, up_addr, gw) = match &n.behind {
            None => ("inet".to_string(), format!("198.18.1.{}/16", j + 1), "198.18.0.1".to_string()),
            Some(b) => {
                let u = idx[b.get_ref()];
                (format!("t{u}"), format!("{}/24", lan_addr(u)), format!("198.19.{u}.1"))
            }
        };
        lab.veth(&ns, "out0", &up_ns, &format!("vt{j}"))?;
        lab.sh(
            Some(&up_ns),
            &["ip", "link", "set", &format!("vt{j}"), "master", if up_ns == "inet" { "br0" } else { "lan" }],
        )?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &up_addr, "dev", "out0"])?;
        lab.sh(Some(&ns), &["ip", "route", "add", "default", "via", &gw])?;
        lab.sh(Some(&ns), &["ip", "link", "add", "lan", "type", "bridge"])?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &format!("198.19.{j}.1/24"), "dev", "lan"])?;
        lab.sh(Some(&ns), &["ip", "link", "set", "lan", "up"])?;
        let mut rule = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "out0", "-j", "MASQUERADE"];
        if n.mapping != Mapping::EndpointIndependent {
            rule.push("--random-fully");
        }
        lab.sh(Some(&ns), &rule)?;
    }

    for (i, n) in sc.nodes.iter().enumerate() {
        let ns = format!("n{i}");
        lab.add_ns(&ns)?;
        if n.network == NetworkKind::Offline {
            continue;
        }
        let (up_ns, addr, gw) = match &n.nat {
            None => {
                ("inet".to_string(), format!("198.18.{}.{}/16", 2 + i / 250, 1 + i % 250), "198.18.0.1".to_string())
            }
            Some(x) => {
                let j = idx[x.get_ref()];
                (format!("t{j}"), format!("{}/24", lan_addr(j)), format!("198.19.{j}.1"))
            }
        };
        lab.veth(&ns, "eth0", &up_ns, &format!("vn{i}"))?;
        lab.sh(
            Some(&up_ns),
            &["ip", "link", "set", &format!("vn{i}"), "master", if up_ns == "inet" { "br0" } else { "lan" }],
        )?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &addr, "dev", "eth0"])?;
        lab.sh(Some(&ns), &["ip", "route", "add", "default", "via", &gw])?;
        if n.network == NetworkKind::UdpBlocked {
            lab.sh(Some(&ns), &["iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP"])?;
        }
    }

    let derp_args: Vec<String> = ["derp", "--listen", "198.18.0.2:443", "--stun-listen", "198.18.0.2:3478"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let derp_map = tmp.path().join("derpmap.json");
    std::fs::write(
        &derp_map,
        serde_json::to_vec(&nexus_sim::embedded_derp_map(
            "198.18.0.2",
            &[(1, "198.18.0.2:443".parse().expect("literal"))],
            Some(3478),
        ))?,
    )?;
    let mut derp_child = Some(lab.spawn("inet", &nexus, &derp_args, &tmp.path().join("derp.log"))?);
    wait_port(&lab, "inet", "198.18.0.2", 443)?;
    let nexus_args: Vec<String> =
        ["serve", "--listen", "198.18.0.1:8080", "--server-url", &url, "--api-key", "nsapi-harness"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--db".to_string(), db.display().to_string()])
            .chain(["--derp-map".to_string(), derp_map.display().to_string()])
            .chain(
                sc.policy
                    .as_ref()
                    .map(|_| ["--policy".to_string(), policy_file.display().to_string()])
                    .into_iter()
                    .flatten(),
            )
            .chain(
                sc.leaks.iter().flat_map(|l| {
                    ["--fault-leak-peer".to_string(), format!("{}={}", l.into.get_ref(), l.peer.get_ref())]
                }),
            )
            .collect();
    let mut nexus_child = Some(lab.spawn("inet", &nexus, &nexus_args, &tmp.path().join("nexus.log"))?);
    wait_port(&lab, "inet", "198.18.0.1", 8080)?;

    let start = Instant::now();
    let end = sc.duration.0;
    let mut pingers = Pingers::start(sc, tmp.path(), start);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut faults: Vec<_> = sc.faults.iter().collect();
    faults.sort_by_key(|f| f.at);
    let mut faults = faults.into_iter().peekable();
    let mut pending: Vec<(Duration, usize)> = sc.nodes.iter().enumerate().map(|(i, n)| (n.start.0, i)).collect();
    pending.sort();
    pending.reverse();
    let mut node_child: BTreeMap<usize, usize> = BTreeMap::new();
    let mut ever: BTreeSet<usize> = BTreeSet::new();
    let mut respawn: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut obs: BTreeMap<String, Obs> = BTreeMap::new();
    // Identities are made up front, as in simulation, so every key a netmap lists is known:
    // a key of no scenario node counts as a leak instead of waiting to be identified.
    let mut key_to_name: BTreeMap<String, String> = BTreeMap::new();
    for n in &sc.nodes {
        let name = n.name.get_ref();
        let st = citadel::state::StateDir::open(&tmp.path().join(name))?;
        let id = st.identity(&mut rand::rngs::OsRng)?;
        key_to_name.insert(citadel::keys::NodePublic(id.node_key.public_bytes()).to_string(), name.clone());
    }
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    let mut unplayed: Option<Duration> = None;
    let mut met: Vec<Option<Duration>> = vec![None; sc.expects.len()];
    let mut violated: Vec<Option<String>> = vec![None; sc.expects.len()];
    let mut leak: Option<String> = None;
    let mut injected_seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut samples = 0u64;

    let start_node = |lab: &mut Lab, i: usize, first: bool| -> anyhow::Result<usize> {
        let n = &sc.nodes[i];
        let name = n.name.get_ref();
        let mut args = vec![
            "--state-dir".to_string(),
            tmp.path().join(name).display().to_string(),
            "up".into(),
            "--nexus".into(),
            url.clone(),
            "--hostname".into(),
            name.clone(),
        ];
        if first {
            let key = keys.get(n.name.get_ref()).unwrap_or(&keys[n.org.get_ref()]);
            args.extend(["--authkey".to_string(), key.clone()]);
        }
        lab.spawn(&format!("n{i}"), &citadel, &args, &tmp.path().join(format!("{name}.log")))
    };

    loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted; namespaces removed");
        }
        let now = start.elapsed();
        while pending.last().is_some_and(|(t, _)| *t <= now) {
            let (_, i) = pending.pop().expect("checked");
            let c = start_node(&mut lab, i, !ever.contains(&i))?;
            ever.insert(i);
            node_child.insert(i, c);
        }
        // A supervisor restarts `citadel up` 5 s after it exits (a failed first join exits),
        // as the simulation's node host does.
        for (&i, &c) in node_child.iter() {
            if respawn.contains_key(&i) {
                continue;
            }
            if let Ok(Some(code)) = lab.children[c].try_wait() {
                timeline.push((now, format!("{} exited ({code}); restarting in 5s", sc.nodes[i].name.get_ref())));
                respawn.insert(i, now + Duration::from_secs(5));
            }
        }
        let due: Vec<usize> = respawn.iter().filter(|(_, t)| **t <= now).map(|(i, _)| *i).collect();
        for i in due {
            respawn.remove(&i);
            if let Some(slot) = node_child.get_mut(&i) {
                let joined = obs.get(sc.nodes[i].name.get_ref()).is_some_and(|o| !o.joins.is_empty());
                *slot = start_node(&mut lab, i, !joined)?;
            }
        }
        while faults.peek().is_some_and(|f| f.at.0 <= now) {
            let f = faults.next().expect("checked");
            let node_idx = f.node.as_ref().and_then(|n| sc.nodes.iter().position(|x| x.name.get_ref() == n.get_ref()));
            let desc = match (f.kind.get_ref(), node_idx) {
                (FaultKind::DerpDown, _) if f.region.is_none() => {
                    if let Some(c) = derp_child.take() {
                        lab.stop(c);
                    }
                    "derp down".to_string()
                }
                (FaultKind::DerpUp, _) if f.region.is_none() => {
                    if derp_child.is_none() {
                        derp_child = Some(lab.spawn("inet", &nexus, &derp_args, &tmp.path().join("derp.log"))?);
                    }
                    "derp up".to_string()
                }
                (kind @ (FaultKind::Partition | FaultKind::Heal | FaultKind::Hold | FaultKind::Release), _) => {
                    let (a, b) = (
                        f.a.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default(),
                        f.b.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default(),
                    );
                    let cut = matches!(kind, FaultKind::Partition | FaultKind::Hold);
                    match cut_rules(sc, &a, &b) {
                        Some(rules) => {
                            for (ns, peer) in rules {
                                let op = if cut { "-I" } else { "-D" };
                                for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                                    // Healing what was never cut fails harmlessly.
                                    let r = lab.sh(Some(&ns), &["iptables", op, chain, dir, &peer, "-j", "DROP"]);
                                    if cut {
                                        r?;
                                    }
                                }
                            }
                            // A hold is a blackhole that TCP rides out by retransmitting: the
                            // kernel's analogue of turmoil queueing the messages.
                            format!("{} {a} | {b}", format!("{kind:?}").to_lowercase())
                        }
                        None => {
                            unplayed.get_or_insert(f.at.0);
                            format!("{kind:?} {a} | {b} (not played in --real: only nodes against nexus, derp or public nodes)")
                        }
                    }
                }
                (FaultKind::NexusDown, _) => {
                    if let Some(c) = nexus_child.take() {
                        lab.stop(c);
                    }
                    "nexus down".to_string()
                }
                (FaultKind::NexusUp | FaultKind::NexusRestart, _) => {
                    if let Some(c) = nexus_child.take() {
                        lab.stop(c);
                    }
                    nexus_child = Some(lab.spawn("inet", &nexus, &nexus_args, &tmp.path().join("nexus.log"))?);
                    "nexus (re)started".into()
                }
                (FaultKind::Restart, Some(i)) => {
                    respawn.remove(&i);
                    if let Some(c) = node_child.remove(&i) {
                        lab.stop(c);
                        node_child.insert(i, start_node(&mut lab, i, false)?);
                    }
                    format!("restart node {}", sc.nodes[i].name.get_ref())
                }
                (FaultKind::Stop, Some(i)) => {
                    respawn.remove(&i);
                    if let Some(c) = node_child.remove(&i) {
                        lab.stop(c);
                    }
                    obs.entry(sc.nodes[i].name.get_ref().clone()).or_default().running = false;
                    format!("stop node {}", sc.nodes[i].name.get_ref())
                }
                (FaultKind::Start, Some(i)) => {
                    if let std::collections::btree_map::Entry::Vacant(slot) = node_child.entry(i) {
                        slot.insert(start_node(&mut lab, i, !ever.contains(&i))?);
                        ever.insert(i);
                        pending.retain(|(_, p)| *p != i);
                    }
                    format!("start node {}", sc.nodes[i].name.get_ref())
                }
                (k, _) => {
                    unplayed.get_or_insert(f.at.0);
                    format!("{k:?} (not played in --real)")
                }
            };
            timeline.push((now, format!("fault: {desc}")));
        }
        // Sample every node's status.
        samples += 1;
        pingers.publish(&obs, &node_child, sc);
        for (i, n) in sc.nodes.iter().enumerate() {
            let name = n.name.get_ref();
            let o = obs.entry(name.clone()).or_default();
            o.running = node_child.contains_key(&i);
            let st = o.running.then(|| status(&rt, &tmp.path().join(name))).flatten();
            let connected = st.as_ref().is_some_and(|s| s.connected);
            o.api = st.is_some();
            if connected && !o.connected {
                o.connects.push(now);
                if let Some(s) = &st {
                    o.joins.push(s.ipv4.clone().unwrap_or_default());
                }
            }
            o.connected = connected;
            if let Some(s) = st {
                o.ip = s.ipv4.clone();
                o.key = s.node_key.clone();
                key_to_name.insert(s.node_key.clone(), name.clone());
                o.peers = s.peers.iter().map(|p| p.node_key.clone()).collect();
                o.homes.push((now, s.home_derp));
                if let Some(c) = &s.counters {
                    grow(&mut o.dropped, c.rx_unknown_peer + c.rx_filtered);
                }
                for p in &s.peers {
                    grow(o.tx.entry(p.node_key.clone()).or_default(), p.tx_bytes);
                }
            }
        }
        let vis = |o: &Obs| -> BTreeSet<String> {
            o.peers.iter().map(|k| key_to_name.get(k).cloned().unwrap_or_else(|| format!("?{k}"))).collect()
        };
        for n in &sc.nodes {
            let o = &obs[n.name.get_ref()];
            for p in vis(o) {
                let porg = sc.node(&p).map(|x| x.org.get_ref().as_str()).unwrap_or("?");
                if porg != n.org.get_ref() && sc.leaks_into(n.name.get_ref(), &p) {
                    injected_seen.insert((n.name.get_ref().clone(), p.clone()));
                } else if porg != n.org.get_ref() && leak.is_none() && sc.policy.is_none() {
                    leak = Some(format!(
                        "at {}: {} ({}) lists {p} ({porg})",
                        fmt_t(now),
                        n.name.get_ref(),
                        n.org.get_ref()
                    ));
                }
            }
        }
        for (k, e) in sc.expects.iter().enumerate() {
            let by = e.by.map(|b| b.0).unwrap_or(end);
            let in_window = now >= e.after.0 && now <= by;
            let Some(node) = e.node.as_ref().map(|n| n.get_ref()) else { continue };
            let o = &obs[node];
            match e.kind.get_ref() {
                ExpectKind::Sees => {
                    let live = o.running && (o.connected || !e.exact);
                    if in_window && live && met[k].is_none() && crate::world::lists(e, &vis(o)) {
                        met[k] = Some(now);
                    }
                }
                ExpectKind::Throughout if in_window => {
                    met[k].get_or_insert(now);
                    if violated[k].is_none() && !(o.running && crate::world::lists(e, &vis(o))) {
                        violated[k] = Some(format!(
                            "{node} saw {{{}}} at {}",
                            vis(o).into_iter().collect::<Vec<_>>().join(", "),
                            fmt_t(now)
                        ));
                    }
                }
                ExpectKind::NeverSees => {
                    let v = vis(o);
                    if violated[k].is_none() && e.peers.iter().any(|p| v.contains(p.get_ref())) {
                        violated[k] = Some(format!("listed a forbidden peer at {}", fmt_t(now)));
                    }
                }
                ExpectKind::Connected if in_window && violated[k].is_none() && !o.connected => {
                    violated[k] = Some(format!("not connected at {}", fmt_t(now)));
                }
                _ => {}
            }
        }
        if now >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    pingers.stop();
    let mut verdicts = Vec::new();
    for (k, e) in sc.expects.iter().enumerate() {
        let by = e.by.map(|b| b.0).unwrap_or(end);
        let desc = crate::report::describe(e, end);
        let node = e.node.as_ref().map(|n| n.get_ref().clone()).unwrap_or_default();
        let o = obs.get(&node).cloned().unwrap_or_default();
        let v = if unplayed.is_some_and(|u| u <= by) {
            Verdict::NotEvaluated("a fault before its deadline is not played in --real".into())
        } else {
            match e.kind.get_ref() {
                ExpectKind::Sees => match met[k] {
                    Some(_) => Verdict::Pass,
                    None => {
                        let names: Vec<String> =
                            o.peers.iter().map(|k| key_to_name.get(k).cloned().unwrap_or_else(|| "?".into())).collect();
                        Verdict::Fail(format!("{node} saw {{{}}} at the end", names.join(", ")))
                    }
                },
                ExpectKind::Throughout => match (met[k], &violated[k]) {
                    (None, _) => Verdict::Fail("no sample in the window".into()),
                    (Some(_), None) => Verdict::Pass,
                    (Some(_), Some(w)) => Verdict::Fail(w.clone()),
                },
                ExpectKind::NeverSees | ExpectKind::Connected => match &violated[k] {
                    None => Verdict::Pass,
                    Some(w) => Verdict::Fail(w.clone()),
                },
                ExpectKind::Reconnects => {
                    if o.connects.iter().any(|t| *t > e.after.0 && *t <= by) {
                        Verdict::Pass
                    } else {
                        Verdict::Fail("no reconnect in the window".into())
                    }
                }
                ExpectKind::SameIpAfterRestart => {
                    let d: BTreeSet<_> = o.joins.iter().collect();
                    if o.joins.len() >= 2 && d.len() == 1 {
                        Verdict::Pass
                    } else {
                        Verdict::Fail(format!("joins: {:?}", o.joins))
                    }
                }
                ExpectKind::HomeDerp => match e.region.as_ref().map(|r| r.get_ref().as_str()) {
                    Some("default") => match o.homes.iter().rev().find(|(t, _)| *t <= by) {
                        Some((_, 1)) => Verdict::Pass,
                        Some((_, h)) => Verdict::Fail(format!("home was region {h}")),
                        None => Verdict::Fail("no home region seen".into()),
                    },
                    _ => Verdict::NotEvaluated("--real has nexus-sim's one DERP region only".into()),
                },
                ExpectKind::UdpPath | ExpectKind::Reaches => {
                    let (a, b) = (e.a.as_ref().expect("validated").get_ref(), e.ping_target().expect("validated"));
                    // A ping the local API could not make proves nothing either way.
                    match pingers.failures(a, &b).into_iter().find(|(t, _)| *t >= e.after.0 && *t <= by) {
                        Some((t, why)) => Verdict::Fail(format!("ping not measured at {}: {why}", fmt_t(t))),
                        None => {
                            let v = crate::world::judge_pings(e, &pingers.results(a, &b), by);
                            if v == Verdict::Pass
                                && e.path == Some(crate::probe::PathKind::None)
                                && sc.leaks_into(a, &b)
                            {
                                judge_at_receiver(&obs, a, &b)
                            } else {
                                v
                            }
                        }
                    }
                }
            }
        };
        verdicts.push((desc, v));
    }
    for l in &sc.leaks {
        let (into, peer) = (l.into.get_ref(), l.peer.get_ref());
        let v = if injected_seen.contains(&(into.clone(), peer.clone())) {
            Verdict::Pass
        } else {
            Verdict::Fail("the entry never appeared in the netmap".into())
        };
        verdicts.push((format!("injected: {into}'s netmap lists {peer} (another org's node)"), v));
    }
    let mut report = format!(
        "real run of {} ({} namespaces prefixed {}-):\n",
        sc.name,
        1 + sc.nats.len() + sc.nodes.len(),
        lab.prefix
    );
    for (t, d) in &timeline {
        let _ = writeln!(report, "  {:>10}  {d}", fmt_t(*t));
    }
    for (d, v) in &verdicts {
        let _ = match v {
            Verdict::Pass => writeln!(report, "  PASS           {d}"),
            Verdict::Fail(w) => writeln!(report, "  FAIL           {d}: {w}"),
            Verdict::NotEvaluated(w) => writeln!(report, "  NOT EVALUATED  {d}: {w}"),
        };
    }
    let _ = match &leak {
        None if sc.policy.is_some() => {
            writeln!(report, "  (org isolation not checked: the scenario sets its own policy)")
        }
        None => writeln!(report, "  PASS           no node ever listed a node of another org ({samples} samples)"),
        Some(l) => writeln!(report, "  FAIL           org isolation: {l}"),
    };
    let passed = leak.is_none() && !verdicts.iter().any(|(_, v)| matches!(v, Verdict::Fail(_)));
    drop(lab);
    Ok(RealOutcome { report, verdicts, passed })
}

/// As the simulation judges it: when Nexus leaked `b` into `a`'s map, `a` really sent
/// WireGuard bytes to `b` and `b` received and dropped packets.
fn judge_at_receiver(obs: &BTreeMap<String, Obs>, a: &str, b: &str) -> Verdict {
    let (Some(oa), Some(ob)) = (obs.get(a), obs.get(b)) else {
        return Verdict::Fail(format!("{a} or {b} never ran"));
    };
    let sent = oa.tx.get(&ob.key).map_or(0, |c| c.0 + c.1);
    let dropped = ob.dropped.0 + ob.dropped.1;
    if sent == 0 {
        Verdict::Fail(format!("{a} sent no WireGuard bytes to {b}: the leak was not exercised"))
    } else if dropped == 0 {
        Verdict::Fail(format!("{a} sent {sent} WireGuard bytes to {b}, but {b} dropped nothing"))
    } else {
        Verdict::Pass
    }
}

/// The running `up`'s status over its local API socket; `None` when none answers. (`citadel
/// status` is not used: with no `up` listening it would join by itself and hold the state lock
/// just when a restarted `up` needs it.)
fn status(rt: &tokio::runtime::Runtime, state_dir: &Path) -> Option<citadel::mesh::Status> {
    let r = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), citadel::api::call(state_dir, &citadel::api::Request::Status))
            .await
    });
    match r {
        Ok(Ok(Some(citadel::api::Response::Status(s)))) => Some(s),
        _ => None,
    }
}

fn wait_port(lab: &Lab, ns: &str, ip: &str, port: u16) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
        if lab.sh(Some(ns), &["bash", "-c", &probe]).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nexus-sim did not listen on {ip}:{port} within 10s")
}

/// Lines where the simulation and the real run disagree.
pub fn compare(sim: &crate::world::Outcome, real: &RealOutcome) -> String {
    let mut s = String::from("sim vs real:\n");
    let mut differ = 0;
    for ((d, a), (_, b)) in sim.verdicts.iter().zip(&real.verdicts) {
        let tag = |v: &Verdict| match v {
            Verdict::Pass => "pass",
            Verdict::Fail(_) => "fail",
            Verdict::NotEvaluated(_) => "not evaluated",
        };
        if matches!(a, Verdict::NotEvaluated(_)) || matches!(b, Verdict::NotEvaluated(_)) {
            continue;
        }
        if tag(a) != tag(b) {
            differ += 1;
            let _ = writeln!(s, "  DIFFERS  {d}: sim {}, real {}", tag(a), tag(b));
        }
    }
    if sim.leak.is_some() != real.report.contains("FAIL           org isolation") {
        differ += 1;
        let _ = writeln!(s, "  DIFFERS  org isolation");
    }
    let _ = writeln!(s, "  {differ} difference(s) among verdicts evaluated on both sides");
    s
}

/// Node → (the process id of its `up` while that answers on its local API socket, its mesh
/// IPv4).
type NodeAddrs = BTreeMap<String, (Option<usize>, Option<String>)>;

/// Mesh ping results by `(from, to)`.
type PingLog = Arc<Mutex<BTreeMap<(String, String), Vec<crate::world::PingResult>>>>;

/// Pings the local API could not make, by `(from, to)`: when, and its error.
type FailLog = Arc<Mutex<BTreeMap<(String, String), Vec<(Duration, String)>>>>;

/// Mesh pings in `--real`: one thread per `udp_path`/`reaches` pair asks the pinging node's
/// running `up` to ping once a second (through its local API socket, so from the root
/// namespace) and records which path answered, as the simulation's mesh probe does.
struct Pingers {
    /// Node → (its `up` runs, its mesh IPv4), refreshed by the sampling loop.
    nodes: Arc<Mutex<NodeAddrs>>,
    results: PingLog,
    failures: FailLog,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pingers {
    fn start(sc: &Scenario, state_root: &Path, t0: Instant) -> Pingers {
        let nodes: Arc<Mutex<NodeAddrs>> = Arc::new(Mutex::new(BTreeMap::new()));
        let results: PingLog = Arc::default();
        let failures: FailLog = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let pairs: BTreeSet<(String, String)> = sc
            .expects
            .iter()
            .filter(|e| matches!(e.kind.get_ref(), ExpectKind::UdpPath | ExpectKind::Reaches))
            .filter_map(|e| Some((e.a.as_ref()?.get_ref().clone(), e.ping_target()?)))
            .collect();
        let threads = pairs
            .into_iter()
            .map(|(a, b)| {
                let (nodes, results, failures, stop) = (nodes.clone(), results.clone(), failures.clone(), stop.clone());
                let dir = state_root.join(&a);
                std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                    while !stop.load(Ordering::SeqCst) && !INTERRUPTED.load(Ordering::SeqCst) {
                        let tick = Instant::now();
                        // `b` is a node name, or `name:port` for a ping on another port.
                        let (bn, port) = match b.split_once(':') {
                            Some((n, p)) => (n, p.parse().unwrap_or(crate::probe::PING_PORT)),
                            None => (b.as_str(), crate::probe::PING_PORT),
                        };
                        let up_of = |a: &str| nodes.lock().unwrap().get(a).and_then(|x| x.0);
                        let target = up_of(&a).zip(nodes.lock().unwrap().get(bn).and_then(|x| x.1.clone()));
                        if let Some((up, ip)) = target {
                            let key = (a.clone(), b.clone());
                            match ping_once(&rt, &dir, &ip, port) {
                                Ok(r) => results.lock().unwrap().entry(key).or_default().push((t0.elapsed(), r)),
                                // The harness stopped or restarted that `up` meanwhile: no ping.
                                Err(_) if up_of(&a) != Some(up) => {}
                                Err(why) => failures.lock().unwrap().entry(key).or_default().push((t0.elapsed(), why)),
                            }
                        }
                        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
                    }
                })
            })
            .collect();
        Pingers { nodes, results, failures, stop, threads }
    }

    /// Hands the pingers what the last sample saw.
    fn publish(&self, obs: &BTreeMap<String, Obs>, running: &BTreeMap<usize, usize>, sc: &Scenario) {
        let mut n = self.nodes.lock().unwrap();
        for (i, node) in sc.nodes.iter().enumerate() {
            let name = node.name.get_ref();
            let o = obs.get(name);
            let ip = o.and_then(|o| o.ip.clone());
            let up = running.get(&i).copied().filter(|_| o.is_some_and(|o| o.api));
            n.insert(name.clone(), (up, ip));
        }
    }

    fn results(&self, a: &str, b: &str) -> Vec<crate::world::PingResult> {
        self.results.lock().unwrap().get(&(a.to_string(), b.to_string())).cloned().unwrap_or_default()
    }

    fn failures(&self, a: &str, b: &str) -> Vec<(Duration, String)> {
        self.failures.lock().unwrap().get(&(a.to_string(), b.to_string())).cloned().unwrap_or_default()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pingers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One ping through the node's running `up`, over its local API socket (2 s bound, as in
/// simulation): `Ok(path)` when it answered, `Ok(None)` when the mesh timed it out or has no
/// route to the peer, `Err` when the local API could not make it (no socket, node stopping,
/// unknown peer, ...).
/// `citadel ping` is not used: with no `up` listening it would start a node of its own on the
/// state directory and hold its lock.
fn ping_once(
    rt: &tokio::runtime::Runtime,
    state_dir: &Path,
    ip: &str,
    port: u16,
) -> Result<Option<crate::probe::PathKind>, String> {
    let req = citadel::api::Request::Ping { peer: ip.to_string(), port, timeout_ms: 2000 };
    let r =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(4), citadel::api::call(state_dir, &req)).await });
    match r {
        Ok(Ok(Some(citadel::api::Response::Pong(p)))) => Ok(Some(crate::probe::path_kind(p.path.as_deref()))),
        // The data plane's own answers: the ping went out and nothing came back, or the
        // node has no route to that address (not in its netmap), as the simulation counts them.
        Ok(Ok(Some(citadel::api::Response::Error { message })))
            if message.contains(PING_TIMED_OUT) || message.contains(PING_NO_ROUTE) =>
        {
            Ok(None)
        }
        Ok(Ok(Some(citadel::api::Response::Error { message }))) => Err(message),
        Ok(Ok(Some(other))) => Err(format!("unexpected answer {other:?}")),
        Ok(Ok(None)) => Err("no `up` answers on the local API socket".into()),
        Ok(Err(e)) => Err(format!("local API: {e}")),
        Err(_) => Err("the local API did not answer within 4s".into()),
    }
}

/// What [`citadel::dataplane::DataPlane::dial_tcp_timeout`] says when no answer came in time.
const PING_TIMED_OUT: &str = "no answer within";
/// What it says when no peer in the node's netmap routes the address.
const PING_NO_ROUTE: &str = "no mesh peer routes";

/// The iptables cuts that separate `a` from `b` (hosts or orgs), as `(node namespace, address
/// to drop)`: a node against `nexus` (198.18.0.1), `derp` (198.18.0.2) or a node on the
/// public network. `None` when the pair involves something else (a NAT host, a NATed node's
/// public side), which the real topology cannot cut the way the simulation does.
fn cut_rules(sc: &Scenario, a: &str, b: &str) -> Option<Vec<(String, String)>> {
    let expand = |x: &str| -> Vec<String> {
        if sc.orgs.iter().any(|o| o.name.get_ref() == x) {
            sc.nodes.iter().filter(|n| n.org.get_ref() == x).map(|n| n.name.get_ref().clone()).collect()
        } else {
            vec![x.to_string()]
        }
    };
    let node_ns = |n: &str| sc.nodes.iter().position(|x| x.name.get_ref() == n).map(|i| format!("n{i}"));
    let public_addr = |n: &str| {
        let i = sc.nodes.iter().position(|x| x.name.get_ref() == n)?;
        sc.nodes[i].nat.is_none().then(|| format!("198.18.{}.{}", 2 + i / 250, 1 + i % 250))
    };
    let fixed = |x: &str| match x {
        "nexus" => Some("198.18.0.1".to_string()),
        "derp" => Some("198.18.0.2".to_string()),
        _ => None,
    };
    let mut rules = Vec::new();
    for x in expand(a) {
        for y in expand(b) {
            if x == y {
                continue;
            }
            match (node_ns(&x), node_ns(&y)) {
                (Some(ns), None) => rules.push((ns, fixed(&y)?)),
                (None, Some(ns)) => rules.push((ns, fixed(&x)?)),
                (Some(nx), Some(ny)) => {
                    rules.push((nx, public_addr(&y)?));
                    rules.push((ny, public_addr(&x)?));
                }
                (None, None) => return None,
            }
        }
    }
    Some(rules)
}
