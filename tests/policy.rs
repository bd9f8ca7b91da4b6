//! The policy as mesh nodes live it: a policy change reaches every affected map promptly,
//! and a deleted or expired node's map stream ends within a second and stays refused.

use citadel::mesh::{Config, Mesh};
use citadel_e2e::{eventually, Nexus};
use std::path::Path;
use std::time::{Duration, Instant};

fn cfg(url: &str, key: &str, dir: &Path, host: &str) -> Config {
    let mut c = Config::new(Some(url.to_string()), Some(key.to_string()), dir.to_path_buf());
    c.hostname = Some(host.to_string());
    c.timeout = Duration::from_secs(5);
    c
}

fn peer_names(m: &Mesh) -> Vec<String> {
    m.status().peers.into_iter().map(|p| p.name).collect()
}

#[tokio::test]
async fn policy_changes_reach_every_affected_map() {
    let nx = Nexus::start().await;
    let (acme, globex) = (nx.key("acme", true), nx.key("globex", true));
    let t = tempfile::tempdir().unwrap();
    let a1 = Mesh::connect(cfg(&nx.url(), &acme, &t.path().join("a1"), "a1")).await.unwrap();
    let a2 = Mesh::connect(cfg(&nx.url(), &acme, &t.path().join("a2"), "a2")).await.unwrap();
    let g1 = Mesh::connect(cfg(&nx.url(), &globex, &t.path().join("g1"), "g1")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2"]).await);
    assert!(peer_names(&g1).is_empty());

    // acme's a1 may ssh into globex's g1; nothing else crosses.
    let policy = r#"{
      "groups": {"group:admins": ["acme@"]},
      "acls": [
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
        {"action": "accept", "src": ["group:admins"], "dst": ["globex@:22"]},
      ],
    }"#;
    let start = Instant::now();
    nx.running.shared.policy.set(policy).unwrap();
    assert!(
        eventually(Duration::from_secs(2), || peer_names(&g1) == ["a1", "a2"]
            && peer_names(&a1) == ["a2", "g1"]
            && peer_names(&a2) == ["a1", "g1"])
        .await,
        "a1 {:?} a2 {:?} g1 {:?}",
        peer_names(&a1),
        peer_names(&a2),
        peer_names(&g1)
    );
    println!("policy change reached three maps in {:?}", start.elapsed());
    let g_filter = g1.netmap().borrow().packet_filter.clone();
    let ports: Vec<(u16, u16)> =
        g_filter.iter().flat_map(|r| r.dst_ports.iter().map(|d| (d.ports.first, d.ports.last))).collect();
    assert!(ports.contains(&(22, 22)), "{g_filter:?}");
    assert!(a1.netmap().borrow().packet_filter.iter().all(|r| r.dst_ports.iter().all(|d| d.ports.first == 0)));

    // A refused policy changes nothing; the built-in one takes the cross-org peers away.
    assert!(nx.running.shared.policy.set("{\"acls\": [{\"action\": \"deny\"}]}").is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(peer_names(&g1), ["a1", "a2"]);
    nx.running.shared.policy.set(nexus_sim::policy::ORG_ISOLATION).unwrap();
    assert!(eventually(Duration::from_secs(2), || peer_names(&g1).is_empty() && peer_names(&a1) == ["a2"]).await);
}

#[tokio::test]
async fn deleted_and_expired_nodes_lose_their_stream_within_a_second() {
    let nx = Nexus::start().await;
    // Single-use keys, so neither node can simply register again.
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(cfg(&nx.url(), &nx.key("acme", false), &t.path().join("a"), "a")).await.unwrap();
    let b = Mesh::connect(cfg(&nx.url(), &nx.key("acme", false), &t.path().join("b"), "b")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || a.is_connected() && b.is_connected()).await);
    let st = &nx.running.shared.store;
    let id = |name: &str| st.nodes(None).into_iter().find(|n| n.given_name == name).unwrap().id;

    st.expire_node(id("a")).unwrap();
    let mut ca = a.connected();
    assert!(tokio::time::timeout(Duration::from_secs(1), ca.wait_for(|c| !*c)).await.is_ok(), "expired stream open");
    st.delete_node(id("b")).unwrap();
    let mut cb = b.connected();
    assert!(tokio::time::timeout(Duration::from_secs(1), cb.wait_for(|c| !*c)).await.is_ok(), "deleted stream open");
    // Their map requests are refused from now on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!a.is_connected() && !b.is_connected());
    assert_eq!(st.nodes(None).len(), 1, "only the expired node remains");
}
