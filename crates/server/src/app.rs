//! Receives parsed requests, keeps the transaction table and dispatches by method.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::auth::Authenticator;
use careflow_core::transaction::{Received, ServerTransactions, TxKey};
use careflow_proto::{HeaderName, Message, Method, ParseErrorKind, ResponseBuilder};
use careflow_store::{LocationStore, SubscriberStore};
use careflow_transport::{ConnId, Inbound, InboundHandler, ListenSpec, Outbound, Transports};

use crate::metrics::{Gauges, Metrics};
use crate::{ServerConfig, routing};

/// Methods this server handles itself today; listed in Allow.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, REGISTER, OPTIONS, MESSAGE, INFO, UPDATE, REFER, SUBSCRIBE, NOTIFY, PRACK";

/// Option tags accepted in Proxy-Require (the extensions this proxy and registrar implement).
const PROXY_SUPPORTED: &[&str] = &["outbound", "path"];

/// Responses of one call, in arrival order, with the address each came from.
pub(crate) type HeldResponses = std::collections::VecDeque<(Message, std::net::IpAddr)>;

/// Where a request came from, kept while it is processed.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) transport: Transport,
    pub(crate) source: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) conn: Option<ConnId>,
    pub(crate) key: Option<TxKey>,
}

/// The SIP application.
pub struct App {
    pub(crate) cfg: ServerConfig,
    pub(crate) auth: Authenticator,
    txs: Mutex<ServerTransactions>,
    pub(crate) subscribers: Arc<dyn SubscriberStore>,
    pub(crate) location: Arc<dyn LocationStore>,
    transports: OnceLock<Transports>,
    /// Counters.
    pub metrics: Metrics,
    me: Weak<App>,
    ids: AtomicU64,
    pub(crate) proxy: Mutex<crate::proxy::ProxyTables>,
    /// Local IP per destination, for choosing the interface a proxied request leaves by.
    pub(crate) route_cache: Mutex<std::collections::HashMap<std::net::IpAddr, std::net::IpAddr>>,
    bound: OnceLock<Vec<ListenSpec>>,
    /// Which AoRs registered over which connection.
    pub(crate) flows: crate::flows::FlowIndex,
    /// Keep-alive probes to devices behind NAT.
    pub(crate) keepalives: crate::keepalive::SharedTracker,
    /// The rtpengine client, when media anchoring is configured.
    pub(crate) media_engine: OnceLock<Arc<crate::rtpengine::RtpEngine>>,
    /// Calls whose media is anchored.
    pub(crate) media_calls: crate::media::MediaCalls,
    /// Responses waiting, by Call-ID, behind an earlier response of the call that is still at
    /// rtpengine (so they leave in arrival order).
    pub(crate) held_responses: Mutex<std::collections::HashMap<String, HeldResponses>>,
    /// Shutting down: new out-of-dialog requests get 503.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Requests being handled in spawned tasks.
    pub(crate) inflight: crate::drain::InFlightCount,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("domains", &self.cfg.domains)
            .finish_non_exhaustive()
    }
}

impl App {
    pub(crate) fn new(
        cfg: ServerConfig,
        auth: Authenticator,
        txs: ServerTransactions,
        subscribers: Arc<dyn SubscriberStore>,
        location: Arc<dyn LocationStore>,
        me: Weak<App>,
    ) -> Self {
        // Binding ids count up from a random start below 2^52: unique across restarts without
        // reading the store, and exact as JSON numbers (below 2^53).
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let start = u64::from_le_bytes(seed) & ((1 << 52) - 1);
        let proxy = Mutex::new(crate::proxy::ProxyTables::new(
            careflow_core::proxy::ProxyConfig {
                timers: cfg.timers,
                parse_limits: cfg.parse_limits,
                server_header: cfg.server_header.clone(),
                max_transactions: cfg.max_transactions,
            },
        ));
        Self {
            cfg,
            auth,
            txs: Mutex::new(txs),
            subscribers,
            location,
            transports: OnceLock::new(),
            metrics: Metrics::default(),
            me,
            ids: AtomicU64::new(start),
            proxy,
            route_cache: Mutex::default(),
            bound: OnceLock::new(),
            flows: crate::flows::FlowIndex::default(),
            keepalives: Default::default(),
            media_engine: OnceLock::new(),
            media_calls: Default::default(),
            held_responses: Mutex::default(),
            draining: Default::default(),
            inflight: Default::default(),
        }
    }

    pub(crate) fn set_transports(&self, t: Transports, bound: Vec<ListenSpec>) {
        let _ = self.transports.set(t);
        let _ = self.bound.set(bound);
    }

    pub(crate) fn transports(&self) -> Option<Transports> {
        self.transports.get().cloned()
    }

    pub(crate) fn bound_listeners(&self) -> &[ListenSpec] {
        self.bound.get().map_or(&[], Vec::as_slice)
    }

    /// A process-unique number: binding ids and the unique part of our branches.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Current gauges.
    pub fn gauges(&self) -> Gauges {
        let stats = self.transports.get().map(|t| t.stats().clone());
        Gauges {
            bindings: self.location.count() as u64,
            transactions: self.txs.lock().map(|t| t.len() as u64).unwrap_or(0)
                + self.proxy.lock().map(|t| t.len() as u64).unwrap_or(0),
            connections: stats
                .as_ref()
                .map_or(0, |s| s.connections.load(Ordering::Relaxed)),
            tracked_nonces: self.auth.tracked_nonces() as u64,
            oversize: stats
                .as_ref()
                .map_or(0, |s| s.oversize.load(Ordering::Relaxed)),
            dropped_banned: stats
                .as_ref()
                .map_or(0, |s| s.dropped_banned.load(Ordering::Relaxed)),
            flood_bans: stats.as_ref().map_or(0, |s| s.bans.load(Ordering::Relaxed)),
            site_shed: stats.as_ref().map_or(0, |s| s.shed.load(Ordering::Relaxed)),
            send_dropped: stats
                .as_ref()
                .map_or(0, |s| s.send_dropped.load(Ordering::Relaxed)),
            stalled_closed: stats
                .as_ref()
                .map_or(0, |s| s.stalled_closed.load(Ordering::Relaxed)),
            refused_connections: stats
                .as_ref()
                .map_or(0, |s| s.refused_connections.load(Ordering::Relaxed)),
            media_sessions: self.media_active() as u64,
            rtpengine: self.rtpengine().map_or((0, 0, 0), |e| {
                (
                    e.stats.answered.load(Ordering::Relaxed),
                    e.stats.errors.load(Ordering::Relaxed),
                    e.stats.latency_us.load(Ordering::Relaxed),
                )
            }),
            banned_now: self
                .cfg
                .guard
                .as_ref()
                .map_or(0, |g| g.bans(Instant::now()).len() as u64),
        }
    }

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.gauges())
    }

    pub(crate) fn expire_transactions(&self, now: Instant) {
        if let Ok(mut t) = self.txs.lock() {
            t.handle_timeout(now);
        }
    }

    pub(crate) async fn sweep(&self, now: u64) {
        match self.location.remove_expired(now).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "expired bindings removed"),
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "sweeping expired bindings failed");
            }
        }
        self.auth.sweep(now);
        release_free_memory();
    }

    /// True when the User-Agent names a known scanner.
    fn is_scanner(&self, msg: &Message) -> bool {
        let Some(ua) = msg.header(HeaderName::UserAgent) else {
            return false;
        };
        let ua = ua.to_ascii_lowercase();
        self.cfg
            .scanner_user_agents
            .iter()
            .any(|f| ua.contains(f.as_str()))
    }

    /// True when `host` is one of our domains.
    pub(crate) fn serves_domain(&self, host: &str) -> bool {
        self.cfg
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(host))
    }

    /// A response builder with what every response of ours carries.
    pub(crate) fn reply<'m>(&self, msg: &'m Message, ctx: &Ctx, code: u16) -> ResponseBuilder<'m> {
        ResponseBuilder::new(msg, code)
            .source(ctx.source)
            .to_tag(to_tag(msg))
            .header("Server", &self.cfg.server_header)
    }

    /// Records a final response in the transaction and sends it back where the request came from.
    pub(crate) fn send_response(&self, msg: &Message, ctx: &Ctx, code: u16, bytes: Bytes) {
        self.metrics.response(code);
        if code >= 200
            && let Some(key) = &ctx.key
        {
            self.record_response(key, bytes.clone(), ctx.transport.is_reliable());
        }
        self.send_back(msg, ctx, bytes);
    }

    /// Keeps the final response of a non-INVITE server transaction, so a retransmitted
    /// request gets it again.
    pub(crate) fn record_response(&self, key: &TxKey, bytes: Bytes, reliable: bool) {
        if let Ok(mut t) = self.txs.lock() {
            t.on_final_response(key, bytes, reliable, Instant::now());
        }
    }

    /// Sends bytes back where the request came from (RFC 3261 §18.2.2).
    pub(crate) fn send_back(&self, msg: &Message, ctx: &Ctx, bytes: Bytes) {
        let dest = routing::response_destination(msg.top_via().as_ref(), ctx.source);
        self.send_out(Outbound {
            transport: ctx.transport,
            dest,
            conn: ctx.conn,
            local: Some(ctx.local),
            bytes,
        });
    }

    /// Sends now, in order: the transports queue behind a full socket or connection rather
    /// than spawning a task per message (whose scheduling could let a 200 overtake its 180).
    /// Only a stream destination without a connection waits for a dial, in a task.
    pub(crate) fn send_out(&self, out: Outbound) {
        let Some(t) = self.transports.get() else {
            return;
        };
        let Some(out) = t.try_send(out) else {
            return;
        };
        let t = t.clone();
        tokio::spawn(async move {
            let dest = out.dest;
            if let Err(e) = t.send(out).await {
                tracing::debug!(%dest, error = %e, "send failed");
            }
        });
    }

    pub(crate) fn forget_transaction(&self, ctx: &Ctx) {
        if let (Some(key), Ok(mut t)) = (&ctx.key, self.txs.lock()) {
            t.forget(key);
        }
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
        tokio::spawn(async move {
            for aor in aors {
                let n = crate::flows::remove_bindings(&*location, &aor, |b| b.conn == Some(conn.0))
                    .await;
                if n > 0 {
                    tracing::info!(aor = %aor, conn = conn.0, removed = n,
                        "connection closed; its bindings are removed");
                    if let Some(app) = metrics_app.upgrade() {
                        app.metrics
                            .flow_bindings_dropped
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
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
            if let Some(branch) = msg.top_via().and_then(|v| v.branch().map(str::to_string))
                && self.keepalive_answered(&branch)
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
        let verdict = match self.txs.lock() {
            Ok(mut t) => t.on_request(&key, Instant::now()),
            Err(_) => return,
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

/// Hands memory freed by expired transactions back to the OS. glibc keeps freed heap pages
/// otherwise, so a burst of registrations would look like a permanent cost per contact.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap structures; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A To tag that is the same for every response in a transaction, so a resent response and
/// a recomputed one agree.
pub(crate) fn to_tag(msg: &Message) -> String {
    careflow_core::proxy::local_tag(msg)
}

impl App {
    /// After a restart no connection survives: bindings that were tied to one cannot be
    /// reached and are removed (their devices re-register when they reconnect).
    pub(crate) async fn drop_orphaned_flows(&self) {
        if self.location.shared() {
            // Another node may hold those connections.
            return;
        }
        let Ok(all) = self.location.all(crate::unix_now()).await else {
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
                b.transport.is_reliable() && b.conn.is_none() && b.path.is_empty()
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
}
