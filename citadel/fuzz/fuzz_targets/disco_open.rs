//! Opens arbitrary packets as disco, both raw and behind a valid header sealed between two
//! fixed keys (so the fuzzer also reaches the message parser through a box that opens).
#![no_main]

use citadel_proto::disco::{self, Message};
use citadel_proto::keys::{DiscoPublic, PrivateKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = PrivateKey::from_bytes([1; 32]);
    let theirs = PrivateKey::from_bytes([2; 32]);
    let _ = disco::open(&ours, data);
    let _ = disco::looks_like_disco(data);

    if let Ok(msg) = Message::decode(data) {
        let packet = disco::seal(&theirs, &DiscoPublic(ours.public_bytes()), [3; 24], &msg);
        let (from, opened) = disco::open(&ours, &packet).expect("own packet opens");
        assert_eq!(from, DiscoPublic(theirs.public_bytes()));
        // Decoding normalises (zero key + padding, ragged call-me-maybe), so compare the
        // re-encoded forms rather than the input bytes.
        assert_eq!(opened.to_vec(), msg.to_vec());
    }
});
