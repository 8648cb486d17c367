//! The guard in a cluster: what one node shares with the others (bans, unbans, failed
//! guesses) so that they count and ban as one (an outbox of this node's own decisions, drained
//! by the cluster driver, and the others' decisions applied without echo), and the other
//! nodes' addresses, passed like the allow-list while they are members.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::{BanReason, BanScope, Guard, GuardConfig, lock, normalise, site_of};

/// What a node shares with the other nodes of a cluster, so that the guard counts and bans
/// as one: a guesser spreading guesses over the nodes gets no more than at one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shared {
    /// `scope` was banned for `reason`.
    Ban(BanScope, BanReason),
    /// `scope` was unbanned (by an operator).
    Unban(BanScope),
    /// A failed guess from this flow for this username.
    Guess(SocketAddr, String),
}

/// Shared decisions kept while nobody drains them.
const OUTBOX: usize = 1024;

impl Guard {
    /// Starts keeping this node's bans and unbans for [`Self::take_shared`] (a cluster).
    pub fn share(&self) {
        lock(&self.outbox).get_or_insert_with(VecDeque::new);
    }

    /// The bans and unbans made here since the last call, oldest first.
    pub fn take_shared(&self) -> Vec<Shared> {
        lock(&self.outbox)
            .as_mut()
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    pub(super) fn announce(&self, decision: Shared) {
        if let Some(q) = lock(&self.outbox).as_mut() {
            if q.len() == OUTBOX {
                q.pop_front();
            }
            q.push_back(decision);
        }
    }

    /// A ban another node made: applied here for this node's ban time, not shared again; a
    /// guess another node saw: counted here too (a ban it causes is shared as ours).
    pub fn apply_shared(&self, decision: Shared, now: Instant) {
        match decision {
            Shared::Guess(src, user) => {
                let _ = self.count_guess(src, &user, now);
            }
            Shared::Ban(scope, reason) => {
                if !self.allowed(scope.ip()) {
                    let cfg = self.config();
                    let scope = normalise(scope);
                    let _ = lock(self.shard(site_of(scope.ip()))).ban(scope, reason, &cfg, now);
                }
            }
            Shared::Unban(scope) => {
                self.lift(scope, now);
            }
        }
    }
    /// The addresses of the other nodes of our cluster, now.
    pub fn set_peers(&self, peers: Vec<IpAddr>) {
        match self.peers.write() {
            Ok(mut p) => *p = Arc::new(peers),
            Err(p) => *p.into_inner() = Arc::new(peers),
        }
    }

    /// Whether `ip` is passed without limits: on the allow-list of `cfg`, or a cluster peer.
    pub(super) fn exempt(&self, cfg: &GuardConfig, ip: IpAddr) -> bool {
        cfg.allowlist.iter().any(|c| c.contains(ip))
            || match self.peers.read() {
                Ok(p) => p.contains(&ip),
                Err(p) => p.into_inner().contains(&ip),
            }
    }

    /// A failed guess (wrong digest or unknown user) from `src` for `user`. Returns the ban it
    /// caused, if any. The challenge that starts every normal registration, and credentials
    /// with a stale or reused nonce, are no guesses and must not be reported here.
    pub fn auth_failed(
        &self,
        src: SocketAddr,
        user: &str,
        now: Instant,
    ) -> Option<(BanScope, BanReason)> {
        let ban = self.count_guess(src, user, now);
        if !self.exempt(&self.config(), src.ip()) {
            self.announce(Shared::Guess(src, user.chars().take(64).collect()));
        }
        ban
    }
}
