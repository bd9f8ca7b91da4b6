//! Citadel: a node agent that joins a Tailscale-compatible WireGuard mesh with no root, no TUN
//! device and no separately installed VPN.
//!
//! [`mesh::Mesh`] is the embeddable handle; [`network`] is the process-global facade
//! (`connect`, `logout`, `is_global_connected`, `global_ipv4`). The wire modules
//! ([`keys`], [`noise`], [`tailcfg`], [`derp`], [`disco`], [`stun`], [`addr`]) live in
//! `citadel-proto`, shared with nexus-sim, and are re-exported here.
#![warn(missing_docs)]

pub mod api;
pub mod clock;
pub mod control;
pub mod copy;
pub mod dataplane;
pub mod derphttp;
pub mod expose;
pub mod login;
pub mod magicsock;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod netcheck;
pub mod netmap;
pub mod network;
pub mod programs;
pub mod proxy;
pub mod proxy_server;
pub mod state;
pub mod syspolicy;
pub mod tls;
pub mod whois;

pub use citadel_proto::{addr, backoff, derp, disco, keys, noise, stun, tailcfg};
