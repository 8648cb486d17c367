//! Live events (issue 20): signed webhooks to a receiver in the test (a retry after it answers
//! 500, a dead letter when it never accepts) and the administrators' server-sent event stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::support::*;

const DOMAIN: &str = "events.test";
const SECRET: &str = "webhook-secret-for-the-test-0123456789";

/// One POST the receiver got: its headers (lower-case names) and body.
struct Delivery {
    headers: Vec<(String, String)>,
    body: String,
}

impl Delivery {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A webhook receiver answering the statuses of `answers` in turn (then 200).
fn receiver(answers: Vec<u16>) -> (u16, mpsc::Receiver<Delivery>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut answers = answers.into_iter();
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((n, v)) = l.split_once(':') {
                    headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).unwrap();
            let status = answers.next().unwrap_or(200);
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = tx.send(Delivery {
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
    });
    (port, rx)
}

/// Checks `d`'s signature as a receiver would: HMAC-SHA256 of "t.body" with the secret.
fn signed_by_the_secret(d: &Delivery) -> bool {
    let sig = d.header("x-careflow-signature");
    let Some((t, v1)) = sig
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
    else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", d.body).as_bytes());
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    want == v1
}

fn webhook_server(port: u16, extra: &[(&str, &str)]) -> Server {
    let url = format!("http://127.0.0.1:{port}/careflow/sip-events");
    let mut env = vec![
        ("WEBHOOK_URL", url.as_str()),
        ("WEBHOOK_SECRET", SECRET),
        ("WEBHOOK_EVENTS", "device.registered"),
    ];
    env.extend_from_slice(extra);
    let server = Server::start_with(DOMAIN, &env);
    server.add_user("2001", "pw-2001");
    server
}

#[test]
fn a_registration_reaches_the_webhook_signed_and_is_retried_after_a_500() {
    let (port, deliveries) = receiver(vec![500]);
    let server = webhook_server(port, &[]);
    let ua = Ua::new(server.sip_addr());
    assert_eq!(
        status(&ua.register("2001", "pw-2001", DOMAIN, "wh-1", "")),
        200
    );
    let first = deliveries
        .recv_timeout(Duration::from_secs(10))
        .expect("a delivery");
    let again = deliveries
        .recv_timeout(Duration::from_secs(10))
        .expect("a retry after the 500");
    for d in [&first, &again] {
        assert!(signed_by_the_secret(d), "{:?} {}", d.headers, d.body);
        assert_eq!(d.header("x-careflow-event"), "device.registered");
        assert_eq!(d.header("content-type"), "application/json");
    }
    assert_eq!(first.body, again.body, "the same event, retried");
    assert_eq!(
        first.header("x-careflow-event-id"),
        again.header("x-careflow-event-id")
    );
    let ev: serde_json::Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(ev["type"], "device.registered");
    assert_eq!(ev["user"], format!("2001@{DOMAIN}"));
    assert_eq!(ev["detail"]["transport"], "udp");
    assert!(!first.body.contains("pw-2001") && !first.body.contains(SECRET));
    assert_eq!(
        server.metric_becomes("careflow_sip_webhooks_delivered_total", 1),
        1
    );
    assert_eq!(server.metric("careflow_sip_webhook_retries_total"), 1);
    assert_eq!(server.metric("careflow_sip_webhook_dead_letters_total"), 0);
    // A refresh is no new device: nothing more is sent.
    assert_eq!(
        status(&ua.register("2001", "pw-2001", DOMAIN, "wh-1", "")),
        200
    );
    assert!(deliveries.recv_timeout(Duration::from_millis(800)).is_err());
    assert!(!server.log().contains(SECRET), "the secret is never logged");
}

#[test]
fn an_event_the_receiver_never_accepts_is_a_dead_letter() {
    let (port, deliveries) = receiver(vec![503, 503, 503]);
    let server = webhook_server(port, &[("WEBHOOK_MAX_ATTEMPTS", "2")]);
    let ua = Ua::new(server.sip_addr());
    assert_eq!(
        status(&ua.register("2001", "pw-2001", DOMAIN, "wh-2", "")),
        200
    );
    deliveries.recv_timeout(Duration::from_secs(10)).unwrap();
    deliveries.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        server.metric_becomes("careflow_sip_webhook_dead_letters_total", 1),
        1
    );
    assert!(
        deliveries
            .recv_timeout(Duration::from_millis(1500))
            .is_err(),
        "two attempts only"
    );
    assert_eq!(server.metric("careflow_sip_webhooks_delivered_total"), 0);
}

#[test]
fn a_bad_webhook_configuration_names_the_key() {
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .env("WEBHOOK_URL", "ftp://careflow.example/hook")
        .env("WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("WEBHOOK_URL"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .env("WEBHOOK_URL", "https://careflow.example/hook")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("WEBHOOK_SECRET"),
        "{err}"
    );
}

/// Reads server-sent events from `s` until one named `name`; its data.
fn next_event(r: &mut BufReader<TcpStream>, name: &str) -> String {
    let mut current = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended");
        let l = line.trim_end();
        if let Some(n) = l.strip_prefix("event: ") {
            current = n.to_string();
        } else if let Some(d) = l.strip_prefix("data: ")
            && current == name
        {
            return d.to_string();
        }
    }
}

#[test]
fn administrators_see_registrations_and_missed_calls_as_server_sent_events() {
    let server = Server::start(DOMAIN);
    server.add_user("2001", "pw-2001");
    server.add_user("2002", "pw-2002");
    let out = server.cli_ok(&["apikey", "create", "events"]);
    let key = out.lines().last().unwrap().trim().to_string();
    let mut s = TcpStream::connect(("127.0.0.1", server.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/admin/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Subscribed before the first event: wait for the headers to end.
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
        assert!(
            !line.to_ascii_lowercase().starts_with("content-type:")
                || line.contains("text/event-stream"),
            "{line}"
        );
    }
    let callee = Ua::new(server.sip_addr());
    assert_eq!(
        status(&callee.register("2001", "pw-2001", DOMAIN, "ev-1", "")),
        200
    );
    let data = next_event(&mut r, "device.registered");
    assert!(
        data.contains(&format!("\"user\":\"2001@{DOMAIN}\"")),
        "{data}"
    );
    // A call nobody answers.
    let caller = Ua::new(server.sip_addr());
    invite_authorized(&caller, DOMAIN, ("2002", "pw-2002"), "2001", "ev-missed");
    let inv = expect(&callee, "INVITE ");
    answer(&callee, &inv, 486);
    let data = next_event(&mut r, "call.missed");
    assert!(
        data.contains("\"callId\":\"ev-missed\"") && data.contains("\"disposition\":\"busy\""),
        "{data}"
    );
}

/// An administrator's event stream on node A of a cluster sees a phone register on node B
/// (events cross over Redis), and a webhook gets that event once, from the node it happened
/// on.
#[test]
fn an_event_stream_on_one_node_sees_what_happens_on_another() {
    let redis = crate::push::OwnRedis::start();
    let db = TestDb::postgres();
    let (port, deliveries) = receiver(vec![]);
    let url = format!("http://127.0.0.1:{port}/careflow/sip-events");
    let node = || {
        Server::start_with(
            DOMAIN,
            &[
                ("DB_URL", db.url.as_str()),
                ("REDIS_URL", redis.url.as_str()),
                (
                    "NONCE_SECRET",
                    "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed",
                ),
                ("WEBHOOK_URL", url.as_str()),
                ("WEBHOOK_SECRET", SECRET),
                ("WEBHOOK_EVENTS", "device.registered"),
            ],
        )
    };
    let (a, b) = (node(), node());
    a.add_user("2001", "pw-2001");
    let out = a.cli_ok(&["apikey", "create", "events"]);
    let key = out.lines().last().unwrap().trim().to_string();
    let mut s = TcpStream::connect(("127.0.0.1", a.http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /api/admin/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim_end().is_empty() {
            break;
        }
    }
    // Both nodes listen on the bus before the phone registers.
    std::thread::sleep(Duration::from_millis(500));
    let phone = Ua::new(b.sip_addr());
    assert_eq!(
        status(&phone.register("2001", "pw-2001", DOMAIN, "x-1", "")),
        200
    );
    let data = next_event(&mut r, "device.registered");
    assert!(
        data.contains(&format!("\"user\":\"2001@{DOMAIN}\"")),
        "{data}"
    );
    deliveries
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook delivery");
    assert!(
        deliveries.recv_timeout(Duration::from_secs(2)).is_err(),
        "one delivery for one event, not one per node"
    );
}
