//! `mesh-node`: a citadel node (the library, as an application embeds it) for the namespace
//! tests. It joins the mesh, serves a small HTTP page on a mesh port (so real Tailscale
//! clients can reach a service on the citadel node), and takes commands on stdin, one JSON
//! line answered per command:
//!
//! - `get PEER PORT` — HTTP GET / through the mesh; answers the body, the time and the path.
//! - `status` — the node's status (peers with path and latency).
//! - `wait-direct PEER SECS` — polls until the path to PEER is direct; answers the wait.
//! - `fetch PEER PORT SECS` — HTTP GET /bulk through the mesh, read for SECS; answers MB/s.
//!
//! `GET /bulk` on the served port streams zeros until the client closes (the bench's sender).
//!
//! Usage: `mesh-node NEXUS_URL AUTHKEY STATE_DIR HOSTNAME UDP_PORT SERVE_PORT`

use citadel::mesh::{Config, Mesh};
use std::io::BufRead;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() {
    tracing_subscriber_init();
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 {
        eprintln!("usage: mesh-node NEXUS_URL AUTHKEY STATE_DIR HOSTNAME UDP_PORT SERVE_PORT");
        std::process::exit(2);
    }
    let mut cfg = Config::new(Some(a[1].clone()), Some(a[2].clone()), a[3].clone().into());
    cfg.hostname = Some(a[4].clone());
    cfg.udp_port = a[5].parse().expect("UDP port");
    cfg.ephemeral = true;
    let serve: u16 = a[6].parse().expect("serve port");
    let mesh = std::sync::Arc::new(Mesh::connect(cfg).await.expect("join the mesh"));
    let l = mesh.listen_tcp(serve).expect("listen on the mesh");
    let name = a[4].clone();
    tokio::spawn(async move {
        while let Ok((mut s, from)) = l.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") && got.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if got.starts_with(b"GET /bulk ") {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n";
                    let chunk = vec![0u8; 256 * 1024];
                    let mut r = s.write_all(head.as_bytes()).await;
                    while r.is_ok() {
                        r = s.write_all(&chunk).await;
                    }
                    return;
                }
                let body = format!("hello from citadel {name} to {from}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    println!("{}", serde_json::json!({"up": true, "ipv4": mesh.ipv4().map(|i| i.to_string())}));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let w: Vec<&str> = line.split_whitespace().collect();
        let answer = match w.as_slice() {
            ["get", peer, port] => get(&mesh, peer, port.parse().unwrap_or(80)).await,
            ["fetch", peer, port, secs] => {
                fetch(&mesh, peer, port.parse().unwrap_or(80), secs.parse().unwrap_or(1.0)).await
            }
            ["status"] => serde_json::to_value(mesh.status()).unwrap_or_default(),
            ["wait-direct", peer, secs] => {
                let start = Instant::now();
                let limit = Duration::from_secs_f64(secs.parse().unwrap_or(10.0));
                loop {
                    let path = path_of(&mesh, peer);
                    if path.as_deref().is_some_and(|p| p.starts_with("direct")) || start.elapsed() > limit {
                        break serde_json::json!({"path": path, "waited_ms": start.elapsed().as_secs_f64() * 1e3});
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            _ => serde_json::json!({"error": format!("unknown command {line:?}")}),
        };
        println!("{answer}");
    }
}

fn path_of(mesh: &Mesh, peer: &str) -> Option<String> {
    mesh.status().peers.into_iter().find(|p| p.name == peer).and_then(|p| p.path)
}

async fn get(mesh: &Mesh, peer: &str, port: u16) -> serde_json::Value {
    let start = Instant::now();
    let Some(ip) = mesh.resolve(peer) else {
        return serde_json::json!({"error": format!("no peer {peer}")});
    };
    let run = async {
        let mut s = mesh.dial_tcp((ip, port).into()).await?;
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {peer}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).to_string())
    };
    match tokio::time::timeout(Duration::from_secs(15), run).await {
        Ok(Ok(resp)) => serde_json::json!({
            "body": resp.split("\r\n\r\n").nth(1).unwrap_or_default(),
            "ok": resp.starts_with("HTTP/1.1 200"),
            "ms": start.elapsed().as_secs_f64() * 1e3,
            "path": path_of(mesh, peer),
        }),
        Ok(Err(e)) => serde_json::json!({"error": e.to_string(), "path": path_of(mesh, peer)}),
        Err(_) => serde_json::json!({"error": "timed out", "path": path_of(mesh, peer)}),
    }
}

/// Reads `GET /bulk` from `peer`:`port` for `secs` seconds (bytes after the first read).
async fn fetch(mesh: &Mesh, peer: &str, port: u16, secs: f64) -> serde_json::Value {
    let Some(ip) = mesh.resolve(peer) else {
        return serde_json::json!({"error": format!("no peer {peer}")});
    };
    let run = async {
        let mut s = mesh.dial_tcp((ip, port).into()).await?;
        s.write_all(format!("GET /bulk HTTP/1.1\r\nHost: {peer}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        let first = s.read(&mut buf).await?;
        if !buf[..first].starts_with(b"HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("answer {:?}", String::from_utf8_lossy(&buf[..first.min(200)]))));
        }
        let (mut total, start, dur) = (0u64, Instant::now(), Duration::from_secs_f64(secs));
        while start.elapsed() < dur {
            match s.read(&mut buf).await? {
                0 => return Err(std::io::Error::other(format!("closed after {total} bytes"))),
                n => total += n as u64,
            }
        }
        Ok((total, start.elapsed()))
    };
    match tokio::time::timeout(Duration::from_secs_f64(secs + 15.0), run).await {
        Ok(Ok((total, took))) => serde_json::json!({
            "mbps": total as f64 / 1e6 / took.as_secs_f64(),
            "bytes": total,
            "path": path_of(mesh, peer),
        }),
        Ok(Err(e)) => serde_json::json!({"error": e.to_string(), "path": path_of(mesh, peer)}),
        Err(_) => serde_json::json!({"error": "timed out", "path": path_of(mesh, peer)}),
    }
}

/// Logs to stderr when `CITADEL_LOG` is set (the tests keep them in a file).
fn tracing_subscriber_init() {
    if let Ok(filter) = std::env::var("CITADEL_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
}
