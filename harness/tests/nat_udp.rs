//! The NAT layer on turmoil with raw UDP endpoints (no citadel): mappings seen from outside,
//! filtering, hairpinning, CGNAT chains and mapping expiry, through the real plumbing.

use citadel::net::Net;
use harness::nat::{Filtering, Mapping, Nat, NatConfig, PortAlloc};
use harness::nat_host::{self, NatBox};
use harness::net::{TurmoilNet, Uplink};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn sim() -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(1)
        .simulation_duration(Duration::from_secs(600))
        .min_message_latency(Duration::from_millis(5))
        .max_message_latency(Duration::from_millis(5))
        .build()
}

/// An echo server that answers with the source address it saw.
async fn observer(port: u16) -> turmoil::Result {
    let s = TurmoilNet::public().bind_udp(SocketAddr::new([0, 0, 0, 0].into(), port)).await?;
    let mut buf = [0u8; 1500];
    loop {
        let (_, from) = s.recv_from(&mut buf).await?;
        s.send_to(from.to_string().as_bytes(), from).await?;
    }
}

fn add_nat(sim: &mut turmoil::Sim<'static>, name: &str, cfg: NatConfig, uplink: Uplink) -> Arc<NatBox> {
    let ip = sim.lookup(name);
    let nb = NatBox::new(Nat::new(cfg, ip, 9));
    let (n2, net) = (nb.clone(), TurmoilNet { uplink, ip: None });
    sim.host(name, move || nat_host::run(n2.clone(), net.clone()));
    nb
}

fn lan(ips: &[IpAddr]) -> Arc<BTreeSet<IpAddr>> {
    Arc::new(ips.iter().copied().collect())
}

#[test]
fn mapping_as_seen_from_outside() {
    for (mapping, same_for_other_ip, same_for_other_port) in [
        (Mapping::EndpointIndependent, true, true),
        (Mapping::AddressDependent, false, true),
        (Mapping::AddressAndPortDependent, false, false),
    ] {
        let mut sim = sim();
        sim.host("obs1", || async {
            tokio::try_join!(observer(1000), observer(2000))?;
            Ok(())
        });
        sim.host("obs2", || observer(1000));
        let nat_ip = sim.lookup("nat");
        let inner_ip = sim.lookup("inner");
        let cfg = NatConfig { mapping, filtering: Filtering::EndpointIndependent, ..Default::default() };
        add_nat(&mut sim, "nat", cfg, Uplink::Public);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        sim.client("inner", async move {
            let net = TurmoilNet { uplink: Uplink::Nat { nat: nat_ip, lan: lan(&[inner_ip]) }, ip: None };
            let s = net.bind_udp("0.0.0.0:5000".parse()?).await?;
            let mut buf = [0u8; 100];
            for (host, port) in [("obs1", 1000), ("obs1", 2000), ("obs2", 1000)] {
                let dst = SocketAddr::new(turmoil::lookup(host), port);
                s.send_to(b"?", dst).await?;
                let (n, from) = s.recv_from(&mut buf).await?;
                assert_eq!(from, dst, "the inside host sees the real source");
                s2.lock().unwrap().push(std::str::from_utf8(&buf[..n])?.parse::<SocketAddr>()?);
            }
            Ok(())
        });
        sim.run().unwrap();
        let v = seen.lock().unwrap().clone();
        assert!(v.iter().all(|a| a.ip() == nat_ip), "{v:?}");
        assert_eq!(v[0] == v[1], same_for_other_port, "{mapping:?} {v:?}");
        assert_eq!(v[0] == v[2], same_for_other_ip, "{mapping:?} {v:?}");
    }
}

#[test]
fn filtering_admits_as_configured_and_mappings_expire() {
    for (filtering, want) in [
        (Filtering::EndpointIndependent, [true, true, true]),
        (Filtering::AddressDependent, [true, true, false]),
        (Filtering::AddressAndPortDependent, [true, false, false]),
    ] {
        let mut sim = sim();
        let nat_ip = sim.lookup("nat");
        let inner_ip = sim.lookup("inner");
        let got = Arc::new(Mutex::new(Vec::new()));
        // obs1:1000 is contacted; obs1:2000 (same IP) and obs2:1000 then send unsolicited.
        let mapped: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let m1 = mapped.clone();
        sim.host("obs1", move || {
            let m1 = m1.clone();
            async move {
                let a = TurmoilNet::public().bind_udp("0.0.0.0:1000".parse()?).await?;
                let b = TurmoilNet::public().bind_udp("0.0.0.0:2000".parse()?).await?;
                let mut buf = [0u8; 100];
                let (_, from) = a.recv_from(&mut buf).await?;
                *m1.lock().unwrap() = Some(from);
                a.send_to(b"from-contacted", from).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.send_to(b"from-same-ip", from).await?;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        let m2 = mapped.clone();
        sim.host("obs2", move || {
            let m2 = m2.clone();
            async move {
                let s = TurmoilNet::public().bind_udp("0.0.0.0:1000".parse()?).await?;
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let to = *m2.lock().unwrap();
                    if let Some(to) = to {
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        s.send_to(b"from-other", to).await?;
                        break;
                    }
                }
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        let cfg = NatConfig { filtering, timeout: Duration::from_secs(30), ..Default::default() };
        let nb = add_nat(&mut sim, "nat", cfg, Uplink::Public);
        let g2 = got.clone();
        let end_at: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::default();
        let e2 = end_at.clone();
        sim.client("inner", async move {
            let net = TurmoilNet { uplink: Uplink::Nat { nat: nat_ip, lan: lan(&[inner_ip]) }, ip: None };
            let s = net.bind_udp("0.0.0.0:5000".parse()?).await?;
            s.send_to(b"hi", SocketAddr::new(turmoil::lookup("obs1"), 1000)).await?;
            let mut buf = [0u8; 100];
            let deadline = tokio::time::sleep(Duration::from_secs(2));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    r = s.recv_from(&mut buf) => {
                        let (n, _) = r?;
                        g2.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).to_string());
                    }
                }
            }
            *e2.lock().unwrap() = Some(tokio::time::Instant::now());
            Ok(())
        });
        sim.run().unwrap();
        let got = got.lock().unwrap().clone();
        let have = ["from-contacted", "from-same-ip", "from-other"].map(|m| got.iter().any(|g| g == m));
        assert_eq!(have, want, "{filtering:?}: {got:?}");
        let t0 = end_at.lock().unwrap().expect("client ran to the end");
        let mut nat = nb.nat.lock().unwrap();
        assert_eq!(nat.mappings(t0), 1);
        // Mappings expire after the idle timeout.
        assert_eq!(nat.mappings(t0 + Duration::from_secs(31)), 0);
    }
}

/// Two homes behind one carrier NAT reach each other through the carrier's public address
/// only when the carrier hairpins.
#[test]
fn cgnat_chain_and_hairpinning() {
    for hairpin in [false, true] {
        let mut sim = sim();
        let carrier = sim.lookup("carrier");
        let (h1, h2) = (sim.lookup("home1"), sim.lookup("home2"));
        let (n1, n2) = (sim.lookup("n1"), sim.lookup("n2"));
        sim.host("stun", || observer(3478));
        let eif = |hairpin| NatConfig {
            filtering: Filtering::EndpointIndependent,
            hairpin,
            ports: PortAlloc::Preserve,
            ..Default::default()
        };
        add_nat(&mut sim, "carrier", eif(hairpin), Uplink::Public);
        let up = Uplink::Nat { nat: carrier, lan: lan(&[h1, h2]) };
        add_nat(&mut sim, "home1", eif(false), up.clone());
        add_nat(&mut sim, "home2", eif(false), up);
        let eps: Arc<Mutex<Vec<(u8, SocketAddr)>>> = Arc::default();
        let got = Arc::new(Mutex::new(false));
        for (id, home, me) in [(1u8, h1, n1), (2u8, h2, n2)] {
            let (eps, got) = (eps.clone(), got.clone());
            sim.client(if id == 1 { "n1" } else { "n2" }, async move {
                let net = TurmoilNet { uplink: Uplink::Nat { nat: home, lan: lan(&[me]) }, ip: None };
                let s = net.bind_udp("0.0.0.0:41641".parse()?).await?;
                let stun = SocketAddr::new(turmoil::lookup("stun"), 3478);
                s.send_to(b"?", stun).await?;
                let mut buf = [0u8; 100];
                let (n, _) = s.recv_from(&mut buf).await?;
                let mine: SocketAddr = std::str::from_utf8(&buf[..n])?.parse()?;
                assert_eq!(mine.ip(), carrier, "the outside sees the carrier's address");
                eps.lock().unwrap().push((id, mine));
                let peer = loop {
                    let p = eps.lock().unwrap().iter().find(|(i, _)| *i != id).map(|(_, a)| *a);
                    match p {
                        Some(p) => break p,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                };
                let end = tokio::time::Instant::now() + Duration::from_secs(3);
                while tokio::time::Instant::now() < end {
                    s.send_to(b"punch", peer).await?;
                    if let Ok(Ok((n, from))) =
                        tokio::time::timeout(Duration::from_millis(200), s.recv_from(&mut buf)).await
                    {
                        if &buf[..n] == b"punch" {
                            assert_eq!(from, peer, "the hairpinned source is the peer's public mapping");
                            *got.lock().unwrap() = true;
                        }
                    }
                }
                Ok(())
            });
        }
        sim.run().unwrap();
        assert_eq!(*got.lock().unwrap(), hairpin, "hairpin {hairpin}");
    }
}
