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

/// One SDP body on its way through rtpengine, and who it is between.
///
/// rtpengine names the two sides of an offer/answer exchange by tag: `from-tag` is the party
/// that made the offer, `to-tag` the one answering it, whichever of caller and callee that is
/// (a re-INVITE from the callee, or a late offer in a 2xx, reverses them).
#[derive(Debug, Clone, Copy)]
pub struct Sdp<'a> {
    /// Call-ID.
    pub call_id: &'a str,
    /// Tag of the party that made the offer.
    pub offerer_tag: &'a str,
    /// Tag of the party answering it, once known.
    pub answerer_tag: Option<&'a str>,
    /// The SDP.
    pub body: &'a str,
    /// The kind of party that sent this SDP.
    pub sender: Leg,
    /// Where the sender's signalling came from (its NAT address).
    pub source: std::net::IpAddr,
    /// The kind of party it goes to.
    pub receiver: Leg,
    /// Our Via branch of the fork branch this offer goes down, when branches get different
    /// offers (a browser and a desk phone ring at once); the answer names it again.
    pub via_branch: Option<&'a str>,
}

fn base<'a>(command: &'a str, s: &Sdp<'a>) -> Vec<(&'a str, Value)> {
    let mut v = vec![
        ("command", Value::str(command)),
        ("call-id", Value::str(s.call_id)),
        ("from-tag", Value::str(s.offerer_tag)),
        ("sdp", Value::str(s.body)),
        (
            "received-from",
            Value::List(vec![
                Value::str(if s.source.is_ipv4() { "IP4" } else { "IP6" }),
                Value::str(&s.source.to_string()),
            ]),
        ),
    ];
    if let Some(t) = s.answerer_tag {
        v.push(("to-tag", Value::str(t)));
    }
    if let Some(b) = s.via_branch {
        v.push(("via-branch", Value::str(b)));
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

/// `offer`: the SDP of an INVITE, re-INVITE or UPDATE (or of a 2xx answering an INVITE
/// without one), rewritten for the party it goes to.
pub fn offer(s: &Sdp<'_>) -> Value {
    let mut v = base("offer", s);
    flags_for(s.receiver, &mut v);
    if s.sender == Leg::WebRtc {
        // A browser offers `actpass`: commit rtpengine to the passive role towards it now.
        // Otherwise rtpengine may start a handshake as client before the answer settles the
        // role, and the browser (also a client) never completes DTLS.
        v.push(("DTLS-reverse", Value::str("passive")));
    }
    Value::dict(v)
}

/// `answer`: the SDP answering an offer, rewritten for the offerer.
pub fn answer(s: &Sdp<'_>) -> Value {
    let mut v = base("answer", s);
    flags_for(s.receiver, &mut v);
    Value::dict(v)
}

/// One side of an anchored call as the proxy last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    /// What it speaks.
    pub leg: Leg,
    /// Where its signalling comes from.
    pub source: std::net::IpAddr,
}

/// The media state of one anchored call: which tag is the caller, what each side speaks, and
/// whether an INVITE without SDP is waiting for its offer (it comes in the 2xx, the answer in
/// the ACK). Given a message of the call, it says which ng command to send.
#[derive(Debug, Clone)]
pub struct Session {
    call_id: String,
    caller_tag: String,
    caller: Party,
    callee: Party,
    late_offer: bool,
    per_branch: bool,
    /// rtpengine holds the call (an offer went through).
    pub at_engine: bool,
}

/// An SDP-carrying message of an anchored call.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// From tag.
    pub from_tag: &'a str,
    /// To tag, when the message has one.
    pub to_tag: Option<&'a str>,
    /// The SDP.
    pub body: &'a str,
    /// Where the message came from.
    pub source: std::net::IpAddr,
    /// Top Via branch (responses: our branch).
    pub via_branch: Option<&'a str>,
}

impl Session {
    /// A call from `caller_tag`; `callee` is what the proxy expects the callee to speak.
    pub fn new(call_id: &str, caller_tag: &str, caller: Party, callee: Party) -> Self {
        Self {
            call_id: call_id.to_string(),
            caller_tag: caller_tag.to_string(),
            caller,
            callee,
            late_offer: false,
            per_branch: false,
            at_engine: false,
        }
    }

    /// The call's initial INVITE had no SDP: the offer comes in the 2xx.
    pub fn expect_late_offer(&mut self) {
        self.late_offer = true;
    }

    /// The caller's kind of leg.
    pub fn caller(&self) -> Party {
        self.caller
    }

    /// The initial offer, for a branch whose callee speaks `receiver`. `via_branch` names the
    /// branch when branches get different offers.
    pub fn initial_offer(&mut self, body: &str, receiver: Leg, via_branch: Option<&str>) -> Value {
        self.per_branch |= via_branch.is_some();
        offer(&Sdp {
            call_id: &self.call_id,
            offerer_tag: &self.caller_tag,
            answerer_tag: None,
            body,
            sender: self.caller.leg,
            source: self.caller.source,
            receiver,
            via_branch,
        })
    }

    fn party(&mut self, tag: &str) -> &mut Party {
        if tag == self.caller_tag {
            &mut self.caller
        } else {
            &mut self.callee
        }
    }

    /// Learns what the sender of `m` speaks and where it is; returns the other side's leg.
    fn sender_is(&mut self, sender_tag: &str, m: &Seen<'_>) -> Leg {
        *self.party(sender_tag) = Party {
            leg: Leg::of_sdp(m.body),
            source: m.source,
        };
        let other = if sender_tag == self.caller_tag {
            self.callee
        } else {
            self.caller
        };
        other.leg
    }

    /// The command for an in-dialog request with SDP: an INVITE or UPDATE offers; an ACK
    /// answers a late offer. `None`: nothing for rtpengine.
    pub fn request(&mut self, method: &str, m: &Seen<'_>) -> Option<Value> {
        let to_tag = m.to_tag?;
        match method {
            "INVITE" | "UPDATE" => {
                let receiver = self.sender_is(m.from_tag, m);
                self.late_offer = false;
                Some(offer(&Sdp {
                    call_id: &self.call_id,
                    offerer_tag: m.from_tag,
                    answerer_tag: Some(to_tag),
                    body: m.body,
                    sender: Leg::of_sdp(m.body),
                    source: m.source,
                    receiver,
                    via_branch: None,
                }))
            }
            "ACK" if self.late_offer => {
                self.late_offer = false;
                let receiver = self.sender_is(m.from_tag, m);
                // The offer came from the party that sent the 2xx.
                Some(answer(&Sdp {
                    call_id: &self.call_id,
                    offerer_tag: to_tag,
                    answerer_tag: Some(m.from_tag),
                    body: m.body,
                    sender: Leg::of_sdp(m.body),
                    source: m.source,
                    receiver,
                    via_branch: None,
                }))
            }
            _ => None,
        }
    }

    /// An in-dialog INVITE without SDP: the offer will come in its 2xx.
    pub fn request_without_sdp(&mut self, method: &str) {
        if method == "INVITE" {
            self.late_offer = true;
        }
    }

    /// The command for a 18x/2xx with SDP to an INVITE or UPDATE: the answer to the request's
    /// offer, or the offer itself when the request had none.
    pub fn response(&mut self, m: &Seen<'_>) -> Option<Value> {
        let to_tag = m.to_tag?;
        let receiver = self.sender_is(to_tag, m);
        let s = Sdp {
            call_id: &self.call_id,
            offerer_tag: m.from_tag,
            answerer_tag: Some(to_tag),
            body: m.body,
            sender: Leg::of_sdp(m.body),
            source: m.source,
            receiver,
            via_branch: if self.per_branch { m.via_branch } else { None },
        };
        if self.late_offer {
            // The responder offers; the request's sender will answer in the ACK.
            Some(offer(&Sdp {
                offerer_tag: to_tag,
                answerer_tag: Some(m.from_tag),
                via_branch: None,
                ..s
            }))
        } else {
            Some(answer(&s))
        }
    }
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

    const PHONE_SDP: &str = "v=0\r\nm=audio 4000 RTP/AVP 0\r\n";
    const BROWSER_SDP: &str =
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=fingerprint:sha-256 AB\r\n";

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    /// A message with SDP from `from` to `to`, sent from `source`.
    fn seen<'a>(from: &'a str, to: &'a str, body: &'a str, source: &str) -> Seen<'a> {
        Seen {
            from_tag: from,
            to_tag: Some(to),
            body,
            source: ip(source),
            via_branch: None,
        }
    }

    fn text(v: &Value, key: &str) -> Option<String> {
        v.get(key).and_then(Value::as_str).map(str::to_string)
    }

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
        let src = ip("198.51.100.7");
        let mut call = Session::new(
            "c1",
            "f1",
            Party {
                leg: Leg::Plain,
                source: src,
            },
            Party {
                leg: Leg::WebRtc,
                source: src,
            },
        );
        let to_browser = call.initial_offer(PHONE_SDP, Leg::WebRtc, None);
        assert_eq!(text(&to_browser, "command").as_deref(), Some("offer"));
        assert_eq!(text(&to_browser, "from-tag").as_deref(), Some("f1"));
        assert_eq!(text(&to_browser, "ICE").as_deref(), Some("force"));
        assert_eq!(text(&to_browser, "DTLS").as_deref(), Some("passive"));
        assert_eq!(
            text(&to_browser, "transport-protocol").as_deref(),
            Some("UDP/TLS/RTP/SAVPF")
        );
        // A phone's offer does not fix the DTLS role of its own (plain) side.
        assert!(to_browser.get("DTLS-reverse").is_none());
        let to_phone = call.initial_offer(PHONE_SDP, Leg::Plain, Some("z9hG4bK-b2"));
        assert_eq!(
            text(&to_phone, "transport-protocol").as_deref(),
            Some("RTP/AVP")
        );
        assert_eq!(text(&to_phone, "ICE").as_deref(), Some("remove"));
        assert_eq!(text(&to_phone, "via-branch").as_deref(), Some("z9hG4bK-b2"));
        let enc = String::from_utf8(to_phone.encode()).unwrap();
        assert!(
            enc.contains("13:received-froml3:IP412:198.51.100.7e"),
            "{enc}"
        );
        assert_eq!(
            delete("c1").get("command").unwrap().as_str(),
            Some("delete")
        );
    }

    #[test]
    fn a_browser_offer_commits_rtpengine_to_the_passive_dtls_role() {
        let src = ip("192.0.2.1");
        let browser = Party {
            leg: Leg::WebRtc,
            source: src,
        };
        let phone = Party {
            leg: Leg::Plain,
            source: src,
        };
        let mut call = Session::new("c2", "web", browser, phone);
        let o = call.initial_offer(BROWSER_SDP, Leg::Plain, None);
        assert_eq!(text(&o, "DTLS-reverse").as_deref(), Some("passive"));
        assert_eq!(text(&o, "DTLS").as_deref(), Some("off"));
    }

    fn phone_calls_browser() -> Session {
        Session::new(
            "c3",
            "desk",
            Party {
                leg: Leg::Plain,
                source: ip("192.0.2.10"),
            },
            Party {
                leg: Leg::WebRtc,
                source: ip("192.0.2.20"),
            },
        )
    }

    #[test]
    fn answers_go_back_to_the_offerer_with_the_callee_learned() {
        let mut call = phone_calls_browser();
        let _ = call.initial_offer(PHONE_SDP, Leg::WebRtc, None);
        let a = call
            .response(&Seen {
                via_branch: Some("z9hG4bK-1"),
                ..seen("desk", "web", BROWSER_SDP, "203.0.113.5")
            })
            .unwrap();
        assert_eq!(text(&a, "command").as_deref(), Some("answer"));
        assert_eq!(text(&a, "from-tag").as_deref(), Some("desk"));
        assert_eq!(text(&a, "to-tag").as_deref(), Some("web"));
        // Towards the desk phone: plain RTP; the browser's NAT address is where it answered
        // from; no via-branch when every branch got the same offer.
        assert_eq!(text(&a, "transport-protocol").as_deref(), Some("RTP/AVP"));
        let enc = String::from_utf8(a.encode()).unwrap();
        assert!(enc.contains("203.0.113.5"), "{enc}");
        assert!(a.get("via-branch").is_none());
    }

    #[test]
    fn a_re_invite_from_the_callee_offers_towards_the_caller() {
        let mut call = phone_calls_browser();
        let _ = call.initial_offer(PHONE_SDP, Leg::WebRtc, None);
        let hold = call
            .request("INVITE", &seen("web", "desk", BROWSER_SDP, "192.0.2.20"))
            .unwrap();
        assert_eq!(text(&hold, "command").as_deref(), Some("offer"));
        assert_eq!(text(&hold, "from-tag").as_deref(), Some("web"));
        assert_eq!(text(&hold, "to-tag").as_deref(), Some("desk"));
        assert_eq!(
            text(&hold, "transport-protocol").as_deref(),
            Some("RTP/AVP")
        );
        assert_eq!(text(&hold, "DTLS-reverse").as_deref(), Some("passive"));
        // The desk phone's 200 answers it, towards the browser.
        let ok = call
            .response(&seen("web", "desk", PHONE_SDP, "192.0.2.10"))
            .unwrap();
        assert_eq!(text(&ok, "command").as_deref(), Some("answer"));
        assert_eq!(text(&ok, "from-tag").as_deref(), Some("web"));
        assert_eq!(
            text(&ok, "transport-protocol").as_deref(),
            Some("UDP/TLS/RTP/SAVPF")
        );
        // An UPDATE from the caller offers towards the browser again.
        let update = call
            .request("UPDATE", &seen("desk", "web", PHONE_SDP, "192.0.2.10"))
            .unwrap();
        assert_eq!(
            text(&update, "transport-protocol").as_deref(),
            Some("UDP/TLS/RTP/SAVPF")
        );
        // Other requests are nothing to rtpengine.
        assert!(
            call.request("INFO", &seen("desk", "web", PHONE_SDP, "192.0.2.10"))
                .is_none()
        );
    }

    #[test]
    fn a_late_offer_comes_in_the_2xx_and_is_answered_in_the_ack() {
        let mut call = Session::new(
            "c4",
            "caller",
            Party {
                leg: Leg::Plain,
                source: ip("192.0.2.10"),
            },
            Party {
                leg: Leg::Plain,
                source: ip("192.0.2.10"),
            },
        );
        call.expect_late_offer();
        let o = call
            .response(&Seen {
                via_branch: Some("z9hG4bK-x"),
                ..seen("caller", "callee", PHONE_SDP, "192.0.2.30")
            })
            .unwrap();
        assert_eq!(text(&o, "command").as_deref(), Some("offer"));
        assert_eq!(text(&o, "from-tag").as_deref(), Some("callee"));
        assert_eq!(text(&o, "to-tag").as_deref(), Some("caller"));
        let a = call
            .request("ACK", &seen("caller", "callee", PHONE_SDP, "192.0.2.10"))
            .unwrap();
        assert_eq!(text(&a, "command").as_deref(), Some("answer"));
        assert_eq!(text(&a, "from-tag").as_deref(), Some("callee"));
        assert_eq!(text(&a, "to-tag").as_deref(), Some("caller"));
        // Once answered, a later ACK with SDP is not another answer.
        assert!(
            call.request("ACK", &seen("caller", "callee", PHONE_SDP, "192.0.2.10"))
                .is_none()
        );
        // A re-INVITE without SDP asks for another late offer.
        call.request_without_sdp("INVITE");
        let again = call
            .response(&seen("caller", "callee", PHONE_SDP, "192.0.2.30"))
            .unwrap();
        assert_eq!(text(&again, "command").as_deref(), Some("offer"));
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
