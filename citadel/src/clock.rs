//! The clock the network code reads.
//!
//! Everything time-driven in the data plane, DERP and netcheck (WireGuard timers, TCP
//! retransmits, disco trust windows, probe deadlines) reads this instead of
//! [`std::time::Instant::now`]. It is tokio's clock: the OS monotonic clock normally, and the
//! simulated clock when the code runs on a paused runtime (turmoil runs every simulated host
//! that way), so the same code is deterministic in simulation.

use std::time::Instant;

/// Now, on the current runtime's clock (the OS clock outside a runtime).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
