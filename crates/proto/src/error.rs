//! Parse errors. Cheap to create: they happen in normal operation on a public port.

/// What was wrong with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// No blank line ends the header section.
    MissingHeaderEnd,
    /// The start line is neither a request line nor a status line.
    BadStartLine,
    /// The SIP version is not SIP/2.0 (a server answers 505).
    UnsupportedVersion,
    /// A header line has no colon or an invalid name.
    BadHeaderLine,
    /// The header section is not UTF-8.
    NotUtf8,
    /// A mandatory header (Via, From, To, Call-ID, CSeq) is missing.
    MissingHeader,
    /// A header that may appear once appears with conflicting values.
    DuplicateHeader,
    /// A header value does not follow its grammar.
    BadHeaderValue,
    /// CSeq method differs from the request method.
    CSeqMismatch,
    /// Content-Length is larger than the body received, or invalid.
    BadContentLength,
    /// The message is larger than the configured maximum.
    TooLarge,
    /// More headers than the configured maximum.
    TooManyHeaders,
    /// More values of one header (Via, Contact) than any server accepts.
    TooManyValues,
    /// The Request-URI does not parse.
    BadRequestUri,
}

/// A parse failure, with the header it concerns when known, so a 400 can say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub struct ParseError {
    /// What went wrong.
    pub kind: ParseErrorKind,
    /// The header concerned, if any.
    pub header: Option<&'static str>,
}

impl ParseError {
    pub(crate) const fn new(kind: ParseErrorKind) -> Self {
        Self { kind, header: None }
    }

    pub(crate) const fn in_header(kind: ParseErrorKind, header: &'static str) -> Self {
        Self {
            kind,
            header: Some(header),
        }
    }

    /// A short reason phrase suitable for a 400 response.
    pub fn reason(&self) -> &'static str {
        use ParseErrorKind::*;
        match (self.kind, self.header) {
            (MissingHeader, Some("Via")) => "Missing Via",
            (MissingHeader, Some("From")) => "Missing From",
            (MissingHeader, Some("To")) => "Missing To",
            (MissingHeader, Some("Call-ID")) => "Missing Call-ID",
            (MissingHeader, Some("CSeq")) => "Missing CSeq",
            (MissingHeader, _) => "Missing Mandatory Header",
            (BadHeaderValue, Some("Via")) => "Bad Via",
            (BadHeaderValue, Some("From")) => "Bad From",
            (BadHeaderValue, Some("To")) => "Bad To",
            (BadHeaderValue, Some("CSeq")) => "Bad CSeq",
            (BadHeaderValue, Some("Max-Forwards")) => "Bad Max-Forwards",
            (BadHeaderValue, Some("Expires")) => "Bad Expires",
            (BadHeaderValue, Some("Contact")) => "Bad Contact",
            (BadHeaderValue, _) => "Bad Header Value",
            (DuplicateHeader, _) => "Conflicting Duplicate Header",
            (CSeqMismatch, _) => "CSeq Method Mismatch",
            (BadContentLength, _) => "Bad Content-Length",
            (MissingHeaderEnd, _) => "Incomplete Message",
            (BadStartLine, _) => "Bad Request Line",
            (UnsupportedVersion, _) => "Version Not Supported",
            (BadHeaderLine, _) => "Bad Header Line",
            (NotUtf8, _) => "Invalid UTF-8 In Headers",
            (TooLarge, _) => "Message Too Large",
            (TooManyHeaders, _) => "Too Many Header Fields (MAX_HEADERS)",
            (TooManyValues, Some("Contact")) => "Too Many Contacts (limit 32)",
            (TooManyValues, Some("Via")) => "Too Many Vias (limit 70)",
            (TooManyValues, _) => "Too Many Header Values",
            (BadRequestUri, _) => "Bad Request-URI",
        }
    }
}
