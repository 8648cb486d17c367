//! The push side's timers: waits that ended are forgotten every second, and push devices
//! whose registration is about to expire are woken to register again (RFC 8599 §5.5), by the
//! node they registered through (one push per registration, whichever node sees it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_push::{Kind, Notification};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::unix_now;

/// How often the bindings are scanned for refresh pushes.
const REFRESH_SCAN: Duration = Duration::from_secs(15);

pub(crate) async fn run(app: Arc<App>, cancel: CancellationToken) {
    let Some(pusher) = app.push.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        pusher.sweep(Instant::now());
        if let Ok(mut r) = app.pushed_requests.lock() {
            r.retain(|key, _| pusher.call_waits(key));
        }
        if last_scan.is_some_and(|t| t.elapsed() < REFRESH_SCAN) {
            continue;
        }
        last_scan = Some(Instant::now());
        refresh(&app).await;
    }
}

/// Sends the refresh pushes that are due.
async fn refresh(app: &Arc<App>) {
    let Some(pusher) = app.push.clone() else {
        return;
    };
    let now = unix_now();
    let Ok(bindings) = app.location.all(now).await else {
        return;
    };
    let ids: std::collections::HashSet<u64> = bindings.iter().map(|b| b.id).collect();
    pusher.retain_refreshed(&|id| ids.contains(&id));
    for b in bindings.into_iter().filter(|b| b.here) {
        let Some(p) = pusher.sleeper(&b) else {
            continue;
        };
        if !pusher.refresh_due(&b, now) {
            continue;
        }
        let n = Notification {
            token: &p.prid,
            param: p.param.as_deref(),
            kind: Kind::Refresh,
            call_id: "",
            from_uri: "",
            display_name: "",
            instance: crate::push::instance_uuid(&b),
            ttl: b.expires_in(now) as u32,
            now,
        };
        // iOS ends an app that gets a VoIP push it does not turn into a call: a device with
        // no background token is left to refresh by itself.
        if p.service() == Some(careflow_core::push::Provider::Apns)
            && careflow_push::apns::Target::of(&n).is_err()
        {
            tracing::debug!(aor = %b.aor, device = %p.log_id(), "no background push token; no refresh push");
            continue;
        }
        match pusher.send(b.id, &p, &n, Instant::now()).await {
            Ok(()) => {
                tracing::info!(aor = %b.aor, device = %p.log_id(), expires_in = b.expires_in(now),
                "refresh push sent before the registration expires")
            }
            Err(e) => {
                tracing::warn!(aor = %b.aor, device = %p.log_id(), error = %e, "refresh push failed")
            }
        }
    }
}
