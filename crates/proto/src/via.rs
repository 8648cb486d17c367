//! Via header values (RFC 3261 §20.42, RFC 3581 rport).

use crate::name_addr::Params;
use crate::scan;
use crate::uri::{Host, split_host_port};

/// RFC 3261 branch magic cookie.
pub const MAGIC_COOKIE: &str = "z9hG4bK";

/// One Via value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// Transport token (UDP, TCP, TLS, WS, WSS, SCTP, ...), as written.
    pub transport: &'a str,
    /// sent-by host.
    pub host: Host<'a>,
    /// sent-by port, when given.
    pub port: Option<u16>,
    /// Via parameters.
    pub params: Params<'a>,
}

impl<'a> Via<'a> {
    /// Parses `SIP / 2.0 / UDP host[:port] *(;param)`, whitespace allowed around `/`.
    pub fn parse(s: &'a str) -> Option<Self> {
        let s = scan::trim(s);
        let (proto, rest) = take_token(s)?;
        if !proto.eq_ignore_ascii_case("SIP") {
            return None;
        }
        let rest = scan::trim(rest).strip_prefix('/')?;
        let (version, rest) = take_token(scan::trim(rest))?;
        if version != "2.0" {
            return None;
        }
        let rest = scan::trim(rest).strip_prefix('/')?;
        let (transport, rest) = take_token(scan::trim(rest))?;
        let rest = scan::trim(rest);
        let (sent_by, params) = match crate::name_addr::position(rest, b';') {
            Some(i) => (scan::trim(&rest[..i]), &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = split_host_port(sent_by)?;
        if host.is_empty()
            || host.bytes().any(scan::is_lws)
            || !(host.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        {
            return None;
        }
        let params = Params::new(params);
        if !params.well_formed() {
            return None;
        }
        Some(Self {
            transport,
            host: Host(host),
            port,
            params,
        })
    }

    /// The branch parameter.
    pub fn branch(&self) -> Option<&'a str> {
        self.params.get("branch").flatten()
    }

    /// True when the branch carries the RFC 3261 magic cookie (and something after it).
    pub fn has_rfc3261_branch(&self) -> bool {
        self.branch()
            .is_some_and(|b| b.len() > MAGIC_COOKIE.len() && b.starts_with(MAGIC_COOKIE))
    }

    /// `Some(None)` for a bare `rport` (the client asks for it), `Some(Some(v))` when filled.
    pub fn rport(&self) -> Option<Option<&'a str>> {
        self.params.get("rport")
    }

    /// The `received` parameter.
    pub fn received(&self) -> Option<&'a str> {
        self.params.get("received").flatten()
    }

    /// Whether the transport is connection-oriented (TCP, TLS, WS, WSS, SCTP).
    pub fn is_reliable(&self) -> bool {
        !self.transport.eq_ignore_ascii_case("UDP")
    }
}

fn take_token(s: &str) -> Option<(&str, &str)> {
    let end = s
        .bytes()
        .position(|b| !scan::is_token_char(b))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((&s[..end], &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_via() {
        let v =
            Via::parse("SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;rport;branch=390skdjuw").unwrap();
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host.as_str(), "192.0.2.2");
        assert_eq!(v.rport(), Some(None));
        assert_eq!(v.branch(), Some("390skdjuw"));
        assert!(!v.has_rfc3261_branch());
        let v = Via::parse("SIP/2.0/TCP [2001:db8::9:1]:5070;branch=z9hG4bKx ; received=1.2.3.4")
            .unwrap();
        assert_eq!(v.port, Some(5070));
        assert!(v.has_rfc3261_branch());
        assert_eq!(v.received(), Some("1.2.3.4"));
    }

    #[test]
    fn bad_via() {
        assert!(Via::parse("SIP/2.0/UDP").is_none());
        assert!(Via::parse("SIP/3.0/UDP host").is_none());
        assert!(Via::parse("SIP/2.0/UDP host:70000").is_none());
        assert!(Via::parse("SIP/2.0/UDP ho st").is_none());
    }
}
