//! Header names: the ones careflow-sip interprets, compact forms (RFC 3261 §7.3.3 and the
//! extensions that define one) and everything else as [`HeaderName::Other`].

/// A header name, recognised case-insensitively in long or compact form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    MaxForwards,
    Expires,
    MinExpires,
    ContentLength,
    ContentType,
    ContentEncoding,
    Authorization,
    ProxyAuthorization,
    WwwAuthenticate,
    ProxyAuthenticate,
    Route,
    RecordRoute,
    UserAgent,
    Server,
    Supported,
    Require,
    ProxyRequire,
    Unsupported,
    Allow,
    Path,
    Subject,
    Event,
    AllowEvents,
    ReferTo,
    ReferredBy,
    SessionExpires,
    AcceptContact,
    RejectContact,
    RequestDisposition,
    Identity,
    IdentityInfo,
    Date,
    Timestamp,
    Other,
}

impl HeaderName {
    /// Classifies a header name as it appears on the wire.
    pub fn from_bytes(name: &[u8]) -> Self {
        if name.len() == 1 {
            return match name[0].to_ascii_lowercase() {
                b'v' => Self::Via,
                b'f' => Self::From,
                b't' => Self::To,
                b'i' => Self::CallId,
                b'm' => Self::Contact,
                b'l' => Self::ContentLength,
                b'c' => Self::ContentType,
                b'e' => Self::ContentEncoding,
                b'k' => Self::Supported,
                b's' => Self::Subject,
                b'o' => Self::Event,
                b'u' => Self::AllowEvents,
                b'r' => Self::ReferTo,
                b'b' => Self::ReferredBy,
                b'x' => Self::SessionExpires,
                b'a' => Self::AcceptContact,
                b'j' => Self::RejectContact,
                b'd' => Self::RequestDisposition,
                b'y' => Self::Identity,
                b'n' => Self::IdentityInfo,
                _ => Self::Other,
            };
        }
        // Length and first letter rule out nearly every name before a full comparison.
        let Some(first) = name.first().map(u8::to_ascii_lowercase) else {
            return Self::Other;
        };
        for (canon, h) in LONG_NAMES {
            let c = canon.as_bytes();
            if c.len() == name.len()
                && c[0].to_ascii_lowercase() == first
                && c.eq_ignore_ascii_case(name)
            {
                return *h;
            }
        }
        Self::Other
    }

    /// The canonical long form, used when careflow-sip writes the header itself.
    pub fn as_str(self) -> &'static str {
        for (canon, h) in LONG_NAMES {
            if *h == self {
                return canon;
            }
        }
        ""
    }

    /// Whether the header's grammar is a comma-separated list (RFC 3261 §7.3.1), so several
    /// values may share one line. Authorization-style headers are not: their commas separate
    /// parameters.
    pub fn is_list(self) -> bool {
        matches!(
            self,
            Self::Via
                | Self::Contact
                | Self::Route
                | Self::RecordRoute
                | Self::Supported
                | Self::Require
                | Self::ProxyRequire
                | Self::Unsupported
                | Self::Allow
                | Self::Path
                | Self::AllowEvents
                | Self::AcceptContact
                | Self::RejectContact
        )
    }
}

const LONG_NAMES: &[(&str, HeaderName)] = &[
    ("Via", HeaderName::Via),
    ("From", HeaderName::From),
    ("To", HeaderName::To),
    ("Call-ID", HeaderName::CallId),
    ("CSeq", HeaderName::CSeq),
    ("Contact", HeaderName::Contact),
    ("Max-Forwards", HeaderName::MaxForwards),
    ("Expires", HeaderName::Expires),
    ("Min-Expires", HeaderName::MinExpires),
    ("Content-Length", HeaderName::ContentLength),
    ("Content-Type", HeaderName::ContentType),
    ("Content-Encoding", HeaderName::ContentEncoding),
    ("Authorization", HeaderName::Authorization),
    ("Proxy-Authorization", HeaderName::ProxyAuthorization),
    ("WWW-Authenticate", HeaderName::WwwAuthenticate),
    ("Proxy-Authenticate", HeaderName::ProxyAuthenticate),
    ("Route", HeaderName::Route),
    ("Record-Route", HeaderName::RecordRoute),
    ("User-Agent", HeaderName::UserAgent),
    ("Server", HeaderName::Server),
    ("Supported", HeaderName::Supported),
    ("Require", HeaderName::Require),
    ("Proxy-Require", HeaderName::ProxyRequire),
    ("Unsupported", HeaderName::Unsupported),
    ("Allow", HeaderName::Allow),
    ("Path", HeaderName::Path),
    ("Subject", HeaderName::Subject),
    ("Event", HeaderName::Event),
    ("Allow-Events", HeaderName::AllowEvents),
    ("Refer-To", HeaderName::ReferTo),
    ("Referred-By", HeaderName::ReferredBy),
    ("Session-Expires", HeaderName::SessionExpires),
    ("Accept-Contact", HeaderName::AcceptContact),
    ("Reject-Contact", HeaderName::RejectContact),
    ("Request-Disposition", HeaderName::RequestDisposition),
    ("Identity", HeaderName::Identity),
    ("Identity-Info", HeaderName::IdentityInfo),
    ("Date", HeaderName::Date),
    ("Timestamp", HeaderName::Timestamp),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_and_case() {
        assert_eq!(HeaderName::from_bytes(b"v"), HeaderName::Via);
        assert_eq!(HeaderName::from_bytes(b"I"), HeaderName::CallId);
        assert_eq!(HeaderName::from_bytes(b"cAlL-iD"), HeaderName::CallId);
        assert_eq!(
            HeaderName::from_bytes(b"MaX-fOrWaRdS"),
            HeaderName::MaxForwards
        );
        assert_eq!(HeaderName::from_bytes(b"X-Foo"), HeaderName::Other);
        assert_eq!(HeaderName::CallId.as_str(), "Call-ID");
    }
}
