//! Benchmark (not a test): busy-lamp NOTIFYs with many watchers of one extension, over
//! loopback UDP, release build. `--watchers` subscriptions (from `--watchers / 100` watcher
//! users, spread over `--sockets` UDP sockets that answer every NOTIFY 200) watch extension
//! 2001; then
//!
//! - fan-out: `--rings` calls to 2001, each ringing 600 ms (beyond the 200 ms pacing) then
//!   refused: the time from the callee's 180 to the `early` NOTIFY reaching the last of the
//!   watchers;
//! - sustained: `--rate` whole calls per second to 2001 for `--seconds` (INVITE, 180, 200,
//!   ACK, BYE), first with nobody watching, then watched: the NOTIFYs per second the watchers
//!   receive and the server's CPU time (utime+stime from /proc) per 1,000 NOTIFYs, the calls'
//!   own CPU (the first run) taken off. Pacing bounds a subscription to 5 NOTIFYs/s, so the
//!   rate here is at most 5 x watchers.
//!
//! `scripts/bench-blf [--watchers 1000] [--sockets 100] [--rings 10] [--seconds 10] [--rate 5]`. Kamailio
//! builds lamps from PUBLISH through pua_dialoginfo and presence (a database round per
//! state); its set-up in ../shared/bench has no presence server to compare with.
#![allow(unreachable_pub, clippy::unwrap_used)]

mod common;

use common::arg;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use careflow_proto::digest::Algorithm;
use careflow_test_support::Server;
use careflow_test_support::ua::{
    Ua, answer, authorization, expect, header, invite_authorized, status,
};

const DOMAIN: &str = "bench.blf";

/// utime + stime of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks * 1000.0 / 100.0
}

fn subscribe(ua: &Ua, me: &str, call_id: &str, cseq: u32, extra: &str) -> String {
    let port = ua.port();
    format!(
        "SUBSCRIBE sip:2001@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}-{cseq};rport\r\n\
         From: <sip:{me}@{DOMAIN}>;tag=w-{call_id}\r\nTo: <sip:2001@{DOMAIN}>\r\nCall-ID: {call_id}\r\n\
         CSeq: {cseq} SUBSCRIBE\r\nContact: <sip:{me}@127.0.0.1:{port}>\r\nAccept: application/dialog-info+xml\r\n\
         Max-Forwards: 70\r\nUser-Agent: Yealink SIP-T46S 66.86.0.15\r\nExpires: 3600\r\nEvent: dialog\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// The next response `ua` gets, answering the NOTIFYs that come first.
fn answer_skipping_notifies(ua: &Ua) -> String {
    loop {
        let m = ua.recv().expect("an answer to the SUBSCRIBE");
        if m.starts_with("NOTIFY ") {
            answer(ua, &m, 200);
            continue;
        }
        return m;
    }
}

/// What the watcher sockets saw: NOTIFYs in all, and per ringing call the arrival of its
/// `early` NOTIFYs.
#[derive(Default)]
struct Seen {
    notifies: AtomicU64,
    /// By ringing call, by subscription (Call-ID): the first arrival (a retransmission of a
    /// NOTIFY whose answer was late is not a later delivery).
    early: Mutex<std::collections::HashMap<String, std::collections::HashMap<String, Instant>>>,
}

fn watch(ua: Ua, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    ua.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, _)) = ua.sock.recv_from(&mut buf) else {
            continue;
        };
        let m = String::from_utf8_lossy(&buf[..n]);
        if !m.starts_with("NOTIFY ") {
            continue;
        }
        let at = Instant::now();
        answer(&ua, &m, 200);
        seen.notifies.fetch_add(1, Ordering::Relaxed);
        // A body lists every call: the ringing one is the dialog whose state is early.
        for d in m.split("<dialog ").skip(1) {
            if d.contains("<state>early</state>")
                && let Some(i) = d.find("call-id=\"ring-")
            {
                let id: String = d[i + 9..].chars().take_while(|c| *c != '"').collect();
                let sub = header(&m, "Call-ID").unwrap_or_default().to_string();
                seen.early
                    .lock()
                    .unwrap()
                    .entry(id)
                    .or_default()
                    .entry(sub)
                    .or_insert(at);
            }
        }
    }
}

/// A call from `caller` to 2001 ringing at `callee`: returns when the callee sent its 180, and
/// the INVITE it got.
fn ring(caller: &Ua, callee: &Ua, call_id: &str) -> (Instant, String) {
    invite_authorized(caller, DOMAIN, ("2002", "pw-2002"), "2001", call_id);
    let inv = expect(callee, "INVITE ");
    answer(callee, &inv, 180);
    (Instant::now(), inv)
}

/// The next response to the caller starting with `start` (100s and retransmissions skipped).
fn caller_gets(caller: &Ua, start: &str) -> String {
    loop {
        let m = caller.recv().expect("an answer for the caller");
        if m.starts_with(start) {
            return m;
        }
    }
}

/// The ringing call is refused (486); the caller ACKs it.
fn refuse(caller: &Ua, callee: &Ua, inv: &str, call_id: &str) {
    answer(callee, inv, 486);
    let _ = expect(callee, "ACK ");
    let busy = caller_gets(caller, "SIP/2.0 486");
    // The ACK of a non-2xx final: the INVITE's branch (`CALL_IDb`, its second, authorized
    // copy), so the proxy stops retransmitting the 486.
    let port = caller.port();
    caller.send(&format!(
        "ACK sip:2001@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}b;rport\r\nMax-Forwards: 70\r\nFrom: <sip:2002@{DOMAIN}>;tag=f-{call_id}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 2 ACK\r\nContent-Length: 0\r\n\r\n",
        header(&busy, "To").unwrap()
    ));
}

/// One whole call: rings, answered, ACK, BYE through the proxy (its recorded route).
fn call(caller: &Ua, callee: &Ua, call_id: &str) {
    let (_, inv) = ring(caller, callee, call_id);
    answer(callee, &inv, 200);
    let ok = caller_gets(caller, "SIP/2.0 200");
    let to = header(&ok, "To").unwrap().to_string();
    let mut route: Vec<&str> = ok
        .lines()
        .filter_map(|l| l.strip_prefix("Record-Route: "))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    route.reverse();
    let route = route.join(", ");
    let (port, dev) = (caller.port(), callee.port());
    let in_dialog = |method: &str, cseq: u32| {
        format!(
            "{method} sip:dev@127.0.0.1:{dev} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{method}{call_id};rport\r\nRoute: {route}\r\nMax-Forwards: 70\r\nFrom: <sip:2002@{DOMAIN}>;tag=f-{call_id}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    caller.send(&in_dialog("ACK", 2));
    let _ = expect(callee, "ACK ");
    caller.send(&in_dialog("BYE", 3));
    let b = expect(callee, "BYE ");
    answer(callee, &b, 200);
    caller_gets(caller, "SIP/2.0 200");
}

/// What a load phase cost.
struct Load {
    calls: usize,
    cpu_ms: f64,
    elapsed: Duration,
}

/// Whole calls to 2001 at `rate` per second for `seconds`; the server's CPU meanwhile.
fn load(caller: &Ua, callee: &Ua, pid: u32, rate: usize, seconds: u64, tag: &str) -> Load {
    let (c0, t0) = (cpu_ms(pid), Instant::now());
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut calls = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        call(caller, callee, &format!("{tag}-{calls}"));
        calls += 1;
        let next = t0 + every * calls as u32;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    Load {
        calls,
        cpu_ms: cpu_ms(pid) - c0,
        elapsed: t0.elapsed(),
    }
}

fn main() {
    let watchers = arg("--watchers", 1000).max(1);
    let sockets = arg("--sockets", 100).max(1);
    let rings = arg("--rings", 10);
    let seconds = arg("--seconds", 10) as u64;
    let rate = arg("--rate", 5);
    let server = Server::launch(
        Path::new(env!("CARGO_BIN_EXE_careflow-sip")),
        DOMAIN,
        &[("RUST_LOG", "warn")],
    );
    let pid = server.pid().unwrap();
    for u in ["2001", "2002"] {
        server.add_user(u, &format!("pw-{u}"));
    }
    let users = watchers.div_ceil(100);
    for w in 0..users {
        server.add_user(&format!("w{w}"), "pw-watcher");
    }
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let caller = Ua::new(server.sip_addr());
    // The calls alone, with nobody watching: what the NOTIFYs add is measured against this.
    let baseline = load(&caller, &callee, pid, rate, seconds, "alone");
    let socks: Vec<Ua> = (0..sockets).map(|_| Ua::new(server.sip_addr())).collect();
    let started = Instant::now();
    for i in 0..watchers {
        let ua = &socks[i % sockets];
        let me = format!("w{}", i / 100);
        let call_id = format!("sub-{i}");
        let uri = format!("sip:2001@{DOMAIN}");
        // Each socket holds many subscriptions: the NOTIFYs of the earlier ones arrive
        // between a SUBSCRIBE and its answer.
        ua.send(&subscribe(ua, &me, &call_id, 1, ""));
        let challenge = answer_skipping_notifies(ua);
        assert_eq!(status(&challenge), 407, "{challenge}");
        let auth = authorization(
            &challenge,
            Algorithm::Md5,
            &me,
            DOMAIN,
            "pw-watcher",
            "SUBSCRIBE",
            &uri,
            1,
        );
        ua.send(&subscribe(
            ua,
            &me,
            &call_id,
            2,
            &format!("Proxy-Authorization: {auth}\r\n"),
        ));
        let ok = answer_skipping_notifies(ua);
        assert_eq!(status(&ok), 200, "{ok}");
    }
    println!(
        "{watchers} subscriptions (authenticated) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = socks
        .into_iter()
        .map(|ua| {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || watch(ua, seen, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));

    let mut fanout = Vec::new();
    for r in 0..rings {
        let id = format!("ring-{r}");
        let (rang, inv) = ring(&caller, &callee, &id);
        std::thread::sleep(Duration::from_millis(600));
        refuse(&caller, &callee, &inv, &id);
        std::thread::sleep(Duration::from_millis(300));
        let early: Vec<Instant> = seen
            .early
            .lock()
            .unwrap()
            .remove(&id)
            .unwrap_or_default()
            .into_values()
            .collect();
        if early.len() < watchers {
            println!(
                "fan-out {id}: only {} of {watchers} watchers saw it ring",
                early.len()
            );
        }
        if let Some(last) = early.iter().max() {
            fanout.push(last.duration_since(rang));
        }
        if std::env::var("BENCH_DEBUG").is_ok() {
            let fast = early
                .iter()
                .filter(|t| t.duration_since(rang) < Duration::from_millis(100))
                .count();
            println!("debug {id}: {fast} of {} within 100 ms", early.len());
        }
    }
    fanout.sort();
    if let (Some(first), Some(last)) = (fanout.first(), fanout.last()) {
        println!(
            "fan-out   180 -> early NOTIFY at the last of {watchers} watchers: p50 {:.1} ms, min {:.1} ms, max {:.1} ms ({} calls)",
            fanout[fanout.len() / 2].as_secs_f64() * 1e3,
            first.as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3,
            fanout.len()
        );
    }

    std::thread::sleep(Duration::from_secs(1));
    let n0 = seen.notifies.load(Ordering::Relaxed);
    let watched = load(&caller, &callee, pid, rate, seconds, "watched");
    std::thread::sleep(Duration::from_millis(500));
    let notifies = (seen.notifies.load(Ordering::Relaxed) - n0) as f64;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let per_call = |l: &Load| l.cpu_ms / l.calls.max(1) as f64;
    println!(
        "calls     {} calls/s for {seconds} s: {:.2} ms CPU per call alone, {:.2} ms watched by {watchers}",
        rate,
        per_call(&baseline),
        per_call(&watched),
    );
    let extra = watched.cpu_ms - per_call(&baseline) * watched.calls as f64;
    println!(
        "sustained {:.0} NOTIFYs/s received ({notifies:.0} in {:.1} s); server CPU for them {:.0} ms = {:.1} ms per 1,000 NOTIFYs ({:.1} us each)",
        notifies / watched.elapsed.as_secs_f64(),
        watched.elapsed.as_secs_f64(),
        extra,
        extra / notifies.max(1.0) * 1000.0,
        extra / notifies.max(1.0) * 1000.0,
    );
    if std::env::var("BENCH_DEBUG").is_ok() {
        for l in server
            .log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(20)
        {
            println!("{l}");
        }
    }
    println!(
        "server NOTIFYs sent (metric): {}",
        server.metric("careflow_sip_notifies_sent_total")
    );
}
