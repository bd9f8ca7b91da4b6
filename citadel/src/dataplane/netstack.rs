//! The userspace TCP/IP stack: a smoltcp [`Interface`] holding the node's mesh addresses, a
//! [`Device`] whose queues connect it to the WireGuard router, and the bookkeeping for the
//! app's sockets (listeners with a backlog, ephemeral ports, lingering closes).
//!
//! [`Stack`] is sans-IO apart from reading the monotonic clock for smoltcp's timestamps; the
//! driver feeds it decrypted packets ([`Stack::ingress`]), calls [`Stack::poll`] and drains
//! [`Stack::take_egress`].

use super::filter::{PacketInfo, PROTO_TCP};
use super::pages::{Fresh, Lent};
use super::wg::Pool;
use rand::Rng;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Tailscale's TUN MTU: leaves room for WireGuard (32) + UDP (8) + IPv6 (40) within 1360,
/// which fits every path the mesh uses.
pub(crate) const MTU: usize = 1280;
/// TCP receive ring: it bounds the window we advertise, and so what a peer may send per round
/// trip. At 512 KiB it held a tsnet sender to citadel to a median of 254 MB/s over six
/// interleaved rounds (182-358); at 1 MiB, 341 (271-374) in the same run (docs/performance.md).
/// The pages cost nothing until written and go back once the socket is quiet.
pub(crate) const TCP_RX_BUFFER: usize = 1024 * 1024;
/// TCP transmit ring: unacknowledged and unsent data. At 1 MiB too, citadel<->citadel
/// measured no faster (380-393 against 395-460 MB/s in the same rounds).
const TCP_TX_BUFFER: usize = 512 * 1024;
const UDP_PACKETS: usize = 512;
const UDP_BUFFER: usize = 256 * 1024;
/// Decrypted packets waiting for the stack; past this they are dropped like a full NIC ring.
const RX_QUEUE_MAX: usize = 4096;
/// Spare packet buffers the stack keeps for what it emits; the rest go back to the tunnels.
const STACK_POOL_KEEP: usize = 128;
/// Connections a listener holds before `accept` takes them; further SYNs are refused.
const LISTEN_BACKLOG: usize = 128;
/// How long a closed-by-app socket may take to finish its FIN exchange before it is reset.
const CLOSE_LINGER: Duration = Duration::from_secs(60);
/// How often the rings of sockets holding no data are given back (see `Lent::release_quiet`).
const RELEASE_EVERY: Duration = Duration::from_secs(10);
/// Ephemeral port range (IANA dynamic ports).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;

/// smoltcp device whose "wire" is two packet queues.
#[derive(Debug, Default)]
pub(crate) struct MeshDevice {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    /// Consumed and sent packets' buffers, for the next packets the stack emits.
    pool: Pool,
    /// Consumed inbound packets' buffers (moved into `pool` after each poll).
    rx_spent: Pool,
}

pub(crate) struct MeshRx<'a>(Vec<u8>, &'a mut Pool);
pub(crate) struct MeshTx<'a>(&'a mut VecDeque<Vec<u8>>, &'a mut Pool);

impl RxToken for MeshRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.0);
        self.1.put(self.0);
        r
    }
}

impl TxToken for MeshTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.1.zeroed(len);
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for MeshDevice {
    type RxToken<'a> = MeshRx<'a>;
    type TxToken<'a> = MeshTx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(MeshRx<'_>, MeshTx<'_>)> {
        let p = self.rx.pop_front()?;
        // The two tokens share the pool; smoltcp consumes at most one of them at a time, but
        // the borrow checker needs them apart: the rx token returns its buffer to a side pool.
        let (rx_pool, tx_pool) = (&mut self.rx_spent, &mut self.pool);
        Some((MeshRx(p, rx_pool), MeshTx(&mut self.tx, tx_pool)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<MeshTx<'_>> {
        Some(MeshTx(&mut self.tx, &mut self.pool))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // Inbound packets were authenticated by WireGuard (its AEAD covers every byte), so
        // their checksums are not verified again, as Tailscale's netstack does (RX checksum
        // offload); outbound ones are still filled in for peers that do check.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps.checksum.icmpv6 = Checksum::Tx;
        caps
    }
}

/// A TCP listener's state inside the stack.
#[derive(Debug, Default)]
struct Listener {
    /// Sockets put into LISTEN for SYNs in the current batch (one per new connection, so a
    /// retransmitted SYN can never be taken by a second socket).
    listening: Vec<SocketHandle>,
    /// The connections those sockets are for, so a SYN duplicated within one batch gets one.
    claimed: BTreeSet<(IpEndpoint, IpEndpoint)>,
    /// Connections past their SYN, waiting for `accept`.
    pending: VecDeque<SocketHandle>,
    waker: Option<Waker>,
}

/// The netstack and the app's sockets.
pub(crate) struct Stack {
    iface: Interface,
    pub(crate) sockets: SocketSet<'static>,
    /// The memory of the sockets' rings. Declared after `sockets`, so it drops after them.
    lent: Lent,
    device: MeshDevice,
    epoch: Instant,
    listeners: BTreeMap<u16, Listener>,
    closing: Vec<(SocketHandle, Instant)>,
    /// When the quiet sockets' rings were last given back.
    released: Instant,
    udp_ports: BTreeSet<u16>,
    /// Where the search for the next ephemeral port starts (see [`Stack::ephemeral_port`]).
    next_port: u16,
    /// Set when the data plane stops; every socket operation then fails.
    pub(crate) stopped: bool,
    pub(crate) rx_overflow: u64,
    /// Tasks blocked on UDP sockets, woken by [`Stack::stop`] (smoltcp wakes them only on
    /// traffic). Keyed by socket and direction (true = send).
    parked: BTreeMap<(SocketHandle, bool), Waker>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").field("addrs", &self.iface.ip_addrs()).finish_non_exhaustive()
    }
}

fn smol_now(epoch: Instant) -> SmolInstant {
    SmolInstant::from_micros(
        i64::try_from(crate::clock::now().saturating_duration_since(epoch).as_micros()).unwrap_or(i64::MAX),
    )
}

impl Stack {
    pub(crate) fn new() -> Stack {
        let mut device = MeshDevice::default();
        let epoch = crate::clock::now();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let iface = Interface::new(config, &mut device, smol_now(epoch));
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            lent: Lent::default(),
            device,
            epoch,
            listeners: BTreeMap::new(),
            closing: Vec::new(),
            released: epoch,
            udp_ports: BTreeSet::new(),
            next_port: rand::thread_rng().gen_range(EPHEMERAL),
            stopped: false,
            rx_overflow: 0,
            parked: BTreeMap::new(),
        }
    }

    /// Replaces the interface's addresses (the node's mesh IPs). Every destination outside
    /// them goes out of the device; the WireGuard router decides which peer gets it.
    pub(crate) fn set_addresses(&mut self, addrs: &[IpCidr]) {
        if self.iface.ip_addrs() == addrs {
            return;
        }
        self.iface.update_ip_addrs(|v| {
            v.clear();
            for a in addrs {
                if v.push(*a).is_err() {
                    tracing::warn!(addr = %a, "netstack holds two addresses; ignoring the rest");
                }
            }
        });
        let routes = self.iface.routes_mut();
        routes.remove_default_ipv4_route();
        routes.remove_default_ipv6_route();
        // With an IP-medium device the gateway is never resolved; any address of the right
        // family makes smoltcp consider every destination reachable.
        for a in addrs {
            let res = match a.address() {
                IpAddress::Ipv4(v4) => routes.add_default_ipv4_route(v4).map(|_| ()),
                IpAddress::Ipv6(v6) => routes.add_default_ipv6_route(v6).map(|_| ()),
            };
            if res.is_err() {
                tracing::warn!("netstack route table full");
            }
        }
    }

    pub(crate) fn local_addrs(&self) -> Vec<IpAddr> {
        self.iface.ip_addrs().iter().map(|c| IpAddr::from(c.address())).collect()
    }

    fn now(&self) -> SmolInstant {
        smol_now(self.epoch)
    }

    /// A TCP socket, its rings in pages the kernel zeroes when first written (see
    /// [`super::pages`]).
    fn tcp_socket() -> Fresh<tcp::Socket<'static>> {
        let mut f = Fresh::tcp(TCP_RX_BUFFER, TCP_TX_BUFFER);
        let s = &mut f.socket;
        // The app decides about batching; Nagle only adds latency to request/response.
        s.set_nagle_enabled(false);
        s.set_ack_delay(Some(SmolDuration::from_millis(1)));
        // Without congestion control smoltcp sends its whole window at once; a DERP relay
        // queues only a few dozen packets per client and drops the rest, and retransmitting
        // the same burst after every timeout stalls a relayed stream. Reno backs off on loss.
        s.set_congestion_control(tcp::CongestionControl::Reno);
        f
    }

    fn tcp_port_in_use(&self, port: u16) -> bool {
        self.sockets.iter().any(|(_, s)| match s {
            smoltcp::socket::Socket::Tcp(t) => {
                t.local_endpoint().map(|e| e.port) == Some(port) || t.listen_endpoint().port == port
            }
            _ => false,
        }) || self.listeners.contains_key(&port)
    }

    /// The next free ephemeral port after the last one handed out (a random start, then in
    /// order, as Linux does). Random picks would reuse a recent port by the birthday bound
    /// after a few hundred connections, and a peer still holding that 4-tuple in TIME-WAIT
    /// ignores the new SYN until it expires: a connect that hangs for seconds under churn.
    fn ephemeral_port(&mut self, in_use: impl Fn(&Self, u16) -> bool) -> io::Result<u16> {
        let (lo, hi) = (*EPHEMERAL.start(), *EPHEMERAL.end());
        for _ in EPHEMERAL {
            let p = self.next_port;
            self.next_port = if p >= hi { lo } else { p + 1 };
            if !in_use(self, p) {
                return Ok(p);
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "no free ephemeral port"))
    }

    /// Starts connecting to `remote` from an ephemeral port.
    pub(crate) fn connect(&mut self, remote: SocketAddr) -> io::Result<(SocketHandle, SocketAddr)> {
        self.check_running()?;
        let port = self.ephemeral_port(|st, p| st.tcp_port_in_use(p))?;
        let mut f = Self::tcp_socket();
        f.socket.connect(self.iface.context(), remote, port).map_err(|e| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, format!("cannot connect to {remote} from the mesh: {e}"))
        })?;
        let local =
            f.socket.local_endpoint().map(SocketAddr::from).unwrap_or_else(|| SocketAddr::new(remote.ip(), port));
        Ok((self.lent.add(&mut self.sockets, f), local))
    }

    /// State of a connecting socket: `Ready(Ok)` once established.
    pub(crate) fn poll_connected(&mut self, h: SocketHandle, cx: &mut Context<'_>) -> Poll<io::Result<SocketAddr>> {
        if let Err(e) = self.check_running() {
            return Poll::Ready(Err(e));
        }
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        match s.state() {
            tcp::State::SynSent | tcp::State::SynReceived => {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
            tcp::State::Closed | tcp::State::Listen | tcp::State::TimeWait => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused")))
            }
            _ => {
                Poll::Ready(s.remote_endpoint().map(SocketAddr::from).ok_or_else(|| io::ErrorKind::NotConnected.into()))
            }
        }
    }

    /// Resets and forgets a socket (a dial that timed out).
    pub(crate) fn abort_tcp(&mut self, h: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(h).abort();
        self.closing.push((h, crate::clock::now()));
    }

    pub(crate) fn listen(&mut self, port: u16) -> io::Result<()> {
        self.check_running()?;
        if port == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "listen needs a port"));
        }
        if self.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("mesh TCP port {port} already has a listener"),
            ));
        }
        self.listeners.insert(port, Listener::default());
        Ok(())
    }

    pub(crate) fn unlisten(&mut self, port: u16) {
        if let Some(l) = self.listeners.remove(&port) {
            for h in l.listening.into_iter().chain(l.pending) {
                self.sockets.get_mut::<tcp::Socket>(h).abort();
                self.closing.push((h, crate::clock::now()));
            }
        }
    }

    /// The next established connection on `port`.
    pub(crate) fn poll_accept(
        &mut self,
        port: u16,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(SocketHandle, SocketAddr, SocketAddr)>> {
        if let Err(e) = self.check_running() {
            return Poll::Ready(Err(e));
        }
        let Some(l) = self.listeners.get_mut(&port) else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "listener closed")));
        };
        let mut i = 0;
        while i < l.pending.len() {
            let h = l.pending[i];
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            match s.state() {
                tcp::State::SynReceived => i += 1,
                // Reset during the handshake.
                tcp::State::Closed | tcp::State::Listen => {
                    l.pending.remove(i);
                    self.lent.remove(&mut self.sockets, h);
                }
                _ => {
                    let (Some(local), Some(remote)) = (s.local_endpoint(), s.remote_endpoint()) else {
                        i += 1;
                        continue;
                    };
                    l.pending.remove(i);
                    return Poll::Ready(Ok((h, local.into(), remote.into())));
                }
            }
        }
        l.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(crate) fn bind_udp(&mut self, port: u16) -> io::Result<(SocketHandle, u16)> {
        self.check_running()?;
        let port = if port == 0 { self.ephemeral_port(|st, p| st.udp_ports.contains(&p))? } else { port };
        if self.udp_ports.contains(&port) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("mesh UDP port {port} is in use")));
        }
        let mut f = Fresh::udp(UDP_PACKETS, UDP_BUFFER);
        f.socket
            .bind(IpListenEndpoint { addr: None, port })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("bind mesh UDP port {port}: {e}")))?;
        self.udp_ports.insert(port);
        Ok((self.lent.add(&mut self.sockets, f), port))
    }

    /// The app dropped its stream: close gracefully (or reset, if it left data unread, as a
    /// kernel does) and forget the socket once closed.
    pub(crate) fn release_tcp(&mut self, h: SocketHandle) {
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        if s.recv_queue() > 0 {
            s.abort();
        } else {
            s.close();
        }
        self.closing.push((h, crate::clock::now()));
    }

    /// Remembers a task blocked on a UDP socket so that [`Stack::stop`] can wake it.
    pub(crate) fn park_udp(&mut self, h: SocketHandle, send: bool, waker: &Waker) {
        self.parked.insert((h, send), waker.clone());
    }

    pub(crate) fn release_udp(&mut self, h: SocketHandle, port: u16) {
        self.parked.remove(&(h, false));
        self.parked.remove(&(h, true));
        self.lent.remove(&mut self.sockets, h);
        self.udp_ports.remove(&port);
    }

    /// Queues one decrypted, filtered packet. A SYN to a listened port gets a fresh LISTEN
    /// socket first, unless a socket already owns that connection (a retransmitted SYN).
    pub(crate) fn ingress(&mut self, info: &PacketInfo, packet: Vec<u8>) {
        if self.device.rx.len() >= RX_QUEUE_MAX {
            self.rx_overflow += 1;
            return;
        }
        if info.proto == PROTO_TCP && info.tcp_syn_only && self.listeners.contains_key(&info.dst_port) {
            self.prepare_listen_socket(info);
        }
        self.device.rx.push_back(packet);
    }

    fn prepare_listen_socket(&mut self, info: &PacketInfo) {
        let local = IpEndpoint::from(SocketAddr::new(info.dst, info.dst_port));
        let remote = IpEndpoint::from(SocketAddr::new(info.src, info.src_port));
        let owned = self.sockets.iter().any(|(_, s)| match s {
            smoltcp::socket::Socket::Tcp(t) => t.local_endpoint() == Some(local) && t.remote_endpoint() == Some(remote),
            _ => false,
        });
        let Some(l) = self.listeners.get(&info.dst_port) else { return };
        if owned || l.claimed.contains(&(local, remote)) || l.listening.len() + l.pending.len() >= LISTEN_BACKLOG {
            return;
        }
        let mut f = Self::tcp_socket();
        if f.socket.listen(IpListenEndpoint { addr: Some(local.addr), port: local.port }).is_err() {
            return;
        }
        let h = self.lent.add(&mut self.sockets, f);
        if let Some(l) = self.listeners.get_mut(&info.dst_port) {
            l.listening.push(h);
            l.claimed.insert((local, remote));
        }
    }

    /// Runs the stack: processes queued packets, sends what sockets have, moves new
    /// connections to their listener, reaps closed sockets. Returns when it next wants to run.
    pub(crate) fn poll(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        for l in self.listeners.values_mut() {
            l.claimed.clear();
            for h in l.listening.drain(..) {
                if self.sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen {
                    // Its SYN never reached it (dropped, or taken by an older socket).
                    self.lent.remove(&mut self.sockets, h);
                } else {
                    l.pending.push_back(h);
                }
            }
            if !l.pending.is_empty() {
                if let Some(w) = l.waker.take() {
                    w.wake();
                }
            }
        }
        let wall = crate::clock::now();
        let (sockets, lent) = (&mut self.sockets, &mut self.lent);
        self.closing.retain(|(h, since)| {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if s.state() == tcp::State::Closed {
                lent.remove(sockets, *h);
                return false;
            }
            if wall.duration_since(*since) > CLOSE_LINGER {
                s.abort();
            }
            true
        });
        if wall.duration_since(self.released) >= RELEASE_EVERY {
            self.released = wall;
            self.lent.release_quiet(&self.sockets);
        }
        self.iface.poll_delay(now, &self.sockets).map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Bytes of the sockets' rings that are resident.
    #[cfg(all(test, target_os = "linux"))]
    fn resident_rings(&self) -> usize {
        self.lent.resident()
    }

    /// One line per socket (state, queues, endpoints), for diagnostics.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.sockets
            .iter()
            .map(|(h, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => format!(
                    "{h} tcp {} {:?} -> {:?} send_queue={} recv_queue={} may_send={} can_recv={}",
                    t.state(),
                    t.local_endpoint(),
                    t.remote_endpoint(),
                    t.send_queue(),
                    t.recv_queue(),
                    t.may_send(),
                    t.can_recv()
                ),
                smoltcp::socket::Socket::Udp(u) => {
                    format!(
                        "{h} udp port {} send_queue={} recv_queue={}",
                        u.endpoint().port,
                        u.send_queue(),
                        u.recv_queue()
                    )
                }
                #[allow(unreachable_patterns)]
                _ => format!("{h} other"),
            })
            .collect()
    }

    /// IP packets the stack sent since the last call.
    pub(crate) fn take_egress(&mut self, out: &mut Vec<Vec<u8>>) {
        out.extend(self.device.tx.drain(..));
    }

    /// Takes buffers of packets already sent back for reuse, and hands what the stack holds
    /// beyond its own needs to `spare` (for the WireGuard side's pool).
    pub(crate) fn recycle(&mut self, sent: &mut Vec<Vec<u8>>, spare: &mut Vec<Vec<u8>>) {
        let d = &mut self.device;
        d.rx_spent.surplus(0, spare);
        for b in sent.drain(..) {
            d.pool.put(b);
        }
        d.pool.surplus(STACK_POOL_KEEP, spare);
    }

    /// Stops every socket: pending reads, writes and accepts fail from now on.
    pub(crate) fn stop(&mut self) {
        self.stopped = true;
        for (_, s) in self.sockets.iter_mut() {
            match s {
                smoltcp::socket::Socket::Tcp(t) => t.abort(),
                smoltcp::socket::Socket::Udp(u) => u.close(),
                #[allow(unreachable_patterns)]
                _ => {}
            }
        }
        for l in self.listeners.values_mut() {
            if let Some(w) = l.waker.take() {
                w.wake();
            }
        }
        for (_, w) in std::mem::take(&mut self.parked) {
            w.wake();
        }
    }

    pub(crate) fn check_running(&self) -> io::Result<()> {
        if self.stopped {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the mesh data plane has stopped"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn stack(ip: [u8; 4]) -> Stack {
        let mut s = Stack::new();
        s.set_addresses(&[IpCidr::new(IpAddress::from(std::net::Ipv4Addr::from(ip)), 32)]);
        s
    }

    /// Moves packets between two stacks until both are quiet.
    fn shuttle(a: &mut Stack, b: &mut Stack, dup_syns: bool) {
        for _ in 0..50 {
            a.poll();
            b.poll();
            let (mut from_a, mut from_b) = (vec![], vec![]);
            a.take_egress(&mut from_a);
            b.take_egress(&mut from_b);
            if from_a.is_empty() && from_b.is_empty() {
                return;
            }
            for p in from_a {
                let info = PacketInfo::parse(&p).unwrap();
                if dup_syns && info.tcp_syn_only {
                    b.ingress(&info, p.clone());
                }
                b.ingress(&info, p);
            }
            for p in from_b {
                b_to_a(a, p);
            }
        }
    }

    fn b_to_a(a: &mut Stack, p: Vec<u8>) {
        let info = PacketInfo::parse(&p).unwrap();
        a.ingress(&info, p);
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn listener_takes_simultaneous_and_duplicated_syns_once_each() {
        let (mut a, mut b) = (stack([100, 64, 0, 1]), stack([100, 64, 0, 2]));
        b.listen(80).unwrap();
        assert_eq!(b.listen(80).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        let server: SocketAddr = "100.64.0.2:80".parse().unwrap();
        let dials: Vec<_> = (0..3).map(|_| a.connect(server).unwrap()).collect();
        shuttle(&mut a, &mut b, true);
        for (h, _) in &dials {
            assert!(matches!(a.poll_connected(*h, &mut cx()), Poll::Ready(Ok(p)) if p == server));
        }
        let mut accepted = vec![];
        while let Poll::Ready(Ok((h, local, remote))) = b.poll_accept(80, &mut cx()) {
            assert_eq!(local, server);
            accepted.push((h, remote));
        }
        let mut want: Vec<SocketAddr> = dials.iter().map(|(_, l)| *l).collect();
        let mut got: Vec<SocketAddr> = accepted.iter().map(|(_, r)| *r).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "one connection per dial, none duplicated");
        // Only the accepted connections remain on B: no stray LISTEN sockets.
        assert_eq!(b.sockets.iter().count(), 3);

        // Data flows and a closed stream is reaped on both sides.
        let (ha, hb) = (dials[0].0, accepted.iter().find(|(_, r)| *r == dials[0].1).unwrap().0);
        assert_eq!(a.sockets.get_mut::<tcp::Socket>(ha).send_slice(b"ping").unwrap(), 4);
        shuttle(&mut a, &mut b, false);
        let mut buf = [0u8; 8];
        assert_eq!(b.sockets.get_mut::<tcp::Socket>(hb).recv_slice(&mut buf).unwrap(), 4);
        // A closes first and lingers in TIME-WAIT; B, the passive closer, is reaped at once.
        a.release_tcp(ha);
        shuttle(&mut a, &mut b, false);
        b.release_tcp(hb);
        shuttle(&mut a, &mut b, false);
        assert_eq!(b.sockets.iter().count(), 2);
        assert_eq!(a.sockets.get::<tcp::Socket>(ha).state(), tcp::State::TimeWait);
    }

    /// Connection churn where the server closes first (it then holds each 4-tuple in
    /// TIME-WAIT): every new dial must still connect at once, so no client port is reused
    /// while the server may remember it.
    #[test]
    fn churn_with_server_side_time_wait_never_stalls_a_dial() {
        let (mut a, mut b) = (stack([100, 64, 0, 1]), stack([100, 64, 0, 2]));
        b.listen(80).unwrap();
        let server: SocketAddr = "100.64.0.2:80".parse().unwrap();
        let mut ports = BTreeSet::new();
        for i in 0..600 {
            let (h, local) = a.connect(server).unwrap();
            shuttle(&mut a, &mut b, false);
            assert!(
                matches!(a.poll_connected(h, &mut cx()), Poll::Ready(Ok(_))),
                "dial {i} from port {} did not connect",
                local.port()
            );
            assert!(ports.insert(local.port()), "dial {i} reused port {}", local.port());
            let Poll::Ready(Ok((hb, ..))) = b.poll_accept(80, &mut cx()) else { panic!("dial {i} not accepted") };
            b.release_tcp(hb);
            shuttle(&mut a, &mut b, false);
            a.release_tcp(h);
            shuttle(&mut a, &mut b, false);
        }
    }

    /// A connection holds only the ring pages it has written (not 1.5 MiB each), gives them back
    /// once it holds no data, and its pages go when its socket is reaped.
    #[cfg(target_os = "linux")]
    #[test]
    fn connections_hold_the_ring_pages_they_wrote_and_give_them_back() {
        let (mut a, mut b) = (stack([100, 64, 0, 1]), stack([100, 64, 0, 2]));
        b.listen(80).unwrap();
        let server: SocketAddr = "100.64.0.2:80".parse().unwrap();
        let dials: Vec<_> = (0..16).map(|_| a.connect(server).unwrap().0).collect();
        shuttle(&mut a, &mut b, false);
        let mut accepted = vec![];
        while let Poll::Ready(Ok((h, ..))) = b.poll_accept(80, &mut cx()) {
            accepted.push(h);
        }
        assert_eq!((a.lent.len(), b.lent.len(), accepted.len()), (16, 16, 16));
        // Sixteen idle connections: nothing written, nothing resident (whole rings: 24 MiB).
        assert_eq!(a.resident_rings(), 0);
        assert_eq!(b.resident_rings(), 0);

        // 100 KB through one of them: about that much becomes resident on each side (the
        // sender's ring and the receiver's), no more.
        let data = vec![7u8; 100_000];
        let mut sent = 0;
        while sent < data.len() {
            sent += a.sockets.get_mut::<tcp::Socket>(dials[0]).send_slice(&data[sent..]).unwrap();
            shuttle(&mut a, &mut b, false);
        }
        for side in [a.resident_rings(), b.resident_rings()] {
            assert!((100_000..=100_000 + 8 * 4096).contains(&side), "{side} bytes resident");
        }

        // Quiet sockets give their rings back on the stack's next poll after `RELEASE_EVERY`:
        // the sender's data is acknowledged, so its pages go; the receiver's ring still holds
        // the unread 100 KB, so it keeps them.
        let release = |s: &mut Stack| {
            s.released -= RELEASE_EVERY;
            s.poll();
        };
        release(&mut a);
        release(&mut b);
        assert_eq!(a.resident_rings(), 0);
        assert!(b.resident_rings() >= 100_000, "{} bytes resident", b.resident_rings());
        let rx = *accepted.iter().find(|h| b.sockets.get::<tcp::Socket>(**h).recv_queue() > 0).unwrap();
        let read_all = |b: &mut Stack, n: usize| {
            let mut got = vec![0u8; n + 1];
            let r = b.sockets.get_mut::<tcp::Socket>(rx).recv_slice(&mut got).unwrap();
            got.truncate(r);
            got
        };
        assert_eq!(read_all(&mut b, 100_000), data);
        release(&mut b);
        assert_eq!(b.resident_rings(), 0);
        // The rings work as before once given back: the next data arrives whole.
        let more: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < more.len() {
            sent += a.sockets.get_mut::<tcp::Socket>(dials[0]).send_slice(&more[sent..]).unwrap();
            shuttle(&mut a, &mut b, false);
        }
        assert_eq!(read_all(&mut b, 50_000), more);

        for h in dials {
            a.abort_tcp(h);
        }
        for h in accepted {
            b.abort_tcp(h);
        }
        shuttle(&mut a, &mut b, false);
        assert_eq!((a.sockets.iter().count(), a.lent.len()), (0, 0));
        assert_eq!((b.sockets.iter().count(), b.lent.len()), (0, 0));
    }

    #[test]
    fn refused_dial_and_stopped_stack() {
        let (mut a, mut b) = (stack([100, 64, 0, 1]), stack([100, 64, 0, 2]));
        let (h, _) = a.connect("100.64.0.2:81".parse().unwrap()).unwrap();
        shuttle(&mut a, &mut b, false);
        assert!(
            matches!(a.poll_connected(h, &mut cx()), Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused)
        );
        a.abort_tcp(h);
        a.poll();
        assert_eq!(a.sockets.iter().count(), 0);

        let (u, port) = b.bind_udp(0).unwrap();
        assert!(EPHEMERAL.contains(&port));
        assert_eq!(b.bind_udp(port).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        b.release_udp(u, port);
        b.stop();
        assert_eq!(b.listen(80).unwrap_err().kind(), io::ErrorKind::NotConnected);
        assert!(b.connect("100.64.0.1:1".parse().unwrap()).is_err());
    }
}
