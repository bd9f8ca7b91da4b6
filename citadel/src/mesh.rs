//! The embedded mesh: a non-global handle that joins the org's network, keeps the netmap
//! current (reconnecting with backoff, never re-authenticating while the state is valid) and
//! reports status. [`crate::network`] is the process-global facade over it.

use crate::control::liveness::{Liveness, NetView};
use crate::control::session::{Action, Session, SessionConfig};
use crate::control::{self, ControlConn, ControlError};
use crate::dataplane::{DataPlane, DataPlaneConfig, MeshTcpListener, MeshTcpStream, MeshUdpSocket, PeerStats};
use crate::keys::{DiscoPublic, MachinePublic, NodePublic, PrivateKey};
use crate::net::{Net, TokioNet};
use crate::netmap::{short_name, NetMap};
use crate::state::{Batch, Identity, NodeInfo, StateDir, StateError};
use crate::tailcfg::{self, Hostinfo, MapRequest, RegisterAuth, RegisterRequest};
use citadel_proto::wall;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How to join.
#[derive(Clone)]
pub struct Config {
    /// Nexus URL; taken from the state directory when `None`.
    pub nexus_url: Option<String>,
    /// Pre-auth key; only needed when the state holds no valid registration.
    pub auth_key: Option<String>,
    /// State directory.
    pub state_dir: PathBuf,
    /// Host name to register; defaults to the saved one, then the OS host name.
    pub hostname: Option<String>,
    /// Register as an ephemeral node (removed by Nexus when it goes away).
    pub ephemeral: bool,
    /// Bound on each network step (connect, handshake, first map).
    pub timeout: Duration,
    /// The host network (tokio in production, turmoil in the harness).
    pub net: Arc<dyn Net>,
    /// Interactive login: when the server hands out an approval URL (Headscale's flow), this is
    /// called with it and registration waits for the approval, up to `login_timeout`.
    pub on_auth_url: Option<Arc<dyn Fn(&str) + Send + Sync>>,
    /// Bound on waiting for an interactive approval.
    pub login_timeout: Duration,
    /// UDP port of the node's one socket (WireGuard, disco); 0 picks a free one.
    pub udp_port: u16,
    /// Forget the pinned server key and trust the one the Nexus presents now (the operator
    /// replaced it deliberately).
    pub retrust_server_key: bool,
    /// Run the data plane (on by default). Off gives a control-plane-only node: registration
    /// and the netmap, but no UDP socket, no peers reachable and no DERP.
    pub data_plane: bool,
    /// How peers' routes are taken (`--accept-routes`, `--exit-node`) and whether the org
    /// guard is off (`--allow-cross-org`); the default takes own addresses only, guard on.
    pub routes: crate::dataplane::RoutePrefs,
    /// Seed of the control session's reconnect jitter; `None` draws one. A simulation passes
    /// its own so that the same world reconnects at the same instants.
    pub jitter_seed: Option<u64>,
}

impl std::fmt::Debug for Config {
    // By hand so the auth key can never be printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("nexus_url", &self.nexus_url)
            .field("auth_key", &self.auth_key.as_ref().map(|_| "<redacted>"))
            .field("state_dir", &self.state_dir)
            .field("hostname", &self.hostname)
            .field("ephemeral", &self.ephemeral)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// A config with defaults: state in the default directory, 10 s steps.
    pub fn new(nexus_url: Option<String>, auth_key: Option<String>, state_dir: PathBuf) -> Self {
        Self {
            nexus_url,
            auth_key,
            state_dir,
            hostname: None,
            ephemeral: false,
            timeout: Duration::from_secs(10),
            net: Arc::new(TokioNet),
            on_auth_url: None,
            login_timeout: Duration::from_secs(600),
            udp_port: 0,
            retrust_server_key: false,
            data_plane: true,
            routes: crate::dataplane::RoutePrefs::default(),
            jitter_seed: None,
        }
    }
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// State directory problem (locked, corrupt, unwritable).
    #[error(transparent)]
    State(#[from] StateError),
    /// No Nexus URL given or saved.
    #[error("no Nexus URL: pass --nexus URL (or run `citadel init` first)")]
    NoNexusUrl,
    /// The node has no valid registration and no key was given.
    #[error("not logged in: run `citadel init --authkey KEY --nexus URL` or `citadel login`{}", auth_url.as_ref().map(|u| format!(" (or visit {u})")).unwrap_or_default())]
    NeedsAuth {
        /// Where an admin can approve the node, if the server offered one.
        auth_url: Option<String>,
    },
    /// Nexus refused the auth key.
    #[error("Nexus refused the auth key: {0}")]
    AuthRejected(String),
    /// The node's key has expired.
    #[error("this node's key has expired; re-authenticate with `citadel init --authkey KEY`")]
    Expired,
    /// Network or protocol failure talking to Nexus.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Nexus accepted the node but sent no map in time.
    #[error("no network map from Nexus within {0:?}")]
    NoMap(Duration),
    /// The data plane's UDP socket could not be opened (port in use, no permission).
    #[error("cannot open the local UDP socket: {0}")]
    LocalUdp(std::io::Error),
}

/// One peer in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    /// Short host name.
    pub name: String,
    /// Fully qualified mesh name.
    pub fqdn: String,
    /// Mesh IPv4 address.
    pub ipv4: Option<String>,
    /// Mesh IPv6 address.
    pub ipv6: Option<String>,
    /// Online as Nexus reports it (`null` when unknown).
    pub online: Option<bool>,
    /// Operating system the peer reports.
    pub os: String,
    /// The peer's node key (public).
    pub node_key: String,
    /// Direct endpoints the peer reported.
    pub endpoints: Vec<String>,
    /// Home DERP region (0 = none).
    pub home_derp: i32,
    /// The peer's key has expired (it cannot be reached until it re-authenticates).
    #[serde(default)]
    pub expired: bool,
    /// Current path: `"direct <ip:port>"`, `"relay <region>"`, or `null` before any packet.
    #[serde(default)]
    pub path: Option<String>,
    /// When the current WireGuard session's handshake completed (RFC 3339).
    #[serde(default)]
    pub last_handshake: Option<String>,
    /// WireGuard bytes received from / sent to the peer.
    #[serde(default)]
    pub rx_bytes: u64,
    /// Bytes sent to this peer.
    #[serde(default)]
    pub tx_bytes: u64,
    /// Round trip of the current path from disco pongs, in milliseconds.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// ACL tags the peer carries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Prefixes routed to the peer: its own addresses, plus subnet routes with
    /// `--accept-routes` and exit routes when it is the `--exit-node`.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Prefixes the peer offers that this node does not take.
    #[serde(default)]
    pub routes_skipped: Vec<String>,
    /// The peer is this node's exit node.
    #[serde(default)]
    pub exit_node: bool,
    /// The peer belongs to another org: the org guard drops its packets.
    #[serde(default)]
    pub org_blocked: bool,
}

/// One answer of [`Mesh::ping`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pong {
    /// Peer's mesh IP.
    pub ip: String,
    /// Peer's short name.
    pub name: String,
    /// Round trip in milliseconds.
    pub rtt_ms: f64,
    /// Path the reply came over.
    pub path: Option<String>,
}

/// A snapshot of the node's state. The JSON keys are stable (documented in the README).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// True while the control stream is up and a netmap is held.
    pub connected: bool,
    /// Mesh IPv4 address.
    pub ipv4: Option<String>,
    /// Mesh IPv6 address.
    pub ipv6: Option<String>,
    /// Short host name.
    pub hostname: String,
    /// Fully qualified mesh name.
    pub fqdn: String,
    /// Org (Headscale user) name.
    pub org: String,
    /// Nexus URL.
    pub nexus_url: String,
    /// This node's public node key.
    pub node_key: String,
    /// When the node key expires (RFC 3339); `None` when it does not. Renewed ahead of time.
    #[serde(default)]
    pub key_expiry: Option<String>,
    /// Node-key renewals this process completed.
    #[serde(default)]
    pub key_renewals: u64,
    /// True once this node's key has expired (Nexus says so, or the expiry passed by Nexus's
    /// clock as this node reads it): peers drop its tunnels, and it must register again.
    #[serde(default)]
    pub key_expired: bool,
    /// Peers in the same org, sorted by name.
    pub peers: Vec<PeerStatus>,
    /// This node's home DERP region (the relay peers reach it through; 0 = none picked yet).
    #[serde(default)]
    pub home_derp: i32,
    /// Local services exposed on mesh ports (`--expose`).
    #[serde(default)]
    pub exposes: Vec<crate::expose::ExposeInfo>,
    /// Local proxy listeners (`--socks5`, `--http-proxy`).
    #[serde(default)]
    pub listeners: Vec<crate::proxy_server::ListenerInfo>,
    /// Whether the org guard is on (off with `--allow-cross-org`).
    #[serde(default)]
    pub org_guard: bool,
    /// Packets and disco from peers of another org that the org guard dropped.
    #[serde(default)]
    pub org_guard_dropped: u64,
    /// The `--exit-node` chosen, if any.
    #[serde(default)]
    pub exit_node: Option<String>,
    /// The data plane's counters (drops by reason, handshakes, disco); `null` without one.
    #[serde(default)]
    pub counters: Option<crate::dataplane::DataPlaneCounters>,
}

struct Inner {
    state: StateDir,
    id: Identity,
    info: Mutex<NodeInfo>,
    cfg: Config,
    netmap: watch::Sender<NetMap>,
    connected: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    endpoints: Mutex<Vec<String>>,
    /// Home DERP region reported as `Hostinfo.NetInfo.PreferredDERP` (0 = not picked yet).
    preferred_derp: Mutex<i32>,
    /// Control connections re-established after a failure.
    control_reconnects: std::sync::atomic::AtomicU64,
    /// The pre-auth key until it has been used: once registered, reconnects never send it.
    auth_key: Mutex<Option<String>>,
    /// The current node key (renewed in place) and, until the server confirms it, the key it
    /// replaced.
    node_key: Mutex<(PrivateKey, Option<NodePublic>)>,
    /// Node-key renewals completed since start.
    key_renewals: std::sync::atomic::AtomicU64,
    /// The state files written at start, in the background until the server is first told
    /// the node key (see [`Inner::saved`]).
    saving: Mutex<Option<tokio::task::JoinHandle<Result<(), StateError>>>>,
    /// `node.json` as this process last wrote it (or as the start found or batched it).
    info_on_disk: Mutex<NodeInfo>,
    /// The server's clock minus this node's, from the last map message that carried
    /// `ControlTime` (zero before): peer key expiries are the server's times.
    clock_delta: Mutex<chrono::TimeDelta>,
    /// When [`expire_peers`] looks at the peers next; a map message carrying an earlier key
    /// expiry moves it and wakes the task (see [`Inner::apply`]).
    next_peer_expiry: watch::Sender<Option<chrono::DateTime<chrono::Utc>>>,
}

/// A running mesh node. Dropping it stops the background control loop.
pub struct Mesh {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    dp: Option<Arc<DataPlane>>,
    /// Exposed local services (see [`crate::expose`]); `None` without a data plane.
    pub(crate) exposer: Option<crate::expose::Exposer>,
    /// Running proxy listeners (see [`crate::proxy_server`]).
    pub(crate) proxies: Mutex<Vec<crate::proxy_server::ProxyListener>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
        self.task.abort();
        // The aborted task may still hold `inner` for a moment; the lock must go now so a
        // restart in the same process (or right after) can take the identity.
        self.inner.state.release();
    }
}

/// The machine's host name: the kernel's, else `/etc/hostname`, else `$HOSTNAME` or
/// `%COMPUTERNAME%`, else `citadel`. The one host-name reader (node registration, `citadel
/// login`, the job worker's consumer name).
pub fn os_hostname() -> String {
    let files =
        ["/proc/sys/kernel/hostname", "/etc/hostname"].into_iter().filter_map(|p| std::fs::read_to_string(p).ok());
    let vars = ["HOSTNAME", "COMPUTERNAME"].into_iter().filter_map(|v| std::env::var(v).ok());
    files.chain(vars).map(|s| s.trim().to_string()).find(|s| !s.is_empty()).unwrap_or_else(|| "citadel".to_string())
}

impl Inner {
    fn node_pub(&self) -> NodePublic {
        NodePublic(self.node_key.lock().unwrap().0.public_bytes())
    }

    /// Saves the identity with `node_key` (and the key it replaces, if not yet confirmed).
    fn save_node_key(&self, node_key: &PrivateKey, old: Option<NodePublic>) -> Result<(), StateError> {
        let id = Identity { node_key: node_key.clone(), old_node_key: old, ..self.id.clone() };
        self.state.write("identity.json", &id)
    }

    /// Asks the server to replace the node key by a fresh one on the open connection. The new
    /// key is saved (with the old one) before the request goes out, so a restart before the
    /// answer repeats the same replacement, which the server accepts again.
    async fn renew_key(&self, conn: &mut ControlConn) -> Result<(PrivateKey, tailcfg::RegisterResponse), ConnectError> {
        let new = PrivateKey::generate(&mut rand::thread_rng());
        let old = self.node_pub();
        self.save_node_key(&new, Some(old))?;
        let req = RegisterRequest {
            node_key: NodePublic(new.public_bytes()),
            old_node_key: old,
            ..self.register_request(false, None)
        };
        Ok((new, conn.register(&req).await?))
    }

    /// Switches the node to the renewed key: state, then control requests and the data plane.
    /// The server holds the new key from now on, so the switch happens even when saving fails
    /// (the saved pair then repeats the renewal at the next start).
    fn commit_key(&self, new: PrivateKey, dp: Option<&Arc<DataPlane>>) -> Result<(), StateError> {
        *self.node_key.lock().unwrap() = (new.clone(), None);
        if let Some(dp) = dp {
            dp.set_node_key(new.clone());
        }
        self.key_renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.save_node_key(&new, None)
    }

    fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            ipn_version: format!("citadel-{}", env!("CARGO_PKG_VERSION")),
            os: std::env::consts::OS.to_string(),
            hostname: self.info.lock().unwrap().hostname.clone(),
            rest: match *self.preferred_derp.lock().unwrap() {
                0 => Default::default(),
                r => [("NetInfo".to_string(), serde_json::json!({ "PreferredDERP": r }))].into_iter().collect(),
            },
        }
    }

    /// Takes the data plane's endpoints and home region; true when they differ from what was
    /// last reported.
    fn take_net_info(&self, ni: &crate::dataplane::NetInfo) -> bool {
        let eps: Vec<String> = ni.endpoints.iter().map(|e| e.to_string()).collect();
        let mut cur = self.endpoints.lock().unwrap();
        let mut home = self.preferred_derp.lock().unwrap();
        let changed = *cur != eps || (ni.preferred_derp != 0 && *home != ni.preferred_derp);
        *cur = eps;
        if ni.preferred_derp != 0 {
            *home = ni.preferred_derp;
        }
        changed
    }

    /// A "lite" map request: no stream, no peers; the server only records endpoints and
    /// Hostinfo (and tells the peers).
    fn lite_map_request(&self) -> MapRequest {
        MapRequest { omit_peers: true, ..self.map_request(false) }
    }

    fn nexus_url(&self) -> String {
        self.info.lock().unwrap().nexus_url.clone()
    }

    /// Opens a control session. A server key other than the pinned one is refused before
    /// anything but `GET /key` is sent.
    async fn dial(&self) -> Result<ControlConn, ControlError> {
        let url = self.nexus_url();
        let server = control::fetch_server_key(&*self.cfg.net, &url, self.cfg.timeout).await?;
        tracing::debug!("server key fetched");
        let pinned = self.info.lock().unwrap().server_key;
        if let Some(pinned) = pinned.filter(|p| *p != server) {
            return Err(ControlError::ServerKeyChanged { url, pinned, got: server });
        }
        ControlConn::dial(&*self.cfg.net, &url, &self.id.machine_key, &server, self.cfg.timeout).await
    }

    /// Pins the session's server key if none is pinned yet (first registration, or state from
    /// before pinning). Only the first session of a start can pin; the start writes it with
    /// the first netmap's addresses (one write, not two).
    fn pin_server_key(&self, conn: &ControlConn) {
        let mut info = self.info.lock().unwrap();
        if info.server_key.is_none() {
            info.server_key = Some(conn.server_key);
            tracing::info!(key = %conn.server_key, "pinned the Nexus server key");
        }
    }

    /// Waits for the state files the start writes in the background: the node key must be on
    /// disk before the server hears it.
    async fn saved(&self) -> Result<(), StateError> {
        let pending = self.saving.lock().unwrap().take();
        match pending {
            None => Ok(()),
            Some(h) => h.await.unwrap_or_else(|e| {
                Err(StateError::Io { path: self.state.path().to_path_buf(), source: std::io::Error::other(e) })
            }),
        }
    }

    /// Writes `node.json` if it differs from the copy on disk. That copy is kept here, not read
    /// back: this runs on every netmap change, and only this process (holding the state lock)
    /// writes the file.
    fn save_info(&self, info: &NodeInfo) -> Result<(), StateError> {
        let mut on_disk = self.info_on_disk.lock().unwrap();
        if *on_disk == *info {
            return Ok(());
        }
        // A durable version exists (the start wrote it before the map stream opened): after a
        // crash either one is a valid state.
        self.state.replace("node.json", info)?;
        on_disk.clone_from(info);
        Ok(())
    }

    /// A register request for our node key; the auth key only when the session asks for it.
    fn register_request(&self, with_auth_key: bool, followup: Option<String>) -> RegisterRequest {
        let auth = with_auth_key.then(|| self.auth_key.lock().unwrap().clone()).flatten();
        RegisterRequest {
            version: tailcfg::CAPABILITY_VERSION,
            node_key: self.node_pub(),
            hostinfo: Some(self.hostinfo()),
            ephemeral: self.cfg.ephemeral,
            auth: auth.map(|auth_key| RegisterAuth { auth_key, ..Default::default() }),
            followup: followup.unwrap_or_default(),
            old_node_key: self.node_key.lock().unwrap().1.unwrap_or_default(),
            ..Default::default()
        }
    }

    /// Performs the session's actions (dial, register, open the map stream) until the map
    /// stream is open, or returns the error the session gave up with. Registration state goes
    /// into `node.json` together with the addresses when the first map arrives (one fsync, not
    /// two); a crash in between is harmless, as a start without a key asks the server first.
    async fn establish(
        &self,
        session: &mut Session,
        net_info: &watch::Receiver<crate::dataplane::NetInfo>,
    ) -> Result<(ControlConn, control::MapStream), ConnectError> {
        let now = crate::clock::now;
        let mut conn: Option<ControlConn> = None;
        loop {
            let Some(action) = session.poll_action() else {
                let Some(at) = session.poll_timeout() else {
                    return Err(ControlError::Protocol("control session stalled".into()).into());
                };
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                session.handle_timeout(now());
                continue;
            };
            match action {
                Action::Dial => match self.dial().await {
                    Ok(c) => {
                        tracing::debug!("control channel up");
                        conn = Some(c);
                        session.handle_dialed(now());
                    }
                    Err(e) => session.handle_error(now(), e.into()),
                },
                Action::Register { with_auth_key, followup } => {
                    let Some(c) = conn.as_mut() else {
                        session.handle_error(now(), ControlError::Closed.into());
                        continue;
                    };
                    if let Err(e) = self.saved().await {
                        return Err(e.into());
                    }
                    let req = self.register_request(with_auth_key, followup);
                    // Only an approval wait has a deadline: the server holds those requests.
                    let resp = match session.poll_timeout() {
                        Some(at) => {
                            match tokio::time::timeout_at(tokio::time::Instant::from_std(at), c.register(&req)).await {
                                Ok(r) => r,
                                Err(_) => {
                                    session.handle_timeout(now());
                                    continue;
                                }
                            }
                        }
                        None => c.register(&req).await,
                    };
                    match resp {
                        Ok(r) => session.handle_register(now(), &r),
                        Err(e) => session.handle_error(now(), e.into()),
                    }
                }
                Action::ShowAuthUrl(url) => {
                    if let Some(show) = &self.cfg.on_auth_url {
                        show(&url);
                    }
                }
                Action::Registered { org } => {
                    tracing::debug!("registered");
                    let mut info = self.info.lock().unwrap();
                    info.registered = true;
                    info.org = org;
                }
                Action::StartMap => {
                    let Some(mut c) = conn.take() else {
                        session.handle_error(now(), ControlError::Closed.into());
                        continue;
                    };
                    // Registered: the server accepted the node, so the auth key is never needed
                    // again in this process (the session stops asking for it too).
                    self.auth_key.lock().unwrap().take();
                    if let Err(e) = self.saved().await {
                        return Err(e.into());
                    }
                    // The server accepted the node key, so a renewal left unconfirmed is done.
                    let unconfirmed = {
                        let mut k = self.node_key.lock().unwrap();
                        k.1.take().map(|_| k.0.clone())
                    };
                    if let Some(k) = unconfirmed {
                        if let Err(e) = self.save_node_key(&k, None) {
                            session.handle_error(now(), e.into());
                            continue;
                        }
                    }
                    self.pin_server_key(&c);
                    self.take_net_info(&net_info.borrow());
                    match c.map(&self.map_request(true)).await {
                        Ok(stream) => {
                            session.handle_map_started(now());
                            return Ok((c, stream));
                        }
                        Err(e) => session.handle_error(now(), e.into()),
                    }
                }
                Action::Failed(e) => {
                    tracing::info!("reconnect failed: {e}");
                    conn = None;
                }
                Action::GiveUp(e) => return Err(e),
                // Renewal happens only on an open stream, in `run`.
                Action::RenewKey | Action::KeyRenewed => {}
            }
        }
    }

    fn map_request(&self, stream: bool) -> MapRequest {
        MapRequest {
            version: tailcfg::CAPABILITY_VERSION,
            keep_alive: stream,
            node_key: self.node_pub(),
            disco_key: DiscoPublic(self.id.disco_key.public_bytes()),
            endpoints: self.endpoints.lock().unwrap().clone(),
            stream,
            hostinfo: Some(self.hostinfo()),
            // As Tailscale's clients ask: a full map of 10,000 peers is about 1.2 MB on the
            // wire instead of 7.2 MB of JSON. Small deltas come as stored frames, parsed where
            // they lie; the decompression context is one per thread (see `decode_map_body`).
            compress: "zstd".into(),
            ..Default::default()
        }
    }

    fn apply(&self, m: &tailcfg::MapResponse) -> Result<(), StateError> {
        if let Some(t) = m.control_time {
            *self.clock_delta.lock().unwrap() = t - wall::now();
        }
        // Only the entries this message carries: a peer's key expiring sooner than the expiry
        // task's next look wakes it (a whole pass over the peers per change would cost a
        // member of a large org more than the change). Entries the server already marks
        // expired need no look.
        let zero = tailcfg::zero_time();
        let soonest = m
            .peers
            .iter()
            .chain(&m.peers_changed)
            .flatten()
            .filter(|p| !p.expired)
            .filter_map(|p| p.key_expiry)
            .chain(m.peers_changed_patch.iter().flatten().filter_map(|c| c.key_expiry))
            .filter(|e| *e > zero)
            .min();
        if let Some(e) = soonest {
            self.next_peer_expiry.send_if_modified(|next| next.is_none_or(|n| e < n));
        }
        let mut changed = false;
        self.netmap.send_if_modified(|nm| {
            changed = nm.apply(m);
            changed
        });
        if changed {
            // Only this node's part is read here: a copy of the whole map per change cost a
            // member of a large org more than the change (netmap.json follows in
            // `cache_netmap`).
            let (expired, addresses, org) = {
                let nm = self.netmap.borrow();
                (nm.self_node.is_expired_at(server_now(self)), nm.self_node.addresses.clone(), nm.org())
            };
            if expired {
                tracing::warn!("Nexus reports this node's key as expired");
            }
            let mut info = self.info.lock().unwrap();
            info.addresses = addresses;
            if !org.is_empty() {
                info.org = org;
            }
            self.save_info(&info)?;
        }
        Ok(())
    }
}

/// The shortest wait of [`expire_peers`] between two looks: expiries are on the wall clock and
/// sleeps on the runtime's, which drift apart (a wall clock stepped back), and a shorter wait
/// could spin.
const PEER_EXPIRY_MIN_WAIT: Duration = Duration::from_millis(250);

/// The longest: a look at least this often, whatever the clock did meanwhile (a suspended
/// machine's sleeps stop; the wall clock does not).
const PEER_EXPIRY_MAX_WAIT: Duration = Duration::from_secs(3600);

/// The server's clock as this node reads it: the local clock plus the last delta the map
/// stream showed.
fn server_now(inner: &Inner) -> chrono::DateTime<chrono::Utc> {
    wall::now() + *inner.clock_delta.lock().unwrap()
}

/// Marks peers expired as their key expiries pass ([`NetMap::expire_peers`]), so the data
/// plane drops their tunnels even while Nexus is unreachable or silent about it, as a
/// Tailscale client does. Sleeps until the next expiry among the peers (bounded by
/// [`PEER_EXPIRY_MIN_WAIT`] and [`PEER_EXPIRY_MAX_WAIT`]) or until a map message brings a
/// sooner one; one pass over the peers per wake. Ends with the mesh.
async fn expire_peers(inner: std::sync::Weak<Inner>, mut next: watch::Receiver<Option<chrono::DateTime<chrono::Utc>>>) {
    loop {
        let wait = {
            let Some(inner) = inner.upgrade() else { return };
            // Seen before the pass: a sooner expiry arriving during it wakes the next wait.
            next.borrow_and_update();
            let now = server_now(&inner);
            let mut soonest = None;
            let marked = inner.netmap.send_if_modified(|nm| {
                let marked = nm.expire_peers(now);
                soonest = nm.next_peer_expiry(now);
                marked
            });
            if marked {
                tracing::info!("a peer's key expired: its tunnel is dropped until it re-authenticates");
            }
            inner.next_peer_expiry.send_if_modified(|n| {
                *n = soonest;
                false
            });
            soonest
                .and_then(|e| (e - now).to_std().ok())
                .unwrap_or(PEER_EXPIRY_MAX_WAIT)
                .clamp(PEER_EXPIRY_MIN_WAIT, PEER_EXPIRY_MAX_WAIT)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = next.changed() => if r.is_err() { return },
        }
    }
}

/// How often netmap.json is rewritten at most while the map keeps changing.
const NETMAP_CACHE_EVERY: Duration = Duration::from_secs(2);

/// A larger map waits longer: netmap.json is rewritten at no more than this many bytes per
/// second on average (it is the whole map: about 7.5 MB at 10,000 peers, whose org changes
/// many times a second, and only a restart reads it, while the control plane connects).
const NETMAP_CACHE_BYTES_PER_SEC: f64 = 256.0 * 1024.0;

/// The longest wait between rewrites while the map keeps changing.
const NETMAP_CACHE_MAX_WAIT: Duration = Duration::from_secs(60);

/// How long the cache waits after writing `bytes` before it writes again. From the size, not
/// the time the write took, so a simulated node's timers stay the same from run to run.
fn netmap_cache_wait(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / NETMAP_CACHE_BYTES_PER_SEC).clamp(NETMAP_CACHE_EVERY, NETMAP_CACHE_MAX_WAIT)
}

/// Keeps netmap.json (the last netmap, read at the next start) current after the first map
/// (written by `Mesh::start`): written after the map changes, then not again for
/// [`netmap_cache_wait`] of its size (2 s up to 512 KB, about 30 s at 10,000 peers); changes
/// in between go out together. The
/// file is the whole map (megabytes at 10,000 peers), and a large org changes many times a
/// second: written on every change, it cost every member a serialization and a file per change.
/// The map is serialized under the watch's read lock and written after it is released. Ends
/// with the mesh (the netmap's sender dropped); after a stop (logout, drop) a wake writes
/// nothing.
async fn cache_netmap(inner: std::sync::Weak<Inner>, mut netmap: watch::Receiver<NetMap>) {
    let in_place = tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread;
    while netmap.changed().await.is_ok() {
        let Some(inner) = inner.upgrade() else { return };
        let bytes = serde_json::to_vec(&*netmap.borrow_and_update()).expect("netmap serializes");
        let wait = netmap_cache_wait(bytes.len());
        // Under the stop flag's read lock: `logout` raises it before it clears the directory,
        // so it waits for a write in progress, and no write comes after it.
        let write = move || {
            let stopped = inner.stop.borrow();
            if *stopped {
                return Ok(());
            }
            inner.state.write_cache_bytes("netmap.json", &bytes)
        };
        // As at start: a current-thread runtime (the simulator's hosts) writes in place.
        let written = if in_place { write() } else { tokio::task::spawn_blocking(write).await.unwrap_or(Ok(())) };
        if let Err(e) = written {
            tracing::warn!("saving the netmap cache: {e}");
        }
        tokio::time::sleep(wait).await;
    }
}

impl Mesh {
    /// Joins the mesh: registers if needed, waits for the first netmap, then keeps it current in
    /// the background. Errors are returned only for the first attempt; later drops reconnect.
    pub async fn connect(cfg: Config) -> Result<Mesh, ConnectError> {
        crate::syspolicy::with_restricted_locks(crate::syspolicy::platform(), Self::start(cfg)).await
    }

    async fn start(cfg: Config) -> Result<Mesh, ConnectError> {
        tracing::debug!("connecting");
        let state = StateDir::open(&cfg.state_dir)?;
        // Fresh keys and changed registration details are written in one batch (one directory
        // fsync) while the data plane starts and the control channel dials.
        let mut batch = Batch::default();
        let mut id = state.identity_or_new(&mut rand::thread_rng(), &mut batch)?;
        // Like Tailscale's, the disco key is new each start (the stored one is not used): a
        // changed disco key is how peers learn that this node restarted and reset its paths
        // and WireGuard state.
        id.disco_key = crate::keys::PrivateKey::generate(&mut rand::thread_rng());
        let mut info: NodeInfo = state.read("node.json")?.unwrap_or_default();
        if let Some(u) = &cfg.nexus_url {
            if !info.nexus_url.is_empty() && info.nexus_url != u.trim_end_matches('/') {
                // A different server: the old registration and pinned key mean nothing there.
                info.registered = false;
                info.server_key = None;
            }
            info.nexus_url = u.trim_end_matches('/').to_string();
        }
        if info.nexus_url.is_empty() {
            return Err(ConnectError::NoNexusUrl);
        }
        control::parse_url(&info.nexus_url)?;
        if cfg.retrust_server_key && info.server_key.take().is_some() {
            tracing::warn!("forgetting the pinned Nexus server key; the next one presented is trusted");
        }
        if let Some(h) = &cfg.hostname {
            info.hostname = h.clone();
        }
        if info.hostname.is_empty() {
            info.hostname = os_hostname();
        }
        if state.read::<NodeInfo>("node.json")?.as_ref() != Some(&info) {
            batch.add("node.json", &info);
        }
        let cached: NetMap = state.read("netmap.json").ok().flatten().unwrap_or_default();
        let node_key = (id.node_key.clone(), id.old_node_key);
        let inner = Arc::new(Inner {
            state,
            id,
            info_on_disk: Mutex::new(info.clone()),
            info: Mutex::new(info),
            cfg: cfg.clone(),
            netmap: watch::channel(cached).0,
            connected: watch::channel(false).0,
            stop: watch::channel(false).0,
            endpoints: Mutex::new(Vec::new()),
            preferred_derp: Mutex::new(0),
            control_reconnects: Default::default(),
            auth_key: Mutex::new(cfg.auth_key.clone()),
            node_key: Mutex::new(node_key),
            key_renewals: Default::default(),
            saving: Mutex::new(None),
            clock_delta: Mutex::new(chrono::TimeDelta::zero()),
            next_peer_expiry: watch::channel(None).0,
        });
        // Peers of the cached map whose keys expired while the node was down are out before the
        // data plane serves them; later expiries are the task's.
        inner.netmap.send_if_modified(|nm| nm.expire_peers(server_now(&inner)));
        tokio::spawn(expire_peers(Arc::downgrade(&inner), inner.next_peer_expiry.subscribe()));
        // On a multi-thread runtime the write overlaps the data plane start and the dial. A
        // current-thread runtime (the simulator's hosts, tests) writes in place, so when each
        // step of a simulated join happens never depends on the real disk.
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        if flavor == tokio::runtime::RuntimeFlavor::CurrentThread {
            inner.state.write_batch(&batch)?;
        } else if !batch.is_empty() {
            let i = inner.clone();
            *inner.saving.lock().unwrap() = Some(tokio::task::spawn_blocking(move || i.state.write_batch(&batch)));
        }
        // The data plane starts first: its endpoints and disco key go into the map request, and
        // it serves cached peers from netmap.json while the control plane connects.
        let (dp, net_info) = if cfg.data_plane {
            let node_key = inner.node_key.lock().unwrap().0.clone();
            let dp = DataPlane::start_with_net(
                DataPlaneConfig {
                    node_key,
                    disco_key: inner.id.disco_key.clone(),
                    bind: std::net::SocketAddr::from(([0, 0, 0, 0], cfg.udp_port)),
                },
                inner.netmap.subscribe(),
                cfg.net.clone(),
            )
            .await
            .map_err(ConnectError::LocalUdp)?;
            dp.set_route_prefs(cfg.routes.clone());
            let net_info = dp.net_info();
            (Some(Arc::new(dp)), net_info)
        } else {
            // No data plane: nothing to report; the closed channel tells the loops so.
            (None, watch::channel(crate::dataplane::NetInfo::default()).1)
        };
        let mut session = Session::new(
            SessionConfig {
                registered: inner.info.lock().unwrap().registered,
                has_auth_key: cfg.auth_key.is_some(),
                interactive: cfg.on_auth_url.is_some(),
                login_timeout: cfg.login_timeout,
            },
            cfg.jitter_seed.unwrap_or_else(rand::random),
        );
        let (mut conn, mut stream) = inner.establish(&mut session, &net_info).await?;
        tracing::debug!("map stream open");
        let first = tokio::time::timeout(cfg.timeout, async {
            loop {
                match stream.next().await? {
                    Some(m) if m.node.is_some() => return Ok::<_, ConnectError>(m),
                    Some(_) => continue,
                    None => return Err(ControlError::Closed.into()),
                }
            }
        })
        .await
        .map_err(|_| ConnectError::NoMap(cfg.timeout))??;
        tracing::debug!("first netmap");
        inner.netmap.send_modify(|nm| nm.clear_peers());
        inner.apply(&first)?;
        // The server key pinned by this start, even if the first map changed nothing.
        inner.save_info(&inner.info.lock().unwrap().clone())?;
        // The first map is on disk before `connect` returns (`citadel netcheck` reads its DERP
        // map there); later ones follow from `cache_netmap`, which sees only later changes.
        inner.state.write_cache("netmap.json", &*inner.netmap.borrow())?;
        tokio::spawn(cache_netmap(Arc::downgrade(&inner), inner.netmap.subscribe()));
        let mut net_info = net_info;
        settle_net_info(&inner, &mut conn, &mut stream, &mut net_info).await;
        inner.connected.send_replace(true);
        let task = tokio::spawn(run(inner.clone(), session, Some((conn, stream)), net_info, dp.clone()));
        let exposer = dp.clone().map(crate::expose::Exposer::new);
        Ok(Mesh { inner, task, dp, exposer, proxies: Mutex::new(Vec::new()) })
    }

    /// A snapshot of the node's state.
    pub fn status(&self) -> Status {
        let nm = self.inner.netmap.borrow().clone();
        let info = self.inner.info.lock().unwrap().clone();
        let addr = |n: &tailcfg::Node, v6: bool| {
            n.addresses
                .iter()
                .map(|a| a.split('/').next().unwrap_or_default().to_string())
                .find(|a| a.contains(':') == v6)
        };
        let stats: std::collections::HashMap<NodePublic, PeerStats> =
            self.dp.iter().flat_map(|d| d.peer_stats()).map(|s| (s.node_key, s)).collect();
        let prefs = self.inner.cfg.routes.clone();
        let routes = crate::dataplane::peers::peer_routes(&nm, &prefs);
        let mut peers: Vec<PeerStatus> = nm
            .peers
            .values()
            .map(|p| PeerStatus {
                tags: p.tags.clone(),
                routes: routes.get(&p.key).map(|r| r.taken.clone()).unwrap_or_default(),
                routes_skipped: routes.get(&p.key).map(|r| r.skipped.clone()).unwrap_or_default(),
                exit_node: routes.get(&p.key).is_some_and(|r| r.exit_node),
                org_blocked: routes.get(&p.key).is_some_and(|r| r.org_blocked),
                path: stats.get(&p.key).and_then(|s| s.path.as_ref()).map(|p| p.to_string()),
                last_handshake: stats.get(&p.key).and_then(|s| s.last_handshake).map(|t| {
                    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                }),
                rx_bytes: stats.get(&p.key).map(|s| s.rx_bytes).unwrap_or(0),
                tx_bytes: stats.get(&p.key).map(|s| s.tx_bytes).unwrap_or(0),
                latency_ms: stats.get(&p.key).and_then(|s| s.latency).map(|l| l.as_secs_f64() * 1e3),
                name: short_name(p),
                fqdn: p.name.trim_end_matches('.').to_string(),
                ipv4: addr(p, false),
                ipv6: addr(p, true),
                online: p.online,
                os: p.hostinfo.os.clone(),
                node_key: p.key.to_string(),
                endpoints: p.endpoints.clone(),
                home_derp: p.home_region(),
                // Marked in the map, by Nexus or by `expire_peers` when the expiry passes.
                expired: p.expired,
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.ipv4.cmp(&b.ipv4)));
        Status {
            connected: *self.inner.connected.borrow(),
            ipv4: addr(&nm.self_node, false),
            ipv6: addr(&nm.self_node, true),
            hostname: if nm.self_node.name.is_empty() { info.hostname.clone() } else { short_name(&nm.self_node) },
            fqdn: nm.self_node.name.trim_end_matches('.').to_string(),
            org: if nm.org().is_empty() { info.org.clone() } else { nm.org() },
            nexus_url: info.nexus_url.clone(),
            node_key: self.inner.node_pub().to_string(),
            key_expiry: nm
                .self_node
                .key_expiry
                .filter(|e| *e > tailcfg::zero_time())
                .map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            key_renewals: self.inner.key_renewals.load(std::sync::atomic::Ordering::Relaxed),
            key_expired: nm.self_node.is_expired_at(server_now(&self.inner)),
            peers,
            home_derp: *self.inner.preferred_derp.lock().unwrap(),
            exposes: self.exposer.as_ref().map(|e| e.list()).unwrap_or_default(),
            listeners: self.proxies.lock().unwrap().iter().map(|p| p.info().clone()).collect(),
            org_guard: !prefs.allow_cross_org,
            org_guard_dropped: self.dp.as_ref().map(|d| d.counters().rx_cross_org).unwrap_or(0),
            exit_node: prefs.exit_node.clone(),
            counters: self.dp.as_ref().map(|d| d.counters()),
        }
    }

    /// Control connections re-established after a failure, since start.
    pub fn control_reconnects(&self) -> u64 {
        self.inner.control_reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while the control stream is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// The home DERP region last reported to Nexus (0: none yet), as [`Mesh::status`] shows it.
    pub fn home_derp(&self) -> i32 {
        *self.inner.preferred_derp.lock().unwrap()
    }

    /// The mesh IPv4 address.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.inner.netmap.borrow().ipv4()
    }

    /// Watches the netmap.
    pub fn netmap(&self) -> watch::Receiver<NetMap> {
        self.inner.netmap.subscribe()
    }

    /// Watches the connected flag.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// The machine public key (for admin tooling).
    pub fn machine_key(&self) -> MachinePublic {
        MachinePublic(self.inner.id.machine_key.public_bytes())
    }

    /// The node public key.
    pub fn node_key(&self) -> NodePublic {
        self.inner.node_pub()
    }

    /// The data plane (WireGuard + userspace TCP/IP); `None` when the config turned it off.
    pub fn data_plane(&self) -> Option<&Arc<DataPlane>> {
        self.dp.as_ref()
    }

    fn dp(&self) -> std::io::Result<&Arc<DataPlane>> {
        self.dp.as_ref().ok_or_else(|| std::io::Error::other("this node runs without a data plane"))
    }

    /// True when `ip` goes through the mesh: a peer's address, an accepted subnet route, or
    /// any address once an exit node is chosen (`--exit-node`).
    pub fn routes_to(&self, ip: std::net::IpAddr) -> bool {
        self.dp.as_ref().is_some_and(|d| d.routes_to(ip))
    }

    /// Opens a TCP connection to a mesh address.
    pub async fn dial_tcp(&self, addr: std::net::SocketAddr) -> std::io::Result<MeshTcpStream> {
        self.dp()?.dial_tcp(addr).await
    }

    /// Listens for TCP connections on a port of the node's mesh addresses.
    pub fn listen_tcp(&self, port: u16) -> std::io::Result<MeshTcpListener> {
        self.dp()?.listen_tcp(port)
    }

    /// Binds a UDP socket on the node's mesh addresses (0 = any port).
    pub fn bind_udp(&self, port: u16) -> std::io::Result<MeshUdpSocket> {
        self.dp()?.bind_udp(port)
    }

    /// A mesh-level ping: one TCP connection attempt to `ip:port` through the tunnel; a reset
    /// (closed port) or an accept both prove the round trip. The first ping of a session
    /// includes the WireGuard handshake.
    pub async fn ping(&self, ip: std::net::IpAddr, port: u16, timeout: Duration) -> std::io::Result<Pong> {
        let start = tokio::time::Instant::now();
        match self.dp()?.dial_tcp_timeout(std::net::SocketAddr::new(ip, port), timeout).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
        let rtt = start.elapsed();
        let key = {
            let nm = self.inner.netmap.borrow();
            nm.peers
                .values()
                .find(|p| p.addresses.iter().any(|a| a.split('/').next() == Some(&ip.to_string())))
                .map(|p| (p.key, short_name(p)))
        };
        let (path, name) = match key {
            Some((k, name)) => (
                self.dp
                    .iter()
                    .flat_map(|d| d.peer_stats())
                    .find(|s| s.node_key == k)
                    .and_then(|s| s.path)
                    .map(|p| p.to_string()),
                name,
            ),
            None => (None, ip.to_string()),
        };
        Ok(Pong { ip: ip.to_string(), name, rtt_ms: rtt.as_secs_f64() * 1e3, path })
    }

    /// Resolves a peer given by short name, FQDN or mesh IP to its first matching mesh IP
    /// (IPv4 preferred).
    pub fn resolve(&self, peer: &str) -> Option<std::net::IpAddr> {
        if let Ok(ip) = peer.parse::<std::net::IpAddr>() {
            return Some(ip);
        }
        let nm = self.inner.netmap.borrow();
        let want = peer.trim_end_matches('.');
        let node = nm.peers.values().find(|p| short_name(p) == want || p.name.trim_end_matches('.') == want)?;
        let mut ips: Vec<std::net::IpAddr> =
            node.addresses.iter().filter_map(|a| a.split('/').next()?.parse().ok()).collect();
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips.first().copied()
    }

    /// Leaves the mesh: tells Nexus (the node is removed), stops, and clears the state directory.
    pub async fn logout(self) -> Result<(), ConnectError> {
        let _ = self.inner.stop.send(true);
        let mut conn = self.inner.dial().await?;
        let req = RegisterRequest {
            version: tailcfg::CAPABILITY_VERSION,
            node_key: self.inner.node_pub(),
            expiry: Some(wall::now() - chrono::Duration::days(1)),
            hostinfo: Some(self.inner.hostinfo()),
            ..Default::default()
        };
        let resp = conn.register(&req).await?;
        if !resp.error.is_empty() {
            tracing::warn!("Nexus answered logout with: {}", resp.error);
        }
        self.inner.state.clear()?;
        Ok(())
    }
}

/// How long joining waits for the data plane's first STUN answer and home region, so the node
/// is announced with them instead of changing its own map right after it joined. STUN usually
/// answers in one round trip; with UDP blocked the wait is cut short here and the result is
/// reported later.
const NET_INFO_SETTLE: Duration = Duration::from_millis(400);

/// Reports the data plane's endpoints and home region once they are known (bounded by
/// [`NET_INFO_SETTLE`]) and waits, within the same bound, for Nexus to echo them in our own map.
async fn settle_net_info(
    inner: &Inner,
    conn: &mut ControlConn,
    stream: &mut control::MapStream,
    net_info: &mut watch::Receiver<crate::dataplane::NetInfo>,
) {
    let deadline = tokio::time::Instant::now() + NET_INFO_SETTLE;
    let ready = |ni: &crate::dataplane::NetInfo| ni.preferred_derp != 0 && ni.report.is_some();
    if inner.netmap.borrow().derp_map.regions.is_empty() {
        return;
    }
    let _ = tokio::time::timeout_at(deadline, net_info.wait_for(ready)).await;
    let ni = net_info.borrow_and_update().clone();
    if !inner.take_net_info(&ni) {
        return;
    }
    if let Err(e) = conn.map(&inner.lite_map_request()).await {
        tracing::debug!("endpoint update failed: {e}");
        return;
    }
    let want = inner.endpoints.lock().unwrap().clone();
    let _ = tokio::time::timeout_at(deadline, async {
        while inner.netmap.borrow().self_node.endpoints != want {
            match stream.next().await {
                Ok(Some(m)) => {
                    if let Err(e) = inner.apply(&m) {
                        tracing::warn!("saving state: {e}");
                    }
                }
                _ => return,
            }
        }
    })
    .await;
}

/// This node's key expiry from its netmap, on the monotonic clock (`None`: no expiry). Read
/// against the server's clock, as peers' expiries are ([`server_now`]).
fn self_key_expiry(inner: &Inner) -> Option<std::time::Instant> {
    let e = inner.netmap.borrow().self_node.key_expiry.filter(|e| *e > tailcfg::zero_time())?;
    let (now, wall_now) = (crate::clock::now(), server_now(inner));
    match (e - wall_now).to_std() {
        Ok(ahead) => Some(now + ahead),
        Err(_) => Some(now.checked_sub((wall_now - e).to_std().unwrap_or_default()).unwrap_or(now)),
    }
}

/// Performs the session's renewal actions on the open connection; false when the connection
/// failed (the caller drops it and reconnects).
async fn renewal_actions(
    inner: &Inner,
    session: &mut Session,
    conn: &mut ControlConn,
    dp: Option<&Arc<DataPlane>>,
) -> bool {
    let mut pending: Option<PrivateKey> = None;
    while let Some(action) = session.poll_action() {
        match action {
            Action::RenewKey => {
                tracing::info!(health = ?session.key_health(crate::clock::now()), "renewing the node key");
                match inner.renew_key(conn).await {
                    Ok((key, resp)) => {
                        if !resp.error.is_empty() || resp.node_key_expired {
                            tracing::warn!(error = %resp.error, expired = resp.node_key_expired, "Nexus refused the node-key renewal");
                        }
                        pending = Some(key);
                        session.handle_renewed(crate::clock::now(), &resp);
                    }
                    Err(e) => {
                        tracing::warn!("node-key renewal failed: {e}");
                        session.handle_renew_error(crate::clock::now());
                        if matches!(e, ConnectError::Control(_)) {
                            return false;
                        }
                    }
                }
            }
            Action::KeyRenewed => {
                if let Some(key) = pending.take() {
                    match inner.commit_key(key, dp) {
                        Ok(()) => tracing::info!(key = %inner.node_pub().short(), "node key renewed"),
                        Err(e) => tracing::warn!("saving the renewed node key: {e}"),
                    }
                }
            }
            other => tracing::debug!(?other, "control action ignored while streaming"),
        }
    }
    true
}

/// What the control connection's probe policy needs from the data plane's findings.
fn net_view(ni: &crate::dataplane::NetInfo) -> NetView {
    NetView {
        endpoints: ni.endpoints.clone(),
        home: ni.preferred_derp,
        home_connected: ni.preferred_derp != 0 && ni.derp_connected.contains(&ni.preferred_derp),
    }
}

/// The background control loop: read the map stream; when it ends, let the control session
/// reconnect (with its backoff, re-confirming the registration with the saved node key only).
async fn run(
    inner: Arc<Inner>,
    mut session: Session,
    mut live: Option<(ControlConn, control::MapStream)>,
    mut net_info: watch::Receiver<crate::dataplane::NetInfo>,
    dp: Option<Arc<DataPlane>>,
) {
    let mut stop = inner.stop.subscribe();
    // Whatever changed before the loop started still has to be reported.
    net_info.mark_changed();
    let mut net_info_open = true;
    loop {
        if let Some((mut conn, mut stream)) = live.take() {
            session.handle_key_expiry(crate::clock::now(), self_key_expiry(&inner));
            let mut liveness = Liveness::new();
            liveness.handle_net(net_view(&net_info.borrow()));
            loop {
                let renew_at = session.poll_timeout().map(tokio::time::Instant::from_std);
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep_until(renew_at.unwrap_or_else(tokio::time::Instant::now)), if renew_at.is_some() => {
                        session.handle_timeout(crate::clock::now());
                        if !renewal_actions(&inner, &mut session, &mut conn, dp.as_ref()).await {
                            break;
                        }
                    }
                    r = net_info.changed(), if net_info_open => {
                        if r.is_err() {
                            net_info_open = false;
                            continue;
                        }
                        let ni = net_info.borrow_and_update().clone();
                        let probe = liveness.handle_net(net_view(&ni));
                        let report = inner.take_net_info(&ni);
                        if report || probe {
                            tracing::debug!(endpoints = ?ni.endpoints, home = ni.preferred_derp, probe, "reporting endpoints");
                            // The update doubles as the probe: any answer proves the connection.
                            liveness.handle_probe_sent(crate::clock::now());
                            let deadline = liveness.poll_timeout().map(tokio::time::Instant::from_std);
                            let sent = tokio::time::timeout_at(
                                deadline.unwrap_or_else(tokio::time::Instant::now),
                                conn.map(&inner.lite_map_request()),
                            )
                            .await;
                            match sent {
                                Ok(Ok(_)) => liveness.handle_probe_answered(),
                                Ok(Err(e)) => {
                                    tracing::info!("endpoint update failed: {e}");
                                    break;
                                }
                                Err(_) if liveness.is_dead(crate::clock::now()) => {
                                    tracing::info!("control connection did not answer within {:?} after a network change; reconnecting", control::liveness::PROBE_TIMEOUT);
                                    break;
                                }
                                Err(_) => {}
                            }
                        }
                    }
                    m = stream.next() => match m {
                        Ok(Some(m)) => {
                            if let Err(e) = inner.apply(&m) {
                                tracing::warn!("saving state: {e}");
                            }
                            session.handle_map_message(crate::clock::now());
                            session.handle_key_expiry(crate::clock::now(), self_key_expiry(&inner));
                        }
                        Ok(None) => { tracing::info!("map stream ended"); break; }
                        Err(e) => { tracing::info!("map stream failed: {e}"); break; }
                    }
                }
            }
            inner.connected.send_replace(false);
            session.handle_stream_ended(crate::clock::now());
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = stop.changed() => return,
            r = inner.establish(&mut session, &net_info) => match r {
                Ok(s) => {
                    tracing::info!("reconnected to Nexus");
                    inner.control_reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    inner.connected.send_replace(true);
                    live = Some(s);
                }
                // Past the first map the session retries every failure; this is a bug guard.
                Err(e) => {
                    tracing::error!("control loop stopped: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small map's cache is rewritten every 2 s while it changes; a large one waits in
    /// proportion to its size, up to a minute: a 10,000-peer map (about 7.5 MB) about 30 s.
    #[test]
    fn a_large_netmap_cache_is_rewritten_less_often() {
        assert_eq!(netmap_cache_wait(0), NETMAP_CACHE_EVERY);
        assert_eq!(netmap_cache_wait(75_000), NETMAP_CACHE_EVERY);
        let big = netmap_cache_wait(7_500_000);
        assert!(big > Duration::from_secs(25) && big < Duration::from_secs(35), "{big:?}");
        assert_eq!(netmap_cache_wait(1 << 30), NETMAP_CACHE_MAX_WAIT);
        assert!(netmap_cache_wait(1_000_000) < netmap_cache_wait(2_000_000));
    }
}
