//! Rendering: the deterministic trace (timeline of faults and checkpoints, verdicts,
//! visibility matrix, paths) and the observed event log.

use crate::nat::{Filtering, Mapping};
use crate::nat_host::NatStats;
use crate::probe::PathKind;
use crate::scenario::{Dur, ExpectKind, ExpectSpec, Scenario};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::Duration;

/// The outcome of one expectation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Held.
    Pass,
    /// Did not hold, with why.
    Fail(String),
    /// Could not be evaluated, with why (never counted as passed).
    NotEvaluated(String),
}

/// One node's line at a checkpoint.
#[derive(Debug, Clone)]
pub struct NodeLine {
    /// Node.
    pub name: String,
    /// Org.
    pub org: String,
    /// Mesh IPv4.
    pub ip: Option<String>,
    /// `up`, `down` or `stopped`.
    pub state: &'static str,
    /// Names in its netmap.
    pub sees: Vec<String>,
}

/// State of every node at one simulated instant.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// When.
    pub at: Duration,
    /// Nodes.
    pub nodes: Vec<NodeLine>,
}

/// Everything [`trace`] renders.
#[derive(Debug)]
pub struct TraceInput<'a> {
    /// The scenario.
    pub sc: &'a Scenario,
    /// Seed used.
    pub seed: u64,
    /// Faults and late starts.
    pub timeline: &'a [(Duration, String)],
    /// Checkpoints.
    pub checkpoints: &'a [Checkpoint],
    /// Verdicts.
    pub verdicts: &'a [(String, Verdict)],
    /// First org leak.
    pub leak: Option<&'a str>,
    /// Samples taken.
    pub samples: u64,
    /// Final visibility.
    pub visibility: &'a BTreeMap<String, BTreeSet<String>>,
    /// Mesh paths at each `udp_path` deadline.
    pub paths: &'a BTreeMap<(String, String), PathKind>,
    /// Mesh pings per pinged pair: when each ended and which path answered.
    pub pings: &'a BTreeMap<(String, String), Vec<PingResult>>,
}

/// One mesh ping: when it ended and which path answered (`None`: no answer).
pub type PingResult = (Duration, Option<PathKind>);

/// Simulated time as `12.345s`.
pub fn fmt_t(d: Duration) -> String {
    format!("{}.{:03}s", d.as_secs(), d.subsec_millis())
}

/// `EIM`, `ADM`, `APDM`.
pub fn short_mapping(m: Mapping) -> &'static str {
    match m {
        Mapping::EndpointIndependent => "EIM",
        Mapping::AddressDependent => "ADM",
        Mapping::AddressAndPortDependent => "APDM",
    }
}

/// `EIF`, `ADF`, `APDF`.
pub fn short_filtering(f: Filtering) -> &'static str {
    match f {
        Filtering::EndpointIndependent => "EIF",
        Filtering::AddressDependent => "ADF",
        Filtering::AddressAndPortDependent => "APDF",
    }
}

/// One line describing an expectation.
pub fn describe(e: &ExpectSpec, end: Duration) -> String {
    let by = e.by.unwrap_or(Dur(end));
    let node = e.node.as_ref().map(|n| n.get_ref().as_str()).unwrap_or_default();
    let peers = e.peers.iter().map(|p| p.get_ref().as_str()).collect::<Vec<_>>().join(", ");
    let window = if e.after.0.is_zero() { format!("by {by}") } else { format!("in [{}, {by}]", e.after) };
    let a = e.a.as_ref().map(|x| x.get_ref().as_str()).unwrap_or_default();
    // `b`, or `b:port` for a ping on another port.
    let b_target = e.ping_target().unwrap_or_default();
    let b = b_target.as_str();
    let path = e.path.map(|p| p.to_string()).unwrap_or_default();
    match e.kind.get_ref() {
        ExpectKind::Sees if e.exact => format!("{node} sees exactly {{{peers}}} {window}"),
        ExpectKind::Sees => format!("{node} sees {{{peers}}} {window}"),
        ExpectKind::NeverSees => format!("{node} never sees {{{peers}}}"),
        ExpectKind::Throughout if e.exact => {
            format!("{node} sees exactly {{{peers}}} throughout [{}, {by}]", e.after)
        }
        ExpectKind::Throughout => format!("{node} sees {{{peers}}} throughout [{}, {by}]", e.after),
        ExpectKind::SameIpAfterRestart => format!("{node} keeps its IP and key across restarts"),
        ExpectKind::Reconnects => format!("{node} reconnects {}", window.replace('[', "(")),
        ExpectKind::Connected => format!("{node} stays connected throughout [{}, {by}]", e.after),
        ExpectKind::HomeDerp => format!(
            "{node} homes on DERP region {} at {by}",
            e.region.as_ref().map(|r| r.get_ref().as_str()).unwrap_or_default()
        ),
        ExpectKind::UdpPath => format!("path {a} -> {b} is {path} at {by} (mesh)"),
        ExpectKind::Reaches if path == "none" => format!("{a} never reaches {b} {window} (mesh)"),
        ExpectKind::Reaches => format!("{a} reaches {b} via {path} {window} (mesh)"),
    }
}

/// The deterministic trace.
pub fn trace(t: &TraceInput<'_>) -> String {
    let sc = t.sc;
    let mut s = String::new();
    let _ = writeln!(s, "scenario {} (seed {}, {} simulated, tick {})", sc.name, t.seed, sc.duration, sc.net.tick);
    let orgs: Vec<String> = sc
        .orgs
        .iter()
        .map(|o| {
            format!("{}({})", o.name.get_ref(), sc.nodes.iter().filter(|n| n.org.get_ref() == o.name.get_ref()).count())
        })
        .collect();
    let _ = writeln!(s, "orgs: {}", orgs.join(" "));
    for n in &sc.nats {
        let _ = writeln!(
            s,
            "nat {}: {}/{} hairpin {} timeout {} ports {:?}{}{}",
            n.name.get_ref(),
            short_mapping(n.mapping),
            short_filtering(n.filtering),
            if n.hairpin { "on" } else { "off" },
            n.timeout,
            n.ports,
            if n.unsolicited == crate::nat::Unsolicited::Remap { " unsolicited remap" } else { "" },
            n.behind.as_ref().map(|b| format!(" behind {}", b.get_ref())).unwrap_or_default()
        );
    }
    let _ = writeln!(s, "\ntimeline (simulated time):");
    let mut items: Vec<(Duration, u8, String)> =
        t.timeline.iter().map(|(d, e)| (*d, 1, format!("fault: {e}"))).collect();
    for c in t.checkpoints {
        let mut body = String::from("checkpoint");
        for n in &c.nodes {
            let _ = write!(
                body,
                "\n            {:<10} {:<8} {:<15} {:<7} sees [{}]",
                n.name,
                n.org,
                n.ip.as_deref().unwrap_or("-"),
                n.state,
                n.sees.join(" ")
            );
        }
        items.push((c.at, 0, body));
    }
    items.sort_by_key(|a| (a.0, a.1));
    for (d, _, e) in items {
        let _ = writeln!(s, "  {:>10}  {e}", fmt_t(d));
    }
    let _ = writeln!(s, "\nexpectations:");
    for (d, v) in t.verdicts {
        let _ = match v {
            Verdict::Pass => writeln!(s, "  PASS           {d}"),
            Verdict::Fail(why) => writeln!(s, "  FAIL           {d}: {why}"),
            Verdict::NotEvaluated(why) => writeln!(s, "  NOT EVALUATED  {d}: {why}"),
        };
    }
    let _ = match t.leak {
        None if t.sc.policy.is_some() => writeln!(s, "  (org isolation not checked: the scenario sets its own policy)"),
        None => writeln!(s, "  PASS           no node ever listed a node of another org ({} samples)", t.samples),
        Some(l) => writeln!(s, "  FAIL           org isolation: {l}"),
    };
    let names: Vec<&String> = t.visibility.keys().collect();
    if !names.is_empty() {
        let w = names.iter().map(|n| n.len()).max().unwrap_or(1).max(2);
        let _ = writeln!(s, "\nvisibility at end (row lists column in its netmap):");
        let _ = write!(s, "  {:w$}", "");
        for n in &names {
            let _ = write!(s, " {n:>w$}");
        }
        let _ = writeln!(s);
        for r in &names {
            let _ = write!(s, "  {r:w$}");
            for c in &names {
                let mark = if r == c {
                    "-"
                } else if t.visibility[*r].contains(*c) {
                    "x"
                } else {
                    "."
                };
                let _ = write!(s, " {mark:>w$}");
            }
            let _ = writeln!(s);
        }
    }
    if !t.paths.is_empty() {
        let _ = writeln!(s, "\npaths (the mesh's, from the last ping by each deadline):");
        for ((a, b), p) in t.paths {
            let _ = writeln!(s, "  {a} <-> {b}: {p}");
        }
    }
    if !t.pings.is_empty() {
        let _ = writeln!(s, "\nreachability (mesh pings once a second; the paths that answered, in order):");
        for ((a, b), rs) in t.pings {
            let mut seq: Vec<&str> = Vec::new();
            for (_, p) in rs {
                let w = match p {
                    Some(PathKind::Direct) => "direct",
                    Some(PathKind::Relay) => "relay",
                    Some(PathKind::None) | None => "no answer",
                };
                if seq.last() != Some(&w) {
                    seq.push(w);
                }
            }
            let _ = writeln!(s, "  {a} -> {b}: {}", seq.join(", "));
        }
    }
    let (pass, fail, ne) = t.verdicts.iter().fold((0, 0, 0), |(p, f, n), (_, v)| match v {
        Verdict::Pass => (p + 1, f, n),
        Verdict::Fail(_) => (p, f + 1, n),
        Verdict::NotEvaluated(_) => (p, f, n + 1),
    });
    let fail = fail + usize::from(t.leak.is_some());
    let pass = pass + usize::from(t.leak.is_none() && t.sc.policy.is_none());
    let _ = writeln!(
        s,
        "\nresult: {} ({pass} passed, {fail} failed, {ne} not evaluated)",
        if fail == 0 { "PASS" } else { "FAIL" }
    );
    s
}

/// The observed event log (exact simulated times) and NAT counters.
pub fn observed(events: &[(Duration, String)], nats: &[(String, NatStats)]) -> String {
    let mut s = String::from(
        "observed events (exact simulated times; citadel's reconnect jitter reads the OS RNG, so these may vary):\n",
    );
    for (t, e) in events {
        let _ = writeln!(s, "  {:>10}  {e}", fmt_t(*t));
    }
    if !nats.is_empty() {
        let _ = writeln!(s, "nat counters:");
        for (n, st) in nats {
            let drops: Vec<String> = st.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "  {n}: out {} in {} hairpin {} dropped [{}]",
                st.out,
                st.inbound,
                st.hairpin,
                drops.join(" ")
            );
        }
    }
    s
}
