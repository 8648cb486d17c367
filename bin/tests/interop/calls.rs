//! Calls and messages through the proxy: sipp caller and callee, and raw user agents for
//! forking, CANCEL, 404/480 and MESSAGE.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_proto::digest::Algorithm;
use careflow_proto::{Message, ParseLimits, ResponseBuilder};

use crate::peers::{baresip_home, register_contact, scenario, sipp_file};
use crate::support::*;

const DOMAIN: &str = "calls.test";

fn sipp_calls(transport: &str, callee_transport: &str) {
    sipp_calls_at(transport, callee_transport, 100, 50, false);
}

/// `count` sipp calls at `rate`/s from a UAC over `transport` to a sipp UAS over
/// `callee_transport` that answers each INVITE with 180 and 200 back to back. `strict`: the
/// caller aborts a call on any message out of order (sipp's default `abortunexp`), so a 180
/// relayed after its 200 fails it; otherwise such a late provisional is ignored.
fn sipp_calls_at(transport: &str, callee_transport: &str, count: u32, rate: u32, strict: bool) {
    require("sipp", "sip-tester");
    let server = Server::start(DOMAIN);
    server.add_user("caller", "pw-caller");
    server.add_user("callee", "pw-callee");
    let tmp = tempfile::tempdir().unwrap();
    let caller = sipp_file(tmp.path(), "caller.csv", &[("caller", "pw-caller")]);
    let callee = sipp_file(tmp.path(), "callee.csv", &[("callee", "pw-callee")]);
    let uas_port = free_port();
    let mut uas = Command::new("sipp")
        .args([
            "-sf",
            &scenario("uas.xml"),
            "-i",
            "127.0.0.1",
            "-p",
            &uas_port.to_string(),
            "-t",
            callee_transport,
        ])
        .args(["-nostdin", "-timeout", "90s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sipp uas");
    std::thread::sleep(Duration::from_millis(300));
    let target = server.sip_addr().to_string();
    register_contact(
        &server,
        &callee,
        uas_port,
        if callee_transport == "t1" {
            "tcp"
        } else {
            "udp"
        },
    );
    let calls = Command::new("sipp")
        .arg(&target)
        .args([
            "-sf",
            &scenario("uac-call.xml"),
            "-inf",
            caller.to_str().unwrap(),
        ])
        .args([
            "-key",
            "domain",
            DOMAIN,
            "-key",
            "callee",
            "callee",
            "-auth_uri",
            &format!("callee@{DOMAIN}"),
        ])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            transport,
        ])
        .args([
            "-m",
            &count.to_string(),
            "-r",
            &rate.to_string(),
            "-d",
            "100",
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
        ])
        .args([
            "-default_behaviors",
            if strict { "abortunexp" } else { "-abortunexp" },
        ])
        .stdout(Stdio::null())
        .output()
        .expect("run sipp uac");
    let _ = uas.kill();
    let _ = uas.wait();
    assert!(
        calls.status.success(),
        "calls over {transport} failed ({}): {}\nserver:\n{}",
        calls.status,
        String::from_utf8_lossy(&calls.stderr),
        server.log()
    );
    // Every call's BYE went through the proxy (Record-Route held); under load sipp may send a
    // BYE again before its 200 arrives, which the proxy absorbs as a retransmission.
    let byes = server.metric("careflow_sip_requests_total{method=\"BYE\"}");
    let again = server.metric("careflow_sip_retransmissions_total");
    assert!(
        byes >= u64::from(count) && byes - u64::from(count) <= again,
        "{byes} BYEs ({again} retransmissions) for {count} calls"
    );
}

#[test]
fn sipp_calls_through_the_proxy_over_udp() {
    sipp_calls("u1", "u1");
}

/// Responses of one transaction leave in the order they arrived, however the tasks are
/// scheduled: with both cores busy (bounded spinning threads), 200 calls whose callee sends
/// 180 and 200 back to back all connect (a relayed 180 after its 200 aborts the call).
#[test]
fn responses_keep_their_order_while_the_cpus_are_busy() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(40);
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let result = std::panic::catch_unwind(|| sipp_calls_at("u1", "u1", 200, 20, true));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn sipp_calls_from_tcp_to_udp_record_route_twice() {
    sipp_calls("t1", "u1");
}

#[test]
fn sipp_calls_through_the_proxy_over_tcp() {
    sipp_calls("t1", "t1");
}

/// The two users of most call tests: alice (a raw UA, not registered: she only calls) and
/// bob (a raw device, registered). Returns (alice, bob).
fn alice_and_bob(server: &Server) -> (Ua, Ua) {
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let bob = device(server, "bob", "pw-bob");
    (Ua::new(server.sip_addr()), bob)
}

/// A raw user agent on its own port, registered as `user`.
fn device(server: &Server, user: &str, password: &str) -> Ua {
    let ua = Ua::new(server.sip_addr());
    let r = ua.register(
        user,
        password,
        DOMAIN,
        &format!("reg-{user}-{}", ua.port()),
        "",
    );
    assert_eq!(status(&r), 200, "{r}");
    ua
}

/// Transaction first, routing second: an INVITE retransmitted while its route lookup is slow
/// (the location store behind a relay that holds each request 1.5 s) is absorbed by the
/// server transaction: 100 Trying at once, the callee sees one INVITE, the caller no 407.
#[test]
fn an_invite_retransmitted_while_its_route_lookup_is_slow_reaches_the_callee_once() {
    crate::cluster::flush(14);
    let relay = crate::database::Relay::to("127.0.0.1:6379");
    let server = Server::start_with(
        DOMAIN,
        &[("REDIS_URL", &format!("redis://127.0.0.1:{}/14", relay.port))],
    );
    let (a, bob) = alice_and_bob(&server);
    let authorized = authorized_invite(&a, DOMAIN, ("alice", "pw-alice"), "bob", "cslow");
    relay.slow_down(1500);
    let sent = Instant::now();
    a.send(&authorized);
    let trying = a.recv().expect("100 Trying");
    assert!(trying.starts_with("SIP/2.0 100 "), "{trying}");
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "100 Trying came late"
    );
    std::thread::sleep(Duration::from_millis(600));
    a.send(&authorized); // the caller's retransmission, as Timer A would send it
    // The callee is reached once.
    let inv = expect(&bob, "INVITE ");
    bob.sock
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    // Our client transaction retransmits it (bob sends no provisional): same branch. A second
    // routing of the caller's retransmission would be a new branch.
    let branch = |m: &str| {
        header(m, "Via")
            .and_then(|v| v.split("branch=").nth(1))
            .map(|b| b.split(';').next().unwrap_or(b).to_string())
    };
    let first_branch = branch(&inv);
    let mut forks = 0;
    while let Some(m) = bob.recv() {
        if m.starts_with("INVITE ") && branch(&m) != first_branch {
            forks += 1;
        }
    }
    assert_eq!(forks, 0, "the INVITE was forked twice");
    relay.slow_down(0);
    answer(&bob, &inv, 486);
    // The caller never saw a 407 for it: only 100s (a retransmission gets the 100 again),
    // then the 486.
    let mut seen = Vec::new();
    loop {
        let m = a.recv().expect("the final answer");
        seen.push(m.lines().next().unwrap_or_default().to_string());
        if status(&m) >= 200 {
            break;
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("SIP/2.0 486 Busy Here"),
        "{seen:?}"
    );
    assert!(seen.iter().all(|l| !l.contains(" 407 ")), "{seen:?}");
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);

    // Cancelled while still being routed: 200 for the CANCEL, 487 for the INVITE, and the
    // callee is never rung.
    let authorized = authorized_invite(&a, DOMAIN, ("alice", "pw-alice"), "bob", "cslow2");
    relay.slow_down(1500);
    a.send(&authorized);
    std::thread::sleep(Duration::from_millis(200));
    let cancel = authorized
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 2 INVITE", "CSeq: 2 CANCEL");
    let cancel = cancel[..cancel.find("Proxy-Authorization").unwrap()].to_string()
        + "Content-Length: 0\r\n\r\n";
    a.send(&cancel);
    let mut codes = Vec::new();
    while !codes.contains(&487) {
        let m = a.recv().expect("answers to the CANCEL and the INVITE");
        if m.contains("Call-ID: cslow2\r\n") {
            codes.push(status(&m));
        }
    }
    assert!(codes.contains(&200), "{codes:?}");
    bob.sock
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    while let Some(m) = bob.recv() {
        assert!(
            !m.contains("Call-ID: cslow2\r\n"),
            "the callee was rung: {m}"
        );
    }
    relay.slow_down(0);
}

#[test]
fn unknown_and_unregistered_users_get_404_and_480() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "c480");
    let r = expect(&a, "SIP/2.0 480");
    assert!(r.contains("CSeq: 2 INVITE"), "{r}");
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "nobody", "c404");
    expect(&a, "SIP/2.0 404");
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"failed\",class=\"4xx\"}"),
        2
    );
    // A caller that is not who the From says: 403.
    let first = invite_request(&a, DOMAIN, "alice", "bob", "c403", 1, "c403a", "");
    let r = expect_final(&a, "c403", &first);
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "bob",
        DOMAIN,
        "pw-bob",
        "INVITE",
        &format!("sip:bob@{DOMAIN}"),
        1,
    );
    // (An INVITE with credentials gets its server transaction, and 100 Trying, first.)
    a.send(&invite_request(
        &a,
        DOMAIN,
        "alice",
        "bob",
        "c403",
        2,
        "c403b",
        &format!("Proxy-Authorization: {auth}\r\n"),
    ));
    let r = expect(&a, "SIP/2.0 403");
    assert!(r.contains("Call-ID: c403\r\n"), "{r}");
    // A wrong password is challenged again.
    let r = expect_final(
        &a,
        "cbad",
        &invite_request(&a, DOMAIN, "alice", "bob", "cbad", 1, "cbada", ""),
    );
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "alice",
        DOMAIN,
        "wrong",
        "INVITE",
        &format!("sip:bob@{DOMAIN}"),
        1,
    );
    a.send(&invite_request(
        &a,
        DOMAIN,
        "alice",
        "bob",
        "cbad",
        2,
        "cbadb",
        &format!("Proxy-Authorization: {auth}\r\n"),
    ));
    let r = expect(&a, "SIP/2.0 407");
    assert!(r.contains("CSeq: 2 INVITE"), "{r}");
    // Another domain is not relayed.
    let r = expect_final(
        &a,
        "crelay",
        &invite_request(&a, DOMAIN, "alice", "bob", "crelay", 1, "crelay", "").replace(
            &format!("INVITE sip:bob@{DOMAIN}"),
            "INVITE sip:bob@elsewhere.test",
        ),
    );
    assert_eq!(status(&r), 403, "{r}");
}

#[test]
fn message_is_delivered() {
    let server = Server::start(DOMAIN);
    let (a, bob) = alice_and_bob(&server);
    let port = a.port();
    let msg = |cseq: u32, extra: &str| {
        format!(
            "MESSAGE sip:bob@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKm{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=m1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: msg1\r\nCSeq: {cseq} MESSAGE\r\nContent-Type: text/plain\r\n{extra}Content-Length: 5\r\n\r\nhello"
        )
    };
    send_with_proxy_auth(
        &a,
        DOMAIN,
        ("alice", "pw-alice"),
        ("MESSAGE", &format!("sip:bob@{DOMAIN}")),
        msg,
    );
    let got = expect(&bob, "MESSAGE ");
    assert!(got.ends_with("\r\n\r\nhello"), "body passes through: {got}");
    assert!(
        got.contains("Proxy-Authorization"),
        "credentials are not consumed from the forwarded request"
    );
    answer(&bob, &got, 200);
    let r = expect(&a, "SIP/2.0 200");
    assert!(r.contains("CSeq: 2 MESSAGE"), "{r}");
}

#[test]
fn forking_rings_every_device_and_cancels_the_loser() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let desk = device(&server, "bob", "pw-bob");
    let soft = device(&server, "bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "fork1");
    expect(&a, "SIP/2.0 100");
    let inv_desk = expect(&desk, "INVITE ");
    let inv_soft = expect(&soft, "INVITE ");
    assert!(inv_desk.contains("Record-Route:"), "{inv_desk}");
    answer(&desk, &inv_desk, 180);
    answer(&soft, &inv_soft, 180);
    expect(&a, "SIP/2.0 180");
    answer(&desk, &inv_desk, 200);
    let ok = expect(&a, "SIP/2.0 200");
    assert!(
        ok.contains(&format!("<sip:dev@127.0.0.1:{}>", desk.port())),
        "{ok}"
    );
    // The softphone's branch is cancelled.
    let cancel = expect(&soft, "CANCEL ");
    answer(&soft, &cancel, 200);
    answer(&soft, &inv_soft, 487);
    let ack = expect(&soft, "ACK ");
    assert!(ack.contains("CSeq: 2 ACK"), "{ack}");
}

#[test]
fn caller_cancels_a_ringing_call() {
    let server = Server::start(DOMAIN);
    let (a, bob) = alice_and_bob(&server);
    let sent = invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "cancel1");
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 180);
    expect(&a, "SIP/2.0 180");
    let cancel = sent
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 2 INVITE", "CSeq: 2 CANCEL")
        .lines()
        .filter(|l| !l.starts_with("Proxy-Authorization") && !l.starts_with("Contact"))
        .collect::<Vec<_>>()
        .join("\r\n");
    a.send(&cancel);
    let r = expect(&a, "SIP/2.0 200");
    assert!(r.contains("CSeq: 2 CANCEL"), "{r}");
    let c = expect(&bob, "CANCEL ");
    answer(&bob, &c, 200);
    answer(&bob, &inv, 487);
    let r = expect(&a, "SIP/2.0 487");
    assert!(r.contains("CSeq: 2 INVITE"), "{r}");
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"failed\",class=\"4xx\"}"),
        1
    );
}

#[test]
fn a_dead_binding_does_not_delay_the_call() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    // A stale TCP binding whose device is gone (nothing listens there any more).
    let dead = free_port();
    let desk = Ua::new(server.sip_addr());
    let extra = format!("Contact: <sip:bob@127.0.0.1:{dead};transport=tcp>\r\n");
    let r = desk.register("bob", "pw-bob", DOMAIN, "reg-dead", &extra);
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(server.bindings_of("bob").len(), 2);
    let a = Ua::new(server.sip_addr());
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "dead1");
    let inv = expect(&desk, "INVITE ");
    answer(&desk, &inv, 200);
    expect(&a, "SIP/2.0 200");
    // With only the dead binding left, the caller hears back at once, not after Timer B.
    let r = desk.request(&desk.register_msg("bob", DOMAIN, "reg-dead", 3, "Expires: 0\r\n"));
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "bob",
        DOMAIN,
        "pw-bob",
        "REGISTER",
        &format!("sip:{DOMAIN}"),
        1,
    );
    let r = desk.request(&desk.register_msg(
        "bob",
        DOMAIN,
        "reg-dead",
        4,
        &format!("Expires: 0\r\nAuthorization: {auth}\r\n"),
    ));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(server.bindings_of("bob").len(), 1);
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "dead2");
    let r = expect(&a, "SIP/2.0 5");
    assert!(r.starts_with("SIP/2.0 500"), "{r}");
}

#[test]
fn two_baresip_phones_call_each_other() {
    require("baresip", "baresip");
    // With the protection on for them (the allow-list moved away): real phones are never
    // counted as attackers.
    let server = Server::start_with("localhost", &[("SECURITY_ALLOWLIST", "10.255.255.255")]);
    server.add_user("anna", "pw-anna-1");
    server.add_user("ben", "pw-ben-1");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("anna"), tmp.path().join("ben"));
    baresip_home(&a, "anna", "pw-anna-1", server.port, "");
    baresip_home(&b, "ben", "pw-ben-1", server.port, ";answermode=auto");
    let mut callee = Command::new("baresip")
        .args(["-f", b.to_str().unwrap(), "-t", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start baresip");
    for _ in 0..100 {
        if !server.bindings_of("ben").is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        server.bindings_of("ben").len(),
        1,
        "ben did not register:\n{}",
        server.log()
    );
    // anna dials ben, talks for a few seconds and hangs up when baresip quits (-t).
    let caller = Command::new("baresip")
        .args([
            "-f",
            a.to_str().unwrap(),
            "-e",
            "/dial sip:ben@localhost",
            "-t",
            "5",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run baresip");
    let _ = callee.kill();
    let _ = callee.wait();
    let out = String::from_utf8_lossy(&caller.stdout).into_owned()
        + &String::from_utf8_lossy(&caller.stderr);
    assert!(
        out.contains("Call established"),
        "anna's call was not answered:\n{out}\nserver:\n{}",
        server.log()
    );
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"answered\"}"),
        1
    );
    assert!(
        server.metric("careflow_sip_requests_total{method=\"BYE\"}") >= 1,
        "the call is hung up through the proxy"
    );
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
    assert_eq!(server.metric("careflow_sip_banned_sources"), 0);
}

#[test]
fn other_domains_go_through_the_gateway_and_peers_only_when_allowed() {
    let gateway = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    gateway
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let gw_port = gateway.local_addr().unwrap().port();
    let server = Server::start_with(
        DOMAIN,
        &[
            ("OUTBOUND_GATEWAY", &format!("sip:127.0.0.1:{gw_port}")),
            ("ALLOW_INBOUND", "true"),
        ],
    );
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    // alice calls out: authenticated, then sent to the gateway with the Request-URI unchanged.
    let out = |cseq: u32, extra: &str| {
        invite_request(
            &a,
            DOMAIN,
            "alice",
            "carol",
            "gw1",
            cseq,
            &format!("gw1{cseq}"),
            extra,
        )
        .replace(
            &format!("INVITE sip:carol@{DOMAIN}"),
            "INVITE sip:carol@elsewhere.test",
        )
    };
    send_with_proxy_auth(
        &a,
        DOMAIN,
        ("alice", "pw-alice"),
        ("INVITE", "sip:carol@elsewhere.test"),
        out,
    );
    let mut buf = vec![0u8; 65536];
    let (n, from) = gateway.recv_from(&mut buf).unwrap();
    let got = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        got.starts_with("INVITE sip:carol@elsewhere.test SIP/2.0\r\n"),
        "{got}"
    );
    let m = Message::parse(Bytes::from(got), &ParseLimits::default()).unwrap();
    gateway
        .send_to(&ResponseBuilder::new(&m, 486).to_tag("gw").build(), from)
        .unwrap();
    expect(&a, "SIP/2.0 486");
    // A peer from another domain reaches a registered user without credentials.
    let bob = device(&server, "bob", "pw-bob");
    let peer = Ua::new(server.sip_addr());
    let port = peer.port();
    peer.send(&format!("MESSAGE sip:bob@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKpeer1;rport\r\nMax-Forwards: 70\r\nFrom: <sip:dave@partner.test>;tag=p1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: peer1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 2\r\n\r\nhi"));
    let got = expect(&bob, "MESSAGE ");
    answer(&bob, &got, 200);
    expect(&peer, "SIP/2.0 200");
}

#[test]
fn without_peering_other_domains_are_refused() {
    let server = Server::start(DOMAIN);
    server.add_user("bob", "pw-bob");
    let _bob = device(&server, "bob", "pw-bob");
    let peer = Ua::new(server.sip_addr());
    let port = peer.port();
    let r = peer.request(&format!("MESSAGE sip:bob@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKpeer2;rport\r\nMax-Forwards: 70\r\nFrom: <sip:dave@partner.test>;tag=p1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: peer2\r\nCSeq: 1 MESSAGE\r\nContent-Length: 2\r\n\r\nhi"));
    assert_eq!(status(&r), 403, "{r}");
}

#[test]
fn timer_c_cancels_a_branch_that_rings_too_long() {
    let server = Server::start_with(DOMAIN, &[("TIMER_C", "1")]);
    let (a, bob) = alice_and_bob(&server);
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "ring1");
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 180);
    expect(&a, "SIP/2.0 180");
    // Nobody answers: Timer C cancels the branch and the caller hears 408.
    let cancel = expect(&bob, "CANCEL ");
    answer(&bob, &cancel, 200);
    answer(&bob, &inv, 487);
    expect(&a, "SIP/2.0 408");
}

#[test]
fn in_dialog_requests_follow_the_record_route_and_other_methods_are_routed() {
    let server = Server::start(DOMAIN);
    let (a, bob) = alice_and_bob(&server);
    // OPTIONS to a user is proxied (after authentication) like any request.
    let port = a.port();
    let options = |cseq: u32, extra: &str| {
        format!(
            "OPTIONS sip:bob@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKopt{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=o1\r\nTo: <sip:bob@{DOMAIN}>\r\nCall-ID: opt1\r\nCSeq: {cseq} OPTIONS\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    };
    send_with_proxy_auth(
        &a,
        DOMAIN,
        ("alice", "pw-alice"),
        ("OPTIONS", &format!("sip:bob@{DOMAIN}")),
        options,
    );
    let got = expect(&bob, "OPTIONS ");
    answer(&bob, &got, 200);
    expect(&a, "SIP/2.0 200");

    // A call, then INFO and UPDATE inside the dialog along the recorded route.
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "dlg1");
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 200);
    let ok = expect(&a, "SIP/2.0 200");
    let rr = header(&ok, "Record-Route")
        .expect("Record-Route in the 200")
        .to_string();
    let remote = header(&ok, "Contact")
        .expect("Contact")
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string();
    let to = header(&ok, "To").unwrap().to_string();
    let in_dialog = |method: &str, cseq: u32| {
        format!(
            "{method} {remote} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKdlg{cseq};rport\r\nRoute: {rr}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=f-dlg1\r\nTo: {to}\r\nCall-ID: dlg1\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    a.send(&in_dialog("ACK", 2));
    expect(&bob, "ACK ");
    for (method, cseq) in [("INFO", 3), ("UPDATE", 4), ("BYE", 5)] {
        a.send(&in_dialog(method, cseq));
        let got = expect(&bob, &format!("{method} "));
        assert!(
            !got.contains(&format!("Route: {rr}")),
            "our Route is removed: {got}"
        );
        answer(&bob, &got, 200);
        let r = expect(&a, "SIP/2.0 200");
        assert!(r.contains(&format!("CSeq: {cseq} {method}")), "{r}");
    }
    // Without our route set an in-dialog request is refused (no relaying).
    let r = a.request(&in_dialog("INFO", 6).replace(&format!("Route: {rr}\r\n"), ""));
    assert_eq!(status(&r), 403, "{r}");
}

#[test]
fn challenges_from_every_branch_are_aggregated() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let desk = device(&server, "bob", "pw-bob");
    let soft = device(&server, "bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "agg1");
    for (ua, realm) in [(&desk, "desk.example"), (&soft, "soft.example")] {
        let inv = expect(ua, "INVITE ");
        let m = Message::parse(Bytes::from(inv), &ParseLimits::default()).unwrap();
        let r = ResponseBuilder::new(&m, 401)
            .to_tag(format!("dev{}", ua.port()))
            .header(
                "WWW-Authenticate",
                format!("Digest realm=\"{realm}\", nonce=\"n\", qop=\"auth\""),
            )
            .build();
        ua.sock.send_to(&r, ua.server).unwrap();
        expect(ua, "ACK ");
    }
    let r = expect(&a, "SIP/2.0 401");
    assert!(
        r.contains("realm=\"desk.example\"") && r.contains("realm=\"soft.example\""),
        "{r}"
    );
    assert_eq!(r.matches("WWW-Authenticate:").count(), 2, "{r}");
}

#[test]
fn an_unreachable_udp_binding_fails_at_once() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    // A UDP contact where nothing listens: the kernel answers with ICMP port unreachable.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let reg = Ua::new(server.sip_addr());
    let r = reg.register("bob", "pw-bob", DOMAIN, "reg-icmp", "");
    assert_eq!(status(&r), 200, "{r}");
    let r = reg.request(&reg.register_msg("bob", DOMAIN, "reg-icmp", 3, "Expires: 0\r\n"));
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "bob",
        DOMAIN,
        "pw-bob",
        "REGISTER",
        &format!("sip:{DOMAIN}"),
        1,
    );
    let extra =
        format!("Authorization: {auth}\r\nContact: <sip:bob@127.0.0.1:{dead}>;expires=300\r\n");
    let r = reg.request(&reg.register_msg(
        "bob",
        DOMAIN,
        "reg-icmp",
        4,
        &format!("Expires: 0\r\n{extra}"),
    ));
    assert_eq!(status(&r), 200, "{r}");
    let b = server.bindings_of("bob");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains(&format!(":{dead} ")), "{b:?}");
    let a = Ua::new(server.sip_addr());
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "icmp1");
    // Answered well before Timer B (32 s): the Ua waits 3 s at most.
    let r = expect(&a, "SIP/2.0 5");
    assert!(r.starts_with("SIP/2.0 500"), "{r}");
}

#[test]
fn hop_limit_loops_and_a_6xx_end_the_search() {
    let server = Server::start(DOMAIN);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let desk = device(&server, "bob", "pw-bob");
    let soft = device(&server, "bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    // Max-Forwards: 0 -> 483.
    let r = a.request(
        &invite_request(&a, DOMAIN, "alice", "bob", "mf0", 1, "mf0", "")
            .replace("Max-Forwards: 70", "Max-Forwards: 0"),
    );
    assert_eq!(status(&r), 483, "{r}");
    // Our own Via with the branch we would compute again -> 482.
    let first = invite_request(&a, DOMAIN, "alice", "bob", "loop1", 1, "loop1", "");
    let m = Message::parse(Bytes::from(first.clone()), &ParseLimits::default()).unwrap();
    let ours = format!(
        "Via: SIP/2.0/UDP 127.0.0.1:{};branch={}\r\n",
        server.port,
        careflow_core::proxy::branch(&careflow_core::proxy::loop_hash(&m), 1)
    );
    let looped = first.replacen("Via: ", &format!("{ours}Via: "), 1);
    let r = a.request(&looped);
    assert_eq!(status(&r), 482, "{r}");
    // A 6xx from one device ends the search: the other is cancelled, the caller gets the 6xx.
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "six1");
    let inv_desk = expect(&desk, "INVITE ");
    let inv_soft = expect(&soft, "INVITE ");
    answer(&soft, &inv_soft, 180);
    answer(&desk, &inv_desk, 603);
    let c = expect(&soft, "CANCEL ");
    answer(&soft, &c, 200);
    answer(&soft, &inv_soft, 487);
    expect(&a, "SIP/2.0 603");
}

#[test]
fn prack_refer_and_its_notify_pass_through() {
    let server = Server::start(DOMAIN);
    let (a, bob) = alice_and_bob(&server);
    let port = a.port();
    let bport = bob.port();

    // A call with a reliable provisional (100rel): the 183 and the PRACK pass untouched; then
    // a REFER inside the dialog.
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "rel1");
    let inv = expect(&bob, "INVITE ");
    let m = Message::parse(Bytes::from(inv.clone()), &ParseLimits::default()).unwrap();
    let mut b183 = ResponseBuilder::new(&m, 183)
        .to_tag(format!("dev{bport}"))
        .header("Contact", format!("<sip:dev@127.0.0.1:{bport}>"))
        .header("Require", "100rel")
        .header("RSeq", 1);
    for r in m.headers_named(careflow_proto::HeaderName::RecordRoute) {
        b183 = b183.header("Record-Route", r);
    }
    bob.sock.send_to(&b183.build(), bob.server).unwrap();
    let p = expect(&a, "SIP/2.0 183");
    assert!(
        p.contains("Require: 100rel") && p.contains("RSeq: 1"),
        "{p}"
    );
    let rr = header(&p, "Record-Route").unwrap().to_string();
    let to = header(&p, "To").unwrap().to_string();
    let in_dialog = |method: &str, cseq: u32, extra: &str| {
        format!("{method} sip:dev@127.0.0.1:{bport} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKrel{cseq};rport\r\nRoute: {rr}\r\nMax-Forwards: 70\r\nFrom: <sip:bob@{DOMAIN}>;tag=f-rel1\r\nTo: {to}\r\nCall-ID: rel1\r\nCSeq: {cseq} {method}\r\n{extra}Content-Length: 0\r\n\r\n")
            .replace("From: <sip:bob@", "From: <sip:alice@")
    };
    a.send(&in_dialog("PRACK", 3, "RAck: 1 2 INVITE\r\n"));
    let got = expect(&bob, "PRACK ");
    assert!(got.contains("RAck: 1 2 INVITE"), "{got}");
    answer(&bob, &got, 200);
    expect(&a, "SIP/2.0 200");
    answer(&bob, &inv, 200);
    expect(&a, "SIP/2.0 200");
    a.send(&in_dialog(
        "REFER",
        4,
        &format!("Refer-To: <sip:carol@{DOMAIN}>\r\n"),
    ));
    let got = expect(&bob, "REFER ");
    assert!(
        got.contains(&format!("Refer-To: <sip:carol@{DOMAIN}>")),
        "{got}"
    );
    answer(&bob, &got, 202);
    expect(&a, "SIP/2.0 202");
    // The REFER's implicit subscription: bob's NOTIFY comes back along the recorded route.
    // (Out-of-dialog SUBSCRIBEs to our users are ours: blf.rs.)
    let rr_bob: Vec<&str> = m
        .headers_named(careflow_proto::HeaderName::RecordRoute)
        .collect();
    let notify = format!(
        "NOTIFY sip:alice@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{bport};branch=z9hG4bKnot1;rport\r\nRoute: {}\r\nMax-Forwards: 70\r\nFrom: {to}\r\nTo: <sip:alice@{DOMAIN}>;tag=f-rel1\r\nCall-ID: rel1\r\nCSeq: 1 NOTIFY\r\nEvent: refer\r\nSubscription-State: active;expires=60\r\nContent-Type: message/sipfrag\r\nContent-Length: 20\r\n\r\nSIP/2.0 100 Trying\r\n",
        rr_bob.join(", ")
    );
    bob.send(&notify);
    let got = expect(&a, "NOTIFY ");
    assert!(got.contains("Event: refer\r\n"), "{got}");
    assert!(got.ends_with("SIP/2.0 100 Trying\r\n"), "{got}");
    answer(&a, &got, 200);
    expect(&bob, "SIP/2.0 200");
}

#[test]
fn a_call_across_two_interfaces_is_record_routed_on_both() {
    // Two UDP listeners on different addresses; the caller comes in on 127.0.0.2, the callee
    // is reached from 127.0.0.1.
    let second = free_port();
    let listen = format!("udp:127.0.0.1:{{port}},tcp:127.0.0.1:{{port}},udp:127.0.0.2:{second}");
    let server = Server::start_with(DOMAIN, &[("SIP_LISTEN", listen.as_str())]);
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let bob = device(&server, "bob", "pw-bob");
    let a = Ua::new(SocketAddr::from(([127, 0, 0, 2], second)));
    invite_authorized(&a, DOMAIN, ("alice", "pw-alice"), "bob", "iface1");
    let inv = expect(&bob, "INVITE ");
    let rrs: Vec<&str> = inv
        .lines()
        .filter(|l| l.starts_with("Record-Route:"))
        .collect();
    assert_eq!(
        rrs,
        vec![
            format!(
                "Record-Route: <sip:127.0.0.1:{};transport=udp;lr>",
                server.port
            )
            .as_str(),
            format!("Record-Route: <sip:127.0.0.2:{second};transport=udp;lr>").as_str(),
        ],
        "{inv}"
    );
    answer(&bob, &inv, 200);
    expect(&a, "SIP/2.0 200");
    // The callee hangs up along its route set: both of our entries are consumed.
    let bport = bob.port();
    let bye = format!(
        "BYE sip:alice@127.0.0.1:{} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{bport};branch=z9hG4bKbye1;rport\r\nRoute: <sip:127.0.0.1:{};transport=udp;lr>, <sip:127.0.0.2:{second};transport=udp;lr>\r\nMax-Forwards: 70\r\nFrom: <sip:bob@{DOMAIN}>;tag=dev{bport}\r\nTo: <sip:alice@{DOMAIN}>;tag=f-iface1\r\nCall-ID: iface1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        a.port(),
        server.port
    );
    bob.send(&bye);
    let got = expect(&a, "BYE ");
    assert!(!got.contains("Route:"), "{got}");
    answer(&a, &got, 200);
    expect(&bob, "SIP/2.0 200");
}

#[test]
fn a_strict_router_upstream_is_handled() {
    let server = Server::start(DOMAIN);
    server.add_user("bob", "pw-bob");
    let bob = device(&server, "bob", "pw-bob");
    let a = Ua::new(server.sip_addr());
    let (port, bport) = (a.port(), bob.port());
    // A strict router put our address into the Request-URI and the real target last in Route.
    let info = format!(
        "INFO sip:127.0.0.1:{} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKstrict1;rport\r\nRoute: <sip:dev@127.0.0.1:{bport}>\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=s1\r\nTo: <sip:bob@{DOMAIN}>;tag=b1\r\nCall-ID: strict1\r\nCSeq: 7 INFO\r\nContent-Length: 0\r\n\r\n",
        server.port
    );
    a.send(&info);
    let got = expect(&bob, "INFO ");
    assert!(
        got.starts_with(&format!("INFO sip:dev@127.0.0.1:{bport} SIP/2.0\r\n")),
        "{got}"
    );
    assert!(!got.contains("Route:"), "{got}");
    answer(&bob, &got, 200);
    expect(&a, "SIP/2.0 200");
}
