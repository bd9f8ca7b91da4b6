//! A shim between the tunnel and smoltcp that lets a full receiver still take ACKs.
//!
//! smoltcp rounds its advertised window down to the window-scale unit, so the right edge of
//! the window can move left by a few bytes; a peer that already sent up to the old edge then
//! has its last bytes trimmed, and its SND.NXT stays a few bytes past our RCV.NXT until it
//! retransmits them. If our window then fills up completely, smoltcp accepts a zero-length
//! segment only at exactly RCV.NXT and, on any other sequence number, drops the whole segment
//! including its ACK. With both directions busy (an echo server, say) each side then ignores
//! the other's ACKs and the connection deadlocks. RFC 9293 §3.10.7.4 asks receivers with a
//! zero window to still accept valid ACKs; this shim does that: a pure ACK whose sequence
//! number lies just past the edge we last advertised (by less than one window-scale unit) is
//! moved onto the edge, where smoltcp accepts it and processes its ACK. Sequence numbers of
//! pure ACKs carry no data, so nothing else changes.
//!
//! Sans-IO: it sees our outgoing segments (to learn the last ACK and window we advertised per
//! connection) and rewrites incoming ones in place.

use super::netstack::TCP_RX_BUFFER;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The window-scale shift smoltcp derives from our receive buffer (see `tcp::Socket::new`).
const WIN_SHIFT: u32 = (usize::BITS - TCP_RX_BUFFER.leading_zeros()).saturating_sub(16);
/// Connections remembered at most; beyond that the table starts over and relearns.
const MAX_FLOWS: usize = 8192;

/// Our last advertisement on one connection.
#[derive(Debug, Clone, Copy)]
struct Advert {
    ack: u32,
    win: u16,
}

/// Per-connection memory of what we advertised.
#[derive(Debug, Default)]
pub(crate) struct AckFix {
    /// Keyed by (our endpoint, peer endpoint).
    flows: HashMap<(SocketAddr, SocketAddr), Advert>,
}

/// The IP header fields the shim needs, and where the TCP header starts.
fn tcp_offsets(packet: &[u8]) -> Option<(IpAddr, IpAddr, usize, usize)> {
    match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp || p.more_frags() || p.frag_offset() != 0 {
                return None;
            }
            Some((p.src_addr().into(), p.dst_addr().into(), usize::from(p.header_len()), usize::from(p.total_len())))
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            if p.next_header() != IpProtocol::Tcp {
                return None;
            }
            Some((p.src_addr().into(), p.dst_addr().into(), 40, 40 + usize::from(p.payload_len())))
        }
        _ => None,
    }
}

impl AckFix {
    /// Notes the ACK and window of a segment our stack sends.
    pub(crate) fn on_egress(&mut self, packet: &[u8]) {
        let Some((src, dst, start, end)) = tcp_offsets(packet) else { return };
        let Some(t) = packet.get(start..end).and_then(|b| TcpPacket::new_checked(b).ok()) else { return };
        let key = (SocketAddr::new(src, t.src_port()), SocketAddr::new(dst, t.dst_port()));
        if t.rst() || t.fin() {
            self.flows.remove(&key);
            return;
        }
        // SYN windows are unscaled, and before the handshake there is nothing to fix.
        if t.syn() || !t.ack() {
            return;
        }
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&key) {
            self.flows.clear();
        }
        self.flows.insert(key, Advert { ack: t.ack_number().0 as u32, win: t.window_len() });
    }

    /// Moves an incoming pure ACK that lies just past our advertised window's right edge onto
    /// the edge, so that a full receiver still processes the ACK. Returns true if it did.
    pub(crate) fn on_ingress(&mut self, packet: &mut [u8]) -> bool {
        let Some((src, dst, start, end)) = tcp_offsets(packet) else { return false };
        let Some(seg) = packet.get_mut(start..end) else { return false };
        let seg_len = seg.len();
        let Ok(mut t) = TcpPacket::new_checked(seg) else { return false };
        let pure_ack = t.ack() && !t.syn() && !t.fin() && !t.rst() && usize::from(t.header_len()) == seg_len;
        if !pure_ack {
            return false;
        }
        let Some(adv) = self.flows.get(&(SocketAddr::new(dst, t.dst_port()), SocketAddr::new(src, t.src_port())))
        else {
            return false;
        };
        let edge = adv.ack.wrapping_add(u32::from(adv.win) << WIN_SHIFT);
        let seq = t.seq_number().0 as u32;
        let past = seq.wrapping_sub(edge);
        if past == 0 || past >= 1 << WIN_SHIFT {
            return false;
        }
        t.set_seq_number(smoltcp::wire::TcpSeqNumber(edge as i32));
        t.fill_checksum(&IpAddress::from(src), &IpAddress::from(dst));
        tracing::trace!(%src, %dst, from = seq, to = edge, "moved a pure ACK onto the window edge");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{IpRepr, TcpControl, TcpRepr, TcpSeqNumber};

    fn segment(src: &str, dst: &str, seq: u32, ack: u32, win: u16, payload: &[u8], control: TcpControl) -> Vec<u8> {
        let (s, d): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let (s, d) = (IpAddress::from(s), IpAddress::from(d));
        let tcp = TcpRepr {
            src_port: if src.starts_with("100.64.0.1") { 1000 } else { 2000 },
            dst_port: if src.starts_with("100.64.0.1") { 2000 } else { 1000 },
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: Some(TcpSeqNumber(ack as i32)),
            window_len: win,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = IpRepr::new(s, d, IpProtocol::Tcp, tcp.buffer_len(), 64);
        let mut buf = vec![0u8; ip.buffer_len()];
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut buf[..], &caps);
        let hl = ip.header_len();
        tcp.emit(&mut TcpPacket::new_unchecked(&mut buf[hl..]), &s, &d, &caps);
        buf
    }

    fn seq_of(p: &[u8]) -> u32 {
        let (_, _, start, end) = tcp_offsets(p).unwrap();
        TcpPacket::new_checked(&p[start..end]).unwrap().seq_number().0 as u32
    }

    #[test]
    fn moves_only_pure_acks_just_past_the_edge() {
        let mut f = AckFix::default();
        // We (100.64.0.1) acked up to 5000 with a zero window: the edge is 5000.
        f.on_egress(&segment("100.64.0.1", "100.64.0.2", 100, 5000, 0, &[], TcpControl::None));
        let unit = 1u32 << WIN_SHIFT;
        let mut moved = 0;
        for (seq, want) in
            [(5008, 5000), (5000 + unit - 1, 5000), (5000, 5000), (5000 + unit, 5000 + unit), (4990, 4990)]
        {
            let mut p = segment("100.64.0.2", "100.64.0.1", seq, 101, 100, &[], TcpControl::None);
            moved += u32::from(f.on_ingress(&mut p));
            assert_eq!(seq_of(&p), want, "seq {seq}");
            let (s, d, start, end) = tcp_offsets(&p).unwrap();
            assert!(TcpPacket::new_checked(&p[start..end]).unwrap().verify_checksum(&s.into(), &d.into()));
        }
        assert_eq!(moved, 2);
        // Data, FIN and other connections are left alone.
        let mut p = segment("100.64.0.2", "100.64.0.1", 5008, 101, 100, b"x", TcpControl::None);
        f.on_ingress(&mut p);
        assert_eq!(seq_of(&p), 5008);
        let mut p = segment("100.64.0.2", "100.64.0.1", 5008, 101, 100, &[], TcpControl::Fin);
        f.on_ingress(&mut p);
        assert_eq!(seq_of(&p), 5008);
        let mut p = segment("100.64.0.3", "100.64.0.1", 5008, 101, 100, &[], TcpControl::None);
        f.on_ingress(&mut p);
        assert_eq!(seq_of(&p), 5008);
        // A nonzero window moves the edge; a reset forgets the connection.
        f.on_egress(&segment("100.64.0.1", "100.64.0.2", 100, 5000, 2, &[], TcpControl::None));
        let mut p = segment("100.64.0.2", "100.64.0.1", 5000 + 2 * unit + 3, 101, 100, &[], TcpControl::None);
        f.on_ingress(&mut p);
        assert_eq!(seq_of(&p), 5000 + 2 * unit);
        f.on_egress(&segment("100.64.0.1", "100.64.0.2", 100, 5000, 0, &[], TcpControl::Rst));
        let mut p = segment("100.64.0.2", "100.64.0.1", 5003, 101, 100, &[], TcpControl::None);
        f.on_ingress(&mut p);
        assert_eq!(seq_of(&p), 5003);
    }

    #[test]
    fn garbage_is_ignored() {
        // One connection whose window edge is 5000: the whole `ack` below would be moved.
        let mut f = AckFix::default();
        f.on_egress(&segment("100.64.0.1", "100.64.0.2", 100, 5000, 0, &[], TcpControl::None));
        let ack = segment("100.64.0.2", "100.64.0.1", 5008, 101, 100, &[], TcpControl::None);
        // Byte soup and every truncation of that ACK, both ways: nothing learned, nothing moved.
        let mut garbage: Vec<Vec<u8>> = (0..80).map(|n| (0..n).map(|i| (i * 37) as u8 | 0x40).collect()).collect();
        garbage.extend((0..ack.len()).map(|n| ack[..n].to_vec()));
        for g in &garbage {
            f.on_egress(g);
            let mut p = g.clone();
            assert!(!f.on_ingress(&mut p), "{g:?}");
            assert_eq!(&p, g, "a packet the shim does not move must leave it byte for byte");
        }
        assert_eq!(f.flows.len(), 1, "garbage taught it connections: {:?}", f.flows);
        // Well-formed segments it must not touch: data, and a pure ACK of an unknown connection.
        for g in [
            segment("100.64.0.2", "100.64.0.1", 5008, 101, 100, b"data", TcpControl::None),
            segment("100.64.0.9", "100.64.0.1", 5008, 101, 100, &[], TcpControl::None),
        ] {
            let mut p = g.clone();
            assert!(!f.on_ingress(&mut p));
            assert_eq!(p, g);
        }
        let mut p = ack.clone();
        assert!(f.on_ingress(&mut p), "the shim is live for the whole ACK");
    }
}
