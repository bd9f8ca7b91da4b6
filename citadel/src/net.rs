//! The host network as the node code sees it, behind a trait so the same node code runs on
//! tokio (production) and on turmoil (the harness's simulated networks): [`Net`] extends the
//! one dial trait ([`Dial`], from `citadel-proto`) with UDP and the interface list. Also the
//! one reader of HTTP/1.x heads the node parses by hand ([`read_head`]).

use citadel_proto::http::{parse_response, BadHead, ResponseHead};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

pub use citadel_proto::dial::{AsyncReadWrite, BoxFuture, Dial, DialFuture};

/// A datagram socket.
pub trait Datagram: Send + Sync {
    /// Receives one datagram.
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>>;
    /// Sends one datagram.
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>>;
    /// The bound address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Receives one datagram if one is waiting, else fails with `WouldBlock` (the data plane
    /// drains bursts this way). The default never has one waiting.
    fn try_recv_from(&self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    /// Sends `segments` to `to` as separate datagrams, in order: equal sizes but the last,
    /// which may be shorter (what UDP segmentation offload takes in one system call). The
    /// default sends them one by one.
    fn send_segments<'a>(&'a self, segments: &'a [&'a [u8]], to: SocketAddr) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            for s in segments {
                self.send_to(s, to).await?;
            }
            Ok(())
        })
    }
    /// Receives one datagram, or several from one sender coalesced into `buf` (receive offload):
    /// returns the length, the sender and the size of each datagram in it (the last may be
    /// shorter). The default receives one datagram.
    fn recv_segments<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr, usize)>> {
        Box::pin(async move {
            let (n, src) = self.recv_from(buf).await?;
            Ok((n, src, n))
        })
    }
    /// [`Datagram::recv_segments`] if something is waiting, else `WouldBlock`.
    fn try_recv_segments(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        self.try_recv_from(buf).map(|(n, src)| (n, src, n))
    }
}

/// How the node reaches the host network: TCP through [`Dial`], plus UDP and interfaces.
pub trait Net: Dial + 'static {
    /// Binds a UDP socket.
    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Datagram>>>;
    /// The host's interface addresses (a socket bound to the unspecified address is reachable
    /// on each of these). The default lists the real interfaces.
    fn interface_ips(&self) -> io::Result<Vec<IpAddr>> {
        if_addrs::get_if_addrs().map(|v| v.into_iter().map(|i| i.ip()).collect())
    }
}

/// UDP socket buffer size asked for (best effort: a small buffer only costs throughput).
const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Binds a tokio UDP socket with large buffers. Needs a tokio runtime context.
///
/// # Errors
/// The address cannot be bound, or there is no runtime.
pub fn bind_tokio_udp(addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let std_sock = std::net::UdpSocket::bind(addr)?;
    std_sock.set_nonblocking(true)?;
    let sock2 = socket2::SockRef::from(&std_sock);
    let _ = sock2.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = sock2.set_send_buffer_size(UDP_SOCKET_BUFFER);
    tokio::net::UdpSocket::from_std(std_sock)
}

/// The real network, through tokio.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioNet;

impl Dial for TokioNet {
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> DialFuture<'a> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect((host, port)).await?;
            // Control frames and requests are small; never let Nagle hold them back.
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }
}

impl Net for TokioNet {
    /// On Linux the socket sends and receives with segmentation offload (see
    /// `dataplane::udp`): the data plane's socket, and so every mesh node's, batches bulk traffic.
    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Datagram>>> {
        Box::pin(async move {
            let udp = bind_tokio_udp(addr)?;
            #[cfg(target_os = "linux")]
            let udp = crate::dataplane::udp::BatchUdp::new(udp);
            Ok(Box::new(udp) as Box<dyn Datagram>)
        })
    }
}

impl Datagram for tokio::net::UdpSocket {
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(tokio::net::UdpSocket::recv_from(self, buf))
    }
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(tokio::net::UdpSocket::send_to(self, buf, to))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::try_recv_from(self, buf)
    }
}

/// Why an HTTP head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadHeadError<E> {
    /// The bytes are not a head the caller accepts.
    #[error("{0}")]
    Bad(E),
    /// More than the bound arrived without the head ending.
    #[error("HTTP head longer than {0} bytes")]
    TooLarge(usize),
    /// The peer closed the stream before the head ended.
    #[error("connection closed before the end of the HTTP head")]
    Closed,
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads from `s` into `buf` until `parse` takes a whole HTTP/1.x head from it (`Ok(Some)`) or
/// refuses it (`Err`); `Ok(None)` asks for more. This is the one place the node reads a head
/// by hand; bytes past the head stay in `buf` (see [`Prefixed`] to hand them on). At most
/// `max + 1` bytes are buffered, so `parse` sees an over-long head and may refuse it itself.
///
/// # Errors
/// [`ReadHeadError`]: refused, over `max` bytes, closed early, or an I/O error.
pub async fn read_head<S, T, E>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, ReadHeadError<E>>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(t) = parse(buf).map_err(ReadHeadError::Bad)? {
            return Ok(t);
        }
        if buf.len() > max {
            return Err(ReadHeadError::TooLarge(max));
        }
        let room = (max + 1 - buf.len()).min(chunk.len());
        let n = s.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(ReadHeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// [`read_head`] for a response head; the head is removed from `buf`, the bytes after it stay.
///
/// # Errors
/// As [`read_head`].
pub async fn read_response_head<S>(
    s: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<ResponseHead, ReadHeadError<BadHead>>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let (head, n) = read_head(s, buf, max, parse_response).await?;
    buf.drain(..n);
    Ok(head)
}

/// A stream whose first bytes were already read into a buffer (past an HTTP head).
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Reads `prefix` first, then `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed { prefix, at: 0, inner }
    }
}

/// `s`, with `early` (bytes read past a head) put back in front when there are any.
pub fn unread(early: Vec<u8>, s: Box<dyn AsyncReadWrite>) -> Box<dyn AsyncReadWrite> {
    if early.is_empty() {
        s
    } else {
        Box::new(Prefixed::new(early, s))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(out.remaining());
            let at = self.at;
            out.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_response_head_read_in_pieces_leaves_what_follows() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let w = tokio::spawn(async move {
            for part in [&b"HTTP/1.1 101 Switching"[..], b" Protocols\r\nUpgrade: x\r\n", b"\r\nNEXT"] {
                a.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
            a
        });
        let mut buf = Vec::new();
        let head = read_response_head(&mut b, &mut buf, 1024).await.unwrap();
        assert_eq!((head.status, head.header("upgrade")), (101, Some("x")));
        drop(w.await.unwrap());
        let mut rest = Vec::new();
        Prefixed::new(buf, b).read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn an_endless_or_cut_or_bad_head_is_an_error() {
        let endless = vec![b'a'; 100];
        let r = read_response_head(&mut &endless[..], &mut Vec::new(), 50).await;
        assert!(matches!(r, Err(ReadHeadError::Bad(_)) | Err(ReadHeadError::TooLarge(50))), "{r:?}");
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "y".repeat(100));
        let r = read_response_head(&mut long.as_bytes(), &mut Vec::new(), 50).await;
        assert!(matches!(r, Err(ReadHeadError::TooLarge(50))), "{r:?}");
        let r = read_response_head(&mut &b"HTTP/1.1 200 OK\r\n"[..], &mut Vec::new(), 50).await;
        assert!(matches!(r, Err(ReadHeadError::Closed)), "{r:?}");
        let r = read_response_head(&mut &b"SSH-2.0\r\n\r\n"[..], &mut Vec::new(), 50).await;
        assert!(matches!(r, Err(ReadHeadError::Bad(_))), "{r:?}");
    }
}
