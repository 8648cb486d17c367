//! SUBSCRIBE with `Event: dialog` or `Event: presence` to one of our users is answered here:
//! proxy authentication, the watch policy, 200 with the expiry granted, then a NOTIFY at once
//! (`notify.rs`). Other event packages are routed to the user's devices as before.

use std::sync::Arc;
use std::time::Instant;

use careflow_core::dialog_event::subscriptions::{Package, Refusal, Request, SubId};
use careflow_proto::{HeaderName, Message, Method, scan};

use super::aor_of;
use crate::app::{App, Ctx};
use crate::watchers::Reach;

/// The package of a SUBSCRIBE we answer ourselves.
fn package_of(msg: &Message) -> Option<Package> {
    Package::of_event(msg.header(HeaderName::Event)?)
}

impl App {
    /// Takes a SUBSCRIBE to one of our users: the dialog and presence packages are served
    /// here, any other out of a dialog gets 489 (we are the notifier of our users; routed to
    /// their own devices it would only ring back at them). False when it is not ours (a
    /// subscription in a device's dialog, or to another domain): routed as before.
    pub(crate) fn take_subscribe(self: &Arc<Self>, msg: &Message, ctx: &Ctx) -> bool {
        if msg.method() != Method::Subscribe {
            return false;
        }
        let package = package_of(msg);
        if package.is_none() && msg.to_tag().is_some() {
            return false;
        }
        let Some(uri) = msg.request_uri() else {
            return false;
        };
        // An initial SUBSCRIBE names the watched user at our domain; a refresh comes to the
        // Contact we gave (the user at one of our listeners).
        if uri.user.is_none()
            || !(self.serves_domain(uri.host.as_str()) || self.interfaces.names_listener(&uri))
        {
            return false;
        }
        let (app, msg, ctx) = (self.clone(), msg.clone(), ctx.clone());
        tokio::spawn(async move { app.handle_subscribe(msg, ctx, package).await });
        true
    }

    async fn handle_subscribe(self: Arc<Self>, msg: Message, ctx: Ctx, package: Option<Package>) {
        let refuse = |code: u16| self.reply(&msg, &ctx, code).build();
        if let Err((code, bytes)) = self.authorize_caller(&msg, &ctx).await {
            self.send_response(&msg, &ctx, code, bytes);
            return;
        }
        let Some(package) = package else {
            tracing::debug!(event = ?msg.header(HeaderName::Event), "SUBSCRIBE for a package we do not serve (489)");
            let b = self
                .reply(&msg, &ctx, 489)
                .header("Allow-Events", "dialog, presence")
                .build();
            self.send_response(&msg, &ctx, 489, b);
            return;
        };
        let (Some(named), Some(watcher), Some(call_id), Some(from_tag)) = (
            msg.request_uri().as_ref().and_then(aor_of),
            msg.from().as_ref().map(|f| &f.uri).and_then(aor_of),
            msg.call_id().map(str::to_string),
            msg.from_tag().map(str::to_string),
        ) else {
            self.send_response(&msg, &ctx, 400, refuse(400));
            return;
        };
        let id = SubId { call_id, from_tag };
        // A refresh (in the subscription's dialog) watches what the subscription does; one for
        // a subscription we do not have (ended, or from before a restart) gets 481, and the
        // phone subscribes afresh at once (RFC 6665 §4.1.2.2).
        let in_dialog = msg.to_tag().is_some();
        let watched = if in_dialog {
            let known = self
                .watchers
                .lock()
                .ok()
                .and_then(|w| w.subs.watched_of(&id).map(|(a, p)| (a.to_string(), p)));
            match known {
                Some((w, p)) if p == package => w,
                _ => {
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
        if !self.cfg.blf.watch_policy.may_watch(&watcher, &watched) {
            tracing::info!(
                watcher,
                watched,
                "dialog subscription refused by the watch policy"
            );
            self.send_response(&msg, &ctx, 403, refuse(403));
            return;
        }
        let Some(contact) = msg.contact().map(|n| n.uri.raw.to_string()) else {
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
            quirks: self.cfg.blf.quirks_of(msg.header(HeaderName::UserAgent)),
        };
        let expires = msg
            .header(HeaderName::Expires)
            .and_then(scan::parse_u64)
            .map(|v| v.min(u64::from(u32::MAX)) as u32);
        if package == Package::Presence {
            self.presence_lookup(&watched).await;
        }
        let req = Request {
            watcher: &watcher,
            watched: &watched,
            package,
            expires,
        };
        let granted = match self.watchers.lock() {
            Ok(mut w) => {
                w.dirty = true;
                w.subs.subscribe(id, req, reach, Instant::now())
            }
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
                tracing::info!(
                    watcher,
                    watched,
                    expires = secs,
                    package = package.as_str(),
                    "subscription"
                );
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
}
