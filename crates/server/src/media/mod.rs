//! Media anchoring at rtpengine for calls through the proxy. The initial INVITE's SDP is offered
//! (one offer per fork branch when a browser and a desk phone ring at once); 18x/2xx answers,
//! re-INVITE/UPDATE offers and late offers (2xx offer, ACK answer) of an anchored call go through
//! rtpengine too; the call's media is deleted when it ends. When no rtpengine answers, the call
//! goes on with its original SDP and the log says why.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_core::Transport;
use careflow_core::media::{Leg, Party, Policy, Seen, Session};
use careflow_proto::bencode::Value;
use careflow_proto::{HeaderName, Message, Method};

pub use crate::config::MediaConfig;
use crate::rtpengine::RtpEngine;
use calls::MediaCall;

pub(crate) mod calls;

/// The SDP body of a message, when it has one.
pub(crate) fn sdp(msg: &Message) -> Option<&str> {
    let ct = msg.header(HeaderName::ContentType)?;
    if !ct.to_ascii_lowercase().starts_with("application/sdp") || msg.body().is_empty() {
        return None;
    }
    std::str::from_utf8(msg.body()).ok()
}

/// The message with its body replaced (Content-Length follows).
pub(crate) fn with_body(msg: &Message, body: &str) -> Option<Message> {
    let bytes = careflow_proto::rewrite::replace_body(msg, body.as_bytes());
    Message::parse(bytes, &careflow_proto::ParseLimits::default()).ok()
}

/// The caller of a call as media anchoring sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    /// The transport the INVITE came over (its leg when it carries no SDP).
    pub(crate) transport: Transport,
    /// Where it came from.
    pub(crate) source: IpAddr,
    /// The caller is behind NAT or on its own connection.
    pub(crate) behind_nat: bool,
}

/// Media anchoring at rtpengine: the policy, the engine's client once it is started, and the
/// anchored calls. The proxy hands it messages and gets them back with rtpengine's SDP; it
/// knows nothing of the proxy's state.
#[derive(Debug, Default)]
pub(crate) struct MediaAnchor {
    policy: Option<Policy>,
    engine: std::sync::OnceLock<Arc<RtpEngine>>,
    calls: calls::MediaCalls,
}

/// One branch of a call as media anchoring sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Callee {
    /// The transport the branch goes over (a WebSocket callee speaks WebRTC media).
    pub(crate) transport: Transport,
    /// The callee is behind NAT or on its own connection.
    pub(crate) behind_nat: bool,
}

/// What one branch of an anchored call carries: its own Via branch (which names the offer at
/// rtpengine) and rtpengine's SDP for it.
#[derive(Debug)]
pub(crate) struct BranchOffer {
    pub(crate) branch: String,
    pub(crate) body: String,
}

/// What a branch added later to a call carries (see [`MediaAnchor::late_branch`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LateBranch {
    /// The INVITE as it was forked.
    AsForked,
    /// The INVITE with this SDP (rtpengine's offer for the branch).
    Offer(String),
    /// No branch can be added with media that works.
    No,
}

/// The initial INVITE after media anchoring: the message (with rtpengine's SDP when one offer
/// serves every branch), and one offer per branch when the branches need different media.
#[derive(Debug)]
pub(crate) struct Anchored {
    pub(crate) msg: Message,
    /// Empty, or one per callee in the order given.
    pub(crate) offers: Vec<BranchOffer>,
}

impl Anchored {
    fn unchanged(msg: Message) -> Self {
        Self {
            msg,
            offers: Vec::new(),
        }
    }
}

fn seen<'a>(msg: &'a Message, body: &'a str, source: IpAddr) -> Option<Seen<'a>> {
    Some(Seen {
        from_tag: msg.from_tag()?,
        to_tag: msg.to_tag(),
        body,
        source,
        via_branch: msg.top_via_branch(),
    })
}

impl MediaAnchor {
    /// Anchoring by `policy` (none: never), without an engine until [`Self::set_engine`].
    pub(crate) fn new(policy: Option<Policy>) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// The rtpengine client, once its control socket is open.
    pub(crate) fn set_engine(&self, engine: Arc<RtpEngine>) {
        let _ = self.engine.set(engine);
    }

    pub(crate) fn engine(&self) -> Option<&Arc<RtpEngine>> {
        self.engine.get()
    }

    fn with_session<T>(&self, call_id: &str, f: impl FnOnce(&mut MediaCall) -> T) -> Option<T> {
        self.calls.lock().ok()?.get_mut(call_id).map(f)
    }

    /// Runs one command; the message comes back with rtpengine's SDP, or as it was.
    async fn through_engine(&self, msg: Message, call_id: &str, cmd: Value) -> Message {
        let Some(engine) = self.engine() else {
            return msg;
        };
        match engine.command(call_id, &cmd).await {
            Ok(Some(new_sdp)) => with_body(&msg, &new_sdp).unwrap_or(msg),
            Ok(None) => msg,
            Err(e) => {
                tracing::warn!(call_id, error = %e, "media not anchored; the message keeps its own SDP");
                msg
            }
        }
    }

    /// The initial INVITE of a call, before it is forked to `callees`. When the policy
    /// anchors the call, its SDP is offered to rtpengine: once when every branch speaks the
    /// same kind of media, else once per branch (each branch then gets its own offer).
    /// `new_branch` makes a Via branch for a branch that gets an offer of its own.
    pub(crate) async fn initial(
        &self,
        msg: Message,
        caller: Caller,
        callees: &[Callee],
        mut new_branch: impl FnMut() -> String,
    ) -> Anchored {
        let Some(engine) = self.engine() else {
            return Anchored::unchanged(msg);
        };
        let (Some(call_id), Some(from_tag)) = (
            msg.call_id().map(str::to_string),
            msg.from_tag().map(str::to_string),
        ) else {
            return Anchored::unchanged(msg);
        };
        let body = sdp(&msg).map(str::to_string);
        let caller_leg = match &body {
            Some(b) => Leg::of_sdp(b),
            None => Leg::of_transport(caller.transport),
        };
        let legs: Vec<Leg> = callees
            .iter()
            .map(|c| Leg::of_transport(c.transport))
            .collect();
        let natted = callees.iter().any(|c| c.behind_nat) || caller.behind_nat;
        let wanted = match self.policy {
            Some(Policy::Always) => true,
            Some(Policy::WhenNeeded) => natted || legs.iter().any(|c| *c != caller_leg),
            _ => false,
        };
        let Some(first) = legs.first().copied().filter(|_| wanted) else {
            return Anchored::unchanged(msg);
        };
        let caller = Party {
            leg: caller_leg,
            source: caller.source,
        };
        let mut session = Session::new(
            &call_id,
            &from_tag,
            caller,
            Party {
                leg: first,
                source: caller.source,
            },
        );
        let Some(body) = body else {
            // Late offer: the callee's 2xx offers, the caller's ACK answers.
            session.expect_late_offer();
            self.keep(&call_id, session, Some(first), None);
            return Anchored::unchanged(msg);
        };
        let one_offer = legs.iter().all(|c| *c == first);
        let anchored = if one_offer {
            let cmd = session.initial_offer(&body, first, None);
            match engine.command(&call_id, &cmd).await {
                Ok(Some(new_sdp)) => with_body(&msg, &new_sdp).map(Anchored::unchanged),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(call_id, error = %e, "media not anchored; the call keeps its own SDP");
                    None
                }
            }
        } else {
            let mut offers = Vec::with_capacity(legs.len());
            let mut failed = false;
            for leg in &legs {
                let branch = new_branch();
                let cmd = session.initial_offer(&body, *leg, Some(&branch));
                match engine.command(&call_id, &cmd).await {
                    Ok(Some(body)) => offers.push(BranchOffer { branch, body }),
                    other => {
                        if let Err(e) = other {
                            tracing::warn!(call_id, error = %e, "media not anchored; the call keeps its own SDP");
                        }
                        failed = true;
                        break;
                    }
                }
            }
            if failed && !offers.is_empty() {
                // The branches offered so far are not used: free them at rtpengine now.
                let (engine, call_id) = (engine.clone(), call_id.clone());
                tokio::spawn(async move {
                    let _ = engine.delete(&call_id).await;
                });
            }
            (!failed).then(|| Anchored {
                msg: msg.clone(),
                offers,
            })
        };
        match anchored {
            Some(a) => {
                session.at_engine = true;
                let caller_sdp = one_offer.then(|| body.clone());
                self.keep(&call_id, session, one_offer.then_some(first), caller_sdp);
                a
            }
            None => Anchored::unchanged(msg),
        }
    }

    fn keep(
        &self,
        call_id: &str,
        session: Session,
        one_offer: Option<Leg>,
        caller_sdp: Option<String>,
    ) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(
                call_id.to_string(),
                MediaCall {
                    session,
                    checked: Instant::now(),
                    one_offer,
                    caller_sdp,
                },
            );
        }
    }

    /// What a branch added to a call later (late forking, a device's next flow) to `callee`
    /// is sent: the INVITE as it was forked when the call's media is not anchored or its one
    /// offer serves the callee's kind of media; its own rtpengine offer (under Via branch
    /// `branch`) when each branch got one; nothing when neither works.
    pub(crate) async fn late_branch(
        &self,
        msg: &Message,
        callee: Callee,
        branch: &str,
    ) -> LateBranch {
        let leg = Leg::of_transport(callee.transport);
        let Some(call_id) = msg.call_id() else {
            return LateBranch::AsForked;
        };
        let cmd = {
            let Ok(mut calls) = self.calls.lock() else {
                return LateBranch::No;
            };
            let Some(call) = calls.get_mut(call_id) else {
                return LateBranch::AsForked;
            };
            // An offer of its own is made from the caller's SDP: the INVITE still carries it
            // when each branch has its own offer, else it was kept aside.
            let caller_sdp = match call.one_offer {
                Some(served) if served == leg => return LateBranch::AsForked,
                Some(_) => call.caller_sdp.clone(),
                None => sdp(msg).map(str::to_string),
            };
            let Some(body) = caller_sdp else {
                return LateBranch::No;
            };
            call.session.initial_offer(&body, leg, Some(branch))
        };
        let Some(engine) = self.engine() else {
            return LateBranch::No;
        };
        match engine.command(call_id, &cmd).await {
            Ok(Some(body)) => LateBranch::Offer(body),
            Ok(None) => LateBranch::No,
            Err(e) => {
                tracing::warn!(call_id, error = %e, "no rtpengine offer for a late branch; not added");
                LateBranch::No
            }
        }
    }

    /// An in-dialog request of an anchored call: re-INVITE/UPDATE offers, the ACK answering a
    /// late offer. Returns the request to forward.
    pub(crate) async fn request(&self, msg: Message, source: IpAddr) -> Message {
        // Every in-dialog request and ACK comes through here: nothing to do without rtpengine.
        let method = msg.method();
        if self.engine().is_none()
            || !matches!(method, Method::Invite | Method::Update | Method::Ack)
        {
            return msg;
        }
        let Some(call_id) = msg.call_id().map(str::to_string) else {
            return msg;
        };
        let cmd = match sdp(&msg) {
            Some(body) => {
                let Some(m) = seen(&msg, body, source) else {
                    return msg;
                };
                self.with_session(&call_id, |c| {
                    let cmd = c.session.request(msg.method_str(), &m);
                    if cmd.is_some() {
                        c.session.at_engine = true;
                    }
                    cmd
                })
                .flatten()
            }
            None => {
                self.with_session(&call_id, |c| {
                    c.session.request_without_sdp(msg.method_str())
                });
                None
            }
        };
        match cmd {
            Some(cmd) => self.through_engine(msg, &call_id, cmd).await,
            None => msg,
        }
    }

    /// Whether a response needs rtpengine before it is relayed: a 18x/2xx with SDP to an
    /// INVITE or UPDATE of an anchored call.
    pub(crate) fn response_needed(&self, msg: &Message) -> bool {
        let Some(code) = msg.status() else {
            return false;
        };
        if !(180..300).contains(&code) || sdp(msg).is_none() {
            return false;
        }
        if !matches!(msg.cseq(), Some((_, "INVITE" | "UPDATE"))) {
            return false;
        }
        msg.call_id().is_some_and(|c| {
            self.calls
                .lock()
                .map(|m| m.contains_key(c))
                .unwrap_or(false)
        })
    }

    /// Runs `answer` (or a late `offer`) for a response; returns it rewritten, or as it was.
    pub(crate) async fn response(&self, msg: Message, source: IpAddr) -> Message {
        let (Some(call_id), Some(body)) = (msg.call_id().map(str::to_string), sdp(&msg)) else {
            return msg;
        };
        let Some(m) = seen(&msg, body, source) else {
            return msg;
        };
        let cmd = self
            .with_session(&call_id, |c| {
                c.session.at_engine = true;
                c.session.response(&m)
            })
            .flatten();
        match cmd {
            Some(cmd) => self.through_engine(msg, &call_id, cmd).await,
            None => msg,
        }
    }

    /// Ends the media session of a call (BYE, CANCEL, failure).
    pub(crate) fn end(&self, call_id: &str) {
        let known = self
            .calls
            .lock()
            .map(|mut m| m.remove(call_id).is_some_and(|c| c.session.at_engine))
            .unwrap_or(false);
        if !known {
            return;
        }
        let Some(engine) = self.engine().cloned() else {
            return;
        };
        let call_id = call_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = engine.delete(&call_id).await {
                tracing::warn!(call_id, error = %e, "media delete failed; rtpengine frees the call after its own timeout");
            }
        });
    }

    /// Whether the call's media goes through rtpengine.
    pub(crate) fn is_anchored(&self, call_id: &str) -> bool {
        self.calls
            .lock()
            .map(|m| m.get(call_id).is_some_and(|c| c.session.at_engine))
            .unwrap_or(false)
    }

    /// Active anchored calls (metrics).
    pub(crate) fn active(&self) -> usize {
        self.calls.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Forgets anchored calls rtpengine no longer holds: it drops a call on its own when no
    /// media flows for a while, which is how calls end whose phones vanished without a BYE.
    /// At most `MAX_CHECKS` calls not checked for `every` are asked about per round.
    pub(crate) async fn check(&self, every: Duration) {
        const MAX_CHECKS: usize = 1000;
        let Some(engine) = self.engine() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<String> = match self.calls.lock() {
            Ok(calls) => calls
                .iter()
                .filter(|(_, c)| c.session.at_engine && now.duration_since(c.checked) >= every)
                .map(|(id, _)| id.clone())
                .take(MAX_CHECKS)
                .collect(),
            Err(_) => return,
        };
        for call_id in due {
            let gone = match engine.query(&call_id).await {
                Ok(v) => matches!(
                    careflow_core::media::reply(&v),
                    careflow_core::media::Reply::Error(_)
                ),
                // Unreachable: keep the call until its BYE (or until rtpengine is back).
                Err(_) => false,
            };
            if gone {
                self.calls.lock().ok().map(|mut m| m.remove(&call_id));
                engine.forget(&call_id);
                tracing::info!(
                    call_id,
                    "rtpengine no longer holds the call's media (its media timeout); forgotten"
                );
            } else {
                self.with_session(&call_id, |c| c.checked = Instant::now());
            }
        }
    }
}

/// Checks anchored calls against rtpengine every `every`.
pub(crate) async fn check_calls(
    media: Arc<MediaAnchor>,
    every: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => media.check(every).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_late_branch_uses_the_one_offer_of_its_kind_and_never_a_wrong_one() {
        let media = MediaAnchor::new(Some(Policy::Always));
        let party = |leg| Party {
            leg,
            source: "192.0.2.1".parse().expect("ip"),
        };
        let session =
            |id: &str| Session::new(id, "caller-tag", party(Leg::Plain), party(Leg::Plain));
        let invite = |call_id: &str| {
            Message::parse(
                bytes::Bytes::from(format!(
                    "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n\
                     From: <sip:a@example.com>;tag=caller-tag\r\nTo: <sip:bob@example.com>\r\n\
                     Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
                )),
                &careflow_proto::ParseLimits::default(),
            )
            .expect("invite")
        };
        let web = Callee {
            transport: Transport::Wss,
            behind_nat: true,
        };
        let desk = Callee {
            transport: Transport::Udp,
            behind_nat: false,
        };
        let late = |id: &'static str, c: Callee| {
            let media = &media;
            async move { media.late_branch(&invite(id), c, "z9hG4bKlate").await }
        };
        assert_eq!(late("not-anchored", web).await, LateBranch::AsForked);
        media.keep("one-offer", session("one-offer"), Some(Leg::Plain), None);
        assert_eq!(late("one-offer", desk).await, LateBranch::AsForked);
        assert_eq!(
            late("one-offer", web).await,
            LateBranch::No,
            "plain RTP offer, WebRTC branch, no caller SDP kept to offer from"
        );
        // Offers per branch need the caller's SDP (this INVITE has none) and rtpengine.
        media.keep("per-branch", session("per-branch"), None, None);
        assert_eq!(late("per-branch", desk).await, LateBranch::No);
    }
}
