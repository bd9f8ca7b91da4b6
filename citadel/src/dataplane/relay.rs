//! The data plane's DERP connections: one reconnecting [`DerpConn`] per region in use (the home
//! region, marked preferred, and the home regions of peers). Each connection's reader hands
//! relayed packets and its up/down straight to the driver's inbox ([`Inbound`], tagged with
//! the region), one queue from the socket to the core; a writer task per region waits for the
//! connection, so packets sent while it is still coming up are not lost. No policy here:
//! which regions to use and which is home is decided by [`crate::magicsock`].

use crate::derphttp::{DerpConn, DerpConnOptions, Inbound};
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
    inbox: mpsc::Sender<Inbound>,
}

impl Relays {
    pub(crate) fn new(net: Arc<dyn Net>, key: PrivateKey, inbox: mpsc::Sender<Inbound>) -> Self {
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

    /// A new DERP map: connections to regions that vanished or whose node changed are closed.
    /// Returns the regions closed.
    pub(crate) fn set_map(&mut self, map: &DerpMap) -> Vec<i32> {
        if &self.map == map {
            return Vec::new();
        }
        self.map = map.clone();
        let keep: Vec<i32> = self
            .regions
            .iter()
            .filter(|(id, r)| first_node(&self.map, **id).is_some_and(|n| n == r.node))
            .map(|(id, _)| *id)
            .collect();
        let closed: Vec<i32> = self.regions.keys().filter(|id| !keep.contains(id)).copied().collect();
        self.regions.retain(|id, _| keep.contains(id));
        if !self.map.regions.contains_key(&self.home) {
            self.home = 0;
        }
        closed
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
        let conn = Arc::new(DerpConn::with_inbox(
            Arc::clone(&self.net),
            node.clone(),
            self.key.clone(),
            opts,
            self.inbox.clone(),
            region,
        ));
        let (tx, mut rx) = mpsc::channel::<(NodePublic, Vec<u8>)>(WRITE_QUEUE);
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
        self.regions.insert(region, Region { conn, tx, node, tasks: vec![writer] });
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
}

/// The node of `region` to dial: the first that is not STUN-only.
fn first_node(map: &DerpMap, region: i32) -> Option<DerpNode> {
    map.regions.get(&region)?.nodes.iter().find(|n| !n.stun_only).cloned()
}
