//! harness: deterministic simulated networks for Citadel.
//!
//! A world is a turmoil simulation holding a Nexus (nexus-sim's router on a simulated TCP
//! listener), a DERP/STUN host, NAT middleboxes ([`nat`] is the sans-IO table, [`nat_host`] the
//! thin turmoil host) and citadel nodes running the real [`citadel::mesh::Mesh`] over
//! [`net::TurmoilNet`]. [`scenario`] reads scenario files, [`world::run`] plays them on
//! simulated time and [`report`] renders a deterministic trace. [`real`] plays the same files
//! with the real binaries in Linux network namespaces.
//!
//! Nodes run the data plane too (WireGuard, disco, STUN, DERP via [`derp_host`]) on simulated
//! time; [`probe::MeshProbe`] pings through it to judge `reaches` and `udp_path`.

#![warn(missing_docs, unreachable_pub)]

pub mod bench;
pub mod delay;
pub mod derp_host;
pub mod nat;
pub mod nat_host;
pub mod net;
pub mod nexus;
pub mod probe;
/// Linux network namespaces and iptables: Unix only.
#[cfg(unix)]
pub mod real;
pub mod report;
pub mod scenario;
pub mod world;
