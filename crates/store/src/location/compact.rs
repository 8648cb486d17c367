//! A binding as the embedded location service keeps it in memory: about half of a
//! [`Binding`]. The AoR is the map's key and not repeated; strings are boxed to their length;
//! what most desk phones never send (an outbound instance, Path, a connection, a cluster owner
//! route, q) lives in one optional box; a User-Agent is shared by every binding that sends
//! the same one (a hospital has a few phone models and thousands of phones).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use careflow_core::{Binding, Transport};

/// One stored binding.
#[derive(Debug)]
pub(super) struct Stored {
    id: u64,
    expires_at: u64,
    registered_at: u64,
    source: SocketAddr,
    contact: Box<str>,
    call_id: Box<str>,
    user_agent: Option<Arc<str>>,
    extra: Option<Box<Extra>>,
    cseq: u32,
    transport: Transport,
    here: bool,
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
        };
        let empty = e.instance.is_none()
            && e.reg_id.is_none()
            && e.q.is_none()
            && e.conn.is_none()
            && e.path.is_empty()
            && e.owner.is_none();
        (!empty).then(|| Box::new(e))
    }
}

impl Stored {
    /// Keeps `b` (its AoR is the key it is stored under), sharing its User-Agent through
    /// `agents`.
    pub(super) fn keep(mut b: Binding, agents: &UserAgents) -> Self {
        Self {
            extra: Extra::of(&mut b),
            id: b.id,
            expires_at: b.expires_at,
            registered_at: b.registered_at,
            source: b.source,
            contact: b.contact.into_boxed_str(),
            call_id: b.call_id.into_boxed_str(),
            user_agent: b.user_agent.map(|ua| agents.share(ua)),
            cseq: b.cseq,
            transport: b.transport,
            here: b.here,
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
            expires_at: self.expires_at,
            registered_at: self.registered_at,
            q: e.and_then(|e| e.q),
            instance: e.and_then(|e| e.instance.as_deref()).map(str::to_string),
            reg_id: e.and_then(|e| e.reg_id),
            transport: self.transport,
            source: self.source,
            user_agent: self.user_agent.as_deref().map(str::to_string),
            conn: e.and_then(|e| e.conn),
            path: e.map_or_else(Vec::new, |e| e.path.iter().map(|p| p.to_string()).collect()),
            here: self.here,
            owner: e.and_then(|e| e.owner.as_deref()).map(str::to_string),
        }
    }

    pub(super) fn expires_at(&self) -> u64 {
        self.expires_at
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
    fn the_stored_form_is_half_a_binding() {
        assert!(
            size_of::<Stored>() * 2 <= size_of::<Binding>() + 32,
            "{} vs {}",
            size_of::<Stored>(),
            size_of::<Binding>()
        );
    }
}
