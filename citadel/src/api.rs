//! The local API: a Unix socket (`citadel.sock`, mode 0600) in the state directory that a
//! running `citadel up` serves, so `citadel status` and `citadel logout` attach to it.
//! One JSON request line, one JSON response line.

use crate::mesh::{Mesh, Status};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// Socket file name inside the state directory.
pub const SOCKET: &str = "citadel.sock";

/// A request to the running node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Current status.
    Status,
    /// Leave the mesh and stop.
    Logout,
}

/// The running node's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Status snapshot.
    Status(Status),
    /// Done.
    Ok,
    /// Failed, with a message.
    Error { message: String },
}

/// Path of the socket for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Serves the API until `logout` is requested (then `done` is notified).
pub async fn serve(
    mesh: Arc<tokio::sync::Mutex<Option<Mesh>>>,
    path: PathBuf,
    done: Arc<Notify>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (s, _) = listener.accept().await?;
        let mesh = mesh.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Err(e) => Response::Error { message: format!("bad request: {e}") },
                Ok(Request::Status) => match mesh.lock().await.as_ref() {
                    Some(m) => Response::Status(m.status()),
                    None => Response::Error { message: "node is stopping".into() },
                },
                Ok(Request::Logout) => match mesh.lock().await.take() {
                    Some(m) => {
                        let r = m.logout().await;
                        done.notify_one();
                        match r {
                            Ok(()) => Response::Ok,
                            Err(e) => Response::Error { message: e.to_string() },
                        }
                    }
                    None => Response::Error { message: "node is stopping".into() },
                },
            };
            let mut out = serde_json::to_vec(&resp).expect("serializes");
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

/// Sends one request to a running node; `Ok(None)` when none is listening.
pub async fn call(state_dir: &Path, req: &Request) -> std::io::Result<Option<Response>> {
    let s = match UnixStream::connect(socket_path(state_dir)).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let (r, mut w) = s.into_split();
    let mut out = serde_json::to_vec(req).expect("serializes");
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    serde_json::from_str(&line).map(Some).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
