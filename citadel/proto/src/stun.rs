//! STUN binding requests and responses (RFC 5389), the subset Tailscale uses to learn a node's
//! public UDP endpoint: the citadel client sends requests, nexus-sim's STUN server answers.
//!
//! ```text
//! header    = type (u16) · length of attributes (u16) · magic cookie 0x2112A442 · tx id (12)
//! attribute = type (u16) · length (u16) · value, zero-padded to a multiple of 4
//! XOR-MAPPED-ADDRESS value = 0 · family (1 = IPv4, 2 = IPv6) · port ^ 0x2112 ·
//!                            address ^ (cookie · tx id)
//! ```
//!
//! Tailscale's request carries SOFTWARE "tailnode" and a FINGERPRINT; its response carries a
//! single XOR-MAPPED-ADDRESS. Parsing also accepts the 0x8020 variant some servers send and
//! falls back to MAPPED-ADDRESS, like Tailscale's `net/stun`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// A STUN transaction id.
pub type TxId = [u8; 12];

/// The RFC 5389 magic cookie.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Length of the STUN header.
pub const HEADER_LEN: usize = 20;
/// Message type of a binding request.
pub const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a binding success response.
pub const BINDING_SUCCESS: u16 = 0x0101;
/// MAPPED-ADDRESS attribute (plain address; pre-RFC 5389 servers).
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS attribute.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// XOR-MAPPED-ADDRESS under the comprehension-optional number some servers use by mistake.
pub const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
/// SOFTWARE attribute.
pub const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute: CRC-32 of the message before it, XORed with [`FINGERPRINT_XOR`].
pub const ATTR_FINGERPRINT: u16 = 0x8028;
/// The constant ("STUN" in ASCII) XORed into the fingerprint CRC.
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// SOFTWARE value of Tailscale's requests (8 bytes, so no padding).
pub const TAILSCALE_SOFTWARE: &str = "tailnode";
/// Longest SOFTWARE value RFC 5389 allows (128 characters of up to 6 bytes); longer values are
/// truncated when encoding.
pub const MAX_SOFTWARE_LEN: usize = 763;

/// Errors parsing STUN messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// Too short, top bits set or no magic cookie.
    #[error("not a stun packet")]
    NotStun,
    /// A STUN message other than a binding request.
    #[error("not a binding request")]
    NotBindingRequest,
    /// A STUN message other than a binding success response.
    #[error("not a binding success response")]
    NotSuccessResponse,
    /// The attribute list overruns the message or is otherwise malformed.
    #[error("malformed stun attributes")]
    MalformedAttrs,
    /// The FINGERPRINT does not match the message.
    #[error("bad stun fingerprint")]
    BadFingerprint,
    /// The response has no usable (XOR-)MAPPED-ADDRESS.
    #[error("stun response has no mapped address")]
    NoMappedAddress,
}

/// Reports whether `packet` is a STUN message: at least a header, the two top bits clear and
/// the magic cookie in place (Tailscale's demux test).
pub fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= HEADER_LEN && packet[0] & 0xc0 == 0 && packet[4..8] == MAGIC_COOKIE
}

/// The transaction id of a STUN packet.
pub fn tx_id(packet: &[u8]) -> Option<TxId> {
    if !is_stun(packet) {
        return None;
    }
    packet[8..HEADER_LEN].try_into().ok()
}

fn fingerprint(b: &[u8]) -> u32 {
    crc32fast::hash(b) ^ FINGERPRINT_XOR
}

/// A binding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// Random transaction id, echoed in the response.
    pub tx_id: TxId,
    /// SOFTWARE attribute, if any.
    pub software: Option<String>,
    /// Whether a FINGERPRINT attribute ends the message.
    pub fingerprint: bool,
}

impl BindingRequest {
    /// The request Tailscale clients send: SOFTWARE "tailnode" and a FINGERPRINT.
    pub fn tailscale(tx_id: TxId) -> Self {
        Self { tx_id, software: Some(TAILSCALE_SOFTWARE.to_string()), fingerprint: true }
    }

    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let software = self.software.as_deref().map(|s| truncate(s, MAX_SOFTWARE_LEN));
        let sw_len = software.map_or(0, |s| 4 + s.len().next_multiple_of(4));
        let fp_len = if self.fingerprint { 8 } else { 0 };
        let mut b = Vec::with_capacity(HEADER_LEN + sw_len + fp_len);
        b.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
        // Fits: at most 4 + 764 + 8 bytes.
        b.extend_from_slice(&((sw_len + fp_len) as u16).to_be_bytes());
        b.extend_from_slice(&MAGIC_COOKIE);
        b.extend_from_slice(&self.tx_id);
        if let Some(s) = software {
            b.extend_from_slice(&ATTR_SOFTWARE.to_be_bytes());
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
            b.resize(HEADER_LEN + sw_len, 0);
        }
        if self.fingerprint {
            // The CRC covers everything before the attribute, with the header length already
            // counting the fingerprint (RFC 5389 §15.5).
            let fp = fingerprint(&b);
            b.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
            b.extend_from_slice(&4u16.to_be_bytes());
            b.extend_from_slice(&fp.to_be_bytes());
        }
        b
    }

    /// Parses a binding request, verifying its FINGERPRINT if it has one.
    ///
    /// Tailscale's own server additionally insists on SOFTWARE "tailnode"; that policy is the
    /// caller's (check [`BindingRequest::software`]).
    pub fn parse(b: &[u8]) -> Result<Self, StunError> {
        if !is_stun(b) {
            return Err(StunError::NotStun);
        }
        if u16::from_be_bytes([b[0], b[1]]) != BINDING_REQUEST {
            return Err(StunError::NotBindingRequest);
        }
        let mut tx_id = [0u8; 12];
        tx_id.copy_from_slice(&b[8..HEADER_LEN]);
        let msg = message(b)?;
        let mut req = Self { tx_id, software: None, fingerprint: false };
        for attr in attrs(&msg[HEADER_LEN..])? {
            if req.fingerprint {
                // RFC 5389 §15.5: FINGERPRINT is the last attribute.
                return Err(StunError::MalformedAttrs);
            }
            match attr.ty {
                ATTR_SOFTWARE => req.software = Some(String::from_utf8_lossy(attr.value).into_owned()),
                ATTR_FINGERPRINT => {
                    if HEADER_LEN + attr.offset + 8 != msg.len() {
                        return Err(StunError::MalformedAttrs);
                    }
                    let got: [u8; 4] = attr.value.try_into().map_err(|_| StunError::MalformedAttrs)?;
                    if u32::from_be_bytes(got) != fingerprint(&msg[..HEADER_LEN + attr.offset]) {
                        return Err(StunError::BadFingerprint);
                    }
                    req.fingerprint = true;
                }
                _ => {}
            }
        }
        Ok(req)
    }
}

/// Tailscale's binding request for `tx_id` (see [`BindingRequest::tailscale`]).
pub fn request(tx_id: TxId) -> Vec<u8> {
    BindingRequest::tailscale(tx_id).encode()
}

/// A binding success response telling the requester it was seen at `addr`, as one
/// XOR-MAPPED-ADDRESS attribute. An IPv4-mapped IPv6 address (a dual-stack socket's view of
/// an IPv4 client) is reported as IPv4.
pub fn response(tx_id: TxId, addr: SocketAddr) -> Vec<u8> {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (family, octets): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let attr_len = 4 + octets.len();
    let mut b = Vec::with_capacity(HEADER_LEN + 4 + attr_len);
    b.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    b.extend_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&tx_id);
    b.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    b.extend_from_slice(&(attr_len as u16).to_be_bytes());
    b.extend_from_slice(&[0, family]);
    b.extend_from_slice(&(addr.port() ^ 0x2112).to_be_bytes());
    let pad = xor_pad(&tx_id);
    b.extend(octets.iter().zip(pad).map(|(o, p)| o ^ p));
    b
}

/// Parses a binding success response into its transaction id and the mapped address.
///
/// XOR-MAPPED-ADDRESS (either attribute number) wins; MAPPED-ADDRESS is the fallback.
pub fn parse_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if u16::from_be_bytes([b[0], b[1]]) != BINDING_SUCCESS {
        return Err(StunError::NotSuccessResponse);
    }
    let mut tx_id = [0u8; 12];
    tx_id.copy_from_slice(&b[8..HEADER_LEN]);
    let msg = message(b)?;
    let (mut xor, mut plain) = (None, None);
    for attr in attrs(&msg[HEADER_LEN..])? {
        match attr.ty {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => {
                let (ip, port) = address(attr.value)?;
                let pad = xor_pad(&tx_id);
                let ip: Vec<u8> = ip.iter().zip(pad).map(|(o, p)| o ^ p).collect();
                xor = Some(socket_addr(&ip, port ^ 0x2112));
            }
            ATTR_MAPPED_ADDRESS => {
                let (ip, port) = address(attr.value)?;
                plain = Some(socket_addr(ip, port));
            }
            _ => {}
        }
    }
    let addr = xor.or(plain).ok_or(StunError::NoMappedAddress)?;
    Ok((tx_id, addr))
}

/// The bytes an address is XORed with: the magic cookie, then the transaction id.
fn xor_pad(tx_id: &TxId) -> [u8; 16] {
    let mut pad = [0u8; 16];
    pad[..4].copy_from_slice(&MAGIC_COOKIE);
    pad[4..].copy_from_slice(tx_id);
    pad
}

/// The message trimmed to the header's declared length (trailing bytes are ignored).
fn message(b: &[u8]) -> Result<&[u8], StunError> {
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    b.get(..HEADER_LEN + len).ok_or(StunError::MalformedAttrs)
}

struct Attr<'a> {
    ty: u16,
    value: &'a [u8],
    /// Offset of the attribute header from the end of the STUN header.
    offset: usize,
}

fn attrs(mut b: &[u8]) -> Result<Vec<Attr<'_>>, StunError> {
    let mut out = Vec::new();
    let mut offset = 0;
    while !b.is_empty() {
        let [t0, t1, l0, l1, rest @ ..] = b else {
            return Err(StunError::MalformedAttrs);
        };
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        let padded = len.next_multiple_of(4);
        if padded > rest.len() {
            return Err(StunError::MalformedAttrs);
        }
        out.push(Attr { ty: u16::from_be_bytes([*t0, *t1]), value: &rest[..len], offset });
        b = &rest[padded..];
        offset += 4 + padded;
    }
    Ok(out)
}

/// Splits a (XOR-)MAPPED-ADDRESS value into raw address bytes and port.
fn address(v: &[u8]) -> Result<(&[u8], u16), StunError> {
    let [_, family, p0, p1, addr @ ..] = v else {
        return Err(StunError::MalformedAttrs);
    };
    let len = match family {
        1 => 4,
        2 => 16,
        _ => return Err(StunError::MalformedAttrs),
    };
    let ip = addr.get(..len).ok_or(StunError::MalformedAttrs)?;
    Ok((ip, u16::from_be_bytes([*p0, *p1])))
}

/// Builds an address from 4 or 16 bytes, unmapping IPv4-mapped IPv6 as Tailscale does.
fn socket_addr(ip: &[u8], port: u16) -> SocketAddr {
    if let Ok(v4) = <[u8; 4]>::try_from(ip) {
        return SocketAddr::new(IpAddr::V4(Ipv4Addr::from(v4)), port);
    }
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(ip).unwrap_or_default());
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddrV4;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::V4(SocketAddrV4::new(ip.into(), p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| socket_addr(&ip, p)),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(tx in any::<[u8; 12]>(), software in proptest::option::of(".{0,40}"), fp in any::<bool>()) {
            let req = BindingRequest { tx_id: tx, software, fingerprint: fp };
            let b = req.encode();
            prop_assert!(is_stun(&b));
            prop_assert_eq!(b.len() % 4, 0);
            prop_assert_eq!(tx_id(&b), Some(tx));
            prop_assert_eq!(BindingRequest::parse(&b).unwrap(), req);
        }

        #[test]
        fn response_round_trip(tx in any::<[u8; 12]>(), addr in arb_addr()) {
            let b = response(tx, addr);
            prop_assert!(is_stun(&b));
            prop_assert_eq!(parse_response(&b).unwrap(), (tx, addr));
            for cut in [0, HEADER_LEN - 1, HEADER_LEN, b.len() - 1] {
                prop_assert!(parse_response(&b[..cut]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_response(&b);
            let _ = BindingRequest::parse(&b);
            let _ = tx_id(&b);
            // Also with a valid-looking header so the attribute walk is exercised.
            let mut m = vec![0x01, 0x01, 0, (b.len() & 0xff) as u8];
            m.extend_from_slice(&MAGIC_COOKIE);
            m.extend_from_slice(&[0; 12]);
            m.extend_from_slice(&b);
            let _ = parse_response(&m);
            m[0] = 0;
            m[1] = 1;
            let _ = BindingRequest::parse(&m);
        }
    }

    /// Byte for byte what Tailscale's `stun.Request` builds (RFC 5389 layout: header, SOFTWARE
    /// "tailnode" needing no padding, FINGERPRINT).
    #[test]
    fn tailscale_request_layout() {
        let tx = *b"abcdefghijkl";
        let b = request(tx);
        assert_eq!(b.len(), 20 + 12 + 8);
        assert_eq!(&b[..4], &[0x00, 0x01, 0x00, 20]);
        assert_eq!(&b[4..8], &[0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(&b[8..20], &tx);
        assert_eq!(&b[20..24], &[0x80, 0x22, 0x00, 0x08]);
        assert_eq!(&b[24..32], b"tailnode");
        assert_eq!(&b[32..36], &[0x80, 0x28, 0x00, 0x04]);
        let crc = crc32fast::hash(&b[..32]) ^ 0x5354554e;
        assert_eq!(&b[36..], &crc.to_be_bytes());
    }

    /// RFC 5769 §2.2 sample IPv4 response: 192.0.2.1:32853, with SOFTWARE, MESSAGE-INTEGRITY
    /// (ignored here) and a FINGERPRINT whose value we also recompute.
    #[test]
    fn rfc5769_ipv4_response() {
        let b = hex::decode(concat!(
            "0101003c2112a442b7e7a701bc34d686fa87dfae",
            "8022000b7465737420766563746f7220",
            "002000080001a147e112a643",
            "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7",
            "80280004c07d4c96"
        ))
        .unwrap();
        let (tx, addr) = parse_response(&b).unwrap();
        assert_eq!(tx, hex::decode("b7e7a701bc34d686fa87dfae").unwrap()[..]);
        assert_eq!(addr, "192.0.2.1:32853".parse().unwrap());
        assert_eq!(fingerprint(&b[..b.len() - 8]), 0xc07d4c96);
    }

    /// RFC 5769 §2.3 sample IPv6 response: [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    #[test]
    fn rfc5769_ipv6_response() {
        let b = hex::decode(concat!(
            "010100482112a442b7e7a701bc34d686fa87dfae",
            "8022000b7465737420766563746f7220",
            "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9",
            "00080014a382954e4be67bf11784c97c8292c275bfe3ed41",
            "80280004c8fb0b4c"
        ))
        .unwrap();
        let (_, addr) = parse_response(&b).unwrap();
        assert_eq!(addr, "[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap());
        assert_eq!(fingerprint(&b[..b.len() - 8]), 0xc8fb0b4c);
    }

    #[test]
    fn response_layout_and_fallbacks() {
        let tx = [0u8; 12];
        let b = response(tx, "192.0.2.1:32853".parse().unwrap());
        assert_eq!(hex::encode(&b[20..]), "002000080001a147e112a643");
        // A dual-stack view of an IPv4 client is reported as IPv4.
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:32853".parse().unwrap();
        assert_eq!(response(tx, mapped), b);

        // MAPPED-ADDRESS only (old servers).
        let mut m = hex::decode("0101000c2112a442").unwrap();
        m.extend_from_slice(&tx);
        m.extend_from_slice(&hex::decode("000100080001d431c6336401").unwrap());
        assert_eq!(parse_response(&m).unwrap().1, "198.51.100.1:54321".parse().unwrap());
        // The 0x8020 variant is read like XOR-MAPPED-ADDRESS.
        let mut alt = b.clone();
        alt[20] = 0x80;
        assert_eq!(parse_response(&alt).unwrap().1, "192.0.2.1:32853".parse().unwrap());
        // Neither: an error. Bad family: an error. Trailing bytes past the length: ignored.
        let mut none = b[..20].to_vec();
        none[3] = 0;
        assert_eq!(parse_response(&none), Err(StunError::NoMappedAddress));
        let mut bad = b.clone();
        bad[25] = 3;
        assert_eq!(parse_response(&bad), Err(StunError::MalformedAttrs));
        let mut trailing = b.clone();
        trailing.extend_from_slice(&[0xde, 0xad]);
        assert!(parse_response(&trailing).is_ok());
        // Length beyond the packet, and a request where a response is expected.
        let mut long = b.clone();
        long[3] += 4;
        assert_eq!(parse_response(&long), Err(StunError::MalformedAttrs));
        assert_eq!(parse_response(&request(tx)), Err(StunError::NotSuccessResponse));
        assert_eq!(BindingRequest::parse(&b), Err(StunError::NotBindingRequest));
    }

    #[test]
    fn request_checks() {
        let mut b = request([5; 12]);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(BindingRequest::parse(&b), Err(StunError::BadFingerprint));
        // An attribute after FINGERPRINT is malformed.
        let mut after = request([5; 12]);
        after[3] += 4;
        after.extend_from_slice(&[0x80, 0x22, 0, 0]);
        assert_eq!(BindingRequest::parse(&after), Err(StunError::MalformedAttrs));
        let bare = BindingRequest { tx_id: [1; 12], software: None, fingerprint: false };
        assert_eq!(bare.encode().len(), HEADER_LEN);
        assert!(!is_stun(&[0xc0; 20]));
        assert!(!is_stun(&bare.encode()[..19]));
        let long = BindingRequest { tx_id: [1; 12], software: Some("é".repeat(500)), fingerprint: true };
        let parsed = BindingRequest::parse(&long.encode()).unwrap();
        assert_eq!(parsed.software.unwrap().len(), 762);
    }
}
