//! HTTP/1.x response heads, as the node meets them outside hyper: the `101 Switching
//! Protocols` answers of the control (`/ts2021`) and DERP upgrades, the DERP latency probe, and
//! an outbound HTTP proxy's answer to `CONNECT`. Those streams change protocol right after the
//! head, so hyper cannot own them; this parses the head and says where it ends.

/// Bound on the number of response headers.
const MAX_HEADERS: usize = 32;

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The reason phrase (may be empty).
    pub reason: String,
    /// The headers in order, values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Why bytes are not an HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed HTTP response head: {0}")]
pub struct BadHead(String);

/// Parses a response head from the bytes read so far: `Ok(None)` means "read more"; otherwise
/// the head and its length (the bytes after it belong to whatever follows).
///
/// # Errors
/// [`BadHead`] when the bytes cannot start a response head.
pub fn parse_response(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, BadHead> {
    let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hdrs);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok(Some((
            ResponseHead {
                status: resp.code.unwrap_or(0),
                reason: resp.reason.unwrap_or("").to_string(),
                headers: resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect(),
            },
            n,
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(BadHead(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_head_says_where_the_next_protocol_starts() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nDerp-Version: 2\r\n\r\n\x02\x00\x00";
        let (h, n) = parse_response(raw).unwrap().unwrap();
        assert_eq!((h.status, h.reason.as_str()), (101, "Switching Protocols"));
        assert_eq!(h.header("upgrade"), Some("DERP"));
        assert_eq!(h.header("derp-version"), Some("2"));
        assert_eq!(&raw[n..], b"\x02\x00\x00");
    }

    #[test]
    fn a_partial_head_asks_for_more_and_garbage_is_refused() {
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Len"), Ok(None));
        assert_eq!(parse_response(b""), Ok(None));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS + 1));
        assert!(parse_response(many.as_bytes()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_a_head_fits_its_input(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            if let Ok(Some((_, n))) = parse_response(&b) {
                proptest::prop_assert!(n <= b.len());
            }
        }
    }
}
