//! The data plane's DERP connections: one reconnecting [`DerpConn`] per region in use (the home
//! region, marked preferred, and the home regions of peers), each with a reader task that
//! forwards relayed packets to the driver and a writer task that waits for the connection, so
//! packets sent while it is still coming up are not lost.

use crate::derphttp::{DerpConn, DerpConnOptions, Received};
use crate::keys::{NodePublic, PrivateKey};
use crate::net::Net;
use crate::tailcfg::{DerpMap, DerpNode};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Packets queued per region while its connection is busy or coming up; beyond this they are
/// dropped (they are datagrams; WireGuard and disco retry).
const WRITE_QUEUE: usize = 512;
/// How long the writer waits for a connection before dropping what it holds.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// A packet that arrived over DERP.
#[derive(Debug)]
pub(crate) struct Relayed {
    pub region: i32,
    pub src: NodePublic,
    pub packet: Vec<u8>,
}

struct Region {
    conn: Arc<DerpConn>,
    tx: mpsc::Sender<(NodePublic, Vec<u8>)>,
    node: DerpNode,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Region {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// All DERP connections of one node.
pub(crate) struct Relays {
    net: Arc<dyn Net>,
    key: PrivateKey,
    map: DerpMap,
    home: i32,
    regions: BTreeMap<i32, Region>,
    inbox: mpsc::Sender<Relayed>,
}

impl Relays {
    pub(crate) fn new(net: Arc<dyn Net>, key: PrivateKey, inbox: mpsc::Sender<Relayed>) -> Self {
        Relays { net, key, map: DerpMap::default(), home: 0, regions: BTreeMap::new(), inbox }
    }

    /// A renewed node key: every open DERP connection logs in again with it.
    pub(crate) fn set_key(&mut self, key: PrivateKey) {
        self.key = key;
        let open: Vec<i32> = self.regions.keys().copied().collect();
        self.regions.clear();
        for id in open {
            self.ensure(id);
        }
    }

    /// Whether any region is known.
    pub(crate) fn available(&self) -> bool {
        !self.map.regions.is_empty()
    }

    pub(crate) fn home(&self) -> i32 {
        self.home
    }

    /// A new DERP map: connections to regions that vanished or whose node changed are closed.
    pub(crate) fn set_map(&mut self, map: &DerpMap) {
        if &self.map == map {
            return;
        }
        self.map = map.clone();
        let keep: Vec<i32> = self
            .regions
            .iter()
            .filter(|(id, r)| first_node(&self.map, **id).is_some_and(|n| n == r.node))
            .map(|(id, _)| *id)
            .collect();
        self.regions.retain(|id, _| keep.contains(id));
        if !self.map.regions.contains_key(&self.home) {
            self.home = 0;
        }
    }

    /// Makes `region` the home region (NotePreferred on its connection).
    pub(crate) fn set_home(&mut self, region: i32) {
        if region == self.home {
            return;
        }
        let old = self.home;
        self.home = region;
        tracing::info!(region, "home DERP region");
        for (id, pref) in [(old, false), (region, true)] {
            if id == 0 {
                continue;
            }
            self.ensure(id);
            if let Some(r) = self.regions.get(&id) {
                let conn = Arc::clone(&r.conn);
                tokio::spawn(async move {
                    let _ = conn.set_preferred(pref).await;
                });
            }
        }
    }

    /// Connects to `region` unless already connected (or it is not in the map).
    pub(crate) fn ensure(&mut self, region: i32) {
        if region <= 0 || self.regions.contains_key(&region) {
            return;
        }
        let Some(node) = first_node(&self.map, region) else { return };
        let opts = DerpConnOptions { preferred: region == self.home, ..Default::default() };
        let conn = Arc::new(DerpConn::new(Arc::clone(&self.net), node.clone(), self.key.clone(), opts));
        let (tx, mut rx) = mpsc::channel::<(NodePublic, Vec<u8>)>(WRITE_QUEUE);
        let reader = {
            let conn = Arc::clone(&conn);
            let inbox = self.inbox.clone();
            tokio::spawn(async move {
                loop {
                    match conn.recv().await {
                        Ok(Received::Packet { src, packet }) => {
                            if inbox.send(Relayed { region, src, packet }).await.is_err() {
                                return;
                            }
                        }
                        Ok(Received::PeerGone { peer, reason }) => {
                            tracing::debug!(region, peer = %peer.short(), ?reason, "DERP peer gone")
                        }
                        Ok(Received::Health { problem }) if !problem.is_empty() => {
                            tracing::warn!(region, %problem, "DERP server reports a problem")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(region, error = %e, "DERP reader ended");
                            return;
                        }
                    }
                }
            })
        };
        let writer = {
            let conn = Arc::clone(&conn);
            tokio::spawn(async move {
                while let Some((dst, packet)) = rx.recv().await {
                    if !conn.is_connected() && !conn.wait_connected(CONNECT_WAIT).await {
                        continue;
                    }
                    if let Err(e) = conn.send(dst, &packet).await {
                        tracing::trace!(region, error = %e, "DERP send failed");
                    }
                }
            })
        };
        tracing::debug!(region, node = %node.name, "connecting to DERP");
        self.regions.insert(region, Region { conn, tx, node, tasks: vec![reader, writer] });
    }

    /// Queues `packet` for `dst` through `region`. False when it cannot be queued.
    pub(crate) fn send(&mut self, region: i32, dst: NodePublic, packet: Vec<u8>) -> bool {
        self.ensure(region);
        match self.regions.get(&region) {
            Some(r) => r.tx.try_send((dst, packet)).is_ok(),
            None => false,
        }
    }

    /// DERP logins beyond each connection's first, over the connections open now.
    pub(crate) fn reconnects(&self) -> u64 {
        self.regions.values().map(|r| r.conn.logins().saturating_sub(1)).sum()
    }

    /// Regions with a live connection.
    pub(crate) fn connected(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.regions.iter().filter(|(_, r)| r.conn.is_connected()).map(|(id, _)| *id).collect();
        v.sort_unstable();
        v
    }
}

/// The node of `region` to dial: the first that is not STUN-only.
fn first_node(map: &DerpMap, region: i32) -> Option<DerpNode> {
    map.regions.get(&region)?.nodes.iter().find(|n| !n.stun_only).cloned()
}
