//! Parses arbitrary bytes as the control-protocol JSON either side receives (register and map
//! requests at the server; register and map responses, early payload, key response at the
//! client); whatever parses must serialise and parse again.
#![no_main]

use citadel_proto::tailcfg::{
    EarlyNoise, MapRequest, MapResponse, OverTlsPublicKeyResponse, RegisterRequest, RegisterResponse,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn round_trip<T: DeserializeOwned + Serialize>(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(data) {
        let again = serde_json::to_vec(&v).expect("parsed value serialises");
        serde_json::from_slice::<T>(&again).expect("own output parses");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((which, json)) = data.split_first() else { return };
    match which % 6 {
        0 => round_trip::<RegisterRequest>(json),
        1 => round_trip::<MapRequest>(json),
        2 => round_trip::<RegisterResponse>(json),
        3 => round_trip::<MapResponse>(json),
        4 => round_trip::<EarlyNoise>(json),
        _ => round_trip::<OverTlsPublicKeyResponse>(json),
    }
});
