//! `citadel_work` against a real redis-server (skipped, with one line, when none is installed;
//! failed instead under `CITADEL_REQUIRE_REAL`).
//!
//! Each test starts its own throwaway server on a free loopback port, so tests run in
//! parallel without sharing state, and every test is bounded by a timeout.

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use citadel_proto::addr::is_mesh_ip;
use citadel_work::{run, Dial, DialFuture, NoMesh, RedisClient, Value, WorkConfig, WorkError, WorkSummary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[path = "../../tests/common/mod.rs"]
mod common;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A redis-server child process in a temp dir, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn redis_server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REDIS_SERVER") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("redis-server")).collect())
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin/redis-server")).chain(candidates).find(|p| p.is_file())
}

impl RedisServer {
    /// Starts a server, or returns `None` (after printing why) when redis-server is absent.
    fn start() -> Option<RedisServer> {
        let Some(bin) = redis_server_binary() else {
            common::require_or_skip("citadel_work integration test", "redis-server not found");
            return None;
        };
        // The free-port probe can race with another test grabbing the same port; retry.
        for _ in 0..5 {
            let port = StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("probe a free port").port();
            let dir = tempfile::tempdir().expect("temp dir");
            let child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut server = RedisServer { child, port, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: port taken, try another
                }
                if ping_blocking(port) {
                    return Some(server);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server did not come up");
    }

    /// Kills the server and starts a fresh (empty) one on the same port, like a Redis restart
    /// without persistence.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let bin = redis_server_binary().expect("binary was found before");
        self.child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("respawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ping_blocking(self.port) {
            assert!(Instant::now() < deadline, "redis-server did not come back");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping_blocking(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

async fn client(url: &str) -> RedisClient {
    RedisClient::connect(url, Arc::new(NoMesh), Duration::from_secs(5)).await.expect("test client connects")
}

fn cfg(url: &str, consumer: &str) -> WorkConfig {
    let mut c = WorkConfig::new(url, "test");
    c.consumer = consumer.into();
    c.claim_idle = Duration::from_millis(300);
    c.block = Duration::from_millis(200);
    c.drain_timeout = Duration::from_secs(5);
    c.job_timeout = Duration::from_secs(10);
    c.connect_timeout = Duration::from_secs(3);
    c.allow_shell = true;
    c
}

/// A running worker: its task and the trigger of its shutdown future.
struct Worker {
    task: JoinHandle<Result<WorkSummary, WorkError>>,
    stop: Option<oneshot::Sender<()>>,
}

fn spawn_worker(cfg: WorkConfig, dialer: Arc<dyn Dial>) -> Worker {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, dialer, async move {
        let _ = rx.await;
    }));
    Worker { task, stop: Some(tx) }
}

impl Worker {
    async fn stop(mut self) -> WorkSummary {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await.expect("worker task").expect("worker result")
    }

    /// Simulates a crash: the task (and with it every job task and child process) is dropped
    /// without any cleanup reaching Redis.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Enqueues a job as one `job` field holding the whole JSON document.
async fn enqueue(c: &RedisClient, queue: &str, doc: serde_json::Value) -> String {
    let v = c.cmd(&["XADD", queue, "*", "job", &doc.to_string()]).await.expect("XADD");
    v.as_str().expect("entry id").to_string()
}

async fn hgetall(c: &RedisClient, key: &str) -> HashMap<String, String> {
    let v = c.cmd(&["HGETALL", key]).await.expect("HGETALL");
    v.as_array()
        .unwrap_or_default()
        .chunks(2)
        .map(|kv| (kv[0].as_str().unwrap_or_default().to_string(), kv[1].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Entries of a stream as field maps (values lossily decoded).
async fn xrange(c: &RedisClient, key: &str) -> Vec<HashMap<String, String>> {
    let v = c.cmd(&["XRANGE", key, "-", "+"]).await.expect("XRANGE");
    v.as_array()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let a = e.as_array().unwrap_or_default();
            a.get(1)
                .and_then(Value::as_array)
                .unwrap_or_default()
                .chunks(2)
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv[0].as_bytes().unwrap_or_default()).into_owned(),
                        String::from_utf8_lossy(kv[1].as_bytes().unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .collect()
}

async fn pending_count(c: &RedisClient, queue: &str, group: &str) -> i64 {
    let v = c.cmd(&["XPENDING", queue, group]).await.expect("XPENDING");
    v.as_array().and_then(|a| a.first()).and_then(Value::as_int).unwrap_or(-1)
}

async fn int(c: &RedisClient, args: &[&str]) -> i64 {
    c.cmd(args).await.expect("command").as_int().expect("integer reply")
}

/// Polls `check` every 25 ms until it holds or `within` passes.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn state_is(c: &RedisClient, key: &str, state: &str) -> bool {
    hgetall(c, key).await.get("state").map(String::as_str) == Some(state)
}

/// A one-response-per-connection HTTP server answering `body` to every GET.
async fn http_server(body: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let addr = l.local_addr().expect("http addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// Runs a test body under an overall deadline so a hang fails instead of stalling CI.
async fn bounded<F: Future<Output = ()>>(limit: Duration, f: F) {
    tokio::time::timeout(limit, f).await.expect("test exceeded its time bound");
}

const Q: &str = "citadel:jobs";
const G: &str = "citadel-workers";

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_and_http_jobs_succeed() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        let http = http_server("hello").await;
        // Go-agent style fields: jobId / type / payload-as-JSON-string.
        c.cmd(&[
            "XADD",
            Q,
            "*",
            "jobId",
            "sh-1",
            "type",
            "SHELL_COMMAND",
            "payload",
            r#"{"argv":["sh","-c","echo out; echo err >&2"]}"#,
        ])
        .await
        .expect("XADD");
        enqueue(
            &c,
            Q,
            serde_json::json!({"id":"http-1","type":"HTTP_FETCH","payload":{"url":format!("http://{http}/x")}}),
        )
        .await;

        let mut conf = cfg(&redis.url(), "w1");
        conf.allow_fetch = vec!["127.0.0.0/8".parse().expect("cidr")];
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("both jobs to succeed", Duration::from_secs(15), || async {
            state_is(&c, "citadel:jobs:job:sh-1", "succeeded").await
                && state_is(&c, "citadel:jobs:job:http-1", "succeeded").await
        })
        .await;

        let sh = hgetall(&c, "citadel:jobs:job:sh-1").await;
        assert_eq!(sh["exit_code"], "0");
        assert_eq!(sh["attempts"], "1");
        assert_eq!(sh["worker"], "w1");
        assert_eq!(sh["type"], "SHELL_COMMAND");
        let ev = xrange(&c, "citadel:jobs:job:sh-1:events").await;
        let output = |stream: &str| -> String {
            ev.iter().filter(|e| e["type"] == "output" && e["stream"] == stream).map(|e| e["data"].clone()).collect()
        };
        assert_eq!(output("stdout"), "out\n");
        assert_eq!(output("stderr"), "err\n");
        let states: Vec<&str> = ev.iter().filter(|e| e["type"] == "status").map(|e| e["state"].as_str()).collect();
        assert_eq!(states, ["running", "succeeded"]);

        let h = hgetall(&c, "citadel:jobs:job:http-1").await;
        assert_eq!((h["http_status"].as_str(), h["via"].as_str()), ("200", "direct"));
        let body: String = xrange(&c, "citadel:jobs:job:http-1:events")
            .await
            .iter()
            .filter(|e| e["type"] == "output")
            .map(|e| e["data"].clone())
            .collect();
        assert_eq!(body, "hello");

        assert_eq!(pending_count(&c, Q, G).await, 0, "both jobs acknowledged");
        assert!(int(&c, &["TTL", "citadel:jobs:job:sh-1"]).await > 0, "results expire");
        let s = w.stop().await;
        assert_eq!((s.succeeded, s.dead_lettered), (2, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_and_array_commands_run_only_with_allow_shell() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        // As the Go platform enqueues it: `command` is one string.
        c.cmd(&[
            "XADD",
            Q,
            "*",
            "jobId",
            "str-1",
            "type",
            "SHELL_COMMAND",
            "payload",
            r#"{"command":"echo  a;b   $HOME"}"#,
        ])
        .await
        .expect("XADD");
        enqueue(&c, Q, serde_json::json!({"id":"arr-1","type":"SHELL_COMMAND","payload":{"command":["echo","x y"]}}))
            .await;
        let mut conf = cfg(&redis.url(), "w1");
        conf.allow_shell = true;
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("both commands to succeed", Duration::from_secs(15), || async {
            state_is(&c, "citadel:jobs:job:str-1", "succeeded").await
                && state_is(&c, "citadel:jobs:job:arr-1", "succeeded").await
        })
        .await;
        let out = |id: &'static str| {
            let c = &c;
            async move {
                xrange(c, &format!("citadel:jobs:job:{id}:events"))
                    .await
                    .iter()
                    .filter(|e| e["type"] == "output")
                    .map(|e| e["data"].clone())
                    .collect::<String>()
            }
        };
        // Split on whitespace, no shell: `;` and `$HOME` reach echo as they are.
        assert_eq!(out("str-1").await, "a;b $HOME\n");
        assert_eq!(out("arr-1").await, "x y\n");
        w.stop().await;

        // Without --allow-shell neither form runs.
        c.cmd(&["XADD", Q, "*", "jobId", "str-2", "type", "SHELL_COMMAND", "payload", r#"{"command":"touch /tmp/x"}"#])
            .await
            .expect("XADD");
        enqueue(&c, Q, serde_json::json!({"id":"arr-2","type":"SHELL_COMMAND","payload":{"command":["true"]}})).await;
        let mut conf = cfg(&redis.url(), "w2");
        conf.allow_shell = false;
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("two dead letters", Duration::from_secs(15), || async {
            int(&c, &["XLEN", "citadel:jobs:dead"]).await == 2
        })
        .await;
        for d in xrange(&c, "citadel:jobs:dead").await {
            assert!(d["reason"].contains("--allow-shell"), "{}", d["reason"]);
        }
        let s = w.stop().await;
        assert_eq!((s.succeeded, s.dead_lettered), (0, 2));
    })
    .await;
}

/// A dialer whose connections stop writing once a reply containing `marker` has been read:
/// the worker behind it gets its delivery, then stalls (as a paused or starved process does)
/// until the test opens the gate.
struct StallingDialer {
    marker: Vec<u8>,
    gate: Arc<Gate>,
}

/// Armed until a reply with the marker is read, then closed (writes wait) until opened.
#[derive(Default)]
struct Gate {
    state: std::sync::atomic::AtomicU8,
    wakers: Mutex<Vec<std::task::Waker>>,
}

const ARMED: u8 = 0;
const CLOSED: u8 = 1;
const OPEN: u8 = 2;

impl Gate {
    fn state(&self) -> u8 {
        self.state.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn open(&self) {
        self.state.store(OPEN, std::sync::atomic::Ordering::SeqCst);
        for w in self.wakers.lock().expect("lock").drain(..) {
            w.wake();
        }
    }
}

struct Stalling {
    inner: TcpStream,
    marker: Vec<u8>,
    gate: Arc<Gate>,
}

impl tokio::io::AsyncRead for Stalling {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering::SeqCst;
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled()[before..].windows(self.marker.len()).any(|w| w == self.marker) {
            let _ = self.gate.state.compare_exchange(ARMED, CLOSED, SeqCst, SeqCst);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Stalling {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.gate.state() == CLOSED {
            self.gate.wakers.lock().expect("lock").push(cx.waker().clone());
            // Re-check: `open` may have run between the load and the push.
            if self.gate.state() == CLOSED {
                return std::task::Poll::Pending;
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Dial for StallingDialer {
    fn is_mesh_addr(&self, _: std::net::IpAddr) -> bool {
        false
    }
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
        Box::pin(async move {
            let inner = TcpStream::connect((host, port)).await?;
            Ok(Box::new(Stalling { inner, marker: self.marker.clone(), gate: self.gate.clone() })
                as Box<dyn citadel_work::AsyncReadWrite>)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_worker_neither_reruns_nor_overwrites_a_job_taken_over_and_finished() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let runs = dir.path().join("runs");
        let gate = Arc::new(Gate::default());
        let stalling = StallingDialer { marker: b"stall-me".to_vec(), gate: gate.clone() };
        let slow = spawn_worker(cfg(&redis.url(), "stalled"), Arc::new(stalling));
        let cmd = format!("echo ran >> {}", runs.display());
        enqueue(&c, Q, serde_json::json!({"id":"stall-me","type":"SHELL_COMMAND","payload":{"argv":["sh","-c",cmd]}}))
            .await;
        // The stalled worker read the job and is now stuck before recording its start.
        wait_for("the delivery to the stalled worker", Duration::from_secs(10), || async { gate.state() != ARMED })
            .await;
        // Past claim_idle another worker takes the job over and finishes it.
        let other = spawn_worker(cfg(&redis.url(), "other"), Arc::new(NoMesh));
        let key = format!("{Q}:job:stall-me");
        wait_for("the job to succeed on the other worker", Duration::from_secs(10), || state_is(&c, &key, "succeeded"))
            .await;
        // The stalled worker wakes up with a delivery that is no longer its own.
        gate.open();
        let stalled = slow.stop().await;
        let s = other.stop().await;

        let ran = std::fs::read_to_string(&runs).expect("the job ran");
        assert_eq!(ran.lines().count(), 1, "the job ran once, not again on the stalled worker");
        assert_eq!((s.succeeded, s.reclaimed), (1, 1), "{s:?}");
        assert_eq!((stalled.superseded, stalled.succeeded), (1, 0), "{stalled:?}");
        let h = hgetall(&c, &key).await;
        assert_eq!((h["state"].as_str(), h["worker"].as_str(), h["attempts"].as_str()), ("succeeded", "other", "2"));
        let running: Vec<_> = xrange(&c, &format!("{key}:events"))
            .await
            .into_iter()
            .filter(|e| e.get("state").map(String::as_str) == Some("running"))
            .collect();
        assert_eq!(running.len(), 1, "only the other worker recorded a start: {running:?}");
        assert_eq!(pending_count(&c, Q, G).await, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_job_is_reclaimed_and_completed() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        let w1 = spawn_worker(cfg(&redis.url(), "w1"), Arc::new(NoMesh));
        enqueue(&c, Q, serde_json::json!({"id":"slow","type":"SHELL_COMMAND","payload":{"argv":["sleep","1"]}})).await;
        wait_for("w1 to start the job", Duration::from_secs(10), || async {
            let h = hgetall(&c, "citadel:jobs:job:slow").await;
            h.get("state").map(String::as_str) == Some("running") && h["worker"] == "w1"
        })
        .await;
        w1.kill().await;

        let w2 = spawn_worker(cfg(&redis.url(), "w2"), Arc::new(NoMesh));
        wait_for("w2 to finish the job", Duration::from_secs(15), || async {
            state_is(&c, "citadel:jobs:job:slow", "succeeded").await
        })
        .await;
        let h = hgetall(&c, "citadel:jobs:job:slow").await;
        assert_eq!(h["worker"], "w2");
        assert_eq!(h["attempts"], "2", "the crashed delivery counts as an attempt");
        assert_eq!(pending_count(&c, Q, G).await, 0);
        let s = w2.stop().await;
        assert_eq!((s.succeeded, s.reclaimed), (1, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_malformed_jobs_are_dead_lettered() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        let mut conf = cfg(&redis.url(), "w1");
        conf.max_retries = 3;
        conf.claim_idle = Duration::from_millis(200);
        let w = spawn_worker(conf, Arc::new(NoMesh));
        enqueue(&c, Q, serde_json::json!({"id":"poison","type":"SHELL_COMMAND","payload":{"argv":["false"]}})).await;
        let broken =
            c.cmd(&["XADD", Q, "*", "job", "{not json"]).await.expect("XADD").as_str().expect("id").to_string();
        enqueue(&c, Q, serde_json::json!({"id":"odd","type":"REFORMAT_DISK"})).await;

        wait_for("three dead letters", Duration::from_secs(15), || async {
            int(&c, &["XLEN", "citadel:jobs:dead"]).await == 3
        })
        .await;
        let dead = xrange(&c, "citadel:jobs:dead").await;
        let by_id = |id: &str| dead.iter().find(|d| d["jobId"] == id).cloned().expect(id);

        let p = by_id("poison");
        assert_eq!(p["attempts"], "3");
        assert!(p["reason"].contains("exited with status 1"), "{}", p["reason"]);
        assert!(p.contains_key("job"), "original fields are kept for re-queueing");
        let ev = xrange(&c, "citadel:jobs:job:poison:events").await;
        let runs = ev.iter().filter(|e| e["type"] == "status" && e["state"] == "running").count();
        assert_eq!(runs, 3, "ran exactly max_retries times");
        let h = hgetall(&c, "citadel:jobs:job:poison").await;
        assert_eq!((h["state"].as_str(), h["exit_code"].as_str()), ("dead", "1"));

        let m = by_id(&broken);
        assert_eq!(m["attempts"], "1", "malformed jobs are not retried");
        assert!(m["reason"].contains("not valid JSON"), "{}", m["reason"]);
        assert!(by_id("odd")["reason"].contains("unsupported job type"));

        assert_eq!(pending_count(&c, Q, G).await, 0);
        let s = w.stop().await;
        assert_eq!((s.dead_lettered, s.failed_attempts, s.succeeded), (3, 2, 0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_job_lost_across_random_worker_kills() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(90), async {
        const N: usize = 1000;
        let c = client(&redis.url()).await;
        let mut pipe = Vec::new();
        for i in 0..N {
            let doc = serde_json::json!({"id": format!("j{i}"), "type":"SHELL_COMMAND","payload":{"argv":["true"]}});
            pipe.push(vec![
                b"XADD".to_vec(),
                Q.as_bytes().to_vec(),
                b"*".to_vec(),
                b"job".to_vec(),
                doc.to_string().into_bytes(),
            ]);
        }
        c.pipeline(pipe).await.expect("enqueue");

        let conf = |name: String| {
            let mut k = cfg(&redis.url(), &name);
            k.max_concurrency = 8;
            // Kills interrupt deliveries; with this many, none should ever reach the DLQ.
            k.max_retries = 50;
            k
        };
        let started = Instant::now();
        let mut generation = 0;
        let mut workers: Vec<Worker> =
            (0..2).map(|i| spawn_worker(conf(format!("w{i}-g0")), Arc::new(NoMesh))).collect();
        let mut kills = 0;
        while !(lag(&c).await == Some(0) && pending_count(&c, Q, G).await == 0) {
            assert!(started.elapsed() < Duration::from_secs(60), "1000 jobs not done in 60 s");
            tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 150 + 50)).await;
            if kills < 12 {
                let victim = rand::random::<usize>() % workers.len();
                generation += 1;
                let fresh = spawn_worker(conf(format!("w{victim}-g{generation}")), Arc::new(NoMesh));
                let old = std::mem::replace(&mut workers[victim], fresh);
                old.kill().await;
                kills += 1;
            }
        }
        let elapsed = started.elapsed();
        for w in workers {
            w.stop().await;
        }
        // Every job ran to success at least once, nothing is pending, nothing is dead.
        let mut pipe = Vec::new();
        for i in 0..N {
            pipe.push(vec![b"HGET".to_vec(), format!("{Q}:job:j{i}").into_bytes(), b"state".to_vec()]);
        }
        let states = c.pipeline(pipe).await.expect("HGET states");
        let not_ok: Vec<usize> =
            states.iter().enumerate().filter(|(_, s)| s.as_str() != Some("succeeded")).map(|(i, _)| i).collect();
        assert!(not_ok.is_empty(), "jobs not succeeded: {not_ok:?}");
        assert_eq!(int(&c, &["XLEN", "citadel:jobs:dead"]).await, 0);
        assert_eq!(pending_count(&c, Q, G).await, 0);
        eprintln!("{N} jobs with {kills} worker kills done in {elapsed:.2?}");
    })
    .await;
}

/// Entries in the stream not yet delivered to the group (XINFO GROUPS `lag`).
async fn lag(c: &RedisClient) -> Option<i64> {
    let v = c.cmd(&["XINFO", "GROUPS", Q]).await.ok()?;
    let group = v.as_array()?.first()?.as_array()?;
    group.chunks(2).find(|kv| kv[0].as_str() == Some("lag")).and_then(|kv| kv[1].as_int())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_trivial_jobs() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        const N: usize = 1000;
        let c = client(&redis.url()).await;
        let pipe = (0..N)
            .map(|i| {
                let doc =
                    serde_json::json!({"id": format!("t{i}"), "type":"SHELL_COMMAND","payload":{"argv":["true"]}});
                vec![
                    b"XADD".to_vec(),
                    Q.as_bytes().to_vec(),
                    b"*".to_vec(),
                    b"job".to_vec(),
                    doc.to_string().into_bytes(),
                ]
            })
            .collect();
        c.pipeline(pipe).await.expect("enqueue");
        let mut conf = cfg(&redis.url(), "bench");
        conf.max_concurrency = 8;
        let started = Instant::now();
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("all jobs", Duration::from_secs(50), || async {
            lag(&c).await == Some(0) && pending_count(&c, Q, G).await == 0
        })
        .await;
        let elapsed = started.elapsed();
        let s = w.stop().await;
        assert_eq!(s.succeeded, N as u64);
        eprintln!(
            "throughput: {N} SHELL_COMMAND `true` jobs, 1 worker x 8 concurrent: {elapsed:.2?} ({:.0} jobs/s)",
            N as f64 / elapsed.as_secs_f64()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_jobs_and_stops_reading() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(40), async {
        let c = client(&redis.url()).await;
        // A long claim_idle everywhere: anything picked up quickly below was released on
        // purpose, not reclaimed by waiting.
        let slow_claim = |name: &str| {
            let mut k = cfg(&redis.url(), name);
            k.claim_idle = Duration::from_secs(60);
            k
        };
        let w = spawn_worker(slow_claim("w1"), Arc::new(NoMesh));
        for id in ["d1", "d2"] {
            enqueue(&c, Q, serde_json::json!({"id":id,"type":"SHELL_COMMAND","payload":{"argv":["sleep","0.8"]}}))
                .await;
        }
        wait_for("both running", Duration::from_secs(10), || async {
            state_is(&c, "citadel:jobs:job:d1", "running").await && state_is(&c, "citadel:jobs:job:d2", "running").await
        })
        .await;
        let Worker { task, stop } = w;
        let asked = Instant::now();
        let _ = stop.expect("stop handle").send(());
        // Enqueued as shutdown begins: w1 must not run it (it may or may not have been
        // delivered to w1's parked read; if so it is handed back).
        enqueue(&c, Q, serde_json::json!({"id":"late","type":"SHELL_COMMAND","payload":{"argv":["true"]}})).await;
        let s = task.await.expect("join").expect("run");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(5), "drained within drain_timeout ({took:?})");
        assert_eq!((s.succeeded, s.abandoned), (2, 0));
        assert!(state_is(&c, "citadel:jobs:job:d1", "succeeded").await);
        assert!(state_is(&c, "citadel:jobs:job:d2", "succeeded").await);
        assert!(hgetall(&c, "citadel:jobs:job:late").await.is_empty(), "no new job after shutdown");
        assert!(pending_count(&c, Q, G).await <= 1);

        // A job longer than the drain timeout is abandoned and its process killed...
        let mut conf = slow_claim("w2");
        conf.drain_timeout = Duration::from_millis(300);
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("late job done by w2", Duration::from_secs(5), || async {
            state_is(&c, "citadel:jobs:job:late", "succeeded").await
        })
        .await;
        assert_eq!(hgetall(&c, "citadel:jobs:job:late").await["attempts"], "1", "hand-back costs no attempt");
        enqueue(&c, Q, serde_json::json!({"id":"long","type":"SHELL_COMMAND","payload":{"argv":["sleep","1.5"]}}))
            .await;
        wait_for("long job running", Duration::from_secs(10), || async {
            state_is(&c, "citadel:jobs:job:long", "running").await
        })
        .await;
        let asked = Instant::now();
        let s = w.stop().await;
        assert!(asked.elapsed() < Duration::from_secs(3), "{:?}", asked.elapsed());
        assert_eq!(s.abandoned, 1);
        assert_eq!(pending_count(&c, Q, G).await, 1, "abandoned job stays pending");

        // ...and it is taken over at once by the next worker, not after claim_idle (60 s).
        let w = spawn_worker(slow_claim("w3"), Arc::new(NoMesh));
        wait_for("abandoned job finished by w3", Duration::from_secs(8), || async {
            state_is(&c, "citadel:jobs:job:long", "succeeded").await
        })
        .await;
        let h = hgetall(&c, "citadel:jobs:job:long").await;
        assert_eq!((h["worker"].as_str(), h["attempts"].as_str()), ("w3", "2"));
        w.stop().await;
        assert_eq!(pending_count(&c, Q, G).await, 0);
    })
    .await;
}

/// Routes 100.64/10 to loopback ports and records every address it was asked to dial.
struct RecordingDialer {
    dialed: Mutex<Vec<SocketAddr>>,
}

impl Dial for RecordingDialer {
    fn is_mesh_addr(&self, ip: std::net::IpAddr) -> bool {
        is_mesh_ip(ip)
    }
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
        let mesh = host.parse().ok().filter(|ip| is_mesh_ip(*ip));
        if let Some(ip) = mesh {
            self.dialed.lock().expect("lock").push(SocketAddr::new(ip, port));
        }
        Box::pin(async move {
            if mesh.is_none() {
                return NoMesh.connect_tcp(host, port).await;
            }
            let s = TcpStream::connect(("127.0.0.1", port)).await?;
            Ok(Box::new(s) as Box<dyn citadel_work::AsyncReadWrite>)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_fetch_outside_the_mesh_is_refused_after_resolution() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        // A listener the refused jobs point at: it must never see a connection.
        let trap = StdListener::bind("127.0.0.1:0").expect("bind");
        trap.set_nonblocking(true).expect("nonblocking");
        let p = trap.local_addr().expect("addr").port();
        for (id, url) in [
            ("lo", format!("http://127.0.0.1:{p}/")),
            ("mapped", format!("http://[::ffff:127.0.0.1]:{p}/")),
            ("name", format!("http://localhost:{p}/")),
        ] {
            enqueue(&c, Q, serde_json::json!({"id": id, "type": "HTTP_FETCH", "payload": {"url": url}})).await;
        }
        let mut conf = cfg(&redis.url(), "w1");
        conf.max_retries = 1;
        conf.job_timeout = Duration::from_secs(3);
        let w = spawn_worker(conf, Arc::new(NoMesh));
        wait_for("three dead letters", Duration::from_secs(15), || async {
            int(&c, &["XLEN", "citadel:jobs:dead"]).await == 3
        })
        .await;
        for d in xrange(&c, "citadel:jobs:dead").await {
            assert!(d["reason"].contains("--allow-fetch"), "{}: {}", d["jobId"], d["reason"]);
        }
        assert!(
            matches!(trap.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a refused fetch connected"
        );
        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_entry_is_dead_lettered_quickly() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(60), async {
        let c = client(&redis.url()).await;
        const FIELDS: usize = 200_000;
        let mut args: Vec<String> = vec!["XADD".into(), Q.into(), "*".into(), "jobId".into(), "huge".into()];
        for i in 0..FIELDS {
            args.push(format!("f{i}"));
            args.push("v".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.cmd(&args).await.expect("XADD");
        let started = Instant::now();
        let w = spawn_worker(cfg(&redis.url(), "w1"), Arc::new(NoMesh));
        wait_for("the dead letter", Duration::from_secs(20), || async {
            int(&c, &["XLEN", "citadel:jobs:dead"]).await == 1
        })
        .await;
        let took = started.elapsed();
        let dead = xrange(&c, "citadel:jobs:dead").await;
        assert_eq!(dead[0]["jobId"], "huge");
        assert!(dead[0]["reason"].contains("too large"), "{}", dead[0]["reason"]);
        assert!(dead[0].len() < 20, "the dead letter copied {} fields", dead[0].len());
        // Generous: the suite's other tests share the cores (a cold CI run took 2.4 s here).
        // The scanner's linearity has its own unit test; this bound catches a worker that
        // stalls on the entry.
        assert!(took < Duration::from_secs(8), "took {took:?}");
        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_addresses_are_dialed_through_the_mesh() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let http = http_server("over the mesh").await;
        let dialer = Arc::new(RecordingDialer { dialed: Mutex::new(Vec::new()) });
        // Redis itself is addressed by a mesh IP too.
        let mesh_redis = format!("redis://100.64.0.7:{}", redis.port);
        let c = client(&redis.url()).await;
        enqueue(
            &c,
            Q,
            serde_json::json!({"id":"m","type":"HTTP_FETCH","payload":{"url":format!("http://100.64.1.2:{}/m", http.port())}}),
        )
        .await;
        enqueue(
            &c,
            Q,
            serde_json::json!({"id":"d","type":"HTTP_FETCH","payload":{"url":format!("http://127.0.0.1:{}/d", http.port())}}),
        )
        .await;
        let mut conf = cfg(&mesh_redis, "w1");
        conf.allow_fetch = vec!["127.0.0.1/32".parse().expect("cidr")];
        let w = spawn_worker(conf, dialer.clone());
        wait_for("both fetches", Duration::from_secs(15), || async {
            state_is(&c, "citadel:jobs:job:m", "succeeded").await
                && state_is(&c, "citadel:jobs:job:d", "succeeded").await
        })
        .await;
        w.stop().await;
        assert_eq!(hgetall(&c, "citadel:jobs:job:m").await["via"], "mesh");
        assert_eq!(hgetall(&c, "citadel:jobs:job:d").await["via"], "direct");
        let body: String = xrange(&c, "citadel:jobs:job:m:events")
            .await
            .iter()
            .filter(|e| e["type"] == "output")
            .map(|e| e["data"].clone())
            .collect();
        assert_eq!(body, "over the mesh");
        let dialed = dialer.dialed.lock().expect("lock").clone();
        let http_mesh: SocketAddr = format!("100.64.1.2:{}", http.port()).parse().expect("addr");
        let redis_mesh: SocketAddr = format!("100.64.0.7:{}", redis.port).parse().expect("addr");
        assert!(dialed.contains(&http_mesh), "{dialed:?}");
        assert!(dialed.contains(&redis_mesh), "{dialed:?}");
        assert!(dialed.iter().all(|a| is_mesh_ip(a.ip())), "only mesh addresses dialed via mesh: {dialed:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_errors_are_clear_bounded_and_redacted() {
    bounded(Duration::from_secs(20), async {
        // A port with nothing listening.
        let port = StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("probe").port();
        let started = Instant::now();
        let err =
            run(cfg(&format!("redis://:hunter2@127.0.0.1:{port}"), "w"), Arc::new(NoMesh), std::future::pending())
                .await
                .expect_err("nothing listens there");
        assert!(started.elapsed() < Duration::from_secs(10));
        let msg = err.to_string();
        assert!(matches!(err, WorkError::RedisUnreachable { .. }), "{msg}");
        assert!(!msg.contains("hunter2") && msg.contains("***"), "{msg}");

        let err = run(cfg("redis://:hunter2@host:badport", "w"), Arc::new(NoMesh), std::future::pending())
            .await
            .expect_err("bad url");
        assert!(!err.to_string().contains("hunter2"), "{err}");

        let mut bad = cfg("redis://127.0.0.1:1", "w");
        bad.max_concurrency = 0;
        assert!(matches!(run(bad, Arc::new(NoMesh), std::future::pending()).await, Err(WorkError::Config(_))));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_kill_the_whole_process_group() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(30), async {
        let c = client(&redis.url()).await;
        let dir = tempfile::tempdir().expect("tmp");
        let pidfile = dir.path().join("bg.pid");
        let script = format!("echo started; sleep 30 & echo $! > {}; wait", pidfile.display());
        let mut conf = cfg(&redis.url(), "w1");
        conf.max_retries = 1;
        let w = spawn_worker(conf, Arc::new(NoMesh));
        enqueue(
            &c,
            Q,
            serde_json::json!({"id":"t","type":"SHELL_COMMAND","payload":{"argv":["sh","-c",script],"timeout_secs":0.5}}),
        )
        .await;
        wait_for("timed-out job dead-lettered", Duration::from_secs(10), || async {
            state_is(&c, "citadel:jobs:job:t", "dead").await
        })
        .await;
        let h = hgetall(&c, "citadel:jobs:job:t").await;
        assert!(h["error"].contains("timed out"), "{}", h["error"]);
        let out: String = xrange(&c, "citadel:jobs:job:t:events")
            .await
            .iter()
            .filter(|e| e["type"] == "output")
            .map(|e| e["data"].clone())
            .collect();
        assert_eq!(out, "started\n", "output before the timeout is kept");
        let pid = std::fs::read_to_string(&pidfile).expect("pid file");
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.trim()));
        wait_for("background grandchild killed", Duration::from_secs(5), || {
            let gone = !proc_dir.exists()
                || std::fs::read_to_string(proc_dir.join("stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true);
            async move { gone }
        })
        .await;
        w.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_survives_a_redis_restart() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    bounded(Duration::from_secs(40), async {
        let w = spawn_worker(cfg(&redis.url(), "w1"), Arc::new(NoMesh));
        {
            let c = client(&redis.url()).await;
            enqueue(&c, Q, serde_json::json!({"id":"before","type":"SHELL_COMMAND","payload":{"argv":["true"]}})).await;
            wait_for("first job", Duration::from_secs(10), || async {
                state_is(&c, "citadel:jobs:job:before", "succeeded").await
            })
            .await;
        }
        // Restart without persistence: the stream and the group are gone afterwards.
        redis.restart();
        let c = client(&redis.url()).await;
        enqueue(&c, Q, serde_json::json!({"id":"after","type":"SHELL_COMMAND","payload":{"argv":["true"]}})).await;
        wait_for("job after restart", Duration::from_secs(20), || async {
            state_is(&c, "citadel:jobs:job:after", "succeeded").await
        })
        .await;
        let s = w.stop().await;
        assert_eq!(s.succeeded, 2);
    })
    .await;
}
