//! nexus-sim: a Headscale-compatible coordination server small enough to start inside a test.
//!
//! It speaks Tailscale's ts2021 control protocol (so real Tailscale clients register with it),
//! keeps orgs (Headscale users) isolated from each other, serves Headscale's REST API v1 and
//! offers fault switches for tests. [`start`] runs it in-process; the `nexus-sim` binary wraps it.

pub mod api;
pub mod control;
pub mod device;
pub mod store;

use axum::extract::{Path, State};
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use citadel::keys::PrivateKey;
use citadel::tailcfg::DerpMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::sync::watch;

/// Server configuration.
#[derive(Debug, Clone)]
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
    /// DERP map sent to clients.
    pub derp_map: DerpMap,
    /// Lifetime of a device-authorization code.
    pub device_code_ttl: Duration,
    /// Minimum seconds between device-token polls.
    pub device_poll_interval: u64,
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
            ipv4_base: Ipv4Addr::new(100, 64, 0, 0),
            ipv6_base: "fd7a:115c:a1e0::".parse().expect("constant"),
            derp_map: DerpMap::default(),
            device_code_ttl: Duration::from_secs(600),
            device_poll_interval: 5,
        }
    }
}

/// Fault switches for tests (not part of any production path of citadel).
#[derive(Default)]
pub struct Faults {
    refuse: AtomicBool,
    drop_streams: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

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
    /// Resolves when [`Faults::drop_streams`] is called or the server shuts down.
    pub async fn wait_drop_streams(&self) {
        let mut rx = self.drop_streams.subscribe();
        tokio::select! {
            _ = rx.changed() => {}
            _ = self.wait_shutdown() => {}
        }
    }
    /// Resolves once the server is shutting down.
    pub async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// State shared by every handler.
pub struct Inner {
    pub store: Store,
    pub server_key: PrivateKey,
    pub challenge_pub: [u8; 32],
    pub cfg: Config,
    pub derp_map: DerpMap,
    pub faults: Faults,
    pub device: device::Flows,
}

/// Handle to the shared state.
pub type Shared = Arc<Inner>;

impl Inner {
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
pub fn build(cfg: Config) -> anyhow::Result<Shared> {
    let store = Store::open(cfg.db.as_deref())?;
    let key_text = store.meta_or_insert("server_key", || PrivateKey::generate(&mut rand::thread_rng()).to_text());
    let server_key = PrivateKey::from_text(&key_text).map_err(|e| anyhow::anyhow!("stored server key: {e}"))?;
    for k in &cfg.api_keys {
        store.insert_api_key(k, None);
    }
    let challenge = PrivateKey::generate(&mut rand::thread_rng());
    Ok(Arc::new(Inner {
        store,
        server_key,
        challenge_pub: challenge.public_bytes(),
        derp_map: cfg.derp_map.clone(),
        cfg,
        faults: Faults::default(),
        device: device::Flows::default(),
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
        .route("/oauth/device/code", post(device::start))
        .route("/oauth/token", post(device::token))
        .route("/device", get(device::page))
        .merge(api::router(s.clone()))
        .with_state(s)
}

/// A running in-process server.
pub struct Running {
    /// Bound address.
    pub addr: SocketAddr,
    /// `http://addr`.
    pub url: String,
    /// Shared state (store, faults).
    pub shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops the server (open streams end).
    pub fn stop(self) {}
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shared.faults.shutdown.send_replace(true);
        self.task.abort();
    }
}

/// Starts the server on `cfg.listen` in the current tokio runtime.
pub async fn start(mut cfg: Config) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    if cfg.server_url.is_empty() {
        cfg.server_url = format!("http://{addr}");
    }
    let url = cfg.server_url.clone();
    let shared = build(cfg)?;
    let app = router(shared.clone());
    let task = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        // Small control frames must not wait for Nagle + delayed ACK (40 ms stalls).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("server stopped: {e}");
        }
    });
    Ok(Running { addr, url, shared, task })
}
