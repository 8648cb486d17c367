//! Flow tokens (the idea of RFC 5626 §5.2): where a user agent behind NAT or on a
//! connection it opened can be reached, written into the user part of our Record-Route so
//! that in-dialog requests find the way back without trusting its (private, or `.invalid`)
//! Contact.
//!
//! The token carries the transport, the connection id and the peer address, and an HMAC with
//! the server secret so nobody can steer requests into another user's connection by forging
//! one. It is hex, so it is a valid URI user part as it is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::Transport;

const MAC_LEN: usize = 10;

/// Where a user agent is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Transport of the flow.
    pub transport: Transport,
    /// The connection (stream transports), as the transport layer numbers it.
    pub conn: Option<u64>,
    /// The peer's address (its public address when it is behind NAT).
    pub addr: SocketAddr,
}

fn mac(secret: &[u8; 32], body: &[u8]) -> [u8; MAC_LEN] {
    signature(secret, b"careflow-flow", body)
}

/// The first `N` bytes of HMAC-SHA256(`key`, `label` || `body`): each kind of token has its
/// own label, so one kind can never pass for another under the same key.
pub(crate) fn signature<const N: usize>(key: &[u8; 32], label: &[u8], body: &[u8]) -> [u8; N] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(label);
    m.update(body);
    let full = m.finalize().into_bytes();
    let mut out = [0u8; N];
    out.copy_from_slice(&full[..N]);
    out
}

impl Flow {
    /// The token for this flow.
    pub fn encode(&self, secret: &[u8; 32]) -> String {
        let mut body = Vec::with_capacity(32);
        self.write(&mut body);
        let tag = mac(secret, &body);
        let mut s = String::with_capacity((body.len() + MAC_LEN) * 2);
        push_hex(&mut s, &body);
        push_hex(&mut s, &tag);
        s
    }

    /// The flow's bytes in a token: transport, connection, address, port.
    pub(crate) fn write(&self, body: &mut Vec<u8>) {
        body.push(self.transport.code());
        body.extend_from_slice(&self.conn.unwrap_or(0).to_be_bytes());
        match self.addr.ip() {
            IpAddr::V4(ip) => body.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => body.extend_from_slice(&ip.octets()),
        }
        body.extend_from_slice(&self.addr.port().to_be_bytes());
    }

    /// Reads what [`Self::write`] wrote (the whole of `body`).
    pub(crate) fn read(body: &[u8]) -> Option<Self> {
        let transport = Transport::from_code(*body.first()?)?;
        let conn = u64::from_be_bytes(body.get(1..9)?.try_into().ok()?);
        let rest = &body[9..];
        let (ip, port) = match rest.len() {
            6 => {
                let o: [u8; 4] = rest[..4].try_into().ok()?;
                (IpAddr::V4(Ipv4Addr::from(o)), &rest[4..])
            }
            18 => {
                let o: [u8; 16] = rest[..16].try_into().ok()?;
                (IpAddr::V6(Ipv6Addr::from(o)), &rest[16..])
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(port.try_into().ok()?);
        Some(Self {
            transport,
            conn: (conn != 0).then_some(conn),
            addr: SocketAddr::new(ip, port),
        })
    }

    /// Reads a token back; `None` when it is not one of ours (wrong MAC, wrong shape).
    pub fn decode(token: &str, secret: &[u8; 32]) -> Option<Self> {
        let raw = unhex(token)?;
        if raw.len() < MAC_LEN + 1 {
            return None;
        }
        let (body, tag) = raw.split_at(raw.len() - MAC_LEN);
        if !bool::from(mac(secret, body).ct_eq(tag)) {
            return None;
        }
        Self::read(body)
    }

    /// Whether a request that arrived over `transport` from `source` (on connection `conn`)
    /// came over this very flow (then the token does not say where the request goes).
    pub fn is_arrival(&self, transport: Transport, source: SocketAddr, conn: Option<u64>) -> bool {
        match (self.conn, conn) {
            (Some(a), Some(b)) => a == b,
            _ => self.transport == transport && self.addr == source,
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` as lower-case hex (a valid URI user part).
pub(crate) fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) || b.len() > 128 {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    b.chunks(2)
        .map(|p| Some((val(p[0])? << 4) | val(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];

    #[test]
    fn round_trips_v4_v6_and_udp() {
        for f in [
            Flow {
                transport: Transport::Wss,
                conn: Some(42),
                addr: "198.51.100.4:51234".parse().unwrap(),
            },
            Flow {
                transport: Transport::Udp,
                conn: None,
                addr: "[2001:db8::5]:5060".parse().unwrap(),
            },
        ] {
            let t = f.encode(&SECRET);
            assert!(t.bytes().all(|c| c.is_ascii_hexdigit()));
            assert_eq!(Flow::decode(&t, &SECRET), Some(f));
            assert_eq!(Flow::decode(&t, &[8; 32]), None);
        }
    }

    #[test]
    fn forged_or_mangled_tokens_are_refused() {
        let f = Flow {
            transport: Transport::Tcp,
            conn: Some(9),
            addr: "192.0.2.1:40000".parse().unwrap(),
        };
        let t = f.encode(&SECRET);
        let mut forged = t.clone().into_bytes();
        forged[3] = if forged[3] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            Flow::decode(std::str::from_utf8(&forged).unwrap(), &SECRET),
            None
        );
        assert_eq!(Flow::decode(&t[..t.len() - 1], &SECRET), None);
        assert_eq!(Flow::decode("alice", &SECRET), None);
        assert_eq!(Flow::decode("", &SECRET), None);
    }

    #[test]
    fn arrival_is_recognised_by_connection_or_address() {
        let f = Flow {
            transport: Transport::Ws,
            conn: Some(3),
            addr: "192.0.2.1:40000".parse().unwrap(),
        };
        assert!(f.is_arrival(Transport::Ws, "192.0.2.1:40000".parse().unwrap(), Some(3)));
        assert!(!f.is_arrival(Transport::Ws, "192.0.2.1:40000".parse().unwrap(), Some(4)));
        let u = Flow {
            transport: Transport::Udp,
            conn: None,
            addr: "192.0.2.1:5060".parse().unwrap(),
        };
        assert!(u.is_arrival(Transport::Udp, "192.0.2.1:5060".parse().unwrap(), None));
        assert!(!u.is_arrival(Transport::Udp, "192.0.2.2:5060".parse().unwrap(), None));
    }
}
