//! Parses arbitrary bytes with the SOCKS5 server's parsers (greeting, user/password, request,
//! UDP header). A message that parses in full is never refused on a prefix (the server reads
//! in pieces), and the consumed length fits the input.
#![no_main]

use citadel::proxy_server::socks5::{self, Parsed};
use libfuzzer_sys::fuzz_target;

fn incremental<T>(data: &[u8], parse: impl Fn(&[u8]) -> Parsed<T>) {
    if let Ok(Some((_, used))) = parse(data) {
        assert!(used > 0 && used <= data.len());
        for cut in 0..used {
            assert!(matches!(parse(&data[..cut]), Ok(None)), "prefix {cut} of a complete message not 'read more'");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else { return };
    match which % 4 {
        0 => incremental(rest, socks5::parse_greeting),
        1 => incremental(rest, socks5::parse_auth),
        2 => incremental(rest, socks5::parse_request),
        _ => {
            if let Ok((_, _, at)) = socks5::parse_udp_header(rest) {
                assert!(at <= rest.len());
            }
        }
    }
});
