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
use careflow_core::guard::Guard;
use careflow_proto::NameAddr;
use careflow_store::redis::nodes::{self, NodeEvent};
use tokio::sync::mpsc;
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
    /// Another node, at its internal link (TCP or TLS).
    At(SocketAddr, careflow_core::Transport),
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
    /// Set once the stop is announced: the key is not refreshed any more.
    left: std::sync::atomic::AtomicBool,
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
            left: Default::default(),
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
        crate::interfaces::record_route_at(self.link_transport(), self.address, Some(&token))
    }

    /// The transport of our internal link.
    pub(crate) fn link_transport(&self) -> careflow_core::Transport {
        if self.cfg.tls {
            careflow_core::Transport::Tls
        } else {
            careflow_core::Transport::Tcp
        }
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
                // The owner's own setting, as its route says (nodes may differ while
                // CLUSTER_TLS is being rolled out).
                let transport = match na.uri.params.get("transport").flatten() {
                    Some(t) => t.parse().unwrap_or(careflow_core::Transport::Tcp),
                    None => careflow_core::Transport::Tcp,
                };
                let port = na.uri.port.unwrap_or(5060);
                match na.uri.host.ip() {
                    Some(ip) => Owner::At(SocketAddr::new(ip, port), transport),
                    None => Owner::Lost,
                }
            }
            Liveness::Gone | Liveness::Rebooted => Owner::Lost,
        }
    }

    /// How many nodes are alive (this one included).
    pub(crate) fn alive(&self) -> usize {
        self.with_view(|v| v.alive().len()).unwrap_or(1)
    }

    /// What this node knows of `node`'s life in boot epoch `epoch`.
    pub(crate) fn liveness(&self, node: NodeId, epoch: u64) -> Liveness {
        match self.view.lock() {
            Ok(v) => v.status(node, epoch),
            Err(p) => p.into_inner().status(node, epoch),
        }
    }

    /// Whether `ip` is the address of a node that is gone: our Record-Route entries of a dialog
    /// it was part of lead nowhere now.
    pub(crate) fn is_gone_ip(&self, ip: std::net::IpAddr) -> bool {
        self.with_view(|v| v.is_gone_ip(ip)).unwrap_or(false)
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

    /// Keeps this node's liveness key fresh and the view current until `cancel`, and shares
    /// bans with the other nodes; then announces the stop and removes the key, so the others
    /// stop routing to us at once. The other nodes pass `guard` unlimited while they are
    /// members.
    /// Registrations of new flows on other nodes are passed to `heard.registered` (late
    /// forking), their lamp lists to `heard.lamps`.
    pub(crate) async fn run(
        self: Arc<Self>,
        guard: Option<Arc<Guard>>,
        heard: Heard,
        cancel: CancellationToken,
    ) {
        let me = self.announcement();
        let mut news = self
            .cfg
            .bus
            .subscribe(&[nodes::CHANNEL, BANS, REGISTERED, LAMPS]);
        if let Some(g) = &guard {
            g.share();
        }
        self.publish(nodes::CHANNEL, NodeEvent::Up(me.clone()).encode())
            .await;
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = Watch {
            healthy: true,
            alive: Vec::new(),
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.refresh(&me, &mut watch).await;
                    self.report(&mut watch, guard.as_deref());
                    if let Some(g) = &guard {
                        self.share_bans(g).await;
                    }
                }
                Some((channel, payload)) = news.recv() => {
                    if channel == REGISTERED {
                        self.heard_registration(&payload, &heard.registered);
                    } else if channel == LAMPS {
                        if !payload.starts_with(&self.lamp_prefix()) {
                            // Full: the next list of that user repairs it.
                            let _ = heard.lamps.try_send(payload);
                        }
                    } else {
                        self.heard(&channel, &payload, guard.as_deref());
                        self.report(&mut watch, guard.as_deref());
                    }
                }
            }
        }
        self.leave().await;
    }

    /// Announces this node's stop and removes its liveness key (once): the others skip its
    /// devices at once. Called when the drain starts, and at the end in any case.
    pub(crate) async fn leave(&self) {
        if self.left.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let me = self.announcement();
        self.publish(nodes::CHANNEL, NodeEvent::Down(me.clone()).encode())
            .await;
        match self.cfg.nodes.withdraw(&me).await {
            Ok(()) => tracing::info!("left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "could not remove this node's liveness key; it expires by itself")
            }
        }
    }

    /// Refreshes our key and reads every node's.
    async fn refresh(&self, me: &Announcement, watch: &mut Watch) {
        let announced = if self.left.load(std::sync::atomic::Ordering::Acquire) {
            Ok(())
        } else {
            self.cfg.nodes.announce(me, KEY_TTL).await
        };
        let read = match announced {
            Ok(()) => self.cfg.nodes.read().await,
            Err(e) => Err(e),
        };
        match read {
            Ok(live) => {
                if !watch.healthy {
                    tracing::info!("cluster liveness keys readable again");
                    watch.healthy = true;
                }
                self.with_view(|v| v.observed(&live, Instant::now()));
            }
            Err(e) => {
                // Nothing is concluded from a failed read (see Membership).
                if watch.healthy {
                    tracing::warn!(error = %e, "cluster liveness keys unavailable; keeping the last view");
                    watch.healthy = false;
                }
            }
        }
    }

    /// Logs a change of the nodes alive and tells the guard who the members are.
    fn report(&self, watch: &mut Watch, guard: Option<&Guard>) {
        let Some((alive, peers, addresses)) = self.with_view(|v| {
            let alive = v.alive();
            let addresses: Vec<String> = alive
                .iter()
                .map(|n| {
                    v.address(*n)
                        .map_or(self.address.to_string(), str::to_string)
                })
                .collect();
            (alive, v.member_ips(), addresses)
        }) else {
            return;
        };
        if let Some(g) = guard {
            g.set_peers(peers);
        }
        if alive != watch.alive {
            tracing::info!(nodes = alive.len(), members = ?addresses, "cluster membership changed");
            watch.alive = alive;
        }
    }

    /// An announcement of another node (or our own, coming back: ignored).
    fn heard(&self, channel: &str, payload: &str, guard: Option<&Guard>) {
        if channel == nodes::CHANNEL {
            match NodeEvent::parse(payload) {
                Some(NodeEvent::Up(a)) => {
                    self.with_view(|v| v.announced_up(&a, Instant::now()));
                }
                Some(NodeEvent::Down(a)) if a.node != self.me => {
                    tracing::info!(node = %a.address, "a node announced its stop");
                    self.with_view(|v| v.announced_down(a.node, a.epoch));
                }
                Some(NodeEvent::Down(_)) => {}
                None => tracing::warn!("unreadable cluster node announcement ignored"),
            }
        } else if channel == BANS
            && let Some(g) = guard
        {
            match shared_ban::parse(payload) {
                Some((from, _)) if from == self.me => {}
                Some((_, decision)) => g.apply_shared(decision, Instant::now()),
                None => tracing::warn!("unreadable shared ban ignored"),
            }
        }
    }

    /// Tells the other nodes that `aor` registered a new flow here: a call to it ringing
    /// there gains a branch. Sent in the background; a lost message only means no late branch.
    pub(crate) fn registered(&self, aor: &str) {
        let bus = self.cfg.bus.clone();
        let payload = serde_json::json!({ "node": self.me.to_string(), "aor": aor }).to_string();
        tokio::spawn(async move {
            if let Err(e) = bus.publish(REGISTERED, &payload).await {
                tracing::debug!(error = %e, "registration not announced to the cluster");
            }
        });
    }

    fn heard_registration(&self, payload: &str, registered: &mpsc::Sender<String>) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
            return;
        };
        let from = v.get("node").and_then(|n| n.as_str());
        if from.and_then(|n| n.parse::<NodeId>().ok()) == Some(self.me) {
            return;
        }
        if let Some(aor) = v.get("aor").and_then(|a| a.as_str()) {
            // Full: late forking is best effort, the registration itself is stored.
            let _ = registered.try_send(aor.to_string());
        }
    }

    /// The start of this node's lamp messages (`{"node":"ID",`): ours come back and are
    /// skipped by it.
    pub(crate) fn lamp_prefix(&self) -> String {
        format!("{{\"node\":\"{}\",", self.me)
    }

    /// Publishes a user's lamp list (built by `blf::share`, starting with [`Self::lamp_prefix`])
    /// in the background; a lost one is repaired by the next.
    pub(crate) fn publish_lamps(&self, payload: String) {
        let bus = self.cfg.bus.clone();
        tokio::spawn(async move {
            if let Err(e) = bus.publish(LAMPS, &payload).await {
                tracing::debug!(error = %e, "lamp state not shared with the cluster");
            }
        });
    }

    /// Publishes the bans and unbans made here since the last round.
    async fn share_bans(&self, guard: &Guard) {
        for decision in guard.take_shared() {
            self.publish(BANS, shared_ban::encode(self.me, decision))
                .await;
        }
    }

    async fn publish(&self, channel: &str, payload: String) {
        if let Err(e) = self.cfg.bus.publish(channel, &payload).await {
            tracing::debug!(error = %e, channel, "cluster announcement not published");
        }
    }

    fn with_view<R>(&self, f: impl FnOnce(&mut Membership) -> R) -> Option<R> {
        self.view.lock().ok().map(|mut v| f(&mut v))
    }
}

/// What the run loop remembers between rounds (for its logs).
struct Watch {
    healthy: bool,
    alive: Vec<NodeId>,
}

/// The pub/sub channel of bans, unbans and failed guesses.
const BANS: &str = "bans";
/// The pub/sub channel of registrations of new flows (not refreshes): `{"node", "aor"}`.
/// One channel for every AoR: each node checks its own ringing calls, a map lookup.
const REGISTERED: &str = "registered";
/// Channel: a user's call legs on one node, for the busy lamps and presence shown by the
/// others.
const LAMPS: &str = "lamps";

/// Where [`Cluster::run`] passes what other nodes announce.
#[derive(Debug)]
pub(crate) struct Heard {
    /// AoRs registered on another node.
    pub(crate) registered: mpsc::Sender<String>,
    /// Lamp lists of other nodes (JSON, see `blf::share`).
    pub(crate) lamps: mpsc::Sender<String>,
}

/// Bans as published: which node made the decision (its own come back to it) and what.
mod shared_ban {
    use std::net::{IpAddr, SocketAddr};

    use careflow_core::cluster::NodeId;
    use careflow_core::guard::{BanReason, BanScope, Shared};
    use serde_json::{Value, json};

    pub(super) fn encode(from: NodeId, decision: Shared) -> String {
        let (op, scope, reason) = match decision {
            Shared::Ban(scope, reason) => ("ban", scope, Some(reason.as_str())),
            Shared::Unban(scope) => ("unban", scope, None),
            Shared::Guess(flow, user) => {
                return json!({ "node": from.to_string(), "op": "guess",
                               "scope": "flow", "addr": flow.to_string(), "user": user })
                .to_string();
            }
        };
        let (kind, addr) = match scope {
            BanScope::Flow(a) => ("flow", a.to_string()),
            BanScope::Site(ip) => ("site", ip.to_string()),
        };
        json!({ "node": from.to_string(), "op": op, "scope": kind, "addr": addr,
                "reason": reason })
        .to_string()
    }

    pub(super) fn parse(payload: &str) -> Option<(NodeId, Shared)> {
        let v: Value = serde_json::from_str(payload).ok()?;
        let from: NodeId = v.get("node")?.as_str()?.parse().ok()?;
        let addr = v.get("addr")?.as_str()?;
        let scope = match v.get("scope")?.as_str()? {
            "flow" => BanScope::Flow(addr.parse::<SocketAddr>().ok()?),
            "site" => BanScope::Site(addr.parse::<IpAddr>().ok()?),
            _ => return None,
        };
        let decision = match v.get("op")?.as_str()? {
            "ban" => {
                let reason = match v.get("reason")?.as_str()? {
                    "flood" => BanReason::Flood,
                    "brute_force" => BanReason::BruteForce,
                    "user_brute_force" => BanReason::UserBruteForce,
                    "connections" => BanReason::Connections,
                    _ => return None,
                };
                Shared::Ban(scope, reason)
            }
            "unban" => Shared::Unban(scope),
            "guess" => match scope {
                BanScope::Flow(flow) => Shared::Guess(flow, v.get("user")?.as_str()?.to_string()),
                BanScope::Site(_) => return None,
            },
            _ => return None,
        };
        Some((from, decision))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn bans_round_trip_and_junk_is_refused() {
            let node = NodeId(0xabc);
            for d in [
                Shared::Ban(
                    BanScope::Flow("198.51.100.7:5060".parse().expect("addr")),
                    BanReason::BruteForce,
                ),
                Shared::Ban(
                    BanScope::Site("2001:db8::".parse().expect("ip")),
                    BanReason::Flood,
                ),
                Shared::Unban(BanScope::Site("198.51.100.7".parse().expect("ip"))),
                Shared::Guess("198.51.100.7:5060".parse().expect("addr"), "alice".into()),
            ] {
                assert_eq!(parse(&encode(node, d.clone())), Some((node, d)));
            }
            assert_eq!(parse("{}"), None);
            assert_eq!(
                parse(r#"{"node":"1","op":"ban","scope":"flow","addr":"x","reason":"flood"}"#),
                None
            );
        }
    }
}
