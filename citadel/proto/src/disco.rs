//! Disco ("discovery") messages: the sealed ping/pong/call-me-maybe packets peers exchange
//! over UDP or DERP to find and verify direct paths.
//!
//! ```text
//! packet    = magic "TS💬" (6) · sender disco public key (32) · nonce (24) · box
//! box       = NaCl crypto_box(sender → recipient disco keys): tag (16) · ciphertext
//! plaintext = type (1) · version (1) · body
//! ping      = tx id (12) · sender node key (32, optional) · zero padding
//! pong      = tx id (12) · observed source IP (16, IPv4-mapped for IPv4) · port (u16 BE)
//! call-me-maybe = endpoints, each IP (16) · port (u16 BE)
//! ```
//!
//! Parsing follows Tailscale's `disco` package: bytes after a known body are ignored, the
//! version byte is ignored for ping and pong, and a call-me-maybe with a non-zero version or a
//! body that is not a whole number of endpoints carries no endpoints. Sans-IO: the caller
//! supplies the nonce.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use crypto_box::SalsaBox;

use crate::derp::{addr_from16, addr_to16, open_with, salsa_box, seal_with, BOX_OVERHEAD};
use crate::keys::{DiscoPublic, NodePublic, PrivateKey};

/// The first six bytes of every disco packet, the UTF-8 of "TS💬".
pub const MAGIC: &[u8; 6] = b"TS\xf0\x9f\x92\xac";
/// Length of a disco public key.
pub const KEY_LEN: usize = 32;
/// Length of the NaCl nonce.
pub const NONCE_LEN: usize = 24;
/// Cleartext header: magic, sender key, nonce.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// Smallest packet that can open: header, box tag, type and version bytes.
pub const MIN_PACKET_LEN: usize = HEADER_LEN + BOX_OVERHEAD + 2;
/// Length of a transaction id.
pub const TX_ID_LEN: usize = 12;
/// Length of one endpoint in a call-me-maybe or pong: 16-byte IP and a u16 BE port.
pub const ENDPOINT_LEN: usize = 18;
/// Body of a ping without padding: tx id and node key.
pub const PING_LEN: usize = TX_ID_LEN + 32;
/// Body of a pong: tx id and source endpoint.
pub const PONG_LEN: usize = TX_ID_LEN + ENDPOINT_LEN;
/// The only message version defined.
pub const VERSION: u8 = 0;

/// Message type bytes. Types 0x04–0x09 are Tailscale's UDP-relay messages (bind endpoint,
/// challenge, answer, call-me-maybe-via, allocate request/response), which citadel does not
/// use; they decode to [`DiscoError::UnknownType`] and, like any unknown type, should be
/// dropped quietly.
pub mod msg_type {
    /// [`super::Ping`].
    pub const PING: u8 = 0x01;
    /// [`super::Pong`].
    pub const PONG: u8 = 0x02;
    /// [`super::CallMeMaybe`].
    pub const CALL_ME_MAYBE: u8 = 0x03;
}

/// A path probe; the recipient answers with a [`Pong`] carrying the same tx id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// Random per-ping transaction id.
    pub tx_id: [u8; TX_ID_LEN],
    /// The sender's claimed node (WireGuard) key; all zero when an old sender omitted it.
    /// Not proof of anything by itself: match it against the netmap.
    pub node_key: NodePublic,
    /// Zero bytes after the body, used to probe the path MTU.
    pub padding: usize,
}

/// The answer to a [`Ping`]: where the ping appeared to come from (a STUN-like observation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong {
    /// The tx id of the ping being answered.
    pub tx_id: [u8; TX_ID_LEN],
    /// The ping's source address as seen by the responder.
    pub src: SocketAddr,
}

/// A request, sent over DERP, to start pinging the sender's endpoints (hole punching).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallMeMaybe {
    /// The sender's candidate endpoints.
    pub endpoints: Vec<SocketAddr>,
}

/// A decoded disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Ping`].
    Ping(Ping),
    /// See [`Pong`].
    Pong(Pong),
    /// See [`CallMeMaybe`].
    CallMeMaybe(CallMeMaybe),
}

/// Errors opening or parsing disco packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoError {
    /// The packet lacks the magic or is shorter than the cleartext header.
    #[error("not a disco packet")]
    NotDisco,
    /// The box did not open (not for us, tampered, or truncated).
    #[error("disco box did not open")]
    Open,
    /// The plaintext is shorter than its message type requires.
    #[error("short disco message")]
    Short,
    /// A message type this codec does not handle; drop it.
    #[error("unknown disco message type {0:#04x}")]
    UnknownType(u8),
}

impl Message {
    /// Appends the plaintext (type, version 0, body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Ping(p) => {
                out.extend_from_slice(&[msg_type::PING, VERSION]);
                out.extend_from_slice(&p.tx_id);
                // Always sent: Tailscale only omits it for a zero key, which reads back the
                // same, and omitting it would make padding ambiguous with the key.
                out.extend_from_slice(&p.node_key.0);
                out.resize(out.len() + p.padding, 0);
            }
            Message::Pong(p) => {
                out.extend_from_slice(&[msg_type::PONG, VERSION]);
                out.extend_from_slice(&p.tx_id);
                out.extend_from_slice(&addr_to16(p.src.ip()));
                out.extend_from_slice(&p.src.port().to_be_bytes());
            }
            Message::CallMeMaybe(m) => {
                out.extend_from_slice(&[msg_type::CALL_ME_MAYBE, VERSION]);
                for ep in &m.endpoints {
                    out.extend_from_slice(&addr_to16(ep.ip()));
                    out.extend_from_slice(&ep.port().to_be_bytes());
                }
            }
        }
    }

    /// The plaintext as a fresh vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Parses a plaintext (what is inside the box).
    pub fn decode(plain: &[u8]) -> Result<Message, DiscoError> {
        let [ty, version, body @ ..] = plain else {
            return Err(DiscoError::Short);
        };
        match *ty {
            msg_type::PING => {
                let tx_id: [u8; TX_ID_LEN] =
                    body.get(..TX_ID_LEN).and_then(|t| t.try_into().ok()).ok_or(DiscoError::Short)?;
                let rest = &body[TX_ID_LEN..];
                // Senders up to Tailscale 1.16 sent no node key; a shorter rest is padding.
                let (node_key, padding) = match rest.get(..32).and_then(|k| <[u8; 32]>::try_from(k).ok()) {
                    Some(k) => (NodePublic(k), rest.len() - 32),
                    None => (NodePublic::default(), rest.len()),
                };
                Ok(Message::Ping(Ping { tx_id, node_key, padding }))
            }
            msg_type::PONG => {
                let b = body.get(..PONG_LEN).ok_or(DiscoError::Short)?;
                let mut tx_id = [0u8; TX_ID_LEN];
                tx_id.copy_from_slice(&b[..TX_ID_LEN]);
                Ok(Message::Pong(Pong { tx_id, src: endpoint(&b[TX_ID_LEN..]) }))
            }
            msg_type::CALL_ME_MAYBE => {
                // Tailscale treats a malformed or future-version list as "no endpoints" rather
                // than an error, so the message still counts as a call-me-maybe.
                if *version != VERSION || body.len() % ENDPOINT_LEN != 0 {
                    return Ok(Message::CallMeMaybe(CallMeMaybe::default()));
                }
                let endpoints = body.chunks_exact(ENDPOINT_LEN).map(endpoint).collect();
                Ok(Message::CallMeMaybe(CallMeMaybe { endpoints }))
            }
            other => Err(DiscoError::UnknownType(other)),
        }
    }
}

/// Reads an 18-byte endpoint; callers pass at least 18 bytes.
fn endpoint(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    addr_from16(ip, u16::from_be_bytes([b[16], b[17]]))
}

/// Reports whether `packet` carries the disco magic and a full cleartext header (Go's
/// `LooksLikeDiscoWrapper`): the demux test between disco, WireGuard and STUN.
pub fn looks_like_disco(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet.starts_with(MAGIC)
}

/// The sender's disco key from the cleartext header, if `packet` looks like disco.
pub fn sender(packet: &[u8]) -> Option<DiscoPublic> {
    if !looks_like_disco(packet) {
        return None;
    }
    packet.get(MAGIC.len()..MAGIC.len() + KEY_LEN)?.try_into().ok().map(DiscoPublic)
}

/// The box key between our disco key and one peer's, made at the first seal or open and then
/// kept, to avoid an X25519 per packet (Tailscale's `DiscoShared`). Made on first use: its
/// Diffie-Hellman took about 0.14 ms, so a netmap of 10,000 peers cost 1.4 s before the first
/// packet, and every join cost every member of the org that much, for peers most of which
/// this node never talks to.
pub struct SharedKey {
    ours: DiscoPublic,
    theirs: DiscoPublic,
    /// Our private key (one, shared by every peer's `SharedKey`).
    secret: Arc<PrivateKey>,
    /// The box key once made; `None` inside for a low-order peer key: nothing seals or opens.
    cipher: OnceLock<Option<SalsaBox>>,
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKey").field("ours", &self.ours).field("theirs", &self.theirs).finish_non_exhaustive()
    }
}

impl SharedKey {
    /// The key between `ours` and `theirs`.
    pub fn new(ours: &PrivateKey, theirs: &DiscoPublic) -> Self {
        Self::with_public(Arc::new(ours.clone()), DiscoPublic(ours.public_bytes()), theirs)
    }

    /// [`SharedKey::new`] with our public key already known (`ours_public` must be `ours`'s).
    pub fn with_public(ours: Arc<PrivateKey>, ours_public: DiscoPublic, theirs: &DiscoPublic) -> Self {
        Self { ours: ours_public, theirs: *theirs, secret: ours, cipher: OnceLock::new() }
    }

    fn cipher(&self) -> Option<&SalsaBox> {
        self.cipher.get_or_init(|| salsa_box(&self.secret, &self.theirs.0)).as_ref()
    }

    /// The peer this key talks to.
    pub fn peer(&self) -> DiscoPublic {
        self.theirs
    }

    /// Seals `msg` into a complete disco packet from us to the peer.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], msg: &Message) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + KEY_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.ours.0);
        match self.cipher() {
            Some(c) => out.extend_from_slice(&seal_with(c, nonce, &msg.to_vec())),
            None => out.extend_from_slice(&nonce),
        }
        out
    }

    /// Opens a packet the peer sealed to us.
    ///
    /// # Errors
    /// [`DiscoError::NotDisco`] if the header is missing or names another sender,
    /// [`DiscoError::Open`] if the box fails, else whatever [`Message::decode`] reports.
    pub fn open(&self, packet: &[u8]) -> Result<Message, DiscoError> {
        if sender(packet) != Some(self.theirs) {
            return Err(DiscoError::NotDisco);
        }
        let cipher = self.cipher().ok_or(DiscoError::Open)?;
        let plain = open_with(cipher, &packet[MAGIC.len() + KEY_LEN..]).ok_or(DiscoError::Open)?;
        Message::decode(&plain)
    }
}

/// Seals `msg` from `sender` (our disco private key) to `recipient` into a complete packet.
pub fn seal(sender: &PrivateKey, recipient: &DiscoPublic, nonce: [u8; NONCE_LEN], msg: &Message) -> Vec<u8> {
    SharedKey::new(sender, recipient).seal(nonce, msg)
}

/// Opens a disco packet addressed to `recipient` and returns the sender's key and message.
///
/// # Errors
/// See [`SharedKey::open`]; [`sender`] still names the sender when the message is unknown.
pub fn open(recipient: &PrivateKey, packet: &[u8]) -> Result<(DiscoPublic, Message), DiscoError> {
    let from = sender(packet).ok_or(DiscoError::NotDisco)?;
    let msg = SharedKey::new(recipient, &from).open(packet)?;
    Ok((from, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derp::open_box;
    use proptest::prelude::*;
    use std::net::{Ipv6Addr, SocketAddrV4};

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| addr_from16(ip, p)),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<[u8; 12]>(), any::<[u8; 32]>(), 0usize..1500)
                .prop_map(|(tx_id, k, padding)| { Message::Ping(Ping { tx_id, node_key: NodePublic(k), padding }) }),
            (any::<[u8; 12]>(), arb_addr()).prop_map(|(tx_id, src)| Message::Pong(Pong { tx_id, src })),
            proptest::collection::vec(arb_addr(), 0..8)
                .prop_map(|endpoints| Message::CallMeMaybe(CallMeMaybe { endpoints })),
        ]
    }

    proptest! {
        #[test]
        fn message_round_trip(m in arb_message()) {
            prop_assert_eq!(Message::decode(&m.to_vec()).unwrap(), m);
        }

        #[test]
        fn sealed_round_trip(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), nonce in any::<[u8; 24]>(), m in arb_message()) {
            let alice = PrivateKey::from_bytes(a);
            let bob = PrivateKey::from_bytes(b);
            let bob_pub = DiscoPublic(bob.public_bytes());
            let packet = seal(&alice, &bob_pub, nonce, &m);
            prop_assert!(looks_like_disco(&packet));
            let (from, got) = open(&bob, &packet).unwrap();
            prop_assert_eq!(from, DiscoPublic(alice.public_bytes()));
            prop_assert_eq!(got, m);
            // Every truncation fails cleanly.
            for cut in [0, MAGIC.len(), HEADER_LEN, HEADER_LEN + 15, packet.len() - 1] {
                prop_assert!(open(&bob, &packet[..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_packets_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let key = PrivateKey::from_bytes([7; 32]);
            let _ = open(&key, &b);
            let _ = Message::decode(&b);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&b);
            let _ = open(&key, &with_magic);
        }
    }

    #[test]
    fn magic_is_ts_speech_balloon() {
        assert_eq!(MAGIC, "TS💬".as_bytes());
        assert_eq!(MAGIC, &[0x54, 0x53, 0xf0, 0x9f, 0x92, 0xac]);
        assert_eq!(HEADER_LEN, 62);
    }

    /// Checks a sealed ping against the offsets of Tailscale's `disco` package doc and its
    /// `Ping.AppendMarshal`, opening the box by hand rather than through [`open`].
    #[test]
    fn ping_layout_matches_tailscale_offsets() {
        let alice = PrivateKey::from_bytes([0x11; 32]);
        let bob = PrivateKey::from_bytes([0x22; 32]);
        let nonce = [0x33; 24];
        let ping = Ping { tx_id: *b"0123456789ab", node_key: NodePublic([0x44; 32]), padding: 3 };
        let packet = seal(&alice, &DiscoPublic(bob.public_bytes()), nonce, &Message::Ping(ping.clone()));

        assert_eq!(&packet[0..6], b"TS\xf0\x9f\x92\xac");
        assert_eq!(&packet[6..38], &alice.public_bytes());
        assert_eq!(&packet[38..62], &nonce);
        // box = 16-byte tag + plaintext (2 header + 12 tx + 32 key + 3 padding).
        assert_eq!(packet.len(), 62 + 16 + 2 + 12 + 32 + 3);
        let plain = open_box(&bob, &alice.public_bytes(), &packet[38..]).unwrap();
        let mut want = vec![0x01, 0x00];
        want.extend_from_slice(b"0123456789ab");
        want.extend_from_slice(&[0x44; 32]);
        want.extend_from_slice(&[0, 0, 0]);
        assert_eq!(plain, want);
    }

    #[test]
    fn pong_and_call_me_maybe_layouts() {
        let pong = Message::Pong(Pong { tx_id: [7; 12], src: SocketAddr::from(([192, 0, 2, 1], 41641)) });
        let mut want = vec![0x02, 0x00];
        want.extend_from_slice(&[7; 12]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]);
        want.extend_from_slice(&41641u16.to_be_bytes());
        assert_eq!(pong.to_vec(), want);

        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let cmm = Message::CallMeMaybe(CallMeMaybe {
            endpoints: vec![SocketAddr::from(([10, 0, 0, 1], 1)), SocketAddr::from((v6, 2))],
        });
        let b = cmm.to_vec();
        assert_eq!(b.len(), 2 + 2 * ENDPOINT_LEN);
        assert_eq!(&b[..2], &[0x03, 0x00]);
        assert_eq!(&b[2..20], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1, 0, 1]);
        assert_eq!(&b[20..36], &v6.octets());
    }

    #[test]
    fn tailscale_parse_rules() {
        // Old ping: tx id only, no key; extra bytes shorter than a key are padding.
        let mut p = vec![0x01, 0x00];
        p.extend_from_slice(&[1; 12]);
        assert_eq!(
            Message::decode(&p).unwrap(),
            Message::Ping(Ping { tx_id: [1; 12], node_key: NodePublic::default(), padding: 0 })
        );
        p.extend_from_slice(&[0; 5]);
        assert!(matches!(Message::decode(&p), Ok(Message::Ping(Ping { padding: 5, .. }))));
        // Ping/pong ignore the version byte and trailing bytes.
        let mut pong = Message::Pong(Pong { tx_id: [2; 12], src: SocketAddr::from(([1, 2, 3, 4], 5)) }).to_vec();
        pong[1] = 9;
        pong.extend_from_slice(b"future");
        assert!(matches!(Message::decode(&pong), Ok(Message::Pong(_))));
        // Short ping and pong are errors.
        assert_eq!(Message::decode(&[0x01, 0, 1, 2]), Err(DiscoError::Short));
        assert_eq!(Message::decode(&pong[..2 + PONG_LEN - 1]), Err(DiscoError::Short));
        assert_eq!(Message::decode(&[0x01]), Err(DiscoError::Short));
        // Call-me-maybe with a future version or a ragged list carries nothing.
        let mut cmm = vec![0x03, 0x01];
        cmm.extend_from_slice(&[0; 18]);
        assert_eq!(Message::decode(&cmm).unwrap(), Message::CallMeMaybe(CallMeMaybe::default()));
        cmm[1] = 0;
        cmm.push(0);
        assert_eq!(Message::decode(&cmm).unwrap(), Message::CallMeMaybe(CallMeMaybe::default()));
        // Relay messages and anything else are unknown.
        for ty in [0x00, 0x04, 0x07, 0x09, 0xff] {
            assert_eq!(Message::decode(&[ty, 0, 0, 0]), Err(DiscoError::UnknownType(ty)));
        }
    }

    #[test]
    fn open_rejects_foreign_and_tampered_packets() {
        let alice = PrivateKey::from_bytes([1; 32]);
        let bob = PrivateKey::from_bytes([2; 32]);
        let carol = PrivateKey::from_bytes([3; 32]);
        let msg = Message::CallMeMaybe(CallMeMaybe::default());
        let mut packet = seal(&alice, &DiscoPublic(bob.public_bytes()), [0; 24], &msg);
        assert_eq!(open(&carol, &packet), Err(DiscoError::Open));
        assert_eq!(sender(&packet), Some(DiscoPublic(alice.public_bytes())));
        let shared = SharedKey::new(&bob, &DiscoPublic(carol.public_bytes()));
        assert_eq!(shared.open(&packet), Err(DiscoError::NotDisco));
        let last = packet.len() - 1;
        packet[last] ^= 0x80;
        assert_eq!(open(&bob, &packet), Err(DiscoError::Open));
        assert_eq!(open(&bob, b"TS\xf0\x9f\x92"), Err(DiscoError::NotDisco));
        assert!(!looks_like_disco(&[0u8; 100]));
        // A WireGuard handshake initiation never looks like disco (first byte 1).
        assert!(!looks_like_disco(&[1, 0, 0, 0, 0x54, 0x53]));
    }
}
