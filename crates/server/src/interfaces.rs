//! Our addresses: the listeners we bound, which of them faces a peer (the kernel's route,
//! cached), and the Via and Record-Route values that name them. The proxy writes these into
//! what it forwards; keep-alives leave by the listener facing the device.

use foldhash::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

use careflow_core::Transport;
use careflow_proto::{Uri, Via};
use careflow_transport::ListenSpec;

/// The listeners and the local IP the kernel uses towards each destination seen.
#[derive(Debug, Default)]
pub(crate) struct Interfaces {
    bound: OnceLock<Vec<ListenSpec>>,
    /// Local IP per destination, for choosing the interface a proxied request leaves by.
    route_cache: Mutex<HashMap<IpAddr, IpAddr>>,
}

impl Interfaces {
    /// The listeners as bound (port 0 resolved); set once at start.
    pub(crate) fn set_bound(&self, bound: Vec<ListenSpec>) {
        let _ = self.bound.set(bound);
    }

    pub(crate) fn bound(&self) -> &[ListenSpec] {
        self.bound.get().map_or(&[], Vec::as_slice)
    }

    /// The address a request from `source` reached us at on listener `local` (a wildcard
    /// listener reports the interface the kernel uses towards the sender).
    pub(crate) fn inbound(&self, local: SocketAddr, source: SocketAddr) -> SocketAddr {
        if local.ip().is_unspecified() {
            let ip = self.local_ip_towards(source.ip()).unwrap_or(local.ip());
            SocketAddr::new(ip, local.port())
        } else {
            local
        }
    }

    /// Our address for sending to `peer` over `transport`, for a request that reached us at
    /// `local` from `source`: the listener on the interface the kernel routes `peer` through,
    /// so a call that crosses interfaces is recorded on both.
    pub(crate) fn outbound(
        &self,
        transport: Transport,
        peer: SocketAddr,
        local: SocketAddr,
        source: SocketAddr,
    ) -> SocketAddr {
        if let Some(a) = self.listener_towards(transport, peer) {
            return a;
        }
        let wildcard = self
            .bound()
            .iter()
            .find(|l| l.transport == transport && l.addr.is_ipv4() == peer.is_ipv4());
        match wildcard {
            Some(l) => SocketAddr::new(self.inbound(local, source).ip(), l.addr.port()),
            None => self.inbound(local, source),
        }
    }

    /// Our listener of `transport` facing `peer` (its wildcard resolved to the interface
    /// address), when we have one of that transport and address family.
    pub(crate) fn listener_towards(
        &self,
        transport: Transport,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        let listeners: Vec<SocketAddr> = self
            .bound()
            .iter()
            .filter(|l| l.transport == transport && l.addr.is_ipv4() == peer.is_ipv4())
            .map(|l| l.addr)
            .collect();
        let ip = self.local_ip_towards(peer.ip());
        if let Some(ip) = ip {
            if let Some(l) = listeners.iter().find(|a| a.ip() == ip) {
                return Some(*l);
            }
            if let Some(l) = listeners.iter().find(|a| a.ip().is_unspecified()) {
                return Some(SocketAddr::new(ip, l.port()));
            }
        }
        listeners
            .first()
            .filter(|l| !l.ip().is_unspecified())
            .copied()
    }

    /// The local IP the kernel would use to reach `dest` (a connected UDP socket's name;
    /// nothing is sent), cached per destination.
    fn local_ip_towards(&self, dest: IpAddr) -> Option<IpAddr> {
        if let Some(ip) = self.route_cache.lock().ok()?.get(&dest) {
            return Some(*ip);
        }
        let any: SocketAddr = if dest.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let probe = std::net::UdpSocket::bind(any).ok()?;
        probe.connect((dest, 9)).ok()?;
        let ip = probe.local_addr().ok()?.ip();
        if let Ok(mut c) = self.route_cache.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(dest, ip);
        }
        Some(ip)
    }

    /// True when a Via names this server.
    pub(crate) fn is_our_via(&self, v: &Via<'_>) -> bool {
        self.listens_at(v.host.ip(), v.port.unwrap_or(5060))
    }

    /// True when a URI's host and port name one of our listeners.
    pub(crate) fn names_listener(&self, u: &Uri<'_>) -> bool {
        self.listens_at(u.host.ip(), u.port.unwrap_or(5060))
    }

    /// Whether one of our listeners is at `ip` (a literal; names are never ours here) and
    /// `port`, a wildcard listener counting for every address.
    fn listens_at(&self, ip: Option<IpAddr>, port: u16) -> bool {
        let Some(ip) = ip else { return false };
        self.bound()
            .iter()
            .any(|l| l.addr.port() == port && (ip == l.addr.ip() || l.addr.ip().is_unspecified()))
    }
}

/// Our Via for a request sent over `transport` from `addr` with `branch`.
pub(crate) fn via_at(transport: Transport, addr: SocketAddr, branch: &str) -> String {
    let mut via = String::with_capacity(48 + branch.len());
    via.push_str("SIP/2.0/");
    via.push_str(transport.via_token());
    via.push(' ');
    push_addr(&mut via, addr);
    via.push_str(";branch=");
    via.push_str(branch);
    via
}

/// Our Record-Route entry at `addr`, with a flow token as its user part when one is given.
pub(crate) fn record_route_at(
    transport: Transport,
    addr: SocketAddr,
    token: Option<&str>,
) -> String {
    let mut rr = String::with_capacity(48 + token.map_or(0, str::len));
    rr.push_str("<sip:");
    if let Some(t) = token {
        rr.push_str(t);
        rr.push('@');
    }
    push_addr(&mut rr, addr);
    rr.push_str(";transport=");
    rr.push_str(transport.as_str());
    rr.push_str(";lr>");
    rr
}

pub(crate) fn fmt_addr(a: SocketAddr) -> String {
    let mut s = String::with_capacity(21);
    push_addr(&mut s, a);
    s
}

/// Appends `a` as a Via sent-by or URI host-port (`1.2.3.4:5060`, `[2001:db8::1]:5060`),
/// IPv4 without the formatting machinery (this is written into every forwarded request).
pub(crate) fn push_addr(out: &mut String, a: SocketAddr) {
    match a {
        SocketAddr::V4(v4) => out.push_str(careflow_proto::scan::ipv4(*v4.ip(), &mut [0; 15])),
        SocketAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "[{}]", v6.ip());
        }
    }
    out.push(':');
    careflow_proto::scan::push_decimal(out, u64::from(a.port()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_via_and_record_route_read_as_the_formatted_ones_did() {
        let addrs: [SocketAddr; 5] = [
            "127.0.0.1:5060".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "10.20.3.104:15060".parse().unwrap(),
            "[2001:db8::1]:5061".parse().unwrap(),
        ];
        for a in addrs {
            let formatted = match a {
                SocketAddr::V4(v4) => v4.to_string(),
                SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
            };
            assert_eq!(fmt_addr(a), formatted);
            for t in [Transport::Udp, Transport::Tls, Transport::Wss] {
                assert_eq!(
                    via_at(t, a, "z9hG4bKcf.1"),
                    format!("SIP/2.0/{} {formatted};branch=z9hG4bKcf.1", t.via_token())
                );
                assert_eq!(
                    record_route_at(t, a, Some("tok")),
                    format!("<sip:tok@{formatted};transport={t};lr>")
                );
                assert_eq!(
                    record_route_at(t, a, None),
                    format!("<sip:{formatted};transport={t};lr>")
                );
            }
        }
    }
}
