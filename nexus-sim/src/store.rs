//! nexus-sim's data: users (orgs), pre-auth keys, nodes, API keys and stable address
//! allocations. In memory, optionally mirrored to SQLite (one table per kind, a JSON column per
//! row) so a restart with `--db` keeps everything. Change notification is per org: every
//! change of a node is appended to its org's bounded change log ([`Change`]), and only that
//! org's watchers wake; map streams turn the log into delta messages.

use chrono::{DateTime, Utc};
use citadel_proto::keys::{DiscoPublic, MachinePublic, NodePublic};
use citadel_proto::tailcfg::Hostinfo;
use citadel_proto::wall;
use parking_lot::Mutex;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::watch;

/// An org (Headscale user).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    /// Id.
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// Name to show.
    pub display_name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A pre-auth key. Only its prefix and hash are kept (as Headscale does); `key` holds the full
/// text only in the value [`Store::create_key`] returns, to be shown once.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct PreAuthKey {
    /// Id.
    pub id: u64,
    /// The full key, right after creation; empty otherwise. Never written to the database
    /// (read only to migrate rows from before keys were hashed).
    #[serde(default, skip_serializing)]
    pub key: String,
    /// The public part of the key (`nskey-auth-<prefix>-…`), for listing and lookup.
    #[serde(default)]
    pub prefix: String,
    /// SHA-256 of the full key, hex.
    #[serde(default)]
    pub hash: String,
    /// Org the key registers nodes into.
    pub user_id: u64,
    /// Usable more than once.
    pub reusable: bool,
    /// Nodes it registers are removed once offline.
    pub ephemeral: bool,
    /// Used at least once.
    pub used: bool,
    /// When it stops working.
    pub expiration: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Tags its nodes get.
    pub acl_tags: Vec<String>,
}

impl std::fmt::Debug for PreAuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuthKey")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .field("user_id", &self.user_id)
            .field("reusable", &self.reusable)
            .field("ephemeral", &self.ephemeral)
            .field("used", &self.used)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl PreAuthKey {
    /// How listings show the key: its prefix, the secret masked.
    pub fn masked(&self) -> String {
        format!("{PREAUTH_PREFIX}{}-***", self.prefix)
    }
}

const PREAUTH_PREFIX: &str = "nskey-auth-";
const PREAUTH_PREFIX_LEN: usize = 12;

/// The lookup prefix of a presented pre-auth key (also right for keys made before hashing,
/// `nskey-auth-<48 hex>`, whose first 12 hex digits became their prefix).
fn preauth_prefix(full: &str) -> Option<&str> {
    full.strip_prefix(PREAUTH_PREFIX)?.get(..PREAUTH_PREFIX_LEN)
}

/// Constant-time equality of two hex digests.
fn same_hash(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A registered node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    /// Id (stable).
    pub id: u64,
    /// Machine key (Noise identity).
    pub machine_key: MachinePublic,
    /// Current node key.
    pub node_key: NodePublic,
    /// Disco key it last reported.
    pub disco_key: DiscoPublic,
    /// Org (user) it belongs to.
    pub user_id: u64,
    /// Host name it reported.
    pub hostname: String,
    /// DNS label, unique on the server.
    pub given_name: String,
    /// Mesh IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Mesh IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Endpoints it last reported.
    pub endpoints: Vec<String>,
    /// Hostinfo it last reported.
    pub hostinfo: Hostinfo,
    /// Node-key expiry, if any.
    pub expiry: Option<DateTime<Utc>>,
    /// When it registered.
    pub created_at: DateTime<Utc>,
    /// When it last went online or offline.
    pub last_seen: Option<DateTime<Utc>>,
    /// Removed once offline (ephemeral).
    pub ephemeral: bool,
    /// ACL tags.
    pub tags: Vec<String>,
    /// Pre-auth key it registered with.
    pub auth_key_id: Option<u64>,
    /// How it registered (`authkey`, `cli`, ...).
    pub register_method: String,
    /// Home DERP region the node reports (0 = none).
    #[serde(default)]
    pub home_derp: i32,
    /// Routes an admin approved (`nodes approve-routes`); served when also advertised.
    #[serde(default)]
    pub approved_routes: Vec<String>,
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
    /// Id.
    pub id: u64,
    /// Public prefix (`nsapi-<prefix>.`).
    pub prefix: String,
    /// SHA-256 of the full key, hex.
    pub hash: String,
    /// When it stops working.
    pub expiration: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A node waiting for an admin to approve it (`/register/{id}`).
#[derive(Debug, Clone)]
pub struct Pending {
    /// Machine key of the waiting client.
    pub machine_key: MachinePublic,
    /// Node key of the waiting client.
    pub node_key: NodePublic,
    /// Hostinfo it sent.
    pub hostinfo: Hostinfo,
    /// It asked to be ephemeral.
    pub ephemeral: bool,
    /// When it asked.
    pub created: DateTime<Utc>,
}

/// Most interactive registrations waiting for approval at once.
pub const MAX_PENDING: usize = 1024;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    /// The named thing does not exist.
    NotFound(String),
    #[error("{0}")]
    /// The request is not valid.
    Invalid(String),
    #[error("database: {0}")]
    /// SQLite failed.
    Db(#[from] rusqlite::Error),
    /// No address is left in the configured range.
    #[error("address range exhausted: {0}")]
    Exhausted(String),
}

#[derive(Default)]
struct Data {
    users: BTreeMap<u64, User>,
    keys: BTreeMap<u64, PreAuthKey>,
    /// Node records, shared with readers that hold them across a lock release.
    nodes: BTreeMap<u64, Arc<Node>>,
    api_keys: BTreeMap<u64, ApiKey>,
    /// machine key → allocation index (stable addresses across re-registration).
    allocations: BTreeMap<MachinePublic, u32>,
    next_id: u64,
    /// Open map streams per node (online while > 0).
    sessions: HashMap<u64, u32>,
    pending: HashMap<String, Pending>,
    /// SHA-256 of the admin keys this process was started with (never persisted or listed).
    config_api_keys: Vec<String>,
    /// Node ids per org.
    by_org: HashMap<u64, BTreeSet<u64>>,
    /// The addresses of each org's untagged nodes, kept with `by_org`: a join would otherwise
    /// look up every member of its org (10,000 lookups in a large one) to rebuild the org's
    /// packet filter sources.
    org_addrs: HashMap<u64, crate::policy::ipset::IpSet>,
    /// Node id per node key.
    by_key: HashMap<NodePublic, u64>,
    /// Node id per machine key.
    by_machine: HashMap<MachinePublic, u64>,
    /// Node id per given (DNS) name.
    by_name: HashMap<String, u64>,
    /// Highest allocation index handed out; `None` until the first registration reads it.
    max_alloc: Option<u32>,
    /// Every node key expiry, in time order (what [`Store::announce_expired`] reads).
    expiries: BTreeSet<(DateTime<Utc>, u64)>,
    /// New nodes registered but not yet told to their org (see [`Store::register_unannounced`]);
    /// each leaves at its first map stream, its grace or its deletion.
    unannounced: HashSet<u64>,
}

impl Data {
    fn index(&mut self, n: &Node) {
        self.by_org.entry(n.user_id).or_default().insert(n.id);
        if n.tags.is_empty() {
            let set = self.org_addrs.entry(n.user_id).or_default();
            set.add_ip(n.ipv4.into());
            set.add_ip(n.ipv6.into());
        }
        self.by_key.insert(n.node_key, n.id);
        self.by_machine.insert(n.machine_key, n.id);
        self.by_name.insert(n.given_name.clone(), n.id);
        self.move_expiry(n.id, None, n.expiry);
    }

    /// Keeps node `id`'s entry of the expiry index at `to` (it was at `from`).
    fn move_expiry(&mut self, id: u64, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) {
        if from == to {
            return;
        }
        if let Some(e) = from {
            self.expiries.remove(&(e, id));
        }
        if let Some(e) = to {
            self.expiries.insert((e, id));
        }
    }

    fn unindex(&mut self, n: &Node) {
        self.move_expiry(n.id, n.expiry, None);
        if let Some(set) = self.by_org.get_mut(&n.user_id) {
            set.remove(&n.id);
            if set.is_empty() {
                self.by_org.remove(&n.user_id);
            }
        }
        if let Some(set) = self.org_addrs.get_mut(&n.user_id) {
            if n.tags.is_empty() {
                set.remove_ip(n.ipv4.into());
                set.remove_ip(n.ipv6.into());
            }
            if set.is_empty() {
                self.org_addrs.remove(&n.user_id);
            }
        }
        if self.by_key.get(&n.node_key) == Some(&n.id) {
            self.by_key.remove(&n.node_key);
        }
        if self.by_machine.get(&n.machine_key) == Some(&n.id) {
            self.by_machine.remove(&n.machine_key);
        }
        if self.by_name.get(&n.given_name) == Some(&n.id) {
            self.by_name.remove(&n.given_name);
        }
    }

    /// The node with this id, shared.
    fn node(&self, id: u64) -> Option<&Arc<Node>> {
        self.nodes.get(&id)
    }
}

/// Fields of a node whose change map streams send as a patch (Tailscale's `PeerChange`)
/// instead of the whole node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodePatch {
    /// New endpoints.
    pub endpoints: Option<Vec<String>>,
    /// New home DERP region.
    pub home_derp: Option<i32>,
    /// New disco key.
    pub disco_key: Option<DiscoPublic>,
    /// New online state.
    pub online: Option<bool>,
    /// New last-seen time.
    pub last_seen: Option<DateTime<Utc>>,
}

impl NodePatch {
    /// The patch turning `old` into `new`, or `None` when something outside the patchable
    /// fields changed too (then the whole node must be sent).
    fn between(old: &Node, new: &Node) -> Option<NodePatch> {
        let mut rest = old.clone();
        rest.endpoints = new.endpoints.clone();
        rest.home_derp = new.home_derp;
        rest.disco_key = new.disco_key;
        rest.last_seen = new.last_seen;
        if rest != *new {
            return None;
        }
        Some(NodePatch {
            endpoints: (old.endpoints != new.endpoints).then(|| new.endpoints.clone()),
            home_derp: (old.home_derp != new.home_derp).then_some(new.home_derp),
            disco_key: (old.disco_key != new.disco_key).then_some(new.disco_key),
            online: None,
            last_seen: (old.last_seen != new.last_seen).then_some(new.last_seen).flatten(),
        })
    }

    /// Folds a later patch into this one.
    pub fn merge(&mut self, later: &NodePatch) {
        if later.endpoints.is_some() {
            self.endpoints.clone_from(&later.endpoints);
        }
        self.home_derp = later.home_derp.or(self.home_derp);
        self.disco_key = later.disco_key.or(self.disco_key);
        self.online = later.online.or(self.online);
        self.last_seen = later.last_seen.or(self.last_seen);
    }
}

/// One entry of an org's change log.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Node added, or changed beyond what a patch carries: send its whole entry.
    Upsert(u64),
    /// Node deleted or moved to another org.
    Removed(u64),
    /// Only the patch's fields of the node changed.
    Patch(u64, NodePatch),
    /// Something every map of the org shows changed (the org's own profile).
    Resync,
}

/// Changes kept per org; a stream further behind than this gets a full map instead.
pub const ORG_LOG_LEN: usize = 4096;

/// What [`Store::org_changes`] found after a cursor.
#[derive(Debug)]
pub enum Since {
    /// The changes after the cursor, oldest first.
    Changes(Vec<Arc<Change>>),
    /// The log no longer reaches back to the cursor.
    Lagged,
}

struct OrgLog {
    /// Wakes the org's streams; its value follows `last` (set after the lock is released, so
    /// it can trail the log for a moment).
    seq: watch::Sender<u64>,
    /// The org's changes, numbered.
    changes: ChangeLog,
    /// Sequence number of the last change that can alter membership (not a patch).
    member_gen: u64,
    /// The org's untagged members' addresses as a minimal prefix list and as a set, for
    /// `member_gen`.
    sources: Option<(u64, Arc<Vec<String>>, Arc<crate::policy::ipset::IpSet>)>,
    /// Ids of the nodes that left the org (deleted or moved), the latest [`ORG_GONE_LEN`]: a
    /// stream that fell behind the log may still show them.
    gone: VecDeque<u64>,
}

/// Departed node ids remembered per org.
pub const ORG_GONE_LEN: usize = 4096;

impl Default for OrgLog {
    fn default() -> Self {
        OrgLog {
            seq: watch::channel(0).0,
            changes: ChangeLog::default(),
            member_gen: 0,
            sources: None,
            gone: VecDeque::new(),
        }
    }
}

/// What a registration asks for: the machine and node keys, the org, what the node says of
/// itself and how it registered (see [`Store::register`]).
pub struct Registration<'a> {
    /// The machine's key (the Noise session's).
    pub mk: MachinePublic,
    /// The node key it registers.
    pub nk: NodePublic,
    /// The org (user) it joins.
    pub user_id: u64,
    /// What the node says about itself.
    pub hostinfo: Hostinfo,
    /// Removed once it goes offline.
    pub ephemeral: bool,
    /// ACL tags (from its auth key).
    pub tags: Vec<String>,
    /// The auth key it used, if any.
    pub auth_key_id: Option<u64>,
    /// How it registered (`authkey`, `cli`, ...).
    pub method: &'a str,
    /// Where the tailnet's IPv4 addresses start.
    pub ipv4_base: Ipv4Addr,
    /// Where the tailnet's IPv6 addresses start.
    pub ipv6_base: Ipv6Addr,
}

/// The shared store.
#[derive(Clone)]
pub struct Store {
    data: Arc<Mutex<Data>>,
    db: Option<Arc<Mutex<rusqlite::Connection>>>,
    orgs: Arc<Mutex<HashMap<u64, OrgLog>>>,
    /// Every org's changes in one log, for map streams whose policy lets peers span orgs.
    /// Locked only inside `orgs`' lock, so both logs take a change in the same order.
    all_log: Arc<Mutex<ChangeLog>>,
    /// Changes with every write map streams may see, after the logs hold the change, so its
    /// watchers find the change when woken.
    all: watch::Sender<u64>,
    /// The store's version: moves on with every write map streams or the policy compile may
    /// see, before the logs hold the change (see [`Store::version`]).
    version: Arc<std::sync::atomic::AtomicU64>,
}

/// [`Store`]'s log of every org's changes (see [`Store::all_changes`]).
#[derive(Default)]
struct ChangeLog {
    last: u64,
    log: VecDeque<(u64, Arc<Change>)>,
}

impl ChangeLog {
    fn push(&mut self, c: Arc<Change>, keep: usize) -> u64 {
        self.last += 1;
        self.log.push_back((self.last, c));
        while self.log.len() > keep {
            self.log.pop_front();
        }
        self.last
    }

    /// The sequence number now and the changes after `cursor`.
    fn since(&self, cursor: u64) -> (u64, Since) {
        let now = self.last;
        if now <= cursor {
            return (now, Since::Changes(vec![]));
        }
        // The log holds consecutive sequence numbers ending at `now`.
        let held = self.log.len() as u64;
        if now - cursor > held {
            return (now, Since::Lagged);
        }
        let skip = (held - (now - cursor)) as usize;
        (now, Since::Changes(self.log.iter().skip(skip).map(|(_, c)| c.clone()).collect()))
    }
}

/// Changes kept in the log of every org's changes; a stream further behind gets a full map.
pub const ALL_LOG_LEN: usize = 4096;

/// Meta-table rows holding one machine's address allocation are named this, then the key.
const ALLOC_ROW: &str = "alloc:";

fn alloc_row(mk: &MachinePublic) -> String {
    let key = serde_json::to_value(mk).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    format!("{ALLOC_ROW}{key}")
}

const TABLES: [&str; 5] = ["users", "preauthkeys", "nodes", "apikeys", "meta"];

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Creates the SQLite file 0600 (its -wal and -shm files inherit the mode) and tightens the
/// mode of files left by an older run. Elsewhere than Unix the file system's ACLs decide.
#[cfg(unix)]
fn make_private(db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| StoreError::Invalid(format!("database file {}: {e}", db.display()));
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(db).map_err(io)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn make_private(_db: &Path) -> Result<(), StoreError> {
    Ok(())
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
                make_private(p)?;
                let mut c = rusqlite::Connection::open(p)?;
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
                for (_, mut k) in load::<PreAuthKey>(&c, "preauthkeys")? {
                    if !k.key.is_empty() {
                        // A row from before keys were hashed: keep only prefix and hash.
                        k.prefix = preauth_prefix(&k.key).unwrap_or_default().to_string();
                        k.hash = sha256_hex(&k.key);
                        k.key.clear();
                        let j = serde_json::to_string(&k).map_err(|e| StoreError::Invalid(e.to_string()))?;
                        c.execute(
                            "INSERT OR REPLACE INTO preauthkeys (id, json) VALUES (?1, ?2)",
                            rusqlite::params![k.id.to_string(), j],
                        )?;
                    }
                    data.keys.insert(k.id, k);
                }
                for (_, n) in load::<Node>(&c, "nodes")? {
                    data.index(&n);
                    data.nodes.insert(n.id, Arc::new(n));
                }
                for (_, k) in load::<ApiKey>(&c, "apikeys")? {
                    data.api_keys.insert(k.id, k);
                }
                let mut legacy = vec![];
                for (id, v) in load::<serde_json::Value>(&c, "meta")? {
                    if let Some(mk) = id.strip_prefix(ALLOC_ROW) {
                        let mk: Option<MachinePublic> = serde_json::from_value(mk.into()).ok();
                        if let (Some(mk), Some(i)) = (mk, v.as_u64().and_then(|i| u32::try_from(i).ok())) {
                            data.allocations.insert(mk, i);
                        }
                    } else if id == "allocations" {
                        // The whole list in one row, as older versions wrote it.
                        legacy = serde_json::from_value::<Vec<(MachinePublic, u32)>>(v).unwrap_or_default();
                    } else if id == "next_id" {
                        data.next_id = v.as_u64().unwrap_or(1);
                    }
                }
                if !legacy.is_empty() {
                    let tx = c.transaction()?;
                    for (mk, i) in legacy {
                        data.allocations.entry(mk).or_insert(i);
                    }
                    for (mk, i) in &data.allocations {
                        tx.execute(
                            "INSERT OR REPLACE INTO meta (id, json) VALUES (?1, ?2)",
                            rusqlite::params![alloc_row(mk), i.to_string()],
                        )?;
                    }
                    tx.execute("DELETE FROM meta WHERE id = 'allocations'", [])?;
                    tx.commit()?;
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
        Ok(Store {
            data: Arc::new(Mutex::new(data)),
            db: conn,
            orgs: Default::default(),
            all_log: Default::default(),
            all: watch::channel(0).0,
            version: Default::default(),
        })
    }

    fn put<T: Serialize>(&self, table: &str, id: &str, v: &T) {
        if let Some(db) = &self.db {
            let j = serde_json::to_string(v).expect("serializes");
            if let Err(e) = db.lock().execute(
                &format!("INSERT OR REPLACE INTO {table} (id, json) VALUES (?1, ?2)"),
                rusqlite::params![id, j],
            ) {
                tracing::error!("sqlite write to {table} failed: {e}");
            }
        }
    }

    fn del(&self, table: &str, id: &str) {
        if let Some(db) = &self.db {
            if let Err(e) = db.lock().execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id]) {
                tracing::error!("sqlite delete from {table} failed: {e}");
            }
        }
    }

    /// Writes one row (if any), the id counter and machine `mk`'s address allocation (if
    /// given) in a single transaction, so a crash never leaves a node without its address
    /// allocation or the other way round.
    fn put_with_meta<T: Serialize>(&self, d: &Data, mk: Option<&MachinePublic>, row: Option<(&str, &str, &T)>) {
        let Some(db) = &self.db else { return };
        let mut rows = vec![("meta", "next_id".to_string(), d.next_id.to_string())];
        if let Some((mk, i)) = mk.and_then(|mk| d.allocations.get(mk).map(|i| (mk, i))) {
            rows.push(("meta", alloc_row(mk), i.to_string()));
        }
        if let Some((table, id, v)) = row {
            rows.push((table, id.to_string(), serde_json::to_string(v).expect("serializes")));
        }
        let mut c = db.lock();
        let r = c.transaction().and_then(|tx| {
            for (table, id, j) in &rows {
                tx.execute(
                    &format!("INSERT OR REPLACE INTO {table} (id, json) VALUES (?1, ?2)"),
                    rusqlite::params![id, j],
                )?;
            }
            tx.commit()
        });
        if let Err(e) = r {
            tracing::error!("sqlite write failed: {e}");
        }
    }

    /// A persistent value in the meta table (e.g. the server's private key), created on first use.
    pub fn meta_or_insert(&self, name: &str, make: impl FnOnce() -> String) -> String {
        if let Some(db) = &self.db {
            let got: Option<String> = db
                .lock()
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

    /// Subscribes to changes of org `user_id`'s nodes; the value is the sequence number of the
    /// org's last change whose wake went out (read the changes with [`Store::org_changes`],
    /// which may already hold newer ones).
    pub fn subscribe(&self, user_id: u64) -> watch::Receiver<u64> {
        self.orgs.lock().entry(user_id).or_default().seq.subscribe()
    }

    /// Subscribes to every change of any node (interactive registration waits on this).
    pub fn subscribe_all(&self) -> watch::Receiver<u64> {
        self.all.subscribe()
    }

    /// Wakes every stream of org `user_id` with a [`Change::Resync`].
    pub fn notify(&self, user_id: u64) {
        self.emit(user_id, Change::Resync);
    }

    /// Appends `c` to org `user_id`'s log and to the log of every change, then wakes the
    /// org's watchers and those of every change.
    fn emit(&self, user_id: u64, c: Change) {
        // Before the logs hold the change: a stream that reads it there then finds the store
        // at a later version, so nothing cached at the earlier one can stand for it.
        self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut orgs = self.orgs.lock();
        let org = orgs.entry(user_id).or_default();
        let c = Arc::new(c);
        let seq = org.changes.push(c.clone(), ORG_LOG_LEN);
        if !matches!(*c, Change::Patch(..)) {
            org.member_gen = seq;
        }
        if let Change::Removed(id) = *c {
            org.gone.push_back(id);
            if org.gone.len() > ORG_GONE_LEN {
                org.gone.pop_front();
            }
        }
        self.all_log.lock().push(c, ALL_LOG_LEN);
        let wake = org.seq.clone();
        drop(orgs);
        // Waking a large org's streams takes milliseconds (one task each); under the lock,
        // the streams it woke first would wait for it to read the log. Two changes racing
        // here leave the higher number.
        wake.send_if_modified(|v| {
            let newer = *v < seq;
            if newer {
                *v = seq;
            }
            newer
        });
        self.all.send_modify(|g| *g += 1);
    }

    /// A write no log holds (a node not yet announced, a pending registration): a new version,
    /// and a wake for the watchers of every change.
    fn changed_unlogged(&self) {
        self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.all.send_modify(|g| *g += 1);
    }

    /// The store's version: read it before reading what depends on it (the policy compile's
    /// inputs, the primary routers), and any later write moves it on. A change that a log
    /// holds moved it on before it went into the log.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The sequence number of the newest change of any org (a cursor for
    /// [`Store::all_changes`]).
    pub fn all_seq(&self) -> u64 {
        self.all_log.lock().last
    }

    /// The current sequence number of the log of every org's changes and its changes after
    /// `cursor`.
    pub fn all_changes(&self, cursor: u64) -> (u64, Since) {
        self.all_log.lock().since(cursor)
    }

    /// The sequence number of org `user_id`'s newest change (a cursor for [`Store::org_changes`]).
    pub fn org_seq(&self, user_id: u64) -> u64 {
        self.orgs.lock().get(&user_id).map_or(0, |o| o.changes.last)
    }

    /// The current sequence number of org `user_id` and its changes after `cursor`.
    pub fn org_changes(&self, user_id: u64, cursor: u64) -> (u64, Since) {
        match self.orgs.lock().get(&user_id) {
            Some(org) => org.changes.since(cursor),
            None => (cursor, Since::Changes(vec![])),
        }
    }

    /// The nodes of org `user_id` (by ascending id), without scanning other orgs.
    pub fn org_nodes(&self, user_id: u64) -> Vec<Arc<Node>> {
        self.nodes(Some(user_id))
    }

    /// Ids of the nodes that left org `user_id` lately (deleted or moved; the latest
    /// [`ORG_GONE_LEN`]).
    pub fn org_gone(&self, user_id: u64) -> Vec<u64> {
        self.orgs.lock().get(&user_id).map(|o| o.gone.iter().copied().collect()).unwrap_or_default()
    }

    /// The addresses of org `user_id`'s untagged nodes as a minimal prefix list (what the
    /// built-in policy puts in each member's filter), cached until the membership changes.
    pub fn org_member_sources(&self, user_id: u64) -> Arc<Vec<String>> {
        self.org_members(user_id).0
    }

    /// [`Store::org_member_sources`] as an address set (which routes a member may use),
    /// cached the same way.
    pub fn org_member_set(&self, user_id: u64) -> Arc<crate::policy::ipset::IpSet> {
        self.org_members(user_id).1
    }

    fn org_members(&self, user_id: u64) -> (Arc<Vec<String>>, Arc<crate::policy::ipset::IpSet>) {
        let mut orgs = self.orgs.lock();
        let org = orgs.entry(user_id).or_default();
        if let Some((g, v, set)) = &org.sources {
            if *g == org.member_gen {
                return (v.clone(), set.clone());
            }
        }
        let set = self.data.lock().org_addrs.get(&user_id).cloned().unwrap_or_default();
        let v = Arc::new(set.range_strings());
        let set = Arc::new(set);
        org.sources = Some((org.member_gen, v.clone(), set.clone()));
        (v, set)
    }

    // ---- users

    /// Every user.
    pub fn users(&self) -> Vec<User> {
        self.data.lock().users.values().cloned().collect()
    }

    /// User `id`.
    pub fn user(&self, id: u64) -> Option<User> {
        self.data.lock().users.get(&id).cloned()
    }

    /// The user named `name`.
    pub fn user_by_name(&self, name: &str) -> Option<User> {
        self.data.lock().users.values().find(|u| u.name == name).cloned()
    }

    /// Creates a user (org); names are unique.
    pub fn create_user(&self, name: &str, display_name: &str) -> Result<User, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_whitespace()) {
            return Err(StoreError::Invalid(format!("invalid user name {name:?}")));
        }
        let mut d = self.data.lock();
        if d.users.values().any(|u| u.name == name) {
            return Err(StoreError::Invalid(format!("user {name:?} already exists")));
        }
        let u = User {
            id: Self::next_id(&mut d),
            name: name.to_string(),
            display_name: if display_name.is_empty() { name.to_string() } else { display_name.to_string() },
            created_at: wall::now(),
        };
        d.users.insert(u.id, u.clone());
        self.put_with_meta(&d, None, Some(("users", &u.id.to_string(), &u)));
        drop(d);
        // Users are what a policy resolves its names against.
        self.changed_unlogged();
        Ok(u)
    }

    /// Renames user `id`; its org's maps get the new profile.
    pub fn rename_user(&self, id: u64, new: &str) -> Result<User, StoreError> {
        let mut d = self.data.lock();
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

    /// Deletes user `id`, which must have no nodes.
    pub fn delete_user(&self, id: u64) -> Result<(), StoreError> {
        let mut d = self.data.lock();
        if !d.users.contains_key(&id) {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        if d.by_org.get(&id).is_some_and(|s| !s.is_empty()) {
            return Err(StoreError::Invalid("user still has nodes; delete them first".into()));
        }
        d.users.remove(&id);
        self.del("users", &id.to_string());
        drop(d);
        self.changed_unlogged();
        Ok(())
    }

    // ---- pre-auth keys

    /// Creates a pre-auth key for user `user_id`; the returned value holds the full key once.
    pub fn create_key(
        &self,
        user_id: u64,
        reusable: bool,
        ephemeral: bool,
        expiration: Option<DateTime<Utc>>,
        acl_tags: Vec<String>,
    ) -> Result<PreAuthKey, StoreError> {
        let mut d = self.data.lock();
        if !d.users.contains_key(&user_id) {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        if let Some(t) = acl_tags.iter().find(|t| !t.starts_with("tag:")) {
            return Err(StoreError::Invalid(format!("tag {t:?} must start with \"tag:\"")));
        }
        let prefix = random_hex(PREAUTH_PREFIX_LEN / 2);
        let full = format!("{PREAUTH_PREFIX}{prefix}-{}", random_hex(24));
        let k = PreAuthKey {
            id: Self::next_id(&mut d),
            key: String::new(),
            prefix,
            hash: sha256_hex(&full),
            user_id,
            reusable,
            ephemeral,
            used: false,
            expiration,
            created_at: wall::now(),
            acl_tags,
        };
        d.keys.insert(k.id, k.clone());
        self.put_with_meta(&d, None, Some(("preauthkeys", &k.id.to_string(), &k)));
        Ok(PreAuthKey { key: full, ..k })
    }

    /// Pre-auth keys (of one user, or all).
    pub fn keys(&self, user_id: Option<u64>) -> Vec<PreAuthKey> {
        self.data.lock().keys.values().filter(|k| user_id.is_none_or(|u| k.user_id == u)).cloned().collect()
    }

    /// Expires the key given in full or as its listed (masked) form.
    pub fn expire_key(&self, key: &str) -> Result<PreAuthKey, StoreError> {
        let mut d = self.data.lock();
        let k = match Self::find_key(&mut d, key) {
            Some(k) => k,
            None => d
                .keys
                .values_mut()
                .find(|k| k.masked() == key)
                .ok_or_else(|| StoreError::NotFound("pre-auth key".into()))?,
        };
        k.expiration = Some(wall::now());
        let k = k.clone();
        self.put("preauthkeys", &k.id.to_string(), &k);
        Ok(k)
    }

    // ---- API keys

    /// Creates an API key `nsapi-<prefix>.<secret>`; returns the full key (shown once) and its
    /// record, which holds only the random prefix and the hash.
    pub fn create_api_key(&self, expiration: Option<DateTime<Utc>>) -> (String, ApiKey) {
        let prefix = random_hex(5);
        let full = format!("nsapi-{prefix}.{}", random_hex(24));
        let mut d = self.data.lock();
        let k =
            ApiKey { id: Self::next_id(&mut d), prefix, hash: sha256_hex(&full), expiration, created_at: wall::now() };
        d.api_keys.insert(k.id, k.clone());
        self.put_with_meta(&d, None, Some(("apikeys", &k.id.to_string(), &k)));
        (full, k)
    }

    /// Accepts `keys` (those `serve --api-key` was started with) for this process only: they
    /// are not written to the database and not listed.
    pub fn set_config_api_keys(&self, keys: &[String]) {
        self.data.lock().config_api_keys = keys.iter().map(|k| sha256_hex(k)).collect();
    }

    /// Every stored API key.
    pub fn api_keys(&self) -> Vec<ApiKey> {
        self.data.lock().api_keys.values().cloned().collect()
    }

    /// Expires the API key with this prefix now.
    pub fn expire_api_key(&self, prefix: &str) -> Result<ApiKey, StoreError> {
        let mut d = self.data.lock();
        let k = d
            .api_keys
            .values_mut()
            .find(|k| k.prefix == prefix)
            .ok_or_else(|| StoreError::NotFound(format!("API key {prefix:?}")))?;
        k.expiration = Some(wall::now());
        let k = k.clone();
        self.put("apikeys", &k.id.to_string(), &k);
        Ok(k)
    }

    /// Deletes the API key with this prefix.
    pub fn delete_api_key(&self, prefix: &str) -> Result<(), StoreError> {
        let mut d = self.data.lock();
        let id = d
            .api_keys
            .values()
            .find(|k| k.prefix == prefix)
            .map(|k| k.id)
            .ok_or_else(|| StoreError::NotFound(format!("API key {prefix:?}")))?;
        d.api_keys.remove(&id);
        self.del("apikeys", &id.to_string());
        Ok(())
    }

    /// True when `full` is a key this process was started with, or a stored unexpired one.
    pub fn check_api_key(&self, full: &str) -> bool {
        let hash = sha256_hex(full);
        let now = wall::now();
        let d = self.data.lock();
        let configured = d.config_api_keys.iter().fold(false, |ok, h| ok | same_hash(h, &hash));
        let stored = d
            .api_keys
            .values()
            .fold(false, |ok, k| ok | (same_hash(&k.hash, &hash) && k.expiration.is_none_or(|e| e > now)));
        configured || stored
    }

    // ---- nodes

    /// Every node, or org `user_id`'s, by ascending id (the records are shared, not copied).
    pub fn nodes(&self, user_id: Option<u64>) -> Vec<Arc<Node>> {
        let d = self.data.lock();
        match user_id {
            Some(u) => d.by_org.get(&u).into_iter().flatten().filter_map(|id| d.node(*id).cloned()).collect(),
            None => d.nodes.values().cloned().collect(),
        }
    }

    /// Node `id` (the record is shared, not copied).
    pub fn node(&self, id: u64) -> Option<Arc<Node>> {
        self.data.lock().node(id).cloned()
    }

    /// The nodes with these ids that exist, in the order given.
    pub fn nodes_by_id(&self, ids: &[u64]) -> Vec<Arc<Node>> {
        let d = self.data.lock();
        ids.iter().filter_map(|id| d.node(*id).cloned()).collect()
    }

    /// How many nodes exist.
    pub fn node_count(&self) -> usize {
        self.data.lock().nodes.len()
    }

    /// The node registered with this machine key and node key.
    pub fn node_by_keys(&self, mk: &MachinePublic, nk: &NodePublic) -> Option<Node> {
        let d = self.data.lock();
        d.by_key.get(nk).and_then(|id| d.node(*id)).filter(|n| n.machine_key == *mk).map(|n| (**n).clone())
    }

    /// Ids of every node.
    pub fn node_ids(&self) -> Vec<u64> {
        self.data.lock().nodes.keys().copied().collect()
    }

    /// The id of the registered node holding node key `nk` if its key has not expired at `now`
    /// (a lookup without copying the record: the DERP server asks it for every client).
    pub fn live_node_id(&self, nk: &NodePublic, now: DateTime<Utc>) -> Option<u64> {
        let d = self.data.lock();
        d.by_key.get(nk).and_then(|id| d.node(*id)).filter(|n| !n.is_expired(now)).map(|n| n.id)
    }

    /// The node holding node key `nk`.
    pub fn node_by_node_key(&self, nk: &NodePublic) -> Option<Node> {
        let d = self.data.lock();
        d.by_key.get(nk).and_then(|id| d.node(*id)).map(|n| (**n).clone())
    }

    /// True while node `id` has a map stream open.
    pub fn is_online(&self, id: u64) -> bool {
        self.data.lock().sessions.get(&id).copied().unwrap_or(0) > 0
    }

    /// The key whose prefix and hash match `full`.
    fn find_key<'a>(d: &'a mut Data, full: &str) -> Option<&'a mut PreAuthKey> {
        // SHA-256 (not a slow hash) is enough: the secret part is 192 random bits.
        let prefix = preauth_prefix(full)?;
        let hash = sha256_hex(full);
        d.keys.values_mut().find(|k| k.prefix == prefix && same_hash(&k.hash, &hash))
    }

    /// Validates and consumes a pre-auth key; the error text is what the client shows.
    pub fn use_key(&self, key: &str) -> Result<PreAuthKey, String> {
        let mut d = self.data.lock();
        let now = wall::now();
        let Some(k) = Self::find_key(&mut d, key) else {
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

    /// Creates or re-keys the node of machine `mk` in org `user_id`; its org's members learn of
    /// it at once.
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
    ) -> Result<Node, StoreError> {
        let r = Registration { mk, nk, user_id, hostinfo, ephemeral, tags, auth_key_id, method, ipv4_base, ipv6_base };
        self.register_as(r, false)
    }

    /// [`Store::register`] for a client that opens its map stream next (a ts2021 registration):
    /// a *new* node is told to its org's members with that stream (by [`Store::update_node_and_open`]),
    /// in one change with its endpoints and online state, or by [`Store::announce`] if the
    /// stream never comes. Told at registration, a join reached every member twice, the node and
    /// then its endpoints, and in a large org the second fan-out often ran behind the first one
    /// (the stream's request waited behind the members' deltas), doubling the join's cost. A
    /// re-keyed node is told at once, as by [`Store::register`]. Updates before the stream
    /// (expiry, approved routes, a "lite" endpoint update) are kept and go with it.
    pub fn register_unannounced(&self, r: Registration<'_>) -> Result<Node, StoreError> {
        self.register_as(r, true)
    }

    /// Tells node `id`'s org about it if it is still unannounced (its grace ran out before its
    /// first map stream); otherwise nothing.
    pub fn announce(&self, id: u64) {
        let org = {
            let mut d = self.data.lock();
            if !d.unannounced.remove(&id) {
                return;
            }
            d.nodes.get(&id).map(|n| n.user_id)
        };
        if let Some(org) = org {
            self.emit(org, Change::Upsert(id));
        }
    }

    fn register_as(&self, r: Registration<'_>, defer: bool) -> Result<Node, StoreError> {
        let Registration { mk, nk, user_id, hostinfo, ephemeral, tags, auth_key_id, method, ipv4_base, ipv6_base } = r;
        if nk.is_zero() {
            return Err(StoreError::Invalid("empty node key".into()));
        }
        let mut d = self.data.lock();
        if d.by_key.get(&nk).and_then(|id| d.node(*id)).is_some_and(|n| n.machine_key != mk) {
            return Err(StoreError::Invalid(format!("node key {nk} is registered to another machine")));
        }
        let now = wall::now();
        let existing = d.by_machine.get(&mk).copied();
        let old_user = existing.and_then(|id| d.node(id)).map(|n| n.user_id);
        if d.max_alloc.is_none() {
            // Once per process: nodes whose allocation was lost (a database written before
            // registrations were one transaction) keep their address, so rebuild the allocation
            // from it; every later registration writes both together.
            let orphans: Vec<(MachinePublic, u32)> = d
                .nodes
                .values()
                .filter(|n| !d.allocations.contains_key(&n.machine_key))
                .filter_map(|n| u32::from(n.ipv4).checked_sub(u32::from(ipv4_base)).map(|i| (n.machine_key, i)))
                .collect();
            d.allocations.extend(orphans);
            d.max_alloc = Some(d.allocations.values().max().copied().unwrap_or(0));
        }
        let idx = match d.allocations.get(&mk) {
            Some(i) => *i,
            None => {
                // Indexes are never reused (a machine keeps its address), so the next is max + 1
                // and the range ends where the IPv4 address would wrap.
                let last = u32::MAX - u32::from(ipv4_base);
                let i = d.max_alloc.unwrap_or(0).checked_add(1).filter(|i| *i <= last);
                let i = i.ok_or_else(|| {
                    StoreError::Exhausted(format!("no IPv4 address left after {ipv4_base} ({last} allocated)"))
                })?;
                d.allocations.insert(mk, i);
                d.max_alloc = Some(i);
                i
            }
        };
        let want = sanitize_hostname(if hostinfo.hostname.is_empty() { "node" } else { &hostinfo.hostname });
        let given = {
            let taken = |name: &str| d.by_name.get(name).is_some_and(|id| Some(*id) != existing);
            if !taken(&want) {
                want.clone()
            } else {
                (2..).map(|i| format!("{want}-{i}")).find(|c| !taken(c)).expect("unbounded")
            }
        };
        let node = match existing {
            Some(id) => {
                let old = d.nodes.get(&id).expect("exists").clone();
                d.unindex(&old);
                let n = Arc::make_mut(d.nodes.get_mut(&id).expect("exists"));
                n.node_key = nk;
                n.user_id = user_id;
                n.hostinfo = hostinfo.clone();
                n.hostname = hostinfo.hostname.clone();
                n.expiry = None;
                n.ephemeral = ephemeral;
                n.tags = tags;
                n.auth_key_id = auth_key_id.or(n.auth_key_id);
                let n = n.clone();
                d.index(&n);
                n
            }
            None => {
                let id = Self::next_id(&mut d);
                let v4 = u32::from(ipv4_base).saturating_add(idx);
                let v6 = u128::from(ipv6_base).saturating_add(u128::from(idx));
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
                    approved_routes: vec![],
                };
                d.index(&n);
                d.nodes.insert(id, Arc::new(n.clone()));
                n
            }
        };
        self.put_with_meta(&d, Some(&mk), Some(("nodes", &node.id.to_string(), &node)));
        let defer = defer && existing.is_none();
        if defer {
            d.unannounced.insert(node.id);
        } else {
            // Told now (a re-registration before its stream also tells an unannounced node).
            d.unannounced.remove(&node.id);
        }
        drop(d);
        if let Some(u) = old_user.filter(|u| *u != user_id) {
            self.emit(u, Change::Removed(node.id));
        }
        if defer {
            self.changed_unlogged();
        } else {
            self.emit(user_id, Change::Upsert(node.id));
        }
        Ok(node)
    }

    /// Applies `f` to node `id`, persists it and wakes its org when `f` reports a change.
    pub fn update_node(&self, id: u64, f: impl FnOnce(&mut Node) -> bool) -> Result<Node, StoreError> {
        self.update(id, f, false)
    }

    /// [`Store::update_node`] for a map stream that opens: the stream is counted as
    /// [`Store::session`] counts it, and the node coming online goes to its org in the same
    /// change as `f`'s (endpoints, disco key), so each peer's stream sends one delta for the
    /// connect, not two. The caller closes it with `session(id, false)`.
    pub fn update_node_and_open(&self, id: u64, f: impl FnOnce(&mut Node) -> bool) -> Result<Node, StoreError> {
        self.update(id, f, true)
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Node) -> bool, open: bool) -> Result<Node, StoreError> {
        let mut d = self.data.lock();
        let old = d.nodes.get(&id).ok_or_else(|| StoreError::NotFound(format!("node {id}")))?.clone();
        let mut n = (*old).clone();
        let changed = f(&mut n);
        let came_online = open && {
            let c = d.sessions.entry(id).or_insert(0);
            *c += 1;
            *c == 1
        };
        if came_online {
            n.last_seen = Some(wall::now());
        }
        d.nodes.insert(id, Arc::new(n.clone()));
        if changed {
            d.unindex(&old);
            d.index(&n);
        } else {
            // Told to nobody, but the expiry index follows the record.
            d.move_expiry(id, old.expiry, n.expiry);
        }
        // Not told to its org yet (see `register_unannounced`): the first stream tells it, with
        // whatever changed before; other updates only wait for that.
        let unannounced = d.unannounced.contains(&id);
        if unannounced && open {
            d.unannounced.remove(&id);
        }
        drop(d);
        if unannounced {
            if changed || came_online {
                self.put("nodes", &id.to_string(), &n);
            }
            if open {
                self.emit(n.user_id, Change::Upsert(id));
            } else {
                self.changed_unlogged();
            }
            return Ok(n);
        }
        if changed || came_online {
            self.put("nodes", &id.to_string(), &n);
            if old.user_id != n.user_id {
                self.emit(old.user_id, Change::Removed(id));
            }
            match NodePatch::between(&old, &n) {
                _ if old.user_id != n.user_id => self.emit(n.user_id, Change::Upsert(id)),
                Some(mut p) => {
                    if came_online {
                        p.online = Some(true);
                    }
                    if p == NodePatch::default() {
                        self.changed_unlogged();
                    } else {
                        self.emit(n.user_id, Change::Patch(id, p));
                    }
                }
                None => self.emit(n.user_id, Change::Upsert(id)),
            }
        }
        Ok(n)
    }

    /// Deletes node `id`; its org's maps drop it.
    pub fn delete_node(&self, id: u64) -> Result<Node, StoreError> {
        let mut d = self.data.lock();
        let n = d.nodes.remove(&id).ok_or_else(|| StoreError::NotFound(format!("node {id}")))?;
        let n = Arc::unwrap_or_clone(n);
        d.unindex(&n);
        d.sessions.remove(&id);
        d.unannounced.remove(&id);
        drop(d);
        self.del("nodes", &id.to_string());
        self.emit(n.user_id, Change::Removed(id));
        Ok(n)
    }

    /// Sets node `id`'s DNS label (sanitized; must be free).
    pub fn rename_node(&self, id: u64, name: &str) -> Result<Node, StoreError> {
        let name = sanitize_hostname(name);
        if self.data.lock().by_name.get(&name).is_some_and(|o| *o != id) {
            return Err(StoreError::Invalid(format!("name {name:?} is taken")));
        }
        self.update_node(id, |n| {
            n.given_name = name;
            true
        })
    }

    /// Replaces node `id`'s approved routes (already checked by [`crate::routes::parse_approved`]).
    pub fn set_approved_routes(&self, id: u64, routes: Vec<String>) -> Result<Node, StoreError> {
        self.update_node(id, |n| {
            let changed = n.approved_routes != routes;
            n.approved_routes = routes;
            changed
        })
    }

    /// Replaces node `id`'s tags (Headscale's forced tags: an admin's word, not checked
    /// against `tagOwners`). Each must be `tag:` and 1-64 of a-z, 0-9, `-` and `_`.
    pub fn set_tags(&self, id: u64, tags: Vec<String>) -> Result<Node, StoreError> {
        let ok = |t: &str| {
            t.strip_prefix("tag:").is_some_and(|n| {
                !n.is_empty() && n.len() <= 64 && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            })
        };
        if let Some(bad) = tags.iter().find(|t| !ok(t)) {
            return Err(StoreError::Invalid(format!("tag {bad:?}: use tag:NAME (a-z, 0-9, '-', '_')")));
        }
        let mut tags = tags;
        tags.sort();
        tags.dedup();
        self.update_node(id, |n| {
            let changed = n.tags != tags;
            n.tags = tags;
            changed
        })
    }

    /// Moves node `id` to user (org) `user_id`: its old org's peers lose it, the new org's gain it.
    pub fn move_node(&self, id: u64, user_id: u64) -> Result<Node, StoreError> {
        if self.user(user_id).is_none() {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        self.update_node(id, |n| {
            let changed = n.user_id != user_id;
            n.user_id = user_id;
            changed
        })
    }

    /// Tells each org about its nodes whose key expired in `(after, now]`, one whole-entry change
    /// each: every peer's map then shows the node expired and its data plane drops the tunnel,
    /// as Headscale tells peers, instead of only at their next full map. Nodes not yet announced
    /// to their org stay untold. Returns the next expiry after `now`, if any. Time is passed in
    /// (the server's timer task calls it; tests call it with their own clock).
    pub fn announce_expired(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (due, next) = {
            let d = self.data.lock();
            let due: Vec<(u64, u64)> = d
                .expiries
                .range((Excluded((after, u64::MAX)), Included((now, u64::MAX))))
                .filter(|(_, id)| !d.unannounced.contains(id))
                .filter_map(|(_, id)| d.nodes.get(id).map(|n| (n.user_id, *id)))
                .collect();
            let next = d.expiries.range((Excluded((now, u64::MAX)), Unbounded)).next().map(|(e, _)| *e);
            (due, next)
        };
        for (org, id) in due {
            self.emit(org, Change::Upsert(id));
        }
        next
    }

    /// Expires node `id`'s key at `at` (`None`: now). Members drop the node when the time
    /// passes: Nexus tells them then (`announce_expired`), and their own clocks agree.
    pub fn expire_node(&self, id: u64, at: Option<DateTime<Utc>>) -> Result<Node, StoreError> {
        self.update_node(id, |n| {
            n.expiry = Some(at.unwrap_or_else(wall::now));
            true
        })
    }

    /// A map stream of node `id` opened (`+1`) or closed (`-1`); online state follows.
    pub fn session(&self, id: u64, open: bool) {
        if open {
            // An unknown node has no session to count.
            let _ = self.update(id, |_| false, true);
            return;
        }
        let mut d = self.data.lock();
        let Some(c) = d.sessions.get_mut(&id) else { return };
        let was = *c > 0;
        *c = c.saturating_sub(1);
        if !was || *c > 0 {
            return;
        }
        let Some(n) = d.nodes.get_mut(&id).map(Arc::make_mut) else { return };
        n.last_seen = Some(wall::now());
        let n = n.clone();
        drop(d);
        self.put("nodes", &id.to_string(), &n);
        let p = NodePatch { online: Some(false), last_seen: n.last_seen, ..Default::default() };
        self.emit(n.user_id, Change::Patch(id, p));
    }

    // ---- interactive registration

    /// Records a registration waiting for approval. Expired ones are dropped first; when
    /// [`MAX_PENDING`] are still waiting the request is refused (strangers cannot grow it).
    pub fn add_pending(&self, p: Pending, ttl: std::time::Duration) -> Result<String, StoreError> {
        let mut d = self.data.lock();
        Self::prune_pending_locked(&mut d, p.created, ttl);
        if d.pending.len() >= MAX_PENDING {
            return Err(StoreError::Exhausted(format!(
                "{MAX_PENDING} registrations are already waiting for approval; try again later"
            )));
        }
        let id = random_hex(12);
        d.pending.insert(id.clone(), p);
        Ok(id)
    }

    fn prune_pending_locked(d: &mut Data, now: DateTime<Utc>, ttl: std::time::Duration) {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        d.pending.retain(|_, p| p.created + ttl > now);
    }

    /// Drops pending registrations older than `ttl`.
    pub fn prune_pending(&self, now: DateTime<Utc>, ttl: std::time::Duration) {
        Self::prune_pending_locked(&mut self.data.lock(), now, ttl);
    }

    /// How many registrations wait for approval.
    pub fn pending_count(&self) -> usize {
        self.data.lock().pending.len()
    }

    /// Takes the waiting registration `id` (to approve or refuse it).
    pub fn take_pending(&self, id: &str) -> Option<Pending> {
        let p = self.data.lock().pending.remove(id);
        self.changed_unlogged();
        p
    }

    /// The waiting registration `id`, if still waiting.
    pub fn pending(&self, id: &str) -> Option<Pending> {
        self.data.lock().pending.get(id).cloned()
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
        .unwrap()
    }

    /// Opens a map stream of node `id` that reports `ep` as its endpoints.
    fn open_with_endpoints(s: &Store, id: u64, ep: &[String]) -> Node {
        s.update_node_and_open(id, |n| {
            n.endpoints = ep.to_vec();
            true
        })
        .unwrap()
    }

    #[test]
    fn a_panic_inside_an_update_leaves_the_store_usable() {
        let s = Store::open(None).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let a = reg(&s, 1, u.id);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.update_node(a.id, |_| panic!("a bug in an update closure"));
        }));
        assert!(r.is_err());
        assert_eq!(s.nodes(None).len(), 1);
        assert_eq!(s.user(u.id).unwrap().name, "acme");
    }

    /// The org's filter sources follow its untagged members through joins, tagging, moves,
    /// re-registration into another org and deletion, and are rebuilt from a database on start:
    /// always the addresses a scan of the org's nodes finds.
    #[test]
    fn org_sources_follow_membership() {
        let scan = |s: &Store, user: u64| {
            let mut set = crate::policy::ipset::IpSet::default();
            for n in s.org_nodes(user).iter().filter(|n| n.tags.is_empty()) {
                set.add_ip(n.ipv4.into());
                set.add_ip(n.ipv6.into());
            }
            set.range_strings()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nexus.db");
        let s = Store::open(Some(&path)).unwrap();
        let (a, b) = (s.create_user("a", "").unwrap().id, s.create_user("b", "").unwrap().id);
        let n: Vec<Node> = (1..=6).map(|k| reg(&s, k, if k % 2 == 0 { b } else { a })).collect();
        let check = |s: &Store, when: &str| {
            for u in [a, b] {
                assert_eq!(*s.org_member_sources(u), scan(s, u), "org {u} {when}");
            }
        };
        check(&s, "after the joins");
        assert_eq!(s.org_member_sources(a).len(), 6, "three single addresses per family");
        s.set_tags(n[2].id, vec!["tag:server".into()]).unwrap();
        check(&s, "after tagging");
        s.move_node(n[0].id, b).unwrap();
        check(&s, "after a move");
        reg(&s, 5, b);
        check(&s, "after re-registering into the other org");
        s.delete_node(n[3].id).unwrap();
        check(&s, "after a delete");
        s.set_tags(n[2].id, vec![]).unwrap();
        check(&s, "after untagging");
        let before: Vec<_> = [a, b].iter().map(|u| s.org_member_sources(*u)).collect();
        drop(s);
        let s = Store::open(Some(&path)).unwrap();
        check(&s, "after a restart");
        assert_eq!([a, b].iter().map(|u| s.org_member_sources(*u)).collect::<Vec<_>>(), before);
    }

    #[test]
    fn a_stream_opening_with_new_endpoints_is_one_change_for_its_peers() {
        let s = Store::open(None).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let a = reg(&s, 1, u.id);
        let (seq, _) = s.org_changes(u.id, 0);
        let ep = vec!["192.0.2.1:41641".to_string()];
        let n = open_with_endpoints(&s, a.id, &ep);
        assert!(s.is_online(a.id) && n.last_seen.is_some());
        let (_, since) = s.org_changes(u.id, seq);
        let Since::Changes(c) = since else { panic!("lagged") };
        assert_eq!(c.len(), 1, "{c:?}");
        let Change::Patch(id, p) = &*c[0] else { panic!("{c:?}") };
        assert_eq!((*id, p.online, p.endpoints.clone()), (a.id, Some(true), Some(ep.clone())));
        // A second stream of the same node changes nothing; it stays online until both close.
        let (seq, _) = s.org_changes(u.id, 0);
        s.update_node_and_open(a.id, |_| false).unwrap();
        assert_eq!(s.org_changes(u.id, seq).0, seq);
        s.session(a.id, false);
        assert!(s.is_online(a.id));
        s.session(a.id, false);
        assert!(!s.is_online(a.id));
    }

    /// A node registered for a stream reaches its org once, with that stream (endpoints and
    /// online state in the same entry), or when its grace runs out; updates before either wait
    /// for it. A re-keyed node, and one registered otherwise, is told at once.
    #[test]
    fn an_unannounced_node_reaches_its_org_once_with_its_first_stream_or_its_grace() {
        let s = Store::open(None).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let unannounced = |mk: u8, nk: u8| {
            s.register_unannounced(Registration {
                mk: MachinePublic([mk; 32]),
                nk: NodePublic([nk; 32]),
                user_id: u.id,
                hostinfo: Hostinfo { hostname: format!("n{mk}"), ..Default::default() },
                ephemeral: false,
                tags: vec![],
                auth_key_id: None,
                method: "authkey",
                ipv4_base: Ipv4Addr::new(100, 64, 0, 0),
                ipv6_base: "fd7a:115c:a1e0::".parse().unwrap(),
            })
            .unwrap()
        };
        let changes = |from: u64| match s.org_changes(u.id, from) {
            (now, Since::Changes(c)) => (now, c),
            (_, Since::Lagged) => panic!("lagged"),
        };
        let (seq, _) = changes(0);
        let a = unannounced(1, 1);
        // Stored (the API lists it, full maps hold it) but not in the org's log yet, and an
        // update before the stream (the key expiry a registration sets) waits too.
        assert!(s.nodes(None).iter().any(|n| n.id == a.id));
        s.update_node(a.id, |n| {
            n.expiry = Some(Utc::now() + chrono::Duration::days(1));
            true
        })
        .unwrap();
        assert_eq!(changes(seq).0, seq, "nothing told before the stream");
        let ep = vec!["192.0.2.1:41641".to_string()];
        let n = open_with_endpoints(&s, a.id, &ep);
        let (seq2, c) = changes(seq);
        assert_eq!(c.len(), 1, "one change for the join: {c:?}");
        assert!(matches!(&*c[0], Change::Upsert(id) if *id == a.id), "{c:?}");
        assert!(s.is_online(a.id) && n.endpoints == ep && n.expiry.is_some());
        // Its grace running out later tells nothing more.
        s.announce(a.id);
        assert_eq!(changes(seq2).0, seq2);

        // No stream: the grace tells it; the stream afterwards is the usual online patch.
        let b = unannounced(2, 2);
        assert_eq!(changes(seq2).0, seq2);
        s.announce(b.id);
        let (seq3, c) = changes(seq2);
        assert!(c.len() == 1 && matches!(&*c[0], Change::Upsert(id) if *id == b.id), "{c:?}");
        s.update_node_and_open(b.id, |_| false).unwrap();
        let (seq4, c) = changes(seq3);
        assert!(c.len() == 1 && matches!(&*c[0], Change::Patch(id, p) if *id == b.id && p.online == Some(true)));

        // Re-keying a known machine is told at once.
        unannounced(2, 3);
        let (seq5, c) = changes(seq4);
        assert!(c.len() == 1 && matches!(&*c[0], Change::Upsert(id) if *id == b.id), "{c:?}");
        // Re-registered before its stream: told then, and its stream is the online patch.
        let c = unannounced(5, 5);
        unannounced(5, 6);
        let (seq55, ch) = changes(seq5);
        assert!(ch.len() == 1 && matches!(&*ch[0], Change::Upsert(id) if *id == c.id), "{ch:?}");
        s.update_node_and_open(c.id, |_| false).unwrap();
        let (seq5, ch) = changes(seq55);
        assert!(ch.len() == 1 && matches!(&*ch[0], Change::Patch(id, _) if *id == c.id), "{ch:?}");
        // Deleted before its stream or grace: nothing is told of it later.
        let d = unannounced(4, 4);
        s.delete_node(d.id).unwrap();
        let (seq6, _) = changes(seq5);
        s.announce(d.id);
        assert_eq!(changes(seq6).0, seq6);
    }

    #[test]
    fn registering_another_machines_node_key_fails() {
        let s = Store::open(None).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let a = reg(&s, 1, u.id);
        let r = s.register(
            MachinePublic([2; 32]),
            a.node_key,
            u.id,
            Hostinfo::default(),
            false,
            vec![],
            None,
            "authkey",
            Ipv4Addr::new(100, 64, 0, 0),
            "fd7a:115c:a1e0::".parse().unwrap(),
        );
        let e = r.expect_err("a second machine took over a node key");
        assert!(e.to_string().contains("another machine"), "{e}");
        assert_eq!(s.nodes(None).len(), 1);
        assert_eq!(s.node(a.id).unwrap().machine_key, MachinePublic([1; 32]));
        // The owner may re-register its own key.
        assert_eq!(reg(&s, 1, u.id).id, a.id);
    }

    #[test]
    fn address_exhaustion_is_a_clear_error() {
        let s = Store::open(None).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let base = Ipv4Addr::new(255, 255, 255, 253);
        let register = |mk: u8| {
            s.register(
                MachinePublic([mk; 32]),
                NodePublic([mk; 32]),
                u.id,
                Hostinfo::default(),
                false,
                vec![],
                None,
                "authkey",
                base,
                "fd7a:115c:a1e0::".parse().unwrap(),
            )
        };
        let got: Vec<_> = (1..=4u8).map(register).collect();
        assert_eq!(got[0].as_ref().unwrap().ipv4, Ipv4Addr::new(255, 255, 255, 254));
        assert_eq!(got[1].as_ref().unwrap().ipv4, Ipv4Addr::BROADCAST);
        for r in &got[2..] {
            let e = r.as_ref().unwrap_err();
            assert!(matches!(e, StoreError::Exhausted(_)) && e.to_string().contains("address range exhausted"), "{e}");
        }
        // Machines that have an address keep it.
        assert!(register(1).is_ok());
    }

    #[test]
    fn db_holds_no_pre_auth_key_text_and_its_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("n.db");
        let s = Store::open(Some(&db)).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let k = s.create_key(u.id, true, false, None, vec![]).unwrap();
        let secret = k.key.rsplit('-').next().unwrap().to_string();
        assert!(secret.len() >= 32, "{}", k.key);
        // Listing never shows the key either.
        assert!(s.keys(None).iter().all(|l| !format!("{l:?}").contains(&secret)));
        assert!(s.use_key(&k.key).is_ok());
        // A key differing in its last character is refused (the replacement always differs).
        let last = k.key.as_bytes()[k.key.len() - 1];
        let other = if last == b'0' { '1' } else { '0' };
        assert!(s.use_key(&format!("{}{other}", &k.key[..k.key.len() - 1])).is_err());
        let mut files = 0;
        for e in std::fs::read_dir(t.path()).unwrap() {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{} holds the key", p.display());
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
            files += 1;
        }
        assert!(files >= 2, "expected the db and its WAL");
        drop(s);
        // After a restart the key still works (by its hash).
        let s = Store::open(Some(&db)).unwrap();
        assert!(s.use_key(&k.key).is_ok());
    }

    #[test]
    fn a_node_row_without_its_allocation_does_not_lose_its_address() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("n.db");
        let s = Store::open(Some(&db)).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let a = reg(&s, 1, u.id);
        drop(s);
        // A crash after the node row was written and before the allocation was.
        let mut b = a.clone();
        b.id = 99;
        b.machine_key = MachinePublic([2; 32]);
        b.node_key = NodePublic([2; 32]);
        b.given_name = "b".into();
        b.ipv4 = Ipv4Addr::new(100, 64, 0, 2);
        b.ipv6 = "fd7a:115c:a1e0::2".parse().unwrap();
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute("INSERT INTO nodes (id, json) VALUES ('99', ?1)", [serde_json::to_string(&b).unwrap()]).unwrap();
        drop(c);
        let s = Store::open(Some(&db)).unwrap();
        let n = reg(&s, 3, u.id);
        assert!(n.ipv4 != b.ipv4 && n.ipv4 != a.ipv4, "{} reused", n.ipv4);
        assert!(n.ipv6 != b.ipv6 && n.ipv6 != a.ipv6, "{} reused", n.ipv6);
        // B keeps its address when it registers again.
        assert_eq!(reg(&s, 2, u.id).ipv4, b.ipv4);
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

    /// A registration writes its own allocation row, not the whole list; a database holding
    /// the list in one row (older versions) is moved to rows and keeps every address.
    #[test]
    fn allocations_are_one_row_each_and_the_old_list_migrates() {
        let t = tempfile::tempdir().unwrap();
        let db = t.path().join("n.db");
        let s = Store::open(Some(&db)).unwrap();
        let u = s.create_user("acme", "").unwrap();
        let a = reg(&s, 1, u.id);
        let b = reg(&s, 2, u.id);
        drop(s);
        let c = rusqlite::Connection::open(&db).unwrap();
        let rows = |c: &rusqlite::Connection| -> Vec<(String, String)> {
            let mut st = c.prepare("SELECT id, json FROM meta WHERE id LIKE 'alloc%' ORDER BY id").unwrap();
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
        };
        let got = rows(&c);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|(id, _)| id.starts_with(ALLOC_ROW)), "{got:?}");
        // Back to the old layout: one row with the whole list.
        let list: Vec<(MachinePublic, u32)> = vec![(a.machine_key, 1), (b.machine_key, 2)];
        c.execute("DELETE FROM meta WHERE id LIKE 'alloc:%'", []).unwrap();
        c.execute("INSERT INTO meta (id, json) VALUES ('allocations', ?1)", [serde_json::to_string(&list).unwrap()])
            .unwrap();
        drop(c);
        let s = Store::open(Some(&db)).unwrap();
        s.delete_node(a.id).unwrap();
        assert_eq!(reg(&s, 1, u.id).ipv4, a.ipv4, "the migrated allocation keeps the address");
        assert_eq!(reg(&s, 3, u.id).ipv4, Ipv4Addr::new(100, 64, 0, 3), "no index is handed out twice");
        drop(s);
        let c = rusqlite::Connection::open(&db).unwrap();
        let got = rows(&c);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.iter().all(|(id, _)| id != "allocations"), "the old row is gone: {got:?}");
    }
}

/// Policies kept in the `policies` table (older ones are dropped).
const POLICY_HISTORY: i64 = 16;

impl Store {
    fn policies_table(c: &rusqlite::Connection) -> Result<(), StoreError> {
        c.execute(
            "CREATE TABLE IF NOT EXISTS policies \
             (id INTEGER PRIMARY KEY AUTOINCREMENT, data TEXT NOT NULL, updated_at TEXT NOT NULL)",
            [],
        )?;
        Ok(())
    }

    /// The newest policy set through the API and when, as Headscale's database policy mode
    /// keeps it (`None` without a database or before the first one).
    pub fn stored_policy(&self) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        let Some(db) = &self.db else { return Ok(None) };
        let c = db.lock();
        Self::policies_table(&c)?;
        let row: Option<(String, String)> = c
            .query_row("SELECT data, updated_at FROM policies ORDER BY id DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
        let Some((data, at)) = row else { return Ok(None) };
        let at = DateTime::parse_from_rfc3339(&at)
            .map_err(|e| StoreError::Invalid(format!("corrupt policy row time {at:?}: {e}")))?
            .with_timezone(&Utc);
        Ok(Some((data, at)))
    }

    /// Records `text` as the newest policy (one transaction; the newest [`POLICY_HISTORY`]
    /// rows are kept). Without a database nothing is written.
    pub fn store_policy(&self, text: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let Some(db) = &self.db else { return Ok(()) };
        let mut c = db.lock();
        Self::policies_table(&c)?;
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO policies (data, updated_at) VALUES (?1, ?2)",
            rusqlite::params![text, at.to_rfc3339()],
        )?;
        tx.execute(
            "DELETE FROM policies WHERE id <= (SELECT MAX(id) FROM policies) - ?1",
            rusqlite::params![POLICY_HISTORY],
        )?;
        tx.commit()?;
        Ok(())
    }
}
