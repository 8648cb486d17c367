//! RFC 4475 torture messages: the valid ones parse and validate, the invalid ones are either
//! refused by `parse` (nothing can be answered) or by `validate` (answered 400/505).
//!
//! Messages are written with `\n` line ends and converted to CRLF, as on the wire.

use bytes::Bytes;
use careflow_proto::{Message, ParseErrorKind, ParseLimits};

mod invalid;
mod valid;

fn wire(s: &str) -> Bytes {
    Bytes::from(s.replace('\n', "\r\n"))
}

fn parse(s: &str) -> Result<Message, careflow_proto::ParseError> {
    Message::parse(wire(s), &ParseLimits::default())
}

fn valid(s: &str) -> Message {
    let m = parse(s).expect("parses");
    m.validate().expect("validates");
    m
}

fn invalid(s: &str) -> ParseErrorKind {
    match parse(s) {
        Err(e) => e.kind,
        Ok(m) => m.validate().expect_err("must be refused").kind,
    }
}
