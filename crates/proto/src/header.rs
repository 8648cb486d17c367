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
        // Lower-cased into a stack buffer, then one `match` on the bytes (a switch on the
        // length, then a comparison or two): this runs for every header of every message.
        let mut lower = [0u8; LONGEST_NAME];
        let Some(dst) = lower.get_mut(..name.len()) else {
            return Self::Other;
        };
        for (d, s) in dst.iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        match &*dst {
            b"via" => Self::Via,
            b"from" => Self::From,
            b"to" => Self::To,
            b"call-id" => Self::CallId,
            b"cseq" => Self::CSeq,
            b"contact" => Self::Contact,
            b"max-forwards" => Self::MaxForwards,
            b"expires" => Self::Expires,
            b"min-expires" => Self::MinExpires,
            b"content-length" => Self::ContentLength,
            b"content-type" => Self::ContentType,
            b"content-encoding" => Self::ContentEncoding,
            b"authorization" => Self::Authorization,
            b"proxy-authorization" => Self::ProxyAuthorization,
            b"www-authenticate" => Self::WwwAuthenticate,
            b"proxy-authenticate" => Self::ProxyAuthenticate,
            b"route" => Self::Route,
            b"record-route" => Self::RecordRoute,
            b"user-agent" => Self::UserAgent,
            b"server" => Self::Server,
            b"supported" => Self::Supported,
            b"require" => Self::Require,
            b"proxy-require" => Self::ProxyRequire,
            b"unsupported" => Self::Unsupported,
            b"allow" => Self::Allow,
            b"path" => Self::Path,
            b"subject" => Self::Subject,
            b"event" => Self::Event,
            b"allow-events" => Self::AllowEvents,
            b"refer-to" => Self::ReferTo,
            b"referred-by" => Self::ReferredBy,
            b"session-expires" => Self::SessionExpires,
            b"accept-contact" => Self::AcceptContact,
            b"reject-contact" => Self::RejectContact,
            b"request-disposition" => Self::RequestDisposition,
            b"identity" => Self::Identity,
            b"identity-info" => Self::IdentityInfo,
            b"date" => Self::Date,
            b"timestamp" => Self::Timestamp,
            _ => Self::Other,
        }
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

/// The longest name in [`LONG_NAMES`]; anything longer is [`HeaderName::Other`].
const LONGEST_NAME: usize = 19;

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

    #[test]
    fn every_long_name_in_any_case() {
        for (canon, h) in LONG_NAMES {
            assert!(canon.len() <= LONGEST_NAME, "{canon}");
            assert_eq!(HeaderName::from_bytes(canon.as_bytes()), *h, "{canon}");
            let upper = canon.to_ascii_uppercase();
            assert_eq!(HeaderName::from_bytes(upper.as_bytes()), *h, "{canon}");
            assert_eq!(h.as_str(), *canon);
        }
        assert_eq!(HeaderName::from_bytes(b""), HeaderName::Other);
        assert_eq!(
            HeaderName::from_bytes(b"Proxy-Authorizations"),
            HeaderName::Other
        );
        assert_eq!(HeaderName::from_bytes(b"Via-"), HeaderName::Other);
    }
}
