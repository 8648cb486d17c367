//! Presence for softphones and the web app (RFC 3856, PIDF RFC 3863 with RPID RFC 4480) from
//! what the server knows itself: a registered device and the proxy's calls. No PUBLISH: a
//! user is `open` with a device registered and no call, on the phone while in a call, and
//! `closed` with no device.

use super::{DialogState, Direction, Leg};

/// What a watcher is told of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// A device is registered and the user is in no call (ringing is still available).
    Open,
    /// In a call: answered, or calling out.
    OnThePhone,
    /// No device registered.
    Closed,
}

impl Availability {
    /// Of a user with (`registered`) or without a device, and their call legs.
    pub fn of(registered: bool, legs: &[&Leg]) -> Self {
        let in_call = legs.iter().any(|l| {
            l.state == DialogState::Confirmed
                || (l.direction == Direction::Initiator && l.state != DialogState::Terminated)
        });
        if in_call {
            Self::OnThePhone
        } else if registered {
            Self::Open
        } else {
            Self::Closed
        }
    }
}

/// The `application/pidf+xml` body for `entity` (the watched AoR's URI). The RPID activity is
/// written with the `rpid:` prefix and self-closed: baresip (and others) match that text
/// rather than parse the namespace.
pub fn render_pidf(entity: &str, a: Availability) -> String {
    let (basic, person, note) = match a {
        Availability::Open => ("open", "", "Available"),
        Availability::OnThePhone => (
            "open",
            "<rpid:activities><rpid:on-the-phone/></rpid:activities>",
            "On the phone",
        ),
        Availability::Closed => ("closed", "", "Offline"),
    };
    let entity = super::info::escape(entity);
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <presence xmlns=\"urn:ietf:params:xml:ns:pidf\" xmlns:dm=\"urn:ietf:params:xml:ns:pidf:data-model\" xmlns:rpid=\"urn:ietf:params:xml:ns:pidf:rpid\" entity=\"{entity}\">\n  \
         <tuple id=\"careflow\"><status><basic>{basic}</basic></status><note>{note}</note></tuple>\n  \
         <dm:person id=\"user\">{person}<dm:note>{note}</dm:note></dm:person>\n\
         </presence>\n"
    )
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::{Calls, NewLeg, Party};
    use super::*;

    fn call(c: &mut Calls, direction: Direction) {
        c.start(
            "2001@w",
            NewLeg {
                call_id: "c1".into(),
                direction,
                from_tag: "f".into(),
                local: Party::default(),
                remote: Party::default(),
            },
            Instant::now(),
        );
    }

    #[test]
    fn open_with_a_device_on_the_phone_in_a_call_closed_without_a_device() {
        let legs = |c: &Calls| -> Vec<Leg> { c.legs("2001@w").to_vec() };
        let mut c = Calls::default();
        assert_eq!(Availability::of(true, &[]), Availability::Open);
        assert_eq!(Availability::of(false, &[]), Availability::Closed);
        // Called and ringing: still available; answered: on the phone; hung up: open again.
        call(&mut c, Direction::Recipient);
        c.response("c1", "b1", 180, Some("t"), None);
        let l = legs(&c);
        assert_eq!(
            Availability::of(true, &l.iter().collect::<Vec<_>>()),
            Availability::Open
        );
        c.response("c1", "b1", 200, Some("t"), None);
        let l = legs(&c);
        let on = Availability::of(true, &l.iter().collect::<Vec<_>>());
        assert_eq!(on, Availability::OnThePhone);
        c.end("c1", Instant::now());
        let l = legs(&c);
        assert_eq!(
            Availability::of(true, &l.iter().collect::<Vec<_>>()),
            Availability::Open
        );
        // Calling out is on the phone from the first moment.
        let mut c = Calls::default();
        call(&mut c, Direction::Initiator);
        let l = legs(&c);
        assert_eq!(
            Availability::of(true, &l.iter().collect::<Vec<_>>()),
            Availability::OnThePhone
        );
    }

    #[test]
    fn the_body_is_what_baresip_and_pidf_readers_match() {
        let busy = render_pidf("sip:2001@w", Availability::OnThePhone);
        assert!(busy.contains("entity=\"sip:2001@w\""), "{busy}");
        assert!(busy.contains("<basic>open</basic>"), "{busy}");
        assert!(busy.contains("<rpid:on-the-phone/>"), "{busy}");
        let open = render_pidf("sip:2001@w", Availability::Open);
        assert!(open.contains("<basic>open</basic>") && !open.contains("on-the-phone"));
        let closed = render_pidf("sip:a&b@w", Availability::Closed);
        assert!(closed.contains("<basic>closed</basic>"), "{closed}");
        assert!(closed.contains("entity=\"sip:a&amp;b@w\""), "{closed}");
    }
}
