//! The Redis Streams job worker behind `citadel work`. It reaches Redis and HTTP targets
//! through one byte-stream dialer, a [`Dial`] the caller provides (the CLI's dials mesh
//! addresses through the running node and the rest over the host); this crate knows nothing
//! of the mesh itself, only which addresses the dialer claims for it.
//!
//! [`run`] joins a consumer group on one stream, runs up to `max_concurrency` jobs at a time
//! (`SHELL_COMMAND`, `HTTP_FETCH`), records progress in Redis and acknowledges each job only
//! after its result is written, so delivery is at-least-once:
//!
//! | key | what |
//! | --- | --- |
//! | `<queue>` | the job stream (consumer group `<group>`) |
//! | `<queue>:job:<id>` | status hash: `state` (running/succeeded/failed/dead), `attempts`, `worker`, timestamps, `error`, `exit_code`/`http_status` |
//! | `<queue>:job:<id>:events` | event stream: `type=status state=..` and `type=output stream=stdout/stderr/body data=..` |
//! | `<queue>:dead` | dead-letter stream: the original fields plus `reason`, `attempts`, `original_message_id` |
//!
//! A failed job is left pending; after `claim_idle` any worker (this one included) reclaims it
//! with `XAUTOCLAIM`, and the entry's delivery count is the attempt number. The same path picks
//! up the jobs of a crashed worker. Running jobs refresh their pending entry so they are not
//! reclaimed from under a live worker. A worker that stalls past `claim_idle` anyway (a
//! paused process, a starved machine) loses the entry: every status write and ack runs in a
//! server-side script that first checks the entry is still pending (and, for the start, a
//! failure and the heartbeat, still held by this worker), so a stale delivery never runs a job
//! another worker has taken over and never writes over a recorded result.

#![warn(missing_docs)]

mod client;
mod exec;
pub mod job;
pub mod resp;
mod worker;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use client::{redact_url, RedisClient, RedisError, RedisTarget, UrlError};
pub use resp::Value;
pub use worker::run;

/// Default job stream.
pub const DEFAULT_QUEUE: &str = "citadel:jobs";
/// Default consumer group (the Go agent's default too, so both can share a group).
pub const DEFAULT_GROUP: &str = "citadel-workers";

pub use citadel_proto::dial::{AsyncReadWrite, Dial, DialFuture};

/// A dialer for nodes without a userspace mesh: every address goes over the host network
/// (which still reaches 100.64/10 if a system-wide Tailscale is running).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMesh;

impl Dial for NoMesh {
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect((host, port)).await?;
            // Requests are small and latency-bound; don't let Nagle batch them.
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }
}

pub use ip_network::IpNetwork;

/// Parses an `--allow-fetch` value: a CIDR (`10.0.0.0/8`, `fd00::/8`) or one address.
pub fn parse_network(s: &str) -> Result<IpNetwork, String> {
    let s = s.trim();
    if s.contains('/') {
        s.parse().map_err(|e| format!("{s:?} is not a CIDR network ({e}); the host bits must be zero"))
    } else {
        s.parse::<IpAddr>().map(IpNetwork::from).map_err(|e| format!("{s:?} is not an IP address or CIDR: {e}"))
    }
}

/// Whether an HTTP_FETCH may connect to `ip`: mesh addresses (those the dialer claims) and
/// the `--allow-fetch` networks; everything else (loopback, link-local
/// such as the cloud metadata address, private and public ranges) is refused, so whoever can
/// enqueue a job cannot read services this host reaches. IPv4-mapped IPv6 counts as IPv4.
pub fn fetch_allowed(ip: IpAddr, dialer: &dyn Dial, allow: &[ip_network::IpNetwork]) -> bool {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        v4 => v4,
    };
    dialer.is_mesh_addr(ip) || allow.iter().any(|n| n.contains(ip))
}

/// Connects to `host:port`, through the mesh when the dialer claims the address. Returns the
/// stream and whether it went over the mesh. Tries each resolved address in turn.
pub(crate) async fn dial(dialer: &dyn Dial, host: &str, port: u16) -> io::Result<(Box<dyn AsyncReadWrite>, bool)> {
    dial_filtered(dialer, host, port, |_| true).await
}

/// [`dial`] restricted to the resolved addresses `allowed` accepts (checked after DNS
/// resolution, and the checked address is the one connected to).
pub(crate) async fn dial_filtered(
    dialer: &dyn Dial,
    host: &str,
    port: u16,
    allowed: impl Fn(IpAddr) -> bool,
) -> io::Result<(Box<dyn AsyncReadWrite>, bool)> {
    let (addrs, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        client::resolve(host, port).await?.into_iter().partition(|a| allowed(a.ip()));
    if addrs.is_empty() && !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|a| a.ip().to_string()).collect();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{host} is outside the mesh ({}); allow it on this node with --allow-fetch CIDR", list.join(", ")),
        ));
    }
    let mut last = None;
    for addr in addrs {
        let mesh = dialer.is_mesh_addr(addr.ip());
        let via = if mesh { " via mesh" } else { "" };
        let r = dialer
            .connect_tcp(&addr.ip().to_string(), addr.port())
            .await
            .map(|s| (s, mesh))
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}{via}: {e}")));
        match r {
            Ok(x) => return Ok(x),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
}

/// Settings of one worker. Build with [`WorkConfig::new`] and adjust fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct WorkConfig {
    /// `redis://[user[:password]@]host[:port][/db]`. Never logged with its password.
    pub redis_url: String,
    /// Job stream name.
    pub queue: String,
    /// Consumer group name.
    pub group: String,
    /// This worker's consumer name (unique per process).
    pub consumer: String,
    /// Attempts per job before it is dead-lettered (at least 1).
    pub max_retries: u32,
    /// Jobs run at once (at least 1).
    pub max_concurrency: usize,
    /// Default per-job timeout (a payload's `timeout_secs` overrides it).
    pub job_timeout: Duration,
    /// How long a pending entry must sit idle before XAUTOCLAIM takes it: the retry delay
    /// after a failure, and how quickly a dead worker's jobs move on.
    pub claim_idle: Duration,
    /// On shutdown, how long in-flight jobs may take to finish before they are abandoned
    /// (left pending for another worker).
    pub drain_timeout: Duration,
    /// Deadline for connecting to Redis (each attempt).
    pub connect_timeout: Duration,
    /// How long one XREADGROUP blocks waiting for new jobs.
    pub block: Duration,
    /// Output kept per job stream (stdout, stderr, HTTP body); the rest is counted, not stored.
    pub max_output_bytes: usize,
    /// Expiry of the status hash and event stream of finished jobs (`None`: keep forever).
    pub result_ttl: Option<Duration>,
    /// Run SHELL_COMMAND jobs. Anyone who can XADD to the queue could otherwise run any
    /// program as this user, so the CLI leaves it off unless `--allow-shell` is given;
    /// refused jobs go to the dead-letter stream with the reason.
    pub allow_shell: bool,
    /// Networks outside the mesh that HTTP_FETCH may reach (`--allow-fetch`); none by default.
    pub allow_fetch: Vec<ip_network::IpNetwork>,
}

impl WorkConfig {
    /// Defaults: queue `citadel:jobs`, group `citadel-workers`, consumer `<host>-<pid>` (the
    /// caller names the host), 3 attempts, 4 concurrent jobs, 5 min job timeout, 30 s claim
    /// idle, 30 s drain.
    pub fn new(redis_url: impl Into<String>, host: &str) -> Self {
        WorkConfig {
            redis_url: redis_url.into(),
            queue: DEFAULT_QUEUE.into(),
            group: DEFAULT_GROUP.into(),
            consumer: consumer_name(host),
            max_retries: 3,
            max_concurrency: 4,
            job_timeout: Duration::from_secs(300),
            claim_idle: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            block: Duration::from_secs(5),
            max_output_bytes: 256 * 1024,
            result_ttl: Some(Duration::from_secs(7 * 24 * 3600)),
            allow_shell: false,
            allow_fetch: Vec::new(),
        }
    }
}

impl fmt::Debug for WorkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("queue", &self.queue)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("max_retries", &self.max_retries)
            .field("max_concurrency", &self.max_concurrency)
            .field("job_timeout", &self.job_timeout)
            .field("claim_idle", &self.claim_idle)
            .field("drain_timeout", &self.drain_timeout)
            .field("allow_shell", &self.allow_shell)
            .field("allow_fetch", &self.allow_fetch)
            .finish_non_exhaustive()
    }
}

/// `<host>-<pid>`: unique per process on a host, and readable in `XINFO CONSUMERS`.
pub fn consumer_name(host: &str) -> String {
    format!("{host}-{}", std::process::id())
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkSummary {
    /// Jobs that ran and succeeded (acknowledged).
    pub succeeded: u64,
    /// Attempts that failed and were left pending for a retry.
    pub failed_attempts: u64,
    /// Jobs moved to the dead-letter stream (acknowledged).
    pub dead_lettered: u64,
    /// Entries taken over from idle pending lists via XAUTOCLAIM.
    pub reclaimed: u64,
    /// In-flight jobs cut off by the drain timeout (still pending, will be reclaimed).
    pub abandoned: u64,
    /// Deliveries dropped because another worker had meanwhile claimed the entry or recorded
    /// its result (this worker stalled past `claim_idle`); they wrote no status.
    pub superseded: u64,
}

/// Why [`run`] could not start (or had to stop).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkError {
    /// A setting is unusable.
    #[error("invalid work config: {0}")]
    Config(String),
    /// The Redis URL cannot be parsed (password redacted).
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Redis did not answer within the connect timeout at startup.
    #[error("redis unreachable at {target}: {reason}")]
    RedisUnreachable {
        /// The redacted target.
        target: String,
        /// Why.
        reason: String,
    },
    /// Redis answered but refused setup (e.g. the queue key holds a non-stream value).
    #[error("redis setup failed: {0}")]
    Setup(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_debug_redacts_password() {
        let c = WorkConfig::new("redis://:hunter2@10.0.0.1:6379", "h");
        let d = format!("{c:?}");
        assert!(!d.contains("hunter2") && d.contains("***"), "{d}");
    }
}

#[cfg(test)]
mod fetch_policy_tests {
    use super::*;

    /// Claims one mesh address, like a live mesh would for its peers.
    struct OnePeer(IpAddr);

    impl Dial for OnePeer {
        fn is_mesh_addr(&self, ip: IpAddr) -> bool {
            ip == self.0
        }
        fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
            NoMesh.connect_tcp(host, port)
        }
    }

    #[test]
    fn only_mesh_and_allowed_networks_may_be_fetched() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let refused = [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "fe80::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "::ffff:192.168.1.1",
            "fc00::1",
            "0.0.0.0",
            "::",
            "8.8.8.8",
            "2001:4860:4860::8888",
            "100.128.0.1",
        ];
        for a in refused {
            assert!(!fetch_allowed(ip(a), &NoMesh, &[]), "{a} allowed by default");
        }
        // Without a mesh even tailnet addresses need --allow-fetch.
        assert!(!fetch_allowed(ip("100.64.0.5"), &NoMesh, &[]));
        let peer = OnePeer(ip("100.64.0.5"));
        assert!(fetch_allowed(ip("100.64.0.5"), &peer, &[]) && fetch_allowed(ip("::ffff:100.64.0.5"), &peer, &[]));
        assert!(fetch_allowed(ip("192.0.2.7"), &OnePeer(ip("192.0.2.7")), &[]));
        let allow: Vec<ip_network::IpNetwork> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(fetch_allowed(ip("10.1.2.3"), &NoMesh, &allow));
        assert!(fetch_allowed(ip("::ffff:10.1.2.3"), &NoMesh, &allow));
        assert!(fetch_allowed(ip("fd00::1"), &NoMesh, &allow));
        assert!(!fetch_allowed(ip("169.254.169.254"), &NoMesh, &allow));
        assert!(!fetch_allowed(ip("127.0.0.1"), &NoMesh, &allow));
        assert_eq!(parse_network("127.0.0.1").unwrap(), "127.0.0.1/32".parse::<IpNetwork>().unwrap());
        assert!(parse_network("10.0.0.1/8").is_err() && parse_network("nope").is_err());
    }

    #[test]
    fn shell_jobs_are_off_by_default() {
        assert!(!WorkConfig::new("redis://h", "h").allow_shell);
    }
}
