//! The application's state (configuration, stores, transaction tables, metrics) and how every
//! handler answers and sends: `reply`, `send_response`, `send_back`, `send_out`. Messages enter
//! in `dispatch.rs`; this module imports none of the handlers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::auth::Authenticator;
use careflow_core::transaction::{Received, ServerTransactions, TxKey};
use careflow_proto::{Message, ResponseBuilder};
use careflow_store::{LocationStore, SubscriberStore};
use careflow_transport::{ConnId, ListenSpec, Outbound, Transports};

use crate::config::ServerConfig;
use crate::metrics::{Gauges, Metrics};
use crate::routing;

/// Methods this server handles itself today; listed in Allow.
pub(crate) const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, REGISTER, OPTIONS, MESSAGE, INFO, UPDATE, REFER, SUBSCRIBE, NOTIFY, PRACK";

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
    /// This application, for handlers that spawn tasks from `&self`.
    pub(crate) me: Weak<App>,
    ids: AtomicU64,
    pub(crate) proxy: Mutex<routing::ProxyTables>,
    /// Our listeners and which of them faces a peer.
    pub(crate) interfaces: crate::interfaces::Interfaces,
    /// Which AoRs registered over which connection.
    pub(crate) flows: crate::flows::FlowIndex,
    /// Keep-alive probes to devices behind NAT.
    pub(crate) keepalives: Mutex<careflow_core::keepalive::Tracker>,
    /// The rtpengine client, when media anchoring is configured.
    /// Calls whose media is anchored.
    pub(crate) media: Arc<crate::media::MediaAnchor>,
    /// Responses waiting, by Call-ID, behind an earlier response of the call that is still at
    /// rtpengine (so they leave in arrival order).
    pub(crate) held_responses: Mutex<foldhash::HashMap<String, HeldResponses>>,
    /// Shutting down: new out-of-dialog requests get 503.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// Requests being handled in spawned tasks.
    pub(crate) inflight: std::sync::atomic::AtomicUsize,
    /// This node's part in a cluster (`CLUSTER_ADDRESS`); none when it is alone.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Calls ringing, by callee, for late forking.
    pub(crate) ringing: crate::ringing::RingingIndex,
    /// Other flows of the devices branches go to, for a retry when one fails.
    pub(crate) alternate_flows: crate::ringing::AlternateFlows,
    /// Push wake-ups, when a push service is configured.
    pub(crate) push: Option<Arc<crate::push::Pusher>>,
    /// Requests held for pushed devices, kept while a device may wake for them (one woken
    /// after its call ended still gets the INVITE and a CANCEL).
    pub(crate) pushed_requests: Mutex<foldhash::HashMap<TxKey, (Message, Ctx)>>,
    /// Busy lamps: the users' call legs and the dialog-event subscriptions.
    pub(crate) watchers: Mutex<crate::watchers::Watchers>,
    /// Call detail records of the calls in progress; none when records are off.
    pub(crate) cdr: Option<crate::call_records::Cdr>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("domains", &self.cfg.domains)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Publishes a live event about `user` (the API's event streams and webhooks read them).
    pub(crate) fn publish(
        &self,
        kind: careflow_store::events::EventKind,
        user: &str,
        detail: serde_json::Value,
    ) {
        self.cfg
            .events
            .publish(careflow_store::events::LiveEvent::now(kind, user, detail));
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
        let media_policy = cfg.media.as_ref().map(|m| m.policy);
        let cfg_push = cfg.push.clone();
        let cdr_max_call = cfg.cdr.as_ref().map(|c| c.max_call);
        let cluster = cfg.cluster.clone().map(|c| {
            let epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Arc::new(crate::cluster::Cluster::new(c, epoch))
        });
        let proxy = Mutex::new(routing::ProxyTables::new(
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
            interfaces: Default::default(),
            flows: crate::flows::FlowIndex::default(),
            keepalives: Default::default(),
            media: Arc::new(crate::media::MediaAnchor::new(media_policy)),
            held_responses: Mutex::default(),
            draining: Default::default(),
            inflight: Default::default(),
            cluster,
            ringing: Default::default(),
            alternate_flows: Default::default(),
            push: cfg_push.map(|p| Arc::new(crate::push::Pusher::new(p))),
            pushed_requests: Mutex::default(),
            watchers: Mutex::default(),
            cdr: cdr_max_call.map(crate::call_records::Cdr::new),
        }
    }

    pub(crate) fn set_transports(&self, t: Transports, bound: Vec<ListenSpec>) {
        let _ = self.transports.set(t);
        self.interfaces.set_bound(bound);
    }

    pub(crate) fn transports(&self) -> Option<Transports> {
        self.transports.get().cloned()
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
            media_sessions: self.media.active() as u64,
            cluster_nodes: self.cluster.as_ref().map_or(0, |c| c.alive() as u64),
            rtpengine: self.media.engine().map_or((0, 0, 0), |e| {
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
        let mut s = self.metrics.render(&self.gauges());
        if let Some(p) = &self.push {
            p.stats.render(&mut s);
        }
        s
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

    /// True when `host` is one of our domains, in any case (callers need not lower-case it).
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

    /// A request arrived: what its non-INVITE server transaction says (new, a retransmission
    /// to absorb or answer again, or no room).
    pub(crate) fn receive_request(&self, key: &TxKey) -> Option<Received> {
        self.txs
            .lock()
            .ok()
            .map(|mut t| t.on_request(key, Instant::now()))
    }

    pub(crate) fn forget_transaction(&self, ctx: &Ctx) {
        if let (Some(key), Ok(mut t)) = (&ctx.key, self.txs.lock()) {
            t.forget(key);
        }
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
