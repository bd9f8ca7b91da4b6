//! The runner reports failures, never passes what it cannot check, and calls the data-plane hook.

use citadel::net::BoxFuture;
use harness::probe::{NodeProbe, PathKind, ProbeFactory};
use harness::report::Verdict;
use harness::scenario::Scenario;
use harness::world::{self, RunOptions};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BASE: &str = r#"
duration = "20s"
[[org]]
name = "acme"
[[org]]
name = "globex"
[[nat]]
name = "sym"
mapping = "address_and_port_dependent"
filtering = "address_and_port_dependent"
ports = "random"
[[nat]]
name = "sym2"
mapping = "address_and_port_dependent"
filtering = "address_and_port_dependent"
ports = "random"
[[node]]
name = "a1"
org = "acme"
nat = "sym"
[[node]]
name = "a2"
org = "acme"
nat = "sym2"
[[node]]
name = "g1"
org = "globex"
"#;

fn run(extra: &str, opts: &RunOptions) -> world::Outcome {
    let sc = Scenario::parse("inline.toml", &format!("{BASE}{extra}")).unwrap_or_else(|e| panic!("{e}"));
    world::run(&sc, opts).unwrap()
}

#[test]
fn wrong_expectations_fail() {
    let out = run(
        r#"
[[expect]]
kind = "sees"
node = "a1"
peers = ["g1"]
by = "10s"
[[expect]]
kind = "never_sees"
node = "a1"
peers = ["a2"]
[[expect]]
kind = "udp_path"
a = "a1"
b = "a2"
path = "direct"
by = "10s"
[[expect]]
kind = "same_ip_after_restart"
node = "a1"
[[expect]]
kind = "reconnects"
node = "a2"
after = "1s"
"#,
        &RunOptions::default(),
    );
    assert!(!out.passed());
    let fails = out.verdicts.iter().filter(|(_, v)| matches!(v, Verdict::Fail(_))).count();
    assert_eq!(fails, 5, "{}", out.report());
    assert!(out.trace.contains("result: FAIL"));
}

#[test]
fn reaches_is_judged_by_the_real_mesh() {
    // a1 and a2 sit behind symmetric NATs with random ports: only DERP joins them; g1 is in
    // another org and must never answer.
    let out = run(
        r#"
[[expect]]
kind = "reaches"
a = "a1"
b = "a2"
path = "relay"
by = "10s"
[[expect]]
kind = "reaches"
a = "a1"
b = "a2"
path = "direct"
by = "15s"
[[expect]]
kind = "reaches"
a = "a1"
b = "g1"
path = "none"
[[expect]]
kind = "reaches"
a = "a2"
b = "a1"
path = "none"
after = "5s"
"#,
        &RunOptions::default(),
    );
    let v: Vec<&Verdict> = out.verdicts.iter().map(|(_, v)| v).collect();
    assert_eq!(v[0], &Verdict::Pass, "{}", out.report());
    assert!(matches!(v[1], Verdict::Fail(w) if w.contains("last answer relay")), "{}", out.report());
    assert_eq!(v[2], &Verdict::Pass, "{}", out.report());
    assert!(matches!(v[3], Verdict::Fail(w) if w.contains("answered over relay")), "{}", out.report());
    assert!(out.trace.contains("0 not evaluated"));
}

/// A stand-in for the mesh: answers "relay" for one address only and records what it was asked.
struct FakeProbe {
    answer_for: Arc<Mutex<Vec<Ipv4Addr>>>,
}

impl NodeProbe for FakeProbe {
    fn ping(&self, peer: Ipv4Addr, timeout: Duration) -> BoxFuture<'_, Option<PathKind>> {
        Box::pin(async move {
            tokio::time::sleep(timeout / 4).await;
            self.answer_for.lock().unwrap().push(peer);
            Some(PathKind::Relay)
        })
    }
}

#[test]
fn reaches_uses_the_probe_hook() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let a2 = asked.clone();
    let factory: ProbeFactory = Arc::new(move |_mesh| Arc::new(FakeProbe { answer_for: a2.clone() }) as _);
    let opts = RunOptions { probe: Some(factory), ..Default::default() };
    let out = run(
        r#"
[[expect]]
kind = "reaches"
a = "a1"
b = "a2"
path = "relay"
by = "10s"
[[expect]]
kind = "reaches"
a = "a2"
b = "a1"
path = "direct"
by = "10s"
"#,
        &opts,
    );
    assert_eq!(out.verdicts[0].1, Verdict::Pass, "{}", out.report());
    assert!(matches!(out.verdicts[1].1, Verdict::Fail(_)), "{}", out.report());
    assert!(!asked.lock().unwrap().is_empty());
    assert!(asked.lock().unwrap().iter().all(|ip| ip.octets()[0] == 100), "mesh IPs are pinged");
}

#[test]
fn vacuous_expectations_fail() {
    // `late` starts after every deadline: at the early samples it runs nothing and pings nobody.
    let out = run(
        r#"
[[node]]
name = "late"
org = "acme"
start = "15s"
[[expect]]
kind = "sees"
node = "late"
peers = []
exact = true
by = "10s"
[[expect]]
kind = "udp_path"
a = "late"
b = "a1"
path = "none"
by = "10s"
[[expect]]
kind = "throughout"
node = "a1"
peers = ["a2", "late"]
exact = true
after = "0s"
by = "20s"
[[expect]]
kind = "throughout"
node = "a1"
peers = ["a2"]
after = "8s"
by = "14s"
[[expect]]
kind = "throughout"
node = "late"
peers = []
exact = true
after = "0s"
by = "10s"
"#,
        &RunOptions::default(),
    );
    let v: Vec<&Verdict> = out.verdicts.iter().map(|(_, v)| v).collect();
    assert!(matches!(v[0], Verdict::Fail(_)), "sees exactly {{}} before joining:\n{}", out.report());
    assert!(
        matches!(v[1], Verdict::Fail(w) if w.contains("no ping")),
        "udp_path none without pings:\n{}",
        out.report()
    );
    assert!(matches!(v[2], Verdict::Fail(_)), "throughout must hold at t=0 too:\n{}", out.report());
    assert_eq!(v[3], &Verdict::Pass, "{}", out.report());
    assert!(matches!(v[4], Verdict::Fail(w) if w.contains("not running")), "{}", out.report());
}
