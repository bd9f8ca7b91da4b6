//! Routes as Headscale serves them: a node advertises prefixes in Hostinfo, an admin approves
//! some through REST or `nodes approve-routes`, and peers' maps then carry the served ones in
//! the router's AllowedIPs and PrimaryRoutes (exit routes in AllowedIPs only).

use citadel_proto::keys::{MachinePublic, NodePublic};
use citadel_proto::tailcfg::{Hostinfo, Node as TailNode};
use nexus_sim::Config;
use serde_json::{json, Value};
use std::process::Command;

const KEY: &str = "nsapi-routes-test-key-0123456789";

fn client() -> reqwest::Client {
    let tls = nexus_sim::tls::client_config().expect("TLS client config");
    reqwest::Client::builder().use_preconfigured_tls(tls).build().expect("client")
}

async fn approve(url: &str, id: u64, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{url}/api/v1/node/{id}/approve_routes"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

/// Registers machine `k` (machine and node key bytes all `k`) for `user` and marks it online.
fn register_online(n: &nexus_sim::Running, k: u8, user: u64, h: Hostinfo) -> nexus_sim::store::Node {
    let st = &n.shared.store;
    let node = st
        .register(
            MachinePublic([k; 32]),
            NodePublic([k; 32]),
            user,
            h,
            false,
            vec![],
            None,
            "authkey",
            n.shared.cfg.ipv4_base,
            n.shared.cfg.ipv6_base,
        )
        .unwrap();
    st.session(node.id, true);
    node
}

/// nexus-sim under the built-in policy with the orgs acme and globex; returns their ids.
async fn start_with_two_orgs() -> (nexus_sim::Running, u64, u64) {
    let n = nexus_sim::start(Config { api_keys: vec![KEY.into()], stun_listen: None, ..Config::default() })
        .await
        .expect("nexus-sim starts");
    let acme = n.shared.store.create_user("acme", "").unwrap().id;
    let globex = n.shared.store.create_user("globex", "").unwrap().id;
    (n, acme, globex)
}

/// The map entry `viewer` gets for `peer`.
#[track_caller]
fn peer_in_map(n: &nexus_sim::Running, viewer: u64, peer: u64) -> TailNode {
    let me = n.shared.store.node(viewer).expect("viewer");
    let m = nexus_sim::control::build_map(&n.shared, &me);
    m.peers.into_iter().flatten().find(|p| p.id == peer as i64).expect("peer in map")
}

// Multi-threaded: the admin CLI runs as a blocking child process while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_and_advertised_routes_reach_peers_maps() {
    // The org may reach its nodes and 10.0.0.0/8: the routes there reach its maps.
    let policy = r#"{"acls": [{"action": "accept", "src": ["acme@"], "dst": ["acme@:*", "10.0.0.0/8:*"]}]}"#;
    let n = nexus_sim::start(Config {
        api_keys: vec![KEY.into()],
        policy: Some(policy.into()),
        stun_listen: None,
        ..Config::default()
    })
    .await
    .expect("nexus-sim starts");
    let st = &n.shared.store;
    let u = st.create_user("acme", "").unwrap();
    let reg = |k: u8, routes: &[&str]| {
        let mut h = Hostinfo { hostname: format!("n{k}"), ..Default::default() };
        h.rest.insert("RoutableIPs", json!(routes));
        register_online(&n, k, u.id, h)
    };
    let router = reg(1, &["10.1.0.0/16", "10.2.0.0/16", "0.0.0.0/0", "::/0"]);
    let viewer = reg(2, &[]);
    let own = |p: &TailNode| p.addresses.clone();

    // Advertised but not approved: nothing beyond its own addresses.
    let p = peer_in_map(&n, viewer.id, router.id);
    assert_eq!(p.allowed_ips, own(&p));
    assert!(p.primary_routes.is_empty());

    // Approve a subnet (and one not advertised) and the exit route.
    let (code, v) = approve(&n.url, router.id, json!({"routes": ["10.1.0.0/16", "10.9.0.0/16", "0.0.0.0/0"]})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["node"]["approvedRoutes"], json!(["0.0.0.0/0", "10.1.0.0/16", "10.9.0.0/16", "::/0"]));
    assert_eq!(v["node"]["availableRoutes"], json!(["0.0.0.0/0", "10.1.0.0/16", "10.2.0.0/16", "::/0"]));
    assert_eq!(v["node"]["subnetRoutes"], json!(["0.0.0.0/0", "10.1.0.0/16", "::/0"]));
    let p = peer_in_map(&n, viewer.id, router.id);
    let (v4, v6) = (p.addresses[0].clone(), p.addresses[1].clone());
    assert_eq!(
        p.allowed_ips,
        vec!["0.0.0.0/0".to_string(), "10.1.0.0/16".into(), v4.clone(), "::/0".into(), v6.clone()]
    );
    assert_eq!(p.primary_routes, vec!["10.1.0.0/16".to_string()]);

    // Bad lists are refused and change nothing.
    for bad in [json!({"routes": ["10.1.0.1/16"]}), json!({"routes": ["ten"]}), json!({"routes": "10.0.0.0/8"})] {
        let (code, v) = approve(&n.url, router.id, bad.clone()).await;
        assert_eq!(code, 400, "{bad} -> {v}");
    }
    assert_eq!(peer_in_map(&n, viewer.id, router.id).primary_routes, vec!["10.1.0.0/16".to_string()]);
    let (code, _) = approve(&n.url, 999, json!({"routes": []})).await;
    assert_eq!(code, 404);

    // The admin CLI replaces the list: an empty one withdraws every route.
    let exe = env!("CARGO_BIN_EXE_nexus-sim");
    let out = Command::new(exe)
        .args(["nodes", "approve-routes", "--url", &n.url, "--api-key", KEY, "-i", &router.id.to_string()])
        .args(["--routes", "10.2.0.0/16"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = peer_in_map(&n, viewer.id, router.id);
    assert_eq!(p.allowed_ips, vec!["10.2.0.0/16".to_string(), v4, v6]);
    let out = Command::new(exe)
        .args(["nodes", "approve-routes", "--url", &n.url, "--api-key", KEY, "-i", &router.id.to_string()])
        .args(["--routes", "10.2.0.1/16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("host bits"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(exe)
        .args(["nodes", "approve-routes", "--url", &n.url, "--api-key", KEY, "-i", &router.id.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = peer_in_map(&n, viewer.id, router.id);
    assert_eq!(p.allowed_ips, own(&p));
    assert!(p.primary_routes.is_empty());
}

async fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client().post(format!("{url}{path}")).bearer_auth(KEY).json(&body).send().await.expect("request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn peer_ids(n: &nexus_sim::Running, viewer: u64) -> Vec<i64> {
    let me = n.shared.store.node(viewer).expect("viewer");
    let m = nexus_sim::control::build_map(&n.shared, &me);
    let mut v: Vec<i64> = m.peers.into_iter().flatten().map(|p| p.id).collect();
    v.sort();
    v
}

/// `POST /api/v1/node/{id}/user` moves a node between orgs (REST and `nodes move`), and
/// `POST /api/v1/node/{id}/tags` replaces its tags (REST and `nodes tag`); both change the maps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_and_tags_change_the_maps() {
    let (n, acme, globex) = start_with_two_orgs().await;
    let st = &n.shared.store;
    let reg =
        |k: u8, user: u64| register_online(&n, k, user, Hostinfo { hostname: format!("m{k}"), ..Default::default() });
    let (a, b, g) = (reg(11, acme), reg(12, acme), reg(13, globex));
    assert_eq!(peer_ids(&n, a.id), vec![b.id as i64]);
    assert!(peer_ids(&n, g.id).is_empty());

    // Move b to globex by id (as a JSON number): a no longer sees it, g does.
    let (code, v) = post(&n.url, &format!("/api/v1/node/{}/user", b.id), json!({"user": globex})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["node"]["user"]["name"], "globex");
    assert!(peer_ids(&n, a.id).is_empty());
    assert_eq!(peer_ids(&n, g.id), vec![b.id as i64]);
    let (code, _) = post(&n.url, &format!("/api/v1/node/{}/user", b.id), json!({"user": "nosuchorg"})).await;
    assert_eq!(code, 404);

    // And back through the CLI, by name.
    let url = n.url.clone();
    let bid = b.id.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nexus-sim"))
            .args(["nodes", "move", "-i", &bid, "-u", "acme"])
            .env("NEXUS_URL", &url)
            .env("NEXUS_API_KEY", KEY)
            .output()
            .expect("nexus-sim nodes move")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(peer_ids(&n, a.id), vec![b.id as i64]);
    assert!(peer_ids(&n, g.id).is_empty());

    // Tags: bad ones are refused and change nothing; good ones are set, sorted, in the API
    // and in the node's own map entry.
    let (code, _) = post(&n.url, &format!("/api/v1/node/{}/tags", a.id), json!({"tags": ["server"]})).await;
    assert_eq!(code, 400);
    assert!(st.node(a.id).unwrap().tags.is_empty());
    let (code, v) =
        post(&n.url, &format!("/api/v1/node/{}/tags", a.id), json!({"tags": ["tag:web", "tag:db", "tag:web"]})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["node"]["forcedTags"], json!(["tag:db", "tag:web"]));
    let me = st.node(a.id).unwrap();
    let m = nexus_sim::control::build_map(&n.shared, &me);
    assert_eq!(m.node.expect("self node").tags, vec!["tag:db".to_string(), "tag:web".to_string()]);
    let url = n.url.clone();
    let aid = a.id.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nexus-sim"))
            .args(["nodes", "tag", "-i", &aid])
            .env("NEXUS_URL", &url)
            .env("NEXUS_API_KEY", KEY)
            .output()
            .expect("nexus-sim nodes tag")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(st.node(a.id).unwrap().tags.is_empty(), "no --tags removes them all");
}

async fn put_policy(url: &str, text: &str) -> (u16, Value) {
    let r = client()
        .put(format!("{url}/api/v1/policy"))
        .bearer_auth(KEY)
        .json(&json!({"policy": text}))
        .send()
        .await
        .expect("request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn hostinfo(name: &str, routes: &[&str]) -> Hostinfo {
    let mut h = Hostinfo { hostname: name.into(), ..Default::default() };
    h.rest.insert("RoutableIPs", json!(routes));
    h
}

/// Headscale's route reduction: a router's approved routes reach only the maps of nodes the
/// policy lets reach them; `autoApprovers` approve advertised routes when a policy is set,
/// never removing one; the built-in policy offers no subnet of an org to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_only_the_nodes_the_policy_lets_reach_them() {
    let (n, acme, globex) = start_with_two_orgs().await;
    let st = &n.shared.store;
    let router = register_online(&n, 31, acme, hostinfo("router", &["10.1.0.0/16", "10.2.0.0/16"]));
    let exit = register_online(&n, 32, acme, hostinfo("exit", &["0.0.0.0/0", "::/0"]));
    let dev = register_online(&n, 33, acme, hostinfo("dev", &[]));
    let ops = register_online(&n, 34, globex, hostinfo("ops", &[]));

    // Built-in policy: approved subnets reach nobody (no rule reaches 10.x); the org's exit
    // node is offered to its members (their rules reach IPv4 and IPv6 addresses).
    st.set_approved_routes(router.id, vec!["10.1.0.0/16".into(), "10.2.0.0/16".into()]).unwrap();
    let p = peer_in_map(&n, dev.id, router.id);
    assert_eq!(p.allowed_ips, p.addresses);
    assert!(p.primary_routes.is_empty());
    st.set_approved_routes(exit.id, vec!["0.0.0.0/0".into(), "::/0".into()]).unwrap();
    let p = peer_in_map(&n, dev.id, exit.id);
    assert!(p.allowed_ips.contains(&"0.0.0.0/0".to_string()) && p.allowed_ips.contains(&"::/0".to_string()), "{p:?}");
    st.set_approved_routes(router.id, vec![]).unwrap();
    st.set_approved_routes(exit.id, vec![]).unwrap();

    // acme's people reach 10.1.0.0/16 only; globex's ops reaches 10.2.0.0/16 on port 22 and
    // nothing else. autoApprovers: acme approves 10.0.0.0/8, exit routes need tag:exit.
    let policy = r#"{
      "tagOwners": {"tag:exit": ["acme@"]},
      "autoApprovers": {"routes": {"10.0.0.0/8": ["acme@"]}, "exitNode": ["tag:exit"]},
      "acls": [
        {"action": "accept", "src": ["acme@"], "dst": ["acme@:*", "10.1.0.0/16:*"]},
        {"action": "accept", "src": ["acme@"], "dst": ["autogroup:internet:*"]},
        {"action": "accept", "src": ["globex@"], "dst": ["10.2.0.0/16:22"]},
      ],
    }"#;
    let (code, v) = put_policy(&n.url, policy).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(st.node(router.id).unwrap().approved_routes, vec!["10.1.0.0/16", "10.2.0.0/16"], "auto-approved");
    assert!(st.node(exit.id).unwrap().approved_routes.is_empty(), "exit routes need tag:exit");

    let p = peer_in_map(&n, dev.id, router.id);
    assert_eq!(p.primary_routes, vec!["10.1.0.0/16".to_string()]);
    assert_eq!(p.allowed_ips, vec!["10.1.0.0/16".to_string(), p.addresses[0].clone(), p.addresses[1].clone()]);
    // globex's node sees acme's router only for the route it may reach, and not acme's others.
    let p = peer_in_map(&n, ops.id, router.id);
    assert_eq!(p.primary_routes, vec!["10.2.0.0/16".to_string()]);
    assert_eq!(p.allowed_ips, vec!["10.2.0.0/16".to_string(), p.addresses[0].clone(), p.addresses[1].clone()]);
    assert_eq!(peer_ids(&n, ops.id), vec![router.id as i64], "the router is ops' only peer");
    // The router's filter admits ops to its subnet on port 22.
    let me = st.node(router.id).unwrap();
    let m = nexus_sim::control::build_map(&n.shared, &me);
    let f = m.packet_filter.unwrap_or_default();
    assert!(
        f.iter()
            .any(|r| r.dst_ports.iter().any(|d| d.ip == "10.2.0.0/16" && d.ports.first == 22 && d.ports.last == 22)),
        "{f:?}"
    );

    // Once tagged tag:exit, the exit node's routes are approved when the policy is set again;
    // approvals an admin removed come back, and none is ever removed by it.
    st.set_tags(exit.id, vec!["tag:exit".into()]).unwrap();
    st.set_approved_routes(router.id, vec!["10.1.0.0/16".into()]).unwrap();
    let (code, v) = put_policy(&n.url, policy).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(st.node(exit.id).unwrap().approved_routes, vec!["0.0.0.0/0", "::/0"]);
    assert_eq!(st.node(router.id).unwrap().approved_routes, vec!["10.1.0.0/16", "10.2.0.0/16"]);
    // The tagged exit node is dev's peer through the internet rule alone, with its routes.
    let p = peer_in_map(&n, dev.id, exit.id);
    let (v4, v6) = (p.addresses[0].clone(), p.addresses[1].clone());
    assert_eq!(p.allowed_ips, vec!["0.0.0.0/0".to_string(), v4, "::/0".into(), v6]);
    // ops reaches no internet: the exit node is not its peer.
    assert_eq!(peer_ids(&n, ops.id), vec![router.id as i64]);
}
