//! The `application/dialog-info+xml` body (RFC 4235 §4): one `<dialog>` per call leg of the
//! watched user with its state, direction, Call-ID and tags (what a phone's pickup builds
//! `Replaces` from) and both parties' identity and target.

use std::fmt::Write as _;

use super::{DialogState, Leg, Party};

/// What some phones need differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quirks {
    /// An idle user is sent one `terminated` dialog rather than none (phones that keep a lamp
    /// lit on an empty `full` body).
    pub idle_as_terminated: bool,
    /// One `<dialog>` per body, the one the lamp should show (a ringing call before an
    /// answered one, since that is what a press picks up): phones that read only the first
    /// `<dialog>` of a body, or mix up several.
    pub single_dialog: bool,
}

impl Quirks {
    /// The quirks named in `list` (`idle-terminated`, `single-dialog`, comma separated);
    /// `Err` names an unknown one.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut q = Self::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "idle-terminated" => q.idle_as_terminated = true,
                "single-dialog" => q.single_dialog = true,
                other => {
                    return Err(format!(
                        "unknown quirk `{other}` (known: idle-terminated, single-dialog)"
                    ));
                }
            }
        }
        Ok(q)
    }
}

/// The leg a one-dialog body shows: ringing first, then answered, then being set up, then the
/// latest ended.
fn most_telling<'l>(legs: &[&'l Leg]) -> Option<&'l Leg> {
    let rank = |s: DialogState| match s {
        DialogState::Early => 4,
        DialogState::Confirmed => 3,
        DialogState::Proceeding => 2,
        DialogState::Trying => 1,
        DialogState::Terminated => 0,
    };
    legs.iter()
        .copied()
        .enumerate()
        .max_by_key(|(i, l)| (rank(l.state), *i))
        .map(|(_, l)| l)
}

/// The body for `entity` (the watched AoR's URI) at `version`, listing `legs` (a `full`
/// state: every NOTIFY says everything, so a lost one is repaired by the next).
pub fn render(entity: &str, version: u32, legs: &[&Leg], quirks: Quirks) -> String {
    let mut s = String::with_capacity(256 + 512 * legs.len());
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<dialog-info xmlns=\"urn:ietf:params:xml:ns:dialog-info\" version=\"{version}\" state=\"full\" entity=\"{}\">",
        escape(entity)
    );
    let shown: Vec<&Leg> = if quirks.single_dialog {
        most_telling(legs).into_iter().collect()
    } else {
        legs.to_vec()
    };
    if shown.is_empty() && quirks.idle_as_terminated {
        s.push_str("  <dialog id=\"idle\"><state>terminated</state></dialog>\n");
    }
    for leg in shown {
        let _ = write!(
            s,
            "  <dialog id=\"{}\" call-id=\"{}\"",
            escape(&leg.id()),
            escape(&leg.call_id)
        );
        if let Some(t) = leg.local_tag() {
            let _ = write!(s, " local-tag=\"{}\"", escape(t));
        }
        if let Some(t) = leg.remote_tag() {
            let _ = write!(s, " remote-tag=\"{}\"", escape(t));
        }
        let _ = writeln!(s, " direction=\"{}\">", leg.direction.as_str());
        let _ = writeln!(s, "    <state>{}</state>", leg.state.as_str());
        party(&mut s, "local", &leg.local);
        party(&mut s, "remote", &leg.remote);
        s.push_str("  </dialog>\n");
    }
    s.push_str("</dialog-info>\n");
    s
}

/// Whether a body with `legs` shows the user busy or ringing (for presence and tests).
pub fn busy(legs: &[&Leg]) -> bool {
    legs.iter().any(|l| l.state != DialogState::Terminated)
}

fn party(s: &mut String, name: &str, p: &Party) {
    let _ = write!(s, "    <{name}><identity");
    if let Some(d) = &p.display {
        let _ = write!(s, " display=\"{}\"", escape(d));
    }
    let _ = write!(s, ">{}</identity>", escape(&p.identity));
    if let Some(t) = &p.target {
        let _ = write!(s, "<target uri=\"{}\"/>", escape(t));
    }
    let _ = writeln!(s, "</{name}>");
}

/// XML text and attribute escaping (the five predefined entities).
pub(crate) fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['&', '<', '>', '"', '\'']) {
        return std::borrow::Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::{Calls, Direction, NewLeg};
    use super::*;

    #[test]
    fn a_ringing_call_is_rendered_with_what_pickup_needs() {
        let mut c = Calls::default();
        let t0 = Instant::now();
        c.start(
            "2001@ward.test",
            NewLeg {
                call_id: "c1@192.0.2.1".into(),
                direction: Direction::Recipient,
                from_tag: "ft\"1".into(),
                local: Party {
                    identity: "sip:2001@ward.test".into(),
                    ..Party::default()
                },
                remote: Party {
                    identity: "sip:2002@ward.test".into(),
                    display: Some("Clerk <B&B>".into()),
                    target: Some("sip:2002@192.0.2.1:5060".into()),
                },
            },
            t0,
        );
        c.response("c1@192.0.2.1", "b1", 180, Some("desk"), None);
        let legs: Vec<&Leg> = c.legs("2001@ward.test").iter().collect();
        let body = render("sip:2001@ward.test", 4, &legs, Quirks::default());
        assert!(body.contains("version=\"4\" state=\"full\" entity=\"sip:2001@ward.test\""));
        assert!(body.contains(
            "<dialog id=\"recipient-c1@192.0.2.1\" call-id=\"c1@192.0.2.1\" local-tag=\"desk\" remote-tag=\"ft&quot;1\" direction=\"recipient\">"
        ), "{body}");
        assert!(body.contains("<state>early</state>"), "{body}");
        assert!(body.contains(
            "<remote><identity display=\"Clerk &lt;B&amp;B&gt;\">sip:2002@ward.test</identity><target uri=\"sip:2002@192.0.2.1:5060\"/></remote>"
        ), "{body}");
        assert!(busy(&legs));
        // Idle: no dialog, or one terminated for the phones that need it.
        let idle = render("sip:2001@ward.test", 5, &[], Quirks::default());
        assert!(!idle.contains("<dialog "), "{idle}");
        let quirk = render(
            "sip:2001@ward.test",
            5,
            &[],
            Quirks {
                idle_as_terminated: true,
                ..Quirks::default()
            },
        );
        assert!(quirk.contains("<state>terminated</state>"), "{quirk}");
        assert!(!busy(&[]));
    }

    #[test]
    fn a_single_dialog_body_shows_the_ringing_call_over_the_answered_one() {
        let mut c = Calls::default();
        let t0 = Instant::now();
        for (call_id, code) in [("up", 200), ("rings", 180)] {
            c.start(
                "2001@w",
                NewLeg {
                    call_id: call_id.into(),
                    direction: Direction::Recipient,
                    from_tag: "f".into(),
                    local: Party::default(),
                    remote: Party::default(),
                },
                t0,
            );
            c.response(call_id, "b", code, Some("t"), None);
        }
        let legs: Vec<&Leg> = c.legs("2001@w").iter().collect();
        let q = Quirks::parse("single-dialog").expect("known");
        let body = render("sip:2001@w", 1, &legs, q);
        assert_eq!(body.matches("<dialog ").count(), 1, "{body}");
        assert!(body.contains("call-id=\"rings\""), "{body}");
        assert_eq!(
            render("sip:2001@w", 1, &legs, Quirks::default())
                .matches("<dialog ")
                .count(),
            2
        );
        c.end("rings", t0);
        let legs: Vec<&Leg> = c.legs("2001@w").iter().collect();
        assert!(render("sip:2001@w", 2, &legs, q).contains("call-id=\"up\""));
        assert_eq!(
            Quirks::parse(" idle-terminated ,single-dialog"),
            Ok(Quirks {
                idle_as_terminated: true,
                single_dialog: true
            })
        );
        assert!(Quirks::parse("blink").unwrap_err().contains("blink"));
    }
}
