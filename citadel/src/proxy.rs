//! HTTP CONNECT proxies from the environment, read as Go's `net/http` (and so Tailscale) reads
//! them: `HTTPS_PROXY` for TLS destinations, `HTTP_PROXY` for plain ones (upper or lower case),
//! `NO_PROXY` a comma-separated list of host names, domain suffixes (`.example.com` or
//! `example.com`), IPs, CIDRs or `*`; loopback destinations are never proxied.
//!
//! The choice ([`proxy_for`]) is a pure function of the variables; [`connect`] does the I/O.

use crate::net::{read_response_head, unread, AsyncReadWrite, Net, ReadHeadError};
use std::io;
use std::net::IpAddr;
use tokio::io::AsyncWriteExt;

/// Largest CONNECT response head accepted.
const MAX_HEAD: usize = 16 << 10;

/// A proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Proxy host.
    pub host: String,
    /// Proxy port (default 80, as Go's default for an `http://` proxy URL).
    pub port: u16,
    /// `user:password` for `Proxy-Authorization: Basic`, if the URL had one.
    auth: Option<String>,
}

impl std::fmt::Debug for Proxy {
    // By hand so proxy credentials are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn var(get: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name).or_else(|| get(&name.to_lowercase())).filter(|v| !v.is_empty())
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    list.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|e| {
        if e == "*" {
            return true;
        }
        // A port in an entry limits it to that port; citadel matches on the host only.
        let e = match e.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
            _ => e,
        };
        if let (Some(ip), Ok(net)) = (ip, e.parse::<ip_network::IpNetwork>()) {
            return net.contains(ip);
        }
        if let (Some(ip), Ok(eip)) = (ip, e.parse::<IpAddr>()) {
            return ip == eip;
        }
        let suffix = e.trim_start_matches('.');
        host == suffix || host.ends_with(&format!(".{suffix}"))
    })
}

/// The proxy for a connection to `host` (TLS or not), given the environment lookup `get`.
pub fn proxy_from(get: impl Fn(&str) -> Option<String>, tls: bool, host: &str) -> Option<Proxy> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|i| i.is_loopback()) {
        return None;
    }
    let url = var(&get, if tls { "HTTPS_PROXY" } else { "HTTP_PROXY" })?;
    if var(&get, "NO_PROXY").is_some_and(|l| no_proxy_matches(&l, bare)) {
        return None;
    }
    let url = if url.contains("://") { url } else { format!("http://{url}") };
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        tracing::warn!("ignoring proxy {url:?}: only http:// proxies (HTTP CONNECT) are supported");
        return None;
    }
    let authority = uri.authority()?;
    let auth = authority.as_str().rsplit_once('@').map(|(a, _)| a.to_string());
    Some(Proxy {
        host: authority.host().trim_start_matches('[').trim_end_matches(']').to_string(),
        port: authority.port_u16().unwrap_or(80),
        auth,
    })
}

/// The proxy for `host` from the process environment.
pub fn proxy_for(tls: bool, host: &str) -> Option<Proxy> {
    proxy_from(|k| std::env::var(k).ok(), tls, host)
}

/// Opens a TCP stream to `host:port`, through the environment's proxy (HTTP CONNECT) when
/// one applies.
pub async fn connect(net: &dyn Net, tls: bool, host: &str, port: u16) -> io::Result<Box<dyn AsyncReadWrite>> {
    match proxy_for(tls, host) {
        None => net.connect_tcp(host, port).await,
        Some(p) => connect_via(net, &p, host, port).await,
    }
}

/// Opens a tunnel to `host:port` through `proxy` with HTTP CONNECT.
pub async fn connect_via(net: &dyn Net, proxy: &Proxy, host: &str, port: u16) -> io::Result<Box<dyn AsyncReadWrite>> {
    let mut s = net
        .connect_tcp(&proxy.host, proxy.port)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("proxy {}:{}: {e}", proxy.host, proxy.port)))?;
    let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = &proxy.auth {
        use base64::Engine;
        let a = percent_decode(a);
        req.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(a.as_bytes())
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut early = Vec::new();
    let head = read_response_head(&mut s, &mut early, MAX_HEAD).await.map_err(|e| match e {
        ReadHeadError::Io(e) => e,
        ReadHeadError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, "proxy closed the connection"),
        e => io::Error::new(io::ErrorKind::InvalidData, format!("proxy answer: {e}")),
    })?;
    match head.status {
        200..=299 => Ok(unread(early, s)),
        c => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("proxy {}:{} refused CONNECT {target}: {c} {}", proxy.host, proxy.port, head.reason),
        )),
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h << 4) | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_proxy_is_chosen_as_go_chooses_it() {
        let e = env(&[("HTTPS_PROXY", "http://proxy.corp:3128"), ("no_proxy", ".internal, 10.0.0.0/8, exact.host")]);
        let p = proxy_from(&e, true, "nexus.example").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(proxy_from(&e, false, "nexus.example"), None, "plain http uses HTTP_PROXY");
        for direct in ["a.internal", "internal", "10.1.2.3", "exact.host", "localhost", "127.0.0.1", "[::1]"] {
            assert_eq!(proxy_from(&e, true, direct), None, "{direct}");
        }
        assert!(proxy_from(&e, true, "notexact.host.example").is_some());
        let e = env(&[("https_proxy", "proxy:8080"), ("NO_PROXY", "*")]);
        assert_eq!(proxy_from(&e, true, "x.example"), None);
        let e = env(&[("https_proxy", "user:p%40ss@proxy:8080")]);
        let p = proxy_from(&e, true, "x.example").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth.as_deref()), ("proxy", 8080, Some("user:p%40ss")));
        assert_eq!(percent_decode("user:p%40ss"), "user:p@ss");
        assert!(!format!("{p:?}").contains("p%40ss"));
        assert_eq!(proxy_from(env(&[("HTTPS_PROXY", "socks5://p:1080")]), true, "x.example"), None);
    }

    /// A proxy on loopback that reads one request and writes `answer`; returns its port.
    async fn fake_proxy(answer: &'static [u8]) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        });
        port
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_clear_error() {
        let port = fake_proxy(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let p = Proxy { host: "127.0.0.1".into(), port, auth: None };
        let e = connect_via(&crate::net::TokioNet, &p, "nexus.example", 443).await.err().unwrap().to_string();
        assert!(e.contains("refused CONNECT nexus.example:443") && e.contains("403"), "{e}");
    }

    #[tokio::test]
    async fn tunnel_bytes_sent_with_the_proxy_answer_are_kept() {
        let port = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\nSSH-2.0-x\r\n").await;
        let p = Proxy { host: "127.0.0.1".into(), port, auth: None };
        let mut s = connect_via(&crate::net::TokioNet, &p, "bravo", 22).await.unwrap();
        let mut got = [0u8; 11];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"SSH-2.0-x\r\n");
    }
}
