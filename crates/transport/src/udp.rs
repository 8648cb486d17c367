//! UDP: one datagram is one message (RFC 3261 §18.3).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::net::UdpSocket;

use crate::{Inbound, Outbound, Transport, TransportError, Transports};

pub(crate) async fn recv_loop(t: Transports, sock: Arc<UdpSocket>) {
    let max = t.inner.opts.limits.max_message_size;
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
                if !t.admit(source) {
                    continue;
                }
                let truncated = n > max;
                if truncated {
                    t.inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%source, "oversize datagram");
                }
                let n = n.min(max);
                if careflow_proto::stun::is_stun(&buf[..n]) {
                    // SIP Outbound keep-alive (RFC 5626 §4.4.2): answered here, cheaply.
                    if let Some(resp) = careflow_proto::stun::binding_response(&buf[..n], source) {
                        let _ = sock.try_send_to(&resp, source);
                    }
                    continue;
                }
                t.deliver(Inbound {
                    transport: Transport::Udp,
                    source,
                    local,
                    conn: None,
                    bytes: Bytes::copy_from_slice(&buf[..n]),
                    truncated,
                });
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

pub(crate) fn try_send(t: &Transports, out: Outbound) -> Option<Outbound> {
    let Ok(sock) = pick(t, &out) else {
        return Some(out);
    };
    match sock.try_send_to(&out.bytes, out.dest) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(out),
        Err(e) => {
            tracing::debug!(dest = %out.dest, error = %e, "udp send failed");
            None
        }
    }
}

pub(crate) async fn send(t: &Transports, out: Outbound) -> Result<(), TransportError> {
    let sock = pick(t, &out)?;
    sock.send_to(&out.bytes, out.dest)
        .await
        .map_err(|e| TransportError::Send {
            dest: out.dest,
            source: e,
        })?;
    Ok(())
}

fn pick<'t>(t: &'t Transports, out: &Outbound) -> Result<&'t Arc<UdpSocket>, TransportError> {
    let udp = &t.inner.udp;
    out.local
        .and_then(|l| udp.iter().find(|(a, _)| *a == l))
        .or_else(|| udp.iter().find(|(a, _)| a.is_ipv4() == out.dest.is_ipv4()))
        .or(udp.first())
        .map(|(_, s)| s)
        .ok_or(TransportError::NoListener(Transport::Udp))
}
