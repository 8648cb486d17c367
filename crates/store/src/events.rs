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

    /// A reader of the events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
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
}
