//! nexus-sim's DERP relay and STUN server with citadel's DERP client: relaying within and
//! across regions, reconnecting through outages and restarts, surviving hostile input, client
//! verification, mesh watchers, the standalone `nexus-sim derp` relay, and a real Tailscale
//! client (Caddy with tsnet) homing on nexus-sim's DERP.

use citadel::derp::{ClientInfo, Frame, PeerGoneReason};
use citadel::derphttp::{self, DerpClient, DerpConn, DerpConnOptions, DerpTarget, Received};
use citadel::keys::{MachinePublic, NodePublic, PrivateKey};
use citadel::net::{Net, TokioNet};
use citadel_e2e::{bin, eventually, real_peers, start_caddy, Netns, Nexus, NsNexus};
use nexus_sim::{Config, DerpMode};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// Defaults with client verification off: these tests log in with fresh keys that are no
/// registered nodes (on a plain-http server: see [`opt_in_unverified_relays`]).
fn open_relay() -> Config {
    Config { derp_verify_clients: false, ..Config::default() }
}

fn key() -> PrivateKey {
    PrivateKey::generate(&mut rand::thread_rng())
}

fn public(k: &PrivateKey) -> NodePublic {
    NodePublic(k.public_bytes())
}

/// This file tests the relay protocol, over plain HTTP and over the self-signed TLS of a server
/// without a certificate (map nodes marked `InsecureForTests`), so it opts in to those explicitly;
/// certificate checks are tests/tls.rs's subject.
fn opt_in_unverified_relays() {
    std::env::set_var(citadel::derphttp::DERP_INSECURE_ENV, "1");
}

async fn connect(target: impl Into<DerpTarget>, k: &PrivateKey) -> DerpClient {
    opt_in_unverified_relays();
    DerpClient::connect(&TokioNet, target, k, T).await.expect("DERP login")
}

/// The next relayed packet, skipping other messages.
async fn next_packet(c: &DerpClient) -> (NodePublic, Vec<u8>) {
    tokio::time::timeout(T, async {
        loop {
            if let Received::Packet { src, packet } = c.recv().await.expect("recv") {
                return (src, packet);
            }
        }
    })
    .await
    .expect("a packet within 10 s")
}

async fn exchange(a: &DerpClient, ak: &PrivateKey, b: &DerpClient, bk: &PrivateKey) {
    a.send(public(bk), b"hello b").await.unwrap();
    assert_eq!(next_packet(b).await, (public(ak), b"hello b".to_vec()));
    b.send(public(ak), b"hello a").await.unwrap();
    assert_eq!(next_packet(a).await, (public(bk), b"hello a".to_vec()));
}

fn region_node(n: &Nexus, region: i32) -> citadel::tailcfg::DerpNode {
    n.running.shared.derp_map.regions[&region].nodes[0].clone()
}

#[tokio::test]
async fn two_clients_exchange_packets_in_one_region() {
    let nexus = Nexus::start_plain_with(open_relay()).await;
    let map = &nexus.running.shared.derp_map;
    assert_eq!(map.regions.len(), 1, "default config serves one region");
    let node = region_node(&nexus, 1);
    assert_eq!(node.derp_port, i32::from(nexus.running.addr.port()), "region 1 shares the server's port");
    assert_eq!(node.stun_port, i32::from(nexus.running.stun.unwrap().port()));
    assert!(node.insecure_for_tests);

    let (ak, bk) = (key(), key());
    // One over plain HTTP by URL, one over TLS from the DERP map node, as a real client dials.
    let a = connect(nexus.url(), &ak).await;
    let b = connect(node, &bk).await;
    let derp = nexus.running.derp.clone().unwrap();
    assert_eq!(a.server_key(), derp.public_key());
    assert_eq!(b.server_key(), derp.public_key());
    exchange(&a, &ak, &b, &bk).await;

    // A large packet, the relay's maximum, arrives intact.
    let big: Vec<u8> = (0..citadel::derp::MAX_PACKET_SIZE).map(|i| i as u8).collect();
    a.send(public(&bk), &big).await.unwrap();
    assert_eq!(next_packet(&b).await.1, big);

    let rtt = a.ping(T).await.unwrap();
    assert!(rtt < Duration::from_secs(1), "loopback ping {rtt:?}");
    a.note_preferred(true).await.unwrap();
    assert!(
        eventually(T, || derp.clients().iter().any(|c| c.key == public(&ak) && c.preferred && c.region == 1)).await,
        "server saw NotePreferred"
    );

    // b heard from a; when a leaves, b is told.
    drop(a);
    let gone = tokio::time::timeout(T, async {
        loop {
            if let Received::PeerGone { peer, reason } = b.recv().await.unwrap() {
                return (peer, reason);
            }
        }
    })
    .await
    .expect("PeerGone");
    assert_eq!(gone, (public(&ak), PeerGoneReason::DISCONNECTED));
}

#[tokio::test]
async fn packets_cross_regions_and_latency_picks_a_home() {
    let nexus = Nexus::start_plain_with(Config { derp: DerpMode::Embedded { regions: 3 }, ..open_relay() }).await;
    let map = nexus.running.shared.derp_map.clone();
    assert_eq!(map.regions.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    let ports: std::collections::HashSet<i32> = map.regions.values().map(|r| r.nodes[0].derp_port).collect();
    assert_eq!(ports.len(), 3, "each region has its own listener");

    let (ak, bk) = (key(), key());
    let a = connect(region_node(&nexus, 1), &ak).await;
    let b = connect(region_node(&nexus, 3), &bk).await;
    exchange(&a, &ak, &b, &bk).await;
    let derp = nexus.running.derp.clone().unwrap();
    let regions: Vec<i32> = derp.clients().iter().map(|c| c.region).collect();
    assert!(regions.contains(&1) && regions.contains(&3), "{regions:?}");

    let lat = derphttp::measure_regions(Arc::new(TokioNet), &map, T).await;
    assert_eq!(lat.len(), 3);
    assert!(lat.iter().all(|r| r.latency.is_some()), "{lat:?}");
    let home = derphttp::pick_home_region(&lat).unwrap();
    assert!((1..=3).contains(&home));
    // The plain-HTTP form of the probe works too.
    derphttp::latency_check(&TokioNet, format!("{}/derp", nexus.url()).as_str(), 2, T).await.unwrap();
}

#[tokio::test]
async fn derp_conn_survives_outage_and_restart() {
    let nexus = Nexus::start_plain_with(open_relay()).await;
    let url = nexus.url();
    let addr = nexus.running.addr;
    let opts = DerpConnOptions { max_backoff: Duration::from_millis(500), preferred: true, ..Default::default() };
    let (ak, bk) = (key(), key());
    let net: Arc<dyn Net> = Arc::new(TokioNet);
    let a = DerpConn::new(net.clone(), url.as_str(), ak.clone(), opts.clone());
    let b = DerpConn::new(net.clone(), url.as_str(), bk.clone(), opts.clone());
    assert!(a.wait_connected(T).await && b.wait_connected(T).await);

    async fn roundtrip(a: &DerpConn, b: &DerpConn, bk: &PrivateKey, what: &[u8]) {
        // Right after a reconnect the peer may not be registered yet: retry until it arrives.
        let got = tokio::time::timeout(T, async {
            loop {
                let _ = a.send(public(bk), what).await;
                match tokio::time::timeout(Duration::from_millis(200), b.recv()).await {
                    Ok(Ok(Received::Packet { packet, .. })) if packet == what => return,
                    _ => continue,
                }
            }
        })
        .await;
        assert!(got.is_ok(), "packet {what:?} not relayed");
    }
    roundtrip(&a, &b, &bk, b"before").await;

    nexus.running.shared.faults.set_derp_stopped(true);
    assert!(eventually(T, || !a.is_connected() && !b.is_connected()).await, "connections closed");
    assert!(matches!(a.send(public(&bk), b"x").await, Err(derphttp::DerpClientError::NotConnected)));
    // While stopped, logins are refused.
    let refused = DerpClient::connect(&TokioNet, url.as_str(), &key(), T).await;
    assert!(matches!(refused, Err(derphttp::DerpClientError::Http(_))), "{refused:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    nexus.running.shared.faults.set_derp_stopped(false);
    assert!(a.wait_connected(T).await && b.wait_connected(T).await, "reconnected after resume");
    assert!(a.logins() >= 2);
    roundtrip(&a, &b, &bk, b"after resume").await;
    assert!(
        eventually(T, || nexus.running.derp.as_ref().unwrap().clients().iter().all(|c| c.preferred)).await,
        "home region noted again after reconnect"
    );

    // A real restart: the process's relay goes away and a new one (new key) takes the port.
    let logins = a.logins();
    drop(nexus);
    assert!(eventually(T, || !a.is_connected()).await);
    let nexus2 = Nexus::start_plain_with(Config { listen: addr, ..open_relay() }).await;
    assert!(eventually(T, || a.logins() > logins && a.is_connected() && b.is_connected()).await, "reconnected");
    roundtrip(&a, &b, &bk, b"after restart").await;
    assert_eq!(a.client().unwrap().server_key(), nexus2.running.derp.as_ref().unwrap().public_key());
}

/// Logs in by hand over a raw TCP connection and returns it (after the ServerInfo frame).
async fn raw_login(addr: std::net::SocketAddr, k: &PrivateKey) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let server_key = loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if let Ok(Some((Frame::ServerKey { key }, used))) = Frame::decode(&buf[i + 4..]) {
                buf.drain(..i + 4 + used);
                break key;
            }
        }
    };
    s.write_all(&ClientInfo::citadel().seal(k, &server_key, [1; 24]).to_vec()).await.unwrap();
    loop {
        if let Ok(Some((Frame::ServerInfo { .. }, _))) = Frame::decode(&buf) {
            return s;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "server closed during login");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the server closes the connection; false if it stays open for 10 s.
async fn closed_by_server(s: &mut tokio::net::TcpStream) -> bool {
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(T, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn hostile_frames_close_only_their_connection() {
    let nexus = Nexus::start_plain_with(open_relay()).await;
    let addr = nexus.running.addr;
    let (ak, bk) = (key(), key());
    let a = connect(nexus.url(), &ak).await;
    let b = connect(nexus.url(), &bk).await;
    exchange(&a, &ak, &b, &bk).await;
    let derp = nexus.running.derp.clone().unwrap();

    // Garbage instead of an HTTP request, and a refused upgrade protocol.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xff; 300]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
    let mut resp = vec![0u8; 64];
    let n = s.read(&mut resp).await.unwrap();
    assert!(String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 426"), "{:?}", &resp[..n]);

    // Upgraded, then garbage where ClientInfo belongs; then a ClientInfo whose box does not open.
    for junk in [vec![0x02, 0, 0, 0, 60], vec![0x42; 100], {
        let mut f = vec![0x02, 0, 0, 0, 80];
        f.extend_from_slice(&[7; 80]);
        f
    }] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n").await.unwrap();
        s.write_all(&junk).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(closed_by_server(&mut s).await, "junk {junk:?} did not close the connection");
    }

    // Logged in, then: an oversized header, a short SendPacket, a truncated frame, a mesh
    // frame without the mesh key, and a header announcing 4 GiB.
    let bad: Vec<Vec<u8>> = vec![
        {
            let mut f = vec![0x04];
            f.extend_from_slice(&(70_000u32).to_be_bytes());
            f.extend_from_slice(&[0; 100]);
            f
        },
        vec![0x04, 0, 0, 0, 3, 1, 2, 3],
        vec![0x04, 0, 0, 0, 40, 1, 2, 3],
        Frame::WatchConns.to_vec(),
        vec![0x05, 0xff, 0xff, 0xff, 0xff],
        vec![0x07, 0, 0, 0, 2, 1, 1],
    ];
    for (i, f) in bad.iter().enumerate() {
        let k = key();
        let mut s = raw_login(addr, &k).await;
        assert!(eventually(T, || derp.is_connected(&public(&k))).await);
        s.write_all(f).await.unwrap();
        if i == 2 {
            s.shutdown().await.unwrap(); // the truncated frame ends with the stream
        }
        assert!(closed_by_server(&mut s).await, "bad frame #{i} did not close the connection");
        assert!(eventually(T, || !derp.is_connected(&public(&k))).await);
    }
    // Unknown frame types are skipped, not fatal.
    let k = key();
    let mut s = raw_login(addr, &k).await;
    s.write_all(&Frame::Unknown { ty: 0x77, payload: vec![1; 10] }.to_vec()).await.unwrap();
    s.write_all(&Frame::Ping { data: [3; 8] }.to_vec()).await.unwrap();
    let mut buf = Vec::new();
    let pong = tokio::time::timeout(T, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after an unknown frame");
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some((f, used))) = Frame::decode(&buf) {
                buf.drain(..used);
                if let Frame::Pong { data } = f {
                    return data;
                }
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(pong, [3; 8]);

    // The well-behaved clients never noticed.
    assert!(derp.stats().protocol_errors >= 5, "{:?}", derp.stats());
    exchange(&a, &ak, &b, &bk).await;
}

#[tokio::test]
async fn slow_reader_drops_instead_of_blocking() {
    let nexus = Nexus::start_plain_with(open_relay()).await;
    let (ak, bk, ck) = (key(), key(), key());
    let a = connect(nexus.url(), &ak).await;
    let c = connect(nexus.url(), &ck).await;
    // b logs in and then never reads.
    let _b = raw_login(nexus.running.addr, &bk).await;
    let pkt = vec![0u8; 1280];
    for _ in 0..20_000 {
        a.send(public(&bk), &pkt).await.unwrap();
    }
    // The relay keeps serving others while b's queue overflows.
    a.send(public(&ck), b"still here").await.unwrap();
    assert_eq!(next_packet(&c).await.1, b"still here");
    let derp = nexus.running.derp.clone().unwrap();
    assert!(eventually(T, || derp.stats().packets_dropped > 0).await, "{:?}", derp.stats());
}

#[tokio::test]
async fn stun_answers_with_the_senders_address() {
    let nexus = Nexus::start_plain_with(open_relay()).await;
    let stun = nexus.running.stun.expect("STUN on by default");
    assert_eq!(stun.ip(), nexus.running.addr.ip(), "STUN follows the listen IP");
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tx = [9u8; 12];
    sock.send_to(&citadel::stun::request(tx), stun).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, from) = tokio::time::timeout(T, sock.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(from, stun);
    let (id, seen) = citadel::stun::parse_response(&buf[..n]).unwrap();
    assert_eq!(id, tx);
    assert_eq!(seen, sock.local_addr().unwrap());
}

#[tokio::test]
async fn derp_modes_verify_and_mesh_watchers() {
    // No DERP: empty map, no relay, no STUN.
    let off = Nexus::start_plain_with(Config { derp: DerpMode::Off, ..open_relay() }).await;
    assert!(off.running.shared.derp_map.regions.is_empty());
    assert!(off.running.derp.is_none() && off.running.stun.is_none());
    assert!(DerpClient::connect(&TokioNet, off.url().as_str(), &key(), T).await.is_err());

    // An external map from a file is handed out as-is.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("derp.json");
    std::fs::write(
        &file,
        r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"ext","RegionName":"External","Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.example","DERPPort":443}]}}}"#,
    )
    .unwrap();
    let ext = Nexus::start_plain_with(Config { derp: DerpMode::from_file(&file).unwrap(), ..open_relay() }).await;
    assert_eq!(ext.running.shared.derp_map.regions[&900].nodes[0].host_name, "derp.example");
    assert!(ext.running.derp.is_none());

    // --derp-verify-clients: only registered node keys may log in.
    let mesh_key = "ab".repeat(32);
    let n = Nexus::start_plain_with(Config {
        derp_verify_clients: true,
        derp_mesh_key: Some(mesh_key.clone()),
        ..Config::default()
    })
    .await;
    let stranger = DerpClient::connect(&TokioNet, n.url().as_str(), &key(), T).await;
    assert!(stranger.is_err(), "unknown key accepted");
    let st = &n.running.shared.store;
    let user = st.create_user("acme", "").unwrap();
    let (ak, bk) = (key(), key());
    for (i, k) in [&ak, &bk].into_iter().enumerate() {
        st.register(
            MachinePublic([i as u8 + 1; 32]),
            public(k),
            user.id,
            Default::default(),
            false,
            vec![],
            None,
            "authkey",
            n.running.shared.cfg.ipv4_base,
            n.running.shared.cfg.ipv6_base,
        )
        .unwrap();
    }
    let a = connect(n.url(), &ak).await;

    // A mesh peer (holding the mesh key; verification applies to it too, so it is a node
    // here) watches connections: it learns of a, then of b arriving and leaving.
    let wk = key();
    st.register(
        MachinePublic([9; 32]),
        public(&wk),
        user.id,
        Default::default(),
        false,
        vec![],
        None,
        "authkey",
        n.running.shared.cfg.ipv4_base,
        n.running.shared.cfg.ipv6_base,
    )
    .unwrap();
    let info = ClientInfo { mesh_key: Some(mesh_key), ..ClientInfo::citadel() };
    let w = DerpClient::connect_with_info(&TokioNet, n.url().as_str(), &wk, info, T).await.unwrap();
    w.send_frame(&Frame::WatchConns).await.unwrap();
    let mut present = vec![];
    let b = tokio::time::timeout(T, async {
        let mut b = None;
        loop {
            match w.recv().await.unwrap() {
                Received::PeerPresent { peer, endpoint, .. } => {
                    assert!(endpoint.is_some(), "present carries the remote endpoint");
                    present.push(peer);
                    if present.contains(&public(&ak)) && b.is_none() {
                        b = Some(connect(n.url(), &bk).await);
                    }
                    if present.contains(&public(&bk)) {
                        return b.unwrap();
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("PeerPresent for a and b");
    exchange(&a, &ak, &b, &bk).await;
    drop(b);
    let gone = tokio::time::timeout(T, async {
        loop {
            if let Received::PeerGone { peer, .. } = w.recv().await.unwrap() {
                return peer;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(gone, public(&bk));
}

#[tokio::test]
async fn standalone_relay_binary() {
    use tokio::io::AsyncBufReadExt;
    let port = citadel_e2e::free_port();
    let mut child = tokio::process::Command::new(bin("nexus-sim"))
        .args(["derp", "--listen", &format!("127.0.0.1:{port}"), "--stun-listen", "127.0.0.1:0"])
        .env("NEXUS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(T, lines.next_line()).await.unwrap().unwrap().expect("DERP map on stdout");
    let map: citadel::tailcfg::DerpMap = serde_json::from_str(&line).unwrap();
    let node = map.regions[&1].nodes[0].clone();
    assert_eq!(node.derp_port, i32::from(port));
    assert!(node.stun_port > 0);
    let (ak, bk) = (key(), key());
    let a = connect(node.clone(), &ak).await;
    let b = connect(format!("http://127.0.0.1:{port}/derp"), &bk).await;
    exchange(&a, &ak, &b, &bk).await;
    let _ = child.kill().await;
}

// ---------------------------------------------------------------------------------------
// A real Tailscale client.

/// Caddy's tsnet node (Tailscale v1.90.9) gets nexus-sim's DERP map, measures it over STUN,
/// picks region 1 as home, reports it to the control plane, and holds a DERP connection
/// (TLS, `InsecureForTests`) to the relay, which is what lets tsnet reach "Running".
#[test]
fn real_tailscale_client_homes_on_nexus_derp() {
    let Some(caddy) = real_peers("real Tailscale DERP test") else { return };
    let ns = Netns::new(&format!("cit-derp-{}", std::process::id()), "10.203.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let nexus_log = tmp.path().join("nexus.log");
    let nexus = NsNexus::start(&ns, 18190, &[], Some(&nexus_log));
    nexus.admin(&["users", "create", "acme"]);
    let authkey = nexus.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
    let caddy_dir = tmp.path().join("caddy");
    let caddy_log = caddy_dir.join("caddy.log");
    let _caddy = start_caddy(&ns, &caddy, &caddy_dir, &nexus.url, &authkey, "derp-peer", "", "");

    let start = Instant::now();
    let (node, connected) = loop {
        let found = nexus.nodes().into_iter().find(|n| n["givenName"] == "derp-peer");
        if let Some(n) = found.filter(|n| n["online"] == true && n["homeDerp"] == 1) {
            let nk = n["nodeKey"].as_str().unwrap().to_string();
            let log = std::fs::read_to_string(&nexus_log).unwrap_or_default();
            // The relay logs every login with the full (public) node key.
            let line = log.lines().find(|l| l.contains("DERP client connected") && l.contains(&nk)).map(str::to_string);
            if let Some(line) = line {
                break (n, line);
            }
        }
        if start.elapsed() > Duration::from_secs(90) {
            let tail = |p: &std::path::Path| {
                let s = std::fs::read_to_string(p).unwrap_or_default();
                s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            panic!(
                "tsnet node never homed on nexus-sim's DERP\n--- nexus-sim ---\n{}\n--- caddy ---\n{}",
                tail(&nexus_log),
                tail(&caddy_log)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("tsnet node homed on DERP region {} after {:?}: {connected}", node["homeDerp"], start.elapsed());
    // Tailscale v1.90 dials DERP map nodes over HTTPS only (InsecureForTests accepts the
    // self-signed certificate); plain HTTP would need the TS_DEBUG_USE_DERP_HTTP knob.
    assert!(connected.contains("tls=true"), "real client's DERP connection was not TLS: {connected}");
    // What tsnet itself said about DERP and its state, for whoever reads the test output.
    let log = std::fs::read_to_string(&caddy_log).unwrap_or_default();
    for l in log.lines().filter(|l| l.contains("derp") || l.contains("DERP") || l.contains("Running")).take(15) {
        println!("  tsnet: {}", l.chars().take(300).collect::<String>());
    }
}

#[tokio::test]
async fn keepalives_and_same_key_replacement() {
    let nexus = Nexus::start_plain_with(Config { derp_keepalive: Duration::from_millis(200), ..open_relay() }).await;
    let ak = key();
    // Keep-alives arrive on an idle connection.
    let mut s = raw_login(nexus.running.addr, &ak).await;
    let mut buf = Vec::new();
    let ka = tokio::time::timeout(T, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some((f, used))) = Frame::decode(&buf) {
                buf.drain(..used);
                if f == Frame::KeepAlive {
                    return;
                }
            }
        }
    })
    .await;
    assert!(ka.is_ok(), "no keep-alive");

    // The same key logging in again replaces the first connection, which is closed.
    let a2 = connect(nexus.url(), &ak).await;
    assert!(closed_by_server(&mut s).await, "old connection of the key stays open");
    let bk = key();
    let b = connect(nexus.url(), &bk).await;
    exchange(&a2, &ak, &b, &bk).await;
    assert_eq!(nexus.running.derp.as_ref().unwrap().stats().clients, 2);
}

// The relay under the policy (verification on, the default).

/// Registers `k` as a node of org `org` directly in the store; returns its id.
fn register_node(n: &Nexus, org: &str, k: &PrivateKey, machine: u8) -> u64 {
    let st = &n.running.shared.store;
    let user = st.user_by_name(org).unwrap_or_else(|| st.create_user(org, "").unwrap());
    let cfg = &n.running.shared.cfg;
    st.register(
        MachinePublic([machine; 32]),
        public(k),
        user.id,
        Default::default(),
        false,
        vec![],
        None,
        "authkey",
        cfg.ipv4_base,
        cfg.ipv6_base,
    )
    .expect("register")
    .id
}

/// A packet disco would send: the only kind an absent destination answers with PeerGone.
fn disco_like() -> Vec<u8> {
    let mut p = citadel::disco::MAGIC.to_vec();
    p.resize(citadel::disco::HEADER_LEN + 16, 7);
    p
}

/// Everything `c` receives within `d` (packets and PeerGone frames), as strings.
async fn heard(c: &DerpClient, d: Duration) -> Vec<String> {
    let mut out = vec![];
    let _ = tokio::time::timeout(d, async {
        loop {
            match c.recv().await {
                Ok(Received::Packet { src, .. }) => out.push(format!("packet from {}", src.short())),
                Ok(Received::PeerGone { peer, .. }) => out.push(format!("gone {}", peer.short())),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    out
}

#[tokio::test]
async fn relay_carries_only_what_the_policy_allows_and_answers_no_stranger() {
    let n = Nexus::start().await;
    let (a1, a2, a3, b1) = (key(), key(), key(), key());
    register_node(&n, "acme", &a1, 1);
    register_node(&n, "acme", &a2, 2);
    register_node(&n, "acme", &a3, 3); // registered, never connects
    register_node(&n, "globex", &b1, 4);
    let (c1, c2, cb) = (connect(n.url(), &a1).await, connect(n.url(), &a2).await, connect(n.url(), &b1).await);
    exchange(&c1, &a1, &c2, &a2).await;

    // Across orgs: nothing is delivered either way, and an offline acme key earns globex no
    // PeerGone (no presence oracle), while acme itself is told its peer is not here.
    cb.send(public(&a1), b"from globex").await.unwrap();
    c1.send(public(&b1), b"from acme").await.unwrap();
    cb.send(public(&a3), &disco_like()).await.unwrap();
    c1.send(public(&a3), &disco_like()).await.unwrap();
    assert_eq!(heard(&cb, Duration::from_millis(800)).await, Vec::<String>::new(), "globex heard something");
    assert_eq!(heard(&c1, Duration::from_millis(200)).await, [format!("gone {}", public(&a3).short())]);
    assert_eq!(n.running.derp.as_ref().unwrap().stats().packets_dropped, 4, "refused and undeliverable packets");

    // Under --headscale-default the same pair may talk.
    let open = Nexus::start_plain_with(Config {
        policy: Some(nexus_sim::policy::HEADSCALE_DEFAULT.into()),
        ..Config::default()
    })
    .await;
    register_node(&open, "acme", &a1, 1);
    register_node(&open, "globex", &b1, 4);
    let (o1, ob) = (connect(open.url(), &a1).await, connect(open.url(), &b1).await);
    exchange(&o1, &a1, &ob, &b1).await;
}

#[tokio::test]
async fn unregistered_keys_are_refused_by_default() {
    let n = Nexus::start().await;
    assert!(DerpClient::connect(&TokioNet, n.url().as_str(), &key(), T).await.is_err());
    assert_eq!(n.running.derp.as_ref().unwrap().stats().refused, 1);
}

#[tokio::test]
async fn deleted_or_expired_nodes_lose_their_relay_within_a_second() {
    let n = Nexus::start().await;
    let (a, b, c, d) = (key(), key(), key(), key());
    let ida = register_node(&n, "acme", &a, 1);
    let idb = register_node(&n, "acme", &b, 2);
    register_node(&n, "acme", &c, 3);
    let idd = register_node(&n, "acme", &d, 4);
    let (ca, cb, cc) = (connect(n.url(), &a).await, connect(n.url(), &b).await, connect(n.url(), &c).await);
    let cd = connect(n.url(), &d).await;
    let derp = n.running.derp.clone().unwrap();
    assert!(eventually(T, || derp.clients().len() == 4).await);

    let st = &n.running.shared.store;
    let t0 = Instant::now();
    st.delete_node(ida).unwrap();
    assert!(eventually(Duration::from_secs(1), || !derp.is_connected(&public(&a))).await, "deleted node kept DERP");
    st.expire_node(idb, None).unwrap();
    assert!(eventually(Duration::from_secs(1), || !derp.is_connected(&public(&b))).await, "expired node kept DERP");
    println!("both closed after {:?}", t0.elapsed());
    // A key whose expiry time passes, with no other store change, loses it too.
    st.update_node(idd, |n| {
        n.expiry = Some(chrono::Utc::now() + chrono::Duration::milliseconds(500));
        true
    })
    .unwrap();
    assert!(derp.is_connected(&public(&d)));
    assert!(
        eventually(Duration::from_millis(1500), || !derp.is_connected(&public(&d))).await,
        "a node whose key expired by the clock kept DERP"
    );
    drop(cd);
    // Their clients see the end; the live node stays.
    assert!(tokio::time::timeout(T, async { while ca.recv().await.is_ok() {} }).await.is_ok());
    assert!(tokio::time::timeout(T, async { while cb.recv().await.is_ok() {} }).await.is_ok());
    assert!(derp.is_connected(&public(&c)));
    // And they cannot come back.
    assert!(DerpClient::connect(&TokioNet, n.url().as_str(), &a, T).await.is_err());
    assert!(DerpClient::connect(&TokioNet, n.url().as_str(), &b, T).await.is_err());
    drop(cc);
}
