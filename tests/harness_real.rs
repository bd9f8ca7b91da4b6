//! Every scenario file played on real kernel NAT: `harness run FILE --real` starts the real
//! `nexus-sim` and `citadel up` binaries in network namespaces (nftables NAT, conntrack) and
//! judges the same expectations as the simulation, with the same faults. Each file must agree
//! with the simulation on every verdict, or list the difference with its reason in its
//! `[real] expect_differ` (which the runner checks is still a difference). The files are split
//! into seven groups (six of about equal wall time, one short), one test each, so the suite plays them in
//! parallel; within a group they run one after another.

use citadel_e2e::{bin, can_netns};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one file's run showed.
struct Played {
    file: &'static str,
    /// Whole output (simulation report, real report, comparison).
    stdout: String,
    /// The part from the real run on.
    real: String,
    /// `None` when it agreed; else why not.
    problem: Option<String>,
}

/// Plays `file` with `--real`; `None` when namespaces are unavailable (and not required).
fn play_real(file: &'static str, bound: Duration) -> Option<Played> {
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
    // Drain the pipes while waiting, so a chatty run cannot block on a full pipe.
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut so, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut se, &mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > bound {
            // SIGTERM lets the harness delete its namespaces before it is killed.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(15) && child.try_wait().expect("wait").is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = out_t.join().expect("reader");
    let stderr = err_t.join().expect("reader");
    let real = stdout.split("real run of").nth(1).map(|r| format!("real run of{r}")).unwrap_or_default();
    // Which delays latency: netem, or the NFQUEUE delayer where the kernel lacks netem.
    if let Some(l) = stderr.lines().find(|l| l.contains("latency and jitter with")) {
        println!("{file}: {l}");
    }
    let problem = if timed_out {
        Some(format!("did not finish in {bound:?}"))
    } else if real.is_empty() {
        Some(format!("no real run; stderr:\n{stderr}"))
    } else if !status.is_some_and(|s| s.success()) {
        Some(format!("harness failed ({status:?}); stderr:\n{stderr}"))
    } else if !real.contains(" 0 unlisted difference(s), 0 stale and 0 unknown") {
        Some("the comparison found unlisted or stale differences".into())
    } else {
        None
    };
    Some(Played { file, stdout, real, problem })
}

/// Plays the files of a group one after another and fails with every disagreement at once.
fn play_group(files: &[(&'static str, u64)]) -> Vec<Played> {
    let mut played = Vec::new();
    let mut summary = String::new();
    for &(file, bound) in files {
        let Some(p) = play_real(file, Duration::from_secs(bound)) else { return Vec::new() };
        let sim_wall = p.stdout.lines().find_map(|l| l.strip_prefix("simulation wall time ")).unwrap_or("?");
        let real_wall = p.real.lines().find_map(|l| l.trim().strip_prefix("wall time ")).unwrap_or("?");
        let expected = p.real.lines().filter(|l| l.contains("differs (ok)")).count();
        let _ = writeln!(
            summary,
            "{file}: played on kernel NAT, {} , {expected} listed difference(s), wall sim {sim_wall} real {real_wall}",
            if p.problem.is_none() { "agrees" } else { "DISAGREES" }
        );
        played.push(p);
    }
    println!("{summary}");
    let bad: Vec<String> = played
        .iter()
        .filter_map(|p| p.problem.as_ref().map(|why| format!("== {}: {why}\n{}", p.file, p.stdout)))
        .collect();
    assert!(bad.is_empty(), "{summary}\n{}", bad.join("\n"));
    played
}

/// The real report of `file`.
fn real_of<'a>(played: &'a [Played], file: &str) -> Option<&'a str> {
    played.iter().find(|p| p.file == file).map(|p| p.real.as_str())
}

/// Every file in `scenarios/`, each in exactly one group.
// Six groups of 170-190 s of scenario clock each and one of 80 s (plus a few seconds per file
// to set up and to play the simulation first), so the binary's wall time is about its longest
// group rather than a quarter of the sum: 21 files, 1,140 s of clocks. Each group's processes
// are mostly idle (pings once a second), so seven at a time still use under two cores.
const GROUPS: [&[(&str, u64)]; 7] = [
    &[("nexus_down.toml", 330), ("policy_group.toml", 150), ("policy_tagged_server.toml", 150)],
    &[("nat_rebind.toml", 330), ("headscale_default.toml", 150)],
    &[("partition_heal.toml", 300), ("udp_blocked.toml", 200), ("policy_ports.toml", 150)],
    &[("derp_regions.toml", 240), ("derp_down.toml", 240), ("home_router_remap.toml", 200)],
    &[("node_restart.toml", 240), ("lossy_link.toml", 240), ("three_orgs.toml", 200), ("policy_self.toml", 150)],
    &[
        ("nat_matrix.toml", 300),
        ("cgnat.toml", 200),
        ("home_router_drop.toml", 200),
        ("tsnet_behind_nat.toml", 200),
        ("home_router_firewall.toml", 200),
    ],
    &[("key_expiry.toml", 200)],
];

#[test]
fn every_scenario_file_is_in_one_group() {
    let dir = format!("{}/../scenarios", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("scenarios dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    let mut grouped: Vec<String> = GROUPS.iter().flat_map(|g| g.iter().map(|(f, _)| f.to_string())).collect();
    grouped.sort();
    assert_eq!(grouped, files, "each scenario file belongs to exactly one --real group");
}

#[test]
fn group_1_nexus_outage_policies_on_kernel_nat() {
    let p = play_group(GROUPS[0]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "nexus_down.toml").expect("played");
    assert!(r.contains("PASS           path a1 -> a2 is direct at 75s"), "{r}");
}

#[test]
fn group_2_rebinding_on_kernel_nat() {
    let p = play_group(GROUPS[1]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "nat_rebind.toml").expect("played");
    assert!(r.contains("PASS           laptop reaches server via relay in [21s, 60s]"), "{r}");
    assert!(r.contains("nat home flushed"), "{r}");
}

#[test]
fn group_3_partitions_udp_blocked_on_kernel_nat() {
    let p = play_group(GROUPS[2]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "partition_heal.toml").expect("played");
    assert!(r.contains("PASS           path a1 -> a2 is relay at 60s"), "{r}");
    let r = real_of(&p, "udp_blocked.toml").expect("played");
    assert!(r.contains("PASS           path blocked -> open is relay"), "{r}");
}

#[test]
fn group_4_relays_on_kernel_nat() {
    let p = play_group(GROUPS[3]);
    if p.is_empty() {
        return;
    }
    // Region latencies (netem, or the NFQUEUE delayer) decide where each node homes.
    let r = real_of(&p, "derp_regions.toml").expect("played");
    assert!(r.contains("PASS           paris homes on DERP region eu"), "{r}");
    assert!(r.contains("PASS           austin homes on DERP region us"), "{r}");
    let r = real_of(&p, "derp_down.toml").expect("played");
    assert!(r.contains("PASS           h1 never reaches h2 in [30s, 60s]"), "{r}");
    // Plain MASQUERADE: a's punch reached home-b first (the file orders it), so b's mapping
    // towards a moved to another port and the pair stays relayed.
    let r = real_of(&p, "home_router_remap.toml").expect("played");
    assert!(r.contains("PASS           path a -> b is relay at 40s"), "{r}");
    assert!(r.contains("PASS           path b -> a is relay at 40s"), "{r}");
}

#[test]
fn group_5_restarts_loss_orgs_on_kernel_nat() {
    let p = play_group(GROUPS[4]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "lossy_link.toml").expect("played");
    assert!(r.contains("PASS           laptop reaches server via direct"), "{r}");
    let r = real_of(&p, "three_orgs.toml").expect("played");
    assert!(r.contains("PASS           globex-1 never reaches acme-3"), "{r}");
}

#[test]
fn group_6_nat_kinds_on_kernel_nat() {
    let p = play_group(GROUPS[5]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "cgnat.toml").expect("played");
    assert!(r.contains("PASS           path c3 -> c4 is direct at 20s"), "hairpinning carrier: {r}");
    assert!(r.contains("PASS           path c1 -> c3 is direct at 20s"), "endpoint-independent filtering: {r}");
    let r = real_of(&p, "home_router_drop.toml").expect("played");
    assert!(r.contains("PASS           path a -> b is direct at 40s"), "an input drop rule keeps the port: {r}");
    let r = real_of(&p, "home_router_firewall.toml").expect("played");
    assert!(r.contains("PASS           path b -> a is direct at 50s"), "the input drop rule, switched on: {r}");
    let r = real_of(&p, "tsnet_behind_nat.toml").expect("played");
    assert!(
        r.contains("PASS           laptop reaches web:80 via direct"),
        "citadel to a real tsnet node behind NAT: {r}"
    );
}

#[test]
fn group_7_key_expiry_on_kernel_nat() {
    let p = play_group(GROUPS[6]);
    if p.is_empty() {
        return;
    }
    let r = real_of(&p, "key_expiry.toml").expect("played");
    assert!(r.contains("fault: key of a2 expires at"), "the operator's expiry went through the admin CLI: {r}");
    assert!(r.contains("PASS           a1 never reaches a2 in [32s, 48s]"), "dropped by the peers' own clocks: {r}");
}
