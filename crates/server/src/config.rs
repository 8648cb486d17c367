//! The SIP side's settings, already validated (the binary reads and checks them).

use std::sync::Arc;
use std::time::Duration;

use careflow_core::keepalive::KeepaliveConfig;
use careflow_core::registrar::RegistrarConfig;
use careflow_core::transaction::TimerConfig;
use careflow_proto::ParseLimits;
use careflow_proto::digest::Algorithm;
use careflow_transport::{ListenSpec, TransportOptions};

/// Everything the SIP side needs, already validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Domains served; the first is the default realm.
    pub domains: Vec<String>,
    /// Listeners.
    pub listen: Vec<ListenSpec>,
    /// Registrar limits.
    pub registrar: RegistrarConfig,
    /// Digest algorithms offered, in challenge order.
    pub auth_algorithms: Vec<Algorithm>,
    /// Nonce lifetime in seconds.
    pub nonce_ttl_secs: u64,
    /// Secret for nonces (shared by all nodes of a cluster).
    pub secret: [u8; 32],
    /// Message size and header bounds.
    pub parse_limits: ParseLimits,
    /// Transport limits, TLS and WebSocket settings.
    pub transport: TransportOptions,
    /// Transaction timers.
    pub timers: TimerConfig,
    /// Bound on open server transactions.
    pub max_transactions: usize,
    /// Value of the Server / User-Agent header we send.
    pub server_header: String,
    /// Where authenticated calls to other domains go (a SIP URI); none: they are refused.
    pub outbound_gateway: Option<String>,
    /// Route requests from other domains to our users without authentication.
    pub allow_inbound: bool,
    /// User-Agent fragments whose requests are dropped silently.
    pub scanner_user_agents: careflow_core::scanner::ScannerAgents,
    /// OPTIONS keep-alives to devices behind NAT.
    pub keepalive: KeepaliveConfig,
    /// Per-source limits, brute-force counting and bans (shared with the transports).
    pub guard: Option<Arc<careflow_core::guard::Guard>>,
    /// Media anchoring at rtpengine.
    pub media: Option<MediaConfig>,
    /// Membership of a cluster (`CLUSTER_ADDRESS`); none: this node is alone.
    pub cluster: Option<ClusterConfig>,
    /// Busy lamps, pickup and presence.
    pub blf: BlfConfig,
    /// Push wake-ups of sleeping mobile devices (RFC 8599); none: no push service is
    /// configured, and `pn-*` parameters are stored but not acted on.
    pub push: Option<PushConfig>,
    /// Call detail records; none: no records are kept (`CDR=off`).
    pub cdr: Option<CdrConfig>,
    /// Live events (registrations, calls) for the API's streams and webhooks.
    pub events: careflow_store::events::Events,
    /// Provisioned devices: their own credentials (`<user>.<mac>`) are accepted for their
    /// user's requests. None: only users' own credentials are.
    pub devices: Option<Devices>,
}

/// Call detail records (issue 20).
#[derive(Clone)]
pub struct CdrConfig {
    /// Where records go (the subscriber database).
    pub store: Arc<dyn careflow_store::calls::CallRecordStore>,
    /// This node's name in the records.
    pub node: String,
    /// A call whose BYE never comes ends after this long (`CDR_MAX_CALL`).
    pub max_call: Duration,
    /// Records older than this are purged (`CDR_RETENTION_DAYS`); none: kept for ever.
    pub retention: Option<Duration>,
}

/// The provisioned devices' store, for authentication.
#[derive(Clone)]
pub struct Devices(pub Arc<dyn careflow_store::devices::DeviceStore>);

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices(..)")
    }
}

impl std::fmt::Debug for CdrConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdrConfig")
            .field("node", &self.node)
            .field("max_call", &self.max_call)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Busy lamps, pickup and presence (issue 19).
#[derive(Debug, Clone)]
pub struct BlfConfig {
    /// Who may watch whose busy lamp or presence and pick up whose calls (`BLF_GROUPS`).
    pub watch_policy: careflow_core::dialog_event::pickup::WatchPolicy,
    /// Dialling this prefix and a user's name picks up that user's ringing call
    /// (`PICKUP_PREFIX`, `**`); none: no pickup by code.
    pub pickup_prefix: Option<String>,
    /// Dialog-info quirks by User-Agent fragment (lower case), first match wins
    /// (`BLF_QUIRKS`).
    pub quirks: Vec<(String, careflow_core::dialog_event::info::Quirks)>,
    /// Where subscriptions are kept over a restart (`DATA_DIR/subscriptions.json`); none: not
    /// kept, and a phone's first refresh after a restart gets 481.
    pub state_file: Option<std::path::PathBuf>,
}

impl BlfConfig {
    /// The quirks of a watcher with this User-Agent.
    pub fn quirks_of(&self, user_agent: Option<&str>) -> careflow_core::dialog_event::info::Quirks {
        let Some(ua) = user_agent.map(str::to_ascii_lowercase) else {
            return Default::default();
        };
        self.quirks
            .iter()
            .find(|(fragment, _)| ua.contains(fragment.as_str()))
            .map(|(_, q)| *q)
            .unwrap_or_default()
    }
}

/// A cluster node's settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the other nodes reach this one's internal link (a TCP listener).
    pub address: std::net::SocketAddr,
    /// The internal link is TLS (`CLUSTER_TLS`).
    pub tls: bool,
    /// Keys of the owner tokens (`CLUSTER_SECRET`, and the previous one during a rotation).
    pub keys: careflow_core::cluster::ClusterKeys,
    /// The nodes' liveness keys in the shared Redis.
    pub nodes: careflow_store::redis::nodes::NodeKeys,
    /// Pub/sub between the nodes (starts and stops, bans).
    pub bus: careflow_store::redis::bus::Bus,
}

/// Media settings.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// rtpengine ng control addresses; empty: no anchoring.
    pub rtpengine: Vec<std::net::SocketAddr>,
    /// When to anchor.
    pub policy: careflow_core::media::Policy,
    /// Time to wait for one answer from rtpengine (retried three times).
    pub timeout: Duration,
    /// How often anchored calls are checked against rtpengine.
    pub check_interval: Duration,
}

/// The push services (`PUSH_*`), already set up.
#[derive(Clone)]
pub struct PushConfig {
    /// APNs, when a `.p8` key is configured.
    pub apns: Option<Arc<careflow_push::apns::Apns>>,
    /// FCM, when a service account is configured.
    pub fcm: Option<Arc<careflow_push::fcm::Fcm>>,
    /// How long a request waits for a pushed device (`PUSH_WAIT`), then 480.
    pub wait: Duration,
    /// How long before a push binding expires it is woken to register again (`+sip.pnsreg`,
    /// RFC 8599 §5.5), seconds.
    pub refresh_before: u64,
}

impl std::fmt::Debug for PushConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushConfig")
            .field("apns", &self.apns.is_some())
            .field("fcm", &self.fcm.is_some())
            .field("wait", &self.wait)
            .field("refresh_before", &self.refresh_before)
            .finish()
    }
}
