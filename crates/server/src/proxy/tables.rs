//! The proxy's transaction tables: forwards (server side) and branches (client side), and
//! the deadline heap that drives their timers.

use super::*;

/// A transaction with a deadline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timed {
    Branch(String),
    Forward(TxKey),
}

/// Proxy transaction tables.
#[derive(Debug, Default)]
pub(crate) struct ProxyTables {
    pub(super) forwards: HashMap<TxKey, Forward>,
    /// By "branch|METHOD" of the requests we sent.
    pub(super) branches: HashMap<String, Branch>,
    /// Deadlines, one entry pushed whenever a transaction's deadline changes; entries that
    /// no longer match the transaction's current deadline are skipped when popped.
    pub(super) timers: BinaryHeap<Reverse<(Instant, Timed)>>,
}

impl ProxyTables {
    pub(crate) fn len(&self) -> usize {
        self.forwards.len() + self.branches.len()
    }

    pub(super) fn insert_branch(&mut self, name: String, branch: Branch) {
        self.branches.insert(name.clone(), branch);
        self.schedule_branch(&name);
    }

    pub(super) fn schedule_branch(&mut self, name: &str) {
        if let Some(at) = self.branches.get(name).and_then(|b| b.tx.poll_timeout()) {
            self.timers
                .push(Reverse((at, Timed::Branch(name.to_string()))));
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
    pub(super) fn reap_branch(&mut self, name: &str) {
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

    pub(super) fn reap_forward(&mut self, key: &TxKey) {
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
