//! Scenario files played on real kernel NAT: `harness run FILE --real` starts the real
//! `nexus-sim` and `citadel up` binaries in network namespaces (iptables MASQUERADE) and judges
//! the same expectations as the simulation, mesh paths included, with the same faults (Nexus
//! and DERP outages, restarts, partitions, holds). For these files the two agree on every
//! verdict; `cgnat.toml` and `nat_matrix.toml` are left out because Linux conntrack filters by
//! address and port and does not hairpin, which the README lists as known differences.

use citadel_e2e::{bin, can_netns};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Plays `file` with `--real` and returns the real part of the report, after checking that
/// every expectation passed on real NAT and that sim and real agree.
fn play_real(file: &str, bound: Duration) -> Option<String> {
    if !can_netns() {
        if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
            panic!("harness --real required but not root or no iproute2");
        }
        println!("skipping harness --real {file}: not root or no iproute2");
        return None;
    }
    let path = format!("{}/../scenarios/{file}", env!("CARGO_MANIFEST_DIR"));
    let bins = bin("citadel");
    let mut child = Command::new(bin("harness"))
        .args(["run", &path, "--real", "--bin-dir"])
        .arg(bins.parent().expect("bin dir"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn harness");
    // On timeout, SIGTERM lets the harness delete its namespaces before it is killed.
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > bound {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("harness --real {file} did not finish in {bound:?}:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let real = stdout.split("real run of").nth(1).unwrap_or_else(|| panic!("no real run in:\n{stdout}\n{stderr}"));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!real.contains("FAIL") && !real.contains("NOT EVALUATED"), "{real}");
    assert!(real.contains("\n  0 difference(s)"), "{real}");
    Some(real.to_string())
}

#[test]
fn three_orgs_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("three_orgs.toml", Duration::from_secs(240)) else { return };
    assert!(real.contains("PASS           path acme-1 -> acme-3 is direct"), "{real}");
    assert!(real.contains("PASS           acme-1 reaches acme-2 via relay"), "{real}");
    assert!(real.contains("PASS           acme-1 never reaches globex-1"), "{real}");
}

#[test]
fn udp_blocked_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("udp_blocked.toml", Duration::from_secs(240)) else { return };
    assert!(real.contains("PASS           path blocked -> open is relay"), "{real}");
    assert!(real.contains("PASS           path natted -> open is direct"), "{real}");
}

#[test]
fn node_restart_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("node_restart.toml", Duration::from_secs(300)) else { return };
    assert!(real.contains("PASS           a1 keeps its IP and key across restarts"), "{real}");
    assert!(real.contains("PASS           a2 reaches a1 via direct"), "{real}");
}

#[test]
fn nexus_down_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("nexus_down.toml", Duration::from_secs(420)) else { return };
    assert!(real.contains("PASS           path a1 -> a2 is direct at 75s"), "{real}");
    assert!(real.contains("PASS           a3 reaches a1 via direct"), "{real}");
}

#[test]
fn partition_heal_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("partition_heal.toml", Duration::from_secs(400)) else { return };
    assert!(real.contains("PASS           path a1 -> a2 is relay at 60s"), "{real}");
    assert!(real.contains("PASS           g1 sees exactly {g2} in [60s, 110s]"), "{real}");
}

#[test]
fn derp_down_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("derp_down.toml", Duration::from_secs(300)) else { return };
    assert!(real.contains("PASS           e1 reaches p1 via direct in [50s, 60s]"), "{real}");
    assert!(real.contains("PASS           h1 never reaches h2 in [30s, 60s]"), "{real}");
}

#[test]
fn policy_ports_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("policy_ports.toml", Duration::from_secs(200)) else { return };
    assert!(real.contains("PASS           a1 reaches a2:22 via direct"), "{real}");
    assert!(real.contains("PASS           a1 never reaches a2:80"), "{real}");
}

#[test]
fn policy_tagged_server_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("policy_tagged_server.toml", Duration::from_secs(200)) else { return };
    assert!(real.contains("PASS           srv sees exactly {a1}"), "{real}");
    assert!(real.contains("PASS           g1 never reaches srv"), "{real}");
}

#[test]
fn headscale_default_on_kernel_nat_agrees_with_the_simulation() {
    let Some(real) = play_real("headscale_default.toml", Duration::from_secs(200)) else { return };
    assert!(real.contains("PASS           a1 sees exactly {g1}"), "{real}");
}
