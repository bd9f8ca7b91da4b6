//! The state directory (`~/.citadel-node/network/` unless told otherwise).
//!
//! It holds the node's keys (`identity.json`), what it knows of its registration
//! (`node.json`) and the last netmap (`netmap.json`, for fast restarts). Directory 0700, files
//! 0600, every write atomic (temp file, fsync, rename, fsync of the directory), and an exclusive
//! lock (`lock`) so two processes never run one identity.
//!
//! fsyncs are what a join waits for on disk, so they are spent only where durability needs
//! them: files written together share one directory fsync ([`StateDir::write_batch`]); a file
//! that already has a durable version is replaced without one ([`StateDir::replace`]); the
//! marker and the netmap cache are never fsynced.

use crate::keys::PrivateKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file that marks a directory as citadel's state directory.
pub const MARKER: &str = ".citadel-state";

/// Every file citadel keeps in a state directory; logout removes these (and temp files) only.
const KNOWN_FILES: [&str; 5] = ["identity.json", "node.json", "netmap.json", "lock", "citadel.sock"];

fn is_citadel_file(name: &str) -> bool {
    name == MARKER
        || KNOWN_FILES.contains(&name)
        || KNOWN_FILES
            .iter()
            .any(|k| name.strip_prefix('.').and_then(|n| n.strip_prefix(k)).is_some_and(|t| t.starts_with(".tmp")))
}

/// State directory errors, each one a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process holds the lock.
    #[error("state directory {0} is in use by another citadel process")]
    Locked(PathBuf),
    /// A file exists but cannot be parsed.
    #[error("state file {path} is corrupt ({reason}); remove it or run `citadel logout` to start over")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        reason: String,
    },
    /// The directory holds files that are not citadel's and no citadel marker.
    #[error(
        "{0} is not a citadel state directory (it holds other files and no {MARKER}); choose a new or empty directory"
    )]
    NotOurs(PathBuf),
    /// Plain I/O failure.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// The node's three private keys.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// Machine key (control channel).
    pub machine_key: PrivateKey,
    /// Node key (WireGuard).
    pub node_key: PrivateKey,
    /// Stored for compatibility; [`crate::mesh::Mesh`] makes a fresh disco key each start.
    pub disco_key: PrivateKey,
    /// The node key `node_key` replaces while a renewal is not yet confirmed by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_node_key: Option<crate::keys::NodePublic>,
}

impl Identity {
    /// Fresh random keys.
    pub fn generate(rng: &mut impl rand::RngCore) -> Self {
        Self {
            machine_key: PrivateKey::generate(rng),
            node_key: PrivateKey::generate(rng),
            disco_key: PrivateKey::generate(rng),
            old_node_key: None,
        }
    }
}

/// What the node remembers about its registration.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    /// Nexus (control server) URL.
    pub nexus_url: String,
    /// Hostname requested at registration.
    pub hostname: String,
    /// True once the server accepted the node key.
    pub registered: bool,
    /// Org (Headscale user) the node belongs to, as last seen.
    #[serde(default)]
    pub org: String,
    /// Mesh addresses last assigned.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The Nexus's Noise key, pinned at first registration (trust on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_key: Option<crate::keys::MachinePublic>,
}

/// The default state directory: `$CITADEL_STATE_DIR`, else `~/.citadel-node/network`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CITADEL_STATE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".citadel-node").join("network")
}

/// An open, locked state directory. The lock is released on drop.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    lock: std::sync::Mutex<Option<File>>,
}

impl StateDir {
    /// Creates (0700) and locks the directory; fails at once if another process holds it.
    ///
    /// An existing directory must carry the citadel marker or hold nothing but citadel's
    /// files (then it gets the marker); anything else is refused before it is touched, so a
    /// mistaken `--state-dir ~` never has its mode changed or its files removed.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(path).map_err(io_err(path))?;
        let marker = path.join(MARKER);
        if !marker.exists() {
            for entry in fs::read_dir(path).map_err(io_err(path))? {
                let name = entry.map_err(io_err(path))?.file_name();
                if !name.to_str().is_some_and(is_citadel_file) {
                    return Err(StateError::NotOurs(path.to_path_buf()));
                }
            }
        }
        // On Windows the profile directory's ACL already limits access to the user.
        #[cfg(unix)]
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))?;
        let lock_path = path.join("lock");
        let mut opts = OpenOptions::new();
        private(&mut opts);
        let lock = opts.create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(StateError::Locked(path.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(StateError::Io { path: lock_path, source: e }),
        }
        if !marker.exists() {
            // Not fsynced: after a crash a missing marker only means the directory, which then
            // holds nothing but citadel's files, is adopted again.
            write_atomic(&marker, b"citadel state directory\n", false)?;
        }
        Ok(Self { path: path.to_path_buf(), lock: std::sync::Mutex::new(Some(lock)) })
    }

    /// Releases the lock now (the owner is going away; later writes are skipped).
    pub fn release(&self) {
        self.lock.lock().unwrap().take();
    }

    fn held(&self) -> bool {
        self.lock.lock().unwrap().is_some()
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `name` as JSON; `Ok(None)` when it does not exist.
    pub fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StateError> {
        let p = self.path.join(name);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Io { path: p, source: e }),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| StateError::Corrupt { path: p, reason: e.to_string() })
    }

    /// Writes `name` atomically with mode 0600.
    pub fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        if !self.held() {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        write_atomic(&self.path.join(name), &bytes, true)
    }

    /// Writes `name` atomically with its contents fsynced but not the directory: after a crash
    /// the file is the previous version or this one, both whole. Only for a file that already
    /// has a durable version (the rename itself may be lost).
    pub fn replace<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        if !self.held() {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        let path = self.path.join(name);
        let tmp = stage(&path, &bytes, true)?;
        commit(&tmp, &path)
    }

    /// Writes every file of `batch` atomically and durably with one directory fsync: each temp
    /// file is written and fsynced, all are renamed, then the directory is fsynced once.
    pub fn write_batch(&self, batch: &Batch) -> Result<(), StateError> {
        if !self.held() || batch.files.is_empty() {
            return Ok(());
        }
        let mut staged = Vec::with_capacity(batch.files.len());
        for (name, bytes) in &batch.files {
            let path = self.path.join(name);
            match stage(&path, bytes, true) {
                Ok(tmp) => staged.push((tmp, path)),
                Err(e) => {
                    for (tmp, _) in &staged {
                        let _ = fs::remove_file(tmp);
                    }
                    return Err(e);
                }
            }
        }
        let mut staged = staged.into_iter();
        while let Some((tmp, path)) = staged.next() {
            if let Err(e) = commit(&tmp, &path) {
                for (tmp, _) in staged {
                    let _ = fs::remove_file(tmp);
                }
                return Err(e);
            }
        }
        sync_dir(&self.path)
    }

    /// Writes a cache file atomically (rename) but without fsync: after a crash it may be
    /// missing or stale, never half-written; readers treat it as optional.
    pub fn write_cache<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        self.write_cache_bytes(name, &serde_json::to_vec(value).expect("state serializes"))
    }

    /// [`StateDir::write_cache`] of bytes serialized already.
    pub fn write_cache_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        if !self.held() {
            return Ok(());
        }
        write_atomic(&self.path.join(name), bytes, false)
    }

    /// Loads the identity, creating and saving fresh keys on first use.
    pub fn identity(&self, rng: &mut impl rand::RngCore) -> Result<Identity, StateError> {
        let mut batch = Batch::default();
        let id = self.identity_or_new(rng, &mut batch)?;
        self.write_batch(&batch)?;
        Ok(id)
    }

    /// Loads the identity, or makes fresh keys and adds them to `batch`: they must be written
    /// before they are used with a server.
    pub fn identity_or_new(&self, rng: &mut impl rand::RngCore, batch: &mut Batch) -> Result<Identity, StateError> {
        if let Some(id) = self.read::<Identity>("identity.json")? {
            return Ok(id);
        }
        let id = Identity::generate(rng);
        batch.add("identity.json", &id);
        Ok(id)
    }

    /// Removes citadel's files but the lock and the marker (logout); anything else stays.
    /// `node.json` goes first and `identity.json` last, so a process killed half-way leaves
    /// keys without a registration (the next `init` registers them again), never a
    /// registration whose keys are gone.
    pub fn clear(&self) -> Result<(), StateError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name == "lock" || name == MARKER || !is_citadel_file(&name) {
                continue;
            }
            names.push(name);
        }
        names.sort_by_key(|n| match n.as_str() {
            "node.json" => 0,
            "identity.json" => 2,
            _ => 1,
        });
        for name in names {
            let p = self.path.join(&name);
            // A temp directory left by a crash while binding the API socket.
            let r = if p.is_dir() && name.contains(".tmp") { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::Io { path: p, source: e }),
            }
            #[cfg(unix)]
            if name == "node.json" {
                // On disk before any key goes, so a power loss cannot reorder the two either.
                File::open(&self.path).and_then(|d| d.sync_all()).map_err(io_err(&self.path))?;
            }
        }
        Ok(())
    }
}

/// State files to write together with [`StateDir::write_batch`]. Holds serialized keys, so it
/// has no `Debug`.
#[derive(Default)]
pub struct Batch {
    files: Vec<(String, Vec<u8>)>,
}

impl Batch {
    /// Adds `name` with `value` as JSON (replacing an earlier entry of the same name).
    pub fn add<T: Serialize>(&mut self, name: &str, value: &T) {
        let bytes = serde_json::to_vec_pretty(value).expect("state serializes");
        self.files.retain(|(n, _)| n != name);
        self.files.push((name.to_string(), bytes));
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// New files are 0600 (owner only) where the platform has modes.
fn private(opts: &mut OpenOptions) {
    #[cfg(unix)]
    opts.mode(0o600);
    #[cfg(not(unix))]
    let _ = opts;
}

/// Writes `path` atomically: a fresh 0600 temp file in the same directory (created
/// exclusively, never through a symlink), fsync, rename, fsync of the directory. On any error
/// the temp file is removed and the error returned.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    write_atomic_with(path, durable, |f| f.write_all(bytes))
}

fn write_atomic_with(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StateError> {
    let tmp = stage_with(path, durable, fill)?;
    commit(&tmp, path)?;
    if durable {
        sync_dir(parent(path))?;
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Fsyncs directory `dir`, so the renames into it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Renames `tmp` over `path`, removing `tmp` if that fails.
fn commit(tmp: &Path, path: &Path) -> Result<(), StateError> {
    fs::rename(tmp, path).map_err(|e| {
        let _ = fs::remove_file(tmp);
        StateError::Io { path: path.to_path_buf(), source: e }
    })
}

fn stage(path: &Path, bytes: &[u8], durable: bool) -> Result<PathBuf, StateError> {
    stage_with(path, durable, |f| f.write_all(bytes))
}

/// Writes a fresh 0600 temp file next to `path` (created exclusively, never through a
/// symlink), fsynced if `durable`, and returns its path; on error it is removed.
fn stage_with(
    path: &Path,
    durable: bool,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<PathBuf, StateError> {
    let dir = parent(path);
    let tmp = dir.join(format!(
        ".{}.tmp{}-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut f = {
        let mut opts = OpenOptions::new();
        private(&mut opts);
        #[cfg(unix)]
        opts.custom_flags(libc::O_NOFOLLOW);
        opts.create_new(true).write(true).open(&tmp).map_err(io_err(&tmp))?
    };
    let written = fill(&mut f).and_then(|()| if durable { f.sync_all() } else { Ok(()) });
    drop(f);
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::Io { path: tmp, source: e });
    }
    Ok(tmp)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn modes_lock_and_round_trip() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("net");
        let s = StateDir::open(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        let id = s.identity(&mut rand::thread_rng()).unwrap();
        let again = s.identity(&mut rand::thread_rng()).unwrap();
        assert_eq!(id.node_key.to_bytes(), again.node_key.to_bytes());
        assert_eq!(fs::metadata(p.join("identity.json")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(StateDir::open(&p), Err(StateError::Locked(_))));
        drop(s);
        let s = StateDir::open(&p).unwrap();
        s.clear().unwrap();
        assert!(s.read::<Identity>("identity.json").unwrap().is_none());
    }

    fn temp_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    #[test]
    fn failed_atomic_write_leaves_no_temp_file() {
        let t = tempfile::tempdir().unwrap();
        // The rename fails: the target is a (non-empty) directory.
        let target = t.path().join("identity.json");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"x").unwrap();
        assert!(write_atomic(&target, b"secret key bytes", true).is_err());
        assert_eq!(temp_files(t.path()), Vec::<String>::new());
    }

    #[test]
    fn failed_write_returns_the_error_and_leaves_no_temp_file() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("identity.json");
        let r = write_atomic_with(&target, true, |f| {
            f.write_all(b"half of a key")?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.unwrap_err().to_string().contains("disk full"));
        assert_eq!(temp_files(t.path()), Vec::<String>::new());
        assert!(!target.exists());
    }

    #[test]
    fn atomic_write_replaces_the_file_and_not_a_symlink_target() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("node.json");
        let elsewhere = t.path().join("elsewhere");
        fs::write(&elsewhere, b"untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &target).unwrap();
        write_atomic(&target, b"{}", true).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(!fs::symlink_metadata(&target).unwrap().file_type().is_symlink());
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn open_refuses_a_directory_that_is_not_citadels() {
        let t = tempfile::tempdir().unwrap();
        fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(t.path().join("foo.txt"), b"my notes").unwrap();
        let e = StateDir::open(t.path()).unwrap_err();
        assert!(e.to_string().contains("not a citadel state directory"), "{e}");
        assert_eq!(fs::read(t.path().join("foo.txt")).unwrap(), b"my notes");
        assert_eq!(fs::metadata(t.path()).unwrap().permissions().mode() & 0o777, 0o755);
    }

    #[test]
    fn clear_removes_only_citadels_files() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("net");
        let s = StateDir::open(&p).unwrap();
        s.identity(&mut rand::thread_rng()).unwrap();
        s.write_cache("netmap.json", &serde_json::json!({})).unwrap();
        fs::write(p.join("foo.txt"), b"my notes").unwrap();
        s.clear().unwrap();
        assert!(!p.join("identity.json").exists() && !p.join("netmap.json").exists());
        assert_eq!(fs::read(p.join("foo.txt")).unwrap(), b"my notes");
        drop(s);
        // Still citadel's (the marker stays), so it opens again.
        StateDir::open(&p).unwrap();
    }

    #[test]
    fn a_directory_holding_only_citadel_files_is_adopted() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("identity.json"), b"{}").unwrap();
        fs::write(t.path().join("lock"), b"").unwrap();
        StateDir::open(t.path()).unwrap();
        assert!(t.path().join(MARKER).exists());
    }

    #[test]
    fn a_batch_writes_every_file_and_a_fresh_identity_waits_for_it() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        let mut batch = Batch::default();
        let id = s.identity_or_new(&mut rand::thread_rng(), &mut batch).unwrap();
        assert!(!t.path().join("identity.json").exists(), "keys are written by the batch, not before");
        batch.add("node.json", &NodeInfo { hostname: "a".into(), ..Default::default() });
        batch.add("node.json", &NodeInfo { hostname: "b".into(), ..Default::default() });
        s.write_batch(&batch).unwrap();
        let again = s.identity(&mut rand::thread_rng()).unwrap();
        assert_eq!(id.node_key.to_bytes(), again.node_key.to_bytes());
        assert_eq!(s.read::<NodeInfo>("node.json").unwrap().unwrap().hostname, "b");
        for f in ["identity.json", "node.json"] {
            assert_eq!(fs::metadata(t.path().join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(temp_files(t.path()), Vec::<String>::new());
    }

    #[test]
    fn a_failed_batch_leaves_no_temp_file() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        // The second rename fails: its target is a non-empty directory.
        fs::create_dir(t.path().join("node.json")).unwrap();
        fs::write(t.path().join("node.json").join("x"), b"x").unwrap();
        let mut batch = Batch::default();
        s.identity_or_new(&mut rand::thread_rng(), &mut batch).unwrap();
        batch.add("node.json", &NodeInfo::default());
        assert!(s.write_batch(&batch).is_err());
        assert_eq!(temp_files(t.path()), Vec::<String>::new());
    }

    #[test]
    fn replace_swaps_the_whole_file() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        s.write("node.json", &NodeInfo { hostname: "old".into(), ..Default::default() }).unwrap();
        s.replace("node.json", &NodeInfo { hostname: "new".into(), registered: true, ..Default::default() }).unwrap();
        let got = s.read::<NodeInfo>("node.json").unwrap().unwrap();
        assert!(got.registered && got.hostname == "new");
        assert_eq!(fs::metadata(t.path().join("node.json")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(temp_files(t.path()), Vec::<String>::new());
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path()).unwrap();
        fs::write(t.path().join("identity.json"), b"{not json").unwrap();
        let e = s.identity(&mut rand::thread_rng()).err().unwrap();
        assert!(matches!(e, StateError::Corrupt { .. }));
        assert!(e.to_string().contains("corrupt"));
    }
}
