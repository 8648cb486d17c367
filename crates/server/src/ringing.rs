//! Calls still ringing, by callee address-of-record, for late forking: when the callee
//! registers a device while its call rings (a phone that rebooted, a tab that reconnected
//! through another node after its node died), the call gains a branch to it.

use foldhash::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use careflow_core::transaction::TxKey;

/// Longer than any call rings (Timer C is 3 minutes): older entries are dropped unlooked-at.
const KEEP: Duration = Duration::from_secs(200);
/// AoRs kept before a sweep of the stale ones, and the least time between two sweeps (a busy
/// site may have that many calls ringing: each new call must not pay for a scan).
const SWEEP_AT: usize = 10_000;
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// One ringing call: its INVITE's transaction and the flows already forked to.
#[derive(Debug, Clone)]
pub(crate) struct Ringing {
    pub(crate) key: TxKey,
    /// What each branch went to (see `proxy::Hop::flow_id`).
    pub(crate) forked: Vec<String>,
    since: Instant,
}

/// callee AoR → its calls ringing here. A hint: the proxy table says whether a call still
/// rings, so a stale entry only costs one look.
#[derive(Debug, Default)]
pub(crate) struct RingingIndex {
    inner: Mutex<Calls>,
}

#[derive(Debug, Default)]
struct Calls {
    by_aor: HashMap<String, Vec<Ringing>>,
    swept: Option<Instant>,
}

fn fresh(c: &Ringing, now: Instant) -> bool {
    now.saturating_duration_since(c.since) < KEEP
}

impl RingingIndex {
    /// A call to `aor` was forked to `forked`.
    pub(crate) fn add(&self, aor: &str, key: TxKey, forked: Vec<String>, now: Instant) {
        let Ok(mut all) = self.inner.lock() else {
            return;
        };
        let due = all
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if all.by_aor.len() >= SWEEP_AT && due {
            all.swept = Some(now);
            all.by_aor.retain(|_, calls| {
                calls.retain(|c| fresh(c, now));
                !calls.is_empty()
            });
        }
        all.by_aor
            .entry(aor.to_string())
            .or_default()
            .push(Ringing {
                key,
                forked,
                since: now,
            });
    }

    /// Whether a call to `aor` may be ringing here.
    pub(crate) fn has(&self, aor: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|all| all.by_aor.contains_key(aor))
    }

    /// The calls to `aor` that may still ring (the stale ones are dropped).
    pub(crate) fn calls(&self, aor: &str, now: Instant) -> Vec<Ringing> {
        let Ok(mut all) = self.inner.lock() else {
            return Vec::new();
        };
        let Some(calls) = all.by_aor.get_mut(aor) else {
            return Vec::new();
        };
        calls.retain(|c| fresh(c, now));
        let out = calls.clone();
        if calls.is_empty() {
            all.by_aor.remove(aor);
        }
        out
    }

    /// The call `key` to `aor` was forked to `flow` too; or, with `None`, it rings no more.
    pub(crate) fn update(&self, aor: &str, key: &TxKey, flow: Option<String>) {
        let Ok(mut all) = self.inner.lock() else {
            return;
        };
        let Some(calls) = all.by_aor.get_mut(aor) else {
            return;
        };
        match flow {
            Some(f) => {
                if let Some(c) = calls.iter_mut().find(|c| &c.key == key) {
                    c.forked.push(f);
                }
            }
            None => calls.retain(|c| &c.key != key),
        }
        if calls.is_empty() {
            all.by_aor.remove(aor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> TxKey {
        let msg = careflow_proto::Message::parse(
            bytes::Bytes::from(format!(
                "INVITE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK{n}\r\n\
                 From: <sip:a@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c{n}\r\n\
                 CSeq: 1 INVITE\r\n\r\n"
            )),
            &careflow_proto::ParseLimits::default(),
        )
        .expect("invite");
        TxKey::of(&msg).expect("key")
    }

    #[test]
    fn calls_are_found_by_callee_updated_and_forgotten_when_old() {
        let idx = RingingIndex::default();
        let t0 = Instant::now();
        idx.add("bob@example.com", key(1), vec!["flow-a".into()], t0);
        assert!(idx.has("bob@example.com") && !idx.has("carol@example.com"));
        idx.update("bob@example.com", &key(1), Some("flow-b".into()));
        let calls = idx.calls("bob@example.com", t0);
        assert_eq!(calls.len(), 1);
        assert_eq!(
            calls[0].forked,
            vec!["flow-a".to_string(), "flow-b".to_string()]
        );
        // A call that rings no more is dropped; so is one older than any call rings.
        idx.update("bob@example.com", &key(1), None);
        assert!(!idx.has("bob@example.com"));
        idx.add("bob@example.com", key(2), Vec::new(), t0);
        assert!(idx.calls("bob@example.com", t0 + KEEP).is_empty());
        assert!(!idx.has("bob@example.com"));
    }

    #[test]
    fn a_full_index_is_swept_at_most_every_few_seconds() {
        let idx = RingingIndex::default();
        let t0 = Instant::now();
        for n in 0..SWEEP_AT as u32 {
            idx.add(&format!("u{n}@example.com"), key(n), Vec::new(), t0);
        }
        // Old entries go at the next sweep...
        let later = t0 + KEEP;
        idx.add("new@example.com", key(0), Vec::new(), later);
        assert!(!idx.has("u1@example.com") && idx.has("new@example.com"));
        // ...which is not run again for a while, however full the index is.
        for n in 0..SWEEP_AT as u32 {
            idx.add(&format!("v{n}@example.com"), key(n), Vec::new(), later);
        }
        let swept = |idx: &RingingIndex| idx.inner.lock().expect("lock").swept;
        idx.add(
            "newer@example.com",
            key(0),
            Vec::new(),
            later + Duration::from_secs(1),
        );
        assert_eq!(swept(&idx), Some(later));
        let next = later + SWEEP_EVERY;
        idx.add("newest@example.com", key(0), Vec::new(), next);
        assert_eq!(swept(&idx), Some(next));
        assert!(idx.has("v1@example.com"), "fresh calls stay");
    }
}

/// The other flows of a device (RFC 5626 §5.3): when the branch to one flow of an instance
/// fails (430 Flow Failed, or its transport), the call tries the instance's next flow.
#[derive(Debug, Default)]
pub(crate) struct AlternateFlows {
    inner: Mutex<Alternates>,
}

#[derive(Debug, Default)]
struct Alternates {
    /// Via branch → (the call, the callee AoR, binding ids of its other flows, best first).
    by_branch: HashMap<String, Alternate>,
    swept: Option<Instant>,
}

/// The flows left to try for one branch.
#[derive(Debug, Clone)]
pub(crate) struct Alternate {
    pub(crate) key: TxKey,
    pub(crate) aor: String,
    pub(crate) bindings: Vec<u64>,
    since: Instant,
}

impl AlternateFlows {
    /// The branch `branch` of call `key` goes to one flow of a device with other flows.
    pub(crate) fn add(
        &self,
        branch: &str,
        key: TxKey,
        aor: &str,
        bindings: Vec<u64>,
        now: Instant,
    ) {
        let Ok(mut all) = self.inner.lock() else {
            return;
        };
        let due = all
            .swept
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if all.by_branch.len() >= SWEEP_AT && due {
            all.swept = Some(now);
            all.by_branch
                .retain(|_, a| now.saturating_duration_since(a.since) < KEEP);
        }
        all.by_branch.insert(
            branch.to_string(),
            Alternate {
                key,
                aor: aor.to_string(),
                bindings,
                since: now,
            },
        );
    }

    /// Whether `branch` has flows left to try.
    pub(crate) fn has(&self, branch: &str) -> bool {
        self.inner
            .lock()
            .is_ok_and(|all| all.by_branch.contains_key(branch))
    }

    /// The flows left to try when `branch` failed (taken: each is tried once).
    pub(crate) fn take(&self, branch: &str) -> Option<Alternate> {
        self.inner.lock().ok()?.by_branch.remove(branch)
    }
}
