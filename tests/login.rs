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
