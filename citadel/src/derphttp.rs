//! DERP client: the HTTP(S) upgrade, login, and the relay connection on top of the
//! [`crate::derp`] codec, plus a reconnecting wrapper ([`DerpConn`]) and per-region latency
//! probes for picking a home region.
//!
//! Everything dials through [`Net`], so the same code runs on tokio and in the turmoil
//! harness. Targets are either URLs (`http://host:port/derp` or `https://…`, the scheme
//! decides TLS, as Go's `derphttp` does for an explicit URL) or DERP map nodes, which are
//! always dialed with TLS as Tailscale v1.90 does (port `DERPPort`, 443 when 0; certificate
//! checks skipped only for `InsecureForTests` nodes).

use crate::backoff::Backoff;
use crate::derp::{self, ClientInfo, Frame, FrameType, PeerGoneReason, PeerPresentFlags, ServerInfo};
use crate::keys::{NodePublic, PrivateKey};
use crate::net::{read_response_head, AsyncReadWrite, Net, ReadHeadError};
use crate::tailcfg::{DerpMap, DerpNode};
use bytes::{Buf, BytesMut};
use citadel_proto::http::ResponseHead;
use rand::RngCore;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

/// Largest HTTP response head accepted before the upgrade.
const MAX_HTTP_HEAD: usize = 16 << 10;
/// Silence after which a connection is considered dead: the server sends a keep-alive every
/// [`derp::KEEP_ALIVE`], so two missed ones and some slack.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2 * 60 + 10);
/// Frames queued towards the writer before `send` waits.
const OUT_QUEUE: usize = 256;
/// Received messages buffered before the reader stops reading (TCP back-pressure).
const IN_QUEUE: usize = 256;

/// Where to connect.
#[derive(Debug, Clone, PartialEq)]
pub enum DerpTarget {
    /// `http://host[:port][/path]` or `https://…`; the path defaults to `/derp`.
    Url(String),
    /// A node of a DERP map (HTTPS).
    Node(DerpNode),
}

impl From<&str> for DerpTarget {
    fn from(s: &str) -> Self {
        DerpTarget::Url(s.to_string())
    }
}
impl From<String> for DerpTarget {
    fn from(s: String) -> Self {
        DerpTarget::Url(s)
    }
}
impl From<DerpNode> for DerpTarget {
    fn from(n: DerpNode) -> Self {
        DerpTarget::Node(n)
    }
}
impl From<&DerpNode> for DerpTarget {
    fn from(n: &DerpNode) -> Self {
        DerpTarget::Node(n.clone())
    }
}

/// What can go wrong talking to a DERP server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DerpClientError {
    /// The URL or node cannot be dialed.
    #[error("bad DERP target: {0}")]
    BadTarget(String),
    /// Network failure.
    #[error("DERP i/o: {0}")]
    Io(#[from] io::Error),
    /// TLS setup failure.
    #[error("DERP TLS: {0}")]
    Tls(String),
    /// The relay's certificate was refused (untrusted, wrong name) or the handshake failed.
    #[error("DERP relay: {0}")]
    Cert(#[from] crate::tls::TlsError),
    /// The deadline passed.
    #[error("DERP timed out")]
    Timeout,
    /// The server did not switch protocols.
    #[error("DERP upgrade refused: {0}")]
    Http(String),
    /// The server broke the protocol.
    #[error("DERP protocol: {0}")]
    Protocol(String),
    /// The connection is closed (the reason, when known).
    #[error("DERP connection closed: {0}")]
    Closed(String),
    /// [`DerpConn`] has no live connection right now.
    #[error("DERP not connected")]
    NotConnected,
}

type Result<T> = std::result::Result<T, DerpClientError>;

/// Something the server sent. Keep-alives and server pings are handled inside the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A relayed packet from `src`.
    Packet {
        /// Sender.
        src: NodePublic,
        /// The packet.
        packet: Vec<u8>,
    },
    /// `peer` is no longer reachable through this server.
    PeerGone {
        /// The peer.
        peer: NodePublic,
        /// Why it left.
        reason: PeerGoneReason,
    },
    /// `peer` connected (only to watchers holding the mesh key).
    PeerPresent {
        /// The peer.
        peer: NodePublic,
        /// Its address as the server sees it, if sent.
        endpoint: Option<SocketAddr>,
        /// What is known about it.
        flags: PeerPresentFlags,
    },
    /// A pong that answers no [`DerpClient::ping`] of this client.
    Pong {
        /// The echoed payload.
        data: [u8; derp::PING_DATA_LEN],
    },
    /// The server's health problem for this connection; empty means healthy.
    Health {
        /// The problem (empty: healthy again).
        problem: String,
    },
    /// The server is restarting: reconnect after `reconnect_in`, keep trying for `try_for`.
    Restarting {
        /// Wait this long before reconnecting.
        reconnect_in: Duration,
        /// Keep trying this long.
        try_for: Duration,
    },
}

/// What a [`DerpConn`] made with [`DerpConn::with_inbox`] hands its shared inbox, tagged
/// with the connection's `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The connection came up (logged in) or went down.
    Status {
        /// The connection's tag.
        tag: i32,
        /// Whether it is up now.
        up: bool,
    },
    /// A message from the server.
    Message {
        /// The connection's tag.
        tag: i32,
        /// What the server sent.
        msg: Received,
    },
}

/// Where a connection's reader hands what the server sends: straight to the consumer's
/// queue, so a relayed packet crosses one queue between the socket and its reader.
#[derive(Clone)]
enum Sink {
    /// A queue of this client or its [`DerpConn`], read with `recv`.
    Own(mpsc::Sender<Received>),
    /// A queue several connections share, each message tagged.
    Shared { tx: mpsc::Sender<Inbound>, tag: i32 },
}

impl Sink {
    /// Hands over one message; false once the consumer is gone.
    async fn deliver(&self, msg: Received) -> bool {
        match self {
            Sink::Own(tx) => tx.send(msg).await.is_ok(),
            Sink::Shared { tx, tag } => tx.send(Inbound::Message { tag: *tag, msg }).await.is_ok(),
        }
    }

    /// Reports the connection up or down (shared inboxes only); false once the consumer is gone.
    async fn status(&self, up: bool) -> bool {
        match self {
            Sink::Own(tx) => !tx.is_closed(),
            Sink::Shared { tx, tag } => tx.send(Inbound::Status { tag: *tag, up }).await.is_ok(),
        }
    }
}

/// Where and how to dial, resolved from a [`DerpTarget`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    dial_host: String,
    port: u16,
    tls: bool,
    insecure: bool,
    /// Host for SNI and the `Host` header.
    server_name: String,
    path: String,
}

fn endpoint(t: &DerpTarget, path: &str) -> Result<Endpoint> {
    match t {
        DerpTarget::Url(u) => {
            let uri: http::Uri = u.parse().map_err(|e| DerpClientError::BadTarget(format!("{u}: {e}")))?;
            let tls = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                _ => return Err(DerpClientError::BadTarget(format!("{u}: scheme must be http or https"))),
            };
            let host = uri.host().ok_or_else(|| DerpClientError::BadTarget(format!("{u}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let upath = uri.path();
            // A bare server URL means its DERP endpoint; probes replace the path.
            let path = if path != derp::upgrade::PATH || upath.is_empty() || upath == "/" {
                path.to_string()
            } else {
                upath.to_string()
            };
            Ok(Endpoint { dial_host: host.clone(), port, tls, insecure: false, server_name: host, path })
        }
        DerpTarget::Node(n) => {
            if n.stun_only {
                return Err(DerpClientError::BadTarget(format!("node {} is STUN-only", n.name)));
            }
            // Go dials the IPv4/IPv6 fields when present ("none" disables a family) and
            // resolves HostName otherwise; the certificate is checked against HostName.
            let usable = |s: &str| !s.is_empty() && s != "none";
            let dial_host = if usable(&n.ipv4) {
                n.ipv4.clone()
            } else if usable(&n.ipv6) {
                n.ipv6.clone()
            } else {
                n.host_name.clone()
            };
            if dial_host.is_empty() {
                return Err(DerpClientError::BadTarget(format!("node {} has no address", n.name)));
            }
            let port = match n.derp_port {
                0 => 443,
                p => u16::try_from(p).map_err(|_| DerpClientError::BadTarget(format!("DERPPort {p}")))?,
            };
            let server_name = if n.host_name.is_empty() { dial_host.clone() } else { n.host_name.clone() };
            Ok(Endpoint { dial_host, port, tls: true, insecure: n.insecure_for_tests, server_name, path: path.into() })
        }
    }
}

/// Environment variable that lets DERP nodes marked `InsecureForTests` skip certificate
/// checks; without it they are verified like any other node.
pub const DERP_INSECURE_ENV: &str = "CITADEL_DERP_INSECURE";

/// True when the user opted in to unverified `InsecureForTests` DERP nodes.
fn insecure_allowed() -> bool {
    std::env::var(DERP_INSECURE_ENV).is_ok_and(|v| v == "1")
}

mod tls {
    use super::DerpClientError;
    use std::sync::{Arc, OnceLock};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

    /// Accepts any certificate: only for DERP nodes marked `InsecureForTests`, and only when
    /// the user opted in.
    #[derive(Debug)]
    struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    fn insecure() -> Result<Arc<rustls::ClientConfig>, DerpClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| DerpClientError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }

    /// The client configuration: citadel's shared trust, or (for an `InsecureForTests` node
    /// with [`super::DERP_INSECURE_ENV`] set) none at all.
    pub fn config(insecure_node: bool) -> Result<Arc<rustls::ClientConfig>, DerpClientError> {
        static INSECURE: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        if !(insecure_node && super::insecure_allowed()) {
            return Ok(crate::tls::client_config()?);
        }
        if let Some(c) = INSECURE.get() {
            return Ok(c.clone());
        }
        tracing::warn!(
            "{}=1: DERP nodes marked InsecureForTests are used WITHOUT certificate checks",
            super::DERP_INSECURE_ENV
        );
        let c = insecure()?;
        Ok(INSECURE.get_or_init(|| c).clone())
    }
}

/// Opens the byte stream (TCP, then TLS when the endpoint asks for it).
async fn dial(net: &dyn Net, ep: &Endpoint) -> Result<Box<dyn AsyncReadWrite>> {
    let tcp = crate::proxy::connect(net, ep.tls, &ep.dial_host, ep.port).await?;
    if !ep.tls {
        return Ok(tcp);
    }
    let s = crate::tls::connect_with(tls::config(ep.insecure)?, tcp, &ep.server_name).await?;
    Ok(Box::new(s))
}

fn host_header(ep: &Endpoint) -> String {
    let host = if ep.server_name.contains(':') { format!("[{}]", ep.server_name) } else { ep.server_name.clone() };
    let default = if ep.tls { 443 } else { 80 };
    if ep.port == default {
        host
    } else {
        format!("{host}:{}", ep.port)
    }
}

/// Reads an HTTP/1.1 response head; bytes after it stay in `buf`.
async fn read_head(s: &mut Box<dyn AsyncReadWrite>, buf: &mut Vec<u8>) -> Result<ResponseHead> {
    read_response_head(s, buf, MAX_HTTP_HEAD).await.map_err(|e| match e {
        ReadHeadError::Io(e) => DerpClientError::Io(e),
        ReadHeadError::Closed => DerpClientError::Http("connection closed before the HTTP response".into()),
        e => DerpClientError::Http(e.to_string()),
    })
}

/// Reads one DERP frame from `s`, buffering in `buf` (a `BytesMut` so consuming a frame
/// does not move the rest of a large read).
async fn read_frame(s: &mut (impl tokio::io::AsyncRead + Unpin), buf: &mut BytesMut) -> Result<Frame> {
    loop {
        match derp::split_frame(buf) {
            Ok(Some(raw)) => {
                let n = raw.wire_len();
                let f = Frame::parse(raw.ty, raw.payload).map_err(|e| DerpClientError::Protocol(e.to_string()));
                buf.advance(n);
                return f;
            }
            Ok(None) => {}
            Err(e) => return Err(DerpClientError::Protocol(e.to_string())),
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        if s.read_buf(buf).await? == 0 {
            return Err(DerpClientError::Closed("server closed the connection".into()));
        }
    }
}

/// One logged-in DERP connection. All methods take `&self`, so one task may `recv` while
/// others `send`; share it in an `Arc`.
pub struct DerpClient {
    server_key: NodePublic,
    server_info: ServerInfo,
    out: mpsc::Sender<Vec<u8>>,
    /// `None` when messages go to a [`DerpConn`]'s queue instead.
    inbox: Option<tokio::sync::Mutex<mpsc::Receiver<Received>>>,
    /// The wait the server's last `Restarting` frame asked for.
    restart_hint: Arc<Mutex<Option<Duration>>>,
    pings: Arc<Mutex<HashMap<[u8; derp::PING_DATA_LEN], oneshot::Sender<()>>>>,
    closed: watch::Receiver<Option<String>>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for DerpClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for DerpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DerpClient").field("server_key", &self.server_key).finish_non_exhaustive()
    }
}

impl DerpClient {
    /// Dials `target`, upgrades to DERP and logs in as `node_key`, all within `timeout`.
    pub async fn connect(
        net: &dyn Net,
        target: impl Into<DerpTarget>,
        node_key: &PrivateKey,
        timeout: Duration,
    ) -> Result<DerpClient> {
        Self::connect_with_info(net, target, node_key, ClientInfo::citadel(), timeout).await
    }

    /// [`DerpClient::connect`] with a chosen ClientInfo (an app name, or a mesh key for a
    /// trusted region peer).
    pub async fn connect_with_info(
        net: &dyn Net,
        target: impl Into<DerpTarget>,
        node_key: &PrivateKey,
        info: ClientInfo,
        timeout: Duration,
    ) -> Result<DerpClient> {
        Self::connect_into(net, target, node_key, info, timeout, None).await
    }

    /// [`DerpClient::connect_with_info`] delivering to `sink` (else to the client's own queue).
    async fn connect_into(
        net: &dyn Net,
        target: impl Into<DerpTarget>,
        node_key: &PrivateKey,
        info: ClientInfo,
        timeout: Duration,
        sink: Option<Sink>,
    ) -> Result<DerpClient> {
        let ep = endpoint(&target.into(), derp::upgrade::PATH)?;
        tokio::time::timeout(timeout, Self::login(net, &ep, node_key, info, sink))
            .await
            .map_err(|_| DerpClientError::Timeout)?
    }

    async fn login(
        net: &dyn Net,
        ep: &Endpoint,
        node_key: &PrivateKey,
        info: ClientInfo,
        sink: Option<Sink>,
    ) -> Result<DerpClient> {
        let mut s = dial(net, ep).await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: citadel\r\nUpgrade: {}\r\nConnection: Upgrade\r\n\r\n",
            ep.path,
            host_header(ep),
            derp::upgrade::PROTOCOL
        );
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        let mut buf = Vec::with_capacity(64 << 10);
        let head = read_head(&mut s, &mut buf).await?;
        if head.status != 101 {
            let body = String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned();
            return Err(DerpClientError::Http(format!("status {}: {}", head.status, body.trim())));
        }
        let announced = head.header(derp::upgrade::PUBLIC_KEY_HEADER).map(str::to_string);
        let mut buf = BytesMut::from(&buf[..]);

        let server_key = match read_frame(&mut s, &mut buf).await? {
            Frame::ServerKey { key } => key,
            other => {
                return Err(DerpClientError::Protocol(format!("expected ServerKey, got {:?}", other.frame_type())))
            }
        };
        if let Some(hexkey) = announced {
            if !hexkey.trim().eq_ignore_ascii_case(&hex::encode(server_key.0)) {
                return Err(DerpClientError::Protocol("ServerKey frame differs from Derp-Public-Key".into()));
            }
        }
        let mut nonce = [0u8; derp::NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        s.write_all(&info.seal(node_key, &server_key, nonce).to_vec()).await?;
        s.flush().await?;
        let server_info = loop {
            match read_frame(&mut s, &mut buf).await? {
                Frame::ServerInfo { sealed } => {
                    break ServerInfo::open(node_key, &server_key, &sealed)
                        .map_err(|e| DerpClientError::Protocol(format!("ServerInfo: {e}")))?;
                }
                // A refusing server may explain itself before closing.
                Frame::Health { problem } if !problem.is_empty() => {
                    return Err(DerpClientError::Protocol(format!("server refused login: {problem}")));
                }
                Frame::Unknown { .. } | Frame::KeepAlive | Frame::Health { .. } => continue,
                other => {
                    return Err(DerpClientError::Protocol(format!("expected ServerInfo, got {:?}", other.frame_type())))
                }
            }
        };
        tracing::debug!(server = %server_key.short(), "DERP login complete");

        let (rd, wr) = tokio::io::split(s);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (sink, inbox) = match sink {
            Some(s) => (s, None),
            None => {
                let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
                (Sink::Own(in_tx), Some(tokio::sync::Mutex::new(in_rx)))
            }
        };
        let (closed_tx, closed_rx) = watch::channel(None);
        let closed_tx = Arc::new(closed_tx);
        let pings: Arc<Mutex<HashMap<_, oneshot::Sender<()>>>> = Arc::default();
        let restart_hint = Arc::new(Mutex::new(None));
        let writer = tokio::spawn(write_loop(wr, out_rx, closed_tx.clone()));
        let reader =
            tokio::spawn(read_loop(rd, buf, sink, out_tx.clone(), pings.clone(), Arc::clone(&restart_hint), closed_tx));
        Ok(DerpClient {
            server_key,
            server_info,
            out: out_tx,
            inbox,
            restart_hint,
            pings,
            closed: closed_rx,
            tasks: [reader, writer],
        })
    }

    /// The server's DERP public key.
    pub fn server_key(&self) -> NodePublic {
        self.server_key
    }

    /// What the server said at login.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// True once the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Resolves when the connection fails or closes, with the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.clone();
        let why = match rx.wait_for(|c| c.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => "client dropped".into(),
        };
        why
    }

    fn closed_error(&self) -> DerpClientError {
        DerpClientError::Closed(self.closed.borrow().clone().unwrap_or_else(|| "writer stopped".into()))
    }

    async fn queue(&self, frame: Vec<u8>) -> Result<()> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        self.out.send(frame).await.map_err(|_| self.closed_error())
    }

    /// Sends `packet` to `dst` through the relay. Waits only while the outgoing queue is full.
    pub async fn send(&self, dst: NodePublic, packet: &[u8]) -> Result<()> {
        if packet.len() > derp::MAX_PACKET_SIZE {
            return Err(DerpClientError::Protocol(format!("packet of {} bytes exceeds 64 KiB", packet.len())));
        }
        // Encoded by hand rather than through Frame to avoid copying the packet twice.
        let len = derp::KEY_LEN + packet.len();
        let mut f = Vec::with_capacity(derp::HEADER_LEN + len);
        f.push(FrameType::SEND_PACKET.0);
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend_from_slice(&dst.0);
        f.extend_from_slice(packet);
        self.queue(f).await
    }

    /// Sends any frame (mesh frames such as WatchConns, or tests' raw frames).
    pub async fn send_frame(&self, frame: &Frame) -> Result<()> {
        self.queue(frame.to_vec()).await
    }

    /// Tells the server whether it is this node's home region.
    pub async fn note_preferred(&self, preferred: bool) -> Result<()> {
        self.send_frame(&Frame::NotePreferred { preferred }).await
    }

    /// The next message from the server; an error once the connection is gone.
    pub async fn recv(&self) -> Result<Received> {
        let Some(inbox) = &self.inbox else {
            return Err(DerpClientError::Closed("messages go to the connection's shared inbox".into()));
        };
        let mut rx = inbox.lock().await;
        match rx.recv().await {
            Some(r) => Ok(r),
            None => Err(self.closed_error()),
        }
    }

    /// Measures the round trip of a DERP Ping/Pong. Works whether or not another task is
    /// blocked in [`DerpClient::recv`]: the reader matches the pong to this ping.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration> {
        let mut data = [0u8; derp::PING_DATA_LEN];
        rand::thread_rng().fill_bytes(&mut data);
        let (tx, rx) = oneshot::channel();
        self.pings.lock().unwrap_or_else(|e| e.into_inner()).insert(data, tx);
        let start = crate::clock::now();
        let r = async {
            self.send_frame(&Frame::Ping { data }).await?;
            rx.await.map_err(|_| self.closed_error())
        };
        let res = tokio::time::timeout(timeout, r).await;
        self.pings.lock().unwrap_or_else(|e| e.into_inner()).remove(&data);
        match res {
            Ok(Ok(())) => Ok(crate::clock::now().saturating_duration_since(start)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DerpClientError::Timeout),
        }
    }
}

async fn write_loop(
    mut wr: tokio::io::WriteHalf<Box<dyn AsyncReadWrite>>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    closed: Arc<watch::Sender<Option<String>>>,
) {
    let mut batch = Vec::with_capacity(64 << 10);
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        // Whatever else is already queued goes out in the same write.
        while batch.len() < (256 << 10) {
            match rx.try_recv() {
                Ok(f) => batch.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        let r = async {
            wr.write_all(&batch).await?;
            wr.flush().await
        };
        if let Err(e) = r.await {
            closed.send_if_modified(|c| set_once(c, format!("write: {e}")));
            return;
        }
    }
}

fn set_once(c: &mut Option<String>, why: String) -> bool {
    if c.is_some() {
        return false;
    }
    *c = Some(why);
    true
}

async fn read_loop(
    mut rd: tokio::io::ReadHalf<Box<dyn AsyncReadWrite>>,
    mut buf: BytesMut,
    sink: Sink,
    out: mpsc::Sender<Vec<u8>>,
    pings: Arc<Mutex<HashMap<[u8; derp::PING_DATA_LEN], oneshot::Sender<()>>>>,
    restart_hint: Arc<Mutex<Option<Duration>>>,
    closed: Arc<watch::Sender<Option<String>>>,
) {
    // A failed writer also ends the reader, so `recv` reports the dead connection at once.
    let mut writer_failed = closed.subscribe();
    let why = loop {
        let read = tokio::time::timeout(READ_TIMEOUT, read_frame(&mut rd, &mut buf));
        let f = tokio::select! {
            r = read => match r {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => break e.to_string(),
                Err(_) => break format!("no frame from the server for {READ_TIMEOUT:?}"),
            },
            _ = writer_failed.wait_for(|c| c.is_some()) => break String::new(),
        };
        let msg = match f {
            Frame::RecvPacket { src, packet } => Received::Packet { src, packet },
            Frame::KeepAlive => continue,
            Frame::Ping { data } => {
                if out.send(Frame::Pong { data }.to_vec()).await.is_err() {
                    break "writer stopped".into();
                }
                continue;
            }
            Frame::Pong { data } => {
                let waiter = pings.lock().unwrap_or_else(|e| e.into_inner()).remove(&data);
                match waiter {
                    Some(w) => {
                        let _ = w.send(());
                        continue;
                    }
                    None => Received::Pong { data },
                }
            }
            Frame::PeerGone { peer, reason } => Received::PeerGone { peer, reason },
            Frame::PeerPresent { peer, endpoint, flags } => Received::PeerPresent { peer, endpoint, flags },
            Frame::Health { problem } => Received::Health { problem },
            Frame::Restarting { reconnect_in, try_for } => {
                *restart_hint.lock().unwrap_or_else(|e| e.into_inner()) = Some(reconnect_in);
                Received::Restarting { reconnect_in, try_for }
            }
            // Client-to-server frames and unknown types are skipped, as Go's client does.
            _ => continue,
        };
        if !sink.deliver(msg).await {
            break "client dropped".into();
        }
    };
    tracing::debug!("DERP connection ended: {why}");
    closed.send_if_modified(|c| set_once(c, why));
}

/// Settings of a [`DerpConn`].
#[derive(Debug, Clone)]
pub struct DerpConnOptions {
    /// Deadline of each connection attempt (dial, TLS, upgrade, login).
    pub connect_timeout: Duration,
    /// First retry delay; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// Send NotePreferred(true) after each login (this is the node's home region).
    pub preferred: bool,
    /// ClientInfo sent at login.
    pub info: ClientInfo,
}

impl Default for DerpConnOptions {
    fn default() -> Self {
        DerpConnOptions {
            connect_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            preferred: false,
            info: ClientInfo::citadel(),
        }
    }
}

/// The wait a server's `Restarting` frame asks for, bounded so a hostile or broken server
/// cannot park the client: never above `max_backoff`, never below `min_backoff`.
fn clamp_restart_hint(reconnect_in: Duration, opts: &DerpConnOptions) -> Duration {
    reconnect_in.clamp(opts.min_backoff, opts.max_backoff.max(opts.min_backoff))
}

/// A DERP connection that reconnects with exponential backoff (with jitter) whenever the
/// connection fails, so it survives server restarts. Sends while disconnected fail with
/// [`DerpClientError::NotConnected`]; relayed packets are datagrams, and the caller decides
/// whether to retry.
pub struct DerpConn {
    current: watch::Receiver<Option<Arc<DerpClient>>>,
    /// `None` when made with [`DerpConn::with_inbox`].
    inbox: Option<tokio::sync::Mutex<mpsc::Receiver<Received>>>,
    preferred: Arc<AtomicBool>,
    logins: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DerpConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DerpConn {
    /// Starts connecting to `target` as `node_key` in the background.
    pub fn new(net: Arc<dyn Net>, target: impl Into<DerpTarget>, node_key: PrivateKey, opts: DerpConnOptions) -> Self {
        let (in_tx, in_rx) = mpsc::channel(IN_QUEUE);
        let mut c = Self::start(net, target.into(), node_key, opts, Sink::Own(in_tx));
        c.inbox = Some(tokio::sync::Mutex::new(in_rx));
        c
    }

    /// Like [`DerpConn::new`], but every connection's reader hands what the server sends
    /// straight to `inbox`, tagged with `tag`, and reports each login and loss as
    /// [`Inbound::Status`]; [`DerpConn::recv`] then has nothing to read.
    pub fn with_inbox(
        net: Arc<dyn Net>,
        target: impl Into<DerpTarget>,
        node_key: PrivateKey,
        opts: DerpConnOptions,
        inbox: mpsc::Sender<Inbound>,
        tag: i32,
    ) -> Self {
        Self::start(net, target.into(), node_key, opts, Sink::Shared { tx: inbox, tag })
    }

    fn start(net: Arc<dyn Net>, target: DerpTarget, node_key: PrivateKey, opts: DerpConnOptions, sink: Sink) -> Self {
        let (cur_tx, cur_rx) = watch::channel(None::<Arc<DerpClient>>);
        let preferred = Arc::new(AtomicBool::new(opts.preferred));
        let logins = Arc::new(AtomicU64::new(0));
        let task = {
            let preferred = preferred.clone();
            let logins = logins.clone();
            tokio::spawn(async move {
                // Jitter keeps a fleet of clients from reconnecting in lockstep.
                let mut backoff = Backoff::new(opts.min_backoff, opts.max_backoff).jitter(0.5, 1.0, rand::random());
                loop {
                    let attempt = DerpClient::connect_into(
                        net.as_ref(),
                        target.clone(),
                        &node_key,
                        opts.info.clone(),
                        opts.connect_timeout,
                        Some(sink.clone()),
                    )
                    .await;
                    let mut hint = None;
                    match attempt {
                        Ok(c) => {
                            let c = Arc::new(c);
                            if preferred.load(Ordering::Relaxed) {
                                let _ = c.note_preferred(true).await;
                            }
                            logins.fetch_add(1, Ordering::Relaxed);
                            cur_tx.send_replace(Some(c.clone()));
                            if !sink.status(true).await {
                                return;
                            }
                            let up = crate::clock::now();
                            let why = c.closed().await;
                            tracing::debug!("DERP connection lost: {why}");
                            let asked = c.restart_hint.lock().unwrap_or_else(|e| e.into_inner()).take();
                            hint = asked.map(|d| clamp_restart_hint(d, &opts));
                            cur_tx.send_replace(None);
                            if !sink.status(false).await {
                                return;
                            }
                            // A connection that lived a while was a success: start over.
                            if crate::clock::now().saturating_duration_since(up) > Duration::from_secs(10) {
                                backoff.reset();
                            }
                        }
                        Err(e) => tracing::debug!("DERP connect failed: {e}"),
                    }
                    let delay = backoff.next_delay();
                    tokio::time::sleep(hint.unwrap_or(delay)).await;
                }
            })
        };
        DerpConn { current: cur_rx, inbox: None, preferred, logins, task }
    }

    /// The live connection, if any.
    pub fn client(&self) -> Option<Arc<DerpClient>> {
        self.current.borrow().clone()
    }

    /// The live connection as it changes (`None` while reconnecting).
    pub fn watch_client(&self) -> watch::Receiver<Option<Arc<DerpClient>>> {
        self.current.clone()
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.client().is_some_and(|c| !c.is_closed())
    }

    /// Waits until a connection is up; false if `timeout` passes first.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.current.clone();
        let up = tokio::time::timeout(timeout, async {
            rx.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed())).await.is_ok()
        })
        .await;
        up.unwrap_or(false)
    }

    /// Successful logins so far (1 + reconnects).
    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    /// Sends through the live connection.
    pub async fn send(&self, dst: NodePublic, packet: &[u8]) -> Result<()> {
        self.client().ok_or(DerpClientError::NotConnected)?.send(dst, packet).await
    }

    /// The next message from any connection (across reconnects).
    pub async fn recv(&self) -> Result<Received> {
        let Some(inbox) = &self.inbox else {
            return Err(DerpClientError::Closed("messages go to the shared inbox".into()));
        };
        let mut rx = inbox.lock().await;
        rx.recv().await.ok_or_else(|| DerpClientError::Closed("reconnect task ended".into()))
    }

    /// Marks this server as the home region (now and after every reconnect).
    pub async fn set_preferred(&self, preferred: bool) -> Result<()> {
        self.preferred.store(preferred, Ordering::Relaxed);
        match self.client() {
            Some(c) => c.note_preferred(preferred).await,
            None => Ok(()),
        }
    }

    /// DERP ping round trip over the live connection.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration> {
        self.client().ok_or(DerpClientError::NotConnected)?.ping(timeout).await
    }
}

/// Round trip of an HTTP request to the target's `/derp/latency-check` (what a node without
/// UDP uses to rank regions): the best of `samples` requests on one kept-alive connection,
/// so the TCP and TLS handshakes are not counted.
pub async fn latency_check(
    net: &dyn Net,
    target: impl Into<DerpTarget>,
    samples: usize,
    timeout: Duration,
) -> Result<Duration> {
    let ep = endpoint(&target.into(), derp::upgrade::LATENCY_CHECK_PATH)?;
    let run = async {
        let mut s = dial(net, &ep).await?;
        let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: citadel\r\n\r\n", ep.path, host_header(&ep));
        let mut buf = Vec::new();
        let mut best: Option<Duration> = None;
        for _ in 0..samples.max(1) {
            let start = crate::clock::now();
            s.write_all(req.as_bytes()).await?;
            s.flush().await?;
            let head = read_head(&mut s, &mut buf).await?;
            let rtt = crate::clock::now().saturating_duration_since(start);
            if !(200..300).contains(&head.status) {
                return Err(DerpClientError::Http(format!("latency check status {}", head.status)));
            }
            best = Some(best.map_or(rtt, |b| b.min(rtt)));
            let body: usize = head.header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
            let close = head.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
            if body > 0 || close || head.header("transfer-encoding").is_some() {
                break; // not a reusable empty answer: one sample is all we get
            }
        }
        best.ok_or(DerpClientError::Timeout)
    };
    tokio::time::timeout(timeout, run).await.map_err(|_| DerpClientError::Timeout)?
}

/// The latency to one region, `None` when no node of it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLatency {
    /// DERP region ID.
    pub region_id: i32,
    /// HTTPS round trip, if it answered.
    pub latency: Option<Duration>,
}

/// Probes every region of `map` (the first node that answers, per region) with
/// [`latency_check`]; regions are probed concurrently, each within `timeout`.
pub async fn measure_regions(net: Arc<dyn Net>, map: &DerpMap, timeout: Duration) -> Vec<RegionLatency> {
    let mut set = tokio::task::JoinSet::new();
    for (id, region) in &map.regions {
        let nodes: Vec<DerpNode> = region.nodes.iter().filter(|n| !n.stun_only).cloned().collect();
        let net = net.clone();
        let id = *id;
        set.spawn(async move {
            for n in nodes {
                if let Ok(d) = latency_check(net.as_ref(), n, 3, timeout).await {
                    return RegionLatency { region_id: id, latency: Some(d) };
                }
            }
            RegionLatency { region_id: id, latency: None }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out.sort_by_key(|r| r.region_id);
    out
}

/// The home region: the lowest latency, ties to the lower region id.
pub fn pick_home_region(latencies: &[RegionLatency]) -> Option<i32> {
    latencies.iter().filter_map(|r| r.latency.map(|l| (l, r.region_id))).min().map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_hint_is_clamped() {
        let o = DerpConnOptions::default();
        assert_eq!(clamp_restart_hint(Duration::from_secs(86_400 * 365), &o), o.max_backoff);
        assert_eq!(clamp_restart_hint(Duration::ZERO, &o), o.min_backoff);
        assert_eq!(clamp_restart_hint(Duration::from_secs(2), &o), Duration::from_secs(2));
    }

    #[test]
    fn endpoints_follow_go_rules() {
        let e = endpoint(&"http://127.0.0.1:8080".into(), derp::upgrade::PATH).unwrap();
        assert_eq!((e.dial_host.as_str(), e.port, e.tls, e.path.as_str()), ("127.0.0.1", 8080, false, "/derp"));
        assert_eq!(host_header(&e), "127.0.0.1:8080");
        let e = endpoint(&"https://derp.example/derp".into(), derp::upgrade::LATENCY_CHECK_PATH).unwrap();
        assert_eq!((e.port, e.tls, e.path.as_str()), (443, true, "/derp/latency-check"));
        assert_eq!(host_header(&e), "derp.example");
        let e = endpoint(&"http://[::1]:9/x".into(), derp::upgrade::PATH).unwrap();
        assert_eq!((e.dial_host.as_str(), e.path.as_str()), ("::1", "/x"));
        assert_eq!(host_header(&e), "[::1]:9");
        assert!(endpoint(&"ftp://x".into(), derp::upgrade::PATH).is_err());

        let mut n = DerpNode { name: "1a".into(), host_name: "derp1.example".into(), ..Default::default() };
        let e = endpoint(&n.clone().into(), derp::upgrade::PATH).unwrap();
        assert_eq!((e.dial_host.as_str(), e.port, e.tls, e.insecure), ("derp1.example", 443, true, false));
        n.ipv4 = "192.0.2.1".into();
        n.derp_port = 8443;
        n.insecure_for_tests = true;
        let e = endpoint(&n.clone().into(), derp::upgrade::PATH).unwrap();
        assert_eq!(
            (e.dial_host.as_str(), e.port, e.insecure, e.server_name.as_str()),
            ("192.0.2.1", 8443, true, "derp1.example")
        );
        n.ipv4 = "none".into();
        n.ipv6 = "2001:db8::1".into();
        assert_eq!(endpoint(&n.clone().into(), derp::upgrade::PATH).unwrap().dial_host, "2001:db8::1");
        n.stun_only = true;
        assert!(endpoint(&n.into(), derp::upgrade::PATH).is_err());
    }

    #[test]
    fn home_region_is_the_fastest() {
        let l = |id, ms: Option<u64>| RegionLatency { region_id: id, latency: ms.map(Duration::from_millis) };
        assert_eq!(pick_home_region(&[l(1, Some(9)), l(2, Some(3)), l(3, None)]), Some(2));
        assert_eq!(pick_home_region(&[l(1, Some(3)), l(2, Some(3))]), Some(1));
        assert_eq!(pick_home_region(&[l(1, None)]), None);
    }
}
