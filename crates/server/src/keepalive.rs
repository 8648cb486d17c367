//! OPTIONS keep-alives for devices behind NAT on UDP.
//!
//! A NAT forgets a UDP mapping after tens of seconds of silence, and then calls to the device
//! vanish. Every interval, each NATed UDP binding gets an OPTIONS from the socket it registered
//! to; the traffic keeps the mapping open, and any answer (even an error status) proves the
//! device is there. A binding that misses several answers in a row is removed, so calls stop
//! ringing a phone that is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use careflow_core::{Binding, Transport};
use careflow_transport::Outbound;
use tokio_util::sync::CancellationToken;

use crate::App;

/// Branch prefix of our keep-alive OPTIONS; their answers are recognised by it.
pub(crate) const BRANCH_PREFIX: &str = "z9hG4bKcfka";

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
pub(crate) struct Tracker {
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
pub(crate) struct Round {
    /// Bindings to probe now, with the round number for the branch.
    pub(crate) probe: Vec<u64>,
    /// Bindings that missed too many answers.
    pub(crate) dead: Vec<u64>,
    /// This round's number.
    pub(crate) number: u64,
}

impl Tracker {
    /// Starts a round over the bindings that need keep-alives now.
    pub(crate) fn round(&mut self, ids: impl IntoIterator<Item = u64>, max_failures: u32) -> Round {
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
    pub(crate) fn answered(&mut self, id: u64, round: u64) -> bool {
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
pub(crate) fn needs_keepalive(b: &Binding) -> bool {
    b.here && b.behind_nat()
}

/// `(binding id, round)` from the branch of an answer to one of our keep-alives.
pub(crate) fn parse_branch(branch: &str) -> Option<(u64, u64)> {
    let rest = branch.strip_prefix(BRANCH_PREFIX)?;
    let (id, round) = rest.split_once('x')?;
    Some((id.parse().ok()?, round.parse().ok()?))
}

fn options(b: &Binding, local: SocketAddr, round: u64, domain: &str) -> String {
    format!(
        "OPTIONS {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch={BRANCH_PREFIX}{id}x{round};rport\r\n\
         Max-Forwards: 70\r\nFrom: <sip:keepalive@{domain}>;tag=ka{round}\r\nTo: <{contact}>\r\n\
         Call-ID: ka-{id}-{round}@{domain}\r\nCSeq: {round} OPTIONS\r\nContent-Length: 0\r\n\r\n",
        contact = b.contact,
        id = b.id,
    )
}

/// Runs keep-alive rounds until cancelled.
pub(crate) async fn run(app: Arc<App>, cfg: KeepaliveConfig, cancel: CancellationToken) {
    if cfg.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => app.keepalive_round(cfg).await,
        }
    }
}

impl App {
    async fn keepalive_round(&self, cfg: KeepaliveConfig) {
        let Ok(all) = self.location.all(crate::unix_now()).await else {
            return;
        };
        let nated: HashMap<u64, &Binding> = all
            .iter()
            .filter(|b| needs_keepalive(b))
            .map(|b| (b.id, b))
            .collect();
        let round = match self.keepalives.lock() {
            Ok(mut t) => t.round(nated.keys().copied(), cfg.max_failures),
            Err(_) => return,
        };
        for id in &round.dead {
            let Some(b) = nated.get(id) else { continue };
            let n = crate::flows::remove_bindings(&*self.location, &b.aor, |x| x.id == *id).await;
            self.metrics
                .keepalive_failures
                .fetch_add(u64::from(cfg.max_failures), Ordering::Relaxed);
            if n > 0 {
                self.metrics
                    .keepalive_bindings_dropped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(aor = %b.aor, contact = %b.contact, source = %b.source,
                    failures = cfg.max_failures, "device behind NAT stopped answering keep-alives; binding removed");
            }
        }
        let Some(t) = self.transports() else { return };
        let domain = self.cfg.domains.first().map_or("localhost", String::as_str);
        for id in &round.probe {
            let Some(b) = nated.get(id) else { continue };
            let Some(local) = self.listener_towards(Transport::Udp, b.source) else {
                continue;
            };
            let bytes = options(b, local, round.number, domain);
            let out = Outbound {
                transport: Transport::Udp,
                dest: b.source,
                conn: None,
                local: Some(local),
                bytes: bytes.into(),
            };
            self.metrics.keepalives_sent.fetch_add(1, Ordering::Relaxed);
            if let Some(out) = t.try_send(out) {
                let _ = t.send(out).await;
            }
        }
    }

    /// An answer to a keep-alive: the device is alive.
    pub(crate) fn keepalive_answered(&self, branch: &str) -> bool {
        let Some((id, round)) = parse_branch(branch) else {
            return false;
        };
        if let Ok(mut t) = self.keepalives.lock()
            && t.answered(id, round)
        {
            self.metrics
                .keepalives_answered
                .fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

/// Shared tracker type held by the app.
pub(crate) type SharedTracker = Mutex<Tracker>;

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
