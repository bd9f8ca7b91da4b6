//! Parses arbitrary text as a nexus-sim ACL policy (HuJSON); a policy that parses is compiled
//! for a small fixed tailnet and queried, which must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nexus_sim::policy::{Policy, PolicyNode, PolicyUser};
use std::net::{Ipv4Addr, Ipv6Addr};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = Policy::parse(text) else { return };
    let users = vec![
        PolicyUser { id: 1, name: "alice".into(), email: "alice@example.com".into() },
        PolicyUser { id: 2, name: "bob".into(), email: "bob@".into() },
    ];
    let nodes = vec![
        PolicyNode::new(
            1,
            1,
            Ipv4Addr::new(100, 64, 0, 1),
            Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1),
            vec![],
        ),
        PolicyNode::new(
            2,
            2,
            Ipv4Addr::new(100, 64, 0, 2),
            Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 2),
            vec!["tag:server".into()],
        ),
        PolicyNode::new(
            3,
            1,
            Ipv4Addr::new(100, 64, 0, 3),
            Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 3),
            vec!["tag:ci".into()],
        ),
    ];
    let compiled = policy.compile(&users, &nodes);
    for n in &nodes {
        let _ = compiled.filter_for(n.id);
        for p in compiled.peers_of(n.id) {
            assert!(compiled.may_talk(n.id, p) || compiled.may_talk(p, n.id), "peer {p} of {} may not talk", n.id);
        }
    }
    let again = Policy::parse(policy.text()).expect("a policy's own text parses");
    assert_eq!(again.text(), policy.text());
});
