//! Local proxies into the mesh for programs that know nothing about it: a SOCKS5 server
//! ([`socks5`], RFC 1928 with RFC 1929 user/password auth) and an HTTP proxy ([`http`],
//! `CONNECT` and absolute-URI requests), as tailscaled's userspace mode offers.
//!
//! Names are resolved against the mesh first (short names, FQDNs, mesh IPs). A destination
//! outside the mesh is refused (SOCKS reply 0x02, HTTP 403) unless the listener was started
//! with direct egress allowed. Listeners bind to loopback; another address needs an explicit
//! opt-in and credentials, so the proxy never becomes an open relay into the mesh.

pub mod http;
pub mod socks5;

use crate::dataplane::DataPlane;
use crate::net::{AsyncReadWrite, BoxFuture};
use crate::netmap::{short_name, NetMap};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Default bound on a client's handshake (greeting, auth and request, or the HTTP request head).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on opening the connection to the destination.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Client connections served at once per listener; more wait in the OS backlog.
pub const MAX_CLIENTS: usize = 1024;

/// A destination host as a client names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// An IP literal.
    Ip(IpAddr),
    /// A name (mesh short name, FQDN, or a name for the host resolver).
    Name(String),
}

impl Host {
    /// Parses a host as it appears in a request: an IP literal (IPv6 with or without
    /// brackets) or a name.
    pub fn parse(s: &str) -> Host {
        let bare = s.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(s);
        match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(s.trim_end_matches('.').to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Where a proxied connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the mesh to this address.
    Mesh(SocketAddr),
    /// Over the host network (only with direct egress allowed).
    Direct(Host, u16),
}

/// Why a destination was refused before any packet was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Outside the mesh, and direct egress is off.
    #[error("{0} is not in the mesh (direct egress is off)")]
    NotInMesh(String),
}

/// The mesh side a proxy needs: name resolution, the mesh address test and dialing.
pub trait Backend: Send + Sync + 'static {
    /// A peer's mesh IP for a short name or FQDN (lower case, no trailing dot).
    fn resolve_name(&self, name: &str) -> Option<IpAddr>;
    /// True when `ip` is reached through the mesh.
    fn is_mesh_ip(&self, ip: IpAddr) -> bool;
    /// Opens a TCP connection through the mesh.
    fn dial_mesh(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn AsyncReadWrite>>>;
    /// Binds a UDP socket on the node's mesh addresses (for SOCKS5 UDP ASSOCIATE).
    fn bind_mesh_udp(&self) -> io::Result<Box<dyn crate::net::Datagram>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "no mesh UDP"))
    }
    /// Opens a TCP connection over the host network (used only with direct egress allowed).
    fn dial_direct<'a>(&'a self, host: &'a Host, port: u16) -> BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>> {
        Box::pin(async move {
            let s = match host {
                Host::Ip(ip) => tokio::net::TcpStream::connect((*ip, port)).await?,
                Host::Name(n) => tokio::net::TcpStream::connect((n.as_str(), port)).await?,
            };
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }
}

/// Decides where `host:port` goes: the mesh first, the host network only when allowed.
///
/// # Errors
/// [`Refused::NotInMesh`] for a destination outside the mesh without direct egress.
pub fn route(backend: &dyn Backend, host: &Host, port: u16, allow_direct: bool) -> Result<Route, Refused> {
    let mesh_ip = match host {
        Host::Ip(ip) => backend.is_mesh_ip(*ip).then_some(*ip),
        Host::Name(n) => backend.resolve_name(n),
    };
    match mesh_ip {
        Some(ip) => Ok(Route::Mesh(SocketAddr::new(ip, port))),
        None if allow_direct => Ok(Route::Direct(host.clone(), port)),
        None => Err(Refused::NotInMesh(host.to_string())),
    }
}

/// Opens the connection a [`Route`] names, bounded by [`DIAL_TIMEOUT`].
pub(crate) async fn dial(backend: &dyn Backend, r: &Route) -> io::Result<Box<dyn AsyncReadWrite>> {
    let fut = match r {
        Route::Mesh(a) => backend.dial_mesh(*a),
        Route::Direct(h, p) => backend.dial_direct(h, *p),
    };
    match tokio::time::timeout(DIAL_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")),
    }
}

/// A user name and password (RFC 1929 for SOCKS5, Basic for HTTP).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    // By hand so the password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` (the password may contain `:`).
    pub fn parse(s: &str) -> Option<Credentials> {
        let (u, p) = s.split_once(':')?;
        (!u.is_empty() && !p.is_empty() && u.len() <= 255 && p.len() <= 255)
            .then(|| Credentials { user: u.to_string(), password: p.to_string() })
    }

    /// Compares without an early exit on the first differing byte.
    pub fn matches(&self, user: &[u8], password: &[u8]) -> bool {
        fn eq(a: &[u8], b: &[u8]) -> bool {
            let mut diff = (a.len() != b.len()) as u8;
            for (i, x) in a.iter().enumerate() {
                diff |= x ^ b.get(i).copied().unwrap_or(!x);
            }
            diff == 0
        }
        eq(self.user.as_bytes(), user) & eq(self.password.as_bytes(), password)
    }
}

/// Which proxy a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// SOCKS5.
    Socks5,
    /// HTTP proxy.
    HttpProxy,
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyKind::Socks5 => "socks5",
            ProxyKind::HttpProxy => "http-proxy",
        })
    }
}

/// How a proxy listener behaves.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Required credentials, if any.
    pub auth: Option<Credentials>,
    /// Let destinations outside the mesh through over the host network.
    pub allow_direct: bool,
    /// Allow a non-loopback listen address (credentials are still required for one).
    pub allow_non_loopback: bool,
    /// Bound on the client's handshake or request head.
    pub handshake_timeout: Duration,
}

impl ProxyConfig {
    /// A loopback-only, mesh-only, no-auth listener on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        ProxyConfig {
            listen,
            auth: None,
            allow_direct: false,
            allow_non_loopback: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// Why a proxy listener did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// A non-loopback address without the explicit opt-in.
    #[error(
        "refusing to listen on {addr}: not a loopback address (pass --proxy-allow-non-loopback and set credentials)"
    )]
    NonLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// A non-loopback address without credentials.
    #[error("refusing to listen on {addr} without credentials (set CITADEL_PROXY_AUTH=USER:PASSWORD)")]
    NoAuth {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The OS refused the listen address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The node runs without a data plane.
    #[error("this node runs without a data plane")]
    NoDataPlane,
}

/// Checks the bind rule: loopback, or an explicit opt-in with credentials.
///
/// # Errors
/// [`ProxyError::NonLoopback`] or [`ProxyError::NoAuth`].
pub fn check_listen(cfg: &ProxyConfig) -> Result<(), ProxyError> {
    let addr = cfg.listen;
    let loopback = match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    };
    if loopback {
        return Ok(());
    }
    if !cfg.allow_non_loopback {
        return Err(ProxyError::NonLoopback { addr });
    }
    if cfg.auth.is_none() {
        return Err(ProxyError::NoAuth { addr });
    }
    Ok(())
}

/// A proxy listener as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// `socks5` or `http-proxy`.
    pub kind: ProxyKind,
    /// Bound address.
    pub addr: String,
    /// Credentials are required.
    pub auth: bool,
    /// Destinations outside the mesh are let through.
    pub allow_direct: bool,
}

/// A running proxy listener; dropping it stops accepting (open connections run on).
#[derive(Debug)]
pub struct ProxyListener {
    info: ListenerInfo,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProxyListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ProxyListener {
    /// Binds `cfg.listen` (after [`check_listen`]) and serves `kind` on it.
    ///
    /// # Errors
    /// The bind rule or the OS refused the address.
    pub async fn start(kind: ProxyKind, cfg: ProxyConfig, backend: Arc<dyn Backend>) -> Result<Self, ProxyError> {
        check_listen(&cfg)?;
        let l = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ProxyError::Bind { addr: cfg.listen, source })?;
        let addr = l.local_addr().map_err(|source| ProxyError::Bind { addr: cfg.listen, source })?;
        let info =
            ListenerInfo { kind, addr: addr.to_string(), auth: cfg.auth.is_some(), allow_direct: cfg.allow_direct };
        tracing::info!(%kind, %addr, auth = info.auth, allow_direct = cfg.allow_direct, "proxy listening");
        let task = tokio::spawn(accept_loop(l, kind, Arc::new(cfg), backend));
        Ok(ProxyListener { info, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.info.addr.parse().expect("formatted from a SocketAddr")
    }

    /// What `status` shows.
    pub fn info(&self) -> &ListenerInfo {
        &self.info
    }
}

async fn accept_loop(l: tokio::net::TcpListener, kind: ProxyKind, cfg: Arc<ProxyConfig>, backend: Arc<dyn Backend>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else { return };
        let (s, from) = match l.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(%kind, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let (cfg, backend) = (cfg.clone(), backend.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let r = match kind {
                ProxyKind::Socks5 => {
                    let ends = s.local_addr().ok().map(|local| socks5::Ends { local, peer: from });
                    socks5::serve_with(s, ends, &*backend, &cfg).await
                }
                ProxyKind::HttpProxy => http::serve(s, &*backend, &cfg).await,
            };
            if let Err(e) = r {
                tracing::debug!(%kind, %from, "proxy client: {e}");
            }
        });
    }
}

/// Copies both ways until both sides are done, after sending `early` (bytes the client sent
/// right behind its request) to the destination.
pub(crate) async fn splice<C, D>(client: &mut C, dest: &mut D, early: &[u8]) -> io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncWriteExt;
    if !early.is_empty() {
        dest.write_all(early).await?;
    }
    crate::copy::both_ways(client, dest).await.map(|_| ())
}

/// The mesh a proxy runs against: the node's data plane and its netmap.
pub struct MeshBackend {
    dp: Arc<DataPlane>,
    netmap: watch::Receiver<NetMap>,
}

impl fmt::Debug for MeshBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshBackend").finish_non_exhaustive()
    }
}

impl MeshBackend {
    /// A backend on `dp` resolving names from `netmap`.
    pub fn new(dp: Arc<DataPlane>, netmap: watch::Receiver<NetMap>) -> Self {
        MeshBackend { dp, netmap }
    }
}

/// A peer's mesh IP (IPv4 preferred) for a short name or FQDN, case-insensitively.
pub fn resolve_in(nm: &NetMap, name: &str) -> Option<IpAddr> {
    let want = name.trim_end_matches('.');
    let node = nm.peers.values().find(|p| {
        short_name(p).eq_ignore_ascii_case(want) || p.name.trim_end_matches('.').eq_ignore_ascii_case(want)
    })?;
    let mut ips: Vec<IpAddr> = node.addresses.iter().filter_map(|a| a.split('/').next()?.parse().ok()).collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.first().copied()
}

impl Backend for MeshBackend {
    fn resolve_name(&self, name: &str) -> Option<IpAddr> {
        resolve_in(&self.netmap.borrow(), name)
    }

    fn is_mesh_ip(&self, ip: IpAddr) -> bool {
        // Before borrowing the netmap: the data plane may apply a newer one from it.
        if crate::addr::is_mesh_ip(ip) || self.dp.routes_to(ip) {
            return true;
        }
        let nm = self.netmap.borrow();
        nm.peers.values().any(|p| p.addresses.iter().any(|a| a.split('/').next() == Some(&ip.to_string())))
    }

    fn dial_mesh(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn AsyncReadWrite>>> {
        Box::pin(async move {
            let s = self.dp.dial_tcp_timeout(addr, DIAL_TIMEOUT).await?;
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }

    fn bind_mesh_udp(&self) -> io::Result<Box<dyn crate::net::Datagram>> {
        Ok(Box::new(MeshDatagram(self.dp.bind_udp(0)?)))
    }
}

/// A mesh UDP socket behind the [`crate::net::Datagram`] trait.
struct MeshDatagram(crate::dataplane::MeshUdpSocket);

impl crate::net::Datagram for MeshDatagram {
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(self.0.recv_from(buf))
    }
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(self.0.send_to(buf, to))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([0, 0, 0, 0], self.0.port())))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fake mesh for the proxy tests: names map to loopback ports' IPs, and a direct dial is
    //! recorded (and never reaches the network).
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    pub(crate) struct FakeMesh {
        pub names: HashMap<String, IpAddr>,
        pub mesh_ips: Vec<IpAddr>,
        pub direct_dials: Mutex<Vec<String>>,
    }

    impl Backend for FakeMesh {
        fn resolve_name(&self, name: &str) -> Option<IpAddr> {
            self.names.get(name).copied()
        }
        fn is_mesh_ip(&self, ip: IpAddr) -> bool {
            self.mesh_ips.contains(&ip)
        }
        fn dial_mesh(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn AsyncReadWrite>>> {
            Box::pin(async move {
                assert!(addr.ip().is_loopback(), "the fake mesh dials only loopback");
                let s = tokio::net::TcpStream::connect(addr).await?;
                Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
            })
        }
        fn bind_mesh_udp(&self) -> io::Result<Box<dyn crate::net::Datagram>> {
            let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            Ok(Box::new(tokio::net::UdpSocket::from_std(s)?))
        }
        fn dial_direct<'a>(&'a self, host: &'a Host, port: u16) -> BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>> {
            self.direct_dials.lock().unwrap().push(format!("{host}:{port}"));
            Box::pin(async { Err(io::Error::new(io::ErrorKind::ConnectionRefused, "fake direct egress")) })
        }
    }

    /// A fake mesh where `name` (and 127.0.0.1) is a peer.
    pub(crate) fn mesh_with(name: &str) -> FakeMesh {
        let lo: IpAddr = [127, 0, 0, 1].into();
        FakeMesh { names: [(name.to_string(), lo)].into(), mesh_ips: vec![lo], ..Default::default() }
    }

    /// A loopback HTTP/1.1 origin: answers each request of a kept-alive connection with its
    /// request line as the body. Returns its address, the number of connections it accepted,
    /// and every request head it read.
    pub(crate) async fn http_origin() -> (SocketAddr, Arc<Mutex<usize>>, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (conns, heads) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (c2, h2) = (conns.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                *c2.lock().unwrap() += 1;
                let h2 = h2.clone();
                tokio::spawn(async move {
                    let mut s = tokio::io::BufReader::new(s);
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let first = head.lines().next().unwrap_or_default().to_string();
                        h2.lock().unwrap().push(head);
                        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{first}", first.len());
                        if s.get_mut().write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns, heads)
    }

    /// A loopback TCP server answering every connection with `reply` after reading a line.
    pub(crate) async fn line_server(reply: &'static [u8]) -> SocketAddr {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut s = tokio::io::BufReader::new(s);
                    let mut line = String::new();
                    let _ = s.read_line(&mut line).await;
                    let _ = s.get_mut().write_all(reply).await;
                    let _ = s.get_mut().write_all(line.as_bytes()).await;
                });
            }
        });
        addr
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn routes_mesh_first_and_refuses_the_rest() {
        let m = mesh_with("bravo");
        let lo: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(route(&m, &Host::parse("bravo"), 80, false), Ok(Route::Mesh((lo, 80).into())));
        assert_eq!(route(&m, &Host::parse("BRAVO."), 80, false), Ok(Route::Mesh((lo, 80).into())));
        assert_eq!(route(&m, &Host::parse("127.0.0.1"), 22, false), Ok(Route::Mesh((lo, 22).into())));
        // Outside the mesh: refused without egress, direct with it. No packet is sent here.
        for outside in ["example.com", "192.0.2.7", "[2001:db8::1]", "localhost"] {
            let h = Host::parse(outside);
            assert_eq!(route(&m, &h, 443, false), Err(Refused::NotInMesh(h.to_string())), "{outside}");
            assert_eq!(route(&m, &h, 443, true), Ok(Route::Direct(h.clone(), 443)), "{outside}");
        }
    }

    #[test]
    fn the_real_backend_resolves_short_names_fqdns_and_mesh_ips() {
        use crate::tailcfg::Node;
        let mut nm = NetMap::default();
        nm.peers.insert(
            7,
            Node {
                id: 7,
                name: "bravo.acme.mesh.".into(),
                addresses: vec!["fd7a:115c:a1e0::7/128".into(), "100.64.0.7/32".into()],
                ..Default::default()
            },
        );
        let ip: IpAddr = "100.64.0.7".parse().unwrap();
        assert_eq!(resolve_in(&nm, "bravo"), Some(ip));
        assert_eq!(resolve_in(&nm, "Bravo.acme.mesh."), Some(ip));
        assert_eq!(resolve_in(&nm, "bravo.acme"), None);
        assert_eq!(resolve_in(&nm, "charlie"), None);
    }

    #[test]
    fn bind_rule_needs_loopback_or_opt_in_with_auth() {
        let mut c = ProxyConfig::new("127.0.0.1:1080".parse().unwrap());
        assert!(check_listen(&c).is_ok());
        c.listen = "[::1]:1080".parse().unwrap();
        assert!(check_listen(&c).is_ok());
        c.listen = "0.0.0.0:1080".parse().unwrap();
        assert!(matches!(check_listen(&c), Err(ProxyError::NonLoopback { .. })));
        c.allow_non_loopback = true;
        assert!(matches!(check_listen(&c), Err(ProxyError::NoAuth { .. })));
        c.auth = Credentials::parse("u:p:w");
        assert!(check_listen(&c).is_ok());
        assert_eq!(c.auth.as_ref().unwrap().password, "p:w");
        assert!(!format!("{:?}", c).contains("p:w"), "password in Debug");
    }

    #[test]
    fn credentials_compare_exactly() {
        let c = Credentials::parse("alice:s3cret").unwrap();
        assert!(c.matches(b"alice", b"s3cret"));
        assert!(!c.matches(b"alice", b"s3cre"));
        assert!(!c.matches(b"alice", b"s3cret!"));
        assert!(!c.matches(b"alicf", b"s3cret"));
        assert!(!c.matches(b"", b""));
        assert!(Credentials::parse("nouser").is_none() && Credentials::parse(":p").is_none());
    }
}
