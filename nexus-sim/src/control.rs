//! The control plane: `GET /key`, the ts2021 upgrade, and `/machine/*` served over HTTP/2
//! inside the Noise channel.

use crate::store::{Node as StoreNode, Pending};
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
use citadel_proto::keys::{MachinePublic, NodePublic};
use citadel_proto::noise::{self, NoiseStream};
use citadel_proto::tailcfg::{
    self, encode_map_frame, MapRequest, MapResponse, OverTlsPublicKeyResponse, RegisterRequest, RegisterResponse,
    UserProfile,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::ReceiverStream;

/// Who is on the other end of a Noise session.
#[derive(Clone, Copy)]
pub struct Session {
    pub machine: MachinePublic,
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
        tokio::select! {
            r = conn => if let Err(e) = r { tracing::debug!("noise http/2 session ended: {e}") },
            _ = s.faults.wait_shutdown() => {}
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

/// Largest Hostinfo (as JSON) a node may register or report.
pub const MAX_HOSTINFO: usize = 16 * 1024;

fn hostinfo_too_large(h: Option<&tailcfg::Hostinfo>) -> bool {
    h.is_some_and(|h| serde_json::to_vec(h).map_or(true, |j| j.len() > MAX_HOSTINFO))
}

pub(crate) async fn handle_register(s: &Shared, sess: Session, req: RegisterRequest) -> RegisterResponse {
    let now = Utc::now();
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
        let n = s.store.register(
            sess.machine,
            req.node_key,
            key.user_id,
            hostinfo,
            key.ephemeral || req.ephemeral,
            key.acl_tags.clone(),
            Some(key.id),
            "authkey",
            s.cfg.ipv4_base,
            s.cfg.ipv6_base,
        );
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("registration refused: {e}");
                return RegisterResponse { error: e.to_string(), ..Default::default() };
            }
        };
        tracing::info!(node = n.id, user = key.user_id, "node registered with a pre-auth key");
        return register_ok(s, &n);
    }
    if let Some(n) = existing {
        if n.is_expired(now) {
            return RegisterResponse { node_key_expired: true, ..Default::default() };
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

/// The map a node sees: itself, the peers the policy lets talk to it in either direction,
/// the DERP map and its packet filter (the policy's rules reduced to its own addresses).
pub fn build_map(s: &Shared, me: &StoreNode) -> MapResponse {
    let now = Utc::now();
    let compiled = s.policy.compiled(&s.store);
    let all: std::collections::HashMap<u64, StoreNode> = s.store.nodes(None).into_iter().map(|n| (n.id, n)).collect();
    let primaries = crate::routes::primaries(all.values(), |id| s.store.is_online(id));
    let to_tail = |n: &StoreNode| {
        let addrs = vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)];
        let own: Vec<crate::policy::ipset::Prefix> =
            addrs.iter().filter_map(|a| crate::policy::ipset::Prefix::parse(a)).collect();
        let (allowed_ips, primary_routes) =
            crate::routes::allowed_ips(n, &own, primaries.get(&n.id).map(Vec::as_slice).unwrap_or(&[]));
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
            online: Some(s.store.is_online(n.id)),
            machine_authorized: true,
            expired: n.is_expired(now),
        }
    };
    let peer_nodes: Vec<&StoreNode> = compiled.peers_of(me.id).iter().filter_map(|id| all.get(id)).collect();
    let peers: Vec<tailcfg::Node> = peer_nodes.iter().map(|n| to_tail(n)).collect();
    let mut users: Vec<u64> = peer_nodes.iter().map(|n| n.user_id).chain([me.user_id]).collect();
    users.sort_unstable();
    users.dedup();
    MapResponse {
        node: Some(to_tail(me)),
        derp_map: Some(s.derp_map.clone()),
        peers: Some(peers),
        domain: s.cfg.base_domain.clone(),
        dns_config: Some(serde_json::json!({"Domains": [s.cfg.base_domain]})),
        packet_filter: Some(compiled.filter_for(me.id)),
        user_profiles: users.into_iter().map(|u| user_profile(s, u)).collect(),
        ..Default::default()
    }
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
    if node.is_expired(Utc::now()) {
        return (StatusCode::UNAUTHORIZED, "node key expired").into_response();
    }
    let nk: NodePublic = req.node_key;
    let _ = nk;
    let ep = req.endpoints.clone();
    let disco = req.disco_key;
    if hostinfo_too_large(req.hostinfo.as_ref()) {
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("Hostinfo larger than {MAX_HOSTINFO} bytes refused"))
            .into_response();
    }
    let hi = req.hostinfo.clone();
    let node = match s.store.update_node(node.id, |n| {
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
                let region =
                    h.rest.get("NetInfo").and_then(|ni| ni.get("PreferredDERP")).and_then(|r| r.as_i64()).unwrap_or(0)
                        as i32;
                if region != 0 && n.home_derp != region {
                    n.home_derp = region;
                    changed = true;
                }
                if *h != n.hostinfo {
                    n.hostinfo = h.clone();
                    changed = true;
                }
            }
        }
        changed
    }) {
        Ok(n) => n,
        Err(_) => return (StatusCode::UNAUTHORIZED, "node not registered").into_response(),
    };
    let zstd = req.compress == "zstd";
    if !req.stream && req.omit_peers {
        // A "lite" update: endpoints/hostinfo only.
        return StatusCode::OK.into_response();
    }
    if !req.stream {
        return Response::new(Body::from(encode_map_frame(&s.faults.with_leaks(&s, &node, build_map), zstd)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    let keepalive = s.cfg.keepalive;
    let node_id = node.id;
    let user_id = node.user_id;
    let store = s.store.clone();
    tokio::spawn(async move {
        // Any node or policy change may change this node's peers or filter.
        let mut nodes_changed = store.subscribe_all();
        let mut policy_changed = s.policy.subscribe();
        store.session(node_id, true);
        let mut last: Option<MapResponse> = None;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            let Some(me) = store.node(node_id) else { break };
            if me.user_id != user_id {
                break; // moved to another org: the client must reconnect
            }
            if me.is_expired(Utc::now()) {
                break; // an expired node gets no map; its reconnect is refused
            }
            let until_expiry =
                me.expiry.and_then(|e| (e - Utc::now()).to_std().ok()).unwrap_or(Duration::from_secs(365 * 86400));
            let m = s.faults.with_leaks(&s, &me, build_map);
            if last.as_ref() != Some(&m) {
                let mut out = m.clone();
                out.control_time = Some(Utc::now());
                if tx.send(Ok(Bytes::from(encode_map_frame(&out, zstd)))).await.is_err() {
                    break;
                }
                s.metrics.map_sends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                last = Some(m);
            }
            tokio::select! {
                r = nodes_changed.changed() => if r.is_err() { break },
                r = policy_changed.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(until_expiry) => {}
                _ = ticker.tick() => {
                    let ka = MapResponse { keep_alive: true, ..Default::default() };
                    if tx.send(Ok(Bytes::from(encode_map_frame(&ka, zstd)))).await.is_err() { break }
                    s.metrics.keepalives.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                _ = tx.closed() => break,
                _ = s.faults.wait_drop_streams() => break,
            }
        }
        store.session(node_id, false);
        s.schedule_ephemeral_cleanup(node_id);
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .expect("static response")
}
