//! The sending side of connections: each connection's writer task, queueing a message for a
//! connection without waiting (a peer that does not read is disconnected), and dialling a
//! connection of ours when a message has none.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use careflow_proto::websocket;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Conn, HANDSHAKE_TIMEOUT};
use crate::conn::Wire;
use crate::outbox::{NotQueued, Outbox, OutboxReader, outbox};
use crate::{Outbound, Transport, TransportError, Transports, next_conn_id};

/// Messages queued for one connection. A peer this far behind is not reading: it is
/// disconnected rather than parking senders (a phone that never reads must not hold memory or
/// tasks of ours).
pub(super) const QUEUE: usize = 256;
/// A write that cannot complete this long (the peer's window stays shut) closes the
/// connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn write_loop<W>(
    t: Transports,
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
        let (bytes, last) = match item {
            Wire::Sip(b) if ws => (websocket::encode_message(&b), false),
            Wire::Sip(b) | Wire::Raw(b) => (b, false),
            Wire::Close(b) => (b, true),
        };
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
                t.inner.stats.stalled_closed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, timeout_s = WRITE_TIMEOUT.as_secs(),
                    "closing connection: the peer does not read");
                close.cancel();
                return;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
}

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
        let writer = tokio::spawn(write_loop(t2.clone(), wr, rx, false, close.clone(), dest));
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
