//! Opens arbitrary packets as disco: through the per-peer cached box key magicsock uses for a
//! known peer (the input as a whole packet, and as a box behind that peer's header), and as a
//! stranger's first packet, which costs an X25519 with whatever key its header names. Whatever
//! decodes as a message must seal and open again to the same message.
//!
//! The keys and the cached box keys are built once: an X25519 per input for fixed keys would
//! be setup, not code under test, and cut the executions per second by two orders of magnitude.
//! The stranger path keeps its X25519 (the key comes from the input; that is the point) but runs
//! for one input length in eight, so most executions reach the parsers.
#![no_main]

use citadel_proto::disco::{self, Message, SharedKey};
use citadel_proto::keys::{DiscoPublic, PrivateKey};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

struct Keys {
    ours: PrivateKey,
    theirs: DiscoPublic,
    /// Opens what the peer seals to us.
    from_peer: SharedKey,
    /// Seals as the peer, to us.
    as_peer: SharedKey,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let ours = PrivateKey::from_bytes([1; 32]);
    let peer = PrivateKey::from_bytes([2; 32]);
    let theirs = DiscoPublic(peer.public_bytes());
    let from_peer = SharedKey::new(&ours, &theirs);
    let as_peer = SharedKey::new(&peer, &DiscoPublic(ours.public_bytes()));
    Keys { ours, theirs, from_peer, as_peer }
});

fuzz_target!(|data: &[u8]| {
    let k = &*KEYS;
    let _ = disco::looks_like_disco(data);
    let from = disco::sender(data);
    let _ = k.from_peer.open(data);

    let mut packet = disco::MAGIC.to_vec();
    packet.extend_from_slice(&k.theirs.0);
    packet.extend_from_slice(data);
    let _ = k.from_peer.open(&packet);

    if from.is_some() && data.len() % 8 == 0 {
        let _ = disco::open(&k.ours, data);
    }

    if let Ok(msg) = Message::decode(data) {
        let sealed = k.as_peer.seal([3; 24], &msg);
        assert_eq!(disco::sender(&sealed), Some(k.theirs));
        let opened = k.from_peer.open(&sealed).expect("own packet opens");
        // Decoding normalises (zero key + padding, ragged call-me-maybe), so compare the
        // re-encoded forms rather than the input bytes.
        assert_eq!(opened.to_vec(), msg.to_vec());
    }
});
