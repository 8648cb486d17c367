//! Sleeping mobile devices woken by a push (RFC 8599), against a local APNs/FCM service that
//! checks the request contracts (`careflow_test_support::push_service`). The tests play the
//! phone: it registers with `pn-*` parameters and goes silent; when the service receives the
//! push, the phone registers again (from a new socket, as an app relaunched by the push, or
//! from the same one) and answers the INVITE it then gets.

use std::time::{Duration, Instant};

use careflow_test_support::push_service::{APNS_TEAM_ID, PushService};

use crate::support::*;

const DOMAIN: &str = "push.test";
const FCM_TOKEN: &str = "fcm-token-nurse-0123456789";
const VOIP_TOKEN: &str = "a1b2c3d4e5f60718293a";

/// The `pn-*` URI parameters of an Android device.
fn fcm_params(token: &str) -> String {
    format!(";pn-provider=fcm;pn-param=careflow-test;pn-prid={token}")
}

/// The `pn-*` URI parameters Linphone on iOS registers: a VoIP and a background token.
fn linphone_ios_params(voip: &str) -> String {
    format!(
        ";pn-provider=apns;pn-param={APNS_TEAM_ID}.org.linphone.phone.voip&remote;pn-prid={voip}:voip&bg-{voip}:remote"
    )
}

/// Registers `user` from `ua` with `pn` in its Contact URI and an instance id; returns the
/// final answer, and every request that arrived meanwhile (a woken phone may get its INVITE
/// before the 200 OK).
fn register_push(
    ua: &Ua,
    user: &str,
    call_id: &str,
    first_cseq: u32,
    pn: &str,
) -> (String, Vec<String>) {
    register_push_with(ua, user, call_id, first_cseq, pn, "")
}

/// [`register_push`] with more Contact header parameters (`;name=value` each).
fn register_push_with(
    ua: &Ua,
    user: &str,
    call_id: &str,
    first_cseq: u32,
    pn: &str,
    contact_params: &str,
) -> (String, Vec<String>) {
    let contact = |m: String| {
        m.replace(
            &format!("Contact: <sip:{user}@127.0.0.1:{}>", ua.port()),
            &format!(
                "Contact: <sip:{user}@127.0.0.1:{}{pn}>;+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-0000{:08}>\"{contact_params}",
                ua.port(),
                user.len()
            ),
        )
    };
    let r = ua.register_collecting(
        (user, &format!("pw-{user}"), DOMAIN),
        call_id,
        first_cseq,
        contact,
    );
    assert!(status(&r.0) >= 200, "{}", r.0);
    r
}

/// A server pushing through `push`, with `extra` settings, and users nurse, doctor, desk.
fn push_server(push: &PushService, extra: &[(&str, &str)]) -> Server {
    let env = push.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend_from_slice(extra);
    let server = Server::start_with(DOMAIN, &env);
    for u in ["nurse", "doctor", "desk"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    server
}

/// Waits (up to 3 s) until `/metrics` shows every line of `want`; returns the page.
fn metrics_show(server: &Server, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let page = server.http_get("/metrics").unwrap().1;
        if want.iter().all(|w| page.lines().any(|l| l == *w)) || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads from `ua` until a message starting with `start` arrives or `within` ends.
fn wait_for(ua: &Ua, start: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(m) = ua.recv()
            && m.starts_with(start)
        {
            return Some(m);
        }
    }
    None
}

/// The request starting with `start` that a woken phone got: among the messages that arrived
/// while it registered (`early`), or within 3 s after.
fn woken_gets(ua: &Ua, early: Vec<String>, start: &str) -> String {
    match early.into_iter().find(|m| m.starts_with(start)) {
        Some(m) => m,
        None => wait_for(ua, start, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("no {start}after waking")),
    }
}

/// What reaches `ua` within `d`.
fn quiet(ua: &Ua, d: Duration) -> Vec<String> {
    ua.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + d;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Some(m) = ua.recv() {
            got.push(m);
        }
    }
    ua.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    got
}

#[test]
fn a_sleeping_android_phone_gets_one_push_per_call_and_the_call_after_it_wakes() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let phone = Ua::new(server.sip_addr());
    let (r, _) = register_push(&phone, "nurse", "reg-nurse", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        header(&r, "Feature-Caps"),
        Some("*;+sip.pns=\"apns,fcm\""),
        "the registrar names its push services: {r}"
    );

    // The call: challenged (407) once, then retransmitted while the phone sleeps.
    let caller = Ua::new(server.sip_addr());
    let invite = invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "nurse", "wake-1");
    std::thread::sleep(Duration::from_millis(500));
    caller.send(&invite);
    let p = push
        .wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("a push for the call");
    let data = &p.body["message"]["data"];
    assert_eq!(data["call-id"], "wake-1", "{}", p.body);
    assert!(
        data["from-uri"]
            .as_str()
            .unwrap()
            .contains("doctor@push.test"),
        "{}",
        p.body
    );
    assert_eq!(
        data["uuid"], "00000000-0000-0000-0000-000000000005",
        "{}",
        p.body
    );

    // The push relaunched the app: it registers from a new socket, with a new Call-ID.
    let woken = Ua::new(server.sip_addr());
    let (r, early) = register_push(
        &woken,
        "nurse",
        "reg-nurse-woken",
        1,
        &fcm_params(FCM_TOKEN),
    );
    assert_eq!(status(&r), 200, "{r}");
    let inv = woken_gets(&woken, early, "INVITE ");
    assert!(inv.contains("Call-ID: wake-1\r\n"), "{inv}");
    answer(&woken, &inv, 200);
    let ok = wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered");
    assert!(ok.contains("Call-ID: wake-1\r\n"), "{ok}");

    // Once: no second push, and no INVITE to the old, suspended socket.
    let stale: Vec<String> = quiet(&phone, Duration::from_secs(1))
        .into_iter()
        .filter(|m| m.starts_with("INVITE "))
        .collect();
    assert!(
        stale.is_empty(),
        "an INVITE went to the sleeping flow: {stale:?}"
    );
    assert_eq!(push.pushes_to(FCM_TOKEN).len(), 1, "{:?}", push.pushes());
    assert_eq!(push.token_requests(), 1, "one OAuth2 token, reused");
    assert_eq!(push.violations(), Vec::<String>::new());
    // A second call: a second push, the access token reused.
    let caller2 = Ua::new(server.sip_addr());
    invite_authorized(&caller2, DOMAIN, ("doctor", "pw-doctor"), "nurse", "wake-2");
    push.wait_push(FCM_TOKEN, 2, Duration::from_secs(5))
        .expect("a push for the second call");
    assert_eq!(
        push.token_requests(),
        1,
        "the access token is reused until due"
    );
    let want = [
        "careflow_sip_push_sent_total{service=\"fcm\",kind=\"call\"} 2",
        "careflow_sip_push_woken_total 1",
        "careflow_sip_push_to_register_seconds_count 1",
    ];
    let metrics = metrics_show(&server, &want);
    for w in want {
        assert!(metrics.lines().any(|l| l == w), "{w} in:\n{metrics}");
    }
    assert!(!server.log().contains(FCM_TOKEN), "a push token in the log");
    // The admin API (the dashboard's device list) shows it as a push device, without its token.
    let out = server.cli_ok(&["apikey", "create", "push-test"]);
    let key = out.lines().last().unwrap().trim().to_string();
    let (code, _, body) = crate::api::http(&server, "GET", "/api/admin/bindings", Some(&key), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body[0]["push"], "fcm", "{body}");
    assert!(!body.to_string().contains(FCM_TOKEN), "{body}");
}

#[test]
fn a_linphone_iphone_gets_a_voip_push_and_the_call_over_its_refreshed_registration() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let phone = Ua::new(server.sip_addr());
    let pn = linphone_ios_params(VOIP_TOKEN);
    let (r, _) = register_push(&phone, "nurse", "reg-iphone", 1, &pn);
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "wake-ios",
    );
    let p = push
        .wait_push(VOIP_TOKEN, 1, Duration::from_secs(5))
        .expect("a VoIP push");
    assert_eq!(p.service, "apns");
    assert_eq!(p.headers["apns-topic"], "org.linphone.phone.voip");
    assert_eq!(p.headers["apns-push-type"], "voip");
    assert_eq!(p.body["aps"]["call-id"], "wake-ios", "{}", p.body);
    assert_eq!(p.body["aps"]["loc-key"], "IC_MSG");
    // Woken, it refreshes its registration from the same socket and Call-ID.
    let (r, early) = register_push(&phone, "nurse", "reg-iphone", 3, &pn);
    assert_eq!(status(&r), 200, "{r}");
    let inv = woken_gets(&phone, early, "INVITE ");
    answer(&phone, &inv, 200);
    wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered");
    assert_eq!(push.pushes().len(), 1);
    assert_eq!(push.violations(), Vec::<String>::new());
}

#[test]
fn a_desk_phone_rings_at_once_and_a_busy_one_does_not_end_the_wait_for_the_mobile() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let mobile = Ua::new(server.sip_addr());
    let (r, _) = register_push(&mobile, "nurse", "reg-mobile", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    // The same user's desk phone: no pn-*, reachable, so no push for it.
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("nurse", "pw-nurse", DOMAIN, "reg-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "desk-busy",
    );
    let at_desk =
        wait_for(&desk, "INVITE ", Duration::from_secs(3)).expect("the desk rings at once");
    answer(&desk, &at_desk, 486);
    push.wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("a push to the mobile");
    assert!(
        quiet(&caller, Duration::from_millis(800))
            .iter()
            .all(|m| status(m) < 300),
        "the busy desk phone ended the call"
    );
    let (r, early) = register_push(&mobile, "nurse", "reg-mobile", 3, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let inv = woken_gets(&mobile, early, "INVITE ");
    answer(&mobile, &inv, 200);
    wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered on the mobile");
    assert_eq!(push.pushes().len(), 1, "no push for the desk phone");
}

#[test]
fn a_reachable_device_without_push_parameters_gets_its_call_and_no_push() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("desk", "pw-desk", DOMAIN, "reg-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Feature-Caps"), None, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "desk", "no-push");
    let inv = wait_for(&desk, "INVITE ", Duration::from_secs(3)).expect("the call");
    answer(&desk, &inv, 200);
    wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered");
    assert!(push.pushes().is_empty(), "{:?}", push.pushes());
}

#[test]
fn a_token_the_service_refuses_answers_404_or_480_with_a_reason_and_an_invalid_one_is_removed() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    // APNs no longer knows the token: 404, and the binding goes.
    push.refuse(VOIP_TOKEN, 410, "Unregistered");
    let phone = Ua::new(server.sip_addr());
    let (r, _) = register_push(
        &phone,
        "nurse",
        "reg-gone",
        1,
        &linphone_ios_params(VOIP_TOKEN),
    );
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "nurse", "gone-1");
    let fin = wait_for(&caller, "SIP/2.0 404", Duration::from_secs(5)).expect("404");
    assert!(
        header(&fin, "Reason").is_some_and(|r| r.contains("push token")),
        "{fin}"
    );
    assert!(
        server.bindings_of("nurse").is_empty(),
        "{:?}",
        server.bindings_of("nurse")
    );

    // FCM unavailable: 480 with the reason, and the binding stays.
    push.refuse(FCM_TOKEN, 503, "UNAVAILABLE");
    let android = Ua::new(server.sip_addr());
    let (r, _) = register_push(&android, "desk", "reg-android", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "desk",
        "unavailable-1",
    );
    let fin = wait_for(&caller, "SIP/2.0 480", Duration::from_secs(5)).expect("480");
    assert!(
        header(&fin, "Reason").is_some_and(|r| r.contains("push service unavailable")),
        "{fin}"
    );
    assert_eq!(server.bindings_of("desk").len(), 1);
    let metrics = server.http_get("/metrics").unwrap().1;
    assert!(
        metrics.contains(
            "careflow_sip_push_failed_total{service=\"apns\",reason=\"invalid_token\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("careflow_sip_push_failed_total{service=\"fcm\",reason=\"unavailable\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_phone_that_never_wakes_gets_one_480_and_a_late_registration_forks_nothing() {
    let push = PushService::start();
    let server = push_server(&push, &[("PUSH_WAIT", "2")]);
    let phone = Ua::new(server.sip_addr());
    let (r, _) = register_push(&phone, "nurse", "reg-late", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    let sent = Instant::now();
    invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "nurse", "late-1");
    let fin = wait_for(&caller, "SIP/2.0 480", Duration::from_secs(6)).expect("480");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(1800),
        "answered after {waited:?}"
    );
    assert!(
        header(&fin, "Reason").is_some_and(|r| r.contains("did not wake")),
        "{fin}"
    );
    let more: Vec<u16> = quiet(&caller, Duration::from_millis(600))
        .iter()
        .map(|m| status(m))
        .filter(|s| *s >= 200)
        .collect();
    assert!(more.iter().all(|s| *s == 480), "one final only: {more:?}");
    // ACK the 480 as a caller does, then the phone wakes too late.
    let (r, early) = register_push(&phone, "nurse", "reg-late", 3, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let invites: Vec<String> = early
        .into_iter()
        .chain(quiet(&phone, Duration::from_secs(1)))
        .filter(|m| m.starts_with("INVITE "))
        .collect();
    assert!(
        invites.is_empty(),
        "a late registration forked: {invites:?}"
    );
    assert_eq!(push.pushes().len(), 1);
}

#[test]
fn the_registrar_refuses_a_service_it_does_not_serve_and_answers_capability_queries() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let ua = Ua::new(server.sip_addr());
    let (r, _) = register_push(
        &ua,
        "nurse",
        "reg-webpush",
        1,
        ";pn-provider=webpush;pn-prid=abc",
    );
    assert_eq!(status(&r), 555, "{r}");
    let (r, _) = register_push(&ua, "nurse", "reg-query", 1, ";pn-provider=fcm");
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        header(&r, "Feature-Caps"),
        Some("*;+sip.pns=\"apns,fcm\""),
        "{r}"
    );
    // A query binding is an ordinary one: it gets its calls directly.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "query-call",
    );
    assert!(wait_for(&ua, "INVITE ", Duration::from_secs(3)).is_some());
    assert!(push.pushes().is_empty());

    // Without any push service, pn-* parameters lock nobody out: stored, no push, calls
    // go to the binding as to any other.
    let plain = Server::start(DOMAIN);
    plain.add_user("nurse", "pw-nurse");
    plain.add_user("doctor", "pw-doctor");
    let phone = Ua::new(plain.sip_addr());
    let (r, _) = register_push(&phone, "nurse", "reg-plain", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&r, "Feature-Caps"), None, "{r}");
    let caller = Ua::new(plain.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "plain-call",
    );
    assert!(wait_for(&phone, "INVITE ", Duration::from_secs(3)).is_some());
}

#[test]
fn an_iphone_woken_for_a_call_answered_on_the_desk_phone_gets_the_invite_then_a_cancel() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let iphone = Ua::new(server.sip_addr());
    let pn = linphone_ios_params(VOIP_TOKEN);
    let (r, _) = register_push(&iphone, "nurse", "reg-iphone", 1, &pn);
    assert_eq!(status(&r), 200, "{r}");
    let desk = Ua::new(server.sip_addr());
    let r = desk.register("nurse", "pw-nurse", DOMAIN, "reg-desk", "");
    assert_eq!(status(&r), 200, "{r}");
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "answered-on-desk",
    );
    let at_desk = wait_for(&desk, "INVITE ", Duration::from_secs(3)).expect("the desk rings");
    push.wait_push(VOIP_TOKEN, 1, Duration::from_secs(5))
        .expect("a VoIP push");
    answer(&desk, &at_desk, 200);
    wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered on the desk");
    // The iPhone shows the call (CallKit) and registers: it must hear the call is over.
    let (r, early) = register_push(&iphone, "nurse", "reg-iphone", 3, &pn);
    assert_eq!(status(&r), 200, "{r}");
    let inv = woken_gets(&iphone, early, "INVITE ");
    assert!(inv.contains("Call-ID: answered-on-desk\r\n"), "{inv}");
    answer(&iphone, &inv, 180);
    let cancel = wait_for(&iphone, "CANCEL ", Duration::from_secs(3)).expect("then the CANCEL");
    answer(&iphone, &cancel, 200);
    answer(&iphone, &inv, 487);
    wait_for(&iphone, "ACK ", Duration::from_secs(3)).expect("the 487 ACKed");
    // Nothing of it reached the caller, whose call goes on.
    let up: Vec<u16> = quiet(&caller, Duration::from_millis(500))
        .iter()
        .map(|m| status(m))
        .filter(|s| *s != 200 && *s != 0)
        .collect();
    assert!(up.is_empty(), "the caller heard of the farewell: {up:?}");
}

/// A Redis server of this test's own (the shared one's 16 databases are all taken by other
/// tests running alongside).
pub(crate) struct OwnRedis {
    child: std::process::Child,
    pub(crate) url: String,
}

impl OwnRedis {
    pub(crate) fn start() -> Self {
        require("redis-server", "redis-server");
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_call_on_one_node_reaches_a_phone_that_wakes_up_on_another() {
    use crate::cluster_link::{joined, member_with};
    let redis = OwnRedis::start();
    let db = TestDb::postgres();
    let push = PushService::start();
    let env = push.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (a, b) = (
        member_with(5, &db, &redis.url, &env),
        member_with(6, &db, &redis.url, &env),
    );
    joined(&[&a, &b]);
    a.add_user("nurse", "pw-nurse");
    a.add_user("doctor", "pw-doctor");
    let d = crate::cluster_link::DOMAIN;
    // The phone (behind NAT: only the node it registers through reaches it) registered
    // through node A, then slept.
    let phone = Ua::new(a.sip_addr());
    let pn = fcm_params(FCM_TOKEN);
    let with_pn = |ua: &Ua| {
        let port = ua.port();
        move |m: String| {
            m.replace(
                &format!("Contact: <sip:nurse@127.0.0.1:{port}>"),
                &format!(
                    "Contact: <sip:nurse@192.168.7.20:5060{}>",
                    fcm_params(FCM_TOKEN)
                ),
            )
        }
    };
    let r = phone.register_rewritten("nurse", "pw-nurse", d, "reg-a", with_pn(&phone));
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.contains(&pn), "{r}");
    // The call arrives at node A; the push relaunches the app, which registers through B.
    let caller = Ua::new(a.sip_addr());
    invite_authorized(&caller, d, ("doctor", "pw-doctor"), "nurse", "across-nodes");
    push.wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("node A pushed");
    let woken = Ua::new(b.sip_addr());
    let r = woken.register_rewritten("nurse", "pw-nurse", d, "reg-b", with_pn(&woken));
    assert_eq!(status(&r), 200, "{r}");
    let inv = wait_for(&woken, "INVITE ", Duration::from_secs(5)).expect("the call through node B");
    assert!(inv.contains("Call-ID: across-nodes\r\n"), "{inv}");
    answer(&woken, &inv, 200);
    let ok = wait_for(&caller, "SIP/2.0 200", Duration::from_secs(5)).expect("answered");
    assert!(ok.contains("Call-ID: across-nodes\r\n"), "{ok}");
    assert_eq!(
        push.pushes().len(),
        1,
        "one push, from the node with the call"
    );
    assert_eq!(push.violations(), Vec::<String>::new());
}

#[test]
fn a_message_to_a_sleeping_phone_waits_for_it_and_is_delivered_once() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let phone = Ua::new(server.sip_addr());
    let (r, _) = register_push(&phone, "nurse", "reg-msg", 1, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let sender = Ua::new(server.sip_addr());
    let port = sender.port();
    let uri = format!("sip:nurse@{DOMAIN}");
    send_with_proxy_auth(
        &sender,
        DOMAIN,
        ("doctor", "pw-doctor"),
        ("MESSAGE", &uri),
        |cseq, extra| {
            format!(
                "MESSAGE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKmsg{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:doctor@{DOMAIN}>;tag=m1\r\nTo: <{uri}>\r\nCall-ID: msg-1\r\nCSeq: {cseq} MESSAGE\r\n{extra}Content-Type: text/plain\r\nContent-Length: 12\r\n\r\nbed 4 is up."
            )
        },
    );
    let p = push
        .wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("a push for the message");
    assert_eq!(p.body["message"]["data"]["loc-key"], "IM_MSG", "{}", p.body);
    let (r, early) = register_push(&phone, "nurse", "reg-msg", 3, &fcm_params(FCM_TOKEN));
    assert_eq!(status(&r), 200, "{r}");
    let msg = woken_gets(&phone, early, "MESSAGE ");
    assert!(msg.ends_with("bed 4 is up."), "{msg}");
    answer(&phone, &msg, 200);
    let ok = wait_for(&sender, "SIP/2.0 200", Duration::from_secs(3)).expect("delivered");
    assert!(ok.contains("CSeq: 2 MESSAGE"), "{ok}");
    let again: Vec<String> = quiet(&phone, Duration::from_millis(700))
        .into_iter()
        .filter(|m| m.starts_with("MESSAGE "))
        .collect();
    assert!(again.is_empty(), "delivered twice: {again:?}");
}

#[test]
fn a_push_device_is_woken_to_register_again_before_its_registration_expires() {
    let push = PushService::start();
    let server = push_server(
        &push,
        &[("MIN_EXPIRES", "10"), ("PUSH_REFRESH_BEFORE", "30")],
    );
    let phone = Ua::new(server.sip_addr());
    let pn = linphone_ios_params(VOIP_TOKEN);
    // It asks for the periodic wake-up (+sip.pnsreg) and registers for 40 s.
    let (r, _) = register_push_with(
        &phone,
        "nurse",
        "reg-refresh",
        1,
        &pn,
        ";+sip.pnsreg;expires=40",
    );
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(
        header(&r, "Feature-Caps"),
        Some("*;+sip.pns=\"apns,fcm\";+sip.pnsreg=\"30\""),
        "{r}"
    );
    // Inside 30 s of its expiry: one background push (never a VoIP one, which iOS would
    // punish), to its background token.
    let p = push
        .wait_push(&format!("bg-{VOIP_TOKEN}"), 1, Duration::from_secs(25))
        .expect("a refresh push");
    assert_eq!(p.headers["apns-push-type"], "background");
    assert_eq!(p.headers["apns-topic"], "org.linphone.phone");
    assert!(
        push.pushes_to(VOIP_TOKEN).is_empty(),
        "a VoIP push without a call"
    );
    // Woken, it registers again (for longer): that registration is far from expiry, so no
    // more pushes (a missed one would have been sent again at half the interval).
    let (r, _) = register_push_with(
        &phone,
        "nurse",
        "reg-refresh",
        3,
        &pn,
        ";+sip.pnsreg;expires=600",
    );
    assert_eq!(status(&r), 200, "{r}");
    std::thread::sleep(Duration::from_secs(16));
    assert_eq!(
        push.pushes().len(),
        1,
        "one per registration: {:?}",
        push.pushes()
    );
    assert_eq!(push.violations(), Vec::<String>::new());
}

/// A `linphonec` (liblinphone) phone of its own HOME, driven as ../shared/peers/linphone.md
/// says: rc file written fresh, SIP port set on stdin, `-a` to answer calls.
struct Linphonec {
    child: std::process::Child,
    home: tempfile::TempDir,
}

impl Linphonec {
    fn start(server: &Server, user: &str, port: u16, contact_params: &str) -> Self {
        use std::io::Write as _;
        require("linphonec", "linphone-cli");
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".local/share/linphone")).unwrap();
        let sip = server.sip_addr();
        let rc = format!(
            "[sip]\nsip_port={port}\nsip_tcp_port=-1\ndefault_proxy=0\nregister_only_when_network_is_up=0\n\
             [rtp]\naudio_rtp_port={}\n\
             [sound]\ncapture_dev_id=\nplayback_dev_id=\n\
             [proxy_0]\nreg_proxy=<sip:{sip};transport=udp>\nreg_route=<sip:{sip};transport=udp;lr>\n\
             reg_identity=sip:{user}@{DOMAIN}\nreg_expires=600\nreg_sendregister=1\nrealm={DOMAIN}\n\
             contact_uri_parameters={contact_params}\n\
             [auth_info_0]\nusername={user}\npasswd=pw-{user}\nrealm={DOMAIN}\ndomain={DOMAIN}\n",
            free_port()
        );
        let rc_path = home.path().join("linphonerc");
        std::fs::write(&rc_path, rc).unwrap();
        let log = std::fs::File::create(home.path().join("linphonec.log")).unwrap();
        let mut child = std::process::Command::new("linphonec")
            .args(["-c", rc_path.to_str().unwrap(), "-a", "-d", "6"])
            .env("HOME", home.path())
            .stdin(std::process::Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("linphonec");
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "ports sip {port}").unwrap();
        Self { child, home }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("linphonec.log")).unwrap_or_default()
    }

    /// Gone at once, as iOS ends a suspended app: no de-registration.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Linphonec {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn linphone_registers_its_push_parameters_and_answers_the_call_after_a_push_relaunch() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let port = free_port();
    let pn = format!("pn-provider=fcm;pn-param=careflow-test;pn-prid={FCM_TOKEN}");
    let mut phone = Linphonec::start(&server, "nurse", port, &pn);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server
        .bindings_of("nurse")
        .iter()
        .any(|b| b.contains("pn-provider=fcm"))
    {
        assert!(
            Instant::now() < deadline,
            "linphonec did not register with pn-*:\n{}",
            phone.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // linphonec may print the 200 a moment after the server stored the binding.
    while !phone
        .log()
        .contains("Feature-Caps: *;+sip.pns=\"apns,fcm\"")
    {
        assert!(Instant::now() < deadline, "{}", phone.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The app is suspended (killed without a word) and a call comes in with an SDP offer.
    phone.kill();
    let caller = Ua::new(server.sip_addr());
    let cport = caller.port();
    let sdp = format!(
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n",
        free_port()
    );
    let uri = format!("sip:nurse@{DOMAIN}");
    send_with_proxy_auth(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        ("INVITE", &uri),
        |cseq, extra| {
            format!(
                "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{cport};branch=z9hG4bKlin{cseq};rport\r\nMax-Forwards: 70\r\nFrom: \"Dr Who\" <sip:doctor@{DOMAIN}>;tag=lc1\r\nTo: <{uri}>\r\nCall-ID: linphone-wake\r\nCSeq: {cseq} INVITE\r\nContact: <sip:doctor@127.0.0.1:{cport}>\r\n{extra}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
                sdp.len()
            )
        },
    );
    let p = push
        .wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("a push");
    assert_eq!(
        p.body["message"]["data"]["display-name"], "Dr Who",
        "{}",
        p.body
    );
    // The push relaunches the app: it registers again (same pn-*) and answers.
    let phone = Linphonec::start(&server, "nurse", free_port(), &pn);
    let ok = wait_for(&caller, "SIP/2.0 200", Duration::from_secs(9))
        .unwrap_or_else(|| panic!("linphonec did not answer after waking:\n{}", phone.log()));
    assert!(ok.contains("Call-ID: linphone-wake\r\n"), "{ok}");
    assert_eq!(
        server.bindings_of("nurse").len(),
        1,
        "{:?}",
        server.bindings_of("nurse")
    );
    assert_eq!(push.pushes().len(), 1);
}

#[test]
fn a_device_of_an_app_we_cannot_push_to_is_called_over_its_flow_instead_of_failing() {
    let push = PushService::start();
    let server = push_server(&push, &[]);
    // Linphone from the App Store: its token belongs to another team's topic.
    push.refuse(VOIP_TOKEN, 400, "DeviceTokenNotForTopic");
    let phone = Ua::new(server.sip_addr());
    let (r, _) = register_push(
        &phone,
        "nurse",
        "reg-store-app",
        1,
        &linphone_ios_params(VOIP_TOKEN),
    );
    assert_eq!(status(&r), 200, "{r}");
    for (n, call_id) in ["store-app-1", "store-app-2"].iter().enumerate() {
        let caller = Ua::new(server.sip_addr());
        invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "nurse", call_id);
        let inv = wait_for(&phone, "INVITE ", Duration::from_secs(3))
            .unwrap_or_else(|| panic!("call {n} did not reach the phone"));
        assert!(inv.contains(&format!("Call-ID: {call_id}\r\n")), "{inv}");
        answer(&phone, &inv, 200);
        wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered");
    }
    assert_eq!(server.bindings_of("nurse").len(), 1, "the binding stays");
    let metrics = metrics_show(
        &server,
        &["careflow_sip_push_failed_total{service=\"apns\",reason=\"not_our_app\"} 1"],
    );
    assert!(
        metrics
            .contains("careflow_sip_push_failed_total{service=\"apns\",reason=\"not_our_app\"} 1"),
        "tried once, then called directly: {metrics}"
    );
}

#[test]
fn a_push_device_on_tcp_keeps_its_binding_when_its_connection_closes_and_is_woken_over_a_new_one() {
    use std::io::Write as _;
    let push = PushService::start();
    let server = push_server(&push, &[]);
    let pn = fcm_params(FCM_TOKEN);
    let first = crate::secure::tcp_device_with(&server, "nurse", "pw-nurse", "tcp-a", &pn);
    // The app is suspended: the system closes its connection.
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.bindings_of("nurse").len(),
        1,
        "the push binding went with its connection"
    );
    let caller = Ua::new(server.sip_addr());
    invite_authorized(
        &caller,
        DOMAIN,
        ("doctor", "pw-doctor"),
        "nurse",
        "tcp-wake",
    );
    push.wait_push(FCM_TOKEN, 1, Duration::from_secs(5))
        .expect("a push");
    let mut second = crate::secure::tcp_device_with(&server, "nurse", "pw-nurse", "tcp-b", &pn);
    let inv = crate::secure::read_message(&mut second, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no INVITE over the new connection:\n{}", server.log()));
    assert!(
        inv.starts_with("INVITE sip:nurse@dev-tcp-b.invalid"),
        "{inv}"
    );
    let m = careflow_proto::Message::parse(
        bytes::Bytes::from(inv.clone()),
        &careflow_proto::ParseLimits::default(),
    )
    .unwrap();
    let mut b = careflow_proto::ResponseBuilder::new(&m, 200)
        .to_tag("tcp-dev")
        .header("Contact", "<sip:nurse@dev-tcp-b.invalid;transport=tcp>");
    for rr in m.headers_named(careflow_proto::HeaderName::RecordRoute) {
        b = b.header("Record-Route", rr);
    }
    second.write_all(&b.build()).unwrap();
    wait_for(&caller, "SIP/2.0 200", Duration::from_secs(3)).expect("answered over TCP");
    assert_eq!(
        server.bindings_of("nurse").len(),
        1,
        "{:?}",
        server.bindings_of("nurse")
    );
}
