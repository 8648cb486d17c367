//! The table's bookkeeping: inserting branches, draining what the transactions queued,
//! scheduling their deadlines, and removing what has ended.

use std::cmp::Reverse;

use super::{Branch, BranchKey, ProxyTable, Timed, Transmit};
use crate::transaction::TxKey;
use crate::transaction::client::ClientTransaction;

impl<U: Clone, D: Clone> ProxyTable<U, D> {
    pub(super) fn insert_branch(
        &mut self,
        bk: BranchKey,
        tx: ClientTransaction,
        forward: TxKey,
        to: D,
    ) {
        self.branches.insert(
            bk.clone(),
            Box::new(Branch {
                tx,
                forward,
                to,
                done: false,
            }),
        );
        self.drain_branch(&bk);
        self.schedule_branch(&bk);
    }

    pub(super) fn drain_branch(&mut self, bk: &BranchKey) {
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

    pub(super) fn drain_forward(&mut self, key: &TxKey) {
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

    pub(super) fn schedule_branch(&mut self, bk: &BranchKey) {
        if let Some(at) = self.branches.get(bk).and_then(|b| b.tx.poll_timeout()) {
            self.timers.push(Reverse((at, Timed::Branch(bk.clone()))));
        }
    }

    pub(super) fn schedule_forward(&mut self, key: &TxKey) {
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
    pub(super) fn reap_branch(&mut self, bk: &BranchKey) {
        let Some(b) = self.branches.get(bk) else {
            return;
        };
        if !b.tx.is_terminated() {
            return;
        }
        let key = b.forward.clone();
        self.branches.remove(bk);
        self.farewells.remove(bk);
        self.reap_forward(&key);
    }

    pub(super) fn reap_forward(&mut self, key: &TxKey) {
        let Some(fw) = self.forwards.get(key) else {
            return;
        };
        let server_done = match &fw.invite {
            Some(inv) => inv.is_terminated(),
            None => fw.final_sent,
        };
        let branch_alive = fw
            .branches
            .iter()
            .any(|n| self.branches.contains_key(n) || self.branches.contains_key(&n.cancel_of()));
        if server_done && !branch_alive {
            self.forwards.remove(key);
        }
    }

    /// Gives back table capacity after a burst (HashMaps never shrink by themselves, and
    /// these hold whole transactions inline).
    pub(super) fn shrink(&mut self) {
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
