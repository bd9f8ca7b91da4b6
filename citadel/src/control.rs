//! The ts2021 control client: `GET /key`, the Noise upgrade on `POST /ts2021`, HTTP/2 inside
//! the Noise channel, `/machine/register` and the streaming `/machine/map`.
//!
//! I/O lives here; the protocol pieces it drives (Noise, frames, JSON) are sans-IO modules.

pub mod liveness;
pub mod session;

use crate::keys::{MachinePublic, PrivateKey};
use crate::net::{read_response_head, unread, AsyncReadWrite, Net, ReadHeadError};
use crate::noise::{self, NoiseStream, EARLY_MAGIC};
use crate::tailcfg::{
    self, decode_map_body, decode_map_frame, map_frame_len, EarlyNoise, MapRequest, MapResponse,
    OverTlsPublicKeyResponse, RegisterRequest, RegisterResponse,
};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Control-plane failures, sorted by what the user should do about them.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The URL is not one citadel can dial.
    #[error("invalid Nexus URL {0:?}: {1}")]
    BadUrl(String, String),
    /// TCP connect failed or timed out.
    #[error("cannot reach Nexus at {0}: {1}")]
    Unreachable(String, String),
    /// The server answered with something that is not the protocol.
    #[error("Nexus protocol error: {0}")]
    Protocol(String),
    /// The Noise channel failed.
    #[error(transparent)]
    Noise(#[from] noise::NoiseError),
    /// The server sent a map message we could not decode.
    #[error("bad map message from Nexus: {0}")]
    Frame(#[from] tailcfg::FrameError),
    /// The connection closed.
    #[error("connection to Nexus closed")]
    Closed,
    /// TLS to the Nexus failed (untrusted certificate, wrong host name, ...).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A response body passed its size limit.
    #[error("Nexus sent a response larger than {0} bytes")]
    TooLarge(usize),
    /// The server's Noise key differs from the one pinned at registration.
    #[error(
        "server key changed: {url} now presents {got}, but this node pinned {pinned} when it \
         registered. Someone may be impersonating the Nexus; nothing was sent to it. If the Nexus \
         operator really replaced the server key, re-trust it deliberately with \
         `citadel up --retrust-server-key` (or `citadel init --retrust-server-key ...`)"
    )]
    ServerKeyChanged {
        /// The Nexus URL dialled.
        url: String,
        /// The key pinned at registration.
        pinned: MachinePublic,
        /// The key the server presents now.
        got: MachinePublic,
    },
}

impl From<hyper::Error> for ControlError {
    fn from(e: hyper::Error) -> Self {
        ControlError::Protocol(e.to_string())
    }
}

/// Largest HTTP/1 response body read outside the Noise channel (`/key`, device login) and
/// largest register response: all are small JSON documents.
pub const MAX_BODY: usize = 1 << 20;
/// Bound on the `/ts2021` upgrade answer's head.
const MAX_UPGRADE_HEAD: usize = 16 * 1024;

/// A parsed Nexus URL: `http://host[:port]` or `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexusUrl {
    /// TLS (`https`) or not.
    pub tls: bool,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port (80 or 443 when the URL gives none).
    pub port: u16,
}

impl NexusUrl {
    /// The `Host` header value.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("{host}:{}", self.port)
    }
}

/// Parses a Nexus URL.
pub fn parse_url(url: &str) -> Result<NexusUrl, ControlError> {
    let bad = |why: &str| ControlError::BadUrl(url.to_string(), why.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("expected http://host[:port] or https://host[:port]")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?.trim_matches(['[', ']']).to_string();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if tls {
        crate::tls::server_name(&host).map_err(|_| bad("the host is not a valid TLS server name"))?;
    }
    Ok(NexusUrl { tls, host, port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }) })
}

/// Opens the byte stream to the Nexus: TCP, then TLS for an `https` URL (certificate checked
/// against the URL's host with [`crate::tls`]'s trust).
async fn connect(
    net: &dyn Net,
    url: &str,
    timeout: Duration,
) -> Result<(Box<dyn AsyncReadWrite>, NexusUrl), ControlError> {
    let u = parse_url(url)?;
    let fut = async {
        let tcp = crate::proxy::connect(net, u.tls, &u.host, u.port)
            .await
            .map_err(|e| ControlError::Unreachable(url.to_string(), e.to_string()))?;
        if !u.tls {
            return Ok(tcp);
        }
        let s = crate::tls::connect(tcp, &u.host).await?;
        Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(s)) => Ok((s, u)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ControlError::Unreachable(url.to_string(), format!("timed out after {timeout:?}"))),
    }
}

/// Collects a response body, failing once it passes `limit` bytes.
async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, ControlError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ControlError::TooLarge(limit)),
        Err(e) => Err(ControlError::Protocol(e.to_string())),
    }
}

/// Fetches the server's machine public key (`GET /key?v=N`).
pub async fn fetch_server_key(net: &dyn Net, url: &str, timeout: Duration) -> Result<MachinePublic, ControlError> {
    let path = format!("/key?v={}", tailcfg::CAPABILITY_VERSION);
    let (status, body) = http1_request(net, url, http::Method::GET, &path, None, timeout).await?;
    if !status.is_success() {
        return Err(ControlError::Protocol(format!("/key answered {status}")));
    }
    let k: OverTlsPublicKeyResponse = serde_json::from_slice(&body)
        .map_err(|e| ControlError::Protocol(format!("/key answer is not the expected JSON: {e}")))?;
    if k.public_key.is_zero() {
        return Err(ControlError::Protocol("/key answer has no publicKey".into()));
    }
    Ok(k.public_key)
}

/// One plain HTTP/1.1 request to the Nexus (outside the Noise channel), bounded by `timeout`.
/// A `form` body is sent as `application/x-www-form-urlencoded`.
pub async fn http1_request(
    net: &dyn Net,
    url: &str,
    method: http::Method,
    path: &str,
    form: Option<String>,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), ControlError> {
    let body = form.map(|f| ("application/x-www-form-urlencoded", f));
    http1_request_typed(net, url, method, path, body, timeout).await
}

/// Like [`http1_request`] with a JSON body.
pub async fn http1_json(
    net: &dyn Net,
    url: &str,
    path: &str,
    json: String,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), ControlError> {
    http1_request_typed(net, url, http::Method::POST, path, Some(("application/json", json)), timeout).await
}

async fn http1_request_typed(
    net: &dyn Net,
    url: &str,
    method: http::Method,
    path: &str,
    body: Option<(&'static str, String)>,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), ControlError> {
    let fut = async {
        let (io, u) = connect(net, url, timeout).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder().method(method).uri(path).header("host", u.authority());
        if let Some((ty, _)) = &body {
            req = req.header("content-type", *ty);
        }
        let req = req
            .body(Full::new(Bytes::from(body.map(|(_, b)| b).unwrap_or_default())))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = collect_limited(resp.into_body(), MAX_BODY).await?;
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ControlError::Unreachable(url.to_string(), format!("no answer within {timeout:?}")))?
}

/// An open ts2021 session: HTTP/2 requests over the Noise channel.
pub struct ControlConn {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    /// The early payload, if the server sent one.
    pub early: Option<EarlyNoise>,
    /// The server's Noise key this session was authenticated with.
    pub server_key: MachinePublic,
}

impl ControlConn {
    /// Dials `url`, performs the Noise handshake as `machine` and starts HTTP/2.
    pub async fn dial(
        net: &dyn Net,
        url: &str,
        machine: &PrivateKey,
        server: &MachinePublic,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let fut = async {
            let (mut tcp, u) = connect(net, url, timeout).await?;
            let host = u.authority();
            let init = noise::Initiator::new(machine, &server.0, tailcfg::CAPABILITY_VERSION)?;
            let hdr = base64::engine::general_purpose::STANDARD.encode(&init.init_frame);
            let req = format!(
                "POST /ts2021 HTTP/1.1\r\nHost: {host}\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: {hdr}\r\nContent-Length: 0\r\n\r\n"
            );
            tcp.write_all(req.as_bytes()).await.map_err(|_| ControlError::Closed)?;
            let mut early = Vec::new();
            let head = match read_response_head(&mut tcp, &mut early, MAX_UPGRADE_HEAD).await {
                Ok(h) => h,
                Err(ReadHeadError::Closed | ReadHeadError::Io(_)) => return Err(ControlError::Closed),
                Err(e) => return Err(ControlError::Protocol(format!("bad upgrade response: {e}"))),
            };
            if head.status != 101 {
                return Err(ControlError::Protocol(format!(
                    "/ts2021 answered {} {} instead of 101",
                    head.status, head.reason
                )));
            }
            let mut tcp = unread(early, tcp);
            let mut hdr3 = [0u8; 3];
            tcp.read_exact(&mut hdr3).await.map_err(|_| ControlError::Closed)?;
            let len = u16::from_be_bytes([hdr3[1], hdr3[2]]) as usize;
            if len > noise::MAX_FRAME {
                return Err(ControlError::Protocol("oversized handshake response".into()));
            }
            let mut frame = hdr3.to_vec();
            frame.resize(3 + len, 0);
            tcp.read_exact(&mut frame[3..]).await.map_err(|_| ControlError::Closed)?;
            let (tx, rx) = init.finish(&frame)?;
            let mut stream = NoiseStream::new(tcp, tx, rx);
            let early = read_early(&mut stream).await?;
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Detects a dead server (or path) while the map stream is idle.
                .keep_alive_interval(Duration::from_secs(25))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(stream))
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("control connection ended: {e}");
                }
            });
            Ok(ControlConn { send, early, server_key: *server })
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ControlError::Unreachable(url.to_string(), format!("handshake not done within {timeout:?}")))?
    }

    async fn post(&mut self, path: &str, body: Vec<u8>) -> Result<hyper::Response<Incoming>, ControlError> {
        self.send.ready().await?;
        let req = http::Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ControlError::Protocol(e.to_string()))?;
        Ok(self.send.send_request(req).await?)
    }

    /// `POST /machine/register`.
    pub async fn register(&mut self, req: &RegisterRequest) -> Result<RegisterResponse, ControlError> {
        let resp = self.post("/machine/register", serde_json::to_vec(req).expect("serializes")).await?;
        let status = resp.status();
        let body = collect_limited(resp.into_body(), MAX_BODY).await?;
        if !status.is_success() {
            return Err(ControlError::Protocol(format!(
                "register answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        serde_json::from_slice(&body).map_err(|e| ControlError::Protocol(format!("bad RegisterResponse: {e}")))
    }

    /// `POST /machine/map`; for a streaming request, read messages with [`MapStream::next`].
    pub async fn map(&mut self, req: &MapRequest) -> Result<MapStream, ControlError> {
        let resp = self.post("/machine/map", serde_json::to_vec(req).expect("serializes")).await?;
        let status = resp.status();
        if !status.is_success() {
            let body = collect_limited(resp.into_body(), MAX_BODY).await.unwrap_or_default();
            return Err(ControlError::Protocol(format!(
                "map answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        Ok(MapStream { body: resp.into_body(), frames: MapFrames::new(req.compress == "zstd") })
    }
}

async fn read_early<S: tokio::io::AsyncRead + Unpin>(
    s: &mut NoiseStream<S>,
) -> Result<Option<EarlyNoise>, ControlError> {
    let mut magic = [0u8; 5];
    s.read_exact(&mut magic).await.map_err(|e| ControlError::Protocol(format!("reading early payload: {e}")))?;
    if magic != EARLY_MAGIC {
        s.unread(&magic);
        return Ok(None);
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.map_err(|_| ControlError::Closed)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 64 * 1024 {
        return Err(ControlError::Protocol("early payload too large".into()));
    }
    let mut json = vec![0u8; len];
    s.read_exact(&mut json).await.map_err(|_| ControlError::Closed)?;
    serde_json::from_slice(&json).map(Some).map_err(|e| ControlError::Protocol(format!("bad early payload: {e}")))
}

/// Capacity a map stream's buffer may keep between messages.
const IDLE_MAP_BUF: usize = 16 * 1024;

/// The body of a map response, decoded message by message.
pub struct MapStream {
    body: Incoming,
    frames: MapFrames,
}

impl MapStream {
    /// The next message, `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<MapResponse>, ControlError> {
        loop {
            let m = if self.frames.holds_large()? { off_worker(|| self.frames.next())? } else { self.frames.next()? };
            if let Some(m) = m {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                None => {
                    if self.frames.buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(ControlError::Protocol("map stream ended mid-message".into()));
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        if let Some(m) = self.frames.push(&d)? {
                            return Ok(Some(m));
                        }
                    }
                }
            }
        }
    }
}

/// A message at least this long (on the wire) is decoded off the runtime's worker
/// ([`off_worker`]): a full map of 10,000 peers takes 25-55 ms to decode, a 1,000-peer one about
/// 3 ms, a delta a few µs.
const LARGE_MESSAGE: usize = 128 * 1024;

/// Runs `f`, a long computation, where it does not hold up the other tasks of a multi-threaded
/// runtime's worker: `block_in_place` hands the worker's queue (the data plane's tasks among
/// them) to another thread while `f` runs on this one. A task's poll is not preempted, so
/// without it every task queued behind the decode of a big map waited for all of it. On a
/// single-threaded runtime (the simulator's) `f` runs in place, as before, and stays
/// deterministic.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A map stream's messages, cut out of the body's DATA frames as they come (sans-IO).
struct MapFrames {
    buf: Vec<u8>,
    zstd: bool,
}

impl MapFrames {
    fn new(zstd: bool) -> Self {
        MapFrames { buf: Vec::new(), zstd }
    }

    /// Whether the bytes pushed so far hold a whole message of [`LARGE_MESSAGE`] bytes or more.
    fn holds_large(&self) -> Result<bool, ControlError> {
        Ok(map_frame_len(&self.buf)?.is_some_and(|n| n >= LARGE_MESSAGE))
    }

    /// The next message the bytes pushed so far hold whole.
    fn next(&mut self) -> Result<Option<MapResponse>, ControlError> {
        let m = decode_map_frame(&mut self.buf, self.zstd)?;
        // A full map can be hundreds of KB; an idle stream need not keep its buffer.
        if m.is_some() && self.buf.is_empty() && self.buf.capacity() > IDLE_MAP_BUF {
            self.buf = Vec::new();
        }
        Ok(m)
    }

    /// Takes a DATA frame's bytes. A frame usually starts with a whole message: that one is
    /// decoded where it lies (not copied into the buffer first) and returned; the rest is
    /// kept for [`MapFrames::next`].
    fn push(&mut self, data: &[u8]) -> Result<Option<MapResponse>, ControlError> {
        if self.buf.is_empty() {
            if let Some(n) = map_frame_len(data)? {
                self.buf.extend_from_slice(&data[n..]);
                return Ok(Some(decode_map_body(&data[4..n], self.zstd)?));
            }
        }
        self.buf.extend_from_slice(data);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::TokioNet;
    use tokio::io::AsyncWriteExt;

    /// Messages come out whole and in order however the body cuts them into DATA frames:
    /// several in one frame, one across many, cut at every byte. A length over the cap is an
    /// error.
    #[test]
    fn map_frames_decode_messages_however_the_body_cuts_them() {
        use citadel_proto::tailcfg::encode_map_frame;
        for zstd in [false, true] {
            let msgs: Vec<MapResponse> = (0..4)
                .map(|i| MapResponse {
                    keep_alive: i == 2,
                    peers_removed: Some((0..i * 50).collect()),
                    ..Default::default()
                })
                .collect();
            let wire: Vec<u8> = msgs.iter().flat_map(|m| encode_map_frame(m, zstd)).collect();
            for cut in 1..wire.len() {
                let mut f = MapFrames::new(zstd);
                let mut got = vec![];
                for chunk in [&wire[..cut], &wire[cut..]] {
                    got.extend(f.push(chunk).unwrap());
                    while let Some(m) = f.next().unwrap() {
                        got.push(m);
                    }
                }
                assert_eq!(got, msgs, "cut at {cut}, zstd {zstd}");
                assert!(f.buf.is_empty());
            }
            // Byte by byte.
            let mut f = MapFrames::new(zstd);
            let mut got = vec![];
            for b in &wire {
                got.extend(f.push(std::slice::from_ref(b)).unwrap());
                got.extend(f.next().unwrap());
            }
            assert_eq!(got, msgs);
        }
        // A length over the cap is an error, not an allocation.
        let mut f = MapFrames::new(false);
        let huge = (citadel_proto::tailcfg::MAX_MAP_MESSAGE as u32 + 1).to_le_bytes();
        assert!(f.push(&huge).is_err());
    }

    /// Only a whole message of [`LARGE_MESSAGE`] bytes or more counts as large: a part of one
    /// does not, nor does a small one.
    #[test]
    fn large_messages_are_told_apart_once_whole() {
        use citadel_proto::tailcfg::encode_map_frame;
        let small = encode_map_frame(&MapResponse { peers_removed: Some(vec![1, 2, 3]), ..Default::default() }, false);
        let big = MapResponse { peers_removed: Some((1_000_000..1_030_000).collect()), ..Default::default() };
        let wire = encode_map_frame(&big, false);
        assert!(wire.len() >= LARGE_MESSAGE, "{}", wire.len());
        let mut f = MapFrames::new(false);
        f.buf.extend_from_slice(&small);
        assert!(!f.holds_large().unwrap());
        assert!(f.next().unwrap().is_some());
        for chunk in wire.chunks(16 * 1024) {
            assert!(!f.holds_large().unwrap());
            assert!(f.push(chunk).unwrap().is_none());
        }
        assert!(f.holds_large().unwrap());
        assert_eq!(f.next().unwrap(), Some(big));
    }

    /// A long decode on a multi-threaded runtime's only worker leaves that worker's other
    /// tasks running (a ticker keeps ticking through it); without `block_in_place` it stood
    /// still for the whole decode.
    #[test]
    fn a_long_decode_does_not_hold_up_the_workers_other_tasks() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        use std::sync::Arc;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let ticks_during = rt.block_on(async {
            let ticks = Arc::new(AtomicUsize::new(0));
            let t = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    t.fetch_add(1, Relaxed);
                }
            });
            let during = tokio::spawn(async move {
                let before = ticks.load(Relaxed);
                off_worker(|| std::thread::sleep(Duration::from_millis(300)));
                ticks.load(Relaxed) - before
            });
            let n = tokio::time::timeout(Duration::from_secs(10), during).await.unwrap().unwrap();
            ticker.abort();
            n
        });
        assert!(ticks_during >= 5, "the ticker ticked {ticks_during} times during a 300 ms decode");
    }

    #[test]
    fn urls_pick_scheme_and_default_port() {
        let u = parse_url("https://nexus.example").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "nexus.example", 443));
        let u = parse_url("http://[::1]:8080").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.authority()), (false, "::1", 8080, "[::1]:8080".to_string()));
        assert!(matches!(parse_url("ftp://x"), Err(ControlError::BadUrl(..))));
    }

    /// A server announcing (and streaming) a 100 MB body: the client gives up at the cap
    /// instead of buffering it all.
    #[tokio::test]
    async fn a_huge_http1_body_is_cut_off_at_the_cap() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n";
            s.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b' '; 64 * 1024];
            let mut sent = 0usize;
            while sent < 100_000_000 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let url = format!("http://{addr}");
        let r = fetch_server_key(&TokioNet, &url, Duration::from_secs(10)).await;
        assert!(matches!(r, Err(ControlError::TooLarge(MAX_BODY))), "{r:?}");
        let sent = tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap();
        assert!(sent < 100_000_000, "the client read the whole body ({sent} bytes)");
    }
}
