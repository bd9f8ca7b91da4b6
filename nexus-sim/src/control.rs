//! The control plane: `GET /key`, the ts2021 upgrade, and `/machine/*` served over HTTP/2
//! inside the Noise channel.

use crate::store::{Node as StoreNode, Pending};
use crate::woken::WokenOnly;
use crate::Shared;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use base64::Engine;
use bytes::Bytes;
use chrono::Utc;
use citadel_proto::keys::MachinePublic;
use citadel_proto::noise::{self, NoiseStream};
use citadel_proto::tailcfg::{
    self, MapRequest, MapResponse, OverTlsPublicKeyResponse, RegisterRequest, RegisterResponse, UserProfile,
};
use citadel_proto::wall;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// One map-stream message: little-endian length, then the JSON body, zstd-compressed when
/// asked. The compression context is reused per thread: making one per message cost more
/// than the compression itself.
fn encode_map_frame(resp: &MapResponse, zstd: bool) -> Vec<u8> {
    encode_out(&Out::from(resp.clone()), zstd)
}

/// [`encode_map_frame`] of a message whose peer entries are pre-serialized: the entries are
/// copied into the JSON, not serialized again.
fn encode_out(out: &Out, zstd: bool) -> Vec<u8> {
    let json = out.to_json();
    length_prefixed(if zstd { zstd_frame(&json) } else { json })
}

/// A map-stream message: `body` after its length (u32, little-endian).
fn length_prefixed(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// `json` as one zstd frame. Every member of an org decodes every delta, and a client decodes
/// a stored frame by copying it where a compressed one costs it entropy tables first: a join's
/// delta (1,027 bytes of JSON, 498 compressed) decoded in 5.9 µs compressed and 4.1 µs stored
/// (`map_decode`), an endpoint patch in 2.3 and 0.7 µs. So a small message goes stored: it
/// costs each member about 0.5 KB more on the wire, the price of not spending 2 µs of its CPU
/// per change. A larger one (a full map, many changes at once) is compressed, and stored only
/// if compression barely shrinks it. The compression context is reused per thread.
pub fn zstd_frame(json: &[u8]) -> Vec<u8> {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    if json.len() <= citadel_proto::tailcfg::STORED_UP_TO {
        return citadel_proto::tailcfg::zstd_stored(json);
    }
    let body = CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(1).ok();
        }
        c.as_mut().and_then(|c| c.compress(json).ok())
    });
    let body = body.unwrap_or_else(|| zstd::bulk::compress(json, 1).expect("zstd in memory"));
    if body.len() * 4 > json.len() * 3 {
        citadel_proto::tailcfg::zstd_stored(json)
    } else {
        body
    }
}

/// A map message whose peer entries may be JSON already serialized once for every viewer
/// (see [`EntryCache`]); the rest is in `resp`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Out {
    /// The message without the entries below.
    pub(crate) resp: MapResponse,
    /// `Peers` (a full map) as serialized entries; `resp.peers` is then `None`.
    peers: Option<Vec<Bytes>>,
    /// `PeersChanged` as serialized entries; `resp.peers_changed` is then `None`.
    changed: Vec<Bytes>,
}

impl From<MapResponse> for Out {
    fn from(resp: MapResponse) -> Out {
        Out { resp, peers: None, changed: vec![] }
    }
}

impl Out {
    /// The message as JSON: `resp` with the entry lists spliced into its object.
    fn to_json(&self) -> Vec<u8> {
        let lists =
            [("Peers", self.peers.as_deref()), ("PeersChanged", Some(&self.changed[..]).filter(|c| !c.is_empty()))];
        if lists.iter().all(|(_, l)| l.is_none()) {
            return serde_json::to_vec(&self.resp).expect("MapResponse serializes");
        }
        let extra: usize = lists.iter().flat_map(|(_, l)| l.iter().flat_map(|l| l.iter())).map(|e| e.len() + 1).sum();
        let mut json = self.open_json(extra + 40);
        for (name, list) in lists {
            let Some(list) = list else { continue };
            open_list(&mut json, name);
            for (i, e) in list.iter().enumerate() {
                if i > 0 {
                    json.push(b',');
                }
                json.extend_from_slice(e);
            }
            json.push(b']');
        }
        json.push(b'}');
        json
    }

    /// `resp` as JSON without its closing brace, with room for `extra` more bytes: the entry
    /// lists go in before the brace.
    fn open_json(&self, extra: usize) -> Vec<u8> {
        let mut json = serde_json::to_vec(&self.resp).expect("MapResponse serializes");
        debug_assert_eq!(json.last(), Some(&b'}'));
        json.pop();
        json.reserve(extra);
        json
    }

    /// The whole message as one [`MapResponse`] (entries parsed back).
    pub(crate) fn response(&self) -> MapResponse {
        serde_json::from_slice(&self.to_json()).expect("own JSON parses")
    }

    fn is_empty(&self) -> bool {
        self.resp == MapResponse::default() && self.peers.is_none() && self.changed.is_empty()
    }

    /// The message as one frame, as [`encode_out`] makes it; a full map's peer list goes as
    /// chunks kept in `chunks` (see [`crate::chunks`]).
    fn encode(&self, zstd: bool, s: &Shared) -> Vec<u8> {
        let Some(peers) = self.peers.as_deref().filter(|_| zstd && self.changed.is_empty()) else {
            return encode_out(self, zstd);
        };
        let mut prefix = self.open_json(16);
        open_list(&mut prefix, "Peers");
        // Kept chunks hold at most a few entries per node there is.
        let bound = 3 * s.store.node_count() + 4096;
        length_prefixed(s.chunks.body(&prefix, peers, b"]}", bound))
    }
}

/// Starts list `name` in an object opened by [`Out::open_json`].
fn open_list(json: &mut Vec<u8>, name: &str) {
    if json.len() > 1 {
        json.push(b',');
    }
    json.push(b'"');
    json.extend_from_slice(name.as_bytes());
    json.extend_from_slice(b"\":[");
}

/// Each node's map entry serialized once, for every map and delta that carries it. An entry
/// is reused while the store still holds the same record (records are replaced, never
/// changed in place, while another holder shares them), the node's online state and key
/// expiry are the same; entries that depend on the viewer (nodes serving routes) are not kept.
#[derive(Default)]
pub struct EntryCache {
    entries: parking_lot::Mutex<std::collections::HashMap<u64, CachedEntry>>,
}

struct CachedEntry {
    node: std::sync::Arc<StoreNode>,
    online: bool,
    expired: bool,
    json: Bytes,
}

impl EntryCache {
    /// Node `n`'s entry as `viewer` sees it, serialized.
    fn get(
        &self,
        s: &Shared,
        n: &std::sync::Arc<StoreNode>,
        now: chrono::DateTime<Utc>,
        keep: &dyn Fn(&crate::policy::ipset::Prefix) -> bool,
    ) -> Bytes {
        let online = s.store.is_online(n.id);
        let expired = n.is_expired(now);
        if let Some(e) = self.entries.lock().get(&n.id) {
            if std::sync::Arc::ptr_eq(&e.node, n) && e.online == online && e.expired == expired {
                return e.json.clone();
            }
        }
        let mut t = to_tail_as(s, n, now, online);
        let shared = crate::routes::served(n).is_empty();
        if !shared {
            crate::routes::reduce_entry(&mut t, false, keep);
        }
        let json = Bytes::from(serde_json::to_vec(&t).expect("Node serializes"));
        if shared {
            let mut m = self.entries.lock();
            if m.len() >= 2 * s.store.node_count() + 1024 {
                // Entries of deleted nodes: drop them all; the live ones come back on use.
                m.clear();
            }
            m.insert(n.id, CachedEntry { node: n.clone(), online, expired, json: json.clone() });
        }
        json
    }

    /// Forgets node `id`'s entry.
    fn remove(&self, id: u64) {
        self.entries.lock().remove(&id);
    }
}

/// An org's delta frames encoded once and shared by every stream they are the same bytes
/// for: streams of untagged members that read the same stretch of the org's change log
/// when it names only other members (joins, removals, endpoint, DERP, online changes).
/// Such a delta names no member-specific field (the filter and the route check are the
/// org's, there is no self entry), so building, serializing and compressing it per member
/// repeats the same work.
#[derive(Default)]
pub struct DeltaCache {
    frames: parking_lot::Mutex<std::collections::HashMap<DeltaKey, Option<SharedDelta>>>,
}

/// A shared delta's frame and the filter fingerprint its readers hold after it.
type SharedDelta = (Bytes, Option<u64>);

/// What a shared delta is the same bytes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum DeltaKey {
    /// Org, change-log stretch (after `from` up to `to`), compression and the filter the
    /// readers hold (its [`filter_print`]).
    Org(u64, u64, u64, bool, Option<u64>),
    /// Stretch of the log of every org's changes, compression, and [`ids_print`] of the
    /// peers it names.
    Global(u64, u64, bool, u64),
}

/// A fingerprint of the peers a custom-policy delta sends whole, patches and removes.
fn ids_print(whole: &BTreeSet<u64>, patched: &[u64], removed: &[u64]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (whole, patched, removed).hash(&mut h);
    h.finish()
}

/// A packet filter's fingerprint: streams remember it rather than the filter itself.
fn filter_print(f: &[tailcfg::FilterRule]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    f.hash(&mut h);
    h.finish()
}

/// Frames kept at most; past it the cache starts over (streams rebuild what they need).
const MAX_SHARED_DELTAS: usize = 4096;

impl DeltaCache {
    /// The frame under `key` (`None` inside: nothing to send), built by `build` if absent.
    fn get_or_build(&self, key: DeltaKey, build: impl FnOnce() -> Option<SharedDelta>) -> Option<SharedDelta> {
        if let Some(f) = self.frames.lock().get(&key) {
            return f.clone();
        }
        let f = build();
        let mut m = self.frames.lock();
        if m.len() >= MAX_SHARED_DELTAS {
            m.clear();
        }
        m.entry(key).or_insert(f).clone()
    }
}

/// True when an org delta over `changes` is the same for every untagged member not named in
/// them: changes of other members only (no resync, nothing of `me`).
fn shareable(changes: &[std::sync::Arc<crate::store::Change>], me: u64) -> bool {
    use crate::store::Change;
    changes.iter().all(|c| match &**c {
        Change::Patch(id, _) | Change::Upsert(id) | Change::Removed(id) => *id != me,
        Change::Resync => false,
    })
}

/// Who is on the other end of a Noise session.
#[derive(Clone, Copy)]
pub struct Session {
    /// The client's machine key.
    pub machine: MachinePublic,
    /// The client's capability version.
    pub version: u16,
}

/// `GET /key?v=N`.
pub async fn key(State(s): State<Shared>) -> Json<OverTlsPublicKeyResponse> {
    Json(OverTlsPublicKeyResponse {
        legacy_public_key: format!("mkey:{}", hex::encode([0u8; 32])),
        public_key: MachinePublic(s.server_key.public_bytes()),
    })
}

/// `POST /ts2021`: answer the Noise initiation carried in `X-Tailscale-Handshake`, switch
/// protocols, then serve HTTP/2 inside the channel.
pub async fn upgrade(State(s): State<Shared>, mut req: Request) -> Response {
    let headers = req.headers();
    let upgrade_ok = headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("tailscale-control-protocol"));
    if !upgrade_ok {
        return (StatusCode::BAD_REQUEST, "expected Upgrade: tailscale-control-protocol").into_response();
    }
    let Some(init) = headers
        .get("x-tailscale-handshake")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v.trim()).ok())
    else {
        return (StatusCode::BAD_REQUEST, "missing or invalid X-Tailscale-Handshake").into_response();
    };
    if s.faults.refuse_control() {
        return (StatusCode::SERVICE_UNAVAILABLE, "control plane paused").into_response();
    }
    let accepted = match noise::accept(&s.server_key, &init) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!("rejected ts2021 handshake: {e}");
            return (StatusCode::BAD_REQUEST, format!("handshake failed: {e}")).into_response();
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let version = accepted.version;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        let mut io = TokioIo::new(upgraded);
        if version < tailcfg::MIN_CAPABILITY_VERSION {
            let _ = io.write_all(&noise::error_frame(&format!("unsupported client version {version}"))).await;
            return;
        }
        if io.write_all(&accepted.response_frame).await.is_err() {
            return;
        }
        let mut stream = NoiseStream::new(io, accepted.tx, accepted.rx);
        let early = serde_json::to_vec(&tailcfg::EarlyNoise {
            node_key_challenge: format!("chalpub:{}", hex::encode(s.challenge_pub)),
        })
        .expect("serializes");
        if stream.write_all(&noise::early_payload(&early)).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        let session = Session { machine: MachinePublic(accepted.client_machine), version };
        let svc = TowerToHyperService::new(machine_router(s.clone()).layer(Extension(session)));
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(TokioIo::new(stream), svc);
        // The connection's task runs for every frame; the shutdown wait is looked at only
        // when it fired.
        let mut shutdown = WokenOnly::new(Box::pin(s.faults.wait_shutdown()));
        tokio::select! {
            biased;
            r = conn => if let Err(e) = r { tracing::debug!("noise http/2 session ended: {e}") },
            _ = std::future::poll_fn(|cx| shutdown.poll_with(cx, |f, cx| std::future::Future::poll(f.as_mut(), cx))) => {}
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "tailscale-control-protocol")
        .header("connection", "upgrade")
        .body(Body::empty())
        .expect("static response")
}

fn machine_router(s: Shared) -> Router {
    Router::new()
        .route("/machine/register", post(register))
        .route("/machine/map", post(map))
        .fallback(not_implemented)
        .with_state(s)
}

/// What Headscale answers for `/machine/*` endpoints it does not implement.
async fn not_implemented(req: Request) -> (StatusCode, &'static str) {
    tracing::debug!("not implemented: {} {}", req.method(), req.uri().path());
    (StatusCode::NOT_IMPLEMENTED, "not implemented")
}

fn bad_json(e: serde_json::Error) -> Response {
    (StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")).into_response()
}

fn user_profile(s: &Shared, user_id: u64) -> UserProfile {
    let u = s.store.user(user_id);
    let name = u.as_ref().map(|u| u.name.clone()).unwrap_or_default();
    UserProfile {
        id: user_id as i64,
        login_name: name.clone(),
        display_name: u.map(|u| u.display_name).unwrap_or(name),
        profile_pic_url: String::new(),
    }
}

fn register_ok(s: &Shared, n: &StoreNode) -> RegisterResponse {
    let p = user_profile(s, n.user_id);
    RegisterResponse {
        user: tailcfg::User {
            id: p.id,
            login_name: p.login_name.clone(),
            display_name: p.display_name.clone(),
            profile_pic_url: String::new(),
        },
        login: tailcfg::Login {
            id: p.id,
            provider: String::new(),
            login_name: p.login_name,
            display_name: p.display_name,
        },
        machine_authorized: true,
        ..Default::default()
    }
}

async fn register(State(s): State<Shared>, Extension(sess): Extension<Session>, body: Bytes) -> Response {
    s.faults.note_register_request();
    let req: RegisterRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    let resp = handle_register(&s, sess, req).await;
    s.metrics.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Json(resp).into_response()
}

/// Starts a new key lifetime for `n` when the server gives keys one; true when it did.
fn set_key_expiry(s: &Shared, n: &mut StoreNode, now: chrono::DateTime<Utc>) -> bool {
    let Some(life) = s.cfg.node_key_expiry.and_then(|d| chrono::Duration::from_std(d).ok()) else {
        return false;
    };
    n.expiry = Some(now + life);
    true
}

/// Largest Hostinfo (as JSON) a node may register or report.
pub const MAX_HOSTINFO: usize = 16 * 1024;

fn hostinfo_too_large(h: Option<&tailcfg::Hostinfo>) -> bool {
    h.is_some_and(|h| serde_json::to_vec(h).map_or(true, |j| j.len() > MAX_HOSTINFO))
}

/// How long a node registered with an auth key may take to open its map stream before its
/// org's members are told of it anyway (see [`crate::store::Store::register_unannounced`]).
/// Clients open it right after the registration's answer.
pub(crate) const ANNOUNCE_GRACE: Duration = Duration::from_secs(1);

pub(crate) async fn handle_register(s: &Shared, sess: Session, req: RegisterRequest) -> RegisterResponse {
    let now = wall::now();
    if hostinfo_too_large(req.hostinfo.as_ref()) {
        return RegisterResponse {
            error: format!("Hostinfo larger than {MAX_HOSTINFO} bytes refused"),
            ..Default::default()
        };
    }
    let existing = s.store.node_by_keys(&sess.machine, &req.node_key).or_else(|| {
        (!req.old_node_key.is_zero()).then(|| s.store.node_by_keys(&sess.machine, &req.old_node_key)).flatten()
    });
    // Logout: an expiry in the past.
    if req.expiry.is_some_and(|e| e > tailcfg::zero_time() && e <= now) {
        if let Some(n) = existing {
            tracing::info!(node = n.id, "node logged out");
            let _ = s.store.delete_node(n.id);
        }
        return RegisterResponse { node_key_expired: true, ..Default::default() };
    }
    if let Some(auth) = req.auth.as_ref().filter(|a| !a.auth_key.is_empty()) {
        let key = match s.store.use_key(&auth.auth_key) {
            Ok(k) => k,
            Err(e) => {
                tracing::info!("registration refused: {e}");
                return RegisterResponse { error: e, ..Default::default() };
            }
        };
        let hostinfo = req.hostinfo.clone().unwrap_or_default();
        let n = s.store.register_unannounced(crate::store::Registration {
            mk: sess.machine,
            nk: req.node_key,
            user_id: key.user_id,
            hostinfo,
            ephemeral: key.ephemeral || req.ephemeral,
            tags: key.acl_tags.clone(),
            auth_key_id: Some(key.id),
            method: "authkey",
            ipv4_base: s.cfg.ipv4_base,
            ipv6_base: s.cfg.ipv6_base,
        });
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("registration refused: {e}");
                return RegisterResponse { error: e.to_string(), ..Default::default() };
            }
        };
        tracing::info!(node = n.id, user = key.user_id, "node registered with a pre-auth key");
        // Its org hears of it with its first map stream, or after the grace if none comes.
        s.schedule_announce(n.id);
        let n = s.store.update_node(n.id, |n| set_key_expiry(s, n, now)).unwrap_or(n);
        let n = crate::routes::auto_approve(s, n.id).unwrap_or(n);
        return register_ok(s, &n);
    }
    if let Some(n) = existing {
        if n.is_expired(now) {
            return RegisterResponse { node_key_expired: true, ..Default::default() };
        }
        // Node-key renewal (Headscale's "node key refresh"): the machine, authenticated by the
        // Noise channel, replaces the node key it holds now, before that key expires. The node
        // keeps its record and so its addresses.
        if !req.old_node_key.is_zero() && n.node_key == req.old_node_key && req.node_key != req.old_node_key {
            if req.node_key.is_zero() || s.store.nodes(None).iter().any(|o| o.node_key == req.node_key) {
                return RegisterResponse { error: "the new node key is already in use".into(), ..Default::default() };
            }
            let new_key = req.node_key;
            let n = match s.store.update_node(n.id, |n| {
                n.node_key = new_key;
                set_key_expiry(s, n, now);
                true
            }) {
                Ok(n) => n,
                Err(e) => return RegisterResponse { error: e.to_string(), ..Default::default() },
            };
            tracing::info!(node = n.id, "node key renewed");
            return register_ok(s, &n);
        }
        return register_ok(s, &n);
    }
    // Interactive registration: hand out /register/{id}; a follow-up waits for approval.
    if !req.followup.is_empty() {
        let id = req.followup.rsplit('/').next().unwrap_or_default().to_string();
        let deadline = tokio::time::Instant::now() + s.cfg.followup_wait;
        let mut rx = s.store.subscribe_all();
        loop {
            if let Some(n) = s.store.node_by_keys(&sess.machine, &req.node_key) {
                return register_ok(s, &n);
            }
            if s.store.pending(&id).is_none() {
                // An approval takes the request, then registers the node: give it a moment,
                // so an approval seen half-done is not answered as a denial.
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
                if let Some(n) = s.store.node_by_keys(&sess.machine, &req.node_key) {
                    return register_ok(s, &n);
                }
                return RegisterResponse {
                    error: "registration request expired or was denied".into(),
                    ..Default::default()
                };
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return RegisterResponse { auth_url: req.followup.clone(), ..Default::default() };
            }
        }
    }
    let pending = Pending {
        machine_key: sess.machine,
        node_key: req.node_key,
        hostinfo: req.hostinfo.clone().unwrap_or_default(),
        ephemeral: req.ephemeral,
        created: now,
    };
    let id = match s.store.add_pending(pending, s.cfg.pending_ttl) {
        Ok(id) => id,
        Err(e) => return RegisterResponse { error: e.to_string(), ..Default::default() },
    };
    RegisterResponse {
        auth_url: format!("{}/register/{id}", s.cfg.server_url.trim_end_matches('/')),
        ..Default::default()
    }
}

/// Each node's primary subnet routes ([`crate::routes::primaries`]) at one store version:
/// computed once per version, where every route-serving entry a stream built scanned every
/// node (a router's change in an org of N members cost N scans of N nodes).
#[derive(Default)]
pub struct PrimaryCache {
    at: parking_lot::Mutex<Option<(u64, Primaries)>>,
}

type Primaries = std::sync::Arc<BTreeMap<u64, Vec<crate::policy::ipset::Prefix>>>;

impl PrimaryCache {
    fn get(&self, s: &Shared) -> Primaries {
        // Read before the nodes: a change after this moves the version on (as in
        // `PolicyState::compiled`). Held while computing: the callers at the same time need it.
        let version = s.store.version();
        let mut at = self.at.lock();
        if let Some((_, p)) = at.as_ref().filter(|(v, _)| *v == version) {
            return p.clone();
        }
        let p = std::sync::Arc::new(crate::routes::primaries(s.store.nodes(None).iter().map(|n| &**n), |id| {
            s.store.is_online(id)
        }));
        *at = Some((version, p.clone()));
        p
    }
}

/// A store node as map messages describe it (the same for every viewer).
fn to_tail(s: &Shared, n: &StoreNode, now: chrono::DateTime<Utc>) -> tailcfg::Node {
    to_tail_as(s, n, now, s.store.is_online(n.id))
}

/// [`to_tail`] with the node's online state given.
fn to_tail_as(s: &Shared, n: &StoreNode, now: chrono::DateTime<Utc>, online: bool) -> tailcfg::Node {
    let addrs = vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)];
    let own: Vec<crate::policy::ipset::Prefix> =
        addrs.iter().filter_map(|a| crate::policy::ipset::Prefix::parse(a)).collect();
    // Which node is primary for a subnet depends on every node serving it; only a node that
    // serves routes asks.
    let primaries = if crate::routes::served(n).is_empty() { None } else { Some(s.primaries.get(s)) };
    let primary = primaries.as_ref().and_then(|p| p.get(&n.id)).map(Vec::as_slice).unwrap_or(&[]);
    let (allowed_ips, primary_routes) = crate::routes::allowed_ips(n, &own, primary);
    tailcfg::Node {
        id: n.id as i64,
        stable_id: n.id.to_string(),
        name: format!("{}.{}.", n.given_name, s.cfg.base_domain),
        user: n.user_id as i64,
        key: n.node_key,
        key_expiry: n.expiry,
        machine: n.machine_key,
        disco_key: n.disco_key,
        addresses: addrs,
        allowed_ips,
        primary_routes,
        endpoints: n.endpoints.clone(),
        derp: if n.home_derp > 0 { format!("127.3.3.40:{}", n.home_derp) } else { String::new() },
        home_derp: n.home_derp,
        hostinfo: n.hostinfo.clone(),
        created: Some(n.created_at),
        tags: n.tags.clone(),
        last_seen: n.last_seen,
        online: Some(online),
        machine_authorized: true,
        expired: n.is_expired(now),
    }
}

/// The map a node sees: itself, the peers the policy lets talk to it in either direction,
/// the DERP map and its packet filter (the policy's rules reduced to its own addresses).
pub fn build_map(s: &Shared, me: &StoreNode) -> MapResponse {
    match OrgTemplate::current(s) {
        Some(t) => t.build_map(s, me),
        None => build_map_compiled(s, me),
    }
}

/// [`build_map`] from the policy compiled over every node.
fn build_map_compiled(s: &Shared, me: &StoreNode) -> MapResponse {
    let c = s.policy.compiled(&s.store);
    build_out_compiled(s, me, &c, &c.peers_of(me.id)).response()
}

/// `me`'s full map under compile `c`, whose peers of `me` are `peers`, their entries from the
/// [`EntryCache`].
fn build_out_compiled(s: &Shared, me: &StoreNode, c: &crate::policy::Compiled, peers: &[u64]) -> Out {
    let now = wall::now();
    let keep = |r: &crate::policy::ipset::Prefix| c.can_access_route(me.id, r);
    let peer_nodes = s.store.nodes_by_id(peers);
    let peers: Vec<Bytes> = peer_nodes.iter().map(|n| s.entries.get(s, n, now, &keep)).collect();
    let users: Vec<u64> = peer_nodes.iter().map(|n| n.user_id).collect();
    let mut m = map_of(s, me, vec![], c.filter_for(me.id), users, now);
    m.peers = None;
    crate::routes::reduce_map(&mut m, &keep);
    Out { resp: m, peers: Some(peers), changed: vec![] }
}

fn map_of(
    s: &Shared,
    me: &StoreNode,
    peers: Vec<tailcfg::Node>,
    filter: Vec<tailcfg::FilterRule>,
    mut users: Vec<u64>,
    now: chrono::DateTime<Utc>,
) -> MapResponse {
    users.push(me.user_id);
    users.sort_unstable();
    users.dedup();
    MapResponse {
        node: Some(to_tail(s, me, now)),
        derp_map: Some(s.derp_map.clone()),
        peers: Some(peers),
        domain: s.cfg.base_domain.clone(),
        dns_config: Some(serde_json::json!({"Domains": [s.cfg.base_domain]})),
        packet_filter: Some(filter),
        user_profiles: users.into_iter().map(|u| user_profile(s, u)).collect(),
        ..Default::default()
    }
}

/// The built-in org-isolation policy in a form that needs no global compile: a node's map
/// depends on its own org only (untagged members see each other; tagged nodes see nobody),
/// so maps are built from the org's nodes and changes reach only the org's streams.
///
/// The filter is the policy's own output for a one-node org, with that node's addresses
/// replaced by the org's untagged addresses, as sources and as destinations: the compiler
/// decides ports and protocols. The compiled policy names only the member's own addresses as
/// destinations; every client drops inbound packets to addresses that are not its own before
/// it consults the filter, so naming the whole org admits exactly the same packets (tests
/// check this against the full compile), and it makes the filter one value per org: a
/// join's delta is then the same bytes for every member and is encoded once.
struct OrgTemplate {
    rules: Vec<tailcfg::FilterRule>,
}

const TEMPLATE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(100, 64, 0, 1);
const TEMPLATE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1);

impl OrgTemplate {
    /// The template when the active policy is the built-in one and no test fault leaks peers.
    fn current(s: &Shared) -> Option<OrgTemplate> {
        let (p, _) = s.policy.get();
        if p.text() != crate::policy::ORG_ISOLATION || s.faults.leaks_any() {
            return None;
        }
        let users = [crate::policy::PolicyUser { id: 1, name: "template".into(), email: String::new() }];
        let nodes = [crate::policy::PolicyNode::new(1, 1, TEMPLATE_V4, TEMPLATE_V6, vec![])];
        Some(OrgTemplate { rules: p.compile(&users, &nodes).filter_for(1) })
    }

    fn visible(me: &StoreNode, other: &StoreNode) -> bool {
        me.id != other.id && me.user_id == other.user_id && me.tags.is_empty() && other.tags.is_empty()
    }

    /// `me`'s packet filter given its org's untagged addresses (the same for every untagged
    /// member of the org; none for a tagged node).
    fn filter(&self, me: &StoreNode, sources: &[String]) -> Vec<tailcfg::FilterRule> {
        if !me.tags.is_empty() {
            return vec![];
        }
        let (t4, t6) = (TEMPLATE_V4.to_string(), TEMPLATE_V6.to_string());
        let (v6, v4): (Vec<String>, Vec<String>) = sources.iter().cloned().partition(|p| p.contains(':'));
        let (v4, v6) = (org_destinations(v4), org_destinations(v6));
        self.rules
            .iter()
            .map(|r| tailcfg::FilterRule {
                src_ips: sources.to_vec(),
                dst_ports: r
                    .dst_ports
                    .iter()
                    .flat_map(|d| {
                        let ips: Vec<String> = if d.ip == t4 {
                            v4.clone()
                        } else if d.ip == t6 {
                            v6.clone()
                        } else {
                            vec![d.ip.clone()]
                        };
                        ips.into_iter().map(move |ip| tailcfg::NetPortRange { ip, ports: d.ports })
                    })
                    .collect(),
                ip_proto: r.ip_proto.clone(),
            })
            .collect()
    }

    /// `me`'s full map, its peers' entries from the [`EntryCache`].
    fn build_out(&self, s: &Shared, me: &StoreNode) -> Out {
        let now = wall::now();
        let keep = crate::routes::org_route_check(s, me);
        let peers: Vec<Bytes> = if me.tags.is_empty() {
            s.store
                .org_nodes(me.user_id)
                .iter()
                .filter(|n| Self::visible(me, n))
                .map(|n| s.entries.get(s, n, now, &keep))
                .collect()
        } else {
            vec![]
        };
        let filter = self.filter(me, &s.store.org_member_sources(me.user_id));
        let mut m = map_of(s, me, vec![], filter, vec![], now);
        m.peers = None;
        crate::routes::reduce_map(&mut m, &keep);
        Out { resp: m, peers: Some(peers), changed: vec![] }
    }

    fn build_map(&self, s: &Shared, me: &StoreNode) -> MapResponse {
        self.build_out(s, me).response()
    }
}

/// The destinations of an org's filter for one family: the smallest prefix covering the
/// org's addresses `exact` when it lies inside the tailnet's ranges (a member admits only
/// packets to its own addresses, and no approved subnet route lies inside those ranges:
/// `routes::parse_approved` refuses one), so the cover admits what the exact list does in
/// one entry instead of one per address run; else the exact list.
fn org_destinations(exact: Vec<String>) -> Vec<String> {
    use crate::policy::ipset::{Prefix, TAILNET_RANGES};
    let prefixes: Vec<Prefix> = exact.iter().filter_map(|p| Prefix::parse(p)).collect();
    if prefixes.len() != exact.len() || prefixes.len() < 2 {
        return exact;
    }
    match Prefix::cover(&prefixes) {
        Some(c) if TAILNET_RANGES.iter().any(|r| r.contains_prefix(&c)) => {
            vec![c.to_string()]
        }
        _ => exact,
    }
}

/// True when nodes `a` and `b` are in each other's maps (the DERP relay's policy check);
/// under the built-in policy without compiling it over every node.
pub fn may_talk(s: &Shared, a: u64, b: u64) -> bool {
    if OrgTemplate::current(s).is_some() {
        return match (s.store.node(a), s.store.node(b)) {
            (Some(x), Some(y)) => OrgTemplate::visible(&x, &y),
            _ => false,
        };
    }
    s.policy.compiled(&s.store).may_talk(a, b)
}

/// The delta turning map `old` into map `new` (`None` when nothing changed). Peers are
/// compared by id: new or changed ones go in `PeersChanged`, missing ones in `PeersRemoved`.
pub fn diff_maps(old: &MapResponse, new: &MapResponse) -> Option<MapResponse> {
    let mut d = MapResponse::default();
    if old.node != new.node {
        d.node.clone_from(&new.node);
    }
    if old.derp_map != new.derp_map {
        d.derp_map.clone_from(&new.derp_map);
    }
    if old.dns_config != new.dns_config {
        d.dns_config.clone_from(&new.dns_config);
    }
    if old.domain != new.domain {
        d.domain.clone_from(&new.domain);
    }
    if old.packet_filter != new.packet_filter {
        d.packet_filter = Some(new.packet_filter.clone().unwrap_or_default());
    }
    if old.user_profiles != new.user_profiles {
        d.user_profiles.clone_from(&new.user_profiles);
    }
    let before: std::collections::HashMap<i64, &tailcfg::Node> =
        old.peers.iter().flatten().map(|p| (p.id, p)).collect();
    let after: std::collections::HashSet<i64> = new.peers.iter().flatten().map(|p| p.id).collect();
    let changed: Vec<tailcfg::Node> =
        new.peers.iter().flatten().filter(|p| before.get(&p.id) != Some(p)).cloned().collect();
    let mut removed: Vec<i64> = before.keys().filter(|id| !after.contains(id)).copied().collect();
    removed.sort_unstable();
    if !changed.is_empty() {
        d.peers_changed = Some(changed);
    }
    if !removed.is_empty() {
        d.peers_removed = Some(removed);
    }
    (d != MapResponse::default()).then_some(d)
}

/// Turns a full map into a message that replaces whatever the client holds. Tailscale clients
/// read an empty `Peers` as "no change", so a map without peers instead removes every node
/// the client may know. Only org streams replace (a global stream sends differences), so that
/// is its org's other members and the nodes that left the org lately (the client may have
/// missed their removal): naming other orgs' nodes would tell the client about them. A test
/// fault leaking peers across orgs adds every node.
fn replacing(s: &Shared, mut m: Out, me: u64) -> Out {
    if m.peers.as_ref().is_some_and(|p| p.is_empty()) || m.resp.peers.as_ref().is_some_and(|p| p.is_empty()) {
        (m.peers, m.resp.peers) = (None, None);
        let mut known = std::collections::BTreeSet::new();
        if let Some(org) = s.store.node(me).map(|n| n.user_id) {
            known.extend(s.store.org_nodes(org).iter().map(|n| n.id));
            known.extend(s.store.org_gone(org));
        }
        if s.faults.leaks_any() {
            known.extend(s.store.node_ids());
        }
        let ids: Vec<i64> = known.into_iter().filter(|id| *id != me).map(|id| id as i64).collect();
        m.resp.peers_removed = (!ids.is_empty()).then_some(ids);
    }
    m
}

fn patch_of(id: u64, p: &crate::store::NodePatch) -> tailcfg::PeerChange {
    tailcfg::PeerChange {
        node_id: id as i64,
        derp_region: p.home_derp,
        endpoints: p.endpoints.clone(),
        disco_key: p.disco_key,
        online: p.online,
        last_seen: p.last_seen,
        ..Default::default()
    }
}

/// Adds `by` to user `u`'s count of peers; true when the user came or went.
fn count_user(users: &mut BTreeMap<u64, u32>, u: u64, by: i32) -> bool {
    let n = users.entry(u).or_insert(0);
    let was = *n;
    *n = n.saturating_add_signed(by);
    let now = *n;
    if now == 0 {
        users.remove(&u);
    }
    (was == 0) != (now == 0)
}

/// How a stream keeps its client's map current.
enum Mode {
    /// Built-in policy: follows the org's change log.
    /// `filter`: the fingerprint of the packet filter this stream last sent (see
    /// [`filter_print`]); a delta carries the filter only when it differs.
    Org { tmpl: OrgTemplate, cursor: u64, tagged: bool, filter: Option<u64> },
    /// Any other policy: follows the log of every org's changes (peers may span orgs).
    /// `compiled`: the policy compile the client's peers follow (it holds exactly that
    /// compile's peers of this node); `users`: how many of those peers each user owns (the
    /// map's user profiles are theirs and this node's); `filter` as in `Org`.
    Global { cursor: u64, compiled: std::sync::Arc<crate::policy::Compiled>, users: BTreeMap<u64, u32>, filter: u64 },
}

/// One map stream's state between messages.
struct Streamer {
    s: Shared,
    node_id: u64,
    user_id: u64,
    mode: Mode,
    zstd: bool,
    /// The node as of the last wake, `None` once it left the org, expired or was deleted.
    me: Option<std::sync::Arc<StoreNode>>,
}

/// What a stream does after a wake.
enum Step {
    Send(Box<Out>),
    /// An encoded frame shared with other streams (its control time already set).
    Frame(Bytes),
    Nothing,
    /// The client must reconnect (moved org, expired, deleted, or its own visibility changed).
    End,
}

impl Streamer {
    /// The first message (a full map) and the stream state after it.
    fn start(s: &Shared, me: &StoreNode, zstd: bool) -> (Streamer, Out) {
        let mut st = Streamer {
            s: s.clone(),
            node_id: me.id,
            user_id: me.user_id,
            // Set by `reset` below, for the policy in force.
            mode: Mode::Org { tmpl: OrgTemplate { rules: vec![] }, cursor: 0, tagged: false, filter: None },
            zstd,
            me: None,
        };
        st.current();
        let m = st.reset(me);
        (st, m)
    }

    /// Switches to the mode the current policy allows and returns a full map.
    fn reset(&mut self, me: &StoreNode) -> Out {
        let s = &self.s;
        match OrgTemplate::current(s) {
            Some(tmpl) => {
                // The cursor is taken before the map is built: changes in between are sent
                // again, which is harmless (each delta carries current state).
                let cursor = s.store.org_seq(me.user_id);
                let m = tmpl.build_out(s, me);
                let filter = m.resp.packet_filter.as_deref().map(filter_print);
                self.mode = Mode::Org { tmpl, cursor, tagged: !me.tags.is_empty(), filter };
                m
            }
            None => {
                // The cursor and the compile are taken before the map is built, as above.
                let cursor = s.store.all_seq();
                let c = s.policy.compiled(&s.store);
                let peers = c.peers_of(me.id);
                let mut users = BTreeMap::new();
                for u in peers.iter().filter_map(|p| c.user_of(*p)) {
                    *users.entry(u).or_insert(0) += 1;
                }
                let m = if s.faults.leaks_any() {
                    Out::from(s.faults.with_leaks(s, me, build_map))
                } else {
                    build_out_compiled(s, me, &c, &peers)
                };
                // The filter the map carries (the compile's for this node).
                let filter = filter_print(m.resp.packet_filter.as_deref().unwrap_or_default());
                self.mode = Mode::Global { cursor, compiled: c, users, filter };
                m
            }
        }
    }

    /// A full map from [`Streamer::reset`] made to replace whatever the client holds: an
    /// empty peer list names the peers it held instead (see [`replacing`]).
    fn replace(&mut self, me: &StoreNode) -> Out {
        let held = match &self.mode {
            Mode::Global { compiled, .. } if !self.s.faults.leaks_any() => Some(compiled.peers_of(me.id)),
            _ => None,
        };
        let mut m = self.reset(me);
        match held {
            Some(held) if m.peers.as_ref().is_some_and(Vec::is_empty) => {
                m.peers = None;
                m.resp.peers_removed = (!held.is_empty()).then(|| held.into_iter().map(|id| id as i64).collect());
                m
            }
            _ => replacing(&self.s, m, self.node_id),
        }
    }

    /// The node now (see [`Streamer::me`]).
    fn current(&mut self) -> Option<std::sync::Arc<StoreNode>> {
        self.me =
            self.s.store.node(self.node_id).filter(|me| me.user_id == self.user_id && !me.is_expired(wall::now()));
        self.me.clone()
    }

    /// After a policy change: a full map for the new policy, replacing the client's.
    fn policy_changed(&mut self) -> Step {
        let Some(me) = self.current() else { return Step::End };
        Step::Send(Box::new(self.replace(&me)))
    }

    /// After a store change: the delta since the last message.
    fn store_changed(&mut self) -> Step {
        match self.mode {
            Mode::Org { cursor, .. } => self.org_changed(cursor),
            Mode::Global { cursor, .. } => self.global_changed(cursor),
        }
    }

    /// [`Streamer::store_changed`] of a stream under a policy other than the built-in one,
    /// whose cursor in the log of every org's changes is at `from`: the peers the policy
    /// compile adds and removes, whole entries of changed peers, patches, the node itself,
    /// and the filter and user profiles when they changed. A stream's work is in proportion
    /// to the changes (and after a membership change to its row of the compile's peer
    /// bits), not to its map: rebuilding and comparing every member's whole map cost each
    /// change work in proportion to the org's size squared.
    fn global_changed(&mut self, from: u64) -> Step {
        use crate::store::{Change, NodePatch, Since};
        let s = self.s.clone();
        let (now_seq, since) = s.store.all_changes(from);
        let changes = match since {
            // Woken by a write no map shows (a node registered but not yet announced: its
            // org learns of it with its first stream, as under the built-in policy).
            Since::Changes(c) if c.is_empty() => return Step::Nothing,
            Since::Changes(c) if !s.faults.leaks_any() => c,
            // Lagged, or a test fault leaks peers: a full map replaces the client's.
            _ => {
                let Some(me) = self.current() else { return Step::End };
                return Step::Send(Box::new(self.replace(&me)));
            }
        };
        // The node is read again only when a change names it (as in `org_changed`).
        let named = changes.iter().any(|c| match &**c {
            Change::Upsert(id) | Change::Removed(id) | Change::Patch(id, _) => *id == self.node_id,
            Change::Resync => false,
        });
        let me = if named || self.me.is_none() { self.current() } else { self.me.clone() };
        let Some(me) = me else { return Step::End };
        // Read after the log: it holds at least the changes read.
        let c = s.policy.compiled(&s.store);
        let Mode::Global { cursor, compiled: last, users, filter } = &mut self.mode else { return Step::End };
        *cursor = now_seq;
        let mut upserted = BTreeSet::new();
        let mut patches: BTreeMap<u64, NodePatch> = BTreeMap::new();
        let mut profiles_changed = false;
        // Nodes whose change can move a route's primary (being there, routes, online state).
        let mut route_relevant = BTreeSet::new();
        for ch in &changes {
            match &**ch {
                Change::Upsert(id) => {
                    patches.remove(id);
                    upserted.insert(*id);
                    route_relevant.insert(*id);
                }
                Change::Removed(id) => {
                    patches.remove(id);
                    upserted.remove(id);
                    route_relevant.insert(*id);
                }
                Change::Patch(id, p) => {
                    if !upserted.contains(id) {
                        patches.entry(*id).or_default().merge(p);
                    }
                    if p.online.is_some() {
                        route_relevant.insert(*id);
                    }
                }
                // The org's profile: the compile follows user names itself.
                Change::Resync => profiles_changed = true,
            }
        }
        let recompiled = !std::sync::Arc::ptr_eq(&c, last);
        let (added, removed) = if recompiled { c.peer_changes(last, me.id) } else { (vec![], vec![]) };
        // A router's entry depends on which node is primary for each route (on every router:
        // one came, went or changed online state) and on which of its routes this node may
        // use (on the compile): when either moved, the router is sent whole.
        let is_router = |c: &crate::policy::Compiled, id: &u64| c.routers().binary_search(id).is_ok();
        let primaries_moved = route_relevant.iter().any(|id| is_router(&c, id) || is_router(last, id));
        let router_moved =
            |r: u64| primaries_moved || (recompiled && c.route_view(me.id, r) != last.route_view(me.id, r));
        let mut whole: BTreeSet<u64> = added.iter().copied().collect();
        whole.extend(upserted.iter().filter(|id| **id != me.id && c.may_talk(me.id, **id)));
        whole.extend(c.routers().iter().filter(|r| **r != me.id && c.may_talk(me.id, **r) && router_moved(**r)));
        // Users of peers that stay but moved to another user (the compile saw the move).
        for id in upserted.iter().filter(|id| recompiled && c.may_talk(me.id, **id) && last.may_talk(me.id, **id)) {
            if let (Some(was), Some(now)) = (last.user_of(*id), c.user_of(*id)) {
                if was != now {
                    count_user(users, was, -1);
                    count_user(users, now, 1);
                    profiles_changed = true;
                }
            }
        }
        for id in &added {
            profiles_changed |= c.user_of(*id).is_some_and(|u| count_user(users, u, 1));
        }
        for id in &removed {
            profiles_changed |= last.user_of(*id).is_some_and(|u| count_user(users, u, -1));
            if s.store.node(*id).is_none() {
                s.entries.remove(*id);
            }
        }
        let now = wall::now();
        let self_entry = named || (is_router(&c, &me.id) && router_moved(me.id));
        let patched: Vec<u64> = patches
            .keys()
            .filter(|id| !whole.contains(id) && **id != me.id && c.may_talk(me.id, **id))
            .copied()
            .collect();
        let mut new_filter = None;
        if recompiled {
            let f = c.filter_for(me.id);
            let print = filter_print(&f);
            if *filter != print {
                *filter = print;
                new_filter = Some(f);
            }
        }
        let profiles: Option<Vec<UserProfile>> = profiles_changed.then(|| {
            let mut ids: BTreeSet<u64> = users.keys().copied().collect();
            ids.insert(me.user_id);
            ids.into_iter().map(|u| user_profile(&s, u)).collect()
        });
        // A delta with nothing of this node (no self entry, filter or profiles) and no router
        // (whose entry depends on the viewer) is the same bytes for every stream that read
        // the same stretch of the log and names the same peers: encoded once for all.
        let shared =
            !self_entry && new_filter.is_none() && profiles.is_none() && !whole.iter().any(|id| is_router(&c, id));
        let key = DeltaKey::Global(from, now_seq, self.zstd, ids_print(&whole, &patched, &removed));
        let build = || {
            let keep = |r: &crate::policy::ipset::Prefix| c.can_access_route(me.id, r);
            let mut d = MapResponse::default();
            if self_entry {
                d.node = Some(to_tail(&s, &me, now));
            }
            let changed: Vec<Bytes> = s
                .store
                .nodes_by_id(&whole.iter().copied().collect::<Vec<_>>())
                .iter()
                .map(|n| s.entries.get(&s, n, now, &keep))
                .collect();
            if !removed.is_empty() {
                d.peers_removed = Some(removed.iter().map(|id| *id as i64).collect());
            }
            if !patched.is_empty() {
                d.peers_changed_patch = Some(patched.iter().map(|id| patch_of(*id, &patches[id])).collect());
            }
            d.packet_filter = new_filter;
            d.user_profiles = profiles.unwrap_or_default();
            crate::routes::reduce_map(&mut d, &keep);
            let out = Out { resp: d, peers: None, changed };
            (!out.is_empty()).then_some(out)
        };
        let step = if shared {
            let zstd = self.zstd;
            let built = s.deltas.get_or_build(key, || {
                let mut o = build()?;
                o.resp.control_time = Some(wall::now());
                Some((Bytes::from(encode_out(&o, zstd)), None))
            });
            built.map_or(Step::Nothing, |(f, _)| Step::Frame(f))
        } else {
            build().map_or(Step::Nothing, |o| Step::Send(Box::new(o)))
        };
        *last = c;
        step
    }

    /// [`Streamer::store_changed`] of an org stream whose cursor is at `from`. A delta naming
    /// only other members leaves this node as it was: it is read again from the store only
    /// when a change names it (joining, leaving, tags, expiry set) or a resync asks for it.
    fn org_changed(&mut self, from: u64) -> Step {
        let s = self.s.clone();
        let (now, since) = s.store.org_changes(self.user_id, from);
        let changes = match since {
            crate::store::Since::Changes(c) => Some(c),
            crate::store::Since::Lagged => None,
        };
        let mine = changes.as_ref().is_none_or(|c| !shareable(c, self.node_id));
        let me = if mine || self.me.is_none() { self.current() } else { self.me.clone() };
        let Some(me) = me else { return Step::End };
        // Only org streams come here; were it otherwise, the client reconnects.
        let Mode::Org { tmpl, cursor, tagged, filter } = &mut self.mode else { return Step::End };
        *cursor = now;
        if *tagged == me.tags.is_empty() {
            return Step::End;
        }
        if s.faults.leaks_any() {
            // A test fault leaks peers across orgs: only the global path shows them.
            return Step::Send(Box::new(self.replace(&me)));
        }
        let Some(changes) = changes else {
            return Step::Send(Box::new(self.replace(&me)));
        };
        if !*tagged && !mine {
            // Untagged members at the same stretch of the log were sent the same filters
            // before it (the org's, from the same frames or full maps): the filter they hold
            // is part of the key, so sharing never skips a filter one of them lacks.
            let key = DeltaKey::Org(self.user_id, from, now, self.zstd, *filter);
            let zstd = self.zstd;
            let built = s.deltas.get_or_build(key, || {
                let mut held = *filter;
                let mut o = org_delta(&s, tmpl, &me, &changes, &mut held)?;
                o.resp.control_time = Some(wall::now());
                Some((Bytes::from(encode_out(&o, zstd)), held))
            });
            return match built {
                Some((frame, held)) => {
                    *filter = held;
                    Step::Frame(frame)
                }
                None => Step::Nothing,
            };
        }
        org_delta(&s, tmpl, &me, &changes, filter).map_or(Step::Nothing, |o| Step::Send(Box::new(o)))
    }
}

/// Folds an org's changes into one delta for `me`: whole entries for upserted peers, removals,
/// merged patches, `me` itself when it changed, the filter when membership changed it. An
/// absent `PacketFilter` leaves the client's as it was (Tailscale's rule); `held` is the
/// fingerprint of the filter the stream holds, updated when the delta carries a new one. A
/// member's hostinfo change or rename goes without the filter; a join or a removal changes the
/// org's sources (the member addresses) and carries it.
fn org_delta(
    s: &Shared,
    tmpl: &OrgTemplate,
    me: &StoreNode,
    changes: &[std::sync::Arc<crate::store::Change>],
    held: &mut Option<u64>,
) -> Option<Out> {
    use crate::store::{Change, NodePatch};
    let mut upserted = BTreeSet::new();
    let mut removed = BTreeSet::new();
    let mut patches: BTreeMap<u64, NodePatch> = BTreeMap::new();
    let mut members_changed = false;
    let mut self_changed = false;
    let mut resync = false;
    for c in changes {
        match &**c {
            Change::Upsert(id) => {
                members_changed = true;
                removed.remove(id);
                patches.remove(id);
                upserted.insert(*id);
            }
            Change::Removed(id) => {
                members_changed = true;
                upserted.remove(id);
                patches.remove(id);
                removed.insert(*id);
            }
            Change::Patch(id, p) => {
                if !upserted.contains(id) && !removed.contains(id) {
                    patches.entry(*id).or_default().merge(p);
                }
            }
            Change::Resync => resync = true,
        }
    }
    let now = wall::now();
    let keep = crate::routes::org_route_check(s, me);
    let mut d = MapResponse::default();
    if resync {
        d.user_profiles = vec![user_profile(s, me.user_id)];
        d.domain.clone_from(&s.cfg.base_domain);
    }
    if upserted.remove(&me.id) | patches.remove(&me.id).is_some() | removed.remove(&me.id) {
        self_changed = true;
    }
    if self_changed {
        d.node = Some(to_tail(s, me, now));
    }
    let mut changed = vec![];
    for id in upserted {
        match s.store.node(id) {
            Some(n) if OrgTemplate::visible(me, &n) => changed.push(s.entries.get(s, &n, now, &keep)),
            _ => {
                removed.insert(id);
            }
        }
    }
    for id in &removed {
        if s.store.node(*id).is_none() {
            s.entries.remove(*id);
        }
    }
    let patched: Vec<tailcfg::PeerChange> = patches
        .iter()
        .filter(|(id, _)| s.store.node(**id).is_some_and(|n| OrgTemplate::visible(me, &n)))
        .map(|(id, p)| patch_of(*id, p))
        .collect();
    if !removed.is_empty() {
        d.peers_removed = Some(removed.into_iter().map(|id| id as i64).collect());
    }
    if !patched.is_empty() {
        d.peers_changed_patch = Some(patched);
    }
    crate::routes::reduce_map(&mut d, &keep);
    // A tagged node's filter is empty for as long as its stream lives (tagging ends it).
    if (members_changed || resync) && me.tags.is_empty() {
        let f = tmpl.filter(me, &s.store.org_member_sources(me.user_id));
        let print = filter_print(&f);
        if resync || *held != Some(print) {
            *held = Some(print);
            d.packet_filter = Some(f);
        }
    }
    let out = Out { resp: d, peers: None, changed };
    (!out.is_empty()).then_some(out)
}

async fn map(
    State(s): State<Shared>,
    Extension(sess): Extension<Session>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _ = headers;
    let req: MapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    let Some(node) = s.store.node_by_keys(&sess.machine, &req.node_key) else {
        return (StatusCode::UNAUTHORIZED, "node not registered").into_response();
    };
    if node.is_expired(wall::now()) {
        return (StatusCode::UNAUTHORIZED, "node key expired").into_response();
    }
    let ep = req.endpoints.clone();
    let disco = req.disco_key;
    if hostinfo_too_large(req.hostinfo.as_ref()) {
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("Hostinfo larger than {MAX_HOSTINFO} bytes refused"))
            .into_response();
    }
    let hi = req.hostinfo.clone();
    let mut routes_changed = false;
    // A stream's session opens with the update, in one change (see `update_node_and_open`);
    // from here to `MapBody::open`, which owns it, nothing returns early.
    let update = |n: &mut StoreNode| {
        let mut changed = false;
        if !req.read_only {
            if !disco.is_zero() && n.disco_key != disco {
                n.disco_key = disco;
                changed = true;
            }
            if n.endpoints != ep && !(ep.is_empty() && req.stream && !req.omit_peers && n.endpoints.is_empty()) {
                n.endpoints = ep.clone();
                changed = true;
            }
            if let Some(h) = &hi {
                let region = h.rest.get("NetInfo").and_then(|ni| ni.get("PreferredDERP")?.as_i64()).unwrap_or(0) as i32;
                if region != 0 && n.home_derp != region {
                    n.home_derp = region;
                    changed = true;
                }
                if *h != n.hostinfo {
                    routes_changed = crate::routes::advertised(h) != crate::routes::advertised(&n.hostinfo);
                    n.hostinfo = h.clone();
                    changed = true;
                }
            }
        }
        changed
    };
    let updated =
        if req.stream { s.store.update_node_and_open(node.id, update) } else { s.store.update_node(node.id, update) };
    let node = match updated {
        Ok(n) => n,
        Err(_) => return (StatusCode::UNAUTHORIZED, "node not registered").into_response(),
    };
    // Approval depends on the advertised routes and the policy only; a policy change
    // approves for every node itself.
    let node = if routes_changed { crate::routes::auto_approve(&s, node.id).unwrap_or(node) } else { node };
    let zstd = req.compress == "zstd";
    if !req.stream && req.omit_peers {
        // A "lite" update: endpoints/hostinfo only.
        return StatusCode::OK.into_response();
    }
    if !req.stream {
        return Response::new(Body::from(encode_map_frame(&s.faults.with_leaks(&s, &node, build_map), zstd)));
    }
    let body = MapBody::open(s, &node, zstd);
    let frames = futures_util::stream::unfold(body, |mut b| async move {
        let frame = b.next_frame().await?;
        Some((Ok::<Bytes, Infallible>(frame), b))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(frames))
        .expect("static response")
}

type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = (tokio::sync::watch::Receiver<u64>, bool)> + Send>>;

/// A map stream's body. The stream's loop runs inside the HTTP/2 stream's own task as the body
/// is read, with no task and channel of its own: with thousands of streams in an org, that
/// second wake per delta and stream cost more than the delta. Dropping it (the client went
/// away, or the stream ended) marks the node offline.
struct MapBody {
    st: Streamer,
    next: Option<Step>,
    zstd: bool,
    // Kept across wakes: re-arming it on every delta (registering with the notifier every
    // stream of the org shares) cost more than the delta itself.
    org_wait: Wait,
    any_changed: tokio::sync::watch::Receiver<u64>,
    rare: WokenOnly<Rare>,
    armed_expiry: Option<Option<chrono::DateTime<Utc>>>,
}

/// What wakes a map stream besides its org's changes, polled only after one of them woke it
/// (see [`WokenOnly`]).
struct Rare {
    policy_wait: Wait,
    dropped: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    expiry_sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    ticker: tokio::time::Interval,
}

enum RareEvent {
    Policy(tokio::sync::watch::Receiver<u64>, bool),
    Dropped,
    Expiry,
    Tick,
}

impl Rare {
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<RareEvent> {
        use std::future::Future;
        use std::task::Poll;
        Poll::Ready(if let Poll::Ready((rx, ok)) = self.policy_wait.as_mut().poll(cx) {
            RareEvent::Policy(rx, ok)
        } else if self.dropped.as_mut().poll(cx).is_ready() {
            RareEvent::Dropped
        } else if self.expiry_sleep.as_mut().poll(cx).is_ready() {
            RareEvent::Expiry
        } else if self.ticker.poll_tick(cx).is_ready() {
            RareEvent::Tick
        } else {
            return Poll::Pending;
        })
    }
}

impl MapBody {
    /// Queues the node's first (full) map. Its session was opened with the map request's
    /// update ([`crate::store::Store::update_node_and_open`]); dropping the body closes it.
    fn open(s: Shared, node: &StoreNode, zstd: bool) -> MapBody {
        // Watch the org (and the rest) first, so no change between the first map and the
        // loop is missed.
        let org_changed = s.store.subscribe(node.user_id);
        let any_changed = s.store.subscribe_all();
        let policy_changed = s.policy.subscribe();
        let dropped = Box::pin(s.faults.streams_dropped());
        let (st, first) = Streamer::start(&s, node, zstd);
        let keepalive = s.cfg.keepalive;
        let rare = WokenOnly::new(Rare {
            policy_wait: Box::pin(next_change(policy_changed)),
            dropped,
            expiry_sleep: Box::pin(tokio::time::sleep(Duration::from_secs(365 * 86400))),
            ticker: tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive),
        });
        MapBody {
            st,
            next: Some(Step::Send(Box::new(first))),
            zstd,
            org_wait: Box::pin(next_change(org_changed)),
            any_changed,
            rare,
            armed_expiry: None,
        }
    }

    /// The next message to send, `None` when the stream ends.
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            let frame = match self.next.take() {
                Some(Step::Send(mut out)) => {
                    out.resp.control_time = Some(wall::now());
                    Some(Bytes::from(out.encode(self.zstd, &self.st.s)))
                }
                Some(Step::Frame(f)) => Some(f),
                _ => None,
            };
            if let Some(frame) = frame {
                let m = &self.st.s.metrics;
                m.map_sends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                m.map_bytes.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
                return Some(frame);
            }
            // Every change to the node is in its org's log and wakes the stream, which reads the
            // node again; its expiry wakes the stream too (below).
            let expiry = self.st.me.as_ref()?.expiry;
            if self.armed_expiry != Some(expiry) || self.rare.get_mut().expiry_sleep.is_elapsed() {
                let until_expiry =
                    expiry.and_then(|e| (e - wall::now()).to_std().ok()).unwrap_or(Duration::from_secs(365 * 86400));
                self.rare.get_mut().expiry_sleep.as_mut().reset(tokio::time::Instant::now() + until_expiry);
                self.armed_expiry = Some(expiry);
                self.rare.rearmed();
            }
            let global = matches!(self.st.mode, Mode::Global { .. });
            // Biased, the org's wait first: a delta wakes the stream without looking at the
            // rarer waits.
            let rare = &mut self.rare;
            let step = tokio::select! {
                biased;
                (rx, ok) = &mut self.org_wait, if !global => {
                    self.org_wait = Box::pin(next_change(rx));
                    if ok { self.st.store_changed() } else { Step::End }
                }
                r = self.any_changed.changed(), if global => match r { Ok(()) => self.st.store_changed(), Err(_) => Step::End },
                ev = std::future::poll_fn(|cx| rare.poll_with(cx, Rare::poll_next)) => match ev {
                    RareEvent::Policy(rx, ok) => {
                        self.rare.get_mut().policy_wait = Box::pin(next_change(rx));
                        if ok { self.st.policy_changed() } else { Step::End }
                    }
                    RareEvent::Dropped => Step::End,
                    RareEvent::Expiry => if self.st.current().is_some() { Step::Nothing } else { Step::End },
                    RareEvent::Tick => {
                        self.st.s.metrics.keepalives.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let ka = MapResponse { keep_alive: true, ..Default::default() };
                        return Some(Bytes::from(encode_map_frame(&ka, self.zstd)));
                    }
                },
            };
            match step {
                Step::Send(_) | Step::Frame(_) => self.next = Some(step),
                Step::Nothing => {}
                Step::End => return None,
            }
        }
    }
}

impl Drop for MapBody {
    fn drop(&mut self) {
        let s = &self.st.s;
        s.store.session(self.st.node_id, false);
        // A server shutting down drops its streams outside the runtime: nothing to schedule.
        if tokio::runtime::Handle::try_current().is_ok() {
            s.schedule_ephemeral_cleanup(self.st.node_id);
        }
    }
}

/// Waits for the next change on `rx` (false when its sender is gone) and hands `rx` back, so
/// the wait can be kept across other wakes and re-armed only once it fired.
async fn next_change(mut rx: tokio::sync::watch::Receiver<u64>) -> (tokio::sync::watch::Receiver<u64>, bool) {
    let ok = rx.changed().await.is_ok();
    (rx, ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Change;
    use citadel_proto::keys::{MachinePublic, NodePublic};
    use citadel_proto::tailcfg::Hostinfo;

    #[test]
    fn org_destinations_cover_the_org_inside_the_tailnet_range() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(org_destinations(v(&["100.64.0.1/32", "100.64.0.2/31", "100.64.0.9/32"])), v(&["100.64.0.0/28"]));
        assert_eq!(org_destinations(v(&["100.64.0.1/32"])), v(&["100.64.0.1/32"]));
        assert_eq!(org_destinations(v(&["100.64.0.1/32", "100.127.255.255/32"])), v(&["100.64.0.0/10"]));
        // A cover leaving the tailnet range: the exact list.
        let out = v(&["100.64.0.1/32", "100.128.0.1/32"]);
        assert_eq!(org_destinations(out.clone()), out);
        let other = v(&["10.0.0.1/32", "10.0.0.2/32"]);
        assert_eq!(org_destinations(other.clone()), other);
        assert_eq!(
            org_destinations(v(&["fd7a:115c:a1e0::1/128", "fd7a:115c:a1e0::2/128"])),
            v(&["fd7a:115c:a1e0::/126"])
        );
        assert_eq!(org_destinations(vec![]), Vec::<String>::new());
    }

    /// True when `rules` let a new flow of `proto` from `src` in to `dst` (the client's check
    /// after it has dropped packets to addresses not its own; every port).
    fn admits(rules: &[tailcfg::FilterRule], src: std::net::IpAddr, dst: std::net::IpAddr, proto: i32) -> bool {
        use crate::policy::ipset::IpSet;
        let set = |list: &mut dyn Iterator<Item = &String>| {
            let mut set = IpSet::default();
            for p in list {
                match crate::policy::ipset::parse_ip_set(p) {
                    Some(p) => set.add_set(&p),
                    None => panic!("unparsable filter address {p}"),
                }
            }
            set
        };
        rules.iter().any(|r| {
            let protos_ok =
                if r.ip_proto.is_empty() { [1, 6, 17, 58].contains(&proto) } else { r.ip_proto.contains(&proto) };
            protos_ok
                && set(&mut r.src_ips.iter()).contains(src)
                && r.dst_ports.iter().any(|d| {
                    d.ports.first == 0 && d.ports.last == 65535 && set(&mut std::iter::once(&d.ip)).contains(dst)
                })
        })
    }

    /// The message a step sends, as one map response.
    fn sent(step: Step) -> Option<MapResponse> {
        match step {
            Step::Send(o) => Some(o.response()),
            Step::Frame(f) => {
                let mut m: MapResponse = serde_json::from_slice(&f[4..]).unwrap();
                m.control_time = None;
                Some(m)
            }
            _ => None,
        }
    }

    fn shared() -> Shared {
        crate::build(crate::Config { derp: crate::DerpMode::Off, stun_listen: None, ..Default::default() }).unwrap()
    }

    fn reg(s: &Shared, k: u32, user: u64, tags: Vec<String>) -> StoreNode {
        let mut key = [9u8; 32];
        key[..4].copy_from_slice(&k.to_le_bytes());
        let hi = Hostinfo { hostname: format!("h{k}"), ..Default::default() };
        s.store
            .register(
                MachinePublic(key),
                NodePublic(key),
                user,
                hi,
                false,
                tags,
                None,
                "authkey",
                s.cfg.ipv4_base,
                s.cfg.ipv6_base,
            )
            .unwrap()
    }

    /// The org fast path builds exactly the map the full policy compile builds, for tagged
    /// and untagged nodes of several orgs with interleaved addresses.
    #[test]
    fn org_maps_equal_the_compiled_policy_maps() {
        let s = shared();
        let users: Vec<u64> = (0..3).map(|i| s.store.create_user(&format!("org{i}"), "").unwrap().id).collect();
        let mut rng = 0x2545f4914f6cdd1du64;
        for k in 0..40u32 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let tags = if rng % 5 == 0 { vec!["tag:server".to_string()] } else { vec![] };
            reg(&s, k, users[(rng % 3) as usize], tags);
        }
        let t = OrgTemplate::current(&s).expect("built-in policy takes the org path");
        let mut seen_peers = 0;
        for n in s.store.nodes(None) {
            let fast = t.build_map(&s, &n);
            let full = build_map_compiled(&s, &n);
            assert_eq!(fast.node, full.node, "node {}", n.id);
            assert_eq!(fast.peers, full.peers, "peers of node {}", n.id);
            let addrs = |n: &StoreNode| [std::net::IpAddr::from(n.ipv4), std::net::IpAddr::from(n.ipv6)];
            let (ff, cf) = (fast.packet_filter.clone().unwrap(), full.packet_filter.clone().unwrap());
            assert_eq!(ff.is_empty(), cf.is_empty(), "filter of node {}", n.id);
            for src in s.store.nodes(None) {
                for (sip, dip) in addrs(&src).into_iter().zip(addrs(&n)).chain([(addrs(&src)[0], addrs(&n)[1])]) {
                    for proto in [1, 6, 17, 58] {
                        assert_eq!(
                            admits(&ff, sip, dip, proto),
                            admits(&cf, sip, dip, proto),
                            "{sip} -> {dip} proto {proto} at node {}: {ff:?} vs {cf:?}",
                            n.id
                        );
                    }
                }
            }
            if n.tags.is_empty() {
                let same_org = s.store.org_member_sources(n.user_id);
                assert_eq!(ff[0].src_ips, *same_org);
            }
            assert_eq!(fast.user_profiles, full.user_profiles, "profiles of node {}", n.id);
            seen_peers += fast.peers.as_ref().map_or(0, Vec::len);
        }
        let compiled = s.policy.compiled(&s.store);
        for a in s.store.nodes(None) {
            for b in s.store.nodes(None) {
                assert_eq!(may_talk(&s, a.id, b.id), compiled.may_talk(a.id, b.id), "{} {}", a.id, b.id);
            }
        }
        assert!(seen_peers > 0);
        // Any other policy takes the compiled path.
        s.policy.set(crate::policy::HEADSCALE_DEFAULT).unwrap();
        assert!(OrgTemplate::current(&s).is_none());
    }

    /// Untagged members reading the same stretch of their org's log get one shared frame for
    /// another member's join or endpoint change (the filter is the org's); a tagged member
    /// and the changed member itself get their own delta, the same as before sharing.
    #[test]
    fn org_deltas_are_shared_frames_only_where_identical() {
        let s = shared();
        let org = s.store.create_user("a", "").unwrap().id;
        let a1 = reg(&s, 1, org, vec![]);
        let a2 = reg(&s, 2, org, vec![]);
        let t = reg(&s, 3, org, vec!["tag:srv".into()]);
        let mover = reg(&s, 4, org, vec![]);
        let mut streams: Vec<Streamer> =
            [&a1, &a2, &t, &mover].iter().map(|n| Streamer::start(&s, n, true).0).collect();

        // A join: one frame for every untagged member, carrying the new entry and the filter
        // naming the new member; the tagged member, which sees nobody, gets neither.
        let joined = reg(&s, 5, org, vec![]);
        let joins: Vec<Step> = streams.iter_mut().map(|st| st.store_changed()).collect();
        let frames: Vec<&Bytes> =
            joins.iter().filter_map(|j| if let Step::Frame(f) = j { Some(f) } else { None }).collect();
        assert_eq!(frames.len(), 3, "every untagged member gets the shared join frame");
        assert!(frames.iter().all(|f| f.as_ptr() == frames[0].as_ptr()), "the join frame was encoded twice");
        let Step::Send(tagged) = &joins[2] else { panic!("the tagged member got a shared frame") };
        let tagged = tagged.response();
        assert!(tagged.packet_filter.is_none() && tagged.peers_changed.is_none(), "{tagged:?}");
        let body = zstd::bulk::decompress(&frames[0][4..], 1 << 20).unwrap();
        let d: MapResponse = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            d.peers_changed.as_ref().map(|p| p.iter().map(|n| n.id).collect::<Vec<_>>()),
            Some(vec![joined.id as i64])
        );
        let f = d.packet_filter.expect("the join frame carries the filter");
        for n in [&a1, &a2, &mover] {
            assert!(admits(&f, joined.ipv4.into(), n.ipv4.into(), 6), "{f:?}");
        }
        assert!(!admits(&f, t.ipv4.into(), a1.ipv4.into(), 6), "the tagged node is let in: {f:?}");
        // Each member's full map, built now, holds the same filter the frame sent.
        for n in [&a1, &a2, &mover] {
            assert_eq!(Streamer::start(&s, n, false).1.response().packet_filter.as_ref(), Some(&f));
        }

        s.store
            .update_node(mover.id, |n| {
                n.endpoints = vec!["127.0.0.1:41641".into()];
                true
            })
            .unwrap();
        let steps: Vec<Step> = streams.iter_mut().map(|st| st.store_changed()).collect();
        let [one, two, tagged, own] = <[Step; 4]>::try_from(steps).ok().unwrap();
        let (Step::Frame(f1), Step::Frame(f2)) = (&one, &two) else { panic!("untagged members got no shared frame") };
        assert_eq!(f1, f2);
        assert_eq!(f1.as_ptr(), f2.as_ptr(), "the frame was encoded twice");
        let body = zstd::bulk::decompress(&f1[4..], 1 << 20).unwrap();
        let d: MapResponse = serde_json::from_slice(&body).unwrap();
        let p = d.peers_changed_patch.expect("patch");
        assert_eq!((p.len(), p[0].node_id), (1, mover.id as i64));
        assert_eq!(p[0].endpoints.as_deref(), Some(&["127.0.0.1:41641".to_string()][..]));
        assert!(d.packet_filter.is_none() && d.node.is_none() && d.control_time.is_some());
        // The tagged member sees no untagged peer: nothing to send, and nothing shared.
        assert!(matches!(tagged, Step::Nothing));
        // The changed member's own delta carries its node: its own, not the shared frame.
        let Step::Send(o) = own else { panic!("the changed member got a shared frame") };
        assert!(o.response().node.is_some_and(|n| n.id == mover.id as i64));
    }

    /// A delta carries the packet filter only when it differs from the one the stream was
    /// last sent: a member's hostinfo change leaves the org's filter as it was, a join
    /// changes it. Shared and own deltas alike, and a stream that missed a filter gets it.
    #[test]
    fn deltas_carry_the_filter_only_when_it_changed() {
        let s = shared();
        let org = s.store.create_user("a", "").unwrap().id;
        let a1 = reg(&s, 1, org, vec![]);
        let a2 = reg(&s, 2, org, vec![]);
        let mut streams: Vec<Streamer> = [&a1, &a2].iter().map(|n| Streamer::start(&s, n, false).0).collect();
        let rename = |id: u64, name: &str| {
            let name = name.to_string();
            s.store
                .update_node(id, |n| {
                    n.hostinfo.hostname = name;
                    true
                })
                .unwrap()
        };

        // Another member's hostinfo: its entry, no filter (for the shared and the own delta).
        rename(a2.id, "renamed");
        let d = sent(streams[0].store_changed()).expect("a delta");
        assert!(d.peers_changed.is_some() && d.packet_filter.is_none(), "{d:?}");
        let own = sent(streams[1].store_changed()).expect("a delta");
        assert!(own.node.is_some() && own.packet_filter.is_none(), "{own:?}");

        // A join changes the filter: both get it, and it admits the new member.
        let joined = reg(&s, 3, org, vec![]);
        for st in &mut streams {
            let d = sent(st.store_changed()).expect("a delta");
            let f = d.packet_filter.expect("the join's delta carries the filter");
            assert!(admits(&f, joined.ipv4.into(), a1.ipv4.into(), 6), "{f:?}");
        }
        // Hostinfo again: no filter.
        rename(a1.id, "again");
        assert!(sent(streams[1].store_changed()).expect("a delta").packet_filter.is_none());

        // A stream that was sent none (as after a full map without one) gets it with the next
        // membership change, even one that leaves the org's filter as it was.
        if let Mode::Org { filter, .. } = &mut streams[1].mode {
            *filter = None;
        }
        rename(joined.id, "third");
        let d = sent(streams[1].store_changed()).expect("a delta");
        assert!(d.packet_filter.is_some(), "{d:?}");
        let d = sent(streams[0].store_changed()).expect("a delta");
        assert!(d.packet_filter.is_none(), "{d:?}");
    }

    /// A small message (a patch, one joining peer) goes as a stored zstd frame; a larger one
    /// compression shrinks goes compressed; citadel's client reads both.
    #[test]
    fn small_map_messages_go_stored_and_large_ones_compressed() {
        let patch = MapResponse {
            peers_changed_patch: Some(vec![tailcfg::PeerChange {
                node_id: 7,
                endpoints: Some(vec!["192.0.2.7:41641".into()]),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let full = MapResponse {
            peers: Some(
                (0..50).map(|i| tailcfg::Node { id: i, name: format!("n{i}.x."), ..Default::default() }).collect(),
            ),
            ..Default::default()
        };
        let join = MapResponse {
            peers_changed: Some(vec![tailcfg::Node {
                id: 9,
                name: "joiner.org.nexus.sim.".into(),
                addresses: vec!["100.64.0.9/32".into(), "fd7a:115c:a1e0::9/128".into()],
                allowed_ips: vec!["100.64.0.9/32".into(), "fd7a:115c:a1e0::9/128".into()],
                ..Default::default()
            }]),
            ..Default::default()
        };
        for (m, stored) in [(&patch, true), (&join, true), (&full, false)] {
            let mut frame = encode_map_frame(m, true);
            let json = serde_json::to_vec(m).unwrap();
            assert_eq!(frame[8..].ends_with(&json), stored, "{} bytes", json.len());
            let back = citadel_proto::tailcfg::decode_map_frame(&mut frame, true).unwrap();
            assert_eq!(back.as_ref(), Some(m));
            assert!(frame.is_empty());
        }
    }

    /// A map stream's rarer wakes each still reach it while its org's deltas keep coming:
    /// keep-alives on time, a policy change (a replacing map), its key's expiry (the stream
    /// ends) and the streams-dropped fault.
    #[tokio::test]
    async fn map_streams_wake_for_keepalives_policy_expiry_and_dropped_streams() {
        let s = crate::build(crate::Config {
            derp: crate::DerpMode::Off,
            stun_listen: None,
            keepalive: Duration::from_millis(150),
            ..Default::default()
        })
        .unwrap();
        let org = s.store.create_user("a", "").unwrap().id;
        let me = reg(&s, 1, org, vec![]);
        let _other = reg(&s, 2, org, vec![]);
        async fn next(b: &mut MapBody) -> Option<MapResponse> {
            let f = tokio::time::timeout(Duration::from_secs(5), b.next_frame()).await;
            let f = f.expect("the stream woke within 5 s")?;
            Some(citadel_proto::tailcfg::decode_map_frame(&mut f.to_vec(), false).unwrap().unwrap())
        }
        let mut b = MapBody::open(s.clone(), &me, false);
        assert!(next(&mut b).await.expect("first map").peers.is_some());

        // Keep-alives, with org deltas waking the stream in between: the one due at 150 ms is
        // sent when the stream next looks, the next one on time at 300 ms.
        let t0 = tokio::time::Instant::now();
        for k in 10..14 {
            reg(&s, k, org, vec![]);
            let m = next(&mut b).await.expect("open");
            assert!(!m.keep_alive && m.peers_changed.is_some(), "{m:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(next(&mut b).await.expect("open").keep_alive);
        assert!(next(&mut b).await.expect("open").keep_alive);
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "two keep-alives in {took:?}");

        // A policy change: a map that replaces the peer list.
        s.policy.set(r#"{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}"#).unwrap();
        loop {
            let m = next(&mut b).await.expect("open");
            if m.peers.is_some() {
                break;
            }
            assert!(m.keep_alive, "{m:?}");
        }

        // The node's key expiry is set, then passes: the stream ends by itself.
        let at = Utc::now() + chrono::Duration::milliseconds(400);
        s.store
            .update_node(me.id, |n| {
                n.expiry = Some(at);
                true
            })
            .unwrap();
        let t0 = tokio::time::Instant::now();
        while next(&mut b).await.is_some() {}
        assert!(Utc::now() >= at && t0.elapsed() < Duration::from_secs(3), "ended {:?} after", t0.elapsed());

        // The streams-dropped fault ends an open stream.
        let you = reg(&s, 99, org, vec![]);
        let mut b = MapBody::open(s.clone(), &you, false);
        assert!(next(&mut b).await.is_some());
        s.faults.drop_streams();
        while next(&mut b).await.is_some() {}
    }

    /// A node registered with an auth key reaches its org's log only with its first map
    /// stream, or when the grace runs out if it never opens one (as a node that registers and
    /// goes away): then its members hold it as an offline peer.
    #[tokio::test]
    async fn a_registered_node_that_never_streams_reaches_its_org_after_the_grace() {
        use crate::store::{Change, Since};
        let s = shared();
        let u = s.store.create_user("acme", "").unwrap();
        let key = s.store.create_key(u.id, true, false, None, vec![]).unwrap().key;
        let (seq, _) = s.store.org_changes(u.id, 0);
        let req = RegisterRequest {
            version: tailcfg::CAPABILITY_VERSION,
            node_key: NodePublic([5; 32]),
            auth: Some(tailcfg::RegisterAuth { auth_key: key, ..Default::default() }),
            ..Default::default()
        };
        let sess = Session { machine: MachinePublic([5; 32]), version: tailcfg::CAPABILITY_VERSION };
        let r = handle_register(&s, sess, req).await;
        assert!(r.machine_authorized && r.error.is_empty(), "{r:?}");
        let id = s.store.nodes(Some(u.id))[0].id;
        tokio::time::sleep(ANNOUNCE_GRACE / 2).await;
        assert_eq!(s.store.org_changes(u.id, seq).0, seq, "told before its stream or grace");
        // Real time: the grace, then some slack for a loaded machine.
        let deadline = tokio::time::Instant::now() + 4 * ANNOUNCE_GRACE;
        while s.store.org_changes(u.id, seq).0 == seq && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (_, Since::Changes(c)) = s.store.org_changes(u.id, seq) else { panic!("lagged") };
        assert!(c.len() == 1 && matches!(&*c[0], Change::Upsert(n) if *n == id), "{c:?}");
        assert!(!s.store.is_online(id));
    }

    #[test]
    fn org_streams_get_deltas_and_only_for_their_org() {
        let s = shared();
        let a_org = s.store.create_user("a", "").unwrap().id;
        let b_org = s.store.create_user("b", "").unwrap().id;
        let a1 = reg(&s, 1, a_org, vec![]);
        let (mut st, first) = Streamer::start(&s, &a1, false);
        let first = first.response();
        assert_eq!(first.peers, Some(vec![]));
        assert!(matches!(st.store_changed(), Step::Nothing));

        let b_seq = *s.store.subscribe(b_org).borrow();
        let a2 = reg(&s, 2, a_org, vec![]);
        let Some(d) = sent(st.store_changed()) else { panic!("no delta for a join") };
        assert_eq!(d.peers_changed.as_ref().map(|p| p[0].id), Some(a2.id as i64));
        assert!(d.peers.is_none() && d.peers_removed.is_none());
        let f = d.packet_filter.expect("the filter names the new member");
        assert!(admits(&f, a2.ipv4.into(), a1.ipv4.into(), 6), "{f:?}");
        // Consecutive members are one range per family, however many they are.
        assert_eq!(f[0].src_ips.len(), 2, "{f:?}");
        assert_eq!(*s.store.subscribe(b_org).borrow(), b_seq, "another org's join woke org b");

        // Another org's node: no message.
        reg(&s, 3, b_org, vec![]);
        assert!(matches!(st.store_changed(), Step::Nothing));

        // Endpoints, DERP home and online state: a patch, no filter.
        s.store
            .update_node(a2.id, |n| {
                n.endpoints = vec!["127.0.0.1:41641".into()];
                n.home_derp = 2;
                true
            })
            .unwrap();
        s.store.session(a2.id, true);
        let Some(d) = sent(st.store_changed()) else { panic!("no delta for a patch") };
        let p = d.peers_changed_patch.expect("patch");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].endpoints.as_deref(), Some(&["127.0.0.1:41641".to_string()][..]));
        assert_eq!((p[0].derp_region, p[0].online), (Some(2), Some(true)));
        assert!(d.peers_changed.is_none() && d.packet_filter.is_none() && d.node.is_none());

        // Tagging a peer removes it (the built-in policy shows tagged nodes to nobody).
        s.store
            .update_node(a2.id, |n| {
                n.tags = vec!["tag:x".into()];
                true
            })
            .unwrap();
        let Some(d) = sent(st.store_changed()) else { panic!("no delta for a tag") };
        assert_eq!(d.peers_removed, Some(vec![a2.id as i64]));
        s.store.delete_node(a2.id).unwrap();
        let Some(d) = sent(st.store_changed()) else { panic!("no delta for a delete") };
        assert_eq!(d.peers_removed, Some(vec![a2.id as i64]));

        // A stream that fell behind the log gets a full map.
        for _ in 0..crate::store::ORG_LOG_LEN + 1 {
            s.store.notify(a_org);
        }
        let Some(d) = sent(st.store_changed()) else { panic!("no resync") };
        assert!(d.node.is_some() && d.packet_filter.is_some(), "{d:?}");
        // The deleted peer whose removal it may have missed is named; no other org's node is.
        assert_eq!(d.peers_removed, Some(vec![a2.id as i64]), "{d:?}");

        // Its own deletion ends the stream.
        s.store.delete_node(a1.id).unwrap();
        assert!(matches!(st.store_changed(), Step::End));
    }

    /// Cached map entries follow the node: a changed record, its online state and its key
    /// expiring each show in the next full map, and a deleted node's entry is dropped.
    #[test]
    fn cached_entries_follow_node_changes() {
        let s = shared();
        let org = s.store.create_user("a", "").unwrap().id;
        let a1 = reg(&s, 1, org, vec![]);
        let a2 = reg(&s, 2, org, vec![]);
        let peer = |s: &Shared| {
            let (_, m) = Streamer::start(s, &s.store.node(a1.id).unwrap(), false);
            m.response().peers.unwrap().into_iter().find(|p| p.id == a2.id as i64).unwrap()
        };
        let first = peer(&s);
        assert_eq!(peer(&s), first, "same record, same entry");
        assert!(s.entries.entries.lock().contains_key(&a2.id));
        s.store
            .update_node(a2.id, |n| {
                n.hostinfo.hostname = "renamed".into();
                n.endpoints = vec!["127.0.0.1:9".into()];
                true
            })
            .unwrap();
        let p = peer(&s);
        assert_eq!((p.hostinfo.hostname.as_str(), p.endpoints.clone()), ("renamed", vec!["127.0.0.1:9".to_string()]));
        assert_eq!(p.online, Some(false));
        s.store.session(a2.id, true);
        assert_eq!(peer(&s).online, Some(true));
        s.store
            .update_node(a2.id, |n| {
                n.expiry = Some(Utc::now() + chrono::Duration::milliseconds(300));
                true
            })
            .unwrap();
        assert!(!peer(&s).expired);
        std::thread::sleep(Duration::from_millis(400));
        assert!(peer(&s).expired, "the entry shows the key expired without a store change");
        // A deletion seen by a stream drops the entry.
        let (mut st, _) = Streamer::start(&s, &a1, false);
        s.store.delete_node(a2.id).unwrap();
        let Some(d) = sent(st.store_changed()) else { panic!("no delta for a delete") };
        assert_eq!(d.peers_removed, Some(vec![a2.id as i64]));
        assert!(!s.entries.entries.lock().contains_key(&a2.id));
    }

    /// A key expiring by the clock (no store change) reaches the streams of its peers when the
    /// server announces it, under the built-in policy and under an ACL policy alike, once; the
    /// next expiry is reported.
    #[test]
    fn an_expiry_passing_reaches_peer_streams_when_announced() {
        for acl in [false, true] {
            let s = shared();
            if acl {
                s.policy.set(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#).unwrap();
            }
            let org = s.store.create_user("a", "").unwrap().id;
            let a1 = reg(&s, 1, org, vec![]);
            let a2 = reg(&s, 2, org, vec![]);
            let (mut st, _) = Streamer::start(&s, &a1, false);
            let t0 = Utc::now();
            let soon = t0 + chrono::Duration::milliseconds(200);
            s.store.update_node(a2.id, |n| n.expiry.replace(soon) != Some(soon)).unwrap();
            let d = sent(st.store_changed()).expect("the expiry set");
            assert!(!d.peers_changed.unwrap()[0].expired);
            // Nothing due yet: nothing told, the next expiry named.
            assert_eq!(s.store.announce_expired(t0, t0), Some(soon), "acl {acl}");
            assert!(matches!(st.store_changed(), Step::Nothing), "acl {acl}");
            std::thread::sleep(Duration::from_millis(250));
            let now = Utc::now();
            assert_eq!(s.store.announce_expired(t0, now), None);
            let d = sent(st.store_changed()).unwrap_or_else(|| panic!("acl {acl}: the expiry was not told"));
            let p = &d.peers_changed.unwrap()[0];
            assert_eq!((p.id, p.expired), (a2.id as i64, true), "acl {acl}");
            // Told once: the same window again is empty.
            assert_eq!(s.store.announce_expired(now, Utc::now()), None);
            assert!(matches!(st.store_changed(), Step::Nothing), "acl {acl}");
        }
    }

    /// The spliced JSON of a message with cached entries is the JSON of the same message
    /// built whole.
    #[test]
    fn spliced_messages_equal_whole_ones() {
        let s = shared();
        let org = s.store.create_user("a", "").unwrap().id;
        let nodes: Vec<StoreNode> = (1..=3).map(|k| reg(&s, k, org, vec![])).collect();
        let (_, out) = Streamer::start(&s, &nodes[0], false);
        let whole = out.response();
        assert_eq!(whole.peers.as_ref().map(Vec::len), Some(2));
        let a: serde_json::Value = serde_json::from_slice(&out.to_json()).unwrap();
        let b = serde_json::to_value(&whole).unwrap();
        assert_eq!(a, b);
        // Nothing but entries, and no entries at all.
        let only = Out { resp: MapResponse::default(), peers: None, changed: out.peers.clone().unwrap() };
        assert_eq!(only.response().peers_changed, whole.peers);
        assert_eq!(Out::default().to_json(), b"{}");
    }

    #[test]
    fn a_lagging_cursor_is_reported_and_logs_are_bounded() {
        let s = shared();
        let org = s.store.create_user("a", "").unwrap().id;
        let n = reg(&s, 1, org, vec![]);
        let (c0, _) = s.store.org_changes(org, 0);
        s.store.delete_node(n.id).unwrap();
        let (c1, since) = s.store.org_changes(org, c0);
        assert_eq!(c1, c0 + 1);
        assert!(matches!(since, crate::store::Since::Changes(c) if *c[0] == Change::Removed(n.id)));
        for _ in 0..crate::store::ORG_LOG_LEN {
            s.store.notify(org);
        }
        assert!(matches!(s.store.org_changes(org, c0).1, crate::store::Since::Lagged));
        assert!(
            matches!(s.store.org_changes(org, c1).1, crate::store::Since::Changes(c) if c.len() == crate::store::ORG_LOG_LEN)
        );
    }

    /// A policy that leaves a node no peers replaces its map by removing the peers it may
    /// know (its org's other members), and names no node of another org.
    #[test]
    fn an_empty_replacing_map_removes_only_org_members() {
        let s = shared();
        let a = s.store.create_user("a", "").unwrap().id;
        let b = s.store.create_user("b", "").unwrap().id;
        let a1 = reg(&s, 1, a, vec![]);
        let a2 = reg(&s, 2, a, vec![]);
        reg(&s, 3, b, vec![]);
        let (mut st, first) = Streamer::start(&s, &a1, false);
        assert_eq!(first.response().peers.map(|p| p.len()), Some(1));
        s.policy.set(r#"{"acls": []}"#).unwrap();
        let Some(d) = sent(st.policy_changed()) else { panic!("no map after a policy change") };
        assert!(d.peers.is_none(), "{d:?}");
        assert_eq!(d.peers_removed, Some(vec![a2.id as i64]));
    }

    #[test]
    fn global_policy_streams_send_differences() {
        let s = shared();
        s.policy.set(crate::policy::HEADSCALE_DEFAULT).unwrap();
        let a = s.store.create_user("a", "").unwrap().id;
        let b = s.store.create_user("b", "").unwrap().id;
        let a1 = reg(&s, 1, a, vec![]);
        let (mut st, _) = Streamer::start(&s, &a1, false);
        let b1 = reg(&s, 2, b, vec![]);
        let Some(d) = sent(st.store_changed()) else { panic!("no delta") };
        assert_eq!(d.peers_changed.map(|p| p.iter().map(|n| n.id).collect::<Vec<_>>()), Some(vec![b1.id as i64]));
        assert!(d.peers.is_none());
        s.store.delete_node(b1.id).unwrap();
        let Some(d) = sent(st.store_changed()) else { panic!("no delta") };
        assert_eq!(d.peers_removed, Some(vec![b1.id as i64]));
        // Back to the built-in policy: the org-b node would be gone, a full map replaces.
        reg(&s, 3, b, vec![]);
        let _ = st.store_changed();
        s.policy.set(crate::policy::ORG_ISOLATION).unwrap();
        let Some(d) = sent(st.policy_changed()) else { panic!("no map after a policy change") };
        assert!(d.peers_removed.is_some() && d.peers.is_none(), "{d:?}");
    }

    /// A client's view of its map: what it holds after applying every message as Tailscale's
    /// client does (a non-empty `Peers` replaces; removals, entries, then patches; profiles
    /// merged).
    #[derive(Default)]
    struct Held {
        node: Option<tailcfg::Node>,
        peers: BTreeMap<i64, tailcfg::Node>,
        filter: Vec<tailcfg::FilterRule>,
        users: BTreeMap<i64, tailcfg::UserProfile>,
    }

    impl Held {
        fn apply(&mut self, m: &MapResponse) {
            if let Some(n) = &m.node {
                self.node = Some(n.clone());
            }
            if let Some(f) = &m.packet_filter {
                self.filter = f.clone();
            }
            for u in &m.user_profiles {
                self.users.insert(u.id, u.clone());
            }
            if let Some(p) = m.peers.as_ref().filter(|p| !p.is_empty()) {
                self.peers = p.iter().map(|n| (n.id, n.clone())).collect();
                return;
            }
            for id in m.peers_removed.iter().flatten() {
                self.peers.remove(id);
            }
            for n in m.peers_changed.iter().flatten() {
                self.peers.insert(n.id, n.clone());
            }
            for c in m.peers_changed_patch.iter().flatten() {
                let Some(p) = self.peers.get_mut(&c.node_id) else { continue };
                if let Some(r) = c.derp_region {
                    (p.home_derp, p.derp) = (r, format!("127.3.3.40:{r}"));
                }
                if let Some(e) = &c.endpoints {
                    p.endpoints = e.clone();
                }
                if let Some(k) = c.disco_key {
                    p.disco_key = k;
                }
                if c.online.is_some() {
                    p.online = c.online;
                }
                if c.last_seen.is_some() {
                    p.last_seen = c.last_seen;
                }
            }
        }
    }

    /// Under policies other than the built-in one, a stream's deltas leave its client holding
    /// the map a full build gives, after every change: joins (tagged or not, across orgs),
    /// endpoint, DERP and online patches, tags, org moves, routes served and approved (and the
    /// primary moving when a router goes offline), user renames, deletions, and a policy
    /// replaced midway; a stream its node's change ends starts over.
    #[test]
    fn global_deltas_leave_clients_holding_the_full_map() {
        const POLICIES: [&str; 4] = [
            r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
            r#"{"tagOwners": {"tag:srv": ["org0@"]}, "acls": [
                {"action": "accept", "src": ["org0@", "org1@"], "dst": ["tag:srv:22", "org2@:*"]},
                {"action": "accept", "src": ["tag:srv"], "dst": ["10.9.0.0/16:*"]}]}"#,
            r#"{"tagOwners": {"tag:srv": []}, "acls": [
                {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*", "tag:srv:443"]}]}"#,
            crate::policy::HEADSCALE_DEFAULT,
        ];
        let (mut deltas, mut frames) = (0, 0);
        for seed in 1..=6u64 {
            let s = shared();
            s.policy.set(POLICIES[seed as usize % POLICIES.len()]).unwrap();
            let users: Vec<u64> = (0..3).map(|i| s.store.create_user(&format!("org{i}"), "").unwrap().id).collect();
            let mut rng = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut k = 0u32;
            for _ in 0..6 {
                k += 1;
                reg(&s, k, users[next(3) as usize], vec![]);
            }
            let start = |s: &Shared, id: u64| {
                let n = s.store.node(id)?;
                let (st, first) = Streamer::start(s, &n, false);
                let mut h = Held::default();
                h.apply(&first.response());
                Some((st, h))
            };
            let mut streams: BTreeMap<u64, (Streamer, Held)> =
                s.store.node_ids().into_iter().filter_map(|id| Some((id, start(&s, id)?))).collect();
            for step in 0..60 {
                let ids = s.store.node_ids();
                let pick = ids[next(ids.len() as u64) as usize];
                let mut policy = false;
                match next(10) {
                    0 | 1 => {
                        k += 1;
                        let tags = if next(3) == 0 { vec!["tag:srv".to_string()] } else { vec![] };
                        reg(&s, k, users[next(3) as usize], tags);
                    }
                    2 => {
                        let ep = format!("127.0.0.1:{}", 1000 + step);
                        s.store
                            .update_node(pick, |n| {
                                n.endpoints = vec![ep];
                                n.home_derp = 1 + step % 3;
                                true
                            })
                            .unwrap();
                    }
                    3 => s.store.session(pick, next(2) == 0),
                    4 => {
                        let tags = if next(2) == 0 { vec!["tag:srv".to_string()] } else { vec![] };
                        s.store.set_tags(pick, tags).unwrap();
                    }
                    5 => {
                        s.store.move_node(pick, users[next(3) as usize]).unwrap();
                    }
                    6 => {
                        let mut h = s.store.node(pick).unwrap().hostinfo.clone();
                        h.rest.insert("RoutableIPs", serde_json::json!(["10.9.0.0/16"]));
                        s.store
                            .update_node(pick, |n| {
                                n.hostinfo = h;
                                true
                            })
                            .unwrap();
                        s.store.set_approved_routes(pick, vec!["10.9.0.0/16".into()]).unwrap();
                        s.store.session(pick, true);
                    }
                    7 if ids.len() > 3 => {
                        s.store.delete_node(pick).unwrap();
                    }
                    8 => {
                        let u = users[next(3) as usize];
                        let name = s.store.user(u).unwrap().name;
                        // Renamed and back: the policy names the users.
                        s.store.rename_user(u, &format!("{name}x")).unwrap();
                        s.store.rename_user(u, &name).unwrap();
                    }
                    _ => {
                        s.policy.set(POLICIES[next(POLICIES.len() as u64) as usize]).unwrap();
                        policy = true;
                    }
                }
                for id in s.store.node_ids() {
                    let (st, held) = match streams.get_mut(&id) {
                        Some(x) => x,
                        None => {
                            streams.insert(id, start(&s, id).unwrap());
                            continue;
                        }
                    };
                    let step = if policy { st.policy_changed() } else { st.store_changed() };
                    if matches!(step, Step::End) {
                        streams.insert(id, start(&s, id).unwrap());
                        continue;
                    }
                    frames += usize::from(matches!(step, Step::Frame(_)) && OrgTemplate::current(&s).is_none());
                    if let Some(m) = sent(step) {
                        deltas += 1;
                        held.apply(&m);
                    }
                }
                streams.retain(|id, _| s.store.node(*id).is_some());
                if OrgTemplate::current(&s).is_some() {
                    continue;
                }
                for (id, (_, held)) in &streams {
                    let me = s.store.node(*id).unwrap();
                    let full = build_map_compiled(&s, &me);
                    let want: BTreeMap<i64, tailcfg::Node> =
                        full.peers.iter().flatten().map(|n| (n.id, n.clone())).collect();
                    let ctx = format!("seed {seed} step {step} node {id}");
                    assert_eq!(held.peers, want, "{ctx}");
                    assert_eq!(held.node, full.node, "{ctx}");
                    assert_eq!(held.filter, full.packet_filter.clone().unwrap_or_default(), "{ctx}");
                    for u in &full.user_profiles {
                        assert_eq!(held.users.get(&u.id), Some(u), "{ctx}");
                    }
                }
            }
        }
        assert!(deltas > 500 && frames > 100, "{deltas} deltas, {frames} shared frames");
    }

    /// A custom-policy delta is encoded once for the streams it is the same bytes for, and
    /// only for them: a stream that loses a peer and one that never saw it read the same
    /// stretch of the log, and neither gets the other's message.
    #[test]
    fn shared_custom_policy_deltas_go_only_to_streams_with_the_same_changes() {
        let s = shared();
        s.policy
            .set(
                r#"{"tagOwners": {"tag:srv": []}, "acls": [
                    {"action": "accept", "src": ["org0@"], "dst": ["org1@:*"]}]}"#,
            )
            .unwrap();
        let users: Vec<u64> = (0..3).map(|i| s.store.create_user(&format!("org{i}"), "").unwrap().id).collect();
        let a = reg(&s, 1, users[0], vec![]);
        let x = reg(&s, 2, users[1], vec![]);
        let y = reg(&s, 3, users[1], vec![]);
        let b = reg(&s, 4, users[2], vec![]);
        let (mut sa, first_a) = Streamer::start(&s, &a, false);
        let (mut sb, first_b) = Streamer::start(&s, &b, false);
        assert_eq!(first_a.response().peers.map(|p| p.len()), Some(2));
        assert_eq!(first_b.response().peers.map(|p| p.len()), Some(0));
        // Both members see the same endpoint change of another org0 member: one frame.
        let a2 = reg(&s, 5, users[0], vec![]);
        let _ = (sb.store_changed(), sa.store_changed());
        s.store
            .update_node(a2.id, |n| {
                n.endpoints = vec!["127.0.0.1:7".into()];
                true
            })
            .unwrap();
        let (Step::Nothing, Step::Nothing) = (sb.store_changed(), sa.store_changed()) else {
            panic!("neither sees org0's other member")
        };
        // Tagged, x is no longer org1's: a loses it, b never had it. b reads first.
        s.store.set_tags(x.id, vec!["tag:srv".into()]).unwrap();
        assert!(matches!(sb.store_changed(), Step::Nothing));
        let d = sent(sa.store_changed()).expect("a loses x");
        assert_eq!(d.peers_removed, Some(vec![x.id as i64]));
        // Two members of org0 woken by a change of org1's remaining member share its frame.
        let (mut sa2, _) = Streamer::start(&s, &s.store.node(a2.id).unwrap(), false);
        s.store
            .update_node(y.id, |n| {
                n.endpoints = vec!["127.0.0.1:8".into()];
                true
            })
            .unwrap();
        let (Step::Frame(f1), Step::Frame(f2)) = (sa.store_changed(), sa2.store_changed()) else {
            panic!("the same patch is not one shared frame")
        };
        assert_eq!(f1, f2);
    }

    /// Primary-route failover: when a subnet's primary router goes offline, each stream gets
    /// the other router's entry, now primary for the subnet, in the next delta.
    #[test]
    fn failover_resends_the_new_primary_router() {
        let s = shared();
        s.policy.set(r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#).unwrap();
        let org = s.store.create_user("a", "").unwrap().id;
        let mut routers = vec![];
        for k in [1, 2] {
            let r = reg(&s, k, org, vec![]);
            let mut h = r.hostinfo.clone();
            h.rest.insert("RoutableIPs", serde_json::json!(["10.1.0.0/16"]));
            s.store
                .update_node(r.id, |n| {
                    n.hostinfo = h;
                    true
                })
                .unwrap();
            s.store.set_approved_routes(r.id, vec!["10.1.0.0/16".into()]).unwrap();
            s.store.session(r.id, true);
            routers.push(r.id);
        }
        let viewer = reg(&s, 3, org, vec![]);
        let (mut st, first) = Streamer::start(&s, &viewer, false);
        let first = first.response();
        let primary = |m: &MapResponse, id: u64| {
            m.peers
                .iter()
                .chain(&m.peers_changed)
                .flatten()
                .find(|p| p.id == id as i64)
                .map(|p| p.primary_routes.clone())
        };
        assert_eq!(primary(&first, routers[0]), Some(vec!["10.1.0.0/16".to_string()]));
        assert_eq!(primary(&first, routers[1]), Some(vec![]));
        s.store.session(routers[0], false);
        let Some(d) = sent(st.store_changed()) else { panic!("no delta after the primary went offline") };
        assert_eq!(primary(&d, routers[1]), Some(vec!["10.1.0.0/16".to_string()]), "{d:?}");
        assert_eq!(primary(&d, routers[0]), Some(vec![]), "{d:?}");
        // Back online: the lowest id is primary again.
        s.store.session(routers[0], true);
        let Some(d) = sent(st.store_changed()) else { panic!("no delta") };
        assert_eq!(primary(&d, routers[0]), Some(vec!["10.1.0.0/16".to_string()]), "{d:?}");
    }
}
