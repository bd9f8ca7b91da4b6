//! Citadel: a node agent that joins a Tailscale-compatible WireGuard mesh with no root, no TUN
//! device and no separately installed VPN.
//!
//! [`mesh::Mesh`] is the embeddable handle; [`network`] is the process-global facade
//! (`connect`, `logout`, `is_global_connected`, `global_ipv4`). The wire modules
//! ([`keys`], [`noise`], [`tailcfg`]) are shared with nexus-sim so there is one definition of
//! every byte on the wire.
#![warn(missing_docs)]
#![allow(missing_docs)] // field-level docs on wire structs would restate Go's names

pub mod api;
pub mod clock;
pub mod control;
pub mod dataplane;
pub mod derp;
pub mod derphttp;
pub mod disco;
pub mod expose;
pub mod keys;
pub mod login;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod netcheck;
pub mod netmap;
pub mod network;
pub mod noise;
pub mod programs;
pub mod proxy;
pub mod state;
pub mod stun;
pub mod syspolicy;
pub mod tailcfg;
pub mod whois;
pub mod work;
