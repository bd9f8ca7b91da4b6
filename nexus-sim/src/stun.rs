//! A STUN binding server: tells each sender the address its request came from, which is how
//! nodes learn their public (NAT-mapped) endpoint and how Tailscale's netcheck measures the
//! latency to each DERP region.
//!
//! Unlike Tailscale's `derper`, any well-formed binding request is answered, not only those
//! carrying SOFTWARE `tailnode`: the answer reveals nothing but the sender's own address.

use citadel_proto::stun;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::UdpSocket;

/// A running STUN server; stops when dropped.
pub struct StunServer {
    /// The bound address.
    pub addr: SocketAddr,
    answered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StunServer {
    /// Binds `addr` and serves until dropped.
    pub async fn bind(addr: SocketAddr) -> io::Result<StunServer> {
        let sock = UdpSocket::bind(addr).await?;
        let addr = sock.local_addr()?;
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let (n, from) = match sock.recv_from(&mut buf).await {
                    Ok(v) => v,
                    Err(e) => {
                        // ICMP errors from earlier sends surface here on some systems; they
                        // concern one peer, not the socket.
                        tracing::debug!("stun recv: {e}");
                        continue;
                    }
                };
                let Ok(req) = stun::BindingRequest::parse(&buf[..n]) else {
                    continue;
                };
                let resp = stun::response(req.tx_id, from);
                if sock.send_to(&resp, from).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        tracing::info!(%addr, "STUN listening");
        Ok(StunServer { addr, answered, task })
    }

    /// Binding requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_binding_requests_with_the_senders_address() {
        let srv = StunServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"not stun at all", srv.addr).await.unwrap();
        let tx = [5u8; 12];
        c.send_to(&stun::request(tx), srv.addr).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, _) =
            tokio::time::timeout(std::time::Duration::from_secs(5), c.recv_from(&mut buf)).await.unwrap().unwrap();
        let (id, seen) = stun::parse_response(&buf[..n]).unwrap();
        assert_eq!(id, tx);
        assert_eq!(seen, c.local_addr().unwrap());
        assert_eq!(srv.answered(), 1);
    }
}
