//! The node's packet core, sans-IO (Tailscale's `magicsock`): one [`Conn`] per node owns the
//! WireGuard tunnels, disco, each peer's paths ([`endpoint`]) and the netcheck and home-relay
//! policy ([`home`]). The data plane's driver feeds it datagrams, relayed packets, IP packets
//! and `now`, and carries out what it asks for.
//!
//! ```text
//!   UDP socket ──handle_udp──┐                ┌──poll_transmit──> UDP socket / DERP region
//!   DERP region ─handle_relayed─>   Conn   ───┤
//!   netstack ────send_ip─────┘  (wg, disco,   ├──poll_ip────────> packet filter > netstack
//!   netmap ──────set_netmap──>   paths, home) └──poll_event─────> DERP connect/home, DNS,
//!   timers ──────handle_timeout <─poll_timeout                      HTTPS probe, NetInfo
//! ```

mod conn;
pub(crate) mod disco;
pub mod endpoint;
mod home;

pub(crate) use conn::{Conn, Event};
pub use home::{HOME_DOWN_RECHECK, NETCHECK_INTERVAL};
