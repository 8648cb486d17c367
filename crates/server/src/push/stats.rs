//! Push metrics: pushes sent and failed by service and reason, and the two waits a woken
//! call adds (request to push accepted, push to the device's new registration).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use careflow_core::push::Provider;

const SERVICES: [&str; 2] = ["apns", "fcm"];
const KINDS: [&str; 3] = ["call", "message", "refresh"];
const REASONS: [&str; 4] = ["invalid_token", "refused", "unavailable", "not_our_app"];
/// Bucket bounds in seconds: from a local service's milliseconds to the whole wait.
const BOUNDS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn service(p: Provider) -> usize {
    match p {
        Provider::Apns => 0,
        Provider::Fcm => 1,
    }
}

fn index(list: &[&str], label: &str) -> usize {
    list.iter().position(|l| *l == label).unwrap_or(0)
}

/// A Prometheus histogram of durations.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; 10],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(BOUNDS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        for (b, bound) in self.buckets.iter().zip(BOUNDS) {
            let _ = writeln!(
                s,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = write!(
            s,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}\n",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters of the push wake-ups.
#[derive(Debug, Default)]
pub struct PushStats {
    sent: [[AtomicU64; 3]; 2],
    failed: [[AtomicU64; 4]; 2],
    /// From the request's arrival to the service accepting the push.
    pub(crate) to_push: Histogram,
    /// From the push accepted to the device's new registration.
    pub(crate) to_register: Histogram,
    /// Requests forked to a device that woke up.
    pub(crate) woken: AtomicU64,
    /// Waits that ended without the device registering.
    pub(crate) expired: AtomicU64,
}

impl PushStats {
    pub(crate) fn sent(&self, p: Provider, kind: careflow_push::Kind) {
        self.sent[service(p)][index(&KINDS, kind.label())].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, p: Provider, f: &careflow_push::Failure) {
        self.failed[service(p)][index(&REASONS, f.label())].fetch_add(1, Ordering::Relaxed);
    }

    /// Pushes accepted by `p`'s service (tests, the dashboard).
    pub fn sent_total(&self, p: Provider) -> u64 {
        self.sent[service(p)]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Prometheus text exposition.
    pub fn render(&self, s: &mut String) {
        s.push_str("# HELP careflow_sip_push_sent_total Pushes the service accepted, by service and what waits (call, message, refresh).\n# TYPE careflow_sip_push_sent_total counter\n");
        for (i, svc) in SERVICES.iter().enumerate() {
            for (j, kind) in KINDS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "careflow_sip_push_sent_total{{service=\"{svc}\",kind=\"{kind}\"}} {}",
                    self.sent[i][j].load(Ordering::Relaxed)
                );
            }
        }
        s.push_str("# HELP careflow_sip_push_failed_total Pushes that did not go out, by service and reason.\n# TYPE careflow_sip_push_failed_total counter\n");
        for (i, svc) in SERVICES.iter().enumerate() {
            for (j, reason) in REASONS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "careflow_sip_push_failed_total{{service=\"{svc}\",reason=\"{reason}\"}} {}",
                    self.failed[i][j].load(Ordering::Relaxed)
                );
            }
        }
        self.to_push.render(
            s,
            "careflow_sip_push_request_to_push_seconds",
            "From a request for a sleeping device to its push accepted by the service.",
        );
        self.to_register.render(
            s,
            "careflow_sip_push_to_register_seconds",
            "From a push accepted to the woken device's new registration.",
        );
        let _ = write!(
            s,
            "# HELP careflow_sip_push_woken_total Requests forked to a device a push woke.\n# TYPE careflow_sip_push_woken_total counter\ncareflow_sip_push_woken_total {}\n\
             # HELP careflow_sip_push_expired_total Waits for a pushed device that ended without it registering.\n# TYPE careflow_sip_push_expired_total counter\ncareflow_sip_push_expired_total {}\n",
            self.woken.load(Ordering::Relaxed),
            self.expired.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let st = PushStats::default();
        st.to_push.observe(Duration::from_millis(20));
        st.to_push.observe(Duration::from_secs(3));
        st.sent(Provider::Fcm, careflow_push::Kind::Call);
        let mut s = String::new();
        st.render(&mut s);
        assert!(s.contains("careflow_sip_push_request_to_push_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(s.contains("careflow_sip_push_request_to_push_seconds_bucket{le=\"5\"} 2\n"));
        assert!(s.contains("careflow_sip_push_request_to_push_seconds_count 2\n"));
        assert!(s.contains("careflow_sip_push_sent_total{service=\"fcm\",kind=\"call\"} 1\n"));
        assert_eq!(st.sent_total(Provider::Fcm), 1);
        assert_eq!(st.to_push.count(), 2);
    }
}
