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
pub mod netstack;
mod pages;
pub mod peers;
mod relay;
pub mod route;
pub mod socket;
mod tunnel;
#[cfg(target_os = "linux")]
pub(crate) mod udp;
pub mod wg;

pub use peers::{PeerRoutes, RoutePrefs};
pub use socket::{MeshTcpListener, MeshTcpStream, MeshUdpSocket};
pub use wg::{Path, PeerStats};

use crate::derphttp::{Inbound, Received};
use crate::keys::{DiscoPublic, NodePublic, PrivateKey};
use crate::magicsock::{Conn, Event};
use crate::net::{Datagram, Net, TokioNet};
use crate::netcheck;
use crate::netmap::{Changes, Cursor, NetMap};
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
use wg::Transmit;

/// How long [`DataPlane::dial_tcp`] waits for the peer to answer.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep while the netstack has no timer of its own (it still ages closing sockets).
const STACK_IDLE: Duration = Duration::from_secs(1);
/// Relayed packets taken per wakeup before the stack runs, so bulk traffic is processed in
/// batches.
const RELAY_BATCH: usize = 128;
/// Socket reads per wakeup before the stack runs (each up to 64 datagrams where the kernel
/// coalesces them): a batch, yet the ACKs for it leave while the sender is still sending.
/// With 128 reads a burst was decrypted whole first and a tsnet sender stalled on them.
const RX_READS: usize = 4;
/// Datagrams sent together in one segmented send at most (the kernel's `UDP_MAX_SEGMENTS`).
const BATCH_SEGMENTS: usize = 64;
/// Packets the driver encrypts before it sends what it has (see `Driver::run`).
const SEND_SLICE: usize = BATCH_SEGMENTS;
/// Bytes in one segmented send at most: within one UDP datagram over IPv4 and IPv6.
const BATCH_BYTES: usize = 65_000;
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
    /// Packets (relayed, or direct handshakes) and disco messages from peers of another org,
    /// dropped by the org guard.
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

/// The packet core and what goes with it, behind its own lock: the driver holds it while it
/// decrypts and encrypts, without blocking the app's socket calls on the [`Host`] lock.
pub(crate) struct Engine {
    conn: Conn,
    /// Every netmap is applied under the lock, always the latest value, so the driver and an
    /// API call racing to apply never regress to an older map.
    netmap: watch::Receiver<NetMap>,
    /// This node's public key; renewed by [`DataPlane::set_node_key`].
    me: NodePublic,
    /// A renewed node key the driver has yet to give its DERP connections.
    rekey: Option<PrivateKey>,
    /// Where the netmap's change log stood at the last apply: the next one applies only
    /// what changed since.
    applied: Cursor,
}

/// The netstack, the packet filter and the ACK fix-up: what the app's socket handles lock.
pub(crate) struct Host {
    stack: Stack,
    filter: InboundFilter,
    ackfix: ackfix::AckFix,
}

impl Engine {
    /// Applies the latest netmap if it has not been applied yet; true when it did. Takes the
    /// [`Host`] lock only then (always after the engine's, never the other way round).
    fn sync_netmap(&mut self, host: &Mutex<Host>, now: Instant) -> bool {
        if !self.netmap.has_changed().unwrap_or(false) {
            return false;
        }
        let mut host = lock(host);
        {
            // A few peers changed (a join, an endpoint change): only they are applied, under
            // the watch's read lock (no copy of the map). The filter is compiled again only
            // when it changed.
            let nm = self.netmap.borrow_and_update();
            if let Changes::Parts { peers, self_node, filter } = nm.changes_since(&self.applied) {
                if self.conn.update_netmap(now, &nm, &peers, filter) {
                    if filter {
                        host.filter.set_rules(&nm.packet_filter);
                    }
                    if self_node {
                        host.set_addresses(&nm.self_node.addresses);
                    }
                    self.applied = nm.cursor();
                    return true;
                }
            }
        }
        self.apply_netmap(&mut host, now);
        true
    }

    /// Applies the latest netmap (again) in whole to the core, the filter and the netstack.
    fn apply_netmap(&mut self, host: &mut Host, now: Instant) {
        let (nm, at) = {
            let nm = self.netmap.borrow_and_update();
            (nm.clone(), nm.cursor())
        };
        self.applied = at;
        let me = self.me;
        if !nm.self_node.key.is_zero() && nm.self_node.key != me {
            tracing::warn!(netmap = %nm.self_node.key.short(), ours = %me.short(), "netmap is for another node key");
        }
        self.conn.set_netmap(now, &nm);
        host.filter.set_rules(&nm.packet_filter);
        host.set_addresses(&nm.self_node.addresses);
    }
}

impl Host {
    /// This node's mesh addresses (from its netmap entry): what the netstack answers on and
    /// the filter counts as local.
    fn set_addresses(&mut self, addresses: &[String]) {
        let cidrs = mesh_cidrs(addresses);
        self.filter.set_local_addrs(cidrs.iter().map(|c| IpAddr::from(c.address())).collect());
        self.stack.set_addresses(&cidrs);
    }

    /// Filters decrypted packets into the netstack, polls it, and collects what it sent in
    /// `egress`. Returns when the netstack next needs a poll.
    /// `egress` holds the last step's packets, already encrypted: their buffers are reused,
    /// and those the netstack does not need go to `spare`.
    fn step(
        &mut self,
        now: Instant,
        c: &Counters,
        ingress: &mut Vec<(NodePublic, Vec<u8>)>,
        egress: &mut Vec<Vec<u8>>,
        spare: &mut Vec<Vec<u8>>,
    ) -> Option<Duration> {
        self.stack.recycle(egress, spare);
        for (peer, mut packet) in ingress.drain(..) {
            let info = match PacketInfo::parse(&packet) {
                Ok(i) => i,
                Err(e) => {
                    c.rx_bad_ip.fetch_add(1, Relaxed);
                    tracing::trace!(peer = %peer.short(), error = %e, "dropped inbound packet");
                    continue;
                }
            };
            let verdict = self.filter.check(&info, now);
            if !verdict.accepted() {
                c.rx_filtered.fetch_add(1, Relaxed);
                tracing::debug!(peer = %peer.short(), src = %info.src, dst = %info.dst, proto = info.proto,
                    port = info.dst_port, ?verdict, "packet filter dropped inbound packet");
                continue;
            }
            if info.proto == filter::PROTO_TCP && self.ackfix.on_ingress(&mut packet) {
                c.tcp_acks_moved.fetch_add(1, Relaxed);
            }
            self.stack.ingress(&info, packet);
        }
        let delay = self.stack.poll();
        self.stack.take_egress(egress);
        for p in egress.iter() {
            if let Ok(info) = PacketInfo::parse(p) {
                self.filter.record_outbound(&info, now);
                if info.proto == filter::PROTO_TCP {
                    self.ackfix.on_egress(p);
                }
            }
        }
        delay
    }
}

/// Locks `m`. A panic elsewhere while holding a lock leaves smoltcp's and the core's state
/// consistent (no multi-step invariants across our calls), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The netstack inside the locked [`Host`], for the socket handles.
pub(crate) struct StackGuard<'a>(MutexGuard<'a, Host>);

impl std::ops::Deref for StackGuard<'_> {
    type Target = Stack;
    fn deref(&self) -> &Stack {
        &self.0.stack
    }
}

impl std::ops::DerefMut for StackGuard<'_> {
    fn deref_mut(&mut self) -> &mut Stack {
        &mut self.0.stack
    }
}

/// State shared between the driver task and the app's socket handles.
pub(crate) struct Shared {
    engine: Mutex<Engine>,
    host: Mutex<Host>,
    counters: Arc<Counters>,
    wake: Notify,
    net_info: watch::Sender<NetInfo>,
}

impl Shared {
    /// Locks the engine (the packet core).
    fn lock(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// Locks the netstack.
    pub(crate) fn lock_stack(&self) -> StackGuard<'_> {
        StackGuard(lock(&self.host))
    }

    /// Tells the driver that a socket has something to send (or a window to reopen).
    pub(crate) fn wake_driver(&self) {
        self.wake.notify_one();
    }

    /// Fails fast when no peer's AllowedIPs contain `ip`, instead of letting a dial time out.
    /// A netmap sent but not yet applied by the driver is applied first, so a dial right after
    /// a netmap update sees it.
    pub(crate) fn check_route(&self, ip: IpAddr) -> io::Result<()> {
        if self.lock().conn.routes_to(ip) {
            return Ok(());
        }
        self.sync_netmap();
        if self.lock().conn.routes_to(ip) {
            return Ok(());
        }
        Err(io::Error::new(io::ErrorKind::HostUnreachable, format!("no mesh peer routes {ip}")))
    }

    /// Applies the latest netmap if it has not been applied yet.
    fn sync_netmap(&self) {
        if self.lock().sync_netmap(&self.host, crate::clock::now()) {
            // The core may have DERP connections or probes to start.
            self.wake_driver();
        }
    }
}

/// A running data plane. Dropping it stops the driver; sockets still held then fail.
pub struct DataPlane {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
    disco_public: DiscoPublic,
    net: Arc<dyn Net>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane")
            .field("node", &self.node_public())
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
        #[cfg(target_os = "linux")]
        let udp = udp::BatchUdp::new(udp);
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
        let local = endpoints_for(local_addr, net.interface_ips());
        let now = crate::clock::now();
        let conn =
            Conn::new(now, &cfg.node_key, &cfg.disco_key, local.clone(), local_addr.is_ipv4(), Arc::clone(&counters));
        let mut engine =
            Engine { conn, netmap: netmap.clone(), me: node_public, rekey: None, applied: Cursor::default() };
        let host = Mutex::new(Host {
            stack: Stack::new(),
            filter: InboundFilter::default(),
            ackfix: ackfix::AckFix::default(),
        });
        engine.netmap.mark_changed();
        engine.sync_netmap(&host, now);
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            host,
            counters,
            wake: Notify::new(),
            net_info: watch::channel(NetInfo { endpoints: local, ..Default::default() }).0,
        });
        let dp_net = Arc::clone(&net);
        let (relay_tx, relay_rx) = mpsc::channel(RELAY_INBOX);
        let (answer_tx, answer_rx) = mpsc::channel(2);
        let driver = Driver {
            shared: Arc::clone(&shared),
            udp,
            netmap,
            v4_only: local_addr.is_ipv4(),
            relays: relay::Relays::new(Arc::clone(&net), cfg.node_key.clone(), relay_tx),
            relay_rx,
            net,
            answer_tx,
            answer_rx,
            closed_regions: Vec::new(),
        };
        let task = tokio::spawn(driver.run());
        tracing::info!(node = %node_public.short(), udp = %local_addr, "data plane started");
        let disco_public = DiscoPublic(cfg.disco_key.public_bytes());
        Ok(DataPlane { shared, task, local_addr, disco_public, net: dp_net })
    }

    /// This node's public node key.
    pub fn node_public(&self) -> NodePublic {
        self.shared.lock().me
    }

    /// Switches to a renewed node key without dropping anything above WireGuard: the mesh
    /// addresses, the netstack and its connections stay; tunnels handshake again with the new
    /// key and DERP connections log in again.
    pub fn set_node_key(&self, key: PrivateKey) {
        {
            let mut e = self.shared.lock();
            e.me = NodePublic(key.public_bytes());
            e.conn.set_static_key(crate::clock::now(), &key);
            e.rekey = Some(key);
        }
        self.shared.wake_driver();
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
        {
            let mut e = self.shared.lock();
            e.conn.set_route_prefs(prefs);
            e.apply_netmap(&mut lock(&self.shared.host), crate::clock::now());
        }
        // The core may have DERP connections to start for peers it now has.
        self.shared.wake_driver();
    }

    /// True when some peer takes traffic for `ip`: a mesh address, an accepted subnet route,
    /// or anything once an exit node is chosen.
    pub fn routes_to(&self, ip: IpAddr) -> bool {
        self.shared.check_route(ip).is_ok()
    }

    /// How peers' routes are taken now.
    pub fn route_prefs(&self) -> RoutePrefs {
        self.shared.lock().conn.route_prefs().clone()
    }

    /// Per-peer tunnel state, sorted by node key.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared.sync_netmap();
        self.shared.lock().conn.stats(crate::clock::now())
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
        let known = self.shared.lock().conn.force_handshake(crate::clock::now(), peer);
        // The driver owns the socket: it sends the initiation.
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

/// Answers to the core's requests that took I/O.
enum Answer {
    Resolved(HashMap<String, IpAddr>),
    Latency(Vec<crate::derphttp::RegionLatency>),
}

/// What woke the driver.
enum Wake {
    /// Bytes read, sender, size of each datagram in them.
    Udp(usize, SocketAddr, usize),
    Relay(Inbound),
    Answer(Answer),
    Other,
}

/// The tokio driver: owns the UDP socket and the DERP connections, feeds the engine what
/// arrives, sleeps until the core's next deadline, and carries out what the core asks for.
/// It holds no policy.
struct Driver {
    shared: Arc<Shared>,
    udp: Box<dyn Datagram>,
    /// Only wakes the driver; the value is read through [`Shared::sync_netmap`].
    netmap: watch::Receiver<NetMap>,
    /// An IPv4 socket cannot reach IPv6 candidates.
    v4_only: bool,
    relays: relay::Relays,
    relay_rx: mpsc::Receiver<Inbound>,
    net: Arc<dyn Net>,
    answer_tx: mpsc::Sender<Answer>,
    answer_rx: mpsc::Receiver<Answer>,
    /// Regions whose connection the driver closed (DERP map change), for the core.
    closed_regions: Vec<i32>,
}

impl Driver {
    async fn run(mut self) {
        let mut buf = vec![0u8; 65536];
        let (mut out, mut events, mut ingress, mut egress) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Packet buffers on their way back to the core's pool: sent datagrams, and what the
        // netstack did not need.
        let mut spare: Vec<Vec<u8>> = Vec::new();
        let mut netmap_open = true;
        self.netmap.borrow_and_update();
        let mut deadline = crate::clock::now();
        loop {
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
            let wake = tokio::select! {
                r = self.udp.recv_segments(&mut buf) => match r {
                    Ok((n, src, seg)) => Wake::Udp(n, src, seg),
                    Err(e) => {
                        tracing::debug!(error = %e, "udp receive failed");
                        Wake::Other
                    }
                },
                Some(r) = self.relay_rx.recv() => Wake::Relay(r),
                Some(a) = self.answer_rx.recv() => Wake::Answer(a),
                _ = self.shared.wake.notified() => Wake::Other,
                r = self.netmap.changed(), if netmap_open => {
                    self.netmap.borrow_and_update();
                    // A closed channel means the owner dropped the sender: keep running on the
                    // last netmap.
                    netmap_open = r.is_ok();
                    Wake::Other
                }
                _ = sleep => Wake::Other,
            };
            let now = crate::clock::now();
            {
                let mut e = self.shared.lock();
                e.conn.recycle(spare.drain(..));
                e.sync_netmap(&self.shared.host, now);
                if let Some(key) = e.rekey.take() {
                    self.relays.set_key(key);
                }
                for r in self.closed_regions.drain(..) {
                    e.conn.handle_relay_status(now, r, false);
                }
                match wake {
                    Wake::Udp(n, src, seg) => handle_segments(&mut e.conn, now, src, &buf[..n], seg),
                    Wake::Relay(r) => on_relay(&mut e.conn, now, r),
                    Wake::Answer(Answer::Resolved(h)) => e.conn.handle_resolved(now, h),
                    Wake::Answer(Answer::Latency(l)) => e.conn.handle_https_latency(now, &l),
                    Wake::Other => {}
                }
                // Drain what else has arrived, so the stack sees a batch at once.
                for _ in 0..RX_READS {
                    match self.udp.try_recv_segments(&mut buf) {
                        Ok((n, src, seg)) => handle_segments(&mut e.conn, now, src, &buf[..n], seg),
                        Err(_) => break,
                    }
                }
                for _ in 0..RELAY_BATCH {
                    match self.relay_rx.try_recv() {
                        Ok(r) => on_relay(&mut e.conn, now, r),
                        Err(_) => break,
                    }
                }
                ingress.extend(std::iter::from_fn(|| e.conn.poll_ip()));
            }
            // The netstack under its own lock: the app's socket calls wait only for this part,
            // not for the decryption before it or the encryption after it.
            let stack = lock(&self.shared.host).step(now, &self.shared.counters, &mut ingress, &mut egress, &mut spare);
            // Encrypted and sent a slice at a time: the peer starts on the first datagrams
            // while this side still encrypts the rest. Encrypting a whole window before sending
            // any of it made the two sides of a bulk transfer take turns.
            let mut slices = egress.chunks(SEND_SLICE);
            loop {
                let slice = slices.next();
                let last = slices.len() == 0;
                {
                    let mut e = self.shared.lock();
                    e.conn.recycle(spare.drain(..));
                    for p in slice.unwrap_or_default() {
                        e.conn.send_ip(now, p);
                    }
                    if last {
                        // After the egress: discovery starts as soon as traffic to a peer does.
                        e.conn.handle_timeout(now);
                        let stack_at = now + stack.unwrap_or(STACK_IDLE).min(STACK_IDLE);
                        deadline = e.conn.poll_timeout().map_or(stack_at, |t| t.min(stack_at));
                    }
                    out.extend(std::iter::from_fn(|| e.conn.poll_transmit()));
                    events.extend(std::iter::from_fn(|| e.conn.poll_event()));
                }
                for ev in events.drain(..) {
                    self.on_event(ev);
                }
                self.send_all(&mut out).await;
                spare.extend(out.drain(..).map(|t| t.payload));
                if last {
                    break;
                }
            }
            if !self.closed_regions.is_empty() {
                deadline = now;
            }
            self.shared.counters.derp_reconnects.store(self.relays.reconnects(), Relaxed);
        }
    }

    /// Carries out one request of the core.
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::DerpMap(dm) => self.closed_regions.extend(self.relays.set_map(&dm)),
            Event::Connect(region) => self.relays.ensure(region),
            Event::Home(region) => self.relays.set_home(region),
            Event::Resolve(names) => {
                let tx = self.answer_tx.clone();
                tokio::spawn(async move {
                    let r = netcheck::resolve_hosts(names, Duration::from_secs(3)).await;
                    let _ = tx.send(Answer::Resolved(r)).await;
                });
            }
            Event::MeasureHttps(dm) => {
                let (net, tx) = (Arc::clone(&self.net), self.answer_tx.clone());
                tokio::spawn(async move {
                    let l = crate::derphttp::measure_regions(net, &dm, Duration::from_secs(3)).await;
                    let _ = tx.send(Answer::Latency(l)).await;
                });
            }
            Event::NetInfo(info) => {
                self.shared.net_info.send_if_modified(|cur| {
                    let changed = *cur != info;
                    *cur = info;
                    changed
                });
            }
        }
    }

    /// Sends what the core queued, in order (the transmits stay in `out`, for their buffers).
    /// Consecutive datagrams to one address go out
    /// together through [`Datagram::send_segments`] (one system call where the OS segments
    /// them), as long as they have one size but the last.
    async fn send_all(&mut self, out: &mut [Transmit]) {
        let mut i = 0;
        while i < out.len() {
            let dst = match out[i].path {
                Path::Direct(a) => a,
                Path::Derp(region) => {
                    let t = &mut out[i];
                    tracing::trace!(region, peer = %t.peer.short(), len = t.payload.len(), "send over DERP");
                    if !self.relays.send(region, t.peer, std::mem::take(&mut t.payload)) {
                        self.shared.counters.tx_no_path.fetch_add(1, Relaxed);
                    }
                    i += 1;
                    continue;
                }
            };
            let run = segment_run(&out[i..], dst);
            let segs: Vec<&[u8]> = out[i..i + run].iter().map(|t| t.payload.as_slice()).collect();
            i += run;
            let dst = match dst {
                // Skip rather than count as errors: the peer may list candidates of both families.
                SocketAddr::V6(_) if self.v4_only => continue,
                // A dual-stack IPv6 socket reaches IPv4 peers through mapped addresses.
                SocketAddr::V4(v4) if !self.v4_only => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
                _ => dst,
            };
            if let Err(e) = self.udp.send_segments(&segs, dst).await {
                self.shared.counters.tx_socket_error.fetch_add(segs.len() as u64, Relaxed);
                tracing::debug!(%dst, error = %e, "udp send failed");
            }
        }
    }
}

/// How many of `ts` (the first of which goes straight to `dst`) can leave in one segmented
/// send: same address, same size, except that the last may be shorter, within the kernel's
/// limits.
fn segment_run(ts: &[Transmit], dst: SocketAddr) -> usize {
    let Some(size) = ts.first().map(|t| t.payload.len()) else { return 0 };
    let (mut n, mut bytes) = (0, 0);
    for t in ts {
        let len = t.payload.len();
        if t.path != Path::Direct(dst) || len > size || bytes + len > BATCH_BYTES || n == BATCH_SEGMENTS {
            break;
        }
        n += 1;
        bytes += len;
        if len < size {
            break;
        }
    }
    n.max(1)
}

/// Feeds the core datagrams from `src` that arrived coalesced in `data`, each `seg` bytes
/// but the last. An empty datagram is one datagram too (the core counts it as malformed).
fn handle_segments(conn: &mut Conn, now: Instant, src: SocketAddr, data: &[u8], seg: usize) {
    if data.is_empty() {
        conn.handle_udp(now, src, data);
        return;
    }
    for d in data.chunks(seg.max(1)) {
        conn.handle_udp(now, src, d);
    }
}

/// Feeds the core what a region's DERP connection delivered.
fn on_relay(conn: &mut Conn, now: Instant, r: Inbound) {
    match r {
        Inbound::Message { tag: region, msg: Received::Packet { src, packet } } => {
            conn.handle_relayed(now, region, src, &packet)
        }
        Inbound::Message { tag: region, msg: Received::PeerGone { peer, reason } } => {
            tracing::debug!(region, peer = %peer.short(), ?reason, "DERP peer gone")
        }
        Inbound::Message { tag: region, msg: Received::Health { problem } } if !problem.is_empty() => {
            tracing::warn!(region, %problem, "DERP server reports a problem")
        }
        Inbound::Message { .. } => {}
        Inbound::Status { tag: region, up } => conn.handle_relay_status(now, region, up),
    }
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
