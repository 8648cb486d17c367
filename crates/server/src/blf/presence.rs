//! Whether the users whose presence is watched have a device registered: learnt from the
//! location service when a subscription starts, kept up by their registrations through this
//! node, and looked up again when the first binding expires or, at the latest, every
//! [`RECHECK`] (a binding removed through the API, a connection that closed, another node).

use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_core::Binding;

use crate::app::App;
use crate::clock::unix_now;
use crate::watchers::Online;

/// The longest a watched user's registration state goes unchecked.
pub(crate) const RECHECK: Duration = Duration::from_secs(30);

/// The state of a user with `bindings` (unix `now`), as an instant-based [`Online`].
fn online(bindings: &[Binding], now_unix: u64, now: Instant) -> Online {
    let first_expiry = bindings
        .iter()
        .map(|b| b.expires_at.saturating_sub(now_unix))
        .min()
        .map(|secs| Duration::from_secs(secs + 1));
    Online {
        registered: !bindings.is_empty(),
        recheck_at: now + first_expiry.map_or(RECHECK, |d| d.min(RECHECK)),
        checking: false,
    }
}

impl App {
    /// `aor` now has `bindings` (a REGISTER through this node): its presence watchers are told
    /// when that changes whether a device is there.
    pub(crate) fn presence_registered(&self, aor: &str, bindings: &[Binding], now_unix: u64) {
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        // Every REGISTER passes here: `online` holds exactly the users whose presence is
        // watched (entered at their subscription, forgotten in the sweep), a map lookup.
        if !w.online.contains_key(aor) {
            return;
        }
        let next = online(bindings, now_unix, Instant::now());
        let before = w.online.insert(aor.to_string(), next);
        if before.is_none_or(|b| b.registered != next.registered) {
            w.subs.presence_changed(aor);
        }
    }

    /// Something may have changed `aor`'s registrations elsewhere (another node): look again
    /// at the next tick.
    pub(crate) fn presence_recheck_soon(&self, aor: &str) {
        if let Ok(mut w) = self.watchers.lock()
            && let Some(o) = w.online.get_mut(aor)
        {
            o.recheck_at = Instant::now();
        }
    }

    /// Looks `aor` up in the location service and records whether a device is registered
    /// (a store failure counts as none, and is looked at again soon).
    pub(crate) async fn presence_lookup(&self, aor: &str) {
        let now_unix = unix_now();
        let next = match self.location.lookup(aor, now_unix).await {
            Ok(bindings) => online(&bindings, now_unix, Instant::now()),
            Err(e) => {
                tracing::warn!(aor, error = %e, "presence: location lookup failed; shown closed until it works");
                Online {
                    registered: false,
                    recheck_at: Instant::now() + Duration::from_secs(5),
                    checking: false,
                }
            }
        };
        let Ok(mut w) = self.watchers.lock() else {
            return;
        };
        let before = w.online.insert(aor.to_string(), next);
        if before.is_some_and(|b| b.registered != next.registered) {
            w.subs.presence_changed(aor);
        }
    }

    /// Forgets the users nobody watches the presence of any more (a scan of every
    /// subscription: in the sweep, not every tick).
    pub(crate) fn forget_unwatched_presence(&self) {
        if let Ok(mut w) = self.watchers.lock() {
            let w = &mut *w;
            let watched = w.subs.presence_aors();
            w.online.retain(|aor, _| watched.contains(aor.as_str()));
        }
    }

    /// Starts the lookups that are due.
    pub(crate) fn presence_rechecks(self: &Arc<Self>, now: Instant) {
        let due: Vec<String> = {
            let Ok(mut w) = self.watchers.lock() else {
                return;
            };
            w.online
                .iter_mut()
                .filter(|(_, o)| !o.checking && o.recheck_at <= now)
                .map(|(aor, o)| {
                    o.checking = true;
                    aor.clone()
                })
                .collect()
        };
        for aor in due {
            let app = self.clone();
            tokio::spawn(async move { app.presence_lookup(&aor).await });
        }
    }
}
