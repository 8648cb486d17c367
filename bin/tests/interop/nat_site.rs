//! A hospital behind one NAT address, with the default protection: hundreds of phones (each
//! on its own UDP port or its own connection) and browser tabs register at once, one device
//! guessing passwords is stopped without stopping its neighbours, and web SIP stacks that reuse
//! their credentials are never banned. The server's allow-list is moved away so loopback
//! addresses stand for the site.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use careflow_proto::digest::Algorithm;

use crate::peers::scenario;
use crate::register::sipp_users;
use crate::security::tcp_from;
use crate::support::*;
use crate::websocket::{client_frame, server_frame};

/// An allow-list that matches none of the test's addresses.
const NOBODY: &str = "10.255.255.255";

/// sipp registering `count` users of `inf` from `ip` at `rate`/s over `transport`
/// (`un`: one UDP socket per user, as phones behind NAT each get their own port; `tn`: one
/// TCP connection each), with `extra` arguments.
fn sipp_site(
    server: &Server,
    inf: &std::path::Path,
    ip: &str,
    transport: &str,
    count: usize,
    extra: &[&str],
) -> Child {
    let xml = if extra.is_empty() {
        "register-auth.xml"
    } else {
        "register-auth-hold.xml"
    };
    Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &scenario(xml), "-inf", inf.to_str().unwrap()])
        .args([
            "-key",
            "domain",
            &server.domain,
            "-auth_uri",
            &server.domain,
        ])
        .args(["-i", ip, "-p", &free_port().to_string(), "-t", transport])
        .args([
            "-m",
            &count.to_string(),
            "-r",
            "100",
            "-l",
            &count.to_string(),
        ])
        .args([
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
            "-max_socket",
            "1000",
        ])
        .args(["-default_behaviors", "-bye"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sipp")
}

fn finished(child: Child, what: &str, server: &Server) {
    let out = child.wait_with_output().expect("wait for sipp");
    assert!(
        out.status.success(),
        "{what}: sipp failed ({}): {}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

#[test]
fn a_site_of_300_phones_behind_one_address_registers_while_one_device_guesses_passwords() {
    require("sipp", "sip-tester");
    let server = Server::start_with("site.test", &[("SECURITY_ALLOWLIST", NOBODY)]);
    let tmp = tempfile::tempdir().unwrap();
    let (import, inf) = sipp_users(tmp.path(), 300);
    server.cli_ok(&["user", "import", import.to_str().unwrap()]);
    const SITE: &str = "127.0.0.20";

    // After a power cut: 300 phones, each its own NAT port, register at 100/s.
    finished(
        sipp_site(&server, &inf, SITE, "un", 300, &[]),
        "storm",
        &server,
    );
    assert_eq!(server.metric("careflow_sip_registrations_total"), 300);

    // They re-register while one device of the site guesses passwords for 30 usernames.
    let storm = sipp_site(&server, &inf, SITE, "un", 300, &[]);
    let guesser = Ua::from_ip(server.sip_addr(), SITE);
    let mut refused = 0;
    let mut unanswered = 0;
    for i in 0..30 {
        let user = format!("user{i:04}");
        let cid = format!("guess-{i}");
        guesser.send(&guesser.register_msg(&user, "site.test", &cid, 1, ""));
        let Some(challenge) = guesser.recv() else {
            unanswered += 1;
            // Banned: do not wait three seconds for each remaining guess.
            guesser
                .sock
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            continue;
        };
        assert_eq!(status(&challenge), 401, "{challenge}");
        let auth = authorization(
            &challenge,
            Algorithm::Md5,
            &user,
            "site.test",
            "guessed-password",
            "REGISTER",
            "sip:site.test",
            1,
        );
        guesser.send(&guesser.register_msg(
            &user,
            "site.test",
            &cid,
            2,
            &format!("Authorization: {auth}\r\n"),
        ));
        let answer = guesser.recv().unwrap_or_default();
        assert_ne!(status(&answer), 200, "a guess succeeded: {answer}");
        refused += 1;
    }
    finished(storm, "re-registration beside the guesser", &server);
    assert_eq!(
        (refused, unanswered),
        (5, 25),
        "refused at every guess, then banned"
    );
    let log = server.log();
    assert!(
        log.contains(&format!(
            "SECURITY banned_flow src_ip={SITE} src_port={} reason=brute_force",
            guesser.port()
        )),
        "{log}"
    );
    assert!(
        !log.contains(&format!("SECURITY banned src_ip={SITE}")),
        "the whole site was banned:\n{log}"
    );
    // And once more after the ban: the site is fine.
    finished(
        sipp_site(&server, &inf, SITE, "un", 300, &[]),
        "after",
        &server,
    );
    assert_eq!(server.metric("careflow_sip_registrations_total"), 900);
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 5);
    assert_eq!(server.metric("careflow_sip_site_shed_total"), 0);
}

/// One REGISTER over a WebSocket connection (as CareFlow Web sends it); returns the answer.
fn ws_request(s: &mut std::net::TcpStream, msg: &str) -> String {
    use std::io::Write;
    s.write_all(&client_frame(1, msg.as_bytes())).unwrap();
    loop {
        let (op, payload) = server_frame(s).expect("a frame from the server");
        if op == 1 || op == 2 {
            return String::from_utf8_lossy(&payload).into_owned();
        }
    }
}

fn ws_register_msg(user: &str, tab: usize, cseq: u32, extra: &str) -> String {
    format!(
        "REGISTER sip:site.test SIP/2.0\r\nVia: SIP/2.0/WS tab{tab}.invalid;branch=z9hG4bKtab{tab}x{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@site.test>;tag=tab{tab}\r\nTo: <sip:{user}@site.test>\r\nCall-ID: tab-{tab}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@tab{tab}.invalid;transport=ws>\r\nExpires: 600\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn hundreds_of_connections_and_websocket_tabs_from_one_address_all_register() {
    use std::io::Write;
    require("sipp", "sip-tester");
    let server = Server::start_with(
        "site.test",
        &[
            ("SECURITY_ALLOWLIST", NOBODY),
            (
                "SIP_LISTEN",
                "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},ws:127.0.0.1:{port2}",
            ),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();
    let (import, inf) = sipp_users(tmp.path(), 400);
    server.cli_ok(&["user", "import", import.to_str().unwrap()]);
    const SITE: &str = "127.0.0.21";

    // 200 desk phones, each on its own TCP connection from the site's address, kept open.
    let phones = sipp_site(&server, &inf, SITE, "tn", 200, &["-d", "15000"]);
    assert_eq!(
        server.metric_becomes("careflow_sip_active_bindings", 200),
        200,
        "{}",
        server.log()
    );
    // Then 200 browser tabs from the same address, each its own WebSocket.
    let ws = std::net::SocketAddr::from(([127, 0, 0, 1], server.port2));
    let mut tabs = Vec::new();
    let started = Instant::now();
    for tab in 0..200usize {
        let user = format!("user{:04}", 200 + tab);
        let mut s = tcp_from(SITE, ws);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: sip\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                std::io::Read::read(&mut s, &mut b).unwrap_or(0),
                1,
                "tab {tab}: connection closed during the upgrade:\n{}",
                server.log()
            );
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "tab {tab}");
        let r1 = ws_request(&mut s, &ws_register_msg(&user, tab, 1, ""));
        assert_eq!(status(&r1), 401, "tab {tab}: {r1}");
        let password = format!("pw-{}-x", 200 + tab);
        let auth = authorization(
            &r1,
            Algorithm::Md5,
            &user,
            "site.test",
            &password,
            "REGISTER",
            "sip:site.test",
            1,
        );
        let r2 = ws_request(
            &mut s,
            &ws_register_msg(&user, tab, 2, &format!("Authorization: {auth}\r\n")),
        );
        assert_eq!(status(&r2), 200, "tab {tab}: {r2}");
        tabs.push(s);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the phones left"
    );
    // All 400 at once: 200 TCP phones and 200 tabs, one address.
    assert_eq!(server.metric("careflow_sip_active_bindings"), 400);
    assert!(server.metric("careflow_sip_open_connections") >= 400);
    assert_eq!(server.metric("careflow_sip_refused_connections_total"), 0);
    finished(phones, "phones on their own connections", &server);
    drop(tabs);
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
}

#[test]
fn jssip_refreshing_and_unregistering_and_a_client_reusing_its_nonce_are_never_banned() {
    let js = crate::websocket::js_dir();
    let server = Server::start_with(
        "localhost",
        &[
            ("SECURITY_ALLOWLIST", NOBODY),
            (
                "SIP_LISTEN",
                "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},ws:127.0.0.1:{port2}",
            ),
        ],
    );
    server.add_user("webby", "pw-webby-tab");
    // JsSIP registers, refreshes eight times, unregisters and registers again, three rounds,
    // on one WebSocket connection.
    let url = format!("ws://127.0.0.1:{}/", server.port2);
    let run = || {
        let out = Command::new("node")
            .current_dir(&js)
            .args([
                "jssip-refresh.js",
                &url,
                "sip:webby@localhost",
                "pw-webby-tab",
            ])
            .args(["8", "3"])
            .output()
            .expect("run node");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("done"),
            "{text}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
        text
    };
    let text = run();
    assert_eq!(text.matches("registered ").count(), 3 * 9, "{text}");
    assert_eq!(text.matches("unregistered").count(), 3, "{text}");
    // A raw client resending its REGISTER with the same nonce and nc=00000001, ten times.
    let ua = Ua::from_ip(server.sip_addr(), "127.0.0.1");
    let r1 = ua.request(&ua.register_msg("webby", "localhost", "reuse", 1, ""));
    let auth = authorization(
        &r1,
        Algorithm::Md5,
        "webby",
        "localhost",
        "pw-webby-tab",
        "REGISTER",
        "sip:localhost",
        1,
    );
    let with_auth = |cseq: u32| {
        ua.register_msg(
            "webby",
            "localhost",
            "reuse",
            cseq,
            &format!("Authorization: {auth}\r\n"),
        )
    };
    assert_eq!(status(&ua.request(&with_auth(2))), 200);
    for cseq in 3..13 {
        let r = ua.request(&with_auth(cseq));
        assert_eq!(status(&r), 401, "{r}");
        assert!(
            header(&r, "WWW-Authenticate").is_some_and(|h| h.contains("stale=true")),
            "{r}"
        );
    }
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
    assert!(server.metric("careflow_sip_auth_rechallenges_total") >= 10);
    assert_eq!(server.metric("careflow_sip_banned_sources"), 0);
    let log = server.log();
    assert!(!log.contains("SECURITY auth_failed"), "{log}");
    assert!(!log.contains("SECURITY banned"), "{log}");
    // The next tab from the same address connects and registers.
    let text = run();
    assert!(text.contains("registered 1"), "{text}");
}
