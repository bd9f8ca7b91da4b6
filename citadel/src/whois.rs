//! Who is behind a mesh address: the peer's name, org, tags, node key and OS, from the
//! netmap, as `citadel whois` prints it and as [`Listener::accept`] attaches it to each
//! inbound connection (tsnet's `WhoIs`).

use crate::dataplane::{MeshTcpListener, MeshTcpStream};
use crate::netmap::{short_name, NetMap};
use crate::tailcfg::Node;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use tokio::sync::watch;

/// The identity of a mesh node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoIs {
    /// Short host name.
    pub name: String,
    /// Fully qualified mesh name.
    pub fqdn: String,
    /// Org (user) the node belongs to.
    pub org: String,
    /// ACL tags.
    pub tags: Vec<String>,
    /// Node key.
    pub node_key: String,
    /// Operating system it reports.
    pub os: String,
    /// Mesh addresses.
    pub addresses: Vec<String>,
    /// True when the address is this node's own.
    pub is_self: bool,
}

/// Parses `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (the port is accepted and ignored:
/// identity is per address).
pub fn parse_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

fn has_ip(n: &Node, ip: IpAddr) -> bool {
    n.addresses.iter().any(|a| a.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()) == Some(ip))
}

fn describe(nm: &NetMap, n: &Node, is_self: bool) -> WhoIs {
    WhoIs {
        name: short_name(n),
        fqdn: n.name.trim_end_matches('.').to_string(),
        org: nm.users.get(&n.user).map(|u| u.login_name.clone()).unwrap_or_default(),
        tags: n.tags.clone(),
        node_key: n.key.to_string(),
        os: n.hostinfo.os.clone(),
        addresses: n.addresses.iter().map(|a| a.split('/').next().unwrap_or_default().to_string()).collect(),
        is_self,
    }
}

/// The node holding `ip` in `nm` (a peer, or this node itself).
pub fn lookup(nm: &NetMap, ip: IpAddr) -> Option<WhoIs> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if has_ip(&nm.self_node, ip) {
        return Some(describe(nm, &nm.self_node, true));
    }
    nm.peers.values().find(|p| has_ip(p, ip)).map(|p| describe(nm, p, false))
}

/// An inbound connection with the identity of the peer that opened it.
#[derive(Debug)]
pub struct Accepted {
    /// The connection.
    pub stream: MeshTcpStream,
    /// The peer's mesh address and port.
    pub remote: SocketAddr,
    /// Who the peer is; `None` if it left the netmap in the meantime.
    pub who: Option<WhoIs>,
}

/// A mesh TCP listener whose accept says who connected.
#[derive(Debug)]
pub struct Listener {
    inner: MeshTcpListener,
    netmap: watch::Receiver<NetMap>,
}

impl Listener {
    /// Wraps `inner`, identifying peers from `netmap`.
    pub fn new(inner: MeshTcpListener, netmap: watch::Receiver<NetMap>) -> Self {
        Listener { inner, netmap }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// The next connection the packet filter let in, with its peer's identity.
    ///
    /// # Errors
    /// Fails once the data plane has stopped.
    pub async fn accept(&self) -> std::io::Result<Accepted> {
        let (stream, remote) = self.inner.accept().await?;
        let who = lookup(&self.netmap.borrow(), remote.ip());
        Ok(Accepted { stream, remote, who })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::NodePublic;
    use crate::tailcfg::{Hostinfo, UserProfile};

    fn netmap() -> NetMap {
        let mut nm = NetMap::default();
        nm.self_node = Node {
            id: 1,
            name: "alpha.acme.mesh.".into(),
            addresses: vec!["100.64.0.1/32".into()],
            ..Default::default()
        };
        nm.peers.insert(
            2,
            Node {
                id: 2,
                name: "bravo.acme.mesh.".into(),
                user: 9,
                key: NodePublic([7; 32]),
                tags: vec!["tag:web".into()],
                addresses: vec!["100.64.0.2/32".into(), "fd7a:115c:a1e0::2/128".into()],
                hostinfo: Hostinfo { os: "linux".into(), ..Default::default() },
                ..Default::default()
            },
        );
        nm.users.insert(9, UserProfile { id: 9, login_name: "acme".into(), ..Default::default() });
        nm
    }

    #[test]
    fn names_the_peer_behind_an_address() {
        let nm = netmap();
        let w = lookup(&nm, "100.64.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            (w.name.as_str(), w.fqdn.as_str(), w.org.as_str(), w.os.as_str()),
            ("bravo", "bravo.acme.mesh", "acme", "linux")
        );
        assert_eq!(w.tags, vec!["tag:web"]);
        assert_eq!(w.node_key, NodePublic([7; 32]).to_string());
        assert!(!w.is_self);
        assert_eq!(lookup(&nm, "fd7a:115c:a1e0::2".parse().unwrap()).unwrap().name, "bravo");
        assert_eq!(lookup(&nm, "::ffff:100.64.0.2".parse().unwrap()).unwrap().name, "bravo");
        assert!(lookup(&nm, "100.64.0.1".parse().unwrap()).unwrap().is_self);
        assert_eq!(lookup(&nm, "100.64.0.3".parse().unwrap()), None);
    }

    #[test]
    fn parses_addresses_with_or_without_ports() {
        let v4: IpAddr = "100.64.0.2".parse().unwrap();
        let v6: IpAddr = "fd7a:115c:a1e0::2".parse().unwrap();
        assert_eq!(parse_addr("100.64.0.2"), Some(v4));
        assert_eq!(parse_addr("100.64.0.2:22"), Some(v4));
        assert_eq!(parse_addr("fd7a:115c:a1e0::2"), Some(v6));
        assert_eq!(parse_addr("[fd7a:115c:a1e0::2]:443"), Some(v6));
        assert_eq!(parse_addr("[fd7a:115c:a1e0::2]"), Some(v6));
        for bad in ["", "bravo", "100.64.0.2:", "100.64.0.2:x", "[100.64.0.2"] {
            assert_eq!(parse_addr(bad), None, "{bad}");
        }
    }
}
