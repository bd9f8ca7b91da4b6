//! Org isolation with real packets. In random worlds (orgs, NATs, faults) Nexus's fault hook
//! leaks the receiver `r0` (org0) into the netmap of the sender `s0` (org1), so `s0`'s mesh
//! pings of `r0` leave as real WireGuard packets. Each case checks that:
//! - the leak detector sees exactly that injected entry and nothing else;
//! - the receiver got the packets and dropped them (`rx_unknown_peer` / `rx_filtered`), its
//!   listener never accepted a connection from another org, and no cross-org ping was answered;
//! - the sender really sent them (WireGuard bytes to `r0`);
//! - the world is alive: `r0` and `r1` (same org) list each other and answer each other's pings.
//!
//! Cases: `PROPTEST_CASES` (default 64).

use citadel::mesh::Mesh;
use harness::probe::{path_kind, NodeProbe, PathKind, ProbeFactory};
use harness::scenario::Scenario;
use harness::world::{self, RunOptions};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Port every probed node listens on; mesh pings dial it, so an answer is an accept.
const LISTEN_PORT: u16 = 7000;

/// What the probes saw: every mesh started (by host name) and every accepted connection.
#[derive(Default)]
struct Recorder {
    meshes: Mutex<Vec<(String, Arc<Mesh>)>>,
    /// `(listening node, source IP)`.
    accepts: Mutex<Vec<(String, IpAddr)>>,
}

/// Pings by dialing [`LISTEN_PORT`] through the mesh.
struct ListenerProbe(Arc<Mesh>);

impl NodeProbe for ListenerProbe {
    fn ping(&self, peer: Ipv4Addr, timeout: Duration) -> citadel::net::BoxFuture<'_, Option<PathKind>> {
        Box::pin(async move {
            let pong = self.0.ping(peer.into(), LISTEN_PORT, timeout).await.ok()?;
            Some(path_kind(pong.path.as_deref()))
        })
    }
}

fn recording_probe(rec: Arc<Recorder>) -> ProbeFactory {
    Arc::new(move |mesh: Arc<Mesh>| {
        let name = mesh.status().hostname;
        rec.meshes.lock().unwrap().push((name.clone(), mesh.clone()));
        if let Ok(l) = mesh.listen_tcp(LISTEN_PORT) {
            let rec = rec.clone();
            tokio::spawn(async move {
                while let Ok((_conn, from)) = l.accept().await {
                    rec.accepts.lock().unwrap().push((name.clone(), from.ip()));
                }
            });
        }
        Arc::new(ListenerProbe(mesh)) as Arc<dyn NodeProbe>
    })
}

const NATS: [&str; 3] = ["endpoint_independent", "address_dependent", "address_and_port_dependent"];

/// `nat % 5`: behind NAT 0-2, UDP blocked (3) or public (4).
fn node_toml(name: &str, org: usize, nat: usize, start: u64) -> String {
    let mut s = format!("[[node]]\nname = \"{name}\"\norg = \"org{org}\"\n");
    match nat % 5 {
        0..=2 => s += &format!("nat = \"nat{}\"\n", nat % 5),
        3 => s += "network = \"udp_blocked\"\n",
        _ => {}
    }
    if start > 0 {
        s += &format!("start = \"{start}s\"\n");
    }
    s
}

/// The world: `r0`, `r1` in org0 and `s0` in org1 (started once `r0` has reported its
/// endpoints, so the leaked entry carries them), plus extra nodes `x*` in any org. Faults
/// never touch `r0` or `s0`, so every unknown-key drop at `r0` comes from `s0`.
fn world_toml(
    orgs: usize,
    base_nats: [usize; 3],
    extra: &[(usize, usize)],
    faults: &[(u8, u64, usize)],
    seed: u64,
) -> String {
    let mut s = format!("seed = {seed}\nduration = \"16s\"\n[net]\ntick = \"5ms\"\n");
    for o in 0..orgs {
        s += &format!("[[org]]\nname = \"org{o}\"\n");
    }
    for (i, m) in NATS.iter().enumerate() {
        s += &format!("[[nat]]\nname = \"nat{i}\"\nmapping = \"{m}\"\nfiltering = \"{m}\"\n");
    }
    s += &node_toml("r0", 0, base_nats[0], 0);
    s += &node_toml("r1", 0, base_nats[1], 0);
    // The sender's own org guard is off, so the leaked entry makes it really send.
    s += &node_toml("s0", 1, base_nats[2], 4);
    s += "allow_cross_org = true\n";
    for (i, (org, nat)) in extra.iter().enumerate() {
        s += &node_toml(&format!("x{i}"), org % orgs, *nat, if i % 2 == 1 { 3 } else { 0 });
    }
    let movable: Vec<String> =
        std::iter::once("r1".to_string()).chain((0..extra.len()).map(|i| format!("x{i}"))).collect();
    for (kind, at, who) in faults {
        let node = &movable[who % movable.len()];
        let at = 2 + at % 12;
        s += &match kind % 4 {
            0 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"nexus_restart\"\n"),
            1 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"restart\"\nnode = \"{node}\"\n"),
            2 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"partition\"\na = \"{node}\"\nb = \"nexus\"\n"),
            _ => format!("[[fault]]\nat = \"{at}s\"\nkind = \"nat_flush\"\nnat = \"nat{}\"\n", who % 3),
        };
    }
    s
}

fn options(rec: &Arc<Recorder>, leak: bool) -> RunOptions {
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    RunOptions {
        probe: Some(recording_probe(rec.clone())),
        leaks: if leak { vec![pair("s0", "r0")] } else { vec![] },
        pings: vec![pair("s0", "r0"), pair("r1", "r0"), pair("r0", "r1")],
        ..Default::default()
    }
}

/// Sum of `r`'s data-plane counters over every start of node `name`, and the WireGuard
/// bytes it sent to the node whose key is `to`.
fn counters(rec: &Recorder, name: &str, to: Option<&str>) -> (citadel::dataplane::DataPlaneCounters, u64) {
    let mut sum = citadel::dataplane::DataPlaneCounters::default();
    let mut tx = 0;
    for (_, m) in rec.meshes.lock().unwrap().iter().filter(|(n, _)| n == name) {
        let Some(dp) = m.data_plane() else { continue };
        let c = dp.counters();
        sum.rx_unknown_peer += c.rx_unknown_peer;
        sum.rx_filtered += c.rx_filtered;
        sum.rx_rejected += c.rx_rejected;
        tx += dp
            .peer_stats()
            .iter()
            .filter(|p| Some(p.node_key.to_string().as_str()) == to)
            .map(|p| p.tx_bytes)
            .sum::<u64>();
    }
    (sum, tx)
}

fn key_of(rec: &Recorder, name: &str) -> Option<String> {
    rec.meshes.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, m)| m.node_key().to_string())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 8, ..ProptestConfig::default() })]

    #[test]
    fn cross_org_packets_are_dropped_by_the_receiver(
        orgs in 2usize..4,
        base_nats in prop::array::uniform3(0usize..5),
        extra in prop::collection::vec((0usize..4, 0usize..5), 0..3),
        faults in prop::collection::vec((0u8..4, 0u64..12, 0usize..4), 0..3),
        seed in 0u64..1000,
    ) {
        let text = world_toml(orgs, base_nats, &extra, &faults, seed);
        let sc = Scenario::parse("prop.toml", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let rec = Arc::new(Recorder::default());
        let out = world::run(&sc, &options(&rec, true)).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        let ctx = || format!("{text}\n{}", out.report());

        // The injected entry is the only cross-org entry any netmap ever held.
        let want: BTreeSet<(String, String)> = [("s0".to_string(), "r0".to_string())].into();
        prop_assert_eq!(&out.leaked_pairs, &want, "{}", ctx());

        // Liveness: same-org visibility and answered same-org pings both ways.
        prop_assert!(out.visibility["r1"].contains("r0") && out.visibility["r0"].contains("r1"), "{}", ctx());
        for pair in [("r1", "r0"), ("r0", "r1")] {
            let rs = out.pings.get(&(pair.0.to_string(), pair.1.to_string())).cloned().unwrap_or_default();
            prop_assert!(rs.iter().any(|(_, p)| p.is_some()), "{pair:?} never answered: {rs:?}\n{}", ctx());
        }

        // Cross-org pings were made, as real packets, and none was answered.
        let rs = out.pings.get(&("s0".to_string(), "r0".to_string())).cloned().unwrap_or_default();
        prop_assert!(!rs.is_empty(), "s0 never pinged r0\n{}", ctx());
        prop_assert!(rs.iter().all(|(_, p)| p.is_none()), "s0 -> r0 answered: {rs:?}\n{}", ctx());
        let r0_key = key_of(&rec, "r0");
        let (_, sent) = counters(&rec, "s0", r0_key.as_deref());
        prop_assert!(sent > 0, "s0 sent no WireGuard bytes to r0\n{}", ctx());
        let (rx, _) = counters(&rec, "r0", None);
        prop_assert!(rx.rx_unknown_peer + rx.rx_filtered > 0, "r0 dropped nothing: {rx:?}\n{}", ctx());

        // r0's listener accepted its own org only, and did accept (the listener is live).
        let org_of: BTreeMap<String, String> =
            sc.nodes.iter().map(|n| (n.name.get_ref().clone(), n.org.get_ref().clone())).collect();
        let ips: BTreeMap<IpAddr, String> = rec
            .meshes
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(n, m)| Some((m.status().ipv4?.parse().ok()?, n.clone())))
            .collect();
        let accepts = rec.accepts.lock().unwrap().clone();
        prop_assert!(accepts.iter().any(|(at, _)| at == "r0"), "r0 accepted nothing\n{}", ctx());
        for (at, from) in &accepts {
            let src = ips.get(from).cloned().unwrap_or_else(|| format!("unknown {from}"));
            prop_assert_eq!(org_of.get(at), org_of.get(&src), "{} accepted a connection from {}\n{}", at, src, ctx());
        }
    }
}

/// The leak detector fires on an injected cross-org entry, and without the injection the same
/// world has no cross-org packet at the receiver (so the property's drop counts come from it).
#[test]
fn injected_cross_org_entry_is_caught() {
    let text = world_toml(2, [4, 4, 4], &[], &[], 7);
    let sc = Scenario::parse("leak.toml", &text).unwrap();

    let rec = Arc::new(Recorder::default());
    let out = world::run(&sc, &options(&rec, true)).unwrap();
    assert!(!out.passed(), "{}", out.report());
    assert!(out.leak.as_deref().is_some_and(|l| l.contains("s0 (org1) lists r0 (org0)")), "{}", out.report());
    assert!(out.trace.contains("FAIL           org isolation"), "{}", out.report());
    let (rx, _) = counters(&rec, "r0", None);
    assert!(rx.rx_unknown_peer > 0, "{rx:?}");

    let rec = Arc::new(Recorder::default());
    let out = world::run(&sc, &options(&rec, false)).unwrap();
    assert!(out.passed() && out.leaked_pairs.is_empty(), "{}", out.report());
    let (rx, _) = counters(&rec, "r0", None);
    assert_eq!(rx.rx_unknown_peer + rx.rx_filtered, 0, "{rx:?}");
    let (_, sent) = counters(&rec, "s0", key_of(&rec, "r0").as_deref());
    assert_eq!(sent, 0);
}
