//! The data plane's UDP socket on Linux, with segmentation offload both ways: a run of
//! equal-sized datagrams to one peer leaves in one `sendmsg` (`UDP_SEGMENT`), and datagrams
//! from one sender arrive coalesced, many per `recvmsg` (`UDP_GRO`). A bulk transfer then
//! costs one system call per few dozen packets instead of one per packet, on both sides.
//!
//! Written on `libc` rather than a crate: the two socket options and one control message are a
//! few lines, and the batching crates (`quinn-udp`) bring their own socket type and transmit
//! model, which the [`Datagram`] trait (also implemented by the simulator) does not have.
//! When the kernel refuses segmentation (old kernel, device without checksum offload) the
//! socket falls back to one datagram per call, for good.

use crate::net::{BoxFuture, Datagram};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use tokio::io::Interest;

/// A tokio UDP socket that sends and receives with segmentation offload where the kernel has it.
pub(crate) struct BatchUdp {
    sock: tokio::net::UdpSocket,
    /// Cleared the first time the kernel refuses an offloaded send.
    gso: AtomicBool,
    /// Whether the socket takes coalesced datagrams (`UDP_GRO` accepted).
    gro: bool,
}

impl BatchUdp {
    /// Wraps `sock`, turning receive offload on if the kernel has it.
    pub(crate) fn new(sock: tokio::net::UdpSocket) -> BatchUdp {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor and a c_int option of the right size.
        let gro = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        BatchUdp { sock, gso: AtomicBool::new(true), gro }
    }

    /// One `sendmsg` of `segments` (within the kernel's limits: see `super::segment_run`),
    /// segmented by the kernel at the first one's size.
    fn sendmsg_gso(&self, segments: &[&[u8]], to: &socket2::SockAddr) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> = segments
            .iter()
            .map(|s| libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() })
            .collect();
        let seg = u16::try_from(segments[0].len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Room for one cmsg holding a u16, aligned for cmsghdr.
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and
        // the control buffer is large enough for CMSG_SPACE(2) (checked by the assert).
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            assert!(space <= std::mem::size_of_val(&control));
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = to.as_ptr() as *mut libc::c_void;
            msg.msg_namelen = to.len();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            if segments.len() > 1 {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
            }
            if libc::sendmsg(self.sock.as_raw_fd(), &msg, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// One `recvmsg` into `buf`: length, sender, and the segment size the kernel reports for
    /// a coalesced read (the whole length when it reports none).
    fn recvmsg_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut control = [0u64; 8];
        // SAFETY: the name, iovec and control buffers live across the call and their lengths
        // are the ones given; cmsgs are walked with the libc macros within msg_controllen.
        unsafe {
            let mut name = socket2::SockAddrStorage::zeroed();
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_namelen = name.size_of();
            msg.msg_name = (&mut name as *mut socket2::SockAddrStorage).cast();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            let mut seg = n;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let s = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    if s > 0 {
                        seg = s as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            let src = socket2::SockAddr::new(name, msg.msg_namelen)
                .as_socket()
                .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
            Ok((n, src, seg))
        }
    }
}

impl Datagram for BatchUdp {
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(async move {
            // A coalesced read keeps only its first datagram here; the data plane reads
            // through `recv_segments`, which keeps them all.
            let (n, src, seg) = self.recv_segments(buf).await?;
            Ok((n.min(seg), src))
        })
    }
    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(self.sock.send_to(buf, to))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, src, seg) = self.try_recv_segments(buf)?;
        Ok((n.min(seg), src))
    }
    fn send_segments<'a>(&'a self, segments: &'a [&'a [u8]], to: SocketAddr) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if segments.len() > 1 && self.gso.load(Relaxed) {
                let addr = socket2::SockAddr::from(to);
                match self.sock.async_io(Interest::WRITABLE, || self.sendmsg_gso(segments, &addr)).await {
                    Ok(()) => return Ok(()),
                    // The kernel or the device cannot segment: send one by one from now on.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                        tracing::debug!(error = %e, "UDP segmentation offload refused; sending datagrams one by one");
                        self.gso.store(false, Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            for s in segments {
                self.sock.send_to(s, to).await?;
            }
            Ok(())
        })
    }
    fn recv_segments<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr, usize)>> {
        Box::pin(async move {
            if !self.gro {
                let (n, src) = self.sock.recv_from(buf).await?;
                return Ok((n, src, n));
            }
            self.sock.async_io(Interest::READABLE, || self.recvmsg_gro(buf)).await
        })
    }
    fn try_recv_segments(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        if !self.gro {
            return self.sock.try_recv_from(buf).map(|(n, src)| (n, src, n));
        }
        self.sock.try_io(Interest::READABLE, || self.recvmsg_gro(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offloaded sends arrive as separate datagrams of the right sizes, in order, and a
    /// coalesced read splits back into them (whether or not the kernel has offload).
    #[tokio::test]
    async fn segments_round_trip_on_loopback() {
        let a = BatchUdp::new(crate::net::bind_tokio_udp("127.0.0.1:0".parse().unwrap()).unwrap());
        let b = BatchUdp::new(crate::net::bind_tokio_udp("127.0.0.1:0".parse().unwrap()).unwrap());
        let to = b.local_addr().unwrap();
        let bodies: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 1200]).chain([vec![99u8; 300]]).collect();
        let segs: Vec<&[u8]> = bodies.iter().map(|v| v.as_slice()).collect();
        a.send_segments(&segs, to).await.unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < bodies.len() {
            let (n, src, seg) = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_segments(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(src, a.local_addr().unwrap());
            got.extend(buf[..n].chunks(seg).map(<[u8]>::to_vec));
        }
        assert_eq!(got, bodies);
    }

    /// After the kernel refused segmentation (and on a socket without receive offload), the
    /// same sends still arrive, one datagram per call, an empty one included.
    #[tokio::test]
    async fn without_offload_every_datagram_still_arrives() {
        let a = BatchUdp::new(crate::net::bind_tokio_udp("127.0.0.1:0".parse().unwrap()).unwrap());
        a.gso.store(false, Relaxed);
        let mut b = BatchUdp::new(crate::net::bind_tokio_udp("127.0.0.1:0".parse().unwrap()).unwrap());
        b.gro = false;
        let to = b.local_addr().unwrap();
        let bodies: Vec<Vec<u8>> = vec![vec![1; 1200], vec![2; 1200], vec![], vec![3; 7]];
        let segs: Vec<&[u8]> = bodies.iter().map(|v| v.as_slice()).collect();
        a.send_segments(&segs, to).await.unwrap();
        let mut buf = vec![0u8; 65536];
        for want in &bodies {
            let (n, src, seg) = tokio::time::timeout(std::time::Duration::from_secs(5), b.recv_segments(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((src, n, seg), (a.local_addr().unwrap(), want.len(), want.len()));
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    /// Sends ten 1200-byte datagrams from `tx` and reads them on `rx`: whether any read came
    /// coalesced (several datagrams in one receive).
    async fn coalesced(tx: &dyn Datagram, rx: &dyn Datagram) -> bool {
        let body = vec![7u8; 1200];
        let segs: Vec<&[u8]> = (0..10).map(|_| body.as_slice()).collect();
        tx.send_segments(&segs, rx.local_addr().unwrap()).await.unwrap();
        let (mut got, mut merged, mut buf) = (0, false, vec![0u8; 65536]);
        while got < segs.len() {
            let (n, _, seg) = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_segments(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(seg, body.len());
            merged |= n > seg;
            got += n.div_ceil(seg);
        }
        merged
    }

    /// A mesh node's socket (bound through `TokioNet`, as `Mesh` binds it) batches as this
    /// module's does, sending and receiving: on a kernel with offload, a run of datagrams
    /// between two nodes costs one system call each side instead of one per packet.
    #[tokio::test]
    async fn mesh_node_socket_batches_both_ways() {
        use crate::net::Net;
        let bind = || BatchUdp::new(crate::net::bind_tokio_udp("127.0.0.1:0".parse().unwrap()).unwrap());
        let (probe_tx, probe_rx) = (bind(), bind());
        let offload = coalesced(&probe_tx, &probe_rx).await;
        let node = crate::net::TokioNet.bind_udp("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_eq!(coalesced(&*node, &probe_rx).await, offload, "a node's sends");
        assert_eq!(coalesced(&probe_tx, &*node).await, offload, "a node's receives");
        if !offload {
            eprintln!("this kernel has no UDP segmentation offload on loopback: nothing to compare");
        }
    }
}
