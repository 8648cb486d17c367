//! WebSocket (RFC 7118) with real peers: JsSIP, the SIP stack of CareFlow Web, running in
//! Node.js with WebRTC from @roamhq/wrtc, against sipp phones on UDP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::calls::{scenario, sipp_file};
use crate::support::*;

/// The npm packages the JavaScript peers need (installed by scripts/test with `npm ci`).
fn js_dir() -> PathBuf {
    require("node", "nodejs");
    let dir = interop_dir().join("js");
    assert!(
        dir.join("node_modules/jssip").exists() && dir.join("node_modules/@roamhq/wrtc").exists(),
        "JavaScript test peers missing: run scripts/test (it runs `npm ci` in {})",
        dir.display()
    );
    dir
}

/// A child process whose stdout lines arrive on a channel.
struct Events {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Events {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line equal to `want` (or starting with it followed by a space).
    fn wait(&mut self, want: &str, server: &Server) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l == want || l.starts_with(&format!("{want} "));
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no `{want}` from the JsSIP phone; it said {:?}\nserver:\n{}",
                    self.seen,
                    server.log()
                ),
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Calls `callee` once from a sipp UAC over UDP with a WebRTC-style offer.
fn sipp_calls(server: &Server, users: &std::path::Path, callee: &str) {
    let out = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &scenario("uac-call-webrtc.xml"), "-inf"])
        .arg(users)
        .args(["-key", "domain", &server.domain, "-key", "callee", callee])
        .args(["-auth_uri", &format!("{callee}@{}", server.domain)])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-d", "1000", "-nostdin", "-timeout", "30s"])
        .args(["-timeout_error", "-default_behaviors", "-abortunexp"])
        .stdout(Stdio::null())
        .output()
        .expect("run sipp");
    assert!(
        out.status.success(),
        "sipp's call to {callee} failed: {}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

#[test]
fn jssip_over_wss_is_called_calls_back_and_is_reachable_again_after_its_socket_drops() {
    require("sipp", "sip-tester");
    let js = js_dir();
    let server = Server::start_with(
        "localhost",
        &[(
            "SIP_LISTEN",
            "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},wss:127.0.0.1:{port2}",
        )],
    );
    server.add_user("web1", "pw-web1-browser");
    server.add_user("desk", "pw-desk-phone");
    server.add_user("caller", "pw-caller-phone");
    let tmp = tempfile::tempdir().unwrap();
    let caller = sipp_file(tmp.path(), "caller.csv", &[("caller", "pw-caller-phone")]);
    let desk = sipp_file(tmp.path(), "desk.csv", &[("desk", "pw-desk-phone")]);

    // The desk phone: a sipp UAS on UDP that answers with a WebRTC-style SDP.
    let uas_port = free_port();
    let mut uas = Command::new("sipp")
        .args(["-sf", &scenario("uas-webrtc.xml"), "-i", "127.0.0.1"])
        .args(["-p", &uas_port.to_string(), "-t", "u1", "-m", "1"])
        .args(["-nostdin", "-timeout", "90s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sipp uas");
    let reg = Command::new("sipp")
        .arg(server.sip_addr().to_string())
        .args(["-sf", &scenario("register-one.xml"), "-inf"])
        .arg(&desk)
        .args([
            "-key",
            "domain",
            "localhost",
            "-key",
            "contact_host",
            "127.0.0.1",
        ])
        .args(["-key", "contact_port", &uas_port.to_string()])
        .args(["-key", "contact_transport", "udp", "-auth_uri", "localhost"])
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &free_port().to_string(),
            "-t",
            "u1",
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "15s", "-timeout_error"])
        .stdout(Stdio::null())
        .output()
        .expect("run sipp register");
    assert!(
        reg.status.success(),
        "desk registration failed:\n{}",
        server.log()
    );

    let mut node = Command::new("node");
    node.current_dir(&js).arg("jssip-phone.js").args([
        &format!("wss://127.0.0.1:{}/", server.port2),
        "sip:web1@localhost",
        "pw-web1-browser",
        "sip:desk@localhost",
    ]);
    let mut phone = Events::spawn(node);
    phone.wait("registered 1", &server);
    let b = server.bindings_of("web1");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains(" wss ") && b[0].contains(".invalid"), "{b:?}");

    // A UDP phone calls the browser; the BYE reaches it over its WebSocket (flow token).
    sipp_calls(&server, &caller, "web1");
    phone.wait("incoming-confirmed 1", &server);
    phone.wait("incoming-ended 1", &server);
    // The browser calls the desk phone and hangs up.
    phone.wait("outgoing-confirmed", &server);
    phone.wait("outgoing-ended", &server);
    // Its socket is cut; JsSIP reconnects and registers again, and is called at once.
    phone.wait("dropped", &server);
    phone.wait("registered 2", &server);
    assert_eq!(server.bindings_of("web1").len(), 1);
    sipp_calls(&server, &caller, "web1");
    phone.wait("incoming-confirmed 2", &server);
    phone.wait("done", &server);
    let _ = uas.wait();
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"answered\"}"),
        3
    );
}
