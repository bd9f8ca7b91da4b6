//! Interactive login without a key.
//!
//! Three flows: RFC 8628 device authorization on the Nexus (start → verification URL and user
//! code → poll with `authorization_pending` / `slow_down` / `expired_token` / `access_denied` →
//! an auth key); AceTeam's platform flow, the same dance in JSON on the platform's
//! `/api/fabric/device-auth/{start,token}` that ends in an auth key, the Nexus URL and the org
//! ([`fabric_login`]); and Headscale's flow (the register response's AuthURL, which an admin
//! approves), used when the server has no device endpoint. The polling logic is a pure state
//! machine ([`DevicePoll`]) so it is tested without a network or a clock.

use crate::control::{self, ControlError};
use crate::net::Net;
use serde::Deserialize;
use std::time::Duration;

/// What the device-code endpoint answers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DeviceCode {
    /// Code the client polls with.
    pub device_code: String,
    /// Code the user types.
    pub user_code: String,
    /// Where the user goes.
    pub verification_uri: String,
    /// Same, with the code filled in.
    #[serde(default)]
    pub verification_uri_complete: String,
    /// Seconds until the code expires.
    pub expires_in: u64,
    /// Seconds between polls.
    #[serde(default = "default_interval")]
    pub interval: u64,
}

fn default_interval() -> u64 {
    5
}

/// How a device login ended badly.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server has no device-authorization endpoint.
    #[error("Nexus does not offer device authorization")]
    Unsupported,
    /// The admin refused.
    #[error("login was denied")]
    Denied,
    /// The code expired before anyone approved it.
    #[error("login code expired before it was approved")]
    Expired,
    /// Gave up waiting.
    #[error("no approval within {0:?}")]
    TimedOut(Duration),
    /// The server said something outside the protocol.
    #[error("device authorization failed: {0}")]
    Protocol(String),
    /// Network failure.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// One token-endpoint answer, as the poller sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenAnswer<T = String> {
    /// Approved: the auth key (or the platform's whole grant).
    Key(T),
    /// An OAuth error code (`authorization_pending`, `slow_down`, …).
    Error(String),
}

/// The polling state machine: feed it answers and elapsed time, it says what to do next.
#[derive(Debug, Clone)]
pub struct DevicePoll {
    interval: Duration,
    deadline: Duration,
    elapsed: Duration,
    /// The deadline is the code's expiry (not the caller's limit).
    code_expires_first: bool,
}

/// What to do after an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Next<T = String> {
    /// Wait this long, then poll again.
    Wait(Duration),
    /// Done: log in with this key.
    Done(T),
}

impl DevicePoll {
    /// Starts polling at the server's interval, giving up at the earlier of the code's expiry
    /// and `limit`.
    pub fn new(code: &DeviceCode, limit: Duration) -> Self {
        let expiry = Duration::from_secs(code.expires_in);
        Self {
            interval: Duration::from_secs(code.interval.max(1)),
            deadline: expiry.min(limit),
            elapsed: Duration::ZERO,
            code_expires_first: expiry <= limit,
        }
    }

    /// Handles one answer received `elapsed` after the start.
    pub fn on_answer<T>(&mut self, answer: TokenAnswer<T>, elapsed: Duration) -> Result<Next<T>, LoginError> {
        self.elapsed = elapsed;
        match answer {
            TokenAnswer::Key(k) => Ok(Next::Done(k)),
            TokenAnswer::Error(e) => {
                match e.as_str() {
                    "authorization_pending" => {}
                    // RFC 8628 §3.5: increase the interval by 5 seconds for this and later polls.
                    "slow_down" => self.interval += Duration::from_secs(5),
                    "access_denied" => return Err(LoginError::Denied),
                    "expired_token" => return Err(LoginError::Expired),
                    other => return Err(LoginError::Protocol(format!("token endpoint said {other:?}"))),
                }
                if self.elapsed + self.interval > self.deadline {
                    if self.code_expires_first {
                        return Err(LoginError::Expired);
                    }
                    return Err(LoginError::TimedOut(self.deadline));
                }
                Ok(Next::Wait(self.interval))
            }
        }
    }
}

/// Starts a device flow; `Err(Unsupported)` when the server has no endpoint (real Headscale).
pub async fn start_device(net: &dyn Net, url: &str, timeout: Duration) -> Result<DeviceCode, LoginError> {
    let (status, body) = control::http1_request(
        net,
        url,
        http::Method::POST,
        "/oauth/device/code",
        Some("client_id=citadel".into()),
        timeout,
    )
    .await?;
    if status == http::StatusCode::NOT_FOUND || status == http::StatusCode::METHOD_NOT_ALLOWED {
        return Err(LoginError::Unsupported);
    }
    if !status.is_success() {
        return Err(LoginError::Protocol(format!("device code request answered {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| LoginError::Protocol(format!("bad device code answer: {e}")))
}

/// Asks the token endpoint once.
pub async fn poll_token(
    net: &dyn Net,
    url: &str,
    code: &DeviceCode,
    timeout: Duration,
) -> Result<TokenAnswer, LoginError> {
    let form = format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code={}&client_id=citadel",
        code.device_code
    );
    let (status, body) =
        control::http1_request(net, url, http::Method::POST, "/oauth/token", Some(form), timeout).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| LoginError::Protocol(format!("bad token answer ({status}): {e}")))?;
    if status.is_success() {
        let key = v["access_token"].as_str().unwrap_or_default();
        if key.is_empty() {
            return Err(LoginError::Protocol("token answer has no access_token".into()));
        }
        return Ok(TokenAnswer::Key(key.to_string()));
    }
    Ok(TokenAnswer::Error(v["error"].as_str().unwrap_or("invalid_response").to_string()))
}

/// Runs the device flow to the end: `on_code` is called once with the code to show.
pub async fn device_login(
    net: &dyn Net,
    url: &str,
    limit: Duration,
    timeout: Duration,
    on_code: impl FnOnce(&DeviceCode),
) -> Result<String, LoginError> {
    let code = start_device(net, url, timeout).await?;
    on_code(&code);
    poll_until_done(&code, limit, || poll_token(net, url, &code, timeout)).await
}

/// Polls with `ask` at the pace [`DevicePoll`] sets until the flow ends.
async fn poll_until_done<T, F, Fut>(code: &DeviceCode, limit: Duration, mut ask: F) -> Result<T, LoginError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<TokenAnswer<T>, LoginError>>,
{
    let mut poll = DevicePoll::new(code, limit);
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_secs(code.interval.max(1));
    loop {
        tokio::time::sleep(wait).await;
        let answer = ask().await?;
        match poll.on_answer(answer, start.elapsed())? {
            Next::Done(k) => return Ok(k),
            Next::Wait(d) => wait = d,
        }
    }
}

/// AceTeam's device-login start endpoint, on the platform (auth service) URL.
pub const FABRIC_START: &str = "/api/fabric/device-auth/start";
/// AceTeam's device-login token endpoint.
pub const FABRIC_TOKEN: &str = "/api/fabric/device-auth/token";
/// Client id the platform knows the CLI by.
pub const FABRIC_CLIENT_ID: &str = "citadel-cli";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What the platform hands over when a device login is approved.
#[derive(Clone, Deserialize, PartialEq)]
pub struct FabricGrant {
    /// Pre-auth key for the Nexus.
    pub authkey: String,
    /// Seconds the key stays valid.
    #[serde(default)]
    pub expires_in: u64,
    /// The Nexus to join (may be empty: then the caller's default).
    #[serde(default)]
    pub nexus_url: String,
    /// The org the admin approved the device into.
    #[serde(default)]
    pub org_id: String,
    /// The org's name.
    #[serde(default)]
    pub org_name: String,
}

impl std::fmt::Debug for FabricGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricGrant")
            .field("authkey", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field("nexus_url", &self.nexus_url)
            .field("org_id", &self.org_id)
            .field("org_name", &self.org_name)
            .finish()
    }
}

/// Starts AceTeam's device flow on the platform at `auth_url`, reporting `hostname`.
pub async fn start_fabric(
    net: &dyn Net,
    auth_url: &str,
    hostname: &str,
    timeout: Duration,
) -> Result<DeviceCode, LoginError> {
    let body = serde_json::json!({
        "client_id": FABRIC_CLIENT_ID,
        "client_version": env!("CARGO_PKG_VERSION"),
        "hostname": hostname,
    });
    let (status, body) = control::http1_json(net, auth_url, FABRIC_START, body.to_string(), timeout).await?;
    match status {
        s if s.is_success() => {}
        http::StatusCode::NOT_FOUND | http::StatusCode::METHOD_NOT_ALLOWED => return Err(LoginError::Unsupported),
        http::StatusCode::TOO_MANY_REQUESTS => {
            return Err(LoginError::Protocol("the platform is rate limiting logins; try again in a few minutes".into()))
        }
        s => return Err(LoginError::Protocol(format!("the platform's login start answered {s}"))),
    }
    let mut code: DeviceCode = serde_json::from_slice(&body)
        .map_err(|e| LoginError::Protocol(format!("bad device code answer from the platform: {e}")))?;
    let base = auth_url.trim_end_matches('/');
    if code.verification_uri.is_empty() {
        code.verification_uri = format!("{base}/device");
    }
    if code.verification_uri_complete.is_empty() {
        code.verification_uri_complete = format!("{}?code={}", code.verification_uri, code.user_code);
    }
    Ok(code)
}

/// Asks the platform's token endpoint once.
pub async fn poll_fabric(
    net: &dyn Net,
    auth_url: &str,
    code: &DeviceCode,
    timeout: Duration,
) -> Result<TokenAnswer<FabricGrant>, LoginError> {
    let req = serde_json::json!({"device_code": code.device_code, "grant_type": GRANT_TYPE});
    let (status, body) = control::http1_json(net, auth_url, FABRIC_TOKEN, req.to_string(), timeout).await?;
    if status.is_success() {
        let g: FabricGrant = serde_json::from_slice(&body)
            .map_err(|e| LoginError::Protocol(format!("bad token answer from the platform: {e}")))?;
        if g.authkey.is_empty() {
            return Err(LoginError::Protocol("the platform's token answer has no authkey".into()));
        }
        let usable = g.nexus_url.starts_with("https://") || g.nexus_url.starts_with("http://");
        if !g.nexus_url.is_empty() && !usable {
            return Err(LoginError::Protocol(format!("the platform named an unusable Nexus URL {:?}", g.nexus_url)));
        }
        return Ok(TokenAnswer::Key(g));
    }
    if status == http::StatusCode::BAD_REQUEST {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| LoginError::Protocol(format!("bad token error from the platform: {e}")))?;
        return Ok(TokenAnswer::Error(v["error"].as_str().unwrap_or("invalid_response").to_string()));
    }
    Err(LoginError::Protocol(format!("the platform's token endpoint answered {status}")))
}

/// Runs AceTeam's device flow to the end: `on_code` is called once with the code to show.
pub async fn fabric_login(
    net: &dyn Net,
    auth_url: &str,
    hostname: &str,
    limit: Duration,
    timeout: Duration,
    on_code: impl FnOnce(&DeviceCode),
) -> Result<FabricGrant, LoginError> {
    let code = start_fabric(net, auth_url, hostname, timeout).await?;
    on_code(&code);
    wait_fabric(net, auth_url, &code, limit, timeout).await
}

/// Polls the platform for a started flow until it is approved, denied or expired.
pub async fn wait_fabric(
    net: &dyn Net,
    auth_url: &str,
    code: &DeviceCode,
    limit: Duration,
    timeout: Duration,
) -> Result<FabricGrant, LoginError> {
    poll_until_done(code, limit, || poll_fabric(net, auth_url, code, timeout)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(interval: u64, expires: u64) -> DeviceCode {
        DeviceCode {
            device_code: "d".into(),
            user_code: "ABCD-EFGH".into(),
            verification_uri: "http://x/device".into(),
            verification_uri_complete: String::new(),
            expires_in: expires,
            interval,
        }
    }

    type A = TokenAnswer<String>;

    #[test]
    fn pending_slow_down_and_success() {
        let mut p = DevicePoll::new(&code(5, 600), Duration::from_secs(600));
        let s = Duration::from_secs;
        assert_eq!(p.on_answer(A::Error("authorization_pending".into()), s(5)).unwrap(), Next::Wait(s(5)));
        assert_eq!(p.on_answer(A::Error("slow_down".into()), s(10)).unwrap(), Next::Wait(s(10)));
        assert_eq!(p.on_answer(A::Error("authorization_pending".into()), s(20)).unwrap(), Next::Wait(s(10)));
        assert_eq!(p.on_answer(A::Key("k".into()), s(30)).unwrap(), Next::Done("k".into()));
    }

    #[test]
    fn denial_expiry_timeout_and_garbage_end_the_flow() {
        let s = Duration::from_secs;
        let mut p = DevicePoll::new(&code(5, 600), s(600));
        assert!(matches!(p.on_answer(A::Error("access_denied".into()), s(5)), Err(LoginError::Denied)));
        assert!(matches!(p.on_answer(A::Error("expired_token".into()), s(5)), Err(LoginError::Expired)));
        assert!(matches!(p.on_answer(A::Error("what".into()), s(5)), Err(LoginError::Protocol(_))));
        let mut p = DevicePoll::new(&code(5, 12), s(600));
        assert!(p.on_answer(A::Error("authorization_pending".into()), s(5)).is_ok());
        assert!(matches!(p.on_answer(A::Error("authorization_pending".into()), s(10)), Err(LoginError::Expired)));
        let mut p = DevicePoll::new(&code(5, 600), s(12));
        assert!(p.on_answer(A::Error("authorization_pending".into()), s(5)).is_ok());
        assert!(matches!(p.on_answer(A::Error("authorization_pending".into()), s(10)), Err(LoginError::TimedOut(_))));
    }
}
