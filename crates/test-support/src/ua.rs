//! A raw UDP user agent for precise protocol checks, and what such checks need: requests
//! (REGISTER, INVITE), both digest authentications (401 WWW and 407 proxy), answering as a
//! device, and reading what came back.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use careflow_proto::digest::{Algorithm, Credentials, expected_response, ha1};

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

    /// The response to `msg`, or none within the read timeout.
    pub fn try_request(&self, msg: &str) -> Option<String> {
        self.send(msg);
        self.recv()
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
        self.register_rewritten(user, password, domain, call_id, |m| {
            m.replace(
                "Content-Length: 0\r\n\r\n",
                &format!("{extra}Content-Length: 0\r\n\r\n"),
            )
        })
    }

    /// [`Self::register`] with both REGISTERs passed through `rewrite` (another Contact, more
    /// headers) before they are sent.
    pub fn register_rewritten(
        &self,
        user: &str,
        password: &str,
        domain: &str,
        call_id: &str,
        rewrite: impl Fn(String) -> String,
    ) -> String {
        self.register_collecting((user, password, domain), call_id, 1, rewrite)
            .0
    }

    /// A digest registration (401, then credentials) with both REGISTERs passed through
    /// `rewrite`, CSeq from `first_cseq`, reading past the requests that arrive meanwhile (a
    /// phone woken by a push may get its INVITE before the 200 OK): the final answer, and
    /// those requests.
    pub fn register_collecting(
        &self,
        (user, password, domain): (&str, &str, &str),
        call_id: &str,
        first_cseq: u32,
        rewrite: impl Fn(String) -> String,
    ) -> (String, Vec<String>) {
        let mut arrived = Vec::new();
        let read_final = |arrived: &mut Vec<String>| loop {
            let m = self.recv().expect("an answer to REGISTER");
            if m.starts_with("SIP/2.0 ") && m.contains("REGISTER\r\n") {
                return m;
            }
            arrived.push(m);
        };
        self.send(&rewrite(
            self.register_msg(user, domain, call_id, first_cseq, ""),
        ));
        let r1 = read_final(&mut arrived);
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
        self.send(&rewrite(self.register_msg(
            user,
            domain,
            call_id,
            first_cseq + 1,
            &format!("Authorization: {auth}\r\n"),
        )));
        (read_final(&mut arrived), arrived)
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

/// Sends `msg` and returns the first final response of the call `call_id` (provisionals and
/// other calls' messages are skipped).
pub fn expect_final(ua: &Ua, call_id: &str, msg: &str) -> String {
    ua.send(msg);
    for _ in 0..20 {
        let m = ua
            .recv()
            .unwrap_or_else(|| panic!("no answer for {call_id}"));
        if m.contains(&format!("Call-ID: {call_id}\r\n")) && status(&m) >= 200 {
            return m;
        }
    }
    panic!("no final answer for {call_id}");
}

/// An out-of-dialog INVITE of `from@domain` to `to@domain`, without a body; `extra` header
/// lines end in CRLF.
#[allow(clippy::too_many_arguments)]
pub fn invite_request(
    ua: &Ua,
    domain: &str,
    from: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
    branch: &str,
    extra: &str,
) -> String {
    let port = ua.port();
    format!(
        "INVITE sip:{to}@{domain} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{from}@{domain}>;tag=f-{call_id}\r\nTo: <sip:{to}@{domain}>\r\nCall-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\nContact: <sip:{from}@127.0.0.1:{port}>\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

/// Sends an out-of-dialog request that the proxy challenges: `build(cseq, extra)` makes it,
/// the 407 is answered with `user`'s MD5 credentials for realm `domain`. Returns the request
/// sent the second time (sent, its answer not read).
pub fn send_with_proxy_auth(
    ua: &Ua,
    domain: &str,
    (user, password): (&str, &str),
    (method, uri): (&str, &str),
    build: impl Fn(u32, &str) -> String,
) -> String {
    let r = ua.request(&build(1, ""));
    assert_eq!(status(&r), 407, "{r}");
    let auth = authorization(&r, Algorithm::Md5, user, domain, password, method, uri, 1);
    let second = build(2, &format!("Proxy-Authorization: {auth}\r\n"));
    ua.send(&second);
    second
}

/// Sends an INVITE with proxy credentials (answering the 407 first) and returns the
/// authorized request that was sent.
pub fn invite_authorized(
    ua: &Ua,
    domain: &str,
    (from, password): (&str, &str),
    to: &str,
    call_id: &str,
) -> String {
    let uri = format!("sip:{to}@{domain}");
    send_with_proxy_auth(
        ua,
        domain,
        (from, password),
        ("INVITE", &uri),
        |cseq, extra| {
            let branch = format!("{call_id}{}", if cseq == 1 { 'a' } else { 'b' });
            invite_request(ua, domain, from, to, call_id, cseq, &branch, extra)
        },
    )
}

/// The INVITE of `from` to `to` with proxy credentials, built after its first, challenged copy
/// (sent here); not sent itself.
pub fn authorized_invite(
    ua: &Ua,
    domain: &str,
    (from, password): (&str, &str),
    to: &str,
    call_id: &str,
) -> String {
    let first = invite_request(ua, domain, from, to, call_id, 1, &format!("{call_id}a"), "");
    let r = expect_final(ua, call_id, &first);
    assert_eq!(status(&r), 407, "{r}");
    let uri = format!("sip:{to}@{domain}");
    let auth = authorization(
        &r,
        Algorithm::Md5,
        from,
        domain,
        password,
        "INVITE",
        &uri,
        1,
    );
    invite_request(
        ua,
        domain,
        from,
        to,
        call_id,
        2,
        &format!("{call_id}b"),
        &format!("Proxy-Authorization: {auth}\r\n"),
    )
}
