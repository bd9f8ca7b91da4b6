//! A small Redis client: URL parsing (with redaction), dialing through the mesh or plain TCP,
//! and request/response over one connection with lazy reconnect.
//!
//! Why hand-written rather than the `redis` crate: the worker must be able to reach Redis over
//! the userspace mesh, i.e. over an arbitrary `AsyncRead + AsyncWrite` handed to us by a
//! [`Dial`], and it needs only a dozen stream/hash commands. Owning the ~300 lines of
//! RESP2 means one code path for mesh and direct connections (no loopback forwarder to keep
//! alive), explicit timeouts on every round trip, and no surprise reconnect policy hidden under
//! a blocking `XREADGROUP`.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use super::resp::{self, ProtocolError, Value};
use super::{dial, AsyncReadWrite, Dial};

/// Where Redis lives and how to log in. `Debug`/`Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// Host name or IP literal (brackets stripped for IPv6).
    pub host: String,
    /// TCP port (default 6379).
    pub port: u16,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any. Never logged.
    pub password: Option<String>,
    /// Database index selected after connecting.
    pub db: u32,
}

/// A Redis URL we cannot use. The message never contains the URL's password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid redis url {url}: {reason}")]
pub struct UrlError {
    /// The URL with its password replaced by `***`.
    pub url: String,
    /// What is wrong with it.
    pub reason: String,
}

impl RedisTarget {
    /// Parses `redis://[user[:password]@]host[:port][/db]`.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let err = |reason: &str| UrlError { url: redact_url(url), reason: reason.to_string() };
        let rest = if let Some(r) = url.strip_prefix("redis://") {
            r
        } else if url.starts_with("rediss://") {
            return Err(err("TLS (rediss://) is not supported; use redis:// (over the mesh the link is already encrypted by WireGuard)"));
        } else {
            return Err(err("must start with redis://"));
        };
        // The password may itself contain '@', '/', '?' or '#' if the user forgot to
        // percent-encode it (a database number never holds '@'), so the host is whatever
        // follows the *last* '@'.
        let (userinfo, after_user) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let (hostport, path) = match after_user.find(['/', '?', '#']) {
            Some(i) => (&after_user[..i], &after_user[i..]),
            None => (after_user, ""),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(ui) => {
                let (u, p) = match ui.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (ui, None),
                };
                let u = percent_decode(u).ok_or_else(|| err("bad percent-encoding in user"))?;
                let p = match p {
                    Some(p) => Some(percent_decode(p).ok_or_else(|| err("bad percent-encoding in password"))?),
                    None => None,
                };
                // `redis://:pass@host` is the classic password-only form; `redis://pass@host`
                // (no colon) is also common in the wild and means a password, not a user.
                match (u.is_empty(), p) {
                    (true, p) => (None, p.filter(|p| !p.is_empty())),
                    (false, None) => (None, Some(u)),
                    (false, Some(p)) => (Some(u), Some(p)),
                }
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or_else(|| err("unterminated [ipv6] host"))?;
            (h.to_string(), tail.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(err("missing host"));
        }
        let port = match port {
            None | Some("") => 6379,
            Some(p) => p.parse().map_err(|_| err("bad port"))?,
        };
        let db_text = path.trim_start_matches('/');
        let db_text = db_text.split(['?', '#']).next().unwrap_or("");
        let db = if db_text.is_empty() { 0 } else { db_text.parse().map_err(|_| err("bad database number"))? };
        Ok(RedisTarget { host, port, username, password, db })
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            (None, None) => {}
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)?;
        } else {
            write!(f, "{}:{}", self.host, self.port)?;
        }
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisTarget({self})")
    }
}

/// Replaces the password of any `scheme://user:pass@host` URL with `***`, for logs and errors.
/// Works on unparseable input too, because that is exactly when we print the URL back.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // Not a URL at all; it could be a bare secret pasted in the wrong place.
        return "***".to_string();
    };
    let after = &url[scheme_end + 3..];
    // Like `RedisTarget::parse`: an unencoded password may hold '/', '?' or '#', so the
    // userinfo ends at the last '@' anywhere (over-redacting a path with '@' is harmless).
    match after.rfind('@') {
        None => url.to_string(),
        Some(at) => {
            let userinfo = &after[..at];
            let user = match userinfo.split_once(':') {
                Some((u, _)) => format!("{u}:***"),
                // A lone userinfo token is treated as a password by `RedisTarget::parse`.
                None => "***".to_string(),
            };
            format!("{}://{}@{}", &url[..scheme_end], user, &after[at + 1..])
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Errors of one Redis round trip.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Could not open (or log into) a connection.
    #[error("cannot connect to {target}: {reason}")]
    Connect {
        /// The redacted target.
        target: String,
        /// Why.
        reason: String,
    },
    /// The connection broke or timed out mid-command; it has been dropped.
    #[error("redis i/o: {0}")]
    Io(#[from] io::Error),
    /// The server answered something that is not RESP2.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The server answered `-ERR ...` (connection still fine).
    #[error("redis error: {0}")]
    Server(String),
    /// The reply had an unexpected shape for the command.
    #[error("unexpected reply to {cmd}: {detail}")]
    Unexpected {
        /// The command name.
        cmd: &'static str,
        /// What we got.
        detail: String,
    },
}

/// One open connection: a socket plus the unparsed tail of what the server sent.
struct Conn {
    io: Box<dyn AsyncReadWrite>,
    buf: Vec<u8>,
    /// Progress through the reply being received in `buf`.
    scanner: resp::Scanner,
}

impl Conn {
    async fn round_trip(&mut self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Value>, RedisError> {
        let mut out = Vec::new();
        for c in cmds {
            resp::encode(c, &mut out);
        }
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        let mut replies = Vec::with_capacity(cmds.len());
        while replies.len() < cmds.len() {
            match self.scanner.scan(&self.buf)? {
                Some(end) => {
                    let (v, used) = resp::parse(&self.buf[..end])?
                        .ok_or_else(|| resp::ProtocolError("reply scanned complete but did not parse".into()))?;
                    self.buf.drain(..used);
                    self.scanner.reset();
                    replies.push(v);
                }
                None => {
                    let mut chunk = [0u8; 16 * 1024];
                    let n = self.io.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed the connection").into());
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
        Ok(replies)
    }
}

/// A Redis connection that reconnects lazily after any I/O failure.
///
/// Commands are serialized on one socket. The socket is taken out of the slot for the duration
/// of a round trip and only put back on success, so a cancelled or failed command (whose reply
/// may still be in flight) can never leave a half-read reply for the next caller.
pub struct RedisClient {
    target: RedisTarget,
    dialer: Arc<dyn Dial>,
    connect_timeout: Duration,
    command_timeout: Duration,
    slot: Mutex<Option<Conn>>,
    /// Server-side id (`CLIENT ID`) of the current connection, or -1. Kept outside `slot`
    /// because it is needed exactly while `slot` is locked by a blocking read: another
    /// connection uses it to `CLIENT UNBLOCK` that read.
    conn_id: AtomicI64,
}

impl RedisClient {
    /// Creates a client; no connection is made until the first command (see [`Self::connect`]).
    pub fn new(target: RedisTarget, dialer: Arc<dyn Dial>, connect_timeout: Duration) -> Self {
        RedisClient {
            target,
            dialer,
            connect_timeout,
            command_timeout: Duration::from_secs(10),
            slot: Mutex::new(None),
            conn_id: AtomicI64::new(-1),
        }
    }

    /// Parses `url`, connects and PINGs, all within `connect_timeout`.
    pub async fn connect(url: &str, dialer: Arc<dyn Dial>, connect_timeout: Duration) -> Result<Self, RedisError> {
        let target =
            RedisTarget::parse(url).map_err(|e| RedisError::Connect { target: e.url.clone(), reason: e.reason })?;
        let client = RedisClient::new(target, dialer, connect_timeout);
        client.ping().await?;
        Ok(client)
    }

    /// The redacted target, for logs.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// Checks the server answers.
    pub async fn ping(&self) -> Result<(), RedisError> {
        match self.cmd(&["PING"]).await? {
            Value::Simple(s) if s == "PONG" => Ok(()),
            other => Err(RedisError::Unexpected { cmd: "PING", detail: format!("{other:?}") }),
        }
    }

    /// Sends one command and returns its reply; `-ERR` replies become [`RedisError::Server`].
    pub async fn cmd<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Value, RedisError> {
        self.cmd_timeout(args, self.command_timeout).await
    }

    /// [`Self::cmd`] with an explicit reply deadline (blocking reads need longer than usual).
    pub async fn cmd_timeout<A: AsRef<[u8]>>(&self, args: &[A], timeout: Duration) -> Result<Value, RedisError> {
        let cmd = args.iter().map(|a| a.as_ref().to_vec()).collect();
        let mut replies = self.pipeline_timeout(vec![cmd], timeout).await?;
        let v = replies.pop().unwrap_or(Value::Nil);
        match v {
            Value::Error(e) => Err(RedisError::Server(e)),
            v => Ok(v),
        }
    }

    /// Sends several commands in one write and returns every reply in order. Per-command
    /// `-ERR` replies are returned as [`Value::Error`], not as an `Err`.
    pub async fn pipeline(&self, cmds: Vec<Vec<Vec<u8>>>) -> Result<Vec<Value>, RedisError> {
        self.pipeline_timeout(cmds, self.command_timeout).await
    }

    async fn pipeline_timeout(&self, cmds: Vec<Vec<Vec<u8>>>, timeout: Duration) -> Result<Vec<Value>, RedisError> {
        let mut slot = self.slot.lock().await;
        let mut conn = match slot.take() {
            Some(c) => c,
            None => self.open().await?,
        };
        match tokio::time::timeout(timeout, conn.round_trip(&cmds)).await {
            Ok(Ok(replies)) => {
                *slot = Some(conn);
                Ok(replies)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("no reply within {timeout:?}")).into()),
        }
    }

    /// Server-side id of the most recent connection (`CLIENT ID`), if known.
    pub fn connection_id(&self) -> Option<i64> {
        Some(self.conn_id.load(Ordering::Relaxed)).filter(|id| *id >= 0)
    }

    /// Drops the current connection (if any) so the next command dials afresh.
    pub async fn reset(&self) {
        self.slot.lock().await.take();
    }

    async fn open(&self) -> Result<Conn, RedisError> {
        let fail = |reason: String| RedisError::Connect { target: self.target.to_string(), reason };
        let fut = async {
            let (io, _via_mesh) =
                dial(&*self.dialer, &self.target.host, self.target.port).await.map_err(|e| fail(e.to_string()))?;
            let mut conn = Conn { io, buf: Vec::new(), scanner: resp::Scanner::default() };
            let mut setup = Vec::new();
            if let Some(pass) = &self.target.password {
                let mut auth = vec![b"AUTH".to_vec()];
                if let Some(user) = &self.target.username {
                    auth.push(user.as_bytes().to_vec());
                }
                auth.push(pass.as_bytes().to_vec());
                setup.push(auth);
            }
            if self.target.db != 0 {
                setup.push(vec![b"SELECT".to_vec(), self.target.db.to_string().into_bytes()]);
            }
            // Best effort: an ACL may forbid CLIENT; then blocking reads are simply dropped on
            // shutdown instead of being woken.
            setup.push(vec![b"CLIENT".to_vec(), b"ID".to_vec()]);
            {
                let replies = conn.round_trip(&setup).await.map_err(|e| fail(e.to_string()))?;
                let id = replies.last().and_then(Value::as_int).unwrap_or(-1);
                self.conn_id.store(id, Ordering::Relaxed);
                for reply in &replies[..replies.len().saturating_sub(1)] {
                    if let Value::Error(e) = reply {
                        // The server's text (e.g. WRONGPASS) never echoes the password back.
                        return Err(fail(format!("login rejected: {e}")));
                    }
                }
            }
            Ok(conn)
        };
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(fail(format!("timed out after {:?}", self.connect_timeout))),
        }
    }
}

/// Resolves `host` (IP literal or DNS name) to socket addresses within the caller's deadline.
pub(crate) async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} resolved to no address")));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_url_shapes() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db, t.password.is_none()), ("127.0.0.1", 6380, 2, true));
        let t = RedisTarget::parse("redis://:s3cr%40t@host").unwrap();
        assert_eq!((t.username.as_deref(), t.password.as_deref(), t.port), (None, Some("s3cr@t"), 6379));
        let t = RedisTarget::parse("redis://alice:pw@[fd7a:115c:a1e0::1]:7000").unwrap();
        assert_eq!((t.username.as_deref(), t.host.as_str(), t.port), (Some("alice"), "fd7a:115c:a1e0::1", 7000));
        let t = RedisTarget::parse("redis://onlypass@h:1").unwrap();
        assert_eq!((t.username, t.password.as_deref()), (None, Some("onlypass")));
    }

    #[test]
    fn rejects_bad_urls_without_leaking_the_password() {
        for bad in [
            "http://u:hunter2@h",
            "redis://u:hunter2@h:notaport",
            "redis://u:hunter2@",
            "rediss://u:hunter2@h",
            "redis://:hunter2@h/x",
        ] {
            let e = RedisTarget::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn display_and_redaction_hide_passwords() {
        let t = RedisTarget::parse("redis://bob:hunter2@h:1/3").unwrap();
        assert_eq!(t.to_string(), "redis://bob:***@h:1/3");
        assert!(!format!("{t:?}").contains("hunter2"));
        assert_eq!(redact_url("redis://:hunter2@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://hunter2@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("hunter2"), "***");
        assert_eq!(redact_url("redis://a:p@ss@h"), "redis://a:***@h");
        for url in ["redis://:pa/ss@h:1", "redis://u:pa?ss@h:1/2", "redis://u:pa#ss@h", "redis://pa/ss@h:1"] {
            assert!(!redact_url(url).contains("ss@"), "{url} -> {}", redact_url(url));
            assert!(!redact_url(url).contains("pa"), "{url} -> {}", redact_url(url));
            match RedisTarget::parse(url) {
                Ok(t) => assert!(!format!("{t} {t:?}").contains("pa"), "{t}"),
                Err(e) => assert!(!e.to_string().contains("pa"), "{e}"),
            }
        }
    }
}
