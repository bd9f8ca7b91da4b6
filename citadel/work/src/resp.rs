//! RESP2 framing: encoding commands and parsing replies.
//!
//! Sans-IO on purpose: `parse` works on a byte slice and says how much it consumed, so the
//! connection code only has to append socket reads to a buffer, and the parser can be tested
//! (and fed hostile bytes) without a server.

use std::fmt;

/// Largest bulk string we accept from the server. Redis itself caps values at 512 MiB; our
/// replies are stream entries and small hashes, so anything this big is a broken or hostile
/// peer and we drop the connection rather than buffer it.
const MAX_BULK: usize = 64 * 1024 * 1024;
/// Largest element count of one array reply, for the same reason.
const MAX_ARRAY: usize = 1024 * 1024;
/// Nesting limit: stream replies nest four deep; this bounds recursion on hostile input.
const MAX_DEPTH: usize = 16;
/// Longest header line (`$123\r\n`, `-ERR ...\r\n`) we wait for before giving up.
const MAX_LINE: usize = 64 * 1024;

/// One RESP2 reply value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`: a command-level error; the connection stays usable.
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n` bulk string (binary safe).
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Nil,
    /// `*n`
    Array(Vec<Value>),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Simple(s) => write!(f, "+{s}"),
            Value::Error(s) => write!(f, "-{s}"),
            Value::Int(i) => write!(f, ":{i}"),
            Value::Bulk(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Value::Nil => f.write_str("nil"),
            Value::Array(a) => f.debug_list().entries(a).finish(),
        }
    }
}

impl Value {
    /// The value as UTF-8 text, for bulk and simple strings.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Bulk(b) => std::str::from_utf8(b).ok(),
            Value::Simple(s) => Some(s),
            _ => None,
        }
    }

    /// The value as raw bytes, for bulk and simple strings.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// The value as an integer (integer replies, or bulk strings holding digits).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bulk(_) | Value::Simple(_) => self.as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The elements of an array reply; `Nil` reads as empty.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            Value::Nil => Some(&[]),
            _ => None,
        }
    }
}

/// The server sent bytes that are not RESP2 (or exceed our limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {0}")]
pub struct ProtocolError(pub String);

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(args: &[A], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` means more bytes are needed,
/// `Ok(Some((value, consumed)))` a complete reply.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Value, usize)>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("reply nested too deeply".into()));
    }
    let Some((line, next)) = line_at(buf, pos)? else {
        return Ok(None);
    };
    let Some((&tag, rest)) = line.split_first() else {
        return Err(ProtocolError("empty reply line".into()));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match tag {
        b'+' => Ok(Some((Value::Simple(text()), next))),
        b'-' => Ok(Some((Value::Error(text()), next))),
        b':' => Ok(Some((Value::Int(int(rest)?), next))),
        b'$' => {
            let n = int(rest)?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let n = usize::try_from(n).map_err(|_| ProtocolError("bad bulk length".into()))?;
            if n > MAX_BULK {
                return Err(ProtocolError(format!("bulk string of {n} bytes is too large")));
            }
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("bulk string not terminated by CRLF".into()));
            }
            Ok(Some((Value::Bulk(buf[next..end].to_vec()), end + 2)))
        }
        b'*' => {
            let n = int(rest)?;
            if n < 0 {
                return Ok(Some((Value::Nil, next)));
            }
            let n = usize::try_from(n).map_err(|_| ProtocolError("bad array length".into()))?;
            if n > MAX_ARRAY {
                return Err(ProtocolError(format!("array of {n} elements is too large")));
            }
            // Capacity is bounded by what is already buffered so a hostile length header cannot
            // make us allocate before the elements actually arrive.
            let mut items = Vec::with_capacity(n.min(buf.len() - next));
            let mut at = next;
            for _ in 0..n {
                match parse_at(buf, at, depth + 1)? {
                    Some((v, after)) => {
                        items.push(v);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Value::Array(items), at)))
        }
        other => Err(ProtocolError(format!("unknown reply type byte 0x{other:02x}"))),
    }
}

/// The CRLF-terminated line starting at `pos` (without CRLF) and the offset after it.
/// Finds where the next complete reply in a growing buffer ends, resuming where the previous
/// call stopped, so reading a large reply in many chunks costs time linear in its size (a
/// plain [`parse`] per chunk would re-parse the whole prefix every time). Call [`Scanner::scan`]
/// after each read with the whole buffer; once it returns the end, [`parse`] that prefix once
/// and [`Scanner::reset`] before the next reply.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Start of the first element not yet known to be complete.
    pos: usize,
    /// Elements still missing in each open array, innermost last.
    open: Vec<usize>,
}

impl Scanner {
    /// Forgets all progress (after a reply was taken off the buffer).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
    }

    /// `Ok(Some(end))` when `buf[..end]` holds one complete reply, `Ok(None)` when more bytes
    /// are needed, an error when the bytes cannot be RESP.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some((line, next)) = line_at(buf, self.pos)? else {
                return Ok(None);
            };
            let Some((&tag, rest)) = line.split_first() else {
                return Err(ProtocolError("empty reply line".into()));
            };
            match tag {
                b'+' | b'-' => self.pos = next,
                b':' => {
                    int(rest)?;
                    self.pos = next;
                }
                b'$' => {
                    let n = int(rest)?;
                    if n < 0 {
                        self.pos = next;
                    } else {
                        let n = usize::try_from(n).map_err(|_| ProtocolError("bad bulk length".into()))?;
                        if n > MAX_BULK {
                            return Err(ProtocolError(format!("bulk string of {n} bytes is too large")));
                        }
                        if buf.len() < next + n + 2 {
                            return Ok(None);
                        }
                        self.pos = next + n + 2;
                    }
                }
                b'*' => {
                    let n = int(rest)?;
                    self.pos = next;
                    if n > 0 {
                        let n = usize::try_from(n).map_err(|_| ProtocolError("bad array length".into()))?;
                        if n > MAX_ARRAY {
                            return Err(ProtocolError(format!("array of {n} elements is too large")));
                        }
                        if self.open.len() >= MAX_DEPTH {
                            return Err(ProtocolError("reply nested too deeply".into()));
                        }
                        self.open.push(n);
                        continue;
                    }
                }
                other => return Err(ProtocolError(format!("unknown reply type byte 0x{other:02x}"))),
            }
            // One element finished: close every array it completes.
            loop {
                match self.open.last_mut() {
                    None => return Ok(Some(self.pos)),
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }
}

fn line_at(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let hay = &buf[pos.min(buf.len())..];
    match hay.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&hay[..i], pos + i + 2))),
        None if hay.len() > MAX_LINE => Err(ProtocolError("reply line too long".into())),
        None => Ok(None),
    }
}

fn int(b: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProtocolError(format!("bad integer {:?}", String::from_utf8_lossy(b))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` in `chunk`-byte reads the way the client does and returns the reply.
    fn scan_in_chunks(wire: &[u8], chunk: usize) -> Value {
        let mut sc = Scanner::default();
        let mut buf = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            if let Some(end) = sc.scan(&buf).unwrap() {
                assert_eq!(end, wire.len());
                return parse(&buf[..end]).unwrap().unwrap().0;
            }
        }
        panic!("never complete");
    }

    #[test]
    fn scanner_agrees_with_parse_at_every_split() {
        let wire = b"*3\r\n$3\r\nabc\r\n*2\r\n:5\r\n*0\r\n$-1\r\n";
        let whole = parse(wire).unwrap().unwrap().0;
        for chunk in 1..wire.len() {
            assert_eq!(scan_in_chunks(wire, chunk), whole, "chunk {chunk}");
        }
        assert!(Scanner::default().scan(b"?x\r\n").is_err());
        assert_eq!(Scanner::default().scan(b"+OK\r\n+N").unwrap(), Some(5));
    }

    #[test]
    fn a_large_reply_in_small_reads_is_linear() {
        let n = 1_000_000;
        let mut wire = format!("*{n}\r\n").into_bytes();
        for _ in 0..n {
            wire.extend_from_slice(b"$1\r\nv\r\n");
        }
        let t = std::time::Instant::now();
        let v = scan_in_chunks(&wire, 16 * 1024);
        assert_eq!(v.as_array().map(<[Value]>::len), Some(n));
        assert!(t.elapsed() < std::time::Duration::from_secs(3), "took {:?}", t.elapsed());
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        let mut out = Vec::new();
        encode(&["SET", "k", ""], &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_every_reply_type() {
        let input = b"*6\r\n+OK\r\n-ERR no\r\n:-7\r\n$4\r\na\r\nb\r\n$-1\r\n*-1\r\n";
        let (v, used) = parse(input).unwrap().unwrap();
        assert_eq!(used, input.len());
        assert_eq!(
            v,
            Value::Array(vec![
                Value::Simple("OK".into()),
                Value::Error("ERR no".into()),
                Value::Int(-7),
                Value::Bulk(b"a\r\nb".to_vec()),
                Value::Nil,
                Value::Nil,
            ])
        );
    }

    #[test]
    fn incomplete_input_asks_for_more_at_every_split() {
        let input = b"*2\r\n$5\r\nhello\r\n*1\r\n:1\r\n";
        for cut in 0..input.len() {
            assert_eq!(parse(&input[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert!(parse(input).unwrap().is_some());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        for bad in
            [&b"?\r\n"[..], b"\r\n", b":x\r\n", b"$99999999999\r\n", b"*99999999999\r\n", b"$2\r\nabXY", b"$-5x\r\n"]
        {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(100);
        assert!(parse(deep.as_bytes()).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = parse(&bytes);
        }
    }
}
