//! When to run netcheck and which DERP region is home, sans-IO.
//!
//! A STUN probe runs when the DERP map first arrives, every [`NETCHECK_INTERVAL`] after, and at
//! once when the home region's connection has been down for [`HOME_DOWN_RECHECK`]. The probe's
//! report picks the home region; when no STUN server answers (UDP blocked) the regions are
//! ranked over HTTPS instead, as Tailscale's netcheck falls back to. Host names in the DERP map
//! are resolved once, outside, and handed back. Every method takes `now`; what must happen in
//! the world comes back as [`Action`]s.

use crate::netcheck::{self, Report};
use crate::tailcfg::DerpMap;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How often STUN runs again: keeps the NAT mapping fresh and notices a new public address.
pub const NETCHECK_INTERVAL: Duration = Duration::from_secs(30);
/// When the home DERP connection has been down this long, netcheck runs at once (not at the
/// next interval) so the node re-homes on a relay that answers: until it does, peers that can
/// only relay cannot reach it.
pub const HOME_DOWN_RECHECK: Duration = Duration::from_secs(3);

/// Something the policy needs done.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send a STUN request over the UDP socket.
    Stun(SocketAddr, Vec<u8>),
    /// The home region changed (0: none).
    Home(i32),
    /// Resolve these STUN host names; answer with [`HomePolicy::handle_resolved`].
    Resolve(Vec<String>),
    /// Rank the regions over HTTPS; answer with [`HomePolicy::handle_https_latency`].
    MeasureHttps(DerpMap),
    /// A probe finished: endpoints and the report may have changed.
    Report,
}

/// Netcheck scheduling and home region choice.
#[derive(Debug, Default)]
pub(crate) struct HomePolicy {
    map: DerpMap,
    probe: Option<netcheck::Probe>,
    last_probe: Option<Instant>,
    home: i32,
    /// Regions whose DERP connection is up.
    connected: BTreeSet<i32>,
    /// Since when the home region's connection has been down (None: up, or no home).
    home_down_since: Option<Instant>,
    report: Option<Report>,
    https_running: bool,
    /// Addresses of STUN servers the DERP map names only by host name.
    stun_hosts: HashMap<String, IpAddr>,
    resolving: bool,
}

impl HomePolicy {
    /// The home region; 0 until one is picked.
    pub(crate) fn home(&self) -> i32 {
        self.home
    }

    /// The last probe's report.
    pub(crate) fn report(&self) -> Option<&Report> {
        self.report.as_ref()
    }

    /// Regions with a live connection, sorted.
    pub(crate) fn connected(&self) -> Vec<i32> {
        self.connected.iter().copied().collect()
    }

    /// Whether the DERP map has any region.
    pub(crate) fn available(&self) -> bool {
        !self.map.regions.is_empty()
    }

    /// The DERP map from the latest netmap (unchanged maps are cheap). `peer_regions` are
    /// connected ahead of their first packet by the caller.
    pub(crate) fn set_derp_map(&mut self, now: Instant, dm: &DerpMap, out: &mut Vec<Action>) {
        let before = self.available();
        if &self.map != dm {
            self.map = dm.clone();
            if !self.map.regions.contains_key(&self.home) {
                self.home = 0;
            }
        }
        let changed = before != self.available() || self.probe.is_none() && self.last_probe.is_none();
        if !self.available() {
            return;
        }
        if dm.regions.len() == 1 {
            // One region: nothing to choose, so no need to wait for probes.
            if let Some(id) = dm.regions.keys().next() {
                self.set_home(*id, out);
            }
        }
        if changed || self.home == 0 {
            self.last_probe = None;
        }
        let names = netcheck::stun_hostnames(dm);
        self.stun_hosts.retain(|h, _| names.contains(h));
        let missing: Vec<String> = names.into_iter().filter(|h| !self.stun_hosts.contains_key(h)).collect();
        if !missing.is_empty() && !self.resolving {
            self.resolving = true;
            out.push(Action::Resolve(missing));
        }
        if self.probe.is_none() && self.last_probe.is_none() {
            // Probe now rather than at the next timer: the mesh waits for this to announce
            // the node.
            self.start_probe(now);
        }
        self.handle_timeout(now, out);
    }

    /// A region's DERP connection came up or went down.
    pub(crate) fn handle_relay_status(&mut self, now: Instant, region: i32, up: bool, out: &mut Vec<Action>) {
        let changed = if up { self.connected.insert(region) } else { self.connected.remove(&region) };
        if changed {
            self.handle_timeout(now, out);
        }
    }

    /// Host names resolved (an empty map when none resolved).
    pub(crate) fn handle_resolved(&mut self, now: Instant, hosts: HashMap<String, IpAddr>, out: &mut Vec<Action>) {
        self.resolving = false;
        if !hosts.is_empty() {
            self.stun_hosts.extend(hosts);
            if self.probe.is_none() {
                self.start_probe(now);
                self.handle_timeout(now, out);
            }
        }
    }

    /// The HTTPS ranking finished.
    pub(crate) fn handle_https_latency(
        &mut self,
        now: Instant,
        latencies: &[crate::derphttp::RegionLatency],
        out: &mut Vec<Action>,
    ) {
        self.https_running = false;
        if self.report.as_ref().is_some_and(|r| r.region_latency.is_empty()) {
            if let Some(home) = crate::derphttp::pick_home_region(latencies) {
                self.set_home(home, out);
                self.track_home_down(now);
            }
        }
    }

    /// A STUN packet; false when no probe expected it.
    pub(crate) fn handle_stun(&mut self, now: Instant, src: SocketAddr, data: &[u8], out: &mut Vec<Action>) -> bool {
        let Some(p) = self.probe.as_mut() else { return false };
        let ok = p.on_packet(src, data, now);
        // A probe is finished as soon as its last answer arrives, not at its deadline: the mesh
        // waits for its report to announce the node.
        if ok && p.done(now) {
            self.handle_timeout(now, out);
        }
        ok
    }

    /// Starts, advances and finishes STUN probes. Does only what is due.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.track_home_down(now);
        let home = self.home;
        let since_probe = |t: Instant| now.saturating_duration_since(t);
        let home_lost = self.home_down_since.is_some_and(|t| now.saturating_duration_since(t) >= HOME_DOWN_RECHECK)
            && self.last_probe.is_none_or(|t| since_probe(t) >= HOME_DOWN_RECHECK);
        if self.probe.is_none()
            && self.available()
            && (home_lost || self.last_probe.is_none_or(|t| since_probe(t) >= NETCHECK_INTERVAL))
        {
            if home_lost {
                tracing::debug!(region = home, "home DERP unreachable: netcheck now");
            }
            self.start_probe(now);
        }
        let Some(p) = self.probe.as_mut() else { return };
        out.extend(p.poll(now).into_iter().map(|(dst, payload)| Action::Stun(dst, payload)));
        if p.done(now) {
            if let Some(p) = self.probe.take() {
                self.finish_probe(p.report(), out);
                self.track_home_down(now);
            }
        }
    }

    fn track_home_down(&mut self, now: Instant) {
        let home_down = self.home > 0 && !self.connected.contains(&self.home);
        self.home_down_since = match (home_down, self.home_down_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
    }

    /// When [`Self::handle_timeout`] next has something to do.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if let Some(p) = &self.probe {
            return Some(p.next_deadline());
        }
        if !self.available() {
            return None;
        }
        let interval = self.last_probe.map(|t| t + NETCHECK_INTERVAL);
        let lost = self.home_down_since.map(|t| {
            let recheck = t + HOME_DOWN_RECHECK;
            self.last_probe.map_or(recheck, |p| recheck.max(p + HOME_DOWN_RECHECK))
        });
        interval.into_iter().chain(lost).min()
    }

    fn start_probe(&mut self, now: Instant) {
        self.last_probe = Some(now);
        self.probe = Some(netcheck::Probe::new(&netcheck::stun_targets_with(&self.map, &self.stun_hosts), now));
    }

    fn finish_probe(&mut self, report: Report, out: &mut Vec<Action>) {
        tracing::debug!(udp = report.udp, mapped = ?report.mapped, varies = ?report.mapping_varies_by_dest,
            latency = ?report.region_latency, "netcheck");
        if let Some(home) = report.preferred_region(self.home) {
            self.set_home(home, out);
        } else if self.map.regions.len() > 1 && !self.https_running {
            self.https_running = true;
            out.push(Action::MeasureHttps(self.map.clone()));
        }
        self.report = Some(report);
        out.push(Action::Report);
    }

    fn set_home(&mut self, region: i32, out: &mut Vec<Action>) {
        if self.home != region {
            self.home = region;
            tracing::info!(region, "home DERP region");
            out.push(Action::Home(region));
        }
    }
}
