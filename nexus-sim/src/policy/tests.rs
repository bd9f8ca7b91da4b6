//! Policy compiler tests. Cases marked "Headscale" restate facts from Headscale's own test
//! tables (`hscontrol/policy/v2/filter_test.go` at v0.27.1): same policy, same nodes, same
//! expected rules.

use super::*;
use proptest::prelude::*;

fn user(id: u64, name: &str) -> PolicyUser {
    PolicyUser { id, name: name.into(), email: String::new() }
}

fn v4node(id: u64, user_id: u64, ip: &str, tags: &[&str]) -> PolicyNode {
    PolicyNode {
        id,
        user_id,
        ips: vec![ip.parse().unwrap()],
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

fn pr(first: u16, last: u16) -> PortRange {
    PortRange { first, last }
}

fn npr(ip: &str, ports: PortRange) -> NetPortRange {
    NetPortRange { ip: ip.into(), ports }
}

const ANY: PortRange = PortRange { first: 0, last: 65535 };

fn rule(src: &[&str], dst: Vec<NetPortRange>, proto: &[i32]) -> FilterRule {
    FilterRule { src_ips: src.iter().map(|s| s.to_string()).collect(), dst_ports: dst, ip_proto: proto.to_vec() }
}

/// The nodes of Headscale's `TestParsing`: one owner-less node at 100.100.100.100 and
/// testuser's node at 200.200.200.200.
fn parsing_world() -> (Vec<PolicyUser>, Vec<PolicyNode>) {
    (vec![user(1, "testuser")], vec![v4node(1, 0, "100.100.100.100", &[]), v4node(2, 1, "200.200.200.200", &[])])
}

fn global(policy: &str) -> Vec<FilterRule> {
    let (users, nodes) = parsing_world();
    let p = Policy::parse(policy).unwrap_or_else(|e| panic!("{e}"));
    p.compile(&users, &nodes).rules_for(1)
}

const HOSTS: &str = r#""hosts": { "host-1": "100.100.100.100", "subnet-1": "100.100.101.100/24", },"#;

#[test]
fn headscale_basic_rule() {
    let p = format!(
        r#"{{ {HOSTS}
        "acls": [ {{ "action": "accept", "src": ["subnet-1", "192.168.1.0/24"], "dst": ["*:22,3389", "host-1:*",], }}, ], }}"#
    );
    assert_eq!(
        global(&p),
        vec![rule(
            &["100.100.101.0/24", "192.168.1.0/24"],
            vec![
                npr("0.0.0.0/0", pr(22, 22)),
                npr("0.0.0.0/0", pr(3389, 3389)),
                npr("::/0", pr(22, 22)),
                npr("::/0", pr(3389, 3389)),
                npr("100.100.100.100/32", ANY),
            ],
            &[6, 17],
        )]
    );
}

#[test]
fn headscale_parse_protocol() {
    let p = format!(
        r#"{{ {HOSTS} "acls": [
        {{ "Action": "accept", "src": ["*",], "proto": "tcp", "dst": ["host-1:*",], }},
        {{ "Action": "accept", "src": ["*",], "proto": "udp", "dst": ["host-1:53",], }},
        {{ "Action": "accept", "src": ["*",], "proto": "icmp", "dst": ["host-1:*",], }},
    ], }}"#
    );
    let all = ["0.0.0.0/0", "::/0"];
    assert_eq!(
        global(&p),
        vec![
            rule(&all, vec![npr("100.100.100.100/32", ANY)], &[6]),
            rule(&all, vec![npr("100.100.100.100/32", pr(53, 53))], &[17]),
            rule(&all, vec![npr("100.100.100.100/32", ANY)], &[1, 58]),
        ]
    );
}

#[test]
fn headscale_port_range_group_user_and_ipv6_cases() {
    let range =
        format!(r#"{{ {HOSTS} "acls": [{{"action": "accept", "src": ["subnet-1"], "dst": ["host-1:5400-5500"]}}] }}"#);
    assert_eq!(
        global(&range),
        vec![rule(&["100.100.101.0/24"], vec![npr("100.100.100.100/32", pr(5400, 5500))], &[6, 17])]
    );
    let group = format!(
        r#"{{ "groups": {{ "group:example": ["testuser@",], }}, {HOSTS}
        "acls": [{{"action": "accept", "src": ["group:example"], "dst": ["host-1:*"]}}] }}"#
    );
    let want = vec![rule(&["200.200.200.200/32"], vec![npr("100.100.100.100/32", ANY)], &[6, 17])];
    assert_eq!(global(&group), want);
    let by_user =
        format!(r#"{{ {HOSTS} "acls": [{{"action": "accept", "src": ["testuser@"], "dst": ["host-1:*"]}}] }}"#);
    assert_eq!(global(&by_user), want);
    let v6 = r#"{ "hosts": {"host-1": "100.100.100.100/32"}, "acls": [{"action": "accept", "src": ["*"], "dst": ["host-1:*"]}] }"#;
    assert_eq!(global(v6), vec![rule(&["0.0.0.0/0", "::/0"], vec![npr("100.100.100.100/32", ANY)], &[6, 17])]);
}

#[test]
fn headscale_invalid_hujson_is_refused_with_its_line() {
    let e = Policy::parse("\n{\n\t\t").unwrap_err();
    assert_eq!(e.issues.len(), 1);
    assert_eq!(e.issues[0].line, Some(3), "{e}");
}

/// Headscale's `TestCompileFilterRulesForNodeWithAutogroupSelf` world.
fn self_world() -> (Vec<PolicyUser>, Vec<PolicyNode>) {
    let users = vec![user(1, "user1"), user(2, "user2")];
    let nodes = vec![
        v4node(1, 1, "100.64.0.1", &[]),
        v4node(2, 1, "100.64.0.2", &[]),
        v4node(3, 2, "100.64.0.3", &[]),
        v4node(4, 2, "100.64.0.4", &[]),
        v4node(5, 1, "100.64.0.5", &["tag:test"]),
        v4node(6, 2, "100.64.0.6", &["tag:test"]),
    ];
    (users, nodes)
}

#[test]
fn headscale_autogroup_self_keeps_to_the_owner_untagged_devices() {
    let (users, nodes) = self_world();
    let p =
        Policy::parse(r#"{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}"#)
            .unwrap();
    let c = p.compile(&users, &nodes);
    let rules = c.rules_for(1);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].src_ips, ["100.64.0.1/32", "100.64.0.2/32"]);
    let dst: Vec<&str> = rules[0].dst_ports.iter().map(|d| d.ip.as_str()).collect();
    assert_eq!(dst, ["100.64.0.1", "100.64.0.2"], "bare addresses, owner's untagged devices only");
    assert_eq!(c.peers_of(1), [2]);
    assert_eq!(c.peers_of(3), [4]);
    assert!(c.peers_of(5).is_empty() && c.filter_for(5).is_empty(), "tagged devices are not in self");
}

#[test]
fn headscale_autogroup_self_with_a_user_or_group_source() {
    let (users, nodes) = self_world();
    let nodes = &nodes[..4];
    let p =
        Policy::parse(r#"{"acls": [{"action": "accept", "src": ["user1@"], "dst": ["autogroup:self:*"]}]}"#).unwrap();
    let c = p.compile(&users, nodes);
    assert_eq!(c.rules_for(1)[0].src_ips, ["100.64.0.1/32", "100.64.0.2/32"]);
    assert!(c.rules_for(3).is_empty(), "user1@ devices cannot match user2's self");
    let users3 = vec![user(1, "user1"), user(2, "user2"), user(3, "user3")];
    let mut nodes5 = nodes.to_vec();
    nodes5.push(v4node(5, 3, "100.64.0.5", &[]));
    let p = Policy::parse(
        r#"{"groups": {"group:admins": ["user1@", "user2@"]},
            "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["autogroup:self:*"]}]}"#,
    )
    .unwrap();
    let c = p.compile(&users3, &nodes5);
    assert_eq!(c.rules_for(1)[0].src_ips, ["100.64.0.1/32", "100.64.0.2/32"]);
    assert!(c.rules_for(5).is_empty(), "user3 is not in the group");
}

#[test]
fn headscale_autogroup_self_in_source_is_refused() {
    let e = Policy::parse(
        "{\"acls\": [\n{\"action\": \"accept\", \"src\": [\"autogroup:self\"], \"dst\": [\"autogroup:member:*\"]}]}",
    )
    .unwrap_err();
    assert!(e.to_string().contains("autogroup:self"), "{e}");
    assert_eq!(e.issues[0].line, Some(2));
}

/// Users acme/globex with two nodes each plus a tagged acme server.
fn orgs() -> (Vec<PolicyUser>, Vec<PolicyNode>) {
    let users = vec![user(1, "acme"), user(2, "globex")];
    let n = |id: u64, u: u64, tags: &[&str]| {
        PolicyNode::new(
            id,
            u,
            Ipv4Addr::new(100, 64, 0, id as u8),
            format!("fd7a:115c:a1e0::{id}").parse().unwrap(),
            tags.iter().map(|t| t.to_string()).collect(),
        )
    };
    (users, vec![n(1, 1, &[]), n(2, 1, &[]), n(3, 2, &[]), n(4, 2, &[]), n(5, 1, &["tag:server"])])
}

#[test]
fn org_isolation_builtin_keeps_each_org_to_itself() {
    let (users, nodes) = orgs();
    let c = Policy::parse(ORG_ISOLATION).unwrap().compile(&users, &nodes);
    assert_eq!(c.peers_of(1), [2]);
    assert_eq!(c.peers_of(4), [3]);
    assert!(!c.may_talk(1, 3));
    let f = c.filter_for(1);
    // The TCP/UDP rule and the ICMP rule have the same sources and destinations: one rule.
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].src_ips, ["100.64.0.1/32", "100.64.0.2/32", "fd7a:115c:a1e0::1/128", "fd7a:115c:a1e0::2/128"]);
    assert_eq!(f[0].ip_proto, [6, 17, 1, 58]);
}

/// Only rules naming the same sources and destinations merge, their protocols joined once
/// each; a rule to other ports stays a rule of its own.
#[test]
fn rules_merge_only_when_they_differ_in_protocols_alone() {
    let (users, nodes) = orgs();
    let policy = r#"{"acls": [
        {"action": "accept", "proto": "tcp", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "proto": "udp", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "proto": "tcp", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]}
    ]}"#;
    let f = Policy::parse(policy).unwrap().compile(&users, &nodes).filter_for(1);
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[0].ip_proto, [6, 17]);
    assert_eq!((f[1].ip_proto.as_slice(), f[1].dst_ports[0].ports.first), (&[6][..], 22));
}

#[test]
fn headscale_default_and_empty_acls() {
    let (users, nodes) = orgs();
    let c = Policy::parse(HEADSCALE_DEFAULT).unwrap().compile(&users, &nodes);
    assert_eq!(c.peers_of(1), [2, 3, 4, 5]);
    assert_eq!(c.filter_for(3), filter_allow_all());
    let c = Policy::parse(r#"{"acls": []}"#).unwrap().compile(&users, &nodes);
    assert!(c.peers_of(1).is_empty() && c.filter_for(1).is_empty(), "an explicit empty list denies all");
}

#[test]
fn port_limited_group_and_tag_rules_give_the_expected_filters_and_peers() {
    let (users, nodes) = orgs();
    let p = Policy::parse(
        r#"{
        // ssh from both orgs' people to the acme server, web only from acme
        "groups": {"group:ops": ["acme@", "globex@"]},
        "tagOwners": {"tag:server": ["acme@"]},
        "acls": [
            {"action": "accept", "src": ["group:ops"], "dst": ["tag:server:22"]},
            {"action": "accept", "src": ["acme@"], "proto": "tcp", "dst": ["tag:server:80,443", "100.64.0.2:8000-8999"]},
        ],
    }"#,
    )
    .unwrap();
    let c = p.compile(&users, &nodes);
    let server = c.filter_for(5);
    assert_eq!(server.len(), 2);
    assert_eq!(server[0].dst_ports, [npr("100.64.0.5/32", pr(22, 22)), npr("fd7a:115c:a1e0::5/128", pr(22, 22))]);
    assert_eq!(
        server[0].src_ips,
        [
            "100.64.0.1/32",
            "100.64.0.2/31",
            "100.64.0.4/32",
            "fd7a:115c:a1e0::1/128",
            "fd7a:115c:a1e0::2/127",
            "fd7a:115c:a1e0::4/128"
        ]
    );
    assert_eq!(server[1].ip_proto, [6]);
    // A single address of a node stands for all of its addresses.
    assert_eq!(
        c.filter_for(2)[0].dst_ports,
        [npr("100.64.0.2/32", pr(8000, 8999)), npr("fd7a:115c:a1e0::2/128", pr(8000, 8999))]
    );
    assert!(c.filter_for(1).is_empty(), "node 1 is no destination");
    assert_eq!(c.peers_of(5), [1, 2, 3, 4]);
    assert_eq!(c.peers_of(3), [5], "globex reaches only the server");
    assert_eq!(c.peers_of(1), [2, 5]);
}

#[test]
fn autogroup_self_peers_are_symmetric_with_a_tagged_server() {
    let (users, nodes) = orgs();
    let p = Policy::parse(
        r#"{"tagOwners": {"tag:server": ["acme@"]}, "acls": [
            {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
            {"action": "accept", "src": ["globex@"], "dst": ["tag:server:22"]}]}"#,
    )
    .unwrap();
    let c = p.compile(&users, &nodes);
    assert_eq!(c.peers_of(5), [3, 4], "the server sees the clients that may reach it");
    assert_eq!(c.peers_of(3), [4, 5]);
    assert_eq!(
        c.filter_for(5)[0].src_ips,
        ["100.64.0.3/32", "100.64.0.4/32", "fd7a:115c:a1e0::3/128", "fd7a:115c:a1e0::4/128"]
    );
}

#[test]
fn internet_and_tagged_and_cidr_aliases() {
    let (users, nodes) = orgs();
    let p = Policy::parse(
        r#"{"acls": [{"action": "accept", "src": ["autogroup:tagged", "10.0.0.0/8"], "dst": ["autogroup:internet:443", "autogroup:member:*"]}]}"#,
    )
    .unwrap();
    let rules = p.compile(&users, &nodes).rules_for(1);
    assert_eq!(rules[0].src_ips, ["10.0.0.0/8", "100.64.0.5/32", "fd7a:115c:a1e0::5/128"]);
    assert!(rules[0].dst_ports.iter().any(|d| d.ip == "8.0.0.0/7" && d.ports == pr(443, 443)));
    assert!(!rules[0].dst_ports.iter().any(|d| d.ip.starts_with("100.64.0.0")));
}

fn errors(policy: &str) -> Vec<String> {
    Policy::parse(policy).unwrap_err().issues.iter().map(Issue::to_string).collect()
}

#[test]
fn bad_policies_are_refused_with_headscale_messages_and_lines() {
    let e = errors("{\n  \"acls\": [\n    {\"action\": \"drop\", \"src\": [\"*\"], \"dst\": [\"*:*\"]}\n  ]\n}");
    assert_eq!(e, [r#"line 3: invalid action "drop", must be "accept""#]);
    let e = errors(
        "{\n\"acls\": [{\"action\": \"accept\",\n \"src\": [\"group:nope\"],\n \"dst\": [\"tag:x:22\", \"web:80\"]}]}",
    );
    assert_eq!(
        e,
        [
            r#"line 3: Group "group:nope" is not defined in the Policy, please define or remove the reference to it"#,
            r#"line 4: Tag "tag:x" is not defined in the Policy, please define or remove the reference to it"#,
            r#"line 4: Host "web" is not defined in the Policy, please define or remove the reference to it"#,
        ]
    );
    assert_eq!(errors("{\n\"acl\": []}"), [r#"line 2: unknown field "acl""#]);
    let e = errors(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["host"]}]}"#);
    assert!(e[0].contains(r#"hostport must contain a colon (":")"#), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:0"]}]}"#);
    assert!(e[0].contains("first port must be >0"), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:90-80"]}]}"#);
    assert!(e[0].contains("first port is greater than last port"), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "proto": "icmp", "src": ["*"], "dst": ["*:22"]}]}"#);
    assert!(e[0].contains(r#"protocol "icmp" does not support specific ports"#), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "proto": "*", "src": ["*"], "dst": ["*:*"]}]}"#);
    assert!(e[0].contains(r#"proto name "*" not known"#), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "proto": "06", "src": ["*"], "dst": ["*:*"]}]}"#);
    assert!(e[0].contains("leading 0"), "{e:?}");
    let e = errors(r#"{"groups": {"group:a": ["group:b"]}}"#);
    assert!(e[0].contains("Nested groups are not allowed"), "{e:?}");
    let e = errors(r#"{"groups": {"group:a": ["bob"]}}"#);
    assert!(e[0].contains("Username has to contain @"), "{e:?}");
    let e = errors(r#"{"hosts": {"web": "10.0.0.300"}}"#);
    assert!(e[0].contains("invalid IP address"), "{e:?}");
    let e = errors(r#"{"acls": [{"action": "accept", "src": ["autogroup:everyone"], "dst": ["*:*"]}]}"#);
    assert!(e[0].contains("AutoGroup is invalid"), "{e:?}");
    assert_eq!(errors("/* never closed"), ["line 1: unterminated /* comment"]);
    assert_eq!(errors("   "), ["policy is empty"]);
    assert_eq!(errors("[]"), ["line 1: a policy must be a JSON object"]);
}

#[test]
fn hujson_comments_trailing_commas_and_metadata_fields_are_accepted() {
    let p = Policy::parse(
        "// top\n{ /* a */ \"ACLs\": [ {\"#ha-meta\": 1, \"action\": \"accept\", \"src\": [\"*\",], \"dst\": [\"*:*\",],}, ], }",
    );
    assert!(p.is_ok(), "{p:?}");
}

fn arb_world() -> impl Strategy<Value = (Vec<PolicyUser>, Vec<PolicyNode>)> {
    (1usize..5, proptest::collection::vec((0u64..4, any::<bool>()), 0..24)).prop_map(|(nu, spec)| {
        let users: Vec<PolicyUser> = (1..=nu as u64).map(|i| user(i, &format!("u{i}"))).collect();
        let nodes = spec
            .iter()
            .enumerate()
            .map(|(i, (u, tagged))| {
                let id = i as u64 + 1;
                PolicyNode::new(
                    id,
                    u % nu as u64 + 1,
                    Ipv4Addr::new(100, 64, (id >> 8) as u8, id as u8),
                    format!("fd7a:115c:a1e0::{id:x}").parse().unwrap(),
                    if *tagged { vec!["tag:srv".into()] } else { vec![] },
                )
            })
            .collect();
        (users, nodes)
    })
}

proptest! {
    /// Under the built-in policy every untagged node's peers are exactly its org's other
    /// untagged nodes, and its filter admits no address of another org.
    #[test]
    fn org_isolation_never_crosses_orgs((users, nodes) in arb_world()) {
        let c = Policy::parse(ORG_ISOLATION).unwrap().compile(&users, &nodes);
        for n in &nodes {
            let want: Vec<u64> = if n.tagged() { vec![] } else {
                nodes.iter().filter(|m| m.id != n.id && m.user_id == n.user_id && !m.tagged()).map(|m| m.id).collect()
            };
            prop_assert_eq!(c.peers_of(n.id), want);
            for r in c.filter_for(n.id) {
                for s in &r.src_ips {
                    let set = ipset::parse_ip_set(s).unwrap();
                    for m in nodes.iter().filter(|m| m.user_id != n.user_id || m.tagged()) {
                        prop_assert!(!m.in_set(&set), "node {} admits {}", n.id, m.id);
                    }
                }
            }
        }
    }

    /// For any user-to-user rules, peers are symmetric and exactly the pairs some rule
    /// connects, and a node's filter admits a source iff a rule lets it in.
    #[test]
    fn peers_are_the_pairs_a_rule_connects(
        (users, nodes) in arb_world(),
        rules in proptest::collection::vec((0u64..4, 0u64..4), 0..6),
    ) {
        let nu = users.len() as u64;
        let acls: Vec<String> = rules.iter().map(|(a, b)| format!(
            r#"{{"action": "accept", "src": ["u{}@"], "dst": ["u{}@:22"]}}"#, a % nu + 1, b % nu + 1)).collect();
        let p = Policy::parse(&format!(r#"{{"acls": [{}]}}"#, acls.join(","))).unwrap();
        let c = p.compile(&users, &nodes);
        let reach = |x: &PolicyNode, y: &PolicyNode| !x.tagged() && !y.tagged()
            && rules.iter().any(|(a, b)| a % nu + 1 == x.user_id && b % nu + 1 == y.user_id);
        for x in &nodes {
            for y in &nodes {
                if x.id == y.id { continue; }
                prop_assert_eq!(c.may_talk(x.id, y.id), reach(x, y) || reach(y, x));
                prop_assert_eq!(c.may_talk(x.id, y.id), c.may_talk(y.id, x.id));
                let admits = c.filter_for(y.id).iter().any(|r| r.src_ips.iter()
                    .any(|s| x.in_set(&ipset::parse_ip_set(s).unwrap())));
                prop_assert_eq!(admits, reach(x, y));
            }
        }
    }
}

// ---------------------------------------------------------------- routes

fn pf(s: &str) -> Prefix {
    Prefix::parse(s).unwrap()
}

fn pfs(v: &[&str]) -> Vec<Prefix> {
    v.iter().map(|s| pf(s)).collect()
}

fn dst_only(ips: &[&str]) -> Vec<NetPortRange> {
    ips.iter().map(|ip| npr(ip, ANY)).collect()
}

/// Headscale `TestReduceRoutes` (hscontrol/policy/policy_test.go, v0.27.1): the routes a
/// node keeps under raw filter rules.
#[test]
fn headscale_reduce_routes() {
    let n1 = v4node(1, 1, "100.64.0.1", &[]);
    let n2 = v4node(2, 2, "100.64.0.2", &[]);
    let three = pfs(&["10.0.0.0/24", "192.168.1.0/24", "172.16.0.0/16"]);
    let routers = pfs(&["10.10.10.0/24", "10.10.11.0/24", "10.10.12.0/24"]);
    let cases: Vec<(&str, &PolicyNode, Vec<Prefix>, Vec<FilterRule>, Vec<Prefix>)> = vec![
        (
            "node-can-access-all-routes",
            &n1,
            three.clone(),
            vec![rule(&["100.64.0.1"], dst_only(&["*"]), &[])],
            three.clone(),
        ),
        (
            "node-can-access-specific-route",
            &n1,
            three.clone(),
            vec![rule(&["100.64.0.1"], dst_only(&["10.0.0.0/24"]), &[])],
            pfs(&["10.0.0.0/24"]),
        ),
        (
            "node-can-access-multiple-specific-routes",
            &n1,
            three.clone(),
            vec![rule(&["100.64.0.1"], dst_only(&["10.0.0.0/24", "192.168.1.0/24"]), &[])],
            pfs(&["10.0.0.0/24", "192.168.1.0/24"]),
        ),
        (
            "node-can-access-overlapping-routes",
            &n1,
            pfs(&["10.0.0.0/24", "10.0.0.0/16", "192.168.1.0/24"]),
            vec![rule(&["100.64.0.1"], dst_only(&["10.0.0.0/16"]), &[])],
            pfs(&["10.0.0.0/24", "10.0.0.0/16"]),
        ),
        ("node-with-no-matching-rules", &n1, three.clone(), vec![rule(&["100.64.0.2"], dst_only(&["*"]), &[])], vec![]),
        (
            "router-with-multiple-routes-and-node-with-specific-access",
            &n2,
            routers.clone(),
            vec![
                rule(&["*"], dst_only(&["100.64.0.1"]), &[]),
                rule(&["100.64.0.2"], dst_only(&["10.10.10.0/24"]), &[]),
            ],
            pfs(&["10.10.10.0/24"]),
        ),
        (
            "node-with-access-to-one-subnet-and-partial-overlap",
            &n2,
            pfs(&["10.10.10.0/24", "10.10.11.0/24", "10.10.0.0/16"]),
            vec![rule(&["100.64.0.2"], dst_only(&["10.10.10.0/24"]), &[])],
            pfs(&["10.10.10.0/24", "10.10.0.0/16"]),
        ),
        (
            "node-with-access-to-wildcard-subnet",
            &n2,
            routers.clone(),
            vec![rule(&["100.64.0.2"], dst_only(&["10.10.0.0/16"]), &[])],
            routers.clone(),
        ),
        (
            "multiple-nodes-with-different-subnet-permissions",
            &n2,
            routers.clone(),
            vec![
                rule(&["100.64.0.1"], dst_only(&["10.10.11.0/24"]), &[]),
                rule(&["100.64.0.2"], dst_only(&["10.10.10.0/24"]), &[]),
                rule(&["100.64.0.3"], dst_only(&["10.10.12.0/24"]), &[]),
            ],
            pfs(&["10.10.10.0/24"]),
        ),
    ];
    for (name, node, routes, rules, want) in cases {
        assert_eq!(reduce_routes(node, &routes, &rules), want, "{name}");
    }
    // IPv4 and IPv6 sources each reach their own family's route.
    let dual = PolicyNode {
        id: 1,
        user_id: 1,
        ips: vec!["100.64.0.1".parse().unwrap(), "fd7a:115c:a1e0::1".parse().unwrap()],
        ..Default::default()
    };
    let rules = vec![
        rule(&["fd7a:115c:a1e0::1"], dst_only(&["2001:db8::/64"]), &[]),
        rule(&["100.64.0.1"], dst_only(&["10.0.0.0/24"]), &[]),
    ];
    assert_eq!(
        reduce_routes(&dual, &pfs(&["10.0.0.0/24", "2001:db8::/64", "192.168.1.0/24"]), &rules),
        pfs(&["10.0.0.0/24", "2001:db8::/64"])
    );
    // The reverse direction: a route whose hosts may open connections to the node.
    let rules = vec![rule(&["10.20.0.0/16"], dst_only(&["100.64.0.1"]), &[])];
    assert_eq!(reduce_routes(&n1, &pfs(&["10.20.0.0/16", "10.30.0.0/16"]), &rules), pfs(&["10.20.0.0/16"]));
    // A subnet router reaches a route on behalf of the subnet it serves (Headscale main).
    let mut router = v4node(3, 1, "100.64.0.3", &[]);
    router.routes = pfs(&["192.168.5.0/24"]);
    let rules = vec![rule(&["192.168.5.0/24"], dst_only(&["10.40.0.0/16"]), &[])];
    assert_eq!(reduce_routes(&router, &pfs(&["10.40.0.0/16", "10.50.0.0/16"]), &rules), pfs(&["10.40.0.0/16"]));
    assert!(reduce_routes(&n1, &pfs(&["10.40.0.0/16"]), &rules).is_empty());
}

/// A peer serving a subnet (or the internet, as an exit node) is in the map of a node the
/// policy lets reach that subnet, though not the peer's own address (Headscale `CanAccess`);
/// the router's filter keeps the subnet's destinations (`ReduceFilterRules`).
#[test]
fn routers_are_peers_of_those_who_may_reach_their_routes() {
    let users = vec![user(1, "alice"), user(2, "bob")];
    let mut router = v4node(1, 2, "100.64.0.1", &[]);
    router.routes = pfs(&["10.1.0.0/16"]);
    router.announced = pfs(&["10.1.0.0/16"]);
    let mut exit = v4node(2, 2, "100.64.0.2", &[]);
    exit.exit = true;
    let client = v4node(3, 1, "100.64.0.3", &[]);
    let other = v4node(4, 2, "100.64.0.4", &[]);
    let nodes = vec![router, exit, client, other];
    let pol = Policy::parse(
        r#"{"acls": [
            {"action": "accept", "src": ["alice@"], "dst": ["10.1.2.0/24:443"]},
            {"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]},
        ]}"#,
    )
    .unwrap();
    let c = pol.compile(&users, &nodes);
    assert_eq!(c.peers_of(3), vec![1, 2]);
    assert!(c.peers_of(4).is_empty(), "bob's other node reaches nothing and is reached by nobody");
    assert_eq!(
        c.filter_for(1),
        vec![rule(&["100.64.0.3/32"], vec![npr("10.1.2.0/24", pr(443, 443))], &[6, 17])],
        "the router's filter keeps its subnet's destination"
    );
    assert!(c.can_access_route(3, &pf("10.1.0.0/16")));
    assert!(!c.can_access_route(4, &pf("10.1.0.0/16")));
    assert!(c.can_access_route(3, &pf("0.0.0.0/0")));
    assert!(!c.can_access_route(4, &pf("0.0.0.0/0")));
    assert!(!c.can_access_route(99, &pf("0.0.0.0/0")), "unknown viewer");
    // What reduces each router's entry: its subnet routes, then both exit routes.
    assert_eq!(c.route_view(3, 1), vec![true]);
    assert_eq!(c.route_view(4, 1), vec![false]);
    assert_eq!(c.route_view(3, 2), vec![true, true], "alice may use the exit node");
    assert_eq!(c.route_view(4, 2), vec![false, false]);
    assert!(c.route_view(3, 99).is_empty(), "unknown router");
}

fn approves(policy: &str, node: &PolicyNode, route: &str) -> bool {
    let users = vec![user(1, "user1"), user(2, "user2"), user(3, "user3")];
    Policy::parse(policy).unwrap_or_else(|e| panic!("{e}")).node_can_approve_route(&users, node, &pf(route))
}

/// Headscale `TestNodeCanApproveRoute` (hscontrol/policy/route_approval_test.go, v0.27.1).
#[test]
fn headscale_node_can_approve_route() {
    let normal = v4node(1, 1, "100.64.0.1", &[]);
    let other = v4node(2, 2, "100.64.0.2", &[]);
    let tagged = v4node(3, 3, "100.64.0.3", &["tag:router"]);
    let admin = |routes: &str| {
        format!(
            r#"{{"groups": {{"group:admin": ["user1@"]}}, "tagOwners": {{"tag:router": ["user3@"]}},
            "acls": [{{"action": "accept", "src": ["group:admin"], "dst": ["*:*"]}}],
            "autoApprovers": {routes}}}"#
        )
    };
    let v16 = admin(r#"{"routes": {"192.168.0.0/16": ["group:admin"]}}"#);
    assert!(approves(&v16, &normal, "192.168.1.0/24"), "allow-all-routes-for-admin-user");
    assert!(!approves(&v16, &normal, "10.0.0.0/24"), "deny-route-that-doesnt-match-autoApprovers");
    assert!(!approves(&v16, &other, "192.168.1.0/24"), "user-not-in-group");
    assert!(approves(&v16, &normal, "192.168.5.0/24"), "match-specific-route-within-range");
    let tag = admin(r#"{"routes": {"10.0.0.0/8": ["tag:router"]}}"#);
    assert!(approves(&tag, &tagged, "10.0.0.0/8"), "tagged-node-can-approve");
    assert!(!approves(&tag, &normal, "10.0.0.0/8"));
    let multi = admin(
        r#"{"routes": {"192.168.0.0/16": ["group:admin"], "172.16.0.0/12": ["group:admin"], "10.0.0.0/8": ["tag:router"]}}"#,
    );
    assert!(approves(&multi, &normal, "172.16.10.0/24"), "multiple-routes-in-policy");
    let host = admin(r#"{"routes": {"192.168.1.0/24": ["group:admin"], "192.168.1.128/25": ["group:admin"]}}"#);
    assert!(approves(&host, &normal, "192.168.1.5/32"), "ip-address-within-range");
    let all = admin(r#"{"routes": {"0.0.0.0/0": ["group:admin"]}}"#);
    assert!(!approves(&all, &normal, "0.0.0.0/0"), "all-IPv4-routes-(0.0.0.0/0)-approval");
    assert!(approves(&all, &normal, "10.9.0.0/16"), "a /0 approver approves any subnet, not exit routes");
    let exit = admin(r#"{"exitNode": ["group:admin"]}"#);
    assert!(approves(&exit, &normal, "0.0.0.0/0"), "all-IPv4-routes-exitnode-approval");
    assert!(approves(&exit, &normal, "::/0"), "all-IPv6-routes-exitnode-approval");
    assert!(!approves(&exit, &normal, "192.168.1.0/24"), "specific-IPv4-route-with-exitnode-only-approval");
    let by_user = admin(r#"{"routes": {"10.0.0.0/8": ["user2@"]}}"#);
    assert!(approves(&by_user, &other, "10.3.0.0/16"));
    let tagged_of_user2 = v4node(4, 2, "100.64.0.4", &["tag:router"]);
    assert!(!approves(&by_user, &tagged_of_user2, "10.3.0.0/16"), "a user's tagged node is not the user");
}

/// `ApproveRoutesWithPolicy`: approval only adds, keeps the order, and reports no change.
#[test]
fn auto_approval_never_removes_routes() {
    let users = vec![user(1, "user1")];
    let pol =
        Policy::parse(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["user1@"]}, "exitNode": ["user1@"]}}"#).unwrap();
    let n = v4node(1, 1, "100.64.0.1", &[]);
    let got = pol.auto_approved(
        &users,
        &n,
        &pfs(&["172.16.0.0/12"]),
        &pfs(&["10.1.0.0/16", "192.168.0.0/16", "0.0.0.0/0", "::/0"]),
    );
    // Go's prefix order: family, then length, then address.
    assert_eq!(got, Some(pfs(&["0.0.0.0/0", "172.16.0.0/12", "10.1.0.0/16", "::/0"])));
    assert_eq!(pol.auto_approved(&users, &n, &pfs(&["10.1.0.0/16"]), &pfs(&["10.1.0.0/16"])), None);
    assert_eq!(pol.auto_approved(&users, &n, &[], &pfs(&["192.168.0.0/16"])), None);
}

#[test]
fn bad_auto_approvers_are_refused_with_lines() {
    let e = Policy::parse("{\n\"autoApprovers\": {\"routes\": {\"10.0.0.0/8\": [\"group:nope\"]}}}").unwrap_err();
    assert!(e.to_string().contains("line 2") && e.to_string().contains("group:nope"), "{e}");
    let e = Policy::parse(r#"{"autoApprovers": {"exitNode": ["somebody"]}}"#).unwrap_err();
    assert!(e.to_string().contains("Invalid AutoApprover"), "{e}");
    let e = Policy::parse(r#"{"autoApprovers": {"routes": {"ten": ["a@"]}}}"#).unwrap_err();
    assert!(e.to_string().contains("not an IP prefix"), "{e}");
    let e = Policy::parse(r#"{"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:x"]}}}"#).unwrap_err();
    assert!(e.to_string().contains("Tag \"tag:x\" is not defined"), "{e}");
}
