//! SOCKS5 (RFC 1928) with user/password auth (RFC 1929): CONNECT and UDP ASSOCIATE into the
//! mesh.
//!
//! The codec is hand-written and sans-IO: the SOCKS crates either bring their own resolver
//! and dialer or no server side, and the server here must resolve against the netmap and
//! dial through the userspace data plane. Parsers take the bytes read so far and answer
//! "need more", a parsed message and its length, or [`Malformed`]; they never panic.

use super::{dial, route, splice, Backend, Host, ProxyConfig, Route};
use std::io;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version byte.
pub const VERSION: u8 = 5;
/// "No authentication required".
pub const METHOD_NONE: u8 = 0x00;
/// "Username/password" (RFC 1929).
pub const METHOD_USERPASS: u8 = 0x02;
/// "No acceptable methods".
pub const METHOD_NO_ACCEPTABLE: u8 = 0xff;
/// Longest handshake message: the auth request (3 + 255 + 255 bytes).
const MAX_MESSAGE: usize = 513;

/// A request the client sent is not SOCKS5 as RFC 1928/1929 define it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SOCKS5 {what}")]
pub struct Malformed {
    /// Which message.
    pub what: &'static str,
}

/// What a parser found in the bytes so far: `Ok(None)` means "read more".
pub type Parsed<T> = Result<Option<(T, usize)>, Malformed>;

/// Requested command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// CONNECT (0x01).
    Connect,
    /// BIND (0x02).
    Bind,
    /// UDP ASSOCIATE (0x03).
    UdpAssociate,
}

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub cmd: Command,
    /// Destination host.
    pub host: Host,
    /// Destination port.
    pub port: u16,
}

/// Reply codes (RFC 1928 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    /// Succeeded.
    Succeeded = 0x00,
    /// General SOCKS server failure.
    GeneralFailure = 0x01,
    /// Connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// Network unreachable.
    NetworkUnreachable = 0x03,
    /// Host unreachable.
    HostUnreachable = 0x04,
    /// Connection refused.
    ConnectionRefused = 0x05,
    /// TTL expired (used for timeouts).
    TtlExpired = 0x06,
    /// Command not supported.
    CommandNotSupported = 0x07,
    /// Address type not supported.
    AddressNotSupported = 0x08,
}

impl Reply {
    /// The reply for a failed dial.
    pub fn for_error(e: &io::Error) -> Reply {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NotFound => Reply::HostUnreachable,
            io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
            io::ErrorKind::TimedOut => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }
}

/// Parses the greeting: version, method count, methods.
pub fn parse_greeting(b: &[u8]) -> Parsed<Vec<u8>> {
    let bad = Err(Malformed { what: "greeting" });
    match b {
        [] | [_] => Ok(None),
        [v, ..] if *v != VERSION => bad,
        [_, n, rest @ ..] => {
            let n = *n as usize;
            if n == 0 {
                return bad;
            }
            if rest.len() < n {
                return Ok(None);
            }
            Ok(Some((rest[..n].to_vec(), 2 + n)))
        }
    }
}

/// Parses an RFC 1929 user/password request into (user, password).
pub fn parse_auth(b: &[u8]) -> Parsed<(Vec<u8>, Vec<u8>)> {
    let bad = Err(Malformed { what: "user/password request" });
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != 1 {
        return bad;
    }
    let Some(&ulen) = b.get(1) else { return Ok(None) };
    let ulen = ulen as usize;
    let Some(&plen) = b.get(2 + ulen) else { return Ok(None) };
    let plen = plen as usize;
    let end = 3 + ulen + plen;
    if b.len() < end {
        return Ok(None);
    }
    Ok(Some(((b[2..2 + ulen].to_vec(), b[3 + ulen..end].to_vec()), end)))
}

/// Parses an address (ATYP, address, port) at the start of `b`.
fn parse_addr(b: &[u8], what: &'static str) -> Parsed<(Host, u16)> {
    let bad = Err(Malformed { what });
    let Some(&atyp) = b.first() else { return Ok(None) };
    let (host, at) = match atyp {
        0x01 => {
            let Some(a) = b.get(1..5) else { return Ok(None) };
            (Host::Ip(IpAddr::from([a[0], a[1], a[2], a[3]])), 5)
        }
        0x04 => {
            let Some(a) = b.get(1..17) else { return Ok(None) };
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            (Host::Ip(IpAddr::from(o)), 17)
        }
        0x03 => {
            let Some(&len) = b.get(1) else { return Ok(None) };
            let len = len as usize;
            let Some(name) = b.get(2..2 + len) else { return Ok(None) };
            let Ok(name) = std::str::from_utf8(name) else { return bad };
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
                return bad;
            }
            (Host::parse(name), 2 + len)
        }
        _ => return Err(Malformed { what: "address type" }),
    };
    let Some(p) = b.get(at..at + 2) else { return Ok(None) };
    Ok(Some(((host, u16::from_be_bytes([p[0], p[1]])), at + 2)))
}

/// Parses a request: version, command, reserved byte, address.
pub fn parse_request(b: &[u8]) -> Parsed<Request> {
    let bad = Err(Malformed { what: "request" });
    if b.len() < 3 {
        return match b.first() {
            Some(v) if *v != VERSION => bad,
            _ => Ok(None),
        };
    }
    if b[0] != VERSION || b[2] != 0 {
        return bad;
    }
    let cmd = match b[1] {
        1 => Command::Connect,
        2 => Command::Bind,
        3 => Command::UdpAssociate,
        _ => return Err(Malformed { what: "command" }),
    };
    Ok(parse_addr(&b[3..], "request address")?.map(|((host, port), n)| (Request { cmd, host, port }, 3 + n)))
}

/// Parses the header of a UDP ASSOCIATE datagram (RSV, FRAG, address); returns the
/// destination and where the payload starts. Fragments (FRAG != 0) are refused, as most
/// servers do.
pub fn parse_udp_header(b: &[u8]) -> Result<(Host, u16, usize), Malformed> {
    if b.len() < 4 || b[0] != 0 || b[1] != 0 {
        return Err(Malformed { what: "UDP header" });
    }
    if b[2] != 0 {
        return Err(Malformed { what: "UDP fragment" });
    }
    match parse_addr(&b[3..], "UDP address")? {
        Some(((host, port), n)) => Ok((host, port, 3 + n)),
        None => Err(Malformed { what: "UDP header" }),
    }
}

/// The header for a datagram from `src` sent back to a UDP ASSOCIATE client.
pub fn udp_header(src: SocketAddr) -> Vec<u8> {
    let mut h = encode_reply(Reply::Succeeded, src);
    h[0] = 0;
    h
}

/// Encodes a reply with a bound address.
pub fn encode_reply(rep: Reply, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, rep as u8, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Reads from `s` until `parse` succeeds; the bytes after the message stay in `buf`.
async fn read_msg<S, T>(s: &mut S, buf: &mut Vec<u8>, parse: impl Fn(&[u8]) -> Parsed<T>) -> io::Result<T>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some((v, n)) = parse(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
            buf.drain(..n);
            return Ok(v);
        }
        if buf.len() >= MAX_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "SOCKS5 message too long"));
        }
        let mut chunk = [0u8; MAX_MESSAGE];
        let n = s.read(&mut chunk[..MAX_MESSAGE - buf.len()]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Greeting, auth and request; answers the refusals itself. Returns the request and the
/// bytes the client sent after it.
async fn handshake<S>(s: &mut S, cfg: &ProxyConfig) -> io::Result<Option<(Request, Vec<u8>)>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let methods = read_msg(s, &mut buf, parse_greeting).await?;
    let want = if cfg.auth.is_some() { METHOD_USERPASS } else { METHOD_NONE };
    if !methods.contains(&want) {
        s.write_all(&[VERSION, METHOD_NO_ACCEPTABLE]).await?;
        return Ok(None);
    }
    s.write_all(&[VERSION, want]).await?;
    if let Some(creds) = &cfg.auth {
        let (user, pass) = read_msg(s, &mut buf, parse_auth).await?;
        let ok = creds.matches(&user, &pass);
        s.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        if !ok {
            tracing::info!("SOCKS5 client gave wrong credentials");
            return Ok(None);
        }
    }
    let req = match read_msg(s, &mut buf, parse_request).await {
        Ok(r) => r,
        Err(e) => {
            // A well-formed header with an unknown address type gets its own reply code.
            let rep =
                if e.to_string().contains("address type") { Reply::AddressNotSupported } else { Reply::GeneralFailure };
            let _ = s.write_all(&encode_reply(rep, unspecified())).await;
            return Err(e);
        }
    };
    Ok(Some((req, buf)))
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// The two ends of a client's TCP connection (UDP ASSOCIATE binds beside `local` and takes
/// datagrams only from `peer`'s IP).
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    /// The proxy's address the client connected to.
    pub local: SocketAddr,
    /// The client's address.
    pub peer: SocketAddr,
}

/// Serves one SOCKS5 client with CONNECT only (UDP ASSOCIATE needs [`serve_with`]).
///
/// # Errors
/// See [`serve_with`].
pub async fn serve<S>(s: S, backend: &dyn Backend, cfg: &ProxyConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    serve_with(s, None, backend, cfg).await
}

/// Serves one SOCKS5 client: handshake (bounded by [`ProxyConfig::handshake_timeout`]), then
/// CONNECT, or UDP ASSOCIATE when the connection's `ends` are known.
///
/// # Errors
/// The client sent something malformed or went away; the connection is closed either way.
pub async fn serve_with<S>(mut s: S, ends: Option<Ends>, backend: &dyn Backend, cfg: &ProxyConfig) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let hs = tokio::time::timeout(cfg.handshake_timeout, handshake(&mut s, cfg))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 handshake timed out"))??;
    let Some((req, early)) = hs else { return Ok(()) };
    if let (Command::UdpAssociate, Some(ends)) = (req.cmd, ends) {
        return udp_associate(s, ends, backend).await;
    }
    if req.cmd != Command::Connect {
        s.write_all(&encode_reply(Reply::CommandNotSupported, unspecified())).await?;
        return Ok(());
    }
    let r = match route(backend, &req.host, req.port, cfg.allow_direct) {
        Ok(r) => r,
        Err(e) => {
            tracing::info!("SOCKS5: {e}");
            s.write_all(&encode_reply(Reply::NotAllowed, unspecified())).await?;
            return Ok(());
        }
    };
    let mut dest = match dial(backend, &r).await {
        Ok(d) => d,
        Err(e) => {
            tracing::info!("SOCKS5: cannot reach {}:{}: {e}", req.host, req.port);
            s.write_all(&encode_reply(Reply::for_error(&e), unspecified())).await?;
            return Ok(());
        }
    };
    let bound = match r {
        Route::Mesh(a) => a,
        Route::Direct(..) => unspecified(),
    };
    s.write_all(&encode_reply(Reply::Succeeded, bound)).await?;
    splice(&mut s, &mut *dest, &early).await
}

/// Largest UDP payload relayed.
const MAX_DATAGRAM: usize = 65535;

/// UDP ASSOCIATE: a UDP socket beside the TCP listener relays the client's datagrams to mesh
/// destinations and their answers back, until the client closes the TCP connection.
async fn udp_associate<S>(mut s: S, ends: Ends, backend: &dyn Backend) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let relay = match tokio::net::UdpSocket::bind(SocketAddr::new(ends.local.ip(), 0)).await {
        Ok(r) => r,
        Err(e) => {
            s.write_all(&encode_reply(Reply::GeneralFailure, unspecified())).await?;
            return Err(e);
        }
    };
    let mesh = match backend.bind_mesh_udp() {
        Ok(m) => m,
        Err(e) => {
            s.write_all(&encode_reply(Reply::for_error(&e), unspecified())).await?;
            return Ok(());
        }
    };
    s.write_all(&encode_reply(Reply::Succeeded, relay.local_addr()?)).await?;
    let mut client_udp: Option<SocketAddr> = None;
    let (mut from_client, mut from_mesh) = (vec![0u8; MAX_DATAGRAM], vec![0u8; MAX_DATAGRAM]);
    let mut tcp = [0u8; 64];
    loop {
        tokio::select! {
            // The association ends with the TCP connection (EOF, error or stray bytes alike).
            _ = s.read(&mut tcp) => return Ok(()),
            r = relay.recv_from(&mut from_client) => {
                let (n, src) = r?;
                if src.ip() != ends.peer.ip() || client_udp.is_some_and(|c| c != src) {
                    continue;
                }
                let Ok((host, port, at)) = parse_udp_header(&from_client[..n]) else { continue };
                // UDP has no refusal message: datagrams to destinations outside the mesh are dropped.
                match route(backend, &host, port, false) {
                    Ok(Route::Mesh(dst)) => {
                        client_udp = Some(src);
                        if let Err(e) = mesh.send_to(&from_client[at..n], dst).await {
                            tracing::debug!("SOCKS5 UDP to {dst}: {e}");
                        }
                    }
                    _ => tracing::debug!("SOCKS5 UDP to {host}:{port} dropped: not in the mesh"),
                }
            }
            r = mesh.recv_from(&mut from_mesh) => {
                let (n, src) = match r {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => continue,
                    Err(e) => return Err(e),
                };
                if let Some(c) = client_udp {
                    let mut d = udp_header(src);
                    d.extend_from_slice(&from_mesh[..n]);
                    let _ = relay.send_to(&d, c).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::Credentials;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_messages_incrementally() {
        let greeting = [5, 2, 0, 2];
        for cut in 0..greeting.len() {
            assert_eq!(parse_greeting(&greeting[..cut]), Ok(None));
        }
        assert_eq!(parse_greeting(&greeting), Ok(Some((vec![0, 2], 4))));
        let req = [&[5u8, 1, 0, 3, 5][..], b"bravo", &[0, 80]].concat();
        for cut in 0..req.len() {
            assert_eq!(parse_request(&req[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            parse_request(&req),
            Ok(Some((Request { cmd: Command::Connect, host: Host::Name("bravo".into()), port: 80 }, req.len())))
        );
        let v6 = [&[5u8, 1, 0, 4][..], &[0; 15], &[1, 0x1f, 0x90]].concat();
        assert_eq!(parse_request(&v6).unwrap().unwrap().0.host, Host::Ip("::1".parse().unwrap()));
        let auth = [&[1u8, 5][..], b"alice", &[3], b"pwd"].concat();
        assert_eq!(parse_auth(&auth), Ok(Some(((b"alice".to_vec(), b"pwd".to_vec()), auth.len()))));
        assert_eq!(parse_auth(&auth[..auth.len() - 1]), Ok(None));
    }

    #[test]
    fn rejects_malformed_messages() {
        assert!(parse_greeting(&[4, 1, 0]).is_err());
        assert!(parse_greeting(&[5, 0]).is_err());
        assert!(parse_request(&[5, 9, 0, 1, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_request(&[5, 1, 1, 1, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_request(&[5, 1, 0, 7, 0, 0]).is_err());
        assert!(parse_request(&[5, 1, 0, 3, 0, 0, 80]).is_err(), "empty name");
        assert!(parse_request(&[5, 1, 0, 3, 2, b'a', b' ', 0, 80]).is_err(), "space in name");
        assert!(parse_auth(&[2, 1, b'a', 1, b'b']).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic_and_stay_in_bounds(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, n))) = parse_greeting(&b) { prop_assert!(n <= b.len()); }
            if let Ok(Some((_, n))) = parse_auth(&b) { prop_assert!(n <= b.len()); }
            if let Ok(Some((_, n))) = parse_request(&b) { prop_assert!(n <= b.len()); }
        }

        #[test]
        fn replies_round_trip_through_the_request_parser(ip in any::<[u8; 16]>(), v4 in any::<bool>(), port in any::<u16>()) {
            let addr: SocketAddr = if v4 { ([ip[0], ip[1], ip[2], ip[3]], port).into() } else { (ip, port).into() };
            let mut r = encode_reply(Reply::Succeeded, addr);
            r[1] = 1; // read it back as a CONNECT request
            let (req, n) = parse_request(&r).unwrap().unwrap();
            prop_assert_eq!(n, r.len());
            prop_assert_eq!(req.host, Host::Ip(addr.ip()));
            prop_assert_eq!(req.port, port);
        }
    }

    async fn talk(backend: FakeMesh, cfg: ProxyConfig, send: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move { serve(server, &backend, &cfg).await });
        client.write_all(&send).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the proxy closed the connection")
            .unwrap();
        // A client closes once it has read the end; then the server is done.
        drop(client);
        let _ = task.await.unwrap();
        got
    }

    fn connect_name(name: &str, port: u16) -> Vec<u8> {
        [&[5u8, 1, 0, 3, name.len() as u8][..], name.as_bytes(), &port.to_be_bytes()].concat()
    }

    #[tokio::test]
    async fn connects_to_a_mesh_name_and_pipes_bytes() {
        let server = line_server(b"hello ").await;
        let msg = [&[5u8, 1, 0][..], &connect_name("bravo", server.port()), b"ping\n"].concat();
        let got = talk(mesh_with("bravo"), ProxyConfig::new(server), msg).await;
        assert_eq!(&got[..2], &[5, 0]);
        assert_eq!(&got[2..4], &[5, 0], "reply succeeded");
        assert_eq!(&got[got.len() - 11..], b"hello ping\n");
    }

    #[tokio::test]
    async fn refuses_outside_destinations_with_not_allowed() {
        let m = mesh_with("bravo");
        let cfg = ProxyConfig::new("127.0.0.1:1".parse().unwrap());
        for dest in [connect_name("example.com", 443), vec![5, 1, 0, 1, 192, 0, 2, 7, 0, 80]] {
            let got = talk(mesh_with("bravo"), cfg.clone(), [&[5u8, 1, 0][..], &dest].concat()).await;
            assert_eq!(&got[2..4], &[5, Reply::NotAllowed as u8], "{dest:?}");
        }
        assert!(m.direct_dials.lock().unwrap().is_empty());
        // With egress allowed the fake's direct dial is used (and fails: connection refused).
        let mut cfg = cfg;
        cfg.allow_direct = true;
        let got = talk(m, cfg, [&[5u8, 1, 0][..], &connect_name("example.com", 443)].concat()).await;
        assert_eq!(&got[2..4], &[5, Reply::ConnectionRefused as u8]);
    }

    #[tokio::test]
    async fn closed_mesh_port_is_connection_refused() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let got = talk(
            mesh_with("bravo"),
            ProxyConfig::new(([127, 0, 0, 1], 1).into()),
            [&[5u8, 1, 0][..], &connect_name("bravo", port)].concat(),
        )
        .await;
        assert_eq!(&got[2..4], &[5, Reply::ConnectionRefused as u8]);
    }

    #[tokio::test]
    async fn auth_is_required_when_configured() {
        let server = line_server(b"ok ").await;
        let mut cfg = ProxyConfig::new(server);
        cfg.auth = Credentials::parse("alice:pw");
        // A client offering only "no auth" gets "no acceptable methods".
        let got = talk(mesh_with("bravo"), cfg.clone(), vec![5, 1, 0]).await;
        assert_eq!(got, vec![5, METHOD_NO_ACCEPTABLE]);
        // Wrong password: failure status, then closed.
        let wrong = [&[5u8, 1, 2, 1, 5][..], b"alice", &[2], b"px"].concat();
        assert_eq!(talk(mesh_with("bravo"), cfg.clone(), wrong).await, vec![5, 2, 1, 1]);
        // Right password: through.
        let right =
            [&[5u8, 1, 2, 1, 5][..], b"alice", &[2], b"pw", &connect_name("bravo", server.port()), b"x\n"].concat();
        let got = talk(mesh_with("bravo"), cfg, right).await;
        assert_eq!(&got[..6], &[5, 2, 1, 0, 5, 0]);
        assert!(got.ends_with(b"ok x\n"));
    }

    #[tokio::test]
    async fn unsupported_commands_and_address_types_get_their_codes() {
        let cfg = ProxyConfig::new(([127, 0, 0, 1], 1).into());
        let bind = [&[5u8, 1, 0, 5, 2, 0][..], &[1, 127, 0, 0, 1, 0, 80]].concat();
        let got = talk(mesh_with("b"), cfg.clone(), bind).await;
        assert_eq!(&got[2..4], &[5, Reply::CommandNotSupported as u8]);
        let got = talk(mesh_with("b"), cfg, vec![5, 1, 0, 5, 1, 0, 9, 0, 0]).await;
        assert_eq!(&got[2..4], &[5, Reply::AddressNotSupported as u8]);
    }

    #[tokio::test]
    async fn garbage_closes_the_connection_without_hanging() {
        let cfg = ProxyConfig::new(([127, 0, 0, 1], 1).into());
        use rand::{Rng, RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..200 {
            let mut junk = vec![0u8; rng.gen_range(0..700)];
            rng.fill_bytes(&mut junk);
            if i % 2 == 0 && junk.len() > 2 {
                junk[0] = 5; // get past the version check more often
            }
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let cfg = cfg.clone();
            let task = tokio::spawn(async move { serve(server, &mesh_with("b"), &cfg).await });
            let _ = client.write_all(&junk).await;
            // Whatever was not a complete handshake: closing our side must end the server.
            client.shutdown().await.unwrap();
            let mut sink = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(5), client.read_to_end(&mut sink))
                .await
                .expect("server hung on garbage")
                .unwrap();
            let _ = task.await.expect("server panicked");
        }
    }

    #[test]
    fn udp_headers_round_trip_and_refuse_fragments() {
        let src: SocketAddr = "100.64.0.2:53".parse().unwrap();
        let mut d = udp_header(src);
        d.extend_from_slice(b"payload");
        let (host, port, at) = parse_udp_header(&d).unwrap();
        assert_eq!((host, port, &d[at..]), (Host::Ip(src.ip()), 53, &b"payload"[..]));
        d[2] = 1;
        assert!(parse_udp_header(&d).is_err());
        assert!(parse_udp_header(&[0, 0, 0]).is_err());
        assert!(parse_udp_header(&[0, 0, 0, 3, 9, b'a']).is_err());
    }

    #[tokio::test]
    async fn udp_associate_relays_datagrams_to_mesh_names_and_back() {
        // A UDP echo "in the mesh" (the fake mesh is loopback).
        let echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut b = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut b).await {
                let _ = echo.send_to(&b[..n], from).await;
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, peer) = l.accept().await.unwrap();
            let ends = Ends { local: s.local_addr().unwrap(), peer };
            serve_with(s, Some(ends), &mesh_with("bravo"), &ProxyConfig::new(proxy)).await
        });
        let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
        c.write_all(&[5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await.unwrap();
        let mut r = [0u8; 12];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..4], &[5, 0, 5, 0]);
        let relay = SocketAddr::from(([r[6], r[7], r[8], r[9]], u16::from_be_bytes([r[10], r[11]])));
        let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for (name, answered) in [("bravo", true), ("example.com", false)] {
            let mut d = vec![0, 0, 0, 3, name.len() as u8];
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&echo_port.to_be_bytes());
            d.extend_from_slice(b"over udp");
            u.send_to(&d, relay).await.unwrap();
            let mut b = [0u8; 2048];
            let got = tokio::time::timeout(std::time::Duration::from_millis(500), u.recv_from(&mut b)).await;
            assert_eq!(got.is_ok(), answered, "{name}");
            if let Ok(Ok((n, _))) = got {
                let (host, port, at) = parse_udp_header(&b[..n]).unwrap();
                assert_eq!((host, port, &b[at..n]), (Host::Ip([127, 0, 0, 1].into()), echo_port, &b"over udp"[..]));
            }
        }
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut cfg = ProxyConfig::new(([127, 0, 0, 1], 1).into());
        cfg.handshake_timeout = std::time::Duration::from_millis(200);
        let task = tokio::spawn(async move { serve(server, &mesh_with("b"), &cfg).await });
        client.write_all(&[5, 1]).await.unwrap();
        let r = task.await.unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
