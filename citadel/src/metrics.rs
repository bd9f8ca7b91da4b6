//! Prometheus metrics of a running node (`citadel up --metrics ADDR`), in the text exposition
//! format (version 0.0.4): peers by path, bytes and packets per peer, handshakes, DERP
//! reconnects, disco pings/pongs, control reconnects and dropped packets by reason. Everything
//! comes from counters the data plane and the control loop keep anyway.

use crate::dataplane::{DataPlaneCounters, PeerStats};
use crate::mesh::Mesh;
use crate::netmap::{short_name, NetMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

/// The inputs of one scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Control stream up.
    pub connected: bool,
    /// Per-peer tunnel stats.
    pub peers: Vec<PeerStats>,
    /// Data-plane counters.
    pub counters: DataPlaneCounters,
    /// Control reconnects.
    pub control_reconnects: u64,
    /// Exposed services (accepted/failed connections).
    pub exposes: Vec<crate::expose::ExposeInfo>,
}

/// Escapes a label value (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders a snapshot; peers are named from `nm` (node key when unknown).
pub fn render(s: &Snapshot, nm: &NetMap) -> String {
    let mut out = String::with_capacity(4096);
    head(&mut out, "citadel_connected", "gauge", "1 while the control stream to Nexus is up.");
    let _ = writeln!(out, "citadel_connected {}", s.connected as u8);

    let name = |p: &PeerStats| {
        nm.peers.values().find(|n| n.key == p.node_key).map(short_name).unwrap_or_else(|| p.node_key.short())
    };
    let (mut direct, mut relay, mut none) = (0, 0, 0);
    for p in &s.peers {
        match &p.path {
            Some(crate::dataplane::Path::Direct(_)) => direct += 1,
            Some(crate::dataplane::Path::Derp(_)) => relay += 1,
            None => none += 1,
        }
    }
    head(&mut out, "citadel_peers", "gauge", "Peers in the netmap by current path.");
    for (path, n) in [("direct", direct), ("relay", relay), ("none", none)] {
        let _ = writeln!(out, "citadel_peers{{path=\"{path}\"}} {n}");
    }
    type Field = fn(&PeerStats) -> u64;
    let per_peer: [(&str, &str, Field); 4] = [
        ("citadel_peer_rx_bytes_total", "WireGuard bytes received from the peer.", |p| p.rx_bytes),
        ("citadel_peer_tx_bytes_total", "WireGuard bytes sent to the peer.", |p| p.tx_bytes),
        ("citadel_peer_rx_packets_total", "WireGuard messages received from the peer.", |p| p.rx_packets),
        ("citadel_peer_tx_packets_total", "WireGuard messages sent to the peer.", |p| p.tx_packets),
    ];
    for (metric, help, f) in per_peer {
        head(&mut out, metric, "counter", help);
        for p in &s.peers {
            let _ = writeln!(out, "{metric}{{peer=\"{}\",node_key=\"{}\"}} {}", esc(&name(p)), p.node_key, f(p));
        }
    }
    let c = &s.counters;
    let totals: [(&str, &str, u64); 5] = [
        ("citadel_handshakes_total", "WireGuard handshakes completed.", c.handshakes),
        ("citadel_derp_reconnects_total", "DERP connections re-established.", c.derp_reconnects),
        ("citadel_disco_pings_received_total", "Disco pings received.", c.disco_pings_rx),
        ("citadel_disco_pongs_received_total", "Disco pongs received.", c.disco_pongs_rx),
        ("citadel_control_reconnects_total", "Control connections re-established.", s.control_reconnects),
    ];
    for (metric, help, v) in totals {
        head(&mut out, metric, "counter", help);
        let _ = writeln!(out, "{metric} {v}");
    }
    head(&mut out, "citadel_dropped_packets_total", "counter", "Packets dropped, by reason.");
    let drops = [
        ("rx_malformed", c.rx_malformed),
        ("rx_replayed", c.rx_replayed),
        ("rx_rejected", c.rx_rejected),
        ("rx_unknown_peer", c.rx_unknown_peer),
        ("rx_spoofed", c.rx_spoofed),
        ("rx_filtered", c.rx_filtered),
        ("rx_cross_org", c.rx_cross_org),
        ("rx_bad_ip", c.rx_bad_ip),
        ("rx_overflow", c.rx_overflow),
        ("tx_no_route", c.tx_no_route),
        ("tx_no_path", c.tx_no_path),
        ("tx_error", c.tx_error),
        ("tx_socket_error", c.tx_socket_error),
    ];
    for (reason, v) in drops {
        let _ = writeln!(out, "citadel_dropped_packets_total{{reason=\"{reason}\"}} {v}");
    }
    head(&mut out, "citadel_expose_connections_total", "counter", "Connections accepted on exposed mesh ports.");
    for e in &s.exposes {
        let _ = writeln!(
            out,
            "citadel_expose_connections_total{{proto=\"{}\",port=\"{}\"}} {}",
            e.proto, e.mesh_port, e.accepted
        );
    }
    head(&mut out, "citadel_expose_failures_total", "counter", "Exposed-port connections the local service refused.");
    for e in &s.exposes {
        let _ = writeln!(
            out,
            "citadel_expose_failures_total{{proto=\"{}\",port=\"{}\"}} {}",
            e.proto, e.mesh_port, e.failed
        );
    }
    out
}

impl Mesh {
    /// The node's metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        let dp = self.data_plane();
        let snap = Snapshot {
            connected: self.is_connected(),
            peers: dp.map(|d| d.peer_stats()).unwrap_or_default(),
            counters: dp.map(|d| d.counters()).unwrap_or_default(),
            control_reconnects: self.control_reconnects(),
            exposes: self.exposes(),
        };
        render(&snap, &self.netmap().borrow())
    }
}

/// Why the metrics listener did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Metrics name peers: a non-loopback address needs the explicit opt-in.
    #[error("refusing to serve metrics on {0}: not a loopback address (pass --metrics-allow-non-loopback)")]
    NonLoopback(SocketAddr),
    /// The OS refused the address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds `addr` for [`serve`].
///
/// # Errors
/// A non-loopback address without `allow_non_loopback`, or the OS refused it.
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<tokio::net::TcpListener, MetricsError> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(MetricsError::NonLoopback(addr));
    }
    tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` (any other path is 404) from `render` until the listener fails.
pub async fn serve(l: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("static response parts"))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodePublic;
    use crate::tailcfg::Node;

    fn snapshot() -> (Snapshot, NetMap) {
        let mut nm = NetMap::default();
        nm.peers
            .insert(2, Node { id: 2, name: "bra\"vo.acme.".into(), key: NodePublic([2; 32]), ..Default::default() });
        let peers = vec![
            PeerStats {
                node_key: NodePublic([2; 32]),
                path: Some(crate::dataplane::Path::Direct("127.0.0.1:41641".parse().unwrap())),
                candidates: vec![],
                last_handshake: None,
                rx_bytes: 1000,
                tx_bytes: 2000,
                rx_packets: 3,
                tx_packets: 4,
                home_derp: 1,
                latency: None,
            },
            PeerStats {
                node_key: NodePublic([3; 32]),
                path: None,
                candidates: vec![],
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                rx_packets: 0,
                tx_packets: 0,
                home_derp: 0,
                latency: None,
            },
        ];
        let counters = DataPlaneCounters { handshakes: 2, rx_filtered: 5, ..Default::default() };
        (Snapshot { connected: true, peers, counters, control_reconnects: 1, exposes: vec![] }, nm)
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let (s, nm) = snapshot();
        let text = render(&s, &nm);
        for line in [
            "citadel_connected 1",
            "citadel_peers{path=\"direct\"} 1",
            "citadel_peers{path=\"none\"} 1",
            "citadel_handshakes_total 2",
            "citadel_control_reconnects_total 1",
            "citadel_dropped_packets_total{reason=\"rx_filtered\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        let rx = format!("citadel_peer_rx_bytes_total{{peer=\"bra\\\"vo\",node_key=\"{}\"}} 1000", NodePublic([2; 32]));
        assert!(text.contains(&rx), "label escaping: {text}");
        // Every sample belongs to a family declared just before it.
        let mut declared = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE line");
                let value = l.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{l}");
            }
        }
    }

    #[tokio::test]
    async fn serves_metrics_over_http_and_refuses_non_loopback() {
        assert!(matches!(bind("0.0.0.0:0".parse().unwrap(), false).await, Err(MetricsError::NonLoopback(_))));
        let l = bind("127.0.0.1:0".parse().unwrap(), false).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, Arc::new(|| "citadel_connected 1\n".to_string())));
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (path, want) in [("/metrics", "200 OK"), ("/other", "404")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).await.unwrap();
            assert!(got.contains(want), "{got}");
            if path == "/metrics" {
                assert!(got.contains("text/plain; version=0.0.4") && got.ends_with("citadel_connected 1\n"), "{got}");
            }
        }
    }
}
