//! `GET /metrics`: Prometheus text (format 0.0.4) with the server's own counters — nodes
//! registered and online, map messages and their bytes sent, register requests, DERP
//! connections and frames. Only counts, no names or keys.

use crate::Shared;
use axum::extract::State;
use axum::response::IntoResponse;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters kept by the control handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Map messages (not keep-alives) written to map streams.
    pub map_sends: AtomicU64,
    /// Bytes of those messages as written to the streams (length prefixes included, before
    /// HTTP/2 and Noise framing): what compression saves shows here.
    pub map_bytes: AtomicU64,
    /// Keep-alives written to map streams.
    pub keepalives: AtomicU64,
    /// Register requests answered.
    pub registrations: AtomicU64,
}

/// Renders the counters.
pub fn render(s: &Shared) -> String {
    let nodes = s.store.nodes(None);
    let online = nodes.iter().filter(|n| s.store.is_online(n.id)).count();
    let derp = s.faults.derp_stats().unwrap_or_default();
    let m = &s.metrics;
    let rows: [(&str, &str, &str, u64); 11] = [
        ("nexus_nodes", "gauge", "Nodes registered.", nodes.len() as u64),
        ("nexus_nodes_online", "gauge", "Nodes with an open map stream.", online as u64),
        ("nexus_map_sends_total", "counter", "Map messages sent to nodes.", m.map_sends.load(Relaxed)),
        ("nexus_map_bytes_total", "counter", "Bytes of map messages sent to nodes.", m.map_bytes.load(Relaxed)),
        ("nexus_map_keepalives_total", "counter", "Map keep-alives sent to nodes.", m.keepalives.load(Relaxed)),
        ("nexus_registrations_total", "counter", "Register requests answered.", m.registrations.load(Relaxed)),
        ("nexus_derp_clients", "gauge", "DERP clients connected now.", derp.clients),
        ("nexus_derp_accepted_total", "counter", "DERP connections that logged in.", derp.accepted),
        ("nexus_derp_frames_relayed_total", "counter", "DERP packets relayed.", derp.packets_relayed),
        ("nexus_derp_frames_dropped_total", "counter", "DERP packets dropped.", derp.packets_dropped),
        (
            "nexus_derp_protocol_errors_total",
            "counter",
            "DERP connections closed for a bad frame.",
            derp.protocol_errors,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, v) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    out
}

/// The `/metrics` handler.
pub async fn handler(State(s): State<Shared>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render(&s))
}
