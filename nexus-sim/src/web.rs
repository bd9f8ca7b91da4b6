//! The device-login approval page a user opens from `citadel login`: an admin signs in with an
//! admin credential (an API key), sees the device's user code and host name, picks the org and
//! approves or denies.
//!
//! Plain HTML forms, no JavaScript. Every state change is a POST carrying a CSRF token that is
//! tied to a cookie (`SameSite=Strict`, `HttpOnly`): before sign-in a double-submit token in a
//! short-lived cookie, after sign-in the session's own token, compared in constant time. All
//! text a device reported is HTML-escaped; bodies are bounded by the router's limit.

use crate::device::{self, DecideError};
use crate::Shared;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// How long a signed-in session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);

/// Most signed-in sessions kept; the oldest is dropped to make room.
pub const MAX_SESSIONS: usize = 256;

/// Cookie of a signed-in session.
pub const SESSION_COOKIE: &str = "nexus_session";

/// Cookie carrying the sign-in form's double-submit token.
pub const SIGNIN_COOKIE: &str = "nexus_signin";

struct Session {
    csrf: String,
    expires: Instant,
}

/// Signed-in admin sessions, by session id.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session; returns `(session id, csrf token)`.
    fn create(&self, now: Instant) -> (String, String) {
        let mut m = self.map.lock();
        m.retain(|_, s| s.expires > now);
        while m.len() >= MAX_SESSIONS {
            let Some(oldest) = m.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| k.clone()) else { break };
            m.remove(&oldest);
        }
        let id = crate::store::random_hex(32);
        let csrf = crate::store::random_hex(32);
        m.insert(id.clone(), Session { csrf: csrf.clone(), expires: now + SESSION_TTL });
        (id, csrf)
    }

    /// The csrf token of a live session.
    fn csrf(&self, id: &str, now: Instant) -> Option<String> {
        self.map.lock().get(id).filter(|s| s.expires > now).map(|s| s.csrf.clone())
    }

    fn remove(&self, id: &str) {
        self.map.lock().remove(id);
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// True when nobody is signed in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A user code as typed, reduced to the characters a code has (so it is safe in URLs).
fn clean_code(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(16).collect()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn set_cookie(s: &Shared, name: &str, value: &str, max_age: u64) -> HeaderValue {
    let secure = if s.cfg.server_url.starts_with("https://") { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/device; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .expect("cookie values are hex")
}

fn page(status: StatusCode, title: &str, body: &str, cookies: Vec<HeaderValue>) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{t} · Nexus</title><style>\
         body{{font-family:sans-serif;max-width:34em;margin:3em auto;padding:0 1em;color:#222}}\
         h1{{font-size:1.4em}} .code{{font-family:monospace;font-size:1.6em;letter-spacing:.1em}}\
         dl{{display:grid;grid-template-columns:8em 1fr;gap:.4em}} dt{{color:#666}} dd{{margin:0;word-break:break-all}}\
         button,input,select{{font-size:1em;padding:.4em .8em;margin:.3em 0}}\
         .deny{{background:#fee}} .approve{{background:#efe}} .msg{{padding:.6em;background:#f4f4f4}}\
         </style></head><body><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
    r
}

fn signin_page(s: &Shared, status: StatusCode, code: &str, note: &str) -> Response {
    let token = crate::store::random_hex(32);
    let body = format!(
        "{note}<p>Sign in with an admin API key to approve a device.</p>\
         <form method=\"post\" action=\"/device/signin\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{token}\">\
         <input type=\"hidden\" name=\"code\" value=\"{code}\">\
         <label>Admin API key<br><input type=\"password\" name=\"credential\" id=\"credential\" \
         autocomplete=\"current-password\" required></label><br>\
         <button type=\"submit\" id=\"signin\">Sign in</button></form>",
        code = escape(code),
    );
    page(status, "Device login", &body, vec![set_cookie(s, SIGNIN_COOKIE, &token, 600)])
}

fn code_form(note: &str) -> String {
    format!(
        "{note}<form method=\"get\" action=\"/device\"><label>Code shown by the device<br>\
         <input name=\"code\" id=\"code\" placeholder=\"XXXX-XXXX\" required></label><br>\
         <button type=\"submit\">Continue</button></form>"
    )
}

fn signed_in(s: &Shared, headers: &HeaderMap) -> Option<(String, String)> {
    let id = cookie(headers, SESSION_COOKIE)?;
    let csrf = s.device.sessions.csrf(id, Instant::now())?;
    Some((id.to_string(), csrf))
}

/// Query of `GET /device`: `code` (AceTeam's links) or `user_code` (RFC 8628 links).
#[derive(Deserialize)]
pub struct PageQuery {
    #[serde(default)]
    code: String,
    #[serde(default)]
    user_code: String,
}

/// `GET /device`: sign-in, code entry, or the approval form for one device.
pub async fn show(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<PageQuery>) -> Response {
    let code = clean_code(if q.code.is_empty() { &q.user_code } else { &q.code });
    let Some((_, csrf)) = signed_in(&s, &headers) else {
        return signin_page(&s, StatusCode::OK, &code, "");
    };
    if code.is_empty() {
        return page(StatusCode::OK, "Device login", &code_form(""), vec![]);
    }
    let now = Instant::now();
    let Some((_, flow)) = s.device.pending_by_user_code(&code, now) else {
        let note = format!("<p class=\"msg\" id=\"msg\">No device is waiting with code {}.</p>", escape(&code));
        return page(StatusCode::NOT_FOUND, "Device login", &code_form(&note), vec![]);
    };
    let mut orgs = s.store.users();
    orgs.sort_by(|a, b| a.name.cmp(&b.name));
    let options: String =
        orgs.iter().map(|u| format!("<option value=\"{}\">{}</option>", u.id, escape(&u.name))).collect();
    let host = if flow.hostname.is_empty() { "(not given)" } else { &flow.hostname };
    let body = format!(
        "<p>A device asks to join the mesh. Approve it only if you started this login.</p>\
         <dl><dt>Code</dt><dd class=\"code\" id=\"user-code\">{ucode}</dd>\
         <dt>Host name</dt><dd id=\"hostname\">{host}</dd>\
         <dt>Client</dt><dd>{client}</dd><dt>Expires in</dt><dd>{left} s</dd></dl>\
         <form method=\"post\" action=\"/device/decide\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"code\" value=\"{ucode}\">\
         <label>Org<br><select name=\"org\" id=\"org\">{options}</select></label><br>\
         <button type=\"submit\" name=\"action\" value=\"approve\" class=\"approve\" id=\"approve\">Approve</button> \
         <button type=\"submit\" name=\"action\" value=\"deny\" class=\"deny\" id=\"deny\">Deny</button></form>\
         <form method=\"post\" action=\"/device/signout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">Sign out</button></form>",
        ucode = escape(&flow.user_code),
        host = escape(host),
        client = escape(&flow.client),
        left = flow.remaining(now).as_secs(),
    );
    page(StatusCode::OK, "Approve device", &body, vec![])
}

/// Form of `POST /device/signin`.
#[derive(Deserialize)]
pub struct SignIn {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    credential: String,
}

fn refused() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "Request refused",
        "<p class=\"msg\" id=\"msg\">The form's security token is missing or wrong. Open the page again and retry.</p>",
        vec![],
    )
}

/// `POST /device/signin`: checks the admin credential and opens a session.
pub async fn signin(State(s): State<Shared>, headers: HeaderMap, Form(f): Form<SignIn>) -> Response {
    let code = clean_code(&f.code);
    if !cookie(&headers, SIGNIN_COOKIE).is_some_and(|c| same(c, &f.csrf)) {
        return refused();
    }
    if f.credential.is_empty() || !s.store.check_api_key(f.credential.trim()) {
        tracing::warn!("device page: sign-in with a wrong credential");
        return signin_page(
            &s,
            StatusCode::UNAUTHORIZED,
            &code,
            "<p class=\"msg\" id=\"msg\">That credential is not an admin API key of this server.</p>",
        );
    }
    let (id, _) = s.device.sessions.create(Instant::now());
    let mut r = (StatusCode::SEE_OTHER, "").into_response();
    let location = if code.is_empty() { "/device".to_string() } else { format!("/device?code={code}") };
    let h = r.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_str(&location).expect("code is alphanumeric"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.append(header::SET_COOKIE, set_cookie(&s, SESSION_COOKIE, &id, SESSION_TTL.as_secs()));
    h.append(header::SET_COOKIE, set_cookie(&s, SIGNIN_COOKIE, "", 0));
    r
}

/// Form of `POST /device/decide`.
#[derive(Deserialize)]
pub struct Decide {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    org: String,
    #[serde(default)]
    action: String,
}

/// `POST /device/decide`: approves or denies, for a signed-in admin with the session's token.
pub async fn decide(State(s): State<Shared>, headers: HeaderMap, Form(f): Form<Decide>) -> Response {
    let Some((_, csrf)) = signed_in(&s, &headers) else {
        return signin_page(&s, StatusCode::UNAUTHORIZED, &clean_code(&f.code), "<p class=\"msg\">Sign in first.</p>");
    };
    if !same(&f.csrf, &csrf) {
        tracing::warn!("device page: decision without the session's csrf token refused");
        return refused();
    }
    let host = s.device.pending_by_user_code(&f.code, Instant::now()).map(|(_, fl)| fl.hostname).unwrap_or_default();
    let result = match f.action.as_str() {
        "approve" => device::approve_code(&s, &f.code, &f.org).map(|org| {
            format!(
                "<p class=\"msg\" id=\"msg\">Approved: <b>{}</b> joins org <b>{}</b>. \
                 The device finishes logging in by itself; you can close this page.</p>",
                escape(&host),
                escape(&org)
            )
        }),
        "deny" => device::deny_code(&s, &f.code)
            .map(|()| format!("<p class=\"msg\" id=\"msg\">Denied: <b>{}</b> will not join.</p>", escape(&host))),
        _ => return page(StatusCode::BAD_REQUEST, "Bad request", "<p>Unknown action.</p>", vec![]),
    };
    match result {
        Ok(msg) => page(StatusCode::OK, "Device login", &msg, vec![]),
        Err(e) => {
            let status = match e {
                DecideError::Key(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::NOT_FOUND,
            };
            let msg = format!("<p class=\"msg\" id=\"msg\">Not done: {}.</p>", escape(&e.to_string()));
            page(status, "Device login", &code_form(&msg), vec![])
        }
    }
}

/// Form of `POST /device/signout`.
#[derive(Deserialize)]
pub struct SignOut {
    #[serde(default)]
    csrf: String,
}

/// `POST /device/signout`.
pub async fn signout(State(s): State<Shared>, headers: HeaderMap, Form(f): Form<SignOut>) -> Response {
    let Some((id, csrf)) = signed_in(&s, &headers) else {
        return signin_page(&s, StatusCode::OK, "", "");
    };
    if !same(&f.csrf, &csrf) {
        return refused();
    }
    s.device.sessions.remove(&id);
    page(StatusCode::OK, "Signed out", "<p>Signed out.</p>", vec![set_cookie(&s, SESSION_COOKIE, "", 0)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_codes() {
        assert_eq!(
            escape("<img src=x onerror='a(\"b\")'>&"),
            "&lt;img src=x onerror=&#39;a(&quot;b&quot;)&#39;&gt;&amp;"
        );
        assert_eq!(clean_code("ab cd-EF\"<>/?&x=1"), "abcd-EFx1");
        assert!(!same("", ""));
        assert!(!same("ab", "abc"));
        assert!(same("abc", "abc"));
    }

    #[test]
    fn sessions_are_bounded_and_expire() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let (first, csrf) = s.create(t0);
        assert_eq!(s.csrf(&first, t0), Some(csrf));
        for i in 1..=MAX_SESSIONS {
            s.create(t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(s.csrf(&first, t0), None, "the oldest session made room");
        let (id, _) = s.create(t0);
        assert_eq!(s.csrf(&id, t0 + SESSION_TTL), None, "expired");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; nexus_session=abc"));
        h.append(header::COOKIE, HeaderValue::from_static("nexus_signin=def"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, SIGNIN_COOKIE), Some("def"));
        assert_eq!(cookie(&h, "nexus"), None);
    }
}
