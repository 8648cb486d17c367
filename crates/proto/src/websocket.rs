//! WebSocket (RFC 6455) as SIP uses it (RFC 7118), server side only: the HTTP upgrade
//! handshake and frame codec, without I/O. careflow-sip never dials WebSocket clients (they are
//! reached over the connection they opened), so only the server half is here.
//!
//! One SIP message travels in one (possibly fragmented) text or binary message.

use bytes::{BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};

use crate::message::find;
use crate::scan;

/// The GUID every accept key is derived with (RFC 6455 §1.3).
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The largest upgrade request accepted; browsers send well under 2 KiB.
pub const MAX_HANDSHAKE: usize = 8 * 1024;

/// A parsed upgrade request (only what the server checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Request target, e.g. `/`.
    pub path: String,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// Whether `sip` was among the offered subprotocols.
    pub offers_sip: bool,
    /// `Origin`, when sent (browsers always send it).
    pub origin: Option<String>,
    /// `Sec-WebSocket-Version` value.
    pub version: Option<String>,
    /// Bytes the request took (anything after it is already frame data).
    pub len: usize,
}

/// Why an upgrade request is refused; each maps to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Not a GET with the upgrade headers.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// The request head exceeds [`MAX_HANDSHAKE`].
    #[error("upgrade request too large")]
    TooLarge,
    /// A version other than 13.
    #[error("unsupported WebSocket version")]
    Version,
    /// The `sip` subprotocol was not offered (RFC 7118 §4.1 requires it).
    #[error("the sip subprotocol is required")]
    NoSipProtocol,
    /// Another path than the configured one.
    #[error("unknown path")]
    Path,
    /// The Origin is not allowed.
    #[error("origin not allowed")]
    Origin,
}

impl HandshakeError {
    /// HTTP status and reason to answer with.
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Self::NotUpgrade | Self::NoSipProtocol => (400, "Bad Request"),
            Self::TooLarge => (431, "Request Header Fields Too Large"),
            Self::Version => (426, "Upgrade Required"),
            Self::Path => (404, "Not Found"),
            Self::Origin => (403, "Forbidden"),
        }
    }
}

/// Looks for a complete upgrade request at the start of `buf`. `Ok(None)`: need more bytes.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<Upgrade>, HandshakeError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HANDSHAKE {
            Err(HandshakeError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end + 4 > MAX_HANDSHAKE {
        return Err(HandshakeError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HandshakeError::NotUpgrade)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some("GET"), Some(path), Some(v)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(HandshakeError::NotUpgrade);
    };
    if !v.starts_with("HTTP/1.") {
        return Err(HandshakeError::NotUpgrade);
    }
    let mut key = None;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut offers_sip = false;
    let mut origin = None;
    let mut version = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HandshakeError::NotUpgrade);
        };
        let value = scan::trim(value);
        let name = name.trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            offers_sip |= tokens(value).any(|t| t.eq_ignore_ascii_case("sip"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value.to_string());
        }
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(HandshakeError::NotUpgrade);
    };
    if !upgrade || !connection_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    Ok(Some(Upgrade {
        path: path.to_string(),
        key,
        offers_sip,
        origin,
        version,
        len: end + 4,
    }))
}

fn tokens(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim)
}

impl Upgrade {
    /// Checks the request against the listener's rules: version 13, the `sip` subprotocol,
    /// the path, and the Origin allow-list (`None`: any origin; a request without Origin, from
    /// a non-browser client, passes unless `require_origin`).
    pub fn check(
        &self,
        path: &str,
        allowed_origins: Option<&[String]>,
        require_origin: bool,
    ) -> Result<(), HandshakeError> {
        if self.version.as_deref() != Some("13") {
            return Err(HandshakeError::Version);
        }
        let target = self.path.split('?').next().unwrap_or_default();
        if target != path {
            return Err(HandshakeError::Path);
        }
        if !self.offers_sip {
            return Err(HandshakeError::NoSipProtocol);
        }
        match (&self.origin, allowed_origins) {
            (None, _) if require_origin => Err(HandshakeError::Origin),
            (Some(o), Some(list)) if !list.iter().any(|a| a.eq_ignore_ascii_case(o)) => {
                Err(HandshakeError::Origin)
            }
            _ => Ok(()),
        }
    }

    /// The `101 Switching Protocols` answer.
    pub fn accept_response(&self) -> Bytes {
        Bytes::from(format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: sip\r\n\r\n",
            accept_key(&self.key)
        ))
    }
}

/// An HTTP error answer to a refused upgrade (the connection is closed after it).
pub fn refuse_response(err: HandshakeError) -> Bytes {
    let (code, reason) = err.status();
    let extra = if err == HandshakeError::Version {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    Bytes::from(format!(
        "HTTP/1.1 {code} {reason}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    ))
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID);
    base64(&h.finalize())
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation,
    /// UTF-8 text.
    Text,
    /// Binary data.
    Binary,
    /// Close.
    Close,
    /// Ping.
    Ping,
    /// Pong.
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Continuation,
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0,
            Self::Text => 1,
            Self::Binary => 2,
            Self::Close => 8,
            Self::Ping => 9,
            Self::Pong => 10,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A frame that violates RFC 6455; the connection is closed (with status 1002 or 1009).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Reserved bits, unknown opcode, unmasked client frame, bad control frame, or a
    /// continuation out of place.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// A message larger than allowed.
    #[error("websocket message too large")]
    TooLarge,
}

impl FrameError {
    /// Close status code (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            Self::Protocol(_) => 1002,
            Self::TooLarge => 1009,
        }
    }
}

/// One decoded (unmasked) frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Final fragment.
    pub fin: bool,
    /// Opcode.
    pub opcode: Opcode,
    /// Unmasked payload.
    pub payload: Bytes,
}

/// Decodes one client frame from the start of `buf`, consuming it. `Ok(None)`: need more.
/// Client frames must be masked (RFC 6455 §5.1).
pub fn decode_frame(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_bits(b0 & 0x0f).ok_or(FrameError::Protocol("unknown opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("unmasked client frame"));
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode.is_control() && (len > 125 || !fin) {
        return Err(FrameError::Protocol("bad control frame"));
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge);
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    let _ = buf.split_to(at);
    let mut payload = buf.split_to(len);
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Ok(Some(Frame {
        fin,
        opcode,
        payload: payload.freeze(),
    }))
}

/// Encodes one unmasked server frame.
pub fn encode_frame(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.put_u8(0x80 | opcode.bits());
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.put_slice(payload);
    out.freeze()
}

/// A SIP message for the wire: text frame when it is UTF-8 (what browsers' SIP stacks
/// expect), binary otherwise.
pub fn encode_message(msg: &[u8]) -> Bytes {
    let op = if std::str::from_utf8(msg).is_ok() {
        Opcode::Text
    } else {
        Opcode::Binary
    };
    encode_frame(op, msg)
}

/// A close frame with a status code.
pub fn close_frame(code: u16) -> Bytes {
    encode_frame(Opcode::Close, &code.to_be_bytes())
}

/// What the connection should do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete SIP message.
    Message(Bytes),
    /// Answer a ping with this pong payload.
    Pong(Bytes),
    /// The peer closed; answer with a close frame and end.
    Close,
    /// Nothing to do (a pong, or a fragment of a message still incomplete).
    None,
}

/// Joins fragmented messages; one per connection.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Option<BytesMut>,
}

impl Reassembler {
    /// Feeds one frame; `max` bounds the reassembled message.
    pub fn push(&mut self, frame: Frame, max: usize) -> Result<Event, FrameError> {
        match frame.opcode {
            Opcode::Ping => Ok(Event::Pong(frame.payload)),
            Opcode::Pong => Ok(Event::None),
            Opcode::Close => Ok(Event::Close),
            Opcode::Text | Opcode::Binary => {
                if self.partial.is_some() {
                    return Err(FrameError::Protocol("new message inside a fragmented one"));
                }
                if frame.fin {
                    Ok(Event::Message(frame.payload))
                } else {
                    self.partial = Some(BytesMut::from(&frame.payload[..]));
                    Ok(Event::None)
                }
            }
            Opcode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(FrameError::Protocol("continuation without a message"));
                };
                if partial.len() + frame.payload.len() > max {
                    return Err(FrameError::TooLarge);
                }
                partial.extend_from_slice(&frame.payload);
                if frame.fin {
                    let whole = self.partial.take().unwrap_or_default();
                    Ok(Event::Message(whole.freeze()))
                } else {
                    Ok(Event::None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
