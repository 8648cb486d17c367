//! TLS and connection-bound bindings with real peers: sipsak and baresip over TLS, OpenSSL's
//! `s_client` watching a certificate change on disk, raw TCP clients whose bindings end with
//! their connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::peers::baresip_home_at;
use crate::support::*;

const TLS_LISTEN: &str = "udp:127.0.0.1:{port},tcp:127.0.0.1:{port},tls:127.0.0.1:{port2}";

/// A certificate and key made by OpenSSL for localhost and 127.0.0.1.
fn openssl_pair(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    require("openssl", "openssl");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A CA and a server certificate it signed for 127.0.0.1: (CA cert, cert, key).
fn openssl_ca_and_leaf(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    require("openssl", "openssl");
    let ext = dir.join("leaf.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let d = dir.display();
    sh_ok(&format!(
        "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -days 2 -subj /CN=careflow-test-ca -keyout ca.key -out ca.crt 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -subj /CN=gateway -keyout leaf.key -out leaf.csr 2>/dev/null && \
         openssl x509 -req -in leaf.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
         -extfile leaf.ext -out leaf.crt 2>/dev/null"
    ));
    (
        dir.join("ca.crt"),
        dir.join("leaf.crt"),
        dir.join("leaf.key"),
    )
}

pub(crate) fn sh_ok(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SHA-256 fingerprint (`AA:BB:...`) of the certificate a TLS server presents now.
fn served_fingerprint(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername localhost </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn file_fingerprint(cert: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// An `openssl s_client` session: SIP written to its stdin goes over one TLS connection.
struct TlsSession {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl TlsSession {
    fn open(port: u16) -> Self {
        let mut child = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-servername", "localhost", "-quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Sends an OPTIONS and returns its status line.
    fn options(&mut self, server: &Server, n: u32) -> String {
        let msg = format!(
            "OPTIONS sip:{d} SIP/2.0\r\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKtls{n}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:probe@{d}>;tag=t{n}\r\nTo: <sip:{d}>\r\n\
             Call-ID: tls-options-{n}\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n",
            d = server.domain
        );
        self.stdin.write_all(msg.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.starts_with("SIP/2.0 ") {
                return line;
            }
        }
        panic!("no answer over the TLS session:\n{}", server.log());
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn default_tls_uses_a_generated_certificate_and_sipsak_registers_over_it() {
    require("sipsak", "sipsak");
    let server = Server::start_with("localhost", &[("SIP_LISTEN", TLS_LISTEN)]);
    let cert = server.data_dir().join("tls-selfsigned.crt");
    assert!(cert.exists(), "no certificate generated:\n{}", server.log());
    let fp = file_fingerprint(&cert);
    assert_eq!(served_fingerprint(server.port2), fp);
    assert!(server.log().contains(&fp), "fingerprint not logged");
    server.add_user("tina", "pw-tina-tls");
    let out = Command::new("sipsak")
        .args(["-U", "-i", "-x", "300", "--transport=tls"])
        .arg(format!("--tls-ca-cert={}", cert.display()))
        .arg("--tls-ignore-cert-failure")
        .args(["-C", "sip:tina@127.0.0.1:5999"])
        .args(["-s", "sip:tina@localhost"])
        .args(["-u", "tina", "-a", "pw-tina-tls"])
        .args(["-p", &format!("127.0.0.1:{}", server.port2)])
        .output()
        .expect("run sipsak");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sipsak over TLS failed:\n{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(server.log().contains("transport=tls"), "{}", server.log());
}

#[test]
fn a_certificate_replaced_on_disk_is_served_to_new_connections_while_old_ones_keep_going() {
    let tmp = tempfile::tempdir().unwrap();
    let (first_cert, first_key) = openssl_pair(tmp.path(), "first");
    let (second_cert, second_key) = openssl_pair(tmp.path(), "second");
    let cert = tmp.path().join("live.crt");
    let key = tmp.path().join("live.key");
    std::fs::copy(&first_cert, &cert).unwrap();
    std::fs::copy(&first_key, &key).unwrap();
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", TLS_LISTEN),
            ("TLS_CERT", cert.to_str().unwrap()),
            ("TLS_KEY", key.to_str().unwrap()),
        ],
    );
    assert_eq!(
        served_fingerprint(server.port2),
        file_fingerprint(&first_cert)
    );
    let mut session = TlsSession::open(server.port2);
    assert!(session.options(&server, 1).starts_with("SIP/2.0 200"));

    // Renewal: the key first, then the certificate, as certbot's deploy does.
    std::fs::copy(&second_key, &key).unwrap();
    std::fs::copy(&second_cert, &cert).unwrap();
    let want = file_fingerprint(&second_cert);
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_fingerprint(server.port2) != want {
        assert!(
            Instant::now() < deadline,
            "new certificate not served:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(session.options(&server, 2).starts_with("SIP/2.0 200"));

    // SIGHUP reloads too (back to the first certificate).
    std::fs::copy(&first_key, &key).unwrap();
    std::fs::copy(&first_cert, &cert).unwrap();
    server.signal("HUP");
    let want = file_fingerprint(&first_cert);
    let deadline = Instant::now() + Duration::from_secs(15);
    while served_fingerprint(server.port2) != want {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(session.options(&server, 3).starts_with("SIP/2.0 200"));
    assert!(server.log().contains("TLS certificate reloaded"));
}

#[test]
fn a_broken_certificate_file_is_named_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let port = free_port();
    let out = Command::new(BIN)
        .env_clear()
        .env("SIP_LISTEN", format!("tls:127.0.0.1:{port}"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("DATA_DIR", tmp.path().join("data"))
        .env("TLS_CERT", &bad)
        .env("TLS_KEY", &bad)
        .arg("serve")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.pem") && err.contains("TLS_CERT"),
        "{err}"
    );
}

/// Reads one SIP message from a stream (Content-Length framing), within `timeout`.
pub(crate) fn read_message(s: &mut TcpStream, timeout: Duration) -> Option<String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
        if buf == b"\r\n" {
            buf.clear();
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len: usize = header(&head, "Content-Length")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some(head + &String::from_utf8_lossy(&body))
}

/// Registers `user` over a fresh TCP connection with a contact nobody could dial (the
/// connection is the only way to reach it).
fn tcp_device(server: &Server, user: &str, password: &str, call_id: &str) -> TcpStream {
    tcp_device_with(server, user, password, call_id, "")
}

/// [`tcp_device`] with more Contact URI parameters (`;name=value` each).
pub(crate) fn tcp_device_with(
    server: &Server,
    user: &str,
    password: &str,
    call_id: &str,
    uri_params: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(server.sip_addr()).unwrap();
    let local = s.local_addr().unwrap();
    let reg = |cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:{d} SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bK{call_id}{cseq}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:{user}@{d}>;tag=r{cseq}\r\nTo: <sip:{user}@{d}>\r\n\
             Call-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@dev-{call_id}.invalid;transport=tcp{uri_params}>\r\nExpires: 600\r\n\
             {auth}Content-Length: 0\r\n\r\n",
            d = server.domain
        )
    };
    s.write_all(reg(1, "").as_bytes()).unwrap();
    let challenge = read_message(&mut s, Duration::from_secs(5)).expect("401");
    assert_eq!(status(&challenge), 401, "{challenge}");
    let auth = authorization(
        &challenge,
        careflow_proto::digest::Algorithm::Md5,
        user,
        &server.domain,
        password,
        "REGISTER",
        &format!("sip:{}", server.domain),
        1,
    );
    s.write_all(reg(2, &format!("Authorization: {auth}\r\n")).as_bytes())
        .unwrap();
    let ok = read_message(&mut s, Duration::from_secs(5)).expect("200");
    assert_eq!(status(&ok), 200, "{ok}");
    s
}

#[test]
fn a_tcp_binding_ends_with_its_connection_and_a_reconnected_device_is_reachable_at_once() {
    let server = Server::start("flows.test");
    server.add_user("alice", "pw-alice");
    server.add_user("bob", "pw-bob");
    let first = tcp_device(&server, "bob", "pw-bob", "flow-a");
    assert_eq!(server.bindings_of("bob").len(), 1);
    drop(first);
    assert_eq!(
        server.metric_becomes("careflow_sip_active_bindings", 0),
        0,
        "binding survived its connection:\n{}",
        server.log()
    );
    // The device comes back on a new connection and is called over it straight away, although
    // its Contact (an .invalid host) cannot be dialled.
    let mut second = tcp_device(&server, "bob", "pw-bob", "flow-b");
    let caller = Ua::new(server.sip_addr());
    let call = |cseq: u32, auth: &str| {
        format!(
            "INVITE sip:bob@flows.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKfc{cseq};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@flows.test>;tag=fa\r\nTo: <sip:bob@flows.test>\r\n\
             Call-ID: flow-call\r\nCSeq: {cseq} INVITE\r\nContact: <sip:alice@127.0.0.1:{p}>\r\n\
             {auth}Content-Length: 0\r\n\r\n",
            p = caller.port()
        )
    };
    let r = caller.request(&call(1, ""));
    assert_eq!(status(&r), 407, "{r}");
    let auth = authorization(
        &r,
        careflow_proto::digest::Algorithm::Md5,
        "alice",
        "flows.test",
        "pw-alice",
        "INVITE",
        "sip:bob@flows.test",
        1,
    );
    caller.send(&call(2, &format!("Proxy-Authorization: {auth}\r\n")));
    let inv = read_message(&mut second, Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "INVITE not delivered over the new connection:\n{}",
            server.log()
        )
    });
    assert!(
        inv.starts_with("INVITE sip:bob@dev-flow-b.invalid"),
        "{inv}"
    );
    // Our Record-Route towards bob carries a flow token, so in-dialog requests find him too.
    let rr = header(&inv, "Record-Route").unwrap();
    assert!(rr.contains('@'), "{rr}");
    assert_eq!(
        server.metric_becomes("careflow_sip_flow_bindings_dropped_total", 1),
        1
    );
}

fn wait_for_binding(server: &Server, user: &str) {
    for _ in 0..100 {
        if !server.bindings_of(user).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{user} did not register:\n{}", server.log());
}

#[test]
fn baresip_over_tls_is_called_over_its_own_connection_and_calls_a_udp_phone() {
    require("baresip", "baresip");
    let server = Server::start_with("localhost", &[("SIP_LISTEN", TLS_LISTEN)]);
    server.add_user("tls-anna", "pw-anna-tls");
    server.add_user("udp-ben", "pw-ben-udp");
    let cafile = server.data_dir().join("tls-selfsigned.crt");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("anna"), tmp.path().join("ben"));
    let tls_port = server.port2;
    baresip_home_at(
        &a,
        "<sip:tls-anna@localhost;transport=tls>",
        "pw-anna-tls",
        &format!("sip:127.0.0.1:{tls_port};transport=tls"),
        ";answermode=auto",
        &format!("sip_cafile {}\n", cafile.display()),
    );
    baresip_home_at(
        &b,
        "<sip:udp-ben@localhost>",
        "pw-ben-udp",
        &format!("sip:127.0.0.1:{}", server.port),
        ";answermode=auto",
        "",
    );
    // anna (TLS) stays up and answers; ben (UDP) calls her, then she is called over the
    // connection she registered on, the only way to reach her.
    let mut anna = Command::new("baresip")
        .args(["-f", a.to_str().unwrap(), "-t", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start baresip");
    wait_for_binding(&server, "tls-anna");
    let bindings = server.bindings_of("tls-anna");
    assert!(bindings[0].contains(" tls "), "{bindings:?}");
    let ben = Command::new("baresip")
        .args(["-f", b.to_str().unwrap()])
        .args(["-e", "/dial sip:tls-anna@localhost", "-t", "5"])
        .stdin(Stdio::null())
        .output()
        .expect("run baresip");
    let _ = anna.kill();
    let _ = anna.wait();
    let out =
        String::from_utf8_lossy(&ben.stdout).into_owned() + &String::from_utf8_lossy(&ben.stderr);
    assert!(
        out.contains("Call established"),
        "the TLS phone did not answer:\n{out}\nserver:\n{}",
        server.log()
    );
    // And the other way: a TLS phone calls the UDP one.
    let mut ben = Command::new("baresip")
        .args(["-f", b.to_str().unwrap(), "-t", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start baresip");
    wait_for_binding(&server, "udp-ben");
    let anna = Command::new("baresip")
        .args(["-f", a.to_str().unwrap()])
        .args(["-e", "/dial sip:udp-ben@localhost", "-t", "5"])
        .stdin(Stdio::null())
        .output()
        .expect("run baresip");
    let _ = ben.kill();
    let _ = ben.wait();
    let out =
        String::from_utf8_lossy(&anna.stdout).into_owned() + &String::from_utf8_lossy(&anna.stderr);
    assert!(
        out.contains("Call established"),
        "the UDP phone did not answer the TLS one:\n{out}\nserver:\n{}",
        server.log()
    );
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"answered\"}"),
        2
    );
    assert!(server.metric("careflow_sip_requests_total{method=\"BYE\"}") >= 2);
}

/// alice calls carol@elsewhere.test (another domain, so through OUTBOUND_GATEWAY), answering
/// the proxy's challenge; returns her phone.
fn call_out(server: &Server) -> Ua {
    let ua = Ua::new(server.sip_addr());
    let port = ua.port();
    let d = &server.domain;
    let build = |cseq: u32, auth: &str| {
        format!(
            "INVITE sip:carol@elsewhere.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKgw{cseq};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:alice@{d}>;tag=gwa\r\nTo: <sip:carol@elsewhere.test>\r\n\
             Call-ID: gw-tls-{port}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:alice@127.0.0.1:{port}>\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    };
    let r = ua.request(&build(1, ""));
    assert_eq!(status(&r), 407, "{r}");
    let auth = authorization(
        &r,
        careflow_proto::digest::Algorithm::Md5,
        "alice",
        d,
        "pw-alice",
        "INVITE",
        "sip:carol@elsewhere.test",
        1,
    );
    ua.send(&build(2, &format!("Proxy-Authorization: {auth}\r\n")));
    ua
}

/// The first final response a phone receives.
fn final_response(ua: &Ua) -> Option<String> {
    ua.sock
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    while let Some(m) = ua.recv() {
        if status(&m) >= 200 {
            return Some(m);
        }
    }
    None
}

#[test]
fn calls_to_a_tls_gateway_go_over_a_verified_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = openssl_ca_and_leaf(tmp.path());
    let gw_port = free_port();
    let mut gw = Command::new("openssl")
        .args(["s_server", "-accept", &gw_port.to_string(), "-quiet"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let out = gw.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(("127.0.0.1", gw_port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let gateway = format!("sip:127.0.0.1:{gw_port};transport=tls");

    // Without the gateway's CA its certificate is not trusted: the call fails at once.
    let untrusting = Server::start_with("tls-gw.test", &[("OUTBOUND_GATEWAY", &gateway)]);
    untrusting.add_user("alice", "pw-alice");
    // (The branch's 503 reaches the caller as 500, RFC 3261 §16.7 step 6.)
    let r = final_response(&call_out(&untrusting)).expect("an answer");
    assert_eq!(status(&r), 500, "{r}");
    assert!(
        untrusting.log().contains("TLS connection refused"),
        "{}",
        untrusting.log()
    );
    drop(untrusting);

    let server = Server::start_with(
        "tls-gw.test",
        &[
            ("OUTBOUND_GATEWAY", &gateway),
            ("TLS_CA_FILE", ca.to_str().unwrap()),
        ],
    );
    server.add_user("alice", "pw-alice");
    let _alice = call_out(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.starts_with("INVITE sip:carol@elsewhere.test SIP/2.0") => break,
            Ok(l) => seen.push(l),
            Err(_) => panic!("no INVITE at the TLS gateway ({seen:?}):\n{}", server.log()),
        }
    }
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn client_certificates_are_required_when_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = openssl_ca_and_leaf(tmp.path());
    let server = Server::start_with(
        "localhost",
        &[
            ("SIP_LISTEN", TLS_LISTEN),
            ("TLS_CLIENT_CA", ca.to_str().unwrap()),
            ("TLS_REQUIRE_CLIENT_CERT", "true"),
        ],
    );
    let options = |extra: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf 'OPTIONS sip:localhost SIP/2.0\\r\\nVia: SIP/2.0/TLS 127.0.0.1:5999;branch=z9hG4bKcc\\r\\n\
                 Max-Forwards: 70\\r\\nFrom: <sip:p@localhost>;tag=1\\r\\nTo: <sip:localhost>\\r\\n\
                 Call-ID: cc\\r\\nCSeq: 1 OPTIONS\\r\\nContent-Length: 0\\r\\n\\r\\n' | \
                 timeout 5 openssl s_client -connect 127.0.0.1:{} -quiet {extra} 2>/dev/null",
                server.port2
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let without = options("");
    assert!(!without.contains("SIP/2.0 200"), "{without}");
    let with = options(&format!("-cert {} -key {}", cert.display(), key.display()));
    assert!(with.starts_with("SIP/2.0 200"), "{with}\n{}", server.log());
}

/// stunnel in client mode: plain TCP on a local port becomes TLS to `tls_port`. Debian's sipp
/// has no TLS of its own, so this is how sipp scenarios run over TLS here.
struct Stunnel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Stunnel {
    fn to(tls_port: u16) -> Self {
        require("stunnel4", "stunnel4");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[sip-tls]\nclient = yes\naccept = 127.0.0.1:{port}\n\
                 connect = 127.0.0.1:{tls_port}\nverifyChain = no\n"
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "stunnel did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sipp_registers_and_calls_over_tls() {
    use crate::peers::{scenario, sipp_file};
    require("sipp", "sip-tester");
    let server = Server::start_with("localhost", &[("SIP_LISTEN", TLS_LISTEN)]);
    let tmp = tempfile::tempdir().unwrap();
    let (import, inf) = crate::register::sipp_users(tmp.path(), 100);
    server.cli_ok(&["user", "import", import.to_str().unwrap()]);
    let tunnel = Stunnel::to(server.port2);
    let sipp = |args: &[&str]| {
        let out = Command::new("sipp")
            .arg(format!("127.0.0.1:{}", tunnel.port))
            .args(args)
            .args([
                "-i",
                "127.0.0.1",
                "-p",
                &free_port().to_string(),
                "-t",
                "t1",
            ])
            .args(["-nostdin", "-timeout", "60s", "-timeout_error"])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sipp over TLS failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.log()
        );
    };
    sipp(&[
        "-sf",
        &scenario("register-auth.xml"),
        "-inf",
        inf.to_str().unwrap(),
        "-key",
        "domain",
        "localhost",
        "-auth_uri",
        "localhost",
        "-m",
        "100",
        "-r",
        "100",
        "-default_behaviors",
        "-bye",
    ]);
    assert_eq!(server.metric("careflow_sip_registrations_total"), 100);
    assert!(server.log().contains("transport=tls"));

    // Calls from a TLS caller to a UDP callee.
    server.add_user("caller", "pw-caller");
    server.add_user("callee", "pw-callee");
    let caller = sipp_file(tmp.path(), "caller.csv", &[("caller", "pw-caller")]);
    let callee = sipp_file(tmp.path(), "callee.csv", &[("callee", "pw-callee")]);
    let uas_port = free_port();
    let mut uas = Command::new("sipp")
        .args(["-sf", &scenario("uas.xml"), "-i", "127.0.0.1"])
        .args([
            "-p",
            &uas_port.to_string(),
            "-t",
            "u1",
            "-nostdin",
            "-timeout",
            "60s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::peers::register_contact(&server, &callee, uas_port, "udp");
    sipp(&[
        "-sf",
        &scenario("uac-call.xml"),
        "-inf",
        caller.to_str().unwrap(),
        "-key",
        "domain",
        "localhost",
        "-key",
        "callee",
        "callee",
        "-auth_uri",
        "callee@localhost",
        "-m",
        "20",
        "-r",
        "20",
        "-d",
        "100",
        "-default_behaviors",
        "-abortunexp",
    ]);
    let _ = uas.kill();
    let _ = uas.wait();
    assert_eq!(
        server.metric("careflow_sip_calls_total{result=\"answered\"}"),
        20
    );
}
