//! This node as a member of a cluster (`CLUSTER_ADDRESS`): its identity (node id, boot epoch),
//! the owner routes it writes into bindings of devices only it can reach, and its view of
//! which nodes are alive, kept current from the liveness keys in Redis
//! (`careflow_store::redis::nodes`) by [`Cluster::run`]. The decisions are
//! `careflow_core::cluster`'s; this module does the I/O and answers the proxy's questions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use careflow_core::cluster::{Announcement, Liveness, Membership, NodeId, OwnerToken};
use careflow_core::flow::Flow;
use careflow_proto::NameAddr;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;

/// A node's liveness key lives this long unless refreshed: longer than any Redis stall we
/// ride out (a paused Redis does not expire keys meanwhile, but a node cut off from it for
/// longer is rightly taken for dead).
const KEY_TTL: Duration = Duration::from_secs(5);
/// How often the key is refreshed and every key read.
const REFRESH: Duration = Duration::from_secs(1);
/// A node not seen by successful reads for this long is gone.
const DOWN_AFTER: Duration = Duration::from_secs(2);

/// Where a device whose binding has an owner route is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This very process holds the flow.
    Here(Flow),
    /// Another node, at its internal link.
    At(SocketAddr),
    /// The owner is gone or has restarted (the flow died with it), or the route is not one
    /// of ours (a rotated-out key): the binding is skipped.
    Lost,
}

/// This node's part in the cluster.
pub(crate) struct Cluster {
    me: NodeId,
    epoch: u64,
    address: SocketAddr,
    cfg: ClusterConfig,
    view: Mutex<Membership>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("address", &self.address)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// This node in boot epoch `epoch` (unix milliseconds at start: a new one every start).
    pub(crate) fn new(cfg: ClusterConfig, epoch: u64) -> Self {
        let me = NodeId::of_address(&cfg.address.to_string());
        Self {
            me,
            epoch,
            address: cfg.address,
            view: Mutex::new(Membership::new(me, epoch, DOWN_AFTER)),
            cfg,
        }
    }

    /// The internal link's address (`CLUSTER_ADDRESS`).
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    fn announcement(&self) -> Announcement {
        Announcement {
            node: self.me,
            epoch: self.epoch,
            address: self.address.to_string(),
        }
    }

    /// The route other nodes take to reach a device over `flow`, held by this process.
    pub(crate) fn route_for(&self, flow: Flow) -> String {
        let token = OwnerToken {
            node: self.me,
            epoch: self.epoch,
            flow,
        }
        .encode(&self.cfg.keys);
        crate::interfaces::record_route_at(
            careflow_core::Transport::Tcp,
            self.address,
            Some(&token),
        )
    }

    /// The owner token of a URI user part, when it is one signed with our keys.
    pub(crate) fn token(&self, user: &str) -> Option<OwnerToken> {
        OwnerToken::decode(user, &self.cfg.keys)
    }

    /// Where the device behind the owner route `route` (a binding's) is reached.
    pub(crate) fn owner_of(&self, route: &str) -> Owner {
        let Some(na) = NameAddr::parse(route) else {
            return Owner::Lost;
        };
        let Some(token) = na.uri.user.and_then(|u| self.token(u)) else {
            return Owner::Lost;
        };
        if token.node == self.me {
            return if token.epoch == self.epoch {
                Owner::Here(token.flow)
            } else {
                Owner::Lost
            };
        }
        match self.liveness(token.node, token.epoch) {
            Liveness::Alive | Liveness::Unknown => {
                let port = na.uri.port.unwrap_or(5060);
                match na.uri.host.ip() {
                    Some(ip) => Owner::At(SocketAddr::new(ip, port)),
                    None => Owner::Lost,
                }
            }
            Liveness::Gone | Liveness::Rebooted => Owner::Lost,
        }
    }

    /// What this node knows of `node`'s life in boot epoch `epoch`.
    pub(crate) fn liveness(&self, node: NodeId, epoch: u64) -> Liveness {
        match self.view.lock() {
            Ok(v) => v.status(node, epoch),
            Err(p) => p.into_inner().status(node, epoch),
        }
    }

    /// Whether a token names this process (this node in this boot epoch).
    pub(crate) fn is_mine(&self, token: &OwnerToken) -> bool {
        token.node == self.me && token.epoch == self.epoch
    }

    /// Whether a token names an earlier life of this node.
    pub(crate) fn is_my_past(&self, token: &OwnerToken) -> bool {
        token.node == self.me && token.epoch < self.epoch
    }

    /// Whether a message that reached us at `local` from `source` came over the internal link
    /// from another node: only then are internal routes honoured.
    pub(crate) fn is_internal(&self, local: SocketAddr, source: SocketAddr) -> bool {
        local.port() == self.address.port()
            && (local.ip() == self.address.ip() || self.address.ip().is_unspecified())
            && self.view.lock().is_ok_and(|v| v.is_member_ip(source.ip()))
    }

    /// Keeps this node's liveness key fresh and the view current until `cancel`; then removes
    /// the key, so the others stop routing to us without waiting for it to expire.
    /// The other nodes pass `guard` unlimited while they are members.
    pub(crate) async fn run(
        self: Arc<Self>,
        guard: Option<Arc<careflow_core::guard::Guard>>,
        cancel: CancellationToken,
    ) {
        let me = self.announcement();
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut healthy = true;
        let mut alive = Vec::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let announced = self.cfg.nodes.announce(&me, KEY_TTL).await;
            let read = match announced {
                Ok(()) => self.cfg.nodes.read().await,
                Err(e) => Err(e),
            };
            match read {
                Ok(live) => {
                    if !healthy {
                        tracing::info!("cluster liveness keys readable again");
                        healthy = true;
                    }
                    let (now_alive, peers) = match self.view.lock() {
                        Ok(mut v) => {
                            v.observed(&live, Instant::now());
                            (v.alive(), v.member_ips())
                        }
                        Err(_) => continue,
                    };
                    if let Some(g) = &guard {
                        g.set_peers(peers);
                    }
                    if now_alive != alive {
                        let addresses: Vec<&str> = live
                            .iter()
                            .filter(|a| now_alive.contains(&a.node))
                            .map(|a| a.address.as_str())
                            .collect();
                        tracing::info!(nodes = now_alive.len(), members = ?addresses,
                            "cluster membership changed");
                        alive = now_alive;
                    }
                }
                Err(e) => {
                    // Nothing is concluded from a failed read (see Membership).
                    if healthy {
                        tracing::warn!(error = %e, "cluster liveness keys unavailable; keeping the last view");
                        healthy = false;
                    }
                }
            }
        }
        match self.cfg.nodes.withdraw(&me).await {
            Ok(()) => tracing::info!("left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "could not remove this node's liveness key; it expires by itself")
            }
        }
    }
}
