//! DERP ("Designated Encrypted Relay for Packets") frame codec, shared by the citadel client
//! and nexus-sim's relay so both ends agree on every byte.
//!
//! A DERP connection starts as an HTTP/1.1 `GET /derp` with `Upgrade: DERP` (see [`upgrade`]);
//! after the 101 (or immediately, with `Derp-Fast-Start: 1`) both sides exchange frames:
//!
//! ```text
//! frame   = type (1 byte) · length (u32 big-endian, payload only) · payload
//! login   = server → ServerKey, client → ClientInfo, server → ServerInfo
//! steady  = SendPacket / RecvPacket, KeepAlive, Ping ↔ Pong, PeerGone, Health, Restarting …
//! ```
//!
//! Everything here is sans-IO: [`Frame::decode`] works on whatever bytes the driver has buffered
//! and reports how many it consumed, and the sealed login messages take their nonce from the
//! caller. Limits mirror Tailscale's `derp` package: a relayed packet carries at most
//! [`MAX_PACKET_SIZE`] bytes and no frame is accepted above [`MAX_FRAME_LEN`].

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::Aead;
use crypto_box::{PublicKey, SalsaBox, SecretKey};
use serde::{Deserialize, Serialize};

use crate::keys::{NodePublic, PrivateKey};

/// Server greeting magic, the UTF-8 bytes of "DERP🔑".
pub const MAGIC: &[u8; 8] = b"DERP\xf0\x9f\x94\x91";
/// DERP protocol version spoken here (v2: received packets carry their source key).
pub const PROTOCOL_VERSION: u32 = 2;
/// Frame header: one type byte and a big-endian u32 payload length.
pub const HEADER_LEN: usize = 5;
/// Length of a raw Curve25519 public key on the wire.
pub const KEY_LEN: usize = 32;
/// Length of a NaCl box nonce.
pub const NONCE_LEN: usize = 24;
/// NaCl box overhead (the Poly1305 tag, which precedes the ciphertext).
pub const BOX_OVERHEAD: usize = 16;
/// Largest packet one SendPacket/RecvPacket/ForwardPacket frame may relay (64 KiB).
pub const MAX_PACKET_SIZE: usize = 64 << 10;
/// Largest JSON body of a ClientInfo/ServerInfo message.
pub const MAX_INFO_LEN: usize = 1 << 20;
/// Largest frame payload accepted from the wire. Tailscale's client refuses anything above
/// 1 MiB; every legitimate frame is far smaller.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest ClientInfo payload a server accepts (Tailscale's server: 256 KiB, to bound JSON
/// work done for a client that has not authenticated yet).
pub const MAX_CLIENT_INFO_LEN: usize = 256 << 10;
/// Largest Ping/Pong payload accepted; 8 bytes are used, the rest is room for extensions.
pub const MAX_PING_LEN: usize = 1000;
/// Length of the Ping/Pong payload that is echoed.
pub const PING_DATA_LEN: usize = 8;
/// The server sends a keep-alive at least this often; missing two means the link is dead.
pub const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// A DERP frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameType(pub u8);

impl FrameType {
    /// Server → client: magic + the server's public key.
    pub const SERVER_KEY: Self = Self(0x01);
    /// Client → server: client public key + nonce + box(ClientInfo JSON).
    pub const CLIENT_INFO: Self = Self(0x02);
    /// Server → client: nonce + box(ServerInfo JSON).
    pub const SERVER_INFO: Self = Self(0x03);
    /// Client → server: destination key + packet.
    pub const SEND_PACKET: Self = Self(0x04);
    /// Server → client: source key + packet.
    pub const RECV_PACKET: Self = Self(0x05);
    /// Server → client: no payload.
    pub const KEEP_ALIVE: Self = Self(0x06);
    /// Client → server: one byte, whether this is the client's home region.
    pub const NOTE_PREFERRED: Self = Self(0x07);
    /// Server → client: a previous sender went away (key + reason).
    pub const PEER_GONE: Self = Self(0x08);
    /// Server → mesh watcher: a client connected (key, optional endpoint and flags).
    pub const PEER_PRESENT: Self = Self(0x09);
    /// Mesh peer → server: source key + destination key + packet.
    pub const FORWARD_PACKET: Self = Self(0x0a);
    /// Mesh peer → server: subscribe to PeerPresent/PeerGone; no payload.
    pub const WATCH_CONNS: Self = Self(0x10);
    /// Mesh peer → server: close the named client's connection.
    pub const CLOSE_PEER: Self = Self(0x11);
    /// Either way: 8 bytes to echo back in a Pong.
    pub const PING: Self = Self(0x12);
    /// Either way: the 8 bytes of the Ping being answered.
    pub const PONG: Self = Self(0x13);
    /// Server → client: UTF-8 problem text; empty clears the problem.
    pub const HEALTH: Self = Self(0x14);
    /// Server → client: two u32 BE millisecond durations (reconnect in, try for).
    pub const RESTARTING: Self = Self(0x15);
}

/// Why a server reports a peer as gone ([`Frame::PeerGone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerGoneReason(pub u8);

impl PeerGoneReason {
    /// The peer disconnected from this server (also assumed when the reason byte is absent).
    pub const DISCONNECTED: Self = Self(0x00);
    /// The server has no record of the peer.
    pub const NOT_HERE: Self = Self(0x01);
}

/// Bit flags optionally trailing a [`Frame::PeerPresent`]; zero means the server did not send
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeerPresentFlags(pub u8);

impl PeerPresentFlags {
    /// An ordinary client.
    pub const IS_REGULAR: u8 = 1 << 0;
    /// Another DERP server of the region mesh.
    pub const IS_MESH_PEER: u8 = 1 << 1;
    /// A prober.
    pub const IS_PROBER: u8 = 1 << 2;
    /// The client said this server is not its region's first (ideal) node.
    pub const NOT_IDEAL: u8 = 1 << 3;
}

/// One DERP frame.
///
/// Decoding is lenient where Tailscale's own reader is (extra trailing bytes in ServerKey,
/// Ping, Pong and KeepAlive are ignored; a PeerGone without reason byte is
/// [`PeerGoneReason::DISCONNECTED`]) and strict where a Tailscale server would drop the
/// connection (NotePreferred, WatchConns and ClosePeer must have their exact length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The server's greeting: [`MAGIC`] and its public key.
    ServerKey {
        /// The server's public key.
        key: NodePublic,
    },
    /// The client's login: its public key and `nonce · box(ClientInfo JSON)` sealed to the
    /// server key (see [`ClientInfo::seal`]).
    ClientInfo {
        /// The client's public key.
        key: NodePublic,
        /// Sealed JSON client info.
        sealed: Vec<u8>,
    },
    /// The server's answer: `nonce · box(ServerInfo JSON)` sealed to the client key.
    ServerInfo {
        /// Sealed JSON server info.
        sealed: Vec<u8>,
    },
    /// A packet for `dst`.
    SendPacket {
        /// Recipient.
        dst: NodePublic,
        /// The packet.
        packet: Vec<u8>,
    },
    /// A packet from `src`.
    RecvPacket {
        /// Sender.
        src: NodePublic,
        /// The packet.
        packet: Vec<u8>,
    },
    /// No-op from the server.
    KeepAlive,
    /// Whether this server is the client's preferred (home) one; stats only.
    NotePreferred {
        /// Whether this server is the client's home.
        preferred: bool,
    },
    /// `peer` is no longer reachable through this server.
    PeerGone {
        /// The peer.
        peer: NodePublic,
        /// Why it left.
        reason: PeerGoneReason,
    },
    /// `peer` is connected; `endpoint` is its remote address as the server sees it. `flags` are
    /// only carried on the wire together with an endpoint.
    PeerPresent {
        /// The peer.
        peer: NodePublic,
        /// Its address as the server sees it, if sent.
        endpoint: Option<SocketAddr>,
        /// What is known about it.
        flags: PeerPresentFlags,
    },
    /// A packet relayed between servers of one region.
    ForwardPacket {
        /// Original sender.
        src: NodePublic,
        /// Recipient.
        dst: NodePublic,
        /// The packet.
        packet: Vec<u8>,
    },
    /// Subscribe to the server's connection list (mesh key required).
    WatchConns,
    /// Close `peer`'s connection (mesh key required).
    ClosePeer {
        /// The peer to disconnect.
        peer: NodePublic,
    },
    /// Asks the other side to echo the data in a Pong.
    Ping {
        /// Payload to echo.
        data: [u8; PING_DATA_LEN],
    },
    /// Echoes a Ping's data.
    Pong {
        /// The echoed payload.
        data: [u8; PING_DATA_LEN],
    },
    /// The connection's health problem; empty means healthy again.
    Health {
        /// The problem (empty: healthy again).
        problem: String,
    },
    /// The server is restarting: reconnect after `reconnect_in`, keep trying for `try_for`
    /// (both whole milliseconds on the wire).
    Restarting {
        /// Wait this long before reconnecting.
        reconnect_in: Duration,
        /// Keep trying this long.
        try_for: Duration,
    },
    /// A frame type this codec does not know. Both Tailscale peers skip these, so callers
    /// should too.
    Unknown {
        /// Frame type byte.
        ty: u8,
        /// Raw payload.
        payload: Vec<u8>,
    },
}

/// Errors decoding DERP frames or opening their sealed login messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DerpError {
    /// The header announces more than [`MAX_FRAME_LEN`] (or the type's own limit).
    #[error("frame type {ty:#04x} of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Frame type byte.
        ty: u8,
        /// Declared length.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
    /// The payload is shorter than the frame type requires.
    #[error("frame type {ty:#04x} too short ({len} bytes)")]
    Short {
        /// Frame type byte.
        ty: u8,
        /// Payload length.
        len: usize,
    },
    /// The payload length is not the exact length the frame type requires.
    #[error("frame type {ty:#04x} has wrong length {len}")]
    WrongLength {
        /// Frame type byte.
        ty: u8,
        /// Payload length.
        len: usize,
    },
    /// A relayed packet is larger than [`MAX_PACKET_SIZE`].
    #[error("packet of {len} bytes exceeds 64 KiB")]
    PacketTooLarge {
        /// Packet length.
        len: usize,
    },
    /// The ServerKey frame does not start with [`MAGIC`].
    #[error("bad server greeting magic")]
    BadMagic,
    /// An all-zero key was used where a real key is required.
    #[error("zero key")]
    ZeroKey,
    /// A sealed box did not open (wrong key, corrupted or truncated).
    #[error("sealed box did not open")]
    Open,
    /// The opened login message is not the expected JSON.
    #[error("bad info json: {0}")]
    Json(#[from] serde_json::Error),
}

/// A frame split off a buffer but not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The type byte.
    pub ty: FrameType,
    /// The payload, header excluded.
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// Bytes the frame occupies on the wire, header included.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }
}

/// Splits one frame off the front of `buf` without interpreting its payload.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and an error as soon as the
/// header announces more than [`max_payload_len`] allows for its type, so a driver never
/// buffers an oversized frame.
pub fn split_frame(buf: &[u8]) -> Result<Option<RawFrame<'_>>, DerpError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let ty = FrameType(header[0]);
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let max = max_payload_len(ty);
    if len > max {
        return Err(DerpError::FrameTooLarge { ty: ty.0, len, max });
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some(RawFrame { ty, payload }))
}

/// The largest payload accepted for a frame type: relayed packets are bounded by
/// [`MAX_PACKET_SIZE`] plus their keys, ClientInfo by [`MAX_CLIENT_INFO_LEN`], Ping/Pong by
/// [`MAX_PING_LEN`], everything else by [`MAX_FRAME_LEN`].
pub fn max_payload_len(ty: FrameType) -> usize {
    match ty {
        FrameType::SEND_PACKET | FrameType::RECV_PACKET => KEY_LEN + MAX_PACKET_SIZE,
        FrameType::FORWARD_PACKET => 2 * KEY_LEN + MAX_PACKET_SIZE,
        FrameType::CLIENT_INFO => MAX_CLIENT_INFO_LEN,
        FrameType::PING | FrameType::PONG => MAX_PING_LEN,
        _ => MAX_FRAME_LEN,
    }
}

fn key_at(b: &[u8], at: usize) -> Option<NodePublic> {
    let raw: [u8; KEY_LEN] = b.get(at..at + KEY_LEN)?.try_into().ok()?;
    Some(NodePublic(raw))
}

fn check_packet(len: usize) -> Result<(), DerpError> {
    if len > MAX_PACKET_SIZE {
        return Err(DerpError::PacketTooLarge { len });
    }
    Ok(())
}

/// IPv4 addresses travel as IPv4-mapped IPv6; this undoes that like Go's `Addr.Unmap`.
pub(crate) fn addr_from16(ip: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(ip);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

/// The 16-byte (IPv4-mapped for IPv4) form of an address, as Go's `Addr.As16`.
pub(crate) fn addr_to16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::ServerKey { .. } => FrameType::SERVER_KEY,
            Frame::ClientInfo { .. } => FrameType::CLIENT_INFO,
            Frame::ServerInfo { .. } => FrameType::SERVER_INFO,
            Frame::SendPacket { .. } => FrameType::SEND_PACKET,
            Frame::RecvPacket { .. } => FrameType::RECV_PACKET,
            Frame::KeepAlive => FrameType::KEEP_ALIVE,
            Frame::NotePreferred { .. } => FrameType::NOTE_PREFERRED,
            Frame::PeerGone { .. } => FrameType::PEER_GONE,
            Frame::PeerPresent { .. } => FrameType::PEER_PRESENT,
            Frame::ForwardPacket { .. } => FrameType::FORWARD_PACKET,
            Frame::WatchConns => FrameType::WATCH_CONNS,
            Frame::ClosePeer { .. } => FrameType::CLOSE_PEER,
            Frame::Ping { .. } => FrameType::PING,
            Frame::Pong { .. } => FrameType::PONG,
            Frame::Health { .. } => FrameType::HEALTH,
            Frame::Restarting { .. } => FrameType::RESTARTING,
            Frame::Unknown { ty, .. } => FrameType(*ty),
        }
    }

    /// Length of the payload [`Frame::encode`] writes (the header excluded).
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ServerKey { .. } => MAGIC.len() + KEY_LEN,
            Frame::ClientInfo { sealed, .. } => KEY_LEN + sealed.len(),
            Frame::ServerInfo { sealed } => sealed.len(),
            Frame::SendPacket { packet, .. } | Frame::RecvPacket { packet, .. } => KEY_LEN + packet.len(),
            Frame::KeepAlive | Frame::WatchConns => 0,
            Frame::NotePreferred { .. } => 1,
            Frame::PeerGone { .. } => KEY_LEN + 1,
            Frame::PeerPresent { endpoint: None, .. } => KEY_LEN,
            Frame::PeerPresent { endpoint: Some(_), .. } => KEY_LEN + 16 + 2 + 1,
            Frame::ForwardPacket { packet, .. } => 2 * KEY_LEN + packet.len(),
            Frame::ClosePeer { .. } => KEY_LEN,
            Frame::Ping { .. } | Frame::Pong { .. } => PING_DATA_LEN,
            Frame::Health { problem } => problem.len(),
            Frame::Restarting { .. } => 8,
            Frame::Unknown { payload, .. } => payload.len(),
        }
    }

    /// Reports whether the frame is one a conforming peer would accept: relayed packets within
    /// [`MAX_PACKET_SIZE`], payload within [`MAX_FRAME_LEN`]. [`Frame::encode`] does not check.
    pub fn validate(&self) -> Result<(), DerpError> {
        match self {
            Frame::SendPacket { packet, .. }
            | Frame::RecvPacket { packet, .. }
            | Frame::ForwardPacket { packet, .. } => check_packet(packet.len())?,
            _ => {}
        }
        let len = self.payload_len();
        let max = match self.frame_type() {
            FrameType::CLIENT_INFO => MAX_CLIENT_INFO_LEN,
            _ => MAX_FRAME_LEN,
        };
        if len > max {
            return Err(DerpError::FrameTooLarge { ty: self.frame_type().0, len, max });
        }
        Ok(())
    }

    /// Appends the frame (header and payload) to `out`.
    ///
    /// Lengths are not checked; call [`Frame::validate`] first for frames built from data the
    /// caller does not control.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let len = self.payload_len();
        out.reserve(HEADER_LEN + len);
        out.push(self.frame_type().0);
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        match self {
            Frame::ServerKey { key } => {
                out.extend_from_slice(MAGIC);
                out.extend_from_slice(&key.0);
            }
            Frame::ClientInfo { key, sealed } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(sealed);
            }
            Frame::ServerInfo { sealed } => out.extend_from_slice(sealed),
            Frame::SendPacket { dst: key, packet } | Frame::RecvPacket { src: key, packet } => {
                out.extend_from_slice(&key.0);
                out.extend_from_slice(packet);
            }
            Frame::KeepAlive | Frame::WatchConns => {}
            Frame::NotePreferred { preferred } => out.push(u8::from(*preferred)),
            Frame::PeerGone { peer, reason } => {
                out.extend_from_slice(&peer.0);
                out.push(reason.0);
            }
            Frame::PeerPresent { peer, endpoint, flags } => {
                out.extend_from_slice(&peer.0);
                if let Some(ep) = endpoint {
                    out.extend_from_slice(&addr_to16(ep.ip()));
                    out.extend_from_slice(&ep.port().to_be_bytes());
                    out.push(flags.0);
                }
            }
            Frame::ForwardPacket { src, dst, packet } => {
                out.extend_from_slice(&src.0);
                out.extend_from_slice(&dst.0);
                out.extend_from_slice(packet);
            }
            Frame::ClosePeer { peer } => out.extend_from_slice(&peer.0),
            Frame::Ping { data } | Frame::Pong { data } => out.extend_from_slice(data),
            Frame::Health { problem } => out.extend_from_slice(problem.as_bytes()),
            Frame::Restarting { reconnect_in, try_for } => {
                out.extend_from_slice(&millis_u32(*reconnect_in).to_be_bytes());
                out.extend_from_slice(&millis_u32(*try_for).to_be_bytes());
            }
            Frame::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
    }

    /// The frame as a fresh byte vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed, else the frame and the number of bytes it
    /// took. After an error the stream is out of sync only if the header itself was rejected
    /// ([`DerpError::FrameTooLarge`] from [`split_frame`]); a driver that wants Tailscale's
    /// "log and skip" behaviour for malformed payloads can use [`split_frame`] and
    /// [`Frame::parse`] directly.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DerpError> {
        let Some(raw) = split_frame(buf)? else {
            return Ok(None);
        };
        Ok(Some((Frame::parse(raw.ty, raw.payload)?, raw.wire_len())))
    }

    /// Interprets the payload of a frame of type `ty`.
    pub fn parse(ty: FrameType, p: &[u8]) -> Result<Frame, DerpError> {
        let len = p.len();
        let short = DerpError::Short { ty: ty.0, len };
        let wrong = DerpError::WrongLength { ty: ty.0, len };
        if len > MAX_FRAME_LEN {
            return Err(DerpError::FrameTooLarge { ty: ty.0, len, max: MAX_FRAME_LEN });
        }
        let frame = match ty {
            FrameType::SERVER_KEY => {
                // Bytes after the key are reserved for future use and ignored, as Go does.
                let magic = p.get(..MAGIC.len()).ok_or(short)?;
                if magic != MAGIC {
                    return Err(DerpError::BadMagic);
                }
                let key = key_at(p, MAGIC.len()).ok_or(DerpError::Short { ty: ty.0, len })?;
                Frame::ServerKey { key }
            }
            FrameType::CLIENT_INFO => {
                if len < KEY_LEN + NONCE_LEN {
                    return Err(short);
                }
                if len > MAX_CLIENT_INFO_LEN {
                    return Err(DerpError::FrameTooLarge { ty: ty.0, len, max: MAX_CLIENT_INFO_LEN });
                }
                let key = key_at(p, 0).ok_or(short)?;
                Frame::ClientInfo { key, sealed: p[KEY_LEN..].to_vec() }
            }
            FrameType::SERVER_INFO => {
                if len < NONCE_LEN {
                    return Err(short);
                }
                Frame::ServerInfo { sealed: p.to_vec() }
            }
            FrameType::SEND_PACKET | FrameType::RECV_PACKET => {
                let key = key_at(p, 0).ok_or(short)?;
                let packet = &p[KEY_LEN..];
                check_packet(packet.len())?;
                if ty == FrameType::SEND_PACKET {
                    Frame::SendPacket { dst: key, packet: packet.to_vec() }
                } else {
                    Frame::RecvPacket { src: key, packet: packet.to_vec() }
                }
            }
            FrameType::KEEP_ALIVE => Frame::KeepAlive,
            FrameType::NOTE_PREFERRED => match p {
                [b] => Frame::NotePreferred { preferred: *b != 0 },
                _ => return Err(wrong),
            },
            FrameType::PEER_GONE => {
                let peer = key_at(p, 0).ok_or(short)?;
                // Servers predating the reason byte send only the key.
                let reason = PeerGoneReason(p.get(KEY_LEN).copied().unwrap_or(0));
                Frame::PeerGone { peer, reason }
            }
            FrameType::PEER_PRESENT => {
                let peer = key_at(p, 0).ok_or(short)?;
                // Older servers omit the endpoint, or the flags byte; newer ones may append more.
                let endpoint = p.get(KEY_LEN..KEY_LEN + 18).map(|ep| {
                    let mut ip = [0u8; 16];
                    ip.copy_from_slice(&ep[..16]);
                    addr_from16(ip, u16::from_be_bytes([ep[16], ep[17]]))
                });
                let flags = PeerPresentFlags(p.get(KEY_LEN + 18).copied().unwrap_or(0));
                Frame::PeerPresent { peer, endpoint, flags }
            }
            FrameType::FORWARD_PACKET => {
                let src = key_at(p, 0).ok_or(short)?;
                let dst = key_at(p, KEY_LEN).ok_or(DerpError::Short { ty: ty.0, len })?;
                let packet = &p[2 * KEY_LEN..];
                check_packet(packet.len())?;
                Frame::ForwardPacket { src, dst, packet: packet.to_vec() }
            }
            FrameType::WATCH_CONNS => {
                if len != 0 {
                    return Err(wrong);
                }
                Frame::WatchConns
            }
            FrameType::CLOSE_PEER => {
                if len != KEY_LEN {
                    return Err(wrong);
                }
                Frame::ClosePeer { peer: key_at(p, 0).ok_or(wrong)? }
            }
            FrameType::PING | FrameType::PONG => {
                if len > MAX_PING_LEN {
                    return Err(DerpError::FrameTooLarge { ty: ty.0, len, max: MAX_PING_LEN });
                }
                let data: [u8; PING_DATA_LEN] = p.get(..PING_DATA_LEN).and_then(|d| d.try_into().ok()).ok_or(short)?;
                if ty == FrameType::PING {
                    Frame::Ping { data }
                } else {
                    Frame::Pong { data }
                }
            }
            FrameType::HEALTH => Frame::Health { problem: String::from_utf8_lossy(p).into_owned() },
            FrameType::RESTARTING => {
                let b = p.get(..8).ok_or(short)?;
                let ms = |i: usize| u64::from(u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
                Frame::Restarting { reconnect_in: Duration::from_millis(ms(0)), try_for: Duration::from_millis(ms(4)) }
            }
            FrameType(other) => Frame::Unknown { ty: other, payload: p.to_vec() },
        };
        Ok(frame)
    }
}

/// Seals `plaintext` from `ours` to `theirs` as Go's `NodePrivate.SealTo` does:
/// `nonce (24) · Poly1305 tag (16) · XSalsa20 ciphertext` (NaCl `crypto_box`).
/// Towards a low-order key the result is the bare nonce, which never opens.
pub fn seal_box(ours: &PrivateKey, theirs: &[u8; 32], nonce: [u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
    match salsa_box(ours, theirs) {
        Some(b) => seal_with(&b, nonce, plaintext),
        None => nonce.to_vec(),
    }
}

/// Opens a box made by [`seal_box`] (or Go's `SealTo`) from `theirs` to `ours`; `None` if it is
/// truncated, tampered with, from another key or from a low-order key.
pub fn open_box(ours: &PrivateKey, theirs: &[u8; 32], sealed: &[u8]) -> Option<Vec<u8>> {
    open_with(&salsa_box(ours, theirs)?, sealed)
}

/// The precomputed NaCl box key between two parties (HSalsa20 of the X25519 secret); `None`
/// when `theirs` is a low-order point (the X25519 secret would be all zero, known to anyone).
pub(crate) fn salsa_box(ours: &PrivateKey, theirs: &[u8; 32]) -> Option<SalsaBox> {
    if ours.dh(theirs).iter().fold(0u8, |acc, b| acc | b) == 0 {
        return None;
    }
    Some(SalsaBox::new(&PublicKey::from(*theirs), &SecretKey::from(ours.to_bytes())))
}

pub(crate) fn seal_with(b: &SalsaBox, nonce: [u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NONCE_LEN + BOX_OVERHEAD + plaintext.len());
    out.extend_from_slice(&nonce);
    // XSalsa20-Poly1305 encryption has no failure mode for in-memory buffers below 256 GiB;
    // an empty box (which then fails to open) is the conservative fallback.
    let ct = b.encrypt(GenericArray::from_slice(&nonce), plaintext).unwrap_or_default();
    out.extend_from_slice(&ct);
    out
}

pub(crate) fn open_with(b: &SalsaBox, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + BOX_OVERHEAD {
        return None;
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    b.decrypt(GenericArray::from_slice(nonce), ct).ok()
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// What a client tells the server about itself at login (Go's `derp.ClientInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Pre-shared mesh key (64 hex digits) for trusted region peers; absent for clients.
    #[serde(rename = "meshKey", default, skip_serializing_if = "Option::is_none")]
    pub mesh_key: Option<String>,
    /// DERP protocol version the client speaks ([`PROTOCOL_VERSION`]).
    #[serde(rename = "version", default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// Whether the client answers server Pings (Tailscale's field is always present).
    #[serde(rename = "CanAckPings", default)]
    pub can_ack_pings: bool,
    /// Whether the client is a prober.
    #[serde(rename = "IsProber", default, skip_serializing_if = "std::ops::Not::not")]
    pub is_prober: bool,
    /// Opaque application name for server statistics.
    #[serde(rename = "AppName", default, skip_serializing_if = "String::is_empty")]
    pub app_name: String,
}

/// What the server tells the client after login (Go's `derp.ServerInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServerInfo {
    /// DERP protocol version the server speaks.
    #[serde(rename = "version", default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// Advisory send rate limit in bytes per second (framing included); zero = unspecified.
    #[serde(rename = "TokenBucketBytesPerSecond", default, skip_serializing_if = "is_zero_i64")]
    pub token_bucket_bytes_per_second: i64,
    /// Advisory burst for that limit; zero = unspecified.
    #[serde(rename = "TokenBucketBytesBurst", default, skip_serializing_if = "is_zero_i64")]
    pub token_bucket_bytes_burst: i64,
}

fn nonzero(key: &[u8; 32]) -> Result<(), DerpError> {
    if *key == [0u8; 32] {
        return Err(DerpError::ZeroKey);
    }
    Ok(())
}

fn open_json<T: for<'de> Deserialize<'de>>(
    ty: FrameType,
    ours: &PrivateKey,
    theirs: &[u8; 32],
    sealed: &[u8],
    max: usize,
) -> Result<T, DerpError> {
    nonzero(theirs)?;
    if sealed.len() > max {
        return Err(DerpError::FrameTooLarge { ty: ty.0, len: sealed.len(), max });
    }
    let json = open_box(ours, theirs, sealed).ok_or(DerpError::Open)?;
    Ok(serde_json::from_slice(&json)?)
}

impl ClientInfo {
    /// Info as citadel sends it: protocol v2, able to answer pings.
    pub fn citadel() -> Self {
        Self { version: PROTOCOL_VERSION, can_ack_pings: true, ..Self::default() }
    }

    /// Builds the client's login frame: `client` seals this info to the server's key.
    pub fn seal(&self, client: &PrivateKey, server: &NodePublic, nonce: [u8; NONCE_LEN]) -> Frame {
        // Serializing a struct of strings, bools and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        Frame::ClientInfo { key: NodePublic(client.public_bytes()), sealed: seal_box(client, &server.0, nonce, &json) }
    }

    /// Opens the `sealed` part of a ClientInfo frame from `client`, as the server holding
    /// `server`.
    pub fn open(server: &PrivateKey, client: &NodePublic, sealed: &[u8]) -> Result<Self, DerpError> {
        open_json(FrameType::CLIENT_INFO, server, &client.0, sealed, MAX_CLIENT_INFO_LEN - KEY_LEN)
    }
}

impl ServerInfo {
    /// Info as nexus-sim sends it: protocol v2, no rate limit.
    pub fn current() -> Self {
        Self { version: PROTOCOL_VERSION, ..Self::default() }
    }

    /// Builds the server's answer frame: `server` seals this info to the client's key.
    pub fn seal(&self, server: &PrivateKey, client: &NodePublic, nonce: [u8; NONCE_LEN]) -> Frame {
        let json = serde_json::to_vec(self).unwrap_or_default();
        Frame::ServerInfo { sealed: seal_box(server, &client.0, nonce, &json) }
    }

    /// Opens the `sealed` payload of a ServerInfo frame, as the client holding `client`.
    pub fn open(client: &PrivateKey, server: &NodePublic, sealed: &[u8]) -> Result<Self, DerpError> {
        open_json(FrameType::SERVER_INFO, client, &server.0, sealed, NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN)
    }
}

/// HTTP facts of the DERP upgrade, for the client's request and nexus-sim's handler.
///
/// The client sends `GET /derp HTTP/1.1` with `Upgrade: DERP` and `Connection: Upgrade`.
/// The server answers `101 Switching Protocols` with `Upgrade: DERP`, `Connection: Upgrade`,
/// [`VERSION_HEADER`] and [`PUBLIC_KEY_HEADER`] (see [`switching_protocols`]), then sends the
/// ServerKey frame. With [`FAST_START_HEADER`]` = 1` (sent only when the client already knows
/// the server key from its TLS certificate) the server writes no HTTP response at all and the
/// client starts with its ClientInfo frame right after the request. The server otherwise
/// answers `426 Upgrade Required` when `Upgrade` is neither `DERP` nor `websocket`
/// (case-insensitive).
pub mod upgrade {
    use crate::keys::NodePublic;

    /// Path of the upgrade request.
    pub const PATH: &str = "/derp";
    /// Path answering latency probes (HEAD/GET, empty 200) for clients without UDP.
    pub const PROBE_PATH: &str = "/derp/probe";
    /// Alias of [`PROBE_PATH`].
    pub const LATENCY_CHECK_PATH: &str = "/derp/latency-check";
    /// Captive-portal check path (204 No Content).
    pub const GENERATE_204_PATH: &str = "/generate_204";
    /// Value of the `Upgrade` header.
    pub const PROTOCOL: &str = "DERP";
    /// WebSocket subprotocol for browsers that cannot upgrade to raw DERP.
    pub const WEBSOCKET_SUBPROTOCOL: &str = "derp";
    /// Request header (value `1`): the server must not write an HTTP response.
    pub const FAST_START_HEADER: &str = "Derp-Fast-Start";
    /// Optional request header naming the region's first node when connected elsewhere.
    pub const IDEAL_NODE_HEADER: &str = "Ideal-Node";
    /// Response header carrying the server's DERP protocol version.
    pub const VERSION_HEADER: &str = "Derp-Version";
    /// Response header carrying the server's public key as 64 bare hex digits.
    pub const PUBLIC_KEY_HEADER: &str = "Derp-Public-Key";
    /// Request header of the captive-portal check; echoed back as `response <value>`.
    pub const NO_CONTENT_CHALLENGE_HEADER: &str = "X-Tailscale-Challenge";
    /// Response header of the captive-portal check.
    pub const NO_CONTENT_RESPONSE_HEADER: &str = "X-Tailscale-Response";
    /// Common-name prefix of the "metacert" through which a TLS server advertises its DERP
    /// key (followed by the bare hex key); clients seeing it may use fast start.
    pub const META_CERT_CN_PREFIX: &str = "derpkey";

    /// The exact 101 response a Tailscale DERP server writes before the ServerKey frame.
    pub fn switching_protocols(server: &NodePublic) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {PROTOCOL}\r\nConnection: Upgrade\r\n\
             {VERSION_HEADER}: {}\r\n{PUBLIC_KEY_HEADER}: {}\r\n\r\n",
            super::PROTOCOL_VERSION,
            hex::encode(server.0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn key(b: u8) -> NodePublic {
        NodePublic([b; 32])
    }

    fn arb_key() -> impl Strategy<Value = NodePublic> {
        any::<[u8; 32]>().prop_map(NodePublic)
    }

    /// Addresses as they come back from the wire: IPv4, or IPv6 that is not IPv4-mapped and
    /// carries no flow/scope.
    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| addr_from16(ip, p)),
        ]
    }

    fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..1600), Just(vec![0xab; MAX_PACKET_SIZE]),]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let known = prop_oneof![
            arb_key().prop_map(|key| Frame::ServerKey { key }),
            (arb_key(), proptest::collection::vec(any::<u8>(), NONCE_LEN..300))
                .prop_map(|(key, sealed)| Frame::ClientInfo { key, sealed }),
            proptest::collection::vec(any::<u8>(), NONCE_LEN..300).prop_map(|sealed| Frame::ServerInfo { sealed }),
            (arb_key(), arb_packet()).prop_map(|(dst, packet)| Frame::SendPacket { dst, packet }),
            (arb_key(), arb_packet()).prop_map(|(src, packet)| Frame::RecvPacket { src, packet }),
            Just(Frame::KeepAlive),
            any::<bool>().prop_map(|preferred| Frame::NotePreferred { preferred }),
            (arb_key(), any::<u8>()).prop_map(|(peer, r)| Frame::PeerGone { peer, reason: PeerGoneReason(r) }),
            (arb_key(), proptest::option::of((arb_addr(), any::<u8>()))).prop_map(|(peer, ep)| {
                Frame::PeerPresent { peer, endpoint: ep.map(|e| e.0), flags: PeerPresentFlags(ep.map_or(0, |e| e.1)) }
            }),
            (arb_key(), arb_key(), arb_packet()).prop_map(|(src, dst, packet)| Frame::ForwardPacket {
                src,
                dst,
                packet
            }),
            Just(Frame::WatchConns),
            arb_key().prop_map(|peer| Frame::ClosePeer { peer }),
            any::<[u8; 8]>().prop_map(|data| Frame::Ping { data }),
            any::<[u8; 8]>().prop_map(|data| Frame::Pong { data }),
            ".{0,200}".prop_map(|problem| Frame::Health { problem }),
            (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Frame::Restarting {
                reconnect_in: Duration::from_millis(a.into()),
                try_for: Duration::from_millis(b.into()),
            }),
        ];
        let unknown = (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_filter("unassigned type", |(ty, _)| !matches!(ty, 0x01..=0x0a | 0x10..=0x15))
            .prop_map(|(ty, payload)| Frame::Unknown { ty, payload });
        prop_oneof![9 => known, 1 => unknown]
    }

    proptest! {
        #[test]
        fn frame_round_trip(f in arb_frame()) {
            prop_assert!(f.validate().is_ok());
            let mut buf = f.to_vec();
            prop_assert_eq!(buf.len(), HEADER_LEN + f.payload_len());
            let (g, used) = Frame::decode(&buf).unwrap().unwrap();
            prop_assert_eq!(&g, &f);
            prop_assert_eq!(used, buf.len());
            // Every strict prefix asks for more bytes rather than failing or guessing.
            for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, buf.len() - 1] {
                if cut < buf.len() {
                    prop_assert!(Frame::decode(&buf[..cut]).unwrap().is_none());
                }
            }
            // Two frames back to back: the first decode consumes exactly one.
            f.encode(&mut buf);
            let (_, used2) = Frame::decode(&buf).unwrap().unwrap();
            prop_assert_eq!(used2, used);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Some((_, used))) = Frame::decode(&b) {
                prop_assert!(used <= b.len());
            }
        }

        #[test]
        fn arbitrary_payloads_never_panic(ty in any::<u8>(), p in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Frame::parse(FrameType(ty), &p);
        }

        #[test]
        fn sealed_info_round_trip(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), nonce in any::<[u8; 24]>(),
                                  app in "[a-z]{0,12}", prober in any::<bool>()) {
            let client = PrivateKey::from_bytes(a);
            let server = PrivateKey::from_bytes(b);
            let server_pub = NodePublic(server.public_bytes());
            let info = ClientInfo { app_name: app, is_prober: prober, ..ClientInfo::citadel() };
            let Frame::ClientInfo { key, sealed } = info.seal(&client, &server_pub, nonce) else {
                panic!("seal builds a ClientInfo frame");
            };
            prop_assert_eq!(key, NodePublic(client.public_bytes()));
            prop_assert_eq!(&sealed[..NONCE_LEN], &nonce[..]);
            prop_assert_eq!(ClientInfo::open(&server, &key, &sealed).unwrap(), info);

            let si = ServerInfo { token_bucket_bytes_per_second: 5, ..ServerInfo::current() };
            let Frame::ServerInfo { sealed } = si.seal(&server, &key, nonce) else {
                panic!("seal builds a ServerInfo frame");
            };
            prop_assert_eq!(ServerInfo::open(&client, &server_pub, &sealed).unwrap(), si);
        }
    }

    #[test]
    fn magic_is_derp_key_emoji() {
        assert_eq!(MAGIC, "DERP🔑".as_bytes());
        assert_eq!(MAGIC, &[0x44, 0x45, 0x52, 0x50, 0xf0, 0x9f, 0x94, 0x91]);
    }

    #[test]
    fn known_answer_layouts() {
        // ServerKey: type 0x01, length 40, magic, key.
        let b = Frame::ServerKey { key: key(7) }.to_vec();
        assert_eq!(&b[..5], &[0x01, 0, 0, 0, 40]);
        assert_eq!(&b[5..13], MAGIC);
        assert_eq!(&b[13..], &[7; 32]);

        // SendPacket: type 0x04, length 32 + n, dst key, packet.
        let b = Frame::SendPacket { dst: key(1), packet: vec![9, 8, 7] }.to_vec();
        assert_eq!(&b[..5], &[0x04, 0, 0, 0, 35]);
        assert_eq!(&b[5..37], &[1; 32]);
        assert_eq!(&b[37..], &[9, 8, 7]);

        // PeerPresent with IPv4 endpoint: key · ::ffff:a.b.c.d · port BE · flags.
        let ep = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 0x1234));
        let f = Frame::PeerPresent { peer: key(2), endpoint: Some(ep), flags: PeerPresentFlags(1) };
        let b = f.to_vec();
        assert_eq!(&b[..5], &[0x09, 0, 0, 0, 51]);
        assert_eq!(&b[37..53], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]);
        assert_eq!(&b[53..], &[0x12, 0x34, 1]);

        // Restarting: two u32 BE milliseconds.
        let f = Frame::Restarting { reconnect_in: Duration::from_millis(500), try_for: Duration::from_secs(5) };
        assert_eq!(f.to_vec(), vec![0x15, 0, 0, 0, 8, 0, 0, 1, 0xf4, 0, 0, 0x13, 0x88]);

        // Wire bytes as a v2 Tailscale server writes them: PeerGone with reason NotHere.
        let mut wire = vec![0x08, 0, 0, 0, 33];
        wire.extend_from_slice(&[3; 32]);
        wire.push(1);
        let (f, n) = Frame::decode(&wire).unwrap().unwrap();
        assert_eq!(n, 38);
        assert_eq!(f, Frame::PeerGone { peer: key(3), reason: PeerGoneReason::NOT_HERE });
    }

    #[test]
    fn lenient_where_go_is_lenient() {
        // Old PeerGone without reason byte.
        let mut p = vec![4; 32];
        assert_eq!(
            Frame::parse(FrameType::PEER_GONE, &p).unwrap(),
            Frame::PeerGone { peer: key(4), reason: PeerGoneReason::DISCONNECTED }
        );
        // Old PeerPresent: key only, then key + endpoint without flags.
        assert_eq!(
            Frame::parse(FrameType::PEER_PRESENT, &p).unwrap(),
            Frame::PeerPresent { peer: key(4), endpoint: None, flags: PeerPresentFlags(0) }
        );
        p.extend_from_slice(&addr_to16(Ipv4Addr::new(10, 1, 2, 3).into()));
        p.extend_from_slice(&80u16.to_be_bytes());
        let f = Frame::parse(FrameType::PEER_PRESENT, &p).unwrap();
        assert_eq!(
            f,
            Frame::PeerPresent {
                peer: key(4),
                endpoint: Some(SocketAddr::from(([10, 1, 2, 3], 80))),
                flags: PeerPresentFlags(0)
            }
        );
        // ServerKey with extra trailing bytes, ping with an extension.
        let mut sk = MAGIC.to_vec();
        sk.extend_from_slice(&[5; 40]);
        assert_eq!(Frame::parse(FrameType::SERVER_KEY, &sk).unwrap(), Frame::ServerKey { key: key(5) });
        assert_eq!(Frame::parse(FrameType::PING, &[1; 20]).unwrap(), Frame::Ping { data: [1; 8] });
        assert!(matches!(Frame::parse(FrameType::KEEP_ALIVE, b"x"), Ok(Frame::KeepAlive)));
    }

    #[test]
    fn limits_and_truncation_are_errors() {
        // A header announcing > 1 MiB fails before the payload arrives.
        let huge = [0x05, 0x00, 0x10, 0x00, 0x01];
        assert!(matches!(Frame::decode(&huge), Err(DerpError::FrameTooLarge { .. })));
        let max = [0x05, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(Frame::decode(&max), Err(DerpError::FrameTooLarge { .. })));

        // A packet one byte over 64 KiB.
        let f = Frame::SendPacket { dst: key(1), packet: vec![0; MAX_PACKET_SIZE + 1] };
        assert!(matches!(f.validate(), Err(DerpError::PacketTooLarge { .. })));
        assert!(matches!(Frame::decode(&f.to_vec()), Err(DerpError::FrameTooLarge { .. })));
        assert!(matches!(
            Frame::parse(FrameType::SEND_PACKET, &f.to_vec()[5..]),
            Err(DerpError::PacketTooLarge { .. })
        ));
        // Packet frames are refused from the header alone, long before 1 MiB is buffered.
        assert!(matches!(Frame::decode(&[0x04, 0, 1, 0, 0x21]), Err(DerpError::FrameTooLarge { .. })));
        assert!(Frame::decode(&[0x04, 0, 1, 0, 0x20]).unwrap().is_none());

        assert!(matches!(Frame::parse(FrameType::RECV_PACKET, &[0; 31]), Err(DerpError::Short { .. })));
        assert!(matches!(Frame::parse(FrameType::FORWARD_PACKET, &[0; 63]), Err(DerpError::Short { .. })));
        assert!(matches!(Frame::parse(FrameType::SERVER_KEY, &[0; 40]), Err(DerpError::BadMagic)));
        assert!(matches!(Frame::parse(FrameType::SERVER_KEY, &MAGIC[..]), Err(DerpError::Short { .. })));
        assert!(matches!(Frame::parse(FrameType::CLIENT_INFO, &[0; 55]), Err(DerpError::Short { .. })));
        assert!(matches!(
            Frame::parse(FrameType::CLIENT_INFO, &vec![0; MAX_CLIENT_INFO_LEN + 1]),
            Err(DerpError::FrameTooLarge { .. })
        ));
        assert!(matches!(Frame::parse(FrameType::NOTE_PREFERRED, &[]), Err(DerpError::WrongLength { .. })));
        assert!(matches!(Frame::parse(FrameType::NOTE_PREFERRED, &[1, 1]), Err(DerpError::WrongLength { .. })));
        assert!(matches!(Frame::parse(FrameType::WATCH_CONNS, &[0]), Err(DerpError::WrongLength { .. })));
        assert!(matches!(Frame::parse(FrameType::CLOSE_PEER, &[0; 33]), Err(DerpError::WrongLength { .. })));
        assert!(matches!(Frame::parse(FrameType::PING, &[0; 7]), Err(DerpError::Short { .. })));
        assert!(matches!(Frame::parse(FrameType::PONG, &[0; 1001]), Err(DerpError::FrameTooLarge { .. })));
        assert!(matches!(Frame::parse(FrameType::RESTARTING, &[0; 7]), Err(DerpError::Short { .. })));
    }

    #[test]
    fn sealed_info_rejects_wrong_keys_and_tampering() {
        let client = PrivateKey::from_bytes([1; 32]);
        let server = PrivateKey::from_bytes([2; 32]);
        let other = PrivateKey::from_bytes([3; 32]);
        let server_pub = NodePublic(server.public_bytes());
        let Frame::ClientInfo { key, mut sealed } = ClientInfo::citadel().seal(&client, &server_pub, [9; 24]) else {
            unreachable!()
        };
        assert!(matches!(ClientInfo::open(&other, &key, &sealed), Err(DerpError::Open)));
        assert!(matches!(ClientInfo::open(&server, &NodePublic([0; 32]), &sealed), Err(DerpError::ZeroKey)));
        assert!(matches!(ClientInfo::open(&server, &key, &sealed[..39]), Err(DerpError::Open)));
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(matches!(ClientInfo::open(&server, &key, &sealed), Err(DerpError::Open)));
        // A box that opens but does not hold the JSON.
        let junk = seal_box(&client, &server_pub.0, [0; 24], b"not json");
        assert!(matches!(ClientInfo::open(&server, &key, &junk), Err(DerpError::Json(_))));
    }

    #[test]
    fn client_info_json_uses_go_field_names() {
        let j = serde_json::to_value(ClientInfo::citadel()).unwrap();
        assert_eq!(j, serde_json::json!({"version": 2, "CanAckPings": true}));
        let j = serde_json::to_value(ServerInfo::current()).unwrap();
        assert_eq!(j, serde_json::json!({"version": 2}));
        // What a Tailscale 1.90 client sends (CanAckPings always present, omitempty elsewhere).
        let go: ClientInfo = serde_json::from_str(r#"{"version":2,"CanAckPings":true}"#).unwrap();
        assert_eq!(go, ClientInfo::citadel());
        let mesh: ClientInfo =
            serde_json::from_str(r#"{"meshKey":"ab","version":2,"CanAckPings":false,"IsProber":true,"AppName":"x"}"#)
                .unwrap();
        assert_eq!((mesh.mesh_key.as_deref(), mesh.is_prober, mesh.app_name.as_str()), (Some("ab"), true, "x"));
    }

    /// The NaCl `crypto_box` test vector (Bernstein's NaCl tests, using RFC 7748's Alice and
    /// Bob keys): Go's `box.Seal` and therefore `SealTo` produce these bytes, tag first.
    #[test]
    fn nacl_box_known_answer() {
        let alice = PrivateKey::from_bytes(hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let bob = PrivateKey::from_bytes(hex32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
        assert_eq!(bob.public_bytes(), hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let nonce: [u8; 24] =
            hex::decode("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37").unwrap().try_into().unwrap();
        let plain = hex::decode(concat!(
            "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffc",
            "e5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb31",
            "0e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde",
            "048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f93776384864",
            "5e0705"
        ))
        .unwrap();
        let sealed = seal_box(&alice, &bob.public_bytes(), nonce, &plain);
        assert_eq!(sealed.len(), NONCE_LEN + BOX_OVERHEAD + plain.len());
        assert_eq!(&sealed[..24], &nonce);
        assert_eq!(hex::encode(&sealed[24..56]), "f3ffc7703f9400e52a7dfb4b3d3305d98e993b9f48681273c29650ba32fc76ce");
        assert_eq!(open_box(&bob, &alice.public_bytes(), &sealed).unwrap(), plain);
    }

    fn hex32(s: &str) -> [u8; 32] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn boxes_from_or_to_low_order_keys_are_refused() {
        let server = PrivateKey::from_bytes([2; 32]);
        let attacker = PrivateKey::from_bytes([3; 32]);
        for low in crate::keys::LOW_ORDER_POINTS {
            // With a low-order key the shared secret is all zero, so anyone can forge this box.
            let forged = seal_box(&attacker, &low, [4; 24], br#"{"version":2}"#);
            assert_eq!(open_box(&server, &low, &forged), None, "{}", hex::encode(low));
            assert!(ClientInfo::open(&server, &NodePublic(low), &forged).is_err());
        }
    }

    #[test]
    fn upgrade_response_text() {
        let r = upgrade::switching_protocols(&key(0xab));
        assert!(r.starts_with("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"));
        assert!(r.contains("Derp-Version: 2\r\n"));
        assert!(r.ends_with(&format!("Derp-Public-Key: {}\r\n\r\n", "ab".repeat(32))));
    }
}
