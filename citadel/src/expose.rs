//! Exposing local services on the mesh: `citadel up --expose MESH_PORT[=HOST:PORT]` accepts
//! connections (or datagrams, with a `udp:` prefix) on a port of the node's mesh addresses and
//! forwards each to a service on the host. The data plane's packet filter runs before any of
//! this, so the policy still decides which peers may connect.

use crate::dataplane::netstack::MTU;
use crate::dataplane::{DataPlane, MeshTcpStream, MeshUdpSocket};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connections forwarded at once per exposed TCP port; more wait in the mesh backlog.
pub const MAX_CONNS_PER_PORT: usize = 1024;
/// UDP flows (distinct mesh senders) tracked per exposed UDP port; the least recently used
/// one is closed to make room.
pub const MAX_UDP_FLOWS: usize = 256;
/// A UDP flow with no datagram either way for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Bound on connecting to the local service.
pub const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP (`udp:` prefix).
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One `--expose` entry: a mesh port and the local service behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeSpec {
    /// TCP or UDP.
    pub proto: Proto,
    /// Port on the node's mesh addresses.
    pub mesh_port: u16,
    /// Local service, `HOST:PORT` (a name is resolved when a connection arrives).
    pub target: String,
}

/// Why an `--expose` value or an expose request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExposeError {
    /// The text is not `[udp:|tcp:]MESH_PORT[=HOST:PORT]`.
    #[error("bad expose {text:?}: {why} (expected [udp:]MESH_PORT[=HOST:PORT])")]
    Syntax {
        /// What was given.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The mesh port already has a listener (an expose, or the embedding program's).
    #[error("{proto} mesh port {port} is already in use")]
    InUse {
        /// Transport.
        proto: Proto,
        /// Mesh port.
        port: u16,
    },
    /// Nothing is exposed on that port.
    #[error("nothing is exposed on {proto} mesh port {port}")]
    NotExposed {
        /// Transport.
        proto: Proto,
        /// Mesh port.
        port: u16,
    },
    /// The node runs without a data plane.
    #[error("this node runs without a data plane")]
    NoDataPlane,
    /// The data plane refused the listener for another reason.
    #[error("cannot listen on {proto} mesh port {port}: {message}")]
    Listen {
        /// Transport.
        proto: Proto,
        /// Mesh port.
        port: u16,
        /// The I/O error.
        message: String,
    },
}

/// Splits `host:port` / `[v6]:port`, checking the port.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty() && port != 0 && !host.contains(char::is_whitespace)).then_some((host, port))
}

impl FromStr for ExposeSpec {
    type Err = ExposeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why| ExposeError::Syntax { text: text.to_string(), why };
        let (proto, rest) = if let Some(r) = text.strip_prefix("udp:") {
            (Proto::Udp, r)
        } else if let Some(r) = text.strip_prefix("tcp:") {
            (Proto::Tcp, r)
        } else {
            (Proto::Tcp, text)
        };
        let (port, target) = match rest.split_once('=') {
            Some((p, t)) => (p, Some(t)),
            None => (rest, None),
        };
        let mesh_port: u16 = port.trim().parse().map_err(|_| bad("mesh port is not a number 1-65535"))?;
        if mesh_port == 0 {
            return Err(bad("mesh port 0"));
        }
        let target = match target {
            None => format!("127.0.0.1:{mesh_port}"),
            Some(t) => {
                let t = t.trim();
                if let Ok(p) = t.parse::<u16>() {
                    // `=PORT` alone means a loopback port.
                    if p == 0 {
                        return Err(bad("target port 0"));
                    }
                    format!("127.0.0.1:{p}")
                } else {
                    split_host_port(t).ok_or_else(|| bad("target is not HOST:PORT"))?;
                    t.to_string()
                }
            }
        };
        Ok(ExposeSpec { proto, mesh_port, target })
    }
}

impl fmt::Display for ExposeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.proto == Proto::Udp {
            f.write_str("udp:")?;
        }
        write!(f, "{}={}", self.mesh_port, self.target)
    }
}

/// One exposed port as `status` and `expose list` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposeInfo {
    /// `tcp` or `udp`.
    pub proto: Proto,
    /// Port on the mesh addresses.
    pub mesh_port: u16,
    /// Local service.
    pub target: String,
    /// Connections (TCP) or flows (UDP) accepted so far.
    pub accepted: u64,
    /// Connections or flows open now.
    pub active: u64,
    /// Connections the local service refused or did not answer in time.
    pub failed: u64,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    active: AtomicU64,
    failed: AtomicU64,
}

struct Entry {
    spec: ExposeSpec,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The set of exposed ports of one node. Removing an entry stops accepting on its port;
/// connections already forwarded run until either side closes them.
pub struct Exposer {
    dp: Arc<DataPlane>,
    entries: Mutex<BTreeMap<(Proto, u16), Entry>>,
}

impl fmt::Debug for Exposer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exposer").field("exposes", &self.list()).finish_non_exhaustive()
    }
}

impl Exposer {
    /// An empty set on `dp`.
    pub fn new(dp: Arc<DataPlane>) -> Self {
        Exposer { dp, entries: Mutex::new(BTreeMap::new()) }
    }

    /// Starts forwarding `spec.mesh_port` to `spec.target`.
    ///
    /// # Errors
    /// The port is already exposed or listened on.
    pub fn add(&self, spec: ExposeSpec) -> Result<(), ExposeError> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let key = (spec.proto, spec.mesh_port);
        if entries.contains_key(&key) {
            return Err(ExposeError::InUse { proto: spec.proto, port: spec.mesh_port });
        }
        let listen_err = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::AddrInUse => ExposeError::InUse { proto: spec.proto, port: spec.mesh_port },
            _ => ExposeError::Listen { proto: spec.proto, port: spec.mesh_port, message: e.to_string() },
        };
        let stats = Arc::new(Stats::default());
        let task = match spec.proto {
            Proto::Tcp => {
                let l = self.dp.listen_tcp(spec.mesh_port).map_err(listen_err)?;
                tokio::spawn(serve_tcp(l, spec.target.clone(), stats.clone()))
            }
            Proto::Udp => {
                let s = self.dp.bind_udp(spec.mesh_port).map_err(listen_err)?;
                tokio::spawn(serve_udp(s, spec.target.clone(), stats.clone()))
            }
        };
        tracing::info!(expose = %spec, "exposing a local service on the mesh");
        entries.insert(key, Entry { spec, stats, task });
        Ok(())
    }

    /// Stops exposing `port`.
    ///
    /// # Errors
    /// Nothing is exposed there.
    pub fn remove(&self, proto: Proto, port: u16) -> Result<(), ExposeError> {
        let removed = self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(&(proto, port));
        match removed {
            Some(e) => {
                tracing::info!(expose = %e.spec, "no longer exposed");
                Ok(())
            }
            None => Err(ExposeError::NotExposed { proto, port }),
        }
    }

    /// What is exposed, by protocol then port.
    pub fn list(&self) -> Vec<ExposeInfo> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .values()
            .map(|e| ExposeInfo {
                proto: e.spec.proto,
                mesh_port: e.spec.mesh_port,
                target: e.spec.target.clone(),
                accepted: e.stats.accepted.load(Relaxed),
                active: e.stats.active.load(Relaxed),
                failed: e.stats.failed.load(Relaxed),
            })
            .collect()
    }
}

/// Decrements `active` when a forwarded connection or flow ends.
struct ActiveGuard(Arc<Stats>);

impl ActiveGuard {
    fn new(s: &Arc<Stats>) -> Self {
        s.accepted.fetch_add(1, Relaxed);
        s.active.fetch_add(1, Relaxed);
        ActiveGuard(s.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

async fn serve_tcp(l: crate::dataplane::MeshTcpListener, target: String, stats: Arc<Stats>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNS_PER_PORT));
    loop {
        // Waiting for a permit before accepting leaves further connections in the backlog.
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let (conn, from) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(port = l.port(), "expose listener stopped: {e}");
                return;
            }
        };
        let target = target.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _active = ActiveGuard::new(&stats);
            forward_tcp(conn, from, &target, &stats).await;
        });
    }
}

async fn forward_tcp(mut conn: MeshTcpStream, from: SocketAddr, target: &str, stats: &Stats) {
    let local = tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await;
    let mut local = match local {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.failed.fetch_add(1, Relaxed);
            tracing::info!(%from, %target, "exposed service refused the connection: {e}");
            return;
        }
        Err(_) => {
            stats.failed.fetch_add(1, Relaxed);
            tracing::info!(%from, %target, "exposed service did not answer within {LOCAL_CONNECT_TIMEOUT:?}");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    tracing::debug!(%from, %target, "forwarding a mesh connection");
    let _ = crate::copy::both_ways(&mut conn, &mut local).await;
}

/// One mesh sender's datagrams go through their own local socket, so the service's answers
/// can be told apart and sent back to the right peer.
struct Flow {
    sock: Arc<tokio::net::UdpSocket>,
    last: tokio::time::Instant,
    task: tokio::task::JoinHandle<()>,
    _active: ActiveGuard,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_udp(sock: MeshUdpSocket, target: String, stats: Arc<Stats>) {
    let sock = Arc::new(sock);
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    // What comes out of the mesh fits its MTU.
    let mut buf = vec![0u8; MTU];
    let mut sweep = tokio::time::interval(UDP_IDLE / 4);
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => continue,
                Err(e) => {
                    tracing::debug!(port = sock.port(), "expose UDP socket stopped: {e}");
                    return;
                }
            },
            _ = sweep.tick() => {
                let now = tokio::time::Instant::now();
                flows.retain(|_, f| now.duration_since(f.last) < UDP_IDLE && !f.task.is_finished());
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        if !flows.contains_key(&from) {
            if flows.len() >= MAX_UDP_FLOWS {
                if let Some(oldest) = flows.iter().min_by_key(|(_, f)| f.last).map(|(a, _)| *a) {
                    flows.remove(&oldest);
                }
            }
            match open_flow(&sock, from, &target, &stats).await {
                Ok(f) => {
                    flows.insert(from, f);
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Relaxed);
                    tracing::info!(%from, %target, "cannot reach the exposed UDP service: {e}");
                    continue;
                }
            }
        }
        if let Some(f) = flows.get_mut(&from) {
            f.last = now;
            let _ = f.sock.send(&buf[..n]).await;
        }
    }
}

async fn open_flow(
    mesh: &Arc<MeshUdpSocket>,
    from: SocketAddr,
    target: &str,
    stats: &Arc<Stats>,
) -> std::io::Result<Flow> {
    let dst = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{target} has no address")))?;
    let bind: SocketAddr = if dst.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let local = Arc::new(tokio::net::UdpSocket::bind(bind).await?);
    local.connect(dst).await?;
    let (mesh, back) = (mesh.clone(), local.clone());
    let task = tokio::spawn(async move {
        // One flow per peer address, each with this buffer: the mesh's MTU, not 64 KiB. A
        // datagram that does not fit cannot be carried either (its UDP payload would not fit
        // an MTU-sized packet): cut to the buffer, it is still too large and the send drops it.
        let mut buf = vec![0u8; MTU];
        while let Ok(n) = back.recv(&mut buf).await {
            let _ = mesh.send_to(&buf[..n], from).await;
        }
    });
    Ok(Flow { sock: local, last: tokio::time::Instant::now(), task, _active: ActiveGuard::new(stats) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_expose_specs() {
        let p = |s: &str| s.parse::<ExposeSpec>();
        assert_eq!(p("22").unwrap(), ExposeSpec { proto: Proto::Tcp, mesh_port: 22, target: "127.0.0.1:22".into() });
        assert_eq!(
            p("80=127.0.0.1:8080").unwrap(),
            ExposeSpec { proto: Proto::Tcp, mesh_port: 80, target: "127.0.0.1:8080".into() }
        );
        assert_eq!(p("80=8080").unwrap().target, "127.0.0.1:8080");
        assert_eq!(
            p("udp:53").unwrap(),
            ExposeSpec { proto: Proto::Udp, mesh_port: 53, target: "127.0.0.1:53".into() }
        );
        assert_eq!(p("udp:5353=[::1]:53").unwrap().target, "[::1]:53");
        assert_eq!(p("tcp:443=localhost:8443").unwrap().target, "localhost:8443");
        for bad in
            ["", "0", "70000", "udp:", "x", "80=", "80=host", "80=host:0", "80=:80", "80=a b:1", "sctp:1", "80=0"]
        {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        let s = p("udp:53=10.0.0.1:5353").unwrap();
        assert_eq!(s.to_string().parse::<ExposeSpec>().unwrap(), s);
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        let e = "80=host".parse::<ExposeSpec>().unwrap_err().to_string();
        assert!(e.contains("HOST:PORT") && e.contains("80=host"), "{e}");
    }
}
