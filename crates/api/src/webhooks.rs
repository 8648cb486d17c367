//! Signed webhooks to CareFlow (issue 20): every live event of the chosen types is POSTed as
//! JSON to `WEBHOOK_URL`, signed with HMAC-SHA256 over `"{timestamp}.{body}"` with the shared
//! secret (`X-CareFlow-Signature: t=TIMESTAMP,v1=HEX`), so the receiver can check who sent it
//! and refuse replays. Failed deliveries (no connection, a timeout, 408, 429, 5xx) are tried
//! again 1 s, 2 s, 4 s ... later (at most 5 minutes apart) up to `WEBHOOK_MAX_ATTEMPTS`
//! attempts; then, or at once on another 4xx, the event is a dead letter: counted, logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use careflow_store::events::{Events, LiveEvent};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::broadcast::error::RecvError;

/// Where and how events are delivered.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The receiver (`https://...`; `http://` for a receiver on the same host).
    pub url: String,
    /// The shared secret of the signatures (never logged).
    pub secret: Vec<u8>,
    /// Event types delivered (`device.registered`, ...); none: all.
    pub events: Option<Vec<String>>,
    /// Attempts per event before it is a dead letter.
    pub max_attempts: u32,
    /// The first retry's delay (doubling after).
    pub first_retry: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// Delivery counters, for /metrics.
#[derive(Debug, Default)]
pub struct WebhookStats {
    delivered: AtomicU64,
    retries: AtomicU64,
    dead_letters: AtomicU64,
    dropped: AtomicU64,
}

impl WebhookStats {
    /// Prometheus text of the counters.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            (
                "careflow_sip_webhooks_delivered_total",
                "Events the webhook receiver accepted (2xx).",
                &self.delivered,
            ),
            (
                "careflow_sip_webhook_retries_total",
                "Webhook deliveries tried again after a failure.",
                &self.retries,
            ),
            (
                "careflow_sip_webhook_dead_letters_total",
                "Events given up on: every attempt failed, or the receiver refused them with a 4xx.",
                &self.dead_letters,
            ),
            (
                "careflow_sip_webhook_dropped_total",
                "Events not delivered because the event backlog (4096) overflowed while deliveries were under way.",
                &self.dropped,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

/// `t=TIMESTAMP,v1=HEX`: HMAC-SHA256 of `"{timestamp}.{body}"` with `secret`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length: new_from_slice never fails for it.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// Deliveries under way at once; beyond, events wait in the event backlog.
const IN_FLIGHT: usize = 64;
/// One attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(300);

fn event_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether another attempt may succeed after `status` (none: no answer).
fn retryable(status: Option<u16>) -> bool {
    match status {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// Delivers the events of `events` until `shutdown` completes.
pub async fn run(
    cfg: WebhookConfig,
    events: Events,
    stats: Arc<WebhookStats>,
    shutdown: impl Future<Output = ()>,
) {
    let mut rx = events.subscribe();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let cfg = Arc::new(cfg);
    tokio::pin!(shutdown);
    loop {
        let e = tokio::select! {
            _ = &mut shutdown => return,
            r = rx.recv() => match r {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    stats.dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(missed = n, "webhook deliveries fell behind; events dropped");
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        // Another node's event is that node's to deliver: CareFlow gets each event once.
        if e.remote
            || cfg
                .events
                .as_ref()
                .is_some_and(|only| !only.iter().any(|t| t == e.kind.as_str()))
        {
            continue;
        }
        // A full set of deliveries under way (a receiver slow or down during a 7 a.m. restart
        // storm) holds the next events in the broadcast backlog (4096) rather than dropping
        // them; only past that are they lost, counted as lagged above.
        let slot = tokio::select! {
            _ = &mut shutdown => return,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        let (cfg, stats) = (cfg.clone(), stats.clone());
        tokio::spawn(async move {
            deliver(&cfg, &stats, &e).await;
            drop(slot);
        });
    }
}

async fn deliver(cfg: &WebhookConfig, stats: &WebhookStats, e: &LiveEvent) {
    let id = event_id();
    let mut body = e.to_json();
    body["id"] = serde_json::Value::String(id.clone());
    let body = body.to_string().into_bytes();
    let mut wait = cfg.first_retry;
    for attempt in 1..=cfg.max_attempts.max(1) {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let headers = [
            ("content-type", "application/json".to_string()),
            ("x-careflow-event", e.kind.as_str().to_string()),
            ("x-careflow-event-id", id.clone()),
            ("x-careflow-signature", signature(&cfg.secret, ts, &body)),
        ];
        let status = match crate::http_client::post(
            &cfg.url,
            &headers,
            body.clone(),
            ATTEMPT_TIMEOUT,
        )
        .await
        {
            Ok(s) => Some(s),
            Err(err) => {
                tracing::warn!(event = e.kind.as_str(), id, attempt, error = %err, "webhook delivery failed");
                None
            }
        };
        if status.is_some_and(|s| (200..300).contains(&s)) {
            stats.delivered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !retryable(status) || attempt == cfg.max_attempts.max(1) {
            break;
        }
        if let Some(s) = status {
            tracing::warn!(
                event = e.kind.as_str(),
                id,
                attempt,
                status = s,
                "webhook receiver refused; retrying"
            );
        }
        stats.retries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
    stats.dead_letters.fetch_add(1, Ordering::Relaxed);
    tracing::error!(event = e.kind.as_str(), id, user = %e.user, url = %cfg.url,
        "webhook event given up (dead letter)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_the_time_and_the_body() {
        // The value Python's hmac module gives for the same key and "1700000000.{}".
        let s = signature(b"secret", 1_700_000_000, b"{}");
        assert_eq!(
            s,
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
        assert_ne!(s, signature(b"secret", 1_700_000_001, b"{}"));
        assert_ne!(s, signature(b"secret", 1_700_000_000, b"{ }"));
        assert_ne!(s, signature(b"other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn only_failures_that_may_pass_are_retried() {
        assert!(retryable(None));
        assert!(retryable(Some(500)) && retryable(Some(503)) && retryable(Some(429)));
        assert!(!retryable(Some(400)) && !retryable(Some(401)) && !retryable(Some(404)));
    }
}
