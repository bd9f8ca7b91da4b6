//! Headscale's REST API v1 (the subset for users, pre-auth keys, nodes and API keys), with the
//! same paths and protojson shapes (64-bit ids as strings, RFC 3339 times, camelCase), behind
//! `Authorization: Bearer <api key>`.

use crate::store::{ApiKey, Node, PreAuthKey, StoreError, User};
use crate::Shared;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// API error → HTTP status + `{"code":…, "message":…}` like grpc-gateway.
pub struct ApiError(StatusCode, String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::Invalid(_) => ApiError(StatusCode::BAD_REQUEST, e.to_string()),
            StoreError::Db(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            StoreError::Exhausted(_) => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.0 {
            StatusCode::NOT_FOUND => 5,
            StatusCode::BAD_REQUEST => 3,
            StatusCode::UNAUTHORIZED => 16,
            _ => 13,
        };
        (self.0, Json(json!({"code": code, "message": self.1, "details": []}))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A user as Headscale's REST API shows it.
pub fn user_json(u: &User) -> Value {
    json!({"id": u.id.to_string(), "name": u.name, "createdAt": ts(&u.created_at), "displayName": u.display_name,
           "email": "", "providerId": "", "provider": "", "profilePicUrl": ""})
}

fn key_json(s: &Shared, k: &PreAuthKey) -> Value {
    json!({"user": s.store.user(k.user_id).map(|u| user_json(&u)), "id": k.id.to_string(),
           "key": if k.key.is_empty() { k.masked() } else { k.key.clone() },
           "reusable": k.reusable, "ephemeral": k.ephemeral, "used": k.used,
           "expiration": k.expiration.as_ref().map(ts), "createdAt": ts(&k.created_at), "aclTags": k.acl_tags})
}

/// A node as Headscale's API shows it, plus `endpoints` and `homeDerp` (nexus-sim extensions).
pub fn node_json(s: &Shared, n: &Node) -> Value {
    json!({"id": n.id.to_string(), "machineKey": n.machine_key.to_string(), "nodeKey": n.node_key.to_string(),
           "discoKey": n.disco_key.to_string(), "ipAddresses": [n.ipv4.to_string(), n.ipv6.to_string()],
           "name": n.hostname, "givenName": n.given_name,
           "user": s.store.user(n.user_id).map(|u| user_json(&u)),
           "lastSeen": n.last_seen.as_ref().map(ts), "expiry": n.expiry.as_ref().map(ts),
           "createdAt": ts(&n.created_at),
           "registerMethod": if n.register_method == "authkey" { "REGISTER_METHOD_AUTH_KEY" } else { "REGISTER_METHOD_CLI" },
           "online": s.store.is_online(n.id), "tags": n.tags, "forcedTags": n.tags, "validTags": n.tags, "invalidTags": [],
           "ephemeral": n.ephemeral, "endpoints": n.endpoints, "homeDerp": n.home_derp,
           "approvedRoutes": n.approved_routes,
           "availableRoutes": crate::routes::advertised(&n.hostinfo).iter().map(|p| p.to_string()).collect::<Vec<_>>(),
           "subnetRoutes": crate::routes::served(n).iter().map(|p| p.to_string()).collect::<Vec<_>>()})
}

fn api_key_json(k: &ApiKey) -> Value {
    json!({"id": k.id.to_string(), "prefix": k.prefix, "expiration": k.expiration.as_ref().map(ts),
           "createdAt": ts(&k.created_at), "lastSeen": null})
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| s.store.check_api_key(k.trim()));
    if !ok {
        return ApiError(StatusCode::UNAUTHORIZED, "Unauthorized".into()).into_response();
    }
    next.run(req).await
}

/// Resolves a user given by id or by name (Headscale accepts the id; the CLI passes names).
fn resolve_user(s: &Shared, v: &str) -> Result<User, ApiError> {
    v.parse::<u64>()
        .ok()
        .and_then(|id| s.store.user(id))
        .or_else(|| s.store.user_by_name(v))
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("user {v:?} not found")))
}

fn json_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn list_users(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let users: Vec<Value> = s
        .store
        .users()
        .iter()
        .filter(|u| q.get("name").is_none_or(|n| &u.name == n) && q.get("id").is_none_or(|i| &u.id.to_string() == i))
        .map(user_json)
        .collect();
    Ok(Json(json!({"users": users})))
}

#[derive(Deserialize)]
struct CreateUser {
    name: String,
    #[serde(default, rename = "displayName")]
    display_name: String,
}

async fn create_user(State(s): State<Shared>, Json(b): Json<CreateUser>) -> ApiResult {
    Ok(Json(json!({"user": user_json(&s.store.create_user(&b.name, &b.display_name)?)})))
}

async fn delete_user(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let u = resolve_user(&s, &id)?;
    s.store.delete_user(u.id)?;
    Ok(Json(json!({})))
}

async fn rename_user(State(s): State<Shared>, Path((id, new)): Path<(String, String)>) -> ApiResult {
    let u = resolve_user(&s, &id)?;
    Ok(Json(json!({"user": user_json(&s.store.rename_user(u.id, &new)?)})))
}

async fn list_keys(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let uid = match q.get("user") {
        Some(u) => Some(resolve_user(&s, u)?.id),
        None => None,
    };
    let keys: Vec<Value> = s.store.keys(uid).iter().map(|k| key_json(&s, k)).collect();
    Ok(Json(json!({"preAuthKeys": keys})))
}

fn parse_time(v: &Value) -> Result<Option<DateTime<Utc>>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::String(t) if t.is_empty() => Ok(None),
        Value::String(t) => DateTime::parse_from_rfc3339(t)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| bad(format!("invalid time {t:?}: {e}"))),
        _ => Err(bad("a time must be an RFC 3339 string")),
    }
}

async fn create_key(State(s): State<Shared>, Json(b): Json<Value>) -> ApiResult {
    let user = b.get("user").and_then(json_str).ok_or_else(|| bad("user is required"))?;
    let u = resolve_user(&s, &user)?;
    let expiration = parse_time(b.get("expiration").unwrap_or(&Value::Null))?;
    let tags: Vec<String> = b
        .get("aclTags")
        .and_then(|t| t.as_array())
        .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let flag = |n: &str| b.get(n).and_then(|v| v.as_bool()).unwrap_or(false);
    let k = s.store.create_key(u.id, flag("reusable"), flag("ephemeral"), expiration, tags)?;
    Ok(Json(json!({"preAuthKey": key_json(&s, &k)})))
}

async fn expire_key(State(s): State<Shared>, Json(b): Json<Value>) -> ApiResult {
    let key = b.get("key").and_then(|k| k.as_str()).ok_or_else(|| bad("key is required"))?;
    s.store.expire_key(key)?;
    Ok(Json(json!({})))
}

async fn list_nodes(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let uid = match q.get("user").filter(|u| !u.is_empty()) {
        Some(u) => Some(resolve_user(&s, u)?.id),
        None => None,
    };
    let nodes: Vec<Value> = s.store.nodes(uid).iter().map(|n| node_json(&s, n)).collect();
    Ok(Json(json!({"nodes": nodes})))
}

fn node_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| bad(format!("invalid node id {id:?}")))
}

async fn get_node(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let n =
        s.store.node(node_id(&id)?).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("node {id} not found")))?;
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

async fn delete_node(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult {
    s.store.delete_node(node_id(&id)?)?;
    Ok(Json(json!({})))
}

/// `POST /api/v1/node/{id}/expire[?expiry=RFC3339]`: the key expires now, or at `expiry` (an
/// operator shortening or extending a key's life; an expiry passed is announced to the org).
async fn expire_node(
    State(s): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let at = match q.get("expiry") {
        Some(t) => parse_time(&Value::String(t.clone()))?,
        None => None,
    };
    let n = s.store.expire_node(node_id(&id)?, at)?;
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

async fn rename_node(State(s): State<Shared>, Path((id, name)): Path<(String, String)>) -> ApiResult {
    let n = s.store.rename_node(node_id(&id)?, &name)?;
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

/// `POST /api/v1/node/{id}/approve_routes {"routes": [...]}`: replaces the node's approved
/// routes (an empty list approves none).
async fn approve_routes(State(s): State<Shared>, Path(id): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let id = node_id(&id)?;
    let routes: Vec<String> = match b.get("routes") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(str::to_string).ok_or_else(|| bad("routes must be strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("routes must be a list of prefixes")),
    };
    let routes = crate::routes::parse_approved(&routes).map_err(|e| bad(e.to_string()))?;
    let n = s.store.set_approved_routes(id, routes)?;
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

/// `POST /api/v1/node/{id}/tags {"tags": [...]}`: replaces the node's tags.
async fn set_tags(State(s): State<Shared>, Path(id): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let id = node_id(&id)?;
    let tags: Vec<String> = match b.get("tags") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or_else(|| bad("tags must be strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("tags must be a list")),
    };
    let n = s.store.set_tags(id, tags)?;
    // Tags decide which auto-approvers apply.
    let n = crate::routes::auto_approve(&s, n.id).unwrap_or(n);
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

/// `POST /api/v1/node/{id}/user {"user": ID}`: moves the node to another user (org). The id
/// may be a number or a string holding one, as Headscale's JSON gateway takes it; a user name
/// works too.
async fn move_node(State(s): State<Shared>, Path(id): Path<String>, Json(b): Json<Value>) -> ApiResult {
    let id = node_id(&id)?;
    let user = b.get("user").and_then(json_str).ok_or_else(|| bad("user is required"))?;
    let u = resolve_user(&s, &user)?;
    let n = s.store.move_node(id, u.id)?;
    // The owner decides which auto-approvers apply.
    let n = crate::routes::auto_approve(&s, n.id).unwrap_or(n);
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

/// `POST /api/v1/node/register?user=U&key=ID`: approve an interactive registration.
async fn register_node(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let user = q.get("user").ok_or_else(|| bad("user is required"))?;
    let key = q.get("key").ok_or_else(|| bad("key is required"))?;
    let u = resolve_user(&s, user)?;
    let id = key.rsplit('/').next().unwrap_or(key);
    let p = s
        .store
        .take_pending(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no pending registration {id:?}")))?;
    let n = s.store.register(
        p.machine_key,
        p.node_key,
        u.id,
        p.hostinfo,
        p.ephemeral,
        vec![],
        None,
        "cli",
        s.cfg.ipv4_base,
        s.cfg.ipv6_base,
    )?;
    let n = crate::routes::auto_approve(&s, n.id).unwrap_or(n);
    Ok(Json(json!({"node": node_json(&s, &n)})))
}

/// Refuses an interactive registration (nexus-sim extension; the waiting client is told).
async fn reject_registration(State(s): State<Shared>, Path(id): Path<String>) -> ApiResult {
    s.store
        .take_pending(&id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no pending registration {id:?}")))?;
    Ok(Json(json!({})))
}

async fn create_api_key(State(s): State<Shared>, body: Option<Json<Value>>) -> ApiResult {
    let exp = match body.as_ref().and_then(|b| b.get("expiration")) {
        Some(v) => parse_time(v)?,
        None => None,
    };
    let (full, _) = s.store.create_api_key(exp);
    Ok(Json(json!({"apiKey": full})))
}

fn prefix_of(b: &Value) -> Result<String, ApiError> {
    b.get("prefix").and_then(|p| p.as_str()).map(str::to_string).ok_or_else(|| bad("prefix is required"))
}

/// `POST /api/v1/apikey/expire {"prefix"}`.
async fn expire_api_key(State(s): State<Shared>, Json(b): Json<Value>) -> ApiResult {
    s.store.expire_api_key(&prefix_of(&b)?)?;
    Ok(Json(json!({})))
}

/// `DELETE /api/v1/apikey/{prefix}`.
async fn delete_api_key(State(s): State<Shared>, Path(prefix): Path<String>) -> ApiResult {
    s.store.delete_api_key(&prefix)?;
    Ok(Json(json!({})))
}

async fn list_api_keys(State(s): State<Shared>) -> ApiResult {
    Ok(Json(json!({"apiKeys": s.store.api_keys().iter().map(api_key_json).collect::<Vec<_>>()})))
}

/// The `/api/v1` router.
pub fn router(s: Shared) -> Router<Shared> {
    Router::new()
        .route("/api/v1/user", get(list_users).post(create_user))
        .route("/api/v1/user/{id}", delete(delete_user))
        .route("/api/v1/user/{id}/rename/{new}", post(rename_user))
        .route("/api/v1/preauthkey", get(list_keys).post(create_key))
        .route("/api/v1/preauthkey/expire", post(expire_key))
        .route("/api/v1/node", get(list_nodes))
        .route("/api/v1/node/register", post(register_node))
        .route("/api/v1/node/{id}", get(get_node).delete(delete_node))
        .route("/api/v1/node/{id}/expire", post(expire_node))
        .route("/api/v1/node/{id}/rename/{name}", post(rename_node))
        .route("/api/v1/node/{id}/approve_routes", post(approve_routes))
        .route("/api/v1/node/{id}/tags", post(set_tags))
        .route("/api/v1/node/{id}/user", post(move_node))
        .route("/api/v1/policy", get(crate::policy::state::get_policy).put(crate::policy::state::set_policy))
        .route("/api/v1/apikey", get(list_api_keys).post(create_api_key))
        .route("/api/v1/apikey/expire", post(expire_api_key))
        .route("/api/v1/apikey/{prefix}", delete(delete_api_key))
        .route("/api/v1/device/approve", post(crate::device::approve))
        .route("/api/v1/device/deny", post(crate::device::deny))
        .route("/api/v1/node/register/{id}", delete(reject_registration))
        .route_layer(middleware::from_fn_with_state(s, auth))
}
