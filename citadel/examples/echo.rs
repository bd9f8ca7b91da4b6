//! Two data planes in one process: an echo server on one, a client on the other, talking over
//! WireGuard through userspace TCP/IP on loopback. Netmaps are built by hand; in a real node
//! they come from the control server.
//!
//! ```text
//! cargo run -p citadel --example echo
//! ```

use citadel::dataplane::{DataPlane, DataPlaneConfig};
use citadel::keys::{NodePublic, PrivateKey};
use citadel::netmap::NetMap;
use citadel::tailcfg::{FilterRule, NetPortRange, Node, PortRange};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn node(id: i64, key: &PrivateKey, endpoint: Option<SocketAddr>) -> Node {
    let ip = format!("100.64.0.{id}");
    Node {
        id,
        name: format!("node{id}.example."),
        key: NodePublic(key.public_bytes()),
        addresses: vec![format!("{ip}/32")],
        allowed_ips: vec![format!("{ip}/32")],
        endpoints: endpoint.into_iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    }
}

/// The netmap `me` would get: itself, one peer, and a filter letting that peer in.
fn netmap(me: &Node, peer: Node) -> NetMap {
    let filter = FilterRule {
        src_ips: peer.addresses.clone(),
        dst_ports: vec![NetPortRange { ip: "*".into(), ports: PortRange { first: 0, last: 65535 } }],
        ip_proto: vec![],
    };
    let mut nm = NetMap { self_node: me.clone(), packet_filter: vec![filter], ..Default::default() };
    nm.peers.insert(peer.id, peer);
    nm
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut rng = rand::thread_rng();
    let (key_a, key_b) = (PrivateKey::generate(&mut rng), PrivateKey::generate(&mut rng));
    let cfg = |key: &PrivateKey| DataPlaneConfig {
        node_key: key.clone(),
        disco_key: PrivateKey::generate(&mut rand::thread_rng()),
        bind: "127.0.0.1:0".parse().expect("constant"),
    };

    // Start both planes first: each netmap needs the other's UDP endpoint.
    let (tx_a, rx_a) = watch::channel(NetMap::default());
    let (tx_b, rx_b) = watch::channel(NetMap::default());
    let a = DataPlane::start(cfg(&key_a), rx_a)?;
    let b = DataPlane::start(cfg(&key_b), rx_b)?;
    let (node_a, node_b) = (node(1, &key_a, Some(a.local_addr())), node(2, &key_b, Some(b.local_addr())));
    tx_a.send_replace(netmap(&node_a, node_b.clone()));
    tx_b.send_replace(netmap(&node_b, node_a));
    println!("node A: udp {} endpoints {:?}", a.local_addr(), a.local_endpoints());
    println!("node B: udp {} endpoints {:?}", b.local_addr(), b.local_endpoints());

    // Echo server on B's mesh address 100.64.0.2:7.
    let listener = b.listen_tcp(7)?;
    tokio::spawn(async move {
        while let Ok((mut s, from)) = listener.accept().await {
            println!("B: connection from {from}");
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    // The netmap is applied by the driver task; give it a moment before dialing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut s = a.dial_tcp("100.64.0.2:7".parse()?).await?;
    println!("A: connected {} -> {}", s.local_addr(), s.peer_addr());
    for msg in ["hello", "from", "the mesh"] {
        s.write_all(msg.as_bytes()).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        println!("A: sent {msg:?}, got back {:?}", String::from_utf8_lossy(&back));
    }
    for p in a.peer_stats() {
        println!("A's peer {}: path {:?}, rx {} B, tx {} B", p.node_key.short(), p.path, p.rx_bytes, p.tx_bytes);
    }
    Ok(())
}
