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
