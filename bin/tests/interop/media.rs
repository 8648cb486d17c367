//! Calls with media anchored at a real rtpengine (Debian's rtpengine-daemon, userspace, on
//! loopback): two baresip phones talk through it, and a call whose rtpengine is absent still
//! connects with its own SDP.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use careflow_proto::bencode::Value;

use crate::peers::{
    answer_with_sdp, baresip_home_at, call_bob, register_contact, scenario, sipp_file,
};
use crate::support::*;

fn ng(addr: &str, cmd: &Value) -> Option<Value> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // rtpengine answers a repeated cookie from its cache: one per request.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut packet = format!("test{n} ").into_bytes();
    cmd.encode_into(&mut packet);
    for _ in 0..5 {
        s.send_to(&packet, addr).unwrap();
        let mut buf = vec![0u8; 65536];
        if let Ok(n) = s.recv(&mut buf) {
            let at = buf[..n].iter().position(|&b| b == b' ')?;
            return Value::decode(&buf[at + 1..n]);
        }
    }
    None
}

fn start_rtpengine() -> Rtpengine {
    Rtpengine::start(&[])
}

fn phones(server: &Server, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    server.add_user("mia", "pw-mia-media");
    server.add_user("noah", "pw-noah-media");
    let (a, b) = (dir.join("mia"), dir.join("noah"));
    let outbound = format!("sip:127.0.0.1:{}", server.port);
    baresip_home_at(&a, "<sip:mia@localhost>", "pw-mia-media", &outbound, "", "");
    baresip_home_at(
        &b,
        "<sip:noah@localhost>",
        "pw-noah-media",
        &outbound,
        ";answermode=auto",
        "",
    );
    (a, b)
}

fn wait_registered(server: &Server, user: &str) {
    for _ in 0..100 {
        if !server.bindings_of(user).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{user} did not register:\n{}", server.log());
}

#[test]
fn two_phones_talk_through_rtpengine() {
    require("baresip", "baresip");
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[("RTPENGINE", rtp.ng.as_str()), ("MEDIA_POLICY", "always")],
    );
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = phones(&server, tmp.path());
    let mut callee = baresip(&b, "40", false);
    wait_registered(&server, "noah");
    let caller = Command::new("baresip")
        .args([
            "-f",
            a.to_str().unwrap(),
            "-e",
            "/dial sip:noah@localhost",
            "-t",
            "6",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-call, rtpengine has the call and counts packets on it.
    std::thread::sleep(Duration::from_secs(4));
    let list = ng(&rtp.ng, &Value::dict([("command", Value::str("list"))])).expect("list");
    let calls = match list.get("calls") {
        Some(Value::List(c)) => c.clone(),
        other => panic!("no calls in {other:?}\n{}", server.log()),
    };
    if calls.len() != 1 {
        let out = caller.wait_with_output().unwrap();
        panic!(
            "{list:?}\ncaller:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            server.log()
        );
    }
    let call_id = calls[0].as_str().unwrap().to_string();
    let q = ng(
        &rtp.ng,
        &Value::dict([
            ("command", Value::str("query")),
            ("call-id", Value::str(&call_id)),
        ]),
    )
    .expect("query");
    let packets = q
        .get("totals")
        .and_then(|t| t.get("RTP"))
        .and_then(|r| r.get("packets"))
        .and_then(Value::as_int)
        .unwrap_or(0);
    assert!(packets > 50, "too few RTP packets through rtpengine: {q:?}");
    // Each phone's media goes to rtpengine in both directions: both tags carry packets.
    let tags = match q.get("tags") {
        Some(Value::Dict(t)) => t.clone(),
        _ => panic!("{q:?}"),
    };
    assert_eq!(tags.len(), 2, "{q:?}");
    let out = caller.wait_with_output().unwrap();
    let _ = callee.kill();
    let _ = callee.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Call established"),
        "{text}\n{}",
        server.log()
    );
    assert!(server.metric("careflow_sip_rtpengine_commands_total") >= 3);
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
}

#[test]
fn without_rtpengine_the_call_still_connects_with_its_own_sdp() {
    require("baresip", "baresip");
    let dead = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(
        "localhost",
        &[
            ("RTPENGINE", dead.as_str()),
            ("MEDIA_POLICY", "always"),
            ("RTPENGINE_TIMEOUT_MS", "100"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = phones(&server, tmp.path());
    let mut callee = baresip(&b, "30", false);
    wait_registered(&server, "noah");
    let out = Command::new("baresip")
        .args([
            "-f",
            a.to_str().unwrap(),
            "-e",
            "/dial sip:noah@localhost",
            "-t",
            "4",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = callee.kill();
    let _ = callee.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Call established"),
        "{text}\n{}",
        server.log()
    );
    assert!(
        server.log().contains("media not anchored"),
        "{}",
        server.log()
    );
}

/// What rtpengine's `query` says about each party of a call: its media protocol and the RTP
/// packets rtpengine received from it.
fn legs(q: &Value) -> Vec<(String, i64)> {
    let Some(Value::Dict(tags)) = q.get("tags") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for tag in tags.values() {
        let Some(Value::List(medias)) = tag.get("medias") else {
            continue;
        };
        for m in medias {
            let protocol = m.get("protocol").and_then(Value::as_str).unwrap_or("?");
            let mut packets = 0;
            if let Some(Value::List(streams)) = m.get("streams") {
                for s in streams {
                    packets += s
                        .get("stats")
                        .and_then(|st| st.get("packets"))
                        .and_then(Value::as_int)
                        .unwrap_or(0);
                }
            }
            out.push((protocol.to_string(), packets));
        }
    }
    out.sort();
    out
}

/// The one call rtpengine holds, queried.
fn the_call(rtp: &Rtpengine, server: &Server) -> Value {
    let list = ng(&rtp.ng, &Value::dict([("command", Value::str("list"))])).expect("list");
    let calls = match list.get("calls") {
        Some(Value::List(c)) if c.len() == 1 => c.clone(),
        other => panic!("not one call in rtpengine: {other:?}\n{}", server.log()),
    };
    let call_id = calls[0].as_str().unwrap().to_string();
    ng(
        &rtp.ng,
        &Value::dict([
            ("command", Value::str("query")),
            ("call-id", Value::str(&call_id)),
        ]),
    )
    .expect("query")
}

/// The legs of the one call rtpengine holds, once both have carried more than 50 RTP packets
/// to it (or as they are after three seconds).
fn both_legs_carry_rtp(rtp: &Rtpengine, server: &Server) -> Vec<(String, i64)> {
    let mut l = Vec::new();
    for _ in 0..30 {
        l = legs(&the_call(rtp, server));
        if l.len() == 2 && l.iter().all(|(_, p)| *p > 50) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    l
}

/// Audio flowed both ways: the browser (packets in and out, DTLS connected) and rtpengine (the
/// browser's leg is DTLS-SRTP, the phone's plain RTP, each sent it more than 50 packets).
fn browser_and_phone_talked(
    (received, sent, dtls): (u64, u64, &str),
    legs: &[(String, i64)],
    rtp: &Rtpengine,
    server: &Server,
) {
    assert!(
        received > 50 && sent > 50 && dtls == "connected",
        "browser: in {received} out {sent} dtls {dtls}; rtpengine: {legs:?}\n{}",
        server.log()
    );
    assert_eq!(legs.len(), 2, "{legs:?}");
    assert_eq!(legs[0].0, "RTP/AVP", "{legs:?}");
    assert_eq!(legs[1].0, "UDP/TLS/RTP/SAVPF", "{legs:?}");
    assert!(
        legs.iter().all(|(_, p)| *p > 50),
        "{legs:?}\nrtpengine:\n{}",
        rtp.log_tail()
    );
}

/// "NAME-stats IN OUT DTLS" from the browser: packets it received and sent, DTLS state.
fn browser_stats(line: &str) -> (u64, u64, String) {
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts.len(), 4, "{line}");
    (
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
        parts[3].to_string(),
    )
}

#[test]
fn a_browser_and_a_desk_phone_talk_through_rtpengine_both_ways() {
    require("baresip", "baresip");
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", "udp:127.0.0.1:{port},wss:127.0.0.1:{port2}"),
            ("RTPENGINE", rtp.ng.as_str()),
            // Anchored because a WebRTC leg meets a plain one, not because every call is.
            ("MEDIA_POLICY", "when-needed"),
        ],
    );
    server.add_user("web1", "pw-web1-media");
    let tmp = tempfile::tempdir().unwrap();
    let (mia, noah) = phones(&server, tmp.path());
    let mut desk = baresip(&noah, "80", false);
    let node = crate::peers::browser_phone(
        &format!("wss://127.0.0.1:{}/", server.port2),
        "sip:web1@localhost",
        "pw-web1-media",
        "sip:noah@localhost",
        Some("media"),
    );
    let mut browser = crate::websocket::Events::spawn(node);
    browser.wait("registered", &server);
    wait_registered(&server, "noah");

    // The desk phone calls the browser.
    let mut caller = Command::new("baresip")
        .args([
            "-f",
            mia.to_str().unwrap(),
            "-e",
            "/dial sip:web1@localhost",
            "-t",
            "20",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    browser.wait("incoming-confirmed", &server);
    let (received, sent, dtls) = browser_stats(&browser.wait("incoming-stats", &server));
    let l = both_legs_carry_rtp(&rtp, &server);
    browser.wait("incoming-ended", &server);
    let _ = caller.kill();
    let _ = caller.wait();
    browser_and_phone_talked((received, sent, &dtls), &l, &rtp, &server);

    // The browser calls the desk phone.
    browser.wait("outgoing-confirmed", &server);
    let (received, sent, dtls) = browser_stats(&browser.wait("outgoing-stats", &server));
    let l = both_legs_carry_rtp(&rtp, &server);
    browser.wait("outgoing-ended", &server);
    browser.wait("done", &server);
    let _ = desk.kill();
    let _ = desk.wait();
    browser_and_phone_talked((received, sent, &dtls), &l, &rtp, &server);
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
}

/// What sipp wrote about its failures in `dir` (its *_errors.log files).
fn sipp_errors(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with("_errors.log") {
            out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

#[test]
fn a_late_offer_a_hold_and_a_resume_all_go_through_rtpengine() {
    require("sipp", "sip-tester");
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[("RTPENGINE", rtp.ng.as_str()), ("MEDIA_POLICY", "always")],
    );
    server.add_user("caller", "pw-caller-hold");
    server.add_user("callee", "pw-callee-hold");
    let tmp = tempfile::tempdir().unwrap();
    let caller = sipp_file(tmp.path(), "caller.csv", &[("caller", "pw-caller-hold")]);
    let callee = sipp_file(tmp.path(), "callee.csv", &[("callee", "pw-callee-hold")]);
    let uas_port = free_port();
    // Each sipp checks that every SDP it receives carries rtpengine's port (its scenarios'
    // `check_it` regular expressions) and the hold direction.
    let uas = Command::new("sipp")
        .current_dir(tmp.path())
        .args(["-sf", &scenario("uas-late-hold.xml"), "-i", "127.0.0.1"])
        .args(["-p", &uas_port.to_string(), "-t", "u1", "-m", "1"])
        .args(["-nostdin", "-timeout", "60s", "-timeout_error"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    register_contact(&server, &callee, uas_port, "udp");
    let uac = Command::new("sipp")
        .current_dir(tmp.path())
        .arg(server.sip_addr().to_string())
        .args(["-sf", &scenario("uac-late-hold.xml"), "-inf"])
        .arg(&caller)
        .args(["-key", "domain", "localhost", "-key", "callee", "callee"])
        .args(["-auth_uri", "callee@localhost", "-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string(), "-t", "u1", "-m", "1"])
        .args(["-nostdin", "-timeout", "30s", "-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let uas = uas.wait_with_output().unwrap();
    assert!(
        uac.status.success() && uas.status.success(),
        "caller: {}\ncallee: {}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&uac.stderr),
        String::from_utf8_lossy(&uas.stderr),
        sipp_errors(tmp.path()),
        server.log()
    );
    // offer (late, in the 200) + answer (ACK), offer + answer (hold), offer + answer (resume),
    // delete (BYE).
    assert!(
        server.metric("careflow_sip_rtpengine_commands_total") >= 7,
        "{}",
        server.log()
    );
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
}

/// A baresip phone from `home` (answering when its account says so) that quits after
/// `seconds`; its stdout is kept when `output`.
fn baresip(home: &std::path::Path, seconds: &str, output: bool) -> Child {
    Command::new("baresip")
        .args(["-f", home.to_str().unwrap(), "-t", seconds])
        .stdin(Stdio::null())
        .stdout(if output {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn dial(phone: &std::path::Path, seconds: &str) -> Child {
    Command::new("baresip")
        .args([
            "-f",
            phone.to_str().unwrap(),
            "-e",
            "/dial sip:noah@localhost",
            "-t",
            seconds,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_call_whose_rtpengine_dies_ends_cleanly_and_the_next_call_connects_unanchored() {
    require("baresip", "baresip");
    let mut rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("RTPENGINE", rtp.ng.as_str()),
            ("MEDIA_POLICY", "always"),
            ("RTPENGINE_TIMEOUT_MS", "100"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = phones(&server, tmp.path());
    let callee = baresip(&b, "16", true);
    wait_registered(&server, "noah");
    let caller = dial(&a, "6");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        server.metric("careflow_sip_media_sessions"),
        1,
        "{}",
        server.log()
    );
    // rtpengine dies mid-call; the caller hangs up three seconds later.
    rtp.kill();
    let out = caller.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Call established") && text.contains("terminated"),
        "{text}\n{}",
        server.log()
    );
    // The BYE went through; the media session is gone from our books even though rtpengine
    // could not be told, and the log says so.
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
    assert!(server.log_shows("media delete failed"), "{}", server.log());

    // The next call, with rtpengine still dead, connects with its own SDP.
    let out = dial(&a, "4").wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Call established"),
        "{text}\n{}",
        server.log()
    );
    assert!(server.log_shows("media not anchored"), "{}", server.log());
    // The callee saw both calls end with a BYE.
    let out = callee.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("terminated").count(), 2, "{text}");
}

#[test]
fn a_call_rtpengine_dropped_after_its_phones_vanished_is_forgotten() {
    require("baresip", "baresip");
    // rtpengine drops a call two seconds after its media stops.
    let rtp = Rtpengine::start(&["--timeout=2"]);
    let server = Server::start_with(
        "localhost",
        &[
            ("RTPENGINE", rtp.ng.as_str()),
            ("MEDIA_POLICY", "always"),
            ("RTPENGINE_CHECK_INTERVAL", "1"),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = phones(&server, tmp.path());
    let mut callee = baresip(&b, "30", false);
    wait_registered(&server, "noah");
    let mut caller = dial(&a, "30");
    for _ in 0..50 {
        if server.log().contains("call answered") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    // Still held after several checks while media flows.
    assert_eq!(
        server.metric("careflow_sip_media_sessions"),
        1,
        "{}",
        server.log()
    );
    // Both phones die without a BYE.
    for p in [&mut caller, &mut callee] {
        let _ = p.kill();
        let _ = p.wait();
    }
    assert!(
        server.log_shows("rtpengine no longer holds the call's media"),
        "{}",
        server.log()
    );
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
}

/// A raw SIP-over-WebSocket client registered as `user`.
struct WsPhone(std::net::TcpStream);

impl WsPhone {
    fn register(port: u16, user: &str, password: &str) -> Self {
        use careflow_proto::digest::Algorithm;
        use std::io::Write;
        let (head, mut s) = crate::websocket::upgrade(port, "Sec-WebSocket-Protocol: sip\r\n");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let msg = |cseq: u32, extra: &str| {
            format!(
                "REGISTER sip:localhost SIP/2.0\r\nVia: SIP/2.0/WS ws1.invalid;branch=z9hG4bKws{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@localhost>;tag=ws{cseq}\r\nTo: <sip:{user}@localhost>\r\nCall-ID: ws-register\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@ws1.invalid;transport=ws>\r\nExpires: 300\r\n{extra}Content-Length: 0\r\n\r\n"
            )
        };
        s.write_all(&crate::websocket::client_frame(1, msg(1, "").as_bytes()))
            .unwrap();
        let mut me = Self(s);
        let challenge = me.recv();
        let auth = authorization(
            &challenge,
            Algorithm::Md5,
            user,
            "localhost",
            password,
            "REGISTER",
            "sip:localhost",
            1,
        );
        let second = msg(2, &format!("Authorization: {auth}\r\n"));
        me.0.write_all(&crate::websocket::client_frame(1, second.as_bytes()))
            .unwrap();
        let ok = me.recv();
        assert_eq!(status(&ok), 200, "{ok}");
        me
    }

    fn recv(&mut self) -> String {
        loop {
            let (op, payload) = crate::websocket::server_frame(&mut self.0).expect("a frame");
            if op == 1 || op == 2 {
                return String::from_utf8_lossy(&payload).into_owned();
            }
        }
    }
}

#[test]
fn a_fork_to_a_browser_and_a_desk_phone_gives_each_branch_its_own_offer() {
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", "udp:127.0.0.1:{port},ws:127.0.0.1:{port2}"),
            ("RTPENGINE", rtp.ng.as_str()),
        ],
    );
    server.add_user("alice", "pw-alice-fork");
    server.add_user("bob", "pw-bob-fork");
    // bob is on a desk phone (UDP) and in a browser (WebSocket) at once.
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("bob", "pw-bob-fork", "localhost", "fork-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let mut web = WsPhone::register(server.port2, "bob", "pw-bob-fork");
    assert_eq!(server.bindings_of("bob").len(), 2);

    let alice = Ua::new(server.sip_addr());
    call_bob(&alice, "pw-alice-fork", "fork-media");

    // The desk phone is offered plain RTP, the browser ICE + DTLS-SRTP, both at rtpengine.
    let to_desk = loop {
        let m = desk.recv().expect("INVITE at the desk phone");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    let to_web = loop {
        let m = web.recv();
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    assert!(
        to_desk.contains(" RTP/AVP ") && !to_desk.contains("a=fingerprint"),
        "{to_desk}"
    );
    assert!(!to_desk.contains("m=audio 4000 "), "{to_desk}");
    assert!(
        to_web.contains("UDP/TLS/RTP/SAVPF")
            && to_web.contains("a=fingerprint")
            && to_web.contains("a=ice-ufrag"),
        "{to_web}"
    );

    // The desk phone answers; alice gets rtpengine's answer, the browser a CANCEL.
    answer_with_sdp(&desk, &to_desk, 200, 4010);
    let answered = loop {
        let m = alice.recv().expect("200 at alice");
        if m.starts_with("SIP/2.0 200") {
            break m;
        }
    };
    assert!(
        answered.contains(" RTP/AVP ") && !answered.contains("m=audio 4010 "),
        "{answered}"
    );
    let cancel = loop {
        let m = web.recv();
        if m.starts_with("CANCEL ") {
            break m;
        }
    };
    assert!(cancel.contains("Call-ID: fork-media"), "{cancel}");
    assert_eq!(server.metric("careflow_sip_media_sessions"), 1);
}

#[test]
fn early_media_is_anchored_and_a_cancelled_call_frees_its_media() {
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[("RTPENGINE", rtp.ng.as_str()), ("MEDIA_POLICY", "always")],
    );
    server.add_user("alice", "pw-alice-early");
    server.add_user("bob", "pw-bob-early");
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("bob", "pw-bob-early", "localhost", "early-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let alice = Ua::new(server.sip_addr());
    let sent = call_bob(&alice, "pw-alice-early", "early-media");
    let invite = expect(&desk, "INVITE ");
    assert!(!invite.contains("m=audio 4000 "), "{invite}");
    // 183 with SDP: the caller hears ringback from rtpengine's port, not the phone's.
    answer_with_sdp(&desk, &invite, 183, 4020);
    let early = expect(&alice, "SIP/2.0 183");
    assert!(
        early.contains("m=audio ") && !early.contains("m=audio 4020 "),
        "{early}"
    );
    assert_eq!(server.metric("careflow_sip_media_sessions"), 1);
    // alice gives up.
    let cancel = sent
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 2 INVITE", "CSeq: 2 CANCEL")
        .lines()
        .filter(|l| {
            !l.starts_with("Proxy-Authorization")
                && !l.starts_with("Contact")
                && !l.starts_with("Content-Type")
                && !l.starts_with("Content-Length")
        })
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\r\n")
        + "\r\nContent-Length: 0\r\n\r\n";
    alice.send(&cancel);
    let c = expect(&desk, "CANCEL ");
    let cancel_msg = careflow_proto::Message::parse(
        bytes::Bytes::from(c),
        &careflow_proto::ParseLimits::default(),
    )
    .unwrap();
    desk.sock
        .send_to(
            &careflow_proto::ResponseBuilder::new(&cancel_msg, 200).build(),
            desk.server,
        )
        .unwrap();
    let inv_msg = careflow_proto::Message::parse(
        bytes::Bytes::from(invite),
        &careflow_proto::ParseLimits::default(),
    )
    .unwrap();
    desk.sock
        .send_to(
            &careflow_proto::ResponseBuilder::new(&inv_msg, 487)
                .to_tag(format!("dev{}", desk.port()))
                .build(),
            desk.server,
        )
        .unwrap();
    expect(&alice, "SIP/2.0 487");
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
    rtpengine_becomes_empty(&rtp, &server);
}

/// rtpengine was told the call ended: it holds no call (within five seconds).
fn rtpengine_becomes_empty(rtp: &Rtpengine, server: &Server) {
    let mut calls = usize::MAX;
    for _ in 0..50 {
        let list = ng(&rtp.ng, &Value::dict([("command", Value::str("list"))])).expect("list");
        calls = match list.get("calls") {
            Some(Value::List(c)) => c.len(),
            _ => 0,
        };
        if calls == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(calls, 0, "{}", server.log());
}

#[test]
fn a_call_nobody_answers_frees_its_media_when_timer_c_fires() {
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("RTPENGINE", rtp.ng.as_str()),
            ("MEDIA_POLICY", "always"),
            ("TIMER_C", "1"),
        ],
    );
    server.add_user("alice", "pw-alice-timer");
    server.add_user("bob", "pw-bob-timer");
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("bob", "pw-bob-timer", "localhost", "timer-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let alice = Ua::new(server.sip_addr());
    call_bob(&alice, "pw-alice-timer", "timer-media");
    let invite = expect(&desk, "INVITE ");
    answer_with_sdp(&desk, &invite, 183, 4030);
    expect(&alice, "SIP/2.0 183");
    assert_eq!(server.metric("careflow_sip_media_sessions"), 1);
    // Nobody answers and the phone ignores the CANCEL: Timer C, then the caller hears 408.
    expect(&desk, "CANCEL ");
    expect(&alice, "SIP/2.0 408");
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
    rtpengine_becomes_empty(&rtp, &server);
}

#[test]
fn a_ringing_fork_with_an_offer_per_branch_gains_a_late_branch_with_its_own_offer() {
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", "udp:127.0.0.1:{port},ws:127.0.0.1:{port2}"),
            ("RTPENGINE", rtp.ng.as_str()),
        ],
    );
    server.add_user("alice", "pw-alice-late");
    server.add_user("bob", "pw-bob-late");
    // bob's desk phone and browser ring: each branch has its own rtpengine offer.
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("bob", "pw-bob-late", "localhost", "late-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let mut web = WsPhone::register(server.port2, "bob", "pw-bob-late");
    let alice = Ua::new(server.sip_addr());
    call_bob(&alice, "pw-alice-late", "late-media");
    let to_desk = loop {
        let m = desk.recv().expect("INVITE at the desk phone");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    answer(&desk, &to_desk, 180);
    let _ = web.recv();

    // While it rings, bob's second desk phone registers: it gets a branch with an offer of its
    // own from rtpengine (plain RTP, not the caller's SDP), answers, and the call connects.
    let desk2 = Ua::new(server.sip_addr());
    let r = desk2.register("bob", "pw-bob-late", "localhost", "late-desk2", "");
    assert_eq!(status(&r), 200, "{r}");
    let late = loop {
        let m = desk2
            .recv()
            .expect("a late INVITE at the second desk phone");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    assert!(late.contains("Call-ID: late-media"), "{late}");
    assert!(
        late.contains(" RTP/AVP ")
            && !late.contains("a=fingerprint")
            && !late.contains("m=audio 4000 "),
        "the late branch has rtpengine's plain offer: {late}"
    );
    assert_ne!(header(&late, "Via"), header(&to_desk, "Via"));
    answer_with_sdp(&desk2, &late, 200, 4020);
    let answered = loop {
        let m = alice.recv().expect("200 at alice");
        if m.starts_with("SIP/2.0 200") {
            break m;
        }
    };
    assert!(
        answered.contains(" RTP/AVP ") && !answered.contains("m=audio 4020 "),
        "alice gets rtpengine's answer: {answered}"
    );
    assert!(server.log().contains("late fork"), "{}", server.log());
}

#[test]
fn a_ringing_call_to_a_desk_phone_gains_a_browser_with_its_own_webrtc_offer() {
    let rtp = start_rtpengine();
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", "udp:127.0.0.1:{port},ws:127.0.0.1:{port2}"),
            ("RTPENGINE", rtp.ng.as_str()),
            ("MEDIA_POLICY", "always"),
        ],
    );
    server.add_user("alice", "pw-alice-lw");
    server.add_user("bob", "pw-bob-lw");
    // Only bob's desk phone rings: one plain offer in the INVITE.
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("bob", "pw-bob-lw", "localhost", "lw-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let alice = Ua::new(server.sip_addr());
    call_bob(&alice, "pw-alice-lw", "late-web");
    let to_desk = loop {
        let m = desk.recv().expect("INVITE at the desk phone");
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    answer(&desk, &to_desk, 180);
    // bob opens CareFlow Web while it rings: the browser's branch gets a WebRTC offer of its
    // own (ICE, DTLS-SRTP) from rtpengine.
    let mut web = WsPhone::register(server.port2, "bob", "pw-bob-lw");
    let to_web = loop {
        let m = web.recv();
        if m.starts_with("INVITE ") {
            break m;
        }
    };
    assert!(to_web.contains("Call-ID: late-web"), "{to_web}");
    assert!(
        to_web.contains("UDP/TLS/RTP/SAVPF")
            && to_web.contains("a=fingerprint")
            && to_web.contains("a=ice-ufrag"),
        "{to_web}"
    );
    // The desk phone answers after all: the call connects with rtpengine's answer.
    answer_with_sdp(&desk, &to_desk, 200, 4030);
    let answered = loop {
        let m = alice.recv().expect("200 at alice");
        if m.starts_with("SIP/2.0 200") {
            break m;
        }
    };
    assert!(
        answered.contains(" RTP/AVP ") && !answered.contains("m=audio 4030 "),
        "{answered}"
    );
}
