//! The control connection after a network change: when the path under it dies silently (a
//! NAT forgets the flow: no reset, no answer) and the data plane's home DERP connection
//! breaks with it, the node probes its control connection at once and reconnects, instead of
//! waiting for the next endpoint write or HTTP/2 keep-alive (25 s + 10 s).

use citadel::mesh::{Config, Mesh};
use citadel_e2e::{eventually, Nexus};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a forwarded connection does from now on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fate {
    Pass,
    /// Stop carrying bytes either way and keep both sockets open: a dead path.
    Blackhole,
    /// Close both sides.
    Close,
}

/// A loopback TCP forwarder whose existing connections can be blackholed or closed; new
/// connections always pass.
struct Forwarder {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<watch::Sender<Fate>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> Forwarder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<watch::Sender<Fate>>>> = Arc::default();
        let list = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((a, _)) = l.accept().await {
                let Ok(b) = TcpStream::connect(to).await else { continue };
                let (tx, rx) = watch::channel(Fate::Pass);
                list.lock().unwrap().push(tx);
                tokio::spawn(carry(a, b, rx));
            }
        });
        Forwarder { addr, conns, task }
    }

    fn doom(&self, fate: Fate) {
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.send(fate);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        self.doom(Fate::Close);
    }
}

async fn carry(a: TcpStream, b: TcpStream, mut fate: watch::Receiver<Fate>) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let (mut x, mut y) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        tokio::select! {
            r = ar.read(&mut x) => match r {
                Ok(n) if n > 0 => if bw.write_all(&x[..n]).await.is_err() { return },
                _ => return,
            },
            r = br.read(&mut y) => match r {
                Ok(n) if n > 0 => if aw.write_all(&y[..n]).await.is_err() { return },
                _ => return,
            },
            r = fate.changed() => {
                let now = *fate.borrow();
                match (r, now) {
                    (Ok(()), Fate::Blackhole) => {
                        // Hold the sockets open until the forwarder goes; carry nothing.
                        let _ = fate.wait_for(|f| *f == Fate::Close).await;
                        return;
                    }
                    (Ok(()), Fate::Pass) => {}
                    _ => return,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_control_connection_is_replaced_within_seconds_of_a_derp_break() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // A DERP relay of its own (any node key welcome), reached through one forwarder; the
    // control server hands out a map naming that forwarder and is reached through another.
    let relay = Nexus::start_with(nexus_sim::Config { derp_verify_clients: false, ..Default::default() }).await;
    let derp_fwd = Forwarder::start(relay.running.addr).await;
    let map = nexus_sim::embedded_derp_map("127.0.0.1", &[(1, derp_fwd.addr)], relay.running.stun.map(|s| s.port()));
    let nx =
        Nexus::start_with(nexus_sim::Config { derp: nexus_sim::DerpMode::External(map), ..Default::default() }).await;
    let ctl_fwd = Forwarder::start(nx.running.addr).await;
    let key = nx.key("acme", true);
    let dir = tempfile::tempdir().unwrap();

    let mut c = Config::new(Some(format!("https://{}", ctl_fwd.addr)), Some(key.clone()), dir.path().join("a"));
    c.hostname = Some("a".into());
    c.timeout = Duration::from_secs(10);
    let a = Mesh::connect(c).await.unwrap();
    let ni = a.data_plane().unwrap().net_info();
    let home_up = || {
        let n = ni.borrow();
        n.preferred_derp != 0 && n.derp_connected.contains(&n.preferred_derp)
    };
    assert!(
        eventually(Duration::from_secs(15), home_up).await,
        "the home DERP connection never came up: {:?}",
        *ni.borrow()
    );
    let before = a.control_reconnects();

    // The path dies: the control flow goes silent, the DERP flow is cut (as a write on a
    // NAT-forgotten flow gets reset). New connections get through.
    ctl_fwd.doom(Fate::Blackhole);
    derp_fwd.doom(Fate::Close);
    let cut = Instant::now();

    // A peer joins meanwhile; only a live control stream brings it to `a`.
    let mut c = Config::new(Some(nx.url()), Some(key), dir.path().join("b"));
    c.hostname = Some("b".into());
    c.data_plane = false;
    let _b = Mesh::connect(c).await.unwrap();
    let sees_b = || a.status().peers.iter().any(|p| p.name == "b");
    assert!(
        eventually(Duration::from_secs(15), sees_b).await,
        "a did not see b within 15 s of the cut (HTTP/2 keep-alive alone takes 35 s); reconnects {}",
        a.control_reconnects() - before
    );
    assert!(a.control_reconnects() > before, "b arrived without a reconnect: the cut did not kill the stream");
    eprintln!("reconnected and saw the new peer {:?} after the cut", cut.elapsed());
}
