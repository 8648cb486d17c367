//! Calls still ringing, by callee address-of-record, for late forking: when the callee
//! registers a device while its call rings (a phone that rebooted, a tab that reconnected
//! through another node after its node died), the call gains a branch to it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use careflow_core::transaction::TxKey;

/// Longer than any call rings (Timer C is 3 minutes): older entries are dropped unlooked-at.
const KEEP: Duration = Duration::from_secs(200);
/// AoRs kept before a sweep of the stale ones.
const SWEEP_AT: usize = 10_000;

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
    by_aor: Mutex<HashMap<String, Vec<Ringing>>>,
}

impl RingingIndex {
    /// A call to `aor` was forked to `forked`.
    pub(crate) fn add(&self, aor: &str, key: TxKey, forked: Vec<String>, now: Instant) {
        let Ok(mut m) = self.by_aor.lock() else {
            return;
        };
        if m.len() >= SWEEP_AT {
            m.retain(|_, calls| {
                calls.retain(|c| now.saturating_duration_since(c.since) < KEEP);
                !calls.is_empty()
            });
        }
        m.entry(aor.to_string()).or_default().push(Ringing {
            key,
            forked,
            since: now,
        });
    }

    /// Whether a call to `aor` may be ringing here.
    pub(crate) fn has(&self, aor: &str) -> bool {
        self.by_aor.lock().is_ok_and(|m| m.contains_key(aor))
    }

    /// The calls to `aor` that may still ring (the stale ones are dropped).
    pub(crate) fn calls(&self, aor: &str, now: Instant) -> Vec<Ringing> {
        let Ok(mut m) = self.by_aor.lock() else {
            return Vec::new();
        };
        let Some(calls) = m.get_mut(aor) else {
            return Vec::new();
        };
        calls.retain(|c| now.saturating_duration_since(c.since) < KEEP);
        let out = calls.clone();
        if calls.is_empty() {
            m.remove(aor);
        }
        out
    }

    /// The call `key` to `aor` was forked to `flow` too; or, with `None`, it rings no more.
    pub(crate) fn update(&self, aor: &str, key: &TxKey, flow: Option<String>) {
        let Ok(mut m) = self.by_aor.lock() else {
            return;
        };
        let Some(calls) = m.get_mut(aor) else { return };
        match flow {
            Some(f) => {
                if let Some(c) = calls.iter_mut().find(|c| &c.key == key) {
                    c.forked.push(f);
                }
            }
            None => calls.retain(|c| &c.key != key),
        }
        if calls.is_empty() {
            m.remove(aor);
        }
    }
}
