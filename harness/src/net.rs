//! [`citadel::net::Net`] over turmoil: TCP straight to the simulated network, UDP either
//! straight (a public host), through a NAT middlebox host (encapsulated, see [`encap`]), or
//! dropped (a UDP-blocked network).
//!
//! TCP is never translated: a node's control connection to Nexus goes direct even when its UDP
//! sits behind a NAT. NAT of TCP changes nothing the control plane can observe, so the harness
//! leaves it out; an "offline" network is a turmoil partition instead.

use citadel::net::{AsyncReadWrite, BoxFuture, Datagram, Dial, Net};
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// The UDP port on a NAT host that its inside hosts send encapsulated packets to.
pub const NAT_INSIDE_PORT: u16 = 1;

/// The encapsulation between an inside host and its NAT host: a 1-byte magic, a 1-byte
/// address family (4 or 6), the address, a big-endian port, then the payload. The address is
/// the real destination (inside → NAT) or the real source (NAT → inside).
pub mod encap {
    use std::net::{IpAddr, SocketAddr};

    /// First byte of every encapsulated packet.
    pub const MAGIC: u8 = 0xCA;

    /// Prepends the header for `addr` to `payload`.
    pub fn wrap(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(payload.len() + 20);
        v.push(MAGIC);
        match addr.ip() {
            IpAddr::V4(ip) => {
                v.push(4);
                v.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                v.push(6);
                v.extend_from_slice(&ip.octets());
            }
        }
        v.extend_from_slice(&addr.port().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Splits an encapsulated packet into address and payload; `None` if malformed.
    pub fn unwrap(pkt: &[u8]) -> Option<(SocketAddr, &[u8])> {
        let (&magic, rest) = pkt.split_first()?;
        if magic != MAGIC {
            return None;
        }
        let (&fam, rest) = rest.split_first()?;
        let (ip, rest): (IpAddr, &[u8]) = match fam {
            4 => {
                let b: [u8; 4] = rest.get(..4)?.try_into().ok()?;
                (b.into(), &rest[4..])
            }
            6 => {
                let b: [u8; 16] = rest.get(..16)?.try_into().ok()?;
                (b.into(), &rest[16..])
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?);
        Some((SocketAddr::new(ip, port), &rest[2..]))
    }
}

/// Where a host's UDP goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// Straight onto the simulated internet.
    Public,
    /// Through the NAT host at this address; `lan` holds the hosts behind the same NAT, which
    /// are reached directly (one LAN).
    Nat {
        /// The NAT host's address.
        nat: IpAddr,
        /// Inside hosts sharing the LAN.
        lan: Arc<BTreeSet<IpAddr>>,
    },
    /// Every datagram is dropped (a network that blocks UDP).
    Blocked,
}

/// The host network of one simulated host.
#[derive(Debug, Clone)]
pub struct TurmoilNet {
    /// Where UDP goes.
    pub uplink: Uplink,
    /// The host's own address (its one interface), when known.
    pub ip: Option<IpAddr>,
}

impl TurmoilNet {
    /// A host on the public internet.
    pub fn public() -> Self {
        TurmoilNet { uplink: Uplink::Public, ip: None }
    }
}

impl Dial for TurmoilNet {
    fn connect_tcp<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<Box<dyn AsyncReadWrite>>> {
        Box::pin(async move {
            let s = turmoil::net::TcpStream::connect((host, port)).await?;
            Ok(Box::new(s) as Box<dyn AsyncReadWrite>)
        })
    }
}

impl Net for TurmoilNet {
    fn bind_udp(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Datagram>>> {
        Box::pin(async move {
            // turmoil binds only the unspecified address (or loopback).
            let bind = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            let sock = turmoil::net::UdpSocket::bind(bind).await?;
            Ok(Box::new(SimDatagram { sock, uplink: self.uplink.clone() }) as Box<dyn Datagram>)
        })
    }

    fn interface_ips(&self) -> io::Result<Vec<IpAddr>> {
        Ok(self.ip.into_iter().collect())
    }
}

/// A UDP socket on a simulated host, honouring its [`Uplink`].
#[derive(Debug)]
pub struct SimDatagram {
    sock: turmoil::net::UdpSocket,
    uplink: Uplink,
}

impl SimDatagram {
    /// What the host's software sees of the datagram of `n` bytes that arrived in `buf` from
    /// `from`: NAT-delivered packets unwrapped in place, LAN traffic as is, anything else (the
    /// outside world reaching a private address) nothing.
    ///
    /// The datagram is received straight into the caller's buffer: citadel's receive buffers
    /// are 64 KiB and a zeroed temporary per call (the driver re-arms its receive on every
    /// wake) cost more than the rest of the data plane in 1,000-node worlds. A NAT-delivered
    /// datagram larger than `buf` loses its tail as any truncated datagram does.
    fn admit(&self, buf: &mut [u8], n: usize, from: SocketAddr) -> Option<(usize, SocketAddr)> {
        match &self.uplink {
            Uplink::Public => Some((n, from)),
            Uplink::Blocked => None,
            Uplink::Nat { nat, lan } => {
                if from == SocketAddr::new(*nat, NAT_INSIDE_PORT) {
                    let (src, payload) = encap::unwrap(&buf[..n])?;
                    let (start, len) = (n - payload.len(), payload.len());
                    buf.copy_within(start..n, 0);
                    Some((len, src))
                } else if lan.contains(&from.ip()) {
                    Some((n, from))
                } else {
                    None
                }
            }
        }
    }
}

impl Datagram for SimDatagram {
    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<(usize, SocketAddr)>> {
        Box::pin(async move {
            loop {
                let (n, from) = self.sock.recv_from(buf).await?;
                if let Some(r) = self.admit(buf, n, from) {
                    return Ok(r);
                }
            }
        })
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.sock.try_recv_from(buf)?;
            if let Some(r) = self.admit(buf, n, from) {
                return Ok(r);
            }
        }
    }

    fn send_to<'a>(&'a self, buf: &'a [u8], to: SocketAddr) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            match &self.uplink {
                Uplink::Public => self.sock.send_to(buf, to).await,
                Uplink::Blocked => Ok(buf.len()),
                Uplink::Nat { nat, lan } => {
                    if lan.contains(&to.ip()) {
                        return self.sock.send_to(buf, to).await;
                    }
                    self.sock.send_to(&encap::wrap(to, buf), SocketAddr::new(*nat, NAT_INSIDE_PORT)).await?;
                    Ok(buf.len())
                }
            }
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::encap;

    #[test]
    fn encap_round_trips_and_rejects_garbage() {
        for a in ["192.0.2.1:5", "[2001:db8::1]:65535"] {
            let a = a.parse().unwrap();
            let w = encap::wrap(a, b"hello");
            assert_eq!(encap::unwrap(&w), Some((a, &b"hello"[..])));
            for cut in 0..w.len() - 5 {
                assert_eq!(encap::unwrap(&w[..cut]), None, "cut at {cut}");
            }
        }
        assert_eq!(encap::unwrap(&[0, 4, 1, 2, 3, 4, 0, 1]), None);
        assert_eq!(encap::unwrap(&[encap::MAGIC, 5, 1, 2, 3, 4, 0, 1]), None);
    }
}
