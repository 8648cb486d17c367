//! Configuration: a TOML file (`--config PATH`) and environment variables that override it.
//!
//! Every key has one name: lower case in the file, upper case in the environment
//! (`sip_domain` / `SIP_DOMAIN`). Values are parsed once, here, into typed settings; an
//! invalid value stops startup with a message naming the key. [`KEYS`] (`keys.rs`) is the single
//! list of keys, defaults and documentation: `docs/configuration.md` is checked against it by a test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use careflow_proto::digest::Algorithm;
use careflow_store::sqlite::DbUrl;
use careflow_transport::ListenSpec;

pub use cluster::ClusterSettings;
pub use keys::KEYS;
pub use push::PushSettings;

mod api;
mod cluster;
mod keys;
mod media;
mod provision;
mod push;
mod raw;
mod security;
mod sip;
mod syslog;
mod tls;
mod webhook;

use raw::{Raw, invalid};

/// Typed, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// SIP domain.
    pub sip_domain: String,
    /// SIP listeners.
    pub sip_listen: Vec<ListenSpec>,
    /// HTTP listener.
    pub http_listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Subscriber database.
    pub db_url: DbUrl,
    /// Shared location service.
    pub redis_url: Option<String>,
    /// Membership of a cluster, when `CLUSTER_ADDRESS` is set.
    pub cluster: Option<ClusterSettings>,
    /// Push services for sleeping mobile devices.
    pub push: PushSettings,
    /// Nonce secret, when configured.
    pub nonce_secret: Option<[u8; 32]>,
    /// Digest algorithms in order.
    pub auth_algorithms: Vec<Algorithm>,
    /// Nonce lifetime.
    pub nonce_ttl: u64,
    /// How long a subscriber row read for authentication is kept (zero: not at all).
    pub subscriber_cache_ttl: Duration,
    /// Most subscriber rows kept.
    pub subscriber_cache_size: usize,
    /// Registrar limits.
    pub registrar: careflow_core::registrar::RegistrarConfig,
    /// Parser bounds (MAX_MESSAGE_SIZE, MAX_HEADERS).
    pub parse_limits: careflow_proto::ParseLimits,
    /// The transports' size, connection and time limits.
    pub transport_limits: careflow_transport::TransportLimits,
    /// RFC 3261 timers (T1_MS, T2_MS, T4_MS, TIMER_C).
    pub timers: careflow_core::transaction::TimerConfig,
    /// Transaction bound.
    pub max_transactions: usize,
    /// Runtime worker threads.
    pub worker_threads: usize,
    /// Gateway for other domains.
    pub outbound_gateway: Option<String>,
    /// Who may watch whose busy lamp (`BLF_GROUPS`).
    pub watch_policy: careflow_core::dialog_event::pickup::WatchPolicy,
    /// `PICKUP_PREFIX`.
    pub pickup_prefix: String,
    /// Call detail records (`CDR`, `CDR_MAX_CALL`, `CDR_RETENTION_DAYS`); none: off.
    pub cdr: Option<CdrSettings>,
    /// This node's name in records (`NODE_NAME`, default the host name).
    pub node_name: String,
    /// The SIEM's syslog collector the audit trail goes to (`AUDIT_SYSLOG`): host, port, TLS.
    pub audit_syslog: Option<(String, u16, bool)>,
    /// Desk phone provisioning (`PROVISION_*`, `DEVICE_ROTATION_GRACE`).
    pub provision: provision::ProvisionSettings,
    /// The webhook to CareFlow (`WEBHOOK_*`); none: no webhook.
    pub webhook: Option<webhook::WebhookSettings>,
    /// Dialog-info quirks by User-Agent fragment (`BLF_QUIRKS`).
    pub blf_quirks: Vec<(String, careflow_core::dialog_event::info::Quirks)>,
    /// Accept requests from other domains.
    pub allow_inbound: bool,
    /// User-Agent fragments of scanners (`SCANNER_USER_AGENTS`).
    pub scanner_user_agents: careflow_core::scanner::ScannerAgents,
    /// Per-source limits and bans; None when the rate limit is 0.
    pub guard: Option<careflow_core::guard::GuardConfig>,
    /// How long SIGTERM drains.
    pub shutdown_grace: Duration,
    /// The log filter (when RUST_LOG is unset).
    pub log_level: String,
    /// Certificate and key, when configured (else self-signed when a listener needs TLS).
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// CA for client certificates.
    pub tls_client_ca: Option<PathBuf>,
    /// Extra CA for servers we connect to.
    pub tls_ca_file: Option<PathBuf>,
    /// Refuse TLS clients without a certificate.
    pub tls_require_client_cert: bool,
    /// WebSocket listener rules.
    pub ws: careflow_transport::WsOptions,
    /// OPTIONS keep-alives to NATed UDP devices.
    pub keepalive: careflow_server::keepalive::KeepaliveConfig,
    /// Media anchoring.
    pub media: careflow_server::media::MediaConfig,
    /// User token verification for the API.
    pub jwt: careflow_api::auth::JwtConfig,
    /// API requests per second per caller.
    pub api_rate_limit: u32,
    /// API burst per caller.
    pub api_rate_burst: u32,
    /// CareFlow user check URL and token.
    pub user_check: Option<(String, Option<String>)>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// path
        path: PathBuf,
        /// cause
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// path
        path: PathBuf,
        /// parser message
        message: String,
    },
    /// A key is unknown.
    #[error("unknown configuration key `{0}` (see docs/configuration.md)")]
    UnknownKey(String),
    /// A value is invalid.
    #[error("invalid value for {key}: {message}")]
    Invalid {
        /// the key, as named in the environment
        key: String,
        /// what is wrong
        message: String,
    },
}

fn defaults() -> BTreeMap<String, String> {
    KEYS.iter()
        .filter(|(_, d, _)| !d.is_empty())
        .map(|(k, d, _)| (k.to_string(), d.to_string()))
        .collect()
}

/// The raw key values from the file and the environment, and every problem found on the way
/// (unreadable file, bad TOML, unknown keys, values of the wrong type). The first element
/// holds only the keys that were set.
fn gather(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> (BTreeMap<String, String>, Vec<ConfigError>) {
    let mut set = BTreeMap::new();
    let mut problems = Vec::new();
    if let Some(path) = path {
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(ConfigError::Read {
                path: path.into(),
                source: e,
            }),
            Ok(text) => match text.parse::<toml::Table>() {
                Err(e) => problems.push(ConfigError::Syntax {
                    path: path.into(),
                    message: e.message().to_string(),
                }),
                Ok(table) => {
                    for (k, v) in table {
                        if !KEYS.iter().any(|(key, _, _)| *key == k) {
                            problems.push(ConfigError::UnknownKey(k));
                            continue;
                        }
                        let s = match v {
                            toml::Value::String(s) => s,
                            toml::Value::Integer(i) => i.to_string(),
                            toml::Value::Boolean(b) => b.to_string(),
                            toml::Value::Array(a) => a
                                .iter()
                                .map(|x| match x {
                                    toml::Value::String(s) => s.clone(),
                                    toml::Value::Integer(i) => i.to_string(),
                                    other => other.type_str().to_string(),
                                })
                                .collect::<Vec<_>>()
                                .join(","),
                            other => {
                                problems.push(invalid(
                                    &k,
                                    format!(
                                        "expected a string, number or list, got {}",
                                        other.type_str()
                                    ),
                                ));
                                continue;
                            }
                        };
                        set.insert(k, s);
                    }
                }
            },
        }
    }
    for (k, _, _) in KEYS {
        if let Some(v) = env(&k.to_ascii_uppercase()) {
            set.insert(k.to_string(), v);
        }
    }
    (set, problems)
}

/// Call detail record settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdrSettings {
    /// `CDR_MAX_CALL`.
    pub max_call: Duration,
    /// `CDR_RETENTION_DAYS`; none: kept for ever.
    pub retention: Option<Duration>,
}

impl Config {
    /// Loads the file (if any) and applies environment overrides from `env`; stops at the
    /// first problem.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (set, mut problems) = gather(path, &env);
        if !problems.is_empty() {
            return Err(problems.remove(0));
        }
        let mut raw = defaults();
        raw.extend(set);
        Self::from_raw(&raw)
    }

    /// Every key's value in force (defaults, then the file, then the environment), to tell
    /// what a reload changed.
    pub fn values(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, String> {
        let (set, _) = gather(path, &env);
        let mut raw = defaults();
        raw.extend(set);
        raw
    }

    /// Every problem of a configuration at once (for `careflow-sip check-config`): each key
    /// set is checked on its own against the defaults, then the whole for what keys say about
    /// each other. Empty when the configuration is valid.
    pub fn check(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let (set, mut problems) = gather(path, &env);
        let mut seen: Vec<String> = problems.iter().map(ToString::to_string).collect();
        // Keys only meaningful together are checked together.
        const GROUPS: &[&[&str]] = &[
            &["tls_cert", "tls_key"],
            &["tls_client_ca", "tls_require_client_cert"],
            &["min_expires", "max_expires", "default_expires"],
            &["webhook_url", "webhook_secret", "webhook_secret_file"],
        ];
        for k in set.keys() {
            let group = GROUPS
                .iter()
                .find(|g| g.contains(&k.as_str()))
                .copied()
                .unwrap_or(&[]);
            let mut raw = defaults();
            for (key, v) in &set {
                if key == k || group.contains(&key.as_str()) {
                    raw.insert(key.clone(), v.clone());
                }
            }
            if let Err(e) = Self::from_raw(&raw) {
                let text = e.to_string();
                if !seen.contains(&text) {
                    seen.push(text);
                    problems.push(e);
                }
            }
        }
        let mut raw = defaults();
        raw.extend(set);
        if let Err(e) = Self::from_raw(&raw)
            && !seen.contains(&e.to_string())
        {
            problems.push(e);
        }
        problems
    }

    fn from_raw(raw: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let r = Raw(raw);
        let sip_domain = sip::domain(&r)?;
        let watch_policy = sip::watch_policy(&r, &sip_domain)?;
        let sip_listen = sip::listen(r.get("sip_listen"))?;
        let tls = tls::keys(&r)?;
        let ws = sip::ws(&r)?;
        let http_listen = r.get("http_listen").parse().map_err(|_| {
            invalid(
                "http_listen",
                format!(
                    "expected HOST:PORT such as 127.0.0.1:8080, got `{}`",
                    r.get("http_listen")
                ),
            )
        })?;
        let data_dir = PathBuf::from(r.get("data_dir"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let db_url = match r.get("db_url") {
            "" => DbUrl::Sqlite(data_dir.join("careflow.db")),
            url => DbUrl::parse(url).map_err(|m| invalid("db_url", m))?,
        };
        let nonce_secret = sip::nonce_secret(&r)?;
        let provision = provision::settings(&r, &data_dir, &sip_domain)?;
        provision::check_pnp(&provision, &sip_listen)?;
        let cluster = cluster::cluster(&r, !r.get("redis_url").is_empty())?;
        let auth_algorithms = sip::auth_algorithms(&r)?;
        let registrar = sip::registrar(&r)?;
        let keepalive = sip::keepalive(&r)?;
        let jwt = api::jwt(&r)?;
        let user_check = api::user_check(&r)?;
        let guard = security::guard(&r)?;
        let media = media::media(&r)?;
        let push = push::push(&r)?;
        let max_message_size = r.num("max_message_size", 1024, 1 << 20)? as usize;
        let parse_limits = careflow_proto::ParseLimits {
            max_size: max_message_size,
            max_headers: r.num("max_headers", 16, 10_000)? as usize,
        };
        Ok(Self {
            media,
            push,
            guard,
            shutdown_grace: r.secs("shutdown_grace", 0, 3600)?,
            log_level: {
                let l = r.get("log_level");
                if tracing_subscriber::EnvFilter::try_new(l).is_err() {
                    return Err(invalid(
                        "log_level",
                        format!(
                            "`{l}` is not a log filter such as info or warn,careflow::security=info"
                        ),
                    ));
                }
                l.to_string()
            },
            user_check,
            jwt,
            api_rate_limit: r.num32("api_rate_limit", 1, 100_000)?,
            api_rate_burst: r.num32("api_rate_burst", 1, 100_000)?,
            keepalive,
            tls_files: tls.files,
            tls_client_ca: tls.client_ca,
            tls_ca_file: tls.ca_file,
            tls_require_client_cert: tls.require_client_cert,
            ws,
            sip_domain,
            sip_listen,
            http_listen,
            data_dir,
            db_url,
            redis_url: match r.get("redis_url") {
                "" => None,
                u if u.starts_with("redis://") || u.starts_with("rediss://") => Some(u.to_string()),
                u => {
                    return Err(invalid("redis_url", format!("`{u}` is not a redis:// URL")));
                }
            },
            nonce_secret,
            cluster,
            auth_algorithms,
            nonce_ttl: r.num("nonce_ttl", 10, 86_400)?,
            subscriber_cache_ttl: r.secs("subscriber_cache_ttl", 0, 3600)?,
            subscriber_cache_size: r.num("subscriber_cache_size", 1, 10_000_000)? as usize,
            registrar,
            parse_limits,
            transport_limits: sip::transport_limits(&r, max_message_size)?,
            timers: sip::timers(&r)?,
            max_transactions: r.num("max_transactions", 100, 10_000_000)? as usize,
            worker_threads: r.num("worker_threads", 1, 256)? as usize,
            outbound_gateway: sip::outbound_gateway(&r)?,
            watch_policy,
            pickup_prefix: {
                let p = r.get("pickup_prefix").trim();
                if p.contains(|c: char| c.is_ascii_alphanumeric() || c == '@' || c.is_whitespace())
                {
                    return Err(invalid(
                        "pickup_prefix",
                        format!(
                            "`{p}` must be symbols such as ** or *# (no digits, letters or spaces): it is dialled right before an extension"
                        ),
                    ));
                }
                p.to_string()
            },
            blf_quirks: sip::blf_quirks(&r)?,
            cdr: if r.flag("cdr")? {
                Some(CdrSettings {
                    max_call: r.secs("cdr_max_call", 60, 7 * 86_400)?,
                    retention: match r.num("cdr_retention_days", 0, 36_500)? {
                        0 => None,
                        d => Some(Duration::from_secs(d * 86_400)),
                    },
                })
            } else {
                None
            },
            webhook: webhook::webhook(&r)?,
            audit_syslog: syslog::audit_syslog(&r)?,
            provision,
            node_name: match r.get("node_name").trim() {
                "" => std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "careflow-sip".to_string()),
                n => n.to_string(),
            },
            scanner_user_agents: security::scanner_user_agents(&r)?,
            allow_inbound: r.flag("allow_inbound")?,
        })
    }

    /// TLS settings for a certificate and key, with the configured client-certificate rules.
    pub fn tls_settings(
        &self,
        cert: PathBuf,
        key: PathBuf,
    ) -> careflow_transport::tls::TlsSettings {
        careflow_transport::tls::TlsSettings {
            cert,
            key,
            client_ca: self.tls_client_ca.clone(),
            require_client_cert: self.tls_require_client_cert,
        }
    }

    /// Path of the registration journal.
    pub fn location_path(&self) -> PathBuf {
        self.data_dir.join("location.journal")
    }

    /// Path of the SQLite registration journal of earlier versions, imported on start.
    pub fn legacy_location_path(&self) -> PathBuf {
        self.data_dir.join("location.db")
    }
}

#[cfg(test)]
mod tests;
