//! The stateful proxy's transactions (RFC 3261 §16.6-16.10) as one sans-IO state machine.
//!
//! A [`ProxyTable`] holds every forwarded request (a [`Forward`]: the server side, with its
//! INVITE server transaction) and every request we sent for it (a [`Branch`]: one client
//! transaction per target, keyed by a [`BranchKey`]). The driver tells it what arrived
//! (`open`, `fork`, `handle_response`, `handle_ack`, `handle_cancel`, `handle_timeout`, ...)
//! and then drains what to do: [`ProxyTable::poll_transmit`] (bytes for the caller or for a
//! branch's target), [`ProxyTable::poll_event`] (a final response went upstream, a call was
//! answered or failed, a call's media can end) and [`ProxyTable::poll_timeout`] (when to call
//! `handle_timeout` next). Nothing here reads a clock or knows an address: `U` is how the
//! driver reaches the caller and `D` how it reaches a branch's target; both are opaque.
//!
//! The decisions of §16.7 live here: provisionals and every 2xx are relayed at once, other
//! finals are held until every branch has one and the best goes up (`best.rs`); a 2xx or a
//! 6xx to an INVITE CANCELs the branches still pending (§16.7 step 10, §16.10); Timer C and
//! Timer B/F end a branch as if 408 had arrived; a branch whose target cannot be reached ends
//! as 503 (§16.9).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use careflow_proto::rewrite::strip_top_via;
use careflow_proto::{Message, Method, ParseLimits, ResponseBuilder, request};

use super::best;
use crate::transaction::client::{ClientEvent, ClientState, ClientTransaction};
use crate::transaction::invite_server::InviteServerTransaction;
use crate::transaction::{TimerConfig, TxKey};

#[cfg(test)]
mod tests;

/// A branch's client transaction: our Via branch value, and whether it is the CANCEL sent on
/// that branch (which shares the INVITE's branch value, §9.1) or the request itself (RFC 3261
/// §17.1.3 matches a response by branch and CSeq method).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    branch: Box<str>,
    cancel: bool,
}

impl BranchKey {
    /// The key of the request sent on `branch`.
    pub fn request(branch: &str) -> Self {
        Self {
            branch: branch.into(),
            cancel: false,
        }
    }

    /// The key of the CANCEL sent on `branch`.
    pub fn cancel(branch: &str) -> Self {
        Self {
            branch: branch.into(),
            cancel: true,
        }
    }

    /// The key a response names by its top Via branch and CSeq method.
    pub fn of_response(msg: &Message) -> Option<Self> {
        let via = msg.top_via()?;
        let (_, method) = msg.cseq()?;
        Some(Self {
            branch: via.branch()?.into(),
            cancel: method.eq_ignore_ascii_case("CANCEL"),
        })
    }

    /// The Via branch value.
    pub fn branch(&self) -> &str {
        &self.branch
    }

    /// Whether this is the CANCEL of a branch.
    pub fn is_cancel(&self) -> bool {
        self.cancel
    }
}

/// Settings of the proxy's transactions.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Transaction timers (T1, T2, T4, Timer C).
    pub timers: TimerConfig,
    /// Limits for the messages built here (CANCELs, merged challenges).
    pub parse_limits: ParseLimits,
    /// The `Server` header of the responses we generate (408, 487, 500, 503).
    pub server_header: String,
    /// How many forwards and branches the table holds at most (`MAX_TRANSACTIONS`).
    pub max_transactions: usize,
}

/// How the caller of a forwarded request is answered.
#[derive(Debug, Clone)]
pub struct Upstream<U> {
    /// Where the request came from (the `received`/`rport` of our own responses).
    pub source: SocketAddr,
    /// Whether it came over a reliable transport (no retransmissions of our responses).
    pub reliable: bool,
    /// The driver's way back to the caller.
    pub to: U,
}

/// One request to send on a new branch: already carrying our Via (whose branch value is
/// `branch`), Record-Route and the target's Request-URI.
#[derive(Debug, Clone)]
pub struct NewBranch<D> {
    /// The Via branch value of `request`.
    pub branch: String,
    /// The request as it goes to the target.
    pub request: Message,
    /// The driver's way to the target.
    pub to: D,
    /// Whether the way to the target is reliable (no retransmissions).
    pub reliable: bool,
}

/// Bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit<U, D> {
    /// A response for the caller.
    Upstream {
        /// The way back to the caller.
        to: U,
        /// The response.
        bytes: Bytes,
    },
    /// A request down a branch. A transport failure sending it is reported back with
    /// [`ProxyTable::branch_failed`].
    Downstream {
        /// The branch it belongs to.
        branch: BranchKey,
        /// The way to the target.
        to: D,
        /// The request (or its retransmission, or an ACK for a non-2xx).
        bytes: Bytes,
    },
}

/// What happened, for the driver's metrics, logs and media.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A final response went upstream (the first 2xx, or the best of §16.7, or our own).
    /// `record` is set when the request has no INVITE server transaction here (a non-INVITE
    /// request): the driver keeps the response in its non-INVITE server transaction so a
    /// retransmitted request gets it again.
    Final {
        /// The server transaction answered.
        key: TxKey,
        /// The status code.
        code: u16,
        /// The response, for the driver's non-INVITE server transaction.
        record: Option<Bytes>,
        /// Whether the caller's transport is reliable (how long that record is kept).
        reliable: bool,
    },
    /// A call (an out-of-dialog INVITE) was answered with a 2xx.
    CallAnswered {
        /// The call's Call-ID.
        call_id: Box<str>,
        /// The status code.
        code: u16,
    },
    /// A call ended without a 2xx after it was forked.
    CallFailed {
        /// The call's Call-ID.
        call_id: Box<str>,
        /// The status code sent upstream.
        code: u16,
    },
    /// Nothing of this call will be answered: its media session (if any) can end.
    MediaEnd {
        /// The call's Call-ID.
        call_id: Box<str>,
    },
}

/// The table is full (`max_transactions`): answer 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What [`ProxyTable::fork`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The branches were created and their first transmissions queued.
    Forked,
    /// The request was answered while it was being routed (a CANCEL, the shutdown):
    /// nothing was sent downstream.
    AlreadyAnswered,
    /// No branch could be made: the caller was answered 500.
    NoBranches,
}

/// One forwarded request: the server side and its branches.
#[derive(Debug)]
struct Forward<U> {
    request: Message,
    upstream: Upstream<U>,
    invite: Option<InviteServerTransaction>,
    /// Branch values of the requests sent for it.
    branches: Vec<Box<str>>,
    best: Option<(u16, Bytes)>,
    /// WWW-/Proxy-Authenticate lines of every 401/407 received (§16.7 step 7).
    challenges: Vec<String>,
    final_sent: bool,
    /// An out-of-dialog INVITE: a call, reported in the call events.
    call: bool,
    /// `best` is our own answer (CANCEL while routing, shutdown), not one from downstream.
    local_final: bool,
}

/// One request sent downstream.
#[derive(Debug)]
struct Branch<D> {
    tx: ClientTransaction,
    forward: TxKey,
    to: D,
    /// A final response (or its equivalent: timeout, transport failure) is in.
    done: bool,
}

/// A transaction with a deadline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timed {
    Branch(BranchKey),
    Forward(TxKey),
}

/// Every forward and branch of the proxy, their timers and their output.
#[derive(Debug)]
pub struct ProxyTable<U, D> {
    cfg: ProxyConfig,
    forwards: HashMap<TxKey, Forward<U>>,
    branches: HashMap<BranchKey, Branch<D>>,
    /// Deadlines, one entry pushed whenever a transaction's deadline changes; entries that
    /// no longer match the transaction's current deadline are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, Timed)>>,
    transmits: VecDeque<Transmit<U, D>>,
    events: VecDeque<Event>,
}

impl<U: Clone, D: Clone> ProxyTable<U, D> {
    /// An empty table.
    pub fn new(cfg: ProxyConfig) -> Self {
        Self {
            cfg,
            forwards: HashMap::new(),
            branches: HashMap::new(),
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Forwards plus branches held.
    pub fn len(&self) -> usize {
        self.forwards.len() + self.branches.len()
    }

    /// Whether the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.forwards.is_empty() && self.branches.is_empty()
    }

    /// Whether a new forward would exceed `max_transactions`.
    pub fn is_full(&self) -> bool {
        self.len() >= self.cfg.max_transactions
    }

    /// Forwards still waiting for their final response (the shutdown waits for them).
    pub fn pending(&self) -> usize {
        self.forwards.values().filter(|f| !f.final_sent).count()
    }

    /// Whether `key` is a forward we hold.
    pub fn contains(&self, key: &TxKey) -> bool {
        self.forwards.contains_key(key)
    }

    /// An INVITE arrived again: absorbed, its last response sent again. False when `key` is
    /// not a forward of ours (then it is a new request).
    pub fn handle_retransmission(&mut self, key: &TxKey) -> bool {
        let Some(fw) = self.forwards.get_mut(key) else {
            return false;
        };
        if let Some(inv) = fw.invite.as_mut() {
            inv.handle_retransmission();
        }
        self.drain_forward(key);
        true
    }

    /// Opens the server side of an INVITE before it is routed (transaction first): 100
    /// Trying goes out at once (§16.2), so retransmissions arriving while routing waits on a
    /// store are absorbed by [`Self::handle_retransmission`].
    pub fn open(
        &mut self,
        key: TxKey,
        request: Message,
        upstream: Upstream<U>,
        now: Instant,
    ) -> Result<(), Full> {
        if self.is_full() {
            return Err(Full);
        }
        self.insert_forward(key, request, upstream, now);
        Ok(())
    }

    fn insert_forward(
        &mut self,
        key: TxKey,
        request: Message,
        upstream: Upstream<U>,
        now: Instant,
    ) {
        let is_invite = request.method() == Method::Invite;
        let invite = is_invite.then(|| {
            let mut inv = InviteServerTransaction::new(upstream.reliable, self.cfg.timers, now);
            let trying = ResponseBuilder::new(&request, 100)
                .source(upstream.source)
                .build();
            inv.send_response(100, trying, now);
            inv
        });
        let call = is_invite && request.to().and_then(|t| t.tag()).is_none();
        let fw = Forward {
            request,
            upstream,
            invite,
            branches: Vec::new(),
            best: None,
            challenges: Vec::new(),
            final_sent: false,
            call,
            local_final: false,
        };
        self.forwards.insert(key.clone(), fw);
        self.drain_forward(&key);
        self.schedule_forward(&key);
    }

    /// Sends `request` down every branch. The forward is the one [`Self::open`] made, or a new
    /// one (a non-INVITE request, or an INVITE routed without opening first).
    pub fn fork(
        &mut self,
        key: TxKey,
        request: Message,
        upstream: Upstream<U>,
        branches: Vec<NewBranch<D>>,
        now: Instant,
    ) -> Fork {
        match self.forwards.get(&key) {
            Some(fw) if fw.final_sent => {
                if fw.call {
                    let call_id = call_id_of(&fw.request);
                    self.events.push_back(Event::MediaEnd { call_id });
                }
                return Fork::AlreadyAnswered;
            }
            Some(_) => {}
            None if branches.is_empty() => {
                let resp =
                    local_response(&self.cfg.server_header, &request, upstream.source, 500).build();
                if request.method() == Method::Invite {
                    // No transaction to absorb the ACK: it is recognised by our To tag.
                    self.transmits.push_back(Transmit::Upstream {
                        to: upstream.to,
                        bytes: resp,
                    });
                    self.events.push_back(Event::Final {
                        key,
                        code: 500,
                        record: None,
                        reliable: upstream.reliable,
                    });
                } else {
                    self.answer_non_invite(key, &upstream, 500, resp);
                }
                return Fork::NoBranches;
            }
            None => self.insert_forward(key.clone(), request, upstream, now),
        }
        if branches.is_empty() {
            if let Some(fw) = self.forwards.get(&key) {
                let resp = local_response(
                    &self.cfg.server_header,
                    &fw.request,
                    fw.upstream.source,
                    500,
                )
                .build();
                self.answer(&key, 500, resp, now);
            }
            return Fork::NoBranches;
        }
        let mut names = Vec::with_capacity(branches.len());
        for nb in branches {
            let bk = BranchKey::request(&nb.branch);
            let tx = ClientTransaction::new(nb.request, nb.reliable, self.cfg.timers, now);
            names.push(bk.branch.clone());
            self.insert_branch(bk, tx, key.clone(), nb.to);
        }
        if let Some(fw) = self.forwards.get_mut(&key) {
            fw.branches = names;
        }
        Fork::Forked
    }

    /// Our own final answer to a forwarded INVITE (routing refused it: 404, 480, 407, ...):
    /// through its server transaction, which retransmits it until the ACK. False when `key`
    /// has no forward: the driver answers statelessly.
    pub fn answer(&mut self, key: &TxKey, code: u16, bytes: Bytes, now: Instant) -> bool {
        let Some(fw) = self.forwards.get_mut(key) else {
            return false;
        };
        if fw.final_sent {
            return true;
        }
        fw.final_sent = true;
        match fw.invite.as_mut() {
            Some(inv) => {
                inv.send_response(code, bytes, now);
                self.events.push_back(Event::Final {
                    key: key.clone(),
                    code,
                    record: None,
                    reliable: fw.upstream.reliable,
                });
            }
            None => {
                let upstream = fw.upstream.clone();
                self.answer_non_invite(key.clone(), &upstream, code, bytes);
            }
        }
        self.drain_forward(key);
        self.schedule_forward(key);
        self.reap_forward(key);
        true
    }

    /// An ACK for a non-2xx final response of a forwarded INVITE: absorbed by its server
    /// transaction. False when `key` has no INVITE forward (an ACK for a 2xx, to be routed).
    pub fn handle_ack(&mut self, key: &TxKey, now: Instant) -> bool {
        let Some(inv) = self.forwards.get_mut(key).and_then(|f| f.invite.as_mut()) else {
            return false;
        };
        inv.handle_ack(now);
        self.schedule_forward(key);
        self.reap_forward(key);
        true
    }

    /// A CANCEL for the INVITE forward `key` (§16.10): branches still pending are CANCELled;
    /// an INVITE still being routed is answered 487 at once, and routing then forks nothing.
    /// False when there is no such forward (answer 481).
    pub fn handle_cancel(&mut self, key: &TxKey, now: Instant) -> bool {
        let Some(fw) = self.forwards.get_mut(key) else {
            return false;
        };
        if fw.final_sent {
            return true;
        }
        if fw.branches.is_empty() {
            let resp = local_response(
                &self.cfg.server_header,
                &fw.request,
                fw.upstream.source,
                487,
            )
            .reason("Request Terminated")
            .build();
            fw.best = Some((487, resp));
            fw.local_final = true;
            self.maybe_finish(key, now);
            self.drain_forward(key);
            self.schedule_forward(key);
        } else {
            self.cancel_pending(key, now);
        }
        true
    }

    /// A response arrived. False when it matches no branch of ours (e.g. a 2xx retransmitted
    /// after its transaction ended): the driver forwards it statelessly by its Via.
    pub fn handle_response(&mut self, msg: &Message, now: Instant) -> bool {
        let Some(bk) = BranchKey::of_response(msg) else {
            return false;
        };
        let Some(b) = self.branches.get_mut(&bk) else {
            return false;
        };
        let pass = b.tx.handle_response(msg, now);
        let code = msg.status().unwrap_or(0);
        let key = b.forward.clone();
        if pass && !bk.cancel && code >= 200 {
            b.done = true;
        }
        self.drain_branch(&bk);
        if pass && !bk.cancel {
            self.on_branch_response(&key, code, msg, now);
        }
        self.schedule_branch(&bk);
        self.schedule_forward(&key);
        self.reap_branch(&bk);
        true
    }

    /// Sending on `branch` failed at the transport (connection refused, no route, ICMP):
    /// the branch ends as a 503 (§16.9) instead of waiting for Timer B/F.
    pub fn branch_failed(&mut self, branch: &BranchKey, now: Instant) {
        let Some(b) = self.branches.get_mut(branch) else {
            return;
        };
        if b.done {
            return;
        }
        b.done = true;
        b.tx.abort();
        let key = b.forward.clone();
        if !branch.cancel {
            self.offer_local(&key, 503);
            self.maybe_finish(&key, now);
            self.drain_forward(&key);
            self.schedule_forward(&key);
        }
        self.reap_branch(branch);
    }

    /// Branches whose request is unanswered so far and whose target matches `to` (the ones
    /// an ICMP error about that target concerns).
    pub fn unanswered_to(&self, to: impl Fn(&D) -> bool) -> Vec<BranchKey> {
        self.branches
            .iter()
            .filter(|(k, b)| {
                !k.cancel && !b.done && b.tx.state() == ClientState::Calling && to(&b.to)
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Shutdown's grace period is over: every forward still unanswered has its branches
    /// CANCELled and its caller answered 503. Returns how many there were.
    pub fn give_up(&mut self, now: Instant) -> usize {
        let keys: Vec<TxKey> = self
            .forwards
            .iter()
            .filter(|(_, f)| !f.final_sent)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &keys {
            let Some(fw) = self.forwards.get_mut(key) else {
                continue;
            };
            let resp = local_response(
                &self.cfg.server_header,
                &fw.request,
                fw.upstream.source,
                503,
            )
            .reason("Shutting Down")
            .header("Retry-After", 5)
            .build();
            fw.best = Some((503, resp));
            fw.local_final = true;
            let names = fw.branches.clone();
            if fw.invite.is_some() {
                self.cancel_pending(key, now);
            }
            for n in &names {
                if let Some(b) = self.branches.get_mut(&BranchKey::request(n)) {
                    b.done = true;
                }
            }
            self.maybe_finish(key, now);
            self.drain_forward(key);
            self.schedule_forward(key);
        }
        keys.len()
    }

    /// The earliest deadline of any transaction; call [`Self::handle_timeout`] then. Heap
    /// entries left by a deadline that moved or a transaction that ended are dropped here.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, timed))) = self.timers.peek() {
            let current = match timed {
                Timed::Branch(bk) => self.branches.get(bk).and_then(|b| b.tx.poll_timeout()),
                Timed::Forward(key) => self
                    .forwards
                    .get(key)
                    .and_then(|f| f.invite.as_ref())
                    .and_then(|i| i.poll_timeout()),
            };
            if current == Some(*at) {
                return Some(*at);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs every timer due at `now`; only transactions whose deadline has come are touched.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timed))) = self.timers.pop() else {
                break;
            };
            match timed {
                Timed::Branch(bk) => self.branch_timeout(&bk, now),
                Timed::Forward(key) => {
                    let Some(inv) = self.forwards.get_mut(&key).and_then(|f| f.invite.as_mut())
                    else {
                        continue;
                    };
                    if inv.poll_timeout().is_none_or(|d| d > now) {
                        continue;
                    }
                    inv.handle_timeout(now);
                    self.drain_forward(&key);
                    self.schedule_forward(&key);
                    self.reap_forward(&key);
                }
            }
        }
        self.shrink();
    }

    /// The next bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<U, D>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn branch_timeout(&mut self, bk: &BranchKey, now: Instant) {
        let Some(b) = self.branches.get_mut(bk) else {
            return;
        };
        if b.tx.poll_timeout().is_none_or(|d| d > now) {
            return;
        }
        b.tx.handle_timeout(now);
        let timed_out = b.tx.poll_event() == Some(ClientEvent::TimedOut) && !bk.cancel;
        // Timer C fired on a ringing INVITE branch (§16.8): cancel it.
        let ringing = timed_out
            && b.tx.request().method() == Method::Invite
            && b.tx.state() == ClientState::Proceeding;
        let key = b.forward.clone();
        self.drain_branch(bk);
        if ringing {
            self.cancel_branch(bk.branch(), now);
        }
        if timed_out {
            if let Some(b) = self.branches.get_mut(bk) {
                b.done = true;
            }
            self.offer_local(&key, 408);
            self.maybe_finish(&key, now);
            self.drain_forward(&key);
            self.schedule_forward(&key);
        }
        self.schedule_branch(bk);
        self.reap_branch(bk);
    }

    fn on_branch_response(&mut self, key: &TxKey, code: u16, msg: &Message, now: Instant) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        match code {
            100 => {}
            101..=199 => {
                if let Some(inv) = fw.invite.as_mut() {
                    inv.send_response(code, strip_top_via(msg), now);
                }
            }
            200..=299 => {
                let bytes = strip_top_via(msg);
                if let Some(inv) = fw.invite.as_mut() {
                    // Every 2xx goes upstream (several branches may answer; §16.7 step 5).
                    inv.send_response(code, bytes, now);
                    if !fw.final_sent {
                        fw.final_sent = true;
                        self.events.push_back(Event::Final {
                            key: key.clone(),
                            code,
                            record: None,
                            reliable: fw.upstream.reliable,
                        });
                        if fw.call {
                            let call_id = call_id_of(&fw.request);
                            self.events.push_back(Event::CallAnswered { call_id, code });
                        }
                        self.cancel_pending(key, now);
                    }
                } else if !fw.final_sent {
                    fw.final_sent = true;
                    let upstream = fw.upstream.clone();
                    self.answer_non_invite(key.clone(), &upstream, code, bytes);
                }
            }
            _ => {
                if code == 401 || code == 407 {
                    fw.challenges.extend(best::challenge_lines(msg));
                }
                if fw.best.as_ref().is_none_or(|(b, _)| best::better(code, *b)) {
                    fw.best = Some((code, strip_top_via(msg)));
                }
                if (600..700).contains(&code) && fw.invite.is_some() {
                    self.cancel_pending(key, now);
                }
                self.maybe_finish(key, now);
            }
        }
        self.drain_forward(key);
    }

    /// A final of our own making (timeout, unreachable target) competes with the branches'.
    fn offer_local(&mut self, key: &TxKey, code: u16) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        if fw
            .best
            .as_ref()
            .is_some_and(|(c, _)| !best::better(code, *c))
        {
            return;
        }
        let resp = local_response(
            &self.cfg.server_header,
            &fw.request,
            fw.upstream.source,
            code,
        )
        .build();
        if let Some(fw) = self.forwards.get_mut(key) {
            fw.best = Some((code, resp));
        }
    }

    /// Sends the best final response once every branch has one (§16.7 step 6).
    fn maybe_finish(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        if fw.final_sent {
            return;
        }
        let all_done = fw.branches.iter().all(|n| {
            self.branches
                .get(&BranchKey::request(n))
                .is_none_or(|b| b.done)
        });
        if !all_done {
            return;
        }
        let (code, bytes) = match &fw.best {
            Some((c, b)) => (*c, b.clone()),
            None => (
                408,
                local_response(
                    &self.cfg.server_header,
                    &fw.request,
                    fw.upstream.source,
                    408,
                )
                .build(),
            ),
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
            c if c != code => (
                c,
                local_response(&self.cfg.server_header, &fw.request, fw.upstream.source, c).build(),
            ),
            _ => (code, bytes),
        };
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        fw.final_sent = true;
        fw.best = None;
        let call = fw.call.then(|| call_id_of(&fw.request));
        match fw.invite.as_mut() {
            Some(inv) => {
                inv.send_response(code, bytes, now);
                self.events.push_back(Event::Final {
                    key: key.clone(),
                    code,
                    record: None,
                    reliable: fw.upstream.reliable,
                });
            }
            None => {
                let upstream = fw.upstream.clone();
                self.answer_non_invite(key.clone(), &upstream, code, bytes);
            }
        }
        if let Some(call_id) = call {
            self.events.push_back(Event::MediaEnd {
                call_id: call_id.clone(),
            });
            self.events.push_back(Event::CallFailed { call_id, code });
        }
    }

    /// A final response to a request without an INVITE server transaction: sent once, and
    /// handed to the driver's non-INVITE server transaction.
    fn answer_non_invite(&mut self, key: TxKey, upstream: &Upstream<U>, code: u16, bytes: Bytes) {
        self.transmits.push_back(Transmit::Upstream {
            to: upstream.to.clone(),
            bytes: bytes.clone(),
        });
        self.events.push_back(Event::Final {
            key,
            code,
            record: Some(bytes),
            reliable: upstream.reliable,
        });
    }

    /// CANCELs every branch of `key` that has no final response yet (§16.10).
    fn cancel_pending(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        for name in fw.branches.clone() {
            self.cancel_branch(&name, now);
        }
    }

    fn cancel_branch(&mut self, name: &str, now: Instant) {
        let Some(b) = self.branches.get(&BranchKey::request(name)) else {
            return;
        };
        let cancel_key = BranchKey::cancel(name);
        if b.done
            || b.tx.request().method() != Method::Invite
            || self.branches.contains_key(&cancel_key)
        {
            return;
        }
        let Ok(cancel) =
            Message::parse(request::cancel_for(b.tx.request()), &self.cfg.parse_limits)
        else {
            return;
        };
        let reliable = b.tx.is_reliable();
        let (forward, to) = (b.forward.clone(), b.to.clone());
        let tx = ClientTransaction::new(cancel, reliable, self.cfg.timers, now);
        self.insert_branch(cancel_key, tx, forward, to);
    }

    fn insert_branch(&mut self, bk: BranchKey, tx: ClientTransaction, forward: TxKey, to: D) {
        self.branches.insert(
            bk.clone(),
            Branch {
                tx,
                forward,
                to,
                done: false,
            },
        );
        self.drain_branch(&bk);
        self.schedule_branch(&bk);
    }

    fn drain_branch(&mut self, bk: &BranchKey) {
        let Some(b) = self.branches.get_mut(bk) else {
            return;
        };
        while let Some(bytes) = b.tx.poll_transmit() {
            self.transmits.push_back(Transmit::Downstream {
                branch: bk.clone(),
                to: b.to.clone(),
                bytes,
            });
        }
    }

    fn drain_forward(&mut self, key: &TxKey) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        if let Some(inv) = fw.invite.as_mut() {
            while let Some(bytes) = inv.poll_transmit() {
                self.transmits.push_back(Transmit::Upstream {
                    to: fw.upstream.to.clone(),
                    bytes,
                });
            }
        }
    }

    fn schedule_branch(&mut self, bk: &BranchKey) {
        if let Some(at) = self.branches.get(bk).and_then(|b| b.tx.poll_timeout()) {
            self.timers.push(Reverse((at, Timed::Branch(bk.clone()))));
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
    fn reap_branch(&mut self, bk: &BranchKey) {
        let Some(b) = self.branches.get(bk) else {
            return;
        };
        if !b.tx.is_terminated() {
            return;
        }
        let key = b.forward.clone();
        self.branches.remove(bk);
        self.reap_forward(&key);
    }

    fn reap_forward(&mut self, key: &TxKey) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        let server_done = match &fw.invite {
            Some(inv) => inv.is_terminated(),
            None => fw.final_sent,
        };
        let branch_alive = fw.branches.iter().any(|n| {
            self.branches.contains_key(&BranchKey::request(n))
                || self.branches.contains_key(&BranchKey::cancel(n))
        });
        if server_done && !branch_alive {
            self.forwards.remove(key);
        }
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
}

/// A response of ours to a forwarded request, with what every response of ours carries.
fn local_response<'m>(
    server_header: &str,
    request: &'m Message,
    source: SocketAddr,
    code: u16,
) -> ResponseBuilder<'m> {
    ResponseBuilder::new(request, code)
        .source(source)
        .to_tag(super::local_tag(request))
        .header("Server", server_header)
}

fn call_id_of(msg: &Message) -> Box<str> {
    msg.call_id().unwrap_or_default().into()
}
