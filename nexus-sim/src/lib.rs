//! nexus-sim: a Headscale-compatible coordination server small enough to start inside a test.
//!
//! It speaks Tailscale's ts2021 control protocol (so real Tailscale clients register with it),
//! keeps orgs (Headscale users) isolated from each other, serves Headscale's REST API v1 and
//! offers fault switches for tests. [`start`] runs it in-process; the `nexus-sim` binary wraps it.

#![warn(missing_docs)]

pub mod api;
pub mod chunks;
pub mod control;
pub mod derp;
pub mod device;
pub mod metrics;
pub mod policy;
pub mod routes;
pub mod store;
pub mod stun;
pub mod tls;
pub mod web;
mod woken;

use axum::extract::{Path, State};
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use citadel_proto::keys::NodePublic;
use citadel_proto::keys::PrivateKey;
use citadel_proto::tailcfg::DerpMap;
use citadel_proto::wall;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use store::Store;
use tokio::sync::watch;

/// Server configuration. `Debug` shows how many API keys there are and whether a mesh key is
/// set, never the keys.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// SQLite file; in memory when `None`.
    pub db: Option<PathBuf>,
    /// The URL clients use (for `/register/{id}` links); defaults to `http://<listen>`.
    pub server_url: String,
    /// Tailnet DNS suffix (nodes are `<name>.<base_domain>`).
    pub base_domain: String,
    /// API keys accepted in addition to those created through the API.
    pub api_keys: Vec<String>,
    /// Map-stream keep-alive interval.
    pub keepalive: Duration,
    /// How long an ephemeral node may stay offline before it is removed.
    pub ephemeral_timeout: Duration,
    /// How long a follow-up register request waits for approval before answering again.
    pub followup_wait: Duration,
    /// First addresses of the ranges handed out (index 1 is the first node).
    pub ipv4_base: Ipv4Addr,
    /// IPv6 base.
    pub ipv6_base: Ipv6Addr,
    /// How long an interactive registration waits for approval before it is dropped.
    pub pending_ttl: Duration,
    /// Lifetime of a node key from its registration or renewal; `None`: keys never expire.
    pub node_key_expiry: Option<Duration>,
    /// Lifetime of a device-authorization code.
    pub device_code_ttl: Duration,
    /// Minimum seconds between device-token polls.
    pub device_poll_interval: u64,
    /// Which DERP map nodes get, and whether nexus-sim relays itself.
    pub derp: DerpMode,
    /// Refuse DERP clients whose node key is not a live (registered, unexpired) node of this
    /// server; on by default.
    pub derp_verify_clients: bool,
    /// Mesh key (64 hex digits) that lets a DERP client watch connections and forward
    /// packets, as a region mesh peer; none by default.
    pub derp_mesh_key: Option<String>,
    /// ACL policy text (Headscale v2 HuJSON); `None` means the policy last set through the API
    /// and kept in the database (`db`), else [`policy::ORG_ISOLATION`].
    pub policy: Option<String>,
    /// Packets queued per DERP client before the oldest is dropped.
    pub derp_queue_depth: usize,
    /// DERP keep-alive interval.
    pub derp_keepalive: Duration,
    /// STUN listener for the embedded DERP regions; an unspecified IP means the IP of
    /// `listen`, port 0 picks a free port. `None`: no STUN (the map says `STUNPort: -1`).
    pub stun_listen: Option<SocketAddr>,
    /// The operator's TLS identity. With one, `server_url` defaults to `https://`, every
    /// listener presents it, and the embedded DERP map drops `InsecureForTests`; without one,
    /// TLS connections get a self-signed certificate.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            listen,
            db,
            server_url,
            base_domain,
            api_keys,
            keepalive,
            ephemeral_timeout,
            followup_wait,
            pending_ttl,
            node_key_expiry,
            ipv4_base,
            ipv6_base,
            device_code_ttl,
            device_poll_interval,
            derp,
            derp_verify_clients,
            derp_mesh_key,
            policy,
            derp_queue_depth,
            derp_keepalive,
            stun_listen,
            tls,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("db", db)
            .field("server_url", server_url)
            .field("base_domain", base_domain)
            .field("api_keys", &format_args!("<{} redacted>", api_keys.len()))
            .field("keepalive", keepalive)
            .field("ephemeral_timeout", ephemeral_timeout)
            .field("followup_wait", followup_wait)
            .field("pending_ttl", pending_ttl)
            .field("node_key_expiry", node_key_expiry)
            .field("ipv4_base", ipv4_base)
            .field("ipv6_base", ipv6_base)
            .field("device_code_ttl", device_code_ttl)
            .field("device_poll_interval", device_poll_interval)
            .field("derp", derp)
            .field("derp_verify_clients", derp_verify_clients)
            .field("derp_mesh_key", &derp_mesh_key.as_ref().map(|_| "<redacted>"))
            .field("policy", &policy.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("derp_queue_depth", derp_queue_depth)
            .field("derp_keepalive", derp_keepalive)
            .field("stun_listen", stun_listen)
            .field("tls", &tls.as_ref().map(|_| "<server identity>"))
            .finish()
    }
}

/// The DERP part of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum DerpMode {
    /// Relay in-process: `regions` regions with ids 1..=regions, region 1 on the server's own
    /// port and every further region on a listener of its own (same IP, free port).
    Embedded {
        /// How many regions.
        regions: u16,
    },
    /// Hand out this DERP map (tailcfg JSON, e.g. real `derper`s) and relay nothing.
    External(DerpMap),
    /// An empty DERP map and no relay.
    Off,
}

impl DerpMode {
    /// Reads an external map from a tailcfg `DERPMap` JSON file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<DerpMode> {
        let text = std::fs::read_to_string(path)?;
        let map: DerpMap = serde_json::from_str(&text)?;
        Ok(DerpMode::External(map))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:0".parse().expect("constant"),
            db: None,
            server_url: String::new(),
            base_domain: "nexus.sim".into(),
            api_keys: vec![],
            keepalive: Duration::from_secs(50),
            ephemeral_timeout: Duration::from_secs(120),
            followup_wait: Duration::from_secs(60),
            pending_ttl: Duration::from_secs(15 * 60),
            node_key_expiry: None,
            ipv4_base: Ipv4Addr::new(100, 64, 0, 0),
            ipv6_base: "fd7a:115c:a1e0::".parse().expect("constant"),
            device_code_ttl: Duration::from_secs(600),
            device_poll_interval: 5,
            derp: DerpMode::Embedded { regions: 1 },
            derp_verify_clients: true,
            derp_mesh_key: None,
            policy: None,
            derp_queue_depth: derp::DEFAULT_QUEUE_DEPTH,
            derp_keepalive: citadel_proto::derp::KEEP_ALIVE,
            stun_listen: Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))),
            tls: None,
        }
    }
}

/// Fault switches for tests (not part of any production path of citadel).
#[derive(Default)]
pub struct Faults {
    refuse: AtomicBool,
    drop_streams: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    derp: OnceLock<Arc<derp::DerpServer>>,
    /// `(receiver, leaked)` node keys: the leaked node is added to the receiver's map.
    leaks: std::sync::Mutex<Vec<(citadel_proto::keys::NodePublic, citadel_proto::keys::NodePublic)>>,
    /// `(receiver, leaked)` host names, for a server in another process than the test.
    host_leaks: std::sync::Mutex<Vec<(String, String)>>,
    register_requests: std::sync::atomic::AtomicU64,
}

/// Bound on [`Faults::leak_peer`] entries (a test switch, but still not unbounded).
const MAX_LEAKS: usize = 64;

impl Faults {
    /// While set, new control connections are refused with 503.
    pub fn set_refuse_control(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }
    /// True while control connections are refused.
    pub fn refuse_control(&self) -> bool {
        self.refuse.load(Ordering::SeqCst)
    }
    /// Ends every open map stream now (clients must reconnect).
    pub fn drop_streams(&self) {
        self.drop_streams.send_modify(|g| *g += 1);
    }
    /// Resolves when [`Faults::drop_streams`] is called or the server shuts down, after this
    /// call (not after the future's first poll: a stream that has not waited yet ends too).
    pub fn streams_dropped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (mut drops, mut shutdown) = (self.drop_streams.subscribe(), self.shutdown.subscribe());
        async move {
            tokio::select! {
                _ = drops.changed() => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
    }
    /// Stops the embedded DERP relay (open DERP connections are closed, new ones refused
    /// with 503) or resumes it. No effect without an embedded relay.
    pub fn set_derp_stopped(&self, on: bool) {
        if let Some(d) = self.derp.get() {
            d.set_stopped(on);
        }
    }
    /// The embedded DERP relay's counters, if it runs.
    pub fn derp_stats(&self) -> Option<derp::DerpStats> {
        self.derp.get().map(|d| d.stats())
    }
    /// True while the embedded DERP relay is stopped.
    pub fn derp_stopped(&self) -> bool {
        self.derp.get().is_some_and(|d| d.is_stopped())
    }
    /// Breaks org isolation on purpose, for tests of what the data plane does with a netmap
    /// that lists a node of another org: every map built for the node with key `into` from now
    /// on also lists the node with key `peer` (once it is registered), whatever its org.
    /// Maps already sent are not updated. Returns false (and does nothing) past 64 entries.
    pub fn leak_peer(&self, into: citadel_proto::keys::NodePublic, peer: citadel_proto::keys::NodePublic) -> bool {
        let mut l = self.leaks.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= MAX_LEAKS {
            return false;
        }
        l.push((into, peer));
        true
    }

    /// True once any [`Faults::leak_peer`] or [`Faults::leak_peer_by_hostname`] entry exists.
    pub(crate) fn leaks_any(&self) -> bool {
        !self.leaks.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
            || !self.host_leaks.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// [`Faults::leak_peer`] by host name (as the nodes report it), for a server a test
    /// starts as a process (`serve --fault-leak-peer INTO=PEER`). Same bound.
    pub fn leak_peer_by_hostname(&self, into: &str, peer: &str) -> bool {
        let mut l = self.host_leaks.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() >= MAX_LEAKS {
            return false;
        }
        l.push((into.to_string(), peer.to_string()));
        true
    }

    /// `build(s, me)` plus the peers [`Faults::leak_peer`] leaks into `me`'s map; each leaked
    /// node is described as its own map (built by `build`) describes it.
    pub(crate) fn with_leaks(
        &self,
        s: &Shared,
        me: &store::Node,
        build: fn(&Shared, &store::Node) -> citadel_proto::tailcfg::MapResponse,
    ) -> citadel_proto::tailcfg::MapResponse {
        let mut m = build(s, me);
        let leaked: Vec<citadel_proto::keys::NodePublic> = {
            let l = self.leaks.lock().unwrap_or_else(|e| e.into_inner());
            l.iter().filter(|(into, _)| *into == me.node_key).map(|(_, p)| *p).collect()
        };
        let by_name: Vec<String> = {
            let l = self.host_leaks.lock().unwrap_or_else(|e| e.into_inner());
            l.iter().filter(|(into, _)| *into == me.hostname).map(|(_, p)| p.clone()).collect()
        };
        if leaked.is_empty() && by_name.is_empty() {
            return m;
        }
        let peers = m.peers.get_or_insert_with(Vec::new);
        let wanted = |n: &store::Node| leaked.contains(&n.node_key) || by_name.contains(&n.hostname);
        for n in s.store.nodes(None).iter().filter(|n| wanted(n) && n.id != me.id) {
            if let Some(node) = build(s, n).node {
                if !peers.iter().any(|p| p.key == node.key) {
                    peers.push(node);
                }
            }
        }
        m
    }

    /// Counts one `/machine/register` request (whatever its body).
    pub fn note_register_request(&self) {
        self.register_requests.fetch_add(1, Ordering::SeqCst);
    }
    /// How many `/machine/register` requests reached this server.
    pub fn register_requests(&self) -> u64 {
        self.register_requests.load(Ordering::SeqCst)
    }
    /// Resolves once the server is shutting down.
    pub async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// State shared by every handler.
pub struct Inner {
    /// Users, keys, nodes and their change logs.
    pub store: Store,
    /// The server's Noise (machine) private key.
    pub server_key: PrivateKey,
    /// Public key of the node-key challenge sent in the early Noise payload.
    pub challenge_pub: [u8; 32],
    /// The configuration it was started with.
    pub cfg: Config,
    /// The DERP map handed to clients.
    pub derp_map: DerpMap,
    /// Test fault switches.
    pub faults: Faults,
    /// Device-authorization flows waiting for an admin.
    pub device: device::Flows,
    /// Prometheus counters.
    pub metrics: metrics::Metrics,
    /// The active ACL policy.
    pub policy: policy::PolicyState,
    /// Map entries serialized once for every viewer.
    pub entries: control::EntryCache,
    /// Org deltas encoded once for every member they are the same bytes for.
    pub deltas: control::DeltaCache,
    /// Full maps' peer lists, compressed in chunks and kept.
    pub chunks: chunks::ChunkCache,
    /// Which node is primary for each subnet route, once per store version.
    pub primaries: control::PrimaryCache,
    /// Nodes waiting for their announce grace (see [`Inner::schedule_announce`]), drained by one
    /// task started with the first.
    announcer: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, u64)>>,
}

/// Handle to the shared state.
pub type Shared = Arc<Inner>;

impl Inner {
    /// Tells node `id`'s org about it after [`control::ANNOUNCE_GRACE`] unless its first map
    /// stream did first (see [`store::Store::register_unannounced`]). One task for all of them,
    /// in registration order (each waits the same grace): a task per registration cost 0.2 KB
    /// more resident memory per registered node (81,000 registrations, `bench-control --offline`).
    /// The queue holds the last grace's worth of successful registrations, each of which also
    /// holds a node record.
    pub fn schedule_announce(self: &Arc<Self>, id: u64) {
        let tx = self.announcer.get_or_init(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, u64)>();
            // Weak: a server stopped meanwhile is not kept alive for it.
            let s = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some((at, id)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let Some(s) = s.upgrade() else { return };
                    s.store.announce(id);
                }
            });
            tx
        });
        if tx.send((tokio::time::Instant::now() + control::ANNOUNCE_GRACE, id)).is_err() {
            // Its task is gone (the runtime that started it ended): tell the org now.
            self.store.announce(id);
        }
    }

    /// Removes node `id` after the ephemeral timeout if it is ephemeral and still offline.
    pub fn schedule_ephemeral_cleanup(self: &Arc<Self>, id: u64) {
        let s = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(s.cfg.ephemeral_timeout).await;
            if let Some(n) = s.store.node(id) {
                if n.ephemeral && !s.store.is_online(id) {
                    tracing::info!(node = id, "removing offline ephemeral node");
                    let _ = s.store.delete_node(id);
                }
            }
        });
    }
}

/// Builds the shared state: opens the store and loads (or makes) the server's machine key.
/// The DERP map is the external one, or empty (the embedded relay's map needs the bound
/// addresses: [`start`] fills it).
pub fn build(cfg: Config) -> anyhow::Result<Shared> {
    let map = match &cfg.derp {
        DerpMode::External(m) => m.clone(),
        _ => DerpMap::default(),
    };
    build_with_map(cfg, map)
}

fn build_with_map(cfg: Config, derp_map: DerpMap) -> anyhow::Result<Shared> {
    let store = Store::open(cfg.db.as_deref())?;
    let key_text = store.meta_or_insert("server_key", || PrivateKey::generate(&mut rand::thread_rng()).to_text());
    let server_key = PrivateKey::from_text(&key_text).map_err(|e| anyhow::anyhow!("stored server key: {e}"))?;
    store.set_config_api_keys(&cfg.api_keys);
    let policy_state = match (&cfg.policy, store.stored_policy()?) {
        // A policy set through the API, kept in the database, unless one is given explicitly.
        (None, Some((text, at))) => policy::PolicyState::set_at(
            policy::Policy::parse(&text).map_err(|e| {
                anyhow::anyhow!(
                    "the policy stored in the database is invalid (start with --policy FILE to replace it):\n{e}"
                )
            })?,
            at,
        ),
        (given, _) => policy::PolicyState::new(
            policy::Policy::parse(given.as_deref().unwrap_or(policy::ORG_ISOLATION))
                .map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?,
        ),
    };
    let challenge = PrivateKey::generate(&mut rand::thread_rng());
    Ok(Arc::new(Inner {
        store,
        server_key,
        challenge_pub: challenge.public_bytes(),
        derp_map,
        cfg,
        faults: Faults::default(),
        device: device::Flows::default(),
        metrics: metrics::Metrics::default(),
        policy: policy_state,
        entries: Default::default(),
        deltas: Default::default(),
        chunks: Default::default(),
        primaries: Default::default(),
        announcer: Default::default(),
    }))
}

async fn register_page(State(s): State<Shared>, Path(id): Path<String>) -> Html<String> {
    let body = match s.store.pending(&id) {
        Some(p) => format!(
            "<html><body><h1>Machine registration</h1><p>Host <b>{}</b> asks to join.</p>\
             <p>An admin approves it with:</p><pre>nexus-sim nodes register --user USER --key {id}</pre></body></html>",
            html_escape(&p.hostinfo.hostname)
        ),
        None => "<html><body><h1>Unknown or finished registration</h1></body></html>".to_string(),
    };
    Html(body)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The whole HTTP app.
pub fn router(s: Shared) -> Router {
    Router::new()
        .route("/key", get(control::key))
        .route("/ts2021", post(control::upgrade))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "pass"})) }))
        .route("/register/{id}", get(register_page))
        .route("/metrics", get(metrics::handler))
        .route("/debug/derp", get(derp_stats))
        .merge(api::router(s.clone()))
        .merge(device::router())
        .with_state(s)
}

/// The embedded DERP relay's counters as JSON (admin API key required; 404 without a relay),
/// so tests of a nexus-sim process can tell relayed traffic from direct traffic.
async fn derp_stats(State(s): State<Shared>, headers: axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let authorized = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| s.store.check_api_key(k.trim()));
    if !authorized {
        return (axum::http::StatusCode::UNAUTHORIZED, "api key required").into_response();
    }
    let Some(d) = s.faults.derp.get() else {
        return (axum::http::StatusCode::NOT_FOUND, "no embedded DERP relay").into_response();
    };
    let st = d.stats();
    axum::Json(serde_json::json!({
        "accepted": st.accepted,
        "refused": st.refused,
        "packets_relayed": st.packets_relayed,
        "packets_dropped": st.packets_dropped,
        "clients": st.clients,
    }))
    .into_response()
}

/// A running in-process server.
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// `http://addr`.
    pub url: String,
    /// Shared state (store, faults).
    pub shared: Shared,
    /// The embedded DERP relay, if any (its map is `shared.derp_map`).
    pub derp: Option<Arc<derp::DerpServer>>,
    /// The embedded DERP regions' listeners, by region id (region 1 is `addr`).
    pub derp_regions: Vec<(i32, SocketAddr)>,
    /// The STUN listener, if any.
    pub stun: Option<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
    region_tasks: Vec<tokio::task::JoinHandle<()>>,
    _stun: Option<stun::StunServer>,
}

impl Running {
    /// Stops the server (open streams end).
    pub fn stop(self) {}
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.faults.shutdown.send_replace(true);
        if let Some(d) = &self.derp {
            // Relayed connections outlive the accept loop; end them like a process exit would.
            d.set_stopped(true);
        }
        self.task.abort();
        for t in &self.region_tasks {
            t.abort();
        }
    }
}

/// Starts the server on `cfg.listen` in the current tokio runtime.
///
/// Every listener answers plain HTTP and TLS (self-signed) on the same port; see
/// [`derp`] for why real Tailscale clients need the latter for DERP.
pub async fn start(mut cfg: Config) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    if cfg.server_url.is_empty() {
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        cfg.server_url = format!("{scheme}://{addr}");
    }
    let url = cfg.server_url.clone();
    let host = url_host(&url).unwrap_or_else(|| addr.ip().to_string());
    let verified = cfg.tls.is_some();
    let tls = match &cfg.tls {
        Some(t) => t.clone(),
        None => derp::self_signed_tls(std::slice::from_ref(&host))?,
    };

    let mut regions = vec![];
    let mut extra = vec![];
    let mut stun_srv = None;
    let derp_map = match &cfg.derp {
        DerpMode::External(m) => m.clone(),
        DerpMode::Off => DerpMap::default(),
        DerpMode::Embedded { regions: n } => {
            regions.push((1, addr));
            for id in 2..=i32::from((*n).max(1)) {
                let l = tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await?;
                regions.push((id, l.local_addr()?));
                extra.push((id, l));
            }
            if let Some(mut s) = cfg.stun_listen {
                if s.ip().is_unspecified() && !addr.ip().is_unspecified() {
                    s.set_ip(addr.ip());
                }
                stun_srv = Some(stun::StunServer::bind(s).await?);
            }
            let mut m = embedded_derp_map(&host, &regions, stun_srv.as_ref().map(|s| s.addr.port()));
            if verified {
                // The operator's certificate names `host`: clients verify it like any relay's.
                for n in m.regions.values_mut().flat_map(|r| r.nodes.iter_mut()) {
                    n.insecure_for_tests = false;
                }
            }
            m
        }
    };
    let embedded = matches!(cfg.derp, DerpMode::Embedded { .. });
    let shared = build_with_map(cfg, derp_map)?;
    let derp_server = embedded.then(|| {
        let verify = shared.cfg.derp_verify_clients;
        let verifier: Option<derp::Verifier> = verify.then(|| {
            let s = shared.clone();
            Arc::new(move |k: &NodePublic| live_node(&s, k).is_some()) as derp::Verifier
        });
        // Only verified clients have an identity the policy can speak about.
        let relay_policy: Option<derp::RelayPolicy> = verify.then(|| {
            let s = shared.clone();
            // Decisions per key pair, valid until the store or the policy changes (a key
            // expiring by time is a store change too: `announce_expiries`).
            type Decisions = ((u64, u64), std::collections::HashMap<(NodePublic, NodePublic), bool>);
            let cache: Mutex<Decisions> = Mutex::default();
            Arc::new(move |a: &NodePublic, b: &NodePublic| {
                let generation = (*s.store.subscribe_all().borrow(), *s.policy.subscribe().borrow());
                let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
                if c.0 != generation || c.1.len() > 65_536 {
                    *c = (generation, Default::default());
                }
                *c.1.entry((*a, *b)).or_insert_with(|| match (live_node(&s, a), live_node(&s, b)) {
                    (Some(x), Some(y)) => control::may_talk(&s, x, y),
                    _ => false,
                })
            }) as derp::RelayPolicy
        });
        let d = derp::DerpServer::new(derp::DerpOptions {
            verifier,
            relay_policy,
            mesh_key: shared.cfg.derp_mesh_key.clone(),
            queue_depth: shared.cfg.derp_queue_depth,
            keepalive: shared.cfg.derp_keepalive,
            ..derp::DerpOptions::new()
        });
        let _ = shared.faults.derp.set(d.clone());
        d
    });
    let mut app = router(shared.clone());
    if let Some(d) = &derp_server {
        app = app.merge(d.router(1));
    }
    // With the operator's certificate, TLS only: a client in the clear is told to use https.
    let task = derp::serve(derp::DualListener::with_plain_http(listener, tls.clone(), !verified)?, app);
    let mut region_tasks = vec![];
    if let (Some(d), true) = (&derp_server, shared.cfg.derp_verify_clients) {
        region_tasks.push(tokio::spawn(close_dead_derp_clients(shared.clone(), d.clone())));
    }
    region_tasks.push(tokio::spawn(housekeeping(shared.clone())));
    if let Some(d) = &derp_server {
        for (id, l) in extra {
            region_tasks
                .push(derp::serve(derp::DualListener::with_plain_http(l, tls.clone(), !verified)?, d.router(id)));
        }
    }
    Ok(Running {
        addr,
        url,
        shared,
        derp: derp_server,
        derp_regions: regions,
        stun: stun_srv.as_ref().map(|s| s.addr),
        task,
        region_tasks,
        _stun: stun_srv,
    })
}

/// Id of the registered, unexpired node holding node key `k`.
fn live_node(s: &Shared, k: &NodePublic) -> Option<u64> {
    s.store.live_node_id(k, wall::now())
}

/// Closes the DERP connections of nodes deleted, re-keyed or expired, on a store change (an
/// expiry is one: [`announce_expiries`] logs it) and at least once a minute. Changes come in
/// bursts (a join wave is thousands), so it looks at most every 100 ms: each look asks about
/// every connected client.
async fn close_dead_derp_clients(s: Shared, d: Arc<derp::DerpServer>) {
    let mut changed = s.store.subscribe_all();
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        for k in d.client_keys() {
            if live_node(&s, &k).is_none() {
                tracing::info!(key = %k, "closing DERP connection of a deleted or expired node");
                d.close_client(&k);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the server does on its own clock, besides serving: drops expired registrations and
/// device codes (so a stranger's requests never outlive their TTL even if nobody asks about them
/// again) and tells each org when a key expires ([`announce_expiries`]). Runs until dropped; the
/// simulator's Nexus host runs it beside its router, as [`start`] does.
pub async fn housekeeping(s: Shared) {
    let period =
        (s.cfg.pending_ttl.min(s.cfg.device_code_ttl) / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let prune = async {
        loop {
            tokio::time::sleep(period).await;
            s.store.prune_pending(wall::now(), s.cfg.pending_ttl);
            s.device.prune(std::time::Instant::now());
        }
    };
    tokio::join!(prune, announce_expiries(s.clone()));
}

/// Tells each org when one of its nodes' key expires ([`store::Store::announce_expired`]): wakes
/// at the next expiry, and on every store change (which may have set a nearer one; a look is a
/// lookup in the store's expiry index, not a pass over the nodes).
async fn announce_expiries(s: Shared) {
    let mut changed = s.store.subscribe_all();
    let mut last = wall::now();
    loop {
        let now = wall::now();
        let next = s.store.announce_expired(last, now);
        last = now;
        // A year stands for "none": a sleep of Duration::MAX would overflow the timer.
        let until = next.and_then(|n| (n - now).to_std().ok()).unwrap_or(Duration::from_secs(365 * 86400));
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(until) => {}
        }
    }
}

/// The host part of a URL (brackets of an IPv6 literal removed).
fn url_host(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let h = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    (!h.is_empty()).then(|| h.to_string())
}

/// The DERP map of the embedded relay: one region per listener, one node each.
///
/// Nodes are marked `InsecureForTests` because the listeners' TLS certificate is self-signed;
/// Tailscale clients dial DERP nodes over HTTPS on `DERPPort` (443 when 0) and accept it
/// only with that flag. `STUNPort` 0 would mean 3478, so a disabled STUN is -1.
pub fn embedded_derp_map(host: &str, regions: &[(i32, SocketAddr)], stun_port: Option<u16>) -> DerpMap {
    use citadel_proto::tailcfg::{DerpNode, DerpRegion};
    let ip: Option<std::net::IpAddr> = host.parse().ok();
    let mut map = DerpMap { omit_default_regions: true, ..Default::default() };
    for &(id, a) in regions {
        let node = DerpNode {
            name: format!("{id}a"),
            region_id: id,
            host_name: host.to_string(),
            ipv4: ip.filter(|i| i.is_ipv4()).map(|i| i.to_string()).unwrap_or_default(),
            ipv6: ip.filter(|i| i.is_ipv6()).map(|i| i.to_string()).unwrap_or_default(),
            stun_port: stun_port.map_or(-1, i32::from),
            derp_port: i32::from(a.port()),
            insecure_for_tests: true,
            ..Default::default()
        };
        map.regions.insert(
            id,
            DerpRegion {
                region_id: id,
                region_code: format!("nexus{id}"),
                region_name: format!("nexus-sim region {id}"),
                nodes: vec![node],
            },
        );
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supplied_admin_keys_live_only_as_long_as_the_process() {
        let t = tempfile::tempdir().unwrap();
        let cfg = |k: &str| Config { db: Some(t.path().join("n.db")), api_keys: vec![k.into()], ..Config::default() };
        let first = "first-SUPPLIED-key-0123456789";
        let second = "second-SUPPLIED-key-9876543210";
        let s = build(cfg(first)).unwrap();
        assert!(s.store.check_api_key(first));
        drop(s);
        let s = build(cfg(second)).unwrap();
        assert!(s.store.check_api_key(second));
        assert!(!s.store.check_api_key(first), "a key from an earlier run still authenticates");
        let listed = format!("{:?}", s.store.api_keys());
        for k in [first, second] {
            assert!(!listed.contains(&k[..6]), "{listed}");
        }
    }

    #[tokio::test]
    async fn strangers_cannot_grow_pending_registrations_or_device_flows() {
        use citadel_proto::keys::{MachinePublic, NodePublic};
        use citadel_proto::tailcfg::{Hostinfo, RegisterRequest};
        let ttl = Duration::from_secs(2);
        let r = start(Config {
            pending_ttl: ttl,
            device_code_ttl: ttl,
            derp: DerpMode::Off,
            stun_listen: None,
            ..Config::default()
        })
        .await
        .unwrap();
        let s = r.shared.clone();
        let key = |i: u32| {
            let mut k = [7u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k
        };
        let hostinfo = Some(Hostinfo { hostname: "stranger".into(), ..Default::default() });
        let mut refused = 0;
        for i in 0..10_000u32 {
            let req =
                RegisterRequest { node_key: NodePublic(key(i)), hostinfo: hostinfo.clone(), ..Default::default() };
            let sess = control::Session { machine: MachinePublic(key(i)), version: 130 };
            let resp = control::handle_register(&s, sess, req).await;
            refused += usize::from(resp.error.contains("waiting for approval"));
            assert!(s.store.pending_count() <= store::MAX_PENDING);
        }
        assert!(refused > 0 && s.store.pending_count() > 0);
        for _ in 0..3000 {
            let _ = device::start(State(s.clone())).await;
            assert!(s.device.len() <= device::MAX_FLOWS);
        }
        // Nobody asks again: the sweeper alone empties both within a few TTLs.
        let deadline = std::time::Instant::now() + ttl * 5;
        while (s.store.pending_count(), s.device.len()) != (0, 0) {
            assert!(std::time::Instant::now() < deadline, "expired entries were kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let mut big = Hostinfo::default();
        big.rest.insert("Padding", serde_json::Value::String("x".repeat(2 << 20)));
        let req = RegisterRequest { node_key: NodePublic(key(1)), hostinfo: Some(big), ..Default::default() };
        let sess = control::Session { machine: MachinePublic(key(1)), version: 130 };
        let resp = control::handle_register(&s, sess, req).await;
        assert!(resp.error.contains("Hostinfo larger"), "{resp:?}");
        assert_eq!(s.store.pending_count(), 0);
    }

    #[tokio::test]
    async fn node_key_renewal_keeps_the_node_and_only_its_machine_may_do_it_before_expiry() {
        use citadel_proto::keys::{MachinePublic, NodePublic};
        use citadel_proto::tailcfg::{RegisterAuth, RegisterRequest};
        let s = build(Config {
            node_key_expiry: Some(Duration::from_secs(60)),
            derp: DerpMode::Off,
            stun_listen: None,
            ..Config::default()
        })
        .unwrap();
        let u = s.store.create_user("acme", "").unwrap();
        let authkey = s.store.create_key(u.id, true, false, None, vec![]).unwrap().key;
        let (m1, m2) = (MachinePublic([1; 32]), MachinePublic([2; 32]));
        let (k1, k2, k3) = (NodePublic([11; 32]), NodePublic([12; 32]), NodePublic([13; 32]));
        let sess = |m| control::Session { machine: m, version: 130 };
        let auth = Some(RegisterAuth { auth_key: authkey, ..Default::default() });
        let r =
            control::handle_register(&s, sess(m1), RegisterRequest { node_key: k1, auth, ..Default::default() }).await;
        assert!(r.machine_authorized, "{r:?}");
        let before = s.store.nodes(None)[0].clone();
        let left = before.expiry.unwrap() - chrono::Utc::now();
        assert!(left > chrono::Duration::seconds(55) && left <= chrono::Duration::seconds(60), "{left:?}");

        // Another machine naming k1 as its old key gets nothing of it.
        let steal = RegisterRequest { node_key: k3, old_node_key: k1, ..Default::default() };
        let r = control::handle_register(&s, sess(m2), steal).await;
        assert!(!r.machine_authorized);
        assert_eq!(s.store.nodes(None)[0].node_key, k1);

        // The owner renews: same node record and addresses, the new key, a new lifetime.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let renew = RegisterRequest { node_key: k2, old_node_key: k1, ..Default::default() };
        let r = control::handle_register(&s, sess(m1), renew.clone()).await;
        assert!(r.machine_authorized && r.error.is_empty(), "{r:?}");
        let after = s.store.nodes(None)[0].clone();
        assert_eq!((after.id, after.ipv4, after.ipv6), (before.id, before.ipv4, before.ipv6));
        assert_eq!(after.node_key, k2);
        assert!(after.expiry > before.expiry);
        // Repeating it (an answer lost on the way) is accepted and changes nothing.
        let r = control::handle_register(&s, sess(m1), renew).await;
        assert!(r.machine_authorized);
        assert_eq!(s.store.nodes(None)[0].node_key, k2);

        // Once expired, the key cannot be renewed: that takes a new authentication.
        s.store.expire_node(after.id, None).unwrap();
        let late = RegisterRequest { node_key: k3, old_node_key: k2, ..Default::default() };
        let r = control::handle_register(&s, sess(m1), late).await;
        assert!(r.node_key_expired && !r.machine_authorized, "{r:?}");
        assert_eq!(s.store.nodes(None)[0].node_key, k2);
    }

    #[test]
    fn config_debug_hides_api_and_mesh_keys() {
        let cfg = Config {
            api_keys: vec!["adminSECRETkey1".into()],
            derp_mesh_key: Some("ab".repeat(32)),
            ..Config::default()
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("adminSECRETkey1") && !text.contains(&"ab".repeat(32)), "{text}");
        assert!(text.contains("api_keys") && text.contains("base_domain"), "{text}");
    }

    #[test]
    fn embedded_map_names_every_region_listener() {
        let regions = [(1, "127.0.0.1:8080".parse().unwrap()), (2, "127.0.0.1:9000".parse().unwrap())];
        let m = embedded_derp_map("127.0.0.1", &regions, Some(3478));
        assert_eq!(m.regions.len(), 2);
        let n = &m.regions[&2].nodes[0];
        assert_eq!((n.region_id, n.derp_port, n.stun_port, n.ipv4.as_str()), (2, 9000, 3478, "127.0.0.1"));
        assert!(n.insecure_for_tests && n.ipv6.is_empty());
        let m = embedded_derp_map("::1", &regions[..1], None);
        let n = &m.regions[&1].nodes[0];
        assert_eq!((n.stun_port, n.ipv6.as_str(), n.ipv4.as_str()), (-1, "::1", ""));
        let m = embedded_derp_map("derp.example", &regions[..1], None);
        assert_eq!(m.regions[&1].nodes[0].host_name, "derp.example");
        assert!(m.regions[&1].nodes[0].ipv4.is_empty());
    }

    #[test]
    fn url_host_strips_ports_and_brackets() {
        assert_eq!(url_host("http://127.0.0.1:8080").as_deref(), Some("127.0.0.1"));
        assert_eq!(url_host("https://[::1]:443/x").as_deref(), Some("::1"));
        assert_eq!(url_host("nonsense url"), None);
    }
}
