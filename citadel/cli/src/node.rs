//! The node a command talks through.

use crate::CliError;
use citadel::api::{self, Request, Response};
use citadel::mesh::{Config, Mesh};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `host:port`, `[v6]:port` or `v6-literal:port` → (peer, port).
pub(crate) fn split_target(t: &str) -> Result<(String, u16), CliError> {
    let parsed = (|| {
        let (host, port) = t.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_string(), port))
    })();
    parsed.ok_or_else(|| CliError::Usage(format!("expected PEER:PORT, got {t:?}")))
}

/// The running `citadel up` (through its socket), or a node brought up in this process from
/// the saved state.
pub(crate) enum Node {
    Running(PathBuf),
    Own(Mesh),
}

impl Node {
    pub(crate) async fn attach(state_dir: &Path, cfg: Config) -> Result<Node, CliError> {
        if let Ok(Some(Response::Status(_))) = api::call(state_dir, &Request::Status).await {
            return Ok(Node::Running(state_dir.to_path_buf()));
        }
        Ok(Node::Own(Mesh::connect(cfg).await?))
    }

    pub(crate) async fn ping(&self, peer: &str, port: u16, timeout: Duration) -> Result<citadel::mesh::Pong, String> {
        match self {
            Node::Running(dir) => {
                let req = Request::Ping { peer: peer.to_string(), port, timeout_ms: timeout.as_millis() as u64 };
                match api::call(dir, &req).await {
                    Ok(Some(Response::Pong(p))) => Ok(p),
                    Ok(Some(Response::Error { message })) => Err(message),
                    Ok(_) => Err("the running node did not answer".into()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Node::Own(m) => {
                let ip = m.resolve(peer).ok_or_else(|| format!("unknown peer {peer:?}"))?;
                m.ping(ip, port, timeout).await.map_err(|e| format!("no reply from {peer}: {e}"))
            }
        }
    }

    pub(crate) async fn dial(&self, peer: &str, port: u16) -> Result<Box<dyn citadel::net::AsyncReadWrite>, String> {
        match self {
            Node::Running(dir) => match api::dial(dir, peer, port).await {
                Ok(Some(Ok(s))) => Ok(Box::new(s)),
                Ok(Some(Err(e))) => Err(e),
                Ok(None) => Err("the running node went away".into()),
                Err(e) => Err(e.to_string()),
            },
            Node::Own(m) => {
                let ip = m.resolve(peer).ok_or_else(|| format!("unknown peer {peer:?}"))?;
                m.dial_tcp(std::net::SocketAddr::new(ip, port))
                    .await
                    .map(|c| Box::new(c) as Box<dyn citadel::net::AsyncReadWrite>)
                    .map_err(|e| format!("cannot connect to {peer}:{port}: {e}"))
            }
        }
    }
}
