//! Benchmark (not a test): busy-lamp NOTIFYs with many watchers of one extension, over
//! loopback UDP, release build. `--watchers` subscriptions (from `--watchers / 100` watcher
//! users, spread over `--sockets` UDP sockets that answer every NOTIFY 200) watch extension
//! 2001; then
//!
//! - fan-out: `--rings` calls to 2001, one every 600 ms (beyond the 200 ms pacing): the time
//!   from the callee's 180 to the `early` NOTIFY reaching the last of the watchers;
//! - sustained: calls to 2001 back to back for `--seconds` (INVITE, 180, 200, ACK, BYE): the
//!   NOTIFYs per second the watchers receive and the server's CPU time (utime+stime from
//!   /proc) per 1,000 NOTIFYs, calls included. Pacing bounds a subscription to 5 NOTIFYs/s,
//!   so the rate here is at most 5 x watchers: the figure that matters is CPU per NOTIFY.
//!
//! `scripts/bench-blf [--watchers 1000] [--sockets 8] [--rings 10] [--seconds 10]`. Kamailio
//! builds lamps from PUBLISH through pua_dialoginfo and presence (a database round per
//! state); its set-up in ../shared/bench has no presence server to compare with.
#![allow(unreachable_pub, clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use careflow_test_support::Server;
use careflow_test_support::ua::{
    Ua, answer, expect, header, invite_authorized, send_with_proxy_auth, status,
};

const DOMAIN: &str = "bench.blf";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

/// What the watcher sockets saw: NOTIFYs in all, and per ringing call the arrival of its
/// `early` NOTIFYs.
#[derive(Default)]
struct Seen {
    notifies: AtomicU64,
    early: Mutex<std::collections::HashMap<String, Vec<Instant>>>,
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
        if m.contains("<state>early</state>")
            && let Some(i) = m.find("call-id=\"ring-")
        {
            let id: String = m[i + 9..].chars().take_while(|c| *c != '"').collect();
            seen.early.lock().unwrap().entry(id).or_default().push(at);
        }
    }
}

/// One call from `caller` to 2001 answered by `callee`: INVITE, 180, then (unless `ring_only`)
/// 200, ACK, BYE. Returns when the callee sent its 180.
fn call(caller: &Ua, callee: &Ua, call_id: &str, ring_only: bool) -> Instant {
    invite_authorized(caller, DOMAIN, ("2002", "pw-2002"), "2001", call_id);
    let inv = expect(callee, "INVITE ");
    answer(callee, &inv, 180);
    let rang = Instant::now();
    if ring_only {
        answer(callee, &inv, 486);
        let _ = expect(callee, "ACK ");
        let busy = loop {
            let m = caller.recv().expect("the caller's 486");
            if m.starts_with("SIP/2.0 486") {
                break m;
            }
        };
        // The ACK of a non-2xx final: the INVITE's branch (`CALL_IDb`, its second, authorized
        // copy), so the proxy stops retransmitting the 486.
        let port = caller.port();
        caller.send(&format!(
            "ACK sip:2001@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}b;rport\r\nMax-Forwards: 70\r\nFrom: <sip:2002@{DOMAIN}>;tag=f-{call_id}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 2 ACK\r\nContent-Length: 0\r\n\r\n",
            header(&busy, "To").unwrap()
        ));
        return rang;
    }
    answer(callee, &inv, 200);
    let ok = loop {
        let m = caller.recv().expect("the caller's 200");
        if m.starts_with("SIP/2.0 200") {
            break m;
        }
    };
    let to = header(&ok, "To").unwrap().to_string();
    let port = caller.port();
    let bye = format!(
        "BYE sip:dev@127.0.0.1:{} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKbye{call_id};rport\r\nMax-Forwards: 70\r\nFrom: <sip:2002@{DOMAIN}>;tag=f-{call_id}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n",
        callee.port()
    );
    caller.send(&bye);
    let b = expect(callee, "BYE ");
    answer(callee, &b, 200);
    let _ = caller.recv();
    rang
}

fn main() {
    let watchers = arg("--watchers", 1000).max(1);
    let sockets = arg("--sockets", 8).max(1);
    let rings = arg("--rings", 10);
    let seconds = arg("--seconds", 10) as u64;
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
    let socks: Vec<Ua> = (0..sockets).map(|_| Ua::new(server.sip_addr())).collect();
    let started = Instant::now();
    for i in 0..watchers {
        let ua = &socks[i % sockets];
        let me = format!("w{}", i / 100);
        let call_id = format!("sub-{i}");
        let uri = format!("sip:2001@{DOMAIN}");
        send_with_proxy_auth(
            ua,
            DOMAIN,
            (&me, "pw-watcher"),
            ("SUBSCRIBE", &uri),
            |n, extra| subscribe(ua, &me, &call_id, n, extra),
        );
        loop {
            let m = ua.recv().expect("an answer to the SUBSCRIBE");
            if m.starts_with("NOTIFY ") {
                answer(ua, &m, 200);
                continue;
            }
            assert_eq!(status(&m), 200, "{m}");
            break;
        }
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

    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "reg-2001", "")),
        200
    );
    let caller = Ua::new(server.sip_addr());
    let mut fanout = Vec::new();
    for r in 0..rings {
        let id = format!("ring-{r}");
        let rang = call(&caller, &callee, &id, true);
        std::thread::sleep(Duration::from_millis(600));
        let early = seen.early.lock().unwrap().remove(&id).unwrap_or_default();
        if early.len() < watchers {
            println!(
                "fan-out {id}: only {} of {watchers} watchers saw it ring",
                early.len()
            );
        }
        if let Some(last) = early.iter().max() {
            fanout.push(last.duration_since(rang));
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
    let (n0, c0, t0) = (
        seen.notifies.load(Ordering::Relaxed),
        cpu_ms(pid),
        Instant::now(),
    );
    let mut calls = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        call(&caller, &callee, &format!("load-{calls}"), false);
        calls += 1;
    }
    std::thread::sleep(Duration::from_millis(500));
    let (n1, c1, t1) = (
        seen.notifies.load(Ordering::Relaxed),
        cpu_ms(pid),
        t0.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let notifies = (n1 - n0) as f64;
    println!(
        "sustained {calls} calls in {:.1} s: {:.0} NOTIFYs/s received ({notifies:.0}), server CPU {:.0} ms = {:.1} ms per 1,000 NOTIFYs",
        t1.as_secs_f64(),
        notifies / t1.as_secs_f64(),
        c1 - c0,
        (c1 - c0) / notifies.max(1.0) * 1000.0
    );
    println!(
        "server NOTIFYs sent (metric): {}",
        server.metric("careflow_sip_notifies_sent_total")
    );
}
