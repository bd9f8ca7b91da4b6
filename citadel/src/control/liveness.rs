//! When to probe the control connection. A connection whose path died (a NAT that forgot
//! the flow, a changed uplink) is noticed only by the next write on it or by HTTP/2
//! keep-alive, tens of seconds later. The data plane sees such changes first: its home DERP
//! connection breaks or comes back, or its endpoints change. Each of those starts a probe (a
//! request with a short deadline) on the control connection; no answer by the deadline means
//! the connection is dead and the node reconnects.
//!
//! Sans-IO: time is passed in; the caller sends the probe and reports its answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a probe may go unanswered before the connection counts as dead. A live Nexus
/// answers an endpoint update in one round trip; a false alarm costs one reconnect.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// What the data plane knows about the network, as far as it matters to the control path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetView {
    /// The node's endpoints (local, then STUN-mapped).
    pub endpoints: Vec<SocketAddr>,
    /// The home DERP region (0: none picked yet).
    pub home: i32,
    /// Whether the home region's DERP connection is up.
    pub home_connected: bool,
}

/// The probe policy of one control connection.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: Option<NetView>,
    deadline: Option<Instant>,
}

impl Liveness {
    /// A policy for a freshly opened connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the data plane's current view; true when it shows a network change the control
    /// connection may not have survived (endpoints changed, or the home DERP connection broke
    /// or came back in the same region), so it should be probed now. The first view only
    /// sets the baseline.
    pub fn handle_net(&mut self, view: NetView) -> bool {
        let Some(prev) = self.seen.replace(view) else { return false };
        let cur = self.seen.as_ref().expect("just set");
        let endpoints_moved =
            !prev.endpoints.is_empty() && !cur.endpoints.is_empty() && prev.endpoints != cur.endpoints;
        let derp_flapped = prev.home != 0 && prev.home == cur.home && prev.home_connected != cur.home_connected;
        endpoints_moved || derp_flapped
    }

    /// A probe (any request on the connection) was sent at `now`; it must be answered before
    /// [`Self::poll_timeout`]. A probe already in flight keeps its earlier deadline.
    pub fn handle_probe_sent(&mut self, now: Instant) {
        self.deadline.get_or_insert(now + PROBE_TIMEOUT);
    }

    /// The probe was answered: the connection is alive.
    pub fn handle_probe_answered(&mut self) {
        self.deadline = None;
    }

    /// When an unanswered probe declares the connection dead.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// True when the probe's deadline has passed at `now`: the connection is dead.
    pub fn is_dead(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(eps: &[&str], home: i32, up: bool) -> NetView {
        NetView { endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(), home, home_connected: up }
    }

    #[test]
    fn the_first_view_is_a_baseline_and_an_unchanged_one_probes_nothing() {
        let mut l = Liveness::new();
        assert!(!l.handle_net(view(&["192.0.2.1:41641"], 1, true)));
        assert!(!l.handle_net(view(&["192.0.2.1:41641"], 1, true)));
    }

    #[test]
    fn a_moved_endpoint_or_a_home_derp_that_breaks_or_returns_probes() {
        let mut l = Liveness::new();
        l.handle_net(view(&["192.0.2.1:41641"], 1, true));
        assert!(l.handle_net(view(&["192.0.2.1:50000"], 1, true)), "endpoint moved");
        assert!(l.handle_net(view(&["192.0.2.1:50000"], 1, false)), "home DERP broke");
        assert!(l.handle_net(view(&["192.0.2.1:50000"], 1, true)), "home DERP back");
        // Picking a home region for the first time, or moving it, is not a breakage.
        let mut l = Liveness::new();
        l.handle_net(view(&["192.0.2.1:41641"], 0, false));
        assert!(!l.handle_net(view(&["192.0.2.1:41641"], 1, true)));
        assert!(!l.handle_net(view(&["192.0.2.1:41641"], 2, false)));
        // Endpoints first learnt (none before) are not a move either.
        let mut l = Liveness::new();
        l.handle_net(view(&[], 1, true));
        assert!(!l.handle_net(view(&["192.0.2.1:41641"], 1, true)));
    }

    #[test]
    fn an_unanswered_probe_declares_the_connection_dead_at_its_deadline() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        assert_eq!(l.poll_timeout(), None);
        l.handle_probe_sent(t0);
        // A second probe does not push the deadline out.
        l.handle_probe_sent(t0 + Duration::from_secs(1));
        assert_eq!(l.poll_timeout(), Some(t0 + PROBE_TIMEOUT));
        assert!(!l.is_dead(t0 + PROBE_TIMEOUT - Duration::from_millis(1)));
        assert!(l.is_dead(t0 + PROBE_TIMEOUT));
        l.handle_probe_answered();
        assert_eq!(l.poll_timeout(), None);
        assert!(!l.is_dead(t0 + PROBE_TIMEOUT * 2));
    }
}
