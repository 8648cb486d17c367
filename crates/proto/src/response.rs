//! Building responses to a received request (RFC 3261 §8.2.6): Via, From, To, Call-ID and
//! CSeq are copied byte for byte, the top Via gets `received`/`rport` (RFC 3581).

use std::fmt::Write as _;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::header::HeaderName;
use crate::message::Message;
use crate::scan;
use crate::via::Via;

/// Builds one response. Extra headers are appended in the order given.
#[derive(Debug)]
pub struct ResponseBuilder<'m> {
    req: &'m Message,
    code: u16,
    reason: Option<&'m str>,
    to_tag: Option<String>,
    source: Option<SocketAddr>,
    extra: String,
    body: &'m [u8],
}

impl<'m> ResponseBuilder<'m> {
    /// A response with `code` to `req`.
    pub fn new(req: &'m Message, code: u16) -> Self {
        Self {
            req,
            code,
            reason: None,
            to_tag: None,
            source: None,
            extra: String::new(),
            body: &[],
        }
    }

    /// Overrides the default reason phrase.
    pub fn reason(mut self, reason: &'m str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The To tag to add when the request's To has none (ignored for 100).
    pub fn to_tag(mut self, tag: impl Into<String>) -> Self {
        self.to_tag = Some(tag.into());
        self
    }

    /// The address the request came from: sets `received` and fills `rport` in the top Via.
    pub fn source(mut self, src: SocketAddr) -> Self {
        self.source = Some(src);
        self
    }

    /// Appends `Name: value`.
    pub fn header(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        if self.extra.capacity() == 0 {
            // One allocation for the few headers a response adds (a challenge, Contact, Date).
            self.extra.reserve(256);
        }
        let _ = write!(self.extra, "{name}: {value}\r\n");
        self
    }

    /// Sets the body (Content-Type must be added with [`Self::header`]).
    pub fn body(mut self, body: &'m [u8]) -> Self {
        self.body = body;
        self
    }

    /// Serializes the response.
    pub fn build(self) -> Bytes {
        let req = self.req;
        let reason = self.reason.unwrap_or_else(|| reason_phrase(self.code));
        // Sized to fit: responses may be kept for 64*T1 to answer retransmissions.
        let copied: usize = req
            .fields()
            .iter()
            .filter(|f| {
                matches!(
                    f.name,
                    HeaderName::Via
                        | HeaderName::From
                        | HeaderName::To
                        | HeaderName::CallId
                        | HeaderName::CSeq
                )
            })
            .map(|f| req.field_line(f).len())
            .sum();
        let tag_len = self.to_tag.as_ref().map_or(0, |t| t.len() + 6);
        let mut out = BytesMut::with_capacity(
            copied + tag_len + 96 + reason.len() + self.extra.len() + self.body.len(),
        );
        out.put_slice(b"SIP/2.0 ");
        put_decimal(&mut out, u64::from(self.code));
        out.put_u8(b' ');
        out.put_slice(reason.as_bytes());
        out.put_slice(b"\r\n");
        let mut first_via = true;
        for f in req.fields() {
            match f.name {
                HeaderName::Via if first_via => {
                    first_via = false;
                    write_top_via(&mut out, req.field_value(f), req.top_via(), self.source);
                }
                HeaderName::Via | HeaderName::From | HeaderName::CallId | HeaderName::CSeq => {
                    out.put_slice(req.field_line(f));
                }
                HeaderName::To => {
                    let value = req.field_value(f);
                    // `to()` is the first To field's, kept by the request (a second To field
                    // makes the request invalid; its answer copies that field as it is).
                    let needs_tag = self.code > 100
                        && self.to_tag.is_some()
                        && std::ptr::eq(value, req.header(HeaderName::To).unwrap_or_default())
                        && req.to().is_some_and(|n| n.tag().is_none());
                    if needs_tag {
                        out.put_slice(b"To: ");
                        out.put_slice(scan::trim(value).as_bytes());
                        out.put_slice(b";tag=");
                        out.put_slice(self.to_tag.as_deref().unwrap_or_default().as_bytes());
                        out.put_slice(b"\r\n");
                    } else {
                        out.put_slice(req.field_line(f));
                    }
                }
                _ => {}
            }
        }
        out.put_slice(self.extra.as_bytes());
        out.put_slice(b"Content-Length: ");
        put_decimal(&mut out, self.body.len() as u64);
        out.put_slice(b"\r\n\r\n");
        out.put_slice(self.body);
        out.freeze()
    }
}

/// Writes the first Via value with `received` and a filled `rport` (the value is rebuilt from
/// its parsed parts; that is allowed for the hop we answer), keeping any further values of the
/// same field line unchanged.
/// `top` is the request's top Via (the first value of this field), parsed.
fn write_top_via(
    out: &mut BytesMut,
    value: &str,
    top: Option<Via<'_>>,
    source: Option<SocketAddr>,
) {
    let (first, rest) = match scan::find_unquoted(value, b',') {
        Some(i) => (scan::trim(&value[..i]), Some(&value[i..])),
        None => (scan::trim(value), None),
    };
    out.put_slice(b"Via: ");
    match (source, top) {
        (Some(src), Some(via)) => {
            out.put_slice(b"SIP/2.0/");
            out.put_slice(via.transport.as_bytes());
            out.put_u8(b' ');
            out.put_slice(via.host.as_str().as_bytes());
            if let Some(p) = via.port {
                out.put_u8(b':');
                put_decimal(out, u64::from(p));
            }
            let mut has_rport = false;
            for (name, v) in via.params.iter() {
                if name.eq_ignore_ascii_case("received") {
                    continue;
                }
                out.put_u8(b';');
                if name.eq_ignore_ascii_case("rport") {
                    has_rport = true;
                    out.put_slice(b"rport=");
                    put_decimal(out, u64::from(src.port()));
                    continue;
                }
                out.put_slice(name.as_bytes());
                if let Some(v) = v {
                    out.put_u8(b'=');
                    out.put_slice(v.as_bytes());
                }
            }
            if has_rport || via.host.ip() != Some(src.ip()) {
                // RFC 3261 §20.42 and RFC 5118: received carries an IPv6 address without
                // brackets (as `IpAddr` displays it).
                out.put_slice(b";received=");
                match src.ip() {
                    std::net::IpAddr::V4(v4) => {
                        out.put_slice(scan::ipv4(v4, &mut [0; 15]).as_bytes());
                    }
                    ip @ std::net::IpAddr::V6(_) => {
                        let _ = write!(Writer(out), "{ip}");
                    }
                }
            }
        }
        _ => out.put_slice(first.as_bytes()),
    }
    if let Some(rest) = rest {
        out.put_slice(rest.as_bytes());
    }
    out.put_slice(b"\r\n");
}

/// Writes `n` in decimal without the formatting machinery (status codes, ports, lengths).
fn put_decimal(out: &mut BytesMut, n: u64) {
    out.put_slice(scan::decimal(n, &mut [0; 20]));
}

struct Writer<'a>(&'a mut BytesMut);

impl std::fmt::Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

/// Default reason phrases (RFC 3261 §21 and extensions).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        423 => "Interval Too Brief",
        429 => "Too Many Requests",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => match code / 100 {
            1 => "Progress",
            2 => "OK",
            3 => "Redirect",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ParseLimits;

    fn req(s: &str) -> Message {
        Message::parse(
            Bytes::from(s.replace('\n', "\r\n")),
            &ParseLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn copies_and_fills_via() {
        let r = req(
            "REGISTER sip:example.com SIP/2.0\nVia: SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bK1, SIP/2.0/UDP x.y\nVia: SIP/2.0/UDP second\nFrom: <sip:a@example.com>;tag=f\nTo: <sip:a@example.com>\nCall-ID: c1\nCSeq: 1 REGISTER\nX-Other: y\nContent-Length: 0\n\n",
        );
        let src: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let out = ResponseBuilder::new(&r, 200)
            .source(src)
            .to_tag("t1")
            .header("Expires", 60)
            .build();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(s.starts_with("SIP/2.0 200 OK\r\n"));
        assert!(s.contains("Via: SIP/2.0/UDP 10.0.0.5:5060;rport=40000;branch=z9hG4bK1;received=203.0.113.9, SIP/2.0/UDP x.y\r\nVia: SIP/2.0/UDP second\r\n"), "{s}");
        assert!(s.contains("To: <sip:a@example.com>;tag=t1\r\n"));
        assert!(!s.contains("X-Other"));
        assert!(s.ends_with("Expires: 60\r\nContent-Length: 0\r\n\r\n"));
        let parsed = Message::parse(out.clone(), &ParseLimits::default()).unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed.status(), Some(200));
    }

    #[test]
    fn received_is_the_source_address_as_it_displays() {
        let r = req(
            "OPTIONS sip:example.com SIP/2.0\nVia: SIP/2.0/UDP h.example;rport;branch=z9hG4bK1\nFrom: <sip:a@example.com>;tag=f\nTo: <sip:a@example.com>\nCall-ID: c1\nCSeq: 1 OPTIONS\n\n",
        );
        for src in [
            "0.0.0.0:1",
            "10.0.200.5:5060",
            "255.255.255.255:65535",
            "[2001:db8::1]:5062",
        ] {
            let src: SocketAddr = src.parse().unwrap();
            let out = ResponseBuilder::new(&r, 200).source(src).build();
            let s = std::str::from_utf8(&out).unwrap();
            let want = format!(
                "Via: SIP/2.0/UDP h.example;rport={};branch=z9hG4bK1;received={}\r\n",
                src.port(),
                src.ip()
            );
            assert!(s.contains(&want), "{s}");
        }
    }

    #[test]
    fn no_received_when_host_matches() {
        let r = req(
            "OPTIONS sip:example.com SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK2;received=1.1.1.1\nFrom: <sip:a@example.com>;tag=f\nTo: <sip:a@example.com>\nCall-ID: c1\nCSeq: 1 OPTIONS\n\n",
        );
        let out = ResponseBuilder::new(&r, 200)
            .source("127.0.0.1:5062".parse().unwrap())
            .build();
        let s = std::str::from_utf8(&out).unwrap();
        assert!(
            s.contains("Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK2\r\n"),
            "{s}"
        );
    }
}
