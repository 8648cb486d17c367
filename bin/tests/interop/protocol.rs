//! Raw SIP against the running server: invalid input, methods, retransmissions, TCP framing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::*;

const MISMATCH: &str = "OPTIONS sip:user@example.test SIP/2.0\r\nTo: sip:j.user@example.test\r\nFrom: sip:caller@example.net;tag=34525\r\nMax-Forwards: 6\r\nCall-ID: mismatch01.dj0234sxdfl3\r\nCSeq: 8 INVITE\r\nVia: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bKmm\r\nl: 0\r\n\r\n";

fn options(port: u16, branch: &str, method: &str) -> String {
    format!(
        "{method} sip:example.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:x@example.test>;tag=1\r\nTo: <sip:example.test>\r\nCall-ID: {branch}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    )
}

#[test]
fn invalid_requests_get_400_or_505_and_garbage_is_dropped() {
    let server = Server::start_with("example.test", &[("MAX_MESSAGE_SIZE", "4096")]);
    let ua = Ua::new(server.sip_addr());
    let r = ua.request(&MISMATCH.replace("PORT", &ua.port().to_string()));
    assert!(r.starts_with("SIP/2.0 400 CSeq Method Mismatch\r\n"), "{r}");
    let badvers = options(ua.port(), "bv", "OPTIONS").replacen("SIP/2.0\r\n", "SIP/7.0\r\n", 1);
    let r = ua.request(&badvers);
    assert_eq!(status(&r), 505, "{r}");
    let no_callid = options(ua.port(), "nc", "OPTIONS").replace("Call-ID: nc\r\n", "");
    ua.send(&no_callid); // no Call-ID: nothing to answer with
    for junk in [
        "\u{0}\u{1}\u{2}garbage",
        "INVITE\r\n\r\n",
        "SIP/2.0 200 OK\r\n\r\n",
    ] {
        ua.send(junk);
    }
    ua.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(ua.recv(), None, "nothing answers unparseable input");
    ua.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // the server is still fine
    let r = ua.request(&options(ua.port(), "after", "OPTIONS"));
    assert_eq!(status(&r), 200, "{r}");
    assert!(server.metric("careflow_sip_parse_errors_total") >= 4);
    // A datagram over the size limit is answered 513 when its headers came whole...
    let big = options(ua.port(), "big", "OPTIONS").replace(
        "Content-Length: 0",
        &format!("Content-Length: 5000\r\n\r\n{}", "a".repeat(5000)),
    );
    let r = ua.request(&big);
    assert!(
        r.starts_with("SIP/2.0 513 Message Too Large (MAX_MESSAGE_SIZE)\r\n"),
        "{r}"
    );
    // ...and dropped when they did not (nothing to route an answer by).
    let big = options(ua.port(), "big2", "OPTIONS").replace(
        "Content-Length: 0",
        &format!("X-Pad: {}\r\nContent-Length: 0", "a".repeat(5000)),
    );
    ua.send(&big);
    ua.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(ua.recv(), None);
}

/// RFC 4475 badvers with its own SIP/7.0 Via, an unknown Proxy-Require, and REGISTERs with
/// more Contacts than any server takes: each gets a final answer naming what was wrong.
#[test]
fn requests_we_do_not_take_get_a_final_answer_naming_the_limit() {
    let server = Server::start("example.test");
    server.add_user("hugo", "pw-hugo");
    let ua = Ua::new(server.sip_addr());
    let port = ua.port();
    let r = ua.request("OPTIONS sip:t.watson@example.test SIP/7.0\r\nVia: SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw\r\nMax-Forwards: 70\r\nFrom: A. Bell <sip:a.g.bell@example.test>;tag=qweoiqpe\r\nTo: T. Watson <sip:t.watson@example.test>\r\nCall-ID: badvers.31417@c.example.com\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n");
    assert!(r.starts_with("SIP/2.0 505 "), "{r}");
    assert!(r.contains("Call-ID: badvers.31417@c.example.com"), "{r}");
    let r = ua.request(&options(port, "preq", "OPTIONS").replace(
        "Content-Length: 0",
        "Proxy-Require: foo, outbound\r\nContent-Length: 0",
    ));
    assert_eq!(status(&r), 420, "{r}");
    assert_eq!(header(&r, "Unsupported"), Some("foo"), "{r}");
    // 1000 Contact header fields (about 40 KB in one datagram), with valid credentials.
    let contacts: String = (0..1000)
        .map(|i| format!("Contact: <sip:hugo@127.0.0.1:{port};n={i}>\r\n"))
        .collect();
    let r1 = ua.request(&ua.register_msg("hugo", "example.test", "big-1", 1, ""));
    let auth = authorization(
        &r1,
        careflow_proto::digest::Algorithm::Md5,
        "hugo",
        "example.test",
        "pw-hugo",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let msg = ua.register_msg(
        "hugo",
        "example.test",
        "big-1",
        2,
        &format!("Authorization: {auth}\r\n{contacts}"),
    );
    assert!(msg.len() > 38_000);
    let r = ua.request(&msg);
    assert!(
        r.starts_with("SIP/2.0 513 Too Many Header Fields (MAX_HEADERS)\r\n"),
        "{r}"
    );
    // 100 Contacts in one header field.
    let list: Vec<String> = (0..100)
        .map(|i| format!("<sip:hugo@127.0.0.1:{port};n={i}>"))
        .collect();
    let msg = ua.register_msg(
        "hugo",
        "example.test",
        "big-2",
        3,
        &format!("Authorization: {auth}\r\nContact: {}\r\n", list.join(", ")),
    );
    let r = ua.request(&msg);
    assert!(
        r.starts_with("SIP/2.0 403 Too Many Contacts (limit 32)\r\n"),
        "{r}"
    );
    assert!(server.bindings_of("hugo").is_empty());
}

#[test]
fn rfc4475_torture_messages_over_the_wire() {
    let server = Server::start("example.test");
    let ua = Ua::new(server.sip_addr());
    // wsinv (valid, to another domain's user): parsed and answered, not 400.
    let wsinv = include_str!("torture/wsinv.sip")
        .replace('\n', "\r\n")
        .replace(
            "192.0.2.2;branch",
            &format!("127.0.0.1:{};rport;branch", ua.port()),
        );
    let r = ua.request(&wsinv);
    assert_ne!(status(&r), 400, "{r}");
    // RE%47IST%45R is an unknown method, not REGISTER: the proxy would forward it, but not to a
    // domain we do not serve (403, and no 401 challenge as for a REGISTER).
    let esc02 = include_str!("torture/esc02.sip")
        .replace('\n', "\r\n")
        .replace(
            "host.example.com;branch",
            &format!("127.0.0.1:{};rport;branch", ua.port()),
        )
        .replace("SIP/2.0/TCP", "SIP/2.0/UDP");
    let r = ua.request(&esc02);
    assert_eq!(status(&r), 403, "RE%47IST%45R is not REGISTER: {r}");
}

#[test]
fn methods_get_the_right_answers() {
    let server = Server::start("example.test");
    let ua = Ua::new(server.sip_addr());
    let r = ua.request(&options(ua.port(), "o1", "OPTIONS"));
    assert_eq!(status(&r), 200, "{r}");
    assert!(header(&r, "Allow").unwrap().contains("REGISTER"), "{r}");
    assert!(
        r.contains(&format!("rport={};received=127.0.0.1", ua.port())),
        "{r}"
    );
    let r = ua.request(&options(ua.port(), "o2", "FOOBAR"));
    assert_eq!(status(&r), 501, "{r}");
    assert!(header(&r, "Allow").is_some());
    let unknown_scheme = options(ua.port(), "o4", "OPTIONS").replacen(
        "sip:example.test",
        "nobodyKnowsThisScheme:totallyopaquecontent",
        1,
    );
    let r = ua.request(&unknown_scheme);
    assert_eq!(status(&r), 416, "{r}");
    let r = ua.request(&options(ua.port(), "o3", "SUBSCRIBE"));
    assert_eq!(status(&r), 405, "{r}");
    assert!(header(&r, "Allow").is_some());
}

#[test]
fn retransmissions_are_absorbed_with_the_same_answer() {
    let server = Server::start("example.test");
    server.add_user("zed", "pw-zed");
    let ua = Ua::new(server.sip_addr());
    let o = options(ua.port(), "rtx-o", "OPTIONS");
    assert_eq!(
        ua.request(&o),
        ua.request(&o),
        "a retransmission gets the stored response"
    );
    // An authorized REGISTER retransmitted (same branch, same nonce count) is answered from the
    // transaction, not refused as a replay.
    let r1 = ua.request(&ua.register_msg("zed", "example.test", "rtx", 1, ""));
    let auth = careflow_proto::digest::Algorithm::Md5;
    let auth = authorization(
        &r1,
        auth,
        "zed",
        "example.test",
        "pw-zed",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let m = ua.register_msg(
        "zed",
        "example.test",
        "rtx",
        2,
        &format!("Authorization: {auth}\r\n"),
    );
    let a = ua.request(&m);
    let b = ua.request(&m);
    assert_eq!(status(&a), 200, "{a}");
    assert_eq!(a, b);
    assert_eq!(server.metric("careflow_sip_retransmissions_total"), 2);
    // Challenges are stateless: a retransmitted credential-less REGISTER gets a fresh one.
    let c = ua.register_msg("zed", "example.test", "rtx-c", 1, "");
    let (x, y) = (ua.request(&c), ua.request(&c));
    assert_eq!((status(&x), status(&y)), (401, 401));
    assert_eq!(
        server.metric("careflow_sip_requests_total{method=\"REGISTER\"}"),
        5
    );
}

#[test]
fn tcp_framing_keepalive_and_pipelining() {
    let server = Server::start("example.test");
    let mut s = TcpStream::connect(server.sip_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let port = s.local_addr().unwrap().port();
    let one = options(port, "t1", "OPTIONS").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    let two = options(port, "t2", "OPTIONS").replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    // a ping, two pipelined requests, the second split across writes
    s.write_all(format!("\r\n\r\n{one}{}", &two[..20]).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(&two.as_bytes()[20..]).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 8192];
    while got.matches("SIP/2.0 200").count() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        got.starts_with("\r\n"),
        "CRLFCRLF ping gets a CRLF pong: {got:?}"
    );
    assert!(got.contains("branch=z9hG4bKt1") && got.contains("branch=z9hG4bKt2"));
    assert_eq!(server.metric("careflow_sip_open_connections"), 1);
}

#[test]
fn health_and_metrics_endpoints() {
    let server = Server::start("example.test");
    assert_eq!(server.http_get("/healthz").unwrap().0, 200);
    let (code, body) = server.http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    for name in [
        "careflow_sip_requests_total{method=\"REGISTER\"}",
        "careflow_sip_responses_total{class=\"4xx\"}",
        "careflow_sip_registrations_total",
        "careflow_sip_auth_failures_total",
        "careflow_sip_parse_errors_total",
        "careflow_sip_active_bindings",
    ] {
        assert!(body.contains(name), "{name} missing in:\n{body}");
    }
}

#[test]
fn scanners_get_no_answer() {
    let server = Server::start("example.test");
    let ua = Ua::new(server.sip_addr());
    let probe = options(ua.port(), "scan1", "OPTIONS").replace(
        "Content-Length: 0",
        "User-Agent: friendly-scanner\r\nContent-Length: 0",
    );
    ua.send(&probe);
    ua.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(ua.recv(), None, "a scanner is not answered");
    ua.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let r = ua.request(&options(ua.port(), "real1", "OPTIONS").replace(
        "Content-Length: 0",
        "User-Agent: Yealink SIP-T46S\r\nContent-Length: 0",
    ));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(server.metric("careflow_sip_scanner_drops_total"), 1);
}

#[test]
fn check_config_reports_every_problem_and_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("careflow.toml");
    std::fs::write(
        &file,
        "sip_listen = \"udp:0.0.0.0:5060,carrier-pigeon:1.2.3.4:1\"\nmin_expires = 7200\nmax_expires = 3600\nnat_keepalive_interval = \"often\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("DATA_DIR", dir.path().join("data"))
        .env("TLS_CERT", dir.path().join("missing.crt"))
        .env("TLS_KEY", dir.path().join("missing.key"))
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["SIP_LISTEN", "MIN_EXPIRES", "NAT_KEEPALIVE_INTERVAL"] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    // A valid configuration is checked further: the certificate it names must load.
    std::fs::write(&file, "sip_domain = \"ok.example\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("DATA_DIR", dir.path().join("data"))
        .env("TLS_CERT", dir.path().join("missing.crt"))
        .env("TLS_KEY", dir.path().join("missing.key"))
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.crt"));
    let out = std::process::Command::new(BIN)
        .env_clear()
        .env("DATA_DIR", dir.path().join("data"))
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK: domain ok.example"));
}
