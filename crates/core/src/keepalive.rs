//! OPTIONS keep-alives for devices behind NAT: which bindings to probe in a round, which
//! missed too many answers, and the branch that recognises an answer. The server sends the
//! probes and removes the dead bindings.

use std::collections::HashMap;
use std::time::Duration;

use crate::Binding;

/// Branch prefix of our keep-alive OPTIONS; their answers are recognised by it.
pub const BRANCH_PREFIX: &str = "z9hG4bKcfka";

/// Keep-alive settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveConfig {
    /// Time between two OPTIONS to one device; zero disables keep-alives.
    pub interval: Duration,
    /// Unanswered OPTIONS in a row after which the binding is removed.
    pub max_failures: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            max_failures: 3,
        }
    }
}

/// Per-binding probe state: sans-IO, driven by [`Tracker::round`] and [`Tracker::answered`].
#[derive(Debug, Default)]
pub struct Tracker {
    probes: HashMap<u64, Probe>,
    round: u64,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    /// Round of the last OPTIONS sent.
    sent: u64,
    /// Whether it was answered.
    answered: bool,
    /// Unanswered in a row.
    failures: u32,
}

/// What one round decides.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Bindings to probe now, with the round number for the branch.
    pub probe: Vec<u64>,
    /// Bindings that missed too many answers.
    pub dead: Vec<u64>,
    /// This round's number.
    pub number: u64,
}

impl Tracker {
    /// Starts a round over the bindings that need keep-alives now.
    pub fn round(&mut self, ids: impl IntoIterator<Item = u64>, max_failures: u32) -> Round {
        self.round += 1;
        let mut out = Round {
            number: self.round,
            ..Round::default()
        };
        let mut next = HashMap::new();
        for id in ids {
            let mut p = self.probes.get(&id).copied().unwrap_or(Probe {
                sent: 0,
                answered: true,
                failures: 0,
            });
            if p.sent != 0 && !p.answered {
                p.failures += 1;
            }
            if p.failures >= max_failures {
                out.dead.push(id);
                continue;
            }
            p.sent = self.round;
            p.answered = false;
            next.insert(id, p);
            out.probe.push(id);
        }
        // Bindings no longer listed (gone, refreshed elsewhere) are forgotten.
        self.probes = next;
        out
    }

    /// An answer to the probe of `id` sent in `round` arrived.
    pub fn answered(&mut self, id: u64, round: u64) -> bool {
        match self.probes.get_mut(&id) {
            Some(p) if p.sent == round => {
                p.answered = true;
                p.failures = 0;
                true
            }
            _ => false,
        }
    }
}

/// Whether this node keeps a binding alive: a device behind NAT that registered through it.
pub fn needs_keepalive(b: &Binding) -> bool {
    b.here && b.behind_nat()
}

/// `(binding id, round)` from the branch of an answer to one of our keep-alives.
pub fn parse_branch(branch: &str) -> Option<(u64, u64)> {
    let rest = branch.strip_prefix(BRANCH_PREFIX)?;
    let (id, round) = rest.split_once('x')?;
    Some((id.parse().ok()?, round.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_probes_count_up_and_an_answer_resets_them() {
        let mut t = Tracker::default();
        let r1 = t.round([7, 8], 3);
        assert_eq!(r1.probe, vec![7, 8]);
        assert!(t.answered(7, r1.number));
        assert!(
            !t.answered(7, r1.number + 5),
            "answers to old rounds are ignored"
        );
        let r2 = t.round([7, 8], 3);
        assert!(r2.dead.is_empty());
        let r3 = t.round([7, 8], 3);
        assert!(r3.dead.is_empty());
        t.answered(7, r3.number);
        let r4 = t.round([7, 8], 3);
        // 8 never answered: rounds 1, 2 and 3 missed.
        assert_eq!(r4.dead, vec![8]);
        assert_eq!(r4.probe, vec![7]);
    }

    #[test]
    fn bindings_that_left_are_forgotten() {
        let mut t = Tracker::default();
        t.round([1], 2);
        t.round([], 2);
        let r = t.round([1], 2);
        assert!(r.dead.is_empty());
        assert_eq!(r.probe, vec![1]);
    }

    #[test]
    fn branches_round_trip() {
        assert_eq!(parse_branch(&format!("{BRANCH_PREFIX}42x7")), Some((42, 7)));
        assert_eq!(parse_branch("z9hG4bKother"), None);
        assert_eq!(parse_branch(&format!("{BRANCH_PREFIX}42")), None);
    }
}
