//! The table of open stream connections, by id and by peer address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use careflow_core::Transport;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Identifies one stream connection for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// What a connection's writer sends.
#[derive(Debug)]
pub(crate) enum Wire {
    /// A SIP message (framed for WebSocket by the writer).
    Sip(Bytes),
    /// Bytes that go out as they are (CRLF pong, WebSocket control frames).
    Raw(Bytes),
    /// Last bytes, then the connection is shut down.
    Close(Bytes),
}

impl Wire {
    pub(crate) fn into_bytes(self) -> Bytes {
        match self {
            Self::Sip(b) | Self::Raw(b) | Self::Close(b) => b,
        }
    }
}

#[derive(Debug)]
struct Entry {
    peer: SocketAddr,
    transport: Transport,
    tx: mpsc::Sender<Wire>,
    /// Cancelled to close the connection from outside its own tasks (a peer that stopped
    /// reading).
    close: CancellationToken,
}

/// A connection's writer, and how to close the connection.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    pub(crate) tx: mpsc::Sender<Wire>,
    pub(crate) close: CancellationToken,
    pub(crate) peer: SocketAddr,
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
    pub(crate) fn insert(
        &self,
        id: ConnId,
        peer: SocketAddr,
        transport: Transport,
        tx: mpsc::Sender<Wire>,
        close: CancellationToken,
    ) {
        if let Ok(mut t) = self.inner.lock() {
            t.by_id.insert(
                id,
                Entry {
                    peer,
                    transport,
                    tx,
                    close,
                },
            );
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

    /// Whether the connection is still open.
    pub(crate) fn is_open(&self, id: ConnId) -> bool {
        self.inner
            .lock()
            .map(|t| t.by_id.contains_key(&id))
            .unwrap_or(false)
    }

    /// The writer of a connection: by id first, else the connection of that transport to
    /// `peer`.
    pub(crate) fn writer(
        &self,
        id: Option<ConnId>,
        peer: SocketAddr,
        transport: Transport,
    ) -> Option<Writer> {
        let t = self.inner.lock().ok()?;
        let writer = |e: &Entry| Writer {
            tx: e.tx.clone(),
            close: e.close.clone(),
            peer: e.peer,
        };
        if let Some(e) = id.and_then(|id| t.by_id.get(&id)) {
            return Some(writer(e));
        }
        let id = t.by_peer.get(&peer)?;
        t.by_id
            .get(id)
            .filter(|e| e.transport == transport)
            .map(writer)
    }
}
