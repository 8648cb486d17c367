//! The stateful proxy (RFC 3261 §16): requests for our users are authenticated (407), looked up
//! in the location service and forked to every binding; responses are matched to the branch
//! that sent the request and the best one goes back (§16.7). In-dialog requests follow the
//! Route set we recorded. Every transaction decision (forking, §16.7 aggregation, CANCEL of
//! the losers, Timer C, retransmissions) is `careflow_core::proxy::ProxyTable`'s; this module
//! decides where requests go, builds what is sent on each branch, and drives the table: every
//! entry point is one [`App::with_proxy`] call, which then sends what the table queued and acts
//! on its events (metrics, logs, the end of a call's media).
//!
//! Where an INVITE goes, file by file: `dispatch.rs` parses and dispatches it to
//! [`App::proxy_invite`] (here: its server transaction and 100 Trying come first, then routing
//! runs in a task); `route.rs` decides where it goes (`decide`: hop limit, loops, in-dialog
//! Route/flow token, our users' bindings, the gateway; proxy authentication through
//! `auth.rs`'s `Digest`); `media/` (the `MediaAnchor`) gives each branch its rtpengine offer;
//! `fork.rs` builds the request for each target (Via, Record-Route, flow tokens, with our
//! addresses from `interfaces.rs`) and hands them to the table; `respond.rs` keeps a call's
//! responses in arrival order (behind one still at rtpengine) and gives them to the table,
//! which relays provisionals and 2xx and picks the final answer; `proxy_tick` here runs the
//! table's timers; `addr.rs` says whether a URI names us.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::flow::Flow;
use careflow_core::proxy;
use careflow_core::proxy::{BranchKey, Event, NewBranch, Transmit, Upstream};
use careflow_core::transaction::TxKey;
use careflow_proto::rewrite::{RequestEdit, strip_top_via};
use careflow_proto::{HeaderName, Message, Method, Uri, Via, scan};
use careflow_transport::{ConnId, Outbound};

use crate::app::{App, Ctx};
use crate::auth::Challenger;
use crate::clock::unix_now;
use crate::interfaces::{record_route_at, via_at};
use crate::routing::{Back, ProxyTables, Target};

mod addr;
mod fork;
mod late;
mod respond;
mod route;
mod wake;

/// Where a request goes: the hops it is forked to now, and the sleeping devices (a push wakes
/// each) it waits for.
pub(super) struct Routed {
    hops: Vec<Hop>,
    sleepers: Vec<(careflow_core::Binding, careflow_core::push::PushParams)>,
    /// A `Replaces` value the request is to carry (a pickup dialled by feature code).
    replaces: Option<String>,
}

impl From<Vec<Hop>> for Routed {
    fn from(hops: Vec<Hop>) -> Self {
        Self {
            hops,
            sleepers: Vec::new(),
            replaces: None,
        }
    }
}

/// Where one branch goes: its Request-URI (empty: unchanged), the next hop, and Route values
/// to push (a registered Path). Media anchoring may give a branch its own Via branch and SDP.
#[derive(Debug, Clone)]
pub(crate) struct Hop {
    uri: String,
    target: Target,
    routes: Vec<String>,
    /// Media anchoring's own Via branch and SDP for this hop (`media::BranchOffer`).
    branch: Option<String>,
    body: Option<String>,
    /// The device at the end, as media anchoring sees it, when the hop is not the device
    /// itself (another node of the cluster holds its flow).
    device: Option<crate::media::Callee>,
    /// The device's other flows (binding ids, best first), tried when this one fails.
    alternates: Vec<u64>,
}

impl Hop {
    fn to(uri: String, target: Target) -> Self {
        Self {
            uri,
            target,
            routes: Vec::new(),
            branch: None,
            body: None,
            device: None,
            alternates: Vec::new(),
        }
    }

    /// What this hop reaches (a device's contact over one flow): a late branch is added only
    /// for a flow the call was not forked to yet.
    fn flow_id(&self) -> String {
        let mut id = String::with_capacity(self.uri.len() + 48);
        id.push_str(&self.uri);
        id.push('|');
        id.push_str(self.target.transport.as_str());
        id.push('|');
        crate::interfaces::push_addr(&mut id, self.target.dest);
        id.push('|');
        if let Some(c) = self.target.conn {
            scan::push_decimal(&mut id, c.0);
        }
        for (i, r) in self.routes.iter().enumerate() {
            if i > 0 {
                id.push(',');
            }
            id.push_str(r);
        }
        id
    }

    fn callee(&self) -> crate::media::Callee {
        self.device.unwrap_or(crate::media::Callee {
            transport: self.target.transport,
            behind_nat: self.target.flow,
        })
    }
}

/// What the table queued during one call, sent and acted on once it is unlocked.
#[derive(Default)]
struct Output {
    transmits: Vec<Transmit<Back, Target>>,
    events: Vec<Event>,
}

/// What became of an INVITE that arrived.
enum Opened {
    /// A retransmission, absorbed by its server transaction.
    Again,
    /// Its server transaction exists and 100 Trying went out.
    Stateful,
    /// Answered without a lookup: no server transaction (see `answered_at_once`).
    Stateless,
    /// The table is full.
    Full,
}

impl App {
    /// How the caller of `msg` is answered.
    fn upstream(&self, msg: &Message, ctx: &Ctx) -> Upstream<Back> {
        Upstream {
            source: ctx.source,
            reliable: ctx.transport.is_reliable(),
            reports_call: !self.came_over_cluster(ctx),
            to: Back {
                transport: ctx.transport,
                dest: crate::routing::response_destination(msg.top_via().as_ref(), ctx.source),
                conn: ctx.conn,
                local: ctx.local,
            },
        }
    }

    /// Runs `f` on the proxy table and takes what it queued; the caller sends it with
    /// [`Self::apply`] (after anything that must go first) once the lock is released.
    fn step<R>(&self, f: impl FnOnce(&mut ProxyTables) -> R) -> Option<(R, Output)> {
        let mut t = self.proxy.lock().ok()?;
        let r = f(&mut t);
        let out = Output {
            transmits: std::iter::from_fn(|| t.poll_transmit()).collect(),
            events: std::iter::from_fn(|| t.poll_event()).collect(),
        };
        Some((r, out))
    }

    /// Runs `f` on the proxy table, then sends what it queued and acts on its events.
    pub(crate) fn with_proxy<R>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut ProxyTables) -> R,
    ) -> Option<R> {
        let (r, out) = self.step(f)?;
        self.apply(out);
        Some(r)
    }

    fn apply(self: &Arc<Self>, out: Output) {
        for t in out.transmits {
            match t {
                Transmit::Upstream { to, bytes } => self.send_out(to.outbound(bytes)),
                Transmit::Downstream { branch, to, bytes } => {
                    self.send_branch(branch, to.outbound(bytes))
                }
            }
        }
        for e in out.events {
            match e {
                Event::Final { code, record } => {
                    self.metrics.response(code);
                    if let Some(r) = record {
                        self.record_response(&r.key, r.response, r.reliable);
                    }
                }
                Event::CallAnswered { call_id, code } => {
                    self.metrics.calls_answered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(call_id = &*call_id, code, "call answered");
                }
                Event::CallFailed { call_id, code } => {
                    self.watch_call_ended(&call_id);
                    self.cdr_failed(&call_id, code);
                    self.metrics.call_failed(code);
                    tracing::info!(call_id = &*call_id, code, "call failed");
                }
                Event::MediaEnd { call_id } => self.media.end(&call_id),
            }
        }
    }

    /// An INVITE retransmission or a new INVITE (the non-INVITE table does not see INVITEs).
    ///
    /// Transaction first, routing second: unless the INVITE is answered at once (the first,
    /// credential-less INVITE of a call gets its 407 without any lookup), its server
    /// transaction exists and 100 Trying is sent before routing starts, so a retransmission
    /// arriving while the database, DNS or rtpengine is slow is absorbed instead of being
    /// authenticated again (a replayed nonce) or forked twice.
    pub(crate) fn proxy_invite(self: &Arc<Self>, msg: Message, mut ctx: Ctx, key: TxKey) {
        let now = Instant::now();
        let stateless = self.answered_at_once(&msg);
        let opened = self.with_proxy(|t| {
            if t.handle_retransmission(&key) {
                Opened::Again
            } else if t.is_full() {
                Opened::Full
            } else if stateless {
                Opened::Stateless
            } else {
                match t.open(key.clone(), msg.clone(), self.upstream(&msg, &ctx), now) {
                    Ok(()) => Opened::Stateful,
                    Err(_) => Opened::Full,
                }
            }
        });
        match opened {
            None => {}
            Some(Opened::Again) => {
                self.metrics.retransmissions.fetch_add(1, Ordering::Relaxed);
            }
            Some(Opened::Full) => {
                let resp = self.reply(&msg, &ctx, 503).header("Retry-After", 5).build();
                self.send_back(&msg, &ctx, resp);
            }
            Some(Opened::Stateful | Opened::Stateless) => {
                ctx.key = Some(key);
                self.spawn_routing(msg, ctx);
            }
        }
    }

    /// Whether routing answers this INVITE without waiting for anything, so that a server
    /// transaction would only cost memory, a 100 Trying and retransmissions of a refusal to
    /// whoever sent it (a spoofed flood must not be amplified): the first INVITE of a call from
    /// one of our users without credentials (407 at once), or one that `decide` refuses before
    /// any lookup (another domain without a gateway, a caller from outside without peering).
    fn answered_at_once(&self, msg: &Message) -> bool {
        if msg.to_tag().is_some() {
            return false;
        }
        let ours = |host: &str| self.serves_domain(host);
        let from_ours = msg.from().is_some_and(|f| ours(f.uri.host.as_str()));
        let to_ours = msg
            .request_uri()
            .is_some_and(|u| u.user.is_some() && ours(u.host.as_str()));
        match (from_ours, to_ours) {
            (true, _) if msg.header(HeaderName::ProxyAuthorization).is_none() => true,
            (true, false) => self.cfg.outbound_gateway.is_none(),
            (true, true) => false,
            (false, true) => !self.cfg.allow_inbound,
            (false, false) => true,
        }
    }

    /// The final answer of ours to an INVITE: through its server transaction when routing
    /// made one (retransmitted until ACKed, which it absorbs), else statelessly (the ACK is
    /// recognised by our To tag).
    fn answer_invite(self: &Arc<Self>, msg: &Message, ctx: &Ctx, code: u16, bytes: Bytes) {
        let now = Instant::now();
        let handled = ctx.key.as_ref().is_some_and(|key| {
            self.with_proxy(|t| t.answer(key, code, bytes.clone(), now))
                .unwrap_or(false)
        });
        if !handled {
            self.metrics.response(code);
            self.send_back(msg, ctx, bytes);
        }
    }

    /// Routes and forwards `msg`: now, or in a task of its own once it must wait (a network
    /// store, DNS); counted for the shutdown drain.
    fn spawn_routing(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        let app = self.clone();
        crate::drain::handle_now_or_in_task(self, async move {
            // Routing's state machine is ~7 KiB: boxed when it starts, so the future handed
            // over (and moved into a task if it waits) is ~1 KiB.
            Box::pin(app.route_request(msg, ctx)).await;
        });
    }

    /// A non-INVITE request that is not for the registrar or the server itself. The proxy
    /// table is bounded like the server transactions (`MAX_TRANSACTIONS`).
    pub(crate) fn proxy_non_invite(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        if self.proxy.lock().map_or(true, |t| t.is_full()) {
            let resp = self.reply(&msg, &ctx, 503).header("Retry-After", 5).build();
            self.send_response(&msg, &ctx, 503, resp);
            return;
        }
        self.spawn_routing(msg, ctx);
    }

    /// An ACK: absorbed by the INVITE transaction it acknowledges, dropped when it answers a
    /// response we generated, otherwise (ACK for a 2xx) forwarded along the route set.
    pub(crate) fn proxy_ack(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        if let Some(key) = TxKey::with_method(&msg, "INVITE")
            && self.with_proxy(|t| t.handle_ack(&key, Instant::now())) == Some(true)
        {
            return;
        }
        if msg.to_tag() == Some(crate::app::to_tag(&msg).as_str()) {
            return;
        }
        let app = self.clone();
        crate::drain::handle_now_or_in_task(self, async move {
            // Boxed as routing is (see `spawn_routing`).
            Box::pin(async move {
                // An ACK may answer a late offer of an anchored call.
                let msg = app.media.request(msg, ctx.source.ip()).await;
                if let Some((target, bytes)) = app.stateless_forward(&msg, &ctx).await {
                    app.send_out(target.outbound(bytes));
                }
            })
            .await;
        });
    }

    /// CANCEL for an INVITE we are forwarding: 200 for the CANCEL (before anything the
    /// CANCEL causes), CANCEL down every branch that has not answered finally (§16.10), or 487
    /// at once for an INVITE still being routed.
    pub(crate) fn proxy_cancel(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        let Some(key) = TxKey::with_method(&msg, "INVITE") else {
            return;
        };
        let Some((found, out)) = self.step(|t| t.handle_cancel(&key, Instant::now())) else {
            return;
        };
        if found {
            self.cdr_cancel(&msg);
        }
        let code = if found { 200 } else { 481 };
        let resp = self.reply(&msg, &ctx, code).build();
        self.send_response(&msg, &ctx, code, resp);
        self.apply(out);
    }

    /// Forwarded requests still waiting for their final response (shutdown waits for them).
    pub(crate) fn pending_forwards(&self) -> usize {
        self.proxy.lock().map(|t| t.pending()).unwrap_or(0)
    }

    /// Shutdown's grace period is over: every forward still unanswered has its branches
    /// CANCELled and its caller answered 503. Returns how many there were.
    pub(crate) fn give_up_pending(self: &Arc<Self>) -> usize {
        self.with_proxy(|t| t.give_up(Instant::now())).unwrap_or(0)
    }

    /// Runs the proxy's due timers; called every [`TICK`]. Only transactions whose deadline
    /// has come are touched, whatever the table size.
    pub(crate) fn proxy_tick(self: &Arc<Self>, now: Instant) {
        self.with_proxy(|t| t.handle_timeout(now));
    }
}

/// How often the proxy's timers are checked.
pub(crate) const TICK: Duration = Duration::from_millis(50);
