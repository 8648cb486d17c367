//! The parsed message: one `Bytes` buffer and spans into it.
//!
//! Parsing is split in two steps, as a server needs: [`Message::parse`] finds the start line,
//! the header fields and the body (it fails only when nothing could be answered), and
//! [`Message::validate`] checks the headers a transaction needs, so that a request with a bad
//! header can still be answered with a 400 naming it.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use smallvec::SmallVec;

use crate::error::{ParseError, ParseErrorKind as K};
use crate::header::HeaderName;
use crate::method::Method;
use crate::name_addr::{NameAddr, Params};
use crate::scan;
use crate::uri::{Host, Uri};
use crate::via::Via;

/// Bounds applied while parsing untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Largest message accepted, in bytes.
    pub max_size: usize,
    /// Most header fields accepted.
    pub max_headers: usize,
}

/// Most Via values in a message (Max-Forwards starts at 70).
pub const MAX_VIAS: usize = 70;
/// Most Contact values in a message.
pub const MAX_CONTACTS: usize = 32;

impl Default for ParseLimits {
    fn default() -> Self {
        Self {
            max_size: 64 * 1024,
            max_headers: 128,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn new(start: usize, end: usize) -> Self {
        // Messages are bounded by ParseLimits::max_size, far below u32::MAX.
        Self {
            start: start as u32,
            end: end as u32,
        }
    }
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Request or status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine {
    /// A request; the method token and URI are read with [`Message::method_str`] and
    /// [`Message::request_uri_str`].
    Request(Method),
    /// A response with its status code.
    Response(u16),
}

/// One header field as received.
#[derive(Debug, Clone, Copy)]
pub struct HeaderField {
    /// The classified name.
    pub name: HeaderName,
    value: Span,
    line: Span,
}

/// The header fields of a message: inline up to the count a phone's INVITE carries, so parsing
/// allocates nothing for nearly every message.
type Fields = SmallVec<[HeaderField; 20]>;

/// A SIP message.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Bytes,
    start: StartLine,
    first: Span,
    second: Span,
    start_line: Span,
    headers: Fields,
    body: Span,
    defect: Option<ParseError>,
    /// The From and To tags and the top Via's branch, found on first use.
    from_tag: Memo,
    to_tag: Memo,
    top_branch: Memo,
    /// Headers kept once parsed. Inline, not boxed: parsing and validating a message
    /// allocates nothing.
    parsed: Parsed,
}

/// The parts of a message that are parsed on first use and kept.
#[derive(Debug, Clone, Default)]
struct Parsed {
    /// The top Via: validation, the transaction key, the response's destination, forking and
    /// the lamps each read it (five to eight parses per message).
    top_via: OnceLock<Option<ViaSpans>>,
    /// From, To and the first Contact (read by validation, authentication, routing, call
    /// records and the lamps).
    from: OnceLock<Option<NameAddrSpans>>,
    to: OnceLock<Option<NameAddrSpans>>,
    contact: OnceLock<Option<NameAddrSpans>>,
    /// The Request-URI as parsed when the start line was checked (routing reads it often).
    request_uri: OnceLock<Option<UriSpans>>,
}

/// Where the parts of a parsed [`NameAddr`] are in the message.
#[derive(Debug, Clone, Copy)]
struct NameAddrSpans {
    display: Option<Span>,
    uri: UriSpans,
    params: Span,
}

/// Where the parts of a parsed [`Uri`] are in the message.
#[derive(Debug, Clone, Copy)]
struct UriSpans {
    raw: Span,
    scheme: Span,
    user: Option<Span>,
    password: Option<Span>,
    host: Span,
    port: Option<u16>,
    params: Span,
    headers: Option<Span>,
    opaque: Option<Span>,
}

/// Where the parts of a parsed [`Via`] are in the message.
#[derive(Debug, Clone, Copy)]
struct ViaSpans {
    transport: Span,
    host: Span,
    port: Option<u16>,
    params: Span,
}

/// A span of the message found on first use and kept: the From and To tags are read by
/// validation, loop detection, the transaction and dialog keys, call records and the lamps,
/// and each read parsed the whole header again (70 parses per proxied call). Atomic so a
/// `Message` stays `Sync` (it is held across awaits); a race only computes the same span twice.
#[derive(Debug)]
struct Memo(AtomicU64);

impl Memo {
    const UNSET: u64 = u64::MAX;
    /// Looked for, not there. Neither value is a span: spans end below `u32::MAX`.
    const ABSENT: u64 = u64::MAX - 1;

    fn new() -> Self {
        Self(AtomicU64::new(Self::UNSET))
    }

    fn get_or(&self, find: impl FnOnce() -> Option<Span>) -> Option<Span> {
        match self.0.load(Ordering::Relaxed) {
            Self::UNSET => {
                let span = find();
                self.set(span);
                span
            }
            Self::ABSENT => None,
            v => Some(Span {
                start: (v >> 32) as u32,
                end: v as u32,
            }),
        }
    }

    fn set(&self, span: Option<Span>) {
        let v = span.map_or(Self::ABSENT, |s| {
            (u64::from(s.start) << 32) | u64::from(s.end)
        });
        self.0.store(v, Ordering::Relaxed);
    }
}

impl Clone for Memo {
    fn clone(&self) -> Self {
        Self(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl Message {
    /// Parses one complete message (a datagram, or a frame cut by [`crate::framing`]).
    pub fn parse(buf: Bytes, limits: &ParseLimits) -> Result<Self, ParseError> {
        if buf.len() > limits.max_size || buf.len() >= u32::MAX as usize {
            return Err(ParseError::new(K::TooLarge));
        }
        let b = &buf[..];
        // RFC 3261 §7.5: CRLFs before the start line are ignored.
        let mut pos = 0;
        while pos < b.len() && (b[pos] == b'\r' || b[pos] == b'\n') {
            pos += 1;
        }
        let (head_end, body_start) =
            find_head_end(b, pos).ok_or(ParseError::new(K::MissingHeaderEnd))?;
        let head =
            std::str::from_utf8(&b[pos..head_end]).map_err(|_| ParseError::new(K::NotUtf8))?;

        let mut defect = None;
        let line_end = memchr::memchr(b'\n', head.as_bytes()).map_or(head.len(), |i| i + 1);
        let sl = without_line_break(&head[..line_end]);
        let (start, first, second, request_uri) = parse_start_line(sl, b, &mut defect)?;
        let start_line = Span::new(pos, pos + line_end);

        let mut headers = Fields::new();
        // One SIMD pass finds every line end; each line is then scanned once, byte by byte.
        let mut newlines = memchr::memchr_iter(b'\n', &head.as_bytes()[line_end..]);
        let mut rel = line_end;
        while rel < head.len() {
            let nl = newlines.next().map_or(head.len(), |i| line_end + i + 1);
            let off = pos + rel;
            let line_end_abs = pos + nl;
            let line = without_line_break(&head[rel..nl]);
            rel = nl;
            if line.starts_with([' ', '\t']) {
                // Folded continuation (RFC 3261 §7.3.1): extends the previous value.
                match headers.last_mut() {
                    Some(h) => {
                        if !scan::trim(line).is_empty() {
                            h.value.end = (off + line.len()) as u32;
                        }
                        h.line.end = line_end_abs as u32;
                    }
                    None => set_defect(&mut defect, ParseError::new(K::BadHeaderLine)),
                }
                continue;
            }
            let over_limit = headers.len() >= limits.max_headers;
            if over_limit {
                // Past the limit only what an answer needs is kept (Via, From, To, Call-ID,
                // CSeq), so a request with a thousand Contacts still gets its final answer
                // instead of silence; beyond that, nothing can be answered.
                set_defect(&mut defect, ParseError::new(K::TooManyHeaders));
                if headers.len() >= limits.max_headers + MAX_VIAS + 8 {
                    return Err(ParseError::new(K::TooManyHeaders));
                }
            }
            // `token *(SP / HTAB) ":"`: the name is the token prefix, and a colon must follow
            // it (anything else is a bad header line).
            let lb = line.as_bytes();
            let name_len = lb
                .iter()
                .position(|&c| !scan::is_token_char(c))
                .unwrap_or(lb.len());
            let mut colon = name_len;
            while colon < lb.len() && matches!(lb[colon], b' ' | b'\t') {
                colon += 1;
            }
            if name_len == 0 || lb.get(colon) != Some(&b':') {
                set_defect(&mut defect, ParseError::new(K::BadHeaderLine));
                continue;
            }
            let name = HeaderName::from_bytes(&lb[..name_len]);
            if over_limit
                && !matches!(
                    name,
                    HeaderName::Via
                        | HeaderName::From
                        | HeaderName::To
                        | HeaderName::CallId
                        | HeaderName::CSeq
                )
            {
                continue;
            }
            let (vstart, vend) = value_bounds(line, colon + 1);
            headers.push(HeaderField {
                name,
                value: Span::new(off + vstart, off + vend),
                line: Span::new(off, line_end_abs),
            });
        }

        let mut msg = Self {
            buf,
            start,
            first,
            second,
            start_line,
            headers,
            body: Span::new(body_start, body_start),
            defect,
            from_tag: Memo::new(),
            to_tag: Memo::new(),
            top_branch: Memo::new(),
            parsed: Parsed {
                request_uri: OnceLock::from(request_uri),
                ..Parsed::default()
            },
        };
        msg.frame_body(body_start);
        Ok(msg)
    }

    /// Applies Content-Length (RFC 3261 §18.3): extra bytes are discarded, missing bytes are
    /// an error; several Content-Length fields must agree.
    fn frame_body(&mut self, body_start: usize) {
        let total = self.buf.len();
        let mut cl: Option<u64> = None;
        let mut bad = false;
        for v in self.headers_named(HeaderName::ContentLength) {
            match (scan::parse_u64(v), cl) {
                (None, _) => bad = true,
                (Some(n), Some(prev)) if n != prev => bad = true,
                (Some(n), _) => cl = Some(n),
            }
        }
        let avail = (total - body_start) as u64;
        let end = match cl {
            Some(n) if n <= avail => body_start + n as usize,
            Some(_) => {
                bad = true;
                total
            }
            None => total,
        };
        self.body = Span::new(body_start, end);
        if bad {
            set_defect(
                &mut self.defect,
                ParseError::in_header(K::BadContentLength, "Content-Length"),
            );
        }
    }

    /// Checks the header fields a server relies on (RFC 3261 §8.1.1, §16.3). An error here
    /// still leaves the message readable enough to answer 400.
    pub fn validate(&self) -> Result<(), ParseError> {
        if let Some(d) = self.defect {
            return Err(d);
        }
        let mut vias = 0;
        for v in self.values(HeaderName::Via) {
            let via = if vias == 0 {
                self.top_via()
            } else {
                Via::parse(v)
            };
            via.ok_or(ParseError::in_header(K::BadHeaderValue, "Via"))?;
            vias += 1;
        }
        if vias == 0 {
            return Err(ParseError::in_header(K::MissingHeader, "Via"));
        }
        // Bounds on lists a message can repeat at no cost to its sender: more Vias than hops
        // Max-Forwards allows, or more Contacts than any registrar keeps, are refused.
        if vias > MAX_VIAS {
            return Err(ParseError::in_header(K::TooManyValues, "Via"));
        }
        if self.values(HeaderName::Contact).nth(MAX_CONTACTS).is_some() {
            return Err(ParseError::in_header(K::TooManyValues, "Contact"));
        }
        // `from()` and `to()` parse the first field of each, the one `single` checks, and
        // keep it for the message's later readers.
        self.single(HeaderName::From, "From", |_| self.from().is_some())?;
        self.single(HeaderName::To, "To", |_| self.to().is_some())?;
        self.single(HeaderName::CallId, "Call-ID", |v| {
            !v.is_empty() && !v.contains(char::is_whitespace)
        })?;
        self.single(HeaderName::CSeq, "CSeq", |v| parse_cseq(v).is_some())?;
        if let Some(mf) = self.header(HeaderName::MaxForwards)
            && scan::parse_u64(mf).is_none_or(|n| n > 255)
        {
            return Err(ParseError::in_header(K::BadHeaderValue, "Max-Forwards"));
        }
        if let Some(e) = self.header(HeaderName::Expires)
            && scan::parse_u64(e).is_none_or(|n| n > u64::from(u32::MAX))
        {
            return Err(ParseError::in_header(K::BadHeaderValue, "Expires"));
        }
        if let StartLine::Request(_) = self.start
            && let Some((_, m)) = self.cseq()
            && m != self.method_str()
        {
            return Err(ParseError::in_header(K::CSeqMismatch, "CSeq"));
        }
        Ok(())
    }

    fn single(
        &self,
        name: HeaderName,
        label: &'static str,
        ok: impl Fn(&str) -> bool,
    ) -> Result<(), ParseError> {
        let mut it = self.headers_named(name);
        let first = it
            .next()
            .ok_or(ParseError::in_header(K::MissingHeader, label))?;
        if !ok(first) {
            return Err(ParseError::in_header(K::BadHeaderValue, label));
        }
        if it.next().is_some() {
            return Err(ParseError::in_header(K::DuplicateHeader, label));
        }
        Ok(())
    }

    /// The whole buffer the message was parsed from.
    pub fn bytes(&self) -> &Bytes {
        &self.buf
    }

    /// Request or response, with method or status.
    pub fn start_line(&self) -> StartLine {
        self.start
    }

    /// True for requests.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request(_))
    }

    /// The request method (`Method::Other` for extension methods and for responses).
    pub fn method(&self) -> Method {
        match self.start {
            StartLine::Request(m) => m,
            StartLine::Response(_) => Method::Other,
        }
    }

    /// The method token as written (requests), or "" for responses.
    pub fn method_str(&self) -> &str {
        match self.start {
            StartLine::Request(_) => self.text(self.first),
            StartLine::Response(_) => "",
        }
    }

    /// The Request-URI text (requests) or "" (responses).
    pub fn request_uri_str(&self) -> &str {
        match self.start {
            StartLine::Request(_) => self.text(self.second),
            StartLine::Response(_) => "",
        }
    }

    /// The parsed Request-URI.
    pub fn request_uri(&self) -> Option<Uri<'_>> {
        let spans = self.parsed.request_uri.get_or_init(|| {
            Uri::parse(self.request_uri_str()).map(|u| UriSpans::of(&self.buf, &u))
        });
        spans.as_ref().map(|u| u.uri(self))
    }

    /// Status code of a response.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response(c) => Some(c),
            StartLine::Request(_) => None,
        }
    }

    /// Reason phrase of a response.
    pub fn reason(&self) -> &str {
        match self.start {
            StartLine::Response(_) => self.text(self.second),
            StartLine::Request(_) => "",
        }
    }

    /// The raw start line including its line ending.
    pub fn start_line_bytes(&self) -> &[u8] {
        &self.buf[self.start_line.range()]
    }

    /// All header fields in order.
    pub fn fields(&self) -> &[HeaderField] {
        &self.headers
    }

    /// The name of a field as written.
    pub fn field_name(&self, f: &HeaderField) -> &str {
        self.text(name_span(&self.buf, f.line))
    }

    /// The value of a field (may contain folded line breaks; scanners treat them as spaces).
    pub fn field_value(&self, f: &HeaderField) -> &str {
        self.text(f.value)
    }

    /// The raw bytes of a field including continuation lines and the final CRLF, for
    /// byte-exact passthrough.
    pub fn field_line(&self, f: &HeaderField) -> &[u8] {
        &self.buf[f.line.range()]
    }

    /// Values of every field with this name, in order (not split at commas).
    pub fn headers_named(&self, name: HeaderName) -> impl Iterator<Item = &str> + '_ {
        self.headers
            .iter()
            .filter(move |h| h.name == name)
            .map(|h| self.text(h.value))
    }

    /// The first field with this name.
    pub fn header(&self, name: HeaderName) -> Option<&str> {
        self.headers_named(name).next()
    }

    /// Values of an unrecognised header, by case-insensitive name.
    pub fn other_header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| {
                h.name == HeaderName::Other
                    && self
                        .text(name_span(&self.buf, h.line))
                        .eq_ignore_ascii_case(name)
            })
            .map(|h| self.text(h.value))
    }

    /// Every element of a list header across all its fields (RFC 3261 §7.3.1).
    pub fn values(&self, name: HeaderName) -> impl Iterator<Item = &str> + '_ {
        self.headers_named(name)
            .flat_map(scan::split_list)
            .filter(|v| !v.is_empty())
    }

    /// The topmost Via.
    pub fn top_via(&self) -> Option<Via<'_>> {
        let spans = self.parsed.top_via.get_or_init(|| {
            let via = self.values(HeaderName::Via).next().and_then(Via::parse)?;
            Some(ViaSpans {
                transport: span_in(&self.buf, via.transport),
                host: span_in(&self.buf, via.host.as_str()),
                port: via.port,
                params: span_in(&self.buf, via.params.as_str()),
            })
        });
        spans.map(|v| Via {
            transport: self.text(v.transport),
            host: Host(self.text(v.host)),
            port: v.port,
            params: Params::new(self.text(v.params)),
        })
    }

    /// The topmost Via's `branch` parameter (what matches a response to its transaction).
    pub fn top_via_branch(&self) -> Option<&str> {
        let span = self
            .top_branch
            .get_or(|| self.top_via()?.branch().map(|b| self.span_of(b)));
        span.map(|s| self.text(s))
    }

    /// The From header.
    pub fn from(&self) -> Option<NameAddr<'_>> {
        self.name_addr(&self.parsed.from, HeaderName::From)
    }

    /// The To header.
    pub fn to(&self) -> Option<NameAddr<'_>> {
        self.name_addr(&self.parsed.to, HeaderName::To)
    }

    /// The first Contact field as one name-addr (a field listing several does not parse: a
    /// request or response sets one; a REGISTER's list is read with [`Self::values`]).
    pub fn contact(&self) -> Option<NameAddr<'_>> {
        self.name_addr(&self.parsed.contact, HeaderName::Contact)
    }

    /// The first `name` header as a name-addr, parsed once into `memo`.
    fn name_addr(
        &self,
        memo: &OnceLock<Option<NameAddrSpans>>,
        name: HeaderName,
    ) -> Option<NameAddr<'_>> {
        let spans = memo.get_or_init(|| {
            let n = self.header(name).and_then(NameAddr::parse)?;
            Some(NameAddrSpans {
                display: n.display.map(|d| span_in(&self.buf, d)),
                uri: UriSpans::of(&self.buf, &n.uri),
                params: span_in(&self.buf, n.params.as_str()),
            })
        });
        let n = spans.as_ref()?;
        Some(NameAddr {
            display: n.display.map(|d| self.text(d)),
            uri: n.uri.uri(self),
            params: Params::new(self.text(n.params)),
        })
    }

    /// The From header's `tag` parameter.
    pub fn from_tag(&self) -> Option<&str> {
        let span = self
            .from_tag
            .get_or(|| self.from()?.tag().map(|t| self.span_of(t)));
        span.map(|s| self.text(s))
    }

    /// The To header's `tag` parameter (a request with one is in a dialog).
    pub fn to_tag(&self) -> Option<&str> {
        let span = self
            .to_tag
            .get_or(|| self.to()?.tag().map(|t| self.span_of(t)));
        span.map(|s| self.text(s))
    }

    /// Where `part`, a slice of this message's header text, lies in the buffer.
    fn span_of(&self, part: &str) -> Span {
        let start = part.as_ptr() as usize - self.buf.as_ptr() as usize;
        debug_assert!(start + part.len() <= self.buf.len());
        Span::new(start, start + part.len())
    }

    /// Call-ID, trimmed.
    pub fn call_id(&self) -> Option<&str> {
        self.header(HeaderName::CallId).map(scan::trim)
    }

    /// CSeq number and method.
    pub fn cseq(&self) -> Option<(u32, &str)> {
        self.header(HeaderName::CSeq).and_then(parse_cseq)
    }

    /// The message body (already cut to Content-Length).
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.range()]
    }

    /// Byte offset where the body starts (end of the header section).
    pub fn body_offset(&self) -> usize {
        self.body.start as usize
    }

    fn text(&self, s: Span) -> &str {
        let bytes = &self.buf[s.range()];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: `text` is only given spans of the header section, which `parse` checked to
        // be UTF-8 as a whole, and every span was cut from that `str` at char boundaries (ASCII
        // delimiters, or trimming); the buffer is immutable (`Bytes`) and `parse` is the only
        // constructor, so the check need not be repeated on every access.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

/// Parses `CSeq: 0009 INVITE` into (9, "INVITE"); numbers must be below 2^31 (RFC 3261 §8.1.1.5).
fn parse_cseq(v: &str) -> Option<(u32, &str)> {
    let v = scan::trim(v);
    let split = v.find(|c: char| c.is_ascii_whitespace())?;
    let n = scan::parse_u64(&v[..split])?;
    let m = scan::trim(&v[split..]);
    if n >= 1 << 31 || !scan::is_token(m) {
        return None;
    }
    Some((n as u32, m))
}

/// Where `part`, a slice of `buf`, lies in it; a part that is empty text from elsewhere (a
/// parser's `""` for an absent part) is kept as an empty span.
fn span_in(buf: &[u8], part: &str) -> Span {
    let base = buf.as_ptr() as usize;
    let at = part.as_ptr() as usize;
    if at >= base && at + part.len() <= base + buf.len() {
        Span::new(at - base, at - base + part.len())
    } else {
        debug_assert!(part.is_empty());
        Span::default()
    }
}

impl UriSpans {
    /// The spans of `u`, parsed from text of `buf`.
    fn of(buf: &[u8], u: &Uri<'_>) -> Self {
        let opt = |p: Option<&str>| p.map(|p| span_in(buf, p));
        Self {
            raw: span_in(buf, u.raw),
            scheme: span_in(buf, u.scheme),
            user: opt(u.user),
            password: opt(u.password),
            host: span_in(buf, u.host.as_str()),
            port: u.port,
            params: span_in(buf, u.params.as_str()),
            headers: opt(u.headers),
            opaque: opt(u.opaque),
        }
    }

    /// The URI again, over `msg`'s text.
    fn uri<'m>(&self, msg: &'m Message) -> Uri<'m> {
        let opt = |s: Option<Span>| s.map(|s| msg.text(s));
        Uri {
            raw: msg.text(self.raw),
            scheme: msg.text(self.scheme),
            user: opt(self.user),
            password: opt(self.password),
            host: Host(msg.text(self.host)),
            port: self.port,
            params: Params::new(msg.text(self.params)),
            headers: opt(self.headers),
            opaque: opt(self.opaque),
        }
    }
}

fn set_defect(slot: &mut Option<ParseError>, e: ParseError) {
    if slot.is_none() {
        *slot = Some(e);
    }
}

/// Where the first `\r\n\r\n` starts (the end of a message's head).
pub(crate) fn find_blank_line(hay: &[u8]) -> Option<usize> {
    // Built once: a `memmem::find` call builds its searcher every time.
    static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
    HEAD_END.find(hay)
}

/// Returns (end of header lines incl. the last line's CRLF, start of body).
fn find_head_end(b: &[u8], from: usize) -> Option<(usize, usize)> {
    let hay = &b[from..];
    if let Some(i) = find_blank_line(hay) {
        return Some((from + i + 2, from + i + 4));
    }
    if let Some(i) = find(hay, b"\n\n") {
        return Some((from + i + 1, from + i + 2));
    }
    // A datagram that ends right after its last header line, without the empty line.
    if hay.ends_with(b"\r\n") || hay.ends_with(b"\n") {
        return Some((b.len(), b.len()));
    }
    None
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Where a header value starts and ends in its `line`, the value beginning at or after `from`
/// (just past the colon): white space trimmed at both ends as `str::trim` does. ASCII is
/// trimmed byte by byte; `str::trim` is asked only when a non-ASCII byte borders the value.
fn value_bounds(line: &str, from: usize) -> (usize, usize) {
    let b = line.as_bytes();
    let ws = |c: u8| matches!(c, b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c);
    let mut start = from;
    while start < b.len() && ws(b[start]) {
        start += 1;
    }
    if b.get(start).is_some_and(|c| !c.is_ascii()) {
        start = line.len() - line[start..].trim_start().len();
    }
    let mut end = b.len();
    while end > start && ws(b[end - 1]) {
        end -= 1;
    }
    if end > start && !b[end - 1].is_ascii() {
        end = line[..end].trim_end().len().max(start);
    }
    (start, end)
}

/// The name of the header field on `line`: its token prefix (not kept in [`HeaderField`],
/// which stays small enough for a message's fields to live inline; only asked for names of
/// unrecognised headers).
fn name_span(buf: &[u8], line: Span) -> Span {
    let bytes = buf.get(line.range()).unwrap_or_default();
    let len = bytes
        .iter()
        .position(|&c| !scan::is_token_char(c))
        .unwrap_or(bytes.len());
    Span::new(line.start as usize, line.start as usize + len)
}

/// `line` without its line break (`\r\n`, `\n`, or stray `\r`s before it).
fn without_line_break(line: &str) -> &str {
    let b = line.as_bytes();
    let mut end = b.len();
    while end > 0 && matches!(b[end - 1], b'\r' | b'\n') {
        end -= 1;
    }
    // Only ASCII bytes were cut: `end` is a char boundary.
    &line[..end]
}

/// What [`parse_start_line`] finds.
type StartLineParts = (StartLine, Span, Span, Option<UriSpans>);

/// The start line `sl` (text of `buf`): what it is, its second and third parts, and for a
/// request the parsed Request-URI's spans (`None` inside when it does not parse).
fn parse_start_line(
    sl: &str,
    buf: &[u8],
    defect: &mut Option<ParseError>,
) -> Result<StartLineParts, ParseError> {
    let base = span_in(buf, sl).start as usize;
    let bad = ParseError::new(K::BadStartLine);
    if let Some(rest) = sl.strip_prefix("SIP/") {
        // Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
        let mut it = rest.splitn(3, ' ');
        let ver = it.next().ok_or(bad)?;
        let code = it.next().ok_or(bad)?;
        let _reason = it.next();
        let code_n = scan::parse_u64(code)
            .filter(|c| (100..700).contains(c) && code.len() == 3)
            .ok_or(bad)?;
        if ver != "2.0" {
            return Err(ParseError::new(K::UnsupportedVersion));
        }
        let cstart = base + 4 + ver.len() + 1;
        let rstart = (cstart + code.len() + 1).min(base + sl.len());
        return Ok((
            StartLine::Response(code_n as u16),
            Span::new(cstart, cstart + code.len()),
            Span::new(rstart, base + sl.len()),
            None,
        ));
    }
    // Request-Line = Method SP Request-URI SP SIP-Version
    let sp1 = sl.find(' ').ok_or(bad)?;
    let sp2 = sl.rfind(' ').ok_or(bad)?;
    if sp2 <= sp1 {
        return Err(bad);
    }
    let method = &sl[..sp1];
    if !scan::is_token(method) {
        return Err(bad);
    }
    let uri = &sl[sp1 + 1..sp2];
    let version = &sl[sp2 + 1..];
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        // Compared as bytes: the text may be any UTF-8, and slicing a str at 4 could split a char.
        if version.len() > 4 && version.as_bytes()[..4].eq_ignore_ascii_case(b"SIP/") {
            set_defect(defect, ParseError::new(K::UnsupportedVersion));
        } else {
            set_defect(defect, bad);
        }
    }
    // Headers (`?...`) are not allowed in a SIP Request-URI (RFC 3261 §19.1.5, RFC 4475
    // §3.1.2.11).
    let parsed = Uri::parse(uri);
    if uri.is_empty()
        || uri.contains([' ', '\t'])
        || parsed.is_none_or(|u| u.is_sip() && u.headers.is_some())
    {
        set_defect(defect, ParseError::new(K::BadRequestUri));
    }
    Ok((
        StartLine::Request(Method::from_token(method.as_bytes())),
        Span::new(base, base + sp1),
        Span::new(base + sp1 + 1, base + sp2),
        parsed.map(|u| UriSpans::of(buf, &u)),
    ))
}

#[cfg(test)]
mod list_bound_tests {
    use super::*;

    fn with(extra: &str) -> Message {
        let raw = format!(
            "REGISTER sip:a.example SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n{extra}From: <sip:a@a.example>;tag=1\r\nTo: <sip:a@a.example>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"
        );
        Message::parse(Bytes::from(raw), &ParseLimits::default()).unwrap()
    }

    #[test]
    fn too_many_vias_or_contacts_are_refused_naming_the_header() {
        let vias =
            "Via: SIP/2.0/UDP h;branch=z9hG4bKx, SIP/2.0/UDP h;branch=z9hG4bKy\r\n".repeat(35);
        assert_eq!(with(&vias).validate().unwrap_err().header, Some("Via"));
        let contacts = format!("Contact: {}\r\n", vec!["<sip:a@h>"; 33].join(", "));
        assert_eq!(
            with(&contacts).validate().unwrap_err().header,
            Some("Contact")
        );
        let ok = format!("Contact: {}\r\n", vec!["<sip:a@h>"; 32].join(", "));
        assert!(with(&ok).validate().is_ok());
    }
}

#[cfg(test)]
mod field_tests {
    use super::*;

    fn parse(head: &str) -> Message {
        let raw = format!("OPTIONS sip:a.example SIP/2.0\r\n{head}\r\n");
        Message::parse(Bytes::from(raw), &ParseLimits::default()).unwrap()
    }

    #[test]
    fn values_are_trimmed_as_str_trim_does_and_names_kept_as_written() {
        let m = parse("X-A:\t \u{a0}v a\u{a0} \r\nx-b :  \r\nSubject:\u{3000}s\r\n");
        let f = m.fields();
        assert_eq!(f.len(), 3);
        assert_eq!(m.field_value(&f[0]), "v a");
        assert_eq!(m.field_name(&f[0]), "X-A");
        assert_eq!(m.field_value(&f[1]), "");
        assert_eq!(m.field_name(&f[1]), "x-b");
        assert_eq!(m.other_header("X-B"), Some(""));
        assert_eq!(m.header(HeaderName::Subject), Some("s"));
        assert_eq!(m.field_line(&f[2]), "Subject:\u{3000}s\r\n".as_bytes());
    }

    #[test]
    fn tags_are_the_parsed_headers_tags_before_and_after_validation_and_in_clones() {
        let cases = [
            (
                "From: \"A;tag=no\" <sip:a@x;tag=uri>;tag=f1\r\nTo: <sip:b@x>\r\n",
                Some("f1"),
                None,
            ),
            (
                "From: sip:a@x ; tag = f2 \r\nTo: B <sip:b@x>;x=1;TAG=t2\r\n",
                Some("f2"),
                Some("t2"),
            ),
            ("From: <sip:a@x>\r\nTo: <sip:b@x>;tag=\r\n", None, None),
        ];
        for (headers, from, to) in cases {
            let text = format!(
                "INVITE sip:b@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n{headers}Call-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
            );
            let lazy = Message::parse(Bytes::from(text.clone()), &ParseLimits::default()).unwrap();
            let parsed = (
                lazy.from().and_then(|f| f.tag()),
                lazy.to().and_then(|t| t.tag()),
            );
            assert_eq!((lazy.from_tag(), lazy.to_tag()), parsed, "{headers:?}");
            assert_eq!((lazy.from_tag(), lazy.to_tag()), (from, to), "{headers:?}");
            let validated = Message::parse(Bytes::from(text), &ParseLimits::default()).unwrap();
            let _ = validated.validate();
            let copy = validated.clone();
            assert_eq!((validated.from_tag(), validated.to_tag()), (from, to));
            assert_eq!((copy.from_tag(), copy.to_tag()), (from, to));
            assert_eq!(lazy.top_via_branch(), Some("z9hG4bK1"));
            assert_eq!(copy.top_via_branch(), Some("z9hG4bK1"));
        }
        let second = parse("Via: SIP/2.0/UDP h;rport\r\nVia: SIP/2.0/UDP g;branch=z9hG4bK2\r\n");
        assert_eq!(second.top_via_branch(), None, "the top Via has none");
        let none = parse("Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n");
        assert_eq!((none.from_tag(), none.to_tag()), (None, None));
    }

    #[test]
    fn kept_top_via_from_and_to_are_what_parsing_the_header_gives() {
        // Every part, present or absent, equal to a fresh parse of the same text and at the
        // same place in the buffer (rewriting code splices by position); before and after
        // validation, and in a clone made before first use.
        let vias = [
            "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1;rport",
            "SIP/2.0/TCP [2001:db8::1];received=192.0.2.1 ; branch=z9hG4bKx",
            "SIP / 2.0 / WSS host.invalid",
            "SIP/2.0/UDP bad host",
        ];
        let addrs = [
            "\"Ward 7\" <sip:2001:pw@example.com:5070;transport=tcp?subject=x>;tag=a1;x=\"q;\"",
            "sip:b@example.com;tag=t",
            "Bob <sips:b@example.com>",
            "<tel:+15551234>;tag=9",
            "<urn:service:sos>",
            "<sip:example.com;lr>",
            "not an address <",
        ];
        for via in vias {
            for (from, to) in addrs.iter().zip(addrs.iter().rev()) {
                let text = format!(
                    "INVITE sip:b@x SIP/2.0\r\nVia: {via}\r\nVia: SIP/2.0/UDP g;branch=z9hG4bK2\r\nFrom: {from}\r\nTo: {to}\r\nContact: {to}\r\nContact: <sip:second@h>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
                );
                let m = Message::parse(Bytes::from(text), &ParseLimits::default()).unwrap();
                let copy = m.clone();
                let fresh_via = m.values(HeaderName::Via).next().and_then(Via::parse);
                let fresh_from = m.header(HeaderName::From).and_then(NameAddr::parse);
                let fresh_to = m.header(HeaderName::To).and_then(NameAddr::parse);
                let fresh_contact = m.header(HeaderName::Contact).and_then(NameAddr::parse);
                assert_eq!(fresh_contact, fresh_to, "the first Contact field");
                let same = |m: &Message| {
                    let (v, f, t) = (m.top_via(), m.from(), m.to());
                    assert_eq!(v, fresh_via, "{via:?}");
                    assert_eq!(f, fresh_from, "{from:?}");
                    assert_eq!(t, fresh_to, "{to:?}");
                    assert_eq!(m.contact(), fresh_contact, "{to:?}");
                    if let (Some(v), Some(fresh)) = (v, fresh_via) {
                        assert_eq!(v.host.as_str().as_ptr(), fresh.host.as_str().as_ptr());
                    }
                    if let (Some(f), Some(fresh)) = (f, fresh_from) {
                        assert_eq!(f.uri.raw.as_ptr(), fresh.uri.raw.as_ptr());
                        assert_eq!(f.params.as_str().len(), fresh.params.as_str().len());
                    }
                };
                same(&m);
                same(&m); // from the memo
                let _ = m.validate();
                same(&m);
                same(&copy);
                assert_eq!(
                    m.validate().is_ok(),
                    fresh_via.is_some() && fresh_from.is_some() && fresh_to.is_some()
                );
            }
        }
    }

    #[test]
    fn the_kept_request_uri_is_what_parsing_it_gives() {
        for uri in [
            "sip:2002@example.com;user=phone",
            "sips:[2001:db8::2]:5061;transport=tls",
            "tel:+15551234",
            "sip:example.com",
            "sip:a@b?subject=x",
            "sip:",
            "<sip:a@b>",
        ] {
            let text = format!(
                "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
            );
            let m = Message::parse(Bytes::from(text), &ParseLimits::default()).unwrap();
            let fresh = Uri::parse(m.request_uri_str());
            assert_eq!(m.request_uri(), fresh, "{uri:?}");
            assert_eq!(m.clone().request_uri(), fresh, "{uri:?}");
            if let (Some(kept), Some(fresh)) = (m.request_uri(), fresh) {
                assert_eq!(kept.raw.as_ptr(), fresh.raw.as_ptr());
            }
            let usable = fresh.is_some_and(|u| !(u.is_sip() && u.headers.is_some()));
            assert_eq!(m.validate().is_ok(), usable, "{uri:?}");
        }
        let resp = Message::parse(
            Bytes::from_static(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\n"),
            &ParseLimits::default(),
        )
        .unwrap();
        assert_eq!(resp.request_uri(), None);
    }

    #[test]
    fn a_line_without_a_token_and_colon_is_a_defect_and_not_a_field() {
        for bad in ["Bad Name: v\r\n", ": v\r\n", "NoColon\r\n", "Näme: v\r\n"] {
            let m = parse(&format!("Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n{bad}"));
            assert_eq!(m.fields().len(), 1, "{bad:?}");
            assert!(m.validate().is_err(), "{bad:?}");
        }
        let m = parse("Via : SIP/2.0/UDP h;branch=z9hG4bK1\r\n");
        assert_eq!(
            m.header(HeaderName::Via),
            Some("SIP/2.0/UDP h;branch=z9hG4bK1")
        );
    }
}
