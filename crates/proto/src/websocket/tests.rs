//! Frames, masks, fragments and limits of the WebSocket codec.

use super::*;

fn masked(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut v = vec![if fin { 0x80 } else { 0 } | op];
    match payload.len() {
        n if n < 126 => v.push(0x80 | n as u8),
        n if n < 65536 => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    v
}

#[test]
fn accept_key_matches_rfc_example() {
    // RFC 6455 §1.3.
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn base64_padding() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
}

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: sip.example.com\r\nUpgrade: websocket\r\n\
    Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Origin: https://app.careflow.example\r\nSec-WebSocket-Protocol: sip\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn parses_and_checks_an_upgrade() {
    assert_eq!(parse_upgrade(&UPGRADE.as_bytes()[..40]), Ok(None));
    let mut raw = UPGRADE.as_bytes().to_vec();
    raw.extend_from_slice(b"\x81");
    let u = parse_upgrade(&raw).unwrap().unwrap();
    assert_eq!(u.len, UPGRADE.len());
    assert!(u.offers_sip);
    assert_eq!(u.origin.as_deref(), Some("https://app.careflow.example"));
    assert_eq!(u.check("/", None, false), Ok(()));
    let allowed = vec!["https://app.careflow.example".to_string()];
    assert_eq!(u.check("/", Some(&allowed), false), Ok(()));
    let other = vec!["https://evil.example".to_string()];
    assert_eq!(
        u.check("/", Some(&other), false),
        Err(HandshakeError::Origin)
    );
    assert_eq!(u.check("/sip", None, false), Err(HandshakeError::Path));
    let resp = String::from_utf8(u.accept_response().to_vec()).unwrap();
    assert!(resp.starts_with("HTTP/1.1 101 "));
    assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(resp.contains("Sec-WebSocket-Protocol: sip\r\n"));
}

#[test]
fn refuses_without_sip_protocol_or_wrong_version() {
    let no_sip = UPGRADE.replace("Sec-WebSocket-Protocol: sip\r\n", "");
    let u = parse_upgrade(no_sip.as_bytes()).unwrap().unwrap();
    assert_eq!(
        u.check("/", None, false),
        Err(HandshakeError::NoSipProtocol)
    );
    let v8 = UPGRADE.replace("Version: 13", "Version: 8");
    let u = parse_upgrade(v8.as_bytes()).unwrap().unwrap();
    assert_eq!(u.check("/", None, false), Err(HandshakeError::Version));
    let no_origin = UPGRADE.replace("Origin: https://app.careflow.example\r\n", "");
    let u = parse_upgrade(no_origin.as_bytes()).unwrap().unwrap();
    let allowed = vec!["https://app.careflow.example".to_string()];
    assert_eq!(u.check("/", Some(&allowed), false), Ok(()));
    assert_eq!(
        u.check("/", Some(&allowed), true),
        Err(HandshakeError::Origin)
    );
    let post = UPGRADE.replace("GET", "POST");
    assert_eq!(
        parse_upgrade(post.as_bytes()),
        Err(HandshakeError::NotUpgrade)
    );
    assert_eq!(
        parse_upgrade(&vec![b'a'; MAX_HANDSHAKE + 1]),
        Err(HandshakeError::TooLarge)
    );
}

#[test]
fn decodes_masked_frames_of_every_length_form() {
    for n in [0usize, 5, 125, 126, 300, 65535, 70000] {
        let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let wire = masked(true, 1, &payload);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(decode_frame(&mut buf, 1 << 20), Ok(None), "len {n}");
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        buf.extend_from_slice(b"next");
        let f = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.opcode, Opcode::Text);
        assert_eq!(&f.payload[..], &payload[..]);
        assert_eq!(&buf[..], b"next");
    }
}

#[test]
fn rejects_protocol_violations() {
    let unmasked = [0x81u8, 0x01, b'a'];
    assert!(decode_frame(&mut BytesMut::from(&unmasked[..]), 100).is_err());
    let mut rsv = masked(true, 1, b"a");
    rsv[0] |= 0x40;
    assert!(decode_frame(&mut BytesMut::from(&rsv[..]), 100).is_err());
    let big_ping = masked(true, 9, &[0u8; 126]);
    assert!(decode_frame(&mut BytesMut::from(&big_ping[..]), 1000).is_err());
    let big = masked(true, 2, &[0u8; 200]);
    assert_eq!(
        decode_frame(&mut BytesMut::from(&big[..]), 100),
        Err(FrameError::TooLarge)
    );
    let bad_op = masked(true, 3, b"x");
    assert!(decode_frame(&mut BytesMut::from(&bad_op[..]), 100).is_err());
}

#[test]
fn reassembles_fragments_and_answers_pings_between_them() {
    let mut r = Reassembler::default();
    let frame = |fin, opcode, p: &'static [u8]| Frame {
        fin,
        opcode,
        payload: Bytes::from_static(p),
    };
    assert_eq!(
        r.push(frame(false, Opcode::Text, b"REGISTER "), 100),
        Ok(Event::None)
    );
    assert_eq!(
        r.push(frame(true, Opcode::Ping, b"hi"), 100),
        Ok(Event::Pong(Bytes::from_static(b"hi")))
    );
    assert_eq!(
        r.push(frame(true, Opcode::Continuation, b"sip:x"), 100),
        Ok(Event::Message(Bytes::from_static(b"REGISTER sip:x")))
    );
    assert!(
        r.push(frame(true, Opcode::Continuation, b"x"), 100)
            .is_err()
    );
    r.push(frame(false, Opcode::Binary, b"12345"), 8).unwrap();
    assert_eq!(
        r.push(frame(true, Opcode::Continuation, b"6789"), 8),
        Err(FrameError::TooLarge)
    );
}

#[test]
fn encodes_server_frames_unmasked() {
    assert_eq!(&encode_frame(Opcode::Pong, b"hi")[..], b"\x8a\x02hi");
    let long = encode_message(&[b'a'; 300]);
    assert_eq!(&long[..4], &[0x81, 126, 1, 44]);
    assert_eq!(encode_message(&[0xff, 0xfe])[0], 0x82);
    assert_eq!(&close_frame(1000)[..], b"\x88\x02\x03\xe8");
}
