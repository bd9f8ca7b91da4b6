//! `citadel work` as a user runs it: on a connected node, against a real `redis-server`, a
//! job added with `redis-cli XADD` runs and is marked succeeded; SIGTERM stops the loop.

use citadel_e2e::{bin, free_port, run_with_deadline, Nexus, Proc};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let o = run_with_deadline(
        Command::new("redis-cli").args(["-p", &port.to_string()]).args(args),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Starts redis-server on a free loopback port and waits for its PONG. A port found free can be
/// taken by another process before redis binds it (redis then exits): try another port.
fn start_redis(dir: &std::path::Path) -> (Proc, u16) {
    for _ in 0..3 {
        let port = free_port();
        let mut redis = Proc(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if redis_cli(port, &["PING"]) == "PONG" {
                return (redis, port);
            }
            if let Ok(Some(_)) = redis.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("redis-server did not start on any of 3 ports");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_runs_a_job_from_redis_and_stops_on_sigterm() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        if std::env::var_os("CITADEL_REQUIRE_REAL").is_some() {
            panic!("redis-server is required");
        }
        println!("skipping citadel work CLI test: redis-server not installed");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let nx = Nexus::start().await;
    let key = nx.key("acme", true);
    let dir = t.path().join("node");
    let d = dir.clone();
    let url = nx.url();
    let o = tokio::task::spawn_blocking(move || {
        run_with_deadline(
            Command::new(bin("citadel")).arg("--state-dir").arg(&d).args(["init", "--authkey", &key, "--nexus", &url]),
            Duration::from_secs(20),
        )
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let redis_dir = t.path().to_path_buf();
    let (_redis, port) = tokio::task::spawn_blocking(move || start_redis(&redis_dir)).await.unwrap();
    let job = r#"{"id":"job-1","type":"SHELL_COMMAND","payload":{"argv":["echo","hello from a job"]}}"#;
    redis_cli(port, &["XADD", "citadel:jobs", "*", "job", job]);

    // Without --allow-shell a shell job is refused into the dead-letter stream.
    let d = dir.clone();
    let refuse = tokio::task::spawn_blocking(move || {
        let mut w = Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(&d)
            .args(["work", "--redis-url", &format!("redis://127.0.0.1:{port}"), "--queue", "guarded"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        redis_cli(
            port,
            &["XADD", "guarded", "*", "job", r#"{"id":"g1","type":"SHELL_COMMAND","payload":{"argv":["true"]}}"#],
        );
        let start = Instant::now();
        let mut dead = String::new();
        while start.elapsed() < Duration::from_secs(20) {
            dead = redis_cli(port, &["XRANGE", "guarded:dead", "-", "+"]);
            if dead.contains("disabled") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = w.kill();
        let _ = w.wait();
        dead
    })
    .await
    .unwrap();
    assert!(refuse.contains("disabled"), "shell job was not refused: {refuse}");

    let mut worker = Proc(
        Command::new(bin("citadel"))
            .arg("--state-dir")
            .arg(&dir)
            .args([
                "work",
                "--allow-shell",
                "--redis-url",
                &format!("redis://127.0.0.1:{port}"),
                "--drain-timeout",
                "5",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        let state = tokio::task::spawn_blocking(move || redis_cli(port, &["HGET", "citadel:jobs:job:job-1", "state"]))
            .await
            .unwrap();
        if state == "succeeded" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "job never succeeded (state {state:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = redis_cli(port, &["XRANGE", "citadel:jobs:job:job-1:events", "-", "+"]);
    assert!(events.contains("hello from a job"), "{events}");

    // SIGTERM: the loop drains and the process exits 0.
    let pid = worker.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "work did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    use std::io::Read;
    worker.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("1 succeeded"), "{err}");
}
