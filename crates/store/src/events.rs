//! Live events (issue 20): what happened to a user's devices, calls and credentials, published
//! by the SIP side and the API as it happens and read by the API's server-sent event streams
//! (the dashboard) and the webhooks to CareFlow. In-process, bounded: a reader too slow to keep
//! up misses events (and is told so) rather than holding memory.

use tokio::sync::broadcast;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A device of the user registered (a new binding, or one on a new flow).
    DeviceRegistered,
    /// A device's binding ended (unregistered, expired, its connection closed, removed).
    DeviceUnregistered,
    /// A call to or from the user was answered.
    CallAnswered,
    /// A call to the user ended without being answered.
    CallMissed,
    /// A call of the user ended, answered or not (its disposition in the detail).
    CallEnded,
    /// The user's SIP credentials were created, rotated or revoked.
    CredentialsChanged,
}

impl EventKind {
    /// The event's name on the wire (SSE `event:`, webhook `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceRegistered => "device.registered",
            Self::DeviceUnregistered => "device.unregistered",
            Self::CallAnswered => "call.answered",
            Self::CallMissed => "call.missed",
            Self::CallEnded => "call.ended",
            Self::CredentialsChanged => "credentials.changed",
        }
    }
}

/// One event about one user.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveEvent {
    /// What happened.
    pub kind: EventKind,
    /// The user's address of record (`user@domain`).
    pub user: String,
    /// Unix milliseconds.
    pub at: u64,
    /// More about it (a call's id and parties, a device's transport), never a secret.
    pub detail: serde_json::Value,
    /// It happened on another node of the cluster (relayed over Redis).
    pub remote: bool,
}

impl LiveEvent {
    /// An event of now.
    pub fn now(kind: EventKind, user: impl Into<String>, detail: serde_json::Value) -> Self {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            kind,
            user: user.into(),
            at,
            detail,
            remote: false,
        }
    }

    /// The event as JSON (SSE data, webhook body).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.kind.as_str(),
            "user": self.user,
            "at": self.at,
            "detail": self.detail,
        })
    }
}

/// The events of this node, for its readers.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<LiveEvent>,
}

/// Events kept for a slow reader before it starts missing them.
const BACKLOG: usize = 4096;

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Events {
    /// Publishes `e` to every reader (none listening: dropped).
    pub fn publish(&self, e: LiveEvent) {
        let _ = self.tx.send(e);
    }

    /// Whether anyone reads the events (else building one is wasted work).
    pub fn has_readers(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A reader of the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
}

/// The bus channel live events cross between nodes on.
const CHANNEL: &str = "events";

impl LiveEvent {
    /// The event as published to the other nodes, naming the node it happened on.
    fn to_wire(&self, node: &str) -> String {
        serde_json::json!({"node": node, "event": self.to_json()}).to_string()
    }

    /// An event another node published (none: not ours to read, or not from another node).
    fn from_wire(text: &str, me: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("node")?.as_str()? == me {
            return None;
        }
        let e = v.get("event")?;
        let kind = [
            EventKind::DeviceRegistered,
            EventKind::DeviceUnregistered,
            EventKind::CallAnswered,
            EventKind::CallMissed,
            EventKind::CallEnded,
            EventKind::CredentialsChanged,
        ]
        .into_iter()
        .find(|k| Some(k.as_str()) == e.get("type").and_then(serde_json::Value::as_str))?;
        Some(Self {
            kind,
            user: e.get("user")?.as_str()?.to_string(),
            at: e.get("at")?.as_u64()?,
            detail: e.get("detail").cloned().unwrap_or_default(),
            remote: true,
        })
    }
}

/// Makes the events of every node of a cluster this node's too: what happens here is published
/// on the Redis bus, what the others publish is handed to this node's readers marked
/// [`LiveEvent::remote`] (event streams show it; webhooks leave it to the node it happened on,
/// so CareFlow gets each event once). Best effort, as the bus is: an event published while a
/// node is cut off from Redis does not reach it.
pub async fn relay(events: Events, bus: crate::redis::bus::Bus, node: String) {
    let mut local = events.subscribe();
    let mut remote = bus.subscribe(&[CHANNEL]);
    loop {
        tokio::select! {
            e = local.recv() => match e {
                Ok(e) if !e.remote => {
                    if let Err(err) = bus.publish(CHANNEL, &e.to_wire(&node)).await {
                        tracing::warn!(error = %err, event = e.kind.as_str(), "a live event did not reach the other nodes");
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            m = remote.recv() => match m {
                Some((_, payload)) => {
                    if let Some(e) = LiveEvent::from_wire(&payload, &node) {
                        events.publish(e);
                    }
                }
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_get_what_is_published_after_they_subscribe() {
        let ev = Events::default();
        ev.publish(LiveEvent::now(
            EventKind::CallMissed,
            "a@b",
            serde_json::Value::Null,
        ));
        let mut r = ev.subscribe();
        ev.publish(LiveEvent::now(
            EventKind::DeviceRegistered,
            "2001@ward.test",
            serde_json::json!({"transport": "udp"}),
        ));
        let e = r.recv().await.unwrap();
        assert_eq!(e.kind, EventKind::DeviceRegistered);
        assert_eq!(e.to_json()["type"], "device.registered");
        assert_eq!(e.to_json()["detail"]["transport"], "udp");
    }

    #[test]
    fn events_cross_to_other_nodes_marked_remote_and_never_come_back() {
        let e = LiveEvent::now(
            EventKind::CallMissed,
            "2001@ward.test",
            serde_json::json!({"callId": "c1"}),
        );
        let wire = e.to_wire("node-a");
        let there = LiveEvent::from_wire(&wire, "node-b").unwrap();
        assert!(there.remote);
        assert_eq!(
            (there.kind, there.user.as_str(), there.at, &there.detail),
            (e.kind, e.user.as_str(), e.at, &e.detail)
        );
        assert_eq!(LiveEvent::from_wire(&wire, "node-a"), None, "its own echo");
        assert_eq!(LiveEvent::from_wire("{}", "node-b"), None);
    }
}
