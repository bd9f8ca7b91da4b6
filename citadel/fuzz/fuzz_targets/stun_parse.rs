//! Parses arbitrary bytes as STUN requests and responses; whatever parses must re-encode to
//! something that parses the same.
#![no_main]

use citadel_proto::stun::{self, BindingRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stun::is_stun(data);
    let _ = stun::tx_id(data);
    if let Ok((tx, addr)) = stun::parse_response(data) {
        assert_eq!(stun::parse_response(&stun::response(tx, addr)), Ok((tx, addr)));
    }
    if let Ok(req) = BindingRequest::parse(data) {
        let again = BindingRequest::parse(&req.encode()).expect("own request parses");
        assert_eq!(again.tx_id, req.tx_id);
        assert_eq!(again.fingerprint, req.fingerprint);
    }
});
