//! Integration tests of the data plane on loopback, with netmaps built by hand, plus interop
//! with a standard WireGuard peer (wireguard-go in a network namespace).

use citadel::dataplane::{DataPlane, DataPlaneConfig, MeshTcpStream, Path};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::netmap::NetMap;
use citadel::tailcfg::{FilterRule, NetPortRange, Node, PortRange};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

mod common;
use tokio::time::timeout;

/// One test node: its keys and mesh addresses.
struct Ident {
    id: i64,
    key: PrivateKey,
    ip4: String,
    ip6: String,
}

impl Ident {
    fn new(id: u8) -> Ident {
        Ident {
            id: i64::from(id),
            key: PrivateKey::generate(&mut rand::thread_rng()),
            ip4: format!("100.64.0.{id}"),
            ip6: format!("fd7a:115c:a1e0::{id}"),
        }
    }

    fn public(&self) -> NodePublic {
        NodePublic(self.key.public_bytes())
    }

    fn node(&self, endpoint: Option<SocketAddr>) -> Node {
        Node {
            id: self.id,
            name: format!("n{}.mesh.", self.id),
            key: self.public(),
            addresses: vec![format!("{}/32", self.ip4), format!("{}/128", self.ip6)],
            allowed_ips: vec![format!("{}/32", self.ip4), format!("{}/128", self.ip6)],
            endpoints: endpoint.into_iter().map(|e| e.to_string()).collect(),
            ..Default::default()
        }
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip4.parse().unwrap(), port)
    }

    fn config(&self) -> DataPlaneConfig {
        DataPlaneConfig {
            node_key: self.key.clone(),
            disco_key: PrivateKey::generate(&mut rand::thread_rng()),
            bind: "127.0.0.1:0".parse().unwrap(),
        }
    }
}

/// A rule letting every address of `from` reach every port.
fn allow_from(from: &[&Ident]) -> FilterRule {
    FilterRule {
        src_ips: from.iter().flat_map(|i| [i.ip4.clone(), i.ip6.clone()]).collect(),
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    }
}

fn netmap(me: &Ident, peers: &[(&Ident, SocketAddr)], filter: Vec<FilterRule>) -> NetMap {
    let mut nm = NetMap { self_node: me.node(None), packet_filter: filter, ..Default::default() };
    for (p, ep) in peers {
        nm.peers.insert(p.id, p.node(Some(*ep)));
    }
    nm
}

/// A started plane, its netmap sender and identity.
struct Plane {
    ident: Ident,
    dp: DataPlane,
    nm: watch::Sender<NetMap>,
}

impl Plane {
    fn start(ident: Ident) -> Plane {
        let (nm, rx) = watch::channel(netmap(&ident, &[], vec![]));
        let dp = DataPlane::start(ident.config(), rx).expect("start data plane");
        Plane { ident, dp, nm }
    }

    fn set_peers(&self, peers: &[&Plane], filter: Vec<FilterRule>) {
        let peers: Vec<(&Ident, SocketAddr)> = peers.iter().map(|p| (&p.ident, p.dp.local_addr())).collect();
        self.set_netmap(netmap(&self.ident, &peers, filter));
    }

    /// Sends a netmap and checks that the plane applied its peers (a netmap not yet applied
    /// by the driver is applied by the next API call).
    fn set_netmap(&self, nm: NetMap) {
        let mut want: Vec<NodePublic> = nm.peers.values().map(|n| n.key).collect();
        want.sort();
        self.nm.send_replace(nm);
        let have: Vec<NodePublic> = self.dp.peer_stats().iter().map(|p| p.node_key).collect();
        assert_eq!(have, want);
    }
}

/// Logs to the test output when RUST_LOG is set (e.g. `RUST_LOG=citadel=debug,boringtun=debug`).
fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Counters and peer state of some planes, for failure messages.
fn diag(planes: &[&Plane]) -> String {
    planes
        .iter()
        .map(|p| {
            format!(
                "\n{}: {:?}\n  {:?}\n  {:#?}",
                p.ident.ip4,
                p.dp.counters(),
                p.dp.peer_stats(),
                p.dp.socket_summary()
            )
        })
        .collect()
}

/// Two planes that list and allow each other.
fn pair() -> (Plane, Plane) {
    init_tracing();
    let a = Plane::start(Ident::new(1));
    let b = Plane::start(Ident::new(2));
    a.set_peers(&[&b], vec![allow_from(&[&b.ident])]);
    b.set_peers(&[&a], vec![allow_from(&[&a.ident])]);
    (a, b)
}

/// Serves TCP echo on `port` until the plane goes away.
fn spawn_echo(dp: &DataPlane, port: u16) {
    let l = dp.listen_tcp(port).expect("listen");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
}

/// Deterministic test bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Writes `data` and reads the echo back concurrently; returns what came back.
async fn echo_roundtrip(s: MeshTcpStream, data: Arc<Vec<u8>>) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(s);
    let d = Arc::clone(&data);
    let writer = tokio::spawn(async move {
        for chunk in d.chunks(32 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await?;
        io::Result::Ok(w)
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await?;
    let _w = writer.await.map_err(io::Error::other)??;
    Ok(back)
}

/// Like [`echo_roundtrip`], but writes `chunk` bytes every `every`, so the stream lasts.
async fn echo_paced(s: MeshTcpStream, data: Arc<Vec<u8>>, chunk: usize, every: Duration) -> io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(s);
    let d = Arc::clone(&data);
    let writer = tokio::spawn(async move {
        for c in d.chunks(chunk) {
            w.write_all(c).await?;
            tokio::time::sleep(every).await;
        }
        w.shutdown().await?;
        io::Result::Ok(w)
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await?;
    let _w = writer.await.map_err(io::Error::other)??;
    Ok(back)
}

async fn udp_echo_rounds(client: &citadel::dataplane::MeshUdpSocket, server: SocketAddr, rounds: usize) {
    let mut buf = [0u8; 2048];
    for i in 0..rounds {
        let msg = format!("ping {i}");
        client.send_to(msg.as_bytes(), server).await.expect("udp send");
        let (n, from) = timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("udp reply in time")
            .expect("udp recv");
        assert_eq!(from, server);
        assert_eq!(&buf[..n], format!("pong {i}").as_bytes());
    }
}

fn spawn_udp_pong(dp: &DataPlane, port: u16) {
    let s = dp.bind_udp(port).expect("bind udp");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let reply = String::from_utf8_lossy(&buf[..n]).replace("ping", "pong");
            let _ = s.send_to(reply.as_bytes(), from).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_10mb_and_udp_round_trips() {
    let (a, b) = pair();
    spawn_echo(&b.dp, 7000);
    spawn_udp_pong(&b.dp, 5353);

    let data = Arc::new(pattern(10 * 1024 * 1024, 1));
    let started = Instant::now();
    let s =
        timeout(Duration::from_secs(10), a.dp.dial_tcp(b.ident.addr(7000))).await.expect("dial in time").expect("dial");
    assert_eq!(s.peer_addr(), b.ident.addr(7000));
    let back = match timeout(Duration::from_secs(60), echo_roundtrip(s, Arc::clone(&data))).await {
        Ok(r) => r.expect("echo"),
        Err(_) => panic!("echo stalled: {}", diag(&[&a, &b])),
    };
    assert_eq!(back.len(), data.len());
    assert!(back == *data, "echoed bytes differ");
    eprintln!("10 MiB echoed in {:?}", started.elapsed());

    // UDP both ways over IPv4 and IPv6 mesh addresses.
    let client = a.dp.bind_udp(0).expect("bind");
    udp_echo_rounds(&client, b.ident.addr(5353), 20).await;
    let v6: SocketAddr = SocketAddr::new(b.ident.ip6.parse().unwrap(), 5353);
    udp_echo_rounds(&client, v6, 5).await;

    // Stats: the path is the peer's UDP socket, and a handshake happened.
    let st = &a.dp.peer_stats()[0];
    assert_eq!(st.node_key, b.ident.public());
    assert_eq!(st.path, Some(Path::Direct(b.dp.local_addr())));
    assert!(st.last_handshake.is_some());
    assert!(st.tx_bytes > 10 * 1024 * 1024 && st.rx_bytes > 10 * 1024 * 1024);
    let c = a.dp.counters();
    assert_eq!((c.rx_malformed, c.rx_spoofed, c.rx_filtered), (0, 0, 0), "{c:?}");

    // Errors, not hangs: a destination no peer routes, a closed port.
    let e = a.dp.dial_tcp("100.64.9.9:1".parse().unwrap()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::HostUnreachable);
    let e =
        timeout(Duration::from_secs(5), a.dp.dial_tcp(b.ident.addr(7999))).await.expect("refused quickly").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(b.dp.listen_tcp(7000).unwrap_err().kind(), io::ErrorKind::AddrInUse);

    // A dial right after a netmap update sees the new peer (no waiting for the driver).
    let e = Plane::start(Ident::new(5));
    e.set_peers(&[&a], vec![allow_from(&[&a.ident])]);
    spawn_echo(&e.dp, 7000);
    let peers = [(&b.ident, b.dp.local_addr()), (&e.ident, e.dp.local_addr())];
    a.nm.send_replace(netmap(&a.ident, &peers, vec![allow_from(&[&b.ident, &e.ident])]));
    let s = a.dp.dial_tcp(e.ident.addr(7000)).await.expect("dial the new peer at once");
    let back = echo_roundtrip(s, Arc::new(b"fresh peer".to_vec())).await.expect("echo");
    assert_eq!(back, b"fresh peer");
}

/// A plane on a dual-stack `[::]` socket talks to a peer on an IPv4 socket (mapped addresses
/// on the wire, plain IPv4 in its path and endpoints).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_socket_reaches_ipv4_peer() {
    init_tracing();
    let a = Plane::start(Ident::new(1));
    let ib = Ident::new(2);
    let (b_nm, rx) = watch::channel(netmap(&ib, &[], vec![]));
    let cfg = DataPlaneConfig { bind: "[::]:0".parse().unwrap(), ..ib.config() };
    let b = match DataPlane::start(cfg, rx) {
        Ok(dp) => Plane { ident: ib, dp, nm: b_nm },
        Err(e) => {
            println!("skipping dual_stack_socket_reaches_ipv4_peer: no IPv6 socket: {e}");
            return;
        }
    };
    let b_v4: SocketAddr = SocketAddr::from(([127, 0, 0, 1], b.dp.local_addr().port()));
    a.set_netmap(netmap(&a.ident, &[(&b.ident, b_v4)], vec![allow_from(&[&b.ident])]));
    b.set_peers(&[&a], vec![allow_from(&[&a.ident])]);
    assert!(b.dp.local_endpoints().iter().all(|e| e.port() == b.dp.local_addr().port()));
    spawn_echo(&a.dp, 7000);
    // B initiates: its handshake goes to A's IPv4 endpoint through a mapped address.
    let s = b.dp.dial_tcp(a.ident.addr(7000)).await.expect("dial from the dual-stack plane");
    let back = echo_roundtrip(s, Arc::new(pattern(100_000, 9))).await.expect("echo");
    assert_eq!(back, pattern(100_000, 9));
    assert_eq!(a.dp.peer_stats()[0].path, Some(Path::Direct(b_v4)), "A sees B as plain IPv4");
    assert_eq!(b.dp.peer_stats()[0].path, Some(Path::Direct(a.dp.local_addr())));
}

/// Proves that a stream survives WireGuard session changes: while a paced stream is echoed
/// for about 3 s, both sides start new handshakes every 0.5 s (the very call boringtun's
/// REKEY_AFTER_TIME timer makes), and traffic moves to the new sessions without loss. Then it
/// proves that the driver runs boringtun's timers: B restarts with the same key and port, so A
/// holds a session B no longer knows; only A's own timer (nothing heard for KEEPALIVE +
/// REKEY_TIMEOUT = 15 s) can start the handshake that lets traffic through again, which must
/// happen within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_rehandshakes_and_peer_restart() {
    let (a, b) = pair();
    spawn_echo(&b.dp, 7000);
    let s = a.dp.dial_tcp(b.ident.addr(7000)).await.expect("dial");
    let first = a.dp.peer_stats()[0].last_handshake.expect("handshake done");

    let data = Arc::new(pattern(6 * 1024 * 1024, 2));
    let echo = tokio::spawn(echo_paced(s, Arc::clone(&data), 32 * 1024, Duration::from_millis(15)));
    let mut sessions = 0;
    while !echo.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (who, peer) = if sessions % 2 == 0 { (&a, &b) } else { (&b, &a) };
        assert!(who.dp.rehandshake(&peer.ident.public()));
        sessions += 1;
    }
    let back = timeout(Duration::from_secs(60), echo).await.expect("echo in time").expect("join").expect("echo");
    assert!(back == *data, "echoed bytes differ after rehandshakes");
    assert!(sessions >= 4, "only {sessions} rehandshakes happened during the stream");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = a.dp.peer_stats()[0].last_handshake.expect("handshake");
    assert!(later > first, "a new session was established ({first:?} -> {later:?})");

    // Restart B on the same UDP port with the same key.
    let b_addr = b.dp.local_addr();
    let Plane { ident: b_ident, dp: b_dp, nm: _b_nm } = b;
    drop(b_dp);
    let b2_dp = {
        let mut tries = 0;
        loop {
            let (tx, rx) =
                watch::channel(netmap(&b_ident, &[(&a.ident, a.dp.local_addr())], vec![allow_from(&[&a.ident])]));
            let cfg = DataPlaneConfig { bind: b_addr, ..b_ident.config() };
            match DataPlane::start(cfg, rx) {
                Ok(dp) => break (dp, tx),
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebind {b_addr}: {e}"),
            }
        }
    };
    spawn_udp_pong(&b2_dp.0, 5353);
    let client = a.dp.bind_udp(0).expect("bind");
    let restarted = Instant::now();
    let mut buf = [0u8; 64];
    let recovered = timeout(Duration::from_secs(30), async {
        loop {
            client.send_to(b"ping x", b_ident.addr(5353)).await.expect("send");
            if let Ok(Ok((n, _))) = timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await {
                return n;
            }
        }
    })
    .await
    .expect("traffic recovered through a timer-driven handshake within 30 s");
    assert_eq!(&buf[..recovered], b"pong x");
    eprintln!("recovered {:?} after the peer restart", restarted.elapsed());
    assert!(b2_dp.0.counters().rx_unknown_peer > 0, "B dropped A's stale-session packets");
}

/// A node of another org holds B's key and endpoint, but B's netmap does not list it: its
/// handshake is refused, its dial times out and B's listener never sees it. Then a
/// misbehaving server lists C as B's peer, but B's packet filter still excludes C's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_org_cannot_reach_node() {
    let (a, b) = pair();
    let c = Plane::start(Ident::new(3));
    c.set_peers(&[&b], vec![allow_from(&[&b.ident])]);
    let listener = b.dp.listen_tcp(7000).expect("listen");

    let e = c.dp.dial_tcp_timeout(b.ident.addr(7000), Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(timeout(Duration::from_millis(500), listener.accept()).await.is_err(), "B accepted C");
    assert!(b.dp.counters().rx_unknown_peer > 0);
    assert!(b.dp.peer_stats().iter().all(|p| p.node_key != c.ident.public()));

    // B lists C (tunnel comes up) but its filter still only allows A.
    b.set_peers(&[&a, &c], vec![allow_from(&[&a.ident])]);
    let e = c.dp.dial_tcp_timeout(b.ident.addr(7000), Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(timeout(Duration::from_millis(500), listener.accept()).await.is_err(), "B accepted C");
    assert!(b.dp.counters().rx_filtered > 0, "{:?}", b.dp.counters());
    // A still gets through.
    let mut s = a.dp.dial_tcp(b.ident.addr(7000)).await.expect("A dials B");
    let (mut t, from) =
        timeout(Duration::from_secs(5), listener.accept()).await.expect("accept in time").expect("accept");
    assert_eq!(from.ip(), a.ident.ip4.parse::<IpAddr>().unwrap());
    s.write_all(b"hi").await.unwrap();
    let mut got = [0u8; 2];
    t.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hi");
}

/// A UDP relay between A and B that records what passes, so a real data packet can be
/// replayed.
struct Tap {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    sock: Arc<tokio::net::UdpSocket>,
}

async fn tap(a: SocketAddr, b: SocketAddr) -> Tap {
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let captured = Arc::new(Mutex::new(Vec::new()));
    let (s, cap) = (Arc::clone(&sock), Arc::clone(&captured));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let to = if from == b { a } else { b };
            if to == b && n > 100 && buf[0] == 4 {
                cap.lock().unwrap().push(buf[..n].to_vec());
            }
            let _ = s.send_to(&buf[..n], to).await;
        }
    });
    Tap { addr: sock.local_addr().unwrap(), captured, sock }
}

/// Sends every datagram of `batch` to `dp` from both sockets and returns how many were sent
/// and how much `[rx_malformed, rx_rejected, rx_unknown_peer, rx_replayed]` grew.
async fn send_both(
    sock: &tokio::net::UdpSocket,
    stranger: &StdUdpSocket,
    dp: &DataPlane,
    batch: Vec<Vec<u8>>,
) -> (u64, [u64; 4]) {
    let before = dp.counters();
    for g in &batch {
        sock.send_to(g, dp.local_addr()).await.unwrap();
        stranger.send_to(g, dp.local_addr()).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = dp.counters();
    let d = |f: fn(&citadel::dataplane::DataPlaneCounters) -> u64| f(&after) - f(&before);
    (
        2 * batch.len() as u64,
        [d(|c| c.rx_malformed), d(|c| c.rx_rejected), d(|c| c.rx_unknown_peer), d(|c| c.rx_replayed)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_replayed_packets_are_dropped() {
    let a = Plane::start(Ident::new(1));
    let b = Plane::start(Ident::new(2));
    let t = tap(a.dp.local_addr(), b.dp.local_addr()).await;
    // A reaches B only through the tap.
    a.set_netmap(netmap(&a.ident, &[(&b.ident, t.addr)], vec![allow_from(&[&b.ident])]));
    b.set_peers(&[&a], vec![allow_from(&[&a.ident])]);
    spawn_echo(&b.dp, 7000);

    let s = a.dp.dial_tcp(b.ident.addr(7000)).await.expect("dial via tap");
    let back = echo_roundtrip(s, Arc::new(pattern(64 * 1024, 3))).await.expect("echo");
    assert_eq!(back.len(), 64 * 1024);
    let captured = t.captured.lock().unwrap().clone();
    assert!(!captured.is_empty(), "tap saw data packets");

    // Garbage of every shape, from the tap (B's current path for A) and from a stranger, one
    // class at a time: each datagram lands in exactly the counter of its class.
    let stranger = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    let send_both = |batch: Vec<Vec<u8>>| send_both(&t.sock, &stranger, &b.dp, batch);
    // [malformed, rejected, unknown peer, replayed]
    let (n, got) = send_both(vec![vec![], vec![1], vec![4, 0, 0, 0], vec![9; 40], vec![1; 50]]).await;
    assert_eq!(got, [n, 0, 0, 0], "not WireGuard messages");
    let mut unknown_index = vec![4, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];
    unknown_index.extend(pattern(8 + 32, 9));
    let (n, got) = send_both(vec![unknown_index]).await;
    assert_eq!(got, [0, 0, n, 0], "data for an index no session has");
    // A live session's index with a counter never used: past the replay window, so only the
    // AEAD tag can refuse it.
    let mut forged = captured.last().unwrap().clone();
    let counter = u64::from_le_bytes(forged[8..16].try_into().unwrap()) + 100_000;
    forged[8..16].copy_from_slice(&counter.to_le_bytes());
    let (n, got) = send_both(vec![forged]).await;
    assert_eq!(got, [0, n, 0, 0], "forged data packet");
    let (n, got) = send_both(captured.clone()).await;
    assert_eq!(got, [0, 0, 0, n], "replayed data packets");
    let (n, got) = send_both((0..50).map(|i| pattern(16 + i * 29, i as u8)).collect()).await;
    assert_eq!(got.iter().sum::<u64>(), n, "random datagrams are each dropped once: {got:?}");
    let c = b.dp.counters();
    assert_eq!((c.rx_spoofed, c.rx_filtered, c.rx_bad_ip), (0, 0, 0), "{c:?}");
    // Rejected packets never move the path.
    assert_eq!(b.dp.peer_stats()[0].path, Some(Path::Direct(t.addr)));

    // The tunnel still works.
    let s = a.dp.dial_tcp(b.ident.addr(7000)).await.expect("dial after garbage");
    let data = Arc::new(pattern(256 * 1024, 4));
    let back = echo_roundtrip(s, Arc::clone(&data)).await.expect("echo after garbage");
    assert!(back == *data);
}

/// Interop with the reference userspace WireGuard (wireguard-go + wg) in a network namespace:
/// handshakes both ways and TCP bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_with_wireguard_go() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    let have = |p: &str| std::path::Path::new(p).exists();
    if !root || !have("/usr/bin/wireguard-go") || !have("/usr/bin/wg") || !have("/usr/bin/python3") {
        common::require_or_skip(
            "interop_with_wireguard_go",
            "needs root, /usr/bin/wireguard-go, /usr/bin/wg and /usr/bin/python3",
        );
        return;
    }
    let ns = match interop::Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            common::require_or_skip("interop_with_wireguard_go", &format!("cannot create a network namespace: {e}"));
            return;
        }
    };
    timeout(Duration::from_secs(60), interop::run(&ns)).await.expect("interop test in time");
}

mod interop {
    use super::*;
    use base64::Engine;
    use std::process::{Child, Command, Stdio};

    /// A network namespace joined to the root one by a veth pair, running wireguard-go.
    /// Everything is torn down on drop, also when the test fails.
    pub(super) struct Netns {
        pub name: String,
        pub veth: String,
        pub root_ip: String,
        pub ns_ip: String,
        pub wg_go: Option<Child>,
        pub dir: tempfile::TempDir,
    }

    fn sh(args: &[&str]) -> io::Result<()> {
        let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    impl Netns {
        pub fn create() -> io::Result<Netns> {
            let pid = std::process::id();
            let x = pid % 250 + 1;
            let mut ns = Netns {
                name: format!("cdl-wg-{pid}"),
                veth: format!("cdlr{}", pid % 100_000),
                root_ip: format!("10.213.{x}.1"),
                ns_ip: format!("10.213.{x}.2"),
                wg_go: None,
                dir: tempfile::tempdir()?,
            };
            let peer = format!("cdln{}", pid % 100_000);
            sh(&["ip", "netns", "add", &ns.name])?;
            sh(&["ip", "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer])?;
            sh(&["ip", "link", "set", &peer, "netns", &ns.name])?;
            sh(&["ip", "addr", "add", &format!("{}/30", ns.root_ip), "dev", &ns.veth])?;
            sh(&["ip", "link", "set", &ns.veth, "up"])?;
            let n = ns.name.clone();
            sh(&["ip", "-n", &n, "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer])?;
            sh(&["ip", "-n", &n, "link", "set", &peer, "up"])?;
            sh(&["ip", "-n", &n, "link", "set", "lo", "up"])?;
            let child = Command::new("ip")
                .args(["netns", "exec", &n, "/usr/bin/wireguard-go", "-f", "wg0"])
                .env("WG_PROCESS_FOREGROUND", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            ns.wg_go = Some(child);
            // wireguard-go creates wg0 asynchronously.
            let deadline = Instant::now() + Duration::from_secs(10);
            while sh(&["ip", "-n", &n, "link", "show", "wg0"]).is_err() {
                if Instant::now() > deadline {
                    return Err(io::Error::other("wireguard-go did not create wg0"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(ns)
        }

        pub fn exec(&self, args: &[&str]) -> io::Result<()> {
            let mut v = vec!["ip", "netns", "exec", &self.name];
            v.extend_from_slice(args);
            sh(&v)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            if let Some(mut c) = self.wg_go.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = sh(&["ip", "netns", "del", &self.name]);
            let _ = sh(&["ip", "link", "del", &self.veth]);
        }
    }

    const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"hello from wireguard-go\n")
data = b""
while not data.endswith(b"\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode())
"#;

    const SERVER: &str = r#"
import socket, sys
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(1)
l.settimeout(20)
c, _ = l.accept()
c.settimeout(10)
data = b""
while not data.endswith(b"\n"):
    chunk = c.recv(4096)
    if not chunk:
        break
    data += chunk
c.sendall(b"wireguard-go got: " + data)
c.close()
"#;

    pub(super) async fn run(ns: &Netns) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let wg_key = PrivateKey::generate(&mut rand::thread_rng());
        let me = Ident::new(1);
        let key_file = ns.dir.path().join("wg.key");
        std::fs::write(&key_file, b64.encode(wg_key.to_bytes())).unwrap();

        let cfg = DataPlaneConfig { bind: format!("{}:0", ns.root_ip).parse().unwrap(), ..me.config() };
        let wg_peer = Node {
            id: 2,
            key: NodePublic(wg_key.public_bytes()),
            addresses: vec!["100.64.0.2/32".into()],
            allowed_ips: vec!["100.64.0.2/32".into()],
            endpoints: vec![format!("{}:51820", ns.ns_ip)],
            ..Default::default()
        };
        let mut nm = netmap(
            &me,
            &[],
            vec![FilterRule {
                src_ips: vec!["100.64.0.2".into()],
                dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
                ip_proto: vec![],
            }],
        );
        nm.peers.insert(2, wg_peer);
        let (_tx, rx) = watch::channel(nm);
        let dp = DataPlane::start(cfg, rx).expect("start");

        ns.exec(&[
            "wg",
            "set",
            "wg0",
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            &b64.encode(me.key.public_bytes()),
            "allowed-ips",
            "100.64.0.1/32",
            "endpoint",
            &dp.local_addr().to_string(),
        ])
        .expect("wg set");
        ns.exec(&["ip", "addr", "add", "100.64.0.2/32", "dev", "wg0"]).expect("addr");
        ns.exec(&["ip", "link", "set", "wg0", "up"]).expect("up");
        ns.exec(&["ip", "route", "add", "100.64.0.1/32", "dev", "wg0"]).expect("route");

        // wireguard-go initiates: a client in the namespace connects to citadel's listener.
        let listener = dp.listen_tcp(7000).expect("listen");
        let server = tokio::spawn(async move {
            let (mut s, from) = listener.accept().await.expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.last() != Some(&b'\n') {
                if s.read(&mut b).await.expect("read") == 0 {
                    break;
                }
                line.push(b[0]);
            }
            s.write_all(b"citadel got: ").await.unwrap();
            s.write_all(&line).await.unwrap();
            s.shutdown().await.unwrap();
            (from, line)
        });
        let name = ns.name.clone();
        let client = tokio::task::spawn_blocking(move || {
            Command::new("ip")
                .args(["netns", "exec", &name, "/usr/bin/python3", "-c", CLIENT, "100.64.0.1", "7000"])
                .output()
        });
        let out = client.await.unwrap().expect("run python client");
        let (from, line) = server.await.expect("server task");
        assert_eq!(from.ip(), "100.64.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(line, b"hello from wireguard-go\n");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "citadel got: hello from wireguard-go\n", "{out:?}");

        // citadel dials a server in the namespace.
        let name = ns.name.clone();
        let server = tokio::task::spawn_blocking(move || {
            Command::new("ip")
                .args(["netns", "exec", &name, "/usr/bin/python3", "-c", SERVER, "100.64.0.2", "7001"])
                .output()
        });
        let mut s = None;
        for _ in 0..50 {
            match dp.dial_tcp_timeout("100.64.0.2:7001".parse().unwrap(), Duration::from_secs(5)).await {
                Ok(c) => {
                    s = Some(c);
                    break;
                }
                // The python server may not be listening yet.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("dial into the namespace: {e}"),
            }
        }
        let mut s = s.expect("python server came up");
        s.write_all(b"hello from citadel\n").await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "wireguard-go got: hello from citadel\n");
        let out = server.await.unwrap().expect("python server");
        assert!(out.status.success(), "{out:?}");
        let st = &dp.peer_stats()[0];
        assert_eq!(st.path, Some(Path::Direct(format!("{}:51820", ns.ns_ip).parse().unwrap())));
        println!("interop ok: {st:?}");
    }
}
