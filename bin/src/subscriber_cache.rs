//! Keeping the subscriber cache coherent and small while the server runs: expired rows are
//! dropped every half minute, and in a cluster a user is forgotten as soon as another node
//! announces a change to their credentials or devices (the live events relayed over Redis).

use std::sync::Arc;
use std::time::{Duration, Instant};

use careflow_store::cached::CachedSubscribers;
use careflow_store::events::{EventKind, Events};
use tokio::sync::broadcast::error::RecvError;

/// Starts the upkeep of `cache`; `events` when other nodes' events reach this one.
pub(crate) fn keep(cache: Arc<CachedSubscribers>, events: Option<Events>) {
    let sweeping = cache.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            sweeping.expire(Instant::now());
        }
    });
    let Some(events) = events else { return };
    let mut rx = events.subscribe();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    if matches!(
                        e.kind,
                        EventKind::CredentialsChanged | EventKind::DeviceUnregistered
                    ) && let Some((user, domain)) = e.user.rsplit_once('@')
                    {
                        cache.forget(user, domain);
                    }
                }
                // Events were missed: which users changed is unknown.
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "subscriber cache fell behind the live events; forgetting every row"
                    );
                    cache.forget_all();
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// The cache's counters in Prometheus text.
pub(crate) fn render_metrics(cache: &CachedSubscribers, out: &mut String) {
    use std::fmt::Write as _;
    let (hits, misses) = cache.stats();
    let _ = write!(
        out,
        "# HELP careflow_sip_subscriber_cache_hits_total Subscriber lookups for authentication answered from memory.\n\
         # TYPE careflow_sip_subscriber_cache_hits_total counter\n\
         careflow_sip_subscriber_cache_hits_total {hits}\n\
         # HELP careflow_sip_subscriber_cache_misses_total Subscriber lookups for authentication that read the database.\n\
         # TYPE careflow_sip_subscriber_cache_misses_total counter\n\
         careflow_sip_subscriber_cache_misses_total {misses}\n\
         # HELP careflow_sip_subscriber_cache_rows Subscriber rows held in memory.\n\
         # TYPE careflow_sip_subscriber_cache_rows gauge\n\
         careflow_sip_subscriber_cache_rows {}\n",
        cache.len()
    );
}
