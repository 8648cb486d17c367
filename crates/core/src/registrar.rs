//! Registrar binding rules (RFC 3261 §10.3), free of storage: given the current bindings of
//! an address-of-record and one REGISTER, compute the new set or the reason to refuse.

use std::net::SocketAddr;

use careflow_proto::{NameAddr, scan};

use crate::binding::{Binding, Transport};

/// Registrar limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrarConfig {
    /// Shortest registration accepted (423 below it), seconds.
    pub min_expires: u32,
    /// Longest registration granted, seconds; longer requests are shortened.
    pub max_expires: u32,
    /// Used when the request gives no expiry.
    pub default_expires: u32,
    /// Most contacts per address-of-record.
    pub max_contacts: usize,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        Self {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_contacts: 10,
        }
    }
}

/// One Contact header value of a REGISTER.
#[derive(Debug, Clone, Copy)]
pub enum ContactValue<'a> {
    /// `Contact: *`
    Wildcard,
    /// A contact address.
    Address(NameAddr<'a>),
}

impl<'a> ContactValue<'a> {
    /// Parses one element of the Contact list.
    pub fn parse(s: &'a str) -> Option<Self> {
        if scan::trim(s) == "*" {
            return Some(Self::Wildcard);
        }
        NameAddr::parse(s).map(Self::Address)
    }
}

/// What the REGISTER says, already parsed.
#[derive(Debug, Clone)]
pub struct RegisterRequest<'a> {
    /// Address-of-record key `user@domain`.
    pub aor: &'a str,
    /// Call-ID.
    pub call_id: &'a str,
    /// CSeq number.
    pub cseq: u32,
    /// Expires header value.
    pub expires: Option<u32>,
    /// Contact values, in order.
    pub contacts: Vec<ContactValue<'a>>,
    /// Transport it arrived over.
    pub transport: Transport,
    /// Source address.
    pub source: SocketAddr,
    /// User-Agent header.
    pub user_agent: Option<&'a str>,
    /// The connection it arrived over (stream transports).
    pub conn: Option<u64>,
    /// Path values (RFC 3327), in order.
    pub path: Vec<&'a str>,
    /// The route to this node for other nodes of a cluster, when the device is reachable
    /// only through it (see [`Binding::owner`]).
    pub owner: Option<&'a str>,
    /// Unix seconds.
    pub now: u64,
}

/// Why a REGISTER is refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400 with this reason.
    BadRequest(&'static str),
    /// 423 with Min-Expires.
    IntervalTooBrief(u32),
    /// Too many contacts for this AoR (403, reason says so).
    TooManyContacts(usize),
    /// Same Call-ID with a CSeq not above the stored one (500, RFC 3261 §10.3 step 7).
    OutOfOrder,
}

impl Reject {
    /// Status code and reason phrase.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Self::BadRequest(r) => (400, r),
            Self::IntervalTooBrief(_) => (423, "Interval Too Brief"),
            Self::TooManyContacts(_) => (403, "Too Many Registered Contacts"),
            Self::OutOfOrder => (500, "Out Of Order Request"),
        }
    }
}

/// The new binding set for the AoR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Every current binding after the request.
    pub bindings: Vec<Binding>,
    /// Whether anything must be written.
    pub changed: bool,
}

/// Applies one REGISTER to the current bindings of its AoR. `next_id` gives ids to new
/// bindings.
pub fn apply(
    cfg: &RegistrarConfig,
    existing: &[Binding],
    req: &RegisterRequest<'_>,
    next_id: &mut dyn FnMut() -> u64,
) -> Result<Outcome, Reject> {
    let live: Vec<Binding> = existing
        .iter()
        .filter(|b| b.expires_at > req.now)
        .cloned()
        .collect();
    let mut changed = live.len() != existing.len();

    if req.contacts.is_empty() {
        return Ok(Outcome {
            bindings: live,
            changed,
        });
    }

    if req
        .contacts
        .iter()
        .any(|c| matches!(c, ContactValue::Wildcard))
    {
        // RFC 3261 §10.3 step 6: "*" only alone and with Expires: 0.
        if req.contacts.len() != 1 || req.expires != Some(0) {
            return Err(Reject::BadRequest("Invalid Wildcard Contact"));
        }
        for b in &live {
            if b.call_id == req.call_id && req.cseq <= b.cseq {
                return Err(Reject::OutOfOrder);
            }
        }
        return Ok(Outcome {
            bindings: Vec::new(),
            changed: changed || !live.is_empty(),
        });
    }

    let mut bindings = live;
    for c in &req.contacts {
        let ContactValue::Address(na) = c else {
            continue;
        };
        let expires = contact_expires(cfg, na, req.expires);
        if expires != 0 && expires < cfg.min_expires {
            return Err(Reject::IntervalTooBrief(cfg.min_expires));
        }
        let uri = na.uri.raw;
        // The same device is recognised by its contact, or by its instance id and reg-id
        // (RFC 5626 §6, RFC 5627 §4.1): a phone that rebooted and registers a new contact
        // over a new connection replaces its old binding instead of adding a dead one.
        let (inst, reg) = (instance(na), reg_id(na));
        // ...or by its push address (RFC 8599 §5.6.1): a mobile device woken by a push
        // registers from wherever it is now, with the same pn-* parameters.
        let push = match crate::push::PushParams::of_uri(&na.uri) {
            crate::push::PushRequest::Push(p) => Some(p),
            _ => None,
        };
        let pos = bindings
            .iter()
            .position(|b| b.contact.eq_ignore_ascii_case(uri))
            .or_else(|| {
                inst.as_ref().and_then(|i| {
                    bindings
                        .iter()
                        .position(|b| b.instance.as_ref() == Some(i) && b.reg_id == reg)
                })
            })
            .or_else(|| {
                let push = push.as_ref()?;
                bindings.iter().position(|b| {
                    careflow_proto::Uri::parse(&b.contact).is_some_and(|u| {
                        matches!(crate::push::PushParams::of_uri(&u),
                            crate::push::PushRequest::Push(p) if p.same_device(push))
                    })
                })
            });
        if let Some(i) = pos {
            let b = &bindings[i];
            if b.call_id == req.call_id && req.cseq <= b.cseq {
                return Err(Reject::OutOfOrder);
            }
        }
        changed = true;
        match (pos, expires) {
            (Some(i), 0) => {
                bindings.remove(i);
            }
            (None, 0) => {}
            (Some(i), e) => {
                let b = &mut bindings[i];
                if !b.contact.eq_ignore_ascii_case(uri) {
                    b.contact = uri.to_string();
                }
                b.call_id = req.call_id.to_string();
                b.cseq = req.cseq;
                b.expires_at = req.now + u64::from(e);
                b.transport = req.transport;
                b.source = req.source;
                b.user_agent = req.user_agent.map(str::to_string);
                b.conn = req.conn;
                b.here = true;
                b.owner = req.owner.map(str::to_string);
                b.path = req.path.iter().map(|p| p.to_string()).collect();
                b.q = q_value(na);
                b.instance = instance(na);
                b.reg_id = reg_id(na);
            }
            (None, e) => bindings.push(Binding {
                id: next_id(),
                aor: req.aor.to_string(),
                contact: uri.to_string(),
                call_id: req.call_id.to_string(),
                cseq: req.cseq,
                expires_at: req.now + u64::from(e),
                registered_at: req.now,
                q: q_value(na),
                instance: instance(na),
                reg_id: reg_id(na),
                transport: req.transport,
                source: req.source,
                user_agent: req.user_agent.map(str::to_string),
                conn: req.conn,
                here: true,
                owner: req.owner.map(str::to_string),
                path: req.path.iter().map(|p| p.to_string()).collect(),
            }),
        }
    }
    if bindings.len() > cfg.max_contacts {
        return Err(Reject::TooManyContacts(cfg.max_contacts));
    }
    Ok(Outcome { bindings, changed })
}

/// The expiry granted to one contact: its `expires` parameter, else the Expires header,
/// else the default; capped at the maximum. A malformed or overlarge parameter counts as
/// 3600 (RFC 3261 §20.10) and is then capped; nothing wraps.
pub fn contact_expires(cfg: &RegistrarConfig, na: &NameAddr<'_>, header: Option<u32>) -> u32 {
    let requested = match na.params.get("expires") {
        Some(Some(v)) => match scan::parse_u64(v) {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            None => 3600,
        },
        Some(None) => 3600,
        None => header.unwrap_or(cfg.default_expires),
    };
    requested.min(cfg.max_expires)
}

fn q_value(na: &NameAddr<'_>) -> Option<u16> {
    let v = na.params.get("q")??;
    let f: f32 = v.parse().ok()?;
    if !(0.0..=1.0).contains(&f) {
        return None;
    }
    Some((f * 1000.0).round() as u16)
}

fn instance(na: &NameAddr<'_>) -> Option<String> {
    na.params
        .get("+sip.instance")?
        .map(|v| scan::unquote(v).into_owned())
}

fn reg_id(na: &NameAddr<'_>) -> Option<u32> {
    na.params.get("reg-id")?.and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        contacts: &'a [&'a str],
        expires: Option<u32>,
        call_id: &'a str,
        cseq: u32,
        now: u64,
    ) -> RegisterRequest<'a> {
        RegisterRequest {
            aor: "alice@example.com",
            call_id,
            cseq,
            expires,
            contacts: contacts
                .iter()
                .map(|c| ContactValue::parse(c).unwrap())
                .collect(),
            transport: Transport::Udp,
            source: "192.0.2.1:5060".parse().unwrap(),
            user_agent: Some("test"),
            conn: None,
            path: Vec::new(),
            owner: None,
            now,
        }
    }

    fn ids() -> impl FnMut() -> u64 {
        let mut n = 0;
        move || {
            n += 1;
            n
        }
    }

    #[test]
    fn a_woken_device_with_a_new_address_replaces_its_push_binding() {
        let cfg = RegistrarConfig::default();
        let mut id = ids();
        let first =
            "<sip:alice@10.1.1.1:5060;pn-provider=apns;pn-param=T.org.app.voip;pn-prid=tok1>";
        let o = apply(&cfg, &[], &req(&[first], Some(600), "c1", 1, 1000), &mut id).unwrap();
        // Woken by a push, it registers from another network, with another Call-ID.
        let moved =
            "<sip:alice@172.16.0.9:41000;pn-provider=apns;pn-param=T.org.app.voip;pn-prid=tok1>";
        let o = apply(
            &cfg,
            &o.bindings,
            &req(&[moved], Some(600), "c2", 1, 1010),
            &mut id,
        )
        .unwrap();
        assert_eq!(o.bindings.len(), 1, "replaced, not added");
        assert!(o.bindings[0].contact.contains("172.16.0.9"));
        assert_eq!(o.bindings[0].id, 1);
        // Another device (another token) adds a binding.
        let other =
            "<sip:alice@172.16.0.9:41002;pn-provider=apns;pn-param=T.org.app.voip;pn-prid=tok2>";
        let o = apply(
            &cfg,
            &o.bindings,
            &req(&[other], Some(600), "c3", 1, 1020),
            &mut id,
        )
        .unwrap();
        assert_eq!(o.bindings.len(), 2);
    }

    #[test]
    fn add_refresh_remove() {
        let cfg = RegistrarConfig::default();
        let mut id = ids();
        let o = apply(
            &cfg,
            &[],
            &req(&["<sip:a@192.0.2.1>"], Some(600), "c1", 1, 1000),
            &mut id,
        )
        .unwrap();
        assert_eq!(o.bindings.len(), 1);
        assert_eq!(o.bindings[0].expires_at, 1600);
        let o = apply(
            &cfg,
            &o.bindings,
            &req(&["<sip:a@192.0.2.1>;expires=120"], Some(600), "c1", 2, 1100),
            &mut id,
        )
        .unwrap();
        assert_eq!(o.bindings.len(), 1);
        assert_eq!(o.bindings[0].expires_at, 1220);
        assert_eq!(o.bindings[0].registered_at, 1000);
        let o2 = apply(
            &cfg,
            &o.bindings,
            &req(&["<sip:b@192.0.2.2>;q=0.5"], None, "c2", 1, 1100),
            &mut id,
        )
        .unwrap();
        assert_eq!(o2.bindings.len(), 2);
        assert_eq!(o2.bindings[1].q, Some(500));
        assert_eq!(o2.bindings[1].expires_at, 1100 + 3600);
        let o3 = apply(
            &cfg,
            &o2.bindings,
            &req(&["<sip:a@192.0.2.1>"], Some(0), "c1", 3, 1100),
            &mut id,
        )
        .unwrap();
        assert_eq!(o3.bindings.len(), 1);
        let fetch = apply(&cfg, &o3.bindings, &req(&[], None, "c9", 1, 1100), &mut id).unwrap();
        assert!(!fetch.changed);
        let all = apply(
            &cfg,
            &o2.bindings,
            &req(&["*"], Some(0), "c3", 1, 1100),
            &mut id,
        )
        .unwrap();
        assert!(all.bindings.is_empty());
    }

    #[test]
    fn refusals() {
        let cfg = RegistrarConfig::default();
        let mut id = ids();
        assert_eq!(
            apply(
                &cfg,
                &[],
                &req(&["<sip:a@h>"], Some(30), "c", 1, 0),
                &mut id
            ),
            Err(Reject::IntervalTooBrief(60))
        );
        assert!(matches!(
            apply(&cfg, &[], &req(&["*"], Some(5), "c", 1, 0), &mut id),
            Err(Reject::BadRequest(_))
        ));
        assert!(matches!(
            apply(
                &cfg,
                &[],
                &req(&["*", "<sip:a@h>"], Some(0), "c", 1, 0),
                &mut id
            ),
            Err(Reject::BadRequest(_))
        ));
        let o = apply(&cfg, &[], &req(&["<sip:a@h>"], None, "c", 5, 0), &mut id).unwrap();
        assert_eq!(
            apply(
                &cfg,
                &o.bindings,
                &req(&["<sip:a@h>"], None, "c", 5, 1),
                &mut id
            ),
            Err(Reject::OutOfOrder)
        );
        assert_eq!(
            apply(
                &cfg,
                &o.bindings,
                &req(&["<sip:a@h>"], None, "c", 4, 1),
                &mut id
            ),
            Err(Reject::OutOfOrder)
        );
        // another Call-ID may use any CSeq
        assert!(
            apply(
                &cfg,
                &o.bindings,
                &req(&["<sip:a@h>"], None, "d", 1, 1),
                &mut id
            )
            .is_ok()
        );
        let many: Vec<String> = (0..11).map(|i| format!("<sip:a@h{i}>")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            apply(&cfg, &[], &req(&many, None, "c", 1, 0), &mut id),
            Err(Reject::TooManyContacts(10))
        );
    }

    #[test]
    fn expiry_edge_cases_never_wrap() {
        let cfg = RegistrarConfig::default();
        let na = NameAddr::parse("<sip:a@h>;expires=280297596632815").unwrap();
        assert_eq!(contact_expires(&cfg, &na, None), 3600);
        let na = NameAddr::parse("<sip:a@h>;expires=abc").unwrap();
        assert_eq!(contact_expires(&cfg, &na, Some(100)), 3600);
        let na = NameAddr::parse("<sip:a@h>").unwrap();
        assert_eq!(contact_expires(&cfg, &na, Some(100)), 100);
        assert_eq!(contact_expires(&cfg, &na, Some(u32::MAX)), 3600);
    }

    #[test]
    fn expired_bindings_are_dropped_and_stored_params_kept() {
        let cfg = RegistrarConfig::default();
        let mut id = ids();
        let o = apply(
            &cfg,
            &[],
            &req(&["<sip:a@h;ob>;+sip.instance=\"<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>\";reg-id=1"], Some(60), "c", 1, 0),
            &mut id,
        )
        .unwrap();
        assert_eq!(
            o.bindings[0].instance.as_deref(),
            Some("<urn:uuid:00000000-0000-1000-8000-AABBCCDDEEFF>")
        );
        assert_eq!(o.bindings[0].reg_id, Some(1));
        let later = apply(&cfg, &o.bindings, &req(&[], None, "x", 1, 61), &mut id).unwrap();
        assert!(later.bindings.is_empty() && later.changed);
    }
}
