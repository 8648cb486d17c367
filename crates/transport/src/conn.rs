//! The table of open stream connections, by id and by peer address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Identifies one stream connection for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

#[derive(Debug)]
struct Entry {
    peer: SocketAddr,
    tx: mpsc::Sender<Bytes>,
}

#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    inner: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    by_id: HashMap<ConnId, Entry>,
    by_peer: HashMap<SocketAddr, ConnId>,
}

impl ConnTable {
    pub(crate) fn insert(&self, id: ConnId, peer: SocketAddr, tx: mpsc::Sender<Bytes>) {
        if let Ok(mut t) = self.inner.lock() {
            t.by_id.insert(id, Entry { peer, tx });
            t.by_peer.insert(peer, id);
        }
    }

    pub(crate) fn remove(&self, id: ConnId) {
        if let Ok(mut t) = self.inner.lock()
            && let Some(e) = t.by_id.remove(&id)
            && t.by_peer.get(&e.peer) == Some(&id)
        {
            t.by_peer.remove(&e.peer);
        }
    }

    /// The writer of a connection: by id first, else any connection to `peer`.
    pub(crate) fn writer(
        &self,
        id: Option<ConnId>,
        peer: SocketAddr,
    ) -> Option<mpsc::Sender<Bytes>> {
        let t = self.inner.lock().ok()?;
        if let Some(e) = id.and_then(|id| t.by_id.get(&id)) {
            return Some(e.tx.clone());
        }
        let id = t.by_peer.get(&peer)?;
        t.by_id.get(id).map(|e| e.tx.clone())
    }
}
