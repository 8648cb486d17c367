//! The table of open stream connections, by id and by peer address.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use careflow_core::Transport;
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;

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
    tx: Outbox,
    /// Cancelled to close the connection from outside its own tasks (a peer that stopped
    /// reading).
    close: CancellationToken,
}

/// A connection's writer, and how to close the connection.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    pub(crate) tx: Outbox,
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
        tx: Outbox,
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
    pub(crate) fn is_open(&self, id: ConnId, peer: SocketAddr) -> bool {
        self.inner
            .lock()
            .map(|t| t.by_id.get(&id).is_some_and(|e| e.peer == peer))
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
        // A connection id names a connection only together with its peer: an id from a
        // token of before a restart may have been given to another peer's connection since.
        if let Some(e) = id
            .and_then(|id| t.by_id.get(&id))
            .filter(|e| e.peer == peer)
        {
            return Some(writer(e));
        }
        let id = t.by_peer.get(&peer)?;
        t.by_id
            .get(id)
            .filter(|e| e.transport == transport)
            .map(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_id_finds_its_connection_only_with_its_peer() {
        let table = ConnTable::default();
        let (tx, _rx) = crate::outbox::outbox(1);
        let phone: SocketAddr = "198.51.100.7:40001".parse().expect("addr");
        let other: SocketAddr = "198.51.100.8:40002".parse().expect("addr");
        // After a restart, id 5 went to another peer's connection.
        table.insert(
            ConnId(5),
            other,
            Transport::Wss,
            tx,
            CancellationToken::new(),
        );
        assert!(table.is_open(ConnId(5), other));
        assert!(
            !table.is_open(ConnId(5), phone),
            "an old token's id is not that phone"
        );
        assert!(
            table
                .writer(Some(ConnId(5)), phone, Transport::Wss)
                .is_none()
        );
        let w = table
            .writer(Some(ConnId(5)), other, Transport::Wss)
            .expect("writer");
        assert_eq!(w.peer, other);
    }
}
