//! Who may watch whom, and directed call pickup (RFC 3891 `Replaces` built from a NOTIFY):
//! an INVITE replacing a ringing call of a user the picker may watch goes to the caller's own
//! device, which swaps its ringing dialog for the picker's; the other branches are then
//! cancelled as for any answered call.

use std::collections::HashMap;

use super::{Calls, Leg};

/// Who may subscribe to whose dialog state (and so pick up their calls).
#[derive(Debug, Clone, Default)]
pub enum WatchPolicy {
    /// Any user of the same domain (the default: a ward's phones watch each other).
    #[default]
    SameDomain,
    /// Only users sharing a group (group name → AoRs `user@domain`).
    Groups(HashMap<String, Vec<String>>),
}

impl WatchPolicy {
    /// Whether `watcher` may watch `watched` (both AoRs, `user@domain`).
    pub fn may_watch(&self, watcher: &str, watched: &str) -> bool {
        let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        match self {
            Self::SameDomain => domain(watcher).is_some() && domain(watcher) == domain(watched),
            Self::Groups(groups) => groups.values().any(|members| {
                let has = |a: &str| members.iter().any(|m| m.eq_ignore_ascii_case(a));
                has(watcher) && has(watched)
            }),
        }
    }
}

/// A `Replaces` header value (RFC 3891 §6.1): `call-id;to-tag=..;from-tag=..[;early-only]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    /// The Call-ID of the dialog to replace.
    pub call_id: String,
    /// `to-tag`.
    pub to_tag: String,
    /// `from-tag`.
    pub from_tag: String,
    /// `early-only`: replace it only while it is not answered.
    pub early_only: bool,
}

impl Replaces {
    /// Parses a header value; `None` when a part is missing.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.split(';').map(str::trim);
        let call_id = parts.next().filter(|c| !c.is_empty())?.to_string();
        let (mut to_tag, mut from_tag, mut early_only) = (None, None, false);
        for p in parts {
            let (name, value) = p.split_once('=').unwrap_or((p, ""));
            match name.trim().to_ascii_lowercase().as_str() {
                "to-tag" => to_tag = Some(value.trim().to_string()),
                "from-tag" => from_tag = Some(value.trim().to_string()),
                "early-only" => early_only = true,
                _ => {}
            }
        }
        Some(Self {
            call_id,
            to_tag: to_tag?,
            from_tag: from_tag?,
            early_only,
        })
    }
}

/// Why a pickup is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickupRefusal {
    /// 481: no ringing call of a watched user matches (answered, ended, or never ours).
    NoSuchCall,
    /// 403: the picker may not watch the called user.
    Forbidden,
}

/// The ringing leg `replaces` names, when `picker` may pick it up: matched by Call-ID and the
/// caller's From tag (phones put it in `from-tag` or `to-tag` depending on whose side they
/// build it from), among the calls ringing for a user `policy` lets `picker` watch.
pub fn pickup<'c>(
    calls: &'c Calls,
    replaces: &Replaces,
    picker: &str,
    policy: &WatchPolicy,
) -> Result<(&'c str, &'c Leg), PickupRefusal> {
    let mut forbidden = false;
    for (aor, leg) in calls.legs_of_call(&replaces.call_id) {
        if leg.from_tag != replaces.from_tag && leg.from_tag != replaces.to_tag {
            continue;
        }
        if calls.ringing(aor, &leg.call_id).is_none() {
            continue;
        }
        if !policy.may_watch(picker, aor) {
            forbidden = true;
            continue;
        }
        return Ok((aor, leg));
    }
    Err(if forbidden {
        PickupRefusal::Forbidden
    } else {
        PickupRefusal::NoSuchCall
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::{Direction, NewLeg, Party};
    use super::*;

    fn ringing_call() -> Calls {
        let mut c = Calls::default();
        c.start(
            "2001@ward.test",
            NewLeg {
                call_id: "c9@192.0.2.1".into(),
                direction: Direction::Recipient,
                from_tag: "caller-tag".into(),
                local: Party::default(),
                remote: Party {
                    identity: "sip:2002@ward.test".into(),
                    display: None,
                    target: Some("sip:2002@192.0.2.1:5060".into()),
                },
            },
            Instant::now(),
        );
        c.response("c9@192.0.2.1", "b1", 180, Some("callee-tag"), None);
        c
    }

    #[test]
    fn replaces_headers_parse_as_phones_write_them() {
        let r = Replaces::parse("c9@192.0.2.1;to-tag=caller-tag;from-tag=callee-tag;early-only")
            .expect("replaces");
        assert_eq!(r.call_id, "c9@192.0.2.1");
        assert_eq!(
            (r.to_tag.as_str(), r.from_tag.as_str(), r.early_only),
            ("caller-tag", "callee-tag", true)
        );
        assert!(Replaces::parse("c9;to-tag=a").is_none());
        assert!(Replaces::parse(";to-tag=a;from-tag=b").is_none());
    }

    #[test]
    fn a_watched_ringing_call_can_be_picked_up_and_no_other() {
        let c = ringing_call();
        let policy = WatchPolicy::default();
        // Either tag order (the phone's view of the dialog).
        for v in [
            "c9@192.0.2.1;to-tag=caller-tag;from-tag=callee-tag",
            "c9@192.0.2.1;to-tag=callee-tag;from-tag=caller-tag",
        ] {
            let r = Replaces::parse(v).expect("replaces");
            let (aor, leg) = pickup(&c, &r, "2003@ward.test", &policy).expect("pickup");
            assert_eq!(aor, "2001@ward.test");
            assert_eq!(
                leg.remote.target.as_deref(),
                Some("sip:2002@192.0.2.1:5060")
            );
        }
        let r = Replaces::parse("c9@192.0.2.1;to-tag=caller-tag;from-tag=x").expect("r");
        assert_eq!(
            pickup(&c, &r, "someone@other.test", &policy).map(|_| ()),
            Err(PickupRefusal::Forbidden)
        );
        let wrong = Replaces::parse("c1;to-tag=caller-tag;from-tag=x").expect("r");
        assert_eq!(
            pickup(&c, &wrong, "2003@ward.test", &policy).map(|_| ()),
            Err(PickupRefusal::NoSuchCall)
        );
        // Answered: no longer ringing.
        let mut c = ringing_call();
        c.response("c9@192.0.2.1", "b1", 200, Some("callee-tag"), None);
        assert_eq!(
            pickup(&c, &r, "2003@ward.test", &policy).map(|_| ()),
            Err(PickupRefusal::NoSuchCall)
        );
    }

    #[test]
    fn groups_limit_who_watches_whom() {
        let policy = WatchPolicy::Groups(HashMap::from([(
            "ward-7".to_string(),
            vec!["2001@ward.test".to_string(), "2003@ward.test".to_string()],
        )]));
        assert!(policy.may_watch("2003@ward.test", "2001@WARD.test"));
        assert!(!policy.may_watch("2004@ward.test", "2001@ward.test"));
        assert!(WatchPolicy::SameDomain.may_watch("a@x.test", "b@X.test"));
        assert!(!WatchPolicy::SameDomain.may_watch("a@x.test", "b@y.test"));
        assert!(!WatchPolicy::SameDomain.may_watch("nodomain", "b@y.test"));
    }
}
