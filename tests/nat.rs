//! Real kernel NAT in network namespaces: two citadel nodes (`mesh-node`), each behind its own
//! Linux MASQUERADE router, nexus-sim (control, DERP, STUN) on the "internet" between them.
//!
//! ```text
//!  node-a 10.71.1.2 ── 10.71.1.1 router-a 172.31.71.2 ── 172.31.71.1 ┐
//!                                                                    inet (nexus-sim)
//!  node-b 10.71.2.2 ── 10.71.2.1 router-b 172.31.72.2 ── 172.31.72.1 ┘
//! ```
//!
//! - plain MASQUERADE (endpoint-independent mapping, ports kept): STUN, call-me-maybe over DERP
//!   and pings from both sides punch through; the path becomes direct. The time from the first
//!   packet to a direct path is printed.
//! - both routers `--random-fully` (a new port per destination: hole punching cannot work):
//!   traffic still flows, over DERP.
//! - UDP dropped on both routers: STUN and WireGuard over UDP are gone; DERP over TCP carries it.
//!
//! Needs root; otherwise skips with one line, unless CITADEL_REQUIRE_REAL is set. Every
//! namespace is removed on drop, also when the test fails.

use citadel_e2e::{bin, can_netns, run_with_deadline};
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Network namespaces removed on drop.
struct World {
    names: Vec<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn sh(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().expect("spawn");
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v);
}

impl World {
    fn ns(&self, role: &str) -> String {
        self.names.iter().find(|n| n.ends_with(role)).cloned().unwrap()
    }

    fn build() -> World {
        let id = std::process::id() % 100000;
        let roles = ["inet", "ra", "rb", "na", "nb"];
        let w = World { names: roles.iter().map(|r| format!("cn{id}{r}")).collect() };
        for n in &w.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            sh(&["ip", "netns", "add", n]);
            in_ns(n, &["ip", "link", "set", "lo", "up"]);
        }
        let link = |a: &str, a_if: &str, a_ip: &str, b: &str, b_if: &str, b_ip: &str| {
            let (tmp_a, tmp_b) = (format!("t{id}{a_if}"), format!("t{id}{b_if}"));
            sh(&["ip", "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b]);
            sh(&["ip", "link", "set", &tmp_a, "netns", &w.ns(a)]);
            sh(&["ip", "link", "set", &tmp_b, "netns", &w.ns(b)]);
            for (ns, tmp, name, ip) in [(w.ns(a), &tmp_a, a_if, a_ip), (w.ns(b), &tmp_b, b_if, b_ip)] {
                in_ns(&ns, &["ip", "link", "set", tmp, "name", name]);
                in_ns(&ns, &["ip", "addr", "add", ip, "dev", name]);
                in_ns(&ns, &["ip", "link", "set", name, "up"]);
            }
        };
        link("inet", "ia", "172.31.71.1/24", "ra", "wan", "172.31.71.2/24");
        link("inet", "ib", "172.31.72.1/24", "rb", "wan", "172.31.72.2/24");
        link("ra", "lan", "10.71.1.1/24", "na", "eth0", "10.71.1.2/24");
        link("rb", "lan", "10.71.2.1/24", "nb", "eth0", "10.71.2.2/24");
        for (r, gw) in [("ra", "172.31.71.1"), ("rb", "172.31.72.1")] {
            in_ns(&w.ns(r), &["ip", "route", "add", "default", "via", gw]);
            in_ns(&w.ns(r), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        in_ns(&w.ns("inet"), &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        in_ns(&w.ns("na"), &["ip", "route", "add", "default", "via", "10.71.1.1"]);
        in_ns(&w.ns("nb"), &["ip", "route", "add", "default", "via", "10.71.2.1"]);
        w
    }

    /// Resets both routers' rules: MASQUERADE on the WAN (optionally `--random-fully`), and
    /// optionally every forwarded UDP packet dropped. Old mappings are flushed.
    fn nat(&self, random_fully: bool, block_udp: bool) {
        for r in ["ra", "rb"] {
            let ns = self.ns(r);
            in_ns(&ns, &["iptables", "-t", "nat", "-F"]);
            in_ns(&ns, &["iptables", "-F"]);
            let mut rule = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"];
            if random_fully {
                rule.push("--random-fully");
            }
            in_ns(&ns, &rule);
            // Like a home router's firewall, refuse unsolicited UDP to the router itself. Without
            // it, a peer's punch packet that arrives before our own outgoing one is accepted
            // locally (answered with port-unreachable) and its conntrack entry makes MASQUERADE
            // pick another source port for our packets to that peer, so the hole never lines up.
            in_ns(
                &ns,
                &[
                    "iptables",
                    "-A",
                    "INPUT",
                    "-i",
                    "wan",
                    "-p",
                    "udp",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "DROP",
                ],
            );
            if block_udp {
                in_ns(&ns, &["iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP"]);
            }
            // conntrack may be missing; the fresh ports per scenario avoid stale mappings anyway.
            let _ = Command::new("ip").args(["netns", "exec", &ns, "conntrack", "-F"]).output();
        }
    }
}

/// A `mesh-node` process driven line by line.
struct Node {
    child: std::process::Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    log: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(ns: &str, url: &str, key: &str, dir: &std::path::Path, name: &str, udp: u16) -> Node {
        let log = dir.with_extension("log");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin("mesh-node"))
            .args([url, key])
            .arg(dir)
            .args([name, &udp.to_string(), "8080"])
            .env("CITADEL_LOG", "citadel=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn mesh-node");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut n = Node { child, stdin, stdout, log };
        let up = n.read();
        assert_eq!(up["up"], true, "{up}");
        n
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("mesh-node output");
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("mesh-node said {line:?}: {e}\n{}", std::fs::read_to_string(&self.log).unwrap_or_default())
        })
    }

    fn ask(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }

    /// The peer's entry in status.
    fn peer(&mut self, name: &str) -> serde_json::Value {
        let st = self.ask("status");
        st["peers"].as_array().and_then(|p| p.iter().find(|p| p["name"] == name).cloned()).unwrap_or_default()
    }
}

/// `citadel netcheck --json` in `ns`, with the DERP map from a node's cached netmap and a
/// second STUN server.
fn netcheck(w: &World, ns: &str, state: &std::path::Path, stun2: &str) -> serde_json::Value {
    let o = run_with_deadline(
        Command::new("ip")
            .args(["netns", "exec", &w.ns(ns)])
            .arg(bin("citadel"))
            .arg("--state-dir")
            .arg(state)
            .args(["netcheck", "--json", "--stun", stun2]),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "netcheck: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("netcheck printed {:?}: {e}", String::from_utf8_lossy(&o.stdout)))
}

fn tail(p: &std::path::Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Starts two nodes, waits until each sees the other with a public (router WAN) endpoint, or
/// just online when `want_public` is false (UDP blocked: STUN cannot answer).
fn pair(
    w: &World,
    url: &str,
    key: &str,
    tmp: &std::path::Path,
    tag: &str,
    port: u16,
    want_public: bool,
) -> (Node, Node) {
    let (na, nb) = (format!("a{tag}"), format!("b{tag}"));
    let mut a = Node::start(&w.ns("na"), url, key, &tmp.join(&na), &na, port);
    let mut b = Node::start(&w.ns("nb"), url, key, &tmp.join(&nb), &nb, port + 1);
    let start = Instant::now();
    loop {
        let (pa, pb) = (a.peer(&nb), b.peer(&na));
        let public = |p: &serde_json::Value| {
            p["endpoints"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e.as_str().unwrap_or_default().starts_with("172.31.")))
        };
        let ready = |p: &serde_json::Value| p["home_derp"] == 1 && (!want_public || public(p));
        if ready(&pa) && ready(&pb) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nodes never saw each other ready: {pa} / {pb}\n--- a ---\n{}\n--- b ---\n{}",
            tail(&a.log),
            tail(&b.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (a, b)
}

#[test]
fn nat_traversal_direct_then_relay_for_hard_nat_and_blocked_udp() {
    if !can_netns() {
        assert!(std::env::var_os("CITADEL_REQUIRE_REAL").is_none(), "CITADEL_REQUIRE_REAL is set but not root");
        println!("skipping: not root");
        return;
    }
    let test_start = Instant::now();
    let w = World::build();
    let tmp = tempfile::tempdir().unwrap();
    let port = 18390;
    let url = format!("https://172.31.71.1:{port}");
    let nexus_log = tmp.path().join("nexus.log");
    let _nexus = citadel_e2e::Proc(
        Command::new("ip")
            .args(["netns", "exec", &w.ns("inet")])
            .arg(bin("nexus-sim"))
            .args(["serve", "--listen", &format!("172.31.71.1:{port}"), "--api-key", "nat-admin"])
            .args(citadel_e2e::test_ca().serve_args())
            .env("NEXUS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&nexus_log).unwrap())
            .spawn()
            .unwrap(),
    );
    let admin = |args: &[&str]| {
        let start = Instant::now();
        loop {
            let o = run_with_deadline(
                Command::new("ip")
                    .args(["netns", "exec", &w.ns("inet")])
                    .arg(bin("nexus-sim"))
                    .args(args)
                    .env("NEXUS_URL", &url)
                    .env("NEXUS_API_KEY", "nat-admin"),
                Duration::from_secs(20),
            );
            if o.status.success() {
                return String::from_utf8(o.stdout).unwrap().trim().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A second STUN server at another address, so netcheck can compare mappings.
    let stun2 = "172.31.72.1:3479";
    let _stun2 = citadel_e2e::Proc(
        Command::new("ip")
            .args(["netns", "exec", &w.ns("inet")])
            .arg(bin("nexus-sim"))
            .args(["derp", "--listen", "172.31.72.1:3340", "--stun-listen", stun2])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    admin(&["users", "create", "acme"]);
    let key = admin(&["preauthkeys", "create", "--user", "acme", "--reusable", "--ephemeral"]);

    // 1. Plain MASQUERADE: a direct path through both NATs.
    w.nat(false, false);
    {
        let (mut a, mut b) = pair(&w, &url, &key, tmp.path(), "1", 41710, true);
        let t0 = Instant::now();
        let r = a.ask("get b1 8080");
        assert_eq!(r["ok"], true, "{r}\n--- a ---\n{}\n--- b ---\n{}", tail(&a.log), tail(&b.log));
        let d = a.ask("wait-direct b1 10");
        let to_direct = t0.elapsed();
        let path = d["path"].as_str().unwrap_or_default().to_string();
        assert!(
            path.starts_with("direct 172.31.72.2:"),
            "{d}\n--- a ---\n{}\n--- b ---\n{}",
            tail(&a.log),
            tail(&b.log)
        );
        let back = b.ask("wait-direct a1 10");
        assert!(back["path"].as_str().unwrap_or_default().starts_with("direct 172.31.71.2:"), "{back}");
        println!(
            "MASQUERADE both sides: first fetch {:.1} ms, direct path {:?} after the first packet ({path})",
            r["ms"].as_f64().unwrap_or_default(),
            to_direct
        );
        let r = a.ask("get b1 8080");
        assert!(r["ok"] == true && r["path"].as_str().unwrap_or_default().starts_with("direct"), "{r}");
        // NAT rebinding: A's packets start to come from a new public port. B must follow.
        let before = b.peer("a1")["path"].as_str().unwrap_or_default().to_string();
        let na = w.ns("na");
        // The old address stays (A's TCP connections to Nexus and DERP keep it); new UDP
        // packets leave from the new one, which router A maps to a new public port because the
        // old public port is still taken by the old mapping.
        in_ns(&na, &["ip", "addr", "add", "10.71.1.3/24", "dev", "eth0"]);
        in_ns(&na, &["ip", "route", "replace", "default", "via", "10.71.1.1", "src", "10.71.1.3"]);
        // B's NAT filters A's new port until B sends to it, so traffic first falls back to
        // DERP (within the trust window), then A's next STUN round reports the new port, and
        // call-me-maybe plus pings from both sides open the new direct path.
        let t1 = Instant::now();
        let mut fell_back = None;
        let moved = loop {
            let r = a.ask("get b1 8080");
            let p = b.peer("a1")["path"].as_str().unwrap_or_default().to_string();
            if r["ok"] == true && fell_back.is_none() && r["path"] == "relay 1" {
                fell_back = Some(t1.elapsed());
            }
            if r["ok"] == true && p.starts_with("direct 172.31.71.2:") && p != before {
                break p;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(60),
                "B never followed A: {r} {p} (was {before})\n--- a ---\n{}\n--- b ---\n{}",
                tail(&a.log),
                tail(&b.log)
            );
            std::thread::sleep(Duration::from_millis(250));
        };
        // B's NAT drops A's new port until B follows, so some fetch in between must have gone
        // over DERP: a rebinding that never fell back would mean B accepted an unconfirmed path.
        let fell_back = fell_back.unwrap_or_else(|| {
            panic!("no fetch went over DERP during the rebinding (B followed A to {moved} at once)")
        });
        println!("NAT rebinding: traffic over DERP after {fell_back:?}");
        println!("NAT rebinding: B followed A from {before} to {moved} in {:?}", t1.elapsed());
        let nc = netcheck(&w, "na", &tmp.path().join("a1"), stun2);
        println!("netcheck behind MASQUERADE: {nc}");
        let got = (nc["udp"].clone(), nc["mapping_varies_by_dest"].clone(), nc["preferred_derp"].clone());
        assert_eq!(got, (true.into(), false.into(), 1.into()), "{nc}");
    }

    // 2. Both NATs --random-fully: no direct path, DERP carries the traffic.
    w.nat(true, false);
    {
        let (mut a, b) = pair(&w, &url, &key, tmp.path(), "2", 41720, true);
        let r = a.ask("get b2 8080");
        assert_eq!(r["ok"], true, "{r}\n--- a ---\n{}\n--- b ---\n{}", tail(&a.log), tail(&b.log));
        // Give discovery its chance (pings, call-me-maybe), then check it did not fake a path.
        std::thread::sleep(Duration::from_secs(2));
        let r = a.ask("get b2 8080");
        assert!(r["ok"] == true && r["path"] == "relay 1", "{r}");
        println!(
            "--random-fully both sides: relayed fetch {:.1} ms ({})",
            r["ms"].as_f64().unwrap_or_default(),
            r["path"]
        );
        let nc = netcheck(&w, "na", &tmp.path().join("a2"), stun2);
        println!("netcheck behind --random-fully: {nc}");
        assert_eq!((nc["udp"].clone(), nc["mapping_varies_by_dest"].clone()), (true.into(), true.into()), "{nc}");
    }

    // 3. UDP dropped on both routers: DERP over TCP.
    w.nat(false, true);
    {
        let (mut a, b) = pair(&w, &url, &key, tmp.path(), "3", 41730, false);
        let r = a.ask("get b3 8080");
        assert!(
            r["ok"] == true && r["path"] == "relay 1",
            "{r}\n--- a ---\n{}\n--- b ---\n{}",
            tail(&a.log),
            tail(&b.log)
        );
        println!("UDP blocked: fetch over DERP/TCP {:.1} ms", r["ms"].as_f64().unwrap_or_default());
        let nc = netcheck(&w, "na", &tmp.path().join("a3"), stun2);
        println!("netcheck with UDP blocked: {nc}");
        assert_eq!((nc["udp"].clone(), nc["preferred_derp"].clone()), (false.into(), 1.into()), "{nc}");
    }
    println!("nat test took {:?}", test_start.elapsed());
}

/// Two data planes whose netmaps list only a dead endpoint for each other (a TEST-NET
/// address): the first packets can only go over nexus-sim's DERP; call-me-maybe over DERP then
/// tells each side the other's real address, pings confirm it, and the path upgrades to
/// direct while a TCP echo runs. No root needed.
#[tokio::test]
async fn derp_first_then_call_me_maybe_finds_the_direct_path() {
    use citadel::dataplane::{DataPlane, DataPlaneConfig, Path};
    use citadel::keys::PrivateKey;

    let nx =
        citadel_e2e::Nexus::start_with(nexus_sim::Config { derp_verify_clients: false, ..Default::default() }).await;
    let derp_map = nx.running.shared.derp_map.clone();
    let mut rng = rand::thread_rng();
    let keys: Vec<(PrivateKey, PrivateKey)> =
        (0..2).map(|_| (PrivateKey::generate(&mut rng), PrivateKey::generate(&mut rng))).collect();
    let nms = citadel_e2e::two_node_netmaps(&keys, ["192.0.2.1:9".into(), "192.0.2.1:9".into()], true, &derp_map);
    let start = |i: usize| {
        let cfg = DataPlaneConfig {
            node_key: keys[i].0.clone(),
            disco_key: keys[i].1.clone(),
            bind: "127.0.0.1:0".parse().unwrap(),
        };
        let (tx, rx) = tokio::sync::watch::channel(nms[i].clone());
        (DataPlane::start(cfg, rx).unwrap(), tx)
    };
    let ((a, _ta), (b, _tb)) = (start(0), start(1));
    citadel_e2e::serve_echo(b.listen_tcp(7000).unwrap());
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let run = async {
        let mut s = a.dial_tcp("100.64.0.2:7000".parse().unwrap()).await.unwrap();
        citadel_e2e::echo_through(&mut s, &data).await.unwrap()
    };
    let got = tokio::time::timeout(Duration::from_secs(30), run).await.expect("echo over DERP in time");
    assert!(got == data, "echo differs");
    let st = a.peer_stats();
    assert_eq!(st[0].path, Some(Path::Direct(b.local_addr())), "{st:?}");
    assert!(st[0].candidates.contains(&b.local_addr()), "learned from call-me-maybe: {st:?}");
    assert_eq!(b.peer_stats()[0].path, Some(Path::Direct(a.local_addr())));
    assert_eq!(a.net_info().borrow().preferred_derp, 1);
    // The handshake and the call-me-maybes went through the relay.
    let stats = nx.running.derp.as_ref().expect("embedded DERP").stats();
    assert!(stats.packets_relayed >= 3, "{stats:?}");
}
