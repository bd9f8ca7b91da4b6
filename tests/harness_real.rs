//! A scenario file played on real kernel NAT: `harness run FILE --real` starts the real
//! `nexus-sim` and `citadel up` binaries in network namespaces (iptables MASQUERADE) and judges
//! the same expectations, paths included, as the simulation; for `three_orgs.toml` the two
//! agree on every verdict.

use citadel_e2e::{bin, can_netns};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn three_orgs_on_kernel_nat_agrees_with_the_simulation() {
    if !can_netns() {
        if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
            panic!("harness --real required but not root or no iproute2");
        }
        println!("skipping harness --real: not root or no iproute2");
        return;
    }
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/three_orgs.toml");
    let bins = bin("citadel");
    let mut child = Command::new(bin("harness"))
        .args(["run", file, "--real", "--bin-dir"])
        .arg(bins.parent().expect("bin dir"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn harness");
    // The scenario lasts 40 s of wall time; the bound leaves room for a loaded machine. On
    // timeout, SIGTERM lets the harness delete its namespaces before it is killed.
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(240) {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("harness --real did not finish in 240 s:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let real = stdout
        .split("real run of")
        .nth(1)
        .unwrap_or_else(|| panic!("no real run in the report:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!real.contains("FAIL") && !real.contains("NOT EVALUATED"), "{real}");
    assert!(real.contains("PASS           path acme-1 -> acme-3 is direct"), "{real}");
    assert!(real.contains("PASS           acme-1 reaches acme-2 via relay"), "{real}");
    assert!(real.contains("0 difference(s)"), "{real}");
}
