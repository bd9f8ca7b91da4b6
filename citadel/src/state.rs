//! The state directory (`~/.citadel-node/network/` unless told otherwise).
//!
//! It holds the node's keys (`identity.json`), what it knows of its registration
//! (`node.json`) and the last netmap (`netmap.json`, for fast restarts). Directory 0700, files
//! 0600, every write atomic (temp file, fsync, rename, fsync of the directory), and an exclusive
//! lock (`lock`) so two processes never run one identity.

use crate::keys::PrivateKey;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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
}

impl Identity {
    /// Fresh random keys.
    pub fn generate(rng: &mut impl rand::RngCore) -> Self {
        Self {
            machine_key: PrivateKey::generate(rng),
            node_key: PrivateKey::generate(rng),
            disco_key: PrivateKey::generate(rng),
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
    pub fn open(path: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(path).map_err(io_err(path))?;
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

    /// Writes a cache file atomically (rename) but without fsync: after a crash it may be
    /// missing or stale, never half-written; readers treat it as optional.
    pub fn write_cache<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        if !self.held() {
            return Ok(());
        }
        let bytes = serde_json::to_vec(value).expect("state serializes");
        write_atomic(&self.path.join(name), &bytes, false)
    }

    /// Loads the identity, creating and saving fresh keys on first use.
    pub fn identity(&self, rng: &mut impl rand::RngCore) -> Result<Identity, StateError> {
        if let Some(id) = self.read::<Identity>("identity.json")? {
            return Ok(id);
        }
        let id = Identity::generate(rng);
        self.write("identity.json", &id)?;
        Ok(id)
    }

    /// Removes everything in the directory but the lock (logout).
    pub fn clear(&self) -> Result<(), StateError> {
        for entry in fs::read_dir(&self.path).map_err(io_err(&self.path))? {
            let entry = entry.map_err(io_err(&self.path))?;
            if entry.file_name() == "lock" {
                continue;
            }
            let p = entry.path();
            let r = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            r.map_err(io_err(&p))?;
        }
        Ok(())
    }
}

/// New files are 0600 (owner only) where the platform has modes.
fn private(opts: &mut OpenOptions) {
    #[cfg(unix)]
    opts.mode(0o600);
    #[cfg(not(unix))]
    let _ = opts;
}

/// Writes `path` atomically: a 0600 temp file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = {
        let mut opts = OpenOptions::new();
        private(&mut opts);
        opts.create(true).truncate(true).write(true).open(&tmp).map_err(io_err(&tmp))?
    };
    f.write_all(bytes).map_err(io_err(&tmp))?;
    if durable {
        f.sync_all().map_err(io_err(&tmp))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if durable {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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
