//! Lamps across a cluster (issue 19): a user's calls may go through any node, and a phone's
//! subscription lives on the node it subscribed to. Every node publishes, for each of its
//! users whose legs changed, the whole list of that user's legs it handles (Redis pub/sub,
//! `Cluster::publish_lamps`); every node shows its own legs and the latest list of each other
//! node (`careflow_core::dialog_event::shared`). Lists with a leg still up are published again
//! every [`REPUBLISH`]; one not heard of within [`REMOTE_TTL`] (its node died) is dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_core::dialog_event::{DialogState, Direction, Leg, NewLeg, Party};
use serde_json::{Value, json};

use crate::app::App;

/// How often a node publishes again the lists of its users with a call up.
pub(crate) const REPUBLISH: Duration = Duration::from_secs(30);
/// A list not refreshed this long is dropped (three republishes missed).
pub(crate) const REMOTE_TTL: Duration = Duration::from_secs(95);

fn party_json(p: &Party) -> Value {
    json!({ "identity": p.identity, "display": p.display, "target": p.target })
}

fn party_of(v: &Value) -> Option<Party> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some(Party {
        identity: text("identity")?,
        display: text("display"),
        target: text("target"),
    })
}

fn leg_json(l: &Leg) -> Value {
    json!({
        "call_id": l.call_id,
        "direction": l.direction.as_str(),
        "from_tag": l.from_tag,
        "to_tag": l.to_tag,
        "state": l.state.as_str(),
        "local": party_json(&l.local),
        "remote": party_json(&l.remote),
    })
}

fn leg_of(v: &Value) -> Option<Leg> {
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    let call = NewLeg {
        call_id: text("call_id")?.to_string(),
        direction: Direction::parse(text("direction")?)?,
        from_tag: text("from_tag")?.to_string(),
        local: party_of(v.get("local")?)?,
        remote: party_of(v.get("remote")?)?,
    };
    Some(Leg::reported(
        call,
        text("to_tag").map(str::to_string),
        DialogState::parse(text("state")?)?,
    ))
}

impl App {
    /// Publishes the lists of `aors` (their legs on this node) to the other nodes.
    pub(crate) fn share_lamps(&self, aors: &[String]) {
        let Some(c) = &self.cluster else { return };
        if aors.is_empty() {
            return;
        }
        let payloads: Vec<String> = {
            let Ok(w) = self.watchers.lock() else { return };
            aors.iter()
                .map(|aor| {
                    let legs: Vec<Value> = w.calls.legs(aor).iter().map(leg_json).collect();
                    // The node first: `Cluster::lamp_prefix` recognises our own.
                    format!(
                        "{}\"aor\":{},\"legs\":{}}}",
                        c.lamp_prefix(),
                        Value::from(aor.as_str()),
                        Value::from(legs)
                    )
                })
                .collect()
        };
        for p in payloads {
            c.publish_lamps(p);
        }
    }

    /// Publishes again the lists of the users with a leg up here (their TTL on the others).
    pub(crate) fn republish_lamps(&self) {
        if self.cluster.is_none() {
            return;
        }
        let aors: Vec<String> = match self.watchers.lock() {
            Ok(w) => w.calls.active_aors(),
            Err(_) => return,
        };
        self.share_lamps(&aors);
    }

    /// A list another node published: what its subscriptions here show changes.
    fn heard_lamps(&self, payload: &str) {
        let Ok(v) = serde_json::from_str::<Value>(payload) else {
            tracing::warn!("unreadable lamp state from another node ignored");
            return;
        };
        let (Some(node), Some(aor), Some(legs)) = (
            v.get("node").and_then(Value::as_str),
            v.get("aor").and_then(Value::as_str),
            v.get("legs").and_then(Value::as_array),
        ) else {
            tracing::warn!("incomplete lamp state from another node ignored");
            return;
        };
        let legs: Vec<Leg> = legs.iter().filter_map(leg_of).collect();
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        if w.remote.replace(node, aor, legs, Instant::now()) {
            w.subs.changed(aor);
        }
    }

    /// Drops the lists of nodes not heard of within [`REMOTE_TTL`].
    pub(crate) fn expire_remote_lamps(&self, now: Instant) {
        if let Ok(mut w) = self.watchers.lock() {
            for aor in w.remote.expire(now, REMOTE_TTL) {
                w.subs.changed(&aor);
            }
        }
    }
}

/// Applies the lamp lists other nodes publish, as they come.
pub(crate) async fn lamps_of_other_nodes(
    app: Arc<App>,
    mut lists: tokio::sync::mpsc::Receiver<String>,
) {
    while let Some(p) = lists.recv().await {
        app.heard_lamps(&p);
    }
}
