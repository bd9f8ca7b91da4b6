//! The nexus-sim ts2021 responder and the Noise transport: arbitrary initiation frames go to
//! `accept`; then a real handshake between fixed keys carries the input as sealed records
//! (which must open to the same bytes) followed by the raw input as forged records (which
//! must be refused, never panic).
#![no_main]

use bytes::BytesMut;
use citadel_proto::keys::PrivateKey;
use citadel_proto::noise::{self, Initiator};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let server = PrivateKey::from_bytes([7; 32]);
    let _ = noise::accept(&server, data);

    // The same bytes behind a well-formed header, so the Noise message itself is parsed.
    let mut framed = vec![0, 90, 1, 0, 96];
    framed.extend_from_slice(&data[..data.len().min(96)]);
    framed.resize(101, 0);
    let _ = noise::accept(&server, &framed);

    let machine = PrivateKey::from_bytes([9; 32]);
    let init = Initiator::new(&machine, &server.public_bytes(), 90).expect("initiator");
    let acc = noise::accept(&server, &init.init_frame).expect("server accepts a real initiation");
    assert_eq!(acc.client_machine, machine.public_bytes());
    let (mut c_tx, _c_rx) = init.finish(&acc.response_frame).expect("client finishes");
    let mut s_rx = acc.rx;

    let mut wire = Vec::new();
    for chunk in data.chunks(1000) {
        c_tx.seal_frame(chunk, &mut wire).expect("seal");
    }
    let mut buf = BytesMut::from(&wire[..]);
    let mut opened = Vec::new();
    while let Some((_, mut body)) = noise::take_frame(&mut buf).expect("own frames split") {
        s_rx.open(&mut body).expect("own record opens");
        opened.extend_from_slice(&body);
    }
    assert_eq!(opened, data);

    let mut forged = BytesMut::from(data);
    while let Ok(Some((_, mut body))) = noise::take_frame(&mut forged) {
        if s_rx.open(&mut body).is_ok() {
            break;
        }
    }
});
