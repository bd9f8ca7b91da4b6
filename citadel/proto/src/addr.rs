//! The Tailscale address ranges: which addresses belong to the mesh.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is in the Tailscale address ranges: CGNAT 100.64.0.0/10 or the ULA
/// fd7a:115c:a1e0::/48 (IPv4-mapped IPv6 forms included).
pub fn is_mesh_ip(ip: IpAddr) -> bool {
    fn v4(ip: Ipv4Addr) -> bool {
        let o = ip.octets();
        o[0] == 100 && (o[1] & 0xc0) == 64
    }
    fn v6(ip: Ipv6Addr) -> bool {
        let s = ip.segments();
        s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
    }
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or_else(|| v6(a), v4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_ranges() {
        for yes in ["100.64.0.0", "100.127.255.255", "100.100.100.100", "fd7a:115c:a1e0::1", "::ffff:100.64.0.1"] {
            assert!(is_mesh_ip(yes.parse().unwrap()), "{yes}");
        }
        for no in ["100.63.255.255", "100.128.0.0", "10.0.0.1", "127.0.0.1", "fd7a:115c:a1e1::1", "::1"] {
            assert!(!is_mesh_ip(no.parse().unwrap()), "{no}");
        }
    }
}
