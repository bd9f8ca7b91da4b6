//! Control plane end to end on loopback, in process: orgs are isolated, changes propagate,
//! restarts reuse identity without a key, nexus-sim with `--db` survives a restart, and every
//! bad input ends in a clear error.

use citadel::mesh::{Config, ConnectError, Mesh};
use citadel_e2e::{eventually, free_port, Nexus};
use std::path::Path;
use std::time::Duration;

fn cfg(url: &str, key: Option<&str>, dir: &Path, host: &str) -> Config {
    let mut c = Config::new(Some(url.to_string()), key.map(str::to_string), dir.to_path_buf());
    c.hostname = Some(host.to_string());
    c.timeout = Duration::from_secs(5);
    c
}

fn peer_names(m: &Mesh) -> Vec<String> {
    m.status().peers.into_iter().map(|p| p.name).collect()
}

/// True when one of the filter sources (`*`, addresses or IPv4 prefixes) holds `ip`.
fn admits(srcs: &[String], ip: &str) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    srcs.iter().any(|s| {
        // An inclusive range `first-last` (nexus-sim writes an org's members so).
        if let Some((a, b)) = s.split_once('-') {
            return match (a.parse::<std::net::Ipv4Addr>(), b.parse::<std::net::Ipv4Addr>()) {
                (Ok(a), Ok(b)) => a <= ip && ip <= b,
                _ => false,
            };
        }
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        match (a.parse::<std::net::Ipv4Addr>(), l.parse::<u32>()) {
            (Ok(a), Ok(l)) if l <= 32 => {
                let m = u32::MAX.checked_shl(32 - l).unwrap_or(0);
                u32::from(a) & m == u32::from(ip) & m
            }
            _ => s == "*",
        }
    })
}

#[tokio::test]
async fn orgs_are_isolated_and_changes_reach_only_the_same_org() {
    let nx = Nexus::start().await;
    let acme = nx.key("acme", true);
    let globex = nx.key("globex", false);
    let t = tempfile::tempdir().unwrap();
    let a1 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a1"), "a1")).await.unwrap();
    let a2 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a2"), "a2")).await.unwrap();
    let g1 = Mesh::connect(cfg(&nx.url(), Some(&globex), &t.path().join("g1"), "g1")).await.unwrap();

    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2"] && peer_names(&a2) == ["a1"]).await);
    assert!(eventually(Duration::from_secs(5), || a1.status().peers[0].online == Some(true)).await);
    assert_eq!(a1.status().org, "acme");
    assert_eq!(g1.status().org, "globex");
    assert!(peer_names(&g1).is_empty(), "globex must not see acme: {:?}", g1.status());

    // The packet filter a node receives admits only its own org's addresses.
    let g_ip = g1.status().ipv4.unwrap();
    let filter = a1.netmap().borrow().packet_filter.clone();
    let srcs: Vec<String> = filter.iter().flat_map(|r| r.src_ips.clone()).collect();
    assert!(admits(&srcs, &a2.status().ipv4.unwrap()), "{srcs:?}");
    assert!(!admits(&srcs, &g_ip), "filter admits another org: {srcs:?}");

    // A change in acme (a new node) reaches acme's streams and not globex's.
    let mut g_map = g1.netmap();
    g_map.mark_unchanged();
    let a3 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a3"), "a3")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2", "a3"]).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!g_map.has_changed().unwrap(), "globex's map changed because of an acme join");

    // Leaving: a3 logs out, acme's peers drop it, Nexus forgets it.
    a3.logout().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2"] && peer_names(&a2) == ["a1"]).await);
    assert!(nx.running.shared.store.nodes(None).iter().all(|n| n.given_name != "a3"));
    assert!(!t.path().join("a3").join("identity.json").exists(), "logout clears the state directory");

    // Going offline is seen by peers.
    drop(a2);
    assert!(
        eventually(Duration::from_secs(5), || a1.status().peers.first().and_then(|p| p.online) == Some(false)).await
    );

    // Expiry by the admin reaches the peers.
    let id = nx.running.shared.store.nodes(None).iter().find(|n| n.given_name == "a2").unwrap().id;
    nx.running.shared.store.expire_node(id, None).unwrap();
    assert!(eventually(Duration::from_secs(5), || a1.netmap().borrow().peers.values().any(|p| p.expired)).await);
}

#[tokio::test]
async fn restart_reuses_identity_and_ip_without_a_key() {
    let nx = Nexus::start().await;
    let key = nx.key("acme", false); // single-use: a second registration would fail
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("n");
    let m = Mesh::connect(cfg(&nx.url(), Some(&key), &dir, "n1")).await.unwrap();
    let (ip, nk) = (m.status().ipv4, m.node_key());
    drop(m);
    let m = Mesh::connect(cfg(&nx.url(), None, &dir, "n1")).await.unwrap();
    assert_eq!(m.status().ipv4, ip);
    assert_eq!(m.node_key(), nk);
    assert!(m.is_connected());
    assert_eq!(nx.running.shared.store.nodes(None).len(), 1);
    // State files are private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["identity.json", "node.json", "netmap.json"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // A second process (here: a second Mesh) cannot take the same identity.
    let e = Mesh::connect(cfg(&nx.url(), None, &dir, "n1")).await.err().unwrap();
    assert!(matches!(e, ConnectError::State(citadel::state::StateError::Locked(_))), "{e}");
}

/// netmap.json (what the next start serves while it connects) holds the first map when
/// `connect` returns and follows the map after it: peers that join or leave later are in it
/// within the rewrite interval.
#[tokio::test]
async fn the_netmap_cache_follows_later_changes() {
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("a");
    let a = Mesh::connect(cfg(&nx.url(), Some(&key), &dir, "a")).await.unwrap();
    // The first map is on disk when `connect` returns (`citadel netcheck` reads it).
    let first: citadel::netmap::NetMap =
        serde_json::from_slice(&std::fs::read(dir.join("netmap.json")).unwrap()).unwrap();
    assert_eq!(first.self_node.key, a.node_key());
    let cached_peers = || {
        let nm: citadel::netmap::NetMap =
            serde_json::from_slice(&std::fs::read(dir.join("netmap.json")).unwrap_or_default()).unwrap_or_default();
        let mut names: Vec<String> = nm.peers.values().map(citadel::netmap::short_name).collect();
        names.sort();
        names
    };
    let mut joined = vec![];
    for name in ["b", "c", "d"] {
        joined.push(Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join(name), name)).await.unwrap());
    }
    assert!(eventually(Duration::from_secs(5), || peer_names(&a).len() == 3).await, "{:?}", peer_names(&a));
    assert!(eventually(Duration::from_secs(5), || cached_peers() == ["b", "c", "d"]).await, "{:?}", cached_peers());
    drop(joined.pop());
    nx.running
        .shared
        .store
        .delete_node(nx.running.shared.store.nodes(None).iter().find(|n| n.hostname == "d").unwrap().id)
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || cached_peers() == ["b", "c"]).await, "{:?}", cached_peers());
}

#[tokio::test]
async fn bad_keys_unreachable_nexus_and_corrupt_state_are_clear_errors() {
    let nx = Nexus::start().await;
    let t = tempfile::tempdir().unwrap();
    let e = Mesh::connect(cfg(&nx.url(), Some("nope"), &t.path().join("a"), "a")).await.err().unwrap();
    assert!(matches!(e, ConnectError::AuthRejected(ref m) if m.contains("invalid")), "{e}");

    let once = nx.key("acme", false);
    Mesh::connect(cfg(&nx.url(), Some(&once), &t.path().join("b"), "b")).await.unwrap();
    let e = Mesh::connect(cfg(&nx.url(), Some(&once), &t.path().join("c"), "c")).await.err().unwrap();
    assert!(matches!(e, ConnectError::AuthRejected(ref m) if m.contains("already used")), "{e}");

    let st = &nx.running.shared.store;
    let u = st.user_by_name("acme").unwrap();
    let expired =
        st.create_key(u.id, true, false, Some(chrono::Utc::now() - chrono::Duration::seconds(5)), vec![]).unwrap();
    let e = Mesh::connect(cfg(&nx.url(), Some(&expired.key), &t.path().join("d"), "d")).await.err().unwrap();
    assert!(matches!(e, ConnectError::AuthRejected(ref m) if m.contains("expired")), "{e}");

    let e = Mesh::connect(cfg(&nx.url(), None, &t.path().join("e"), "e")).await.err().unwrap();
    assert!(matches!(e, ConnectError::NeedsAuth { .. }), "{e}");

    // Nothing listens on this port: a bounded, clear failure.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let start = std::time::Instant::now();
    let e = Mesh::connect(cfg(&dead, Some("k"), &t.path().join("f"), "f")).await.err().unwrap();
    assert!(matches!(e, ConnectError::Control(citadel::control::ControlError::Unreachable(..))), "{e}");
    assert!(start.elapsed() < Duration::from_secs(6));

    std::fs::create_dir_all(t.path().join("g")).unwrap();
    std::fs::write(t.path().join("g/identity.json"), "{\"machine_key\": 12").unwrap();
    let e = Mesh::connect(cfg(&nx.url(), Some("k"), &t.path().join("g"), "g")).await.err().unwrap();
    assert!(matches!(e, ConnectError::State(citadel::state::StateError::Corrupt { .. })), "{e}");
}

#[tokio::test]
async fn nexus_restart_with_db_keeps_nodes_and_clients_reconnect_without_reauth() {
    let t = tempfile::tempdir().unwrap();
    let port = free_port();
    let ncfg = || nexus_sim::Config {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        db: Some(t.path().join("nexus.db")),
        ..Default::default()
    };
    let nx = Nexus::start_with(ncfg()).await;
    let key = nx.key("acme", true);
    let a = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("a"), "a")).await.unwrap();
    let ip = a.status().ipv4;
    drop(nx);
    assert!(eventually(Duration::from_secs(5), || !a.is_connected()).await, "drop of the server is noticed");
    let nx = Nexus::start_with(ncfg()).await;
    assert_eq!(nx.running.shared.store.nodes(None).len(), 1, "nodes survive the restart");
    assert!(eventually(Duration::from_secs(20), || a.is_connected()).await, "client reconnects by itself");
    assert_eq!(a.status().ipv4, ip);
    // The pre-auth key survived too.
    let b = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("b"), "b")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a) == ["b"] && peer_names(&b) == ["a"]).await);
}

#[tokio::test]
async fn dropped_streams_reconnect_and_resume_updates() {
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("a"), "a")).await.unwrap();
    let mut connected = a.connected();
    nx.running.shared.faults.drop_streams();
    assert!(tokio::time::timeout(Duration::from_secs(5), connected.wait_for(|c| !*c)).await.is_ok());
    assert!(eventually(Duration::from_secs(10), || a.is_connected()).await);
    let _b = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("b"), "b")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a) == ["b"]).await);
    assert_eq!(nx.running.shared.store.nodes(None).len(), 2);
}

#[tokio::test]
async fn process_global_facade_as_the_product_page_documents_it() {
    let nx = Nexus::start().await;
    let key = nx.key("acme", false);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("global");
    let dir = dir.to_str().unwrap();
    assert!(!citadel::network::is_global_connected());
    assert_eq!(citadel::network::global_ipv4(), "");
    citadel::network::connect(&nx.url(), &key, dir).await.unwrap();
    assert!(citadel::network::is_global_connected());
    let ip = citadel::network::global_ipv4();
    assert!(ip.starts_with("100."), "{ip}");
    // Reconnecting with an empty key reuses the saved registration (the key was single-use).
    citadel::network::connect(&nx.url(), "", dir).await.unwrap();
    assert_eq!(citadel::network::global_ipv4(), ip);
    citadel::network::logout().await.unwrap();
    assert!(!citadel::network::is_global_connected());
    assert_eq!(citadel::network::global_ipv4(), "");
    assert!(nx.running.shared.store.nodes(None).is_empty(), "logout removed the node");
}

#[tokio::test]
async fn endpoint_changes_reach_the_org_promptly() {
    use citadel::control::{fetch_server_key, ControlConn};
    use citadel::keys::{NodePublic, PrivateKey};
    use citadel::net::TokioNet;
    use citadel::tailcfg::{MapRequest, RegisterAuth, RegisterRequest, CAPABILITY_VERSION};
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("a"), "a")).await.unwrap();

    // A second machine speaks the protocol by hand: register, then a lite endpoint update.
    let to = Duration::from_secs(5);
    let machine = PrivateKey::generate(&mut rand_core());
    let node = PrivateKey::generate(&mut rand_core());
    let server = fetch_server_key(&TokioNet, &nx.url(), to).await.unwrap();
    let mut conn = ControlConn::dial(&TokioNet, &nx.url(), &machine, &server, to).await.unwrap();
    let nk = NodePublic(node.public_bytes());
    let r = conn
        .register(&RegisterRequest {
            version: CAPABILITY_VERSION,
            node_key: nk,
            auth: Some(RegisterAuth { auth_key: key.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.machine_authorized, "{r:?}");
    let lite = |eps: Vec<&str>| MapRequest {
        version: CAPABILITY_VERSION,
        node_key: nk,
        endpoints: eps.into_iter().map(str::to_string).collect(),
        omit_peers: true,
        ..Default::default()
    };
    conn.map(&lite(vec!["192.0.2.1:41641"])).await.unwrap();
    let eps = |m: &Mesh| m.status().peers.first().map(|p| p.endpoints.clone()).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || eps(&a) == ["192.0.2.1:41641"]).await, "{:?}", a.status());
    conn.map(&lite(vec!["198.51.100.7:1234", "192.0.2.1:41641"])).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || eps(&a).len() == 2).await, "{:?}", a.status());
}

/// A join reaches the members that were already streaming as one delta the org shares
/// (the new entry plus the org's filter): each member's filter then admits the newcomer to
/// the member's own address and no one else's org, and the newcomer really connects.
#[tokio::test]
async fn a_join_delta_shared_by_the_org_admits_the_newcomer() {
    let nx = Nexus::start().await;
    let acme = nx.key("acme", true);
    let globex = nx.key("globex", true);
    let t = tempfile::tempdir().unwrap();
    let a1 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a1"), "a1")).await.unwrap();
    let a2 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a2"), "a2")).await.unwrap();
    let g1 = Mesh::connect(cfg(&nx.url(), Some(&globex), &t.path().join("g1"), "g1")).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2"] && peer_names(&a2) == ["a1"]).await);
    let sends = || nx.running.shared.metrics.map_sends.load(std::sync::atomic::Ordering::Relaxed);
    let before = sends();

    let a3 = Mesh::connect(cfg(&nx.url(), Some(&acme), &t.path().join("a3"), "a3")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || peer_names(&a1) == ["a2", "a3"] && peer_names(&a2) == ["a1", "a3"]).await
    );
    assert!(sends() > before, "the join went out as no map message");
    let new_ip = a3.status().ipv4.unwrap();
    let g_ip = g1.status().ipv4.unwrap();
    let f1 = a1.netmap().borrow().packet_filter.clone();
    assert_eq!(f1, a2.netmap().borrow().packet_filter, "the org's members hold different filters");
    for m in [&a1, &a2] {
        let own = m.status().ipv4.unwrap();
        let lets_in = |src: &str| {
            f1.iter().any(|r| {
                let dsts: Vec<String> = r.dst_ports.iter().map(|d| d.ip.clone()).collect();
                admits(&r.src_ips, src) && admits(&dsts, &own)
            })
        };
        assert!(lets_in(&new_ip), "{own}'s filter does not admit the newcomer {new_ip}: {f1:?}");
        assert!(!lets_in(&g_ip), "{own}'s filter admits another org's {g_ip}: {f1:?}");
    }

    // The data plane applies it: the newcomer opens a connection to a1 and gets an echo.
    citadel_e2e::serve_echo(a1.listen_tcp(7000).unwrap());
    assert!(eventually(Duration::from_secs(5), || a3.resolve("a1").is_some()).await);
    let ip = a3.resolve("a1").unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(10), a3.dial_tcp((ip, 7000).into())).await.unwrap().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), citadel_e2e::echo_through(&mut s, b"through the filter"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"through the filter");
}

fn rand_core() -> impl rand::RngCore {
    rand::thread_rng()
}

/// Two nodes of one org, a2 echoing on port 7000 and a1 through to it: (a1, a2, a2's IP).
async fn echo_pair(nx: &Nexus, dir: &Path) -> (Mesh, Mesh, std::net::IpAddr) {
    const T: Duration = Duration::from_secs(10);
    let acme = nx.key("acme", true);
    let a1 = Mesh::connect(cfg(&nx.url(), Some(&acme), &dir.join("a1"), "a1")).await.unwrap();
    let a2 = Mesh::connect(cfg(&nx.url(), Some(&acme), &dir.join("a2"), "a2")).await.unwrap();
    assert!(eventually(T, || peer_names(&a1) == ["a2"] && peer_names(&a2) == ["a1"]).await);
    citadel_e2e::serve_echo(a2.listen_tcp(7000).unwrap());
    let ip = a1.resolve("a2").unwrap();
    assert_eq!(tokio::time::timeout(T, echo(&a1, ip)).await.unwrap().as_deref(), Some(&b"hello"[..]));
    (a1, a2, ip)
}

/// Gives node `name` the key expiry `at` in Nexus's store (its org is told, as of any change of
/// its record) and returns its ID.
fn set_expiry(nx: &Nexus, name: &str, at: chrono::DateTime<chrono::Utc>) -> u64 {
    let store = &nx.running.shared.store;
    let id = store.nodes(None).into_iter().find(|n| n.given_name == name).unwrap().id;
    store.expire_node(id, Some(at)).unwrap();
    id
}

/// "hello" echoed by `ip`'s port 7000 through `m`, or `None`.
async fn echo(m: &Mesh, ip: std::net::IpAddr) -> Option<Vec<u8>> {
    let mut s = m.dial_tcp((ip, 7000).into()).await.ok()?;
    citadel_e2e::echo_through(&mut s, b"hello").await.ok()
}

/// A peer's key expiring, with Nexus up: every member's map marks it expired when the time
/// passes (not only in the next full map) and their data planes drop its tunnel, so an expired
/// node reaches nobody even while it keeps running. Members mark it by their own clocks too
/// (the next test), so that Nexus tells the org is asserted in nexus-sim, by
/// `an_expiry_passing_reaches_peer_streams_when_announced`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_peer_key_is_told_to_the_org_and_its_tunnel_dropped() {
    const T: Duration = Duration::from_secs(10);
    let nx = Nexus::start().await;
    let t = tempfile::tempdir().unwrap();
    let (a1, _a2, ip) = echo_pair(&nx, t.path()).await;

    // a2's key gets an expiry 1.5 s ahead (a2 is told, as of any change of its record).
    let id = set_expiry(&nx, "a2", chrono::Utc::now() + chrono::Duration::milliseconds(1500));
    let expired_in_a1 = || a1.netmap().borrow().peers.values().any(|p| p.id == id as i64 && p.expired);
    assert!(!expired_in_a1());
    assert!(eventually(T, expired_in_a1).await, "a1's map never marked a2 expired");
    // a1 no longer holds a tunnel to a2: nothing gets through (a2 itself still runs).
    assert_eq!(tokio::time::timeout(Duration::from_secs(4), echo(&a1, ip)).await.ok().flatten(), None);
}

/// A peer's key expiring while Nexus is unreachable: no server tells the org, yet each member
/// marks the peer expired by its own clock when the time passes and its data plane drops the
/// tunnel, as a Tailscale client does. Until then the tunnel works without the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_key_expiring_while_nexus_is_down_is_dropped_by_the_clock() {
    const T: Duration = Duration::from_secs(10);
    let nx = Nexus::start().await;
    let t = tempfile::tempdir().unwrap();
    let (a1, a2, ip) = echo_pair(&nx, t.path()).await;

    // a2's key gets an expiry 4 s ahead; a1 learns it (and a2 its own), then Nexus goes away.
    let expiry = chrono::Utc::now() + chrono::Duration::seconds(4);
    let id = set_expiry(&nx, "a2", expiry) as i64;
    let a2_in_a1 = || a1.netmap().borrow().peers.get(&id).map(|p| (p.key_expiry, p.expired));
    assert!(eventually(T, || a2_in_a1() == Some((Some(expiry), false))).await, "a1 never learned a2's expiry");
    assert!(eventually(T, || a2.status().key_expiry.is_some()).await, "a2 never learned its own expiry");
    assert!(!a2.status().key_expired);
    nx.running.stop();
    // Before the expiry the tunnel works without Nexus.
    assert_eq!(tokio::time::timeout(T, echo(&a1, ip)).await.unwrap().as_deref(), Some(&b"hello"[..]));
    assert!(chrono::Utc::now() < expiry, "the machine was too slow to see the tunnel before the expiry");
    assert!(eventually(T, || a2_in_a1() == Some((Some(expiry), true))).await, "a1 never marked a2 expired");
    assert!(chrono::Utc::now() >= expiry, "a2 was marked expired before its expiry");
    assert_eq!(tokio::time::timeout(Duration::from_secs(4), echo(&a1, ip)).await.ok().flatten(), None);
    assert!(a1.status().peers.iter().any(|p| p.expired), "a1's status shows a2 expired");
    assert!(a2.status().key_expired, "a2's own status says its key expired, with Nexus still away");
}

/// `citadel up` asks for zstd maps, as Tailscale's clients do: with 100 other members in its
/// org (most of a map's bytes are keys, which compress least) its full map costs Nexus less
/// than half the bytes the same map costs a client that asks for plain JSON, and it still
/// holds every peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_asks_for_compressed_maps() {
    use citadel::control::{fetch_server_key, ControlConn};
    use citadel::keys::{NodePublic, PrivateKey};
    use citadel::net::TokioNet;
    use citadel::tailcfg::{MapRequest, RegisterAuth, RegisterRequest, CAPABILITY_VERSION};
    const OTHERS: usize = 100;
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let to = Duration::from_secs(10);
    let server = fetch_server_key(&TokioNet, &nx.url(), to).await.unwrap();
    let mut members = vec![];
    for i in 0..OTHERS {
        let machine = PrivateKey::generate(&mut rand_core());
        let node = PrivateKey::generate(&mut rand_core());
        let mut conn = ControlConn::dial(&TokioNet, &nx.url(), &machine, &server, to).await.unwrap();
        let req = RegisterRequest {
            version: CAPABILITY_VERSION,
            node_key: NodePublic(node.public_bytes()),
            hostinfo: Some(citadel::tailcfg::Hostinfo { hostname: format!("m{i}"), ..Default::default() }),
            auth: Some(RegisterAuth { auth_key: key.clone(), ..Default::default() }),
            ..Default::default()
        };
        let r = tokio::time::timeout(to, conn.register(&req)).await.unwrap().unwrap();
        assert!(r.machine_authorized, "{r:?}");
        members.push((conn, node));
    }
    let bytes = || nx.running.shared.metrics.map_bytes.load(std::sync::atomic::Ordering::Relaxed);

    let b0 = bytes();
    let t = tempfile::tempdir().unwrap();
    let a = Mesh::connect(cfg(&nx.url(), Some(&key), &t.path().join("a"), "a")).await.unwrap();
    assert!(eventually(to, || a.status().peers.len() == OTHERS).await, "{} peers", a.status().peers.len());
    let node_map = bytes() - b0;

    // One of the registered members reads its (equally large) map as plain JSON.
    let (conn, node) = &mut members[0];
    let b1 = bytes();
    let plain = MapRequest {
        version: CAPABILITY_VERSION,
        node_key: NodePublic(node.public_bytes()),
        stream: true,
        ..Default::default()
    };
    let mut s = tokio::time::timeout(to, conn.map(&plain)).await.unwrap().unwrap();
    let m = tokio::time::timeout(to, s.next()).await.unwrap().unwrap().expect("a map");
    assert_eq!(m.peers.as_ref().map_or(0, Vec::len), OTHERS, "the plain map's peers");
    // Its going online is a delta to `a` too, a few hundred bytes at most.
    let plain_map = bytes() - b1;
    eprintln!("map bytes: the node {node_map}, plain JSON {plain_map}");
    assert!(
        node_map * 2 < plain_map,
        "the node's map took {node_map} bytes, a plain JSON map of the same org {plain_map}"
    );
}
