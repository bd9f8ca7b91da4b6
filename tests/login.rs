//! `citadel login` without a key, end to end with the binaries: AceTeam's platform device flow
//! (approve, deny, expire, slow_down), the Nexus's device code (approve, deny), Headscale's
//! approval-URL flow, and the approval page's HTTP contract (sign-in, CSRF, escaping).

use citadel_e2e::{bin, free_port, run_with_deadline, Proc};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Env {
    url: String,
    _nexus: Proc,
    dir: tempfile::TempDir,
}

fn start() -> Env {
    start_with(&[])
}

fn start_with(extra: &[&str]) -> Env {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let nexus = Proc(
        Command::new(bin("nexus-sim"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", "k", "--device-poll-interval", "1"])
            .args(extra)
            .env("NEXUS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let env = Env { url, _nexus: nexus, dir: tempfile::tempdir().unwrap() };
    env.admin(&["users", "create", "acme"]);
    env
}

impl Env {
    fn admin(&self, args: &[&str]) -> std::process::Output {
        run_with_deadline(
            Command::new(bin("nexus-sim")).args(args).env("NEXUS_URL", &self.url).env("NEXUS_API_KEY", "k"),
            Duration::from_secs(20),
        )
    }

    fn login(&self, node: &str, extra: &[&str]) -> Child {
        Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(self.dir.path().join(node))
            .args(["login", "--nexus", &self.url, "--hostname", node, "--login-timeout", "20"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Reads the child's stderr until a line satisfies `f`; returns that line.
fn read_until(child: &mut Child, f: impl Fn(&str) -> bool) -> String {
    Stderr::of(child).until(f)
}

/// The child's stderr, line by line, read on a thread of its own.
struct Stderr(std::sync::mpsc::Receiver<String>);

impl Stderr {
    fn of(child: &mut Child) -> Stderr {
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining after a match: a closed pipe would make the child's next write fail.
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Stderr(rx)
    }

    /// The next line satisfying `f` (within 20 s).
    fn until(&self, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line =
                self.0.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("expected output");
            if f(&line) {
                return line;
            }
        }
    }
}

/// The user code from the "enter the code" line.
fn code_of(line: &str) -> String {
    let code = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(code.len(), 9, "{line}");
    code
}

fn finish(mut child: Child) -> (Option<i32>, String) {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            use std::io::Read;
            child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
            return (st.code(), out.trim().to_string());
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("login did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn device_code_login_approved_and_denied() {
    let env = start();
    let mut child = env.login("dev1", &["--flow", "device"]);
    let line = read_until(&mut child, |l| l.contains("enter the code"));
    let code = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(code.len(), 9, "{line}");
    let o = env.admin(&["device", "approve", "--code", &code, "--user", "acme"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (rc, out) = finish(child);
    assert_eq!(rc, Some(0));
    assert!(out.starts_with("100."), "prints the mesh IP: {out}");

    let mut child = env.login("dev2", &["--flow", "device"]);
    let line = read_until(&mut child, |l| l.contains("enter the code"));
    let code = line.rsplit(' ').next().unwrap().to_string();
    assert!(env.admin(&["device", "deny", "--code", &code]).status.success());
    let (rc, _) = finish(child);
    assert_eq!(rc, Some(3), "a denied login exits 3");
    // An unknown code cannot be approved.
    assert!(!env.admin(&["device", "approve", "--code", "ZZZZ-ZZZZ", "--user", "acme"]).status.success());
}

#[test]
fn headscale_approval_url_login_and_rejection() {
    let env = start();
    let mut child = env.login("web1", &["--flow", "web"]);
    let line = read_until(&mut child, |l| l.contains("/register/"));
    let id = line.trim().rsplit('/').next().unwrap().to_string();
    let o = env.admin(&["nodes", "register", "--user", "acme", "--key", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (rc, out) = finish(child);
    assert_eq!(rc, Some(0));
    assert!(out.starts_with("100."), "{out}");

    let mut child = env.login("web2", &["--flow", "web"]);
    let line = read_until(&mut child, |l| l.contains("/register/"));
    let id = line.trim().rsplit('/').next().unwrap().to_string();
    assert!(env.admin(&["nodes", "reject", "--key", &id]).status.success());
    let (rc, _) = finish(child);
    assert_eq!(rc, Some(3), "a rejected registration exits 3");
}

/// Starts `citadel login` against the platform flow (the Nexus URL comes from the platform).
fn fabric_login(env: &Env, node: &str) -> Child {
    Command::new(bin("citadel"))
        .arg("--state-dir")
        .arg(env.dir.path().join(node))
        .args(["login", "--auth-service", &env.url, "--hostname", node, "--login-timeout", "20", "--no-qr"])
        .env_remove("CITADEL_NEXUS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn aceteam_device_flow_approved_joins_the_named_nexus_and_org() {
    let env = start();
    env.admin(&["users", "create", "other"]);
    let mut child = fabric_login(&env, "fab1");
    let err = Stderr::of(&mut child);
    let url = err.until(|l| l.contains("/device?code="));
    let code = code_of(&err.until(|l| l.contains("enter the code")));
    assert!(url.trim().ends_with(&format!("/device?code={code}")), "{url}");
    let o = env.admin(&["device", "approve", "--code", &code, "--user", "acme"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let approved = err.until(|l| l.contains("approved into org"));
    assert!(approved.contains("org acme") && approved.contains(&env.url), "{approved}");
    let (rc, out) = finish(child);
    assert_eq!(rc, Some(0));
    assert!(out.starts_with("100."), "prints the mesh IP: {out}");
    let nodes = env.admin(&["nodes", "list", "--user", "acme", "-o", "json"]);
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    assert!(nodes.contains("fab1"), "the node joined org acme: {nodes}");
    let other = env.admin(&["nodes", "list", "--user", "other", "-o", "json"]);
    assert!(!String::from_utf8_lossy(&other.stdout).contains("fab1"), "and no other org");
}

#[test]
fn aceteam_device_flow_denied_and_expired_exit_3() {
    let env = start_with(&["--device-code-ttl", "3"]);
    let mut child = fabric_login(&env, "fab2");
    let err = Stderr::of(&mut child);
    let code = code_of(&err.until(|l| l.contains("enter the code")));
    assert!(env.admin(&["device", "deny", "--code", &code]).status.success());
    let why = err.until(|l| l.contains("error") || l.contains("denied"));
    assert!(why.contains("denied"), "{why}");
    let (rc, _) = finish(child);
    assert_eq!(rc, Some(3), "a denied login exits 3");

    let t = Instant::now();
    let mut child = fabric_login(&env, "fab3");
    let err = Stderr::of(&mut child);
    let code = code_of(&err.until(|l| l.contains("enter the code")));
    let why = err.until(|l| l.contains("expired") || l.contains("error"));
    assert!(why.contains("expired"), "{why}");
    let (rc, _) = finish(child);
    assert_eq!(rc, Some(3), "an expired login exits 3");
    assert!(t.elapsed() < Duration::from_secs(15), "gave up at the code's expiry, not the login timeout");
    // Once past its lifetime, the code can no longer be approved.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(t.elapsed()));
    assert!(!env.admin(&["device", "approve", "--code", &code, "--user", "acme"]).status.success());
}

#[tokio::test]
async fn aceteam_token_endpoint_slows_down_a_hasty_client() {
    let s = nexus_sim::start(nexus_sim::Config { device_poll_interval: 2, ..Default::default() }).await.unwrap();
    s.shared.store.create_user("acme", "acme").unwrap();
    let net = citadel::net::TokioNet;
    let t = Duration::from_secs(5);
    let code = citadel::login::start_fabric(&net, &s.url, "h", t).await.unwrap();
    assert_eq!(code.interval, 2);
    assert!(code.verification_uri_complete.ends_with(&format!("/device?code={}", code.user_code)));
    use citadel::login::TokenAnswer;
    let first = citadel::login::poll_fabric(&net, &s.url, &code, t).await.unwrap();
    assert_eq!(first, TokenAnswer::Error("authorization_pending".into()));
    let second = citadel::login::poll_fabric(&net, &s.url, &code, t).await.unwrap();
    assert_eq!(second, TokenAnswer::Error("slow_down".into()), "polled again at once");
    // The raw answer names the new interval (2 + 5 s), as the upstream CLI expects.
    let (status, body) = citadel::control::http1_json(
        &net,
        &s.url,
        citadel::login::FABRIC_TOKEN,
        serde_json::json!({"device_code": code.device_code, "grant_type": "urn:ietf:params:oauth:grant-type:device_code"})
            .to_string(),
        t,
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status.as_u16(), v["error"].as_str(), v["interval"].as_u64()), (400, Some("slow_down"), Some(12)));
    // The library's poller, starting from scratch, honours the interval and gets the grant.
    let code = citadel::login::start_fabric(&net, &s.url, "h2", t).await.unwrap();
    nexus_sim::device::approve_code(&s.shared, &code.user_code, "acme").unwrap();
    let grant = citadel::login::wait_fabric(&net, &s.url, &code, Duration::from_secs(20), t).await.unwrap();
    assert_eq!((grant.org_name.as_str(), grant.nexus_url.as_str()), ("acme", s.url.as_str()));
    assert!(!grant.authkey.is_empty() && !format!("{grant:?}").contains(&grant.authkey), "Debug hides the key");
}

/// The `name=value` of the `name` cookie a response sets, with its attributes.
fn set_cookie(r: &reqwest::Response, name: &str) -> Option<(String, String)> {
    r.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
        pair.strip_prefix(&format!("{name}=")).map(|val| (format!("{name}={val}"), attrs.to_string()))
    })
}

/// The value of the first hidden `csrf` field of a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn approval_page_signs_in_refuses_forged_posts_and_escapes_host_names() {
    let s =
        nexus_sim::start(nexus_sim::Config { api_keys: vec!["admin-key".into()], ..Default::default() }).await.unwrap();
    s.shared.store.create_user("acme", "acme").unwrap();
    s.shared.store.create_user("other", "other").unwrap();
    let net = citadel::net::TokioNet;
    let t = Duration::from_secs(5);
    let hostile = "<script>alert(1)</script>\"'&";
    let code = citadel::login::start_fabric(&net, &s.url, hostile, t).await.unwrap();
    // reqwest is built with rustls and no default crypto provider; plain http still needs one.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page_url = format!("{}/device?code={}", s.url, code.user_code);

    // Signed out: a sign-in form with a double-submit token, and nothing about the device.
    let r = http.get(&page_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (pre, attrs) = set_cookie(&r, "nexus_signin").expect("sign-in cookie");
    assert!(attrs.contains("SameSite=Strict") && attrs.contains("HttpOnly"), "{attrs}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let body = r.text().await.unwrap();
    assert!(!body.contains("alert"), "the host name is shown only to a signed-in admin");
    let token = csrf_of(&body);
    let signin = format!("{}/device/signin", s.url);
    let form = |csrf: &str, key: &str| {
        vec![("csrf", csrf.to_string()), ("code", code.user_code.clone()), ("credential", key.to_string())]
    };

    // Forged sign-ins: no cookie, or a token that is not the cookie's.
    let r = http.post(&signin).form(&form(&token, "admin-key")).send().await.unwrap();
    assert_eq!(r.status(), 403, "no cookie");
    let r = http.post(&signin).header("cookie", &pre).form(&form("00", "admin-key")).send().await.unwrap();
    assert_eq!(r.status(), 403, "wrong token");
    // A wrong credential is refused.
    let r = http.post(&signin).header("cookie", &pre).form(&form(&token, "guess")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(set_cookie(&r, "nexus_session").is_none());
    // The right one opens a session and goes back to the device.
    let r = http.post(&signin).header("cookie", &pre).form(&form(&token, "admin-key")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/device?code={}", code.user_code).as_str());
    let (session, attrs) = set_cookie(&r, "nexus_session").expect("session cookie");
    assert!(attrs.contains("SameSite=Strict") && attrs.contains("HttpOnly"), "{attrs}");

    // Signed in: the device's code and its host name, escaped; the orgs to pick from.
    let r = http.get(&page_url).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"), "{body}");
    assert!(!body.contains("<script>"), "no markup from the device reaches the page");
    assert!(body.contains(&code.user_code) && body.contains(">acme</option>") && body.contains(">other</option>"));
    let csrf = csrf_of(&body);
    let acme = s.shared.store.user_by_name("acme").unwrap().id.to_string();
    let decide = format!("{}/device/decide", s.url);
    let choice = |csrf: &str| {
        vec![
            ("csrf", csrf.to_string()),
            ("code", code.user_code.clone()),
            ("org", acme.clone()),
            ("action", "approve".to_string()),
        ]
    };

    // Forged decisions: no token, another session's token, no session, GET, an oversized body.
    let r = http.post(&decide).header("cookie", &session).form(&choice("")).send().await.unwrap();
    assert_eq!(r.status(), 403, "no token");
    let r = http.post(&signin).header("cookie", &pre).form(&form(&token, "admin-key")).send().await.unwrap();
    let (session2, _) = set_cookie(&r, "nexus_session").unwrap();
    let body2 = http.get(&page_url).header("cookie", &session2).send().await.unwrap().text().await.unwrap();
    let csrf2 = csrf_of(&body2);
    assert_ne!(csrf, csrf2);
    let r = http.post(&decide).header("cookie", &session).form(&choice(&csrf2)).send().await.unwrap();
    assert_eq!(r.status(), 403, "another session's token");
    let r = http.post(&decide).form(&choice(&csrf)).send().await.unwrap();
    assert_eq!(r.status(), 401, "no session");
    let r = http
        .get(format!("{decide}?csrf={csrf}&code={}&org={acme}&action=approve", code.user_code))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "decisions are POST only");
    let mut big = choice(&csrf);
    big.push(("pad", "x".repeat(64 * 1024)));
    let r = http.post(&decide).header("cookie", &session).form(&big).send().await.unwrap();
    assert_eq!(r.status(), 413, "bounded body");
    assert_eq!(
        citadel::login::poll_fabric(&net, &s.url, &code, t).await.unwrap(),
        citadel::login::TokenAnswer::Error("authorization_pending".into()),
        "nothing forged was decided"
    );

    // The real decision.
    let r = http.post(&decide).header("cookie", &session).form(&choice(&csrf)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("Approved") && body.contains("org <b>acme</b>") && !body.contains("<script>"), "{body}");
    tokio::time::sleep(Duration::from_secs(code.interval)).await;
    let grant = citadel::login::poll_fabric(&net, &s.url, &code, t).await.unwrap();
    let citadel::login::TokenAnswer::Key(grant) = grant else { panic!("not approved: {grant:?}") };
    assert_eq!(grant.org_name, "acme");
    // A decided code cannot be decided again.
    let r = http.post(&decide).header("cookie", &session).form(&choice(&csrf)).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Deny through the page too.
    let code = citadel::login::start_fabric(&net, &s.url, "h2", t).await.unwrap();
    let deny = vec![
        ("csrf", csrf.clone()),
        ("code", code.user_code.clone()),
        ("org", acme.clone()),
        ("action", "deny".into()),
    ];
    let r = http.post(&decide).header("cookie", &session).form(&deny).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Denied"));
    assert_eq!(
        citadel::login::poll_fabric(&net, &s.url, &code, t).await.unwrap(),
        citadel::login::TokenAnswer::Error("access_denied".into())
    );
}
