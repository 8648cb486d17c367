//! Bindings tied to connections: which addresses-of-record registered over which connection,
//! so that a closed connection takes its bindings with it (a WebSocket client that went away
//! must not leave a binding that swallows calls).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use careflow_core::Binding;
use careflow_core::registrar::{Outcome, Reject};
use careflow_store::LocationStore;

/// conn id → AoRs registered over it. A hint: the bindings themselves record their
/// connection, so a stale entry only costs one look.
#[derive(Debug, Default)]
pub(crate) struct FlowIndex {
    by_conn: Mutex<HashMap<u64, HashSet<String>>>,
}

impl FlowIndex {
    pub(crate) fn bound(&self, conn: u64, aor: &str) {
        if let Ok(mut m) = self.by_conn.lock() {
            let set = m.entry(conn).or_default();
            if !set.contains(aor) {
                set.insert(aor.to_string());
            }
        }
    }

    pub(crate) fn take(&self, conn: u64) -> Vec<String> {
        self.by_conn
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&conn))
            .map(|s| s.into_iter().collect())
            .unwrap_or_default()
    }
}

/// Removes from `aor` every binding `drop` selects; returns how many went.
pub(crate) async fn remove_bindings(
    location: &dyn LocationStore,
    aor: &str,
    drop: impl Fn(&Binding) -> bool + Send + Sync,
) -> usize {
    let removed = AtomicUsize::new(0);
    let decide = |cur: &[Binding]| -> Result<Outcome, Reject> {
        let bindings: Vec<Binding> = cur.iter().filter(|b| !drop(b)).cloned().collect();
        let n = cur.len() - bindings.len();
        removed.store(n, Ordering::Relaxed);
        Ok(Outcome {
            bindings,
            changed: n > 0,
        })
    };
    match location.update(aor, &decide).await {
        Ok(_) => removed.load(Ordering::Relaxed),
        Err(e) => {
            tracing::error!(error = %e, aor, "could not remove bindings");
            0
        }
    }
}
