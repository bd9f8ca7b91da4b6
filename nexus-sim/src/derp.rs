//! nexus-sim's embedded DERP relay, in the manner of Headscale's embedded DERP server.
//!
//! One [`DerpServer`] holds the routing table for every region this process serves, so a
//! packet between clients homed in different regions is handed over in memory (a real
//! deployment would mesh separate `derper`s with ForwardPacket). Each region is reachable on
//! its own listener; region 1 shares the control plane's port.
//!
//! Every listener speaks plain HTTP and TLS on the same port ([`DualListener`]): Tailscale
//! v1.90 clients always dial DERP nodes from a DERP map over HTTPS (plain HTTP only with the
//! `TS_DEBUG_USE_DERP_HTTP` debug knob), so the DERP map marks these nodes `InsecureForTests`
//! and the listener answers TLS with a self-signed certificate. citadel's own client and the
//! tests may use either.
//!
//! Frames from peers are untrusted: a malformed frame closes that one connection, never the
//! server; per-client send queues are bounded so a slow reader never blocks the relay. A full
//! queue drops the oldest packet of the source holding the most of it, so one flooding sender
//! cannot crowd the others out of a shared destination.

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Buf, BytesMut};
use citadel_proto::derp::{self as codec, ClientInfo, Frame, PeerGoneReason, PeerPresentFlags, ServerInfo};
use citadel_proto::keys::{NodePublic, PrivateKey};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

/// Packets queued per client before the oldest is dropped (Tailscale's server default).
pub const DEFAULT_QUEUE_DEPTH: usize = 32;
/// Control frames (pongs, peer-gone, peer-present) queued per client; beyond this they are
/// dropped too, since a client that far behind is about to be cut off anyway.
const CONTROL_QUEUE_DEPTH: usize = 256;
/// How long a new connection may take to log in (send its ClientInfo).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one flush to a client may block before the client is dropped as stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accepted TCP connection may stay silent before its first byte decides
/// between TLS and plain HTTP.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Decides whether a node key may use the relay (`--derp-verify-clients`).
pub type Verifier = Arc<dyn Fn(&NodePublic) -> bool + Send + Sync>;

/// Decides whether a packet from the first key may be relayed to the second; a refused
/// packet is dropped silently (no `PeerGone`, so the relay tells a stranger nothing).
pub type RelayPolicy = Arc<dyn Fn(&NodePublic, &NodePublic) -> bool + Send + Sync>;

/// How a [`DerpServer`] behaves.
#[derive(Clone)]
pub struct DerpOptions {
    /// The relay's private key (its DERP identity).
    pub key: PrivateKey,
    /// When set, only keys it accepts may log in.
    pub verifier: Option<Verifier>,
    /// When set, only packets it allows are relayed.
    pub relay_policy: Option<RelayPolicy>,
    /// Clients presenting this mesh key (64 hex digits) may watch connections, close peers
    /// and forward packets, as other DERP servers of a region mesh do.
    pub mesh_key: Option<String>,
    /// Packets queued per client ([`DEFAULT_QUEUE_DEPTH`]).
    pub queue_depth: usize,
    /// Keep-alive interval ([`codec::KEEP_ALIVE`]).
    pub keepalive: Duration,
}

impl DerpOptions {
    /// Defaults with a fresh random key.
    pub fn new() -> Self {
        DerpOptions {
            key: PrivateKey::generate(&mut rand::thread_rng()),
            verifier: None,
            relay_policy: None,
            mesh_key: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            keepalive: codec::KEEP_ALIVE,
        }
    }
}

impl Default for DerpOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters of a [`DerpServer`] since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DerpStats {
    /// Connections that completed login.
    pub accepted: u64,
    /// Connections refused (stopped, failed login, verification).
    pub refused: u64,
    /// Packets handed to a destination's queue.
    pub packets_relayed: u64,
    /// Packets dropped (unknown destination or full queue).
    pub packets_dropped: u64,
    /// Logged-in connections closed for a malformed, truncated or forbidden frame.
    pub protocol_errors: u64,
    /// Clients connected now.
    pub clients: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    relayed: AtomicU64,
    dropped: AtomicU64,
    protocol_errors: AtomicU64,
}

/// One connected client as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSummary {
    /// The client's node key.
    pub key: NodePublic,
    /// Region whose listener the client connected to.
    pub region: i32,
    /// Whether the client said this is its home region (NotePreferred).
    pub preferred: bool,
    /// The client's address as the relay saw it.
    pub remote: Option<SocketAddr>,
}

struct Queues {
    packets: PacketQueue,
    control: VecDeque<Frame>,
}

/// One destination's relayed packets, oldest first, with how many each source holds.
#[derive(Default)]
struct PacketQueue {
    packets: VecDeque<(NodePublic, Vec<u8>)>,
    per_source: BTreeMap<NodePublic, usize>,
}

impl PacketQueue {
    /// Appends a packet; when `depth` are queued already, first drops the oldest packet of the
    /// source with the most queued (the newcomer's own if it is that source). Returns false
    /// when a packet was dropped.
    fn push(&mut self, src: NodePublic, packet: Vec<u8>, depth: usize) -> bool {
        let mut kept = true;
        while self.packets.len() >= depth.max(1) {
            kept = false;
            let heaviest = self.per_source.iter().max_by_key(|(_, n)| **n).map(|(k, _)| *k);
            let at = heaviest.and_then(|h| self.packets.iter().position(|(s, _)| *s == h)).unwrap_or(0);
            if let Some((s, _)) = self.packets.remove(at) {
                self.forget(&s);
            }
        }
        *self.per_source.entry(src).or_default() += 1;
        self.packets.push_back((src, packet));
        kept
    }

    fn forget(&mut self, src: &NodePublic) {
        if let Some(n) = self.per_source.get_mut(src) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(src);
            }
        }
    }

    /// Takes every queued packet, oldest first.
    fn take(&mut self) -> VecDeque<(NodePublic, Vec<u8>)> {
        self.per_source.clear();
        std::mem::take(&mut self.packets)
    }
}

struct Client {
    id: u64,
    key: NodePublic,
    region: i32,
    remote: Option<SocketAddr>,
    can_mesh: bool,
    preferred: AtomicBool,
    queues: Mutex<Queues>,
    /// Wakes the writer: something was queued, or the connection is closing.
    wake: Notify,
    closed: watch::Sender<bool>,
}

impl Client {
    fn close(&self) {
        self.closed.send_replace(true);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Queues a relayed packet; a full queue drops an old one of its heaviest source (fresher
    /// packets matter more to a tunnel than stale ones). Returns false when one was dropped.
    fn push_packet(&self, src: NodePublic, packet: Vec<u8>, depth: usize) -> bool {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let kept = q.packets.push(src, packet, depth);
        drop(q);
        self.wake.notify_one();
        kept
    }

    fn push_control(&self, f: Frame) {
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if q.control.len() < CONTROL_QUEUE_DEPTH {
            q.control.push_back(f);
        }
        drop(q);
        self.wake.notify_one();
    }
}

#[derive(Default)]
struct Table {
    by_key: BTreeMap<NodePublic, Arc<Client>>,
    /// For each source key, the keys that received packets from it: they get a PeerGone when
    /// the source disconnects, so they can drop their routes through this relay.
    heard_from: BTreeMap<NodePublic, BTreeSet<NodePublic>>,
    /// Mesh peers that sent WatchConns, by connection id.
    watchers: BTreeMap<u64, Arc<Client>>,
}

/// The relay: routing table, login, per-client queues, fault switch.
pub struct DerpServer {
    key: PrivateKey,
    public: NodePublic,
    opts: DerpOptions,
    table: Mutex<Table>,
    next_id: AtomicU64,
    stopped: AtomicBool,
    counters: Counters,
}

impl DerpServer {
    /// A relay with `opts`.
    pub fn new(opts: DerpOptions) -> Arc<DerpServer> {
        Arc::new(DerpServer {
            key: opts.key.clone(),
            public: NodePublic(opts.key.public_bytes()),
            opts,
            table: Mutex::new(Table::default()),
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            counters: Counters::default(),
        })
    }

    /// The relay's public key (sent in the ServerKey frame).
    pub fn public_key(&self) -> NodePublic {
        self.public
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated in a way that
        // matters more than losing the relay, so keep serving.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fault switch: while stopped, upgrades are refused with 503 and every open DERP
    /// connection is closed now; resuming accepts connections again.
    pub fn set_stopped(&self, stopped: bool) {
        self.stopped.store(stopped, Ordering::SeqCst);
        if stopped {
            let clients: Vec<Arc<Client>> = self.table().by_key.values().cloned().collect();
            tracing::info!(clients = clients.len(), "DERP stopped: closing every connection");
            for c in clients {
                c.close();
            }
        } else {
            tracing::info!("DERP resumed");
        }
    }

    /// True while [`DerpServer::set_stopped`] holds the relay stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Whether `key` is connected now.
    pub fn is_connected(&self, key: &NodePublic) -> bool {
        self.table().by_key.contains_key(key)
    }

    /// The connected clients.
    pub fn clients(&self) -> Vec<ClientSummary> {
        let t = self.table();
        let mut v: Vec<ClientSummary> = t
            .by_key
            .values()
            .map(|c| ClientSummary {
                key: c.key,
                region: c.region,
                preferred: c.preferred.load(Ordering::Relaxed),
                remote: c.remote,
            })
            .collect();
        v.sort_by_key(|c| c.key);
        v
    }

    /// The keys of the connected clients, in no order.
    pub fn client_keys(&self) -> Vec<NodePublic> {
        self.table().by_key.keys().copied().collect()
    }

    /// Closes `key`'s connection, if any.
    pub fn close_client(&self, key: &NodePublic) {
        if let Some(c) = self.table().by_key.get(key).cloned() {
            c.close();
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> DerpStats {
        let c = &self.counters;
        DerpStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            packets_relayed: c.relayed.load(Ordering::Relaxed),
            packets_dropped: c.dropped.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            clients: self.table().by_key.len() as u64,
        }
    }

    /// The DERP routes (`/derp`, `/derp/probe`, `/derp/latency-check`, `/generate_204`) for
    /// the listener of `region`.
    pub fn router(self: &Arc<Self>, region: i32) -> Router {
        let st = RegionState { server: self.clone(), region };
        Router::new()
            .route(codec::upgrade::PATH, get(upgrade_handler))
            .route(codec::upgrade::PROBE_PATH, get(probe).head(probe))
            .route(codec::upgrade::LATENCY_CHECK_PATH, get(probe).head(probe))
            .route(codec::upgrade::GENERATE_204_PATH, get(no_content))
            .with_state(st)
    }

    fn register(&self, c: Arc<Client>) {
        let mut t = self.table();
        if let Some(old) = t.by_key.insert(c.key, c.clone()) {
            // The newest connection of a key wins: the old one is most likely a dead TCP
            // connection the client has not noticed yet, or a previous process.
            tracing::debug!(key = %c.key.short(), "replacing previous DERP connection of this key");
            old.close();
        }
        let present = Frame::PeerPresent {
            peer: c.key,
            endpoint: c.remote,
            flags: PeerPresentFlags(if c.can_mesh {
                PeerPresentFlags::IS_MESH_PEER
            } else {
                PeerPresentFlags::IS_REGULAR
            }),
        };
        for w in t.watchers.values() {
            w.push_control(present.clone());
        }
    }

    fn unregister(&self, c: &Arc<Client>) {
        let mut t = self.table();
        t.watchers.remove(&c.id);
        let active = t.by_key.get(&c.key).is_some_and(|cur| cur.id == c.id);
        if !active {
            // Replaced by a newer connection of the same key: the peer is still here.
            return;
        }
        t.by_key.remove(&c.key);
        let gone = Frame::PeerGone { peer: c.key, reason: PeerGoneReason::DISCONNECTED };
        if let Some(listeners) = t.heard_from.remove(&c.key) {
            for k in listeners {
                if let Some(dst) = t.by_key.get(&k) {
                    dst.push_control(gone.clone());
                }
            }
        }
        for w in t.watchers.values() {
            w.push_control(gone.clone());
        }
    }

    /// Routes one packet from `src` to `dst`'s queue.
    fn relay(&self, from: &Client, src: NodePublic, dst: NodePublic, packet: Vec<u8>) {
        if let Some(allowed) = &self.opts.relay_policy {
            if !allowed(&src, &dst) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(src = %src.short(), dst = %dst.short(), "DERP packet refused by policy");
                return;
            }
        }
        let target = {
            let mut t = self.table();
            let target = t.by_key.get(&dst).cloned();
            if target.is_some() {
                t.heard_from.entry(src).or_default().insert(dst);
            }
            target
        };
        match target {
            Some(d) => {
                if d.push_packet(src, packet, self.opts.queue_depth) {
                    self.counters.relayed.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.relayed.fetch_add(1, Ordering::Relaxed);
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                // Like Tailscale's server, only disco traffic earns a "not here" answer: it
                // is rare, and it is what the sender uses to stop trying this path.
                if citadel_proto::disco::looks_like_disco(&packet) {
                    from.push_control(Frame::PeerGone { peer: dst, reason: PeerGoneReason::NOT_HERE });
                }
            }
        }
    }

    /// Serves one upgraded connection: login, then relay until either side closes.
    /// `tls` only labels the log line.
    pub async fn serve_conn<S>(self: Arc<Self>, io: S, region: i32, remote: Option<SocketAddr>, tls: bool)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut buf = BytesMut::with_capacity(64 << 10);
        let login = async {
            write_frame(&mut wr, &Frame::ServerKey { key: self.public }).await?;
            let frame = read_frame(&mut rd, &mut buf).await?.ok_or_else(|| io::Error::other("closed before login"))?;
            let Frame::ClientInfo { key, sealed } = frame else {
                return Err(io::Error::other(format!("expected ClientInfo, got {:?}", frame.frame_type())));
            };
            let info = ClientInfo::open(&self.key, &key, &sealed).map_err(io::Error::other)?;
            Ok::<_, io::Error>((key, info))
        };
        let (key, info) = match tokio::time::timeout(LOGIN_TIMEOUT, login).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?remote, "DERP login failed: {e}");
                return;
            }
            Err(_) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(?remote, "DERP login timed out");
                return;
            }
        };
        if let Some(v) = &self.opts.verifier {
            if !v(&key) {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(key = %key, "DERP client refused: not a known node");
                let _ = write_frame(&mut wr, &Frame::Health { problem: "unknown node key".into() }).await;
                return;
            }
        }
        if self.is_stopped() {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let can_mesh = match (&self.opts.mesh_key, &info.mesh_key) {
            (Some(ours), Some(theirs)) => constant_time_eq(ours.as_bytes(), theirs.as_bytes()),
            _ => false,
        };
        let (closed, _) = watch::channel(false);
        let client = Arc::new(Client {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            region,
            remote,
            can_mesh,
            preferred: AtomicBool::new(false),
            queues: Mutex::new(Queues { packets: PacketQueue::default(), control: VecDeque::new() }),
            wake: Notify::new(),
            closed,
        });
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        // Public keys are not secret; logging the full key lets tests and operators find a node.
        tracing::info!(key = %key, region, ?remote, tls, app = %info.app_name, "DERP client connected");
        // Registered before the client learns it is logged in, so that a packet sent to it
        // the moment its login completes finds it (it waits in its queue).
        self.register(client.clone());
        let mut nonce = [0u8; codec::NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        if write_frame(&mut wr, &ServerInfo::current().seal(&self.key, &key, nonce)).await.is_err() {
            client.close();
            self.unregister(&client);
            return;
        }

        let writer = tokio::spawn(write_loop(client.clone(), wr, self.opts.keepalive));
        let mut closed_rx = client.closed.subscribe();
        let result = tokio::select! {
            r = self.read_loop(&client, &mut rd, &mut buf) => r,
            _ = closed_rx.wait_for(|c| *c) => Ok(()),
        };
        if let Err(e) = result {
            // Decoding and permission failures are `Other`, a frame cut off by the end of the
            // stream is `UnexpectedEof`; resets and the like are just the network.
            if matches!(e.kind(), io::ErrorKind::Other | io::ErrorKind::UnexpectedEof) {
                self.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(key = %key.short(), "DERP connection closed: {e}");
        }
        client.close();
        self.unregister(&client);
        let _ = writer.await;
        tracing::info!(key = %key, region, "DERP client disconnected");
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        c: &Arc<Client>,
        rd: &mut R,
        buf: &mut BytesMut,
    ) -> Result<(), io::Error> {
        loop {
            let Some(frame) = read_frame(rd, buf).await? else {
                return Ok(());
            };
            match frame {
                Frame::SendPacket { dst, packet } => self.relay(c, c.key, dst, packet),
                Frame::NotePreferred { preferred } => c.preferred.store(preferred, Ordering::Relaxed),
                Frame::Ping { data } => c.push_control(Frame::Pong { data }),
                Frame::WatchConns | Frame::ClosePeer { .. } | Frame::ForwardPacket { .. } if !c.can_mesh => {
                    return Err(io::Error::other("mesh frame from a client without the mesh key"));
                }
                Frame::WatchConns => {
                    let mut t = self.table();
                    for other in t.by_key.values().filter(|o| o.id != c.id) {
                        c.push_control(Frame::PeerPresent {
                            peer: other.key,
                            endpoint: other.remote,
                            flags: PeerPresentFlags(PeerPresentFlags::IS_REGULAR),
                        });
                    }
                    t.watchers.insert(c.id, c.clone());
                }
                Frame::ClosePeer { peer } => self.close_client(&peer),
                Frame::ForwardPacket { src, dst, packet } => self.relay(c, src, dst, packet),
                // Keep-alives, pongs, a repeated ClientInfo, server-to-client frames and
                // unknown types are skipped, as Tailscale's server does.
                _ => {}
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> io::Result<()> {
    w.write_all(&f.to_vec()).await?;
    w.flush().await
}

/// Reads one frame, buffering in `buf`; `Ok(None)` on a clean end of stream between frames.
/// Oversized headers are refused before their payload is read.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
    loop {
        if let Some(raw) = codec::split_frame(buf).map_err(io::Error::other)? {
            let n = raw.wire_len();
            let f = Frame::parse(raw.ty, raw.payload).map_err(io::Error::other);
            buf.advance(n);
            return f.map(Some);
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        if rd.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated DERP frame"));
        }
    }
}

/// Drains the client's queues into the socket, batching whatever accumulated into one flush,
/// and sends keep-alives.
async fn write_loop<W: AsyncWrite + Unpin>(c: Arc<Client>, mut wr: W, keepalive: Duration) {
    let mut out = Vec::with_capacity(64 << 10);
    let mut ka = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    loop {
        tokio::select! {
            _ = c.wake.notified() => {}
            _ = ka.tick() => Frame::KeepAlive.encode(&mut out),
        }
        if c.is_closed() {
            break;
        }
        let (control, packets) = {
            let mut q = c.queues.lock().unwrap_or_else(|e| e.into_inner());
            (std::mem::take(&mut q.control), q.packets.take())
        };
        for f in control {
            f.encode(&mut out);
        }
        for (src, packet) in packets {
            Frame::RecvPacket { src, packet }.encode(&mut out);
        }
        if out.is_empty() {
            continue;
        }
        let flush = async {
            wr.write_all(&out).await?;
            wr.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, flush).await {
            Ok(Ok(())) => out.clear(),
            Ok(Err(e)) => {
                tracing::debug!(key = %c.key.short(), "DERP write failed: {e}");
                break;
            }
            Err(_) => {
                tracing::info!(key = %c.key.short(), "DERP client stuck for {WRITE_TIMEOUT:?}: closing");
                break;
            }
        }
        if out.capacity() > 1 << 20 {
            out = Vec::with_capacity(64 << 10);
        }
    }
    c.close();
    let _ = wr.shutdown().await;
}

#[derive(Clone)]
struct RegionState {
    server: Arc<DerpServer>,
    region: i32,
}

/// Who is on the other end of a connection accepted by [`DualListener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether the connection speaks TLS.
    pub tls: bool,
}

impl Connected<axum::serve::IncomingStream<'_, DualListener>> for RemoteAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, DualListener>) -> Self {
        *stream.remote_addr()
    }
}

async fn upgrade_handler(State(st): State<RegionState>, mut req: Request) -> Response {
    let up = header(req.headers(), "upgrade").to_ascii_lowercase();
    if up != "derp" {
        let msg = if up == "websocket" {
            "DERP over WebSocket is not supported here; use Upgrade: DERP"
        } else {
            "DERP requires connection upgrade"
        };
        return (StatusCode::UPGRADE_REQUIRED, msg).into_response();
    }
    if st.server.is_stopped() {
        st.server.counters.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "DERP stopped").into_response();
    }
    if header(req.headers(), codec::upgrade::FAST_START_HEADER) == "1" {
        // Only clients that found our key in a TLS "metacert" ask for this; our certificate
        // carries none, so answering with the usual 101 is what such a client would get
        // from a server without the optimization.
        tracing::debug!("ignoring Derp-Fast-Start");
    }
    let remote = req.extensions().get::<ConnectInfo<RemoteAddr>>().map(|c| c.0);
    let tls = remote.is_some_and(|r| r.tls);
    let remote = remote.map(|r| r.addr);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let server = st.server.clone();
    let region = st.region;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => server.serve_conn(TokioIo::new(up), region, remote, tls).await,
            Err(e) => tracing::debug!("DERP upgrade failed: {e}"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", codec::upgrade::PROTOCOL)
        .header("connection", "Upgrade")
        .header(codec::upgrade::VERSION_HEADER, codec::PROTOCOL_VERSION.to_string())
        .header(codec::upgrade::PUBLIC_KEY_HEADER, hex::encode(st.server.public.0))
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn probe() -> impl IntoResponse {
    ([("access-control-allow-origin", "*")], StatusCode::OK)
}

/// The captive-portal check: 204, echoing a well-formed challenge as Tailscale's server does.
async fn no_content(headers: HeaderMap) -> Response {
    let mut resp = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header("cache-control", "no-cache, no-store, must-revalidate, no-transform, max-age=0");
    let challenge = header(&headers, codec::upgrade::NO_CONTENT_CHALLENGE_HEADER);
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if !challenge.is_empty() && challenge.len() <= 64 && challenge.chars().all(ok_char) {
        resp = resp.header(codec::upgrade::NO_CONTENT_RESPONSE_HEADER, format!("response {challenge}"));
    }
    resp.body(Body::empty()).unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A self-signed TLS identity for the DERP listeners.
pub fn self_signed_tls(names: &[String]) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use tokio_rustls::rustls;
    let mut names = names.to_vec();
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    let ck = rcgen::generate_simple_self_signed(names)?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("self-signed key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A byte stream the relay serves: a plain TCP socket or a TLS session over one.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

/// Accepts TCP connections and serves each as TLS when its first byte is a TLS handshake
/// record (0x16), else as plain HTTP. Handshakes run in their own tasks so a slow client
/// never holds up `accept`.
pub struct DualListener {
    rx: mpsc::Receiver<(Box<dyn AsyncReadWrite>, RemoteAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What a TLS-only listener answers a plain-HTTP request with before closing.
const HTTPS_ONLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 52\r\n\r\nthis server speaks https only: use an https:// URL\r\n";

impl DualListener {
    /// Wraps `listener`; TLS connections use `tls`.
    pub fn new(listener: tokio::net::TcpListener, tls: Arc<tokio_rustls::rustls::ServerConfig>) -> io::Result<Self> {
        Self::with_plain_http(listener, tls, true)
    }

    /// Like [`DualListener::new`]; without `plain_http` a connection that does not start a TLS
    /// handshake gets a 400 naming https and is closed (an operator's certificate means clients
    /// must use it, never the clear).
    pub fn with_plain_http(
        listener: tokio::net::TcpListener,
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        plain_http: bool,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small control and DERP frames must not wait for Nagle + delayed ACK.
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let mut first = [0u8; 1];
                    let sniff = tokio::time::timeout(SNIFF_TIMEOUT, tcp.peek(&mut first)).await;
                    let (io, tls): (Box<dyn AsyncReadWrite>, bool) = match sniff {
                        Ok(Ok(1)) if first[0] == 0x16 => {
                            match tokio::time::timeout(SNIFF_TIMEOUT, acceptor.accept(tcp)).await {
                                Ok(Ok(tls)) => (Box::new(tls), true),
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => return,
                            }
                        }
                        Ok(Ok(1)) if plain_http => (Box::new(tcp), false),
                        Ok(Ok(1)) => {
                            use tokio::io::AsyncWriteExt;
                            tracing::debug!(%peer, "plain HTTP on a TLS-only listener refused");
                            let _ = tokio::time::timeout(SNIFF_TIMEOUT, async {
                                tcp.write_all(HTTPS_ONLY).await?;
                                tcp.shutdown().await
                            })
                            .await;
                            return;
                        }
                        _ => return,
                    };
                    let _ = tx.send((io, RemoteAddr { addr: peer, tls })).await;
                });
            }
        });
        Ok(DualListener { rx, local, task })
    }
}

impl Drop for DualListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for DualListener {
    type Io = Box<dyn AsyncReadWrite>;
    type Addr = RemoteAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(v) => v,
            // The accept task only ends when the listener is dropped; never resolve then.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<RemoteAddr> {
        Ok(RemoteAddr { addr: self.local, tls: false })
    }
}

/// Serves `app` on `listener` (plain HTTP and TLS) until the task is aborted.
pub fn serve(listener: DualListener, app: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let svc = app.into_make_service_with_connect_info::<RemoteAddr>();
        if let Err(e) = axum::serve(listener, svc).await {
            tracing::error!("server stopped: {e}");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn a_flooding_source_cannot_push_another_out_of_a_full_queue() {
        let (flood, quiet, third) = (NodePublic([1; 32]), NodePublic([2; 32]), NodePublic([3; 32]));
        let mut q = PacketQueue::default();
        let mut quiet_sent = 0u32;
        for i in 0..10_000u32 {
            q.push(flood, i.to_be_bytes().to_vec(), 32);
            if i % 1000 == 0 {
                q.push(quiet, quiet_sent.to_be_bytes().to_vec(), 32);
                quiet_sent += 1;
            }
        }
        q.push(third, b"x".to_vec(), 32);
        let got = q.take();
        assert_eq!(got.len(), 32);
        let quiet_kept: Vec<u32> = got
            .iter()
            .filter(|(s, _)| *s == quiet)
            .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
            .collect();
        // Never dropped: the flooder always holds more of the queue.
        assert_eq!(quiet_kept, (0..quiet_sent).collect::<Vec<_>>());
        assert!(got.iter().any(|(s, _)| *s == third));
        // The flooder keeps its newest packets, in order.
        let flood_kept: Vec<u32> = got
            .iter()
            .filter(|(s, _)| *s == flood)
            .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
            .collect();
        assert!(flood_kept.windows(2).all(|w| w[0] < w[1]) && *flood_kept.last().unwrap() == 9_999);
        // Emptied by take: the next push starts a fresh count.
        assert!(q.push(quiet, vec![], 1));
        assert!(!q.push(flood, vec![], 1));
        assert_eq!(q.take().into_iter().map(|(s, _)| s).collect::<Vec<_>>(), vec![flood]);
    }

    #[test]
    fn a_lone_source_keeps_its_newest_packets() {
        let src = NodePublic([9; 32]);
        let mut q = PacketQueue::default();
        let kept: Vec<bool> = (0..5u8).map(|i| q.push(src, vec![i], 3)).collect();
        assert_eq!(kept, [true, true, true, false, false]);
        assert_eq!(q.take().into_iter().map(|(_, p)| p[0]).collect::<Vec<_>>(), [2, 3, 4]);
    }

    #[tokio::test]
    async fn read_frame_handles_partial_and_garbage() {
        let f = Frame::Ping { data: [7; 8] }.to_vec();
        let mut two = f.clone();
        two.extend_from_slice(&f);
        let mut rd = &two[..];
        let mut buf = BytesMut::new();
        assert_eq!(read_frame(&mut rd, &mut buf).await.unwrap(), Some(Frame::Ping { data: [7; 8] }));
        assert_eq!(read_frame(&mut rd, &mut buf).await.unwrap(), Some(Frame::Ping { data: [7; 8] }));
        assert_eq!(read_frame(&mut rd, &mut buf).await.unwrap(), None);
        let mut trunc = &f[..7];
        assert!(read_frame(&mut trunc, &mut BytesMut::new()).await.is_err());
        let mut huge = &[0x04u8, 0xff, 0xff, 0xff, 0xff][..];
        assert!(read_frame(&mut huge, &mut BytesMut::new()).await.is_err());
    }
}
