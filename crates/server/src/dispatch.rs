//! Where every message from the transports enters: parsed, screened (scanners, invalid or
//! oversized requests, Proxy-Require), its retransmissions absorbed by the non-INVITE
//! transaction table, then dispatched by method to the registrar (`register.rs`), the proxy
//! (`proxy/`), or answered here (OPTIONS to the server). Connection closes and ICMP errors
//! arrive here too.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use careflow_core::Transport;
use careflow_core::transaction::{Received, TxKey};
use careflow_proto::{HeaderName, Message, Method, ParseErrorKind};
use careflow_transport::{ConnId, Inbound, InboundHandler};

use crate::app::{ALLOW, App, Ctx};

/// Option tags accepted in Proxy-Require (the extensions this proxy and registrar implement).
const PROXY_SUPPORTED: &[&str] = &["outbound", "path"];

impl App {
    /// True when the User-Agent names a known scanner.
    fn is_scanner(&self, msg: &Message) -> bool {
        msg.header(HeaderName::UserAgent)
            .is_some_and(|ua| self.cfg.scanner_user_agents.matches(ua))
    }

    fn handle_invalid(&self, msg: &Message, ctx: &Ctx, kind: ParseErrorKind, reason: &'static str) {
        self.metrics.parse_errors.fetch_add(1, Ordering::Relaxed);
        // A response needs a Via to route it and the dialog identifiers to be matched. A
        // request of another SIP version has a Via of that version, which we cannot parse:
        // its 505 goes back to the source address, as `received` would say (RFC 4475 badvers).
        let version = kind == ParseErrorKind::UnsupportedVersion;
        let answerable = msg.method() != Method::Ack
            && (msg.top_via().is_some() || (version && msg.header(HeaderName::Via).is_some()))
            && msg.call_id().is_some()
            && msg.header(HeaderName::CSeq).is_some()
            && msg.header(HeaderName::From).is_some()
            && msg.header(HeaderName::To).is_some();
        tracing::debug!(source = %ctx.source, reason, answerable, "invalid request");
        if !answerable {
            return;
        }
        let code = match (kind, reason) {
            (ParseErrorKind::UnsupportedVersion, _) => 505,
            // Limits of ours, answered so the sender knows which one it hit.
            (ParseErrorKind::TooManyHeaders | ParseErrorKind::TooLarge, _) => 513,
            (ParseErrorKind::TooManyValues, r) if r.contains("Via") => 483,
            (ParseErrorKind::TooManyValues, _) => 403,
            _ => 400,
        };
        let resp = self.reply(msg, ctx, code).reason(reason).build();
        self.send_response(msg, ctx, code, resp);
    }

    /// A datagram over MAX_MESSAGE_SIZE: 513 when its header section arrived whole enough to
    /// route an answer (RFC 3261 §21.5.14), otherwise dropped (nothing can be answered).
    fn answer_oversize(&self, msg: &Message, ctx: &Ctx) {
        let answerable = msg.is_request()
            && msg.method() != Method::Ack
            && msg.top_via().is_some()
            && msg.call_id().is_some()
            && msg.header(HeaderName::CSeq).is_some()
            && msg.header(HeaderName::From).is_some()
            && msg.header(HeaderName::To).is_some();
        tracing::debug!(source = %ctx.source, answerable, "request over MAX_MESSAGE_SIZE");
        if !answerable {
            return;
        }
        let resp = self
            .reply(msg, ctx, 513)
            .reason("Message Too Large (MAX_MESSAGE_SIZE)")
            .build();
        self.send_response(msg, ctx, 513, resp);
    }

    /// 420 Bad Extension, with Unsupported listing them, for Proxy-Require option tags we do
    /// not implement. True when it answered.
    fn refuse_proxy_require(&self, msg: &Message, ctx: &Ctx) -> bool {
        let unsupported: Vec<&str> = msg
            .values(HeaderName::ProxyRequire)
            .filter(|t| !PROXY_SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
            .collect();
        if unsupported.is_empty() {
            return false;
        }
        let resp = self
            .reply(msg, ctx, 420)
            .header("Unsupported", unsupported.join(", "))
            .build();
        self.send_response(msg, ctx, 420, resp);
        true
    }

    fn dispatch(&self, msg: Message, ctx: Ctx) {
        let Some(app) = self.me.upgrade() else { return };
        // A request whose Request-URI names a user (or carries a Route) is for the proxy;
        // one that names this server is answered here.
        let for_proxy = msg
            .request_uri()
            .is_some_and(|u| u.user.is_some() || !app.is_ours(&u))
            || msg.header(HeaderName::Route).is_some();
        match msg.method() {
            Method::Register => app.register_or_challenge(msg, ctx),
            Method::Cancel => app.proxy_cancel(msg, ctx),
            Method::Subscribe if app.take_subscribe(&msg, &ctx) => {}
            _ if for_proxy => app.proxy_non_invite(msg, ctx),
            Method::Options => {
                let resp = self
                    .reply(&msg, &ctx, 200)
                    .header("Allow", ALLOW)
                    .header("Accept", "application/sdp")
                    .build();
                self.send_response(&msg, &ctx, 200, resp);
            }
            Method::Other => {
                let resp = self.reply(&msg, &ctx, 501).header("Allow", ALLOW).build();
                self.send_response(&msg, &ctx, 501, resp);
            }
            _ => {
                // Addressed to the server itself, which is no user agent for these methods.
                let resp = self.reply(&msg, &ctx, 405).header("Allow", ALLOW).build();
                self.send_response(&msg, &ctx, 405, resp);
            }
        }
    }
}

impl InboundHandler for App {
    fn closed(&self, conn: ConnId) {
        let aors = self.flows.take(conn.0);
        if aors.is_empty() {
            return;
        }
        let location = self.location.clone();
        let metrics_app = self.me.clone();
        let pusher = self.push.clone();
        tokio::spawn(async move {
            // Side by side: each removal waits for the journal's next write, so one AoR at a
            // time a connection that carried thousands of registrations (a gateway, a load
            // generator) took as many journal rounds (10 ms each: 20,000 took 200 s).
            let (location, metrics_app, pusher) = (&location, &metrics_app, &pusher);
            let removals = futures_util::StreamExt::for_each_concurrent(
                futures_util::stream::iter(aors),
                64,
                |aor: String| async move {
                    // A push device's binding stays: it is woken by a push and registers again.
                    let n = crate::flows::remove_bindings(&**location, &aor, |b| {
                        b.conn == Some(conn.0)
                            && !crate::push::survives_its_flow(pusher.as_deref(), b)
                    })
                    .await;
                    if n > 0 {
                        tracing::info!(aor = %aor, conn = conn.0, removed = n,
                        "connection closed; its bindings are removed");
                        if let Some(app) = metrics_app.upgrade() {
                            app.metrics
                                .flow_bindings_dropped
                                .fetch_add(n as u64, Ordering::Relaxed);
                            app.publish(
                                careflow_store::events::EventKind::DeviceUnregistered,
                                &aor,
                                serde_json::json!({"why": "connection closed", "removed": n}),
                            );
                        }
                    }
                },
            );
            removals.await;
        });
    }

    fn unreachable(&self, transport: Transport, dest: SocketAddr) {
        if let Some(app) = self.me.upgrade() {
            app.proxy_unreachable(transport, dest);
        }
    }

    fn handle(&self, inbound: Inbound) {
        let Inbound {
            transport,
            source,
            local,
            conn,
            bytes,
            truncated,
        } = inbound;
        let msg = match Message::parse(bytes, &self.cfg.parse_limits) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.parse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(source = %source, reason = e.reason(), "unparseable message dropped");
                return;
            }
        };
        let mut ctx = Ctx {
            transport,
            source,
            local,
            conn,
            key: None,
        };
        if truncated {
            self.answer_oversize(&msg, &ctx);
            return;
        }
        if !msg.is_request() {
            if let Some(branch) = msg.top_via_branch()
                && (self.keepalive_answered(branch) || self.notify_answered(&msg, branch))
            {
                return;
            }
            if msg.validate().is_ok()
                && let Some(app) = self.me.upgrade()
            {
                app.proxy_response(msg, source.ip());
            }
            return;
        }
        self.metrics.request(msg.method());
        if self.is_scanner(&msg) {
            // Scanners get no answer at all: nothing to learn from, nothing to enumerate.
            self.metrics.scanner_drops.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "careflow::security", event = "scanner_dropped", src_ip = %source.ip(), "request from a SIP scanner dropped");
            return;
        }
        if let Err(e) = msg.validate() {
            self.handle_invalid(&msg, &ctx, e.kind, e.reason());
            return;
        }
        if self.refuse_while_draining(&msg, &ctx) {
            return;
        }
        if msg.method() == Method::Ack {
            if let Some(app) = self.me.upgrade() {
                app.proxy_ack(msg, ctx);
            }
            return;
        }
        let Some(key) = TxKey::of(&msg) else { return };
        // RFC 3261 §8.2.2.1 (RFC 4475 unksm, novelsc): schemes we cannot route get 416.
        let scheme_ok = msg
            .request_uri()
            .is_some_and(|u| u.is_sip() || u.scheme.eq_ignore_ascii_case("tel"));
        if !scheme_ok {
            let resp = self.reply(&msg, &ctx, 416).build();
            self.send_response(&msg, &ctx, 416, resp);
            return;
        }
        // RFC 3261 §16.3 step 8 / §8.2.2.3: extensions a proxy must understand.
        if msg.method() != Method::Cancel && self.refuse_proxy_require(&msg, &ctx) {
            return;
        }
        if msg.method() == Method::Invite {
            // INVITEs have their own server transactions (RFC 3261 §17.2.1), kept by the proxy.
            if let Some(app) = self.me.upgrade() {
                app.proxy_invite(msg, ctx, key);
            }
            return;
        }
        let Some(verdict) = self.receive_request(&key) else {
            return;
        };
        match verdict {
            Received::New => {}
            Received::Absorb => {
                self.metrics.retransmissions.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Received::Resend(bytes) => {
                self.metrics.retransmissions.fetch_add(1, Ordering::Relaxed);
                self.send_back(&msg, &ctx, bytes);
                return;
            }
            Received::Overloaded => {
                let resp = self.reply(&msg, &ctx, 503).header("Retry-After", 5).build();
                self.send_response(&msg, &ctx, 503, resp);
                return;
            }
        }
        ctx.key = Some(key);
        self.dispatch(msg, ctx);
    }
}

impl App {
    /// After a restart no connection survives: bindings that were tied to one cannot be
    /// reached and are removed (their devices re-register when they reconnect).
    pub(crate) async fn drop_orphaned_flows(&self) {
        if self.location.shared() {
            // Another node may hold those connections; only ours of an earlier life (their
            // owner route names this node in an older epoch) are known to be dead.
            self.drop_bindings_of_my_past().await;
            return;
        }
        let Ok(all) = self.location.all(crate::clock::unix_now()).await else {
            return;
        };
        let mut aors: Vec<&str> = all
            .iter()
            .filter(|b| b.transport.is_reliable() && b.conn.is_none() && b.path.is_empty())
            .map(|b| b.aor.as_str())
            .collect();
        aors.dedup();
        let mut removed = 0;
        for aor in aors {
            removed += crate::flows::remove_bindings(&*self.location, aor, |b| {
                b.transport.is_reliable()
                    && b.conn.is_none()
                    && b.path.is_empty()
                    && !crate::push::survives_its_flow(self.push.as_deref(), b)
            })
            .await;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "bindings over connections from before the restart removed"
            );
        }
    }

    /// Removes the bindings whose flows this node held before it restarted (the other nodes
    /// already skip them; this spares them the lookups until they expire).
    async fn drop_bindings_of_my_past(&self) {
        let Some(cluster) = &self.cluster else { return };
        let Ok(all) = self.location.all(crate::clock::unix_now()).await else {
            return;
        };
        let stale = |b: &careflow_core::Binding| {
            !crate::push::survives_its_flow(self.push.as_deref(), b)
                && b.owner
                    .as_deref()
                    .and_then(careflow_proto::NameAddr::parse)
                    .and_then(|na| cluster.token(na.uri.user?))
                    .is_some_and(|t| cluster.is_my_past(&t))
        };
        let mut aors: Vec<&str> = all
            .iter()
            .filter(|b| stale(b))
            .map(|b| b.aor.as_str())
            .collect();
        aors.sort_unstable();
        aors.dedup();
        let mut removed = 0;
        for aor in aors {
            removed += crate::flows::remove_bindings(&*self.location, aor, stale).await;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "bindings this node held before its restart removed"
            );
        }
    }
}
