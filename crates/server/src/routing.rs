//! Where a response goes (RFC 3261 §18.2.2 with RFC 3581 rport).

use std::net::SocketAddr;

use careflow_proto::Via;

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
