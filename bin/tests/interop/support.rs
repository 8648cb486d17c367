//! Starts the real `careflow-sip` binary on free loopback ports with its own data directory,
//! and speaks raw SIP to it. Tools the tests need must be installed (scripts/test does it);
//! a missing tool fails the test loudly instead of skipping it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use careflow_proto::digest::{Algorithm, Credentials, expected_response, ha1};

pub const BIN: &str = env!("CARGO_BIN_EXE_careflow-sip");

pub use careflow_test_support::{Rtpengine, TestDb, free_port, require};

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub http: u16,
    /// Two more free ports for extra listeners: "{port2}" and "{port3}" in the environment.
    pub port2: u16,
    pub port3: u16,
    pub domain: String,
    dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
}

impl Server {
    pub fn start(domain: &str) -> Self {
        Self::start_with(domain, &[])
    }

    pub fn start_with(domain: &str, env: &[(&str, &str)]) -> Self {
        let mut s = Self {
            child: None,
            port: free_port(),
            http: free_port(),
            port2: free_port(),
            port3: free_port(),
            domain: domain.to_string(),
            dir: tempfile::tempdir().unwrap(),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn();
        s
    }

    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the log says `what` within ten seconds.
    pub fn log_shows(&self, what: &str) -> bool {
        for _ in 0..200 {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SIP_DOMAIN", &self.domain)
            .env(
                "SIP_LISTEN",
                format!("udp:127.0.0.1:{0},tcp:127.0.0.1:{0}", self.port),
            )
            .env("HTTP_LISTEN", format!("127.0.0.1:{}", self.http))
            .env("DATA_DIR", self.data_dir())
            // The test clients all send from 127.0.0.1, often hundreds of messages a second;
            // the flood and brute-force tests use other loopback addresses.
            .env("SECURITY_ALLOWLIST", "127.0.0.1")
            // Tests that stop a server with a call still ringing should not wait 30 s.
            .env("SHUTDOWN_GRACE", "2")
            .env("RUST_LOG", "info");
        for (k, v) in &self.extra_env {
            // "{port}" stands for the server's own SIP port (e.g. in a custom SIP_LISTEN).
            c.env(
                k,
                v.replace("{port}", &self.port.to_string())
                    .replace("{port2}", &self.port2.to_string())
                    .replace("{port3}", &self.port3.to_string()),
            );
        }
        c
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start careflow-sip");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self
                .http_get("/healthz")
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("careflow-sip exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("careflow-sip did not become healthy:\n{}", self.log());
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. "HUP") to the running server.
    pub fn signal(&self, name: &str) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .arg(format!("-{name}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Kills the server with SIGKILL (a crash).
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Runs a CLI subcommand with the server's configuration.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("run careflow-sip")
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "careflow-sip {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.cli_ok(&["user", "add", user, "--password", password]);
    }

    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get_at(self.http, path).map(|(code, _, body)| (code, body))
    }

    /// Polls a metric until it has the value (up to 10 s); returns the last value seen.
    pub fn metric_becomes(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(name);
            if v == want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.http_get("/metrics").expect("metrics");
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
    }

    /// `careflow-sip registrations USER` lines for that user.
    pub fn bindings_of(&self, user: &str) -> Vec<String> {
        let out = self.cli_ok(&["registrations", user]);
        out.lines()
            .filter(|l| l.starts_with(&format!("{user}@")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A GET on 127.0.0.1:`port`: (status, head, body); None when nothing answers.
pub fn http_get_at(port: u16, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    Some((code, head.to_string(), body.to_string()))
}

/// A tiny UDP user agent for precise protocol checks.
pub struct Ua {
    pub sock: UdpSocket,
    pub server: SocketAddr,
}

impl Ua {
    pub fn new(server: SocketAddr) -> Self {
        Self::from_ip(server, "127.0.0.1")
    }

    /// A UA sending from another loopback address (127.0.0.0/8 is all local).
    pub fn from_ip(server: SocketAddr, ip: &str) -> Self {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Self { sock, server }
    }

    pub fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    pub fn send(&self, msg: &str) {
        self.sock.send_to(msg.as_bytes(), self.server).unwrap();
    }

    pub fn recv(&self) -> Option<String> {
        let mut buf = vec![0u8; 65536];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn request(&self, msg: &str) -> String {
        self.send(msg);
        self.recv()
            .unwrap_or_else(|| panic!("no response to:\n{msg}"))
    }

    /// A REGISTER for `user@domain` with `extra` header lines (each ending in \r\n).
    pub fn register_msg(
        &self,
        user: &str,
        domain: &str,
        call_id: &str,
        cseq: u32,
        extra: &str,
    ) -> String {
        let port = self.port();
        format!(
            "REGISTER sip:{domain} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}{cseq};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{user}@{domain}>;tag=t{cseq}\r\nTo: <sip:{user}@{domain}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} REGISTER\r\nContact: <sip:{user}@127.0.0.1:{port}>\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    }

    /// Full digest registration; returns the final response.
    pub fn register(
        &self,
        user: &str,
        password: &str,
        domain: &str,
        call_id: &str,
        extra: &str,
    ) -> String {
        let r1 = self.request(&self.register_msg(user, domain, call_id, 1, extra));
        assert!(r1.starts_with("SIP/2.0 401"), "expected 401, got:\n{r1}");
        let auth = authorization(
            &r1,
            Algorithm::Md5,
            user,
            domain,
            password,
            "REGISTER",
            &format!("sip:{domain}"),
            1,
        );
        self.request(&self.register_msg(
            user,
            domain,
            call_id,
            2,
            &format!("Authorization: {auth}\r\n{extra}"),
        ))
    }
}

/// Receives until a message starting with `start` arrives, skipping others (retransmissions,
/// provisionals); at most 50 are skipped.
pub fn expect(ua: &Ua, start: &str) -> String {
    for _ in 0..50 {
        let m = ua
            .recv()
            .unwrap_or_else(|| panic!("nothing received while waiting for {start}"));
        if m.starts_with(start) {
            return m;
        }
    }
    panic!("no {start}");
}

/// Answers a request a raw device received with `code` (its own To tag and Contact, the
/// Record-Route copied as a UAS does, RFC 3261 §12.1.1); `body` is (content type, body).
pub fn answer_with(ua: &Ua, request: &str, code: u16, body: Option<(&str, &str)>) {
    let m = careflow_proto::Message::parse(
        bytes::Bytes::from(request.to_string()),
        &careflow_proto::ParseLimits::default(),
    )
    .unwrap();
    let mut b = careflow_proto::ResponseBuilder::new(&m, code)
        .to_tag(format!("dev{}", ua.port()))
        .header("Contact", format!("<sip:dev@127.0.0.1:{}>", ua.port()));
    for rr in m.headers_named(careflow_proto::HeaderName::RecordRoute) {
        b = b.header("Record-Route", rr);
    }
    if let Some((content_type, text)) = body {
        b = b.header("Content-Type", content_type).body(text.as_bytes());
    }
    ua.sock.send_to(&b.build(), ua.server).unwrap();
}

/// [`answer_with`] without a body.
pub fn answer(ua: &Ua, request: &str, code: u16) {
    answer_with(ua, request, code, None);
}

/// The value of the first header `name` in a message.
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Authorization header value answering the challenge of `algorithm` in `challenge_response`.
#[allow(clippy::too_many_arguments)]
pub fn authorization(
    challenge_response: &str,
    alg: Algorithm,
    user: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
) -> String {
    let ch = challenge_response
        .lines()
        .filter(|l| {
            l.to_ascii_lowercase().starts_with("www-authenticate:")
                || l.to_ascii_lowercase().starts_with("proxy-authenticate:")
        })
        .find(|l| l.contains(&format!("algorithm={}", alg.as_str())))
        .unwrap_or_else(|| panic!("no {alg:?} challenge in:\n{challenge_response}"));
    let i = ch.find("nonce=\"").unwrap() + 7;
    let nonce = &ch[i..i + ch[i..].find('"').unwrap()];
    let nc = format!("{nc:08x}");
    let mut c = Credentials {
        username: user.into(),
        realm: realm.into(),
        nonce: nonce.into(),
        uri: uri.into(),
        response: "".into(),
        algorithm: Some(alg.as_str()),
        cnonce: Some("0a4f113b".into()),
        qop: Some("auth"),
        nc: Some(&nc),
        opaque: None,
    };
    let h = ha1(alg, user, realm, password);
    c.response = expected_response(alg, &h, &c, method).into();
    format!(
        "Digest username=\"{user}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", response=\"{}\", algorithm={}, cnonce=\"0a4f113b\", qop=auth, nc={nc}",
        c.response,
        alg.as_str()
    )
}

pub fn status(msg: &str) -> u16 {
    msg.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

pub fn interop_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop"))
}
