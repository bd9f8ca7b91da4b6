//! Socket buffers in memory the kernel zeroes a page at a time, when a ring first writes it.
//!
//! A TCP socket's two 512 KiB rings (and a UDP socket's two 256 KiB payload rings) used to be
//! `vec![0u8; N]`, which is `calloc`. glibc raises its mmap threshold past N once the first such
//! buffer is freed, then serves the next ones from its heap, zeroing a reused block byte by byte.
//! A node that had seen connections come and go so paid up to a 1 MiB `memset` per new
//! connection and kept that much resident, however little it carried (`./bench.sh memory`
//! measured 228 KB per held connection after 100 had closed, against tsnet's 38 KB). An
//! anonymous mapping arrives zeroed, and only the pages a ring has written become resident:
//! an idle or short connection holds a few pages.
//!
//! smoltcp takes its rings as a `Vec` (freed by the global allocator, so not a mapping) or as
//! a borrowed slice. No crate lends mappings to it, hence this module: the
//! [`Stack`](super::netstack::Stack) makes each socket inside a [`Fresh`], which drops the
//! socket before its pages; once the socket is in the set, its pages move to a [`Lent`], which
//! unmaps them only when told the socket was removed, and which the stack declares after its
//! socket set (so it drops after it). Pages a ring wrote stay resident after the data is gone;
//! every 10 s the stack hands the pages of sockets holding no data back to the kernel
//! ([`Lent::release_quiet`]).

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use std::collections::HashMap;

/// One zeroed region, unmapped on drop (held for the socket's slice; tests measure it).
pub(crate) struct Pages {
    // Held for its drop (the unmapping); read only to release pages, on Unix.
    #[cfg_attr(not(unix), allow(dead_code))]
    map: memmap2::MmapMut,
}

impl Pages {
    /// Gives the region's resident pages back to the kernel; each reads as zeros again until
    /// written. For a ring holding no data: smoltcp reads a ring only where it holds data.
    fn release(&self) {
        #[cfg(unix)]
        // SAFETY: only the zeroing of pages no one reads (see above). The socket's slice over
        // them is used only inside smoltcp's calls, and none runs: the caller holds the set.
        let _ = unsafe { self.map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

/// `len` zeroed bytes and a slice over them for a socket's ring. Nothing is resident until
/// written. A refused mapping fails like any other allocation.
///
/// # Safety
/// The slice must not be used after the `Pages` are dropped.
unsafe fn pages(len: usize) -> (Pages, &'static mut [u8]) {
    let Ok(mut m) = memmap2::MmapMut::map_anon(len) else {
        std::alloc::handle_alloc_error(std::alloc::Layout::array::<u8>(len).unwrap_or(std::alloc::Layout::new::<u8>()))
    };
    // SAFETY: the mapping stays where it is when the `MmapMut` moves, and the caller keeps it
    // for as long as the slice is used.
    let slice = unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr(), m.len()) };
    (Pages { map: m }, slice)
}

/// Two rings, receive (`rx_len` bytes) and transmit (`tx_len`), and their pages.
///
/// # Safety
/// As for [`pages`]: the slices must not be used after the pages are dropped.
unsafe fn rings(rx_len: usize, tx_len: usize) -> ([Pages; 2], &'static mut [u8], &'static mut [u8]) {
    // SAFETY: passed on to the caller.
    let ((rx_pages, rx), (tx_pages, tx)) = unsafe { (pages(rx_len), pages(tx_len)) };
    ([rx_pages, tx_pages], rx, tx)
}

/// A socket not yet in a set, with the pages its rings are made of. Fields drop in order:
/// the socket first.
pub(crate) struct Fresh<S> {
    pub(crate) socket: S,
    pages: [Pages; 2],
}

impl Fresh<tcp::Socket<'static>> {
    /// A TCP socket with a receive ring of `rx_len` bytes and a transmit ring of `tx_len`.
    pub(crate) fn tcp(rx_len: usize, tx_len: usize) -> Self {
        // SAFETY: the slices go into `socket`, which drops before `pages` (field order), or
        // into a set whose `Lent` takes the pages (`Lent::add`).
        let (pages, rx, tx) = unsafe { rings(rx_len, tx_len) };
        Fresh { socket: tcp::Socket::new(tcp::SocketBuffer::new(rx), tcp::SocketBuffer::new(tx)), pages }
    }
}

impl Fresh<udp::Socket<'static>> {
    /// A UDP socket with room for `packets` datagrams and `len` payload bytes each way.
    pub(crate) fn udp(packets: usize, len: usize) -> Self {
        // SAFETY: as for TCP above.
        let (pages, rx, tx) = unsafe { rings(len, len) };
        let buf = |payload| udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; packets], payload);
        Fresh { socket: udp::Socket::new(buf(rx), buf(tx)), pages }
    }
}

/// The pages lent to the sockets of one socket set, by socket.
#[derive(Default)]
pub(crate) struct Lent {
    by_socket: HashMap<SocketHandle, [Pages; 2]>,
}

impl Lent {
    /// Puts `fresh`'s socket into `set` and keeps its pages until [`Lent::remove`].
    pub(crate) fn add<S: smoltcp::socket::AnySocket<'static>>(
        &mut self,
        set: &mut smoltcp::iface::SocketSet<'static>,
        fresh: Fresh<S>,
    ) -> SocketHandle {
        let Fresh { socket, pages } = fresh;
        let h = set.add(socket);
        // A handle smoltcp reuses had its socket removed; what it lent went then.
        self.by_socket.insert(h, pages);
        h
    }

    /// Removes socket `h` from `set`, then unmaps its pages.
    pub(crate) fn remove(&mut self, set: &mut smoltcp::iface::SocketSet<'static>, h: SocketHandle) {
        drop(set.remove(h));
        self.by_socket.remove(&h);
    }

    /// Gives back the ring pages of every socket in `set` that holds no data either way (see
    /// [`Pages::release`]). A connection that moved a burst keeps up to its two whole rings
    /// resident (1.5 MiB for TCP) after the data is gone; this returns it. One `madvise` per
    /// ring, cheap where nothing is resident (the kernel skips empty page tables).
    pub(crate) fn release_quiet(&self, set: &smoltcp::iface::SocketSet<'static>) {
        for (h, socket) in set.iter() {
            let quiet = match socket {
                smoltcp::socket::Socket::Tcp(s) => s.recv_queue() == 0 && s.send_queue() == 0,
                smoltcp::socket::Socket::Udp(s) => s.recv_queue() == 0 && s.send_queue() == 0,
                #[allow(unreachable_patterns)]
                _ => false,
            };
            if let Some(pages) = self.by_socket.get(&h).filter(|_| quiet) {
                pages.iter().for_each(Pages::release);
            }
        }
    }

    /// Sockets holding lent pages.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_socket.len()
    }

    /// Bytes of lent pages that are resident (the kernel's `mincore`).
    #[cfg(all(test, target_os = "linux"))]
    pub(crate) fn resident(&self) -> usize {
        let page = 4096;
        let mut total = 0;
        for p in self.by_socket.values().flatten() {
            let mut vec = vec![0u8; p.map.len().div_ceil(page)];
            // SAFETY: the range is one whole live mapping and `vec` has a byte per page of it.
            let r = unsafe { libc::mincore(p.map.as_ptr() as *mut libc::c_void, p.map.len(), vec.as_mut_ptr()) };
            assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
            total += vec.iter().filter(|b| **b & 1 == 1).count() * page;
        }
        total
    }
}
