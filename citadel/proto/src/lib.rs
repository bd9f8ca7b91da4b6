//! Citadel's wire formats, shared by the node (`citadel`) and the coordination server
//! (`nexus-sim`) so there is one definition of every byte on the wire.
//!
//! Everything here is sans-IO: codecs, handshakes and sealed boxes work on byte buffers, and
//! time and randomness come from the caller (the shells around it read the time from
//! [`wall::now`] and the runtime's clock). No sockets, no runtime, no WireGuard or TCP/IP
//! stack; the one async item, [`noise::NoiseStream`], is generic over tokio's I/O traits.
#![warn(missing_docs)]

pub mod addr;
pub mod backoff;
pub mod derp;
pub mod dial;
pub mod disco;
pub mod http;
pub mod keys;
pub mod noise;
pub mod stun;
pub mod tailcfg;
pub mod wall;
