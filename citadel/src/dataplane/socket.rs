//! The app-facing sockets: tokio `AsyncRead + AsyncWrite` TCP streams, a TCP listener and a
//! UDP socket, all inside the mesh. They lock the shared stack briefly, register wakers with
//! smoltcp, and nudge the driver after every operation that may have something to send.

use super::Shared;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::IpEndpoint;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TCP connection inside the mesh. Dropping it closes the connection (with a FIN, or a
/// reset if unread data is left, as a kernel socket does).
pub struct MeshTcpStream {
    shared: Arc<Shared>,
    handle: SocketHandle,
    local: SocketAddr,
    peer: SocketAddr,
}

impl std::fmt::Debug for MeshTcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTcpStream").field("local", &self.local).field("peer", &self.peer).finish()
    }
}

impl MeshTcpStream {
    pub(crate) fn new(shared: Arc<Shared>, handle: SocketHandle, local: SocketAddr, peer: SocketAddr) -> Self {
        MeshTcpStream { shared, handle, local, peer }
    }

    /// This end's mesh address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The other end's mesh address and port.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

impl AsyncRead for MeshTcpStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock_stack();
        if let Err(e) = st.check_running() {
            return Poll::Ready(Err(e));
        }
        let s = st.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.can_recv() {
            let r = s.recv_slice(buf.initialize_unfilled());
            drop(st);
            return match r {
                Ok(n) => {
                    buf.advance(n);
                    // Reading opens the receive window; the driver sends the update.
                    self.shared.wake_driver();
                    Poll::Ready(Ok(()))
                }
                Err(tcp::RecvError::Finished) => Poll::Ready(Ok(())),
                Err(tcp::RecvError::InvalidState) => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            };
        }
        if !s.may_recv() {
            // Nothing buffered and nothing more can come: EOF after the peer's FIN, else reset.
            return match s.recv_slice(&mut []) {
                Err(tcp::RecvError::InvalidState) => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
                _ => Poll::Ready(Ok(())),
            };
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for MeshTcpStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock_stack();
        if let Err(e) = st.check_running() {
            return Poll::Ready(Err(e));
        }
        let s = st.sockets.get_mut::<tcp::Socket>(self.handle);
        if !s.may_send() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.can_send() {
            let r = s.send_slice(data);
            drop(st);
            self.shared.wake_driver();
            return Poll::Ready(r.map_err(|_| io::ErrorKind::BrokenPipe.into()));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the stack's send buffer, which is as far as a kernel socket's
        // flush goes too.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock_stack();
        st.sockets.get_mut::<tcp::Socket>(self.handle).close();
        drop(st);
        self.shared.wake_driver();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MeshTcpStream {
    fn drop(&mut self) {
        self.shared.lock_stack().release_tcp(self.handle);
        self.shared.wake_driver();
    }
}

/// A TCP listener on one port of this node's mesh addresses.
pub struct MeshTcpListener {
    shared: Arc<Shared>,
    port: u16,
}

impl std::fmt::Debug for MeshTcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTcpListener").field("port", &self.port).finish()
    }
}

impl MeshTcpListener {
    pub(crate) fn new(shared: Arc<Shared>, port: u16) -> Self {
        MeshTcpListener { shared, port }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next connection that the packet filter let in and that completed its
    /// handshake.
    ///
    /// # Errors
    /// Fails once the data plane has stopped.
    pub async fn accept(&self) -> io::Result<(MeshTcpStream, SocketAddr)> {
        let (h, local, remote) = poll_fn(|cx| self.shared.lock_stack().poll_accept(self.port, cx)).await?;
        Ok((MeshTcpStream::new(Arc::clone(&self.shared), h, local, remote), remote))
    }
}

impl Drop for MeshTcpListener {
    fn drop(&mut self) {
        self.shared.lock_stack().unlisten(self.port);
        self.shared.wake_driver();
    }
}

/// A UDP socket on one port of this node's mesh addresses. Datagrams must fit the mesh MTU
/// (1252 bytes over IPv4, 1232 over IPv6); there is no fragmentation.
pub struct MeshUdpSocket {
    shared: Arc<Shared>,
    handle: SocketHandle,
    port: u16,
}

impl std::fmt::Debug for MeshUdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshUdpSocket").field("port", &self.port).finish()
    }
}

impl MeshUdpSocket {
    pub(crate) fn new(shared: Arc<Shared>, handle: SocketHandle, port: u16) -> Self {
        MeshUdpSocket { shared, handle, port }
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram to `dst`, waiting while the send buffer is full.
    ///
    /// # Errors
    /// No peer routes `dst` (`HostUnreachable`), the datagram exceeds the MTU
    /// (`InvalidInput`), or the data plane stopped.
    pub async fn send_to(&self, data: &[u8], dst: SocketAddr) -> io::Result<usize> {
        let max = super::netstack::MTU - if dst.is_ipv4() { 28 } else { 48 };
        if data.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("datagram of {} bytes exceeds the mesh limit of {max}", data.len()),
            ));
        }
        self.shared.check_route(dst.ip())?;
        let ep = IpEndpoint::from(dst);
        poll_fn(|cx| {
            let mut st = self.shared.lock_stack();
            if let Err(e) = st.check_running() {
                return Poll::Ready(Err(e));
            }
            let s = st.sockets.get_mut::<udp::Socket>(self.handle);
            match s.send_slice(data, ep) {
                Ok(()) => {
                    drop(st);
                    self.shared.wake_driver();
                    Poll::Ready(Ok(data.len()))
                }
                Err(udp::SendError::BufferFull) => {
                    s.register_send_waker(cx.waker());
                    st.park_udp(self.handle, true, cx.waker());
                    Poll::Pending
                }
                Err(udp::SendError::Unaddressable) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("no mesh address to send to {dst} from"),
                ))),
            }
        })
        .await
    }

    /// Receives one datagram and its sender.
    ///
    /// # Errors
    /// `buf` is smaller than the datagram (`InvalidInput`; the datagram is dropped), or the
    /// data plane stopped.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| {
            let mut st = self.shared.lock_stack();
            if let Err(e) = st.check_running() {
                return Poll::Ready(Err(e));
            }
            let s = st.sockets.get_mut::<udp::Socket>(self.handle);
            match s.recv_slice(buf) {
                Ok((n, meta)) => Poll::Ready(Ok((n, SocketAddr::from(meta.endpoint)))),
                Err(udp::RecvError::Truncated) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer smaller than the datagram")))
                }
                Err(udp::RecvError::Exhausted) => {
                    s.register_recv_waker(cx.waker());
                    st.park_udp(self.handle, false, cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl Drop for MeshUdpSocket {
    fn drop(&mut self) {
        self.shared.lock_stack().release_udp(self.handle, self.port);
    }
}
