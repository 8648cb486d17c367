//! Lamps across a cluster: each node publishes, for a user whose calls changed there, the
//! full list of that user's legs it handles; the other nodes keep the latest list per node
//! and show the union. A full list per (node, user) makes every message idempotent and a lost
//! one repaired by the next; a list not refreshed within a TTL (its node died) is dropped.

use foldhash::{HashMap, HashMapExt};
use std::time::{Duration, Instant};

use super::{DialogState, Direction, Leg, NewLeg};

impl DialogState {
    /// The state named `s` (as [`DialogState::as_str`] writes it).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "trying" => Self::Trying,
            "proceeding" => Self::Proceeding,
            "early" => Self::Early,
            "confirmed" => Self::Confirmed,
            "terminated" => Self::Terminated,
            _ => return None,
        })
    }
}

impl Direction {
    /// The direction named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "initiator" => Some(Self::Initiator),
            "recipient" => Some(Self::Recipient),
            _ => None,
        }
    }
}

impl Leg {
    /// A leg as another node describes it: the call and its sides, the callee device's tag
    /// when known, and its state (no branches: that node settles them).
    pub fn reported(leg: NewLeg, to_tag: Option<String>, state: DialogState) -> Self {
        Leg {
            call_id: leg.call_id,
            direction: leg.direction,
            from_tag: leg.from_tag,
            to_tag,
            local: leg.local,
            remote: leg.remote,
            state,
            since: Instant::now(),
            branches: HashMap::new(),
            // Not one of this node's legs: never looked up by `seq`.
            seq: 0,
        }
    }
}

/// The legs other nodes handle, by user and node.
#[derive(Debug, Default)]
pub struct RemoteCalls {
    by_aor: HashMap<String, HashMap<String, (Vec<Leg>, Instant)>>,
}

impl RemoteCalls {
    /// `node` says `aor`'s legs there are `legs` now. Returns whether what it showed changed.
    pub fn replace(&mut self, node: &str, aor: &str, legs: Vec<Leg>, now: Instant) -> bool {
        let nodes = self.by_aor.entry(aor.to_string()).or_default();
        let same = nodes.get(node).is_some_and(|(before, _)| {
            before.len() == legs.len()
                && before.iter().zip(&legs).all(|(a, b)| {
                    a.call_id == b.call_id
                        && a.direction == b.direction
                        && a.state == b.state
                        && a.to_tag == b.to_tag
                })
        });
        if legs.is_empty() {
            nodes.remove(node);
            if nodes.is_empty() {
                self.by_aor.remove(aor);
            }
        } else {
            nodes.insert(node.to_string(), (legs, now));
        }
        !same
    }

    /// The legs of `aor` on the other nodes.
    pub fn legs<'a>(&'a self, aor: &str) -> impl Iterator<Item = &'a Leg> + 'a {
        self.by_aor
            .get(aor)
            .into_iter()
            .flat_map(|nodes| nodes.values().flat_map(|(legs, _)| legs.iter()))
    }

    /// Drops the lists not refreshed within `ttl` (their node stopped or died). Returns the
    /// users whose lamps changed.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<String> {
        let mut changed = Vec::new();
        self.by_aor.retain(|aor, nodes| {
            let before = nodes.len();
            nodes.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            if nodes.len() != before {
                changed.push(aor.clone());
            }
            !nodes.is_empty()
        });
        changed
    }
}

/// The legs a body shows: this node's and the others', one per call and side (a call relayed
/// through two nodes is known to both: the furthest state wins, `terminated` being final).
pub fn merged<'a>(local: &'a [Leg], remote: impl Iterator<Item = &'a Leg>) -> Vec<&'a Leg> {
    let mut out: Vec<&Leg> = local.iter().collect();
    for r in remote {
        match out
            .iter_mut()
            .find(|l| l.call_id == r.call_id && l.direction == r.direction)
        {
            Some(l) if r.state > l.state => *l = r,
            Some(_) => {}
            None => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Party;
    use super::*;

    fn leg(call_id: &str, state: DialogState) -> Leg {
        let call = NewLeg {
            call_id: call_id.into(),
            direction: Direction::Recipient,
            from_tag: "f".into(),
            local: Party::default(),
            remote: Party::default(),
        };
        Leg::reported(call, Some("t".into()), state)
    }

    #[test]
    fn other_nodes_legs_are_replaced_whole_merged_and_expire() {
        let t0 = Instant::now();
        let mut r = RemoteCalls::default();
        assert!(r.replace("b", "2001@w", vec![leg("c1", DialogState::Early)], t0));
        assert!(
            !r.replace("b", "2001@w", vec![leg("c1", DialogState::Early)], t0),
            "the same list again changes nothing"
        );
        assert!(r.replace("c", "2001@w", vec![leg("c2", DialogState::Confirmed)], t0));
        // This node relays c1 too, and knows it only as trying: the furthest state is shown.
        let local = vec![leg("c1", DialogState::Trying)];
        let shown = merged(&local, r.legs("2001@w"));
        let states: Vec<(&str, DialogState)> = shown
            .iter()
            .map(|l| (l.call_id.as_str(), l.state))
            .collect();
        assert_eq!(
            states,
            [("c1", DialogState::Early), ("c2", DialogState::Confirmed)]
        );
        // Node b's call ends: its list is empty.
        assert!(r.replace("b", "2001@w", vec![], t0));
        assert_eq!(r.legs("2001@w").count(), 1);
        // Node c stops refreshing: gone after the TTL.
        let ttl = Duration::from_secs(90);
        assert!(r.expire(t0 + Duration::from_secs(89), ttl).is_empty());
        assert_eq!(r.expire(t0 + ttl, ttl), ["2001@w".to_string()]);
        assert_eq!(r.legs("2001@w").count(), 0);
        assert_eq!(DialogState::parse("early"), Some(DialogState::Early));
        assert_eq!(Direction::parse("initiator"), Some(Direction::Initiator));
        assert_eq!(DialogState::parse("ringing"), None);
    }
}
