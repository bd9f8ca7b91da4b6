//! Curve25519 keys with Tailscale's text forms (`mkey:`, `nodekey:`, `discokey:` + 64 hex).
//!
//! The machine key authenticates the node to the control server (Noise IK), the node key is
//! the WireGuard static key, and the disco key seals discovery messages. Private keys never
//! implement `Debug` or `Display` with their bytes, so they cannot reach a log by accident.

use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use x25519_dalek::{PublicKey, StaticSecret};

/// What went wrong parsing a key's text form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The prefix is not the one this key type uses.
    #[error("key has prefix {found:?}, expected {expected:?}")]
    WrongPrefix {
        /// The prefix this key type uses.
        expected: &'static str,
        /// What the text started with.
        found: String,
    },
    /// The hex part is not 64 hex digits.
    #[error("key is not 64 hex digits")]
    BadHex,
}

fn parse_hex32(prefix: &'static str, s: &str) -> Result<[u8; 32], KeyError> {
    let Some(rest) = s.strip_prefix(prefix) else {
        let found = s.find(':').map_or("", |i| &s[..=i]);
        return Err(KeyError::WrongPrefix { expected: prefix, found: found.to_string() });
    };
    let mut out = [0u8; 32];
    // const-hex (SIMD where the CPU has it), not `hex`: every member decodes three keys per
    // peer in every map message, and `hex`'s byte-at-a-time loop was 3% of a load generator's
    // CPU holding 2,000 map streams.
    // It would take a `0x` before the digits: only the 64 digits are a key.
    if rest.len() != 64 {
        return Err(KeyError::BadHex);
    }
    const_hex::decode_to_slice(rest, &mut out).map_err(|_| KeyError::BadHex)?;
    Ok(out)
}

/// Reads a key's text form straight from the decoder's string (borrowed when the input has
/// no escapes): a map message carries three keys per peer, and a `String` for each cost an
/// allocation apiece.
struct KeyText<K>(std::marker::PhantomData<K>);

impl<K: Default + std::str::FromStr<Err = KeyError>> serde::de::Visitor<'_> for KeyText<K> {
    type Value = K;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key's text form")
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<K, E> {
        if s.is_empty() {
            return Ok(K::default());
        }
        s.parse().map_err(E::custom)
    }
}

macro_rules! public_key {
    ($name:ident, $prefix:expr, $doc:expr) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The text prefix of this key type.
            pub const PREFIX: &'static str = $prefix;
            /// Parses the text form (`prefix:` + 64 hex digits).
            pub fn parse(s: &str) -> Result<Self, KeyError> {
                parse_hex32($prefix, s).map($name)
            }
            /// True for the all-zero key (Go's zero value).
            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; 32]
            }
            /// A short form for humans and logs (public keys are not secret).
            pub fn short(&self) -> String {
                format!("[{}]", &hex::encode(&self.0[..3]))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, hex::encode(self.0))
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, &hex::encode(self.0)[..8])
            }
        }
        impl std::str::FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                Self::parse(s)
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(KeyText::<Self>(std::marker::PhantomData))
            }
        }
    };
}

public_key!(MachinePublic, "mkey:", "A machine's public key (control-plane identity).");
public_key!(NodePublic, "nodekey:", "A node's public key (its WireGuard static key).");
public_key!(DiscoPublic, "discokey:", "A node's disco public key.");

/// Curve25519 points of small order (and their non-canonical encodings): a Diffie-Hellman
/// with any of them yields the all-zero secret, which anyone can compute.
pub const LOW_ORDER_POINTS: [[u8; 32]; 7] = [
    [0; 32],
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    hex_literal(b"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    hex_literal(b"5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    hex_literal(b"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex_literal(b"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex_literal(b"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
];

const fn hex_literal(h: &[u8; 64]) -> [u8; 32] {
    const fn nib(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lowercase hex digit"),
        }
    }
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nib(h[2 * i]) << 4 | nib(h[2 * i + 1]);
        i += 1;
    }
    out
}

/// A Curve25519 private key. Its bytes are only reachable through [`PrivateKey::to_bytes`].
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl PrivateKey {
    /// A new random key from the given RNG (pass `rand::thread_rng()` in production).
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self(StaticSecret::from(b))
    }
    /// A key from its raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(StaticSecret::from(b))
    }
    /// The raw (clamped on use) secret bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    /// The public half.
    pub fn public_bytes(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
    /// Diffie-Hellman with a peer's public key.
    pub fn dh(&self, peer: &[u8; 32]) -> [u8; 32] {
        self.0.diffie_hellman(&PublicKey::from(*peer)).to_bytes()
    }
    /// Text form for the state file (`privkey:` + hex). Never log it.
    pub fn to_text(&self) -> String {
        format!("privkey:{}", hex::encode(self.to_bytes()))
    }
    /// Parses the text form written by [`PrivateKey::to_text`].
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        parse_hex32("privkey:", s).map(Self::from_bytes)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

impl Serialize for PrivateKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text())
    }
}
impl<'de> Deserialize<'de> for PrivateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_text(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn text_round_trip(b in proptest::array::uniform32(any::<u8>())) {
            let k = NodePublic(b);
            prop_assert_eq!(NodePublic::parse(&k.to_string()).unwrap(), k);
            let m = MachinePublic(b);
            prop_assert_eq!(MachinePublic::parse(&m.to_string()).unwrap(), m);
            let p = PrivateKey::from_bytes(b);
            prop_assert_eq!(PrivateKey::from_text(&p.to_text()).unwrap().to_bytes(), p.to_bytes());
        }

        #[test]
        fn garbage_never_panics(s in ".{0,80}") {
            let _ = NodePublic::parse(&s);
            let _ = DiscoPublic::parse(&s);
        }
    }

    #[test]
    fn wrong_prefix_is_an_error() {
        let k = NodePublic([7; 32]).to_string();
        assert!(matches!(MachinePublic::parse(&k), Err(KeyError::WrongPrefix { .. })));
        assert_eq!(NodePublic::parse("nodekey:zz"), Err(KeyError::BadHex));
        let digits = "ab".repeat(32);
        assert!(NodePublic::parse(&format!("nodekey:{digits}")).is_ok());
        assert_eq!(NodePublic::parse(&format!("nodekey:0x{digits}")), Err(KeyError::BadHex));
        assert_eq!(NodePublic::parse(&format!("nodekey:{}", &digits[2..])), Err(KeyError::BadHex));
        assert_eq!(NodePublic::parse(&format!("nodekey:{}g", &digits[1..])), Err(KeyError::BadHex));
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let k = PrivateKey::from_bytes([9; 32]);
        assert!(!format!("{k:?}").contains("0909"));
    }
}
