//! Liveness as data. Every node keeps a short-lived key in the shared store with its address
//! and boot epoch and refreshes it well inside its lifetime; every node reads all of them
//! periodically and feeds what it read here. Announcements on pub/sub (a node going down, a
//! node starting) only make the view faster; correctness rests on the expiring keys.
//!
//! The hysteresis that keeps a stall of the store from flapping membership: a node is gone
//! only when a *successful* read, at least `down_after` after the node was last seen, still
//! does not show it (or it announced its own end). While reads fail nothing is concluded, and
//! the first read after the stall sees the keys the live nodes kept refreshing (the key
//! lifetime is longer than any stall we ride out).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::token::NodeId;

/// What a node's liveness key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The node.
    pub node: NodeId,
    /// Its boot epoch (a new one at every start).
    pub epoch: u64,
    /// Where its internal link is (`CLUSTER_ADDRESS`).
    pub address: String,
}

/// What is known of a node's life, for a binding registered during boot epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The node is up in that very epoch: its flows may be used.
    Alive,
    /// The node has restarted since: the flow died with the previous process.
    Rebooted,
    /// The node is down: skip its bindings at once.
    Gone,
    /// No successful read yet (this node just started): try it.
    Unknown,
}

#[derive(Debug, Clone)]
struct Member {
    epoch: u64,
    address: String,
    /// The IP of `address`, parsed once: the per-request checks compare it.
    ip: Option<std::net::IpAddr>,
    last_seen: Instant,
    /// The node announced the end of this epoch (shutdown); only a later epoch revives it.
    ended: Option<u64>,
}

fn ip_of(address: &str) -> Option<std::net::IpAddr> {
    address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// This node's view of the cluster.
#[derive(Debug)]
pub struct Membership {
    me: NodeId,
    my_epoch: u64,
    down_after: Duration,
    members: HashMap<NodeId, Member>,
    /// The first and the last read of every key that succeeded.
    first_read: Option<Instant>,
    last_good_read: Option<Instant>,
}

impl Membership {
    /// The view of node `me` in its boot epoch `my_epoch`; a node unseen for `down_after`
    /// (by successful reads) is gone.
    pub fn new(me: NodeId, my_epoch: u64, down_after: Duration) -> Self {
        Self {
            me,
            my_epoch,
            down_after,
            members: HashMap::new(),
            first_read: None,
            last_good_read: None,
        }
    }

    /// A complete, successful read of every node's liveness key at `now`. A read that failed
    /// (the store unavailable) is not reported: nothing is concluded from it.
    pub fn observed(&mut self, live: &[Announcement], now: Instant) {
        for a in live {
            self.seen(a, now);
        }
        self.first_read.get_or_insert(now);
        self.last_good_read = Some(now);
    }

    /// A node announced that it started (pub/sub): alive at once.
    pub fn announced_up(&mut self, a: &Announcement, now: Instant) {
        self.seen(a, now);
    }

    /// A node announced that it is going down in `epoch` (pub/sub, or its key deleted on a
    /// clean shutdown): gone at once, whatever a read still shows of that epoch.
    pub fn announced_down(&mut self, node: NodeId, epoch: u64) {
        if let Some(m) = self.members.get_mut(&node)
            && m.epoch <= epoch
        {
            m.ended = Some(epoch);
        }
    }

    fn seen(&mut self, a: &Announcement, now: Instant) {
        if a.node == self.me {
            return;
        }
        match self.members.get_mut(&a.node) {
            Some(m) if a.epoch < m.epoch => {} // a stale key of an earlier life
            Some(m) if a.epoch == m.epoch && m.ended == Some(a.epoch) => {}
            Some(m) => {
                if a.epoch > m.epoch {
                    m.ended = None;
                }
                m.epoch = a.epoch;
                if m.address != a.address {
                    m.address.clone_from(&a.address);
                    m.ip = ip_of(&a.address);
                }
                m.last_seen = now;
            }
            None => {
                self.members.insert(
                    a.node,
                    Member {
                        epoch: a.epoch,
                        address: a.address.clone(),
                        ip: ip_of(&a.address),
                        last_seen: now,
                        ended: None,
                    },
                );
            }
        }
    }

    /// Whether a flow `node` registered during its boot epoch `epoch` may still be used.
    pub fn status(&self, node: NodeId, epoch: u64) -> Liveness {
        if node == self.me {
            return if epoch == self.my_epoch {
                Liveness::Alive
            } else {
                Liveness::Rebooted
            };
        }
        let Some(read) = self.last_good_read else {
            return Liveness::Unknown;
        };
        let Some(m) = self.members.get(&node) else {
            // Never seen although the keys were read: long gone (or never was). Only a read
            // made `down_after` after this view began proves it: until then, try.
            return if self.proven_absent(None, read) {
                Liveness::Gone
            } else {
                Liveness::Unknown
            };
        };
        if m.epoch > epoch {
            return Liveness::Rebooted;
        }
        if m.ended.is_some_and(|e| e >= epoch) {
            return Liveness::Gone;
        }
        if m.epoch < epoch {
            // A binding newer than anything we saw of the node: we are behind; try it.
            return Liveness::Unknown;
        }
        if self.proven_absent(Some(m.last_seen), read) {
            return Liveness::Gone;
        }
        Liveness::Alive
    }

    /// Whether a successful read `read` came at least `down_after` after the node was last
    /// seen (`None`: since this view began, i.e. the first successful read).
    fn proven_absent(&self, last_seen: Option<Instant>, read: Instant) -> bool {
        match last_seen {
            Some(seen) => read.saturating_duration_since(seen) >= self.down_after,
            None => self
                .first_read
                .is_some_and(|first| read.saturating_duration_since(first) >= self.down_after),
        }
    }

    /// The internal-link address of `node`, when it is known.
    pub fn address(&self, node: NodeId) -> Option<&str> {
        self.members.get(&node).map(|m| m.address.as_str())
    }

    /// Whether `ip` is the address of a node we have seen (alive or not): only they may hand
    /// us requests with internal routes.
    pub fn is_member_ip(&self, ip: std::net::IpAddr) -> bool {
        self.members.values().any(|m| m.ip == Some(ip))
    }

    /// Whether `ip` is the address of a node that is gone (and of no node alive): a route
    /// naming it leads nowhere.
    pub fn is_gone_ip(&self, ip: std::net::IpAddr) -> bool {
        let mut gone = false;
        for (id, m) in self.members.iter().filter(|(_, m)| m.ip == Some(ip)) {
            match self.status(*id, m.epoch) {
                Liveness::Gone => gone = true,
                _ => return false,
            }
        }
        gone
    }

    /// The IP addresses of the other nodes we have seen.
    pub fn member_ips(&self) -> Vec<std::net::IpAddr> {
        let mut ips: Vec<std::net::IpAddr> = self.members.values().filter_map(|m| m.ip).collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }

    /// The nodes alive now, this one included.
    pub fn alive(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(id, m)| self.status(**id, m.epoch) == Liveness::Alive)
            .map(|(id, _)| *id)
            .collect();
        v.push(self.me);
        v.sort();
        v
    }

    /// Whether this node does the chores done once per cluster (sweeping shared state): the
    /// alive node with the lowest id. While the view is unknown every node does them (a sweep
    /// done twice is harmless; one never done is not).
    pub fn is_leader(&self) -> bool {
        self.alive().first() == Some(&self.me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOWN: Duration = Duration::from_secs(6);

    fn node(n: u64) -> Announcement {
        Announcement {
            node: NodeId(n),
            epoch: 100 + n,
            address: format!("127.0.0.{n}:5090"),
        }
    }

    struct Clock(Instant);

    impl Clock {
        fn at(&self, secs: f64) -> Instant {
            self.0 + Duration::from_secs_f64(secs)
        }
    }

    fn view() -> (Membership, Clock) {
        (Membership::new(NodeId(1), 101, DOWN), Clock(Instant::now()))
    }

    #[test]
    fn nodes_seen_are_alive_and_one_that_stops_refreshing_is_gone_after_down_after() {
        let (mut m, c) = view();
        assert_eq!(
            m.status(NodeId(2), 102),
            Liveness::Unknown,
            "nothing read yet"
        );
        m.observed(&[node(1), node(2), node(3)], c.at(0.0));
        assert_eq!(m.status(NodeId(2), 102), Liveness::Alive);
        assert_eq!(m.address(NodeId(3)), Some("127.0.0.3:5090"));
        assert!(m.is_member_ip("127.0.0.3".parse().expect("ip")));
        assert!(!m.is_member_ip("127.0.0.9".parse().expect("ip")));
        // Node 3 stops refreshing; reads every 2 s keep succeeding.
        for t in [2.0, 4.0] {
            m.observed(&[node(1), node(2)], c.at(t));
            assert_eq!(m.status(NodeId(3), 103), Liveness::Alive, "at {t} s");
        }
        m.observed(&[node(1), node(2)], c.at(6.0));
        assert_eq!(m.status(NodeId(3), 103), Liveness::Gone);
        assert_eq!(m.status(NodeId(2), 102), Liveness::Alive);
        assert!(m.is_gone_ip("127.0.0.3".parse().expect("ip")));
        assert!(!m.is_gone_ip("127.0.0.2".parse().expect("ip")));
        assert!(
            !m.is_gone_ip("127.0.0.9".parse().expect("ip")),
            "never a member"
        );
        assert_eq!(m.alive(), vec![NodeId(1), NodeId(2)]);
    }

    #[test]
    fn a_stall_of_the_store_marks_nobody_dead() {
        let (mut m, c) = view();
        m.observed(&[node(1), node(2)], c.at(0.0));
        // Reads fail for 20 s (the store is paused): none is reported, nothing concluded.
        assert_eq!(m.status(NodeId(2), 102), Liveness::Alive);
        // The first read after the stall sees node 2's refreshed key.
        m.observed(&[node(1), node(2)], c.at(20.0));
        assert_eq!(m.status(NodeId(2), 102), Liveness::Alive);
    }

    #[test]
    fn a_restart_makes_the_old_epoch_stale_at_once() {
        let (mut m, c) = view();
        m.observed(&[node(2)], c.at(0.0));
        let reborn = Announcement {
            epoch: 500,
            ..node(2)
        };
        m.announced_up(&reborn, c.at(1.0));
        assert_eq!(m.status(NodeId(2), 102), Liveness::Rebooted);
        assert_eq!(m.status(NodeId(2), 500), Liveness::Alive);
        // A late read of the old key does not bring the old life back.
        m.observed(&[node(2)], c.at(2.0));
        assert_eq!(m.status(NodeId(2), 102), Liveness::Rebooted);
        // Our own earlier life is stale too.
        assert_eq!(m.status(NodeId(1), 101), Liveness::Alive);
        assert_eq!(m.status(NodeId(1), 7), Liveness::Rebooted);
    }

    #[test]
    fn an_announced_shutdown_is_gone_at_once_until_a_new_epoch() {
        let (mut m, c) = view();
        m.observed(&[node(2)], c.at(0.0));
        m.announced_down(NodeId(2), 102);
        assert_eq!(m.status(NodeId(2), 102), Liveness::Gone);
        // Its key may still be read before it expires: still gone.
        m.observed(&[node(2)], c.at(1.0));
        assert_eq!(m.status(NodeId(2), 102), Liveness::Gone);
        let back = Announcement {
            epoch: 900,
            ..node(2)
        };
        m.observed(&[back], c.at(2.0));
        assert_eq!(m.status(NodeId(2), 900), Liveness::Alive);
    }

    #[test]
    fn a_node_never_seen_is_gone_only_once_reads_prove_it() {
        let (mut m, c) = view();
        m.observed(&[node(2)], c.at(0.0));
        // Node 9 owns bindings but was never seen: maybe its key is just late.
        assert_eq!(m.status(NodeId(9), 1), Liveness::Unknown);
        m.observed(&[node(2)], c.at(6.0));
        assert_eq!(m.status(NodeId(9), 1), Liveness::Gone);
    }

    #[test]
    fn the_lowest_alive_node_leads_and_the_next_takes_over() {
        let (mut a, c) = view();
        let mut b = Membership::new(NodeId(2), 102, DOWN);
        assert!(
            a.is_leader() && b.is_leader(),
            "alone, each does the chores"
        );
        for v in [&mut a, &mut b] {
            v.observed(&[node(1), node(2), node(3)], c.at(0.0));
        }
        assert!(a.is_leader());
        assert!(!b.is_leader());
        b.announced_down(NodeId(1), 101);
        assert!(b.is_leader());
    }
}
