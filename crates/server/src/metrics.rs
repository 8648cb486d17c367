//! Server counters, rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use careflow_proto::Method;

const METHODS: [&str; 15] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "INFO",
    "UPDATE",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "MESSAGE",
    "PUBLISH",
    "other",
];

fn method_index(m: Method) -> usize {
    match m {
        Method::Invite => 0,
        Method::Ack => 1,
        Method::Bye => 2,
        Method::Cancel => 3,
        Method::Register => 4,
        Method::Options => 5,
        Method::Info => 6,
        Method::Update => 7,
        Method::Prack => 8,
        Method::Subscribe => 9,
        Method::Notify => 10,
        Method::Refer => 11,
        Method::Message => 12,
        Method::Publish => 13,
        Method::Other => 14,
    }
}

/// Counters shared by the handlers.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 15],
    responses: [AtomicU64; 6],
    /// Successful REGISTER requests (200 OK).
    pub registrations: AtomicU64,
    /// Authenticated out-of-dialog INVITEs (calls the proxy tried to connect).
    pub calls_attempted: AtomicU64,
    /// Calls answered with a 2xx.
    pub calls_answered: AtomicU64,
    calls_failed: [AtomicU64; 4],
    /// Failed digest verifications (not counting the first, credential-less challenge).
    pub auth_failures: AtomicU64,
    /// Credentials answered with a fresh challenge without counting as a failure (stale,
    /// reused or foreign nonce; realm or algorithm not offered).
    pub auth_rechallenges: AtomicU64,
    /// Messages that could not be parsed or validated.
    pub parse_errors: AtomicU64,
    /// Retransmitted requests absorbed or answered from the transaction table.
    pub retransmissions: AtomicU64,
    /// Subscriber or location store errors.
    pub store_errors: AtomicU64,
    /// Requests from known SIP scanners, dropped unanswered.
    pub scanner_drops: AtomicU64,
    /// Bindings not forked to because the node holding their flow is gone or restarted.
    pub cluster_skipped: AtomicU64,
    /// Bindings removed because their connection closed.
    pub flow_bindings_dropped: AtomicU64,
    /// Dialog-event NOTIFYs sent (retransmissions included).
    pub notifies_sent: AtomicU64,
    /// Call detail records stored.
    pub call_records_written: AtomicU64,
    /// Call detail records lost: the database refused them after retries, the queue to it was
    /// full, or too many calls were followed at once.
    pub call_records_lost: AtomicU64,
    /// OPTIONS keep-alives that got no answer.
    pub keepalive_failures: AtomicU64,
    /// Sources banned for brute force.
    pub bans: AtomicU64,
    /// Bindings removed because their device stopped answering keep-alives.
    pub keepalive_bindings_dropped: AtomicU64,
    /// OPTIONS keep-alives sent.
    pub keepalives_sent: AtomicU64,
    /// Answers to keep-alives.
    pub keepalives_answered: AtomicU64,
}

/// Gauges read at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Bindings in the location service.
    pub bindings: u64,
    /// Open server transactions.
    pub transactions: u64,
    /// Open stream connections.
    pub connections: u64,
    /// Nonces tracked for replay protection.
    pub tracked_nonces: u64,
    /// Messages dropped for size by the transports.
    pub oversize: u64,
    /// Messages and connections dropped from banned or flooding sources.
    pub dropped_banned: u64,
    /// Flows banned by the transports (floods).
    pub flood_bans: u64,
    /// Messages shed because their site was over its rate ceiling.
    pub site_shed: u64,
    /// Messages dropped on the way out (a full UDP backlog or connection queue).
    pub send_dropped: u64,
    /// Connections closed because their peer stopped reading.
    pub stalled_closed: u64,
    /// Sources banned now.
    pub banned_now: u64,
    /// Connections refused (total or per-IP limit).
    pub refused_connections: u64,
    /// Calls with media anchored at rtpengine now.
    pub media_sessions: u64,
    /// rtpengine commands answered, failed, and their summed answer time (µs).
    pub rtpengine: (u64, u64, u64),
    /// Cluster nodes alive as this node sees them (itself included); 0 when it is alone.
    pub cluster_nodes: u64,
}

impl Metrics {
    /// Counts a request.
    pub fn request(&self, m: Method) {
        self.requests[method_index(m)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response we sent.
    pub fn response(&self, code: u16) {
        let class = usize::from(code / 100).clamp(1, 6) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call that ended with a non-2xx final response.
    pub fn call_failed(&self, code: u16) {
        let class = usize::from(code / 100).clamp(3, 6) - 3;
        self.calls_failed[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests counted for a method name (tests, dashboards).
    pub fn requests_for(&self, m: Method) -> u64 {
        self.requests[method_index(m)].load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str("# HELP careflow_sip_requests_total SIP requests received, by method.\n# TYPE careflow_sip_requests_total counter\n");
        for (i, m) in METHODS.iter().enumerate() {
            let _ = writeln!(
                s,
                "careflow_sip_requests_total{{method=\"{m}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        s.push_str("# HELP careflow_sip_responses_total SIP responses sent, by status class.\n# TYPE careflow_sip_responses_total counter\n");
        for (i, c) in ["1xx", "2xx", "3xx", "4xx", "5xx", "6xx"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                s,
                "careflow_sip_responses_total{{class=\"{c}\"}} {}",
                self.responses[i].load(Ordering::Relaxed)
            );
        }
        s.push_str("# HELP careflow_sip_calls_total Calls through the proxy: attempted, answered, failed by final status class.\n# TYPE careflow_sip_calls_total counter\n");
        let _ = writeln!(
            s,
            "careflow_sip_calls_total{{result=\"attempted\"}} {}",
            self.calls_attempted.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "careflow_sip_calls_total{{result=\"answered\"}} {}",
            self.calls_answered.load(Ordering::Relaxed)
        );
        for (i, c) in ["3xx", "4xx", "5xx", "6xx"].iter().enumerate() {
            let _ = writeln!(
                s,
                "careflow_sip_calls_total{{result=\"failed\",class=\"{c}\"}} {}",
                self.calls_failed[i].load(Ordering::Relaxed)
            );
        }
        let counters = [
            (
                "careflow_sip_registrations_total",
                "REGISTER requests answered 200 OK.",
                &self.registrations,
            ),
            (
                "careflow_sip_auth_failures_total",
                "Digest authentications that failed.",
                &self.auth_failures,
            ),
            (
                "careflow_sip_auth_rechallenges_total",
                "Credentials with a stale, reused or foreign nonce, challenged again (not failures).",
                &self.auth_rechallenges,
            ),
            (
                "careflow_sip_parse_errors_total",
                "Messages that could not be parsed or were invalid.",
                &self.parse_errors,
            ),
            (
                "careflow_sip_retransmissions_total",
                "Retransmitted requests absorbed by transactions.",
                &self.retransmissions,
            ),
            (
                "careflow_sip_store_errors_total",
                "Subscriber or location store errors.",
                &self.store_errors,
            ),
            (
                "careflow_sip_cluster_bindings_skipped_total",
                "Bindings not called because the cluster node holding their flow is gone or restarted.",
                &self.cluster_skipped,
            ),
            (
                "careflow_sip_scanner_drops_total",
                "Requests from known SIP scanners, dropped unanswered.",
                &self.scanner_drops,
            ),
            (
                "careflow_sip_call_records_written_total",
                "Call detail records stored in the database.",
                &self.call_records_written,
            ),
            (
                "careflow_sip_call_records_lost_total",
                "Call detail records lost (database refusing after retries, queue full, too many calls at once).",
                &self.call_records_lost,
            ),
            (
                "careflow_sip_notifies_sent_total",
                "Dialog-event NOTIFYs sent to busy-lamp watchers (retransmissions included).",
                &self.notifies_sent,
            ),
            (
                "careflow_sip_flow_bindings_dropped_total",
                "Bindings removed because the connection they registered over closed.",
                &self.flow_bindings_dropped,
            ),
            (
                "careflow_sip_keepalive_failures_total",
                "OPTIONS keep-alives to devices behind NAT that got no answer.",
                &self.keepalive_failures,
            ),
            (
                "careflow_sip_auth_bans_total",
                "Sources banned for failed authentications (brute force).",
                &self.bans,
            ),
            (
                "careflow_sip_keepalive_bindings_dropped_total",
                "Bindings removed because their device behind NAT stopped answering keep-alives.",
                &self.keepalive_bindings_dropped,
            ),
            (
                "careflow_sip_keepalives_sent_total",
                "OPTIONS keep-alives sent to devices behind NAT.",
                &self.keepalives_sent,
            ),
            (
                "careflow_sip_keepalives_answered_total",
                "Answers to OPTIONS keep-alives.",
                &self.keepalives_answered,
            ),
        ];
        for (name, help, v) in counters {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                v.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "careflow_sip_active_bindings",
                "Registered contacts in the location service.",
                g.bindings,
            ),
            (
                "careflow_sip_active_transactions",
                "Server transactions in progress.",
                g.transactions,
            ),
            (
                "careflow_sip_open_connections",
                "Open TCP connections.",
                g.connections,
            ),
            (
                "careflow_sip_tracked_nonces",
                "Nonces tracked for replay protection.",
                g.tracked_nonces,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n");
        }
        let _ = write!(
            s,
            "# HELP careflow_sip_oversize_dropped_total Messages dropped for exceeding the size limit.\n# TYPE careflow_sip_oversize_dropped_total counter\ncareflow_sip_oversize_dropped_total {}\n",
            g.oversize
        );
        for (name, help, v) in [
            (
                "careflow_sip_dropped_banned_total",
                "Messages and connections dropped from banned or flooding sources, before parsing.",
                g.dropped_banned,
            ),
            (
                "careflow_sip_flood_bans_total",
                "Flows banned for exceeding the per-flow rate.",
                g.flood_bans,
            ),
            (
                "careflow_sip_site_shed_total",
                "Messages dropped because their site (IPv4 address or IPv6 /64) was over SECURITY_SITE_RATE_LIMIT (no ban).",
                g.site_shed,
            ),
            (
                "careflow_sip_send_dropped_total",
                "Messages dropped on the way out: a UDP send backlog or a connection's queue was full.",
                g.send_dropped,
            ),
            (
                "careflow_sip_stalled_connections_closed_total",
                "Connections closed because the peer stopped reading (write timeout or full queue).",
                g.stalled_closed,
            ),
            (
                "careflow_sip_refused_connections_total",
                "Connections refused at the total or per-IP limit.",
                g.refused_connections,
            ),
        ] {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        }
        let (answered, errors, latency_us) = g.rtpengine;
        let _ = write!(
            s,
            "# HELP careflow_sip_media_sessions Calls with media anchored at rtpengine.\n# TYPE careflow_sip_media_sessions gauge\ncareflow_sip_media_sessions {}\n\
             # HELP careflow_sip_rtpengine_commands_total rtpengine commands answered.\n# TYPE careflow_sip_rtpengine_commands_total counter\ncareflow_sip_rtpengine_commands_total {answered}\n\
             # HELP careflow_sip_rtpengine_errors_total rtpengine commands that failed (no answer or refused).\n# TYPE careflow_sip_rtpengine_errors_total counter\ncareflow_sip_rtpengine_errors_total {errors}\n\
             # HELP careflow_sip_rtpengine_latency_seconds_total Summed answer time of rtpengine commands.\n# TYPE careflow_sip_rtpengine_latency_seconds_total counter\ncareflow_sip_rtpengine_latency_seconds_total {}\n",
            g.media_sessions,
            latency_us as f64 / 1e6
        );
        let _ = write!(
            s,
            "# HELP careflow_sip_banned_sources Sources banned now.\n# TYPE careflow_sip_banned_sources gauge\ncareflow_sip_banned_sources {}\n\
             # HELP careflow_sip_cluster_nodes Cluster nodes alive as this node sees them (itself included; 0: not in a cluster).\n# TYPE careflow_sip_cluster_nodes gauge\ncareflow_sip_cluster_nodes {}\n",
            g.banned_now, g.cluster_nodes
        );
        s
    }
}
