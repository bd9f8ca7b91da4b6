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
    /// Expose a local service (`[udp:]MESH_PORT[=HOST:PORT]`); answers the new list.
    ExposeAdd {
        /// The expose spec.
        spec: String,
    },
    /// Stop exposing a mesh port; answers the new list.
    ExposeRemove {
        /// Transport.
        proto: crate::expose::Proto,
        /// Mesh port.
        port: u16,
    },
    /// List exposed services.
    ExposeList,
    /// Who is behind a mesh address (`IP[:PORT]`).
    Whois {
        /// `IP[:PORT]`.
        addr: String,
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
    /// Exposed services.
    Exposes {
        /// By protocol, then port.
        exposes: Vec<crate::expose::ExposeInfo>,
    },
    /// Identity behind an address.
    Whois(crate::whois::WhoIs),
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
    use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::Notify;

    type Shared = Arc<tokio::sync::Mutex<Option<Arc<Mesh>>>>;

    async fn current(mesh: &Shared) -> Option<Arc<Mesh>> {
        mesh.lock().await.clone()
    }

    /// Longest request line accepted; longer ones close the connection.
    pub const MAX_REQUEST_LINE: usize = 64 * 1024;

    /// Binds the socket so that it is 0600 before anyone can reach it: bound inside a fresh
    /// 0700 directory, chmodded there, then renamed into place. (Narrowing the umask around the
    /// bind would do too, but the umask is process-wide and other threads create directories.)
    fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(SOCKET);
        let private = dir.join(format!(".{name}.tmp{:016x}", rand::random::<u64>()));
        std::fs::DirBuilder::new().mode(0o700).create(&private)?;
        let inner = private.join("s");
        let r = UnixListener::bind(&inner).and_then(|l| {
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&inner, path)?;
            Ok(l)
        });
        let _ = std::fs::remove_file(&inner);
        let _ = std::fs::remove_dir(&private);
        r
    }

    /// Reads one `\n`-terminated line of at most `max` bytes; `Ok(None)` at end of stream.
    async fn read_line_bounded<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        loop {
            let buf = r.fill_buf().await?;
            if buf.is_empty() {
                return Ok(None);
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if line.len() + take > max {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "request line too long"));
            }
            line.extend_from_slice(&buf[..take]);
            r.consume(if done { take + 1 } else { take });
            if done {
                return Ok(Some(line));
            }
        }
    }

    /// Serves the API until `logout` is requested (then `done` is notified). Only processes of
    /// this process's effective uid are answered (checked with `SO_PEERCRED`).
    pub async fn serve(mesh: Shared, path: PathBuf, done: Arc<Notify>) -> std::io::Result<()> {
        let _ = std::fs::remove_file(&path);
        let listener = bind_private(&path)?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let owner = unsafe { libc::geteuid() };
        loop {
            let (s, _) = listener.accept().await?;
            tokio::spawn(connection(s, mesh.clone(), done.clone(), owner));
        }
    }

    /// One API connection: the peer's uid is checked, then one request line is answered, or
    /// (for `dial`) the connection becomes a byte pipe to the mesh.
    async fn connection(s: UnixStream, mesh: Shared, done: Arc<Notify>, owner: libc::uid_t) {
        let peer_uid = s.peer_cred().map(|c| c.uid());
        let (r, mut w) = s.into_split();
        if peer_uid.as_ref().ok() != Some(&owner) {
            let who = peer_uid.map_or_else(|e| format!("unknown ({e})"), |u| u.to_string());
            tracing::warn!(uid = %who, "local API connection from another user refused");
            let message = format!("uid {who} is not allowed to use this node's API");
            let _ = send(&mut w, &Response::Error { message }).await;
            return;
        }
        let mut reader = BufReader::new(r);
        let line = match read_line_bounded(&mut reader, MAX_REQUEST_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) | Err(_) => return,
        };
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::Error { message: format!("bad request: {e}") },
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
                        let _ = crate::copy::both_ways(&mut unix, &mut conn).await;
                        return;
                    }
                }
            }
            Ok(Request::Logout) => logout(&mesh, &done).await,
            Ok(req) => match current(&mesh).await {
                Some(m) => answer(&m, req).await,
                None => Response::Error { message: "node is stopping".into() },
            },
        };
        let _ = send(&mut w, &resp).await;
    }

    /// `logout`: the node is taken out of service whatever the outcome, and `done` notified.
    async fn logout(mesh: &Shared, done: &Notify) -> Response {
        let Some(m) = mesh.lock().await.take() else {
            return Response::Error { message: "node is stopping".into() };
        };
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

    /// The answer to a request that needs only the running node (`dial` and `logout` are
    /// answered by [`connection`]).
    async fn answer(m: &Mesh, req: Request) -> Response {
        let error = |message: String| Response::Error { message };
        match req {
            Request::Status => Response::Status(m.status()),
            Request::Ping { peer, port, timeout_ms } => match m.resolve(&peer) {
                Some(ip) => match m.ping(ip, port, Duration::from_millis(timeout_ms.max(1))).await {
                    Ok(p) => Response::Pong(p),
                    Err(e) => error(format!("no reply from {peer}: {e}")),
                },
                None => error(format!("unknown peer {peer:?}")),
            },
            Request::ExposeAdd { spec } => match spec.parse().and_then(|s| m.expose(s)) {
                Ok(()) => Response::Exposes { exposes: m.exposes() },
                Err(e) => error(e.to_string()),
            },
            Request::ExposeRemove { proto, port } => match m.unexpose(proto, port) {
                Ok(()) => Response::Exposes { exposes: m.exposes() },
                Err(e) => error(e.to_string()),
            },
            Request::ExposeList => Response::Exposes { exposes: m.exposes() },
            Request::Whois { addr } => match crate::whois::parse_addr(&addr) {
                Some(ip) => match m.whois(ip) {
                    Some(w) => Response::Whois(w),
                    None => error(format!("no mesh node has address {ip}")),
                },
                None => error(format!("{addr:?} is not IP[:PORT]")),
            },
            Request::Dial { .. } | Request::Logout => error("dial and logout are answered per connection".into()),
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(dir: &Path) -> (PathBuf, tokio::task::JoinHandle<std::io::Result<()>>) {
        let path = socket_path(dir);
        let mesh = Arc::new(tokio::sync::Mutex::new(None));
        let task = tokio::spawn(serve(mesh, path.clone(), Arc::new(tokio::sync::Notify::new())));
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (path, task)
    }

    #[tokio::test]
    async fn socket_is_private_and_answers_its_owner() {
        let t = tempfile::tempdir().unwrap();
        let (path, task) = start(t.path()).await;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SOCKET)]);
        let r = tokio::time::timeout(Duration::from_secs(5), call(t.path(), &Request::Status)).await.unwrap();
        assert!(matches!(r, Ok(Some(Response::Error { ref message })) if message.contains("stopping")), "{r:?}");
        task.abort();
    }

    #[tokio::test]
    async fn a_huge_request_line_closes_the_connection() {
        let t = tempfile::tempdir().unwrap();
        let (path, task) = start(t.path()).await;
        let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let chunk = vec![b'x'; 1 << 20];
        let outcome = tokio::time::timeout(Duration::from_secs(5), async {
            for _ in 0..10 {
                if s.write_all(&chunk).await.is_err() {
                    return "closed while writing";
                }
            }
            let mut b = [0u8; 64];
            match s.read(&mut b).await {
                Ok(0) | Err(_) => "closed",
                Ok(_) => "answered",
            }
        })
        .await;
        assert!(matches!(outcome, Ok("closed" | "closed while writing")), "{outcome:?}");
        task.abort();
    }

    #[tokio::test]
    async fn another_uid_is_refused() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: needs root to connect as another uid");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (path, task) = start(t.path()).await;
        // Open the socket itself to everyone, so only the peer-uid check can refuse.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            s.connect(sys.argv[1])\n\
            s.sendall(b'{\"op\":\"status\"}\\n')\n\
            print(s.recv(4096).decode(errors='replace'))\n";
        let p = path.clone();
        let out = tokio::task::spawn_blocking(move || {
            use std::os::unix::process::CommandExt;
            std::process::Command::new("python3").arg("-c").arg(script).arg(&p).uid(65534).gid(65534).output()
        })
        .await
        .unwrap()
        .expect("python3 runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("stopping"), "another uid was served: {text}");
        assert!(text.contains("not allowed") || text.trim().is_empty(), "{text}");
        task.abort();
    }
}
