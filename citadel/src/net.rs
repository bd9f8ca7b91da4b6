//! The host network as the node code sees it, behind a trait so the same node code runs on
//! tokio (production) and on turmoil (the harness's simulated networks).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream (TCP, or a mesh connection).
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncReadWrite for T {}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
}

/// How the node reaches the host network.
pub trait Net: Send + Sync + 'static {
    /// Opens a TCP connection to `host:port`.
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>>;
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

impl Net for TokioNet {
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>> {
        Box::pin(async move {
            let s = tokio::net::TcpStream::connect((host, port)).await?;
            // Control frames are small; never let Nagle hold them back.
            let _ = s.set_nodelay(true);
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }

    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Datagram>>> {
        Box::pin(async move { Ok(Box::new(bind_tokio_udp(addr)?) as Box<dyn Datagram>) })
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
