//! [`both_ways`]: copies between two streams until both directions end, holding no buffer
//! while a connection idles.
//!
//! tokio's `copy_bidirectional` gives each direction a buffer of its own for the connection's
//! whole life, zeroed (`calloc`); once glibc reuses freed heap memory for one, it writes every
//! byte, so a held connection keeps both resident: 32 KiB at 16 KiB each, most of what a
//! connection held through `--http-proxy`, `--socks5` or `--expose` (`./bench.sh memory`).
//! Here a read lands in one scratch buffer per thread and is written on at once; only bytes
//! the writer does not take yet are copied into a buffer of the connection's own, freed once
//! they are written. Written by hand: tokio's copy (and every crate's found) owns its buffers.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one read takes: what a busy direction may copy aside when its writer is full.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; SCRATCH]);
}

/// One direction: what was read but not yet written, and how far it got.
#[derive(Default)]
struct Half {
    /// Read, not yet taken by the writer (allocated only then).
    pending: Vec<u8>,
    /// How much of `pending` was written.
    sent: usize,
    /// The reader ended: the writer is shut down once `pending` is out.
    eof: bool,
    /// Written since the last flush.
    need_flush: bool,
    done: bool,
    copied: u64,
}

impl Half {
    /// Moves bytes from `r` to `w`; ready when `r` ended and `w` was shut down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.sent < self.pending.len() {
                let n = ready!(w.as_mut().poll_write(cx, &self.pending[self.sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.sent += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            // All out: the connection holds no buffer until its writer stalls again.
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.sent = 0;
            }
            if self.eof {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH_BUF.with(|s| {
                let mut s = s.borrow_mut();
                let mut buf = ReadBuf::new(&mut s[..]);
                match r.as_mut().poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                }
                let data = buf.filled();
                if data.is_empty() {
                    self.eof = true;
                    return Poll::Ready(Ok(()));
                }
                let taken = match w.as_mut().poll_write(cx, data) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => 0,
                };
                self.copied += taken as u64;
                self.need_flush |= taken > 0;
                // The writer's waker is registered when it took less: the loop comes back.
                self.pending.extend_from_slice(&data[taken..]);
                Poll::Ready(Ok(()))
            });
            match step {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Nothing to read now: push out what was written (as tokio's copy does).
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both have ended (each end shuts down the other's
/// writing side), as `tokio::io::copy_bidirectional` does; returns the bytes copied each way.
/// The first error ends both.
pub async fn both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut ab, mut ba) = (Half::default(), Half::default());
    poll_fn(|cx| {
        if !ab.done {
            if let Poll::Ready(Err(e)) = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                return Poll::Ready(Err(e));
            }
        }
        if !ba.done {
            if let Poll::Ready(Err(e)) = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                return Poll::Ready(Err(e));
            }
        }
        if ab.done && ba.done {
            Poll::Ready(Ok((ab.copied, ba.copied)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both directions arrive whole and in order, also when a writer takes less than a read
    /// gave (a small duplex pipe), and each side's end reaches the other as EOF.
    #[tokio::test]
    async fn copies_both_ways_through_stalled_writers_and_passes_ends_on() {
        // client <-> (a | b) <-> server, with 1 KiB pipes so writes stall.
        let (client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { both_ways(&mut a, &mut b).await });
        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let server_side = tokio::spawn(async move {
            let send = async {
                server.write_all(&down2).await.unwrap();
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            };
            let got = send.await;
            assert_eq!(got, up2);
            server.shutdown().await.unwrap();
        });
        let (mut cr, mut cw) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            cw.write_all(&up).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, down);
        writer.await.unwrap();
        server_side.await.unwrap();
        let (ab, ba) = relay.await.unwrap().unwrap();
        assert_eq!((ab, ba), (300_000, 200_000));
    }

    /// A writer that takes nothing while `stalled`, then everything.
    struct Gate {
        stalled: bool,
        got: Vec<u8>,
        waker: Option<std::task::Waker>,
    }

    impl AsyncWrite for Gate {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            if self.stalled {
                self.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            self.got.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A direction keeps a buffer of its own only while its writer stalls: what was read then
    /// waits in it, and it is freed once the writer took it.
    #[test]
    fn a_buffer_of_its_own_only_while_the_writer_stalls() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut half = Half::default();
        let mut w = Gate { stalled: true, got: vec![], waker: None };
        let mut r: &[u8] = b"first chunk";
        assert!(half.poll(&mut cx, Pin::new(&mut r), Pin::new(&mut w)).is_pending());
        assert_eq!(half.pending, b"first chunk");
        assert!(w.waker.is_some(), "the stalled writer holds the task's waker");
        w.stalled = false;
        let mut rest = tokio::io::repeat(0).take(0);
        assert!(half.poll(&mut cx, Pin::new(&mut rest), Pin::new(&mut w)).is_ready());
        assert_eq!((w.got.as_slice(), half.pending.capacity(), half.copied), (&b"first chunk"[..], 0, 11));
    }

    /// An error on either side ends the copy with it.
    #[tokio::test]
    async fn an_error_ends_the_copy() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, server) = tokio::io::duplex(1024);
        drop(server);
        client.write_all(b"hello").await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), both_ways(&mut a, &mut b)).await;
        assert!(r.expect("the copy ended").is_err());
    }
}
