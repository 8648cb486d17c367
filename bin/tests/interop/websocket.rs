//! WebSocket (RFC 7118) with real peers: JsSIP, the SIP stack of CareFlow Web, running in
//! Node.js with WebRTC from @roamhq/wrtc, against sipp phones on UDP.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peers::{scenario, sipp_file};
use crate::support::*;

/// The npm packages the JavaScript peers need (installed by scripts/test with `npm ci`).
pub(crate) fn js_dir() -> PathBuf {
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
pub(crate) struct Events {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub(crate) seen: Vec<String>,
    /// Lines read but not yet taken by [`Events::take`].
    untaken: Vec<String>,
}

impl Events {
    pub(crate) fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
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
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            untaken: Vec::new(),
        }
    }

    /// Writes one line to the process's stdin.
    pub(crate) fn send(&mut self, line: &str) {
        use std::io::Write;
        if let Some(i) = self.stdin.as_mut() {
            let _ = writeln!(i, "{line}");
            let _ = i.flush();
        }
    }

    /// Waits for a line equal to `want` (or starting with it followed by a space); returns it.
    pub(crate) fn wait(&mut self, want: &str, server: &Server) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l == want || l.starts_with(&format!("{want} "));
                    self.seen.push(l.clone());
                    if hit {
                        return l;
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

impl Events {
    /// Waits for a line equal to `want` among those not taken yet, whatever came between
    /// (lines of two independent streams interleave); takes it.
    pub(crate) fn take(&mut self, want: &str, server: &Server) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.untaken.iter().position(|l| l == want) {
                self.untaken.remove(i);
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    self.untaken.push(l);
                }
                Err(_) => panic!(
                    "no `{want}` from the JavaScript peer; it said {:?}\nserver:\n{}",
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

/// The sipp UAC that calls `callee` once over UDP with a WebRTC-style offer and hangs up
/// after `hold_ms`.
pub(crate) fn sipp_call(
    server: &Server,
    users: &std::path::Path,
    callee: &str,
    hold_ms: u32,
) -> Command {
    let mut sipp = Command::new("sipp");
    sipp.arg(server.sip_addr().to_string())
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
        .args(["-m", "1", "-d", &hold_ms.to_string(), "-nostdin"])
        .args([
            "-timeout",
            "30s",
            "-timeout_error",
            "-default_behaviors",
            "-abortunexp",
        ])
        .stdout(Stdio::null());
    sipp
}

/// Calls `callee` once from a sipp UAC over UDP with a WebRTC-style offer.
pub(crate) fn sipp_calls(
    server: &Server,
    users: &std::path::Path,
    callee: &str,
    phone: &mut Events,
) {
    let out = sipp_call(server, users, callee, 1000)
        .output()
        .expect("run sipp");
    if !out.status.success() {
        phone.seen.extend(phone.lines.try_iter());
        panic!(
            "sipp's call to {callee} failed: {}\nthe web phone said {:?}\nserver:\n{}",
            String::from_utf8_lossy(&out.stderr),
            phone.seen,
            server.log()
        );
    }
}

#[test]
fn jssip_over_wss_is_called_calls_back_and_is_reachable_again_after_its_socket_drops() {
    let js = js_dir();
    web_phone_scenario(|url| {
        let mut node = Command::new("node");
        node.current_dir(&js).arg("jssip-phone.js").args([
            url,
            "sip:web1@localhost",
            "pw-web1-browser",
            "sip:desk@localhost",
        ]);
        node
    });
}

#[test]
fn a_browser_running_jssip_over_wss_is_called_calls_back_and_reconnects() {
    web_phone_scenario(|url| {
        crate::peers::browser_phone(
            url,
            "sip:web1@localhost",
            "pw-web1-browser",
            "sip:desk@localhost",
            None,
        )
    });
}

/// The CareFlow Web scenario of js/phone.js against sipp phones on UDP: `phone(url)` makes
/// the command that runs the web phone against the WSS URL.
fn web_phone_scenario(phone: impl Fn(&str) -> Command) {
    let server = Server::start_with(
        "localhost",
        &[(
            "SIP_LISTEN",
            "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},wss:127.0.0.1:{port2}",
        )],
    );
    web_phone_calls(&server, &server, phone);
}

/// The web phone registered on `web`'s WSS listener (its second port), the sipp phones on
/// `phones` (the same server, or another node of a cluster sharing its database).
pub(crate) fn web_phone_calls(web: &Server, phones: &Server, phone: impl Fn(&str) -> Command) {
    require("sipp", "sip-tester");
    phones.add_user("web1", "pw-web1-browser");
    phones.add_user("desk", "pw-desk-phone");
    phones.add_user("caller", "pw-caller-phone");
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
    crate::peers::register_contact(phones, &desk, uas_port, "udp");

    let mut phone = Events::spawn(phone(&format!("wss://{}:{}/", web.host, web.port2)));
    phone.wait("registered 1", web);
    let b = phones.bindings_of("web1");
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].contains(" wss ") && b[0].contains(".invalid"), "{b:?}");

    // A UDP phone calls the browser; the BYE reaches it over its WebSocket (flow token).
    sipp_calls(phones, &caller, "web1", &mut phone);
    phone.wait("incoming-confirmed 1", web);
    phone.wait("incoming-ended 1", web);
    // The browser calls the desk phone and hangs up.
    phone.wait("outgoing-confirmed", web);
    phone.wait("outgoing-ended", web);
    // Its socket is cut; JsSIP reconnects and registers again, and is called at once.
    phone.wait("dropped", web);
    phone.wait("registered 2", web);
    assert_eq!(phones.bindings_of("web1").len(), 1);
    sipp_calls(phones, &caller, "web1", &mut phone);
    phone.wait("incoming-confirmed 2", web);
    phone.wait("done", web);
    let _ = uas.wait();
    let answered = |s: &Server| s.metric("careflow_sip_calls_total{result=\"answered\"}");
    let total = if std::ptr::eq(web, phones) {
        answered(web)
    } else {
        answered(web) + answered(phones)
    };
    assert_eq!(total, 3);
}

/// Sends an HTTP upgrade over plain TCP and returns the status line and the stream.
pub(crate) fn upgrade(port: u16, extra: &str) -> (String, std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    (text, s)
}

/// One masked client frame.
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x80 | opcode];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame: (opcode, payload).
pub(crate) fn server_frame(s: &mut std::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut h = [0u8; 2];
    s.read_exact(&mut h).ok()?;
    let mut len = usize::from(h[1] & 0x7f);
    if len == 126 {
        let mut l = [0u8; 2];
        s.read_exact(&mut l).ok()?;
        len = usize::from(u16::from_be_bytes(l));
    }
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((h[0] & 0x0f, p))
}

#[test]
fn websocket_upgrades_are_checked_and_quiet_connections_are_pinged_then_closed() {
    use std::io::Write;
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", "udp:127.0.0.1:{port},ws:127.0.0.1:{port2}"),
            ("WS_ALLOWED_ORIGINS", "https://app.careflow.example"),
            ("WS_PING_INTERVAL", "1"),
        ],
    );
    let port = server.port2;
    let (r, _) = upgrade(
        port,
        "Origin: https://evil.example\r\nSec-WebSocket-Protocol: sip\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let (r, _) = upgrade(port, "Origin: https://app.careflow.example\r\n");
    assert!(r.starts_with("HTTP/1.1 400"), "no sip subprotocol: {r}");
    // A non-browser client (no Origin) is let in by default.
    let (r, mut s) = upgrade(port, "Sec-WebSocket-Protocol: sip\r\n");
    assert!(r.starts_with("HTTP/1.1 101"), "{r}");
    assert!(
        r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{r}"
    );
    assert!(r.contains("Sec-WebSocket-Protocol: sip\r\n"), "{r}");

    // SIP in a frame gets its answer in a text frame.
    let options = "OPTIONS sip:localhost SIP/2.0\r\nVia: SIP/2.0/WS df7jal23ls0d.invalid;branch=z9hG4bKws1\r\n\
        Max-Forwards: 70\r\nFrom: <sip:probe@localhost>;tag=w1\r\nTo: <sip:localhost>\r\n\
        Call-ID: ws-options-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    s.write_all(&client_frame(1, options.as_bytes())).unwrap();
    let (op, payload) = server_frame(&mut s).expect("answer frame");
    assert_eq!(op, 1);
    let text = String::from_utf8(payload).unwrap();
    assert!(text.starts_with("SIP/2.0 200"), "{text}");
    assert!(text.contains("received=127.0.0.1"), "{text}");
    // Our ping is answered by a pong like browsers do; then we go silent and are closed.
    let (op, payload) = server_frame(&mut s).expect("ping after a quiet second");
    assert_eq!(op, 9);
    s.write_all(&client_frame(10, &payload)).unwrap();
    let mut saw_close = false;
    while let Some((op, _)) = server_frame(&mut s) {
        if op == 8 {
            saw_close = true;
            break;
        }
        assert_eq!(op, 9, "only pings before the close");
    }
    assert!(
        saw_close,
        "a silent connection must be closed:\n{}",
        server.log()
    );
}
