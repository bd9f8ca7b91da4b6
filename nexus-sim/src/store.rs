//! nexus-sim's data: users (orgs), pre-auth keys, nodes, API keys and stable address
//! allocations. In memory, optionally mirrored to SQLite (one table per kind, a JSON column per
//! row) so a restart with `--db` keeps everything. Change notification is per org: a node's
//! map only ever depends on its own org, so only that org's streams wake.

use chrono::{DateTime, Utc};
use citadel_proto::keys::{DiscoPublic, MachinePublic, NodePublic};
use citadel_proto::tailcfg::Hostinfo;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// An org (Headscale user).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
}

/// A pre-auth key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreAuthKey {
    pub id: u64,
    pub key: String,
    pub user_id: u64,
    pub reusable: bool,
    pub ephemeral: bool,
    pub used: bool,
    pub expiration: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub acl_tags: Vec<String>,
}

/// A registered node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: u64,
    pub machine_key: MachinePublic,
    pub node_key: NodePublic,
    pub disco_key: DiscoPublic,
    pub user_id: u64,
    pub hostname: String,
    pub given_name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub endpoints: Vec<String>,
    pub hostinfo: Hostinfo,
    pub expiry: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_seen: Option<DateTime<Utc>>,
    pub ephemeral: bool,
    pub tags: Vec<String>,
    pub auth_key_id: Option<u64>,
    pub register_method: String,
    /// Home DERP region the node reports (0 = none).
    #[serde(default)]
    pub home_derp: i32,
}

impl Node {
    /// True once the node's key expiry has passed.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expiry.is_some_and(|e| e <= now)
    }
}

/// An admin API key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKey {
    pub id: u64,
    pub prefix: String,
    /// SHA-256 of the full key, hex.
    pub hash: String,
    pub expiration: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A node waiting for an admin to approve it (`/register/{id}`).
#[derive(Debug, Clone)]
pub struct Pending {
    pub machine_key: MachinePublic,
    pub node_key: NodePublic,
    pub hostinfo: Hostinfo,
    pub ephemeral: bool,
    pub created: DateTime<Utc>,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

#[derive(Default)]
struct Data {
    users: BTreeMap<u64, User>,
    keys: BTreeMap<u64, PreAuthKey>,
    nodes: BTreeMap<u64, Node>,
    api_keys: BTreeMap<u64, ApiKey>,
    /// machine key → allocation index (stable addresses across re-registration).
    allocations: BTreeMap<MachinePublic, u32>,
    next_id: u64,
    /// Open map streams per node (online while > 0).
    sessions: HashMap<u64, u32>,
    pending: HashMap<String, Pending>,
}

/// The shared store.
#[derive(Clone)]
pub struct Store {
    data: Arc<Mutex<Data>>,
    db: Option<Arc<Mutex<rusqlite::Connection>>>,
    orgs: Arc<Mutex<HashMap<u64, watch::Sender<u64>>>>,
    all: watch::Sender<u64>,
}

const TABLES: [&str; 5] = ["users", "preauthkeys", "nodes", "apikeys", "meta"];

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Random lowercase hex of `n` bytes.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    hex::encode(b)
}

/// Turns a requested host name into a DNS label.
pub fn sanitize_hostname(h: &str) -> String {
    let mut s: String =
        h.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    s = s.trim_matches('-').to_string();
    s.truncate(63);
    if s.is_empty() {
        "node".into()
    } else {
        s
    }
}

impl Store {
    /// An in-memory store, or one mirrored to the SQLite file at `db`.
    pub fn open(db: Option<&Path>) -> Result<Store, StoreError> {
        let mut data = Data { next_id: 1, ..Default::default() };
        let conn = match db {
            None => None,
            Some(p) => {
                let c = rusqlite::Connection::open(p)?;
                c.pragma_update(None, "journal_mode", "WAL")?;
                for t in TABLES {
                    c.execute(
                        &format!("CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, json TEXT NOT NULL)"),
                        [],
                    )?;
                }
                fn load<T: DeserializeOwned>(
                    c: &rusqlite::Connection,
                    t: &str,
                ) -> Result<Vec<(String, T)>, StoreError> {
                    let mut st = c.prepare(&format!("SELECT id, json FROM {t}"))?;
                    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                    let mut out = Vec::new();
                    for r in rows {
                        let (id, j) = r?;
                        let v = serde_json::from_str(&j)
                            .map_err(|e| StoreError::Invalid(format!("corrupt row {id} in {t}: {e}")))?;
                        out.push((id, v));
                    }
                    Ok(out)
                }
                for (_, u) in load::<User>(&c, "users")? {
                    data.users.insert(u.id, u);
                }
                for (_, k) in load::<PreAuthKey>(&c, "preauthkeys")? {
                    data.keys.insert(k.id, k);
                }
                for (_, n) in load::<Node>(&c, "nodes")? {
                    data.nodes.insert(n.id, n);
                }
                for (_, k) in load::<ApiKey>(&c, "apikeys")? {
                    data.api_keys.insert(k.id, k);
                }
                for (id, v) in load::<serde_json::Value>(&c, "meta")? {
                    if id == "allocations" {
                        let a: Vec<(MachinePublic, u32)> = serde_json::from_value(v).unwrap_or_default();
                        data.allocations = a.into_iter().collect();
                    } else if id == "next_id" {
                        data.next_id = v.as_u64().unwrap_or(1);
                    }
                }
                Some(Arc::new(Mutex::new(c)))
            }
        };
        data.next_id = data.next_id.max(
            data.users
                .keys()
                .chain(data.keys.keys())
                .chain(data.nodes.keys())
                .chain(data.api_keys.keys())
                .max()
                .copied()
                .unwrap_or(0)
                + 1,
        );
        Ok(Store { data: Arc::new(Mutex::new(data)), db: conn, orgs: Default::default(), all: watch::channel(0).0 })
    }

    fn put<T: Serialize>(&self, table: &str, id: &str, v: &T) {
        if let Some(db) = &self.db {
            let j = serde_json::to_string(v).expect("serializes");
            if let Err(e) = db.lock().unwrap().execute(
                &format!("INSERT OR REPLACE INTO {table} (id, json) VALUES (?1, ?2)"),
                rusqlite::params![id, j],
            ) {
                tracing::error!("sqlite write to {table} failed: {e}");
            }
        }
    }

    fn del(&self, table: &str, id: &str) {
        if let Some(db) = &self.db {
            if let Err(e) = db.lock().unwrap().execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id]) {
                tracing::error!("sqlite delete from {table} failed: {e}");
            }
        }
    }

    fn save_meta(&self, d: &Data) {
        let a: Vec<(MachinePublic, u32)> = d.allocations.iter().map(|(k, v)| (*k, *v)).collect();
        self.put("meta", "allocations", &a);
        self.put("meta", "next_id", &d.next_id);
    }

    /// A persistent value in the meta table (e.g. the server's private key), created on first use.
    pub fn meta_or_insert(&self, name: &str, make: impl FnOnce() -> String) -> String {
        if let Some(db) = &self.db {
            let got: Option<String> = db
                .lock()
                .unwrap()
                .query_row("SELECT json FROM meta WHERE id = ?1", [name], |r| r.get(0))
                .ok()
                .and_then(|j: String| serde_json::from_str(&j).ok());
            if let Some(v) = got {
                return v;
            }
            let v = make();
            self.put("meta", name, &v);
            return v;
        }
        make()
    }

    fn next_id(d: &mut Data) -> u64 {
        let id = d.next_id;
        d.next_id += 1;
        id
    }

    /// Subscribes to changes of org `user_id`'s nodes.
    pub fn subscribe(&self, user_id: u64) -> watch::Receiver<u64> {
        self.orgs.lock().unwrap().entry(user_id).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Subscribes to every change of any node (interactive registration waits on this).
    pub fn subscribe_all(&self) -> watch::Receiver<u64> {
        self.all.subscribe()
    }

    /// Wakes every stream of org `user_id`.
    pub fn notify(&self, user_id: u64) {
        self.all.send_modify(|g| *g += 1);
        if let Some(tx) = self.orgs.lock().unwrap().get(&user_id) {
            tx.send_modify(|g| *g += 1);
        }
    }

    // ---- users

    pub fn users(&self) -> Vec<User> {
        self.data.lock().unwrap().users.values().cloned().collect()
    }

    pub fn user(&self, id: u64) -> Option<User> {
        self.data.lock().unwrap().users.get(&id).cloned()
    }

    pub fn user_by_name(&self, name: &str) -> Option<User> {
        self.data.lock().unwrap().users.values().find(|u| u.name == name).cloned()
    }

    pub fn create_user(&self, name: &str, display_name: &str) -> Result<User, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_whitespace()) {
            return Err(StoreError::Invalid(format!("invalid user name {name:?}")));
        }
        let mut d = self.data.lock().unwrap();
        if d.users.values().any(|u| u.name == name) {
            return Err(StoreError::Invalid(format!("user {name:?} already exists")));
        }
        let u = User {
            id: Self::next_id(&mut d),
            name: name.to_string(),
            display_name: if display_name.is_empty() { name.to_string() } else { display_name.to_string() },
            created_at: Utc::now(),
        };
        d.users.insert(u.id, u.clone());
        self.put("users", &u.id.to_string(), &u);
        self.save_meta(&d);
        Ok(u)
    }

    pub fn rename_user(&self, id: u64, new: &str) -> Result<User, StoreError> {
        let mut d = self.data.lock().unwrap();
        if d.users.values().any(|u| u.name == new && u.id != id) {
            return Err(StoreError::Invalid(format!("user {new:?} already exists")));
        }
        let u = d.users.get_mut(&id).ok_or_else(|| StoreError::NotFound(format!("user {id}")))?;
        u.name = new.to_string();
        let u = u.clone();
        self.put("users", &id.to_string(), &u);
        drop(d);
        self.notify(id);
        Ok(u)
    }

    pub fn delete_user(&self, id: u64) -> Result<(), StoreError> {
        let mut d = self.data.lock().unwrap();
        if !d.users.contains_key(&id) {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        if d.nodes.values().any(|n| n.user_id == id) {
            return Err(StoreError::Invalid("user still has nodes; delete them first".into()));
        }
        d.users.remove(&id);
        self.del("users", &id.to_string());
        Ok(())
    }

    // ---- pre-auth keys

    pub fn create_key(
        &self,
        user_id: u64,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<DateTime<Utc>>,
        acl_tags: Vec<String>,
    ) -> Result<PreAuthKey, StoreError> {
        let mut d = self.data.lock().unwrap();
        if !d.users.contains_key(&user_id) {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        if let Some(t) = acl_tags.iter().find(|t| !t.starts_with("tag:")) {
            return Err(StoreError::Invalid(format!("tag {t:?} must start with \"tag:\"")));
        }
        let k = PreAuthKey {
            id: Self::next_id(&mut d),
            key: format!("nskey-auth-{}", random_hex(24)),
            user_id,
            reusable,
            ephemeral,
            used: false,
            expiration,
            created_at: Utc::now(),
            acl_tags,
        };
        d.keys.insert(k.id, k.clone());
        self.put("preauthkeys", &k.id.to_string(), &k);
        self.save_meta(&d);
        Ok(k)
    }

    pub fn keys(&self, user_id: Option<u64>) -> Vec<PreAuthKey> {
        self.data.lock().unwrap().keys.values().filter(|k| user_id.is_none_or(|u| k.user_id == u)).cloned().collect()
    }

    pub fn expire_key(&self, key: &str) -> Result<PreAuthKey, StoreError> {
        let mut d = self.data.lock().unwrap();
        let k =
            d.keys.values_mut().find(|k| k.key == key).ok_or_else(|| StoreError::NotFound("pre-auth key".into()))?;
        k.expiration = Some(Utc::now());
        let k = k.clone();
        self.put("preauthkeys", &k.id.to_string(), &k);
        Ok(k)
    }

    // ---- API keys

    /// Creates an API key; returns the full key (shown once) and its record.
    pub fn create_api_key(&self, expiration: Option<DateTime<Utc>>) -> (String, ApiKey) {
        let prefix = random_hex(5);
        let full = format!("nsapi-{prefix}.{}", random_hex(24));
        (full.clone(), self.insert_api_key(&full, expiration))
    }

    /// Registers a given API key (the one `serve --api-key` was started with).
    pub fn insert_api_key(&self, full: &str, expiration: Option<DateTime<Utc>>) -> ApiKey {
        let mut d = self.data.lock().unwrap();
        let hash = sha256_hex(full);
        if let Some(k) = d.api_keys.values().find(|k| k.hash == hash) {
            return k.clone();
        }
        let prefix: String = full.chars().take(12).collect();
        let k = ApiKey { id: Self::next_id(&mut d), prefix, hash, expiration, created_at: Utc::now() };
        d.api_keys.insert(k.id, k.clone());
        self.put("apikeys", &k.id.to_string(), &k);
        self.save_meta(&d);
        k
    }

    pub fn api_keys(&self) -> Vec<ApiKey> {
        self.data.lock().unwrap().api_keys.values().cloned().collect()
    }

    /// True when `full` is a known, unexpired API key.
    pub fn check_api_key(&self, full: &str) -> bool {
        let hash = sha256_hex(full);
        let now = Utc::now();
        self.data.lock().unwrap().api_keys.values().any(|k| k.hash == hash && k.expiration.is_none_or(|e| e > now))
    }

    // ---- nodes

    pub fn nodes(&self, user_id: Option<u64>) -> Vec<Node> {
        self.data.lock().unwrap().nodes.values().filter(|n| user_id.is_none_or(|u| n.user_id == u)).cloned().collect()
    }

    pub fn node(&self, id: u64) -> Option<Node> {
        self.data.lock().unwrap().nodes.get(&id).cloned()
    }

    /// The node registered with this machine key and node key.
    pub fn node_by_keys(&self, mk: &MachinePublic, nk: &NodePublic) -> Option<Node> {
        self.data.lock().unwrap().nodes.values().find(|n| n.machine_key == *mk && n.node_key == *nk).cloned()
    }

    pub fn is_online(&self, id: u64) -> bool {
        self.data.lock().unwrap().sessions.get(&id).copied().unwrap_or(0) > 0
    }

    /// Validates and consumes a pre-auth key; the error text is what the client shows.
    pub fn use_key(&self, key: &str) -> Result<PreAuthKey, String> {
        let mut d = self.data.lock().unwrap();
        let now = Utc::now();
        let Some(k) = d.keys.values_mut().find(|k| k.key == key) else {
            return Err("invalid auth key: not known to this server".into());
        };
        if k.expiration.is_some_and(|e| e <= now) {
            return Err("auth key expired".into());
        }
        if k.used && !k.reusable {
            return Err("auth key already used (it is single-use)".into());
        }
        k.used = true;
        let k = k.clone();
        self.put("preauthkeys", &k.id.to_string(), &k);
        Ok(k)
    }

    /// Creates or re-keys the node of machine `mk` in org `user_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        mk: MachinePublic,
        nk: NodePublic,
        user_id: u64,
        hostinfo: Hostinfo,
        ephemeral: bool,
        tags: Vec<String>,
        auth_key_id: Option<u64>,
        method: &str,
        ipv4_base: Ipv4Addr,
        ipv6_base: Ipv6Addr,
    ) -> Node {
        let mut d = self.data.lock().unwrap();
        let now = Utc::now();
        let old_user = d.nodes.values().find(|n| n.machine_key == mk).map(|n| n.user_id);
        let idx = match d.allocations.get(&mk) {
            Some(i) => *i,
            None => {
                let i = d.allocations.values().max().map(|m| m + 1).unwrap_or(1);
                d.allocations.insert(mk, i);
                i
            }
        };
        let existing = d.nodes.values().find(|n| n.machine_key == mk).map(|n| n.id);
        let want = sanitize_hostname(if hostinfo.hostname.is_empty() { "node" } else { &hostinfo.hostname });
        let given = {
            let taken = |name: &str| d.nodes.values().any(|n| n.given_name == name && Some(n.id) != existing);
            if !taken(&want) {
                want.clone()
            } else {
                (2..).map(|i| format!("{want}-{i}")).find(|c| !taken(c)).expect("unbounded")
            }
        };
        let node = match existing {
            Some(id) => {
                let n = d.nodes.get_mut(&id).expect("exists");
                n.node_key = nk;
                n.user_id = user_id;
                n.hostinfo = hostinfo.clone();
                n.hostname = hostinfo.hostname.clone();
                n.expiry = None;
                n.ephemeral = ephemeral;
                n.tags = tags;
                n.auth_key_id = auth_key_id.or(n.auth_key_id);
                n.clone()
            }
            None => {
                let id = Self::next_id(&mut d);
                let v4 = u32::from(ipv4_base) + idx;
                let v6 = u128::from(ipv6_base) + idx as u128;
                let n = Node {
                    id,
                    machine_key: mk,
                    node_key: nk,
                    disco_key: DiscoPublic::default(),
                    user_id,
                    hostname: hostinfo.hostname.clone(),
                    given_name: given,
                    ipv4: Ipv4Addr::from(v4),
                    ipv6: Ipv6Addr::from(v6),
                    endpoints: vec![],
                    hostinfo,
                    expiry: None,
                    created_at: now,
                    last_seen: None,
                    ephemeral,
                    tags,
                    auth_key_id,
                    register_method: method.to_string(),
                    home_derp: 0,
                };
                d.nodes.insert(id, n.clone());
                n
            }
        };
        self.put("nodes", &node.id.to_string(), &node);
        self.save_meta(&d);
        drop(d);
        self.notify(user_id);
        if let Some(u) = old_user.filter(|u| *u != user_id) {
            self.notify(u);
        }
        node
    }

    /// Applies `f` to node `id`, persists it and wakes its org when `f` reports a change.
    pub fn update_node(&self, id: u64, f: impl FnOnce(&mut Node) -> bool) -> Result<Node, StoreError> {
        let mut d = self.data.lock().unwrap();
        let n = d.nodes.get_mut(&id).ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
        let changed = f(n);
        let n = n.clone();
        drop(d);
        if changed {
            self.put("nodes", &id.to_string(), &n);
            self.notify(n.user_id);
        }
        Ok(n)
    }

    pub fn delete_node(&self, id: u64) -> Result<Node, StoreError> {
        let mut d = self.data.lock().unwrap();
        let n = d.nodes.remove(&id).ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
        d.sessions.remove(&id);
        drop(d);
        self.del("nodes", &id.to_string());
        self.notify(n.user_id);
        Ok(n)
    }

    pub fn rename_node(&self, id: u64, name: &str) -> Result<Node, StoreError> {
        let name = sanitize_hostname(name);
        if self.data.lock().unwrap().nodes.values().any(|n| n.given_name == name && n.id != id) {
            return Err(StoreError::Invalid(format!("name {name:?} is taken")));
        }
        self.update_node(id, |n| {
            n.given_name = name;
            true
        })
    }

    pub fn expire_node(&self, id: u64) -> Result<Node, StoreError> {
        self.update_node(id, |n| {
            n.expiry = Some(Utc::now());
            true
        })
    }

    /// A map stream of node `id` opened (`+1`) or closed (`-1`); online state follows.
    pub fn session(&self, id: u64, open: bool) {
        let mut d = self.data.lock().unwrap();
        let c = d.sessions.entry(id).or_insert(0);
        let was = *c > 0;
        if open {
            *c += 1;
        } else {
            *c = c.saturating_sub(1);
        }
        let now_online = *c > 0;
        drop(d);
        if was != now_online {
            let _ = self.update_node(id, |n| {
                n.last_seen = Some(Utc::now());
                true
            });
        }
    }

    // ---- interactive registration

    pub fn add_pending(&self, p: Pending) -> String {
        let id = random_hex(12);
        self.data.lock().unwrap().pending.insert(id.clone(), p);
        id
    }

    pub fn take_pending(&self, id: &str) -> Option<Pending> {
        let p = self.data.lock().unwrap().pending.remove(id);
        self.all.send_modify(|g| *g += 1);
        p
    }

    pub fn pending(&self, id: &str) -> Option<Pending> {
        self.data.lock().unwrap().pending.get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &Store, mk: u8, user: u64) -> Node {
        s.register(
            MachinePublic([mk; 32]),
            NodePublic([mk; 32]),
            user,
            Hostinfo { hostname: "My Host".into(), ..Default::default() },
            false,
            vec![],
            None,
            "authkey",
            Ipv4Addr::new(100, 64, 0, 0),
            "fd7a:115c:a1e0::".parse().unwrap(),
        )
    }

    #[test]
    fn keys_single_use_expiry_and_sqlite_restart() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("n.db");
        let s = Store::open(Some(&db)).unwrap();
        let u = s.create_user("acme", "").unwrap();
        assert!(s.create_user("acme", "").is_err());
        let k = s.create_key(u.id, false, false, None, vec![]).unwrap();
        assert!(s.use_key(&k.key).is_ok());
        assert!(s.use_key(&k.key).unwrap_err().contains("already used"));
        let e = s.create_key(u.id, true, false, Some(Utc::now() - chrono::Duration::seconds(1)), vec![]).unwrap();
        assert!(s.use_key(&e.key).unwrap_err().contains("expired"));
        assert!(s.use_key("nope").unwrap_err().contains("invalid"));
        let a = reg(&s, 1, u.id);
        let b = reg(&s, 2, u.id);
        assert_eq!(a.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(b.given_name, "my-host-2");
        drop(s);
        let s = Store::open(Some(&db)).unwrap();
        assert_eq!(s.nodes(None).len(), 2);
        s.delete_node(a.id).unwrap();
        // Same machine key → same address after re-registration.
        assert_eq!(reg(&s, 1, u.id).ipv4, a.ipv4);
        assert_eq!(reg(&s, 3, u.id).ipv4, Ipv4Addr::new(100, 64, 0, 3));
    }
}
