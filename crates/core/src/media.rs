//! Media policy for calls anchored at rtpengine: which ng command to send for a message, and
//! with which flags for the leg it goes to. Sans-IO: builds and reads bencoded dictionaries.
//!
//! A browser leg (CareFlow Web) speaks ICE + DTLS-SRTP over `UDP/TLS/RTP/SAVPF` with rtcp-mux;
//! a desk phone speaks plain `RTP/AVP`. rtpengine translates between them; for phones behind
//! NAT it rewrites the SDP to its own address and latches onto where packets really come from.

use careflow_proto::bencode::Value;

/// The kind of endpoint a media leg faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// WebRTC: ICE, DTLS-SRTP, rtcp-mux.
    WebRtc,
    /// Plain RTP/AVP (desk phones, softphones).
    Plain,
}

impl Leg {
    /// What an SDP body says about its sender.
    pub fn of_sdp(sdp: &str) -> Self {
        if sdp.contains("UDP/TLS/RTP/SAVP") || sdp.contains("a=fingerprint:") {
            Self::WebRtc
        } else {
            Self::Plain
        }
    }

    /// The leg of a transport: WebSocket clients are browsers.
    pub fn of_transport(t: crate::Transport) -> Self {
        match t {
            crate::Transport::Ws | crate::Transport::Wss => Self::WebRtc,
            _ => Self::Plain,
        }
    }
}

/// When media is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Every call.
    Always,
    /// Calls with a WebRTC leg or a party behind NAT.
    WhenNeeded,
    /// Never: SDP passes untouched.
    Never,
}

/// Identifies the call and the side a message comes from.
#[derive(Debug, Clone, Copy)]
pub struct CallLeg<'a> {
    /// Call-ID.
    pub call_id: &'a str,
    /// From tag.
    pub from_tag: &'a str,
    /// To tag (answers and in-dialog requests).
    pub to_tag: Option<&'a str>,
}

fn base<'a>(command: &'a str, leg: &CallLeg<'a>) -> Vec<(&'a str, Value)> {
    let mut v = vec![
        ("command", Value::str(command)),
        ("call-id", Value::str(leg.call_id)),
        ("from-tag", Value::str(leg.from_tag)),
    ];
    if let Some(t) = leg.to_tag {
        v.push(("to-tag", Value::str(t)));
    }
    v
}

fn flags_for(to: Leg, v: &mut Vec<(&str, Value)>) {
    v.push(("replace", Value::strs(&["origin", "session-connection"])));
    // NAT: use the address packets arrive from, not what the SDP claims.
    v.push(("flags", Value::strs(&["SIP-source-address"])));
    match to {
        Leg::WebRtc => {
            v.push(("transport-protocol", Value::str("UDP/TLS/RTP/SAVPF")));
            v.push(("ICE", Value::str("force")));
            v.push(("DTLS", Value::str("passive")));
            v.push(("rtcp-mux", Value::strs(&["offer", "require"])));
        }
        Leg::Plain => {
            v.push(("transport-protocol", Value::str("RTP/AVP")));
            v.push(("ICE", Value::str("remove")));
            v.push(("DTLS", Value::str("off")));
            v.push(("rtcp-mux", Value::strs(&["demux"])));
        }
    }
}

/// `offer`: the SDP of an INVITE (or re-INVITE/UPDATE), rewritten for the leg it goes to.
/// `source` is where the offering party's signalling came from (its NAT address).
pub fn offer(leg: &CallLeg<'_>, sdp: &str, to: Leg, source: std::net::IpAddr) -> Value {
    let mut v = base("offer", leg);
    v.push(("sdp", Value::str(sdp)));
    v.push((
        "received-from",
        Value::List(vec![
            Value::str(if source.is_ipv4() { "IP4" } else { "IP6" }),
            Value::str(&source.to_string()),
        ]),
    ));
    flags_for(to, &mut v);
    Value::dict(v)
}

/// `answer`: the SDP of a 18x/2xx, rewritten for the caller's leg.
pub fn answer(leg: &CallLeg<'_>, sdp: &str, to: Leg, source: std::net::IpAddr) -> Value {
    let mut v = base("answer", leg);
    v.push(("sdp", Value::str(sdp)));
    v.push((
        "received-from",
        Value::List(vec![
            Value::str(if source.is_ipv4() { "IP4" } else { "IP6" }),
            Value::str(&source.to_string()),
        ]),
    ));
    flags_for(to, &mut v);
    Value::dict(v)
}

/// `delete`: the call ended (BYE, CANCEL, failure, timeout); every leg of it goes.
pub fn delete(call_id: &str) -> Value {
    Value::dict([
        ("command", Value::str("delete")),
        ("call-id", Value::str(call_id)),
        // rtpengine keeps a deleted call 30 s by default; the call is over, free it now.
        ("delete-delay", Value::Int(0)),
    ])
}

/// `query`: packet counters of a call.
pub fn query(call_id: &str) -> Value {
    Value::dict([
        ("command", Value::str("query")),
        ("call-id", Value::str(call_id)),
    ])
}

/// `ping`: health check.
pub fn ping() -> Value {
    Value::dict([("command", Value::str("ping"))])
}

/// What rtpengine answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `result: ok`, with the rewritten SDP when the command produces one.
    Ok(Option<String>),
    /// `result: pong`.
    Pong,
    /// `result: error` with its reason.
    Error(String),
}

/// Reads a reply dictionary.
pub fn reply(v: &Value) -> Reply {
    match v.get("result").and_then(Value::as_str) {
        Some("ok") => Reply::Ok(v.get("sdp").and_then(Value::as_str).map(str::to_string)),
        Some("pong") => Reply::Pong,
        Some(other) => Reply::Error(
            v.get("error-reason")
                .and_then(Value::as_str)
                .unwrap_or(other)
                .to_string(),
        ),
        None => Reply::Error("no result".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEG: CallLeg<'static> = CallLeg {
        call_id: "c1",
        from_tag: "f1",
        to_tag: None,
    };

    #[test]
    fn legs_are_recognised() {
        assert_eq!(
            Leg::of_sdp("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"),
            Leg::WebRtc
        );
        assert_eq!(Leg::of_sdp("m=audio 4000 RTP/AVP 0\r\n"), Leg::Plain);
        assert_eq!(Leg::of_transport(crate::Transport::Wss), Leg::WebRtc);
        assert_eq!(Leg::of_transport(crate::Transport::Udp), Leg::Plain);
    }

    #[test]
    fn offers_to_browsers_and_phones_carry_their_flags() {
        let src = "198.51.100.7".parse().unwrap();
        let to_browser = offer(&LEG, "v=0\r\n", Leg::WebRtc, src);
        assert_eq!(to_browser.get("command").unwrap().as_str(), Some("offer"));
        assert_eq!(to_browser.get("ICE").unwrap().as_str(), Some("force"));
        assert_eq!(
            to_browser.get("transport-protocol").unwrap().as_str(),
            Some("UDP/TLS/RTP/SAVPF")
        );
        let to_phone = offer(&LEG, "v=0\r\n", Leg::Plain, src);
        assert_eq!(
            to_phone.get("transport-protocol").unwrap().as_str(),
            Some("RTP/AVP")
        );
        assert_eq!(to_phone.get("ICE").unwrap().as_str(), Some("remove"));
        let enc = String::from_utf8(to_phone.encode()).unwrap();
        assert!(
            enc.contains("13:received-froml3:IP412:198.51.100.7e"),
            "{enc}"
        );
        let a = answer(
            &CallLeg {
                to_tag: Some("t1"),
                ..LEG
            },
            "v=0\r\n",
            Leg::Plain,
            src,
        );
        assert_eq!(a.get("to-tag").unwrap().as_str(), Some("t1"));
        assert_eq!(
            delete("c1").get("command").unwrap().as_str(),
            Some("delete")
        );
    }

    #[test]
    fn replies_are_read() {
        let ok = Value::decode(b"d6:result2:ok3:sdp5:v=0\r\ne").unwrap();
        assert_eq!(reply(&ok), Reply::Ok(Some("v=0\r\n".into())));
        let err = Value::decode(b"d12:error-reason12:Unknown call6:result5:errore").unwrap();
        assert_eq!(reply(&err), Reply::Error("Unknown call".into()));
        assert_eq!(
            reply(&Value::decode(b"d6:result4:ponge").unwrap()),
            Reply::Pong
        );
    }
}
