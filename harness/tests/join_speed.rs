//! Joining is bounded by round trips, not by the data plane's periodic driver tick (250 ms):
//! the STUN probe finishes when its answer arrives, so the node announces its endpoint and
//! home region and joins within a few simulated round trips.

use harness::scenario::Scenario;
use harness::world::{self, RunOptions};
use std::time::Duration;

/// One public node, 2 ms links: every round trip of the join is 4 ms of simulated time.
const WORLD: &str = r#"
duration = "2s"
[net]
latency = "2ms"
jitter = "0ms"
tick = "1ms"
[[org]]
name = "acme"
[[node]]
name = "a1"
org = "acme"
"#;

/// The simulated time of the first observed event of `node` that starts with `what`.
fn at(observed: &str, node: &str, what: &str) -> Option<Duration> {
    let prefix = format!("{node}: {what}");
    observed.lines().find_map(|l| {
        let (t, e) = l.trim_start().split_once("  ")?;
        if !e.trim_start().starts_with(&prefix) {
            return None;
        }
        let secs: f64 = t.trim().strip_suffix('s')?.parse().ok()?;
        Some(Duration::from_secs_f64(secs))
    })
}

#[test]
fn join_does_not_wait_for_a_driver_tick_for_its_endpoint() {
    let sc = Scenario::parse("join_speed.toml", WORLD).unwrap_or_else(|e| panic!("{e}"));
    let out = world::run(&sc, &RunOptions::default()).unwrap();
    let started = at(&out.observed, "a1", "started").expect("a1 started");
    let joined = at(&out.observed, "a1", "joined as").unwrap_or_else(|| panic!("a1 never joined:\n{}", out.observed));
    // The home region comes from the same STUN report the join waits for: known at the join.
    let home = at(&out.observed, "a1", "home DERP region 1")
        .unwrap_or_else(|| panic!("a1 never reported its home region:\n{}", out.observed));
    let took = joined - started;
    assert!(took < Duration::from_millis(250), "join took {took:?} of simulated time:\n{}", out.observed);
    assert_eq!(home, joined, "the home region was not known when the node joined:\n{}", out.observed);
}
