//! UDP: one datagram is one message (RFC 3261 §18.3).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::udp_socket::UdpSock;
use crate::{Inbound, Outbound, Transport, TransportError, Transports};

pub(crate) async fn recv_loop(t: Transports, sock: Arc<UdpSock>) {
    let max = t.inner.opts.limits.max_message_size;
    // One byte more than accepted: a datagram that fills a slot was cut, and is oversize.
    let mut batch = crate::mmsg::Batch::new(max + 1);
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let r = tokio::select! {
            _ = t.inner.cancel.cancelled() => return,
            r = batch.recv(&sock) => r,
        };
        match r {
            Ok(_) => {
                for (bytes, source) in batch.datagrams() {
                    datagram(&t, &sock, local, max, bytes, source);
                }
            }
            // ICMP errors for earlier sends surface here (IP_RECVERR): tell the application
            // which destinations are unreachable.
            Err(e) => {
                tracing::trace!(error = %e, "udp recv error");
                for dest in crate::icmp::drain(&sock) {
                    tracing::debug!(%dest, "destination unreachable (ICMP)");
                    t.inner.handler.unreachable(Transport::Udp, dest);
                }
            }
        }
    }
}

/// One received datagram (`bytes` is at most `max` + 1 long: longer means cut).
fn datagram(
    t: &Transports,
    sock: &UdpSock,
    local: SocketAddr,
    max: usize,
    bytes: &[u8],
    source: SocketAddr,
) {
    if !t.admit(source) {
        return;
    }
    let truncated = bytes.len() > max;
    if truncated {
        t.inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%source, "oversize datagram");
    }
    let bytes = &bytes[..bytes.len().min(max)];
    if careflow_proto::stun::is_stun(bytes) {
        // SIP Outbound keep-alive (RFC 5626 §4.4.2): answered here, cheaply.
        if let Some(resp) = careflow_proto::stun::binding_response(bytes, source) {
            let _ = sock.try_send_to(&resp, source);
        }
        return;
    }
    t.deliver(Inbound {
        transport: Transport::Udp,
        source,
        local,
        conn: None,
        bytes: Bytes::copy_from_slice(bytes),
        truncated,
    });
}

/// Datagrams waiting for room in one socket's send buffer, in the order they were sent. While
/// it holds anything, later datagrams queue behind it: responses of one transaction (a 180
/// and then a 200) must leave in the order the application sent them, whatever the scheduler
/// does. The socket's buffer is shared by every destination, so one queue per socket costs
/// no head-of-line blocking that the kernel would not impose anyway.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    queue: Mutex<VecDeque<(Bytes, SocketAddr)>>,
    wake: Notify,
}

/// Most datagrams queued behind a full socket buffer; past it new ones are dropped (UDP may
/// lose them anyway, and retransmissions recover) rather than growing memory.
const BACKLOG_MAX: usize = 8192;

/// Sends now when the socket has room, else queues in order; never waits.
pub(crate) fn send_ordered(t: &Transports, out: Outbound) -> Result<(), TransportError> {
    let l = pick(t, &out)?;
    let mut q = match l.backlog.queue.lock() {
        Ok(q) => q,
        Err(p) => p.into_inner(),
    };
    if q.is_empty() {
        match l.sock.try_send_to(&out.bytes, out.dest) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(dest = %out.dest, error = %e, "udp send failed");
                return Err(TransportError::Send {
                    dest: out.dest,
                    source: e,
                });
            }
        }
    }
    if q.len() >= BACKLOG_MAX {
        t.inner.stats.send_dropped.fetch_add(1, Ordering::Relaxed);
        return Err(TransportError::Send {
            dest: out.dest,
            source: std::io::Error::new(std::io::ErrorKind::WouldBlock, "send queue full"),
        });
    }
    q.push_back((out.bytes, out.dest));
    if q.len() == 1 {
        l.backlog.wake.notify_one();
    }
    Ok(())
}

/// Empties a socket's backlog as the socket drains; the front entry leaves the queue only once
/// sent, so nothing overtakes it.
pub(crate) async fn drain_backlog(t: Transports, l: Arc<Listener>) {
    loop {
        tokio::select! {
            _ = t.inner.cancel.cancelled() => return,
            _ = l.backlog.wake.notified() => {}
        }
        loop {
            let front = match l.backlog.queue.lock() {
                Ok(q) => q.front().cloned(),
                Err(p) => p.into_inner().front().cloned(),
            };
            let Some((bytes, dest)) = front else { break };
            let sent = tokio::select! {
                _ = t.inner.cancel.cancelled() => return,
                r = l.sock.send_to(&bytes, dest) => r,
            };
            if let Err(e) = sent {
                tracing::debug!(%dest, error = %e, "udp send failed");
            }
            match l.backlog.queue.lock() {
                Ok(mut q) => q.pop_front(),
                Err(p) => p.into_inner().pop_front(),
            };
        }
    }
}

/// One UDP listener: its socket and its ordered send backlog.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) addr: SocketAddr,
    pub(crate) sock: Arc<UdpSock>,
    pub(crate) backlog: Backlog,
}

fn pick<'t>(t: &'t Transports, out: &Outbound) -> Result<&'t Arc<Listener>, TransportError> {
    let udp = &t.inner.udp;
    out.local
        .and_then(|l| udp.iter().find(|u| u.addr == l))
        .or_else(|| udp.iter().find(|u| u.addr.is_ipv4() == out.dest.is_ipv4()))
        .or(udp.first())
        .ok_or(TransportError::NoListener(Transport::Udp))
}
