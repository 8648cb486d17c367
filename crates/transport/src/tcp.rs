//! TCP: messages framed by Content-Length; CRLF keep-alives answered (RFC 5626 §4.4.1).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use careflow_proto::framing::{Frame, next_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::{Inbound, Outbound, Transport, TransportError, Transports, next_conn_id};

pub(crate) async fn accept_loop(t: Transports, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = t.inner.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let open = t.inner.stats.connections.load(Ordering::Relaxed);
                if open >= t.inner.limits.max_connections as u64 {
                    t.inner
                        .stats
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, open, "connection limit reached, refusing");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                spawn_connection(&t, stream, peer);
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn spawn_connection(t: &Transports, stream: TcpStream, peer: SocketAddr) -> mpsc::Sender<Bytes> {
    let id = next_conn_id();
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    t.inner.conns.insert(id, peer, tx.clone());
    t.inner.stats.connections.fetch_add(1, Ordering::Relaxed);
    let t2 = t.clone();
    let pong = tx.clone();
    t.inner.tracker.spawn(async move {
        let local = stream.local_addr().unwrap_or(peer);
        let (rd, wr) = stream.into_split();
        let writer = tokio::spawn(write_loop(wr, rx));
        read_loop(&t2, rd, peer, local, id, pong).await;
        t2.inner.conns.remove(id);
        writer.abort();
        t2.inner.stats.connections.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(%peer, conn = id.0, "tcp connection closed");
    });
    tx
}

async fn write_loop(mut wr: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(b) = rx.recv().await {
        if wr.write_all(&b).await.is_err() {
            return;
        }
    }
}

async fn read_loop(
    t: &Transports,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    peer: SocketAddr,
    local: SocketAddr,
    id: crate::ConnId,
    pong: mpsc::Sender<Bytes>,
) {
    let limits = t.inner.limits;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        loop {
            match next_frame(&buf, limits.max_message_size) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::KeepAlive { len, ping }) => {
                    buf.advance(len);
                    if ping {
                        let _ = pong.try_send(Bytes::from_static(b"\r\n"));
                    }
                }
                Ok(Frame::Message(n)) => {
                    let bytes = buf.split_to(n).freeze();
                    t.deliver(Inbound {
                        transport: Transport::Tcp,
                        source: peer,
                        local,
                        conn: Some(id),
                        bytes,
                    });
                }
                Err(e) => {
                    t.inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "closing tcp connection: unframeable stream");
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let read = tokio::select! {
            _ = t.inner.cancel.cancelled() => return,
            r = tokio::time::timeout(limits.idle_timeout, rd.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                tracing::debug!(%peer, "closing idle tcp connection");
                return;
            }
        }
    }
}

pub(crate) fn try_send(t: &Transports, out: Outbound) -> Option<Outbound> {
    let Some(tx) = t.inner.conns.writer(out.conn, out.dest) else {
        return Some(out);
    };
    match tx.try_send(out.bytes) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(bytes) | mpsc::error::TrySendError::Closed(bytes)) => {
            Some(Outbound { bytes, ..out })
        }
    }
}

pub(crate) async fn send(t: &Transports, out: Outbound) -> Result<(), TransportError> {
    let tx = match t.inner.conns.writer(out.conn, out.dest) {
        Some(tx) => tx,
        None => {
            let stream = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                TcpStream::connect(out.dest),
            )
            .await
            .map_err(|_| TransportError::Send {
                dest: out.dest,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|e| TransportError::Send {
                dest: out.dest,
                source: e,
            })?;
            let _ = stream.set_nodelay(true);
            spawn_connection(t, stream, out.dest)
        }
    };
    tx.send(out.bytes).await.map_err(|_| TransportError::Send {
        dest: out.dest,
        source: std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed"),
    })
}
