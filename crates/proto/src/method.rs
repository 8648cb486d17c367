//! SIP methods.

/// A request method. Extension methods are [`Method::Other`]; their text stays in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// INVITE
    Invite,
    /// ACK
    Ack,
    /// BYE
    Bye,
    /// CANCEL
    Cancel,
    /// REGISTER
    Register,
    /// OPTIONS
    Options,
    /// INFO
    Info,
    /// UPDATE
    Update,
    /// PRACK
    Prack,
    /// SUBSCRIBE
    Subscribe,
    /// NOTIFY
    Notify,
    /// REFER
    Refer,
    /// MESSAGE
    Message,
    /// PUBLISH
    Publish,
    /// Any other token. Methods are case-sensitive (RFC 3261 §7.1).
    Other,
}

impl Method {
    /// Classifies a method token. Case-sensitive, as RFC 3261 requires.
    pub fn from_token(token: &[u8]) -> Self {
        match token {
            b"INVITE" => Self::Invite,
            b"ACK" => Self::Ack,
            b"BYE" => Self::Bye,
            b"CANCEL" => Self::Cancel,
            b"REGISTER" => Self::Register,
            b"OPTIONS" => Self::Options,
            b"INFO" => Self::Info,
            b"UPDATE" => Self::Update,
            b"PRACK" => Self::Prack,
            b"SUBSCRIBE" => Self::Subscribe,
            b"NOTIFY" => Self::Notify,
            b"REFER" => Self::Refer,
            b"MESSAGE" => Self::Message,
            b"PUBLISH" => Self::Publish,
            _ => Self::Other,
        }
    }

    /// The canonical name; `None` for extension methods.
    pub fn as_str(self) -> Option<&'static str> {
        Some(match self {
            Self::Invite => "INVITE",
            Self::Ack => "ACK",
            Self::Bye => "BYE",
            Self::Cancel => "CANCEL",
            Self::Register => "REGISTER",
            Self::Options => "OPTIONS",
            Self::Info => "INFO",
            Self::Update => "UPDATE",
            Self::Prack => "PRACK",
            Self::Subscribe => "SUBSCRIBE",
            Self::Notify => "NOTIFY",
            Self::Refer => "REFER",
            Self::Message => "MESSAGE",
            Self::Publish => "PUBLISH",
            Self::Other => return None,
        })
    }
}
