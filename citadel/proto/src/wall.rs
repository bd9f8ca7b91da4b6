//! The wall clock (UTC) that the node's and Nexus's shells read: key expiries, `ControlTime`,
//! registration and last-seen times. Protocol logic never reads it; it takes `now` as a
//! parameter like everything else in this crate.
//!
//! Outside a simulation this is [`Utc::now`]. A simulator installs its own source once
//! ([`simulate_with`]) so expiries follow simulated time on both sides: otherwise a node key
//! that expires a minute after registration would outlive a simulated hour that runs in a few
//! real seconds. A source answers `None` where no simulation is current (another test's
//! thread, the simulator's own driver), and the system clock answers there. Nothing in a
//! production binary installs one.

use chrono::{DateTime, Utc};
use std::sync::OnceLock;
use std::time::Duration;

/// The installed simulation clock, if any: time since the Unix epoch.
static SOURCE: OnceLock<fn() -> Option<Duration>> = OnceLock::new();

/// Now, on the simulation's clock when one is current on this thread, else the system's.
pub fn now() -> DateTime<Utc> {
    SOURCE
        .get()
        .and_then(|f| f())
        .and_then(|d| chrono::TimeDelta::from_std(d).ok())
        .and_then(|d| DateTime::UNIX_EPOCH.checked_add_signed(d))
        .unwrap_or_else(Utc::now)
}

/// Installs `source` (time since the Unix epoch, `None` where no simulation is current) as the
/// simulation clock for the rest of the process. False when one was already installed (the
/// first stays: every simulation in a process shares it).
pub fn simulate_with(source: fn() -> Option<Duration>) -> bool {
    SOURCE.set(source).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_current_simulation_it_is_the_system_clock() {
        // A source that knows no simulation on this thread leaves the system clock in charge.
        simulate_with(|| None);
        let (a, b, c) = (Utc::now(), now(), Utc::now());
        assert!(a <= b && b <= c, "{a} {b} {c}");
    }
}
