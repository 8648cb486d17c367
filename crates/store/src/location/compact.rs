//! A binding as the embedded location service keeps it in memory: about half of a
//! [`Binding`]. The AoR is the map's key and not repeated; strings are boxed to their length;
//! what most desk phones never send (an outbound instance, Path, a connection, a cluster owner
//! route, q) lives in one optional box; a User-Agent is shared by every binding that sends
//! the same one (a hospital has a few phone models and thousands of phones). Times are Unix
//! seconds in 32 bits (until 2106) and the source address 18 bytes (a `SocketAddr` takes 32),
//! so that a binding fits jemalloc's 96-byte class.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use careflow_core::{Binding, Transport};

/// One stored binding.
#[derive(Debug)]
pub(super) struct Stored {
    id: u64,
    expires_at: u32,
    registered_at: u32,
    contact: Box<str>,
    call_id: Box<str>,
    user_agent: Option<Arc<str>>,
    extra: Option<Box<Extra>>,
    cseq: u32,
    /// The source's IP, an IPv4 one in its IPv4-mapped form ([`V4`] tells).
    ip: [u8; 16],
    port: [u8; 2],
    transport: Transport,
    flags: u8,
}

/// [`Stored::flags`]: registered through this process.
const HERE: u8 = 1;
/// [`Stored::flags`]: the source is an IPv4 address.
const V4: u8 = 2;

/// Unix seconds in 32 bits; past 2106 the largest (no binding lives that long).
fn secs(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// The fields few bindings carry.
#[derive(Debug, PartialEq, Eq)]
struct Extra {
    instance: Option<Box<str>>,
    reg_id: Option<u32>,
    q: Option<u16>,
    conn: Option<u64>,
    path: Box<[Box<str>]>,
    owner: Option<Box<str>>,
    /// An IPv6 source's flow label and scope (a link-local address needs its interface).
    flowinfo: u32,
    scope_id: u32,
}

impl Extra {
    fn of(b: &mut Binding) -> Option<Box<Self>> {
        let e = Self {
            instance: b.instance.take().map(String::into_boxed_str),
            reg_id: b.reg_id,
            q: b.q,
            conn: b.conn,
            path: std::mem::take(&mut b.path)
                .into_iter()
                .map(String::into_boxed_str)
                .collect(),
            owner: b.owner.take().map(String::into_boxed_str),
            flowinfo: match b.source {
                SocketAddr::V6(a) => a.flowinfo(),
                SocketAddr::V4(_) => 0,
            },
            scope_id: match b.source {
                SocketAddr::V6(a) => a.scope_id(),
                SocketAddr::V4(_) => 0,
            },
        };
        let empty = e.instance.is_none()
            && e.reg_id.is_none()
            && e.q.is_none()
            && e.conn.is_none()
            && e.path.is_empty()
            && e.owner.is_none()
            && e.flowinfo == 0
            && e.scope_id == 0;
        (!empty).then(|| Box::new(e))
    }
}

impl Stored {
    /// Keeps `b` (its AoR is the key it is stored under), sharing its User-Agent through
    /// `agents`.
    pub(super) fn keep(mut b: Binding, agents: &UserAgents) -> Self {
        let (ip, v4) = match b.source.ip() {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), V4),
            IpAddr::V6(a) => (a.octets(), 0),
        };
        Self {
            extra: Extra::of(&mut b),
            id: b.id,
            expires_at: secs(b.expires_at),
            registered_at: secs(b.registered_at),
            ip,
            port: b.source.port().to_le_bytes(),
            contact: b.contact.into_boxed_str(),
            call_id: b.call_id.into_boxed_str(),
            user_agent: b.user_agent.map(|ua| agents.share(ua)),
            cseq: b.cseq,
            transport: b.transport,
            flags: v4 | if b.here { HERE } else { 0 },
        }
    }

    fn source(&self) -> SocketAddr {
        let ip = Ipv6Addr::from(self.ip);
        let port = u16::from_le_bytes(self.port);
        if self.flags & V4 != 0 {
            let v4 = ip
                .to_ipv4_mapped()
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
            SocketAddr::new(IpAddr::V4(v4), port)
        } else {
            let e = self.extra.as_deref();
            SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                port,
                e.map_or(0, |e| e.flowinfo),
                e.map_or(0, |e| e.scope_id),
            ))
        }
    }

    /// The binding again, for `aor`.
    pub(super) fn binding(&self, aor: &str) -> Binding {
        let e = self.extra.as_deref();
        Binding {
            id: self.id,
            aor: aor.to_string(),
            contact: self.contact.to_string(),
            call_id: self.call_id.to_string(),
            cseq: self.cseq,
            expires_at: u64::from(self.expires_at),
            registered_at: u64::from(self.registered_at),
            q: e.and_then(|e| e.q),
            instance: e.and_then(|e| e.instance.as_deref()).map(str::to_string),
            reg_id: e.and_then(|e| e.reg_id),
            transport: self.transport,
            source: self.source(),
            user_agent: self.user_agent.as_deref().map(str::to_string),
            conn: e.and_then(|e| e.conn),
            path: e.map_or_else(Vec::new, |e| e.path.iter().map(|p| p.to_string()).collect()),
            here: self.flags & HERE != 0,
            owner: e.and_then(|e| e.owner.as_deref()).map(str::to_string),
        }
    }

    pub(super) fn expires_at(&self) -> u64 {
        u64::from(self.expires_at)
    }
}

/// The User-Agent strings in use, each kept once.
#[derive(Debug, Default)]
pub(super) struct UserAgents(Mutex<HashSet<Arc<str>>>);

impl UserAgents {
    /// The shared copy of `ua`.
    fn share(&self, ua: String) -> Arc<str> {
        let mut set = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some(known) = set.get(ua.as_str()) {
            return known.clone();
        }
        // A bound on distinct strings (a client may send a new one every time): past it, a
        // binding keeps its own copy.
        let ua: Arc<str> = Arc::from(ua);
        if set.len() < MAX_SHARED_AGENTS {
            set.insert(ua.clone());
        }
        ua
    }

    /// Drops the strings no binding uses any more.
    pub(super) fn release_unused(&self) {
        let mut set = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        set.retain(|ua| Arc::strong_count(ua) > 1);
    }
}

/// Most distinct User-Agent strings shared.
const MAX_SHARED_AGENTS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Binding {
        Binding {
            id: 7,
            aor: "alice@example.com".into(),
            contact: "<sip:alice@192.0.2.7:5070;ob>".into(),
            call_id: "c-1".into(),
            cseq: 9,
            expires_at: 2000,
            registered_at: 1000,
            q: Some(500),
            instance: Some("\"<urn:uuid:1>\"".into()),
            reg_id: Some(1),
            transport: Transport::Tls,
            source: "192.0.2.7:5070".parse().unwrap(),
            user_agent: Some("Yealink".into()),
            conn: Some(42),
            path: vec!["<sip:edge;lr>".into(), "<sip:edge2;lr>".into()],
            here: false,
            owner: Some("<sip:tok@10.0.0.1:5090;transport=tcp;lr>".into()),
        }
    }

    #[test]
    fn every_field_comes_back_as_it_was_kept() {
        let agents = UserAgents::default();
        let b = full();
        assert_eq!(Stored::keep(b.clone(), &agents).binding(&b.aor), b);
        let plain = Binding {
            q: None,
            instance: None,
            reg_id: None,
            conn: None,
            path: Vec::new(),
            owner: None,
            user_agent: None,
            ..full()
        };
        let s = Stored::keep(plain.clone(), &agents);
        assert!(s.extra.is_none());
        assert_eq!(s.binding(&plain.aor), plain);
    }

    #[test]
    fn a_user_agent_is_kept_once_and_released_when_unused() {
        let agents = UserAgents::default();
        let a = Stored::keep(full(), &agents);
        let b = Stored::keep(full(), &agents);
        assert!(Arc::ptr_eq(
            a.user_agent.as_ref().unwrap(),
            b.user_agent.as_ref().unwrap()
        ));
        drop((a, b));
        agents.release_unused();
        assert!(agents.0.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_sources_keep_their_scope_and_ipv4_ones_stay_ipv4() {
        let agents = UserAgents::default();
        for source in [
            "[fe80::1%3]:5060",
            "[2001:db8::7]:5062",
            "[::ffff:192.0.2.7]:5060",
            "192.0.2.7:5060",
            "0.0.0.0:0",
        ] {
            let mut b = full();
            b.source = source.parse().unwrap();
            if let SocketAddr::V6(a) = &mut b.source {
                a.set_flowinfo(9);
            }
            assert_eq!(
                Stored::keep(b.clone(), &agents).binding(&b.aor),
                b,
                "{source}"
            );
        }
    }

    #[test]
    fn the_stored_form_fits_96_bytes() {
        // jemalloc's 96-byte class: an AoR's one-binding slice (most phones) takes no more.
        assert!(size_of::<Stored>() <= 96, "{}", size_of::<Stored>());
        assert!(size_of::<Stored>() * 2 <= size_of::<Binding>());
    }
}
