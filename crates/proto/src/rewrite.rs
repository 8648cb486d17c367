//! Forwarding edits (RFC 3261 §16.6, §16.7 step 3): a proxy changes a few header fields and
//! passes everything else (unknown headers, their order, the body) through byte for byte.

use bytes::{BufMut, Bytes, BytesMut};

use crate::header::HeaderName;
use crate::message::Message;
use crate::scan;

/// Edits to apply to a request being forwarded.
#[derive(Debug, Default)]
pub struct RequestEdit<'a> {
    /// Replaces the Request-URI (the target chosen by the location service).
    pub request_uri: Option<&'a str>,
    /// A Via value pushed on top (ours, with a fresh branch).
    pub via: Option<&'a str>,
    /// Record-Route values inserted on top, in order.
    pub record_route: Vec<&'a str>,
    /// Route values inserted above the request's own (a registered Path, RFC 3327).
    pub push_routes: Vec<&'a str>,
    /// Removes this many Route values from the top (they name us: loose routing, §16.4; two
    /// when we recorded the route twice, once per transport).
    pub pop_routes: usize,
    /// Removes the last Route value (it became the Request-URI: strict-router fix, §16.4).
    pub drop_last_route: bool,
    /// The Max-Forwards value to write (added when the request had none).
    pub max_forwards: Option<u32>,
}

impl RequestEdit<'_> {
    /// Serializes `msg` with the edits applied.
    pub fn apply(&self, msg: &Message) -> Bytes {
        let mut out = BytesMut::with_capacity(msg.bytes().len() + 256);
        match self.request_uri {
            Some(uri) => {
                out.put_slice(msg.method_str().as_bytes());
                out.put_u8(b' ');
                out.put_slice(uri.as_bytes());
                out.put_slice(b" SIP/2.0\r\n");
            }
            None => out.put_slice(msg.start_line_bytes()),
        }
        if let Some(via) = self.via {
            line(&mut out, "Via", via);
        }
        for rr in &self.record_route {
            line(&mut out, "Record-Route", rr);
        }
        for r in &self.push_routes {
            line(&mut out, "Route", r);
        }
        let mut to_pop = self.pop_routes;
        let route_total = if self.drop_last_route {
            msg.values(HeaderName::Route).count()
        } else {
            0
        };
        let mut route_seen = 0;
        let mut wrote_mf = false;
        for f in msg.fields() {
            match f.name {
                HeaderName::MaxForwards if self.max_forwards.is_some() => {
                    if !wrote_mf {
                        line(
                            &mut out,
                            "Max-Forwards",
                            &self.max_forwards.unwrap_or(70).to_string(),
                        );
                        wrote_mf = true;
                    }
                }
                HeaderName::Route if to_pop > 0 || self.drop_last_route => {
                    // Keep the values of this line that are not removed.
                    let mut kept: Vec<&str> = Vec::new();
                    for v in scan::split_list(msg.field_value(f)).filter(|v| !v.is_empty()) {
                        route_seen += 1;
                        if to_pop > 0 {
                            to_pop -= 1;
                        } else if !(self.drop_last_route && route_seen == route_total) {
                            kept.push(v);
                        }
                    }
                    if !kept.is_empty() {
                        line(&mut out, msg.field_name(f), &kept.join(", "));
                    }
                }
                _ => out.put_slice(msg.field_line(f)),
            }
        }
        if let (Some(mf), false) = (self.max_forwards, wrote_mf) {
            line(&mut out, "Max-Forwards", &mf.to_string());
        }
        out.put_slice(b"\r\n");
        out.put_slice(msg.body());
        out.freeze()
    }
}

/// The message with its body replaced and Content-Length set to the new length (the compact
/// form `l` too); every other header line kept byte for byte.
pub fn replace_body(msg: &Message, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(msg.bytes().len() + body.len());
    out.put_slice(msg.start_line_bytes());
    for f in msg.fields() {
        if f.name == HeaderName::ContentLength {
            continue;
        }
        out.put_slice(msg.field_line(f));
    }
    line(&mut out, "Content-Length", &body.len().to_string());
    out.put_slice(b"\r\n");
    out.put_slice(body);
    out.freeze()
}

/// A response with its top Via value removed (RFC 3261 §16.7 step 3), all else unchanged.
pub fn strip_top_via(msg: &Message) -> Bytes {
    let mut out = BytesMut::with_capacity(msg.bytes().len());
    out.put_slice(msg.start_line_bytes());
    let mut stripped = false;
    for f in msg.fields() {
        if f.name == HeaderName::Via && !stripped {
            stripped = true;
            let value = msg.field_value(f);
            if let Some(i) = scan::find_unquoted(value, b',') {
                let rest = scan::trim(&value[i + 1..]);
                if !rest.is_empty() {
                    line(&mut out, msg.field_name(f), rest);
                }
            }
            continue;
        }
        out.put_slice(msg.field_line(f));
    }
    out.put_slice(b"\r\n");
    out.put_slice(msg.body());
    out.freeze()
}

fn line(out: &mut BytesMut, name: &str, value: &str) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ParseLimits;

    fn parse(b: Bytes) -> Message {
        let m = Message::parse(b, &ParseLimits::default()).unwrap();
        m.validate().unwrap();
        m
    }

    const INVITE: &str = "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa\r\nRoute: <sip:proxy.example.com;lr>, <sip:next.example.net;lr>\r\nX-Unknown:   keep   this  exactly\r\nMax-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n";

    #[test]
    fn forwarding_edits_touch_only_what_they_must() {
        let m = parse(Bytes::from_static(INVITE.as_bytes()));
        let out = RequestEdit {
            request_uri: Some("sip:bob@192.0.2.9:5062"),
            via: Some("SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp"),
            record_route: vec!["<sip:proxy.example.com;lr>"],
            push_routes: Vec::new(),
            pop_routes: 1,
            drop_last_route: false,
            max_forwards: Some(69),
        }
        .apply(&m);
        let s = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            s,
            "INVITE sip:bob@192.0.2.9:5062 SIP/2.0\r\nVia: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp\r\nRecord-Route: <sip:proxy.example.com;lr>\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa\r\nRoute: <sip:next.example.net;lr>\r\nX-Unknown:   keep   this  exactly\r\nMax-Forwards: 69\r\nFrom: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n"
        );
        parse(out);
    }

    #[test]
    fn no_edits_is_byte_identical_and_missing_max_forwards_is_added() {
        let m = parse(Bytes::from_static(INVITE.as_bytes()));
        assert_eq!(
            RequestEdit::default().apply(&m),
            Bytes::from_static(INVITE.as_bytes())
        );
        let no_mf = INVITE.replace("Max-Forwards: 70\r\n", "");
        let m = parse(Bytes::from(no_mf));
        let out = RequestEdit {
            max_forwards: Some(70),
            ..RequestEdit::default()
        }
        .apply(&m);
        assert_eq!(parse(out).header(HeaderName::MaxForwards), Some("70"));
    }

    #[test]
    fn response_loses_exactly_the_top_via() {
        let r = "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp, SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa\r\nFrom: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n";
        let m = parse(Bytes::from_static(r.as_bytes()));
        let out = parse(strip_top_via(&m));
        assert_eq!(out.top_via().unwrap().branch(), Some("z9hG4bKa"));
        assert_eq!(out.values(HeaderName::Via).count(), 1);
        let two_lines = r.replace(
            ", SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa",
            "\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa",
        );
        let m = parse(Bytes::from(two_lines));
        let out = strip_top_via(&m);
        assert!(out.starts_with(
            b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKa\r\nFrom:"
        ));
    }
}
