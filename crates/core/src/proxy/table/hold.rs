//! Requests held for sleeping devices (RFC 8599 §5.3): a push went to each, and the request
//! waits for them to register again without being answered by the branches it has.

use std::cmp::Reverse;
use std::time::Instant;

use careflow_proto::Message;

use super::{BranchKey, NewBranch, ProxyTable, Timed, Upstream};
use crate::transaction::TxKey;
use crate::transaction::client::ClientTransaction;

impl<U: Clone, D: Clone> ProxyTable<U, D> {
    /// A request (an INVITE, or a MESSAGE) that waits for sleeping devices (a push went to
    /// each) until `until`: it keeps its server transaction, gains their branches through
    /// [`Self::add_branches`] when they register again, and is not answered with the
    /// branches' best response while it waits. At `until` it stops waiting: with no branch it
    /// gets 480, else the best response of its branches. A CANCEL meanwhile answers 487 as
    /// for any INVITE. A new forward is made for a request not opened yet. False when it was
    /// answered already.
    pub fn hold(
        &mut self,
        key: &TxKey,
        request: &Message,
        upstream: &Upstream<U>,
        until: Instant,
        now: Instant,
    ) -> bool {
        if !self.forwards.contains_key(key) {
            self.insert_forward(key.clone(), request.clone(), upstream.clone(), now);
        }
        let Some(fw) = self.forwards.get_mut(key) else {
            return false;
        };
        if fw.final_sent || fw.cancelled {
            return false;
        }
        let until = fw.held_until.map_or(until, |t| t.max(until));
        fw.held_until = Some(until);
        self.timers.push(Reverse((until, Timed::Hold(key.clone()))));
        true
    }

    /// The request waits for no sleeping device any more (each push failed, or each device
    /// got its branch): with `failure` (a push the service refused: 404 for a token it no
    /// longer knows, else 480, with `reason` as the Reason text) competing with the
    /// branches' answers. With no branch, answered now.
    pub fn unhold(&mut self, key: &TxKey, failure: Option<(u16, &str)>, now: Instant) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        if fw.held_until.take().is_none() || fw.final_sent {
            return;
        }
        if let Some((code, text)) = failure {
            self.offer_local(key, code, Some(text));
        }
        self.finish_held(key, now);
    }

    /// A held request whose devices did not wake in time: 480, unless a branch does better.
    pub(super) fn hold_timeout(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        if fw.held_until.is_none_or(|t| t > now) || fw.final_sent {
            return;
        }
        fw.held_until = None;
        self.offer_local(key, 480, Some("the device did not wake up"));
        self.finish_held(key, now);
    }

    /// A request that stopped waiting: answered with its best response now when it has no
    /// branch, else once its branches are done.
    fn finish_held(&mut self, key: &TxKey, now: Instant) {
        let Some(fw) = self.forwards.get_mut(key) else {
            return;
        };
        if !fw.branches.is_empty() {
            self.maybe_finish(key, now);
            self.drain_forward(key);
            self.schedule_forward(key);
            self.reap_forward(key);
            return;
        }
        let Some((code, bytes)) = fw.best.take() else {
            return;
        };
        self.answer(key, code, bytes, now);
    }

    /// A device woken for a call that ended meanwhile (answered elsewhere, or cancelled) still
    /// gets the INVITE, then a CANCEL as soon as it answers provisionally: iOS shows a VoIP
    /// push as an incoming call (CallKit), which only a CANCEL clears, and ends an app whose
    /// VoIP push leads to no call. The branch belongs to no forward: nothing goes upstream.
    pub fn ring_and_cancel(&mut self, nb: NewBranch<D>, now: Instant) {
        let Some(orphan) = TxKey::of(&nb.request) else {
            return;
        };
        let bk = BranchKey::request(&nb.branch);
        let tx = ClientTransaction::new(nb.request, nb.reliable, self.cfg.timers, now);
        self.farewells.insert(bk.clone());
        self.insert_branch(bk, tx, orphan, nb.to);
    }

    pub(super) fn farewell_response(&mut self, bk: &BranchKey, code: u16, now: Instant) {
        if (100..200).contains(&code) {
            self.cancel_branch(bk, now);
        }
    }
}
