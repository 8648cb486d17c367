//! SIP message model for careflow-sip.
//!
//! Owns everything that is pure protocol text: parsing a datagram or a framed stream message
//! into a [`Message`] (one `Bytes` buffer plus spans, no per-header allocation), typed views
//! parsed lazily from those spans ([`Via`], [`NameAddr`], [`Uri`], [`CSeq`], digest
//! credentials), stream framing by Content-Length ([`framing`]), building responses that copy
//! the request's headers byte for byte ([`ResponseBuilder`]) and the digest math of RFC 7616.
//!
//! It does no I/O, reads no clock and holds no configuration beyond what callers pass in.
#![warn(missing_docs)]

pub mod bencode;
pub mod digest;
mod error;
pub mod framing;
mod header;
mod message;
mod method;
mod name_addr;
pub mod request;
mod response;
pub mod rewrite;
pub mod scan;
pub mod stun;
#[cfg(test)]
mod test_inputs;
mod uri;
mod via;
pub mod websocket;

pub use error::{ParseError, ParseErrorKind};
pub use header::HeaderName;
pub use message::{HeaderField, MAX_CONTACTS, MAX_VIAS, Message, ParseLimits, StartLine};
pub use method::Method;
pub use name_addr::{NameAddr, Params};
pub use response::{ResponseBuilder, reason_phrase};
pub use uri::{Host, Uri};
pub use via::{MAGIC_COOKIE, Via};
