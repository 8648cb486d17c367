//! A cluster losing a node: killed, frozen or stopped, restarted; devices that fail over to
//! another node, calls ringing or up when it happens, a device with a flow through each node;
//! and what the nodes share meanwhile (bans, guesses).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::cluster::flush;
use crate::cluster_link::*;
use crate::support::*;

/// A REGISTER of one SIP Outbound flow (RFC 5626) of a device behind NAT: its instance id and
/// `reg_id`, with a private Contact.
fn register_outbound_flow(ua: &Ua, user: &str, password: &str, call_id: &str, reg_id: u32) {
    let flow = |m: String| {
        m.replace(
            &format!("Contact: <sip:{user}@127.0.0.1:{}>", ua.port()),
            &format!(
                "Supported: outbound, path\r\nContact: <sip:{user}@192.168.9.{reg_id}:5060>;reg-id={reg_id};\
                 +sip.instance=\"<urn:uuid:00000000-0000-4000-8000-00000000da17>\""
            ),
        )
    };
    let r = ua.register_rewritten(user, password, DOMAIN, call_id, flow);
    assert_eq!(status(&r), 200, "{r}");
}

#[test]
fn a_dead_node_is_skipped_fast_a_restarted_one_refuses_its_old_flows_and_outsiders_cannot_route_inside()
 {
    let db = TestDb::postgres();
    // (Database 0: every other one is some other test's; they run at once.)
    flush(0);
    let redis = "redis://127.0.0.1:6379/0";
    let a = member(2, &db, redis);
    let mut b = member(3, &db, redis);
    joined(&[&a, &b]);
    a.add_user("alice", "pw-alice-d");
    a.add_user("bob", "pw-bob-d");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-d", "bob-on-b");
    let route = owner_route(0, "bob");
    assert!(
        route.contains(&format!("@127.0.0.3:{};transport=tcp;lr", b.port3)),
        "{route}"
    );

    // alice on A calls bob on B: INVITE, 200, ACK through the internal link; bob hangs up.
    let alice = Ua::new(a.sip_addr());
    invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-d"), "bob", "across");
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 200);
    let ok = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| m.starts_with("SIP/2.0 200"))
        .unwrap_or_else(|| panic!("no 200 through the link:\n{}\n{}", a.log(), b.log()));
    let rr: Vec<&str> = ok
        .lines()
        .filter_map(|l| l.strip_prefix("Record-Route: "))
        .collect();
    let route_set: String = rr.iter().rev().map(|r| format!("Route: {r}\r\n")).collect();
    let contact = header(&ok, "Contact")
        .unwrap()
        .trim_matches(|c| c == '<' || c == '>');
    let to = header(&ok, "To").unwrap().to_string();
    let port = alice.port();
    alice.send(&format!(
        "ACK {contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKack-across;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag=f-across\r\nTo: {to}\r\nCall-ID: across\r\n\
         CSeq: 2 ACK\r\n{route_set}Content-Length: 0\r\n\r\n"
    ));
    let ack = expect(&bob, "ACK ");
    assert!(header(&ack, "Route").is_none(), "{ack}");
    // bob's BYE follows the route set the other way (B, then A, then alice).
    let bob_routes: String = inv
        .lines()
        .filter_map(|l| l.strip_prefix("Record-Route: "))
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    let from = header(&inv, "From").unwrap().to_string();
    let bport = bob.port();
    bob.send(&format!(
        "BYE sip:alice@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 192.168.7.1:5060;branch=z9hG4bKbye-across;rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:bob@{DOMAIN}>;tag=dev{bport}\r\nTo: {from}\r\nCall-ID: across\r\n\
         CSeq: 1 BYE\r\n{bob_routes}Content-Length: 0\r\n\r\n"
    ));
    let bye = expect(&alice, "BYE ");
    answer(&alice, &bye, 200);
    assert_eq!(status(&expect(&bob, "SIP/2.0 ")), 200);

    // The owner route from outside the cluster: to B's SIP port, and to its internal link.
    let forged_uri = format!("sip:bob@192.168.7.{}:5060", bob.port() % 250);
    let outsider = Ua::new(b.sip_addr());
    let forged = |transport: &str, port: u16| {
        format!(
            "INVITE {forged_uri} SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.1:{port};branch=z9hG4bKforged{transport};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:mallory@evil.test>;tag=m\r\nTo: <sip:bob@{DOMAIN}>\r\n\
             Call-ID: forged-{transport}\r\nCSeq: 1 INVITE\r\nRoute: {route}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let r = expect_final(&outsider, "forged-UDP", &forged("UDP", outsider.port()));
    assert_eq!(status(&r), 403, "{r}");
    let mut link = std::net::TcpStream::connect(("127.0.0.3", b.port3)).unwrap();
    link.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let local = link.local_addr().unwrap().port();
    link.write_all(forged("TCP", local).as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    while !seen.contains("SIP/2.0 403") {
        match link.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => panic!("no 403 on the internal link from outside; got {seen:?}"),
        }
    }
    assert!(bob.recv().is_none(), "a forged route reached the device");

    // Redis stalls for 2 s: nobody is taken for dead, calls still go through.
    let before = a.log().len();
    let paused = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "CLIENT", "PAUSE", "2000", "ALL"])
        .output()
        .expect("redis-cli");
    assert!(paused.status.success());
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !a.log()[before..].contains("cluster membership changed"),
        "a Redis stall flapped membership:\n{}",
        a.log()
    );
    invite_authorized(
        &alice,
        DOMAIN,
        ("alice", "pw-alice-d"),
        "bob",
        "after-stall",
    );
    let inv = expect(&bob, "INVITE ");
    answer(&bob, &inv, 486);
    let r = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| m.contains("Call-ID: after-stall") && status(m) >= 300)
        .unwrap();
    assert_eq!(status(&r), 486, "{r}");

    // B dies (SIGKILL): once its key has expired, calls to its device fail at once.
    b.crash();
    let died = Instant::now();
    let mut n = 0;
    let fast_480 = loop {
        n += 1;
        let call_id = format!("after-death-{n}");
        // A fresh socket each time: the proxy retransmits finals nobody ACKs here.
        let alice = Ua::new(a.sip_addr());
        let sent = Instant::now();
        invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-d"), "bob", &call_id);
        let r = (0..20)
            .filter_map(|_| alice.recv())
            .find(|m| m.contains(&format!("Call-ID: {call_id}\r\n")) && status(m) >= 300);
        if r.as_deref().map(status) == Some(480) {
            break sent.elapsed();
        }
        assert!(
            died.elapsed() < Duration::from_secs(15),
            "calls to a dead node's device still not refused:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(fast_480 < Duration::from_secs(1), "{fast_480:?}");
    eprintln!(
        "a dead node's device refused {:?} after the kill, each call in {fast_480:?}",
        died.elapsed()
    );
    assert!(a.metric("careflow_sip_cluster_bindings_skipped_total") > 0);

    // B restarts (same address, a new boot epoch): its old flows are dropped, not used.
    b.start_again();
    assert!(
        b.log_shows("bindings this node held before its restart removed"),
        "{}",
        b.log()
    );
    assert!(a.bindings_of("bob").is_empty());
    // bob re-registers on A (failover): reachable again, one binding.
    let bob_on_a = Ua::new(a.sip_addr());
    register_behind_nat(&bob_on_a, "bob", "pw-bob-d", "bob-on-a");
    assert_eq!(b.bindings_of("bob").len(), 1);
    let alice = Ua::new(a.sip_addr());
    invite_authorized(
        &alice,
        DOMAIN,
        ("alice", "pw-alice-d"),
        "bob",
        "failed-over",
    );
    let inv = expect(&bob_on_a, "INVITE ");
    assert!(inv.contains("Call-ID: failed-over"), "{inv}");
}

#[test]
fn a_ban_on_one_node_holds_on_all_and_a_node_that_stops_is_skipped_at_once() {
    let db = TestDb::postgres();
    flush(8);
    let redis = "redis://127.0.0.1:6379/8";
    let a = member(2, &db, redis);
    let mut b = member(3, &db, redis);
    joined(&[&a, &b]);
    a.add_user("alice", "pw-alice-s");
    a.add_user("bob", "pw-bob-s");

    // A password guesser (not allow-listed) is banned on A after five wrong guesses...
    let guesser = Ua::from_ip(a.sip_addr(), "127.0.0.9");
    for i in 0..5 {
        let r1 = guesser.request(&guesser.register_msg("alice", DOMAIN, "guess", 2 * i + 1, ""));
        let auth = authorization(
            &r1,
            careflow_proto::digest::Algorithm::Md5,
            "alice",
            DOMAIN,
            "not-her-password",
            "REGISTER",
            &format!("sip:{DOMAIN}"),
            1,
        );
        let r2 = guesser.request(&guesser.register_msg(
            "alice",
            DOMAIN,
            "guess",
            2 * i + 2,
            &format!("Authorization: {auth}\r\n"),
        ));
        assert!(matches!(status(&r2), 401 | 403), "{r2}");
    }
    assert!(
        a.log_shows("SECURITY banned_flow src_ip=127.0.0.9"),
        "{}",
        a.log()
    );
    // ...and, from the same flow, gets nothing from B either (the ban was shared).
    let same_flow = Ua {
        sock: guesser.sock.try_clone().unwrap(),
        server: b.sip_addr(),
    };
    // (Bans are shared once a second.)
    same_flow
        .sock
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answered_by_b = true;
    for _ in 0..8 {
        same_flow.send(&same_flow.register_msg("alice", DOMAIN, "guess-b", 99, ""));
        if same_flow.recv().is_none() {
            answered_by_b = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        !answered_by_b,
        "B still answers a flow banned on A:\n{}",
        b.log()
    );
    // A guesser spreading its guesses over the nodes gets no more than at one: three on A,
    // then two on B ban it (each node counts the other's).
    let spreader = Ua::from_ip(a.sip_addr(), "127.0.0.10");
    let on_b = Ua {
        sock: spreader.sock.try_clone().unwrap(),
        server: b.sip_addr(),
    };
    // (Guessing bob's password: alice's has had its five guesses from anywhere already.)
    let guess = |ua: &Ua, cseq: u32| {
        let r1 = ua.request(&ua.register_msg("bob", DOMAIN, "spread", cseq, ""));
        let auth = authorization(
            &r1,
            careflow_proto::digest::Algorithm::Md5,
            "bob",
            DOMAIN,
            "not-his-password",
            "REGISTER",
            &format!("sip:{DOMAIN}"),
            1,
        );
        ua.request(&ua.register_msg(
            "bob",
            DOMAIN,
            "spread",
            cseq + 1,
            &format!("Authorization: {auth}\r\n"),
        ))
    };
    for i in 0..3 {
        assert!(matches!(status(&guess(&spreader, 2 * i + 1)), 401 | 403));
    }
    std::thread::sleep(Duration::from_millis(1500)); // guesses are shared once a second
    for i in 3..5 {
        assert!(matches!(status(&guess(&on_b, 2 * i + 1)), 401 | 403));
    }
    assert!(
        b.log_shows("SECURITY banned_flow src_ip=127.0.0.10"),
        "five guesses over two nodes did not ban:\n{}",
        b.log()
    );

    // Another device at the guesser's address is not affected (a flow ban, not a site ban).
    let neighbour = Ua::from_ip(b.sip_addr(), "127.0.0.9");
    let r = neighbour.request(&neighbour.register_msg("alice", DOMAIN, "n", 1, ""));
    assert_eq!(status(&r), 401, "{r}");

    // bob's phone is on B; B stops (SIGTERM): A skips it at once, without waiting for B's key
    // to expire.
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-s", "bob-s");
    b.stop();
    let stopped = Instant::now();
    assert!(a.log_shows("a node announced its stop"), "{}", a.log());
    let alice = Ua::new(a.sip_addr());
    invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-s"), "bob", "after-stop");
    let r = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| m.contains("Call-ID: after-stop") && status(m) >= 300)
        .unwrap_or_else(|| panic!("no answer:\n{}", a.log()));
    assert_eq!(status(&r), 480, "{r}");
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
}

#[test]
fn a_web_phone_whose_node_dies_reconnects_to_another_and_is_called_there_with_one_binding() {
    require("sipp", "sip-tester");
    let js = crate::websocket::js_dir();
    let db = TestDb::postgres();
    flush(7);
    let redis = "redis://127.0.0.1:6379/7";
    let a = member(2, &db, redis);
    let mut b = member(3, &db, redis);
    joined(&[&a, &b]);
    a.add_user("web1", "pw-web1-failover");
    a.add_user("caller", "pw-caller-failover");
    let tmp = tempfile::tempdir().unwrap();
    let caller = crate::peers::sipp_file(
        tmp.path(),
        "caller.csv",
        &[("caller", "pw-caller-failover")],
    );

    let wss = |s: &Server| format!("wss://{}:{}/", s.host, s.port2);
    let mut phone = crate::websocket::Events::spawn({
        let mut node = std::process::Command::new("node");
        node.current_dir(&js).arg("jssip-failover.js").args([
            wss(&b),
            wss(&a),
            format!("sip:web1@{DOMAIN}"),
            "pw-web1-failover".to_string(),
        ]);
        node
    });
    phone.wait("registered 1", &b);
    let on_b = format!("{}:{}", b.host, b.port3);
    let listed = a.bindings_of("web1");
    assert!(
        listed.len() == 1 && listed[0].ends_with(&on_b),
        "{listed:?}"
    );
    // Called from a UDP phone on A: through the internal link to B, over the tab's WebSocket.
    crate::websocket::sipp_calls(&a, &caller, "web1", &mut phone);
    phone.wait("incoming-confirmed 1", &b);
    phone.wait("incoming-ended 1", &b);

    // A second call is up when B dies; the tab reconnects to A and registers again: one
    // binding, now A's. The caller's BYE follows the tab to its new connection.
    let held = crate::websocket::sipp_call(&a, &caller, "web1", 8000)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    phone.wait("incoming-confirmed 2", &b);
    b.crash();
    phone.wait("registered 2", &a);
    let listed = a.bindings_of("web1");
    let on_a = format!("{}:{}", a.host, a.port3);
    assert!(
        listed.len() == 1 && listed[0].ends_with(&on_a),
        "{listed:?}"
    );
    phone.wait("incoming-ended 2", &a);
    let out = held.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the call held across the failover did not end cleanly: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    assert!(
        a.log().contains("in-dialog request follows its device"),
        "{}",
        a.log()
    );
    // A new call reaches the tab on A.
    crate::websocket::sipp_calls(&a, &caller, "web1", &mut phone);
    phone.wait("incoming-confirmed 3", &a);
    phone.wait("incoming-ended 3", &a);
    assert_eq!(
        a.metric("careflow_sip_calls_total{result=\"answered\"}"),
        3,
        "each call rang the tab once"
    );
}

#[test]
fn a_call_ringing_when_its_node_dies_connects_when_the_device_registers_again_elsewhere() {
    let db = TestDb::postgres();
    flush(6);
    let redis = "redis://127.0.0.1:6379/6";
    let a = member(2, &db, redis);
    let mut b = member(3, &db, redis);
    let c = member(4, &db, redis);
    joined(&[&a, &b, &c]);
    a.add_user("alice", "pw-alice-l");
    a.add_user("bob", "pw-bob-l");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-l", "bob-l");

    // alice (on C) calls bob (on B); bob's phone rings.
    let alice = Ua::new(c.sip_addr());
    invite_authorized(
        &alice,
        DOMAIN,
        ("alice", "pw-alice-l"),
        "bob",
        "ringing-over",
    );
    let first = expect(&bob, "INVITE ");
    answer(&bob, &first, 180);
    let ringing = (0..10)
        .filter_map(|_| alice.recv())
        .find(|m| m.starts_with("SIP/2.0 180"));
    assert!(ringing.is_some(), "no 180 through the link:\n{}", c.log());

    // B dies while it rings; the phone registers again through A (the same Contact). C hears
    // of it and the call gains a branch through A.
    b.crash();
    let bob_via_a = Ua {
        sock: bob.sock.try_clone().unwrap(),
        server: a.sip_addr(),
    };
    register_behind_nat(&bob_via_a, "bob", "pw-bob-l", "bob-l-again");
    // The ringing call gains a branch to the phone's new flow, and connects.
    let late = expect(&bob, "INVITE ");
    assert!(late.contains("Call-ID: ringing-over"), "{late}");
    assert_ne!(header(&late, "Via"), header(&first, "Via"), "a new branch");
    answer(&bob_via_a, &late, 200);
    let ok = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| status(m) >= 200 && m.contains("INVITE\r\n"))
        .unwrap_or_else(|| panic!("no final answer:\n{}", c.log()));
    assert_eq!(status(&ok), 200, "{ok}");
    assert!(c.log().contains("late fork"), "{}", c.log());
    assert_eq!(c.metric("careflow_sip_calls_total{result=\"answered\"}"), 1);
}

#[test]
fn a_frozen_node_is_skipped_once_its_key_expires_and_comes_back_when_it_thaws() {
    let db = TestDb::postgres();
    flush(5);
    let redis = "redis://127.0.0.1:6379/5";
    let a = member(2, &db, redis);
    let b = member(3, &db, redis);
    joined(&[&a, &b]);
    a.add_user("alice", "pw-alice-f");
    a.add_user("bob", "pw-bob-f");
    let bob = Ua::new(b.sip_addr());
    register_behind_nat(&bob, "bob", "pw-bob-f", "bob-f");

    // B stops answering anything (SIGSTOP: its sockets still accept, nothing is read; as
    // when its host is cut off). Once its liveness key has expired, A refuses calls to B's
    // device at once instead of letting them hang on the link.
    b.signal("STOP");
    let frozen = Instant::now();
    let fast = loop {
        let alice = Ua::new(a.sip_addr());
        let call_id = format!("frozen-{}", frozen.elapsed().as_millis());
        let sent = Instant::now();
        invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-f"), "bob", &call_id);
        alice
            .sock
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let r = (0..4)
            .filter_map(|_| alice.recv())
            .find(|m| m.contains(&format!("Call-ID: {call_id}\r\n")) && status(m) >= 300);
        if r.as_deref().map(status) == Some(480) {
            break sent.elapsed();
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(15),
            "calls to a frozen node's device still not refused:\n{}",
            a.log()
        );
    };
    assert!(fast < Duration::from_secs(1), "{fast:?}");
    eprintln!(
        "a frozen node's device refused {:?} after the freeze",
        frozen.elapsed()
    );
    // B thaws: the same life (its epoch), its key is refreshed, its device is reachable again.
    b.signal("CONT");
    let thawed = Instant::now();
    loop {
        let alice = Ua::new(a.sip_addr());
        let call_id = format!("thawed-{}", thawed.elapsed().as_millis());
        invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-f"), "bob", &call_id);
        bob.sock
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // (Calls A sent while B was frozen may arrive first: B reads its backlog now.)
        if (0..8)
            .filter_map(|_| bob.recv())
            .any(|m| m.starts_with("INVITE ") && m.contains(&format!("Call-ID: {call_id}\r\n")))
        {
            break;
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(10),
            "B's device not reachable after B thawed:\n{}",
            a.log()
        );
    }
}

#[test]
fn when_one_flow_of_a_device_fails_the_call_tries_its_other_flow() {
    let db = TestDb::postgres();
    flush(3);
    let redis = "redis://127.0.0.1:6379/3";
    let a = member(2, &db, redis);
    let mut b = member(3, &db, redis);
    joined(&[&a, &b]);
    a.add_user("alice", "pw-alice-o");
    a.add_user("dan", "pw-dan-o");
    // Dan's phone keeps two flows (RFC 5626): reg-id 1 through A, reg-id 2 through B (the one
    // refreshed last, which calls use first).
    let flow_a = Ua::new(a.sip_addr());
    register_outbound_flow(&flow_a, "dan", "pw-dan-o", "dan-1", 1);
    std::thread::sleep(Duration::from_millis(1100));
    let flow_b = Ua::new(b.sip_addr());
    register_outbound_flow(&flow_b, "dan", "pw-dan-o", "dan-2", 2);
    assert_eq!(a.bindings_of("dan").len(), 2);

    // B dies; before anyone notices, alice calls: the branch to B's flow fails at once (the
    // link refuses), and the call tries the flow through A.
    b.crash();
    let alice = Ua::new(a.sip_addr());
    invite_authorized(&alice, DOMAIN, ("alice", "pw-alice-o"), "dan", "two-flows");
    let inv = expect(&flow_a, "INVITE ");
    assert!(inv.contains("Call-ID: two-flows"), "{inv}");
    answer(&flow_a, &inv, 200);
    let ok = (0..20)
        .filter_map(|_| alice.recv())
        .find(|m| status(m) >= 200 && m.contains("INVITE\r\n"))
        .unwrap_or_else(|| panic!("no final answer:\n{}", a.log()));
    assert_eq!(status(&ok), 200, "{ok}");
    assert!(a.log().contains("trying its next flow"), "{}", a.log());
}
