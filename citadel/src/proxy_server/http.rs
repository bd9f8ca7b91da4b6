//! An HTTP proxy into the mesh: `CONNECT host:port` tunnels, and absolute-URI requests
//! (`GET http://bravo:8080/file`) forwarded in origin form. A connection that starts with an
//! absolute-URI request stays open for more (HTTP/1.1 keep-alive, hyper does the framing), and
//! reuses its connection to the origin while the requests go to the same host and port.

use super::{dial, route, splice, AsyncReadWrite, Backend, Host, ProxyConfig};
use crate::net::{read_head, Prefixed, ReadHeadError};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::io;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Bound on the request head.
pub const MAX_HEAD: usize = 16 * 1024;
/// Bound on the number of request headers.
const MAX_HEADERS: usize = 64;

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `CONNECT host:port`: a raw tunnel.
    Connect {
        /// Destination host.
        host: Host,
        /// Destination port.
        port: u16,
    },
    /// An absolute-URI request (hyper reads it again and forwards it in origin form).
    Forward {
        /// Destination host.
        host: Host,
        /// Destination port.
        port: u16,
    },
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Where it goes.
    pub target: Target,
    /// The `Proxy-Authorization` credentials, if any (user, password).
    pub proxy_auth: Option<(Vec<u8>, Vec<u8>)>,
    /// Length of the head in the buffer (body bytes follow).
    pub len: usize,
}

/// Why a request head was refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {why}")]
pub struct BadRequest {
    /// HTTP status code.
    pub status: u16,
    /// What is wrong.
    pub why: &'static str,
}

fn bad(status: u16, why: &'static str) -> BadRequest {
    BadRequest { status, why }
}

/// Splits an authority `host[:port]`, with `default` when the port is absent.
fn authority(a: &str, default: Option<u16>) -> Option<(Host, u16)> {
    let (host, port) = if a.starts_with('[') {
        let end = a.find(']')?;
        let port = match &a[end + 1..] {
            "" => default?,
            p => p.strip_prefix(':')?.parse().ok()?,
        };
        (&a[..=end], port)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (a, default?),
        }
    };
    let ok = !host.is_empty() && port != 0 && host.bytes().all(|c| c.is_ascii_graphic() && c != b'@' && c != b'/');
    ok.then(|| (Host::parse(host), port))
}

/// Headers a proxy must not forward (RFC 9110 section 7.6.1) plus the proxy's own.
fn hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    const FIXED: [&str; 8] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ];
    let n = name.to_ascii_lowercase();
    FIXED.contains(&n.as_str()) || connection_tokens.contains(&n)
}

fn basic_credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, b64) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let colon = raw.iter().position(|&c| c == b':')?;
    Some((raw[..colon].to_vec(), raw[colon + 1..].to_vec()))
}

/// Parses a request head from the bytes read so far: `Ok(None)` means "read more".
///
/// # Errors
/// [`BadRequest`] with the status to answer (400 malformed, 431 too large, 501 unsupported).
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(bad(431, "request head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(bad(431, "too many headers")),
        Err(_) => return Err(bad(400, "malformed request")),
    };
    if len > MAX_HEAD {
        return Err(bad(431, "request head too large"));
    }
    let (Some(method), Some(path)) = (req.method, req.path) else { return Err(bad(400, "malformed request")) };
    let proxy_auth = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|h| basic_credentials(h.value).unwrap_or_default());
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = authority(path, None).ok_or(bad(400, "CONNECT needs host:port"))?;
        return Ok(Some(Head { target: Target::Connect { host, port }, proxy_auth, len }));
    }
    let rest = match path.get(..7) {
        Some(s) if s.eq_ignore_ascii_case("http://") => &path[7..],
        _ if path.starts_with('/') => return Err(bad(400, "not a proxy request (origin-form target)")),
        _ => return Err(bad(501, "only http:// URIs are forwarded; use CONNECT for TLS")),
    };
    let auth = rest.find(['/', '?']).map_or(rest, |i| &rest[..i]);
    let (host, port) = authority(auth, Some(80)).ok_or(bad(400, "bad host in URI"))?;
    Ok(Some(Head { target: Target::Forward { host, port }, proxy_auth, len }))
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// An error response that closes the connection.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    let extra = if status == 407 { "Proxy-Authenticate: Basic realm=\"citadel\"\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// Serves one HTTP proxy client: the head (bounded by [`ProxyConfig::handshake_timeout`] and
/// [`MAX_HEAD`]), then a tunnel or one forwarded request.
///
/// # Errors
/// The client went away or timed out; the connection is closed either way.
pub async fn serve<S>(mut s: S, backend: &dyn Backend, cfg: &ProxyConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let head =
        match tokio::time::timeout(cfg.handshake_timeout, read_head(&mut s, &mut buf, MAX_HEAD, parse_head)).await {
            Err(_) => {
                let _ = s.write_all(&error_response(408, "request head timed out")).await;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "HTTP proxy request timed out"));
            }
            Ok(Ok(h)) => h,
            Ok(Err(ReadHeadError::Bad(e))) => {
                s.write_all(&error_response(e.status, e.why)).await?;
                return Ok(());
            }
            Ok(Err(ReadHeadError::TooLarge(_))) => {
                s.write_all(&error_response(431, "request head too large")).await?;
                return Ok(());
            }
            Ok(Err(ReadHeadError::Closed)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Err(ReadHeadError::Io(e))) => return Err(e),
        };
    if let Some(creds) = &cfg.auth {
        let ok = head.proxy_auth.as_ref().is_some_and(|(u, p)| creds.matches(u, p));
        if !ok {
            s.write_all(&error_response(407, "proxy credentials required")).await?;
            return Ok(());
        }
    }
    let (host, port) = match &head.target {
        Target::Connect { host, port } => (host, *port),
        // hyper reads the same head again, then every request after it.
        Target::Forward { .. } => return forward(Prefixed::new(buf, s), backend, cfg).await,
    };
    let r = match route(backend, host, port, cfg.allow_direct) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("HTTP proxy: {e}");
            s.write_all(&error_response(403, &e.to_string())).await?;
            return Ok(());
        }
    };
    let mut dest = match dial(backend, &r).await {
        Ok(d) => d,
        Err(e) => {
            let status = if e.kind() == io::ErrorKind::TimedOut { 504 } else { 502 };
            s.write_all(&error_response(status, &format!("cannot reach {host}:{port}: {e}"))).await?;
            return Ok(());
        }
    };
    let early = buf.split_off(head.len);
    s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    splice(&mut s, &mut *dest, &early).await
}

type ProxyBody = Either<Incoming, Full<Bytes>>;

fn plain(status: u16, message: &str) -> hyper::Response<ProxyBody> {
    let mut r = hyper::Response::new(Either::Right(Full::new(Bytes::from(format!("{message}\n")))));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    // A refused request ends the connection, as the first request's refusals do.
    h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    if status == 407 {
        h.insert("proxy-authenticate", hyper::header::HeaderValue::from_static("Basic realm=\"citadel\""));
    }
    r
}

/// The open connection to the origin of the last request.
type Origin = Option<((Host, u16), hyper::client::conn::http1::SendRequest<Incoming>)>;

/// Serves absolute-URI requests on `io` until the client closes or stops keeping alive.
async fn forward<S>(io: Prefixed<S>, backend: &dyn Backend, cfg: &ProxyConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let origin: tokio::sync::Mutex<Origin> = tokio::sync::Mutex::new(None);
    let service = hyper::service::service_fn(|req| {
        let origin = &origin;
        async move { Ok::<_, std::convert::Infallible>(forward_one(req, origin, backend, cfg).await) }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(cfg.handshake_timeout)
        .max_buf_size(MAX_HEAD.max(8192))
        .title_case_headers(true);
    b.serve_connection(hyper_util::rt::TokioIo::new(io), service).await.map_err(io::Error::other)
}

/// One forwarded request: checks, routing, the origin connection (reused when it goes to the
/// same host and port), and the response.
async fn forward_one(
    mut req: hyper::Request<Incoming>,
    origin: &tokio::sync::Mutex<Origin>,
    backend: &dyn Backend,
    cfg: &ProxyConfig,
) -> hyper::Response<ProxyBody> {
    if let Some(creds) = &cfg.auth {
        let got = req.headers().get("proxy-authorization").and_then(|v| basic_credentials(v.as_bytes()));
        if !got.is_some_and(|(u, p)| creds.matches(&u, &p)) {
            return plain(407, "proxy credentials required");
        }
    }
    if req.method() == hyper::Method::CONNECT {
        return plain(400, "CONNECT must be the first request of a connection");
    }
    match req.uri().scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => {}
        None => return plain(400, "not a proxy request (origin-form target)"),
        Some(_) => return plain(501, "only http:// URIs are forwarded; use CONNECT for TLS"),
    }
    let Some((host, port)) = req.uri().authority().and_then(|a| authority(a.as_str(), Some(80))) else {
        return plain(400, "bad host in URI");
    };
    let r = match route(backend, &host, port, cfg.allow_direct) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("HTTP proxy: {e}");
            return plain(403, &e.to_string());
        }
    };
    // Origin form, without the hop-by-hop headers (RFC 9110 section 7.6.1).
    let path = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let host_header = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    *req.uri_mut() = match path.parse() {
        Ok(u) => u,
        Err(_) => return plain(400, "bad path in URI"),
    };
    let tokens: Vec<String> = req
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v.as_bytes()).split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>()
        })
        .collect();
    let names: Vec<hyper::header::HeaderName> = req.headers().keys().cloned().collect();
    for n in names.iter().filter(|n| hop_by_hop(n.as_str(), &tokens)) {
        req.headers_mut().remove(n);
    }
    if !req.headers().contains_key(hyper::header::HOST) {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&host_header) {
            req.headers_mut().insert(hyper::header::HOST, v);
        }
    }

    let mut slot = origin.lock().await;
    let reusable = matches!(&*slot, Some((k, tx)) if *k == (host.clone(), port) && tx.is_ready());
    if !reusable {
        *slot = None;
        let dest: Box<dyn AsyncReadWrite> = match dial(backend, &r).await {
            Ok(d) => d,
            Err(e) => {
                let status = if e.kind() == io::ErrorKind::TimedOut { 504 } else { 502 };
                return plain(status, &format!("cannot reach {host}:{port}: {e}"));
            }
        };
        let handshake = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(hyper_util::rt::TokioIo::new(dest))
            .await;
        match handshake {
            Ok((tx, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                *slot = Some(((host.clone(), port), tx));
            }
            Err(e) => return plain(502, &format!("cannot reach {host}:{port}: {e}")),
        }
    }
    let Some((_, tx)) = slot.as_mut() else { return plain(502, "no origin connection") };
    match tx.send_request(req).await {
        Ok(mut resp) => {
            for n in ["connection", "keep-alive", "proxy-connection"] {
                resp.headers_mut().remove(n);
            }
            // The proxy answers in its own protocol version (RFC 9110 section 6.2), so an
            // HTTP/1.0 origin does not end the client's kept-alive connection.
            *resp.version_mut() = hyper::Version::HTTP_11;
            resp.map(Either::Left)
        }
        Err(e) => {
            *slot = None;
            plain(502, &format!("{host}:{port} did not answer: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::Credentials;
    use super::*;
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn parses_connect_and_absolute_uris() {
        let h = parse_head(b"CONNECT bravo:22 HTTP/1.1\r\nHost: bravo:22\r\n\r\nSSH-").unwrap().unwrap();
        assert_eq!(h.target, Target::Connect { host: Host::Name("bravo".into()), port: 22 });
        assert_eq!(h.len, 45);
        let h = parse_head(b"CONNECT [fd7a:115c:a1e0::1]:443 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, Target::Connect { host: Host::Ip("fd7a:115c:a1e0::1".parse().unwrap()), port: 443 });
        let raw = b"GET http://bravo.acme.mesh:8080/f?x=1 HTTP/1.1\r\nHost: bravo.acme.mesh:8080\r\nProxy-Authorization: Basic YTpi\r\n\r\n";
        let h = parse_head(raw).unwrap().unwrap();
        assert_eq!(h.target, Target::Forward { host: Host::Name("bravo.acme.mesh".into()), port: 8080 });
        assert_eq!(h.proxy_auth, Some((b"a".to_vec(), b"b".to_vec())));
        let h = parse_head(b"GET http://bravo HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, Target::Forward { host: Host::Name("bravo".into()), port: 80 });
        let h = parse_head(b"GET http://bravo?q HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, Target::Forward { host: Host::Name("bravo".into()), port: 80 });
        assert_eq!(parse_head(b"GET http://bravo/ HTTP/1.1\r\nHost: b"), Ok(None));
    }

    #[test]
    fn refuses_what_it_cannot_forward() {
        let status = |raw: &[u8]| parse_head(raw).unwrap_err().status;
        assert_eq!(status(b"GET /local HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET https://bravo/ HTTP/1.1\r\n\r\n"), 501);
        assert_eq!(status(b"CONNECT bravo HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"CONNECT bravo:0 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET http://user@bravo/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        let many = format!("GET http://b/ HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(100));
        assert_eq!(status(many.as_bytes()), 431);
        assert_eq!(status(&vec![b'a'; MAX_HEAD + 10]), 431);
        let long = format!("GET http://b/{} HTTP/1.1\r\n", "x".repeat(MAX_HEAD));
        assert_eq!(status(long.as_bytes()), 431);
    }

    proptest! {
        #[test]
        fn parser_never_panics(b in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Some(h)) = parse_head(&b) { prop_assert!(h.len <= b.len()); }
        }

        #[test]
        fn parser_never_panics_on_near_valid_heads(m in "(GET|CONNECT|POST) ", u in "[ -~]{0,60}", h in "([ -~]{0,20}: [ -~]{0,20}\r\n){0,4}") {
            let raw = format!("{m}{u} HTTP/1.1\r\n{h}\r\n");
            let _ = parse_head(raw.as_bytes());
        }
    }

    async fn talk(backend: FakeMesh, cfg: ProxyConfig, send: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { serve(server, &backend, &cfg).await });
        client.write_all(send).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the proxy closed the connection")
            .unwrap();
        drop(client);
        let _ = task.await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn connect_tunnels_and_forward_rewrites() {
        let server = line_server(b"echo: ").await;
        let cfg = ProxyConfig::new(server);
        let got = talk(
            mesh_with("bravo"),
            cfg.clone(),
            format!("CONNECT bravo:{} HTTP/1.1\r\n\r\nhi\n", server.port()).as_bytes(),
        )
        .await;
        assert_eq!(got, "HTTP/1.1 200 Connection established\r\n\r\necho: hi\n");
    }

    #[tokio::test]
    async fn forwarded_requests_keep_the_connection_alive_in_origin_form() {
        let (origin, conns, heads) = http_origin().await;
        let p = origin.port();
        let two = format!(
            "GET http://bravo:{p}/x HTTP/1.1\r\nHost: bravo:{p}\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nX-Keep: 1\r\nProxy-Authorization: Basic YTpi\r\n\r\n\
             GET http://bravo:{p}/y?q=1 HTTP/1.1\r\nHost: bravo:{p}\r\nConnection: close\r\n\r\n"
        );
        let got = talk(mesh_with("bravo"), ProxyConfig::new(origin), two.as_bytes()).await;
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
        assert!(got.contains("GET /x HTTP/1.1") && got.ends_with("GET /y?q=1 HTTP/1.1"), "{got}");
        // Both went over one origin connection, in origin form, without the proxy's headers.
        assert_eq!(*conns.lock().unwrap(), 1);
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 2);
        assert!(heads[0].starts_with("GET /x HTTP/1.1\r\n") && heads[0].contains("X-Keep: 1"), "{heads:?}");
        for dropped in ["proxy-connection", "x-drop", "proxy-authorization"] {
            assert!(heads.iter().all(|h| !h.to_ascii_lowercase().contains(dropped)), "{dropped}: {heads:?}");
        }
    }

    #[tokio::test]
    async fn outside_destinations_are_forbidden_and_auth_is_enforced() {
        let m = mesh_with("bravo");
        let cfg = ProxyConfig::new(([127, 0, 0, 1], 1).into());
        for req in ["CONNECT example.com:443 HTTP/1.1\r\n\r\n", "GET http://192.0.2.1/ HTTP/1.1\r\n\r\n"] {
            let got = talk(mesh_with("bravo"), cfg.clone(), req.as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 403 "), "{got}");
        }
        assert!(m.direct_dials.lock().unwrap().is_empty());
        let mut cfg = cfg;
        cfg.auth = Credentials::parse("alice:pw");
        let got = talk(mesh_with("bravo"), cfg.clone(), b"CONNECT bravo:1 HTTP/1.1\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 407 ") && got.contains("Proxy-Authenticate: Basic"), "{got}");
        let got = talk(
            mesh_with("bravo"),
            cfg.clone(),
            b"CONNECT bravo:1 HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHg=\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 407 "), "{got}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let req = format!("CONNECT bravo:{closed} HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n");
        let got = talk(mesh_with("bravo"), cfg, req.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 502 "), "authorized, then the closed port: {got}");
    }

    #[tokio::test]
    async fn garbage_gets_an_error_and_a_close() {
        let cfg = ProxyConfig::new(([127, 0, 0, 1], 1).into());
        for junk in [&b"\xff\xfe\r\n\r\n"[..], b"GET\r\n\r\n", b"HELLO WORLD\r\n\r\n", &[b'x'; MAX_HEAD + 100]] {
            let got = talk(mesh_with("b"), cfg.clone(), junk).await;
            assert!(got.starts_with("HTTP/1.1 4"), "{got}");
        }
    }
}
