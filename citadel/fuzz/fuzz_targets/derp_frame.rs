//! Streams arbitrary bytes through the DERP frame decoder the way a driver does, and checks
//! that every frame it accepts re-encodes to bytes that decode to the same frame.
#![no_main]

use citadel_proto::derp::{split_frame, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        let raw = split_frame(rest).unwrap().unwrap();
        assert_eq!(raw.wire_len(), used);
        assert_eq!(raw.ty, frame.frame_type());
        let again = frame.to_vec();
        let (back, n) = Frame::decode(&again).unwrap().unwrap();
        assert_eq!(back, frame);
        assert_eq!(n, again.len());
        rest = &rest[used..];
    }
});
