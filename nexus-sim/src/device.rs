//! Device logins: a CLI starts a flow, a human approves the user code, and the CLI's polling
//! yields a single-use pre-auth key for the org the approving admin picked.
//!
//! Two wire dialects share one table of flows:
//! - RFC 8628: `POST /oauth/device/code` (form) → device code, user code, verification URL;
//!   `POST /oauth/token` (form, grant `urn:ietf:params:oauth:grant-type:device_code`) →
//!   `authorization_pending`, `slow_down`, `expired_token`, `access_denied` or
//!   `{"access_token": <auth key>}`.
//! - AceTeam's platform flow, as the upstream Go CLI speaks it: `POST
//!   /api/fabric/device-auth/start` (JSON: client id and version, host name, machine id) and
//!   `POST /api/fabric/device-auth/token` (JSON: device code, grant type) → the same OAuth
//!   error codes (400, with `error_description` and, for `slow_down`, the new `interval`) or
//!   `{"authkey", "expires_in", "nexus_url", "org_id", "org_name"}`.
//!
//! Admins decide through the admin API (`POST /api/v1/device/approve`, `/api/v1/device/deny`)
//! or the `/device` page ([`crate::web`]).

use crate::Shared;
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use citadel_proto::wall;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Grant type of the token request.
pub const GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Most device flows open at once; the endpoints that start them are unauthenticated.
pub const MAX_FLOWS: usize = 1024;

/// Longest host name or client name kept from a start request (longer ones are cut).
pub const MAX_LABEL: usize = 64;

/// Largest request body the device endpoints read.
pub const MAX_BODY: usize = 8 * 1024;

/// Lifetime of the key an approval mints.
const KEY_TTL: Duration = Duration::from_secs(3600);

/// How a flow was decided.
#[derive(Clone, PartialEq)]
pub enum Verdict {
    /// Nobody decided yet.
    Pending,
    /// Approved into an org, with the key minted for it.
    Approved {
        /// The pre-auth key minted for the device.
        key: String,
        /// The org's id.
        org_id: u64,
        /// The org's name.
        org_name: String,
    },
    /// Denied.
    Denied,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Pending => f.write_str("Pending"),
            Verdict::Approved { org_name, .. } => write!(f, "Approved({org_name:?}, <key redacted>)"),
            Verdict::Denied => f.write_str("Denied"),
        }
    }
}

/// One open flow.
#[derive(Debug, Clone)]
pub struct Flow {
    /// What the human types (`XXXX-XXXX`).
    pub user_code: String,
    /// Host name the device reported (untrusted text).
    pub hostname: String,
    /// Client name and version the device reported (untrusted text).
    pub client: String,
    expires: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    verdict: Verdict,
}

impl Flow {
    /// Time left before the code expires.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }
}

/// What one poll of the token endpoint yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Poll {
    /// An OAuth error code; `interval` is the flow's (possibly raised) interval.
    Error {
        /// The OAuth error code.
        code: &'static str,
        /// How long the client must wait between polls.
        interval: Duration,
    },
    /// Approved: the flow is gone, here is its key.
    Approved {
        /// The pre-auth key minted for the device.
        key: String,
        /// The org's id.
        org_id: u64,
        /// The org's name.
        org_name: String,
    },
}

/// Open device flows, by device code.
#[derive(Default)]
pub struct Flows {
    flows: Mutex<HashMap<String, Flow>>,
    /// Admin sessions of the approval page.
    pub sessions: crate::web::Sessions,
}

/// User codes are 8 letters from an alphabet without look-alikes, shown as XXXX-XXXX.
fn user_code() -> String {
    const A: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut b = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    let s: String = b.iter().map(|x| A[*x as usize % A.len()] as char).collect();
    format!("{}-{}", &s[..4], &s[4..])
}

fn normalize(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

/// Keeps at most [`MAX_LABEL`] characters, without control characters.
fn label(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_LABEL).collect()
}

impl Flows {
    /// Drops flows whose code has expired.
    pub fn prune(&self, now: Instant) {
        self.flows.lock().retain(|_, f| f.expires > now);
    }

    /// How many flows are open.
    pub fn len(&self) -> usize {
        self.flows.lock().len()
    }

    /// True when no flow is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens a flow; `None` when [`MAX_FLOWS`] are open. Returns `(device code, user code)`.
    pub fn open(
        &self,
        hostname: &str,
        client: &str,
        ttl: Duration,
        interval: Duration,
        now: Instant,
    ) -> Option<(String, String)> {
        let mut flows = self.flows.lock();
        flows.retain(|_, f| f.expires > now);
        if flows.len() >= MAX_FLOWS {
            return None;
        }
        let device = crate::store::random_hex(24);
        let code = user_code();
        flows.insert(
            device.clone(),
            Flow {
                user_code: code.clone(),
                hostname: label(hostname),
                client: label(client),
                expires: now + ttl,
                interval,
                last_poll: None,
                verdict: Verdict::Pending,
            },
        );
        Some((device, code))
    }

    /// Answers one poll at `now` (RFC 8628 §3.5 semantics, shared by both dialects).
    pub fn poll(&self, device: &str, now: Instant) -> Poll {
        let mut flows = self.flows.lock();
        let Some(f) = flows.get_mut(device) else {
            return Poll::Error { code: "expired_token", interval: Duration::ZERO };
        };
        if f.expires <= now {
            flows.remove(device);
            return Poll::Error { code: "expired_token", interval: Duration::ZERO };
        }
        if let Some(last) = f.last_poll {
            if now.duration_since(last) < f.interval {
                // Polling too fast: the client must add 5 s to its interval.
                f.interval += Duration::from_secs(5);
                f.last_poll = Some(now);
                return Poll::Error { code: "slow_down", interval: f.interval };
            }
        }
        f.last_poll = Some(now);
        let interval = f.interval;
        match f.verdict.clone() {
            Verdict::Pending => Poll::Error { code: "authorization_pending", interval },
            Verdict::Denied => {
                flows.remove(device);
                Poll::Error { code: "access_denied", interval }
            }
            Verdict::Approved { key, org_id, org_name } => {
                flows.remove(device);
                Poll::Approved { key, org_id, org_name }
            }
        }
    }

    /// The pending, unexpired flow with this user code: `(device code, flow)`.
    pub fn pending_by_user_code(&self, code: &str, now: Instant) -> Option<(String, Flow)> {
        let want = normalize(code);
        if want.is_empty() {
            return None;
        }
        self.flows
            .lock()
            .iter()
            .find(|(_, f)| normalize(&f.user_code) == want && f.verdict == Verdict::Pending && f.expires > now)
            .map(|(d, f)| (d.clone(), f.clone()))
    }

    fn set(&self, device: &str, v: Verdict, now: Instant) -> bool {
        match self.flows.lock().get_mut(device) {
            Some(f) if f.verdict == Verdict::Pending && f.expires > now => {
                f.verdict = v;
                true
            }
            _ => false,
        }
    }
}

/// Why a decision was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// No pending flow has that user code.
    #[error("unknown, decided or expired code")]
    UnknownCode,
    /// No org by that name or id.
    #[error("org {0:?} not found")]
    UnknownOrg(String),
    /// The key could not be minted.
    #[error("could not mint a key: {0}")]
    Key(String),
}

impl DecideError {
    fn status(&self) -> StatusCode {
        match self {
            DecideError::UnknownCode | DecideError::UnknownOrg(_) => StatusCode::NOT_FOUND,
            DecideError::Key(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Approves the flow with user code `code` into `org` (id or name); returns the org's name.
pub fn approve_code(s: &Shared, code: &str, org: &str) -> Result<String, DecideError> {
    let now = Instant::now();
    let (device, _) = s.device.pending_by_user_code(code, now).ok_or(DecideError::UnknownCode)?;
    let user = org
        .parse::<u64>()
        .ok()
        .and_then(|id| s.store.user(id))
        .or_else(|| s.store.user_by_name(org))
        .ok_or_else(|| DecideError::UnknownOrg(label(org)))?;
    let expiry = wall::now() + chrono::Duration::seconds(KEY_TTL.as_secs() as i64);
    let key =
        s.store.create_key(user.id, false, false, Some(expiry), vec![]).map_err(|e| DecideError::Key(e.to_string()))?;
    if !s.device.set(&device, Verdict::Approved { key: key.key, org_id: user.id, org_name: user.name.clone() }, now) {
        return Err(DecideError::UnknownCode);
    }
    tracing::info!(org = %user.name, "device login approved");
    Ok(user.name)
}

/// Denies the flow with user code `code`.
pub fn deny_code(s: &Shared, code: &str) -> Result<(), DecideError> {
    let now = Instant::now();
    let (device, _) = s.device.pending_by_user_code(code, now).ok_or(DecideError::UnknownCode)?;
    if s.device.set(&device, Verdict::Denied, now) {
        tracing::info!("device login denied");
        Ok(())
    } else {
        Err(DecideError::UnknownCode)
    }
}

fn busy() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "too many logins in progress; try later"}))).into_response()
}

fn base(s: &Shared) -> String {
    s.cfg.server_url.trim_end_matches('/').to_string()
}

fn interval(s: &Shared) -> Duration {
    Duration::from_secs(s.cfg.device_poll_interval.max(1))
}

/// `POST /oauth/device/code`.
pub async fn start(State(s): State<Shared>) -> Response {
    let Some((device, code)) = s.device.open("", "oauth", s.cfg.device_code_ttl, interval(&s), Instant::now()) else {
        return busy();
    };
    let base = base(&s);
    Json(json!({
        "device_code": device,
        "user_code": code,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={code}"),
        "expires_in": s.cfg.device_code_ttl.as_secs(),
        "interval": interval(&s).as_secs(),
    }))
    .into_response()
}

/// Body of `POST /oauth/token`.
#[derive(Deserialize)]
pub struct TokenReq {
    grant_type: String,
    device_code: String,
}

fn oauth_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": code}))).into_response()
}

/// `POST /oauth/token` (form-encoded, as RFC 8628 says).
pub async fn token(State(s): State<Shared>, Form(req): Form<TokenReq>) -> Response {
    if req.grant_type != GRANT {
        return oauth_error("unsupported_grant_type");
    }
    match s.device.poll(&req.device_code, Instant::now()) {
        Poll::Error { code, .. } => oauth_error(code),
        Poll::Approved { key, .. } => Json(json!({"access_token": key, "token_type": "tskey"})).into_response(),
    }
}

/// Body of `POST /api/fabric/device-auth/start`.
#[derive(Deserialize)]
pub struct FabricStart {
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_version: String,
    #[serde(default)]
    hostname: String,
}

/// `POST /api/fabric/device-auth/start`: AceTeam's start endpoint.
pub async fn fabric_start(State(s): State<Shared>, Json(req): Json<FabricStart>) -> Response {
    let client = format!("{} {}", req.client_id, req.client_version);
    let Some((device, code)) =
        s.device.open(&req.hostname, client.trim(), s.cfg.device_code_ttl, interval(&s), Instant::now())
    else {
        return busy();
    };
    let base = base(&s);
    Json(json!({
        "device_code": device,
        "user_code": code,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?code={code}"),
        "expires_in": s.cfg.device_code_ttl.as_secs(),
        "interval": interval(&s).as_secs(),
    }))
    .into_response()
}

/// Body of `POST /api/fabric/device-auth/token`.
#[derive(Deserialize)]
pub struct FabricToken {
    device_code: String,
    grant_type: String,
}

fn describe(code: &str) -> &'static str {
    match code {
        "authorization_pending" => "waiting for an admin to approve the code",
        "slow_down" => "polling too fast; wait longer between polls",
        "access_denied" => "an admin denied this login",
        "expired_token" => "the code expired; start again",
        _ => "bad request",
    }
}

/// `POST /api/fabric/device-auth/token`: AceTeam's token endpoint.
pub async fn fabric_token(State(s): State<Shared>, Json(req): Json<FabricToken>) -> Response {
    if req.grant_type != GRANT {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type", "error_description": describe("")})),
        )
            .into_response();
    }
    match s.device.poll(&req.device_code, Instant::now()) {
        Poll::Error { code, interval } => {
            let mut body = json!({"error": code, "error_description": describe(code)});
            if code == "slow_down" {
                body["interval"] = json!(interval.as_secs());
            }
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Poll::Approved { key, org_id, org_name } => Json(json!({
            "authkey": key,
            "expires_in": KEY_TTL.as_secs(),
            "nexus_url": base(&s),
            "org_id": org_id.to_string(),
            "org_name": org_name,
        }))
        .into_response(),
    }
}

/// The device endpoints of both dialects and the approval page, with bounded bodies.
pub fn router() -> axum::Router<Shared> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/oauth/device/code", post(start))
        .route("/oauth/token", post(token))
        .route("/api/fabric/device-auth/start", post(fabric_start))
        .route("/api/fabric/device-auth/token", post(fabric_token))
        .route("/device", get(crate::web::show))
        .route("/device/signin", post(crate::web::signin))
        .route("/device/decide", post(crate::web::decide))
        .route("/device/signout", post(crate::web::signout))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

/// Body of the admin API's decisions.
#[derive(Deserialize)]
pub struct Decision {
    code: String,
    #[serde(default)]
    user: String,
}

fn api_error(e: DecideError) -> Response {
    let code = if e.status() == StatusCode::NOT_FOUND { 5 } else { 3 };
    (e.status(), Json(json!({"code": code, "message": e.to_string()}))).into_response()
}

/// `POST /api/v1/device/approve {"code","user"}`: mints a single-use key for `user`.
pub async fn approve(State(s): State<Shared>, Json(d): Json<Decision>) -> Response {
    match approve_code(&s, &d.code, &d.user) {
        Ok(_) => Json(json!({})).into_response(),
        Err(e) => api_error(e),
    }
}

/// `POST /api/v1/device/deny {"code"}`.
pub async fn deny(State(s): State<Shared>, Json(d): Json<Decision>) -> Response {
    match deny_code(&s, &d.code) {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => api_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_pending_slow_down_expiry_and_verdicts() {
        let f = Flows::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let (dev, code) = f.open("host<1>", "c", s(30), s(2), t0).unwrap();
        assert_eq!(f.poll(&dev, t0), Poll::Error { code: "authorization_pending", interval: s(2) });
        // Too soon: the interval grows by 5 s and keeps growing while the client hurries.
        assert_eq!(f.poll(&dev, t0 + s(1)), Poll::Error { code: "slow_down", interval: s(7) });
        assert_eq!(f.poll(&dev, t0 + s(8)), Poll::Error { code: "authorization_pending", interval: s(7) });
        let (d2, flow) = f.pending_by_user_code(&code.to_lowercase().replace('-', ""), t0).unwrap();
        assert_eq!((d2.as_str(), flow.hostname.as_str()), (dev.as_str(), "host<1>"));
        assert!(f.set(&dev, Verdict::Denied, t0 + s(9)));
        assert!(!f.set(&dev, Verdict::Pending, t0 + s(9)), "a decision is final");
        assert!(f.pending_by_user_code(&code, t0).is_none());
        assert_eq!(f.poll(&dev, t0 + s(16)).clone(), Poll::Error { code: "access_denied", interval: s(7) });
        assert_eq!(f.poll(&dev, t0 + s(30)), Poll::Error { code: "expired_token", interval: Duration::ZERO });

        let (dev, _) = f.open("h", "c", s(30), s(2), t0).unwrap();
        assert_eq!(f.poll(&dev, t0 + s(31)), Poll::Error { code: "expired_token", interval: Duration::ZERO });
        assert!(f.is_empty(), "an expired flow is dropped when polled");
    }

    #[test]
    fn labels_are_cut_and_flows_bounded() {
        let f = Flows::default();
        let t0 = Instant::now();
        let long = "x\u{7}".repeat(200);
        let (_, code) = f.open(&long, "c", Duration::from_secs(5), Duration::from_secs(1), t0).unwrap();
        let (_, flow) = f.pending_by_user_code(&code, t0).unwrap();
        assert_eq!(flow.hostname, "x".repeat(MAX_LABEL));
        for _ in 1..MAX_FLOWS {
            assert!(f.open("h", "c", Duration::from_secs(5), Duration::from_secs(1), t0).is_some());
        }
        assert!(f.open("h", "c", Duration::from_secs(5), Duration::from_secs(1), t0).is_none());
        assert!(f
            .open("h", "c", Duration::from_secs(5), Duration::from_secs(1), t0 + Duration::from_secs(6))
            .is_some());
    }
}
