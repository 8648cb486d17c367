//! SIP Outbound (RFC 5626) and Path (RFC 3327) on the wire: flows per instance, the
//! registrar's answers, an edge proxy in front of careflow-sip, STUN keep-alives.

use std::time::Duration;

use careflow_proto::digest::Algorithm;

use crate::support::*;

const DOMAIN: &str = "outbound.test";
const INSTANCE: &str = "\"<urn:uuid:6ab0dbd3-3d2e-4ab8-a5d3-0c1d2e3f4a5b>\"";

/// Registers with a REGISTER built by `build(cseq, authorization_line)`, answering the
/// challenge; returns the final response.
fn register_with(ua: &Ua, user: &str, pw: &str, build: impl Fn(u32, &str) -> String) -> String {
    let r = ua.request(&build(1, ""));
    assert_eq!(status(&r), 401, "{r}");
    let auth = authorization(
        &r,
        Algorithm::Md5,
        user,
        DOMAIN,
        pw,
        "REGISTER",
        &format!("sip:{DOMAIN}"),
        1,
    );
    ua.request(&build(2, &format!("Authorization: {auth}\r\n")))
}

fn outbound_register(ua: &Ua, call_id: &str, reg_id: u32, contact_port: u16) -> String {
    let port = ua.port();
    register_with(ua, "olga", "pw-olga", |cseq, auth| {
        format!(
            "REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}{cseq};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:olga@{DOMAIN}>;tag=o{cseq}\r\nTo: <sip:olga@{DOMAIN}>\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nSupported: outbound, path\r\n\
             Contact: <sip:olga@127.0.0.1:{contact_port};ob>;+sip.instance={INSTANCE};reg-id={reg_id}\r\n\
             {auth}Expires: 600\r\nContent-Length: 0\r\n\r\n"
        )
    })
}

/// An INVITE from `caller` to `to` with proxy credentials; returns nothing (the callee's
/// sockets are checked by the test).
fn call(server: &Server, caller: &Ua, to: &str, call_id: &str) {
    let port = caller.port();
    let build = |cseq: u32, auth: &str| {
        format!(
            "INVITE sip:{to}@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}{cseq};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:carl@{DOMAIN}>;tag=c{call_id}\r\nTo: <sip:{to}@{DOMAIN}>\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:carl@127.0.0.1:{port}>\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    };
    let r = caller.request(&build(1, ""));
    assert_eq!(status(&r), 407, "{r}\n{}", server.log());
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "carl",
        DOMAIN,
        "pw-carl",
        "INVITE",
        &format!("sip:{to}@{DOMAIN}"),
        1,
    );
    caller.send(&build(2, &format!("Proxy-Authorization: {auth}\r\n")));
}

fn recv_request(ua: &Ua, method: &str) -> Option<String> {
    for _ in 0..10 {
        let m = ua.recv()?;
        if m.starts_with(&format!("{method} ")) {
            return Some(m);
        }
    }
    None
}

#[test]
fn outbound_flows_are_acknowledged_and_one_flow_per_instance_carries_calls() {
    let server = Server::start(DOMAIN);
    server.add_user("olga", "pw-olga");
    server.add_user("carl", "pw-carl");
    let (a, b) = (Ua::new(server.sip_addr()), Ua::new(server.sip_addr()));
    let r = outbound_register(&a, "ob-a", 1, a.port());
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Require"), Some("outbound"), "{r}");
    assert_eq!(
        header(&r, "Flow-Timer"),
        None,
        "UDP flows keep alive with STUN: {r}"
    );
    let r = outbound_register(&b, "ob-b", 2, b.port());
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(server.bindings_of("olga").len(), 2);

    // Two flows of one device: the call takes one of them, not both.
    let caller = Ua::new(server.sip_addr());
    call(&server, &caller, "olga", "ob-call-1");
    let got = recv_request(&b, "INVITE").expect("INVITE on the newest flow");
    assert!(got.contains(";ob"), "{got}");
    a.sock
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    assert!(recv_request(&a, "INVITE").is_none(), "both flows rang");

    // The device restarts and registers flow 1 from a new address: the flow is replaced, not
    // added next to a dead one.
    let a2 = Ua::new(server.sip_addr());
    let r = outbound_register(&a2, "ob-a2", 1, a2.port());
    assert_eq!(status(&r), 200, "{r}");
    let bindings = server.bindings_of("olga");
    assert_eq!(bindings.len(), 2, "{bindings:?}");
    assert!(
        !bindings
            .iter()
            .any(|l| l.contains(&format!(":{};ob", a.port()))),
        "{bindings:?}"
    );
}

#[test]
fn a_flow_registered_through_a_proxy_without_path_gets_439() {
    let server = Server::start(DOMAIN);
    server.add_user("olga", "pw-olga");
    let ua = Ua::new(server.sip_addr());
    let port = ua.port();
    let r = register_with(&ua, "olga", "pw-olga", |cseq, auth| {
        format!(
            "REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKp439{cseq};rport\r\n\
             Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKdev{cseq}\r\n\
             Max-Forwards: 69\r\nFrom: <sip:olga@{DOMAIN}>;tag=p{cseq}\r\nTo: <sip:olga@{DOMAIN}>\r\n\
             Call-ID: p439\r\nCSeq: {cseq} REGISTER\r\nSupported: outbound\r\n\
             Contact: <sip:olga@10.0.0.9:5060;ob>;+sip.instance={INSTANCE};reg-id=1\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    });
    assert_eq!(status(&r), 439, "{r}");
    assert!(server.bindings_of("olga").is_empty());
}

#[test]
fn an_edge_proxy_registers_with_path_and_calls_are_routed_through_it() {
    // Keep-alives would go to the device's source if careflow-sip mistook the edge proxy's
    // address for a NAT; with Path none are sent.
    let server = Server::start_with(DOMAIN, &[("NAT_KEEPALIVE_INTERVAL", "1")]);
    server.add_user("pat", "pw-pat");
    server.add_user("carl", "pw-carl");
    let edge = Ua::new(server.sip_addr());
    let port = edge.port();
    let path = format!("<sip:edge-flow-7@127.0.0.1:{port};lr;ob>");
    let r = register_with(&edge, "pat", "pw-pat", |cseq, auth| {
        format!(
            "REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKedge{cseq};rport\r\n\
             Via: SIP/2.0/TCP 10.20.30.40:5060;branch=z9hG4bKpat{cseq}\r\n\
             Max-Forwards: 69\r\nFrom: <sip:pat@{DOMAIN}>;tag=e{cseq}\r\nTo: <sip:pat@{DOMAIN}>\r\n\
             Call-ID: edge-1\r\nCSeq: {cseq} REGISTER\r\nSupported: path, outbound\r\nPath: {path}\r\n\
             Contact: <sip:pat@10.20.30.40:5060;transport=tcp;ob>;+sip.instance={INSTANCE};reg-id=1\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    });
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Path"), Some(path.as_str()), "{r}");
    assert_eq!(header(&r, "Require"), Some("outbound"), "{r}");

    let caller = Ua::new(server.sip_addr());
    call(&server, &caller, "pat", "edge-call");
    let inv = recv_request(&edge, "INVITE")
        .unwrap_or_else(|| panic!("INVITE not sent to the edge proxy:\n{}", server.log()));
    assert!(
        inv.starts_with("INVITE sip:pat@10.20.30.40:5060;transport=tcp;ob SIP/2.0\r\n"),
        "{inv}"
    );
    assert_eq!(header(&inv, "Route"), Some(path.as_str()), "{inv}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.metric("careflow_sip_keepalives_sent_total"), 0);
}

#[test]
fn stun_keepalives_on_the_sip_port_are_answered_with_the_public_address() {
    let server = Server::start(DOMAIN);
    let ua = Ua::new(server.sip_addr());
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(b"careflowtest");
    ua.sock.send_to(&req, server.sip_addr()).unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = ua.sock.recv_from(&mut buf).expect("STUN answer");
    let r = &buf[..n];
    assert_eq!(&r[..2], &[0x01, 0x01], "Binding success");
    assert_eq!(&r[8..20], b"careflowtest");
    let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
    assert_eq!(port, ua.port());
    let ip: Vec<u8> = r[28..32]
        .iter()
        .zip([0x21u8, 0x12, 0xa4, 0x42])
        .map(|(a, m)| a ^ m)
        .collect();
    assert_eq!(ip, vec![127, 0, 0, 1]);
}
