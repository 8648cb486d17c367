//! Where messages go on the wire: a response (RFC 3261 §18.2.2 with RFC 3581 rport), a caller
//! of the proxy ([`Back`]), a branch's target ([`Target`]), and the proxy's table of both.

use std::net::SocketAddr;

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::flow::Flow;
use careflow_core::proxy::ProxyTable;
use careflow_proto::Via;
use careflow_transport::{ConnId, Outbound};

/// The way back to a caller (RFC 3261 §18.2.2), fixed when its request arrives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Back {
    pub(crate) transport: Transport,
    pub(crate) dest: SocketAddr,
    pub(crate) conn: Option<ConnId>,
    pub(crate) local: SocketAddr,
}

impl Back {
    pub(crate) fn outbound(self, bytes: Bytes) -> Outbound {
        Outbound {
            transport: self.transport,
            dest: self.dest,
            conn: self.conn,
            local: Some(self.local),
            bytes,
        }
    }
}

/// Where a branch sends its request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) transport: Transport,
    pub(crate) dest: SocketAddr,
    /// Our listener to send from (the interface facing `dest`).
    pub(crate) local: Option<SocketAddr>,
    /// The connection to use (a device registered over it).
    pub(crate) conn: Option<ConnId>,
    /// The device is behind NAT or on its own connection: in-dialog requests must find it by
    /// a flow token in our Record-Route, not by its Contact.
    pub(crate) flow: bool,
}

impl Target {
    pub(crate) fn at(transport: Transport, dest: SocketAddr) -> Self {
        Self {
            transport,
            dest,
            local: None,
            conn: None,
            flow: false,
        }
    }

    pub(crate) fn flow_token(&self, secret: &[u8; 32]) -> Option<String> {
        self.flow.then(|| {
            Flow {
                transport: self.transport,
                conn: self.conn.map(|c| c.0),
                addr: self.dest,
            }
            .encode(secret)
        })
    }

    pub(crate) fn outbound(self, bytes: Bytes) -> Outbound {
        Outbound {
            transport: self.transport,
            dest: self.dest,
            conn: self.conn,
            local: self.local,
            bytes,
        }
    }
}

/// The proxy's transactions: callers are reached by a [`Back`], branch targets by a [`Target`].
pub(crate) type ProxyTables = ProxyTable<Back, Target>;

/// The destination of a response to a request whose top Via is `via`, received from
/// `source`. Over streams the response uses the request's connection (the caller handles
/// that); this gives the address to use when that connection is gone, or for UDP.
pub fn response_destination(via: Option<&Via<'_>>, source: SocketAddr) -> SocketAddr {
    let Some(via) = via else { return source };
    if via.rport().is_some() || via.is_reliable() {
        return source;
    }
    // Unreliable unicast: the source address (what `received` records) and the sent-by port.
    SocketAddr::new(source.ip(), via.port.unwrap_or(5060))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rport_source_and_sent_by() {
        let src: SocketAddr = "203.0.113.5:40001".parse().unwrap();
        let v = Via::parse("SIP/2.0/UDP 10.0.0.2:5062;rport;branch=z9hG4bKa").unwrap();
        assert_eq!(response_destination(Some(&v), src), src);
        let v = Via::parse("SIP/2.0/UDP 10.0.0.2:5062;branch=z9hG4bKa").unwrap();
        assert_eq!(
            response_destination(Some(&v), src).to_string(),
            "203.0.113.5:5062"
        );
        let v = Via::parse("SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKa").unwrap();
        assert_eq!(
            response_destination(Some(&v), src).to_string(),
            "203.0.113.5:5060"
        );
        let v = Via::parse("SIP/2.0/TCP 10.0.0.2:5062;branch=z9hG4bKa").unwrap();
        assert_eq!(response_destination(Some(&v), src), src);
    }
}
