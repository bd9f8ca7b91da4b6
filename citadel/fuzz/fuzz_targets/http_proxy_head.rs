//! Parses arbitrary bytes as an HTTP proxy request head; a complete head's length fits the
//! input, and the head alone parses to the same length.
#![no_main]

use citadel::proxy_server::http::parse_head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(head)) = parse_head(data) {
        assert!(head.len <= data.len());
        let alone = parse_head(&data[..head.len]).expect("the head alone parses").expect("complete");
        assert_eq!(alone.len, head.len);
    }
});
