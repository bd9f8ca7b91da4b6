//! The server's current policy: replaced only by a policy that parses, compiled once per
//! change of policy or of the nodes it resolves, and watched by every map stream.

use super::{Compiled, Policy, PolicyError, PolicyNode, PolicyUser};
use crate::store::Store;
use crate::Shared;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use citadel_proto::wall;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::watch;

struct Cache {
    generation: u64,
    /// The store version the inputs were last read at (see [`Store::version`]).
    version: u64,
    users: Vec<PolicyUser>,
    nodes: Vec<PolicyNode>,
    compiled: Arc<Compiled>,
}

/// The active policy, when it was set, and its compiled form.
pub struct PolicyState {
    current: RwLock<(Arc<Policy>, DateTime<Utc>)>,
    changed: watch::Sender<u64>,
    cache: Mutex<Option<Cache>>,
}

impl PolicyState {
    /// Starts with `policy`.
    pub fn new(policy: Policy) -> PolicyState {
        PolicyState::set_at(policy, wall::now())
    }

    /// Starts with `policy`, set at `at` (a policy loaded from the database).
    pub fn set_at(policy: Policy, at: DateTime<Utc>) -> PolicyState {
        PolicyState {
            current: RwLock::new((Arc::new(policy), at)),
            changed: watch::channel(0).0,
            cache: Mutex::new(None),
        }
    }

    /// The active policy and when it was set.
    pub fn get(&self) -> (Arc<Policy>, DateTime<Utc>) {
        self.current.read().unwrap().clone()
    }

    /// Parses `text` and, only if it is valid, makes it the active policy and wakes every
    /// map stream.
    pub fn set(&self, text: &str) -> Result<(Arc<Policy>, DateTime<Utc>), PolicyError> {
        self.set_time(text, wall::now())
    }

    /// [`PolicyState::set`] recording `now` as the time it was set.
    pub fn set_time(&self, text: &str, now: DateTime<Utc>) -> Result<(Arc<Policy>, DateTime<Utc>), PolicyError> {
        let p = Arc::new(Policy::parse(text)?);
        *self.current.write().unwrap() = (p.clone(), now);
        self.changed.send_modify(|g| *g += 1);
        tracing::info!(bytes = text.len(), "policy replaced");
        Ok((p, now))
    }

    /// Changes whenever the policy is replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The policy compiled against the store's current users and nodes (cached until either
    /// changes). At a store version it was already asked at, it is answered without reading
    /// the store: every map stream asks after every change, and reading every node per ask
    /// cost each change work in proportion to nodes times streams.
    pub fn compiled(&self, store: &Store) -> Arc<Compiled> {
        // Read before the inputs: a change after this moves the version on, so inputs read
        // below are never older than the version they are kept under.
        let version = store.version();
        let generation = *self.changed.borrow();
        // Held while compiling: the streams asking at the same time need the same result.
        let mut cache = self.cache.lock().unwrap();
        if let Some(c) = cache.as_ref().filter(|c| c.generation == generation && c.version == version) {
            return c.compiled.clone();
        }
        let (users, nodes) = inputs(store);
        if let Some(c) = cache.as_mut().filter(|c| c.generation == generation && c.users == users && c.nodes == nodes) {
            c.version = version;
            return c.compiled.clone();
        }
        let mut compiled = self.get().0.compile(&users, &nodes);
        if let Some(prev) = cache.as_ref() {
            compiled = compiled.after(&prev.compiled);
        }
        let compiled = Arc::new(compiled);
        *cache = Some(Cache { generation, version, users, nodes, compiled: compiled.clone() });
        compiled
    }
}

/// The users and nodes of `store` as the compiler sees them (nodes by ascending id).
pub fn inputs(store: &Store) -> (Vec<PolicyUser>, Vec<PolicyNode>) {
    let users = self::users(store);
    let mut nodes: Vec<PolicyNode> = store.nodes(None).iter().map(|n| policy_node(n)).collect();
    nodes.sort_by_key(|n| n.id);
    (users, nodes)
}

/// The users of `store` as the compiler sees them.
pub fn users(store: &Store) -> Vec<PolicyUser> {
    store.users().into_iter().map(|u| PolicyUser { id: u.id, name: u.name, email: String::new() }).collect()
}

/// A store node as the compiler sees it: addresses, tags and the routes it serves.
pub fn policy_node(n: &crate::store::Node) -> PolicyNode {
    let served = crate::routes::served(n);
    let mut p = PolicyNode::new(n.id, n.user_id, n.ipv4, n.ipv6, n.tags.clone());
    p.exit = served.iter().any(crate::routes::is_exit);
    p.routes = served.into_iter().filter(|r| !crate::routes::is_exit(r)).collect();
    p.announced = crate::routes::advertised(&n.hostinfo);
    p
}

fn policy_json(p: &Policy, at: &DateTime<Utc>) -> Value {
    json!({"policy": p.text(), "updatedAt": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)})
}

fn api_error(status: StatusCode, msg: String) -> Response {
    let code = if status == StatusCode::BAD_REQUEST { 3 } else { 13 };
    (status, Json(json!({"code": code, "message": msg, "details": []}))).into_response()
}

/// `GET /api/v1/policy`.
pub async fn get_policy(State(s): State<Shared>) -> Response {
    let (p, at) = s.policy.get();
    Json(policy_json(&p, &at)).into_response()
}

/// `PUT /api/v1/policy` with `{"policy": "<HuJSON>"}`; a policy that does not parse leaves
/// the active one in place and answers 400 with every problem found.
pub async fn set_policy(State(s): State<Shared>, body: axum::body::Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "body must be JSON: {\"policy\": \"...\"}".into());
    };
    let Some(text) = v.get("policy").and_then(Value::as_str) else {
        return api_error(StatusCode::BAD_REQUEST, "missing string field \"policy\"".into());
    };
    if let Err(e) = Policy::parse(text) {
        return api_error(StatusCode::BAD_REQUEST, format!("setting policy: {e}"));
    }
    // Stored before it takes effect: a policy in force is always the one a restart loads.
    let now = wall::now();
    if let Err(e) = s.store.store_policy(text, now) {
        tracing::error!("storing the policy failed: {e}");
        return api_error(StatusCode::INTERNAL_SERVER_ERROR, format!("storing policy: {e}"));
    }
    match s.policy.set_time(text, now) {
        Ok((p, at)) => {
            crate::routes::auto_approve_all(&s);
            Json(policy_json(&p, &at)).into_response()
        }
        Err(e) => api_error(StatusCode::BAD_REQUEST, format!("setting policy: {e}")),
    }
}
