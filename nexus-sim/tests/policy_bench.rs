//! Policy compile time and map size for a 1,000-node org under a 100-rule policy.
//! Run: `cargo test -p nexus-sim --test policy_bench -- --ignored --nocapture`
//! (add `--release` for optimised figures).

use citadel_proto::keys::{MachinePublic, NodePublic};
use nexus_sim::control::build_map;
use std::time::Instant;

const NODES: usize = 1000;
const RULES: usize = 100;

fn policy() -> String {
    let mut acls = vec![];
    for i in 0..RULES {
        let acl = match i % 10 {
            // Tag to tag on a port or a range.
            0..=6 => format!(
                r#"{{"action": "accept", "src": ["tag:t{}"], "dst": ["tag:t{}:{}"]}}"#,
                i % 10,
                (i + 1) % 10,
                if i % 2 == 0 { format!("{}", 1000 + i) } else { format!("{}-{}", 2000 + i, 2100 + i) }
            ),
            // People of the org to a tag.
            7 => format!(r#"{{"action": "accept", "src": ["acme@"], "dst": ["tag:t{}:22,443"]}}"#, i % 10),
            // A CIDR source to a host alias.
            8 => format!(r#"{{"action": "accept", "proto": "udp", "src": ["100.64.1.0/24"], "dst": ["web{}:53"]}}"#, i),
            _ => format!(r#"{{"action": "accept", "src": ["group:ops"], "dst": ["autogroup:tagged:*"]}}"#),
        };
        acls.push(acl);
    }
    let hosts: Vec<String> =
        (0..RULES).filter(|i| i % 10 == 8).map(|i| format!(r#""web{i}": "100.64.0.{i}""#)).collect();
    let tags: Vec<String> = (0..10).map(|t| format!(r#""tag:t{t}": ["acme@"]"#)).collect();
    format!(
        "{{\"groups\": {{\"group:ops\": [\"acme@\"]}}, \"hosts\": {{{}}}, \"tagOwners\": {{{}}}, \"acls\": [{}]}}",
        hosts.join(","),
        tags.join(","),
        acls.join(",\n")
    )
}

#[test]
#[ignore = "bench"]
fn compile_time_and_map_size_for_1000_nodes_100_rules() {
    let shared = nexus_sim::build(nexus_sim::Config { stun_listen: None, ..Default::default() }).unwrap();
    let st = &shared.store;
    let user = st.create_user("acme", "").unwrap();
    for i in 0..NODES {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        // Nine in ten nodes carry one of ten tags; the rest are people's devices.
        let tags = if i % 10 == 9 { vec![] } else { vec![format!("tag:t{}", i % 10)] };
        st.register(
            MachinePublic(k),
            NodePublic(k),
            user.id,
            Default::default(),
            false,
            tags,
            None,
            "authkey",
            shared.cfg.ipv4_base,
            shared.cfg.ipv6_base,
        )
        .expect("register");
    }
    let text = policy();
    let t = Instant::now();
    let pol = nexus_sim::policy::Policy::parse(&text).unwrap();
    let parse = t.elapsed();
    let (users, nodes) = nexus_sim::policy::state::inputs(st);
    let t = Instant::now();
    let compiled = pol.compile(&users, &nodes);
    let compile = t.elapsed();
    shared.policy.set(&text).unwrap();

    let me = st.nodes(None).into_iter().find(|n| n.tags == ["tag:t1"]).unwrap();
    let t = Instant::now();
    let m = build_map(&shared, &me);
    let first_map = t.elapsed();
    let t = Instant::now();
    let m2 = build_map(&shared, &me);
    let cached_map = t.elapsed();
    assert_eq!(m, m2);
    let json = serde_json::to_vec(&m).unwrap();
    let filter = serde_json::to_vec(&m.packet_filter).unwrap();
    let peers = m.peers.as_ref().map_or(0, Vec::len);
    let rules = m.packet_filter.as_ref().map_or(0, Vec::len);
    assert!(peers > 0 && rules > 0, "the bench must exercise real rules");
    assert_eq!(compiled.peers_of(me.id).len(), peers);
    println!("policy: {} bytes, {RULES} rules; org of {NODES} nodes", text.len());
    println!("parse {parse:?}, compile (filters + peer sets for all nodes) {compile:?}");
    println!("build_map of a tag:t1 node: first {first_map:?} (compiles), cached {cached_map:?}");
    println!(
        "map: {} bytes JSON ({} KiB), {peers} peers, {rules} filter rules ({} bytes of filter)",
        json.len(),
        json.len() / 1024,
        filter.len()
    );
}
