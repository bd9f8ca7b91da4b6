//! Feeds arbitrary bytes to the ts2021 frame splitter, in one piece and then split in two at a
//! point the input chooses, checking both ways yield the same frames.
#![no_main]

use bytes::BytesMut;
use citadel_proto::noise::take_frame;
use libfuzzer_sys::fuzz_target;

fn drain(buf: &mut BytesMut) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some(frame)) = take_frame(buf) {
        out.push(frame);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut whole = BytesMut::from(data);
    let all = drain(&mut whole);

    let cut = data.first().map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let mut parts = BytesMut::from(&data[..cut]);
    let mut got = drain(&mut parts);
    parts.extend_from_slice(&data[cut..]);
    got.extend(drain(&mut parts));
    assert_eq!(got, all);
});
