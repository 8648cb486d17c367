//! Media anchoring at rtpengine for calls through the proxy: `offer` on an INVITE with SDP,
//! `answer` on the 18x/2xx with SDP that comes back, `delete` when the call ends. When no
//! rtpengine answers, the call goes on with its original SDP and the log says why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use careflow_core::media::{self, CallLeg, Leg, Policy};
use careflow_proto::{HeaderName, Message};

use crate::app::{App, Ctx};
use crate::rtpengine::RtpEngine;

/// Media settings.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// rtpengine ng control addresses; empty: no anchoring.
    pub rtpengine: Vec<std::net::SocketAddr>,
    /// When to anchor.
    pub policy: Policy,
    /// Time to wait for one answer from rtpengine (retried three times).
    pub timeout: std::time::Duration,
}

/// A call whose media is anchored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MediaCall {
    /// The caller's kind of leg (the answer is converted back to it).
    pub(crate) caller: Leg,
    /// Where the caller's signalling came from.
    pub(crate) caller_source: IpAddr,
}

/// Anchored calls by Call-ID.
pub(crate) type MediaCalls = std::sync::Mutex<HashMap<String, MediaCall>>;

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

impl App {
    pub(crate) fn rtpengine(&self) -> Option<&Arc<RtpEngine>> {
        self.media_engine.get()
    }

    /// Offers the SDP of an initial INVITE to rtpengine when the policy says so; returns the
    /// request to forward (rewritten, or as it was).
    pub(crate) async fn media_offer(
        &self,
        msg: Message,
        ctx: &Ctx,
        callee: Leg,
        callee_natted: bool,
    ) -> Message {
        let Some(engine) = self.rtpengine() else {
            return msg;
        };
        let Some(body) = sdp(&msg) else { return msg };
        let caller = Leg::of_sdp(body);
        let needed = match self.cfg.media.as_ref().map(|m| m.policy) {
            Some(Policy::Always) => true,
            Some(Policy::WhenNeeded) => {
                caller != callee || callee_natted || App::sender_needs_flow(&msg, ctx)
            }
            _ => false,
        };
        if !needed {
            return msg;
        }
        let (Some(call_id), Some(from_tag)) = (msg.call_id(), msg.from().and_then(|f| f.tag()))
        else {
            return msg;
        };
        let leg = CallLeg {
            call_id,
            from_tag,
            to_tag: None,
        };
        match engine
            .command(call_id, &media::offer(&leg, body, callee, ctx.source.ip()))
            .await
        {
            Ok(Some(new_sdp)) => match with_body(&msg, &new_sdp) {
                Some(m) => {
                    if let Ok(mut calls) = self.media_calls.lock() {
                        calls.insert(
                            call_id.to_string(),
                            MediaCall {
                                caller,
                                caller_source: ctx.source.ip(),
                            },
                        );
                    }
                    m
                }
                None => msg,
            },
            Ok(None) => msg,
            Err(e) => {
                tracing::warn!(call_id, error = %e, "media not anchored; the call keeps its own SDP");
                msg
            }
        }
    }

    /// Whether a response needs an `answer` before it is relayed.
    pub(crate) fn media_answer_needed(&self, msg: &Message) -> bool {
        let Some(code) = msg.status() else {
            return false;
        };
        if !(180..300).contains(&code) || sdp(msg).is_none() {
            return false;
        }
        if !matches!(msg.cseq(), Some((_, "INVITE"))) {
            return false;
        }
        msg.call_id().is_some_and(|c| {
            self.media_calls
                .lock()
                .map(|m| m.contains_key(c))
                .unwrap_or(false)
        })
    }

    /// Runs `answer` for a response; returns it rewritten (or as it was on failure).
    pub(crate) async fn media_answer(&self, msg: Message) -> Message {
        let Some(engine) = self.rtpengine() else {
            return msg;
        };
        let (Some(call_id), Some(body)) = (msg.call_id(), sdp(&msg)) else {
            return msg;
        };
        let Some(call) = self
            .media_calls
            .lock()
            .ok()
            .and_then(|m| m.get(call_id).copied())
        else {
            return msg;
        };
        let (Some(from_tag), to_tag) = (
            msg.from().and_then(|f| f.tag()),
            msg.to().and_then(|t| t.tag()),
        ) else {
            return msg;
        };
        let leg = CallLeg {
            call_id,
            from_tag,
            to_tag,
        };
        match engine
            .command(
                call_id,
                &media::answer(&leg, body, call.caller, call.caller_source),
            )
            .await
        {
            Ok(Some(new_sdp)) => with_body(&msg, &new_sdp).unwrap_or(msg),
            Ok(None) => msg,
            Err(e) => {
                tracing::warn!(call_id, error = %e, "media answer failed; relaying the original SDP");
                msg
            }
        }
    }

    /// Ends the media session of a call (BYE, CANCEL, failure).
    pub(crate) fn media_end(&self, call_id: &str) {
        let known = self
            .media_calls
            .lock()
            .map(|mut m| m.remove(call_id).is_some())
            .unwrap_or(false);
        if !known {
            return;
        }
        let Some(engine) = self.rtpengine().cloned() else {
            return;
        };
        let call_id = call_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = engine.delete(&call_id).await {
                tracing::warn!(call_id, error = %e, "media delete failed");
            }
        });
    }

    /// Active anchored calls (metrics).
    pub(crate) fn media_active(&self) -> usize {
        self.media_calls.lock().map(|m| m.len()).unwrap_or(0)
    }
}
