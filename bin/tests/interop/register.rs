//! Registration with real clients and the registrar rules seen from the wire.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use careflow_proto::digest::Algorithm;

use crate::support::*;

pub(crate) fn sipp_users(
    dir: &std::path::Path,
    n: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let import = dir.join("users.csv");
    let inf = dir.join("sipp-users.csv");
    let mut a = String::from("username,password\n");
    let mut b = String::from("SEQUENTIAL\n");
    for i in 0..n {
        a.push_str(&format!("user{i:04},pw-{i}-x\n"));
        b.push_str(&format!(
            "user{i:04};[authentication username=user{i:04} password=pw-{i}-x]\n"
        ));
    }
    std::fs::write(&import, a).unwrap();
    std::fs::write(&inf, b).unwrap();
    (import, inf)
}

fn run_sipp(server: &Server, inf: &std::path::Path, transport: &str, count: usize) {
    run_sipp_at(server, inf, transport, count, 100);
}

fn run_sipp_at(server: &Server, inf: &std::path::Path, transport: &str, count: usize, rate: u32) {
    let local = free_port();
    let out = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args([
            "-sf",
            interop_dir()
                .join("sipp/register-auth.xml")
                .to_str()
                .unwrap(),
        ])
        .args([
            "-inf",
            inf.to_str().unwrap(),
            "-key",
            "domain",
            &server.domain,
            "-auth_uri",
            &server.domain,
        ])
        .args(["-i", "127.0.0.1", "-p", &local.to_string(), "-t", transport])
        .args([
            "-m",
            &count.to_string(),
            "-r",
            &rate.to_string(),
            "-nostdin",
            "-timeout",
            "60s",
            "-timeout_error",
        ])
        .args(["-default_behaviors", "-bye"])
        .stdout(Stdio::null())
        .output()
        .expect("run sipp");
    assert!(
        out.status.success(),
        "sipp over {transport} failed ({}): {}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

#[test]
fn sipp_registers_many_users_over_udp_and_tcp() {
    require("sipp", "sip-tester");
    let server = Server::start("sipp.test");
    let tmp = tempfile::tempdir().unwrap();
    let (import, inf) = sipp_users(tmp.path(), 200);
    let out = server.cli_ok(&["user", "import", import.to_str().unwrap()]);
    assert!(out.contains("imported 200"), "{out}");
    run_sipp(&server, &inf, "u1", 200);
    assert_eq!(server.metric("careflow_sip_active_bindings"), 200);
    run_sipp(&server, &inf, "t1", 200);
    assert_eq!(server.metric("careflow_sip_registrations_total"), 400);
    // sipp registered every TCP contact over one connection and closed it when done: those
    // bindings went with it, the UDP ones stay.
    assert_eq!(
        server.metric_becomes("careflow_sip_active_bindings", 200),
        200
    );
    assert_eq!(
        server.metric_becomes("careflow_sip_flow_bindings_dropped_total", 200),
        200
    );
    let b = server.bindings_of("user0007");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains(" udp "), "{b:?}");
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
}

/// A gateway (here sipp) registers 2,000 users over one TCP connection and closes it: every
/// binding goes with it within seconds (one AoR at a time, each waiting for a journal write,
/// took 20 s).
#[test]
fn a_connection_carrying_thousands_of_registrations_takes_them_all_when_it_closes() {
    require("sipp", "sip-tester");
    let server = Server::start("sipp.test");
    let tmp = tempfile::tempdir().unwrap();
    let (import, inf) = sipp_users(tmp.path(), 2000);
    let out = server.cli_ok(&["user", "import", import.to_str().unwrap()]);
    assert!(out.contains("imported 2000"), "{out}");
    run_sipp_at(&server, &inf, "t1", 2000, 1000);
    assert_eq!(server.metric("careflow_sip_registrations_total"), 2000);
    assert_eq!(
        server.metric_becomes("careflow_sip_flow_bindings_dropped_total", 2000),
        2000,
        "{}",
        server.log()
    );
    assert_eq!(server.metric("careflow_sip_active_bindings"), 0);
}

#[test]
fn sipsak_registers() {
    require("sipsak", "sipsak");
    let server = Server::start("localhost");
    server.add_user("carol", "s3cret-carol");
    let out = Command::new("sipsak")
        .args([
            "-U",
            "-i",
            "-x",
            "300",
            "-C",
            "sip:carol@127.0.0.1:5999",
            "-s",
            "sip:carol@localhost",
        ])
        .args([
            "-u",
            "carol",
            "-a",
            "s3cret-carol",
            "-p",
            &server.sip_addr().to_string(),
        ])
        .output()
        .expect("run sipsak");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sipsak failed:\n{text}\n{}",
        server.log()
    );
    let b = server.bindings_of("carol");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains("sipsak"), "{b:?}");

    let bad = Command::new("sipsak")
        .args([
            "-U",
            "-i",
            "-x",
            "300",
            "-C",
            "sip:carol@127.0.0.1:5998",
            "-s",
            "sip:carol@localhost",
        ])
        .args([
            "-u",
            "carol",
            "-a",
            "wrong",
            "-p",
            &server.sip_addr().to_string(),
        ])
        .output()
        .expect("run sipsak");
    assert!(
        !bad.status.success(),
        "sipsak with a wrong password must fail"
    );
    assert_eq!(server.bindings_of("carol").len(), 1);
}

#[test]
fn baresip_registers_from_its_own_config() {
    require("baresip", "baresip");
    let server = Server::start("localhost");
    server.add_user("dave", "pw-dave-123");
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("accounts"),
        format!(
            "<sip:dave@localhost>;auth_pass=pw-dave-123;outbound=\"sip:127.0.0.1:{};transport=udp\";regint=300\n",
            server.port
        ),
    )
    .unwrap();
    // baresip listens on the port given and, for TLS, on the next one; either may be taken by
    // another test between choosing it and binding it: then it exits, and is started again on
    // other ports.
    let mut bindings = Vec::new();
    let mut child = None;
    for _ in 0..3 {
        let sip_port = free_port();
        std::fs::write(
            home.path().join("config"),
            format!(
                "poll_method epoll\nsip_listen 127.0.0.1:{sip_port}\nmodule_path /usr/lib/baresip/modules\nmodule g711.so\nmodule_app account.so\naudio_player aufile,/dev/null\naudio_source aufile,/dev/null\n"
            ),
        )
        .unwrap();
        let mut c = Command::new("baresip")
            .args(["-f", home.path().to_str().unwrap(), "-t", "30"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start baresip");
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut exited = false;
        while Instant::now() < deadline {
            bindings = server.bindings_of("dave");
            if !bindings.is_empty() {
                break;
            }
            if c.try_wait().ok().flatten().is_some() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        child = Some(c);
        if !exited {
            break;
        }
    }
    let mut child = child.unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        bindings.len(),
        1,
        "baresip did not register:\n{}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(bindings[0].contains("baresip"), "{bindings:?}");
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
}

/// Removes what differs between two challenges by design (nonce, tags, branch, Call-ID).
fn normalize(resp: &str) -> String {
    resp.lines()
        .filter(|l| {
            !l.starts_with("Call-ID")
                && !l.starts_with("Via")
                && !l.starts_with("From")
                && !l.starts_with("To")
        })
        .map(|l| match l.find("nonce=\"") {
            Some(i) => format!("{}{}", &l[..i], &l[i + 7 + 64..]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn wrong_password_and_unknown_user_get_the_same_answer() {
    // Every level logged, so a debug line carrying a secret would be caught too.
    let server = Server::start_with("example.test", &[("RUST_LOG", "trace")]);
    server.add_user("alice", "right-password");
    let ua = Ua::new(server.sip_addr());
    let wrong = ua.register("alice", "wrong-password", "example.test", "c-wrong", "");
    let unknown = ua.register("nobody", "whatever", "example.test", "c-unknown", "");
    assert_eq!(status(&wrong), 401, "{wrong}");
    assert_eq!(status(&unknown), 401, "{unknown}");
    assert_eq!(normalize(&wrong), normalize(&unknown));
    // a disabled user looks the same too
    server.cli_ok(&["user", "disable", "alice"]);
    let disabled = ua.register("alice", "right-password", "example.test", "c-disabled", "");
    assert_eq!(normalize(&disabled), normalize(&unknown));
    server.cli_ok(&["user", "enable", "alice"]);
    let ok = ua.register("alice", "right-password", "example.test", "c-ok", "");
    assert_eq!(status(&ok), 200, "{ok}");
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 3);
    // The log names neither the HA1s the server holds nor the digest responses it checked.
    let log = server.log();
    for alg in [Algorithm::Md5, Algorithm::Sha256] {
        let h = careflow_proto::digest::ha1(alg, "alice", "example.test", "right-password");
        assert!(!log.contains(&h), "an HA1 is in the log");
    }
    assert!(
        !log.contains("response=\""),
        "a digest response is in the log:\n{log}"
    );
    assert!(
        log.contains("SECURITY auth_failed src_ip=127.0.0.1 "),
        "{log}"
    );
}

#[test]
fn sha256_and_md5_both_work_and_replays_are_refused() {
    let server = Server::start_with("example.test", &[("AUTH_ALGORITHMS", "SHA-256,MD5")]);
    server.add_user("bob", "pw-bob");
    let ua = Ua::new(server.sip_addr());
    for (alg, cid) in [(Algorithm::Sha256, "sha"), (Algorithm::Md5, "md5")] {
        let r1 = ua.request(&ua.register_msg("bob", "example.test", cid, 1, ""));
        let auth = authorization(
            &r1,
            alg,
            "bob",
            "example.test",
            "pw-bob",
            "REGISTER",
            "sip:example.test",
            1,
        );
        let msg = ua.register_msg(
            "bob",
            "example.test",
            cid,
            2,
            &format!("Authorization: {auth}\r\n"),
        );
        let ok = ua.request(&msg);
        assert_eq!(status(&ok), 200, "{alg:?}: {ok}");
        // Same credentials in a new transaction (a replay): refused.
        let replay = ua.request(
            &msg.replace(
                &format!("branch=z9hG4bK{cid}2"),
                &format!("branch=z9hG4bK{cid}r"),
            )
            .replace("CSeq: 2", "CSeq: 3"),
        );
        assert_eq!(status(&replay), 401, "{alg:?} replay: {replay}");
        // The digest was right, only the nonce count was reused (as browser SIP stacks that
        // cache their challenge do): a fresh challenge with stale=true, no failure counted.
        assert!(
            header(&replay, "WWW-Authenticate").is_some_and(|h| h.contains("stale=true")),
            "{replay}"
        );
    }
    assert_eq!(server.metric("careflow_sip_auth_failures_total"), 0);
    assert_eq!(server.metric("careflow_sip_auth_rechallenges_total"), 2);
    assert!(!server.log().contains("SECURITY auth_failed"));
}

#[test]
fn registrar_rules_on_the_wire() {
    let server = Server::start("example.test");
    server.add_user("erin", "pw-erin");
    let ua = Ua::new(server.sip_addr());
    let r = ua.register("erin", "pw-erin", "example.test", "c1", "Expires: 30\r\n");
    assert_eq!(status(&r), 423, "{r}");
    assert_eq!(header(&r, "Min-Expires"), Some("60"));
    let r = ua.register("erin", "pw-erin", "example.test", "c2", "Expires: 120\r\n");
    assert_eq!(status(&r), 200, "{r}");
    let contact = header(&r, "Contact").unwrap();
    assert!(
        contact.contains("expires=12") || contact.contains("expires=119"),
        "{contact}"
    );
    let r = ua.register(
        "erin",
        "pw-erin",
        "example.test",
        "c3",
        "Expires: 999999\r\n",
    );
    assert!(
        header(&r, "Contact").unwrap().ends_with("expires=3600")
            || header(&r, "Contact").unwrap().ends_with("expires=3599"),
        "{r}"
    );
    // An Expires past 32 bits is refused (RFC 3261 §20.19: 0 to 2^32-1), never wrapped to 0,
    // which would have removed the binding.
    let r =
        ua.request(&ua.register_msg("erin", "example.test", "c3b", 1, "Expires: 4294967296\r\n"));
    assert!(r.starts_with("SIP/2.0 400 Bad Expires\r\n"), "{r}");
    assert_eq!(server.bindings_of("erin").len(), 1);
    // wildcard removal
    let star = ua
        .register_msg("erin", "example.test", "c4", 1, "")
        .replace(
            &format!("Contact: <sip:erin@127.0.0.1:{}>", ua.port()),
            "Contact: *",
        );
    let r1 = ua.request(&star.replace("Content-Length: 0", "Expires: 0\r\nContent-Length: 0"));
    let auth = authorization(
        &r1,
        Algorithm::Md5,
        "erin",
        "example.test",
        "pw-erin",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let second = star
        .replace("CSeq: 1 REGISTER", "CSeq: 2 REGISTER")
        .replace("z9hG4bKc41", "z9hG4bKc42");
    let r = ua.request(&second.replace(
        "Content-Length: 0",
        &format!("Expires: 0\r\nAuthorization: {auth}\r\nContent-Length: 0"),
    ));
    assert_eq!(status(&r), 200, "{r}");
    assert!(header(&r, "Contact").is_none(), "{r}");
    assert!(server.bindings_of("erin").is_empty());
    // another user's credentials for this AoR: 403
    server.add_user("frank", "pw-frank");
    let r1 = ua.request(&ua.register_msg("erin", "example.test", "c5", 1, ""));
    let auth = authorization(
        &r1,
        Algorithm::Md5,
        "frank",
        "example.test",
        "pw-frank",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let r = ua.request(&ua.register_msg(
        "erin",
        "example.test",
        "c5",
        2,
        &format!("Authorization: {auth}\r\n"),
    ));
    assert_eq!(status(&r), 403, "{r}");
    // a domain we do not serve: 403
    let r = ua.request(&ua.register_msg("erin", "elsewhere.test", "c6", 1, ""));
    assert_eq!(status(&r), 403, "{r}");
}

#[test]
fn too_many_contacts_are_refused() {
    let server = Server::start_with("example.test", &[("MAX_CONTACTS", "2")]);
    server.add_user("gina", "pw-gina");
    let ua = Ua::new(server.sip_addr());
    let extra = "Contact: <sip:gina@127.0.0.1:7001>\r\nContact: <sip:gina@127.0.0.1:7002>\r\n";
    let r = ua.register("gina", "pw-gina", "example.test", "c1", extra);
    assert_eq!(status(&r), 403, "{r}");
    assert!(
        r.starts_with("SIP/2.0 403 Too Many Registered Contacts"),
        "{r}"
    );
    assert!(server.bindings_of("gina").is_empty());
}

#[test]
fn bindings_survive_restart_and_crash() {
    let mut server = Server::start("example.test");
    server.add_user("hank", "pw-hank");
    let ua = Ua::new(server.sip_addr());
    let r = ua.register("hank", "pw-hank", "example.test", "c1", "");
    assert_eq!(status(&r), 200, "{r}");
    server.stop();
    server.start_again();
    assert_eq!(server.bindings_of("hank").len(), 1);
    assert_eq!(server.metric("careflow_sip_active_bindings"), 1);
    // a challenge issued before a crash is recognised after it (the secret persists) but
    // answered with stale=true: the restarted process cannot know which nonce counts were
    // used, so a captured request cannot be replayed; the phone retries at once
    let r1 = ua.request(&ua.register_msg(
        "hank",
        "example.test",
        "c2",
        1,
        "Contact: <sip:hank@127.0.0.1:7777>\r\n",
    ));
    server.crash();
    server.start_again();
    let auth = authorization(
        &r1,
        Algorithm::Md5,
        "hank",
        "example.test",
        "pw-hank",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let r = ua.request(&ua.register_msg(
        "hank",
        "example.test",
        "c2",
        2,
        &format!("Authorization: {auth}\r\nContact: <sip:hank@127.0.0.1:7777>\r\n"),
    ));
    assert_eq!(status(&r), 401, "{r}");
    assert!(r.contains("stale=true"), "{r}");
    let auth = authorization(
        &r,
        Algorithm::Md5,
        "hank",
        "example.test",
        "pw-hank",
        "REGISTER",
        "sip:example.test",
        1,
    );
    let r = ua.request(&ua.register_msg(
        "hank",
        "example.test",
        "c2",
        3,
        &format!("Authorization: {auth}\r\nContact: <sip:hank@127.0.0.1:7777>\r\n"),
    ));
    assert_eq!(status(&r), 200, "{r}");
    server.crash();
    server.start_again();
    assert_eq!(
        server.bindings_of("hank").len(),
        2,
        "{}",
        server.cli_ok(&["registrations"])
    );
    let (code, _) = server.http_get("/healthz").unwrap();
    assert_eq!(code, 200);
}

/// A REGISTER of `ua` whose Contact carries RFC 8599 push parameters with `token`.
fn register_with_push(ua: &Ua, call_id: &str, token: &str) -> String {
    let with_push = |m: String| {
        m.replace(
            &format!("Contact: <sip:pat@127.0.0.1:{}>", ua.port()),
            &format!(
                "Contact: <sip:pat@127.0.0.1:{};pn-provider=apns;pn-param=TEAM1.org.linphone.phone.voip;pn-prid={token}>",
                ua.port()
            ),
        )
    };
    ua.register_rewritten("pat", "pw-pat", "example.test", call_id, with_push)
}

#[test]
fn push_devices_are_one_binding_wherever_they_register_from_and_their_tokens_stay_private() {
    let server = Server::start("example.test");
    server.add_user("pat", "pw-pat");
    let phone = Ua::new(server.sip_addr());
    let r = register_with_push(&phone, "pat-phone", "a1b2c3d4e5f60718293a");
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        r.contains("pn-prid=a1b2c3d4e5f60718293a"),
        "its own Contact as registered: {r}"
    );
    // A second device of the same user sees the phone's binding without its token.
    let tablet = Ua::new(server.sip_addr());
    let r = register_with_push(&tablet, "pat-tablet", "ffeeddccbbaa99887766");
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        !r.contains("a1b2c3d4e5f60718293a"),
        "another device's token leaked: {r}"
    );
    assert!(r.contains("pn-prid=#"), "{r}");
    // The phone, woken, registers from another port and Call-ID: its binding is replaced.
    let woken = Ua::new(server.sip_addr());
    let r = register_with_push(&woken, "pat-phone-woken", "a1b2c3d4e5f60718293a");
    assert_eq!(status(&r), 200, "{r}");
    let listed = server.bindings_of("pat");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|l| !l.contains("a1b2c3d4e5f60718293a") && !l.contains("ffeeddccbbaa99887766")),
        "the CLI shows tokens only as hashes: {listed:?}"
    );
    assert!(
        !server.log().contains("a1b2c3d4e5f60718293a"),
        "a token in the log"
    );
}
