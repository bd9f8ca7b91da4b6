//! Random worlds (orgs, NATs, faults) never leak a node into another org's netmap, and no mesh
//! ping across orgs is ever answered.

use harness::scenario::Scenario;
use harness::world::{self, RunOptions};
use proptest::prelude::*;

fn world_toml(orgs: usize, nodes: &[(usize, usize)], faults: &[(u8, u64, usize)], seed: u64) -> String {
    let maps = ["endpoint_independent", "address_dependent", "address_and_port_dependent"];
    let mut s = format!("seed = {seed}\nduration = \"40s\"\n[net]\ntick = \"5ms\"\n");
    for o in 0..orgs {
        s += &format!("[[org]]\nname = \"org{o}\"\n");
    }
    for (i, m) in maps.iter().enumerate() {
        s += &format!("[[nat]]\nname = \"nat{i}\"\nmapping = \"{m}\"\nfiltering = \"{m}\"\n");
    }
    for (i, (org, nat)) in nodes.iter().enumerate() {
        let org = org % orgs;
        s += &format!("[[node]]\nname = \"n{i}\"\norg = \"org{org}\"\n");
        match nat % 5 {
            0..=2 => s += &format!("nat = \"nat{}\"\n", nat % 5),
            3 => s += "network = \"udp_blocked\"\n",
            _ => {}
        }
        if i % 3 == 2 {
            s += &format!("start = \"{}s\"\n", 5 + i);
        }
    }
    // Every node pings a node of another org through the mesh all along.
    for (i, (org, _)) in nodes.iter().enumerate() {
        if let Some(j) = nodes.iter().position(|(o, _)| o % orgs != org % orgs) {
            s += &format!("[[expect]]\nkind = \"reaches\"\na = \"n{i}\"\nb = \"n{j}\"\npath = \"none\"\n");
        }
    }
    for (kind, at, who) in faults {
        let node = format!("n{}", who % nodes.len());
        let at = at % 35;
        s += &match kind % 5 {
            0 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"nexus_restart\"\n"),
            1 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"restart\"\nnode = \"{node}\"\n"),
            2 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"partition\"\na = \"{node}\"\nb = \"nexus\"\n"),
            3 => format!("[[fault]]\nat = \"{at}s\"\nkind = \"heal\"\na = \"{node}\"\nb = \"nexus\"\n"),
            _ => format!("[[fault]]\nat = \"{at}s\"\nkind = \"nat_flush\"\nnat = \"nat{}\"\n", who % 3),
        };
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 4, ..ProptestConfig::default() })]

    #[test]
    fn no_cross_org_leak(
        orgs in 2usize..4,
        nodes in prop::collection::vec((0usize..4, 0usize..5), 2..7),
        faults in prop::collection::vec((0u8..5, 0u64..40, 0usize..8), 0..4),
        seed in 0u64..1000,
    ) {
        let text = world_toml(orgs, &nodes, &faults, seed);
        let sc = Scenario::parse("prop.toml", &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let out = world::run(&sc, &RunOptions::default()).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert!(out.leak.is_none(), "{}\n{}", text, out.report());
        // No cross-org ping was ever answered (a pinger that never got going is not a leak).
        for (d, v) in &out.verdicts {
            if let harness::report::Verdict::Fail(why) = v {
                prop_assert!(!why.contains("answered"), "{d}: {why}\n{text}\n{}", out.report());
            }
        }
        // The check is live: every node that saw anyone saw only its own org.
        for (n, vis) in &out.visibility {
            let org = &sc.node(n).unwrap().org;
            for p in vis {
                prop_assert_eq!(sc.node(p).map(|x| x.org.get_ref()), Some(org.get_ref()));
            }
        }
    }
}
