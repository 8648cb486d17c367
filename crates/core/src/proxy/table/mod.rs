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
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use careflow_proto::{Message, Method, ResponseBuilder};
use foldhash::{HashMap, HashMapExt};

use crate::transaction::TxKey;
use crate::transaction::client::{ClientEvent, ClientState, ClientTransaction};
use crate::transaction::invite_server::InviteServerTransaction;

mod aggregate;
mod bookkeeping;
mod hold;
#[cfg(test)]
mod tests;
mod types;

use aggregate::{call_id_of, local_response};
pub use types::{BranchKey, Event, Fork, Full, NewBranch, ProxyConfig, Record, Transmit, Upstream};

/// How long an INVITE's 100 Trying is held: a callee that rings or answers sooner makes it
/// needless (RFC 3261 §17.2.1: a transaction whose user answers within 200 ms may skip it),
/// and the caller gets one response instead of two; one that does not gets the 100 well
/// before its first retransmission (T1, 500 ms). The driver's timer tick adds up to its period.
pub const TRYING_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// One forwarded request: the server side and its branches.
#[derive(Debug)]
struct Forward<U> {
    request: Message,
    upstream: Upstream<U>,
    invite: Option<InviteServerTransaction>,
    /// Branch values of the requests sent for it.
    branches: Vec<BranchKey>,
    best: Option<(u16, Bytes)>,
    /// WWW-/Proxy-Authenticate lines of every 401/407 received (§16.7 step 7).
    challenges: Vec<String>,
    final_sent: bool,
    /// An out-of-dialog INVITE: a call, reported in the call events.
    call: bool,
    /// `best` is our own answer (CANCEL while routing, shutdown), not one from downstream.
    local_final: bool,
    /// The caller cancelled (or the server is shutting down): no branch is added any more.
    cancelled: bool,
    /// Held without a branch until then (its callees sleep and were woken by a push).
    held_until: Option<Instant>,
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
    Hold(TxKey),
}

/// Every forward and branch of the proxy, their timers and their output.
#[derive(Debug)]
pub struct ProxyTable<U, D> {
    cfg: ProxyConfig,
    /// Boxed: a forward holds its request (~1 KiB) and a branch its transaction, and inline
    /// values were copied on every insert and every rehash.
    forwards: HashMap<TxKey, Box<Forward<U>>>,
    branches: HashMap<BranchKey, Box<Branch<D>>>,
    /// Deadlines, one entry pushed whenever a transaction's deadline changes; entries that
    /// no longer match the transaction's current deadline are skipped when popped.
    timers: BinaryHeap<Reverse<(Instant, Timed)>>,
    transmits: VecDeque<Transmit<U, D>>,
    events: VecDeque<Event>,
    /// INVITEs sent to a device only to be CANCELled ([`Self::ring_and_cancel`]).
    farewells: foldhash::HashSet<BranchKey>,
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
            farewells: Default::default(),
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

    /// Opens the server side of an INVITE before it is routed (transaction first), so
    /// retransmissions arriving while routing waits on a store are absorbed by
    /// [`Self::handle_retransmission`] (the first one gets 100 Trying at once). The 100 itself
    /// is held for [`TRYING_AFTER`] (§16.2, §17.2.1).
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
            inv.hold_trying(trying, now + TRYING_AFTER);
            inv
        });
        let call = is_invite && request.to_tag().is_none();
        let fw = Box::new(Forward {
            request,
            upstream,
            invite,
            branches: Vec::new(),
            best: None,
            challenges: Vec::new(),
            final_sent: false,
            call,
            local_final: false,
            cancelled: false,
            held_until: None,
        });
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
                        code: 500,
                        record: None,
                    });
                } else {
                    self.answer_non_invite(key, &upstream, 500, resp);
                }
                return Fork::NoBranches;
            }
            None => self.insert_forward(key.clone(), request, upstream, now),
        }
        if branches.is_empty() {
            if self
                .forwards
                .get(&key)
                .is_some_and(|f| f.held_until.is_some())
            {
                return Fork::Held;
            }
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
            names.push(bk.clone());
            self.insert_branch(bk, tx, key.clone(), nb.to);
        }
        if let Some(fw) = self.forwards.get_mut(&key) {
            fw.branches = names;
        }
        Fork::Forked
    }

    /// Late forking: more branches for an INVITE still being forked (its callee registered
    /// a device while it rings). False when the call was answered, cancelled or is gone:
    /// nothing was sent.
    pub fn add_branches(&mut self, key: &TxKey, branches: Vec<NewBranch<D>>, now: Instant) -> bool {
        if self.ringing(key).is_none() || branches.is_empty() {
            return false;
        }
        for nb in branches {
            let bk = BranchKey::request(&nb.branch);
            let tx = ClientTransaction::new(nb.request, nb.reliable, self.cfg.timers, now);
            if let Some(fw) = self.forwards.get_mut(key) {
                fw.branches.push(bk.clone());
            }
            self.insert_branch(bk, tx, key.clone(), nb.to);
        }
        true
    }

    /// The request and the caller's way back of an INVITE still being forked (not answered,
    /// not cancelled), to build late branches from.
    pub fn ringing(&self, key: &TxKey) -> Option<(&Message, &Upstream<U>)> {
        self.forwards
            .get(key)
            .filter(|fw| {
                (fw.invite.is_some() || fw.held_until.is_some())
                    && !fw.final_sent
                    && !fw.cancelled
                    && (!fw.branches.is_empty() || fw.held_until.is_some())
            })
            .map(|fw| (&fw.request, &fw.upstream))
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
        self.send_final(key, code, bytes, now);
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
        fw.cancelled = true;
        // A cancelled call waits for no sleeping device.
        fw.held_until = None;
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
        if pass && !bk.is_cancel() && code >= 200 {
            b.done = true;
        }
        self.drain_branch(&bk);
        if pass && !bk.is_cancel() {
            if self.farewells.contains(&bk) {
                self.farewell_response(&bk, code, now);
            } else {
                self.on_branch_response(&key, code, msg, now);
            }
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
        if !branch.is_cancel() {
            self.offer_local(&key, 503, None);
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
                !k.is_cancel() && !b.done && b.tx.state() == ClientState::Calling && to(&b.to)
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
            fw.cancelled = true;
            let names = fw.branches.clone();
            if fw.invite.is_some() {
                self.cancel_pending(key, now);
            }
            for n in &names {
                if let Some(b) = self.branches.get_mut(n) {
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
                Timed::Hold(key) => self
                    .forwards
                    .get(key)
                    .filter(|f| !f.final_sent)
                    .and_then(|f| f.held_until),
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
                Timed::Hold(key) => self.hold_timeout(&key, now),
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
        let timed_out = b.tx.poll_event() == Some(ClientEvent::TimedOut) && !bk.is_cancel();
        // Timer C fired on a ringing INVITE branch (§16.8): cancel it.
        let ringing = timed_out
            && b.tx.request().method() == Method::Invite
            && b.tx.state() == ClientState::Proceeding;
        let key = b.forward.clone();
        self.drain_branch(bk);
        if ringing {
            self.cancel_branch(bk, now);
        }
        if timed_out {
            if let Some(b) = self.branches.get_mut(bk) {
                b.done = true;
            }
            self.offer_local(&key, 408, None);
            self.maybe_finish(&key, now);
            self.drain_forward(&key);
            self.schedule_forward(&key);
        }
        self.schedule_branch(bk);
        self.reap_branch(bk);
    }
}
