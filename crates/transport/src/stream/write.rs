//! The sending side of connections: each connection's writer task, queueing a message for a
//! connection without waiting (a peer that does not read is disconnected), and dialling a
//! connection of ours when a message has none.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use careflow_proto::websocket;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Conn, HANDSHAKE_TIMEOUT};
use crate::conn::Wire;
use crate::outbox::{NotQueued, Outbox, OutboxReader, outbox};
use crate::{Outbound, Transport, TransportError, TransportStats, Transports, next_conn_id};

/// Messages queued for one connection. A peer this far behind is not reading: it is
/// disconnected rather than parking senders (a phone that never reads must not hold memory or
/// tasks of ours).
pub(super) const QUEUE: usize = 256;
/// A write that cannot complete this long (the peer's window stays shut) closes the
/// connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn write_loop<W>(
    stats: Arc<TransportStats>,
    mut wr: W,
    mut rx: OutboxReader,
    ws: bool,
    close: tokio_util::sync::CancellationToken,
    peer: SocketAddr,
) where
    W: AsyncWrite + Unpin,
{
    loop {
        let item = tokio::select! {
            _ = close.cancelled() => break,
            i = rx.recv() => i,
        };
        let Some(item) = item else { break };
        let (mut bytes, mut last) = wire_bytes(item, ws);
        // What else is already queued goes in the same write: a reader hands over every
        // request a segment carried before the writer runs (a phone's REGISTER and its
        // retry, a burst over one trunk), and one write per response cost one TCP segment
        // and one wake-up of the peer each.
        let mut joined: Option<BytesMut> = None;
        while !last && joined.as_ref().map_or(bytes.len(), BytesMut::len) < JOIN_MAX {
            let Some(next) = rx.try_recv() else { break };
            let (more, end) = wire_bytes(next, ws);
            joined
                .get_or_insert_with(|| BytesMut::from(&bytes[..]))
                .extend_from_slice(&more);
            last = end;
        }
        if let Some(j) = joined {
            bytes = j.freeze();
        }
        // The flush matters for TLS: a record the socket could not take whole at once waits in
        // the TLS stream until the next write or flush.
        let written = async {
            wr.write_all(&bytes).await?;
            wr.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, written).await {
            Ok(Ok(())) if !last => {}
            Ok(Ok(())) => break,
            Ok(Err(_)) => {
                close.cancel();
                return;
            }
            Err(_) => {
                stats.stalled_closed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, timeout_s = WRITE_TIMEOUT.as_secs(),
                    "closing connection: the peer does not read");
                close.cancel();
                return;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
}

/// The bytes a queued item puts on the wire, and whether the connection closes after them.
fn wire_bytes(item: Wire, ws: bool) -> (Bytes, bool) {
    match item {
        Wire::Sip(b) if ws => (websocket::encode_message(&b), false),
        Wire::Sip(b) | Wire::Raw(b) => (b, false),
        Wire::Close(b) => (b, true),
    }
}

/// Once this many bytes are gathered for one write, no more queued messages join it (a
/// message is never split).
const JOIN_MAX: usize = 64 * 1024;

pub(crate) fn try_send(t: &Transports, out: Outbound) -> Option<Outbound> {
    let Some(w) = t.inner.conns.writer(out.conn, out.dest, out.transport) else {
        return Some(out);
    };
    match enqueue(t, &w, out.bytes) {
        Queued::Yes | Queued::Stalled => None,
        Queued::Closed(bytes) => Some(Outbound { bytes, ..out }),
    }
}

/// What became of a message given to a connection's writer.
enum Queued {
    Yes,
    /// The peer had `QUEUE` messages unread: it is being disconnected, the message dropped.
    Stalled,
    /// The connection is gone; the message is given back.
    Closed(Bytes),
}

/// Queues a message behind what the connection has queued, never waiting: a peer that does
/// not read is disconnected instead.
fn enqueue(t: &Transports, w: &crate::conn::Writer, bytes: Bytes) -> Queued {
    match w.tx.try_send(Wire::Sip(bytes)) {
        Ok(()) => Queued::Yes,
        Err(NotQueued::Closed(w)) => Queued::Closed(w.into_bytes()),
        Err(NotQueued::Full) => {
            t.inner.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
            if !w.close.is_cancelled() {
                t.inner.stats.stalled_closed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %w.peer, queued = QUEUE,
                    "closing connection: the peer does not read");
                w.close.cancel();
            }
            Queued::Stalled
        }
    }
}

pub(crate) async fn send(t: &Transports, out: Outbound) -> Result<(), TransportError> {
    let closed = || TransportError::Send {
        dest: out.dest,
        source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed"),
    };
    let tx = match t.inner.conns.writer(out.conn, out.dest, out.transport) {
        Some(w) => {
            return match enqueue(t, &w, out.bytes) {
                Queued::Yes => Ok(()),
                Queued::Stalled | Queued::Closed(_) => Err(closed()),
            };
        }
        // TCP and TLS dial out; WebSocket clients are reached over the connection they opened.
        None if matches!(out.transport, Transport::Tcp | Transport::Tls) => {
            let from = out
                .local
                .map(|l| l.ip())
                .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == out.dest.is_ipv4());
            connect(t, out.dest, out.transport, from).await?
        }
        None => return Err(closed()),
    };
    // The connection was just opened: its queue is empty.
    tx.try_send(Wire::Sip(out.bytes)).map_err(|_| closed())
}

/// Dials `dest`, from the address `from` when given: the connection then leaves by the
/// interface our Via and Record-Route name (on a host with several, the kernel's choice may
/// differ, and a cluster peer recognises us by address).
async fn connect(
    t: &Transports,
    dest: SocketAddr,
    transport: Transport,
    from: Option<std::net::IpAddr>,
) -> Result<Outbox, TransportError> {
    let err = |source| TransportError::Send { dest, source };
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    let dial = async {
        match from {
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(dest).await
            }
            None => TcpStream::connect(dest).await,
        }
    };
    let stream = tokio::time::timeout(Duration::from_secs(5), dial)
        .await
        .map_err(|_| err(timed_out()))?
        .map_err(err)?;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().map_err(err)?;
    if transport == Transport::Tcp {
        return Ok(serve_outgoing(t, stream, dest, local, transport));
    }
    let Some(client) = t.inner.opts.tls_client.as_ref() else {
        return Err(TransportError::Unsupported(transport));
    };
    let name = rustls::pki_types::ServerName::IpAddress(dest.ip().into());
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.connector.connect(name, stream))
        .await
        .map_err(|_| err(timed_out()))?
        .map_err(|e| {
            tracing::warn!(%dest, error = %e, "TLS connection refused");
            err(e)
        })?;
    Ok(serve_outgoing(t, tls, dest, local, transport))
}

/// Registers a connection we opened and serves it; returns its writer so the caller's message
/// goes out over it.
fn serve_outgoing<S>(
    t: &Transports,
    stream: S,
    dest: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> Outbox
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let id = next_conn_id();
    let (tx, rx) = outbox(QUEUE);
    let close = t.inner.cancel.child_token();
    t.inner
        .conns
        .insert(id, dest, transport, tx.clone(), close.clone());
    t.inner.stats.connections.fetch_add(1, Ordering::Relaxed);
    let t2 = t.clone();
    let tx2 = tx.clone();
    t.inner.tracker.spawn(async move {
        let writer = tokio::spawn(write_loop(
            t2.inner.stats.clone(),
            wr,
            rx,
            false,
            close.clone(),
            dest,
        ));
        let conn = Conn {
            t: &t2,
            id,
            peer: dest,
            local,
            transport,
            tx: tx2,
            close,
        };
        conn.read_sip(rd, BytesMut::new()).await;
        drop(conn);
        t2.inner.conns.remove(id);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        t2.inner.stats.connections.fetch_sub(1, Ordering::Relaxed);
        t2.inner.handler.closed(id);
    });
    tx
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use super::*;

    /// Keeps each `write` call's bytes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    async fn written(items: Vec<Wire>, ws: bool) -> Vec<Vec<u8>> {
        let (tx, rx) = outbox(QUEUE);
        for w in items {
            tx.try_send(w).unwrap();
        }
        drop(tx);
        let rec = Recorder::default();
        let peer = "127.0.0.1:5060".parse().unwrap();
        let close = tokio_util::sync::CancellationToken::new();
        write_loop(Arc::default(), rec.clone(), rx, ws, close, peer).await;
        rec.0.lock().unwrap().clone()
    }

    fn sip(s: &'static str) -> Wire {
        Wire::Sip(Bytes::from_static(s.as_bytes()))
    }

    #[tokio::test]
    async fn messages_queued_together_leave_in_one_write_in_their_order() {
        let writes = written(
            vec![sip("one\r\n"), sip("two\r\n"), sip("three\r\n")],
            false,
        )
        .await;
        assert_eq!(writes, vec![b"one\r\ntwo\r\nthree\r\n".to_vec()]);
    }

    #[tokio::test]
    async fn websocket_messages_joined_in_a_write_keep_a_frame_each() {
        let writes = written(vec![sip("a"), sip("bc")], true).await;
        let mut want = websocket::encode_message(b"a").to_vec();
        want.extend_from_slice(&websocket::encode_message(b"bc"));
        assert_eq!(writes, vec![want]);
    }

    #[tokio::test]
    async fn nothing_queued_after_a_close_is_written_and_a_large_queue_is_cut_in_several_writes() {
        let closing = written(
            vec![
                sip("last"),
                Wire::Close(Bytes::from_static(b"bye")),
                sip("never"),
            ],
            false,
        )
        .await;
        assert_eq!(closing, vec![b"lastbye".to_vec()]);
        let big = vec![0x41u8; 40 * 1024];
        let items = (0..3)
            .map(|_| Wire::Sip(Bytes::from(big.clone())))
            .collect::<Vec<_>>();
        let writes = written(items, false).await;
        // Gathering stops once 64 KiB are reached: the first two (80 KiB) go together, the
        // third alone.
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].len(), 80 * 1024);
        assert_eq!(writes[1].len(), 40 * 1024);
    }
}
