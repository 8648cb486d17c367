//! Stream framing for TCP/TLS (RFC 3261 §18.3): a message ends `Content-Length` bytes after
//! the empty line. "Need more bytes" is not an error; CRLF keep-alives (RFC 5626 §4.4.1) are
//! recognised between messages.

use crate::message::find_blank_line;
use crate::scan;

/// What the start of a stream buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Not enough bytes yet.
    Incomplete,
    /// A keep-alive of this many bytes: `CRLFCRLF` is a ping to answer with `CRLF`
    /// (`ping == true`); a lone `CRLF` is a pong or padding.
    KeepAlive {
        /// Bytes to consume.
        len: usize,
        /// Whether the peer expects a CRLF pong.
        ping: bool,
    },
    /// A complete message of this many bytes.
    Message(usize),
}

/// The stream cannot be framed; the connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The message (or its header section) exceeds the maximum size.
    #[error("message exceeds the maximum size")]
    TooLarge,
    /// Content-Length is missing a value or is not a number.
    #[error("invalid Content-Length")]
    BadContentLength,
}

/// Looks at the start of `buf` and says how much of it forms the next frame.
pub fn next_frame(buf: &[u8], max_size: usize) -> Result<Frame, FrameError> {
    if buf.is_empty() {
        return Ok(Frame::Incomplete);
    }
    if buf[0] == b'\r' || buf[0] == b'\n' {
        if buf.starts_with(b"\r\n\r\n") {
            return Ok(Frame::KeepAlive { len: 4, ping: true });
        }
        if buf.len() < 4 && b"\r\n\r\n".starts_with(buf) {
            return Ok(Frame::Incomplete);
        }
        let len = if buf.starts_with(b"\r\n") { 2 } else { 1 };
        return Ok(Frame::KeepAlive { len, ping: false });
    }
    let Some(end) = find_blank_line(buf) else {
        if buf.len() > max_size {
            return Err(FrameError::TooLarge);
        }
        return Ok(Frame::Incomplete);
    };
    let head = &buf[..end + 2];
    let cl = content_length(head)?;
    let total = (end + 4).checked_add(cl).ok_or(FrameError::TooLarge)?;
    if total > max_size {
        return Err(FrameError::TooLarge);
    }
    if buf.len() < total {
        return Ok(Frame::Incomplete);
    }
    Ok(Frame::Message(total))
}

fn content_length(head: &[u8]) -> Result<usize, FrameError> {
    // Line starts from one SIMD pass; only a line whose name can be `Content-Length` or `l`
    // (first byte after any white space `c` or `l`) is looked at further. The first line is
    // the start line.
    let mut newlines = memchr::memchr_iter(b'\n', head);
    let mut next_start = newlines.next().map(|i| i + 1);
    while let Some(start) = next_start {
        let end = newlines.next();
        next_start = end.map(|e| e + 1);
        let line = &head[start..end.unwrap_or(head.len())];
        let first = line.iter().find(|&&b| !scan::is_lws(b));
        if !matches!(first, Some(b'c' | b'C' | b'l' | b'L')) {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim_bytes(&line[..colon]);
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            let v = std::str::from_utf8(&line[colon + 1..])
                .map_err(|_| FrameError::BadContentLength)?;
            let n = scan::parse_u64(v).ok_or(FrameError::BadContentLength)?;
            return usize::try_from(n).map_err(|_| FrameError::TooLarge);
        }
    }
    // RFC 3261 §20.14 requires it on streams; a missing one is read as no body.
    Ok(0)
}

fn trim_bytes(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !scan::is_lws(*c)).unwrap_or(b.len());
    let e = b
        .iter()
        .rposition(|c| !scan::is_lws(*c))
        .map_or(s, |e| e + 1);
    &b[s..e]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `content_length` as it was first written, every line split and searched for its colon.
    fn reference_content_length(head: &[u8]) -> Result<usize, FrameError> {
        for line in head.split(|&b| b == b'\n').skip(1) {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let name = trim_bytes(&line[..colon]);
            if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
                let v = std::str::from_utf8(&line[colon + 1..])
                    .map_err(|_| FrameError::BadContentLength)?;
                let n = scan::parse_u64(v).ok_or(FrameError::BadContentLength)?;
                return usize::try_from(n).map_err(|_| FrameError::TooLarge);
            }
        }
        Ok(0)
    }

    #[test]
    fn content_length_reads_what_the_line_by_line_version_reads() {
        let alphabet = [
            "\r\n",
            "\n",
            "Content-Length",
            "content-length",
            "l",
            "L",
            "c",
            " ",
            "\t",
            ":",
            "12",
            "x",
            "Via",
            "é",
            "99999999999999999999999",
        ];
        for s in crate::test_inputs::generated(&alphabet, 5, 100_000) {
            let head = format!("REGISTER sip:x SIP/2.0\r\n{s}\r\n");
            assert_eq!(
                format!("{:?}", content_length(head.as_bytes())),
                format!("{:?}", reference_content_length(head.as_bytes())),
                "{s:?}"
            );
        }
    }

    const MSG: &[u8] = b"MESSAGE sip:a@b SIP/2.0\r\nl: 5\r\n\r\nhello";

    #[test]
    fn frames_by_content_length() {
        assert_eq!(next_frame(&MSG[..10], 1000), Ok(Frame::Incomplete));
        assert_eq!(
            next_frame(&MSG[..MSG.len() - 1], 1000),
            Ok(Frame::Incomplete)
        );
        assert_eq!(next_frame(MSG, 1000), Ok(Frame::Message(MSG.len())));
        let mut two = MSG.to_vec();
        two.extend_from_slice(MSG);
        assert_eq!(next_frame(&two, 1000), Ok(Frame::Message(MSG.len())));
        assert_eq!(next_frame(MSG, 20), Err(FrameError::TooLarge));
    }

    #[test]
    fn keepalives() {
        assert_eq!(
            next_frame(b"\r\n\r\n", 100),
            Ok(Frame::KeepAlive { len: 4, ping: true })
        );
        assert_eq!(next_frame(b"\r\n", 100), Ok(Frame::Incomplete));
        assert_eq!(
            next_frame(b"\r\nINV", 100),
            Ok(Frame::KeepAlive {
                len: 2,
                ping: false
            })
        );
    }

    #[test]
    fn bad_length() {
        assert_eq!(
            next_frame(b"A b SIP/2.0\r\nContent-Length: x\r\n\r\n", 100),
            Err(FrameError::BadContentLength)
        );
        assert_eq!(
            next_frame(
                b"A b SIP/2.0\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                100
            ),
            Err(FrameError::BadContentLength)
        );
    }
}
