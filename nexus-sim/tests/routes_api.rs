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

/// The map entry `viewer` gets for `peer`.
fn peer_in_map(n: &nexus_sim::Running, viewer: u64, peer: u64) -> TailNode {
    let me = n.shared.store.node(viewer).expect("viewer");
    let m = nexus_sim::control::build_map(&n.shared, &me);
    m.peers.into_iter().flatten().find(|p| p.id == peer as i64).expect("peer in map")
}

// Multi-threaded: the admin CLI runs as a blocking child process while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_and_advertised_routes_reach_peers_maps() {
    let n = nexus_sim::start(Config { api_keys: vec![KEY.into()], stun_listen: None, ..Config::default() })
        .await
        .expect("nexus-sim starts");
    let st = &n.shared.store;
    let u = st.create_user("acme", "").unwrap();
    let reg = |k: u8, routes: &[&str]| {
        let mut h = Hostinfo { hostname: format!("n{k}"), ..Default::default() };
        h.rest.insert("RoutableIPs".into(), json!(routes));
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
    let n = nexus_sim::start(Config { api_keys: vec![KEY.into()], stun_listen: None, ..Config::default() })
        .await
        .expect("nexus-sim starts");
    let st = &n.shared.store;
    let acme = st.create_user("acme", "").unwrap();
    let globex = st.create_user("globex", "").unwrap();
    let reg =
        |k: u8, user: u64| register_online(&n, k, user, Hostinfo { hostname: format!("m{k}"), ..Default::default() });
    let (a, b, g) = (reg(11, acme.id), reg(12, acme.id), reg(13, globex.id));
    assert_eq!(peer_ids(&n, a.id), vec![b.id as i64]);
    assert!(peer_ids(&n, g.id).is_empty());

    // Move b to globex by id (as a JSON number): a no longer sees it, g does.
    let (code, v) = post(&n.url, &format!("/api/v1/node/{}/user", b.id), json!({"user": globex.id})).await;
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
