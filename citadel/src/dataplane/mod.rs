//! The data plane: WireGuard over a userspace TCP/IP stack, on one UDP socket, with no root and
//! no TUN device.
//!
//! Out: app socket → smoltcp ([`netstack`]) → IP packet → route by AllowedIPs → boringtun
//! ([`wg`]) → UDP. In: UDP → boringtun → source check (the sender's AllowedIPs) → packet filter
//! ([`filter`]) → smoltcp → app. The netmap (a `watch` channel) drives peers, routes, the
//! filter and the node's mesh addresses.
//!
//! The protocol pieces ([`filter`], [`route`], [`peers`], [`wg`], [`netstack`]) open no
//! sockets; the tokio driver in this module owns the UDP socket and one task that moves
//! packets between them. The app API mirrors Go's tsnet: [`DataPlane::dial_tcp`],
//! [`DataPlane::listen_tcp`], [`DataPlane::bind_udp`].

pub mod ackfix;
pub mod filter;
pub mod magicsock;
pub mod netstack;
pub mod peers;
mod relay;
pub mod route;
pub mod socket;
pub mod wg;

pub use peers::{PeerRoutes, RoutePrefs};
pub use socket::{MeshTcpListener, MeshTcpStream, MeshUdpSocket};
pub use wg::{Path, PeerStats};

use crate::keys::{DiscoPublic, NodePublic, PrivateKey};
use crate::net::{Datagram, Net, TokioNet};
use crate::netcheck;
use crate::netmap::NetMap;
use crate::tailcfg::DerpMap;
use filter::{InboundFilter, PacketInfo};
use netstack::Stack;
use smoltcp::wire::IpCidr;
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use wg::{Source, Transmit, WgRouter};

/// How long [`DataPlane::dial_tcp`] waits for the peer to answer.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often boringtun's timers run (its own device uses 250 ms).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Datagrams read per wakeup before the stack runs, so bulk traffic is processed in batches.
const RX_BATCH: usize = 128;
/// How often STUN runs again: keeps the NAT mapping fresh and notices a new public address.
const NETCHECK_INTERVAL: Duration = Duration::from_secs(30);
/// When the home DERP connection has been down this long, netcheck runs at once (not at the
/// next interval) so the node re-homes on a relay that answers: until it does, peers that can
/// only relay cannot reach it.
const HOME_DOWN_RECHECK: Duration = Duration::from_secs(3);
/// Relayed packets buffered between the DERP readers and the driver.
const RELAY_INBOX: usize = 1024;

/// What the data plane learned about its own network, for the control server: the endpoints
/// peers may reach it at, and its home DERP region (`Hostinfo.NetInfo.PreferredDERP`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetInfo {
    /// Local interface endpoints, then STUN-mapped public ones.
    pub endpoints: Vec<SocketAddr>,
    /// Home DERP region; 0 until one is picked.
    pub preferred_derp: i32,
    /// The last STUN probe's findings.
    pub report: Option<netcheck::Report>,
    /// Regions with a live DERP connection.
    pub derp_connected: Vec<i32>,
}

/// How to start a data plane.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// The node key: the WireGuard static key.
    pub node_key: PrivateKey,
    /// The disco key (reported to control; discovery messages arrive with DERP/disco).
    pub disco_key: PrivateKey,
    /// Address for the one UDP socket, e.g. `0.0.0.0:0`.
    pub bind: SocketAddr,
}

/// Packets dropped, by reason; all counters only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DataPlaneCounters {
    /// Datagrams that are not well-formed WireGuard messages.
    pub rx_malformed: u64,
    /// Data messages rejected by the replay window (duplicate or too old counter).
    pub rx_replayed: u64,
    /// Messages that failed authentication (bad MAC, AEAD tag, stale handshake, no session).
    pub rx_rejected: u64,
    /// Messages for an index or from a key that no peer in the netmap has.
    pub rx_unknown_peer: u64,
    /// Decrypted packets whose source is outside the sender's AllowedIPs.
    pub rx_spoofed: u64,
    /// Decrypted packets the packet filter refused (no rule, or not addressed to us).
    pub rx_filtered: u64,
    /// Relayed packets and disco messages from peers of another org, dropped by the org guard.
    pub rx_cross_org: u64,
    /// Decrypted packets that are not parseable IP (or are fragments).
    pub rx_bad_ip: u64,
    /// Packets dropped because the netstack's queue was full.
    pub rx_overflow: u64,
    /// Outbound packets for a destination no peer routes.
    pub tx_no_route: u64,
    /// Outbound packets for a peer with no known endpoint.
    pub tx_no_path: u64,
    /// Outbound packets that boringtun refused, or that were not IP.
    pub tx_error: u64,
    /// UDP sends the OS refused.
    pub tx_socket_error: u64,
    /// Incoming TCP ACKs moved onto a full window's edge (see [`ackfix`]); not drops.
    pub tcp_acks_moved: u64,
    /// WireGuard handshakes completed (as initiator or responder).
    pub handshakes: u64,
    /// Disco pings received from peers.
    pub disco_pings_rx: u64,
    /// Disco pongs received from peers.
    pub disco_pongs_rx: u64,
    /// DERP logins beyond the first per region (reconnects).
    pub derp_reconnects: u64,
}

/// Drop counters shared by the driver and the protocol pieces.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub rx_malformed: AtomicU64,
    pub rx_replayed: AtomicU64,
    pub rx_rejected: AtomicU64,
    pub rx_unknown_peer: AtomicU64,
    pub rx_spoofed: AtomicU64,
    pub rx_filtered: AtomicU64,
    pub rx_cross_org: AtomicU64,
    pub rx_bad_ip: AtomicU64,
    pub tx_no_route: AtomicU64,
    pub tx_no_path: AtomicU64,
    pub tx_error: AtomicU64,
    pub tx_malformed: AtomicU64,
    pub tx_socket_error: AtomicU64,
    pub tcp_acks_moved: AtomicU64,
    pub handshakes: AtomicU64,
    pub disco_pings_rx: AtomicU64,
    pub disco_pongs_rx: AtomicU64,
    pub derp_reconnects: AtomicU64,
}

/// State shared between the driver task and the app's socket handles.
pub(crate) struct Shared {
    stack: Mutex<Stack>,
    wg: Mutex<WgRouter>,
    filter: Mutex<InboundFilter>,
    /// How peers' routes are taken; applied with every netmap.
    prefs: Mutex<RoutePrefs>,
    /// Peers of another org, whose relayed packets and disco are dropped.
    guard: Mutex<peers::OrgGuard>,
    counters: Arc<Counters>,
    wake: Notify,
    /// Datagrams produced outside the driver (e.g. [`DataPlane::rehandshake`]).
    outbox: Mutex<Vec<Transmit>>,
    /// Every netmap is applied under this lock, always the latest value, so the driver and an
    /// API call racing to apply never regress to an older map.
    netmap: Mutex<watch::Receiver<NetMap>>,
    node_public: NodePublic,
    net_info: watch::Sender<NetInfo>,
}

impl Shared {
    /// Locks the netstack. A panic elsewhere while holding the lock leaves smoltcp's state
    /// consistent (it has no multi-step invariants across our calls), so poisoning is ignored.
    pub(crate) fn lock_stack(&self) -> MutexGuard<'_, Stack> {
        self.stack.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_wg(&self) -> MutexGuard<'_, WgRouter> {
        self.wg.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_filter(&self) -> MutexGuard<'_, InboundFilter> {
        self.filter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the driver that a socket has something to send (or a window to reopen).
    pub(crate) fn wake_driver(&self) {
        self.wake.notify_one();
    }

    /// Fails fast when no peer's AllowedIPs contain `ip`, instead of letting a dial time out.
    /// A netmap sent but not yet applied by the driver is applied first, so a dial right after
    /// a netmap update sees it.
    pub(crate) fn check_route(&self, ip: IpAddr) -> io::Result<()> {
        if self.lock_wg().routes_to(ip) {
            return Ok(());
        }
        self.sync_netmap();
        if self.lock_wg().routes_to(ip) {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::HostUnreachable, format!("no mesh peer routes {ip}")))
    }

    /// Applies the latest netmap if it has not been applied yet.
    fn sync_netmap(&self) {
        let mut rx = self.netmap.lock().unwrap_or_else(|e| e.into_inner());
        if rx.borrow().has_changed() {
            let nm = rx.borrow_and_update().clone();
            apply_netmap(self, &nm, self.node_public);
        }
    }
}

/// A running data plane. Dropping it stops the driver; sockets still held then fail.
pub struct DataPlane {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
    node_public: NodePublic,
    disco_public: DiscoPublic,
    net: Arc<dyn Net>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("node", &self.node_public)
            .field("udp", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.lock_stack().stop();
    }
}

impl DataPlane {
    /// Binds the UDP socket and starts the driver task on the current tokio runtime.
    ///
    /// # Errors
    /// The UDP socket cannot be bound, or there is no tokio runtime to run on.
    pub fn start(cfg: DataPlaneConfig, netmap: watch::Receiver<NetMap>) -> io::Result<DataPlane> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("the data plane needs a tokio runtime: {e}")))?;
        let _enter = rt.enter();
        let udp = crate::net::bind_tokio_udp(cfg.bind)?;
        Self::start_on(cfg, netmap, Arc::new(TokioNet), Box::new(udp))
    }

    /// Like [`DataPlane::start`], with the UDP socket bound through `net` and DERP servers
    /// dialed through it (so the data plane runs on turmoil as well as on tokio).
    ///
    /// # Errors
    /// See [`DataPlane::start`].
    pub async fn start_with_net(
        cfg: DataPlaneConfig,
        netmap: watch::Receiver<NetMap>,
        net: Arc<dyn Net>,
    ) -> io::Result<DataPlane> {
        let udp = net.bind_udp(cfg.bind).await?;
        Self::start_on(cfg, netmap, net, udp)
    }

    fn start_on(
        cfg: DataPlaneConfig,
        netmap: watch::Receiver<NetMap>,
        net: Arc<dyn Net>,
        udp: Box<dyn Datagram>,
    ) -> io::Result<DataPlane> {
        let local_addr = udp.local_addr()?;
        let counters = Arc::new(Counters::default());
        let node_public = NodePublic(cfg.node_key.public_bytes());
        let mut router = WgRouter::new(&cfg.node_key, Arc::clone(&counters));
        router.set_disco_key(&cfg.disco_key);
        let local = endpoints_for(local_addr, net.interface_ips());
        router.set_my_endpoints(local.clone());
        let shared = Arc::new(Shared {
            stack: Mutex::new(Stack::new()),
            wg: Mutex::new(router),
            filter: Mutex::new(InboundFilter::default()),
            prefs: Mutex::new(RoutePrefs::default()),
            guard: Mutex::new(peers::OrgGuard::default()),
            counters,
            wake: Notify::new(),
            outbox: Mutex::new(Vec::new()),
            netmap: Mutex::new(netmap.clone()),
            node_public,
            net_info: watch::channel(NetInfo { endpoints: local, ..Default::default() }).0,
        });
        {
            let mut rx = shared.netmap.lock().unwrap_or_else(|e| e.into_inner());
            let nm = rx.borrow_and_update().clone();
            apply_netmap(&shared, &nm, node_public);
        }
        let v4_only = local_addr.is_ipv4();
        let dp_net = Arc::clone(&net);
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_INBOX);
        let (latency_tx, latency_rx) = mpsc::channel(1);
        let (resolve_tx, resolve_rx) = mpsc::channel(1);
        let driver = Driver {
            shared: Arc::clone(&shared),
            udp,
            netmap,
            v4_only,
            ackfix: ackfix::AckFix::default(),
            relays: relay::Relays::new(Arc::clone(&net), cfg.node_key.clone(), relay_tx),
            relay_rx,
            net,
            local_addr,
            probe: None,
            last_probe: None,
            home_down_since: None,
            report: None,
            latency_tx,
            latency_rx,
            https_probe_running: false,
            stun_hosts: HashMap::new(),
            resolve_tx,
            resolve_rx,
            resolving: false,
        };
        let task = tokio::spawn(driver.run());
        tracing::info!(node = %node_public.short(), udp = %local_addr, "data plane started");
        let disco_public = DiscoPublic(cfg.disco_key.public_bytes());
        Ok(DataPlane { shared, task, local_addr, node_public, disco_public, net: dp_net })
    }

    /// This node's public node key.
    pub fn node_public(&self) -> NodePublic {
        self.node_public
    }

    /// This node's public disco key.
    pub fn disco_public(&self) -> DiscoPublic {
        self.disco_public
    }

    /// The bound address of the UDP socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The endpoints to report to the control server: the bound address if it is specific,
    /// otherwise every non-loopback interface address of the socket's family with the bound
    /// port.
    pub fn local_endpoints(&self) -> Vec<SocketAddr> {
        endpoints_for(self.local_addr, self.net.interface_ips())
    }

    /// Endpoints (local and STUN-mapped) and the home DERP region, as they change.
    pub fn net_info(&self) -> watch::Receiver<NetInfo> {
        self.shared.net_info.subscribe()
    }

    /// The node's mesh addresses as the netstack holds them.
    pub fn mesh_addrs(&self) -> Vec<IpAddr> {
        self.shared.sync_netmap();
        self.shared.lock_stack().local_addrs()
    }

    /// Opens a TCP connection inside the mesh, waiting at most [`DEFAULT_DIAL_TIMEOUT`].
    ///
    /// # Errors
    /// See [`DataPlane::dial_tcp_timeout`].
    pub async fn dial_tcp(&self, addr: SocketAddr) -> io::Result<MeshTcpStream> {
        self.dial_tcp_timeout(addr, DEFAULT_DIAL_TIMEOUT).await
    }

    /// Opens a TCP connection inside the mesh.
    ///
    /// # Errors
    /// `HostUnreachable` when no peer routes `addr`, `TimedOut` when the peer does not answer
    /// within `timeout` (no handshake, or its filter drops us), `ConnectionRefused` on a reset.
    pub async fn dial_tcp_timeout(&self, addr: SocketAddr, timeout: Duration) -> io::Result<MeshTcpStream> {
        self.shared.check_route(addr.ip())?;
        let (h, local) = self.shared.lock_stack().connect(addr)?;
        self.shared.wake_driver();
        let connected = poll_fn(|cx| self.shared.lock_stack().poll_connected(h, cx));
        match tokio::time::timeout(timeout, connected).await {
            Ok(Ok(peer)) => Ok(MeshTcpStream::new(Arc::clone(&self.shared), h, local, peer)),
            Ok(Err(e)) => {
                self.shared.lock_stack().abort_tcp(h);
                Err(io::Error::new(e.kind(), format!("dial {addr}: {e}")))
            }
            Err(_) => {
                self.shared.lock_stack().abort_tcp(h);
                self.shared.wake_driver();
                Err(io::Error::new(io::ErrorKind::TimedOut, format!("dial {addr}: no answer within {timeout:?}")))
            }
        }
    }

    /// Listens for TCP connections on `port` of every mesh address.
    ///
    /// # Errors
    /// `AddrInUse` when the port already has a listener; `InvalidInput` for port 0.
    pub fn listen_tcp(&self, port: u16) -> io::Result<MeshTcpListener> {
        self.shared.lock_stack().listen(port)?;
        Ok(MeshTcpListener::new(Arc::clone(&self.shared), port))
    }

    /// Sends as much as it can for `dur` over one TCP stream from this node to `to`, whose data
    /// plane `receiver` accepts it on `to`'s port; returns the bytes received and how long the
    /// receiver took. A self-test of the whole path (netstack, WireGuard, UDP or DERP), used by
    /// the throughput benchmarks.
    ///
    /// # Errors
    /// The port cannot be bound on `receiver`, the dial fails, or the stream breaks.
    pub async fn bulk_send(&self, receiver: &DataPlane, to: SocketAddr, dur: Duration) -> io::Result<(u64, Duration)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const CHUNK: usize = 256 * 1024;
        let l = receiver.listen_tcp(to.port())?;
        let sink = tokio::spawn(async move {
            let (mut s, _) = l.accept().await?;
            let mut buf = vec![0u8; CHUNK];
            let (mut total, start) = (0u64, crate::clock::now());
            loop {
                match s.read(&mut buf).await? {
                    0 => return io::Result::Ok((total, crate::clock::now().saturating_duration_since(start))),
                    n => total += n as u64,
                }
            }
        });
        let mut s = self.dial_tcp(to).await?;
        let chunk = vec![0x5au8; CHUNK];
        let start = crate::clock::now();
        while crate::clock::now().saturating_duration_since(start) < dur {
            s.write_all(&chunk).await?;
        }
        s.shutdown().await?;
        sink.await.map_err(io::Error::other)?
    }

    /// Binds a UDP socket on `port` (0 = an ephemeral port) of every mesh address.
    ///
    /// # Errors
    /// `AddrInUse` when the port is taken.
    pub fn bind_udp(&self, port: u16) -> io::Result<MeshUdpSocket> {
        let (h, port) = self.shared.lock_stack().bind_udp(port)?;
        Ok(MeshUdpSocket::new(Arc::clone(&self.shared), h, port))
    }

    /// Sets how peers' routes are taken (`--accept-routes`, `--exit-node`) and whether the org
    /// guard is off, and applies the current netmap again under them.
    pub fn set_route_prefs(&self, prefs: RoutePrefs) {
        *self.shared.prefs.lock().unwrap_or_else(|e| e.into_inner()) = prefs;
        let nm = self.shared.netmap.lock().unwrap_or_else(|e| e.into_inner()).borrow_and_update().clone();
        apply_netmap(&self.shared, &nm, self.node_public);
    }

    /// True when some peer takes traffic for `ip`: a mesh address, an accepted subnet route,
    /// or anything once an exit node is chosen.
    pub fn routes_to(&self, ip: IpAddr) -> bool {
        self.shared.check_route(ip).is_ok()
    }

    /// How peers' routes are taken now.
    pub fn route_prefs(&self) -> RoutePrefs {
        self.shared.prefs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Per-peer tunnel state, sorted by node key.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared.sync_netmap();
        self.shared.lock_wg().stats()
    }

    /// One line per netstack socket (TCP state, queue lengths, endpoints), for diagnostics.
    pub fn socket_summary(&self) -> Vec<String> {
        self.shared.lock_stack().describe()
    }

    /// Drop counters.
    pub fn counters(&self) -> DataPlaneCounters {
        let c = &self.shared.counters;
        let rx_overflow = self.shared.lock_stack().rx_overflow;
        DataPlaneCounters {
            rx_malformed: c.rx_malformed.load(Relaxed),
            rx_replayed: c.rx_replayed.load(Relaxed),
            rx_rejected: c.rx_rejected.load(Relaxed),
            rx_unknown_peer: c.rx_unknown_peer.load(Relaxed),
            rx_spoofed: c.rx_spoofed.load(Relaxed),
            rx_filtered: c.rx_filtered.load(Relaxed),
            rx_cross_org: c.rx_cross_org.load(Relaxed),
            rx_bad_ip: c.rx_bad_ip.load(Relaxed),
            rx_overflow,
            tx_no_route: c.tx_no_route.load(Relaxed),
            tx_no_path: c.tx_no_path.load(Relaxed),
            tx_error: c.tx_error.load(Relaxed) + c.tx_malformed.load(Relaxed),
            tx_socket_error: c.tx_socket_error.load(Relaxed),
            tcp_acks_moved: c.tcp_acks_moved.load(Relaxed),
            handshakes: c.handshakes.load(Relaxed),
            disco_pings_rx: c.disco_pings_rx.load(Relaxed),
            disco_pongs_rx: c.disco_pongs_rx.load(Relaxed),
            derp_reconnects: c.derp_reconnects.load(Relaxed),
        }
    }

    /// Starts a fresh WireGuard handshake with `peer` now, exactly as the 2-minute rekey timer
    /// does; traffic moves to the new session when it completes. Useful after a path change.
    /// Returns false when `peer` is not in the netmap.
    pub fn rehandshake(&self, peer: &NodePublic) -> bool {
        let mut out = Vec::new();
        let known = self.shared.lock_wg().force_handshake(peer, &mut out);
        // The driver owns the socket: hand it the initiation.
        self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner()).append(&mut out);
        self.shared.wake_driver();
        known
    }
}

/// The endpoints for a socket bound to `bound`, given the host's interface addresses.
fn endpoints_for(bound: SocketAddr, ifaces: io::Result<Vec<IpAddr>>) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let ifaces = match ifaces {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list interface addresses");
            return Vec::new();
        }
    };
    // A socket bound to 0.0.0.0 is IPv4-only; one bound to [::] also takes IPv4 on Linux.
    let v6_socket = bound.is_ipv6();
    let mut out: Vec<SocketAddr> = ifaces
        .into_iter()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => v6_socket && !v6.is_unicast_link_local(),
        })
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The node's mesh addresses as netstack CIDRs: the first valid unicast IPv4 and IPv6 entries
/// (the netstack holds two), skipping anything malformed, so a bad netmap cannot trip
/// smoltcp's asserts.
fn mesh_cidrs(addresses: &[String]) -> Vec<IpCidr> {
    let mut out: Vec<IpCidr> = Vec::new();
    for a in addresses {
        let parsed = match a.split_once('/') {
            Some((ip, len)) => ip.parse::<IpAddr>().ok().zip(len.parse::<u8>().ok()),
            None => a.parse::<IpAddr>().ok().map(|ip| (ip, if ip.is_ipv4() { 32 } else { 128 })),
        };
        let Some((ip, len)) = parsed else {
            tracing::warn!(address = %a, "ignoring malformed mesh address");
            continue;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let addr = smoltcp::wire::IpAddress::from(ip);
        if len > max || !addr.is_unicast() || ip.is_unspecified() || ip.is_loopback() {
            tracing::warn!(address = %a, "ignoring unusable mesh address");
            continue;
        }
        if out.iter().all(|c| c.address().version() != addr.version()) {
            out.push(IpCidr::new(addr, len));
        }
    }
    out
}

/// Pushes a netmap into the router, the filter and the netstack.
fn apply_netmap(shared: &Shared, nm: &NetMap, me: NodePublic) {
    if !nm.self_node.key.is_zero() && nm.self_node.key != me {
        tracing::warn!(netmap = %nm.self_node.key.short(), ours = %me.short(), "netmap is for another node key");
    }
    let cidrs = mesh_cidrs(&nm.self_node.addresses);
    let addrs: Vec<IpAddr> = cidrs.iter().map(|c| IpAddr::from(c.address())).collect();
    let desired = {
        let prefs = shared.prefs.lock().unwrap_or_else(|e| e.into_inner());
        peers::desired(nm, &prefs)
    };
    if desired.guard.len() > 0 {
        tracing::debug!(peers = desired.guard.len(), "org guard: peers of another org get no tunnel");
    }
    shared.lock_wg().set_peers(desired.peers);
    *shared.guard.lock().unwrap_or_else(|e| e.into_inner()) = desired.guard;
    {
        let mut f = shared.lock_filter();
        f.set_rules(&nm.packet_filter);
        f.set_local_addrs(addrs);
    }
    shared.lock_stack().set_addresses(&cidrs);
}

/// The task that owns the UDP socket and the DERP connections, and moves packets between them,
/// the WireGuard router and the netstack.
struct Driver {
    shared: Arc<Shared>,
    udp: Box<dyn Datagram>,
    /// Only wakes the driver; the value is read through [`Shared::sync_netmap`].
    netmap: watch::Receiver<NetMap>,
    /// An IPv4 socket cannot reach IPv6 candidates.
    v4_only: bool,
    ackfix: ackfix::AckFix,
    relays: relay::Relays,
    relay_rx: mpsc::Receiver<relay::Relayed>,
    net: Arc<dyn Net>,
    local_addr: SocketAddr,
    /// The STUN probe in flight, if any.
    probe: Option<netcheck::Probe>,
    last_probe: Option<Instant>,
    /// Since when the home region's DERP connection has been down (None: up, or no home).
    home_down_since: Option<Instant>,
    report: Option<netcheck::Report>,
    /// Results of the HTTPS latency fallback (when STUN gets no answer).
    latency_tx: mpsc::Sender<Vec<crate::derphttp::RegionLatency>>,
    latency_rx: mpsc::Receiver<Vec<crate::derphttp::RegionLatency>>,
    https_probe_running: bool,
    /// Addresses of STUN servers the DERP map names only by host name.
    stun_hosts: HashMap<String, IpAddr>,
    resolve_tx: mpsc::Sender<HashMap<String, IpAddr>>,
    resolve_rx: mpsc::Receiver<HashMap<String, IpAddr>>,
    resolving: bool,
}

impl Driver {
    async fn run(mut self) {
        let mut buf = vec![0u8; 65536];
        let mut out: Vec<Transmit> = Vec::new();
        let mut delivered: Vec<(NodePublic, Vec<u8>)> = Vec::new();
        let mut egress: Vec<Vec<u8>> = Vec::new();
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut netmap_open = true;
        let stack_timer = tokio::time::sleep(TIMER_TICK);
        tokio::pin!(stack_timer);
        // A netmap sent before this task first ran is marked seen here, so apply it here too.
        let dm = self.netmap.borrow_and_update().derp_map.clone();
        self.shared.sync_netmap();
        self.on_derp_map(&dm);
        self.netcheck_timers(crate::clock::now()).await;
        loop {
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => match r {
                    Ok((n, src)) => {
                        let now = self.now();
                        self.on_udp(canonical(src), &buf[..n], now, &mut out, &mut delivered)
                    }
                    Err(e) => tracing::debug!(error = %e, "udp receive failed"),
                },
                Some(r) = self.relay_rx.recv() => {
                    self.now();
                    self.on_relayed(r, &mut out, &mut delivered)
                }
                Some(r) = self.resolve_rx.recv() => {
                    self.resolving = false;
                    if !r.is_empty() {
                        self.stun_hosts.extend(r);
                        if self.probe.is_none() {
                            self.start_probe(crate::clock::now());
                        }
                    }
                }
                Some(l) = self.latency_rx.recv() => {
                    self.https_probe_running = false;
                    if self.report.as_ref().is_some_and(|r| r.region_latency.is_empty()) {
                        if let Some(home) = crate::derphttp::pick_home_region(&l) {
                            self.set_home(home);
                        }
                    }
                }
                _ = self.shared.wake.notified() => {}
                _ = tick.tick() => {
                    let now = self.now();
                    self.shared.lock_wg().tick(now, &mut out);
                    self.shared.counters.derp_reconnects.store(self.relays.reconnects(), Relaxed);
                    self.netcheck_timers(now).await;
                }
                r = self.netmap.changed(), if netmap_open => {
                    let dm = self.netmap.borrow_and_update().derp_map.clone();
                    self.shared.sync_netmap();
                    self.on_derp_map(&dm);
                    self.netcheck_timers(self.now()).await;
                    // A closed channel means the owner dropped the sender: keep running on the
                    // last netmap.
                    netmap_open = r.is_ok();
                }
                _ = &mut stack_timer => {}
            }
            // Drain what else has arrived, so the stack sees a batch at once.
            let now = self.now();
            for _ in 0..RX_BATCH {
                match self.udp.try_recv_from(&mut buf) {
                    Ok((n, src)) => self.on_udp(canonical(src), &buf[..n], now, &mut out, &mut delivered),
                    Err(_) => break,
                }
            }
            for _ in 0..RX_BATCH {
                match self.relay_rx.try_recv() {
                    Ok(r) => self.on_relayed(r, &mut out, &mut delivered),
                    Err(_) => break,
                }
            }
            // A probe is finished as soon as its last answer arrives, not at the next tick:
            // the mesh waits for its report to announce the node.
            if self.probe.as_ref().is_some_and(|p| p.done(now)) {
                self.netcheck_timers(now).await;
            }
            let delay = self.run_stack(&mut delivered, &mut egress, &mut out);
            // Discovery starts as soon as traffic to a peer does, not at the next tick.
            self.shared.lock_wg().poll_disco(&mut out);
            stack_timer.as_mut().reset(tokio::time::Instant::now() + delay);
            out.append(&mut self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner()));
            for t in out.drain(..) {
                self.send(t).await;
            }
        }
    }

    /// The current time, also handed to the router: the path logic takes time as input, and
    /// round trips must be measured from when a packet arrived, not from before the wait.
    fn now(&self) -> Instant {
        let now = crate::clock::now();
        self.shared.lock_wg().set_now(now);
        now
    }

    /// Demultiplexes one datagram of the shared socket: disco (magic prefix), STUN (cookie),
    /// else WireGuard.
    fn on_udp(
        &mut self,
        src: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &mut Vec<Transmit>,
        delivered: &mut Vec<(NodePublic, Vec<u8>)>,
    ) {
        if crate::disco::looks_like_disco(data) {
            if self.cross_org_disco(data) {
                return;
            }
            self.shared.lock_wg().handle_disco(Source::Udp(src), data, out);
        } else if crate::stun::is_stun(data) {
            if !self.probe.as_mut().is_some_and(|p| p.on_packet(src, data, now)) {
                tracing::trace!(%src, "unexpected STUN packet");
            }
        } else {
            self.shared.lock_wg().handle_wg(Source::Udp(src), data, out, delivered);
        }
    }

    /// True (and counted) when a disco message comes from a peer of another org.
    fn cross_org_disco(&self, data: &[u8]) -> bool {
        let Some(sender) = crate::disco::sender(data) else { return false };
        if self.shared.guard.lock().unwrap_or_else(|e| e.into_inner()).blocks_disco(&sender) {
            self.shared.counters.rx_cross_org.fetch_add(1, Relaxed);
            tracing::trace!("org guard dropped a disco message");
            return true;
        }
        false
    }

    fn on_relayed(&mut self, r: relay::Relayed, out: &mut Vec<Transmit>, delivered: &mut Vec<(NodePublic, Vec<u8>)>) {
        tracing::trace!(region = r.region, peer = %r.src.short(), len = r.packet.len(), "received over DERP");
        if self.shared.guard.lock().unwrap_or_else(|e| e.into_inner()).blocks_node(&r.src) {
            self.shared.counters.rx_cross_org.fetch_add(1, Relaxed);
            tracing::trace!(peer = %r.src.short(), "org guard dropped a relayed packet");
            return;
        }
        let src = Source::Derp { region: r.region, key: r.src };
        let mut wg = self.shared.lock_wg();
        if crate::disco::looks_like_disco(&r.packet) {
            wg.handle_disco(src, &r.packet, out);
        } else {
            wg.handle_wg(src, &r.packet, out, delivered);
        }
    }

    /// A (possibly) new DERP map: reconnect what changed, connect to the peers' regions ahead
    /// of their first packet, and probe STUN again.
    fn on_derp_map(&mut self, dm: &DerpMap) {
        let changed = {
            let before = self.relays.available();
            self.relays.set_map(dm);
            before != self.relays.available() || self.probe.is_none() && self.last_probe.is_none()
        };
        let regions = {
            let mut wg = self.shared.lock_wg();
            wg.set_derp_ok(self.relays.available());
            wg.peer_regions()
        };
        if !self.relays.available() {
            return;
        }
        for r in regions {
            self.relays.ensure(r);
        }
        if dm.regions.len() == 1 {
            // One region: nothing to choose, so no need to wait for probes.
            if let Some(id) = dm.regions.keys().next() {
                self.set_home(*id);
            }
        }
        if changed || self.relays.home() == 0 {
            self.last_probe = None;
        }
        let names = netcheck::stun_hostnames(dm);
        self.stun_hosts.retain(|h, _| names.contains(h));
        let missing: Vec<String> = names.into_iter().filter(|h| !self.stun_hosts.contains_key(h)).collect();
        if !missing.is_empty() && !self.resolving {
            self.resolving = true;
            let tx = self.resolve_tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(netcheck::resolve_hosts(missing, Duration::from_secs(3)).await).await;
            });
        }
        if self.probe.is_none() && self.last_probe.is_none() {
            // Probe now rather than at the next tick: the mesh waits for this to announce the
            // node.
            self.start_probe(crate::clock::now());
        }
    }

    fn start_probe(&mut self, now: Instant) {
        let dm = self.netmap.borrow().derp_map.clone();
        self.last_probe = Some(now);
        self.probe = Some(netcheck::Probe::new(&netcheck::stun_targets_with(&dm, &self.stun_hosts), now));
    }

    /// Starts, advances and finishes STUN probes.
    async fn netcheck_timers(&mut self, now: Instant) {
        let home = self.relays.home();
        let home_down = home > 0 && !self.relays.connected().contains(&home);
        self.home_down_since = match (home_down, self.home_down_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
        let since_probe = |t: Instant| now.saturating_duration_since(t);
        let home_lost = self.home_down_since.is_some_and(|t| now.saturating_duration_since(t) >= HOME_DOWN_RECHECK)
            && self.last_probe.is_none_or(|t| since_probe(t) >= HOME_DOWN_RECHECK);
        if self.probe.is_none()
            && self.relays.available()
            && (home_lost || self.last_probe.is_none_or(|t| since_probe(t) >= NETCHECK_INTERVAL))
        {
            if home_lost {
                tracing::debug!(region = home, "home DERP unreachable: netcheck now");
            }
            self.start_probe(now);
        }
        let Some(p) = self.probe.as_mut() else { return };
        let sends = p.poll(now);
        let done = p.done(now);
        for (dst, payload) in sends {
            self.send(Transmit::udp(dst, payload)).await;
        }
        if done {
            if let Some(p) = self.probe.take() {
                self.finish_probe(p.report());
            }
        }
    }

    fn finish_probe(&mut self, report: netcheck::Report) {
        tracing::debug!(udp = report.udp, mapped = ?report.mapped, varies = ?report.mapping_varies_by_dest,
            latency = ?report.region_latency, "netcheck");
        let dm = self.netmap.borrow().derp_map.clone();
        if let Some(home) = report.preferred_region(self.relays.home()) {
            self.set_home(home);
        } else if dm.regions.len() > 1 && !self.https_probe_running {
            // No UDP answer (UDP blocked?): rank regions over HTTPS, as Tailscale's netcheck
            // falls back to.
            self.https_probe_running = true;
            let (net, tx) = (Arc::clone(&self.net), self.latency_tx.clone());
            tokio::spawn(async move {
                let l = crate::derphttp::measure_regions(net, &dm, Duration::from_secs(3)).await;
                let _ = tx.send(l).await;
            });
        }
        self.report = Some(report);
        self.publish();
    }

    fn set_home(&mut self, region: i32) {
        if self.relays.home() != region {
            self.relays.set_home(region);
            self.publish();
        }
    }

    /// Publishes endpoints and home region (the mesh reports them to the control server).
    fn publish(&mut self) {
        let mut endpoints = endpoints_for(self.local_addr, self.net.interface_ips());
        for m in self.report.iter().flat_map(|r| r.mapped.iter()) {
            if !(endpoints.contains(m) || self.v4_only && m.is_ipv6()) {
                endpoints.push(*m);
            }
        }
        self.shared.lock_wg().set_my_endpoints(endpoints.clone());
        let info = NetInfo {
            endpoints,
            preferred_derp: self.relays.home(),
            report: self.report.clone(),
            derp_connected: self.relays.connected(),
        };
        self.shared.net_info.send_if_modified(|cur| {
            let changed = *cur != info;
            *cur = info;
            changed
        });
    }

    /// Filters decrypted packets into the netstack, polls it, and encrypts what it sent.
    fn run_stack(
        &mut self,
        delivered: &mut Vec<(NodePublic, Vec<u8>)>,
        egress: &mut Vec<Vec<u8>>,
        out: &mut Vec<Transmit>,
    ) -> Duration {
        let now = crate::clock::now();
        let c = &self.shared.counters;
        let mut accepted = Vec::with_capacity(delivered.len());
        if !delivered.is_empty() {
            let mut f = self.shared.lock_filter();
            for (peer, packet) in delivered.drain(..) {
                let info = match PacketInfo::parse(&packet) {
                    Ok(i) => i,
                    Err(e) => {
                        c.rx_bad_ip.fetch_add(1, Relaxed);
                        tracing::trace!(peer = %peer.short(), error = %e, "dropped inbound packet");
                        continue;
                    }
                };
                let verdict = f.check(&info, now);
                if verdict.accepted() {
                    accepted.push((info, packet));
                } else {
                    c.rx_filtered.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %peer.short(), src = %info.src, dst = %info.dst, proto = info.proto,
                        port = info.dst_port, ?verdict, "packet filter dropped inbound packet");
                }
            }
        }
        let delay = {
            let mut st = self.shared.lock_stack();
            for (info, mut packet) in accepted {
                if info.proto == filter::PROTO_TCP && self.ackfix.on_ingress(&mut packet) {
                    c.tcp_acks_moved.fetch_add(1, Relaxed);
                }
                st.ingress(&info, packet);
            }
            let delay = st.poll();
            st.take_egress(egress);
            delay
        };
        if !egress.is_empty() {
            {
                let mut f = self.shared.lock_filter();
                for p in egress.iter() {
                    if let Ok(info) = PacketInfo::parse(p) {
                        f.record_outbound(&info, now);
                        if info.proto == filter::PROTO_TCP {
                            self.ackfix.on_egress(p);
                        }
                    }
                }
            }
            let mut wg = self.shared.lock_wg();
            for p in egress.drain(..) {
                wg.send_packet(&p, out);
            }
        }
        delay.unwrap_or(TIMER_TICK).min(TIMER_TICK)
    }

    async fn send(&mut self, t: Transmit) {
        let dst = match t.path {
            Path::Direct(a) => a,
            Path::Derp(region) => {
                tracing::trace!(region, peer = %t.peer.short(), len = t.payload.len(), "send over DERP");
                if !self.relays.send(region, t.peer, t.payload) {
                    self.shared.counters.tx_no_path.fetch_add(1, Relaxed);
                }
                return;
            }
        };
        let dst = match dst {
            // Skip rather than count as errors: the peer may list candidates of both families.
            SocketAddr::V6(_) if self.v4_only => return,
            // A dual-stack IPv6 socket reaches IPv4 peers through mapped addresses.
            SocketAddr::V4(v4) if !self.v4_only => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
            _ => dst,
        };
        if let Err(e) = self.udp.send_to(&t.payload, dst).await {
            self.shared.counters.tx_socket_error.fetch_add(1, Relaxed);
            tracing::debug!(%dst, error = %e, "udp send failed");
        }
    }
}

/// IPv4 peers reach a dual-stack socket as `::ffff:a.b.c.d`; keep them as IPv4 so they match
/// the netmap's endpoints.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_cidrs_keep_one_valid_address_per_family() {
        let v = |a: &[&str]| mesh_cidrs(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let got =
            v(&["100.64.0.1/33", "224.0.0.1/32", "0.0.0.0/0", "x/1", "100.64.0.1/32", "100.64.0.9/32", "fd7a::1"]);
        let want: Vec<IpCidr> = vec!["100.64.0.1/32".parse().unwrap(), "fd7a::1/128".parse().unwrap()];
        assert_eq!(got, want);
    }

    proptest::proptest! {
        #[test]
        fn mesh_cidrs_never_panic(a in proptest::collection::vec("[0-9a-f.:/]{0,45}", 0..5)) {
            let cidrs = mesh_cidrs(&a);
            let mut st = netstack::Stack::new();
            st.set_addresses(&cidrs);
        }
    }

    #[test]
    fn endpoints_for_bound_and_wildcard_sockets() {
        let ifaces = || {
            Ok(vec![
                "127.0.0.1".parse().unwrap(),
                "192.0.2.10".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "fe80::1".parse().unwrap(),
            ])
        };
        let b: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(endpoints_for(b, ifaces()), vec![b]);
        let v4: Vec<String> =
            endpoints_for("0.0.0.0:4000".parse().unwrap(), ifaces()).iter().map(|a| a.to_string()).collect();
        assert_eq!(v4, vec!["192.0.2.10:4000"]);
        let v6: Vec<String> =
            endpoints_for("[::]:4000".parse().unwrap(), ifaces()).iter().map(|a| a.to_string()).collect();
        assert_eq!(v6, vec!["192.0.2.10:4000", "[2001:db8::1]:4000"]);
        assert!(endpoints_for("0.0.0.0:1".parse().unwrap(), Err(io::ErrorKind::Other.into())).is_empty());
    }
}
