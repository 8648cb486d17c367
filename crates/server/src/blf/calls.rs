//! The proxy's calls as the lamps see them: an INVITE forked, a branch's response, the call's
//! end.

use std::time::Instant;

use careflow_core::dialog_event::{Direction, NewLeg, Party};
use careflow_core::transaction::TxKey;
use careflow_proto::{Message, NameAddr};

use super::aor_of;
use crate::app::{App, Ctx};
use crate::watchers::Caller;

impl App {
    /// An INVITE of a call is forked: its caller and callee, when ours, have a new leg, and
    /// the caller's flow is kept for a pickup.
    pub(crate) fn watch_call_started(&self, msg: &Message, ctx: &Ctx) {
        let (Some(call_id), Some(from), Some(to)) = (msg.call_id(), msg.from(), msg.to()) else {
            return;
        };
        let Some(from_tag) = msg.from_tag() else {
            return;
        };
        let party = |n: &NameAddr<'_>, target: Option<String>| Party {
            identity: n.uri.raw.to_string(),
            display: n
                .display
                .map(|d| d.trim_matches('"').to_string())
                .filter(|d| !d.is_empty()),
            target,
        };
        let caller_target = msg.contact().map(|n| n.uri.raw.to_string());
        let (caller, callee) = (party(&from, caller_target), party(&to, None));
        let ours =
            |n: &NameAddr<'_>| aor_of(&n.uri).filter(|_| self.serves_domain(n.uri.host.as_str()));
        let now = Instant::now();
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        if let Some(contact) = msg.contact().map(|n| n.uri.raw.to_string())
            && let Some(invite) = ctx.key.clone().or_else(|| TxKey::of(msg))
        {
            let flow = crate::routing::Target {
                local: Some(ctx.local),
                conn: ctx.conn,
                flow: true,
                ..crate::routing::Target::at(
                    ctx.transport,
                    crate::routing::response_destination(msg.top_via().as_ref(), ctx.source),
                )
            };
            w.callers.insert(
                call_id.to_string(),
                Caller {
                    flow,
                    contact,
                    invite,
                },
            );
        }
        let mut changed = Vec::new();
        if let Some(aor) = msg
            .request_uri()
            .as_ref()
            .and_then(aor_of)
            .filter(|_| ours(&to).is_some())
        {
            let leg = NewLeg {
                call_id: call_id.to_string(),
                direction: Direction::Recipient,
                from_tag: from_tag.to_string(),
                local: callee.clone(),
                remote: caller.clone(),
            };
            if w.calls.start(&aor, leg, now) {
                changed.push(aor);
            }
        }
        if let Some(aor) = ours(&from) {
            let leg = NewLeg {
                call_id: call_id.to_string(),
                direction: Direction::Initiator,
                from_tag: from_tag.to_string(),
                local: caller,
                remote: callee,
            };
            if w.calls.start(&aor, leg, now) {
                changed.push(aor);
            }
        }
        for aor in &changed {
            w.subs.changed(aor);
        }
        drop(w);
        self.share_lamps(&changed);
    }

    /// A branch's response to a call's INVITE.
    pub(crate) fn watch_response(&self, msg: &Message) {
        if msg.cseq().is_none_or(|c| c.1 != "INVITE") {
            return;
        }
        let (Some(call_id), Some(branch), Some(code)) = (
            msg.call_id(),
            msg.top_via_branch().map(str::to_string),
            msg.status(),
        ) else {
            return;
        };
        let to_tag = msg.to_tag().map(str::to_string);
        let target = msg.contact().map(|n| n.uri.raw.to_string());
        let changed = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            let changed =
                w.calls
                    .response(call_id, &branch, code, to_tag.as_deref(), target.as_deref());
            for aor in &changed {
                w.subs.changed(aor);
            }
            changed
        };
        self.share_lamps(&changed);
    }

    /// The call `call_id` ended (refused, cancelled, hung up).
    pub(crate) fn watch_call_ended(&self, call_id: &str) {
        let changed = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            let changed = w.calls.end(call_id, Instant::now());
            for aor in &changed {
                w.subs.changed(aor);
            }
            changed
        };
        self.share_lamps(&changed);
    }
}
