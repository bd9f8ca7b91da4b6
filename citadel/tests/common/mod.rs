//! Shared by the integration tests that need a real external component.

/// Reports that `test` cannot run because `why`: panics under `CITADEL_REQUIRE_REAL` (set by
/// `.ci/run`), otherwise prints one line so the caller can return early.
pub fn require_or_skip(test: &str, why: &str) {
    if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
        panic!("{test} required (CITADEL_REQUIRE_REAL is set) but {why}");
    }
    println!("skipping {test}: {why}");
}
