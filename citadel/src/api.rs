//! The local API: a Unix socket (`citadel.sock`, mode 0600) in the state directory that a
//! running `citadel up` serves, so `status`, `logout`, `ping`, `connect` and `proxy` attach to
//! it. One JSON request line, one JSON response line; after a successful `dial` the socket
//! becomes a raw byte pipe to the mesh connection.

use crate::mesh::{Pong, Status};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// Ping a peer (name or mesh IP) once.
    Ping {
        /// Peer name, FQDN or mesh IP.
        peer: String,
        /// TCP port probed.
        port: u16,
        /// Give up after this many milliseconds.
        timeout_ms: u64,
    },
    /// Open a TCP connection to `peer:port`; on success the socket carries its bytes.
    Dial {
        /// Peer name, FQDN or mesh IP.
        peer: String,
        /// TCP port.
        port: u16,
    },
}

/// The running node's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Status snapshot.
    Status(Status),
    /// Ping answer.
    Pong(Pong),
    /// Done.
    Ok,
    /// Failed, with a message.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Path of the socket for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

#[cfg(unix)]
pub use imp::*;

#[cfg(unix)]
mod imp {
    use super::*;
    use crate::mesh::Mesh;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::Notify;

    type Shared = Arc<tokio::sync::Mutex<Option<Arc<Mesh>>>>;

    async fn current(mesh: &Shared) -> Option<Arc<Mesh>> {
        mesh.lock().await.clone()
    }

    /// Serves the API until `logout` is requested (then `done` is notified).
    pub async fn serve(mesh: Shared, path: PathBuf, done: Arc<Notify>) -> std::io::Result<()> {
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
                let mut reader = BufReader::new(r);
                let mut line = String::new();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let req = serde_json::from_str::<Request>(&line);
                let resp = match req {
                    Err(e) => Response::Error { message: format!("bad request: {e}") },
                    Ok(Request::Status) => match current(&mesh).await {
                        Some(m) => Response::Status(m.status()),
                        None => Response::Error { message: "node is stopping".into() },
                    },
                    Ok(Request::Logout) => match mesh.lock().await.take() {
                        Some(m) => {
                            let r = match Arc::try_unwrap(m) {
                                Ok(m) => m.logout().await.map_err(|e| e.to_string()),
                                Err(_) => Err("node is busy (open connections); try again".into()),
                            };
                            done.notify_one();
                            match r {
                                Ok(()) => Response::Ok,
                                Err(message) => Response::Error { message },
                            }
                        }
                        None => Response::Error { message: "node is stopping".into() },
                    },
                    Ok(Request::Ping { peer, port, timeout_ms }) => match current(&mesh).await {
                        Some(m) => match m.resolve(&peer) {
                            Some(ip) => match m.ping(ip, port, Duration::from_millis(timeout_ms.max(1))).await {
                                Ok(p) => Response::Pong(p),
                                Err(e) => Response::Error { message: format!("no reply from {peer}: {e}") },
                            },
                            None => Response::Error { message: format!("unknown peer {peer:?}") },
                        },
                        None => Response::Error { message: "node is stopping".into() },
                    },
                    Ok(Request::Dial { peer, port }) => {
                        let Some(m) = current(&mesh).await else { return };
                        let Some(ip) = m.resolve(&peer) else {
                            let _ = send(&mut w, &Response::Error { message: format!("unknown peer {peer:?}") }).await;
                            return;
                        };
                        match m.dial_tcp(std::net::SocketAddr::new(ip, port)).await {
                            Err(e) => Response::Error { message: format!("cannot connect to {peer}:{port}: {e}") },
                            Ok(mut conn) => {
                                if send(&mut w, &Response::Ok).await.is_err() {
                                    return;
                                }
                                // Bytes the client sent after its request line are already buffered.
                                let early = reader.buffer().to_vec();
                                if !early.is_empty() && conn.write_all(&early).await.is_err() {
                                    return;
                                }
                                let mut unix = reader.into_inner().reunite(w).expect("halves of one stream");
                                let _ = tokio::io::copy_bidirectional(&mut unix, &mut conn).await;
                                return;
                            }
                        }
                    }
                };
                let _ = send(&mut w, &resp).await;
            });
        }
    }

    async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
        let mut out = serde_json::to_vec(resp).expect("serializes");
        out.push(b'\n');
        w.write_all(&out).await
    }

    async fn connect(state_dir: &Path) -> std::io::Result<Option<UnixStream>> {
        match UnixStream::connect(socket_path(state_dir)).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads one response line without reading past it (the stream may carry raw bytes after).
    async fn read_response(s: &mut UnixStream) -> std::io::Result<Response> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 1 << 20 {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "response too long"));
            }
        }
        serde_json::from_slice(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Sends one request to a running node; `Ok(None)` when none is listening.
    pub async fn call(state_dir: &Path, req: &Request) -> std::io::Result<Option<Response>> {
        let Some(mut s) = connect(state_dir).await? else { return Ok(None) };
        let mut out = serde_json::to_vec(req).expect("serializes");
        out.push(b'\n');
        s.write_all(&out).await?;
        read_response(&mut s).await.map(Some)
    }

    /// Asks a running node to dial `peer:port`; on success returns the socket, now a byte pipe.
    /// `Ok(None)` when no node is running.
    pub async fn dial(state_dir: &Path, peer: &str, port: u16) -> std::io::Result<Option<Result<UnixStream, String>>> {
        let Some(mut s) = connect(state_dir).await? else { return Ok(None) };
        let mut out = serde_json::to_vec(&Request::Dial { peer: peer.to_string(), port }).expect("serializes");
        out.push(b'\n');
        s.write_all(&out).await?;
        match read_response(&mut s).await? {
            Response::Ok => Ok(Some(Ok(s))),
            Response::Error { message } => Ok(Some(Err(message))),
            other => Ok(Some(Err(format!("unexpected answer {other:?}")))),
        }
    }
}

/// Without Unix sockets there is no local API yet: commands bring up their own node.
#[cfg(not(unix))]
mod fallback {
    use super::*;

    /// Always `Ok(None)`: no running node can be reached.
    pub async fn call(_state_dir: &Path, _req: &Request) -> std::io::Result<Option<Response>> {
        Ok(None)
    }

    /// Always `Ok(None)`: no running node can be reached.
    pub async fn dial(
        _state_dir: &Path,
        _peer: &str,
        _port: u16,
    ) -> std::io::Result<Option<Result<tokio::io::DuplexStream, String>>> {
        Ok(None)
    }

    /// The local API is not available on this platform.
    pub async fn serve(
        _mesh: std::sync::Arc<tokio::sync::Mutex<Option<std::sync::Arc<crate::mesh::Mesh>>>>,
        _path: PathBuf,
        _done: std::sync::Arc<tokio::sync::Notify>,
    ) -> std::io::Result<()> {
        std::future::pending().await
    }
}

#[cfg(not(unix))]
pub use fallback::*;
