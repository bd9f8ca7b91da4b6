//! Parses arbitrary text as a harness scenario file (TOML plus validation); a valid scenario's
//! accessors must not panic and its policy text must parse as nexus-sim parses it.
#![no_main]

use harness::scenario::{policy_text, Scenario};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(s) = Scenario::parse("fuzz.toml", text) else { return };
    for name in s.node_names() {
        assert!(s.node(&name).is_some());
    }
    for (id, name, _) in s.derp_regions() {
        assert!(s.derp_region_id(&name).is_some_and(|got| got <= id));
    }
    if let Some(p) = &s.policy {
        let _ = nexus_sim::policy::Policy::parse(&policy_text(p.get_ref()));
    }
});
