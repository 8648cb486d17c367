//! UDP: one datagram is one message (RFC 3261 §18.3).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::net::UdpSocket;

use crate::{Inbound, Outbound, Transport, TransportError, Transports};

pub(crate) async fn recv_loop(t: Transports, sock: Arc<UdpSocket>) {
    let max = t.inner.limits.max_message_size;
    let mut buf = vec![0u8; max + 1];
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    loop {
        let r = tokio::select! {
            _ = t.inner.cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => r,
        };
        match r {
            Ok((n, source)) => {
                if n > max {
                    t.inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%source, "dropping oversize datagram");
                    continue;
                }
                t.deliver(Inbound {
                    transport: Transport::Udp,
                    source,
                    local,
                    conn: None,
                    bytes: Bytes::copy_from_slice(&buf[..n]),
                });
            }
            // ICMP errors surface here on Linux (ECONNREFUSED from an earlier send): not fatal.
            Err(e) => tracing::trace!(error = %e, "udp recv error"),
        }
    }
}

pub(crate) async fn send(t: &Transports, out: Outbound) -> Result<(), TransportError> {
    let sock = match out.local {
        Some(l) => t.inner.udp.iter().find(|s| s.local_addr().ok() == Some(l)),
        None => None,
    }
    .or_else(|| {
        t.inner.udp.iter().find(|s| {
            s.local_addr()
                .is_ok_and(|a| a.is_ipv4() == out.dest.is_ipv4())
        })
    })
    .or(t.inner.udp.first())
    .ok_or(TransportError::NoListener(Transport::Udp))?;
    sock.send_to(&out.bytes, out.dest)
        .await
        .map_err(|e| TransportError::Send {
            dest: out.dest,
            source: e,
        })?;
    Ok(())
}
