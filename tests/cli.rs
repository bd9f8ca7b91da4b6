//! The `citadel` and `nexus-sim` binaries as a user runs them: admin subcommands print just
//! the key, `init` prints the mesh IP, `status` attaches to a running `up` or brings the node
//! up from state, `logout` removes the node, and failures exit non-zero with one clear line.

use citadel_e2e::{bin, free_port, run_with_deadline, Proc};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

struct Env {
    url: String,
    _nexus: Proc,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let nexus = Proc(
            Command::new(bin("nexus-sim"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", "test-admin-key"])
                .args(citadel_e2e::test_ca().serve_args())
                .env("NEXUS_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "nexus-sim did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Env { url, _nexus: nexus, dir }
    }

    fn admin(&self, args: &[&str]) -> String {
        let o = run_with_deadline(
            Command::new(bin("nexus-sim"))
                .args(args)
                .env("NEXUS_URL", &self.url)
                .env("NEXUS_API_KEY", "test-admin-key"),
            T,
        );
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    fn citadel(&self, node: &str, args: &[&str]) -> std::process::Output {
        run_with_deadline(
            Command::new(bin("citadel"))
                .arg("--state-dir")
                .arg(self.dir.path().join(node))
                .args(args)
                .arg("--timeout=5"),
            T,
        )
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

#[test]
fn init_status_up_logout_as_a_user_runs_them() {
    let env = Env::start();
    assert_eq!(env.admin(&["users", "create", "acme"]), "acme");
    let key = env.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
    assert!(!key.contains(char::is_whitespace) && key.len() > 20, "stdout is exactly the key: {key:?}");

    let o = env.citadel("a", &["init", "--authkey", &key, "--nexus", &env.url, "--hostname", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ip: std::net::Ipv4Addr = stdout(&o).parse().expect("init prints the mesh IP");
    assert!(ip.octets()[0] == 100 && (64..128).contains(&ip.octets()[1]));
    assert!(!stderr(&o).contains(&key), "the auth key never reaches the output");

    let o = env.citadel("b", &["init", "--authkey", &key, "--nexus", &env.url, "--hostname", "bravo"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Not running: status brings the node up from state, with no key.
    let o = env.citadel("a", &["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(s["connected"], true);
    assert_eq!(s["ipv4"], ip.to_string());
    assert_eq!(s["org"], "acme");
    assert_eq!(s["hostname"], "alpha");
    assert_eq!(s["peers"][0]["name"], "bravo");

    // Running: `up` serves the local API and status attaches to it.
    let mut up = Proc(
        Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(env.dir.path().join("b"))
            .arg("up")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sock = env.dir.path().join("b/citadel.sock");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "up never served its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = env.citadel("b", &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("connected") && text.contains("alpha") && text.contains("acme"), "{text}");
    // A second node process on the same state is refused.
    let o = env.citadel("b", &["up"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));

    // Logout through the running node: the node leaves, `up` exits, Nexus forgets it.
    let o = env.citadel("b", &["logout"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let start = Instant::now();
    while up.0.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "up did not exit after logout");
        std::thread::sleep(Duration::from_millis(20));
    }
    let nodes = env.admin(&["nodes", "list", "-o", "json"]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["givenName"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha"]);
    let o = env.citadel("a", &["status", "--json"]);
    let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(s["peers"].as_array().unwrap().len(), 0, "{s}");
    let o = env.citadel("b", &["status"]);
    assert_eq!(o.status.code(), Some(6), "logged out node is not connected");
}

#[test]
fn failures_exit_non_zero_with_one_clear_line() {
    let env = Env::start();
    env.admin(&["users", "create", "acme"]);
    let o = env.citadel("x", &["init", "--authkey", "wrong", "--nexus", &env.url]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("auth key"), "{}", stderr(&o));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let start = Instant::now();
    let o = env.citadel("y", &["init", "--authkey", "k", "--nexus", &dead]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("cannot reach Nexus"), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(10));

    std::fs::create_dir_all(env.dir.path().join("z")).unwrap();
    std::fs::write(env.dir.path().join("z/node.json"), b"\x00garbage").unwrap();
    let o = env.citadel("z", &["status"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));

    let o = env.citadel("y", &["init", "--authkey", "k", "--nexus", "ftp://nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let o = env.citadel("w", &["status"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(stdout(&o).contains("not logged in"));

    // `work` refuses unless the node is connected.
    let o = env.citadel("w", &["work", "--redis-url", "redis://127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("refusing to start the job loop"), "{}", stderr(&o));

    // Admin commands fail clearly without or with a wrong API key.
    let o = run_with_deadline(
        Command::new(bin("nexus-sim")).args(["users", "list"]).env("NEXUS_URL", &env.url).env("NEXUS_API_KEY", "bad"),
        T,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Unauthorized"), "{}", stderr(&o));
}

#[test]
fn logout_clears_a_corrupt_state() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("n");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("identity.json"), b"{\"machine_key\": 7").unwrap();
    std::fs::write(state.join("node.json"), b"{}").unwrap();
    let o = run_with_deadline(
        Command::new(bin("citadel")).arg("--state-dir").arg(&state).args(["logout", "--timeout=5"]),
        T,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!state.join("identity.json").exists() && !state.join("node.json").exists());
}

#[test]
fn api_keys_expire_and_delete_through_the_cli() {
    let env = Env::start();
    let with_key = |key: &str| {
        run_with_deadline(
            Command::new(bin("nexus-sim")).args(["users", "list"]).env("NEXUS_URL", &env.url).env("NEXUS_API_KEY", key),
            T,
        )
    };
    let key = env.admin(&["apikeys", "create"]);
    assert!(with_key(&key).status.success());
    let prefix = key.strip_prefix("nsapi-").and_then(|k| k.split('.').next()).unwrap().to_string();
    let list = env.admin(&["apikeys", "list"]);
    assert!(list.contains(&prefix), "{list}");
    assert!(!list.contains("test-admin") && !list.contains(key.rsplit('.').next().unwrap()), "{list}");

    env.admin(&["apikeys", "expire", "--prefix", &prefix]);
    let o = with_key(&key);
    assert!(!o.status.success() && stderr(&o).contains("Unauthorized"), "{}", stderr(&o));
    env.admin(&["apikeys", "delete", "--prefix", &prefix]);
    assert!(!env.admin(&["apikeys", "list"]).contains(&prefix));
}

#[test]
fn a_node_key_expiry_is_set_through_the_cli_now_or_later() {
    let env = Env::start();
    env.admin(&["users", "create", "acme"]);
    let key = env.admin(&["preauthkeys", "create", "--user", "acme"]);
    let o = env.citadel("a", &["init", "--authkey", &key, "--nexus", &env.url, "--hostname", "alpha"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let node = || -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&env.admin(&["nodes", "list", "-o", "json"])).unwrap();
        v[0].clone()
    };
    let expiry = || {
        let e = node()["expiry"].as_str().map(str::to_string).expect("an expiry");
        chrono::DateTime::parse_from_rfc3339(&e).unwrap().with_timezone(&chrono::Utc)
    };
    let id = node()["id"].as_str().expect("a string ID, as in Headscale's API").to_string();

    // Later: an hour from now.
    let before = chrono::Utc::now();
    env.admin(&["nodes", "expire", &id, "--in", "1h"]);
    let left = expiry() - before;
    assert!(left > chrono::Duration::minutes(59) && left <= chrono::Duration::minutes(61), "{left}");

    // Now (Headscale's `nodes expire`).
    env.admin(&["nodes", "expire", &id]);
    assert!(expiry() <= chrono::Utc::now());

    // A bad duration is refused before anything is sent.
    let o = run_with_deadline(
        Command::new(bin("nexus-sim"))
            .args(["nodes", "expire", &id, "--in", "soon"])
            .env("NEXUS_URL", &env.url)
            .env("NEXUS_API_KEY", "test-admin-key"),
        T,
    );
    assert!(!o.status.success() && stderr(&o).contains("bad duration"), "{}", stderr(&o));
}
