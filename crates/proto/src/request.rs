//! Requests built from other messages.

use std::fmt::Write as _;

use bytes::Bytes;

use crate::header::HeaderName;
use crate::message::Message;
use crate::scan;

/// The ACK a client transaction sends for a non-2xx final response to an INVITE
/// (RFC 3261 §17.1.1.3): same Request-URI, top Via, Route, From, Call-ID and CSeq number as the
/// INVITE, and the To of the response (with its tag).
pub fn ack_for(invite: &Message, response: &Message) -> Bytes {
    let mut s = String::with_capacity(invite.bytes().len().min(1024));
    let _ = write!(s, "ACK {} SIP/2.0\r\n", invite.request_uri_str());
    if let Some(via) = invite.values(HeaderName::Via).next() {
        let _ = write!(s, "Via: {via}\r\n");
    }
    for route in invite.headers_named(HeaderName::Route) {
        let _ = write!(s, "Route: {}\r\n", scan::trim(route));
    }
    if let Some(from) = invite.header(HeaderName::From) {
        let _ = write!(s, "From: {}\r\n", scan::trim(from));
    }
    if let Some(to) = response.header(HeaderName::To) {
        let _ = write!(s, "To: {}\r\n", scan::trim(to));
    }
    if let Some(call_id) = invite.call_id() {
        let _ = write!(s, "Call-ID: {call_id}\r\n");
    }
    let seq = invite.cseq().map_or(0, |c| c.0);
    let _ = write!(
        s,
        "CSeq: {seq} ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    Bytes::from(s)
}

/// The CANCEL for an INVITE we forwarded (RFC 3261 §9.1): same Request-URI, the INVITE's top
/// Via (so it matches the same transaction downstream), Route, From, To, Call-ID and CSeq
/// number.
pub fn cancel_for(invite: &Message) -> Bytes {
    let mut s = String::with_capacity(512);
    let _ = write!(s, "CANCEL {} SIP/2.0\r\n", invite.request_uri_str());
    if let Some(via) = invite.values(HeaderName::Via).next() {
        let _ = write!(s, "Via: {via}\r\n");
    }
    for route in invite.headers_named(HeaderName::Route) {
        let _ = write!(s, "Route: {}\r\n", scan::trim(route));
    }
    for (name, h) in [("From", HeaderName::From), ("To", HeaderName::To)] {
        if let Some(v) = invite.header(h) {
            let _ = write!(s, "{name}: {}\r\n", scan::trim(v));
        }
    }
    if let Some(call_id) = invite.call_id() {
        let _ = write!(s, "Call-ID: {call_id}\r\n");
    }
    let seq = invite.cseq().map_or(0, |c| c.0);
    let _ = write!(
        s,
        "CSeq: {seq} CANCEL\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ParseLimits;

    fn parse(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.replace('\n', "\r\n")),
            &ParseLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn ack_copies_the_right_fields() {
        let invite = parse(
            "INVITE sip:bob@192.0.2.4 SIP/2.0\nVia: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1\nVia: SIP/2.0/UDP alice.example.com;branch=z9hG4bKa1\nRoute: <sip:next.example.com;lr>\nMax-Forwards: 69\nFrom: <sip:alice@example.com>;tag=fa\nTo: <sip:bob@example.com>\nCall-ID: c1\nCSeq: 7 INVITE\nContent-Length: 0\n\n",
        );
        let resp = parse(
            "SIP/2.0 486 Busy Here\nVia: SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp1\nVia: SIP/2.0/UDP alice.example.com;branch=z9hG4bKa1\nFrom: <sip:alice@example.com>;tag=fa\nTo: <sip:bob@example.com>;tag=tb\nCall-ID: c1\nCSeq: 7 INVITE\nContent-Length: 0\n\n",
        );
        let ack = Message::parse(ack_for(&invite, &resp), &ParseLimits::default()).unwrap();
        ack.validate().unwrap();
        assert_eq!(ack.method_str(), "ACK");
        assert_eq!(ack.request_uri_str(), "sip:bob@192.0.2.4");
        assert_eq!(ack.values(HeaderName::Via).count(), 1);
        assert_eq!(ack.top_via().unwrap().branch(), Some("z9hG4bKp1"));
        assert_eq!(ack.to().unwrap().tag(), Some("tb"));
        assert_eq!(ack.cseq(), Some((7, "ACK")));
        assert_eq!(
            ack.header(HeaderName::Route),
            Some("<sip:next.example.com;lr>")
        );
    }
}
