//! Directed pickup: by the `Replaces` a BLF key builds from a NOTIFY, or by feature code.

use std::time::Instant;

use careflow_core::dialog_event::Direction;
use careflow_proto::{Message, Uri, scan};

use crate::app::App;

impl App {
    /// Directed pickup: `replaces` (of an INVITE from the authenticated `picker`) names a
    /// ringing call of a user `picker` may watch: the caller's device (its Contact, over the
    /// flow its INVITE came by), which swaps its ringing dialog for the picker's and CANCELs
    /// the original (RFC 3891). `None` when it names no ringing call of ours (an attended
    /// transfer's Replaces, say: routed as usual); `Err` with the status to answer. Once the
    /// pickup (Call-ID `pickup_call`) is answered, the picked call's ringing branches are
    /// CANCELled ([`App::pickup_answered`]).
    pub(crate) fn pickup_target(
        &self,
        replaces: &str,
        picker: &str,
        pickup_call: &str,
    ) -> Option<Result<(String, crate::routing::Target), u16>> {
        use careflow_core::dialog_event::pickup::{PickupRefusal, Replaces, pickup};
        let rep = Replaces::parse(replaces)?;
        let mut w = self.watchers.lock().ok()?;
        match pickup(&w.calls, &rep, picker, &self.cfg.blf.watch_policy) {
            Ok((aor, leg)) => {
                let caller = w.callers.get(&leg.call_id)?.clone();
                tracing::info!(picker, picked = aor, call_id = %leg.call_id, "call pickup");
                w.pickups
                    .insert(pickup_call.to_string(), (caller.invite, Instant::now()));
                Some(Ok((caller.contact, caller.flow)))
            }
            Err(PickupRefusal::Forbidden) => {
                tracing::info!(picker, call_id = %rep.call_id, "call pickup refused by the watch policy");
                Some(Err(403))
            }
            Err(PickupRefusal::NoSuchCall) => None,
        }
    }

    /// Pickup by feature code: `ruri` is `PICKUP_PREFIX` + a user's name (`**2001`): the
    /// caller of that user's latest ringing call, with the `Replaces` its device needs (its own
    /// tag as `to-tag`, the ringing device's as `from-tag`, RFC 3891 §3). `None` when `ruri`
    /// is no pickup code; `Err` with the status otherwise (480 nothing rings, 403 not allowed).
    /// As with [`App::pickup_target`], the ringing branches are CANCELled once it is answered.
    pub(crate) fn pickup_by_code(
        &self,
        ruri: &Uri<'_>,
        picker: &str,
        pickup_call: &str,
    ) -> Option<Result<(String, crate::routing::Target, String), u16>> {
        use careflow_core::dialog_event::DialogState;
        let prefix = self
            .cfg
            .blf
            .pickup_prefix
            .as_deref()
            .filter(|p| !p.is_empty())?;
        let user = scan::pct_decode(ruri.user?);
        let ext = user.strip_prefix(prefix).filter(|e| !e.is_empty())?;
        let aor = format!("{ext}@{}", ruri.host.as_str().to_ascii_lowercase());
        if !self.cfg.blf.watch_policy.may_watch(picker, &aor) {
            return Some(Err(403));
        }
        let mut w = self.watchers.lock().ok()?;
        let Some(leg) = w
            .calls
            .legs(&aor)
            .iter()
            .rev()
            .find(|l| l.direction == Direction::Recipient && l.state < DialogState::Confirmed)
        else {
            return Some(Err(480));
        };
        let Some(caller) = w.callers.get(&leg.call_id).cloned() else {
            return Some(Err(480));
        };
        let replaces = match leg.to_tag.as_deref() {
            Some(t) => format!("{};to-tag={};from-tag={t}", leg.call_id, leg.from_tag),
            None => format!("{};to-tag={};from-tag=", leg.call_id, leg.from_tag),
        };
        tracing::info!(picker, picked = aor, call_id = %leg.call_id, "call pickup by feature code");
        w.pickups
            .insert(pickup_call.to_string(), (caller.invite, Instant::now()));
        Some(Ok((caller.contact, caller.flow, replaces)))
    }

    /// A response to an INVITE: when it is the 2xx of a pickup, the call it took stops ringing
    /// (its pending branches are CANCELled; the caller's INVITE then ends with 487, which the
    /// caller's phone expects as it replaced that dialog).
    pub(crate) fn pickup_answered(self: &std::sync::Arc<Self>, msg: &Message) {
        if !msg.status().is_some_and(|c| (200..300).contains(&c))
            || msg.cseq().is_none_or(|c| c.1 != "INVITE")
        {
            return;
        }
        let Some(call_id) = msg.call_id() else { return };
        let picked = match self.watchers.lock() {
            Ok(mut w) if !w.pickups.is_empty() => w.pickups.remove(call_id),
            _ => None,
        };
        if let Some((invite, _)) = picked {
            let cancelled = self.with_proxy(|t| t.handle_cancel(&invite, Instant::now()));
            tracing::info!(
                pickup = call_id,
                ringing = cancelled == Some(true),
                "pickup answered: the call it took stops ringing"
            );
        }
    }
}

/// `msg` with a `Replaces: value` header line added (before the blank line that ends the
/// header section).
pub(crate) fn with_replaces(
    msg: &Message,
    value: &str,
    limits: &careflow_proto::ParseLimits,
) -> Option<Message> {
    let bytes = msg.bytes();
    let end = msg.body_offset().checked_sub(2)?;
    let mut out = Vec::with_capacity(bytes.len() + value.len() + 16);
    out.extend_from_slice(&bytes[..end]);
    out.extend_from_slice(format!("Replaces: {value}\r\n").as_bytes());
    out.extend_from_slice(&bytes[end..]);
    Message::parse(bytes::Bytes::from(out), limits).ok()
}
