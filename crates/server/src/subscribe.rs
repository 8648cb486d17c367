//! Busy lamps (issue 19, first slice): SUBSCRIBE with `Event: dialog` to one of our users is
//! answered here (proxy authentication, the watch policy, 200 with the expiry granted), and the
//! watcher gets NOTIFYs with the user's dialog-info built from the proxy's own calls: at once,
//! then on every change (coalesced and paced), and a final one when the subscription ends.
//! Other event packages are routed to the user's devices as before.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use careflow_core::dialog_event::info::{Quirks, render};
use careflow_core::dialog_event::subscriptions::{Due, Refusal, SubId};
use careflow_core::dialog_event::{Direction, Leg, NewLeg, Party};
use careflow_proto::{HeaderName, Message, Method, NameAddr, Uri, scan};
use careflow_transport::Outbound;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Ctx};
use crate::interfaces::via_at;
use crate::watchers::{Reach, Unanswered};

/// Our NOTIFYs' Via branches start so; their answers are ours, not the proxy's.
const NOTIFY_BRANCH: &str = "z9hG4bKcfnotify";

/// The `Event` package of a request, lower case, without parameters.
fn event_package(msg: &Message) -> Option<String> {
    let v = msg.header(HeaderName::Event)?;
    let name = v.split(';').next()?.trim().to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

fn aor_of(uri: &Uri<'_>) -> Option<String> {
    uri.user?;
    uri.aor()
}

impl App {
    /// Takes a SUBSCRIBE for the dialog package of one of our users; false when it is not
    /// one (it is routed as before).
    pub(crate) fn take_subscribe(self: &Arc<Self>, msg: &Message, ctx: &Ctx) -> bool {
        if msg.method() != Method::Subscribe || event_package(msg).as_deref() != Some("dialog") {
            return false;
        }
        let Some(uri) = msg.request_uri() else {
            return false;
        };
        // An initial SUBSCRIBE names the watched user at our domain; a refresh comes to the
        // Contact we gave (the user at one of our listeners).
        if uri.user.is_none()
            || !(self.serves_domain(&uri.host.as_str().to_ascii_lowercase())
                || self.interfaces.names_listener(&uri))
        {
            return false;
        }
        let (app, msg, ctx) = (self.clone(), msg.clone(), ctx.clone());
        tokio::spawn(async move { app.handle_subscribe(msg, ctx).await });
        true
    }

    async fn handle_subscribe(self: Arc<Self>, msg: Message, ctx: Ctx) {
        let refuse = |code: u16| self.reply(&msg, &ctx, code).build();
        if let Err((code, bytes)) = self.authorize_caller(&msg, &ctx).await {
            self.send_response(&msg, &ctx, code, bytes);
            return;
        }
        let (Some(named), Some(watcher), Some(call_id), Some(from_tag)) = (
            msg.request_uri().as_ref().and_then(aor_of),
            msg.from().as_ref().map(|f| &f.uri).and_then(aor_of),
            msg.call_id().map(str::to_string),
            msg.from().and_then(|f| f.tag()).map(str::to_string),
        ) else {
            self.send_response(&msg, &ctx, 400, refuse(400));
            return;
        };
        let id = SubId { call_id, from_tag };
        // A refresh (in the subscription's dialog) watches what the subscription does; one for
        // a subscription we do not have (ended, or from before a restart) gets 481, and the
        // phone subscribes afresh at once (RFC 6665 §4.1.2.2).
        let in_dialog = msg.to().and_then(|t| t.tag()).is_some();
        let watched = if in_dialog {
            let known = self
                .watchers
                .lock()
                .ok()
                .and_then(|w| w.subs.watched_of(&id).map(str::to_string));
            match known {
                Some(w) => w,
                None => {
                    let b = self
                        .reply(&msg, &ctx, 481)
                        .reason("Subscription Does Not Exist")
                        .build();
                    self.send_response(&msg, &ctx, 481, b);
                    return;
                }
            }
        } else {
            named
        };
        let watched = scan::pct_decode(&watched).to_ascii_lowercase();
        match self
            .subscribers
            .find(
                watched.split('@').next().unwrap_or_default(),
                watched.rsplit('@').next().unwrap_or_default(),
            )
            .await
        {
            Ok(Some(s)) if s.enabled => {}
            Ok(_) => {
                self.send_response(&msg, &ctx, 404, refuse(404));
                return;
            }
            Err(_) => {
                let b = self.reply(&msg, &ctx, 503).header("Retry-After", 5).build();
                self.send_response(&msg, &ctx, 503, b);
                return;
            }
        }
        if !self.cfg.watch_policy.may_watch(&watcher, &watched) {
            tracing::info!(
                watcher,
                watched,
                "dialog subscription refused by the watch policy"
            );
            self.send_response(&msg, &ctx, 403, refuse(403));
            return;
        }
        let Some(contact) = msg
            .header(HeaderName::Contact)
            .and_then(NameAddr::parse)
            .map(|n| n.uri.raw.to_string())
        else {
            let b = self
                .reply(&msg, &ctx, 400)
                .reason("Missing Contact")
                .build();
            self.send_response(&msg, &ctx, 400, b);
            return;
        };
        let local = self.interfaces.inbound(ctx.local, ctx.source);
        let our_tag = crate::app::to_tag(&msg);
        let to = msg.header(HeaderName::To).unwrap_or_default();
        let us = if to.contains(";tag=") {
            to.to_string()
        } else {
            format!("{to};tag={our_tag}")
        };
        let reach = Reach {
            transport: ctx.transport,
            dest: crate::routing::response_destination(msg.top_via().as_ref(), ctx.source),
            conn: ctx.conn,
            local,
            contact,
            watcher: msg.header(HeaderName::From).unwrap_or_default().to_string(),
            us,
        };
        let expires = msg
            .header(HeaderName::Expires)
            .and_then(scan::parse_u64)
            .map(|v| v.min(u64::from(u32::MAX)) as u32);
        let granted = match self.watchers.lock() {
            Ok(mut w) => w
                .subs
                .subscribe(id, &watcher, &watched, reach, expires, Instant::now()),
            Err(_) => Err(Refusal::TooMany),
        };
        match granted {
            Ok(secs) => {
                let user = watched.split('@').next().unwrap_or_default();
                let b = self
                    .reply(&msg, &ctx, 200)
                    .header(
                        "Contact",
                        format!(
                            "<sip:{user}@{};transport={}>",
                            crate::interfaces::fmt_addr(local),
                            ctx.transport
                        ),
                    )
                    .header("Expires", secs)
                    .build();
                self.send_response(&msg, &ctx, 200, b);
                tracing::info!(watcher, watched, expires = secs, "dialog subscription");
                self.send_due_notifies(Instant::now());
            }
            Err(Refusal::TooBrief(min)) => {
                let b = self
                    .reply(&msg, &ctx, 423)
                    .header("Min-Expires", min)
                    .build();
                self.send_response(&msg, &ctx, 423, b);
            }
            Err(Refusal::TooMany) => {
                let b = self
                    .reply(&msg, &ctx, 403)
                    .reason("Too Many Subscriptions")
                    .build();
                self.send_response(&msg, &ctx, 403, b);
            }
        }
    }

    /// Sends every NOTIFY that is due (and the retransmissions of unanswered ones).
    pub(crate) fn send_due_notifies(&self, now: Instant) {
        let (notifies, again, gone) = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            let (again, gone) = w.retransmissions(now);
            for id in &gone {
                w.subs.drop_sub(id);
            }
            let due = w.subs.poll_due(now);
            let mut out = Vec::with_capacity(due.len());
            for d in due {
                let legs: Vec<&Leg> = w.calls.legs(&d.watched).iter().collect();
                let body = render(
                    &format!("sip:{}", d.watched),
                    d.version,
                    &legs,
                    Quirks::default(),
                );
                let cseq = w.next_cseq(&d.id);
                let branch = format!("{NOTIFY_BRANCH}{}", self.next_id());
                let bytes = notify(&d, &branch, cseq, &body);
                let o = Outbound {
                    transport: d.reach.transport,
                    dest: d.reach.dest,
                    conn: d.reach.conn,
                    local: Some(d.reach.local),
                    bytes: bytes.into(),
                };
                let first_retry = if d.reach.transport.is_reliable() {
                    Duration::from_secs(32)
                } else {
                    Duration::from_millis(500)
                };
                w.unanswered.insert(
                    branch,
                    Unanswered {
                        sub: d.id.clone(),
                        out: Outbound {
                            bytes: bytes::Bytes::clone(&o.bytes),
                            ..o
                        },
                        sent: 1,
                        next: now + first_retry,
                    },
                );
                if d.expires_in.is_none() {
                    w.cseq.remove(&d.id);
                }
                out.push(o);
            }
            (out, again, gone)
        };
        for id in gone {
            tracing::info!(call_id = %id.call_id, "watcher did not answer its NOTIFY; subscription ended");
        }
        for o in notifies.into_iter().chain(again) {
            self.metrics.notifies_sent.fetch_add(1, Ordering::Relaxed);
            self.send_out(o);
        }
    }

    /// An answer to one of our NOTIFYs (true when it was one): a 481 (or any final failure
    /// but 408 and 5xx) ends the subscription, the watcher having forgotten it.
    pub(crate) fn notify_answered(&self, msg: &Message, branch: &str) -> bool {
        if !branch.starts_with(NOTIFY_BRANCH) {
            return false;
        }
        let code = msg.status().unwrap_or(0);
        if code < 200 {
            return true;
        }
        if let Ok(mut w) = self.watchers.lock()
            && let Some(u) = w.unanswered.remove(branch)
            && (300..500).contains(&code)
            && code != 408
        {
            tracing::info!(call_id = %u.sub.call_id, code, "watcher refused a NOTIFY; subscription ended");
            w.subs.drop_sub(&u.sub);
        }
        true
    }

    /// An INVITE of a call is forked: its caller and callee, when ours, have a new leg, and
    /// the caller's flow is kept for a pickup.
    pub(crate) fn watch_call_started(&self, msg: &Message, ctx: &Ctx) {
        let (Some(call_id), Some(from), Some(to)) = (msg.call_id(), msg.from(), msg.to()) else {
            return;
        };
        let Some(from_tag) = from.tag() else { return };
        let party = |n: &NameAddr<'_>, target: Option<String>| Party {
            identity: n.uri.raw.to_string(),
            display: n
                .display
                .map(|d| d.trim_matches('"').to_string())
                .filter(|d| !d.is_empty()),
            target,
        };
        let caller_target = msg
            .header(HeaderName::Contact)
            .and_then(NameAddr::parse)
            .map(|n| n.uri.raw.to_string());
        let (caller, callee) = (party(&from, caller_target), party(&to, None));
        let ours = |n: &NameAddr<'_>| {
            aor_of(&n.uri).filter(|_| self.serves_domain(&n.uri.host.as_str().to_ascii_lowercase()))
        };
        let now = Instant::now();
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        if let Some(contact) = msg
            .header(HeaderName::Contact)
            .and_then(NameAddr::parse)
            .map(|n| n.uri.raw.to_string())
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
            w.callers.insert(call_id.to_string(), (flow, contact));
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
        for aor in changed {
            w.subs.changed(&aor);
        }
    }

    /// Directed pickup: `replaces` (of an INVITE from the authenticated `picker`) names a
    /// ringing call of a user `picker` may watch: the caller's device (its Contact, over the
    /// flow its INVITE came by), which swaps its ringing dialog for the picker's and CANCELs
    /// the original (RFC 3891). `None` when it names no ringing call of ours (an attended
    /// transfer's Replaces, say: routed as usual); `Err` with the status to answer.
    pub(crate) fn pickup_target(
        &self,
        replaces: &str,
        picker: &str,
    ) -> Option<Result<(String, crate::routing::Target), u16>> {
        use careflow_core::dialog_event::pickup::{PickupRefusal, Replaces, pickup};
        let rep = Replaces::parse(replaces)?;
        let w = self.watchers.lock().ok()?;
        match pickup(&w.calls, &rep, picker, &self.cfg.watch_policy) {
            Ok((aor, leg)) => {
                let (flow, contact) = w.callers.get(&leg.call_id)?.clone();
                tracing::info!(picker, picked = aor, call_id = %leg.call_id, "call pickup");
                Some(Ok((contact, flow)))
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
    pub(crate) fn pickup_by_code(
        &self,
        ruri: &Uri<'_>,
        picker: &str,
    ) -> Option<Result<(String, crate::routing::Target, String), u16>> {
        use careflow_core::dialog_event::DialogState;
        let prefix = self
            .cfg
            .pickup_prefix
            .as_deref()
            .filter(|p| !p.is_empty())?;
        let user = scan::pct_decode(ruri.user?);
        let ext = user.strip_prefix(prefix).filter(|e| !e.is_empty())?;
        let aor = format!("{ext}@{}", ruri.host.as_str().to_ascii_lowercase());
        if !self.cfg.watch_policy.may_watch(picker, &aor) {
            return Some(Err(403));
        }
        let w = self.watchers.lock().ok()?;
        let Some(leg) = w
            .calls
            .legs(&aor)
            .iter()
            .rev()
            .find(|l| l.direction == Direction::Recipient && l.state < DialogState::Confirmed)
        else {
            return Some(Err(480));
        };
        let Some((flow, contact)) = w.callers.get(&leg.call_id).cloned() else {
            return Some(Err(480));
        };
        let replaces = match leg.to_tag.as_deref() {
            Some(t) => format!("{};to-tag={};from-tag={t}", leg.call_id, leg.from_tag),
            None => format!("{};to-tag={};from-tag=", leg.call_id, leg.from_tag),
        };
        tracing::info!(picker, picked = aor, call_id = %leg.call_id, "call pickup by feature code");
        Some(Ok((contact, flow, replaces)))
    }

    /// A branch's response to a call's INVITE.
    pub(crate) fn watch_response(&self, msg: &Message) {
        if msg.cseq().is_none_or(|c| c.1 != "INVITE") {
            return;
        }
        let (Some(call_id), Some(branch), Some(code)) = (
            msg.call_id(),
            msg.top_via().and_then(|v| v.branch().map(str::to_string)),
            msg.status(),
        ) else {
            return;
        };
        let to_tag = msg.to().and_then(|t| t.tag().map(str::to_string));
        let target = msg
            .header(HeaderName::Contact)
            .and_then(NameAddr::parse)
            .map(|n| n.uri.raw.to_string());
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        for aor in w
            .calls
            .response(call_id, &branch, code, to_tag.as_deref(), target.as_deref())
        {
            w.subs.changed(&aor);
        }
    }

    /// The call `call_id` ended (refused, cancelled, hung up).
    pub(crate) fn watch_call_ended(&self, call_id: &str) {
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        for aor in w.calls.end(call_id, Instant::now()) {
            w.subs.changed(&aor);
        }
    }
}

/// A NOTIFY of `d` with `body`.
fn notify(d: &Due<Reach>, branch: &str, cseq: u32, body: &str) -> String {
    let r = &d.reach;
    let state = match d.expires_in {
        Some(secs) => format!("active;expires={secs}"),
        None => "terminated;reason=timeout".to_string(),
    };
    format!(
        "NOTIFY {contact} SIP/2.0\r\nVia: {via};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} NOTIFY\r\nContact: <sip:{local};transport={transport}>\r\nEvent: dialog\r\nSubscription-State: {state}\r\nContent-Type: application/dialog-info+xml\r\nContent-Length: {len}\r\n\r\n{body}",
        contact = r.contact,
        via = via_at(r.transport, r.local, branch),
        from = r.us,
        to = r.watcher,
        call_id = d.id.call_id,
        local = crate::interfaces::fmt_addr(r.local),
        transport = r.transport,
        len = body.len(),
    )
}

/// Sends due NOTIFYs and retransmissions, and forgets old terminated legs.
pub(crate) async fn run(app: Arc<App>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        app.send_due_notifies(now);
        if now.duration_since(swept) >= Duration::from_secs(5) {
            swept = now;
            if let Ok(mut w) = app.watchers.lock() {
                w.calls.sweep(now);
                let w = &mut *w;
                w.callers.retain(|call_id, _| w.calls.knows(call_id));
            }
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
