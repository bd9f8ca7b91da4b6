//! The process-global facade the product page documents: one mesh per process.
//!
//! ```no_run
//! # async fn f() -> Result<(), citadel::mesh::ConnectError> {
//! citadel::network::connect("http://127.0.0.1:8080", "tskey-…", "/tmp/citadel-state").await?;
//! assert!(citadel::network::is_global_connected());
//! println!("{}", citadel::network::global_ipv4());
//! citadel::network::logout().await?;
//! # Ok(()) }
//! ```

use crate::mesh::{Config, ConnectError, Mesh};
use std::sync::Mutex;

static GLOBAL: Mutex<Option<Mesh>> = Mutex::new(None);

/// Joins the mesh (an empty `auth_key` means: use the saved registration) and makes it the
/// process's global connection, replacing any earlier one.
pub async fn connect(nexus_url: &str, auth_key: &str, state_dir: &str) -> Result<(), ConnectError> {
    let cfg = Config::new(
        Some(nexus_url.to_string()).filter(|s| !s.is_empty()),
        Some(auth_key.to_string()).filter(|s| !s.is_empty()),
        if state_dir.is_empty() { crate::state::default_dir() } else { state_dir.into() },
    );
    // Release the previous connection (and its state lock) before opening a new one.
    drop(GLOBAL.lock().unwrap().take());
    let mesh = Mesh::connect(cfg).await?;
    *GLOBAL.lock().unwrap() = Some(mesh);
    Ok(())
}

/// Leaves the mesh and clears the stored state. Not connected is not an error.
pub async fn logout() -> Result<(), ConnectError> {
    let mesh = GLOBAL.lock().unwrap().take();
    match mesh {
        Some(m) => m.logout().await,
        None => Ok(()),
    }
}

/// True while the global connection's control stream is up.
pub fn is_global_connected() -> bool {
    GLOBAL.lock().unwrap().as_ref().is_some_and(|m| m.is_connected())
}

/// The mesh IPv4 address, or an empty string when not connected.
pub fn global_ipv4() -> String {
    GLOBAL.lock().unwrap().as_ref().and_then(|m| m.ipv4()).map(|a| a.to_string()).unwrap_or_default()
}

/// Runs `f` with the global mesh, if any.
pub fn with_global<R>(f: impl FnOnce(&Mesh) -> R) -> Option<R> {
    GLOBAL.lock().unwrap().as_ref().map(f)
}
