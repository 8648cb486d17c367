//! The stateful proxy (RFC 3261 §16): requests for our users are authenticated (407), looked up
//! in the location service and forked to every binding; responses are matched to the branch
//! that sent the request and the best one goes back (§16.7). In-dialog requests follow the
//! Route set we recorded. Transactions are the sans-IO machines of `careflow_core`; this
//! module owns their tables and turns their output into sends.
//!
//! Where an INVITE goes, file by file: `app.rs` parses and dispatches it to
//! [`App::proxy_invite`] (here: its server transaction and 100 Trying come first, then routing
//! runs in a task); `route.rs` decides where it goes (`decide`: hop limit, loops, in-dialog
//! Route/flow token, our users' bindings, the gateway; proxy authentication through
//! `auth.rs`); `media.rs` gives the hops their rtpengine offers; `fork.rs` makes one client
//! transaction per target and sends; `respond.rs` matches each response to its branch, relays
//! provisionals and 2xx in arrival order and picks the final answer with
//! `careflow_core::proxy::best`; `proxy_tick` here runs the timers (Timer C, retransmissions)
//! and `addr.rs` says which of our addresses face a peer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use careflow_core::Transport;
use careflow_core::flow::Flow;
use careflow_core::proxy;
use careflow_core::proxy::best;
use careflow_core::transaction::TxKey;
use careflow_core::transaction::client::{ClientEvent, ClientState, ClientTransaction};
use careflow_core::transaction::invite_server::InviteServerTransaction;
use careflow_proto::rewrite::{RequestEdit, strip_top_via};
use careflow_proto::{HeaderName, Message, Method, ResponseBuilder, Uri, Via, request, scan};
use careflow_transport::{ConnId, Outbound};

use crate::app::{App, Ctx};
use crate::auth::Challenger;
use crate::unix_now;

mod addr;
mod fork;
mod respond;
mod route;
mod tables;

/// Where a branch sends its request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub(crate) transport: Transport,
    dest: SocketAddr,
    /// Our listener to send from (the interface facing `dest`).
    local: Option<SocketAddr>,
    /// The connection to use (a device registered over it).
    conn: Option<ConnId>,
    /// The device is behind NAT or on its own connection: in-dialog requests must find it by
    /// a flow token in our Record-Route, not by its Contact.
    pub(crate) flow: bool,
}

impl Target {
    fn at(transport: Transport, dest: SocketAddr) -> Self {
        Self {
            transport,
            dest,
            local: None,
            conn: None,
            flow: false,
        }
    }

    fn flow_token(&self, secret: &[u8; 32]) -> Option<String> {
        self.flow.then(|| {
            Flow {
                transport: self.transport,
                conn: self.conn.map(|c| c.0),
                addr: self.dest,
            }
            .encode(secret)
        })
    }

    fn outbound(self, bytes: Bytes) -> Outbound {
        Outbound {
            transport: self.transport,
            dest: self.dest,
            conn: self.conn,
            local: self.local,
            bytes,
        }
    }
}

/// Where one branch goes: its Request-URI (empty: unchanged), the next hop, and Route values
/// to push (a registered Path). Media anchoring may give a branch its own Via branch and SDP.
#[derive(Debug)]
pub(crate) struct Hop {
    uri: String,
    pub(crate) target: Target,
    routes: Vec<String>,
    pub(crate) branch: Option<String>,
    pub(crate) body: Option<String>,
}

impl Hop {
    fn to(uri: String, target: Target) -> Self {
        Self {
            uri,
            target,
            routes: Vec::new(),
            branch: None,
            body: None,
        }
    }
}

/// A new Via branch for a request we forward.
pub(crate) fn new_branch(app: &App, msg: &Message) -> String {
    proxy::branch(&proxy::loop_hash(msg), app.next_id())
}

/// One forwarded request: the server side and its branches.
#[derive(Debug)]
struct Forward {
    request: Message,
    ctx: Ctx,
    invite: Option<InviteServerTransaction>,
    branches: Vec<String>,
    best: Option<(u16, Bytes)>,
    /// WWW-/Proxy-Authenticate lines of every 401/407 received (§16.7 step 7).
    challenges: Vec<String>,
    final_sent: bool,
    /// An out-of-dialog INVITE: a call, counted in the call metrics.
    call: bool,
    /// `best` is our own answer (shutdown), not one from downstream.
    local_final: bool,
}

#[derive(Debug)]
struct Branch {
    tx: ClientTransaction,
    forward: TxKey,
    target: Target,
    done: bool,
}

pub(crate) use tables::ProxyTables;
use tables::Timed;

/// Messages to send once the tables are unlocked.
#[derive(Default)]
struct Sends(Vec<Outbound>);

impl App {
    /// An INVITE retransmission or a new INVITE (the non-INVITE table does not see INVITEs).
    ///
    /// Transaction first, routing second: unless the INVITE is answered at once (the first,
    /// credential-less INVITE of a call gets its 407 without any lookup), its server
    /// transaction exists and 100 Trying is sent before routing starts, so a retransmission
    /// arriving while the database, DNS or rtpengine is slow is absorbed instead of being
    /// authenticated again (a replayed nonce) or forked twice.
    pub(crate) fn proxy_invite(self: &Arc<Self>, msg: Message, mut ctx: Ctx, key: TxKey) {
        let now = Instant::now();
        let mut sends = Sends::default();
        let full = {
            let Ok(mut t) = self.proxy.lock() else { return };
            if let Some(fw) = t.forwards.get_mut(&key) {
                self.metrics.retransmissions.fetch_add(1, Ordering::Relaxed);
                if let Some(inv) = fw.invite.as_mut() {
                    inv.handle_retransmission();
                }
                let sends = drain_forward(fw);
                drop(t);
                self.flush(sends);
                return;
            }
            let full = t.len() >= self.cfg.max_transactions;
            ctx.key = Some(key.clone());
            if !full && !self.answered_at_once(&msg) {
                let mut inv =
                    InviteServerTransaction::new(ctx.transport.is_reliable(), self.cfg.timers, now);
                // 100 Trying at once (§16.2), so the caller stops retransmitting.
                let trying = ResponseBuilder::new(&msg, 100).source(ctx.source).build();
                inv.send_response(100, trying, now);
                let mut fw = Forward {
                    request: msg.clone(),
                    ctx: ctx.clone(),
                    invite: Some(inv),
                    branches: Vec::new(),
                    best: None,
                    challenges: Vec::new(),
                    final_sent: false,
                    call: msg.to().and_then(|t| t.tag()).is_none(),
                    local_final: false,
                };
                sends = drain_forward(&mut fw);
                t.forwards.insert(key.clone(), fw);
                t.schedule_forward(&key);
            }
            full
        };
        self.flush(sends);
        if full {
            let resp = self.reply(&msg, &ctx, 503).header("Retry-After", 5).build();
            self.send_back(&msg, &ctx, resp);
            return;
        }
        self.spawn_routing(msg, ctx);
    }

    /// Whether routing answers this INVITE without waiting for anything, so that a server
    /// transaction would only cost memory, a 100 Trying and retransmissions of a refusal to
    /// whoever sent it (a spoofed flood must not be amplified): the first INVITE of a call from
    /// one of our users without credentials (407 at once), or one that `decide` refuses before
    /// any lookup (another domain without a gateway, a caller from outside without peering).
    fn answered_at_once(&self, msg: &Message) -> bool {
        if msg.to().and_then(|t| t.tag()).is_some() {
            return false;
        }
        let ours = |host: &str| self.serves_domain(&host.to_ascii_lowercase());
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
    fn answer_invite(&self, msg: &Message, ctx: &Ctx, code: u16, bytes: Bytes) {
        self.metrics.response(code);
        let now = Instant::now();
        let mut bytes = Some(bytes);
        let sends = match (&ctx.key, self.proxy.lock()) {
            (Some(key), Ok(mut t)) => match t.forwards.get_mut(key) {
                Some(fw) if fw.final_sent => return,
                Some(fw) => {
                    fw.final_sent = true;
                    if let (Some(inv), Some(b)) = (fw.invite.as_mut(), bytes.take()) {
                        inv.send_response(code, b, now);
                    }
                    let sends = drain_forward(fw);
                    t.schedule_forward(key);
                    t.reap_forward(key);
                    sends
                }
                None => Sends::default(),
            },
            _ => Sends::default(),
        };
        self.flush(sends);
        if let Some(b) = bytes {
            self.send_back(msg, ctx, b);
        }
    }

    /// Routes and forwards `msg` in a task of its own (lookups wait on stores and DNS), counted
    /// for the shutdown drain.
    fn spawn_routing(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        let app = self.clone();
        let busy = crate::drain::InFlight::new(self);
        tokio::spawn(async move {
            app.route_request(msg, ctx).await;
            drop(busy);
        });
    }

    /// The proxy tables are bounded like the server transactions (`MAX_TRANSACTIONS`).
    fn proxy_full(&self) -> bool {
        self.proxy
            .lock()
            .map_or(true, |t| t.len() >= self.cfg.max_transactions)
    }

    /// A non-INVITE request that is not for the registrar or the server itself.
    pub(crate) fn proxy_non_invite(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        if self.proxy_full() {
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
            && let Ok(mut t) = self.proxy.lock()
            && let Some(inv) = t.forwards.get_mut(&key).and_then(|f| f.invite.as_mut())
        {
            inv.handle_ack(Instant::now());
            t.schedule_forward(&key);
            t.reap_forward(&key);
            return;
        }
        if msg.to().and_then(|t| t.tag()) == Some(crate::app::to_tag(&msg).as_str()) {
            return;
        }
        let app = self.clone();
        let busy = crate::drain::InFlight::new(self);
        tokio::spawn(async move {
            let _busy = busy;
            // An ACK may answer a late offer of an anchored call.
            let msg = app.media_request(msg, ctx.source.ip()).await;
            if let Some((target, bytes)) = app.stateless_forward(&msg, &ctx).await {
                app.flush(Sends(vec![target.outbound(bytes)]));
            }
        });
    }

    /// CANCEL for an INVITE we are forwarding: 200 for the CANCEL, CANCEL down every branch
    /// that has not answered finally (§16.10).
    pub(crate) fn proxy_cancel(self: &Arc<Self>, msg: Message, ctx: Ctx) {
        let Some(key) = TxKey::with_method(&msg, "INVITE") else {
            return;
        };
        let mut sends = Sends::default();
        let found = {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            let now = Instant::now();
            match t.forwards.get_mut(&key) {
                Some(fw) if !fw.final_sent && fw.branches.is_empty() => {
                    // Still being routed: nothing downstream to cancel; the caller gets its
                    // 487 now, and routing finds the call answered and forks nothing.
                    let resp = self
                        .reply(&fw.request, &fw.ctx, 487)
                        .reason("Request Terminated")
                        .build();
                    fw.best = Some((487, resp));
                    fw.local_final = true;
                    self.maybe_finish(t, &key, now);
                    if let Some(fw) = t.forwards.get_mut(&key) {
                        sends.0.extend(drain_forward(fw).0);
                    }
                    t.schedule_forward(&key);
                    true
                }
                Some(fw) if !fw.final_sent => {
                    let names = fw.branches.clone();
                    cancel_pending(self, t, &key, &names, now, &mut sends);
                    true
                }
                Some(_) => true,
                None => false,
            }
        };
        let code = if found { 200 } else { 481 };
        let resp = self.reply(&msg, &ctx, code).build();
        self.send_response(&msg, &ctx, code, resp);
        self.flush(sends);
    }

    /// Forwarded requests still waiting for their final response (shutdown waits for them).
    pub(crate) fn pending_forwards(&self) -> usize {
        self.proxy
            .lock()
            .map(|t| t.forwards.values().filter(|f| !f.final_sent).count())
            .unwrap_or(0)
    }

    /// Shutdown's grace period is over: every forward still unanswered has its branches
    /// CANCELled and its caller answered 503. Returns how many there were.
    pub(crate) fn give_up_pending(self: &Arc<Self>) -> usize {
        let now = Instant::now();
        let mut sends = Sends::default();
        let n = {
            let Ok(mut guard) = self.proxy.lock() else {
                return 0;
            };
            let t = &mut *guard;
            let keys: Vec<TxKey> = t
                .forwards
                .iter()
                .filter(|(_, f)| !f.final_sent)
                .map(|(k, _)| k.clone())
                .collect();
            for key in &keys {
                let Some(fw) = t.forwards.get_mut(key) else {
                    continue;
                };
                let names = fw.branches.clone();
                let method = fw.request.method_str().to_string();
                let resp = self
                    .reply(&fw.request, &fw.ctx, 503)
                    .reason("Shutting Down")
                    .header("Retry-After", 5)
                    .build();
                fw.best = Some((503, resp));
                fw.local_final = true;
                if method == "INVITE" {
                    cancel_pending(self, t, key, &names, now, &mut sends);
                }
                for n in &names {
                    if let Some(b) = t.branches.get_mut(&format!("{n}|{method}")) {
                        b.done = true;
                    }
                }
                self.maybe_finish(t, key, now);
                if let Some(fw) = t.forwards.get_mut(key) {
                    sends.0.extend(drain_forward(fw).0);
                }
            }
            keys.len()
        };
        self.flush(sends);
        n
    }

    /// Runs the proxy's due timers; called every 50 ms. Only transactions whose deadline has
    /// come are touched, whatever the table size.
    pub(crate) fn proxy_tick(self: &Arc<Self>, now: Instant) {
        let mut sends = Sends::default();
        {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            while let Some(Reverse((at, _))) = t.timers.peek() {
                if *at > now {
                    break;
                }
                let Some(Reverse((_, timed))) = t.timers.pop() else {
                    break;
                };
                match timed {
                    Timed::Branch(name) => {
                        let Some(b) = t.branches.get_mut(&name) else {
                            continue;
                        };
                        if b.tx.poll_timeout().is_none_or(|d| d > now) {
                            continue;
                        }
                        b.tx.handle_timeout(now);
                        while let Some(bytes) = b.tx.poll_transmit() {
                            sends.0.push(b.target.outbound(bytes));
                        }
                        let timed_out = b.tx.poll_event() == Some(ClientEvent::TimedOut)
                            && b.tx.request().method() != Method::Cancel;
                        let key = b.forward.clone();
                        // Timer C fired on a ringing INVITE branch (§16.8): cancel it.
                        let ringing = timed_out
                            && b.tx.request().method() == Method::Invite
                            && b.tx.state() == ClientState::Proceeding;
                        if ringing && let Some(base) = name.strip_suffix("|INVITE") {
                            cancel_pending(self, t, &key, &[base.to_string()], now, &mut sends);
                        }
                        if let Some(b) = t.branches.get_mut(&name)
                            && timed_out
                        {
                            b.done = true;
                        }
                        if timed_out {
                            if let Some(fw) = t.forwards.get_mut(&key)
                                && fw.best.is_none()
                            {
                                let resp = self.reply(&fw.request, &fw.ctx, 408).build();
                                fw.best = Some((408, resp));
                            }
                            self.maybe_finish(t, &key, now);
                            if let Some(fw) = t.forwards.get_mut(&key) {
                                sends.0.extend(drain_forward(fw).0);
                            }
                            t.schedule_forward(&key);
                        }
                        t.schedule_branch(&name);
                        t.reap_branch(&name);
                    }
                    Timed::Forward(key) => {
                        let Some(fw) = t.forwards.get_mut(&key) else {
                            continue;
                        };
                        let Some(inv) = fw.invite.as_mut() else {
                            continue;
                        };
                        if inv.poll_timeout().is_none_or(|d| d > now) {
                            continue;
                        }
                        inv.handle_timeout(now);
                        sends.0.extend(drain_forward(fw).0);
                        t.schedule_forward(&key);
                        t.reap_forward(&key);
                    }
                }
            }
            t.shrink();
        }
        self.flush(sends);
    }

    fn flush(&self, sends: Sends) {
        for out in sends.0 {
            self.send_out(out);
        }
    }
}

fn drain_forward(fw: &mut Forward) -> Sends {
    let mut s = Sends::default();
    if let Some(inv) = fw.invite.as_mut() {
        while let Some(bytes) = inv.poll_transmit() {
            s.0.push(back(&fw.request, &fw.ctx, bytes));
        }
    }
    s
}

fn back(request: &Message, ctx: &Ctx, bytes: Bytes) -> Outbound {
    let dest = crate::routing::response_destination(request.top_via().as_ref(), ctx.source);
    Outbound {
        transport: ctx.transport,
        dest,
        conn: ctx.conn,
        local: Some(ctx.local),
        bytes,
    }
}

fn cancel_pending(
    app: &App,
    t: &mut ProxyTables,
    key: &TxKey,
    names: &[String],
    now: Instant,
    sends: &mut Sends,
) {
    for name in names {
        let Some(b) = t.branches.get(&format!("{name}|INVITE")) else {
            continue;
        };
        if b.done || t.branches.contains_key(&format!("{name}|CANCEL")) {
            continue;
        }
        let target = b.target;
        let Ok(cm) = Message::parse(request::cancel_for(b.tx.request()), &app.cfg.parse_limits)
        else {
            continue;
        };
        let mut tx =
            ClientTransaction::new(cm, target.transport.is_reliable(), app.cfg.timers, now);
        while let Some(bytes) = tx.poll_transmit() {
            sends.0.push(target.outbound(bytes));
        }
        t.insert_branch(
            format!("{name}|CANCEL"),
            Branch {
                tx,
                forward: key.clone(),
                target,
                done: false,
            },
        );
    }
}

/// How often the proxy's timers are checked.
pub(crate) const TICK: Duration = Duration::from_millis(50);
