//! Our addresses in what we forward: the listener facing a peer, Via and Record-Route values,
//! and whether a Via or URI is ours.

use super::*;

impl App {
    pub(super) fn via_at(transport: Transport, addr: SocketAddr, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch}",
            transport.via_token(),
            fmt_addr(addr)
        )
    }

    pub(super) fn record_route_at(
        transport: Transport,
        addr: SocketAddr,
        token: Option<&str>,
    ) -> String {
        match token {
            Some(t) => format!("<sip:{t}@{};transport={transport};lr>", fmt_addr(addr)),
            None => format!("<sip:{};transport={transport};lr>", fmt_addr(addr)),
        }
    }

    /// The address the request reached us at (a wildcard listener reports the interface the
    /// kernel uses towards the sender).
    pub(super) fn inbound_addr(&self, ctx: &Ctx) -> SocketAddr {
        if ctx.local.ip().is_unspecified() {
            let ip = self
                .local_ip_towards(ctx.source.ip())
                .unwrap_or(ctx.local.ip());
            SocketAddr::new(ip, ctx.local.port())
        } else {
            ctx.local
        }
    }

    /// Our address for sending to `peer` over `transport`: the listener on the interface the
    /// kernel routes `peer` through, so a call that crosses interfaces is recorded on both.
    pub(super) fn outbound_addr(
        &self,
        transport: Transport,
        peer: SocketAddr,
        ctx: &Ctx,
    ) -> SocketAddr {
        if let Some(a) = self.listener_towards(transport, peer) {
            return a;
        }
        let wildcard = self
            .bound_listeners()
            .iter()
            .find(|l| l.transport == transport && l.addr.is_ipv4() == peer.is_ipv4());
        match wildcard {
            Some(l) => SocketAddr::new(self.inbound_addr(ctx).ip(), l.addr.port()),
            None => self.inbound_addr(ctx),
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
            .bound_listeners()
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
    pub(super) fn local_ip_towards(&self, dest: IpAddr) -> Option<IpAddr> {
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
        let port = v.port.unwrap_or(5060);
        self.bound_listeners().iter().any(|l| {
            l.addr.port() == port
                && v.host
                    .ip()
                    .is_some_and(|ip| ip == l.addr.ip() || l.addr.ip().is_unspecified())
        })
    }

    /// True when a URI names this server (not one of its users).
    pub(crate) fn is_ours(&self, u: &Uri<'_>) -> bool {
        // A user part is someone's address, unless it is one of our flow tokens.
        if u.user
            .is_some_and(|user| Flow::decode(user, &self.cfg.secret).is_none())
        {
            return false;
        }
        if self.serves_domain(&u.host.as_str().to_ascii_lowercase()) && u.port.is_none() {
            return true;
        }
        let port = u.port.unwrap_or(5060);
        self.bound_listeners().iter().any(|l| {
            l.addr.port() == port
                && u.host
                    .ip()
                    .is_some_and(|ip| ip == l.addr.ip() || l.addr.ip().is_unspecified())
        })
    }
}

pub(super) fn fmt_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}
