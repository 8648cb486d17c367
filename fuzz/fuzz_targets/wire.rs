//! The other decoders that read network bytes: WebSocket upgrades and frames (with
//! reassembly), STUN, bencode (rtpengine answers), flow tokens. Nothing may panic; what we
//! encode must decode back.
#![no_main]

use bytes::BytesMut;
use careflow_proto::bencode::Value;
use careflow_proto::{stun, websocket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(u)) = websocket::parse_upgrade(data) {
        let _ = u.check("/", None, false);
        let _ = u.accept_response();
    }
    let mut buf = BytesMut::from(data);
    let mut r = websocket::Reassembler::default();
    while let Ok(Some(f)) = websocket::decode_frame(&mut buf, 4096) {
        if r.push(f, 4096).is_err() {
            break;
        }
    }
    if stun::is_stun(data) {
        let _ = stun::binding_response(data, "192.0.2.1:5060".parse().unwrap());
    }
    if let Some(v) = Value::decode(data) {
        assert_eq!(Value::decode(&v.encode()), Some(v));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = careflow_core::flow::Flow::decode(s, &[7; 32]);
    }
});
