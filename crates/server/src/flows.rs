//! Bindings tied to connections: which addresses-of-record registered over which connection,
//! so that a closed connection takes its bindings with it (a WebSocket client that went away
//! must not leave a binding that swallows calls).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use careflow_core::Binding;
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

/// Removes from `aor` every binding `drop` selects; returns how many went (0 after logging
/// a store error: the caller has no one to answer).
pub(crate) async fn remove_bindings(
    location: &dyn LocationStore,
    aor: &str,
    drop: impl Fn(&Binding) -> bool + Send + Sync,
) -> usize {
    match careflow_store::remove_bindings(location, aor, drop).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, aor, "could not remove bindings");
            0
        }
    }
}
