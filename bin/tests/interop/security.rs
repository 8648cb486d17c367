//! Floods, brute force and scanners with the real tools (sipp, sipvicious's svcrack and svwar),
//! and fail2ban's filter checked with fail2ban-regex against the lines the server wrote.
//! Attackers send from loopback addresses other than the allow-listed 127.0.0.1, or the
//! allow-list is moved away for the test.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// An allow-list that matches none of the test's addresses.
const NOBODY: &str = "10.255.255.255";

#[test]
fn a_sipp_flood_bans_its_flow_while_other_clients_even_on_its_address_keep_registering() {
    require("sipp", "sip-tester");
    let server = Server::start_with("flood.test", &[("SECURITY_BAN_TIME", "60")]);
    server.add_user("fay", "pw-fay-flood");
    let legit = Ua::from_ip(server.sip_addr(), "127.0.0.3");
    assert_eq!(
        status(&legit.register("fay", "pw-fay-flood", "flood.test", "fl-1", "")),
        200
    );
    // 1,500 OPTIONS at 500/s from 127.0.0.2, bounded to a few seconds.
    let flood_port = free_port();
    let flood = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args([
            "-sn",
            "uac",
            "-i",
            "127.0.0.2",
            "-p",
            &flood_port.to_string(),
        ])
        .args(["-m", "1500", "-r", "500", "-timeout", "6s", "-nostdin"])
        .args(["-recv_timeout", "200", "-default_behaviors", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run sipp");
    let _ = flood;
    let ban_line =
        format!("SECURITY banned_flow src_ip=127.0.0.2 src_port={flood_port} reason=flood");
    assert!(server.log().contains(&ban_line), "{}", server.log());
    assert!(
        !server.log().contains("SECURITY banned src_ip=127.0.0.2"),
        "the whole address was banned:\n{}",
        server.log()
    );
    assert!(server.metric("careflow_sip_flood_bans_total") >= 1);
    assert!(server.metric("careflow_sip_dropped_banned_total") >= 1000);
    assert_eq!(server.metric("careflow_sip_banned_sources"), 1);
    // The other source is untouched, and so is another device behind the flooder's address.
    assert_eq!(
        status(&legit.register("fay", "pw-fay-flood", "flood.test", "fl-2", "")),
        200
    );
    let neighbour = Ua::from_ip(server.sip_addr(), "127.0.0.2");
    assert_eq!(
        status(&neighbour.register("fay", "pw-fay-flood", "flood.test", "fl-5", "")),
        200
    );
    // The banned flow gets nothing, not even to a well-formed request.
    let sock = std::net::UdpSocket::bind(("127.0.0.2", flood_port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let banned = Ua {
        sock,
        server: server.sip_addr(),
    };
    banned.send(&banned.register_msg("fay", "flood.test", "fl-3", 1, ""));
    let got = banned.recv();
    assert!(got.is_none(), "the banned flow was answered: {got:?}");
    // Lifted by hand (the address: every flow of it), it is answered again.
    let out = server.cli_ok(&["bans"]);
    assert!(
        out.contains(&format!("127.0.0.2:{flood_port} ")) && out.contains("flood"),
        "{out}"
    );
    server.cli_ok(&["unban", "127.0.0.2"]);
    let r = banned.request(&banned.register_msg("fay", "flood.test", "fl-4", 1, ""));
    assert_eq!(status(&r), 401, "{r}");
}

#[test]
fn svcrack_is_banned_before_it_finds_the_password_and_others_keep_working() {
    require("svcrack", "sipvicious");
    // svcrack uses the target address as the domain, and calls itself friendly-scanner: the
    // scanner filter is off here so the brute-force defence is what stops it.
    let server = Server::start_with(
        "127.0.0.1",
        &[("SCANNER_USER_AGENTS", ""), ("SECURITY_ALLOWLIST", NOBODY)],
    );
    server.add_user("alice", "s3cr3t-alice");
    let dir = tempfile::tempdir().unwrap();
    let dict = dir.path().join("dict.txt");
    std::fs::write(
        &dict,
        "123456\npassword\nalice\nqwerty\nletmein\n1234\nsecret\nsip\ns3cr3t-alice\n",
    )
    .unwrap();
    let out = Command::new("svcrack")
        .args(["-u", "alice", "-d"])
        .arg(&dict)
        .args([
            "-p",
            &server.port.to_string(),
            "-P",
            &free_port().to_string(),
        ])
        .args(["-x", "127.0.0.1", "-t", "0.5", "127.0.0.1"])
        .output()
        .expect("run svcrack");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("s3cr3t-alice"),
        "svcrack found the password:\n{text}"
    );
    let log = server.log();
    assert!(
        log.contains("SECURITY banned_flow src_ip=127.0.0.1 src_port=")
            && log.contains("reason=brute_force"),
        "{log}"
    );
    assert_eq!(
        log.matches("SECURITY auth_failed src_ip=127.0.0.1").count(),
        5,
        "banned at the threshold:\n{log}"
    );
    assert_eq!(server.metric("careflow_sip_auth_bans_total"), 1);
    // alice's own phone, elsewhere, still registers; so does a phone behind svcrack's own
    // address (a site's NAT): only svcrack's flow is banned.
    let phone = Ua::from_ip(server.sip_addr(), "127.0.0.7");
    assert_eq!(
        status(&phone.register("alice", "s3cr3t-alice", "127.0.0.1", "ph-1", "")),
        200
    );
    server.add_user("bert", "s3cr3t-bert");
    let neighbour = Ua::from_ip(server.sip_addr(), "127.0.0.1");
    assert_eq!(
        status(&neighbour.register("bert", "s3cr3t-bert", "127.0.0.1", "ph-2", "")),
        200
    );
}

#[test]
fn svwar_cannot_tell_existing_users_from_missing_ones() {
    require("svwar", "sipvicious");
    let server = Server::start_with(
        "127.0.0.1",
        &[("SCANNER_USER_AGENTS", ""), ("SECURITY_ALLOWLIST", NOBODY)],
    );
    server.add_user("alice", "s3cr3t-alice");
    server.add_user("bob", "s3cr3t-bob");
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "alice\nzed\nbob\nyves\n").unwrap();
    for method in ["REGISTER", "INVITE", "OPTIONS"] {
        for force in [false, true] {
            let mut cmd = Command::new("svwar");
            cmd.args(["-m", method, "-d"])
                .arg(&users)
                .args([
                    "-p",
                    &server.port.to_string(),
                    "-P",
                    &free_port().to_string(),
                ])
                .args(["-x", "127.0.0.1", "-t", "0.5"]);
            if force {
                cmd.arg("--force");
            }
            let out = cmd.arg("127.0.0.1").output().expect("run svwar");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                text.contains("found nothing"),
                "svwar ({method}, force {force}) enumerated something:\n{text}"
            );
        }
    }
}

#[test]
fn scanners_get_no_answer_at_all() {
    require("svwar", "sipvicious");
    let server = Server::start_with("127.0.0.1", &[("SECURITY_ALLOWLIST", NOBODY)]);
    server.add_user("alice", "s3cr3t-alice");
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "alice\nzed\n").unwrap();
    let out = Command::new("svwar")
        .arg("-d")
        .arg(&users)
        .args([
            "-p",
            &server.port.to_string(),
            "-P",
            &free_port().to_string(),
        ])
        .args(["-x", "127.0.0.1", "-t", "0.5", "127.0.0.1"])
        .output()
        .expect("run svwar");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("found nothing"), "{text}");
    assert!(server.metric("careflow_sip_scanner_drops_total") >= 1);
}

#[test]
fn fail2ban_matches_site_bans_only_never_a_flow_ban_a_failure_or_the_normal_challenge() {
    require("fail2ban-regex", "fail2ban");
    let server = Server::start_with(
        "f2b.test",
        &[
            ("SECURITY_ALLOWLIST", NOBODY),
            ("SECURITY_SITE_AUTH_FAILURES", "6"),
        ],
    );
    server.add_user("gina", "pw-gina-f2b");
    // Normal registrations: each starts with a 401 challenge.
    for i in 0..3 {
        let ua = Ua::from_ip(server.sip_addr(), "127.0.0.8");
        let r = ua.register("gina", "pw-gina-f2b", "f2b.test", &format!("ok-{i}"), "");
        assert_eq!(status(&r), 200);
    }
    // One device guessing five times on one flow: banned alone (a `banned_flow` line that
    // fail2ban must not act on: its address may be a whole site).
    let guesser = Ua::from_ip(server.sip_addr(), "127.0.0.10");
    for i in 0..5 {
        let r1 =
            guesser.request(&guesser.register_msg("gina", "f2b.test", &format!("g-{i}"), 1, ""));
        let auth = authorization(
            &r1,
            careflow_proto::digest::Algorithm::Md5,
            "gina",
            "f2b.test",
            &format!("guess{i}"),
            "REGISTER",
            "sip:f2b.test",
            1,
        );
        guesser.send(&guesser.register_msg(
            "gina",
            "f2b.test",
            &format!("g-{i}"),
            2,
            &format!("Authorization: {auth}\r\n"),
        ));
        let _ = guesser.recv();
    }
    // Wrong passwords and unknown users from another address, each from a new port: six
    // failing flows of one site reach SECURITY_SITE_AUTH_FAILURES, the site is banned.
    for (i, (user, pw)) in [
        ("gina", "x1"),
        ("gina", "x2"),
        ("gina", "x3"),
        ("nobody", "y"),
        ("gina", "x4"),
        ("someone", "z"),
    ]
    .iter()
    .enumerate()
    {
        let ua = Ua::from_ip(server.sip_addr(), "127.0.0.9");
        let r1 = ua.request(&ua.register_msg(user, "f2b.test", &format!("bad-{i}"), 1, ""));
        let auth = authorization(
            &r1,
            careflow_proto::digest::Algorithm::Md5,
            user,
            "f2b.test",
            pw,
            "REGISTER",
            "sip:f2b.test",
            1,
        );
        let r = ua.request(&ua.register_msg(
            user,
            "f2b.test",
            &format!("bad-{i}"),
            2,
            &format!("Authorization: {auth}\r\n"),
        ));
        assert_eq!(status(&r), 401);
    }
    let filter = interop_dir().join("../../../contrib/fail2ban/filter.d/careflow-sip.conf");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("SECURITY banned src_ip=127.0.0.9") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("fail2ban-regex")
        .arg(server.log_path())
        .arg(&filter)
        .args(["--print-all-matched", "--print-no-missed"])
        .output()
        .expect("run fail2ban-regex");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Lines: ") && text.contains(" matched"),
        "{text}"
    );
    let matched: usize = text
        .lines()
        .find(|l| l.starts_with("Lines:"))
        .and_then(|l| l.split(',').nth(2))
        .and_then(|m| m.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{text}"));
    assert_eq!(matched, 1, "{text}");
    assert!(
        !text.contains("127.0.0.8"),
        "a normal challenge matched:\n{text}"
    );
    assert!(
        !text.contains("127.0.0.10"),
        "a flow ban or a failure matched:\n{text}"
    );
    assert!(text.contains("127.0.0.9"));
    assert!(
        server
            .log()
            .contains("SECURITY banned_flow src_ip=127.0.0.10")
    );
}

/// A TCP connection from a chosen loopback address.
pub(crate) fn tcp_from(ip: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    tcp_socket(Some(ip), None, to)
}

/// A blocking TCP connection to `to`, bound to `ip` when given, with a receive buffer of
/// `rcvbuf` bytes when given (a small one shuts the window soon when the peer stops reading).
fn tcp_socket(
    ip: Option<&str>,
    rcvbuf: Option<u32>,
    to: std::net::SocketAddr,
) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(ip) = ip {
            s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        }
        if let Some(n) = rcvbuf {
            s.set_recv_buffer_size(n).unwrap();
        }
        let stream = s.connect(to).await.unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}

/// Whether the server closed the connection within `within` (EOF or reset, not a timeout).
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::{ErrorKind, Read};
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn slow_senders_are_cut_off_and_one_address_cannot_hold_many_connections() {
    use std::io::Write;
    let server = Server::start_with(
        "slow.test",
        &[
            ("SECURITY_ALLOWLIST", NOBODY),
            ("PARTIAL_MESSAGE_TIMEOUT", "2"),
            ("MAX_CONNECTIONS_PER_IP", "5"),
        ],
    );
    server.add_user("sam", "pw-sam-slow");
    let started = Instant::now();
    let mut slow: Vec<std::net::TcpStream> = (0..5)
        .map(|_| {
            let mut s = tcp_from("127.0.0.5", server.sip_addr());
            s.write_all(b"REGISTER sip:slow.test SIP/2.0\r\nVia: SIP/2.0/TCP ")
                .unwrap();
            s
        })
        .collect();
    // The sixth connection from the same address is refused at once.
    let mut sixth = tcp_from("127.0.0.5", server.sip_addr());
    assert!(closed_within(&mut sixth, Duration::from_secs(2)));
    // A normal client elsewhere registers meanwhile.
    let ua = Ua::from_ip(server.sip_addr(), "127.0.0.3");
    assert_eq!(
        status(&ua.register("sam", "pw-sam-slow", "slow.test", "s-1", "")),
        200
    );
    // Trickling bytes does not keep a half message alive past the timeout.
    for s in &mut slow {
        let _ = s.write_all(b"1");
    }
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "slow sender not cut off"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        server
            .log()
            .contains("SECURITY slow_sender src_ip=127.0.0.5")
    );
    assert!(
        server
            .log()
            .contains("SECURITY connection_refused src_ip=127.0.0.5 reason=per_ip_limit")
    );
    assert!(server.metric("careflow_sip_refused_connections_total") >= 1);
}

#[test]
fn the_nftables_rules_load() {
    require("nft", "nftables");
    require("ip", "iproute2");
    let rules = interop_dir().join("../../../contrib/firewall/careflow-sip.nft");
    let ns = format!("cfnft{}", std::process::id() % 100_000);
    let run = |args: &[&str]| Command::new("ip").args(args).output().unwrap();
    let _ = run(&["netns", "del", &ns]);
    assert!(run(&["netns", "add", &ns]).status.success());
    // Loaded for real, in a namespace of the test's own so the host is untouched.
    let load = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-f"])
        .arg(&rules)
        .output()
        .unwrap();
    let listed = run(&[
        "netns",
        "exec",
        &ns,
        "nft",
        "list",
        "table",
        "inet",
        "careflow_sip",
    ]);
    let _ = run(&["netns", "del", &ns]);
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("sip_flooders") && text.contains("10000-60000"),
        "{text}"
    );
}

#[test]
fn a_phone_that_stops_reading_is_disconnected_and_holds_nothing_of_ours() {
    use std::io::{Read, Write};
    let server = Server::start_with("stall.test", &[("ALLOW_INBOUND", "true")]);
    server.add_user("frozen", "pw-frozen-phone");
    // A desk phone registers over TCP, then never reads again.
    let mut phone = tcp_socket(None, Some(4096), server.sip_addr());
    phone
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let local = phone.local_addr().unwrap();
    let register = |cseq: u32, extra: &str| {
        format!(
            "REGISTER sip:stall.test SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKfz{cseq}\r\nMax-Forwards: 70\r\nFrom: <sip:frozen@stall.test>;tag=fz\r\nTo: <sip:frozen@stall.test>\r\nCall-ID: frozen-1\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:frozen@{local};transport=tcp>\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    };
    let read_one = |s: &mut std::net::TcpStream| {
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    phone.write_all(register(1, "").as_bytes()).unwrap();
    let r1 = read_one(&mut phone);
    let auth = authorization(
        &r1,
        careflow_proto::digest::Algorithm::Md5,
        "frozen",
        "stall.test",
        "pw-frozen-phone",
        "REGISTER",
        "sip:stall.test",
        1,
    );
    phone
        .write_all(register(2, &format!("Authorization: {auth}\r\n")).as_bytes())
        .unwrap();
    assert_eq!(status(&read_one(&mut phone)), 200);
    assert_eq!(server.bindings_of("frozen").len(), 1);
    // A peer sends it large MESSAGEs, far more than its window and our queue hold.
    let peer = Ua::from_ip(server.sip_addr(), "127.0.0.1");
    let body = "x".repeat(30_000);
    let started = Instant::now();
    for i in 0..600 {
        let msg = format!(
            "MESSAGE sip:frozen@stall.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKst{i};rport\r\nMax-Forwards: 70\r\nFrom: <sip:pager@other.test>;tag=p{i}\r\nTo: <sip:frozen@stall.test>\r\nCall-ID: stall-{i}\r\nCSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            peer.port(),
            body.len()
        );
        peer.send(&msg);
        if i % 50 == 49 && server.log().contains("the peer does not read") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server
        .log()
        .contains("closing connection: the peer does not read")
    {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(server.metric("careflow_sip_stalled_connections_closed_total") >= 1);
    // Its connection is gone, and so is the binding that depended on it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.bindings_of("frozen").is_empty() {
        assert!(Instant::now() < deadline, "the binding stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The server answers everyone else as before.
    let other = Ua::from_ip(server.sip_addr(), "127.0.0.1");
    let ping = format!(
        "OPTIONS sip:stall.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKping;rport\r\nMax-Forwards: 70\r\nFrom: <sip:x@stall.test>;tag=1\r\nTo: <sip:stall.test>\r\nCall-ID: ping-after-stall\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        other.port()
    );
    assert_eq!(status(&other.request(&ping)), 200);
}
