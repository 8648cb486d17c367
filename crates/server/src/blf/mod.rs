//! Busy lamps, pickup and presence (issue 19): SUBSCRIBE with `Event: dialog` or
//! `Event: presence` to one of our users is answered here, and the watcher gets NOTIFYs built
//! from the proxy's own calls and the user's registrations: at once, then on every change
//! (coalesced and paced), and a final one when the subscription ends. The state is in
//! `watchers.rs`, the decisions in `careflow_core::dialog_event`.

mod calls;
mod notify;
mod persist;
mod pickup;
mod presence;
mod share;
mod subscribe;

use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_proto::Uri;
use tokio_util::sync::CancellationToken;

use crate::app::App;

pub(crate) use pickup::with_replaces;
pub(crate) use share::lamps_of_other_nodes;

/// Our NOTIFYs' Via branches start so; their answers are ours, not the proxy's.
const NOTIFY_BRANCH: &str = "z9hG4bKcfnotify";

/// How soon after a change the subscriptions are saved.
const SAVE_EVERY: Duration = Duration::from_secs(2);

fn aor_of(uri: &Uri<'_>) -> Option<String> {
    uri.user?;
    uri.aor()
}

/// Takes back the subscriptions of before a restart, then sends due NOTIFYs and
/// retransmissions, looks up the presence of watched users, forgets old terminated legs, and
/// saves the subscriptions when they changed (and at shutdown).
pub(crate) async fn run(app: Arc<App>, cancel: CancellationToken) {
    let state_file = app.cfg.blf.state_file.clone();
    if let Some(path) = &state_file {
        app.restore_subscriptions(path);
        let watched: Vec<String> = app
            .watchers
            .lock()
            .map(|w| w.online.keys().cloned().collect())
            .unwrap_or_default();
        for aor in watched {
            app.presence_lookup(&aor).await;
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut swept, mut saved, mut shared) = (Instant::now(), Instant::now(), Instant::now());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Some(path) = &state_file {
                    app.save_subscriptions(path, true);
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        app.send_due_notifies(now);
        app.presence_rechecks(now);
        if let Some(path) = &state_file
            && now.duration_since(saved) >= SAVE_EVERY
            && app.watchers.lock().is_ok_and(|w| w.dirty)
        {
            saved = now;
            app.save_subscriptions(path, false);
        }
        if now.duration_since(shared) >= share::REPUBLISH {
            shared = now;
            app.republish_lamps();
        }
        if now.duration_since(swept) >= Duration::from_secs(5) {
            swept = now;
            app.expire_remote_lamps(now);
            app.forget_unwatched_presence();
            if let Ok(mut w) = app.watchers.lock() {
                w.calls.sweep(now);
                let w = &mut *w;
                w.callers.retain(|call_id, _| w.calls.knows(call_id));
                w.pickups.retain(|_, (_, at)| {
                    now.duration_since(*at) < crate::watchers::PICKUP_ANSWER_WAIT
                });
            }
        }
    }
}
