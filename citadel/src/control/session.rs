//! The control session as a sans-IO state machine: when to dial, whether to register and with
//! which credentials, when to open the map stream, how long to back off after a failure, and
//! when to renew the node key before it expires.
//!
//! The I/O (the ts2021 connection, the register and map calls) lives in [`crate::mesh`], which
//! performs the [`Action`]s this emits and feeds back what happened.

use crate::backoff::Backoff;
use crate::mesh::ConnectError;
use crate::tailcfg::RegisterResponse;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First reconnect delay; doubles per failure.
pub const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Largest reconnect delay.
pub const RECONNECT_MAX: Duration = Duration::from_secs(15);

/// How far ahead of its expiry a node key is renewed, at most: the upstream CLI's margin, which
/// leaves a node that is briefly offline around then time to renew on its next connection.
pub const RENEW_AHEAD: Duration = Duration::from_secs(24 * 3600);
/// First retry delay after a failed renewal; doubles per failure.
pub const RENEW_RETRY_MIN: Duration = Duration::from_secs(1);
/// Largest retry delay after a failed renewal.
pub const RENEW_RETRY_MAX: Duration = Duration::from_secs(300);

/// A node key's health relative to its expiry, as the upstream CLI classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHealth {
    /// The key does not expire: nothing to renew.
    NoExpiry,
    /// The expiry is further away than the renewal margin.
    Healthy,
    /// Within the renewal margin: renew now, while online.
    RenewSoon,
    /// Already expired.
    Expired,
}

/// The renewal margin for a key valid from `seen` until `expiry`: [`RENEW_AHEAD`], or half the
/// lifetime when that is shorter (so a short-lived key is not renewed the moment it arrives).
pub fn renew_margin(seen: Instant, expiry: Instant) -> Duration {
    RENEW_AHEAD.min(expiry.saturating_duration_since(seen) / 2)
}

/// Classifies a key valid from `seen` until `expiry` (`None`: no expiry) at `now`.
pub fn key_health(expiry: Option<Instant>, seen: Instant, now: Instant) -> KeyHealth {
    match expiry {
        None => KeyHealth::NoExpiry,
        Some(e) if now >= e => KeyHealth::Expired,
        Some(e) if e - now <= renew_margin(seen, e) => KeyHealth::RenewSoon,
        Some(_) => KeyHealth::Healthy,
    }
}

/// What the session knows about the current node key's expiry.
#[derive(Debug, Clone, Copy)]
struct KeyLife {
    expiry: Instant,
    /// When this expiry was first reported (the start of the lifetime as far as we know).
    seen: Instant,
}

/// Where a renewal of the node key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// None running; one starts when the key is due.
    Idle,
    /// A renewal request is out.
    InFlight,
    /// The last one failed; the next may start at this time.
    RetryAt(Instant),
    /// The server said the key has expired: renewing cannot help any more.
    Refused,
}

/// What the session starts from.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The state directory holds a registration the server accepted before.
    pub registered: bool,
    /// An auth key is at hand (only ever sent when the registration is not valid, and dropped
    /// once the server accepts the node).
    pub has_auth_key: bool,
    /// Someone shows approval URLs, so the interactive flow may wait for an admin.
    pub interactive: bool,
    /// Bound on waiting for an interactive approval.
    pub login_timeout: Duration,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Action {
    /// Open a control connection; answer with [`Session::handle_dialed`] or
    /// [`Session::handle_error`].
    Dial,
    /// Send a register request on the open connection; answer with
    /// [`Session::handle_register`] or [`Session::handle_error`].
    Register {
        /// Include the auth key (first registration or a re-auth, never a valid state).
        with_auth_key: bool,
        /// The approval URL to wait on (Headscale's interactive flow), if any.
        followup: Option<String>,
    },
    /// Show this approval URL to the user.
    ShowAuthUrl(String),
    /// The server accepted the node anew: persist the registration and the org.
    Registered {
        /// The org (user login name) the node belongs to.
        org: String,
    },
    /// Open the streaming map request; answer with [`Session::handle_map_started`] or
    /// [`Session::handle_error`].
    StartMap,
    /// This attempt failed and a retry is scheduled at [`Session::poll_timeout`]; the connection
    /// (if any) is to be dropped.
    Failed(ConnectError),
    /// The first attempt failed: report this to the caller; the session is over.
    GiveUp(ConnectError),
    /// The node key is due for renewal: send a register request for a fresh node key with the
    /// current one as the old key, on the open connection; answer with
    /// [`Session::handle_renewed`] or [`Session::handle_renew_error`].
    RenewKey,
    /// The server accepted the fresh node key: switch the node (state, data plane) to it.
    KeyRenewed,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the backoff deadline before dialing.
    Waiting {
        until: Instant,
    },
    Dialing,
    /// Register request without the auth key, on the saved node key.
    Probing,
    /// Register request carrying the auth key.
    Authenticating,
    /// Repeating the register request until an admin approves `url` or `deadline` passes.
    AwaitingApproval {
        url: String,
        deadline: Instant,
    },
    OpeningMap,
    /// The map stream is open.
    Streaming,
    /// Gave up.
    Done,
}

/// The control session's decisions, driven by hand.
///
/// Calling contract: after every `handle_*` call (and after [`Session::new`]) drain
/// [`Session::poll_action`] until it returns `None` and perform the actions in order, then
/// wait for the outcome of the I/O just started or until [`Session::poll_timeout`], whichever
/// applies, and feed it back. The deadline passing is reported with
/// [`Session::handle_timeout`]. `now` must never go backwards between calls.
///
/// Until the first map stream opens a failure ends the session with [`Action::GiveUp`]; after
/// that every failure is retried with backoff ([`Action::Failed`] plus a deadline). The auth key
/// is sent only when the state holds no registration, or the server refused or expired the
/// saved one, and at most until the server first accepts the node: from then on it is
/// forgotten (the driver drops it on [`Action::StartMap`]).
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    /// Still the first attempt: failures are final.
    joining: bool,
    backoff: Backoff,
    actions: VecDeque<Action>,
    key: Option<KeyLife>,
    /// The expiry of the key just replaced: a map sent before the renewal still carries it.
    replaced: Option<Instant>,
    renewal: Renewal,
    renew_backoff: Backoff,
}

impl Session {
    /// A session that dials right away; `seed` drives the reconnect jitter.
    pub fn new(cfg: SessionConfig, seed: u64) -> Self {
        // Up to a quarter on top of each delay keeps a fleet from reconnecting in lockstep.
        let backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX).jitter(1.0, 1.25, seed);
        let renew_backoff = Backoff::new(RENEW_RETRY_MIN, RENEW_RETRY_MAX).jitter(1.0, 1.25, seed ^ 0x5eed);
        Session {
            cfg,
            phase: Phase::Dialing,
            joining: true,
            backoff,
            actions: VecDeque::from([Action::Dial]),
            key: None,
            replaced: None,
            renewal: Renewal::Idle,
            renew_backoff,
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] is due: the end of a backoff wait or of the approval
    /// wait, or (while streaming) when the node key is due for renewal.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting { until } => Some(*until),
            Phase::AwaitingApproval { deadline, .. } => Some(*deadline),
            Phase::Streaming => self.renew_due(),
            _ => None,
        }
    }

    /// When the next renewal may start: the renewal margin before the expiry, or the retry
    /// time after a failure; `None` without an expiry or while one is out.
    pub fn renew_due(&self) -> Option<Instant> {
        let k = self.key?;
        let due = k.expiry - renew_margin(k.seen, k.expiry);
        match self.renewal {
            Renewal::Idle => Some(due),
            Renewal::RetryAt(t) => Some(t.max(due)),
            Renewal::InFlight | Renewal::Refused => None,
        }
    }

    /// The node key's health at `now`.
    pub fn key_health(&self, now: Instant) -> KeyHealth {
        match self.key {
            None => KeyHealth::NoExpiry,
            Some(k) => key_health(Some(k.expiry), k.seen, now),
        }
    }

    /// The server reported the node key's expiry (`None`: it does not expire), e.g. in a map.
    pub fn handle_key_expiry(&mut self, now: Instant, expiry: Option<Instant>) {
        if let (Some(old), Some(e)) = (self.replaced, expiry) {
            if e <= old + Duration::from_secs(1) {
                return;
            }
        }
        match (self.key, expiry) {
            (_, None) => self.key = None,
            // Map times are converted from wall-clock time, so the same expiry may arrive a few
            // milliseconds apart; only a real change starts a new lifetime.
            (Some(k), Some(e)) if k.expiry.max(e) - k.expiry.min(e) < Duration::from_secs(1) => return,
            (_, Some(e)) => self.key = Some(KeyLife { expiry: e, seen: now }),
        }
        if self.renewal != Renewal::InFlight {
            self.renewal = Renewal::Idle;
            self.renew_backoff.reset();
        }
    }

    /// The server answered the renewal request.
    pub fn handle_renewed(&mut self, now: Instant, resp: &RegisterResponse) {
        if self.renewal != Renewal::InFlight {
            return;
        }
        if resp.machine_authorized && resp.error.is_empty() && !resp.node_key_expired {
            self.renewal = Renewal::Idle;
            self.renew_backoff.reset();
            // The new key's expiry comes with the next map; until then there is nothing to time.
            self.replaced = self.key.take().map(|k| k.expiry);
            self.actions.push_back(Action::KeyRenewed);
        } else if resp.node_key_expired {
            self.renewal = Renewal::Refused;
        } else {
            self.renewal = Renewal::RetryAt(now + self.renew_backoff.next_delay());
        }
    }

    /// The renewal request failed in transit; it is retried with backoff.
    pub fn handle_renew_error(&mut self, now: Instant) {
        if self.renewal == Renewal::InFlight {
            self.renewal = Renewal::RetryAt(now + self.renew_backoff.next_delay());
        }
    }

    /// True while the map stream is open.
    pub fn is_streaming(&self) -> bool {
        matches!(self.phase, Phase::Streaming)
    }

    /// True once the session gave up.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether the session holds a registration the server accepted.
    pub fn is_registered(&self) -> bool {
        self.cfg.registered
    }

    /// Time passed; acts on a deadline from [`Session::poll_timeout`] once `now` reaches it.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::Waiting { until } if now >= *until => {
                self.phase = Phase::Dialing;
                self.actions.push_back(Action::Dial);
            }
            Phase::AwaitingApproval { url, deadline } if now >= *deadline => {
                let auth_url = Some(url.clone());
                self.fail(now, ConnectError::NeedsAuth { auth_url });
            }
            Phase::Streaming if self.renew_due().is_some_and(|t| now >= t) => {
                self.renewal = Renewal::InFlight;
                self.actions.push_back(Action::RenewKey);
            }
            _ => {}
        }
    }

    /// The control connection is open.
    pub fn handle_dialed(&mut self, _now: Instant) {
        if !matches!(self.phase, Phase::Dialing) {
            return;
        }
        if self.cfg.registered || !self.cfg.has_auth_key {
            self.phase = Phase::Probing;
            self.actions.push_back(Action::Register { with_auth_key: false, followup: None });
        } else {
            self.phase = Phase::Authenticating;
            self.actions.push_back(Action::Register { with_auth_key: true, followup: None });
        }
    }

    /// The server answered the register request.
    pub fn handle_register(&mut self, now: Instant, resp: &RegisterResponse) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Probing => {
                if resp.machine_authorized && resp.error.is_empty() && !resp.node_key_expired {
                    self.cfg.has_auth_key = false;
                    self.open_map();
                } else if resp.node_key_expired && !self.cfg.has_auth_key {
                    self.fail(now, ConnectError::Expired);
                } else if self.cfg.has_auth_key {
                    // The saved registration is gone or expired: this is a re-auth.
                    self.phase = Phase::Authenticating;
                    self.actions.push_back(Action::Register { with_auth_key: true, followup: None });
                } else if !resp.auth_url.is_empty() && self.cfg.interactive {
                    let url = resp.auth_url.clone();
                    self.actions.push_back(Action::ShowAuthUrl(url.clone()));
                    self.actions.push_back(Action::Register { with_auth_key: false, followup: Some(url.clone()) });
                    self.phase = Phase::AwaitingApproval { url, deadline: now + self.cfg.login_timeout };
                } else {
                    let auth_url = Some(resp.auth_url.clone()).filter(|u| !u.is_empty());
                    self.fail(now, ConnectError::NeedsAuth { auth_url });
                }
            }
            Phase::Authenticating => {
                if !resp.error.is_empty() {
                    self.fail(now, ConnectError::AuthRejected(resp.error.clone()));
                } else if !resp.machine_authorized {
                    let auth_url = Some(resp.auth_url.clone()).filter(|u| !u.is_empty());
                    self.fail(now, ConnectError::NeedsAuth { auth_url });
                } else {
                    self.accept(resp);
                }
            }
            Phase::AwaitingApproval { url, deadline } => {
                if !resp.error.is_empty() {
                    self.fail(now, ConnectError::AuthRejected(resp.error.clone()));
                } else if resp.machine_authorized {
                    self.accept(resp);
                } else if now >= deadline {
                    self.fail(now, ConnectError::NeedsAuth { auth_url: Some(url) });
                } else {
                    self.actions.push_back(Action::Register { with_auth_key: false, followup: Some(url.clone()) });
                    self.phase = Phase::AwaitingApproval { url, deadline };
                }
            }
            other => self.phase = other,
        }
    }

    /// The map stream is open.
    pub fn handle_map_started(&mut self, _now: Instant) {
        if matches!(self.phase, Phase::OpeningMap) {
            self.phase = Phase::Streaming;
            self.joining = false;
        }
    }

    /// A map message arrived: the connection works, so the next failure starts the backoff over.
    pub fn handle_map_message(&mut self, _now: Instant) {
        if matches!(self.phase, Phase::Streaming) {
            self.backoff.reset();
        }
    }

    /// The map stream ended or failed; a reconnect is scheduled.
    pub fn handle_stream_ended(&mut self, now: Instant) {
        if self.renewal == Renewal::InFlight {
            // The request went down with the connection; the next connection tries again.
            self.renewal = Renewal::Idle;
        }
        if matches!(self.phase, Phase::Streaming) {
            self.phase = Phase::Waiting { until: now + self.backoff.next_delay() };
        }
    }

    /// The I/O of the current step (dial, register, map) failed.
    pub fn handle_error(&mut self, now: Instant, err: ConnectError) {
        match self.phase {
            Phase::Dialing
            | Phase::Probing
            | Phase::Authenticating
            | Phase::AwaitingApproval { .. }
            | Phase::OpeningMap => self.fail(now, err),
            Phase::Streaming => self.handle_stream_ended(now),
            Phase::Waiting { .. } | Phase::Done => {}
        }
    }

    fn accept(&mut self, resp: &RegisterResponse) {
        self.cfg.registered = true;
        self.cfg.has_auth_key = false;
        self.actions.push_back(Action::Registered { org: resp.user.login_name.clone() });
        self.open_map();
    }

    fn open_map(&mut self) {
        self.phase = Phase::OpeningMap;
        self.actions.push_back(Action::StartMap);
    }

    fn fail(&mut self, now: Instant, err: ConnectError) {
        if self.joining {
            self.phase = Phase::Done;
            self.actions.push_back(Action::GiveUp(err));
        } else {
            self.phase = Phase::Waiting { until: now + self.backoff.next_delay() };
            self.actions.push_back(Action::Failed(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ControlError;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(registered: bool, has_auth_key: bool) -> SessionConfig {
        SessionConfig { registered, has_auth_key, interactive: false, login_timeout: Duration::from_secs(60) }
    }

    fn ok() -> RegisterResponse {
        RegisterResponse { machine_authorized: true, ..Default::default() }
    }

    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    /// The auth-key flag of every register request in `actions`.
    fn auth_keys(actions: &[Action]) -> Vec<bool> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Register { with_auth_key, .. } => Some(*with_auth_key),
                _ => None,
            })
            .collect()
    }

    /// Dials, registers with `resp` and opens the map; returns the register flags sent.
    fn connect(s: &mut Session, now: Instant, resp: &RegisterResponse) -> Vec<bool> {
        let mut sent = Vec::new();
        assert!(matches!(drain(s).as_slice(), [Action::Dial]));
        s.handle_dialed(now);
        loop {
            let acts = drain(s);
            sent.extend(auth_keys(&acts));
            if acts.iter().any(|a| matches!(a, Action::StartMap)) {
                break;
            }
            assert!(matches!(acts.last(), Some(Action::Register { .. })), "unexpected {acts:?}");
            s.handle_register(now, resp);
        }
        s.handle_map_started(now);
        assert!(s.is_streaming());
        sent
    }

    /// A session that streamed once (past the first attempt), started at `t0`.
    fn running(t0: Instant) -> Session {
        let mut s = Session::new(cfg(true, false), 1);
        connect(&mut s, t0, &ok());
        s
    }

    #[test]
    fn reconnect_backoff_grows_then_resets_after_a_stream_that_delivered() {
        let t0 = Instant::now();
        let mut s = running(t0);
        s.handle_map_message(t0);
        s.handle_stream_ended(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let until = s.poll_timeout().expect("a reconnect is scheduled");
            waits.push(until - now);
            // Nothing happens before the deadline.
            s.handle_timeout(until - MS);
            assert!(drain(&mut s).is_empty());
            now = until;
            s.handle_timeout(now);
            assert!(matches!(drain(&mut s).as_slice(), [Action::Dial]));
            s.handle_error(now, ControlError::Unreachable("nexus".into(), "refused".into()).into());
            assert!(matches!(drain(&mut s).as_slice(), [Action::Failed(ConnectError::Control(_))]));
        }
        let bases = [250, 500, 1000, 2000, 4000, 8000, 15000, 15000];
        for (w, base) in waits.iter().zip(bases) {
            assert!(*w >= MS * base && *w <= MS * base * 5 / 4, "wait {w:?} for base {base} ms");
        }
        // A connection whose stream delivered resets the schedule.
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        s.handle_dialed(now);
        assert!(matches!(drain(&mut s).as_slice(), [Action::Dial, Action::Register { with_auth_key: false, .. }]));
        s.handle_register(now, &ok());
        assert!(matches!(drain(&mut s).as_slice(), [Action::StartMap]));
        s.handle_map_started(now);
        s.handle_map_message(now);
        s.handle_stream_ended(now);
        let w = s.poll_timeout().unwrap() - now;
        assert!(w >= 250 * MS && w <= 313 * MS, "after a good stream the wait starts over, got {w:?}");
    }

    #[test]
    fn a_stream_that_never_delivered_keeps_growing_the_backoff() {
        let t0 = Instant::now();
        let mut s = running(t0);
        s.handle_stream_ended(t0);
        let first = s.poll_timeout().unwrap();
        s.handle_timeout(first);
        drain(&mut s);
        s.handle_dialed(first);
        s.handle_register(first, &ok());
        s.handle_map_started(first);
        drain(&mut s);
        s.handle_stream_ended(first);
        let w = s.poll_timeout().unwrap() - first;
        assert!(w >= 500 * MS, "no message arrived, so the backoff keeps growing: {w:?}");
    }

    #[test]
    fn a_valid_state_never_sends_the_auth_key_across_reconnects() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(true, true), 9);
        assert_eq!(connect(&mut s, t0, &ok()), [false]);
        let mut now = t0;
        for _ in 0..5 {
            s.handle_map_message(now);
            s.handle_stream_ended(now);
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            assert_eq!(connect(&mut s, now, &ok()), [false], "reconnect re-used the saved registration");
        }
    }

    #[test]
    fn failures_while_reconnecting_back_off_and_never_bring_the_auth_key_back() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(true, true), 11);
        assert_eq!(connect(&mut s, t0, &ok()), [false]);
        s.handle_map_message(t0);
        s.handle_stream_ended(t0);
        let err = || ConnectError::Control(ControlError::Closed);
        let unapproved = RegisterResponse { auth_url: "https://nexus/a/1".into(), ..Default::default() };
        let mut now = t0;
        let mut waits = Vec::new();
        let mut sent = Vec::new();
        // Each step fails differently: the dial, the register call, the server's answer, the map.
        for step in 0..4 {
            let until = s.poll_timeout().expect("a retry is scheduled");
            waits.push(until - now);
            now = until;
            s.handle_timeout(now);
            assert!(matches!(drain(&mut s).as_slice(), [Action::Dial]));
            if step == 0 {
                s.handle_error(now, err());
            } else {
                s.handle_dialed(now);
                sent.extend(auth_keys(&drain(&mut s)));
                match step {
                    1 => s.handle_error(now, err()),
                    2 => s.handle_register(now, &unapproved),
                    _ => {
                        s.handle_register(now, &ok());
                        assert!(matches!(drain(&mut s).as_slice(), [Action::StartMap]));
                        s.handle_error(now, err());
                    }
                }
            }
            let acts = drain(&mut s);
            assert!(matches!(acts.as_slice(), [Action::Failed(_)]), "step {step}: {acts:?}");
            assert!(!s.is_done(), "after joining, no failure ends the session");
        }
        assert_eq!(sent, [false, false, false], "the saved registration is probed, never re-authenticated");
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "each failure waits longer: {waits:?}");
    }

    #[test]
    fn the_auth_key_goes_only_into_a_first_registration_or_a_re_auth() {
        let t0 = Instant::now();
        // First registration: straight to the key, then never again.
        let mut s = Session::new(cfg(false, true), 3);
        assert_eq!(connect(&mut s, t0, &ok()), [true]);
        assert!(s.is_registered());
        s.handle_map_message(t0);
        s.handle_stream_ended(t0);
        let now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        assert_eq!(connect(&mut s, now, &ok()), [false]);

        // Saved registration the server no longer accepts: probe, then re-auth with the key.
        let mut s = Session::new(cfg(true, true), 3);
        drain(&mut s);
        s.handle_dialed(t0);
        assert_eq!(auth_keys(&drain(&mut s)), [false]);
        s.handle_register(t0, &RegisterResponse { node_key_expired: true, ..Default::default() });
        assert_eq!(auth_keys(&drain(&mut s)), [true]);
        s.handle_register(t0, &ok());
        let acts = drain(&mut s);
        assert!(matches!(acts.as_slice(), [Action::Registered { .. }, Action::StartMap]), "{acts:?}");
    }

    #[test]
    fn once_accepted_the_auth_key_is_never_used_again_even_after_expiry() {
        let t0 = Instant::now();
        for registered in [false, true] {
            let mut s = Session::new(cfg(registered, true), 5);
            connect(&mut s, t0, &ok());
            s.handle_map_message(t0);
            s.handle_stream_ended(t0);
            let now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            drain(&mut s);
            s.handle_dialed(now);
            assert_eq!(auth_keys(&drain(&mut s)), [false]);
            s.handle_register(now, &RegisterResponse { node_key_expired: true, ..Default::default() });
            let acts = drain(&mut s);
            assert!(matches!(acts.as_slice(), [Action::Failed(ConnectError::Expired)]), "{acts:?}");
        }
    }

    #[test]
    fn an_expired_key_without_an_auth_key_gives_up_with_expired() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(true, false), 0);
        drain(&mut s);
        s.handle_dialed(t0);
        drain(&mut s);
        s.handle_register(t0, &RegisterResponse { node_key_expired: true, ..Default::default() });
        assert!(matches!(drain(&mut s).as_slice(), [Action::GiveUp(ConnectError::Expired)]));
        assert!(s.is_done());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn a_refused_auth_key_gives_up_with_the_servers_reason() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(false, true), 0);
        drain(&mut s);
        s.handle_dialed(t0);
        drain(&mut s);
        s.handle_register(t0, &RegisterResponse { error: "invalid pre-auth key".into(), ..Default::default() });
        match drain(&mut s).as_slice() {
            [Action::GiveUp(ConnectError::AuthRejected(why))] => assert_eq!(why, "invalid pre-auth key"),
            other => panic!("expected AuthRejected, got {other:?}"),
        }
    }

    #[test]
    fn no_key_and_no_registration_needs_auth_with_the_url() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(false, false), 0);
        drain(&mut s);
        s.handle_dialed(t0);
        assert_eq!(auth_keys(&drain(&mut s)), [false]);
        s.handle_register(t0, &RegisterResponse { auth_url: "http://nexus/register/abc".into(), ..Default::default() });
        match drain(&mut s).as_slice() {
            [Action::GiveUp(ConnectError::NeedsAuth { auth_url: Some(u) })] => {
                assert_eq!(u, "http://nexus/register/abc")
            }
            other => panic!("expected NeedsAuth, got {other:?}"),
        }
    }

    #[test]
    fn after_joining_an_expired_key_is_retried_not_final() {
        let t0 = Instant::now();
        let mut s = running(t0);
        s.handle_stream_ended(t0);
        let now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        drain(&mut s);
        s.handle_dialed(now);
        drain(&mut s);
        s.handle_register(now, &RegisterResponse { node_key_expired: true, ..Default::default() });
        assert!(matches!(drain(&mut s).as_slice(), [Action::Failed(ConnectError::Expired)]));
        assert!(s.poll_timeout().is_some_and(|t| t > now));
    }

    #[test]
    fn interactive_approval_repeats_until_approved_or_the_deadline() {
        let t0 = Instant::now();
        let url = "http://nexus/register/xyz";
        let waiting = RegisterResponse { auth_url: url.into(), ..Default::default() };
        let mut c = cfg(false, false);
        c.interactive = true;
        let mut s = Session::new(c.clone(), 0);
        drain(&mut s);
        s.handle_dialed(t0);
        drain(&mut s);
        s.handle_register(t0, &waiting);
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::ShowAuthUrl(u), Action::Register { with_auth_key: false, followup: Some(f) }] if u == url && f == url),
            "{acts:?}"
        );
        assert_eq!(s.poll_timeout(), Some(t0 + c.login_timeout));
        let t1 = t0 + Duration::from_secs(20);
        s.handle_register(t1, &waiting);
        assert!(matches!(drain(&mut s).as_slice(), [Action::Register { followup: Some(_), .. }]));
        s.handle_register(t1, &ok());
        assert!(matches!(drain(&mut s).as_slice(), [Action::Registered { .. }, Action::StartMap]));
        assert!(s.is_registered());

        // Nobody approves: the deadline ends it with the URL to visit.
        let mut s = Session::new(c.clone(), 0);
        drain(&mut s);
        s.handle_dialed(t0);
        drain(&mut s);
        s.handle_register(t0, &waiting);
        drain(&mut s);
        s.handle_timeout(t0 + c.login_timeout - MS);
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + c.login_timeout);
        assert!(matches!(drain(&mut s).as_slice(), [Action::GiveUp(ConnectError::NeedsAuth { auth_url: Some(_) })]));
    }

    #[test]
    fn a_failed_first_dial_gives_up() {
        let t0 = Instant::now();
        let mut s = Session::new(cfg(true, false), 0);
        drain(&mut s);
        s.handle_error(t0, ControlError::Closed.into());
        assert!(matches!(drain(&mut s).as_slice(), [Action::GiveUp(ConnectError::Control(ControlError::Closed))]));
        // Late inputs after giving up change nothing.
        s.handle_dialed(t0);
        s.handle_register(t0, &ok());
        s.handle_timeout(t0 + Duration::from_secs(3600));
        assert!(drain(&mut s).is_empty());
    }

    const H: Duration = Duration::from_secs(3600);

    fn renew_actions(s: &mut Session) -> Vec<&'static str> {
        drain(s)
            .into_iter()
            .map(|a| match a {
                Action::RenewKey => "renew",
                Action::KeyRenewed => "renewed",
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn key_health_follows_the_upstream_classes_with_a_margin_capped_by_the_lifetime() {
        let t0 = Instant::now();
        assert_eq!(key_health(None, t0, t0), KeyHealth::NoExpiry);
        // A 90-day key: renewed in its last 24 hours.
        let e = t0 + 90 * 24 * H;
        assert_eq!(key_health(Some(e), t0, e - 25 * H), KeyHealth::Healthy);
        assert_eq!(key_health(Some(e), t0, e - 24 * H), KeyHealth::RenewSoon);
        assert_eq!(key_health(Some(e), t0, e), KeyHealth::Expired);
        // A 10-second key: renewed in its second half, not the moment it arrives.
        let e = t0 + Duration::from_secs(10);
        assert_eq!(key_health(Some(e), t0, t0), KeyHealth::Healthy);
        assert_eq!(key_health(Some(e), t0, t0 + Duration::from_secs(4)), KeyHealth::Healthy);
        assert_eq!(key_health(Some(e), t0, t0 + Duration::from_secs(5)), KeyHealth::RenewSoon);
        assert_eq!(renew_margin(t0, t0 + 90 * 24 * H), RENEW_AHEAD);
    }

    #[test]
    fn a_streaming_node_renews_its_key_once_when_due_and_starts_over_on_the_new_expiry() {
        let t0 = Instant::now();
        let mut s = running(t0);
        assert_eq!(s.poll_timeout(), None, "no expiry, nothing to renew");
        let e1 = t0 + 48 * H;
        s.handle_key_expiry(t0, Some(e1));
        assert_eq!(s.poll_timeout(), Some(e1 - 24 * H));
        assert_eq!(s.key_health(t0), KeyHealth::Healthy);
        s.handle_timeout(e1 - 24 * H - MS);
        assert!(drain(&mut s).is_empty());
        // The same expiry reported again (a keep-alive, a few ms of clock conversion) changes nothing.
        s.handle_key_expiry(t0 + H, Some(e1 + MS * 3));
        assert_eq!(s.poll_timeout(), Some(e1 - 24 * H));
        let due = e1 - 24 * H;
        s.handle_timeout(due);
        assert_eq!(renew_actions(&mut s), ["renew"]);
        assert_eq!(s.poll_timeout(), None, "one renewal at a time");
        s.handle_timeout(due + H);
        assert!(drain(&mut s).is_empty());
        s.handle_renewed(due, &ok());
        assert_eq!(renew_actions(&mut s), ["renewed"]);
        // A map sent before the renewal still carries the old expiry: ignored.
        s.handle_key_expiry(due, Some(e1));
        assert_eq!(s.poll_timeout(), None);
        let e2 = due + 48 * H;
        s.handle_key_expiry(due, Some(e2));
        assert_eq!(s.poll_timeout(), Some(e2 - 24 * H));
        assert!(s.is_streaming(), "renewal never leaves the stream");
    }

    #[test]
    fn a_failed_renewal_is_retried_with_backoff_and_an_expired_key_is_not() {
        let t0 = Instant::now();
        let mut s = running(t0);
        let e = t0 + Duration::from_secs(600);
        s.handle_key_expiry(t0, Some(e));
        let due = s.poll_timeout().unwrap();
        assert_eq!(due, t0 + Duration::from_secs(300));
        s.handle_timeout(due);
        assert_eq!(renew_actions(&mut s), ["renew"]);
        s.handle_renew_error(due);
        let r1 = s.poll_timeout().unwrap();
        assert!(r1 >= due + RENEW_RETRY_MIN && r1 <= due + RENEW_RETRY_MIN * 5 / 4, "{:?}", r1 - due);
        s.handle_timeout(r1);
        assert_eq!(renew_actions(&mut s), ["renew"]);
        s.handle_renewed(r1, &RegisterResponse { error: "busy".into(), ..Default::default() });
        let r2 = s.poll_timeout().unwrap();
        assert!(r2 - r1 >= 2 * RENEW_RETRY_MIN, "the retry delay grows: {:?}", r2 - r1);
        s.handle_timeout(r2);
        assert_eq!(renew_actions(&mut s), ["renew"]);
        s.handle_renewed(r2, &RegisterResponse { node_key_expired: true, ..Default::default() });
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.poll_timeout(), None, "an expired key cannot be renewed; re-auth is the user's call");
    }

    #[test]
    fn renewal_waits_for_a_connection_and_a_lost_request_is_sent_again() {
        let t0 = Instant::now();
        let mut s = running(t0);
        let e = t0 + Duration::from_secs(100);
        s.handle_key_expiry(t0, Some(e));
        let due = s.poll_timeout().unwrap();
        s.handle_timeout(due);
        assert_eq!(renew_actions(&mut s), ["renew"]);
        // The connection drops with the request out: no renewal while offline, only the dial.
        s.handle_stream_ended(due);
        let until = s.poll_timeout().unwrap();
        assert!(until - due <= RECONNECT_MIN * 5 / 4, "the reconnect wait, not a renewal time");
        s.handle_renewed(due, &ok());
        assert!(drain(&mut s).is_empty(), "a late answer for a dropped connection is ignored");
        s.handle_timeout(until);
        assert!(matches!(drain(&mut s).as_slice(), [Action::Dial]));
        s.handle_dialed(until);
        assert_eq!(auth_keys(&drain(&mut s)), [false]);
        s.handle_register(until, &ok());
        assert!(matches!(drain(&mut s).as_slice(), [Action::StartMap]));
        s.handle_map_started(until);
        assert_eq!(s.poll_timeout(), Some(due), "already due: renew as soon as the stream is up");
        s.handle_timeout(until);
        assert_eq!(renew_actions(&mut s), ["renew"]);
    }
}
