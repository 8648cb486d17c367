//! Benchmark (not a test): the latency careflow-sip adds when a call goes to a phone asleep
//! behind a push, against the local push service of the test suite (in this process, so one
//! clock times both sides). In one run, over loopback UDP, release build:
//!
//! - direct: an authorized INVITE to a desk phone, until it arrives at the phone (the proxy's
//!   own forwarding time, for scale);
//! - to push: the same INVITE to a push phone, until the push service has the push (lookup,
//!   the hold, the JWT or access token, one HTTP/2 request over the reused connection);
//! - to INVITE: the woken phone's authorized REGISTER, until the INVITE arrives at it (the
//!   registration, the wake-up, the late branch).
//!
//! `scripts/bench-push [--calls N] [--phones N]`. Kamailio has no RFC 8599 push to compare
//! with; the "direct" row is the reference.
#![allow(unreachable_pub, clippy::unwrap_used)]

mod common;

use common::arg;

use std::path::Path;
use std::time::{Duration, Instant};

use careflow_proto::digest::Algorithm;
use careflow_test_support::Server;
use careflow_test_support::push_service::PushService;
use careflow_test_support::ua::{Ua, answer, authorization, invite_authorized, status};

const DOMAIN: &str = "bench.push";

fn wait_for(ua: &Ua, start: &str) -> Option<(String, Instant)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(m) = ua.recv()
            && m.starts_with(start)
        {
            return Some((m, Instant::now()));
        }
    }
    None
}

fn with_pn(ua: &Ua, user: &str, token: &str) -> impl Fn(String) -> String {
    let (from, to) = (
        format!("Contact: <sip:{user}@127.0.0.1:{}>", ua.port()),
        format!(
            "Contact: <sip:{user}@127.0.0.1:{};pn-provider=fcm;pn-param=careflow-test;pn-prid={token}>",
            ua.port()
        ),
    );
    move |m: String| m.replace(&from, &to)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<10} n={:<5} p50={:>7.3} ms  p95={:>7.3} ms  max={:>7.3} ms",
        v.len(),
        ms(at(0.5)),
        ms(at(0.95)),
        ms(at(1.0))
    );
}

fn main() {
    let calls = arg("--calls", 200);
    let phones = arg("--phones", 20).max(1);
    let push = PushService::start();
    let env = push.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.push(("RUST_LOG", "warn"));
    let server = Server::launch(Path::new(env!("CARGO_BIN_EXE_careflow-sip")), DOMAIN, &env);
    server.add_user("doctor", "pw-doctor");
    server.add_user("desk", "pw-desk");
    let desk = Ua::new(server.sip_addr());
    assert_eq!(
        status(&desk.register("desk", "pw-desk", DOMAIN, "reg-desk", "")),
        200
    );
    let mut devices = Vec::new();
    for i in 0..phones {
        let user = format!("phone{i}");
        server.add_user(&user, "pw-phone");
        let ua = Ua::new(server.sip_addr());
        let token = format!("tok-{i}-0123456789");
        let r = ua.register_collecting(
            (&user, "pw-phone", DOMAIN),
            "reg",
            1,
            with_pn(&ua, &user, &token),
        );
        assert_eq!(status(&r.0), 200, "{}", r.0);
        devices.push((user, ua, token, 3u32));
    }
    let (mut direct, mut to_push, mut to_invite, mut register) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut desk_cseq = 3;
    for n in 0..calls {
        // Direct, for scale.
        let caller = Ua::new(server.sip_addr());
        let call_id = format!("direct-{n}");
        let sent = Instant::now();
        invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), "desk", &call_id);
        let (inv, at) = wait_for(&desk, "INVITE ").expect("the desk phone's INVITE");
        direct.push(at - sent);
        answer(&desk, &inv, 486);
        // A plain re-registration (the desk phone's), authorized REGISTER to 200 OK: the part
        // of "to INVITE" that any registration costs (the location update, stored durably).
        desk.send(&desk.register_msg("desk", DOMAIN, "reg-desk", desk_cseq, ""));
        let (challenge, _) = wait_for(&desk, "SIP/2.0 401").expect("401");
        let auth = authorization(
            &challenge,
            Algorithm::Md5,
            "desk",
            DOMAIN,
            "pw-desk",
            "REGISTER",
            &format!("sip:{DOMAIN}"),
            1,
        );
        let started = Instant::now();
        desk.send(&desk.register_msg(
            "desk",
            DOMAIN,
            "reg-desk",
            desk_cseq + 1,
            &format!("Authorization: {auth}\r\n"),
        ));
        desk_cseq += 2;
        let (_, at) = wait_for(&desk, "SIP/2.0 200").expect("200");
        register.push(at - started);
        // To a sleeping phone.
        let (user, ua, token, cseq) = &mut devices[n % phones];
        let seen = push.pushes_to(token).len();
        let caller = Ua::new(server.sip_addr());
        let call_id = format!("push-{n}");
        let sent = Instant::now();
        invite_authorized(&caller, DOMAIN, ("doctor", "pw-doctor"), user, &call_id);
        let p = push
            .wait_push(token, seen + 1, Duration::from_secs(5))
            .expect("a push");
        to_push.push(p.at - sent);
        // The woken phone: its challenge round first, then the authorized REGISTER is timed
        // up to the INVITE (which may come before the 200 OK).
        let rewrite = with_pn(ua, user, token);
        ua.send(&rewrite(ua.register_msg(user, DOMAIN, "reg", *cseq, "")));
        let (challenge, _) = wait_for(ua, "SIP/2.0 401").expect("401");
        let auth = authorization(
            &challenge,
            Algorithm::Md5,
            user,
            DOMAIN,
            "pw-phone",
            "REGISTER",
            &format!("sip:{DOMAIN}"),
            1,
        );
        let started = Instant::now();
        ua.send(&rewrite(ua.register_msg(
            user,
            DOMAIN,
            "reg",
            *cseq + 1,
            &format!("Authorization: {auth}\r\n"),
        )));
        *cseq += 2;
        let (inv, at) = wait_for(ua, "INVITE ").expect("the INVITE after waking");
        to_invite.push(at - started);
        answer(ua, &inv, 486);
    }
    println!("careflow-sip push wake-up, {calls} calls, {phones} phones, loopback UDP");
    summary("direct", direct);
    summary("to push", to_push);
    summary("to INVITE", to_invite);
    summary("register", register);
}
