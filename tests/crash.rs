//! Crash safety of the state directory: `citadel init`, `up` and `logout` are killed with
//! SIGKILL at random points, over and over on one state directory. After every kill the state
//! loads (never "corrupt"), the identity changes only through a logout, and nexus-sim holds at
//! most one node, the one whose machine key the state holds.
//!
//! The suite runs 20 rounds; `crash_safety_200_rounds` (ignored, minutes long) runs the full
//! 200. `CRASH_SEED` replays a run (the seed is printed).

use citadel::keys::MachinePublic;
use citadel::state::{Identity, NodeInfo, StateDir};
use citadel_e2e::{bin, free_port, run_with_deadline, Proc};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "crash-admin-key";

struct World {
    url: String,
    _nexus: Proc,
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl World {
    fn start() -> World {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let dir = tempfile::tempdir().unwrap();
        let nexus = Proc(
            Command::new(bin("nexus-sim"))
                .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--api-key", ADMIN_KEY])
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
        let state = dir.path().join("node");
        World { url, _nexus: nexus, _dir: dir, state }
    }

    fn admin(&self, args: &[&str]) -> String {
        let o = run_with_deadline(
            Command::new(bin("nexus-sim")).args(args).env("NEXUS_URL", &self.url).env("NEXUS_API_KEY", ADMIN_KEY),
            Duration::from_secs(30),
        );
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    }

    /// Machine keys of the nodes nexus-sim holds.
    fn server_machines(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.admin(&["nodes", "list", "-o", "json"])).unwrap();
        v.as_array().unwrap().iter().map(|n| n["machineKey"].as_str().unwrap().to_string()).collect()
    }

    fn citadel(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("citadel"));
        c.arg("--state-dir").arg(&self.state).args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        c
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Init,
    Up,
    Logout,
}

/// What the state directory holds after a kill: the machine key (if any) and whether it says
/// it is registered. Panics on anything a user could not recover from with documented steps.
fn load(state: &Path) -> (Option<String>, bool) {
    if !state.exists() {
        return (None, false);
    }
    let dir = StateDir::open(state).unwrap_or_else(|e| panic!("state does not open after a kill: {e}"));
    let id: Option<Identity> = dir.read("identity.json").unwrap_or_else(|e| panic!("identity after a kill: {e}"));
    let info: Option<NodeInfo> = dir.read("node.json").unwrap_or_else(|e| panic!("node.json after a kill: {e}"));
    let key = id.map(|i| MachinePublic(i.machine_key.public_bytes()).to_string());
    let registered = info.is_some_and(|i| i.registered);
    assert!(!(registered && key.is_none()), "node.json says registered but the identity is gone (silent loss)");
    (key, registered)
}

fn rounds(n: usize) {
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash: {n} rounds, CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let w = World::start();
    w.admin(&["users", "create", "acme"]);
    let authkey = w.admin(&["preauthkeys", "create", "--user", "acme", "--reusable"]);
    let init_args = ["init", "--authkey", &authkey, "--nexus", &w.url, "--hostname", "crash", "--timeout=10"];

    // Timings of uninterrupted runs bound where a kill can land.
    let t0 = Instant::now();
    let o = run_with_deadline(&mut w.citadel(&init_args), Duration::from_secs(30));
    assert!(o.status.success(), "init: {}", String::from_utf8_lossy(&o.stderr));
    let init_time = t0.elapsed();
    let (mut key, _) = load(&w.state);
    assert!(key.is_some());
    let t0 = Instant::now();
    let o = run_with_deadline(&mut w.citadel(&["logout", "--timeout=10"]), Duration::from_secs(30));
    assert!(o.status.success(), "logout: {}", String::from_utf8_lossy(&o.stderr));
    let logout_time = t0.elapsed();
    assert_eq!(load(&w.state).0, None);
    assert!(w.server_machines().is_empty(), "logout left the node on the server");
    key = None;
    let mut may_change = true;
    let (mut kills, mut finished) = (0, 0);

    for round in 0..n {
        let op = match rng.gen_range(0..10) {
            0..=4 => Op::Init,
            5..=7 => Op::Up,
            _ => Op::Logout,
        };
        let span = match op {
            Op::Init => init_time * 3 / 2,
            Op::Up => init_time * 2,
            Op::Logout => logout_time * 3 / 2,
        };
        let delay = Duration::from_micros(rng.gen_range(0..=span.as_micros() as u64));
        let mut child = match op {
            Op::Init => w.citadel(&init_args),
            Op::Up => w.citadel(&["up"]),
            Op::Logout => w.citadel(&["logout", "--timeout=10"]),
        }
        .spawn()
        .unwrap();
        std::thread::sleep(delay);
        match child.try_wait().unwrap() {
            Some(_) => finished += 1,
            None => {
                child.kill().unwrap();
                kills += 1;
            }
        }
        let out = child.wait_with_output().unwrap();
        let ctx = format!("round {round} {op:?} killed after {delay:?} (CRASH_SEED={seed}); stderr: {}", {
            String::from_utf8_lossy(&out.stderr)
        });

        let (now, _) = std::panic::catch_unwind(|| load(&w.state)).unwrap_or_else(|_| panic!("{ctx}"));
        if let (Some(before), Some(after)) = (&key, &now) {
            assert!(may_change || before == after, "identity changed without a logout: {ctx}");
        }
        if key.is_some() && now.is_none() {
            assert!(op == Op::Logout, "identity lost by {op:?}: {ctx}");
        }
        let server = w.server_machines();
        assert!(server.len() <= 1, "nexus-sim holds {} nodes for one state directory: {ctx}", server.len());
        if let Some(m) = server.first() {
            assert_eq!(Some(m), now.as_ref(), "nexus-sim's node is not the state's identity: {ctx}");
        }
        may_change = op == Op::Logout || now.is_none();
        key = now;
    }
    eprintln!("crash: {kills} kills, {finished} runs finished before their kill");

    // After all that, the node still joins with the identity it has.
    let o = run_with_deadline(&mut w.citadel(&init_args), Duration::from_secs(30));
    assert!(o.status.success(), "final init: {}", String::from_utf8_lossy(&o.stderr));
    let (last, registered) = load(&w.state);
    assert!(registered);
    if key.is_some() && !may_change {
        assert_eq!(last, key, "the final init replaced the identity");
    }
    assert_eq!(w.server_machines(), vec![last.unwrap()]);
}

#[test]
fn crash_safety_20_rounds() {
    rounds(20);
}

#[test]
#[ignore = "200 rounds of kill -9 take minutes; run with --ignored (see the module docs)"]
fn crash_safety_200_rounds() {
    rounds(200);
}
