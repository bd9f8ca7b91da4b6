//! `citadel login` without a key: the device-code flow (approve, deny) and Headscale's
//! approval-URL flow, end to end with the binaries.

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
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let nexus = Proc(
        Command::new(bin("nexus-sim"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", "k", "--device-poll-interval", "1"])
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
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the match: a closed pipe would make the child's next write fail.
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("expected output");
        if f(&line) {
            return line;
        }
    }
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
