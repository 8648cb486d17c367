//! Property tests: the parser never panics on any input, and what we build parses back.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use careflow_proto::framing::{Frame, next_frame};
use careflow_proto::{HeaderName, Message, NameAddr, ParseLimits, ResponseBuilder, Uri, Via};
use proptest::prelude::*;

const VALID: &str = "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776;rport\r\nMax-Forwards: 70\r\nFrom: \"A\" <sip:alice@example.com>;tag=a1\r\nTo: <sip:alice@example.com>\r\nCall-ID: c1@h\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@10.0.0.1:5060;transport=udp>;expires=60, <sip:a2@h>\r\nAuthorization: Digest username=\"alice\", realm=\"example.com\", nonce=\"n\", uri=\"sip:example.com\", response=\"r\"\r\nContent-Length: 4\r\n\r\nbody";

/// Touches every accessor, as the server would.
fn exercise(bytes: Vec<u8>) {
    let Ok(m) = Message::parse(Bytes::from(bytes), &ParseLimits::default()) else {
        return;
    };
    let _ = m.validate();
    let _ = (
        m.method(),
        m.method_str(),
        m.request_uri(),
        m.status(),
        m.reason(),
        m.call_id(),
        m.cseq(),
        m.body(),
    );
    let _ = (
        m.top_via().map(|v| (v.branch(), v.rport(), v.received())),
        m.from().map(|f| f.tag()),
        m.to(),
    );
    for v in m.values(HeaderName::Contact) {
        let _ = NameAddr::parse(v).map(|n| (n.uri.aor(), n.params.iter().count()));
    }
    for v in m.values(HeaderName::Via) {
        let _ = Via::parse(v);
    }
    for v in m.headers_named(HeaderName::Authorization) {
        let _ = careflow_proto::digest::Credentials::parse(v).map(|c| c.nc_value());
    }
    if m.is_request() && m.top_via().is_some() {
        let _ = ResponseBuilder::new(&m, 400)
            .source("192.0.2.1:5060".parse().unwrap())
            .to_tag("x")
            .build();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..1500)) {
        exercise(b);
    }

    #[test]
    fn mutated_messages_never_panic(edits in proptest::collection::vec((0usize..VALID.len(), any::<u8>(), 0u8..3), 1..12), cut in 0usize..=VALID.len()) {
        let mut b = VALID.as_bytes().to_vec();
        for (pos, byte, op) in edits {
            let pos = pos.min(b.len().saturating_sub(1));
            match op {
                0 if !b.is_empty() => b[pos] = byte,
                1 => b.insert(pos, byte),
                _ if !b.is_empty() => { b.remove(pos); }
                _ => {}
            }
        }
        b.truncate(cut.max(1).min(b.len()));
        exercise(b);
    }

    #[test]
    fn built_requests_parse_back(
        user in "[a-z][a-z0-9._-]{0,15}",
        host in "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5}){1,2}",
        tag in "[A-Za-z0-9]{1,12}",
        call_id in "[A-Za-z0-9.@-]{1,30}",
        cseq in 0u32..(1 << 31),
        port in 1u16..,
        body in "[ -~]{0,64}",
        compact in any::<bool>(),
    ) {
        let (v, f, t, i) = if compact { ("v", "f", "t", "i") } else { ("Via", "From", "To", "Call-ID") };
        let s = format!(
            "MESSAGE sip:{user}@{host} SIP/2.0\r\n{v}: SIP/2.0/TCP {host}:{port};branch=z9hG4bK{tag}\r\n{f}: <sip:{user}@{host}>;tag={tag}\r\n{t}: sip:{user}@{host}\r\n{i}: {call_id}\r\nCSeq: {cseq} MESSAGE\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let m = Message::parse(Bytes::from(s.clone()), &ParseLimits::default()).unwrap();
        m.validate().unwrap();
        prop_assert_eq!(m.call_id(), Some(call_id.as_str()));
        prop_assert_eq!(m.cseq(), Some((cseq, "MESSAGE")));
        prop_assert_eq!(m.from().unwrap().tag(), Some(tag.as_str()));
        prop_assert_eq!(m.body(), body.as_bytes());
        let via = m.top_via().unwrap();
        prop_assert_eq!(via.port, Some(port));
        prop_assert_eq!(via.host.as_str(), host.as_str());
        let uri = Uri::parse(m.request_uri_str()).unwrap();
        prop_assert_eq!(uri.aor().unwrap(), format!("{user}@{host}"));
        // Every header line passes through byte for byte.
        let mut rebuilt = m.start_line_bytes().to_vec();
        for f in m.fields() {
            rebuilt.extend_from_slice(m.field_line(f));
        }
        rebuilt.extend_from_slice(b"\r\n");
        rebuilt.extend_from_slice(m.body());
        prop_assert_eq!(rebuilt, s.into_bytes());
        // Responses we build parse and carry the same transaction identifiers.
        let r = ResponseBuilder::new(&m, 200).source("127.0.0.1:9".parse().unwrap()).to_tag("srv").build();
        let rm = Message::parse(r, &ParseLimits::default()).unwrap();
        rm.validate().unwrap();
        prop_assert_eq!(rm.call_id(), Some(call_id.as_str()));
        prop_assert_eq!(rm.cseq(), Some((cseq, "MESSAGE")));
        prop_assert_eq!(rm.to().unwrap().tag(), Some("srv"));
    }

    #[test]
    fn stream_framing_is_independent_of_segmentation(n in 1usize..4, splits in proptest::collection::vec(1usize..200, 0..8)) {
        let stream: Vec<u8> = std::iter::repeat_n(VALID.as_bytes(), n).flatten().copied().collect();
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        let mut fed = 0;
        let mut cuts = splits.clone();
        cuts.push(stream.len());
        for c in cuts {
            let end = (fed + c).min(stream.len());
            buf.extend_from_slice(&stream[fed..end]);
            fed = end;
            while let Ok(Frame::Message(len)) = next_frame(&buf, 65536) {
                frames.push(buf.drain(..len).collect::<Vec<u8>>());
            }
        }
        prop_assert_eq!(frames.len(), n);
        for f in frames {
            prop_assert_eq!(f, VALID.as_bytes().to_vec());
        }
    }
}
