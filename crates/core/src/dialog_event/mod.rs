//! The dialog event package (RFC 4235) from the proxy's own calls, sans-IO: what a busy lamp
//! shows for a user, built from the call state the proxy already has (no PUBLISH loop, so no
//! early PUBLISH landing after `terminated`, no cancelled branch turning a ringing lamp off).
//!
//! - [`Calls`]: each user's call legs, fed by the proxy (a request forked, a branch's
//!   response, the call's end); a leg's state is the best of its branches, so one branch
//!   cancelled while another rings keeps it `early`, and `terminated` is final.
//! - [`info`]: the `application/dialog-info+xml` body of a NOTIFY.
//!
//! Issue 19: subscriptions, NOTIFY pacing and pickup build on these.

pub mod info;
pub mod pickup;
pub mod presence;
pub mod shared;
pub mod subscriptions;

use foldhash::{HashMap, HashMapExt};
use std::time::{Duration, Instant};

/// A dialog's state as RFC 4235 §3.7.1 names it, in the order a call goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DialogState {
    /// The INVITE went out; nothing came back yet.
    Trying,
    /// A provisional response without a To tag (100 aside).
    Proceeding,
    /// A provisional response with a To tag: it rings.
    Early,
    /// Answered.
    Confirmed,
    /// Over (answered and hung up, cancelled, refused).
    Terminated,
}

impl DialogState {
    /// The `<state>` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trying => "trying",
            Self::Proceeding => "proceeding",
            Self::Early => "early",
            Self::Confirmed => "confirmed",
            Self::Terminated => "terminated",
        }
    }
}

/// Which side of the call the watched user is on (`direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The user called (`initiator`).
    Initiator,
    /// The user is called (`recipient`).
    Recipient,
}

impl Direction {
    /// The `direction` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initiator => "initiator",
            Self::Recipient => "recipient",
        }
    }
}

/// One side of a dialog as the body shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Party {
    /// `<identity>`: the address-of-record (From or To URI).
    pub identity: String,
    /// Its display name, when given.
    pub display: Option<String>,
    /// `<target uri>`: where the party's device is (its Contact), when known.
    pub target: Option<String>,
}

/// One call of a watched user: what pickup (`Replaces`) needs and what the lamp shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    /// Call-ID.
    pub call_id: String,
    /// The user's side.
    pub direction: Direction,
    /// The caller's From tag.
    pub from_tag: String,
    /// The tag of the callee device that answered or rings (the first early branch's To tag
    /// until one answers), when there is one.
    pub to_tag: Option<String>,
    /// The watched user's side.
    pub local: Party,
    /// The other side.
    pub remote: Party,
    /// The best state of the leg's branches.
    pub state: DialogState,
    /// When the call started, for `duration` and ordering.
    pub since: Instant,
    branches: HashMap<String, (DialogState, Option<String>)>,
    /// Its place among the user's legs (they are kept in `seq` order): found by Call-ID through
    /// `by_call` without comparing the Call-ID of every other call of the user (a ward's main
    /// number has hundreds at a time).
    seq: u64,
}

impl Leg {
    /// The tag of the watched user's side (`local-tag`).
    pub fn local_tag(&self) -> Option<&str> {
        match self.direction {
            Direction::Initiator => Some(&self.from_tag),
            Direction::Recipient => self.to_tag.as_deref(),
        }
    }

    /// The other side's tag (`remote-tag`).
    pub fn remote_tag(&self) -> Option<&str> {
        match self.direction {
            Direction::Initiator => self.to_tag.as_deref(),
            Direction::Recipient => Some(&self.from_tag),
        }
    }

    /// The dialog `id`: unique per leg and user, stable for its life.
    pub fn id(&self) -> String {
        format!("{}-{}", self.direction.as_str(), self.call_id)
    }

    fn settle(&mut self) {
        if self.state == DialogState::Terminated {
            return;
        }
        let best = self
            .branches
            .values()
            .filter(|(s, _)| *s != DialogState::Terminated)
            .max_by_key(|(s, _)| *s);
        if let Some((s, tag)) = best {
            self.state = *s;
            if tag.is_some() {
                self.to_tag = tag.clone();
            }
        }
    }
}

/// A new call leg of a user: the call's identity and its two sides.
#[derive(Debug, Clone)]
pub struct NewLeg {
    /// Call-ID.
    pub call_id: String,
    /// The user's side.
    pub direction: Direction,
    /// The caller's From tag.
    pub from_tag: String,
    /// The user's side (its identity, its device when it called).
    pub local: Party,
    /// The other side.
    pub remote: Party,
}

/// How long a terminated leg is still listed (so a NOTIFY can say `terminated` once) before
/// it is forgotten.
pub const TERMINATED_KEPT: Duration = Duration::from_secs(32);

/// At most this many terminated legs are listed per user (the latest).
pub const MAX_TERMINATED_KEPT: usize = 4;

/// Every watched user's call legs, by AoR (`user@domain`).
#[derive(Debug, Default)]
pub struct Calls {
    by_aor: HashMap<String, Vec<Leg>>,
    /// The legs of each call (their AoR and `seq`): a response touches only those, however
    /// many calls there are.
    by_call: HashMap<String, Vec<(String, u64)>>,
    next_seq: u64,
}

impl Calls {
    /// A call of `aor` started (an INVITE forked for or from it). Returns false when the leg
    /// is known already (a retransmission, a challenged INVITE sent again).
    pub fn start(&mut self, aor: &str, leg: NewLeg, now: Instant) -> bool {
        let known = self.by_call.entry(leg.call_id.clone()).or_default();
        let legs = self.by_aor.entry(aor.to_string()).or_default();
        let again = known.iter().any(|(a, seq)| {
            a == aor && find(legs, *seq).is_some_and(|l| l.direction == leg.direction)
        });
        if again {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        known.push((aor.to_string(), seq));
        legs.push(Leg {
            call_id: leg.call_id,
            direction: leg.direction,
            from_tag: leg.from_tag,
            to_tag: None,
            local: leg.local,
            remote: leg.remote,
            state: DialogState::Trying,
            since: now,
            branches: HashMap::new(),
            seq,
        });
        true
    }

    /// A response on `branch` of the call `call_id` (code, and its To tag): every leg of the
    /// call moves with it. Returns the AoRs whose lamps changed.
    pub fn response(
        &mut self,
        call_id: &str,
        branch: &str,
        code: u16,
        to_tag: Option<&str>,
        target: Option<&str>,
    ) -> Vec<String> {
        let state = match code {
            100 => DialogState::Trying,
            101..=199 if to_tag.is_some() => DialogState::Early,
            101..=199 => DialogState::Proceeding,
            200..=299 => DialogState::Confirmed,
            _ => DialogState::Terminated,
        };
        self.each_leg(call_id, |leg| {
            if leg.state == DialogState::Terminated {
                return false;
            }
            let before = (leg.state, leg.to_tag.clone());
            let entry = leg
                .branches
                .entry(branch.to_string())
                .or_insert((DialogState::Trying, None));
            // A branch only moves forward (a late 180 after the 200 changes nothing).
            if state > entry.0 {
                *entry = (state, to_tag.map(str::to_string));
            }
            if state == DialogState::Confirmed {
                // The answering device is the call's: its tag and target from now on.
                leg.to_tag = to_tag.map(str::to_string);
                if let Some(t) = target {
                    match leg.direction {
                        Direction::Recipient => leg.local.target = Some(t.to_string()),
                        Direction::Initiator => leg.remote.target = Some(t.to_string()),
                    }
                }
                leg.state = DialogState::Confirmed;
            }
            leg.settle();
            before != (leg.state, leg.to_tag.clone())
        })
    }

    /// The call `call_id` ended (its final non-2xx went up, a BYE, a CANCEL answered): its
    /// legs are `terminated`, for good. Returns the AoRs whose lamps changed.
    pub fn end(&mut self, call_id: &str, now: Instant) -> Vec<String> {
        let changed = self.each_leg(call_id, |leg| {
            if leg.state == DialogState::Terminated {
                return false;
            }
            leg.state = DialogState::Terminated;
            leg.since = now;
            true
        });
        // A busy line (a ward's main number) ends many calls within TERMINATED_KEPT: only the
        // latest few are listed, or every body would grow with them (past what a UDP NOTIFY
        // can carry).
        for aor in &changed {
            if let Some(legs) = self.by_aor.get_mut(aor) {
                let ended = legs
                    .iter()
                    .filter(|l| l.state == DialogState::Terminated)
                    .count();
                let mut drop = ended.saturating_sub(MAX_TERMINATED_KEPT);
                legs.retain(|l| {
                    if drop > 0 && l.state == DialogState::Terminated {
                        drop -= 1;
                        return false;
                    }
                    true
                });
            }
        }
        changed
    }

    /// The legs of `aor` now, oldest first (terminated ones for [`TERMINATED_KEPT`]).
    pub fn legs(&self, aor: &str) -> &[Leg] {
        self.by_aor.get(aor).map_or(&[], Vec::as_slice)
    }

    /// The ringing (early) leg of the call `call_id` where `aor` is called, for pickup.
    pub fn ringing(&self, aor: &str, call_id: &str) -> Option<&Leg> {
        self.legs_of_call(call_id).find_map(|(a, l)| {
            (a == aor && l.direction == Direction::Recipient && l.state < DialogState::Confirmed)
                .then_some(l)
        })
    }

    /// The users with a leg not terminated.
    pub fn active_aors(&self) -> Vec<String> {
        self.by_aor
            .iter()
            .filter(|(_, legs)| legs.iter().any(|l| l.state != DialogState::Terminated))
            .map(|(aor, _)| aor.clone())
            .collect()
    }

    /// Whether any leg of the call `call_id` is still listed.
    pub fn knows(&self, call_id: &str) -> bool {
        self.by_call.contains_key(call_id)
    }

    /// Forgets terminated legs older than [`TERMINATED_KEPT`].
    pub fn sweep(&mut self, now: Instant) {
        self.by_aor.retain(|_, legs| {
            legs.retain(|l| {
                l.state != DialogState::Terminated
                    || now.saturating_duration_since(l.since) < TERMINATED_KEPT
            });
            !legs.is_empty()
        });
        let by_aor = &self.by_aor;
        self.by_call.retain(|_, legs| {
            legs.retain(|(a, seq)| by_aor.get(a).is_some_and(|l| find(l, *seq).is_some()));
            !legs.is_empty()
        });
    }

    /// The legs of the call `call_id`, each with its AoR.
    fn legs_of_call<'a>(&'a self, call_id: &str) -> impl Iterator<Item = (&'a str, &'a Leg)> {
        self.by_call
            .get(call_id)
            .into_iter()
            .flatten()
            .filter_map(|(aor, seq)| Some((aor.as_str(), find(self.by_aor.get(aor)?, *seq)?)))
    }

    fn each_leg(&mut self, call_id: &str, mut f: impl FnMut(&mut Leg) -> bool) -> Vec<String> {
        let mut changed: Vec<String> = Vec::new();
        for (aor, seq) in self.by_call.get(call_id).into_iter().flatten() {
            let Some(leg) = self
                .by_aor
                .get_mut(aor)
                .and_then(|legs| find_mut(legs, *seq))
            else {
                continue;
            };
            // A user who calls itself has two legs of the call: one change each.
            if f(leg) && !changed.contains(aor) {
                changed.push(aor.clone());
            }
        }
        changed
    }
}

/// The leg `seq` among a user's legs (kept in `seq` order).
fn find(legs: &[Leg], seq: u64) -> Option<&Leg> {
    legs.binary_search_by_key(&seq, |l| l.seq)
        .ok()
        .map(|i| &legs[i])
}

fn find_mut(legs: &mut [Leg], seq: u64) -> Option<&mut Leg> {
    legs.binary_search_by_key(&seq, |l| l.seq)
        .ok()
        .map(|i| &mut legs[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(direction: Direction) -> NewLeg {
        NewLeg {
            call_id: "c1@192.0.2.1".into(),
            direction,
            from_tag: "ft".into(),
            local: Party {
                identity: "sip:2001@ward.test".into(),
                ..Party::default()
            },
            remote: Party {
                identity: "sip:2002@ward.test".into(),
                display: Some("Clerk".into()),
                target: Some("sip:2002@192.0.2.1:5060".into()),
            },
        }
    }

    fn call_with_id(call_id: &str, direction: Direction) -> NewLeg {
        NewLeg {
            call_id: call_id.into(),
            ..call(direction)
        }
    }

    #[test]
    fn a_busy_line_finds_each_call_among_hundreds_and_a_self_call_is_one_change() {
        let t0 = Instant::now();
        let mut c = Calls::default();
        let main = "2000@ward.test";
        for i in 0..300 {
            assert!(c.start(
                main,
                call_with_id(&format!("c{i}"), Direction::Recipient),
                t0
            ));
        }
        // Calls end out of order; the others keep their state and place.
        for i in (0..300).step_by(3) {
            assert_eq!(c.end(&format!("c{i}"), t0), vec![main.to_string()]);
        }
        assert_eq!(
            c.response("c151", "b", 180, Some("desk"), None),
            vec![main.to_string()]
        );
        assert_eq!(
            c.response("c150", "b", 180, Some("desk"), None),
            Vec::<String>::new(),
            "c150 ended"
        );
        assert!(c.ringing(main, "c151").is_some());
        assert!(
            c.ringing(main, "c152").is_some(),
            "not answered: may be picked up"
        );
        assert!(c.ringing(main, "c150").is_none(), "ended");
        assert!(!c.start(main, call_with_id("c151", Direction::Recipient), t0));
        let legs = c.legs(main);
        let ended = legs
            .iter()
            .filter(|l| l.state == DialogState::Terminated)
            .count();
        assert_eq!(ended, MAX_TERMINATED_KEPT);
        assert_eq!(legs.len(), 200 + MAX_TERMINATED_KEPT);
        assert!(legs.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
        // A user calling itself has both legs of the call.
        let me = "2001@ward.test";
        assert!(c.start(me, call_with_id("self", Direction::Initiator), t0));
        assert!(c.start(me, call_with_id("self", Direction::Recipient), t0));
        assert_eq!(
            c.response("self", "b", 180, Some("t"), None),
            vec![me.to_string()]
        );
        assert_eq!(
            c.legs(me)
                .iter()
                .filter(|l| l.state == DialogState::Early)
                .count(),
            2
        );
        assert_eq!(c.end("self", t0), vec![me.to_string()]);
        // Once swept, a call is forgotten everywhere.
        c.sweep(t0 + TERMINATED_KEPT);
        assert!(!c.knows("self") && !c.knows("c3") && c.knows("c151"));
        assert_eq!(c.legs(main).len(), 200);
        assert_eq!(c.end("c151", t0), vec![main.to_string()]);
    }

    #[test]
    fn a_forked_call_rings_while_any_branch_rings_and_terminated_is_final() {
        let t0 = Instant::now();
        let mut c = Calls::default();
        assert!(c.start("2001@ward.test", call(Direction::Recipient), t0));
        assert!(
            !c.start("2001@ward.test", call(Direction::Recipient), t0),
            "a retransmission is the same leg"
        );
        assert_eq!(c.legs("2001@ward.test")[0].state, DialogState::Trying);
        // Two devices ring.
        assert_eq!(
            c.response("c1@192.0.2.1", "b1", 180, Some("desk"), None),
            vec!["2001@ward.test".to_string()]
        );
        c.response("c1@192.0.2.1", "b2", 180, Some("mobile"), None);
        let leg = &c.legs("2001@ward.test")[0];
        assert_eq!(leg.state, DialogState::Early);
        assert!(leg.local_tag().is_some());
        assert_eq!(leg.remote_tag(), Some("ft"));
        // One branch is refused: the lamp still blinks.
        c.response("c1@192.0.2.1", "b2", 486, Some("mobile"), None);
        assert_eq!(c.legs("2001@ward.test")[0].state, DialogState::Early);
        assert_eq!(c.legs("2001@ward.test")[0].to_tag.as_deref(), Some("desk"));
        assert!(c.ringing("2001@ward.test", "c1@192.0.2.1").is_some());
        // The desk answers; a late 180 changes nothing.
        c.response(
            "c1@192.0.2.1",
            "b1",
            200,
            Some("desk"),
            Some("sip:2001@192.0.2.7:5060"),
        );
        assert!(
            c.response("c1@192.0.2.1", "b1", 180, Some("desk"), None)
                .is_empty()
        );
        let leg = &c.legs("2001@ward.test")[0];
        assert_eq!(leg.state, DialogState::Confirmed);
        assert_eq!(leg.local.target.as_deref(), Some("sip:2001@192.0.2.7:5060"));
        assert!(c.ringing("2001@ward.test", "c1@192.0.2.1").is_none());
        // Hung up: terminated, and nothing brings it back.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(c.end("c1@192.0.2.1", t1).len(), 1);
        assert!(c.end("c1@192.0.2.1", t1).is_empty());
        assert!(
            c.response("c1@192.0.2.1", "b1", 200, Some("desk"), None)
                .is_empty()
        );
        assert_eq!(c.legs("2001@ward.test")[0].state, DialogState::Terminated);
        c.sweep(t1 + TERMINATED_KEPT - Duration::from_secs(1));
        assert_eq!(
            c.legs("2001@ward.test").len(),
            1,
            "kept for the last NOTIFY"
        );
        assert!(c.knows("c1@192.0.2.1"));
        c.sweep(t1 + TERMINATED_KEPT);
        assert!(c.legs("2001@ward.test").is_empty());
        assert!(!c.knows("c1@192.0.2.1"));
    }

    #[test]
    fn both_sides_of_a_call_between_two_watched_users_move_together() {
        let t0 = Instant::now();
        let mut c = Calls::default();
        c.start("2002@ward.test", call(Direction::Initiator), t0);
        c.start("2001@ward.test", call(Direction::Recipient), t0);
        let mut changed = c.response("c1@192.0.2.1", "b1", 183, Some("x"), None);
        changed.sort();
        assert_eq!(changed, vec!["2001@ward.test", "2002@ward.test"]);
        let caller = &c.legs("2002@ward.test")[0];
        assert_eq!(caller.local_tag(), Some("ft"));
        assert_eq!(caller.remote_tag(), Some("x"));
        assert_eq!(caller.id(), "initiator-c1@192.0.2.1");
        // 100 Trying and a tagless 180 keep it before early.
        let mut c = Calls::default();
        c.start("2001@ward.test", call(Direction::Recipient), t0);
        c.response("c1@192.0.2.1", "b1", 100, None, None);
        assert_eq!(c.legs("2001@ward.test")[0].state, DialogState::Trying);
        c.response("c1@192.0.2.1", "b1", 180, None, None);
        assert_eq!(c.legs("2001@ward.test")[0].state, DialogState::Proceeding);
    }

    #[test]
    fn a_busy_line_lists_only_its_latest_ended_calls() {
        let t0 = Instant::now();
        let mut c = Calls::default();
        c.start(
            "2001@ward.test",
            NewLeg {
                call_id: "up".into(),
                ..call(Direction::Recipient)
            },
            t0,
        );
        c.response("up", "b", 200, Some("t"), None);
        for n in 0..10 {
            let id = format!("c{n}");
            c.start(
                "2001@ward.test",
                NewLeg {
                    call_id: id.clone(),
                    ..call(Direction::Recipient)
                },
                t0,
            );
            c.end(&id, t0);
        }
        let ids: Vec<&str> = c
            .legs("2001@ward.test")
            .iter()
            .map(|l| l.call_id.as_str())
            .collect();
        assert_eq!(ids, ["up", "c6", "c7", "c8", "c9"]);
    }
}
