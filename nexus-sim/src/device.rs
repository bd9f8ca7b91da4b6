//! RFC 8628 device authorization: a CLI starts a flow, a human approves the user code, and the
//! CLI's polling yields a pre-auth key (single-use) for the approving admin's chosen org.
//!
//! `POST /oauth/device/code` → device code, user code, verification URL;
//! `POST /oauth/token` (grant `urn:ietf:params:oauth:grant-type:device_code`) → `authorization_pending`,
//! `slow_down`, `expired_token`, `access_denied` or `{"access_token": <auth key>}`;
//! approval through the admin API (`POST /api/v1/device/approve`, `/api/v1/device/deny`) or the
//! `/device` page's instructions.

use crate::Shared;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Grant type of the token request.
pub const GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Pending,
    Approved(String),
    Denied,
}

#[derive(Debug)]
struct Flow {
    user_code: String,
    expires: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    verdict: Verdict,
}

/// Most device flows open at once; the endpoint that starts them is unauthenticated.
pub const MAX_FLOWS: usize = 1024;

/// Open device flows, by device code.
#[derive(Default)]
pub struct Flows {
    flows: Mutex<HashMap<String, Flow>>,
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

impl Flows {
    fn find_by_user_code(&self, code: &str) -> Option<String> {
        let want = normalize(code);
        self.flows.lock().iter().find(|(_, f)| normalize(&f.user_code) == want).map(|(d, _)| d.clone())
    }

    fn set(&self, device: &str, v: Verdict) -> bool {
        match self.flows.lock().get_mut(device) {
            Some(f) if f.verdict == Verdict::Pending && f.expires > Instant::now() => {
                f.verdict = v;
                true
            }
            _ => false,
        }
    }
}

/// `POST /oauth/device/code`.
pub async fn start(State(s): State<Shared>) -> Response {
    let device = crate::store::random_hex(24);
    let code = user_code();
    let ttl = s.cfg.device_code_ttl;
    let interval = Duration::from_secs(s.cfg.device_poll_interval.max(1));
    {
        let now = Instant::now();
        let mut flows = s.device.flows.lock();
        flows.retain(|_, f| f.expires > now);
        if flows.len() >= MAX_FLOWS {
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "too many logins in progress; try later"})))
                .into_response();
        }
        flows.insert(
            device.clone(),
            Flow { user_code: code.clone(), expires: now + ttl, interval, last_poll: None, verdict: Verdict::Pending },
        );
    }
    let base = s.cfg.server_url.trim_end_matches('/').to_string();
    Json(json!({
        "device_code": device,
        "user_code": code,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={code}"),
        "expires_in": ttl.as_secs(),
        "interval": interval.as_secs(),
    }))
    .into_response()
}

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
    let mut flows = s.device.flows.lock();
    let Some(f) = flows.get_mut(&req.device_code) else {
        return oauth_error("expired_token");
    };
    let now = Instant::now();
    if f.expires <= now {
        flows.remove(&req.device_code);
        return oauth_error("expired_token");
    }
    if let Some(last) = f.last_poll {
        if now.duration_since(last) < f.interval {
            // Polling too fast: RFC 8628 §3.5 says back off by 5 s.
            f.interval += Duration::from_secs(5);
            f.last_poll = Some(now);
            return oauth_error("slow_down");
        }
    }
    f.last_poll = Some(now);
    match f.verdict.clone() {
        Verdict::Pending => oauth_error("authorization_pending"),
        Verdict::Denied => {
            flows.remove(&req.device_code);
            oauth_error("access_denied")
        }
        Verdict::Approved(key) => {
            flows.remove(&req.device_code);
            Json(json!({"access_token": key, "token_type": "tskey"})).into_response()
        }
    }
}

/// `GET /device`: tells the human what to do with the code.
pub async fn page(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Html<String> {
    let code = q.get("user_code").cloned().unwrap_or_default();
    let known = !code.is_empty() && s.device.find_by_user_code(&code).is_some();
    Html(format!(
        "<html><body><h1>Device login</h1>{}<p>An admin approves with:</p>\
         <pre>nexus-sim device approve --code {} --user ORG</pre></body></html>",
        if known { format!("<p>Code <b>{}</b> is waiting for approval.</p>", html(&code)) } else { String::new() },
        if code.is_empty() { "XXXX-XXXX".to_string() } else { html(&code) }
    ))
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[derive(Deserialize)]
pub struct Decision {
    code: String,
    #[serde(default)]
    user: String,
}

/// `POST /api/v1/device/approve {"code","user"}`: mints a single-use key for `user`.
pub async fn approve(State(s): State<Shared>, Json(d): Json<Decision>) -> Response {
    let Some(device) = s.device.find_by_user_code(&d.code) else {
        return (StatusCode::NOT_FOUND, Json(json!({"code": 5, "message": "unknown or expired code"}))).into_response();
    };
    let user = d.user.parse::<u64>().ok().and_then(|id| s.store.user(id)).or_else(|| s.store.user_by_name(&d.user));
    let Some(user) = user else {
        return (StatusCode::NOT_FOUND, Json(json!({"code": 5, "message": format!("user {:?} not found", d.user)})))
            .into_response();
    };
    let key = match s.store.create_key(
        user.id,
        false,
        false,
        Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        vec![],
    ) {
        Ok(k) => k.key,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"code": 3, "message": e.to_string()}))).into_response(),
    };
    if !s.device.set(&device, Verdict::Approved(key)) {
        return (StatusCode::CONFLICT, Json(json!({"code": 9, "message": "code already decided or expired"})))
            .into_response();
    }
    Json(json!({})).into_response()
}

/// `POST /api/v1/device/deny {"code"}`.
pub async fn deny(State(s): State<Shared>, Json(d): Json<Decision>) -> Response {
    match s.device.find_by_user_code(&d.code) {
        Some(device) if s.device.set(&device, Verdict::Denied) => Json(json!({})).into_response(),
        _ => (StatusCode::NOT_FOUND, Json(json!({"code": 5, "message": "unknown, decided or expired code"})))
            .into_response(),
    }
}
