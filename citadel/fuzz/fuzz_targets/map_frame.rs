//! Decodes arbitrary bytes as map-stream frames; the first byte picks plain or zstd bodies.
#![no_main]

use citadel_proto::tailcfg::decode_map_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((flag, rest)) = data.split_first() else {
        return;
    };
    let zstd = flag & 1 == 1;
    let mut buf = rest.to_vec();
    while let Ok(Some(_)) = decode_map_frame(&mut buf, zstd) {}
});
