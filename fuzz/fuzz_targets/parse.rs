//! Parse arbitrary bytes as a datagram and as a stream; touch every typed view; build a
//! response and a forwarded request; re-parse them. Nothing may panic, and our own output must always parse.
#![no_main]

use bytes::Bytes;
use careflow_proto::framing::{Frame, next_frame};
use careflow_proto::{HeaderName, Message, NameAddr, ParseLimits, ResponseBuilder, Via};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = ParseLimits::default();
    // Stream framing over the same bytes.
    let mut rest = data;
    while let Ok(Frame::Message(n) | Frame::KeepAlive { len: n, .. }) = next_frame(rest, limits.max_size) {
        rest = &rest[n..];
    }
    let Ok(m) = Message::parse(Bytes::copy_from_slice(data), &limits) else { return };
    let valid = m.validate().is_ok();
    let _ = (m.request_uri().map(|u| u.aor()), m.cseq(), m.call_id(), m.body().len());
    for v in m.values(HeaderName::Via) {
        let _ = Via::parse(v).map(|v| (v.branch(), v.rport(), v.has_rfc3261_branch()));
    }
    for v in m.values(HeaderName::Contact) {
        let _ = NameAddr::parse(v).map(|n| (n.uri.aor(), n.tag(), n.params.well_formed()));
    }
    for v in m.headers_named(HeaderName::Authorization) {
        let _ = careflow_proto::digest::Credentials::parse(v).map(|c| c.nc_value());
    }
    if valid && m.is_request() {
        let r = ResponseBuilder::new(&m, 400).source("192.0.2.1:5060".parse().unwrap()).to_tag("t").build();
        let parsed = Message::parse(r, &limits).expect("our response parses");
        parsed.validate().expect("our response validates");
        assert_eq!(parsed.call_id(), m.call_id());
        // What a proxy forwards from a valid request is valid too.
        let fwd = careflow_proto::rewrite::RequestEdit {
            request_uri: Some("sip:target@192.0.2.9:5062"),
            via: Some("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKfuzz"),
            record_route: vec!["<sip:192.0.2.1;lr>"],
            push_routes: vec!["<sip:edge@192.0.2.7;lr>"],
            pop_routes: 2,
            drop_last_route: true,
            max_forwards: Some(69),
        }
        .apply(&m);
        let fm = Message::parse(fwd, &limits).expect("forwarded request parses");
        // Our Via makes one more: a request already at the Via bound cannot be forwarded.
        if m.values(HeaderName::Via).count() < careflow_proto::MAX_VIAS {
            fm.validate().expect("forwarded request validates");
        }
        assert_eq!(fm.body(), m.body());
    }
    if valid && !m.is_request() {
        let r = Message::parse(careflow_proto::rewrite::strip_top_via(&m), &limits).expect("parses");
        assert_eq!(r.body(), m.body());
    }
});
