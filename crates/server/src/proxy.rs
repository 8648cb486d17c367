//! The stateful proxy (RFC 3261 §16): requests for our users are authenticated (407), looked up
//! in the location service and forked to every binding; responses are matched to the branch
//! that sent the request and the best one goes back (§16.7). In-dialog requests follow the
//! Route set we recorded. Transactions are the sans-IO machines of `careflow_core`; this
//! module owns their tables and turns their output into sends.

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

/// A transaction with a deadline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    Branch(String),
    Forward(TxKey),
}

/// Proxy transaction tables.
#[derive(Debug, Default)]
pub(crate) struct ProxyTables {
    forwards: HashMap<TxKey, Forward>,
    /// By "branch|METHOD" of the requests we sent.
    branches: HashMap<String, Branch>,
    /// Deadlines, one entry pushed whenever a transaction's deadline changes; entries that
    /// no longer match the transaction's current deadline are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, Timed)>>,
}

impl ProxyTables {
    pub(crate) fn len(&self) -> usize {
        self.forwards.len() + self.branches.len()
    }

    fn insert_branch(&mut self, name: String, branch: Branch) {
        self.branches.insert(name.clone(), branch);
        self.schedule_branch(&name);
    }

    fn schedule_branch(&mut self, name: &str) {
        if let Some(at) = self.branches.get(name).and_then(|b| b.tx.poll_timeout()) {
            self.timers
                .push(Reverse((at, Timed::Branch(name.to_string()))));
        }
    }

    fn schedule_forward(&mut self, key: &TxKey) {
        if let Some(at) = self
            .forwards
            .get(key)
            .and_then(|f| f.invite.as_ref())
            .and_then(|i| i.poll_timeout())
        {
            self.timers.push(Reverse((at, Timed::Forward(key.clone()))));
        }
    }

    /// Removes a terminated branch, then its forward if nothing of it is left.
    fn reap_branch(&mut self, name: &str) {
        let Some(b) = self.branches.get(name) else {
            return;
        };
        if !b.tx.is_terminated() {
            return;
        }
        let key = b.forward.clone();
        self.branches.remove(name);
        self.reap_forward(&key);
    }

    /// Gives back table capacity after a burst (HashMaps never shrink by themselves, and
    /// these hold whole transactions inline).
    fn shrink(&mut self) {
        if self.forwards.capacity() > 4 * self.forwards.len() + 1024 {
            self.forwards.shrink_to(2 * self.forwards.len());
        }
        if self.branches.capacity() > 4 * self.branches.len() + 1024 {
            self.branches.shrink_to(2 * self.branches.len());
        }
        if self.timers.capacity() > 4 * self.timers.len() + 1024 {
            self.timers.shrink_to(2 * self.timers.len());
        }
    }

    fn reap_forward(&mut self, key: &TxKey) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        let server_done = match &fw.invite {
            Some(inv) => inv.is_terminated(),
            None => fw.final_sent,
        };
        let method = fw.request.method_str();
        let branch_alive = fw.branches.iter().any(|n| {
            self.branches.contains_key(&format!("{n}|{method}"))
                || self.branches.contains_key(&format!("{n}|CANCEL"))
        });
        if server_done && !branch_alive {
            self.forwards.remove(key);
        }
    }
}

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
        let app = self.clone();
        let busy = crate::drain::InFlight::new(self);
        tokio::spawn(async move {
            app.route_request(msg, ctx).await;
            drop(busy);
        });
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
        let app = self.clone();
        let busy = crate::drain::InFlight::new(self);
        tokio::spawn(async move {
            app.route_request(msg, ctx).await;
            drop(busy);
        });
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

    /// A response arrived: match it to the branch that sent the request. Responses of a call
    /// leave in the order they arrived: one whose SDP goes through rtpengine first holds the
    /// call's later responses behind it (a 200 must never overtake the 183 still at rtpengine).
    pub(crate) fn proxy_response(self: &Arc<Self>, msg: Message, source: IpAddr) {
        let call_id = msg.call_id().unwrap_or_default();
        {
            let Ok(mut held) = self.held_responses.lock() else {
                return;
            };
            if let Some(q) = held.get_mut(call_id) {
                q.push_back((msg, source));
                return;
            }
            if !self.media_response_needed(&msg) {
                drop(held);
                self.relay_response(msg);
                return;
            }
            held.insert(call_id.to_string(), std::collections::VecDeque::new());
        }
        let app = self.clone();
        tokio::spawn(async move { app.relay_in_order(msg, source).await });
    }

    /// Relays `msg` (after rtpengine, when its SDP is anchored), then whatever of the same call
    /// arrived meanwhile, in order.
    async fn relay_in_order(self: Arc<Self>, first: Message, source: IpAddr) {
        let call_id = first.call_id().unwrap_or_default().to_string();
        let mut next = Some((first, source));
        while let Some((msg, source)) = next {
            let msg = if self.media_response_needed(&msg) {
                self.media_response(msg, source).await
            } else {
                msg
            };
            self.relay_response(msg);
            next = match self.held_responses.lock() {
                Ok(mut held) => match held.get_mut(&call_id).and_then(|q| q.pop_front()) {
                    Some(m) => Some(m),
                    None => {
                        held.remove(&call_id);
                        None
                    }
                },
                Err(_) => None,
            };
        }
    }

    fn relay_response(self: &Arc<Self>, msg: Message) {
        let Some(via) = msg.top_via() else { return };
        let Some(branch) = via.branch() else { return };
        let Some((_, method)) = msg.cseq() else {
            return;
        };
        let name = format!("{branch}|{method}");
        let now = Instant::now();
        let mut sends = Sends::default();
        {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            let Some(b) = t.branches.get_mut(&name) else {
                drop(guard);
                // No transaction (e.g. a 2xx retransmitted after it ended): forward by Via.
                self.forward_response_statelessly(&msg);
                return;
            };
            let pass = b.tx.handle_response(&msg, now);
            let target = b.target;
            while let Some(bytes) = b.tx.poll_transmit() {
                sends.0.push(target.outbound(bytes));
            }
            let code = msg.status().unwrap_or(0);
            let fwd_key = b.forward.clone();
            if pass && method != "CANCEL" {
                if code >= 200 {
                    b.done = true;
                }
                let bytes = strip_top_via(&msg);
                self.on_branch_response(t, &fwd_key, code, bytes, now, &mut sends);
            }
            t.schedule_branch(&name);
            t.schedule_forward(&fwd_key);
            t.reap_branch(&name);
        }
        self.flush(sends);
    }

    fn forward_response_statelessly(self: &Arc<Self>, msg: &Message) {
        let mut vias = msg.values(HeaderName::Via);
        let (Some(top), Some(next)) = (
            vias.next().and_then(Via::parse),
            vias.next().and_then(Via::parse),
        ) else {
            return;
        };
        if !self.is_our_via(&top) {
            return;
        }
        let Some(ip) = next
            .received()
            .and_then(|r| r.parse().ok())
            .or_else(|| next.host.ip())
        else {
            return;
        };
        let port = next
            .rport()
            .flatten()
            .and_then(|p| p.parse().ok())
            .or(next.port)
            .unwrap_or(5060);
        let transport = next.transport.parse().unwrap_or(Transport::Udp);
        self.flush(Sends(vec![Outbound {
            transport,
            dest: SocketAddr::new(ip, port),
            conn: None,
            local: None,
            bytes: strip_top_via(msg),
        }]));
    }

    fn on_branch_response(
        &self,
        t: &mut ProxyTables,
        key: &TxKey,
        code: u16,
        bytes: Bytes,
        now: Instant,
        sends: &mut Sends,
    ) {
        let Some(fw) = t.forwards.get_mut(key) else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                if let Some(inv) = fw.invite.as_mut() {
                    inv.send_response(code, bytes, now);
                }
            }
            200..=299 => {
                if fw.invite.is_some() {
                    // Every 2xx goes upstream (several branches may answer; RFC 3261 §16.7).
                    if let Some(inv) = fw.invite.as_mut() {
                        inv.send_response(code, bytes, now);
                    }
                    if !fw.final_sent {
                        fw.final_sent = true;
                        self.metrics.response(code);
                        if fw.call {
                            self.metrics.calls_answered.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                call_id = fw.request.call_id().unwrap_or_default(),
                                code,
                                "call answered"
                            );
                        }
                        let names = fw.branches.clone();
                        cancel_pending(self, t, key, &names, now, sends);
                    }
                } else if !fw.final_sent {
                    fw.final_sent = true;
                    let (request, ctx) = (fw.request.clone(), fw.ctx.clone());
                    self.send_response(&request, &ctx, code, bytes);
                }
            }
            _ => {
                if (code == 401 || code == 407)
                    && let Ok(m) = Message::parse(bytes.clone(), &self.cfg.parse_limits)
                {
                    fw.challenges.extend(best::challenge_lines(&m));
                }
                if fw.best.as_ref().is_none_or(|(b, _)| best::better(code, *b)) {
                    fw.best = Some((code, bytes));
                }
                if (600..700).contains(&code) && fw.invite.is_some() {
                    let names = fw.branches.clone();
                    cancel_pending(self, t, key, &names, now, sends);
                }
                self.maybe_finish(t, key, now);
            }
        }
        if let Some(fw) = t.forwards.get_mut(key) {
            sends.0.extend(drain_forward(fw).0);
        }
    }

    /// Sends the best final response once every branch has one (§16.7 step 6).
    fn maybe_finish(&self, t: &mut ProxyTables, key: &TxKey, now: Instant) {
        let Some(fw) = t.forwards.get(key) else {
            return;
        };
        if fw.final_sent {
            return;
        }
        let all_done = fw.branches.iter().all(|n| {
            t.branches
                .get(&format!("{n}|{}", fw.request.method_str()))
                .is_none_or(|b| b.done)
        });
        if !all_done {
            return;
        }
        let Some(fw) = t.forwards.get_mut(key) else {
            return;
        };
        fw.final_sent = true;
        let (code, bytes) = match fw.best.take() {
            Some(b) => b,
            None => (408, self.reply(&fw.request, &fw.ctx, 408).build()),
        };
        // §16.7 step 7: a 401/407 carries the challenges of every branch that sent one.
        let bytes = if (code == 401 || code == 407) && !fw.challenges.is_empty() {
            best::with_challenges(&bytes, &fw.challenges, &self.cfg.parse_limits)
        } else {
            bytes
        };
        // §16.7 step 6: a 503 from downstream becomes 500 upstream (ours, when shutting
        // down, stays a 503 with its Retry-After).
        let (code, bytes) = match best::upstream_status(code, fw.local_final) {
            c if c != code => (c, self.reply(&fw.request, &fw.ctx, c).build()),
            _ => (code, bytes),
        };
        self.metrics.response(code);
        if fw.call {
            self.media_end(fw.request.call_id().unwrap_or_default());
            self.metrics.call_failed(code);
            tracing::info!(
                call_id = fw.request.call_id().unwrap_or_default(),
                code,
                "call failed"
            );
        }
        match fw.invite.as_mut() {
            Some(inv) => {
                inv.send_response(code, bytes, now);
            }
            None => {
                let (request, ctx) = (fw.request.clone(), fw.ctx.clone());
                self.send_response(&request, &ctx, code, bytes);
            }
        }
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

    /// Decides what to do with a request that is not for the registrar and forwards it.
    async fn route_request(self: Arc<Self>, msg: Message, ctx: Ctx) {
        if msg.method() == Method::Bye
            && let Some(c) = msg.call_id()
        {
            self.media_end(c);
        }
        match self.decide(&msg, &ctx).await {
            Ok(mut targets) => {
                let initial =
                    msg.method() == Method::Invite && msg.to().and_then(|t| t.tag()).is_none();
                let msg = if initial {
                    self.media_initial(msg, &ctx, &mut targets).await
                } else {
                    self.media_request(msg, ctx.source.ip()).await
                };
                self.fork(msg, ctx, targets)
            }
            Err((code, bytes)) => {
                if msg.method() == Method::Invite {
                    self.answer_invite(&msg, &ctx, code, bytes);
                } else {
                    self.send_response(&msg, &ctx, code, bytes);
                }
            }
        }
    }

    /// Returns the targets (Request-URI, transport, address) or the answer to send.
    async fn decide(&self, msg: &Message, ctx: &Ctx) -> Result<Vec<Hop>, (u16, Bytes)> {
        let refuse = |code: u16, reason: &'static str| {
            (code, self.reply(msg, ctx, code).reason(reason).build())
        };
        // Our Via would take the request past the bound every careflow-sip enforces.
        if proxy::next_max_forwards(msg).is_none()
            || msg.values(HeaderName::Via).count() >= careflow_proto::MAX_VIAS
        {
            return Err(refuse(483, "Too Many Hops"));
        }
        if proxy::is_loop(msg, |v| self.is_our_via(v)) {
            return Err(refuse(482, "Loop Detected"));
        }
        let step = proxy::route_step(msg, |u| self.is_ours(u));
        let in_dialog = msg.to().and_then(|t| t.tag()).is_some();
        if in_dialog {
            // In-dialog requests pass only along a route set we recorded; anything else would
            // make us an open relay.
            if step.pop_routes == 0 && step.strict_request_uri.is_none() {
                return Err(refuse(403, "Not Routed Through Here"));
            }
            if step.next_route.is_none() {
                match self.flow_target(msg, ctx, step.pop_routes) {
                    Some(Ok(target)) => return Ok(vec![Hop::to(String::new(), target)]),
                    Some(Err(())) => return Err(refuse(430, "Flow Failed")),
                    None => {}
                }
            }
            let uri = match &step.next_route {
                Some(route) => careflow_proto::NameAddr::parse(route)
                    .map(|n| n.uri.raw.to_string())
                    .unwrap_or_default(),
                None => step
                    .strict_request_uri
                    .clone()
                    .unwrap_or_else(|| msg.request_uri_str().to_string()),
            };
            let target = self
                .resolve(&uri)
                .await
                .ok_or_else(|| refuse(404, "Not Found"))?;
            let new_uri = step.strict_request_uri.clone().unwrap_or_default();
            return Ok(vec![Hop::to(new_uri, target)]);
        }
        if step.next_route.is_some() {
            return Err(refuse(403, "Relaying Denied"));
        }
        let ruri_text = msg.request_uri_str().to_string();
        let Some(ruri) = Uri::parse(&ruri_text) else {
            return Err(refuse(416, "Unsupported URI Scheme"));
        };
        let ours =
            ruri.user.is_some() && self.serves_domain(&ruri.host.as_str().to_ascii_lowercase());
        let from_ours = msg
            .from()
            .is_some_and(|f| self.serves_domain(&f.uri.host.as_str().to_ascii_lowercase()));
        if !ours {
            // Another domain: only our authenticated users, only through the configured gateway.
            let Some(gw) = self.cfg.outbound_gateway.clone() else {
                return Err(refuse(403, "Relaying Denied"));
            };
            if !from_ours {
                return Err(refuse(403, "Relaying Denied"));
            }
            self.authorize_caller(msg, ctx).await?;
            let target = self
                .resolve(&gw)
                .await
                .ok_or_else(|| refuse(503, "Gateway Unavailable"))?;
            return Ok(vec![Hop::to(String::new(), target)]);
        }
        if !from_ours {
            // From outside to our users: only when peering is allowed, and then without our
            // credentials (the caller has none).
            if !self.cfg.allow_inbound {
                return Err(refuse(403, "Caller Not Served Here"));
            }
            return self.lookup_targets(msg, ctx, &ruri).await;
        }
        self.authorize_caller(msg, ctx).await?;
        let is_call = msg.method() == Method::Invite;
        let call_id = msg.call_id().unwrap_or_default();
        if is_call {
            self.metrics.calls_attempted.fetch_add(1, Ordering::Relaxed);
            tracing::info!(call_id, to = %ruri_text, source = %ctx.source, "call attempt");
        }
        let result = self.lookup_targets(msg, ctx, &ruri).await;
        if let (true, Err((code, _))) = (is_call, &result) {
            self.metrics.call_failed(*code);
            tracing::info!(call_id, code, "call failed");
        }
        result
    }

    /// Our user's bindings as targets: 404 unknown, 480 not registered.
    async fn lookup_targets(
        &self,
        msg: &Message,
        ctx: &Ctx,
        ruri: &Uri<'_>,
    ) -> Result<Vec<Hop>, (u16, Bytes)> {
        let refuse = |code: u16, reason: &'static str| {
            (code, self.reply(msg, ctx, code).reason(reason).build())
        };
        let aor = ruri.aor().unwrap_or_default();
        let domain = ruri.host.as_str().to_ascii_lowercase();
        let user = scan::pct_decode(ruri.user.unwrap_or_default()).into_owned();
        match self.subscribers.find(&user, &domain).await {
            Ok(Some(s)) if s.enabled => {}
            Ok(_) => return Err(refuse(404, "Not Found")),
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retryable = e.retryable(), callee = %aor,
                    "subscriber lookup of the callee failed; answering 503");
                return Err((
                    503,
                    self.reply(msg, ctx, 503).header("Retry-After", 5).build(),
                ));
            }
        }
        let bindings = match self.location.lookup(&aor, unix_now()).await {
            Ok(b) => b,
            Err(e) => {
                // Not a 480: the callee may well be registered, we just cannot tell now.
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, retryable = e.retryable(), callee = %aor,
                    "location lookup failed; answering 503");
                return Err((
                    503,
                    self.reply(msg, ctx, 503).header("Retry-After", 5).build(),
                ));
            }
        };
        let mut targets = Vec::new();
        for b in preferred_flows(&bindings) {
            if let Some(t) = self.binding_target(b).await {
                targets.push(Hop {
                    routes: b.path.clone(),
                    ..Hop::to(b.contact.clone(), t)
                });
            }
        }
        if targets.is_empty() {
            return Err(refuse(480, "Temporarily Unavailable"));
        }
        Ok(targets)
    }

    /// Proxy authentication (RFC 3261 §22.3): 407 until the caller proves it is the From user.
    async fn authorize_caller(&self, msg: &Message, ctx: &Ctx) -> Result<(), (u16, Bytes)> {
        let now = unix_now();
        let Some(from) = msg.from() else {
            return Err((400, self.reply(msg, ctx, 400).build()));
        };
        let realm = from.uri.host.as_str().to_ascii_lowercase();
        let user = scan::pct_decode(from.uri.user.unwrap_or_default()).into_owned();
        let checked = match self.prepare_auth(msg, ctx, Challenger::Proxy, &realm, &user, now) {
            Ok(prepared) => self.verify_auth(msg, ctx, &realm, &prepared, now).await,
            Err(e) => Err(e),
        };
        checked.map_err(|e| self.auth_answer(msg, ctx, Challenger::Proxy, &realm, &e, now))
    }

    /// Creates the forward and one branch per target, and sends.
    fn fork(self: &Arc<Self>, msg: Message, ctx: Ctx, targets: Vec<Hop>) {
        let Some(key) = ctx.key.clone().or_else(|| TxKey::of(&msg)) else {
            return;
        };
        let now = Instant::now();
        let mf = proxy::next_max_forwards(&msg).unwrap_or(0);
        let step = proxy::route_step(&msg, |u| self.is_ours(u));
        let hash = proxy::loop_hash(&msg);
        let is_invite = msg.method() == Method::Invite;
        let is_call = is_invite && msg.to().and_then(|t| t.tag()).is_none();
        let in_addr = self.inbound_addr(&ctx);
        let in_token = Self::sender_needs_flow(&msg, &ctx).then(|| {
            Flow {
                transport: ctx.transport,
                conn: ctx.conn.map(|c| c.0),
                addr: ctx.source,
            }
            .encode(&self.cfg.secret)
        });
        let mut sends = Sends::default();
        let Ok(mut t) = self.proxy.lock() else { return };
        // An INVITE's forward was made before routing (transaction first); a CANCEL or the
        // shutdown may have answered it meanwhile, and then nothing is forked.
        let made_before = match t.forwards.get(&key) {
            Some(fw) if fw.final_sent => {
                drop(t);
                if is_call {
                    self.media_end(msg.call_id().unwrap_or_default());
                }
                return;
            }
            Some(_) => true,
            None => false,
        };
        let mut invite = (is_invite && !made_before).then(|| {
            InviteServerTransaction::new(ctx.transport.is_reliable(), self.cfg.timers, now)
        });
        if let Some(inv) = invite.as_mut() {
            // 100 Trying at once (§16.2), so the caller stops retransmitting.
            let trying = ResponseBuilder::new(&msg, 100).source(ctx.source).build();
            inv.send_response(100, trying, now);
        }
        let mut first_sends = Vec::new();
        let mut names = Vec::new();
        for Hop {
            uri,
            target,
            routes,
            branch,
            body,
        } in targets
        {
            let branch = branch.unwrap_or_else(|| proxy::branch(&hash, self.next_id()));
            let out_addr = self.outbound_addr(target.transport, target.dest, &ctx);
            let target = Target {
                local: Some(out_addr),
                ..target
            };
            let via = Self::via_at(target.transport, out_addr, &branch);
            // Record-Route (§16.6 step 4): once, or twice when the call changes transport or
            // interface, so each side reaches us where it can (RFC 5658): the top entry faces
            // the callee, the other the caller. An entry facing a UA behind NAT or on its own
            // connection carries a flow token so in-dialog requests find the way back to it;
            // when both sides need one, both entries are written.
            let record = msg.to().and_then(|t| t.tag()).is_none() || msg.method() == Method::Invite;
            let out_token = target.flow_token(&self.cfg.secret);
            let double = target.transport != ctx.transport
                || out_addr != in_addr
                || (in_token.is_some() && out_token.is_some());
            let rr_lines: Vec<String> = match (record, double) {
                (false, _) => Vec::new(),
                (true, true) => vec![
                    Self::record_route_at(target.transport, out_addr, out_token.as_deref()),
                    Self::record_route_at(ctx.transport, in_addr, in_token.as_deref()),
                ],
                (true, false) => vec![Self::record_route_at(
                    ctx.transport,
                    in_addr,
                    in_token.as_deref().or(out_token.as_deref()),
                )],
            };
            let rr: Vec<&str> = rr_lines.iter().map(String::as_str).collect();
            let edit = RequestEdit {
                request_uri: (!uri.is_empty()).then_some(uri.as_str()),
                via: Some(&via),
                record_route: rr,
                push_routes: routes.iter().map(String::as_str).collect(),
                pop_routes: step.pop_routes,
                drop_last_route: step.strict_request_uri.is_some(),
                max_forwards: Some(mf),
            };
            let Ok(mut out) = Message::parse(edit.apply(&msg), &self.cfg.parse_limits) else {
                continue;
            };
            if let Some(body) = body.as_deref()
                && let Some(with) = crate::media::with_body(&out, body)
            {
                out = with;
            }
            let mut tx =
                ClientTransaction::new(out, target.transport.is_reliable(), self.cfg.timers, now);
            let name = format!("{branch}|{}", msg.method_str());
            while let Some(bytes) = tx.poll_transmit() {
                first_sends.push((name.clone(), target.outbound(bytes)));
            }
            t.insert_branch(
                name,
                Branch {
                    tx,
                    forward: key.clone(),
                    target,
                    done: false,
                },
            );
            names.push(branch);
        }
        if names.is_empty() {
            drop(t);
            let resp = self.reply(&msg, &ctx, 500).build();
            if is_invite {
                self.answer_invite(&msg, &ctx, 500, resp);
            } else {
                self.send_back(&msg, &ctx, resp);
            }
            return;
        }
        if let Some(fw) = t.forwards.get_mut(&key).filter(|_| made_before) {
            fw.branches = names;
            fw.call = is_call;
            t.schedule_forward(&key);
            drop(t);
            for (name, out) in first_sends {
                self.send_branch(name, out);
            }
            return;
        }
        let mut fw = Forward {
            request: msg,
            ctx,
            invite,
            branches: names,
            best: None,
            final_sent: false,
            challenges: Vec::new(),
            call: is_call,
            local_final: false,
        };
        sends.0.extend(drain_forward(&mut fw).0);
        t.forwards.insert(key.clone(), fw);
        t.schedule_forward(&key);
        t.reap_forward(&key);
        drop(t);
        self.flush(sends);
        for (name, out) in first_sends {
            self.send_branch(name, out);
        }
    }

    /// Sends the first transmission of a branch; a transport failure (TCP connection refused,
    /// no route) ends the branch at once as a 503 (§16.9) instead of waiting for Timer B/F.
    fn send_branch(self: &Arc<Self>, name: String, out: Outbound) {
        let Some(t) = self.transports() else { return };
        // Sent or queued at once when the socket or connection is there (a UDP failure comes
        // back as ICMP); only a connection to dial waits in a task.
        let Some(out) = t.try_send(out) else { return };
        let app = self.clone();
        tokio::spawn(async move {
            let dest = out.dest;
            if let Err(e) = t.send(out).await {
                tracing::info!(%dest, error = %e, "branch target unreachable");
                app.proxy_branch_failed(&name);
            }
        });
    }

    /// ICMP said `dest` is unreachable: branches still waiting for any answer from it fail
    /// now (a stale binding must not hold a call for Timer B).
    pub(crate) fn proxy_unreachable(self: &Arc<Self>, transport: Transport, dest: SocketAddr) {
        let names: Vec<String> = match self.proxy.lock() {
            Ok(t) => t
                .branches
                .iter()
                .filter(|(_, b)| {
                    !b.done
                        && b.target.transport == transport
                        && b.target.dest == dest
                        && b.tx.state() == ClientState::Calling
                })
                .map(|(n, _)| n.clone())
                .collect(),
            Err(_) => return,
        };
        for name in names {
            tracing::info!(%dest, "branch target unreachable (ICMP)");
            self.proxy_branch_failed(&name);
        }
    }

    fn proxy_branch_failed(self: &Arc<Self>, name: &str) {
        let now = Instant::now();
        let mut sends = Sends::default();
        {
            let Ok(mut guard) = self.proxy.lock() else {
                return;
            };
            let t = &mut *guard;
            let Some(b) = t.branches.get_mut(name) else {
                return;
            };
            if b.done {
                return;
            }
            b.done = true;
            b.tx.abort();
            let key = b.forward.clone();
            if let Some(fw) = t.forwards.get_mut(&key)
                && fw.best.as_ref().is_none_or(|(c, _)| best::better(503, *c))
            {
                let resp = self.reply(&fw.request, &fw.ctx, 503).build();
                fw.best = Some((503, resp));
            }
            self.maybe_finish(t, &key, now);
            if let Some(fw) = t.forwards.get_mut(&key) {
                sends.0.extend(drain_forward(fw).0);
            }
            t.schedule_forward(&key);
            t.reap_branch(name);
        }
        self.flush(sends);
    }

    /// Forwards a request without a transaction (ACK for 2xx).
    async fn stateless_forward(&self, msg: &Message, ctx: &Ctx) -> Option<(Target, Bytes)> {
        let step = proxy::route_step(msg, |u| self.is_ours(u));
        if step.pop_routes == 0 && step.strict_request_uri.is_none() {
            return None;
        }
        let uri = match &step.next_route {
            Some(r) => careflow_proto::NameAddr::parse(r)?.uri.raw.to_string(),
            None => step
                .strict_request_uri
                .clone()
                .unwrap_or_else(|| msg.request_uri_str().to_string()),
        };
        let by_flow = match step.next_route {
            None => self
                .flow_target(msg, ctx, step.pop_routes)
                .and_then(Result::ok),
            Some(_) => None,
        };
        let target = match by_flow {
            Some(t) => t,
            None => self.resolve(&uri).await?,
        };
        let branch = proxy::branch(&proxy::loop_hash(msg), self.next_id());
        let via = Self::via_at(
            target.transport,
            self.outbound_addr(target.transport, target.dest, ctx),
            &branch,
        );
        let edit = RequestEdit {
            request_uri: step.strict_request_uri.as_deref(),
            via: Some(&via),
            record_route: Vec::new(),
            push_routes: Vec::new(),
            pop_routes: step.pop_routes,
            drop_last_route: step.strict_request_uri.is_some(),
            max_forwards: Some(proxy::next_max_forwards(msg)?),
        };
        Some((target, edit.apply(msg)))
    }

    /// The address and transport a URI leads to (IP literals and host names).
    async fn resolve(&self, uri: &str) -> Option<Target> {
        let u = Uri::parse(uri)?;
        if !u.is_sip() {
            return None;
        }
        let transport = match u.params.get("transport").flatten() {
            Some(t) => t.parse().ok()?,
            None if u.is_sips() => Transport::Tls,
            None => Transport::Udp,
        };
        let port = u.port.unwrap_or(if transport == Transport::Tls {
            5061
        } else {
            5060
        });
        let dest = match u.host.ip() {
            Some(ip) => SocketAddr::new(ip, port),
            None => tokio::net::lookup_host((u.host.as_str(), port))
                .await
                .ok()?
                .next()?,
        };
        Some(Target::at(transport, dest))
    }

    /// Where a registered device is reached: over the connection it registered on, or (UDP)
    /// at the address its REGISTER came from, which differs from its Contact behind NAT.
    async fn binding_target(&self, b: &careflow_core::Binding) -> Option<Target> {
        if let Some(first) = b.path.first() {
            // Behind an edge proxy: the request goes to it, with the Path as its route.
            let uri = careflow_proto::NameAddr::parse(first)?.uri.raw.to_string();
            return self.resolve(&uri).await;
        }
        if let Some(c) = b.conn {
            let open = self.transports().is_some_and(|t| t.is_open(ConnId(c)));
            // Closed: the binding is on its way out (the close handler removes it).
            return open.then_some(Target {
                conn: Some(ConnId(c)),
                flow: true,
                ..Target::at(b.transport, b.source)
            });
        }
        if b.behind_nat() {
            return Some(Target {
                flow: true,
                ..Target::at(Transport::Udp, b.source)
            });
        }
        self.resolve(&b.contact).await
    }

    /// In-dialog routing by the flow token in one of our Route entries: the connection or NAT
    /// address of the UA on the far side of the dialog. `None`: no token (route by URI);
    /// `Err`: the flow is gone (its connection closed).
    fn flow_target(&self, msg: &Message, ctx: &Ctx, pop: usize) -> Option<Result<Target, ()>> {
        let arrival = (ctx.transport, ctx.source, ctx.conn.map(|c| c.0));
        let flow = msg
            .values(HeaderName::Route)
            .take(pop)
            .filter_map(careflow_proto::NameAddr::parse)
            .filter_map(|na| Flow::decode(na.uri.user?, &self.cfg.secret))
            .find(|f| !f.is_arrival(arrival.0, arrival.1, arrival.2))?;
        let conn = flow.conn.map(ConnId);
        if let Some(c) = conn
            && !self.transports().is_some_and(|t| t.is_open(c))
        {
            return Some(Err(()));
        }
        Some(Ok(Target {
            conn,
            ..Target::at(flow.transport, flow.addr)
        }))
    }

    /// Whether the request's sender must be reached through a flow: it is on a connection of
    /// its own, or its Contact names another IP than the one the request came from (NAT; a
    /// Contact on the sender's own IP is reachable as it is, whatever its port).
    pub(crate) fn sender_needs_flow(msg: &Message, ctx: &Ctx) -> bool {
        ctx.conn.is_some()
            || msg
                .header(HeaderName::Contact)
                .and_then(careflow_proto::NameAddr::parse)
                .is_some_and(|na| na.uri.host.ip() != Some(ctx.source.ip()))
    }

    fn via_at(transport: Transport, addr: SocketAddr, branch: &str) -> String {
        format!(
            "SIP/2.0/{} {};branch={branch}",
            transport.via_token(),
            fmt_addr(addr)
        )
    }

    fn record_route_at(transport: Transport, addr: SocketAddr, token: Option<&str>) -> String {
        match token {
            Some(t) => format!("<sip:{t}@{};transport={transport};lr>", fmt_addr(addr)),
            None => format!("<sip:{};transport={transport};lr>", fmt_addr(addr)),
        }
    }

    /// The address the request reached us at (a wildcard listener reports the interface the
    /// kernel uses towards the sender).
    fn inbound_addr(&self, ctx: &Ctx) -> SocketAddr {
        if ctx.local.ip().is_unspecified() {
            let ip = self
                .local_ip_towards(ctx.source.ip())
                .unwrap_or(ctx.local.ip());
            SocketAddr::new(ip, ctx.local.port())
        } else {
            ctx.local
        }
    }

    /// Our address for sending to `peer` over `transport`: the listener on the interface the
    /// kernel routes `peer` through, so a call that crosses interfaces is recorded on both.
    fn outbound_addr(&self, transport: Transport, peer: SocketAddr, ctx: &Ctx) -> SocketAddr {
        if let Some(a) = self.listener_towards(transport, peer) {
            return a;
        }
        let wildcard = self
            .bound_listeners()
            .iter()
            .find(|l| l.transport == transport && l.addr.is_ipv4() == peer.is_ipv4());
        match wildcard {
            Some(l) => SocketAddr::new(self.inbound_addr(ctx).ip(), l.addr.port()),
            None => self.inbound_addr(ctx),
        }
    }

    /// Our listener of `transport` facing `peer` (its wildcard resolved to the interface
    /// address), when we have one of that transport and address family.
    pub(crate) fn listener_towards(
        &self,
        transport: Transport,
        peer: SocketAddr,
    ) -> Option<SocketAddr> {
        let listeners: Vec<SocketAddr> = self
            .bound_listeners()
            .iter()
            .filter(|l| l.transport == transport && l.addr.is_ipv4() == peer.is_ipv4())
            .map(|l| l.addr)
            .collect();
        let ip = self.local_ip_towards(peer.ip());
        if let Some(ip) = ip {
            if let Some(l) = listeners.iter().find(|a| a.ip() == ip) {
                return Some(*l);
            }
            if let Some(l) = listeners.iter().find(|a| a.ip().is_unspecified()) {
                return Some(SocketAddr::new(ip, l.port()));
            }
        }
        listeners
            .first()
            .filter(|l| !l.ip().is_unspecified())
            .copied()
    }

    /// The local IP the kernel would use to reach `dest` (a connected UDP socket's name;
    /// nothing is sent), cached per destination.
    fn local_ip_towards(&self, dest: IpAddr) -> Option<IpAddr> {
        if let Some(ip) = self.route_cache.lock().ok()?.get(&dest) {
            return Some(*ip);
        }
        let any: SocketAddr = if dest.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let probe = std::net::UdpSocket::bind(any).ok()?;
        probe.connect((dest, 9)).ok()?;
        let ip = probe.local_addr().ok()?.ip();
        if let Ok(mut c) = self.route_cache.lock() {
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(dest, ip);
        }
        Some(ip)
    }

    /// True when a Via names this server.
    pub(crate) fn is_our_via(&self, v: &Via<'_>) -> bool {
        let port = v.port.unwrap_or(5060);
        self.bound_listeners().iter().any(|l| {
            l.addr.port() == port
                && v.host
                    .ip()
                    .is_some_and(|ip| ip == l.addr.ip() || l.addr.ip().is_unspecified())
        })
    }

    /// True when a URI names this server (not one of its users).
    pub(crate) fn is_ours(&self, u: &Uri<'_>) -> bool {
        // A user part is someone's address, unless it is one of our flow tokens.
        if u.user
            .is_some_and(|user| Flow::decode(user, &self.cfg.secret).is_none())
        {
            return false;
        }
        if self.serves_domain(&u.host.as_str().to_ascii_lowercase()) && u.port.is_none() {
            return true;
        }
        let port = u.port.unwrap_or(5060);
        self.bound_listeners().iter().any(|l| {
            l.addr.port() == port
                && u.host
                    .ip()
                    .is_some_and(|ip| ip == l.addr.ip() || l.addr.ip().is_unspecified())
        })
    }
}

fn fmt_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

/// One binding per SIP Outbound instance (RFC 5626 §5.2): of the flows a device keeps
/// (several `reg-id`s), the one refreshed last (on a tie, registered last) carries requests;
/// other bindings all fork.
fn preferred_flows(bindings: &[careflow_core::Binding]) -> Vec<&careflow_core::Binding> {
    let mut out: Vec<&careflow_core::Binding> = Vec::new();
    for b in bindings {
        let (Some(inst), Some(_)) = (&b.instance, b.reg_id) else {
            out.push(b);
            continue;
        };
        let same = out
            .iter()
            .position(|o| o.reg_id.is_some() && o.instance.as_ref() == Some(inst));
        match same {
            Some(i) if out[i].expires_at <= b.expires_at => out[i] = b,
            Some(_) => {}
            None => out.push(b),
        }
    }
    out
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
