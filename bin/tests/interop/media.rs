//! Calls with media anchored at a real rtpengine (Debian's rtpengine-daemon, userspace, on
//! loopback): two baresip phones talk through it, and a call whose rtpengine is absent still
//! connects with its own SDP.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use careflow_proto::bencode::Value;

use crate::calls::baresip_home_at;
use crate::support::*;

struct Rtpengine {
    child: Child,
    ng: String,
}

impl Drop for Rtpengine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    require("rtpengine", "rtpengine-daemon");
    let control = format!("127.0.0.1:{}", free_port());
    let cli = free_port();
    let base = 30000 + (std::process::id() % 200) as u16 * 100;
    let child = Command::new("rtpengine")
        // Not the system's /etc/rtpengine/rtpengine.conf: its fixed HTTP port (2225) makes a
        // second daemon fail to start.
        .arg("--config-file=none")
        .args([
            "--interface=127.0.0.1",
            "--foreground",
            "--log-stderr",
            "--table=-1",
        ])
        .arg(format!("--listen-ng={control}"))
        .arg(format!("--listen-cli=127.0.0.1:{cli}"))
        .arg(format!("--port-min={base}"))
        .arg(format!("--port-max={}", base + 99))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let r = Rtpengine { child, ng: control };
    let ping = Value::dict([("command", Value::str("ping"))]);
    for _ in 0..20 {
        if ng(&r.ng, &ping).is_some() {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("rtpengine did not start");
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
    let mut callee = Command::new("baresip")
        .args(["-f", b.to_str().unwrap(), "-t", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    let mut callee = Command::new("baresip")
        .args(["-f", b.to_str().unwrap(), "-t", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
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
    require("chromium", "chromium");
    let js = crate::websocket::js_dir();
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
    let mut desk = Command::new("baresip")
        .args(["-f", noah.to_str().unwrap(), "-t", "80"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let shots = interop_dir().join("../../../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = Command::new("node");
    node.current_dir(&js).arg("browser-phone.js").args([
        &format!("wss://127.0.0.1:{}/", server.port2),
        "sip:web1@localhost",
        "pw-web1-media",
        "sip:noah@localhost",
    ]);
    node.arg(&shots).arg("media");
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
    let q = the_call(&rtp, &server);
    browser.wait("incoming-ended", &server);
    let _ = caller.kill();
    let _ = caller.wait();
    assert!(
        received > 50 && sent > 50 && dtls == "connected",
        "browser: in {received} out {sent} dtls {dtls}; rtpengine: {:?}\n{}",
        legs(&q),
        server.log()
    );
    let l = legs(&q);
    assert_eq!(l.len(), 2, "{q:?}");
    assert_eq!(l[0].0, "RTP/AVP", "{q:?}");
    assert_eq!(l[1].0, "UDP/TLS/RTP/SAVPF", "{q:?}");
    assert!(l.iter().all(|(_, p)| *p > 50), "{l:?}");

    // The browser calls the desk phone.
    browser.wait("outgoing-confirmed", &server);
    let (received, sent, dtls) = browser_stats(&browser.wait("outgoing-stats", &server));
    let q = the_call(&rtp, &server);
    browser.wait("outgoing-ended", &server);
    browser.wait("done", &server);
    let _ = desk.kill();
    let _ = desk.wait();
    assert!(
        received > 50 && sent > 50 && dtls == "connected",
        "browser: in {received} out {sent} dtls {dtls}; rtpengine: {:?}\n{}",
        legs(&q),
        server.log()
    );
    let l = legs(&q);
    assert_eq!(l.len(), 2, "{q:?}");
    assert_eq!(l[0].0, "RTP/AVP", "{q:?}");
    assert_eq!(l[1].0, "UDP/TLS/RTP/SAVPF", "{q:?}");
    assert!(l.iter().all(|(_, p)| *p > 50), "{l:?}");
    assert_eq!(server.metric_becomes("careflow_sip_media_sessions", 0), 0);
}
