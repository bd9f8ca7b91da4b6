//! The nexus-sim ts2021 responder and the Noise transport. Arbitrary initiation frames go to
//! `accept`, as they are and behind a well-formed header (so the Noise message itself is read);
//! then the input is carried as sealed records, which must open to the same bytes, and
//! replayed as forged records, which must be refused, never panic.
//!
//! The responder's X25519 stays in every execution: reading an initiation is key agreement
//! with the stranger's ephemeral key, and that is what this target is for. The handshake
//! between fixed keys does not depend on the input, so it runs once (and must succeed); the
//! records then go through transport ciphers on a fixed key, the same `Cipher` code a
//! handshake yields.
#![no_main]

use bytes::BytesMut;
use citadel_proto::keys::PrivateKey;
use citadel_proto::noise::{self, Cipher, Initiator};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static SERVER: LazyLock<PrivateKey> = LazyLock::new(|| {
    let server = PrivateKey::from_bytes([7; 32]);
    let machine = PrivateKey::from_bytes([9; 32]);
    let init = Initiator::new(&machine, &server.public_bytes(), 90).expect("initiator");
    let acc = noise::accept(&server, &init.init_frame).expect("server accepts a real initiation");
    assert_eq!(acc.client_machine, machine.public_bytes());
    let (mut c_tx, _c_rx) = init.finish(&acc.response_frame).expect("client finishes");
    let mut s_rx = acc.rx;
    let mut wire = Vec::new();
    c_tx.seal_frame(b"hello", &mut wire).expect("seal");
    let mut body = wire[3..].to_vec();
    s_rx.open(&mut body).expect("the handshake's ciphers agree");
    assert_eq!(body, b"hello");
    server
});

const RECORD_KEY: [u8; 32] = [0x5a; 32];

fuzz_target!(|data: &[u8]| {
    let server = &*SERVER;
    let _ = noise::accept(server, data);

    let mut framed = vec![0, 90, 1, 0, 96];
    framed.extend_from_slice(&data[..data.len().min(96)]);
    framed.resize(101, 0);
    let _ = noise::accept(server, &framed);

    let (mut c_tx, mut s_rx) = (Cipher::new(RECORD_KEY), Cipher::new(RECORD_KEY));
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
